//! Products with few rows of activations (decode batches, small expert groups), which are
//! bound by the bytes of weights they read: each weight row is read once and, while it sits
//! in L1, dotted with every row. Generic over how weights are stored ([`RowSource`]):
//! f32, bf16 or 8-bit codes widened to f32 in registers, so a narrower weight costs fewer
//! bytes and the same arithmetic.

use super::quantized::{Code, GROUP, QuantizedRows};
use super::weights::WeightElem;

/// Weight rows as the kernels read them: [`LANES`] values at a time, widened to f32.
pub trait RowSource: Sync {
    /// Values held (rows times columns).
    fn elems(&self) -> usize;
    /// Row `row` (of `k` columns), columns `col..col + LANES`, `col` a multiple of
    /// [`LANES`].
    fn lanes(&self, row: usize, k: usize, col: usize) -> [f32; LANES];
    /// One value.
    fn at(&self, row: usize, k: usize, col: usize) -> f32;
    /// Where value `(row, col)` is held (or would be, past the end: never read through).
    fn addr(&self, row: usize, k: usize, col: usize) -> *const u8;
}

/// Bytes ahead of a matrix-vector product's reads that it asks the cache for: the
/// hardware prefetcher alone stays too few lines ahead (BENCHMARKS.md, "Decode at batch 1:
/// prefetching and independent chains").
pub(super) const PREFETCH_AHEAD: usize = 4096;

#[inline(always)]
pub(super) fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint: it never faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
}

impl<W: WeightElem> RowSource for [W] {
    fn elems(&self) -> usize {
        self.len()
    }

    #[inline(always)]
    fn lanes(&self, row: usize, k: usize, col: usize) -> [f32; LANES] {
        let mut v = [0.0f32; LANES];
        for (d, s) in v
            .iter_mut()
            .zip(&self[row * k + col..row * k + col + LANES])
        {
            *d = s.widen();
        }
        v
    }

    #[inline(always)]
    fn at(&self, row: usize, k: usize, col: usize) -> f32 {
        self[row * k + col].widen()
    }

    #[inline(always)]
    fn addr(&self, row: usize, k: usize, col: usize) -> *const u8 {
        self.as_ptr().wrapping_add(row * k + col).cast()
    }
}

// A run of lanes never straddles two scales.
const _: () = assert!(GROUP.is_multiple_of(LANES));

impl<C: Code> RowSource for QuantizedRows<C> {
    fn elems(&self) -> usize {
        self.len()
    }

    #[inline(always)]
    fn lanes(&self, row: usize, k: usize, col: usize) -> [f32; LANES] {
        debug_assert_eq!(k, self.cols());
        let scale = self.scale(row, col);
        let mut v = [0.0f32; LANES];
        for (d, c) in v
            .iter_mut()
            .zip(&self.codes()[row * k + col..row * k + col + LANES])
        {
            *d = c.raw() * scale;
        }
        v
    }

    #[inline(always)]
    fn at(&self, row: usize, _k: usize, col: usize) -> f32 {
        QuantizedRows::at(self, row, col)
    }

    #[inline(always)]
    fn addr(&self, row: usize, k: usize, col: usize) -> *const u8 {
        self.codes().as_ptr().wrapping_add(row * k + col).cast()
    }
}

/// Up to this many rows of `x`, [`super::matmul_wt`] streams the weights through
/// [`skinny_matmul_wt`] instead of packing them for gemm.
pub const SKINNY_MAX_ROWS: usize = 32;

/// Columns of `y` per parallel task in [`skinny_matmul_wt`].
const SKINNY_COLS_PER_TASK: usize = 64;
pub const LANES: usize = 16;

/// `y = x · w^T` for a few rows of `x` (decode batches, small expert groups). Memory-bound:
/// each weight row is read from memory once and, while it sits in L1, dotted with every
/// row of `x`. gemm would first copy (pack) the whole weight matrix, which costs more than
/// the product itself at this shape.
pub fn skinny_matmul_wt<S: RowSource + ?Sized>(
    x: &[f32],
    m: usize,
    k: usize,
    w: &S,
    n: usize,
    y: &mut [f32],
    parallel: bool,
) {
    assert!(x.len() >= m * k && w.elems() >= n * k && y.len() >= m * n);
    skinny_blocks(m, n, y, parallel, |j, r, t, g| {
        dot_block(w, j, r, &x[t * k..(t + g) * k], g, k)
    });
}

/// The schedule every skinny product shares: `y[m, n]` in tasks of
/// [`SKINNY_COLS_PER_TASK`] columns, each computed by `dot(row0, r, t0, g)`: the dots of
/// weight rows `row0..row0 + r` with activation rows `t0..t0 + g` (at most a [`Block`]).
pub(super) fn skinny_blocks(
    m: usize,
    n: usize,
    y: &mut [f32],
    parallel: bool,
    dot: impl Fn(usize, usize, usize, usize) -> Block + Sync,
) {
    let task = |cols: std::ops::Range<usize>| -> Vec<f32> {
        // Output for these columns, column-major: [cols.len(), m].
        let mut out = vec![0.0f32; cols.len() * m];
        let mut j = cols.start;
        while j < cols.end {
            let r = (cols.end - j).min(BLOCK_ROWS);
            let mut t = 0;
            while t < m {
                let g = (m - t).min(BLOCK_TOKENS);
                let dots = dot(j, r, t, g);
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
pub(super) const BLOCK_ROWS: usize = 4;
pub(super) const BLOCK_TOKENS: usize = 4;
pub(super) type Block = [[f32; BLOCK_TOKENS]; BLOCK_ROWS];

/// Dot products of the `r` weight rows from `row0` with `g` consecutive rows of `xs`
/// (`g * k`); `r`, `g` at most the block size.
fn dot_block<S: RowSource + ?Sized>(
    ws: &S,
    row0: usize,
    r: usize,
    xs: &[f32],
    g: usize,
    k: usize,
) -> Block {
    assert!(r <= BLOCK_ROWS && g <= BLOCK_TOKENS && ws.elems() >= (row0 + r) * k);
    assert!(xs.len() >= g * k);
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F, checked just above.
            return unsafe { dot_block_avx512(ws, row0, r, xs, g, k) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA, checked just above.
            return unsafe { dot_block_avx2(ws, row0, r, xs, g, k) };
        }
    }
    dot_block_dispatch::<false, S>(ws, row0, r, xs, g, k)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
fn dot_block_avx512<S: RowSource + ?Sized>(
    ws: &S,
    row0: usize,
    r: usize,
    xs: &[f32],
    g: usize,
    k: usize,
) -> Block {
    dot_block_dispatch::<true, S>(ws, row0, r, xs, g, k)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot_block_avx2<S: RowSource + ?Sized>(
    ws: &S,
    row0: usize,
    r: usize,
    xs: &[f32],
    g: usize,
    k: usize,
) -> Block {
    dot_block_dispatch::<true, S>(ws, row0, r, xs, g, k)
}

#[inline(always)]
fn dot_block_dispatch<const FMA: bool, S: RowSource + ?Sized>(
    ws: &S,
    row0: usize,
    r: usize,
    xs: &[f32],
    g: usize,
    k: usize,
) -> Block {
    match (r, g) {
        (4, 4) => dot_block_fixed::<4, 4, FMA, S>(ws, row0, xs, k),
        (4, 2) => dot_block_fixed::<4, 2, FMA, S>(ws, row0, xs, k),
        (4, 3) => dot_block_fixed::<4, 3, FMA, S>(ws, row0, xs, k),
        // A single token (matrix-vector products): four rows, so that four independent
        // chains of multiply-adds keep loads in flight (one chain waits 4 cycles per
        // multiply-add, below what memory delivers), each row's weights asked for ahead.
        (4, 1) => dot_rows_one_token::<4, FMA, S>(ws, row0, xs, k),
        _ => {
            // Block edges: one weight row at a time.
            let mut out = Block::default();
            for (ri, row) in out.iter_mut().enumerate().take(r) {
                let one = if g == 1 {
                    dot_rows_one_token::<1, FMA, S>(ws, row0 + ri, xs, k)
                } else {
                    dot_block_fixed::<1, BLOCK_TOKENS, FMA, S>(ws, row0 + ri, xs, k)
                };
                row[..g].copy_from_slice(&one[0][..g]);
            }
            out
        }
    }
}

/// `R` weight rows times one token row: [`dot_block_fixed`]'s arithmetic in the same
/// order (so a token's result does not depend on the tokens batched with it), in a loop
/// shape the compiler keeps in vector registers for this case, each row's weights asked
/// for [`PREFETCH_AHEAD`] bytes early (a matrix-vector product is bound by the bytes it
/// reads).
#[inline(always)]
fn dot_rows_one_token<const R: usize, const FMA: bool, S: RowSource + ?Sized>(
    ws: &S,
    row0: usize,
    x: &[f32],
    k: usize,
) -> Block {
    let mut acc = [[0.0f32; LANES]; R];
    let full = k - k % LANES;
    let mut i = 0;
    while i < full {
        let xv: [f32; LANES] = x[i..i + LANES].try_into().unwrap_or([0.0; LANES]);
        for (ri, acc) in acc.iter_mut().enumerate() {
            prefetch(ws.addr(row0 + ri, k, i).wrapping_add(PREFETCH_AHEAD));
            let w = ws.lanes(row0 + ri, k, i);
            for l in 0..LANES {
                acc[l] = if FMA {
                    w[l].mul_add(xv[l], acc[l])
                } else {
                    acc[l] + w[l] * xv[l]
                };
            }
        }
        i += LANES;
    }
    let mut out = Block::default();
    for (ri, acc) in acc.iter().enumerate() {
        let mut s: f32 = acc.iter().sum();
        for (j, xj) in x.iter().enumerate().take(k).skip(full) {
            s += ws.at(row0 + ri, k, j) * xj;
        }
        out[ri][0] = s;
    }
    out
}

/// `R` weight rows times `G` token rows, in fixed-width lane arrays that the compiler
/// keeps in vector registers; `FMA` only where the target fuses multiply-add in hardware.
/// Reads `R` rows of `k` from `ws` starting at `row0` and `G` rows of `k` from `xs` (a
/// `G < BLOCK_TOKENS` block may be given a shorter `xs`).
#[inline(always)]
fn dot_block_fixed<const R: usize, const G: usize, const FMA: bool, S: RowSource + ?Sized>(
    ws: &S,
    row0: usize,
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
            *v = ws.lanes(row0 + ri, k, i);
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
                s += ws.at(row0 + ri, k, j) * xs[t * k + j];
            }
            out[ri][t] = s;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::tests::{naive, pseudo_random};
    use super::*;
    use half::bf16;

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
                skinny_matmul_wt(&x, m, k, w.as_slice(), n, &mut y, parallel);
                for (a, b) in y.iter().zip(naive(&x, m, k, &w, n)) {
                    assert!((*a as f64 - b).abs() < 1e-4, "{a} vs {b} at {m}x{k}x{n}");
                }
            }
        }
    }

    /// bf16 weights widened in registers give the same bits as the f32 path on the same
    /// (bf16-exact) values: the arithmetic is identical, only the bytes read differ.
    #[test]
    fn bf16_weights_give_the_f32_paths_bits() {
        for &(m, k, n) in &[
            (1, 1, 1),
            (1, 4096, 67),
            (3, 17, 200),
            (4, 100, 131),
            (9, 64, 129),
        ] {
            let x = pseudo_random(m * k, 21);
            let w16: Vec<bf16> = pseudo_random(n * k, 22)
                .into_iter()
                .map(bf16::from_f32)
                .collect();
            let w32: Vec<f32> = w16.iter().map(|v| v.to_f32()).collect();
            assert_same_bits(&x, m, k, w16.as_slice(), &w32, n);
        }
    }

    /// The skinny product over `w` and over `w32` (its values as f32) agree bit for bit,
    /// serial and parallel.
    fn assert_same_bits<S: RowSource + ?Sized>(
        x: &[f32],
        m: usize,
        k: usize,
        w: &S,
        w32: &[f32],
        n: usize,
    ) {
        for parallel in [false, true] {
            let mut a = vec![f32::NAN; m * n];
            let mut b = vec![f32::NAN; m * n];
            skinny_matmul_wt(x, m, k, w, n, &mut a, parallel);
            skinny_matmul_wt(x, m, k, w32, n, &mut b, parallel);
            assert!(
                a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()),
                "{m}x{k}x{n} parallel {parallel}"
            );
        }
    }

    /// 8-bit codes widened and scaled in registers give the bits of the f32 path over
    /// their dequantized values: the scale is applied to each weight exactly as
    /// dequantizing does, so the error is the weights' own and nothing more.
    #[test]
    fn eight_bit_weights_give_the_f32_paths_bits_on_their_values() {
        for &(m, k, n) in &[
            (1, 1, 1),
            (1, 4096, 67),
            (3, 70, 200),
            (4, 96, 131),
            (9, 64, 129),
        ] {
            let x = pseudo_random(m * k, 41);
            let w = pseudo_random(n * k, 42);
            let int8 = QuantizedRows::quantize(&w, k);
            assert_same_bits(&x, m, k, &int8, &int8.dequantize(), n);
            if k.is_multiple_of(GROUP) {
                let codes: Vec<u8> = (0..n * k)
                    .map(|i| (i * 97 % 256) as u8)
                    .map(|c| if c & 0x7f == 0x7f { 0x40 } else { c })
                    .collect();
                let block = [2, GROUP];
                let scales: Vec<f32> = (0..n.div_ceil(2) * k / GROUP)
                    .map(|i| 3e-3 * (1.0 + (i % 5) as f32))
                    .collect();
                let fp8 = QuantizedRows::from_blocks(&codes, &scales, k, block).unwrap();
                assert_same_bits(&x, m, k, &fp8, &fp8.dequantize(), n);
            }
        }
    }
}
