//! `switchyard up`: a whole cluster on this machine. N expert-node processes on loopback,
//! a coordinator in this process, everything stopped together.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use switchyard_cluster::ClusterConfig;
use switchyard_coordinator::cluster::ClusterMode;
use switchyard_coordinator::remote::wait_healthy;
use switchyard_coordinator::server::{Coordinator, CoordinatorConfig, ExpertsAt};
use switchyard_engine::cuda::Device;
use switchyard_proto::tls::{TlsFiles, write_dev_certs};
use tracing::{info, warn};

use super::device::DeviceArgs;
use super::serve_args::{RebalanceArgs, ServeArgs, print_ready};
use super::shutdown_signal;

#[derive(clap::Args)]
pub struct Args {
    /// Checkpoint directory [default: the bundled tiny Mixtral].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Expert-node processes to start.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Run the experts inside the coordinator, no nodes.
    #[arg(long)]
    in_process: bool,
    /// How long to wait for the nodes to load and report healthy.
    #[arg(long, default_value_t = 120)]
    startup_timeout_s: u64,
    /// Mutual TLS between the coordinator and the nodes, with a development CA and
    /// certificates made for this run in a temporary directory (removed on exit).
    #[arg(long, conflicts_with = "in_process")]
    tls: bool,
    /// Cluster mode: nodes register in etcd and the coordinator places experts there
    /// (the elastic mode of `coordinator --etcd`). `--etcd` alone starts a local etcd
    /// (the `etcd` binary must be installed) for this run; `--etcd URL[,URL]` uses one.
    #[arg(long, num_args = 0..=1, default_missing_value = "local", value_name = "URL",
          conflicts_with = "in_process")]
    etcd: Option<String>,
    /// Cluster name in etcd.
    #[arg(long, default_value = "default")]
    cluster: String,
    /// Lease TTL of the nodes and the coordinator in cluster mode, in seconds.
    #[arg(long, default_value_t = 5)]
    lease_ttl_s: u64,
    /// Put every node behind an emulated link (`switchyard link`) with this one-way delay
    /// in microseconds, to see what a network does to the workload (static placement only).
    #[arg(long, conflicts_with_all = ["in_process", "etcd"])]
    link_delay_us: Option<u64>,
    /// The emulated links' rate cap per direction, Gbit/s [default: uncapped].
    #[arg(long, requires = "link_delay_us")]
    link_rate_gbps: Option<f64>,
    /// Cluster mode: experts each node may hold (`expert-node --max-experts`), to see
    /// placement under memory limits [default: all of them].
    #[arg(long, requires = "etcd", value_name = "N")]
    node_max_experts: Option<usize>,
    #[command(flatten)]
    rebalance: RebalanceArgs,
    #[command(flatten)]
    serve: ServeArgs,
    #[command(flatten)]
    device: DeviceArgs,
}

/// The expert-node children; killed when this is dropped, however `up` ends.
struct Children(Vec<(usize, Child)>);

impl Drop for Children {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            // SIGTERM first: nodes close their streams cleanly.
            #[cfg(unix)]
            unsafe {
                libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for (_, c) in &mut self.0 {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Children {
    /// The first child that has exited, if any.
    fn exited(&mut self) -> Option<(usize, std::process::ExitStatus)> {
        self.0
            .iter_mut()
            .find_map(|(i, c)| c.try_wait().ok().flatten().map(|s| (*i, s)))
    }
}

fn spawn_node(
    model: &PathBuf,
    device: Device,
    index: usize,
    tls: Option<&TlsFiles>,
    extra: &[String],
) -> Result<(Child, mpsc::Receiver<Result<String>>)> {
    let exe = std::env::current_exe().context("locating the switchyard binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg("expert-node")
        .arg("--model")
        .arg(model)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--node-id")
        .arg(format!("node-{index}"))
        .arg("--device")
        .arg(device.to_string())
        .args(extra);
    if let Some(t) = tls {
        cmd.arg("--tls-cert")
            .arg(&t.cert)
            .arg("--tls-key")
            .arg(&t.key)
            .arg("--tls-ca")
            .arg(&t.ca);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    die_with_parent(&mut cmd);
    let mut child = cmd.spawn().context("starting an expert node")?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("expert node has no stdout"))?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let first = match lines.next() {
            Some(Ok(line)) => line
                .strip_prefix("listening on ")
                .map(|a| a.trim().to_owned())
                .ok_or_else(|| anyhow!("unexpected first line from expert node: {line}")),
            Some(Err(e)) => Err(e.into()),
            None => Err(anyhow!("expert node exited before listening")),
        };
        let _ = tx.send(first);
        // Keep draining so the node never blocks on a full pipe.
        for _ in lines {}
    });
    Ok((child, rx))
}

pub fn run(a: Args) -> Result<ExitCode> {
    let model = match &a.model {
        Some(m) => m.clone(),
        None => crate::bundled::materialize().context("unpacking the bundled model")?,
    };
    if !a.in_process && a.nodes == 0 {
        bail!("--nodes must be at least 1 (or use --in-process)");
    }
    let scheduler = a.serve.scheduler()?;
    let http = a.serve.http()?;
    // The server bounds its own shutdown by the grace period; the margin is for its last
    // writes.
    let server_stop_limit = http.timeouts.shutdown_grace + Duration::from_secs(5);
    // Settled once here, so that `auto` means the same for every node and `cuda` without
    // a GPU fails before any node starts.
    let device = a.device.resolve()?;
    // Kept until `up` returns; the nodes read their files at start-up.
    let cert_dir = if a.tls {
        let dir = tempfile::Builder::new()
            .prefix("switchyard-up-tls-")
            .tempdir()
            .context("creating a directory for the development certificates")?;
        let certs = write_dev_certs(dir.path(), a.nodes, &[])?;
        info!(dir = %dir.path().display(), "mutual TLS with development certificates");
        Some((dir, certs))
    } else {
        None
    };
    let coordinator_tls = match &cert_dir {
        Some((_, certs)) => Some(certs.coordinator.load()?),
        None => None,
    };
    let started = Instant::now();
    let timeout = Duration::from_secs(a.startup_timeout_s);

    // Children are spawned from this (the main) thread: see spawn_node.
    let mut children = Children(Vec::new());
    // Cluster mode: the etcd endpoints (a local etcd started for this run if asked).
    let mut local_etcd = None;
    let etcd_urls: Option<Vec<String>> = match a.etcd.as_deref() {
        None => None,
        Some("local") => {
            let (child, url, dir) = start_local_etcd(timeout)?;
            info!(%url, "started a local etcd for this run");
            local_etcd = Some((Children(vec![(usize::MAX, child)]), dir));
            Some(vec![url])
        }
        Some(urls) => Some(urls.split(',').map(str::to_owned).collect()),
    };
    let cluster_flags: Vec<String> = match &etcd_urls {
        Some(urls) => vec![
            "--etcd".into(),
            urls.join(","),
            "--cluster".into(),
            a.cluster.clone(),
            "--lease-ttl-s".into(),
            a.lease_ttl_s.to_string(),
        ]
        .into_iter()
        .chain(
            a.node_max_experts
                .into_iter()
                .flat_map(|n| ["--max-experts".to_owned(), n.to_string()]),
        )
        .collect(),
        None => Vec::new(),
    };
    let node_flags: Vec<String> = cluster_flags
        .into_iter()
        .chain(["--cpu-weights".to_owned(), a.serve.cpu_weights.to_string()])
        .collect();
    let mut addrs = Vec::new();
    if !a.in_process {
        let mut pending = Vec::new();
        for i in 0..a.nodes {
            let tls = cert_dir.as_ref().map(|(_, c)| &c.nodes[i]);
            let (child, rx) = spawn_node(&model, device, i, tls, &node_flags)?;
            children.0.push((i, child));
            pending.push(rx);
        }
        for (i, rx) in pending.into_iter().enumerate() {
            let left = timeout.saturating_sub(started.elapsed());
            let addr = rx
                .recv_timeout(left)
                .map_err(|_| anyhow!("expert node {i} did not start within {timeout:?}"))??;
            info!(node = i, %addr, "expert node listening");
            addrs.push(addr);
        }
    }

    // The coordinator dials the links; the links dial the nodes. Kept until `up` returns.
    let mut links = Vec::new();
    if let Some(delay_us) = a.link_delay_us {
        let cfg = super::link::config(delay_us, a.link_rate_gbps, 0)?;
        for addr in addrs.iter_mut() {
            let upstream = addr
                .parse()
                .with_context(|| format!("node address {addr} is not IP:PORT"))?;
            let link = switchyard_bench::link::Link::start(
                std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
                upstream,
                cfg,
            )
            .context("starting an emulated link")?;
            info!(node = %addr, link = %link.local_addr(), delay_us, "node behind an emulated link");
            *addr = link.local_addr().to_string();
            links.push(link);
        }
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(async {
        for addr in &addrs {
            let left = timeout.saturating_sub(started.elapsed());
            wait_healthy(addr, left, coordinator_tls.as_ref()).await?;
        }
        let experts = if a.in_process {
            ExpertsAt::InProcess
        } else if let Some(urls) = &etcd_urls {
            ExpertsAt::Cluster {
                mode: ClusterMode {
                    etcd: ClusterConfig::new(urls.clone(), &a.cluster)?,
                    coordinator_id: format!("up-{}", std::process::id()),
                    lease_ttl: Duration::from_secs(a.lease_ttl_s.max(1)),
                    min_replicas: a.serve.replicas,
                    rebalance: a.rebalance.policy()?,
                    startup_timeout: timeout.saturating_sub(started.elapsed()),
                },
                wire: a.serve.wire_dtype,
                timeout: a.serve.expert_timeout(),
                keepalive: a.serve.keepalive()?,
                hedging: a.serve.hedging()?,
                tls: coordinator_tls.clone(),
            }
        } else {
            ExpertsAt::Nodes {
                addrs: addrs.clone(),
                replicas: a.serve.replicas,
                placement_from: None,
                expert_slots: None,
                wire: a.serve.wire_dtype,
                timeout: a.serve.expert_timeout(),
                keepalive: a.serve.keepalive()?,
                hedging: a.serve.hedging()?,
                tls: coordinator_tls.clone(),
            }
        };
        let coordinator = Coordinator::start(CoordinatorConfig {
            model_dir: model.clone(),
            served_model_name: a.serve.served_model_name.clone(),
            device,
            cpu_weights: a.serve.cpu_weights,
            experts,
            scheduler,
            http,
        })
        .await?;
        let listener = tokio::net::TcpListener::bind((a.serve.host.as_str(), a.serve.port))
            .await
            .with_context(|| format!("binding {}:{}", a.serve.host, a.serve.port))?;
        let url = format!("http://{}", listener.local_addr()?);
        let what = if a.in_process {
            format!("dense layers and experts in process on {device}")
        } else {
            format!(
                "coordinator + {} expert nodes, all on {device}{}{}",
                addrs.len(),
                if a.tls { ", mutual TLS" } else { "" },
                match &etcd_urls {
                    Some(urls) => format!(", cluster `{}` on etcd {}", a.cluster, urls.join(",")),
                    None => String::new(),
                }
            )
        };
        let stop_signal = shutdown_signal();
        print_ready(&url, &coordinator.state().model_name, &what);

        // Stop on Ctrl-C/SIGTERM, or as soon as a node dies (static mode: its experts are
        // gone for good; a cluster places them elsewhere and goes on).
        let (died_tx, died_rx) = tokio::sync::oneshot::channel::<String>();
        let stop_watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let elastic = etcd_urls.is_some();
        let watch = {
            let mut kids = Children(std::mem::take(&mut children.0));
            let stop = stop_watching.clone();
            tokio::task::spawn_blocking(move || {
                let mut died_tx = Some(died_tx);
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    if let Some((i, status)) = kids.exited() {
                        if elastic {
                            warn!("expert node {i} exited ({status}); the cluster places its experts elsewhere");
                            kids.0.retain(|(k, _)| *k != i);
                            continue;
                        }
                        if let Some(tx) = died_tx.take() {
                            let _ = tx.send(format!("expert node {i} exited unexpectedly ({status})"));
                        }
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                kids
            })
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let mut server = tokio::spawn(coordinator.serve(listener, async {
            let _ = stop_rx.await;
        }));
        let mut outcome = tokio::select! {
            _ = stop_signal => Ok(()),
            reason = died_rx => Err(anyhow!(reason.unwrap_or_else(|_| "node watcher stopped".into()))),
            served = &mut server => Err(match served {
                Ok(Ok(())) => anyhow!("the coordinator stopped"),
                Ok(Err(e)) => e.into(),
                Err(e) => anyhow!("the coordinator task failed: {e}"),
            }),
        };
        // The nodes stay up until the coordinator has drained: every request it accepted
        // (queued ones too) still needs them.
        let _ = stop_tx.send(());
        if !server.is_finished() {
            match tokio::time::timeout(server_stop_limit, &mut server).await {
                Ok(Ok(Err(e))) if outcome.is_ok() => outcome = Err(e.into()),
                Ok(_) => {}
                Err(_) => warn!("the coordinator did not stop within {server_stop_limit:?}: stopping anyway"),
            }
        }
        stop_watching.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Ok(kids) = watch.await {
            children = kids;
        }
        outcome
    });
    drop(children);
    drop(local_etcd);
    drop(cert_dir);
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            warn!("{e:#}");
            Err(e)
        }
    }
}

/// Starts `etcd` from PATH on free loopback ports with a temporary data directory, and
/// waits until it accepts connections. Returns the child, its client URL and the
/// directory (removed when dropped).
fn start_local_etcd(timeout: Duration) -> Result<(Child, String, tempfile::TempDir)> {
    let free_port = || -> Result<u16> {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port())
    };
    let (client_port, peer_port) = (free_port()?, free_port()?);
    let dir = tempfile::Builder::new()
        .prefix("switchyard-up-etcd-")
        .tempdir()
        .context("creating etcd's data directory")?;
    let url = format!("http://127.0.0.1:{client_port}");
    let peer = format!("http://127.0.0.1:{peer_port}");
    let mut cmd = Command::new("etcd");
    cmd.arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--name", "up"])
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args([
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
        ])
        .args(["--initial-cluster", &format!("up={peer}")])
        .args(["--log-level", "warn"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    die_with_parent(&mut cmd);
    let mut child = cmd.spawn().map_err(|e| {
        anyhow!(
            "`--etcd` without a URL starts a local etcd, but `etcd` could not be run ({e}): \
             install it (Debian: apt-get install etcd-server) or give --etcd URL"
        )
    })?;
    let deadline = Instant::now() + timeout;
    while std::net::TcpStream::connect(("127.0.0.1", client_port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            bail!("the local etcd exited at start-up ({status})");
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            bail!("the local etcd did not listen within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((child, url, dir))
}

/// Has the kernel kill the child if `up` dies in any way (even SIGKILL), so no node or
/// etcd outlives it. PR_SET_PDEATHSIG is tied to the spawning thread: children are spawned
/// from the main thread, which lives as long as `up`.
fn die_with_parent(cmd: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl, getppid and raise are async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may already have died before prctl took effect.
                if libc::getppid() == 1 {
                    libc::raise(libc::SIGKILL);
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
}
