//! Latency summaries (HdrHistogram, microseconds) and small helpers for reports.

use hdrhistogram::Histogram;

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

pub use peerlink_api::relay::Percentiles;

/// One table row of `p`: `label  count  p50 p90 p99 p99.9 max` in milliseconds.
pub fn row(p: &Percentiles, label: &str) -> String {
    let ms = |v: u64| v as f64 / 1000.0;
    format!(
        "{label:<34} {:>9} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3}\n",
        p.count,
        ms(p.p50),
        ms(p.p90),
        ms(p.p99),
        ms(p.p999),
        ms(p.max)
    )
}

/// Header matching [`row`].
pub fn header(label: &str) -> String {
    format!(
        "{label:<34} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8}\n",
        "count", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms"
    )
}

/// Median of `v` (0 for empty).
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}
