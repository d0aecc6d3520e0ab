//! Prefix caching changes no output: greedy continuations with prompts that share
//! prefixes are the same with the cache on (later prompts reuse earlier prompts' KV
//! blocks) as with it off, on Mixtral (keys and values) and DeepSeek-V3 (MLA's latent
//! cache), with chunked prefill; and the prompts the fixtures come with still get
//! transformers' own continuations.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_coordinator::metrics::Metrics;
use switchyard_coordinator::request::{Event, GenerateRequest};
use switchyard_coordinator::scheduler::{SchedulerConfig, SchedulerHandle, spawn};
use switchyard_engine::cuda::Device;
use switchyard_engine::tokenizer::Tokenizer;
use switchyard_engine::verify::{GOLDEN_FILE, GoldenPrompt, read_golden};
use switchyard_engine::{DenseModel, ExpertSelection, LocalExperts, SamplingParams};
use tokio::sync::mpsc;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

fn start(dir: &Path, prefix_caching: bool) -> (SchedulerHandle, Vec<GoldenPrompt>, Arc<Metrics>) {
    let (model, ckpt) = DenseModel::load(Device::Cpu, dir).unwrap();
    let cfg = model.config().clone();
    let experts = LocalExperts::load(Device::Cpu, &ckpt, &cfg, &ExpertSelection::All).unwrap();
    let tokenizer = Arc::new(Tokenizer::from_dir(dir).unwrap());
    let golden = read_golden(
        &dir.join(GOLDEN_FILE),
        cfg.expert_layers(),
        cfg.vocab_size,
        cfg.experts_per_token,
    )
    .unwrap();
    let metrics = Metrics::new().unwrap();
    let config = SchedulerConfig {
        // Small blocks and steps: hits on short prompts, prefill in chunks.
        kv_block_size: 4,
        max_batch_tokens: 16,
        prefix_caching,
        ..SchedulerConfig::default()
    };
    let handle = spawn(
        Arc::new(model),
        Arc::new(experts),
        tokenizer,
        config,
        metrics.clone(),
    )
    .unwrap();
    (handle, golden, metrics)
}

fn greedy(
    handle: &SchedulerHandle,
    prompt: &[u32],
    max_tokens: usize,
) -> mpsc::UnboundedReceiver<Event> {
    let (tx, rx) = mpsc::unbounded_channel();
    handle
        .submit(GenerateRequest {
            prompt: prompt.to_vec(),
            max_tokens,
            sampling: SamplingParams::greedy(),
            seed: Some(0),
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: true,
            logprobs: None,
            prompt_logprobs: None,
            constraint: None,
            arrived: Instant::now(),
            events: tx,
        })
        .unwrap();
    rx
}

fn collect(mut rx: mpsc::UnboundedReceiver<Event>) -> Vec<u32> {
    let mut ids = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "request did not finish");
        match rx.blocking_recv() {
            Some(Event::Token { id, .. }) => ids.push(id),
            Some(Event::Done { .. }) => return ids,
            Some(Event::Error(e)) => panic!("request failed: {e}"),
            Some(_) => {}
            None => panic!("scheduler dropped the request"),
        }
    }
}

/// The fixture's prompts, then prompts sharing their prefixes (the whole prompt with
/// more after it, its first half with other tokens), all at once.
fn prompts(golden: &[GoldenPrompt], vocab: u32) -> Vec<Vec<u32>> {
    let mut out = Vec::new();
    for g in golden {
        let p = &g.input_ids;
        let mut longer = p.clone();
        longer.extend((0..7).map(|i| (p[0] + 31 * i + 3) % vocab));
        let mut forked = p[..p.len() / 2].to_vec();
        forked.extend((0..5).map(|i| (p[p.len() - 1] + 17 * i + 1) % vocab));
        out.push(p.clone());
        out.push(longer);
        out.push(forked);
    }
    out
}

fn same_output_with_and_without_the_cache(name: &str) {
    let dir = fixture(name);
    let (cached, golden, metrics) = start(&dir, true);
    let (uncached, _, _) = start(&dir, false);
    let vocab = DenseModel::load(Device::Cpu, &dir)
        .unwrap()
        .0
        .config()
        .vocab_size as u32;
    // First the fixture's own prompts, one at a time, to fill the cache.
    for g in &golden {
        let ids = collect(greedy(&cached, &g.input_ids, g.greedy_ids.len()));
        assert_eq!(ids, g.greedy_ids, "{name}: prompt {}", g.index);
    }
    let hits_before = metrics.prefix_hits.get();
    let all = prompts(&golden, vocab);
    let with: Vec<_> = all.iter().map(|p| greedy(&cached, p, 8)).collect();
    let without: Vec<_> = all.iter().map(|p| greedy(&uncached, p, 8)).collect();
    for (i, (a, b)) in with.into_iter().zip(without).enumerate() {
        assert_eq!(collect(a), collect(b), "{name}: prompt {i} ({:?})", all[i]);
    }
    // The derived prompts did hit: every one shares at least a block with a fixture's.
    let hits = metrics.prefix_hits.get() - hits_before;
    assert!(hits > 0, "{name}: no prefix hits");
    eprintln!(
        "{name}: {hits} of {} prompt tokens reused",
        metrics.prefix_queries.get()
    );
}

#[test]
fn mixtral_outputs_are_the_same_with_and_without_prefix_hits() {
    same_output_with_and_without_the_cache("mixtral-tiny");
}

#[test]
fn mla_outputs_are_the_same_with_and_without_prefix_hits() {
    same_output_with_and_without_the_cache("deepseek-v3-tiny");
}
