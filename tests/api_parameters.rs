//! Logprobs, echo, `n`, batched prompts and the sampling parameters through the OpenAI
//! API, against transformers' logits and greedy texts (the fixtures) and against the
//! server's own answers to simpler requests. The experts travel as f32, so values agree
//! to rounding.

mod common;

use std::sync::OnceLock;

use common::{Cluster, golden, golden_texts, greedy, post_ok, text_of};
use serde_json::{Value, json};
use switchyard_engine::verify::GoldenPrompt;

fn cluster() -> &'static Cluster {
    static C: OnceLock<Cluster> = OnceLock::new();
    // A step budget of 64 tokens prefills the 300-token golden prompt in chunks: prompt
    // logprobs are gathered across them.
    C.get_or_init(|| {
        Cluster::up(&[
            "--nodes",
            "2",
            "--wire-dtype",
            "f32",
            "--max-batch-tokens",
            "64",
        ])
    })
}

/// log-softmax of one row, in f64 (independent of the server's code).
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row
        .iter()
        .fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
    let sum: f64 = row.iter().map(|&v| (f64::from(v) - max).exp()).sum();
    row.iter().map(|&v| f64::from(v) - max - sum.ln()).collect()
}

fn vocab(g: &GoldenPrompt) -> usize {
    g.logits.len() / g.input_ids.len()
}

/// transformers' logprob of prompt token `t` (t >= 1) given the ones before it.
fn golden_logprob(g: &GoldenPrompt, t: usize) -> f64 {
    let v = vocab(g);
    log_softmax(&g.logits[(t - 1) * v..t * v])[g.input_ids[t] as usize]
}

/// The SSE events of a streamed completion.
fn stream_events(c: &Cluster, body: &Value) -> Vec<String> {
    c.client()
        .post_stream("/v1/completions", body)
        .expect("POST stream")
        .events()
        .expect("SSE events")
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// The echo of a prompt with `max_tokens: 0` (what loglikelihood evaluation sends) gives
/// every prompt token transformers' logprob, the first `null`, and top alternatives
/// whose values are transformers' best.
#[test]
fn echo_scores_every_prompt_token_as_transformers_does() {
    let c = cluster();
    for g in golden() {
        let body = json!({
            "model": c.model, "prompt": g.input_ids, "max_tokens": 0, "echo": true,
            "logprobs": 3, "temperature": 0,
        });
        let v = post_ok(&c.client(), "/v1/completions", &body);
        let choice = &v["choices"][0];
        assert_eq!(choice["finish_reason"], "length");
        assert_eq!(v["usage"]["completion_tokens"], 0);
        let lp = &choice["logprobs"];
        let token_lps = lp["token_logprobs"].as_array().expect("token_logprobs");
        assert_eq!(token_lps.len(), g.input_ids.len(), "prompt {}", g.index);
        assert!(token_lps[0].is_null() && lp["top_logprobs"][0].is_null());
        let offsets = lp["text_offset"].as_array().expect("text_offset");
        for t in 1..g.input_ids.len() {
            let want = golden_logprob(&g, t);
            let got = f(&token_lps[t]);
            assert!(
                (got - want).abs() < 1e-4,
                "prompt {} token {t}: {got} vs {want}",
                g.index
            );
            // The dict holds the 3 best and the prompt token itself, keyed by their text
            // (tokens that decode alike, such as partial characters, share one key):
            // each value is one of those, and the best is transformers' best.
            let v = vocab(&g);
            let mut best = log_softmax(&g.logits[(t - 1) * v..t * v]);
            best.sort_by(|a, b| b.total_cmp(a));
            let allowed: Vec<f64> = best.iter().take(3).copied().chain([want]).collect();
            let top: Vec<f64> = lp["top_logprobs"][t]
                .as_object()
                .expect("a top_logprobs dict")
                .values()
                .map(f)
                .collect();
            let context = || format!("prompt {} token {t}: {}", g.index, lp["top_logprobs"][t]);
            for x in &top {
                assert!(
                    allowed.iter().any(|a| (a - x).abs() < 1e-4),
                    "{}",
                    context()
                );
            }
            let max = top.iter().copied().fold(f64::MIN, f64::max);
            assert!((max - best[0]).abs() < 1e-4, "{}", context());
            assert!(f(&offsets[t]) >= f(&offsets[t - 1]));
        }
    }
}

/// A generated token's logprob is what scoring the same tokens as a prompt gives, and a
/// greedy token is the best of its alternatives. lm-evaluation-harness's request shape
/// (`max_tokens: 1`, `echo`, `logprobs: 1`) returns the prompt's tokens and then one.
#[test]
fn generated_logprobs_equal_the_scoring_of_the_same_tokens() {
    let c = cluster();
    let g = &golden()[1];
    let n = 6;
    let mut body = greedy(&c.model, json!(g.input_ids), n);
    body["logprobs"] = json!(2);
    let generated = post_ok(&c.client(), "/v1/completions", &body);
    let lp = &generated["choices"][0]["logprobs"];
    let gen_lps: Vec<f64> = lp["token_logprobs"]
        .as_array()
        .expect("token_logprobs")
        .iter()
        .map(f)
        .collect();
    assert_eq!(gen_lps.len(), n);
    for (i, top) in lp["top_logprobs"]
        .as_array()
        .expect("top")
        .iter()
        .enumerate()
    {
        let best = top
            .as_object()
            .expect("dict")
            .values()
            .map(f)
            .fold(f64::MIN, f64::max);
        assert_eq!(
            best, gen_lps[i],
            "greedy token {i} is the best of its alternatives"
        );
    }

    let mut tokens = g.input_ids.clone();
    tokens.extend_from_slice(&g.greedy_ids[..n]);
    let body = json!({
        "model": c.model, "prompt": tokens, "max_tokens": 1, "echo": true, "logprobs": 1,
        "temperature": 0,
    });
    let scored = post_ok(&c.client(), "/v1/completions", &body);
    let all = scored["choices"][0]["logprobs"]["token_logprobs"]
        .as_array()
        .expect("token_logprobs")
        .clone();
    assert_eq!(
        all.len(),
        tokens.len() + 1,
        "the prompt's tokens, then one generated"
    );
    for i in 0..n {
        let s = f(&all[g.input_ids.len() + i]);
        assert!(
            (s - gen_lps[i]).abs() < 1e-4,
            "token {i}: scored {s}, generated {}",
            gen_lps[i]
        );
    }
    // The echoed text starts with the prompt's.
    let text = text_of(&scored);
    let prompt_text = text_of(&post_ok(
        &c.client(),
        "/v1/completions",
        &json!({"model": c.model, "prompt": g.input_ids, "max_tokens": 0, "echo": true}),
    ));
    assert!(text.starts_with(&prompt_text) && text.len() > prompt_text.len());
}

/// Chat's shape: one entry per token, with its bytes and alternatives best first; the
/// greedy token is the first alternative.
#[test]
fn chat_logprobs_list_alternatives_best_first() {
    let c = cluster();
    let body = json!({
        "model": c.model, "messages": [{"role": "user", "content": "Hello there"}],
        "max_tokens": 5, "temperature": 0, "logprobs": true, "top_logprobs": 3,
        "ignore_eos": true,
    });
    let v = post_ok(&c.client(), "/v1/chat/completions", &body);
    let content = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("logprobs.content")
        .clone();
    assert_eq!(content.len(), 5);
    let mut text = String::new();
    for e in &content {
        let token = e["token"].as_str().expect("token");
        text.push_str(token);
        let bytes: Vec<u8> = e["bytes"]
            .as_array()
            .expect("bytes")
            .iter()
            .map(|b| b.as_u64().expect("a byte") as u8)
            .collect();
        assert_eq!(bytes, token.as_bytes());
        let top = e["top_logprobs"].as_array().expect("top_logprobs");
        assert_eq!(top.len(), 3);
        assert!(
            top.windows(2)
                .all(|w| f(&w[0]["logprob"]) >= f(&w[1]["logprob"]))
        );
        assert_eq!(top[0]["token"], e["token"]);
        assert_eq!(f(&top[0]["logprob"]), f(&e["logprob"]));
    }
}

/// Streaming carries the same logprobs, chunk by chunk.
#[test]
fn streamed_logprobs_are_the_non_streamed_ones() {
    let c = cluster();
    let g = &golden()[0];
    let mut body = greedy(&c.model, json!(g.input_ids), 5);
    body["logprobs"] = json!(1);
    body["echo"] = json!(true);
    let whole = post_ok(&c.client(), "/v1/completions", &body);
    body["stream"] = json!(true);
    let events = stream_events(c, &body);
    let (mut tokens, mut lps, mut text) = (Vec::new(), Vec::new(), String::new());
    for ev in events.iter().filter(|e| e.as_str() != "[DONE]") {
        let v: Value = serde_json::from_str(ev).expect("a JSON chunk");
        text.push_str(v["choices"][0]["text"].as_str().unwrap_or(""));
        if let Some(lp) = v["choices"][0]["logprobs"].as_object() {
            tokens.extend(lp["tokens"].as_array().expect("tokens").iter().cloned());
            lps.extend(
                lp["token_logprobs"]
                    .as_array()
                    .expect("lps")
                    .iter()
                    .cloned(),
            );
        }
    }
    let want = &whole["choices"][0]["logprobs"];
    assert_eq!(Value::Array(tokens), want["tokens"]);
    // Other tests' sequences may share a step with either request, and a batch's size
    // changes a kernel's rounding: the values agree to rounding, not to the bit.
    let want_lps = want["token_logprobs"].as_array().expect("token_logprobs");
    assert_eq!(lps.len(), want_lps.len());
    for (got, want) in lps.iter().zip(want_lps) {
        match (got.as_f64(), want.as_f64()) {
            (Some(g), Some(w)) => assert!((g - w).abs() < 1e-4, "{g} vs {w}"),
            _ => assert_eq!(got, want),
        }
    }
    assert_eq!(text, text_of(&whole));
}

/// `logit_bias` of -100 on the greedy first token gives the runner-up, which the
/// unbiased logprobs name; `stop_token_ids` ends the text before the token.
#[test]
fn logit_bias_and_stop_token_ids_act_on_the_tokens_they_name() {
    let c = cluster();
    let g = &golden()[2];
    let first = g.greedy_ids[0];
    let mut body = greedy(&c.model, json!(g.input_ids), 1);
    body["logprobs"] = json!(2);
    let plain = post_ok(&c.client(), "/v1/completions", &body);
    let top = plain["choices"][0]["logprobs"]["top_logprobs"][0]
        .as_object()
        .expect("dict")
        .clone();
    let chosen = plain["choices"][0]["logprobs"]["tokens"][0].clone();
    let runner_up = top
        .iter()
        .filter(|(t, _)| Value::String((*t).clone()) != chosen)
        .max_by(|a, b| f(a.1).total_cmp(&f(b.1)))
        .map(|(t, _)| t.clone())
        .expect("a runner-up");
    body["logit_bias"] = json!({ first.to_string(): -100 });
    let biased = post_ok(&c.client(), "/v1/completions", &body);
    assert_eq!(
        biased["choices"][0]["logprobs"]["tokens"][0],
        json!(runner_up)
    );

    // Stop at the first greedy token that has not come before.
    let at = (1..g.greedy_ids.len())
        .find(|&i| !g.greedy_ids[..i].contains(&g.greedy_ids[i]))
        .expect("a new token in the greedy continuation");
    let mut body = greedy(&c.model, json!(g.input_ids), g.greedy_ids.len());
    body["stop_token_ids"] = json!([g.greedy_ids[at]]);
    let stopped = post_ok(&c.client(), "/v1/completions", &body);
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop");
    assert_eq!(stopped["usage"]["completion_tokens"], json!(at + 1));
    let before = post_ok(
        &c.client(),
        "/v1/completions",
        &greedy(&c.model, json!(g.input_ids), at),
    );
    assert_eq!(text_of(&stopped), text_of(&before));
}

/// Every known parameter that is not honoured is refused by name; unknown ones as
/// OpenAI refuses them.
#[test]
fn unsupported_and_unknown_parameters_are_refused_by_name() {
    let c = cluster();
    for (extra, param) in [
        (
            json!({"tools": [{"type": "function", "function": {"name": "f"}}]}),
            json!("tools"),
        ),
        (json!({"use_beam_search": true}), json!("use_beam_search")),
        (json!({"suffix": "x"}), json!("suffix")),
        (json!({"frobnicate": 1}), Value::Null),
    ] {
        let mut body = json!({"model": c.model, "prompt": "hi", "max_tokens": 1});
        for (k, v) in extra.as_object().expect("object") {
            body[k] = v.clone();
        }
        let resp = c
            .client()
            .post_json("/v1/completions", &body)
            .expect("POST");
        assert_eq!(resp.status, 400, "{body}");
        let err = resp.json();
        assert_eq!(err["error"]["param"], param, "{err}");
    }
    // Harmless ones pass, as with OpenAI.
    let body =
        json!({"model": c.model, "prompt": "hi", "max_tokens": 1, "user": "u1", "metadata": {}});
    post_ok(&c.client(), "/v1/completions", &body);
}

fn texts(v: &Value) -> Vec<String> {
    let choices = v["choices"].as_array().expect("choices");
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], json!(i), "choices in index order");
    }
    choices
        .iter()
        .map(|c| c["text"].as_str().expect("text").to_owned())
        .collect()
}

/// `n` greedy choices are the same text (transformers'); usage counts the prompt once
/// and every choice's tokens.
#[test]
fn n_greedy_choices_are_identical_and_counted_once_per_prompt() {
    let c = cluster();
    let g = &golden()[3];
    let mut body = greedy(&c.model, json!(g.input_ids), g.greedy_ids.len());
    body["n"] = json!(4);
    let v = post_ok(&c.client(), "/v1/completions", &body);
    assert_eq!(texts(&v), vec![golden_texts()[3].clone(); 4]);
    assert_eq!(v["usage"]["prompt_tokens"], json!(g.input_ids.len()));
    assert_eq!(
        v["usage"]["completion_tokens"],
        json!(4 * g.greedy_ids.len())
    );
}

/// Seeded choices are reproducible, differ from each other, and choice i draws what a
/// single request seeded `seed + i` draws.
#[test]
fn n_seeded_choices_are_reproducible_streams_of_their_own() {
    let c = cluster();
    let body = |n: usize, seed: u64| {
        json!({"model": c.model, "prompt": "The expert nodes", "max_tokens": 12, "n": n,
               "temperature": 1.0, "seed": seed, "ignore_eos": true})
    };
    let a = texts(&post_ok(&c.client(), "/v1/completions", &body(3, 7)));
    let b = texts(&post_ok(&c.client(), "/v1/completions", &body(3, 7)));
    assert_eq!(a, b);
    assert!(
        a[0] != a[1] || a[1] != a[2],
        "three seeds drew the same text: {a:?}"
    );
    for (i, text) in a.iter().enumerate() {
        let single = text_of(&post_ok(
            &c.client(),
            "/v1/completions",
            &body(1, 7 + i as u64),
        ));
        assert_eq!(&single, text, "choice {i}");
    }
}

/// A batch of prompts gets a choice per prompt and `n`, in order, streamed or not.
#[test]
fn batched_prompts_get_n_choices_each_in_order() {
    let c = cluster();
    let g = golden();
    let want = golden_texts();
    let steps = g[0].greedy_ids.len().min(g[1].greedy_ids.len());
    let mut body = greedy(&c.model, json!([g[0].input_ids, g[1].input_ids]), steps);
    body["n"] = json!(2);
    let v = post_ok(&c.client(), "/v1/completions", &body);
    let got = texts(&v);
    assert_eq!(got.len(), 4);
    for (i, text) in got.iter().enumerate() {
        assert!(
            want[i / 2].starts_with(text.as_str()),
            "choice {i}: {text:?}"
        );
    }
    assert_eq!(
        v["usage"]["prompt_tokens"],
        json!(g[0].input_ids.len() + g[1].input_ids.len())
    );

    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let events = stream_events(c, &body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let mut streamed = vec![String::new(); 4];
    let mut usage = Value::Null;
    for ev in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(ev).expect("a JSON chunk");
        if let Some(choice) = v["choices"].as_array().and_then(|c| c.first()) {
            let i = choice["index"].as_u64().expect("index") as usize;
            streamed[i].push_str(choice["text"].as_str().unwrap_or(""));
        } else {
            usage = v["usage"].clone();
        }
    }
    assert_eq!(streamed, got);
    assert_eq!(usage, v["usage"]);
}
