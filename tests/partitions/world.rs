//! One cluster on its own fabric: etcd, 4 expert nodes and 2 coordinators, each a host
//! in its own network namespace, every expert on 2 nodes. What "converged" means after a
//! fault is written down here, once, for every scenario.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::delay_proxy::DelayProxy;
use crate::common::etcd::etcd_binary;
use crate::common::fabric::{Fabric, Host};
use crate::common::http::Client;
use crate::common::{Proc, exe, poll, tiny_model};
use crate::traffic::{REQUEST_TIMEOUT_S, Traffic};

pub const NODES: usize = 4;
pub const COORDINATORS: usize = 2;
/// `--replicas`: copies of every expert, on distinct nodes.
pub const REPLICAS: usize = 2;
/// `--lease-ttl-s` of every process: how long etcd keeps a silent one registered.
pub const LEASE_TTL: Duration = Duration::from_secs(2);
pub const ETCD_PORT: u16 = 2379;
pub const NODE_PORT: u16 = 7000;

pub struct Node {
    pub id: String,
    pub host: Host,
    pub proc: Proc,
}

pub struct Coordinator {
    pub id: String,
    pub host: Host,
    pub url: String,
    pub proc: Proc,
}

/// Options of [`World::start`].
#[derive(Default)]
pub struct Options {
    /// Put this node behind a delaying proxy (on the test's own address): coordinators
    /// dial the proxy, so its delay slows every byte between them and the node.
    pub slow_node: Option<usize>,
}

/// Fields drop in order: processes before the fabric their namespaces belong to.
pub struct World {
    pub coordinators: Vec<Coordinator>,
    pub nodes: Vec<Node>,
    pub proxy: Option<DelayProxy>,
    etcd: Proc,
    _etcd_dir: tempfile::TempDir,
    pub etcd_host: Host,
    pub model: String,
    pub fabric: Fabric,
}

fn arg_list(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

impl World {
    /// Starts everything and waits until the cluster has converged once.
    pub fn start(index: u8, options: Options) -> World {
        let fabric = Fabric::new(index);
        let etcd_host = fabric.host("etcd");
        let etcd_dir = tempfile::tempdir().expect("a data dir for etcd");
        let client_url = format!("http://{}:{ETCD_PORT}", etcd_host.ip);
        // Peers talk on the namespace's own loopback: there is one member.
        let peer = "http://127.0.0.1:2380";
        let mut cmd = etcd_host.command(&etcd_binary());
        cmd.arg("--data-dir")
            .arg(etcd_dir.path().join("data"))
            .args(["--name", "partitions"])
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", peer])
            .args(["--initial-advertise-peer-urls", peer])
            .args(["--initial-cluster", &format!("partitions={peer}")])
            .args(["--log-level", "warn"]);
        let etcd = Proc::spawn("etcd", cmd);
        let etcd_client = Client::new(&client_url);
        assert!(
            poll(Duration::from_secs(20), || {
                etcd_client
                    .get("/health")
                    .is_ok_and(|r| r.status == 200 && r.text().contains("true"))
            }),
            "etcd did not become healthy: {}",
            etcd.log_tail()
        );

        let ttl = LEASE_TTL.as_secs().to_string();
        let mut proxy = None;
        let nodes: Vec<Node> = (0..NODES)
            .map(|k| {
                let id = format!("n{k}");
                let host = fabric.host(&id);
                let listen = format!("{}:{NODE_PORT}", host.ip);
                let mut cmd = host.command(exe());
                cmd.args(["expert-node", "--listen", &listen, "--model"])
                    .arg(tiny_model())
                    .args(arg_list(&[
                        "--etcd",
                        &client_url,
                        "--node-id",
                        &id,
                        "--lease-ttl-s",
                        &ttl,
                    ]));
                if options.slow_node == Some(k) {
                    let p = DelayProxy::start_on(&fabric.client_ip(), &listen);
                    cmd.args(["--advertise", &p.addr]);
                    proxy = Some(p);
                }
                let (proc, _) = Proc::start(&format!("node-{id}"), cmd, "listening on ");
                Node { id, host, proc }
            })
            .collect();

        let coordinators = (0..COORDINATORS)
            .map(|k| {
                let id = format!("c{k}");
                let host = fabric.host(&id);
                let mut cmd = host.command(exe());
                cmd.args([
                    "coordinator",
                    "--host",
                    &host.ip,
                    "--port",
                    "8000",
                    "--model",
                ])
                .arg(tiny_model())
                .args(arg_list(&[
                    "--etcd",
                    &client_url,
                    "--coordinator-id",
                    &id,
                    "--lease-ttl-s",
                    &ttl,
                    "--replicas",
                    &REPLICAS.to_string(),
                    // Exact: a 200 must carry transformers' text, bit for bit.
                    "--wire-dtype",
                    "f32",
                    "--request-timeout-s",
                    &REQUEST_TIMEOUT_S.to_string(),
                    "--shutdown-grace-s",
                    "2",
                ]));
                // "serving MODEL on http://IP:8000 (...)"
                let (proc, rest) = Proc::start(&format!("coordinator-{id}"), cmd, "serving ");
                let url = rest
                    .split_once(" on ")
                    .and_then(|(_, after)| after.split_whitespace().next())
                    .unwrap_or_else(|| panic!("unexpected ready line: serving {rest}"))
                    .to_owned();
                Coordinator {
                    id,
                    host,
                    url,
                    proc,
                }
            })
            .collect();
        let model = tiny_model()
            .file_name()
            .and_then(|n| n.to_str())
            .expect("the model directory's name")
            .to_owned();
        let world = World {
            coordinators,
            nodes,
            proxy,
            etcd,
            _etcd_dir: etcd_dir,
            etcd_host,
            model,
            fabric,
        };
        world.wait_converged(&world.node_ids(), Duration::from_secs(30));
        world
    }

    pub fn etcd_url(&self) -> String {
        format!("http://{}:{ETCD_PORT}", self.etcd_host.ip)
    }

    pub fn node_ids(&self) -> Vec<&str> {
        self.nodes.iter().map(|n| n.id.as_str()).collect()
    }

    pub fn urls(&self) -> Vec<String> {
        self.coordinators.iter().map(|c| c.url.clone()).collect()
    }

    pub fn traffic(&self, clients: usize) -> Traffic {
        Traffic::start(&self.urls(), &self.model, clients)
    }

    /// Every host's namespace except `except`'s: what cutting a host off from "everyone"
    /// means.
    pub fn hosts_but(&self, except: &Host) -> Vec<&Host> {
        std::iter::once(&self.etcd_host)
            .chain(self.nodes.iter().map(|n| &n.host))
            .chain(self.coordinators.iter().map(|c| &c.host))
            .filter(|h| h.ns != except.ns)
            .collect()
    }

    /// `switchyard ctl status --json`, from the test's own address (never cut off).
    pub fn status(&self) -> Result<Value, String> {
        let out = Command::new(exe())
            .args(["ctl", "--etcd", &self.etcd_url(), "status", "--json"])
            .output()
            .map_err(|e| format!("running ctl status: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        serde_json::from_slice(&out.stdout).map_err(|e| format!("ctl status --json: {e}"))
    }

    /// The id of the coordinator that leads, per etcd.
    pub fn leader(&self) -> Option<String> {
        self.status().ok()?["leader"].as_str().map(str::to_owned)
    }

    /// `switchyard_placement_epoch` on coordinator `k`'s /metrics.
    pub fn coordinator_epoch(&self, k: usize) -> Result<u64, String> {
        let r = Client::new(&self.coordinators[k].url)
            .get("/metrics")
            .map_err(|e| format!("{}: GET /metrics: {e}", self.coordinators[k].id))?;
        r.text()
            .lines()
            .find_map(|l| l.strip_prefix("switchyard_placement_epoch "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|v| v as u64)
            .ok_or_else(|| {
                format!(
                    "{}: no placement epoch on /metrics",
                    self.coordinators[k].id
                )
            })
    }

    /// Converged (coordinator `skip` not asked: one cut off from etcd cannot know the
    /// placement): exactly the nodes in `live` are registered, a leader is elected, the
    /// placement gives every expert [`REPLICAS`] copies on live nodes, and every
    /// coordinator serves with that placement's epoch. Otherwise, why not.
    fn converged_but(&self, skip: Option<usize>, live: &[&str]) -> Result<u64, String> {
        let s = self.status()?;
        let registered: BTreeSet<&str> = s["nodes"]
            .as_object()
            .map(|m| m.keys().map(String::as_str).collect())
            .unwrap_or_default();
        let want: BTreeSet<&str> = live.iter().copied().collect();
        if registered != want {
            return Err(format!("registered {registered:?}, live {want:?}"));
        }
        if !s["leader"].is_string() {
            return Err("no leader".into());
        }
        self.check_placement(&s, &want, skip)
    }

    /// Whether the published placement uses only `nodes`, gives every expert
    /// [`REPLICAS`] copies on them, and both coordinators serve with it.
    pub fn placed_on(&self, nodes: &[&str]) -> Result<(), String> {
        let s = self.status()?;
        let on: BTreeSet<&str> = nodes.iter().copied().collect();
        let epoch = self.check_placement(&s, &on, None)?;
        match placed_ids(&s["placement"])?
            .into_iter()
            .find(|id| !on.contains(id))
        {
            Some(other) => Err(format!("epoch {epoch} still places {other}")),
            None => Ok(()),
        }
    }

    /// The placement in ctl status `s` gives every expert [`REPLICAS`] copies on nodes of
    /// `on`, and every coordinator but `skip` serves with its epoch; returns the epoch.
    fn check_placement(
        &self,
        s: &Value,
        on: &BTreeSet<&str>,
        skip: Option<usize>,
    ) -> Result<u64, String> {
        let p = &s["placement"];
        let epoch = p["epoch"].as_u64().ok_or("no placement")?;
        let placed = placed_ids(p)?;
        let holders = p["holders"].as_array().ok_or("placement without holders")?;
        for (i, h) in holders.iter().enumerate() {
            let copies: BTreeSet<&str> = h
                .as_array()
                .ok_or("holders entry is not a list")?
                .iter()
                .filter_map(|x| placed.get(x.as_u64()? as usize).copied())
                .filter(|id| on.contains(id))
                .collect();
            if copies.len() < REPLICAS {
                return Err(format!(
                    "expert slot {i} has copies on {copies:?} only (epoch {epoch})"
                ));
            }
        }
        for k in (0..self.coordinators.len()).filter(|&k| Some(k) != skip) {
            let e = self.coordinator_epoch(k)?;
            if e != epoch {
                return Err(format!(
                    "{} serves epoch {e}, the placement is at {epoch}",
                    self.coordinators[k].id
                ));
            }
        }
        Ok(epoch)
    }

    /// Waits until converged; returns how long it took. Panics after `within`
    /// with the last reason and every process's log.
    pub fn wait_converged(&self, live: &[&str], within: Duration) -> Duration {
        self.wait_converged_inner(None, live, within)
    }

    /// [`World::wait_converged`] without coordinator `skip`, within 30 s.
    pub fn wait_converged_but(&self, skip: usize, live: &[&str]) -> Duration {
        self.wait_converged_inner(Some(skip), live, Duration::from_secs(30))
    }

    fn wait_converged_inner(
        &self,
        skip: Option<usize>,
        live: &[&str],
        within: Duration,
    ) -> Duration {
        let start = Instant::now();
        let mut why = String::new();
        let ok = poll(within, || match self.converged_but(skip, live) {
            Ok(_) => true,
            Err(e) => {
                why = e;
                false
            }
        });
        assert!(
            ok,
            "not converged within {within:?}: {why}\n{}",
            self.logs()
        );
        start.elapsed()
    }

    /// Panics if any process has exited (none is meant to, unless the test killed it).
    pub fn assert_running(&mut self, except: &[&str]) {
        let mut dead = Vec::new();
        for n in &mut self.nodes {
            if !except.contains(&n.id.as_str()) && n.proc.exited() {
                dead.push(n.proc.log_tail());
            }
        }
        for c in &mut self.coordinators {
            if !except.contains(&c.id.as_str()) && c.proc.exited() {
                dead.push(c.proc.log_tail());
            }
        }
        if self.etcd.exited() {
            dead.push(self.etcd.log_tail());
        }
        assert!(dead.is_empty(), "processes exited:\n{}", dead.join("\n"));
    }

    /// Every process the world started (to check none outlives it).
    pub fn pids(&self) -> Vec<u32> {
        self.nodes
            .iter()
            .map(|n| n.proc.pid())
            .chain(self.coordinators.iter().map(|c| c.proc.pid()))
            .chain([self.etcd.pid()])
            .collect()
    }

    pub fn logs(&self) -> String {
        self.coordinators
            .iter()
            .map(|c| c.proc.log_tail())
            .chain(self.nodes.iter().map(|n| n.proc.log_tail()))
            .chain([self.etcd.log_tail()])
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for World {
    /// SIGTERM to everyone at once, then what [`Proc`]'s own drop does (waits, SIGKILL).
    fn drop(&mut self) {
        let children = self
            .coordinators
            .iter_mut()
            .map(|c| &mut c.proc)
            .chain(self.nodes.iter_mut().map(|n| &mut n.proc))
            .chain([&mut self.etcd]);
        for p in children {
            unsafe {
                libc::kill(p.pid() as libc::pid_t, libc::SIGTERM);
            }
        }
    }
}

/// Node ids of a placement in ctl status's JSON, in holder-index order.
fn placed_ids(p: &Value) -> Result<Vec<&str>, String> {
    Ok(p["nodes"]
        .as_array()
        .ok_or("placement without nodes")?
        .iter()
        .map(|n| n["id"].as_str().unwrap_or(""))
        .collect())
}
