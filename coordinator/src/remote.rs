//! Experts on other processes: each layer's work planned over the nodes of the current
//! topology and sent on their links, failed over to replicas, recovery-loaded, hedged.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::join_all;
use switchyard_engine::{ExpertError, Experts, Routing};
use switchyard_proto::pb::{ForwardRequest, ForwardResponse};
use switchyard_proto::tls::Tls;
use switchyard_proto::{WireFormat, decode_activations, encode_activations};
use tracing::{instrument, warn};

use crate::balance::BalanceWindow;
use crate::dispatch::{NodeWork, plan_avoiding, replan_away};
use crate::hedge::{Hedging, wire_outliers};
pub use crate::link::{Keepalive, NodeLink, wait_healthy};
pub(crate) use crate::link::{endpoint, experts_request};
use crate::metrics::Metrics;
use crate::placement::{Placement, PlacementError};

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("invalid node address `{addr}`: {reason}")]
    Address { addr: String, reason: String },
    #[error("cannot reach expert node {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("expert node {addr} refused to load experts: {reason}")]
    Load { addr: String, reason: String },
    #[error("cluster: {0}")]
    Cluster(String),
}

/// Timing of the last layer dispatched, for the dispatch-overhead benchmark.
#[derive(Debug, Default, Clone, Copy)]
pub struct DispatchStats {
    pub layers: u64,
    pub round_trip_micros: u64,
    pub max_compute_micros: u64,
    pub bytes_sent: u64,
}

/// How often dead nodes are retried.
const RECONNECT_EVERY: Duration = Duration::from_millis(500);

/// How often (in reconnect periods) live nodes are asked what they hold, in static mode.
const AUDIT_EVERY: u32 = 4;

/// Brings back nodes whose stream died (a restarted process, a rotated certificate):
/// reconnects, reloads the node's share of the placement, then puts it back in service.
/// With `audit` (static mode: nobody else owns the placement) live nodes are also asked
/// what they hold every few periods, and what they lost is reloaded. Ends when the
/// `RemoteExperts` is dropped.
async fn reconnect_dead_nodes(topology: std::sync::Weak<TopologyCell>, audit: Arc<AtomicBool>) {
    let mut tick = 0u32;
    loop {
        tokio::time::sleep(RECONNECT_EVERY).await;
        tick = tick.wrapping_add(1);
        let Some(cell) = topology.upgrade() else {
            return;
        };
        let topo = cell.get();
        drop(cell);
        for (i, link) in topo.links.iter().enumerate() {
            let share = topo.placement.experts_of(i);
            if link.is_alive() {
                if tick.is_multiple_of(AUDIT_EVERY)
                    && audit.load(Ordering::SeqCst)
                    && let Err(e) = link.audit(&share).await
                {
                    tracing::debug!(node = %link.addr(), "audit failed: {e}");
                }
                continue;
            }
            match link.reconnect(&share).await {
                Ok(()) => tracing::info!(node = %link.addr(), "expert node reconnected"),
                Err(e) => tracing::debug!(node = %link.addr(), "still down: {e}"),
            }
        }
    }
}

/// The nodes and who holds what: replaced whole when a new placement is published or
/// a dead node's experts are loaded elsewhere.
pub struct Topology {
    /// The published placement epoch this follows (0 in static mode).
    pub epoch: u64,
    pub links: Vec<Arc<NodeLink>>,
    pub placement: Placement,
}

impl Topology {
    /// Experts that no live node holds, as "layer:expert".
    pub fn uncovered(&self) -> Vec<String> {
        let p = &self.placement;
        (0..p.num_layers())
            .flat_map(|l| (0..p.num_experts()).map(move |e| (l, e)))
            .filter(|&(l, e)| !p.holders(l, e).iter().any(|&n| self.links[n].serves(l, e)))
            .map(|(l, e)| format!("{l}:{e}"))
            .collect()
    }
}

/// The current topology, swapped atomically, with its generation: a number that grows by
/// one with every replacement (the load-balance window restarts on a newer one).
pub struct TopologyCell(std::sync::RwLock<(Arc<Topology>, u64)>);

impl TopologyCell {
    pub fn get(&self) -> Arc<Topology> {
        self.get_with_generation().0
    }

    /// The topology and its generation, read together.
    pub fn get_with_generation(&self) -> (Arc<Topology>, u64) {
        match self.0.read() {
            Ok(t) => (Arc::clone(&t.0), t.1),
            Err(poisoned) => {
                let t = poisoned.into_inner();
                (Arc::clone(&t.0), t.1)
            }
        }
    }

    fn set(&self, t: Arc<Topology>) {
        let mut cur = match self.0.write() {
            Ok(cur) => cur,
            Err(poisoned) => poisoned.into_inner(),
        };
        *cur = (t, cur.1 + 1);
    }

    /// Replaces `expected` by `new`; false if something else replaced it first.
    fn swap_if(&self, expected: &Arc<Topology>, new: Arc<Topology>) -> bool {
        let mut cur = match self.0.write() {
            Ok(cur) => cur,
            Err(poisoned) => poisoned.into_inner(),
        };
        if Arc::ptr_eq(&cur.0, expected) {
            *cur = (new, cur.1 + 1);
            true
        } else {
            false
        }
    }
}

/// Nodes that failed one attempt at a layer, and why.
struct DispatchFailure {
    failed: Vec<usize>,
    /// Those of `failed` that answered that they do not hold an expert we sent them.
    not_held: Vec<usize>,
    /// A node refused the work as larger than it takes (its advertised per-request
    /// cap): its replicas have the same cap, so this is no node failure to route around.
    too_large: bool,
    error: ExpertError,
}

/// [`Experts`] implemented by expert nodes over gRPC.
pub struct RemoteExperts {
    runtime: tokio::runtime::Handle,
    topology: Arc<TopologyCell>,
    /// Links by address, reused across topologies so a placement change does not
    /// reconnect to nodes that stay.
    links: Mutex<HashMap<String, Arc<NodeLink>>>,
    tls: Option<Tls>,
    /// For links to nodes a new placement adds.
    keepalive: Keepalive,
    hedging: Hedging,
    /// Whether a layer whose experts have no live holder may load them on live nodes
    /// (cluster mode) or fails (static mode: the operator chose the placement).
    recover: bool,
    /// Whether live nodes are audited for lost experts (static mode).
    audit: Arc<AtomicBool>,
    hidden: usize,
    wire: WireFormat,
    timeout: Duration,
    stats: Mutex<DispatchStats>,
    metrics: Option<Arc<Metrics>>,
    /// Assignments planned per (layer, node) over the last 25-30 s, kept with `metrics`.
    balance: BalanceWindow,
}

impl RemoteExperts {
    pub fn new(
        runtime: tokio::runtime::Handle,
        nodes: Vec<NodeLink>,
        placement: Placement,
        hidden: usize,
        wire: WireFormat,
        timeout: Duration,
    ) -> Self {
        let links: Vec<Arc<NodeLink>> = nodes.into_iter().map(Arc::new).collect();
        let by_addr = links
            .iter()
            .map(|l| (l.addr().to_owned(), Arc::clone(l)))
            .collect();
        let tls = links.first().and_then(|l| l.tls.clone());
        let keepalive = links
            .first()
            .map_or_else(Keepalive::default, |l| l.keepalive);
        let topology = Arc::new(TopologyCell(std::sync::RwLock::new((
            Arc::new(Topology {
                epoch: 0,
                links,
                placement,
            }),
            0,
        ))));
        let audit = Arc::new(AtomicBool::new(true));
        runtime.spawn(reconnect_dead_nodes(
            Arc::downgrade(&topology),
            Arc::clone(&audit),
        ));
        RemoteExperts {
            runtime,
            topology,
            links: Mutex::new(by_addr),
            tls,
            keepalive,
            hedging: Hedging::default(),
            recover: false,
            audit,
            hidden,
            wire,
            timeout,
            stats: Mutex::new(DispatchStats::default()),
            metrics: None,
            balance: BalanceWindow::default(),
        }
    }

    /// Records per-node dispatch latency, bytes and liveness in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self.refresh_metrics();
        self
    }

    pub fn with_hedging(mut self, hedging: Hedging) -> Self {
        self.hedging = hedging;
        self
    }

    /// Sets the keepalive of links to nodes added later (cluster mode starts with none).
    pub fn with_keepalive(mut self, keepalive: Keepalive) -> Self {
        self.keepalive = keepalive;
        self
    }

    /// Lets a layer whose experts lost every holder load them on live nodes and go on
    /// (cluster mode, where the leader will replan anyway).
    pub fn with_recovery(mut self, tls: Option<Tls>) -> Self {
        self.recover = true;
        // The leader owns what each node holds (and unloads what moved): reloading a
        // share from an older topology would fight it.
        self.audit.store(false, Ordering::SeqCst);
        self.tls = tls;
        self
    }

    /// The topology dispatch uses now.
    pub fn topology(&self) -> Arc<Topology> {
        self.topology.get()
    }

    /// Follows a published placement: `addrs` are the nodes `placement` indexes. Connects
    /// to new nodes (a node that cannot be reached yet starts down and is retried), then
    /// switches every later layer to it. Ignored (`Ok(false)`) unless `epoch` is newer than
    /// the current one; refused unless it places this model's experts on these nodes.
    pub async fn install(
        &self,
        epoch: u64,
        addrs: &[String],
        placement: Placement,
    ) -> Result<bool, PlacementError> {
        let current = self.topology.get();
        if epoch <= current.epoch {
            return Ok(false);
        }
        let shape = |p: &Placement| (p.num_layers(), p.num_experts());
        if shape(&placement) != shape(&current.placement) || placement.num_nodes() != addrs.len() {
            return Err(PlacementError::Invalid(format!(
                "epoch {epoch} places {} x {} experts on {} nodes ({} addresses given); this model has {} x {}",
                placement.num_layers(),
                placement.num_experts(),
                placement.num_nodes(),
                addrs.len(),
                current.placement.num_layers(),
                current.placement.num_experts()
            )));
        }
        let known: HashMap<String, Arc<NodeLink>> =
            self.links.lock().map(|m| m.clone()).unwrap_or_default();
        let (tls, keepalive) = (self.tls.clone(), self.keepalive);
        let connects = addrs.iter().map(|addr| {
            let existing = known.get(addr).cloned();
            let tls = tls.clone();
            async move {
                if let Some(link) = existing {
                    return link;
                }
                match NodeLink::connect(addr, tls.as_ref(), keepalive).await {
                    Ok(link) => Arc::new(link),
                    Err(e) => {
                        warn!(node = %addr, "new node not reachable yet: {e}");
                        Arc::new(NodeLink::unconnected(addr, tls.as_ref(), keepalive))
                    }
                }
            }
        });
        let links: Vec<Arc<NodeLink>> = join_all(connects).await;
        let mut dropped = Vec::new();
        if let Ok(mut m) = self.links.lock() {
            m.retain(|a, l| {
                let keep = addrs.contains(a);
                if !keep {
                    dropped.push(Arc::clone(l));
                }
                keep
            });
            for l in &links {
                m.entry(l.addr().to_owned())
                    .or_insert_with(|| Arc::clone(l));
            }
        }
        // A concurrent install of a newer epoch wins.
        if epoch <= self.topology.get().epoch {
            return Ok(false);
        }
        self.topology.set(Arc::new(Topology {
            epoch,
            links,
            placement,
        }));
        if let Some(m) = &self.metrics {
            m.placement_epoch
                .set(i64::try_from(epoch).unwrap_or(i64::MAX));
        }
        // A node the placement dropped (dead, partitioned, drained) gets no more work, and
        // what it still has in flight is failed now and planned again on this topology,
        // rather than waited for.
        for link in dropped {
            link.abandon();
        }
        Ok(true)
    }

    /// Brings the per-node gauges and the per-layer balancedness up to date (called when
    /// metrics are scraped).
    pub fn refresh_metrics(&self) {
        if let Some(m) = &self.metrics {
            let (topo, generation) = self.topology.get_with_generation();
            for n in topo.links.iter() {
                m.node_up
                    .with_label_values(&[n.addr()])
                    .set(i64::from(n.is_alive()));
            }
            m.set_balancedness(&self.balance.balancedness(Instant::now(), generation));
        }
    }

    /// Connects to every node and has each load its share of the placement.
    pub async fn connect_static(
        addrs: &[String],
        placement: &Placement,
        tls: Option<&Tls>,
        keepalive: Keepalive,
    ) -> Result<Vec<NodeLink>, RemoteError> {
        let links = join_all(addrs.iter().map(|a| NodeLink::connect(a, tls, keepalive)))
            .await
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        let loads = links
            .iter()
            .enumerate()
            .map(|(i, link)| async move { link.load(&placement.experts_of(i)).await });
        join_all(loads)
            .await
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        Ok(links)
    }

    /// The nodes of the current topology.
    pub fn nodes(&self) -> Vec<Arc<NodeLink>> {
        self.topology.get().links.clone()
    }

    /// Accumulated dispatch timings since the last call (reset on read).
    pub fn take_stats(&self) -> DispatchStats {
        self.stats
            .lock()
            .map(|mut s| std::mem::take(&mut *s))
            .unwrap_or_default()
    }

    /// One layer's work. When nodes fail (stream gone, deadline passed, an error answer),
    /// the layer is planned again without them and sent again at once, so a token whose
    /// expert has a replica elsewhere still gets its answer in this step. When some
    /// expert has no usable holder left, cluster mode loads it on a live node and goes
    /// on; static mode fails the layer.
    #[instrument(level = "debug", skip_all, fields(layer))]
    async fn dispatch(
        &self,
        layer: usize,
        x: &[f32],
        routing: &Routing,
    ) -> Result<Vec<f32>, ExpertError> {
        let (mut topo, generation) = self.topology.get_with_generation();
        let mut usable: Vec<bool> = topo.links.iter().map(|l| l.is_alive()).collect();
        let mut failed_addrs: Vec<String> = Vec::new();
        let mut recoveries = 0;
        let mut repairs = 0;
        // Only the first attempt's plan counts for the load balance (not retries).
        let mut balance = Some(generation);
        loop {
            let count = balance.take();
            match self
                .dispatch_once(&topo, layer, x, routing, &usable, count)
                .await
            {
                Ok(out) => return Ok(out),
                Err(DispatchFailure {
                    too_large: true,
                    error,
                    ..
                }) => return Err(error),
                Err(DispatchFailure {
                    failed,
                    not_held,
                    error,
                    ..
                }) if !failed.is_empty() => {
                    warn!(layer, %error, "dispatch failed on {} node(s): retrying", failed.len());
                    repairs += 1;
                    for node in failed {
                        // Static mode: a node that lost experts of its share gets them
                        // back and keeps its work (the leader owns this in cluster mode).
                        if !self.recover && repairs <= 2 && not_held.contains(&node) {
                            let link = &topo.links[node];
                            match link.repair(&topo.placement.experts_of(node)).await {
                                Ok(()) => {
                                    tracing::info!(node = %link.addr(), layer, "reloaded experts the node had lost");
                                    continue;
                                }
                                Err(e) => {
                                    warn!(node = %link.addr(), "reloading lost experts failed: {e}")
                                }
                            }
                        }
                        usable[node] = false;
                        failed_addrs.push(topo.links[node].addr().to_owned());
                    }
                }
                Err(DispatchFailure { error, .. }) if self.recover && recoveries < 3 => {
                    recoveries += 1;
                    topo = self.recover_uncovered(&topo, &usable).await.map_err(|e| {
                        warn!(layer, "cannot recover: {e} (after: {error})");
                        e
                    })?;
                    usable = topo.links.iter().map(|l| l.is_alive()).collect();
                }
                Err(DispatchFailure { error, .. }) => return Err(error),
            }
            // A newer placement may already route around the failure.
            let latest = self.topology.get();
            if !Arc::ptr_eq(&latest, &topo) {
                topo = latest;
                usable = topo
                    .links
                    .iter()
                    .map(|l| l.is_alive() && !failed_addrs.iter().any(|a| a == l.addr()))
                    .collect();
            }
        }
    }

    /// Loads every expert that no usable node holds onto usable nodes (fewest experts
    /// first), with a recovery load (epoch 0), and installs the patched topology.
    async fn recover_uncovered(
        &self,
        topo: &Arc<Topology>,
        usable: &[bool],
    ) -> Result<Arc<Topology>, ExpertError> {
        let p = &topo.placement;
        let missing: Vec<(usize, usize)> = (0..p.num_layers())
            .flat_map(|l| (0..p.num_experts()).map(move |e| (l, e)))
            .filter(|&(l, e)| !p.holders(l, e).iter().any(|&n| usable[n]))
            .collect();
        let mut live: Vec<usize> = (0..topo.links.len()).filter(|&n| usable[n]).collect();
        if live.is_empty() {
            return Err(ExpertError::Unavailable(
                "no live expert node is left to run the experts".into(),
            ));
        }
        live.sort_by_key(|&n| p.experts_of(n).len());
        let mut placement = p.clone();
        let mut pending = missing;
        // Each pass gives every live node an even share of what is still missing; a node
        // that refuses (memory) is dropped and its share tried on the others.
        while !pending.is_empty() {
            if live.is_empty() {
                return Err(ExpertError::Unavailable(format!(
                    "no live node has room for {} experts of a lost node",
                    pending.len()
                )));
            }
            let mut shares: Vec<Vec<(usize, usize)>> = vec![Vec::new(); live.len()];
            for (i, x) in pending.iter().enumerate() {
                shares[i % live.len()].push(*x);
            }
            let loads = live
                .iter()
                .zip(&shares)
                .map(|(&n, share)| async move { (n, share, topo.links[n].load(share).await) });
            let mut still = Vec::new();
            let mut refused = Vec::new();
            for (n, share, result) in join_all(loads).await {
                match result {
                    Ok(()) => {
                        for &(l, e) in share {
                            placement.add_holder(l, e, n);
                        }
                    }
                    Err(e) => {
                        warn!(node = %topo.links[n].addr(), "recovery load refused: {e}");
                        refused.push(n);
                        still.extend_from_slice(share);
                    }
                }
            }
            live.retain(|n| !refused.contains(n));
            pending = still;
        }
        tracing::info!(
            epoch = topo.epoch,
            "experts of lost nodes loaded on live nodes"
        );
        if let Some(m) = &self.metrics {
            m.recoveries.inc();
        }
        let patched = Arc::new(Topology {
            epoch: topo.epoch,
            links: topo.links.clone(),
            placement,
        });
        // A newer placement that arrived meanwhile wins; this layer still uses the patch.
        self.topology.swap_if(topo, Arc::clone(&patched));
        Ok(patched)
    }

    /// One attempt at a layer on `topo`. With `balance` (the topology's generation), the
    /// plan is counted in the load-balance window.
    async fn dispatch_once(
        &self,
        topo: &Topology,
        layer: usize,
        x: &[f32],
        routing: &Routing,
        usable: &[bool],
        balance: Option<u64>,
    ) -> Result<Vec<f32>, DispatchFailure> {
        let h = self.hidden;
        let gray: Vec<bool> = topo.links.iter().map(|l| l.is_gray()).collect();
        let work =
            plan_avoiding(layer, routing, &topo.placement, usable, &gray).map_err(|(l, e)| {
                DispatchFailure {
                    failed: Vec::new(),
                    not_held: Vec::new(),
                    too_large: false,
                    error: ExpertError::Unavailable(format!(
                        "no live node holds expert {e} of layer {l}"
                    )),
                }
            })?;
        let started = Instant::now();
        if let Some(generation) = balance
            && self.metrics.is_some()
        {
            self.balance.record(
                started,
                generation,
                &topo.placement,
                layer,
                work.iter().map(|w| w.assignments.len() as u64),
            );
        }
        let mut bytes_sent = 0u64;
        let calls = work
            .iter()
            .enumerate()
            .filter(|(_, w)| !w.is_empty())
            .map(|(node, w)| {
                let req = self.request(layer, w, x);
                bytes_sent += req.activations.len() as u64;
                if let Some(m) = &self.metrics {
                    m.dispatch_bytes
                        .with_label_values(&[topo.links[node].addr(), "sent"])
                        .inc_by(req.activations.len() as u64);
                }
                let hedge_after = self
                    .hedging
                    .after(topo.links[node].latency_p99(w.tokens.len()));
                async move {
                    let share = Share {
                        layer,
                        node,
                        work: w,
                        usable,
                    };
                    let (served, took) = self.serve_share(topo, share, req, hedge_after, x).await;
                    (node, served, took)
                }
            });
        let answers = join_all(calls).await;
        let mut out = vec![0.0f32; routing.tokens() * h];
        let mut max_compute = 0;
        let mut failed = Vec::new();
        let mut not_held = Vec::new();
        let mut too_large = false;
        let mut first_error = None;
        // (node, answer time outside compute) of every node that answered itself.
        let mut wire = Vec::new();
        for (node, served, elapsed) in answers {
            let link = &topo.links[node];
            let answer = match served {
                Served::Primary(answer) => answer,
                Served::Hedged(parts) => {
                    for (tokens, y) in parts {
                        add_rows(&mut out, h, &tokens, &y);
                    }
                    continue;
                }
            };
            if let Some(m) = &self.metrics {
                m.dispatch_seconds
                    .with_label_values(&[link.addr()])
                    .observe(elapsed.as_secs_f64());
                m.dispatch_bytes
                    .with_label_values(&[link.addr(), "received"])
                    .inc_by(bytes_len_of(&answer));
            }
            let code = answer.as_ref().map_or(0, |r| r.error_code);
            if code == tonic::Code::NotFound as i32 {
                not_held.push(node);
            }
            too_large |= code == tonic::Code::ResourceExhausted as i32;
            let decoded = answer.and_then(|resp| self.decode(link, resp, work[node].tokens.len()));
            if decoded.is_ok() {
                link.record_latency(work[node].tokens.len(), elapsed);
            }
            let (y, compute_micros) = match decoded {
                Ok(v) => v,
                Err(e) => {
                    failed.push(node);
                    first_error.get_or_insert(e);
                    continue;
                }
            };
            add_rows(&mut out, h, &work[node].tokens, &y);
            max_compute = max_compute.max(compute_micros);
            wire.push((
                node,
                elapsed.saturating_sub(Duration::from_micros(compute_micros)),
            ));
            if let Some(m) = &self.metrics {
                m.node_compute
                    .with_label_values(&[link.addr()])
                    .inc_by(compute_micros);
            }
        }
        let outliers = wire_outliers(&wire);
        for (node, _) in wire {
            let link = &topo.links[node];
            if link.note_wire_outlier(outliers.contains(&node))
                && let Some(m) = &self.metrics
            {
                m.slow_links.with_label_values(&[link.addr()]).inc();
            }
        }
        if let Some(e) = first_error {
            return Err(DispatchFailure {
                failed,
                not_held,
                too_large,
                error: ExpertError::Unavailable(e),
            });
        }
        if let Ok(mut s) = self.stats.lock() {
            s.layers += 1;
            s.round_trip_micros += started.elapsed().as_micros() as u64;
            s.max_compute_micros += max_compute;
            s.bytes_sent += bytes_sent;
        }
        Ok(out)
    }
}

/// Adds a node's answer rows (one per entry of `tokens`) into the layer's output.
fn add_rows(out: &mut [f32], h: usize, tokens: &[u32], y: &[f32]) {
    for (row, &t) in y.chunks_exact(h).zip(tokens) {
        let t = t as usize;
        for (o, v) in out[t * h..(t + 1) * h].iter_mut().zip(row) {
            *o += v;
        }
    }
}

/// One node's part of a layer, as planned.
struct Share<'a> {
    layer: usize,
    node: usize,
    work: &'a NodeWork,
    /// Nodes a hedge may use.
    usable: &'a [bool],
}

/// How a node's share of a layer was answered.
enum Served {
    /// By the node itself (or its failure).
    Primary(Result<ForwardResponse, String>),
    /// By replicas, after the node was late: (batch rows, their answer rows) per replica.
    Hedged(Vec<(Vec<u32>, Vec<f32>)>),
}

impl RemoteExperts {
    /// The Forward request carrying `w`'s rows of `x`.
    fn request(&self, layer: usize, w: &NodeWork, x: &[f32]) -> ForwardRequest {
        let h = self.hidden;
        let mut rows = Vec::with_capacity(w.tokens.len() * h);
        for &t in &w.tokens {
            rows.extend_from_slice(&x[t as usize * h..(t as usize + 1) * h]);
        }
        ForwardRequest {
            id: 0,
            layer: layer as u32,
            num_tokens: w.tokens.len() as u32,
            dtype: self.wire.to_proto() as i32,
            activations: encode_activations(&rows, self.wire),
            token: w.assignments.iter().map(|a| a.token).collect(),
            expert: w.assignments.iter().map(|a| a.expert).collect(),
            weight: w.assignments.iter().map(|a| a.weight).collect(),
        }
    }

    /// A node's answer for `rows` tokens, checked and decoded, with its compute time.
    fn decode(
        &self,
        link: &NodeLink,
        resp: ForwardResponse,
        rows: usize,
    ) -> Result<(Vec<f32>, u64), String> {
        if resp.error_code != 0 {
            return Err(format!(
                "node {} answered error {}: {}",
                link.addr, resp.error_code, resp.error
            ));
        }
        let format =
            WireFormat::from_proto(resp.dtype).map_err(|e| format!("node {}: {e}", link.addr))?;
        let y = decode_activations(&resp.output, format, rows, self.hidden)
            .map_err(|e| format!("node {}: {e}", link.addr))?;
        Ok((y, resp.compute_micros))
    }

    /// One node's share of a layer: the node's own answer (or failure), or, when it is
    /// later than `hedge_after`, whichever comes first of it and the replicas' answers to
    /// the same work. Also returns how long the node's answer took.
    async fn serve_share(
        &self,
        topo: &Topology,
        share: Share<'_>,
        req: ForwardRequest,
        hedge_after: Option<Duration>,
        x: &[f32],
    ) -> (Served, Duration) {
        let link = &topo.links[share.node];
        let t = Instant::now();
        let primary = link.call(req, self.timeout);
        let Some(after) = hedge_after else {
            return (Served::Primary(primary.await), t.elapsed());
        };
        tokio::pin!(primary);
        tokio::select! {
            answer = &mut primary => return (Served::Primary(answer), t.elapsed()),
            () = tokio::time::sleep(after) => {}
        }
        // Planned only now: most layers never get here.
        let Some(alt) = replan_away(
            share.layer,
            share.work,
            share.node,
            &topo.placement,
            share.usable,
        ) else {
            return (Served::Primary(primary.await), t.elapsed());
        };
        if let Some(m) = &self.metrics {
            m.hedges.with_label_values(&[link.addr()]).inc();
        }
        let hedged = self.send_all(topo, share.layer, &alt, x);
        tokio::pin!(hedged);
        tokio::select! {
            answer = &mut primary => (Served::Primary(answer), t.elapsed()),
            parts = &mut hedged => match parts {
                Ok(parts) => {
                    if let Some(m) = &self.metrics {
                        m.hedge_wins.with_label_values(&[link.addr()]).inc();
                    }
                    link.mark_gray();
                    // The node's late answer, if any, finds no waiter and is dropped by
                    // its request id.
                    (Served::Hedged(parts), t.elapsed())
                }
                Err(_) => (Served::Primary(primary.await), t.elapsed()),
            },
        }
    }

    /// Sends every non-empty share of `works` (a hedge) and collects the answers; any
    /// failure fails the whole hedge (the primary is still running).
    async fn send_all(
        &self,
        topo: &Topology,
        layer: usize,
        works: &[NodeWork],
        x: &[f32],
    ) -> Result<Vec<(Vec<u32>, Vec<f32>)>, String> {
        let calls = works
            .iter()
            .enumerate()
            .filter(|(_, w)| !w.is_empty())
            .map(|(node, w)| {
                let req = self.request(layer, w, x);
                let link = &topo.links[node];
                async move {
                    let resp = link.call(req, self.timeout).await?;
                    let (y, _) = self.decode(link, resp, w.tokens.len())?;
                    Ok((w.tokens.clone(), y))
                }
            });
        join_all(calls).await.into_iter().collect()
    }
}

fn bytes_len_of(answer: &Result<ForwardResponse, String>) -> u64 {
    answer.as_ref().map(|r| r.output.len() as u64).unwrap_or(0)
}

impl Experts for RemoteExperts {
    fn forward(&self, layer: usize, x: &[f32], routing: &Routing) -> Result<Vec<f32>, ExpertError> {
        // Called from the scheduler's own thread, never from a runtime worker.
        self.runtime.block_on(self.dispatch(layer, x, routing))
    }
}
