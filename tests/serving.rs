//! End-to-end serving: `switchyard up` with three expert-node processes on loopback,
//! driven over real HTTP and compared with references computed elsewhere (transformers'
//! greedy continuations in tests/fixtures, `switchyard generate`, the same request sent
//! alone or through the other endpoint, the official `openai` Python client).

mod common;

use std::process::Command;
use std::sync::{Arc, Barrier, OnceLock};
use std::time::Duration;

use common::http::Client;
use common::{
    Cluster, SENSITIVE_PROMPTS, assert_error, engine_greedy, exe, golden, golden_texts, greedy,
    post_ok, text_of, tiny_model, tokenizer,
};
use serde_json::{Value, json};
use switchyard_engine::tokenizer::{ChatMessage, IncrementalDecoder};

/// One cluster with an exact (f32) wire, shared by the tests of this file: every test
/// here is either stateless or compares outputs that must not depend on what else runs.
/// A step budget of 64 tokens makes the 300-token golden prompt prefill in chunks, next
/// to other sequences' decodes when tests overlap.
fn f32_cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        Cluster::up(&[
            "--nodes",
            "3",
            "--wire-dtype",
            "f32",
            "--max-batch-tokens",
            "64",
        ])
    })
}

#[test]
fn golden_prompts_over_three_f32_nodes_match_transformers_greedy() {
    let c = f32_cluster();
    let client = c.client();
    let tok = tokenizer();
    let texts = golden_texts();
    for p in golden() {
        let want = tok.decode(&p.greedy_ids, true).unwrap();
        // The reference's own decoding agrees with ours, so `want` is transformers' text.
        assert_eq!(want, texts[p.index], "decoding of prompt {}", p.index);
        // The ids already start with BOS; a text prompt would get a second one.
        let v = post_ok(
            &client,
            "/v1/completions",
            &greedy(&c.model, json!(p.input_ids), p.greedy_ids.len()),
        );
        assert_eq!(text_of(&v), want, "prompt {}", p.index);
        let choice = &v["choices"][0];
        assert_eq!(choice["finish_reason"], "length", "prompt {}: {v}", p.index);
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["model"], c.model.as_str());
        let u = &v["usage"];
        assert_eq!(u["completion_tokens"], p.greedy_ids.len(), "{v}");
        assert_eq!(u["prompt_tokens"], p.input_ids.len(), "{v}");
        assert_eq!(
            u["total_tokens"],
            p.input_ids.len() + p.greedy_ids.len(),
            "{v}"
        );
    }
}

#[test]
fn f32_wire_equals_the_engine_alone_where_bf16_rounding_flips_tokens() {
    // The goldens' greedy paths have clear margins (bf16 gets them right too); these
    // prompts do not, so only an exact wire reproduces them.
    let c = f32_cluster();
    let client = c.client();
    let tok = tokenizer();
    for prompt in SENSITIVE_PROMPTS {
        let want = tok.decode(&engine_greedy(prompt, 64), true).unwrap();
        let v = post_ok(
            &client,
            "/v1/completions",
            &greedy(&c.model, json!(prompt), 64),
        );
        assert_eq!(text_of(&v), want, "prompt {prompt:?}");
    }
}

/// Conversations for the chat tests; all render within the tiny model's context.
fn conversations() -> Vec<Vec<(&'static str, &'static str)>> {
    vec![
        vec![("user", "What is a Mixture of Experts?")],
        vec![
            ("system", "You answer in Spanish."),
            ("user", "Explica el modelo Mixtral 8x7b."),
        ],
        vec![
            ("user", "Hi"),
            ("assistant", "Hello! How can I help?"),
            ("user", "Tell me about experts and routers."),
        ],
    ]
}

fn chat_body(model: &str, conv: &[(&str, &str)], max_tokens: usize) -> Value {
    let messages: Vec<Value> = conv
        .iter()
        .map(|(role, content)| json!({"role": role, "content": content}))
        .collect();
    json!({
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": true,
    })
}

#[test]
fn chat_answers_equal_completions_of_the_rendered_chat_prompt() {
    let c = f32_cluster();
    let client = c.client();
    let tok = tokenizer();
    for conv in conversations() {
        // Rendered here, not by the server, with the checkpoint's own template.
        let msgs: Vec<ChatMessage> = conv.iter().map(|(r, t)| ChatMessage::new(*r, *t)).collect();
        let ids = tok.encode_chat(&msgs).unwrap();
        let max_tokens = 20;

        let chat = post_ok(
            &client,
            "/v1/chat/completions",
            &chat_body(&c.model, &conv, max_tokens),
        );
        let choice = &chat["choices"][0];
        assert_eq!(chat["object"], "chat.completion", "{chat}");
        assert_eq!(choice["message"]["role"], "assistant", "{chat}");
        assert_eq!(choice["finish_reason"], "length", "{chat}");
        assert_eq!(
            chat["usage"]["prompt_tokens"],
            ids.len(),
            "{conv:?}: {chat}"
        );
        assert_eq!(chat["usage"]["completion_tokens"], max_tokens, "{chat}");
        let answer = choice["message"]["content"].as_str().unwrap().to_owned();

        let cmpl = post_ok(
            &client,
            "/v1/completions",
            &greedy(&c.model, json!(ids), max_tokens),
        );
        assert_eq!(answer, text_of(&cmpl), "{conv:?}");
        assert!(!answer.is_empty(), "{conv:?}");
        // And both are the engine's own greedy continuation of that prompt.
        let reference = tok.decode(&engine_greedy(&ids, max_tokens), true).unwrap();
        assert_eq!(answer, reference, "{conv:?}");
    }
}

#[test]
fn text_prompt_matches_switchyard_generate() {
    // `generate` runs the engine in its own process with in-process experts: a reference
    // that shares no serving code (no scheduler, no batching, no wire).
    let c = f32_cluster();
    let client = c.client();
    for (prompt, n) in [("Mixture of Experts", 24), ("Hola, ¿qué tal?", 17)] {
        let out = Command::new(exe())
            .args(["generate", "--temperature", "0", "--ignore-eos", "--model"])
            .arg(tiny_model())
            .args(["--prompt", prompt, "--max-tokens", &n.to_string()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8(out.stdout).unwrap();
        let want = stdout.strip_suffix('\n').unwrap_or(&stdout);
        let v = post_ok(
            &client,
            "/v1/completions",
            &greedy(&c.model, json!(prompt), n),
        );
        assert_eq!(text_of(&v), want, "{prompt:?}");
        assert_eq!(v["usage"]["completion_tokens"], n);
    }
}

#[test]
fn sixteen_concurrent_requests_each_get_their_solo_result() {
    let c = f32_cluster();
    let client = c.client();
    let prompts = golden();
    // Different prompts (ids and text, up to 300 tokens) and lengths, so that sequences
    // join and leave the running batch at different steps and prefill next to decodes.
    let bodies: Vec<(String, Value)> = (0..16)
        .map(|i| {
            let max_tokens = 8 + (i * 7) % 41;
            if i % 2 == 0 {
                let p = &prompts[(i / 2) % prompts.len()];
                (
                    "/v1/completions".to_owned(),
                    greedy(&c.model, json!(p.input_ids), max_tokens),
                )
            } else if i % 4 == 1 {
                let text = format!("Request number {i}: the experts say");
                (
                    "/v1/completions".to_owned(),
                    greedy(&c.model, json!(text), max_tokens),
                )
            } else {
                let conv = &conversations()[i % 3];
                (
                    "/v1/chat/completions".to_owned(),
                    chat_body(&c.model, conv, max_tokens),
                )
            }
        })
        .collect();
    let answer = |v: &Value| -> (String, Value) {
        let choice = &v["choices"][0];
        let text = choice["text"]
            .as_str()
            .or(choice["message"]["content"].as_str())
            .unwrap_or_else(|| panic!("no text in {v}"))
            .to_owned();
        (text, v["usage"].clone())
    };
    let solo: Vec<(String, Value)> = bodies
        .iter()
        .map(|(path, b)| answer(&post_ok(&client, path, b)))
        .collect();

    let barrier = Arc::new(Barrier::new(bodies.len()));
    let handles: Vec<_> = bodies
        .iter()
        .cloned()
        .map(|(path, body)| {
            let (client, barrier) = (client.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                post_ok(&client, &path, &body)
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let together = answer(&h.join().expect("request thread panicked"));
        assert_eq!(together, solo[i], "request {i}: {}", bodies[i].1);
    }
}

/// Streams `body` to `path`; returns the JSON chunks, having checked the SSE framing and
/// that `[DONE]` comes last.
fn stream(client: &Client, path: &str, body: &Value) -> Vec<Value> {
    let s = client.post_stream(path, body).unwrap();
    assert_eq!(s.status, 200, "{path}");
    let ctype = s.header("content-type").unwrap_or("").to_owned();
    assert!(ctype.starts_with("text/event-stream"), "{ctype}");
    let events = s.events().unwrap();
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap_or_else(|err| panic!("{err}: {e}")))
        .collect()
}

/// Checks the usage chunk (last, no choices) and the finish reason; returns the chunks
/// that carry choices.
fn check_stream_tail(chunks: &[Value], prompt_tokens: usize, max_tokens: usize) -> &[Value] {
    let (usage_chunk, rest) = chunks.split_last().expect("an empty stream");
    assert_eq!(usage_chunk["choices"], json!([]), "{usage_chunk}");
    let u = &usage_chunk["usage"];
    assert_eq!(u["prompt_tokens"], prompt_tokens, "{u}");
    assert_eq!(u["completion_tokens"], max_tokens, "{u}");
    assert_eq!(u["total_tokens"], prompt_tokens + max_tokens, "{u}");
    let id = &chunks[0]["id"];
    for c in chunks {
        assert_eq!(&c["id"], id, "every chunk carries the request's id");
    }
    for c in &rest[..rest.len() - 1] {
        assert!(c["choices"][0]["finish_reason"].is_null(), "{c}");
        assert!(c.get("usage").is_none_or(Value::is_null), "{c}");
    }
    assert_eq!(
        rest.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
    rest
}

#[test]
fn streams_concatenate_to_the_non_streamed_text_on_both_endpoints() {
    let c = f32_cluster();
    let client = c.client();
    let p = &golden()[1];
    let n = p.greedy_ids.len();

    let mut body = greedy(&c.model, json!(p.input_ids), n);
    let whole = text_of(&post_ok(&client, "/v1/completions", &body));
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let chunks = stream(&client, "/v1/completions", &body);
    let rest = check_stream_tail(&chunks, p.input_ids.len(), n);
    let streamed: String = rest
        .iter()
        .map(|c| {
            assert_eq!(c["object"], "text_completion", "{c}");
            c["choices"][0]["text"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(streamed, whole);
    assert!(rest.len() > 2, "text should arrive in pieces: {rest:?}");

    let conv = &conversations()[0];
    let mut body = chat_body(&c.model, conv, n);
    let whole = post_ok(&client, "/v1/chat/completions", &body)["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let chunks = stream(&client, "/v1/chat/completions", &body);
    let msgs: Vec<ChatMessage> = conv.iter().map(|(r, t)| ChatMessage::new(*r, *t)).collect();
    let prompt_tokens = tokenizer().encode_chat(&msgs).unwrap().len();
    let rest = check_stream_tail(&chunks, prompt_tokens, n);
    assert_eq!(
        rest[0]["choices"][0]["delta"]["role"], "assistant",
        "{}",
        rest[0]
    );
    let streamed: String = rest
        .iter()
        .map(|c| {
            assert_eq!(c["object"], "chat.completion.chunk", "{c}");
            c["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    assert_eq!(streamed, whole);
}

#[test]
fn bad_requests_get_openai_errors_with_the_right_status() {
    let c = f32_cluster();
    let client = c.client();
    let m = c.model.as_str();
    let cmpl = "/v1/completions";
    let chat = "/v1/chat/completions";

    let raw = client.post_raw(cmpl, br#"{"prompt": "hi","#).unwrap();
    assert_error(&raw, 400, "malformed JSON");
    let raw = client.post_raw(chat, b"not json at all").unwrap();
    assert_error(&raw, 400, "malformed JSON (chat)");

    // Each body is refused with `status`, naming `param` where given.
    let check = |path: &str, body: Value, status: u16, param: Option<&str>| {
        let what = format!("{path} {body}");
        let resp = client.post_json(path, &body).unwrap();
        let err = assert_error(&resp, status, &what);
        if let Some(p) = param {
            assert_eq!(err["param"], p, "{what}: {err}");
        }
        match status {
            404 => assert_eq!(err["code"], "model_not_found", "{what}"),
            413 => assert_eq!(err["code"], "context_length_exceeded", "{what}"),
            _ => assert_eq!(err["type"], "invalid_request_error", "{what}"),
        }
    };
    let hi = json!([{"role": "user", "content": "hi"}]);
    let prompt = Some("prompt");
    check(
        cmpl,
        json!({"model": m, "prompt": "hi", "max_tokens": "ten"}),
        400,
        None,
    );
    check(cmpl, json!({"model": m, "prompt": 5}), 400, None);
    check(cmpl, json!({"model": m, "prompt": ""}), 400, prompt);
    check(cmpl, json!({"model": m, "prompt": []}), 400, prompt);
    check(cmpl, json!({"model": m, "prompt": [1, 512]}), 400, prompt);
    check(cmpl, json!({"model": m, "prompt": [1, -1]}), 400, prompt);
    let temp = Some("temperature");
    check(
        cmpl,
        json!({"model": m, "prompt": "hi", "temperature": 3}),
        400,
        temp,
    );
    check(
        cmpl,
        json!({"model": m, "prompt": "hi", "n": 0}),
        400,
        Some("n"),
    );
    let max = Some("max_tokens");
    check(
        cmpl,
        json!({"model": m, "prompt": "hi", "max_tokens": 0}),
        400,
        max,
    );
    check(
        chat,
        json!({"model": m, "messages": []}),
        400,
        Some("messages"),
    );
    check(chat, json!({"model": m, "messages": "hi"}), 400, None);
    check(
        chat,
        json!({"model": m, "messages": hi, "temperature": 3}),
        400,
        temp,
    );
    check(
        chat,
        json!({"model": m, "messages": hi, "n": 129}),
        400,
        Some("n"),
    );
    let other = "no-such-model";
    check(
        cmpl,
        json!({"model": other, "prompt": "hi"}),
        404,
        Some("model"),
    );
    check(
        chat,
        json!({"model": other, "messages": hi}),
        404,
        Some("model"),
    );
    // The tiny model's context is 512 tokens.
    let ids = |n: u32| -> Vec<u32> { (0..n).map(|i| 3 + i % 500).collect() };
    check(
        cmpl,
        json!({"model": m, "prompt": ids(500), "max_tokens": 100}),
        413,
        None,
    );
    check(cmpl, json!({"model": m, "prompt": ids(600)}), 413, None);
    let long = json!([{"role": "user", "content": "experts ".repeat(200)}]);
    check(
        chat,
        json!({"model": m, "messages": long, "max_tokens": 500}),
        413,
        None,
    );
    let resp = client.get("/v1/no-such-route").unwrap();
    assert_error(&resp, 404, "unknown route");

    // Nothing above reached the model; the server still answers.
    let v = post_ok(&client, cmpl, &greedy(m, json!([1, 5, 6]), 3));
    assert_eq!(v["usage"]["completion_tokens"], 3);
}

#[test]
fn models_lists_the_served_model() {
    let c = f32_cluster();
    let resp = c.client().get("/v1/models").unwrap();
    assert_eq!(resp.status, 200);
    let v = resp.json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], c.model.as_str());
    assert_eq!(v["data"][0]["object"], "model");
    assert_eq!(c.model, "mixtral-tiny");
}

#[test]
fn official_openai_python_client_works_against_the_server() {
    let import = Command::new("python3")
        .args(["-c", "import openai"])
        .output();
    match import {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "the `openai` Python package is missing: run `pip install openai` ({})",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => panic!("python3 is needed for this test ({e}); then `pip install openai`"),
    }
    let c = f32_cluster();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let mut child = Command::new("python3")
        .arg(script)
        .arg(&c.url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let ok = common::poll(Duration::from_secs(60), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    if !ok {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    let log = format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(ok, "openai_client.py ran past 60 s\n{log}");
    assert!(out.status.success(), "openai_client.py failed\n{log}");
}

/// bf16 on the wire rounds every activation sent to and from the experts, so greedy
/// choices at near-ties may flip. This measures agreement with transformers' f32-exact
/// greedy tokens and reports it; it asserts only that the measurement ran.
#[test]
fn bf16_wire_agreement_with_transformers_is_reported() {
    let c = Cluster::up(&["--nodes", "3", "--wire-dtype", "bf16"]);
    let client = c.client();
    let tok = tokenizer();
    let prompts = golden();

    // Free-running: the whole greedy continuation, as a user would get it.
    let free: Vec<bool> = prompts
        .iter()
        .map(|p| {
            let v = post_ok(
                &client,
                "/v1/completions",
                &greedy(&c.model, json!(p.input_ids), p.greedy_ids.len()),
            );
            text_of(&v) == tok.decode(&p.greedy_ids, true).unwrap()
        })
        .collect();

    // Teacher-forced: at every position, the reference prefix plus one generated token,
    // compared with the reference token rendered the way the server renders a first
    // token (the API returns text, not ids; two tokens that render identically, such as
    // two lone invalid bytes, would count as agreeing).
    let jobs: Vec<(usize, usize, Vec<u32>, String)> = prompts
        .iter()
        .enumerate()
        .flat_map(|(pi, p)| {
            let tok = &tok;
            (0..p.greedy_ids.len()).map(move |j| {
                let mut ctx = p.input_ids.clone();
                ctx.extend(&p.greedy_ids[..j]);
                let mut d = IncrementalDecoder::with_prompt(true, &ctx);
                let mut want = d.push(tok, p.greedy_ids[j]).unwrap();
                want.push_str(&d.finish(tok).unwrap());
                (pi, j, ctx, want)
            })
        })
        .collect();
    let agree: Vec<(usize, usize, bool)> = std::thread::scope(|s| {
        let chunks: Vec<_> = jobs.chunks(jobs.len().div_ceil(8)).collect();
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                let (client, model) = (client.clone(), c.model.clone());
                s.spawn(move || {
                    chunk
                        .iter()
                        .map(|(pi, j, ctx, want)| {
                            let v =
                                post_ok(&client, "/v1/completions", &greedy(&model, json!(ctx), 1));
                            (*pi, *j, &text_of(&v) == want)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });

    eprintln!("bf16 wire vs transformers greedy (f32 reference):");
    eprintln!("prompt  tokens  same text  prefix  teacher-forced top-1");
    let (mut total, mut agreed) = (0, 0);
    for (pi, p) in prompts.iter().enumerate() {
        let mut mine: Vec<(usize, bool)> = agree
            .iter()
            .filter(|(i, _, _)| *i == pi)
            .map(|(_, j, ok)| (*j, *ok))
            .collect();
        mine.sort();
        let n = mine.len();
        let ok = mine.iter().filter(|(_, ok)| *ok).count();
        let prefix = mine.iter().take_while(|(_, ok)| *ok).count();
        eprintln!(
            "{:>6}  {:>6}  {:>9}  {:>6}  {ok}/{n}",
            p.index,
            p.greedy_ids.len(),
            if free[pi] { "yes" } else { "no" },
            prefix,
        );
        total += n;
        agreed += ok;
    }
    let same_text = free.iter().filter(|&&f| f).count();
    eprintln!(
        "overall: top-1 agreement {agreed}/{total} ({:.1}%), identical texts {same_text}/{}",
        100.0 * agreed as f64 / total as f64,
        free.len()
    );
    // Prompts whose greedy paths pass near-ties (see SENSITIVE_PROMPTS), against the
    // engine's exact f32 greedy: how far bf16 gets before its first different token.
    for prompt in SENSITIVE_PROMPTS {
        let reference = engine_greedy(prompt, 64);
        let v = post_ok(
            &client,
            "/v1/completions",
            &greedy(&c.model, json!(prompt), 64),
        );
        let text = text_of(&v);
        let same = (0..=reference.len())
            .rev()
            .find(|&k| text.starts_with(&tok.decode(&reference[..k], true).unwrap()))
            .unwrap_or(0);
        eprintln!(
            "sensitive prompt of {} tokens: identical text {}, first ~{same}/64 tokens agree",
            prompt.len(),
            if text == tok.decode(&reference, true).unwrap() {
                "yes"
            } else {
                "no"
            },
        );
    }
    let expected: usize = prompts.iter().map(|p| p.greedy_ids.len()).sum();
    assert_eq!(total, expected, "every position was measured");
}

#[test]
fn stop_strings_end_the_answer_before_them_streamed_or_not() {
    let c = f32_cluster();
    let client = c.client();
    let tok = tokenizer();
    let p = &golden()[2];
    let reference = tok.decode(&p.greedy_ids, true).unwrap();
    for stop in [json!("hac"), json!(["hac", "al4"]), json!(["le "])] {
        let stops: Vec<&str> = match &stop {
            Value::String(s) => vec![s.as_str()],
            v => v
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_str().unwrap())
                .collect(),
        };
        // Where the reference text first shows a stop string, and how many tokens it
        // took to get there: generation stops at that token.
        let cut = stops
            .iter()
            .filter_map(|s| reference.find(s))
            .min()
            .expect("the stop string occurs in the reference");
        let tokens = (1..=p.greedy_ids.len())
            .find(|&k| {
                let t = tok.decode(&p.greedy_ids[..k], true).unwrap();
                stops.iter().any(|s| t.contains(s))
            })
            .unwrap();
        let want = &reference[..cut];

        let mut body = greedy(&c.model, json!(p.input_ids), p.greedy_ids.len());
        body["stop"] = stop.clone();
        let v = post_ok(&client, "/v1/completions", &body);
        assert_eq!(text_of(&v), want, "stop {stop}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
        assert_eq!(v["usage"]["completion_tokens"], tokens, "stop {stop}: {v}");

        body["stream"] = json!(true);
        let chunks = stream(&client, "/v1/completions", &body);
        let streamed: String = chunks
            .iter()
            .map(|c| c["choices"][0]["text"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(streamed, want, "stop {stop}, streamed");
        assert_eq!(
            chunks.last().unwrap()["choices"][0]["finish_reason"],
            "stop"
        );
        // No usage chunk unless asked for.
        assert!(
            chunks
                .iter()
                .all(|c| c.get("usage").is_none_or(Value::is_null))
        );
    }
}

#[test]
fn seeded_sampling_is_reproducible() {
    let c = f32_cluster();
    let client = c.client();
    let p = &golden()[0];
    let body = |seed: u64| {
        let mut b = greedy(&c.model, json!(p.input_ids), 24);
        b["temperature"] = json!(1.0);
        b["seed"] = json!(seed);
        b
    };
    let first = text_of(&post_ok(&client, "/v1/completions", &body(1234)));
    // Twice more, at the same time, so that the two share batches.
    let again: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|_| s.spawn(|| text_of(&post_ok(&client, "/v1/completions", &body(1234)))))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(again, [first.clone(), first.clone()]);
    // Sampling does sample: other seeds give other texts.
    let others: Vec<String> = (1..=4)
        .map(|s| text_of(&post_ok(&client, "/v1/completions", &body(s))))
        .collect();
    assert!(
        others.iter().any(|o| o != &first),
        "seeds 1..4 all gave {first:?}"
    );
}

#[test]
fn an_oversized_body_gets_413_in_openai_error_shape() {
    // Just over the server's 4 MiB body limit.
    let c = f32_cluster();
    let filler = "x".repeat((4 << 20) + 1024);
    let body = json!({"model": c.model, "prompt": filler}).to_string();
    let resp = c
        .client()
        .post_raw("/v1/completions", body.as_bytes())
        .unwrap();
    assert_error(&resp, 413, "a 4 MiB + 1 KiB body");
}

/// A log that is not a terminal gets plain text: no colour escape codes in a file.
#[test]
fn logs_written_to_a_file_carry_no_colour_codes() {
    let c = f32_cluster();
    let log = c.proc.log_tail();
    assert!(log.contains("serving"), "{log}");
    assert!(!log.contains('\x1b'), "escape codes in the log: {log:?}");
}
