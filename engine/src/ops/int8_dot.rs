//! int8 weights times activations quantized to int8, for the skinny products (decode
//! batches, small expert groups). Widening each int8 weight to f32 costs three vector
//! instructions per 16 weights, which at one token binds the product on arithmetic at
//! half the memory's rate. Quantizing the few activation rows instead (per row and
//! [`GROUP`] columns, as llama.cpp's q8_0 does) lets VNNI's `vpdpbusd` multiply 64 byte
//! pairs and sum them into 16 32-bit lanes in one instruction.
//!
//! The price is the activations' own rounding (at most half a step of their group), on
//! top of the weights'. Long prefills (more rows than [`INT8_VNNI_MAX_ROWS`]) keep f32
//! activations.
//!
//! `vpdpbusd` multiplies unsigned by signed bytes. The weights are made unsigned by
//! flipping their top bit (`w + 128`), and each lane starts from `-128` times the sum of
//! its four activation codes. That start is computed once per activation row, not per
//! weight row, so the lane ends at exactly `Σ w·x`. A portable kernel computes the same
//! lanes in the same order, so the two agree bit for bit on any machine.
//!
//! [`INT8_VNNI_MAX_ROWS`]: super::INT8_VNNI_MAX_ROWS

use super::quantized::{GROUP, QuantizedRows};
use super::skinny::{BLOCK_ROWS, BLOCK_TOKENS, Block, PREFETCH_AHEAD, prefetch, skinny_blocks};

/// Codes per `vpdpbusd`: 16 lanes of 4.
const CHUNK: usize = 64;
const LANES: usize = 16;

/// Rows of activations quantized to int8 per [`GROUP`] columns (symmetric, absmax), laid
/// out for the kernels: each row padded with zero codes to a multiple of [`CHUNK`], and
/// per lane of 4 codes its offset start and its group's scale.
pub struct QuantizedActs {
    /// `[rows, padded]`.
    codes: Vec<i8>,
    /// `[rows, padded / 4]`: `-128` times the sum of the lane's four codes.
    offsets: Vec<i32>,
    /// `[rows, padded / 4]`: the scale of the lane's group.
    scales: Vec<f32>,
    padded: usize,
}

impl QuantizedActs {
    /// `x` is `[m, k]`. A group's largest magnitude maps to 127 and every value to the
    /// nearest code.
    pub fn quantize(x: &[f32], m: usize, k: usize) -> Self {
        assert!(x.len() >= m * k);
        let padded = k.div_ceil(CHUNK) * CHUNK;
        let lanes = padded / 4;
        let mut codes = vec![0i8; m * padded];
        let mut offsets = vec![0i32; m * lanes];
        let mut scales = vec![0.0f32; m * lanes];
        if k == 0 {
            return QuantizedActs {
                codes,
                offsets,
                scales,
                padded,
            };
        }
        for t in 0..m {
            let q = &mut codes[t * padded..(t + 1) * padded];
            let row_scales = &mut scales[t * lanes..(t + 1) * lanes];
            for (g, group) in x[t * k..(t + 1) * k].chunks(GROUP).enumerate() {
                let max = group.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                let scale = max / 127.0;
                let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                for (c, v) in group.iter().enumerate() {
                    q[g * GROUP + c] = (v * inv).round().clamp(-127.0, 127.0) as i8;
                }
                row_scales[g * GROUP / 4..(g + 1) * GROUP / 4].fill(scale);
            }
            for (o, four) in offsets[t * lanes..(t + 1) * lanes]
                .iter_mut()
                .zip(q.chunks_exact(4))
            {
                *o = -128 * four.iter().map(|c| i32::from(*c)).sum::<i32>();
            }
        }
        QuantizedActs {
            codes,
            offsets,
            scales,
            padded,
        }
    }

    /// Activation `(row, col)` as the kernels see it.
    pub fn at(&self, row: usize, col: usize) -> f32 {
        f32::from(self.codes[row * self.padded + col])
            * self.scales[row * self.padded / 4 + col / 4]
    }
}

/// `y = x · w^T` for at most a few rows of `x`, the activations quantized per row and
/// group (see the module's notes).
pub fn int8_skinny_matmul_wt(
    x: &[f32],
    m: usize,
    k: usize,
    w: &QuantizedRows<i8>,
    n: usize,
    y: &mut [f32],
    parallel: bool,
) {
    assert!(w.cols() == k && w.len() >= n * k && y.len() >= m * n);
    let acts = QuantizedActs::quantize(x, m, k);
    let vnni = has_vnni();
    skinny_blocks(m, n, y, parallel, |row0, r, t0, g| {
        if vnni {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU has AVX-512 F/BW and VNNI (`has_vnni`).
            return unsafe { dot_block_vnni(w, row0, r, &acts, t0, g) };
        }
        dot_block_portable(w, row0, r, &acts, t0, g)
    });
}

fn has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The lanes of one accumulator summed in a fixed tree, the same in every kernel.
#[inline(always)]
fn reduce_lanes(mut l: [f32; LANES]) -> f32 {
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            l[i] += l[i + width];
        }
        width /= 2;
    }
    l[0]
}

/// Weight row `row`'s scales for the two groups of chunk `c`, one per half of the lanes
/// (a last chunk with one group repeats it; its other lanes are zero).
#[inline(always)]
fn chunk_scales(w: &QuantizedRows<i8>, row: usize, c: usize) -> (f32, f32) {
    let groups = w.groups();
    let s = &w.scales()[row * groups..(row + 1) * groups];
    (s[2 * c], s[(2 * c + 1).min(groups - 1)])
}

/// The dots of weight rows `row0..row0 + r` with activation rows `t0..t0 + g`, lane by
/// lane as `vpdpbusd` computes them.
fn dot_block_portable(
    w: &QuantizedRows<i8>,
    row0: usize,
    r: usize,
    a: &QuantizedActs,
    t0: usize,
    g: usize,
) -> Block {
    let (k, lanes) = (w.cols(), a.padded / 4);
    let mut out = Block::default();
    for (ri, out) in out.iter_mut().enumerate().take(r) {
        let row = row0 + ri;
        let codes = &w.codes()[row * k..(row + 1) * k];
        for (t, out) in (t0..t0 + g).zip(out.iter_mut()) {
            let mut acc = [0.0f32; LANES];
            for c in 0..a.padded / CHUNK {
                let (s0, s1) = chunk_scales(w, row, c);
                for (l, acc) in acc.iter_mut().enumerate() {
                    let lane = c * LANES + l;
                    let mut d = a.offsets[t * lanes + lane];
                    for b in 0..4 {
                        let col = 4 * lane + b;
                        // Past the row's end the kernel loads zero codes, which the
                        // top-bit flip makes 128; their activation codes are zero.
                        let wc = codes.get(col).copied().unwrap_or(0);
                        let wu = i32::from((wc as u8) ^ 0x80);
                        d += wu * i32::from(a.codes[t * a.padded + col]);
                    }
                    let f = d as f32 * a.scales[t * lanes + lane];
                    *acc = f.mul_add(if l < LANES / 2 { s0 } else { s1 }, *acc);
                }
            }
            *out = reduce_lanes(acc);
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn dot_block_vnni(
    w: &QuantizedRows<i8>,
    row0: usize,
    r: usize,
    a: &QuantizedActs,
    t0: usize,
    g: usize,
) -> Block {
    assert!(r <= BLOCK_ROWS && g <= BLOCK_TOKENS);
    assert!(w.len() >= (row0 + r) * w.cols());
    assert!(a.codes.len() >= (t0 + g) * a.padded);
    // SAFETY (every call below): the rows and activations are in bounds (asserted
    // above); the CPU features are this function's own.
    if r < BLOCK_ROWS {
        // Block edges: one weight row at a time.
        let mut out = Block::default();
        for (ri, out) in out.iter_mut().enumerate().take(r) {
            let one = unsafe {
                match g {
                    1 => vnni_fixed::<1, 1>(w, row0 + ri, a, t0),
                    2 => vnni_fixed::<1, 2>(w, row0 + ri, a, t0),
                    3 => vnni_fixed::<1, 3>(w, row0 + ri, a, t0),
                    _ => vnni_fixed::<1, 4>(w, row0 + ri, a, t0),
                }
            };
            *out = one[0];
        }
        return out;
    }
    unsafe {
        match g {
            // A single token: four independent chains, the weights asked for ahead (as
            // in the f32 kernels).
            1 => vnni_fixed::<BLOCK_ROWS, 1>(w, row0, a, t0),
            2 => vnni_fixed::<BLOCK_ROWS, 2>(w, row0, a, t0),
            3 => vnni_fixed::<BLOCK_ROWS, 3>(w, row0, a, t0),
            _ => vnni_fixed::<BLOCK_ROWS, BLOCK_TOKENS>(w, row0, a, t0),
        }
    }
}

/// `R` weight rows from `row0` times `G` activation rows from `t0`, in vector registers.
///
/// # Safety
/// The CPU has AVX-512 F/BW and VNNI; rows `row0..row0 + R` exist in `w` and rows
/// `t0..t0 + G` in `a`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[allow(clippy::needless_range_loop)] // register arrays indexed by row and token
unsafe fn vnni_fixed<const R: usize, const G: usize>(
    w: &QuantizedRows<i8>,
    row0: usize,
    a: &QuantizedActs,
    t0: usize,
) -> Block {
    use std::arch::x86_64::*;
    let (k, lanes) = (w.cols(), a.padded / 4);
    let codes = w.codes().as_ptr();
    let flip = _mm512_set1_epi8(i8::MIN);
    let mut acc = [[_mm512_setzero_ps(); G]; R];
    for c in 0..a.padded / CHUNK {
        let col = c * CHUNK;
        // The row's last chunk may be short: masked bytes load as zero and never fault.
        let mask = if k - col >= CHUNK {
            u64::MAX
        } else {
            (1u64 << (k - col)) - 1
        };
        let mut wu = [_mm512_setzero_si512(); R];
        let mut sw = [_mm512_setzero_ps(); R];
        for ri in 0..R {
            let row = row0 + ri;
            if G == 1 {
                prefetch(codes.wrapping_add(row * k + col + PREFETCH_AHEAD).cast());
            }
            // SAFETY: bytes `row * k + col..` up to the row's end are in `w` (the caller's
            // bounds); the mask stops at that end.
            let raw = unsafe { _mm512_maskz_loadu_epi8(mask, codes.add(row * k + col)) };
            wu[ri] = _mm512_xor_si512(raw, flip);
            let (s0, s1) = chunk_scales(w, row, c);
            sw[ri] = _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(s0), _mm512_set1_ps(s1));
        }
        for t in 0..G {
            let (x_at, lane_at) = ((t0 + t) * a.padded + col, (t0 + t) * lanes + c * LANES);
            // SAFETY: every activation row holds `padded` codes and `padded / 4` lanes.
            let (xq, off, sx) = unsafe {
                (
                    _mm512_loadu_si512(a.codes.as_ptr().add(x_at).cast()),
                    _mm512_loadu_si512(a.offsets.as_ptr().add(lane_at).cast()),
                    _mm512_loadu_ps(a.scales.as_ptr().add(lane_at)),
                )
            };
            for ri in 0..R {
                let d = _mm512_dpbusd_epi32(off, wu[ri], xq);
                let f = _mm512_mul_ps(_mm512_cvtepi32_ps(d), sx);
                acc[ri][t] = _mm512_fmadd_ps(f, sw[ri], acc[ri][t]);
            }
        }
    }
    let mut out = Block::default();
    for ri in 0..R {
        for t in 0..G {
            let mut l = [0.0f32; LANES];
            // SAFETY: `l` holds 16 f32.
            unsafe { _mm512_storeu_ps(l.as_mut_ptr(), acc[ri][t]) };
            out[ri][t] = reduce_lanes(l);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::tests::pseudo_random;
    use super::*;

    /// Single rows with and without a remainder past the split accumulators (330: 6
    /// chunks), block edges, and a last token group of one (5 rows).
    fn shapes() -> [(usize, usize, usize); 10] {
        [
            (1, 1, 1),
            (1, 31, 5),
            (1, 1024, 67),
            (1, 330, 7),
            (5, 330, 9),
            (2, 33, 200),
            (3, 70, 131),
            (4, 96, 9),
            (9, 64, 129),
            (32, 100, 7),
        ]
    }

    #[test]
    fn activation_codes_are_within_half_a_step_of_their_group() {
        let (m, k) = (3, 70);
        let x = pseudo_random(m * k, 5);
        let a = QuantizedActs::quantize(&x, m, k);
        for t in 0..m {
            for c in 0..k {
                let g = c / GROUP;
                let group = &x[t * k + g * GROUP..t * k + ((g + 1) * GROUP).min(k)];
                let step = group.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0;
                let err = (a.at(t, c) - x[t * k + c]).abs();
                assert!(
                    err <= 0.5 * step * (1.0 + 1e-5),
                    "({t}, {c}): {err} > {step}/2"
                );
            }
        }
    }

    /// The product is the exact dot of the dequantized weights with the dequantized
    /// activations, up to f32 rounding: the integer lanes lose nothing.
    #[test]
    fn product_is_the_dot_of_both_dequantized_operands() {
        for (m, k, n) in shapes() {
            let x = pseudo_random(m * k, 31);
            let w = QuantizedRows::quantize(&pseudo_random(n * k, 32), k);
            let a = QuantizedActs::quantize(&x, m, k);
            let mut y = vec![f32::NAN; m * n];
            int8_skinny_matmul_wt(&x, m, k, &w, n, &mut y, false);
            for t in 0..m {
                for j in 0..n {
                    let (mut want, mut mag) = (0.0f64, 0.0f64);
                    for c in 0..k {
                        let p = f64::from(w.at(j, c)) * f64::from(a.at(t, c));
                        want += p;
                        mag += p.abs();
                    }
                    let got = f64::from(y[t * n + j]);
                    assert!(
                        (got - want).abs() <= 1e-6 * mag.max(1e-30),
                        "{m}x{k}x{n} ({t}, {j}): {got} vs {want}"
                    );
                }
            }
        }
    }

    /// VNNI, where this CPU has it, gives the portable kernel's bits, serial and parallel.
    #[test]
    fn vnni_gives_the_portable_kernels_bits() {
        if !has_vnni() {
            eprintln!("no AVX-512 VNNI on this CPU: only the portable kernel runs");
            return;
        }
        for (m, k, n) in shapes() {
            let x = pseudo_random(m * k, 41);
            let w = QuantizedRows::quantize(&pseudo_random(n * k, 42), k);
            let a = QuantizedActs::quantize(&x, m, k);
            let mut want = vec![f32::NAN; m * n];
            skinny_blocks(m, n, &mut want, false, |row0, r, t0, g| {
                dot_block_portable(&w, row0, r, &a, t0, g)
            });
            for parallel in [false, true] {
                let mut got = vec![f32::NAN; m * n];
                int8_skinny_matmul_wt(&x, m, k, &w, n, &mut got, parallel);
                assert!(
                    got.iter()
                        .zip(&want)
                        .all(|(p, q)| p.to_bits() == q.to_bits()),
                    "{m}x{k}x{n} parallel {parallel}"
                );
            }
        }
    }
}
