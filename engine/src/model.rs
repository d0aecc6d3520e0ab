//! The dense part of a Mixtral model (embeddings, attention, norms, router, LM head) and
//! its forward pass over a batch of sequence chunks. The experts sit behind [`Experts`]:
//! this code routes, whoever implements the trait computes.

use std::path::Path;

use rayon::prelude::*;

use crate::attention::{AttentionShape, causal_attention};
use crate::checkpoint::{Checkpoint, WeightError};
use crate::config::{ConfigError, ModelConfig};
use crate::cuda::CudaError;
use crate::experts::{ExpertError, Experts, moe_prefix};
use crate::kv_cache::{KvCacheError, PagedKvCache, SeqCache};
use crate::ops::{Linear, Rope, rms_norm};
use crate::router::{Routing, route_softmax_topk};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Weights(#[from] WeightError),
    #[error("token id {token} is outside the vocabulary (size {vocab})")]
    TokenOutOfRange { token: u32, vocab: usize },
    #[error("sequence of {len} positions exceeds the model's context of {max}")]
    ContextTooLong { len: usize, max: usize },
    #[error("empty input: a sequence chunk has no tokens")]
    EmptyChunk,
    #[error(transparent)]
    KvCache(#[from] KvCacheError),
    #[error(transparent)]
    Experts(#[from] ExpertError),
    /// The GPU running the dense layers failed or is missing.
    #[error(transparent)]
    Device(#[from] CudaError),
}

struct DenseLayer {
    input_norm: Vec<f32>,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    post_norm: Vec<f32>,
    router: Linear,
}

/// Everything of a Mixtral model except the experts.
pub struct Mixtral {
    config: ModelConfig,
    embed: Vec<f32>,
    layers: Vec<DenseLayer>,
    norm: Vec<f32>,
    /// `None` when the LM head is tied to the embeddings.
    lm_head: Option<Linear>,
    rope: Rope,
}

/// One sequence's part of a batch: the tokens to feed now (a whole prompt, a prefill
/// chunk or one decode token) and its KV cache; positions continue from `cache.len()`.
pub struct SeqChunk<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut SeqCache,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// One row per chunk: the logits after its last token (serving).
    LastToken,
    /// One row per token of every chunk (verification).
    EveryToken,
}

pub struct ForwardOutput {
    /// `[rows, vocab]`.
    pub logits: Vec<f32>,
    pub rows: usize,
    /// Per layer, the routing of every token of the batch (when asked for).
    pub routing: Option<Vec<Routing>>,
}

impl ForwardOutput {
    pub fn row(&self, i: usize) -> &[f32] {
        let v = self.logits.len() / self.rows.max(1);
        &self.logits[i * v..(i + 1) * v]
    }
}

impl Mixtral {
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Loads the dense weights only; experts are loaded separately (see `ExpertStore`).
    pub fn load(dir: &Path) -> Result<(Self, Checkpoint), ModelError> {
        let config = ModelConfig::from_dir(dir)?;
        let ckpt = Checkpoint::open(dir)?;
        let model = Self::from_checkpoint(config, &ckpt)?;
        Ok((model, ckpt))
    }

    pub fn from_checkpoint(config: ModelConfig, ckpt: &Checkpoint) -> Result<Self, WeightError> {
        let c = &config;
        let (h, v) = (c.hidden_size, c.vocab_size);
        let linear = |name: String, out: usize, inp: usize| -> Result<Linear, WeightError> {
            Ok(Linear::new(ckpt.load(&name, &[out, inp])?, out, inp))
        };
        let embed = ckpt.load("model.embed_tokens.weight", &[v, h])?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let p = format!("model.layers.{l}");
            let moe = moe_prefix(ckpt, l)?;
            layers.push(DenseLayer {
                input_norm: ckpt.load(&format!("{p}.input_layernorm.weight"), &[h])?,
                q: linear(format!("{p}.self_attn.q_proj.weight"), c.q_dim(), h)?,
                k: linear(format!("{p}.self_attn.k_proj.weight"), c.kv_dim(), h)?,
                v: linear(format!("{p}.self_attn.v_proj.weight"), c.kv_dim(), h)?,
                o: linear(format!("{p}.self_attn.o_proj.weight"), h, c.q_dim())?,
                post_norm: ckpt.load(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                router: linear(format!("{moe}.gate.weight"), c.num_experts, h)?,
            });
        }
        let norm = ckpt.load("model.norm.weight", &[h])?;
        let lm_head = if c.tie_word_embeddings && !ckpt.contains("lm_head.weight") {
            None
        } else {
            Some(linear("lm_head.weight".into(), v, h)?)
        };
        let rope = Rope::new(c.head_dim, c.rope_theta, c.max_position_embeddings);
        Ok(Mixtral {
            config,
            embed,
            layers,
            norm,
            lm_head,
            rope,
        })
    }

    /// A KV cache for this model holding `bytes` of keys and values.
    pub fn new_kv_cache(&self, block_size: usize, bytes: usize) -> PagedKvCache {
        PagedKvCache::with_budget(
            self.config.num_layers,
            self.config.kv_dim(),
            block_size,
            bytes,
        )
    }

    fn attention_shape(&self) -> AttentionShape {
        AttentionShape {
            num_heads: self.config.num_heads,
            num_kv_heads: self.config.num_kv_heads,
            head_dim: self.config.head_dim,
        }
    }

    /// Runs every chunk of `batch` through the model as one batch of tokens, writing
    /// their keys and values into `kv`, and returns logits (and, if `trace_routing`, each
    /// layer's routing).
    pub fn forward(
        &self,
        kv: &mut PagedKvCache,
        experts: &dyn Experts,
        batch: &mut [SeqChunk<'_>],
        logits_for: LogitsFor,
        trace_routing: bool,
    ) -> Result<ForwardOutput, ModelError> {
        admit(&self.config, self.rope.max_positions(), kv, batch)?;
        let c = &self.config;
        let (h, qd, kvd) = (c.hidden_size, c.q_dim(), c.kv_dim());
        let eps = c.rms_norm_eps as f32;
        let total: usize = batch.iter().map(|b| b.tokens.len()).sum();
        let spans = spans(batch);

        let mut x = Vec::with_capacity(total * h);
        for chunk in batch.iter() {
            for &t in chunk.tokens {
                x.extend_from_slice(&self.embed[t as usize * h..(t as usize + 1) * h]);
            }
        }

        let mut normed = vec![0.0f32; total * h];
        let mut routing_trace = trace_routing.then(|| Vec::with_capacity(self.layers.len()));
        for (li, layer) in self.layers.iter().enumerate() {
            rms_norm(&x, &layer.input_norm, eps, &mut normed);
            let mut q = layer.q.forward(&normed, total);
            let mut k = layer.k.forward(&normed, total);
            let v = layer.v.forward(&normed, total);
            for &(row, start, n) in &spans {
                for i in 0..n {
                    let r = row + i;
                    self.rope.apply(&mut q[r * qd..(r + 1) * qd], start + i);
                    self.rope.apply(&mut k[r * kvd..(r + 1) * kvd], start + i);
                }
            }
            for (chunk, &(row, start, n)) in batch.iter().zip(&spans) {
                for i in 0..n {
                    let r = row + i;
                    kv.write(
                        li,
                        chunk.cache,
                        start + i,
                        &k[r * kvd..(r + 1) * kvd],
                        &v[r * kvd..(r + 1) * kvd],
                    );
                }
            }
            let kv_ref = &*kv;
            let shape = self.attention_shape();
            let attn: Vec<Vec<f32>> = batch
                .par_iter()
                .zip(&spans)
                .map(|(chunk, &(row, start, n))| {
                    let s = start + n;
                    let mut keys = vec![0.0f32; s * kvd];
                    let mut values = vec![0.0f32; s * kvd];
                    kv_ref.gather(li, chunk.cache, s, &mut keys, &mut values);
                    causal_attention(
                        shape,
                        &q[row * qd..(row + n) * qd],
                        n,
                        start,
                        &keys,
                        &values,
                    )
                })
                .collect();
            let attn: Vec<f32> = attn.concat();
            let o = layer.o.forward(&attn, total);
            for (xv, ov) in x.iter_mut().zip(&o) {
                *xv += ov;
            }

            rms_norm(&x, &layer.post_norm, eps, &mut normed);
            let router_logits = layer.router.forward(&normed, total);
            let routing = route_softmax_topk(&router_logits, c.num_experts, c.experts_per_token);
            let moe = experts.forward(li, &normed, &routing)?;
            if moe.len() != x.len() {
                return Err(ExpertError::BadShape {
                    len: moe.len(),
                    tokens: total,
                    hidden: h,
                }
                .into());
            }
            for (xv, mv) in x.iter_mut().zip(&moe) {
                *xv += mv;
            }
            if let Some(trace) = routing_trace.as_mut() {
                trace.push(routing);
            }
        }

        for (chunk, &(_, _, n)) in batch.iter_mut().zip(&spans) {
            kv.advance(chunk.cache, n);
        }

        let rows: Vec<usize> = match logits_for {
            LogitsFor::EveryToken => (0..total).collect(),
            LogitsFor::LastToken => spans.iter().map(|&(row, _, n)| row + n - 1).collect(),
        };
        let mut picked = Vec::with_capacity(rows.len() * h);
        for &r in &rows {
            picked.extend_from_slice(&x[r * h..(r + 1) * h]);
        }
        let mut final_normed = vec![0.0f32; picked.len()];
        rms_norm(&picked, &self.norm, eps, &mut final_normed);
        let logits = match &self.lm_head {
            Some(head) => head.forward(&final_normed, rows.len()),
            None => {
                let mut out = vec![0.0; rows.len() * c.vocab_size];
                crate::ops::matmul_wt(
                    &final_normed,
                    rows.len(),
                    h,
                    &self.embed,
                    c.vocab_size,
                    &mut out,
                    gemm::Parallelism::Rayon(0),
                );
                out
            }
        };
        Ok(ForwardOutput {
            logits,
            rows: rows.len(),
            routing: routing_trace,
        })
    }
}

/// (first row in the batch, first position, tokens) of every chunk.
pub(crate) fn spans(batch: &[SeqChunk<'_>]) -> Vec<(usize, usize, usize)> {
    let mut spans = Vec::with_capacity(batch.len());
    let mut row = 0;
    for chunk in batch {
        spans.push((row, chunk.cache.len(), chunk.tokens.len()));
        row += chunk.tokens.len();
    }
    spans
}

/// Checks a batch against the model and reserves its KV blocks (the CPU forward's and
/// the CUDA forward's bookkeeping alike). On error nothing in the batch has been changed
/// except blocks reserved for earlier chunks, which stay with their sequences and are
/// used by their next step.
pub(crate) fn admit(
    config: &ModelConfig,
    max_positions: usize,
    kv: &mut PagedKvCache,
    batch: &mut [SeqChunk<'_>],
) -> Result<(), ModelError> {
    let mut needed = 0;
    for chunk in batch.iter() {
        if chunk.tokens.is_empty() {
            return Err(ModelError::EmptyChunk);
        }
        if let Some(&token) = chunk
            .tokens
            .iter()
            .find(|t| **t as usize >= config.vocab_size)
        {
            return Err(ModelError::TokenOutOfRange {
                token,
                vocab: config.vocab_size,
            });
        }
        let len = chunk.cache.len() + chunk.tokens.len();
        if len > max_positions {
            return Err(ModelError::ContextTooLong {
                len,
                max: max_positions,
            });
        }
        needed += kv.blocks_for(len).saturating_sub(chunk.cache.num_blocks());
    }
    if needed > kv.free_blocks() {
        return Err(KvCacheError::OutOfBlocks {
            needed,
            free: kv.free_blocks(),
        }
        .into());
    }
    for chunk in batch.iter_mut() {
        kv.reserve(chunk.cache, chunk.tokens.len())?;
    }
    Ok(())
}
