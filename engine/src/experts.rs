//! Expert FFNs and the line between the router and the experts.
//!
//! The caller routes; the experts compute. [`Experts`] is that line: the model hands it
//! normalised hidden states and each token's (expert, weight) choices and gets back the
//! weighted sum of expert outputs per token. [`ExpertStore`] is the in-process
//! implementation and also what an expert node runs behind its gRPC service; the
//! coordinator's remote implementation fans the same call out over the network.

use std::collections::BTreeSet;

use rayon::prelude::*;

use crate::checkpoint::{Checkpoint, WeightError};
use crate::config::ModelConfig;
use crate::ops::{Linear, silu};
use crate::router::Routing;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExpertError {
    #[error("layer {layer} out of range (model has {layers})")]
    BadLayer { layer: usize, layers: usize },
    #[error("expert {expert} out of range (model has {experts})")]
    BadExpert { expert: u32, experts: usize },
    #[error("expert {expert} of layer {layer} is not held here")]
    NotHeld { layer: usize, expert: u32 },
    #[error("token index {token} out of range ({tokens} tokens sent)")]
    BadToken { token: u32, tokens: usize },
    #[error("activation length {len} is not tokens x hidden ({tokens} x {hidden})")]
    BadShape {
        len: usize,
        tokens: usize,
        hidden: usize,
    },
    #[error("routing weight {weight} for token {token} is not finite")]
    BadWeight { token: u32, weight: f32 },
    #[error("experts unavailable: {0}")]
    Unavailable(String),
}

/// The routed experts of a MoE layer, wherever they run.
pub trait Experts: Send + Sync {
    /// `layer` is the expert layer (the `layer`-th decoder layer that routes, see
    /// `ModelConfig::moe_layers`); `x` is `[tokens, hidden]` (the post-attention-normalised
    /// states), `routing` has the same number of tokens; returns `[tokens, hidden]`:
    /// `sum_k w_k * FFN_{e_k}(x_t)`.
    fn forward(&self, layer: usize, x: &[f32], routing: &Routing) -> Result<Vec<f32>, ExpertError>;
}

/// The model shape a unit of expert work is checked against, whichever device runs it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WorkShape {
    pub layers: usize,
    pub experts: usize,
    pub hidden: usize,
}

impl WorkShape {
    /// Every check that must pass before any expert is computed, in the order the errors
    /// are reported; `holds(expert)` says whether `layer`'s expert is held here.
    pub fn check(
        &self,
        layer: usize,
        x_len: usize,
        tokens: usize,
        work: &[Assignment],
        holds: impl Fn(u32) -> bool,
    ) -> Result<(), ExpertError> {
        if layer >= self.layers {
            return Err(ExpertError::BadLayer {
                layer,
                layers: self.layers,
            });
        }
        if tokens.checked_mul(self.hidden) != Some(x_len) {
            return Err(ExpertError::BadShape {
                len: x_len,
                tokens,
                hidden: self.hidden,
            });
        }
        for a in work {
            if a.expert as usize >= self.experts {
                return Err(ExpertError::BadExpert {
                    expert: a.expert,
                    experts: self.experts,
                });
            }
            if !holds(a.expert) {
                return Err(ExpertError::NotHeld {
                    layer,
                    expert: a.expert,
                });
            }
            if a.token as usize >= tokens {
                return Err(ExpertError::BadToken {
                    token: a.token,
                    tokens,
                });
            }
            if !a.weight.is_finite() {
                return Err(ExpertError::BadWeight {
                    token: a.token,
                    weight: a.weight,
                });
            }
        }
        Ok(())
    }
}

/// One (token, expert, weight) triple of work: the unit the wire carries.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Assignment {
    /// Row of the activation matrix this assignment refers to.
    pub token: u32,
    pub expert: u32,
    pub weight: f32,
}

/// SwiGLU expert: `down(silu(gate(x)) * up(x))`, with gate and up stacked into one
/// `[2F, H]` matrix (gate rows first, the layout of fused Hub checkpoints) so both come
/// out of one matrix product.
#[derive(Debug, Clone)]
pub struct ExpertFfn {
    pub gate_up: Linear,
    pub down: Linear,
}

impl ExpertFfn {
    pub fn ffn_dim(&self) -> usize {
        self.down.in_dim
    }

    /// Bytes its weights take in memory.
    pub fn bytes(&self) -> u64 {
        (self.gate_up.weight.bytes() + self.down.weight.bytes()) as u64
    }

    /// `[rows, H] -> [rows, H]`.
    pub fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let f = self.ffn_dim();
        let gu = self.gate_up.forward(x, rows);
        let mut act = vec![0.0; rows * f];
        for (a, row) in act.chunks_exact_mut(f).zip(gu.chunks_exact(2 * f)) {
            let (gate, up) = row.split_at(f);
            for ((a, g), u) in a.iter_mut().zip(gate).zip(up) {
                *a = silu(*g) * u;
            }
        }
        self.down.forward(&act, rows)
    }
}

/// Which experts to load.
#[derive(Debug, Clone, PartialEq)]
pub enum ExpertSelection {
    All,
    /// (layer, expert) pairs.
    Only(BTreeSet<(usize, usize)>),
}

impl ExpertSelection {
    /// The same experts in every one of `num_layers` expert layers.
    pub fn in_every_layer(experts: &[usize], num_layers: usize) -> Self {
        ExpertSelection::Only(
            (0..num_layers)
                .flat_map(|l| experts.iter().map(move |e| (l, *e)))
                .collect(),
        )
    }

    pub fn contains(&self, layer: usize, expert: usize) -> bool {
        match self {
            ExpertSelection::All => true,
            ExpertSelection::Only(set) => set.contains(&(layer, expert)),
        }
    }
}

/// Where a layer's expert tensors live in a checkpoint.
enum ExpertLayout {
    /// `{prefix}.experts.{e}.w1/w3/w2.weight`, one tensor per expert and projection.
    PerExpert,
    /// `{prefix}.experts.gate_up_proj` `[E, 2F, H]` and `{prefix}.experts.down_proj` `[E, H, F]`.
    Fused { gate_up: String, down: String },
}

/// The MoE block's name prefix of decoder layer `layer`: Mixtral checkpoints say
/// `block_sparse_moe`, newer writers and other families `mlp`.
pub(crate) fn moe_prefix(ckpt: &Checkpoint, layer: usize) -> Result<String, WeightError> {
    let candidates = [
        format!("model.layers.{layer}.block_sparse_moe"),
        format!("model.layers.{layer}.mlp"),
    ];
    for p in &candidates {
        if ckpt.contains(&format!("{p}.gate.weight")) {
            return Ok(p.clone());
        }
    }
    Err(WeightError::Missing {
        name: format!("{}.gate.weight", candidates[0]),
        location: ckpt
            .file_of("model.embed_tokens.weight")
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "the checkpoint".into()),
    })
}

fn layout(ckpt: &Checkpoint, prefix: &str) -> ExpertLayout {
    for suffix in ["", ".weight"] {
        let gate_up = format!("{prefix}.experts.gate_up_proj{suffix}");
        let down = format!("{prefix}.experts.down_proj{suffix}");
        if ckpt.contains(&gate_up) || ckpt.contains(&down) {
            return ExpertLayout::Fused { gate_up, down };
        }
    }
    ExpertLayout::PerExpert
}

/// Per-expert tensor names (gate, up, down) as the Hub's checkpoints spell them: Mixtral's
/// `w1`/`w3`/`w2`, everyone else's `gate_proj`/`up_proj`/`down_proj`.
const EXPERT_PROJ_NAMES: [[&str; 3]; 2] =
    [["w1", "w3", "w2"], ["gate_proj", "up_proj", "down_proj"]];

/// Loads expert `expert` of expert layer `layer` (the `layer`-th layer that routes),
/// reading only its own bytes.
pub fn load_expert(
    ckpt: &Checkpoint,
    cfg: &ModelConfig,
    layer: usize,
    expert: usize,
) -> Result<ExpertFfn, WeightError> {
    let (h, f, e) = (cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts);
    let decoder_layer = cfg
        .decoder_layer_of(layer)
        .ok_or_else(|| WeightError::Missing {
            name: format!("experts of expert layer {layer}"),
            location: format!("a model with {} layers that route", cfg.expert_layers()),
        })?;
    let prefix = moe_prefix(ckpt, decoder_layer)?;
    let (gate_up, down) = match layout(ckpt, &prefix) {
        ExpertLayout::PerExpert => {
            let p = format!("{prefix}.experts.{expert}");
            let [gate, up, down] = EXPERT_PROJ_NAMES
                .into_iter()
                .find(|[g, _, _]| ckpt.contains(&format!("{p}.{g}.weight")))
                .unwrap_or(EXPERT_PROJ_NAMES[1]);
            let gate_up = ckpt
                .load_weights(&format!("{p}.{gate}.weight"), &[f, h])?
                .append_rows(ckpt.load_weights(&format!("{p}.{up}.weight"), &[f, h])?);
            (
                gate_up,
                ckpt.load_weights(&format!("{p}.{down}.weight"), &[h, f])?,
            )
        }
        ExpertLayout::Fused { gate_up, down } => (
            ckpt.load_slice_weights(&gate_up, &[e, 2 * f, h], expert)?,
            ckpt.load_slice_weights(&down, &[e, h, f], expert)?,
        ),
    };
    // Held as the checkpoint's policy says: by default bf16 when its values are bf16 and
    // FP8 codes when they are FP8 (no result changes either way).
    Ok(ExpertFfn {
        gate_up: Linear::from_weights(gate_up, 2 * f, h),
        down: Linear::from_weights(down, h, f),
    })
}

/// The experts held in this process, indexed by (layer, expert).
pub struct ExpertStore {
    hidden: usize,
    num_layers: usize,
    num_experts: usize,
    slots: Vec<Option<ExpertFfn>>,
}

impl ExpertStore {
    /// A store for every expert layer of `cfg`, holding nothing yet.
    pub fn empty(cfg: &ModelConfig) -> Self {
        ExpertStore {
            hidden: cfg.hidden_size,
            num_layers: cfg.expert_layers(),
            num_experts: cfg.num_experts,
            slots: (0..cfg.expert_layers() * cfg.num_experts)
                .map(|_| None)
                .collect(),
        }
    }

    pub fn load(
        ckpt: &Checkpoint,
        cfg: &ModelConfig,
        selection: &ExpertSelection,
    ) -> Result<Self, WeightError> {
        let mut store = Self::empty(cfg);
        for layer in 0..cfg.expert_layers() {
            for expert in 0..cfg.num_experts {
                if selection.contains(layer, expert) {
                    store.insert(layer, expert, load_expert(ckpt, cfg, layer, expert)?);
                }
            }
        }
        Ok(store)
    }

    pub fn insert(&mut self, layer: usize, expert: usize, ffn: ExpertFfn) {
        self.slots[layer * self.num_experts + expert] = Some(ffn);
    }

    pub fn remove(&mut self, layer: usize, expert: usize) -> Option<ExpertFfn> {
        self.slots
            .get_mut(layer * self.num_experts + expert)
            .and_then(Option::take)
    }

    pub fn get(&self, layer: usize, expert: usize) -> Option<&ExpertFfn> {
        if layer >= self.num_layers || expert >= self.num_experts {
            return None;
        }
        self.slots[layer * self.num_experts + expert].as_ref()
    }

    /// (layer, expert) pairs held, in order.
    pub fn held(&self) -> Vec<(usize, usize)> {
        (0..self.slots.len())
            .filter(|i| self.slots[*i].is_some())
            .map(|i| (i / self.num_experts, i % self.num_experts))
            .collect()
    }

    pub fn hidden(&self) -> usize {
        self.hidden
    }

    pub fn num_layers(&self) -> usize {
        self.num_layers
    }

    pub fn num_experts(&self) -> usize {
        self.num_experts
    }

    /// Checks a unit of work against the model before any of it is computed.
    pub fn validate(
        &self,
        layer: usize,
        x_len: usize,
        tokens: usize,
        work: &[Assignment],
    ) -> Result<(), ExpertError> {
        let shape = WorkShape {
            layers: self.num_layers,
            experts: self.num_experts,
            hidden: self.hidden,
        };
        shape.check(layer, x_len, tokens, work, |e| {
            self.get(layer, e as usize).is_some()
        })
    }

    /// For each token row of `x` (`[tokens, hidden]`), the weighted sum of its assigned
    /// experts' outputs. Tokens are grouped by expert so each expert runs one matrix
    /// product over all of its tokens; experts run in parallel.
    pub fn combine(
        &self,
        layer: usize,
        x: &[f32],
        tokens: usize,
        work: &[Assignment],
    ) -> Result<Vec<f32>, ExpertError> {
        self.validate(layer, x.len(), tokens, work)?;
        let h = self.hidden;
        let mut groups: Vec<Vec<(u32, f32)>> = vec![Vec::new(); self.num_experts];
        for a in work {
            groups[a.expert as usize].push((a.token, a.weight));
        }
        let results: Vec<(usize, Vec<f32>)> = groups
            .par_iter()
            .enumerate()
            .filter(|(_, g)| !g.is_empty())
            .map(|(e, g)| {
                let mut rows = Vec::with_capacity(g.len() * h);
                for (t, _) in g {
                    let t = *t as usize;
                    rows.extend_from_slice(&x[t * h..(t + 1) * h]);
                }
                // validate() proved every expert in `work` is held.
                let y = match self.get(layer, e) {
                    Some(ffn) => ffn.forward(&rows, g.len()),
                    None => Vec::new(),
                };
                (e, y)
            })
            .collect();
        let mut out = vec![0.0f32; tokens * h];
        // Summed in expert order, as transformers' index_add_ loop does.
        for (e, y) in results {
            for ((t, w), y_row) in groups[e].iter().zip(y.chunks_exact(h)) {
                let t = *t as usize;
                for (o, v) in out[t * h..(t + 1) * h].iter_mut().zip(y_row) {
                    *o += w * v;
                }
            }
        }
        Ok(out)
    }
}

/// Flattens a routing into per-(token, expert) work items.
pub fn assignments(routing: &Routing) -> Vec<Assignment> {
    (0..routing.tokens())
        .flat_map(|t| {
            let (experts, weights) = routing.token(t);
            experts.iter().zip(weights).map(move |(e, w)| Assignment {
                token: t as u32,
                expert: *e,
                weight: *w,
            })
        })
        .collect()
}

impl Experts for ExpertStore {
    fn forward(&self, layer: usize, x: &[f32], routing: &Routing) -> Result<Vec<f32>, ExpertError> {
        self.combine(layer, x, routing.tokens(), &assignments(routing))
    }
}
