//! The steady mixed load of the partition scenarios: clients spread over every
//! coordinator, half streaming, all greedy on the golden prompts, and every outcome
//! recorded and classified against the invariants (../../RELIABILITY.md, "Partitions").

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::http::Client;
use crate::common::{golden, golden_texts, greedy};

/// The coordinators' `--request-timeout-s`: past it a request must have its answer or a
/// clean error; later than this plus [`GRACE`] counts as a hang.
pub const REQUEST_TIMEOUT_S: u64 = 15;
const GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
#[allow(dead_code)] // the violations' details are read through Debug, in the report
pub enum Outcome {
    /// 200 and transformers' text.
    Ok,
    /// A clean refusal: this status, an OpenAI error body.
    Refused(u16),
    /// A stream that ended with an error event instead of its text.
    StreamError,
    /// Everything below breaks an invariant.
    WrongText(String),
    Unclean(String),
    Hung(Duration),
}

#[derive(Debug, Clone)]
pub struct Record {
    pub start: Instant,
    pub took: Duration,
    pub stream: bool,
    pub outcome: Outcome,
}

pub struct Traffic {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Record>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

fn is_error_body(v: &Value) -> bool {
    v["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty())
}

/// One request, classified.
fn one(client: &Client, body: &Value, stream: bool, want: &str) -> Outcome {
    if !stream {
        return match client.post_json("/v1/completions", body) {
            Ok(r) if r.status == 200 => {
                let got = r.json()["choices"][0]["text"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                if got == want {
                    Outcome::Ok
                } else {
                    Outcome::WrongText(format!("got {got:?}, want {want:?}"))
                }
            }
            Ok(r) if matches!(r.status, 503 | 504) && is_error_body(&r.json()) => {
                Outcome::Refused(r.status)
            }
            Ok(r) => Outcome::Unclean(format!("{} {}", r.status, r.text())),
            Err(e) => Outcome::Unclean(e.to_string()),
        };
    }
    let mut body = body.clone();
    body["stream"] = json!(true);
    let s = match client.post_stream("/v1/completions", &body) {
        Ok(s) => s,
        Err(e) => return Outcome::Unclean(e.to_string()),
    };
    if s.status != 200 {
        return match s.into_response() {
            Ok(r) if matches!(r.status, 503 | 504) && is_error_body(&r.json()) => {
                Outcome::Refused(r.status)
            }
            Ok(r) => Outcome::Unclean(format!("{} {}", r.status, r.text())),
            Err(e) => Outcome::Unclean(e.to_string()),
        };
    }
    let events = match s.events() {
        Ok(e) => e,
        Err(e) => return Outcome::Unclean(format!("stream: {e}")),
    };
    let mut text = String::new();
    let mut done = false;
    for ev in &events {
        if ev == "[DONE]" {
            done = true;
            continue;
        }
        let Ok(v) = serde_json::from_str::<Value>(ev) else {
            return Outcome::Unclean(format!("not JSON: {ev}"));
        };
        if is_error_body(&v) {
            return Outcome::StreamError;
        }
        text.push_str(v["choices"][0]["text"].as_str().unwrap_or_default());
    }
    if !done {
        Outcome::Unclean(format!("stream ended without [DONE] after {text:?}"))
    } else if text == want {
        Outcome::Ok
    } else {
        Outcome::WrongText(format!("streamed {text:?}, want {want:?}"))
    }
}

impl Traffic {
    /// `clients` loops, client k on coordinator `k % urls.len()`, streaming every other
    /// request.
    pub fn start(urls: &[String], model: &str, clients: usize) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let prompts = golden();
        let texts = golden_texts();
        let threads = (0..clients)
            .map(|k| {
                let (stop, log) = (stop.clone(), log.clone());
                let client = Client::new(&urls[k % urls.len()]);
                let bodies: Vec<Value> = prompts
                    .iter()
                    .map(|g| greedy(model, json!(g.input_ids), g.greedy_ids.len()))
                    .collect();
                let texts = texts.clone();
                std::thread::spawn(move || {
                    let mut round = k;
                    while !stop.load(Ordering::SeqCst) {
                        let i = round % bodies.len();
                        let stream = round % 2 == 1;
                        round += 1;
                        let start = Instant::now();
                        let mut outcome = one(&client, &bodies[i], stream, &texts[i]);
                        let took = start.elapsed();
                        if took > Duration::from_secs(REQUEST_TIMEOUT_S) + GRACE {
                            outcome = Outcome::Hung(took);
                        }
                        if !matches!(outcome, Outcome::Ok) {
                            // Do not spin on a refusing coordinator.
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        log.lock().unwrap().push(Record {
                            start,
                            took,
                            stream,
                            outcome,
                        });
                    }
                })
            })
            .collect();
        Traffic { stop, log, threads }
    }

    pub fn succeeded(&self) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::Ok))
            .count()
    }

    /// Every request finished so far.
    pub fn records(&self) -> Vec<Record> {
        self.log.lock().unwrap().clone()
    }

    /// Waits until `n` more requests have succeeded; false after `within`.
    pub fn wait_succeeded(&self, n: usize, within: Duration) -> bool {
        let target = self.succeeded() + n;
        crate::common::poll(within, || self.succeeded() >= target)
    }

    /// Stops the clients (each finishes the request it is in) and returns every record.
    pub fn finish(mut self) -> Vec<Record> {
        self.stop.store(true, Ordering::SeqCst);
        for t in std::mem::take(&mut self.threads) {
            t.join().expect("client thread panicked");
        }
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

/// Counts of one scenario's requests.
#[derive(Debug, Default)]
pub struct Tally {
    pub sent: usize,
    pub ok: usize,
    /// "503", "504", "stream error": how many.
    pub refused: BTreeMap<String, usize>,
    pub violations: Vec<String>,
    pub slowest: Duration,
}

pub fn tally(records: &[Record]) -> Tally {
    let mut t = Tally {
        sent: records.len(),
        ..Tally::default()
    };
    for r in records {
        t.slowest = t.slowest.max(r.took);
        match &r.outcome {
            Outcome::Ok => t.ok += 1,
            Outcome::Refused(status) => *t.refused.entry(status.to_string()).or_default() += 1,
            Outcome::StreamError => *t.refused.entry("stream error".into()).or_default() += 1,
            bad => t.violations.push(format!(
                "{} request after {:?}: {bad:?}",
                if r.stream { "streaming" } else { "plain" },
                r.took
            )),
        }
    }
    t
}

/// The p99 (nearest rank) of successful requests' latency.
pub fn p99_ok(records: &[Record]) -> Duration {
    let mut took: Vec<Duration> = records
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Ok))
        .map(|r| r.took)
        .collect();
    took.sort();
    if took.is_empty() {
        return Duration::ZERO;
    }
    took[((took.len() * 99).div_ceil(100)).saturating_sub(1)]
}
