//! The node's state: the model's shape, the checkpoint (opened once, memory-mapped), the
//! experts it holds, and the placement epoch it has been told about.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use switchyard_engine::cuda::Device;
use switchyard_engine::experts::load_expert;
use switchyard_engine::ops::CpuWeights;
use switchyard_engine::{Checkpoint, ExpertSelection, LocalExperts, ModelConfig};
use switchyard_proto::pb::{ExpertRef, ForwardRequest, ForwardResponse, NodeInfo};
use tokio::task::spawn_blocking;

use crate::metrics::NodeMetrics;

use crate::NodeError;
use crate::budget::Budget;
use crate::forward::{ForwardError, Work, answer, refusal};

/// What an expert node serves.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// A Hub-style checkpoint directory (`config.json`, safetensors weights).
    pub model_dir: PathBuf,
    /// How this node names itself to coordinators.
    pub node_id: String,
    /// The experts loaded at start-up; only their bytes are read.
    pub initial: ExpertSelection,
    /// Most experts this node may hold (its memory budget); `None`: no limit.
    pub max_experts: Option<usize>,
    /// Where the experts live and run; `Auto` falls back to the CPU, an explicit CUDA
    /// device that is not usable fails [`ExpertNode::open`].
    pub device: Device,
    /// Memory Forward requests in flight may use together (messages, answers, working
    /// buffers); past it they wait. `None`: [`crate::DEFAULT_WORK_MEMORY_BYTES`].
    pub work_memory_bytes: Option<u64>,
    /// Most tokens one Forward request may carry, advertised in Describe. `None`: what a
    /// quarter of the work memory holds at worst.
    pub max_request_tokens: Option<usize>,
    /// How experts are held on the CPU (`--cpu-weights`); a GPU holds bf16 regardless.
    pub cpu_weights: CpuWeights,
}

pub struct ExpertNode {
    config: Arc<ModelConfig>,
    checkpoint: Arc<Checkpoint>,
    store: Arc<RwLock<LocalExperts>>,
    /// `cpu` or `cuda:N (GPU NAME)`.
    device: String,
    bytes_per_expert: u64,
    /// How its experts' weights are held (`f32`, `bf16`).
    weights: String,
    node_id: String,
    model: String,
    /// A copy of the store's held set, so that Describe never waits behind a long
    /// forward pass holding the store's read lock.
    held: Mutex<BTreeSet<(usize, usize)>>,
    epoch: AtomicU64,
    max_experts: Option<usize>,
    /// Serialises placement changes, so that an epoch check and the change it guards
    /// cannot interleave with another change.
    placement: tokio::sync::Mutex<()>,
    metrics: Arc<NodeMetrics>,
    budget: Budget,
}

impl ExpertNode {
    /// Reads the config and checkpoint headers, then the initial experts' weights.
    pub fn open(cfg: NodeConfig) -> Result<Self, NodeError> {
        let config = ModelConfig::from_dir(&cfg.model_dir)?;
        if let ExpertSelection::Only(set) = &cfg.initial
            && let Some(&(layer, expert)) = set
                .iter()
                .find(|(l, e)| *l >= config.expert_layers() || *e >= config.num_experts)
        {
            return Err(no_such_expert(&config, layer as u64, expert as u64));
        }
        let budget = Budget::new(&config, cfg.work_memory_bytes, cfg.max_request_tokens)?;
        let checkpoint = Checkpoint::open_quantized(&cfg.model_dir, config.quantization)?
            .with_cpu_weights(cfg.cpu_weights);
        let store = LocalExperts::load(cfg.device, &checkpoint, &config, &cfg.initial)?;
        if let Some(max) = cfg.max_experts
            && store.held().len() > max
        {
            return Err(NodeError::NoCapacity {
                wanted: store.held().len(),
                max,
            });
        }
        let model = std::fs::canonicalize(&cfg.model_dir)
            .ok()
            .as_deref()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| cfg.model_dir.display().to_string());
        let held = store.held().into_iter().collect();
        let device = store.device();
        let (bytes_per_expert, weights) = store.expert_footprint(&config, &checkpoint);
        let metrics = NodeMetrics::new(config.expert_layers(), config.num_experts)
            .map_err(|e| NodeError::Internal(format!("metrics: {e}")))?;
        tracing::info!(
            node = %cfg.node_id,
            model = %model,
            experts = store.held().len(),
            %device,
            max_request_tokens = budget.max_request_tokens(),
            work_memory_mib = budget.total_bytes() >> 20,
            chunk_rows = budget.chunk_rows(),
            "expert node opened"
        );
        Ok(ExpertNode {
            config: Arc::new(config),
            checkpoint: Arc::new(checkpoint),
            store: Arc::new(RwLock::new(store)),
            device,
            bytes_per_expert,
            weights: weights.to_string(),
            node_id: cfg.node_id,
            model,
            held: Mutex::new(held),
            epoch: AtomicU64::new(0),
            max_experts: cfg.max_experts,
            placement: tokio::sync::Mutex::new(()),
            metrics: Arc::new(metrics),
            budget,
        })
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn model_config(&self) -> &ModelConfig {
        &self.config
    }

    /// The highest placement epoch any accepted request carried.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// (layer, expert) pairs held, in order.
    pub fn held(&self) -> Vec<(usize, usize)> {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .copied()
            .collect()
    }

    /// How many experts fit in this node's budget.
    pub fn capacity(&self) -> usize {
        self.max_experts
            .unwrap_or(self.config.expert_layers() * self.config.num_experts)
    }

    /// Weight bytes one expert occupies on this node's device (gate, up and down): f32
    /// on the CPU, padded bf16 on a GPU.
    pub fn bytes_per_expert(&self) -> u64 {
        self.bytes_per_expert
    }

    /// How its experts' weights are held: `f32` or `bf16`.
    pub fn weights(&self) -> &str {
        &self.weights
    }

    /// `cpu` or `cuda:N (GPU NAME)`.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// Most tokens one Forward request may carry.
    pub fn max_request_tokens(&self) -> usize {
        self.budget.max_request_tokens()
    }

    /// Memory Forward requests in flight may use together.
    pub fn work_memory_bytes(&self) -> u64 {
        self.budget.total_bytes()
    }

    pub fn describe(&self) -> NodeInfo {
        let to_u32 = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        NodeInfo {
            node_id: self.node_id.clone(),
            model: self.model.clone(),
            num_layers: to_u32(self.config.expert_layers()),
            num_experts: to_u32(self.config.num_experts),
            hidden_size: to_u32(self.config.hidden_size),
            held: self
                .held()
                .into_iter()
                .map(|(l, e)| ExpertRef {
                    layer: to_u32(l),
                    expert: to_u32(e),
                })
                .collect(),
            bytes_per_expert: self.bytes_per_expert(),
            epoch: self.epoch(),
            device: self.device.clone(),
            max_request_tokens: self.max_request_tokens() as u64,
            weights: self.weights.clone(),
        }
    }

    /// Answers one forward request. Never fails: a bad request gets an in-band error.
    pub async fn forward(&self, req: ForwardRequest) -> ForwardResponse {
        let (id, layer, dtype) = (req.id, req.layer, req.dtype);
        let work = match Work::check(&req, &self.config, self.budget.max_request_tokens()) {
            Ok(work) => work,
            Err(e) => return self.refuse(id, layer, dtype, e),
        };
        // The wire's assignment arrays are copied into `work`; free them before waiting.
        drop(req);
        // A request waits here holding only its message; the answer and the working
        // buffers are allocated under the permit, which is held until they are done.
        let _permit = match self
            .budget
            .reserve(work.tokens, work.assignments.len(), work.format)
            .await
        {
            Ok(permit) => permit,
            Err(e) => return self.refuse(id, layer, dtype, e),
        };
        let store = Arc::clone(&self.store);
        let metrics = Arc::clone(&self.metrics);
        let chunk_rows = self.budget.chunk_rows();
        let compute = move || {
            let store = store.read().unwrap_or_else(PoisonError::into_inner);
            work.run(&store, chunk_rows).map(|(output, micros)| {
                metrics.computed(work.layer, &work.assignments, micros);
                (work.format, output, micros)
            })
        };
        // The expert math is CPU-bound and on the critical path of every layer. On a
        // multi-threaded runtime it runs right here, with the worker's other tasks moved
        // away (block_in_place), saving a hand-off to the blocking pool per request;
        // elsewhere it goes to the blocking pool.
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let result = if multi_thread {
            Ok(tokio::task::block_in_place(compute))
        } else {
            spawn_blocking(compute).await
        };
        match result {
            Ok(Ok((format, output, micros))) => answer(id, format, output, micros),
            Ok(Err(e)) => self.refuse(id, layer, dtype, e),
            Err(join) => self.refuse(
                id,
                layer,
                dtype,
                ForwardError::Internal(format!("expert computation failed: {join}")),
            ),
        }
    }

    /// This node's metrics, to serve over HTTP.
    pub fn metrics(&self) -> Arc<NodeMetrics> {
        Arc::clone(&self.metrics)
    }

    fn refuse(&self, id: u64, layer: u32, dtype: i32, e: ForwardError) -> ForwardResponse {
        self.metrics.refused();
        tracing::warn!(id, layer, code = ?e.code(), "forward request refused: {e}");
        refusal(id, dtype, &e)
    }

    /// Loads the experts not yet held (idempotent) and returns the node's new state.
    /// All of them become usable at once, or none do.
    ///
    /// Epoch 0 is a recovery load (static mode, or a coordinator replacing a dead node's
    /// experts before the leader has replanned): it only adds, so it is never stale and
    /// leaves the epoch alone. Any other epoch older than the node's is refused.
    pub async fn load_experts(
        &self,
        experts: &[ExpertRef],
        epoch: u64,
    ) -> Result<NodeInfo, NodeError> {
        let _guard = self.placement.lock().await;
        if epoch != 0 {
            self.check_epoch(epoch)?;
        }
        let wanted = self.checked_refs(experts)?;
        let held = self.held();
        let missing: Vec<(usize, usize)> = wanted
            .into_iter()
            .filter(|pair| !held.contains(pair))
            .collect();
        if let Some(max) = self.max_experts
            && held.len() + missing.len() > max
        {
            return Err(NodeError::NoCapacity {
                wanted: held.len() + missing.len(),
                max,
            });
        }
        if !missing.is_empty() {
            let (ckpt, config, store) = (
                Arc::clone(&self.checkpoint),
                Arc::clone(&self.config),
                Arc::clone(&self.store),
            );
            let to_load = missing.clone();
            let read = move || -> Result<Vec<_>, NodeError> {
                let mut loaded = Vec::with_capacity(to_load.len());
                for &(layer, expert) in &to_load {
                    loaded.push((layer, expert, load_expert(&ckpt, &config, layer, expert)?));
                }
                Ok(loaded)
            };
            // A placement's loads (a rebalance, a join) happen while the node serves and
            // nobody waits for them: they read at the lowest CPU priority. A recovery
            // load (epoch 0) is on a step's critical path: it reads at full speed.
            let loaded = if epoch == 0 {
                spawn_blocking(read)
                    .await
                    .map_err(|e| NodeError::Internal(format!("loading experts failed: {e}")))??
            } else {
                in_the_background(read).await??
            };
            // Taking the write lock waits for running forward passes: on a blocking
            // thread at normal priority, so that it is never held by a starved one.
            spawn_blocking(move || {
                let mut store = store.write().unwrap_or_else(PoisonError::into_inner);
                store.insert_many(loaded)
            })
            .await
            .map_err(|e| NodeError::Internal(format!("loading experts failed: {e}")))??;
            self.held
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend(missing.iter().copied());
            tracing::info!(node = %self.node_id, loaded = ?missing, epoch, "experts loaded");
        }
        self.record_epoch(epoch);
        Ok(self.describe())
    }

    /// Drops the given experts (those not held are ignored) and returns the new state.
    pub async fn unload_experts(
        &self,
        experts: &[ExpertRef],
        epoch: u64,
    ) -> Result<NodeInfo, NodeError> {
        let _guard = self.placement.lock().await;
        self.check_epoch(epoch)?;
        let unwanted = self.checked_refs(experts)?;
        let store = Arc::clone(&self.store);
        let to_remove = unwanted.clone();
        spawn_blocking(move || {
            let to_remove: Vec<(usize, usize)> = to_remove.into_iter().collect();
            let mut store = store.write().unwrap_or_else(PoisonError::into_inner);
            store.remove_many(&to_remove)
        })
        .await
        .map_err(|e| NodeError::Internal(format!("unloading experts failed: {e}")))??;
        {
            let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
            for pair in &unwanted {
                held.remove(pair);
            }
        }
        tracing::info!(node = %self.node_id, unloaded = ?unwanted, epoch, "experts unloaded");
        self.record_epoch(epoch);
        Ok(self.describe())
    }

    /// A leader that lost an election may still send commands: refuse anything older than
    /// the newest placement we have acted on.
    fn check_epoch(&self, epoch: u64) -> Result<(), NodeError> {
        let current = self.epoch();
        if epoch < current {
            return Err(NodeError::StaleEpoch {
                got: epoch,
                current,
            });
        }
        Ok(())
    }

    fn record_epoch(&self, epoch: u64) {
        self.epoch.fetch_max(epoch, Ordering::SeqCst);
    }

    fn checked_refs(&self, refs: &[ExpertRef]) -> Result<BTreeSet<(usize, usize)>, NodeError> {
        refs.iter()
            .map(|r| {
                let (layer, expert) = (r.layer as usize, r.expert as usize);
                if layer >= self.config.expert_layers() || expert >= self.config.num_experts {
                    return Err(no_such_expert(
                        &self.config,
                        r.layer.into(),
                        r.expert.into(),
                    ));
                }
                Ok((layer, expert))
            })
            .collect()
    }
}

fn no_such_expert(config: &ModelConfig, layer: u64, expert: u64) -> NodeError {
    NodeError::NoSuchExpert {
        layer,
        expert,
        layers: config.expert_layers(),
        experts: config.num_experts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(initial: ExpertSelection) -> NodeConfig {
        NodeConfig {
            model_dir: PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../tests/fixtures/mixtral-tiny"),
            node_id: "n".into(),
            initial,
            max_experts: None,
            device: Device::Cpu,
            work_memory_bytes: None,
            max_request_tokens: None,
            cpu_weights: CpuWeights::Auto,
        }
    }

    #[test]
    fn opens_with_only_the_selected_experts() {
        let sel = ExpertSelection::Only([(0, 1), (3, 7)].into_iter().collect());
        let node = ExpertNode::open(config(sel)).unwrap();
        assert_eq!(node.held(), vec![(0, 1), (3, 7)]);
        let info = node.describe();
        assert_eq!(info.held.len(), 2);
        assert_eq!((info.held[1].layer, info.held[1].expert), (3, 7));
        assert_eq!(info.model, "mixtral-tiny");
        assert_eq!(info.device, "cpu");
        assert_eq!(info.bytes_per_expert, 3 * 64 * 128 * 4);
        assert_eq!(info.weights, "f32");
    }

    /// A bf16 checkpoint's experts are held as bf16: half the bytes, said so in Describe,
    /// whether the node starts with experts or with none.
    #[test]
    fn a_bf16_checkpoint_is_held_and_reported_as_bf16() {
        for initial in [
            ExpertSelection::All,
            ExpertSelection::Only(Default::default()),
        ] {
            let mut cfg = config(initial);
            cfg.model_dir = cfg.model_dir.with_file_name("mixtral-tiny-bf16");
            let info = ExpertNode::open(cfg).unwrap().describe();
            assert_eq!(info.weights, "bf16");
            assert_eq!(info.bytes_per_expert, 3 * 64 * 128 * 2);
        }
    }

    /// `--cpu-weights` overrides the checkpoint's format both ways, and `int8` holds a
    /// byte per weight plus an f32 scale per 32 (bytes per weight times 8: 8 + 1).
    #[test]
    fn cpu_weights_overrides_the_checkpoints_format() {
        for (fixture, policy, weights, eighths) in [
            ("mixtral-tiny", CpuWeights::Bf16, "bf16", 16),
            ("mixtral-tiny-bf16", CpuWeights::F32, "f32", 32),
            ("mixtral-tiny-bf16", CpuWeights::Int8, "int8", 9),
        ] {
            let mut cfg = config(ExpertSelection::All);
            cfg.model_dir = cfg.model_dir.with_file_name(fixture);
            cfg.cpu_weights = policy;
            let node = ExpertNode::open(cfg).unwrap();
            let info = node.describe();
            assert_eq!(
                (info.weights.as_str(), info.bytes_per_expert),
                (weights, 3 * 64 * 128 * eighths / 8)
            );
        }
    }

    #[test]
    fn refuses_experts_the_model_lacks_and_missing_checkpoints() {
        for pair in [(4, 0), (0, 8)] {
            let sel = ExpertSelection::Only([pair].into_iter().collect());
            let err = ExpertNode::open(config(sel)).err().unwrap();
            assert!(matches!(err, NodeError::NoSuchExpert { .. }), "{err}");
        }
        let mut cfg = config(ExpertSelection::in_every_layer(&[0], 4));
        cfg.max_experts = Some(3);
        let err = ExpertNode::open(cfg).err().unwrap();
        assert!(
            matches!(err, NodeError::NoCapacity { wanted: 4, max: 3 }),
            "{err}"
        );
        let mut cfg = config(ExpertSelection::All);
        cfg.model_dir = cfg.model_dir.join("no-such-dir");
        let err = ExpertNode::open(cfg).err().unwrap();
        assert!(err.to_string().contains("no-such-dir"), "{err}");
    }
}

/// Runs `work` on a thread of its own at the lowest CPU priority (nice 19 on Linux), so
/// that it takes only the time serving leaves.
async fn in_the_background<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, NodeError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("expert-load".into())
        .spawn(move || {
            lowest_priority();
            let _ = tx.send(work());
        })
        .map_err(|e| NodeError::Internal(format!("starting a loading thread: {e}")))?;
    rx.await
        .map_err(|_| NodeError::Internal("the loading thread stopped".into()))
}

/// Lowers the calling thread's CPU priority (Linux schedules threads one by one, so this
/// leaves the rest of the process alone).
fn lowest_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid and setpriority take and return plain integers and touch no memory.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 19);
    }
}

#[cfg(all(test, target_os = "linux"))]
mod priority_tests {
    fn nice_of_this_thread() -> i32 {
        // SAFETY: plain integer system calls.
        unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::getpriority(libc::PRIO_PROCESS, tid)
        }
    }

    #[tokio::test]
    async fn background_work_runs_at_the_lowest_priority_and_leaves_the_caller_alone() {
        let before = nice_of_this_thread();
        let inside = super::in_the_background(nice_of_this_thread).await.unwrap();
        assert_eq!(inside, 19);
        assert_eq!(nice_of_this_thread(), before);
    }
}
