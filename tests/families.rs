//! Every model family end to end: `switchyard up` with three expert-node processes and an
//! exact (f32) wire serves each family's fixture (tests/fixtures, made by transformers)
//! and answers every golden prompt with transformers' greedy continuation. The routed
//! experts of each MoE layer run on the nodes; dense layers, shared experts and MLA run
//! on the coordinator.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::etcd::{Etcd, wait_placed};
use common::{Cluster, cluster_node_of, engine_greedy_margins_of, exe, greedy, post_ok, text_of};
use serde_json::{Value, json};
use switchyard_engine::ModelConfig;
use switchyard_engine::tokenizer::Tokenizer;
use switchyard_engine::verify::{GOLDEN_FILE, read_golden};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn serves_the_reference_greedy_text(name: &str) {
    let dir = fixture(name);
    let cfg = ModelConfig::from_dir(&dir).expect("fixture config");
    let golden = read_golden(
        &dir.join(GOLDEN_FILE),
        cfg.expert_layers(),
        cfg.vocab_size,
        cfg.experts_per_token,
    )
    .expect("golden outputs");
    let tok = Tokenizer::from_dir(&dir).expect("fixture tokenizer");
    let texts: Value =
        serde_json::from_slice(&std::fs::read(dir.join("golden.json")).expect("golden.json"))
            .expect("golden.json is JSON");
    let dir_arg = dir.to_str().expect("UTF-8 path");
    let c = Cluster::up(&[
        "--model",
        dir_arg,
        "--nodes",
        "3",
        "--wire-dtype",
        "f32",
        // The 300-token prompt prefills in chunks.
        "--max-batch-tokens",
        "64",
    ]);
    let client = c.client();
    for p in &golden {
        let want = tok.decode(&p.greedy_ids, true).expect("decode");
        assert_eq!(
            want, texts["prompts"][p.index]["greedy_text"],
            "{name}: our decoding of transformers' ids differs from its text, prompt {}",
            p.index
        );
        let v = post_ok(
            &client,
            "/v1/completions",
            &greedy(&c.model, json!(p.input_ids), p.greedy_ids.len()),
        );
        assert_eq!(text_of(&v), want, "{name}: prompt {}", p.index);
        assert_eq!(v["usage"]["completion_tokens"], p.greedy_ids.len(), "{v}");
    }
}

#[test]
fn qwen3_moe_through_three_nodes() {
    serves_the_reference_greedy_text("qwen3-moe-tiny");
}

#[test]
fn qwen3_moe_bf16_shards_through_three_nodes() {
    serves_the_reference_greedy_text("qwen3-moe-tiny-bf16");
}

#[test]
fn qwen2_moe_through_three_nodes() {
    serves_the_reference_greedy_text("qwen2-moe-tiny");
}

#[test]
fn deepseek_v3_through_three_nodes() {
    serves_the_reference_greedy_text("deepseek-v3-tiny");
}

#[test]
fn deepseek_v3_bf16_shards_through_three_nodes() {
    serves_the_reference_greedy_text("deepseek-v3-tiny-bf16");
}

#[test]
fn deepseek_v3_fp8_through_three_nodes() {
    serves_the_reference_greedy_text("deepseek-v3-tiny-fp8");
}

/// DeepSeek-V3's expert shape (61 layers; synth makes the first one dense, so 60 MoE layers
/// of 256 experts, top-8 from 4 of 8 groups) at a tiny hidden size: the elastic cluster places all
/// 15,360 experts on 4 nodes through etcd and serves the engine's own greedy text; `ctl
/// status` stays one line per layer.
#[test]
fn elastic_cluster_places_and_serves_a_61_layer_256_expert_deepseek_v3() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("ds3");
    let out = Command::new(exe())
        .args(["synth", "--family", "deepseek_v3", "--out"])
        .arg(&model)
        .args([
            "--hidden",
            "16",
            "--ffn",
            "32",
            "--moe-ffn",
            "8",
            "--layers",
            "61",
        ])
        .args([
            "--heads",
            "2",
            "--experts",
            "256",
            "--top-k",
            "8",
            "--vocab",
            "512",
        ])
        .args(["--dtype", "f32", "--max-position", "256"])
        .output()
        .expect("running synth");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg = ModelConfig::from_dir(&model).expect("synth config");
    assert_eq!((cfg.expert_layers(), cfg.num_experts), (60, 256));

    let etcd = Etcd::start();
    let _nodes: Vec<_> = (0..4)
        .map(|i| cluster_node_of(&model, &etcd.url(), &format!("n{i}"), &[]))
        .collect();
    let c = Cluster::cluster_coordinator_of(&model, &etcd.url(), "c0", &["--wire-dtype", "f32"]);
    wait_placed(&etcd.url(), &["n0", "n1", "n2", "n3"]);
    let client = c.client();
    let tok = Tokenizer::from_dir(&model).expect("synth tokenizer");
    // A random 61-layer model is chaotic: summing a token's experts as four per-node
    // partials instead of in expert order (exact arithmetic either way) flips a greedy step
    // whose top two logits are 4e-4 apart. So the comparison stops before the first step
    // closer than 1%.
    let mut compared = 0;
    for prompt in [
        "Mixture of Experts",
        "DeepSeek-V3 routes each token to eight experts",
        "El modelo se puede ejecutar",
    ] {
        let ids = tok.encode(prompt, true).expect("encode");
        let steps = engine_greedy_margins_of(&model, &ids, 8);
        let decided: Vec<u32> = steps
            .iter()
            .take_while(|(_, margin)| *margin > 1e-2)
            .map(|(id, _)| *id)
            .collect();
        eprintln!("{prompt:?}: greedy (id, margin) {steps:?}");
        if decided.is_empty() {
            continue;
        }
        let want = tok.decode(&decided, true).expect("decode");
        let body = greedy(&c.model, json!(ids), decided.len());
        let v = post_ok(&client, "/v1/completions", &body);
        assert_eq!(text_of(&v), want, "prompt {prompt:?}");
        compared += decided.len();
    }
    assert!(
        compared >= 4,
        "only {compared} decided greedy steps compared"
    );

    let status = Command::new(exe())
        .args(["ctl", "--etcd", &etcd.url(), "status"])
        .output()
        .expect("running ctl status");
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{text}");
    let layer_lines: Vec<&str> = text.lines().filter(|l| l.starts_with("layer ")).collect();
    assert_eq!(layer_lines.len(), 60, "{text}");
    // Every node says how it holds its experts: f32, as the checkpoint is.
    let node_lines: Vec<&str> = text.lines().filter(|l| l.starts_with('n')).collect();
    assert_eq!(node_lines.len(), 4, "{text}");
    for line in node_lines {
        assert_eq!(line.split_whitespace().nth(3), Some("f32"), "{line}");
    }
    for line in layer_lines {
        assert!(line.len() < 300, "{line}");
        assert!(line.contains("256 experts"), "{line}");
    }
}
