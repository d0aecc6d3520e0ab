//! Random MoE checkpoints (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3) in the exact
//! Hugging Face Hub layout (config.json, safetensors shards with the Hub's tensor names,
//! tokenizer files), so benchmarks and big-shape tests can run at realistic shapes without
//! downloading anything.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use safetensors::{Dtype, View};

use crate::family::Family;

/// Elements per independently seeded chunk: small enough to spread one tensor over all
/// cores, large enough that seeding a ChaCha stream per chunk costs nothing. Part of the
/// output format: changing it changes every generated value.
const CHUNK_ELEMS: usize = 1 << 16;

/// Router weights are scaled up so that top-k choices are decided by clear margins.
const ROUTER_SCALE: f32 = 4.0;

/// Half-width of the uniform noise added to the 1.0 of norm weights.
const NORM_NOISE: f32 = 0.05;

/// Half-width of DeepSeek-V3's router correction bias: small against the sigmoid scores
/// it shifts, so it nudges the choice of experts without deciding it.
const CORRECTION_BIAS_BOUND: f32 = 0.05;

/// Standard deviation of Qwen2-MoE's q/k/v biases.
const QKV_BIAS_STD: f32 = 0.1;

/// Router skew ([`SynthSpec::router_skew`] > 0): the hidden coordinate that carries the
/// routers' per-expert offsets. Every token embedding holds [`SKEW_DC`] there; no
/// attention, MLP or expert reads it (their input columns there are 0) or writes it
/// (their output rows there are 0), so the residual stream keeps exactly that value at
/// every depth, and the post-attention norms' weight there is exactly 1. A router row's
/// entry there is then a per-expert logit offset: `offset_e * SKEW_DC / rms(residual)`.
/// The offsets follow a per-layer permutation of the ranks and are calibrated (see
/// `zipf_offsets`) so that top-k routing with the random rows' noise gives rank `r` a
/// share proportional to `r^-S`; each layer's entries are scaled by the residual's
/// expected RMS there (see `RESIDUAL_GROWTH`), which grows with depth.
pub const SKEW_COORD: usize = 0;

/// The value of [`SKEW_COORD`] in every token embedding when routers are skewed.
const SKEW_DC: f32 = 4.0;

/// Expected variance per coordinate that each sublayer (attention or MLP) adds to the
/// residual stream of these random models, measured (see tests/synth_skew.rs); the
/// residual's variance before layer `l`'s experts is about `1 + growth * (2l+1)`.
/// DeepSeek-V3's (latent attention, shared experts, routed scaling) grows faster.
const RESIDUAL_GROWTH: f64 = 0.35;
const RESIDUAL_GROWTH_DEEPSEEK: f64 = 0.75;

/// DeepSeek-V3 with router skew: its routers' random rows give logits of this standard
/// deviation instead of [`ROUTER_SCALE`], so that its sigmoid scores are not saturated
/// (saturated scores tie, and the correction bias would pick among them).
const SKEW_ROUTER_SCALE_DEEPSEEK: f32 = 1.0;

/// DeepSeek-V3 with router skew: the correction bias's half-width, small against the
/// offsets that make the skew.
const SKEW_CORRECTION_BIAS_BOUND: f32 = 0.002;

/// Ids 0..3 are the special tokens, then the 256 byte-level symbols.
const SPECIAL_TOKENS: [&str; 3] = ["<unk>", "<s>", "</s>"];
pub const MIN_VOCAB: usize = SPECIAL_TOKENS.len() + 256;

/// The chat template of Mixtral-8x7B-Instruct as the fixtures carry it.
const MIXTRAL_CHAT_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}";

/// Text the first BPE merges are learnt from, so that common words become single tokens
/// and encoded prompts have realistic lengths.
const MERGE_CORPUS: &str = "\
Mixture of Experts models route every token to a few experts out of many. \
The router of each layer scores all experts and the top two experts process the token. \
Mixtral has eight experts in every layer and uses two of them for each token, so it runs \
at the speed of a much smaller model while it keeps the knowledge of a larger one. \
The attention layers are shared by all tokens and the experts are feed forward networks. \
So, mixture models are what you do when you're out of ideas, and they work very well. \
El modelo Mixtral se puede ejecutar a la velocidad de un modelo cuatro veces más pequeño. \
Los modelos fundacionales se entrenan con cantidades ingentes de datos y de texto. \
The quick brown fox jumps over the lazy dog. In the beginning there was the word, \
and the word was with the model, and the model was trained on the words of the world. \
Serving a large language model means loading the weights, reading the prompt, \
computing the attention and the experts for every token, and sampling the next token.";

/// Letters that grow tokens once the corpus has no frequent pair left, most common first.
const GROW_LETTERS: &str = "etaoinshrdlcumwfgypbvkjxqz";

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("invalid synthetic spec: `{field}` {reason}")]
    InvalidSpec { field: &'static str, reason: String },
    #[error("unknown dtype {name:?} (expected f32/float32, bf16/bfloat16 or f16/float16)")]
    UnknownDType { name: String },
    #[error("unknown family {name:?} (expected one of: {supported})", supported = Family::SUPPORTED.join(", "))]
    UnknownFamily { name: String },
    #[error("cannot write {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write safetensors file {}: {source}", path.display())]
    Safetensors {
        path: PathBuf,
        #[source]
        source: safetensors::SafeTensorError,
    },
    #[error("cannot serialize {}: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("generated tokenizer for {} does not load: {message}", path.display())]
    Tokenizer { path: PathBuf, message: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SynthDType {
    F32,
    Bf16,
    F16,
}

impl SynthDType {
    pub fn size_bytes(self) -> usize {
        match self {
            SynthDType::F32 => 4,
            SynthDType::Bf16 | SynthDType::F16 => 2,
        }
    }

    /// The name config.json's `torch_dtype` uses.
    pub fn torch_name(self) -> &'static str {
        match self {
            SynthDType::F32 => "float32",
            SynthDType::Bf16 => "bfloat16",
            SynthDType::F16 => "float16",
        }
    }

    fn safetensors_dtype(self) -> Dtype {
        match self {
            SynthDType::F32 => Dtype::F32,
            SynthDType::Bf16 => Dtype::BF16,
            SynthDType::F16 => Dtype::F16,
        }
    }
}

impl FromStr for SynthDType {
    type Err = SynthError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(SynthDType::F32),
            "bf16" | "bfloat16" => Ok(SynthDType::Bf16),
            "f16" | "float16" => Ok(SynthDType::F16),
            _ => Err(SynthError::UnknownDType { name: s.to_owned() }),
        }
    }
}

impl std::fmt::Display for SynthDType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.torch_name())
    }
}

/// The shapes of a random checkpoint. Fields a family does not have must be left at their
/// defaults (`None`, empty): setting one is an error that names it, not a silent no-op.
/// `None` in a family's own optional fields means "derive it from the other shapes"
/// (see each field); [`SynthSpec::resolved`] shows what that gives.
#[derive(Clone, Debug, PartialEq)]
pub struct SynthSpec {
    /// Which family's config.json and tensor names to write.
    pub family: Family,
    pub hidden: usize,
    /// Mixtral: every expert's FFN width (its only `intermediate_size`). Other families:
    /// the width of dense-MLP layers (`intermediate_size`), and of the routed experts too
    /// unless `moe_ffn` is set.
    pub ffn: usize,
    pub layers: usize,
    pub heads: usize,
    /// GQA key/value heads. DeepSeek-V3's latent attention has none of its own: there it
    /// must equal `heads` (what its config.json says).
    pub kv_heads: usize,
    /// GQA only; `None`: `hidden / heads`.
    pub head_dim: Option<usize>,
    /// Routed experts per MoE layer.
    pub experts: usize,
    pub top_k: usize,
    pub vocab: usize,
    pub dtype: SynthDType,
    pub seed: u64,
    pub max_position: usize,
    pub shard_bytes: u64,
    /// Qwen, DeepSeek-V3: each routed expert's FFN width (`moe_intermediate_size`);
    /// `None`: `ffn`. Mixtral: `None` or `ffn` (its experts are `ffn` wide).
    pub moe_ffn: Option<usize>,
    /// Qwen: the layers with a dense MLP of width `ffn` instead of experts
    /// (`mlp_only_layers`).
    pub dense_layers: Vec<usize>,
    /// Qwen2-MoE: the width of the shared expert (with its sigmoid gate) of every MoE layer
    /// (`shared_expert_intermediate_size`); `None`: 4 x `moe_ffn`; `Some(0)`: none.
    pub shared_ffn: Option<usize>,
    /// Qwen, DeepSeek-V3: renormalise the top-k routing weights; `None`: the published
    /// models' value (Qwen2-MoE false, Qwen3-MoE and DeepSeek-V3 true). Mixtral always
    /// renormalises.
    pub norm_topk_prob: Option<bool>,
    /// DeepSeek-V3: queries through a rank-`r` bottleneck (`q_a_proj`, `q_a_layernorm`,
    /// `q_b_proj`); `None`: a plain `q_proj` (DeepSeek-V2-Lite's layout).
    /// [`SynthSpec::default_q_lora_rank`] is what the CLI uses when not told.
    pub q_lora_rank: Option<usize>,
    /// DeepSeek-V3: the cached latent's width; `None`: `hidden / 2`.
    pub kv_lora_rank: Option<usize>,
    /// DeepSeek-V3: per-head query/key dims without RoPE; `None`: `hidden / heads` (at
    /// least 2).
    pub qk_nope_head_dim: Option<usize>,
    /// DeepSeek-V3: per-head (shared-key) RoPE dims, even; `None`: half of
    /// `qk_nope_head_dim`'s default, rounded down to even, at least 2.
    pub qk_rope_head_dim: Option<usize>,
    /// DeepSeek-V3: per-head value dims; `None`: `hidden / heads` (at least 2).
    pub v_head_dim: Option<usize>,
    /// DeepSeek-V3: the first layers, with dense MLPs of width `ffn`; `None`: 1 when there
    /// is more than one layer, else 0.
    pub first_k_dense_replace: Option<usize>,
    /// DeepSeek-V3: expert groups of the router; `None`: the largest of 8, 4, 2, 1 that
    /// divides `experts`.
    pub n_group: Option<usize>,
    /// DeepSeek-V3: groups each token's experts come from; `None`: half of `n_group` (at
    /// least 1), raised if needed until `top_k` experts fit in that many groups.
    pub topk_group: Option<usize>,
    /// DeepSeek-V3: shared experts of width `moe_ffn` each (one MLP `n x moe_ffn` wide);
    /// `None`: 1.
    pub n_shared_experts: Option<usize>,
    /// DeepSeek-V3: the factor on routed experts' weights; `None`: 2.5.
    pub routed_scaling_factor: Option<f64>,
    /// YaRN context extension by this factor (any family): config.json gets a
    /// `rope_scaling` of type yarn, from an original context of `max_position / factor`.
    pub yarn_factor: Option<f64>,
    /// Zipf exponent of expert popularity (any family): with `S > 0`, in every MoE layer
    /// the expert of popularity rank `r` gets a share of the routed tokens roughly
    /// proportional to `r^-S`, and which expert has which rank is a per-layer permutation
    /// drawn from `seed`. `0` (the default) writes today's uniform routers, byte for byte.
    /// See [`SKEW_COORD`] for how.
    pub router_skew: f64,
}

impl Default for SynthSpec {
    /// Mixtral-8x7B as published (32 layers, bf16, the Hub's ~5 GB shards).
    fn default() -> Self {
        Self {
            family: Family::Mixtral,
            hidden: 4096,
            ffn: 14336,
            layers: 32,
            heads: 32,
            kv_heads: 8,
            head_dim: None,
            experts: 8,
            top_k: 2,
            vocab: 32000,
            dtype: SynthDType::Bf16,
            seed: 0,
            max_position: 32768,
            shard_bytes: 5_000_000_000,
            moe_ffn: None,
            dense_layers: Vec::new(),
            shared_ffn: None,
            norm_topk_prob: None,
            q_lora_rank: None,
            kv_lora_rank: None,
            qk_nope_head_dim: None,
            qk_rope_head_dim: None,
            v_head_dim: None,
            first_k_dense_replace: None,
            n_group: None,
            topk_group: None,
            n_shared_experts: None,
            routed_scaling_factor: None,
            yarn_factor: None,
            router_skew: 0.0,
        }
    }
}

/// A validated spec's shapes with every default filled in.
#[derive(Clone, Debug, PartialEq)]
struct Shapes {
    moe_ffn: usize,
    /// Decoder layers with a dense MLP, ascending.
    dense_layers: Vec<usize>,
    /// Qwen2-MoE's gated shared expert, 0 for none.
    shared_ffn: usize,
    norm_topk_prob: bool,
    /// DeepSeek-V3's latent attention and router shapes.
    deepseek: Option<DeepseekShapes>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct DeepseekShapes {
    q_lora_rank: Option<usize>,
    kv_lora_rank: usize,
    qk_nope_head_dim: usize,
    qk_rope_head_dim: usize,
    v_head_dim: usize,
    first_k_dense_replace: usize,
    n_group: usize,
    topk_group: usize,
    n_shared_experts: usize,
    routed_scaling_factor: f64,
}

/// `mixtral`, `qwen2_moe`, `qwen3_moe` or `deepseek_v3` (any case, `-` for `_`).
pub fn parse_family(name: &str) -> Result<Family, SynthError> {
    let normal = name.trim().to_ascii_lowercase().replace('-', "_");
    Family::from_model_type(&normal).ok_or_else(|| SynthError::UnknownFamily {
        name: name.to_owned(),
    })
}

fn invalid<T>(field: &'static str, reason: impl Into<String>) -> Result<T, SynthError> {
    Err(SynthError::InvalidSpec {
        field,
        reason: reason.into(),
    })
}

impl SynthSpec {
    /// Mixtral-8x7B's shapes with `layers` layers (the real model has 32), bf16, and the
    /// Hub's ~5 GB shards.
    pub fn mixtral_8x7b(layers: usize) -> Self {
        Self {
            layers,
            ..Self::default()
        }
    }

    /// The query rank the CLI gives DeepSeek-V3 when not told: 3/4 of `hidden` (at least
    /// 1), so that it differs from `kv_lora_rank`'s default.
    pub fn default_q_lora_rank(hidden: usize) -> usize {
        (hidden.saturating_mul(3) / 4).max(1)
    }

    pub fn validate(&self) -> Result<(), SynthError> {
        let shapes = self.shapes()?;
        self.tensors_of(&shapes)?;
        Ok(())
    }

    /// This spec with every default its family uses filled in (`moe_ffn`, `shared_ffn`,
    /// `norm_topk_prob`, DeepSeek-V3's shapes), after validating it.
    pub fn resolved(&self) -> Result<SynthSpec, SynthError> {
        self.validate()?;
        let s = self.shapes()?;
        let mut out = SynthSpec {
            moe_ffn: Some(s.moe_ffn),
            norm_topk_prob: Some(s.norm_topk_prob),
            ..self.clone()
        };
        match self.family {
            Family::Qwen2Moe | Family::Qwen3Moe => out.dense_layers = s.dense_layers.clone(),
            _ => {}
        }
        if self.family == Family::Qwen2Moe {
            out.shared_ffn = Some(s.shared_ffn);
        }
        if let Some(d) = s.deepseek {
            out.q_lora_rank = d.q_lora_rank;
            out.kv_lora_rank = Some(d.kv_lora_rank);
            out.qk_nope_head_dim = Some(d.qk_nope_head_dim);
            out.qk_rope_head_dim = Some(d.qk_rope_head_dim);
            out.v_head_dim = Some(d.v_head_dim);
            out.first_k_dense_replace = Some(d.first_k_dense_replace);
            out.n_group = Some(d.n_group);
            out.topk_group = Some(d.topk_group);
            out.n_shared_experts = Some(d.n_shared_experts);
            out.routed_scaling_factor = Some(d.routed_scaling_factor);
        }
        Ok(out)
    }

    /// GQA's head dim (`head_dim` or `hidden / heads`); DeepSeek-V3's query/key head dim
    /// is `qk_nope_head_dim + qk_rope_head_dim` instead.
    pub fn effective_head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden / self.heads.max(1))
    }

    /// Decoder layers that route to experts (the engine's expert layers).
    pub fn moe_layers(&self) -> Result<Vec<usize>, SynthError> {
        let s = self.shapes()?;
        Ok((0..self.layers)
            .filter(|l| s.dense_layers.binary_search(l).is_err())
            .collect())
    }

    /// Bytes of tensor data the checkpoint holds (the index's `total_size`).
    pub fn total_bytes(&self) -> Result<u64, SynthError> {
        let shapes = self.shapes()?;
        Ok(self.tensors_of(&shapes)?.iter().map(|t| t.bytes).sum())
    }

    /// Checks shared by all families, then the family's own; fills in defaults.
    fn shapes(&self) -> Result<Shapes, SynthError> {
        for (field, value) in [
            ("hidden", self.hidden),
            ("ffn", self.ffn),
            ("layers", self.layers),
            ("heads", self.heads),
            ("kv_heads", self.kv_heads),
            ("experts", self.experts),
            ("top_k", self.top_k),
            ("max_position", self.max_position),
        ] {
            if value == 0 {
                return invalid(field, "must be positive");
            }
        }
        if self.top_k > self.experts {
            return invalid(
                "top_k",
                format!(
                    "({}) must not exceed experts ({})",
                    self.top_k, self.experts
                ),
            );
        }
        if self.vocab < MIN_VOCAB {
            return invalid(
                "vocab",
                format!(
                    "({}) must be at least {MIN_VOCAB} (3 special tokens + 256 bytes)",
                    self.vocab
                ),
            );
        }
        if u32::try_from(self.vocab).is_err() {
            return invalid("vocab", format!("({}) does not fit token ids", self.vocab));
        }
        if self.shard_bytes == 0 {
            return invalid("shard_bytes", "must be positive");
        }
        if let Some(f) = self.yarn_factor
            && !(f.is_finite() && f >= 1.0)
        {
            return invalid(
                "yarn_factor",
                format!("({f}) must be a finite factor of at least 1"),
            );
        }
        if let Some(f) = self.yarn_factor
            && (self.max_position as f64 / f).round() < 1.0
        {
            return invalid(
                "yarn_factor",
                format!(
                    "({f}) leaves an original context of less than one position (max_position {})",
                    self.max_position
                ),
            );
        }
        if self.moe_ffn == Some(0) {
            return invalid("moe_ffn", "must be positive");
        }
        if !(self.router_skew.is_finite() && self.router_skew >= 0.0) {
            return invalid(
                "router_skew",
                format!(
                    "({}) must be a finite Zipf exponent of at least 0",
                    self.router_skew
                ),
            );
        }
        if self.router_skew > 0.0 && self.hidden < 2 {
            return invalid(
                "router_skew",
                "needs hidden of at least 2: one coordinate carries the routers' offsets",
            );
        }
        let family = self.family;
        let only = |field: &'static str, families: &str| {
            invalid::<()>(
                field,
                format!("applies to {families} only, not to family {family}"),
            )
        };
        let mla_fields = [
            ("q_lora_rank", self.q_lora_rank.is_some()),
            ("kv_lora_rank", self.kv_lora_rank.is_some()),
            ("qk_nope_head_dim", self.qk_nope_head_dim.is_some()),
            ("qk_rope_head_dim", self.qk_rope_head_dim.is_some()),
            ("v_head_dim", self.v_head_dim.is_some()),
            (
                "first_k_dense_replace",
                self.first_k_dense_replace.is_some(),
            ),
            ("n_group", self.n_group.is_some()),
            ("topk_group", self.topk_group.is_some()),
            ("n_shared_experts", self.n_shared_experts.is_some()),
            (
                "routed_scaling_factor",
                self.routed_scaling_factor.is_some(),
            ),
        ];
        if family != Family::DeepseekV3
            && let Some((field, _)) = mla_fields.iter().find(|(_, set)| *set)
        {
            only(field, "deepseek_v3")?;
        }
        let qwen = matches!(family, Family::Qwen2Moe | Family::Qwen3Moe);
        if !qwen && !self.dense_layers.is_empty() {
            only(
                "dense_layers",
                "qwen2_moe and qwen3_moe (deepseek_v3 has first_k_dense_replace)",
            )?;
        }
        if family != Family::Qwen2Moe && self.shared_ffn.is_some() {
            only("shared_ffn", "qwen2_moe (deepseek_v3 has n_shared_experts)")?;
        }

        if family == Family::DeepseekV3 {
            return self.deepseek_shapes();
        }
        self.check_gqa()?;
        let moe_ffn = self.moe_ffn.unwrap_or(self.ffn);
        match family {
            Family::Mixtral => {
                if moe_ffn != self.ffn {
                    return invalid(
                        "moe_ffn",
                        format!(
                            "({moe_ffn}) differs from ffn ({}): Mixtral's experts are `ffn` wide, its only FFN width",
                            self.ffn
                        ),
                    );
                }
                if self.norm_topk_prob == Some(false) {
                    return invalid(
                        "norm_topk_prob",
                        "cannot be false for Mixtral, which always renormalises",
                    );
                }
                Ok(Shapes {
                    moe_ffn,
                    dense_layers: Vec::new(),
                    shared_ffn: 0,
                    norm_topk_prob: true,
                    deepseek: None,
                })
            }
            _ => {
                let mut dense = self.dense_layers.clone();
                dense.sort_unstable();
                dense.dedup();
                if let Some(l) = dense.iter().find(|l| **l >= self.layers) {
                    return invalid(
                        "dense_layers",
                        format!("names layer {l}, the model has {} layers", self.layers),
                    );
                }
                if dense.len() == self.layers {
                    return invalid(
                        "dense_layers",
                        "makes every layer dense: no layer would route to experts",
                    );
                }
                let shared_ffn = match self.shared_ffn {
                    Some(n) => n,
                    None if family == Family::Qwen2Moe => {
                        moe_ffn.checked_mul(4).ok_or_else(overflow)?
                    }
                    None => 0,
                };
                Ok(Shapes {
                    moe_ffn,
                    dense_layers: dense,
                    shared_ffn,
                    norm_topk_prob: self.norm_topk_prob.unwrap_or(family == Family::Qwen3Moe),
                    deepseek: None,
                })
            }
        }
    }

    fn check_gqa(&self) -> Result<(), SynthError> {
        if self.head_dim == Some(0) {
            return invalid("head_dim", "must be positive");
        }
        if self.head_dim.is_none() && !self.hidden.is_multiple_of(self.heads) {
            return invalid(
                "heads",
                format!(
                    "({}) must divide hidden ({}) when head_dim is not given",
                    self.heads, self.hidden
                ),
            );
        }
        if !self.effective_head_dim().is_multiple_of(2) {
            return invalid(
                "head_dim",
                format!(
                    "({}) must be even: rotary embeddings rotate pairs",
                    self.effective_head_dim()
                ),
            );
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return invalid(
                "kv_heads",
                format!("({}) must divide heads ({})", self.kv_heads, self.heads),
            );
        }
        Ok(())
    }

    fn deepseek_shapes(&self) -> Result<Shapes, SynthError> {
        if self.kv_heads != self.heads {
            return invalid(
                "kv_heads",
                format!(
                    "({}) must equal heads ({}): latent attention expands keys and values per head",
                    self.kv_heads, self.heads
                ),
            );
        }
        if self.head_dim.is_some() {
            return invalid(
                "head_dim",
                "does not apply to deepseek_v3: set qk_nope_head_dim, qk_rope_head_dim and v_head_dim",
            );
        }
        for (field, value) in [
            ("q_lora_rank", self.q_lora_rank),
            ("kv_lora_rank", self.kv_lora_rank),
            ("qk_nope_head_dim", self.qk_nope_head_dim),
            ("qk_rope_head_dim", self.qk_rope_head_dim),
            ("v_head_dim", self.v_head_dim),
            ("n_group", self.n_group),
            ("topk_group", self.topk_group),
        ] {
            if value == Some(0) {
                return invalid(field, "must be positive");
            }
        }
        let base = (self.hidden / self.heads).max(2);
        let rope = self.qk_rope_head_dim.unwrap_or(((base / 2) & !1).max(2));
        if !rope.is_multiple_of(2) {
            return invalid(
                "qk_rope_head_dim",
                format!("({rope}) must be even: rotary embeddings rotate pairs"),
            );
        }
        let first_dense = self
            .first_k_dense_replace
            .unwrap_or(usize::from(self.layers > 1));
        if first_dense >= self.layers {
            return invalid(
                "first_k_dense_replace",
                format!(
                    "({first_dense}) must be below layers ({}): no layer would route to experts",
                    self.layers
                ),
            );
        }
        let experts = self.experts;
        let groups = match self.n_group {
            Some(g) => g,
            None => [8, 4, 2, 1]
                .into_iter()
                .find(|g| experts.is_multiple_of(*g))
                .unwrap_or(1),
        };
        if !experts.is_multiple_of(groups) {
            return invalid(
                "n_group",
                format!("({groups}) must divide experts ({experts})"),
            );
        }
        let per_group = experts / groups;
        let topk_groups = match self.topk_group {
            Some(t) => t,
            None => (groups / 2)
                .max(1)
                .max(self.top_k.div_ceil(per_group))
                .min(groups),
        };
        if topk_groups > groups {
            return invalid(
                "topk_group",
                format!("({topk_groups}) must not exceed n_group ({groups})"),
            );
        }
        if self.top_k > topk_groups * per_group {
            return invalid(
                "top_k",
                format!(
                    "({}) experts cannot be chosen from topk_group ({topk_groups}) groups of {per_group} experts (n_group {groups})",
                    self.top_k
                ),
            );
        }
        let scaling = self.routed_scaling_factor.unwrap_or(2.5);
        if !(scaling.is_finite() && scaling > 0.0) {
            return invalid(
                "routed_scaling_factor",
                format!("({scaling}) must be a positive number"),
            );
        }
        let moe_ffn = self.moe_ffn.unwrap_or(self.ffn);
        Ok(Shapes {
            moe_ffn,
            dense_layers: (0..first_dense).collect(),
            shared_ffn: 0,
            norm_topk_prob: self.norm_topk_prob.unwrap_or(true),
            deepseek: Some(DeepseekShapes {
                q_lora_rank: self.q_lora_rank,
                kv_lora_rank: self.kv_lora_rank.unwrap_or((self.hidden / 2).max(1)),
                qk_nope_head_dim: self.qk_nope_head_dim.unwrap_or(base),
                qk_rope_head_dim: rope,
                v_head_dim: self.v_head_dim.unwrap_or(base),
                first_k_dense_replace: first_dense,
                n_group: groups,
                topk_group: topk_groups,
                n_shared_experts: self.n_shared_experts.unwrap_or(1),
                routed_scaling_factor: scaling,
            }),
        })
    }

    #[cfg(test)]
    fn tensors(&self) -> Result<Vec<TensorSpec>, SynthError> {
        self.tensors_of(&self.shapes()?)
    }

    /// Every tensor in checkpoint order, which decides shard placement and each tensor's
    /// random stream.
    fn tensors_of(&self, s: &Shapes) -> Result<Vec<TensorSpec>, SynthError> {
        let h = self.hidden;
        let skew = (self.router_skew > 0.0).then(|| {
            std::sync::Arc::new(SkewPlan {
                exponent: self.router_skew,
                experts: self.experts,
                top_k: self.top_k,
                hidden: h,
                seed: self.seed,
                router_std: f64::from(if self.family == Family::DeepseekV3 {
                    SKEW_ROUTER_SCALE_DEEPSEEK
                } else {
                    ROUTER_SCALE
                }),
                growth: if self.family == Family::DeepseekV3 {
                    RESIDUAL_GROWTH_DEEPSEEK
                } else {
                    RESIDUAL_GROWTH
                },
                offsets: std::sync::OnceLock::new(),
            })
        });
        let mut b = Tensors {
            out: Vec::new(),
            dtype: self.dtype,
            skew: skew.clone(),
        };
        // Unit-variance embeddings keep the residual stream at the scale the
        // projections produce.
        b.add(
            "model.embed_tokens.weight".into(),
            &[self.vocab, h],
            Init::Uniform {
                bound: uniform_bound(1.0),
            },
        )?;
        b.skew_edit(Edit::Column {
            col: SKEW_COORD,
            value: SKEW_DC,
        });
        let router_skew = |b: &mut Tensors, layer: usize| {
            if let Some(plan) = &skew {
                b.skew_edit(Edit::Router {
                    layer,
                    plan: plan.clone(),
                });
            }
        };
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            b.add(format!("{p}.input_layernorm.weight"), &[h], Init::Norm)?;
            let attn = format!("{p}.self_attn");
            match &s.deepseek {
                Some(d) => self.mla(&mut b, &attn, d)?,
                None => self.gqa(
                    &mut b,
                    &attn,
                    self.family == Family::Qwen2Moe,
                    self.family == Family::Qwen3Moe,
                )?,
            }
            b.add(
                format!("{p}.post_attention_layernorm.weight"),
                &[h],
                Init::Norm,
            )?;
            b.skew_edit(Edit::Column {
                col: SKEW_COORD,
                value: 1.0,
            });
            let dense = s.dense_layers.binary_search(&l).is_ok();
            match self.family {
                Family::Mixtral => {
                    let moe = format!("{p}.block_sparse_moe");
                    b.add(format!("{moe}.gate.weight"), &[self.experts, h], router(h))?;
                    router_skew(&mut b, l);
                    let f = self.ffn;
                    for e in 0..self.experts {
                        let ep = format!("{moe}.experts.{e}");
                        b.add(format!("{ep}.w1.weight"), &[f, h], proj(h))?;
                        b.reads_hidden();
                        b.add(format!("{ep}.w2.weight"), &[h, f], proj(f))?;
                        b.writes_hidden();
                        b.add(format!("{ep}.w3.weight"), &[f, h], proj(h))?;
                        b.reads_hidden();
                    }
                }
                _ if dense => b.mlp(&format!("{p}.mlp"), h, self.ffn)?,
                family => {
                    let mlp = format!("{p}.mlp");
                    let deepseek_skew = family == Family::DeepseekV3 && skew.is_some();
                    let gate = if deepseek_skew {
                        Init::Uniform {
                            bound: uniform_bound(SKEW_ROUTER_SCALE_DEEPSEEK / (h as f32).sqrt()),
                        }
                    } else {
                        router(h)
                    };
                    b.add(format!("{mlp}.gate.weight"), &[self.experts, h], gate)?;
                    router_skew(&mut b, l);
                    if family == Family::DeepseekV3 {
                        // Always f32 in the published checkpoints, whatever the weights' dtype.
                        b.add_as(
                            format!("{mlp}.gate.e_score_correction_bias"),
                            &[self.experts],
                            Init::Uniform {
                                bound: if deepseek_skew {
                                    SKEW_CORRECTION_BIAS_BOUND
                                } else {
                                    CORRECTION_BIAS_BOUND
                                },
                            },
                            SynthDType::F32,
                        )?;
                    }
                    for e in 0..self.experts {
                        b.mlp(&format!("{mlp}.experts.{e}"), h, s.moe_ffn)?;
                    }
                    if s.shared_ffn > 0 {
                        b.mlp(&format!("{mlp}.shared_expert"), h, s.shared_ffn)?;
                        b.add(format!("{mlp}.shared_expert_gate.weight"), &[1, h], proj(h))?;
                        b.reads_hidden();
                    }
                    if let Some(d) = s.deepseek
                        && d.n_shared_experts > 0
                    {
                        let width = s
                            .moe_ffn
                            .checked_mul(d.n_shared_experts)
                            .ok_or_else(overflow)?;
                        b.mlp(&format!("{mlp}.shared_experts"), h, width)?;
                    }
                }
            }
        }
        b.add("model.norm.weight".into(), &[h], Init::Norm)?;
        b.add("lm_head.weight".into(), &[self.vocab, h], proj(h))?;
        b.reads_hidden();
        Ok(b.out)
    }

    /// `{p}.{q,k,v,o}_proj.weight`, with Qwen2-MoE's q/k/v biases and Qwen3-MoE's per-head
    /// q/k norms.
    fn gqa(&self, b: &mut Tensors, p: &str, bias: bool, qk_norm: bool) -> Result<(), SynthError> {
        let (h, hd) = (self.hidden, self.effective_head_dim());
        let q_out = self.heads.checked_mul(hd).ok_or_else(overflow)?;
        let kv_out = self.kv_heads.checked_mul(hd).ok_or_else(overflow)?;
        let bias_init = Init::Uniform {
            bound: uniform_bound(QKV_BIAS_STD),
        };
        for (name, out) in [("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)] {
            b.add(format!("{p}.{name}.weight"), &[out, h], proj(h))?;
            b.reads_hidden();
            if bias {
                b.add(format!("{p}.{name}.bias"), &[out], bias_init)?;
            }
        }
        b.add(format!("{p}.o_proj.weight"), &[h, q_out], proj(q_out))?;
        b.writes_hidden();
        if qk_norm {
            b.add(format!("{p}.q_norm.weight"), &[hd], Init::Norm)?;
            b.add(format!("{p}.k_norm.weight"), &[hd], Init::Norm)?;
        }
        Ok(())
    }

    /// DeepSeek-V3's multi-head latent attention under `{p}`. The latent and the low-rank
    /// query are RMS-normalised before their up-projections, so every projection sees
    /// unit-scale inputs and `1 / sqrt(fan_in)` keeps its outputs there.
    fn mla(&self, b: &mut Tensors, p: &str, m: &DeepseekShapes) -> Result<(), SynthError> {
        let (h, heads) = (self.hidden, self.heads);
        let q_out = m
            .qk_nope_head_dim
            .checked_add(m.qk_rope_head_dim)
            .and_then(|qk| qk.checked_mul(heads))
            .ok_or_else(overflow)?;
        match m.q_lora_rank {
            Some(r) => {
                b.add(format!("{p}.q_a_proj.weight"), &[r, h], proj(h))?;
                b.reads_hidden();
                b.add(format!("{p}.q_a_layernorm.weight"), &[r], Init::Norm)?;
                b.add(format!("{p}.q_b_proj.weight"), &[q_out, r], proj(r))?;
            }
            None => {
                b.add(format!("{p}.q_proj.weight"), &[q_out, h], proj(h))?;
                b.reads_hidden();
            }
        }
        let r = m.kv_lora_rank;
        let latent = r.checked_add(m.qk_rope_head_dim).ok_or_else(overflow)?;
        b.add(
            format!("{p}.kv_a_proj_with_mqa.weight"),
            &[latent, h],
            proj(h),
        )?;
        b.reads_hidden();
        b.add(format!("{p}.kv_a_layernorm.weight"), &[r], Init::Norm)?;
        let kv_b_out = m
            .qk_nope_head_dim
            .checked_add(m.v_head_dim)
            .and_then(|d| d.checked_mul(heads))
            .ok_or_else(overflow)?;
        b.add(format!("{p}.kv_b_proj.weight"), &[kv_b_out, r], proj(r))?;
        let o_in = heads.checked_mul(m.v_head_dim).ok_or_else(overflow)?;
        b.add(format!("{p}.o_proj.weight"), &[h, o_in], proj(o_in))?;
        b.writes_hidden();
        Ok(())
    }
}

fn overflow() -> SynthError {
    SynthError::InvalidSpec {
        field: "shape",
        reason: "tensor sizes overflow".into(),
    }
}

/// `1 / sqrt(fan_in)`: unit-scale inputs give unit-scale outputs, so activations stay in
/// range at any depth (pre-norm layers add O(1) to the residual stream each).
fn proj(fan_in: usize) -> Init {
    Init::Uniform {
        bound: uniform_bound(1.0 / (fan_in as f32).sqrt()),
    }
}

fn router(hidden: usize) -> Init {
    Init::Uniform {
        bound: uniform_bound(ROUTER_SCALE / (hidden as f32).sqrt()),
    }
}

/// Collects tensor specs, computing each one's bytes with overflow checks.
struct Tensors {
    out: Vec<TensorSpec>,
    dtype: SynthDType,
    /// Router skew's plan, `None` without skew.
    skew: Option<std::sync::Arc<SkewPlan>>,
}

impl Tensors {
    fn add(&mut self, name: String, shape: &[usize], init: Init) -> Result<(), SynthError> {
        self.add_as(name, shape, init, self.dtype)
    }

    fn add_as(
        &mut self,
        name: String,
        shape: &[usize],
        init: Init,
        dtype: SynthDType,
    ) -> Result<(), SynthError> {
        let bytes = shape
            .iter()
            .try_fold(dtype.size_bytes() as u64, |acc, &d| {
                acc.checked_mul(d as u64)
            })
            .filter(|b| usize::try_from(*b).is_ok())
            .ok_or_else(overflow)?;
        self.out.push(TensorSpec {
            name,
            shape: shape.to_vec(),
            init,
            dtype,
            bytes,
            edits: Vec::new(),
        });
        Ok(())
    }

    /// With router skew, the last tensor added has `edit`.
    fn skew_edit(&mut self, edit: Edit) {
        if self.skew.is_some()
            && let Some(t) = self.out.last_mut()
        {
            t.edits.push(edit);
        }
    }

    /// With router skew, the last tensor added (`[out, hidden]`) does not read
    /// [`SKEW_COORD`].
    fn reads_hidden(&mut self) {
        self.skew_edit(Edit::Column {
            col: SKEW_COORD,
            value: 0.0,
        });
    }

    /// With router skew, the last tensor added (`[hidden, in]`) does not write
    /// [`SKEW_COORD`].
    fn writes_hidden(&mut self) {
        self.skew_edit(Edit::Row {
            row: SKEW_COORD,
            value: 0.0,
        });
    }

    /// A SwiGLU MLP by the names every family but Mixtral uses.
    fn mlp(&mut self, p: &str, hidden: usize, ffn: usize) -> Result<(), SynthError> {
        self.add(
            format!("{p}.gate_proj.weight"),
            &[ffn, hidden],
            proj(hidden),
        )?;
        self.reads_hidden();
        self.add(format!("{p}.up_proj.weight"), &[ffn, hidden], proj(hidden))?;
        self.reads_hidden();
        self.add(format!("{p}.down_proj.weight"), &[hidden, ffn], proj(ffn))?;
        self.writes_hidden();
        Ok(())
    }
}

/// Half-width of the uniform distribution with standard deviation `std`.
fn uniform_bound(std: f32) -> f32 {
    std * 3f32.sqrt()
}

#[derive(Clone, Copy, Debug)]
enum Init {
    /// Uniform in [-bound, bound).
    Uniform { bound: f32 },
    /// 1.0 plus uniform noise of half-width NORM_NOISE.
    Norm,
}

#[derive(Debug)]
struct TensorSpec {
    name: String,
    shape: Vec<usize>,
    init: Init,
    /// The spec's dtype, except for tensors the Hub always stores in f32.
    dtype: SynthDType,
    bytes: u64,
    /// Values that replace the random ones (router skew only; empty otherwise).
    edits: Vec<Edit>,
}

/// Replaces generated values of a tensor seen as `[rows, cols]` (its first dim by the
/// product of the others; a 1-D tensor is one row).
#[derive(Clone, Debug)]
enum Edit {
    /// Column `col` of every row is `value`.
    Column { col: usize, value: f32 },
    /// Every element of row `row` is `value`.
    Row { row: usize, value: f32 },
    /// Column [`SKEW_COORD`] of a router (`[experts, hidden]`) gets decoder layer
    /// `layer`'s per-expert offsets.
    Router {
        layer: usize,
        plan: std::sync::Arc<SkewPlan>,
    },
}

/// What the routers of a skewed checkpoint need; the calibration runs once, the first
/// time a router is generated.
#[derive(Debug)]
struct SkewPlan {
    exponent: f64,
    experts: usize,
    top_k: usize,
    hidden: usize,
    seed: u64,
    /// Standard deviation of a router logit's random part per unit RMS-normalised input.
    router_std: f64,
    /// Variance per coordinate each sublayer adds to the residual stream.
    growth: f64,
    /// Offsets by rank (1 first) in units of the logits' noise, from `zipf_offsets`.
    offsets: std::sync::OnceLock<Vec<f64>>,
}

impl SkewPlan {
    /// Decoder layer `layer`'s router column [`SKEW_COORD`], by expert.
    fn router_column(&self, layer: usize) -> Vec<f32> {
        let by_rank = self
            .offsets
            .get_or_init(|| zipf_offsets(self.exponent, self.experts, self.top_k));
        let h = self.hidden as f64;
        let dc = f64::from(SKEW_DC);
        // The residual's variance per coordinate off SKEW_COORD before this layer's
        // experts: the embedding's 1 plus what attention and MLPs added.
        let var = 1.0 + self.growth * (2 * layer + 1) as f64;
        let rms = ((dc * dc + (h - 1.0) * var) / h).sqrt();
        let x_dc = dc / rms;
        let noise = self.router_std * (1.0 - (x_dc * x_dc / h).min(1.0)).sqrt();
        let scale = noise / x_dc;
        let perm = skew_permutation(self.seed, layer, self.experts);
        let mut column = vec![0.0f32; self.experts];
        for (rank, &expert) in perm.iter().enumerate() {
            column[expert] = (by_rank[rank] * scale) as f32;
        }
        column
    }
}

/// The ChaCha stream of the router skew's random choices, apart from the weights'.
fn skew_rng(seed: u64, stream: u64, n: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&stream.to_le_bytes());
    key[16..24].copy_from_slice(&n.to_le_bytes());
    key[24..].copy_from_slice(b"swskew01");
    ChaCha8Rng::from_seed(key)
}

/// Which expert has popularity rank 1, 2, ... in decoder layer `layer`.
pub fn skew_permutation(seed: u64, layer: usize, experts: usize) -> Vec<usize> {
    let mut rng = skew_rng(seed, 1, layer as u64);
    let mut perm: Vec<usize> = (0..experts).collect();
    for i in (1..experts).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        perm.swap(i, j);
    }
    perm
}

/// Logit offsets by popularity rank, in units of the logits' noise (standard deviation
/// 1), such that top-`k` routing of `N(0, 1) + offset` picks rank `r` with a share of
/// all picks proportional to `r^-exponent`: fitted by fixed-point iteration on a fixed
/// Gaussian sample (the same for every seed). A share above `1 / k` (one pick by every
/// token) cannot be reached; those offsets stop at a large finite value.
fn zipf_offsets(exponent: f64, experts: usize, k: usize) -> Vec<f64> {
    if exponent == 0.0 || k >= experts {
        return vec![0.0; experts];
    }
    let weights: Vec<f64> = (1..=experts).map(|r| (r as f64).powf(-exponent)).collect();
    let total: f64 = weights.iter().sum();
    let target: Vec<f64> = weights.iter().map(|w| w / total).collect();
    let samples = (1usize << 18).div_ceil(experts).clamp(4096, 16384);
    let noise: Vec<f32> = (0..samples)
        .into_par_iter()
        .flat_map_iter(|i| {
            let mut rng = skew_rng(0, 2, i as u64);
            let mut row = Vec::with_capacity(experts);
            while row.len() < experts {
                // Box-Muller from two 24-bit uniforms in (0, 1].
                let u1 = ((rng.next_u32() >> 8) as f64 + 1.0) / (1u32 << 24) as f64;
                let u2 = ((rng.next_u32() >> 8) as f64) / (1u32 << 24) as f64;
                let r = (-2.0 * u1.ln()).sqrt();
                let a = std::f64::consts::TAU * u2;
                row.push((r * a.cos()) as f32);
                if row.len() < experts {
                    row.push((r * a.sin()) as f32);
                }
            }
            row
        })
        .collect();
    // The Gumbel-max trick's answer for k = 1, with the Gumbel's spread (pi / sqrt(6)).
    let gumbel_std = std::f64::consts::PI / 6f64.sqrt();
    let mut offsets: Vec<f64> = (1..=experts)
        .map(|r| -exponent * (r as f64).ln() / gumbel_std)
        .collect();
    let picks = (samples * k) as f64;
    for _ in 0..80 {
        let t: Vec<f32> = offsets.iter().map(|o| *o as f32).collect();
        let counts = noise
            .par_chunks(experts)
            .fold(
                || (vec![0u32; experts], Vec::with_capacity(experts)),
                |(mut counts, mut buf): (Vec<u32>, Vec<(f32, u32)>), row| {
                    buf.clear();
                    buf.extend(
                        row.iter()
                            .zip(&t)
                            .enumerate()
                            .map(|(e, (n, o))| (n + o, e as u32)),
                    );
                    buf.select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0));
                    for (_, e) in &buf[..k] {
                        counts[*e as usize] += 1;
                    }
                    (counts, buf)
                },
            )
            .map(|(counts, _)| counts)
            .reduce(
                || vec![0u32; experts],
                |mut a, b| {
                    a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                    a
                },
            );
        for (r, o) in offsets.iter_mut().enumerate() {
            let got = (f64::from(counts[r]) / picks).max(0.5 / picks);
            *o = (*o + 0.7 * (target[r] / got).ln()).clamp(-30.0, 30.0);
        }
        let mean = offsets.iter().sum::<f64>() / experts as f64;
        offsets.iter_mut().for_each(|o| *o -= mean);
    }
    // Sampling noise in the tail's few picks must not swap neighbouring ranks.
    for r in 1..experts {
        offsets[r] = offsets[r].min(offsets[r - 1] - 1e-3);
    }
    offsets
}

/// A tensor whose values are generated only when the safetensors writer asks for its
/// bytes: the writer requests one tensor at a time, so at most one tensor is in memory.
struct LazyTensor<'a> {
    spec: &'a TensorSpec,
    index: u64,
    seed: u64,
}

impl View for LazyTensor<'_> {
    fn dtype(&self) -> Dtype {
        self.spec.dtype.safetensors_dtype()
    }

    fn shape(&self) -> &[usize] {
        &self.spec.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(generate(self.spec, self.index, self.seed))
    }

    fn data_len(&self) -> usize {
        // Fits: validate() checked the product, and the buffer is allocated at this size.
        self.spec.bytes as usize
    }
}

/// Each chunk has its own ChaCha key derived from (seed, tensor, chunk), so values do not
/// depend on thread count, shard layout or generation order.
fn chunk_rng(seed: u64, tensor: u64, chunk: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&tensor.to_le_bytes());
    key[16..24].copy_from_slice(&chunk.to_le_bytes());
    key[24..].copy_from_slice(b"swsynth1");
    ChaCha8Rng::from_seed(key)
}

/// Fills each chunk with raw ChaCha output in one bulk call, then maps every element's own
/// random bits to its value in place: 24 bits for f32 (exact in its mantissa), 16 bits
/// for the 16-bit types (more than their 8 or 11 mantissa bits).
fn generate(spec: &TensorSpec, index: u64, seed: u64) -> Vec<u8> {
    let dtype = spec.dtype;
    const UNIT24: f32 = 1.0 / (1u32 << 23) as f32;
    const UNIT16: f32 = 1.0 / (1u32 << 15) as f32;
    let es = dtype.size_bytes();
    let mut buf = vec![0u8; spec.bytes as usize];
    let (scale, offset) = match spec.init {
        Init::Uniform { bound } => (bound, 0.0),
        Init::Norm => (NORM_NOISE, 1.0),
    };
    let cols: usize = spec.shape.iter().skip(1).product::<usize>().max(1);
    let cols = if spec.shape.len() == 1 {
        spec.shape[0]
    } else {
        cols
    };
    // (column or row, value per row or for all) of each edit.
    let edits: Vec<ResolvedEdit> = spec
        .edits
        .iter()
        .map(|e| match e {
            Edit::Column { col, value } => ResolvedEdit::Column(*col, vec![*value]),
            Edit::Row { row, value } => ResolvedEdit::Row(*row, *value),
            Edit::Router { layer, plan } => {
                ResolvedEdit::Column(SKEW_COORD, plan.router_column(*layer))
            }
        })
        .collect();
    buf.par_chunks_mut(CHUNK_ELEMS * es)
        .enumerate()
        .for_each(|(ci, chunk)| {
            chunk_rng(seed, index, ci as u64).fill_bytes(chunk);
            // u in [-1, 1) -> offset + scale * u
            let value = |u: f32| offset + scale * u;
            match dtype {
                SynthDType::F32 => {
                    for out in chunk.chunks_exact_mut(4) {
                        let bits = u32::from_le_bytes([out[0], out[1], out[2], out[3]]) >> 8;
                        let v = value(bits as f32 * UNIT24 - 1.0);
                        out.copy_from_slice(&v.to_le_bytes());
                    }
                }
                SynthDType::Bf16 => {
                    for out in chunk.chunks_exact_mut(2) {
                        let bits = u16::from_le_bytes([out[0], out[1]]);
                        let v = value(f32::from(bits) * UNIT16 - 1.0);
                        out.copy_from_slice(&bf16_bits(v).to_le_bytes());
                    }
                }
                SynthDType::F16 => {
                    for out in chunk.chunks_exact_mut(2) {
                        let bits = u16::from_le_bytes([out[0], out[1]]);
                        let v = value(f32::from(bits) * UNIT16 - 1.0);
                        out.copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
                    }
                }
            }
            apply_edits(chunk, ci * CHUNK_ELEMS, cols, &edits, dtype);
        });
    buf
}

/// An [`Edit`] with its values computed: a column (one value for all rows, or one per
/// row) or a row.
enum ResolvedEdit {
    Column(usize, Vec<f32>),
    Row(usize, f32),
}

/// Overwrites the elements of `chunk` (elements `start..` of a `[rows, cols]` tensor)
/// that `edits` replace.
fn apply_edits(
    chunk: &mut [u8],
    start: usize,
    cols: usize,
    edits: &[ResolvedEdit],
    dtype: SynthDType,
) {
    if edits.is_empty() {
        return;
    }
    let es = dtype.size_bytes();
    let end = start + chunk.len() / es;
    let mut put = |elem: usize, v: f32| {
        let at = (elem - start) * es;
        let out = &mut chunk[at..at + es];
        match dtype {
            SynthDType::F32 => out.copy_from_slice(&v.to_le_bytes()),
            SynthDType::Bf16 => out.copy_from_slice(&bf16_bits(v).to_le_bytes()),
            SynthDType::F16 => out.copy_from_slice(&half::f16::from_f32(v).to_le_bytes()),
        }
    };
    for edit in edits {
        match edit {
            ResolvedEdit::Column(col, values) => {
                if *col >= cols {
                    continue;
                }
                for row in start / cols..end.div_ceil(cols) {
                    let elem = row * cols + col;
                    if (start..end).contains(&elem) {
                        let v = if values.len() == 1 {
                            values[0]
                        } else {
                            values[row]
                        };
                        put(elem, v);
                    }
                }
            }
            ResolvedEdit::Row(row, value) => {
                let from = (row * cols).max(start);
                let to = ((row + 1) * cols).min(end);
                for elem in from..to {
                    put(elem, *value);
                }
            }
        }
    }
}

/// f32 -> bf16 bits, rounding to nearest even; values here are always finite, and this
/// stays cheap even where `half`'s conversion is not inlined (unoptimised test builds).
#[inline]
fn bf16_bits(v: f32) -> u16 {
    let bits = v.to_bits();
    let rounded = bits.wrapping_add(0x7FFF + ((bits >> 16) & 1));
    (rounded >> 16) as u16
}

/// Consecutive whole tensors per shard, a new shard whenever the next tensor would push
/// the current one past `shard_bytes` (a tensor larger than that gets a shard alone).
fn plan_shards(tensors: &[TensorSpec], shard_bytes: u64) -> Vec<std::ops::Range<usize>> {
    let mut shards = Vec::new();
    let mut start = 0;
    let mut size = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        if i > start && size + t.bytes > shard_bytes {
            shards.push(start..i);
            start = i;
            size = 0;
        }
        size += t.bytes;
    }
    if start < tensors.len() {
        shards.push(start..tensors.len());
    }
    shards
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SynthError + '_ {
    move |source| SynthError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), SynthError> {
    let mut text = serde_json::to_string_pretty(value).map_err(|source| SynthError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    text.push('\n');
    std::fs::write(path, text).map_err(io_err(path))
}

/// Weight files of an earlier run with other sharding would be picked up by loaders
/// next to the new ones, so they go first.
fn remove_stale_weights(out: &Path) -> Result<(), SynthError> {
    for entry in std::fs::read_dir(out).map_err(io_err(out))? {
        let entry = entry.map_err(io_err(out))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let is_weights = name == "model.safetensors"
            || name == "model.safetensors.index.json"
            || (name.starts_with("model-")
                && name.contains("-of-")
                && name.ends_with(".safetensors"));
        if is_weights {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(io_err(&path))?;
        }
    }
    Ok(())
}

/// config.json in the style of the family's published checkpoints on the Hub
/// (mistralai/Mixtral-8x7B-v0.1, Qwen/Qwen1.5-MoE-A2.7B, Qwen/Qwen3-30B-A3B,
/// deepseek-ai/DeepSeek-V3): top-level `rope_theta` and `rope_scaling`, `torch_dtype`.
/// Token ids are the synthetic tokenizer's (bos 1, eos 2) in every family.
fn config_json(spec: &SynthSpec, s: &Shapes) -> serde_json::Value {
    use serde_json::json;
    let common = json!({
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": spec.hidden,
        "initializer_range": 0.02,
        "intermediate_size": spec.ffn,
        "max_position_embeddings": spec.max_position,
        "num_attention_heads": spec.heads,
        "num_experts_per_tok": spec.top_k,
        "num_hidden_layers": spec.layers,
        "num_key_value_heads": spec.kv_heads,
        "tie_word_embeddings": false,
        "torch_dtype": spec.dtype.torch_name(),
        "use_cache": true,
        "vocab_size": spec.vocab,
    });
    let family = match (spec.family, &s.deepseek) {
        (_, Some(d)) => json!({
            "architectures": ["DeepseekV3ForCausalLM"],
            "attention_bias": false,
            "aux_loss_alpha": 0.001,
            "ep_size": 1,
            "first_k_dense_replace": d.first_k_dense_replace,
            "kv_lora_rank": d.kv_lora_rank,
            "model_type": "deepseek_v3",
            "moe_intermediate_size": s.moe_ffn,
            "moe_layer_freq": 1,
            "n_group": d.n_group,
            "n_routed_experts": spec.experts,
            "n_shared_experts": d.n_shared_experts,
            "norm_topk_prob": s.norm_topk_prob,
            // The published checkpoint's multi-token-prediction layer is not written.
            "num_nextn_predict_layers": 0,
            "pretraining_tp": 1,
            "q_lora_rank": d.q_lora_rank,
            "qk_nope_head_dim": d.qk_nope_head_dim,
            "qk_rope_head_dim": d.qk_rope_head_dim,
            "rms_norm_eps": 1e-6,
            "rope_scaling": null,
            "rope_theta": 10000.0,
            "routed_scaling_factor": d.routed_scaling_factor,
            "scoring_func": "sigmoid",
            "seq_aux": true,
            "topk_group": d.topk_group,
            "topk_method": "noaux_tc",
            "v_head_dim": d.v_head_dim,
        }),
        (Family::Qwen2Moe, None) => json!({
            "architectures": ["Qwen2MoeForCausalLM"],
            "decoder_sparse_step": 1,
            "max_window_layers": spec.layers,
            "model_type": "qwen2_moe",
            "moe_intermediate_size": s.moe_ffn,
            "norm_topk_prob": s.norm_topk_prob,
            "num_experts": spec.experts,
            "output_router_logits": false,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1e6,
            "router_aux_loss_coef": 0.001,
            "shared_expert_intermediate_size": s.shared_ffn,
            "sliding_window": spec.max_position,
            "use_sliding_window": false,
        }),
        (Family::Qwen3Moe, None) => json!({
            "architectures": ["Qwen3MoeForCausalLM"],
            "attention_bias": false,
            "decoder_sparse_step": 1,
            // Qwen3 always writes it (30B-A3B: 128, not hidden / heads = 64).
            "head_dim": spec.effective_head_dim(),
            "max_window_layers": spec.layers,
            "mlp_only_layers": s.dense_layers,
            "model_type": "qwen3_moe",
            "moe_intermediate_size": s.moe_ffn,
            "norm_topk_prob": s.norm_topk_prob,
            "num_experts": spec.experts,
            "output_router_logits": false,
            "rms_norm_eps": 1e-6,
            "rope_scaling": null,
            "rope_theta": 1e6,
            "router_aux_loss_coef": 0.001,
            "sliding_window": null,
            "use_sliding_window": false,
        }),
        // Mixtral (shapes() always gives DeepSeek-V3 its shapes).
        _ => json!({
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "num_local_experts": spec.experts,
            "output_router_logits": false,
            "rms_norm_eps": 1e-5,
            "rope_theta": 1e6,
            "router_aux_loss_coef": 0.02,
            "sliding_window": null,
        }),
    };
    let mut config = common;
    if let (Some(obj), serde_json::Value::Object(extra)) = (config.as_object_mut(), family) {
        obj.extend(extra);
        if let Some(hd) = spec.head_dim
            && matches!(spec.family, Family::Mixtral | Family::Qwen2Moe)
        {
            obj.insert("head_dim".into(), hd.into());
        }
        if spec.family == Family::Qwen2Moe && !s.dense_layers.is_empty() {
            obj.insert("mlp_only_layers".into(), json!(s.dense_layers));
        }
        if let Some(factor) = spec.yarn_factor {
            let original = (spec.max_position as f64 / factor).round() as usize;
            let scaling = if spec.family == Family::DeepseekV3 {
                json!({
                    "beta_fast": 32,
                    "beta_slow": 1,
                    "factor": factor,
                    "mscale": 1.0,
                    "mscale_all_dim": 1.0,
                    "original_max_position_embeddings": original,
                    "type": "yarn",
                })
            } else {
                // Qwen's model cards' form.
                json!({
                    "factor": factor,
                    "original_max_position_embeddings": original,
                    "rope_type": "yarn",
                })
            };
            obj.insert("rope_scaling".into(), scaling);
        }
    }
    config
}

/// Writes a random checkpoint into `out` (created if missing): config.json,
/// generation_config.json, tokenizer.json, tokenizer_config.json and the weights, as one
/// model.safetensors or as shards plus model.safetensors.index.json. Weight files left by
/// an earlier run in `out` are removed first.
pub fn write_checkpoint(spec: &SynthSpec, out: &Path) -> Result<(), SynthError> {
    let shapes = spec.shapes()?;
    let tensors = spec.tensors_of(&shapes)?;
    std::fs::create_dir_all(out).map_err(io_err(out))?;

    write_json(&out.join("config.json"), &config_json(spec, &shapes))?;
    write_json(
        &out.join("generation_config.json"),
        &serde_json::json!({ "bos_token_id": 1, "eos_token_id": 2 }),
    )?;
    write_json(
        &out.join("tokenizer_config.json"),
        &serde_json::json!({
            "add_bos_token": true,
            "add_eos_token": false,
            "bos_token": SPECIAL_TOKENS[1],
            "eos_token": SPECIAL_TOKENS[2],
            "unk_token": SPECIAL_TOKENS[0],
            "chat_template": MIXTRAL_CHAT_TEMPLATE,
            "model_max_length": spec.max_position,
            "tokenizer_class": "PreTrainedTokenizerFast",
        }),
    )?;
    write_tokenizer(spec.vocab, &out.join("tokenizer.json"))?;

    remove_stale_weights(out)?;
    let total: u64 = tensors.iter().map(|t| t.bytes).sum();
    let metadata = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    let views = |range: std::ops::Range<usize>| {
        let tensors = &tensors;
        range.map(move |i| {
            let t = &tensors[i];
            (
                t.name.clone(),
                LazyTensor {
                    spec: t,
                    index: i as u64,
                    seed: spec.seed,
                },
            )
        })
    };
    let write_shard = |range: std::ops::Range<usize>, path: &Path| {
        safetensors::serialize_to_file(views(range), Some(metadata.clone()), path).map_err(
            |source| SynthError::Safetensors {
                path: path.to_path_buf(),
                source,
            },
        )
    };

    if total <= spec.shard_bytes {
        return write_shard(0..tensors.len(), &out.join("model.safetensors"));
    }
    let shards = plan_shards(&tensors, spec.shard_bytes);
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    for (s, range) in shards.into_iter().enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", s + 1);
        for t in &tensors[range.clone()] {
            weight_map.insert(t.name.clone(), file.clone());
        }
        write_shard(range, &out.join(&file))?;
    }
    write_json(
        &out.join("model.safetensors.index.json"),
        &serde_json::json!({
            "metadata": { "total_size": total },
            "weight_map": weight_map,
        }),
    )
}

/// GPT-2's reversible byte -> printable char map that tokenizers' ByteLevel uses.
fn byte_to_char() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut next_extra = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let code = if printable {
            u32::from(b)
        } else {
            let c = next_extra;
            next_extra += 1;
            c
        };
        // All codes are below 0x144, far from the surrogate range.
        map[usize::from(b)] = char::from_u32(code).unwrap_or('\u{FFFD}');
    }
    map
}

/// Vocabulary (in id order) and merges of a byte-level BPE with exactly `vocab` tokens:
/// merges first learnt greedily from MERGE_CORPUS, then, when no pair there occurs twice,
/// grown by appending letters to letter-only tokens in id order, which never runs out.
fn build_bpe(vocab: usize) -> (Vec<String>, Vec<(String, String)>) {
    let bytes = byte_to_char();
    let mut tokens: Vec<String> = SPECIAL_TOKENS.iter().map(|s| s.to_string()).collect();
    tokens.extend(bytes.iter().map(|c| c.to_string()));
    let mut known: HashSet<String> = tokens.iter().cloned().collect();
    let mut merges = Vec::new();

    // Words as the ByteLevel pre-tokenizer sees them: a leading space belongs to the word.
    let mut words: BTreeMap<Vec<String>, usize> = BTreeMap::new();
    for (i, word) in MERGE_CORPUS.split(' ').enumerate() {
        if word.is_empty() {
            continue;
        }
        let text = if i == 0 {
            word.to_owned()
        } else {
            format!(" {word}")
        };
        let symbols = text
            .bytes()
            .map(|b| bytes[usize::from(b)].to_string())
            .collect();
        *words.entry(symbols).or_default() += 1;
    }
    let mut banned: HashSet<(String, String)> = HashSet::new();
    while tokens.len() < vocab {
        let mut counts: BTreeMap<(&str, &str), usize> = BTreeMap::new();
        for (symbols, &n) in &words {
            for pair in symbols.windows(2) {
                *counts.entry((&pair[0], &pair[1])).or_default() += n;
            }
        }
        // Highest count wins; the BTreeMap order breaks ties deterministically.
        let best = counts
            .into_iter()
            .filter(|(pair, _)| !banned.contains(&(pair.0.to_owned(), pair.1.to_owned())))
            .fold(
                None,
                |best: Option<((&str, &str), usize)>, (pair, n)| match best {
                    Some((_, m)) if m >= n => best,
                    _ => Some((pair, n)),
                },
            );
        let Some(((a, b), count)) = best else { break };
        if count < 2 {
            break;
        }
        let (a, b) = (a.to_owned(), b.to_owned());
        let merged = format!("{a}{b}");
        if known.contains(&merged) {
            banned.insert((a, b));
            continue;
        }
        words = words
            .into_iter()
            .map(|(symbols, n)| (merge_pair(symbols, &a, &b, &merged), n))
            .fold(BTreeMap::new(), |mut acc, (symbols, n)| {
                *acc.entry(symbols).or_default() += n;
                acc
            });
        known.insert(merged.clone());
        tokens.push(merged);
        merges.push((a, b));
    }

    let space = bytes[usize::from(b' ')];
    let mut base = SPECIAL_TOKENS.len();
    while tokens.len() < vocab {
        // Letter-only tokens always extend to new ones, so this runs out only on a bug,
        // which the vocab size check in write_tokenizer then reports.
        let Some(stem) = tokens.get(base).cloned() else {
            break;
        };
        base += 1;
        if !stem.chars().all(|c| c.is_ascii_alphabetic() || c == space) {
            continue;
        }
        for letter in GROW_LETTERS.chars() {
            if tokens.len() >= vocab {
                break;
            }
            let merged = format!("{stem}{letter}");
            if known.insert(merged.clone()) {
                tokens.push(merged);
                merges.push((stem.clone(), letter.to_string()));
            }
        }
    }
    (tokens, merges)
}

fn merge_pair(symbols: Vec<String>, a: &str, b: &str, merged: &str) -> Vec<String> {
    let mut out = Vec::with_capacity(symbols.len());
    let mut iter = symbols.into_iter().peekable();
    while let Some(s) = iter.next() {
        if s == a && iter.peek().is_some_and(|next| next == b) {
            iter.next();
            out.push(merged.to_owned());
        } else {
            out.push(s);
        }
    }
    out
}

fn tokenizer_json(vocab: usize) -> serde_json::Value {
    let (tokens, merges) = build_bpe(vocab);
    let vocab_map: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.clone(), id.into()))
        .collect();
    let added: Vec<serde_json::Value> = SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(id, t)| {
            serde_json::json!({
                "id": id, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true,
            })
        })
        .collect();
    let bos = SPECIAL_TOKENS[1];
    let byte_level = serde_json::json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true,
    });
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
            ],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "B", "type_id": 0}},
            ],
            "special_tokens": {bos: {"id": bos, "ids": [1], "tokens": [bos]}},
        },
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab_map,
            "merges": merges.iter().map(|(a, b)| [a, b]).collect::<Vec<_>>(),
        },
    })
}

/// Loads the generated JSON with the tokenizers crate before writing it, so a file that
/// reaches disk is known to load with exactly `vocab` ids; the crate's own serializer then
/// writes the vocabulary in id order, as Hub files have it.
fn write_tokenizer(vocab: usize, path: &Path) -> Result<(), SynthError> {
    let fail = |message: String| SynthError::Tokenizer {
        path: path.to_path_buf(),
        message,
    };
    let json = tokenizer_json(vocab).to_string();
    let tok = tokenizers::Tokenizer::from_str(&json).map_err(|e| fail(e.to_string()))?;
    let got = tok.get_vocab_size(true);
    if got != vocab {
        return Err(fail(format!("has {got} ids instead of {vocab}")));
    }
    let text = tok.to_string(true).map_err(|e| fail(e.to_string()))?;
    std::fs::write(path, text).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(seed: u64) -> SynthSpec {
        SynthSpec {
            hidden: 32,
            ffn: 48,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: None,
            experts: 4,
            top_k: 2,
            vocab: 300,
            dtype: SynthDType::Bf16,
            seed,
            max_position: 512,
            shard_bytes: 1 << 30,
            ..SynthSpec::default()
        }
    }

    fn expected_tensors(spec: &SynthSpec) -> BTreeMap<String, Vec<usize>> {
        let (h, f, v) = (spec.hidden, spec.ffn, spec.vocab);
        let hd = spec.effective_head_dim();
        let mut m = BTreeMap::new();
        m.insert("model.embed_tokens.weight".to_owned(), vec![v, h]);
        m.insert("model.norm.weight".to_owned(), vec![h]);
        m.insert("lm_head.weight".to_owned(), vec![v, h]);
        for l in 0..spec.layers {
            let p = format!("model.layers.{l}");
            let attn = format!("{p}.self_attn");
            m.insert(format!("{attn}.q_proj.weight"), vec![spec.heads * hd, h]);
            m.insert(format!("{attn}.k_proj.weight"), vec![spec.kv_heads * hd, h]);
            m.insert(format!("{attn}.v_proj.weight"), vec![spec.kv_heads * hd, h]);
            m.insert(format!("{attn}.o_proj.weight"), vec![h, spec.heads * hd]);
            m.insert(format!("{p}.input_layernorm.weight"), vec![h]);
            m.insert(format!("{p}.post_attention_layernorm.weight"), vec![h]);
            m.insert(
                format!("{p}.block_sparse_moe.gate.weight"),
                vec![spec.experts, h],
            );
            for e in 0..spec.experts {
                let ep = format!("{p}.block_sparse_moe.experts.{e}");
                m.insert(format!("{ep}.w1.weight"), vec![f, h]);
                m.insert(format!("{ep}.w3.weight"), vec![f, h]);
                m.insert(format!("{ep}.w2.weight"), vec![h, f]);
            }
        }
        m
    }

    /// Tensor name -> (dtype, shape, bytes) over every weight file in `dir`, and the
    /// safetensors metadata of each file.
    type ReadBack = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

    fn read_weights(dir: &Path, files: &[String]) -> ReadBack {
        let mut all = BTreeMap::new();
        for file in files {
            let bytes = std::fs::read(dir.join(file)).unwrap();
            let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
            let format = meta.metadata().as_ref().and_then(|m| m.get("format"));
            assert_eq!(format.map(String::as_str), Some("pt"), "{file}");
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            for (name, view) in st.tensors() {
                let prev = all.insert(
                    name.clone(),
                    (view.dtype(), view.shape().to_vec(), view.data().to_vec()),
                );
                assert!(prev.is_none(), "{name} appears twice");
            }
        }
        all
    }

    fn dir_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn config_has_mixtral_fields() {
        let tmp = tempfile::tempdir().unwrap();
        let spec = tiny(1);
        write_checkpoint(&spec, tmp.path()).unwrap();
        let text = std::fs::read_to_string(tmp.path().join("config.json")).unwrap();
        let c: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(c["model_type"], "mixtral");
        assert_eq!(
            c["architectures"],
            serde_json::json!(["MixtralForCausalLM"])
        );
        assert_eq!(c["hidden_size"], 32);
        assert_eq!(c["intermediate_size"], 48);
        assert_eq!(c["num_hidden_layers"], 2);
        assert_eq!(c["num_attention_heads"], 4);
        assert_eq!(c["num_key_value_heads"], 2);
        assert!(c.get("head_dim").is_none());
        assert_eq!(c["num_local_experts"], 4);
        assert_eq!(c["num_experts_per_tok"], 2);
        assert_eq!(c["vocab_size"], 300);
        assert_eq!(c["max_position_embeddings"], 512);
        assert_eq!(c["rms_norm_eps"].as_f64(), Some(1e-5));
        assert_eq!(c["rope_theta"].as_f64(), Some(1e6));
        assert_eq!(c["torch_dtype"], "bfloat16");
        assert_eq!(c["bos_token_id"], 1);
        assert_eq!(c["eos_token_id"], 2);
        assert_eq!(c["tie_word_embeddings"], false);
        assert!(c["sliding_window"].is_null());
        assert_eq!(c["hidden_act"], "silu");

        let gen_text = std::fs::read_to_string(tmp.path().join("generation_config.json")).unwrap();
        let g: serde_json::Value = serde_json::from_str(&gen_text).unwrap();
        assert_eq!(
            (g["bos_token_id"].as_u64(), g["eos_token_id"].as_u64()),
            (Some(1), Some(2))
        );

        let with_hd = SynthSpec {
            head_dim: Some(16),
            ..tiny(1)
        };
        let c = config_json(&with_hd, &with_hd.shapes().unwrap());
        assert_eq!(c["head_dim"], 16);
    }

    #[test]
    fn single_file_has_every_tensor_with_shape_and_dtype() {
        for dtype in [SynthDType::F32, SynthDType::Bf16, SynthDType::F16] {
            let tmp = tempfile::tempdir().unwrap();
            let spec = SynthSpec {
                dtype,
                head_dim: Some(12),
                ..tiny(3)
            };
            write_checkpoint(&spec, tmp.path()).unwrap();
            assert!(!tmp.path().join("model.safetensors.index.json").exists());
            let got = read_weights(tmp.path(), &["model.safetensors".to_owned()]);
            let expected = expected_tensors(&spec);
            assert_eq!(
                got.keys().collect::<Vec<_>>(),
                expected.keys().collect::<Vec<_>>()
            );
            for (name, shape) in &expected {
                let (dt, got_shape, data) = &got[name];
                assert_eq!(*dt, spec.dtype.safetensors_dtype(), "{name}");
                assert_eq!(got_shape, shape, "{name}");
                let numel: usize = shape.iter().product();
                assert_eq!(data.len(), numel * dtype.size_bytes(), "{name}");
            }
        }
    }

    fn as_f32(data: &[u8]) -> Vec<f32> {
        data.chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn values_have_the_intended_scale() {
        let tmp = tempfile::tempdir().unwrap();
        let spec = SynthSpec {
            dtype: SynthDType::F32,
            ..tiny(5)
        };
        write_checkpoint(&spec, tmp.path()).unwrap();
        let got = read_weights(tmp.path(), &["model.safetensors".to_owned()]);
        let std = |name: &str| {
            let v = as_f32(&got[name].2);
            let mean = v.iter().sum::<f32>() / v.len() as f32;
            (v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / v.len() as f32).sqrt()
        };
        let expected = 1.0 / (spec.hidden as f32).sqrt();
        let q = std("model.layers.0.self_attn.q_proj.weight");
        assert!((q / expected - 1.0).abs() < 0.1, "q std {q}");
        let w2 = std("model.layers.1.block_sparse_moe.experts.3.w2.weight");
        let expected_w2 = 1.0 / (spec.ffn as f32).sqrt();
        assert!((w2 / expected_w2 - 1.0).abs() < 0.1, "w2 std {w2}");
        let gate = std("model.layers.0.block_sparse_moe.gate.weight");
        assert!(gate > 3.0 * expected, "router std {gate}");
        for x in as_f32(&got["model.norm.weight"].2) {
            assert!((x - 1.0).abs() <= NORM_NOISE, "norm {x}");
        }
    }

    #[test]
    fn small_shard_bytes_gives_shards_and_index() {
        let tmp = tempfile::tempdir().unwrap();
        let spec = SynthSpec {
            shard_bytes: 20_000,
            ..tiny(7)
        };
        // A stale single-file checkpoint must not survive next to the shards.
        std::fs::write(tmp.path().join("model.safetensors"), b"stale").unwrap();
        write_checkpoint(&spec, tmp.path()).unwrap();
        assert!(!tmp.path().join("model.safetensors").exists());

        let text =
            std::fs::read_to_string(tmp.path().join("model.safetensors.index.json")).unwrap();
        let index: serde_json::Value = serde_json::from_str(&text).unwrap();
        let weight_map = index["weight_map"].as_object().unwrap();
        let mut files: Vec<String> = weight_map
            .values()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect();
        files.sort();
        files.dedup();
        assert!(files.len() > 2, "{files:?}");
        let n = files.len();
        for (i, f) in files.iter().enumerate() {
            assert_eq!(f, &format!("model-{:05}-of-{n:05}.safetensors", i + 1));
        }

        let expected = expected_tensors(&spec);
        assert_eq!(
            weight_map.keys().collect::<Vec<_>>(),
            expected.keys().collect::<Vec<_>>()
        );
        let got = read_weights(tmp.path(), &files);
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            expected.keys().collect::<Vec<_>>()
        );
        let total: usize = got.values().map(|(_, _, d)| d.len()).sum();
        assert_eq!(index["metadata"]["total_size"].as_u64(), Some(total as u64));
        for file in &files {
            let bytes = std::fs::read(tmp.path().join(file)).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            for name in st.names() {
                assert_eq!(weight_map[name], file.as_str());
            }
        }

        // Sharding changes where tensors live, not their values.
        let single = tempfile::tempdir().unwrap();
        write_checkpoint(&tiny(7), single.path()).unwrap();
        let single_got = read_weights(single.path(), &["model.safetensors".to_owned()]);
        assert_eq!(got, single_got);
    }

    #[test]
    fn same_seed_same_bytes_other_seed_differs() {
        let spec = SynthSpec {
            shard_bytes: 50_000,
            ..tiny(11)
        };
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let c = tempfile::tempdir().unwrap();
        write_checkpoint(&spec, a.path()).unwrap();
        write_checkpoint(&spec, b.path()).unwrap();
        write_checkpoint(&SynthSpec { seed: 12, ..spec }, c.path()).unwrap();
        let (fa, fb, fc) = (
            dir_files(a.path()),
            dir_files(b.path()),
            dir_files(c.path()),
        );
        assert_eq!(fa, fb);
        assert_eq!(fa.keys().collect::<Vec<_>>(), fc.keys().collect::<Vec<_>>());
        for (name, bytes) in &fa {
            if name.ends_with(".safetensors") {
                assert_ne!(bytes, &fc[name], "{name}");
            }
        }
    }

    #[test]
    fn tokenizer_loads_and_round_trips() {
        for vocab in [MIN_VOCAB, 300, 2000] {
            let tmp = tempfile::tempdir().unwrap();
            let spec = SynthSpec { vocab, ..tiny(1) };
            write_checkpoint(&spec, tmp.path()).unwrap();
            let tok = tokenizers::Tokenizer::from_file(tmp.path().join("tokenizer.json")).unwrap();
            assert_eq!(tok.get_vocab_size(true), vocab);
            for (id, t) in SPECIAL_TOKENS.iter().enumerate() {
                assert_eq!(tok.token_to_id(t), Some(id as u32));
            }
            let text = "Hello, wörld! 123";
            let enc = tok.encode(text, true).unwrap();
            assert_eq!(enc.get_ids()[0], 1);
            assert_eq!(tok.decode(enc.get_ids(), true).unwrap(), text);
            if vocab == 2000 {
                // Learnt merges make common words shorter than their bytes.
                let ids = tok.encode(" the experts", false).unwrap();
                assert!(ids.get_ids().len() < 6, "{:?}", ids.get_tokens());
            }

            let config: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(tmp.path().join("tokenizer_config.json")).unwrap(),
            )
            .unwrap();
            assert_eq!(config["chat_template"], MIXTRAL_CHAT_TEMPLATE);
            assert_eq!(config["bos_token"], "<s>");
            assert_eq!(config["eos_token"], "</s>");
        }
    }

    #[test]
    fn byte_alphabet_matches_tokenizers() {
        let ours: HashSet<char> = byte_to_char().into_iter().collect();
        let theirs: HashSet<char> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
            .into_iter()
            .collect();
        assert_eq!(ours.len(), 256);
        assert_eq!(ours, theirs);
    }

    #[test]
    fn chat_template_matches_fixture() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/mixtral-tiny/tokenizer_config.json");
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(config["chat_template"], MIXTRAL_CHAT_TEMPLATE);
    }

    #[test]
    fn invalid_specs_name_the_field() {
        let field_of = |spec: SynthSpec| match spec.validate() {
            Err(SynthError::InvalidSpec { field, .. }) => field,
            other => panic!("expected InvalidSpec, got {other:?}"),
        };
        assert_eq!(
            field_of(SynthSpec {
                heads: 5,
                ..tiny(0)
            }),
            "heads"
        );
        assert_eq!(
            field_of(SynthSpec {
                kv_heads: 3,
                ..tiny(0)
            }),
            "kv_heads"
        );
        assert_eq!(
            field_of(SynthSpec {
                top_k: 5,
                ..tiny(0)
            }),
            "top_k"
        );
        assert_eq!(
            field_of(SynthSpec {
                vocab: 258,
                ..tiny(0)
            }),
            "vocab"
        );
        assert_eq!(
            field_of(SynthSpec {
                layers: 0,
                ..tiny(0)
            }),
            "layers"
        );
        assert_eq!(
            field_of(SynthSpec {
                head_dim: Some(0),
                ..tiny(0)
            }),
            "head_dim"
        );
        assert_eq!(
            field_of(SynthSpec {
                shard_bytes: 0,
                ..tiny(0)
            }),
            "shard_bytes"
        );
        // An explicit head_dim lifts the divisibility requirement.
        assert!(
            SynthSpec {
                heads: 5,
                kv_heads: 5,
                head_dim: Some(8),
                ..tiny(0)
            }
            .validate()
            .is_ok()
        );

        let tmp = tempfile::tempdir().unwrap();
        let err = write_checkpoint(
            &SynthSpec {
                top_k: 9,
                ..tiny(0)
            },
            tmp.path(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("top_k"), "{err}");
    }

    #[test]
    fn bf16_rounding_matches_half() {
        let mut rng = chunk_rng(0, 0, 0);
        let specials = [
            0.0f32,
            -0.0,
            1.0,
            -1.0,
            3.0e-39,
            1e30,
            // Exact ties between two bf16 values, one rounding down to even, one up.
            f32::from_bits(0x3F80_8000),
            f32::from_bits(0x3F81_8000),
        ];
        let randoms = (0..100_000).map(|_| f32::from_bits(rng.next_u32() & 0x7F7F_FFFF));
        for v in specials.into_iter().chain(randoms) {
            for v in [v, -v] {
                assert_eq!(bf16_bits(v), half::bf16::from_f32(v).to_bits(), "{v:e}");
            }
        }
    }

    #[test]
    fn dtype_parses_names() {
        for (s, d) in [
            ("f32", SynthDType::F32),
            ("float32", SynthDType::F32),
            ("bf16", SynthDType::Bf16),
            ("bfloat16", SynthDType::Bf16),
            ("f16", SynthDType::F16),
            ("float16", SynthDType::F16),
        ] {
            assert_eq!(s.parse::<SynthDType>().unwrap(), d);
        }
        assert!(matches!(
            "int8".parse::<SynthDType>(),
            Err(SynthError::UnknownDType { .. })
        ));
    }

    #[test]
    fn mixtral_8x7b_layer_size() {
        let spec = SynthSpec::mixtral_8x7b(1);
        spec.validate().unwrap();
        let per_layer: u64 = spec
            .tensors()
            .unwrap()
            .iter()
            .filter(|t| t.name.starts_with("model.layers.0."))
            .map(|t| t.bytes)
            .sum();
        let (h, f) = (4096u64, 14336u64);
        let attn = 2 * (h * h + 2 * 1024 * h + h * h);
        let experts = 2 * 8 * 3 * h * f;
        let norms_and_router = 2 * (2 * h + 8 * h);
        // ~2.9 GB (2.7 GiB) per layer in bf16.
        assert_eq!(per_layer, attn + experts + norms_and_router);
    }

    fn qwen2(seed: u64) -> SynthSpec {
        SynthSpec {
            family: Family::Qwen2Moe,
            ffn: 40,
            layers: 3,
            moe_ffn: Some(12),
            dense_layers: vec![1],
            ..tiny(seed)
        }
    }

    fn qwen3(seed: u64) -> SynthSpec {
        SynthSpec {
            family: Family::Qwen3Moe,
            ffn: 40,
            layers: 3,
            head_dim: Some(12),
            moe_ffn: Some(12),
            dense_layers: vec![0],
            ..tiny(seed)
        }
    }

    /// Every DeepSeek-V3 dimension different, so a swapped dimension cannot go unseen.
    fn deepseek(seed: u64) -> SynthSpec {
        SynthSpec {
            family: Family::DeepseekV3,
            ffn: 40,
            layers: 3,
            kv_heads: 4,
            experts: 8,
            moe_ffn: Some(12),
            q_lora_rank: Some(20),
            kv_lora_rank: Some(14),
            qk_nope_head_dim: Some(6),
            qk_rope_head_dim: Some(4),
            v_head_dim: Some(10),
            n_group: Some(4),
            topk_group: Some(2),
            n_shared_experts: Some(2),
            ..tiny(seed)
        }
    }

    /// Name -> (shape, dtype) of the Hub's checkpoints of each family, written out from
    /// the published tensor names rather than from `tensors()`.
    fn expected_family(spec: &SynthSpec) -> BTreeMap<String, (Vec<usize>, Dtype)> {
        let (h, v, e, ffn) = (spec.hidden, spec.vocab, spec.experts, spec.ffn);
        let moe = spec.moe_ffn.unwrap_or(ffn);
        let wd = spec.dtype.safetensors_dtype();
        let mut m = BTreeMap::new();
        let mut put = |name: String, shape: Vec<usize>| {
            m.insert(name, (shape, wd));
        };
        put("model.embed_tokens.weight".into(), vec![v, h]);
        put("model.norm.weight".into(), vec![h]);
        put("lm_head.weight".into(), vec![v, h]);
        let mlp = |put: &mut dyn FnMut(String, Vec<usize>), p: &str, f: usize| {
            put(format!("{p}.gate_proj.weight"), vec![f, h]);
            put(format!("{p}.up_proj.weight"), vec![f, h]);
            put(format!("{p}.down_proj.weight"), vec![h, f]);
        };
        let mut f32_names = Vec::new();
        for l in 0..spec.layers {
            let p = format!("model.layers.{l}");
            put(format!("{p}.input_layernorm.weight"), vec![h]);
            put(format!("{p}.post_attention_layernorm.weight"), vec![h]);
            let a = format!("{p}.self_attn");
            if spec.family == Family::DeepseekV3 {
                let (nope, rope) = (
                    spec.qk_nope_head_dim.unwrap(),
                    spec.qk_rope_head_dim.unwrap(),
                );
                let (kv, vd, heads) = (
                    spec.kv_lora_rank.unwrap(),
                    spec.v_head_dim.unwrap(),
                    spec.heads,
                );
                match spec.q_lora_rank {
                    Some(q) => {
                        put(format!("{a}.q_a_proj.weight"), vec![q, h]);
                        put(format!("{a}.q_a_layernorm.weight"), vec![q]);
                        put(
                            format!("{a}.q_b_proj.weight"),
                            vec![heads * (nope + rope), q],
                        );
                    }
                    None => put(format!("{a}.q_proj.weight"), vec![heads * (nope + rope), h]),
                }
                put(format!("{a}.kv_a_proj_with_mqa.weight"), vec![kv + rope, h]);
                put(format!("{a}.kv_a_layernorm.weight"), vec![kv]);
                put(
                    format!("{a}.kv_b_proj.weight"),
                    vec![heads * (nope + vd), kv],
                );
                put(format!("{a}.o_proj.weight"), vec![h, heads * vd]);
            } else {
                let hd = spec.effective_head_dim();
                let (q, kv) = (spec.heads * hd, spec.kv_heads * hd);
                put(format!("{a}.q_proj.weight"), vec![q, h]);
                put(format!("{a}.k_proj.weight"), vec![kv, h]);
                put(format!("{a}.v_proj.weight"), vec![kv, h]);
                put(format!("{a}.o_proj.weight"), vec![h, q]);
                if spec.family == Family::Qwen2Moe {
                    put(format!("{a}.q_proj.bias"), vec![q]);
                    put(format!("{a}.k_proj.bias"), vec![kv]);
                    put(format!("{a}.v_proj.bias"), vec![kv]);
                }
                if spec.family == Family::Qwen3Moe {
                    put(format!("{a}.q_norm.weight"), vec![hd]);
                    put(format!("{a}.k_norm.weight"), vec![hd]);
                }
            }
            let dense = match spec.family {
                Family::DeepseekV3 => l < spec.first_k_dense_replace.unwrap_or(1),
                _ => spec.dense_layers.contains(&l),
            };
            let p = format!("{p}.mlp");
            if dense {
                mlp(&mut put, &p, ffn);
                continue;
            }
            put(format!("{p}.gate.weight"), vec![e, h]);
            for x in 0..e {
                mlp(&mut put, &format!("{p}.experts.{x}"), moe);
            }
            match spec.family {
                Family::Qwen2Moe => {
                    let shared = spec.shared_ffn.unwrap_or(4 * moe);
                    if shared > 0 {
                        mlp(&mut put, &format!("{p}.shared_expert"), shared);
                        put(format!("{p}.shared_expert_gate.weight"), vec![1, h]);
                    }
                }
                Family::DeepseekV3 => {
                    let n = spec.n_shared_experts.unwrap_or(1);
                    if n > 0 {
                        mlp(&mut put, &format!("{p}.shared_experts"), n * moe);
                    }
                    f32_names.push(format!("{p}.gate.e_score_correction_bias"));
                }
                _ => {}
            }
        }
        for name in f32_names {
            m.insert(name, (vec![e], Dtype::F32));
        }
        m
    }

    fn all_weights(dir: &Path) -> ReadBack {
        let files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".safetensors"))
            .collect();
        read_weights(dir, &files)
    }

    #[test]
    fn families_write_the_hub_tensor_names_shapes_and_dtypes() {
        let no_q_lora = SynthSpec {
            q_lora_rank: None,
            n_shared_experts: Some(0),
            first_k_dense_replace: Some(0),
            ..deepseek(1)
        };
        let no_shared = SynthSpec {
            shared_ffn: Some(0),
            dense_layers: vec![],
            ..qwen2(1)
        };
        for spec in [qwen2(1), no_shared, qwen3(1), deepseek(1), no_q_lora] {
            let tmp = tempfile::tempdir().unwrap();
            write_checkpoint(&spec, tmp.path()).unwrap();
            let got = all_weights(tmp.path());
            let expected = expected_family(&spec);
            assert_eq!(
                got.keys().collect::<Vec<_>>(),
                expected.keys().collect::<Vec<_>>(),
                "{}",
                spec.family
            );
            for (name, (shape, dtype)) in &expected {
                let (dt, got_shape, data) = &got[name];
                assert_eq!((dt, got_shape), (dtype, shape), "{name}");
                let size = if *dtype == Dtype::F32 { 4 } else { 2 };
                assert_eq!(data.len(), shape.iter().product::<usize>() * size, "{name}");
            }
        }
    }

    #[test]
    fn family_configs_parse_to_the_written_shapes() {
        use crate::config::{AttentionKind, RopeScaling, RouterKind, SharedExpertConfig};
        let load = |spec: &SynthSpec| {
            let tmp = tempfile::tempdir().unwrap();
            write_checkpoint(spec, tmp.path()).unwrap();
            let text = std::fs::read_to_string(tmp.path().join("config.json")).unwrap();
            let json: serde_json::Value = serde_json::from_str(&text).unwrap();
            (crate::ModelConfig::from_dir(tmp.path()).unwrap(), json)
        };

        let (c, j) = load(&qwen2(0));
        assert_eq!(
            j["architectures"],
            serde_json::json!(["Qwen2MoeForCausalLM"])
        );
        assert_eq!(j["model_type"], "qwen2_moe");
        assert_eq!(j["torch_dtype"], "bfloat16");
        assert_eq!(j["mlp_only_layers"], serde_json::json!([1]));
        assert_eq!(c.family, Family::Qwen2Moe);
        assert_eq!((c.intermediate_size, c.moe_intermediate_size), (40, 12));
        assert_eq!(c.moe_layers, vec![0, 2]);
        assert_eq!((c.num_experts, c.experts_per_token), (4, 2));
        assert_eq!(
            c.shared_expert,
            Some(SharedExpertConfig {
                intermediate_size: 48,
                gated: true
            })
        );
        assert_eq!(c.router, RouterKind::SoftmaxTopK { renormalize: false });
        assert!(matches!(c.attention, AttentionKind::Gqa(o) if o.qkv_bias && !o.qk_norm));
        assert_eq!((c.num_kv_heads, c.head_dim, c.rope.theta), (2, 8, 1e6));

        let (c, j) = load(&SynthSpec {
            yarn_factor: Some(4.0),
            ..qwen3(0)
        });
        assert_eq!(
            j["architectures"],
            serde_json::json!(["Qwen3MoeForCausalLM"])
        );
        assert_eq!(j["head_dim"], 12);
        assert_eq!(j["rope_scaling"]["rope_type"], "yarn");
        assert_eq!(c.family, Family::Qwen3Moe);
        assert_eq!(c.moe_layers, vec![1, 2]);
        assert_eq!(c.head_dim, 12);
        assert_eq!(c.shared_expert, None);
        assert_eq!(c.router, RouterKind::SoftmaxTopK { renormalize: true });
        assert!(matches!(c.attention, AttentionKind::Gqa(o) if !o.qkv_bias && o.qk_norm));
        match &c.rope.scaling {
            RopeScaling::Yarn(y) => {
                assert_eq!((y.factor, y.original_max_position_embeddings), (4.0, 128))
            }
            other => panic!("{other:?}"),
        }

        let (c, j) = load(&SynthSpec {
            yarn_factor: Some(8.0),
            routed_scaling_factor: Some(1.5),
            ..deepseek(0)
        });
        assert_eq!(
            j["architectures"],
            serde_json::json!(["DeepseekV3ForCausalLM"])
        );
        assert_eq!(j["scoring_func"], "sigmoid");
        assert_eq!(j["topk_method"], "noaux_tc");
        assert_eq!(j["n_routed_experts"], 8);
        assert_eq!(j["rope_scaling"]["type"], "yarn");
        assert_eq!(j["rope_scaling"]["original_max_position_embeddings"], 64);
        assert_eq!(c.family, Family::DeepseekV3);
        assert_eq!((c.intermediate_size, c.moe_intermediate_size), (40, 12));
        assert_eq!(c.moe_layers, vec![1, 2]);
        assert_eq!(c.expert_layers(), 2);
        assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (4, 4, 10));
        match c.attention {
            AttentionKind::Mla(d) => {
                assert_eq!(d.q_lora_rank, Some(20));
                assert_eq!(
                    (
                        d.kv_lora_rank,
                        d.qk_nope_head_dim,
                        d.qk_rope_head_dim,
                        d.v_head_dim
                    ),
                    (14, 6, 4, 10)
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            c.router,
            RouterKind::SigmoidGrouped {
                groups: 4,
                topk_groups: 2,
                renormalize: true,
                scaling: 1.5
            }
        );
        assert_eq!(
            c.shared_expert,
            Some(SharedExpertConfig {
                intermediate_size: 24,
                gated: false
            })
        );
        assert_eq!((c.rope.dim, c.rope.interleaved), (4, true));
        assert!(
            matches!(&c.rope.scaling, RopeScaling::Yarn(y) if y.factor == 8.0 && y.mscale_all_dim == Some(1.0))
        );

        let (c, j) = load(&SynthSpec {
            q_lora_rank: None,
            ..deepseek(0)
        });
        assert!(j["q_lora_rank"].is_null());
        assert!(matches!(c.attention, AttentionKind::Mla(d) if d.q_lora_rank.is_none()));
        assert_eq!(c.rope.scaling, RopeScaling::None);

        let (c, _) = load(&tiny(0));
        assert_eq!(c.family, Family::Mixtral);
        assert_eq!(c.moe_intermediate_size, 48);
    }

    #[test]
    fn defaults_derive_from_the_other_shapes() {
        let ds = SynthSpec {
            family: Family::DeepseekV3,
            hidden: 16,
            ffn: 24,
            layers: 61,
            heads: 2,
            kv_heads: 2,
            experts: 256,
            top_k: 8,
            ..tiny(0)
        }
        .resolved()
        .unwrap();
        assert_eq!(ds.q_lora_rank, None);
        assert_eq!(
            (
                ds.kv_lora_rank,
                ds.qk_nope_head_dim,
                ds.qk_rope_head_dim,
                ds.v_head_dim
            ),
            (Some(8), Some(8), Some(4), Some(8))
        );
        assert_eq!(ds.moe_ffn, Some(24));
        assert_eq!((ds.n_group, ds.topk_group), (Some(8), Some(4)));
        assert_eq!(ds.first_k_dense_replace, Some(1));
        assert_eq!(ds.n_shared_experts, Some(1));
        assert_eq!(ds.routed_scaling_factor, Some(2.5));
        assert_eq!(ds.norm_topk_prob, Some(true));
        assert_eq!(ds.moe_layers().unwrap(), (1..61).collect::<Vec<_>>());
        assert_eq!(SynthSpec::default_q_lora_rank(16), 12);

        // Groups shrink to divide the experts; topk_group grows until top_k fits.
        let ds = SynthSpec {
            family: Family::DeepseekV3,
            kv_heads: 4,
            experts: 6,
            top_k: 6,
            layers: 1,
            ..tiny(0)
        }
        .resolved()
        .unwrap();
        assert_eq!((ds.n_group, ds.topk_group), (Some(2), Some(2)));
        assert_eq!(ds.first_k_dense_replace, Some(0));
        // A tiny head still gets an even RoPE part.
        let ds = SynthSpec {
            family: Family::DeepseekV3,
            hidden: 8,
            heads: 8,
            kv_heads: 8,
            ..tiny(0)
        }
        .resolved()
        .unwrap();
        assert_eq!(
            (ds.qk_nope_head_dim, ds.qk_rope_head_dim),
            (Some(2), Some(2))
        );

        let q2 = SynthSpec {
            family: Family::Qwen2Moe,
            moe_ffn: Some(10),
            ..tiny(0)
        }
        .resolved()
        .unwrap();
        assert_eq!((q2.shared_ffn, q2.norm_topk_prob), (Some(40), Some(false)));
        assert!(q2.dense_layers.is_empty());
        let q3 = SynthSpec {
            family: Family::Qwen3Moe,
            ..tiny(0)
        }
        .resolved()
        .unwrap();
        assert_eq!(
            (q3.moe_ffn, q3.shared_ffn, q3.norm_topk_prob),
            (Some(48), None, Some(true))
        );
        let m = tiny(0).resolved().unwrap();
        assert_eq!(m.moe_ffn, Some(m.ffn));
    }

    #[test]
    fn impossible_family_shapes_name_the_field() {
        let field_of = |spec: SynthSpec| match spec.validate() {
            Err(SynthError::InvalidSpec { field, .. }) => field,
            other => panic!("expected InvalidSpec, got {other:?}"),
        };
        let ds = deepseek(0);
        let cases: Vec<(SynthSpec, &str)> = vec![
            (
                SynthSpec {
                    n_group: Some(3),
                    ..ds.clone()
                },
                "n_group",
            ),
            (
                SynthSpec {
                    n_group: Some(0),
                    ..ds.clone()
                },
                "n_group",
            ),
            (
                SynthSpec {
                    topk_group: Some(5),
                    ..ds.clone()
                },
                "topk_group",
            ),
            // 6 experts from 2 groups of 2.
            (
                SynthSpec {
                    top_k: 6,
                    ..ds.clone()
                },
                "top_k",
            ),
            (
                SynthSpec {
                    first_k_dense_replace: Some(3),
                    ..ds.clone()
                },
                "first_k_dense_replace",
            ),
            (
                SynthSpec {
                    qk_rope_head_dim: Some(3),
                    ..ds.clone()
                },
                "qk_rope_head_dim",
            ),
            (
                SynthSpec {
                    kv_lora_rank: Some(0),
                    ..ds.clone()
                },
                "kv_lora_rank",
            ),
            (
                SynthSpec {
                    q_lora_rank: Some(0),
                    ..ds.clone()
                },
                "q_lora_rank",
            ),
            (
                SynthSpec {
                    kv_heads: 2,
                    ..ds.clone()
                },
                "kv_heads",
            ),
            (
                SynthSpec {
                    head_dim: Some(8),
                    ..ds.clone()
                },
                "head_dim",
            ),
            (
                SynthSpec {
                    routed_scaling_factor: Some(0.0),
                    ..ds.clone()
                },
                "routed_scaling_factor",
            ),
            (
                SynthSpec {
                    routed_scaling_factor: Some(f64::NAN),
                    ..ds.clone()
                },
                "routed_scaling_factor",
            ),
            (
                SynthSpec {
                    dense_layers: vec![0],
                    ..ds.clone()
                },
                "dense_layers",
            ),
            (
                SynthSpec {
                    shared_ffn: Some(8),
                    ..ds.clone()
                },
                "shared_ffn",
            ),
            (
                SynthSpec {
                    moe_ffn: Some(0),
                    ..ds.clone()
                },
                "moe_ffn",
            ),
            (
                SynthSpec {
                    kv_lora_rank: Some(4),
                    ..qwen3(0)
                },
                "kv_lora_rank",
            ),
            (
                SynthSpec {
                    n_group: Some(2),
                    ..qwen2(0)
                },
                "n_group",
            ),
            (
                SynthSpec {
                    shared_ffn: Some(8),
                    ..qwen3(0)
                },
                "shared_ffn",
            ),
            (
                SynthSpec {
                    dense_layers: vec![3],
                    ..qwen3(0)
                },
                "dense_layers",
            ),
            (
                SynthSpec {
                    dense_layers: vec![0, 1, 2],
                    ..qwen3(0)
                },
                "dense_layers",
            ),
            (
                SynthSpec {
                    head_dim: Some(7),
                    ..qwen3(0)
                },
                "head_dim",
            ),
            (
                SynthSpec {
                    dense_layers: vec![0],
                    ..tiny(0)
                },
                "dense_layers",
            ),
            (
                SynthSpec {
                    moe_ffn: Some(10),
                    ..tiny(0)
                },
                "moe_ffn",
            ),
            (
                SynthSpec {
                    norm_topk_prob: Some(false),
                    ..tiny(0)
                },
                "norm_topk_prob",
            ),
            (
                SynthSpec {
                    yarn_factor: Some(0.5),
                    ..tiny(0)
                },
                "yarn_factor",
            ),
            (
                SynthSpec {
                    yarn_factor: Some(f64::INFINITY),
                    ..tiny(0)
                },
                "yarn_factor",
            ),
            (
                SynthSpec {
                    yarn_factor: Some(2000.0),
                    ..tiny(0)
                },
                "yarn_factor",
            ),
        ];
        for (spec, field) in cases {
            assert_eq!(field_of(spec.clone()), field, "{spec:?}");
        }
        let text = SynthSpec {
            kv_lora_rank: Some(4),
            ..qwen3(0)
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(
            text.contains("deepseek_v3") && text.contains("qwen3_moe"),
            "{text}"
        );
        let text = SynthSpec { top_k: 6, ..ds }
            .validate()
            .unwrap_err()
            .to_string();
        assert!(text.contains("topk_group (2) groups of 2"), "{text}");
    }

    #[test]
    fn total_bytes_counts_every_tensor_of_every_family() {
        for spec in [qwen2(3), qwen3(3), deepseek(3)] {
            let spec = SynthSpec {
                shard_bytes: 30_000,
                ..spec
            };
            let tmp = tempfile::tempdir().unwrap();
            write_checkpoint(&spec, tmp.path()).unwrap();
            let index: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(tmp.path().join("model.safetensors.index.json")).unwrap(),
            )
            .unwrap();
            let got = all_weights(tmp.path());
            let sum: usize = got.values().map(|(_, _, d)| d.len()).sum();
            let total = spec.total_bytes().unwrap();
            assert_eq!(total, sum as u64, "{}", spec.family);
            assert_eq!(index["metadata"]["total_size"].as_u64(), Some(total));
            assert_eq!(index["weight_map"].as_object().unwrap().len(), got.len());

            // Sharding changes where tensors live, not their values.
            let single = tempfile::tempdir().unwrap();
            write_checkpoint(
                &SynthSpec {
                    shard_bytes: 1 << 30,
                    ..spec.clone()
                },
                single.path(),
            )
            .unwrap();
            assert_eq!(all_weights(single.path()), got);
        }
    }

    #[test]
    fn new_tensors_have_the_intended_scale() {
        let tmp = tempfile::tempdir().unwrap();
        let spec = SynthSpec {
            dtype: SynthDType::F32,
            ..deepseek(5)
        };
        write_checkpoint(&spec, tmp.path()).unwrap();
        let got = all_weights(tmp.path());
        let std = |name: &str| {
            let v = as_f32(&got[name].2);
            let mean = v.iter().sum::<f32>() / v.len() as f32;
            (v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / v.len() as f32).sqrt()
        };
        let bias = as_f32(&got["model.layers.1.mlp.gate.e_score_correction_bias"].2);
        assert!(bias.iter().all(|b| b.abs() <= CORRECTION_BIAS_BOUND));
        assert!(bias.iter().any(|b| *b != 0.0));
        for x in as_f32(&got["model.layers.0.self_attn.kv_a_layernorm.weight"].2) {
            assert!((x - 1.0).abs() <= NORM_NOISE, "norm {x}");
        }
        let kv_b = std("model.layers.2.self_attn.kv_b_proj.weight");
        let want = 1.0 / 14f32.sqrt();
        assert!((kv_b / want - 1.0).abs() < 0.15, "kv_b std {kv_b}");

        // bf16 weights keep the f32 correction bias.
        let tmp = tempfile::tempdir().unwrap();
        write_checkpoint(&deepseek(5), tmp.path()).unwrap();
        let got = all_weights(tmp.path());
        assert_eq!(
            got["model.layers.1.mlp.gate.e_score_correction_bias"].0,
            Dtype::F32
        );
        assert_eq!(got["model.layers.1.mlp.gate.weight"].0, Dtype::BF16);

        let tmp = tempfile::tempdir().unwrap();
        let spec = SynthSpec {
            dtype: SynthDType::F32,
            ..qwen2(5)
        };
        write_checkpoint(&spec, tmp.path()).unwrap();
        let got = all_weights(tmp.path());
        let qb = as_f32(&got["model.layers.0.self_attn.q_proj.bias"].2);
        assert!(qb.iter().all(|b| b.abs() <= uniform_bound(QKV_BIAS_STD)));
    }

    #[test]
    fn router_skew_is_validated_and_zero_edits_nothing() {
        for bad in [-0.1, f64::NAN, f64::INFINITY] {
            let err = SynthSpec {
                router_skew: bad,
                ..tiny(0)
            }
            .validate()
            .unwrap_err();
            assert!(
                matches!(
                    err,
                    SynthError::InvalidSpec {
                        field: "router_skew",
                        ..
                    }
                ),
                "{bad}: {err}"
            );
        }
        for spec in [tiny(0), qwen2(0), qwen3(0), deepseek(0)] {
            assert!(spec.tensors().unwrap().iter().all(|t| t.edits.is_empty()));
            let skewed = SynthSpec {
                router_skew: 1.0,
                ..spec
            };
            skewed.validate().unwrap();
            let tensors = skewed.tensors().unwrap();
            let routers = tensors
                .iter()
                .filter(|t| t.edits.iter().any(|e| matches!(e, Edit::Router { .. })))
                .count();
            assert_eq!(routers, skewed.moe_layers().unwrap().len());
        }
    }

    #[test]
    fn skewed_checkpoints_keep_the_skew_coordinate_to_the_routers() {
        let spec = SynthSpec {
            dtype: SynthDType::F32,
            router_skew: 1.5,
            ..qwen2(3)
        };
        let tmp = tempfile::tempdir().unwrap();
        write_checkpoint(&spec, tmp.path()).unwrap();
        let got = all_weights(tmp.path());
        let h = spec.hidden;
        let embed = as_f32(&got["model.embed_tokens.weight"].2);
        assert!(embed.chunks(h).all(|row| row[SKEW_COORD] == SKEW_DC));
        let o = as_f32(&got["model.layers.0.self_attn.o_proj.weight"].2);
        let cols = o.len() / h;
        assert!(
            o[SKEW_COORD * cols..(SKEW_COORD + 1) * cols]
                .iter()
                .all(|v| *v == 0.0)
        );
        let q = as_f32(&got["model.layers.0.self_attn.q_proj.weight"].2);
        assert!(q.chunks(h).all(|row| row[SKEW_COORD] == 0.0));
        let gate = as_f32(&got["model.layers.0.mlp.gate.weight"].2);
        let offsets: Vec<f32> = gate.chunks(h).map(|row| row[SKEW_COORD]).collect();
        let hot = skew_permutation(spec.seed, 0, spec.experts)[0];
        assert!(offsets.iter().all(|o| o.is_finite() && *o <= offsets[hot]));
        assert!(offsets.iter().any(|o| *o < offsets[hot]));
    }

    #[test]
    fn zipf_offsets_fall_with_rank() {
        let o = zipf_offsets(1.2, 16, 2);
        assert!(o.windows(2).all(|w| w[0] > w[1]), "{o:?}");
        assert_eq!(zipf_offsets(0.0, 16, 2), vec![0.0; 16]);
        // Unreachable shares (rank 1 above 1/k of picks) stay finite.
        assert!(zipf_offsets(6.0, 8, 4).iter().all(|o| o.is_finite()));
    }

    #[test]
    fn family_names_parse() {
        for (s, f) in [
            ("mixtral", Family::Mixtral),
            ("qwen2_moe", Family::Qwen2Moe),
            ("Qwen3-MoE", Family::Qwen3Moe),
            ("deepseek_v3", Family::DeepseekV3),
            ("deepseek-v3", Family::DeepseekV3),
        ] {
            assert_eq!(parse_family(s).unwrap(), f);
        }
        let err = parse_family("llama").unwrap_err().to_string();
        assert!(
            err.contains("llama") && err.contains("deepseek_v3"),
            "{err}"
        );
    }

    /// The published models' shapes give their published parameter counts: the tensor
    /// shapes of every family are the real ones.
    #[test]
    fn published_shapes_have_published_parameter_counts() {
        let params = |spec: &SynthSpec| -> u64 {
            spec.validate().unwrap();
            spec.tensors()
                .unwrap()
                .iter()
                .map(|t| t.shape.iter().product::<usize>() as u64)
                .sum()
        };
        let deepseek_v3 = SynthSpec {
            family: Family::DeepseekV3,
            hidden: 7168,
            ffn: 18432,
            moe_ffn: Some(2048),
            layers: 61,
            heads: 128,
            kv_heads: 128,
            experts: 256,
            top_k: 8,
            vocab: 129280,
            max_position: 163840,
            q_lora_rank: Some(1536),
            kv_lora_rank: Some(512),
            qk_nope_head_dim: Some(128),
            qk_rope_head_dim: Some(64),
            v_head_dim: Some(128),
            first_k_dense_replace: Some(3),
            n_group: Some(8),
            topk_group: Some(4),
            n_shared_experts: Some(1),
            yarn_factor: Some(40.0),
            ..SynthSpec::default()
        };
        let qwen3_30b = SynthSpec {
            family: Family::Qwen3Moe,
            hidden: 2048,
            ffn: 6144,
            moe_ffn: Some(768),
            layers: 48,
            heads: 32,
            kv_heads: 4,
            head_dim: Some(128),
            experts: 128,
            top_k: 8,
            vocab: 151936,
            ..SynthSpec::default()
        };
        let qwen15_moe = SynthSpec {
            family: Family::Qwen2Moe,
            hidden: 2048,
            ffn: 5632,
            moe_ffn: Some(1408),
            shared_ffn: Some(5632),
            layers: 24,
            heads: 16,
            kv_heads: 16,
            experts: 60,
            top_k: 4,
            vocab: 151936,
            ..SynthSpec::default()
        };
        for (spec, published) in [
            // 671B without the multi-token-prediction layer.
            (&deepseek_v3, 671e9),
            (&qwen3_30b, 30.5e9),
            (&qwen15_moe, 14.3e9),
            (&SynthSpec::default(), 46.7e9),
        ] {
            let n = params(spec) as f64;
            assert!((n / published - 1.0).abs() < 0.01, "{}: {n}", spec.family);
        }
    }
}
