//! Rebalancing live: when a placement by load is worth adopting, and how to get there
//! without a moment in which an expert has no serving copy or a node is asked to hold
//! more than its memory.
//!
//! A target placement is reached in steps. Each step is itself a placement: every
//! expert's target copies that are resident already or fit in their node's free memory
//! now, and, for an expert none of whose target copies fits yet, its current copies. The
//! leader has the nodes load a step, publishes it, and unloads what it dropped after
//! the grace period; the freed memory lets the next step place more. Copies of the same
//! expert are never fewer than before and after both allow. The load-aware planner
//! leaves [`MOVE_ROOM`] of every node's slots free, so that a swap between two full
//! nodes always has room for its first half.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::records::{NodeRecord, PlacedNode, PlacementRecord};

/// The share of a node's expert capacity the load-aware planner leaves free for moves.
pub const MOVE_ROOM: f64 = 0.1;

/// What a placement by load plans with: a node's capacity less its room for moves.
pub fn plannable(capacity: usize) -> usize {
    capacity - ((capacity as f64 * MOVE_ROOM).ceil() as usize).min(capacity)
}

/// When the leader rebalances by itself (`--rebalance-interval-s`); `ctl rebalance`
/// asks for one at any time.
#[derive(Debug, Clone, PartialEq)]
pub struct RebalancePolicy {
    /// How often the load is looked at; `None`: only when asked.
    pub interval: Option<Duration>,
    /// Rebalance only while the mean balancedness is below this.
    pub below: f64,
    /// ... and the new plan raises it by more than this.
    pub min_gain: f64,
}

impl Default for RebalancePolicy {
    fn default() -> Self {
        RebalancePolicy {
            interval: None,
            below: 0.9,
            min_gain: 0.05,
        }
    }
}

impl RebalancePolicy {
    /// Whether a plan going from `before` to `after` mean balancedness is adopted. An
    /// operator's request needs a gain at all; the automatic rebalance the policy's.
    pub fn adopt(&self, before: Option<f64>, after: Option<f64>, asked: bool) -> bool {
        let (Some(before), Some(after)) = (before, after) else {
            return false;
        };
        if asked {
            after > before + 1e-9
        } else {
            before < self.below && after - before > self.min_gain
        }
    }
}

/// An operator's request (`ctl rebalance`), under the `rebalance` key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebalanceRequest {
    pub id: String,
}

/// The leader's answer, under `rebalance-status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RebalanceStatus {
    /// The request answered; `auto` for the automatic rebalance.
    pub id: String,
    pub state: RebalanceState,
    /// Mean balancedness of the placement before and of the plan, under the load
    /// measured when it was planned.
    pub before: Option<f64>,
    pub after: Option<f64>,
    /// The last placement epoch published on the way.
    pub epoch: u64,
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RebalanceState {
    /// Adopted; steps are being published.
    Moving,
    /// Every node serves the new placement.
    Done,
    /// The plan would not have been better (or no load was measured): nothing moved.
    Unchanged,
    /// Given up part way (a node joined or left, or no memory to move into): the
    /// placement published last is valid and stays.
    Stopped,
}

impl RebalanceState {
    pub fn is_final(self) -> bool {
        self != RebalanceState::Moving
    }
}

/// The next placement on the way from `current` to `target`, given what each node holds
/// and can hold now (`nodes`, by id). Equal in assignment to `target` when it can be
/// reached in one step; equal to `current` when nothing can move.
pub fn next_step(
    current: &PlacementRecord,
    target: &PlacementRecord,
    nodes: &BTreeMap<String, NodeRecord>,
    epoch: u64,
) -> PlacementRecord {
    let experts = target.holders.len();
    let mut room: HashMap<&str, usize> = nodes
        .iter()
        .map(|(id, n)| (id.as_str(), n.capacity.saturating_sub(n.held.len())))
        .collect();
    let held: HashMap<&str, HashSet<(usize, usize)>> = nodes
        .iter()
        .map(|(id, n)| (id.as_str(), n.held.iter().copied().collect()))
        .collect();
    let ids = |p: &PlacementRecord, x: usize| -> Vec<String> {
        p.holders
            .get(x)
            .map(|h| h.iter().map(|&k| p.nodes[k as usize].id.clone()).collect())
            .unwrap_or_default()
    };
    let mut step: Vec<Vec<String>> = Vec::with_capacity(experts);
    for x in 0..experts {
        let pair = (x / target.num_experts, x % target.num_experts);
        let (now, want) = (ids(current, x), ids(target, x));
        let mut chosen: Vec<String> = Vec::new();
        for id in &want {
            let resident = held.get(id.as_str()).is_some_and(|h| h.contains(&pair));
            let free = room.get_mut(id.as_str());
            if resident {
                chosen.push(id.clone());
            } else if let Some(r) = free.filter(|r| **r > 0) {
                *r -= 1;
                chosen.push(id.clone());
            }
        }
        // Never fewer copies than both placements give: keep old ones until enough
        // new ones are in.
        let floor = now.len().min(want.len());
        for id in &now {
            if chosen.len() >= floor.max(1) {
                break;
            }
            if !chosen.contains(id) {
                chosen.push(id.clone());
            }
        }
        step.push(chosen);
    }
    let mut names: Vec<String> = step.iter().flatten().cloned().collect();
    names.sort();
    names.dedup();
    let addr_of = |id: &str| {
        target
            .nodes
            .iter()
            .chain(&current.nodes)
            .find(|n| n.id == id)
            .map(|n| n.addr.clone())
            .unwrap_or_default()
    };
    let index: HashMap<&str, u32> = names
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str(), i as u32))
        .collect();
    PlacementRecord {
        epoch,
        num_layers: target.num_layers,
        num_experts: target.num_experts,
        nodes: names
            .iter()
            .map(|id| PlacedNode {
                id: id.clone(),
                addr: addr_of(id),
            })
            .collect(),
        holders: step
            .iter()
            .map(|h| {
                let mut h: Vec<u32> = h.iter().map(|id| index[id.as_str()]).collect();
                h.sort_unstable();
                h
            })
            .collect(),
    }
}

/// Whether every node holds exactly what `p` gives it (the unloads after a step have
/// landed), so that the next step sees the memory they freed.
pub fn settled(p: &PlacementRecord, nodes: &BTreeMap<String, NodeRecord>) -> bool {
    p.nodes.iter().all(|n| {
        nodes.get(&n.id).is_some_and(|r| {
            let mut want = p.experts_of(&n.id);
            let mut have = r.held.clone();
            want.sort_unstable();
            have.sort_unstable();
            want == have
        })
    })
}

#[cfg(test)]
#[path = "rebalance_tests.rs"]
mod tests;
