//! Following the cluster: a task that keeps the latest [`Snapshot`] in a watch channel.
//!
//! It watches the cluster's prefix and re-reads the whole state on every change (a
//! handful of keys): simpler than applying events, and a watch resumed after etcd comes
//! back cannot miss anything. A slow periodic re-read covers a watch that stalls
//! silently. While etcd is unreachable the last snapshot stays, marked stale, and
//! serving goes on with it.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::WatchOptions;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::etcd::{ClusterConfig, ClusterError, Snapshot, read_snapshot};

/// The latest state and whether it is current.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub snapshot: Arc<Snapshot>,
    /// False while etcd cannot be reached: `snapshot` is the last one seen.
    pub fresh: bool,
}

const REREAD_EVERY: Duration = Duration::from_secs(2);

/// Starts following `cfg`'s cluster on the current runtime. The task ends when every
/// receiver is dropped.
pub fn follow(cfg: ClusterConfig) -> watch::Receiver<View> {
    let (tx, rx) = watch::channel(View::default());
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            match follow_once(&cfg, &tx).await {
                Ok(()) => return,
                Err(e) => {
                    let was_fresh = tx.borrow().fresh;
                    if was_fresh {
                        warn!("etcd unreachable, serving on the last placement: {e}");
                        tx.send_modify(|v| v.fresh = false);
                    }
                    // Reached again after a failure: start retrying quickly next time.
                    if was_fresh {
                        backoff = Duration::from_millis(100);
                    }
                }
            }
            if tx.is_closed() {
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    });
    rx
}

/// One connection's worth of following; `Ok` when nobody listens any more.
async fn follow_once(cfg: &ClusterConfig, tx: &watch::Sender<View>) -> Result<(), ClusterError> {
    let mut client = cfg.connect().await?;
    let snap = read_snapshot(&mut client, cfg).await?;
    let from = snap.revision + 1;
    publish(tx, snap);
    let mut stream = client
        .watch(
            cfg.keys.root(),
            Some(WatchOptions::new().with_prefix().with_start_revision(from)),
        )
        .await
        .map_err(|e| cfg.error(e))?;
    let mut tick = tokio::time::interval(REREAD_EVERY);
    loop {
        tokio::select! {
            msg = stream.message() => match msg {
                Ok(Some(resp)) if resp.canceled() => {
                    return Err(ClusterError::Config(format!("watch cancelled: {}", resp.cancel_reason())));
                }
                Ok(Some(resp)) if resp.events().is_empty() => {}
                Ok(Some(_)) => publish(tx, read_snapshot(&mut client, cfg).await?),
                Ok(None) => return Err(ClusterError::Config("watch stream closed".into())),
                Err(e) => return Err(cfg.error(e)),
            },
            _ = tick.tick() => publish(tx, read_snapshot(&mut client, cfg).await?),
            () = tx.closed() => return Ok(()),
        }
    }
}

fn publish(tx: &watch::Sender<View>, snap: Snapshot) {
    if !tx.borrow().fresh && snap.revision > 0 {
        info!("etcd reachable: following the cluster again");
    }
    tx.send_modify(|v| {
        v.snapshot = Arc::new(snap);
        v.fresh = true;
    });
}
