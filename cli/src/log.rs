//! Logging: one pair of flags and one setup for every binary.
//!
//! Logs go to stderr (stdout carries the binaries' announcements and reports). `text` lines are
//! coloured only when stderr is a terminal; `json` writes one JSON object per line (timestamp,
//! level, target, fields, span), for log shippers.

use std::io::IsTerminal as _;

use serde::{Deserialize, Serialize};
use tracing_subscriber::EnvFilter;

/// The format of log lines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `--log FILTER` and `--log-format text|json`, to `#[command(flatten)]` into a binary's
/// flags.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct LogArgs {
    /// Log filter in RUST_LOG syntax, e.g. `info` or `peerlink_relay=debug,warn`.
    #[arg(long = "log", value_name = "FILTER")]
    pub log: Option<String>,
    /// Log line format: `text`, or `json` (one object per line) [default: text].
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
}

impl LogArgs {
    /// The filter to use: the flag, else the environment variable `env` when set, else `default`.
    pub fn filter(&self, env: &str, default: &str) -> String {
        self.log
            .clone()
            .or_else(|| std::env::var(env).ok().filter(|v| !v.trim().is_empty()))
            .unwrap_or_else(|| default.to_owned())
    }
}

/// A log filter that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("bad log filter {filter:?}: {reason}")]
pub struct BadFilter {
    /// The filter given.
    pub filter: String,
    /// Why it was refused.
    pub reason: String,
}

fn parse_filter(filter: &str) -> Result<EnvFilter, BadFilter> {
    EnvFilter::try_new(filter).map_err(|e| BadFilter {
        filter: filter.to_owned(),
        reason: e.to_string(),
    })
}

/// Check a filter before anything is started.
pub fn check_filter(filter: &str) -> Result<(), BadFilter> {
    parse_filter(filter).map(drop)
}

/// Install the process's logger: `filter` (RUST_LOG syntax) in `format`, on stderr.
pub fn init(filter: &str, format: LogFormat) -> Result<(), BadFilter> {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(parse_filter(filter)?)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_are_checked_and_the_flag_wins_over_the_environment() {
        assert!(check_filter("info").is_ok());
        assert!(check_filter("peerlink_relay=debug,warn").is_ok());
        let e = check_filter("[[[").expect_err("bad filter");
        assert!(e.to_string().contains("bad log filter \"[[[\""), "{e}");
        let flags = LogArgs {
            log: Some("debug".into()),
            log_format: None,
        };
        assert_eq!(flags.filter("PATH", "info"), "debug");
        assert_eq!(
            LogArgs::default().filter("PEERLINK_CLI_TEST_UNSET_VARIABLE", "info"),
            "info"
        );
    }
}
