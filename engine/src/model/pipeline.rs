//! The layer loop, over one batch or over micro-batches in ping-pong.
//!
//! With two micro-batches A and B, each MoE layer's routed experts of one are away (on the
//! wire, on the nodes) while this thread runs the other's attention, router and shared
//! expert: per layer, `A: finish(l-1), attend(l), start(l)`, then the same for B. The
//! experts' blocking `forward` runs on a scoped helper thread, so the KV cache stays on
//! this one and nothing else changes shape. With one micro-batch the experts are called
//! inline, as before.
//!
//! A split changes no result bit when every matrix product keeps the kernel it would have
//! had unsplit: `ops::matmul_wt` rounds a row the same way for any number of rows on the
//! same side of [`SKINNY_MAX_ROWS`], and differently across it. So a batch is split only
//! when it has at most that many tokens (then every product, expert groups included, has
//! at most that many rows either way).

use std::ops::Range;
use std::thread::ScopedJoinHandle;

use super::{Model, ModelError, SeqChunk};
use crate::experts::{ExpertError, Experts};
use crate::kv_cache::PagedKvCache;
use crate::layers::{AttentionInput, RoutedWork, Span, add};
use crate::ops::{SKINNY_MAX_ROWS, rms_norm};
use crate::router::Routing;

/// The most micro-batches a step of `tokens` tokens in `chunks` chunks may be split into
/// without changing a bit of its result (see the module comment).
pub fn max_micro_batches(tokens: usize, chunks: usize) -> usize {
    if tokens <= SKINNY_MAX_ROWS {
        chunks.max(1)
    } else {
        1
    }
}

/// Contiguous chunk ranges, `parts` of them (fewer if there are fewer chunks), with token
/// counts as even as whole chunks allow.
pub fn split(lens: &[usize], parts: usize) -> Vec<Range<usize>> {
    let parts = parts.clamp(1, lens.len().max(1));
    let total: usize = lens.iter().sum();
    let mut ranges = Vec::with_capacity(parts);
    let (mut start, mut seen) = (0, 0);
    for (i, len) in lens.iter().enumerate() {
        seen += len;
        let done = ranges.len() + 1;
        let chunks_left = lens.len() - (i + 1);
        let parts_left = parts - done;
        // Close this part once it holds its share, keeping a chunk for every later part.
        if done < parts && (seen * parts >= total * done || chunks_left == parts_left) {
            ranges.push(start..i + 1);
            start = i + 1;
        }
    }
    ranges.push(start..lens.len());
    ranges
}

/// One micro-batch's state between layers.
pub(super) struct MicroBatch {
    pub chunks: Range<usize>,
    /// Rows relative to this micro-batch.
    pub spans: Vec<Span>,
    pub rows: usize,
    /// The residual stream, `[rows, hidden]`.
    pub x: Vec<f32>,
    normed: Vec<f32>,
    pub trace: Vec<Routing>,
}

impl MicroBatch {
    pub fn new(chunks: Range<usize>, spans: &[Span], x: Vec<f32>, hidden: usize) -> Self {
        let first = spans.first().map_or(0, |s| s.row);
        let spans: Vec<Span> = spans
            .iter()
            .map(|s| Span {
                row: s.row - first,
                ..*s
            })
            .collect();
        let rows = spans.iter().map(|s| s.len).sum();
        MicroBatch {
            chunks,
            spans,
            rows,
            x,
            normed: vec![0.0; rows * hidden],
            trace: Vec::new(),
        }
    }
}

/// A layer's routed work in flight: answered inline, or by a helper thread.
struct InFlight<'scope> {
    work: RoutedWork,
    answer: Answer<'scope>,
}

enum Answer<'scope> {
    Ready(Result<Vec<f32>, ExpertError>),
    Away(ScopedJoinHandle<'scope, Result<Vec<f32>, ExpertError>>),
}

impl InFlight<'_> {
    fn finish(self, micro: &mut MicroBatch, trace: bool) -> Result<(), ModelError> {
        let routed = match self.answer {
            Answer::Ready(r) => r,
            Answer::Away(handle) => handle.join().unwrap_or_else(|_| {
                Err(ExpertError::Unavailable(
                    "the thread waiting on the experts panicked".into(),
                ))
            }),
        }?;
        self.work.finish(&mut micro.x, routed)?;
        if trace {
            micro.trace.push(self.work.routing);
        }
        Ok(())
    }
}

impl Model {
    /// Every layer over every micro-batch, pipelined as the module comment says.
    pub(super) fn run_layers(
        &self,
        kv: &mut PagedKvCache,
        experts: &dyn Experts,
        batch: &[SeqChunk<'_>],
        micros: &mut [MicroBatch],
        trace: bool,
    ) -> Result<(), ModelError> {
        let eps = self.config.rms_norm_eps as f32;
        let overlap = micros.len() > 1;
        std::thread::scope(|scope| {
            let mut in_flight: Vec<Option<InFlight<'_>>> = micros.iter().map(|_| None).collect();
            for (li, layer) in self.layers.iter().enumerate() {
                for (micro, pending) in micros.iter_mut().zip(in_flight.iter_mut()) {
                    if let Some(p) = pending.take() {
                        p.finish(micro, trace)?;
                    }
                    rms_norm(&micro.x, &layer.attn_norm, eps, &mut micro.normed);
                    let input = AttentionInput {
                        batch: &batch[micro.chunks.clone()],
                        spans: &micro.spans,
                        rope: &self.rope,
                        layer: li,
                    };
                    let attn = layer.attention.forward(&input, &micro.normed, kv);
                    add(&mut micro.x, &attn);
                    rms_norm(&micro.x, &layer.ffn_norm, eps, &mut micro.normed);
                    let Some(work) = layer.ffn.start(&micro.normed, micro.rows, &mut micro.x)
                    else {
                        continue;
                    };
                    let answer = if overlap {
                        let (normed, routing) = (micro.normed.clone(), work.routing.clone());
                        let expert_layer = work.expert_layer;
                        Answer::Away(
                            scope.spawn(move || experts.forward(expert_layer, &normed, &routing)),
                        )
                    } else {
                        Answer::Ready(experts.forward(
                            work.expert_layer,
                            &micro.normed,
                            &work.routing,
                        ))
                    };
                    *pending = Some(InFlight { work, answer });
                }
            }
            for (micro, pending) in micros.iter_mut().zip(in_flight) {
                if let Some(p) = pending {
                    p.finish(micro, trace)?;
                }
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_are_contiguous_balanced_and_never_empty() {
        assert_eq!(split(&[1, 1, 1, 1], 2), vec![0..2, 2..4]);
        assert_eq!(split(&[1, 1, 1], 2), vec![0..2, 2..3]);
        assert_eq!(split(&[10, 1, 1, 1], 2), vec![0..1, 1..4]);
        assert_eq!(split(&[1, 1, 1, 10], 2), vec![0..3, 3..4]);
        assert_eq!(split(&[5], 2), vec![0..1]);
        assert_eq!(split(&[1, 1, 1, 1, 1, 1], 3), vec![0..2, 2..4, 4..6]);
        for lens in [vec![3, 1, 4, 1, 5, 9, 2, 6], vec![1; 32], vec![7, 7]] {
            for parts in 1..6 {
                let r = split(&lens, parts);
                assert_eq!(r.len(), parts.min(lens.len()));
                assert_eq!(r[0].start, 0);
                assert_eq!(r.last().unwrap().end, lens.len());
                for w in r.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                }
                assert!(r.iter().all(|x| !x.is_empty()), "{lens:?} / {parts}: {r:?}");
            }
        }
    }

    #[test]
    fn only_small_steps_split() {
        assert_eq!(max_micro_batches(32, 32), 32);
        assert_eq!(max_micro_batches(8, 3), 3);
        assert_eq!(max_micro_batches(33, 33), 1);
        assert_eq!(max_micro_batches(300, 2), 1);
    }
}
