//! The binary's configuration: [`Settings`], the TOML file's format, loaded through
//! `peerlink_cli::config::load` (the file, then the environment, then the flags; flags win),
//! and checked by [`Settings::validate`] into a [`Config`] before any socket is bound.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use crate::redis_store::{RedisLocation, RedisOptions};
use crate::server::HttpLimits;
use crate::store::StoreConfig;

/// Environment variable holding the cluster token (preferred over the flag or the file).
pub const TOKEN_ENV: &str = "PEERLINK_CLUSTER_TOKEN";
/// Environment variable holding the store URL (it may carry a Redis password).
pub const STORE_ENV: &str = "PEERLINK_DIRECTORY_STORE";
/// Shortest accepted cluster token.
pub const MIN_TOKEN_LEN: usize = 8;
/// Environment variable holding the operator token of the console.
pub const OPERATOR_TOKEN_ENV: &str = "PEERLINK_OPERATOR_TOKEN";
/// Shortest accepted operator token.
pub const MIN_OPERATOR_TOKEN_LEN: usize = 16;

/// Directory settings (TOML keys are the field names; every key is optional). Durations are
/// humantime text (`"30s"`, `"2m"`) or a number of seconds (`30`, `2.5`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Listen address. Default `127.0.0.1:8500`.
    pub listen: SocketAddr,
    /// Shared cluster token. No default: required (better from `PEERLINK_CLUSTER_TOKEN`).
    pub cluster_token: Option<String>,
    /// Presence TTL. Default 30 s.
    #[serde(with = "peerlink_cli::config::duration")]
    pub presence_ttl: Duration,
    /// Node and relay liveness TTL. Default 10 s.
    #[serde(with = "peerlink_cli::config::duration")]
    pub node_ttl: Duration,
    /// Relay-choice RNG seed. Default: from OS entropy.
    #[serde(deserialize_with = "seed::deserialize")]
    pub seed: Option<u64>,
    /// Whole-request timeout. Default 10 s.
    #[serde(with = "peerlink_cli::config::duration")]
    pub request_timeout: Duration,
    /// Request body limit in bytes. Default 2 MiB.
    pub body_limit: usize,
    /// Where state lives: `memory` (this process only; the default) or
    /// `redis://[user:password@]HOST:PORT[/DB][?prefix=P]` (shared by every replica on it;
    /// keys start with `P`, default `peerlink:directory`). Also from `PEERLINK_DIRECTORY_STORE`.
    pub store: String,
    /// Redis: bound of one connection attempt and of one command's answer. Default 2 s.
    #[serde(with = "peerlink_cli::config::duration")]
    pub store_timeout: Duration,
    /// Operator token of the fleet console at `/console` (at least 16 printable ASCII
    /// characters). Default none: the console is off. Better from `PEERLINK_OPERATOR_TOKEN` or
    /// `operator_token_file`.
    pub operator_token: Option<String>,
    /// File holding the operator token (its first line). Default none.
    pub operator_token_file: Option<std::path::PathBuf>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            listen: SocketAddr::from(([127, 0, 0, 1], 8500)),
            cluster_token: None,
            presence_ttl: Duration::from_secs(30),
            node_ttl: Duration::from_secs(10),
            seed: None,
            request_timeout: Duration::from_secs(10),
            body_limit: crate::server::DEFAULT_BODY_LIMIT,
            store: "memory".to_owned(),
            store_timeout: crate::redis_store::DEFAULT_RESPONSE_TIMEOUT,
            operator_token: None,
            operator_token_file: None,
        }
    }
}

/// The seed is a `u64`; TOML integers stop at `i64::MAX`, so a larger seed given as a flag
/// travels as its decimal text ([`seed::serialize`]) and is read back from it.
pub mod seed {
    use serde::{Deserialize, Deserializer, Serializer};

    /// An integer, or (above `i64::MAX`) its decimal text.
    pub fn serialize<S: Serializer>(seed: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match seed {
            Some(v) if i64::try_from(*v).is_ok() => s.serialize_u64(*v),
            Some(v) => s.collect_str(v),
            None => s.serialize_none(),
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Seed {
        Int(u64),
        Text(String),
    }

    /// A non-negative integer, or the decimal text [`serialize`] writes for a large one.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        match Seed::deserialize(d)? {
            Seed::Int(v) => Ok(Some(v)),
            Seed::Text(t) => t
                .parse()
                .map(Some)
                .map_err(|_| serde::de::Error::custom(format!("bad seed {t:?}: not a u64"))),
        }
    }
}

/// Why a configuration is refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file, the environment or a flag does not give [`Settings`] (unreadable file,
    /// unknown key, bad value): the message names the file or the flags, and the key.
    #[error(transparent)]
    Load(#[from] peerlink_cli::config::ConfigError),
    /// A value is out of range or missing.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Where the directory keeps its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// In this process ([`crate::memory::MemoryStore`]).
    Memory,
    /// In Redis ([`crate::redis_store::RedisStore`]).
    Redis(RedisLocation),
}

impl StoreLocation {
    /// Parse the `store` setting.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        if text == "memory" {
            return Ok(StoreLocation::Memory);
        }
        if !text.starts_with("redis://") {
            return Err(ConfigError::Invalid(format!(
                "store {:?}: expected `memory` or redis://HOST:PORT[/DB][?prefix=P]",
                peerlink_cli::redis_url::redact(text)
            )));
        }
        crate::redis_store::parse_location(text)
            .map(StoreLocation::Redis)
            .map_err(ConfigError::Invalid)
    }

    /// For logs: `memory`, or the Redis URL without its password.
    pub fn redacted(&self) -> String {
        match self {
            StoreLocation::Memory => "memory".to_owned(),
            StoreLocation::Redis(l) => l.redacted(),
        }
    }
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
    /// Where state lives.
    pub location: StoreLocation,
    /// Redis connection bounds.
    pub redis: RedisOptions,
    /// Operator token of the console (`None`: the console is off).
    pub operator_token: Option<String>,
}

impl Settings {
    /// The operator token from the setting or the file (not both), checked.
    fn operator_token(&self) -> Result<Option<String>, ConfigError> {
        let token = match (&self.operator_token, &self.operator_token_file) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Invalid(format!(
                    "operator token given twice: use {OPERATOR_TOKEN_ENV} (or operator_token) or \
                     operator_token_file, not both"
                )));
            }
            (Some(t), None) => t.clone(),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError::Invalid(format!("operator_token_file {}: {e}", path.display()))
                })?;
                text.lines().next().unwrap_or("").trim().to_owned()
            }
            (None, None) => return Ok(None),
        };
        if token.len() < MIN_OPERATOR_TOKEN_LEN {
            return Err(ConfigError::Invalid(format!(
                "operator token must be at least {MIN_OPERATOR_TOKEN_LEN} bytes"
            )));
        }
        if token
            .bytes()
            .any(|b| !b.is_ascii_graphic() || b == b';' || b == b',')
        {
            return Err(ConfigError::Invalid(
                "operator token must be printable ASCII without spaces, `;` or `,`".to_owned(),
            ));
        }
        Ok(Some(token))
    }
}

impl Settings {
    /// Check the values and build the configuration the service runs with.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let secs = |name: &str, v: Duration| -> Result<Duration, ConfigError> {
            if !(Duration::from_millis(10)..=Duration::from_secs(86_400)).contains(&v) {
                return Err(ConfigError::Invalid(format!(
                    "{name} must be between 0.01 and 86400 seconds, got {}",
                    v.as_secs_f64()
                )));
            }
            Ok(v)
        };
        let operator_token = self.operator_token()?;
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
        let body_limit = self.body_limit;
        if !(1024..=64 * 1024 * 1024).contains(&body_limit) {
            return Err(ConfigError::Invalid(format!(
                "body_limit must be between 1 KiB and 64 MiB, got {body_limit}"
            )));
        }
        Ok(Config {
            listen: self.listen,
            cluster_token: token,
            store: StoreConfig {
                presence_ttl: secs("presence_ttl", self.presence_ttl)?,
                node_ttl: secs("node_ttl", self.node_ttl)?,
                seed: self.seed,
            },
            limits: HttpLimits {
                request_timeout: secs("request_timeout", self.request_timeout)?,
                body_limit,
            },
            location: StoreLocation::parse(&self.store)?,
            redis: RedisOptions {
                connect_timeout: secs("store_timeout", self.store_timeout)?,
                response_timeout: self.store_timeout,
            },
            operator_token,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// The flags as the binary serializes them (`src/main.rs`).
    #[derive(Debug, Clone, Default, serde::Serialize)]
    struct Overrides {
        listen: Option<SocketAddr>,
        cluster_token: Option<String>,
        #[serde(with = "peerlink_cli::config::duration::option")]
        presence_ttl: Option<Duration>,
        #[serde(with = "peerlink_cli::config::duration::option")]
        node_ttl: Option<Duration>,
        #[serde(serialize_with = "seed::serialize")]
        seed: Option<u64>,
        #[serde(with = "peerlink_cli::config::duration::option")]
        request_timeout: Option<Duration>,
        body_limit: Option<usize>,
        store: Option<String>,
        #[serde(with = "peerlink_cli::config::duration::option")]
        store_timeout: Option<Duration>,
        operator_token: Option<String>,
        operator_token_file: Option<std::path::PathBuf>,
    }

    fn load(text: &str, flags: &Overrides) -> Result<Settings, peerlink_cli::config::ConfigError> {
        peerlink_cli::config::load_str(Path::new("directory.toml"), text, flags)
    }

    fn with_token() -> Settings {
        Settings {
            cluster_token: Some("0123456789".into()),
            ..Settings::default()
        }
    }

    #[test]
    fn file_parses_and_flags_override() {
        let file = "listen = \"127.0.0.1:9000\"\ncluster_token = \"file-token\"\npresence_ttl = 5\n\
                    node_ttl = 2.5\nseed = 7\nrequest_timeout = \"1m\"\n";
        let cfg = load(file, &Overrides::default())
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(
            cfg.store.node_ttl,
            Duration::from_millis(2500),
            "seconds as a float"
        );
        assert_eq!(
            cfg.limits.request_timeout,
            Duration::from_secs(60),
            "humantime text"
        );
        let flags = Overrides {
            node_ttl: Some(Duration::from_secs(1)),
            seed: Some(9),
            ..Default::default()
        };
        let cfg = load(file, &flags).unwrap().validate().unwrap();
        assert_eq!(cfg.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(cfg.cluster_token, "file-token");
        assert_eq!(cfg.store.presence_ttl, Duration::from_secs(5));
        assert_eq!(cfg.store.node_ttl, Duration::from_secs(1));
        assert_eq!(cfg.store.seed, Some(9));
    }

    #[test]
    fn every_flag_sets_its_key() {
        let flags = Overrides {
            listen: Some("127.0.0.1:1".parse().unwrap()),
            cluster_token: Some("flag-token".into()),
            presence_ttl: Some(Duration::from_millis(1500)),
            node_ttl: Some(Duration::from_secs(2)),
            seed: Some(3),
            request_timeout: Some(Duration::from_secs(4)),
            body_limit: Some(4096),
            store: Some("redis://127.0.0.1:1/3?prefix=x".into()),
            store_timeout: Some(Duration::from_millis(500)),
            operator_token: Some("an-operator-token-1".into()),
            operator_token_file: None,
        };
        let s = load("", &flags).unwrap();
        assert_eq!(
            s,
            Settings {
                listen: "127.0.0.1:1".parse().unwrap(),
                cluster_token: Some("flag-token".into()),
                presence_ttl: Duration::from_millis(1500),
                node_ttl: Duration::from_secs(2),
                seed: Some(3),
                request_timeout: Duration::from_secs(4),
                body_limit: 4096,
                store: "redis://127.0.0.1:1/3?prefix=x".into(),
                store_timeout: Duration::from_millis(500),
                operator_token: Some("an-operator-token-1".into()),
                operator_token_file: None,
            }
        );
        let cfg = s.validate().unwrap();
        let StoreLocation::Redis(l) = &cfg.location else {
            panic!("{:?}", cfg.location)
        };
        assert_eq!(
            (l.url.as_str(), l.prefix.as_str()),
            ("redis://127.0.0.1:1/3", "x")
        );
        assert_eq!(cfg.redis.connect_timeout, Duration::from_millis(500));
        assert_eq!(cfg.operator_token.as_deref(), Some("an-operator-token-1"));
    }

    #[test]
    fn the_operator_token_comes_from_one_place_and_is_checked() {
        assert_eq!(with_token().validate().unwrap().operator_token, None);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("operator-token");
        std::fs::write(&file, "0123456789abcdef0123\n").unwrap();
        let from_file = Settings {
            operator_token_file: Some(file.clone()),
            ..with_token()
        };
        assert_eq!(
            from_file
                .clone()
                .validate()
                .unwrap()
                .operator_token
                .as_deref(),
            Some("0123456789abcdef0123")
        );
        let both = Settings {
            operator_token: Some("0123456789abcdef0123".into()),
            ..from_file
        };
        assert!(matches!(both.validate(), Err(ConfigError::Invalid(m)) if m.contains("twice")));
        for bad in ["short", "has a space in it ok", "semi;colon;in;it;xx"] {
            let s = Settings {
                operator_token: Some(bad.into()),
                ..with_token()
            };
            assert!(
                matches!(s.validate(), Err(ConfigError::Invalid(_))),
                "{bad}"
            );
        }
        let missing = Settings {
            operator_token_file: Some(dir.path().join("absent")),
            ..with_token()
        };
        let e = missing.validate().unwrap_err().to_string();
        assert!(
            e.contains("operator_token_file") && e.contains("absent"),
            "{e}"
        );
        let toml = load(
            "operator_token = \"0123456789abcdef0123\"\n",
            &Overrides::default(),
        );
        assert_eq!(
            toml.unwrap().operator_token.as_deref(),
            Some("0123456789abcdef0123")
        );
    }

    #[test]
    fn a_seed_above_i64_max_survives_the_layering() {
        let flags = Overrides {
            seed: Some(u64::MAX),
            ..Default::default()
        };
        assert_eq!(load("seed = 1\n", &flags).unwrap().seed, Some(u64::MAX));
        assert!(load("seed = -1\n", &Overrides::default()).is_err());
        assert!(load("seed = \"x\"\n", &Overrides::default()).is_err());
    }

    #[test]
    fn defaults_apply() {
        let cfg = load("cluster_token = \"0123456789\"\n", &Overrides::default())
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(cfg.listen, "127.0.0.1:8500".parse().unwrap());
        assert_eq!(cfg.store.presence_ttl, Duration::from_secs(30));
        assert_eq!(cfg.store.node_ttl, Duration::from_secs(10));
        assert_eq!(cfg.store.seed, None);
        assert_eq!(cfg.limits, HttpLimits::default());
        assert_eq!(cfg.store.heartbeat_interval().as_millis(), 3_333);
        assert_eq!(cfg.location, StoreLocation::Memory);
        assert_eq!(cfg.redis, RedisOptions::default());
    }

    #[test]
    fn bad_values_are_refused() {
        for (text, want) in [
            ("bogus = 1", "config directory.toml: unknown key `bogus`"),
            ("listen = \"nope\"", "config directory.toml: key `listen`: "),
            (
                "node_ttl = \"ten\"",
                "config directory.toml: key `node_ttl`: bad duration \"ten\"",
            ),
            (
                "presence_ttl = -1",
                "config directory.toml: key `presence_ttl`: bad duration",
            ),
        ] {
            let e = load(text, &Overrides::default()).unwrap_err().to_string();
            assert!(e.starts_with(want), "{text}: {e}");
        }
        assert!(Settings::default().validate().is_err(), "token required");
        for bad in [
            Settings {
                presence_ttl: Duration::ZERO,
                ..with_token()
            },
            Settings {
                node_ttl: Duration::from_millis(9),
                ..with_token()
            },
            Settings {
                request_timeout: Duration::from_secs(86_401),
                ..with_token()
            },
            Settings {
                body_limit: 10,
                ..with_token()
            },
            Settings {
                cluster_token: Some("short".into()),
                ..with_token()
            },
            Settings {
                cluster_token: Some("has space inside".into()),
                ..with_token()
            },
            Settings {
                store: "postgres://127.0.0.1/x".into(),
                ..with_token()
            },
            Settings {
                store: "redis://".into(),
                ..with_token()
            },
            Settings {
                store_timeout: Duration::ZERO,
                ..with_token()
            },
        ] {
            assert!(matches!(bad.validate(), Err(ConfigError::Invalid(_))));
        }
    }
}
