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
    /// The model's expert shape (layers that route x experts), so a node started on
    /// another checkpoint is never used.
    pub num_layers: usize,
    pub num_experts: usize,
    /// How many experts fit in this node's memory budget.
    pub capacity: usize,
    pub bytes_per_expert: u64,
    /// (layer, expert) pairs resident now.
    pub held: Vec<(usize, usize)>,
    pub version: String,
    /// The highest placement epoch the node has accepted: a leader that lost the
    /// placement key (etcd data lost or restored, a key deleted by hand) publishes above
    /// it, since nodes refuse older epochs. Absent from records of older versions.
    #[serde(default)]
    pub epoch: u64,
    /// How the node holds its experts' weights (`f32`, `bf16`); empty from older nodes.
    #[serde(default)]
    pub weights: String,
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

/// Fencing epochs count publications: one a second for a billion years stays below this.
/// A record claiming more was not written by a leader, and honouring it would leave no
/// room to publish a newer one.
pub const MAX_EPOCH: u64 = 1 << 53;

impl PlacementRecord {
    /// Parses and checks a record read from etcd: anyone with access can write the key,
    /// so nothing in it is trusted before this.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let p: PlacementRecord = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        p.validate()?;
        Ok(p)
    }

    /// Checks the internal consistency of a record read from etcd.
    pub fn validate(&self) -> Result<(), String> {
        if self.epoch == 0 || self.epoch > MAX_EPOCH {
            return Err(format!(
                "placement epoch {} is outside 1..={MAX_EPOCH}",
                self.epoch
            ));
        }
        let expected = self
            .num_layers
            .checked_mul(self.num_experts)
            .ok_or_else(|| format!("placement epoch {}: shape overflows", self.epoch))?;
        if self.holders.len() != expected {
            return Err(format!(
                "placement epoch {} has {} expert entries, expected {} x {}",
                self.epoch,
                self.holders.len(),
                self.num_layers,
                self.num_experts
            ));
        }
        let mut ids: Vec<&str> = self.nodes.iter().map(|n| n.id.as_str()).collect();
        ids.sort_unstable();
        if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
            return Err(format!(
                "placement epoch {}: node `{}` is listed twice",
                self.epoch, w[0]
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

    /// Whether this record places a model of `num_layers` x `num_experts` (a record for
    /// another model, or a hand-written one, must never be used for this one).
    pub fn fits(&self, num_layers: usize, num_experts: usize) -> Result<(), String> {
        if (self.num_layers, self.num_experts) == (num_layers, num_experts) {
            Ok(())
        } else {
            Err(format!(
                "placement epoch {} is for {} layers x {} experts, this model has {num_layers} x {num_experts}",
                self.epoch, self.num_layers, self.num_experts
            ))
        }
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
    /// Addresses of the placed nodes this coordinator cannot reach now (its link is
    /// down: keepalive lost, connection refused). Absent from older reports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unreachable: Vec<String>,
}

/// The elected coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderRecord {
    pub id: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record(epoch: u64, layers: usize, experts: usize, nodes: usize) -> PlacementRecord {
        PlacementRecord {
            epoch,
            num_layers: layers,
            num_experts: experts,
            nodes: (0..nodes)
                .map(|i| PlacedNode {
                    id: format!("n{i}"),
                    addr: format!("127.0.0.1:{}", 5000 + i),
                })
                .collect(),
            holders: (0..layers * experts)
                .map(|i| vec![(i % nodes) as u32])
                .collect(),
        }
    }

    #[test]
    fn records_that_cannot_be_used_are_refused_with_the_reason() {
        let good = record(3, 2, 4, 2);
        assert_eq!(good.validate(), Ok(()));
        let bytes = serde_json::to_vec(&good).unwrap();
        assert_eq!(PlacementRecord::decode(&bytes), Ok(good.clone()));

        let mut p = good.clone();
        p.epoch = 0;
        assert!(p.validate().unwrap_err().contains("outside"));
        p.epoch = u64::MAX;
        assert!(p.validate().unwrap_err().contains("outside"));
        let mut p = good.clone();
        p.num_layers = usize::MAX;
        assert!(p.validate().unwrap_err().contains("overflows"));
        let mut p = good.clone();
        p.num_layers = 1;
        assert!(p.validate().unwrap_err().contains("expert entries"));
        let mut p = good.clone();
        p.nodes[1].id = "n0".into();
        assert!(p.validate().unwrap_err().contains("listed twice"));
        let mut p = good.clone();
        p.holders[5] = vec![];
        assert!(p.validate().unwrap_err().contains("no holder"));
        let mut p = good.clone();
        p.holders[5] = vec![2];
        assert!(p.validate().unwrap_err().contains("out of 2 nodes"));
        assert!(PlacementRecord::decode(b"not json").is_err());
        assert!(PlacementRecord::decode(b"{\"epoch\":-1}").is_err());

        assert_eq!(good.fits(2, 4), Ok(()));
        assert!(
            good.fits(1, 1)
                .unwrap_err()
                .contains("this model has 1 x 1")
        );
    }

    proptest! {
        // What an etcd key can hold is anyone's bytes: decoding never panics, and what
        // it accepts can be walked without an out-of-range index.
        #[test]
        fn decoding_arbitrary_records_never_panics(
            epoch in prop_oneof![Just(0u64), 1u64..10, Just(MAX_EPOCH), Just(u64::MAX)],
            layers in 0usize..4,
            experts in 0usize..4,
            nodes in 0usize..4,
            holders in proptest::collection::vec(
                proptest::collection::vec(0u32..6, 0..3), 0..20),
            cut in 0usize..400,
        ) {
            let mut p = record(1, 0, 0, nodes);
            p.epoch = epoch;
            p.num_layers = layers;
            p.num_experts = experts;
            p.holders = holders;
            let bytes = serde_json::to_vec(&p).unwrap();
            // Whole records, truncated ones, and bytes flipped in the middle.
            let truncated = &bytes[..cut.min(bytes.len())];
            let mut flipped = bytes.clone();
            if let Some(b) = flipped.get_mut(cut) {
                *b ^= 0x5a;
            }
            for input in [&bytes[..], truncated, &flipped[..]] {
                if let Ok(r) = PlacementRecord::decode(input) {
                    for l in 0..r.num_layers {
                        for e in 0..r.num_experts {
                            prop_assert!(r.holders_of(l, e).count() > 0);
                        }
                    }
                    for n in &r.nodes {
                        let _ = r.experts_of(&n.id);
                    }
                    prop_assert!(r.same_assignment(&r));
                }
            }
        }
    }
}
