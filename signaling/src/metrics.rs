//! Node metrics: plain atomic counters, exposed as Prometheus text through
//! `peerlink_cli::metrics` (no per-user labels).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use peerlink_cli::metrics::Exposition;

macro_rules! metrics {
    ($( $(#[doc = $help:literal])* $name:ident : $kind:ident ),* $(,)?) => {
        /// All counters and gauges of a node.
        #[derive(Default, Debug)]
        pub struct Metrics {
            $( $(#[doc = $help])* pub $name: metrics!(@ty $kind), )*
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
    /// Add one to a counter.
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}
