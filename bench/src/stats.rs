//! Summary statistics with numpy's definitions, so numbers compare with vLLM's:
//! population standard deviation (`np.std`, ddof 0), percentiles by linear
//! interpolation between closest ranks (`np.percentile`'s default), and 0 for an empty
//! sample (vLLM's `np.mean(xs or 0)`).

pub fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.iter().sum::<f64>() / xs.len() as f64
}

pub fn std(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    let m = mean(xs);
    (xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / xs.len() as f64).sqrt()
}

/// The `p`-th percentile (0..=100) of a sorted sample.
pub fn percentile_sorted(sorted: &[f64], p: f64) -> f64 {
    match sorted.len() {
        0 => 0.0,
        1 => sorted[0],
        n => {
            let rank = (p / 100.0).clamp(0.0, 1.0) * (n - 1) as f64;
            let lo = rank.floor() as usize;
            let hi = rank.ceil() as usize;
            sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
        }
    }
}

pub fn percentile(xs: &[f64], p: f64) -> f64 {
    percentile_sorted(&sorted(xs), p)
}

pub fn median(xs: &[f64]) -> f64 {
    percentile(xs, 50.0)
}

fn sorted(xs: &[f64]) -> Vec<f64> {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    v
}

/// Mean, median, standard deviation and chosen percentiles of one metric.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub mean: f64,
    pub median: f64,
    pub std: f64,
    /// (percentile, value), in the order asked for.
    pub percentiles: Vec<(f64, f64)>,
}

impl Summary {
    /// Summarises `xs` scaled by `scale` (1000 for seconds to milliseconds).
    pub fn of(xs: &[f64], percentiles: &[f64], scale: f64) -> Summary {
        let s = sorted(xs);
        Summary {
            mean: mean(&s) * scale,
            median: percentile_sorted(&s, 50.0) * scale,
            std: std(&s) * scale,
            percentiles: percentiles
                .iter()
                .map(|&p| (p, percentile_sorted(&s, p) * scale))
                .collect(),
        }
    }
}

/// How a percentile is named in keys and labels: `99`, `99.9` (vLLM's `p_word`).
pub fn percentile_word(p: f64) -> String {
    if p.fract() == 0.0 {
        format!("{}", p as i64)
    } else {
        format!("{p}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-9, "{a} != {b}");
    }

    // Expected values computed by hand from numpy's definitions:
    // rank = p/100 * (n-1); value = x[floor] + (x[ceil] - x[floor]) * frac(rank).
    #[test]
    fn percentiles_interpolate_linearly_like_numpy() {
        let xs = [4.0, 1.0, 3.0, 2.0];
        close(percentile(&xs, 50.0), 2.5); // rank 1.5
        close(percentile(&xs, 99.0), 3.97); // rank 2.97: 3 + 0.97
        close(percentile(&xs, 0.0), 1.0);
        close(percentile(&xs, 100.0), 4.0);
        close(percentile(&[15.0, 20.0, 35.0, 40.0, 50.0], 40.0), 29.0); // rank 1.6
        close(percentile(&[15.0, 20.0, 35.0, 40.0, 50.0], 90.0), 46.0); // rank 3.6
        close(percentile(&[7.0], 99.0), 7.0);
        close(percentile(&[], 99.0), 0.0);
        close(median(&[5.0, 1.0, 9.0]), 5.0);
        assert_eq!(percentile_word(99.0), "99");
        assert_eq!(percentile_word(99.9), "99.9");
    }

    #[test]
    fn std_is_the_population_std() {
        close(std(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]), 2.0);
        close(std(&[1.0, 2.0]), 0.5); // the sample std would be 0.7071
        close(std(&[3.0]), 0.0);
        close(std(&[]), 0.0);
        close(mean(&[1.0, 2.0, 6.0]), 3.0);
        close(mean(&[]), 0.0);
    }

    #[test]
    fn summary_scales_to_milliseconds() {
        let s = Summary::of(&[0.010, 0.020, 0.030, 0.040], &[50.0, 90.0], 1000.0);
        close(s.mean, 25.0);
        close(s.median, 25.0);
        close(s.std, 125.0f64.sqrt()); // deviations 15, 5, 5, 15 ms
        close(s.percentiles[1].1, 37.0); // rank 2.7: 30 + 0.7 * 10
        assert_eq!(s.percentiles[0].0, 50.0);
    }
}
