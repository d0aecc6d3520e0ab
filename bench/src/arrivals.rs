//! When each request is sent: gamma-distributed gaps, as `vllm bench serve` draws them.

use rand::Rng;
use rand_distr::{Distribution, Gamma};

/// Gaps between consecutive arrivals, seconds. Shape `burstiness`, scale
/// `1 / (rate * burstiness)`: mean `1 / rate` whatever the shape, variance
/// `1 / (rate^2 * burstiness)`. Burstiness 1 is a Poisson process; infinite burstiness
/// is a constant gap; an infinite rate sends everything at once.
pub fn gaps(rng: &mut impl Rng, n: usize, rate: f64, burstiness: f64) -> Vec<f64> {
    if rate.is_infinite() {
        return vec![0.0; n];
    }
    if burstiness.is_infinite() {
        return vec![1.0 / rate; n];
    }
    match Gamma::new(burstiness, 1.0 / (rate * burstiness)) {
        Ok(gamma) => (0..n).map(|_| gamma.sample(rng)).collect(),
        // Only for parameters `Args::validate` rejects; fall back to the mean gap.
        Err(_) => vec![1.0 / rate; n],
    }
}

/// Send times from the start of the run, seconds. Like vLLM, the cumulative gaps are
/// rescaled so the last request goes out at exactly `n / rate`: the random total
/// would otherwise differ by a few percent from seed to seed and so would throughput.
pub fn offsets(rng: &mut impl Rng, n: usize, rate: f64, burstiness: f64) -> Vec<f64> {
    let mut t = 0.0;
    let mut out: Vec<f64> = gaps(rng, n, rate, burstiness)
        .into_iter()
        .map(|g| {
            t += g;
            t
        })
        .collect();
    if let Some(&last) = out.last()
        && last > 0.0
        && rate.is_finite()
    {
        let scale = n as f64 / rate / last;
        for x in &mut out {
            *x *= scale;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn mean_and_cv2(xs: &[f64]) -> (f64, f64) {
        let n = xs.len() as f64;
        let mean = xs.iter().sum::<f64>() / n;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        (mean, var / (mean * mean))
    }

    #[test]
    fn gamma_gaps_have_mean_one_over_rate_and_shape_burstiness() {
        let mut rng = ChaCha8Rng::seed_from_u64(42);
        for (rate, burstiness) in [(5.0, 1.0), (5.0, 0.25), (20.0, 4.0)] {
            let g = gaps(&mut rng, 40_000, rate, burstiness);
            let (mean, cv2) = mean_and_cv2(&g);
            // Standard error of the mean is sqrt(cv2 / n) relative: 2% at the burstiest.
            assert!(
                (mean * rate - 1.0).abs() < 0.05,
                "rate {rate}, burstiness {burstiness}: mean gap {mean}"
            );
            // A gamma's squared coefficient of variation is 1 / shape.
            assert!(
                (cv2 * burstiness - 1.0).abs() < 0.1,
                "rate {rate}, burstiness {burstiness}: cv^2 {cv2}"
            );
            assert!(g.iter().all(|&x| x >= 0.0));
        }
    }

    #[test]
    fn limits_and_rescaling() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        assert_eq!(offsets(&mut rng, 3, f64::INFINITY, 1.0), vec![0.0; 3]);
        assert_eq!(gaps(&mut rng, 2, 4.0, f64::INFINITY), vec![0.25, 0.25]);
        let o = offsets(&mut rng, 100, 10.0, 0.5);
        assert!(
            (o[99] - 10.0).abs() < 1e-9,
            "last send at n / rate: {}",
            o[99]
        );
        assert!(o.windows(2).all(|w| w[0] <= w[1]));
    }
}
