//! Cluster mode: the coordinator follows the placement published in etcd, campaigns to
//! be the leader that computes it, and reports the load it routes.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use switchyard_cluster::leader::{self, ControlError, LeaderConfig, NodeControl};
use switchyard_cluster::rebalance::RebalancePolicy;
use switchyard_cluster::{ClusterConfig, LoadReport, PlacementRecord, Session, View, follow};
use switchyard_proto::tls::Tls;
use switchyard_proto::{ExpertServiceClient, MAX_MESSAGE_BYTES};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::placement::Placement;
use crate::remote::{Keepalive, RemoteError, RemoteExperts};

/// Cluster-mode settings of one coordinator.
#[derive(Debug, Clone)]
pub struct ClusterMode {
    pub etcd: ClusterConfig,
    /// This coordinator's name in the cluster (election, load reports).
    pub coordinator_id: String,
    pub lease_ttl: Duration,
    /// Copies of every expert the leader places where memory allows.
    pub min_replicas: usize,
    /// When the leader rebalances by load without being asked.
    pub rebalance: RebalancePolicy,
    /// How long start-up waits for a placement (nodes registered and loaded).
    pub startup_timeout: Duration,
}

/// The running cluster machinery; dropping it stops it.
pub struct ClusterHandle {
    pub session: Arc<Session>,
    pub view: watch::Receiver<View>,
}

/// Control RPCs from the leader to nodes.
struct GrpcControl {
    tls: Option<Tls>,
}

impl GrpcControl {
    fn call(
        &self,
        addr: &str,
        experts: Vec<(usize, usize)>,
        epoch: u64,
        unload: bool,
    ) -> BoxFuture<'static, Result<(), ControlError>> {
        let (addr, tls) = (addr.to_owned(), self.tls.clone());
        Box::pin(async move {
            let channel = crate::remote::endpoint(&addr, tls.as_ref(), Keepalive::default())
                .map_err(|e| ControlError::Failed(e.to_string()))?
                .connect()
                .await
                .map_err(|e| ControlError::Failed(format!("connecting to {addr}: {e}")))?;
            let mut client = ExpertServiceClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES);
            let req = crate::remote::experts_request(&experts, epoch);
            let result = if unload {
                client.unload_experts(req).await
            } else {
                client.load_experts(req).await
            };
            result.map(|_| ()).map_err(|s| {
                let why = s.message().to_owned();
                // What an expert node answers when holding more would exceed its budget.
                if s.code() == tonic::Code::ResourceExhausted {
                    ControlError::NoRoom(why)
                } else {
                    ControlError::Failed(why)
                }
            })
        })
    }
}

impl NodeControl for GrpcControl {
    fn load(
        &self,
        addr: &str,
        experts: Vec<(usize, usize)>,
        epoch: u64,
    ) -> BoxFuture<'static, Result<(), ControlError>> {
        self.call(addr, experts, epoch, false)
    }

    fn unload(
        &self,
        addr: &str,
        experts: Vec<(usize, usize)>,
        epoch: u64,
    ) -> BoxFuture<'static, Result<(), ControlError>> {
        self.call(addr, experts, epoch, true)
    }
}

/// Joins the cluster: lease, follower, leader campaign. Returns once a placement is
/// published (by us or another coordinator), or fails after `startup_timeout`.
pub async fn join(
    mode: &ClusterMode,
    num_layers: usize,
    num_experts: usize,
    tls: Option<Tls>,
) -> Result<(ClusterHandle, PlacementRecord), RemoteError> {
    let err = |reason: String| RemoteError::Cluster(reason);
    let session = Arc::new(
        Session::start(mode.etcd.clone(), mode.lease_ttl, &mode.coordinator_id)
            .map_err(|e| err(e.to_string()))?,
    );
    let mut view = follow(mode.etcd.clone());
    tokio::spawn(leader::run(
        mode.etcd.clone(),
        LeaderConfig {
            id: mode.coordinator_id.clone(),
            num_layers,
            num_experts,
            min_replicas: mode.min_replicas,
            tick: Duration::from_millis(250),
            load_interval: Duration::from_secs(10),
            rebalance: mode.rebalance.clone(),
            unload_grace: Duration::from_secs(2),
        },
        Arc::clone(&session),
        view.clone(),
        Arc::new(GrpcControl { tls }),
    ));
    // A record for another shape may be a cluster name shared with another model, or a
    // bad value the leader is about to overwrite: wait for one that fits, and say which
    // shape was seen if none comes.
    let mut misfit: Option<String> = None;
    let wait = async {
        loop {
            let placement = {
                let v = view.borrow_and_update();
                v.snapshot.placement.clone()
            };
            if let Some(p) = placement {
                match p.fits(num_layers, num_experts) {
                    Ok(()) => return Ok(p),
                    Err(e) => misfit = Some(e),
                }
            }
            if view.changed().await.is_err() {
                return Err(err("cluster follower stopped".into()));
            }
        }
    };
    let waited = tokio::time::timeout(mode.startup_timeout, wait).await;
    let placement = waited.map_err(|_| {
        let root = mode.etcd.keys.root();
        err(match &misfit {
            Some(reason) => format!(
                "cluster {root} has no placement for this model within {:?}: {reason}",
                mode.startup_timeout
            ),
            None => format!(
                "no placement published in cluster {root} within {:?}: are expert nodes registered \
                 with enough memory for every expert, and is etcd at {} reachable?",
                mode.startup_timeout,
                mode.etcd.endpoints.join(",")
            ),
        })
    })??;
    info!(
        epoch = placement.epoch,
        nodes = placement.nodes.len(),
        "following cluster placement"
    );
    Ok((ClusterHandle { session, view }, placement))
}

/// Installs `p` in `remote` if it is newer than what it has and fits this model; a
/// record that does not is logged and ignored, and serving goes on with the last good
/// placement (the leader overwrites a bad record at its next round).
pub async fn install(remote: &RemoteExperts, p: &PlacementRecord) -> bool {
    let addrs: Vec<String> = p.nodes.iter().map(|n| n.addr.clone()).collect();
    let holders = p
        .holders
        .iter()
        .map(|h| h.iter().map(|&n| n as usize).collect())
        .collect();
    let installed = match Placement::from_holders(p.num_layers, p.num_experts, addrs.len(), holders)
    {
        Ok(placement) => remote.install(p.epoch, &addrs, placement).await,
        Err(e) => Err(e),
    };
    match installed {
        Ok(true) => {
            info!(
                epoch = p.epoch,
                nodes = p.nodes.len(),
                "placement installed"
            );
            true
        }
        Ok(false) => false,
        Err(e) => {
            warn!(epoch = p.epoch, "ignoring a published placement: {e}");
            false
        }
    }
}

/// Switches `remote` to every newer placement published, until the view closes.
pub fn follow_placements(remote: Arc<RemoteExperts>, mut view: watch::Receiver<View>) {
    tokio::spawn(async move {
        // The view wakes on every re-read of etcd: a bad record is reported once.
        let mut refused = 0;
        while view.changed().await.is_ok() {
            let current = remote.topology().epoch;
            let newer = view
                .borrow_and_update()
                .snapshot
                .placement
                .as_ref()
                .filter(|p| p.epoch > current && p.epoch != refused)
                .cloned();
            if let Some(p) = newer
                && !install(&remote, &p).await
                && remote.topology().epoch < p.epoch
            {
                refused = p.epoch;
            }
        }
    });
}

/// Every `every`, writes the tokens routed per expert since the last report under this
/// coordinator's load key (on its lease), for the leader's hot-expert replicas, and the
/// placed nodes it cannot reach (the leader re-places those no coordinator reaches).
pub fn report_load(
    session: Arc<Session>,
    mode: &ClusterMode,
    metrics: Arc<Metrics>,
    remote: Arc<RemoteExperts>,
    num_layers: usize,
    num_experts: usize,
    every: Duration,
) {
    let key = mode.etcd.keys.load(&mode.coordinator_id);
    let id = mode.coordinator_id.clone();
    tokio::spawn(async move {
        let counters: Vec<_> = (0..num_layers * num_experts)
            .map(|i| {
                metrics.routed_tokens.with_label_values(&[
                    &(i / num_experts).to_string(),
                    &(i % num_experts).to_string(),
                ])
            })
            .collect();
        let mut last: Vec<u64> = counters.iter().map(|c| c.get()).collect();
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let now: Vec<u64> = counters.iter().map(|c| c.get()).collect();
            let report = LoadReport {
                coordinator: id.clone(),
                window_ms: every.as_millis() as u64,
                tokens: now
                    .iter()
                    .zip(&last)
                    .map(|(n, l)| n.saturating_sub(*l))
                    .collect(),
                unreachable: remote
                    .topology()
                    .links
                    .iter()
                    .filter(|l| !l.is_alive())
                    .map(|l| l.addr().to_owned())
                    .collect(),
            };
            last = now;
            match serde_json::to_string(&report) {
                Ok(v) => session.set(key.clone(), v),
                Err(e) => warn!("load report: {e}"),
            }
        }
    });
}
