//! Model families: each maps its `config.json` and its tensor names onto the shared blocks
//! of [`crate::layers`] (an attention, a router, a feed-forward per layer), the way vLLM's
//! `qwen3_moe.py` or `deepseek_v2.py` are thin compositions of shared layers. The forward
//! loop in [`crate::model`] is the same for all of them. Adding a family is one file here:
//! a config parser and a layer loader.

mod deepseek_v3;
mod mixtral;
mod qwen_moe;

use serde_json::{Map, Value};

use crate::checkpoint::{Checkpoint, WeightError};
use crate::config::{Common, ConfigError, ModelConfig};
use crate::layers::{Attention, Layer};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Mixtral,
    Qwen2Moe,
    Qwen3Moe,
    DeepseekV3,
}

impl Family {
    /// `model_type` values, as `config.json` spells them.
    pub const SUPPORTED: &[&str] = &["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"];

    pub fn from_model_type(model_type: &str) -> Option<Self> {
        Some(match model_type {
            "mixtral" => Family::Mixtral,
            "qwen2_moe" => Family::Qwen2Moe,
            "qwen3_moe" => Family::Qwen3Moe,
            // Kimi K2 ships DeepSeek-V3's architecture under this model_type.
            "deepseek_v3" | "kimi_k2" => Family::DeepseekV3,
            _ => return None,
        })
    }

    pub(crate) fn parse_config(
        self,
        obj: &Map<String, Value>,
        common: Common,
    ) -> Result<ModelConfig, ConfigError> {
        match self {
            Family::Mixtral => mixtral::config(obj, common),
            Family::Qwen2Moe | Family::Qwen3Moe => qwen_moe::config(obj, common),
            Family::DeepseekV3 => deepseek_v3::config(obj, common),
        }
    }

    /// Loads decoder layer `layer`'s dense weights (everything but the routed experts).
    pub(crate) fn load_layer(
        self,
        ckpt: &Checkpoint,
        cfg: &ModelConfig,
        layer: usize,
    ) -> Result<Layer, WeightError> {
        let p = format!("model.layers.{layer}");
        let attention = match self {
            Family::DeepseekV3 => deepseek_v3::attention(ckpt, cfg, &p)?,
            _ => Attention::gqa(ckpt, cfg, &format!("{p}.self_attn"))?,
        };
        let h = cfg.hidden_size;
        let ffn = match self {
            Family::Mixtral => mixtral::ffn(ckpt, cfg, layer)?,
            Family::Qwen2Moe | Family::Qwen3Moe => qwen_moe::ffn(ckpt, cfg, layer)?,
            Family::DeepseekV3 => deepseek_v3::ffn(ckpt, cfg, layer)?,
        };
        Ok(Layer {
            attn_norm: ckpt.load(&format!("{p}.input_layernorm.weight"), &[h])?,
            attention,
            ffn_norm: ckpt.load(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
            ffn,
        })
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::Mixtral => "mixtral",
            Family::Qwen2Moe => "qwen2_moe",
            Family::Qwen3Moe => "qwen3_moe",
            Family::DeepseekV3 => "deepseek_v3",
        })
    }
}

/// Decoder layer `layer`'s feed-forward under `model.layers.N.mlp`, by the names Qwen and
/// DeepSeek share: a dense MLP (`{gate,up,down}_proj`) where the config says the layer does
/// not route, else the router and, where the config has one, the shared expert under
/// `{mlp}.{shared}` (with `{mlp}.shared_expert_gate` when it is gated).
pub(crate) fn dense_or_routed(
    ckpt: &Checkpoint,
    cfg: &ModelConfig,
    layer: usize,
    shared: &str,
) -> Result<crate::layers::Ffn, WeightError> {
    use crate::layers::{Ffn, SharedExpert, load_mlp};
    use crate::ops::Linear;
    let p = format!("model.layers.{layer}.mlp");
    let h = cfg.hidden_size;
    if !cfg.moe_layers.contains(&layer) {
        return Ok(Ffn::Dense(load_mlp(ckpt, &p, h, cfg.intermediate_size)?));
    }
    let shared = match cfg.shared_expert {
        Some(s) => Some(SharedExpert {
            mlp: load_mlp(ckpt, &format!("{p}.{shared}"), h, s.intermediate_size)?,
            gate: if s.gated {
                let gate = ckpt.load(&format!("{p}.shared_expert_gate.weight"), &[1, h])?;
                Some(Linear::new(gate, 1, h))
            } else {
                None
            },
        }),
        None => None,
    };
    routed(ckpt, cfg, layer, shared)
}

/// A MoE feed-forward: the router at `{moe}.gate.weight` (and DeepSeek's correction bias
/// beside it), the routed experts left to [`crate::experts`], and `shared` as given.
pub(crate) fn routed(
    ckpt: &Checkpoint,
    cfg: &ModelConfig,
    layer: usize,
    shared: Option<crate::layers::SharedExpert>,
) -> Result<crate::layers::Ffn, WeightError> {
    use crate::layers::{Ffn, MoeBlock, Router};
    use crate::ops::Linear;
    let expert_layer = cfg
        .moe_layers
        .iter()
        .position(|l| *l == layer)
        .ok_or_else(|| WeightError::Missing {
            name: format!("model.layers.{layer}: a MoE layer"),
            location: "the config (this layer does not route)".into(),
        })?;
    let moe = crate::experts::moe_prefix(ckpt, layer)?;
    let (e, h) = (cfg.num_experts, cfg.hidden_size);
    let bias_name = format!("{moe}.gate.e_score_correction_bias");
    let correction_bias = match cfg.router {
        crate::config::RouterKind::SigmoidGrouped { .. } => Some(ckpt.load(&bias_name, &[e])?),
        _ => None,
    };
    Ok(Ffn::Moe(MoeBlock {
        expert_layer,
        router: Router {
            weight: Linear::new(ckpt.load(&format!("{moe}.gate.weight"), &[e, h])?, e, h),
            kind: cfg.router,
            k: cfg.experts_per_token,
            correction_bias,
        },
        shared,
    }))
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use crate::config::{AttentionKind, ModelConfig, RouterKind};

    fn fixture(name: &str) -> Value {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures")
            .join(name)
            .join("config.json");
        serde_json::from_slice(&std::fs::read(path).expect("fixture config")).expect("JSON")
    }

    fn err(mut v: Value, key: &str, value: Value) -> String {
        if value.is_null() {
            v.as_object_mut().expect("object").remove(key);
        } else {
            v[key] = value;
        }
        match ModelConfig::from_json(&v) {
            Ok(_) => panic!("{key} = {v} was accepted"),
            Err(e) => e.to_string(),
        }
    }

    /// The fixtures' configs, written by transformers in both styles, parse to the layer
    /// mix and router their golden.json records.
    #[test]
    fn fixture_configs_parse_to_their_layer_mix() {
        for (name, moe, dense) in [
            ("qwen3-moe-tiny", vec![0, 1, 3], 1),
            ("qwen3-moe-tiny-bf16", vec![1, 3], 2),
            ("qwen2-moe-tiny", vec![0, 1, 2, 3], 0),
            ("deepseek-v3-tiny", vec![1, 2, 3], 1),
            ("deepseek-v3-tiny-bf16", vec![1, 2, 3], 1),
            ("deepseek-v3-tiny-fp8", vec![1, 2, 3], 1),
        ] {
            let c = ModelConfig::from_json(&fixture(name)).expect(name);
            assert_eq!(c.moe_layers, moe, "{name}");
            assert_eq!(c.num_layers - c.expert_layers(), dense, "{name}");
            let golden: Value = serde_json::from_slice(
                &std::fs::read(
                    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                        .join("../tests/fixtures")
                        .join(name)
                        .join("golden.json"),
                )
                .expect("golden.json"),
            )
            .expect("JSON");
            let recorded: Vec<usize> = golden["moe_layers"]
                .as_array()
                .expect("moe_layers")
                .iter()
                .map(|l| l.as_u64().expect("layer") as usize)
                .collect();
            assert_eq!(c.moe_layers, recorded, "{name}");
        }
        let ds = ModelConfig::from_json(&fixture("deepseek-v3-tiny")).expect("deepseek");
        assert!(matches!(ds.attention, AttentionKind::Mla(m) if m.q_lora_rank == Some(48)));
        assert!(matches!(
            ds.router,
            RouterKind::SigmoidGrouped {
                groups: 4,
                topk_groups: 2,
                renormalize: true,
                ..
            }
        ));
        let ds5 = ModelConfig::from_json(&fixture("deepseek-v3-tiny-bf16")).expect("bf16");
        assert!(matches!(ds5.attention, AttentionKind::Mla(m) if m.q_lora_rank.is_none()));
    }

    #[test]
    fn family_config_errors_name_the_field() {
        let ds = fixture("deepseek-v3-tiny");
        assert!(err(ds.clone(), "n_group", json!(3)).contains("`n_group`"));
        assert!(err(ds.clone(), "topk_group", json!(5)).contains("`topk_group`"));
        assert!(err(ds.clone(), "num_experts_per_tok", json!(9)).contains("`num_experts_per_tok`"));
        assert!(err(ds.clone(), "scoring_func", json!("softmax")).contains("`scoring_func`"));
        assert!(err(ds.clone(), "topk_method", json!("greedy")).contains("`topk_method`"));
        assert!(err(ds.clone(), "attention_bias", json!(true)).contains("`attention_bias`"));
        assert!(err(ds.clone(), "kv_lora_rank", Value::Null).contains("`kv_lora_rank`"));
        assert!(err(ds.clone(), "moe_layer_freq", json!(2)).contains("`moe_layer_freq`"));
        let mut yarn = ds.clone();
        yarn["rope_scaling"]["beta_fast"] = json!("fast");
        assert!(err(yarn, "x", json!(0)).contains("`rope_scaling.beta_fast`"));
        let q3 = fixture("qwen3-moe-tiny");
        assert!(err(q3.clone(), "mlp_only_layers", json!([9])).contains("`mlp_only_layers`"));
        assert!(
            err(q3.clone(), "moe_intermediate_size", Value::Null)
                .contains("`moe_intermediate_size`")
        );
        assert!(err(q3.clone(), "num_experts", Value::Null).contains("`num_experts`"));
        let mut windowed = q3.clone();
        windowed["use_sliding_window"] = json!(true);
        assert!(err(windowed, "sliding_window", json!(64)).contains("`sliding_window`"));
        // Every layer dense: not a MoE model.
        assert!(err(q3, "mlp_only_layers", json!([0, 1, 2, 3])).contains("not a MoE model"));
    }
}
