//! Element types of checkpoint tensors and their conversion to the f32 the CPU computes in.
//!
//! [`DType::F8E4M3`] is the storage type of block-scaled FP8 checkpoints (DeepSeek-V3's and
//! Qwen3's FP8 releases). Its decode here gives the raw FP8 value; the per-block scale that
//! turns it into the weight is applied by the checkpoint (see [`crate::quant`]).

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F16,
    /// `float8_e4m3fn`: 1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits; subnormals,
    /// no infinities, and only `S.1111.111` is NaN, so the largest finite value is 448.
    F8E4M3,
}

#[derive(Debug, thiserror::Error)]
#[error("unsupported dtype `{0}` (expected float32, bfloat16, float16 or float8_e4m3fn)")]
pub struct UnknownDType(pub String);

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
            DType::F8E4M3 => 1,
        }
    }

    pub fn from_safetensors(d: safetensors::Dtype) -> Option<Self> {
        match d {
            safetensors::Dtype::F32 => Some(DType::F32),
            safetensors::Dtype::BF16 => Some(DType::BF16),
            safetensors::Dtype::F16 => Some(DType::F16),
            // Only the `fn` variant (what torch calls float8_e4m3fn); E4M3FNUZ has a
            // different bias and NaN encoding and E5M2 a different layout.
            safetensors::Dtype::F8_E4M3 => Some(DType::F8E4M3),
            _ => None,
        }
    }

    /// Converts little-endian bytes of this dtype into `out`. The bytes come straight from
    /// a memory map and may be unaligned, so they are never reinterpreted in place.
    pub fn decode_into(self, bytes: &[u8], out: &mut [f32]) {
        debug_assert_eq!(bytes.len(), out.len() * self.size());
        match self {
            DType::F32 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            DType::BF16 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16);
                }
            }
            DType::F16 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
                }
            }
            DType::F8E4M3 => {
                for (o, b) in out.iter_mut().zip(bytes) {
                    *o = F8E4M3_TO_F32[usize::from(*b)];
                }
            }
        }
    }
}

/// Every `float8_e4m3fn` code decoded, built at compile time: a table lookup is the fastest
/// decode, and multi-gigabyte expert weights go through it.
pub static F8E4M3_TO_F32: [f32; 256] = {
    let mut table = [0.0f32; 256];
    let mut code = 0;
    while code < 256 {
        table[code] = f8e4m3_to_f32(code as u8);
        code += 1;
    }
    table
};

/// Decodes one `float8_e4m3fn` code exactly, by rebuilding the value's f32 bit pattern
/// (every E4M3 value, subnormals included, is a normal f32).
pub const fn f8e4m3_to_f32(code: u8) -> f32 {
    let sign = ((code >> 7) as u32) << 31;
    let exp = ((code >> 3) & 0xF) as u32;
    let man = (code & 0x7) as u32;
    let bits = if exp == 0xF && man == 0x7 {
        // The format spends only this code on NaN; exponent 15 is otherwise a normal binade.
        sign | 0x7FC0_0000
    } else if exp != 0 {
        // Normal: rebias the exponent from 7 to 127 and move the mantissa to the top.
        sign | ((exp + 127 - 7) << 23) | (man << 20)
    } else if man == 0 {
        sign
    } else {
        // Subnormal: man * 2^-9. With the leading one at bit p, that is
        // 2^(p-9) * (1 + (man - 2^p) / 2^p), whose f32 mantissa is the bits below p.
        let p = 31 - man.leading_zeros();
        sign | ((p + 127 - 9) << 23) | ((man & !(1 << p)) << (23 - p))
    };
    f32::from_bits(bits)
}

impl FromStr for DType {
    type Err = UnknownDType;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "float32" | "f32" | "fp32" => Ok(DType::F32),
            "bfloat16" | "bf16" => Ok(DType::BF16),
            "float16" | "f16" | "fp16" | "half" => Ok(DType::F16),
            // torch's name, and safetensors' `F8_E4M3`.
            "float8_e4m3fn" | "f8_e4m3" => Ok(DType::F8E4M3),
            _ => Err(UnknownDType(s.to_owned())),
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "float32",
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            DType::F8E4M3 => "float8_e4m3fn",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_each_dtype_like_half_does() {
        let values = [0.0f32, 1.5, -2.25, 3.0e-3, 65504.0, -1.0e-5];
        let bf: Vec<u8> = values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        let hf: Vec<u8> = values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        let f: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut out = vec![0.0; values.len()];
        DType::F32.decode_into(&f, &mut out);
        assert_eq!(out, values);
        DType::BF16.decode_into(&bf, &mut out);
        for (o, v) in out.iter().zip(values) {
            assert_eq!(*o, half::bf16::from_f32(v).to_f32());
        }
        DType::F16.decode_into(&hf, &mut out);
        for (o, v) in out.iter().zip(values) {
            assert_eq!(*o, half::f16::from_f32(v).to_f32());
        }
        // Unaligned input must work: a memory-mapped tensor can start at any byte.
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&f);
        DType::F32.decode_into(&shifted[1..], &mut out);
        assert_eq!(out, values);
    }

    #[test]
    fn parses_names() {
        assert_eq!("bfloat16".parse::<DType>().unwrap(), DType::BF16);
        assert_eq!("float32".parse::<DType>().unwrap(), DType::F32);
        assert_eq!("float8_e4m3fn".parse::<DType>().unwrap(), DType::F8E4M3);
        assert_eq!("F8_E4M3".parse::<DType>().unwrap(), DType::F8E4M3);
        assert!("int8".parse::<DType>().is_err());
        // E5M2 has another layout; it must not be taken for E4M3.
        assert!("float8_e5m2".parse::<DType>().is_err());
        for d in [DType::F32, DType::BF16, DType::F16, DType::F8E4M3] {
            assert_eq!(d.to_string().parse::<DType>().unwrap(), d);
        }
    }

    #[test]
    fn maps_safetensors_fp8_types() {
        use safetensors::Dtype;
        assert_eq!(DType::from_safetensors(Dtype::F8_E4M3), Some(DType::F8E4M3));
        assert_eq!(DType::F8E4M3.size(), 1);
        for other in [
            Dtype::F8_E5M2,
            Dtype::F8_E4M3FNUZ,
            Dtype::F8_E5M2FNUZ,
            Dtype::F8_E8M0,
        ] {
            assert_eq!(DType::from_safetensors(other), None, "{other:?}");
        }
    }

    /// The E4M3FN value of `code` from the textbook formula, in f64, with NaN as `None`.
    fn e4m3fn_by_formula(code: u8) -> Option<f64> {
        let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
        let e = i32::from((code >> 3) & 0xF);
        let m = f64::from(code & 0x7);
        if e == 15 && m == 7.0 {
            None
        } else if e == 0 {
            Some(sign * (m / 8.0) * 2f64.powi(1 - 7))
        } else {
            Some(sign * (1.0 + m / 8.0) * 2f64.powi(e - 7))
        }
    }

    #[test]
    fn decodes_every_fp8_e4m3_code_exactly() {
        let bytes: Vec<u8> = (0..=255u8).collect();
        let mut out = vec![0.0f32; 256];
        DType::F8E4M3.decode_into(&bytes, &mut out);
        for (code, got) in bytes.iter().zip(&out) {
            match e4m3fn_by_formula(*code) {
                None => assert!(got.is_nan(), "{code:#04x} -> {got}"),
                Some(want) => {
                    // Compare bits, so that -0 and +0 are told apart.
                    assert_eq!(got.to_bits(), (want as f32).to_bits(), "{code:#04x}");
                    assert_eq!(f64::from(*got), want, "{code:#04x}");
                }
            }
            assert!(!got.is_infinite(), "{code:#04x}: E4M3FN has no infinities");
        }
        let nans = out.iter().filter(|v| v.is_nan()).count();
        assert_eq!(nans, 2, "only 0x7F and 0xFF are NaN");
    }

    #[test]
    fn fp8_e4m3_known_values() {
        let d = |code: u8| {
            let mut out = [0.0f32];
            DType::F8E4M3.decode_into(&[code], &mut out);
            out[0]
        };
        assert_eq!(d(0x00).to_bits(), 0.0f32.to_bits());
        assert_eq!(d(0x80).to_bits(), (-0.0f32).to_bits());
        assert_eq!(d(0x38), 1.0);
        assert_eq!(d(0xB8), -1.0);
        assert_eq!(d(0x40), 2.0);
        assert_eq!(d(0x3C), 1.5);
        assert_eq!(d(0x7E), 448.0);
        assert_eq!(d(0xFE), -448.0);
        // Exponent 15 is a normal binade in the `fn` variant, not infinity.
        assert_eq!(d(0x78), 256.0);
        assert_eq!(d(0x01), 2f32.powi(-9));
        assert_eq!(d(0x07), 7.0 * 2f32.powi(-9));
        assert_eq!(d(0x08), 2f32.powi(-6));
        assert!(d(0x7F).is_nan());
        assert!(d(0xFF).is_nan());
        assert_eq!(f8e4m3_to_f32(0x38), 1.0);
    }
}
