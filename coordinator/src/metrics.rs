//! The coordinator's Prometheus metrics. Label sets are bounded: endpoints and statuses
//! are fixed lists, nodes are the configured nodes, (layer, expert) is the model's shape.

use std::sync::Arc;

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use switchyard_engine::{ExpertError, Experts, Routing};

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub time_to_first_token: Histogram,
    pub time_per_output_token: Histogram,
    pub e2e_latency: Histogram,
    pub prompt_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    pub running: IntGauge,
    pub waiting: IntGauge,
    pub kv_total_blocks: IntGauge,
    pub kv_used_blocks: IntGauge,
    /// Prefix caching: blocks holding a cached prompt prefix, and prompt tokens looked
    /// up and found (their prefill skipped).
    pub kv_cached_blocks: IntGauge,
    pub prefix_queries: IntCounter,
    pub prefix_hits: IntCounter,
    pub batch_tokens: Histogram,
    pub batch_sequences: Histogram,
    pub routed_tokens: IntCounterVec,
    pub dispatch_seconds: HistogramVec,
    pub dispatch_bytes: IntCounterVec,
    /// Microseconds each node reported computing its share of layers: with nodes on
    /// their own hardware, the busiest node's total is what the step waits for.
    pub node_compute: IntCounterVec,
    pub node_up: IntGaugeVec,
    /// Cluster mode: the placement epoch followed, and layers saved by recovery loads.
    pub placement_epoch: IntGauge,
    pub recoveries: IntCounter,
    /// Layers a node was late for and that were sent to replicas too; and those the
    /// replicas answered first.
    pub hedges: IntCounterVec,
    pub hedge_wins: IntCounterVec,
    /// Times a node was avoided for being far slower than its peers on the wire.
    pub slow_links: IntCounterVec,
    /// How long the forward pass waited for one MoE layer's routed experts (the wire and
    /// the nodes, or the in-process store): the coordinator's idle time per layer.
    pub expert_wait: Histogram,
    /// Steps run as two or more micro-batches (`--micro-batches`).
    pub split_steps: IntCounter,
    /// Time spent on structured output's grammar per token (the mask, then the advance),
    /// on the scheduler's thread.
    pub grammar: Histogram,
    /// Per MoE layer, the balancedness of the assignments planned for the nodes over the
    /// last 25-30 s (`crate::balance`): mean over the nodes holding experts of the layer
    /// divided by the max. A layer with no tokens in the window has no series.
    pub expert_balancedness: GaugeVec,
    /// The mean of `expert_balancedness` over the layers that have one (no labels; no
    /// series while none has).
    pub expert_balancedness_mean: GaugeVec,
}

fn latency_buckets() -> Vec<f64> {
    // 1 ms .. ~65 s.
    prometheus::exponential_buckets(0.001, 2.0, 17).unwrap_or_default()
}

impl Metrics {
    pub fn new() -> Result<Arc<Self>, prometheus::Error> {
        let registry = Registry::new_custom(Some("switchyard".into()), None)?;
        let counter_vec =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let histogram =
            |name: &str, help: &str, buckets: Vec<f64>| -> Result<Histogram, prometheus::Error> {
                let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?;
                registry.register(Box::new(h.clone()))?;
                Ok(h)
            };
        let sizes = prometheus::exponential_buckets(1.0, 2.0, 14)?;
        let dispatch_seconds = HistogramVec::new(
            HistogramOpts::new("dispatch_seconds", "One MoE layer's round trip to a node")
                .buckets(prometheus::exponential_buckets(0.00005, 2.0, 16)?),
            &["node"],
        )?;
        registry.register(Box::new(dispatch_seconds.clone()))?;
        let node_up = IntGaugeVec::new(
            Opts::new("node_up", "1 while the node's stream is open"),
            &["node"],
        )?;
        registry.register(Box::new(node_up.clone()))?;
        let expert_balancedness = GaugeVec::new(
            Opts::new(
                "expert_balancedness",
                "Per MoE layer, over the last 25-30 s: mean over the nodes holding the layer's experts of the (token, expert) assignments dispatched to each, divided by the max (1: even)",
            ),
            &["layer"],
        )?;
        registry.register(Box::new(expert_balancedness.clone()))?;
        let expert_balancedness_mean = GaugeVec::new(
            Opts::new(
                "expert_balancedness_mean",
                "Mean of expert_balancedness over the MoE layers that had tokens in the window",
            ),
            &[],
        )?;
        registry.register(Box::new(expert_balancedness_mean.clone()))?;
        Ok(Arc::new(Metrics {
            requests: counter_vec(
                "requests_total",
                "HTTP requests by endpoint and status",
                &["endpoint", "status"],
            )?,
            time_to_first_token: histogram(
                "time_to_first_token_seconds",
                "Request arrival to first token",
                latency_buckets(),
            )?,
            time_per_output_token: histogram(
                "time_per_output_token_seconds",
                "(e2e - ttft) / (output tokens - 1), per request",
                prometheus::exponential_buckets(0.0005, 2.0, 16)?,
            )?,
            e2e_latency: histogram(
                "e2e_request_latency_seconds",
                "Request arrival to last token",
                latency_buckets(),
            )?,
            prompt_tokens: counter("prompt_tokens_total", "Prompt tokens of finished requests")?,
            generation_tokens: counter("generation_tokens_total", "Tokens generated")?,
            running: gauge("running_sequences", "Sequences in the running batch")?,
            waiting: gauge("waiting_requests", "Requests waiting for admission")?,
            kv_total_blocks: gauge("kv_cache_blocks_total", "KV-cache blocks")?,
            kv_used_blocks: gauge("kv_cache_blocks_used", "KV-cache blocks held by sequences")?,
            kv_cached_blocks: gauge(
                "kv_cache_blocks_cached",
                "KV-cache blocks holding a cached prompt prefix, in use or kept for reuse",
            )?,
            prefix_queries: counter(
                "prefix_cache_queries_total",
                "Prompt tokens looked up in the prefix cache",
            )?,
            prefix_hits: counter(
                "prefix_cache_hits_total",
                "Prompt tokens found in the prefix cache (their prefill skipped)",
            )?,
            expert_wait: histogram(
                "expert_wait_seconds",
                "Time the forward pass waited for one MoE layer's routed experts",
                prometheus::exponential_buckets(0.00002, 2.0, 18)?,
            )?,
            grammar: histogram(
                "structured_grammar_seconds",
                "Time the grammar of a structured output took per token (mask and advance)",
                prometheus::exponential_buckets(0.000002, 2.0, 18)?,
            )?,
            split_steps: counter(
                "micro_batch_split_steps_total",
                "Scheduler steps run as two or more micro-batches taking turns per layer",
            )?,
            batch_tokens: histogram("batch_tokens", "Tokens per scheduler step", sizes.clone())?,
            batch_sequences: histogram("batch_sequences", "Sequences per scheduler step", sizes)?,
            routed_tokens: counter_vec(
                "routed_tokens_total",
                "Tokens routed to each expert",
                &["layer", "expert"],
            )?,
            dispatch_seconds,
            dispatch_bytes: counter_vec(
                "dispatch_bytes_total",
                "Activation bytes to and from each node",
                &["node", "direction"],
            )?,
            node_compute: counter_vec(
                "node_compute_microseconds_total",
                "Time each node reported computing its experts' share of layers",
                &["node"],
            )?,
            node_up,
            placement_epoch: gauge(
                "placement_epoch",
                "Cluster mode: epoch of the placement in use (0: static placement)",
            )?,
            recoveries: counter(
                "expert_recoveries_total",
                "Times a layer found experts without a live node and loaded them on live nodes",
            )?,
            hedges: counter_vec(
                "dispatch_hedges_total",
                "Layers a node was late for (past k x its recent p99) and that went to replicas too",
                &["node"],
            )?,
            hedge_wins: counter_vec(
                "dispatch_hedge_wins_total",
                "Hedged layers the replicas answered before the late node",
                &["node"],
            )?,
            slow_links: counter_vec(
                "dispatch_slow_link_total",
                "Times a node answered far later than the other nodes of a layer (time outside compute, several layers in a row) and was avoided for a second",
                &["node"],
            )?,
            expert_balancedness,
            expert_balancedness_mean,
            registry,
        }))
    }

    /// Sets `expert_balancedness` per layer (`None`: the layer's series is removed) and
    /// their mean.
    pub fn set_balancedness(&self, per_layer: &[Option<f64>]) {
        let (mut sum, mut layers) = (0.0, 0usize);
        for (layer, b) in per_layer.iter().enumerate() {
            let label = layer.to_string();
            match b {
                Some(b) => {
                    self.expert_balancedness
                        .with_label_values(&[&label])
                        .set(*b);
                    sum += b;
                    layers += 1;
                }
                None => {
                    let _ = self.expert_balancedness.remove_label_values(&[&label]);
                }
            }
        }
        let no_labels: [&str; 0] = [];
        if layers > 0 {
            self.expert_balancedness_mean
                .with_label_values(&no_labels)
                .set(sum / layers as f64);
        } else {
            let _ = self
                .expert_balancedness_mean
                .remove_label_values(&no_labels);
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Counts routed tokens per (layer, expert), then hands the work on.
pub struct CountingExperts {
    inner: Arc<dyn Experts>,
    metrics: Arc<Metrics>,
    /// Pre-resolved counters, indexed `layer * experts + expert`.
    counters: Vec<IntCounter>,
    num_experts: usize,
}

impl CountingExperts {
    pub fn new(
        inner: Arc<dyn Experts>,
        metrics: Arc<Metrics>,
        num_layers: usize,
        num_experts: usize,
    ) -> Self {
        let counters = (0..num_layers * num_experts)
            .map(|i| {
                let expert = if per_expert_series(num_layers, num_experts) {
                    (i % num_experts).to_string()
                } else {
                    "all".to_string()
                };
                metrics
                    .routed_tokens
                    .with_label_values(&[&(i / num_experts).to_string(), &expert])
            })
            .collect();
        CountingExperts {
            inner,
            metrics,
            counters,
            num_experts,
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

impl Experts for CountingExperts {
    fn forward(&self, layer: usize, x: &[f32], routing: &Routing) -> Result<Vec<f32>, ExpertError> {
        for &e in &routing.experts {
            if let Some(c) = self.counters.get(layer * self.num_experts + e as usize) {
                c.inc();
            }
        }
        let started = std::time::Instant::now();
        let out = self.inner.forward(layer, x, routing);
        self.metrics
            .expert_wait
            .observe(started.elapsed().as_secs_f64());
        out
    }
}

/// Above this many (layer, expert) pairs (DeepSeek-V3: 58 x 256), the per-expert token
/// series would make every scrape tens of thousands of lines: they are kept per layer
/// instead, with `expert="all"`.
pub const PER_EXPERT_SERIES_MAX: usize = 4096;

pub fn per_expert_series(num_layers: usize, num_experts: usize) -> bool {
    num_layers.saturating_mul(num_experts) <= PER_EXPERT_SERIES_MAX
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balancedness_series_exist_only_for_layers_with_data() {
        let m = Metrics::new().unwrap();
        let text = m.render();
        assert!(!text.contains("switchyard_expert_balancedness"), "{text}");
        m.set_balancedness(&[Some(1.0), None, Some(0.5)]);
        let text = m.render();
        assert!(
            text.contains("switchyard_expert_balancedness{layer=\"0\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("switchyard_expert_balancedness{layer=\"2\"} 0.5\n"),
            "{text}"
        );
        assert!(!text.contains("layer=\"1\""), "{text}");
        assert!(
            text.contains("switchyard_expert_balancedness_mean 0.75\n"),
            "{text}"
        );
        m.set_balancedness(&[None, None, Some(0.25)]);
        let text = m.render();
        assert!(!text.contains("layer=\"0\""), "{text}");
        assert!(
            text.contains("switchyard_expert_balancedness_mean 0.25\n"),
            "{text}"
        );
        m.set_balancedness(&[None, None, None]);
        assert!(!m.render().contains("switchyard_expert_balancedness"));
    }
}
