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
