//! One `ForwardRequest` from wire to answer: checked in full against the model's shape
//! before any activation is decoded or any expert weight is touched, then computed.

use std::time::Instant;

use bytes::Bytes;
use switchyard_engine::{Assignment, ExpertError, LocalExperts, ModelConfig};
use switchyard_proto::pb::{ForwardRequest, ForwardResponse};
use switchyard_proto::{CodecError, WireFormat, decode_activations, encode_activations};
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
    /// arrays, every expert id, token index and weight, and the activations' byte length.
    /// Whether the experts are held here is for [`Work::run`], under the store's lock.
    ///
    /// The order matters: the byte length is checked before anything is allocated, so a
    /// declared token count cannot make us reserve memory the message does not carry; the
    /// assignment count is bounded by tokens x experts, and duplicates are refused, so a
    /// small message cannot buy more expert work than a real step needs.
    pub(crate) fn check(req: &ForwardRequest, cfg: &ModelConfig) -> Result<Self, ForwardError> {
        let format = WireFormat::from_proto(req.dtype)?;
        let layer = req.layer as usize;
        if layer >= cfg.num_layers {
            return Err(ExpertError::BadLayer {
                layer,
                layers: cfg.num_layers,
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
        // Both ids are below 2^32, so one u64 key per pair; sorting is O(n log n) with n
        // already bounded above.
        let mut pairs: Vec<u64> = assignments
            .iter()
            .map(|a| (u64::from(a.token) << 32) | u64::from(a.expert))
            .collect();
        pairs.sort_unstable();
        if let Some(w) = pairs.windows(2).find(|w| w[0] == w[1]) {
            return Err(ForwardError::Duplicate {
                token: (w[0] >> 32) as u32,
                expert: w[0] as u32,
            });
        }
        Ok(Work {
            layer,
            tokens,
            format,
            activations: req.activations.clone(),
            assignments,
        })
    }

    /// Decodes, computes and encodes; blocking (run it off the async workers). Returns the
    /// encoded output and the microseconds it took.
    pub(crate) fn run(&self, store: &LocalExperts) -> Result<(Bytes, u64), ForwardError> {
        let started = Instant::now();
        let hidden = store.hidden();
        // Refuse experts we do not hold before paying for the decode.
        store.validate(
            self.layer,
            self.tokens * hidden,
            self.tokens,
            &self.assignments,
        )?;
        let x = decode_activations(&self.activations, self.format, self.tokens, hidden)?;
        let y = store.combine(self.layer, &x, self.tokens, &self.assignments)?;
        // Finite inputs can still overflow (huge activations): say so here rather than
        // ship an Inf that every later layer would spread.
        if let Some(i) = y.iter().position(|v| !v.is_finite()) {
            return Err(ForwardError::NonFiniteOutput(i));
        }
        let output = encode_activations(&y, self.format);
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        Ok((output, micros))
    }
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
            match Work::check(&req, cfg) {
                Ok(work) => {
                    prop_assert!(work.layer < cfg.num_layers);
                    prop_assert_eq!(work.tokens, req.num_tokens as usize);
                    prop_assert_eq!(
                        req.activations.len(),
                        work.tokens * cfg.hidden_size * work.format.size()
                    );
                    prop_assert!(work.assignments.len() <= work.tokens * cfg.num_experts);
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
                    prop_assert!(matches!(code, Code::InvalidArgument | Code::NotFound), "{e}: {code:?}");
                    let _ = refusal(req.id, req.dtype, &e);
                }
            }
        }
    }
}
