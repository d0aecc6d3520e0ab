//! Grouped-query causal attention over one sequence's cached keys and values.

use rayon::prelude::*;

use crate::ops::{matmul_strided, softmax_in_place};

#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// `q` is `[n, heads * head_dim]` for positions `start..start + n`; `k`, `v` are
/// `[start + n, kv_heads * head_dim]` (everything the sequence has seen, this chunk
/// included). Returns `[n, heads * head_dim]`. Query `i` sees keys `0..=start + i`.
pub fn causal_attention(
    shape: AttentionShape,
    q: &[f32],
    n: usize,
    start: usize,
    k: &[f32],
    v: &[f32],
) -> Vec<f32> {
    let AttentionShape {
        num_heads,
        num_kv_heads,
        head_dim: d,
    } = shape;
    let qd = num_heads * d;
    let kvd = num_kv_heads * d;
    let s = start + n;
    let group = num_heads / num_kv_heads;
    let scale = 1.0 / (d as f32).sqrt();

    let heads: Vec<Vec<f32>> = (0..num_heads)
        .into_par_iter()
        .map(|h| {
            let g = h / group;
            let mut scores = vec![0.0f32; n * s];
            // scores[n, s] = Q_h[n, d] · K_g[s, d]^T
            matmul_strided(
                n,
                s,
                d,
                &mut scores,
                s,
                &q[h * d..],
                qd,
                1,
                &k[g * d..],
                1,
                kvd,
            );
            for (i, row) in scores.chunks_exact_mut(s).enumerate() {
                let visible = start + i + 1;
                for x in &mut row[..visible] {
                    *x *= scale;
                }
                row[visible..].fill(f32::NEG_INFINITY);
                softmax_in_place(row);
            }
            let mut out = vec![0.0f32; n * d];
            // out[n, d] = P[n, s] · V_g[s, d]
            matmul_strided(n, d, s, &mut out, d, &scores, s, 1, &v[g * d..], kvd, 1);
            out
        })
        .collect();

    let mut out = vec![0.0f32; n * qd];
    for (h, head) in heads.iter().enumerate() {
        for (i, row) in head.chunks_exact(d).enumerate() {
            out[i * qd + h * d..i * qd + (h + 1) * d].copy_from_slice(row);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straightforward f64 attention, written independently of the strided products.
    fn reference(
        shape: AttentionShape,
        q: &[f32],
        n: usize,
        start: usize,
        k: &[f32],
        v: &[f32],
    ) -> Vec<f64> {
        let d = shape.head_dim;
        let qd = shape.num_heads * d;
        let kvd = shape.num_kv_heads * d;
        let group = shape.num_heads / shape.num_kv_heads;
        let mut out = vec![0.0; n * qd];
        for i in 0..n {
            for h in 0..shape.num_heads {
                let g = h / group;
                let visible = start + i + 1;
                let scores: Vec<f64> = (0..visible)
                    .map(|j| {
                        (0..d)
                            .map(|c| q[i * qd + h * d + c] as f64 * k[j * kvd + g * d + c] as f64)
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = exps.iter().sum();
                for c in 0..d {
                    out[i * qd + h * d + c] = (0..visible)
                        .map(|j| exps[j] / sum * v[j * kvd + g * d + c] as f64)
                        .sum();
                }
            }
        }
        out
    }

    #[test]
    fn matches_reference_for_prefill_and_decode_chunks() {
        let shape = AttentionShape {
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 8,
        };
        let mut seed = 7u64;
        let mut rnd = |len: usize| -> Vec<f32> {
            (0..len)
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
                })
                .collect()
        };
        for (start, n) in [(0, 5), (5, 1), (3, 4), (0, 1)] {
            let q = rnd(n * 32);
            let k = rnd((start + n) * 16);
            let v = rnd((start + n) * 16);
            let got = causal_attention(shape, &q, n, start, &k, &v);
            for (a, b) in got.iter().zip(reference(shape, &q, n, start, &k, &v)) {
                assert!((*a as f64 - b).abs() < 1e-5, "{a} vs {b}");
            }
        }
    }
}
