//! `switchyard expert-node` as a process: it announces its address on stdout, answers
//! gRPC, refuses a bad expert spec, and exits cleanly on SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use switchyard_proto::ExpertServiceClient;
use switchyard_proto::pb::DescribeRequest;

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

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let info = runtime.block_on(async {
        let mut client = ExpertServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        client
            .describe(DescribeRequest {})
            .await
            .unwrap()
            .into_inner()
    });
    assert_eq!(info.node_id, addr);
    assert_eq!(info.model, "mixtral-tiny");
    assert_eq!(info.num_layers, 4);
    let held: Vec<(u32, u32)> = info.held.iter().map(|r| (r.layer, r.expert)).collect();
    let want: Vec<(u32, u32)> = (0..4).flat_map(|l| [(l, 0), (l, 5)]).collect();
    assert_eq!(held, want);
    // Closes the connection, so that shutdown need not wait out the drain time-out.
    drop(runtime);

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
