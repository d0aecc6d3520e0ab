//! Switchyard's engine: MoE model families' configs, checkpoints, tokenizer, and the f32 CPU
//! forward pass that every other backend is checked against.

pub mod attention;
pub mod block_pool;
pub mod checkpoint;
pub mod config;
pub mod cuda;
pub mod dense_model;
pub mod dtype;
pub mod experts;
pub mod family;
pub mod kv_cache;
pub mod layers;
pub mod local_experts;
pub mod model;
pub mod ops;
pub mod quant;
pub mod router;
pub mod sampling;
pub mod synth;
pub mod tokenizer;
pub mod verify;

pub use checkpoint::{Checkpoint, WeightError};
pub use config::{ConfigError, ModelConfig};
pub use dense_model::{DenseModel, KvCache};
pub use dtype::DType;
pub use experts::{Assignment, ExpertError, ExpertSelection, ExpertStore, Experts};
pub use family::Family;
pub use kv_cache::{KvCacheError, PagedKvCache, SeqCache};
pub use local_experts::LocalExperts;
pub use model::{ForwardOutput, LogitsFor, Model, ModelError, SeqChunk};
pub use router::Routing;
pub use sampling::{Sampler, SamplingParams};
