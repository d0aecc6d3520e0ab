//! Rebalancing by load against a real etcd and real nodes with limited memory: under a
//! steady stream of greedy requests (every answer checked against transformers' output),
//! `ctl rebalance` and the automatic rebalance move expert copies make-before-break and
//! no request fails, and a node killed right after still costs nothing where every
//! expert has two copies.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::etcd::{Etcd, status, wait_placed};
use common::load::Load;
use common::{Cluster, Proc, cluster_node, exe, poll};
use serde_json::Value;

/// The tiny model has 4 layers of 8 experts. 23 experts per node leave 20 for a plan by
/// load (a tenth is kept free for moves): 5 per layer, 20 copies of 8 experts per layer
/// over 4 nodes.
const MAX_EXPERTS: &str = "23";

fn nodes(etcd: &str) -> Vec<Proc> {
    (0..4)
        .map(|i| cluster_node(etcd, &format!("n{i}"), &["--max-experts", MAX_EXPERTS]))
        .collect()
}

/// Waits until the coordinators' load reports have routed tokens in them.
fn wait_for_load_reports(etcd: &str) {
    let reported = || {
        status(etcd)["loads"].as_array().is_some_and(|loads| {
            loads.iter().any(|r| {
                r["tokens"]
                    .as_array()
                    .is_some_and(|t| t.iter().any(|v| v.as_u64().unwrap_or(0) > 0))
            })
        })
    };
    assert!(poll(Duration::from_secs(30), reported), "{}", status(etcd));
}

fn epoch(s: &Value) -> u64 {
    s["placement"]["epoch"].as_u64().unwrap_or(0)
}

fn copies(s: &Value) -> Vec<usize> {
    s["placement"]["holders"]
        .as_array()
        .map(|h| h.iter().map(|c| c.as_array().map_or(0, Vec::len)).collect())
        .unwrap_or_default()
}

#[test]
fn ctl_rebalance_raises_balancedness_and_a_node_killed_after_loses_nothing() {
    let etcd = Etcd::start();
    let mut ns = nodes(&etcd.url());
    let c = Arc::new(Cluster::cluster_coordinator(
        &etcd.url(),
        "c0",
        &["--wire-dtype", "f32", "--replicas", "2"],
    ));
    wait_placed(&etcd.url(), &["n0", "n1", "n2", "n3"]);
    let load = Load::start(&c, 3);
    load.wait_for(6);
    wait_for_load_reports(&etcd.url());
    let before = status(&etcd.url());
    assert!(copies(&before).iter().all(|&n| n == 2), "{before}");

    let out = Command::new(exe())
        .args([
            "ctl",
            "--etcd",
            &etcd.url(),
            "rebalance",
            "--timeout-s",
            "60",
        ])
        .output()
        .expect("running ctl rebalance");
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{said}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.proc.log_tail()
    );
    assert!(said.starts_with("rebalance Done"), "{said}");
    let after = status(&etcd.url());
    let answer = &after["rebalance_status"];
    let (b, a) = (answer["before"].as_f64(), answer["after"].as_f64());
    assert!(
        matches!((b, a), (Some(b), Some(a)) if a > b),
        "balancedness {b:?} -> {a:?}"
    );
    assert!(epoch(&after) > epoch(&before));
    // Hot experts got more copies, and none fell under the two asked for.
    let copies_after = copies(&after);
    assert!(copies_after.iter().all(|&n| n >= 2), "{after}");
    assert!(copies_after.iter().any(|&n| n > 2), "{after}");

    load.wait_for(6);
    ns[1].kill9();
    load.wait_for(12);
    wait_placed(&etcd.url(), &["n0", "n2", "n3"]);
    load.wait_for(4);
    load.finish();
}

#[test]
fn the_automatic_rebalance_moves_copies_under_load_and_loses_no_request() {
    let etcd = Etcd::start();
    let _ns = nodes(&etcd.url());
    let c = Arc::new(Cluster::cluster_coordinator(
        &etcd.url(),
        "c0",
        &[
            "--wire-dtype",
            "f32",
            "--rebalance-interval-s",
            "1",
            "--rebalance-below",
            "1",
            "--rebalance-min-gain",
            "0.01",
        ],
    ));
    wait_placed(&etcd.url(), &["n0", "n1", "n2", "n3"]);
    let load = Load::start(&c, 3);
    let done = || {
        let s = status(&etcd.url());
        s["rebalance_status"]["id"] == "auto" && s["rebalance_status"]["state"] == "done"
    };
    assert!(
        poll(Duration::from_secs(60), done),
        "{}\n{}",
        status(&etcd.url()),
        c.proc.log_tail()
    );
    let s = status(&etcd.url());
    assert!(copies(&s).iter().any(|&n| n > 1), "{s}");
    load.wait_for(8);
    load.finish();
}

/// Static mode: `--placement-from` a load file gives the hot expert of every layer a copy
/// on each node, each node at most `--expert-slots` experts of a layer, and the answers
/// stay transformers' own.
#[test]
fn static_nodes_are_placed_by_a_load_file() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let file = dir.path().join("load.json");
    // 4 layers of 8 experts; expert 3 gets almost everything.
    let layer: Vec<u64> = (0..8).map(|e| if e == 3 { 1000 } else { 10 }).collect();
    let tokens = vec![layer; 4];
    std::fs::write(&file, serde_json::json!({ "tokens": tokens }).to_string())
        .expect("writing the load file");
    let nodes: Vec<(Proc, String)> = (0..3)
        .map(|i| {
            let mut cmd = Command::new(exe());
            cmd.args([
                "expert-node",
                "--listen",
                "127.0.0.1:0",
                "--experts",
                "none",
                "--model",
            ])
            .arg(common::tiny_model());
            Proc::start(&format!("expert-node-{i}"), cmd, "listening on ")
        })
        .collect();
    let addrs: Vec<String> = nodes.iter().map(|(_, a)| a.clone()).collect();
    let path = file.to_string_lossy().to_string();
    let c = Arc::new(Cluster::coordinator(
        &addrs,
        &[
            "--wire-dtype",
            "f32",
            "--placement-from",
            &path,
            "--expert-slots",
            "4",
        ],
    ));
    let load = Load::start(&c, 2);
    load.wait_for(6);
    load.finish();
    for (_, addr) in &nodes {
        let held: Vec<(u32, u32)> = common::describe_node(addr)
            .held
            .iter()
            .map(|r| (r.layer, r.expert))
            .collect();
        for l in 0..4 {
            assert!(
                held.contains(&(l, 3)),
                "{addr} lacks the hot expert of layer {l}: {held:?}"
            );
            let of_layer = held.iter().filter(|(hl, _)| *hl == l).count();
            assert!(
                of_layer <= 4,
                "{addr} holds {of_layer} experts of layer {l}"
            );
        }
    }
}
