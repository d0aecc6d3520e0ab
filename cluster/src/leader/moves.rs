//! The leader's side of a rebalance: when to plan one (an operator's request, or the
//! automatic interval), and publishing its steps ([`next_step`]) until it arrives.

use std::time::{Duration, Instant};

use etcd_client::Client;
use tokio::runtime::RuntimeFlavor;
use tracing::{debug, info, warn};

use super::{LeaderState, Round, apply};
use crate::etcd::{ClusterConfig, ClusterError};
use crate::planner::{Candidate, PlanInput, mean_balancedness, plan_by_load};
use crate::rebalance::{RebalanceState, RebalanceStatus, next_step, plannable, settled};
use crate::records::PlacementRecord;

/// A placement by load being reached step by step ([`next_step`]).
pub(super) struct Move {
    target: PlacementRecord,
    /// The live nodes it was planned for: a change ends the move.
    members: Vec<String>,
    status: RebalanceStatus,
    /// When the last step was published; the next waits for its unloads.
    stepped_at: Option<Instant>,
    /// Since when, and when last, a node refused the next step for lack of memory.
    refused: Option<(Instant, Instant)>,
}

impl Move {
    /// Notes a refusal for lack of memory; true while the step is worth asking for again.
    ///
    /// Node records lag: a step may be planned before they show the previous step's
    /// unloads, and a node still holding those copies refuses what would overfill it.
    /// Once they run it has room, so the move waits for that instead of stopping.
    fn wait_for_room(&mut self, now: Instant) -> bool {
        let (since, last) = self.refused.get_or_insert((now, now));
        *last = now;
        now.duration_since(*since) < ROOM_WAIT
    }

    /// Whether the last refusal was too recent to ask again.
    fn refused_lately(&self, now: Instant) -> bool {
        self.refused
            .is_some_and(|(_, last)| now.duration_since(last) < ROOM_RETRY)
    }
}

/// How long a step waits for the previous one's unloads to show in the node records
/// before it plans with what they say.
const SETTLE_WAIT: Duration = Duration::from_secs(10);

/// How long a step refused for lack of memory keeps being asked for, and how often.
const ROOM_WAIT: Duration = Duration::from_secs(30);
const ROOM_RETRY: Duration = Duration::from_secs(1);

/// Plans a placement by load when an operator asked (a `rebalance` request not yet
/// answered) or the automatic interval is up, and starts moving to it if the policy
/// adopts it.
pub(super) async fn start(
    cx: &Round<'_>,
    client: &mut Client,
    st: &mut LeaderState,
    candidates: &[Candidate],
    members: &[String],
    current: &PlacementRecord,
) -> Result<(), ClusterError> {
    let Round {
        cfg, leader, snap, ..
    } = *cx;
    let answered = |id: &str| snap.rebalance_status.as_ref().is_some_and(|s| s.id == id);
    let asked = snap
        .rebalance_request
        .as_ref()
        .filter(|r| !answered(&r.id))
        .map(|r| r.id.clone());
    let auto = leader
        .rebalance
        .interval
        .is_some_and(|i| st.last_auto.elapsed() >= i);
    if asked.is_none() && !auto {
        return Ok(());
    }
    if auto {
        st.last_auto = Instant::now();
    }
    let load = snap.total_load(leader.num_layers * leader.num_experts);
    // Planned within less than the nodes' memory, so that moves have room.
    let roomy: Vec<Candidate> = candidates
        .iter()
        .map(|c| Candidate {
            capacity: plannable(c.capacity),
            ..c.clone()
        })
        .collect();
    let input = PlanInput {
        num_layers: leader.num_layers,
        num_experts: leader.num_experts,
        nodes: &roomy,
        current: Some(current),
        load: &load,
        min_replicas: leader.min_replicas,
    };
    // Seconds of work at DeepSeek-V3's size (61 layers of 256 experts): off the
    // runtime's worker, which also serves requests, where the runtime allows it.
    let planned = match tokio::runtime::Handle::current().runtime_flavor() {
        RuntimeFlavor::CurrentThread => plan_by_load(&input, 0),
        _ => tokio::task::block_in_place(|| plan_by_load(&input, 0)),
    }
    .ok()
    .flatten();
    let before = mean_balancedness(current, &load);
    let after = planned.as_ref().and_then(|p| mean_balancedness(p, &load));
    let adopted = planned.filter(|_| leader.rebalance.adopt(before, after, asked.is_some()));
    let mut status = RebalanceStatus {
        id: asked.clone().unwrap_or_else(|| "auto".into()),
        state: RebalanceState::Unchanged,
        before,
        after,
        epoch: current.epoch,
        detail: String::new(),
    };
    match adopted {
        Some(target) => {
            info!(
                ?before,
                ?after,
                asked = asked.is_some(),
                "rebalancing by load"
            );
            status.state = RebalanceState::Moving;
            st.moving = Some(Move {
                target,
                members: members.to_vec(),
                status: status.clone(),
                stepped_at: None,
                refused: None,
            });
        }
        None => {
            status.detail = if load.iter().all(|&t| t == 0) {
                "no routed tokens reported yet".into()
            } else if after.is_none() {
                "the nodes' memory cannot hold every layer's experts with room to move".into()
            } else {
                "the plan by load is not better enough than the current placement".into()
            };
            debug!(?before, ?after, "{}", status.detail);
        }
    }
    if asked.is_some() {
        write_status(cfg, client, &status).await?;
    }
    Ok(())
}

/// Publishes the next step of the move under way. True when the move has ended (the
/// usual planning goes on), false while it continues.
pub(super) async fn step(
    cx: &Round<'_>,
    client: &mut Client,
    st: &mut LeaderState,
    members: &[String],
    current: &PlacementRecord,
    epoch: u64,
) -> Result<bool, ClusterError> {
    let Round { cfg, snap, .. } = *cx;
    let Some(mut m) = st.moving.take() else {
        return Ok(true);
    };
    let finish = |mut m: Move, state: RebalanceState, detail: &str| {
        m.status.state = state;
        m.status.detail = detail.to_owned();
        m.status
    };
    if m.members != members {
        let status = finish(m, RebalanceState::Stopped, "a node joined or left");
        warn!("rebalance stopped: a node joined or left");
        write_status(cfg, client, &status).await?;
        return Ok(true);
    }
    // The view lags our own writes: plan the next step only from the last one as
    // published, with the nodes' records showing its unloads.
    let behind = current.epoch < st.published || !settled(current, &snap.nodes);
    let unsettled = m.stepped_at.is_some_and(|t| t.elapsed() < SETTLE_WAIT) && behind;
    if unsettled || m.refused_lately(Instant::now()) {
        st.moving = Some(m);
        return Ok(false);
    }
    let next = next_step(current, &m.target, &snap.nodes, epoch);
    if next.same_assignment(current) {
        let (state, detail) = if current.same_assignment(&m.target) {
            (RebalanceState::Done, "")
        } else {
            (RebalanceState::Stopped, "no free memory to move into")
        };
        let status = finish(m, state, detail);
        info!(state = ?status.state, epoch = current.epoch, "rebalance ended");
        write_status(cfg, client, &status).await?;
        return Ok(false);
    }
    st.load_error = None;
    if !apply(cx, client, st, &next, false).await? {
        let Some(failure) = st.load_error.take() else {
            // Someone wrote the placement since our snapshot (or we lost the lead):
            // the next round sees why.
            st.moving = Some(m);
            return Ok(false);
        };
        if failure.no_room && m.wait_for_room(Instant::now()) {
            debug!(
                "{}: asking again once the last step's unloads have run",
                failure.why
            );
            st.moving = Some(m);
            return Ok(false);
        }
        let status = finish(m, RebalanceState::Stopped, &failure.why);
        write_status(cfg, client, &status).await?;
        return Ok(true);
    }
    info!(
        epoch,
        arrived = next.same_assignment(&m.target),
        "rebalance step published"
    );
    m.status.epoch = epoch;
    m.stepped_at = Some(Instant::now());
    m.refused = None;
    if next.same_assignment(&m.target) {
        let status = finish(m, RebalanceState::Done, "");
        write_status(cfg, client, &status).await?;
    } else {
        write_status(cfg, client, &m.status).await?;
        st.moving = Some(m);
    }
    Ok(false)
}

async fn write_status(
    cfg: &ClusterConfig,
    client: &mut Client,
    status: &RebalanceStatus,
) -> Result<(), ClusterError> {
    let body = serde_json::to_string(status).map_err(|e| ClusterError::Config(e.to_string()))?;
    client
        .put(cfg.keys.rebalance_status(), body, None)
        .await
        .map_err(|e| cfg.error(e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a_move() -> Move {
        Move {
            target: PlacementRecord {
                epoch: 1,
                num_layers: 1,
                num_experts: 1,
                nodes: Vec::new(),
                holders: vec![Vec::new()],
            },
            members: Vec::new(),
            status: RebalanceStatus {
                id: "auto".into(),
                state: RebalanceState::Moving,
                before: None,
                after: None,
                epoch: 1,
                detail: String::new(),
            },
            stepped_at: None,
            refused: None,
        }
    }

    #[test]
    fn a_step_refused_for_memory_is_asked_for_again_until_the_wait_is_up() {
        let mut m = a_move();
        let t0 = Instant::now();
        assert!(!m.refused_lately(t0));
        assert!(m.wait_for_room(t0));
        // Not asked again at once: the unloads run seconds after a step.
        assert!(m.refused_lately(t0 + ROOM_RETRY / 2));
        assert!(!m.refused_lately(t0 + ROOM_RETRY));
        // Later refusals count from the first one.
        assert!(m.wait_for_room(t0 + ROOM_WAIT / 2));
        assert!(m.refused_lately(t0 + ROOM_WAIT / 2));
        assert!(!m.wait_for_room(t0 + ROOM_WAIT));
    }
}
