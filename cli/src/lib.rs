//! peerlink-cli: what every peerlink binary shares on its command line.
//!
//! It is: the one configuration layering of the services ([`config::load`]: the TOML file,
//! then the environment, then the flags; errors name the file or flag and the key), the log
//! flags (`--log FILTER`, `--log-format text|json`, [`log::LogArgs`]) and the one logging
//! setup behind them ([`log::init`]: stderr, ANSI colour only on a terminal, JSON lines through
//! tracing-subscriber), duration values ([`parse_duration`], and [`config::duration`] for
//! settings: humantime's syntax, or bare seconds), and the services' Prometheus exposition
//! ([`metrics::Exposition`], through prometheus-client), and children that never outlive their
//! launcher ([`process::die_with_parent`]), and the server side of TLS with its certificate
//! reload ([`tls::TlsStore`], for the relay's TURN over TLS and signaling's HTTPS), and the
//! one terminal progress bar of the tools ([`progress::Bar`]).
//!
//! It is not: the services' settings themselves; each binary's flags, TOML keys, defaults and
//! checks stay its own.

#![deny(missing_docs)]

pub mod config;
pub mod log;
pub mod metrics;
pub mod process;
pub mod progress;
pub mod redis_url;
pub mod tls;

use std::time::Duration;

/// A duration value that does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("bad duration {value:?}: {reason} (use e.g. 500ms, 30s, 15m, 1h 30m, 7d, or seconds)")]
pub struct BadDuration {
    /// The text given.
    pub value: String,
    /// Why it was refused.
    pub reason: String,
}

/// Parse a duration: humantime's syntax (`500ms`, `30s`, `15m`, `1h 30m`, `7d`), or a bare
/// non-negative number of seconds (`30`, `0.5`).
pub fn parse_duration(s: &str) -> Result<Duration, BadDuration> {
    let t = s.trim();
    let bad = |reason: String| BadDuration {
        value: s.to_owned(),
        reason,
    };
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        let secs: f64 = t.parse().map_err(|_| bad("not a number".into()))?;
        return Duration::try_from_secs_f64(secs).map_err(|e| bad(e.to_string()));
    }
    humantime::parse_duration(t).map_err(|e| bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_bare_seconds() {
        let ok =
            |s: &str, ms: u64| assert_eq!(parse_duration(s), Ok(Duration::from_millis(ms)), "{s}");
        ok("500ms", 500);
        ok("30s", 30_000);
        ok(" 15m ", 900_000);
        ok("1h 30m", 5_400_000);
        ok("7d", 7 * 86_400_000);
        ok("30", 30_000);
        ok("0.25", 250);
        ok("0s", 0);
        for bad in [
            "",
            "soon",
            "-1s",
            "10 parsecs",
            "1.2.3",
            "99999999999999999999999d",
        ] {
            let e = parse_duration(bad).expect_err(bad);
            assert_eq!(e.value, bad);
            assert!(e.to_string().contains("bad duration"), "{e}");
        }
    }
}
