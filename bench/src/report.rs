//! The summary table (vLLM's layout, line for line where the numbers are the same) and
//! the result JSON (vLLM's keys, plus failures by kind and the probe's findings).

use std::fmt::Write as _;

use serde_json::{Map, Value, json};

use crate::args::{Endpoint, Metric};
use crate::client::RequestOutput;
use crate::metrics::{BenchmarkMetrics, input_tokens, output_tokens};
use crate::probe::ProbeReport;
use crate::stats::percentile_word;

/// What was run, for the header lines and the JSON.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub endpoint: Endpoint,
    pub base_url: String,
    pub model: String,
    pub num_prompts: usize,
    pub request_rate: f64,
    pub burstiness: f64,
    pub max_concurrency: Option<usize>,
    pub metrics: Vec<Metric>,
    pub duration: f64,
}

impl RunInfo {
    /// vLLM's `--backend` name for the endpoint.
    fn backend(&self) -> &'static str {
        match self.endpoint {
            Endpoint::Completions => "openai",
            Endpoint::Chat => "openai-chat",
        }
    }

    fn endpoint_path(&self) -> &'static str {
        match self.endpoint {
            Endpoint::Completions => "/v1/completions",
            Endpoint::Chat => "/v1/chat/completions",
        }
    }
}

fn header(out: &mut String, title: &str, fill: char) {
    let width = 50usize.saturating_sub(title.chars().count());
    let left = width / 2;
    let pad = |n: usize| fill.to_string().repeat(n);
    let _ = writeln!(out, "{}{title}{}", pad(left), pad(width - left));
}

fn int(out: &mut String, label: &str, v: impl std::fmt::Display) {
    let _ = writeln!(out, "{label:<40} {v:<10}");
}

fn num(out: &mut String, label: &str, v: f64) {
    let _ = writeln!(out, "{label:<40} {v:<10.2}");
}

/// The table printed at the end of a run.
pub fn table(info: &RunInfo, m: &BenchmarkMetrics, probe: Option<&ProbeReport>) -> String {
    let mut s = String::new();
    header(&mut s, " Serving Benchmark Result ", '=');
    int(&mut s, "Successful requests:", m.completed);
    int(&mut s, "Failed requests:", m.failed);
    if let Some(c) = info.max_concurrency {
        int(&mut s, "Maximum request concurrency:", c);
    }
    if info.request_rate.is_finite() {
        num(&mut s, "Request rate configured (RPS):", info.request_rate);
    }
    num(&mut s, "Benchmark duration (s):", info.duration);
    int(&mut s, "Total input tokens:", m.total_input);
    int(&mut s, "Total generated tokens:", m.total_output);
    num(&mut s, "Request throughput (req/s):", m.request_throughput);
    if let Some(g) = m.request_goodput {
        num(&mut s, "Request goodput (req/s):", g);
    }
    num(
        &mut s,
        "Output token throughput (tok/s):",
        m.output_throughput,
    );
    num(
        &mut s,
        "Peak output token throughput (tok/s):",
        m.max_output_tokens_per_s,
    );
    num(
        &mut s,
        "Peak concurrent requests:",
        m.max_concurrent_requests as f64,
    );
    num(
        &mut s,
        "Total token throughput (tok/s):",
        m.total_token_throughput,
    );
    for &metric in &info.metrics {
        let (name, title) = metric.labels();
        let summary = m.summary(metric);
        header(&mut s, title, '-');
        num(&mut s, &format!("Mean {name} (ms):"), summary.mean);
        num(&mut s, &format!("Median {name} (ms):"), summary.median);
        for &(p, v) in &summary.percentiles {
            num(&mut s, &format!("P{} {name} (ms):", percentile_word(p)), v);
        }
    }
    if !m.errors.is_empty() {
        header(&mut s, "Failed Requests by Kind", '-');
        for (kind, n) in &m.errors {
            int(&mut s, &format!("{kind}:"), n);
        }
    }
    if let Some(p) = probe {
        header(&mut s, "Correctness Probe", '-');
        int(&mut s, "Probe requests:", p.requests);
        int(&mut s, "Probe requests completed:", p.completed);
        int(&mut s, "Distinct probe outputs:", p.distinct_outputs);
        int(&mut s, "Probe mismatches:", p.mismatches);
        for e in &p.examples {
            let _ = writeln!(
                s,
                "  request {} differs at char {}: expected {:?}, got {:?}",
                e.request, e.first_difference, e.expected, e.got
            );
        }
    }
    let _ = writeln!(s, "{}", "=".repeat(50));
    s
}

/// Seconds since the epoch as vLLM's `%Y%m%d-%H%M%S`, in UTC.
fn date(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}-{:02}{:02}{:02}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// The `--save-result` document.
pub fn result_json(
    info: &RunInfo,
    m: &BenchmarkMetrics,
    probe: Option<&ProbeReport>,
    outputs: &[RequestOutput],
) -> Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // JSON has no infinity; vLLM's own files hold a non-standard `Infinity` there.
    let rate = if info.request_rate.is_finite() {
        json!(info.request_rate)
    } else {
        json!("inf")
    };
    let mut r = Map::new();
    let mut put = |k: &str, v: Value| {
        r.insert(k.to_owned(), v);
    };
    put("date", json!(date(now)));
    put("backend", json!(info.backend()));
    put("endpoint", json!(info.endpoint_path()));
    put("base_url", json!(info.base_url));
    put("model_id", json!(info.model));
    put("num_prompts", json!(info.num_prompts));
    put("request_rate", rate);
    put("burstiness", json!(info.burstiness));
    put("max_concurrency", json!(info.max_concurrency));
    put("duration", json!(info.duration));
    put("completed", json!(m.completed));
    put("failed", json!(m.failed));
    put("total_input_tokens", json!(m.total_input));
    put("total_output_tokens", json!(m.total_output));
    put("request_throughput", json!(m.request_throughput));
    put("request_goodput", json!(m.request_goodput));
    put("output_throughput", json!(m.output_throughput));
    put("total_token_throughput", json!(m.total_token_throughput));
    put("max_output_tokens_per_s", json!(m.max_output_tokens_per_s));
    put("max_concurrent_requests", json!(m.max_concurrent_requests));
    for &metric in &info.metrics {
        let k = metric.key();
        let s = m.summary(metric);
        put(&format!("mean_{k}_ms"), json!(s.mean));
        put(&format!("median_{k}_ms"), json!(s.median));
        put(&format!("std_{k}_ms"), json!(s.std));
        for &(p, v) in &s.percentiles {
            put(&format!("p{}_{k}_ms", percentile_word(p)), json!(v));
        }
    }
    put("errors", json!(m.errors));
    put("requests_without_usage", json!(m.without_usage));
    put("requests_without_text", json!(m.without_text));
    put(
        "probe",
        match probe {
            None => Value::Null,
            Some(p) => json!({
                "requests": p.requests,
                "completed": p.completed,
                "failed": p.failed,
                "distinct_outputs": p.distinct_outputs,
                "mismatches": p.mismatches,
                "reference_text": p.reference,
                "mismatch_examples": p.examples.iter().map(|e| json!({
                    "request": e.request,
                    "first_difference": e.first_difference,
                    "expected": e.expected,
                    "got": e.got,
                })).collect::<Vec<_>>(),
            }),
        },
    );
    // Per request, in send order, as vLLM keeps them (0 / empty for failures).
    let per = |f: &dyn Fn(&RequestOutput) -> Value| outputs.iter().map(f).collect::<Vec<_>>();
    put(
        "input_lens",
        json!(per(&|o| match &o.result {
            Ok(s) => json!(input_tokens(o, s)),
            Err(_) => json!(o.prompt_len),
        })),
    );
    put(
        "output_lens",
        json!(per(&|o| json!(
            o.result.as_ref().map(output_tokens).unwrap_or(0)
        ))),
    );
    put(
        "ttfts",
        json!(per(&|o| json!(
            o.result.as_ref().map(|s| s.ttft).unwrap_or(0.0)
        ))),
    );
    put(
        "itls",
        json!(per(&|o| json!(
            o.result.as_ref().map(|s| s.itl.clone()).unwrap_or_default()
        ))),
    );
    put("latencies", json!(per(&|o| json!(o.latency))));
    put("start_times", json!(per(&|o| json!(o.start))));
    put("probe_flags", json!(per(&|o| json!(o.probe))));
    put(
        "request_errors",
        json!(per(&|o| match &o.result {
            Ok(_) => json!(""),
            Err(f) => json!(format!("{}: {}", f.kind, f.message)),
        })),
    );
    Value::Object(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_in_utc() {
        assert_eq!(date(0), "19700101-000000");
        assert_eq!(date(951_782_400), "20000229-000000");
        assert_eq!(date(1_767_225_599), "20251231-235959");
    }

    #[test]
    fn headers_are_centred_like_python_format() {
        let mut s = String::new();
        header(&mut s, " Serving Benchmark Result ", '=');
        header(&mut s, "Inter-token Latency", '-');
        // Python: "{s:{c}^{n}}" puts the odd fill character on the right.
        assert_eq!(
            s,
            "============ Serving Benchmark Result ============\n\
             ---------------Inter-token Latency----------------\n"
        );
    }
}
