//! Progress events (bytes, rate, ETA) and the terminal progress bar of the CLI.

use std::time::{Duration, Instant};

use serde::Serialize;

/// Minimum interval between two progress events (the final one is always emitted).
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// One progress report.
#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    /// File size in bytes.
    pub total: u64,
    /// Bytes the receiver holds (resumed + transferred this session).
    pub done: u64,
    /// Bytes transferred on this connection.
    pub session_bytes: u64,
    /// Goodput of this session so far, in bit/s.
    pub rate_bps: f64,
    /// Estimated time left, once a rate is known.
    pub eta: Option<Duration>,
    /// Whether this is the last event of the transfer.
    pub finished: bool,
}

/// Turns byte counts into throttled [`Progress`] events (time is an input).
#[derive(Debug)]
pub(crate) struct ProgressTracker {
    total: u64,
    resumed: u64,
    session: u64,
    start: Instant,
    last_emit: Option<Instant>,
}

impl ProgressTracker {
    pub(crate) fn new(total: u64, resumed: u64, now: Instant) -> Self {
        Self {
            total,
            resumed,
            session: 0,
            start: now,
            last_emit: None,
        }
    }

    /// Adds `n` transferred bytes; returns an event if one is due.
    pub(crate) fn add(&mut self, n: u64, now: Instant) -> Option<Progress> {
        self.session += n;
        let due = self
            .last_emit
            .is_none_or(|t| now.duration_since(t) >= PROGRESS_INTERVAL);
        if due {
            self.last_emit = Some(now);
            Some(self.snapshot(now, false))
        } else {
            None
        }
    }

    pub(crate) fn snapshot(&self, now: Instant, finished: bool) -> Progress {
        let secs = now.duration_since(self.start).as_secs_f64();
        let rate_bps = if secs > 0.0 {
            self.session as f64 * 8.0 / secs
        } else {
            0.0
        };
        let done = (self.resumed + self.session).min(self.total);
        let eta = (rate_bps > 0.0)
            .then(|| Duration::from_secs_f64((self.total - done) as f64 * 8.0 / rate_bps));
        Progress {
            total: self.total,
            done,
            session_bytes: self.session,
            rate_bps,
            eta,
            finished,
        }
    }
}

/// A terminal progress bar fed by [`Progress`] events (the tools' one bar,
/// [`peerlink_cli::progress::Bar`]); hidden when stderr is not a terminal or when JSON output
/// was asked for.
#[derive(Debug, Clone)]
pub struct ProgressBar {
    bar: peerlink_cli::progress::Bar,
}

impl ProgressBar {
    /// A bar labelled `label`; hidden if `json` or if stderr is not a TTY.
    pub fn new(label: &str, json: bool) -> Self {
        let visible = !json && peerlink_cli::progress::wanted(false);
        Self {
            bar: peerlink_cli::progress::Bar::new(
                label,
                peerlink_cli::progress::Unit::Bytes,
                visible,
            ),
        }
    }

    /// Whether the bar draws nothing.
    pub fn is_hidden(&self) -> bool {
        self.bar.is_hidden()
    }

    /// Applies one event.
    pub fn update(&self, p: &Progress) {
        self.bar.set_length(p.total);
        self.bar.set_position(p.done);
        if p.finished {
            self.bar.finish();
        }
    }

    /// A callback to pass as the `progress` argument of send/receive.
    pub fn callback(&self) -> impl FnMut(&Progress) + Send + 'static {
        let me = self.clone();
        move |p| me.update(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracker_throttles_and_computes_rate_and_eta() {
        let t0 = Instant::now();
        let mut t = ProgressTracker::new(1000, 200, t0);
        assert!(t.add(100, t0).is_some(), "first event is emitted at once");
        assert!(t.add(100, t0 + Duration::from_millis(10)).is_none());
        let p = t.add(100, t0 + Duration::from_secs(1)).unwrap();
        assert_eq!(p.done, 500);
        assert_eq!(p.session_bytes, 300);
        assert!((p.rate_bps - 2400.0).abs() < 1e-6);
        assert_eq!(p.eta, Some(Duration::from_secs_f64(500.0 * 8.0 / 2400.0)));
        let f = t.snapshot(t0 + Duration::from_secs(2), true);
        assert!(f.finished);
    }

    #[test]
    fn bar_is_hidden_for_json() {
        let b = ProgressBar::new("x", true);
        assert!(b.is_hidden());
        b.update(&Progress {
            total: 10,
            done: 10,
            session_bytes: 10,
            rate_bps: 1.0,
            eta: None,
            finished: true,
        });
    }
}
