//! `switchyard bench`: load-test any OpenAI-compatible server. The work is in the
//! switchyard-bench crate; this runs it on stdout and turns its findings into an exit
//! status.

use std::process::ExitCode;

use anyhow::{Context, Result};

#[derive(clap::Args)]
pub struct Args {
    // Boxed: the flags are several hundred bytes, the other subcommands' a fraction of
    // that, and `Command` is as large as its largest variant.
    #[command(flatten)]
    bench: Box<switchyard_bench::Args>,
}

pub fn run(Args { bench: args }: Args) -> Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let outcome = runtime.block_on(switchyard_bench::run(&args, &mut std::io::stdout()))?;
    // Failed requests are load results, reported and exit 0 as in vLLM; outputs that
    // disagree are a correctness bug, which scripts and CI must not miss.
    if let Some(p) = outcome.probe.as_ref().filter(|p| p.mismatches > 0) {
        tracing::error!(
            mismatches = p.mismatches,
            probes = p.completed,
            "correctness probe: repeated greedy requests returned different text"
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
