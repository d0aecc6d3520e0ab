use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use switchyard_engine::sampling::{Sampler, SamplingParams};
use switchyard_engine::tokenizer::{IncrementalDecoder, Tokenizer};
use switchyard_engine::{DenseModel, ExpertSelection, LocalExperts, LogitsFor, SeqCache, SeqChunk};

use super::device::DeviceArgs;

/// Generates text from a prompt on this machine, streaming it to stdout.
#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep going past the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

pub fn run(a: Args) -> Result<ExitCode> {
    if !(a.temperature >= 0.0 && a.temperature.is_finite()) {
        bail!("--temperature must be >= 0");
    }
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1]");
    }
    let device = a.device.resolve()?;
    let (model, ckpt) = DenseModel::load(device, &a.model)
        .with_context(|| format!("loading {} onto {device}", a.model.display()))?;
    let cfg = model.config().clone();
    let experts = LocalExperts::load(device, &ckpt, &cfg, &ExpertSelection::All)?;
    let tokenizer = Tokenizer::from_dir(&a.model)?;
    let prompt = tokenizer.encode(&a.prompt, true)?;
    if prompt.is_empty() {
        bail!("the prompt encodes to no tokens");
    }
    let max_tokens = a
        .max_tokens
        .min(cfg.max_position_embeddings.saturating_sub(prompt.len()));
    let block = 16;
    let mut kv = model.new_kv_cache(
        block,
        switchyard_engine::PagedKvCache::model_block_bytes(&cfg, block)
            * (prompt.len() + max_tokens).div_ceil(block).max(1),
    )?;
    let mut sampler = Sampler::new(
        SamplingParams {
            temperature: a.temperature,
            top_p: a.top_p,
            top_k: a.top_k,
            ..SamplingParams::default()
        },
        a.seed,
    );
    let mut eos = tokenizer.eos_token_ids().to_vec();
    eos.extend(&cfg.eos_token_ids);
    let mut decoder = IncrementalDecoder::with_prompt(true, &prompt);
    let mut seq = SeqCache::new();
    let mut input = prompt.clone();
    let mut stdout = std::io::stdout().lock();
    for _ in 0..max_tokens {
        let out = model.forward(
            &mut kv,
            &experts,
            &mut [SeqChunk {
                tokens: &input,
                cache: &mut seq,
            }],
            LogitsFor::LastToken,
            false,
        )?;
        let id = sampler.sample(out.row(0));
        if !a.ignore_eos && eos.contains(&id) {
            break;
        }
        write!(stdout, "{}", decoder.push(&tokenizer, id)?)?;
        stdout.flush()?;
        input = vec![id];
    }
    writeln!(stdout, "{}", decoder.finish(&tokenizer)?)?;
    Ok(ExitCode::SUCCESS)
}
