//! Sends the requests on their schedule, at most `--max-concurrency` at a time, and
//! collects what each one saw.

use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use tokio::sync::Semaphore;

use crate::client::{Client, ErrorKind, Failure, RequestOutput};
use crate::dataset::SampleRequest;

/// Outputs in send order, and the run's duration in seconds (first send to last end).
pub async fn execute(
    client: Arc<Client>,
    requests: Vec<SampleRequest>,
    offsets: &[f64],
    max_concurrency: Option<usize>,
    progress: ProgressBar,
) -> (Vec<RequestOutput>, f64) {
    let limit = max_concurrency.map(|c| Arc::new(Semaphore::new(c)));
    let origin = Instant::now();
    let mut tasks = Vec::with_capacity(requests.len());
    for (req, &at) in requests.into_iter().zip(offsets) {
        // Arrivals follow the schedule whatever the concurrency limit: a request that
        // arrives while the limit is reached waits on the client side, as in vLLM.
        tokio::time::sleep_until((origin + Duration::from_secs_f64(at)).into()).await;
        let (client, limit, progress) = (client.clone(), limit.clone(), progress.clone());
        let (probe, prompt_len) = (req.probe, req.prompt_len);
        let task = tokio::spawn(async move {
            let _permit = match limit {
                Some(sem) => sem.acquire_owned().await.ok(),
                None => None,
            };
            let out = client.send(&req, origin).await;
            progress.inc(1);
            out
        });
        tasks.push((task, probe, prompt_len));
    }
    let mut outputs = Vec::with_capacity(tasks.len());
    for (task, probe, prompt_len) in tasks {
        outputs.push(match task.await {
            Ok(out) => out,
            // Counted, never dropped: the totals must add up to --num-prompts.
            Err(e) => RequestOutput {
                probe,
                prompt_len,
                start: 0.0,
                latency: 0.0,
                result: Err(Failure::new(ErrorKind::Client, e.to_string())),
            },
        });
    }
    let duration = origin.elapsed().as_secs_f64();
    progress.finish();
    (outputs, duration)
}
