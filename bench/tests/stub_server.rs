//! The bench's arithmetic against a stub OpenAI server whose timing and failures are
//! known in advance: first text 100 ms after the request, then a token every 20 ms, usage
//! at the end, and chosen requests (by arrival order) failing in chosen ways.
//!
//! Measured times are the ideal ones plus scheduling delays, which on a loaded 2-core CI
//! machine reach 10-20 ms (a 9 ms miss under a tighter slack was seen). The delays in the
//! plan are large enough that the slack allowed for that still tells a wrong statistic
//! (another percentile rule, a slow request left out) from the right one.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use clap::Parser;
use serde_json::{Value, json};
use switchyard_bench::{Args, Outcome};

/// What the stub does; request numbers count arrivals from 1.
#[derive(Clone, Default)]
struct Plan {
    first_token: Duration,
    every: Duration,
    /// Every n-th request gets a 500.
    fail_every: Option<usize>,
    /// Aborts the connection after two tokens.
    broken_at: Option<usize>,
    /// Sends an error event after two tokens.
    error_at: Option<usize>,
    /// Sends one token, then nothing for 30 s.
    hang_at: Option<usize>,
    /// Its first token comes this much later.
    slow_at: Option<(usize, Duration)>,
    /// The second request with a prompt already seen gets one different token.
    corrupt_repeat: bool,
}

struct Stub {
    plan: Plan,
    arrivals: AtomicUsize,
    seen: Mutex<HashMap<String, usize>>,
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completions,
    Chat,
}

const MODEL: &str = "stub-model";

/// Serves the stub on 127.0.0.1:0 from its own thread and runtime, so the bench's work
/// cannot delay its timers. Returns the base URL.
fn start_stub(plan: Plan) -> String {
    let stub = Arc::new(Stub {
        plan,
        arrivals: AtomicUsize::new(0),
        seen: Mutex::new(HashMap::new()),
    });
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("stub runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("binding the stub");
            tx.send(listener.local_addr().expect("stub address"))
                .expect("reporting the address");
            let app = Router::new()
                .route(
                    "/v1/models",
                    get(|| async {
                        axum::Json(json!({"object": "list", "data": [{"id": MODEL}]}))
                    }),
                )
                .route(
                    "/v1/completions",
                    post(|s: State<Arc<Stub>>, b: Bytes| generate(s, b, Kind::Completions)),
                )
                .route(
                    "/v1/chat/completions",
                    post(|s: State<Arc<Stub>>, b: Bytes| generate(s, b, Kind::Chat)),
                )
                .with_state(stub);
            axum::serve(listener, app).await.expect("serving the stub");
        });
    });
    format!("http://{}", rx.recv().expect("stub address"))
}

fn error(status: StatusCode, message: &str) -> Response {
    (
        status,
        axum::Json(json!({"error": {"message": message, "type": "stub_error"}})),
    )
        .into_response()
}

enum Step {
    Data(Value),
    Done,
    Break,
    Hang,
}

async fn generate(State(stub): State<Arc<Stub>>, body: Bytes, kind: Kind) -> Response {
    let t0 = tokio::time::Instant::now();
    let n = stub.arrivals.fetch_add(1, Ordering::SeqCst) + 1;
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return error(StatusCode::BAD_REQUEST, "not JSON");
    };
    // The bench must ask for what it measures.
    let max_key = match kind {
        Kind::Completions => "max_tokens",
        Kind::Chat => "max_completion_tokens",
    };
    let max_tokens = req[max_key].as_u64().unwrap_or(0) as usize;
    if req["model"] != MODEL
        || req["stream"] != true
        || req["stream_options"]["include_usage"] != true
        || req["temperature"] != 0.0
        || max_tokens == 0
    {
        return error(
            StatusCode::BAD_REQUEST,
            &format!("unexpected request {req}"),
        );
    }
    let (prompt, prompt_tokens) = match kind {
        Kind::Completions => {
            let ids = req["prompt"].as_array().map_or(0, Vec::len);
            (req["prompt"].to_string(), ids)
        }
        Kind::Chat => {
            let text = req["messages"][0]["content"]
                .as_str()
                .unwrap_or("")
                .to_owned();
            let words = text.split_whitespace().count();
            (text, words)
        }
    };
    let plan = &stub.plan;
    if plan.fail_every.is_some_and(|k| n % k == 0) {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "injected failure");
    }
    let repeat = {
        let mut seen = stub.seen.lock().expect("stub lock");
        let count = seen.entry(prompt.clone()).or_insert(0);
        *count += 1;
        *count
    };
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    prompt.hash(&mut hasher);
    let seed = hasher.finish() % 1000;

    let chunk = |text: &str, finish: Option<&str>| match kind {
        Kind::Completions => json!({"object": "text_completion", "model": MODEL,
            "choices": [{"index": 0, "text": text, "finish_reason": finish}]}),
        Kind::Chat => {
            let delta = if finish.is_some() {
                json!({})
            } else {
                json!({"content": text})
            };
            json!({"object": "chat.completion.chunk", "model": MODEL,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        }
    };
    let mut steps: Vec<(Duration, Step)> = Vec::new();
    if kind == Kind::Chat {
        // OpenAI's opening chunk: a role and empty content, at once. Not a token.
        steps.push((
            Duration::ZERO,
            Step::Data(json!({"object": "chat.completion.chunk", "model": MODEL,
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]})),
        ));
    }
    let first = plan.first_token
        + match plan.slow_at {
            Some((k, extra)) if k == n => extra,
            _ => Duration::ZERO,
        };
    let at = |i: usize| first + plan.every * i as u32;
    // Set when an injected failure ends the stream early.
    let mut cut = false;
    for i in 0..max_tokens {
        let text = if plan.corrupt_repeat && repeat == 2 && i == 1 {
            " CORRUPT".to_owned()
        } else {
            format!(" w{}", (seed as usize + i) % 1000)
        };
        steps.push((at(i), Step::Data(chunk(&text, None))));
        if i == 1 && plan.broken_at == Some(n) {
            steps.push((at(i), Step::Break));
            cut = true;
            break;
        }
        if i == 1 && plan.error_at == Some(n) {
            steps.push((
                at(i),
                Step::Data(json!({"error": {"message": "injected stream error", "code": 500}})),
            ));
            steps.push((at(i), Step::Done));
            cut = true;
            break;
        }
        if i == 0 && plan.hang_at == Some(n) {
            steps.push((at(i), Step::Hang));
            cut = true;
            break;
        }
    }
    if !cut {
        let end = at(max_tokens.saturating_sub(1));
        steps.push((end, Step::Data(chunk("", Some("length")))));
        steps.push((
            end,
            Step::Data(
                json!({"object": "text_completion", "model": MODEL, "choices": [],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": max_tokens,
                          "total_tokens": prompt_tokens + max_tokens}}),
            ),
        ));
        steps.push((end, Step::Done));
    }

    let stream = futures::stream::unfold(steps.into_iter(), move |mut steps| async move {
        let (offset, step) = steps.next()?;
        tokio::time::sleep_until(t0 + offset).await;
        let item = match step {
            Step::Data(v) => Ok(Bytes::from(format!("data: {v}\n\n"))),
            Step::Done => Ok(Bytes::from_static(b"data: [DONE]\n\n")),
            // An error from the body makes hyper abort the connection mid-response.
            Step::Break => Err(std::io::Error::other("injected break")),
            Step::Hang => {
                tokio::time::sleep(Duration::from_secs(30)).await;
                Ok(Bytes::new())
            }
        };
        Some((item, steps))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "building the response"))
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: Args,
}

async fn bench(flags: &[&str]) -> (Outcome, String) {
    let argv = std::iter::once("bench").chain(flags.iter().copied());
    let args = Cli::try_parse_from(argv).expect("bench flags").args;
    let mut out = Vec::new();
    let outcome = switchyard_bench::run(&args, &mut out)
        .await
        .expect("the run completes");
    (outcome, String::from_utf8_lossy(&out).into_owned())
}

fn f(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number in {v}"))
}

/// `measured` is `ideal` plus scheduling and transfer delays: never much less, and at
/// most `slack` more.
fn near(v: &Value, key: &str, ideal: f64, slack: f64) {
    let got = f(v, key);
    assert!(
        got >= ideal - 1.0 && got <= ideal + slack,
        "{key} = {got:.3} ms, expected {ideal:.3} (+{slack})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_match_known_delays_and_failures_are_counted_by_kind() {
    let url = start_stub(Plan {
        first_token: Duration::from_millis(100),
        every: Duration::from_millis(20),
        fail_every: Some(5),
        broken_at: Some(3),
        error_at: Some(7),
        hang_at: Some(8),
        slow_at: Some((2, Duration::from_millis(300))),
        corrupt_repeat: false,
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let result_path = dir.path().join("result.json");
    let plot_path = dir.path().join("plot.svg");
    let (outcome, table) = bench(&[
        "--base-url",
        &url,
        "--model",
        MODEL,
        "--num-prompts",
        "20",
        "--max-concurrency",
        "4",
        "--random-input-len",
        "16",
        "--random-output-len",
        "8",
        "--metric-percentiles",
        "50,90,99",
        "--goodput",
        "ttft:200",
        "--request-timeout",
        "1",
        "--save-result",
        result_path.to_str().expect("utf-8 path"),
        "--plot",
        plot_path.to_str().expect("utf-8 path"),
    ])
    .await;
    let saved: Value = serde_json::from_str(
        &std::fs::read_to_string(&result_path).expect("the result file was written"),
    )
    .expect("the result file is JSON");
    let r = &outcome.result;
    // serde_json reads floats back to within an ulp, so compare what is exact.
    let keys = |v: &Value| v.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>());
    assert_eq!(keys(&saved), keys(r));
    for key in [
        "completed",
        "failed",
        "errors",
        "total_output_tokens",
        "output_lens",
    ] {
        assert_eq!(saved[key], r[key], "{key}");
    }

    // 20 arrivals: 5, 10, 15, 20 get a 500; 3 breaks off; 7 reports an error in the
    // stream; 8 hangs past the timeout. The other 13 complete with 8 tokens each.
    assert_eq!(r["completed"], 13, "{table}");
    assert_eq!(r["failed"], 7);
    assert_eq!(
        r["errors"],
        json!({"http_500": 4, "transport": 1, "stream_error": 1, "timeout": 1})
    );
    assert_eq!(r["total_output_tokens"], 13 * 8);
    assert_eq!(r["total_input_tokens"], 13 * 16);
    let lens = r["output_lens"].as_array().expect("output_lens");
    assert_eq!(lens.len(), 20);
    assert_eq!(lens.iter().filter(|l| **l == 8).count(), 13);
    assert_eq!(lens.iter().filter(|l| **l == 0).count(), 7);

    let duration = f(r, "duration");
    assert!(
        (1.0..6.0).contains(&duration),
        "duration {duration}: the timeout alone takes 1 s"
    );
    let per_s = |x: f64| x / duration;
    let exact = |key: &str, want: f64| {
        let got = f(r, key);
        assert!(
            (got - want).abs() < 1e-9 * want.max(1.0),
            "{key} = {got}, expected {want}"
        );
    };
    exact("request_throughput", per_s(13.0));
    exact("output_throughput", per_s(104.0));
    exact("total_token_throughput", per_s(104.0 + 208.0));
    // Request 2's first token is 300 ms late: it misses the 200 ms TTFT objective.
    exact("request_goodput", per_s(12.0));

    // TTFT: twelve at 100 ms and one at 400 ms. Mean 1600/13; numpy's p99 interpolates at
    // rank 0.99 * 12 = 11.88: 100 + 0.88 * 300 = 364 (nearest-rank would say 400).
    near(r, "mean_ttft_ms", 1600.0 / 13.0, 20.0);
    near(r, "median_ttft_ms", 100.0, 20.0);
    near(r, "p50_ttft_ms", 100.0, 20.0);
    near(r, "p90_ttft_ms", 100.0, 20.0);
    near(r, "p99_ttft_ms", 364.0, 20.0);
    let mean = 1600.0 / 13.0;
    let var = (12.0 * (100.0f64 - mean).powi(2) + (400.0f64 - mean).powi(2)) / 13.0;
    let std = f(r, "std_ttft_ms");
    assert!(
        (std - var.sqrt()).abs() < 8.0,
        "std_ttft_ms {std}, expected {}",
        var.sqrt()
    );
    // TPOT: (e2e - ttft) / 7 = 20 ms for every request, the slow one included.
    for key in ["mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms"] {
        near(r, key, 20.0, 4.0);
    }
    // ITL: every gap of every completed request, 13 x 7, 20 ms each.
    let itls: usize = r["itls"]
        .as_array()
        .expect("itls")
        .iter()
        .map(|v| v.as_array().map_or(0, Vec::len))
        .sum();
    assert_eq!(itls, 13 * 7);
    near(r, "mean_itl_ms", 20.0, 4.0);
    near(r, "median_itl_ms", 20.0, 4.0);
    // E2EL: twelve at 100 + 7 x 20 = 240 ms and one at 540 ms.
    near(r, "mean_e2el_ms", (12.0 * 240.0 + 540.0) / 13.0, 20.0);
    near(r, "median_e2el_ms", 240.0, 20.0);
    near(r, "p99_e2el_ms", 240.0 + 0.88 * 300.0, 24.0);
    let peak = r["max_concurrent_requests"].as_u64().expect("peak");
    assert!(
        (1..=4).contains(&peak),
        "never more than --max-concurrency: {peak}"
    );

    assert!(
        table.contains(&format!("{:<40} {:<10}", "Successful requests:", 13)),
        "{table}"
    );
    assert!(table.contains(&format!("{:<40} {:<10}", "Failed requests:", 7)));
    assert!(table.contains("Request goodput (req/s):"));
    assert!(table.contains("P99 E2EL (ms):"));
    assert!(table.contains("http_500:"));
    let svg = std::fs::read_to_string(&plot_path).expect("the plot was written");
    assert!(svg.contains("<svg") && svg.contains("TTFT CDF") && svg.contains("Output throughput"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_ttft_skips_the_role_chunk_and_arrivals_follow_the_rate() {
    let url = start_stub(Plan {
        first_token: Duration::from_millis(100),
        every: Duration::from_millis(20),
        ..Plan::default()
    });
    // No --model: the bench asks /v1/models.
    let (outcome, _) = bench(&[
        "--base-url",
        &url,
        "--endpoint",
        "/v1/chat/completions",
        "--num-prompts",
        "6",
        "--request-rate",
        "40",
        "--burstiness",
        "2",
        "--random-input-len",
        "12",
        "--random-output-len",
        "5",
    ])
    .await;
    let r = &outcome.result;
    assert_eq!(r["model_id"], MODEL);
    assert_eq!(r["backend"], "openai-chat");
    assert_eq!(
        (r["completed"].as_u64(), r["failed"].as_u64()),
        (Some(6), Some(0))
    );
    assert_eq!(r["total_input_tokens"], 6 * 12);
    assert_eq!(r["total_output_tokens"], 6 * 5);
    // The role chunk arrives at once; the first text after 100 ms.
    near(r, "mean_ttft_ms", 100.0, 20.0);
    near(r, "mean_tpot_ms", 20.0, 4.0);
    // Gaps rescaled so the last request goes out at n / rate = 150 ms.
    let starts = r["start_times"].as_array().expect("start_times");
    let last = starts[5].as_f64().expect("a time");
    assert!((0.149..0.2).contains(&last), "last send at {last} s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_flags_a_repeat_that_comes_back_different() {
    let flags = |url: &str| {
        [
            "--base-url",
            url,
            "--num-prompts",
            "12",
            "--probe-fraction",
            "0.5",
            "--random-input-len",
            "8",
            "--random-output-len",
            "4",
        ]
        .map(str::to_owned)
    };
    let fast = Plan {
        first_token: Duration::from_millis(2),
        every: Duration::from_millis(1),
        ..Plan::default()
    };
    let consistent = start_stub(fast.clone());
    let f1 = flags(&consistent);
    let (good, _) = bench(&f1.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let p = good.probe.expect("probes were sent");
    assert_eq!(
        (p.requests, p.completed, p.mismatches, p.distinct_outputs),
        (6, 6, 0, 1)
    );

    let corrupting = start_stub(Plan {
        corrupt_repeat: true,
        ..fast
    });
    let f2 = flags(&corrupting);
    let (bad, table) = bench(&f2.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let p = bad.probe.expect("probes were sent");
    // Only the second arrival of the probe prompt differs.
    assert_eq!(
        (p.requests, p.completed, p.mismatches, p.distinct_outputs),
        (6, 6, 1, 2)
    );
    assert!(p.examples[0].got.contains("CORRUPT"), "{:?}", p.examples);
    assert_eq!(bad.result["probe"]["mismatches"], 1);
    assert_eq!(
        bad.result["failed"], 0,
        "a mismatch is not a failed request"
    );
    assert!(
        table.contains(&format!("{:<40} {:<10}", "Probe mismatches:", 1)),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server_fails_every_request_visibly() {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let (outcome, table) = bench(&[
        "--base-url",
        &format!("http://127.0.0.1:{port}"),
        "--model",
        MODEL,
        "--num-prompts",
        "3",
        "--random-input-len",
        "4",
        "--random-output-len",
        "4",
    ])
    .await;
    let r = &outcome.result;
    assert_eq!(
        (r["completed"].as_u64(), r["failed"].as_u64()),
        (Some(0), Some(3))
    );
    assert_eq!(r["errors"], json!({"transport": 3}));
    assert_eq!(r["request_throughput"], 0.0);
    assert!(table.contains("Error 0: transport:"), "{table}");
}
