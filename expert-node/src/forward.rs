//! One `ForwardRequest` from wire to answer: checked in full against the model's shape
//! before any activation is decoded or any expert weight is touched, then computed in
//! chunks of consecutive tokens, so that working memory is bounded by a chunk and not by
//! the request (see `budget.rs`).

use std::time::Instant;

use bytes::Bytes;
use switchyard_engine::{Assignment, ExpertError, LocalExperts, ModelConfig};
use switchyard_proto::pb::{ForwardRequest, ForwardResponse};
use switchyard_proto::{
    CodecError, WireFormat, decode_activations, encode_activations_into, find_non_finite,
};
use tonic::Code;

/// Why a request was refused; it becomes the in-band error of its response.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ForwardError {
    #[error(transparent)]
    Expert(#[from] ExpertError),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error(
        "assignment arrays differ in length: {tokens} token indices, {experts} expert ids, {weights} weights"
    )]
    Ragged {
        tokens: usize,
        experts: usize,
        weights: usize,
    },
    #[error(
        "{assignments} assignments for {tokens} tokens of a {experts}-expert model: at most one per (token, expert)"
    )]
    TooManyAssignments {
        assignments: usize,
        tokens: usize,
        experts: usize,
    },
    #[error("token {token} is assigned to expert {expert} more than once")]
    Duplicate { token: u32, expert: u32 },
    #[error(
        "{tokens} tokens in one request; this node takes at most {max} (max_request_tokens in Describe): split the request"
    )]
    TooLarge { tokens: u32, max: usize },
    #[error("expert output overflowed: non-finite value at index {0} (activations too large)")]
    NonFiniteOutput(usize),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ForwardError {
    pub(crate) fn code(&self) -> Code {
        match self {
            ForwardError::Expert(ExpertError::NotHeld { .. }) => Code::NotFound,
            ForwardError::Expert(ExpertError::Unavailable(_)) => Code::Unavailable,
            ForwardError::Internal(_) => Code::Internal,
            ForwardError::NonFiniteOutput(_) => Code::OutOfRange,
            // What gRPC answers for a message over the size limit: retrying the same
            // request cannot help, a smaller one (or a node with more memory) can.
            ForwardError::TooLarge { .. } => Code::ResourceExhausted,
            ForwardError::Expert(_)
            | ForwardError::Codec(_)
            | ForwardError::Ragged { .. }
            | ForwardError::TooManyAssignments { .. }
            | ForwardError::Duplicate { .. } => Code::InvalidArgument,
        }
    }
}

/// A request that passed every check that needs no expert weights.
#[derive(Debug)]
pub(crate) struct Work {
    pub layer: usize,
    pub tokens: usize,
    pub format: WireFormat,
    activations: Bytes,
    pub assignments: Vec<Assignment>,
}

impl Work {
    /// Checks everything the model's shape decides: dtype, layer, the three assignment
    /// arrays, every expert id, token index and weight, and the activations' byte length;
    /// and that the request has at most `max_tokens` tokens. Whether the experts are held
    /// here is for [`Work::run`], under the store's lock.
    ///
    /// The order matters: the byte length is checked before anything is allocated, so a
    /// declared token count cannot make us reserve memory the message does not carry (and
    /// a lie about it is INVALID_ARGUMENT, not a size refusal); the token cap comes next,
    /// so a request too big for this node allocates nothing; the assignment count is
    /// bounded by tokens x experts, and duplicates are refused, so a small message cannot
    /// buy more expert work than a real step needs.
    pub(crate) fn check(
        req: &ForwardRequest,
        cfg: &ModelConfig,
        max_tokens: usize,
    ) -> Result<Self, ForwardError> {
        let format = WireFormat::from_proto(req.dtype)?;
        let layer = req.layer as usize;
        if layer >= cfg.expert_layers() {
            return Err(ExpertError::BadLayer {
                layer,
                layers: cfg.expert_layers(),
            }
            .into());
        }
        if req.token.len() != req.expert.len() || req.token.len() != req.weight.len() {
            return Err(ForwardError::Ragged {
                tokens: req.token.len(),
                experts: req.expert.len(),
                weights: req.weight.len(),
            });
        }
        let tokens = req.num_tokens as usize;
        let expected = tokens
            .checked_mul(cfg.hidden_size)
            .and_then(|n| n.checked_mul(format.size()));
        if expected != Some(req.activations.len()) {
            return Err(CodecError::Length {
                got: req.activations.len(),
                tokens,
                hidden: cfg.hidden_size,
                size: format.size(),
            }
            .into());
        }
        if tokens > max_tokens {
            return Err(ForwardError::TooLarge {
                tokens: req.num_tokens,
                max: max_tokens,
            });
        }
        let most = tokens.saturating_mul(cfg.num_experts);
        if req.token.len() > most {
            return Err(ForwardError::TooManyAssignments {
                assignments: req.token.len(),
                tokens,
                experts: cfg.num_experts,
            });
        }
        let mut assignments = Vec::with_capacity(req.token.len());
        for ((&token, &expert), &weight) in req.token.iter().zip(&req.expert).zip(&req.weight) {
            if expert as usize >= cfg.num_experts {
                return Err(ExpertError::BadExpert {
                    expert,
                    experts: cfg.num_experts,
                }
                .into());
            }
            if token as usize >= tokens {
                return Err(ExpertError::BadToken { token, tokens }.into());
            }
            if !weight.is_finite() {
                return Err(ExpertError::BadWeight { token, weight }.into());
            }
            assignments.push(Assignment {
                token,
                expert,
                weight,
            });
        }
        // By token, so that `run` can cut the request into chunks of consecutive tokens
        // and a duplicate pair falls within one token's run. Stable: a coordinator already
        // sends its assignments by token, and keeping their order keeps every expert's
        // rows, hence the results, exactly as they were. O(n log n), n bounded above.
        assignments.sort_by_key(|a| a.token);
        let mut seen = vec![false; cfg.num_experts];
        for run in assignments.chunk_by(|a, b| a.token == b.token) {
            for a in run {
                if std::mem::replace(&mut seen[a.expert as usize], true) {
                    return Err(ForwardError::Duplicate {
                        token: a.token,
                        expert: a.expert,
                    });
                }
            }
            for a in run {
                seen[a.expert as usize] = false;
            }
        }
        Ok(Work {
            layer,
            tokens,
            format,
            activations: req.activations.clone(),
            assignments,
        })
    }

    /// Decodes, computes and encodes, at most `chunk_rows` tokens and `chunk_rows`
    /// assignments at a time (a token is never split); blocking (run it off the async
    /// workers). Returns the encoded output and the microseconds it took.
    ///
    /// Every refusal that needs no compute comes before any: experts not held, then a
    /// non-finite activation anywhere in the request.
    pub(crate) fn run(
        &self,
        store: &LocalExperts,
        chunk_rows: usize,
    ) -> Result<(Bytes, u64), ForwardError> {
        let started = Instant::now();
        let hidden = store.hidden();
        store.validate(
            self.layer,
            self.tokens * hidden,
            self.tokens,
            &self.assignments,
        )?;
        if let Some(i) = find_non_finite(&self.activations, self.format) {
            return Err(CodecError::NonFinite(i).into());
        }
        let row_bytes = hidden * self.format.size();
        let mut output = Vec::with_capacity(self.activations.len());
        let mut local = Vec::new();
        let (mut first, mut rest) = (0, &self.assignments[..]);
        while first < self.tokens {
            let (end, rows) = chunk_end(first, rest, self.tokens, chunk_rows);
            let (chunk, tail) = rest.split_at(rows);
            let n = end - first;
            let bytes = &self.activations[first * row_bytes..end * row_bytes];
            let x = decode_activations(bytes, self.format, n, hidden)?;
            // Token indices relative to the chunk; `first` fits a u32 as every token does.
            local.clear();
            local.extend(chunk.iter().map(|a| Assignment {
                token: a.token - first as u32,
                ..*a
            }));
            let y = store.combine(self.layer, &x, n, &local)?;
            // Finite inputs can still overflow (huge activations): say so here rather than
            // ship an Inf that every later layer would spread.
            if let Some(i) = y.iter().position(|v| !v.is_finite()) {
                return Err(ForwardError::NonFiniteOutput(first * hidden + i));
            }
            encode_activations_into(&y, self.format, &mut output);
            (first, rest) = (end, tail);
        }
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        Ok((Bytes::from(output), micros))
    }
}

/// Where the chunk starting at token `first` ends: `(end token, its assignment count)`.
/// `rest` is sorted by token and starts at `first`'s assignments. The chunk takes whole
/// tokens, at most `chunk_rows` of them carrying at most `chunk_rows` assignments, and
/// always at least one token (which may carry more, up to the model's expert count).
fn chunk_end(
    first: usize,
    rest: &[Assignment],
    tokens: usize,
    chunk_rows: usize,
) -> (usize, usize) {
    let mut end = first.saturating_add(chunk_rows.max(1)).min(tokens);
    let mut rows = rest.partition_point(|a| (a.token as usize) < end);
    if rows > chunk_rows {
        // Stop before the token whose assignment crosses the limit; every token before it
        // has all its assignments below the limit.
        end = (rest[chunk_rows].token as usize).max(first + 1);
        rows = rest.partition_point(|a| (a.token as usize) < end);
    }
    (end, rows)
}

pub(crate) fn answer(id: u64, format: WireFormat, output: Bytes, micros: u64) -> ForwardResponse {
    ForwardResponse {
        id,
        dtype: format.to_proto() as i32,
        output,
        error_code: 0,
        error: String::new(),
        compute_micros: micros,
    }
}

pub(crate) fn refusal(req_id: u64, req_dtype: i32, e: &ForwardError) -> ForwardResponse {
    ForwardResponse {
        id: req_id,
        dtype: req_dtype,
        output: Bytes::new(),
        error_code: e.code() as i32,
        error: e.to_string(),
        compute_micros: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::OnceLock;

    fn config() -> &'static ModelConfig {
        static C: OnceLock<ModelConfig> = OnceLock::new();
        C.get_or_init(|| {
            let dir = concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../tests/fixtures/mixtral-tiny"
            );
            ModelConfig::from_dir(std::path::Path::new(dir)).expect("fixture config")
        })
    }

    /// Small numbers most of the time (so requests get past the first checks), extremes
    /// some of the time.
    fn small_or_any(small: u32) -> impl Strategy<Value = u32> {
        prop_oneof![8 => 0..small, 1 => Just(u32::MAX), 1 => any::<u32>()]
    }

    prop_compose! {
        fn request()(
            layer in small_or_any(6),
            num_tokens in small_or_any(6),
            dtype in prop_oneof![0i32..4, any::<i32>()],
            // Byte lengths near tokens x hidden x size for the fixture's hidden of 64.
            len in prop_oneof![0usize..1600, Just(256), Just(512), Just(768), Just(1024)],
            fill in any::<u8>(),
            n in 0usize..40,
            ragged in prop_oneof![8 => Just(0usize), 1 => 1usize..3],
            token in prop::collection::vec(small_or_any(6), 40),
            expert in prop::collection::vec(small_or_any(9), 40),
            weight in prop::collection::vec(prop_oneof![-2.0f32..2.0, Just(f32::NAN), Just(f32::INFINITY)], 40),
        ) -> ForwardRequest {
            ForwardRequest {
                id: 1,
                layer,
                num_tokens,
                dtype,
                activations: Bytes::from(vec![fill; len]),
                token: token[..n].to_vec(),
                expert: expert[..n.saturating_sub(ragged)].to_vec(),
                weight: weight[..n].to_vec(),
            }
        }
    }

    fn store() -> &'static LocalExperts {
        static S: OnceLock<LocalExperts> = OnceLock::new();
        S.get_or_init(|| {
            let dir = concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../tests/fixtures/mixtral-tiny"
            );
            let ckpt = switchyard_engine::Checkpoint::open(std::path::Path::new(dir))
                .expect("fixture weights");
            LocalExperts::load(
                switchyard_engine::cuda::Device::Cpu,
                &ckpt,
                config(),
                &switchyard_engine::ExpertSelection::All,
            )
            .expect("fixture experts")
        })
    }

    /// Chunks of every size, tokens with none, one or all eight experts, in bf16 and f32:
    /// the chunked answer is the one-pass answer, bit for bit.
    #[test]
    fn chunked_runs_match_a_single_pass() {
        let cfg = config();
        let h = cfg.hidden_size;
        let tokens = 37usize;
        let x: Vec<f32> = (0..tokens * h)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 250.0)
            .collect();
        let (mut token, mut expert, mut weight) = (Vec::new(), Vec::new(), Vec::new());
        for t in 0..tokens as u32 {
            let k = match t % 5 {
                0 => 0,
                1 => 8,
                n => n - 1,
            };
            for j in 0..k {
                token.push(t);
                expert.push((t + 3 * j) % 8);
                weight.push(0.1 + j as f32 / 10.0);
            }
        }
        for format in [WireFormat::F32, WireFormat::Bf16] {
            let req = ForwardRequest {
                id: 1,
                layer: 2,
                num_tokens: tokens as u32,
                dtype: format.to_proto() as i32,
                activations: switchyard_proto::encode_activations(&x, format),
                token: token.clone(),
                expert: expert.clone(),
                weight: weight.clone(),
            };
            let work = Work::check(&req, cfg, usize::MAX).expect("a valid request");
            let (whole, _) = work.run(store(), usize::MAX).expect("one pass");
            for chunk_rows in [1, 2, 3, 7, 8, 9, 16, 40, 1000] {
                let (chunked, _) = work.run(store(), chunk_rows).expect("chunked");
                assert!(chunked == whole, "{format:?}, chunks of {chunk_rows}");
            }
        }
    }

    #[test]
    fn chunks_take_whole_tokens_within_the_row_limit() {
        let a = |token| Assignment {
            token,
            expert: 0,
            weight: 1.0,
        };
        // Tokens 0..6 carrying 2, 0, 5, 1, 0, 0 assignments.
        let work: Vec<Assignment> = [0, 0, 2, 2, 2, 2, 2, 3].into_iter().map(a).collect();
        assert_eq!(chunk_end(0, &work, 6, 3), (2, 2));
        assert_eq!(chunk_end(2, &work[2..], 6, 3), (3, 5));
        assert_eq!(chunk_end(3, &work[7..], 6, 3), (6, 1));
        assert_eq!(chunk_end(0, &work, 6, 100), (6, 8));
        assert_eq!(chunk_end(0, &[], 0, 4), (0, 0));
    }

    proptest! {
        // CI runs 2048 cases per property (a fraction of a second); PROPTEST_CASES raises it
            // for a longer session (SECURITY.md).
            #![proptest_config(ProptestConfig {
                cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2048),
                ..ProptestConfig::default()
            })]

        /// Whatever a peer puts in a ForwardRequest, the check ends in `Ok` or a refusal
        /// (never a panic), and `Ok` means every invariant the compute relies on holds.
        #[test]
        fn the_request_check_never_panics_and_ok_means_valid(req in request()) {
            let cfg = config();
            match Work::check(&req, cfg, 4) {
                Ok(work) => {
                    prop_assert!(work.tokens <= 4);
                    prop_assert!(work.layer < cfg.expert_layers());
                    prop_assert_eq!(work.tokens, req.num_tokens as usize);
                    prop_assert_eq!(
                        req.activations.len(),
                        work.tokens * cfg.hidden_size * work.format.size()
                    );
                    prop_assert!(work.assignments.len() <= work.tokens * cfg.num_experts);
                    prop_assert!(work.assignments.is_sorted_by_key(|a| a.token));
                    let mut seen = std::collections::HashSet::new();
                    for a in &work.assignments {
                        prop_assert!((a.token as usize) < work.tokens);
                        prop_assert!((a.expert as usize) < cfg.num_experts);
                        prop_assert!(a.weight.is_finite());
                        prop_assert!(seen.insert((a.token, a.expert)));
                    }
                }
                Err(e) => {
                    let code = e.code();
                    prop_assert!(
                        matches!(code, Code::InvalidArgument | Code::NotFound | Code::ResourceExhausted),
                        "{e}: {code:?}"
                    );
                    prop_assert_eq!(code == Code::ResourceExhausted, matches!(e, ForwardError::TooLarge { tokens: 5.., .. }));
                    let _ = refusal(req.id, req.dtype, &e);
                }
            }
        }
    }
}
