//! OpenAI request bodies and their validation into a [`Params`] the scheduler can run.

use serde::Deserialize;
use serde_json::Value;
use switchyard_engine::SamplingParams;
use switchyard_engine::tokenizer::{ChatMessage, Tokenizer};

use super::error::ApiError;
use crate::structured::tools::ToolCalling;
use crate::structured::{Constraint, Grammars, OutputFormat};

/// What a request may ask for. Each is a flag of `up` and `coordinator` (README).
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Largest request body, in bytes (`--max-body-bytes`).
    pub max_body_bytes: usize,
    /// Longest prompt in tokens (`--max-prompt-tokens`); `None`: the model's context.
    pub max_prompt_tokens: Option<usize>,
    /// Largest `max_tokens` (`--max-completion-tokens`); `None`: the model's context.
    pub max_completion_tokens: Option<usize>,
    /// Most stop sequences in one request (`--max-stop-sequences`).
    pub max_stop_sequences: usize,
    /// Longest stop sequence, in bytes (`--max-stop-bytes`): every step compares each
    /// against the text's tail, so their size is per-token work.
    pub max_stop_bytes: usize,
    /// How long a request may run before it is cancelled (`--request-timeout-s`).
    pub request_timeout: Option<std::time::Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: super::MAX_BODY_BYTES,
            max_prompt_tokens: None,
            max_completion_tokens: None,
            max_stop_sequences: 16,
            max_stop_bytes: 256,
            request_timeout: Some(std::time::Duration::from_secs(600)),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<i64>),
    TextBatch(Vec<String>),
    TokenBatch(Vec<Vec<i64>>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Fields shared by both endpoints.
#[derive(Debug, Default, Deserialize)]
pub struct Sampling {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    #[serde(default)]
    pub ignore_eos: bool,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<i64>,
    /// Completions: how many alternatives per token (0-20). Chat: whether to return them.
    pub logprobs: Option<Value>,
    /// Chat: how many alternatives per token, with `logprobs: true`.
    pub top_logprobs: Option<i64>,
    pub echo: Option<bool>,
    pub best_of: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub min_p: Option<f64>,
    pub min_tokens: Option<i64>,
    pub stop_token_ids: Option<Vec<i64>>,
    /// Token id (as a string, OpenAI's shape) to a bias in [-100, 100].
    pub logit_bias: Option<std::collections::BTreeMap<String, f64>>,
    pub response_format: Option<Value>,
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    /// Everything else: refused by name unless harmless (`super::params`).
    #[serde(flatten)]
    pub other: serde_json::Map<String, Value>,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    #[serde(flatten)]
    pub sampling: Sampling,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Option<Content>,
    /// An assistant's earlier calls, as this server (or OpenAI) answered them.
    pub tool_calls: Option<Vec<Value>>,
    /// A `tool` message: the call it answers.
    pub tool_call_id: Option<String>,
    pub name: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// A request after validation, before tokenisation-dependent checks.
#[derive(Debug, Clone)]
pub struct Params {
    /// `Some(0)` only with `echo` (scoring a prompt).
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    pub stream: bool,
    pub include_usage: bool,
    /// Alternatives per generated token's logprob (`None`: no logprobs).
    pub logprobs: Option<usize>,
    /// Alternatives per prompt token's logprob (`echo` with `logprobs`, or vLLM's
    /// `prompt_logprobs`).
    pub prompt_logprobs: Option<usize>,
    /// The prompt goes in front of the completion's text (and logprobs).
    pub echo: bool,
    /// Choices per prompt, each its own sequence (seeded `seed + i` when seeded).
    pub n: usize,
    /// `response_format`: what the output must be.
    pub format: Option<OutputFormat>,
    /// `tools` and `tool_choice` (chat).
    pub tools: Option<ToolCalling>,
}

impl Params {
    /// What constrains the output, from `response_format` or a required or named tool.
    pub fn output_format(&self) -> Option<OutputFormat> {
        self.format
            .clone()
            .or_else(|| self.tools.as_ref().and_then(ToolCalling::format))
    }

    /// The grammar state every choice starts from, compiled once.
    fn constraint(&self, cx: &InputContext<'_>) -> Result<Option<Constraint>, ApiError> {
        let Some(format) = self.output_format() else {
            return Ok(None);
        };
        let param = if self.format.is_some() {
            "response_format"
        } else {
            "tools"
        };
        let grammars = cx.grammars.ok_or_else(|| {
            ApiError::bad(
                "structured output is not available: this model's tokenizer could not be mapped to bytes (see the server log)",
                param,
            )
        })?;
        grammars
            .constraint(&format)
            .map(Some)
            .map_err(|e| ApiError::bad(e, param))
    }
}

/// A request, validated and tokenised: what `generate` runs.
#[derive(Debug)]
pub struct Input {
    pub prompts: Vec<PromptInput>,
    pub params: Params,
    /// Every choice starts from a fork of it.
    pub constraint: Option<Constraint>,
}

/// One prompt of a request: its tokens, and its text as sent (for `echo`).
#[derive(Debug, Clone)]
pub struct PromptInput {
    pub ids: Vec<u32>,
    pub text: Option<String>,
}

impl Params {
    /// The checks that need the vocabulary's size: every token id a request names.
    pub fn check_token_ids(&self, vocab_size: usize) -> Result<(), ApiError> {
        let outside = |t: u32| (t as usize) >= vocab_size;
        if let Some(t) = self.stop_token_ids.iter().find(|t| outside(**t)) {
            return Err(ApiError::bad(
                format!("stop_token_ids: {t} is outside the vocabulary (0..{vocab_size})"),
                "stop_token_ids",
            ));
        }
        if let Some((t, _)) = self.sampling.logit_bias.iter().find(|(t, _)| outside(*t)) {
            return Err(ApiError::bad(
                format!("logit_bias: token {t} is outside the vocabulary (0..{vocab_size})"),
                "logit_bias",
            ));
        }
        Ok(())
    }
}

/// Parses a JSON body into `T`, with a 400 that says what is wrong.
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|e| ApiError::bad(format!("request body is not valid UTF-8: {e}"), "body"))?;
    serde_json::from_str(text).map_err(|e| ApiError::BadRequest {
        message: format!("invalid request body: {e}"),
        param: None,
    })
}

/// Which endpoint a body came to: `logprobs` and `echo` differ between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
}

impl Sampling {
    pub fn validate(
        &self,
        served_model: &str,
        limits: &Limits,
        endpoint: Endpoint,
    ) -> Result<Params, ApiError> {
        super::params::refuse_unsupported(&self.other, endpoint)?;
        if let Some(m) = &self.model
            && m != served_model
        {
            return Err(ApiError::ModelNotFound(m.clone()));
        }
        let n = match self.n {
            None => 1,
            Some(n) => usize::try_from(n)
                .ok()
                .filter(|n| (1..=super::params::MAX_CHOICES).contains(n))
                .ok_or_else(|| {
                    ApiError::bad(
                        format!(
                            "n must be between 1 and {}, got {n}",
                            super::params::MAX_CHOICES
                        ),
                        "n",
                    )
                })?,
        };
        // best_of = n is n; more would rank candidates, which is not built.
        if let Some(b) = self.best_of
            && usize::try_from(b).ok() != Some(n)
        {
            return Err(ApiError::bad(
                format!(
                    "best_of must equal n ({n}) here, got {b}: ranking extra candidates is not supported"
                ),
                "best_of",
            ));
        }
        let lp = super::params::logprobs(self, endpoint)?;
        let max_tokens = match self.max_completion_tokens.or(self.max_tokens) {
            None => None,
            Some(n) if n >= 1 => Some(usize::try_from(n).unwrap_or(usize::MAX)),
            // Scoring a prompt: nothing to generate, only the prompt's logprobs.
            Some(0) if lp.echo => Some(0),
            Some(n) => {
                return Err(ApiError::bad(
                    format!("max_tokens must be at least 1 (0 only with echo), got {n}"),
                    "max_tokens",
                ));
            }
        };
        if let (Some(n), Some(limit)) = (max_tokens, limits.max_completion_tokens)
            && n > limit
        {
            return Err(ApiError::bad(
                format!("max_tokens must be at most {limit} on this server, got {n}"),
                "max_tokens",
            ));
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::bad(
                format!("temperature must be between 0 and 2, got {temperature}"),
                "temperature",
            ));
        }
        // Sampling divides logits by the temperature in f32: below 1e-5 that overflows to
        // Inf and the distribution to NaN, so such temperatures mean greedy (as in vLLM).
        let temperature = if temperature < 1e-5 {
            0.0
        } else {
            temperature as f32
        };
        let top_p = self.top_p.unwrap_or(1.0);
        // Checked as the f32 the sampler gets: a tiny positive f64 (1e-300) becomes 0.
        if !(top_p > 0.0 && top_p <= 1.0 && top_p as f32 > 0.0) {
            return Err(ApiError::bad(
                format!("top_p must be in (0, 1], got {top_p}"),
                "top_p",
            ));
        }
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => usize::try_from(k).unwrap_or(usize::MAX),
            Some(k) => {
                return Err(ApiError::bad(
                    format!("top_k must be -1 (off) or positive, got {k}"),
                    "top_k",
                ));
            }
        };
        // Negative seeds are accepted by OpenAI; fold them into u64.
        let seed = self.seed.map(|s| s as u64);
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > limits.max_stop_sequences {
            return Err(ApiError::bad(
                format!(
                    "at most {} stop sequences, got {}",
                    limits.max_stop_sequences,
                    stop.len()
                ),
                "stop",
            ));
        }
        if let Some(s) = stop
            .iter()
            .find(|s| s.len() > limits.max_stop_bytes || s.is_empty())
        {
            return Err(ApiError::bad(
                format!(
                    "stop sequences must be 1 to {} bytes, got {} bytes",
                    limits.max_stop_bytes,
                    s.len()
                ),
                "stop",
            ));
        }
        let extra = super::params::penalties_and_more(self, max_tokens)?;
        let (format, tools) = super::params::structured(self, endpoint)?;
        Ok(Params {
            max_tokens,
            sampling: SamplingParams {
                temperature,
                top_p: top_p as f32,
                top_k,
                min_p: extra.min_p,
                presence_penalty: extra.presence_penalty,
                frequency_penalty: extra.frequency_penalty,
                repetition_penalty: extra.repetition_penalty,
                logit_bias: extra.logit_bias,
                min_tokens: extra.min_tokens,
            },
            seed,
            stop,
            stop_token_ids: extra.stop_token_ids,
            logprobs: lp.logprobs,
            prompt_logprobs: lp.prompt_logprobs,
            echo: lp.echo,
            n,
            format,
            tools,
            ignore_eos: self.ignore_eos,
            stream: self.stream,
            include_usage: self
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
        })
    }
}

/// What turning a body into a prompt needs to know about the server.
pub struct InputContext<'a> {
    pub model_name: &'a str,
    /// `None`: structured output is refused (the tokenizer could not be mapped).
    pub grammars: Option<&'a Grammars>,
    pub limits: &'a Limits,
    pub tokenizer: &'a Tokenizer,
    pub vocab_size: usize,
}

/// A `/v1/completions` body to prompt tokens and parameters: parsing, every check that
/// needs no scheduler, tokenisation. Synchronous and free of I/O, so it can be fuzzed;
/// any input gives `Ok` or an [`ApiError`], never a panic.
pub fn completion_input(body: &[u8], cx: &InputContext<'_>) -> Result<Input, ApiError> {
    let req: CompletionRequest = parse_body(body)?;
    let params = req
        .sampling
        .validate(cx.model_name, cx.limits, Endpoint::Completions)?;
    params.check_token_ids(cx.vocab_size)?;
    let prompts = req.prompt.into_list();
    if prompts.is_empty() {
        return Err(ApiError::bad("prompt must not be an empty list", "prompt"));
    }
    if prompts.len().saturating_mul(params.n) > super::params::MAX_CHOICES {
        return Err(ApiError::bad(
            format!(
                "{} prompts x n = {} is more than {} choices in one request",
                prompts.len(),
                params.n,
                super::params::MAX_CHOICES
            ),
            "prompt",
        ));
    }
    let prompts = prompts
        .into_iter()
        .map(|p| prompt_input(p, cx))
        .collect::<Result<Vec<_>, _>>()?;
    let constraint = params.constraint(cx)?;
    Ok(Input {
        prompts,
        params,
        constraint,
    })
}

/// One prompt, as text or token ids, to checked token ids.
fn prompt_input(
    prompt: Result<String, Vec<i64>>,
    cx: &InputContext<'_>,
) -> Result<PromptInput, ApiError> {
    match prompt {
        Ok(text) => {
            if text.is_empty() {
                return Err(ApiError::bad("prompt must not be empty", "prompt"));
            }
            let ids = cx
                .tokenizer
                .encode(&text, true)
                .map_err(|e| ApiError::Internal(e.to_string()))?;
            Ok(PromptInput {
                ids,
                text: Some(text),
            })
        }
        Err(ids) => {
            if ids.is_empty() {
                return Err(ApiError::bad("prompt must not be empty", "prompt"));
            }
            let ids = ids
                .iter()
                .map(|&t| {
                    u32::try_from(t)
                        .ok()
                        .filter(|t| (*t as usize) < cx.vocab_size)
                        .ok_or_else(|| {
                            ApiError::bad(
                                format!(
                                    "token id {t} is outside the vocabulary (0..{})",
                                    cx.vocab_size
                                ),
                                "prompt",
                            )
                        })
                })
                .collect::<Result<Vec<u32>, _>>()?;
            Ok(PromptInput { ids, text: None })
        }
    }
}

/// [`completion_input`] for `/v1/chat/completions`: messages rendered by the model's
/// chat template, then tokenised.
pub fn chat_input(body: &[u8], cx: &InputContext<'_>) -> Result<Input, ApiError> {
    let req: ChatRequest = parse_body(body)?;
    let params = req
        .sampling
        .validate(cx.model_name, cx.limits, Endpoint::Chat)?;
    params.check_token_ids(cx.vocab_size)?;
    if req.messages.is_empty() {
        return Err(ApiError::bad("messages must not be empty", "messages"));
    }
    let messages = req
        .messages
        .iter()
        .map(|m| m.to_chat())
        .collect::<Result<Vec<_>, _>>()?;
    // The template sees the tools whatever the choice, as transformers renders them.
    let tools = req.sampling.tools.as_ref().filter(|t| !t.is_null());
    let prompt = cx
        .tokenizer
        .encode_chat_with_tools(&messages, tools)
        .map_err(|e| ApiError::bad(e.to_string(), "messages"))?;
    let constraint = params.constraint(cx)?;
    Ok(Input {
        prompts: vec![PromptInput {
            ids: prompt,
            text: None,
        }],
        params,
        constraint,
    })
}

impl Prompt {
    /// The prompts of a request (a batch gets a choice per prompt and `n`), each as text or
    /// token ids.
    pub fn into_list(self) -> Vec<Result<String, Vec<i64>>> {
        match self {
            Prompt::Text(s) => vec![Ok(s)],
            Prompt::Tokens(t) => vec![Err(t)],
            Prompt::TextBatch(v) => v.into_iter().map(Ok).collect(),
            Prompt::TokenBatch(v) => v.into_iter().map(Err).collect(),
        }
    }
}

impl Message {
    pub fn to_chat(&self) -> Result<ChatMessage, ApiError> {
        if !matches!(
            self.role.as_str(),
            "system" | "user" | "assistant" | "developer" | "tool"
        ) {
            return Err(ApiError::bad(
                format!("unsupported message role `{}`", self.role),
                "messages",
            ));
        }
        let content = match &self.content {
            None => String::new(),
            Some(Content::Text(s)) => s.clone(),
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => text.push_str(t),
                        (kind, _) => {
                            return Err(ApiError::bad(
                                format!(
                                    "content part of type `{kind}` is not supported (text only)"
                                ),
                                "messages",
                            ));
                        }
                    }
                }
                text
            }
        };
        let role = if self.role == "developer" {
            "system"
        } else {
            self.role.as_str()
        };
        if self.tool_calls.is_some() && self.role != "assistant" {
            return Err(ApiError::bad(
                "only assistant messages carry tool_calls",
                "messages",
            ));
        }
        Ok(ChatMessage {
            role: role.to_owned(),
            content,
            tool_calls: self.tool_calls.as_ref().map(|calls| template_calls(calls)),
            tool_call_id: self.tool_call_id.clone(),
            name: self.name.clone(),
        })
    }
}

/// OpenAI sends a call's arguments as a JSON string; chat templates (transformers') index
/// into them as an object, so a string that parses becomes one.
fn template_calls(calls: &[Value]) -> Value {
    let calls = calls
        .iter()
        .map(|c| {
            let mut c = c.clone();
            if let Some(args) = c["function"]["arguments"].as_str()
                && let Ok(parsed @ Value::Object(_)) = serde_json::from_str::<Value>(args)
            {
                c["function"]["arguments"] = parsed;
            }
            c
        })
        .collect();
    Value::Array(calls)
}

#[cfg(test)]
#[path = "openai_tests.rs"]
mod tests;
