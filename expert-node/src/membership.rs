//! Cluster mode: the node's record in etcd, kept on a lease, and leaving when drained.

use std::sync::Arc;
use std::time::Duration;

use switchyard_cluster::{ClusterConfig, NodeRecord, Session, follow, ops};
use tracing::{info, warn};

use crate::{ExpertNode, NodeError};

/// How often the record is refreshed from what the node holds (a put only when it
/// changed).
const RECORD_EVERY: Duration = Duration::from_millis(250);

/// After the published placement no longer uses a drained node, coordinators finish the
/// layers they had in flight on the previous one before the node stops answering.
const LEAVE_GRACE: Duration = Duration::from_secs(2);

/// A node registered in a cluster.
pub struct Membership {
    pub session: Arc<Session>,
}

impl Membership {
    /// Registers `node`, reachable at `advertise`, and keeps its record current. A
    /// drain mark left by a previous process with the same id is removed: a node that
    /// starts is a node that wants to serve (a rolling restart after `ctl drain`).
    pub async fn join(
        node: Arc<ExpertNode>,
        cfg: ClusterConfig,
        advertise: String,
        ttl: Duration,
        startup_timeout: Duration,
    ) -> Result<Self, NodeError> {
        let cluster_err = |e: switchyard_cluster::ClusterError| NodeError::Cluster(e.to_string());
        switchyard_cluster::keys::check_id("node id", node.node_id())
            .map_err(NodeError::Cluster)?;
        ops::undrain(&cfg, node.node_id())
            .await
            .map_err(cluster_err)?;
        let session =
            Arc::new(Session::start(cfg.clone(), ttl, node.node_id()).map_err(cluster_err)?);
        let key = cfg.keys.node(node.node_id());
        let record = move |node: &ExpertNode| {
            let c = node.model_config();
            serde_json::to_string(&NodeRecord {
                id: node.node_id().to_owned(),
                addr: advertise.clone(),
                device: node.device().to_owned(),
                num_layers: c.expert_layers(),
                num_experts: c.num_experts,
                capacity: node.capacity(),
                bytes_per_expert: node.bytes_per_expert(),
                held: node.held(),
                version: env!("CARGO_PKG_VERSION").into(),
                epoch: node.epoch(),
                weights: node.weights().to_owned(),
            })
        };
        let first = record(&node).map_err(|e| NodeError::Internal(e.to_string()))?;
        session.set(key.clone(), first);
        session
            .wait_lease(startup_timeout)
            .await
            .map_err(cluster_err)?;
        info!(node = %node.node_id(), "registered in the cluster");
        let s = Arc::clone(&session);
        let weak = Arc::downgrade(&node);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RECORD_EVERY);
            loop {
                tick.tick().await;
                let Some(node) = weak.upgrade() else { return };
                match record(&node) {
                    Ok(v) => s.set(key.clone(), v),
                    Err(e) => warn!("node record: {e}"),
                }
            }
        });
        Ok(Membership { session })
    }

    /// Resolves once this node has been drained: an operator marked it and the
    /// published placement no longer uses it (plus a grace period).
    pub async fn drained(cfg: ClusterConfig, id: String) {
        let mut view = follow(cfg);
        loop {
            let done = {
                let v = view.borrow_and_update();
                v.fresh
                    && v.snapshot.drains.contains(&id)
                    && v.snapshot
                        .placement
                        .as_ref()
                        .is_none_or(|p| !p.contains_node(&id))
            };
            if done {
                info!(node = %id, "drained: leaving the cluster");
                tokio::time::sleep(LEAVE_GRACE).await;
                return;
            }
            if view.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Deletes the record now rather than a TTL later.
    pub async fn leave(self) {
        self.session.revoke().await;
    }
}
