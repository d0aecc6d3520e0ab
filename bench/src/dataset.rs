//! The requests a run sends: random prompts of chosen lengths, or prompts from a
//! ShareGPT-format file, with the correctness probe's repeats mixed in.

use std::path::Path;

use rand::Rng;
use rand::seq::SliceRandom;
use serde_json::Value;

use crate::error::Error;

/// Random token ids start here: 0..3 are unknown/BOS/EOS in most vocabularies, and a
/// prompt full of EOS would measure nothing.
pub const FIRST_RANDOM_TOKEN: u32 = 3;

#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Token ids, sent as an array `prompt` (completions only).
    Tokens(Vec<u32>),
    Text(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct SampleRequest {
    pub prompt: Prompt,
    /// Prompt length as the dataset sees it (tokens, or an estimate for text); the
    /// server's `usage` replaces it when present.
    pub prompt_len: usize,
    /// `max_tokens` of the request.
    pub output_len: usize,
    /// One of the correctness probe's repeats.
    pub probe: bool,
}

/// Uniform in `[floor(len*(1-ratio)), ceil(len*(1+ratio))]`, at least 1, as vLLM draws.
fn length(rng: &mut impl Rng, len: usize, ratio: f64) -> usize {
    let lo = ((len as f64 * (1.0 - ratio)).floor() as usize).max(1);
    let hi = ((len as f64 * (1.0 + ratio)).ceil() as usize).max(lo);
    rng.random_range(lo..=hi)
}

/// Common English words: a chat prompt of N of them is roughly N tokens for most
/// tokenizers, and the server's `usage` gives the exact count.
const WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by",
    "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an",
    "had", "they", "you", "were", "their", "one", "all", "we", "can", "her", "has", "there",
    "been", "if", "more", "when", "will", "would", "who", "so", "no", "model", "expert", "token",
    "route", "layer", "train", "river", "stone", "light", "music", "garden", "number", "water",
    "city",
];

/// `n` random requests. Completions get token-id prompts of exactly the drawn length;
/// chat gets that many random words.
pub fn random(
    rng: &mut impl Rng,
    n: usize,
    input_len: usize,
    output_len: usize,
    ratio: f64,
    vocab: u32,
    chat: bool,
) -> Vec<SampleRequest> {
    (0..n)
        .map(|_| {
            let prompt_len = length(rng, input_len, ratio);
            let output_len = length(rng, output_len, ratio);
            let prompt = if chat {
                let words: Vec<&str> = (0..prompt_len)
                    .map(|_| WORDS[rng.random_range(0..WORDS.len())])
                    .collect();
                Prompt::Text(words.join(" "))
            } else {
                Prompt::Tokens(
                    (0..prompt_len)
                        .map(|_| rng.random_range(FIRST_RANDOM_TOKEN..vocab))
                        .collect(),
                )
            };
            SampleRequest {
                prompt,
                prompt_len,
                output_len,
                probe: false,
            }
        })
        .collect()
}

/// vLLM's `prefix_repetition` dataset: a few random prefixes, every request one of them
/// (evenly, in shuffled order) and a random suffix.
#[derive(Debug, Clone, Copy)]
pub struct Repetition {
    pub prefix_len: usize,
    pub suffix_len: usize,
    pub num_prefixes: usize,
    pub output_len: usize,
}

/// `n` requests of [`Repetition`]; completions get token ids, chat that many words.
pub fn prefix_repetition(
    rng: &mut impl Rng,
    n: usize,
    r: Repetition,
    vocab: u32,
    chat: bool,
) -> Vec<SampleRequest> {
    let mut draw = |len: usize| -> Vec<u32> {
        (0..len)
            .map(|_| {
                if chat {
                    rng.random_range(0..WORDS.len() as u32)
                } else {
                    rng.random_range(FIRST_RANDOM_TOKEN..vocab)
                }
            })
            .collect()
    };
    let prefixes: Vec<Vec<u32>> = (0..r.num_prefixes.max(1))
        .map(|_| draw(r.prefix_len))
        .collect();
    let mut requests: Vec<SampleRequest> = (0..n)
        .map(|i| {
            let mut ids = prefixes[i % prefixes.len()].clone();
            ids.extend(draw(r.suffix_len));
            let prompt = if chat {
                let words: Vec<&str> = ids.iter().map(|&w| WORDS[w as usize]).collect();
                Prompt::Text(words.join(" "))
            } else {
                Prompt::Tokens(ids)
            };
            SampleRequest {
                prompt,
                prompt_len: r.prefix_len + r.suffix_len,
                output_len: r.output_len,
                probe: false,
            }
        })
        .collect();
    requests.shuffle(rng);
    requests
}

/// Tokens in a text, estimated without a tokenizer (about four characters a token for
/// English with BPE vocabularies).
pub fn estimate_tokens(text: &str) -> usize {
    text.chars().count().div_ceil(4).max(1)
}

/// (prompt, reply) pairs of a ShareGPT file: the first human turn and the gpt turn
/// after it, for every conversation that has both.
pub fn parse_sharegpt(json: &str) -> Result<Vec<(String, String)>, String> {
    let v: Value = serde_json::from_str(json).map_err(|e| format!("not JSON: {e}"))?;
    let entries = v
        .as_array()
        .ok_or("expected a list of {\"conversations\": [...]}")?;
    let mut pairs = Vec::new();
    for entry in entries {
        let Some(turns) = entry.get("conversations").and_then(Value::as_array) else {
            continue;
        };
        let turn = |t: &Value| {
            Some((
                t.get("from")?.as_str()?.to_owned(),
                t.get("value")?.as_str()?.to_owned(),
            ))
        };
        let turns: Vec<(String, String)> = turns.iter().filter_map(turn).collect();
        let Some(h) = turns.iter().position(|(from, _)| from == "human") else {
            continue;
        };
        if let Some((_, reply)) = turns[h + 1..].iter().find(|(from, _)| from == "gpt") {
            pairs.push((turns[h].1.clone(), reply.clone()));
        }
    }
    Ok(pairs)
}

/// `n` requests from a ShareGPT file: shuffled with the seed, filtered by vLLM's
/// length rules (on estimated lengths), repeated in order if the file has fewer.
pub fn sharegpt(
    rng: &mut impl Rng,
    path: &Path,
    n: usize,
    output_len: Option<usize>,
) -> Result<Vec<SampleRequest>, Error> {
    let fail = |message: String| Error::Dataset {
        path: path.to_owned(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let mut pairs = parse_sharegpt(&text).map_err(fail)?;
    pairs.shuffle(rng);
    let usable: Vec<SampleRequest> = pairs
        .into_iter()
        .filter_map(|(prompt, reply)| {
            let prompt_len = estimate_tokens(&prompt);
            let out = output_len.unwrap_or_else(|| estimate_tokens(&reply));
            // vLLM drops very short and very long conversations (unless the output
            // length is fixed, when only the prompt is checked).
            let too_short = prompt_len < 4 || (output_len.is_none() && out < 4);
            let too_long = prompt_len > 1024 || (output_len.is_none() && prompt_len + out > 2048);
            (!too_short && !too_long && !prompt.is_empty()).then(|| SampleRequest {
                prompt: Prompt::Text(prompt),
                prompt_len,
                output_len: out.max(1),
                probe: false,
            })
        })
        .collect();
    if usable.is_empty() {
        return Err(fail(
            "no conversation with a human turn followed by a gpt turn of usable length".into(),
        ));
    }
    Ok(usable.iter().cycle().take(n).cloned().collect())
}

/// Turns `round(n * fraction)` requests (at least 2 when the fraction is positive, so
/// there is something to compare) into repeats of one of them, marked as probes.
pub fn add_probes(rng: &mut impl Rng, requests: &mut [SampleRequest], fraction: f64) {
    if fraction <= 0.0 || requests.is_empty() {
        return;
    }
    let n = requests.len();
    let k = ((n as f64 * fraction).round() as usize).clamp(2.min(n), n);
    let mut picked = rand::seq::index::sample(rng, n, k).into_vec();
    picked.sort_unstable();
    let mut template = requests[picked[0]].clone();
    template.probe = true;
    for i in picked {
        requests[i] = template.clone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn prefix_repetition_spreads_requests_evenly_over_shared_prefixes() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let r = Repetition {
            prefix_len: 16,
            suffix_len: 4,
            num_prefixes: 3,
            output_len: 7,
        };
        let reqs = prefix_repetition(&mut rng, 12, r, 1000, false);
        let mut by_prefix: std::collections::HashMap<Vec<u32>, usize> = Default::default();
        for q in &reqs {
            let Prompt::Tokens(ids) = &q.prompt else {
                panic!("token prompts for completions")
            };
            assert_eq!(ids.len(), 20);
            assert_eq!(q.output_len, 7);
            assert!(ids.iter().all(|&t| (FIRST_RANDOM_TOKEN..1000).contains(&t)));
            *by_prefix.entry(ids[..16].to_vec()).or_default() += 1;
        }
        assert_eq!(by_prefix.len(), 3);
        assert!(by_prefix.values().all(|&c| c == 4), "{by_prefix:?}");
        let chat = prefix_repetition(&mut rng, 2, r, 1000, true);
        assert!(matches!(&chat[0].prompt, Prompt::Text(t) if t.split(' ').count() == 20));
    }

    #[test]
    fn random_lengths_stay_in_range() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let reqs = random(&mut rng, 500, 100, 20, 0.5, 64, false);
        for r in &reqs {
            assert!((50..=150).contains(&r.prompt_len), "{}", r.prompt_len);
            assert!((10..=30).contains(&r.output_len), "{}", r.output_len);
            let Prompt::Tokens(ids) = &r.prompt else {
                panic!("completions prompts are token ids")
            };
            assert_eq!(ids.len(), r.prompt_len);
            assert!(ids.iter().all(|&t| (FIRST_RANDOM_TOKEN..64).contains(&t)));
        }
        // Both ends of the range are reachable.
        assert!(reqs.iter().any(|r| r.prompt_len == 50));
        assert!(reqs.iter().any(|r| r.prompt_len == 150));
        let fixed = random(&mut rng, 10, 32, 16, 0.0, 256, true);
        for r in &fixed {
            assert_eq!((r.prompt_len, r.output_len), (32, 16));
            let Prompt::Text(t) = &r.prompt else {
                panic!("chat prompts are text")
            };
            assert_eq!(t.split(' ').count(), 32);
        }
    }

    #[test]
    fn sharegpt_takes_first_human_turn_and_following_reply() {
        let json = r#"[
            {"conversations": [
                {"from": "system", "value": "be nice"},
                {"from": "human", "value": "What is a mixture of experts model?"},
                {"from": "gpt", "value": "A model whose feed-forward layers are split into experts."},
                {"from": "human", "value": "ignored"}
            ]},
            {"conversations": [{"from": "human", "value": "no reply"}]},
            {"id": "no conversations"}
        ]"#;
        let pairs = parse_sharegpt(json).expect("parses");
        assert_eq!(
            pairs,
            vec![(
                "What is a mixture of experts model?".to_owned(),
                "A model whose feed-forward layers are split into experts.".to_owned()
            )]
        );
        assert!(parse_sharegpt("{}").is_err());

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sg.json");
        std::fs::write(&path, json).expect("write");
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let reqs = sharegpt(&mut rng, &path, 3, None).expect("loads");
        assert_eq!(reqs.len(), 3, "repeated to the requested count");
        assert_eq!(reqs[0].output_len, estimate_tokens(&pairs[0].1));
        assert_eq!(
            reqs[0].prompt,
            Prompt::Text("What is a mixture of experts model?".into())
        );
        let fixed = sharegpt(&mut rng, &path, 1, Some(7)).expect("loads");
        assert_eq!(fixed[0].output_len, 7);
    }

    #[test]
    fn probes_repeat_one_request() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut reqs = random(&mut rng, 50, 8, 8, 0.5, 100, false);
        add_probes(&mut rng, &mut reqs, 0.2);
        let probes: Vec<&SampleRequest> = reqs.iter().filter(|r| r.probe).collect();
        assert_eq!(probes.len(), 10);
        assert!(probes.iter().all(|p| *p == probes[0]));
        let mut one = random(&mut rng, 50, 8, 8, 0.5, 100, false);
        add_probes(&mut rng, &mut one, 0.01);
        assert_eq!(one.iter().filter(|r| r.probe).count(), 2);
    }
}
