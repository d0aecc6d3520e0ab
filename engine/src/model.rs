//! The dense part of a MoE model (embeddings, attention, norms, routers, shared experts,
//! dense MLPs, LM head) and its forward pass over a batch of sequence chunks: one loop
//! for every family, over layers a family composed at load time (`crate::family`). The
//! routed experts sit behind [`Experts`]: this code routes, whoever implements the trait
//! computes.

use std::path::Path;

use crate::checkpoint::{Checkpoint, WeightError};
use crate::config::{ConfigError, ModelConfig};
use crate::cuda::CudaError;
use crate::experts::{ExpertError, Experts};
use crate::kv_cache::{KvCacheError, PagedKvCache, SeqCache};
use crate::layers::{Attention, Layer, MlaMode, Span};
use crate::ops::{CpuWeights, Linear, Rope, rms_norm};
use crate::router::Routing;

mod pipeline;

pub use pipeline::max_micro_batches;

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

/// Everything of a MoE model except the routed experts: embeddings, every layer's
/// attention, norms, router, shared experts and dense MLPs, the LM head.
pub struct Model {
    config: ModelConfig,
    embed: Vec<f32>,
    layers: Vec<Layer>,
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogitsFor {
    /// One row per chunk: the logits after its last token (serving).
    LastToken,
    /// One row per token of every chunk (verification).
    EveryToken,
    /// Per chunk: every token's row where `true` (a prompt whose logprobs were asked
    /// for), the last token's where `false`. The LM head runs only on the rows kept.
    Chunks(Vec<bool>),
}

impl LogitsFor {
    /// The batch rows whose logits are computed, in order, for chunks of `lens` tokens
    /// (empty chunks have none).
    pub fn rows(&self, lens: &[usize]) -> Vec<usize> {
        let mut rows = Vec::with_capacity(lens.len());
        let mut start = 0;
        for (i, &len) in lens.iter().enumerate() {
            let every = match self {
                LogitsFor::LastToken => false,
                LogitsFor::EveryToken => true,
                LogitsFor::Chunks(flags) => flags.get(i).copied().unwrap_or(false),
            };
            if every {
                rows.extend(start..start + len);
            } else if len > 0 {
                rows.push(start + len - 1);
            }
            start += len;
        }
        rows
    }
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

impl Model {
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Loads the dense weights only; experts are loaded separately (see `ExpertStore`).
    pub fn load(dir: &Path) -> Result<(Self, Checkpoint), ModelError> {
        Self::load_as(dir, CpuWeights::Auto)
    }

    /// [`Model::load`] with the dense matrices held as `policy` says (`--cpu-weights`);
    /// the checkpoint returned carries the policy, so experts read through it follow it.
    pub fn load_as(dir: &Path, policy: CpuWeights) -> Result<(Self, Checkpoint), ModelError> {
        let config = ModelConfig::from_dir(dir)?;
        let ckpt = Checkpoint::open_quantized(dir, config.quantization)?.with_cpu_weights(policy);
        let model = Self::from_checkpoint(config, &ckpt)?;
        Ok((model, ckpt))
    }

    pub fn from_checkpoint(config: ModelConfig, ckpt: &Checkpoint) -> Result<Self, WeightError> {
        let c = &config;
        let (h, v) = (c.hidden_size, c.vocab_size);
        let embed = ckpt.load("model.embed_tokens.weight", &[v, h])?;
        let layers = (0..c.num_layers)
            .map(|l| c.family.load_layer(ckpt, c, l))
            .collect::<Result<Vec<_>, _>>()?;
        let norm = ckpt.load("model.norm.weight", &[h])?;
        let lm_head = if c.tie_word_embeddings && !ckpt.contains("lm_head.weight") {
            None
        } else {
            Some(ckpt.load_linear("lm_head.weight", v, h)?)
        };
        let rope = Rope::from_config(&c.rope, c.max_position_embeddings);
        Ok(Model {
            config,
            embed,
            layers,
            norm,
            lm_head,
            rope,
        })
    }

    /// A KV cache for this model holding `bytes` of cache.
    pub fn new_kv_cache(&self, block_size: usize, bytes: usize) -> PagedKvCache {
        PagedKvCache::for_model(&self.config, block_size, bytes)
    }

    /// How MLA layers attend: absorbed (the default) or expanded per cached token
    /// (for checks and benchmarks). No effect on GQA models.
    pub fn set_mla_mode(&mut self, mode: MlaMode) {
        for layer in &mut self.layers {
            if let Attention::Mla(mla) = &mut layer.attention {
                mla.set_mode(mode);
            }
        }
    }

    /// Runs every chunk of `batch` through the model as one batch of tokens, writing
    /// their keys and values into `kv`, and returns logits (and, if `trace_routing`, the
    /// routing of every layer that routes).
    pub fn forward(
        &self,
        kv: &mut PagedKvCache,
        experts: &dyn Experts,
        batch: &mut [SeqChunk<'_>],
        logits_for: LogitsFor,
        trace_routing: bool,
    ) -> Result<ForwardOutput, ModelError> {
        self.forward_split(kv, experts, batch, logits_for, trace_routing, 1)
    }

    /// [`Model::forward`] with the batch split into up to `micro_batches` micro-batches
    /// that take turns (one's experts away while another attends; `pipeline`). Splits
    /// that could change a bit of the result are not made: the output is the unsplit one.
    pub fn forward_split(
        &self,
        kv: &mut PagedKvCache,
        experts: &dyn Experts,
        batch: &mut [SeqChunk<'_>],
        logits_for: LogitsFor,
        trace_routing: bool,
        micro_batches: usize,
    ) -> Result<ForwardOutput, ModelError> {
        admit(&self.config, self.rope.max_positions(), kv, batch)?;
        let c = &self.config;
        let h = c.hidden_size;
        let eps = c.rms_norm_eps as f32;
        let spans = spans(batch);
        let total: usize = spans.iter().map(|s| s.len).sum();

        let lens: Vec<usize> = spans.iter().map(|s| s.len).collect();
        let parts = micro_batches.min(pipeline::max_micro_batches(total, batch.len()));
        let mut micros: Vec<pipeline::MicroBatch> = pipeline::split(&lens, parts)
            .into_iter()
            .map(|chunks| {
                let mut x = Vec::new();
                for chunk in &batch[chunks.clone()] {
                    for &t in chunk.tokens {
                        x.extend_from_slice(&self.embed[t as usize * h..(t as usize + 1) * h]);
                    }
                }
                pipeline::MicroBatch::new(chunks.clone(), &spans[chunks], x, h)
            })
            .collect();
        self.run_layers(kv, experts, batch, &mut micros, trace_routing)?;
        let x: Vec<f32> = micros.iter().flat_map(|m| m.x.iter().copied()).collect();
        let routing_trace = trace_routing.then(|| merge_traces(&micros));

        for (chunk, s) in batch.iter_mut().zip(&spans) {
            kv.advance(chunk.cache, s.len);
        }

        let rows = logits_for.rows(&lens);
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

/// Each expert layer's routing over the whole batch, from the micro-batches' (in order).
fn merge_traces(micros: &[pipeline::MicroBatch]) -> Vec<Routing> {
    let layers = micros.first().map_or(0, |m| m.trace.len());
    (0..layers)
        .map(|l| {
            let mut all = Routing {
                k: micros[0].trace[l].k,
                ..Routing::default()
            };
            for m in micros {
                all.experts.extend_from_slice(&m.trace[l].experts);
                all.weights.extend_from_slice(&m.trace[l].weights);
            }
            all
        })
        .collect()
}

/// Where every chunk of `batch` sits in the batch's rows and in its sequence.
pub(crate) fn spans(batch: &[SeqChunk<'_>]) -> Vec<Span> {
    let mut spans = Vec::with_capacity(batch.len());
    let mut row = 0;
    for chunk in batch {
        spans.push(Span {
            row,
            start: chunk.cache.len(),
            len: chunk.tokens.len(),
        });
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
