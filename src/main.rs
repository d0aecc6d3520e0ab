//! `switchyard`: one binary, one subcommand per role. Thin glue over the library crates.

mod bundled;
mod cmd;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "switchyard",
    version,
    about = "Expert-parallel serving of Mixture-of-Experts models"
)]
struct Cli {
    /// Log output format.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a coordinator and N expert nodes on this machine and serve the HTTP API.
    Up(cmd::up::Args),
    /// Serve the HTTP API, running the dense layers here and the experts on nodes.
    Coordinator(cmd::coordinator::Args),
    /// Check a checkpoint against its golden.safetensors reference outputs.
    Verify(cmd::verify::Args),
    /// Serve a subset of a model's experts over gRPC.
    ExpertNode(cmd::expert_node::Args),
    /// Generate text from a prompt on the CPU, streaming it to stdout.
    Generate(cmd::generate::Args),
    /// Write a random checkpoint of any family and shape (mixtral, qwen2_moe, qwen3_moe,
    /// deepseek_v3), with a tokenizer.
    Synth(cmd::synth::Args),
    /// Load-test any OpenAI-compatible server (flags and result keys of `vllm bench serve`).
    Bench(cmd::bench::Args),
    /// Write a development CA and certificates for mutual TLS between coordinator and nodes.
    Certs(cmd::certs::Args),
    /// Inspect and operate a cluster in etcd: status, drain a node.
    Ctl(cmd::ctl::Args),
    /// An emulated network link (delay, rate cap, jitter) in front of any TCP service.
    Link(cmd::link::Args),
}

fn main() -> Result<std::process::ExitCode> {
    let cli = Cli::parse();
    init_tracing(&cli.log_format);
    match cli.command {
        Command::Up(args) => cmd::up::run(args),
        Command::Coordinator(args) => cmd::coordinator::run(args),
        Command::Verify(args) => cmd::verify::run(args),
        Command::ExpertNode(args) => cmd::expert_node::run(args),
        Command::Generate(args) => cmd::generate::run(args),
        Command::Synth(args) => cmd::synth::run(args),
        Command::Bench(args) => cmd::bench::run(args),
        Command::Certs(args) => cmd::certs::run(args),
        Command::Ctl(args) => cmd::ctl::run(args),
        Command::Link(args) => cmd::link::run(args),
    }
}

fn init_tracing(format: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only on a terminal: a log file or a pipe gets plain text, not escape codes.
    // NO_COLOR (no-color.org) turns it off on a terminal too.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
