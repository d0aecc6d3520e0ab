//! The leader's side of a rebalance: when to plan one (an operator's request, or the
//! automatic interval), and publishing its steps ([`next_step`]) until it arrives.

use std::time::{Duration, Instant};

use etcd_client::Client;
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
}

/// How long a step waits for the previous one's unloads to show in the node records
/// before it plans with what they say.
const SETTLE_WAIT: Duration = Duration::from_secs(10);

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
    let planned = plan_by_load(&input, 0).ok().flatten();
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
    if m.stepped_at.is_some_and(|t| t.elapsed() < SETTLE_WAIT) && behind {
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
        let Some(why) = st.load_error.take() else {
            // Someone wrote the placement since our snapshot (or we lost the lead):
            // the next round sees why.
            st.moving = Some(m);
            return Ok(false);
        };
        let status = finish(m, RebalanceState::Stopped, &why);
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
