//! `switchyard bench`: a load generator for any OpenAI-compatible server, whose flags,
//! definitions and result keys are those of `vllm bench serve`, so numbers compare
//! across servers. Every request streams; token counts come from the server's `usage`;
//! failures are counted by kind, never dropped. A correctness probe can mix in greedy
//! repeats of one prompt whose outputs must agree.

pub mod args;
pub mod arrivals;
pub mod client;
pub mod dataset;
pub mod error;
pub mod link;
pub mod metrics;
pub mod plot;
pub mod probe;
pub mod report;
pub mod runner;
pub mod sse;
pub mod stats;

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

pub use args::Args;
use args::{Endpoint, Source};
pub use error::Error;
use metrics::BenchmarkMetrics;
use probe::ProbeReport;

/// What a finished run found; also written to `--save-result`.
#[derive(Debug)]
pub struct Outcome {
    pub result: Value,
    pub metrics: BenchmarkMetrics,
    pub probe: Option<ProbeReport>,
}

/// Status lines and the summary go to `out` (stdout for the CLI). They are for people:
/// a failed write does not stop the run, whose record is the result file.
fn say(out: &mut dyn Write, text: &str) {
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

fn progress_bar(n: usize, hidden: bool) -> ProgressBar {
    if hidden {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(n as u64), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("{percent:>3}%|{wide_bar}| {pos}/{len} [{elapsed}<{eta}]")
    {
        bar.set_style(style);
    }
    bar
}

pub async fn run(args: &Args, out: &mut dyn Write) -> Result<Outcome, Error> {
    args.validate()?;
    let base_url = args.base_url()?;
    let endpoint = args.endpoint_kind()?;
    let headers = client::header_map(&args.headers()?)?;
    let http = client::http_client()?;
    let model = match &args.model {
        Some(m) => m.clone(),
        None => {
            let m = client::first_model(&http, &base_url, &headers).await?;
            say(
                out,
                &format!("Model not specified; the server's first model: {m}\n"),
            );
            m
        }
    };

    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let mut requests = match args.source()? {
        Source::Random => dataset::random(
            &mut rng,
            args.num_prompts,
            args.random_input_len,
            args.random_output_len,
            args.random_range_ratio,
            args.tokenizer_vocab,
            endpoint == Endpoint::Chat,
        ),
        Source::ShareGpt(path) => {
            dataset::sharegpt(&mut rng, &path, args.num_prompts, args.sharegpt_output_len)?
        }
        Source::PrefixRepetition => dataset::prefix_repetition(
            &mut rng,
            args.num_prompts,
            dataset::Repetition {
                prefix_len: args.prefix_repetition_prefix_len,
                suffix_len: args.prefix_repetition_suffix_len,
                num_prefixes: args.prefix_repetition_num_prefixes,
                output_len: args.prefix_repetition_output_len,
            },
            args.tokenizer_vocab,
            endpoint == Endpoint::Chat,
        ),
    };
    dataset::add_probes(&mut rng, &mut requests, args.probe_fraction);
    let offsets = arrivals::offsets(&mut rng, requests.len(), args.request_rate, args.burstiness);

    let distribution = if args.burstiness == 1.0 {
        "Poisson process"
    } else {
        "Gamma distribution"
    };
    let concurrency = args
        .max_concurrency
        .map_or("None".to_owned(), |c| c.to_string());
    say(
        out,
        &format!(
            "Traffic request rate: {}\nBurstiness factor: {} ({distribution})\nMaximum request concurrency: {concurrency}\n",
            args.request_rate, args.burstiness
        ),
    );

    let client = Arc::new(client::Client::new(
        http,
        &base_url,
        endpoint,
        model.clone(),
        headers,
        Duration::from_secs_f64(args.request_timeout),
        client::Sampling {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            ignore_eos: args.ignore_eos,
        },
    ));
    let hidden = args.disable_tqdm || !std::io::stdout().is_terminal();
    let progress = progress_bar(requests.len(), hidden);
    let (outputs, duration) =
        runner::execute(client, requests, &offsets, args.max_concurrency, progress).await;

    let percentiles = &args.metric_percentiles.0;
    let m = metrics::calculate(&outputs, duration, percentiles, &args.goodput);
    let probe = probe::check(&outputs);
    let failures: Vec<String> = outputs
        .iter()
        .filter_map(|o| o.result.as_ref().err())
        .map(|f| format!("{}: {}", f.kind, f.message))
        .collect();
    if !failures.is_empty() {
        let mut s =
            String::from("Failed requests during benchmark run detected (capping to 10):\n");
        for (i, f) in failures.iter().take(10).enumerate() {
            s.push_str(&format!("Error {i}: {f}\n"));
        }
        say(out, &s);
    }
    if m.without_usage > 0 {
        say(
            out,
            &format!(
                "warning: {} responses had no usage; their output tokens are counted as text chunks\n",
                m.without_usage
            ),
        );
    }
    if m.without_text > 0 {
        say(
            out,
            &format!(
                "note: {} completed responses had no text (every token decoded to nothing); their first token is timed at the finishing chunk\n",
                m.without_text
            ),
        );
    }
    let info = report::RunInfo {
        endpoint,
        base_url,
        model,
        num_prompts: args.num_prompts,
        request_rate: args.request_rate,
        burstiness: args.burstiness,
        max_concurrency: args.max_concurrency,
        metrics: args.percentile_metrics.0.clone(),
        duration,
    };
    say(out, &report::table(&info, &m, probe.as_ref()));
    let result = report::result_json(&info, &m, probe.as_ref(), &outputs);

    if let Some(path) = &args.save_result {
        let text = serde_json::to_string_pretty(&result).map_err(|e| Error::Write {
            path: path.clone(),
            message: e.to_string(),
        })?;
        std::fs::write(path, text).map_err(|e| Error::Write {
            path: path.clone(),
            message: e.to_string(),
        })?;
    }
    if let Some(path) = &args.plot {
        let title = format!(
            "{} on {}: {} requests, {} completed, {} failed, rate {}, concurrency {}",
            info.model,
            info.base_url,
            args.num_prompts,
            m.completed,
            m.failed,
            args.request_rate,
            concurrency
        );
        plot::write_run(path, &title, &outputs, duration)?;
    }
    Ok(Outcome {
        result,
        metrics: m,
        probe,
    })
}
