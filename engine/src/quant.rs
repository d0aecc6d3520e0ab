//! Weight quantization declared by a checkpoint's `config.json`.
//!
//! Supported: the block-scaled FP8 of DeepSeek-V3's and Qwen3's official FP8 releases.
//! There a Linear weight `X.weight` is stored as `float8_e4m3fn` with a sibling tensor
//! `X.weight_scale_inv` of shape `[ceil(out / b0), ceil(in / b1)]`, and
//! `w[i][j] = q[i][j] * scale_inv[i / b0][j / b1]`. Despite its name `scale_inv` is
//! multiplied, not divided: it is the inverse of the scale the quantiser divided by.
//!
//! Which tensors are quantised is read from each tensor's dtype, not from the config's
//! `modules_to_not_convert` / `ignored_layers` lists: those modules are simply stored in
//! bf16 and load like any other bf16 tensor.

use std::fmt;

use serde_json::{Map, Value};

use crate::dtype::F8E4M3_TO_F32;

/// What a checkpoint's quantized tensors need to be turned back into weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Quantization {
    /// No `quantization_config`: every tensor is a plain float tensor.
    #[default]
    None,
    /// `float8_e4m3fn` weights with one scale per `block[0] x block[1]` block of
    /// (rows, columns). Activations stay f32: the `dynamic` activation scheme quantises
    /// them on the fly only to use FP8 matmuls, which the CPU path does not.
    Fp8Block { block: [usize; 2] },
}

const SUPPORTED: &str = "fp8 with weight_block_size";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantError {
    #[error("config: quantization_config must be an object, got {got}")]
    NotAnObject { got: String },
    #[error(
        "config: quantization_config has no string `quant_method` (got {got}; supported: {SUPPORTED})"
    )]
    NoMethod { got: String },
    #[error(
        "config: quantization_config.quant_method `{method}` is not supported (supported: {SUPPORTED})"
    )]
    UnsupportedMethod { method: String },
    #[error(
        "config: quantization_config.quant_method `fp8` without weight_block_size (one scale per tensor) is not supported (supported: {SUPPORTED})"
    )]
    Fp8PerTensor,
    #[error(
        "config: quantization_config.weight_block_size must be two positive integers, got {got}"
    )]
    BadBlockSize { got: String },
    #[error("config: quantization_config.fmt `{fmt}` is not supported (supported: e4m3)")]
    UnsupportedFormat { fmt: String },
    #[error(
        "config: quantization_config.activation_scheme `{scheme}` is not supported (supported: dynamic)"
    )]
    UnsupportedActivationScheme { scheme: String },
}

impl Quantization {
    /// Reads `quantization_config` from a parsed `config.json` object.
    pub fn from_config_json(obj: &Map<String, Value>) -> Result<Quantization, QuantError> {
        let qc = match obj.get("quantization_config") {
            None | Some(Value::Null) => return Ok(Quantization::None),
            Some(Value::Object(qc)) => qc,
            Some(other) => {
                return Err(QuantError::NotAnObject {
                    got: other.to_string(),
                });
            }
        };
        let method = match qc.get("quant_method") {
            Some(Value::String(m)) => m,
            other => {
                return Err(QuantError::NoMethod {
                    got: other.map_or_else(|| "nothing".to_owned(), Value::to_string),
                });
            }
        };
        if !method.eq_ignore_ascii_case("fp8") {
            return Err(QuantError::UnsupportedMethod {
                method: method.clone(),
            });
        }
        // Absent means e4m3 (transformers' default); e5m2 would decode differently.
        if let Some(fmt) = present(qc, "fmt") {
            match fmt.as_str() {
                Some(f) if f.eq_ignore_ascii_case("e4m3") => {}
                _ => {
                    return Err(QuantError::UnsupportedFormat {
                        fmt: display_str(fmt),
                    });
                }
            }
        }
        // `static` activations come with per-tensor input scales that the FP8 matmul
        // would apply; computing in f32 without them would not be the model that was
        // calibrated, so refuse rather than guess.
        if let Some(scheme) = present(qc, "activation_scheme") {
            match scheme.as_str() {
                Some(s) if s.eq_ignore_ascii_case("dynamic") => {}
                _ => {
                    return Err(QuantError::UnsupportedActivationScheme {
                        scheme: display_str(scheme),
                    });
                }
            }
        }
        let block = present(qc, "weight_block_size").ok_or(QuantError::Fp8PerTensor)?;
        let bad = || QuantError::BadBlockSize {
            got: block.to_string(),
        };
        let dims = block.as_array().ok_or_else(bad)?;
        let [rows, cols] = dims.as_slice() else {
            return Err(bad());
        };
        let positive = |v: &Value| {
            v.as_u64()
                .filter(|n| *n > 0)
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(bad)
        };
        Ok(Quantization::Fp8Block {
            block: [positive(rows)?, positive(cols)?],
        })
    }

    /// The block size of block-scaled FP8, if that is what this is.
    pub fn fp8_block(&self) -> Option<[usize; 2]> {
        match self {
            Quantization::None => None,
            Quantization::Fp8Block { block } => Some(*block),
        }
    }
}

impl fmt::Display for Quantization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Quantization::None => f.write_str("none"),
            Quantization::Fp8Block { block: [r, c] } => {
                write!(f, "fp8 e4m3 with {r}x{c} block scales")
            }
        }
    }
}

/// The name of the scale tensor of block-scaled FP8 weight `weight`.
pub fn scale_name(weight: &str) -> String {
    format!("{weight}_scale_inv")
}

/// The shape of the scale tensor of an FP8 weight of shape `[.., rows, cols]`: leading
/// (e.g. fused-expert) dimensions are kept, the last two are counted in blocks, rounding
/// up because edge blocks may be partial. `None` for tensors of rank below 2.
pub fn scale_shape(shape: &[usize], block: [usize; 2]) -> Option<Vec<usize>> {
    let [lead @ .., rows, cols] = shape else {
        return None;
    };
    let mut s = lead.to_vec();
    s.push(rows.div_ceil(block[0]));
    s.push(cols.div_ceil(block[1]));
    Some(s)
}

/// Dequantises `q.len() / (rows * cols)` consecutive `[rows, cols]` matrices of
/// `float8_e4m3fn` codes, each with its own row-major `[ceil(rows / b0), ceil(cols / b1)]`
/// block of `scale`, into `out`.
pub fn dequantize_fp8_blocks(
    q: &[u8],
    scale: &[f32],
    rows: usize,
    cols: usize,
    block: [usize; 2],
    out: &mut [f32],
) {
    let (scale_rows, scale_cols) = (rows.div_ceil(block[0]), cols.div_ceil(block[1]));
    let matrix = rows * cols;
    debug_assert_eq!(q.len(), out.len());
    debug_assert!(q.len().is_multiple_of(matrix));
    debug_assert_eq!(
        scale.len() * matrix,
        q.len() * scale_rows * scale_cols,
        "one scale matrix per weight matrix"
    );
    if matrix == 0 {
        return;
    }
    let scales = scale.chunks_exact(scale_rows * scale_cols);
    for ((q, out), scale) in q
        .chunks_exact(matrix)
        .zip(out.chunks_exact_mut(matrix))
        .zip(scales)
    {
        for (i, (q_row, out_row)) in q
            .chunks_exact(cols)
            .zip(out.chunks_exact_mut(cols))
            .enumerate()
        {
            let scale_row = &scale[(i / block[0]) * scale_cols..][..scale_cols];
            // One scale per run of b1 columns: the inner loop has no division.
            for ((q, out), s) in q_row
                .chunks(block[1])
                .zip(out_row.chunks_mut(block[1]))
                .zip(scale_row)
            {
                for (o, c) in out.iter_mut().zip(q) {
                    *o = F8E4M3_TO_F32[usize::from(*c)] * s;
                }
            }
        }
    }
}

fn present<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

/// A config value for an error message: strings without their JSON quotes.
fn display_str(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(config: Value) -> Result<Quantization, QuantError> {
        Quantization::from_config_json(config.as_object().unwrap())
    }

    fn with_qc(qc: Value) -> Result<Quantization, QuantError> {
        parse(json!({ "model_type": "deepseek_v3", "quantization_config": qc }))
    }

    #[test]
    fn no_quantization_config_is_none() {
        assert_eq!(
            parse(json!({ "model_type": "mixtral" })),
            Ok(Quantization::None)
        );
        assert_eq!(with_qc(Value::Null), Ok(Quantization::None));
        assert_eq!(Quantization::default(), Quantization::None);
        assert_eq!(Quantization::None.fp8_block(), None);
    }

    #[test]
    fn parses_the_official_fp8_releases() {
        // DeepSeek-V3's config.json.
        let ds = with_qc(json!({
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [128, 128]
        }));
        assert_eq!(ds, Ok(Quantization::Fp8Block { block: [128, 128] }));
        // Qwen3's FP8 releases also list modules left in bf16; their dtype says so.
        let qwen = with_qc(json!({
            "activation_scheme": "dynamic",
            "modules_to_not_convert": ["lm_head", "model.layers.0.mlp.gate"],
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [128, 128]
        }));
        assert_eq!(qwen, Ok(Quantization::Fp8Block { block: [128, 128] }));
        // fmt and activation_scheme are optional; blocks need not be square.
        let minimal = with_qc(json!({ "quant_method": "fp8", "weight_block_size": [64, 32] }));
        assert_eq!(minimal, Ok(Quantization::Fp8Block { block: [64, 32] }));
        assert_eq!(minimal.unwrap().fp8_block(), Some([64, 32]));
        assert_eq!(
            Quantization::Fp8Block { block: [128, 128] }.to_string(),
            "fp8 e4m3 with 128x128 block scales"
        );
    }

    #[test]
    fn other_methods_are_refused_by_name() {
        for method in ["gptq", "awq", "bitsandbytes", "compressed-tensors", "mxfp4"] {
            let err = with_qc(json!({ "quant_method": method, "bits": 4 })).unwrap_err();
            assert_eq!(
                err,
                QuantError::UnsupportedMethod {
                    method: method.into()
                }
            );
            assert_eq!(
                err.to_string(),
                format!(
                    "config: quantization_config.quant_method `{method}` is not supported (supported: fp8 with weight_block_size)"
                )
            );
        }
        // Old bitsandbytes configs carry only flags.
        let err = with_qc(json!({ "load_in_4bit": true })).unwrap_err();
        assert_eq!(
            err.to_string(),
            "config: quantization_config has no string `quant_method` (got nothing; supported: fp8 with weight_block_size)"
        );
        let err = with_qc(json!({ "quant_method": 8 })).unwrap_err();
        assert!(matches!(err, QuantError::NoMethod { ref got } if got == "8"));
        let err = with_qc(json!("fp8")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "config: quantization_config must be an object, got \"fp8\""
        );
    }

    #[test]
    fn fp8_variants_we_cannot_load_are_refused() {
        let per_tensor = with_qc(json!({ "quant_method": "fp8", "activation_scheme": "dynamic" }));
        assert_eq!(per_tensor, Err(QuantError::Fp8PerTensor));
        assert!(
            QuantError::Fp8PerTensor
                .to_string()
                .contains("without weight_block_size")
        );
        let null_block = with_qc(json!({ "quant_method": "fp8", "weight_block_size": null }));
        assert_eq!(null_block, Err(QuantError::Fp8PerTensor));

        let e5m2 = with_qc(
            json!({ "quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128] }),
        );
        let err = e5m2.unwrap_err();
        assert_eq!(
            err.to_string(),
            "config: quantization_config.fmt `e5m2` is not supported (supported: e4m3)"
        );

        let static_act = with_qc(json!({
            "quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [128, 128]
        }));
        assert_eq!(
            static_act.unwrap_err().to_string(),
            "config: quantization_config.activation_scheme `static` is not supported (supported: dynamic)"
        );
    }

    #[test]
    fn block_size_must_be_two_positive_integers() {
        for block in [
            json!([128]),
            json!([128, 128, 128]),
            json!([0, 128]),
            json!([128, -1]),
            json!([128, 1.5]),
            json!([128, "128"]),
            json!("128x128"),
            json!(128),
        ] {
            let err =
                with_qc(json!({ "quant_method": "fp8", "weight_block_size": block })).unwrap_err();
            assert_eq!(
                err,
                QuantError::BadBlockSize {
                    got: block.to_string()
                }
            );
            assert!(err.to_string().contains("two positive integers"), "{err}");
        }
    }

    #[test]
    fn scale_shapes_round_up_and_keep_leading_dims() {
        assert_eq!(scale_shape(&[40, 70], [32, 32]), Some(vec![2, 3]));
        assert_eq!(scale_shape(&[64, 64], [32, 32]), Some(vec![2, 2]));
        assert_eq!(scale_shape(&[8, 40, 70], [16, 32]), Some(vec![8, 3, 3]));
        assert_eq!(scale_shape(&[70], [32, 32]), None);
        assert_eq!(scale_name("a.weight"), "a.weight_scale_inv");
    }
}
