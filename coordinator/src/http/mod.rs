//! The OpenAI-compatible HTTP API: `/v1/completions`, `/v1/chat/completions` (both with
//! SSE streaming), `/v1/models`, `/health`.

pub mod auth;
pub mod error;
pub mod logprobs;
pub mod openai;
pub mod params;
mod response;
mod tool_stream;
pub mod transport;

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use switchyard_engine::tokenizer::Tokenizer;
use tokio::sync::mpsc;
use tracing::{Instrument, info_span};

use crate::metrics::Metrics;
use crate::request::{Event, GenerateRequest};
use crate::scheduler::SchedulerHandle;
use crate::structured::{Constraint, Grammars};
use auth::ApiKeys;
use error::ApiError;
use logprobs::LogprobsWriter;
use openai::{Input, InputContext, Limits, Params, chat_input, completion_input};
use response::{Choice, Deadline, Generation, Head, Kind, collect, sse_stream};
use tool_stream::ToolStream;
use transport::{BodyCut, Timeouts};

/// Largest request body accepted by default (`--max-body-bytes`).
pub const MAX_BODY_BYTES: usize = 4 << 20;

/// Who may call the API, what a request may ask for, and how long sending it may take.
#[derive(Debug, Clone, Default)]
pub struct HttpConfig {
    /// Empty: no key needed.
    pub api_keys: ApiKeys,
    /// Whether `/metrics` needs a key too (it is open by default, for scrapers).
    pub metrics_require_key: bool,
    pub limits: Limits,
    /// Read timeouts and the shutdown grace period of the connections.
    pub timeouts: Timeouts,
}

pub type HealthCheck = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;
/// Brings scrape-time gauges (node liveness) up to date.
pub type Refresh = Arc<dyn Fn() + Send + Sync>;

#[derive(Clone)]
pub struct AppState {
    pub scheduler: SchedulerHandle,
    pub tokenizer: Arc<Tokenizer>,
    pub model_name: String,
    pub context_len: usize,
    pub vocab_size: usize,
    pub health: HealthCheck,
    pub metrics: Arc<Metrics>,
    pub refresh_metrics: Refresh,
    pub http: Arc<HttpConfig>,
    /// Structured output's grammar compiler; `None` when the tokenizer could not be mapped.
    pub grammars: Option<Arc<Grammars>>,
}

pub fn router(state: AppState) -> Router {
    let body_limit = state.http.limits.max_body_bytes;
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        // Inside the counter, so refusals show in the request metrics; before routing, so
        // a caller without a key learns nothing, not even which paths exist.
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_key,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

/// Counts every response by endpoint and status.
async fn count_requests(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let endpoint = match req.uri().path() {
        "/v1/completions" => "completions",
        "/v1/chat/completions" => "chat_completions",
        "/v1/models" => "models",
        "/health" => "health",
        "/metrics" => "metrics",
        _ => "other",
    };
    let resp = next.run(req).await;
    s.metrics
        .requests
        .with_label_values(&[endpoint, resp.status().as_str()])
        .inc();
    resp
}

async fn metrics(State(s): State<AppState>) -> Response {
    (s.refresh_metrics)();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn request_id(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!(
        "{prefix}-{:x}{:06x}",
        now(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// 200 with the scheduler's numbers while the scheduler runs and every expert is
/// reachable, else 503 with the reason.
async fn health(State(s): State<AppState>) -> Response {
    use std::sync::atomic::Ordering::Relaxed;
    let status = match s.scheduler.failure() {
        Some(reason) => Err(reason),
        None => (s.health)(),
    };
    match status {
        Ok(()) => {
            let st = s.scheduler.stats();
            axum::Json(json!({
                "status": "ok",
                "running": st.running.load(Relaxed),
                "waiting": st.waiting.load(Relaxed),
                "kv_total_blocks": st.kv_total_blocks.load(Relaxed),
                "kv_free_blocks": st.kv_free_blocks.load(Relaxed),
                "kv_cached_blocks": st.kv_cached_blocks.load(Relaxed),
                "steps": st.steps.load(Relaxed),
            }))
            .into_response()
        }
        Err(reason) => ApiError::Unavailable(reason).into_response(),
    }
}

async fn models(State(s): State<AppState>) -> Response {
    axum::Json(json!({
        "object": "list",
        "data": [{
            "id": s.model_name,
            "object": "model",
            "created": now(),
            "owned_by": "switchyard",
            "max_model_len": s.context_len,
        }]
    }))
    .into_response()
}

/// The body, or the error a client should see when it could not be read (too large:
/// 413; not in time: 408; cut by a shutdown: 503; otherwise 400), in OpenAI's shape
/// rather than axum's plain text.
fn read_body(body: Result<Bytes, BytesRejection>, limit: usize) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if let Some(cut) = BodyCut::find(&rejection) {
            match cut {
                BodyCut::TimedOut(_) => ApiError::BodyTimeout(cut.to_string()),
                BodyCut::ShuttingDown => ApiError::Unavailable(cut.to_string()),
            }
        } else if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge(format!("request body exceeds {limit} bytes"))
        } else {
            ApiError::BadRequest {
                message: format!("cannot read the request body: {}", rejection.body_text()),
                param: None,
            }
        }
    })
}

/// What the input checks need from the server's state.
fn input_context(s: &AppState) -> InputContext<'_> {
    InputContext {
        model_name: &s.model_name,
        grammars: s.grammars.as_deref(),
        limits: &s.http.limits,
        tokenizer: &s.tokenizer,
        vocab_size: s.vocab_size,
    }
}

async fn completions(State(s): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    let arrived = Instant::now();
    let id = request_id("cmpl");
    let span = info_span!("request", %id, endpoint = "completions");
    async move {
        let result = async {
            let body = read_body(body, s.http.limits.max_body_bytes)?;
            let st = s.clone();
            // Parsing and tokenising up to the body limit is CPU work: off the async
            // workers, so one large request does not stall every other connection.
            blocking(move || completion_input(&body, &input_context(&st))).await?
        }
        .await;
        match result {
            Ok(input) => generate(s, Kind::Completion, id, arrived, input, 16).await,
            Err(e) => e.into_response(),
        }
    }
    .instrument(span)
    .await
}

async fn chat_completions(
    State(s): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let arrived = Instant::now();
    let id = request_id("chatcmpl");
    let span = info_span!("request", %id, endpoint = "chat");
    async move {
        let result = async {
            let body = read_body(body, s.http.limits.max_body_bytes)?;
            let st = s.clone();
            blocking(move || chat_input(&body, &input_context(&st))).await?
        }
        .await;
        match result {
            // Chat defaults to "as long as the context allows", like vLLM.
            Ok(input) => generate(s, Kind::Chat, id, arrived, input, usize::MAX).await,
            Err(e) => e.into_response(),
        }
    }
    .instrument(span)
    .await
}

async fn generate(
    s: AppState,
    kind: Kind,
    id: String,
    arrived: Instant,
    input: Input,
    default_max_tokens: usize,
) -> Response {
    let Input {
        prompts,
        params,
        constraint,
    } = input;
    let tools = params.tools.clone().map(Arc::new);
    let deadline = Deadline::new(arrived, s.http.limits.request_timeout);
    // Every choice is submitted before any is awaited, so they share steps. Returning
    // early drops the receivers of those already submitted, which cancels them.
    let mut pending = Vec::with_capacity(prompts.len() * params.n);
    for prompt in prompts {
        let max_tokens = match max_tokens_for(&s, &prompt.ids, &params, default_max_tokens) {
            Ok(n) => n,
            Err(e) => return e.into_response(),
        };
        // Echo puts the prompt in front: as sent when it was text, else decoded.
        let echo = params.echo.then(|| {
            let text = prompt
                .text
                .clone()
                .unwrap_or_else(|| s.tokenizer.decode(&prompt.ids, false).unwrap_or_default());
            (text, prompt.ids.clone())
        });
        for i in 0..params.n {
            let (tx, rx) = mpsc::unbounded_channel();
            let submitted = s.scheduler.submit(GenerateRequest {
                prompt: prompt.ids.clone(),
                max_tokens,
                sampling: params.sampling.clone(),
                // Each of n choices draws its own stream, reproducibly when seeded.
                seed: params.seed.map(|seed| seed.wrapping_add(i as u64)),
                stop: params.stop.clone(),
                stop_token_ids: params.stop_token_ids.clone(),
                ignore_eos: params.ignore_eos,
                logprobs: params.logprobs,
                prompt_logprobs: params.prompt_logprobs,
                constraint: constraint.as_ref().map(Constraint::fork),
                arrived,
                events: tx,
            });
            if let Err(e) = submitted {
                return ApiError::from(e).into_response();
            }
            let choice = Choice {
                index: pending.len(),
                counts_prompt: i == 0,
                tokenizer: s.tokenizer.clone(),
                echo: echo.clone(),
                logprobs: params
                    .logprobs
                    .map(|_| LogprobsWriter::new(kind == Kind::Chat)),
                tools: tools.clone(),
                tool_stream: tools
                    .clone()
                    .filter(|_| params.stream && kind == Kind::Chat)
                    .map(|t| ToolStream::new(t, response::call_id(0))),
            };
            pending.push((choice, rx));
        }
    }
    // Wait for each choice's first event so a request that fails before producing
    // anything gets a real error status rather than a 200 stream holding an error.
    let mut choices = Vec::with_capacity(pending.len());
    for (choice, mut rx) in pending {
        let first = match deadline.recv(&mut rx).await {
            Err(e) => return e.into_response(),
            Ok(Some(Event::Error(e))) => return ApiError::from(e).into_response(),
            Ok(Some(ev)) => ev,
            Ok(None) => {
                return ApiError::Internal("generation ended without a result".into())
                    .into_response();
            }
        };
        choices.push((
            choice,
            Generation {
                first,
                rx,
                deadline,
            },
        ));
    }
    let head = Head {
        kind,
        id,
        created: now(),
        model: s.model_name.clone(),
        include_usage: params.include_usage,
    };
    if params.stream {
        Sse::new(sse_stream(head, choices))
            .keep_alive(KeepAlive::default())
            .into_response()
    } else {
        match collect(&head, choices).await {
            Ok(body) => axum::Json(body).into_response(),
            Err(e) => e.into_response(),
        }
    }
}

/// The tokens to generate for `prompt`: as asked, or what the endpoint's default and the
/// context leave; an error when the prompt or the total is too long.
fn max_tokens_for(
    s: &AppState,
    prompt: &[u32],
    params: &Params,
    default_max_tokens: usize,
) -> Result<usize, ApiError> {
    let limits = &s.http.limits;
    if let Some(limit) = limits.max_prompt_tokens
        && prompt.len() > limit
    {
        return Err(ApiError::PromptTooLong {
            tokens: prompt.len(),
            limit,
        });
    }
    let room = s.context_len.saturating_sub(prompt.len());
    let max_tokens = match params.max_tokens {
        Some(n) => n,
        None if room == 0 => 1, // reported below as a context-length error
        None => default_max_tokens
            .min(room)
            .min(limits.max_completion_tokens.unwrap_or(usize::MAX)),
    };
    if prompt.len().saturating_add(max_tokens) > s.context_len {
        return Err(ApiError::ContextLength {
            context: s.context_len,
            requested: prompt.len().saturating_add(max_tokens),
            prompt: prompt.len(),
            max_tokens,
        });
    }
    Ok(max_tokens)
}

/// Runs CPU-bound work (parsing and tokenising a body of up to the size limit) on the
/// blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(format!("request parsing task failed: {e}")))
}
