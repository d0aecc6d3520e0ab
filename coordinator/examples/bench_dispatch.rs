//! Decode throughput with experts in process vs on 1, 2, 4 expert-node processes over
//! loopback gRPC (bf16 and f32 on the wire), and the per-layer dispatch round trip with
//! the nodes' expert compute subtracted.
//!
//! cargo run --release -p switchyard-coordinator --example bench_dispatch -- \
//!     MODEL_DIR SWITCHYARD_BINARY [BATCHES] [NODE_COUNTS] [STEPS]
//!
//! `CPU_WEIGHTS=auto|f32|bf16|int8` (default `auto`) holds every matrix as
//! `--cpu-weights` would: the dense layers, the in-process experts and the nodes'.
//!
//! Prints a table; nothing here is a test.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_coordinator::placement::Placement;
use switchyard_coordinator::remote::{RemoteExperts, wait_healthy};
use switchyard_engine::ops::CpuWeights;
use switchyard_engine::sampling::argmax;
use switchyard_engine::{
    ExpertSelection, ExpertStore, Experts, LogitsFor, Model, PagedKvCache, SeqCache, SeqChunk,
};
use switchyard_proto::WireFormat;

type BoxError = Box<dyn std::error::Error>;

struct Nodes(Vec<Child>);

impl Drop for Nodes {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn cpu_weights() -> Result<CpuWeights, BoxError> {
    Ok(std::env::var("CPU_WEIGHTS")
        .ok()
        .map(|v| v.parse::<CpuWeights>())
        .transpose()?
        .unwrap_or_default())
}

fn start_nodes(bin: &Path, model: &Path, n: usize) -> Result<(Nodes, Vec<String>), BoxError> {
    let mut nodes = Nodes(Vec::new());
    let mut addrs = Vec::new();
    for _ in 0..n {
        let mut child = Command::new(bin)
            .args(["expert-node", "--listen", "127.0.0.1:0", "--model"])
            .arg(model)
            .arg("--cpu-weights")
            .arg(cpu_weights()?.to_string())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        nodes.0.push(child);
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        addrs.push(
            line.trim()
                .strip_prefix("listening on ")
                .ok_or("bad node output")?
                .to_owned(),
        );
    }
    Ok((nodes, addrs))
}

struct Run {
    tokens_per_s: f64,
    dispatch_us: Option<(f64, f64, f64)>,
}

fn decode(
    model: &Model,
    experts: &dyn Experts,
    batch: usize,
    steps: usize,
    remote: Option<&RemoteExperts>,
) -> Result<Run, BoxError> {
    let cfg = model.config();
    let prompt_len = 16;
    let block = 16;
    let mut kv = model.new_kv_cache(
        block,
        PagedKvCache::model_block_bytes(cfg, block)
            * batch
            * (prompt_len + steps + 1).div_ceil(block),
    );
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|b| {
            (0..prompt_len)
                .map(|i| ((i * 7919 + b * 104729 + 13) % cfg.vocab_size) as u32)
                .collect()
        })
        .collect();
    let mut caches: Vec<SeqCache> = (0..batch).map(|_| SeqCache::new()).collect();
    let out = {
        let mut chunks: Vec<SeqChunk> = caches
            .iter_mut()
            .zip(&prompts)
            .map(|(cache, tokens)| SeqChunk { tokens, cache })
            .collect();
        model.forward(&mut kv, experts, &mut chunks, LogitsFor::LastToken, false)?
    };
    let mut next: Vec<u32> = (0..batch).map(|i| argmax(out.row(i))).collect();
    if let Some(r) = remote {
        r.take_stats();
    }
    let t = Instant::now();
    for _ in 0..steps {
        let inputs: Vec<[u32; 1]> = next.iter().map(|t| [*t]).collect();
        let mut chunks: Vec<SeqChunk> = caches
            .iter_mut()
            .zip(&inputs)
            .map(|(cache, tokens)| SeqChunk { tokens, cache })
            .collect();
        let out = model.forward(&mut kv, experts, &mut chunks, LogitsFor::LastToken, false)?;
        next = (0..batch).map(|i| argmax(out.row(i))).collect();
    }
    let secs = t.elapsed().as_secs_f64();
    let dispatch_us = remote.map(|r| {
        let s = r.take_stats();
        let layers = s.layers.max(1) as f64;
        let rt = s.round_trip_micros as f64 / layers;
        let compute = s.max_compute_micros as f64 / layers;
        (rt, compute, rt - compute)
    });
    Ok(Run {
        tokens_per_s: (batch * steps) as f64 / secs,
        dispatch_us,
    })
}

fn main() -> Result<(), BoxError> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: bench_dispatch MODEL_DIR SWITCHYARD_BINARY [BATCHES] [NODE_COUNTS] [STEPS]";
    let model_dir = PathBuf::from(args.next().ok_or(usage)?);
    let bin = PathBuf::from(args.next().ok_or(usage)?);
    let list = |s: Option<String>, default: &str| -> Result<Vec<usize>, BoxError> {
        Ok(s.unwrap_or_else(|| default.into())
            .split(',')
            .map(|x| x.parse())
            .collect::<Result<_, _>>()?)
    };
    let batches = list(args.next(), "1,8,32")?;
    let node_counts = list(args.next(), "1,2,4")?;
    let steps: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(16);

    let (model, ckpt) = Model::load_as(&model_dir, cpu_weights()?)?;
    let cfg = model.config().clone();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;

    println!(
        "model {}: hidden {} ffn {} layers {} experts {} top-{}; {} decode steps after a 16-token prompt",
        model_dir.display(),
        cfg.hidden_size,
        cfg.moe_intermediate_size,
        cfg.num_layers,
        cfg.num_experts,
        cfg.experts_per_token,
        steps
    );
    println!(
        "| experts | wire | batch | decode tokens/s | vs in-process | dispatch round trip us/layer | node compute us/layer | overhead us/layer |"
    );
    println!("|---|---|---|---|---|---|---|---|");

    let mut baseline = Vec::new();
    {
        let store = ExpertStore::load(&ckpt, &cfg, &ExpertSelection::All)?;
        for &b in &batches {
            let r = decode(&model, &store, b, steps, None)?;
            baseline.push(r.tokens_per_s);
            println!(
                "| in-process | - | {b} | {:.1} | 1.00 | - | - | - |",
                r.tokens_per_s
            );
        }
    }
    for &n in &node_counts {
        let (nodes, addrs) = start_nodes(&bin, &model_dir, n)?;
        let placement = Placement::round_robin(cfg.expert_layers(), cfg.num_experts, n, 1)?;
        let links = runtime.block_on(async {
            for a in &addrs {
                wait_healthy(a, Duration::from_secs(60), None).await?;
            }
            RemoteExperts::connect_static(&addrs, &placement, None, Default::default()).await
        })?;
        let mut links = Some(links);
        for wire in [WireFormat::Bf16, WireFormat::F32] {
            // One set of links per wire format: rebuild from the same nodes.
            let l = match links.take() {
                Some(l) => l,
                None => runtime.block_on(RemoteExperts::connect_static(
                    &addrs,
                    &placement,
                    None,
                    Default::default(),
                ))?,
            };
            let remote = Arc::new(RemoteExperts::new(
                runtime.handle().clone(),
                l,
                placement.clone(),
                cfg.hidden_size,
                wire,
                Duration::from_secs(60),
            ));
            for (bi, &b) in batches.iter().enumerate() {
                let r = decode(&model, remote.as_ref(), b, steps, Some(&remote))?;
                let (rt, compute, overhead) = r.dispatch_us.unwrap_or_default();
                println!(
                    "| {n} node{} | {} | {b} | {:.1} | {:.2} | {rt:.0} | {compute:.0} | {overhead:.0} |",
                    if n == 1 { "" } else { "s" },
                    if wire == WireFormat::Bf16 {
                        "bf16"
                    } else {
                        "f32"
                    },
                    r.tokens_per_s,
                    r.tokens_per_s / baseline[bi],
                );
            }
        }
        drop(nodes);
    }
    Ok(())
}
