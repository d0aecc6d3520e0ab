//! Mixtral (8x7B, 8x22B, and the 16-expert "GPT-4 shape"): GQA, every layer a MoE layer,
//! softmax top-k renormalised, no shared expert. Tensors under `block_sparse_moe`.

use serde_json::{Map, Value};

use crate::checkpoint::{Checkpoint, WeightError};
use crate::config::{
    AttentionKind, Common, ConfigError, FamilyShape, GqaOptions, ModelConfig, RouterKind,
    gqa_heads, no_sliding_window, positive, rope_config,
};
use crate::layers::Ffn;

pub(super) fn config(obj: &Map<String, Value>, c: Common) -> Result<ModelConfig, ConfigError> {
    let (num_kv_heads, head_dim) = gqa_heads(obj, c.hidden_size, c.num_heads)?;
    // Mixtral's config has `sliding_window` and no switch for it.
    no_sliding_window(obj, true, c.max_position_embeddings)?;
    let intermediate_size = positive(obj, "intermediate_size")?;
    let shape = FamilyShape {
        intermediate_size,
        moe_intermediate_size: intermediate_size,
        num_kv_heads,
        head_dim,
        attention: AttentionKind::Gqa(GqaOptions::default()),
        // transformers' Mixtral default theta.
        rope: rope_config(obj, head_dim, false, 1e6, c.max_position_embeddings)?,
        num_experts: positive(obj, "num_local_experts")?,
        experts_per_token: positive(obj, "num_experts_per_tok")?,
        moe_layers: (0..c.num_layers).collect(),
        router: RouterKind::SoftmaxTopK { renormalize: true },
        shared_expert: None,
    };
    Ok(c.with(shape))
}

pub(super) fn ffn(ckpt: &Checkpoint, cfg: &ModelConfig, layer: usize) -> Result<Ffn, WeightError> {
    super::routed(ckpt, cfg, layer, None)
}
