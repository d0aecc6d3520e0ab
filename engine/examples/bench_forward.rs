//! CPU forward-pass throughput: prefill and decode tokens/s at several batch sizes.
//!
//! cargo run --release -p switchyard-engine --example bench_forward -- MODEL_DIR [PROMPT_LEN] [DECODE_STEPS] [BATCH,...] [MLA_MODES] [ROUNDS]
//!
//! `MLA_MODES` (`auto`, `absorbed`, `expanded`, comma-separated) runs an MLA model's
//! attention each way, alternating the modes within each of `ROUNDS` rounds so that both
//! see the same machine noise. `CPU_WEIGHTS=auto|f32|bf16|int8` (default `auto`) holds
//! every matrix as `--cpu-weights` would. Prints a table; nothing here is a test.

use std::path::PathBuf;
use std::time::Instant;

use switchyard_engine::layers::MlaMode;
use switchyard_engine::ops::CpuWeights;
use switchyard_engine::sampling::argmax;
use switchyard_engine::{ExpertSelection, ExpertStore, LogitsFor, Model, SeqCache, SeqChunk};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(
        args.next()
            .ok_or("usage: bench_forward MODEL_DIR [PROMPT_LEN] [DECODE_STEPS] [BATCHES]")?,
    );
    let prompt_len: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(128);
    let steps: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(16);
    let batches: Vec<usize> = match args.next() {
        Some(s) => s.split(',').map(|b| b.parse()).collect::<Result<_, _>>()?,
        None => vec![1, 32],
    };
    let modes: Vec<MlaMode> = match args.next().as_deref() {
        None => vec![MlaMode::Auto],
        Some(list) => list
            .split(',')
            .map(|m| match m {
                "auto" => Ok(MlaMode::Auto),
                "absorbed" => Ok(MlaMode::Absorbed),
                "expanded" => Ok(MlaMode::Expanded),
                other => Err(format!("MLA mode `{other}`: auto, absorbed or expanded")),
            })
            .collect::<Result<_, _>>()?,
    };
    let rounds: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(1);

    let t0 = Instant::now();
    let policy: CpuWeights = std::env::var("CPU_WEIGHTS")
        .unwrap_or_else(|_| "auto".into())
        .parse()?;
    let (mut model, ckpt) = Model::load_as(&dir, policy)?;
    let cfg = model.config().clone();
    let experts = ExpertStore::load(&ckpt, &cfg, &ExpertSelection::All)?;
    let held = experts.held();
    let (l, e) = held.first().copied().ok_or("the model has no experts")?;
    let format = experts
        .get(l, e)
        .map(|f| f.down.weight.format().to_string());
    eprintln!(
        "loaded {} in {:.1}s; experts held as {}",
        dir.display(),
        t0.elapsed().as_secs_f64(),
        format.unwrap_or_default()
    );
    let max_batch = batches.iter().copied().max().unwrap_or(1);
    let kv_bytes = switchyard_engine::PagedKvCache::model_block_bytes(&cfg, 16)
        * max_batch
        * (prompt_len + steps + 32).div_ceil(16);
    let mut kv = model.new_kv_cache(16, kv_bytes);

    println!(
        "model: hidden {} ffn {} layers {} heads {}/{} experts {} top-{} vocab {}; prompt {} tokens, {} decode steps; {} threads",
        cfg.hidden_size,
        cfg.moe_intermediate_size,
        cfg.num_layers,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.num_experts,
        cfg.experts_per_token,
        cfg.vocab_size,
        prompt_len,
        steps,
        rayon::current_num_threads()
    );
    println!("{}", cfg.summary());
    println!("| round | attention | batch | prefill tokens/s | decode tokens/s | decode ms/step |");
    println!("|---|---|---|---|---|---|");
    let mut runs = Vec::new();
    for round in 0..rounds {
        for &mode in &modes {
            for &batch in &batches {
                runs.push((round, mode, batch));
            }
        }
    }
    for (round, mode, batch) in runs {
        model.set_mla_mode(mode);
        // Distinct prompts so routing differs across sequences, as in real traffic.
        let prompts: Vec<Vec<u32>> = (0..batch)
            .map(|b| {
                (0..prompt_len)
                    .map(|i| ((i * 7919 + b * 104729 + 13) % cfg.vocab_size) as u32)
                    .collect()
            })
            .collect();
        let mut caches: Vec<SeqCache> = (0..batch).map(|_| SeqCache::new()).collect();

        let t = Instant::now();
        let out = {
            let mut chunks: Vec<SeqChunk> = caches
                .iter_mut()
                .zip(&prompts)
                .map(|(cache, tokens)| SeqChunk { tokens, cache })
                .collect();
            model.forward(&mut kv, &experts, &mut chunks, LogitsFor::LastToken, false)?
        };
        let prefill_s = t.elapsed().as_secs_f64();
        let mut next: Vec<u32> = (0..batch).map(|i| argmax(out.row(i))).collect();

        let t = Instant::now();
        for _ in 0..steps {
            let inputs: Vec<[u32; 1]> = next.iter().map(|t| [*t]).collect();
            let mut chunks: Vec<SeqChunk> = caches
                .iter_mut()
                .zip(&inputs)
                .map(|(cache, tokens)| SeqChunk { tokens, cache })
                .collect();
            let out = model.forward(&mut kv, &experts, &mut chunks, LogitsFor::LastToken, false)?;
            next = (0..batch).map(|i| argmax(out.row(i))).collect();
        }
        let decode_s = t.elapsed().as_secs_f64();
        for c in caches.iter_mut() {
            kv.release(c);
        }
        println!(
            "| {round} | {mode:?} | {batch} | {:.1} | {:.1} | {:.1} |",
            (batch * prompt_len) as f64 / prefill_s,
            (batch * steps) as f64 / decode_s,
            decode_s * 1e3 / steps as f64
        );
    }
    Ok(())
}
