//! A lease kept alive on its own thread, and the keys that live and die with it.
//!
//! The renewal runs on a dedicated OS thread with its own small runtime: a coordinator
//! or node whose runtime is saturated by forward passes must not lose its lease (and
//! with it its place in the cluster) because a keep-alive could not get scheduled.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use etcd_client::{Client, PutOptions};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::etcd::{ClusterConfig, ClusterError};

struct Shared {
    values: Mutex<BTreeMap<String, String>>,
    changed: Notify,
    /// The live lease, 0 while there is none.
    lease: AtomicI64,
    stop: AtomicBool,
}

/// Owns the lease thread; dropping it stops renewing (the keys expire after the TTL).
pub struct Session {
    shared: Arc<Shared>,
    cfg: ClusterConfig,
}

impl Session {
    /// Starts keeping a lease of `ttl` alive. `name` labels the log lines.
    pub fn start(cfg: ClusterConfig, ttl: Duration, name: &str) -> Result<Self, ClusterError> {
        let ttl_s = ttl.as_secs().max(1) as i64;
        let shared = Arc::new(Shared {
            values: Mutex::new(BTreeMap::new()),
            changed: Notify::new(),
            lease: AtomicI64::new(0),
            stop: AtomicBool::new(false),
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ClusterError::Config(format!("lease runtime: {e}")))?;
        let (s, c, n) = (shared.clone(), cfg.clone(), name.to_owned());
        std::thread::Builder::new()
            .name(format!("etcd-lease-{name}"))
            .spawn(move || runtime.block_on(keep_alive_forever(c, s, ttl_s, n)))
            .map_err(|e| ClusterError::Config(format!("lease thread: {e}")))?;
        Ok(Session { shared, cfg })
    }

    /// Puts `key = value` on the lease now (or as soon as etcd is reachable) and again
    /// whenever the lease has to be granted anew.
    pub fn set(&self, key: String, value: String) {
        let mut v = self
            .shared
            .values
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if v.get(&key) != Some(&value) {
            v.insert(key, value);
            drop(v);
            self.shared.changed.notify_one();
        }
    }

    /// The current lease id, if the session holds one.
    pub fn lease(&self) -> Option<i64> {
        match self.shared.lease.load(Ordering::SeqCst) {
            0 => None,
            id => Some(id),
        }
    }

    /// Waits up to `timeout` for the first lease.
    pub async fn wait_lease(&self, timeout: Duration) -> Result<i64, ClusterError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(id) = self.lease() {
                return Ok(id);
            }
            if Instant::now() >= deadline {
                return Err(ClusterError::Timeout(format!(
                    "no etcd lease within {timeout:?} from {}",
                    self.cfg.endpoints.join(",")
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops renewing and revokes the lease, so that its keys vanish now rather than
    /// after the TTL (a clean exit).
    pub async fn revoke(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.changed.notify_one();
        if let Some(id) = self.lease()
            && let Ok(mut client) = self.cfg.connect().await
            && let Err(e) = client.lease_revoke(id).await
        {
            warn!("revoking lease: {e}");
        }
        self.shared.lease.store(0, Ordering::SeqCst);
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.changed.notify_one();
    }
}

async fn keep_alive_forever(cfg: ClusterConfig, shared: Arc<Shared>, ttl: i64, name: String) {
    let mut backoff = Duration::from_millis(100);
    while !shared.stop.load(Ordering::SeqCst) {
        match hold_one_lease(&cfg, &shared, ttl, &name).await {
            Ok(()) => return,
            Err(e) => {
                shared.lease.store(0, Ordering::SeqCst);
                debug!(session = %name, "lease lost or not granted: {e}");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// Grants a lease, puts the values on it and renews it until it is lost (an error) or
/// the session stops (`Ok`).
async fn hold_one_lease(
    cfg: &ClusterConfig,
    shared: &Shared,
    ttl: i64,
    name: &str,
) -> Result<(), String> {
    let mut client = cfg.connect().await.map_err(|e| e.to_string())?;
    let lease = client
        .lease_grant(ttl, None)
        .await
        .map_err(|e| e.to_string())?
        .id();
    let (mut keeper, mut acks) = client
        .lease_keep_alive(lease)
        .await
        .map_err(|e| e.to_string())?;
    put_all(&mut client, shared, lease).await?;
    shared.lease.store(lease, Ordering::SeqCst);
    info!(session = %name, lease, ttl, "etcd lease granted");
    let every = Duration::from_millis((ttl as u64 * 1000 / 3).max(200));
    let mut last_ack = Instant::now();
    let mut tick = tokio::time::interval(every);
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        tokio::select! {
            _ = tick.tick() => {
                if last_ack.elapsed() > Duration::from_secs(ttl as u64) {
                    return Err("no keep-alive answer within the TTL".into());
                }
                keeper.keep_alive().await.map_err(|e| e.to_string())?;
            }
            ack = acks.message() => match ack {
                Ok(Some(r)) if r.ttl() > 0 => last_ack = Instant::now(),
                Ok(Some(_)) => return Err("lease expired".into()),
                Ok(None) => return Err("keep-alive stream closed".into()),
                Err(e) => return Err(e.to_string()),
            },
            () = shared.changed.notified() => {
                put_all(&mut client, shared, lease).await?;
            }
        }
    }
}

async fn put_all(client: &mut Client, shared: &Shared, lease: i64) -> Result<(), String> {
    let values = shared
        .values
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    for (k, v) in values {
        client
            .put(k, v, Some(PutOptions::new().with_lease(lease)))
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}
