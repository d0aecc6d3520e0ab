//! A generation's events rendered as OpenAI responses: one JSON body, or SSE chunks.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::response::sse::Event as SseEvent;
use futures::Stream;
use serde_json::{Value, json};
use switchyard_engine::tokenizer::Tokenizer;
use tokio::sync::mpsc;

use super::error::ApiError;
use super::logprobs::LogprobsWriter;
use super::tool_stream::{Delta, ToolStream};
use crate::request::{Event, FinishReason, Usage};
use crate::structured::tools::ToolCalling;

/// Which endpoint a generation answers, for the response shapes.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Kind {
    Completion,
    Chat,
}

/// When a request must be done by (`--request-timeout-s`).
#[derive(Debug, Clone, Copy)]
pub(super) struct Deadline {
    at: Option<tokio::time::Instant>,
    limit: Duration,
}

impl Deadline {
    /// Counted from arrival: time spent queued is part of the client's wait.
    pub(super) fn new(arrived: Instant, limit: Option<Duration>) -> Self {
        Deadline {
            at: limit
                .and_then(|t| arrived.checked_add(t))
                .map(tokio::time::Instant::from_std),
            limit: limit.unwrap_or_default(),
        }
    }

    /// The next event, or the time-out error once the deadline passes.
    pub(super) async fn recv(
        &self,
        rx: &mut mpsc::UnboundedReceiver<Event>,
    ) -> Result<Option<Event>, ApiError> {
        match self.at {
            None => Ok(rx.recv().await),
            Some(at) => tokio::time::timeout_at(at, rx.recv()).await.map_err(|_| {
                ApiError::Timeout(format!(
                    "the request did not finish within the server's limit of {} s (--request-timeout-s) and was cancelled",
                    self.limit.as_secs_f64()
                ))
            }),
        }
    }
}

/// A running generation as the response sees it: its first event, the rest, and when it
/// must be done by.
pub(super) struct Generation {
    pub first: Event,
    pub rx: mpsc::UnboundedReceiver<Event>,
    pub deadline: Deadline,
}

/// What every choice of a response shares.
pub(super) struct Head {
    pub kind: Kind,
    pub id: String,
    pub created: u64,
    pub model: String,
    pub include_usage: bool,
}

impl Head {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        }
    }

    fn wrap(&self, choices: Value, chunk: bool) -> Value {
        json!({
            "id": self.id, "object": self.object(chunk), "created": self.created,
            "model": self.model, "choices": choices,
        })
    }
}

/// One choice: a sequence of its own (a prompt of a batch, or one of `n`).
pub(super) struct Choice {
    pub index: usize,
    /// Whether its prompt's tokens count in the usage (once per prompt, not per `n`).
    pub counts_prompt: bool,
    pub tokenizer: Arc<Tokenizer>,
    /// `echo`: the prompt's text and ids, in front of the completion.
    pub echo: Option<(String, Vec<u32>)>,
    /// Present when logprobs were asked for.
    pub logprobs: Option<LogprobsWriter>,
    /// Chat with tools: the output may be a call.
    pub tools: Option<Arc<ToolCalling>>,
    /// Streaming chat with tools: how the output goes out as deltas.
    pub tool_stream: Option<ToolStream>,
}

impl Choice {
    /// Takes in an event's logprobs; returns the text it adds to the choice.
    fn absorb(&mut self, ev: &Event) -> String {
        match ev {
            Event::PromptLogprobs(lps) => {
                if let (Some(w), Some((_, ids))) = (&mut self.logprobs, &self.echo) {
                    w.prompt(&self.tokenizer, ids, lps);
                }
                String::new()
            }
            Event::Token { text, logprobs, .. } => {
                if let (Some(w), Some(lp)) = (&mut self.logprobs, logprobs) {
                    w.token(&self.tokenizer, lp);
                }
                text.clone()
            }
            Event::Done { text, .. } => text.clone(),
            Event::Error(_) => String::new(),
        }
    }

    fn take_logprobs(&mut self) -> Value {
        self.logprobs
            .as_mut()
            .map_or(Value::Null, LogprobsWriter::take)
    }

    fn has_logprobs(&self) -> bool {
        self.logprobs.as_ref().is_some_and(|w| !w.is_empty())
    }

    /// The chunks a piece of generated text becomes: content, or a tool call's deltas.
    fn text_chunks(&mut self, head: &Head, text: &str) -> Vec<Value> {
        if let Some(ts) = self.tool_stream.as_mut() {
            let deltas = ts.push(text);
            return deltas
                .into_iter()
                .map(|d| self.delta_chunk(head, d))
                .collect();
        }
        // With logprobs every token gets its chunk, even one whose text is held back (a
        // partial character or a possible stop sequence).
        if !text.is_empty() || self.has_logprobs() {
            vec![self.chunk(head, Some(text), None)]
        } else {
            Vec::new()
        }
    }

    /// What a tool stream held back, once the output is complete.
    fn closing_chunks(&mut self, head: &Head) -> Vec<Value> {
        let deltas = self
            .tool_stream
            .as_mut()
            .map(ToolStream::finish)
            .unwrap_or_default();
        deltas
            .into_iter()
            .map(|d| self.delta_chunk(head, d))
            .collect()
    }

    fn delta_chunk(&mut self, head: &Head, d: Delta) -> Value {
        let delta = match d {
            Delta::Content(t) => return self.chunk(head, Some(&t), None),
            Delta::CallStart { id, name } => json!({"tool_calls": [{"index": 0, "id": id,
                "type": "function", "function": {"name": name, "arguments": ""}}]}),
            Delta::Arguments(a) => {
                json!({"tool_calls": [{"index": 0, "function": {"arguments": a}}]})
            }
        };
        let logprobs = self.take_logprobs();
        head.wrap(
            json!([{"index": self.index, "delta": delta, "logprobs": logprobs, "finish_reason": null}]),
            true,
        )
    }

    /// This choice in a whole response.
    fn full(&mut self, kind: Kind, text: &str, finish_reason: FinishReason) -> Value {
        let logprobs = self.take_logprobs();
        match kind {
            Kind::Completion => json!({
                "index": self.index, "text": text, "logprobs": logprobs,
                "finish_reason": finish_reason,
            }),
            Kind::Chat => {
                let calls = self.tools.as_ref().and_then(|t| t.calls(text));
                match calls {
                    None => json!({
                        "index": self.index,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": logprobs,
                        "finish_reason": finish_reason,
                    }),
                    Some(calls) => {
                        let calls: Vec<Value> = calls
                            .into_iter()
                            .enumerate()
                            .map(|(i, c)| {
                                json!({
                                    "id": call_id(i),
                                    "type": "function",
                                    "function": {"name": c.name, "arguments": c.arguments},
                                })
                            })
                            .collect();
                        // A call that was cut short by max_tokens is not a call.
                        let finish = match finish_reason {
                            FinishReason::Stop => json!("tool_calls"),
                            other => json!(other),
                        };
                        json!({
                            "index": self.index,
                            "message": {"role": "assistant", "content": null, "tool_calls": calls},
                            "logprobs": logprobs,
                            "finish_reason": finish,
                        })
                    }
                }
            }
        }
    }

    /// One streamed chunk of this choice: `text` (None: no content), the logprobs
    /// gathered since the last chunk, and the finish reason if this is the last.
    fn chunk(&mut self, head: &Head, text: Option<&str>, finish: Option<FinishReason>) -> Value {
        let logprobs = self.take_logprobs();
        let choice = match head.kind {
            Kind::Completion => json!({
                "index": self.index, "text": text.unwrap_or(""), "logprobs": logprobs,
                "finish_reason": finish,
            }),
            Kind::Chat => {
                let delta = match text {
                    Some(t) => json!({"content": t}),
                    None => json!({}),
                };
                json!({"index": self.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
            }
        };
        head.wrap(json!([choice]), true)
    }
}

/// A number for a tool call's id, unique in this process (ids need only be unique
/// within a conversation).
pub(super) fn next_call_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// A tool call's id (`i`: its place in the message).
pub(super) fn call_id(i: usize) -> String {
    format!("call_{:016x}_{i}", next_call_id())
}

/// The usage of a request: each prompt's tokens once, every choice's completion.
fn total_usage(parts: &[(bool, Usage)]) -> Usage {
    let mut u = Usage::default();
    for (counts_prompt, p) in parts {
        if *counts_prompt {
            u.prompt_tokens += p.prompt_tokens;
        }
        u.completion_tokens += p.completion_tokens;
    }
    u.total_tokens = u.prompt_tokens + u.completion_tokens;
    u
}

/// The whole response of a non-streaming request: every choice to its end (any error
/// fails the request; returning drops the other choices' receivers, which cancels them).
pub(super) async fn collect(
    head: &Head,
    choices: Vec<(Choice, Generation)>,
) -> Result<Value, ApiError> {
    let done = futures::future::join_all(
        choices
            .into_iter()
            .map(|(c, g)| collect_one(head.kind, c, g)),
    )
    .await;
    let mut bodies = Vec::with_capacity(done.len());
    let mut usages = Vec::with_capacity(done.len());
    for d in done {
        let (body, usage) = d?;
        bodies.push(body);
        usages.push(usage);
    }
    let mut v = head.wrap(Value::Array(bodies), false);
    v["usage"] = json!(total_usage(&usages));
    Ok(v)
}

async fn collect_one(
    kind: Kind,
    mut c: Choice,
    generation: Generation,
) -> Result<(Value, (bool, Usage)), ApiError> {
    let Generation {
        first,
        mut rx,
        deadline,
    } = generation;
    let mut text = c.echo.as_ref().map(|(t, _)| t.clone()).unwrap_or_default();
    let mut ev = Some(first);
    loop {
        match &ev {
            None => {
                return Err(ApiError::Internal(
                    "generation ended without a result".into(),
                ));
            }
            Some(Event::Error(e)) => return Err(ApiError::from(e.clone())),
            Some(e) => {
                text.push_str(&c.absorb(e));
                if let Event::Done {
                    finish_reason,
                    usage,
                    ..
                } = e
                {
                    return Ok((
                        c.full(kind, &text, *finish_reason),
                        (c.counts_prompt, *usage),
                    ));
                }
            }
        }
        ev = deadline.recv(&mut rx).await?;
    }
}

/// The SSE chunks of a streaming request: every choice's, as they come, then the usage
/// (if asked for) and `[DONE]`.
pub(super) fn sse_stream(
    head: Head,
    choices: Vec<(Choice, Generation)>,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    async_stream(move |tx| async move {
        if head.kind == Kind::Chat {
            for (c, _) in &choices {
                let opening = head.wrap(
                    json!([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]),
                    true,
                );
                if tx.send(sse(&opening)).await.is_err() {
                    return;
                }
            }
        }
        let done = futures::future::join_all(
            choices
                .into_iter()
                .map(|(c, g)| stream_one(&head, c, g, &tx)),
        )
        .await;
        let usages: Option<Vec<(bool, Usage)>> = done.into_iter().collect();
        if head.include_usage
            && let Some(usages) = usages
        {
            let mut u = head.wrap(json!([]), true);
            u["usage"] = json!(total_usage(&usages));
            if tx.send(sse(&u)).await.is_err() {
                return;
            }
        }
        let _ = tx.send(SseEvent::default().data("[DONE]")).await;
    })
}

fn sse(v: &Value) -> SseEvent {
    SseEvent::default().data(v.to_string())
}

/// One choice's chunks; its usage when it finished, `None` when it failed (the error
/// went out as an event) or the client went away.
async fn stream_one(
    head: &Head,
    mut c: Choice,
    generation: Generation,
    tx: &mpsc::Sender<SseEvent>,
) -> Option<(bool, Usage)> {
    let Generation {
        first,
        mut rx,
        deadline,
    } = generation;
    // The echoed prompt goes first; with logprobs, once they have come (they precede
    // every token).
    let mut echo_pending = c.echo.as_ref().map(|(t, _)| t.clone());
    if c.logprobs.is_none()
        && let Some(t) = echo_pending.take()
    {
        tx.send(sse(&c.chunk(head, Some(&t), None))).await.ok()?;
    }
    let mut ev = Some(first);
    loop {
        let out = match ev.take() {
            Some(Event::Done {
                text,
                finish_reason,
                usage,
            }) => {
                let mut chunks = c.text_chunks(head, &text);
                chunks.extend(c.closing_chunks(head));
                for chunk in chunks {
                    tx.send(sse(&chunk)).await.ok()?;
                }
                let mut last = c.chunk(head, None, Some(finish_reason));
                if head.kind == Kind::Completion {
                    last["choices"][0]["text"] = json!("");
                }
                if finish_reason == FinishReason::Stop
                    && c.tool_stream.as_ref().is_some_and(ToolStream::called)
                {
                    last["choices"][0]["finish_reason"] = json!("tool_calls");
                }
                tx.send(sse(&last)).await.ok()?;
                return Some((c.counts_prompt, usage));
            }
            Some(Event::Error(e)) => {
                let _ = tx.send(sse(&ApiError::from(e).body())).await;
                return None;
            }
            Some(e @ Event::PromptLogprobs(_)) => {
                c.absorb(&e);
                echo_pending
                    .take()
                    .map(|t| c.chunk(head, Some(&t), None))
                    .into_iter()
                    .collect()
            }
            Some(e @ Event::Token { .. }) => {
                let text = c.absorb(&e);
                c.text_chunks(head, &text)
            }
            None => return None,
        };
        for chunk in out {
            // An error: the client went away; returning drops `rx`, which frees the
            // sequence.
            tx.send(sse(&chunk)).await.ok()?;
        }
        ev = match deadline.recv(&mut rx).await {
            Ok(ev) => ev,
            Err(e) => {
                // The status line went out long ago: the error travels as an event, and
                // returning drops `rx`, which cancels the sequence.
                let _ = tx.send(sse(&e.body())).await;
                return None;
            }
        };
    }
}

/// A stream fed by a task through a small channel; the task ends (dropping what it
/// holds) when the stream is dropped.
fn async_stream<F, Fut>(f: F) -> impl Stream<Item = Result<SseEvent, Infallible>>
where
    F: FnOnce(mpsc::Sender<SseEvent>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(16);
    let task = tokio::spawn(f(tx));
    let abort = AbortOnDrop(task);
    futures::stream::unfold((rx, abort), |(mut rx, abort)| async move {
        rx.recv().await.map(|ev| (Ok(ev), (rx, abort)))
    })
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
