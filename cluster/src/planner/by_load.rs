//! Placement by measured load: how many copies each expert gets and which nodes hold
//! them, so that every node computes about the same number of tokens per layer.
//!
//! DeepSeek's EPLB without its node groups (we place on nodes, not GPUs within nodes):
//! replicate (every spare slot goes to the expert whose copies carry the most tokens
//! each), then pack (copies heaviest first, each on the least-loaded node that has a
//! free slot in that layer and no copy of that expert yet), then one pass of moves and
//! swaps off the most loaded node while they lower its load. Fewer extra copies are
//! packed too, and the plan with the lowest peak is kept. Tokens of an expert are
//! assumed to split evenly over its copies, which is what dispatch does (it sends each
//! token to the copy with the fewest tokens so far).
//!
//! Slots are per layer: a node with capacity C holds about C / layers experts of each
//! layer, so that balancing one layer never starves another of memory.

use super::Candidate;

/// Stop replicating once no copy carries more than this fraction of a node's fair
/// share of a layer's tokens: packing then lands within about that of the optimum,
/// and further copies only cost memory and weight loads.
const SMALLEST_USEFUL_PIECE: f64 = 0.05;

/// Copies of each expert of one layer, on node indices: `holders[e]`.
pub type LayerHolders = Vec<Vec<usize>>;

/// Slots each node has in `layer`: its capacity spread over the layers, the remainder
/// one each in layers that differ from node to node (so no layer gets all of them).
pub fn layer_slots(nodes: &[Candidate], num_layers: usize, layer: usize) -> Vec<usize> {
    let layers = num_layers.max(1);
    nodes
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let extra = (layer + layers - i % layers) % layers < c.capacity % layers;
            c.capacity / layers + usize::from(extra)
        })
        .collect()
}

/// One layer's placement, a function of `load[e]` (expert e's routed tokens) and the
/// slots alone, so that an unchanged load always gives an unchanged plan. `None` when
/// the slots cannot hold `min_copies` of every expert (capped at one per node).
pub fn place_layer(load: &[u64], slots: &[usize], min_copies: usize) -> Option<LayerHolders> {
    let n = slots.len();
    let experts = load.len();
    let base = min_copies.clamp(1, n.max(1));
    // `base` copies on distinct nodes fit exactly when this holds.
    let usable: usize = slots.iter().map(|&s| s.min(experts)).sum();
    if n == 0 || usable < experts * base {
        return None;
    }
    // Every spare slot filled is not always best: an extra copy that lands on a node
    // with few slots can crowd out a whole expert that needed it (and the improvement
    // pass moves one copy at a time, so it cannot undo that). Fewer extra copies are
    // tried too, and the lowest peak wins; ties go to more copies.
    let spare = usable - experts * base;
    let mut tried: Vec<Vec<usize>> = Vec::new();
    let mut best: Option<(f64, LayerHolders)> = None;
    for extra in extra_copy_counts(spare) {
        let copies = replicate(load, experts * base + extra, base, n);
        if tried.contains(&copies) {
            continue;
        }
        // Heaviest copies first is the better packing; the `base` copies of every
        // expert first cannot fail to find distinct nodes. Try the first, fall back to
        // the second.
        let packed = [false, true]
            .into_iter()
            .map(|base_first| pack(load, &copies, slots, base, base_first))
            .find(|h| h.iter().all(|c| c.len() >= base));
        tried.push(copies);
        let Some(h) = packed else { continue };
        let peak = node_loads(load, &h, n).into_iter().fold(0.0, f64::max);
        if best.as_ref().is_none_or(|(b, _)| peak < *b - 1e-9) {
            best = Some((peak, h));
        }
    }
    best.map(|(_, h)| h)
}

/// The numbers of extra copies tried, most first: all of them up to 4 spare slots,
/// else 5 spread evenly down to none. Each try is a packing and an improvement pass:
/// 256 experts on 8 to 32 nodes take 4 to 36 ms a layer for all five, 3 to 6 times one.
fn extra_copy_counts(spare: usize) -> Vec<usize> {
    const TRIES: usize = 4;
    if spare <= TRIES {
        return (0..=spare).rev().collect();
    }
    (0..=TRIES).rev().map(|i| spare * i / TRIES).collect()
}

/// Copies per expert: `base` each where the slots allow (hottest first when not), then
/// EPLB's rule for the rest: one more copy of the expert with the most tokens per copy,
/// never more copies than nodes.
pub fn replicate(load: &[u64], slots: usize, base: usize, nodes: usize) -> Vec<usize> {
    let experts = load.len();
    let mut copies = vec![1usize; experts];
    let mut spare = slots.saturating_sub(experts);
    let mut hottest: Vec<usize> = (0..experts).collect();
    hottest.sort_by_key(|&e| (std::cmp::Reverse(load[e]), e));
    for _ in 1..base {
        for &e in &hottest {
            if spare == 0 {
                return copies;
            }
            copies[e] += 1;
            spare -= 1;
        }
    }
    let total: u64 = load.iter().sum();
    let floor = SMALLEST_USEFUL_PIECE * total as f64 / nodes.max(1) as f64;
    while spare > 0 {
        let per_copy = |e: usize| load[e] as f64 / copies[e] as f64;
        let Some(e) = (0..experts)
            .filter(|&e| copies[e] < nodes)
            .max_by(|&a, &b| per_copy(a).total_cmp(&per_copy(b)).then(b.cmp(&a)))
        else {
            break;
        };
        if total == 0 || per_copy(e) <= floor {
            break;
        }
        copies[e] += 1;
        spare -= 1;
    }
    copies
}

/// Tokens each node computes, with every expert's tokens split evenly over its copies.
pub fn node_loads(load: &[u64], holders: &[Vec<usize>], nodes: usize) -> Vec<f64> {
    let mut per_node = vec![0.0; nodes];
    for (e, h) in holders.iter().enumerate() {
        let piece = load.get(e).copied().unwrap_or(0) as f64 / h.len().max(1) as f64;
        for &i in h {
            if let Some(slot) = per_node.get_mut(i) {
                *slot += piece;
            }
        }
    }
    per_node
}

/// Mean over max of the node loads of the nodes in `used` (1.0: perfectly even);
/// `None` when none of them computes anything.
pub fn balancedness(per_node: &[f64], used: &[bool]) -> Option<f64> {
    let loads: Vec<f64> = per_node
        .iter()
        .zip(used)
        .filter(|(_, u)| **u)
        .map(|(l, _)| *l)
        .collect();
    let max = loads.iter().copied().fold(0.0, f64::max);
    (max > 0.0).then(|| loads.iter().sum::<f64>() / loads.len() as f64 / max)
}

/// Longest-processing-time-first packing under per-node slot counts and distinct
/// holders (each copy on the least-loaded node that can take it), then local
/// improvement. With `base_first`, every expert's first `base` copies are placed before
/// any further ones.
fn pack(
    load: &[u64],
    copies: &[usize],
    slots: &[usize],
    base: usize,
    base_first: bool,
) -> LayerHolders {
    let n = slots.len();
    let piece = |e: usize| load[e] as f64 / copies[e] as f64;
    // (expert, which copy): heaviest first, an expert's copies together.
    let mut order: Vec<(usize, usize)> = (0..load.len())
        .flat_map(|e| (0..copies[e]).map(move |k| (e, k)))
        .collect();
    order.sort_by(|&(a, k), &(b, j)| {
        let late = |k: usize| base_first && k >= base;
        late(k)
            .cmp(&late(j))
            .then(piece(b).total_cmp(&piece(a)))
            .then(a.cmp(&b))
            .then(k.cmp(&j))
    });
    let mut holders: LayerHolders = vec![Vec::new(); load.len()];
    let mut used = vec![0usize; n];
    let mut node_load = vec![0.0f64; n];
    for (e, k) in order {
        let free = |i: usize| slots[i] - used[i];
        // The `base` copies, when they come first, go where the most slots are free:
        // then they always find distinct nodes when the slots can hold them at all.
        let roomiest = base_first && k < base;
        let pick = (0..n)
            .filter(|&i| used[i] < slots[i] && !holders[e].contains(&i))
            .min_by(|&a, &b| {
                let by_load = node_load[a].total_cmp(&node_load[b]);
                let by_room = free(b).cmp(&free(a));
                if roomiest {
                    by_room.then(by_load)
                } else {
                    by_load.then(by_room)
                }
                .then(a.cmp(&b))
            });
        if let Some(i) = pick {
            holders[e].push(i);
            used[i] += 1;
            node_load[i] += piece(e);
        }
    }
    // A copy that found no node leaves its expert's others heavier than planned:
    // `improve` works from the real loads.
    improve(load, &mut holders, slots, base);
    for h in &mut holders {
        h.sort_unstable();
    }
    holders
}

/// Moves a copy off the most loaded node, swaps it with a lighter copy elsewhere, or
/// drops it where its expert has more than `base` copies (its tokens then go to the
/// others: a copy in a slot that a whole expert needed), while that lowers the most
/// loaded node's load without raising another above it.
fn improve(load: &[u64], holders: &mut LayerHolders, slots: &[usize], base: usize) {
    let n = slots.len();
    let piece = |h: &LayerHolders, e: usize| load[e] as f64 / h[e].len().max(1) as f64;
    // Each accepted step strictly lowers the sorted load vector; the cap only bounds
    // the cost on pathological inputs.
    for _ in 0..4 * holders.len() * n {
        let loads = node_loads(load, holders, n);
        let Some(top) = (0..n).max_by(|&a, &b| loads[a].total_cmp(&loads[b]).then(b.cmp(&a)))
        else {
            return;
        };
        let peak = loads[top];
        let used = |i: usize| holders.iter().filter(|h| h.contains(&i)).count();
        // (peak after, expert, swapped-in expert, node it goes to; none: dropped).
        let mut best: Option<(f64, usize, Option<usize>, Option<usize>)> = None;
        for e in (0..holders.len()).filter(|&e| holders[e].contains(&top)) {
            let w = piece(holders, e);
            let copies = holders[e].len();
            if copies > base {
                let grown = load[e] as f64 / (copies - 1) as f64 - w;
                let others = holders[e]
                    .iter()
                    .filter(|&&i| i != top)
                    .map(|&i| loads[i] + grown)
                    .fold(0.0, f64::max);
                let new_peak = (peak - w).max(others);
                if new_peak < peak - 1e-9 && best.is_none_or(|b| new_peak < b.0) {
                    best = Some((new_peak, e, None, None));
                }
            }
            for other in (0..n).filter(|&i| i != top && !holders[e].contains(&i)) {
                // A move, if the other node has a free slot.
                if used(other) < slots[other] {
                    let new_peak = (peak - w).max(loads[other] + w);
                    if new_peak < peak - 1e-9 && best.is_none_or(|b| new_peak < b.0) {
                        best = Some((new_peak, e, None, Some(other)));
                    }
                }
                // A swap with a lighter copy of an expert `top` does not hold.
                for f in (0..holders.len())
                    .filter(|&f| holders[f].contains(&other) && !holders[f].contains(&top))
                {
                    let v = piece(holders, f);
                    if v >= w {
                        continue;
                    }
                    let new_peak = (peak - w + v).max(loads[other] - v + w);
                    if new_peak < peak - 1e-9 && best.is_none_or(|b| new_peak < b.0) {
                        best = Some((new_peak, e, Some(f), Some(other)));
                    }
                }
            }
        }
        let Some((_, e, swap, to)) = best else {
            return;
        };
        let Some(other) = to else {
            holders[e].retain(|&i| i != top);
            continue;
        };
        for h in holders[e].iter_mut().filter(|i| **i == top) {
            *h = other;
        }
        if let Some(f) = swap {
            for h in holders[f].iter_mut().filter(|i| **i == other) {
                *h = top;
            }
        }
    }
}

#[cfg(test)]
#[path = "by_load_tests.rs"]
mod tests;
