//! CPU prefill/decode throughput of candle-transformers' `deepseek2` model on a DeepSeek-V3
//! checkpoint, printed in the same table shape as Switchyard's
//! `engine/examples/bench_forward.rs`, with the same prompts.
//!
//! ```text
//! candle-deepseek [--stock] MODEL_DIR [PROMPT_LEN] [DECODE_STEPS] [BATCH,...] [ROUNDS]
//! candle-deepseek [--stock] --check MODEL_DIR [GOLDEN_SAFETENSORS]
//! ```
//!
//! The weights load as f32 on the CPU (safetensors, mmapped through `VarBuilder`).
//!
//! By default the model is `src/deepseek2_v3.rs`: candle-transformers 0.11.1's
//! `deepseek2.rs` with DeepSeek-V3's router added (candle 0.11.1 has no `sigmoid` scoring,
//! no `noaux_tc`, and never reads `e_score_correction_bias`); everything else is candle's.
//! `--stock` runs the unmodified `candle_transformers::models::deepseek2` instead, with the
//! router rewritten to candle's `softmax` + `greedy`: the same number of experts per token
//! and the same shapes, but other experts and other logits.
//!
//! `--check` compares the logits for `p0.input_ids` with `p0.logits` in a golden file
//! (default `MODEL_DIR/golden.safetensors`), through candle's prefill and decode paths.

mod deepseek2_v3;

/// The candle crates this builds against (Cargo.toml; src/deepseek2_v3.rs is from this release).
const CANDLE_VERSION: &str = "0.11.1";

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use candle::{DType, Device, IndexOp, Tensor, D};
use candle_nn::VarBuilder;
use serde_json::{json, Map, Value};

enum Model {
    V3(deepseek2_v3::DeepSeekV2),
    Stock(candle_transformers::models::deepseek2::DeepSeekV2),
}

impl Model {
    /// Logits of the last position of each row: [batch, vocab], f32.
    fn forward(&mut self, ids: &Tensor, offset: usize) -> Result<Tensor> {
        Ok(match self {
            Model::V3(m) => m.forward(ids, offset)?,
            Model::Stock(m) => m.forward(ids, offset)?,
        })
    }

    fn clear_kv_cache(&mut self) {
        match self {
            Model::V3(m) => m.clear_kv_cache(),
            Model::Stock(m) => m.clear_kv_cache(),
        }
    }
}

fn main() -> Result<()> {
    let mut stock = false;
    let mut check = false;
    let mut pos = Vec::new();
    for a in std::env::args().skip(1) {
        match a.as_str() {
            "--stock" => stock = true,
            "--check" => check = true,
            "-h" | "--help" => {
                println!(
                    "usage: candle-deepseek [--stock] MODEL_DIR [PROMPT_LEN] [DECODE_STEPS] [BATCH,...] [ROUNDS]\n       candle-deepseek [--stock] --check MODEL_DIR [GOLDEN_SAFETENSORS]"
                );
                return Ok(());
            }
            s if s.starts_with("--") => bail!("unknown flag {s}"),
            _ => pos.push(a),
        }
    }
    let mut pos = pos.into_iter();
    let dir = PathBuf::from(pos.next().ok_or_else(|| {
        anyhow!("usage: candle-deepseek [--stock] [--check] MODEL_DIR [PROMPT_LEN] [DECODE_STEPS] [BATCH,...] [ROUNDS]")
    })?);

    let t0 = Instant::now();
    let (mut model, info) = load(&dir, stock)?;
    eprintln!(
        "loaded {} in {:.1}s",
        dir.display(),
        t0.elapsed().as_secs_f64()
    );
    for note in &info.notes {
        eprintln!("config: {note}");
    }

    if check {
        let golden = pos
            .next()
            .map(PathBuf::from)
            .unwrap_or_else(|| dir.join("golden.safetensors"));
        return run_check(&mut model, &golden);
    }

    let prompt_len: usize = pos.next().map(|s| s.parse()).transpose()?.unwrap_or(128);
    let steps: usize = pos.next().map(|s| s.parse()).transpose()?.unwrap_or(16);
    let batches: Vec<usize> = match pos.next() {
        Some(s) => s.split(',').map(|b| b.parse()).collect::<Result<_, _>>()?,
        None => vec![1, 32],
    };
    let rounds: usize = pos.next().map(|s| s.parse()).transpose()?.unwrap_or(1);
    if let Some(extra) = pos.next() {
        bail!("unexpected argument {extra}");
    }
    if prompt_len == 0 {
        bail!("PROMPT_LEN must be at least 1");
    }
    if prompt_len + steps > info.max_position {
        bail!(
            "PROMPT_LEN + DECODE_STEPS = {} exceeds max_position_embeddings {} (candle's RoPE table)",
            prompt_len + steps,
            info.max_position
        );
    }
    bench(&mut model, &info, prompt_len, steps, &batches, rounds)
}

struct Info {
    vocab: usize,
    max_position: usize,
    summary: String,
    notes: Vec<String>,
}

fn bench(
    model: &mut Model,
    info: &Info,
    prompt_len: usize,
    steps: usize,
    batches: &[usize],
    rounds: usize,
) -> Result<()> {
    println!(
        "{}; prompt {} tokens, {} decode steps; {} threads",
        info.summary,
        prompt_len,
        steps,
        candle::utils::get_num_threads()
    );
    println!(
        "candle {} CPU (f32; mkl {}, accelerate {}, avx {}, f16c {}); KV cache: expanded per-head K [b,h,t,nope+rope] and V [b,h,t,v] (not the latent), grown by Tensor::cat; attention: expanded (no absorption)",
        CANDLE_VERSION,
        candle::utils::has_mkl(),
        candle::utils::has_accelerate(),
        candle::utils::with_avx(),
        candle::utils::with_f16c(),
    );
    println!("| round | batch | prefill tokens/s | decode tokens/s | decode ms/step |");
    println!("|---|---|---|---|---|");
    let dev = Device::Cpu;
    for round in 0..rounds {
        for &batch in batches {
            // The same prompts as bench_forward: distinct per sequence.
            let prompts: Vec<u32> = (0..batch)
                .flat_map(|b| {
                    (0..prompt_len).map(move |i| ((i * 7919 + b * 104729 + 13) % info.vocab) as u32)
                })
                .collect();
            let ids = Tensor::from_vec(prompts, (batch, prompt_len), &dev)?;
            model.clear_kv_cache();

            let t = Instant::now();
            let logits = model.forward(&ids, 0)?;
            let mut next = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
            let prefill_s = t.elapsed().as_secs_f64();

            let t = Instant::now();
            for s in 0..steps {
                let input = Tensor::from_vec(next, (batch, 1), &dev)?;
                let logits = model.forward(&input, prompt_len + s)?;
                next = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
            }
            let decode_s = t.elapsed().as_secs_f64();
            model.clear_kv_cache();
            println!(
                "| {round} | {batch} | {:.1} | {:.1} | {:.1} |",
                (batch * prompt_len) as f64 / prefill_s,
                (batch * steps) as f64 / decode_s,
                decode_s * 1e3 / steps.max(1) as f64
            );
        }
    }
    Ok(())
}

/// Compares candle's logits with a golden file's `pK.logits` [T, vocab] for
/// `pK.input_ids` [T] (K = 0, 1, ... while present): through the prefill path (one full
/// forward per prefix, since candle returns only the last position's logits), through the
/// decode path (one token at a time against the KV cache), and, where the file has
/// `pK.greedy_ids`, greedy generation from the prompt. Then batched: p0 next to another
/// prompt of the same length, prefill plus a few greedy steps, against p0 alone.
fn run_check(model: &mut Model, golden: &Path) -> Result<()> {
    let dev = Device::Cpu;
    let g = candle::safetensors::load(golden, &dev)
        .with_context(|| format!("reading {}", golden.display()))?;
    let ids_of = |t: &Tensor| -> Result<Vec<u32>> {
        Ok(t.flatten_all()?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?
            .into_iter()
            .map(|v| v as u32)
            .collect())
    };
    if !g.contains_key("p0.input_ids") {
        bail!("{}: no p0.input_ids", golden.display());
    }
    let mut worst_rel = 0f32;
    let mut greedy_ok = true;
    let mut p0 = Vec::new();
    for k in 0.. {
        let Some(ids) = g.get(&format!("p{k}.input_ids")) else {
            break;
        };
        let ids = ids_of(ids)?;
        let t = ids.len();
        let want = g
            .get(&format!("p{k}.logits"))
            .ok_or_else(|| anyhow!("{}: no p{k}.logits", golden.display()))?
            .to_dtype(DType::F32)?;
        let vocab = want.elem_count() / t;
        let want = want.reshape((t, vocab))?;
        let max_ref = want.abs()?.max_all()?.to_scalar::<f32>()?;
        println!("p{k}: {t} tokens, vocab {vocab}, max |golden logit| {max_ref:.4}");
        let mut report = |name: &str, got: &Tensor| -> Result<()> {
            let diff = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let a = got.argmax(D::Minus1)?.to_vec1::<u32>()?;
            let b = want.argmax(D::Minus1)?.to_vec1::<u32>()?;
            let agree = a.iter().zip(&b).filter(|(x, y)| x == y).count();
            println!(
                "  {name}: max |diff| {diff:.3e}, max |diff| / max |golden| {:.3e}, argmax agrees {agree}/{}",
                diff / max_ref,
                a.len()
            );
            worst_rel = worst_rel.max(diff / max_ref);
            Ok(())
        };

        // Prefill path: the last position of each prefix.
        let mut rows = Vec::with_capacity(t);
        for n in 1..=t {
            model.clear_kv_cache();
            let x = Tensor::from_slice(&ids[..n], (1, n), &dev)?;
            rows.push(model.forward(&x, 0)?.squeeze(0)?);
        }
        report("prefill (each prefix)", &Tensor::stack(&rows, 0)?)?;

        // Decode path: one token at a time.
        model.clear_kv_cache();
        let mut rows = Vec::with_capacity(t);
        for (i, &id) in ids.iter().enumerate() {
            let x = Tensor::from_slice(&[id], (1, 1), &dev)?;
            rows.push(model.forward(&x, i)?.squeeze(0)?);
        }
        report("decode (token by token)", &Tensor::stack(&rows, 0)?)?;

        if let Some(gi) = g.get(&format!("p{k}.greedy_ids")) {
            let want_ids = ids_of(gi)?;
            let got = greedy_rows(model, &[ids.clone()], want_ids.len().saturating_sub(1))?;
            let got_ids: Vec<u32> = got
                .iter()
                .map(|l| Ok(l.argmax(D::Minus1)?.to_vec1::<u32>()?[0]))
                .collect::<Result<_>>()?;
            let same = got_ids
                .iter()
                .zip(&want_ids)
                .take_while(|(a, b)| a == b)
                .count();
            println!("  greedy: first {same}/{} tokens match", want_ids.len());
            greedy_ok &= same == want_ids.len();
        }
        if k == 0 {
            p0 = ids;
        }
    }

    // Batched: [p0, other] prefill + 4 greedy steps vs p0 alone.
    let vocab = g["p0.logits"].dims().last().copied().unwrap_or(1);
    let other: Vec<u32> = (0..p0.len())
        .map(|i| ((i * 7919 + 104729 + 13) % vocab) as u32)
        .collect();
    let alone = greedy_rows(model, &[p0.clone()], 4)?;
    let both = greedy_rows(model, &[p0, other], 4)?;
    let mut worst = 0f32;
    for (a, b) in alone.iter().zip(&both) {
        let d = (a.i(0)? - b.i(0)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
        worst = worst.max(d);
    }
    println!("batch 2 vs batch 1 (p0: prefill + 4 greedy decode steps): max |diff| {worst:.3e}");
    model.clear_kv_cache();
    println!(
        "worst max |diff| / max |golden| {worst_rel:.3e}; greedy {}: {}",
        if greedy_ok { "all match" } else { "MISMATCH" },
        if worst_rel < 1e-4 && greedy_ok {
            "AGREE"
        } else {
            "DIFFER"
        }
    );
    Ok(())
}

/// Prefill `prompts` (equal lengths) as one batch, then `steps` greedy decode steps;
/// returns each forward's logits [batch, vocab].
fn greedy_rows(model: &mut Model, prompts: &[Vec<u32>], steps: usize) -> Result<Vec<Tensor>> {
    let dev = Device::Cpu;
    let len = prompts[0].len();
    let flat: Vec<u32> = prompts.iter().flatten().copied().collect();
    model.clear_kv_cache();
    let mut last = model.forward(&Tensor::from_vec(flat, (prompts.len(), len), &dev)?, 0)?;
    let mut out = Vec::with_capacity(steps + 1);
    for s in 0..steps {
        let next = last.argmax(D::Minus1)?.unsqueeze(1)?;
        out.push(std::mem::replace(&mut last, model.forward(&next, len + s)?));
    }
    out.push(last);
    model.clear_kv_cache();
    Ok(out)
}

fn load(dir: &Path, stock: bool) -> Result<(Model, Info)> {
    let path = dir.join("config.json");
    let raw: Value = serde_json::from_str(
        &std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("parsing {}", path.display()))?;
    let (cfg, notes) = candle_config(&raw, stock)?;
    let files = weight_files(dir)?;
    let dev = Device::Cpu;
    // SAFETY: the checkpoint files are not modified while the bench runs.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, &dev)? };
    let get = |k: &str| cfg.get(k).and_then(Value::as_u64).unwrap_or(0) as usize;
    let summary = format!(
        "model: hidden {} ffn {} (dense {}) layers {} (first {} dense) heads {} q_lora {} kv_lora {} experts {}+{} shared top-{} groups {}/{} vocab {}; routing {}",
        get("hidden_size"),
        get("moe_intermediate_size"),
        get("intermediate_size"),
        get("num_hidden_layers"),
        get("first_k_dense_replace"),
        get("num_attention_heads"),
        cfg.get("q_lora_rank").filter(|v| !v.is_null()).map_or("none".to_string(), |v| v.to_string()),
        get("kv_lora_rank"),
        get("n_routed_experts"),
        get("n_shared_experts"),
        get("num_experts_per_tok"),
        get("topk_group"),
        get("n_group"),
        get("vocab_size"),
        if stock {
            "candle stock softmax+greedy (NOT DeepSeek-V3's)"
        } else {
            "DeepSeek-V3 noaux_tc (sigmoid + bias, group-limited)"
        }
    );
    let info = Info {
        vocab: get("vocab_size"),
        max_position: get("max_position_embeddings"),
        summary,
        notes,
    };
    let model = if stock {
        let c: candle_transformers::models::deepseek2::DeepSeekV2Config =
            serde_json::from_value(cfg).context("candle's DeepSeekV2Config")?;
        Model::Stock(candle_transformers::models::deepseek2::DeepSeekV2::new(
            &c, vb,
        )?)
    } else {
        let c: deepseek2_v3::DeepSeekV2Config =
            serde_json::from_value(cfg).context("DeepSeekV2Config (patched deepseek2)")?;
        Model::V3(deepseek2_v3::DeepSeekV2::new(&c, vb)?)
    };
    Ok((model, info))
}

/// The checkpoint's safetensors files: those the index names, else every `*.safetensors`
/// in the directory except `golden.safetensors`.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&index)?)?;
        let names: BTreeSet<&str> = v["weight_map"]
            .as_object()
            .ok_or_else(|| anyhow!("{}: no weight_map", index.display()))?
            .values()
            .filter_map(Value::as_str)
            .collect();
        return Ok(names.into_iter().map(|n| dir.join(n)).collect());
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|e| e == "safetensors")
                && p.file_name().is_some_and(|n| n != "golden.safetensors")
        })
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no *.safetensors in {}", dir.display());
    }
    Ok(files)
}

/// Rewrites a Hugging Face DeepSeek-V3 `config.json` into the fields candle's
/// `DeepSeekV2Config` reads, keeping the math. Errors where candle cannot express the
/// checkpoint's math. Returns the rewritten config and a note per change.
fn candle_config(raw: &Value, stock: bool) -> Result<(Value, Vec<String>)> {
    let mut c = raw
        .as_object()
        .ok_or_else(|| anyhow!("config.json is not an object"))?
        .clone();
    let mut notes = Vec::new();
    let model_type = c
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if !matches!(model_type.as_str(), "deepseek_v3" | "deepseek_v2") {
        bail!(
            "model_type {model_type:?}: this bench reads deepseek_v3 (or deepseek_v2) checkpoints"
        );
    }
    let v3 = model_type != "deepseek_v2";
    if c.get("quantization_config").is_some_and(|v| !v.is_null()) {
        bail!("quantization_config present: candle's deepseek2 would load FP8 weights without their scale_inv (wrong weights); use an f32/bf16 checkpoint");
    }

    // RoPE: transformers 5 writes `rope_parameters {rope_type, rope_theta, ...}`; candle
    // reads top-level `rope_theta` and `rope_scaling {type, ...}`.
    let (params, source) = match c.get("rope_parameters").filter(|v| !v.is_null()) {
        Some(p) => (Some(p.clone()), "rope_parameters"),
        None => (
            c.get("rope_scaling").filter(|v| !v.is_null()).cloned(),
            "rope_scaling",
        ),
    };
    if let (Some(p), "rope_parameters") = (params.as_ref(), source) {
        let theta = p
            .get("rope_theta")
            .and_then(Value::as_f64)
            .ok_or_else(|| anyhow!("rope_parameters.rope_theta missing"))?;
        c.insert("rope_theta".into(), json!(theta));
        notes.push(format!(
            "rope_parameters.rope_theta -> rope_theta = {theta}"
        ));
    }
    let scaling = match params {
        None => Value::Null,
        Some(p) => {
            let kind = p
                .get("rope_type")
                .or_else(|| p.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("default")
                .to_string();
            match kind.as_str() {
                "default" => Value::Null,
                "yarn" => yarn_for_candle(&p, &c, source, &mut notes)?,
                other => {
                    bail!("{source}: rope type {other:?}: candle's deepseek2 supports only yarn")
                }
            }
        }
    };
    c.insert("rope_scaling".into(), scaling);
    c.remove("rope_parameters");
    if c.get("rope_interleave").and_then(Value::as_bool) == Some(false) {
        bail!(
            "rope_interleave: false: candle's deepseek2 always rotates interleaved pairs (rope_i)"
        );
    }

    // Fields candle requires that transformers may leave out.
    if c.get("attention_bias").is_none_or(Value::is_null) {
        c.insert("attention_bias".into(), json!(false));
        notes.push("attention_bias absent -> false (transformers' default)".into());
    }
    if v3 {
        // transformers' DeepseekV3 makes every layer from first_k_dense_replace on an MoE
        // layer; candle also skips layers not divisible by moe_layer_freq.
        if let Some(f) = c
            .get("moe_layer_freq")
            .and_then(Value::as_u64)
            .filter(|f| *f != 1)
        {
            notes.push(format!(
                "moe_layer_freq {f} -> 1 (transformers' DeepseekV3 ignores it)"
            ));
            c.insert("moe_layer_freq".into(), json!(1));
        }
        // transformers' DeepseekV3Config defaults.
        for (k, d) in [("n_group", 8), ("topk_group", 4)] {
            if c.get(k).is_none_or(Value::is_null) {
                c.insert(k.into(), json!(d));
                notes.push(format!("{k} absent -> {d} (transformers' default)"));
            }
        }
        // transformers' DeepseekV3 always routes noaux_tc with sigmoid scores and does not
        // read these fields (transformers 5 does not even write them).
        for (k, want) in [("topk_method", "noaux_tc"), ("scoring_func", "sigmoid")] {
            match c.get(k).and_then(Value::as_str) {
                None => notes.push(format!(
                    "{k} absent -> {want:?} (what transformers' DeepseekV3 does)"
                )),
                Some(v) if v == want => {}
                Some(v) => bail!("{k} = {v:?}, but DeepSeek-V3 routes with {want:?}"),
            }
            c.insert(k.into(), json!(want));
        }
        if stock {
            c.insert("topk_method".into(), json!("greedy"));
            c.insert("scoring_func".into(), json!("softmax"));
            // candle 0.11.1 deepseek2.rs:800-801 divides [n, k] by [n, 1] without
            // broadcasting, so norm_topk_prob with top_k > 1 fails ("shape mismatch in
            // div"); off, candle scales the softmax weights by routed_scaling_factor.
            c.insert("norm_topk_prob".into(), json!(false));
            notes.push(
                "--stock: topk_method noaux_tc -> greedy, scoring_func sigmoid -> softmax, e_score_correction_bias ignored, norm_topk_prob -> false (stock candle errors on it with top_k > 1); weights = softmax top-k x routed_scaling_factor. Same experts per token count and shapes, different experts and logits".into(),
            );
        }
    }
    Ok((Value::Object(c), notes))
}

/// candle's YaRN: `{type: yarn, factor, original_max_position_embeddings, beta_fast,
/// beta_slow, mscale, mscale_all_dim}`, all required; cos/sin are scaled by
/// `get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)` and the softmax scale
/// by `get_mscale(factor, mscale_all_dim)^2`, with floor/ceil on the correction range.
/// transformers uses that ratio only when both mscale and mscale_all_dim are nonzero,
/// else `get_mscale(factor)` (= candle with mscale 1, mscale_all_dim 0).
fn yarn_for_candle(
    p: &Value,
    c: &Map<String, Value>,
    source: &str,
    notes: &mut Vec<String>,
) -> Result<Value> {
    let f = |k: &str| p.get(k).and_then(Value::as_f64);
    let orig = f("original_max_position_embeddings")
        .ok_or_else(|| anyhow!("{source}.original_max_position_embeddings missing"))?;
    let factor = match f("factor") {
        Some(v) => v,
        None => {
            let max = c
                .get("max_position_embeddings")
                .and_then(Value::as_f64)
                .ok_or_else(|| anyhow!("max_position_embeddings missing"))?;
            notes.push(format!(
                "{source}.factor absent -> max_position_embeddings / original = {}",
                max / orig
            ));
            max / orig
        }
    };
    if p.get("truncate").and_then(Value::as_bool) == Some(false) {
        bail!("{source}.truncate = false: candle always floors/ceils the YaRN correction range");
    }
    let beta_fast = f("beta_fast").filter(|v| *v != 0.0).unwrap_or(32.0);
    let beta_slow = f("beta_slow").filter(|v| *v != 0.0).unwrap_or(1.0);
    let mscale = f("mscale").unwrap_or(0.0);
    let mscale_all_dim = f("mscale_all_dim").unwrap_or(0.0);
    let (m, mad) = if mscale != 0.0 && mscale_all_dim != 0.0 {
        (mscale, mscale_all_dim)
    } else if mscale_all_dim == 0.0 {
        notes.push(format!(
            "{source}: mscale {mscale} / mscale_all_dim {mscale_all_dim} -> 1 / 0 (transformers then uses get_mscale(factor) for cos/sin and no softmax factor)"
        ));
        (1.0, 0.0)
    } else {
        bail!("{source}: mscale 0 with mscale_all_dim {mscale_all_dim} is not expressible in candle's YaRN");
    };
    let get_mscale = |s: f64, m: f64| {
        if s <= 1.0 {
            1.0
        } else {
            0.1 * m * s.ln() + 1.0
        }
    };
    if let Some(af) = f("attention_factor") {
        let candle_af = get_mscale(factor, m) / get_mscale(factor, mad);
        if (af - candle_af).abs() > 1e-6 * candle_af.abs().max(1.0) {
            bail!("{source}.attention_factor {af} differs from candle's {candle_af}");
        }
    }
    if source == "rope_parameters" {
        notes.push("rope_parameters (yarn) -> rope_scaling {type: yarn, ...}".into());
    }
    Ok(json!({
        "type": "yarn",
        "factor": factor,
        "original_max_position_embeddings": orig as u64,
        "beta_fast": beta_fast,
        "beta_slow": beta_slow,
        "mscale": m,
        "mscale_all_dim": mad,
    }))
}
