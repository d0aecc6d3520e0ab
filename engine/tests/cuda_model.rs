//! `CudaModel` (the dense layers on the GPU, bf16 weights) against the CPU `Mixtral` on
//! both fixtures, fed teacher-forced (prompt + the fixture's greedy continuation): whole
//! prompt prefill, chunked prefill of all prompts batched together, and token-by-token
//! decode of all prompts batched together through the paged device cache. Both paths use
//! the same CPU experts, so the difference is the dense path alone.
//!
//! The GPU tests are ignored (run by `scripts/gpu-check`); the planning test runs
//! everywhere. Lines starting with `| ` are the table scripts/gpu-check prints.

use std::path::{Path, PathBuf};

use switchyard_engine::cuda::{CudaBackend, CudaModel, PlanChunk, StepPlan};
use switchyard_engine::verify::{DECIDED_MARGIN, GOLDEN_FILE, read_golden};
use switchyard_engine::{
    ExpertSelection, ExpertStore, LogitsFor, Model, PagedKvCache, SeqCache, SeqChunk,
};

/// bf16 weights and GEMM inputs against the f32 CPU: max |a - b| / max |b| over a
/// position's logits, at the median position.
const MEDIAN_LOGIT_REL_TOLERANCE: f64 = 3e-2;
/// Share of positions whose argmax agrees with the CPU's (near-ties included).
const TOP1_MIN_AGREEMENT: f64 = 0.97;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

// ---------------------------------------------------------------------------------------
// Host-side planning (no GPU).

/// The plan's slots, positions, per-token block tables and output rows against the CPU
/// cache's own bookkeeping: rows scattered by `slots` land where `PagedKvCache::write`
/// puts them, and reading `0..lens[r]` through token r's table gives `gather`'s rows.
#[test]
fn step_plan_matches_the_cpu_cache_bookkeeping() {
    let (bs, kvd) = (4, 2);
    let mut kv = PagedKvCache::new(1, kvd, bs, 32);
    let mut seqs: Vec<SeqCache> = (0..3).map(|_| SeqCache::new()).collect();
    // Chunk lengths per step and sequence: prefill, decode and mixed steps, interleaved so
    // block tables are not contiguous.
    let steps = [[5, 1, 9], [1, 3, 1], [1, 1, 6], [7, 1, 1], [1, 1, 1]];
    let mut next_id = 0u32;
    for (step, lens) in steps.iter().enumerate() {
        let logits_for = if step % 2 == 0 {
            LogitsFor::EveryToken
        } else {
            LogitsFor::LastToken
        };
        for (s, &n) in seqs.iter_mut().zip(lens) {
            kv.reserve(s, n).unwrap();
        }
        let toks: Vec<Vec<u32>> = lens
            .iter()
            .map(|&n| {
                (0..n)
                    .map(|_| {
                        next_id += 1;
                        next_id
                    })
                    .collect()
            })
            .collect();
        let chunks: Vec<PlanChunk> = seqs
            .iter()
            .zip(&toks)
            .map(|(s, t)| PlanChunk {
                tokens: t,
                blocks: s.blocks(),
                start: s.len(),
            })
            .collect();
        let plan = StepPlan::build(&chunks, bs, &logits_for).unwrap();
        let total: usize = lens.iter().sum();
        assert_eq!(plan.tokens(), total);

        let (k_before, _) = kv.layer(0);
        let mut scattered = k_before.to_vec();
        let mut r = 0;
        let mut want_rows = Vec::new();
        for (s, t) in seqs.iter().zip(&toks) {
            for (i, &id) in t.iter().enumerate() {
                let pos = s.len() + i;
                let row = [id as f32, pos as f32];
                kv.write(0, s, pos, &row, &row);
                assert_eq!(plan.ids[r], id as i32);
                assert_eq!(plan.positions[r], pos as i32);
                assert_eq!(plan.lens[r], pos as i32 + 1);
                let slot = plan.slots[r] as usize;
                scattered[slot * kvd..(slot + 1) * kvd].copy_from_slice(&row);
                if logits_for == LogitsFor::EveryToken || i + 1 == t.len() {
                    want_rows.push(r as i32);
                }
                r += 1;
            }
        }
        assert_eq!(scattered, kv.layer(0).0, "step {step}: slots");
        assert_eq!(plan.out_rows, want_rows, "step {step}: output rows");

        // The attention kernel's read path: position j of token r's "sequence" is row
        // table[j / bs] * bs + j % bs of the layer cache.
        let (keys, _) = kv.layer(0);
        let mut r = 0;
        for (s, t) in seqs.iter().zip(&toks) {
            for _ in t {
                let len = plan.lens[r] as usize;
                let mut want = vec![0f32; len * kvd];
                let mut scratch = vec![0f32; len * kvd];
                kv.gather(0, s, len, &mut want, &mut scratch);
                let table = &plan.tables[r * plan.max_blocks..(r + 1) * plan.max_blocks];
                let got: Vec<f32> = (0..len)
                    .flat_map(|j| {
                        let row = table[j / bs] as usize * bs + j % bs;
                        keys[row * kvd..(row + 1) * kvd].to_vec()
                    })
                    .collect();
                assert_eq!(got, want, "step {step}, token {r}");
                assert!(len <= plan.max_len);
                r += 1;
            }
        }

        let mut packed = Vec::new();
        plan.pack_into(&mut packed);
        let [ids, pos, slots, lens_r, rows, tables] = plan.ranges();
        assert_eq!(packed[ids], plan.ids[..]);
        assert_eq!(packed[pos], plan.positions[..]);
        assert_eq!(packed[slots], plan.slots[..]);
        assert_eq!(packed[lens_r], plan.lens[..]);
        assert_eq!(packed[rows], plan.out_rows[..]);
        assert_eq!(packed[tables.clone()], plan.tables[..]);
        assert_eq!(tables.end, packed.len());

        for (s, &n) in seqs.iter_mut().zip(lens) {
            kv.advance(s, n);
        }
    }
}

#[test]
fn step_plan_refuses_chunks_their_blocks_do_not_cover() {
    let tokens = [1u32, 2, 3, 4, 5];
    let chunk = PlanChunk {
        tokens: &tokens,
        blocks: &[0],
        start: 0,
    };
    assert!(StepPlan::build(&[chunk], 4, &LogitsFor::LastToken).is_err());
    assert!(StepPlan::build(&[chunk], 8, &LogitsFor::LastToken).is_ok());
    assert!(StepPlan::build(&[chunk], 0, &LogitsFor::LastToken).is_err());
}

// ---------------------------------------------------------------------------------------
// Against the CPU forward (GPU).

struct Fixture {
    name: &'static str,
    cpu: Model,
    experts: ExpertStore,
    gpu: CudaModel,
    /// Prompt + greedy continuation, per prompt.
    seqs: Vec<Vec<u32>>,
    /// The CPU's logits at every position of `seqs[i]` (whole-sequence prefill).
    want: Vec<Vec<f32>>,
}

fn setup(name: &'static str) -> Fixture {
    let dir = fixture(name);
    let (cpu, ckpt) = Model::load(&dir).unwrap();
    let experts = ExpertStore::load(&ckpt, cpu.config(), &ExpertSelection::All).unwrap();
    let backend =
        CudaBackend::new(0).unwrap_or_else(|e| panic!("these tests need a CUDA GPU: {e}"));
    let gpu = CudaModel::from_checkpoint(backend, cpu.config().clone(), &ckpt).unwrap();
    let c = cpu.config();
    let golden = read_golden(
        &dir.join(GOLDEN_FILE),
        c.expert_layers(),
        c.vocab_size,
        c.experts_per_token,
    )
    .unwrap();
    let seqs: Vec<Vec<u32>> = golden
        .iter()
        .map(|g| [g.input_ids.clone(), g.greedy_ids.clone()].concat())
        .collect();
    let want = seqs
        .iter()
        .map(|s| {
            let mut kv = cpu.new_kv_cache(16, 64 << 20);
            let mut cache = SeqCache::new();
            let mut batch = [SeqChunk {
                tokens: s,
                cache: &mut cache,
            }];
            cpu.forward(&mut kv, &experts, &mut batch, LogitsFor::EveryToken, false)
                .unwrap()
                .logits
        })
        .collect();
    Fixture {
        name,
        cpu,
        experts,
        gpu,
        seqs,
        want,
    }
}

fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best
}

/// Per position relative error (max |a - b| / max |b| over the row) and top-1 agreement;
/// asserts the bounds and prints a table row.
///
/// The bound is on the median position, not the worst: a near-tie in the router sends a
/// token to another expert on one side only, and that position's logits then differ by
/// 10-20% (seen on an H200, 2026-12-04: worst 6.6e-2 and 1.35e-1 with router agreement
/// 99%), which no bf16 kernel avoids. Top-1 must agree wherever the CPU's top two are
/// apart by `DECIDED_MARGIN` (as `verify` requires of a bf16 run).
fn check(f: &Fixture, mode: &str, got: &[Vec<f32>]) {
    let vocab = f.cpu.config().vocab_size;
    let (mut agree, mut rows, mut decided, mut decided_agree) = (0usize, 0usize, 0usize, 0usize);
    let mut errs: Vec<f64> = Vec::new();
    for (p, (g, w)) in got.iter().zip(&f.want).enumerate() {
        assert_eq!(
            g.len(),
            w.len(),
            "{} {mode} prompt {p}: logits length",
            f.name
        );
        for (a, b) in g.chunks_exact(vocab).zip(w.chunks_exact(vocab)) {
            let max_ref = b.iter().map(|v| v.abs() as f64).fold(1e-30, f64::max);
            let max_diff = a
                .iter()
                .zip(b)
                .map(|(x, y)| (*x as f64 - *y as f64).abs())
                .fold(0.0, f64::max);
            errs.push(max_diff / max_ref);
            let same = argmax(a) == argmax(b);
            agree += usize::from(same);
            rows += 1;
            if top_two_gap(b) >= DECIDED_MARGIN * max_ref {
                decided += 1;
                decided_agree += usize::from(same);
            }
        }
    }
    errs.sort_by(f64::total_cmp);
    let pct = |q: f64| errs[((errs.len() - 1) as f64 * q).round() as usize];
    let (p50, p90, worst) = (pct(0.5), pct(0.9), pct(1.0));
    let share = agree as f64 / rows.max(1) as f64;
    println!(
        "| cuda model {:<18} | {mode:<8} | rel err p50 {p50:.2e} p90 {p90:.2e} max {worst:.2e} | top-1 {agree}/{rows} ({:.1}%), decided {decided_agree}/{decided} |",
        f.name,
        100.0 * share
    );
    assert!(
        p50 < MEDIAN_LOGIT_REL_TOLERANCE,
        "{} {mode}: median position's logit rel err {p50:.3e}",
        f.name
    );
    assert!(decided > 0, "{} {mode}: no decided position", f.name);
    assert_eq!(
        decided_agree, decided,
        "{} {mode}: top-1 differs at a decided position",
        f.name
    );
    assert!(
        share >= TOP1_MIN_AGREEMENT,
        "{} {mode}: top-1 agreement {share:.4}",
        f.name
    );
}

/// The gap between a row's largest and second-largest value.
fn top_two_gap(row: &[f32]) -> f64 {
    let (mut first, mut second) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &v in row {
        if v > first {
            second = first;
            first = v;
        } else if v > second {
            second = v;
        }
    }
    (first - second) as f64
}

/// Runs every sequence through the GPU model, all of them in one batch per step, feeding
/// `chunk(step, seq)` tokens per step (at least 1) until each is consumed; returns every
/// position's logits per sequence.
fn run_batched(f: &Fixture, chunk: impl Fn(usize, usize) -> usize) -> Vec<Vec<f32>> {
    let vocab = f.cpu.config().vocab_size;
    let mut kv = f.gpu.new_kv_cache(16, 64 << 20).unwrap();
    let mut caches: Vec<SeqCache> = f.seqs.iter().map(|_| SeqCache::new()).collect();
    let mut out: Vec<Vec<f32>> = f.seqs.iter().map(|_| Vec::new()).collect();
    let mut step = 0;
    loop {
        let mut ids = Vec::new();
        let mut batch = Vec::new();
        for (i, (s, cache)) in f.seqs.iter().zip(caches.iter_mut()).enumerate() {
            let done = cache.len();
            if done < s.len() {
                let n = chunk(step, i).max(1).min(s.len() - done);
                ids.push((i, n));
                batch.push(SeqChunk {
                    tokens: &s[done..done + n],
                    cache,
                });
            }
        }
        if batch.is_empty() {
            break;
        }
        let every = ids.iter().any(|&(_, n)| n > 1);
        let logits_for = if every {
            LogitsFor::EveryToken
        } else {
            LogitsFor::LastToken
        };
        let r = f
            .gpu
            .forward(&mut kv, &f.experts, &mut batch, logits_for, false)
            .unwrap();
        let total: usize = ids.iter().map(|&(_, n)| n).sum();
        assert_eq!(r.rows, if every { total } else { ids.len() });
        assert_eq!(r.logits.len(), r.rows * vocab);
        let mut row = 0;
        for &(i, n) in &ids {
            // With LastToken every chunk here is one token: its one row.
            out[i].extend_from_slice(&r.logits[row * vocab..(row + n) * vocab]);
            row += n;
        }
        step += 1;
    }
    out
}

fn whole(f: &Fixture) {
    let got: Vec<Vec<f32>> = f
        .seqs
        .iter()
        .map(|s| {
            let mut kv = f.gpu.new_kv_cache(16, 64 << 20).unwrap();
            let mut cache = SeqCache::new();
            let mut batch = [SeqChunk {
                tokens: s,
                cache: &mut cache,
            }];
            f.gpu
                .forward(
                    &mut kv,
                    &f.experts,
                    &mut batch,
                    LogitsFor::EveryToken,
                    false,
                )
                .unwrap()
                .logits
        })
        .collect();
    check(f, "whole", &got);
}

fn chunked(f: &Fixture) {
    // Chunk sizes 1..=11 varying per step and sequence: prefill and decode chunks mixed in
    // one batch, chunks crossing block boundaries.
    let got = run_batched(f, |step, seq| 1 + (step * 3 + seq * 5) % 11);
    check(f, "chunked", &got);
}

fn decode(f: &Fixture) {
    let got = run_batched(f, |_, _| 1);
    check(f, "decode", &got);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn f32_fixture_dense_path_matches_the_cpu() {
    let f = setup("mixtral-tiny");
    whole(&f);
    chunked(&f);
    decode(&f);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn bf16_fixture_dense_path_matches_the_cpu() {
    let f = setup("mixtral-tiny-bf16");
    whole(&f);
    chunked(&f);
    decode(&f);
}

/// The routing the GPU reports per layer (with `trace_routing`) is what its experts were
/// given: same shape as the CPU's, and the same experts on nearly every token.
#[test]
#[ignore = "needs a CUDA GPU"]
fn traced_routing_matches_the_cpu() {
    let f = setup("mixtral-tiny-bf16");
    let s = &f.seqs[0];
    let route = |gpu: bool| {
        let mut cache = SeqCache::new();
        let mut batch = [SeqChunk {
            tokens: s,
            cache: &mut cache,
        }];
        let r = if gpu {
            let mut kv = f.gpu.new_kv_cache(16, 64 << 20).unwrap();
            f.gpu
                .forward(&mut kv, &f.experts, &mut batch, LogitsFor::LastToken, true)
                .unwrap()
        } else {
            let mut kv = f.cpu.new_kv_cache(16, 64 << 20);
            f.cpu
                .forward(&mut kv, &f.experts, &mut batch, LogitsFor::LastToken, true)
                .unwrap()
        };
        assert_eq!(r.rows, 1);
        r.routing.unwrap()
    };
    let (g, c) = (route(true), route(false));
    assert_eq!(g.len(), c.len());
    let (mut same, mut all) = (0, 0);
    for (gl, cl) in g.iter().zip(&c) {
        assert_eq!(gl.tokens(), s.len());
        for t in 0..s.len() {
            let mut a = gl.token(t).0.to_vec();
            let mut b = cl.token(t).0.to_vec();
            a.sort_unstable();
            b.sort_unstable();
            same += usize::from(a == b);
            all += 1;
        }
    }
    println!("| cuda model routing       | same experts {same}/{all} |");
    assert!(same as f64 >= TOP1_MIN_AGREEMENT * all as f64);
}
