//! Connecting to etcd and reading a cluster's whole state in one request.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions};
use serde::Serialize;
use tracing::warn;

use crate::keys::Keys;
use crate::rebalance::{RebalanceRequest, RebalanceStatus};
use crate::records::{LeaderRecord, LoadReport, NodeRecord, PlacementRecord};

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("etcd at {endpoints}: {source}")]
    Etcd {
        endpoints: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Timeout(String),
}

/// Where a cluster lives: etcd endpoints and the cluster's name.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub endpoints: Vec<String>,
    pub keys: Keys,
}

impl ClusterConfig {
    pub fn new(endpoints: Vec<String>, cluster: &str) -> Result<Self, ClusterError> {
        if endpoints.is_empty() {
            return Err(ClusterError::Config("no etcd endpoints given".into()));
        }
        Ok(ClusterConfig {
            endpoints,
            keys: Keys::new(cluster).map_err(ClusterError::Config)?,
        })
    }

    pub fn error(&self, source: etcd_client::Error) -> ClusterError {
        ClusterError::Etcd {
            endpoints: self.endpoints.join(","),
            source,
        }
    }

    /// A client whose every request fails within a few seconds when etcd is away: the
    /// callers retry, nothing on the serving path waits for etcd.
    pub async fn connect(&self) -> Result<Client, ClusterError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(3))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        Client::connect(&self.endpoints, Some(options))
            .await
            .map_err(|e| self.error(e))
    }
}

/// Everything under a cluster's prefix, parsed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Snapshot {
    /// etcd's revision when this was read.
    pub revision: i64,
    pub nodes: BTreeMap<String, NodeRecord>,
    pub placement: Option<PlacementRecord>,
    /// Revision the placement key was last written at (0: never), for compare-and-swap.
    #[serde(skip)]
    pub placement_revision: i64,
    /// Why the placement key holds something unusable (it is then `None` above).
    pub placement_invalid: Option<String>,
    pub drains: BTreeSet<String>,
    pub loads: Vec<LoadReport>,
    pub leader: Option<String>,
    /// The last `ctl rebalance` request, and the leader's last answer to one.
    pub rebalance_request: Option<RebalanceRequest>,
    pub rebalance_status: Option<RebalanceStatus>,
}

impl Snapshot {
    /// Routed tokens per expert summed over the coordinators' reports.
    pub fn total_load(&self, experts: usize) -> Vec<u64> {
        let mut total = vec![0u64; experts];
        for r in &self.loads {
            for (t, v) in total.iter_mut().zip(&r.tokens) {
                *t += v;
            }
        }
        total
    }
}

/// Reads the cluster's state. Records that do not parse are skipped with a warning:
/// one bad key (written by hand, or by another version) must not stop the cluster.
pub async fn read_snapshot(
    client: &mut Client,
    cfg: &ClusterConfig,
) -> Result<Snapshot, ClusterError> {
    let keys = &cfg.keys;
    let resp = client
        .get(keys.root(), Some(GetOptions::new().with_prefix()))
        .await
        .map_err(|e| cfg.error(e))?;
    let mut snap = Snapshot {
        revision: resp.header().map_or(0, |h| h.revision()),
        ..Snapshot::default()
    };
    let (nodes, drains, loads, placement, leader) = (
        keys.nodes(),
        keys.drains(),
        keys.loads(),
        keys.placement(),
        keys.leader(),
    );
    let (rebalance, rebalance_status) = (keys.rebalance(), keys.rebalance_status());
    for kv in resp.kvs() {
        let Ok(key) = kv.key_str() else { continue };
        let value = kv.value();
        if let Some(id) = key.strip_prefix(&nodes) {
            match serde_json::from_slice::<NodeRecord>(value) {
                Ok(r) => {
                    snap.nodes.insert(id.to_owned(), r);
                }
                Err(e) => warn!(key, "skipping a node record that does not parse: {e}"),
            }
        } else if let Some(id) = key.strip_prefix(&drains) {
            snap.drains.insert(id.to_owned());
        } else if key.starts_with(&loads) {
            match serde_json::from_slice::<LoadReport>(value) {
                Ok(r) => snap.loads.push(r),
                Err(e) => warn!(key, "skipping a load report that does not parse: {e}"),
            }
        } else if key == placement {
            // The revision counts even for a record that cannot be used: the leader's
            // compare-and-swap must be able to overwrite it.
            snap.placement_revision = kv.mod_revision();
            match PlacementRecord::decode(value) {
                Ok(p) => snap.placement = Some(p),
                Err(e) => {
                    warn!(key, "ignoring a placement that cannot be used: {e}");
                    snap.placement_invalid = Some(e);
                }
            }
        } else if key == leader
            && let Ok(r) = serde_json::from_slice::<LeaderRecord>(value)
        {
            snap.leader = Some(r.id);
        } else if key == rebalance {
            snap.rebalance_request = serde_json::from_slice(value)
                .map_err(|e| warn!(key, "ignoring a rebalance request that does not parse: {e}"))
                .ok();
        } else if key == rebalance_status {
            snap.rebalance_status = serde_json::from_slice(value).ok();
        }
    }
    Ok(snap)
}
