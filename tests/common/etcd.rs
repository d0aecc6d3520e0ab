//! A real etcd for the cluster tests: Debian's `etcd-server` (scripts/test installs
//! it), on free loopback ports with a temporary data directory, stopped on drop.

use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

use super::http::Client;
use serde_json::Value;

use super::{Proc, exe, poll};

pub struct Etcd {
    proc: Option<Proc>,
    /// Another address it also serves clients on (a test host's side of a veth pair).
    also_on: Option<String>,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("finding a free port")
}

impl Etcd {
    pub fn start() -> Etcd {
        Etcd::start_also_on(None)
    }

    /// [`Etcd::start`], also serving clients on `ip` (which must exist already).
    pub fn start_also_on(ip: Option<&str>) -> Etcd {
        let mut etcd = Etcd {
            proc: None,
            also_on: ip.map(str::to_owned),
            dir: tempfile::tempdir().expect("temporary data dir"),
            client_port: free_port(),
            peer_port: free_port(),
        };
        // A port found free can be taken by another test before etcd binds it: new ones.
        for _ in 0..3 {
            match etcd.try_restart() {
                Ok(()) => return etcd,
                Err(log) if log.contains("address already in use") => {
                    etcd.proc = None;
                    etcd.client_port = free_port();
                    etcd.peer_port = free_port();
                }
                Err(log) => panic!("etcd did not become healthy: {log}"),
            }
        }
        etcd.restart();
        etcd
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// Starts it (again, on the same data and ports) and waits until it answers /health.
    pub fn restart(&mut self) {
        if let Err(log) = self.try_restart() {
            panic!("etcd did not become healthy: {log}");
        }
    }

    /// [`Etcd::restart`]; its log when it does not become healthy.
    fn try_restart(&mut self) -> Result<(), String> {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut clients = self.url();
        if let Some(ip) = &self.also_on {
            clients.push_str(&format!(",http://{ip}:{}", self.client_port));
        }
        let mut cmd = Command::new(etcd_binary());
        cmd.arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(["--name", "test"])
            .args(["--listen-client-urls", &clients])
            .args(["--advertise-client-urls", &clients])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("test={peer}")])
            .args(["--log-level", "warn"]);
        let mut proc = Proc::spawn("etcd", cmd);
        let client = Client::new(&self.url());
        let healthy = poll(Duration::from_secs(20), || {
            proc.exited()
                || client
                    .get("/health")
                    .is_ok_and(|r| r.status == 200 && r.text().contains("true"))
        });
        let ok = healthy && !proc.exited();
        let log = proc.log_tail();
        self.proc = Some(proc);
        if ok { Ok(()) } else { Err(log) }
    }

    /// Stops it (SIGTERM, as an operator would) and waits for it to exit.
    pub fn stop(&mut self) {
        drop(self.proc.take());
    }
}

/// Debian installs etcd 3.4 as /usr/bin/etcd.
pub fn etcd_binary() -> String {
    for candidate in ["/usr/bin/etcd", "/usr/local/bin/etcd"] {
        if std::path::Path::new(candidate).exists() {
            return candidate.into();
        }
    }
    panic!(
        "etcd is not installed: run scripts/test (it installs Debian's etcd-server) or `apt-get install etcd-server`"
    );
}

/// `switchyard ctl --etcd URL status --json`.
pub fn status(etcd: &str) -> Value {
    let out = Command::new(exe())
        .args(["ctl", "--etcd", etcd, "status", "--json"])
        .output()
        .expect("running ctl status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("ctl status --json prints JSON")
}

/// Node ids in the published placement.
pub fn placed(etcd: &str) -> Vec<String> {
    let s = status(etcd);
    let mut ids: Vec<String> = s["placement"]["nodes"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|n| n["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

/// Waits (30 s at most) until the published placement uses exactly `want`.
pub fn wait_placed(etcd: &str, want: &[&str]) {
    let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    assert!(
        poll(Duration::from_secs(30), || placed(etcd) == want),
        "placement never became {want:?}: {}",
        status(etcd)
    );
}
