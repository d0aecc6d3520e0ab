//! Expert load balance across nodes: per (MoE layer, node), the (token, expert)
//! assignments that the primary dispatch planned for the node (not hedges, not retries),
//! over a sliding window, and per layer their **balancedness**: the mean over nodes of
//! the assignments divided by the max over nodes (1.0: every node got the same; 1/N: one
//! node of N got everything).
//!
//! The window is a ring of [`BUCKETS`] buckets of [`BUCKET`] each (6 x 5 s): a bucket
//! counts the assignments planned in one 5 s period, and the window holds the current
//! (partial) period and the 5 before it, so it spans the last 25 to 30 s. A bucket is
//! zeroed when its ring slot is reused for a newer period.
//!
//! Counts are indexed `layer * nodes + node`, by the node indices of one topology (they
//! change with the placement): the window is reset when dispatch moves to a newer
//! topology (a published placement, a recovery load), identified by a generation number
//! that only grows. Work planned on an older topology after the switch is dropped.
//!
//! The nodes in a layer's mean are those that hold some expert of that layer in the
//! placement, even when they got nothing (a dead node whose work went to its replicas
//! counts as an idle one). A layer that got no tokens in the window has no balancedness.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::placement::Placement;

/// One bucket of the window.
pub const BUCKET: Duration = Duration::from_secs(5);
/// Buckets in the window: the current period and `BUCKETS - 1` before it.
pub const BUCKETS: usize = 6;

/// Mean over `counts` divided by their max; `None` when there are none or all are 0.
pub fn balancedness(counts: impl IntoIterator<Item = u64>) -> Option<f64> {
    let (mut nodes, mut sum, mut max) = (0u64, 0u64, 0u64);
    for c in counts {
        nodes += 1;
        sum += c;
        max = max.max(c);
    }
    if max == 0 {
        return None;
    }
    let mean = sum as f64 / nodes as f64;
    Some(mean / max as f64)
}

/// Per (layer, node) assignment counts over the last [`BUCKETS`] x [`BUCKET`].
pub struct BalanceWindow {
    state: Mutex<State>,
}

struct State {
    /// Periods are counted from here.
    origin: Instant,
    /// The topology generation counted; `None` before the first record.
    generation: Option<u64>,
    layers: usize,
    nodes: usize,
    /// `layer * nodes + node`: whether the node holds some expert of the layer.
    holds: Vec<bool>,
    /// The period each ring slot counts ([`UNUSED`]: none yet).
    periods: [u64; BUCKETS],
    /// Ring slot `i`'s counts at `i * layers * nodes ..`, each `layer * nodes + node`.
    counts: Vec<u64>,
}

const UNUSED: u64 = u64::MAX;

impl Default for BalanceWindow {
    fn default() -> Self {
        Self::new(Instant::now())
    }
}

impl BalanceWindow {
    /// An empty window whose periods start at `origin`.
    pub fn new(origin: Instant) -> Self {
        BalanceWindow {
            state: Mutex::new(State {
                origin,
                generation: None,
                layers: 0,
                nodes: 0,
                holds: Vec::new(),
                periods: [UNUSED; BUCKETS],
                counts: Vec::new(),
            }),
        }
    }

    /// Adds one layer's planned work at `now`: `per_node[n]` assignments for node `n` of
    /// the topology of `generation`, whose placement is `placement`. A newer generation
    /// than the one counted resets the window (the only allocation, once per topology);
    /// an older one is ignored.
    pub fn record(
        &self,
        now: Instant,
        generation: u64,
        placement: &Placement,
        layer: usize,
        per_node: impl IntoIterator<Item = u64>,
    ) {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match s.generation {
            Some(g) if generation < g => return,
            Some(g) if generation == g => {}
            _ => s.reset(generation, placement),
        }
        if layer >= s.layers {
            return;
        }
        let period = s.period_of(now);
        let slot = (period % BUCKETS as u64) as usize;
        let stride = s.layers * s.nodes;
        if s.periods[slot] != period {
            s.periods[slot] = period;
            s.counts[slot * stride..(slot + 1) * stride].fill(0);
        }
        let base = slot * stride + layer * s.nodes;
        let nodes = s.nodes;
        for (c, add) in s.counts[base..base + nodes].iter_mut().zip(per_node) {
            *c += add;
        }
    }

    /// Per layer, the assignments of each node of the placement over the window ending at
    /// `now`, for the topology of `generation` (`None` per layer for any other: the
    /// window restarts with the first layer dispatched on it).
    pub fn counts(&self, now: Instant, generation: u64) -> Vec<Option<Vec<u64>>> {
        let s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (layers, nodes) = (s.layers, s.nodes);
        if s.generation != Some(generation) {
            return vec![None; layers];
        }
        let period = s.period_of(now);
        let stride = layers * nodes;
        let mut total = vec![0u64; stride];
        for (slot, &p) in s.periods.iter().enumerate() {
            if p == UNUSED || p > period || period - p >= BUCKETS as u64 {
                continue;
            }
            for (t, c) in total.iter_mut().zip(&s.counts[slot * stride..]) {
                *t += c;
            }
        }
        (0..layers)
            .map(|l| {
                let row = l * nodes..(l + 1) * nodes;
                let counts: Vec<u64> = total[row.clone()]
                    .iter()
                    .zip(&s.holds[row])
                    .filter(|&(&c, &holds)| holds || c > 0)
                    .map(|(&c, _)| c)
                    .collect();
                counts.iter().any(|&c| c > 0).then_some(counts)
            })
            .collect()
    }

    /// Per layer, the balancedness over the window ending at `now` (see [`Self::counts`]).
    pub fn balancedness(&self, now: Instant, generation: u64) -> Vec<Option<f64>> {
        self.counts(now, generation)
            .into_iter()
            .map(|c| c.and_then(balancedness))
            .collect()
    }
}

impl State {
    fn period_of(&self, now: Instant) -> u64 {
        let since = now.saturating_duration_since(self.origin).as_nanos();
        u64::try_from(since / BUCKET.as_nanos()).unwrap_or(UNUSED - 1)
    }

    fn reset(&mut self, generation: u64, placement: &Placement) {
        let (layers, nodes) = (placement.num_layers(), placement.num_nodes());
        self.generation = Some(generation);
        self.layers = layers;
        self.nodes = nodes;
        self.holds = vec![false; layers * nodes];
        for l in 0..layers {
            for e in 0..placement.num_experts() {
                for &n in placement.holders(l, e) {
                    if n < nodes {
                        self.holds[l * nodes + n] = true;
                    }
                }
            }
        }
        self.periods = [UNUSED; BUCKETS];
        self.counts = vec![0; BUCKETS * layers * nodes];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balancedness_of_hand_made_counts() {
        assert_eq!(balancedness([7, 7, 7, 7]), Some(1.0));
        assert_eq!(balancedness([12, 0, 0, 0]), Some(0.25));
        assert_eq!(balancedness([4, 2]), Some(0.75));
        assert_eq!(balancedness([5]), Some(1.0));
        assert_eq!(balancedness([0, 0, 0]), None);
        assert_eq!(balancedness([]), None);
    }

    /// 2 layers of 4 experts on 4 nodes, one copy each: every node holds one expert of
    /// each layer.
    fn four_nodes() -> Placement {
        Placement::round_robin(2, 4, 4, 1).unwrap()
    }

    #[test]
    fn a_window_sums_its_buckets_per_layer() {
        let t0 = Instant::now();
        let w = BalanceWindow::new(t0);
        let p = four_nodes();
        w.record(t0, 1, &p, 0, [3, 3, 3, 3]);
        w.record(t0 + BUCKET, 1, &p, 0, [1, 1, 1, 1]);
        w.record(t0 + BUCKET * 2, 1, &p, 1, [8, 0, 0, 0]);
        let now = t0 + BUCKET * 2;
        assert_eq!(
            w.counts(now, 1),
            vec![Some(vec![4, 4, 4, 4]), Some(vec![8, 0, 0, 0])]
        );
        assert_eq!(w.balancedness(now, 1), vec![Some(1.0), Some(0.25)]);
        // Out-of-range layers and extra nodes are ignored.
        w.record(now, 1, &p, 2, [1, 1, 1, 1]);
        w.record(now, 1, &p, 1, [0, 0, 0, 8, 99]);
        assert_eq!(w.balancedness(now, 1), vec![Some(1.0), Some(0.5)]);
    }

    #[test]
    fn old_buckets_leave_the_window() {
        let t0 = Instant::now();
        let w = BalanceWindow::new(t0);
        let p = four_nodes();
        w.record(t0, 1, &p, 0, [8, 0, 0, 0]);
        w.record(t0 + BUCKET, 1, &p, 0, [0, 8, 8, 8]);
        // Still inside at the last period of the window.
        let last = t0 + BUCKET * (BUCKETS as u32 - 1);
        assert_eq!(w.counts(last, 1)[0], Some(vec![8, 8, 8, 8]));
        // One period later the first bucket is out, the second still in.
        let later = t0 + BUCKET * BUCKETS as u32;
        assert_eq!(w.counts(later, 1)[0], Some(vec![0, 8, 8, 8]));
        assert_eq!(w.balancedness(later, 1)[0], Some(0.75));
        // Its ring slot reused for a new period starts from zero.
        w.record(later, 1, &p, 0, [1, 0, 0, 0]);
        assert_eq!(w.counts(later, 1)[0], Some(vec![1, 8, 8, 8]));
        // Once everything is out, the layer has no balancedness (the other never had).
        let empty = t0 + BUCKET * (2 * BUCKETS as u32 + 1);
        assert_eq!(w.balancedness(empty, 1), vec![None, None]);
    }

    #[test]
    fn a_newer_topology_resets_the_window_and_older_ones_are_ignored() {
        let t0 = Instant::now();
        let w = BalanceWindow::new(t0);
        w.record(t0, 1, &four_nodes(), 0, [8, 0, 0, 0]);
        assert_eq!(w.balancedness(t0, 1)[0], Some(0.25));
        // Not dispatched on the new topology yet: nothing to say about it.
        assert_eq!(w.balancedness(t0, 2), vec![None, None]);
        // 2 nodes now: the old counts are gone, indices are the new topology's.
        let two = Placement::round_robin(2, 4, 2, 1).unwrap();
        w.record(t0, 2, &two, 0, [3, 3]);
        assert_eq!(w.counts(t0, 2), vec![Some(vec![3, 3]), None]);
        // A layer planned on the old topology after the switch is dropped.
        w.record(t0, 1, &four_nodes(), 0, [9, 9, 9, 9]);
        assert_eq!(w.counts(t0, 2), vec![Some(vec![3, 3]), None]);
        assert_eq!(w.balancedness(t0, 1), vec![None, None]);
    }

    #[test]
    fn nodes_without_experts_of_a_layer_are_not_in_its_mean() {
        // Layer 0's experts on nodes 0 and 1 only, layer 1's on all three.
        let p = Placement::from_holders(2, 2, 3, vec![vec![0], vec![1], vec![0, 1, 2], vec![2]])
            .unwrap();
        let t0 = Instant::now();
        let w = BalanceWindow::new(t0);
        w.record(t0, 0, &p, 0, [4, 4, 0]);
        w.record(t0, 0, &p, 1, [4, 0, 0]);
        assert_eq!(w.counts(t0, 0), vec![Some(vec![4, 4]), Some(vec![4, 0, 0])]);
        assert_eq!(w.balancedness(t0, 0)[0], Some(1.0));
        assert_eq!(w.balancedness(t0, 0)[1], Some(4.0 / 3.0 / 4.0));
    }
}
