//! Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B) and Qwen3-MoE (30B-A3B, 235B-A22B): GQA (with
//! q/k/v biases in Qwen2, per-head q/k RMSNorm in Qwen3), softmax top-k renormalised only
//! when `norm_topk_prob`, dense MLP layers where `mlp_only_layers` or
//! `decoder_sparse_step` say so, and in Qwen2 a shared expert gated by
//! `sigmoid(shared_expert_gate(x))`.

use serde_json::{Map, Value};

use super::Family;
use crate::checkpoint::{Checkpoint, WeightError};
use crate::config::{
    AttentionKind, Common, ConfigError, FamilyShape, GqaOptions, ModelConfig, RouterKind,
    SharedExpertConfig, bool_field, count, gqa_heads, layer_list, no_sliding_window, positive,
    positive_any, rope_config,
};
use crate::layers::Ffn;

pub(super) fn config(obj: &Map<String, Value>, c: Common) -> Result<ModelConfig, ConfigError> {
    let qwen2 = c.family == Family::Qwen2Moe;
    let (num_kv_heads, head_dim) = gqa_heads(obj, c.hidden_size, c.num_heads)?;
    no_sliding_window(
        obj,
        bool_field(obj, "use_sliding_window", false)?,
        c.max_position_embeddings,
    )?;
    let attention = if qwen2 {
        GqaOptions {
            // transformers' Qwen2-MoE default: published configs do not say.
            qkv_bias: bool_field(obj, "qkv_bias", true)?,
            o_bias: false,
            qk_norm: false,
        }
    } else {
        let bias = bool_field(obj, "attention_bias", false)?;
        GqaOptions {
            qkv_bias: bias,
            o_bias: bias,
            qk_norm: true,
        }
    };
    let num_experts = positive_any(obj, &["num_experts", "num_local_experts"])?;
    let sparse_step = positive(obj, "decoder_sparse_step").or_else(|e| match e {
        ConfigError::Missing(_) => Ok(1),
        other => Err(other),
    })?;
    let mlp_only = layer_list(obj, "mlp_only_layers")?;
    if let Some(l) = mlp_only.iter().find(|l| **l >= c.num_layers) {
        return Err(ConfigError::Invalid {
            field: "mlp_only_layers",
            problem: format!("names layer {l}, the model has {}", c.num_layers),
        });
    }
    // transformers: `(layer not in mlp_only_layers) and (layer + 1) % decoder_sparse_step == 0`.
    let moe_layers = (0..c.num_layers)
        .filter(|l| !mlp_only.contains(l) && (l + 1) % sparse_step == 0)
        .collect();
    let shared_expert = if qwen2 {
        match count(obj, "shared_expert_intermediate_size", 0)? {
            0 => None,
            n => Some(SharedExpertConfig {
                intermediate_size: n,
                gated: true,
            }),
        }
    } else {
        None
    };
    let shape = FamilyShape {
        intermediate_size: positive(obj, "intermediate_size")?,
        moe_intermediate_size: positive(obj, "moe_intermediate_size")?,
        num_kv_heads,
        head_dim,
        attention: AttentionKind::Gqa(attention),
        rope: rope_config(obj, head_dim, false, 10000.0, c.max_position_embeddings)?,
        num_experts,
        experts_per_token: positive(obj, "num_experts_per_tok")?,
        moe_layers,
        router: RouterKind::SoftmaxTopK {
            renormalize: bool_field(obj, "norm_topk_prob", false)?,
        },
        shared_expert,
    };
    Ok(c.with(shape))
}

pub(super) fn ffn(ckpt: &Checkpoint, cfg: &ModelConfig, layer: usize) -> Result<Ffn, WeightError> {
    super::dense_or_routed(ckpt, cfg, layer, "shared_expert")
}
