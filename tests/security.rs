//! Trust between tiers and hostile clients, on real processes: mutual TLS between the
//! coordinator and expert nodes (`certs`, `up --tls`, refusals of strangers), API keys
//! on the HTTP API, every class of bad request with its error while good requests keep
//! their exact answers, and the per-request deadline.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::http::Client;
use common::{
    Cluster, Proc, assert_error, exe, golden, golden_texts, greedy, poll, post_ok, run_to_exit,
    text_of, tiny_model,
};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------
// Mutual TLS

/// `switchyard certs --out DIR --nodes N`.
fn certs(dir: &Path, nodes: usize) {
    let out = Command::new(exe())
        .args(["certs", "--nodes", &nodes.to_string(), "--out"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "switchyard certs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `--tls-cert DIR/NAME.crt --tls-key DIR/NAME.key --tls-ca DIR/ca.crt`.
fn tls_args(dir: &Path, name: &str) -> Vec<String> {
    let p = |f: String| dir.join(f).display().to_string();
    vec![
        "--tls-cert".into(),
        p(format!("{name}.crt")),
        "--tls-key".into(),
        p(format!("{name}.key")),
        "--tls-ca".into(),
        p("ca.crt".into()),
    ]
}

fn tls_node(dir: &Path) -> (Proc, String) {
    let mut cmd = Command::new(exe());
    cmd.args(["expert-node", "--listen", "127.0.0.1:0", "--model"])
        .arg(tiny_model())
        .args(tls_args(dir, "node-0"));
    Proc::start("tls-expert-node", cmd, "listening on ")
}

/// A coordinator that must refuse to start; returns its stderr.
fn coordinator_refuses(nodes: &[&str], tls: Option<Vec<String>>) -> String {
    let mut cmd = Command::new(exe());
    cmd.args(["coordinator", "--port", "0", "--model"])
        .arg(tiny_model())
        .args(["--nodes", &nodes.join(",")])
        .args(tls.unwrap_or_default());
    let (status, stderr) = run_to_exit(cmd, Duration::from_secs(30));
    assert!(!status.success(), "coordinator started: {stderr}");
    stderr
}

#[test]
fn up_with_tls_answers_exactly_what_the_plaintext_cluster_answers() {
    let tls = Cluster::up(&["--tls", "--nodes", "2", "--wire-dtype", "f32"]);
    let plain = Cluster::up(&["--nodes", "2", "--wire-dtype", "f32"]);
    let (tc, pc) = (tls.client(), plain.client());
    assert_eq!(tls.health().status, 200, "{}", tls.health().text());

    // transformers' greedy continuations, through TLS-wrapped expert calls.
    let texts = golden_texts();
    for p in golden() {
        let body = greedy(&tls.model, json!(p.input_ids), p.greedy_ids.len());
        assert_eq!(
            text_of(&post_ok(&tc, "/v1/completions", &body)),
            texts[p.index],
            "prompt {}",
            p.index
        );
    }
    // Text prompt, chat and streaming: byte for byte what the plaintext cluster says.
    let cmpl = greedy(&tls.model, json!("Mixture of Experts"), 40);
    let chat = json!({
        "model": tls.model, "max_tokens": 40, "temperature": 0, "ignore_eos": true,
        "messages": [{"role": "user", "content": "Who holds the experts?"}],
    });
    for (path, body) in [("/v1/completions", &cmpl), ("/v1/chat/completions", &chat)] {
        let a = post_ok(&tc, path, body);
        let b = post_ok(&pc, path, body);
        assert_eq!(a["choices"], b["choices"], "{path}");
        assert_eq!(a["usage"], b["usage"], "{path}");
    }
    let mut streamed = cmpl.clone();
    streamed["stream"] = json!(true);
    let events = tc
        .post_stream("/v1/completions", &streamed)
        .unwrap()
        .events()
        .unwrap();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let text: String = events[..events.len() - 1]
        .iter()
        .map(|e| {
            let v: Value = serde_json::from_str(e).unwrap();
            v["choices"][0]["text"].as_str().unwrap_or("").to_owned()
        })
        .collect();
    assert_eq!(text, text_of(&post_ok(&pc, "/v1/completions", &cmpl)));
}

#[test]
fn tls_nodes_and_coordinators_refuse_peers_without_a_certificate_from_their_ca() {
    let ours = tempfile::tempdir().unwrap();
    let theirs = tempfile::tempdir().unwrap();
    certs(ours.path(), 1);
    certs(theirs.path(), 1);
    for f in [
        "ca.crt",
        "ca.key",
        "coordinator.crt",
        "coordinator.key",
        "node-0.crt",
        "node-0.key",
    ] {
        assert!(ours.path().join(f).is_file(), "certs did not write {f}");
    }
    let (mut node, addr) = tls_node(ours.path());
    let (_stranger, stranger_addr) = tls_node(theirs.path());

    // A plaintext coordinator: the node's TLS listener does not speak to it.
    let err = coordinator_refuses(&[&addr], None);
    assert!(err.contains(&addr), "the error should name the node: {err}");

    // A coordinator of another cluster: its CA did not sign the node's certificate (and
    // the node's CA did not sign the coordinator's).
    let err = coordinator_refuses(&[&addr], Some(tls_args(theirs.path(), "coordinator")));
    assert!(err.contains("certificate"), "{err}");

    // Our coordinator, given a node whose certificate comes from another CA.
    let err = coordinator_refuses(
        &[&addr, &stranger_addr],
        Some(tls_args(ours.path(), "coordinator")),
    );
    assert!(
        err.contains(&stranger_addr),
        "should name {stranger_addr}: {err}"
    );
    assert!(err.contains("certificate"), "{err}");

    // A half-given TLS configuration is an error, not a silent plaintext fallback.
    let mut half = tls_args(ours.path(), "coordinator");
    half.truncate(4);
    let err = coordinator_refuses(&[&addr], Some(half));
    assert!(err.contains("--tls-ca"), "{err}");

    // None of that hurt the node, and the right coordinator gets served.
    assert!(
        node.child.try_wait().unwrap().is_none(),
        "{}",
        node.log_tail()
    );
    let mut cmd = Command::new(exe());
    cmd.args(["coordinator", "--port", "0", "--model"])
        .arg(tiny_model())
        .args(["--nodes", &addr])
        .args(tls_args(ours.path(), "coordinator"));
    let (proc, rest) = Proc::start("tls-coordinator", cmd, "serving ");
    let url = rest
        .split(" on ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    let v = post_ok(
        &Client::new(url),
        "/v1/completions",
        &greedy("mixtral-tiny", json!(golden()[0].input_ids), 24),
    );
    assert_eq!(text_of(&v), golden_texts()[0]);
    drop(proc);
    node.kill9();
}

// ---------------------------------------------------------------------------------------
// API keys

fn assert_401(resp: &common::http::Response, what: &str) {
    let err = assert_error(resp, 401, what);
    assert_eq!(err["type"], "invalid_request_error", "{what}: {err}");
    assert_eq!(err["code"], "invalid_api_key", "{what}: {err}");
    assert_eq!(resp.header("www-authenticate"), Some("Bearer"), "{what}");
}

#[test]
fn api_keys_guard_every_endpoint_but_health_and_metrics() {
    let c = Cluster::up_env(
        &["--in-process", "--api-key", "sk-one", "--api-key", "sk-two"],
        &[("SWITCHYARD_API_KEYS", "sk-three, sk-four")],
    );
    let anon = c.client();
    let body = greedy(&c.model, json!("Mixture of Experts"), 8);

    // Missing, wrong, malformed: 401 in OpenAI's shape, on every guarded path.
    assert_401(&anon.post_json("/v1/completions", &body).unwrap(), "no key");
    assert_401(&anon.get("/v1/models").unwrap(), "no key, models");
    assert_401(
        &anon.get("/v1/no-such-route").unwrap(),
        "no key, unknown path",
    );
    let chat =
        json!({"model": c.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
    assert_401(
        &anon.post_json("/v1/chat/completions", &chat).unwrap(),
        "no key, chat",
    );
    for (what, client) in [
        ("wrong key", anon.with_key("sk-five")),
        ("prefix of a key", anon.with_key("sk-on")),
        ("key plus a character", anon.with_key("sk-onee")),
        ("empty bearer", anon.with_header("Authorization", "Bearer ")),
        (
            "basic auth",
            anon.with_header("Authorization", "Basic c2stb25lOg=="),
        ),
        ("bare key", anon.with_header("Authorization", "sk-one")),
        (
            "key in another header",
            anon.with_header("X-Api-Key", "sk-one"),
        ),
    ] {
        assert_401(&client.post_json("/v1/completions", &body).unwrap(), what);
    }

    // Open paths stay open.
    assert_eq!(anon.get("/health").unwrap().status, 200);
    assert_eq!(anon.get("/metrics").unwrap().status, 200);

    // Every key works, from the flags and from the environment; the scheme is
    // case-insensitive.
    let reference = text_of(&post_ok(&anon.with_key("sk-one"), "/v1/completions", &body));
    for key in ["sk-two", "sk-three", "sk-four"] {
        let v = post_ok(&anon.with_key(key), "/v1/completions", &body);
        assert_eq!(text_of(&v), reference, "{key}");
    }
    let lower = anon.with_header("Authorization", "bearer sk-two");
    assert_eq!(lower.get("/v1/models").unwrap().status, 200);
    post_ok(&anon.with_key("sk-four"), "/v1/chat/completions", &chat);

    // The official client sends its api_key as a Bearer token.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let out = Command::new("python3")
        .arg(script)
        .args([c.url.as_str(), "sk-three"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openai_client.py with a key failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn metrics_can_require_the_key_and_that_needs_a_key() {
    let c = Cluster::up_env(
        &["--in-process", "--metrics-require-key"],
        &[("SWITCHYARD_API_KEYS", "sk-metrics")],
    );
    let anon = c.client();
    assert_401(&anon.get("/metrics").unwrap(), "metrics without a key");
    let m = anon.with_key("sk-metrics").get("/metrics").unwrap();
    assert_eq!(m.status, 200);
    // The refusal above is counted like any response.
    assert!(
        m.text().contains(r#"status="401""#),
        "401s are not counted on /metrics"
    );
    assert_eq!(anon.get("/health").unwrap().status, 200);

    let mut cmd = Command::new(exe());
    cmd.args(["up", "--in-process", "--port", "0", "--metrics-require-key"])
        .env_remove("SWITCHYARD_API_KEYS");
    let (status, err) = run_to_exit(cmd, Duration::from_secs(30));
    assert!(
        !status.success() && err.contains("needs an API key"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------
// Bad input, with good requests running alongside

#[test]
fn every_bad_input_class_gets_its_error_while_concurrent_good_requests_stay_exact() {
    let c = Cluster::up(&[
        "--nodes",
        "2",
        "--wire-dtype",
        "f32",
        "--max-body-bytes",
        "65536",
        "--max-prompt-tokens",
        "400",
        "--max-completion-tokens",
        "300",
        "--max-stop-sequences",
        "4",
        "--max-stop-bytes",
        "16",
    ]);
    let m = c.model.clone();

    // Two clients loop over the golden prompts the whole time and must get transformers'
    // text every time.
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let good: Vec<_> = (0..2)
        .map(|k| {
            let (client, stop, served, m) = (c.client(), stop.clone(), served.clone(), m.clone());
            std::thread::spawn(move || {
                let (prompts, texts) = (golden(), golden_texts());
                let mut i = k;
                while !stop.load(Ordering::SeqCst) {
                    let p = &prompts[i % prompts.len()];
                    let body = greedy(&m, json!(p.input_ids), p.greedy_ids.len());
                    let v = post_ok(&client, "/v1/completions", &body);
                    assert_eq!(text_of(&v), texts[p.index], "good prompt {}", p.index);
                    served.fetch_add(1, Ordering::SeqCst);
                    i += 1;
                }
            })
        })
        .collect();

    let client = c.client();
    let cmpl = "/v1/completions";
    let chat = "/v1/chat/completions";
    let hi = json!([{"role": "user", "content": "hi"}]);
    let ids = |n: u32| -> Vec<u32> { (0..n).map(|i| 3 + i % 500).collect() };
    // (what, path, raw body, status, error.type, error.code, error.param)
    type Case = (
        &'static str,
        &'static str,
        Vec<u8>,
        u16,
        &'static str,
        Option<&'static str>,
        Option<&'static str>,
    );
    let j = |v: Value| v.to_string().into_bytes();
    let inv = "invalid_request_error";
    let cases: Vec<Case> = vec![
        (
            "body over --max-body-bytes",
            cmpl,
            j(json!({"model": m, "prompt": "x".repeat(70_000)})),
            413,
            inv,
            Some("request_too_large"),
            None,
        ),
        (
            "malformed JSON",
            cmpl,
            br#"{"prompt": "hi","#.to_vec(),
            400,
            inv,
            None,
            None,
        ),
        (
            "not JSON",
            chat,
            b"\x00\x01binary".to_vec(),
            400,
            inv,
            None,
            None,
        ),
        (
            "invalid UTF-8",
            cmpl,
            b"{\"prompt\": \"\xff\xfe\"}".to_vec(),
            400,
            inv,
            None,
            Some("body"),
        ),
        (
            "JSON array body",
            cmpl,
            j(json!([1, 2])),
            400,
            inv,
            None,
            None,
        ),
        (
            "prompt of the wrong type",
            cmpl,
            j(json!({"model": m, "prompt": {"a": 1}})),
            400,
            inv,
            None,
            None,
        ),
        (
            "max_tokens of the wrong type",
            cmpl,
            j(json!({"model": m, "prompt": "hi", "max_tokens": "10"})),
            400,
            inv,
            None,
            None,
        ),
        (
            "stream of the wrong type",
            cmpl,
            j(json!({"model": m, "prompt": "hi", "stream": "yes"})),
            400,
            inv,
            None,
            None,
        ),
        (
            "messages of the wrong type",
            chat,
            j(json!({"model": m, "messages": "hi"})),
            400,
            inv,
            None,
            None,
        ),
        (
            "content part of an unknown type",
            chat,
            j(
                json!({"model": m, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
            ),
            400,
            inv,
            None,
            Some("messages"),
        ),
        (
            "unknown role",
            chat,
            j(json!({"model": m, "messages": [{"role": "wizard", "content": "hi"}]})),
            400,
            inv,
            None,
            Some("messages"),
        ),
        (
            "empty messages",
            chat,
            j(json!({"model": m, "messages": []})),
            400,
            inv,
            None,
            Some("messages"),
        ),
        (
            "unknown model",
            cmpl,
            j(json!({"model": "gpt-4", "prompt": "hi"})),
            404,
            inv,
            Some("model_not_found"),
            Some("model"),
        ),
        (
            "unknown model (chat)",
            chat,
            j(json!({"model": "gpt-4", "messages": hi})),
            404,
            inv,
            Some("model_not_found"),
            Some("model"),
        ),
        (
            "empty prompt",
            cmpl,
            j(json!({"model": m, "prompt": ""})),
            400,
            inv,
            None,
            Some("prompt"),
        ),
        (
            "token id past the vocabulary",
            cmpl,
            j(json!({"model": m, "prompt": [1, 512]})),
            400,
            inv,
            None,
            Some("prompt"),
        ),
        (
            "negative token id",
            cmpl,
            j(json!({"model": m, "prompt": [1, -7]})),
            400,
            inv,
            None,
            Some("prompt"),
        ),
        (
            "huge token id",
            cmpl,
            j(json!({"model": m, "prompt": [1, 1u64 << 40]})),
            400,
            inv,
            None,
            Some("prompt"),
        ),
        (
            "negative max_tokens",
            cmpl,
            j(json!({"model": m, "prompt": "hi", "max_tokens": -1})),
            400,
            inv,
            None,
            Some("max_tokens"),
        ),
        (
            "zero max_tokens",
            cmpl,
            j(json!({"model": m, "prompt": "hi", "max_tokens": 0})),
            400,
            inv,
            None,
            Some("max_tokens"),
        ),
        (
            "max_tokens over --max-completion-tokens",
            cmpl,
            j(json!({"model": m, "prompt": "hi", "max_tokens": 301})),
            400,
            inv,
            None,
            Some("max_tokens"),
        ),
        (
            "max_tokens near i64::MAX",
            chat,
            j(json!({"model": m, "messages": hi, "max_tokens": i64::MAX})),
            400,
            inv,
            None,
            Some("max_tokens"),
        ),
        (
            "max_tokens beyond i64",
            cmpl,
            b"{\"prompt\": \"hi\", \"max_tokens\": 99999999999999999999}".to_vec(),
            400,
            inv,
            None,
            None,
        ),
        (
            "max_tokens 1e400",
            cmpl,
            b"{\"prompt\": \"hi\", \"max_tokens\": 1e400}".to_vec(),
            400,
            inv,
            None,
            None,
        ),
        (
            "temperature 1e400 (infinite)",
            cmpl,
            b"{\"prompt\": \"hi\", \"temperature\": 1e400}".to_vec(),
            400,
            inv,
            None,
            None,
        ),
        (
            "temperature above 2",
            cmpl,
            j(json!({"model": m, "prompt": "hi", "temperature": 2.5})),
            400,
            inv,
            None,
            Some("temperature"),
        ),
        (
            "negative temperature",
            chat,
            j(json!({"model": m, "messages": hi, "temperature": -0.1})),
            400,
            inv,
            None,
            Some("temperature"),
        ),
        (
            "top_p 0",
            cmpl,
            j(json!({"model": m, "prompt": "hi", "top_p": 0})),
            400,
            inv,
            None,
            Some("top_p"),
        ),
        (
            "top_p above 1",
            cmpl,
            j(json!({"model": m, "prompt": "hi", "top_p": 1.01})),
            400,
            inv,
            None,
            Some("top_p"),
        ),
        (
            "negative top_k",
            cmpl,
            j(json!({"model": m, "prompt": "hi", "top_k": -2})),
            400,
            inv,
            None,
            Some("top_k"),
        ),
        (
            "too many stop sequences",
            cmpl,
            j(json!({"model": m, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]})),
            400,
            inv,
            None,
            Some("stop"),
        ),
        (
            "stop sequence too long",
            cmpl,
            j(json!({"model": m, "prompt": "hi", "stop": "x".repeat(17)})),
            400,
            inv,
            None,
            Some("stop"),
        ),
        (
            "empty stop sequence",
            chat,
            j(json!({"model": m, "messages": hi, "stop": [""]})),
            400,
            inv,
            None,
            Some("stop"),
        ),
        (
            "n = 0",
            cmpl,
            j(json!({"model": m, "prompt": "hi", "n": 0})),
            400,
            inv,
            None,
            Some("n"),
        ),
        (
            "n over the limit (chat)",
            chat,
            j(json!({"model": m, "messages": hi, "n": 1000})),
            400,
            inv,
            None,
            Some("n"),
        ),
        (
            "best_of",
            cmpl,
            j(json!({"model": m, "prompt": "hi", "best_of": 2})),
            400,
            inv,
            None,
            Some("best_of"),
        ),
        (
            "logprobs over 20",
            cmpl,
            j(json!({"model": m, "prompt": "hi", "logprobs": 21})),
            400,
            inv,
            None,
            Some("logprobs"),
        ),
        (
            "an unknown response_format",
            chat,
            j(json!({"model": m, "messages": hi, "response_format": {"type": "xml"}})),
            400,
            inv,
            None,
            Some("response_format"),
        ),
        (
            "an empty prompt list",
            cmpl,
            j(json!({"model": m, "prompt": []})),
            400,
            inv,
            None,
            Some("prompt"),
        ),
        (
            "prompt over --max-prompt-tokens",
            cmpl,
            j(json!({"model": m, "prompt": ids(401), "max_tokens": 1})),
            413,
            inv,
            Some("prompt_too_long"),
            Some("prompt"),
        ),
        (
            "prompt + max_tokens beyond the context",
            cmpl,
            j(json!({"model": m, "prompt": ids(300), "max_tokens": 250})),
            413,
            inv,
            Some("context_length_exceeded"),
            Some("max_tokens"),
        ),
    ];
    let started = Instant::now();
    let mut round = 0;
    // Twice through, so the bad ones overlap good ones at different points.
    while round < 2 {
        for (what, path, body, status, kind, code, param) in &cases {
            let resp = client.post_raw(path, body).unwrap();
            let err = assert_error(&resp, *status, what);
            assert_eq!(err["type"], *kind, "{what}: {err}");
            if let Some(code) = code {
                assert_eq!(err["code"], *code, "{what}: {err}");
            }
            if let Some(param) = param {
                assert_eq!(err["param"], *param, "{what}: {err}");
            }
        }
        round += 1;
    }
    // Wrong methods and paths.
    assert_error(&client.get(cmpl).unwrap(), 405, "GET on completions");
    assert_error(&client.get("/v2/anything").unwrap(), 404, "unknown path");

    // Let the good clients finish a few more after the last bad one.
    let seen = served.load(Ordering::SeqCst);
    let more = poll(Duration::from_secs(60), || {
        served.load(Ordering::SeqCst) >= seen + 4
    });
    stop.store(true, Ordering::SeqCst);
    for t in good {
        t.join()
            .expect("a good request got a wrong answer or an error");
    }
    assert!(more, "good requests stalled after the bad ones");
    assert!(
        served.load(Ordering::SeqCst) >= 4,
        "only {} good requests in {:?}",
        served.load(Ordering::SeqCst),
        started.elapsed()
    );
    // The scheduler publishes its numbers after a step's final events, so the last
    // answer can reach its client a moment before the numbers say idle.
    let idle = |h: &Value| {
        (h["running"].clone(), h["waiting"].clone()) == (json!(0), json!(0))
            && h["kv_free_blocks"] == h["kv_total_blocks"]
    };
    assert!(
        poll(Duration::from_secs(5), || idle(&c.health().json())),
        "{}",
        c.health().text()
    );
}

// ---------------------------------------------------------------------------------------
// Per-request deadline

fn health(c: &Cluster) -> Value {
    let h = c.health();
    assert_eq!(h.status, 200, "{}", h.text());
    h.json()
}

#[test]
fn a_request_past_its_deadline_is_cancelled_with_504_or_a_final_error_event() {
    // A stalled node (SIGSTOP) holds requests up without failing them: the expert
    // time-out and the keepalive's are far longer than the request deadline, so only the
    // deadline can end them.
    let nodes: Vec<_> = (0..2).map(common::expert_node).collect();
    let addrs: Vec<String> = nodes.iter().map(|(_, a)| a.clone()).collect();
    let c = Cluster::coordinator(
        &addrs,
        &[
            "--request-timeout-s",
            "1.5",
            "--expert-timeout-ms",
            "20000",
            "--expert-ping-timeout-ms",
            "20000",
        ],
    );
    let client = c.client();
    let total = health(&c)["kv_total_blocks"].clone();
    let short = greedy(&c.model, json!("Mixture of Experts"), 8);
    let before = text_of(&post_ok(&client, "/v1/completions", &short));
    let stalled = nodes[1].0.pid() as libc::pid_t;

    // Streaming: tokens flow, then the node stalls; the stream ends with an error event.
    let mut long = greedy(&c.model, json!("Mixture of Experts"), 490);
    long["stream"] = json!(true);
    let mut s = client.post_stream("/v1/completions", &long).unwrap();
    assert_eq!(s.status, 200);
    s.next_event().unwrap().expect("no first event");
    unsafe { libc::kill(stalled, libc::SIGSTOP) };
    let events = s.events().unwrap();
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let last: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(last["error"]["code"], "request_timeout", "{last}");
    assert_eq!(last["error"]["type"], "timeout_error", "{last}");

    // Not streaming, sent while the node is still stalled: 504 at the deadline.
    let started = Instant::now();
    let r = client.post_json("/v1/completions", &short).unwrap();
    let took = started.elapsed();
    let err = assert_error(&r, 504, "request past its deadline");
    assert_eq!(err["code"], "request_timeout", "{err}");
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(10),
        "504 after {took:?} with a 1.5 s deadline"
    );

    // Once the node runs again, the cancelled sequences are dropped and their KV blocks
    // freed, and the same request gets the same answer as before.
    unsafe { libc::kill(stalled, libc::SIGCONT) };
    let mut last = Value::Null;
    let freed = poll(Duration::from_secs(30), || {
        last = health(&c);
        last["running"] == 0 && last["waiting"] == 0 && last["kv_free_blocks"] == total
    });
    assert!(freed, "sequences or blocks not freed: {last}");
    assert_eq!(
        text_of(&post_ok(&client, "/v1/completions", &short)),
        before
    );
}
