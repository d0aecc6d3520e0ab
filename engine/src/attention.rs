//! Causal attention over one sequence's cached keys and values: grouped-query attention,
//! and the absorbed form of multi-head latent attention (one shared key/value row per
//! position, values a prefix of the key row), which is the same computation with other
//! widths and strides.

use rayon::prelude::*;

use crate::ops::{matmul_strided, softmax_in_place};

#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    /// Width of a query and key head.
    pub head_dim: usize,
    /// Width of a value head.
    pub v_head_dim: usize,
    /// Multiplies the scores before the softmax.
    pub scale: f32,
}

impl AttentionShape {
    /// Plain GQA: values as wide as keys, scale `1 / sqrt(head_dim)`.
    pub fn gqa(num_heads: usize, num_kv_heads: usize, head_dim: usize) -> Self {
        AttentionShape {
            num_heads,
            num_kv_heads,
            head_dim,
            v_head_dim: head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
        }
    }
}

/// Rows of cached keys or values: position `p`, KV head `g` starts at
/// `data[p * stride + g * head width]`.
#[derive(Debug, Clone, Copy)]
pub struct KvRows<'a> {
    pub data: &'a [f32],
    pub stride: usize,
}

/// `q` is `[n, heads * head_dim]` for positions `start..start + n`; `k` and `v` hold
/// everything the sequence has seen (`start + n` rows, this chunk included). Returns
/// `[n, heads * v_head_dim]`. Query `i` sees keys `0..=start + i`.
pub fn causal_attention(
    shape: AttentionShape,
    q: &[f32],
    n: usize,
    start: usize,
    k: KvRows<'_>,
    v: KvRows<'_>,
) -> Vec<f32> {
    let AttentionShape {
        num_heads,
        num_kv_heads,
        head_dim: d,
        v_head_dim: dv,
        scale,
    } = shape;
    let qd = num_heads * d;
    let od = num_heads * dv;
    let s = start + n;
    let group = num_heads / num_kv_heads;

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
                &k.data[g * d..],
                1,
                k.stride,
            );
            for (i, row) in scores.chunks_exact_mut(s).enumerate() {
                let visible = start + i + 1;
                for x in &mut row[..visible] {
                    *x *= scale;
                }
                row[visible..].fill(f32::NEG_INFINITY);
                softmax_in_place(row);
            }
            let mut out = vec![0.0f32; n * dv];
            // out[n, dv] = P[n, s] · V_g[s, dv]
            matmul_strided(
                n,
                dv,
                s,
                &mut out,
                dv,
                &scores,
                s,
                1,
                &v.data[g * dv..],
                v.stride,
                1,
            );
            out
        })
        .collect();

    let mut out = vec![0.0f32; n * od];
    for (h, head) in heads.iter().enumerate() {
        for (i, row) in head.chunks_exact(dv).enumerate() {
            out[i * od + h * dv..i * od + (h + 1) * dv].copy_from_slice(row);
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
        let shape = AttentionShape::gqa(4, 2, 8);
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
            let rows = |data| KvRows { data, stride: 16 };
            let got = causal_attention(shape, &q, n, start, rows(&k), rows(&v));
            for (a, b) in got.iter().zip(reference(shape, &q, n, start, &k, &v)) {
                assert!((*a as f64 - b).abs() < 1e-5, "{a} vs {b}");
            }
        }
    }
}
