//! With replicas, losing an expert node mid-serving loses nothing: every request, those in
//! flight included, completes with the output it would have had.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::delay_proxy::DelayProxy;
use common::{Cluster, expert_node, golden, golden_texts, greedy, post_ok, text_of};
use serde_json::json;

#[test]
fn killing_a_node_with_replicas_fails_no_request_and_changes_no_output() {
    kill_a_node_while_serving(&[], None);
}

/// The same with two micro-batches per step and every node behind a 1 ms link, so that a
/// layer of each micro-batch is on the wire when the node dies: both are re-sent to the
/// replicas, none is lost and none is counted twice (the answers are exact).
#[test]
fn killing_a_node_with_both_micro_batches_in_flight_changes_no_output() {
    kill_a_node_while_serving(&["--micro-batches", "2"], Some(Duration::from_millis(1)));
}

fn kill_a_node_while_serving(args: &[&str], link_delay: Option<Duration>) {
    let nodes: Vec<_> = (0..3).map(expert_node).collect();
    let proxies: Vec<DelayProxy> = match link_delay {
        Some(delay) => nodes
            .iter()
            .map(|(_, a)| {
                let p = DelayProxy::start(a);
                p.set_delay(delay);
                p
            })
            .collect(),
        None => Vec::new(),
    };
    let addrs: Vec<String> = if proxies.is_empty() {
        nodes.iter().map(|(_, a)| a.clone()).collect()
    } else {
        proxies.iter().map(|p| p.addr.clone()).collect()
    };
    let mut nodes: Vec<_> = nodes.into_iter().map(|(p, _)| p).collect();
    let mut flags = vec!["--wire-dtype", "f32", "--replicas", "2"];
    flags.extend_from_slice(args);
    let c = Arc::new(Cluster::coordinator(&addrs, &flags));
    let prompts: Vec<Vec<u32>> = golden().iter().map(|g| g.input_ids.clone()).collect();
    let expected = golden_texts();
    let lengths: Vec<usize> = golden().iter().map(|g| g.greedy_ids.len()).collect();

    // Four clients keep sending the golden prompts; the node dies while they do.
    let done = Arc::new(AtomicUsize::new(0));
    let rounds = 6;
    let clients: Vec<_> = (0..4)
        .map(|client_index| {
            let (c, done) = (c.clone(), done.clone());
            let (prompts, expected, lengths) = (prompts.clone(), expected.clone(), lengths.clone());
            std::thread::spawn(move || {
                let client = c.client();
                for round in 0..rounds {
                    let i = (client_index + round) % prompts.len();
                    let body = greedy(&c.model, json!(prompts[i]), lengths[i]);
                    let v = post_ok(&client, "/v1/completions", &body);
                    assert_eq!(text_of(&v), expected[i], "prompt {i}, round {round}");
                    done.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    // Kill once some requests have completed, so others are surely in flight.
    while done.load(Ordering::SeqCst) < 4 {
        std::thread::yield_now();
    }
    nodes[1].kill9();
    for t in clients {
        t.join().expect("a client saw a failure");
    }
    assert_eq!(done.load(Ordering::SeqCst), 4 * rounds);
    // Every expert still has a live replica: the cluster keeps answering after the loss.
    let v = post_ok(
        &c.client(),
        "/v1/completions",
        &greedy(&c.model, json!(prompts[0]), lengths[0]),
    );
    assert_eq!(text_of(&v), expected[0]);
}

/// A node that dies and comes back on the same address is reconnected and given its
/// experts again, without restarting the coordinator (what rolling restarts and
/// certificate rotation rely on).
#[test]
fn a_restarted_node_is_reconnected_and_reloaded() {
    let nodes: Vec<_> = (0..3).map(expert_node).collect();
    let addrs: Vec<String> = nodes.iter().map(|(_, a)| a.clone()).collect();
    let mut nodes: Vec<_> = nodes.into_iter().map(|(p, _)| p).collect();
    let c = Cluster::coordinator(&addrs, &["--wire-dtype", "f32"]);
    let g = &golden()[1];
    let expected = &golden_texts()[1];
    let body = greedy(&c.model, json!(g.input_ids), g.greedy_ids.len());
    assert_eq!(
        text_of(&post_ok(&c.client(), "/v1/completions", &body)),
        *expected
    );

    nodes[1].kill9();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while c.health().status != 503 {
        assert!(
            std::time::Instant::now() < deadline,
            "the dead node was not noticed"
        );
        std::thread::yield_now();
    }
    // The same address again, with no experts loaded: the coordinator must reload them.
    let mut cmd = std::process::Command::new(common::exe());
    cmd.args(["expert-node", "--listen", &addrs[1], "--model"])
        .arg(common::tiny_model());
    let (_back, _) = common::Proc::start("expert-node-1-again", cmd, "listening on ");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while c.health().status != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "the node was not reconnected"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(
        text_of(&post_ok(&c.client(), "/v1/completions", &body)),
        *expected
    );
}
