use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use switchyard_engine::synth::{SynthDType, SynthSpec, write_checkpoint};

/// Writes a random Mixtral checkpoint (Hub layout, with a tokenizer) for benchmarks.
#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    out: PathBuf,
    #[arg(long)]
    hidden: usize,
    #[arg(long)]
    ffn: usize,
    #[arg(long)]
    layers: usize,
    #[arg(long)]
    heads: usize,
    #[arg(long)]
    kv_heads: usize,
    /// Defaults to hidden / heads.
    #[arg(long)]
    head_dim: Option<usize>,
    #[arg(long)]
    experts: usize,
    #[arg(long)]
    top_k: usize,
    #[arg(long)]
    vocab: usize,
    /// f32, bf16 or f16.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 4096)]
    max_position: usize,
    /// Split the weights into shards of about this many bytes (the Hub uses ~5 GB).
    #[arg(long, default_value_t = 5_000_000_000)]
    shard_bytes: u64,
}

pub fn run(a: Args) -> Result<ExitCode> {
    let spec = SynthSpec {
        hidden: a.hidden,
        ffn: a.ffn,
        layers: a.layers,
        heads: a.heads,
        kv_heads: a.kv_heads,
        head_dim: a.head_dim,
        experts: a.experts,
        top_k: a.top_k,
        vocab: a.vocab,
        dtype: a.dtype.parse::<SynthDType>()?,
        seed: a.seed,
        max_position: a.max_position,
        shard_bytes: a.shard_bytes,
    };
    spec.validate()?;
    let started = std::time::Instant::now();
    write_checkpoint(&spec, &a.out).with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!(
        "wrote {} ({:.2} GB) in {:.1}s",
        a.out.display(),
        spec.total_bytes()? as f64 / 1e9,
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}
