//! Placement planning: which node holds which (layer, expert), as a pure function of the
//! live nodes, their memory, the current placement and the observed load.
//!
//! Goals, in order: every expert on at least one node; each node within its capacity;
//! at least `min_replicas` copies of every expert where memory allows; one more copy of
//! each hot expert (routed well above the mean) where memory allows; copies spread
//! evenly; and as few moves as possible from the current placement, so that a rebalance
//! loads only what must move (a new node takes its even share, nothing else shuffles).

use std::collections::HashMap;

use crate::records::{PlacedNode, PlacementRecord};

/// A node the planner may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: String,
    pub addr: String,
    /// Experts that fit in its memory.
    pub capacity: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("no live expert nodes")]
    NoNodes,
    #[error("the live nodes hold {have} experts in all, the model has {need}")]
    NoCapacity { need: usize, have: usize },
}

#[derive(Debug, Clone)]
pub struct PlanInput<'a> {
    pub num_layers: usize,
    pub num_experts: usize,
    pub nodes: &'a [Candidate],
    pub current: Option<&'a PlacementRecord>,
    /// Routed tokens per `layer * num_experts + expert`; empty when unknown.
    pub load: &'a [u64],
    pub min_replicas: usize,
}

/// An expert is hot when it receives more than this multiple of the mean load.
const HOT: f64 = 1.5;

/// The placement for `input`, with `epoch` written into it.
pub fn plan(input: &PlanInput<'_>, epoch: u64) -> Result<PlacementRecord, PlanError> {
    let nodes = input.nodes;
    let n = nodes.len();
    if n == 0 {
        return Err(PlanError::NoNodes);
    }
    let experts = input.num_layers * input.num_experts;
    let have: usize = nodes.iter().map(|c| c.capacity).sum();
    if have < experts {
        return Err(PlanError::NoCapacity {
            need: experts,
            have,
        });
    }

    let (copies, order) = copies_per_expert(input, have - experts);
    let total: usize = copies.iter().sum();
    let target = even_targets(nodes, total);

    // Current holders of each expert, as indices into `nodes` (dead nodes drop out).
    let index_of: HashMap<&str, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, c)| (c.id.as_str(), i))
        .collect();
    let current: Vec<Vec<usize>> = match input.current {
        Some(p) if p.holders.len() == experts && p.num_experts == input.num_experts => p
            .holders
            .iter()
            .map(|h| {
                h.iter()
                    .filter_map(|&k| p.nodes.get(k as usize))
                    .filter_map(|pn| index_of.get(pn.id.as_str()).copied())
                    .collect()
            })
            .collect(),
        _ => vec![Vec::new(); experts],
    };

    let mut assigned = vec![0usize; n];
    let mut holders: Vec<Vec<usize>> = vec![Vec::new(); experts];
    // First one copy of everything (always possible: capacity covers the experts), then
    // the extra copies, so replicas never crowd out a primary.
    // Replicas go hottest first: when memory is tight, the last ones may find no node.
    let by_index: Vec<usize> = (0..experts).collect();
    for round in 0..copies.iter().copied().max().unwrap_or(1) {
        let sequence = if round == 0 { &by_index } else { &order };
        for &x in sequence {
            if copies[x] <= round {
                continue;
            }
            if let Some(pick) = choose(&holders[x], &current[x], &assigned, &target, nodes) {
                holders[x].push(pick);
                assigned[pick] += 1;
            }
        }
    }

    // Only nodes that hold something appear in the record.
    let mut used: Vec<usize> = (0..n).filter(|&i| assigned[i] > 0).collect();
    used.sort_by(|&a, &b| nodes[a].id.cmp(&nodes[b].id));
    let mut slot = vec![u32::MAX; n];
    for (k, &i) in used.iter().enumerate() {
        slot[i] = k as u32;
    }
    Ok(PlacementRecord {
        epoch,
        num_layers: input.num_layers,
        num_experts: input.num_experts,
        nodes: used
            .iter()
            .map(|&i| PlacedNode {
                id: nodes[i].id.clone(),
                addr: nodes[i].addr.clone(),
            })
            .collect(),
        holders: holders
            .into_iter()
            .map(|h| {
                let mut h: Vec<u32> = h.into_iter().map(|i| slot[i]).collect();
                h.sort_unstable();
                h
            })
            .collect(),
    })
}

/// How many copies each expert gets, given `spare` slots beyond one copy each, and the
/// experts hottest first.
fn copies_per_expert(input: &PlanInput<'_>, mut spare: usize) -> (Vec<usize>, Vec<usize>) {
    let experts = input.num_layers * input.num_experts;
    let n = input.nodes.len();
    let load = |x: usize| input.load.get(x).copied().unwrap_or(0);
    // Hottest first, so that when memory runs short the replicas go where they help.
    let mut order: Vec<usize> = (0..experts).collect();
    order.sort_by_key(|&x| (std::cmp::Reverse(load(x)), x));
    let mut copies = vec![1usize; experts];
    let want = input.min_replicas.clamp(1, n);
    for _ in 1..want {
        for &x in &order {
            if spare == 0 {
                return (copies, order);
            }
            copies[x] += 1;
            spare -= 1;
        }
    }
    let mean = (0..experts).map(load).sum::<u64>() as f64 / experts.max(1) as f64;
    for &x in &order {
        if spare == 0 || mean == 0.0 || (load(x) as f64) <= HOT * mean {
            break;
        }
        if copies[x] < n {
            copies[x] += 1;
            spare -= 1;
        }
    }
    (copies, order)
}

/// Per-node share of `total` copies: as even as capacities allow (water-filling).
fn even_targets(nodes: &[Candidate], total: usize) -> Vec<usize> {
    let mut level = total.div_ceil(nodes.len());
    loop {
        let t: Vec<usize> = nodes.iter().map(|c| c.capacity.min(level)).collect();
        if t.iter().sum::<usize>() >= total || t.iter().zip(nodes).all(|(t, c)| *t == c.capacity) {
            return t;
        }
        level += 1;
    }
}

/// The node for an expert's next copy: a current holder under its share if any (no
/// move), else the least-filled node under its share, else any node with room.
fn choose(
    chosen: &[usize],
    current: &[usize],
    assigned: &[usize],
    target: &[usize],
    nodes: &[Candidate],
) -> Option<usize> {
    let free = |i: &usize| !chosen.contains(i);
    let least = |it: &mut dyn Iterator<Item = usize>| it.min_by_key(|&i| (assigned[i], i));
    least(
        &mut current
            .iter()
            .copied()
            .filter(free)
            .filter(|&i| assigned[i] < target[i]),
    )
    .or_else(|| {
        least(
            &mut (0..nodes.len())
                .filter(free)
                .filter(|&i| assigned[i] < target[i]),
        )
    })
    .or_else(|| {
        least(
            &mut (0..nodes.len())
                .filter(free)
                .filter(|&i| assigned[i] < nodes[i].capacity),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cands(caps: &[usize]) -> Vec<Candidate> {
        caps.iter()
            .enumerate()
            .map(|(i, &c)| Candidate {
                id: format!("n{i}"),
                addr: format!("127.0.0.1:{}", 7000 + i),
                capacity: c,
            })
            .collect()
    }

    fn input<'a>(nodes: &'a [Candidate], current: Option<&'a PlacementRecord>) -> PlanInput<'a> {
        PlanInput {
            num_layers: 4,
            num_experts: 8,
            nodes,
            current,
            load: &[],
            min_replicas: 1,
        }
    }

    /// Per node id, how many experts it holds.
    fn counts(p: &PlacementRecord) -> HashMap<String, usize> {
        let mut c = HashMap::new();
        for h in &p.holders {
            for &k in h {
                *c.entry(p.nodes[k as usize].id.clone()).or_insert(0) += 1;
            }
        }
        c
    }

    /// (layer, expert, node id) triples: what a rebalance would have to load.
    fn pairs(p: &PlacementRecord) -> std::collections::BTreeSet<(usize, String)> {
        p.holders
            .iter()
            .enumerate()
            .flat_map(|(x, h)| h.iter().map(move |&k| (x, p.nodes[k as usize].id.clone())))
            .collect()
    }

    #[test]
    fn a_joining_node_takes_an_even_share_and_nothing_else_moves() {
        let three = cands(&[32, 32, 32]);
        let before = plan(&input(&three, None), 1).unwrap();
        let four = cands(&[32, 32, 32, 32]);
        let after = plan(&input(&four, Some(&before)), 2).unwrap();
        assert_eq!(
            counts(&after).values().copied().collect::<Vec<_>>().len(),
            4
        );
        assert!(
            counts(&after).values().all(|&c| c == 8),
            "{:?}",
            counts(&after)
        );
        let moved = pairs(&after).difference(&pairs(&before)).count();
        assert_eq!(moved, 8, "only the new node's share is loaded");
    }

    #[test]
    fn a_drained_or_dead_node_loses_everything_and_survivors_keep_theirs() {
        let three = cands(&[32, 32, 32]);
        let before = plan(&input(&three, None), 1).unwrap();
        let two = cands(&[32, 32]);
        let after = plan(&input(&two, Some(&before)), 2).unwrap();
        assert!(!after.contains_node("n2"));
        let kept = pairs(&before).intersection(&pairs(&after)).count();
        let survivors = pairs(&before).iter().filter(|(_, id)| id != "n2").count();
        assert_eq!(kept, survivors, "nothing the survivors held moved");
    }

    #[test]
    fn replicas_and_hot_experts_use_spare_memory_only() {
        let nodes = cands(&[40, 40, 40]);
        let mut load = vec![10u64; 32];
        load[5] = 100;
        let mut inp = input(&nodes, None);
        inp.load = &load;
        let p = plan(&inp, 1).unwrap();
        assert_eq!(p.holders[5].len(), 2, "hot expert replicated");
        assert!(
            p.holders
                .iter()
                .enumerate()
                .all(|(x, h)| x == 5 || h.len() == 1)
        );
        inp.min_replicas = 2;
        let p = plan(&inp, 1).unwrap();
        // 64 copies for everyone, then one more for the hot one: 65 <= 120.
        assert_eq!(p.holders[5].len(), 3);
        assert!(p.holders.iter().all(|h| h.len() >= 2));
        // Not enough memory for two copies of everything: the hottest get theirs first.
        let tight = cands(&[12, 12, 12]);
        let mut inp = input(&tight, None);
        inp.load = &load;
        inp.min_replicas = 2;
        let p = plan(&inp, 1).unwrap();
        assert_eq!(p.holders[5].len(), 2);
        assert!(p.holders.iter().all(|h| !h.is_empty()));
        assert!(p.holders.iter().map(Vec::len).sum::<usize>() <= 36);
    }

    #[test]
    fn impossible_placements_are_errors() {
        assert_eq!(plan(&input(&[], None), 1), Err(PlanError::NoNodes));
        assert_eq!(
            plan(&input(&cands(&[10, 10]), None), 1),
            Err(PlanError::NoCapacity { need: 32, have: 20 })
        );
    }

    proptest! {
        #[test]
        fn plans_are_valid_within_capacity_and_stable(
            caps in proptest::collection::vec(0usize..40, 1..6),
            replicas in 1usize..4,
            load in proptest::collection::vec(0u64..1000, 32),
        ) {
            let nodes = cands(&caps);
            let mut inp = input(&nodes, None);
            inp.min_replicas = replicas;
            inp.load = &load;
            match plan(&inp, 1) {
                Err(PlanError::NoCapacity { need, have }) => {
                    prop_assert_eq!(need, 32);
                    prop_assert_eq!(have, caps.iter().sum::<usize>());
                    prop_assert!(have < 32);
                }
                Err(e) => prop_assert!(false, "{}", e),
                Ok(p) => {
                    prop_assert!(p.validate().is_ok());
                    for h in &p.holders {
                        let mut d = h.clone();
                        d.dedup();
                        prop_assert_eq!(d.len(), h.len(), "copies on distinct nodes");
                    }
                    for (id, c) in counts(&p) {
                        let cap = nodes.iter().find(|n| n.id == id).unwrap().capacity;
                        prop_assert!(c <= cap, "{} holds {} > {}", id, c, cap);
                    }
                    // Planning again from the result changes nothing.
                    inp.current = Some(&p);
                    let again = plan(&inp, 2).unwrap();
                    prop_assert!(again.same_assignment(&p));
                }
            }
        }
    }
}
