//! The serving tokenizer's vocabulary as bytes, for llguidance's token trie.
//!
//! llguidance works on bytes: it needs, for every token id the model can emit, the exact
//! bytes that token stands for, with special tokens set apart by
//! [`TokTrie::SPECIAL_TOKEN_MARKER`]. Hugging Face `tokenizer.json` files spell tokens in one
//! of two ways, told apart by the decoder:
//!
//! - byte-level BPE (GPT-2 style; Qwen, DeepSeek, Llama 3): every byte is written as one
//!   printable character (`Ġ` for a space, `Ċ` for a newline, ...);
//! - SentencePiece style (Mistral/Mixtral, Llama 2): text as is, with `▁` for a space, and
//!   `<0xNN>` tokens for single bytes when the model falls back to bytes.
//!
//! [`token_env`] builds the trie and a [`TokenizerEnv`] whose `tokenize_bytes` runs a patched
//! clone of the tokenizer: no special tokens added or recognised in the text, no space
//! prepended, no truncation. The serving tokenizer itself is never changed.

use std::sync::Arc;

use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use switchyard_engine::tokenizer::Tokenizer;
use tokenizers::pre_tokenizers::metaspace::PrependScheme;
use tokenizers::{DecoderWrapper, ModelWrapper, NormalizerWrapper, PreTokenizerWrapper};

/// Token ids must stay below toktrie's "no token" sentinel (24 bits).
const MAX_VOCAB_SIZE: usize = 0xff_ffff;

#[derive(Debug, thiserror::Error)]
pub enum TokenEnvError {
    #[error(
        "cannot tell how the tokenizer spells tokens as bytes: its decoder ({decoder}) has \
         neither a ByteLevel step (byte-level BPE) nor a ByteFallback, Metaspace or \
         `▁`-to-space Replace step (SentencePiece style)"
    )]
    UnknownDecoder { decoder: String },
    #[error(
        "the tokenizer has token ids up to {}, but the model's vocabulary (logits width) is \
         only {model}",
        tokenizer - 1
    )]
    ModelVocabTooSmall { tokenizer: usize, model: usize },
    #[error("a vocabulary of {vocab_size} tokens is larger than the token trie supports ({max})")]
    VocabTooLarge { vocab_size: usize, max: usize },
    #[error(
        "the tokenizer has no end-of-sequence token (`eos_token` in tokenizer_config.json or \
         `eos_token_id` in generation_config.json); constrained decoding needs one to end \
         the output"
    )]
    NoEosToken,
    #[error("end-of-sequence token id {id} is outside the model's vocabulary of {vocab_size}")]
    EosOutOfRange { id: u32, vocab_size: usize },
    #[error("cannot prepare a copy of the tokenizer for constrained decoding: {message}")]
    PrepareTokenizer { message: String },
    #[error("the token trie rejected the vocabulary: {message}")]
    Trie { message: String },
}

/// A [`TokEnv`] for `tokenizer`, with `vocab_size` tokens: the model's logits width, which
/// may exceed the tokenizer's count; the ids past the tokenizer's get special placeholder
/// tokens that no grammar ever allows. Every id in `tokenizer.eos_token_ids()` ends the
/// output (the first one is `TokRxInfo::tok_eos`).
pub fn token_env(tokenizer: &Tokenizer, vocab_size: usize) -> Result<TokEnv, TokenEnvError> {
    let hf = tokenizer.hf();
    if vocab_size > MAX_VOCAB_SIZE {
        return Err(TokenEnvError::VocabTooLarge {
            vocab_size,
            max: MAX_VOCAB_SIZE,
        });
    }
    let spelling = Spelling::detect(hf)?;

    // Ids may have holes (and added tokens may sit past the model's own vocabulary), so the
    // tokenizer's extent is the largest id, not the number of tokens.
    let tokenizer_ids = hf
        .get_vocab(true)
        .into_values()
        .max()
        .map_or(0, |max| max as usize + 1);
    if tokenizer_ids > vocab_size {
        return Err(TokenEnvError::ModelVocabTooSmall {
            tokenizer: tokenizer_ids,
            model: vocab_size,
        });
    }

    let eos_ids = tokenizer.eos_token_ids();
    let Some(&first_eos) = eos_ids.first() else {
        return Err(TokenEnvError::NoEosToken);
    };
    if let Some(&id) = eos_ids.iter().find(|&&id| id as usize >= vocab_size) {
        return Err(TokenEnvError::EosOutOfRange { id, vocab_size });
    }
    let bos = tokenizer
        .bos_token_id()
        .filter(|&id| (id as usize) < vocab_size);
    let is_marked_special = |id: u32| eos_ids.contains(&id) || bos == Some(id);

    let added = hf.get_added_tokens_decoder();
    let mut token_bytes: Vec<Vec<u8>> = Vec::with_capacity(vocab_size);
    // Added tokens the trie treats as special although the tokenizer does not.
    let mut promoted = Vec::new();
    let mut unspellable = Vec::new();
    for id in 0..tokenizer_ids as u32 {
        let bytes = if let Some(token) = added.get(&id) {
            // Added tokens are matched in the raw text: their content is their text.
            if token.special || looks_like_control(&token.content) || is_marked_special(id) {
                if !token.special {
                    promoted.push(token.clone());
                }
                special_bytes(&token.content)
            } else {
                token.content.as_bytes().to_vec()
            }
        } else if let Some(name) = hf.id_to_token(id) {
            if is_marked_special(id) {
                special_bytes(&name)
            } else {
                match spelling.bytes(&name) {
                    Some(bytes) => bytes,
                    None => {
                        // No bytes: the trie never offers this token.
                        unspellable.push(name);
                        Vec::new()
                    }
                }
            }
        } else {
            placeholder_bytes(id)
        };
        token_bytes.push(bytes);
    }
    if !unspellable.is_empty() {
        tracing::warn!(
            count = unspellable.len(),
            examples = ?&unspellable[..unspellable.len().min(5)],
            "tokens with characters outside the byte-level alphabet; constrained decoding never emits them"
        );
    }
    while token_bytes.len() < vocab_size {
        token_bytes.push(placeholder_bytes(token_bytes.len() as u32));
    }

    let info = TokRxInfo {
        tok_bos: bos,
        ..TokRxInfo::new(vocab_size as u32, first_eos)
    };
    // toktrie checks its own invariants with assertions (e.g. trie size limits); turn a
    // failure into an error rather than a panic of the server.
    let trie =
        std::panic::catch_unwind(|| TokTrie::from(&info, &token_bytes)).map_err(|panic| {
            TokenEnvError::Trie {
                message: panic_message(panic.as_ref()),
            }
        })?;
    // Ids checked above: non-empty, all below `vocab_size`.
    let trie = trie.with_eos_tokens(eos_ids);

    let plain = plain_tokenizer(hf, promoted)?;
    Ok(Arc::new(TrieTokenizerEnv { trie, plain }))
}

/// How the tokenizer spells token bytes in its vocabulary.
#[derive(Debug)]
enum Spelling {
    ByteLevel,
    SentencePiece {
        /// The character that stands for a space (`▁`), if any.
        space: Option<char>,
        /// Whether `<0xNN>` tokens are single bytes.
        byte_fallback: bool,
    },
}

#[derive(Default)]
struct DecoderSteps {
    byte_level: bool,
    byte_fallback: bool,
    space: Option<char>,
}

impl DecoderSteps {
    fn scan(&mut self, decoder: &DecoderWrapper) {
        match decoder {
            DecoderWrapper::ByteLevel(_) => self.byte_level = true,
            DecoderWrapper::ByteFallback(_) => self.byte_fallback = true,
            DecoderWrapper::Metaspace(m) => {
                self.space.get_or_insert(m.get_replacement());
            }
            DecoderWrapper::Replace(r) if r.content == " " => {
                // The pattern is private; its serialised form is {"String": "▁"} (or "Regex").
                let pattern = serde_json::to_value(r).ok().and_then(|v| {
                    let mut chars = v.get("pattern")?.get("String")?.as_str()?.chars();
                    match (chars.next(), chars.next()) {
                        (Some(c), None) => Some(c),
                        _ => None,
                    }
                });
                if let Some(c) = pattern {
                    self.space.get_or_insert(c);
                }
            }
            DecoderWrapper::Sequence(seq) => {
                for d in seq.get_decoders() {
                    self.scan(d);
                }
            }
            _ => {}
        }
    }
}

impl Spelling {
    fn detect(hf: &tokenizers::Tokenizer) -> Result<Self, TokenEnvError> {
        let Some(decoder) = hf.get_decoder() else {
            return Err(TokenEnvError::UnknownDecoder {
                decoder: "none".into(),
            });
        };
        let mut steps = DecoderSteps::default();
        steps.scan(decoder);
        let model_byte_fallback =
            matches!(hf.get_model(), ModelWrapper::BPE(bpe) if bpe.byte_fallback);
        if steps.byte_level {
            Ok(Self::ByteLevel)
        } else if steps.byte_fallback || steps.space.is_some() {
            Ok(Self::SentencePiece {
                space: steps.space,
                byte_fallback: steps.byte_fallback || model_byte_fallback,
            })
        } else {
            Err(TokenEnvError::UnknownDecoder {
                decoder: serde_json::to_string(decoder).unwrap_or_else(|_| format!("{decoder:?}")),
            })
        }
    }

    /// The bytes of a model token; `None` when its name cannot be spelled as bytes.
    fn bytes(&self, name: &str) -> Option<Vec<u8>> {
        match self {
            Self::ByteLevel => name.chars().map(byte_level_byte).collect(),
            Self::SentencePiece {
                space,
                byte_fallback,
            } => {
                if *byte_fallback && let Some(byte) = fallback_byte(name) {
                    return Some(vec![byte]);
                }
                Some(match space {
                    Some(c) if *c != ' ' => name.replace(*c, " ").into_bytes(),
                    _ => name.as_bytes().to_vec(),
                })
            }
        }
    }
}

/// The byte a GPT-2 byte-level character stands for. Bytes that are printable and not
/// whitespace (`!`..=`~`, `¡`..=`¬`, `®`..=`ÿ`) are themselves; the other 68 are written
/// as U+0100, U+0101, ... in byte order.
fn byte_level_byte(c: char) -> Option<u8> {
    fn is_self(b: u8) -> bool {
        matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF)
    }
    let code = c as u32;
    if code < 0x100 {
        let b = code as u8;
        return is_self(b).then_some(b);
    }
    let nth = usize::try_from(code - 0x100).ok()?;
    (0..=255u8).filter(|&b| !is_self(b)).nth(nth)
}

/// `<0xNN>` is the SentencePiece byte-fallback token for byte NN.
fn fallback_byte(name: &str) -> Option<u8> {
    let hex = name.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// Added tokens spelled like `<...>` (`<|im_end|>`, `<think>`, `<｜tool▁calls▁begin｜>`)
/// are control tokens even where tokenizer.json does not mark them special: a grammar
/// asks for them by name, never as text.
fn looks_like_control(content: &str) -> bool {
    content.len() > 2 && content.starts_with('<') && content.ends_with('>')
}

fn special_bytes(name: &str) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(name.len() + 1);
    bytes.push(TokTrie::SPECIAL_TOKEN_MARKER);
    bytes.extend_from_slice(name.as_bytes());
    bytes
}

/// A special token for an id the tokenizer does not have, e.g. the padding of the
/// embedding past the tokenizer's vocabulary.
fn placeholder_bytes(id: u32) -> Vec<u8> {
    special_bytes(&format!("<[{id}]>"))
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic without a message".to_string()
    }
}

/// A clone of the serving tokenizer that turns text into tokens exactly, for the middle of
/// an output: no SentencePiece space prepended (Prepend normaliser removed, Metaspace
/// `prepend_scheme` set to never), special tokens not recognised in the text, no
/// truncation or padding.
fn plain_tokenizer(
    hf: &tokenizers::Tokenizer,
    promoted: Vec<tokenizers::AddedToken>,
) -> Result<tokenizers::Tokenizer, TokenEnvError> {
    let prepare = |e: tokenizers::Error| TokenEnvError::PrepareTokenizer {
        message: e.to_string(),
    };
    let mut plain = hf.clone();
    if let Some(normalizer) = plain.get_normalizer().cloned() {
        plain
            .with_normalizer(without_prepend(normalizer))
            .map_err(prepare)?;
    }
    if let Some(pre_tokenizer) = plain.get_pre_tokenizer().cloned() {
        plain.with_pre_tokenizer(Some(never_prepend(pre_tokenizer)));
    }
    plain.with_truncation(None).map_err(prepare)?;
    plain.with_padding(None);
    // Make tokens the trie marks special special here too, so that the next line keeps
    // them out of plain text.
    if !promoted.is_empty() {
        let promoted = promoted.into_iter().map(|mut t| {
            t.special = true;
            t
        });
        plain.add_special_tokens(promoted).map_err(prepare)?;
    }
    plain.set_encode_special_tokens(true);
    Ok(plain)
}

fn without_prepend(normalizer: NormalizerWrapper) -> Option<NormalizerWrapper> {
    match normalizer {
        NormalizerWrapper::Prepend(_) => None,
        NormalizerWrapper::Sequence(seq) => {
            let kept: Vec<_> = seq
                .as_ref()
                .iter()
                .filter_map(|n| without_prepend(n.clone()))
                .collect();
            (!kept.is_empty())
                .then(|| NormalizerWrapper::Sequence(tokenizers::normalizers::Sequence::new(kept)))
        }
        other => Some(other),
    }
}

fn never_prepend(pre_tokenizer: PreTokenizerWrapper) -> PreTokenizerWrapper {
    match pre_tokenizer {
        PreTokenizerWrapper::Metaspace(mut m) => {
            m.set_prepend_scheme(PrependScheme::Never);
            PreTokenizerWrapper::Metaspace(m)
        }
        PreTokenizerWrapper::Sequence(seq) => {
            PreTokenizerWrapper::Sequence(tokenizers::pre_tokenizers::sequence::Sequence::new(
                seq.as_ref()
                    .iter()
                    .map(|p| never_prepend(p.clone()))
                    .collect(),
            ))
        }
        other => other,
    }
}

struct TrieTokenizerEnv {
    trie: TokTrie,
    /// See [`plain_tokenizer`].
    plain: tokenizers::Tokenizer,
}

impl TrieTokenizerEnv {
    /// Canonical tokens of `text` without special tokens. Should the tokenizer fail, or give
    /// a token the trie has no plain bytes for (e.g. `<unk>` for a character without byte
    /// fallback), falls back to the trie's greedy tokenisation, which is exact but not
    /// canonical.
    fn encode_plain(&self, text: &str) -> Vec<TokenId> {
        match self.plain.encode_fast(text, false) {
            Ok(encoding) => {
                let ids = encoding.get_ids();
                if ids.iter().all(|&id| {
                    (id as usize) < self.trie.vocab_size() && !self.trie.is_special_token(id)
                }) {
                    return ids.to_vec();
                }
                tracing::debug!(
                    text,
                    "tokenizer gave special or unknown tokens for plain text; tokenising greedily"
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, "tokenizer failed on grammar text; tokenising greedily");
            }
        }
        self.trie.greedy_tokenize(text.as_bytes())
    }
}

impl TokenizerEnv for TrieTokenizerEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    /// Tokens whose bytes are exactly `s`, without special tokens and without a prepended
    /// space; invalid UTF-8 goes through the trie greedily.
    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie
            .tokenize_with_greedy_fallback(s, |text| self.encode_plain(text))
    }

    /// As `tokenize_bytes`, but `<name>` for a special token of the trie is that token.
    fn tokenize_bytes_special(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |text| {
            self.trie
                .tokenize_with_special(text, |plain| self.encode_plain(plain))
        })
    }

    // `tokenize_is_canonical` keeps its default (true): `tokenize_bytes` is the tokenizer's
    // own BPE, so llguidance may force tokens. `eos_token` and `tokenize_bytes_marker`
    // keep their defaults, which read the trie.
}

#[cfg(test)]
#[path = "tokens_tests.rs"]
mod tests;
