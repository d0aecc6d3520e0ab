//! DeepSeek-V3 / R1 and Kimi K2: multi-head latent attention with YaRN RoPE (interleaved
//! pairs), the first `first_k_dense_replace` layers dense MLPs, the rest MoE layers with
//! `n_shared_experts` shared experts and group-limited sigmoid routing (`noaux_tc`).
//! Defaults for absent fields are transformers' `DeepseekV3Config`'s.

use serde_json::{Map, Value};

use crate::checkpoint::{Checkpoint, WeightError};
use crate::config::{
    AttentionKind, Common, ConfigError, FamilyShape, MlaDims, ModelConfig, RouterKind,
    SharedExpertConfig, bool_field, count, optional_positive, positive, positive_any,
    positive_float, rope_config,
};
use crate::layers::{Attention, Ffn, Mla};

pub(super) fn config(obj: &Map<String, Value>, c: Common) -> Result<ModelConfig, ConfigError> {
    if bool_field(obj, "attention_bias", false)? {
        return Err(ConfigError::Invalid {
            field: "attention_bias",
            problem: "is true; DeepSeek-V3 checkpoints have no attention biases and they are not supported".into(),
        });
    }
    for (field, want) in [("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")] {
        if let Some(v) = obj.get(field).filter(|v| !v.is_null())
            && v.as_str() != Some(want)
        {
            return Err(ConfigError::Invalid {
                field,
                problem: format!("is {v}; only `{want}` (DeepSeek-V3's) is supported"),
            });
        }
    }
    if count(obj, "moe_layer_freq", 1)? != 1 {
        return Err(ConfigError::Invalid {
            field: "moe_layer_freq",
            problem: "must be 1 (every layer after first_k_dense_replace routes)".into(),
        });
    }
    let dims = MlaDims {
        q_lora_rank: optional_positive(obj, "q_lora_rank")?,
        kv_lora_rank: positive(obj, "kv_lora_rank")?,
        qk_nope_head_dim: positive(obj, "qk_nope_head_dim")?,
        qk_rope_head_dim: positive(obj, "qk_rope_head_dim")?,
        v_head_dim: positive(obj, "v_head_dim")?,
    };
    let num_experts = positive_any(obj, &["n_routed_experts", "num_local_experts"])?;
    let k = positive(obj, "num_experts_per_tok")?;
    let groups = count(obj, "n_group", 8)?;
    let topk_groups = count(obj, "topk_group", 4)?;
    if groups == 0 || num_experts % groups != 0 {
        return Err(ConfigError::Invalid {
            field: "n_group",
            problem: format!("{groups} groups do not divide {num_experts} experts"),
        });
    }
    if topk_groups == 0 || topk_groups > groups {
        return Err(ConfigError::Invalid {
            field: "topk_group",
            problem: format!("{topk_groups} is not between 1 and n_group {groups}"),
        });
    }
    if k > topk_groups * (num_experts / groups) {
        return Err(ConfigError::Invalid {
            field: "num_experts_per_tok",
            problem: format!(
                "{k} experts cannot be chosen from {topk_groups} groups of {}",
                num_experts / groups
            ),
        });
    }
    let scaling = match obj.get("routed_scaling_factor") {
        None | Some(Value::Null) => 2.5,
        Some(_) => positive_float(obj, "routed_scaling_factor")?,
    };
    let first_dense = count(obj, "first_k_dense_replace", 3)?;
    let moe_intermediate_size = positive(obj, "moe_intermediate_size")?;
    let shared_expert = match count(obj, "n_shared_experts", 1)? {
        0 => None,
        n => Some(SharedExpertConfig {
            intermediate_size: moe_intermediate_size * n,
            gated: false,
        }),
    };
    let shape = FamilyShape {
        intermediate_size: positive(obj, "intermediate_size")?,
        moe_intermediate_size,
        num_kv_heads: c.num_heads,
        head_dim: dims.qk_head_dim(),
        attention: AttentionKind::Mla(dims),
        rope: rope_config(
            obj,
            dims.qk_rope_head_dim,
            bool_field(obj, "rope_interleave", true)?,
            10000.0,
            c.max_position_embeddings,
        )?,
        num_experts,
        experts_per_token: k,
        moe_layers: (first_dense..c.num_layers).collect(),
        router: RouterKind::SigmoidGrouped {
            groups,
            topk_groups,
            renormalize: bool_field(obj, "norm_topk_prob", true)?,
            scaling: scaling as f32,
        },
        shared_expert,
    };
    Ok(c.with(shape))
}

pub(super) fn attention(
    ckpt: &Checkpoint,
    cfg: &ModelConfig,
    layer_prefix: &str,
) -> Result<Attention, WeightError> {
    Ok(Attention::Mla(Mla::load(
        ckpt,
        cfg,
        &format!("{layer_prefix}.self_attn"),
    )?))
}

pub(super) fn ffn(ckpt: &Checkpoint, cfg: &ModelConfig, layer: usize) -> Result<Ffn, WeightError> {
    super::dense_or_routed(ckpt, cfg, layer, "shared_experts")
}
