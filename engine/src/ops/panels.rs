//! Weights packed once at load into panels of [`PANEL`] rows, column-major within a
//! panel: for each input column, the panel's 32 weights sit in one line (64 bytes of
//! bf16, 128 of f32). A
//! product then runs as outer products (a panel's column times each token's value,
//! broadcast), which reuses every weight load for up to [`TOKENS`] tokens and every
//! activation load for 32 rows, with no horizontal sums and no per-call packing: the
//! layout gemm would build on each call, built once.
//!
//! Every output is one sequential chain of fused multiply-adds over the input columns,
//! in column order, whatever the number of tokens and wherever a token sits in the
//! batch: results are batch-invariant by construction, and the portable kernel computes
//! the same bits as the AVX-512 one.

use half::bf16;

use super::weights::WeightElem;

/// Rows per panel.
pub const PANEL: usize = 32;

/// Tokens per register block: 2 accumulators each, 24 of the 32 vector registers.
const TOKENS: usize = 12;

/// An element panels hold, and how a line of them becomes vectors of rows.
pub trait PanelElem: WeightElem + Default + PartialEq + std::fmt::Debug + 'static {
    /// Within a panel's line, where row `r` sits.
    fn slot_of(r: usize) -> usize;

    /// The line at `p` as rows 0-15 and 16-31.
    ///
    /// # Safety
    /// `p` must point at a whole line, on a CPU with AVX-512F.
    #[cfg(target_arch = "x86_64")]
    unsafe fn line_avx512(p: *const Self) -> [std::arch::x86_64::__m512; 2];

    /// The line at `p` as rows 0-7, 8-15, 16-23 and 24-31.
    ///
    /// # Safety
    /// `p` must point at a whole line, on a CPU with AVX2.
    #[cfg(target_arch = "x86_64")]
    unsafe fn line_avx2(p: *const Self) -> [std::arch::x86_64::__m256; 4];
}

/// The 16-bit halves of dword `i` hold rows `i` (low) and `i + 16` (high), so that a
/// shift and a mask widen a line to two vectors of 16 consecutive rows.
impl PanelElem for bf16 {
    fn slot_of(r: usize) -> usize {
        if r < 16 { 2 * r } else { 2 * (r - 16) + 1 }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn line_avx512(p: *const Self) -> [std::arch::x86_64::__m512; 2] {
        use std::arch::x86_64::*;
        // SAFETY: the caller's promise: a whole line at `p`, AVX-512F present.
        unsafe {
            let line = _mm512_loadu_si512(p.cast());
            let high = _mm512_set1_epi32(0xffff_0000u32 as i32);
            [
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(line)),
                _mm512_castsi512_ps(_mm512_and_si512(line, high)),
            ]
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn line_avx2(p: *const Self) -> [std::arch::x86_64::__m256; 4] {
        use std::arch::x86_64::*;
        // SAFETY: the caller's promise: a whole line at `p`, AVX2 present.
        unsafe {
            let (a, b) = (
                _mm256_loadu_si256(p.cast()),
                _mm256_loadu_si256(p.add(16).cast()),
            );
            let high = _mm256_set1_epi32(0xffff_0000u32 as i32);
            [
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(a)),
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(b)),
                _mm256_castsi256_ps(_mm256_and_si256(a, high)),
                _mm256_castsi256_ps(_mm256_and_si256(b, high)),
            ]
        }
    }
}

impl PanelElem for f32 {
    fn slot_of(r: usize) -> usize {
        r
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn line_avx512(p: *const Self) -> [std::arch::x86_64::__m512; 2] {
        use std::arch::x86_64::*;
        // SAFETY: the caller's promise: a whole line at `p`, AVX-512F present.
        unsafe { [_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16))] }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn line_avx2(p: *const Self) -> [std::arch::x86_64::__m256; 4] {
        use std::arch::x86_64::*;
        // SAFETY: the caller's promise: a whole line at `p`, AVX2 present.
        unsafe {
            [
                _mm256_loadu_ps(p),
                _mm256_loadu_ps(p.add(8)),
                _mm256_loadu_ps(p.add(16)),
                _mm256_loadu_ps(p.add(24)),
            ]
        }
    }
}

/// A matrix `[rows, cols]` as panels: panel `p`, column `c`, slot `s` at
/// `(p * cols + c) * PANEL + s`. The last panel is padded with zero rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Panels<E> {
    data: Vec<E>,
    rows: usize,
    cols: usize,
}

impl<E: PanelElem> Panels<E> {
    /// Packs a row-major `[rows, cols]` matrix.
    pub fn pack(values: &[E], rows: usize, cols: usize) -> Self {
        assert_eq!(values.len(), rows * cols, "panel matrix length");
        let panels = rows.div_ceil(PANEL);
        let mut data = vec![E::default(); panels * cols * PANEL];
        for (r, row) in values.chunks_exact(cols.max(1)).enumerate().take(rows) {
            let (p, s) = (r / PANEL, E::slot_of(r % PANEL));
            for (c, v) in row.iter().enumerate() {
                data[(p * cols + c) * PANEL + s] = *v;
            }
        }
        Panels { data, rows, cols }
    }

    /// The matrix row-major again.
    pub fn unpack(&self) -> Vec<E> {
        let mut out = vec![E::default(); self.rows * self.cols];
        for (r, row) in out.chunks_exact_mut(self.cols.max(1)).enumerate() {
            let (p, s) = (r / PANEL, E::slot_of(r % PANEL));
            for (c, v) in row.iter_mut().enumerate() {
                *v = self.data[(p * self.cols + c) * PANEL + s];
            }
        }
        out
    }

    /// The rows of `other` (as wide) below these.
    pub fn append_rows(&mut self, other: &Panels<E>) {
        assert_eq!(self.cols, other.cols, "appending panels of another width");
        if self.rows.is_multiple_of(PANEL) {
            // No padding to fill: other's panels follow ours as they are.
            self.data.extend_from_slice(&other.data);
            self.rows += other.rows;
        } else {
            let mut rows = self.unpack();
            rows.extend(other.unpack());
            *self = Panels::pack(&rows, self.rows + other.rows, self.cols);
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Values held, padding included.
    pub fn held(&self) -> usize {
        self.data.len()
    }

    fn panels(&self) -> usize {
        self.rows.div_ceil(PANEL)
    }

    /// Panel `p`: `cols` lines of [`PANEL`] values.
    fn panel(&self, p: usize) -> &[E] {
        &self.data[p * self.cols * PANEL..(p + 1) * self.cols * PANEL]
    }
}

/// `y[m, rows] = x[m, cols] · w^T`, row-major, in parallel over groups of panels.
pub fn panel_matmul_wt<E: PanelElem>(
    x: &[f32],
    m: usize,
    w: &Panels<E>,
    y: &mut [f32],
    parallel: bool,
) {
    let (k, n) = (w.cols, w.rows);
    assert!(x.len() >= m * k && y.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    // Panels per task: enough work to hide a task's start, few enough to share out.
    let per_task = if m <= TOKENS { 8 } else { 2 };
    let tasks = w.panels().div_ceil(per_task);
    let run = |task: usize| -> (usize, Vec<f32>) {
        let p0 = task * per_task;
        let p1 = (p0 + per_task).min(w.panels());
        // Output for these panels: [m, (p1 - p0) * PANEL].
        let width = (p1 - p0) * PANEL;
        let mut out = vec![0.0f32; m * width];
        let mut t = 0;
        while t < m {
            let g = (m - t).min(TOKENS);
            for p in p0..p1 {
                let mut block = [[0.0f32; PANEL]; TOKENS];
                panel_block(w.panel(p), k, &x[t * k..(t + g) * k], g, &mut block);
                for (ti, b) in block.iter().enumerate().take(g) {
                    let o = (t + ti) * width + (p - p0) * PANEL;
                    out[o..o + PANEL].copy_from_slice(b);
                }
            }
            t += g;
        }
        (p0 * PANEL, out)
    };
    let scatter = |y: &mut [f32], (start, out): (usize, Vec<f32>)| {
        let width = out.len() / m;
        let keep = width.min(n - start);
        for (t, row) in out.chunks_exact(width).enumerate() {
            y[t * n + start..t * n + start + keep].copy_from_slice(&row[..keep]);
        }
    };
    if parallel && tasks > 1 {
        use rayon::prelude::*;
        let outs: Vec<(usize, Vec<f32>)> = (0..tasks).into_par_iter().map(run).collect();
        for o in outs {
            scatter(y, o);
        }
    } else {
        for task in 0..tasks {
            scatter(y, run(task));
        }
    }
}

/// One panel times `g` (at most [`TOKENS`]) token rows of `xs` (`g * k` values):
/// `out[t][r]` is row `r`'s dot with token `t`, rows in natural order.
fn panel_block<E: PanelElem>(
    panel: &[E],
    k: usize,
    xs: &[f32],
    g: usize,
    out: &mut [[f32; PANEL]; TOKENS],
) {
    assert!(panel.len() >= k * PANEL && xs.len() >= g * k && g <= TOKENS);
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F, checked just above; the assert bounds reads.
            unsafe { avx512::panel_block(panel, k, xs, g, out) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA, checked just above; the assert bounds reads.
            unsafe { avx2::panel_block(panel, k, xs, g, out) };
            return;
        }
    }
    panel_block_portable(panel, k, xs, g, out);
}

/// The reference order: each output one chain of fused multiply-adds over the columns.
fn panel_block_portable<E: PanelElem>(
    panel: &[E],
    k: usize,
    xs: &[f32],
    g: usize,
    out: &mut [[f32; PANEL]; TOKENS],
) {
    for (t, o) in out.iter_mut().enumerate().take(g) {
        let x = &xs[t * k..(t + 1) * k];
        for (r, o) in o.iter_mut().enumerate() {
            let s = E::slot_of(r);
            let mut acc = 0.0f32;
            for (c, xv) in x.iter().enumerate() {
                acc = panel[c * PANEL + s].widen().mul_add(*xv, acc);
            }
            *o = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::super::skinny::PREFETCH_AHEAD;
    use super::{PANEL, PanelElem, TOKENS};

    /// [`super::panel_block_portable`] in zmm registers: per column, one line loaded (and
    /// widened, for bf16: a shift and a mask), and `2 g` fused multiply-adds against
    /// broadcasts.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn panel_block<E: PanelElem>(
        panel: &[E],
        k: usize,
        xs: &[f32],
        g: usize,
        out: &mut [[f32; PANEL]; TOKENS],
    ) {
        macro_rules! block {
            ($g:literal) => {{
                let mut lo = [_mm512_setzero_ps(); $g];
                let mut hi = [_mm512_setzero_ps(); $g];
                let w = panel.as_ptr();
                let x = xs.as_ptr();
                for c in 0..k {
                    // Decode is bound by the bytes it reads: ask for them well ahead.
                    let line = w.wrapping_add(c * PANEL).cast::<i8>();
                    for b in (0..PANEL * size_of::<E>()).step_by(64) {
                        _mm_prefetch::<_MM_HINT_T0>(line.wrapping_add(PREFETCH_AHEAD + b));
                    }
                    // SAFETY: c < k and the caller checked panel.len() >= k * PANEL.
                    let [wl, wh] = unsafe { E::line_avx512(w.add(c * PANEL)) };
                    for t in 0..$g {
                        // SAFETY: t < g and c < k: within the g * k values checked.
                        let xv = _mm512_set1_ps(unsafe { *x.add(t * k + c) });
                        lo[t] = _mm512_fmadd_ps(wl, xv, lo[t]);
                        hi[t] = _mm512_fmadd_ps(wh, xv, hi[t]);
                    }
                }
                for t in 0..$g {
                    // SAFETY: out[t] holds PANEL = 32 f32, two vectors.
                    unsafe {
                        _mm512_storeu_ps(out[t].as_mut_ptr(), lo[t]);
                        _mm512_storeu_ps(out[t].as_mut_ptr().add(16), hi[t]);
                    }
                }
            }};
        }
        match g {
            12 => block!(12),
            11 => block!(11),
            10 => block!(10),
            9 => block!(9),
            8 => block!(8),
            7 => block!(7),
            6 => block!(6),
            5 => block!(5),
            4 => block!(4),
            3 => block!(3),
            2 => block!(2),
            1 => block!(1),
            _ => {}
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::super::skinny::PREFETCH_AHEAD;
    use super::{PANEL, PanelElem, TOKENS};

    /// [`super::panel_block_portable`] in ymm registers: a line is four vectors of 8
    /// rows, so four accumulators per token and at most three tokens at a time in 16
    /// registers.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn panel_block<E: PanelElem>(
        panel: &[E],
        k: usize,
        xs: &[f32],
        g: usize,
        out: &mut [[f32; PANEL]; TOKENS],
    ) {
        macro_rules! block {
            ($t0:expr, $g:literal) => {{
                let mut acc = [[_mm256_setzero_ps(); 4]; $g];
                let w = panel.as_ptr();
                let x = xs.as_ptr().wrapping_add($t0 * k);
                for c in 0..k {
                    let line = w.wrapping_add(c * PANEL).cast::<i8>();
                    for b in (0..PANEL * size_of::<E>()).step_by(64) {
                        _mm_prefetch::<_MM_HINT_T0>(line.wrapping_add(PREFETCH_AHEAD + b));
                    }
                    // SAFETY: c < k and the caller checked panel.len() >= k * PANEL.
                    let ws = unsafe { E::line_avx2(w.add(c * PANEL)) };
                    for t in 0..$g {
                        // SAFETY: t0 + t < g and c < k: within the g * k values checked.
                        let xv = _mm256_set1_ps(unsafe { *x.add(t * k + c) });
                        for (acc, w) in acc[t].iter_mut().zip(&ws) {
                            *acc = _mm256_fmadd_ps(*w, xv, *acc);
                        }
                    }
                }
                for t in 0..$g {
                    for (q, acc) in acc[t].iter().enumerate() {
                        // SAFETY: out[t0 + t] holds PANEL = 32 f32, four vectors of 8.
                        unsafe { _mm256_storeu_ps(out[$t0 + t].as_mut_ptr().add(8 * q), *acc) };
                    }
                }
            }};
        }
        let mut t0 = 0;
        while t0 < g {
            match (g - t0).min(3) {
                3 => block!(t0, 3),
                2 => block!(t0, 2),
                _ => block!(t0, 1),
            }
            t0 += 3;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{naive, pseudo_random};
    use super::*;

    /// Test matrices of each element type (bf16: rounded).
    trait Sample: PanelElem {
        fn sample(len: usize, seed: u32) -> Vec<Self>;
    }

    impl Sample for bf16 {
        fn sample(len: usize, seed: u32) -> Vec<Self> {
            pseudo_random(len, seed)
                .into_iter()
                .map(bf16::from_f32)
                .collect()
        }
    }

    impl Sample for f32 {
        fn sample(len: usize, seed: u32) -> Vec<Self> {
            pseudo_random(len, seed)
        }
    }

    /// Every kernel this CPU has gives the portable kernel's bits, at every token count
    /// of a block and at column counts around the prefetch distance.
    fn kernels_give_the_portable_bits<E: Sample>() {
        for k in [1, 7, 64, 130] {
            let p = Panels::pack(&E::sample(40 * k, 5), 40, k);
            let xs = pseudo_random(TOKENS * k, 6);
            for g in 1..=TOKENS {
                let mut want = [[0.0f32; PANEL]; TOKENS];
                panel_block_portable(p.panel(1), k, &xs, g, &mut want);
                #[cfg(target_arch = "x86_64")]
                {
                    let bits = |o: &[[f32; PANEL]; TOKENS]| -> Vec<u32> {
                        o[..g].iter().flatten().map(|v| v.to_bits()).collect()
                    };
                    if std::arch::is_x86_feature_detected!("avx512f") {
                        let mut got = [[0.0f32; PANEL]; TOKENS];
                        // SAFETY: the CPU has AVX-512F; the shapes are as the kernel needs.
                        unsafe { avx512::panel_block(p.panel(1), k, &xs, g, &mut got) };
                        assert_eq!(bits(&got), bits(&want), "avx512 k {k} g {g}");
                    }
                    if std::arch::is_x86_feature_detected!("avx2")
                        && std::arch::is_x86_feature_detected!("fma")
                    {
                        let mut got = [[0.0f32; PANEL]; TOKENS];
                        // SAFETY: the CPU has AVX2 and FMA; the shapes are as needed.
                        unsafe { avx2::panel_block(p.panel(1), k, &xs, g, &mut got) };
                        assert_eq!(bits(&got), bits(&want), "avx2 k {k} g {g}");
                    }
                }
            }
        }
    }

    #[test]
    fn every_kernel_gives_the_portable_bits() {
        kernels_give_the_portable_bits::<bf16>();
        kernels_give_the_portable_bits::<f32>();
    }

    fn round_trips<E: Sample>() {
        for &(n, k) in &[(1, 1), (31, 5), (32, 3), (33, 7), (70, 16)] {
            let w = E::sample(n * k, 3);
            let p = Panels::pack(&w, n, k);
            assert_eq!(p.unpack(), w);
            assert_eq!(p.held(), n.div_ceil(PANEL) * PANEL * k);
            // Appending rows, after a full panel or a padded one.
            for extra in [1, 32] {
                let more = E::sample(extra * k, 4);
                let mut joined = p.clone();
                joined.append_rows(&Panels::pack(&more, extra, k));
                let mut rows = w.clone();
                rows.extend(&more);
                assert_eq!(joined, Panels::pack(&rows, n + extra, k));
            }
        }
    }

    #[test]
    fn packing_round_trips_at_odd_shapes() {
        round_trips::<bf16>();
        round_trips::<f32>();
    }

    /// Products against the f64 reference, and batch invariance: each token's outputs
    /// are the portable kernel's bits for that token alone, whatever the batch.
    fn products_match<E: Sample>() {
        for &(m, k, n) in &[
            (1, 1, 1),
            (1, 15, 33),
            (2, 17, 64),
            (5, 33, 131),
            (13, 64, 40),
            (40, 100, 7),
        ] {
            let x = pseudo_random(m * k, 11);
            let w = E::sample(n * k, 12);
            let w32: Vec<f32> = w.iter().map(|v| v.widen()).collect();
            let p = Panels::pack(&w, n, k);
            let reference = naive(&x, m, k, &w32, n);
            for parallel in [false, true] {
                let mut y = vec![f32::NAN; m * n];
                panel_matmul_wt(&x, m, &p, &mut y, parallel);
                for (a, b) in y.iter().zip(&reference) {
                    assert!((*a as f64 - b).abs() < 1e-4, "{a} vs {b} at {m}x{k}x{n}");
                }
                for t in 0..m {
                    for p0 in 0..n.div_ceil(PANEL) {
                        let mut one = [[0.0f32; PANEL]; TOKENS];
                        panel_block_portable(p.panel(p0), k, &x[t * k..(t + 1) * k], 1, &mut one);
                        for r in 0..PANEL.min(n - p0 * PANEL) {
                            let got = y[t * n + p0 * PANEL + r];
                            assert_eq!(got.to_bits(), one[0][r].to_bits(), "{m}x{k}x{n} t {t}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn panel_products_match_the_f64_reference_and_are_batch_invariant() {
        products_match::<bf16>();
        products_match::<f32>();
    }
}
