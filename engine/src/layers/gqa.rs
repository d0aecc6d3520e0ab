//! Grouped-query attention, with the options the GQA families add: q/k/v biases
//! (Qwen2-MoE), an output bias, and per-head RMSNorm of q and k before RoPE (Qwen3-MoE).

use super::{AttentionInput, Projection};
use crate::attention::{AttentionShape, KvRows, causal_attention};
use crate::checkpoint::{Checkpoint, WeightError};
use crate::config::{AttentionKind, GqaOptions, ModelConfig};
use crate::kv_cache::PagedKvCache;
use crate::ops::rms_norm;

pub struct Gqa {
    q: Projection,
    k: Projection,
    v: Projection,
    o: Projection,
    /// Per-head RMSNorm weights (`[head_dim]`) of q and k.
    qk_norm: Option<(Vec<f32>, Vec<f32>)>,
    eps: f32,
    shape: AttentionShape,
}

impl Gqa {
    pub fn load(ckpt: &Checkpoint, cfg: &ModelConfig, p: &str) -> Result<Self, WeightError> {
        let opts = match &cfg.attention {
            AttentionKind::Gqa(o) => *o,
            AttentionKind::Mla(_) => GqaOptions::default(),
        };
        let (h, qd, kvd, d) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim(), cfg.head_dim);
        let qk_norm = if opts.qk_norm {
            Some((
                ckpt.load(&format!("{p}.q_norm.weight"), &[d])?,
                ckpt.load(&format!("{p}.k_norm.weight"), &[d])?,
            ))
        } else {
            None
        };
        Ok(Gqa {
            q: Projection::load(ckpt, &format!("{p}.q_proj"), qd, h, opts.qkv_bias)?,
            k: Projection::load(ckpt, &format!("{p}.k_proj"), kvd, h, opts.qkv_bias)?,
            v: Projection::load(ckpt, &format!("{p}.v_proj"), kvd, h, opts.qkv_bias)?,
            o: Projection::load(ckpt, &format!("{p}.o_proj"), h, qd, opts.o_bias)?,
            qk_norm,
            eps: cfg.rms_norm_eps as f32,
            shape: AttentionShape::gqa(cfg.num_heads, cfg.num_kv_heads, d),
        })
    }

    pub(super) fn forward(
        &self,
        input: &AttentionInput<'_, '_>,
        x: &[f32],
        kv: &mut PagedKvCache,
    ) -> Vec<f32> {
        let total: usize = input.spans.iter().map(|s| s.len).sum();
        let d = self.shape.head_dim;
        let qd = self.shape.num_heads * d;
        let kvd = self.shape.num_kv_heads * d;
        let mut q = self.q.forward(x, total);
        let mut k = self.k.forward(x, total);
        let v = self.v.forward(x, total);
        if let Some((qn, kn)) = &self.qk_norm {
            let norm_heads = |t: &mut [f32], w: &[f32]| {
                let mut out = vec![0.0; t.len()];
                rms_norm(t, w, self.eps, &mut out);
                t.copy_from_slice(&out);
            };
            norm_heads(&mut q, qn);
            norm_heads(&mut k, kn);
        }
        for (pos, r) in input.positions() {
            input.rope.apply(&mut q[r * qd..(r + 1) * qd], pos);
            input.rope.apply(&mut k[r * kvd..(r + 1) * kvd], pos);
        }
        input.write_kv(kv, &k, kvd, &v, kvd);
        let kv = &*kv;
        let attn = input.per_chunk(|cache, s| {
            let seen = s.start + s.len;
            let mut keys = vec![0.0f32; seen * kvd];
            let mut values = vec![0.0f32; seen * kvd];
            kv.gather(input.layer, cache, seen, &mut keys, &mut values);
            let rows = |data| KvRows { data, stride: kvd };
            causal_attention(
                self.shape,
                &q[s.row * qd..(s.row + s.len) * qd],
                s.len,
                s.start,
                rows(&keys),
                rows(&values),
            )
        });
        self.o.forward(&attn, total)
    }
}
