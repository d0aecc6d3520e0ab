//! `switchyard up` under `switchyard bench`: a real load run completes without a
//! failure or a probe mismatch, and the bench's counts agree with the server's own
//! /metrics counters, two independent tallies of the same requests.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

const EXE: &str = env!("CARGO_BIN_EXE_switchyard");

/// `up` as a child: SIGTERM when dropped (it stops its nodes), SIGKILL if it lingers.
struct Up {
    child: Child,
    log: tempfile::NamedTempFile,
}

impl Up {
    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the pid of a child we have not reaped yet.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `up --port 0` and waits for its `serving <model> on <url> (...)` line.
fn start_up() -> (Up, String) {
    let log = tempfile::NamedTempFile::new().expect("a log file");
    let stderr = log.reopen().expect("reopening the log file");
    let mut child = Command::new(EXE)
        .args(["up", "--port", "0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(stderr))
        .spawn()
        .expect("starting switchyard up");
    let stdout = child.stdout.take().expect("piped stdout");
    let up = Up { child, log };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        for line in lines.by_ref().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("serving ") {
                let url = rest
                    .split(" on ")
                    .nth(1)
                    .and_then(|s| s.split_whitespace().next())
                    .map(str::to_owned);
                let _ = tx.send(url);
                break;
            }
        }
        // Keep draining so `up` never blocks on a full pipe.
        for _ in lines {}
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(Some(url)) => (up, url),
        _ => panic!("up printed no `serving ... on URL` line:\n{}", up.log()),
    }
}

/// GET over a fresh connection; the body of a `Connection: close` response.
fn get(url: &str, path: &str) -> String {
    let addr = url.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).expect("connecting to the server");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("setting a read timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("sending the request");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("reading the response");
    let (head, body) = resp.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "GET {path}: {head}");
    body.to_owned()
}

/// Sum of the samples of `name` whose labels include all of `labels` (0 when the
/// counter has not been touched yet and so is not exported).
fn counter(metrics: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
            let rest = rest.strip_suffix('}')?;
            let matches = metric == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
            matches.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum::<f64>() as u64
}

fn run_with_timeout(mut cmd: Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting switchyard bench");
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return child.wait_with_output().expect("collecting bench output");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let out = child.wait_with_output().expect("collecting bench output");
    panic!(
        "bench did not finish within {limit:?}:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn bench_against_up_agrees_with_the_servers_metrics() {
    let (up, url) = start_up();
    let completions_200 = [("endpoint", "completions"), ("status", "200")];
    let before = get(&url, "/metrics");

    let dir = tempfile::tempdir().expect("tempdir");
    let result = dir.path().join("result.json");
    let mut cmd = Command::new(EXE);
    cmd.args(["bench", "--base-url", &url])
        .args(["--num-prompts", "50", "--request-rate", "inf"])
        .args(["--max-concurrency", "8"])
        .args(["--random-input-len", "32", "--random-output-len", "16"])
        .args(["--ignore-eos", "--probe-fraction", "0.2"])
        .arg("--save-result")
        .arg(&result);
    let out = run_with_timeout(cmd, Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed ({}):\n{stdout}\n{}\nup's log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        up.log()
    );
    let after = get(&url, "/metrics");
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(&result).expect("bench wrote --save-result"))
            .expect("the result is JSON");

    assert_eq!(r["failed"], 0, "{stdout}");
    assert_eq!(r["completed"], 50, "{stdout}");
    assert_eq!(r["probe"]["requests"], 10);
    assert_eq!(r["probe"]["mismatches"], 0, "{stdout}");
    let delta = |name: &str, labels: &[(&str, &str)]| {
        counter(&after, name, labels) - counter(&before, name, labels)
    };
    assert_eq!(
        r["completed"].as_u64(),
        Some(delta("switchyard_requests_total", &completions_200)),
        "bench completions vs the server's 200s"
    );
    assert_eq!(
        r["total_output_tokens"].as_u64(),
        Some(delta("switchyard_generation_tokens_total", &[])),
        "bench output tokens vs the server's generated tokens"
    );
    // --ignore-eos: every request generates exactly its max_tokens.
    assert_eq!(r["total_output_tokens"], 50 * 16);
    assert_eq!(
        r["total_input_tokens"].as_u64(),
        Some(delta("switchyard_prompt_tokens_total", &[])),
        "bench input tokens vs the server's prompt tokens"
    );
    drop(up);
}
