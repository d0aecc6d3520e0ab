use switchyard_engine::cuda::{CudaError, LoadError};
use switchyard_engine::{ConfigError, WeightError};
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Weights(#[from] WeightError),
    #[error("device: {0}")]
    Device(#[from] CudaError),
    #[error("bad expert spec `{part}`: {reason}")]
    Spec { part: String, reason: String },
    #[error(
        "expert {expert} of layer {layer} does not exist (model has {layers} layers of {experts} experts)"
    )]
    NoSuchExpert {
        layer: u64,
        expert: u64,
        layers: usize,
        experts: usize,
    },
    #[error("stale placement epoch {got}: this node is already at epoch {current}")]
    StaleEpoch { got: u64, current: u64 },
    #[error("this node may hold {max} experts; holding {wanted} would exceed its memory budget")]
    NoCapacity { wanted: usize, max: usize },
    #[error("cluster: {0}")]
    Cluster(String),
    #[error("work memory budget: {0}")]
    Budget(String),
    #[error("internal error: {0}")]
    Internal(String),
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

impl From<NodeError> for Status {
    fn from(e: NodeError) -> Self {
        let code = match &e {
            NodeError::Spec { .. } | NodeError::NoSuchExpert { .. } => Code::InvalidArgument,
            NodeError::StaleEpoch { .. } => Code::FailedPrecondition,
            NodeError::NoCapacity { .. } => Code::ResourceExhausted,
            NodeError::Config(_)
            | NodeError::Weights(_)
            | NodeError::Device(_)
            | NodeError::Internal(_)
            | NodeError::Cluster(_)
            | NodeError::Budget(_)
            | NodeError::Transport(_) => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}

impl From<LoadError> for NodeError {
    fn from(e: LoadError) -> Self {
        match e {
            LoadError::Weights(w) => NodeError::Weights(w),
            LoadError::Cuda(c) => NodeError::Device(c),
        }
    }
}
