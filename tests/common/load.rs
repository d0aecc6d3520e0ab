//! Clients sending the golden prompts in a loop, checking every answer against
//! transformers' greedy output: the steady load of the cluster tests.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use super::{Cluster, golden, golden_texts, greedy, poll, text_of};

/// Clients sending the golden prompts in a loop until stopped, checking every answer.
pub struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(c: &Arc<Cluster>, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let prompts: Vec<Vec<u32>> = golden().iter().map(|g| g.input_ids.clone()).collect();
        let lengths: Vec<usize> = golden().iter().map(|g| g.greedy_ids.len()).collect();
        let expected = golden_texts();
        let threads = (0..clients)
            .map(|k| {
                let (c, stop, done, failures) =
                    (c.clone(), stop.clone(), done.clone(), failures.clone());
                let (prompts, lengths, expected) =
                    (prompts.clone(), lengths.clone(), expected.clone());
                std::thread::spawn(move || {
                    let client = c.client();
                    let mut round = 0;
                    while !stop.load(Ordering::SeqCst) {
                        let i = (k + round) % prompts.len();
                        round += 1;
                        let body = greedy(&c.model, json!(prompts[i]), lengths[i]);
                        let outcome = match client.post_json("/v1/completions", &body) {
                            Ok(r) if r.status == 200 => {
                                let text = text_of(&r.json());
                                if text == expected[i] {
                                    Ok(())
                                } else {
                                    Err(format!("prompt {i}: got {text:?}, want {:?}", expected[i]))
                                }
                            }
                            Ok(r) => Err(format!("prompt {i}: {} {}", r.status, r.text())),
                            Err(e) => Err(format!("prompt {i}: {e}")),
                        };
                        match outcome {
                            Ok(()) => done.fetch_add(1, Ordering::SeqCst),
                            Err(e) => {
                                failures.lock().unwrap().push(e);
                                0
                            }
                        };
                    }
                })
            })
            .collect();
        Load {
            stop,
            done,
            failures,
            threads,
        }
    }

    pub fn done(&self) -> usize {
        self.done.load(Ordering::SeqCst)
    }

    /// Waits until `n` more requests have completed.
    pub fn wait_for(&self, n: usize) {
        let target = self.done() + n;
        assert!(
            poll(Duration::from_secs(60), || self.done() >= target),
            "requests stopped completing; {}",
            self.failed()
        );
    }

    /// How many requests failed, and the first few reasons.
    pub fn failed(&self) -> String {
        let failures = self.failures.lock().unwrap();
        let first: Vec<&String> = failures.iter().take(5).collect();
        format!("{} requests failed, first: {first:?}", failures.len())
    }

    /// Stops the clients and asserts nothing failed; returns how many completed.
    pub fn finish(mut self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        for t in std::mem::take(&mut self.threads) {
            t.join().expect("load thread panicked");
        }
        assert!(
            self.failures.lock().unwrap().is_empty(),
            "{}",
            self.failed()
        );
        self.done.load(Ordering::SeqCst)
    }
}
