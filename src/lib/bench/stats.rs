//! Latency statistics the way perftest reports them: min, median (typical),
//! average, standard deviation, 99% and 99.9%, max.

use std::time::Duration;

/// A summary of latency samples.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Summary {
    /// Number of samples.
    pub samples: usize,
    /// Smallest, µs.
    pub min_us: f64,
    /// Median, µs.
    pub p50_us: f64,
    /// Mean, µs.
    pub avg_us: f64,
    /// Standard deviation, µs.
    pub stdev_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// 99.9th percentile, µs.
    pub p999_us: f64,
    /// Largest, µs.
    pub max_us: f64,
}

/// Summarises samples (sorted in place). Empty input gives all zeros.
pub fn summarize(samples: &mut [Duration]) -> Summary {
    if samples.is_empty() {
        return Summary::default();
    }
    samples.sort_unstable();
    let us = |d: Duration| d.as_nanos() as f64 / 1e3;
    let n = samples.len();
    let pct = |p: f64| us(samples[((n as f64 * p).ceil() as usize).clamp(1, n) - 1]);
    let avg = samples.iter().map(|&d| us(d)).sum::<f64>() / n as f64;
    let var = samples.iter().map(|&d| (us(d) - avg).powi(2)).sum::<f64>() / n as f64;
    Summary {
        samples: n,
        min_us: us(samples[0]),
        p50_us: pct(0.50),
        avg_us: avg,
        stdev_us: var.sqrt(),
        p99_us: pct(0.99),
        p999_us: pct(0.999),
        max_us: us(samples[n - 1]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_one_to_a_thousand() {
        let mut v: Vec<Duration> = (1..=1000).rev().map(Duration::from_micros).collect();
        let s = summarize(&mut v);
        assert_eq!(
            (s.min_us, s.p50_us, s.p99_us, s.p999_us, s.max_us),
            (1.0, 500.0, 990.0, 999.0, 1000.0)
        );
        assert!((s.avg_us - 500.5).abs() < 1e-9);
    }

    #[test]
    fn empty_is_zero() {
        assert_eq!(summarize(&mut []), Summary::default());
    }
}
