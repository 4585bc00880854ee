//! The binary's configuration: a serde struct read from an optional TOML file, every field
//! also settable by a command-line flag (flags win). Validated before any socket is bound.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::server::HttpLimits;
use crate::store::StoreConfig;

/// Environment variable holding the cluster token (preferred over the flag or the file).
pub const TOKEN_ENV: &str = "PEERLINK_CLUSTER_TOKEN";
/// Shortest accepted cluster token.
pub const MIN_TOKEN_LEN: usize = 8;

/// Directory configuration (TOML). Every field is optional in the file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Listen address. Default `127.0.0.1:8500`.
    pub listen: Option<SocketAddr>,
    /// Shared cluster token. No default: required (better from `PEERLINK_CLUSTER_TOKEN`).
    pub cluster_token: Option<String>,
    /// Presence TTL in seconds. Default 30.
    pub presence_ttl: Option<f64>,
    /// Node and relay liveness TTL in seconds. Default 10.
    pub node_ttl: Option<f64>,
    /// Relay-choice RNG seed. Default: from OS entropy.
    pub seed: Option<u64>,
    /// Whole-request timeout in seconds. Default 10.
    pub request_timeout: Option<f64>,
    /// Request body limit in bytes. Default 2 MiB.
    pub body_limit: Option<usize>,
}

/// Why a configuration is refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// Path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML for [`FileConfig`].
    #[error("bad config {path}: {source}")]
    Parse {
        /// Path.
        path: String,
        /// Cause.
        source: Box<toml::de::Error>,
    },
    /// A value is out of range or missing.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The validated configuration the service runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Listen address.
    pub listen: SocketAddr,
    /// Cluster token.
    pub cluster_token: String,
    /// Store TTLs and seed.
    pub store: StoreConfig,
    /// HTTP limits.
    pub limits: HttpLimits,
}

impl FileConfig {
    /// Read and parse a TOML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            source: Box::new(source),
        })
    }

    /// Fields set in `over` replace those in `self`.
    pub fn merge(self, over: FileConfig) -> FileConfig {
        FileConfig {
            listen: over.listen.or(self.listen),
            cluster_token: over.cluster_token.or(self.cluster_token),
            presence_ttl: over.presence_ttl.or(self.presence_ttl),
            node_ttl: over.node_ttl.or(self.node_ttl),
            seed: over.seed.or(self.seed),
            request_timeout: over.request_timeout.or(self.request_timeout),
            body_limit: over.body_limit.or(self.body_limit),
        }
    }

    /// Apply defaults and validate.
    pub fn finish(self) -> Result<Config, ConfigError> {
        let secs = |name: &str, v: Option<f64>, default: f64| -> Result<Duration, ConfigError> {
            let v = v.unwrap_or(default);
            if !v.is_finite() || !(0.01..=86_400.0).contains(&v) {
                return Err(ConfigError::Invalid(format!(
                    "{name} must be between 0.01 and 86400 seconds, got {v}"
                )));
            }
            Ok(Duration::from_secs_f64(v))
        };
        let token = self.cluster_token.ok_or_else(|| {
            ConfigError::Invalid(format!(
                "no cluster token: set {TOKEN_ENV} or --cluster-token"
            ))
        })?;
        if token.len() < MIN_TOKEN_LEN {
            return Err(ConfigError::Invalid(format!(
                "cluster token must be at least {MIN_TOKEN_LEN} bytes"
            )));
        }
        if token.bytes().any(|b| !b.is_ascii_graphic()) {
            return Err(ConfigError::Invalid(
                "cluster token must be printable ASCII without spaces".to_owned(),
            ));
        }
        let body_limit = self.body_limit.unwrap_or(crate::server::DEFAULT_BODY_LIMIT);
        if !(1024..=64 * 1024 * 1024).contains(&body_limit) {
            return Err(ConfigError::Invalid(format!(
                "body_limit must be between 1 KiB and 64 MiB, got {body_limit}"
            )));
        }
        Ok(Config {
            listen: self
                .listen
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8500))),
            cluster_token: token,
            store: StoreConfig {
                presence_ttl: secs("presence_ttl", self.presence_ttl, 30.0)?,
                node_ttl: secs("node_ttl", self.node_ttl, 10.0)?,
                seed: self.seed,
            },
            limits: HttpLimits {
                request_timeout: secs("request_timeout", self.request_timeout, 10.0)?,
                body_limit,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_parses_and_flags_override() {
        let file: FileConfig = toml::from_str(
            "listen = \"127.0.0.1:9000\"\ncluster_token = \"file-token\"\npresence_ttl = 5\nnode_ttl = 2.5\nseed = 7\n",
        )
        .unwrap();
        let flags = FileConfig {
            node_ttl: Some(1.0),
            ..Default::default()
        };
        let cfg = file.merge(flags).finish().unwrap();
        assert_eq!(cfg.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(cfg.cluster_token, "file-token");
        assert_eq!(cfg.store.presence_ttl, Duration::from_secs(5));
        assert_eq!(cfg.store.node_ttl, Duration::from_secs(1));
        assert_eq!(cfg.store.seed, Some(7));
    }

    #[test]
    fn defaults_apply() {
        let cfg = FileConfig {
            cluster_token: Some("0123456789".into()),
            ..Default::default()
        }
        .finish()
        .unwrap();
        assert_eq!(cfg.listen, "127.0.0.1:8500".parse().unwrap());
        assert_eq!(cfg.store.presence_ttl, Duration::from_secs(30));
        assert_eq!(cfg.store.node_ttl, Duration::from_secs(10));
        assert_eq!(cfg.store.heartbeat_interval().as_millis(), 3_333);
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(toml::from_str::<FileConfig>("bogus = 1").is_err());
        assert!(toml::from_str::<FileConfig>("listen = \"nope\"").is_err());
        let base = FileConfig {
            cluster_token: Some("0123456789".into()),
            ..Default::default()
        };
        assert!(FileConfig::default().finish().is_err(), "token required");
        for bad in [
            FileConfig {
                presence_ttl: Some(0.0),
                ..base.clone()
            },
            FileConfig {
                node_ttl: Some(f64::NAN),
                ..base.clone()
            },
            FileConfig {
                body_limit: Some(10),
                ..base.clone()
            },
            FileConfig {
                cluster_token: Some("short".into()),
                ..base.clone()
            },
            FileConfig {
                cluster_token: Some("has space inside".into()),
                ..base.clone()
            },
        ] {
            assert!(matches!(bad.finish(), Err(ConfigError::Invalid(_))));
        }
    }
}
