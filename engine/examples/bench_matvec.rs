//! One weight matrix times a few activation rows, per storage format: where the decode
//! time of `bench_forward` goes, without the rest of the model. Prints a table of
//! microseconds per product and the weight bytes read per second.
//!
//! `cargo run --release -p switchyard-engine --example bench_matvec [ROWS] [REPS]`
//! (ROWS: comma-separated activation rows, default 1,32; REPS default 200).

use std::time::Instant;

use switchyard_engine::ops::{CpuWeights, Linear, Weights};

/// The synth benchmark model's matrices: an expert's fused gate/up and its down
/// projection, and the LM head.
const SHAPES: [(&str, usize, usize); 3] = [
    ("gate_up 7168x1024", 7168, 1024),
    ("down 1024x3584", 1024, 3584),
    ("lm_head 32000x1024", 32000, 1024),
];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rows: Vec<usize> = args
        .get(1)
        .map(|s| s.split(',').filter_map(|v| v.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 32]);
    let reps: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(200);
    println!("| matrix | rows | format | us/product | weight GB/s |");
    println!("|---|---|---|---|---|");
    for (name, n, k) in SHAPES {
        let values: Vec<f32> = pseudo_random(n * k, 7)
            .into_iter()
            .map(|v| half::bf16::from_f32(v * 0.05).to_f32())
            .collect();
        let formats = [
            ("f32", CpuWeights::F32),
            ("bf16", CpuWeights::Bf16),
            ("int8", CpuWeights::Int8),
        ];
        let linears: Vec<(&str, Linear)> = formats
            .iter()
            .map(|(label, policy)| {
                let w = Weights::with_policy(values.clone(), k, *policy);
                (*label, Linear::from_weights(w, n, k))
            })
            .collect();
        for &m in &rows {
            let x = pseudo_random(m * k, 9);
            let mut y = vec![0.0f32; m * n];
            // Alternate the formats round by round, so drift on a shared machine falls on
            // all of them alike.
            let mut best = vec![f64::INFINITY; linears.len()];
            for _ in 0..5 {
                for (i, (_, lin)) in linears.iter().enumerate() {
                    let start = Instant::now();
                    for _ in 0..reps / 5 {
                        lin.forward_into(&x, m, &mut y);
                    }
                    let us = start.elapsed().as_secs_f64() * 1e6 / (reps / 5) as f64;
                    best[i] = best[i].min(us);
                }
            }
            for ((label, lin), us) in linears.iter().zip(&best) {
                let gbs = lin.weight.bytes() as f64 / (us * 1e-6) / 1e9;
                println!("| {name} | {m} | {label} | {us:.1} | {gbs:.1} |");
            }
        }
    }
}

/// Values in [-0.5, 0.5] that no kernel can predict; their distribution does not matter
/// to the timing.
fn pseudo_random(len: usize, seed: u32) -> Vec<f32> {
    (0..len)
        .map(|i| ((i as f32 + seed as f32) * 0.618_034).sin() * 0.5)
        .collect()
}
