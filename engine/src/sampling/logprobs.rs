//! Logprobs of a row of logits: log-softmax in f64, the best N alternatives without
//! sorting the vocabulary. They are of the model's raw logits, before any penalty,
//! temperature or top-k/top-p, which is what OpenAI and vLLM report.

/// `log(sum(exp(logits)))` accumulated in f64 after subtracting the maximum; `-inf` for
/// an empty row or one that is all `-inf`.
pub fn log_sum_exp(logits: &[f32]) -> f64 {
    let max = logits
        .iter()
        .fold(f64::NEG_INFINITY, |m, &l| m.max(l as f64));
    if !max.is_finite() {
        return max;
    }
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    max + sum.ln()
}

fn logprob(logit: f32, lse: f64) -> f32 {
    (logit as f64 - lse) as f32
}

/// The log-probabilities of a row of logits.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let lse = log_sum_exp(logits);
    logits.iter().map(|&l| logprob(l, lse)).collect()
}

/// The log-probability of `token` in a row of logits; `-inf` for an id outside the row.
pub fn logprob_of(logits: &[f32], token: u32) -> f32 {
    match logits.get(token as usize) {
        Some(&l) => logprob(l, log_sum_exp(logits)),
        None => f32::NEG_INFINITY,
    }
}

/// The `n` most likely tokens of a row of logits with their log-probabilities, most
/// likely first, equal log-probabilities by lower id.
pub fn top_logprobs(logits: &[f32], n: usize) -> Vec<(u32, f32)> {
    top_with_lse(logits, n, log_sum_exp(logits))
}

/// Whether `a` ranks before `b`: higher logprob, then lower id.
fn rank(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// O(vocab) + O(n log n) with O(n) memory: candidates that beat the current n-th best go
/// into a buffer of 2n; when it is full, a linear selection keeps its n best. Each
/// compaction costs O(n) and frees n places, so the scan stays linear.
fn top_with_lse(logits: &[f32], n: usize, lse: f64) -> Vec<(u32, f32)> {
    let n = n.min(logits.len());
    if n == 0 {
        return Vec::new();
    }
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(2 * n);
    let mut threshold: Option<(u32, f32)> = None;
    for (i, &l) in logits.iter().enumerate() {
        let c = (i as u32, logprob(l, lse));
        if threshold.is_some_and(|t| rank(&c, &t).is_ge()) {
            continue;
        }
        best.push(c);
        if best.len() == 2 * n {
            best.select_nth_unstable_by(n - 1, rank);
            best.truncate(n);
            threshold = Some(best[n - 1]);
        }
    }
    if best.len() > n {
        best.select_nth_unstable_by(n - 1, rank);
        best.truncate(n);
    }
    best.sort_unstable_by(rank);
    best
}

/// What the API reports for one generated token: its logprob and the `n` most likely
/// alternatives, all of the raw logits.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

impl TokenLogprobs {
    /// Computes the log-sum-exp of the row once for the token and its alternatives.
    pub fn from_logits(logits: &[f32], token: u32, n: usize) -> Self {
        let lse = log_sum_exp(logits);
        let logprob = logits
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |&l| logprob(l, lse));
        TokenLogprobs {
            token,
            logprob,
            top: top_with_lse(logits, n, lse),
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    fn random_logits(rng: &mut ChaCha8Rng, vocab: usize, scale: f32) -> Vec<f32> {
        (0..vocab)
            .map(|_| (rng.random::<f32>() - 0.5) * scale)
            .collect()
    }

    fn naive_log_softmax(logits: &[f32]) -> Vec<f64> {
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        logits.iter().map(|&l| l as f64 - z.ln()).collect()
    }

    #[test]
    fn log_softmax_matches_the_naive_formula_and_sums_to_one() {
        let mut src = ChaCha8Rng::seed_from_u64(3);
        for vocab in [1, 2, 7, 100, 5000] {
            let logits = random_logits(&mut src, vocab, 30.0);
            let got = log_softmax(&logits);
            let want = naive_log_softmax(&logits);
            for (g, w) in got.iter().zip(&want) {
                assert!((*g as f64 - w).abs() < 1e-5, "{g} vs {w}");
            }
            let total: f64 = got.iter().map(|&l| (l as f64).exp()).sum();
            assert!((total - 1.0).abs() < 1e-5, "sum {total}");
        }
    }

    #[test]
    fn log_softmax_is_stable_for_large_logits() {
        // exp(1000) overflows even f64: the naive formula would give NaN.
        let got = log_softmax(&[1000.0, 1000.0, -1000.0]);
        let ln2 = std::f32::consts::LN_2;
        assert!((got[0] + ln2).abs() < 1e-6 && (got[1] + ln2).abs() < 1e-6);
        assert!(got[2] < -1000.0 && got[2].is_finite());
        assert_eq!(log_softmax(&[]), Vec::<f32>::new());
        assert_eq!(log_sum_exp(&[f32::NEG_INFINITY]), f64::NEG_INFINITY);
        assert_eq!(logprob_of(&[0.0, f32::NEG_INFINITY], 1), f32::NEG_INFINITY);
    }

    #[test]
    fn top_logprobs_order_and_ties() {
        let logits = [1.0, 3.0, 3.0, 2.0, 3.0];
        let ids = |n| {
            top_logprobs(&logits, n)
                .iter()
                .map(|t| t.0)
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(0), Vec::<u32>::new());
        assert_eq!(ids(1), vec![1]);
        assert_eq!(ids(3), vec![1, 2, 4]);
        assert_eq!(ids(4), vec![1, 2, 4, 3]);
        assert_eq!(ids(10), vec![1, 2, 4, 3, 0]);
        // The values are the log-softmax: three at 3.0, one at 2.0, one at 1.0.
        let z = (3.0 * 3f64.exp() + 2f64.exp() + 1f64.exp()).ln();
        for (id, lp) in top_logprobs(&logits, 5) {
            let want = logits[id as usize] as f64 - z;
            assert!((lp as f64 - want).abs() < 1e-6);
            assert_eq!(lp, logprob_of(&logits, id));
        }
        assert_eq!(logprob_of(&logits, 5), f32::NEG_INFINITY);
        assert_eq!(top_logprobs(&[], 3), Vec::new());
    }

    #[test]
    fn top_logprobs_is_the_head_of_a_full_sort() {
        let mut src = ChaCha8Rng::seed_from_u64(41);
        for case in 0..400 {
            let vocab = src.random_range(1..300usize);
            // Every other case draws from few values, so that ties are common.
            let logits: Vec<f32> = if case % 2 == 0 {
                random_logits(&mut src, vocab, 20.0)
            } else {
                (0..vocab)
                    .map(|_| src.random_range(0..5u32) as f32 * 0.5)
                    .collect()
            };
            let mut full: Vec<(u32, f32)> = log_softmax(&logits)
                .into_iter()
                .enumerate()
                .map(|(i, l)| (i as u32, l))
                .collect();
            full.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let n = src.random_range(0..vocab + 3);
            full.truncate(n);
            assert_eq!(top_logprobs(&logits, n), full, "vocab {vocab} n {n}");
        }
    }

    #[test]
    fn token_logprobs_agree_with_the_free_functions() {
        let logits = [0.3, -2.0, 4.0, 4.0, 1.5];
        let t = TokenLogprobs::from_logits(&logits, 4, 2);
        assert_eq!(t.token, 4);
        assert_eq!(t.logprob, logprob_of(&logits, 4));
        assert_eq!(t.top, top_logprobs(&logits, 2));
        assert_eq!(t.top.iter().map(|x| x.0).collect::<Vec<_>>(), vec![2, 3]);
        let out = TokenLogprobs::from_logits(&logits, 9, 0);
        assert_eq!(out.logprob, f32::NEG_INFINITY);
        assert!(out.top.is_empty());
    }
}
