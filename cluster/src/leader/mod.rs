//! The elected coordinator: computes placements, has the nodes load them, publishes them.
//!
//! Election is a compare-and-swap on the leader key, which lives on the candidate's
//! lease: whoever creates it leads until its lease ends. Every publication is a
//! transaction that checks the leader key is still ours (same value, same lease) and
//! that the placement is the one we planned from, so a deposed leader cannot overwrite a
//! newer placement; the nodes refuse unloads from older epochs, so it cannot undo one
//! either (etcd locks alone are not safe as mutual exclusion: the epoch is the fence).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};
use futures::future::{BoxFuture, join_all};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::etcd::{ClusterConfig, ClusterError, Snapshot};
use crate::planner::{Candidate, PlanError, PlanInput, plan};
use crate::rebalance::RebalancePolicy;

mod moves;
mod rejoins;
mod unreachable;
use crate::records::{LeaderRecord, MAX_EPOCH, PlacementRecord};
use crate::session::Session;
use crate::watch::View;
use moves::Move;
use rejoins::Rejoins;
use unreachable::unreachable_nodes;

/// How the leader reaches expert nodes (gRPC lives in the coordinator).
pub trait NodeControl: Send + Sync {
    /// Loads `experts` on the node at `addr` (idempotent); returns when they are usable.
    fn load(
        &self,
        addr: &str,
        experts: Vec<(usize, usize)>,
        epoch: u64,
    ) -> BoxFuture<'static, Result<(), ControlError>>;
    fn unload(
        &self,
        addr: &str,
        experts: Vec<(usize, usize)>,
        epoch: u64,
    ) -> BoxFuture<'static, Result<(), ControlError>>;
}

/// Why a node did not do what the leader asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// The node lacks the memory for it now. During a rebalance this is usually the
    /// previous step's unloads not having run yet: worth asking again, not a failure.
    #[error("{0}")]
    NoRoom(String),
    #[error("{0}")]
    Failed(String),
}

/// Why the last load the leader asked for failed.
#[derive(Debug, Clone)]
struct LoadFailure {
    why: String,
    /// Every refusal was for lack of memory.
    no_room: bool,
}

#[derive(Debug, Clone)]
pub struct LeaderConfig {
    /// This coordinator's id.
    pub id: String,
    pub num_layers: usize,
    pub num_experts: usize,
    /// Copies of every expert where memory allows.
    pub min_replicas: usize,
    /// How often placement is reconsidered (and sooner on any cluster change).
    pub tick: Duration,
    /// How often the load figures that order replicas when memory is short are
    /// refreshed: load moves all the time, placements should not.
    pub load_interval: Duration,
    /// When to rebalance by load without being asked (`ctl rebalance` asks).
    pub rebalance: RebalancePolicy,
    /// Wait after a publication before unloading what moved, so coordinators still on
    /// the previous placement finish their in-flight layers.
    pub unload_grace: Duration,
}

/// Campaigns forever; while elected, keeps the published placement right. Runs until
/// the view's sender is dropped.
pub async fn run(
    cfg: ClusterConfig,
    leader: LeaderConfig,
    session: Arc<Session>,
    mut view: watch::Receiver<View>,
    control: Arc<dyn NodeControl>,
) {
    let mut state = LeaderState {
        load: Vec::new(),
        load_at: None,
        failed: HashMap::new(),
        last_error: None,
        was_leader: false,
        published: 0,
        moving: None,
        last_auto: Instant::now(),
        load_error: None,
        rejoins: Rejoins::default(),
        cut_since: HashMap::new(),
        cut_off: Default::default(),
    };
    let mut client: Option<Client> = None;
    loop {
        tokio::select! {
            r = view.changed() => if r.is_err() { return },
            () = tokio::time::sleep(leader.tick) => {}
        }
        let Some(lease) = session.lease() else {
            continue;
        };
        let current = view.borrow().clone();
        if !current.fresh {
            continue;
        }
        if client.is_none() {
            client = cfg.connect().await.ok();
        }
        let Some(c) = client.as_mut() else { continue };
        let cx = Round {
            cfg: &cfg,
            leader: &leader,
            lease,
            snap: &current.snapshot,
            control: &*control,
        };
        match round(&cx, c, &mut state).await {
            Ok(()) => {}
            Err(e) => {
                debug!("leader round failed: {e}");
                client = None;
            }
        }
    }
}

struct LeaderState {
    load: Vec<u64>,
    load_at: Option<Instant>,
    /// Nodes whose last load failed, left out of placements for a while.
    failed: HashMap<String, Instant>,
    last_error: Option<String>,
    was_leader: bool,
    /// The highest epoch this coordinator has published.
    published: u64,
    /// A rebalance under way.
    moving: Option<Move>,
    /// When the automatic rebalance last looked at the load.
    last_auto: Instant,
    /// Why the last load a node was asked for failed.
    load_error: Option<LoadFailure>,
    /// Nodes back soon after losing their lease, held out of new placements a while.
    rejoins: Rejoins,
    /// Registered nodes no coordinator reaches, and since when.
    cut_since: HashMap<String, Instant>,
    /// Those cut off for [`CUT_OFF_AFTER`], left out of placements.
    cut_off: BTreeSet<String>,
}

/// The epoch of the next publication: above the published record's, above any epoch a
/// node has accepted and above our own last one. The placement key alone is not enough:
/// deleted, restored from an old backup, or garbage, it would send the epoch backwards,
/// and the nodes (rightly) refuse older epochs. `None` past [`MAX_EPOCH`].
fn next_epoch(snap: &Snapshot, published: u64) -> Option<u64> {
    let highest = snap
        .nodes
        .values()
        .map(|n| n.epoch)
        .chain(snap.placement.as_ref().map(|p| p.epoch))
        .fold(published, u64::max);
    highest.checked_add(1).filter(|&e| e <= MAX_EPOCH)
}

/// How long every coordinator must report a registered node unreachable before its
/// copies are placed elsewhere: longer than a load report's period (2 s), so a node
/// placed a moment ago, not connected yet, is not taken for a cut one.
const CUT_OFF_AFTER: Duration = Duration::from_secs(3);

/// Leaving a node out after a failed load: long enough not to retry it every tick,
/// short enough that a node that was merely slow comes back soon.
const FAILED_NODE_PAUSE: Duration = Duration::from_secs(5);

/// What one round of the leader works with (the etcd client and the leader's state
/// travel beside it: they are borrowed mutably).
struct Round<'a> {
    cfg: &'a ClusterConfig,
    leader: &'a LeaderConfig,
    lease: i64,
    snap: &'a Snapshot,
    control: &'a dyn NodeControl,
}

async fn round(
    cx: &Round<'_>,
    client: &mut Client,
    st: &mut LeaderState,
) -> Result<(), ClusterError> {
    let Round {
        cfg,
        leader,
        lease,
        snap,
        ..
    } = *cx;
    st.rejoins
        .observe(snap.nodes.keys().map(String::as_str), Instant::now());
    if !campaign(cfg, client, &leader.id, lease).await? {
        if st.was_leader {
            info!(id = %leader.id, "no longer the placement leader");
            st.was_leader = false;
            // A move is the leader's: whoever leads next plans its own.
            st.moving = None;
        }
        return Ok(());
    }
    if !st.was_leader {
        info!(id = %leader.id, "elected placement leader");
        st.was_leader = true;
    }
    let experts = leader.num_layers * leader.num_experts;
    if st
        .load_at
        .is_none_or(|t| t.elapsed() >= leader.load_interval)
    {
        st.load = snap.total_load(experts);
        st.load_at = Some(Instant::now());
    }
    let candidates = candidates(snap, leader, st);
    let Some(epoch) = next_epoch(snap, st.published) else {
        let text = format!("placement epochs are exhausted (above {MAX_EPOCH}): reset the cluster");
        if st.last_error.as_deref() != Some(&text) {
            warn!("{text}");
            st.last_error = Some(text);
        }
        return Ok(());
    };
    // A record for another shape (another model's leader, a hand-written value) is not
    // a starting point: it is overwritten.
    let current = snap
        .placement
        .as_ref()
        .filter(|p| p.fits(leader.num_layers, leader.num_experts).is_ok());
    if let Some(cur) = current {
        let mut members: Vec<String> = candidates.iter().map(|c| c.id.clone()).collect();
        members.sort();
        if st.moving.is_none() {
            moves::start(cx, client, st, &candidates, &members, cur).await?;
        }
        if st.moving.is_some() && !moves::step(cx, client, st, &members, cur, epoch).await? {
            return Ok(());
        }
    }
    let input = PlanInput {
        num_layers: leader.num_layers,
        num_experts: leader.num_experts,
        nodes: &candidates,
        current,
        load: &st.load,
        min_replicas: leader.min_replicas,
    };
    let desired = match plan(&input, epoch) {
        Ok(p) => p,
        Err(e) => {
            // Keep the last placement: coordinators serve what they can and answer 503
            // for the rest; say it once, not every tick.
            let text = e.to_string();
            if st.last_error.as_deref() != Some(&text) {
                match e {
                    PlanError::NoNodes if snap.placement.is_none() => {
                        info!("waiting for expert nodes to register")
                    }
                    _ => warn!("cannot place every expert: {text}"),
                }
                st.last_error = Some(text);
            }
            return Ok(());
        }
    };
    st.last_error = None;
    if current.is_some_and(|p| p.same_assignment(&desired)) {
        return Ok(());
    }

    if apply(cx, client, st, &desired, true).await? {
        info!(
            epoch,
            nodes = desired.nodes.len(),
            copies = desired.holders.iter().map(Vec::len).sum::<usize>(),
            "placement published"
        );
    }
    Ok(())
}

/// The nodes a placement may use now: registered for this model, not draining, not
/// left out after a failed load, not held back after a flap (unless already placed), and
/// not cut off from every coordinator for [`CUT_OFF_AFTER`].
fn candidates(snap: &Snapshot, leader: &LeaderConfig, st: &mut LeaderState) -> Vec<Candidate> {
    st.failed.retain(|_, t| t.elapsed() < FAILED_NODE_PAUSE);
    // A held node keeps what the placement already gives it; it gets nothing new.
    let placed = |id: &str| snap.placement.as_ref().is_some_and(|p| p.contains_node(id));
    // Only a node cut off for a while: a node placed a moment ago is not connected yet.
    let cut_now = unreachable_nodes(snap);
    st.cut_since.retain(|id, _| cut_now.contains(id));
    for id in cut_now {
        st.cut_since.entry(id).or_insert_with(Instant::now);
    }
    let cut_off: BTreeSet<String> = st
        .cut_since
        .iter()
        .filter(|(_, since)| since.elapsed() >= CUT_OFF_AFTER)
        .map(|(id, _)| id.clone())
        .collect();
    if cut_off != st.cut_off {
        if !cut_off.is_empty() {
            warn!(
                nodes = ?cut_off,
                "no coordinator reaches these nodes: placing their copies elsewhere"
            );
        }
        st.cut_off = cut_off;
    }
    snap.nodes
        .values()
        .filter(|n| n.num_layers == leader.num_layers && n.num_experts == leader.num_experts)
        .filter(|n| !snap.drains.contains(&n.id) && !st.failed.contains_key(&n.id))
        .filter(|n| !st.rejoins.held(&n.id) || placed(&n.id))
        .filter(|n| !st.cut_off.contains(&n.id))
        .map(|n| Candidate {
            id: n.id.clone(),
            addr: n.addr.clone(),
            capacity: n.capacity,
        })
        .collect()
}

/// Has every node load its share of `desired` (idempotent: it reads only what it
/// lacks) before anyone is told to use it, publishes it, and unloads what moved after
/// the grace period. False when it was not published. A node that fails to load is
/// left out of placements for a while when `mark_failed`.
async fn apply(
    cx: &Round<'_>,
    client: &mut Client,
    st: &mut LeaderState,
    desired: &PlacementRecord,
    mark_failed: bool,
) -> Result<bool, ClusterError> {
    let Round {
        cfg,
        leader,
        lease,
        snap,
        control,
    } = *cx;
    let epoch = desired.epoch;
    make_room(snap, desired, control).await;
    let loads = desired.nodes.iter().map(|n| {
        let fut = control.load(&n.addr, desired.experts_of(&n.id), epoch);
        let id = n.id.clone();
        async move { (id, fut.await) }
    });
    let mut failure: Option<LoadFailure> = None;
    for (id, result) in join_all(loads).await {
        if let Err(e) = result {
            warn!(node = %id, epoch, "node failed to load its share: {e}");
            let no_room = matches!(e, ControlError::NoRoom(_));
            let f = failure.get_or_insert(LoadFailure {
                why: format!("{id} could not load its share: {e}"),
                no_room,
            });
            f.no_room &= no_room;
            if mark_failed {
                st.failed.insert(id, Instant::now());
            }
        }
    }
    if let Some(f) = failure {
        st.load_error = Some(f);
        return Ok(false);
    }
    if !publish(
        cfg,
        client,
        &leader.id,
        lease,
        snap.placement_revision,
        desired,
    )
    .await?
    {
        debug!(
            epoch,
            "placement changed under us or leadership lost: not published"
        );
        return Ok(false);
    }
    st.published = st.published.max(epoch);
    schedule_unloads(snap, desired, leader.unload_grace, control);
    Ok(true)
}

/// Takes the leader key if it is free; true when it is ours.
async fn campaign(
    cfg: &ClusterConfig,
    client: &mut Client,
    id: &str,
    lease: i64,
) -> Result<bool, ClusterError> {
    let key = cfg.keys.leader();
    let value = serde_json::to_string(&LeaderRecord { id: id.to_owned() })
        .map_err(|e| ClusterError::Config(e.to_string()))?;
    let txn = Txn::new()
        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(
            key.clone(),
            value.clone(),
            Some(PutOptions::new().with_lease(lease)),
        )]);
    client.txn(txn).await.map_err(|e| cfg.error(e))?;
    let resp = client.get(key, None).await.map_err(|e| cfg.error(e))?;
    Ok(resp
        .kvs()
        .first()
        .is_some_and(|kv| kv.value() == value.as_bytes() && kv.lease() == lease))
}

/// Writes `placement` if we still lead and nobody wrote a placement since `seen_revision`.
async fn publish(
    cfg: &ClusterConfig,
    client: &mut Client,
    id: &str,
    lease: i64,
    seen_revision: i64,
    placement: &PlacementRecord,
) -> Result<bool, ClusterError> {
    let leader = serde_json::to_string(&LeaderRecord { id: id.to_owned() })
        .map_err(|e| ClusterError::Config(e.to_string()))?;
    let body = serde_json::to_string(placement).map_err(|e| ClusterError::Config(e.to_string()))?;
    let txn = Txn::new()
        .when([
            Compare::value(cfg.keys.leader(), CompareOp::Equal, leader),
            Compare::lease(cfg.keys.leader(), CompareOp::Equal, lease),
            Compare::mod_revision(cfg.keys.placement(), CompareOp::Equal, seen_revision),
        ])
        .and_then([TxnOp::put(cfg.keys.placement(), body, None)]);
    Ok(client.txn(txn).await.map_err(|e| cfg.error(e))?.succeeded())
}

/// Before loading `desired`: a node whose memory budget cannot take its new share on top
/// of what it holds first drops what neither `desired` nor the published placement gives
/// it. Those are copies a rebalance moved away whose delayed unload has not run yet, or
/// that a newer epoch made stale on the node, and copies loaded for a placement that was
/// never published (a load elsewhere failed). Without this a node death inside the grace
/// period finds the survivors full, and every replacement placement fails to load.
/// What the published placement uses stays: coordinators are serving from it.
async fn make_room(snap: &Snapshot, desired: &PlacementRecord, control: &dyn NodeControl) {
    let published = snap.placement.as_ref();
    let frees = desired.nodes.iter().filter_map(|n| {
        let rec = snap.nodes.get(&n.id)?;
        let want = desired.experts_of(&n.id);
        let missing = want.iter().filter(|x| !rec.held.contains(x)).count();
        if rec.held.len() + missing <= rec.capacity {
            return None;
        }
        let serving = published.map_or_else(Vec::new, |p| p.experts_of(&n.id));
        let extra: Vec<(usize, usize)> = rec
            .held
            .iter()
            .copied()
            .filter(|x| !want.contains(x) && !serving.contains(x))
            .collect();
        if extra.is_empty() {
            return None;
        }
        let (id, count) = (n.id.clone(), extra.len());
        let fut = control.unload(&n.addr, extra, desired.epoch);
        Some(async move {
            match fut.await {
                Ok(()) => {
                    debug!(node = %id, count, "dropped copies no placement uses to make room")
                }
                Err(e) => warn!(node = %id, "could not drop copies no placement uses: {e}"),
            }
        })
    });
    join_all(frees).await;
}

/// After the grace period, has every live node drop what the new placement does not
/// give it (with the new epoch, so a newer leader's placement is safe from it).
fn schedule_unloads(
    snap: &Snapshot,
    placement: &PlacementRecord,
    grace: Duration,
    control: &dyn NodeControl,
) {
    let work: Vec<_> = snap
        .nodes
        .values()
        .filter_map(|n| {
            let keep = placement.experts_of(&n.id);
            let extra: Vec<(usize, usize)> = n
                .held
                .iter()
                .copied()
                .filter(|x| !keep.contains(x))
                .collect();
            (!extra.is_empty()).then(|| {
                (
                    n.id.clone(),
                    control.unload(&n.addr, extra, placement.epoch),
                )
            })
        })
        .collect();
    if work.is_empty() {
        return;
    }
    let epoch = placement.epoch;
    tokio::spawn(async move {
        tokio::time::sleep(grace).await;
        for (id, fut) in work {
            if let Err(e) = fut.await {
                debug!(node = %id, epoch, "unload after rebalance failed: {e}");
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{NodeRecord, PlacedNode};

    pub(super) fn node(id: &str, epoch: u64) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            addr: format!("{id}:1"),
            device: "cpu".into(),
            num_layers: 1,
            num_experts: 1,
            capacity: 1,
            bytes_per_expert: 1,
            held: vec![(0, 0)],
            version: "test".into(),
            epoch,
            weights: "f32".into(),
        }
    }

    fn placement(epoch: u64) -> PlacementRecord {
        PlacementRecord {
            epoch,
            num_layers: 1,
            num_experts: 1,
            nodes: vec![PlacedNode {
                id: "a".into(),
                addr: "a:1".into(),
            }],
            holders: vec![vec![0]],
        }
    }

    #[test]
    fn the_next_epoch_is_above_everything_any_node_or_record_has_seen() {
        let mut snap = Snapshot::default();
        assert_eq!(next_epoch(&snap, 0), Some(1));
        snap.placement = Some(placement(4));
        assert_eq!(next_epoch(&snap, 0), Some(5));
        // The key is lost (or garbage): the nodes still remember epoch 4.
        snap.placement = None;
        snap.nodes.insert("a".into(), node("a", 4));
        snap.nodes.insert("b".into(), node("b", 2));
        assert_eq!(next_epoch(&snap, 0), Some(5));
        // A backup restored from epoch 2 while the nodes are at 4.
        snap.placement = Some(placement(2));
        assert_eq!(next_epoch(&snap, 0), Some(5));
        // What this leader published itself, before the nodes' records caught up.
        assert_eq!(next_epoch(&snap, 7), Some(8));
        snap.nodes.insert("c".into(), node("c", MAX_EPOCH));
        assert_eq!(next_epoch(&snap, 0), None);
    }

    /// One unload call: address, experts, epoch.
    type Unload = (String, Vec<(usize, usize)>, u64);

    /// Records unload calls; loads are never made by `make_room`.
    #[derive(Default)]
    struct Recorder(std::sync::Mutex<Vec<Unload>>);

    impl NodeControl for Recorder {
        fn load(
            &self,
            _: &str,
            _: Vec<(usize, usize)>,
            _: u64,
        ) -> BoxFuture<'static, Result<(), ControlError>> {
            Box::pin(async { Err(ControlError::Failed("make_room must not load".into())) })
        }
        fn unload(
            &self,
            addr: &str,
            experts: Vec<(usize, usize)>,
            epoch: u64,
        ) -> BoxFuture<'static, Result<(), ControlError>> {
            self.0
                .lock()
                .unwrap()
                .push((addr.to_string(), experts, epoch));
            Box::pin(async { Ok(()) })
        }
    }

    /// One layer of 4 experts on nodes a and b; `holders[e]` lists node indices.
    fn four(epoch: u64, holders: [&[u32]; 4]) -> PlacementRecord {
        PlacementRecord {
            epoch,
            num_layers: 1,
            num_experts: 4,
            nodes: ["a", "b"]
                .iter()
                .map(|id| PlacedNode {
                    id: (*id).into(),
                    addr: format!("{id}:1"),
                })
                .collect(),
            holders: holders.iter().map(|h| h.to_vec()).collect(),
        }
    }

    #[tokio::test]
    async fn a_full_node_drops_only_what_no_placement_uses_before_loading() {
        // Published: a serves experts 0 and 1, b serves 2 and 3.
        let mut snap = Snapshot {
            placement: Some(four(5, [&[0], &[0], &[1], &[1]])),
            ..Snapshot::default()
        };
        // a holds 0, 1 and a stale copy of 3 (a rebalance moved it; its unload has not run):
        // full at capacity 3. b holds 2 and 3 with room to spare.
        let mut a = node("a", 5);
        a.num_experts = 4;
        a.capacity = 3;
        a.held = vec![(0, 0), (0, 1), (0, 3)];
        let mut b = node("b", 5);
        b.num_experts = 4;
        b.capacity = 4;
        b.held = vec![(0, 2), (0, 3)];
        snap.nodes.insert("a".into(), a);
        snap.nodes.insert("b".into(), b);
        // Desired: a also takes expert 2 (b's only copy is to be doubled).
        let desired = four(6, [&[0], &[0], &[0, 1], &[1]]);
        let control = Recorder::default();
        make_room(&snap, &desired, &control).await;
        let calls = control.0.lock().unwrap().clone();
        // a drops the stale copy of 3 (neither placement gives it to a), at the new epoch;
        // never 0 or 1, which the published placement serves from. b is not full.
        assert_eq!(calls, vec![("a:1".to_string(), vec![(0, 3)], 6)]);

        // With room for the new share, nothing is dropped, stale or not.
        snap.nodes.get_mut("a").unwrap().capacity = 4;
        let control = Recorder::default();
        make_room(&snap, &desired, &control).await;
        assert!(control.0.lock().unwrap().is_empty());
    }
}
