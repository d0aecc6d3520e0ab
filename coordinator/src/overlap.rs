//! `--micro-batches auto`: split a step in two only where that is measured to be faster.
//!
//! Whether two micro-batches pay depends on things the coordinator cannot know up front:
//! overlap hides the wire's round trip behind the other micro-batch's attention, but each
//! half re-reads the layer's expert and dense weights, and on a machine whose expert nodes
//! share the coordinator's cores the nodes' time grows as much as the wire's shrinks
//! (BENCHMARKS.md, "Across a link"). So `auto` measures. The rule:
//! - a step is a candidate when it has at least [`MIN_SEQUENCES`] sequences and the engine
//!   may split it without changing a bit ([`switchyard_engine::max_micro_batches`]);
//! - candidates fall into classes by sequence count (4-7, 8-15, 16-31, 32+), because the
//!   gain depends on the batch size;
//! - in each class the scheduler times steps unsplit and split, in turns, until each has
//!   [`WARMUP`] samples, then runs the faster (by the mean seconds per token of recent
//!   steps) and the other once every [`PROBE_EVERY`] candidates, so a change of load or
//!   link is noticed. Outputs are bit-identical either way, so only speed is at stake: a
//!   probe of the slower choice costs at most 1/[`PROBE_EVERY`] of its difference.

use std::time::Duration;

/// Fewer sequences than this are never split: the halves are too small to hide anything
/// behind, and each re-reads every weight.
pub const MIN_SEQUENCES: usize = 4;
/// Timed steps of each choice, per class, before the faster is preferred.
pub const WARMUP: u32 = 6;
/// Once warmed up, one candidate in this many runs the other choice.
pub const PROBE_EVERY: u32 = 32;
/// Weight of the newest step in a choice's running mean.
const ALPHA: f64 = 0.2;
const CLASSES: usize = 4;

/// Per class of batch size, which of one or two micro-batches has been faster lately.
#[derive(Debug, Default)]
pub struct MicroBatchTuner {
    classes: [Class; CLASSES],
}

#[derive(Debug, Default, Clone, Copy)]
struct Class {
    /// Running mean of seconds per token, unsplit [0] and split [1].
    cost: [Option<f64>; 2],
    samples: [u32; 2],
    /// Candidates seen since warm-up, to schedule probes.
    since_probe: u32,
}

impl MicroBatchTuner {
    /// How many micro-batches to run a step of `sequences` sequences in, where the engine
    /// allows up to `allowed`.
    pub fn choose(&mut self, sequences: usize, allowed: usize) -> usize {
        let Some(class) = class_of(sequences) else {
            return 1;
        };
        if allowed < 2 {
            return 1;
        }
        let c = &mut self.classes[class];
        if c.samples[0] < WARMUP || c.samples[1] < WARMUP {
            // Alternate: the choice with fewer samples goes next.
            return if c.samples[1] < c.samples[0] { 2 } else { 1 };
        }
        let faster = match (c.cost[0], c.cost[1]) {
            (Some(one), Some(two)) if two < one => 1,
            _ => 0,
        };
        c.since_probe += 1;
        let pick = if c.since_probe >= PROBE_EVERY {
            c.since_probe = 0;
            1 - faster
        } else {
            faster
        };
        pick + 1
    }

    /// Records how long a step chosen by [`MicroBatchTuner::choose`] took.
    pub fn record(
        &mut self,
        sequences: usize,
        micro_batches: usize,
        tokens: usize,
        took: Duration,
    ) {
        let Some(class) = class_of(sequences) else {
            return;
        };
        if tokens == 0 || !(1..=2).contains(&micro_batches) {
            return;
        }
        let arm = micro_batches - 1;
        let c = &mut self.classes[class];
        let per_token = took.as_secs_f64() / tokens as f64;
        c.cost[arm] = Some(match c.cost[arm] {
            Some(mean) => mean + ALPHA * (per_token - mean),
            None => per_token,
        });
        c.samples[arm] = c.samples[arm].saturating_add(1);
    }
}

fn class_of(sequences: usize) -> Option<usize> {
    (sequences >= MIN_SEQUENCES).then(|| {
        let c = (sequences / MIN_SEQUENCES).ilog2() as usize;
        c.min(CLASSES - 1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `steps` candidates of `sequences` sequences whose per-token cost is `cost(n)`
    /// for n micro-batches; returns how many ran split.
    fn drive(
        t: &mut MicroBatchTuner,
        sequences: usize,
        steps: u32,
        cost: impl Fn(usize) -> f64,
    ) -> u32 {
        let mut split = 0;
        for _ in 0..steps {
            let n = t.choose(sequences, 2);
            split += u32::from(n == 2);
            let took = Duration::from_secs_f64(cost(n) * sequences as f64);
            t.record(sequences, n, sequences, took);
        }
        split
    }

    #[test]
    fn small_or_unsplittable_steps_are_never_split() {
        let mut t = MicroBatchTuner::default();
        for seqs in 0..MIN_SEQUENCES {
            assert_eq!(t.choose(seqs, 8), 1);
        }
        assert_eq!(t.choose(32, 1), 1);
    }

    #[test]
    fn settles_on_the_faster_choice_and_probes_the_other_rarely() {
        let mut t = MicroBatchTuner::default();
        let warm = 2 * WARMUP;
        drive(&mut t, 16, warm, |n| if n == 2 { 1.0 } else { 1.3 });
        let split = drive(
            &mut t,
            16,
            10 * PROBE_EVERY,
            |n| if n == 2 { 1.0 } else { 1.3 },
        );
        assert_eq!(
            split,
            10 * PROBE_EVERY - 10,
            "one probe of the slower in {PROBE_EVERY}"
        );

        let mut t = MicroBatchTuner::default();
        drive(&mut t, 16, warm, |n| if n == 2 { 1.2 } else { 1.0 });
        let split = drive(
            &mut t,
            16,
            10 * PROBE_EVERY,
            |n| if n == 2 { 1.2 } else { 1.0 },
        );
        assert_eq!(split, 10, "only the probes are split");
    }

    #[test]
    fn notices_when_the_choice_it_avoids_gets_better() {
        let mut t = MicroBatchTuner::default();
        drive(
            &mut t,
            8,
            20 * PROBE_EVERY,
            |n| if n == 2 { 1.2 } else { 1.0 },
        );
        // Splitting gets cheaper (say, the nodes moved to their own cores). Only the probes
        // of it see that; a few are enough.
        let later = |n| if n == 2 { 0.8 } else { 1.0 };
        drive(&mut t, 8, 8 * PROBE_EVERY, later);
        let split = drive(&mut t, 8, 4 * PROBE_EVERY, later);
        assert_eq!(split, 4 * PROBE_EVERY - 4);
    }

    #[test]
    fn classes_learn_separately() {
        let mut t = MicroBatchTuner::default();
        // Splitting pays at 32 sequences and loses at 4.
        for _ in 0..10 * PROBE_EVERY {
            drive(&mut t, 32, 1, |n| if n == 2 { 1.0 } else { 1.5 });
            drive(&mut t, 4, 1, |n| if n == 2 { 1.5 } else { 1.0 });
        }
        let split = drive(
            &mut t,
            32,
            PROBE_EVERY - 1,
            |n| if n == 2 { 1.0 } else { 1.5 },
        );
        assert!(split >= PROBE_EVERY - 2, "{split}");
        assert!(
            drive(&mut t, 4, PROBE_EVERY - 1, |n| if n == 2 {
                1.5
            } else {
                1.0
            }) <= 1
        );
    }
}
