//! Tests of `tokens`: both spellings of tokens, on the fixtures and on SentencePiece
//! tokenizers built here, and llguidance driven through the trie.

use std::path::{Path, PathBuf};

use llguidance::api::{StopReason, TopLevelGrammar};
use llguidance::{Matcher, ParserFactory};
use serde_json::json;

use super::*;

/// Texts covering ASCII, runs of spaces, newlines and tabs, accents, CJK and emoji
/// (4-byte UTF-8, and a ZWJ sequence).
const TEXTS: &[&str] = &[
    "hello world",
    "Hello, World! 123",
    "  two leading spaces and trailing  ",
    "line one\nline two\n\n\tindented",
    "café naïve résumé Ærøskøbing",
    "中文字符和日本語のテキスト",
    "emoji 😀 and family 👨‍👩‍👧 and flag 🇫🇷",
    "{\"a\": 1, \"b\": [true, null]}",
];

/// Special token names as plain text: the serving tokenizer reads them as special
/// tokens, `tokenize_bytes` must not.
const SPECIAL_NAMES_TEXT: &str = "</s> is not special in plain text <s>";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

/// The model's vocabulary size, from its config.json.
fn config_vocab_size(dir: &Path) -> usize {
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let config: serde_json::Value = serde_json::from_str(&text).unwrap();
    config["vocab_size"].as_u64().unwrap() as usize
}

fn load(dir: &Path) -> (Tokenizer, TokEnv) {
    let tok = Tokenizer::from_dir(dir).unwrap();
    let env = token_env(&tok, config_vocab_size(dir)).unwrap();
    (tok, env)
}

/// The tokens' bytes, asserting that none is special.
fn plain_bytes(env: &TokEnv, ids: &[u32]) -> Vec<u8> {
    let trie = env.tok_trie();
    for &id in ids {
        assert!(
            !trie.is_special_token(id),
            "token {id} ({}) is special",
            trie.token_dbg(id)
        );
    }
    ids.iter().flat_map(|&id| trie.token(id).to_vec()).collect()
}

const BYTE_LEVEL_FIXTURES: &[&str] = &["qwen3-moe-tiny", "deepseek-v3-tiny", "mixtral-tiny"];

#[test]
fn byte_level_fixtures_use_byte_level_spelling() {
    for name in BYTE_LEVEL_FIXTURES {
        let tok = Tokenizer::from_dir(&fixture(name)).unwrap();
        assert!(
            matches!(Spelling::detect(tok.hf()).unwrap(), Spelling::ByteLevel),
            "{name}"
        );
    }
}

#[test]
fn byte_level_encode_spells_the_text() {
    for name in BYTE_LEVEL_FIXTURES {
        let (tok, env) = load(&fixture(name));
        for text in TEXTS {
            let ids = tok.encode(text, false).unwrap();
            assert_eq!(
                String::from_utf8_lossy(&plain_bytes(&env, &ids)),
                *text,
                "{name}"
            );
        }
    }
}

#[test]
fn byte_level_tokenize_bytes_round_trips() {
    let (tok, env) = load(&fixture("qwen3-moe-tiny"));
    for text in TEXTS {
        let ids = env.tokenize_bytes(text.as_bytes());
        assert_eq!(plain_bytes(&env, &ids), text.as_bytes(), "{text:?}");
        // The tokenizer's own (canonical) tokens.
        assert_eq!(ids, tok.encode(text, false).unwrap(), "{text:?}");
    }
    let ids = env.tokenize_bytes(SPECIAL_NAMES_TEXT.as_bytes());
    assert_eq!(plain_bytes(&env, &ids), SPECIAL_NAMES_TEXT.as_bytes());
    // Invalid UTF-8 (half an emoji) goes through the trie.
    let bytes = &"x😀".as_bytes()[..3];
    let ids = env.tokenize_bytes(bytes);
    assert_eq!(plain_bytes(&env, &ids), bytes);
}

#[test]
fn special_tokens_and_vocab_size() {
    for name in BYTE_LEVEL_FIXTURES {
        let dir = fixture(name);
        let (tok, env) = load(&dir);
        let trie = env.tok_trie();
        assert_eq!(trie.vocab_size(), config_vocab_size(&dir), "{name}");
        let eos = tok.eos_token_ids()[0];
        let bos = tok.bos_token_id().unwrap();
        assert!(trie.is_special_token(eos) && trie.is_special_token(bos));
        assert_eq!(trie.get_special_token("</s>"), Some(eos));
        assert_eq!(trie.get_special_token("<s>"), Some(bos));
        assert_eq!(trie.eos_token(), eos);
        assert_eq!(env.eos_token(), eos);
        assert_eq!(trie.eos_tokens(), tok.eos_token_ids());
        assert!(trie.is_special_token(0), "<unk> is special");
        // `<name>` is the special token only where asked for.
        assert_eq!(
            env.tokenize_special("a</s>"),
            vec![env.tokenize("a")[0], eos]
        );
        let ids = env.tokenize("a</s>");
        assert_eq!(plain_bytes(&env, &ids), b"a</s>");
    }
}

#[test]
fn pads_to_the_model_vocab_and_rejects_a_smaller_one() {
    let tok = Tokenizer::from_dir(&fixture("qwen3-moe-tiny")).unwrap();
    let n = tok.vocab_size();
    let env = token_env(&tok, n + 40).unwrap();
    let trie = env.tok_trie();
    assert_eq!(trie.vocab_size(), n + 40);
    for id in n..n + 40 {
        assert!(trie.is_special_token(id as u32), "{id}");
    }
    assert_eq!(trie.token(n as u32), special_bytes(&format!("<[{n}]>")));
    assert!(!trie.is_special_token(n as u32 - 1));

    let err = token_env(&tok, n - 1).err().expect("an error");
    assert!(
        matches!(err, TokenEnvError::ModelVocabTooSmall { tokenizer, model } if tokenizer == n && model == n - 1),
        "{err}"
    );
}

/// Copies a fixture's tokenizer into a temporary folder, with other configs.
fn tokenizer_dir(
    tokenizer_json: &serde_json::Value,
    tokenizer_config: serde_json::Value,
    generation_config: Option<serde_json::Value>,
    vocab_size: usize,
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, v: &serde_json::Value| {
        std::fs::write(dir.path().join(name), serde_json::to_vec(v).unwrap()).unwrap()
    };
    write("tokenizer.json", tokenizer_json);
    write("tokenizer_config.json", &tokenizer_config);
    if let Some(g) = generation_config {
        write("generation_config.json", &g);
    }
    write("config.json", &json!({ "vocab_size": vocab_size }));
    dir
}

fn fixture_tokenizer_json() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture("qwen3-moe-tiny").join("tokenizer.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn several_eos_tokens() {
    let dir = tokenizer_dir(
        &fixture_tokenizer_json(),
        json!({ "eos_token": "</s>", "bos_token": "<s>" }),
        Some(json!({ "eos_token_id": [2, 0] })),
        512,
    );
    let (tok, env) = load(dir.path());
    assert_eq!(tok.eos_token_ids(), &[2, 0]);
    let trie = env.tok_trie();
    assert_eq!(trie.eos_token(), 2);
    assert_eq!(trie.eos_tokens(), &[2, 0]);
    let set = trie.eos_token_set();
    assert!(set.is_allowed(2) && set.is_allowed(0) && !set.is_allowed(1));
}

#[test]
fn control_like_added_tokens_are_special_but_not_in_plain_text() {
    // As Qwen's `<think>`: an added token not marked special.
    let mut json = fixture_tokenizer_json();
    json["added_tokens"].as_array_mut().unwrap().push(
        json!({ "id": 512, "content": "<think>", "single_word": false,
                      "lstrip": false, "rstrip": false, "normalized": false,
                      "special": false }),
    );
    let dir = tokenizer_dir(&json, json!({ "eos_token": "</s>" }), None, 520);
    let (tok, env) = load(dir.path());
    // The serving tokenizer reads it from text, and was left that way.
    assert_eq!(tok.encode("<think>", false).unwrap(), vec![512]);
    let trie = env.tok_trie();
    assert!(trie.is_special_token(512));
    assert_eq!(trie.get_special_token("<think>"), Some(512));
    let text = "a<think>b";
    let ids = env.tokenize(text);
    assert_eq!(plain_bytes(&env, &ids), text.as_bytes());
    assert!(env.tokenize_special(text).contains(&512));
    assert_eq!(tok.encode("<think>", false).unwrap(), vec![512]);
}

#[test]
fn errors_instead_of_panics() {
    let mut no_decoder = fixture_tokenizer_json();
    no_decoder["decoder"] = serde_json::Value::Null;
    let dir = tokenizer_dir(&no_decoder, json!({ "eos_token": "</s>" }), None, 512);
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    let err = token_env(&tok, 512).err().expect("an error");
    assert!(matches!(err, TokenEnvError::UnknownDecoder { .. }), "{err}");

    let dir = tokenizer_dir(&fixture_tokenizer_json(), json!({}), None, 512);
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    let err = token_env(&tok, 512).err().expect("an error");
    assert!(matches!(err, TokenEnvError::NoEosToken), "{err}");
    assert!(err.to_string().contains("end-of-sequence"));

    let tok = Tokenizer::from_dir(&fixture("qwen3-moe-tiny")).unwrap();
    let err = token_env(&tok, MAX_VOCAB_SIZE + 1).err().expect("an error");
    assert!(matches!(err, TokenEnvError::VocabTooLarge { .. }), "{err}");
}

#[test]
fn byte_level_alphabet() {
    assert_eq!(byte_level_byte('Ġ'), Some(b' '));
    assert_eq!(byte_level_byte('Ċ'), Some(b'\n'));
    assert_eq!(byte_level_byte('ĉ'), Some(b'\t'));
    assert_eq!(byte_level_byte('Ā'), Some(0));
    assert_eq!(byte_level_byte('a'), Some(b'a'));
    assert_eq!(byte_level_byte('é'), Some(0xE9));
    assert_eq!(byte_level_byte(' '), None);
    assert_eq!(byte_level_byte('中'), None);
    // The 256 characters stand for 256 different bytes.
    let mut seen = [false; 256];
    for code in 0..0x200u32 {
        if let Some(b) = char::from_u32(code).and_then(byte_level_byte) {
            assert!(!seen[b as usize], "{code:#x}");
            seen[b as usize] = true;
        }
    }
    assert!(seen.iter().all(|&s| s));
}

/// A SentencePiece-style tokenizer.json (Llama 2 / Mistral layout): `<unk>`, `<s>`,
/// `</s>`, the 256 `<0xNN>` byte tokens, `▁` and printable ASCII as single characters,
/// `é` and `中`, and a few merged words. `legacy` selects the older layout (Prepend +
/// Replace normalisers, as Llama 2 and Mixtral 8x7B) over the newer (a Metaspace
/// pre-tokenizer with `prepend_scheme: first`, as Mistral 7B v0.3).
fn sentencepiece_tokenizer_json(legacy: bool) -> serde_json::Value {
    let mut vocab = serde_json::Map::new();
    let push = |vocab: &mut serde_json::Map<String, serde_json::Value>, t: String| {
        if !vocab.contains_key(&t) {
            let id = vocab.len();
            vocab.insert(t, json!(id));
        }
    };
    for t in ["<unk>", "<s>", "</s>"] {
        push(&mut vocab, t.to_string());
    }
    for b in 0..=255u8 {
        push(&mut vocab, format!("<0x{b:02X}>"));
    }
    push(&mut vocab, "▁".to_string());
    for c in '!'..='~' {
        push(&mut vocab, c.to_string());
    }
    push(&mut vocab, "é".to_string());
    push(&mut vocab, "中".to_string());
    let mut merges = Vec::new();
    for word in [
        "▁hello", "▁world", "{\"", "\":", "▁▁", "▁the", "line", "▁café",
    ] {
        let mut chars = word.chars();
        let mut cur = chars.next().unwrap().to_string();
        for c in chars {
            let merged = format!("{cur}{c}");
            let merge = format!("{cur} {c}");
            if !merges.contains(&merge) {
                merges.push(merge);
            }
            push(&mut vocab, merged.clone());
            cur = merged;
        }
    }
    let added = |id: u32, content: &str| {
        json!({ "id": id, "content": content, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true })
    };
    let (normalizer, pre_tokenizer) = if legacy {
        (
            json!({ "type": "Sequence", "normalizers": [
                { "type": "Prepend", "prepend": "▁" },
                { "type": "Replace", "pattern": { "String": " " }, "content": "▁" }
            ]}),
            serde_json::Value::Null,
        )
    } else {
        (
            serde_json::Value::Null,
            json!({ "type": "Metaspace", "replacement": "▁", "prepend_scheme": "first",
                    "split": false }),
        )
    };
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [added(0, "<unk>"), added(1, "<s>"), added(2, "</s>")],
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{ "SpecialToken": { "id": "<s>", "type_id": 0 } },
                       { "Sequence": { "id": "A", "type_id": 0 } }],
            "pair": [{ "SpecialToken": { "id": "<s>", "type_id": 0 } },
                     { "Sequence": { "id": "A", "type_id": 0 } },
                     { "Sequence": { "id": "B", "type_id": 1 } }],
            "special_tokens": { "<s>": { "id": "<s>", "ids": [1], "tokens": ["<s>"] } }
        },
        "decoder": { "type": "Sequence", "decoders": [
            { "type": "Replace", "pattern": { "String": "▁" }, "content": " " },
            { "type": "ByteFallback" },
            { "type": "Fuse" },
            { "type": "Strip", "content": " ", "start": 1, "stop": 0 }
        ]},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": "<unk>",
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab, "merges": merges
        }
    })
}

/// Model vocabulary of the SentencePiece tests: more than the tokenizer's ~370 tokens.
const SP_MODEL_VOCAB: usize = 384;

fn sentencepiece_dir(legacy: bool) -> tempfile::TempDir {
    tokenizer_dir(
        &sentencepiece_tokenizer_json(legacy),
        json!({ "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>" }),
        None,
        SP_MODEL_VOCAB,
    )
}

#[test]
fn sentencepiece_spelling_and_round_trips() {
    for legacy in [true, false] {
        let dir = sentencepiece_dir(legacy);
        let (tok, env) = load(dir.path());
        assert!(
            matches!(
                Spelling::detect(tok.hf()).unwrap(),
                Spelling::SentencePiece {
                    space: Some('▁'),
                    byte_fallback: true
                }
            ),
            "legacy {legacy}"
        );
        let trie = env.tok_trie();
        assert_eq!(trie.vocab_size(), SP_MODEL_VOCAB);
        assert_eq!(trie.get_special_token("</s>"), Some(2));
        assert_eq!(trie.get_special_token("<s>"), Some(1));
        assert!(trie.is_special_token(SP_MODEL_VOCAB as u32 - 1));
        let byte_token = tok.hf().token_to_id("<0x0A>").unwrap();
        assert_eq!(trie.token(byte_token), b"\n");
        let hello = tok.hf().token_to_id("▁hello").unwrap();
        assert_eq!(trie.token(hello), b" hello");

        let mut used_byte_fallback = false;
        let ids = env.tokenize_bytes(SPECIAL_NAMES_TEXT.as_bytes());
        assert_eq!(plain_bytes(&env, &ids), SPECIAL_NAMES_TEXT.as_bytes());
        for text in TEXTS {
            // The serving tokenizer prepends exactly one space, if any.
            let ids = tok.encode(text, false).unwrap();
            used_byte_fallback |= ids.iter().any(|&id| (3..259).contains(&id));
            // (A Metaspace pre-tokenizer prepends nothing to text that starts with a
            // space already.)
            let spelled = String::from_utf8(plain_bytes(&env, &ids)).unwrap();
            if legacy || !text.starts_with(' ') {
                assert_eq!(spelled, format!(" {text}"), "legacy {legacy}");
            } else {
                assert_eq!(spelled, *text, "legacy {legacy}");
            }
            // `tokenize_bytes` prepends nothing.
            let ids = env.tokenize_bytes(text.as_bytes());
            assert_eq!(
                String::from_utf8_lossy(&plain_bytes(&env, &ids)),
                *text,
                "legacy {legacy}"
            );
        }
        assert!(used_byte_fallback);
        // The serving tokenizer was left alone.
        let ids = tok.encode("hello", false).unwrap();
        assert_eq!(ids, vec![hello]);
        assert_eq!(env.tokenize("hello")[0], tok.hf().token_to_id("h").unwrap());
    }
}

/// Drives llguidance with the env: always the allowed token that makes the most progress
/// (one that closes the object, else the longest that is not only whitespace), until the
/// grammar accepts and allows EOS. Returns the tokens (without EOS) and their text.
fn generate_json(env: &TokEnv, schema: serde_json::Value) -> (Vec<u32>, String) {
    let factory = ParserFactory::new_simple(env).unwrap();
    let grammar = TopLevelGrammar::from_json_schema(schema);
    let mut matcher = Matcher::new(factory.create_parser(grammar));
    assert!(!matcher.is_error(), "{:?}", matcher.get_error());
    let trie = env.tok_trie();
    let eos = trie.eos_token();
    let mut out = Vec::new();
    let finish = |out: Vec<u32>| {
        let text = String::from_utf8(trie.decode(&out)).unwrap();
        (out, text)
    };
    for _ in 0..200 {
        if matcher.is_stopped() {
            // The grammar cannot go on (after the closing `}`): it must have accepted,
            // and now allows only EOS.
            assert_eq!(
                matcher.stop_reason(),
                StopReason::NoExtension,
                "{:?} after {:?}",
                matcher.get_error(),
                trie.tokens_dbg(&out)
            );
            let mask = matcher.compute_mask_or_eos().unwrap();
            assert!(mask.is_allowed(eos) && mask.num_set() == 1);
            return finish(out);
        }
        let mask = matcher.compute_mask().unwrap();
        if mask.is_allowed(eos) && matcher.is_accepting().unwrap() {
            matcher.consume_token(eos).unwrap();
            assert!(matcher.is_stopped());
            return finish(out);
        }
        let best = (0..trie.vocab_size() as u32)
            .filter(|&t| mask.is_allowed(t) && !trie.is_special_token(t))
            .max_by_key(|&t| {
                let bytes = trie.token(t);
                let closes = bytes.contains(&b'}');
                let blank = bytes.iter().all(u8::is_ascii_whitespace);
                (closes, !blank, bytes.len(), std::cmp::Reverse(t))
            })
            .expect("the mask allows some token");
        matcher.consume_token(best).unwrap();
        out.push(best);
    }
    panic!(
        "no end after 200 tokens: {:?}",
        String::from_utf8_lossy(&trie.decode(&out))
    );
}

#[test]
fn llguidance_generates_schema_valid_json() {
    let schema = json!({
        "type": "object",
        "properties": { "a": { "type": "integer" } },
        "required": ["a"],
        "additionalProperties": false
    });
    let sp_legacy = sentencepiece_dir(true);
    let sp_metaspace = sentencepiece_dir(false);
    for dir in [
        fixture("qwen3-moe-tiny"),
        sp_legacy.path().to_path_buf(),
        sp_metaspace.path().to_path_buf(),
    ] {
        let (tok, env) = load(&dir);
        let (ids, text) = generate_json(&env, schema.clone());
        let value: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{text:?} from {}: {e}", dir.display()));
        // JSON Schema's integer: any number with a zero fractional part (`-0` included,
        // which serde_json reads as a float).
        let a = value["a"].as_f64();
        assert!(a.is_some_and(|a| a.fract() == 0.0), "{text:?}");
        assert_eq!(value.as_object().unwrap().len(), 1, "{text:?}");
        // The serving tokenizer reads the same text from the ids.
        assert_eq!(tok.decode(&ids, true).unwrap(), text);
    }
}
