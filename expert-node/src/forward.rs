//! One `ForwardRequest` from wire to answer: checked in full against the model's shape
//! before any activation is decoded or any expert weight is touched, then computed.

use std::time::Instant;

use bytes::Bytes;
use switchyard_engine::{Assignment, ExpertError, ExpertStore, ModelConfig};
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
    #[error("internal error: {0}")]
    Internal(String),
}

impl ForwardError {
    pub(crate) fn code(&self) -> Code {
        match self {
            ForwardError::Expert(ExpertError::NotHeld { .. }) => Code::NotFound,
            ForwardError::Expert(ExpertError::Unavailable(_)) => Code::Unavailable,
            ForwardError::Internal(_) => Code::Internal,
            ForwardError::Expert(_) | ForwardError::Codec(_) | ForwardError::Ragged { .. } => {
                Code::InvalidArgument
            }
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
    pub(crate) fn run(&self, store: &ExpertStore) -> Result<(Bytes, u64), ForwardError> {
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
