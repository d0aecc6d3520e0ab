//! `config.json` of Mixtral-family checkpoints, in both styles found on the Hub.
//!
//! Older writers (Mixtral-8x7B itself) put `rope_theta` at the top level, omit `head_dim`
//! and say `torch_dtype`; newer ones nest RoPE under `rope_parameters`, write `head_dim`
//! explicitly and say `dtype`. Both parse into one [`ModelConfig`] whose fields are checked
//! for consistency, so later code never has to.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::dtype::DType;

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
    #[error(
        "config: unsupported model_type `{0}` (supported: mixtral; Qwen3-MoE and DeepSeek-V3 come later)"
    )]
    UnsupportedModel(String),
}

/// Everything the engine needs to know about a Mixtral-family model's shapes.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub num_experts: usize,
    pub experts_per_token: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The dtype the checkpoint declares; the tensors' own dtypes are what gets loaded.
    pub dtype: Option<DType>,
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
        if model_type != "mixtral" {
            return Err(ConfigError::UnsupportedModel(model_type));
        }
        if let Some(act) = obj.get("hidden_act").and_then(Value::as_str)
            && act != "silu"
        {
            return Err(ConfigError::Invalid {
                field: "hidden_act",
                problem: format!("is `{act}`, only `silu` is supported"),
            });
        }

        let hidden_size = positive(obj, "hidden_size")?;
        let num_heads = positive(obj, "num_attention_heads")?;
        // Older configs omit num_key_value_heads to mean plain multi-head attention.
        let num_kv_heads = match obj.get("num_key_value_heads") {
            None | Some(Value::Null) => num_heads,
            Some(_) => positive(obj, "num_key_value_heads")?,
        };
        let head_dim = match obj.get("head_dim") {
            None | Some(Value::Null) => {
                if hidden_size % num_heads != 0 {
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
        if num_heads % num_kv_heads != 0 {
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
        let num_experts = positive(obj, "num_local_experts")?;
        let experts_per_token = positive(obj, "num_experts_per_tok")?;
        if experts_per_token > num_experts {
            return Err(ConfigError::Invalid {
                field: "num_experts_per_tok",
                problem: format!("{experts_per_token} exceeds num_local_experts {num_experts}"),
            });
        }

        let rope_theta = rope_theta(obj)?;
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
        if let Some(w) = obj.get("sliding_window")
            && !w.is_null()
        {
            // A window at least as long as the context never masks anything.
            let window = positive(obj, "sliding_window")?;
            let max_pos = positive(obj, "max_position_embeddings")?;
            if window < max_pos {
                return Err(ConfigError::Invalid {
                    field: "sliding_window",
                    problem: format!(
                        "{window} is shorter than the context ({max_pos}); sliding-window attention is not supported yet"
                    ),
                });
            }
        }

        Ok(ModelConfig {
            model_type,
            vocab_size: positive(obj, "vocab_size")?,
            hidden_size,
            intermediate_size: positive(obj, "intermediate_size")?,
            num_layers: positive(obj, "num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            num_experts,
            experts_per_token,
            max_position_embeddings: positive(obj, "max_position_embeddings")?,
            rms_norm_eps: positive_float(obj, "rms_norm_eps")?,
            rope_theta,
            tie_word_embeddings: match obj.get("tie_word_embeddings") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(other) => {
                    return Err(ConfigError::Invalid {
                        field: "tie_word_embeddings",
                        problem: format!("must be a boolean, got {other}"),
                    });
                }
            },
            bos_token_id: token_ids(obj, "bos_token_id")?.first().copied(),
            eos_token_ids: token_ids(obj, "eos_token_id")?,
            dtype,
        })
    }

    /// Query heads that share one KV head.
    pub fn gqa_group(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

fn rope_theta(obj: &Map<String, Value>) -> Result<f64, ConfigError> {
    if let Some(params) = obj.get("rope_parameters").filter(|v| !v.is_null()) {
        let params = params.as_object().ok_or(ConfigError::Invalid {
            field: "rope_parameters",
            problem: "must be an object".into(),
        })?;
        if let Some(kind) = params.get("rope_type").and_then(Value::as_str)
            && kind != "default"
        {
            return Err(ConfigError::Invalid {
                field: "rope_parameters.rope_type",
                problem: format!("`{kind}` is not supported (only `default`)"),
            });
        }
        return positive_float(params, "rope_theta").map_err(|e| match e {
            ConfigError::Missing(_) => ConfigError::Missing("rope_parameters.rope_theta"),
            ConfigError::Invalid { problem, .. } => ConfigError::Invalid {
                field: "rope_parameters.rope_theta",
                problem,
            },
            other => other,
        });
    }
    if let Some(scaling) = obj.get("rope_scaling")
        && !scaling.is_null()
    {
        return Err(ConfigError::Invalid {
            field: "rope_scaling",
            problem: "RoPE scaling is not supported".into(),
        });
    }
    match obj.get("rope_theta") {
        // transformers' Mixtral default.
        None | Some(Value::Null) => Ok(1e6),
        Some(_) => positive_float(obj, "rope_theta"),
    }
}

fn str_field(obj: &Map<String, Value>, field: &'static str) -> Result<String, ConfigError> {
    match obj.get(field) {
        None | Some(Value::Null) => Err(ConfigError::Missing(field)),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(ConfigError::Invalid {
            field,
            problem: format!("must be a string, got {other}"),
        }),
    }
}

fn positive(obj: &Map<String, Value>, field: &'static str) -> Result<usize, ConfigError> {
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

fn positive_float(obj: &Map<String, Value>, field: &'static str) -> Result<f64, ConfigError> {
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
            assert_eq!(c.intermediate_size, 128);
            assert_eq!(c.num_layers, 4);
            assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (4, 2, 16));
            assert_eq!((c.num_experts, c.experts_per_token), (8, 2));
            assert_eq!(c.rope_theta, 1e6);
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
                json!({"rope_type": "yarn", "rope_theta": 1.0})
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
}
