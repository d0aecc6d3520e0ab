//! Element types of checkpoint tensors and their conversion to the f32 the CPU computes in.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F16,
}

#[derive(Debug, thiserror::Error)]
#[error("unsupported dtype `{0}` (expected float32, bfloat16 or float16)")]
pub struct UnknownDType(pub String);

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }

    pub fn from_safetensors(d: safetensors::Dtype) -> Option<Self> {
        match d {
            safetensors::Dtype::F32 => Some(DType::F32),
            safetensors::Dtype::BF16 => Some(DType::BF16),
            safetensors::Dtype::F16 => Some(DType::F16),
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
        }
    }
}

impl FromStr for DType {
    type Err = UnknownDType;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "float32" | "f32" | "fp32" => Ok(DType::F32),
            "bfloat16" | "bf16" => Ok(DType::BF16),
            "float16" | "f16" | "fp16" | "half" => Ok(DType::F16),
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
        assert!("int8".parse::<DType>().is_err());
    }
}
