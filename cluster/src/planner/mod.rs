//! Placement planning: which node holds which (layer, expert), as a pure function of the
//! live nodes, their memory, the current placement and the observed load.
//!
//! Two planners. [`plan`] keeps a placement whole as membership changes: every expert on
//! at least one node, each node within its capacity, `min_replicas` copies where memory
//! allows, every copy a surviving node holds left where it is, a dead or drained node's
//! copies re-placed on the emptiest nodes, and a joining node given an even share (and
//! nothing else moved). [`plan_by_load`] starts over from the measured load
//! ([`by_load`]): hot experts get more copies and the copies are packed so that each
//! node computes about the same number of tokens per layer. The leader runs the first
//! on every cluster change and the second only to rebalance, so load that shifts all the
//! time does not move weights all the time.

use std::collections::HashMap;

use crate::records::{PlacedNode, PlacementRecord};

pub mod by_load;

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

/// The placement for `input`, with `epoch` written into it. The first placement is
/// planned by load when a load is known (a `--placement-from` file); after that, the
/// current placement is kept and repaired.
pub fn plan(input: &PlanInput<'_>, epoch: u64) -> Result<PlacementRecord, PlanError> {
    check_capacity(input)?;
    if input.current.is_none()
        && input.load.iter().any(|&t| t > 0)
        && let Some(p) = plan_by_load(input, epoch)?
    {
        return Ok(p);
    }
    let nodes = input.nodes;
    let n = nodes.len();
    let experts = input.num_layers * input.num_experts;
    let current = current_holders(input);
    let copies = copies_per_expert(input);
    let total: usize = copies.iter().sum();
    // A joining node takes an even share of the copies from the others; otherwise
    // every copy stays where it is, so that a placement planned by load survives
    // cluster changes that do not concern it.
    let joined = input.current.is_some_and(|p| {
        nodes
            .iter()
            .any(|c| c.capacity > 0 && !p.contains_node(&c.id))
    });
    let target = if joined || input.current.is_none() {
        even_targets(nodes, total)
    } else {
        nodes.iter().map(|c| c.capacity).collect()
    };

    let mut assigned = vec![0usize; n];
    let mut holders: Vec<Vec<usize>> = vec![Vec::new(); experts];
    // Copies that live nodes hold stay (up to each node's share), then every expert
    // without one gets a copy (always possible: capacity covers the experts), then the
    // missing extra copies, so replicas never crowd out a primary: first up to
    // `min_replicas` each, then by the tokens each copy would carry (EPLB's order), so
    // that when memory is tight the last ones to find no node are those that would have
    // balanced least.
    for x in 0..experts {
        for &h in current[x].iter().take(copies[x]) {
            if assigned[h] < target[h] {
                holders[x].push(h);
                assigned[h] += 1;
            }
        }
    }
    for x in 0..experts {
        if holders[x].is_empty()
            && let Some(pick) = choose(&holders[x], &current[x], &assigned, &target, nodes)
        {
            holders[x].push(pick);
            assigned[pick] += 1;
        }
    }
    let base = input.min_replicas.clamp(1, n);
    let load = |x: usize| input.load.get(x).copied().unwrap_or(0) as f64;
    let mut extra: Vec<(usize, usize)> = (0..experts)
        .flat_map(|x| (1..copies[x]).map(move |k| (x, k)))
        .collect();
    extra.sort_by(|&(x, k), &(y, j)| {
        let per_copy = |x: usize, k: usize| load(x) / (k + 1) as f64;
        (k >= base)
            .cmp(&(j >= base))
            .then(if k < base {
                k.cmp(&j)
            } else {
                std::cmp::Ordering::Equal
            })
            .then(per_copy(y, j).total_cmp(&per_copy(x, k)))
            .then(x.cmp(&y))
    });
    for (x, k) in extra {
        if holders[x].len() > k {
            continue;
        }
        if let Some(pick) = choose(&holders[x], &current[x], &assigned, &target, nodes) {
            holders[x].push(pick);
            assigned[pick] += 1;
        }
    }
    Ok(record(input, holders, epoch))
}

/// The placement [`by_load`] makes from `input.load` (the current placement plays no
/// part: an unchanged load gives an unchanged plan), or `None` when some layer's slots
/// cannot hold `min_replicas` copies of each of its experts (capacities too uneven
/// across layers: [`plan`] places by memory alone then).
pub fn plan_by_load(
    input: &PlanInput<'_>,
    epoch: u64,
) -> Result<Option<PlacementRecord>, PlanError> {
    check_capacity(input)?;
    let (layers, per_layer) = (input.num_layers, input.num_experts);
    let mut holders: Vec<Vec<usize>> = Vec::with_capacity(layers * per_layer);
    for l in 0..layers {
        let range = l * per_layer..(l + 1) * per_layer;
        let load: Vec<u64> = range
            .map(|x| input.load.get(x).copied().unwrap_or(0))
            .collect();
        let slots = by_load::layer_slots(input.nodes, layers, l);
        let Some(layer) = by_load::place_layer(&load, &slots, input.min_replicas) else {
            return Ok(None);
        };
        holders.extend(layer);
    }
    Ok(Some(record(input, holders, epoch)))
}

/// Per layer, how evenly `p` spreads `load` (tokens per `layer * num_experts + expert`)
/// over the nodes holding that layer's experts: mean over max of their tokens, with an
/// expert's tokens split evenly over its copies as dispatch does. `None` for a layer
/// without load.
pub fn balancedness(p: &PlacementRecord, load: &[u64]) -> Vec<Option<f64>> {
    let e = p.num_experts;
    (0..p.num_layers)
        .map(|l| {
            let holders: Vec<Vec<usize>> = p.holders[l * e..(l + 1) * e]
                .iter()
                .map(|h| h.iter().map(|&k| k as usize).collect())
                .collect();
            let layer_load: Vec<u64> = (l * e..(l + 1) * e)
                .map(|x| load.get(x).copied().unwrap_or(0))
                .collect();
            let per_node = by_load::node_loads(&layer_load, &holders, p.nodes.len());
            let mut used = vec![false; p.nodes.len()];
            for &k in holders.iter().flatten() {
                used[k] = true;
            }
            by_load::balancedness(&per_node, &used)
        })
        .collect()
}

/// The mean of [`balancedness`] over the layers with load.
pub fn mean_balancedness(p: &PlacementRecord, load: &[u64]) -> Option<f64> {
    let known: Vec<f64> = balancedness(p, load).into_iter().flatten().collect();
    (!known.is_empty()).then(|| known.iter().sum::<f64>() / known.len() as f64)
}

fn check_capacity(input: &PlanInput<'_>) -> Result<(), PlanError> {
    if input.nodes.is_empty() {
        return Err(PlanError::NoNodes);
    }
    let experts = input.num_layers * input.num_experts;
    let have: usize = input.nodes.iter().map(|c| c.capacity).sum();
    if have < experts {
        return Err(PlanError::NoCapacity {
            need: experts,
            have,
        });
    }
    Ok(())
}

/// Current holders of each expert, as indices into `input.nodes` (dead nodes drop out).
fn current_holders(input: &PlanInput<'_>) -> Vec<Vec<usize>> {
    let experts = input.num_layers * input.num_experts;
    let index_of: HashMap<&str, usize> = input
        .nodes
        .iter()
        .enumerate()
        .map(|(i, c)| (c.id.as_str(), i))
        .collect();
    match input.current {
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
    }
}

/// The record for `holders` (indices into `input.nodes`): only nodes that hold
/// something appear, sorted by id.
fn record(input: &PlanInput<'_>, holders: Vec<Vec<usize>>, epoch: u64) -> PlacementRecord {
    let nodes = input.nodes;
    let n = nodes.len();
    let mut held = vec![false; n];
    for &i in holders.iter().flatten() {
        held[i] = true;
    }
    let mut used: Vec<usize> = (0..n).filter(|&i| held[i]).collect();
    used.sort_by(|&a, &b| nodes[a].id.cmp(&nodes[b].id));
    let mut slot = vec![u32::MAX; n];
    for (k, &i) in used.iter().enumerate() {
        slot[i] = k as u32;
    }
    PlacementRecord {
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
    }
}

/// How many copies each expert gets: as many as the current placement gives it (a
/// rebalance may have given a hot one more), at least `min_replicas`, at most one per
/// node.
fn copies_per_expert(input: &PlanInput<'_>) -> Vec<usize> {
    let experts = input.num_layers * input.num_experts;
    let n = input.nodes.len();
    let base = input.min_replicas.clamp(1, n);
    let now = |x: usize| match input.current {
        Some(p) if p.holders.len() == experts => p.holders[x].len(),
        _ => 0,
    };
    (0..experts).map(|x| base.max(now(x)).min(n)).collect()
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
    fn replicas_use_spare_memory_only_and_a_rebalances_copies_survive() {
        let nodes = cands(&[40, 40, 40]);
        let mut inp = input(&nodes, None);
        let p = plan(&inp, 1).unwrap();
        assert!(
            p.holders.iter().all(|h| h.len() == 1),
            "no load: one copy each"
        );
        inp.min_replicas = 2;
        let p = plan(&inp, 1).unwrap();
        assert!(p.holders.iter().all(|h| h.len() == 2));
        // Not enough memory for two copies of everything: the hottest get theirs first.
        let mut load = vec![10u64; 32];
        load[5] = 100;
        let tight = cands(&[12, 12, 12]);
        let mut inp = input(&tight, None);
        inp.load = &load;
        inp.min_replicas = 2;
        let p = plan(&inp, 1).unwrap();
        assert_eq!(p.holders[5].len(), 2);
        assert!(p.holders.iter().all(|h| !h.is_empty()));
        assert!(p.holders.iter().map(Vec::len).sum::<usize>() <= 36);

        // A hot expert's extra copies (from a rebalance) outlive a node's death, as
        // long as memory allows: its lost copy is placed again elsewhere.
        let four = cands(&[16, 16, 16, 16]);
        let mut inp = input(&four, None);
        inp.load = &load;
        let by_load = plan_by_load(&inp, 1).unwrap().unwrap();
        let hot_copies = by_load.holders[5].len();
        assert!(hot_copies >= 3, "{hot_copies}");
        let three = cands(&[16, 16, 16]);
        let after = plan(&input(&three, Some(&by_load)), 2).unwrap();
        assert_eq!(after.holders[5].len(), hot_copies.min(3));
        assert!(!after.contains_node("n3"));
        // Nothing a survivor held moved.
        let kept = pairs(&by_load).intersection(&pairs(&after)).count();
        let survivors = pairs(&by_load).iter().filter(|(_, id)| id != "n3").count();
        assert_eq!(kept, survivors);
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
