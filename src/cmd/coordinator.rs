use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use switchyard_coordinator::cluster::ClusterMode;
use switchyard_coordinator::server::{Coordinator, CoordinatorConfig, ExpertsAt};

use super::device::DeviceArgs;
use super::serve_args::{ClusterArgs, RebalanceArgs, ServeArgs, TlsArgs, print_ready};
use super::shutdown_signal;

#[derive(clap::Args)]
pub struct Args {
    /// Checkpoint directory.
    #[arg(long)]
    model: PathBuf,
    /// Expert nodes, `HOST:PORT,...`; every expert of every layer is placed on them.
    #[arg(long, value_delimiter = ',')]
    nodes: Vec<String>,
    /// With --nodes: place experts by the load in this file (a coordinator's `/metrics`
    /// scrape, or JSON `{"tokens": [[per expert] per layer]}`) instead of round-robin:
    /// hot experts get more copies, each node about the same tokens per layer.
    #[arg(long, requires = "nodes", value_name = "FILE")]
    placement_from: Option<PathBuf>,
    /// With --placement-from: experts of every layer each node holds [default: half as
    /// many again as --replicas copies need].
    #[arg(long, requires = "placement_from", value_name = "N")]
    expert_slots: Option<usize>,
    /// Run the experts in this process instead of on nodes.
    #[arg(long, conflicts_with_all = ["nodes", "etcd"])]
    in_process: bool,
    /// This coordinator's name in the cluster (leader election, load reports)
    /// [default: HOST-PID].
    #[arg(long)]
    coordinator_id: Option<String>,
    /// With --etcd: how long start-up waits for nodes to register and a placement to be
    /// published.
    #[arg(long, default_value_t = 120)]
    startup_timeout_s: u64,
    /// Expert nodes come and go through etcd; the elected coordinator places experts.
    #[command(flatten)]
    cluster: ClusterArgs,
    #[command(flatten)]
    rebalance: RebalanceArgs,
    #[command(flatten)]
    serve: ServeArgs,
    #[command(flatten)]
    device: DeviceArgs,
    /// Mutual TLS to the expert nodes: our client certificate, and the CA their
    /// certificates must chain to (each must name the host given in --nodes).
    #[command(flatten)]
    tls: TlsArgs,
}

pub fn run(a: Args) -> Result<ExitCode> {
    let cluster = a.cluster.config()?;
    let device = a.device.resolve()?;
    let experts = if a.in_process {
        ExpertsAt::InProcess
    } else if let Some(etcd) = cluster {
        if !a.nodes.is_empty() {
            bail!("--nodes and --etcd exclude each other: with etcd, nodes register themselves");
        }
        ExpertsAt::Cluster {
            mode: ClusterMode {
                etcd,
                coordinator_id: a
                    .coordinator_id
                    .clone()
                    .unwrap_or_else(|| format!("{}-{}", super::hostname(), std::process::id())),
                lease_ttl: a.cluster.lease_ttl(),
                min_replicas: a.serve.replicas,
                rebalance: a.rebalance.policy()?,
                startup_timeout: std::time::Duration::from_secs(a.startup_timeout_s),
            },
            wire: a.serve.wire_dtype,
            timeout: a.serve.expert_timeout(),
            keepalive: a.serve.keepalive()?,
            hedging: a.serve.hedging()?,
            tls: a.tls.load()?,
        }
    } else if a.nodes.is_empty() {
        bail!("give --nodes HOST:PORT,..., --etcd URL or --in-process");
    } else {
        if a.expert_slots == Some(0) {
            bail!("--expert-slots must be at least 1");
        }
        ExpertsAt::Nodes {
            addrs: a.nodes.clone(),
            replicas: a.serve.replicas,
            placement_from: a.placement_from.clone(),
            expert_slots: a.expert_slots,
            wire: a.serve.wire_dtype,
            timeout: a.serve.expert_timeout(),
            keepalive: a.serve.keepalive()?,
            hedging: a.serve.hedging()?,
            tls: a.tls.load()?,
        }
    };
    let cfg = CoordinatorConfig {
        model_dir: a.model.clone(),
        served_model_name: a.serve.served_model_name.clone(),
        device,
        cpu_weights: a.serve.cpu_weights,
        experts,
        scheduler: a.serve.scheduler()?,
        http: a.serve.http()?,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let coordinator = Coordinator::start(cfg).await?;
        let listener = tokio::net::TcpListener::bind((a.serve.host.as_str(), a.serve.port))
            .await
            .with_context(|| format!("binding {}:{}", a.serve.host, a.serve.port))?;
        let url = format!("http://{}", listener.local_addr()?);
        let what = if a.in_process {
            format!("dense layers and experts in process on {device}")
        } else if !a.cluster.etcd.is_empty() {
            format!(
                "dense layers on {device}, cluster `{}` on etcd {}",
                a.cluster.cluster,
                a.cluster.etcd.join(",")
            )
        } else {
            format!("dense layers on {device}, {} expert nodes", a.nodes.len())
        };
        let stop = shutdown_signal();
        print_ready(&url, &coordinator.state().model_name, &what);
        coordinator.serve(listener, stop).await?;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}
