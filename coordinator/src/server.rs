//! Wiring: load the dense model, connect the experts, start the scheduler, serve HTTP.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use switchyard_engine::cuda::{Device, LoadError};
use switchyard_engine::ops::CpuWeights;
use switchyard_engine::tokenizer::{Tokenizer, TokenizerError};
use switchyard_engine::{DenseModel, ExpertSelection, Experts, LocalExperts, ModelError};
use switchyard_proto::WireFormat;
use switchyard_proto::tls::Tls;
use tokio::net::TcpListener;
use tracing::info;

use crate::cluster::{ClusterHandle, ClusterMode};
use crate::hedge::Hedging;
use crate::http::{AppState, HealthCheck, HttpConfig, Refresh, router};
use crate::metrics::{CountingExperts, Metrics};
use crate::placement::{Placement, PlacementError};
use crate::remote::{Keepalive, RemoteError, RemoteExperts};
use crate::scheduler::{SchedulerConfig, SpawnError, spawn};
use crate::structured::Grammars;

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("loading the in-process experts: {0}")]
    Experts(#[from] LoadError),
    #[error(transparent)]
    Placement(#[from] PlacementError),
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Scheduler(#[from] SpawnError),
    #[error("{0}")]
    Config(String),
    #[error("{0}: stopping")]
    SchedulerDied(String),
}

/// Where the experts run.
#[derive(Debug, Clone)]
pub enum ExpertsAt {
    /// In this process, on the coordinator's device.
    InProcess,
    Nodes {
        addrs: Vec<String>,
        replicas: usize,
        /// Place by this load file instead of round-robin (`--placement-from`), with
        /// this many experts of every layer per node (`--expert-slots`; default: half
        /// as many again as `replicas` copies need).
        placement_from: Option<PathBuf>,
        expert_slots: Option<usize>,
        wire: WireFormat,
        timeout: Duration,
        /// Mutual TLS to the nodes; `None` is plaintext.
        tls: Option<Tls>,
        keepalive: Keepalive,
        hedging: Hedging,
    },
    /// Nodes found in etcd; placement published by the elected coordinator.
    Cluster {
        mode: ClusterMode,
        wire: WireFormat,
        timeout: Duration,
        tls: Option<Tls>,
        keepalive: Keepalive,
        hedging: Hedging,
    },
}

#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub model_dir: PathBuf,
    pub served_model_name: Option<String>,
    /// Where the dense layers (and in-process experts) run; `Auto` is resolved at start.
    pub device: Device,
    /// How the CPU holds them (`--cpu-weights`).
    pub cpu_weights: CpuWeights,
    pub experts: ExpertsAt,
    pub scheduler: SchedulerConfig,
    /// API keys and request limits.
    pub http: HttpConfig,
}

/// A coordinator ready to serve.
pub struct Coordinator {
    state: AppState,
    /// Cluster mode's lease and follower; `None` otherwise.
    cluster: Option<ClusterHandle>,
}

impl Coordinator {
    pub async fn start(cfg: CoordinatorConfig) -> Result<Self, CoordinatorError> {
        let dir = cfg.model_dir.clone();
        let in_process = matches!(cfg.experts, ExpertsAt::InProcess);
        let device = cfg.device.resolve().map_err(ModelError::from)?;
        let cpu_weights = cfg.cpu_weights;
        let (model, store) = tokio::task::spawn_blocking(move || -> Result<_, CoordinatorError> {
            let (model, ckpt) = DenseModel::load_as(device, &dir, cpu_weights)?;
            info!(device = %model.device(), %cpu_weights, "dense layers loaded");
            let store = if in_process {
                Some(LocalExperts::load(
                    device,
                    &ckpt,
                    model.config(),
                    &ExpertSelection::All,
                )?)
            } else {
                None
            };
            Ok((model, store))
        })
        .await
        .map_err(|e| CoordinatorError::Config(format!("model loading panicked: {e}")))??;
        let tokenizer = Arc::new(Tokenizer::from_dir(&cfg.model_dir)?);
        let mc = model.config().clone();
        if tokenizer.vocab_size() > mc.vocab_size {
            return Err(CoordinatorError::Config(format!(
                "tokenizer has {} tokens but the model's vocabulary is {}",
                tokenizer.vocab_size(),
                mc.vocab_size
            )));
        }

        let metrics =
            Metrics::new().map_err(|e| CoordinatorError::Config(format!("metrics: {e}")))?;
        let mut cluster = None;
        let (experts, health, refresh): (Arc<dyn Experts>, HealthCheck, Refresh) =
            match (&cfg.experts, store) {
                (
                    ExpertsAt::Cluster {
                        mode,
                        wire,
                        timeout,
                        tls,
                        keepalive,
                        hedging,
                    },
                    _,
                ) => {
                    let (handle, placement) =
                        crate::cluster::join(mode, mc.expert_layers(), mc.num_experts, tls.clone())
                            .await?;
                    let remote = Arc::new(
                        RemoteExperts::new(
                            tokio::runtime::Handle::current(),
                            Vec::new(),
                            Placement::empty(mc.expert_layers(), mc.num_experts),
                            mc.hidden_size,
                            *wire,
                            *timeout,
                        )
                        .with_recovery(tls.clone())
                        .with_keepalive(*keepalive)
                        .with_hedging(*hedging)
                        .with_metrics(metrics.clone()),
                    );
                    crate::cluster::install(&remote, &placement).await;
                    crate::cluster::follow_placements(remote.clone(), handle.view.clone());
                    crate::cluster::report_load(
                        handle.session.clone(),
                        mode,
                        metrics.clone(),
                        remote.clone(),
                        mc.expert_layers(),
                        mc.num_experts,
                        Duration::from_secs(2),
                    );
                    cluster = Some(handle);
                    let r = remote.clone();
                    // Healthy while every expert has a live holder: a lost node whose
                    // experts have replicas (or were reloaded elsewhere) costs nothing.
                    let health: HealthCheck =
                        Arc::new(move || uncovered_problem(&r.topology()).map_or(Ok(()), Err));
                    let r = remote.clone();
                    let refresh: Refresh = Arc::new(move || r.refresh_metrics());
                    (remote, health, refresh)
                }
                (
                    ExpertsAt::Nodes {
                        addrs,
                        replicas,
                        placement_from,
                        expert_slots,
                        wire,
                        timeout,
                        tls,
                        keepalive,
                        hedging,
                    },
                    _,
                ) => {
                    let (layers, experts) = (mc.expert_layers(), mc.num_experts);
                    let placement = match placement_from {
                        None => Placement::round_robin(layers, experts, addrs.len(), *replicas)?,
                        Some(path) => {
                            let load = crate::placement_by_load::read_load(path, layers, experts)
                                .map_err(CoordinatorError::Config)?;
                            let needed =
                                (experts * (*replicas).max(1)).div_ceil(addrs.len().max(1));
                            let slots = expert_slots.unwrap_or(needed + needed.div_ceil(2));
                            let p = crate::placement_by_load::plan(
                                &load,
                                layers,
                                experts,
                                addrs.len(),
                                slots,
                                *replicas,
                            )?;
                            info!(file = %path.display(), slots, "experts placed by load");
                            p
                        }
                    };
                    let links =
                        RemoteExperts::connect_static(addrs, &placement, tls.as_ref(), *keepalive)
                            .await?;
                    info!(
                        nodes = addrs.len(),
                        replicas,
                        ?wire,
                        "experts placed on nodes"
                    );
                    let remote = Arc::new(
                        RemoteExperts::new(
                            tokio::runtime::Handle::current(),
                            links,
                            placement,
                            mc.hidden_size,
                            *wire,
                            *timeout,
                        )
                        .with_hedging(*hedging)
                        .with_metrics(metrics.clone()),
                    );
                    let r = remote.clone();
                    // Static mode: any node down is an operator's problem (nothing
                    // replaces it), and so is an expert no node serves.
                    let health: HealthCheck = Arc::new(move || {
                        let topo = r.topology();
                        let down: Vec<&str> = topo
                            .links
                            .iter()
                            .filter(|n| !n.is_alive())
                            .map(|n| n.addr())
                            .collect();
                        let mut problems = Vec::new();
                        if !down.is_empty() {
                            problems.push(format!("expert nodes down: {}", down.join(", ")));
                        }
                        problems.extend(uncovered_problem(&topo));
                        if problems.is_empty() {
                            Ok(())
                        } else {
                            Err(problems.join("; "))
                        }
                    });
                    let r = remote.clone();
                    let refresh: Refresh = Arc::new(move || r.refresh_metrics());
                    (remote, health, refresh)
                }
                (ExpertsAt::InProcess, Some(store)) => {
                    info!(device = %store.device(), "in-process experts loaded");
                    (Arc::new(store), Arc::new(|| Ok(())), Arc::new(|| {}))
                }
                (ExpertsAt::InProcess, None) => {
                    return Err(CoordinatorError::Config(
                        "in-process experts were not loaded".into(),
                    ));
                }
            };

        let model_name = cfg.served_model_name.clone().unwrap_or_else(|| {
            cfg.model_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into())
        });
        let context_len = mc.max_position_embeddings;
        let experts = Arc::new(CountingExperts::new(
            experts,
            metrics.clone(),
            mc.expert_layers(),
            mc.num_experts,
        ));
        let scheduler = spawn(
            Arc::new(model),
            experts,
            tokenizer.clone(),
            cfg.scheduler.clone(),
            metrics.clone(),
        )?;
        let grammars = match Grammars::new(&tokenizer, mc.vocab_size) {
            Ok(g) => Some(Arc::new(g)),
            Err(e) => {
                tracing::warn!("structured output is off (requests asking for it get 400): {e}");
                None
            }
        };
        Ok(Coordinator {
            state: AppState {
                scheduler,
                tokenizer,
                model_name,
                context_len,
                vocab_size: mc.vocab_size,
                health,
                metrics,
                refresh_metrics: refresh,
                http: Arc::new(cfg.http.clone()),
                grammars,
            },
            cluster,
        })
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves the HTTP API on `listener` until `shutdown` resolves, then lets requests in
    /// progress finish for at most the shutdown grace period (`HttpConfig::timeouts`).
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), CoordinatorError> {
        // A dead scheduler serves nothing ever again: stop, and say so in the exit status,
        // so a supervisor restarts the process instead of probing a zombie.
        let died = self.state.scheduler.died();
        let (dead_tx, dead_rx) = tokio::sync::oneshot::channel();
        let stop = async move {
            tokio::select! {
                () = shutdown => {}
                reason = died => {
                    let _ = dead_tx.send(reason);
                }
            }
        };
        let timeouts = self.state.http.timeouts;
        crate::http::transport::serve(listener, router(self.state), timeouts, stop).await;
        if let Ok(reason) = dead_rx.await {
            if let Some(c) = self.cluster {
                c.session.revoke().await;
            }
            return Err(CoordinatorError::SchedulerDied(reason));
        }
        // Leave the election and drop the load report now, not a TTL later.
        if let Some(c) = self.cluster {
            c.session.revoke().await;
        }
        Ok(())
    }
}

/// "N experts have no live node (layer:expert ...)" when some expert has no node that
/// serves it.
fn uncovered_problem(topo: &crate::remote::Topology) -> Option<String> {
    let uncovered = topo.uncovered();
    (!uncovered.is_empty()).then(|| {
        format!(
            "{} experts have no live node (layer:expert {})",
            uncovered.len(),
            uncovered
                .iter()
                .take(8)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}
