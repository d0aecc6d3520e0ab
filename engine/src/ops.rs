//! The f32 CPU kernels of the forward pass. Matrix products go through the `gemm` crate
//! (blocked, AVX-512 microkernels, rayon threads); the rest is elementwise.

use gemm::{Parallelism, gemm};

/// A PyTorch `nn.Linear` weight without bias: row-major `[out_dim, in_dim]`.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Vec<f32>,
    pub out_dim: usize,
    pub in_dim: usize,
}

impl Linear {
    pub fn new(weight: Vec<f32>, out_dim: usize, in_dim: usize) -> Self {
        assert_eq!(weight.len(), out_dim * in_dim, "Linear weight length");
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
        matmul_wt(
            x,
            rows,
            self.in_dim,
            &self.weight,
            self.out_dim,
            y,
            threads(),
        );
    }
}

/// How many threads a matrix product may use; gemm decides per call whether a product is
/// big enough to split.
fn threads() -> Parallelism {
    Parallelism::Rayon(0)
}

/// Up to this many rows of `x`, [`matmul_wt`] streams the weights through
/// [`skinny_matmul_wt`] instead of packing them for gemm.
pub const SKINNY_MAX_ROWS: usize = 32;

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
    assert!(x.len() >= m * k && w.len() >= n * k && y.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        y[..m * n].fill(0.0);
        return;
    }
    if m <= SKINNY_MAX_ROWS {
        skinny_matmul_wt(x, m, k, w, n, y, !matches!(par, Parallelism::None));
        return;
    }
    // SAFETY: the asserts above bound every index gemm computes from these strides.
    unsafe {
        gemm(
            m,
            n,
            k,
            y.as_mut_ptr(),
            1,
            n as isize,
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

/// Columns of `y` per parallel task in [`skinny_matmul_wt`].
const SKINNY_COLS_PER_TASK: usize = 64;
const LANES: usize = 16;

/// `y = x · w^T` for a few rows of `x` (decode batches, small expert groups). Memory-bound:
/// each weight row is read from memory once and, while it sits in L1, dotted with every
/// row of `x`. gemm would first copy (pack) the whole weight matrix, which costs more than
/// the product itself at this shape.
pub fn skinny_matmul_wt(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    y: &mut [f32],
    parallel: bool,
) {
    assert!(x.len() >= m * k && w.len() >= n * k && y.len() >= m * n);
    let task = |cols: std::ops::Range<usize>| -> Vec<f32> {
        // Output for these columns, column-major: [cols.len(), m].
        let mut out = vec![0.0f32; cols.len() * m];
        let mut j = cols.start;
        while j < cols.end {
            let r = (cols.end - j).min(BLOCK_ROWS);
            let mut t = 0;
            while t < m {
                let g = (m - t).min(BLOCK_TOKENS);
                let dots = dot_block(&w[j * k..(j + r) * k], r, &x[t * k..(t + g) * k], g, k);
                for (ri, row) in dots.iter().enumerate().take(r) {
                    let c = j - cols.start + ri;
                    out[c * m + t..c * m + t + g].copy_from_slice(&row[..g]);
                }
                t += g;
            }
            j += r;
        }
        out
    };
    let scatter = |y: &mut [f32], start: usize, block: &[f32]| {
        for (c, col) in block.chunks_exact(m).enumerate() {
            for (t, v) in col.iter().enumerate() {
                y[t * n + start + c] = *v;
            }
        }
    };
    if parallel && n >= 2 * SKINNY_COLS_PER_TASK {
        use rayon::prelude::*;
        let blocks: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(SKINNY_COLS_PER_TASK))
            .into_par_iter()
            .map(|b| {
                let start = b * SKINNY_COLS_PER_TASK;
                (start, task(start..(start + SKINNY_COLS_PER_TASK).min(n)))
            })
            .collect();
        for (start, block) in blocks {
            scatter(y, start, &block);
        }
    } else {
        let block = task(0..n);
        scatter(y, 0, &block);
    }
}

/// A register block: this many weight rows times this many rows of `x` (16 vector
/// accumulators), so each load feeds several multiply-adds.
const BLOCK_ROWS: usize = 4;
const BLOCK_TOKENS: usize = 4;
type Block = [[f32; BLOCK_TOKENS]; BLOCK_ROWS];

/// Dot products of `r` consecutive weight rows (`ws`, `r * k`) with `g` consecutive rows
/// of `xs` (`g * k`); `r`, `g` at most the block size.
fn dot_block(ws: &[f32], r: usize, xs: &[f32], g: usize, k: usize) -> Block {
    assert!(r <= BLOCK_ROWS && g <= BLOCK_TOKENS && ws.len() >= r * k && xs.len() >= g * k);
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F, checked just above.
            return unsafe { dot_block_avx512(ws, r, xs, g, k) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA, checked just above.
            return unsafe { dot_block_avx2(ws, r, xs, g, k) };
        }
    }
    dot_block_dispatch::<false>(ws, r, xs, g, k)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
fn dot_block_avx512(ws: &[f32], r: usize, xs: &[f32], g: usize, k: usize) -> Block {
    dot_block_dispatch::<true>(ws, r, xs, g, k)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot_block_avx2(ws: &[f32], r: usize, xs: &[f32], g: usize, k: usize) -> Block {
    dot_block_dispatch::<true>(ws, r, xs, g, k)
}

#[inline(always)]
fn dot_block_dispatch<const FMA: bool>(
    ws: &[f32],
    r: usize,
    xs: &[f32],
    g: usize,
    k: usize,
) -> Block {
    match (r, g) {
        (4, 4) => dot_block_fixed::<4, 4, FMA>(ws, xs, k),
        (4, 2) => dot_block_fixed::<4, 2, FMA>(ws, xs, k),
        (4, 3) => dot_block_fixed::<4, 3, FMA>(ws, xs, k),
        _ => {
            // Block edges, and single tokens (matrix-vector products, where one weight
            // stream at a time keeps the prefetcher ahead): one weight row at a time.
            let mut out = Block::default();
            for (ri, row) in out.iter_mut().enumerate().take(r) {
                let one = if g == 1 {
                    dot_block_fixed::<1, 1, FMA>(&ws[ri * k..], xs, k)
                } else {
                    dot_block_fixed::<1, BLOCK_TOKENS, FMA>(&ws[ri * k..], xs, k)
                };
                row[..g].copy_from_slice(&one[0][..g]);
            }
            out
        }
    }
}

/// `R` weight rows times `G` token rows, in fixed-width lane arrays that the compiler
/// keeps in vector registers; `FMA` only where the target fuses multiply-add in hardware.
/// Reads `R` rows of `k` from `ws` and `G` rows of `k` from `xs` (a `G < BLOCK_TOKENS`
/// block may be given a shorter `xs`).
#[inline(always)]
fn dot_block_fixed<const R: usize, const G: usize, const FMA: bool>(
    ws: &[f32],
    xs: &[f32],
    k: usize,
) -> Block {
    let rows = G.min(xs.len() / k.max(1));
    let mut acc = [[[0.0f32; LANES]; G]; R];
    let full = k - k % LANES;
    let mut i = 0;
    while i < full {
        let mut wv = [[0.0f32; LANES]; R];
        for (ri, v) in wv.iter_mut().enumerate() {
            v.copy_from_slice(&ws[ri * k + i..ri * k + i + LANES]);
        }
        for t in 0..rows {
            let xv: [f32; LANES] = xs[t * k + i..t * k + i + LANES]
                .try_into()
                .unwrap_or([0.0; LANES]);
            for ri in 0..R {
                for l in 0..LANES {
                    acc[ri][t][l] = if FMA {
                        wv[ri][l].mul_add(xv[l], acc[ri][t][l])
                    } else {
                        acc[ri][t][l] + wv[ri][l] * xv[l]
                    };
                }
            }
        }
        i += LANES;
    }
    let mut out = Block::default();
    for ri in 0..R {
        for t in 0..rows {
            let mut s: f32 = acc[ri][t].iter().sum();
            for j in full..k {
                s += ws[ri * k + j] * xs[t * k + j];
            }
            out[ri][t] = s;
        }
    }
    out
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

    fn naive(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f64> {
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

    fn pseudo_random(len: usize, seed: u32) -> Vec<f32> {
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

    #[test]
    fn skinny_path_matches_f64_reference_at_odd_shapes() {
        for &(m, k, n) in &[
            (1, 1, 1),
            (1, 15, 3),
            (2, 17, 200),
            (5, 33, 131),
            (9, 64, 129),
            (32, 100, 7),
        ] {
            let x = pseudo_random(m * k, 11);
            let w = pseudo_random(n * k, 12);
            for parallel in [false, true] {
                let mut y = vec![f32::NAN; m * n];
                skinny_matmul_wt(&x, m, k, &w, n, &mut y, parallel);
                for (a, b) in y.iter().zip(naive(&x, m, k, &w, n)) {
                    assert!((*a as f64 - b).abs() < 1e-4, "{a} vs {b} at {m}x{k}x{n}");
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
