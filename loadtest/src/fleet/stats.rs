//! Latency summaries (HdrHistogram, microseconds) and small helpers for reports.

use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest latency a histogram records, µs (larger values are clamped to it).
pub const MAX_US: u64 = 60_000_000;

/// A new microsecond histogram (1 µs .. 60 s, 3 significant digits).
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 3).expect("constant bounds are valid")
}

/// Record `us` (clamped into the histogram's range).
pub fn record(h: &mut Histogram<u64>, us: u64) {
    h.saturating_record(us.clamp(1, MAX_US));
}

/// Percentiles of a latency distribution, µs.
#[derive(Clone, Copy, Debug, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest sample.
    pub max: u64,
}

impl Percentiles {
    /// Summarise `h`.
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            mean: h.mean(),
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }

    /// Whether p50 <= p90 <= p99 <= p99.9 <= max.
    pub fn ordered(&self) -> bool {
        self.p50 <= self.p90
            && self.p90 <= self.p99
            && self.p99 <= self.p999
            && self.p999 <= self.max
    }

    /// One table row: `label  count  p50 p90 p99 p99.9 max` in milliseconds.
    pub fn row(&self, label: &str) -> String {
        let ms = |v: u64| v as f64 / 1000.0;
        format!(
            "{label:<34} {:>9} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3}\n",
            self.count,
            ms(self.p50),
            ms(self.p90),
            ms(self.p99),
            ms(self.p999),
            ms(self.max)
        )
    }

    /// Header matching [`Percentiles::row`].
    pub fn header(label: &str) -> String {
        format!(
            "{label:<34} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8}\n",
            "count", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms"
        )
    }
}

/// Median of `v` (0 for empty).
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}
