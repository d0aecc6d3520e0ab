//! The values stored under the keys: JSON, so `etcdctl get` shows something readable.

use serde::{Deserialize, Serialize};

/// What an expert node publishes about itself (on its lease: it vanishes when the node
/// dies).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: String,
    /// gRPC address coordinators dial (`HOST:PORT`).
    pub addr: String,
    pub device: String,
    /// The model's shape, so a node started on another checkpoint is never used.
    pub num_layers: usize,
    pub num_experts: usize,
    /// How many experts fit in this node's memory budget.
    pub capacity: usize,
    pub bytes_per_expert: u64,
    /// (layer, expert) pairs resident now.
    pub held: Vec<(usize, usize)>,
    pub version: String,
}

/// One node of a placement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacedNode {
    pub id: String,
    pub addr: String,
}

/// The placement every coordinator follows, published by the leader once the nodes
/// have loaded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementRecord {
    /// Increases by one with every publication; the fencing token of control RPCs.
    pub epoch: u64,
    pub num_layers: usize,
    pub num_experts: usize,
    pub nodes: Vec<PlacedNode>,
    /// Per `layer * num_experts + expert`, indices into `nodes`.
    pub holders: Vec<Vec<u32>>,
}

impl PlacementRecord {
    /// Checks the internal consistency of a record read from etcd.
    pub fn validate(&self) -> Result<(), String> {
        if self.holders.len() != self.num_layers * self.num_experts {
            return Err(format!(
                "placement epoch {} has {} expert entries, expected {} x {}",
                self.epoch,
                self.holders.len(),
                self.num_layers,
                self.num_experts
            ));
        }
        for (i, h) in self.holders.iter().enumerate() {
            if h.is_empty() {
                return Err(format!(
                    "placement epoch {}: expert {} of layer {} has no holder",
                    self.epoch,
                    i % self.num_experts.max(1),
                    i / self.num_experts.max(1)
                ));
            }
            if let Some(bad) = h.iter().find(|&&n| n as usize >= self.nodes.len()) {
                return Err(format!(
                    "placement epoch {}: holder index {bad} out of {} nodes",
                    self.epoch,
                    self.nodes.len()
                ));
            }
        }
        Ok(())
    }

    pub fn holders_of(&self, layer: usize, expert: usize) -> impl Iterator<Item = &PlacedNode> {
        self.holders[layer * self.num_experts + expert]
            .iter()
            .map(|&n| &self.nodes[n as usize])
    }

    /// The (layer, expert) pairs node `id` holds in this placement.
    pub fn experts_of(&self, id: &str) -> Vec<(usize, usize)> {
        let Some(index) = self.nodes.iter().position(|n| n.id == id) else {
            return Vec::new();
        };
        self.holders
            .iter()
            .enumerate()
            .filter(|(_, h)| h.contains(&(index as u32)))
            .map(|(i, _)| (i / self.num_experts, i % self.num_experts))
            .collect()
    }

    pub fn contains_node(&self, id: &str) -> bool {
        self.nodes.iter().any(|n| n.id == id)
    }

    /// Same holders for every expert, ignoring the epoch and the order of `nodes`.
    pub fn same_assignment(&self, other: &PlacementRecord) -> bool {
        if self.holders.len() != other.holders.len() {
            return false;
        }
        let names = |p: &PlacementRecord, h: &[u32]| {
            let mut v: Vec<(String, String)> = h
                .iter()
                .map(|&n| {
                    let node = &p.nodes[n as usize];
                    (node.id.clone(), node.addr.clone())
                })
                .collect();
            v.sort();
            v
        };
        self.holders
            .iter()
            .zip(&other.holders)
            .all(|(a, b)| names(self, a) == names(other, b))
    }
}

/// Routed-token counts one coordinator saw in its last report window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadReport {
    pub coordinator: String,
    pub window_ms: u64,
    /// Per `layer * num_experts + expert`.
    pub tokens: Vec<u64>,
}

/// The elected coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderRecord {
    pub id: String,
}
