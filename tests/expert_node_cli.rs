//! `switchyard expert-node` as a process: it announces its address on stdout, answers
//! gRPC, refuses a bad expert spec, and exits cleanly on SIGTERM.

mod common;

use std::io::{BufRead, BufReader};

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mixtral-tiny")
}

/// Kills the node if the test fails before stopping it.
struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn expert_node_prints_its_address_and_serves_describe() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["expert-node", "--experts", "0,5", "--model"])
        .arg(fixture())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut node = Node(child);

    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let addr = line
        .trim_end()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    let port: u16 = addr
        .strip_prefix("127.0.0.1:")
        .unwrap_or_else(|| panic!("not a loopback address: {addr}"))
        .parse()
        .unwrap();
    assert_ne!(port, 0);

    let info = common::describe_node(addr);
    assert_eq!(info.node_id, addr);
    assert_eq!(info.model, "mixtral-tiny");
    assert_eq!(info.num_layers, 4);
    let held: Vec<(u32, u32)> = info.held.iter().map(|r| (r.layer, r.expert)).collect();
    let want: Vec<(u32, u32)> = (0..4).flat_map(|l| [(l, 0), (l, 5)]).collect();
    assert_eq!(held, want);

    // SIGTERM is a clean shutdown.
    let status = Command::new("kill")
        .args(["-TERM", &node.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Some(exit) = node.0.try_wait().unwrap() {
            break exit;
        }
        assert!(Instant::now() < deadline, "node ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "{exit}");
}

#[test]
fn expert_node_refuses_a_bad_expert_spec() {
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["expert-node", "--experts", "0,9", "--model"])
        .arg(fixture())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("`9`") && stderr.contains("out of range"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}

/// Counts of tokens per (layer, expert) on the node's `/metrics` equal what was sent.
#[test]
fn expert_node_metrics_count_the_tokens_each_expert_computed() {
    use switchyard_coordinator::placement::Placement;
    use switchyard_coordinator::remote::{NodeLink, RemoteExperts};
    use switchyard_engine::{Experts, Routing};

    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([
            "expert-node",
            "--experts",
            "all",
            "--metrics-listen",
            "127.0.0.1:0",
            "--model",
        ])
        .arg(fixture())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let _node = Node(child);
    let mut lines = BufReader::new(stdout).lines();
    let grpc = lines
        .next()
        .unwrap()
        .unwrap()
        .strip_prefix("listening on ")
        .unwrap()
        .to_owned();
    let metrics = lines
        .next()
        .unwrap()
        .unwrap()
        .strip_prefix("metrics on ")
        .unwrap()
        .to_owned();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let link = runtime
        .block_on(NodeLink::connect(&grpc, None, Default::default()))
        .unwrap();
    let placement = Placement::round_robin(4, 8, 1, 1).unwrap();
    let experts = RemoteExperts::new(
        runtime.handle().clone(),
        vec![link],
        placement,
        64,
        switchyard_proto::WireFormat::F32,
        Duration::from_secs(10),
    );
    // Three tokens of layer 1 choosing (2, 7), (7, 2), (5, 2): expert 2 sees 3 tokens, 7 two, 5 one.
    let routing = Routing {
        k: 2,
        experts: vec![2, 7, 7, 2, 5, 2],
        weights: vec![0.5; 6],
    };
    let x: Vec<f32> = (0..3 * 64).map(|i| (i as f32 * 0.01).sin()).collect();
    let y = experts.forward(1, &x, &routing).unwrap();
    assert_eq!(y.len(), x.len());

    let scrape = http_get(&metrics, "/metrics");
    let count = |layer: u32, expert: u32| -> u64 {
        let key = format!(
            "switchyard_node_expert_tokens_total{{expert=\"{expert}\",layer=\"{layer}\"}} "
        );
        scrape
            .lines()
            .find_map(|l| l.strip_prefix(&key))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or_else(|| panic!("no {key} in:\n{scrape}"))
    };
    assert_eq!(count(1, 2), 3);
    assert_eq!(count(1, 7), 2);
    assert_eq!(count(1, 5), 1);
    assert_eq!(count(0, 2), 0);
    assert!(
        scrape.contains("switchyard_node_forward_requests_total{outcome=\"ok\"} 1"),
        "{scrape}"
    );
    assert!(
        scrape.contains("switchyard_node_compute_seconds_count 1"),
        "{scrape}"
    );
}

/// A plain HTTP/1.0 GET, enough for a metrics page.
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(
        out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200"),
        "{out}"
    );
    out
}
