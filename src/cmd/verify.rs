use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use switchyard_engine::verify::{LOGIT_TOLERANCE, verify};
use switchyard_engine::{ExpertSelection, ExpertStore, Mixtral};

#[derive(clap::Args)]
pub struct Args {
    /// Checkpoint directory holding golden.safetensors.
    #[arg(long)]
    model: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let (model, ckpt) =
        Mixtral::load(&args.model).with_context(|| format!("loading {}", args.model.display()))?;
    let experts = ExpertStore::load(&ckpt, model.config(), &ExpertSelection::All)?;
    let report = verify(&model, &experts, &args.model)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{:>6} {:>6} | {:>12} {:>8} {:>7} | {:>12} {:>8} {:>7} | result",
            "prompt", "tokens", "whole err", "router", "greedy", "kv-cache err", "router", "greedy",
        );
        for p in &report.prompts {
            let (w, i) = (&p.whole, &p.incremental);
            println!(
                "{:>6} {:>6} | {:>12.3e} {:>7.2}% {:>3}/{:<3} | {:>12.3e} {:>7.2}% {:>3}/{:<3} | {}",
                p.index,
                p.tokens,
                w.logit_rel_err,
                w.router_agreement * 100.0,
                w.greedy_matched,
                w.greedy_len,
                i.logit_rel_err,
                i.router_agreement * 100.0,
                i.greedy_matched,
                i.greedy_len,
                if p.passed { "ok" } else { "FAIL" }
            );
        }
        println!(
            "{}: {} prompts, max logit error {:.3e} (tolerance {:.0e}), router agreement {:.2}%, greedy {}",
            if report.passed { "PASS" } else { "FAIL" },
            report.prompts.len(),
            report.max_logit_rel_err,
            LOGIT_TOLERANCE,
            report.min_router_agreement * 100.0,
            if report.greedy_all_match {
                "identical"
            } else {
                "differs"
            }
        );
    }
    Ok(if report.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
