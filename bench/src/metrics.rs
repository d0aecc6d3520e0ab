//! From per-request observations to the numbers people compare, with the definitions
//! of vLLM's `calculate_metrics`: TPOT per request = (e2e - ttft) / (output tokens - 1),
//! ITL pools every gap of every request, throughputs divide by the whole run's
//! duration, and a failed request counts in `failed` and nowhere else.

use std::collections::BTreeMap;

use crate::args::{Metric, Slo, SloMetric};
use crate::client::{RequestOutput, Success};
use crate::stats::Summary;

#[derive(Debug, Clone, PartialEq)]
pub struct BenchmarkMetrics {
    pub completed: usize,
    pub failed: usize,
    pub total_input: usize,
    pub total_output: usize,
    pub request_throughput: f64,
    /// None without `--goodput`.
    pub request_goodput: Option<f64>,
    pub good_completed: usize,
    pub output_throughput: f64,
    pub total_token_throughput: f64,
    /// Output chunks in the busiest whole second (vLLM's definition).
    pub max_output_tokens_per_s: f64,
    /// Most requests in flight at one instant.
    pub max_concurrent_requests: usize,
    /// Milliseconds.
    pub ttft: Summary,
    pub tpot: Summary,
    pub itl: Summary,
    pub e2el: Summary,
    /// Failures by kind (`http_500`, `transport`, `timeout`, ...).
    pub errors: BTreeMap<String, usize>,
    /// Completed requests whose stream had no usage: their output length is the number
    /// of text chunks, a lower bound.
    pub without_usage: usize,
    /// Completed requests whose tokens all decoded to empty text (timed by their
    /// finishing chunk).
    pub without_text: usize,
}

impl BenchmarkMetrics {
    pub fn summary(&self, m: Metric) -> &Summary {
        match m {
            Metric::Ttft => &self.ttft,
            Metric::Tpot => &self.tpot,
            Metric::Itl => &self.itl,
            Metric::E2el => &self.e2el,
        }
    }
}

/// Output tokens of a completed request: the server's count, else its text chunks.
pub fn output_tokens(s: &Success) -> usize {
    s.output_tokens
        .filter(|&n| n > 0)
        .unwrap_or(s.content_chunks)
}

/// Prompt tokens of a completed request: the server's count, else the dataset's.
pub fn input_tokens(o: &RequestOutput, s: &Success) -> usize {
    s.prompt_tokens.unwrap_or(o.prompt_len)
}

/// (e2e - ttft) / (output tokens - 1); none for a one-token output.
pub fn tpot(s: &Success) -> Option<f64> {
    let n = output_tokens(s);
    (n > 1).then(|| (s.latency - s.ttft) / (n - 1) as f64)
}

pub fn calculate(
    outputs: &[RequestOutput],
    duration: f64,
    percentiles: &[f64],
    goodput: &[Slo],
) -> BenchmarkMetrics {
    let mut total_input = 0;
    let mut total_output = 0;
    let mut ttfts = Vec::new();
    let mut tpots = Vec::new();
    let mut itls = Vec::new();
    let mut e2els = Vec::new();
    let mut errors = BTreeMap::new();
    let mut good_completed = 0;
    let mut without_usage = 0;
    let mut without_text = 0;
    for o in outputs {
        let s = match &o.result {
            Ok(s) => s,
            Err(f) => {
                *errors.entry(f.kind.to_string()).or_insert(0) += 1;
                continue;
            }
        };
        total_input += input_tokens(o, s);
        total_output += output_tokens(s);
        if s.output_tokens.is_none() {
            without_usage += 1;
        }
        if s.content_chunks == 0 {
            without_text += 1;
        }
        ttfts.push(s.ttft);
        tpots.extend(tpot(s));
        itls.extend_from_slice(&s.itl);
        e2els.push(s.latency);
        // A one-token output has no TPOT; vLLM counts it as 0 against the objective.
        let good = goodput.iter().all(|slo| {
            let value = match slo.metric {
                SloMetric::Ttft => s.ttft,
                SloMetric::Tpot => tpot(s).unwrap_or(0.0),
                SloMetric::E2el => s.latency,
            };
            value <= slo.ms / 1000.0
        });
        if good {
            good_completed += 1;
        }
    }
    let completed = ttfts.len();
    let per_s = |x: f64| if duration > 0.0 { x / duration } else { 0.0 };
    let (max_output_tokens_per_s, max_concurrent_requests) = peaks(outputs);
    BenchmarkMetrics {
        completed,
        failed: outputs.len() - completed,
        total_input,
        total_output,
        request_throughput: per_s(completed as f64),
        request_goodput: (!goodput.is_empty()).then(|| per_s(good_completed as f64)),
        good_completed,
        output_throughput: per_s(total_output as f64),
        total_token_throughput: per_s((total_input + total_output) as f64),
        max_output_tokens_per_s,
        max_concurrent_requests,
        ttft: Summary::of(&ttfts, percentiles, 1000.0),
        tpot: Summary::of(&tpots, percentiles, 1000.0),
        itl: Summary::of(&itls, percentiles, 1000.0),
        e2el: Summary::of(&e2els, percentiles, 1000.0),
        errors,
        without_usage,
        without_text,
    }
}

/// Times (from the start of the run) at which a completed request received text.
fn chunk_times(o: &RequestOutput, s: &Success) -> Vec<f64> {
    let mut t = o.start + s.ttft;
    let mut out = Vec::with_capacity(s.itl.len() + 1);
    out.push(t);
    for gap in &s.itl {
        t += gap;
        out.push(t);
    }
    out
}

/// vLLM's peaks over completed requests: text chunks in the busiest one-second bucket
/// counted from the first send, and the most requests in flight at once (a sweep over
/// half-open [send, end) intervals).
fn peaks(outputs: &[RequestOutput]) -> (f64, usize) {
    let done: Vec<(&RequestOutput, &Success)> = outputs
        .iter()
        .filter_map(|o| o.result.as_ref().ok().map(|s| (o, s)))
        .collect();
    let Some(t0) = done.iter().map(|(o, _)| o.start).min_by(f64::total_cmp) else {
        return (0.0, 0);
    };
    let mut buckets: BTreeMap<u64, usize> = BTreeMap::new();
    let mut events = Vec::new();
    for (o, s) in &done {
        for t in chunk_times(o, s) {
            *buckets.entry((t - t0).max(0.0) as u64).or_insert(0) += 1;
        }
        events.push((o.start, 1i64));
        events.push((o.start + s.latency, -1i64));
    }
    // Ends before starts at the same instant: half-open intervals do not overlap.
    events.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let mut now = 0i64;
    let mut peak = 0i64;
    for (_, d) in events {
        now += d;
        peak = peak.max(now);
    }
    let max_tokens = buckets.values().copied().max().unwrap_or(0);
    (max_tokens as f64, peak as usize)
}

/// Output throughput and requests in flight over the run, for the plot.
#[derive(Debug, Clone, PartialEq)]
pub struct Timeline {
    pub bin_s: f64,
    /// Output tokens per second in each bin (a chunk's tokens spread evenly over the
    /// request's chunks, so the bins add up to the usage totals).
    pub tokens_per_s: Vec<f64>,
    /// Requests in flight at the middle of each bin.
    pub in_flight: Vec<usize>,
}

pub fn timeline(outputs: &[RequestOutput], duration: f64) -> Timeline {
    let bin_s = (duration / 60.0).max(0.05);
    let bins = ((duration / bin_s).ceil() as usize).max(1);
    let mut tokens = vec![0.0; bins];
    let mut in_flight = vec![0; bins];
    for o in outputs {
        if let Ok(s) = &o.result {
            let times = chunk_times(o, s);
            let per_chunk = output_tokens(s) as f64 / times.len() as f64;
            for t in times {
                let b = ((t / bin_s) as usize).min(bins - 1);
                tokens[b] += per_chunk / bin_s;
            }
        }
        for (b, n) in in_flight.iter_mut().enumerate() {
            let mid = (b as f64 + 0.5) * bin_s;
            if o.start <= mid && mid < o.start + o.latency {
                *n += 1;
            }
        }
    }
    Timeline {
        bin_s,
        tokens_per_s: tokens,
        in_flight,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{ErrorKind, Failure};

    fn ok(start: f64, ttft: f64, itl: Vec<f64>, tokens: usize) -> RequestOutput {
        let latency = ttft + itl.iter().sum::<f64>();
        RequestOutput {
            probe: false,
            prompt_len: 10,
            start,
            latency,
            result: Ok(Success {
                ttft,
                content_chunks: itl.len() + 1,
                itl,
                latency,
                prompt_tokens: Some(12),
                output_tokens: Some(tokens),
                text: "x".into(),
            }),
        }
    }

    fn failed(kind: ErrorKind) -> RequestOutput {
        RequestOutput {
            probe: false,
            prompt_len: 10,
            start: 0.0,
            latency: 0.01,
            result: Err(Failure {
                kind,
                message: String::new(),
            }),
        }
    }

    #[test]
    fn hand_computed_run() {
        // Two requests: 3 tokens with TTFT 100 ms and gaps 20, 40 ms (TPOT 30 ms, e2e
        // 160 ms); 1 token with TTFT 300 ms (no TPOT, e2e 300 ms). Three failures.
        let outputs = vec![
            ok(0.0, 0.100, vec![0.020, 0.040], 3),
            failed(ErrorKind::Http(500)),
            ok(0.5, 0.300, vec![], 1),
            failed(ErrorKind::Http(500)),
            failed(ErrorKind::Timeout),
        ];
        let slo = |metric, ms| Slo { metric, ms };
        let m = calculate(
            &outputs,
            2.0,
            &[50.0, 100.0],
            &[slo(SloMetric::Ttft, 200.0)],
        );
        assert_eq!((m.completed, m.failed), (2, 3));
        assert_eq!((m.total_input, m.total_output), (24, 4));
        assert_eq!(m.request_throughput, 1.0);
        assert_eq!(m.output_throughput, 2.0);
        assert_eq!(m.total_token_throughput, 14.0);
        assert_eq!(m.request_goodput, Some(0.5));
        let close = |a: f64, b: f64| assert!((a - b).abs() < 1e-9, "{a} != {b}");
        close(m.ttft.mean, 200.0);
        close(m.ttft.std, 100.0);
        close(m.ttft.percentiles[1].1, 300.0);
        close(m.tpot.mean, 30.0); // the 1-token request has no TPOT
        close(m.itl.mean, 30.0);
        close(m.itl.median, 30.0);
        close(m.e2el.mean, 230.0);
        assert_eq!(m.errors.get("http_500"), Some(&2));
        assert_eq!(m.errors.get("timeout"), Some(&1));
        // Chunks at 0.1, 0.12, 0.16 and 0.8 s: all in the first second.
        assert_eq!(m.max_output_tokens_per_s, 4.0);
        // [0, 0.16) and [0.5, 0.8) never overlap.
        assert_eq!(m.max_concurrent_requests, 1);

        // A one-token request counts as TPOT 0 against a TPOT objective; the other
        // request's 30 ms misses 25 ms.
        let g = calculate(&outputs, 2.0, &[], &[slo(SloMetric::Tpot, 25.0)]);
        assert_eq!(g.good_completed, 1);
        let none = calculate(&outputs, 2.0, &[], &[]);
        assert_eq!(none.request_goodput, None);
    }

    #[test]
    fn no_completed_requests_gives_zeros() {
        let m = calculate(&[failed(ErrorKind::Transport)], 1.0, &[99.0], &[]);
        assert_eq!((m.completed, m.failed), (0, 1));
        assert_eq!(m.ttft.mean, 0.0);
        assert_eq!(m.ttft.percentiles, vec![(99.0, 0.0)]);
        assert_eq!(m.max_concurrent_requests, 0);
    }

    #[test]
    fn timeline_adds_up_to_the_output_tokens() {
        let outputs = vec![
            ok(0.0, 0.1, vec![0.1; 9], 20),
            ok(0.5, 0.1, vec![0.1; 4], 5),
        ];
        let t = timeline(&outputs, 1.1);
        let total: f64 = t.tokens_per_s.iter().map(|r| r * t.bin_s).sum();
        assert!((total - 25.0).abs() < 1e-9, "{total}");
        assert_eq!(t.in_flight.iter().copied().max(), Some(2));
    }
}
