//! Hedged dispatch ("The Tail at Scale"): when a node's answer for a layer is later than
//! k times its own recent p99 for work of that size, the same work goes to replicas too
//! and whichever answers first is used. A gray node (slow, not dead) then costs each
//! layer about the hedge delay instead of its whole latency, and the hedge counters on
//! /metrics show it before it fails.

use std::collections::VecDeque;
use std::time::Duration;

/// When to hedge; `factor` 0 turns hedging off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hedging {
    /// Hedge after `factor` x the node's recent p99 for work of the same size...
    pub factor: f64,
    /// ...and never sooner than this.
    pub floor: Duration,
}

impl Default for Hedging {
    fn default() -> Self {
        Hedging {
            factor: 4.0,
            floor: Duration::from_millis(20),
        }
    }
}

impl Hedging {
    /// How long to wait for a node before hedging, given its recent p99; `None`: do not
    /// hedge (off, or too few answers seen to know what late is).
    pub fn after(&self, p99: Option<Duration>) -> Option<Duration> {
        if self.factor <= 0.0 {
            return None;
        }
        p99.map(|p| p.mul_f64(self.factor).max(self.floor))
    }
}

/// Recent answer times of one node, by work size (powers of two of the token count:
/// a prefill chunk's time says nothing about a decode step's).
#[derive(Debug, Default)]
pub struct LatencyWindow {
    buckets: Vec<VecDeque<Duration>>,
}

/// Answers kept per size.
const WINDOW: usize = 128;
/// Answers needed before a p99 is trusted.
const MIN_SAMPLES: usize = 16;
const SIZES: usize = 24;

fn bucket(tokens: usize) -> usize {
    (usize::BITS - tokens.max(1).leading_zeros()) as usize % SIZES
}

impl LatencyWindow {
    /// Records an answer that came (answers abandoned to a hedge are never seen, so a
    /// node that stays slow keeps being hedged rather than raising its own bar).
    pub fn record(&mut self, tokens: usize, took: Duration) {
        if self.buckets.is_empty() {
            self.buckets = vec![VecDeque::new(); SIZES];
        }
        let b = &mut self.buckets[bucket(tokens)];
        if b.len() == WINDOW {
            b.pop_front();
        }
        b.push_back(took);
    }

    pub fn p99(&self, tokens: usize) -> Option<Duration> {
        let b = self.buckets.get(bucket(tokens))?;
        if b.len() < MIN_SAMPLES {
            return None;
        }
        let mut sorted: Vec<Duration> = b.iter().copied().collect();
        sorted.sort_unstable();
        // Nearest rank.
        let rank = (sorted.len() * 99).div_ceil(100).max(1);
        sorted.get(rank - 1).copied()
    }
}

/// A node is slow on the wire in a layer when its answer's time outside compute (the
/// link, both ways, and its queue) exceeds the median of the other nodes' in that layer
/// by this factor...
const OUTLIER_FACTOR: u32 = 4;
/// ...plus this much (a shared machine's scheduling jitter is a few milliseconds).
const OUTLIER_MARGIN: Duration = Duration::from_millis(2);
/// Layers in a row a node must be such an outlier before planning avoids it: one
/// descheduled process is not a slow link, a slow link is slow every time.
pub const OUTLIER_STREAK: u32 = 3;

/// Which of one layer's answers, `(node, time outside compute)`, were outliers: far later
/// than the others' median. Hedging catches a node late by k x its *own* p99; this
/// catches one that is consistently slower than its peers (a slow link under the hedge
/// floor: its own p99 rises with it, so it would never be hedged), whose replicas could
/// answer sooner. Needs two other answers to compare against.
pub fn wire_outliers(answers: &[(usize, Duration)]) -> Vec<usize> {
    if answers.len() < 3 {
        return Vec::new();
    }
    // One sort per layer: the upper median of the others is the whole list's element
    // at `mid` when the answer itself sits above it, else the next one.
    let mut sorted: Vec<Duration> = answers.iter().map(|&(_, w)| w).collect();
    sorted.sort_unstable();
    let mid = (answers.len() - 1) / 2;
    answers
        .iter()
        .filter(|&&(_, wire)| {
            let median = if wire > sorted[mid] {
                sorted[mid]
            } else {
                sorted[mid + 1]
            };
            wire > median * OUTLIER_FACTOR + OUTLIER_MARGIN
        })
        .map(|&(node, _)| node)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_p99_is_per_size_and_needs_enough_answers() {
        let mut w = LatencyWindow::default();
        assert_eq!(w.p99(1), None);
        for i in 0..100 {
            w.record(1, MS * (i + 1));
        }
        assert_eq!(w.p99(1), Some(MS * 99));
        // Another size class knows nothing yet.
        assert_eq!(w.p99(512), None);
        for _ in 0..(2 * WINDOW) {
            w.record(3, MS * 5);
        }
        assert_eq!(w.p99(2), Some(MS * 5), "2 and 3 tokens share a class");
        // The window forgets: old slow answers leave it.
        for _ in 0..WINDOW {
            w.record(1, MS);
        }
        assert_eq!(w.p99(1), Some(MS));
    }

    #[test]
    fn hedging_waits_k_times_the_p99_and_at_least_the_floor() {
        let h = Hedging {
            factor: 4.0,
            floor: MS * 20,
        };
        assert_eq!(h.after(None), None);
        assert_eq!(h.after(Some(MS)), Some(MS * 20));
        assert_eq!(h.after(Some(MS * 10)), Some(MS * 40));
        let off = Hedging { factor: 0.0, ..h };
        assert_eq!(off.after(Some(MS)), None);
    }

    #[test]
    fn an_outlier_is_far_slower_than_the_median_of_the_others() {
        let us = Duration::from_micros(1);
        // Jitter within 4x + 2 ms of the others is no outlier.
        assert!(wire_outliers(&[(0, 300 * us), (1, 500 * us), (2, 3 * MS)]).is_empty());
        // 8 ms against 0.3-0.5 ms is.
        assert_eq!(
            wire_outliers(&[(0, 300 * us), (1, 500 * us), (2, 400 * us), (3, 8 * MS)]),
            vec![3]
        );
        // The others' median decides what normal is: two slow of three flag nothing,
        // two slow of four (each one's others mostly fast) flag both.
        assert!(wire_outliers(&[(0, 9 * MS), (1, 8 * MS), (2, 300 * us)]).is_empty());
        assert_eq!(
            wire_outliers(&[(0, 9 * MS), (1, 8 * MS), (2, 300 * us), (3, 400 * us)]),
            vec![0, 1]
        );
        // Two answers say nothing about which one is odd.
        assert!(wire_outliers(&[(0, 300 * us), (1, 50 * MS)]).is_empty());
    }
}
