//! `switchyard link`: an emulated network link in front of any TCP service (an expert
//! node, etcd, the coordinator's HTTP port): every byte held for a one-way delay in each
//! direction, optionally rate-capped and jittered, order and bytes kept exactly.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use switchyard_bench::link::{Link, LinkConfig};

#[derive(clap::Args)]
pub struct Args {
    /// Address to accept on (`127.0.0.1:0` picks a port; the chosen one is printed).
    #[arg(long)]
    listen: SocketAddr,
    /// Where to forward to.
    #[arg(long)]
    upstream: SocketAddr,
    /// One-way delay in each direction, in microseconds (the round trip is twice this).
    #[arg(long, default_value_t = 0)]
    delay_us: u64,
    /// Rate cap per direction in Gbit/s [default: none].
    #[arg(long)]
    rate_gbps: Option<f64>,
    /// Extra delay per chunk, uniform in [0, J) microseconds; never reorders.
    #[arg(long, default_value_t = 0)]
    jitter_us: u64,
}

/// The link settings `link` and `up --link-*` share.
pub fn config(delay_us: u64, rate_gbps: Option<f64>, jitter_us: u64) -> Result<LinkConfig> {
    if let Some(r) = rate_gbps
        && !(r.is_finite() && r > 0.0)
    {
        bail!("--rate-gbps must be a positive number, got {r}");
    }
    Ok(LinkConfig {
        delay: Duration::from_micros(delay_us),
        rate_bps: rate_gbps.map(|r| r * 1e9),
        jitter: Duration::from_micros(jitter_us),
        seed: 0,
    })
}

pub fn run(a: Args) -> Result<ExitCode> {
    let cfg = config(a.delay_us, a.rate_gbps, a.jitter_us)?;
    let link = Link::start(a.listen, a.upstream, cfg)
        .with_context(|| format!("starting a link on {}", a.listen))?;
    println!(
        "link on {} -> {}: delay {} us each way, rate {}, jitter {} us",
        link.local_addr(),
        a.upstream,
        a.delay_us,
        a.rate_gbps
            .map_or("uncapped".to_string(), |r| format!("{r} Gbit/s")),
        a.jitter_us
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(super::shutdown_signal());
    Ok(ExitCode::SUCCESS)
}
