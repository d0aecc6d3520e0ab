//! Clients that send their request slowly or never finish it (slowloris), and SIGTERM
//! while such connections are open, on a real `switchyard coordinator` process.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Cluster, Proc, exe, greedy, poll, run_to_exit, tiny_model};
use serde_json::{Value, json};

/// The read timeouts the slowloris tests run with, so that each takes about a second.
const SHORT: &[&str] = &["--header-timeout-s", "1", "--body-timeout-s", "1"];

/// How late a close may come after its timeout on a busy two-core machine.
const SLACK: Duration = Duration::from_secs(3);

/// `switchyard coordinator --in-process`: the whole server in one process, so SIGTERM
/// has no children to wait for and an exit measures the HTTP server alone.
fn coordinator(args: &[&str]) -> Cluster {
    let mut cmd = Command::new(exe());
    cmd.args(["coordinator", "--in-process", "--port", "0", "--model"])
        .arg(tiny_model())
        .args(args);
    let (proc, rest) = Proc::start("coordinator", cmd, "serving ");
    let (model, after) = rest
        .split_once(" on ")
        .unwrap_or_else(|| panic!("unexpected ready line: serving {rest}"));
    let url = after.split_whitespace().next().unwrap_or("").to_owned();
    Cluster {
        proc,
        url,
        model: model.to_owned(),
    }
}

fn connect(c: &Cluster) -> TcpStream {
    let addr = c.url.trim_start_matches("http://");
    let s = TcpStream::connect(addr).expect("connecting to the coordinator");
    s.set_nodelay(true).expect("TCP_NODELAY");
    s
}

/// Everything the server sends until it closes the connection, and when (counted from
/// `since`); `None` if it is still open at `since + limit`.
fn wait_closed(s: &TcpStream, since: Instant, limit: Duration) -> Option<(Duration, Vec<u8>)> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = (since + limit).checked_duration_since(Instant::now())?;
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .expect("setting a read timeout");
        match (&*s).read(&mut buf) {
            Ok(0) => return Some((since.elapsed(), got)),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return None;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            // A reset is a close too.
            Err(_) => return Some((since.elapsed(), got)),
        }
    }
}

/// Writes `bytes` one every 50 ms on a thread, until they run out, a write fails or the
/// returned flag is set.
fn drip(s: &TcpStream, bytes: Vec<u8>) -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut w = s.try_clone().expect("cloning the socket");
    let flag = stop.clone();
    std::thread::spawn(move || {
        for b in bytes {
            if flag.load(Ordering::Relaxed) || w.write_all(&[b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    stop
}

/// A request head that is never finished: a long header that a drip takes minutes over.
fn endless_head() -> Vec<u8> {
    let mut head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Pad: ".to_vec();
    head.resize(head.len() + 4000, b'a');
    head
}

fn status_of(response: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(response);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

fn assert_closed_after_timeout(what: &str, closed: Option<(Duration, Vec<u8>)>, timeout: f64) {
    let timeout = Duration::from_secs_f64(timeout);
    let (after, response) = closed.unwrap_or_else(|| {
        panic!(
            "{what}: the connection was still open {:?} after a {timeout:?} timeout",
            timeout + SLACK
        )
    });
    eprintln!("{what}: closed after {after:?}");
    // Not sooner than the timeout: the close is the timeout's, not some other refusal.
    assert!(
        after + Duration::from_millis(200) >= timeout,
        "{what}: closed after only {after:?}: {}",
        String::from_utf8_lossy(&response)
    );
    if let Some(status) = status_of(&response) {
        assert_eq!(
            status,
            408,
            "{what}: {}",
            String::from_utf8_lossy(&response)
        );
    }
}

#[test]
fn a_client_that_sends_half_its_headers_is_closed_at_the_header_timeout() {
    let c = coordinator(SHORT);
    let silent = connect(&c);
    let half = connect(&c);
    let start = Instant::now();
    (&half)
        .write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Ty")
        .expect("writing half a request head");
    let dripping = connect(&c);
    let stop = drip(&dripping, endless_head());

    for (what, s) in [
        ("half a head", &half),
        ("a head dripping 1 byte / 50 ms", &dripping),
        ("nothing sent", &silent),
    ] {
        assert_closed_after_timeout(
            what,
            wait_closed(s, start, Duration::from_secs(1) + SLACK),
            1.0,
        );
    }
    stop.store(true, Ordering::Relaxed);
    // The server is fine afterwards.
    assert_eq!(c.health().status, 200);
}

#[test]
fn a_request_body_that_does_not_arrive_in_time_gets_408() {
    let c = coordinator(SHORT);
    let head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                Content-Length: 4000\r\n\r\n";
    let partial = connect(&c);
    let start = Instant::now();
    (&partial)
        .write_all(format!("{head}{{\"model\": ").as_bytes())
        .expect("writing a partial request");
    // A body that keeps coming, but too slowly to be done in time: the timeout is for the
    // whole body, not between bytes.
    let dripping = connect(&c);
    (&dripping)
        .write_all(head.as_bytes())
        .expect("writing a request head");
    let mut body = b"{\"prompt\": \"".to_vec();
    body.resize(4000, b'a');
    let stop = drip(&dripping, body);

    for (what, s) in [
        ("a partial body", &partial),
        ("a body dripping 1 byte / 50 ms", &dripping),
    ] {
        let closed = wait_closed(s, start, Duration::from_secs(1) + SLACK);
        assert_closed_after_timeout(what, closed.clone(), 1.0);
        let (_, response) = closed.unwrap_or_default();
        assert_eq!(
            status_of(&response),
            Some(408),
            "{what}: {}",
            String::from_utf8_lossy(&response)
        );
        let text = String::from_utf8_lossy(&response);
        assert!(text.contains("\"request_body_timeout\""), "{what}: {text}");
    }
    stop.store(true, Ordering::Relaxed);
    let metrics = c.client().get("/metrics").expect("GET /metrics").text();
    assert!(
        metrics.contains(r#"endpoint="completions",status="408""#),
        "408s are not counted: {metrics}"
    );
}

/// Long enough to outlast the short read timeouts when read slowly.
const LONG: usize = 490;

fn long_stream(model: &str) -> Value {
    let mut body = greedy(model, json!("Mixture of Experts"), LONG);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    body
}

/// The stream's remaining events end well: `[DONE]` after a usage chunk with every token.
fn assert_complete(events: &[String]) {
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let usage = events
        .iter()
        .rev()
        .nth(1)
        .map(|e| serde_json::from_str::<Value>(e).expect("an event is JSON"))
        .expect("a usage event before [DONE]");
    assert_eq!(
        usage["usage"]["completion_tokens"], LONG,
        "the stream was cut short: {usage}"
    );
}

#[test]
fn the_read_timeouts_do_not_cut_a_response_that_takes_longer() {
    let c = coordinator(SHORT);
    let mut s = c
        .client()
        .post_stream("/v1/completions", &long_stream(&c.model))
        .expect("POST a stream");
    assert_eq!(s.status, 200);
    s.next_event().expect("reading").expect("a first event");
    // A client that reads slowly: the response outlives both read timeouts.
    std::thread::sleep(Duration::from_millis(2500));
    assert_complete(&s.events().expect("reading the stream"));
}

fn sigterm(c: &Cluster) -> Instant {
    unsafe { libc::kill(c.proc.pid() as libc::pid_t, libc::SIGTERM) };
    Instant::now()
}

/// Waits up to `limit` for the process to exit; returns how long it took after `since`.
fn wait_exit(c: &mut Cluster, since: Instant, limit: Duration) -> Duration {
    let mut status = None;
    let exited = poll(limit, || {
        status = c
            .proc
            .child
            .try_wait()
            .expect("waiting for the coordinator");
        status.is_some()
    });
    let took = since.elapsed();
    assert!(
        exited,
        "still running {took:?} after SIGTERM: {}",
        c.proc.log_tail()
    );
    let status = status.expect("an exit status");
    assert!(
        status.success(),
        "exited with {status}: {}",
        c.proc.log_tail()
    );
    took
}

#[test]
fn sigterm_finishes_requests_in_flight_and_closes_half_sent_connections() {
    // Default read timeouts (10 s, 30 s): what ends these connections is the shutdown.
    let mut c = coordinator(&[]);
    let mut stream = c
        .client()
        .post_stream("/v1/completions", &long_stream(&c.model))
        .expect("POST a stream");
    assert_eq!(stream.status, 200);
    stream
        .next_event()
        .expect("reading")
        .expect("a first event");
    let half = connect(&c);
    (&half)
        .write_all(b"GET /health HTTP/1.1\r\nHo")
        .expect("writing half a request head");
    let dripping = connect(&c);
    let stop = drip(&dripping, endless_head());
    let idle = connect(&c);
    let partial = connect(&c);
    (&partial)
        .write_all(PARTIAL_BODY.as_bytes())
        .expect("writing a partial request");
    // Every connection is accepted before the signal (a request on a later one is
    // served), and the stream is still generating.
    let h = c.health();
    assert_eq!(h.status, 200);
    assert_eq!(h.json()["running"], 1, "the stream finished before SIGTERM");

    let signalled = sigterm(&c);
    assert_complete(&stream.events().expect("reading the stream"));
    eprintln!("the stream ended {:?} after SIGTERM", signalled.elapsed());
    let took = wait_exit(&mut c, signalled, Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    // A request still waiting for its body has not started: it is refused, to be sent
    // again elsewhere, rather than waited for.
    let (_, response) = wait_closed(&partial, signalled, Duration::from_secs(3))
        .expect("the partial request's connection is closed");
    assert_eq!(
        status_of(&response),
        Some(503),
        "{}",
        String::from_utf8_lossy(&response)
    );
    for (what, s) in [("half a head", &half), ("idle", &idle)] {
        assert!(
            wait_closed(s, Instant::now(), Duration::from_secs(1)).is_some(),
            "{what}: still open after the coordinator exited"
        );
    }
    eprintln!("exited {took:?} after SIGTERM");
}

/// A request whose body stops after a few bytes.
const PARTIAL_BODY: &str =
    "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"mo";

#[test]
fn sigterm_stops_waiting_for_requests_in_progress_after_the_grace_period() {
    // One sequence at a time: the queue takes several seconds, the grace period one.
    let mut c = coordinator(&["--shutdown-grace-s", "1", "--max-running", "1"]);
    let body = greedy(&c.model, json!("Mixture of Experts"), LONG);
    let n = 12;
    let sockets: Vec<TcpStream> = (0..n)
        .map(|_| {
            c.client()
                .send_json("/v1/completions", &body)
                .expect("POST")
        })
        .collect();
    let queued = poll(Duration::from_secs(10), || {
        let h = c.health().json();
        h["running"] == 1 && h["waiting"].as_u64() >= Some(n as u64 / 2)
    });
    assert!(queued, "the requests did not queue up");

    let signalled = sigterm(&c);
    let took = wait_exit(&mut c, signalled, Duration::from_secs(1) + SLACK);
    eprintln!("exited {took:?} after SIGTERM with a 1 s grace period");
    assert!(
        took + Duration::from_millis(200) >= Duration::from_secs(1),
        "exited after {took:?}, before the 1 s grace period was over"
    );
    let answered = sockets
        .iter()
        .filter(|s| {
            wait_closed(s, Instant::now(), Duration::from_secs(1))
                .is_some_and(|(_, r)| status_of(&r) == Some(200))
        })
        .count();
    assert!(
        answered < n,
        "all {n} requests finished within the grace period: the test proves nothing"
    );
}

#[test]
fn timeout_flags_out_of_range_are_refused_at_start() {
    for arg in [
        "--header-timeout-s=0",
        "--body-timeout-s=-1",
        "--shutdown-grace-s=nan",
        "--header-timeout-s=1e12",
    ] {
        let mut cmd = Command::new(exe());
        cmd.args(["coordinator", "--in-process", "--port", "0", "--model"])
            .arg(tiny_model())
            .arg(arg);
        let (status, stderr) = run_to_exit(cmd, Duration::from_secs(30));
        assert!(!status.success(), "{arg} was accepted");
        let flag = arg.split('=').next().unwrap_or(arg);
        assert!(stderr.contains(flag), "{arg}: {stderr}");
    }
}
