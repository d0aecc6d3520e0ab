//! Which node holds which (layer, expert). Static placement spreads every expert of every
//! layer round-robin over the nodes, `replicas` copies each on distinct nodes.

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlacementError {
    #[error("no expert nodes given")]
    NoNodes,
    #[error("--replicas {replicas} needs at least that many nodes, got {nodes}")]
    TooFewNodes { replicas: usize, nodes: usize },
    #[error("--replicas must be at least 1")]
    ZeroReplicas,
    #[error("unusable placement: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    num_layers: usize,
    num_experts: usize,
    num_nodes: usize,
    /// Per (layer * num_experts + expert), the nodes holding it.
    holders: Vec<Vec<usize>>,
}

impl Placement {
    pub fn round_robin(
        num_layers: usize,
        num_experts: usize,
        num_nodes: usize,
        replicas: usize,
    ) -> Result<Self, PlacementError> {
        if num_nodes == 0 {
            return Err(PlacementError::NoNodes);
        }
        if replicas == 0 {
            return Err(PlacementError::ZeroReplicas);
        }
        if replicas > num_nodes {
            return Err(PlacementError::TooFewNodes {
                replicas,
                nodes: num_nodes,
            });
        }
        // Counting across layers (not restarting at node 0 each layer) evens out memory
        // when experts do not divide by nodes.
        let holders = (0..num_layers * num_experts)
            .map(|i| (0..replicas).map(|r| (i + r) % num_nodes).collect())
            .collect();
        Ok(Placement {
            num_layers,
            num_experts,
            num_nodes,
            holders,
        })
    }

    /// A placement given per expert (`layer * num_experts + expert`), as published by the
    /// cluster leader: refused unless it has one non-empty entry per expert and every
    /// holder is one of the `num_nodes` nodes (dispatch indexes by both).
    pub fn from_holders(
        num_layers: usize,
        num_experts: usize,
        num_nodes: usize,
        holders: Vec<Vec<usize>>,
    ) -> Result<Self, PlacementError> {
        let bad = |reason: String| Err(PlacementError::Invalid(reason));
        if Some(holders.len()) != num_layers.checked_mul(num_experts) {
            return bad(format!(
                "{} expert entries for {num_layers} layers x {num_experts} experts",
                holders.len()
            ));
        }
        if let Some(bad_node) = holders.iter().flatten().find(|&&n| n >= num_nodes) {
            return bad(format!("holder {bad_node} out of {num_nodes} nodes"));
        }
        Ok(Placement {
            num_layers,
            num_experts,
            num_nodes,
            holders,
        })
    }

    /// A placement where nobody holds anything yet (cluster mode before the first
    /// published epoch): every expert is uncovered.
    pub fn empty(num_layers: usize, num_experts: usize) -> Self {
        Placement {
            num_layers,
            num_experts,
            num_nodes: 0,
            holders: vec![Vec::new(); num_layers * num_experts],
        }
    }

    /// Adds `node` as a holder of (layer, expert).
    pub fn add_holder(&mut self, layer: usize, expert: usize, node: usize) {
        let h = &mut self.holders[layer * self.num_experts + expert];
        if !h.contains(&node) {
            h.push(node);
        }
    }

    pub fn num_layers(&self) -> usize {
        self.num_layers
    }

    pub fn num_experts(&self) -> usize {
        self.num_experts
    }

    pub fn holders(&self, layer: usize, expert: usize) -> &[usize] {
        &self.holders[layer * self.num_experts + expert]
    }

    pub fn num_nodes(&self) -> usize {
        self.num_nodes
    }

    /// The (layer, expert) pairs `node` must hold.
    pub fn experts_of(&self, node: usize) -> Vec<(usize, usize)> {
        (0..self.num_layers)
            .flat_map(|l| (0..self.num_experts).map(move |e| (l, e)))
            .filter(|&(l, e)| self.holders(l, e).contains(&node))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_expert_is_placed_replicas_times_on_distinct_nodes_evenly() {
        for (nodes, replicas) in [(1, 1), (3, 1), (3, 2), (4, 3), (5, 5)] {
            let p = Placement::round_robin(4, 8, nodes, replicas).unwrap();
            for l in 0..4 {
                for e in 0..8 {
                    let mut h = p.holders(l, e).to_vec();
                    assert_eq!(h.len(), replicas);
                    h.sort();
                    h.dedup();
                    assert_eq!(h.len(), replicas, "replicas must be on distinct nodes");
                }
            }
            let counts: Vec<usize> = (0..nodes).map(|n| p.experts_of(n).len()).collect();
            let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
            assert!(max - min <= 1, "{counts:?}");
            assert_eq!(counts.iter().sum::<usize>(), 32 * replicas);
        }
    }

    #[test]
    fn published_placements_that_do_not_fit_are_refused() {
        let ok = Placement::from_holders(2, 2, 2, vec![vec![0], vec![1], vec![0, 1], vec![1]]);
        assert_eq!(ok.map(|p| p.holders(1, 0).to_vec()), Ok(vec![0, 1]));
        let short = Placement::from_holders(2, 2, 2, vec![vec![0]]);
        assert!(matches!(short, Err(PlacementError::Invalid(r)) if r.contains("1 expert entries")));
        let far = Placement::from_holders(1, 2, 2, vec![vec![0], vec![2]]);
        assert!(matches!(far, Err(PlacementError::Invalid(r)) if r.contains("holder 2 out of 2")));
        let overflow = Placement::from_holders(usize::MAX, 2, 1, vec![]);
        assert!(matches!(overflow, Err(PlacementError::Invalid(_))));
    }

    #[test]
    fn impossible_placements_are_errors() {
        assert_eq!(
            Placement::round_robin(1, 8, 0, 1),
            Err(PlacementError::NoNodes)
        );
        assert_eq!(
            Placement::round_robin(1, 8, 2, 3),
            Err(PlacementError::TooFewNodes {
                replicas: 3,
                nodes: 2
            })
        );
        assert_eq!(
            Placement::round_robin(1, 8, 2, 0),
            Err(PlacementError::ZeroReplicas)
        );
    }
}
