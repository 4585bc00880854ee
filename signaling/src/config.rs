//! Runtime configuration of a signaling node: [`Config`], what the node runs with (tests build
//! it directly), and [`Settings`], the binary's TOML file format, which the binary loads
//! through `peerlink_cli::config::load` (the file, then the environment, then the flags) and
//! turns into a [`Config`] with [`Settings::to_config`].

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use peerlink_cli::log::LogFormat;
use serde::Deserialize;

use crate::auth::Argon2Cost;
use crate::candidates::{CandidatePolicy, MAX_DENY_RANGES};
use crate::store::{PgOptions, StoreLocation};

/// The SQLite file used when neither `store` nor `db` is set.
pub const DEFAULT_DB: &str = "peerlink-signaling.db";

/// Longest accepted `call_grace`.
pub const MAX_CALL_GRACE: Duration = Duration::from_secs(600);

/// Everything a node needs to run. `Default` gives the documented defaults with an empty
/// token secret, which [`Config::validate`] refuses.
#[derive(Clone, Debug)]
pub struct Config {
    /// This node's id in the directory (default "signaling-1").
    pub node_id: String,
    /// HS256 secret for access/refresh tokens (>= 32 bytes; env `PEERLINK_TOKEN_SECRET`).
    pub token_secret: Vec<u8>,
    /// Token issuer claim (default "peerlink").
    pub token_issuer: String,
    /// Access token lifetime (default 15 min).
    pub token_ttl: Duration,
    /// Refresh token lifetime (default 7 days).
    pub refresh_ttl: Duration,
    /// TURN REST shared secret (env `PEERLINK_TURN_SECRET`); none disables turn-credentials.
    pub turn_secret: Option<Vec<u8>>,
    /// TURN credential lifetime (default 1 h).
    pub turn_ttl: Duration,
    /// Static relay addresses `host:port` used when no directory is configured.
    pub relays: Vec<String>,
    /// Argon2id cost (default OWASP m=19456 KiB, t=2, p=1).
    pub argon2: Argon2Cost,
    /// Password hashes computed at once (default 2).
    pub hash_concurrency: usize,
    /// Failed logins per account per window before throttling (default 5).
    pub login_failures_per_account: u32,
    /// Failed logins per IP per window before throttling (default 20).
    pub login_failures_per_ip: u32,
    /// Login throttle window (default 5 min).
    pub login_window: Duration,
    /// Where the fleet's shared login throttle lives: `redis://HOST:PORT[/DB][?prefix=P]`
    /// (env `PEERLINK_THROTTLE_STORE`). Default none: each node throttles on its own.
    pub throttle_store: Option<String>,
    /// Unanswered invites end after this (default 30 s).
    pub ring_timeout: Duration,
    /// An accepted call survives its party's dropped session this long, waiting for the same
    /// device to reconnect (default 5 s; 0 ends the call at once; at most 10 min).
    pub call_grace: Duration,
    /// Largest WebSocket message/frame, bytes (default 64 KiB); larger -> close 1009.
    pub max_ws_message: usize,
    /// WebSocket read buffer per connection, bytes (default 1 KiB; grows for big frames).
    pub ws_read_buffer: usize,
    /// Outbound frames queued per session before it counts as a slow consumer (default 64, min 4).
    pub outbound_queue: usize,
    /// A single frame write taking longer than this closes the session (default 10 s).
    pub write_timeout: Duration,
    /// WebSocket ping interval (default 20 s).
    pub ping_interval: Duration,
    /// Silence (no frame, no pong) after which a session is closed (default 60 s).
    pub idle_timeout: Duration,
    /// Time allowed for the first `auth` frame when the URL had no token (default 10 s).
    pub auth_timeout: Duration,
    /// Client frames per second per session (default 20).
    pub msg_rate: u32,
    /// Burst of client frames per session (default 40).
    pub msg_burst: u32,
    /// Rate-limited frames in a row after which the session is closed (default 20).
    pub flood_close_after: u32,
    /// Concurrent WebSocket sessions per client IP (default 32).
    pub max_conns_per_ip: u32,
    /// Most candidates per party in one offer/answer and trickled in total (default 32).
    pub max_candidates: usize,
    /// Which candidate addresses offers, answers, trickles and restarts may carry (default:
    /// every address a peer can have, loopback refused; the binary accepts loopback when it
    /// listens on loopback).
    pub candidates: CandidatePolicy,
    /// Largest text message body, bytes (default 16 KiB).
    pub max_body_bytes: usize,
    /// Largest HTTP request body, bytes (default 64 KiB).
    pub max_http_body: usize,
    /// HTTP request timeout (default 15 s).
    pub http_timeout: Duration,
    /// Complete request headers must arrive within this (default 10 s).
    pub header_timeout: Duration,
    /// With TLS, the handshake must finish within this; the connection is closed otherwise
    /// (default 10 s).
    pub tls_handshake_timeout: Duration,
    /// After shutdown starts, keep answering 503 to new upgrades this long (default 2 s).
    pub shutdown_grace: Duration,
    /// Reconnect hint sent in `goodbye` at shutdown (default 1000 ms).
    pub reconnect_hint: Duration,
    /// Message ids are remembered (resends deduplicated) this long (default 30 days).
    pub dedup_retention: Duration,
    /// Directory base URLs (comma-separated replicas); none = standalone single node.
    pub directory: Option<String>,
    /// Token for the directory and node-to-node API (env `PEERLINK_CLUSTER_TOKEN`).
    pub cluster_token: Option<String>,
    /// Region of this node, preferred when the directory chooses relays (default "default").
    pub region: String,
    /// URL clients use to reach this node (the binary's default internal URL).
    pub public_url: Option<String>,
    /// URL other nodes use for the internal API (the binary defaults it to the public URL,
    /// else `http://<bound listen address>`, `https://` with TLS).
    pub internal_url: Option<String>,
    /// PEM files of CA certificates trusted, besides the system's roots, for `https://`
    /// requests to other nodes (default none).
    pub cluster_ca: Vec<PathBuf>,
    /// STUN responder primary address (default 127.0.0.1:3479); none disables it.
    pub stun: Option<SocketAddr>,
    /// Second STUN address (other IP and/or port) enabling RFC 5780 tests.
    pub stun_alt: Option<SocketAddr>,
    /// IPv6 STUN responder beside the primary (IPv4) one: a dual-stack client learns the
    /// mapping of its IPv6 socket there (default none; the binary defaults it to `[::1]` on
    /// the primary's port when that is loopback).
    pub stun6: Option<SocketAddr>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            node_id: "signaling-1".into(),
            token_secret: Vec::new(),
            token_issuer: "peerlink".into(),
            token_ttl: Duration::from_secs(15 * 60),
            refresh_ttl: Duration::from_secs(7 * 24 * 3600),
            turn_secret: None,
            turn_ttl: Duration::from_secs(3600),
            relays: Vec::new(),
            argon2: Argon2Cost::default(),
            hash_concurrency: 2,
            login_failures_per_account: 5,
            login_failures_per_ip: 20,
            login_window: Duration::from_secs(300),
            throttle_store: None,
            ring_timeout: Duration::from_secs(30),
            call_grace: Duration::from_secs(5),
            max_ws_message: 64 * 1024,
            ws_read_buffer: 1024,
            outbound_queue: 64,
            write_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(60),
            auth_timeout: Duration::from_secs(10),
            msg_rate: 20,
            msg_burst: 40,
            flood_close_after: 20,
            max_conns_per_ip: 32,
            max_candidates: 32,
            candidates: CandidatePolicy::default(),
            max_body_bytes: 16 * 1024,
            max_http_body: 64 * 1024,
            http_timeout: Duration::from_secs(15),
            header_timeout: Duration::from_secs(10),
            tls_handshake_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(2),
            reconnect_hint: Duration::from_millis(1000),
            dedup_retention: Duration::from_secs(30 * 24 * 3600),
            directory: None,
            cluster_token: None,
            region: "default".into(),
            public_url: None,
            internal_url: None,
            cluster_ca: Vec::new(),
            stun: Some(SocketAddr::from(([127, 0, 0, 1], 3479))),
            stun_alt: None,
            stun6: None,
        }
    }
}

/// A configuration that cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file, the environment or a flag does not give [`Settings`] (unreadable file,
    /// unknown key, bad value): the message names the file or the flags, and the key.
    #[error(transparent)]
    Load(#[from] peerlink_cli::config::ConfigError),
    /// Explanation.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The binary's settings: the TOML file's format, every key a long flag with `_` for `-`, every
/// key optional. The defaults are [`Config::default`]'s, and the binary's own below. Durations
/// are humantime text (`"500ms"`, `"30s"`, `"15m"`, `"7d"`) or a number of seconds.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// HTTP + WebSocket listen address. Default `127.0.0.1:8443`.
    pub listen: SocketAddr,
    /// STUN responder address. Default `127.0.0.1:3479`.
    pub stun: SocketAddr,
    /// Second STUN address (RFC 5780). Default none.
    pub stun_alt: Option<SocketAddr>,
    /// No STUN responder. Default false.
    pub no_stun: bool,
    /// IPv6 STUN responder address, beside `stun` (one responder per family). Default
    /// `[::1]` on `stun`'s port when `stun` is an IPv4 loopback address (not binding it is
    /// then only a warning: a host without IPv6 runs IPv4 only), else none.
    pub stun6: Option<SocketAddr>,
    /// SQLite database path (the same as `store = "sqlite:PATH"`; giving both is an error).
    /// Default `peerlink-signaling.db` when `store` is not set either.
    pub db: Option<PathBuf>,
    /// Where the store lives: `sqlite:PATH`, a bare path (SQLite), or
    /// `postgres://user:password@host:port/db` (env `PEERLINK_STORE`). Default: `db`.
    pub store: Option<String>,
    /// PostgreSQL: most pooled connections. Default 8.
    pub store_pool_size: u32,
    /// PostgreSQL: connect timeout of one connection. Default 5 s.
    #[serde(with = "peerlink_cli::config::duration")]
    pub store_connect_timeout: Duration,
    /// PostgreSQL: longest wait for a pooled connection before a request fails. Default 5 s.
    #[serde(with = "peerlink_cli::config::duration")]
    pub store_checkout_timeout: Duration,
    /// PostgreSQL: `statement_timeout` of every statement. Default 5 s.
    #[serde(with = "peerlink_cli::config::duration")]
    pub store_statement_timeout: Duration,
    /// [`Config::directory`]: a URL, a comma-separated list or an array of URLs.
    #[serde(deserialize_with = "peerlink_cli::config::url_list::deserialize")]
    pub directory: Option<String>,
    /// [`Config::cluster_token`].
    pub cluster_token: Option<String>,
    /// [`Config::node_id`].
    pub node_id: String,
    /// [`Config::region`].
    pub region: String,
    /// [`Config::public_url`].
    pub public_url: Option<String>,
    /// [`Config::internal_url`].
    pub internal_url: Option<String>,
    /// [`Config::cluster_ca`] (flag `--cluster-ca`, repeatable).
    pub cluster_ca: Vec<PathBuf>,
    /// PEM certificate chain (leaf first): with `tls_key`, the listener serves HTTPS and WSS
    /// instead of HTTP and WS. Re-read on SIGHUP. Default none (env `PEERLINK_TLS_CERT`).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert` (PKCS#8, PKCS#1 or SEC1). Re-read on SIGHUP. Default
    /// none (env `PEERLINK_TLS_KEY`).
    pub tls_key: Option<PathBuf>,
    /// [`Config::tls_handshake_timeout`].
    #[serde(with = "peerlink_cli::config::duration")]
    pub tls_handshake_timeout: Duration,
    /// [`Config::token_secret`]; required.
    pub token_secret: Option<String>,
    /// [`Config::token_issuer`].
    pub token_issuer: String,
    /// [`Config::token_ttl`].
    #[serde(with = "peerlink_cli::config::duration")]
    pub token_ttl: Duration,
    /// [`Config::refresh_ttl`].
    #[serde(with = "peerlink_cli::config::duration")]
    pub refresh_ttl: Duration,
    /// [`Config::turn_secret`].
    pub turn_secret: Option<String>,
    /// [`Config::turn_ttl`].
    #[serde(with = "peerlink_cli::config::duration")]
    pub turn_ttl: Duration,
    /// [`Config::relays`] (flag `--relay`, repeatable).
    pub relay: Vec<String>,
    /// [`Argon2Cost::m_kib`].
    pub argon2_m_kib: u32,
    /// [`Argon2Cost::t`].
    pub argon2_t: u32,
    /// [`Argon2Cost::p`].
    pub argon2_p: u32,
    /// [`Config::hash_concurrency`].
    pub hash_concurrency: usize,
    /// [`Config::login_failures_per_account`].
    pub login_failures_per_account: u32,
    /// [`Config::login_failures_per_ip`].
    pub login_failures_per_ip: u32,
    /// [`Config::login_window`].
    #[serde(with = "peerlink_cli::config::duration")]
    pub login_window: Duration,
    /// [`Config::throttle_store`].
    pub throttle_store: Option<String>,
    /// [`Config::ring_timeout`].
    #[serde(with = "peerlink_cli::config::duration")]
    pub ring_timeout: Duration,
    /// [`Config::call_grace`].
    #[serde(with = "peerlink_cli::config::duration")]
    pub call_grace: Duration,
    /// [`Config::max_ws_message`].
    pub max_ws_message: usize,
    /// [`Config::ws_read_buffer`].
    pub ws_read_buffer: usize,
    /// [`Config::outbound_queue`].
    pub outbound_queue: usize,
    /// [`Config::write_timeout`].
    #[serde(with = "peerlink_cli::config::duration")]
    pub write_timeout: Duration,
    /// [`Config::ping_interval`].
    #[serde(with = "peerlink_cli::config::duration")]
    pub ping_interval: Duration,
    /// [`Config::idle_timeout`].
    #[serde(with = "peerlink_cli::config::duration")]
    pub idle_timeout: Duration,
    /// [`Config::auth_timeout`].
    #[serde(with = "peerlink_cli::config::duration")]
    pub auth_timeout: Duration,
    /// [`Config::msg_rate`].
    pub msg_rate: u32,
    /// [`Config::msg_burst`].
    pub msg_burst: u32,
    /// [`Config::flood_close_after`].
    pub flood_close_after: u32,
    /// [`Config::max_conns_per_ip`].
    pub max_conns_per_ip: u32,
    /// [`Config::max_candidates`].
    pub max_candidates: usize,
    /// Candidate ranges refused (`CIDR` or one address; flag `--deny-candidate`, repeatable).
    pub deny_candidate: Vec<String>,
    /// Accept loopback candidates. Default: whether `listen` is a loopback address.
    pub allow_loopback_candidates: Option<bool>,
    /// [`Config::max_body_bytes`].
    pub max_body_bytes: usize,
    /// [`Config::dedup_retention`].
    #[serde(with = "peerlink_cli::config::duration")]
    pub dedup_retention: Duration,
    /// [`Config::header_timeout`].
    #[serde(with = "peerlink_cli::config::duration")]
    pub header_timeout: Duration,
    /// [`Config::shutdown_grace`].
    #[serde(with = "peerlink_cli::config::duration")]
    pub shutdown_grace: Duration,
    /// Log filter (RUST_LOG syntax). Default `info`.
    pub log: String,
    /// Log line format. Default `text`.
    pub log_format: LogFormat,
}

impl Default for Settings {
    fn default() -> Self {
        let c = Config::default();
        Settings {
            listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            stun: c
                .stun
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 3479))),
            stun_alt: c.stun_alt,
            no_stun: false,
            stun6: None,
            db: None,
            store: None,
            store_pool_size: PgOptions::default().pool_size,
            store_connect_timeout: PgOptions::default().connect_timeout,
            store_checkout_timeout: PgOptions::default().checkout_timeout,
            store_statement_timeout: PgOptions::default().statement_timeout,
            directory: c.directory,
            cluster_token: c.cluster_token,
            node_id: c.node_id,
            region: c.region,
            public_url: c.public_url,
            internal_url: c.internal_url,
            cluster_ca: c.cluster_ca,
            tls_cert: None,
            tls_key: None,
            tls_handshake_timeout: c.tls_handshake_timeout,
            token_secret: None,
            token_issuer: c.token_issuer,
            token_ttl: c.token_ttl,
            refresh_ttl: c.refresh_ttl,
            turn_secret: None,
            turn_ttl: c.turn_ttl,
            relay: c.relays,
            argon2_m_kib: c.argon2.m_kib,
            argon2_t: c.argon2.t,
            argon2_p: c.argon2.p,
            hash_concurrency: c.hash_concurrency,
            login_failures_per_account: c.login_failures_per_account,
            login_failures_per_ip: c.login_failures_per_ip,
            login_window: c.login_window,
            throttle_store: c.throttle_store,
            ring_timeout: c.ring_timeout,
            call_grace: c.call_grace,
            max_ws_message: c.max_ws_message,
            ws_read_buffer: c.ws_read_buffer,
            outbound_queue: c.outbound_queue,
            write_timeout: c.write_timeout,
            ping_interval: c.ping_interval,
            idle_timeout: c.idle_timeout,
            auth_timeout: c.auth_timeout,
            msg_rate: c.msg_rate,
            msg_burst: c.msg_burst,
            flood_close_after: c.flood_close_after,
            max_conns_per_ip: c.max_conns_per_ip,
            max_candidates: c.max_candidates,
            deny_candidate: Vec::new(),
            allow_loopback_candidates: None,
            max_body_bytes: c.max_body_bytes,
            dedup_retention: c.dedup_retention,
            header_timeout: c.header_timeout,
            shutdown_grace: c.shutdown_grace,
            log: "info".into(),
            log_format: LogFormat::Text,
        }
    }
}

/// A `deny_candidate` value: a CIDR range, or one address.
fn parse_net(s: &str) -> Result<IpNet, ConfigError> {
    let s = s.trim();
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map(|n| n.trunc())
        .map_err(|_| {
            ConfigError::Invalid(format!(
                "bad --deny-candidate {s:?} (use a range like 10.0.0.0/8)"
            ))
        })
}

/// The listener's certificate and key files, when it serves TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// `tls_cert`.
    pub cert: PathBuf,
    /// `tls_key`.
    pub key: PathBuf,
}

impl Settings {
    /// The certificate and key when both are set, none when neither is; one alone is an error
    /// naming the missing flag.
    pub fn tls_files(&self) -> Result<Option<TlsFiles>, ConfigError> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Ok(Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            })),
            (None, None) => Ok(None),
            (Some(_), None) => Err(ConfigError::Invalid(
                "--tls-cert needs --tls-key (PEERLINK_TLS_KEY, TOML tls_key)".into(),
            )),
            (None, Some(_)) => Err(ConfigError::Invalid(
                "--tls-key needs --tls-cert (PEERLINK_TLS_CERT, TOML tls_cert)".into(),
            )),
        }
    }

    /// Where the shared login throttle lives, if `throttle_store` is set; a malformed one is
    /// an error.
    pub fn throttle_location(
        &self,
    ) -> Result<Option<crate::throttle::ThrottleLocation>, ConfigError> {
        self.throttle_store
            .as_deref()
            .map(crate::throttle::ThrottleLocation::parse)
            .transpose()
            .map_err(|e| ConfigError::Invalid(format!("bad --throttle-store: {e}")))
    }

    /// Where the store lives: `store`, else `db` as an SQLite path, else [`DEFAULT_DB`].
    /// Both set, or a malformed `store`, is an error.
    pub fn store_location(&self) -> Result<StoreLocation, ConfigError> {
        match (&self.store, &self.db) {
            (Some(_), Some(_)) => Err(ConfigError::Invalid(
                "both --store and --db are set: use one (--db PATH is --store sqlite:PATH)".into(),
            )),
            (Some(s), None) => StoreLocation::parse(s)
                .map_err(|e| ConfigError::Invalid(format!("bad --store: {e}"))),
            (None, Some(p)) => Ok(StoreLocation::Sqlite(p.clone())),
            (None, None) => Ok(StoreLocation::Sqlite(PathBuf::from(DEFAULT_DB))),
        }
    }

    /// The PostgreSQL pool and timeouts, checked.
    pub fn pg_options(&self) -> Result<PgOptions, ConfigError> {
        if self.store_pool_size == 0 || self.store_pool_size > 1000 {
            return Err(ConfigError::Invalid(
                "store pool size must be 1-1000".into(),
            ));
        }
        if self.store_connect_timeout.is_zero()
            || self.store_checkout_timeout.is_zero()
            || self.store_statement_timeout.is_zero()
        {
            return Err(ConfigError::Invalid(
                "store connect, checkout and statement timeouts must be positive".into(),
            ));
        }
        Ok(PgOptions {
            pool_size: self.store_pool_size,
            connect_timeout: self.store_connect_timeout,
            checkout_timeout: self.store_checkout_timeout,
            statement_timeout: self.store_statement_timeout,
        })
    }

    /// The node's configuration, validated ([`Config::validate`]). Settings the binary keeps
    /// (`listen`, `db`, `log`, `log_format`) are not part of it.
    pub fn to_config(&self) -> Result<Config, ConfigError> {
        let mut c = Config {
            node_id: self.node_id.clone(),
            token_secret: self.token_secret.clone().unwrap_or_default().into_bytes(),
            token_issuer: self.token_issuer.clone(),
            token_ttl: self.token_ttl,
            refresh_ttl: self.refresh_ttl,
            turn_secret: self.turn_secret.clone().map(String::into_bytes),
            turn_ttl: self.turn_ttl,
            relays: self.relay.clone(),
            argon2: Argon2Cost {
                m_kib: self.argon2_m_kib,
                t: self.argon2_t,
                p: self.argon2_p,
            },
            hash_concurrency: self.hash_concurrency,
            login_failures_per_account: self.login_failures_per_account,
            login_failures_per_ip: self.login_failures_per_ip,
            login_window: self.login_window,
            throttle_store: self.throttle_store.clone(),
            ring_timeout: self.ring_timeout,
            call_grace: self.call_grace,
            max_ws_message: self.max_ws_message,
            ws_read_buffer: self.ws_read_buffer,
            outbound_queue: self.outbound_queue,
            write_timeout: self.write_timeout,
            ping_interval: self.ping_interval,
            idle_timeout: self.idle_timeout,
            auth_timeout: self.auth_timeout,
            msg_rate: self.msg_rate,
            msg_burst: self.msg_burst,
            flood_close_after: self.flood_close_after,
            max_conns_per_ip: self.max_conns_per_ip,
            max_candidates: self.max_candidates,
            max_body_bytes: self.max_body_bytes,
            dedup_retention: self.dedup_retention,
            header_timeout: self.header_timeout,
            tls_handshake_timeout: self.tls_handshake_timeout,
            shutdown_grace: self.shutdown_grace,
            directory: self.directory.clone(),
            cluster_token: self.cluster_token.clone(),
            region: self.region.clone(),
            public_url: self.public_url.clone(),
            internal_url: self.internal_url.clone(),
            cluster_ca: self.cluster_ca.clone(),
            stun: (!self.no_stun).then_some(self.stun),
            stun_alt: self.stun_alt,
            stun6: if self.no_stun {
                None
            } else {
                self.stun6.or_else(|| self.default_stun6())
            },
            ..Config::default()
        };
        for cidr in &self.deny_candidate {
            c.candidates.deny.push(parse_net(cidr)?);
        }
        c.candidates.allow_loopback = self
            .allow_loopback_candidates
            .unwrap_or_else(|| self.listen.ip().is_loopback());
        c.validate()?;
        Ok(c)
    }
}

impl Settings {
    /// The IPv6 STUN address when none is given: `[::1]` on `stun`'s port for a loopback
    /// `stun` (the one-machine demo), else none.
    pub fn default_stun6(&self) -> Option<SocketAddr> {
        (self.stun.is_ipv4() && self.stun.ip().is_loopback())
            .then(|| SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, self.stun.port())))
    }
}

impl Config {
    /// Check the configuration before anything is bound.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |s: &str| Err(ConfigError::Invalid(s.to_owned()));
        if self.token_secret.len() < 32 {
            return bad("token secret must be at least 32 bytes (PEERLINK_TOKEN_SECRET)");
        }
        if self.turn_secret.as_ref().is_some_and(|s| s.is_empty()) {
            return bad("turn secret is empty");
        }
        if self.node_id.is_empty() || self.node_id.len() > 64 {
            return bad("node id must be 1-64 characters");
        }
        if self.token_ttl.is_zero()
            || self.ring_timeout.is_zero()
            || self.idle_timeout.is_zero()
            || self.auth_timeout.is_zero()
        {
            return bad("token ttl, ring, idle and auth timeouts must be positive");
        }
        if self.call_grace > MAX_CALL_GRACE {
            return bad("call grace must be at most 10 minutes (0 disables it)");
        }
        if self.max_ws_message < 1024 || self.max_body_bytes > self.max_ws_message {
            return bad("max ws message must be >= 1024 and >= max body bytes");
        }
        if self.outbound_queue < 4 || self.msg_rate == 0 || self.msg_burst == 0 {
            return bad("outbound queue must be >= 4; msg rate and burst must be positive");
        }
        if self.candidates.deny.len() > MAX_DENY_RANGES {
            return Err(ConfigError::Invalid(format!(
                "at most {MAX_DENY_RANGES} --deny-candidate ranges"
            )));
        }
        if self.hash_concurrency == 0 || self.max_conns_per_ip == 0 {
            return bad("hash concurrency and max connections per IP must be positive");
        }
        if self.directory.is_some() && self.cluster_token.as_deref().is_none_or(str::is_empty) {
            return bad("--directory needs a cluster token (PEERLINK_CLUSTER_TOKEN)");
        }
        if let Some(urls) = &self.directory
            && let Err(e) = peerlink_api::directory_client::parse_base_urls(urls)
        {
            return Err(ConfigError::Invalid(format!("--directory: {e}")));
        }
        if let (Some(a), Some(b)) = (self.stun, self.stun_alt) {
            if a == b {
                return bad("--stun-alt must differ from --stun");
            }
            if a.is_ipv4() != b.is_ipv4() {
                return bad("--stun and --stun-alt must be the same address family");
            }
        }
        if self.stun_alt.is_some() && self.stun.is_none() {
            return bad("--stun-alt needs --stun");
        }
        if let Some(a) = self.stun6 {
            if !a.is_ipv6() {
                return bad("--stun6 must be an IPv6 address");
            }
            if self.stun.is_some_and(|s| s.is_ipv6()) {
                return bad("--stun6 goes beside an IPv4 --stun (one responder per family)");
            }
        }
        for r in &self.relays {
            if r.is_empty() || r.contains(char::is_whitespace) {
                return bad("relay addresses must be host:port");
            }
        }
        if !(Duration::from_millis(100)..=Duration::from_secs(600))
            .contains(&self.tls_handshake_timeout)
        {
            return bad("tls handshake timeout must be 100 ms to 10 min");
        }
        self.cluster_trust()?;
        Ok(())
    }

    /// The CAs trusted for `https://` requests to other nodes: the system's roots plus
    /// [`Config::cluster_ca`]; a file that cannot be used is an error naming it.
    pub fn cluster_trust(&self) -> Result<peerlink_api::tls::Trust, ConfigError> {
        peerlink_api::tls::Trust::with_ca_files(&self.cluster_ca)
            .map_err(|e| ConfigError::Invalid(format!("--cluster-ca: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_settings_are_the_default_config() {
        let s = Settings {
            token_secret: Some("x".repeat(32)),
            ..Settings::default()
        };
        let c = s.to_config().unwrap();
        let d = Config::default();
        assert_eq!(c.stun, d.stun);
        assert_eq!(c.token_ttl, d.token_ttl);
        assert_eq!(c.call_grace, d.call_grace);
        assert_eq!(c.dedup_retention, d.dedup_retention);
        assert_eq!(c.max_candidates, d.max_candidates);
        assert!(
            c.candidates.allow_loopback,
            "the default listen address is loopback"
        );
        assert!(
            Settings::default().to_config().is_err(),
            "a token secret is required"
        );
    }

    #[test]
    fn the_example_config_parses_with_the_defaults() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
        let s: Settings = peerlink_cli::config::load_file(&path).unwrap();
        let d = Settings::default();
        // The example shows the defaults.
        assert_eq!((s.listen, s.stun), (d.listen, d.stun));
        assert_eq!(
            s.store_location().unwrap(),
            d.store_location().unwrap(),
            "the example's store is the default"
        );
        assert_eq!(
            (s.store_pool_size, s.store_checkout_timeout),
            (d.store_pool_size, d.store_checkout_timeout)
        );
        assert_eq!(
            (s.token_ttl, s.refresh_ttl, s.turn_ttl),
            (d.token_ttl, d.refresh_ttl, d.turn_ttl)
        );
        assert_eq!(
            (s.ring_timeout, s.call_grace),
            (d.ring_timeout, d.call_grace)
        );
        assert_eq!(s.dedup_retention, d.dedup_retention);
        assert_eq!(s.argon2_m_kib, d.argon2_m_kib);
        assert!(s.deny_candidate.is_empty());
    }

    #[test]
    fn store_and_db() {
        let d = Settings::default();
        assert_eq!(
            d.store_location().unwrap(),
            StoreLocation::Sqlite(DEFAULT_DB.into())
        );
        let s = Settings {
            db: Some("/x.db".into()),
            ..Settings::default()
        };
        assert_eq!(
            s.store_location().unwrap(),
            StoreLocation::Sqlite("/x.db".into())
        );
        let s = Settings {
            store: Some("postgres://u:p@127.0.0.1:5432/db".into()),
            ..Settings::default()
        };
        assert!(matches!(
            s.store_location().unwrap(),
            StoreLocation::Postgres(_)
        ));
        let s = Settings {
            store: Some("sqlite:/y.db".into()),
            db: Some("/x.db".into()),
            ..Settings::default()
        };
        let e = s.store_location().unwrap_err().to_string();
        assert!(e.contains("both --store and --db"), "{e}");
        let s = Settings {
            store_pool_size: 0,
            ..Settings::default()
        };
        assert!(s.pg_options().is_err());
    }

    #[test]
    fn bad_deny_candidate_is_named() {
        let s = Settings {
            token_secret: Some("x".repeat(32)),
            deny_candidate: vec!["10.0.0.0/33".into()],
            ..Settings::default()
        };
        let e = s.to_config().unwrap_err().to_string();
        assert!(e.contains("bad --deny-candidate \"10.0.0.0/33\""), "{e}");
    }
}
