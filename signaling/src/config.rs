//! Runtime configuration of a signaling node (built by the binary from CLI flags, a TOML file
//! and environment secrets; tests build it directly).

use std::net::SocketAddr;
use std::time::Duration;

use crate::auth::Argon2Cost;
use crate::candidates::{CandidatePolicy, MAX_DENY_RANGES};

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
    /// After shutdown starts, keep answering 503 to new upgrades this long (default 2 s).
    pub shutdown_grace: Duration,
    /// Reconnect hint sent in `goodbye` at shutdown (default 1000 ms).
    pub reconnect_hint: Duration,
    /// Message ids are remembered (resends deduplicated) this long (default 30 days).
    pub dedup_retention: Duration,
    /// Directory base URL; none = standalone single node.
    pub directory: Option<String>,
    /// Token for the directory and node-to-node API (env `PEERLINK_CLUSTER_TOKEN`).
    pub cluster_token: Option<String>,
    /// Region of this node, preferred when the directory chooses relays (default "default").
    pub region: String,
    /// URL clients use to reach this node (the binary's default internal URL).
    pub public_url: Option<String>,
    /// URL other nodes use for the internal API (the binary defaults it to
    /// `http://<bound listen address>`).
    pub internal_url: Option<String>,
    /// STUN responder primary address (default 127.0.0.1:3479); none disables it.
    pub stun: Option<SocketAddr>,
    /// Second STUN address (other IP and/or port) enabling RFC 5780 tests.
    pub stun_alt: Option<SocketAddr>,
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
            shutdown_grace: Duration::from_secs(2),
            reconnect_hint: Duration::from_millis(1000),
            dedup_retention: Duration::from_secs(30 * 24 * 3600),
            directory: None,
            cluster_token: None,
            region: "default".into(),
            public_url: None,
            internal_url: None,
            stun: Some(SocketAddr::from(([127, 0, 0, 1], 3479))),
            stun_alt: None,
        }
    }
}

/// A configuration that cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Explanation.
    #[error("invalid configuration: {0}")]
    Invalid(String),
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
        for r in &self.relays {
            if r.is_empty() || r.contains(char::is_whitespace) {
                return bad("relay addresses must be host:port");
            }
        }
        Ok(())
    }
}
