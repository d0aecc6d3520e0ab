//! How the CPU holds a weight matrix: f32, bf16 kept as bf16 in memory, or 8 bits
//! ([`QuantizedRows`]: int8, or an FP8 checkpoint's own codes). Widening a bf16 to f32 is
//! exact (a bf16 is an f32 whose low 16 bits are zero), so a product over bf16 weights
//! widened in registers computes what the f32 product over the same values computes,
//! reading half the bytes: decode, bound by the bytes it reads, gets faster and nothing
//! else changes. Matrices read from a checkpoint as f32 or bf16 are held as [`Panels`],
//! packed once at load for the outer-product kernel; 8-bit codes are widened and
//! multiplied by their scale.

use std::borrow::Cow;
use std::fmt;

use half::bf16;

use super::panels::Panels;
use super::quantized::{E4m3, QuantizedRows};

/// An element the CPU kernels read weights as.
pub trait WeightElem: Copy + Send + Sync {
    fn widen(self) -> f32;
}

impl WeightElem for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl WeightElem for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
}

/// The storage of a weight matrix.
#[derive(Debug, Clone, PartialEq)]
pub enum Weights {
    /// Row-major: small matrices, and those read a slice at a time (MLA's `kv_b`).
    F32(Vec<f32>),
    /// A checkpoint's f32 matrices.
    F32Panels(Box<Panels<f32>>),
    Bf16(Box<Panels<bf16>>),
    /// Symmetric int8 with a scale per row and 32 columns, computed at load.
    Int8(Box<QuantizedRows<i8>>),
    /// An FP8 checkpoint's E4M3 codes and block scales, kept.
    Fp8(Box<QuantizedRows<E4m3>>),
}

/// What a node reports it holds its weights as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    F32,
    Bf16,
    Int8,
    Fp8,
}

impl fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WeightFormat::F32 => "f32",
            WeightFormat::Bf16 => "bf16",
            WeightFormat::Int8 => "int8",
            WeightFormat::Fp8 => "fp8",
        })
    }
}

/// How a process holds the weights it reads from a checkpoint (`--cpu-weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CpuWeights {
    /// As the checkpoint has them: an FP8 checkpoint's FP8 matrices keep their codes and
    /// scales, bf16 where every value of a matrix is a bf16, else f32.
    #[default]
    Auto,
    /// f32 always (a bf16 checkpoint widened at load: the same results, twice the bytes).
    F32,
    /// bf16 always: an f32 checkpoint is rounded to nearest even at load, which changes
    /// results (on the f32 fixture: top-1 99.65% of positions, every decided one; see
    /// `engine/tests/reference.rs`).
    Bf16,
    /// 8 bits: int8 with a scale per row and 32 columns, computed at load (a quarter of
    /// f32's bytes, and an error of its own: see `QuantizedRows` and
    /// `engine/tests/reference.rs`); an FP8 checkpoint's codes are kept instead.
    Int8,
}

impl std::str::FromStr for CpuWeights {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(CpuWeights::Auto),
            "f32" => Ok(CpuWeights::F32),
            "bf16" => Ok(CpuWeights::Bf16),
            "int8" => Ok(CpuWeights::Int8),
            other => Err(format!(
                "unknown weight format {other:?}: expected auto, f32, bf16 or int8"
            )),
        }
    }
}

impl fmt::Display for CpuWeights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CpuWeights::Auto => "auto",
            CpuWeights::F32 => "f32",
            CpuWeights::Bf16 => "bf16",
            CpuWeights::Int8 => "int8",
        })
    }
}

impl Weights {
    /// Values of a matrix with `cols` columns read from a checkpoint, held as `policy`
    /// says.
    pub fn with_policy(values: Vec<f32>, cols: usize, policy: CpuWeights) -> Self {
        match policy {
            CpuWeights::Auto => Self::compact(values, cols),
            CpuWeights::F32 => Self::f32(values, cols),
            CpuWeights::Bf16 => {
                let rounded: Vec<bf16> = values.iter().map(|v| bf16::from_f32(*v)).collect();
                Self::bf16(&rounded, cols).unwrap_or_else(|| Self::f32(values, cols))
            }
            CpuWeights::Int8 if cols > 0 => {
                Weights::Int8(Box::new(QuantizedRows::quantize(&values, cols)))
            }
            CpuWeights::Int8 => Self::f32(values, cols),
        }
    }

    /// Rows of `other` below these: the gate and up projections of an FFN fused into one
    /// matrix. Two formats that differ meet in f32.
    pub fn append_rows(self, other: Weights) -> Weights {
        match (self, other) {
            (Weights::F32(mut a), Weights::F32(b)) => {
                a.extend(b);
                Weights::F32(a)
            }
            (Weights::Bf16(mut a), Weights::Bf16(b)) if a.cols() == b.cols() => {
                a.append_rows(&b);
                Weights::Bf16(a)
            }
            (Weights::F32Panels(mut a), Weights::F32Panels(b)) if a.cols() == b.cols() => {
                a.append_rows(&b);
                Weights::F32Panels(a)
            }
            (Weights::Int8(mut a), Weights::Int8(b)) if a.cols() == b.cols() => {
                a.append_rows(*b);
                Weights::Int8(a)
            }
            (Weights::Fp8(mut a), Weights::Fp8(b)) if a.cols() == b.cols() => {
                a.append_rows(*b);
                Weights::Fp8(a)
            }
            (a, b) => {
                let mut v = a.to_f32().into_owned();
                v.extend_from_slice(&b.to_f32());
                Weights::F32(v)
            }
        }
    }

    /// bf16 when every value is exactly a bf16 (a bf16 checkpoint read as f32), so that
    /// nothing is rounded; f32 otherwise. `cols` is the matrix's row width.
    pub fn compact(values: Vec<f32>, cols: usize) -> Self {
        if !values.iter().all(|v| v.to_bits() & 0xffff == 0) {
            return Self::f32(values, cols);
        }
        let exact: Vec<bf16> = values
            .iter()
            .map(|v| bf16::from_bits((v.to_bits() >> 16) as u16))
            .collect();
        Self::bf16(&exact, cols).unwrap_or_else(|| Self::f32(values, cols))
    }

    /// A row-major f32 matrix `cols` wide, packed; kept row-major when it is not one.
    pub fn f32(values: Vec<f32>, cols: usize) -> Self {
        if cols > 0 && values.len().is_multiple_of(cols) {
            let rows = values.len() / cols;
            Weights::F32Panels(Box::new(Panels::pack(&values, rows, cols)))
        } else {
            Weights::F32(values)
        }
    }

    /// A row-major bf16 matrix `cols` wide, packed; `None` when it is not one.
    pub fn bf16(values: &[bf16], cols: usize) -> Option<Self> {
        (cols > 0 && values.len().is_multiple_of(cols))
            .then(|| Weights::Bf16(Box::new(Panels::pack(values, values.len() / cols, cols))))
    }

    pub fn len(&self) -> usize {
        match self {
            Weights::F32(w) => w.len(),
            Weights::F32Panels(w) => w.rows() * w.cols(),
            Weights::Bf16(w) => w.rows() * w.cols(),
            Weights::Int8(w) => w.len(),
            Weights::Fp8(w) => w.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn format(&self) -> WeightFormat {
        match self {
            Weights::F32(_) | Weights::F32Panels(_) => WeightFormat::F32,
            Weights::Bf16(_) => WeightFormat::Bf16,
            Weights::Int8(_) => WeightFormat::Int8,
            Weights::Fp8(_) => WeightFormat::Fp8,
        }
    }

    /// Bytes held in memory.
    pub fn bytes(&self) -> usize {
        match self {
            Weights::F32(w) => 4 * w.len(),
            Weights::F32Panels(w) => 4 * w.held(),
            Weights::Bf16(w) => 2 * w.held(),
            Weights::Int8(w) => w.bytes(),
            Weights::Fp8(w) => w.bytes(),
        }
    }

    /// The values as f32: borrowed when held as f32, widened (a copy) otherwise.
    pub fn to_f32(&self) -> Cow<'_, [f32]> {
        match self {
            Weights::F32(w) => Cow::Borrowed(w),
            Weights::F32Panels(w) => Cow::Owned(w.unpack()),
            Weights::Bf16(w) => Cow::Owned(w.unpack().iter().map(|v| v.widen()).collect()),
            Weights::Int8(w) => Cow::Owned(w.dequantize()),
            Weights::Fp8(w) => Cow::Owned(w.dequantize()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_keeps_bf16_exact_values_as_bf16_and_anything_else_as_f32() {
        let exact: Vec<f32> = [1.0f32, -0.5, 3.140625, 0.0, -0.0, 1e-30]
            .iter()
            .map(|v| bf16::from_f32(*v).to_f32())
            .collect();
        let w = Weights::compact(exact.clone(), 3);
        assert_eq!(w.format(), WeightFormat::Bf16);
        // Two rows of three, in one panel padded to 32 rows.
        assert_eq!(w.bytes(), 2 * 32 * 3);
        // Widening gives back every bit, signed zero included.
        let back = w.to_f32();
        assert!(
            back.iter()
                .zip(&exact)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
        // One value off the bf16 grid keeps the whole matrix f32.
        let mut off = exact.clone();
        off[3] = 1.0 + f32::EPSILON;
        assert_eq!(Weights::compact(off.clone(), 3).format(), WeightFormat::F32);
        // Not a matrix that wide: kept as f32 rather than guessed at.
        assert_eq!(
            Weights::compact(exact.clone(), 4).format(),
            WeightFormat::F32
        );
        // The policies: f32 keeps everything, bf16 rounds to nearest even.
        let forced = Weights::with_policy(off.clone(), 3, CpuWeights::F32);
        assert_eq!(forced.format(), WeightFormat::F32);
        assert_eq!(forced.to_f32(), off.as_slice());
        let rounded = Weights::with_policy(off.clone(), 3, CpuWeights::Bf16);
        assert_eq!(rounded.format(), WeightFormat::Bf16);
        assert_eq!(rounded.to_f32()[3], 1.0);
        for (s, p) in [
            ("auto", CpuWeights::Auto),
            ("f32", CpuWeights::F32),
            ("bf16", CpuWeights::Bf16),
            ("int8", CpuWeights::Int8),
        ] {
            assert_eq!(s.parse::<CpuWeights>(), Ok(p));
            assert_eq!(p.to_string(), s);
        }
        assert!("int4".parse::<CpuWeights>().is_err());
    }
}
