//! Flags shared by `coordinator` and `up`.

use std::time::Duration;

use switchyard_coordinator::scheduler::SchedulerConfig;
use switchyard_proto::WireFormat;

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
    /// Token budget of one scheduler step (decode tokens + prefill chunk tokens).
    #[arg(long, default_value_t = 512)]
    pub max_batch_tokens: usize,
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
    #[arg(long, default_value_t = 30_000)]
    pub expert_timeout_ms: u64,
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
        Ok(SchedulerConfig {
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
