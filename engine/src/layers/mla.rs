//! Multi-head latent attention (DeepSeek-V2/V3, Kimi K2).
//!
//! Keys and values of every head are expansions of one small per-token latent `c`
//! (`kv_lora_rank` values, RMS-normalised) plus one RoPE key `k_pe` shared by all heads.
//! The cache holds only `[c | k_pe]` (576 values per token and layer for DeepSeek-V3,
//! against 32,768 for the expanded K and V). With `W_uk_h`, `W_uv_h` head `h`'s rows of
//! `kv_b_proj`:
//!
//! ```text
//! score_h(t, s) = q_nope_h(t) · W_uk_h c_s + q_pe_h(t) · k_pe_s
//!               = [W_uk_h^T q_nope_h(t) | q_pe_h(t)] · [c_s | k_pe_s]
//! out_h(t)      = sum_s p_s W_uv_h c_s = W_uv_h (sum_s p_s c_s)
//! ```
//!
//! so the absorbed form ([`MlaMode::Absorbed`]) is multi-query attention over the cached
//! rows themselves, with `W_uk` folded into the query and `W_uv` applied once per output:
//! nothing is expanded per cached token. [`MlaMode::Expanded`] expands every cached latent
//! (the textbook form): far more work per decode token, but less for a long prefill chunk,
//! whose many queries share each expansion. [`MlaMode::Auto`] picks per chunk, as vLLM and
//! SGLang do (expanded prefill, absorbed decode).

use super::{AttentionInput, Projection};
use crate::attention::{AttentionShape, KvRows, causal_attention};
use crate::checkpoint::{Checkpoint, WeightError};
use crate::config::{AttentionKind, MlaDims, ModelConfig};
use crate::kv_cache::PagedKvCache;
use crate::ops::{Linear, Weights, matmul_strided, rms_norm};

/// transformers' `DeepseekV3RMSNorm` default: the latent norms do not use the config's eps.
const LATENT_NORM_EPS: f32 = 1e-6;

/// How MLA attends. Both forms compute the same attention; they differ in cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MlaMode {
    /// Per chunk, whichever form costs fewer multiply-adds: absorbed for decode and short
    /// chunks, expanded for long prefill chunks (see [`Mla::expanded_is_cheaper`]).
    #[default]
    Auto,
    Absorbed,
    Expanded,
}

enum Query {
    /// `q_proj`.
    Direct(Linear),
    /// `q_b_proj(rms_norm(q_a_proj(x)))`.
    LowRank {
        a: Linear,
        norm: Vec<f32>,
        b: Linear,
    },
}

pub struct Mla {
    query: Query,
    /// `[kv_lora_rank + rope, hidden]`: the latent and the shared RoPE key.
    kv_a: Linear,
    kv_a_norm: Vec<f32>,
    /// `[heads * (nope + v), kv_lora_rank]`: per head, `nope` rows of `W_uk`, then `v`
    /// rows of `W_uv`.
    kv_b: Linear,
    o: Projection,
    dims: MlaDims,
    heads: usize,
    /// `qk_head_dim^-0.5`, times YaRN's mscale squared.
    scale: f32,
    mode: MlaMode,
}

impl Mla {
    /// Per (query, cached token, head), absorbed attention costs `2r + rope` multiply-adds
    /// (scores over `r + rope`, then `r` for the values); expanded costs `qk + v` plus, once
    /// per cached token and head, expanding it: `r (nope + v)`. So expanding pays off when a
    /// chunk has more than `r (nope + v) / (2r + rope - qk - v)` new tokens: 128 for the
    /// benchmark's shape, 171 for DeepSeek-V3's.
    pub fn expanded_is_cheaper(&self, new_tokens: usize) -> bool {
        let d = self.dims;
        let (r, nope, rope, dv) = (
            d.kv_lora_rank,
            d.qk_nope_head_dim,
            d.qk_rope_head_dim,
            d.v_head_dim,
        );
        let saved_per_pair = (2 * r + rope).saturating_sub(nope + rope + dv);
        saved_per_pair == 0 || new_tokens * saved_per_pair > r * (nope + dv)
    }

    pub fn load(ckpt: &Checkpoint, cfg: &ModelConfig, p: &str) -> Result<Self, WeightError> {
        let AttentionKind::Mla(dims) = cfg.attention else {
            return Err(WeightError::Missing {
                name: format!("{p}.kv_a_proj_with_mqa.weight"),
                location: "a config without multi-head latent attention".into(),
            });
        };
        let (h, heads) = (cfg.hidden_size, cfg.num_heads);
        let linear = |name: &str, out: usize, inp: usize| -> Result<Linear, WeightError> {
            ckpt.load_linear(&format!("{p}.{name}.weight"), out, inp)
        };
        let qk = dims.qk_head_dim();
        let query = match dims.q_lora_rank {
            None => Query::Direct(linear("q_proj", heads * qk, h)?),
            Some(r) => Query::LowRank {
                a: linear("q_a_proj", r, h)?,
                norm: ckpt.load(&format!("{p}.q_a_layernorm.weight"), &[r])?,
                b: linear("q_b_proj", heads * qk, r)?,
            },
        };
        let r = dims.kv_lora_rank;
        let scale = (qk as f64).powf(-0.5) * cfg.rope.softmax_mscale();
        Ok(Mla {
            query,
            kv_a: linear("kv_a_proj_with_mqa", dims.latent_dim(), h)?,
            kv_a_norm: ckpt.load(&format!("{p}.kv_a_layernorm.weight"), &[r])?,
            // Held as f32 whatever the checkpoint: the absorbed path reads its per-head
            // slices directly (`head_weights`).
            kv_b: {
                let out = heads * (dims.qk_nope_head_dim + dims.v_head_dim);
                Linear::new(
                    ckpt.load(&format!("{p}.kv_b_proj.weight"), &[out, r])?,
                    out,
                    r,
                )
            },
            o: Projection::load(
                ckpt,
                &format!("{p}.o_proj"),
                h,
                heads * dims.v_head_dim,
                false,
            )?,
            dims,
            heads,
            scale: scale as f32,
            mode: MlaMode::default(),
        })
    }

    pub fn set_mode(&mut self, mode: MlaMode) {
        self.mode = mode;
    }

    pub(super) fn forward(
        &self,
        input: &AttentionInput<'_, '_>,
        x: &[f32],
        kv: &mut PagedKvCache,
    ) -> Vec<f32> {
        let MlaDims {
            kv_lora_rank: r,
            qk_nope_head_dim: nope,
            qk_rope_head_dim: rope,
            ..
        } = self.dims;
        let (heads, qk, lat) = (self.heads, nope + rope, self.dims.latent_dim());
        let total: usize = input.spans.iter().map(|s| s.len).sum();

        let mut q = match &self.query {
            Query::Direct(w) => w.forward(x, total),
            Query::LowRank { a, norm, b } => {
                let qa = a.forward(x, total);
                let mut normed = vec![0.0; qa.len()];
                rms_norm(&qa, norm, LATENT_NORM_EPS, &mut normed);
                b.forward(&normed, total)
            }
        };
        // Each row becomes [rms_norm(c) | k_pe], the cached row.
        let mut latent = self.kv_a.forward(x, total);
        let mut c = vec![0.0; r];
        for row in latent.chunks_exact_mut(lat) {
            rms_norm(&row[..r], &self.kv_a_norm, LATENT_NORM_EPS, &mut c);
            row[..r].copy_from_slice(&c);
        }
        for (pos, t) in input.positions() {
            let q = &mut q[t * heads * qk..(t + 1) * heads * qk];
            input.rope.apply_strided(q, pos, qk, nope);
            let row = &mut latent[t * lat..(t + 1) * lat];
            input.rope.apply_strided(row, pos, lat, r);
        }
        input.write_kv(kv, &latent, lat, &[], 0);
        let kv = &*kv;
        let out = input.per_chunk(|cache, s| {
            let seen = s.start + s.len;
            let mut rows = vec![0.0f32; seen * lat];
            kv.gather(input.layer, cache, seen, &mut rows, &mut []);
            let q = &q[s.row * heads * qk..(s.row + s.len) * heads * qk];
            let expand = match self.mode {
                MlaMode::Auto => self.expanded_is_cheaper(s.len),
                MlaMode::Absorbed => false,
                MlaMode::Expanded => true,
            };
            if expand {
                self.expanded(q, s.len, s.start, &rows)
            } else {
                self.absorbed(q, s.len, s.start, &rows)
            }
        });
        self.o.forward(&out, total)
    }

    /// Head `h`'s `W_uk` (`[nope, r]`) and `W_uv` (`[v, r]`), as offsets into `kv_b`.
    fn head_weights(&self, h: usize) -> (&[f32], &[f32]) {
        let (r, nope, dv) = (
            self.dims.kv_lora_rank,
            self.dims.qk_nope_head_dim,
            self.dims.v_head_dim,
        );
        let base = h * (nope + dv) * r;
        let w = match &self.kv_b.weight {
            Weights::F32(w) => w.as_slice(),
            _ => unreachable!("kv_b is loaded as f32 (Mla::load)"),
        };
        (
            &w[base..base + nope * r],
            &w[base + nope * r..base + (nope + dv) * r],
        )
    }

    /// `q` `[n, heads * (nope + rope)]` against cached rows `[seen, r + rope]`; returns
    /// `[n, heads * v]`.
    fn absorbed(&self, q: &[f32], n: usize, start: usize, rows: &[f32]) -> Vec<f32> {
        let MlaDims {
            kv_lora_rank: r,
            qk_nope_head_dim: nope,
            qk_rope_head_dim: rope,
            v_head_dim: dv,
            ..
        } = self.dims;
        let (heads, qk, lat) = (self.heads, nope + rope, r + rope);
        // q_abs[t, h] = [W_uk_h^T q_nope_h(t) | q_pe_h(t)]
        let mut q_abs = vec![0.0f32; n * heads * lat];
        for h in 0..heads {
            let (w_uk, _) = self.head_weights(h);
            matmul_strided(
                n,
                r,
                nope,
                &mut q_abs[h * lat..],
                heads * lat,
                &q[h * qk..],
                heads * qk,
                1,
                w_uk,
                r,
                1,
            );
            for t in 0..n {
                let src = &q[t * heads * qk + h * qk + nope..][..rope];
                q_abs[t * heads * lat + h * lat + r..][..rope].copy_from_slice(src);
            }
        }
        let shape = AttentionShape {
            num_heads: heads,
            num_kv_heads: 1,
            head_dim: lat,
            v_head_dim: r,
            scale: self.scale,
        };
        // Values are the latent part of the same rows.
        let cached = KvRows {
            data: rows,
            stride: lat,
        };
        let ctx = causal_attention(shape, &q_abs, n, start, cached, cached);
        // out_h = W_uv_h ctx_h
        let mut out = vec![0.0f32; n * heads * dv];
        for h in 0..heads {
            let (_, w_uv) = self.head_weights(h);
            matmul_strided(
                n,
                dv,
                r,
                &mut out[h * dv..],
                heads * dv,
                &ctx[h * r..],
                heads * r,
                1,
                w_uv,
                1,
                r,
            );
        }
        out
    }

    /// The textbook form: every cached latent expanded to per-head K and V.
    fn expanded(&self, q: &[f32], n: usize, start: usize, rows: &[f32]) -> Vec<f32> {
        let MlaDims {
            kv_lora_rank: r,
            qk_nope_head_dim: nope,
            qk_rope_head_dim: rope,
            v_head_dim: dv,
            ..
        } = self.dims;
        let (heads, qk, lat) = (self.heads, nope + rope, r + rope);
        let seen = start + n;
        let mut latents = Vec::with_capacity(seen * r);
        for row in rows.chunks_exact(lat) {
            latents.extend_from_slice(&row[..r]);
        }
        let kv_nope = self.kv_b.forward(&latents, seen);
        let mut keys = vec![0.0f32; seen * heads * qk];
        let mut values = vec![0.0f32; seen * heads * dv];
        for s in 0..seen {
            let k_pe = &rows[s * lat + r..(s + 1) * lat];
            for h in 0..heads {
                let src = &kv_nope[(s * heads + h) * (nope + dv)..][..nope + dv];
                let key = &mut keys[(s * heads + h) * qk..][..qk];
                key[..nope].copy_from_slice(&src[..nope]);
                key[nope..].copy_from_slice(k_pe);
                values[(s * heads + h) * dv..][..dv].copy_from_slice(&src[nope..]);
            }
        }
        let shape = AttentionShape {
            num_heads: heads,
            num_kv_heads: heads,
            head_dim: qk,
            v_head_dim: dv,
            scale: self.scale,
        };
        causal_attention(
            shape,
            q,
            n,
            start,
            KvRows {
                data: &keys,
                stride: heads * qk,
            },
            KvRows {
                data: &values,
                stride: heads * dv,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_cache::SeqCache;
    use crate::layers::Span;
    use crate::model::SeqChunk;
    use crate::ops::Rope;

    const DIMS: MlaDims = MlaDims {
        q_lora_rank: Some(6),
        kv_lora_rank: 8,
        qk_nope_head_dim: 4,
        qk_rope_head_dim: 4,
        v_head_dim: 5,
    };
    const HEADS: usize = 3;
    const HIDDEN: usize = 12;
    const INV_FREQ: [f64; 2] = [1.0, 0.05];
    const ATTN_FACTOR: f64 = 1.1;

    fn rand(len: usize, seed: &mut u64) -> Vec<f32> {
        (0..len)
            .map(|_| {
                *seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((*seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
            })
            .collect()
    }

    fn mla(seed: &mut u64) -> Mla {
        let d = DIMS;
        let qk = d.qk_head_dim();
        let lin =
            |out: usize, inp: usize, seed: &mut u64| Linear::new(rand(out * inp, seed), out, inp);
        let norm = |n: usize, seed: &mut u64| rand(n, seed).iter().map(|v| 1.0 + v).collect();
        Mla {
            query: Query::LowRank {
                a: lin(6, HIDDEN, seed),
                norm: norm(6, seed),
                b: lin(HEADS * qk, 6, seed),
            },
            kv_a: lin(d.latent_dim(), HIDDEN, seed),
            kv_a_norm: norm(d.kv_lora_rank, seed),
            kv_b: lin(
                HEADS * (d.qk_nope_head_dim + d.v_head_dim),
                d.kv_lora_rank,
                seed,
            ),
            o: Projection {
                weight: lin(HIDDEN, HEADS * d.v_head_dim, seed),
                bias: None,
            },
            dims: d,
            heads: HEADS,
            scale: 0.37,
            mode: MlaMode::Absorbed,
        }
    }

    fn mat(w: &Linear, x: &[f64]) -> Vec<f64> {
        let values = w.weight.to_f32();
        (0..w.out_dim)
            .map(|o| {
                (0..w.in_dim)
                    .map(|i| values[o * w.in_dim + i] as f64 * x[i])
                    .sum()
            })
            .collect()
    }

    fn rms(x: &[f64], w: &[f32]) -> Vec<f64> {
        let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        let inv = 1.0 / (ms + LATENT_NORM_EPS as f64).sqrt();
        x.iter().zip(w).map(|(v, w)| v * inv * *w as f64).collect()
    }

    /// DeepSeek's interleaved rotation of one head's rotary part, at `pos`.
    fn rotate(x: &mut [f64], pos: usize) {
        for (i, pair) in x.chunks_exact_mut(2).enumerate() {
            let a = pos as f64 * INV_FREQ[i];
            let (c, s) = (a.cos() * ATTN_FACTOR, a.sin() * ATTN_FACTOR);
            let (x1, x2) = (pair[0], pair[1]);
            pair[0] = x1 * c - x2 * s;
            pair[1] = x2 * c + x1 * s;
        }
    }

    /// transformers' `DeepseekV3Attention` in f64 over a whole sequence: expanded keys and
    /// values per head, causal softmax, output projection.
    fn reference(m: &Mla, xs: &[Vec<f64>]) -> Vec<Vec<f64>> {
        let d = DIMS;
        let (r, nope, dv, qk) = (
            d.kv_lora_rank,
            d.qk_nope_head_dim,
            d.v_head_dim,
            d.qk_head_dim(),
        );
        let Query::LowRank { a, norm, b } = &m.query else {
            unreachable!()
        };
        let mut qs = Vec::new();
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        for (pos, x) in xs.iter().enumerate() {
            let mut q = mat(b, &rms(&mat(a, x), norm));
            for h in 0..HEADS {
                rotate(&mut q[h * qk + nope..h * qk + qk], pos);
            }
            let ckv = mat(&m.kv_a, x);
            let c = rms(&ckv[..r], &m.kv_a_norm);
            let mut k_pe = ckv[r..].to_vec();
            rotate(&mut k_pe, pos);
            let kv = mat(&m.kv_b, &c);
            let mut k = vec![0.0; HEADS * qk];
            let mut v = vec![0.0; HEADS * dv];
            for h in 0..HEADS {
                let src = &kv[h * (nope + dv)..(h + 1) * (nope + dv)];
                k[h * qk..h * qk + nope].copy_from_slice(&src[..nope]);
                k[h * qk + nope..(h + 1) * qk].copy_from_slice(&k_pe);
                v[h * dv..(h + 1) * dv].copy_from_slice(&src[nope..]);
            }
            qs.push(q);
            ks.push(k);
            vs.push(v);
        }
        (0..xs.len())
            .map(|t| {
                let mut out = vec![0.0; HEADS * dv];
                for h in 0..HEADS {
                    let scores: Vec<f64> = (0..=t)
                        .map(|s| {
                            (0..qk)
                                .map(|i| qs[t][h * qk + i] * ks[s][h * qk + i])
                                .sum::<f64>()
                                * m.scale as f64
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for i in 0..dv {
                        out[h * dv + i] = (0..=t).map(|s| e[s] / z * vs[s][h * dv + i]).sum();
                    }
                }
                mat(&m.o.weight, &out)
            })
            .collect()
    }

    #[test]
    fn long_chunks_expand_and_decode_absorbs() {
        let mut seed = 5u64;
        let m = mla(&mut seed);
        // r (nope + v) / (2r + rope - qk - v) = 8 * 9 / (16 + 4 - 8 - 5) = 72 / 7: 10.3.
        assert!(!m.expanded_is_cheaper(1));
        assert!(!m.expanded_is_cheaper(10));
        assert!(m.expanded_is_cheaper(11));
    }

    /// Two sequences fed as a prefill chunk, then a second chunk, then single decode
    /// tokens, batched together: every mode matches the f64 reference at every position.
    #[test]
    fn absorbed_and_expanded_match_the_expanded_reference() {
        let mut seed = 3u64;
        let mut m = mla(&mut seed);
        let rope = Rope::from_inv_freq(&INV_FREQ, ATTN_FACTOR, true, 64);
        let lens = [9usize, 5];
        let xs: Vec<Vec<f32>> = lens.iter().map(|n| rand(n * HIDDEN, &mut seed)).collect();
        let want: Vec<Vec<Vec<f64>>> = xs
            .iter()
            .map(|x| {
                let rows: Vec<Vec<f64>> = x
                    .chunks_exact(HIDDEN)
                    .map(|r| r.iter().map(|v| *v as f64).collect())
                    .collect();
                reference(&m, &rows)
            })
            .collect();
        // Chunks per step: (sequence, first position, tokens).
        let schedule: [&[(usize, usize, usize)]; 4] = [
            &[(0, 0, 4)],
            &[(0, 4, 3), (1, 0, 5)],
            &[(0, 7, 1)],
            &[(0, 8, 1)],
        ];
        for mode in [MlaMode::Absorbed, MlaMode::Expanded, MlaMode::Auto] {
            m.set_mode(mode);
            let mut kv = PagedKvCache::with_dims(1, (DIMS.latent_dim(), 0), 2, 32);
            let mut caches = [SeqCache::new(), SeqCache::new()];
            let mut worst = 0.0f64;
            for step in schedule {
                let mut x = Vec::new();
                let mut spans = Vec::new();
                for &(s, start, n) in step {
                    assert_eq!(caches[s].len(), start);
                    spans.push(Span {
                        row: x.len() / HIDDEN,
                        start,
                        len: n,
                    });
                    x.extend_from_slice(&xs[s][start * HIDDEN..(start + n) * HIDDEN]);
                    kv.reserve(&mut caches[s], n).unwrap();
                }
                let [c0, c1] = &mut caches;
                let mut refs: Vec<Option<&mut SeqCache>> = vec![Some(c0), Some(c1)];
                let batch: Vec<SeqChunk<'_>> = step
                    .iter()
                    .map(|&(s, _, _)| SeqChunk {
                        tokens: &[],
                        cache: refs[s].take().unwrap(),
                    })
                    .collect();
                let input = AttentionInput {
                    batch: &batch,
                    spans: &spans,
                    rope: &rope,
                    layer: 0,
                };
                let out = m.forward(&input, &x, &mut kv);
                drop(batch);
                for (&(s, start, n), span) in step.iter().zip(&spans) {
                    for i in 0..n {
                        let got = &out[(span.row + i) * HIDDEN..(span.row + i + 1) * HIDDEN];
                        let exp = &want[s][start + i];
                        let scale = exp.iter().fold(0.0f64, |a, v| a.max(v.abs()));
                        for (g, e) in got.iter().zip(exp) {
                            worst = worst.max((*g as f64 - e).abs() / scale);
                        }
                    }
                    kv.advance(&mut caches[s], n);
                }
            }
            assert!(worst < 1e-5, "{mode:?}: max relative error {worst:e}");
        }
    }
}
