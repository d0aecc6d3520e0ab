//! `switchyard_expert_balancedness{layer}` on a real coordinator with expert nodes: one
//! series per MoE layer, in (0, 1], equal to what the routed tokens per expert and the
//! static placement say it must be.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{Cluster, expert_node, golden, greedy, post_ok};
use serde_json::json;

/// The coordinator's balance window is never shorter than this (6 buckets of 5 s, the
/// current one partial): data younger than it is surely all counted.
const WINDOW_AT_LEAST: Duration = Duration::from_secs(25);

/// Sends every golden prompt once (a few greedy tokens each), then scrapes /metrics.
fn serve_some_and_scrape(c: &Cluster) -> String {
    let client = c.client();
    for g in golden() {
        post_ok(
            &client,
            "/v1/completions",
            &greedy(&c.model, json!(g.input_ids), 4),
        );
    }
    let resp = client.get("/metrics").expect("GET /metrics");
    assert_eq!(resp.status, 200);
    resp.text()
}

/// The value of every sample of `name` (exactly that metric, labelled or not), by its
/// label string (`layer="0"`, or "" without labels).
fn samples(metrics: &str, name: &str) -> BTreeMap<String, f64> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let labels = match series.strip_prefix(name)? {
                "" => "",
                rest => rest.strip_prefix('{')?.strip_suffix('}')?,
            };
            Some((labels.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// Layer -> balancedness, checked to be in (0, 1], and the mean gauge checked against
/// their mean.
fn balancedness_per_layer(metrics: &str) -> BTreeMap<usize, f64> {
    let per_layer: BTreeMap<usize, f64> = samples(metrics, "switchyard_expert_balancedness")
        .into_iter()
        .map(|(labels, v)| {
            let layer = labels
                .strip_prefix("layer=\"")
                .and_then(|l| l.strip_suffix('"'))
                .and_then(|l| l.parse().ok())
                .unwrap_or_else(|| panic!("unexpected labels {labels}"));
            assert!(v > 0.0 && v <= 1.0, "layer {layer}: {v}");
            (layer, v)
        })
        .collect();
    let mean = samples(metrics, "switchyard_expert_balancedness_mean");
    let mean = *mean.get("").expect("switchyard_expert_balancedness_mean");
    let expected = per_layer.values().sum::<f64>() / per_layer.len() as f64;
    assert!((mean - expected).abs() < 1e-12, "mean {mean} vs {expected}");
    per_layer
}

/// `switchyard_routed_tokens_total` as [layer][expert].
fn routed_tokens(metrics: &str) -> Vec<Vec<u64>> {
    let mut out: Vec<Vec<u64>> = Vec::new();
    for (labels, v) in samples(metrics, "switchyard_routed_tokens_total") {
        // layer="L",expert="E"
        let mut layer = None;
        let mut expert = None;
        for kv in labels.split(',') {
            let (k, v) = kv.split_once('=').expect("label=value");
            let v: usize = v.trim_matches('"').parse().expect("numeric label");
            match k {
                "layer" => layer = Some(v),
                "expert" => expert = Some(v),
                _ => panic!("unexpected label {k}"),
            }
        }
        let (l, e) = (layer.expect("layer"), expert.expect("expert"));
        if out.len() <= l {
            out.resize(l + 1, Vec::new());
        }
        if out[l].len() <= e {
            out[l].resize(e + 1, 0);
        }
        out[l][e] = v as u64;
    }
    assert!(!out.is_empty(), "no routed_tokens_total in:\n{metrics}");
    out
}

#[test]
fn one_node_is_perfectly_balanced_on_every_moe_layer() {
    let (_node, addr) = expert_node(0);
    let c = Cluster::coordinator(&[addr], &[]);
    let metrics = serve_some_and_scrape(&c);
    let layers = routed_tokens(&metrics).len();
    let b = balancedness_per_layer(&metrics);
    assert_eq!(b.len(), layers, "one series per MoE layer:\n{metrics}");
    for (layer, v) in &b {
        assert_eq!(*v, 1.0, "layer {layer}");
    }
}

/// Without replicas every expert has one holder, `(layer * experts + expert) % nodes`
/// (the static round-robin placement), so each node's planned assignments are the tokens
/// routed to the experts it holds: the balancedness follows from the per-expert counters.
#[test]
fn three_nodes_match_the_routed_tokens_and_the_placement() {
    let started = Instant::now();
    let nodes: Vec<_> = (0..3).map(expert_node).collect();
    let addrs: Vec<String> = nodes.iter().map(|(_, a)| a.clone()).collect();
    let c = Cluster::coordinator(&addrs, &["--replicas", "1"]);
    let metrics = serve_some_and_scrape(&c);
    let routed = routed_tokens(&metrics);
    let b = balancedness_per_layer(&metrics);
    assert_eq!(
        b.len(),
        routed.len(),
        "one series per MoE layer:\n{metrics}"
    );
    // Every node answers one row per row it was sent, in the same wire format: the
    // bytes each way agree per node.
    let bytes = samples(&metrics, "switchyard_dispatch_bytes_total");
    for addr in &addrs {
        let way = |dir: &str| {
            bytes
                .iter()
                .find(|(labels, _)| labels.contains(addr.as_str()) && labels.contains(dir))
                .map(|(_, v)| *v)
                .unwrap_or_else(|| panic!("no {dir} bytes for {addr}:\n{metrics}"))
        };
        assert!(way("\"sent\"") > 0.0);
        assert_eq!(way("\"sent\""), way("\"received\""), "{addr}");
    }
    eprintln!("balancedness per layer: {b:?}");
    if started.elapsed() >= WINDOW_AT_LEAST {
        // Early tokens may have left the window: only the range can be checked.
        eprintln!(
            "slow run ({:?}): exact comparison skipped",
            started.elapsed()
        );
        return;
    }
    for (layer, per_expert) in routed.iter().enumerate() {
        let experts = per_expert.len();
        let mut per_node = [0u64; 3];
        for (e, &tokens) in per_expert.iter().enumerate() {
            per_node[(layer * experts + e) % 3] += tokens;
        }
        let max = *per_node.iter().max().unwrap();
        assert!(max > 0, "layer {layer} got no tokens");
        let mean = per_node.iter().sum::<u64>() as f64 / 3.0;
        let expected = mean / max as f64;
        let got = b[&layer];
        assert!(
            (got - expected).abs() < 1e-12,
            "layer {layer}: {got} on /metrics, {expected} from {per_node:?} per node"
        );
    }
}
