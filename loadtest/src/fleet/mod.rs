//! Signaling and directory benchmarks: idle WebSocket sessions per node, invite
//! delivery latency, login rate against a raw Argon2id baseline, directory lookups over
//! HTTP against the same process's `GET /healthz`, and the fleet on PostgreSQL and Redis
//! against the embedded stores (invites and durable messages).
//!
//! What it is: harnesses that start the real `peerlink-signaling` / `peerlink-directory`
//! binaries on loopback (temp database, killed on drop), drive them with many clients and
//! report figures next to a baseline measured in the same run (see `docs/BENCHMARKS.md`,
//! "Signaling and directory"). What it is not: a test of the services' behaviour (their own crates do
//! that) nor a claim about absolute speed on another machine.

pub mod directory;
pub mod engines;
pub mod idle;
pub mod idle_multi;
pub mod invites;
pub mod logins;
pub mod messages;
pub mod on_engines;
pub mod proc;
pub mod stats;

use std::path::PathBuf;
use std::time::Duration;

use peerlink_api::signaling_client::HttpApi;

pub use proc::{Service, default_bin, raise_nofile, rss_kib};
pub use stats::Percentiles;

/// Failures of a fleet benchmark.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// A service binary is not where it was looked for.
    #[error(
        "{0} not found: build it first (cargo build --release -p peerlink-signaling -p peerlink-directory)"
    )]
    MissingBinary(PathBuf),
    /// A service could not be started or exited early.
    #[error("{name}: {what}")]
    Service {
        /// Which service.
        name: String,
        /// What went wrong (with the tail of its log when there is one).
        what: String,
    },
    /// Local I/O (sockets, files, /proc).
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// An HTTP request failed.
    #[error("http: {0}")]
    Http(#[from] reqwest::Error),
    /// A signaling client call failed.
    #[error("signaling: {0}")]
    Signaling(#[from] peerlink_api::signaling_client::SignalError),
    /// A directory client call failed.
    #[error("directory: {0}")]
    Directory(#[from] peerlink_api::directory_client::ClientError),
    /// A WebSocket operation failed.
    #[error("websocket: {0}")]
    Ws(#[from] tokio_tungstenite::tungstenite::Error),
    /// The server answered something the benchmark did not expect.
    #[error("unexpected answer: {0}")]
    Protocol(String),
    /// A phase did not finish within its time limit.
    #[error("timed out: {0}")]
    Timeout(String),
    /// A parameter is out of range.
    #[error("invalid parameter: {0}")]
    Invalid(String),
}

/// Result of the fleet benchmarks.
pub type Result<T> = std::result::Result<T, FleetError>;

/// Token secret given to the signaling nodes the benchmarks start (loopback only).
pub const TOKEN_SECRET: &str = "peerlink-loadtest-fleet-token-secret-0123456789";
/// Cluster token given to the directory and nodes the benchmarks start.
pub const CLUSTER_TOKEN: &str = "peerlink-loadtest-fleet-cluster-token";
/// Password of every benchmark account (8-256 bytes as the server requires).
pub const PASSWORD: &str = "loadtest-password-123";

/// Await `f` for at most `d`, naming the phase in the error.
pub async fn within<T>(
    d: Duration,
    what: &str,
    f: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(d, f)
        .await
        .map_err(|_| FleetError::Timeout(format!("{what} (limit {} s)", d.as_secs_f64())))?
}

/// Bound on one HTTP request of the benchmarks to a signaling node.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// The signaling HTTP API at `base` (`http://host:port`).
pub fn signaling_api(base: &str) -> Result<HttpApi> {
    Ok(HttpApi::new(base, HTTP_TIMEOUT)?)
}

/// Register `user` (an existing one is fine) and log in; returns the access token.
pub async fn account(api: &HttpApi, user: &str) -> Result<String> {
    match api.register(user, PASSWORD).await {
        Err(e) if e.status() != Some(409) => return Err(e.into()),
        _ => {}
    }
    login(api, user).await
}

/// Log in as `user`; returns the access token.
pub async fn login(api: &HttpApi, user: &str) -> Result<String> {
    Ok(api.login(user, PASSWORD).await?.access_token)
}

/// Create `users` accounts (`{prefix}{i}`) with `concurrency` requests in flight; returns
/// their access tokens in order.
pub async fn accounts(
    base: &str,
    prefix: &str,
    users: usize,
    concurrency: usize,
) -> Result<Vec<String>> {
    use futures_util::StreamExt as _;
    let api = signaling_api(base)?;
    let results: Vec<(usize, Result<String>)> = futures_util::stream::iter(0..users)
        .map(|i| {
            let api = api.clone();
            async move { (i, account(&api, &format!("{prefix}{i}")).await) }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let mut tokens = vec![String::new(); users];
    for (i, r) in results {
        tokens[i] = r?;
    }
    Ok(tokens)
}

/// Read one gauge/counter from a signaling node's Prometheus text.
pub async fn signaling_metric(base: &str, name: &str) -> Result<i64> {
    let text = reqwest::Client::new()
        .get(format!("{base}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    let key = format!("peerlink_signaling_{name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| FleetError::Protocol(format!("metric {name} missing")))
}
