//! The node's Prometheus metrics: per-expert tokens, compute time, requests by outcome.
//! Labels are bounded by the model's shape.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry, TextEncoder,
};
use switchyard_engine::Assignment;

pub struct NodeMetrics {
    registry: Registry,
    /// Pre-resolved per (layer, expert), indexed `layer * experts + expert`.
    expert_tokens: Vec<IntCounter>,
    num_experts: usize,
    compute_seconds: Histogram,
    requests: IntCounterVec,
}

impl NodeMetrics {
    pub fn new(num_layers: usize, num_experts: usize) -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(Some("switchyard_node".into()), None)?;
        let tokens = IntCounterVec::new(
            Opts::new(
                "expert_tokens_total",
                "Tokens computed by each expert held here",
            ),
            &["layer", "expert"],
        )?;
        registry.register(Box::new(tokens.clone()))?;
        let compute_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "compute_seconds",
                "Decode + expert compute + encode of one forward request",
            )
            .buckets(prometheus::exponential_buckets(0.00001, 2.0, 20)?),
        )?;
        registry.register(Box::new(compute_seconds.clone()))?;
        let requests = IntCounterVec::new(
            Opts::new("forward_requests_total", "Forward requests by outcome"),
            &["outcome"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        let expert_tokens = (0..num_layers * num_experts)
            .map(|i| {
                let expert = if per_expert_series(num_layers, num_experts) {
                    (i % num_experts).to_string()
                } else {
                    "all".to_string()
                };
                tokens.with_label_values(&[&(i / num_experts).to_string(), &expert])
            })
            .collect();
        Ok(NodeMetrics {
            registry,
            expert_tokens,
            num_experts,
            compute_seconds,
            requests,
        })
    }

    pub(crate) fn computed(&self, layer: usize, assignments: &[Assignment], micros: u64) {
        for a in assignments {
            if let Some(c) = self
                .expert_tokens
                .get(layer * self.num_experts + a.expert as usize)
            {
                c.inc();
            }
        }
        self.compute_seconds.observe(micros as f64 * 1e-6);
        self.requests.with_label_values(&["ok"]).inc();
    }

    pub(crate) fn refused(&self) {
        self.requests.with_label_values(&["refused"]).inc();
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Above this many (layer, expert) pairs (DeepSeek-V3: 58 x 256), the per-expert token
/// series would make every scrape tens of thousands of lines: they are kept per layer
/// instead, with `expert="all"`.
pub const PER_EXPERT_SERIES_MAX: usize = 4096;

pub fn per_expert_series(num_layers: usize, num_experts: usize) -> bool {
    num_layers.saturating_mul(num_experts) <= PER_EXPERT_SERIES_MAX
}
