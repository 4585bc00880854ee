//! Node metrics: plain atomic counters, exposed as Prometheus text through
//! `peerlink_cli::metrics` (no per-user labels).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use peerlink_cli::metrics::Exposition;

macro_rules! metrics {
    ($( $(#[doc = $help:literal])* $name:ident : $kind:ident ),* $(,)?) => {
        /// All counters and gauges of a node.
        #[derive(Default, Debug)]
        pub struct Metrics {
            $( $(#[doc = $help])* pub $name: metrics!(@ty $kind), )*
            /// Durations of account and message store operations (shared with the store
            /// handle, which records them).
            pub store_latency: std::sync::Arc<StoreLatency>,
        }
        impl Metrics {
            /// Prometheus text exposition.
            pub fn render(&self) -> String {
                let mut e = Exposition::new();
                $(
                    e.$kind(
                        stringify!($name),
                        concat!($($help),*).trim_ascii(),
                        self.$name.load(Ordering::Relaxed),
                    );
                )*
                self.store_latency.expose(&mut e);
                e.render("peerlink_signaling")
            }
        }
    };
    (@ty counter) => { AtomicU64 };
    (@ty gauge) => { AtomicI64 };
}

metrics! {
    /// Accounts created.
    registrations_total: counter,
    /// Successful logins.
    logins_total: counter,
    /// Failed logins (unknown user or wrong password).
    login_failures_total: counter,
    /// Login attempts refused by the throttle.
    login_throttled_total: counter,
    /// Shared login throttle commands that failed (Redis unreachable or slow).
    throttle_store_errors_total: counter,
    /// Refresh tokens rotated.
    refreshes_total: counter,
    /// Revoked refresh tokens presented again (their device's chain revoked).
    refresh_reuses_total: counter,
    /// WebSocket sessions currently open.
    sessions_open: gauge,
    /// WebSocket sessions accepted.
    sessions_total: counter,
    /// Upgrades refused (auth, limits, shutdown).
    upgrades_refused_total: counter,
    /// Client frames received.
    frames_in_total: counter,
    /// Server frames queued to sessions.
    frames_out_total: counter,
    /// Client frames answered with an error frame.
    frame_errors_total: counter,
    /// Sessions closed for an oversize, binary or non-UTF-8 frame.
    protocol_closes_total: counter,
    /// Sessions closed because their outbound queue was full.
    slow_consumer_closes_total: counter,
    /// Sessions closed for flooding.
    flood_closes_total: counter,
    /// Sessions closed for idleness.
    idle_closes_total: counter,
    /// Calls started.
    calls_total: counter,
    /// Calls currently known to this node.
    calls_open: gauge,
    /// Disconnected call parties that came back within the call grace.
    call_grace_resumed_total: counter,
    /// Disconnected call parties whose call grace ran out (their calls ended).
    call_grace_expired_total: counter,
    /// Messages stored durably.
    messages_stored_total: counter,
    /// Message sends answered with a storage error.
    message_store_errors_total: counter,
    /// Duplicate message sends (same id, same content).
    message_duplicates_total: counter,
    /// Requests forwarded to other nodes.
    forwards_total: counter,
    /// Forwarding failures.
    forward_errors_total: counter,
    /// TURN credentials issued.
    turn_credentials_total: counter,
    /// STUN Binding requests answered.
    stun_responses_total: counter,
    /// STUN datagrams dropped (garbage, not a Binding request).
    stun_dropped_total: counter,
    /// STUN requests answered with an error (e.g. 420, 400).
    stun_errors_total: counter,
    /// TLS handshakes completed (zero without TLS).
    tls_handshakes_total: counter,
    /// TLS handshakes that failed or ran out of time (bad certificate at the client, not TLS,
    /// silent client).
    tls_handshake_failures_total: counter,
    /// SIGHUP certificate reloads that failed (the previous certificate kept serving).
    tls_reload_failures_total: counter,
}

impl Metrics {
    /// The console figures sent with directory heartbeats, `uptime_ms` after start: sessions
    /// open, calls started (invites), errors (error frames, failed forwards, failed message
    /// stores, refused upgrades) and failed logins.
    pub fn snapshot(&self, uptime_ms: u64) -> peerlink_api::fleet_stats::NodeStatsSnapshot {
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        peerlink_api::fleet_stats::NodeStatsSnapshot {
            uptime_ms,
            sessions_open: u64::try_from(self.sessions_open.load(Ordering::Relaxed)).unwrap_or(0),
            invites: c(&self.calls_total),
            errors: c(&self.frame_errors_total)
                .saturating_add(c(&self.forward_errors_total))
                .saturating_add(c(&self.message_store_errors_total))
                .saturating_add(c(&self.upgrades_refused_total)),
            login_failures: c(&self.login_failures_total),
        }
    }

    /// Add one to a counter.
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// Upper bounds (seconds) of `peerlink_signaling_store_operation_duration_seconds`: from a
/// SQLite page-cache hit (~100 µs) to a PostgreSQL statement near its timeout (5 s).
pub const STORE_LATENCY_BUCKETS: [f64; 15] = [
    1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Histogram of store operation durations: one relaxed atomic per bucket (no lock).
#[derive(Debug, Default)]
pub struct StoreLatency {
    /// Samples per bucket alone; the last slot counts those above every bound.
    counts: [AtomicU64; STORE_LATENCY_BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

impl StoreLatency {
    /// Count one operation that took `d`.
    pub fn record(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let slot = STORE_LATENCY_BUCKETS.partition_point(|&b| b < secs);
        if let Some(c) = self.counts.get(slot) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Add to `e` as `store_operation_duration_seconds`.
    fn expose(&self, e: &mut Exposition) {
        let counts: Vec<u64> = self
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let count = counts.iter().sum();
        let buckets = STORE_LATENCY_BUCKETS
            .iter()
            .zip(&counts)
            .map(|(&b, &n)| (b, n))
            .collect();
        e.histogram(
            "store_operation_duration_seconds",
            "Duration of account and message store operations (SQLite or PostgreSQL), seconds, including the wait for a blocking thread.",
            self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
            count,
            buckets,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_latency_is_a_cumulative_histogram_and_snapshots_count() {
        let m = Metrics::default();
        m.store_latency.record(Duration::from_micros(50));
        m.store_latency.record(Duration::from_micros(100));
        m.store_latency.record(Duration::from_millis(3));
        m.store_latency.record(Duration::from_secs(9));
        let text = m.render();
        let sample = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        };
        let p = "peerlink_signaling_store_operation_duration_seconds";
        assert_eq!(sample(&format!("{p}_bucket{{le=\"0.0001\"}}")), 2.0);
        assert_eq!(sample(&format!("{p}_bucket{{le=\"0.005\"}}")), 3.0);
        assert_eq!(sample(&format!("{p}_bucket{{le=\"5\"}}")), 3.0);
        assert_eq!(sample(&format!("{p}_bucket{{le=\"+Inf\"}}")), 4.0);
        assert_eq!(sample(&format!("{p}_count")), 4.0);
        m.sessions_open.store(3, Ordering::Relaxed);
        Metrics::inc(&m.calls_total);
        Metrics::inc(&m.frame_errors_total);
        Metrics::inc(&m.forward_errors_total);
        let s = m.snapshot(1_234);
        assert_eq!(
            (s.uptime_ms, s.sessions_open, s.invites, s.errors),
            (1_234, 3, 1, 2)
        );
    }
}
