//! Bounded, lock-free statistics for the runtime's hot paths: a log-linear latency histogram
//! of atomics (fixed size, no allocation after creation) and its summary.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};

/// Sub-buckets per power of two (relative resolution 1/8, i.e. 12.5 %).
const SUB: u32 = 8;
const SUB_BITS: u32 = SUB.trailing_zeros();
/// Values below this are counted exactly.
const LINEAR: u64 = 2 * SUB as u64;
const BUCKETS: usize = LINEAR as usize + (64 - SUB_BITS as usize - 1) * SUB as usize;

/// A histogram of nanosecond values with 12.5 % resolution, updated with relaxed atomics by
/// any number of threads. Its memory is fixed: recording never allocates.
pub struct AtomicHist {
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum: AtomicU64,
    max: AtomicU64,
}

impl Default for AtomicHist {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for AtomicHist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AtomicHist({:?})", self.summary())
    }
}

fn bucket_of(v: u64) -> usize {
    if v < LINEAR {
        return v as usize;
    }
    let e = 63 - v.leading_zeros(); // >= SUB_BITS + 1
    let sub = (v >> (e - SUB_BITS)) & (SUB as u64 - 1);
    LINEAR as usize + (e - SUB_BITS - 1) as usize * SUB as usize + sub as usize
}

/// The smallest value that falls in bucket `b`.
fn bucket_floor(b: usize) -> u64 {
    if (b as u64) < LINEAR {
        return b as u64;
    }
    let i = b - LINEAR as usize;
    let e = (i / SUB as usize) as u32 + SUB_BITS + 1;
    let sub = (i % SUB as usize) as u64;
    (1u64 << e) | (sub << (e - SUB_BITS))
}

impl AtomicHist {
    /// An empty histogram.
    pub fn new() -> Self {
        AtomicHist {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0),
            max: AtomicU64::new(0),
        }
    }

    /// Records `ns`.
    pub fn record(&self, ns: u64) {
        self.buckets[bucket_of(ns)].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(ns, Ordering::Relaxed);
        self.max.fetch_max(ns, Ordering::Relaxed);
    }

    /// Number of values recorded.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Count, mean, p50, p99 and max, in microseconds (percentiles at the floor of their
    /// bucket: within 12.5 % below the true value).
    pub fn summary(&self) -> LatencyStats {
        Self::merged([self])
    }

    /// The summary of several histograms taken together.
    pub fn merged<'a>(hists: impl IntoIterator<Item = &'a AtomicHist>) -> LatencyStats {
        let mut counts = vec![0u64; BUCKETS];
        let (mut count, mut sum, mut max) = (0u64, 0u64, 0u64);
        for h in hists {
            for (c, b) in counts.iter_mut().zip(h.buckets.iter()) {
                *c += b.load(Ordering::Relaxed);
            }
            count += h.count.load(Ordering::Relaxed);
            sum = sum.saturating_add(h.sum.load(Ordering::Relaxed));
            max = max.max(h.max.load(Ordering::Relaxed));
        }
        if count == 0 {
            return LatencyStats::default();
        }
        let total: u64 = counts.iter().sum();
        let quantile = |q: f64| {
            let rank = ((total as f64 * q).ceil() as u64).max(1);
            let mut seen = 0;
            for (b, &c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    return bucket_floor(b);
                }
            }
            0
        };
        let us = |ns: u64| ns as f64 / 1000.0;
        LatencyStats {
            count,
            mean_us: sum as f64 / count as f64 / 1000.0,
            p50_us: us(quantile(0.5)),
            p99_us: us(quantile(0.99)),
            max_us: us(max),
        }
    }
}

/// A latency summary in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyStats {
    /// Values recorded.
    pub count: u64,
    /// Mean.
    pub mean_us: f64,
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Largest.
    pub max_us: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_tight() {
        let mut last = 0;
        for v in (0..100_000u64).chain([u64::MAX / 3, u64::MAX]) {
            let b = bucket_of(v);
            assert!(b < BUCKETS, "{v}");
            assert!(b >= last, "{v}");
            last = b;
            let floor = bucket_floor(b);
            assert!(floor <= v, "{v}: floor {floor}");
            assert!(v - floor <= v / 8, "{v}: floor {floor}");
        }
    }

    #[test]
    fn summary_reports_percentiles() {
        let h = AtomicHist::new();
        assert_eq!(h.summary(), LatencyStats::default());
        for i in 1..=100u64 {
            h.record(i * 1000);
        }
        let s = h.summary();
        assert_eq!(s.count, 100);
        assert!((s.mean_us - 50.5).abs() < 1e-9);
        assert!(s.p50_us > 43.0 && s.p50_us <= 50.0, "{s:?}");
        assert!(s.p99_us > 86.0 && s.p99_us <= 99.0, "{s:?}");
        assert_eq!(s.max_us, 100.0);
        let other = AtomicHist::new();
        other.record(1_000_000);
        let m = AtomicHist::merged([&h, &other]);
        assert_eq!(m.count, 101);
        assert_eq!(m.max_us, 1000.0);
        assert_eq!(m.p50_us, s.p50_us);
    }
}
