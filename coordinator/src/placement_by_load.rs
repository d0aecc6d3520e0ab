//! Static placement by load (`coordinator --nodes ... --placement-from FILE`): the
//! cluster's load-aware planner run once at start-up on a load measured before, for
//! deployments without etcd.
//!
//! The file is what a coordinator's `/metrics` says (`switchyard_routed_tokens_total`
//! lines; other lines are ignored), or JSON `{"tokens": [[per expert] per layer]}`.

use std::path::Path;

use switchyard_cluster::{Candidate, PlanInput, plan_by_load};

use crate::placement::{Placement, PlacementError};

/// Routed tokens per `layer * num_experts + expert` from `path`.
pub fn read_load(path: &Path, num_layers: usize, num_experts: usize) -> Result<Vec<u64>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("reading the load file {}: {e}", path.display()))?;
    let load = if text.trim_start().starts_with('{') {
        from_json(&text, num_layers, num_experts)
    } else {
        from_metrics(&text, num_layers, num_experts)
    }
    .map_err(|e| format!("load file {}: {e}", path.display()))?;
    if load.iter().all(|&t| t == 0) {
        return Err(format!(
            "load file {}: no routed tokens in it (scrape /metrics after serving some traffic)",
            path.display()
        ));
    }
    Ok(load)
}

fn from_json(text: &str, num_layers: usize, num_experts: usize) -> Result<Vec<u64>, String> {
    #[derive(serde::Deserialize)]
    struct File {
        tokens: Vec<Vec<u64>>,
    }
    let f: File = serde_json::from_str(text).map_err(|e| e.to_string())?;
    if f.tokens.len() != num_layers || f.tokens.iter().any(|l| l.len() != num_experts) {
        return Err(format!(
            "`tokens` must be {num_layers} layers of {num_experts} experts (this model's MoE layers)"
        ));
    }
    Ok(f.tokens.into_iter().flatten().collect())
}

fn from_metrics(text: &str, num_layers: usize, num_experts: usize) -> Result<Vec<u64>, String> {
    let mut load = vec![0u64; num_layers * num_experts];
    let mut seen = 0usize;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("switchyard_routed_tokens_total{") else {
            continue;
        };
        let (labels, value) = rest
            .split_once('}')
            .ok_or_else(|| format!("cannot read `{line}`"))?;
        let label = |name: &str| -> Result<usize, String> {
            labels
                .split(',')
                .find_map(|kv| {
                    kv.strip_prefix(name)?
                        .strip_prefix("=\"")?
                        .strip_suffix('"')
                })
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("no {name} label in `{line}`"))
        };
        let (layer, expert) = (label("layer")?, label("expert")?);
        if layer >= num_layers || expert >= num_experts {
            return Err(format!(
                "layer {layer} expert {expert} is outside this model's {num_layers} x {num_experts}: \
                 a load of another model?"
            ));
        }
        let tokens: f64 = value
            .trim()
            .parse()
            .map_err(|_| format!("cannot read the count in `{line}`"))?;
        load[layer * num_experts + expert] = tokens.max(0.0) as u64;
        seen += 1;
    }
    if seen == 0 {
        return Err("no switchyard_routed_tokens_total lines (a coordinator's /metrics)".into());
    }
    Ok(load)
}

/// A placement by `load` on `nodes` nodes with `slots` experts of every layer each, at
/// least `replicas` copies of every expert.
pub fn plan(
    load: &[u64],
    num_layers: usize,
    num_experts: usize,
    nodes: usize,
    slots: usize,
    replicas: usize,
) -> Result<Placement, PlacementError> {
    if nodes == 0 {
        return Err(PlacementError::NoNodes);
    }
    // Ids that sort in node order, so the record's node list is our node order.
    let candidates: Vec<Candidate> = (0..nodes)
        .map(|i| Candidate {
            id: format!("{i:08}"),
            addr: String::new(),
            capacity: slots * num_layers,
        })
        .collect();
    let input = PlanInput {
        num_layers,
        num_experts,
        nodes: &candidates,
        current: None,
        load,
        min_replicas: replicas,
    };
    let record = plan_by_load(&input, 1)
        .map_err(|e| PlacementError::Invalid(e.to_string()))?
        .ok_or_else(|| {
            PlacementError::Invalid(format!(
                "{slots} experts per layer on each of {nodes} nodes cannot hold {replicas} \
                 copies of {num_experts} experts: raise --expert-slots"
            ))
        })?;
    // Nodes that got nothing are absent from the record: map its indices back.
    let index: Vec<usize> = record
        .nodes
        .iter()
        .map(|n| n.id.parse().unwrap_or(usize::MAX))
        .collect();
    let holders = record
        .holders
        .iter()
        .map(|h| h.iter().map(|&k| index[k as usize]).collect())
        .collect();
    Placement::from_holders(num_layers, num_experts, nodes, holders)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_metrics_scrape_and_json_read_the_same_load() {
        let dir = tempfile::tempdir().unwrap();
        let scrape = dir.path().join("metrics.txt");
        std::fs::write(
            &scrape,
            "# HELP switchyard_routed_tokens_total x\n\
             switchyard_routed_tokens_total{expert=\"1\",layer=\"0\"} 7\n\
             switchyard_routed_tokens_total{expert=\"0\",layer=\"1\"} 3\n\
             switchyard_requests_total{endpoint=\"x\",status=\"200\"} 9\n",
        )
        .unwrap();
        let json = dir.path().join("load.json");
        std::fs::write(&json, r#"{"tokens": [[0, 7], [3, 0]]}"#).unwrap();
        assert_eq!(read_load(&scrape, 2, 2), Ok(vec![0, 7, 3, 0]));
        assert_eq!(read_load(&json, 2, 2), Ok(vec![0, 7, 3, 0]));

        std::fs::write(&json, r#"{"tokens": [[0, 7]]}"#).unwrap();
        assert!(
            read_load(&json, 2, 2)
                .unwrap_err()
                .contains("2 layers of 2 experts")
        );
        std::fs::write(
            &scrape,
            "switchyard_routed_tokens_total{expert=\"5\",layer=\"0\"} 7\n",
        )
        .unwrap();
        assert!(
            read_load(&scrape, 2, 2)
                .unwrap_err()
                .contains("another model")
        );
        std::fs::write(&scrape, "nothing here\n").unwrap();
        assert!(read_load(&scrape, 2, 2).is_err());
        assert!(read_load(&dir.path().join("absent"), 2, 2).is_err());
    }

    #[test]
    fn the_hot_expert_gets_copies_and_every_node_its_slots_at_most() {
        // One layer, 4 experts, expert 2 has most of the tokens; 3 nodes of 2 slots.
        let p = plan(&[10, 10, 100, 10], 1, 4, 3, 2, 1).unwrap();
        assert_eq!(p.holders(0, 2).len(), 3);
        for n in 0..3 {
            assert!(p.experts_of(n).len() <= 2);
        }
        assert!(
            plan(&[1, 1, 1, 1], 1, 4, 3, 1, 2).is_err(),
            "3 slots for 8 copies"
        );
    }
}
