//! Logging: one pair of flags and one setup for every binary.
//!
//! Logs go to stderr (stdout carries the binaries' announcements and reports). `text` lines are
//! coloured only when stderr is a terminal; `json` writes one JSON object per line (timestamp,
//! level, target, fields, span), for log shippers.

use std::io::IsTerminal as _;

use serde::Deserialize;
use tracing_subscriber::EnvFilter;

/// The format of log lines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `--log FILTER` and `--log-format text|json`, to `#[command(flatten)]` into a binary's
/// flags (and its TOML file as `log` and `log_format`).
#[derive(clap::Args, Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct LogArgs {
    /// Log filter in RUST_LOG syntax, e.g. `info` or `peerlink_relay=debug,warn`.
    #[arg(long = "log", value_name = "FILTER")]
    pub log: Option<String>,
    /// Log line format: `text`, or `json` (one object per line) [default: text].
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
}

impl LogArgs {
    /// Fill what is unset from `other` (a config file's values under flags).
    pub fn or(self, other: LogArgs) -> LogArgs {
        LogArgs {
            log: self.log.or(other.log),
            log_format: self.log_format.or(other.log_format),
        }
    }

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

/// Check a filter before anything is started.
pub fn check_filter(filter: &str) -> Result<(), BadFilter> {
    EnvFilter::try_new(filter).map(drop).map_err(|e| BadFilter {
        filter: filter.to_owned(),
        reason: e.to_string(),
    })
}

/// Install the process's logger: `filter` (RUST_LOG syntax) in `format`, on stderr.
pub fn init(filter: &str, format: LogFormat) -> Result<(), BadFilter> {
    check_filter(filter)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
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
    fn filters_are_checked_and_flags_win_over_the_file_and_the_environment() {
        assert!(check_filter("info").is_ok());
        assert!(check_filter("peerlink_relay=debug,warn").is_ok());
        let e = check_filter("[[[").expect_err("bad filter");
        assert!(e.to_string().contains("bad log filter \"[[[\""), "{e}");
        let flags = LogArgs {
            log: Some("debug".into()),
            log_format: None,
        };
        let file = LogArgs {
            log: Some("warn".into()),
            log_format: Some(LogFormat::Json),
        };
        let both = flags.or(file);
        assert_eq!(both.log.as_deref(), Some("debug"));
        assert_eq!(both.log_format, Some(LogFormat::Json));
        assert_eq!(
            LogArgs::default().filter("PEERLINK_CLI_TEST_UNSET_VARIABLE", "info"),
            "info"
        );
    }
}
