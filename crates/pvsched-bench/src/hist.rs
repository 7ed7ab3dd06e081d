//! Latency histograms (HDR, nanosecond resolution) and their summaries in microseconds.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest latency a histogram records; larger values are clamped to it.
pub const MAX_TRACKED_NS: u64 = 60_000_000_000;

/// A latency histogram in nanoseconds.
#[derive(Clone, Debug)]
pub struct LatencyHistogram {
    hist: Histogram<u64>,
    clamped: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyHistogram {
    /// An empty histogram (1 ns to 60 s, 3 significant digits).
    pub fn new() -> Self {
        LatencyHistogram {
            // 3 significant digits over 1 ns..60 s: these bounds are always valid.
            hist: Histogram::new_with_bounds(1, MAX_TRACKED_NS, 3).expect("valid bounds"),
            clamped: 0,
        }
    }

    /// Records one latency in nanoseconds.
    pub fn record_ns(&mut self, ns: u64) {
        if ns > MAX_TRACKED_NS {
            self.clamped += 1;
        }
        self.hist.saturating_record(ns.min(MAX_TRACKED_NS));
    }

    /// Adds another histogram's samples.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.hist.add(&other.hist);
        self.clamped += other.clamped;
    }

    /// Number of samples.
    pub fn len(&self) -> u64 {
        self.hist.len()
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.hist.is_empty()
    }

    /// Count, min/avg/max and percentiles, in microseconds.
    pub fn summary(&self) -> LatencySummary {
        let us = |ns: u64| ns as f64 / 1000.0;
        if self.hist.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: self.hist.len(),
            min_us: us(self.hist.min()),
            avg_us: self.hist.mean() / 1000.0,
            max_us: us(self.hist.max()),
            p50_us: us(self.hist.value_at_quantile(0.50)),
            p90_us: us(self.hist.value_at_quantile(0.90)),
            p99_us: us(self.hist.value_at_quantile(0.99)),
            p999_us: us(self.hist.value_at_quantile(0.999)),
            clamped: self.clamped,
        }
    }

    /// `(latency µs, fraction of samples ≤ it)` points of the cumulative distribution.
    pub fn cdf(&self) -> Vec<(f64, f64)> {
        let n = self.hist.len().max(1) as f64;
        self.hist
            .iter_recorded()
            .map(|v| {
                (
                    v.value_iterated_to() as f64 / 1000.0,
                    v.count_since_last_iteration() as f64 / n,
                )
            })
            .scan(0.0, |acc, (x, f)| {
                *acc += f;
                Some((x, *acc))
            })
            .collect()
    }
}

/// Summary of a latency distribution, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Samples.
    pub count: u64,
    /// Smallest sample.
    pub min_us: f64,
    /// Mean.
    pub avg_us: f64,
    /// Largest sample.
    pub max_us: f64,
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Samples above the histogram's range, recorded as its maximum.
    pub clamped: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_known_samples() {
        let mut h = LatencyHistogram::new();
        for us in 1..=1000u64 {
            h.record_ns(us * 1000);
        }
        let s = h.summary();
        assert_eq!(s.count, 1000);
        assert!((s.min_us - 1.0).abs() < 0.01);
        assert!((s.max_us - 1000.0).abs() / 1000.0 < 0.001);
        assert!((s.avg_us - 500.5).abs() < 0.5);
        assert!((s.p50_us - 500.0).abs() / 500.0 < 0.002);
        assert!((s.p99_us - 990.0).abs() / 990.0 < 0.002);
        assert!((s.p999_us - 999.0).abs() / 999.0 < 0.002);
    }

    #[test]
    fn empty_histogram_summarises_to_zero() {
        assert_eq!(LatencyHistogram::new().summary(), LatencySummary::default());
    }

    #[test]
    fn huge_values_are_clamped_and_counted() {
        let mut h = LatencyHistogram::new();
        h.record_ns(u64::MAX);
        h.record_ns(0);
        let s = h.summary();
        assert_eq!(s.count, 2);
        assert_eq!(s.clamped, 1);
    }

    #[test]
    fn merge_adds_counts_and_cdf_ends_at_one() {
        let mut a = LatencyHistogram::new();
        let mut b = LatencyHistogram::new();
        a.record_ns(10_000);
        b.record_ns(20_000);
        b.record_ns(30_000);
        a.merge(&b);
        assert_eq!(a.len(), 3);
        let cdf = a.cdf();
        assert!((cdf.last().unwrap().1 - 1.0).abs() < 1e-9);
        assert!(cdf.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
    }
}
