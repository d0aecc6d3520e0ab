//! The CPU kernels of the forward pass, f32 arithmetic over f32, bf16 or 8-bit weights
//! ([`Weights`]). A checkpoint's f32 and bf16 matrices are packed into [`Panels`] at load
//! and multiplied as outer products ([`panel_matmul_wt`]); int8 goes through VNNI
//! ([`int8_skinny_matmul_wt`]) or gemm. Small row-major matrices go through the `gemm`
//! crate (blocked, AVX-512 microkernels, rayon threads), or through [`skinny_matmul_wt`]
//! when they have few rows; the rest is elementwise.

use gemm::{Parallelism, gemm};

mod int8_dot;
mod panels;
mod quantized;
mod skinny;
mod weights;
pub use int8_dot::{QuantizedActs, int8_skinny_matmul_wt};
pub use panels::{PanelElem, Panels, panel_matmul_wt};
pub use quantized::{Code, E4m3, GROUP, QuantizedRows};
pub use skinny::{LANES, RowSource, SKINNY_MAX_ROWS, skinny_matmul_wt};
pub use weights::{CpuWeights, WeightElem, WeightFormat, Weights};

/// A PyTorch `nn.Linear` weight without bias, `[out_dim, in_dim]`, held as [`Weights`]
/// says.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Weights,
    pub out_dim: usize,
    pub in_dim: usize,
}

impl Linear {
    /// f32 weights.
    pub fn new(weight: Vec<f32>, out_dim: usize, in_dim: usize) -> Self {
        Self::from_weights(Weights::F32(weight), out_dim, in_dim)
    }

    pub fn from_weights(weight: Weights, out_dim: usize, in_dim: usize) -> Self {
        assert_eq!(weight.len(), out_dim * in_dim, "Linear weight length");
        // 8-bit scales are indexed by the width they were grouped at.
        let grouped_at = match &weight {
            Weights::Int8(q) => Some(q.cols()),
            Weights::Fp8(q) => Some(q.cols()),
            Weights::F32(_) | Weights::F32Panels(_) | Weights::Bf16(_) => None,
        };
        assert!(
            grouped_at.is_none_or(|c| c == in_dim),
            "Linear 8-bit row width"
        );
        Linear {
            weight,
            out_dim,
            in_dim,
        }
    }

    /// `y[t, :] = W x[t, :]` for `rows` rows of `x`; returns `[rows, out_dim]`.
    pub fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let mut y = vec![0.0; rows * self.out_dim];
        self.forward_into(x, rows, &mut y);
        y
    }

    pub fn forward_into(&self, x: &[f32], rows: usize, y: &mut [f32]) {
        let (k, n) = (self.in_dim, self.out_dim);
        match &self.weight {
            Weights::F32(w) => matmul_wt(x, rows, k, w, n, y, threads()),
            Weights::F32Panels(w) => matmul_wt_panels(x, rows, w, y),
            Weights::Bf16(w) => matmul_wt_panels(x, rows, w, y),
            Weights::Int8(w) => matmul_wt_int8(x, rows, k, w, n, y),
            Weights::Fp8(w) => matmul_wt_widened(x, rows, k, w.as_ref(), n, y),
        }
    }
}

/// How many threads a matrix product may use; gemm decides per call whether a product is
/// big enough to split.
fn threads() -> Parallelism {
    Parallelism::Rayon(0)
}

/// `y[m, n] = x[m, k] · w[n, k]^T`, all row-major and contiguous. Weights stay in the
/// layout PyTorch writes them; the transpose is only a choice of strides.
pub fn matmul_wt(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    y: &mut [f32],
    par: Parallelism,
) {
    if handled_as_edge(x, m, k, w.len(), n, y) {
        return;
    }
    if m <= SKINNY_MAX_ROWS {
        skinny_matmul_wt(x, m, k, w, n, y, !matches!(par, Parallelism::None));
        return;
    }
    gemm_wt_columns(x, m, k, w, n, y, n, par);
}

/// Checks the shapes, and does the products with nothing to multiply (an empty output, or
/// `k = 0`: zeros); true when nothing is left to do.
fn handled_as_edge(x: &[f32], m: usize, k: usize, w_len: usize, n: usize, y: &mut [f32]) -> bool {
    assert!(x.len() >= m * k && w_len >= n * k && y.len() >= m * n);
    if m == 0 || n == 0 {
        return true;
    }
    if k == 0 {
        y[..m * n].fill(0.0);
        return true;
    }
    false
}

/// `y[:, 0..r] = x · w^T` through gemm, `w` `[r, k]`, where `y`'s rows are `y_rs` apart (a
/// block of columns of a wider output).
#[allow(clippy::too_many_arguments)]
fn gemm_wt_columns(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    r: usize,
    y: &mut [f32],
    y_rs: usize,
    par: Parallelism,
) {
    assert!(m > 0 && r > 0 && r <= y_rs && x.len() >= m * k && w.len() >= r * k);
    assert!(y.len() >= (m - 1) * y_rs + r);
    // SAFETY: the asserts above bound every index gemm computes from these strides.
    unsafe {
        gemm(
            m,
            r,
            k,
            y.as_mut_ptr(),
            1,
            y_rs as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// Weight rows widened per gemm call on the narrow-weight paths: 4 MB of f32 at k = 4096,
/// so the widened block stays in L2/L3 while gemm packs it.
const WIDEN_GEMM_ROWS: usize = 256;

/// [`matmul_wt`] with weights held narrower than f32 (bf16, 8-bit). Few rows: the skinny
/// kernels widen in registers. More (prefill): gemm over blocks of weight rows widened
/// into a scratch buffer, one block at a time, so no f32 copy of the whole matrix is ever
/// held.
pub fn matmul_wt_widened<S: RowSource + ?Sized>(
    x: &[f32],
    m: usize,
    k: usize,
    w: &S,
    n: usize,
    y: &mut [f32],
) {
    if handled_as_edge(x, m, k, w.elems(), n, y) {
        return;
    }
    if m <= SKINNY_MAX_ROWS {
        skinny_matmul_wt(x, m, k, w, n, y, true);
        return;
    }
    let mut block = vec![0.0f32; WIDEN_GEMM_ROWS.min(n) * k];
    let full = k - k % LANES;
    let mut j = 0;
    while j < n {
        let r = (n - j).min(WIDEN_GEMM_ROWS);
        for (ri, row) in block.chunks_exact_mut(k).take(r).enumerate() {
            for (c, lanes) in row[..full].chunks_exact_mut(LANES).enumerate() {
                lanes.copy_from_slice(&w.lanes(j + ri, k, c * LANES));
            }
            for (c, v) in row.iter_mut().enumerate().skip(full) {
                *v = w.at(j + ri, k, c);
            }
        }
        gemm_wt_columns(x, m, k, &block[..r * k], r, &mut y[j..], n, threads());
        j += r;
    }
}

/// [`matmul_wt`] with weights in panels: the edge cases, then [`panel_matmul_wt`].
fn matmul_wt_panels<E: PanelElem>(x: &[f32], m: usize, w: &Panels<E>, y: &mut [f32]) {
    let (k, n) = (w.cols(), w.rows());
    if !handled_as_edge(x, m, k, n * k, n, y) {
        panel_matmul_wt(x, m, w, y, true);
    }
}

/// Up to this many rows, int8 products quantize their activations for VNNI; more widen
/// the weights for gemm. Measured on the synth model's expert matrices (`bench_matvec`,
/// 2-core AVX-512 VNNI): VNNI takes half gemm's time at 64 rows and breaks even at about
/// 160 (gate/up) to 200 (down).
pub const INT8_VNNI_MAX_ROWS: usize = 160;

/// [`matmul_wt`] with int8 weights: up to [`INT8_VNNI_MAX_ROWS`] rows quantize their
/// activations for VNNI ([`int8_skinny_matmul_wt`]); more (long prefills) widen the
/// weights for gemm against f32 activations, as [`matmul_wt_widened`] does.
fn matmul_wt_int8(x: &[f32], m: usize, k: usize, w: &QuantizedRows<i8>, n: usize, y: &mut [f32]) {
    if m > INT8_VNNI_MAX_ROWS {
        matmul_wt_widened(x, m, k, w, n, y);
    } else if !handled_as_edge(x, m, k, w.len(), n, y) {
        int8_skinny_matmul_wt(x, m, k, w, n, y, true);
    }
}

/// General strided product `dst = a · b` on row-major views with row strides given,
/// for attention's per-head slices.
#[allow(clippy::too_many_arguments)]
pub fn matmul_strided(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    b: &[f32],
    b_rs: usize,
    b_cs: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |rows: usize, rs: usize, cols: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(dst.len() > last(m, dst_rs, n, 1));
    if k == 0 {
        for r in 0..m {
            dst[r * dst_rs..r * dst_rs + n].fill(0.0);
        }
        return;
    }
    assert!(a.len() > last(m, a_rs, k, a_cs) && b.len() > last(k, b_rs, n, b_cs));
    // SAFETY: bounds checked above for the largest offsets gemm will touch.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            false,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// RMSNorm as transformers computes it: `x / sqrt(mean(x^2) + eps) * weight`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let h = weight.len();
    for (row, o) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
        let ss: f32 = row.iter().map(|v| v * v).sum::<f32>() / h as f32;
        let inv = 1.0 / (ss + eps).sqrt();
        for ((o, v), w) in o.iter_mut().zip(row).zip(weight) {
            *o = w * (v * inv);
        }
    }
}

pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// In-place softmax over `x`, in f32 with the max subtracted first.
pub fn softmax_in_place(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Rotary position embeddings: the split-halves convention (`rotate_half`) of transformers'
/// Llama/Mixtral/Qwen, or DeepSeek's interleaved pairs. Tables are computed in f64 and
/// stored per position.
#[derive(Debug, Clone)]
pub struct Rope {
    /// Rotated dimensions per head.
    head_dim: usize,
    /// Pairs `(2i, 2i + 1)` instead of `(i, i + head_dim / 2)`.
    interleaved: bool,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    pub fn new(head_dim: usize, theta: f64, max_positions: usize) -> Self {
        let inv_freq: Vec<f64> = (0..head_dim / 2)
            .map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64))
            .collect();
        Self::from_inv_freq(&inv_freq, 1.0, false, max_positions)
    }

    /// A family's RoPE (YaRN included), from its config.
    pub fn from_config(rope: &crate::config::RopeConfig, max_positions: usize) -> Self {
        Self::from_inv_freq(
            &rope.inv_freq(),
            rope.attention_factor(),
            rope.interleaved,
            max_positions,
        )
    }

    /// Tables for `inv_freq.len() * 2` rotated dimensions; cos and sin are multiplied by
    /// `attention_factor` (YaRN's magnitude correction), as transformers does.
    pub fn from_inv_freq(
        inv_freq: &[f64],
        attention_factor: f64,
        interleaved: bool,
        max_positions: usize,
    ) -> Self {
        let half = inv_freq.len();
        let mut cos = vec![0.0; max_positions * half];
        let mut sin = vec![0.0; max_positions * half];
        for p in 0..max_positions {
            for (i, f) in inv_freq.iter().enumerate() {
                let angle = p as f64 * f;
                cos[p * half + i] = (angle.cos() * attention_factor) as f32;
                sin[p * half + i] = (angle.sin() * attention_factor) as f32;
            }
        }
        Rope {
            head_dim: 2 * half,
            interleaved,
            cos,
            sin,
        }
    }

    pub fn max_positions(&self) -> usize {
        self.cos.len() / (self.head_dim / 2).max(1)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// The cos and sin tables, `[max_positions, head_dim / 2]` each: what the GPU kernel
    /// reads, so that both devices rotate by the very same f32 values.
    pub fn tables(&self) -> (&[f32], &[f32]) {
        (&self.cos, &self.sin)
    }

    /// Rotates every head of one token's projection (`heads * head_dim` values) in place.
    pub fn apply(&self, x: &mut [f32], pos: usize) {
        self.apply_strided(x, pos, self.head_dim, 0);
    }

    /// Rotates `x[h * stride + offset..][..head_dim]` of every head `h` in place: the
    /// rotary part of heads that also carry unrotated dimensions (MLA's queries).
    pub fn apply_strided(&self, x: &mut [f32], pos: usize, stride: usize, offset: usize) {
        let half = self.head_dim / 2;
        let cos = &self.cos[pos * half..(pos + 1) * half];
        let sin = &self.sin[pos * half..(pos + 1) * half];
        for head in x.chunks_exact_mut(stride) {
            let head = &mut head[offset..offset + self.head_dim];
            if self.interleaved {
                for (i, pair) in head.chunks_exact_mut(2).enumerate() {
                    let (x1, x2) = (pair[0], pair[1]);
                    pair[0] = x1 * cos[i] - x2 * sin[i];
                    pair[1] = x2 * cos[i] + x1 * sin[i];
                }
            } else {
                let (a, b) = head.split_at_mut(half);
                for i in 0..half {
                    let (x1, x2) = (a[i], b[i]);
                    a[i] = x1 * cos[i] - x2 * sin[i];
                    b[i] = x2 * cos[i] + x1 * sin[i];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    pub(super) fn naive(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f64> {
        let mut y = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k)
                    .map(|t| x[i * k + t] as f64 * w[j * k + t] as f64)
                    .sum();
            }
        }
        y
    }

    pub(super) fn pseudo_random(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) - 0.5
            })
            .collect()
    }

    #[test]
    fn matmul_wt_matches_f64_reference() {
        for &(m, k, n) in &[(1, 64, 128), (3, 17, 5), (37, 64, 129), (64, 300, 64)] {
            let x = pseudo_random(m * k, 1);
            let w = pseudo_random(n * k, 2);
            let mut y = vec![f32::NAN; m * n];
            matmul_wt(&x, m, k, &w, n, &mut y, threads());
            for (a, b) in y.iter().zip(naive(&x, m, k, &w, n)) {
                assert!((*a as f64 - b).abs() < 1e-4, "{a} vs {b} at {m}x{k}x{n}");
            }
        }
    }

    /// The narrow formats (bf16 panels; int8 skinny, and blocked gemm across the block
    /// edge) against the f32 product over the same values. int8's skinny path computes
    /// with activations quantized to int8, so its f32 product is taken over those. The
    /// panels sum in another order than the f32 kernels, so they agree to rounding, not
    /// to the bit (`panels.rs` checks their bits against its portable kernel).
    #[test]
    fn narrow_linears_match_the_f32_linear_on_the_same_values() {
        for &(m, k, n) in &[
            (1, 64, 300),
            (5, 33, 131),
            (33, 70, 257),
            (64, 300, 600),
            (INT8_VNNI_MAX_ROWS + 1, 70, 90),
        ] {
            let x = pseudo_random(m * k, 31);
            let w: Vec<f32> = pseudo_random(n * k, 32)
                .into_iter()
                .map(|v| bf16::from_f32(v).to_f32())
                .collect();
            let narrow = [
                Weights::compact(w.clone(), k),
                Weights::with_policy(w.clone(), k, CpuWeights::Int8),
            ];
            for (a, format) in narrow
                .into_iter()
                .zip([WeightFormat::Bf16, WeightFormat::Int8])
            {
                assert_eq!(a.format(), format);
                let b = Linear::new(a.to_f32().into_owned(), n, k);
                let a = Linear::from_weights(a, n, k);
                let int8_skinny = format == WeightFormat::Int8 && m <= INT8_VNNI_MAX_ROWS;
                let x_used: Vec<f32> = if int8_skinny {
                    let acts = QuantizedActs::quantize(&x, m, k);
                    (0..m * k).map(|i| acts.at(i / k, i % k)).collect()
                } else {
                    x.clone()
                };
                let (ya, yb) = (a.forward(&x, m), b.forward(&x_used, m));
                for (p, q) in ya.iter().zip(&yb) {
                    assert!(
                        (p - q).abs() <= 1e-5 * q.abs().max(1.0),
                        "{format}: {p} vs {q} at {m}x{k}x{n}"
                    );
                }
            }
        }
    }

    #[test]
    fn strided_matches_contiguous() {
        let (m, k, n) = (5, 8, 7);
        let x = pseudo_random(m * k, 3);
        let w = pseudo_random(n * k, 4);
        let mut a = vec![0.0; m * n];
        let mut b = vec![0.0; m * n];
        matmul_wt(&x, m, k, &w, n, &mut a, Parallelism::None);
        // b = x · w^T with w^T seen through strides (row stride 1, column stride k).
        matmul_strided(m, n, k, &mut b, n, &x, k, 1, &w, 1, k);
        for (p, q) in a.iter().zip(&b) {
            assert!((p - q).abs() < 1e-6, "{p} vs {q}");
        }
    }

    #[test]
    fn rope_preserves_norm_and_is_identity_at_zero() {
        let rope = Rope::new(8, 10000.0, 16);
        let orig = pseudo_random(16, 5);
        let mut x = orig.clone();
        rope.apply(&mut x, 0);
        assert_eq!(x, orig);
        rope.apply(&mut x, 7);
        let n0: f32 = orig.iter().map(|v| v * v).sum();
        let n1: f32 = x.iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-5);
        // Relative position property: <R(p)q, R(p+d)k> depends only on d.
        let q = pseudo_random(8, 6);
        let k = pseudo_random(8, 7);
        let dot_at = |p: usize, d: usize| {
            let (mut a, mut b) = (q.clone(), k.clone());
            rope.apply(&mut a, p);
            rope.apply(&mut b, p + d);
            a.iter().zip(&b).map(|(x, y)| x * y).sum::<f32>()
        };
        assert!((dot_at(1, 3) - dot_at(9, 3)).abs() < 1e-5);
    }

    #[test]
    fn softmax_sums_to_one_and_survives_large_logits() {
        let mut x = vec![1000.0, 1001.0, 999.0];
        softmax_in_place(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(x[1] > x[0] && x[0] > x[2]);
    }
}
