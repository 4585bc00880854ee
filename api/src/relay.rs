//! The relay's HTTP documents: `GET /stats` on its metrics port (in-relay latency percentiles
//! and counters), as served by the relay and read by `peerlink-relay stats`, the load tester
//! and operators' tools.

use serde::{Deserialize, Serialize};

/// Percentiles of one latency distribution, µs.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
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
    /// Summarise an HdrHistogram (all zero when it is empty).
    #[cfg(feature = "histogram")]
    pub fn of(h: &hdrhistogram::Histogram<u64>) -> Self {
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
}

/// The `/stats` document.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Stats {
    /// Seconds since start.
    pub uptime_s: f64,
    /// Whether the relay is draining.
    pub draining: bool,
    /// Workers running.
    pub workers: usize,
    /// I/O backend in use ("uring" or "epoll").
    pub io: String,
    /// In-relay latency (µs) over the last interval.
    pub latency_interval_us: Percentiles,
    /// In-relay latency (µs) since start.
    pub latency_total_us: Percentiles,
    /// Live allocations.
    pub allocations_active: u64,
    /// Counters (name -> value), same names as the Prometheus metrics without prefix.
    pub counters: std::collections::BTreeMap<String, u64>,
}
