//! `config.json` of the MoE families Switchyard serves, in both styles found on the Hub.
//!
//! Older writers (Mixtral-8x7B, Qwen3-30B-A3B, DeepSeek-V3 as published) put `rope_theta`
//! and `rope_scaling` at the top level and say `torch_dtype`; newer ones (transformers 5)
//! nest RoPE under `rope_parameters` and say `dtype`. Every family parses into one
//! [`ModelConfig`] whose fields are checked for consistency, so later code never has to.
//! What differs per family (field names, which layers route, the router's rule) lives in
//! [`crate::family`]; this file holds what all families share.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::dtype::DType;
use crate::family::Family;
use crate::quant::Quantization;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("config: missing field `{0}`")]
    Missing(&'static str),
    #[error("config: field `{field}` {problem}")]
    Invalid {
        field: &'static str,
        problem: String,
    },
    #[error("config: unsupported model_type `{0}` (supported: {supported})", supported = Family::SUPPORTED.join(", "))]
    UnsupportedModel(String),
    #[error(transparent)]
    Quantization(#[from] crate::quant::QuantError),
}

/// How a layer attends.
#[derive(Debug, Clone, PartialEq)]
pub enum AttentionKind {
    /// Grouped-query attention (`num_heads`, `num_kv_heads`, `head_dim` of [`ModelConfig`]).
    Gqa(GqaOptions),
    /// DeepSeek's multi-head latent attention.
    Mla(MlaDims),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GqaOptions {
    /// Biases on the q, k and v projections (Qwen2-MoE).
    pub qkv_bias: bool,
    /// A bias on the output projection (Qwen3-MoE with `attention_bias`).
    pub o_bias: bool,
    /// Per-head RMSNorm of q and k before RoPE (Qwen3-MoE).
    pub qk_norm: bool,
}

/// The shapes of multi-head latent attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MlaDims {
    /// `None`: queries come straight from `q_proj`; else through a rank-`r` bottleneck.
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
}

impl MlaDims {
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Values cached per token and layer: the latent and the shared RoPE key.
    pub fn latent_dim(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }
}

/// Rotary position embedding: which dimensions rotate, by which frequencies.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    /// Rotated dimensions per head (the head dim, or MLA's `qk_rope_head_dim`).
    pub dim: usize,
    /// Pairs `(2i, 2i + 1)` rotate together (DeepSeek's layout) instead of `(i, i + dim/2)`.
    pub interleaved: bool,
    pub scaling: RopeScaling,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// YaRN (arXiv 2309.00071), with transformers' defaults for absent fields.
    Yarn(Yarn),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Yarn {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub mscale: Option<f64>,
    pub mscale_all_dim: Option<f64>,
    /// Multiplies cos and sin; derived from the mscales when absent.
    pub attention_factor: Option<f64>,
    pub truncate: bool,
}

/// YaRN's magnitude correction for a context stretched `scale` times.
pub fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

impl RopeConfig {
    /// Inverse frequencies, `dim / 2` of them (transformers' `_compute_yarn_parameters`
    /// for YaRN).
    pub fn inv_freq(&self) -> Vec<f64> {
        let dim = self.dim as f64;
        let pos_freqs: Vec<f64> = (0..self.dim / 2)
            .map(|i| self.theta.powf((2 * i) as f64 / dim))
            .collect();
        match &self.scaling {
            RopeScaling::None => pos_freqs.iter().map(|p| 1.0 / p).collect(),
            RopeScaling::Yarn(y) => {
                let correction_dim = |rotations: f64| {
                    dim * (y.original_max_position_embeddings as f64
                        / (rotations * 2.0 * std::f64::consts::PI))
                        .ln()
                        / (2.0 * self.theta.ln())
                };
                let (mut low, mut high) =
                    (correction_dim(y.beta_fast), correction_dim(y.beta_slow));
                if y.truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
                if low == high {
                    high += 0.001;
                }
                pos_freqs
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let extrapolation = 1.0 - ramp;
                        (1.0 / (y.factor * p)) * (1.0 - extrapolation) + (1.0 / p) * extrapolation
                    })
                    .collect()
            }
        }
    }

    /// The factor cos and sin are multiplied by (1 without scaling).
    pub fn attention_factor(&self) -> f64 {
        match &self.scaling {
            RopeScaling::None => 1.0,
            RopeScaling::Yarn(y) => y.attention_factor.unwrap_or_else(|| {
                match (
                    y.mscale.filter(|m| *m != 0.0),
                    y.mscale_all_dim.filter(|m| *m != 0.0),
                ) {
                    (Some(m), Some(all)) => yarn_mscale(y.factor, m) / yarn_mscale(y.factor, all),
                    _ => yarn_mscale(y.factor, 1.0),
                }
            }),
        }
    }

    /// DeepSeek's extra factor on the softmax scale (`yarn_apply_mscale`: `mscale_all_dim`
    /// squared), 1 without YaRN.
    pub fn softmax_mscale(&self) -> f64 {
        match &self.scaling {
            RopeScaling::Yarn(y) => match y.mscale_all_dim.filter(|m| *m != 0.0) {
                Some(all) => yarn_mscale(y.factor, all).powi(2),
                None => 1.0,
            },
            RopeScaling::None => 1.0,
        }
    }
}

/// How a MoE layer's router turns logits into (expert, weight) choices.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RouterKind {
    /// Softmax over all experts, top-k, renormalised to sum to one when `renormalize`
    /// (Mixtral always; Qwen by `norm_topk_prob`).
    SoftmaxTopK { renormalize: bool },
    /// DeepSeek-V3's `noaux_tc`: sigmoid scores plus a per-expert correction bias choose
    /// the experts, within the `topk_groups` best of `groups` groups (ranked by the sum of
    /// their two best biased scores); the weights are the unbiased scores, renormalised
    /// when `renormalize`, times `scaling`.
    SigmoidGrouped {
        groups: usize,
        topk_groups: usize,
        renormalize: bool,
        scaling: f32,
    },
}

/// A dense expert every token of a MoE layer passes through, beside the routed ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedExpertConfig {
    pub intermediate_size: usize,
    /// Scaled by `sigmoid(shared_expert_gate(x))` (Qwen2-MoE).
    pub gated: bool,
}

/// Everything the engine needs to know about a model's shapes.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub model_type: String,
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// The FFN width of dense-MLP layers (Mixtral has none; there it equals the experts').
    pub intermediate_size: usize,
    /// The FFN width of one routed expert.
    pub moe_intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    pub num_heads: usize,
    /// GQA: key/value heads. MLA: `num_heads` (every head has its own expanded K and V).
    pub num_kv_heads: usize,
    /// GQA: the head dim. MLA: the query/key head dim (`qk_nope + qk_rope`).
    pub head_dim: usize,
    pub attention: AttentionKind,
    pub rope: RopeConfig,
    pub num_experts: usize,
    pub experts_per_token: usize,
    /// The decoder layers that route to experts, in order. Expert layer `i` (the layer
    /// number on the wire, in placements and in metrics) is decoder layer `moe_layers[i]`.
    pub moe_layers: Vec<usize>,
    pub router: RouterKind,
    pub shared_expert: Option<SharedExpertConfig>,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The dtype the checkpoint declares; the tensors' own dtypes are what gets loaded.
    pub dtype: Option<DType>,
    pub quantization: Quantization,
}

impl ModelConfig {
    pub fn from_dir(dir: &Path) -> Result<Self, ConfigError> {
        Self::from_file(&dir.join("config.json"))
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_owned(),
            source,
        })?;
        let value: Value = serde_json::from_str(&text).map_err(|source| ConfigError::Json {
            path: path.to_owned(),
            source,
        })?;
        Self::from_json(&value)
    }

    pub fn from_json(value: &Value) -> Result<Self, ConfigError> {
        let obj = value.as_object().ok_or(ConfigError::Invalid {
            field: "(root)",
            problem: "must be a JSON object".into(),
        })?;
        let model_type = str_field(obj, "model_type")?;
        let family = Family::from_model_type(&model_type)
            .ok_or_else(|| ConfigError::UnsupportedModel(model_type.clone()))?;
        let config = family.parse_config(obj, Common::parse(obj, model_type, family)?)?;
        config.check()?;
        Ok(config)
    }

    /// Cross-field checks every family's config must pass.
    fn check(&self) -> Result<(), ConfigError> {
        if self.experts_per_token > self.num_experts {
            return Err(ConfigError::Invalid {
                field: "num_experts_per_tok",
                problem: format!(
                    "{} exceeds the number of experts {}",
                    self.experts_per_token, self.num_experts
                ),
            });
        }
        if self.moe_layers.is_empty() {
            return Err(ConfigError::Invalid {
                field: "num_hidden_layers",
                problem: "no layer routes to experts: this is not a MoE model".into(),
            });
        }
        if self.rope.dim == 0 || !self.rope.dim.is_multiple_of(2) {
            return Err(ConfigError::Invalid {
                field: "head_dim",
                problem: format!(
                    "{} rotary dimensions; rotary embeddings need an even, positive number",
                    self.rope.dim
                ),
            });
        }
        Ok(())
    }

    /// Query heads that share one KV head.
    pub fn gqa_group(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// GQA's key (and value) width per token and layer.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Values the KV cache holds per token and layer: (keys, values). MLA caches its
    /// latent and shared RoPE key as one row and no separate values.
    pub fn kv_cache_dims(&self) -> (usize, usize) {
        match &self.attention {
            AttentionKind::Gqa(_) => (self.kv_dim(), self.kv_dim()),
            AttentionKind::Mla(m) => (m.latent_dim(), 0),
        }
    }

    /// f32 bytes of KV cache per token and layer.
    pub fn kv_bytes_per_token_per_layer(&self) -> usize {
        let (k, v) = self.kv_cache_dims();
        (k + v) * std::mem::size_of::<f32>()
    }

    /// Values per token and layer that K and V would take expanded: what an MLA cache
    /// saves against (equal to the cache for GQA).
    pub fn expanded_kv_values_per_token_per_layer(&self) -> usize {
        match &self.attention {
            AttentionKind::Gqa(_) => 2 * self.kv_dim(),
            AttentionKind::Mla(m) => self.num_heads * (m.qk_head_dim() + m.v_head_dim),
        }
    }

    /// One line for logs and `verify`: the family, its layer mix, and the KV cache cost.
    pub fn summary(&self) -> String {
        let dense = self.num_layers - self.expert_layers();
        let shared = match self.shared_expert {
            Some(s) if s.gated => " + a gated shared expert",
            Some(_) => " + shared experts",
            None => "",
        };
        let (k, v) = self.kv_cache_dims();
        let attention = match &self.attention {
            AttentionKind::Gqa(_) => format!("GQA {}/{} heads", self.num_heads, self.num_kv_heads),
            AttentionKind::Mla(_) => format!(
                "MLA {} heads, latent cache (expanded K and V would be {} values)",
                self.num_heads,
                self.expanded_kv_values_per_token_per_layer()
            ),
        };
        format!(
            "{}: {} layers ({} MoE, {dense} dense), {} experts top-{}{shared}, {attention}; KV cache {} values = {} bytes (f32) per token per layer",
            self.model_type,
            self.num_layers,
            self.expert_layers(),
            self.num_experts,
            self.experts_per_token,
            k + v,
            self.kv_bytes_per_token_per_layer(),
        )
    }

    /// Layers whose experts are routed: the `layer` of every expert-side API.
    pub fn expert_layers(&self) -> usize {
        self.moe_layers.len()
    }

    /// The decoder layer of expert layer `expert_layer`.
    pub fn decoder_layer_of(&self, expert_layer: usize) -> Option<usize> {
        self.moe_layers.get(expert_layer).copied()
    }
}

/// The fields every family names the same way.
pub(crate) struct Common {
    pub model_type: String,
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub dtype: Option<DType>,
    pub quantization: Quantization,
}

/// What a family's parser decides; [`Common`] holds the rest.
pub(crate) struct FamilyShape {
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub attention: AttentionKind,
    pub rope: RopeConfig,
    pub num_experts: usize,
    pub experts_per_token: usize,
    pub moe_layers: Vec<usize>,
    pub router: RouterKind,
    pub shared_expert: Option<SharedExpertConfig>,
}

impl Common {
    pub(crate) fn with(self, f: FamilyShape) -> ModelConfig {
        ModelConfig {
            model_type: self.model_type,
            family: self.family,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: f.intermediate_size,
            moe_intermediate_size: f.moe_intermediate_size,
            num_layers: self.num_layers,
            num_heads: self.num_heads,
            num_kv_heads: f.num_kv_heads,
            head_dim: f.head_dim,
            attention: f.attention,
            rope: f.rope,
            num_experts: f.num_experts,
            experts_per_token: f.experts_per_token,
            moe_layers: f.moe_layers,
            router: f.router,
            shared_expert: f.shared_expert,
            max_position_embeddings: self.max_position_embeddings,
            rms_norm_eps: self.rms_norm_eps,
            tie_word_embeddings: self.tie_word_embeddings,
            bos_token_id: self.bos_token_id,
            eos_token_ids: self.eos_token_ids,
            dtype: self.dtype,
            quantization: self.quantization,
        }
    }

    fn parse(
        obj: &Map<String, Value>,
        model_type: String,
        family: Family,
    ) -> Result<Self, ConfigError> {
        if let Some(act) = obj.get("hidden_act").and_then(Value::as_str)
            && act != "silu"
        {
            return Err(ConfigError::Invalid {
                field: "hidden_act",
                problem: format!("is `{act}`, only `silu` is supported"),
            });
        }
        let dtype = match obj.get("dtype").or_else(|| obj.get("torch_dtype")) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => {
                Some(s.parse::<DType>().map_err(|e| ConfigError::Invalid {
                    field: "dtype",
                    problem: e.to_string(),
                })?)
            }
            Some(other) => {
                return Err(ConfigError::Invalid {
                    field: "dtype",
                    problem: format!("must be a string, got {other}"),
                });
            }
        };
        Ok(Common {
            model_type,
            family,
            vocab_size: positive(obj, "vocab_size")?,
            hidden_size: positive(obj, "hidden_size")?,
            num_layers: positive(obj, "num_hidden_layers")?,
            num_heads: positive(obj, "num_attention_heads")?,
            max_position_embeddings: positive(obj, "max_position_embeddings")?,
            rms_norm_eps: positive_float(obj, "rms_norm_eps")?,
            tie_word_embeddings: bool_field(obj, "tie_word_embeddings", false)?,
            bos_token_id: token_ids(obj, "bos_token_id")?.first().copied(),
            eos_token_ids: token_ids(obj, "eos_token_id")?,
            dtype,
            quantization: Quantization::from_config_json(obj)?,
        })
    }
}

/// GQA head shapes: `num_key_value_heads` (absent means plain multi-head attention) and
/// `head_dim` (absent means `hidden_size / num_attention_heads`).
pub(crate) fn gqa_heads(
    obj: &Map<String, Value>,
    hidden_size: usize,
    num_heads: usize,
) -> Result<(usize, usize), ConfigError> {
    let num_kv_heads = match obj.get("num_key_value_heads") {
        None | Some(Value::Null) => num_heads,
        Some(_) => positive(obj, "num_key_value_heads")?,
    };
    let head_dim = match obj.get("head_dim") {
        None | Some(Value::Null) => {
            if !hidden_size.is_multiple_of(num_heads) {
                return Err(ConfigError::Invalid {
                    field: "head_dim",
                    problem: format!(
                        "is absent and hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads}"
                    ),
                });
            }
            hidden_size / num_heads
        }
        Some(_) => positive(obj, "head_dim")?,
    };
    if !num_heads.is_multiple_of(num_kv_heads) {
        return Err(ConfigError::Invalid {
            field: "num_key_value_heads",
            problem: format!("{num_kv_heads} does not divide num_attention_heads {num_heads}"),
        });
    }
    if head_dim % 2 != 0 {
        return Err(ConfigError::Invalid {
            field: "head_dim",
            problem: format!("{head_dim} is odd; rotary embeddings need an even head_dim"),
        });
    }
    Ok((num_kv_heads, head_dim))
}

/// Refuses a sliding window shorter than the context (a window at least as long as the
/// context never masks anything). `enabled`: the family's own switch, if it has one.
pub(crate) fn no_sliding_window(
    obj: &Map<String, Value>,
    enabled: bool,
    max_positions: usize,
) -> Result<(), ConfigError> {
    if !enabled {
        return Ok(());
    }
    if let Some(w) = obj.get("sliding_window")
        && !w.is_null()
        && w.as_u64() != Some(0)
    {
        let window = positive(obj, "sliding_window")?;
        if window < max_positions {
            return Err(ConfigError::Invalid {
                field: "sliding_window",
                problem: format!(
                    "{window} is shorter than the context ({max_positions}); sliding-window attention is not supported yet"
                ),
            });
        }
    }
    Ok(())
}

/// RoPE in either style: `rope_parameters {rope_type, rope_theta, ...}` (transformers 5)
/// or top-level `rope_theta` with an optional `rope_scaling {type | rope_type, ...}`.
pub(crate) fn rope_config(
    obj: &Map<String, Value>,
    dim: usize,
    interleaved: bool,
    default_theta: f64,
    max_positions: usize,
) -> Result<RopeConfig, ConfigError> {
    let (params, params_field, theta) = match obj.get("rope_parameters").filter(|v| !v.is_null()) {
        Some(params) => {
            let params = params.as_object().ok_or(ConfigError::Invalid {
                field: "rope_parameters",
                problem: "must be an object".into(),
            })?;
            let theta = positive_float(params, "rope_theta").map_err(|e| match e {
                ConfigError::Missing(_) => ConfigError::Missing("rope_parameters.rope_theta"),
                ConfigError::Invalid { problem, .. } => ConfigError::Invalid {
                    field: "rope_parameters.rope_theta",
                    problem,
                },
                other => other,
            })?;
            (Some(params), "rope_parameters", theta)
        }
        None => {
            let theta = match obj.get("rope_theta") {
                None | Some(Value::Null) => default_theta,
                Some(_) => positive_float(obj, "rope_theta")?,
            };
            let scaling = obj.get("rope_scaling").filter(|v| !v.is_null());
            let scaling = scaling
                .map(|s| {
                    s.as_object().ok_or(ConfigError::Invalid {
                        field: "rope_scaling",
                        problem: "must be an object".into(),
                    })
                })
                .transpose()?;
            (scaling, "rope_scaling", theta)
        }
    };
    let kind = params
        .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let scaling = match kind {
        "default" => RopeScaling::None,
        "yarn" => {
            let p = params.ok_or(ConfigError::Missing("rope_scaling"))?;
            let rename = |e: ConfigError, field: &'static str| match e {
                ConfigError::Invalid { problem, .. } => ConfigError::Invalid { field, problem },
                ConfigError::Missing(_) => ConfigError::Missing(field),
                other => other,
            };
            let opt_float =
                |key: &'static str, field: &'static str| -> Result<Option<f64>, ConfigError> {
                    match p.get(key) {
                        None | Some(Value::Null) => Ok(None),
                        Some(_) => positive_float(p, key)
                            .map(Some)
                            .map_err(|e| rename(e, field)),
                    }
                };
            let original = match p.get("original_max_position_embeddings") {
                None | Some(Value::Null) => match obj.get("original_max_position_embeddings") {
                    None | Some(Value::Null) => max_positions,
                    Some(_) => positive(obj, "original_max_position_embeddings")?,
                },
                Some(_) => positive(p, "original_max_position_embeddings").map_err(|e| {
                    rename(
                        e,
                        field_name(params_field, "original_max_position_embeddings"),
                    )
                })?,
            };
            let factor = match opt_float("factor", field_name(params_field, "factor"))? {
                Some(f) => f,
                None => max_positions as f64 / original as f64,
            };
            RopeScaling::Yarn(Yarn {
                factor,
                original_max_position_embeddings: original,
                beta_fast: opt_float("beta_fast", field_name(params_field, "beta_fast"))?
                    .unwrap_or(32.0),
                beta_slow: opt_float("beta_slow", field_name(params_field, "beta_slow"))?
                    .unwrap_or(1.0),
                // 0 means "absent" in transformers' truthiness checks.
                mscale: nonnegative_float(p, "mscale", field_name(params_field, "mscale"))?,
                mscale_all_dim: nonnegative_float(
                    p,
                    "mscale_all_dim",
                    field_name(params_field, "mscale_all_dim"),
                )?,
                attention_factor: opt_float(
                    "attention_factor",
                    field_name(params_field, "attention_factor"),
                )?,
                truncate: bool_field(p, "truncate", true)
                    .map_err(|e| rename(e, field_name(params_field, "truncate")))?,
            })
        }
        other => {
            return Err(ConfigError::Invalid {
                field: field_name(params_field, "rope_type"),
                problem: format!("`{other}` is not supported (supported: default, yarn)"),
            });
        }
    };
    Ok(RopeConfig {
        theta,
        dim,
        interleaved,
        scaling,
    })
}

/// `"{block}.{key}"` as a static name for error messages.
fn field_name(block: &'static str, key: &'static str) -> &'static str {
    match (block, key) {
        ("rope_parameters", "rope_type") => "rope_parameters.rope_type",
        ("rope_parameters", "factor") => "rope_parameters.factor",
        ("rope_parameters", "beta_fast") => "rope_parameters.beta_fast",
        ("rope_parameters", "beta_slow") => "rope_parameters.beta_slow",
        ("rope_parameters", "mscale") => "rope_parameters.mscale",
        ("rope_parameters", "mscale_all_dim") => "rope_parameters.mscale_all_dim",
        ("rope_parameters", "attention_factor") => "rope_parameters.attention_factor",
        ("rope_parameters", "truncate") => "rope_parameters.truncate",
        ("rope_parameters", _) => "rope_parameters.original_max_position_embeddings",
        (_, "rope_type") => "rope_scaling.type",
        (_, "factor") => "rope_scaling.factor",
        (_, "beta_fast") => "rope_scaling.beta_fast",
        (_, "beta_slow") => "rope_scaling.beta_slow",
        (_, "mscale") => "rope_scaling.mscale",
        (_, "mscale_all_dim") => "rope_scaling.mscale_all_dim",
        (_, "attention_factor") => "rope_scaling.attention_factor",
        (_, "truncate") => "rope_scaling.truncate",
        _ => "rope_scaling.original_max_position_embeddings",
    }
}

pub(crate) fn str_field(
    obj: &Map<String, Value>,
    field: &'static str,
) -> Result<String, ConfigError> {
    match obj.get(field) {
        None | Some(Value::Null) => Err(ConfigError::Missing(field)),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(ConfigError::Invalid {
            field,
            problem: format!("must be a string, got {other}"),
        }),
    }
}

pub(crate) fn positive(
    obj: &Map<String, Value>,
    field: &'static str,
) -> Result<usize, ConfigError> {
    let v = obj
        .get(field)
        .filter(|v| !v.is_null())
        .ok_or(ConfigError::Missing(field))?;
    match v.as_u64() {
        Some(n) if n > 0 => usize::try_from(n).map_err(|_| ConfigError::Invalid {
            field,
            problem: format!("{n} is too large"),
        }),
        _ => Err(ConfigError::Invalid {
            field,
            problem: format!("must be a positive integer, got {v}"),
        }),
    }
}

/// The first of `fields` present (a field transformers 5 writes under another name than
/// the Hub's files, e.g. Qwen's `num_experts` / `num_local_experts`).
pub(crate) fn positive_any(
    obj: &Map<String, Value>,
    fields: &[&'static str],
) -> Result<usize, ConfigError> {
    for field in fields {
        if obj.get(*field).is_some_and(|v| !v.is_null()) {
            return positive(obj, field);
        }
    }
    Err(ConfigError::Missing(fields[0]))
}

/// A count that may be zero, with a default when absent.
pub(crate) fn count(
    obj: &Map<String, Value>,
    field: &'static str,
    default: usize,
) -> Result<usize, ConfigError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| ConfigError::Invalid {
                field,
                problem: format!("must be a non-negative integer, got {v}"),
            }),
    }
}

/// A positive integer or null (DeepSeek's `q_lora_rank`).
pub(crate) fn optional_positive(
    obj: &Map<String, Value>,
    field: &'static str,
) -> Result<Option<usize>, ConfigError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => positive(obj, field).map(Some),
    }
}

pub(crate) fn positive_float(
    obj: &Map<String, Value>,
    field: &'static str,
) -> Result<f64, ConfigError> {
    let v = obj
        .get(field)
        .filter(|v| !v.is_null())
        .ok_or(ConfigError::Missing(field))?;
    match v.as_f64() {
        Some(x) if x > 0.0 && x.is_finite() => Ok(x),
        _ => Err(ConfigError::Invalid {
            field,
            problem: format!("must be a positive number, got {v}"),
        }),
    }
}

fn nonnegative_float(
    obj: &Map<String, Value>,
    key: &str,
    field: &'static str,
) -> Result<Option<f64>, ConfigError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if x >= 0.0 && x.is_finite() => Ok(Some(x)),
            _ => Err(ConfigError::Invalid {
                field,
                problem: format!("must be a non-negative number, got {v}"),
            }),
        },
    }
}

pub(crate) fn bool_field(
    obj: &Map<String, Value>,
    field: &'static str,
    default: bool,
) -> Result<bool, ConfigError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(ConfigError::Invalid {
            field,
            problem: format!("must be a boolean, got {other}"),
        }),
    }
}

/// A list of layer indices (Qwen's `mlp_only_layers`).
pub(crate) fn layer_list(
    obj: &Map<String, Value>,
    field: &'static str,
) -> Result<Vec<usize>, ConfigError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| ConfigError::Invalid {
                        field,
                        problem: format!("must list layer indices, got {v}"),
                    })
            })
            .collect(),
        Some(other) => Err(ConfigError::Invalid {
            field,
            problem: format!("must be a list of layer indices, got {other}"),
        }),
    }
}

fn token_ids(obj: &Map<String, Value>, field: &'static str) -> Result<Vec<u32>, ConfigError> {
    let bad = |v: &Value| ConfigError::Invalid {
        field,
        problem: format!("must be a token id or a list of token ids, got {v}"),
    };
    let one = |v: &Value| {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| bad(v))
    };
    match obj.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(one).collect(),
        Some(v) => Ok(vec![one(v)?]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures")
            .join(name)
    }

    #[test]
    fn both_hub_styles_parse_to_the_same_shapes() {
        let old = ModelConfig::from_dir(&fixture("mixtral-tiny")).unwrap();
        let new = ModelConfig::from_dir(&fixture("mixtral-tiny-bf16")).unwrap();
        for c in [&old, &new] {
            assert_eq!(c.vocab_size, 512);
            assert_eq!(c.hidden_size, 64);
            assert_eq!(c.moe_intermediate_size, 128);
            assert_eq!(c.num_layers, 4);
            assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (4, 2, 16));
            assert_eq!((c.num_experts, c.experts_per_token), (8, 2));
            assert_eq!(c.rope.theta, 1e6);
            assert_eq!(c.moe_layers, vec![0, 1, 2, 3]);
            assert_eq!(c.kv_cache_dims(), (32, 32));
            assert_eq!(c.eos_token_ids, vec![2]);
        }
        assert_eq!(old.dtype, Some(DType::F32));
        assert_eq!(new.dtype, Some(DType::BF16));
    }

    fn base() -> Value {
        json!({
            "model_type": "mixtral", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 24,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "num_local_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 64,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0
        })
    }

    fn with(key: &str, value: Value) -> Value {
        let mut v = base();
        v[key] = value;
        v
    }

    fn without(key: &str) -> Value {
        let mut v = base();
        v.as_object_mut().unwrap().remove(key);
        v
    }

    fn err_text(v: Value) -> String {
        ModelConfig::from_json(&v).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_field() {
        assert!(err_text(without("hidden_size")).contains("`hidden_size`"));
        assert!(err_text(without("num_local_experts")).contains("`num_local_experts`"));
        assert!(err_text(with("model_type", json!("llama"))).contains("`llama`"));
        assert!(err_text(without("model_type")).contains("`model_type`"));
        assert!(err_text(with("vocab_size", json!(-3))).contains("`vocab_size`"));
        assert!(err_text(with("vocab_size", json!("big"))).contains("`vocab_size`"));
        assert!(err_text(with("num_key_value_heads", json!(3))).contains("`num_key_value_heads`"));
        assert!(err_text(with("num_experts_per_tok", json!(5))).contains("`num_experts_per_tok`"));
        assert!(err_text(with("hidden_size", json!(18))).contains("`head_dim`"));
        assert!(err_text(with("head_dim", json!(5))).contains("`head_dim`"));
        assert!(err_text(with("dtype", json!("int3"))).contains("`dtype`"));
        assert!(
            err_text(with("rope_parameters", json!({"rope_type": "default"})))
                .contains("`rope_parameters.rope_theta`")
        );
        assert!(
            err_text(with(
                "rope_parameters",
                json!({"rope_type": "longrope", "rope_theta": 1.0})
            ))
            .contains("rope_type")
        );
        assert!(err_text(json!([1, 2])).contains("(root)"));
    }

    #[test]
    fn derived_and_explicit_head_dim() {
        let c = ModelConfig::from_json(&base()).unwrap();
        assert_eq!(c.head_dim, 4);
        let c = ModelConfig::from_json(&with("head_dim", json!(8))).unwrap();
        assert_eq!(c.head_dim, 8);
        assert_eq!(c.q_dim(), 32);
    }

    /// transformers' YaRN at DeepSeek-V3's published settings (factor 40, original context
    /// 4096, beta 32/1, mscale = mscale_all_dim = 1, rope dim 64, theta 1e4): the
    /// frequencies of `_compute_yarn_parameters` written out by hand, and the softmax
    /// scale factor `(0.1 ln 40 + 1)^2`.
    #[test]
    fn yarn_follows_transformers_formulas() {
        let rope = RopeConfig {
            theta: 10000.0,
            dim: 64,
            interleaved: true,
            scaling: RopeScaling::Yarn(Yarn {
                factor: 40.0,
                original_max_position_embeddings: 4096,
                beta_fast: 32.0,
                beta_slow: 1.0,
                mscale: Some(1.0),
                mscale_all_dim: Some(1.0),
                attention_factor: None,
                truncate: true,
            }),
        };
        let inv = rope.inv_freq();
        assert_eq!(inv.len(), 32);
        // find_correction_dim(32) = 64 ln(4096 / (64 pi)) / (2 ln 1e4) = 10.2 -> floor 10;
        // find_correction_dim(1) = 64 ln(4096 / (2 pi)) / (2 ln 1e4) = 22.5 -> ceil 23.
        let (low, high) = (10.0, 23.0);
        for (i, f) in inv.iter().enumerate() {
            let base = 1.0 / 10000f64.powf(2.0 * i as f64 / 64.0);
            let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
            let want = base / 40.0 * ramp + base * (1.0 - ramp);
            assert!((f - want).abs() <= 1e-12 * base, "{i}: {f} vs {want}");
        }
        // The ends: pure extrapolation (the original frequency) and pure interpolation.
        assert_eq!(inv[0], 1.0);
        assert!((inv[31] * 40.0 - 1.0 / 10000f64.powf(62.0 / 64.0)).abs() < 1e-15);
        assert_eq!(rope.attention_factor(), 1.0);
        let m = 0.1 * 40f64.ln() + 1.0;
        assert!((rope.softmax_mscale() - m * m).abs() < 1e-12);
    }

    #[test]
    fn hub_and_transformers5_rope_styles_agree() {
        let mut hub = base();
        hub["rope_scaling"] =
            json!({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16});
        let mut new = base();
        new.as_object_mut().unwrap().remove("rope_theta");
        new["rope_parameters"] = json!({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16});
        let (a, b) = (
            ModelConfig::from_json(&hub).unwrap(),
            ModelConfig::from_json(&new).unwrap(),
        );
        assert_eq!(a.rope, b.rope);
        assert!(matches!(
            a.rope.scaling,
            RopeScaling::Yarn(Yarn { factor: 4.0, .. })
        ));
        // No mscale fields: transformers' attention factor is 0.1 ln(factor) + 1.
        assert!((a.rope.attention_factor() - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-12);
    }

    #[test]
    fn unsupported_families_and_quantization_are_named() {
        let text = err_text(with("model_type", json!("gpt_oss")));
        assert!(
            text.contains("`gpt_oss`") && text.contains("deepseek_v3"),
            "{text}"
        );
        let text = err_text(with(
            "quantization_config",
            json!({"quant_method": "gptq", "bits": 4}),
        ));
        assert!(text.contains("gptq"), "{text}");
    }
}
