//! The blocks every family is composed of: one decoder layer is a pre-norm attention
//! ([`Attention`]: GQA or MLA) and a pre-norm feed-forward ([`Ffn`]: a dense MLP, or a
//! router, routed experts behind [`crate::experts::Experts`] and an optional shared expert). Families
//! (`crate::family`) choose the variants and the tensor names; the forward loop in
//! `crate::model` runs them all alike.

mod gqa;
mod mla;

pub use gqa::Gqa;
pub use mla::{Mla, MlaMode};

use crate::checkpoint::{Checkpoint, WeightError};
use crate::config::{ModelConfig, RouterKind};
use crate::experts::{ExpertError, ExpertFfn};
use crate::kv_cache::{PagedKvCache, SeqCache};
use crate::model::SeqChunk;
use crate::ops::{Linear, Rope};
use crate::router::{GroupedSigmoid, Routing, route_softmax_topk};

/// One chunk's place in a batch: its first row, its first position, its token count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub row: usize,
    pub start: usize,
    pub len: usize,
}

/// What attention needs besides its own weights: the batch's chunks (their caches), where
/// each sits in the batch, and the rotary tables.
pub struct AttentionInput<'a, 'b> {
    pub batch: &'a [SeqChunk<'b>],
    pub spans: &'a [Span],
    pub rope: &'a Rope,
    pub layer: usize,
}

impl AttentionInput<'_, '_> {
    /// Every token's (position, batch row): the order rotary embeddings and cache writes
    /// walk the batch in.
    pub fn positions(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.spans
            .iter()
            .flat_map(|s| (0..s.len).map(move |i| (s.start + i, s.row + i)))
    }

    /// Writes every token's cache rows: row `r` of `k` (`kd` wide) and of `v` (`vd` wide,
    /// 0 for MLA) at its position.
    pub fn write_kv(&self, kv: &mut PagedKvCache, k: &[f32], kd: usize, v: &[f32], vd: usize) {
        for (chunk, s) in self.batch.iter().zip(self.spans) {
            for i in 0..s.len {
                let r = s.row + i;
                let (k, v) = (&k[r * kd..(r + 1) * kd], &v[r * vd..(r + 1) * vd]);
                kv.write(self.layer, chunk.cache, s.start + i, k, v);
            }
        }
    }

    /// `f(cache, span)` for every chunk of the batch, in parallel: each chunk attends to its
    /// own sequence. The outputs, in batch order, concatenated.
    pub fn per_chunk(&self, f: impl Fn(&SeqCache, &Span) -> Vec<f32> + Sync) -> Vec<f32> {
        use rayon::prelude::*;
        let outs: Vec<Vec<f32>> = self
            .batch
            .par_iter()
            .zip(self.spans)
            .map(|(chunk, s)| f(chunk.cache, s))
            .collect();
        outs.concat()
    }
}

pub struct Layer {
    pub attn_norm: Vec<f32>,
    pub attention: Attention,
    pub ffn_norm: Vec<f32>,
    pub ffn: Ffn,
}

pub enum Attention {
    Gqa(Gqa),
    Mla(Mla),
}

impl Attention {
    /// GQA with the tensor names every family but DeepSeek uses under `prefix`
    /// (`model.layers.N.self_attn`).
    pub fn gqa(ckpt: &Checkpoint, cfg: &ModelConfig, prefix: &str) -> Result<Self, WeightError> {
        Ok(Attention::Gqa(Gqa::load(ckpt, cfg, prefix)?))
    }

    /// `[tokens, hidden]` normalised states in, `[tokens, hidden]` attention output out;
    /// writes every token's keys and values (or latent) into `kv` first.
    pub fn forward(
        &self,
        input: &AttentionInput<'_, '_>,
        x: &[f32],
        kv: &mut PagedKvCache,
    ) -> Vec<f32> {
        match self {
            Attention::Gqa(a) => a.forward(input, x, kv),
            Attention::Mla(a) => a.forward(input, x, kv),
        }
    }
}

/// A weight with an optional bias: `y = W x (+ b)`.
pub struct Projection {
    pub weight: Linear,
    pub bias: Option<Vec<f32>>,
}

impl Projection {
    /// `{name}.weight` `[out, inp]`, and `{name}.bias` `[out]` when `bias`.
    pub fn load(
        ckpt: &Checkpoint,
        name: &str,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> Result<Self, WeightError> {
        Ok(Projection {
            weight: ckpt.load_linear(&format!("{name}.weight"), out, inp)?,
            bias: if bias {
                Some(ckpt.load(&format!("{name}.bias"), &[out])?)
            } else {
                None
            },
        })
    }

    pub fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let mut y = self.weight.forward(x, rows);
        if let Some(b) = &self.bias {
            for row in y.chunks_exact_mut(b.len()) {
                for (v, b) in row.iter_mut().zip(b) {
                    *v += b;
                }
            }
        }
        y
    }
}

/// A SwiGLU MLP by the names most families use: `{prefix}.{gate,up,down}_proj.weight`.
pub fn load_mlp(
    ckpt: &Checkpoint,
    prefix: &str,
    hidden: usize,
    ffn: usize,
) -> Result<ExpertFfn, WeightError> {
    let gate = ckpt.load_weights(&format!("{prefix}.gate_proj.weight"), &[ffn, hidden])?;
    let up = ckpt.load_weights(&format!("{prefix}.up_proj.weight"), &[ffn, hidden])?;
    Ok(ExpertFfn {
        gate_up: Linear::from_weights(gate.append_rows(up), 2 * ffn, hidden),
        down: ckpt.load_linear(&format!("{prefix}.down_proj.weight"), hidden, ffn)?,
    })
}

pub enum Ffn {
    /// A dense SwiGLU MLP (DeepSeek's first layers, Qwen's `mlp_only_layers`).
    Dense(ExpertFfn),
    Moe(MoeBlock),
}

/// Routed experts (wherever they run) plus an optional shared expert (always here).
pub struct MoeBlock {
    /// This layer's number among the layers that route: the `layer` the experts see.
    pub expert_layer: usize,
    pub router: Router,
    pub shared: Option<SharedExpert>,
}

pub struct SharedExpert {
    pub mlp: ExpertFfn,
    /// Qwen2-MoE: the output is scaled by `sigmoid(gate · x)` (`[1, hidden]`).
    pub gate: Option<Linear>,
}

impl SharedExpert {
    pub fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let mut y = self.mlp.forward(x, rows);
        if let Some(gate) = &self.gate {
            let g = gate.forward(x, rows);
            let h = y.len() / rows.max(1);
            for (row, g) in y.chunks_exact_mut(h).zip(&g) {
                let s = 1.0 / (1.0 + (-g).exp());
                for v in row {
                    *v *= s;
                }
            }
        }
        y
    }
}

/// A MoE layer's router: its weight, the family's rule and, for DeepSeek-V3, the
/// correction bias.
pub struct Router {
    pub weight: Linear,
    pub kind: RouterKind,
    pub k: usize,
    pub correction_bias: Option<Vec<f32>>,
}

impl Router {
    pub fn route(&self, x: &[f32], rows: usize) -> Routing {
        let logits = self.weight.forward(x, rows);
        let e = self.weight.out_dim;
        match self.kind {
            RouterKind::SoftmaxTopK { renormalize } => {
                route_softmax_topk(&logits, e, self.k, renormalize)
            }
            RouterKind::SigmoidGrouped {
                groups,
                topk_groups,
                renormalize,
                scaling,
            } => {
                let zero;
                let bias = match &self.correction_bias {
                    Some(b) => b.as_slice(),
                    None => {
                        zero = vec![0.0; e];
                        &zero
                    }
                };
                GroupedSigmoid {
                    num_experts: e,
                    k: self.k,
                    groups,
                    topk_groups,
                    bias,
                    renormalize,
                    scaling,
                }
                .route(&logits)
            }
        }
    }
}

/// A MoE layer's routed work for one batch, started and not yet added: what
/// [`Ffn::start`] leaves to the caller to dispatch, and the shared expert's output,
/// computed while the routed experts are away.
pub struct RoutedWork {
    pub expert_layer: usize,
    pub routing: Routing,
    pub shared: Option<Vec<f32>>,
}

impl RoutedWork {
    /// Adds the routed experts' answer and then the shared expert's output into `x`.
    pub fn finish(&self, x: &mut [f32], routed: Vec<f32>) -> Result<(), ExpertError> {
        if routed.len() != x.len() {
            let tokens = self.routing.tokens();
            return Err(ExpertError::BadShape {
                len: routed.len(),
                tokens,
                hidden: x.len() / tokens.max(1),
            });
        }
        add(x, &routed);
        if let Some(shared) = &self.shared {
            add(x, shared);
        }
        Ok(())
    }
}

impl Ffn {
    /// Starts this layer's feed-forward for `normed` (`[rows, hidden]`): a dense MLP adds
    /// its output into `x` now; a MoE layer routes, runs its shared expert, and returns the
    /// routed work for the caller to send to the experts and [`RoutedWork::finish`].
    pub fn start(&self, normed: &[f32], rows: usize, x: &mut [f32]) -> Option<RoutedWork> {
        match self {
            Ffn::Dense(mlp) => {
                add(x, &mlp.forward(normed, rows));
                None
            }
            Ffn::Moe(moe) => Some(RoutedWork {
                expert_layer: moe.expert_layer,
                routing: moe.router.route(normed, rows),
                shared: moe.shared.as_ref().map(|s| s.forward(normed, rows)),
            }),
        }
    }
}

pub(crate) fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
