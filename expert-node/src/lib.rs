//! Switchyard's expert node: holds a subset of a Mixture-of-Experts model's expert FFNs and
//! serves them over gRPC (`switchyard.expert.v1.ExpertService`, plus `grpc.health.v1`).
//!
//! The coordinator keeps one long-lived `Forward` stream open per node and sends every MoE
//! layer's work down it; the node answers each request, in order, with the weighted sum
//! of its experts' outputs per token. Bad requests are answered in-band so one malformed
//! message never tears down the stream that every other layer depends on.

mod budget;
mod error;
mod forward;
mod membership;
mod metrics;
mod node;
mod server;
mod service;
mod spec;

pub use budget::DEFAULT_WORK_MEMORY_BYTES;
pub use error::NodeError;
pub use membership::Membership;
pub use metrics::NodeMetrics;
pub use node::{ExpertNode, NodeConfig};
pub use server::{serve, serve_with_tls};
pub use spec::parse_expert_spec;
