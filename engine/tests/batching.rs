//! Batches of sequences of different lengths, prefill mixed with decode, must give every
//! sequence exactly what it gets alone, and what transformers computed.

use std::path::{Path, PathBuf};

use switchyard_engine::sampling::argmax;
use switchyard_engine::verify::{GOLDEN_FILE, read_golden};
use switchyard_engine::{ExpertSelection, ExpertStore, LogitsFor, Model, SeqCache, SeqChunk};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

#[test]
fn batch_of_different_lengths_gives_each_its_solo_result_and_the_reference_greedy() {
    let dir = fixture("mixtral-tiny");
    let (model, ckpt) = Model::load(&dir).unwrap();
    let cfg = model.config().clone();
    let experts = ExpertStore::load(&ckpt, &cfg, &ExpertSelection::All).unwrap();
    let golden = read_golden(
        &dir.join(GOLDEN_FILE),
        cfg.expert_layers(),
        cfg.vocab_size,
        cfg.experts_per_token,
    )
    .unwrap();
    // Prompts 0, 1 and 5: 13, 33 and 300 tokens. Prompt 1 joins one step late, while the
    // others are already decoding: a prefill and decode tokens share a batch.
    let picked = [&golden[0], &golden[1], &golden[5]];
    let mut kv = model.new_kv_cache(16, 64 << 20);
    let vocab = cfg.vocab_size;

    // Solo last-token logits of each prompt.
    let solo: Vec<Vec<f32>> = picked
        .iter()
        .map(|g| {
            let mut seq = SeqCache::new();
            let out = model
                .forward(
                    &mut kv,
                    &experts,
                    &mut [SeqChunk {
                        tokens: &g.input_ids,
                        cache: &mut seq,
                    }],
                    LogitsFor::LastToken,
                    false,
                )
                .unwrap();
            kv.release(&mut seq);
            out.logits
        })
        .collect();

    let mut caches: Vec<SeqCache> = (0..3).map(|_| SeqCache::new()).collect();
    let mut generated: Vec<Vec<u32>> = vec![Vec::new(); 3];
    let steps = 8; // prompt 5's reference continuation is 8 tokens long
    for step in 0..=steps {
        let mut inputs: Vec<(usize, Vec<u32>)> = Vec::new();
        for (i, g) in picked.iter().enumerate() {
            let joined = if i == 1 { step >= 1 } else { true };
            if !joined || generated[i].len() >= steps {
                continue;
            }
            if caches[i].is_empty() {
                inputs.push((i, g.input_ids.clone()));
            } else if let Some(last) = generated[i].last() {
                inputs.push((i, vec![*last]));
            }
        }
        if inputs.is_empty() {
            break;
        }
        let mut chunk_caches: Vec<(usize, &mut SeqCache)> = caches
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| inputs.iter().any(|(j, _)| j == i))
            .collect();
        let mut batch: Vec<SeqChunk> = chunk_caches
            .iter_mut()
            .zip(&inputs)
            .map(|((_, cache), (_, tokens))| SeqChunk { tokens, cache })
            .collect();
        let out = model
            .forward(&mut kv, &experts, &mut batch, LogitsFor::LastToken, false)
            .unwrap();
        for (row, (i, tokens)) in inputs.iter().enumerate() {
            let logits = &out.logits[row * vocab..(row + 1) * vocab];
            if tokens.len() > 1 {
                let d = max_rel_diff(logits, &solo[*i]);
                assert!(
                    d < 1e-5,
                    "prompt {i}: batched prefill differs from solo by {d}"
                );
            }
            generated[*i].push(argmax(logits));
        }
    }
    for (i, g) in picked.iter().enumerate() {
        assert_eq!(
            generated[i],
            g.greedy_ids[..steps].to_vec(),
            "prompt {}",
            g.index
        );
    }
    for c in caches.iter_mut() {
        kv.release(c);
    }
    assert_eq!(kv.free_blocks(), kv.num_blocks());
}

#[test]
fn chunked_prefill_equals_whole_prefill() {
    let dir = fixture("mixtral-tiny-bf16");
    let (model, ckpt) = Model::load(&dir).unwrap();
    let cfg = model.config().clone();
    let experts = ExpertStore::load(&ckpt, &cfg, &ExpertSelection::All).unwrap();
    let golden = read_golden(
        &dir.join(GOLDEN_FILE),
        cfg.expert_layers(),
        cfg.vocab_size,
        cfg.experts_per_token,
    )
    .unwrap();
    let g = &golden[5];
    let mut kv = model.new_kv_cache(16, 64 << 20);
    let mut seq = SeqCache::new();
    let mut logits = Vec::new();
    for chunk in g.input_ids.chunks(37) {
        let out = model
            .forward(
                &mut kv,
                &experts,
                &mut [SeqChunk {
                    tokens: chunk,
                    cache: &mut seq,
                }],
                LogitsFor::EveryToken,
                false,
            )
            .unwrap();
        logits.extend(out.logits);
    }
    assert!(max_rel_diff(&logits, &g.logits) < 1e-4);
}

#[test]
fn bad_batches_are_refused_before_anything_changes() {
    let dir = fixture("mixtral-tiny");
    let (model, ckpt) = Model::load(&dir).unwrap();
    let cfg = model.config().clone();
    let experts = ExpertStore::load(&ckpt, &cfg, &ExpertSelection::All).unwrap();
    let mut kv = model.new_kv_cache(16, 1 << 20);
    let free = kv.free_blocks();
    let mut seq = SeqCache::new();
    let err = model
        .forward(
            &mut kv,
            &experts,
            &mut [SeqChunk {
                tokens: &[1, 512],
                cache: &mut seq,
            }],
            LogitsFor::LastToken,
            false,
        )
        .err()
        .unwrap();
    assert!(err.to_string().contains("512"), "{err}");
    let long = vec![5u32; cfg.max_position_embeddings + 1];
    let err = model
        .forward(
            &mut kv,
            &experts,
            &mut [SeqChunk {
                tokens: &long,
                cache: &mut seq,
            }],
            LogitsFor::LastToken,
            false,
        )
        .err()
        .unwrap();
    assert!(err.to_string().contains("context"), "{err}");
    assert_eq!(kv.free_blocks(), free);
    assert!(seq.is_empty());

    // A pool too small for the request: an out-of-blocks error, nothing reserved.
    let mut tiny = model.new_kv_cache(
        16,
        switchyard_engine::PagedKvCache::model_block_bytes(&cfg, 16),
    );
    let prompt = vec![5u32; 40];
    let err = model
        .forward(
            &mut tiny,
            &experts,
            &mut [SeqChunk {
                tokens: &prompt,
                cache: &mut seq,
            }],
            LogitsFor::LastToken,
            false,
        )
        .err()
        .unwrap();
    assert!(err.to_string().contains("KV cache full"), "{err}");
    assert_eq!(tiny.free_blocks(), 1);
}

/// Micro-batches in ping-pong change no bit: for every family's fixture, steps of up to 32
/// tokens (prefill chunks beside decode tokens, over several sequences) give the same
/// logits and routing split in 1, 2 or 3 micro-batches, step after step through the KV
/// cache; a step over 32 tokens is not split at all.
#[test]
fn micro_batches_give_bit_identical_logits_and_routing() {
    for name in [
        "mixtral-tiny",
        "qwen2-moe-tiny",
        "qwen3-moe-tiny",
        "deepseek-v3-tiny",
    ] {
        let dir = fixture(name);
        let (model, ckpt) = Model::load(&dir).unwrap();
        let cfg = model.config().clone();
        let experts = ExpertStore::load(&ckpt, &cfg, &ExpertSelection::All).unwrap();
        let prompts: Vec<Vec<u32>> = (0..5u32)
            .map(|s| {
                (0..4 + 3 * s)
                    .map(|i| (1 + i * 37 + s * 101) % 500)
                    .collect()
            })
            .collect();
        let mut runs = Vec::new();
        for parts in [1, 2, 3] {
            let mut kv = model.new_kv_cache(4, 8 << 20);
            let mut caches: Vec<SeqCache> = (0..prompts.len()).map(|_| SeqCache::new()).collect();
            let mut outputs = Vec::new();
            // Step 1: the first three prompts (4 + 7 + 10 = 21 tokens). Step 2: the rest
            // (13 + 16 = 29 tokens). Then decode steps over all five.
            let mut next: Vec<Vec<u32>> = prompts.clone();
            for step in 0..6 {
                let chosen: Vec<usize> = match step {
                    0 => vec![0, 1, 2],
                    1 => vec![3, 4],
                    _ => (0..5).collect(),
                };
                let mut chunks: Vec<SeqChunk> = Vec::new();
                let mut picked: Vec<&mut SeqCache> = Vec::new();
                for (i, cache) in caches.iter_mut().enumerate() {
                    if chosen.contains(&i) {
                        picked.push(cache);
                    }
                }
                for (&i, cache) in chosen.iter().zip(picked) {
                    chunks.push(SeqChunk {
                        tokens: &next[i],
                        cache,
                    });
                }
                let out = model
                    .forward_split(
                        &mut kv,
                        &experts,
                        &mut chunks,
                        LogitsFor::EveryToken,
                        true,
                        parts,
                    )
                    .unwrap();
                drop(chunks);
                // Feed each sequence its own greedy token next.
                let mut row = 0;
                let mut fed = Vec::new();
                for &i in &chosen {
                    row += next[i].len();
                    fed.push((i, argmax(out.row(row - 1))));
                }
                for (i, t) in fed {
                    next[i] = vec![t];
                }
                outputs.push((out.logits, out.routing));
            }
            runs.push(outputs);
        }
        for parts in 1..runs.len() {
            for (step, (a, b)) in runs[0].iter().zip(&runs[parts]).enumerate() {
                let same =
                    a.0.iter()
                        .zip(&b.0)
                        .all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(
                    same,
                    "{name}: {} micro-batches, step {step}: logits differ",
                    parts + 1
                );
                assert_eq!(
                    a.1,
                    b.1,
                    "{name}: {} micro-batches, step {step}: routing",
                    parts + 1
                );
            }
        }
    }
}

/// `LogitsFor::Chunks` computes every row of the chunks marked and the last row of the
/// others, the same values as asking for every row of the whole batch.
#[test]
fn logits_for_marked_chunks_are_those_rows_of_every_token() {
    let dir = fixture("mixtral-tiny");
    let (model, ckpt) = Model::load(&dir).unwrap();
    let cfg = model.config().clone();
    let experts = ExpertStore::load(&ckpt, &cfg, &ExpertSelection::All).unwrap();
    let prompts: [&[u32]; 3] = [&[1, 5, 9, 13], &[1, 7], &[1, 2, 3, 4, 5, 6]];
    let run = |logits_for: LogitsFor| {
        let mut kv = model.new_kv_cache(16, 16 << 20);
        let mut seqs: Vec<SeqCache> = prompts.iter().map(|_| SeqCache::new()).collect();
        let mut batch: Vec<SeqChunk> = prompts
            .iter()
            .zip(seqs.iter_mut())
            .map(|(p, cache)| SeqChunk { tokens: p, cache })
            .collect();
        let out = model
            .forward(&mut kv, &experts, &mut batch, logits_for, false)
            .unwrap();
        (0..out.rows)
            .map(|r| out.row(r).to_vec())
            .collect::<Vec<_>>()
    };
    let every = run(LogitsFor::EveryToken);
    let marked = run(LogitsFor::Chunks(vec![true, false, true]));
    // Rows of every token: 0..4, 4..6, 6..12. Marked: all of 0, the last of 1, all of 2.
    let want: Vec<&Vec<f32>> = (0..4).chain([5]).chain(6..12).map(|r| &every[r]).collect();
    assert_eq!(marked.len(), want.len());
    for (got, want) in marked.iter().zip(want) {
        assert!(max_rel_diff(got, want) < 1e-5);
    }
    assert_eq!(
        LogitsFor::Chunks(vec![false, true]).rows(&[3, 0]),
        vec![2],
        "an empty chunk has no row"
    );
}
