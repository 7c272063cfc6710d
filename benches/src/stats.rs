//! Small numeric helpers: percentiles over recorded samples, throughput and ratios.

use serde::Serialize;
use std::time::Duration;

/// Latency percentiles of one series, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Percentiles {
    /// Samples recorded.
    pub count: usize,
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
}

/// The `q`-quantile (0.0..=1.0) of an ascending slice, by the nearest-rank method; `None`
/// for an empty slice.
pub fn percentile(sorted: &[Duration], q: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let q = q.clamp(0.0, 1.0);
    // Nearest rank: the smallest sample with at least q of the samples at or below it.
    let rank = (q * sorted.len() as f64).ceil() as usize;
    let index = rank.saturating_sub(1).min(sorted.len() - 1);
    sorted.get(index).copied()
}

/// Sorts `samples` and summarises them.
pub fn summarize(samples: &mut [Duration]) -> Percentiles {
    samples.sort_unstable();
    let us = |q| percentile(samples, q).map_or(0.0, |d| d.as_secs_f64() * 1e6);
    Percentiles {
        count: samples.len(),
        p50_us: us(0.50),
        p99_us: us(0.99),
        p999_us: us(0.999),
    }
}

/// Median of `values` (mean of the middle two for an even count; 0 when empty).
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Bytes over time as Gbit/s (0 when no time passed).
pub fn gbit_per_sec(bytes: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs <= 0.0 {
        return 0.0;
    }
    bytes as f64 * 8.0 / secs / 1e9
}

/// CPU seconds spent per gigabyte (10^9 bytes) moved; `None` when nothing moved.
pub fn cpu_per_gb(cpu_secs: f64, bytes: u64) -> Option<f64> {
    (bytes > 0).then(|| cpu_secs / (bytes as f64 / 1e9))
}

/// `ours / theirs`, when both are known and `theirs` is not zero.
pub fn ratio(ours: Option<f64>, theirs: Option<f64>) -> Option<f64> {
    match (ours, theirs) {
        (Some(a), Some(b)) if b.abs() > f64::EPSILON && a.is_finite() && b.is_finite() => {
            Some(a / b)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|&x| Duration::from_micros(x)).collect()
    }

    #[test]
    fn percentile_of_empty_is_none() {
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn percentile_uses_nearest_rank() {
        let s = us(&(1..=1000).collect::<Vec<_>>());
        assert_eq!(percentile(&s, 0.5), Some(Duration::from_micros(500)));
        assert_eq!(percentile(&s, 0.99), Some(Duration::from_micros(990)));
        assert_eq!(percentile(&s, 0.999), Some(Duration::from_micros(999)));
        assert_eq!(percentile(&s, 1.0), Some(Duration::from_micros(1000)));
        assert_eq!(percentile(&s, 0.0), Some(Duration::from_micros(1)));
    }

    #[test]
    fn summarize_sorts_first() {
        let mut s = us(&[30, 10, 20, 40]);
        let p = summarize(&mut s);
        assert_eq!(p.count, 4);
        assert!((p.p50_us - 20.0).abs() < 1e-9);
        assert!((p.p99_us - 40.0).abs() < 1e-9);
    }

    #[test]
    fn throughput_and_cpu_per_gb() {
        let g = gbit_per_sec(1_250_000_000, Duration::from_secs(1));
        assert!((g - 10.0).abs() < 1e-9);
        assert_eq!(gbit_per_sec(5, Duration::ZERO), 0.0);
        assert_eq!(cpu_per_gb(1.0, 0), None);
        let c = cpu_per_gb(3.0, 2_000_000_000).unwrap_or_default();
        assert!((c - 1.5).abs() < 1e-9);
    }

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn ratio_needs_both_sides() {
        assert_eq!(ratio(Some(4.0), Some(2.0)), Some(2.0));
        assert_eq!(ratio(None, Some(2.0)), None);
        assert_eq!(ratio(Some(1.0), Some(0.0)), None);
        assert_eq!(ratio(Some(1.0), None), None);
    }
}
