//! What the HTTP layer hands the scheduler, and what comes back.

use switchyard_engine::SamplingParams;
use switchyard_engine::sampling::TokenLogprobs;

use crate::structured::Constraint;
use tokio::sync::mpsc;

/// A validated, tokenised generation request.
#[derive(Debug)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// `None`: a fresh random seed.
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    /// Token ids that end the sequence (not part of the text), also under `ignore_eos`.
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// Report each generated token's logprob with this many alternatives (`None`: not).
    pub logprobs: Option<usize>,
    /// The same for every prompt token (`echo` with `logprobs`); sent once prefill ends.
    pub prompt_logprobs: Option<usize>,
    /// Structured output: the grammar that masks every step's tokens.
    pub constraint: Option<Constraint>,
    /// When the request reached the server, for latency metrics.
    pub arrived: std::time::Instant,
    /// Where tokens go. Dropping the receiver (client gone) cancels the request.
    pub events: mpsc::UnboundedSender<Event>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    Stop,
    Length,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Per prompt token, its logprob under the model given the tokens before it (the
    /// first has none), when asked for; before any token.
    PromptLogprobs(Vec<Option<TokenLogprobs>>),
    /// One sampled token and the text it completed (possibly empty).
    Token {
        id: u32,
        text: String,
        logprobs: Option<TokenLogprobs>,
    },
    /// Final event of a successful request; `text` is what was held back until the end.
    Done {
        text: String,
        finish_reason: FinishReason,
        usage: Usage,
    },
    Error(GenerateError),
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GenerateError {
    #[error("the waiting queue is full ({0} requests); retry later")]
    QueueFull(usize),
    #[error("request needs {needed} KV-cache blocks but the server has {total}")]
    TooLargeForCache { needed: usize, total: usize },
    #[error("experts unavailable: {0}")]
    ExpertsUnavailable(String),
    #[error("the scheduler has stopped")]
    ShuttingDown,
    #[error("internal error: {0}")]
    Internal(String),
}
