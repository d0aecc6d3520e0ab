//! Flags shared by `coordinator` and `up`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use switchyard_coordinator::hedge::Hedging;
use switchyard_coordinator::http::HttpConfig;
use switchyard_coordinator::http::auth::ApiKeys;
use switchyard_coordinator::http::openai::Limits;
use switchyard_coordinator::http::transport::Timeouts;
use switchyard_coordinator::remote::Keepalive;
use switchyard_coordinator::scheduler::SchedulerConfig;
use switchyard_engine::ops::CpuWeights;
use switchyard_proto::WireFormat;
use switchyard_proto::tls::{Tls, TlsFiles};

/// Mutual TLS on the coordinator <-> expert-node gRPC link (`coordinator` and
/// `expert-node`). All three or none; `switchyard certs` writes a development set.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct TlsArgs {
    /// This process's certificate (PEM), signed by the --tls-ca.
    #[arg(long, value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// The CA that must have signed the peer's certificate (PEM).
    #[arg(long, value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    pub fn files(&self) -> anyhow::Result<Option<TlsFiles>> {
        Ok(TlsFiles::from_flags(
            self.tls_cert.clone(),
            self.tls_key.clone(),
            self.tls_ca.clone(),
        )?)
    }

    /// The loaded certificates, or `None` for plaintext.
    pub fn load(&self) -> anyhow::Result<Option<Tls>> {
        Ok(self.files()?.map(|f| f.load()).transpose()?)
    }
}

/// Cluster mode: membership, election and placement in etcd (`coordinator`,
/// `expert-node`, `ctl`). Without --etcd, placement is static.
#[derive(clap::Args, Clone, Debug)]
pub struct ClusterArgs {
    /// etcd endpoints, `URL[,URL]` (`http://HOST:2379`).
    #[arg(long, value_delimiter = ',', value_name = "URL")]
    pub etcd: Vec<String>,
    /// Cluster name: its state lives under /switchyard/NAME/ in etcd.
    #[arg(long, default_value = "default")]
    pub cluster: String,
    /// Seconds a process's lease lives without renewal: how long a dead process stays
    /// registered at most.
    #[arg(long, default_value_t = 5)]
    pub lease_ttl_s: u64,
}

impl ClusterArgs {
    /// The cluster, or `None` in static mode.
    pub fn config(&self) -> anyhow::Result<Option<switchyard_cluster::ClusterConfig>> {
        if self.etcd.is_empty() {
            return Ok(None);
        }
        if self.lease_ttl_s == 0 {
            anyhow::bail!("--lease-ttl-s must be at least 1");
        }
        Ok(Some(switchyard_cluster::ClusterConfig::new(
            self.etcd.clone(),
            &self.cluster,
        )?))
    }

    pub fn lease_ttl(&self) -> Duration {
        Duration::from_secs(self.lease_ttl_s)
    }
}

/// When the elected coordinator moves experts by load without being asked
/// (`ctl rebalance` asks at any time).
#[derive(clap::Args, Clone, Debug)]
pub struct RebalanceArgs {
    /// Look at the expert load this often and rebalance when it pays (cluster mode)
    /// [default: off: only `ctl rebalance`].
    #[arg(long, value_name = "SECONDS")]
    pub rebalance_interval_s: Option<u64>,
    /// Rebalance by itself only while the mean balancedness (mean over max tokens per
    /// node, per layer) is below this.
    #[arg(long, default_value_t = 0.9, value_name = "FRACTION")]
    pub rebalance_below: f64,
    /// ... and the new plan raises it by more than this.
    #[arg(long, default_value_t = 0.05, value_name = "FRACTION")]
    pub rebalance_min_gain: f64,
}

impl RebalanceArgs {
    pub fn policy(&self) -> anyhow::Result<switchyard_cluster::rebalance::RebalancePolicy> {
        let fraction = |name: &str, v: f64| {
            if (0.0..=1.0).contains(&v) {
                Ok(v)
            } else {
                Err(anyhow::anyhow!("--{name} must be between 0 and 1, got {v}"))
            }
        };
        if self.rebalance_interval_s == Some(0) {
            anyhow::bail!("--rebalance-interval-s must be at least 1 (leave it out for off)");
        }
        Ok(switchyard_cluster::rebalance::RebalancePolicy {
            interval: self.rebalance_interval_s.map(Duration::from_secs),
            below: fraction("rebalance-below", self.rebalance_below)?,
            min_gain: fraction("rebalance-min-gain", self.rebalance_min_gain)?,
        })
    }
}

#[derive(clap::Args, Clone, Debug)]
pub struct ServeArgs {
    /// Address the HTTP API binds to.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// HTTP port; 0 picks a free one (the URL is printed).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Activation dtype on the coordinator <-> node wire: bf16 (half the bytes) or f32 (exact).
    #[arg(long, default_value = "bf16")]
    pub wire_dtype: WireFormat,
    /// Copies of every expert, on distinct nodes; a token goes to the least-loaded copy.
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
    /// Model name in the API [default: the model directory's name].
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// How the CPU holds the weights it reads: the coordinator's dense layers, experts in
    /// process, and (`up`) its expert nodes' experts. `auto` as the checkpoint has them
    /// (bf16 for a bf16 checkpoint, FP8 codes for an FP8 one: exact), `f32`, `bf16`
    /// (rounds an f32 checkpoint) or `int8` (8 bits computed at load): both change results.
    #[arg(long, default_value = "auto", value_name = "auto|f32|bf16|int8")]
    pub cpu_weights: CpuWeights,
    /// Token budget of one scheduler step (decode tokens + prefill chunk tokens).
    #[arg(long, default_value_t = 512)]
    pub max_batch_tokens: usize,
    /// Micro-batches a step is split into, taking turns per MoE layer so one's experts
    /// are on the wire while another attends: a number (1: off), or `auto` (two where
    /// measured faster: steps of 4+ sequences are timed both ways per batch-size class and
    /// the faster wins). Only steps of up to 32 tokens are split, which changes no bit of
    /// any result.
    #[arg(long, default_value = "auto")]
    pub micro_batches: String,
    /// Compute every prompt from its first token: no KV blocks of earlier prompts with
    /// the same prefix are reused.
    #[arg(long)]
    pub no_prefix_caching: bool,
    /// Sequences decoding at once.
    #[arg(long, default_value_t = 64)]
    pub max_running: usize,
    /// Requests waiting for admission before new ones get 429.
    #[arg(long, default_value_t = 256)]
    pub max_waiting: usize,
    /// KV-cache memory in MiB; requests wait for blocks when it is full.
    #[arg(long, default_value_t = 512)]
    pub kv_cache_mb: usize,
    /// Positions per KV-cache block.
    #[arg(long, default_value_t = 16)]
    pub kv_block_size: usize,
    /// How long one layer's dispatch to an expert node may take before it counts as failed.
    /// A silent node is found sooner by the keepalive and slow ones are hedged: this is for
    /// a node that answers pings but not work. A 512-token layer of a Mixtral-8x7B-sized
    /// expert set takes about 1.6 s on a 2-core CPU node (16x the 0.1 s measured at hidden
    /// 1024 in BENCHMARKS.md); raise it with CPU nodes and larger --max-batch-tokens.
    #[arg(long, default_value_t = 10_000)]
    pub expert_timeout_ms: u64,
    /// Silence on a connection to an expert node before the coordinator pings it (HTTP/2).
    #[arg(long, default_value_t = 500)]
    pub expert_ping_interval_ms: u64,
    /// How long a ping may go unanswered before the node counts as gone: its dispatches
    /// in flight fail at once and go to replicas (a silent node, e.g. a cut link).
    #[arg(long, default_value_t = 1000)]
    pub expert_ping_timeout_ms: u64,
    /// Hedged dispatch: a node later than this many times its recent p99 for a layer of
    /// that size has the same work sent to replicas too, and the first answer wins.
    /// 0: never hedge.
    #[arg(long, default_value_t = 4.0)]
    pub hedge_factor: f64,
    /// Never hedge sooner than this.
    #[arg(long, default_value_t = 20)]
    pub hedge_floor_ms: u64,
    /// An API key clients must send as `Authorization: Bearer KEY` (repeat for several).
    /// Keys in the comma-separated environment variable SWITCHYARD_API_KEYS count too,
    /// and keep them out of `ps`. None given: the API is open.
    #[arg(long = "api-key", value_name = "KEY")]
    pub api_keys: Vec<String>,
    /// Require the API key on /metrics too (/health is always open).
    #[arg(long)]
    pub metrics_require_key: bool,
    /// Largest request body in bytes; larger ones get 413.
    #[arg(long, default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
    /// Longest prompt in tokens; longer ones get 413 [default: the model's context].
    #[arg(long)]
    pub max_prompt_tokens: Option<usize>,
    /// Largest `max_tokens` a request may ask for; more gets 400 [default: the model's
    /// context]. Also caps the chat default ("as long as the context allows").
    #[arg(long)]
    pub max_completion_tokens: Option<usize>,
    /// Most stop sequences in one request.
    #[arg(long, default_value_t = 16)]
    pub max_stop_sequences: usize,
    /// Longest stop sequence, in bytes.
    #[arg(long, default_value_t = 256)]
    pub max_stop_bytes: usize,
    /// Seconds a request may take from arrival to its last token; then its sequence is
    /// cancelled and the client gets 504 (or a final error event when streaming). 0: none.
    #[arg(long, default_value_t = 600.0)]
    pub request_timeout_s: f64,
    /// Seconds a client may take to send a request's headers (from connecting, or from
    /// the previous response on a kept-alive connection); then the connection is closed.
    #[arg(long, default_value_t = 10.0)]
    pub header_timeout_s: f64,
    /// Seconds a client may take to send a request's body once its headers are in; then
    /// it gets 408 `request_body_timeout`. Responses are not bounded by this.
    #[arg(long, default_value_t = 30.0)]
    pub body_timeout_s: f64,
    /// On SIGTERM/Ctrl-C: seconds requests in progress may take to finish before their
    /// connections are closed. Idle and half-sent connections are closed at once, and a
    /// request still waiting for its body gets 503. 0: no wait.
    #[arg(long, default_value_t = 30.0)]
    pub shutdown_grace_s: f64,
}

impl ServeArgs {
    pub fn scheduler(&self) -> anyhow::Result<SchedulerConfig> {
        for (name, v) in [
            ("--max-batch-tokens", self.max_batch_tokens),
            ("--max-running", self.max_running),
            ("--max-waiting", self.max_waiting),
            ("--kv-cache-mb", self.kv_cache_mb),
            ("--kv-block-size", self.kv_block_size),
        ] {
            if v == 0 {
                anyhow::bail!("{name} must be positive");
            }
        }
        let micro_batches = match self.micro_batches.as_str() {
            "auto" => None,
            n => match n.parse::<usize>() {
                Ok(n) if n > 0 => Some(n),
                _ => {
                    anyhow::bail!("--micro-batches must be `auto` or a positive number, got `{n}`")
                }
            },
        };
        Ok(SchedulerConfig {
            micro_batches,
            prefix_caching: !self.no_prefix_caching,
            max_batch_tokens: self.max_batch_tokens,
            max_running: self.max_running,
            max_waiting: self.max_waiting,
            kv_block_size: self.kv_block_size,
            kv_cache_bytes: self.kv_cache_mb << 20,
        })
    }

    pub fn expert_timeout(&self) -> Duration {
        Duration::from_millis(self.expert_timeout_ms)
    }

    pub fn hedging(&self) -> anyhow::Result<Hedging> {
        if !(self.hedge_factor == 0.0 || (1.0..=1000.0).contains(&self.hedge_factor)) {
            anyhow::bail!(
                "--hedge-factor must be 0 (off) or between 1 and 1000, got {}",
                self.hedge_factor
            );
        }
        Ok(Hedging {
            factor: self.hedge_factor,
            floor: Duration::from_millis(self.hedge_floor_ms),
        })
    }

    pub fn keepalive(&self) -> anyhow::Result<Keepalive> {
        for (name, v) in [
            ("--expert-ping-interval-ms", self.expert_ping_interval_ms),
            ("--expert-ping-timeout-ms", self.expert_ping_timeout_ms),
        ] {
            if !(10..=3_600_000).contains(&v) {
                anyhow::bail!("{name} must be between 10 and 3600000, got {v}");
            }
        }
        Ok(Keepalive {
            interval: Duration::from_millis(self.expert_ping_interval_ms),
            timeout: Duration::from_millis(self.expert_ping_timeout_ms),
        })
    }

    /// API keys (flags, then SWITCHYARD_API_KEYS) and request limits.
    pub fn http(&self) -> anyhow::Result<HttpConfig> {
        let mut keys = self.api_keys.clone();
        if let Ok(env) = std::env::var("SWITCHYARD_API_KEYS") {
            keys.extend(ApiKeys::split_env(&env));
        }
        let api_keys = ApiKeys::new(keys).context("--api-key / SWITCHYARD_API_KEYS")?;
        if self.metrics_require_key && api_keys.is_empty() {
            anyhow::bail!(
                "--metrics-require-key needs an API key (--api-key or SWITCHYARD_API_KEYS)"
            );
        }
        for (name, v) in [
            ("--max-body-bytes", Some(self.max_body_bytes)),
            ("--max-prompt-tokens", self.max_prompt_tokens),
            ("--max-completion-tokens", self.max_completion_tokens),
        ] {
            if v == Some(0) {
                anyhow::bail!("{name} must be positive");
            }
        }
        let t = self.request_timeout_s;
        if !(t.is_finite() && t >= 0.0) {
            anyhow::bail!("--request-timeout-s must be a number of seconds >= 0, got {t}");
        }
        Ok(HttpConfig {
            api_keys,
            metrics_require_key: self.metrics_require_key,
            limits: Limits {
                max_body_bytes: self.max_body_bytes,
                max_prompt_tokens: self.max_prompt_tokens,
                max_completion_tokens: self.max_completion_tokens,
                max_stop_sequences: self.max_stop_sequences,
                max_stop_bytes: self.max_stop_bytes,
                request_timeout: (t > 0.0).then(|| Duration::from_secs_f64(t)),
            },
            timeouts: self.timeouts()?,
        })
    }

    /// `--header-timeout-s`, `--body-timeout-s`, `--shutdown-grace-s`.
    fn timeouts(&self) -> anyhow::Result<Timeouts> {
        // A day at most: `Duration::from_secs_f64` panics on overflow.
        let secs = |name: &str, v: f64, zero_ok: bool| {
            let ok = v.is_finite() && v <= 86_400.0 && (v > 0.0 || (zero_ok && v == 0.0));
            if !ok {
                let least = if zero_ok { ">= 0" } else { "> 0" };
                anyhow::bail!("{name} must be a number of seconds {least} and <= 86400, got {v}");
            }
            Ok(Duration::from_secs_f64(v))
        };
        Ok(Timeouts {
            header: secs("--header-timeout-s", self.header_timeout_s, false)?,
            body: secs("--body-timeout-s", self.body_timeout_s, false)?,
            shutdown_grace: secs("--shutdown-grace-s", self.shutdown_grace_s, true)?,
        })
    }
}

pub fn print_ready(url: &str, model: &str, what: &str) {
    println!("serving {model} on {url} ({what})");
    println!("try:");
    println!(
        "  curl {url}/v1/completions -H 'Content-Type: application/json' -d '{{\"model\": \"{model}\", \"prompt\": \"Mixture of Experts\", \"max_tokens\": 16, \"temperature\": 0}}'"
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();
}
