//! The relay's configuration: one serde struct, the TOML file's format (`--config PATH`). The
//! binary loads it through `peerlink_cli::config::load`: the file, then the environment, then
//! the flags, key by key; then it is validated as a whole before any socket is bound.
//!
//! Each field's doc states its default. Unknown keys are an error. Durations are humantime
//! text (`"30s"`, `"1h"`) or a number of seconds.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use peerlink_api::directory_client::DirectoryClient;
use peerlink_cli::log::LogFormat;

use crate::core::CoreConfig;
use crate::registration::{DirectorySettings, REQUEST_TIMEOUT};

/// Which I/O backend to run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum IoMode {
    /// io_uring when the kernel allows it, else epoll (one log line says so).
    #[default]
    Auto,
    /// io_uring, or a startup error when unavailable.
    Uring,
    /// epoll with recvmmsg/sendmmsg.
    Epoll,
}

/// The relay configuration (TOML keys are the field names; CLI flags use dashes).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// UDP address of the TURN/STUN listener. Default `0.0.0.0:3478`.
    pub listen: SocketAddr,
    /// Addresses relayed sockets bind on; several of one family multiply the relayed addresses
    /// (each IP has the whole port range), allocations go to them in turn. Default: the listen
    /// IP when it is not a wildcard; required otherwise.
    pub relay_ip: Vec<IpAddr>,
    /// REALM. Default `peerlink`. Must not be empty.
    pub realm: String,
    /// Static users as `NAME:PASSWORD`. Default none.
    pub users: Vec<String>,
    /// TURN REST shared secrets (all accepted, for rotation); also from the environment
    /// variable `PEERLINK_RELAY_AUTH_SECRET` (comma-separated). Default none.
    pub auth_secrets: Vec<String>,
    /// Peer ranges allowed even where the built-in policy denies (labs, tests). Default none.
    pub allow_peers: Vec<ipnet::IpNet>,
    /// Extra peer ranges denied. Default none.
    pub deny_peers: Vec<ipnet::IpNet>,
    /// Worker threads (one io_uring/epoll loop each). Default: available cores.
    pub workers: Option<usize>,
    /// I/O backend: `auto`, `uring` or `epoll`. Default `auto`.
    pub io: IoMode,
    /// Metrics/health HTTP address. Default `127.0.0.1:9641`.
    pub metrics: SocketAddr,
    /// Lowest relayed port. Default 49152.
    pub min_port: u16,
    /// Highest relayed port. Default 65535.
    pub max_port: u16,
    /// Allocations over all workers. Default 100000.
    pub max_allocations: usize,
    /// Allocations per username. Default 100.
    pub user_quota: usize,
    /// How long a drain (SIGTERM/SIGUSR1) waits for allocations to end. Default 30 s.
    #[serde(with = "peerlink_cli::config::duration")]
    pub drain_timeout: Duration,
    /// HdrHistogram interval log of in-relay latency (V2 compressed). Default none.
    pub histogram_log: Option<PathBuf>,
    /// Log filter (RUST_LOG syntax; flag `--log`). Default `info`.
    pub log_level: String,
    /// Log line format, `text` or `json` (flag `--log-format`). Default `text`.
    pub log_format: LogFormat,
    /// SOFTWARE attribute on responses. Default `peerlink-relay`; empty = omitted.
    pub software: String,
    /// Maximum allocation lifetime. Default 3600 s.
    #[serde(with = "peerlink_cli::config::duration")]
    pub max_lifetime: Duration,
    /// Per-allocation bandwidth cap in bytes/s (each direction). Default none.
    pub bandwidth_limit: Option<u64>,
    /// Accept ChannelBind numbers 0x4000-0x7FFF (RFC 5766; coturn and its `turnutils_uclient`
    /// use them) instead of RFC 8656's 0x4000-0x4FFF. Default false.
    pub legacy_channel_range: bool,
    /// Answers to unauthenticated requests (401/438/400) per source IP and second, per worker.
    /// Every client needs one 401 before it authenticates, so this bounds how fast clients
    /// behind one NAT address can start. Default 2000.
    pub unauth_rate: u32,
    /// Burst of answers to unauthenticated requests per source IP, per worker. Default 2000.
    pub unauth_burst: u32,
    /// How long a nonce stays valid (it is bound to the client's IP, so new sockets of the same
    /// host reuse it). Default 600 s.
    #[serde(with = "peerlink_cli::config::duration")]
    pub nonce_lifetime: Duration,
    /// How far ahead a TURN REST username's expiry may lie. Default 86700 s: coturn's tools and
    /// typical REST services issue 24 h credentials, plus 5 minutes of clock-skew allowance.
    #[serde(with = "peerlink_cli::config::duration")]
    pub rest_max_ttl: Duration,
    /// Provided receive buffers per io_uring worker (power of two, 4 KiB each). Default 1024.
    pub uring_buffers: u32,
    /// After a wake-up that handled datagrams, poll for this many microseconds before sleeping
    /// again (0..=1000): saves the wake-up latency while traffic flows, costs CPU. Default 0.
    pub busy_poll_us: u32,
    /// Base URL of the peerlink directory (`http://HOST:PORT`) to register and heartbeat with;
    /// several replicas as a comma-separated list or an array (the relay fails over between
    /// them). Default none (no registration).
    #[serde(deserialize_with = "peerlink_cli::config::url_list::deserialize")]
    pub directory: Option<String>,
    /// Cluster bearer token for the directory; also from `PEERLINK_CLUSTER_TOKEN`. Required
    /// with `directory`. Default none.
    pub cluster_token: Option<String>,
    /// Relay id announced to the directory. Default `HOSTNAME-LISTENPORT`.
    pub relay_id: Option<String>,
    /// Region announced to the directory. Default `local`.
    pub region: String,
    /// TURN address clients should use, announced to the directory. Default: the listen
    /// address, or the first relay-ip with the listen port when listening on a wildcard.
    pub public_addr: Option<SocketAddr>,
    /// TCP addresses of TURN-over-TCP listeners (RFC 8656 client transport). Default none.
    pub listen_tcp: Vec<SocketAddr>,
    /// TCP addresses of TURN-over-TLS listeners (443 is the usual one). Default none; needs
    /// `tls_cert` and `tls_key`.
    pub listen_tls: Vec<SocketAddr>,
    /// PEM certificate chain (leaf first) for the TLS listeners; re-read on SIGHUP. Default
    /// none.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`; re-read on SIGHUP. Default none.
    pub tls_key: Option<PathBuf>,
    /// TCP and TLS client connections over all workers. Default 10000.
    pub max_stream_connections: usize,
    /// How long a TLS handshake may take. Default 10 s.
    #[serde(with = "peerlink_cli::config::duration")]
    pub stream_handshake_timeout: Duration,
    /// How long a TCP/TLS connection without an allocation may go without a request.
    /// Default 30 s.
    #[serde(with = "peerlink_cli::config::duration")]
    pub stream_idle_timeout: Duration,
    /// How long a frame begun on a TCP/TLS connection may take to complete. Default 10 s.
    #[serde(with = "peerlink_cli::config::duration")]
    pub stream_stall_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 3478)),
            relay_ip: Vec::new(),
            realm: "peerlink".into(),
            users: Vec::new(),
            auth_secrets: Vec::new(),
            allow_peers: Vec::new(),
            deny_peers: Vec::new(),
            workers: None,
            io: IoMode::Auto,
            metrics: SocketAddr::from(([127, 0, 0, 1], 9641)),
            min_port: 49152,
            max_port: 65535,
            max_allocations: 100_000,
            user_quota: 100,
            drain_timeout: Duration::from_secs(30),
            histogram_log: None,
            log_level: "info".into(),
            log_format: LogFormat::Text,
            software: "peerlink-relay".into(),
            max_lifetime: Duration::from_secs(3600),
            bandwidth_limit: None,
            legacy_channel_range: false,
            unauth_rate: crate::core::DEFAULT_UNAUTH_RATE,
            unauth_burst: crate::core::DEFAULT_UNAUTH_BURST,
            nonce_lifetime: Duration::from_secs(600),
            rest_max_ttl: Duration::from_secs(86_700),
            uring_buffers: crate::uring::BUF_ENTRIES,
            busy_poll_us: 0,
            directory: None,
            cluster_token: None,
            relay_id: None,
            region: "local".into(),
            public_addr: None,
            listen_tcp: Vec::new(),
            listen_tls: Vec::new(),
            tls_cert: None,
            tls_key: None,
            max_stream_connections: 10_000,
            stream_handshake_timeout: Duration::from_secs(10),
            stream_idle_timeout: Duration::from_secs(30),
            stream_stall_timeout: Duration::from_secs(10),
        }
    }
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file, the environment or a flag does not give a [`Config`] (unreadable file, bad
    /// value, unknown key, ...): the message names the file or the flags, and the key.
    #[error(transparent)]
    Load(#[from] peerlink_cli::config::ConfigError),
    /// A semantic check failed.
    #[error("invalid config: {0}")]
    Invalid(String),
    /// The TLS certificate or key cannot be used.
    #[error("invalid config: {0}")]
    Tls(#[from] crate::stream::TlsError),
}

/// A validated configuration plus what was derived from it.
#[derive(Clone, Debug)]
pub struct Validated {
    /// The configuration as given.
    pub config: Config,
    /// Worker count resolved.
    pub workers: usize,
    /// Relay addresses resolved.
    pub relay_ips: Vec<IpAddr>,
    /// Directory registration, when `directory` is set.
    pub directory: Option<DirectorySettings>,
    /// The TLS certificate and key, loaded, when there are TLS listeners.
    pub tls: Option<crate::stream::TlsStore>,
}

impl Config {
    /// Read a TOML file alone (no environment, no flags).
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        Ok(peerlink_cli::config::load_file(path)?)
    }

    /// Check everything that can be checked without binding a socket.
    pub fn validate(self) -> Result<Validated, ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.realm.trim().is_empty() {
            return bad("realm must not be empty".into());
        }
        if self.realm.len() > 127 {
            return bad("realm longer than 127 characters".into());
        }
        for u in &self.users {
            match u.split_once(':') {
                Some((name, pass)) if !name.is_empty() && !pass.is_empty() => {
                    if name.len() > 512 {
                        return bad("user name longer than 512 bytes".into());
                    }
                }
                _ => return bad("user must be NAME:PASSWORD with both parts non-empty".into()),
            }
        }
        if self.auth_secrets.iter().any(|s| s.is_empty()) {
            return bad("empty auth secret".into());
        }
        if self.auth_secrets.len() > peerlink_proto::auth::rest::MAX_SECRETS {
            return bad(format!(
                "more than {} auth secrets",
                peerlink_proto::auth::rest::MAX_SECRETS
            ));
        }
        if self.users.is_empty() && self.auth_secrets.is_empty() {
            return bad(
                "no credentials: give at least one --user NAME:PASS or --auth-secret \
                 (or PEERLINK_RELAY_AUTH_SECRET)"
                    .into(),
            );
        }
        if self.min_port > self.max_port {
            return bad(format!(
                "min-port {} > max-port {}",
                self.min_port, self.max_port
            ));
        }
        if self.min_port == 0 {
            return bad("min-port must be at least 1".into());
        }
        if self.listen.port() == 0 {
            return bad("listen port must not be 0".into());
        }
        let workers = match self.workers {
            Some(0) => return bad("workers must be at least 1".into()),
            Some(n) if n > 1024 => return bad(format!("workers {n} is more than 1024")),
            Some(n) => n,
            None => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        };
        if self.max_allocations == 0 {
            return bad("max-allocations must be at least 1".into());
        }
        if self.user_quota == 0 {
            return bad("user-quota must be at least 1".into());
        }
        if self.unauth_rate == 0 || self.unauth_burst == 0 {
            return bad(
                "unauth-rate and unauth-burst must be at least 1 (no client could authenticate)"
                    .into(),
            );
        }
        if self.nonce_lifetime < Duration::from_secs(30) || self.nonce_lifetime.as_secs() > 86_400 {
            return bad("nonce-lifetime must be between 30 s and 24 h".into());
        }
        if self.max_lifetime < Duration::from_secs(600) {
            return bad("max-lifetime must be at least 600 seconds (RFC 8656 default)".into());
        }
        let relay_ips = if self.relay_ip.is_empty() {
            if self.listen.ip().is_unspecified() {
                return bad("relay-ip is required when listen is a wildcard address".into());
            }
            vec![self.listen.ip()]
        } else {
            self.relay_ip.clone()
        };
        for ip in &relay_ips {
            if ip.is_unspecified() || ip.is_multicast() {
                return bad(format!("relay-ip {ip} is not a unicast address"));
            }
        }
        if let Some((i, ip)) = relay_ips
            .iter()
            .enumerate()
            .find(|(i, ip)| relay_ips[..*i].contains(ip))
        {
            return bad(format!("relay-ip {ip} is given twice (entry {})", i + 1));
        }
        if !self.uring_buffers.is_power_of_two() || !(2..=32768).contains(&self.uring_buffers) {
            return bad(format!(
                "uring-buffers {} must be a power of two in 2..=32768",
                self.uring_buffers
            ));
        }
        if self.busy_poll_us > 1000 {
            return bad(format!(
                "busy-poll-us {} is above 1000 (a poll that long is a core spent)",
                self.busy_poll_us
            ));
        }
        if self.metrics.port() != 0 && self.metrics == self.listen {
            return bad("metrics address equals the listen address".into());
        }
        if let Err(e) = peerlink_cli::log::check_filter(&self.log_level) {
            return bad(format!("--log: {e}"));
        }
        let directory = match &self.directory {
            Some(url) => Some(self.directory_settings(url, &relay_ips)?),
            None => None,
        };
        let tls = self.stream_settings()?;
        Ok(Validated {
            config: self,
            workers,
            relay_ips,
            directory,
            tls,
        })
    }

    /// Checks the TCP/TLS listener settings and loads the TLS certificate and key.
    fn stream_settings(&self) -> Result<Option<crate::stream::TlsStore>, ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let all: Vec<&SocketAddr> = self.listen_tcp.iter().chain(&self.listen_tls).collect();
        for (i, a) in all.iter().enumerate() {
            if a.port() == 0 {
                return bad(format!("stream listener {a}: port must not be 0"));
            }
            if all[..i].contains(a) {
                return bad(format!("stream listener {a} is given twice"));
            }
            if **a == self.metrics {
                return bad(format!("stream listener {a} equals the metrics address"));
            }
        }
        if self.max_stream_connections == 0 {
            return bad("max-stream-connections must be at least 1".into());
        }
        for (name, v) in [
            ("stream-handshake-timeout", self.stream_handshake_timeout),
            ("stream-idle-timeout", self.stream_idle_timeout),
            ("stream-stall-timeout", self.stream_stall_timeout),
        ] {
            if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&v) {
                return bad(format!("{name} {v:?} must be 1 s to 1 h"));
            }
        }
        match (&self.tls_cert, &self.tls_key, self.listen_tls.is_empty()) {
            (Some(cert), Some(key), false) => Ok(Some(crate::stream::TlsStore::open(cert, key)?)),
            (None, None, true) => Ok(None),
            (_, _, false) => bad("listen-tls needs both --tls-cert and --tls-key".into()),
            (_, _, true) => bad("tls-cert / tls-key given without a listen-tls address".into()),
        }
    }

    /// The limits of the TCP/TLS connections.
    pub fn stream_limits(&self) -> crate::stream::StreamLimits {
        crate::stream::StreamLimits {
            max_connections: self.max_stream_connections,
            handshake_timeout: self.stream_handshake_timeout,
            idle_timeout: self.stream_idle_timeout,
            stall_timeout: self.stream_stall_timeout,
            ..crate::stream::StreamLimits::default()
        }
    }

    /// Check and resolve the directory registration settings.
    fn directory_settings(
        &self,
        url: &str,
        relay_ips: &[IpAddr],
    ) -> Result<DirectorySettings, ConfigError> {
        use peerlink_api::directory::{MAX_ID_LEN, MAX_REGION_LEN};
        let bad = |m: String| ConfigError::Invalid(m);
        let token = self.cluster_token.as_deref().unwrap_or_default();
        if token.is_empty() {
            return Err(bad(
                "directory given without a cluster token: set --cluster-token or \
                 PEERLINK_CLUSTER_TOKEN"
                    .into(),
            ));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad(
                "cluster token must be printable ASCII without spaces".into()
            ));
        }
        let relay_id = match &self.relay_id {
            Some(id) => id.clone(),
            None => format!("{}-{}", hostname(), self.listen.port()),
        };
        if relay_id.is_empty()
            || relay_id.len() > MAX_ID_LEN
            || relay_id.chars().any(char::is_control)
        {
            return Err(bad(format!(
                "relay-id {relay_id:?} must be 1..={MAX_ID_LEN} bytes without control characters"
            )));
        }
        if self.region.is_empty()
            || self.region.len() > MAX_REGION_LEN
            || self.region.chars().any(char::is_control)
        {
            return Err(bad(format!(
                "region {:?} must be 1..={MAX_REGION_LEN} bytes without control characters",
                self.region
            )));
        }
        let turn_addr = match self.public_addr {
            Some(a) => a,
            None if !self.listen.ip().is_unspecified() => self.listen,
            None => match relay_ips.first() {
                Some(ip) => SocketAddr::new(*ip, self.listen.port()),
                None => return Err(bad("public-addr is required with a wildcard listen".into())),
            },
        };
        if turn_addr.ip().is_unspecified() || turn_addr.ip().is_multicast() || turn_addr.port() == 0
        {
            return Err(bad(format!(
                "public-addr {turn_addr} is not a unicast address with a port"
            )));
        }
        // A stream listener is announced at the public IP when there is one (a 1:1 NAT maps
        // every port) or when it listens on a wildcard address.
        let announce = |listen: &[SocketAddr]| {
            listen.first().map(|a| {
                if self.public_addr.is_some() || a.ip().is_unspecified() {
                    SocketAddr::new(turn_addr.ip(), a.port())
                } else {
                    *a
                }
            })
        };
        let client = DirectoryClient::with_timeout(url, token, REQUEST_TIMEOUT)
            .map_err(|e| bad(format!("directory: {e}")))?;
        Ok(DirectorySettings {
            client,
            relay_id,
            region: self.region.clone(),
            turn_addr,
            turn_tcp_addr: announce(&self.listen_tcp),
            turn_tls_addr: announce(&self.listen_tls),
            capacity: self.max_allocations as u64,
        })
    }
}

/// This machine's host name (`relay` when it cannot be read).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "relay".into())
}

impl Validated {
    /// Build the core's configuration (fresh random nonce key). `metrics` is the metrics
    /// address actually bound (denied as a peer, like the listener).
    pub fn core_config(&self, metrics: std::net::SocketAddr) -> Arc<CoreConfig> {
        let c = &self.config;
        let mut nonce_key = [0u8; 32];
        rand::Rng::fill(&mut rand::rng(), &mut nonce_key);
        let mut core =
            CoreConfig::new(c.realm.clone(), c.listen, self.relay_ips.clone(), nonce_key);
        core.software = (!c.software.is_empty()).then(|| c.software.clone());
        for u in &c.users {
            if let Some((name, pass)) = u.split_once(':') {
                core.users.insert(
                    name.to_string(),
                    peerlink_proto::auth::long_term_key(name, &c.realm, pass),
                );
            }
        }
        core.auth_secrets = c
            .auth_secrets
            .iter()
            .map(|s| s.as_bytes().to_vec())
            .collect();
        core.port_range = c.min_port..=c.max_port;
        core.service_ports = vec![metrics];
        // The stream listeners are service ports too (never peers).
        core.service_ports
            .extend(c.listen_tcp.iter().chain(&c.listen_tls).copied());
        core.allow_peers = c.allow_peers.clone();
        core.deny_peers = c.deny_peers.clone();
        core.max_allocations = c.max_allocations;
        core.max_allocations_per_user = c.user_quota;
        core.max_lifetime = c.max_lifetime;
        core.bandwidth_limit_bps = c.bandwidth_limit;
        core.legacy_channel_range = c.legacy_channel_range;
        core.rest_max_ttl = c.rest_max_ttl;
        core.unauth_rate_per_sec = c.unauth_rate;
        core.unauth_burst = c.unauth_burst;
        core.nonce_lifetime = c.nonce_lifetime;
        Arc::new(core)
    }

    /// The drain timeout.
    pub fn drain_timeout(&self) -> Duration {
        self.config.drain_timeout
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok_base() -> Config {
        Config {
            listen: "127.0.0.1:3478".parse().unwrap(),
            users: vec!["alice:pw".into()],
            ..Config::default()
        }
    }

    #[test]
    fn shipped_example_config_parses_and_validates() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/relay/peerlink-relay.toml");
        let mut c = Config::from_file(&path).expect("deploy/relay/peerlink-relay.toml parses");
        // The example ships without credentials (secrets come from the environment).
        c.users = vec!["alice:pw".into()];
        c.validate().expect("the example config validates");
    }

    #[test]
    fn defaults_and_toml_round() {
        let c: Config = toml::from_str(
            "listen = \"127.0.0.1:4000\"\nusers = [\"a:b\"]\nallow_peers = [\"127.0.0.0/8\"]\nio = \"epoll\"\n",
        )
        .unwrap();
        assert_eq!(c.io, IoMode::Epoll);
        assert_eq!(c.min_port, 49152);
        let v = c.validate().unwrap();
        assert_eq!(v.relay_ips, vec!["127.0.0.1".parse::<IpAddr>().unwrap()]);
        assert!(v.workers >= 1);
    }

    #[test]
    fn rejects_bad_configs() {
        assert!(
            toml::from_str::<Config>("lisen = \"1.2.3.4:5\"").is_err(),
            "unknown key"
        );
        assert!(
            toml::from_str::<Config>("listen = \"nope\"").is_err(),
            "bad address"
        );
        type Case = Box<dyn Fn(&mut Config)>;
        let cases: Vec<Case> = vec![
            Box::new(|c| c.realm = " ".into()),
            Box::new(|c| c.users.clear()),
            Box::new(|c| c.users = vec!["nopass".into()]),
            Box::new(|c| {
                c.min_port = 6000;
                c.max_port = 5000;
            }),
            Box::new(|c| c.workers = Some(0)),
            Box::new(|c| c.listen = "0.0.0.0:3478".parse().unwrap()),
            Box::new(|c| c.auth_secrets = vec![String::new()]),
            Box::new(|c| c.log_level = "[[[".into()),
            Box::new(|c| c.relay_ip = vec!["127.0.0.2".parse().unwrap(); 2]),
            Box::new(|c| c.relay_ip = vec!["224.0.0.1".parse().unwrap()]),
            Box::new(|c| c.busy_poll_us = 1001),
            Box::new(|c| c.unauth_rate = 0),
            Box::new(|c| c.unauth_burst = 0),
            Box::new(|c| c.nonce_lifetime = Duration::from_secs(5)),
            Box::new(|c| c.listen_tls = vec!["127.0.0.1:5349".parse().unwrap()]),
            Box::new(|c| {
                c.listen_tls = vec!["127.0.0.1:5349".parse().unwrap()];
                c.tls_cert = Some("/nonexistent/cert.pem".into());
                c.tls_key = Some("/nonexistent/key.pem".into());
            }),
            Box::new(|c| c.tls_cert = Some("/nonexistent/cert.pem".into())),
            Box::new(|c| c.listen_tcp = vec!["127.0.0.1:0".parse().unwrap()]),
            Box::new(|c| c.listen_tcp = vec!["127.0.0.1:3478".parse().unwrap(); 2]),
            Box::new(|c| c.max_stream_connections = 0),
            Box::new(|c| c.stream_idle_timeout = Duration::ZERO),
        ];
        for (i, f) in cases.iter().enumerate() {
            let mut c = ok_base();
            f(&mut c);
            assert!(c.validate().is_err(), "case {i} should fail");
        }
        assert!(ok_base().validate().is_ok());
        // Several relay IPs of one family (more relayed addresses than one IP's ports).
        let mut c = ok_base();
        c.relay_ip = ["127.0.0.1", "127.0.0.2", "::1"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(c.validate().unwrap().relay_ips.len(), 3);
    }

    #[test]
    fn stream_listeners_from_toml_with_a_real_certificate() {
        use peerlink_testkit::tls::pem_block;
        let dir = tempfile::tempdir().unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["relay.test".into()]).unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&cert, pem_block("CERTIFICATE", ck.cert.der())).unwrap();
        std::fs::write(
            &key,
            pem_block("PRIVATE KEY", &ck.signing_key.serialize_der()),
        )
        .unwrap();
        let text = format!(
            "listen = \"127.0.0.1:3478\"\nusers = [\"a:b\"]\nlisten_tcp = [\"127.0.0.1:3478\"]\n\
             listen_tls = [\"127.0.0.1:5349\", \"[::1]:5349\"]\ntls_cert = {:?}\ntls_key = {:?}\n\
             max_stream_connections = 50\nstream_idle_timeout = 5\n",
            cert.display().to_string(),
            key.display().to_string()
        );
        let c: Config = toml::from_str(&text).unwrap();
        let v = c.validate().unwrap();
        assert!(v.tls.is_some());
        let l = v.config.stream_limits();
        assert_eq!(l.max_connections, 50);
        assert_eq!(l.idle_timeout, Duration::from_secs(5));
        assert_eq!(l.handshake_timeout, Duration::from_secs(10));
        let core = v.core_config("127.0.0.1:9641".parse().unwrap());
        assert!(
            core.service_ports
                .contains(&"127.0.0.1:5349".parse().unwrap())
        );
        // An unreadable key is refused with its path in the message.
        let mut bad = v.config.clone();
        bad.tls_key = Some(dir.path().join("missing.pem"));
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("missing.pem"), "{e}");
        // Defaults: no stream listeners at all.
        assert!(ok_base().validate().unwrap().tls.is_none());
        assert!(Config::default().listen_tcp.is_empty() && Config::default().listen_tls.is_empty());
    }

    #[test]
    fn directory_settings_defaults_and_checks() {
        let mut c = ok_base();
        c.directory = Some("http://127.0.0.1:8500".into());
        c.cluster_token = Some("cluster-token".into());
        c.max_allocations = 500;
        let d = c.clone().validate().unwrap().directory.unwrap();
        assert_eq!(
            d.turn_addr, c.listen,
            "public address defaults to the listen address"
        );
        assert_eq!(d.region, "local");
        assert_eq!(d.capacity, 500);
        assert!(d.relay_id.ends_with("-3478"), "{}", d.relay_id);

        let from_toml: Config = toml::from_str(
            "listen = \"0.0.0.0:3478\"\nrelay_ip = [\"10.1.2.3\"]\nusers = [\"a:b\"]\n\
             directory = \"http://127.0.0.1:8500\"\ncluster_token = \"tok-tok-tok\"\n\
             relay_id = \"r1\"\nregion = \"eu\"\n",
        )
        .unwrap();
        let d = from_toml.validate().unwrap().directory.unwrap();
        assert_eq!(d.turn_addr, "10.1.2.3:3478".parse().unwrap());
        let replicas: Config = toml::from_str(
            "listen = \"127.0.0.1:3478\"\nusers = [\"a:b\"]\ncluster_token = \"tok-tok-tok\"\n\
             directory = [\"http://127.0.0.1:8500\", \"http://127.0.0.1:8501\"]\n",
        )
        .unwrap();
        assert_eq!(
            replicas.directory.as_deref(),
            Some("http://127.0.0.1:8500,http://127.0.0.1:8501")
        );
        let two = replicas.validate().unwrap().directory.unwrap();
        assert_eq!(two.client.base_urls().len(), 2);
        assert_eq!((d.relay_id.as_str(), d.region.as_str()), ("r1", "eu"));

        type Case = Box<dyn Fn(&mut Config)>;
        let cases: Vec<Case> = vec![
            Box::new(|c| c.cluster_token = None),
            Box::new(|c| c.cluster_token = Some("has space".into())),
            Box::new(|c| c.directory = Some("not a url".into())),
            Box::new(|c| c.directory = Some("https://127.0.0.1:8500".into())),
            Box::new(|c| c.relay_id = Some(String::new())),
            Box::new(|c| c.relay_id = Some("x".repeat(129))),
            Box::new(|c| c.region = String::new()),
            Box::new(|c| c.public_addr = Some("0.0.0.0:3478".parse().unwrap())),
            Box::new(|c| c.public_addr = Some("127.0.0.1:0".parse().unwrap())),
        ];
        for (i, f) in cases.iter().enumerate() {
            let mut bad = c.clone();
            f(&mut bad);
            assert!(bad.validate().is_err(), "case {i} should fail");
        }
        // Without a directory the registration keys are inert.
        let mut plain = ok_base();
        plain.region = String::new();
        assert!(plain.validate().unwrap().directory.is_none());
    }
}
