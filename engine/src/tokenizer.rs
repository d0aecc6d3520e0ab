//! Text <-> token ids for Hugging Face Hub checkpoints: `tokenizer.json` through the
//! `tokenizers` crate, the chat template of `tokenizer_config.json` through minijinja, and
//! streaming detokenisation that never splits a UTF-8 character.

use std::path::{Path, PathBuf};

use minijinja::{Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};

/// Name under which the chat template is registered in the minijinja environment.
const CHAT_TEMPLATE_NAME: &str = "chat";

/// How many prompt tokens `IncrementalDecoder::with_prompt` keeps as context; enough for
/// decoders that strip or merge across token boundaries (vLLM uses the same window).
const PROMPT_CONTEXT_TOKENS: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer file {} is missing", path.display())]
    MissingTokenizerJson { path: PathBuf },
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not valid JSON: {source}", path.display())]
    InvalidJson {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{} cannot be loaded as a tokenizer: {message}", path.display())]
    Load { path: PathBuf, message: String },
    #[error("{}: field `{field}` is malformed: {reason}", path.display())]
    InvalidField {
        path: PathBuf,
        field: &'static str,
        reason: String,
    },
    #[error("chat template from {} does not compile: {source:#}", path.display())]
    TemplateCompile {
        path: PathBuf,
        #[source]
        source: minijinja::Error,
    },
    #[error("chat template from {} failed to render: {source:#}", path.display())]
    TemplateRender {
        path: PathBuf,
        #[source]
        source: minijinja::Error,
    },
    #[error("tokenizer in {} has no chat template", dir.display())]
    NoChatTemplate { dir: PathBuf },
    #[error("encoding failed: {message}")]
    Encode { message: String },
    #[error("decoding failed: {message}")]
    Decode { message: String },
}

/// One message as chat templates see it (transformers' shape).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// An assistant's calls: `[{"type": "function", "function": {"name", "arguments"}}]`,
    /// the arguments as an object (templates index into them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    /// A tool's answer: which call it answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            ..Self::default()
        }
    }
}

struct ChatTemplate {
    env: Environment<'static>,
    /// The file the template came from, for error messages.
    source_path: PathBuf,
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    dir: PathBuf,
    bos_token: Option<String>,
    eos_token: Option<String>,
    bos_token_id: Option<u32>,
    eos_token_ids: Vec<u32>,
    chat_template: Option<ChatTemplate>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("dir", &self.dir)
            .field("vocab_size", &self.vocab_size())
            .field("bos_token_id", &self.bos_token_id)
            .field("eos_token_ids", &self.eos_token_ids)
            .field("has_chat_template", &self.has_chat_template())
            .finish()
    }
}

fn read_json_if_present(path: &Path) -> Result<Option<serde_json::Value>, TokenizerError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(TokenizerError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| TokenizerError::InvalidJson {
            path: path.to_path_buf(),
            source,
        })
}

/// Hub configs write special tokens either as a bare string or as an AddedToken object.
fn special_token_text(
    config: &serde_json::Value,
    field: &'static str,
    path: &Path,
) -> Result<Option<String>, TokenizerError> {
    match config.get(field) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(serde_json::Value::Object(obj)) => match obj.get("content") {
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(TokenizerError::InvalidField {
                path: path.to_path_buf(),
                field,
                reason: "object without a string `content`".into(),
            }),
        },
        Some(other) => Err(TokenizerError::InvalidField {
            path: path.to_path_buf(),
            field,
            reason: format!("expected a string or an object, found {other}"),
        }),
    }
}

/// `eos_token_id` in generation_config.json / config.json is an int or a list of ints.
fn token_id_list(
    config: &serde_json::Value,
    field: &'static str,
    path: &Path,
) -> Result<Vec<u32>, TokenizerError> {
    let bad = |reason: String| TokenizerError::InvalidField {
        path: path.to_path_buf(),
        field,
        reason,
    };
    let one = |v: &serde_json::Value| -> Result<u32, TokenizerError> {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| bad(format!("{v} is not a token id")))
    };
    match config.get(field) {
        None | Some(serde_json::Value::Null) => Ok(Vec::new()),
        Some(serde_json::Value::Array(items)) => items.iter().map(one).collect(),
        Some(v) => Ok(vec![one(v)?]),
    }
}

/// The template text: `chat_template.jinja` (what newer writers save) wins over the
/// `chat_template` field, which is either a string or a list of named templates.
fn find_chat_template(
    dir: &Path,
    config: Option<&serde_json::Value>,
    config_path: &Path,
) -> Result<Option<(String, PathBuf)>, TokenizerError> {
    let jinja_path = dir.join("chat_template.jinja");
    match std::fs::read_to_string(&jinja_path) {
        Ok(text) => return Ok(Some((text, jinja_path))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(TokenizerError::Io {
                path: jinja_path,
                source,
            });
        }
    }
    let Some(field) = config.and_then(|c| c.get("chat_template")) else {
        return Ok(None);
    };
    let bad = |reason: &str| TokenizerError::InvalidField {
        path: config_path.to_path_buf(),
        field: "chat_template",
        reason: reason.into(),
    };
    match field {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::String(s) => Ok(Some((s.clone(), config_path.to_path_buf()))),
        serde_json::Value::Array(named) => {
            let mut first = None;
            for entry in named {
                let name = entry.get("name").and_then(|n| n.as_str());
                let template = entry
                    .get("template")
                    .and_then(|t| t.as_str())
                    .ok_or_else(|| bad("list entry without a string `template`"))?;
                if name == Some("default") {
                    return Ok(Some((template.to_owned(), config_path.to_path_buf())));
                }
                first.get_or_insert_with(|| template.to_owned());
            }
            Ok(first.map(|t| (t, config_path.to_path_buf())))
        }
        _ => Err(bad("expected a string or a list of named templates")),
    }
}

fn raise_exception(message: String) -> Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

fn compile_chat_template(source: String, path: PathBuf) -> Result<ChatTemplate, TokenizerError> {
    let mut env = Environment::new();
    // transformers renders with jinja2's trim_blocks/lstrip_blocks; templates rely on it.
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    minijinja_contrib::add_to_environment(&mut env);
    // Hub templates call Python string methods (`.strip()`, `.startswith()`, ...).
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", raise_exception);
    env.add_template_owned(CHAT_TEMPLATE_NAME, source)
        .map_err(|source| TokenizerError::TemplateCompile {
            path: path.clone(),
            source,
        })?;
    Ok(ChatTemplate {
        env,
        source_path: path,
    })
}

fn push_unique(ids: &mut Vec<u32>, id: u32) {
    if !ids.contains(&id) {
        ids.push(id);
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` (required) plus the optional `tokenizer_config.json`,
    /// `chat_template.jinja` and `generation_config.json` of a Hub checkpoint folder.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let tokenizer_path = dir.join("tokenizer.json");
        if !tokenizer_path.is_file() {
            return Err(TokenizerError::MissingTokenizerJson {
                path: tokenizer_path,
            });
        }
        let bytes = std::fs::read(&tokenizer_path).map_err(|source| TokenizerError::Io {
            path: tokenizer_path.clone(),
            source,
        })?;
        // Parse once with serde_json first so that malformed JSON gets its own error.
        serde_json::from_slice::<serde_json::Value>(&bytes).map_err(|source| {
            TokenizerError::InvalidJson {
                path: tokenizer_path.clone(),
                source,
            }
        })?;
        let inner =
            tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| TokenizerError::Load {
                path: tokenizer_path.clone(),
                message: e.to_string(),
            })?;

        let config_path = dir.join("tokenizer_config.json");
        let config = read_json_if_present(&config_path)?;
        let (bos_token, eos_token) = match &config {
            Some(c) => (
                special_token_text(c, "bos_token", &config_path)?,
                special_token_text(c, "eos_token", &config_path)?,
            ),
            None => (None, None),
        };

        let gen_path = dir.join("generation_config.json");
        let gen_config = read_json_if_present(&gen_path)?;

        let mut eos_token_ids = Vec::new();
        if let Some(id) = eos_token.as_deref().and_then(|t| inner.token_to_id(t)) {
            push_unique(&mut eos_token_ids, id);
        }
        if let Some(g) = &gen_config {
            for id in token_id_list(g, "eos_token_id", &gen_path)? {
                push_unique(&mut eos_token_ids, id);
            }
        }

        let bos_from_gen = match &gen_config {
            Some(g) => token_id_list(g, "bos_token_id", &gen_path)?
                .first()
                .copied(),
            None => None,
        };
        let bos_token_id = bos_token
            .as_deref()
            .and_then(|t| inner.token_to_id(t))
            .or(bos_from_gen);

        let chat_template = match find_chat_template(dir, config.as_ref(), &config_path)? {
            Some((source, path)) => Some(compile_chat_template(source, path)?),
            None => None,
        };

        Ok(Self {
            inner,
            dir: dir.to_path_buf(),
            bos_token,
            eos_token,
            bos_token_id,
            eos_token_ids,
            chat_template,
        })
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        // Offsets are never used here, so skip computing them.
        let encoding = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| TokenizerError::Encode {
                message: e.to_string(),
            })?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Decode {
                message: e.to_string(),
            })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
    }

    /// The underlying Hugging Face tokenizer, for adapters that need its vocabulary,
    /// normalizer or decoder (e.g. the token trie of constrained decoding).
    pub fn hf(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        self.apply_chat_template_with_tools(messages, None, add_generation_prompt)
    }

    /// [`Tokenizer::apply_chat_template`] with the request's tools (OpenAI's
    /// `[{"type": "function", "function": {...}}]`) as the template's `tools`.
    pub fn apply_chat_template_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let template =
            self.chat_template
                .as_ref()
                .ok_or_else(|| TokenizerError::NoChatTemplate {
                    dir: self.dir.clone(),
                })?;
        let render_err = |source| TokenizerError::TemplateRender {
            path: template.source_path.clone(),
            source,
        };
        let tmpl = template
            .env
            .get_template(CHAT_TEMPLATE_NAME)
            .map_err(render_err)?;
        tmpl.render(minijinja::context! {
            messages => Value::from_serialize(messages),
            tools => tools.map(Value::from_serialize),
            bos_token => self.bos_token.as_deref().unwrap_or(""),
            eos_token => self.eos_token.as_deref().unwrap_or(""),
            add_generation_prompt => add_generation_prompt,
        })
        .map_err(render_err)
    }

    /// The template already emits BOS, so special tokens are not added a second time.
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, TokenizerError> {
        self.encode_chat_with_tools(messages, None)
    }

    /// [`Tokenizer::encode_chat`] with the request's tools shown to the template.
    pub fn encode_chat_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
    ) -> Result<Vec<u32>, TokenizerError> {
        let text = self.apply_chat_template_with_tools(messages, tools, true)?;
        self.encode(&text, false)
    }
}

/// Streaming detokenisation (the prefix_offset/read_offset method of TGI and vLLM): each
/// step decodes a short window with some already-emitted context and emits only the part
/// past that context, holding text back while it ends in U+FFFD (an incomplete UTF-8
/// sequence from byte-level tokens).
#[derive(Debug, Clone)]
pub struct IncrementalDecoder {
    skip_special_tokens: bool,
    ids: Vec<u32>,
    /// Start of the context window inside `ids`.
    prefix_offset: usize,
    /// Everything before this index in `ids` has been emitted.
    read_offset: usize,
}

impl IncrementalDecoder {
    pub fn new(skip_special_tokens: bool) -> Self {
        Self {
            skip_special_tokens,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// Starts after a prompt that is not to be emitted; its last tokens serve as context
    /// so that decoders which strip a leading space (SentencePiece-style) keep the space
    /// of the first generated word.
    pub fn with_prompt(skip_special_tokens: bool, prompt_ids: &[u32]) -> Self {
        let start = prompt_ids.len().saturating_sub(PROMPT_CONTEXT_TOKENS);
        let ids = prompt_ids[start..].to_vec();
        let read_offset = ids.len();
        Self {
            skip_special_tokens,
            ids,
            prefix_offset: 0,
            read_offset,
        }
    }

    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String, TokenizerError> {
        self.ids.push(id);
        let prefix_text = tok.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special_tokens,
        )?;
        let new_text = tok.decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        if new_text.len() <= prefix_text.len() || new_text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let Some(fresh) = new_suffix(&new_text, &prefix_text) else {
            return Ok(String::new());
        };
        let fresh = fresh.to_owned();
        self.advance();
        Ok(fresh)
    }

    pub fn finish(&mut self, tok: &Tokenizer) -> Result<String, TokenizerError> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let prefix_text = tok.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special_tokens,
        )?;
        let new_text = tok.decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        let fresh = new_suffix(&new_text, &prefix_text)
            .unwrap_or_default()
            .to_owned();
        self.advance();
        Ok(fresh)
    }

    /// Moves the window past the emitted text and forgets ids no window will need again,
    /// so that each step costs the same however long the stream gets.
    fn advance(&mut self) {
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        self.ids.drain(..self.prefix_offset);
        self.read_offset -= self.prefix_offset;
        self.prefix_offset = 0;
    }
}

/// The text of `new_text` past `prefix_text`; byte-level decoding extends the prefix, and
/// for decoders that do not, fall back to the byte position as vLLM does.
fn new_suffix<'a>(new_text: &'a str, prefix_text: &str) -> Option<&'a str> {
    new_text
        .strip_prefix(prefix_text)
        .or_else(|| new_text.get(prefix_text.len()..))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    const FIXTURES: [&str; 2] = ["mixtral-tiny", "mixtral-tiny-bf16"];

    fn fixture_dir(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures")
            .join(name)
    }

    struct Golden {
        json: serde_json::Value,
        tensors: Vec<u8>,
    }

    impl Golden {
        fn load(dir: &Path) -> Self {
            let json =
                serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap())
                    .unwrap();
            let tensors = std::fs::read(dir.join("golden.safetensors")).unwrap();
            Self { json, tensors }
        }

        fn prompts(&self) -> &Vec<serde_json::Value> {
            self.json["prompts"].as_array().unwrap()
        }

        fn ids(&self, name: &str) -> Vec<u32> {
            let st = safetensors::SafeTensors::deserialize(&self.tensors).unwrap();
            let view = st.tensor(name).unwrap();
            assert_eq!(view.dtype(), safetensors::Dtype::I64);
            view.data()
                .chunks_exact(8)
                .map(|b| {
                    let v = i64::from_le_bytes(b.try_into().unwrap());
                    u32::try_from(v).unwrap()
                })
                .collect()
        }
    }

    fn stream(tok: &Tokenizer, ids: &[u32], skip: bool) -> (Vec<String>, String) {
        let mut dec = IncrementalDecoder::new(skip);
        let mut chunks: Vec<String> = ids.iter().map(|&id| dec.push(tok, id).unwrap()).collect();
        chunks.push(dec.finish(tok).unwrap());
        let joined = chunks.concat();
        (chunks, joined)
    }

    #[test]
    fn encode_matches_reference_ids() {
        for name in FIXTURES {
            let dir = fixture_dir(name);
            let tok = Tokenizer::from_dir(&dir).unwrap();
            let golden = Golden::load(&dir);
            for p in golden.prompts() {
                let i = p["index"].as_u64().unwrap();
                let expected = golden.ids(&format!("p{i}.input_ids"));
                assert_eq!(expected.len() as u64, p["num_tokens"].as_u64().unwrap());
                if i == 5 {
                    // Prompt 5's text is only a placeholder in golden.json.
                    continue;
                }
                let ids = tok.encode(p["text"].as_str().unwrap(), true).unwrap();
                assert_eq!(ids, expected, "{name} prompt {i}");
            }
        }
    }

    #[test]
    fn decode_matches_reference_text() {
        for name in FIXTURES {
            let dir = fixture_dir(name);
            let tok = Tokenizer::from_dir(&dir).unwrap();
            let golden = Golden::load(&dir);
            for p in golden.prompts() {
                let i = p["index"].as_u64().unwrap();
                let greedy = golden.ids(&format!("p{i}.greedy_ids"));
                let text = tok.decode(&greedy, false).unwrap();
                assert_eq!(
                    text,
                    p["greedy_text"].as_str().unwrap(),
                    "{name} prompt {i}"
                );
            }
        }
    }

    #[test]
    fn incremental_decode_equals_full_decode() {
        for name in FIXTURES {
            let dir = fixture_dir(name);
            let tok = Tokenizer::from_dir(&dir).unwrap();
            let golden = Golden::load(&dir);
            for p in golden.prompts() {
                let i = p["index"].as_u64().unwrap();
                let mut ids = golden.ids(&format!("p{i}.input_ids"));
                ids.extend(golden.ids(&format!("p{i}.greedy_ids")));
                for skip in [false, true] {
                    let (_, joined) = stream(&tok, &ids, skip);
                    assert_eq!(joined, tok.decode(&ids, skip).unwrap(), "{name} prompt {i}");
                }
            }
        }
    }

    #[test]
    fn incremental_decode_with_prompt_emits_only_new_text() {
        let tok = Tokenizer::from_dir(&fixture_dir("mixtral-tiny")).unwrap();
        let prompt = tok.encode("Hola, ¿qué tal?", true).unwrap();
        let generated = tok.encode(" Muy bien, señor 😀", false).unwrap();
        let mut dec = IncrementalDecoder::with_prompt(true, &prompt);
        let mut out = String::new();
        for &id in &generated {
            out.push_str(&dec.push(&tok, id).unwrap());
        }
        out.push_str(&dec.finish(&tok).unwrap());
        assert_eq!(out, " Muy bien, señor 😀");
    }

    #[test]
    fn streaming_never_splits_characters() {
        let tok = Tokenizer::from_dir(&fixture_dir("mixtral-tiny")).unwrap();
        let fixed = [
            "Hola señor, ¿cómo está? Él comió piña y jamón.",
            "emoji 😀🎉👩‍👩‍👧 mixed with text",
            "中文字符和日本語のテキスト、한국어도",
            "ñ😀中é",
        ];
        let pool: Vec<char> = "abc XYZ019.,!áéíóúñÑü¿¡😀🎉🚀👍中文字符日本語한국€→∑"
            .chars()
            .collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let random: Vec<String> = (0..200)
            .map(|_| {
                let len = rng.random_range(1..40);
                (0..len)
                    .map(|_| pool[rng.random_range(0..pool.len())])
                    .collect()
            })
            .collect();
        for text in fixed
            .iter()
            .copied()
            .chain(random.iter().map(String::as_str))
        {
            let ids = tok.encode(text, false).unwrap();
            let (chunks, joined) = stream(&tok, &ids, false);
            for chunk in &chunks {
                assert!(!chunk.contains('\u{FFFD}'), "{text:?} chunk {chunk:?}");
            }
            assert_eq!(joined, text);
        }
    }

    #[test]
    fn chat_template_renders_mixtral_format() {
        for name in FIXTURES {
            let tok = Tokenizer::from_dir(&fixture_dir(name)).unwrap();
            assert!(tok.has_chat_template());
            let messages = [ChatMessage::new("user", "hi")];
            let text = tok.apply_chat_template(&messages, true).unwrap();
            assert_eq!(text, "<s>[INST] hi [/INST]");
            let ids = tok.encode_chat(&messages).unwrap();
            let bos = tok.bos_token_id().unwrap();
            assert_eq!(bos, 1);
            assert_eq!(ids[0], bos);
            assert_eq!(ids.iter().filter(|&&id| id == bos).count(), 1);

            let convo = [
                ChatMessage::new("user", "hi"),
                ChatMessage::new("assistant", "hello"),
                ChatMessage::new("user", "bye"),
            ];
            assert_eq!(
                tok.apply_chat_template(&convo, true).unwrap(),
                "<s>[INST] hi [/INST]hello</s>[INST] bye [/INST]"
            );
        }
    }

    #[test]
    fn special_token_ids_and_vocab() {
        let tok = Tokenizer::from_dir(&fixture_dir("mixtral-tiny")).unwrap();
        assert_eq!(tok.vocab_size(), 512);
        assert_eq!(tok.eos_token_ids(), &[2]);
        assert_eq!(tok.bos_token_id(), Some(1));
    }

    /// A folder with the fixture's tokenizer.json and the given extra files.
    fn temp_tokenizer_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::copy(
            fixture_dir("mixtral-tiny").join("tokenizer.json"),
            tmp.path().join("tokenizer.json"),
        )
        .unwrap();
        for (name, content) in files {
            std::fs::write(tmp.path().join(name), content).unwrap();
        }
        tmp
    }

    /// Tools and a tool-call round trip reach the template in transformers' shape: the
    /// tools list, an assistant's calls with their arguments as an object, a tool's
    /// answer with its call id.
    #[test]
    fn templates_see_tools_and_tool_messages() {
        let template = "{% if tools %}<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>{% endif %}\
            {% for m in messages %}<{{ m.role }}>{{ m.content }}\
            {% for c in m.tool_calls or [] %}[{{ c.function.name }}:{{ c.function.arguments.city }}]{% endfor %}\
            {% if m.tool_call_id %}#{{ m.tool_call_id }}{% endif %}{% endfor %}";
        let tmp = temp_tokenizer_dir(&[("chat_template.jinja", template)]);
        let tok = Tokenizer::from_dir(tmp.path()).unwrap();
        let tools = serde_json::json!([
            {"type": "function", "function": {"name": "weather"}},
            {"type": "function", "function": {"name": "time"}},
        ]);
        let messages = [
            ChatMessage::new("user", "Oslo?"),
            ChatMessage {
                tool_calls: Some(serde_json::json!([{"type": "function", "id": "c1",
                    "function": {"name": "weather", "arguments": {"city": "Oslo"}}}])),
                ..ChatMessage::new("assistant", "")
            },
            ChatMessage {
                tool_call_id: Some("c1".into()),
                ..ChatMessage::new("tool", "sunny")
            },
        ];
        assert_eq!(
            tok.apply_chat_template_with_tools(&messages, Some(&tools), false)
                .unwrap(),
            "<tools>weather;time;</tools><user>Oslo?<assistant>[weather:Oslo]<tool>sunny#c1"
        );
        assert_eq!(
            tok.apply_chat_template(&messages[..1], false).unwrap(),
            "<user>Oslo?",
            "no tools: the template's `tools` is undefined"
        );
    }

    #[test]
    fn eos_tokens_are_a_deduplicated_union() {
        let tmp = temp_tokenizer_dir(&[
            (
                "tokenizer_config.json",
                r#"{"bos_token": {"content": "<s>", "lstrip": false}, "eos_token": {"content": "</s>"}}"#,
            ),
            ("generation_config.json", r#"{"eos_token_id": [2, 0, 2]}"#),
        ]);
        let tok = Tokenizer::from_dir(tmp.path()).unwrap();
        assert_eq!(tok.eos_token_ids(), &[2, 0]);
        assert_eq!(tok.bos_token_id(), Some(1));
        assert!(!tok.has_chat_template());
        let err = tok
            .apply_chat_template(&[ChatMessage::new("user", "hi")], true)
            .unwrap_err();
        assert!(
            matches!(err, TokenizerError::NoChatTemplate { .. }),
            "{err}"
        );
    }

    #[test]
    fn missing_tokenizer_json_names_the_path() {
        let tmp = tempfile::tempdir().unwrap();
        let err = Tokenizer::from_dir(tmp.path()).unwrap_err();
        assert!(
            matches!(err, TokenizerError::MissingTokenizerJson { .. }),
            "{err}"
        );
        let expected = tmp.path().join("tokenizer.json");
        assert!(err.to_string().contains(&expected.display().to_string()));
    }

    #[test]
    fn invalid_config_json_is_reported() {
        let tmp = temp_tokenizer_dir(&[("tokenizer_config.json", "{not json")]);
        let err = Tokenizer::from_dir(tmp.path()).unwrap_err();
        assert!(matches!(err, TokenizerError::InvalidJson { .. }), "{err}");
        assert!(err.to_string().contains("tokenizer_config.json"));
    }

    #[test]
    fn raise_exception_surfaces_as_error() {
        let template = r#"{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}{{ bos_token }}{% for m in messages %}{{ m['content'].strip() }}{% endfor %}"#;
        let config = serde_json::json!({
            "bos_token": "<s>",
            "eos_token": "</s>",
            "chat_template": template,
        });
        let tmp = temp_tokenizer_dir(&[("tokenizer_config.json", &config.to_string())]);
        let tok = Tokenizer::from_dir(tmp.path()).unwrap();
        // Python string methods work through pycompat.
        assert_eq!(
            tok.apply_chat_template(&[ChatMessage::new("user", "  hi  ")], false)
                .unwrap(),
            "<s>hi"
        );
        let err = tok
            .apply_chat_template(&[ChatMessage::new("assistant", "x")], false)
            .unwrap_err();
        assert!(
            matches!(err, TokenizerError::TemplateRender { .. }),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("Conversation roles must alternate user/assistant"),
            "{err}"
        );
    }

    #[test]
    fn broken_template_fails_at_load() {
        let config = serde_json::json!({ "chat_template": "{% for m in messages %}" });
        let tmp = temp_tokenizer_dir(&[("tokenizer_config.json", &config.to_string())]);
        let err = Tokenizer::from_dir(tmp.path()).unwrap_err();
        assert!(
            matches!(err, TokenizerError::TemplateCompile { .. }),
            "{err}"
        );
    }
}
