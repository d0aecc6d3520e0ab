use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use switchyard_engine::cuda::Device;
use switchyard_engine::verify::{
    Check, DECIDED_MARGIN, LOGIT_TOLERANCE, TOP1_MIN_AGREEMENT, verify_with,
};
use switchyard_engine::{DenseModel, ExpertSelection, LocalExperts};

use super::device::DeviceArgs;

/// On the CPU (f32) every tolerance of the reference applies. On a GPU (bf16 weights in the
/// dense layers and the experts) the f32 logit tolerance cannot hold: the check is then
/// top-1 agreement with the reference at >= 99% of positions (prompt positions and greedy
/// steps), errors reported alongside.
#[derive(clap::Args)]
pub struct Args {
    /// Checkpoint directory holding golden.safetensors.
    #[arg(long)]
    model: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: DeviceArgs,
    /// Where the experts compute, when not where the dense layers do: `--device cpu
    /// --experts-device cuda` checks the GPU expert kernels on a family whose dense layers
    /// run on the CPU only (as an expert node on a GPU serves it).
    #[arg(long, value_name = "cpu|cuda|cuda:N|auto")]
    experts_device: Option<Device>,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let device = args.device.resolve()?;
    let experts_device = match args.experts_device {
        Some(d) => d
            .resolve()
            .with_context(|| format!("--experts-device {d}: cannot use this device"))?,
        None => device,
    };
    let check = match (device, experts_device) {
        (Device::Cuda(_), _) | (_, Device::Cuda(_)) => Check::Top1 {
            min_agreement: TOP1_MIN_AGREEMENT,
        },
        _ => Check::Exact,
    };
    let (model, ckpt) = DenseModel::load(device, &args.model)
        .with_context(|| format!("loading {} onto {device}", args.model.display()))?;
    let experts = LocalExperts::load(experts_device, &ckpt, model.config(), &ExpertSelection::All)
        .with_context(|| format!("loading the experts onto {experts_device}"))?;
    let report = verify_with(&model, &experts, &args.model, check)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{}", report.model);
        println!(
            "dense layers on {}, experts on {}",
            model.device(),
            experts.device()
        );
        println!(
            "{:>6} {:>6} | {:>12} {:>8} {:>7} {:>7} | {:>12} {:>8} {:>7} {:>7} | result",
            "prompt",
            "tokens",
            "whole err",
            "router",
            "greedy",
            "top-1",
            "kv-cache err",
            "router",
            "greedy",
            "top-1",
        );
        for p in &report.prompts {
            let (w, i) = (&p.whole, &p.incremental);
            println!(
                "{:>6} {:>6} | {:>12.3e} {:>7.2}% {:>3}/{:<3} {:>6.2}% | {:>12.3e} {:>7.2}% {:>3}/{:<3} {:>6.2}% | {}",
                p.index,
                p.tokens,
                w.logit_rel_err,
                w.router_agreement * 100.0,
                w.greedy_matched,
                w.greedy_len,
                w.top1_agreement() * 100.0,
                i.logit_rel_err,
                i.router_agreement * 100.0,
                i.greedy_matched,
                i.greedy_len,
                i.top1_agreement() * 100.0,
                if p.passed { "ok" } else { "FAIL" }
            );
        }
        let verdict = if report.passed { "PASS" } else { "FAIL" };
        let greedy = if report.greedy_all_match {
            "identical"
        } else {
            "differs"
        };
        match report.check {
            Check::Exact => println!(
                "{verdict}: {} prompts, max logit error {:.3e} (tolerance {:.0e}), router agreement {:.2}%, greedy {greedy}",
                report.prompts.len(),
                report.max_logit_rel_err,
                LOGIT_TOLERANCE,
                report.min_router_agreement * 100.0,
            ),
            Check::Top1 { min_agreement } => println!(
                "{verdict}: {} prompts, top-1 agreement {:.2}% (at least {:.0}%), at decided positions (reference top-1 ahead by >= {:.0}% of max |logit|) {}/{} (all required); bf16 weights, so the f32 tolerances are reported, not required: max logit error {:.3e}, router agreement {:.2}%, greedy {greedy}",
                report.prompts.len(),
                report.top1_agreement * 100.0,
                min_agreement * 100.0,
                DECIDED_MARGIN * 100.0,
                report.decided_matched,
                report.decided_positions,
                report.max_logit_rel_err,
                report.min_router_agreement * 100.0,
            ),
        }
    }
    Ok(if report.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
