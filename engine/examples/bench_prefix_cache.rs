//! What prefix caching costs a prompt that shares nothing: the KV cache's bookkeeping for
//! one prompt (look up its prefix, take its blocks, remember them, release them), with
//! the cache on and off, alternating in rounds. Nothing is computed: this is the whole
//! difference the cache makes to such a prompt, to set beside its prefill time.
//!
//! cargo run --release -p switchyard-engine --example bench_prefix_cache -- [PROMPT_LEN] [PROMPTS] [ROUNDS]
//!
//! The pool holds 1024 blocks of 16 positions, so with the cache on, idle cached blocks
//! fill it and every prompt evicts some (the cache's worst case). Prints a table.

use std::time::Instant;

use switchyard_engine::{PagedKvCache, SeqCache};

const BLOCK: usize = 16;
const BLOCKS: usize = 1024;

/// A prompt of random token ids (xorshift: no two prompts share a block).
fn prompt(state: &mut u64, len: usize) -> Vec<u32> {
    (0..len)
        .map(|_| {
            *state ^= *state << 13;
            *state ^= *state >> 7;
            *state ^= *state << 17;
            (*state % 32000) as u32
        })
        .collect()
}

/// Mean microseconds of one prompt's bookkeeping over `prompts` prompts.
fn run(caching: bool, prompts: &[Vec<u32>]) -> Result<f64, Box<dyn std::error::Error>> {
    // Two layers with one position of one float: the bookkeeping does not touch the
    // cache's memory, so its size does not matter here.
    let mut kv = PagedKvCache::new(2, 1, BLOCK, BLOCKS);
    kv.set_prefix_caching(caching);
    let start = Instant::now();
    for tokens in prompts {
        let mut seq = SeqCache::new();
        let reused = kv.reuse_prefix(&mut seq, tokens);
        kv.reserve(&mut seq, tokens.len() - reused)?;
        kv.advance(&mut seq, tokens.len() - reused);
        kv.remember_prefix(&seq, tokens);
        kv.release(&mut seq);
    }
    Ok(start.elapsed().as_secs_f64() * 1e6 / prompts.len() as f64)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let len: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(1088);
    let count: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(2000);
    let rounds: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(5);
    if len == 0 || len > BLOCKS * BLOCK {
        return Err(format!("PROMPT_LEN must be 1..={}", BLOCKS * BLOCK).into());
    }
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let prompts: Vec<Vec<u32>> = (0..count).map(|_| prompt(&mut state, len)).collect();
    println!("| round | prefix cache | us per {len}-token prompt |");
    println!("|---|---|---|");
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        for caching in [true, false] {
            let us = run(caching, &prompts)?;
            println!(
                "| {round} | {} | {us:.2} |",
                if caching { "on" } else { "off" }
            );
            if caching { &mut on } else { &mut off }.push(us);
        }
    }
    on.sort_by(f64::total_cmp);
    off.sort_by(f64::total_cmp);
    println!(
        "\nmedian: on {:.2} us, off {:.2} us: the cache adds {:.2} us per prompt",
        on[on.len() / 2],
        off[off.len() / 2],
        on[on.len() / 2] - off[off.len() / 2]
    );
    Ok(())
}
