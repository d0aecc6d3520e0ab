//! One expert node as the coordinator sees it: the connection, the Forward stream every
//! layer's work is multiplexed on by request id, liveness (keepalive, deadline,
//! reconnects), what the node was found to lack, and its recent answer times.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchyard_proto::pb::{ExpertRef, ExpertsRequest, ForwardRequest, ForwardResponse};
use switchyard_proto::tls::{Tls, host_of};
use switchyard_proto::{ExpertServiceClient, MAX_MESSAGE_BYTES};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tracing::{instrument, warn};

use crate::hedge::{LatencyWindow, OUTLIER_STREAK};
use crate::remote::RemoteError;

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<ForwardResponse>>>>;

/// The coordinator's end of one node's Forward stream.
pub struct NodeLink {
    pub(crate) addr: String,
    pub(crate) tls: Option<Tls>,
    pub(crate) keepalive: Keepalive,
    /// The current connection (none before the first one succeeds); replaced whole
    /// when a dead node is reconnected.
    stream: std::sync::RwLock<Option<Arc<NodeStream>>>,
    next_id: AtomicU64,
    /// Experts of this node's share that it was found not to hold (unloaded behind our
    /// back, a restart we missed): not served here until reloaded.
    missing: Mutex<Vec<(usize, usize)>>,
    /// Recent answer times, for hedging.
    latency: Mutex<LatencyWindow>,
    /// Until when planning avoids this node (a hedge beat it, or it was far slower than
    /// its peers on the wire several layers in a row).
    gray_until: Mutex<Option<Instant>>,
    /// Layers in a row this node was such an outlier.
    slow_streak: AtomicU32,
}

/// How long a node a hedge beat is avoided before it is tried again.
const GRAY_FOR: Duration = Duration::from_secs(1);

/// One connection to a node and the Forward stream open on it.
struct NodeStream {
    client: ExpertServiceClient<Channel>,
    tx: mpsc::Sender<ForwardRequest>,
    pending: Pending,
    alive: Arc<AtomicBool>,
}

/// HTTP/2 pings on every coordinator -> node connection: how a node that goes silent
/// (no reset: a cut link, a partition, a hung host) is found. A connection whose ping is
/// not answered within `timeout` is closed, which fails every dispatch in flight on it
/// at once, and the layer is planned again on replicas: one step carries every running
/// sequence, so nothing may wait on one node for longer than this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Silence on the connection before a ping is sent.
    pub interval: Duration,
    /// How long the answer to a ping may take.
    pub timeout: Duration,
}

impl Default for Keepalive {
    fn default() -> Self {
        Keepalive {
            interval: Duration::from_millis(500),
            timeout: Duration::from_millis(1000),
        }
    }
}

/// The endpoint of a node at `addr` (`HOST:PORT` or a URI). With `tls`, the connection
/// is `https` and the node's certificate must chain to our CA and name `HOST`.
pub(crate) fn endpoint(
    addr: &str,
    tls: Option<&Tls>,
    keepalive: Keepalive,
) -> Result<Endpoint, RemoteError> {
    let bad = |reason: String| RemoteError::Address {
        addr: addr.to_owned(),
        reason,
    };
    let rest = addr.split_once("://").map_or(addr, |(_, r)| r);
    // tonic runs TLS only on `https` URIs and plaintext only on `http` ones: the scheme
    // follows the configuration, whatever the address was written with.
    let uri = match tls {
        Some(_) => format!("https://{rest}"),
        None => format!("http://{rest}"),
    };
    let mut endpoint = Endpoint::from_shared(uri).map_err(|e| bad(e.to_string()))?;
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls.client_config(host_of(addr)))
            .map_err(|e| bad(format!("TLS configuration: {e}")))?;
    }
    Ok(endpoint
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        // Activations of a prefill chunk are megabytes: small default windows would
        // make every layer wait for window updates.
        .initial_stream_window_size(16 << 20)
        .initial_connection_window_size(64 << 20)
        .http2_keep_alive_interval(keepalive.interval)
        .keep_alive_timeout(keepalive.timeout)
        .keep_alive_while_idle(true))
}

impl NodeLink {
    pub async fn connect(
        addr: &str,
        tls: Option<&Tls>,
        keepalive: Keepalive,
    ) -> Result<Self, RemoteError> {
        let stream = NodeStream::open(addr, tls, keepalive).await?;
        Ok(NodeLink {
            addr: addr.to_owned(),
            tls: tls.cloned(),
            keepalive,
            stream: std::sync::RwLock::new(Some(Arc::new(stream))),
            next_id: AtomicU64::new(1),
            missing: Mutex::default(),
            latency: Mutex::default(),
            gray_until: Mutex::default(),
            slow_streak: AtomicU32::new(0),
        })
    }

    /// A link to a node not reached yet: down until the reconnect loop reaches it.
    pub fn unconnected(addr: &str, tls: Option<&Tls>, keepalive: Keepalive) -> Self {
        NodeLink {
            addr: addr.to_owned(),
            tls: tls.cloned(),
            keepalive,
            stream: std::sync::RwLock::new(None),
            next_id: AtomicU64::new(1),
            missing: Mutex::default(),
            latency: Mutex::default(),
            gray_until: Mutex::default(),
            slow_streak: AtomicU32::new(0),
        }
    }

    fn current(&self) -> Option<Arc<NodeStream>> {
        match self.stream.read() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Opens a fresh connection to a node that went away, has it load `experts`, and
    /// only then puts it in service, so no request reaches a node that lacks its experts.
    pub async fn reconnect(&self, experts: &[(usize, usize)]) -> Result<(), RemoteError> {
        let fresh = NodeStream::open(&self.addr, self.tls.as_ref(), self.keepalive).await?;
        load_on(&fresh.client, &self.addr, experts).await?;
        match self.stream.write() {
            Ok(mut s) => *s = Some(Arc::new(fresh)),
            Err(poisoned) => *poisoned.into_inner() = Some(Arc::new(fresh)),
        }
        if let Ok(mut m) = self.missing.lock() {
            m.clear();
        }
        Ok(())
    }
}

impl NodeStream {
    async fn open(
        addr: &str,
        tls: Option<&Tls>,
        keepalive: Keepalive,
    ) -> Result<Self, RemoteError> {
        let channel = endpoint(addr, tls, keepalive)?
            .connect()
            .await
            .map_err(|e| RemoteError::Connect {
                addr: addr.to_owned(),
                reason: with_tls_hint(error_chain(&e), tls.is_some()),
            })?;
        let client = ExpertServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let (tx, rx) = mpsc::channel::<ForwardRequest>(64);
        let mut responses = client
            .clone()
            .forward(ReceiverStream::new(rx))
            .await
            .map_err(|e| RemoteError::Connect {
                addr: addr.to_owned(),
                // A node that refuses our certificate does so after the handshake, so
                // it shows here, with the reason in the status's sources.
                reason: with_tls_hint(status_chain(&e), tls.is_some()),
            })?
            .into_inner();
        let pending: Pending = Arc::default();
        let alive = Arc::new(AtomicBool::new(true));
        let (pending_rx, alive_rx, addr_rx) = (pending.clone(), alive.clone(), addr.to_owned());
        tokio::spawn(async move {
            loop {
                match responses.next().await {
                    Some(Ok(resp)) => {
                        let waiter = pending_rx.lock().ok().and_then(|mut p| p.remove(&resp.id));
                        if let Some(w) = waiter {
                            let _ = w.send(resp);
                        }
                    }
                    Some(Err(status)) => {
                        warn!(node = %addr_rx, %status, "forward stream failed");
                        break;
                    }
                    None => {
                        warn!(node = %addr_rx, "forward stream closed by node");
                        break;
                    }
                }
            }
            alive_rx.store(false, Ordering::SeqCst);
            // Dropping the waiters wakes every caller with an error.
            if let Ok(mut p) = pending_rx.lock() {
                p.clear();
            }
        });
        Ok(NodeStream {
            client,
            tx,
            pending,
            alive,
        })
    }
}

/// The body of LoadExperts and UnloadExperts.
pub(crate) fn experts_request(experts: &[(usize, usize)], epoch: u64) -> ExpertsRequest {
    ExpertsRequest {
        experts: experts
            .iter()
            .map(|&(l, e)| ExpertRef {
                layer: l as u32,
                expert: e as u32,
            })
            .collect(),
        epoch,
    }
}

/// LoadExperts at epoch 0: accepted by a node at any epoch (it only adds), which is what
/// static placement, reconnects and recovery loads need; the leader's fenced loads are in
/// `cluster.rs`.
async fn load_on(
    client: &ExpertServiceClient<Channel>,
    addr: &str,
    experts: &[(usize, usize)],
) -> Result<(), RemoteError> {
    let req = experts_request(experts, 0);
    client
        .clone()
        .load_experts(req)
        .await
        .map_err(|s| RemoteError::Load {
            addr: addr.to_owned(),
            reason: s.message().to_owned(),
        })?;
    Ok(())
}

impl NodeLink {
    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn is_alive(&self) -> bool {
        self.current()
            .is_some_and(|s| s.alive.load(Ordering::SeqCst))
    }

    #[instrument(skip(self, experts), fields(node = %self.addr, n = experts.len()))]
    pub async fn load(&self, experts: &[(usize, usize)]) -> Result<(), RemoteError> {
        let Some(stream) = self.current() else {
            return Err(RemoteError::Connect {
                addr: self.addr.clone(),
                reason: "not connected".into(),
            });
        };
        load_on(&stream.client, &self.addr, experts).await
    }

    /// Fails every dispatch in flight on this link at once and takes it out of service.
    pub(crate) fn abandon(&self) {
        if let Some(stream) = self.current() {
            stream.alive.store(false, Ordering::SeqCst);
            // Dropping the waiters wakes every caller with an error.
            if let Ok(mut p) = stream.pending.lock() {
                p.clear();
            }
        }
    }

    /// Whether a hedge beat this node lately: planning then prefers its replicas. The
    /// mark lapses, so the node is tried again (and hedged again if still slow).
    pub(crate) fn is_gray(&self) -> bool {
        self.gray_until
            .lock()
            .ok()
            .and_then(|g| *g)
            .is_some_and(|t| Instant::now() < t)
    }

    pub(crate) fn mark_gray(&self) {
        if let Ok(mut g) = self.gray_until.lock() {
            *g = Some(Instant::now() + GRAY_FOR);
        }
    }

    /// Notes whether this node's answer to a layer was a wire outlier
    /// ([`crate::hedge::wire_outliers`]); after [`OUTLIER_STREAK`] in a row it is marked
    /// gray, and true is returned.
    pub(crate) fn note_wire_outlier(&self, outlier: bool) -> bool {
        if !outlier {
            self.slow_streak.store(0, Ordering::Relaxed);
            return false;
        }
        if self.slow_streak.fetch_add(1, Ordering::Relaxed) + 1 < OUTLIER_STREAK {
            return false;
        }
        self.slow_streak.store(0, Ordering::Relaxed);
        self.mark_gray();
        true
    }

    pub(crate) fn latency_p99(&self, tokens: usize) -> Option<Duration> {
        self.latency.lock().ok()?.p99(tokens)
    }

    pub(crate) fn record_latency(&self, tokens: usize, took: Duration) {
        if let Ok(mut w) = self.latency.lock() {
            w.record(tokens, took);
        }
    }

    /// Whether this node serves (layer, expert) now: connected, and not known to lack it.
    pub fn serves(&self, layer: usize, expert: usize) -> bool {
        self.is_alive()
            && self
                .missing
                .lock()
                .map(|m| !m.contains(&(layer, expert)))
                .unwrap_or(true)
    }

    /// Loads whatever of `share` the node lacks (the load is idempotent) and forgets
    /// what it was missing.
    pub async fn repair(&self, share: &[(usize, usize)]) -> Result<(), RemoteError> {
        self.load(share).await?;
        if let Ok(mut m) = self.missing.lock() {
            m.clear();
        }
        Ok(())
    }

    /// Asks the node what it holds; records and reloads what `share` says it should and
    /// it does not. Returns what was missing.
    pub async fn audit(
        &self,
        share: &[(usize, usize)],
    ) -> Result<Vec<(usize, usize)>, RemoteError> {
        let Some(stream) = self.current() else {
            return Ok(Vec::new());
        };
        let info = stream
            .client
            .clone()
            .describe(switchyard_proto::pb::DescribeRequest {})
            .await
            .map_err(|s| RemoteError::Connect {
                addr: self.addr.clone(),
                reason: s.message().to_owned(),
            })?
            .into_inner();
        let held: Vec<(usize, usize)> = info
            .held
            .iter()
            .map(|r| (r.layer as usize, r.expert as usize))
            .collect();
        let missing: Vec<(usize, usize)> = share
            .iter()
            .copied()
            .filter(|x| !held.contains(x))
            .collect();
        if missing.is_empty() {
            return Ok(missing);
        }
        warn!(node = %self.addr, ?missing, "node lacks experts of its share: reloading them");
        if let Ok(mut m) = self.missing.lock() {
            *m = missing.clone();
        }
        self.repair(share).await?;
        tracing::info!(node = %self.addr, reloaded = missing.len(), "experts reloaded");
        Ok(missing)
    }

    /// Sends one request on the stream and waits for its answer.
    pub(crate) async fn call(
        &self,
        mut req: ForwardRequest,
        timeout: Duration,
    ) -> Result<ForwardResponse, String> {
        let Some(stream) = self.current().filter(|s| s.alive.load(Ordering::SeqCst)) else {
            return Err(format!("node {} is down", self.addr));
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        req.id = id;
        let (tx, rx) = oneshot::channel();
        stream
            .pending
            .lock()
            .map_err(|_| "pending map poisoned".to_string())?
            .insert(id, tx);
        let result = async {
            stream
                .tx
                .send(req)
                .await
                .map_err(|_| format!("stream to node {} is closed", self.addr))?;
            rx.await
                .map_err(|_| format!("node {} went away mid-request", self.addr))
        };
        let out = tokio::time::timeout(timeout, result)
            .await
            .unwrap_or_else(|_| {
                // A node past its deadline (hung, frozen, partitioned) is treated as dead
                // until the reconnect loop gets a fresh connection through to it: otherwise
                // every later layer would wait out the same deadline again.
                stream.alive.store(false, Ordering::SeqCst);
                Err(format!(
                    "node {} did not answer within {timeout:?}: treated as down until it reconnects",
                    self.addr
                ))
            });
        if out.is_err()
            && let Ok(mut p) = stream.pending.lock()
        {
            p.remove(&id);
        }
        out
    }
}

/// An error and its sources: tonic's transport error alone says only "transport error",
/// its sources say why (refused, certificate not trusted, ...).
fn error_chain(e: &dyn std::error::Error) -> String {
    with_sources(e.to_string(), e.source())
}

/// A status's message and the sources under it (its own Display is a debug dump).
fn status_chain(s: &tonic::Status) -> String {
    with_sources(s.message().to_owned(), std::error::Error::source(s))
}

fn with_sources(mut out: String, mut source: Option<&dyn std::error::Error>) -> String {
    while let Some(e) = source {
        let text = e.to_string();
        // Some layers repeat their source's text in their own.
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = e.source();
    }
    out
}

/// A plaintext client talking to a TLS node sees only an HTTP/2 protocol error: say
/// what it most likely means.
fn with_tls_hint(reason: String, tls: bool) -> String {
    if !tls && reason.contains("http2 error") {
        format!(
            "{reason} (if the node serves TLS, give the coordinator --tls-cert, --tls-key and --tls-ca)"
        )
    } else {
        reason
    }
}

/// Polls a node's `grpc.health.v1` until it reports SERVING or `timeout` passes (over
/// mutual TLS when `tls` is given: a TLS node answers nothing else).
pub async fn wait_healthy(
    addr: &str,
    timeout: Duration,
    tls: Option<&Tls>,
) -> Result<(), RemoteError> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let deadline = Instant::now() + timeout;
    let mut last = String::from("not tried");
    while Instant::now() < deadline {
        match endpoint(addr, tls, Keepalive::default())?.connect().await {
            Ok(channel) => {
                let reply = HealthClient::new(channel)
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await;
                match reply {
                    Ok(r) if r.get_ref().status == ServingStatus::Serving as i32 => return Ok(()),
                    Ok(r) => last = format!("status {}", r.get_ref().status),
                    Err(s) => last = s.message().to_owned(),
                }
            }
            Err(e) => last = error_chain(&e),
        }
        // A node that is still loading answers NOT_SERVING or refuses the connection.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(RemoteError::Connect {
        addr: addr.to_owned(),
        reason: format!("not healthy within {timeout:?}: {last}"),
    })
}
