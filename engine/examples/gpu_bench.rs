//! One MoE layer's experts on the GPU, Mixtral-8x7B shapes (hidden 4096, FFN 14336,
//! 8 experts, top-2, bf16), timed with CUDA events: warm-up, then the median of `--runs`
//! (>= 30) individually timed runs, rotating over several layers' weights and several
//! activation sets so nothing is served from L2. Run through `scripts/gpu-bench`.
//!
//!   cargo run --release -p switchyard-engine --example gpu_bench -- [--tokens 1,8,64,512,4096] [--runs 50]
//!
//! Exits with status 2 and a clear message on a machine without a usable CUDA GPU.

use std::process::ExitCode;
use std::sync::Arc;

use cudarc::driver::sys::CUevent_flags;
use switchyard_engine::Assignment;
use switchyard_engine::cuda::{CudaBackend, CudaError, CudaExperts, DeviceBatch, SKINNY_MAX_ROWS};

const HIDDEN: usize = 4096;
const FFN: usize = 14336;
const EXPERTS: usize = 8;
const TOP_K: usize = 2;
/// Distinct weight sets (layers) and activation sets rotated through.
const LAYERS: usize = 3;
const ACT_SETS: usize = 4;
const WARMUP: usize = 5;
/// Issue 4's targets, ms.
const TARGETS: &[(usize, f64)] = &[(1, 0.27), (8, 1.0), (64, 1.15), (512, 1.15), (4096, 4.6)];

/// splitmix64: fast, deterministic, good enough for benchmark inputs.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

fn bf16_bits(v: f32) -> u16 {
    half::bf16::from_f32(v).to_bits()
}

struct Args {
    tokens: Vec<usize>,
    runs: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        tokens: TARGETS.iter().map(|t| t.0).collect(),
        runs: 50,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--tokens" => {
                args.tokens = value()?
                    .split(',')
                    .map(|t| {
                        t.trim()
                            .parse::<usize>()
                            .map_err(|e| format!("--tokens: {e}"))
                    })
                    .collect::<Result<_, _>>()?;
            }
            "--runs" => {
                args.runs = value()?.parse().map_err(|e| format!("--runs: {e}"))?;
                if args.runs < 30 {
                    return Err("--runs must be at least 30".into());
                }
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

fn random_routing(rng: &mut Rng, tokens: usize) -> Vec<Assignment> {
    let mut work = Vec::with_capacity(tokens * TOP_K);
    for t in 0..tokens {
        let a = (rng.next() % EXPERTS as u64) as u32;
        let mut b = (rng.next() % (EXPERTS as u64 - 1)) as u32;
        if b >= a {
            b += 1;
        }
        let w = 0.5 + 0.4 * rng.unit();
        work.push(Assignment {
            token: t as u32,
            expert: a,
            weight: w,
        });
        work.push(Assignment {
            token: t as u32,
            expert: b,
            weight: 1.0 - w,
        });
    }
    work
}

fn median(v: &mut [f32]) -> f32 {
    v.sort_by(f32::total_cmp);
    v[v.len() / 2]
}

/// Device-to-device copy bandwidth (read + write bytes), GB/s: the memory ceiling.
fn copy_bandwidth(b: &Arc<CudaBackend>) -> Result<f64, CudaError> {
    let n = 1usize << 30;
    let src = b.stream.alloc_zeros::<u8>(n)?;
    let mut dst = b.stream.alloc_zeros::<u8>(n)?;
    let mut times = Vec::new();
    for _ in 0..10 {
        let start = b.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        let end = b.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        start.record(&b.stream)?;
        b.stream.memcpy_dtod(&src, &mut dst)?;
        end.record(&b.stream)?;
        end.synchronize()?;
        times.push(start.elapsed_ms(&end)?);
    }
    let ms = median(&mut times[2..]);
    Ok(2.0 * n as f64 / (f64::from(ms) * 1e-3) / 1e9)
}

fn run(args: &Args) -> Result<(), String> {
    let backend = CudaBackend::new(0).map_err(|e| format!("gpu_bench needs a CUDA GPU: {e}"))?;
    let err = |e: CudaError| e.to_string();
    println!(
        "device: {} ({}, {} SMs); layer: hidden {HIDDEN}, FFN {FFN}, {EXPERTS} experts, top-{TOP_K}, bf16",
        backend.name, backend.arch, backend.sm_count
    );
    let bw = copy_bandwidth(&backend).map_err(err)?;
    println!("device-to-device copy: {bw:.0} GB/s (read + write)");

    let max_t = args.tokens.iter().copied().max().unwrap_or(1);
    let mut experts = CudaExperts::new(backend.clone(), LAYERS, EXPERTS, HIDDEN, FFN, max_t, TOP_K)
        .map_err(err)?;
    // One random expert's weights, uploaded into every slot of every layer: distinct
    // addresses (what caching sees), random values (never zeros).
    let mut rng = Rng(0x5eed);
    let (sg, sd) = (1.0 / (HIDDEN as f32).sqrt(), 1.0 / (FFN as f32).sqrt());
    let gate_up: Vec<u16> = (0..2 * FFN * HIDDEN)
        .map(|_| bf16_bits(2.0 * sg * rng.unit()))
        .collect();
    let down: Vec<u16> = (0..HIDDEN * FFN)
        .map(|_| bf16_bits(2.0 * sd * rng.unit()))
        .collect();
    let ids: Vec<u32> = (0..EXPERTS as u32).collect();
    for layer in 0..LAYERS {
        experts.add_layer(layer, &ids).map_err(err)?;
        for local in 0..EXPERTS {
            experts
                .set_expert_bf16(layer, local, &gate_up, &down)
                .map_err(err)?;
        }
    }
    drop((gate_up, down));
    let expert_bytes = (3 * FFN * HIDDEN * 2) as f64;

    let mut rows = Vec::new();
    for &t in &args.tokens {
        let mut batches: Vec<DeviceBatch> = Vec::new();
        let mut touched = 0usize;
        for s in 0..ACT_SETS {
            let x: Vec<f32> = (0..t * HIDDEN).map(|_| rng.unit()).collect();
            let work = random_routing(&mut rng, t);
            if s == 0 {
                let mut seen = [false; EXPERTS];
                work.iter().for_each(|a| seen[a.expert as usize] = true);
                touched = seen.iter().filter(|s| **s).count();
            }
            batches.push(
                experts
                    .upload_batch(s % LAYERS, &x, t, &work)
                    .map_err(|e| e.to_string())?,
            );
        }
        for i in 0..WARMUP {
            experts
                .enqueue_batch(i % LAYERS, &batches[i % ACT_SETS])
                .map_err(err)?;
        }
        // The tiled kernels always; the skinny ones too where every batch fits them,
        // alternating run by run so that both see the same state of the machine.
        let fits = batches.iter().all(|b| b.max_expert_rows <= SKINNY_MAX_ROWS);
        let paths: &[(&str, usize)] = if fits {
            &[("tiled", 0), ("skinny", SKINNY_MAX_ROWS)]
        } else {
            &[("tiled", 0)]
        };
        let mut events = Vec::with_capacity(2 * args.runs * paths.len());
        for _ in 0..2 * args.runs * paths.len() {
            events.push(
                backend
                    .ctx
                    .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                    .map_err(|e| e.to_string())?,
            );
        }
        for (_, rows) in paths {
            // Warm-up of each path (module load, first-touch of its launch shape).
            experts.set_skinny_rows(*rows);
            experts.enqueue_batch(0, &batches[0]).map_err(err)?;
            let out = experts.read_output(t).map_err(err)?;
            let bad = out.iter().filter(|v| !v.is_finite()).count();
            if bad > 0 {
                return Err(format!("T={t} {rows}: {bad} non-finite outputs"));
            }
        }
        for i in 0..args.runs {
            for (pi, (_, skinny_rows)) in paths.iter().enumerate() {
                experts.set_skinny_rows(*skinny_rows);
                let at = 2 * (i * paths.len() + pi);
                events[at]
                    .record(&backend.stream)
                    .map_err(|e| e.to_string())?;
                // Each path on another layer's weights than the one before it, so neither
                // finds the other's last bytes in L2.
                experts
                    .enqueue_batch((i + pi) % LAYERS, &batches[(i / LAYERS) % ACT_SETS])
                    .map_err(err)?;
                events[at + 1]
                    .record(&backend.stream)
                    .map_err(|e| e.to_string())?;
            }
        }
        backend.stream.synchronize().map_err(|e| e.to_string())?;
        for (pi, (name, _)) in paths.iter().enumerate() {
            let mut ms: Vec<f32> = (0..args.runs)
                .map(|i| {
                    let at = 2 * (i * paths.len() + pi);
                    events[at].elapsed_ms(&events[at + 1])
                })
                .collect::<Result<_, _>>()
                .map_err(|e| e.to_string())?;
            let min = ms.iter().copied().fold(f32::INFINITY, f32::min);
            let med = median(&mut ms);
            let p90 = ms[ms.len() * 9 / 10];
            // Floor: the touched experts' weights read once, at the measured copy bandwidth.
            let bytes = touched as f64 * expert_bytes + (t * HIDDEN * (2 + 4)) as f64;
            let floor = bytes / (bw * 1e9) * 1e3;
            let flops = 2.0 * (t * TOP_K) as f64 * 3.0 * (HIDDEN * FFN) as f64;
            let target = TARGETS.iter().find(|x| x.0 == t).map(|x| x.1);
            rows.push((
                t,
                *name,
                touched,
                med,
                min,
                p90,
                floor,
                flops / (f64::from(med) * 1e-3) / 1e12,
                target,
            ));
        }
    }
    println!();
    println!(
        "|     T | path   | experts | median ms |   min ms |   p90 ms | floor ms | of floor | TFLOP/s | target ms | meets |"
    );
    println!(
        "|------:|:-------|--------:|----------:|---------:|---------:|---------:|---------:|--------:|----------:|:-----:|"
    );
    for (t, path, touched, med, min, p90, floor, tflops, target) in rows {
        let (tgt, ok) = match target {
            Some(x) => (
                format!("{x:.2}"),
                if f64::from(med) <= x { "yes" } else { "no" },
            ),
            None => ("-".into(), "-"),
        };
        println!(
            "| {t:>5} | {path:<6} | {touched:>7} | {med:>9.3} | {min:>8.3} | {p90:>8.3} | {floor:>8.3} | {:>7.0}% | {tflops:>7.1} | {tgt:>9} | {ok:^5} |",
            100.0 * floor / f64::from(med)
        );
    }
    println!(
        "({} timed runs per row after {WARMUP} warm-up runs, paths alternating run by run; floor = touched experts' bf16 weights at the copy bandwidth; of floor = floor / median)",
        args.runs
    );
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("gpu_bench: {e}");
            return ExitCode::from(64);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gpu_bench: {e}");
            ExitCode::from(2)
        }
    }
}
