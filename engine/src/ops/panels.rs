//! bf16 weights packed once at load into panels of [`PANEL`] rows, column-major within
//! a panel: for each input column, the panel's 32 weights sit in one 64-byte line. A
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

/// Rows per panel.
pub const PANEL: usize = 32;

/// Tokens per register block: 2 accumulators each, 24 of the 32 vector registers.
const TOKENS: usize = 12;

/// Within a panel's column, where row `r` sits: the 16-bit halves of dword `i` hold rows
/// `i` (low) and `i + 16` (high), so that a shift and a mask widen a line to two vectors
/// of 16 consecutive rows.
const fn slot_of(r: usize) -> usize {
    if r < 16 { 2 * r } else { 2 * (r - 16) + 1 }
}

/// A bf16 matrix `[rows, cols]` as panels: panel `p`, column `c`, slot `s` at
/// `(p * cols + c) * PANEL + s`. The last panel is padded with zero rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Bf16Panels {
    data: Vec<bf16>,
    rows: usize,
    cols: usize,
}

impl Bf16Panels {
    /// Packs a row-major `[rows, cols]` matrix.
    pub fn pack(values: &[bf16], rows: usize, cols: usize) -> Self {
        assert_eq!(values.len(), rows * cols, "panel matrix length");
        let panels = rows.div_ceil(PANEL);
        let mut data = vec![bf16::ZERO; panels * cols * PANEL];
        for (r, row) in values.chunks_exact(cols.max(1)).enumerate().take(rows) {
            let (p, s) = (r / PANEL, slot_of(r % PANEL));
            for (c, v) in row.iter().enumerate() {
                data[(p * cols + c) * PANEL + s] = *v;
            }
        }
        Bf16Panels { data, rows, cols }
    }

    /// The matrix row-major again.
    pub fn unpack(&self) -> Vec<bf16> {
        let mut out = vec![bf16::ZERO; self.rows * self.cols];
        for (r, row) in out.chunks_exact_mut(self.cols.max(1)).enumerate() {
            let (p, s) = (r / PANEL, slot_of(r % PANEL));
            for (c, v) in row.iter_mut().enumerate() {
                *v = self.data[(p * self.cols + c) * PANEL + s];
            }
        }
        out
    }

    /// The rows of `other` (as wide) below these.
    pub fn append_rows(&mut self, other: &Bf16Panels) {
        assert_eq!(self.cols, other.cols, "appending panels of another width");
        if self.rows.is_multiple_of(PANEL) {
            // No padding to fill: other's panels follow ours as they are.
            self.data.extend_from_slice(&other.data);
            self.rows += other.rows;
        } else {
            let mut rows = self.unpack();
            rows.extend(other.unpack());
            *self = Bf16Panels::pack(&rows, self.rows + other.rows, self.cols);
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
    fn panel(&self, p: usize) -> &[bf16] {
        &self.data[p * self.cols * PANEL..(p + 1) * self.cols * PANEL]
    }
}

/// `y[m, rows] = x[m, cols] · w^T`, row-major, in parallel over groups of panels.
pub fn panel_matmul_wt(x: &[f32], m: usize, w: &Bf16Panels, y: &mut [f32], parallel: bool) {
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
fn panel_block(panel: &[bf16], k: usize, xs: &[f32], g: usize, out: &mut [[f32; PANEL]; TOKENS]) {
    assert!(panel.len() >= k * PANEL && xs.len() >= g * k && g <= TOKENS);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F, checked just above; the assert bounds every read.
        unsafe { avx512::panel_block(panel, k, xs, g, out) };
        return;
    }
    panel_block_portable(panel, k, xs, g, out);
}

/// The reference order: each output one chain of fused multiply-adds over the columns.
fn panel_block_portable(
    panel: &[bf16],
    k: usize,
    xs: &[f32],
    g: usize,
    out: &mut [[f32; PANEL]; TOKENS],
) {
    for (t, o) in out.iter_mut().enumerate().take(g) {
        let x = &xs[t * k..(t + 1) * k];
        for (r, o) in o.iter_mut().enumerate() {
            let s = slot_of(r);
            let mut acc = 0.0f32;
            for (c, xv) in x.iter().enumerate() {
                acc = panel[c * PANEL + s].to_f32().mul_add(*xv, acc);
            }
            *o = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use half::bf16;

    use super::{PANEL, TOKENS};

    /// Lines (columns) ahead of the reads that are prefetched.
    const AHEAD: usize = super::super::skinny::PREFETCH_AHEAD / 64;

    /// [`super::panel_block_portable`] in zmm registers: per column, one 64-byte load
    /// widened by a shift and a mask, and `2 g` fused multiply-adds against broadcasts.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn panel_block(
        panel: &[bf16],
        k: usize,
        xs: &[f32],
        g: usize,
        out: &mut [[f32; PANEL]; TOKENS],
    ) {
        macro_rules! block {
            ($g:literal) => {{
                let mut lo = [_mm512_setzero_ps(); $g];
                let mut hi = [_mm512_setzero_ps(); $g];
                let high = _mm512_set1_epi32(0xffff_0000u32 as i32);
                let w = panel.as_ptr().cast::<__m512i>();
                let x = xs.as_ptr();
                for c in 0..k {
                    // Decode is bound by the bytes it reads: ask for them well ahead.
                    _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(c + AHEAD).cast());
                    // SAFETY: c < k and the caller checked panel.len() >= k * PANEL.
                    let line = unsafe { _mm512_loadu_si512(w.add(c)) };
                    let wl = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(line));
                    let wh = _mm512_castsi512_ps(_mm512_and_si512(line, high));
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

#[cfg(test)]
mod tests {
    use super::super::tests::{naive, pseudo_random};
    use super::*;

    fn bf16s(len: usize, seed: u32) -> Vec<bf16> {
        pseudo_random(len, seed)
            .into_iter()
            .map(bf16::from_f32)
            .collect()
    }

    #[test]
    fn packing_round_trips_at_odd_shapes() {
        for &(n, k) in &[(1, 1), (31, 5), (32, 3), (33, 7), (70, 16)] {
            let w = bf16s(n * k, 3);
            let p = Bf16Panels::pack(&w, n, k);
            assert_eq!(p.unpack(), w);
            assert_eq!(p.held(), n.div_ceil(PANEL) * PANEL * k);
            // Appending rows, after a full panel or a padded one.
            for extra in [1, 32] {
                let more = bf16s(extra * k, 4);
                let mut joined = p.clone();
                joined.append_rows(&Bf16Panels::pack(&more, extra, k));
                let mut rows = w.clone();
                rows.extend(&more);
                assert_eq!(joined, Bf16Panels::pack(&rows, n + extra, k));
            }
        }
    }

    #[test]
    fn panel_products_match_the_f64_reference_and_the_portable_bits() {
        for &(m, k, n) in &[
            (1, 1, 1),
            (1, 15, 33),
            (2, 17, 64),
            (5, 33, 131),
            (13, 64, 40),
            (40, 100, 7),
        ] {
            let x = pseudo_random(m * k, 11);
            let w = bf16s(n * k, 12);
            let w32: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
            let p = Bf16Panels::pack(&w, n, k);
            let reference = naive(&x, m, k, &w32, n);
            for parallel in [false, true] {
                let mut y = vec![f32::NAN; m * n];
                panel_matmul_wt(&x, m, &p, &mut y, parallel);
                for (a, b) in y.iter().zip(&reference) {
                    assert!((*a as f64 - b).abs() < 1e-4, "{a} vs {b} at {m}x{k}x{n}");
                }
                // Each token alone, through the portable kernel: the same bits.
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
}
