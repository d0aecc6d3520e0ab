//! Logprobs in the response shapes OpenAI's clients read: the legacy completions object
//! (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`; what lm-evaluation-harness
//! scores with) and chat's `content: [{token, logprob, bytes, top_logprobs}]`.
//!
//! The values are the log-softmax of the model's own logits, before any penalty,
//! temperature or top-k/top-p (vLLM's default). A token's text is its own decoding, as
//! vLLM reports it.

use serde_json::{Map, Value, json};
use switchyard_engine::sampling::TokenLogprobs;
use switchyard_engine::tokenizer::Tokenizer;

/// JSON has no -inf: a token the model rules out entirely is reported at vLLM's floor.
const FLOOR: f32 = -9999.0;

fn finite(lp: f32) -> f32 {
    if lp.is_nan() { FLOOR } else { lp.max(FLOOR) }
}

fn text_of(tokenizer: &Tokenizer, id: u32) -> String {
    tokenizer.decode(&[id], false).unwrap_or_default()
}

/// Logprobs of the tokens of one choice, gathered as they come and rendered either all at
/// once or chunk by chunk (streaming: each [`LogprobsWriter::take`] returns what came
/// since the last one; text offsets keep counting).
pub struct LogprobsWriter {
    chat: bool,
    /// Where the next token's text starts in the choice's text (legacy shape).
    offset: usize,
    tokens: Vec<String>,
    token_logprobs: Vec<Option<f32>>,
    top_logprobs: Vec<Option<Map<String, Value>>>,
    text_offset: Vec<usize>,
    content: Vec<Value>,
}

impl LogprobsWriter {
    pub fn new(chat: bool) -> Self {
        LogprobsWriter {
            chat,
            offset: 0,
            tokens: Vec::new(),
            token_logprobs: Vec::new(),
            top_logprobs: Vec::new(),
            text_offset: Vec::new(),
            content: Vec::new(),
        }
    }

    /// The prompt's tokens (echo); the first has no logprob.
    pub fn prompt(&mut self, tokenizer: &Tokenizer, ids: &[u32], lps: &[Option<TokenLogprobs>]) {
        for (i, &id) in ids.iter().enumerate() {
            match lps.get(i).and_then(Option::as_ref) {
                Some(lp) => self.token(tokenizer, lp),
                None => self.push_legacy(text_of(tokenizer, id), None, None),
            }
        }
    }

    /// One token with its logprob and alternatives.
    pub fn token(&mut self, tokenizer: &Tokenizer, lp: &TokenLogprobs) {
        let text = text_of(tokenizer, lp.token);
        if self.chat {
            let entry = |text: &str, logprob: f32| json!({"token": text, "logprob": finite(logprob), "bytes": text.as_bytes()});
            let top: Vec<Value> = lp
                .top
                .iter()
                .map(|&(t, l)| entry(&text_of(tokenizer, t), l))
                .collect();
            let mut e = entry(&text, lp.logprob);
            e["top_logprobs"] = Value::Array(top);
            self.content.push(e);
        } else {
            // The legacy dict has the chosen token too (vLLM), so a client can tell
            // whether it was the most likely.
            let mut top = Map::new();
            for &(t, l) in lp
                .top
                .iter()
                .chain(std::iter::once(&(lp.token, lp.logprob)))
            {
                top.entry(text_of(tokenizer, t))
                    .or_insert_with(|| json!(finite(l)));
            }
            self.push_legacy(text, Some(finite(lp.logprob)), Some(top));
        }
    }

    fn push_legacy(&mut self, text: String, logprob: Option<f32>, top: Option<Map<String, Value>>) {
        self.text_offset.push(self.offset);
        self.offset += text.len();
        self.tokens.push(text);
        self.token_logprobs.push(logprob);
        self.top_logprobs.push(top);
    }

    /// Whether nothing came since the last [`LogprobsWriter::take`].
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty() && self.content.is_empty()
    }

    /// What came since the last call, in the endpoint's shape.
    pub fn take(&mut self) -> Value {
        if self.chat {
            json!({"content": std::mem::take(&mut self.content)})
        } else {
            json!({
                "tokens": std::mem::take(&mut self.tokens),
                "token_logprobs": std::mem::take(&mut self.token_logprobs),
                "top_logprobs": std::mem::take(&mut self.top_logprobs),
                "text_offset": std::mem::take(&mut self.text_offset),
            })
        }
    }
}
