//! How much memory Forward requests may cost this node, and how much of it runs at once.
//!
//! From arrival to answer a request holds its message (activations and the three
//! assignment arrays), its checked assignments, its encoded answer, and the working
//! buffers of one chunk: decoded f32 input, the rows gathered per expert, the FFN's
//! intermediates and the combined f32 output. The chunk is at most [`Budget::chunk_rows`]
//! tokens and as many assignments whatever the request's size (`Work::run` computes a
//! request chunk by chunk), so a request's peak is about twice its activation bytes plus
//! a bounded constant, instead of the ~18 times a one-pass computation needed.

use switchyard_engine::ModelConfig;
use switchyard_proto::WireFormat;
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::NodeError;
use crate::forward::ForwardError;

/// What `--work-memory-mb` defaults to. Four requests at the derived cap fit in it, and
/// for a Mixtral-8x7B-shaped model that cap is about 8,900 tokens: above the coordinator's
/// default step of 512 tokens and the prefill chunks people commonly configure.
pub const DEFAULT_WORK_MEMORY_BYTES: u64 = 2 << 30;

/// Memory per (token, expert) assignment at its peak: the decoded wire arrays (token,
/// expert, weight: 12 bytes), the checked copy (12) and the stable sort's scratch (6),
/// rounded up.
const ASSIGNMENT_BYTES: u64 = 32;

/// What one chunk's working buffers should take. Big models get fewer rows per chunk,
/// but never fewer than [`MIN_CHUNK_ROWS`]: a GPU re-reads every touched expert's weights
/// per chunk, so a decode step (up to 512 tokens x top-2 on one node) stays one chunk.
const CHUNK_TARGET_BYTES: u64 = 64 << 20;
const MIN_CHUNK_ROWS: u64 = 1024;
const MAX_CHUNK_ROWS: u64 = 8192;

/// The default cap is what a quarter of the budget holds at worst, so that four requests
/// at the cap (four coordinators prefilling at once) run side by side and the rest queue.
const REQUESTS_AT_CAP: u64 = 4;

/// Semaphore granularity. Requests range from one decode token (kilobytes) to a prefill
/// chunk (hundreds of megabytes), so the permits count bytes: counting requests would
/// either bound nothing or serialise the small ones. One unit is small enough that the
/// rounding up of a tiny request does not matter, large enough that a u32 covers 256 TiB.
const PERMIT_BYTES: u64 = 64 << 10;

#[derive(Debug)]
pub(crate) struct Budget {
    total_bytes: u64,
    /// Hidden size, in values.
    hidden: u64,
    /// Working bytes per token of a chunk: decoded f32 input and combined f32 output.
    token_bytes: u64,
    /// Working bytes per assignment (row) of a chunk: gathered input, gate-up pair,
    /// activation and expert output, all f32. On a GPU the FFN's part lives in device
    /// workspaces, which the chunk bounds the same way.
    row_bytes: u64,
    chunk_rows: usize,
    max_request_tokens: usize,
    permits: Semaphore,
    total_permits: u32,
}

impl Budget {
    /// `total_bytes` defaults to [`DEFAULT_WORK_MEMORY_BYTES`]; `max_request_tokens` to
    /// what a quarter of it holds in the worst case (f32 activations, every expert
    /// assigned to every token). An explicit cap must fit the whole budget at worst.
    pub(crate) fn new(
        cfg: &ModelConfig,
        total_bytes: Option<u64>,
        max_request_tokens: Option<usize>,
    ) -> Result<Self, NodeError> {
        let total_bytes = total_bytes.unwrap_or(DEFAULT_WORK_MEMORY_BYTES);
        let (h, f, e) = (
            cfg.hidden_size as u64,
            cfg.moe_intermediate_size as u64,
            cfg.num_experts as u64,
        );
        let token_bytes = 8 * h;
        let row_bytes = 8 * h + 12 * f;
        let chunk_rows = (CHUNK_TARGET_BYTES / (token_bytes + row_bytes).max(1))
            .clamp(MIN_CHUNK_ROWS, MAX_CHUNK_ROWS)
            // One token is never split, and may carry every expert.
            .max(e);
        let mut budget = Budget {
            total_bytes,
            hidden: h,
            token_bytes,
            row_bytes,
            chunk_rows: usize::try_from(chunk_rows).unwrap_or(usize::MAX),
            max_request_tokens: 0,
            permits: Semaphore::new(0),
            total_permits: u32::try_from(total_bytes / PERMIT_BYTES).unwrap_or(u32::MAX),
        };
        let worst_token = 2 * 4 * h + e * ASSIGNMENT_BYTES;
        let worst = |tokens: u64| budget.cost_of(tokens, tokens.saturating_mul(e), 4);
        let cap = match max_request_tokens {
            Some(0) => {
                return Err(NodeError::Budget(
                    "max request tokens must be positive".into(),
                ));
            }
            Some(cap) => {
                let need = worst(cap as u64);
                if need > total_bytes {
                    return Err(NodeError::Budget(format!(
                        "a request of {cap} tokens may need {} MiB, more than all {} MiB of it",
                        need.div_ceil(1 << 20),
                        total_bytes >> 20
                    )));
                }
                cap
            }
            None => {
                let share = total_bytes / REQUESTS_AT_CAP;
                let chunk = budget.chunk_rows as u64 * (token_bytes + row_bytes);
                let cap = share.saturating_sub(chunk) / worst_token.max(1);
                if cap == 0 {
                    return Err(NodeError::Budget(format!(
                        "{} MiB is too small for this model: one chunk of work needs {} MiB, \
                         and a quarter of the budget must hold it",
                        total_bytes >> 20,
                        chunk.div_ceil(1 << 20)
                    )));
                }
                usize::try_from(cap).unwrap_or(usize::MAX)
            }
        };
        // num_tokens is a u32 on the wire.
        budget.max_request_tokens = cap.min(u32::MAX as usize);
        budget.permits = Semaphore::new(budget.total_permits as usize);
        Ok(budget)
    }

    pub(crate) fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    pub(crate) fn max_request_tokens(&self) -> usize {
        self.max_request_tokens
    }

    pub(crate) fn chunk_rows(&self) -> usize {
        self.chunk_rows
    }

    /// Waits until the budget has room for a checked request's working set, and holds it
    /// until the permit is dropped. Waiting requests hold only their message.
    pub(crate) async fn reserve(
        &self,
        tokens: usize,
        assignments: usize,
        format: WireFormat,
    ) -> Result<SemaphorePermit<'_>, ForwardError> {
        let bytes = self.cost_of(tokens as u64, assignments as u64, format.size() as u64);
        let units = u32::try_from(bytes.div_ceil(PERMIT_BYTES))
            .unwrap_or(u32::MAX)
            .clamp(1, self.total_permits.max(1));
        self.permits
            .acquire_many(units)
            .await
            .map_err(|e| ForwardError::Internal(format!("work memory budget: {e}")))
    }

    /// Bytes a request costs at its peak: message activations and answer (the same size),
    /// its assignments, and one chunk's working buffers.
    fn cost_of(&self, tokens: u64, assignments: u64, value_size: u64) -> u64 {
        let chunk = self.chunk_rows as u64;
        let held = (2 * tokens)
            .saturating_mul(self.hidden * value_size)
            .saturating_add(assignments.saturating_mul(ASSIGNMENT_BYTES));
        let working =
            tokens.min(chunk) * self.token_bytes + assignments.min(chunk) * self.row_bytes;
        held.saturating_add(working)
    }

    #[cfg(test)]
    fn available_bytes(&self) -> u64 {
        self.permits.available_permits() as u64 * PERMIT_BYTES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(hidden: usize, ffn: usize, experts: usize) -> ModelConfig {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/mixtral-tiny"
        );
        let mut cfg = ModelConfig::from_dir(std::path::Path::new(dir)).expect("fixture config");
        cfg.hidden_size = hidden;
        cfg.moe_intermediate_size = ffn;
        cfg.num_experts = experts;
        cfg
    }

    #[test]
    fn default_caps_are_far_above_what_a_coordinator_sends() {
        // (hidden, ffn, experts, least acceptable cap): the fixture, Mixtral-8x7B, DeepSeek-V3.
        for (h, f, e, least) in [
            (64, 128, 8, 500_000),
            (4096, 14336, 8, 8192),
            (7168, 2048, 256, 4096),
        ] {
            let b = Budget::new(&config(h, f, e), None, None).unwrap();
            let cap = b.max_request_tokens();
            assert!(cap >= least, "hidden {h}: cap {cap}");
            // Four requests at the cap, at their worst, fit the budget together.
            let worst = b.cost_of(cap as u64, (cap * e) as u64, 4);
            assert!(
                4 * worst <= b.total_bytes(),
                "hidden {h}: {worst} x 4 > {}",
                b.total_bytes()
            );
            assert!(b.chunk_rows() >= 1024 && b.chunk_rows() >= e);
        }
    }

    #[test]
    fn explicit_caps_must_fit_and_tiny_budgets_are_refused() {
        let cfg = config(64, 128, 8);
        assert_eq!(
            Budget::new(&cfg, None, Some(4096))
                .unwrap()
                .max_request_tokens(),
            4096
        );
        assert!(Budget::new(&cfg, None, Some(0)).is_err());
        let err = Budget::new(&cfg, Some(64 << 20), Some(1 << 20)).unwrap_err();
        assert!(err.to_string().contains("1048576 tokens"), "{err}");
        assert!(Budget::new(&cfg, Some(1 << 20), None).is_err());
    }

    #[tokio::test]
    async fn permits_cover_a_request_and_come_back() {
        let b = Budget::new(&config(64, 128, 8), Some(256 << 20), None).unwrap();
        let before = b.available_bytes();
        let permit = b.reserve(10_000, 20_000, WireFormat::Bf16).await.unwrap();
        let taken = before - b.available_bytes();
        assert!(
            taken >= 2 * 10_000 * 64 * 2 + 20_000 * ASSIGNMENT_BYTES,
            "{taken}"
        );
        drop(permit);
        assert_eq!(b.available_bytes(), before);
    }
}
