//! One streamed request and what the client saw of it: when the first text arrived,
//! every gap after that, the server's token counts, or why it failed.

use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{Value, json};

use crate::args::Endpoint;
use crate::dataset::{Prompt, SampleRequest};
use crate::error::Error;
use crate::sse::SseDecoder;

/// Why a request failed; the result JSON counts failures by `to_string()` of this.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ErrorKind {
    /// A non-2xx status.
    Http(u16),
    /// The connection could not be made, or broke before the response was complete.
    Transport,
    /// No complete response within `--request-timeout`.
    Timeout,
    /// The server reported an error inside a 200 stream.
    StreamError,
    /// The stream ended cleanly but without `data: [DONE]`.
    IncompleteStream,
    /// An event that is not JSON.
    BadChunk,
    /// A complete stream without any text or finishing chunk: nothing to time.
    NoContent,
    /// The benchmark's own task for the request died (a bug here, not the server's).
    Client,
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ErrorKind::Http(code) => write!(f, "http_{code}"),
            ErrorKind::Transport => f.write_str("transport"),
            ErrorKind::Timeout => f.write_str("timeout"),
            ErrorKind::StreamError => f.write_str("stream_error"),
            ErrorKind::IncompleteStream => f.write_str("incomplete_stream"),
            ErrorKind::BadChunk => f.write_str("bad_chunk"),
            ErrorKind::NoContent => f.write_str("no_content"),
            ErrorKind::Client => f.write_str("client_error"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub kind: ErrorKind,
    pub message: String,
}

impl Failure {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Failure {
            kind,
            message: message.into(),
        }
    }
}

/// A request that streamed to `[DONE]`. Times in seconds from sending.
#[derive(Debug, Clone, PartialEq)]
pub struct Success {
    /// Until the first chunk with non-empty text (a chat stream's opening role chunk
    /// carries none and does not count). When every token decoded to empty text
    /// (special tokens, or bytes of an unfinished character), until the chunk with the
    /// finish reason: the server answered, and vLLM too counts such a request as
    /// completed, timed at its first chunk with a choice.
    pub ttft: f64,
    /// Gaps between consecutive chunks with text.
    pub itl: Vec<f64>,
    /// Until `[DONE]`.
    pub latency: f64,
    /// From the server's `usage`, when it sent one.
    pub prompt_tokens: Option<usize>,
    pub output_tokens: Option<usize>,
    /// Chunks with text: the output length when the server sends no usage; 0 when the
    /// first token was timed by the finishing chunk.
    pub content_chunks: usize,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RequestOutput {
    pub probe: bool,
    /// The dataset's prompt length.
    pub prompt_len: usize,
    /// Seconds from the start of the run to sending this request.
    pub start: f64,
    /// Seconds from sending to the end, success or not.
    pub latency: f64,
    pub result: Result<Success, Failure>,
}

/// Sampling settings every request carries.
#[derive(Debug, Clone)]
pub struct Sampling {
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub ignore_eos: bool,
}

pub struct Client {
    http: reqwest::Client,
    url: String,
    endpoint: Endpoint,
    model: String,
    headers: HeaderMap,
    timeout: Duration,
    sampling: Sampling,
}

/// A reqwest client that goes straight to the server: a proxy in between would be
/// part of every latency measured.
pub fn http_client() -> Result<reqwest::Client, Error> {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .map_err(|e| Error::Client(chain(&e)))
}

pub fn header_map(pairs: &[(String, String)]) -> Result<HeaderMap, Error> {
    let mut map = HeaderMap::new();
    for (k, v) in pairs {
        let name = HeaderName::from_bytes(k.as_bytes())
            .map_err(|e| Error::Config(format!("--header {k}: {e}")))?;
        let value =
            HeaderValue::from_str(v).map_err(|e| Error::Config(format!("--header {k}: {e}")))?;
        map.insert(name, value);
    }
    Ok(map)
}

impl Client {
    pub fn new(
        http: reqwest::Client,
        base_url: &str,
        endpoint: Endpoint,
        model: String,
        headers: HeaderMap,
        timeout: Duration,
        sampling: Sampling,
    ) -> Client {
        let path = match endpoint {
            Endpoint::Completions => "/v1/completions",
            Endpoint::Chat => "/v1/chat/completions",
        };
        Client {
            http,
            url: format!("{base_url}{path}"),
            endpoint,
            model,
            headers,
            timeout,
            sampling,
        }
    }

    /// The request body: streamed, with a final usage chunk. Probes are greedy whatever
    /// the run's sampling, so their outputs must agree.
    pub fn body(&self, req: &SampleRequest) -> Value {
        let mut b = match (self.endpoint, &req.prompt) {
            (Endpoint::Completions, Prompt::Tokens(ids)) => {
                json!({"model": self.model, "prompt": ids, "max_tokens": req.output_len})
            }
            (Endpoint::Completions, Prompt::Text(t)) => {
                json!({"model": self.model, "prompt": t, "max_tokens": req.output_len})
            }
            (Endpoint::Chat, prompt) => {
                let content = match prompt {
                    Prompt::Text(t) => t.clone(),
                    Prompt::Tokens(ids) => ids
                        .iter()
                        .map(|i| i.to_string())
                        .collect::<Vec<_>>()
                        .join(" "),
                };
                json!({
                    "model": self.model,
                    "messages": [{"role": "user", "content": content}],
                    "max_completion_tokens": req.output_len,
                })
            }
        };
        b["stream"] = json!(true);
        b["stream_options"] = json!({"include_usage": true});
        if req.probe {
            b["temperature"] = json!(0.0);
        } else {
            b["temperature"] = json!(self.sampling.temperature);
            if let Some(p) = self.sampling.top_p {
                b["top_p"] = json!(p);
            }
            if let Some(k) = self.sampling.top_k {
                b["top_k"] = json!(k);
            }
        }
        if self.sampling.ignore_eos {
            b["ignore_eos"] = json!(true);
        }
        b
    }

    /// Sends one request and reads its stream to the end. Never fails: a failure is a
    /// result to count.
    pub async fn send(&self, req: &SampleRequest, origin: Instant) -> RequestOutput {
        let sent = Instant::now();
        let result = match tokio::time::timeout(self.timeout, self.exchange(req, sent)).await {
            Ok(r) => r,
            Err(_) => Err(Failure::new(
                ErrorKind::Timeout,
                format!("no complete response within {:?}", self.timeout),
            )),
        };
        let latency = match &result {
            Ok(s) => s.latency,
            Err(_) => sent.elapsed().as_secs_f64(),
        };
        RequestOutput {
            probe: req.probe,
            prompt_len: req.prompt_len,
            start: sent.duration_since(origin).as_secs_f64(),
            latency,
            result,
        }
    }

    async fn exchange(&self, req: &SampleRequest, sent: Instant) -> Result<Success, Failure> {
        let resp = self
            .http
            .post(&self.url)
            .headers(self.headers.clone())
            .json(&self.body(req))
            .send()
            .await
            .map_err(|e| Failure::new(ErrorKind::Transport, chain(&e)))?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            return Err(Failure::new(
                ErrorKind::Http(status.as_u16()),
                error_message(&text),
            ));
        }
        let mut body = resp.bytes_stream();
        let mut decoder = SseDecoder::default();
        let mut stream = StreamState::new(sent);
        while let Some(read) = body.next().await {
            let bytes = read.map_err(|e| {
                Failure::new(
                    ErrorKind::Transport,
                    format!("stream broke off: {}", chain(&e)),
                )
            })?;
            let now = Instant::now();
            for data in decoder.push(&bytes) {
                if stream.event(&data, now)? {
                    return stream.finish(now);
                }
            }
        }
        let now = Instant::now();
        if let Some(data) = decoder.finish()
            && stream.event(&data, now)?
        {
            return stream.finish(now);
        }
        Err(Failure::new(
            ErrorKind::IncompleteStream,
            "the stream ended without data: [DONE]",
        ))
    }
}

/// What has been read of one stream so far.
pub struct StreamState {
    sent: Instant,
    first: Option<Instant>,
    /// The first chunk with a finish reason: the fallback first token of a stream
    /// without text.
    finished: Option<Instant>,
    last: Option<Instant>,
    itl: Vec<f64>,
    prompt_tokens: Option<usize>,
    output_tokens: Option<usize>,
    content_chunks: usize,
    text: String,
}

impl StreamState {
    pub fn new(sent: Instant) -> Self {
        StreamState {
            sent,
            first: None,
            finished: None,
            last: None,
            itl: Vec::new(),
            prompt_tokens: None,
            output_tokens: None,
            content_chunks: 0,
            text: String::new(),
        }
    }

    /// Takes one event's data, received at `now`; true at `[DONE]`.
    pub fn event(&mut self, data: &str, now: Instant) -> Result<bool, Failure> {
        if data.trim() == "[DONE]" {
            return Ok(true);
        }
        let v: Value = serde_json::from_str(data).map_err(|e| {
            Failure::new(ErrorKind::BadChunk, format!("{e}: {}", truncate(data, 200)))
        })?;
        if let Some(err) = v.get("error").filter(|e| !e.is_null()) {
            return Err(Failure::new(ErrorKind::StreamError, message_of(err)));
        }
        // Some servers repeat usage on every chunk; the last one is the total.
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            let count = |k: &str| u.get(k).and_then(Value::as_u64).map(|n| n as usize);
            self.prompt_tokens = count("prompt_tokens").or(self.prompt_tokens);
            self.output_tokens = count("completion_tokens").or(self.output_tokens);
        }
        let choice = v
            .get("choices")
            .and_then(Value::as_array)
            .and_then(|c| c.first());
        let content = choice.and_then(|c| {
            c.get("text")
                .and_then(Value::as_str)
                .or_else(|| c.get("delta")?.get("content")?.as_str())
        });
        if let Some(text) = content.filter(|t| !t.is_empty()) {
            match self.last {
                None => self.first = Some(now),
                Some(prev) => self.itl.push(now.duration_since(prev).as_secs_f64()),
            }
            self.last = Some(now);
            self.content_chunks += 1;
            self.text.push_str(text);
        }
        if self.finished.is_none()
            && choice.is_some_and(|c| c.get("finish_reason").is_some_and(|f| !f.is_null()))
        {
            self.finished = Some(now);
        }
        Ok(false)
    }

    pub fn finish(self, now: Instant) -> Result<Success, Failure> {
        let Some(first) = self.first.or(self.finished) else {
            return Err(Failure::new(
                ErrorKind::NoContent,
                "the stream ended without any generated text or finish reason",
            ));
        };
        Ok(Success {
            ttft: first.duration_since(self.sent).as_secs_f64(),
            itl: self.itl,
            latency: now.duration_since(self.sent).as_secs_f64(),
            prompt_tokens: self.prompt_tokens,
            output_tokens: self.output_tokens,
            content_chunks: self.content_chunks,
            text: self.text,
        })
    }
}

/// The first model `GET /v1/models` lists.
pub async fn first_model(
    http: &reqwest::Client,
    base_url: &str,
    headers: &HeaderMap,
) -> Result<String, Error> {
    let url = format!("{base_url}/v1/models");
    let fail = |message: String| Error::Models {
        url: url.clone(),
        message,
    };
    let resp = http
        .get(&url)
        .headers(headers.clone())
        .send()
        .await
        .map_err(|e| fail(chain(&e)))?;
    let status = resp.status();
    let text = resp.text().await.map_err(|e| fail(chain(&e)))?;
    if !status.is_success() {
        return Err(fail(format!("{status}: {}", error_message(&text))));
    }
    let v: Value = serde_json::from_str(&text).map_err(|e| fail(format!("not JSON: {e}")))?;
    v.get("data")
        .and_then(Value::as_array)
        .and_then(|d| d.first())
        .and_then(|m| m.get("id"))
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| fail("no model listed; pass --model".into()))
}

/// An error's message with its causes: reqwest's own message alone rarely says what
/// went wrong ("error sending request").
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// The message of an OpenAI-style error body, or the start of whatever the body was.
fn error_message(body: &str) -> String {
    match serde_json::from_str::<Value>(body) {
        Ok(v) => match v.get("error") {
            Some(err) => message_of(err),
            None => truncate(body, 300),
        },
        Err(_) => truncate(body, 300),
    }
}

fn message_of(err: &Value) -> String {
    err.get("message")
        .and_then(Value::as_str)
        .or_else(|| err.as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| truncate(&err.to_string(), 300))
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn chat_stream_times_text_chunks_only() {
        let t0 = Instant::now();
        let mut s = StreamState::new(t0);
        let role = r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#;
        let tok = |t: &str| format!(r#"{{"choices":[{{"index":0,"delta":{{"content":"{t}"}}}}]}}"#);
        assert!(!s.event(role, at(t0, 1)).expect("role chunk"));
        assert!(!s.event(&tok("He"), at(t0, 50)).expect("chunk"));
        assert!(!s.event(&tok("llo"), at(t0, 60)).expect("chunk"));
        let finish = r#"{"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}"#;
        assert!(!s.event(finish, at(t0, 61)).expect("finish chunk"));
        let usage =
            r#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":3,"total_tokens":8}}"#;
        assert!(!s.event(usage, at(t0, 62)).expect("usage chunk"));
        assert!(s.event("[DONE]", at(t0, 63)).expect("done"));
        let ok = s.finish(at(t0, 63)).expect("success");
        assert!((ok.ttft - 0.050).abs() < 1e-9);
        assert_eq!(ok.itl.len(), 1);
        assert!((ok.itl[0] - 0.010).abs() < 1e-9);
        assert!((ok.latency - 0.063).abs() < 1e-9);
        assert_eq!((ok.prompt_tokens, ok.output_tokens), (Some(5), Some(3)));
        assert_eq!(ok.text, "Hello");
    }

    #[test]
    fn stream_failures_are_classified() {
        let t0 = Instant::now();
        let mut s = StreamState::new(t0);
        let err = s
            .event(r#"{"error":{"message":"expert node down","code":503}}"#, t0)
            .expect_err("error event");
        assert_eq!(err.kind, ErrorKind::StreamError);
        assert_eq!(err.message, "expert node down");
        let bad = StreamState::new(t0)
            .event("{not json", t0)
            .expect_err("bad");
        assert_eq!(bad.kind, ErrorKind::BadChunk);
        let empty = StreamState::new(t0).finish(t0).expect_err("nothing");
        assert_eq!(empty.kind, ErrorKind::NoContent);
        // Tokens that all decode to empty text: timed at the finishing chunk.
        let mut silent = StreamState::new(t0);
        let finish = r#"{"choices":[{"index":0,"text":"","finish_reason":"length"}]}"#;
        let usage = r#"{"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":6}}"#;
        for (data, ms) in [(finish, 30), (usage, 31), ("[DONE]", 32)] {
            silent.event(data, at(t0, ms)).expect("a valid chunk");
        }
        let ok = silent.finish(at(t0, 32)).expect("completed");
        assert!((ok.ttft - 0.030).abs() < 1e-9);
        assert_eq!((ok.content_chunks, ok.output_tokens), (0, Some(6)));
        assert_eq!(ErrorKind::Http(503).to_string(), "http_503");
        assert_eq!(
            error_message(r#"{"error":{"message":"queue full","type":"rate_limit_error"}}"#),
            "queue full"
        );
        assert_eq!(error_message("plain"), "plain");
    }
}
