use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use std::sync::Arc;
use std::time::Duration;
use switchyard_engine::ModelConfig;
use switchyard_engine::ops::CpuWeights;

use switchyard_expert_node::{
    ExpertNode, Membership, NodeConfig, parse_expert_spec, serve_with_tls,
};

use super::device::DeviceArgs;
use super::serve_args::{ClusterArgs, TlsArgs};

#[derive(clap::Args)]
pub struct Args {
    /// Checkpoint directory (config.json and safetensors weights).
    #[arg(long)]
    model: PathBuf,
    /// Address to serve gRPC on; port 0 picks a free port (printed on stdout).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Experts to load at start: `all`, `none`, ids or ranges for every layer (`0,5`,
    /// `0-3`), or `LAYER:EXPERT` pairs (`0:1,3:2-4`).
    #[arg(long, default_value = "none")]
    experts: String,
    /// Also serve Prometheus metrics over HTTP at this address (`/metrics`).
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Name reported to coordinators [default: derived from the listen address].
    #[arg(long)]
    node_id: Option<String>,
    /// Most experts this node may hold (its memory budget) [default: all of the model's].
    #[arg(long)]
    max_experts: Option<usize>,
    /// How experts are held on the CPU: `auto` as the checkpoint has them (bf16 for a bf16
    /// checkpoint, FP8 codes for an FP8 one: exact), `f32`, `bf16` (rounds an f32
    /// checkpoint: results change) or `int8` (8 bits computed at load: results change).
    #[arg(long, default_value = "auto", value_name = "auto|f32|bf16|int8")]
    cpu_weights: CpuWeights,
    /// Memory, in MiB, that Forward requests in flight may use together (their messages,
    /// answers and working buffers); past it, requests wait their turn [default: 2048].
    #[arg(long)]
    work_memory_mb: Option<u64>,
    /// Most tokens one Forward request may carry, advertised in Describe; larger requests
    /// are refused with RESOURCE_EXHAUSTED [default: what a quarter of --work-memory-mb
    /// holds in the worst case].
    #[arg(long)]
    max_request_tokens: Option<usize>,
    /// Address coordinators dial, `HOST:PORT`, registered in etcd [default: the listen
    /// address, with this host's name in place of a wildcard IP].
    #[arg(long)]
    advertise: Option<String>,
    #[command(flatten)]
    device: DeviceArgs,
    #[command(flatten)]
    cluster: ClusterArgs,
    #[command(flatten)]
    tls: TlsArgs,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve_node(args))?;
    Ok(ExitCode::SUCCESS)
}

async fn serve_node(args: Args) -> Result<()> {
    let config = ModelConfig::from_dir(&args.model)
        .with_context(|| format!("reading {}", args.model.display()))?;
    let initial = parse_expert_spec(&args.experts, config.expert_layers(), config.num_experts)?;
    let cluster = args.cluster.config()?;
    if args.max_experts == Some(0) {
        anyhow::bail!("--max-experts must be at least 1");
    }
    if args.work_memory_mb == Some(0) || args.max_request_tokens == Some(0) {
        anyhow::bail!("--work-memory-mb and --max-request-tokens must be at least 1");
    }
    let work_memory_bytes = match args.work_memory_mb {
        Some(mb) => Some(
            mb.checked_mul(1 << 20)
                .context("--work-memory-mb is too large")?,
        ),
        None => None,
    };
    let max_request_tokens = args.max_request_tokens;
    let device = args.device.resolve()?;
    // Before binding: a bad certificate path fails the start, not the first handshake.
    let tls = args.tls.load()?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    let node_id = args.node_id.unwrap_or_else(|| default_node_id(addr));
    let advertise = args
        .advertise
        .clone()
        .unwrap_or_else(|| default_node_id(addr));
    let model_dir = args.model.clone();
    let max_experts = args.max_experts;
    let cpu_weights = args.cpu_weights;
    // Reading expert weights blocks; keep it off the runtime's workers.
    let node = tokio::task::spawn_blocking(move || {
        ExpertNode::open(NodeConfig {
            model_dir,
            node_id,
            initial,
            max_experts,
            device,
            work_memory_bytes,
            max_request_tokens,
            cpu_weights,
        })
    })
    .await
    .context("loading experts")?
    .with_context(|| format!("loading experts from {}", args.model.display()))?;
    let node = Arc::new(node);
    let membership = match &cluster {
        Some(c) => Some(
            Membership::join(
                Arc::clone(&node),
                c.clone(),
                advertise,
                args.cluster.lease_ttl(),
                Duration::from_secs(60),
            )
            .await
            .with_context(|| format!("joining cluster `{}`", args.cluster.cluster))?,
        ),
        None => None,
    };

    // `switchyard up` starts nodes on port 0 and waits for exactly this line; it is only
    // printed once the initial experts are loaded.
    let mut stdout = std::io::stdout().lock();
    let stop = super::shutdown_signal();
    writeln!(stdout, "listening on {addr}")?;
    stdout.flush()?;
    drop(stdout);

    if let Some(addr) = &args.metrics_listen {
        let metrics = node.metrics();
        let http = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr} for metrics"))?;
        // After the `listening on` line, which is what `up` waits for.
        println!("metrics on {}", http.local_addr()?);
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let m = metrics.clone();
                async move { m.render() }
            }),
        );
        tokio::spawn(async move {
            if let Err(e) = axum::serve(http, app).await {
                tracing::warn!("metrics endpoint stopped: {e}");
            }
        });
    }
    // In a cluster, a drain (`switchyard ctl drain`) ends the node like a signal does.
    let drained = async {
        match &cluster {
            Some(c) => Membership::drained(c.clone(), node.node_id().to_owned()).await,
            None => std::future::pending().await,
        }
    };
    let stop = async {
        tokio::select! {
            () = stop => {},
            () = drained => {},
        }
    };
    serve_with_tls(Arc::clone(&node), listener, tls.as_ref(), stop).await?;
    if let Some(m) = membership {
        m.leave().await;
    }
    Ok(())
}

/// The bound address, with the machine's host name in place of a wildcard IP so that
/// nodes on different hosts listening on `0.0.0.0:PORT` still get distinct names.
fn default_node_id(addr: SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        format!("{}:{}", super::hostname(), addr.port())
    } else {
        addr.to_string()
    }
}
