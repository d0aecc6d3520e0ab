//! Serving when things go wrong, each on its own cluster of real processes: a full
//! queue (429), a dead or stalled expert node (503), clients that hang up mid-request,
//! and `switchyard up` stopped with SIGKILL or SIGTERM.

mod common;

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::{
    Cluster, assert_error, children_of, expert_node, greedy, is_gone, poll, post_ok, text_of,
};
use serde_json::{Value, json};

#[test]
fn a_full_queue_answers_429_with_retry_after_and_admitted_requests_complete() {
    // One running, one waiting: a third request at the same time has nowhere to go.
    let c = Cluster::up(&["--nodes", "3", "--max-running", "1", "--max-waiting", "1"]);
    let client = c.client();
    let n = 12;
    let max_tokens = 300;
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let (client, barrier) = (client.clone(), barrier.clone());
            let body = greedy(&c.model, json!(format!("request {i}")), max_tokens);
            std::thread::spawn(move || {
                barrier.wait();
                client.post_json("/v1/completions", &body).unwrap()
            })
        })
        .collect();
    let responses: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let mut refused = 0;
    for r in &responses {
        if r.status == 429 {
            refused += 1;
            let err = assert_error(r, 429, "queue full");
            assert_eq!(err["type"], "rate_limit_error", "{err}");
            let retry = r.header("retry-after").expect("429 without Retry-After");
            assert!(retry.parse::<u64>().is_ok(), "Retry-After: {retry}");
        } else {
            assert_eq!(r.status, 200, "{}", r.text());
            let v = r.json();
            assert_eq!(v["usage"]["completion_tokens"], max_tokens, "{v}");
            assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
        }
    }
    assert!(refused >= 1, "no 429 among {n} simultaneous requests");
    assert!(refused < n, "every request was refused");
    // Refusals leave nothing behind.
    let h = c.health().json();
    assert_eq!(h["waiting"], 0, "{h}");
    assert_eq!(h["running"], 0, "{h}");
}

#[test]
fn a_killed_expert_node_makes_completions_and_health_503() {
    let nodes: Vec<_> = (0..3).map(expert_node).collect();
    let addrs: Vec<String> = nodes.iter().map(|(_, a)| a.clone()).collect();
    let mut nodes: Vec<_> = nodes.into_iter().map(|(p, _)| p).collect();
    let c = Cluster::coordinator(&addrs, &["--wire-dtype", "f32"]);
    let client = c.client();
    let body = greedy(&c.model, json!("Mixture of Experts"), 8);
    post_ok(&client, "/v1/completions", &body);
    assert_eq!(c.health().status, 200);

    // Streams in flight when the node dies end with an error event, not a hang and not
    // a silently short answer.
    let mut long = greedy(&c.model, json!("Mixture of Experts"), LONG);
    long["stream"] = json!(true);
    let mut streams: Vec<_> = (0..4)
        .map(|_| client.post_stream("/v1/completions", &long).unwrap())
        .collect();
    for s in &mut streams {
        assert_eq!(s.status, 200);
        s.next_event().unwrap().expect("stream ended early");
    }
    nodes[1].kill9();
    let killed = Instant::now();
    for s in streams {
        let events = s.events().unwrap();
        assert_eq!(
            events.last().map(String::as_str),
            Some("[DONE]"),
            "{events:?}"
        );
        let error = events
            .iter()
            .rev()
            .nth(1)
            .expect("an error event before [DONE]");
        let v: Value = serde_json::from_str(error).unwrap();
        assert_eq!(
            v["error"]["code"], "experts_unavailable",
            "expected an error event, got {error}"
        );
    }
    assert!(
        killed.elapsed() < Duration::from_secs(10),
        "streams took {:?} to fail",
        killed.elapsed()
    );

    // Its tokens route to some of the dead node's experts (the experts of every layer
    // are spread over the three nodes; greedy, so always the same ones). It must fail
    // fast, not wait out the 10 s expert time-out.
    let started = Instant::now();
    let r = client.post_json("/v1/completions", &body).unwrap();
    let took = started.elapsed();
    let err = assert_error(&r, 503, "completion with a dead node");
    assert_eq!(err["code"], "experts_unavailable", "{err}");
    assert!(took < Duration::from_secs(10), "503 took {took:?}");

    let mut last = None;
    let down = poll(Duration::from_secs(10), || {
        let h = c.health();
        let done = h.status == 503;
        last = Some(h);
        done
    });
    let h = last.unwrap();
    assert!(down, "/health still {} after 10 s: {}", h.status, h.text());
    let err = assert_error(&h, 503, "/health with a dead node");
    assert!(
        err["message"].as_str().unwrap().contains(&addrs[1]),
        "/health should name the dead node {}: {err}",
        addrs[1]
    );

    // Streaming requests fail with a status too, not with a 200 stream.
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let s = client.post_stream("/v1/completions", &sbody).unwrap();
    assert_error(&s.into_response().unwrap(), 503, "stream with a dead node");
}

#[test]
fn a_stalled_expert_node_gives_503_after_the_expert_timeout_and_the_cluster_recovers() {
    // SIGSTOP: the node's sockets stay open, so only the time-out can tell.
    let nodes: Vec<_> = (0..3).map(expert_node).collect();
    let addrs: Vec<String> = nodes.iter().map(|(_, a)| a.clone()).collect();
    let c = Cluster::coordinator(&addrs, &["--expert-timeout-ms", "1000"]);
    let client = c.client();
    let body = greedy(&c.model, json!("Mixture of Experts"), 8);
    let before = text_of(&post_ok(&client, "/v1/completions", &body));

    let stalled = nodes[2].0.pid() as libc::pid_t;
    unsafe { libc::kill(stalled, libc::SIGSTOP) };
    let started = Instant::now();
    let r = client.post_json("/v1/completions", &body);
    let took = started.elapsed();
    unsafe { libc::kill(stalled, libc::SIGCONT) };
    let err = assert_error(&r.unwrap(), 503, "completion with a stalled node");
    assert_eq!(err["code"], "experts_unavailable", "{err}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(10),
        "503 after {took:?} with a 1 s expert time-out"
    );

    // The node that missed its deadline counts as down until the coordinator's reconnect
    // loop (every 0.5 s) gets through to it again; then the cluster serves the same answer.
    assert!(
        poll(Duration::from_secs(10), || c.health().status == 200),
        "the node never came back: {}",
        c.health().text()
    );
    let again = text_of(&post_ok(&client, "/v1/completions", &body));
    assert_eq!(again, before);
}

fn health_numbers(c: &Cluster) -> Value {
    let h = c.health();
    assert_eq!(h.status, 200, "{}", h.text());
    h.json()
}

/// The longest greedy request the 512-token context allows for a short prompt; with one
/// sequence, one scheduler step per token.
const LONG: usize = 490;

/// Asserts that after a client hangs up, the server's numbers go back to idle, and sooner
/// than finishing the request would take.
fn assert_freed_after_hang_up(c: &Cluster, total_blocks: u64, hang_up: impl FnOnce()) {
    let busy = health_numbers(c);
    assert_eq!(busy["running"], 1, "{busy}");
    assert!(
        busy["kv_free_blocks"].as_u64().unwrap() < total_blocks,
        "a running sequence holds blocks: {busy}"
    );
    let steps_at_hang_up = busy["steps"].as_u64().unwrap();
    hang_up();

    let mut last = busy;
    let freed = poll(Duration::from_secs(10), || {
        last = health_numbers(c);
        last["running"] == 0
            && last["waiting"] == 0
            && last["kv_free_blocks"].as_u64() == Some(total_blocks)
    });
    assert!(freed, "not freed within 10 s of the hang-up: {last}");
    // Finishing all the tokens would also free it; the step counter tells the two apart.
    let steps = last["steps"].as_u64().unwrap() - steps_at_hang_up;
    assert!(
        steps < LONG as u64 / 2,
        "{steps} more steps ran after the client left: its sequence was not cancelled"
    );

    // And the server still serves.
    let v = post_ok(
        &c.client(),
        "/v1/completions",
        &greedy(&c.model, json!("again"), 4),
    );
    assert!(!text_of(&v).is_empty());
}

/// An idle cluster of its own (these tests read the scheduler's global numbers) and its
/// KV-cache size.
fn idle_cluster() -> (Cluster, u64) {
    let c = Cluster::up(&["--nodes", "3"]);
    let idle = health_numbers(&c);
    let total = idle["kv_total_blocks"].as_u64().unwrap();
    assert!(total > 0, "{idle}");
    assert_eq!(idle["kv_free_blocks"].as_u64(), Some(total), "{idle}");
    (c, total)
}

#[test]
fn a_client_that_disconnects_mid_stream_frees_its_sequence_and_kv_blocks() {
    let (c, total) = idle_cluster();
    let mut body = greedy(&c.model, json!("Mixture of Experts"), LONG);
    body["stream"] = json!(true);
    let mut s = c.client().post_stream("/v1/completions", &body).unwrap();
    assert_eq!(s.status, 200);
    for _ in 0..2 {
        let ev = s.next_event().unwrap().expect("stream ended early");
        assert_ne!(ev, "[DONE]");
    }
    assert_freed_after_hang_up(&c, total, || drop(s));
}

#[test]
fn a_client_that_disconnects_before_a_non_streamed_answer_frees_its_sequence() {
    let (c, total) = idle_cluster();
    let body = greedy(&c.model, json!("Mixture of Experts"), LONG);
    let socket = c.client().send_json("/v1/completions", &body).unwrap();
    let started = poll(Duration::from_secs(10), || {
        health_numbers(&c)["running"] == 1
    });
    assert!(started, "the request never started running");
    assert_freed_after_hang_up(&c, total, || drop(socket));
}

#[test]
fn sigkill_of_up_leaves_no_child_process() {
    let mut c = Cluster::up(&["--nodes", "3"]);
    let up = c.proc.pid();
    let kids = children_of(up);
    assert_eq!(
        kids.len(),
        3,
        "expected 3 expert nodes under up ({up}): {kids:?}"
    );

    c.proc.kill9();
    let gone = poll(Duration::from_secs(10), || kids.iter().all(|&p| is_gone(p)));
    let alive: Vec<u32> = kids.iter().copied().filter(|&p| !is_gone(p)).collect();
    for &p in &alive {
        // Do not leave them behind for the next test run.
        unsafe {
            libc::kill(p as libc::pid_t, libc::SIGKILL);
        }
    }
    assert!(gone, "expert nodes {alive:?} outlived `up` by 10 s");
}

#[test]
fn sigterm_stops_up_and_its_nodes_cleanly() {
    // What `docker stop` and Kubernetes send.
    let mut c = Cluster::up(&["--nodes", "3"]);
    let up = c.proc.pid();
    let kids = children_of(up);
    assert_eq!(
        kids.len(),
        3,
        "expected 3 expert nodes under up ({up}): {kids:?}"
    );

    unsafe { libc::kill(up as libc::pid_t, libc::SIGTERM) };
    let mut status = None;
    let exited = poll(Duration::from_secs(10), || {
        status = c.proc.child.try_wait().unwrap();
        status.is_some()
    });
    assert!(exited, "up ignored SIGTERM for 10 s: {}", c.proc.log_tail());
    let status = status.unwrap();
    assert!(
        status.success(),
        "up exited with {status}: {}",
        c.proc.log_tail()
    );
    let gone = poll(Duration::from_secs(10), || kids.iter().all(|&p| is_gone(p)));
    assert!(gone, "expert nodes outlived a clean stop of `up`");
}

/// UnloadExperts for one expert of a node's share, as a confused operator or a stray
/// tool might send it (plaintext gRPC, static epoch 0).
fn unload_on(addr: &str, layer: u32, expert: u32) {
    common::node_rpc(addr, |mut client| async move {
        client
            .unload_experts(switchyard_proto::pb::ExpertsRequest {
                experts: vec![switchyard_proto::pb::ExpertRef { layer, expert }],
                epoch: 0,
            })
            .await
            .expect("UnloadExperts");
    });
}

fn holds(addr: &str, layer: u32, expert: u32) -> bool {
    common::describe_node(addr)
        .held
        .iter()
        .any(|r| r.layer == layer && r.expert == expert)
}

/// Issue 22 (5): in static mode a node that lost an expert of its share (here: unloaded
/// behind the coordinator's back) made every prompt routed to it fail with 503 for good,
/// while /health said ok. The coordinator must reload it, in the step that finds it
/// missing, and without any request by its periodic audit.
#[test]
fn static_mode_reloads_an_expert_a_node_lost() {
    let nodes: Vec<_> = (0..2).map(expert_node).collect();
    let addrs: Vec<String> = nodes.iter().map(|(_, a)| a.clone()).collect();
    let c = Cluster::coordinator(&addrs, &["--wire-dtype", "f32"]);
    let client = c.client();
    // Round-robin placement: expert 0 of layer 0 lives on node 0.
    assert!(holds(&addrs[0], 0, 0));

    // Found by the next step that routes to it: every prompt still gets its answer.
    unload_on(&addrs[0], 0, 0);
    assert!(!holds(&addrs[0], 0, 0));
    let expected = common::golden_texts();
    for (g, want) in common::golden().iter().zip(&expected) {
        let body = greedy(&c.model, json!(g.input_ids), g.greedy_ids.len());
        assert_eq!(&text_of(&post_ok(&client, "/v1/completions", &body)), want);
    }
    assert!(holds(&addrs[0], 0, 0), "{}", c.proc.log_tail());

    // Found by the audit with no traffic at all.
    unload_on(&addrs[0], 0, 0);
    assert!(
        poll(Duration::from_secs(10), || holds(&addrs[0], 0, 0)),
        "the lost expert was never reloaded: {}",
        c.proc.log_tail()
    );
    assert_eq!(c.health().status, 200, "{}", c.health().text());
}

/// Issue 22 (6): `up` stopped its nodes 5 s after SIGTERM while requests it had accepted
/// were still queued, and those failed with 503. It must stop them only after its
/// coordinator has drained.
#[test]
fn sigterm_lets_up_finish_every_accepted_request_before_its_nodes_stop() {
    const REQUESTS: usize = 20;
    const TOKENS: usize = 400;
    let mut c = Cluster::up(&["--max-running", "1"]);
    let started = Instant::now();
    let body = json!({"model": c.model, "prompt": "Mixture of Experts", "max_tokens": TOKENS,
        "temperature": 0, "ignore_eos": true});
    let clients: Vec<_> = (0..REQUESTS)
        .map(|_| {
            let (client, body) = (c.client(), body.clone());
            std::thread::spawn(move || client.post_json("/v1/completions", &body))
        })
        .collect();
    // Every request accepted (running or queued) before the signal.
    assert!(
        poll(Duration::from_secs(10), || {
            let h = health_numbers(&c);
            h["running"].as_u64().unwrap_or(0) + h["waiting"].as_u64().unwrap_or(0)
                == REQUESTS as u64
        }),
        "{}",
        c.health().text()
    );
    unsafe { libc::kill(c.proc.pid() as libc::pid_t, libc::SIGTERM) };
    let signalled = Instant::now();
    for client in clients {
        let r = client.join().expect("client thread").expect("POST");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["usage"]["completion_tokens"], TOKENS);
    }
    let drained = signalled.elapsed();
    let mut status = None;
    assert!(
        poll(Duration::from_secs(10), || {
            status = c.proc.child.try_wait().unwrap();
            status.is_some()
        }),
        "up did not exit after draining: {}",
        c.proc.log_tail()
    );
    assert!(status.unwrap().success(), "{}", c.proc.log_tail());
    eprintln!(
        "{REQUESTS} x {TOKENS} tokens: drained {drained:?} after SIGTERM ({:?} in all)",
        started.elapsed()
    );
}
