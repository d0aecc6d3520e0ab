//! Command-line flags. Names, defaults and meanings follow `vllm bench serve`, so a
//! command line written for one runs against the other; where we differ it says so.

use std::path::PathBuf;
use std::str::FromStr;

use crate::error::Error;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Server base URL, e.g. http://127.0.0.1:8000 (plain HTTP) [default: http://HOST:PORT].
    #[arg(long)]
    pub base_url: Option<String>,
    /// Server host, when --base-url is not given.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Server port, when --base-url is not given.
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// API endpoint: /v1/completions or /v1/chat/completions.
    #[arg(long, default_value = "/v1/completions")]
    pub endpoint: String,
    /// Model id to request [default: the first model listed by GET /v1/models].
    #[arg(long)]
    pub model: Option<String>,
    /// Requests to send.
    #[arg(long, default_value_t = 1000)]
    pub num_prompts: usize,
    /// Requests per second; `inf` sends every request at once.
    #[arg(long, default_value = "inf")]
    pub request_rate: f64,
    /// Shape of the gamma distribution of inter-arrival gaps: 1 is a Poisson process,
    /// below 1 burstier, above 1 more even.
    #[arg(long, default_value_t = 1.0)]
    pub burstiness: f64,
    /// Requests in flight at most; later arrivals wait on the client side.
    #[arg(long)]
    pub max_concurrency: Option<usize>,
    /// `random`, or the path of a ShareGPT-format JSON file.
    #[arg(long, default_value = "random")]
    pub dataset: String,
    /// vLLM's spelling of --dataset: `random`, `sharegpt` (with --dataset-path) or
    /// `prefix_repetition` (prompts sharing a few prefixes: prefix caching's workload).
    #[arg(long)]
    pub dataset_name: Option<String>,
    /// vLLM's spelling of --dataset PATH.
    #[arg(long)]
    pub dataset_path: Option<PathBuf>,
    /// Prompt tokens of a random request (drawn in len*(1-ratio)..=len*(1+ratio)).
    #[arg(long, default_value_t = 1024)]
    pub random_input_len: usize,
    /// Output tokens (max_tokens) of a random request.
    #[arg(long, default_value_t = 128)]
    pub random_output_len: usize,
    /// Spread of random input and output lengths around their means.
    #[arg(long, default_value_t = 0.0)]
    pub random_range_ratio: f64,
    /// prefix_repetition: tokens of each shared prefix.
    #[arg(long, default_value_t = 256)]
    pub prefix_repetition_prefix_len: usize,
    /// prefix_repetition: tokens after the prefix, random per request.
    #[arg(long, default_value_t = 256)]
    pub prefix_repetition_suffix_len: usize,
    /// prefix_repetition: distinct prefixes, the requests spread evenly over them.
    #[arg(long, default_value_t = 10)]
    pub prefix_repetition_num_prefixes: usize,
    /// prefix_repetition: output tokens (max_tokens) of every request.
    #[arg(long, default_value_t = 128)]
    pub prefix_repetition_output_len: usize,
    /// Output tokens of every ShareGPT request [default: the reply's length in the file].
    #[arg(long)]
    pub sharegpt_output_len: Option<usize>,
    /// Random prompts on /v1/completions are token ids drawn from 3..VOCAB: keep it at
    /// most the model's vocabulary (there is no tokenizer on this side).
    #[arg(long, default_value_t = 256)]
    pub tokenizer_vocab: u32,
    /// Ask the server to keep generating past end-of-sequence, so outputs have the
    /// requested length.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Sampling temperature (vLLM's default: greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Top-p sampling, passed through when given.
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Top-k sampling, passed through when given.
    #[arg(long)]
    pub top_k: Option<i64>,
    /// Seed of the dataset, the arrival times and the probe positions.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Service-level objectives for goodput, in milliseconds: ttft:MS tpot:MS e2el:MS.
    #[arg(long, num_args = 1.., value_parser = Slo::from_str)]
    pub goodput: Vec<Slo>,
    /// Comma-separated percentiles to report for each metric.
    #[arg(long, default_value = "99", value_parser = parse_percentiles)]
    pub metric_percentiles: Percentiles,
    /// Comma-separated metrics to report (vLLM leaves e2el out by default; we do not).
    #[arg(long, default_value = "ttft,tpot,itl,e2el", value_parser = parse_metrics)]
    pub percentile_metrics: MetricList,
    /// Write the result JSON here (vLLM: --save-result --result-filename FILE).
    #[arg(long, value_name = "FILE.json")]
    pub save_result: Option<PathBuf>,
    /// Write an SVG with the latency distributions and throughput over time.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Fraction of requests that repeat one fixed prompt at temperature 0; their outputs
    /// must all be identical, and every one that differs is reported.
    #[arg(long, default_value_t = 0.0)]
    pub probe_fraction: f64,
    /// Seconds one request may take, from sending to its last byte, before it counts as a
    /// timeout.
    #[arg(long, default_value_t = 600.0)]
    pub request_timeout: f64,
    /// Extra HTTP headers, KEY=VALUE (e.g. Authorization=Bearer ...).
    #[arg(long, num_args = 1..)]
    pub header: Vec<String>,
    /// No progress bar (it is also hidden when stdout is not a terminal).
    #[arg(long)]
    pub disable_tqdm: bool,
}

/// The request-level metrics a goodput objective can bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SloMetric {
    Ttft,
    Tpot,
    E2el,
}

/// One goodput objective: a request is good when the metric is at most `ms`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Slo {
    pub metric: SloMetric,
    pub ms: f64,
}

impl FromStr for Slo {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, value) = s
            .split_once(':')
            .ok_or_else(|| format!("goodput objective `{s}` is not KEY:MS"))?;
        let metric = match name.trim() {
            "ttft" => SloMetric::Ttft,
            "tpot" => SloMetric::Tpot,
            "e2el" => SloMetric::E2el,
            other => {
                return Err(format!(
                    "goodput metric `{other}` is not ttft, tpot or e2el"
                ));
            }
        };
        let ms: f64 = value
            .trim()
            .parse()
            .map_err(|_| format!("goodput value `{value}` is not a number of milliseconds"))?;
        if !(ms >= 0.0 && ms.is_finite()) {
            return Err(format!("goodput value {ms} must be a non-negative number"));
        }
        Ok(Slo { metric, ms })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Percentiles(pub Vec<f64>);

fn parse_percentiles(s: &str) -> Result<Percentiles, String> {
    let ps = s
        .split(',')
        .map(|p| {
            let v: f64 = p
                .trim()
                .parse()
                .map_err(|_| format!("percentile `{p}` is not a number"))?;
            if (0.0..=100.0).contains(&v) {
                Ok(v)
            } else {
                Err(format!("percentile {v} is outside 0..=100"))
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Percentiles(ps))
}

/// The latency metrics the summary and the result report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    Ttft,
    Tpot,
    Itl,
    E2el,
}

impl Metric {
    pub const ALL: [Metric; 4] = [Metric::Ttft, Metric::Tpot, Metric::Itl, Metric::E2el];

    /// The key fragment of the result JSON (`mean_ttft_ms`).
    pub fn key(self) -> &'static str {
        match self {
            Metric::Ttft => "ttft",
            Metric::Tpot => "tpot",
            Metric::Itl => "itl",
            Metric::E2el => "e2el",
        }
    }

    /// Name and section header in the summary table, as vLLM prints them.
    pub fn labels(self) -> (&'static str, &'static str) {
        match self {
            Metric::Ttft => ("TTFT", "Time to First Token"),
            Metric::Tpot => ("TPOT", "Time per Output Token (excl. 1st token)"),
            Metric::Itl => ("ITL", "Inter-token Latency"),
            Metric::E2el => ("E2EL", "End-to-end Latency"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct MetricList(pub Vec<Metric>);

fn parse_metrics(s: &str) -> Result<MetricList, String> {
    let wanted = s
        .split(',')
        .map(|m| {
            Metric::ALL
                .into_iter()
                .find(|k| k.key() == m.trim())
                .ok_or_else(|| format!("metric `{m}` is not ttft, tpot, itl or e2el"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Report in the canonical order whatever order they were asked in.
    Ok(MetricList(
        Metric::ALL
            .into_iter()
            .filter(|m| wanted.contains(m))
            .collect(),
    ))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
}

/// Where the prompts come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    Random,
    ShareGpt(PathBuf),
    PrefixRepetition,
}

impl Args {
    /// The base URL without a trailing slash.
    pub fn base_url(&self) -> Result<String, Error> {
        let url = match &self.base_url {
            Some(u) => u.trim_end_matches('/').to_owned(),
            None => format!("http://{}:{}", self.host, self.port),
        };
        if url.starts_with("https://") {
            return Err(Error::Config(format!(
                "{url}: this build speaks plain HTTP only (no TLS); put a plain-HTTP address in --base-url"
            )));
        }
        if !url.starts_with("http://") {
            return Err(Error::Config(format!(
                "--base-url {url} must start with http://"
            )));
        }
        Ok(url)
    }

    pub fn endpoint_kind(&self) -> Result<Endpoint, Error> {
        match self.endpoint.as_str() {
            "/v1/completions" => Ok(Endpoint::Completions),
            "/v1/chat/completions" => Ok(Endpoint::Chat),
            other => Err(Error::Config(format!(
                "--endpoint {other}: only /v1/completions and /v1/chat/completions are supported"
            ))),
        }
    }

    pub fn source(&self) -> Result<Source, Error> {
        match (&self.dataset_name, &self.dataset_path) {
            (Some(name), path) if name == "sharegpt" => {
                path.clone().map(Source::ShareGpt).ok_or_else(|| {
                    Error::Config("--dataset-name sharegpt needs --dataset-path".into())
                })
            }
            (Some(name), None) if name == "random" => Ok(Source::Random),
            (Some(name), None) if name == "prefix_repetition" => {
                if self.prefix_repetition_num_prefixes == 0
                    || self.prefix_repetition_prefix_len + self.prefix_repetition_suffix_len == 0
                {
                    return Err(Error::Config(
                        "prefix_repetition needs at least one prefix and a non-empty prompt".into(),
                    ));
                }
                Ok(Source::PrefixRepetition)
            }
            (Some(name), _) => Err(Error::Config(format!(
                "--dataset-name {name}: only random, sharegpt and prefix_repetition are supported"
            ))),
            (None, Some(path)) => Ok(Source::ShareGpt(path.clone())),
            (None, None) if self.dataset == "random" => Ok(Source::Random),
            (None, None) => Ok(Source::ShareGpt(PathBuf::from(&self.dataset))),
        }
    }

    /// Header name/value pairs from `--header KEY=VALUE`.
    pub fn headers(&self) -> Result<Vec<(String, String)>, Error> {
        self.header
            .iter()
            .map(|h| {
                h.split_once('=')
                    .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                    .ok_or_else(|| Error::Config(format!("--header {h} is not KEY=VALUE")))
            })
            .collect()
    }

    /// Rejects flag values that would make the run meaningless before anything is sent.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::Config(m));
        if self.num_prompts == 0 {
            return bad("--num-prompts must be at least 1".into());
        }
        if self.request_rate.is_nan() || self.request_rate <= 0.0 {
            return bad(format!(
                "--request-rate must be positive or inf, got {}",
                self.request_rate
            ));
        }
        if self.burstiness.is_nan() || self.burstiness <= 0.0 {
            return bad(format!(
                "--burstiness must be positive, got {}",
                self.burstiness
            ));
        }
        if self.max_concurrency == Some(0) {
            return bad("--max-concurrency must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&self.random_range_ratio) {
            return bad(format!(
                "--random-range-ratio must be in [0, 1], got {}",
                self.random_range_ratio
            ));
        }
        if self.random_input_len == 0 || self.random_output_len == 0 {
            return bad("--random-input-len and --random-output-len must be at least 1".into());
        }
        if self.tokenizer_vocab <= crate::dataset::FIRST_RANDOM_TOKEN {
            return bad(format!(
                "--tokenizer-vocab must be above {}",
                crate::dataset::FIRST_RANDOM_TOKEN
            ));
        }
        if !(0.0..=1.0).contains(&self.probe_fraction) {
            return bad(format!(
                "--probe-fraction must be in [0, 1], got {}",
                self.probe_fraction
            ));
        }
        if !(self.request_timeout > 0.0 && self.request_timeout.is_finite()) {
            return bad("--request-timeout must be a positive number of seconds".into());
        }
        self.base_url()?;
        self.endpoint_kind()?;
        self.source()?;
        self.headers()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn parse(extra: &[&str]) -> Args {
        let mut argv = vec!["bench"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).expect("flags parse").args
    }

    #[test]
    fn defaults_follow_vllm() {
        let a = parse(&[]);
        assert_eq!(a.num_prompts, 1000);
        assert!(a.request_rate.is_infinite());
        assert_eq!(a.burstiness, 1.0);
        assert_eq!(a.endpoint, "/v1/completions");
        assert_eq!(a.random_input_len, 1024);
        assert_eq!(a.random_output_len, 128);
        assert_eq!(a.metric_percentiles, Percentiles(vec![99.0]));
        assert_eq!(a.base_url().ok().as_deref(), Some("http://127.0.0.1:8000"));
        assert_eq!(a.source().ok(), Some(Source::Random));
    }

    #[test]
    fn goodput_and_percentiles_parse() {
        let a = parse(&[
            "--goodput",
            "ttft:100",
            "e2el:2500.5",
            "--metric-percentiles",
            "50,90,99.9",
            "--percentile-metrics",
            "e2el,ttft",
            "--request-rate",
            "4",
        ]);
        assert_eq!(
            a.goodput,
            vec![
                Slo {
                    metric: SloMetric::Ttft,
                    ms: 100.0
                },
                Slo {
                    metric: SloMetric::E2el,
                    ms: 2500.5
                }
            ]
        );
        assert_eq!(a.metric_percentiles, Percentiles(vec![50.0, 90.0, 99.9]));
        assert_eq!(
            a.percentile_metrics,
            MetricList(vec![Metric::Ttft, Metric::E2el])
        );
        assert_eq!(a.request_rate, 4.0);
        assert!("itl:5".parse::<Slo>().is_err());
        assert!("ttft".parse::<Slo>().is_err());
        assert!(parse_percentiles("101").is_err());
    }

    #[test]
    fn dataset_spellings() {
        assert_eq!(
            parse(&["--dataset", "/tmp/sg.json"]).source().ok(),
            Some(Source::ShareGpt("/tmp/sg.json".into()))
        );
        assert_eq!(
            parse(&["--dataset-name", "sharegpt", "--dataset-path", "x.json"])
                .source()
                .ok(),
            Some(Source::ShareGpt("x.json".into()))
        );
        assert!(parse(&["--dataset-name", "sharegpt"]).source().is_err());
        assert!(parse(&["--base-url", "https://x"]).validate().is_err());
        assert!(parse(&["--endpoint", "/v1/embeddings"]).validate().is_err());
    }
}
