//! `up --link-delay-us`: every expert node behind an emulated link. Answers stay exactly
//! transformers' (the link keeps bytes and order), and every MoE layer of every step pays
//! the round trip (the link really delays).

mod common;

use std::time::{Duration, Instant};

use common::{Cluster, golden, golden_texts, greedy, post_ok, text_of};
use serde_json::json;

#[test]
fn nodes_behind_a_delaying_link_give_the_same_answers_a_round_trip_per_layer_later() {
    let delay = Duration::from_millis(2);
    let c = Cluster::up(&[
        "--nodes",
        "3",
        "--wire-dtype",
        "f32",
        "--link-delay-us",
        "2000",
        "--link-rate-gbps",
        "10",
    ]);
    let client = c.client();
    let g = &golden()[1];
    let started = Instant::now();
    let v = post_ok(
        &client,
        "/v1/completions",
        &greedy(&c.model, json!(g.input_ids), g.greedy_ids.len()),
    );
    let took = started.elapsed();
    assert_eq!(text_of(&v), golden_texts()[1]);
    // One prefill step and (n - 1) decode steps, each 4 MoE layers of one round trip.
    let steps = g.greedy_ids.len() as u32;
    let floor = 4 * steps * 2 * delay;
    assert!(took >= floor, "{took:?} is below {floor:?}");

    // The coordinator's idle time per layer: at least a round trip every time.
    let metrics = client.get("/metrics").expect("GET /metrics").text();
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing: {metrics}"))
    };
    let layers = value("switchyard_expert_wait_seconds_count ");
    let waited = value("switchyard_expert_wait_seconds_sum ");
    assert!(layers >= f64::from(4 * steps), "{layers}");
    assert!(
        waited >= layers * 2.0 * delay.as_secs_f64(),
        "{waited} s over {layers} layers"
    );
}

/// Two micro-batches taking turns through three nodes behind links: concurrent requests
/// (so steps hold several sequences and get split) still get exactly transformers' text.
#[test]
fn micro_batches_through_delayed_nodes_keep_every_answer() {
    let c = std::sync::Arc::new(Cluster::up(&[
        "--nodes",
        "3",
        "--wire-dtype",
        "f32",
        "--link-delay-us",
        "500",
        "--micro-batches",
        "2",
    ]));
    let texts = golden_texts();
    let threads: Vec<_> = golden()
        .into_iter()
        .filter(|g| g.input_ids.len() < 100)
        .map(|g| {
            let (c, want) = (c.clone(), texts[g.index].clone());
            std::thread::spawn(move || {
                let body = greedy(&c.model, json!(g.input_ids), g.greedy_ids.len());
                let v = post_ok(&c.client(), "/v1/completions", &body);
                assert_eq!(text_of(&v), want, "prompt {}", g.index);
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
}
