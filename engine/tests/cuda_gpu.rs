//! The CUDA expert kernels against an f64 CPU reference. Needs a CUDA GPU (sm_80+):
//! `scripts/gpu-check` runs these (`cargo test ... -- --ignored`). Each check draws fresh
//! random weights, activations and routing, poisons every workspace with NaN first, and
//! reports the relative error ||out - ref|| / ||ref|| (bf16 operands: expect 1e-3..1e-2).
//! Lines starting with `| ` are the table scripts/gpu-check prints.

use std::sync::Arc;

use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use switchyard_engine::Assignment;
use switchyard_engine::cuda::{CudaBackend, CudaExperts, SKINNY_MAX_ROWS};

/// Tolerance on the relative error (bf16 inputs, weights and intermediate activations).
const MAX_REL_ERR: f64 = 2e-2;

fn backend() -> Arc<CudaBackend> {
    CudaBackend::new(0).unwrap_or_else(|e| panic!("these tests need a CUDA GPU: {e}"))
}

/// ||got - want|| / ||want||.
fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(g, w)| f64::from(g - w).powi(2))
        .sum();
    let den: f64 = want.iter().map(|w| f64::from(*w).powi(2)).sum();
    (num / den).sqrt()
}

fn bits(v: f32) -> u16 {
    bf16::from_f32(v).to_bits()
}

fn val(b: u16) -> f64 {
    f64::from(bf16::from_bits(b).to_f32())
}

struct Expert {
    gate_up: Vec<u16>, // [2F, H]
    down: Vec<u16>,    // [H, F]
}

fn random_expert(rng: &mut ChaCha8Rng, h: usize, f: usize) -> Expert {
    let (sg, sd) = (1.0 / (h as f32).sqrt(), 1.0 / (f as f32).sqrt());
    Expert {
        gate_up: (0..2 * f * h)
            .map(|_| bits(rng.random_range(-2.0..2.0) * sg))
            .collect(),
        down: (0..h * f)
            .map(|_| bits(rng.random_range(-2.0..2.0) * sd))
            .collect(),
    }
}

/// f64 reference from the same bf16 values: sum_k w_k * Wd (silu(Wg x) * (Wu x)).
fn reference(
    experts: &[(u32, Expert)],
    x: &[u16],
    h: usize,
    f: usize,
    tokens: usize,
    work: &[Assignment],
) -> Vec<f64> {
    let mut out = vec![0f64; tokens * h];
    out.par_chunks_mut(h).enumerate().for_each(|(t, o)| {
        let xt: Vec<f64> = x[t * h..(t + 1) * h].iter().map(|b| val(*b)).collect();
        for a in work.iter().filter(|a| a.token as usize == t) {
            let e = &experts.iter().find(|(id, _)| *id == a.expert).unwrap().1;
            let dot =
                |row: &[u16], v: &[f64]| row.iter().zip(v).map(|(w, x)| val(*w) * x).sum::<f64>();
            let act: Vec<f64> = (0..f)
                .map(|i| {
                    let g = dot(&e.gate_up[i * h..(i + 1) * h], &xt);
                    let u = dot(&e.gate_up[(f + i) * h..(f + i + 1) * h], &xt);
                    g / (1.0 + (-g).exp()) * u
                })
                .collect();
            for (j, oj) in o.iter_mut().enumerate() {
                *oj += f64::from(a.weight) * dot(&e.down[j * f..(j + 1) * f], &act);
            }
        }
    });
    out
}

/// Top-k over `routable` expert ids; experts outside it receive no tokens.
fn random_work(rng: &mut ChaCha8Rng, tokens: usize, routable: &[u32], k: usize) -> Vec<Assignment> {
    let mut work = Vec::new();
    for t in 0..tokens {
        let mut chosen: Vec<u32> = Vec::new();
        while chosen.len() < k.min(routable.len()) {
            let e = routable[rng.random_range(0..routable.len())];
            if !chosen.contains(&e) {
                chosen.push(e);
            }
        }
        let raw: Vec<f32> = chosen.iter().map(|_| rng.random_range(0.1..1.0)).collect();
        let sum: f32 = raw.iter().sum();
        for (e, w) in chosen.into_iter().zip(raw) {
            work.push(Assignment {
                token: t as u32,
                expert: e,
                weight: w / sum,
            });
        }
    }
    work
}

struct Case {
    name: &'static str,
    hidden: usize,
    ffn: usize,
    /// Model experts; the node holds `held` of them; routing uses `routable`.
    model_experts: usize,
    held: Vec<u32>,
    routable: Vec<u32>,
    k: usize,
    tokens: Vec<usize>,
}

fn run_case(backend: &Arc<CudaBackend>, case: &Case, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (h, f) = (case.hidden, case.ffn);
    // Start with room for one token: bigger batches must grow the workspaces.
    let mut gpu =
        CudaExperts::new(backend.clone(), 2, case.model_experts, h, f, 1, case.k).unwrap();
    let layer = 1;
    gpu.add_layer(layer, &case.held).unwrap();
    let experts: Vec<(u32, Expert)> = case
        .held
        .iter()
        .map(|e| (*e, random_expert(&mut rng, h, f)))
        .collect();
    for (local, (_, e)) in experts.iter().enumerate() {
        gpu.set_expert_bf16(layer, local, &e.gate_up, &e.down)
            .unwrap();
    }
    for &tokens in &case.tokens {
        let x: Vec<u16> = (0..tokens * h)
            .map(|_| bits(rng.random_range(-1.0..1.0)))
            .collect();
        let xf: Vec<f32> = x.iter().map(|b| bf16::from_bits(*b).to_f32()).collect();
        let work = random_work(&mut rng, tokens, &case.routable, case.k);
        let want = reference(&experts, &x, h, f, tokens, &work);
        // Rows of the busiest expert: the skinny kernels take the batch when it has at
        // most SKINNY_MAX_ROWS; both paths are checked wherever both can run.
        let mut per_expert = std::collections::HashMap::new();
        for a in &work {
            *per_expert.entry(a.expert).or_insert(0usize) += 1;
        }
        let busiest = per_expert.values().copied().max().unwrap_or(0);
        for skinny_rows in [0, SKINNY_MAX_ROWS] {
            gpu.set_skinny_rows(skinny_rows);
            let path = match gpu.skinny_instance(busiest) {
                Some(2) => "skinny2",
                Some(_) => "skinny8",
                None if skinny_rows > 0 => continue, // the tiled path again: already checked
                None => "tiled",
            };
            gpu.poison().unwrap();
            let got = gpu.forward_layer(layer, &xf, tokens, &work).unwrap();
            assert_eq!(got.len(), tokens * h);
            let unwritten = got.iter().filter(|v| !v.is_finite()).count();
            let (mut num, mut den) = (0f64, 0f64);
            for (g, w) in got.iter().zip(&want) {
                num += (f64::from(*g) - w).powi(2);
                den += w * w;
            }
            let rel = (num / den.max(f64::MIN_POSITIVE)).sqrt();
            // The same inputs again must give the same bits (a moving result is a race).
            gpu.poison().unwrap();
            let again = gpu.forward_layer(layer, &xf, tokens, &work).unwrap();
            let stable = got
                .iter()
                .zip(&again)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            let ok = unwritten == 0 && rel < MAX_REL_ERR && rel > 0.0 && stable;
            // Row tiles of 64 per expert, as the plan makes them: the tiled down
            // projection's split-K slice count follows from them.
            let tiles: usize = per_expert.values().map(|r| r.div_ceil(64)).sum();
            let splits = if path == "tiled" {
                gpu.split_k(tiles)
            } else {
                1
            };
            println!(
                "| {:<14} | H {:>5} | F {:>5} | E {:>2}/{:<2} | k {} | T {:>5} | rows {:>5} | {path:<7} | split-K {} | rel err {:.2e} | nan {:>3} | stable {:>5} | {} |",
                case.name,
                h,
                f,
                case.held.len(),
                case.model_experts,
                case.k,
                tokens,
                work.len(),
                splits,
                rel,
                unwritten,
                stable,
                if ok { "ok" } else { "FAIL" }
            );
            assert_eq!(
                unwritten, 0,
                "{}: T={tokens} {path}: unwritten (NaN) outputs",
                case.name
            );
            assert!(
                rel < MAX_REL_ERR,
                "{}: T={tokens} {path}: relative error {rel:.3e}",
                case.name
            );
            assert!(
                stable,
                "{}: T={tokens} {path}: results differ between identical runs",
                case.name
            );
            if case.name == "mixtral-8x7b" && tokens == 1 && path == "tiled" {
                // Decode's shape: few tiles, so the tiled down projection is split over K.
                assert!(splits > 1, "T=1 at Mixtral shapes ran without split-K");
            }
            if tokens <= 3 {
                // One to three tokens are at most 3 * k rows (k <= 3 here): decode's shape.
                assert!(gpu.takes_skinny(busiest) || skinny_rows == 0);
            }
        }
    }
}

const TOKENS: &[usize] = &[1, 3, 8, 17, 64, 511, 4096];

#[test]
#[ignore = "needs a CUDA GPU"]
fn experts_match_f64_reference_at_many_shapes() {
    let b = backend();
    println!("device: {} ({}, {} SMs)", b.name, b.arch, b.sm_count);
    let cases = [
        Case {
            name: "tile-multiple",
            hidden: 256,
            ffn: 512,
            model_experts: 8,
            held: (0..8).collect(),
            routable: (0..8).collect(),
            k: 2,
            tokens: TOKENS.to_vec(),
        },
        Case {
            name: "zero-token-exp",
            hidden: 128,
            ffn: 384,
            model_experts: 8,
            held: (0..8).collect(),
            routable: vec![0, 2, 5],
            k: 2,
            tokens: TOKENS.to_vec(),
        },
        Case {
            name: "ragged-mult-8",
            hidden: 200,
            ffn: 328,
            model_experts: 6,
            held: vec![1, 3, 4],
            routable: vec![1, 3, 4],
            k: 2,
            tokens: TOKENS.to_vec(),
        },
        Case {
            name: "ragged-odd",
            hidden: 100,
            ffn: 90,
            model_experts: 4,
            held: vec![0, 1, 2, 3],
            routable: vec![0, 1, 3],
            k: 3,
            tokens: TOKENS.to_vec(),
        },
        Case {
            name: "tiny-odd",
            hidden: 13,
            ffn: 7,
            model_experts: 3,
            held: vec![0, 2],
            routable: vec![0, 2],
            k: 1,
            tokens: vec![1, 3, 17, 64],
        },
        Case {
            name: "mixtral-8x7b",
            hidden: 4096,
            ffn: 14336,
            model_experts: 8,
            held: vec![0, 3],
            routable: vec![0, 3],
            k: 2,
            tokens: vec![1, 3, 8, 17],
        },
    ];
    for (i, c) in cases.iter().enumerate() {
        run_case(&b, c, 1000 + i as u64);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn experts_trait_matches_cpu_store() {
    use switchyard_engine::experts::{ExpertFfn, ExpertStore};
    use switchyard_engine::ops::Linear;
    use switchyard_engine::router::route_softmax_topk;
    use switchyard_engine::{Experts, ModelConfig};

    let b = backend();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let (h, f, e, layers) = (64usize, 96usize, 4usize, 2usize);
    let cfg = ModelConfig::from_json(&serde_json::json!({
        "model_type": "mixtral", "vocab_size": 32, "hidden_size": h, "intermediate_size": f,
        "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_local_experts": e, "num_experts_per_tok": 2, "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0
    }))
    .unwrap();
    let mut store = ExpertStore::empty(&cfg);
    // Weights already bf16-representable, so the CPU store and the GPU hold the same values.
    let mut mat = |n: usize, scale: f32| -> Vec<f32> {
        (0..n)
            .map(|_| bf16::from_f32(rng.random_range(-2.0..2.0) * scale).to_f32())
            .collect()
    };
    for l in 0..layers {
        for x in 0..e {
            store.insert(
                l,
                x,
                ExpertFfn {
                    gate_up: Linear::new(mat(2 * f * h, 0.125), 2 * f, h),
                    down: Linear::new(mat(h * f, 0.1), h, f),
                },
            );
        }
    }
    let gpu = CudaExperts::from_store(b, &store, f, 4, 2).unwrap();
    let tokens = 33;
    let x = mat(tokens * h, 8.0);
    let logits = mat(tokens * e, 8.0);
    let routing = route_softmax_topk(&logits, e, 2, true);
    for l in 0..layers {
        let want = store.forward(l, &x, &routing).unwrap();
        let got = gpu.forward(l, &x, &routing).unwrap();
        let rel = rel_l2(&got, &want);
        println!(
            "| trait-vs-cpu   | H {h:>5} | F {f:>5} | layer {l} | T {tokens:>5} | rel err {rel:.2e} |"
        );
        assert!(rel < MAX_REL_ERR, "layer {l}: {rel:.3e}");
    }
}

/// A node's run-time loads and unloads on the GPU (layers re-packed on the device) give
/// the same answers as the CPU store holding the same experts.
#[test]
#[ignore = "needs a CUDA GPU"]
fn local_experts_load_and_unload_on_the_gpu() {
    use std::path::PathBuf;
    use switchyard_engine::cuda::Device;
    use switchyard_engine::experts::{ExpertSelection, assignments, load_expert};
    use switchyard_engine::router::route_softmax_topk;
    use switchyard_engine::{Checkpoint, LocalExperts, ModelConfig};

    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/mixtral-tiny");
    let cfg = ModelConfig::from_dir(&dir).unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    let (h, e) = (cfg.hidden_size, cfg.num_experts);
    let cpu = LocalExperts::load(Device::Cpu, &ckpt, &cfg, &ExpertSelection::All).unwrap();
    let mut gpu = LocalExperts::load(
        Device::Cuda(0),
        &ckpt,
        &cfg,
        &ExpertSelection::in_every_layer(&[0, 2, 4, 6], cfg.expert_layers()),
    )
    .unwrap();
    assert!(gpu.device().starts_with("cuda:0 ("), "{}", gpu.device());
    // Remove two, add the odd ones (a layer re-packed with kept and new experts), then
    // put the removed ones back: every expert held, in a scrambled local order.
    let pairs = |ids: &[usize]| -> Vec<(usize, usize)> {
        (0..cfg.expert_layers())
            .flat_map(|l| ids.iter().map(move |x| (l, *x)))
            .collect()
    };
    let load = |p: &[(usize, usize)]| {
        p.iter()
            .map(|&(l, x)| (l, x, load_expert(&ckpt, &cfg, l, x).unwrap()))
            .collect::<Vec<_>>()
    };
    gpu.remove_many(&pairs(&[2, 6])).unwrap();
    assert_eq!(gpu.held(), pairs(&[0, 4]));
    gpu.insert_many(load(&pairs(&[1, 3, 5, 7]))).unwrap();
    gpu.insert_many(load(&pairs(&[2, 6]))).unwrap();
    assert_eq!(gpu.held(), cpu.held());
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let tokens = 19;
    let x: Vec<f32> = (0..tokens * h)
        .map(|_| rng.random_range(-2.0..2.0))
        .collect();
    let logits: Vec<f32> = (0..tokens * e)
        .map(|_| rng.random_range(-4.0..4.0))
        .collect();
    let routing = route_softmax_topk(&logits, e, cfg.experts_per_token, true);
    let work = assignments(&routing);
    for l in 0..cfg.expert_layers() {
        let want = cpu.combine(l, &x, tokens, &work).unwrap();
        let got = gpu.combine(l, &x, tokens, &work).unwrap();
        let rel = rel_l2(&got, &want);
        println!(
            "| local-load     | tiny fixture | layer {l} | T {tokens:>5} | rel err {rel:.2e} |"
        );
        assert!(rel < MAX_REL_ERR, "layer {l}: {rel:.3e}");
    }
    gpu.remove_many(&pairs(&[0, 1, 2, 3, 4, 5, 6, 7])).unwrap();
    assert!(gpu.held().is_empty());
}
