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
use crate::request::{Event, FinishReason, Usage};

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

/// Everything a response says besides the generated text.
pub(super) struct Render {
    pub kind: Kind,
    pub id: String,
    pub created: u64,
    pub model: String,
    pub tokenizer: Arc<Tokenizer>,
    /// `echo`: the prompt's text and ids, in front of the completion.
    pub echo: Option<(String, Vec<u32>)>,
    /// Present when logprobs were asked for.
    pub logprobs: Option<LogprobsWriter>,
    pub include_usage: bool,
}

impl Render {
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

    fn full(&mut self, text: &str, finish_reason: FinishReason, usage: Usage) -> Value {
        let logprobs = self.take_logprobs();
        let (id, created, model) = (&self.id, self.created, &self.model);
        match self.kind {
            Kind::Completion => json!({
                "id": id, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
                "usage": usage,
            }),
            Kind::Chat => json!({
                "id": id, "object": "chat.completion", "created": created, "model": model,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": logprobs,
                    "finish_reason": finish_reason,
                }],
                "usage": usage,
            }),
        }
    }

    /// One streamed chunk: `text` (None: no content), the logprobs gathered since the
    /// last chunk, and the finish reason if this is the last.
    fn chunk(&mut self, text: Option<&str>, finish: Option<FinishReason>) -> Value {
        let logprobs = self.take_logprobs();
        let (id, created, model) = (&self.id, self.created, &self.model);
        match self.kind {
            Kind::Completion => json!({
                "id": id, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text.unwrap_or(""), "logprobs": logprobs, "finish_reason": finish}],
            }),
            Kind::Chat => {
                let delta = match text {
                    Some(t) => json!({"content": t}),
                    None => json!({}),
                };
                json!({
                    "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
                })
            }
        }
    }

    fn has_logprobs(&self) -> bool {
        self.logprobs.as_ref().is_some_and(|w| !w.is_empty())
    }
}

/// The whole response of a non-streaming request.
pub(super) async fn collect(mut r: Render, generation: Generation) -> Result<Value, ApiError> {
    let Generation {
        first,
        mut rx,
        deadline,
    } = generation;
    let mut text = r.echo.as_ref().map(|(t, _)| t.clone()).unwrap_or_default();
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
                text.push_str(&r.absorb(e));
                if let Event::Done {
                    finish_reason,
                    usage,
                    ..
                } = e
                {
                    return Ok(r.full(&text, *finish_reason, *usage));
                }
            }
        }
        // Returning drops `rx`, which tells the scheduler to drop the sequence and free
        // its KV-cache blocks.
        ev = deadline.recv(&mut rx).await?;
    }
}

/// The SSE chunks of a streaming request.
pub(super) fn sse_stream(
    mut r: Render,
    generation: Generation,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let Generation {
        first,
        mut rx,
        deadline,
    } = generation;
    async_stream(move |tx| async move {
        let send = |v: Value| SseEvent::default().data(v.to_string());
        if r.kind == Kind::Chat {
            let opening = json!({
                "id": r.id, "object": "chat.completion.chunk", "created": r.created, "model": r.model,
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}],
            });
            if tx.send(send(opening)).await.is_err() {
                return;
            }
        }
        // The echoed prompt goes first; with logprobs, once they have come (they precede
        // every token).
        let mut echo_pending = r.echo.as_ref().map(|(t, _)| t.clone());
        if r.logprobs.is_none()
            && let Some(t) = echo_pending.take()
            && tx.send(send(r.chunk(Some(&t), None))).await.is_err()
        {
            return;
        }
        let mut ev = Some(first);
        loop {
            let out = match ev.take() {
                Some(Event::Done {
                    text,
                    finish_reason,
                    usage,
                }) => {
                    if !text.is_empty() && tx.send(send(r.chunk(Some(&text), None))).await.is_err()
                    {
                        return;
                    }
                    let mut last = r.chunk(None, Some(finish_reason));
                    if r.kind == Kind::Completion {
                        last["choices"][0]["text"] = json!("");
                    }
                    if tx.send(send(last)).await.is_err() {
                        return;
                    }
                    if r.include_usage {
                        let object = if r.kind == Kind::Chat {
                            "chat.completion.chunk"
                        } else {
                            "text_completion"
                        };
                        let u = json!({"id": r.id, "object": object, "created": r.created, "model": r.model, "choices": [], "usage": usage});
                        if tx.send(send(u)).await.is_err() {
                            return;
                        }
                    }
                    let _ = tx.send(SseEvent::default().data("[DONE]")).await;
                    return;
                }
                Some(Event::Error(e)) => {
                    let _ = tx.send(send(ApiError::from(e).body())).await;
                    let _ = tx.send(SseEvent::default().data("[DONE]")).await;
                    return;
                }
                Some(e @ Event::PromptLogprobs(_)) => {
                    r.absorb(&e);
                    echo_pending.take().map(|t| send(r.chunk(Some(&t), None)))
                }
                Some(e @ Event::Token { .. }) => {
                    let text = r.absorb(&e);
                    // With logprobs every token gets its chunk, even one whose text is
                    // held back (a partial character or a possible stop sequence).
                    (!text.is_empty() || r.has_logprobs()).then(|| send(r.chunk(Some(&text), None)))
                }
                None => return,
            };
            if let Some(event) = out
                && tx.send(event).await.is_err()
            {
                // The client went away: dropping `rx` tells the scheduler to free it.
                return;
            }
            ev = match deadline.recv(&mut rx).await {
                Ok(ev) => ev,
                Err(e) => {
                    // The status line went out long ago: the error travels as the last
                    // event, and returning drops `rx`, which cancels the sequence.
                    let _ = tx.send(send(e.body())).await;
                    let _ = tx.send(SseEvent::default().data("[DONE]")).await;
                    return;
                }
            };
            if ev.is_none() {
                return;
            }
        }
    })
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
