//! Every model family end to end: `switchyard up` with three expert-node processes and an
//! exact (f32) wire serves each family's fixture (tests/fixtures, made by transformers)
//! and answers every golden prompt with transformers' greedy continuation. The routed
//! experts of each MoE layer run on the nodes; dense layers, shared experts and MLA run
//! on the coordinator.

mod common;

use std::path::PathBuf;

use common::{Cluster, greedy, post_ok, text_of};
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
