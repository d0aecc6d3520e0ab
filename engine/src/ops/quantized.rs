//! 8-bit weight matrices: one byte per weight and one f32 scale per row and group of
//! [`GROUP`] columns: int8 codes computed at load (symmetric, per group), or an FP8
//! checkpoint's E4M3 codes kept as they are. FP8 codes, and int8 in products of many rows
//! (prefill), are widened to f32 in registers against f32 activations, so the only error
//! is the weights' own (none for kept FP8: the product computes what the f32 product over
//! the dequantized checkpoint computes). int8 products of few rows (decode) quantize
//! their activations too, for VNNI (`super::int8_dot`).

/// Columns that share one scale. A multiple of the kernels' 16 lanes, so that a run of
/// lanes never straddles two scales; it also divides the 128-column blocks of the FP8
/// releases (DeepSeek-V3, Qwen3), whose scales are kept by repeating them per group.
pub const GROUP: usize = 32;

/// A weight's one-byte code.
pub trait Code: Copy + Send + Sync + 'static {
    /// What the stored scales hold besides the true scale: the code's [`Code::raw`] value
    /// times `scale * SCALE_FACTOR` is the weight.
    const SCALE_FACTOR: f32;
    /// The code as an f32, before the scale: a few cheap vector instructions.
    fn raw(self) -> f32;
}

impl Code for i8 {
    const SCALE_FACTOR: f32 = 1.0;
    #[inline(always)]
    fn raw(self) -> f32 {
        f32::from(self)
    }
}

/// A `float8_e4m3fn` code (sign, 4 exponent bits of bias 7, 3 mantissa bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(transparent)]
pub struct E4m3(pub u8);

/// 2^120: moves an f32 exponent of bias 127 to E4M3's bias of 7.
const E4M3_REBIAS: f32 = f32::from_bits((127 + 120) << 23);

impl Code for E4m3 {
    const SCALE_FACTOR: f32 = E4M3_REBIAS;
    /// The sign goes to bit 31 and the exponent and mantissa bits to the top of the f32's
    /// exponent and mantissa fields: an f32 equal to the code's value times 2^-120, whose
    /// subnormals land on f32 subnormals with the same scaling. Shifts and masks, where
    /// a table lookup would be a gather. (The NaN code, which no weight holds, decodes as
    /// a finite value.)
    #[inline(always)]
    fn raw(self) -> f32 {
        let c = u32::from(self.0);
        f32::from_bits(((c & 0x80) << 24) | ((c & 0x7f) << 20))
    }
}

/// A row-major `[rows, cols]` matrix of codes with one scale per row and [`GROUP`]
/// columns (the last group of a row may be narrower).
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedRows<C> {
    codes: Vec<C>,
    /// `[rows, cols.div_ceil(GROUP)]`, each already multiplied by `C::SCALE_FACTOR`.
    scales: Vec<f32>,
    cols: usize,
}

impl<C: Code> QuantizedRows<C> {
    pub fn len(&self) -> usize {
        self.codes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.codes.is_empty()
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held in memory, scales included.
    pub fn bytes(&self) -> usize {
        self.codes.len() + 4 * self.scales.len()
    }

    /// Scale groups per row.
    pub fn groups(&self) -> usize {
        self.cols.div_ceil(GROUP)
    }

    /// `[rows, groups]`, each already multiplied by `C::SCALE_FACTOR`.
    #[inline(always)]
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// The scale of row `row`'s group holding column `col`.
    #[inline(always)]
    pub fn scale(&self, row: usize, col: usize) -> f32 {
        self.scales[row * self.groups() + col / GROUP]
    }

    /// Weight `(row, col)` as f32: the value every product computes with.
    #[inline(always)]
    pub fn at(&self, row: usize, col: usize) -> f32 {
        self.codes[row * self.cols + col].raw() * self.scale(row, col)
    }

    #[inline(always)]
    pub fn codes(&self) -> &[C] {
        &self.codes
    }

    pub fn dequantize(&self) -> Vec<f32> {
        let rows = self.codes.len() / self.cols.max(1);
        let mut out = Vec::with_capacity(self.codes.len());
        for r in 0..rows {
            out.extend((0..self.cols).map(|c| self.at(r, c)));
        }
        out
    }

    /// Rows of `other` below these (the gate and up projections fused into one matrix).
    pub fn append_rows(&mut self, other: QuantizedRows<C>) {
        assert_eq!(self.cols, other.cols, "appending rows of another width");
        self.codes.extend(other.codes);
        self.scales.extend(other.scales);
    }
}

impl QuantizedRows<i8> {
    /// Symmetric int8 of row-major `values` with `cols` columns: per group, the largest
    /// magnitude maps to 127 and every value to the nearest code, so the error of each
    /// weight is at most half its group's step (`max|w| / 254`).
    pub fn quantize(values: &[f32], cols: usize) -> Self {
        assert!(
            cols > 0 && values.len().is_multiple_of(cols),
            "int8 of a ragged matrix"
        );
        let groups = cols.div_ceil(GROUP);
        let mut codes = Vec::with_capacity(values.len());
        let mut scales = Vec::with_capacity(values.len() / cols * groups);
        for row in values.chunks_exact(cols) {
            for group in row.chunks(GROUP) {
                let max = group.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let code = |v: f32, scale: f32| {
                    if scale > 0.0 {
                        (v / scale).round().clamp(-127.0, 127.0) as i8
                    } else {
                        0
                    }
                };
                let scale = max / 127.0;
                scales.push(scale);
                codes.extend(group.iter().map(|v| code(*v, scale)));
            }
        }
        QuantizedRows {
            codes,
            scales,
            cols,
        }
    }
}

impl QuantizedRows<E4m3> {
    /// An FP8 checkpoint's codes `[rows, cols]` with its scales `[ceil(rows / b0),
    /// ceil(cols / b1)]` (`scale_inv`, multiplied), kept without change; `None` where they
    /// cannot be held exactly: a block width that is not a multiple of [`GROUP`], or a
    /// scale too large to carry the rebias factor.
    pub fn from_blocks(
        codes: &[u8],
        block_scales: &[f32],
        cols: usize,
        block: [usize; 2],
    ) -> Option<Self> {
        if cols == 0 || block[0] == 0 || !block[1].is_multiple_of(GROUP) {
            return None;
        }
        let rows = codes.len() / cols;
        let (groups, scale_cols) = (cols.div_ceil(GROUP), cols.div_ceil(block[1]));
        if block_scales.len() != rows.div_ceil(block[0]) * scale_cols {
            return None;
        }
        let mut scales = Vec::with_capacity(rows * groups);
        for r in 0..rows {
            let block_row = &block_scales[(r / block[0]) * scale_cols..][..scale_cols];
            for g in 0..groups {
                let s = block_row[g * GROUP / block[1]] * E4m3::SCALE_FACTOR;
                if !s.is_finite() {
                    return None;
                }
                scales.push(s);
            }
        }
        Some(QuantizedRows {
            codes: codes.iter().map(|c| E4m3(*c)).collect(),
            scales,
            cols,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::F8E4M3_TO_F32;
    use crate::quant::dequantize_fp8_blocks;

    #[test]
    fn e4m3_raw_times_its_factor_is_the_checkpoint_decode_for_every_code() {
        for c in 0..=255u8 {
            let want = F8E4M3_TO_F32[usize::from(c)];
            if want.is_nan() {
                continue;
            }
            let got = E4m3(c).raw() * E4m3::SCALE_FACTOR;
            assert_eq!(got.to_bits(), want.to_bits(), "code {c:#04x}");
        }
    }

    /// Kept FP8 weights are the checkpoint loader's dequantized f32 weights, bit for bit,
    /// at every block shape the releases and the fixture use.
    #[test]
    fn fp8_kept_as_codes_dequantizes_to_the_loaders_bits() {
        for (rows, cols, block) in [(5, 64, [2, 32]), (130, 256, [128, 128]), (3, 96, [32, 32])] {
            let codes: Vec<u8> = (0..rows * cols)
                .map(|i| ((i * 37 + 11) % 256) as u8)
                .filter(|c| c & 0x7f != 0x7f)
                .chain(std::iter::repeat(0x38))
                .take(rows * cols)
                .collect();
            let scale_len = rows.div_ceil(block[0]) * cols.div_ceil(block[1]);
            let scales: Vec<f32> = (0..scale_len)
                .map(|i| 1e-3 * (1.0 + i as f32 / 7.0))
                .collect();
            let kept = QuantizedRows::from_blocks(&codes, &scales, cols, block).unwrap();
            let mut want = vec![0.0; rows * cols];
            dequantize_fp8_blocks(&codes, &scales, rows, cols, block, &mut want);
            let got = kept.dequantize();
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{rows}x{cols} {block:?}"
            );
            assert_eq!(kept.bytes(), rows * cols + 4 * rows * cols.div_ceil(GROUP));
        }
        // A block narrower than a group cannot be kept (the loader then widens).
        assert!(QuantizedRows::from_blocks(&[0; 32], &[1.0; 2], 32, [1, 16]).is_none());
    }

    #[test]
    fn int8_error_is_at_most_half_a_step_of_its_group() {
        let cols = 70; // two full groups and a narrower one
        let values: Vec<f32> = (0..4 * cols)
            .map(|i| ((i as f32 * 0.7).sin() * (1.0 + (i % 9) as f32)) * 1e-2)
            .collect();
        let q = QuantizedRows::quantize(&values, cols);
        let back = q.dequantize();
        for (i, (v, b)) in values.iter().zip(&back).enumerate() {
            let (r, c) = (i / cols, i % cols);
            let step = q.scale(r, c);
            assert!(
                (v - b).abs() <= 0.5 * step * (1.0 + 1e-6),
                "({r}, {c}): {v} vs {b}"
            );
        }
        // An all-zero group has a zero scale and decodes to zeros, not NaN.
        let zero = QuantizedRows::quantize(&[0.0; 40], 40);
        assert_eq!(zero.dequantize(), vec![0.0; 40]);
    }
}
