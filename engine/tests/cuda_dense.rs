//! The dense-path kernels (`kernels/dense.cu`) against the CPU engine's own functions on
//! random inputs. Needs a CUDA GPU: `scripts/gpu-check` runs these with `--ignored`.
//! Lines starting with `| ` are the table scripts/gpu-check prints.

use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use switchyard_engine::attention::{AttentionShape, causal_attention};
use switchyard_engine::cuda::{CudaBackend, DenseKernels, PagedDecode};
use switchyard_engine::kv_cache::{PagedKvCache, SeqCache};
use switchyard_engine::ops::{Rope, rms_norm};
use switchyard_engine::router::route_softmax_topk;
use switchyard_engine::sampling::argmax;

fn kernels() -> DenseKernels {
    let b = CudaBackend::new(0).unwrap_or_else(|e| panic!("these tests need a CUDA GPU: {e}"));
    DenseKernels::new(b).unwrap()
}

fn rand_vec(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| rng.random_range(-1.0..1.0) * scale)
        .collect()
}

fn max_rel(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().map(|v| v.abs() as f64).fold(1e-30, f64::max);
    got.iter()
        .zip(want)
        .map(|(g, w)| (*g as f64 - *w as f64).abs())
        .fold(0.0, f64::max)
        / scale
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn embedding_gather_is_exact() {
    let k = kernels();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let (vocab, h) = (300, 72);
    let table: Vec<u16> = rand_vec(&mut rng, vocab * h, 2.0)
        .iter()
        .map(|v| bf16::from_f32(*v).to_bits())
        .collect();
    let ids: Vec<u32> = (0..37).map(|_| rng.random_range(0..vocab as u32)).collect();
    let got = k.embed(&table, h, &ids).unwrap();
    let want: Vec<f32> = ids
        .iter()
        .flat_map(|i| table[*i as usize * h..(*i as usize + 1) * h].iter())
        .map(|b| bf16::from_bits(*b).to_f32())
        .collect();
    assert_eq!(got, want);
    assert!(k.embed(&table, h, &[vocab as u32]).is_err());
    println!(
        "| dense embed    | V {vocab} H {h} | T {:>4} | exact |",
        ids.len()
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn rms_norm_matches_the_cpu() {
    let k = kernels();
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for (rows, h) in [(1, 64), (5, 4096), (33, 100), (2, 7)] {
        let x = rand_vec(&mut rng, rows * h, 3.0);
        let w_bits: Vec<u16> = rand_vec(&mut rng, h, 1.5)
            .iter()
            .map(|v| bf16::from_f32(*v).to_bits())
            .collect();
        let w: Vec<f32> = w_bits
            .iter()
            .map(|b| bf16::from_bits(*b).to_f32())
            .collect();
        let mut want = vec![0f32; rows * h];
        rms_norm(&x, &w, 1e-5, &mut want);
        let got = k.rms_norm(&x, &w_bits, 1e-5).unwrap();
        let rel = max_rel(&got, &want);
        println!("| dense rmsnorm  | rows {rows:>3} H {h:>5} | max rel err {rel:.2e} |");
        assert!(rel < 1e-5, "{rows}x{h}: {rel:.3e}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn rope_is_bit_identical_to_the_cpu() {
    let k = kernels();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for (heads, d, theta) in [(4, 16, 10000.0), (32, 128, 1e6), (8, 64, 500000.0)] {
        let rope = Rope::new(d, theta, 4096);
        let positions: Vec<usize> = (0..19).map(|_| rng.random_range(0..4096)).collect();
        let x = rand_vec(&mut rng, positions.len() * heads * d, 2.0);
        let mut want = x.clone();
        for (t, p) in positions.iter().enumerate() {
            rope.apply(&mut want[t * heads * d..(t + 1) * heads * d], *p);
        }
        let got = k.rope(&rope, &x, &positions).unwrap();
        assert_eq!(got, want, "heads {heads} d {d}");
        println!("| dense rope     | heads {heads:>2} d {d:>3} | bit-identical |");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn routing_matches_the_cpu() {
    let k = kernels();
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    for (tokens, e, top) in [(1, 8, 2), (77, 8, 2), (50, 16, 2), (9, 128, 8)] {
        let logits = rand_vec(&mut rng, tokens * e, 4.0);
        let want = route_softmax_topk(&logits, e, top, true);
        let got = k.route(&logits, e, top).unwrap();
        assert_eq!(got.experts, want.experts, "{tokens}x{e} top-{top}");
        let rel = max_rel(&got.weights, &want.weights);
        println!(
            "| dense router   | T {tokens:>3} E {e:>3} k {top} | same experts, weight err {rel:.2e} |"
        );
        assert!(rel < 1e-5, "{rel:.3e}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn paged_decode_attention_matches_the_cpu() {
    let k = kernels();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for (heads, kv_heads, d, bs) in [(4, 2, 16, 16), (32, 8, 128, 16), (8, 8, 64, 5)] {
        let kvd = kv_heads * d;
        let lens = [1usize, 17, 64, 300];
        let blocks_needed: usize = lens.iter().map(|l| l.div_ceil(bs)).sum();
        let mut kv = PagedKvCache::new(1, kvd, bs, blocks_needed + 3);
        // Interleave the sequences' blocks so that tables are not contiguous.
        let mut seqs: Vec<SeqCache> = lens.iter().map(|_| SeqCache::new()).collect();
        for step in 0..*lens.iter().max().unwrap() {
            for (s, len) in lens.iter().enumerate() {
                if step < *len {
                    kv.reserve(&mut seqs[s], 1).unwrap();
                    let (kr, vr) = (rand_vec(&mut rng, kvd, 1.0), rand_vec(&mut rng, kvd, 1.0));
                    kv.write(0, &seqs[s], step, &kr, &vr);
                    kv.advance(&mut seqs[s], 1);
                }
            }
        }
        let shape = AttentionShape::gqa(heads, kv_heads, d);
        let q = rand_vec(&mut rng, lens.len() * heads * d, 1.0);
        let mut want = Vec::new();
        for (s, len) in lens.iter().enumerate() {
            let (mut kk, mut vv) = (vec![0f32; len * kvd], vec![0f32; len * kvd]);
            kv.gather(0, &seqs[s], *len, &mut kk, &mut vv);
            let qs = &q[s * heads * d..(s + 1) * heads * d];
            let rows = |data| switchyard_engine::attention::KvRows { data, stride: kvd };
            want.extend(causal_attention(
                shape,
                qs,
                1,
                len - 1,
                rows(&kk),
                rows(&vv),
            ));
        }
        let (keys, values) = kv.layer(0);
        let tables: Vec<Vec<u32>> = seqs.iter().map(|s| s.blocks().to_vec()).collect();
        let got = k
            .paged_attention_decode(&PagedDecode {
                q: &q,
                keys,
                values,
                block_tables: &tables,
                lens: &lens,
                heads,
                kv_heads,
                head_dim: d,
                block_size: bs,
            })
            .unwrap();
        let rel = max_rel(&got, &want);
        println!(
            "| dense attn     | H {heads:>2}/{kv_heads:>2} d {d:>3} bs {bs:>2} | lens {lens:?} | max rel err {rel:.2e} |"
        );
        assert!(rel < 1e-5, "{rel:.3e}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn argmax_and_top_p_sampling() {
    let k = kernels();
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let vocab = 32000;
    let rows = 9;
    let mut logits = rand_vec(&mut rng, rows * vocab, 8.0);
    // Ties: the lowest index wins, as on the CPU.
    logits[3 * vocab + 10] = 100.0;
    logits[3 * vocab + 20] = 100.0;
    let want: Vec<u32> = logits.chunks_exact(vocab).map(argmax).collect();
    assert_eq!(k.argmax(&logits, vocab).unwrap(), want);

    // Top-p: a token is drawn from the nucleus computed in f64 on the host, and the draw
    // u walks it in order (a u just inside a token's cumulative interval picks that token).
    let (t, top_p) = (0.7f32, 0.9f32);
    for row in logits.chunks_exact(vocab) {
        let mut cand: Vec<(u32, f64)> = row
            .iter()
            .enumerate()
            .map(|(i, l)| (i as u32, (*l / t) as f64))
            .collect();
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let max = cand[0].1;
        let probs: Vec<f64> = cand.iter().map(|c| (c.1 - max).exp()).collect();
        let sum: f64 = probs.iter().sum();
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            acc += p / sum;
            if acc >= top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        let mass: f64 = probs[..keep].iter().sum();
        let mut cum = 0.0;
        for (i, p) in probs[..keep.min(6)].iter().enumerate() {
            let mid = (cum + p / 2.0) / mass;
            cum += p;
            let got = k.top_p_sample(row, vocab, t, top_p, &[mid as f32]).unwrap();
            assert_eq!(got[0], cand[i].0, "rank {i} of a {keep}-token nucleus");
        }
        let last = k.top_p_sample(row, vocab, t, top_p, &[0.999_999]).unwrap()[0];
        assert!(
            cand[..keep + 1].iter().any(|c| c.0 == last),
            "draw outside the nucleus"
        );
    }
    println!("| dense sampling | V {vocab} rows {rows} | argmax exact, top-p nucleus order |");
}
