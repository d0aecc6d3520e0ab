//! Cluster mode against a real etcd and real processes: under a steady stream of
//! greedy requests, nodes die (kill -9), join and drain, etcd goes away and comes back,
//! two coordinators share the nodes, and every request completes with transformers'
//! own greedy output (tests/fixtures).

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::etcd::{Etcd, placed, status, wait_placed};
use common::load::Load;
use common::{Cluster, Proc, cluster_node, exe, golden, golden_texts, greedy, poll, text_of};
use serde_json::json;

fn nodes(etcd: &str, n: usize, args: &[&str]) -> Vec<Proc> {
    (0..n)
        .map(|i| cluster_node(etcd, &format!("n{i}"), args))
        .collect()
}

fn kill_and_keep_serving(replicas: &str) {
    let etcd = Etcd::start();
    let mut ns = nodes(&etcd.url(), 3, &[]);
    let c = Arc::new(Cluster::cluster_coordinator(
        &etcd.url(),
        "c0",
        &["--wire-dtype", "f32", "--replicas", replicas],
    ));
    wait_placed(&etcd.url(), &["n0", "n1", "n2"]);
    let load = Load::start(&c, 4);
    load.wait_for(4);
    ns[1].kill9();
    // Served again after the loss, and the leader publishes a placement without it.
    load.wait_for(8);
    wait_placed(&etcd.url(), &["n0", "n2"]);
    load.wait_for(4);
    load.finish();
    // Without replicas the lost experts were loaded elsewhere mid-step (before the leader
    // replanned); with replicas the replicas took the work and nothing was loaded.
    let metrics = c.client().get("/metrics").expect("GET /metrics").text();
    let recoveries: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("switchyard_expert_recoveries_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the recoveries counter is exported");
    if replicas == "1" {
        assert!(recoveries >= 1, "{recoveries}: {}", c.proc.log_tail());
    } else {
        assert_eq!(recoveries, 0);
    }
    assert!(metrics.contains("switchyard_placement_epoch "), "{metrics}");
}

#[test]
fn kill_9_without_replicas_fails_no_request() {
    kill_and_keep_serving("1");
}

#[test]
fn kill_9_with_replicas_fails_no_request() {
    kill_and_keep_serving("2");
}

#[test]
fn join_and_drain_under_load_fail_no_request() {
    let etcd = Etcd::start();
    let mut ns = nodes(&etcd.url(), 3, &[]);
    let c = Arc::new(Cluster::cluster_coordinator(
        &etcd.url(),
        "c0",
        &["--wire-dtype", "f32"],
    ));
    wait_placed(&etcd.url(), &["n0", "n1", "n2"]);
    let load = Load::start(&c, 4);
    load.wait_for(4);

    // A new node gets its share at the next rebalance.
    ns.push(cluster_node(&etcd.url(), "n3", &[]));
    wait_placed(&etcd.url(), &["n0", "n1", "n2", "n3"]);
    let s = status(&etcd.url());
    let placement = &s["placement"];
    let n3 = placement["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .position(|n| n["id"] == "n3")
        .unwrap();
    let share = placement["holders"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h.as_array().unwrap().iter().any(|x| x == n3))
        .count();
    assert_eq!(share, 8, "32 experts over 4 nodes: {placement}");
    load.wait_for(4);

    // Drain: ctl waits for a placement without the node, then the node exits by itself.
    let out = Command::new(exe())
        .args(["ctl", "--etcd", &etcd.url(), "drain", "n0"])
        .output()
        .expect("running ctl drain");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(placed(&etcd.url()), ["n1", "n2", "n3"]);
    assert!(
        poll(Duration::from_secs(15), || ns[0].exited()),
        "a drained node leaves: {}",
        ns[0].log_tail()
    );
    load.wait_for(4);
    load.finish();
}

#[test]
fn etcd_outage_fails_no_request_and_the_cluster_catches_up() {
    let mut etcd = Etcd::start();
    let _ns = nodes(&etcd.url(), 2, &[]);
    let c = Arc::new(Cluster::cluster_coordinator(
        &etcd.url(),
        "c0",
        &["--wire-dtype", "f32"],
    ));
    wait_placed(&etcd.url(), &["n0", "n1"]);
    let load = Load::start(&c, 3);
    load.wait_for(3);
    etcd.stop();
    let outage = Instant::now();
    load.wait_for(6);
    // Longer than the leases' TTL: nobody may be dropped for etcd's absence.
    while outage.elapsed() < Duration::from_secs(3) {
        load.wait_for(1);
    }
    etcd.restart();
    load.wait_for(3);
    // Caught up: a node joining now is placed.
    let _n2 = cluster_node(&etcd.url(), "n2", &[]);
    wait_placed(&etcd.url(), &["n0", "n1", "n2"]);
    load.wait_for(3);
    load.finish();
}

#[test]
fn two_coordinators_share_three_nodes() {
    let etcd = Etcd::start();
    let _ns = nodes(&etcd.url(), 3, &[]);
    let a = Arc::new(Cluster::cluster_coordinator(
        &etcd.url(),
        "ca",
        &["--wire-dtype", "f32"],
    ));
    let b = Arc::new(Cluster::cluster_coordinator(
        &etcd.url(),
        "cb",
        &["--wire-dtype", "f32"],
    ));
    wait_placed(&etcd.url(), &["n0", "n1", "n2"]);
    let (la, lb) = (Load::start(&a, 2), Load::start(&b, 2));
    la.wait_for(4);
    lb.wait_for(4);
    let leader = status(&etcd.url())["leader"].as_str().map(str::to_owned);
    assert!(matches!(leader.as_deref(), Some("ca" | "cb")), "{leader:?}");

    // The leader dies: the other coordinator takes over and places a joining node.
    let (gone, survivor, survivor_load, gone_load) = if leader.as_deref() == Some("ca") {
        (a, "cb", lb, la)
    } else {
        (b, "ca", la, lb)
    };
    gone_load.finish();
    let mut gone = Arc::try_unwrap(gone)
        .ok()
        .expect("the finished load threads hold no reference");
    gone.proc.kill9();
    let _n3 = cluster_node(&etcd.url(), "n3", &[]);
    wait_placed(&etcd.url(), &["n0", "n1", "n2", "n3"]);
    assert_eq!(status(&etcd.url())["leader"].as_str(), Some(survivor));
    survivor_load.wait_for(4);
    survivor_load.finish();
    // The survivor reports the load it routes, for the leader's hot-expert replicas;
    // the dead one's report went with its lease.
    assert!(
        poll(Duration::from_secs(10), || {
            status(&etcd.url())["loads"]
                .as_array()
                .is_some_and(|l| l.len() == 1 && l[0]["coordinator"] == survivor)
        }),
        "{}",
        status(&etcd.url())
    );
}

#[test]
fn with_no_node_left_requests_fail_fast_with_503() {
    let etcd = Etcd::start();
    let mut ns = nodes(&etcd.url(), 1, &[]);
    let c = Cluster::cluster_coordinator(&etcd.url(), "c0", &["--wire-dtype", "f32"]);
    wait_placed(&etcd.url(), &["n0"]);
    ns[0].kill9();
    let g = &golden()[0];
    let started = Instant::now();
    let r = c
        .client()
        .post_json("/v1/completions", &greedy(&c.model, json!(g.input_ids), 4))
        .expect("POST");
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(c.health().status, 503);
}

#[test]
fn up_with_etcd_runs_a_local_cluster() {
    let c = Cluster::up(&["--etcd", "--wire-dtype", "f32", "--lease-ttl-s", "2"]);
    let g = &golden()[1];
    let v = common::post_ok(
        &c.client(),
        "/v1/completions",
        &greedy(&c.model, json!(g.input_ids), g.greedy_ids.len()),
    );
    assert_eq!(text_of(&v), golden_texts()[1]);
    assert_eq!(c.health().status, 200);
}

/// A node that hangs (SIGSTOP: its connections stay open, nothing answers) is given up
/// after the dispatch deadline, its experts are loaded elsewhere, no request fails; when
/// it wakes up it registers again and gets a share again.
#[test]
fn a_hung_node_is_given_up_after_the_deadline_and_rejoins_when_it_wakes() {
    let etcd = Etcd::start();
    // Leases long enough that the leader cannot replan around the hung node before the
    // first requests after the hang are served: only the deadline can save them.
    let ns = nodes(&etcd.url(), 3, &["--lease-ttl-s", "8"]);
    let c = Arc::new(Cluster::cluster_coordinator(
        &etcd.url(),
        "c0",
        &["--wire-dtype", "f32", "--expert-timeout-ms", "300"],
    ));
    wait_placed(&etcd.url(), &["n0", "n1", "n2"]);
    let load = Load::start(&c, 3);
    load.wait_for(3);
    let pid = ns[1].pid() as libc::pid_t;
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let stopped = Instant::now();
    load.wait_for(3);
    // One deadline, not one per layer and step (a 20-token request would wait out
    // dozens of them): requests complete long before the node's lease runs out.
    let served_again = stopped.elapsed();
    eprintln!("3 requests served {served_again:?} after SIGSTOP");
    assert!(served_again < Duration::from_secs(4), "{served_again:?}");
    wait_placed(&etcd.url(), &["n0", "n2"]);
    unsafe { libc::kill(pid, libc::SIGCONT) };
    wait_placed(&etcd.url(), &["n0", "n1", "n2"]);
    load.wait_for(6);
    load.finish();
}

/// Writes `value` under the cluster's `key` (relative to `/switchyard/default/`), or
/// deletes the key: what an operator with etcdctl, or a restored backup, does.
fn etcd_write(etcd: &str, key: &str, value: Option<&str>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime for the etcd client");
    runtime.block_on(async {
        let cfg = switchyard_cluster::ClusterConfig::new(vec![etcd.to_owned()], "default")
            .expect("cluster config");
        let mut client = cfg.connect().await.expect("connecting to etcd");
        let key = format!("{}{key}", cfg.keys.root());
        match value {
            Some(v) => client.put(key, v, None).await.map(|_| ()),
            None => client.delete(key, None).await.map(|_| ()),
        }
        .expect("writing to etcd");
    });
}

fn epoch(etcd: &str) -> u64 {
    status(etcd)["placement"]["epoch"].as_u64().unwrap_or(0)
}

/// Waits until the leader has published a placement of `want` above epoch `above`.
fn wait_republished(etcd: &str, above: u64, want: &[&str]) {
    let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    assert!(
        poll(Duration::from_secs(15), || epoch(etcd) > above
            && placed(etcd) == want),
        "no placement of {want:?} above epoch {above}: {}",
        status(etcd)
    );
}

/// Issue 22 (1): a record whose shape is not the model's (a hand-written one, or the real
/// one with layers cut) used to kill the coordinator's scheduler for good while /health
/// said ok. It must be ignored, serving must go on, and the leader must overwrite it.
#[test]
fn a_placement_of_another_shape_is_ignored_and_overwritten_under_load() {
    let etcd = Etcd::start();
    let url = etcd.url();
    let _ns = nodes(&url, 3, &[]);
    let c = Arc::new(Cluster::cluster_coordinator(
        &url,
        "c0",
        &["--wire-dtype", "f32"],
    ));
    wait_placed(&url, &["n0", "n1", "n2"]);
    let load = Load::start(&c, 3);
    load.wait_for(3);

    let foreign = json!({"epoch": 100, "num_layers": 1, "num_experts": 1,
        "nodes": [{"id": "n0", "addr": "127.0.0.1:1"}], "holders": [[0]]});
    etcd_write(&url, "placement", Some(&foreign.to_string()));
    load.wait_for(6);
    wait_republished(&url, 100, &["n0", "n1", "n2"]);
    assert_eq!(c.health().status, 200, "{}", c.health().text());

    // The live record with its layers cut to 2, at a newer epoch.
    let mut cut = status(&url)["placement"].clone();
    let experts = cut["num_experts"].as_u64().unwrap() as usize;
    let above = cut["epoch"].as_u64().unwrap() + 50;
    cut["epoch"] = json!(above);
    cut["num_layers"] = json!(2);
    cut["holders"] = json!(cut["holders"].as_array().unwrap()[..2 * experts].to_vec());
    etcd_write(&url, "placement", Some(&cut.to_string()));
    load.wait_for(6);
    wait_republished(&url, above, &["n0", "n1", "n2"]);
    load.wait_for(3);
    load.finish();
    let health = c.health();
    assert_eq!(health.status, 200, "{}", health.text());
}

/// Issue 22 (2): deleting the placement key (lost or restored etcd data) or writing
/// garbage to it sent the leader's epoch back to 1, which every node refused: nothing
/// could be placed again and a new coordinator could not start. The leader must publish
/// above the nodes' epoch, and overwrite garbage.
#[test]
fn a_lost_or_garbage_placement_key_is_republished_above_the_nodes_epoch() {
    let etcd = Etcd::start();
    let url = etcd.url();
    let mut ns = nodes(&url, 2, &[]);
    let c = Arc::new(Cluster::cluster_coordinator(
        &url,
        "c0",
        &["--wire-dtype", "f32"],
    ));
    wait_placed(&url, &["n0", "n1"]);
    // Two joins: the nodes reach epoch 3.
    ns.push(cluster_node(&url, "n2", &[]));
    wait_placed(&url, &["n0", "n1", "n2"]);
    ns.push(cluster_node(&url, "n3", &[]));
    wait_placed(&url, &["n0", "n1", "n2", "n3"]);
    let before = epoch(&url);
    assert!(before >= 3, "{before}");
    let load = Load::start(&c, 3);
    load.wait_for(3);

    etcd_write(&url, "placement", None);
    wait_republished(&url, before, &["n0", "n1", "n2", "n3"]);
    load.wait_for(3);
    // Scale-out and a new coordinator work again.
    ns.push(cluster_node(&url, "n4", &[]));
    wait_placed(&url, &["n0", "n1", "n2", "n3", "n4"]);
    let c1 = Arc::new(Cluster::cluster_coordinator(
        &url,
        "c1",
        &["--wire-dtype", "f32"],
    ));
    let load1 = Load::start(&c1, 1);
    load1.wait_for(2);

    let before = epoch(&url);
    etcd_write(&url, "placement", Some("not json"));
    wait_republished(&url, before, &["n0", "n1", "n2", "n3", "n4"]);
    load.wait_for(3);
    load1.wait_for(1);
    load1.finish();
    load.finish();
}
