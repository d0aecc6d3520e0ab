//! Dispatch planning: which tokens each node must see for one MoE layer.
//!
//! A token whose chosen experts share a node is sent to that node once, with all its
//! (expert, weight) pairs; the node combines locally. Among replicas, a token goes to a
//! node it is already going to, else to the replica with the fewest tokens so far.

use switchyard_engine::{Assignment, Routing};

use crate::placement::Placement;

/// One node's share of a layer's work.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeWork {
    /// Batch rows (global token indices) this node sees, in the order sent.
    pub tokens: Vec<u32>,
    /// `token` fields index into `tokens` (local rows).
    pub assignments: Vec<Assignment>,
}

impl NodeWork {
    pub fn is_empty(&self) -> bool {
        self.assignments.is_empty()
    }
}

/// Splits `routing` over the nodes. `live` says which nodes may be used.
pub fn plan(
    layer: usize,
    routing: &Routing,
    placement: &Placement,
    live: &[bool],
) -> Result<Vec<NodeWork>, (usize, u32)> {
    plan_avoiding(layer, routing, placement, live, &[])
}

/// [`plan`], giving a node marked in `avoid` only what no other live holder can take (a
/// gray node: slow lately, its work answered by hedges).
pub fn plan_avoiding(
    layer: usize,
    routing: &Routing,
    placement: &Placement,
    live: &[bool],
    avoid: &[bool],
) -> Result<Vec<NodeWork>, (usize, u32)> {
    let n = placement.num_nodes();
    let avoided = |h: usize| avoid.get(h).copied().unwrap_or(false);
    let mut work = vec![NodeWork::default(); n];
    // Local row of the current token on each node, if it was already sent there.
    let mut local_row: Vec<Option<u32>> = vec![None; n];
    for t in 0..routing.tokens() {
        local_row.fill(None);
        let (experts, weights) = routing.token(t);
        for (&e, &w) in experts.iter().zip(weights) {
            let holders = placement.holders(layer, e as usize);
            let pick = holders
                .iter()
                .copied()
                .filter(|h| live[*h])
                .min_by_key(|h| (avoided(*h), local_row[*h].is_none(), work[*h].tokens.len()))
                .ok_or((layer, e))?;
            let row = match local_row[pick] {
                Some(r) => r,
                None => {
                    let r = work[pick].tokens.len() as u32;
                    work[pick].tokens.push(t as u32);
                    local_row[pick] = Some(r);
                    r
                }
            };
            work[pick].assignments.push(Assignment {
                token: row,
                expert: e,
                weight: w,
            });
        }
    }
    Ok(work)
}

/// One node's share (`work`, planned for node `from`) planned again on the other live
/// holders of its experts, for a hedge. Token rows stay global batch rows; a token whose
/// experts share a replica is still sent there once. `None` if some expert of the share
/// has no other live holder.
pub fn replan_away(
    layer: usize,
    work: &NodeWork,
    from: usize,
    placement: &Placement,
    live: &[bool],
) -> Option<Vec<NodeWork>> {
    let mut out = vec![NodeWork::default(); placement.num_nodes()];
    // (node, local row of `work`) -> row on that node.
    let mut rows: std::collections::HashMap<(usize, u32), u32> = Default::default();
    for a in &work.assignments {
        let t = *work.tokens.get(a.token as usize)?;
        let pick = placement
            .holders(layer, a.expert as usize)
            .iter()
            .copied()
            .filter(|&h| h != from && live.get(h).copied().unwrap_or(false))
            .min_by_key(|&h| (!rows.contains_key(&(h, a.token)), out[h].tokens.len()))?;
        let row = *rows.entry((pick, a.token)).or_insert_with(|| {
            out[pick].tokens.push(t);
            out[pick].tokens.len() as u32 - 1
        });
        out[pick].assignments.push(Assignment {
            token: row,
            expert: a.expert,
            weight: a.weight,
        });
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routing(choices: &[(u32, u32)]) -> Routing {
        Routing {
            k: 2,
            experts: choices.iter().flat_map(|(a, b)| [*a, *b]).collect(),
            weights: choices.iter().flat_map(|_| [0.75, 0.25]).collect(),
        }
    }

    #[test]
    fn co_located_experts_send_the_token_once() {
        // 2 nodes, 1 replica: node 0 holds even experts of layer 0, node 1 odd.
        let p = Placement::round_robin(1, 4, 2, 1).unwrap();
        let r = routing(&[(0, 2), (1, 2), (3, 1)]);
        let w = plan(0, &r, &p, &[true, true]).unwrap();
        assert_eq!(w[0].tokens, vec![0, 1]);
        assert_eq!(w[1].tokens, vec![1, 2]);
        // Token 0 went once to node 0 with both its experts.
        assert_eq!(w[0].assignments.iter().filter(|a| a.token == 0).count(), 2);
        // Every (token, expert, weight) appears exactly once overall.
        let total: usize = w.iter().map(|n| n.assignments.len()).sum();
        assert_eq!(total, 6);
        for (node, nw) in w.iter().enumerate() {
            for a in &nw.assignments {
                assert_eq!(a.expert as usize % 2, node);
            }
        }
    }

    #[test]
    fn replicas_balance_load_and_skip_dead_nodes() {
        let p = Placement::round_robin(1, 2, 2, 2).unwrap(); // both nodes hold both experts
        let r = routing(&[(0, 1), (0, 1), (1, 0), (0, 1)]);
        let w = plan(0, &r, &p, &[true, true]).unwrap();
        assert_eq!(w[0].tokens.len(), 2);
        assert_eq!(w[1].tokens.len(), 2);
        let w = plan(0, &r, &p, &[false, true]).unwrap();
        assert!(w[0].is_empty());
        assert_eq!(w[1].tokens.len(), 4);
        let p1 = Placement::round_robin(1, 2, 2, 1).unwrap();
        assert_eq!(plan(0, &r, &p1, &[false, true]), Err((0, 0)));
    }

    #[test]
    fn an_avoided_node_gets_only_what_nobody_else_holds() {
        // 3 nodes, 2 copies: node 2 avoided takes nothing another live node can take.
        let p = Placement::round_robin(1, 6, 3, 2).unwrap();
        let choices: Vec<(u32, u32)> = (0..6).map(|t| (t, (t + 2) % 6)).collect();
        let r = routing(&choices);
        let w = plan_avoiding(0, &r, &p, &[true; 3], &[false, false, true]).unwrap();
        assert!(w[2].is_empty(), "{w:?}");
        assert_eq!(triples(&w), triples(&plan(0, &r, &p, &[true; 3]).unwrap()));
        // With the other holders down, it is still used rather than failing the layer.
        let w = plan_avoiding(0, &r, &p, &[false, true, true], &[false, false, true]).unwrap();
        assert!(!w[2].is_empty());
        assert!(w[0].is_empty());
    }

    /// (global token, expert, weight) of every assignment, sorted.
    fn triples(works: &[NodeWork]) -> Vec<(u32, u32, u32)> {
        let mut v: Vec<(u32, u32, u32)> = works
            .iter()
            .flat_map(|w| {
                w.assignments
                    .iter()
                    .map(|a| (w.tokens[a.token as usize], a.expert, a.weight.to_bits()))
            })
            .collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn a_hedge_carries_exactly_the_slow_nodes_work_elsewhere() {
        // 3 nodes, 2 copies of each of 8 experts; every pair of experts for 8 tokens.
        let p = Placement::round_robin(2, 8, 3, 2).unwrap();
        let choices: Vec<(u32, u32)> = (0..8).map(|t| (t, (t * 3 + 1) % 8)).collect();
        let r = routing(&choices);
        let w = plan(1, &r, &p, &[true; 3]).unwrap();
        for from in 0..3 {
            let mut live = [true; 3];
            let alt = replan_away(1, &w[from], from, &p, &live).unwrap();
            assert!(alt[from].is_empty());
            assert_eq!(triples(&alt), triples(&w[from..=from]), "from node {from}");
            for nw in &alt {
                // A token is sent to a node at most once.
                let mut t = nw.tokens.clone();
                t.sort_unstable();
                t.dedup();
                assert_eq!(t.len(), nw.tokens.len());
            }
            // With the only other holder of some expert down, there is no hedge.
            live[(from + 1) % 3] = false;
            live[(from + 2) % 3] = false;
            assert_eq!(replan_away(1, &w[from], from, &p, &live), None);
        }
        // Without replicas nothing can be hedged.
        let p1 = Placement::round_robin(2, 8, 3, 1).unwrap();
        let w1 = plan(1, &r, &p1, &[true; 3]).unwrap();
        assert_eq!(replan_away(1, &w1[0], 0, &p1, &[true; 3]), None);
    }
}
