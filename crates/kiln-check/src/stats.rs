//! Robust statistics of a short series of runs: median and relative noise.

/// Median of `xs` (mean of the two middle values for an even count); NaN for none.
pub fn median(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Relative noise of a series: the median absolute deviation scaled to a standard deviation
/// (x1.4826, exact for normal noise, robust to the odd preempted run), divided by the median.
/// 0 for fewer than two values or a zero median.
pub fn relative_noise(xs: &[f64]) -> f64 {
    if xs.len() < 2 {
        return 0.0;
    }
    let m = median(xs);
    if m == 0.0 || !m.is_finite() {
        return 0.0;
    }
    let dev: Vec<f64> = xs.iter().map(|x| (x - m).abs()).collect();
    1.4826 * median(&dev) / m.abs()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(xs: &[f64], expected_median: f64, expected_noise: f64) {
        assert!((median(xs) - expected_median).abs() < 1e-12, "{xs:?}");
        assert!(
            (relative_noise(xs) - expected_noise).abs() < 1e-9,
            "{xs:?}: {}",
            relative_noise(xs)
        );
    }

    #[test]
    fn medians_and_noise() {
        check(&[1.0], 1.0, 0.0);
        check(&[3.0, 1.0, 2.0], 2.0, 1.4826 * 1.0 / 2.0);
        check(&[1.0, 2.0, 3.0, 4.0], 2.5, 1.4826 * 1.0 / 2.5);
        // One outlier (a preempted run) barely moves either number.
        check(&[10.0, 10.0, 10.0, 10.0, 50.0], 10.0, 0.0);
        check(&[0.0, 0.0], 0.0, 0.0);
        assert!(median(&[]).is_nan());
    }
}
