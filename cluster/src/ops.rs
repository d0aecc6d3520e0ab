//! Operator actions (`switchyard ctl`).

use std::time::{Duration, Instant};

use crate::etcd::{ClusterConfig, ClusterError, Snapshot, read_snapshot};
use crate::keys::check_id;
use crate::rebalance::{RebalanceRequest, RebalanceStatus};

/// Marks `node` for draining: the leader moves its experts away and publishes a
/// placement without it, then the node leaves. Waits up to `timeout` for that placement
/// and returns it. The mark is removed by the node when a new process with that id
/// starts, so a drained-then-restarted node (a rolling upgrade) rejoins.
pub async fn drain(
    cfg: &ClusterConfig,
    node: &str,
    timeout: Duration,
) -> Result<Snapshot, ClusterError> {
    check_id("node id", node).map_err(ClusterError::Config)?;
    let mut client = cfg.connect().await?;
    let snap = read_snapshot(&mut client, cfg).await?;
    let known = snap.nodes.contains_key(node)
        || snap
            .placement
            .as_ref()
            .is_some_and(|p| p.contains_node(node));
    if !known {
        return Err(ClusterError::Config(format!(
            "no expert node `{node}` in cluster {} (known: {})",
            cfg.keys.root(),
            snap.nodes.keys().cloned().collect::<Vec<_>>().join(", ")
        )));
    }
    client
        .put(cfg.keys.drain(node), "{}", None)
        .await
        .map_err(|e| cfg.error(e))?;
    let deadline = Instant::now() + timeout;
    loop {
        let snap = read_snapshot(&mut client, cfg).await?;
        if snap
            .placement
            .as_ref()
            .is_none_or(|p| !p.contains_node(node))
        {
            return Ok(snap);
        }
        if Instant::now() >= deadline {
            return Err(ClusterError::Timeout(format!(
                "node `{node}` is still in the placement after {timeout:?}: is a coordinator \
                 running, and do the other nodes have room for its experts?"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Removes a drain mark.
pub async fn undrain(cfg: &ClusterConfig, node: &str) -> Result<(), ClusterError> {
    check_id("node id", node).map_err(ClusterError::Config)?;
    let mut client = cfg.connect().await?;
    client
        .delete(cfg.keys.drain(node), None)
        .await
        .map_err(|e| cfg.error(e))?;
    Ok(())
}

/// The cluster's state, read once.
pub async fn status(cfg: &ClusterConfig) -> Result<Snapshot, ClusterError> {
    let mut client = cfg.connect().await?;
    read_snapshot(&mut client, cfg).await
}

/// Asks the leader to rebalance by the load measured now, and waits up to `timeout` for
/// its answer: unchanged (not better), or the move's end (done, or stopped part way).
pub async fn rebalance(
    cfg: &ClusterConfig,
    timeout: Duration,
) -> Result<RebalanceStatus, ClusterError> {
    let mut client = cfg.connect().await?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let id = format!("{}-{nanos}", std::process::id());
    let body = serde_json::to_string(&RebalanceRequest { id: id.clone() })
        .map_err(|e| ClusterError::Config(e.to_string()))?;
    client
        .put(cfg.keys.rebalance(), body, None)
        .await
        .map_err(|e| cfg.error(e))?;
    let deadline = Instant::now() + timeout;
    loop {
        let snap = read_snapshot(&mut client, cfg).await?;
        if let Some(s) = snap.rebalance_status.filter(|s| s.id == id)
            && s.state.is_final()
        {
            return Ok(s);
        }
        if Instant::now() >= deadline {
            return Err(ClusterError::Timeout(format!(
                "no rebalance answer within {timeout:?}: is a coordinator (the leader: {}) running?",
                snap.leader.as_deref().unwrap_or("none elected")
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
