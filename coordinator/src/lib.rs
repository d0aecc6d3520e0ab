//! The coordinator: everything dense runs here (embeddings, attention and its KV cache,
//! the router, the LM head, sampling), behind an OpenAI-compatible HTTP API with
//! continuous batching. Experts run behind `switchyard_engine::Experts`: in this process
//! or on expert nodes over gRPC, and nothing else here can tell which.

pub mod balance;
pub mod cluster;
pub mod dispatch;
pub mod hedge;
pub mod http;
pub mod link;
pub mod metrics;
pub mod output;
pub mod overlap;
pub mod placement;
pub mod placement_by_load;
pub mod remote;
pub mod request;
pub mod scheduler;
pub mod server;
pub mod structured;
