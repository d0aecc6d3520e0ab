//! Next-token sampling: greedy, temperature, top-k, top-p. A seeded sampler draws the
//! same tokens from the same logits every time.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 1.0 disables nucleus sampling.
    pub top_p: f32,
    /// 0 disables top-k.
    pub top_k: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self::default()
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 || self.top_k == 1
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    scratch: Vec<(u32, f32)>,
}

/// Index of the largest logit; the lowest index among equals, like `torch.argmax`.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in logits.iter().enumerate() {
        if *v > logits[best] {
            best = i;
        }
    }
    best as u32
}

impl Sampler {
    pub fn new(params: SamplingParams, seed: u64) -> Self {
        Sampler {
            params,
            rng: ChaCha8Rng::seed_from_u64(seed),
            scratch: Vec::new(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.is_greedy() {
            return argmax(logits);
        }
        let t = self.params.temperature;
        let cand = &mut self.scratch;
        cand.clear();
        cand.extend(logits.iter().enumerate().map(|(i, l)| (i as u32, l / t)));
        // Sorting by score (ties by id) makes the draw independent of input order.
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.params.top_k > 0 {
            cand.truncate(self.params.top_k);
        }
        let max = cand[0].1;
        let mut sum = 0.0f64;
        for c in cand.iter_mut() {
            c.1 = (c.1 - max).exp();
            sum += c.1 as f64;
        }
        if self.params.top_p < 1.0 {
            // Smallest prefix whose mass reaches top_p (always at least one token).
            let mut acc = 0.0f64;
            let mut keep = cand.len();
            for (i, c) in cand.iter().enumerate() {
                acc += c.1 as f64 / sum;
                if acc >= self.params.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            cand.truncate(keep);
            sum = cand.iter().map(|c| c.1 as f64).sum();
        }
        let mut r = self.rng.random::<f64>() * sum;
        for c in cand.iter() {
            r -= c.1 as f64;
            if r <= 0.0 {
                return c.0;
            }
        }
        cand[cand.len() - 1].0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplingParams::greedy(), 1);
        assert_eq!(s.sample(&[0.1, 3.0, 2.9, -1.0]), 1);
        assert_eq!(argmax(&[1.0, 1.0]), 0);
    }

    #[test]
    fn same_seed_same_draws_and_other_seed_differs() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
        };
        let draw = |seed| {
            let mut s = Sampler::new(p, seed);
            (0..64).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let logits = [5.0, 4.0, 3.0, -10.0, -10.0];
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 1.0,
                top_p: 1.0,
                top_k: 2,
            },
            3,
        );
        for _ in 0..200 {
            assert!(s.sample(&logits) < 2);
        }
        // p(0) = 0.665: top_p 0.5 leaves only token 0.
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 1.0,
                top_p: 0.5,
                top_k: 0,
            },
            3,
        );
        for _ in 0..200 {
            assert_eq!(s.sample(&logits), 0);
        }
    }

    #[test]
    fn frequencies_follow_the_softmax() {
        let logits = [1.0f32, 0.0, 2.0];
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 1.0,
                top_p: 1.0,
                top_k: 0,
            },
            11,
        );
        let n = 20000;
        let mut counts = [0usize; 3];
        for _ in 0..n {
            counts[s.sample(&logits) as usize] += 1;
        }
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        for i in 0..3 {
            let expect = logits[i].exp() / z;
            let got = counts[i] as f32 / n as f32;
            assert!((got - expect).abs() < 0.02, "token {i}: {got} vs {expect}");
        }
    }
}
