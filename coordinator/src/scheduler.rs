//! Continuous batching. One thread owns the model, the KV cache and every sequence; the
//! HTTP layer talks to it over a channel (the actor pattern of TGI's queue).
//!
//! Each step: drop sequences whose client went away, admit waiting requests while KV
//! blocks last (a request reserves blocks for prompt + max_tokens up front, so a running
//! sequence never runs out mid-generation and nothing needs preempting; requests that do
//! not fit wait), then build one batch under the token budget: one token for every
//! decoding sequence first, then prompt chunks of the prefilling ones, so long prompts
//! are prefilled in pieces while running decodes keep streaming.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use switchyard_engine::sampling::TokenLogprobs;
use switchyard_engine::tokenizer::Tokenizer;
use switchyard_engine::{
    DenseModel, ExpertError, Experts, ForwardOutput, KvCache, LogitsFor, ModelError, Sampler,
    SeqCache, SeqChunk,
};
use tracing::{debug, debug_span, warn};

use crate::metrics::Metrics;
use crate::output::TextOutput;
use crate::overlap::MicroBatchTuner;
use crate::request::{Event, FinishReason, GenerateError, GenerateRequest, Usage};
use crate::structured::Constraint;

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Tokens (decode tokens + prefill chunk tokens) in one step.
    pub max_batch_tokens: usize,
    /// Sequences in the running batch.
    pub max_running: usize,
    /// Requests waiting for admission before new ones are refused (HTTP 429).
    pub max_waiting: usize,
    pub kv_block_size: usize,
    pub kv_cache_bytes: usize,
    /// Micro-batches a step may be split into, taking turns per layer so one's experts are
    /// away while another attends (`None`: auto, two where measured faster: `overlap`).
    /// Only steps of up to 32 tokens are split: that changes no bit of any result.
    pub micro_batches: Option<usize>,
    /// Reuse the KV blocks of prompt prefixes computed before (`--no-prefix-caching`
    /// turns it off).
    pub prefix_caching: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_batch_tokens: 512,
            max_running: 64,
            max_waiting: 256,
            kv_block_size: 16,
            kv_cache_bytes: 256 << 20,
            micro_batches: None,
            prefix_caching: true,
        }
    }
}

/// Live numbers the scheduler publishes for `/health` and `/metrics`.
#[derive(Debug, Default)]
pub struct SchedulerStats {
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
    pub kv_total_blocks: AtomicUsize,
    pub kv_free_blocks: AtomicUsize,
    /// Blocks holding a cached prompt prefix (in use or kept for later prompts).
    pub kv_cached_blocks: AtomicUsize,
    pub steps: AtomicU64,
    pub last_batch_tokens: AtomicUsize,
}

#[derive(Clone)]
pub struct SchedulerHandle {
    tx: mpsc::Sender<GenerateRequest>,
    /// Becomes `Some(reason)` if the scheduler thread dies (a panic): the process must
    /// then stop looking healthy, since nothing will ever be served again.
    failure: tokio::sync::watch::Receiver<Option<String>>,
    stats: Arc<SchedulerStats>,
    max_waiting: usize,
    kv_blocks: usize,
    kv_block_size: usize,
}

impl SchedulerHandle {
    /// Queues a request; refuses it at once if the waiting queue is full or it could
    /// never fit in the KV cache.
    pub fn submit(&self, req: GenerateRequest) -> Result<(), GenerateError> {
        let needed = (req.prompt.len() + req.max_tokens).div_ceil(self.kv_block_size);
        if needed > self.kv_blocks {
            return Err(GenerateError::TooLargeForCache {
                needed,
                total: self.kv_blocks,
            });
        }
        let waiting = &self.stats.waiting;
        if waiting
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| {
                (w < self.max_waiting).then_some(w + 1)
            })
            .is_err()
        {
            return Err(GenerateError::QueueFull(self.max_waiting));
        }
        self.tx.send(req).map_err(|_| {
            waiting.fetch_sub(1, Ordering::SeqCst);
            GenerateError::ShuttingDown
        })
    }

    pub fn stats(&self) -> &SchedulerStats {
        &self.stats
    }

    /// Why the scheduler thread died, if it did.
    pub fn failure(&self) -> Option<String> {
        self.failure.borrow().clone()
    }

    /// Resolves with the reason when the scheduler thread dies; never if it does not.
    pub fn died(&self) -> impl std::future::Future<Output = String> + Send + 'static {
        let mut failure = self.failure.clone();
        async move {
            let reason = match failure.wait_for(Option::is_some).await {
                Ok(reason) => reason.clone(),
                Err(_) => None,
            };
            match reason {
                Some(r) => r,
                // The thread ended normally (every handle dropped): nothing to report.
                None => std::future::pending().await,
            }
        }
    }
}

struct Sequence {
    prompt: Vec<u32>,
    /// Prompt tokens already fed to the model.
    fed: usize,
    /// Sampled but not yet fed.
    next_input: Option<u32>,
    generated: usize,
    max_tokens: usize,
    ignore_eos: bool,
    /// Tokens that end the sequence like EOS does, also under `ignore_eos`.
    stop_token_ids: Vec<u32>,
    /// Alternatives to report with each generated / prompt token's logprob.
    logprobs: Option<usize>,
    prompt_logprobs: Option<usize>,
    /// Prompt logprobs gathered over the prefill chunks, sent when prefill ends.
    prompt_lp: Vec<Option<TokenLogprobs>>,
    /// Structured output's grammar state.
    constraint: Option<Constraint>,
    cache: SeqCache,
    sampler: Sampler,
    output: TextOutput,
    events: tokio::sync::mpsc::UnboundedSender<Event>,
    arrived: Instant,
    first_token_at: Option<Instant>,
}

impl Sequence {
    fn prefilling(&self) -> bool {
        self.fed < self.prompt.len()
    }

    fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt.len(),
            completion_tokens: self.generated,
            total_tokens: self.prompt.len() + self.generated,
        }
    }
}

pub struct Scheduler {
    model: Arc<DenseModel>,
    experts: Arc<dyn Experts>,
    tokenizer: Arc<Tokenizer>,
    config: SchedulerConfig,
    kv: KvCache,
    rx: mpsc::Receiver<GenerateRequest>,
    waiting: VecDeque<GenerateRequest>,
    running: Vec<Sequence>,
    stats: Arc<SchedulerStats>,
    metrics: Arc<Metrics>,
    eos: Vec<u32>,
    seed_counter: u64,
    /// `--micro-batches auto`'s measurements.
    tuner: MicroBatchTuner,
}

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("allocating the KV cache: {0}")]
    KvCache(#[from] ModelError),
    #[error("starting the scheduler thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// Starts the scheduler thread. It runs until every handle is dropped.
pub fn spawn(
    model: Arc<DenseModel>,
    experts: Arc<dyn Experts>,
    tokenizer: Arc<Tokenizer>,
    config: SchedulerConfig,
    metrics: Arc<Metrics>,
) -> Result<SchedulerHandle, SpawnError> {
    let mut kv = model.new_kv_cache(config.kv_block_size, config.kv_cache_bytes)?;
    kv.set_prefix_caching(config.prefix_caching);
    let (tx, rx) = mpsc::channel();
    let (failed, failure) = tokio::sync::watch::channel(None);
    let stats = Arc::new(SchedulerStats::default());
    stats
        .kv_total_blocks
        .store(kv.num_blocks(), Ordering::Relaxed);
    stats
        .kv_free_blocks
        .store(kv.free_blocks(), Ordering::Relaxed);
    let handle = SchedulerHandle {
        tx,
        failure,
        stats: stats.clone(),
        max_waiting: config.max_waiting,
        kv_blocks: kv.num_blocks(),
        kv_block_size: config.kv_block_size,
    };
    let mut eos: Vec<u32> = tokenizer.eos_token_ids().to_vec();
    eos.extend(&model.config().eos_token_ids);
    eos.sort_unstable();
    eos.dedup();
    let scheduler = Scheduler {
        model,
        experts,
        tokenizer,
        config: SchedulerConfig {
            // Every running sequence must be able to decode in every step.
            max_batch_tokens: config.max_batch_tokens.max(config.max_running),
            ..config
        },
        kv,
        rx,
        waiting: VecDeque::new(),
        running: Vec::new(),
        stats,
        metrics,
        eos,
        seed_counter: u64::from(std::process::id()) << 32,
        tuner: MicroBatchTuner::default(),
    };
    std::thread::Builder::new()
        .name("scheduler".into())
        .spawn(move || {
            // Unwinding drops every sequence's event sender, so each client in flight gets
            // an error; the reason goes to /health and to the server, which stops.
            let outcome =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| scheduler.run()));
            if let Err(panic) = outcome {
                let reason = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                tracing::error!("the scheduler thread panicked: {reason}");
                let _ = failed.send(Some(format!("the scheduler thread panicked: {reason}")));
            }
        })?;
    Ok(handle)
}

impl Scheduler {
    fn run(mut self) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                // Idle: block until work arrives, or stop when every handle is gone.
                match self.rx.recv() {
                    Ok(req) => self.waiting.push_back(req),
                    Err(_) => return,
                }
            }
            while let Ok(req) = self.rx.try_recv() {
                self.waiting.push_back(req);
            }
            self.drop_cancelled();
            self.admit();
            self.step();
            self.publish();
        }
    }

    fn publish(&self) {
        self.stats
            .running
            .store(self.running.len(), Ordering::Relaxed);
        self.stats
            .kv_free_blocks
            .store(self.kv.free_blocks(), Ordering::Relaxed);
        self.stats
            .kv_cached_blocks
            .store(self.kv.cached_blocks(), Ordering::Relaxed);
        let m = &self.metrics;
        m.kv_cached_blocks.set(self.kv.cached_blocks() as i64);
        m.running.set(self.running.len() as i64);
        m.waiting
            .set(self.stats.waiting.load(Ordering::Relaxed) as i64);
        m.kv_total_blocks.set(self.kv.num_blocks() as i64);
        m.kv_used_blocks
            .set((self.kv.num_blocks() - self.kv.free_blocks()) as i64);
    }

    fn drop_cancelled(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|r| !r.events.is_closed());
        self.stats
            .waiting
            .fetch_sub(before - self.waiting.len(), Ordering::SeqCst);
        let kv = &mut self.kv;
        self.running.retain_mut(|s| {
            if s.events.is_closed() {
                debug!("client went away: freeing its sequence");
                kv.release(&mut s.cache);
                false
            } else {
                true
            }
        });
    }

    fn admit(&mut self) {
        while self.running.len() < self.config.max_running {
            let Some(front) = self.waiting.front() else {
                break;
            };
            let len = front.prompt.len() + front.max_tokens;
            if self.kv.blocks_for(len) > self.kv.free_blocks() {
                break; // wait for blocks to come back; first come, first served
            }
            let Some(req) = self.waiting.pop_front() else {
                break;
            };
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            self.metrics.prompt_tokens.inc_by(req.prompt.len() as u64);
            let mut cache = SeqCache::new();
            // A prompt whose logprobs are asked for computes every position.
            let hit = if self.config.prefix_caching && req.prompt_logprobs.is_none() {
                self.metrics.prefix_queries.inc_by(req.prompt.len() as u64);
                let hit = self.kv.reuse_prefix(&mut cache, &req.prompt);
                self.metrics.prefix_hits.inc_by(hit as u64);
                hit
            } else {
                0
            };
            if let Err(e) = self.kv.reserve(&mut cache, len - hit) {
                self.kv.release(&mut cache);
                let _ = req
                    .events
                    .send(Event::Error(GenerateError::Internal(e.to_string())));
                continue;
            }
            let seed = req.seed.unwrap_or_else(|| {
                self.seed_counter += 1;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0);
                self.seed_counter ^ now
            });
            let output = TextOutput::new(req.stop, &req.prompt);
            // min_tokens holds back whatever would end the sequence.
            let mut enders = req.stop_token_ids.clone();
            if !req.ignore_eos {
                enders.extend_from_slice(&self.eos);
            }
            let sampler = Sampler::new(req.sampling, seed)
                .with_prompt(&req.prompt)
                .with_stop_ids(&enders);
            self.running.push(Sequence {
                prompt: req.prompt,
                fed: hit,
                next_input: None,
                generated: 0,
                max_tokens: req.max_tokens,
                ignore_eos: req.ignore_eos,
                stop_token_ids: req.stop_token_ids,
                logprobs: req.logprobs,
                prompt_logprobs: req.prompt_logprobs,
                prompt_lp: Vec::new(),
                constraint: req.constraint,
                cache,
                sampler,
                output,
                events: req.events,
                arrived: req.arrived,
                first_token_at: None,
            });
        }
    }

    fn step(&mut self) {
        if self.running.is_empty() {
            return;
        }
        // (sequence index, input tokens) in batch order: decodes first, then prefill chunks.
        let mut plan: Vec<(usize, Vec<u32>)> = Vec::new();
        let mut budget = self.config.max_batch_tokens;
        for (i, s) in self.running.iter().enumerate() {
            if let Some(t) = s.next_input.filter(|_| !s.prefilling()) {
                plan.push((i, vec![t]));
                budget -= 1;
            }
        }
        for (i, s) in self.running.iter().enumerate() {
            if budget == 0 {
                break;
            }
            if s.prefilling() {
                let take = (s.prompt.len() - s.fed).min(budget);
                plan.push((i, s.prompt[s.fed..s.fed + take].to_vec()));
                budget -= take;
            }
        }
        let total: usize = plan.iter().map(|(_, t)| t.len()).sum();
        // Prompt chunks whose logprobs were asked for need a row of logits per token.
        let every_row: Vec<bool> = plan
            .iter()
            .map(|(i, _)| {
                let s = &self.running[*i];
                s.prefilling() && s.prompt_logprobs.is_some()
            })
            .collect();
        let logits_for = if every_row.contains(&true) {
            LogitsFor::Chunks(every_row.clone())
        } else {
            LogitsFor::LastToken
        };
        let _span = debug_span!("step", sequences = plan.len(), tokens = total).entered();
        self.stats.last_batch_tokens.store(total, Ordering::Relaxed);
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        self.metrics.batch_tokens.observe(total as f64);
        self.metrics.batch_sequences.observe(plan.len() as f64);

        let result = {
            let mut slots: Vec<Option<&mut Sequence>> = self.running.iter_mut().map(Some).collect();
            let mut batch: Vec<SeqChunk<'_>> = Vec::with_capacity(plan.len());
            for (i, tokens) in &plan {
                if let Some(s) = slots[*i].take() {
                    batch.push(SeqChunk {
                        tokens,
                        cache: &mut s.cache,
                    });
                }
            }
            let allowed = self.model.max_micro_batches(total, batch.len());
            let parts = match self.config.micro_batches {
                Some(n) => n.min(allowed),
                None => self.tuner.choose(batch.len(), allowed),
            };
            if parts > 1 {
                self.metrics.split_steps.inc();
            }
            let started = Instant::now();
            let result = self.model.forward_split(
                &mut self.kv,
                self.experts.as_ref(),
                &mut batch,
                logits_for,
                false,
                parts,
            );
            if self.config.micro_batches.is_none() && result.is_ok() {
                self.tuner
                    .record(batch.len(), parts, total, started.elapsed());
            }
            result
        };
        let out = match result {
            Ok(out) => out,
            Err(e) => {
                let err = match &e {
                    ModelError::Experts(ExpertError::Unavailable(why)) => {
                        GenerateError::ExpertsUnavailable(why.clone())
                    }
                    ModelError::Experts(x) => GenerateError::ExpertsUnavailable(x.to_string()),
                    other => GenerateError::Internal(other.to_string()),
                };
                warn!(error = %e, "step failed: failing its sequences");
                let failed = plan
                    .iter()
                    .map(|(i, _)| (*i, Event::Error(err.clone())))
                    .collect();
                self.finish_many(failed);
                return;
            }
        };

        let mut finished: Vec<(usize, Event)> = Vec::new();
        let mut row = 0;
        for ((i, tokens), every) in plan.iter().zip(every_row) {
            let rows = row..row + if every { tokens.len() } else { 1 };
            row = rows.end;
            if let Some(last) = self.advance(*i, tokens.len(), &out, rows) {
                finished.push((*i, last));
            }
        }
        self.finish_many(finished);
    }

    /// Sequence `i` after a step that fed it `fed_now` tokens, whose logits are `rows` of
    /// `out`: its prompt logprobs, then its next token. Returns its final event if it ended.
    fn advance(
        &mut self,
        i: usize,
        fed_now: usize,
        out: &ForwardOutput,
        rows: std::ops::Range<usize>,
    ) -> Option<Event> {
        let s = &mut self.running[i];
        if s.prefilling() {
            if let Some(n) = s.prompt_logprobs {
                // Row j predicts prompt token fed + j + 1; the first token has no logprob.
                if s.fed == 0 {
                    s.prompt_lp.push(None);
                }
                for (j, r) in rows.clone().enumerate() {
                    if let Some(&token) = s.prompt.get(s.fed + j + 1) {
                        s.prompt_lp
                            .push(Some(TokenLogprobs::from_logits(out.row(r), token, n)));
                    }
                }
            }
            s.fed += fed_now;
            if s.prefilling() {
                return None; // a middle chunk of the prompt: no token to sample yet
            }
            if self.config.prefix_caching {
                self.kv.remember_prefix(&s.cache, &s.prompt);
            }
            if s.prompt_logprobs.is_some() {
                let _ = s
                    .events
                    .send(Event::PromptLogprobs(std::mem::take(&mut s.prompt_lp)));
            }
            if s.max_tokens == 0 {
                // Scoring only (echo with max_tokens 0): the prompt was all that was asked.
                return Some(Event::Done {
                    text: String::new(),
                    finish_reason: FinishReason::Length,
                    usage: s.usage(),
                });
            }
        }
        let logits = out.row(rows.end - 1);
        let id = match &mut s.constraint {
            None => s.sampler.sample(logits),
            Some(c) => {
                let mut grammar = std::time::Duration::ZERO;
                let masked = s.sampler.sample_restricted(logits, |l| {
                    let started = Instant::now();
                    let masked = c.mask(l);
                    grammar = started.elapsed();
                    masked
                });
                let id = match masked {
                    Ok(id) => id,
                    Err(e) => return Some(Event::Error(GenerateError::Internal(e))),
                };
                let started = Instant::now();
                if let Err(e) = c.accept(id) {
                    return Some(Event::Error(GenerateError::Internal(e)));
                }
                self.metrics
                    .grammar
                    .observe((grammar + started.elapsed()).as_secs_f64());
                id
            }
        };
        // A complete structured output ends the sequence, EOS or not (nothing else may
        // follow it).
        let complete = s.constraint.as_ref().is_some_and(Constraint::is_complete);
        let logprobs = s
            .logprobs
            .map(|n| TokenLogprobs::from_logits(logits, id, n));
        s.generated += 1;
        self.metrics.generation_tokens.inc();
        if s.first_token_at.is_none() {
            let now = Instant::now();
            s.first_token_at = Some(now);
            self.metrics
                .time_to_first_token
                .observe((now - s.arrived).as_secs_f64());
        }
        s.next_input = Some(id);
        let usage = s.usage();
        let ends_anyway = s.constraint.is_some() || !s.ignore_eos;
        let is_stop_token =
            (ends_anyway && self.eos.contains(&id)) || s.stop_token_ids.contains(&id);
        let delta = if is_stop_token {
            Ok(Default::default())
        } else {
            s.output.push(&self.tokenizer, id)
        };
        let delta = match delta {
            Ok(d) => d,
            Err(e) => return Some(Event::Error(GenerateError::Internal(e.to_string()))),
        };
        let reason = if is_stop_token || delta.stopped || complete {
            Some(FinishReason::Stop)
        } else if s.generated >= s.max_tokens {
            Some(FinishReason::Length)
        } else {
            None
        };
        let _ = s.events.send(Event::Token {
            id,
            text: delta.text,
            logprobs,
        });
        let finish_reason = reason?;
        let e2e = s.arrived.elapsed();
        self.metrics.e2e_latency.observe(e2e.as_secs_f64());
        if let Some(first) = s.first_token_at
            && s.generated > 1
        {
            let decode = e2e.saturating_sub(first - s.arrived);
            self.metrics
                .time_per_output_token
                .observe(decode.as_secs_f64() / (s.generated - 1) as f64);
        }
        let text = if delta.stopped {
            String::new()
        } else {
            s.output
                .finish(&self.tokenizer)
                .map(|d| d.text)
                .unwrap_or_default()
        };
        Some(Event::Done {
            text,
            finish_reason,
            usage,
        })
    }

    /// Sends each listed sequence its final event and frees it.
    fn finish_many(&mut self, mut items: Vec<(usize, Event)>) {
        // Remove from the back so the indices still to come stay valid under swap_remove.
        items.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
        for (i, ev) in items {
            let mut s = self.running.swap_remove(i);
            self.kv.release(&mut s.cache);
            let _ = s.events.send(ev);
        }
    }
}
