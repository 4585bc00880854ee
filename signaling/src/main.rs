//! `peerlink-signaling`: CLI, config file and wiring only (see the library for behaviour).
//!
//! Every flag can also be set in a TOML file (`--config`, keys = flag names with `_`). The
//! file comes first, then the environment (secrets: `PEERLINK_TOKEN_SECRET`,
//! `PEERLINK_TURN_SECRET`, `PEERLINK_CLUSTER_TOKEN`; the store: `PEERLINK_STORE`; the TLS
//! files: `PEERLINK_TLS_CERT`, `PEERLINK_TLS_KEY`), then the flags (`peerlink_cli::config`).
//! A bad configuration (including a TLS certificate or key that cannot be used) exits with
//! status 2 before any socket is bound; a store that cannot be opened (unreachable, refused
//! credentials, newer schema) with status 1, also before. Once bound, the binary prints
//! `http=ADDR`, `stun6=ADDR` (when the IPv6 STUN responder runs) and `stun=ADDR[,ADDR..]`
//! lines on stdout, in this order.
//!
//! With `--tls-cert` and `--tls-key` the listener serves HTTPS and WSS; SIGHUP re-reads both
//! files (a pair that fails to load is logged and the previous one keeps serving); without
//! TLS, SIGHUP is logged and changes nothing.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use peerlink_cli::log::LogFormat;
use peerlink_cli::tls::TlsStore;
use peerlink_signaling::config::{ConfigError, Settings};
use peerlink_signaling::serve::{TlsServing, serve, serve_tls};
use peerlink_signaling::store::{PgOptions, StoreLocation};
use peerlink_signaling::stun::StunResponder;
use peerlink_signaling::throttle::{SharedThrottle, ThrottleLocation};
use peerlink_signaling::{AppState, Config, app};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

// The command line: every setting is optional and serializes to its key of the TOML file
// (`Settings`), unset ones to nothing; `peerlink_cli::config::load` lays them over the file.
#[derive(Parser, Serialize, Debug, Default)]
#[command(
    name = "peerlink-signaling",
    version,
    about = "peerlink signaling node"
)]
struct Flags {
    /// TOML config file (keys as the long flags with `_`).
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// HTTP + WebSocket listen address [default: 127.0.0.1:8443].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// UDP STUN responder address [default: 127.0.0.1:3479].
    #[arg(long)]
    stun: Option<SocketAddr>,
    /// Second STUN address (other IP and/or port) for RFC 5780 behaviour discovery.
    #[arg(long)]
    stun_alt: Option<SocketAddr>,
    /// Disable the STUN responder.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    no_stun: Option<bool>,
    /// IPv6 STUN responder address beside --stun [default: [::1] on --stun's port when
    /// --stun is loopback, else none].
    #[arg(long)]
    stun6: Option<SocketAddr>,
    /// SQLite database path; the same as `--store sqlite:PATH`, and an error together with
    /// `--store` [default: peerlink-signaling.db].
    #[arg(long)]
    db: Option<PathBuf>,
    /// Store: `sqlite:PATH`, a bare path (SQLite) or `postgres://user:pass@host:port/db`
    /// [default: the --db file].
    #[arg(
        long,
        env = "PEERLINK_STORE",
        hide_env_values = true,
        value_name = "URL"
    )]
    store: Option<String>,
    /// PostgreSQL: most pooled connections [default: 8].
    #[arg(long)]
    store_pool_size: Option<u32>,
    /// PostgreSQL: connect timeout of one connection [default: 5s].
    #[arg(long, value_parser = peerlink_cli::parse_duration)]
    #[serde(with = "peerlink_cli::config::duration::option")]
    store_connect_timeout: Option<Duration>,
    /// PostgreSQL: longest wait for a pooled connection; then the request fails (503, or an
    /// `error` frame) [default: 5s].
    #[arg(long, value_parser = peerlink_cli::parse_duration)]
    #[serde(with = "peerlink_cli::config::duration::option")]
    store_checkout_timeout: Option<Duration>,
    /// PostgreSQL: statement_timeout of every statement [default: 5s].
    #[arg(long, value_parser = peerlink_cli::parse_duration)]
    #[serde(with = "peerlink_cli::config::duration::option")]
    store_statement_timeout: Option<Duration>,
    /// Directory base URL (multi-node); repeat or separate with commas for several replicas
    /// (failover); without it the node runs standalone.
    #[arg(long, value_delimiter = ',')]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    directory: Vec<String>,
    /// Cluster token for the directory and node-to-node API.
    #[arg(long, env = "PEERLINK_CLUSTER_TOKEN", hide_env_values = true)]
    cluster_token: Option<String>,
    /// Node id [default: signaling-1].
    #[arg(long)]
    node_id: Option<String>,
    /// Region of this node, preferred for relay choice [default: default].
    #[arg(long)]
    region: Option<String>,
    /// URL clients use to reach this node (the default internal URL).
    #[arg(long)]
    public_url: Option<String>,
    /// URL other nodes use to reach this node's internal API [default: public URL, else
    /// http://<bound listen address>, https:// with TLS].
    #[arg(long)]
    internal_url: Option<String>,
    /// CA certificate file (PEM) trusted besides the system's roots for https:// requests to
    /// other nodes (repeatable; TOML: a list).
    #[arg(long = "cluster-ca", value_name = "PEM")]
    cluster_ca: Option<Vec<PathBuf>>,
    /// PEM certificate chain, leaf first: with --tls-key the listener serves HTTPS and WSS
    /// (re-read on SIGHUP) [default: plain HTTP].
    #[arg(long, env = "PEERLINK_TLS_CERT", value_name = "PEM")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert (re-read on SIGHUP).
    #[arg(long, env = "PEERLINK_TLS_KEY", value_name = "PEM")]
    tls_key: Option<PathBuf>,
    /// A TLS handshake must finish within this [default: 10s].
    #[arg(long, value_parser = peerlink_cli::parse_duration)]
    #[serde(with = "peerlink_cli::config::duration::option")]
    tls_handshake_timeout: Option<Duration>,
    /// HS256 token secret, at least 32 bytes.
    #[arg(long, env = "PEERLINK_TOKEN_SECRET", hide_env_values = true)]
    token_secret: Option<String>,
    /// Token issuer [default: peerlink].
    #[arg(long)]
    token_issuer: Option<String>,
    /// Access token lifetime, e.g. 15m [default: 15m].
    #[arg(long, value_parser = peerlink_cli::parse_duration)]
    #[serde(with = "peerlink_cli::config::duration::option")]
    token_ttl: Option<Duration>,
    /// Refresh token lifetime [default: 7d].
    #[arg(long, value_parser = peerlink_cli::parse_duration)]
    #[serde(with = "peerlink_cli::config::duration::option")]
    refresh_ttl: Option<Duration>,
    /// TURN REST shared secret (same as the relays').
    #[arg(long, env = "PEERLINK_TURN_SECRET", hide_env_values = true)]
    turn_secret: Option<String>,
    /// TURN credential lifetime [default: 1h].
    #[arg(long, value_parser = peerlink_cli::parse_duration)]
    #[serde(with = "peerlink_cli::config::duration::option")]
    turn_ttl: Option<Duration>,
    /// Static relay address host:port (repeatable), used without a directory.
    #[arg(long = "relay")]
    relay: Option<Vec<String>>,
    /// Argon2id memory in KiB [default: 19456].
    #[arg(long)]
    argon2_m_kib: Option<u32>,
    /// Argon2id iterations [default: 2].
    #[arg(long)]
    argon2_t: Option<u32>,
    /// Argon2id lanes [default: 1].
    #[arg(long)]
    argon2_p: Option<u32>,
    /// Concurrent password hashes [default: 2].
    #[arg(long)]
    hash_concurrency: Option<usize>,
    /// Failed logins per account per window [default: 5].
    #[arg(long)]
    login_failures_per_account: Option<u32>,
    /// Failed logins per IP per window [default: 20].
    #[arg(long)]
    login_failures_per_ip: Option<u32>,
    /// Login throttle window [default: 5m].
    #[arg(long, value_parser = peerlink_cli::parse_duration)]
    #[serde(with = "peerlink_cli::config::duration::option")]
    login_window: Option<Duration>,
    /// The fleet's shared login throttle: `redis://HOST:PORT[/DB][?prefix=P]` [default: none,
    /// each node throttles on its own].
    #[arg(
        long,
        env = "PEERLINK_THROTTLE_STORE",
        hide_env_values = true,
        value_name = "URL"
    )]
    throttle_store: Option<String>,
    /// Ring timeout [default: 30s].
    #[arg(long, value_parser = peerlink_cli::parse_duration)]
    #[serde(with = "peerlink_cli::config::duration::option")]
    ring_timeout: Option<Duration>,
    /// Keep an accepted call this long after a party's session drops without a hangup,
    /// waiting for the same device to reconnect; 0 ends it at once [default: 5s].
    #[arg(long, value_parser = peerlink_cli::parse_duration)]
    #[serde(with = "peerlink_cli::config::duration::option")]
    call_grace: Option<Duration>,
    /// Largest WebSocket message, bytes [default: 65536].
    #[arg(long)]
    max_ws_message: Option<usize>,
    /// WebSocket read buffer per connection, bytes [default: 1024].
    #[arg(long)]
    ws_read_buffer: Option<usize>,
    /// Outbound frames queued per session [default: 64].
    #[arg(long)]
    outbound_queue: Option<usize>,
    /// Frame write timeout [default: 10s].
    #[arg(long, value_parser = peerlink_cli::parse_duration)]
    #[serde(with = "peerlink_cli::config::duration::option")]
    write_timeout: Option<Duration>,
    /// Ping interval [default: 20s].
    #[arg(long, value_parser = peerlink_cli::parse_duration)]
    #[serde(with = "peerlink_cli::config::duration::option")]
    ping_interval: Option<Duration>,
    /// Idle timeout [default: 60s].
    #[arg(long, value_parser = peerlink_cli::parse_duration)]
    #[serde(with = "peerlink_cli::config::duration::option")]
    idle_timeout: Option<Duration>,
    /// Time for the first `auth` frame of a session opened without a token [default: 10s].
    #[arg(long, value_parser = peerlink_cli::parse_duration)]
    #[serde(with = "peerlink_cli::config::duration::option")]
    auth_timeout: Option<Duration>,
    /// Client frames per second per session [default: 20].
    #[arg(long)]
    msg_rate: Option<u32>,
    /// Client frame burst per session [default: 40].
    #[arg(long)]
    msg_burst: Option<u32>,
    /// Rate-limited frames in a row before closing [default: 20].
    #[arg(long)]
    flood_close_after: Option<u32>,
    /// Sessions per client IP [default: 32].
    #[arg(long)]
    max_conns_per_ip: Option<u32>,
    /// Candidates per party [default: 32].
    #[arg(long)]
    max_candidates: Option<usize>,
    /// Refuse candidates in this range, e.g. 10.0.0.0/8 or 2001:db8::/32 (repeatable; TOML:
    /// a list). Private, shared, link-local and unique-local host candidates are accepted
    /// otherwise; multicast, broadcast, unspecified and reserved addresses always refused.
    #[arg(long = "deny-candidate", value_name = "CIDR")]
    deny_candidate: Option<Vec<String>>,
    /// Accept loopback candidates [default: true when --listen is a loopback address].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    allow_loopback_candidates: Option<bool>,
    /// Largest text message body, bytes [default: 16384].
    #[arg(long)]
    max_body_bytes: Option<usize>,
    /// How long message ids are remembered for deduplication [default: 30d].
    #[arg(long, value_parser = peerlink_cli::parse_duration)]
    #[serde(with = "peerlink_cli::config::duration::option")]
    dedup_retention: Option<Duration>,
    /// Complete request headers must arrive within this [default: 10s].
    #[arg(long, value_parser = peerlink_cli::parse_duration)]
    #[serde(with = "peerlink_cli::config::duration::option")]
    header_timeout: Option<Duration>,
    /// After shutdown starts, keep answering 503 this long [default: 2s].
    #[arg(long, value_parser = peerlink_cli::parse_duration)]
    #[serde(with = "peerlink_cli::config::duration::option")]
    shutdown_grace: Option<Duration>,
    /// Log filter in RUST_LOG syntax, e.g. `info` or `peerlink_signaling=debug,warn`
    /// [default: info].
    #[arg(long, value_name = "FILTER")]
    log: Option<String>,
    /// Log line format: `text`, or `json` (one object per line) [default: text].
    #[arg(long, value_enum, value_name = "FORMAT")]
    log_format: Option<LogFormat>,
}

/// What the binary runs with: the settings, the node's configuration, where the store is
/// and the PostgreSQL pool settings.
struct Loaded {
    settings: Settings,
    config: Config,
    store: StoreLocation,
    pg: PgOptions,
    tls: Option<TlsStore>,
    throttle: Option<ThrottleLocation>,
}

/// The config file, then the environment, then the flags; then checked.
fn load() -> Result<Loaded, ConfigError> {
    let flags = Flags::parse();
    let settings: Settings = peerlink_cli::config::load(flags.config.as_deref(), &flags)?;
    let config = settings.to_config()?;
    let store = settings.store_location()?;
    let pg = settings.pg_options()?;
    let throttle = settings.throttle_location()?;
    let tls = match settings.tls_files()? {
        Some(f) => Some(
            TlsStore::with_alpn(&f.cert, &f.key, peerlink_signaling::serve::alpn())
                .map_err(|e| ConfigError::Invalid(e.to_string()))?,
        ),
        None => None,
    };
    Ok(Loaded {
        settings,
        config,
        store,
        pg,
        tls,
        throttle,
    })
}

/// The store setting as it may be logged.
fn store_shown(s: &Settings) -> String {
    s.store_location().map(|l| l.redacted()).unwrap_or_default()
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// SIGHUP re-reads the certificate and key: new handshakes use them, open connections keep
/// theirs. A pair that fails to load is one error line (and `tls_reload_failures_total`);
/// the previous pair keeps serving. Without TLS there is nothing to reload.
#[cfg(unix)]
fn spawn_reload_on_sighup(
    store: Option<TlsStore>,
    state: AppState,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                r = hup.recv() => if r.is_none() { break },
            }
            let Some(store) = &store else {
                tracing::info!("SIGHUP: no TLS certificate, nothing to reload");
                continue;
            };
            match store.reload() {
                Ok(()) => tracing::info!(
                    cert = %store.cert_path().display(),
                    "SIGHUP: TLS certificate reloaded; new connections use it"
                ),
                Err(e) => {
                    state
                        .metrics
                        .tls_reload_failures_total
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::error!(
                        "SIGHUP: TLS reload failed, keeping the previous certificate: {e}"
                    )
                }
            }
        }
    });
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Loaded {
        settings,
        config: cfg,
        store,
        pg,
        tls,
        throttle,
    } = match load() {
        Ok(x) => x,
        Err(e) => {
            eprintln!("peerlink-signaling: {e:#}");
            std::process::exit(2);
        }
    };
    if let Err(e) = peerlink_cli::log::init(&settings.log, settings.log_format) {
        eprintln!("peerlink-signaling: {e}");
        std::process::exit(2);
    }
    // Open (and migrate) the store before binding anything: an unreachable server, refused
    // credentials or a newer schema end the process here, with status 1.
    let store = {
        let shown = store.redacted();
        let opened =
            tokio::task::spawn_blocking(move || peerlink_signaling::store::open(&store, &pg))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
        match opened {
            Ok(s) => s,
            Err(e) => {
                eprintln!("peerlink-signaling: store {shown}: {e}");
                std::process::exit(1);
            }
        }
    };
    tracing::info!(store = %store_shown(&settings), "store open");
    // The shared login throttle too: an unreachable Redis ends the process before binding.
    let shared_throttle = match &throttle {
        Some(loc) => match SharedThrottle::connect(
            loc,
            cfg.login_failures_per_account,
            cfg.login_failures_per_ip,
            cfg.login_window,
        )
        .await
        {
            Ok(t) => {
                tracing::info!(throttle_store = %loc.redacted(), "shared login throttle");
                Some(t)
            }
            Err(e) => {
                eprintln!("peerlink-signaling: {e}");
                std::process::exit(1);
            }
        },
        None => None,
    };
    let (stun_addr, stun_alt, stun6_addr) = (cfg.stun, cfg.stun_alt, cfg.stun6);
    let stun6_defaulted = settings.stun6.is_none();
    let listen = settings.listen;

    // Bind everything, then announce.
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let http_addr = listener.local_addr()?;
    let mut cfg = cfg;
    if cfg.directory.is_some() && cfg.internal_url.is_none() {
        cfg.internal_url = Some(cfg.public_url.clone().unwrap_or_else(|| {
            let scheme = if tls.is_some() { "https" } else { "http" };
            format!("{scheme}://{http_addr}")
        }));
    }
    let state = AppState::new(cfg, store).context("building node state")?;
    if let Some(t) = shared_throttle {
        state.share_login_throttle(t);
    }
    let stun = match stun_addr {
        Some(a) => Some(StunResponder::bind(a, stun_alt).await?),
        None => None,
    };
    // One responder per family. The defaulted [::1] one is optional: a host without IPv6
    // runs IPv4 only.
    let stun6 = match stun6_addr {
        Some(a) => match StunResponder::bind(a, None).await {
            Ok(s) => Some(s),
            Err(e) if stun6_defaulted => {
                tracing::warn!("no IPv6 STUN responder on {a}: {e}");
                None
            }
            Err(e) => return Err(e).with_context(|| format!("binding STUN {a}")),
        },
        None => None,
    };
    if let Some(c) = state.cluster.as_ref() {
        // The console figures read the node's counters; a weak handle, so that the
        // registration loop does not keep the node state alive.
        let started = std::time::Instant::now();
        let shared = std::sync::Arc::downgrade(&state.0);
        let stats = move || {
            let uptime_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            shared.upgrade().map(|s| s.metrics.snapshot(uptime_ms))
        };
        c.start(state.hub.clone(), stats);
        if !c.wait_registered(Duration::from_secs(5)).await {
            tracing::warn!("directory registration not confirmed yet; retrying in the background");
        }
    }
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "http={http_addr}")?;
        // Before `stun=`: whoever waits for that line has seen this one.
        if let Some(a) = stun6.as_ref().and_then(|s| s.layout().slots[0]) {
            writeln!(out, "stun6={a}")?;
        }
        if let Some(s) = &stun {
            let addrs: Vec<String> = s
                .layout()
                .slots
                .iter()
                .flatten()
                .map(|a| a.to_string())
                .collect();
            writeln!(out, "stun={}", addrs.join(","))?;
        }
        out.flush()?;
    }
    tracing::info!(%http_addr, tls = tls.is_some(), "peerlink-signaling listening");

    let stop = CancellationToken::new();
    if let Some(s) = stun {
        tokio::spawn(s.run(state.clone(), stop.clone()));
    }
    if let Some(s) = stun6 {
        tokio::spawn(s.run(state.clone(), stop.clone()));
    }
    {
        let (st, stop) = (state.clone(), stop.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(3600));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = every.tick() => st.maintain().await,
                }
            }
        });
    }
    let router = app(state.clone());
    let server_stop = stop.clone();
    let header_timeout = state.cfg.header_timeout;
    #[cfg(unix)]
    spawn_reload_on_sighup(tls.clone(), state.clone(), stop.clone())?;
    let server = match tls {
        None => tokio::spawn(serve(listener, router, header_timeout, server_stop)),
        Some(store) => {
            let serving = TlsServing {
                store,
                handshake_timeout: state.cfg.tls_handshake_timeout,
                state: state.clone(),
            };
            tokio::spawn(serve_tls(
                listener,
                router,
                header_timeout,
                serving,
                server_stop,
            ))
        }
    };

    wait_for_signal().await;
    tracing::info!("shutting down: closing sessions");
    state.drain(Duration::from_secs(5)).await;
    tokio::time::sleep(state.cfg.shutdown_grace).await;
    stop.cancel();
    if let Some(c) = state.cluster.as_ref() {
        c.stop().await;
    }
    match tokio::time::timeout(Duration::from_secs(10), server).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => bail!("server task failed: {e}"),
        Err(_) => tracing::warn!("server did not stop in time"),
    }
    tracing::info!("bye");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(args: &[&str]) -> Flags {
        Flags::try_parse_from(std::iter::once("peerlink-signaling").chain(args.iter().copied()))
            .unwrap()
    }

    fn settings(f: &Flags) -> Result<Settings, peerlink_cli::config::ConfigError> {
        peerlink_cli::config::load(f.config.as_deref(), f)
    }

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn every_flag_sets_its_key() {
        let f = flags(&[
            "--listen",
            "127.0.0.1:1",
            "--stun",
            "127.0.0.1:2",
            "--stun-alt",
            "127.0.0.1:3",
            "--stun6",
            "[::1]:4",
            "--no-stun",
            "false",
            "--db",
            "/tmp/x.db",
            "--store",
            "postgres://u:p@127.0.0.1:5/db",
            "--store-pool-size",
            "3",
            "--store-connect-timeout",
            "21s",
            "--store-checkout-timeout",
            "22s",
            "--store-statement-timeout",
            "23s",
            "--directory",
            "http://127.0.0.1:8500",
            "--cluster-token",
            "cluster-token",
            "--node-id",
            "n7",
            "--region",
            "eu",
            "--public-url",
            "ws://pub",
            "--internal-url",
            "http://int",
            "--cluster-ca",
            "/tmp/ca1.pem",
            "--cluster-ca",
            "/tmp/ca2.pem",
            "--tls-cert",
            "/tmp/c.pem",
            "--tls-key",
            "/tmp/k.pem",
            "--tls-handshake-timeout",
            "24s",
            "--token-secret",
            SECRET,
            "--token-issuer",
            "iss",
            "--token-ttl",
            "1m",
            "--refresh-ttl",
            "2h",
            "--turn-secret",
            "turn",
            "--turn-ttl",
            "3m",
            "--relay",
            "127.0.0.1:3478",
            "--relay",
            "127.0.0.2:3478",
            "--argon2-m-kib",
            "64",
            "--argon2-t",
            "1",
            "--argon2-p",
            "2",
            "--hash-concurrency",
            "3",
            "--login-failures-per-account",
            "4",
            "--login-failures-per-ip",
            "5",
            "--login-window",
            "6m",
            "--throttle-store",
            "redis://127.0.0.1:6379/1",
            "--ring-timeout",
            "7s",
            "--call-grace",
            "8s",
            "--max-ws-message",
            "4096",
            "--ws-read-buffer",
            "512",
            "--outbound-queue",
            "9",
            "--write-timeout",
            "10s",
            "--ping-interval",
            "11s",
            "--idle-timeout",
            "12s",
            "--auth-timeout",
            "13s",
            "--msg-rate",
            "14",
            "--msg-burst",
            "15",
            "--flood-close-after",
            "16",
            "--max-conns-per-ip",
            "17",
            "--max-candidates",
            "18",
            "--deny-candidate",
            "10.0.0.0/8",
            "--allow-loopback-candidates",
            "false",
            "--max-body-bytes",
            "1000",
            "--dedup-retention",
            "1d",
            "--header-timeout",
            "19s",
            "--shutdown-grace",
            "20s",
            "--log",
            "debug",
            "--log-format",
            "json",
        ]);
        let s = settings(&f).unwrap();
        assert_eq!(s.listen, "127.0.0.1:1".parse().unwrap());
        assert_eq!(s.db, Some(PathBuf::from("/tmp/x.db")));
        assert_eq!(s.store.as_deref(), Some("postgres://u:p@127.0.0.1:5/db"));
        assert!(s.store_location().is_err(), "--db and --store conflict");
        let pg = s.pg_options().unwrap();
        assert_eq!(pg.pool_size, 3);
        assert_eq!(pg.connect_timeout, Duration::from_secs(21));
        assert_eq!(pg.checkout_timeout, Duration::from_secs(22));
        assert_eq!(pg.statement_timeout, Duration::from_secs(23));
        assert_eq!((s.log.as_str(), s.log_format), ("debug", LogFormat::Json));
        assert_eq!(
            s.tls_files().unwrap(),
            Some(peerlink_signaling::config::TlsFiles {
                cert: "/tmp/c.pem".into(),
                key: "/tmp/k.pem".into()
            })
        );
        assert_eq!(
            s.cluster_ca,
            [PathBuf::from("/tmp/ca1.pem"), PathBuf::from("/tmp/ca2.pem")]
        );
        assert!(
            s.to_config()
                .unwrap_err()
                .to_string()
                .contains("/tmp/ca1.pem"),
            "a missing cluster CA file is named"
        );
        let s = Settings {
            cluster_ca: Vec::new(),
            ..s
        };
        let c = s.to_config().unwrap();
        assert_eq!(c.tls_handshake_timeout, Duration::from_secs(24));
        assert_eq!(c.stun, Some("127.0.0.1:2".parse().unwrap()));
        assert_eq!(c.stun_alt, Some("127.0.0.1:3".parse().unwrap()));
        assert_eq!(c.stun6, Some("[::1]:4".parse().unwrap()));
        assert_eq!(c.directory.as_deref(), Some("http://127.0.0.1:8500"));
        assert_eq!(c.cluster_token.as_deref(), Some("cluster-token"));
        assert_eq!((c.node_id.as_str(), c.region.as_str()), ("n7", "eu"));
        assert_eq!(c.public_url.as_deref(), Some("ws://pub"));
        assert_eq!(c.internal_url.as_deref(), Some("http://int"));
        assert_eq!(c.token_secret, SECRET.as_bytes());
        assert_eq!(c.token_issuer, "iss");
        assert_eq!(c.token_ttl, Duration::from_secs(60));
        assert_eq!(c.refresh_ttl, Duration::from_secs(7200));
        assert_eq!(c.turn_secret.as_deref(), Some(&b"turn"[..]));
        assert_eq!(c.turn_ttl, Duration::from_secs(180));
        assert_eq!(c.relays, ["127.0.0.1:3478", "127.0.0.2:3478"]);
        assert_eq!((c.argon2.m_kib, c.argon2.t, c.argon2.p), (64, 1, 2));
        assert_eq!(c.hash_concurrency, 3);
        assert_eq!(
            (c.login_failures_per_account, c.login_failures_per_ip),
            (4, 5)
        );
        assert_eq!(c.login_window, Duration::from_secs(360));
        assert_eq!(
            c.throttle_store.as_deref(),
            Some("redis://127.0.0.1:6379/1")
        );
        assert_eq!(c.ring_timeout, Duration::from_secs(7));
        assert_eq!(c.call_grace, Duration::from_secs(8));
        assert_eq!(
            (c.max_ws_message, c.ws_read_buffer, c.outbound_queue),
            (4096, 512, 9)
        );
        assert_eq!(c.write_timeout, Duration::from_secs(10));
        assert_eq!(c.ping_interval, Duration::from_secs(11));
        assert_eq!(c.idle_timeout, Duration::from_secs(12));
        assert_eq!(c.auth_timeout, Duration::from_secs(13));
        assert_eq!((c.msg_rate, c.msg_burst, c.flood_close_after), (14, 15, 16));
        assert_eq!((c.max_conns_per_ip, c.max_candidates), (17, 18));
        assert_eq!(
            c.candidates.deny,
            ["10.0.0.0/8".parse::<ipnet::IpNet>().unwrap()]
        );
        assert!(
            !c.candidates.allow_loopback,
            "the flag's false beats the loopback default"
        );
        assert_eq!(c.max_body_bytes, 1000);
        assert_eq!(c.dedup_retention, Duration::from_secs(86_400));
        assert_eq!(c.header_timeout, Duration::from_secs(19));
        assert_eq!(c.shutdown_grace, Duration::from_secs(20));
        let s = settings(&flags(&["--no-stun", "--token-secret", SECRET])).unwrap();
        assert_eq!(s.to_config().unwrap().stun, None);
        assert_eq!(s.to_config().unwrap().stun6, None);
    }

    #[test]
    fn the_ipv6_stun_responder_defaults_to_loopback_beside_a_loopback_one() {
        let c = |args: &[&str]| {
            let mut a = args.to_vec();
            a.extend(["--token-secret", SECRET]);
            settings(&flags(&a)).unwrap().to_config()
        };
        assert_eq!(c(&[]).unwrap().stun6, Some("[::1]:3479".parse().unwrap()));
        assert_eq!(
            c(&["--stun", "127.0.0.1:4000"]).unwrap().stun6,
            Some("[::1]:4000".parse().unwrap())
        );
        assert_eq!(c(&["--stun", "203.0.113.5:3479"]).unwrap().stun6, None);
        assert_eq!(
            c(&[
                "--stun",
                "203.0.113.5:3479",
                "--stun6",
                "[2001:db8::5]:3479"
            ])
            .unwrap()
            .stun6,
            Some("[2001:db8::5]:3479".parse().unwrap())
        );
        for bad in [
            &["--stun6", "127.0.0.1:3479"][..],
            &["--stun", "[::1]:3479", "--stun6", "[::1]:3480"][..],
        ] {
            let e = c(bad).unwrap_err().to_string();
            assert!(e.contains("--stun6"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn flags_override_the_file_and_lists_replace() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(
            &path,
            format!(
                "token_secret = \"{SECRET}\"\nnode_id = \"from-file\"\nring_timeout = \"45s\"\n\
                 idle_timeout = 90\ndeny_candidate = [\"100.64.0.0/10\", \"192.0.2.1\"]\n\
                 relay = [\"127.0.0.1:3478\"]\nno_stun = true\n"
            ),
        )
        .unwrap();
        let file = path.to_str().unwrap();
        let c = settings(&flags(&["--config", file]))
            .unwrap()
            .to_config()
            .unwrap();
        assert_eq!(c.node_id, "from-file");
        assert_eq!(c.ring_timeout, Duration::from_secs(45));
        assert_eq!(
            c.idle_timeout,
            Duration::from_secs(90),
            "a number of seconds"
        );
        assert_eq!(c.candidates.deny.len(), 2);
        assert_eq!(c.stun, None);
        let c = settings(&flags(&[
            "--config",
            file,
            "--node-id",
            "from-flag",
            "--deny-candidate",
            "198.51.100.0/24",
            "--ring-timeout",
            "5s",
            "--no-stun",
            "false",
        ]))
        .unwrap()
        .to_config()
        .unwrap();
        assert_eq!(c.node_id, "from-flag");
        assert_eq!(c.ring_timeout, Duration::from_secs(5));
        assert_eq!(
            c.candidates.deny,
            ["198.51.100.0/24".parse::<ipnet::IpNet>().unwrap()],
            "the flags' ranges replace the file's"
        );
        assert_eq!(
            c.relays,
            ["127.0.0.1:3478"],
            "an absent list flag keeps the file's"
        );
        assert_eq!(c.stun, Some("127.0.0.1:3479".parse().unwrap()));
        assert!(
            c.candidates.allow_loopback,
            "default: listening on loopback"
        );

        // Several directory replicas: an array in the file, repeated or comma-separated flags.
        std::fs::write(
            &path,
            format!(
                "token_secret = \"{SECRET}\"\ncluster_token = \"cluster-token\"\n\
                 directory = [\"http://127.0.0.1:8500\", \"http://127.0.0.1:8501\"]\n"
            ),
        )
        .unwrap();
        let c = settings(&flags(&["--config", file]))
            .unwrap()
            .to_config()
            .unwrap();
        assert_eq!(
            c.directory.as_deref(),
            Some("http://127.0.0.1:8500,http://127.0.0.1:8501")
        );
        let c = settings(&flags(&[
            "--config",
            file,
            "--directory",
            "http://127.0.0.1:1",
            "--directory",
            "http://127.0.0.1:2,http://127.0.0.1:3",
        ]))
        .unwrap()
        .to_config()
        .unwrap();
        assert_eq!(
            c.directory.as_deref(),
            Some("http://127.0.0.1:1,http://127.0.0.1:2,http://127.0.0.1:3")
        );
        let bad = settings(&flags(&[
            "--config",
            file,
            "--directory",
            "http://a:1,ftp://b",
        ]))
        .unwrap()
        .to_config();
        assert!(bad.is_err(), "every URL is checked");
    }

    #[test]
    fn bad_values_name_the_file_and_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        for (text, want) in [
            ("no_such_option = 1\n", "unknown key `no_such_option`"),
            (
                "ring_timeout = \"soon\"\n",
                "key `ring_timeout`: bad duration \"soon\"",
            ),
            ("relay = \"127.0.0.1:3478\"\n", "key `relay`: invalid type"),
            ("msg_rate = -1\n", "key `msg_rate`: invalid value"),
        ] {
            std::fs::write(&path, text).unwrap();
            let e = settings(&flags(&["--config", path.to_str().unwrap()])).unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.starts_with(&format!("config {}: ", path.display())),
                "{msg}"
            );
            assert!(msg.contains(want), "{text}: {msg}");
        }
        assert!(
            Flags::try_parse_from(["peerlink-signaling", "--ring-timeout", "soon"]).is_err(),
            "a bad flag duration is the parser's error"
        );
    }
}
