//! OpenAI request bodies and their validation into a [`Params`] the scheduler can run.

use serde::Deserialize;
use serde_json::Value;
use switchyard_engine::SamplingParams;
use switchyard_engine::tokenizer::ChatMessage;

use super::error::ApiError;

pub const MAX_STOP_SEQUENCES: usize = 16;
pub const MAX_STOP_BYTES: usize = 256;

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
    pub logprobs: Option<Value>,
    pub echo: Option<bool>,
    pub best_of: Option<i64>,
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
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    pub stream: bool,
    pub include_usage: bool,
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

impl Sampling {
    pub fn validate(&self, served_model: &str) -> Result<Params, ApiError> {
        if let Some(m) = &self.model
            && m != served_model
        {
            return Err(ApiError::ModelNotFound(m.clone()));
        }
        if let Some(n) = self.n
            && n != 1
        {
            return Err(ApiError::bad(
                format!("n = {n} is not supported: only n = 1"),
                "n",
            ));
        }
        if let Some(b) = self.best_of
            && b != 1
        {
            return Err(ApiError::bad("best_of is not supported", "best_of"));
        }
        if self.echo == Some(true) {
            return Err(ApiError::bad("echo is not supported", "echo"));
        }
        if self
            .logprobs
            .as_ref()
            .is_some_and(|v| !v.is_null() && v != &Value::Bool(false))
        {
            return Err(ApiError::bad("logprobs are not supported", "logprobs"));
        }
        let max_tokens = match self.max_completion_tokens.or(self.max_tokens) {
            None => None,
            Some(n) if n >= 1 => Some(usize::try_from(n).unwrap_or(usize::MAX)),
            Some(n) => {
                return Err(ApiError::bad(
                    format!("max_tokens must be at least 1, got {n}"),
                    "max_tokens",
                ));
            }
        };
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::bad(
                format!("temperature must be between 0 and 2, got {temperature}"),
                "temperature",
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
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
        if stop.len() > MAX_STOP_SEQUENCES {
            return Err(ApiError::bad(
                format!(
                    "at most {MAX_STOP_SEQUENCES} stop sequences, got {}",
                    stop.len()
                ),
                "stop",
            ));
        }
        if let Some(s) = stop
            .iter()
            .find(|s| s.len() > MAX_STOP_BYTES || s.is_empty())
        {
            return Err(ApiError::bad(
                format!(
                    "stop sequences must be 1 to {MAX_STOP_BYTES} bytes, got {} bytes",
                    s.len()
                ),
                "stop",
            ));
        }
        Ok(Params {
            max_tokens,
            sampling: SamplingParams {
                temperature: temperature as f32,
                top_p: top_p as f32,
                top_k,
            },
            seed,
            stop,
            ignore_eos: self.ignore_eos,
            stream: self.stream,
            include_usage: self
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
        })
    }
}

impl Prompt {
    /// The prompt as text or token ids; a batch of one is accepted, larger batches not.
    pub fn single(self) -> Result<Result<String, Vec<i64>>, ApiError> {
        let too_many = |n: usize| {
            ApiError::bad(
                format!("batched prompts are not supported: send one prompt per request (got {n})"),
                "prompt",
            )
        };
        match self {
            Prompt::Text(s) => Ok(Ok(s)),
            Prompt::Tokens(t) => Ok(Err(t)),
            Prompt::TextBatch(mut v) if v.len() == 1 => Ok(Ok(v.remove(0))),
            Prompt::TokenBatch(mut v) if v.len() == 1 => Ok(Err(v.remove(0))),
            Prompt::TextBatch(v) => Err(too_many(v.len())),
            Prompt::TokenBatch(v) => Err(too_many(v.len())),
        }
    }
}

impl Message {
    pub fn to_chat(&self) -> Result<ChatMessage, ApiError> {
        if !matches!(
            self.role.as_str(),
            "system" | "user" | "assistant" | "developer"
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
        Ok(ChatMessage {
            role: role.to_owned(),
            content,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling(json: &str) -> Result<Params, ApiError> {
        parse_body::<Sampling>(json.as_bytes())?.validate("m")
    }

    #[test]
    fn defaults_follow_openai() {
        let p = sampling("{}").unwrap();
        assert_eq!(p.sampling.temperature, 1.0);
        assert_eq!(p.sampling.top_p, 1.0);
        assert_eq!(p.max_tokens, None);
        assert!(!p.stream);
    }

    #[test]
    fn out_of_range_values_are_400_naming_the_parameter() {
        for (body, param) in [
            (r#"{"temperature": 2.5}"#, "temperature"),
            (r#"{"temperature": -1}"#, "temperature"),
            (r#"{"top_p": 0}"#, "top_p"),
            (r#"{"top_p": 1.5}"#, "top_p"),
            (r#"{"max_tokens": 0}"#, "max_tokens"),
            (r#"{"max_tokens": -5}"#, "max_tokens"),
            (r#"{"n": 2}"#, "n"),
            (r#"{"top_k": -3}"#, "top_k"),
            (r#"{"stop": [""]}"#, "stop"),
            (r#"{"logprobs": 3}"#, "logprobs"),
        ] {
            match sampling(body) {
                Err(ApiError::BadRequest { param: Some(p), .. }) => assert_eq!(p, param, "{body}"),
                other => panic!("{body}: {other:?}"),
            }
        }
        assert!(matches!(
            sampling(r#"{"model": "other"}"#),
            Err(ApiError::ModelNotFound(_))
        ));
        assert!(matches!(
            sampling(r#"{"temperature": "hot"}"#),
            Err(ApiError::BadRequest { .. })
        ));
        assert!(matches!(
            parse_body::<Sampling>(b"{not json"),
            Err(ApiError::BadRequest { .. })
        ));
        assert!(matches!(
            parse_body::<Sampling>(b"\xff\xfe"),
            Err(ApiError::BadRequest { .. })
        ));
    }

    #[test]
    fn prompts_in_every_accepted_shape() {
        let p: CompletionRequest = parse_body(br#"{"prompt": [1, 2, 3]}"#).unwrap();
        assert_eq!(p.prompt.single().unwrap(), Err(vec![1, 2, 3]));
        let p: CompletionRequest = parse_body(br#"{"prompt": ["hi"]}"#).unwrap();
        assert_eq!(p.prompt.single().unwrap(), Ok("hi".to_string()));
        let p: CompletionRequest = parse_body(br#"{"prompt": ["a", "b"]}"#).unwrap();
        assert!(p.prompt.single().is_err());
    }
}
