//! `switchyard ctl`: look at and operate a cluster through etcd.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use switchyard_cluster::rebalance::{RebalanceState, RebalanceStatus};
use switchyard_cluster::{ClusterConfig, Snapshot, balancedness, ops};

use super::serve_args::ClusterArgs;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    cluster: ClusterArgs,
    #[command(subcommand)]
    action: Action,
}

#[derive(clap::Subcommand)]
enum Action {
    /// Nodes, health, memory, placement per layer, per-expert load, epoch.
    Status {
        /// Print the whole state as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Move a node's experts away; the node leaves once no coordinator uses it. Waits
    /// until the placement without it is published.
    Drain {
        /// The node's id (as `ctl status` lists it).
        node: String,
        #[arg(long, default_value_t = 120)]
        timeout_s: u64,
    },
    /// Withdraw a drain request (a node that restarts withdraws its own).
    Undrain { node: String },
    /// Re-place experts by the load measured now (hot experts get more copies, each
    /// node about the same tokens per layer), make-before-break; waits for the end.
    Rebalance {
        #[arg(long, default_value_t = 300)]
        timeout_s: u64,
    },
}

pub fn run(a: Args) -> Result<ExitCode> {
    let cfg = a
        .cluster
        .config()?
        .context("give --etcd URL[,URL] (and --cluster NAME if not `default`)")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let code = runtime.block_on(async {
        match a.action {
            Action::Status { json } => {
                let snap = ops::status(&cfg).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&snap)?);
                } else {
                    print!("{}", render(&cfg, &snap));
                }
            }
            Action::Drain { node, timeout_s } => {
                let snap = ops::drain(&cfg, &node, Duration::from_secs(timeout_s)).await?;
                let epoch = snap.placement.as_ref().map_or(0, |p| p.epoch);
                println!("drained {node}: placement epoch {epoch} no longer uses it");
            }
            Action::Undrain { node } => {
                ops::undrain(&cfg, &node).await?;
                println!("drain mark of {node} removed");
            }
            Action::Rebalance { timeout_s } => {
                let s = ops::rebalance(&cfg, Duration::from_secs(timeout_s)).await?;
                println!("rebalance {}", rebalance_line(&s));
                if s.state == RebalanceState::Stopped {
                    return Ok(ExitCode::FAILURE);
                }
            }
        }
        anyhow::Ok(ExitCode::SUCCESS)
    })?;
    Ok(code)
}

/// The human-readable status.
fn render(cfg: &ClusterConfig, s: &Snapshot) -> String {
    let mut out = String::new();
    let epoch = s.placement.as_ref().map_or(0, |p| p.epoch);
    let _ = writeln!(
        out,
        "cluster {}  epoch {epoch}  leader {}",
        cfg.keys.root(),
        s.leader.as_deref().unwrap_or("(none)")
    );
    let _ = writeln!(
        out,
        "\n{:<24} {:<22} {:<6} {:<7} {:>13} {:>12} {:>8}  state",
        "NODE", "ADDRESS", "DEVICE", "WEIGHTS", "EXPERTS/CAP", "MEMORY", "PLACED"
    );
    let mut ids: Vec<&String> = s.nodes.keys().collect();
    if let Some(p) = &s.placement {
        for n in &p.nodes {
            if !s.nodes.contains_key(&n.id) {
                ids.push(&n.id);
            }
        }
    }
    for id in ids {
        let placed = s.placement.as_ref().map_or(0, |p| p.experts_of(id).len());
        let state = match (s.nodes.get(id), s.drains.contains(id)) {
            (None, _) => "down (lease expired)",
            (Some(_), true) => "draining",
            (Some(_), false) => "up",
        };
        match s.nodes.get(id) {
            Some(n) => {
                let memory = human_bytes(n.held.len() as u64 * n.bytes_per_expert);
                let _ = writeln!(
                    out,
                    "{:<24} {:<22} {:<6} {:<7} {:>13} {:>12} {:>8}  {state}",
                    id,
                    n.addr,
                    n.device,
                    if n.weights.is_empty() {
                        "-"
                    } else {
                        &n.weights
                    },
                    format!("{}/{}", n.held.len(), n.capacity),
                    memory,
                    placed
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "{:<24} {:<22} {:<6} {:<7} {:>13} {:>12} {:>8}  {state}",
                    id, "-", "-", "-", "-", "-", placed
                );
            }
        }
    }
    if let Some(p) = &s.placement {
        let load = s.total_load(p.num_layers * p.num_experts);
        let per_layer = balancedness(p, &load);
        let known: Vec<(usize, f64)> = per_layer
            .iter()
            .enumerate()
            .filter_map(|(l, b)| b.map(|b| (l, b)))
            .collect();
        if !known.is_empty() {
            let mean = known.iter().map(|(_, b)| b).sum::<f64>() / known.len() as f64;
            let mut worst = known.clone();
            worst.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
            let worst: Vec<String> = worst
                .iter()
                .take(3)
                .map(|(l, b)| format!("layer {l} {b:.3}"))
                .collect();
            let _ = writeln!(
                out,
                "\nbalancedness (mean / max tokens per node, last window): mean {mean:.3}; worst {}",
                worst.join(", ")
            );
        }
        if let Some(r) = &s.rebalance_status {
            let _ = writeln!(out, "last rebalance ({}): {}", r.id, rebalance_line(r));
        }
        let _ = writeln!(
            out,
            "\nplacement (expert: nodes [tokens routed, last window])"
        );
        for l in 0..p.num_layers {
            let _ = write!(out, "layer {l:>3}:");
            if let Some(b) = per_layer[l] {
                let _ = write!(out, " [{b:.2}]");
            }
            let layer_load = &load[l * p.num_experts..(l + 1) * p.num_experts];
            if p.num_experts <= WIDE_LAYER {
                for (e, tokens) in layer_load.iter().enumerate() {
                    let holders: Vec<&str> = p.holders_of(l, e).map(|n| n.id.as_str()).collect();
                    let _ = write!(out, "  e{e}={} [{tokens}]", holders.join("+"));
                }
            } else {
                let _ = write!(out, "{}", layer_summary(p, l, layer_load));
            }
            let _ = writeln!(out);
        }
    } else if let Some(reason) = &s.placement_invalid {
        let _ = writeln!(
            out,
            "\nthe placement key holds an unusable record ({reason}); the leader overwrites it"
        );
    } else {
        let _ = writeln!(out, "\nno placement published yet");
    }
    out
}

/// "Done: mean balancedness 0.76 -> 0.95, placement epoch 7 (detail)".
fn rebalance_line(s: &RebalanceStatus) -> String {
    let fmt = |b: Option<f64>| b.map_or("-".to_owned(), |b| format!("{b:.3}"));
    let detail = if s.detail.is_empty() {
        String::new()
    } else {
        format!(" ({})", s.detail)
    };
    format!(
        "{:?}: mean balancedness {} -> {}, placement epoch {}{detail}",
        s.state,
        fmt(s.before),
        fmt(s.after),
        s.epoch
    )
}

/// Layers with more experts than this get one summary line each instead of one entry per
/// expert (DeepSeek-V3's 256 would make 58 lines of 5,000 characters).
const WIDE_LAYER: usize = 16;

/// Experts per node, the replica range, and the three hottest experts of layer `l`.
fn layer_summary(
    p: &switchyard_cluster::records::PlacementRecord,
    l: usize,
    load: &[u64],
) -> String {
    let mut per_node: std::collections::BTreeMap<&str, usize> = Default::default();
    let (mut fewest, mut most) = (usize::MAX, 0);
    for e in 0..p.num_experts {
        let mut copies = 0;
        for n in p.holders_of(l, e) {
            *per_node.entry(n.id.as_str()).or_default() += 1;
            copies += 1;
        }
        fewest = fewest.min(copies);
        most = most.max(copies);
    }
    let nodes: Vec<String> = per_node.iter().map(|(id, n)| format!("{id}={n}")).collect();
    let mut hot: Vec<(usize, u64)> = load.iter().copied().enumerate().collect();
    hot.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let total: u64 = load.iter().sum();
    let hottest: Vec<String> = hot
        .iter()
        .take(3)
        .filter(|(_, t)| *t > 0)
        .map(|(e, t)| {
            let holders: Vec<&str> = p.holders_of(l, *e).map(|n| n.id.as_str()).collect();
            format!("e{e}={} [{t}]", holders.join("+"))
        })
        .collect();
    format!(
        "  {} experts, {fewest}-{most} copies; per node {}; {total} tokens, hottest {}",
        p.num_experts,
        nodes.join(" "),
        if hottest.is_empty() {
            "-".to_string()
        } else {
            hottest.join(" ")
        }
    )
}

/// 1536 -> "1.5 KiB".
fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn bytes_read_as_people_write_them() {
        assert_eq!(super::human_bytes(0), "0 B");
        assert_eq!(super::human_bytes(1536), "1.5 KiB");
        assert_eq!(super::human_bytes(11 * 98304), "1.0 MiB");
        assert_eq!(super::human_bytes(96 * 352_321_536), "31.5 GiB");
    }
}
