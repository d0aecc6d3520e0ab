//! `synth` checkpoints of every family load into the engine and run: config.json parses,
//! every tensor the loaders ask for is there with its shape, a forward pass gives finite,
//! varied logits, at any depth (a 61-layer, 256-expert DeepSeek-V3 included).

use std::path::Path;
use std::time::Instant;

use switchyard_engine::config::{AttentionKind, RouterKind};
use switchyard_engine::synth::{SynthDType, SynthError, SynthSpec, write_checkpoint};
use switchyard_engine::{
    ExpertSelection, ExpertStore, Family, LogitsFor, Model, ModelConfig, PagedKvCache, SeqCache,
    SeqChunk,
};

fn base(family: Family) -> SynthSpec {
    SynthSpec {
        family,
        hidden: 32,
        ffn: 48,
        layers: 3,
        heads: 4,
        kv_heads: 2,
        experts: 8,
        top_k: 2,
        vocab: 300,
        dtype: SynthDType::Bf16,
        seed: 7,
        max_position: 256,
        shard_bytes: 1 << 30,
        ..SynthSpec::default()
    }
}

/// Loads the checkpoint in `dir`, runs a prompt then one decode token through it, and
/// checks the logits and the routing; returns the config and the prompt's logits.
fn load_and_run(dir: &Path) -> (ModelConfig, Vec<f32>) {
    let cfg = ModelConfig::from_dir(dir).unwrap();
    let (model, ckpt) = Model::load(dir).unwrap();
    assert_eq!(model.config(), &cfg);
    let experts = ExpertStore::load(&ckpt, model.config(), &ExpertSelection::All).unwrap();
    assert_eq!(
        experts.held().len(),
        cfg.expert_layers() * cfg.num_experts,
        "every routed expert loads"
    );
    let mut kv = PagedKvCache::for_model(&cfg, 16, 16 << 20);
    let mut seq = SeqCache::new();
    let prompt: Vec<u32> = (0..12u32)
        .map(|i| (i * 37 + 5) % cfg.vocab_size as u32)
        .collect();
    let out = model
        .forward(
            &mut kv,
            &experts,
            &mut [SeqChunk {
                tokens: &prompt,
                cache: &mut seq,
            }],
            LogitsFor::EveryToken,
            true,
        )
        .unwrap();
    assert_eq!(out.rows, prompt.len());
    assert_eq!(out.logits.len(), prompt.len() * cfg.vocab_size);
    check_logits(&out.logits, cfg.vocab_size);
    let routing = out.routing.as_ref().unwrap();
    assert_eq!(routing.len(), cfg.expert_layers());
    for r in routing {
        assert_eq!(r.tokens(), prompt.len());
        for t in 0..r.tokens() {
            let (chosen, weights) = r.token(t);
            let mut distinct = chosen.to_vec();
            distinct.sort_unstable();
            distinct.dedup();
            assert_eq!(distinct.len(), cfg.experts_per_token);
            assert!(weights.iter().all(|w| w.is_finite() && *w > 0.0));
        }
    }

    let next = [3u32];
    let step = model
        .forward(
            &mut kv,
            &experts,
            &mut [SeqChunk {
                tokens: &next,
                cache: &mut seq,
            }],
            LogitsFor::LastToken,
            false,
        )
        .unwrap();
    check_logits(&step.logits, cfg.vocab_size);
    kv.release(&mut seq);
    (cfg, out.logits)
}

/// Finite, not all equal, and on a sane scale: unit-scale weights keep activations in
/// range however deep the model is.
fn check_logits(logits: &[f32], vocab: usize) {
    assert!(logits.iter().all(|v| v.is_finite()), "non-finite logits");
    for row in logits.chunks_exact(vocab) {
        let mean = row.iter().sum::<f32>() / vocab as f32;
        let std = (row.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / vocab as f32).sqrt();
        assert!(std > 0.05, "logits nearly constant: std {std}");
        let max = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(max < 100.0, "logits out of range: max |logit| {max}");
    }
}

fn write(spec: &SynthSpec) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(spec, dir.path()).unwrap();
    dir
}

#[test]
fn mixtral_loads_and_runs() {
    let dir = write(&base(Family::Mixtral));
    let (cfg, _) = load_and_run(dir.path());
    assert_eq!(cfg.family, Family::Mixtral);
    assert_eq!(cfg.moe_layers, vec![0, 1, 2]);
}

#[test]
fn qwen2_moe_loads_and_runs() {
    let spec = SynthSpec {
        moe_ffn: Some(16),
        dense_layers: vec![1],
        ..base(Family::Qwen2Moe)
    };
    let dir = write(&spec);
    let (cfg, _) = load_and_run(dir.path());
    assert_eq!(cfg.family, Family::Qwen2Moe);
    assert_eq!(cfg.moe_layers, vec![0, 2]);
    assert_eq!(cfg.shared_expert.map(|s| s.intermediate_size), Some(64));

    // No shared expert, sharded, f16.
    let spec = SynthSpec {
        shared_ffn: Some(0),
        dense_layers: vec![],
        dtype: SynthDType::F16,
        shard_bytes: 40_000,
        ..spec
    };
    let dir = write(&spec);
    assert!(dir.path().join("model.safetensors.index.json").exists());
    let (cfg, _) = load_and_run(dir.path());
    assert_eq!(cfg.shared_expert, None);
}

#[test]
fn qwen3_moe_loads_and_runs() {
    let spec = SynthSpec {
        head_dim: Some(12),
        moe_ffn: Some(16),
        dense_layers: vec![0],
        yarn_factor: Some(2.0),
        ..base(Family::Qwen3Moe)
    };
    let dir = write(&spec);
    let (cfg, _) = load_and_run(dir.path());
    assert_eq!(cfg.family, Family::Qwen3Moe);
    assert_eq!((cfg.head_dim, cfg.moe_intermediate_size), (12, 16));
    assert_eq!(cfg.moe_layers, vec![1, 2]);
}

#[test]
fn deepseek_v3_loads_and_runs() {
    let spec = SynthSpec {
        kv_heads: 4,
        moe_ffn: Some(16),
        q_lora_rank: Some(24),
        kv_lora_rank: Some(12),
        qk_nope_head_dim: Some(6),
        qk_rope_head_dim: Some(4),
        v_head_dim: Some(10),
        n_group: Some(4),
        topk_group: Some(2),
        n_shared_experts: Some(2),
        yarn_factor: Some(4.0),
        ..base(Family::DeepseekV3)
    };
    let dir = write(&spec);
    let (cfg, _) = load_and_run(dir.path());
    assert_eq!(cfg.family, Family::DeepseekV3);
    assert_eq!(cfg.moe_layers, vec![1, 2]);
    assert!(matches!(cfg.attention, AttentionKind::Mla(d) if d.q_lora_rank == Some(24)));

    // Plain q_proj, every layer routing, no shared expert, sharded.
    let spec = SynthSpec {
        q_lora_rank: None,
        first_k_dense_replace: Some(0),
        n_shared_experts: Some(0),
        yarn_factor: None,
        shard_bytes: 50_000,
        ..spec
    };
    let dir = write(&spec);
    let (cfg, _) = load_and_run(dir.path());
    assert_eq!(cfg.moe_layers, vec![0, 1, 2]);
    assert_eq!(cfg.shared_expert, None);
    assert!(matches!(cfg.attention, AttentionKind::Mla(d) if d.q_lora_rank.is_none()));
}

/// DeepSeek-V3's depth and expert count at a tiny width: 61 layers, 256 experts, top-8,
/// defaults for everything else. Writing it must take seconds, not minutes.
#[test]
fn deepseek_v3_full_depth_and_experts_at_tiny_width() {
    let spec = SynthSpec {
        family: Family::DeepseekV3,
        hidden: 16,
        ffn: 32,
        moe_ffn: Some(8),
        layers: 61,
        heads: 2,
        kv_heads: 2,
        experts: 256,
        top_k: 8,
        vocab: 512,
        max_position: 4096,
        yarn_factor: Some(40.0),
        ..SynthSpec::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    write_checkpoint(&spec, dir.path()).unwrap();
    let wrote = started.elapsed();
    eprintln!(
        "wrote a 61-layer x 256-expert DeepSeek-V3 ({} bytes) in {:.2}s",
        spec.total_bytes().unwrap(),
        wrote.as_secs_f64()
    );
    assert!(wrote.as_secs() < 60, "writing took {wrote:?}");

    let cfg = ModelConfig::from_dir(dir.path()).unwrap();
    assert_eq!(cfg.num_layers, 61);
    assert_eq!(cfg.expert_layers(), 60);
    assert_eq!(cfg.num_experts, 256);
    assert_eq!(cfg.experts_per_token, 8);
    assert_eq!(
        cfg.router,
        RouterKind::SigmoidGrouped {
            groups: 8,
            topk_groups: 4,
            renormalize: true,
            scaling: 2.5
        }
    );
    let started = Instant::now();
    load_and_run(dir.path());
    eprintln!(
        "loaded and ran it in {:.2}s",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn impossible_shapes_are_refused_before_anything_is_written() {
    let ds = base(Family::DeepseekV3);
    for (spec, field) in [
        (
            SynthSpec {
                kv_heads: 4,
                n_group: Some(3),
                ..ds.clone()
            },
            "n_group",
        ),
        (
            SynthSpec {
                kv_heads: 4,
                top_k: 5,
                n_group: Some(4),
                topk_group: Some(2),
                ..ds.clone()
            },
            "top_k",
        ),
        (SynthSpec { ..ds.clone() }, "kv_heads"),
        (
            SynthSpec {
                dense_layers: vec![9],
                ..base(Family::Qwen3Moe)
            },
            "dense_layers",
        ),
        (
            SynthSpec {
                q_lora_rank: Some(8),
                ..base(Family::Mixtral)
            },
            "q_lora_rank",
        ),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("ckpt");
        let err = write_checkpoint(&spec, &out).unwrap_err();
        assert!(
            matches!(&err, SynthError::InvalidSpec { field: f, .. } if *f == field),
            "{field}: {err}"
        );
        assert!(err.to_string().contains(field), "{err}");
        assert!(!out.exists());
    }
}
