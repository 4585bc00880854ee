//! `peerlink-signaling`: CLI, config file and wiring only (see the library for behaviour).
//!
//! Every flag can also be set in a TOML file (`--config`, keys = flag names with `_`); flags
//! win over the file. Secrets come from the environment: `PEERLINK_TOKEN_SECRET`,
//! `PEERLINK_TURN_SECRET`, `PEERLINK_CLUSTER_TOKEN`. A bad configuration exits non-zero before
//! any socket is bound. Once bound, the binary prints `http=ADDR` and `stun=ADDR[,ADDR..]`
//! lines on stdout.

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use ipnet::IpNet;
use peerlink_cli::log::LogFormat;
use peerlink_signaling::auth::Argon2Cost;
use peerlink_signaling::serve::serve;
use peerlink_signaling::store::SqliteStore;
use peerlink_signaling::stun::StunResponder;
use peerlink_signaling::{AppState, Config, app};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

/// Command line; every field is optional so the TOML file can supply it.
#[derive(Parser, Deserialize, Debug, Default)]
#[command(
    name = "peerlink-signaling",
    version,
    about = "peerlink signaling node"
)]
#[serde(default, deny_unknown_fields)]
struct Settings {
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
    /// SQLite database path [default: peerlink-signaling.db].
    #[arg(long)]
    db: Option<PathBuf>,
    /// Directory base URL (multi-node); without it the node runs standalone.
    #[arg(long)]
    directory: Option<String>,
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
    /// http://<bound listen address>].
    #[arg(long)]
    internal_url: Option<String>,
    /// HS256 token secret, at least 32 bytes.
    #[arg(long, env = "PEERLINK_TOKEN_SECRET", hide_env_values = true)]
    token_secret: Option<String>,
    /// Token issuer [default: peerlink].
    #[arg(long)]
    token_issuer: Option<String>,
    /// Access token lifetime, e.g. 15m [default: 15m].
    #[arg(long)]
    token_ttl: Option<String>,
    /// Refresh token lifetime [default: 7d].
    #[arg(long)]
    refresh_ttl: Option<String>,
    /// TURN REST shared secret (same as the relays').
    #[arg(long, env = "PEERLINK_TURN_SECRET", hide_env_values = true)]
    turn_secret: Option<String>,
    /// TURN credential lifetime [default: 1h].
    #[arg(long)]
    turn_ttl: Option<String>,
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
    #[arg(long)]
    login_window: Option<String>,
    /// Ring timeout [default: 30s].
    #[arg(long)]
    ring_timeout: Option<String>,
    /// Keep an accepted call this long after a party's session drops without a hangup,
    /// waiting for the same device to reconnect; 0 ends it at once [default: 5s].
    #[arg(long)]
    call_grace: Option<String>,
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
    #[arg(long)]
    write_timeout: Option<String>,
    /// Ping interval [default: 20s].
    #[arg(long)]
    ping_interval: Option<String>,
    /// Idle timeout [default: 60s].
    #[arg(long)]
    idle_timeout: Option<String>,
    /// Time for the first `auth` frame of a session opened without a token [default: 10s].
    #[arg(long)]
    auth_timeout: Option<String>,
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
    #[arg(long)]
    dedup_retention: Option<String>,
    /// Complete request headers must arrive within this [default: 10s].
    #[arg(long)]
    header_timeout: Option<String>,
    /// After shutdown starts, keep answering 503 this long [default: 2s].
    #[arg(long)]
    shutdown_grace: Option<String>,
    /// Log filter in RUST_LOG syntax, e.g. `info` or `peerlink_signaling=debug,warn`
    /// [default: info].
    #[arg(long, value_name = "FILTER")]
    log: Option<String>,
    /// Log line format: `text`, or `json` (one object per line) [default: text].
    #[arg(long, value_enum, value_name = "FORMAT")]
    log_format: Option<LogFormat>,
}

/// A `--deny-candidate` value: a CIDR range, or one address.
fn parse_net(s: &str) -> anyhow::Result<IpNet> {
    let s = s.trim();
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map(|n| n.trunc())
        .map_err(|_| anyhow::anyhow!("bad --deny-candidate {s:?} (use a range like 10.0.0.0/8)"))
}

/// The HTTP listen address.
fn listen_addr(s: &Settings) -> SocketAddr {
    s.listen
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8443)))
}

macro_rules! merge {
    ($cli:ident, $file:ident, $($f:ident),*) => { $( if $cli.$f.is_none() { $cli.$f = $file.$f.take(); } )* };
}

fn load() -> anyhow::Result<(Settings, Config)> {
    let mut s = Settings::parse();
    if let Some(path) = s.config.clone() {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let mut f: Settings =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        merge!(
            s,
            f,
            listen,
            stun,
            stun_alt,
            no_stun,
            db,
            directory,
            cluster_token,
            node_id,
            public_url,
            internal_url,
            token_secret,
            token_issuer,
            token_ttl,
            refresh_ttl,
            turn_secret,
            turn_ttl,
            relay,
            argon2_m_kib,
            argon2_t,
            argon2_p,
            hash_concurrency,
            login_failures_per_account,
            login_failures_per_ip,
            login_window,
            ring_timeout,
            call_grace,
            max_ws_message,
            ws_read_buffer,
            outbound_queue,
            write_timeout,
            ping_interval,
            idle_timeout,
            auth_timeout,
            msg_rate,
            msg_burst,
            flood_close_after,
            max_conns_per_ip,
            max_candidates,
            deny_candidate,
            allow_loopback_candidates,
            max_body_bytes,
            shutdown_grace,
            header_timeout,
            dedup_retention,
            region,
            log,
            log_format
        );
    }
    let mut c = Config::default();
    let d = |v: &Option<String>, dflt: Duration| -> anyhow::Result<Duration> {
        Ok(v.as_deref()
            .map(peerlink_cli::parse_duration)
            .transpose()?
            .unwrap_or(dflt))
    };
    if let Some(v) = &s.node_id {
        c.node_id.clone_from(v);
    }
    c.token_secret = s.token_secret.clone().unwrap_or_default().into_bytes();
    if let Some(v) = &s.token_issuer {
        c.token_issuer.clone_from(v);
    }
    c.token_ttl = d(&s.token_ttl, c.token_ttl)?;
    c.refresh_ttl = d(&s.refresh_ttl, c.refresh_ttl)?;
    c.turn_secret = s.turn_secret.clone().map(String::into_bytes);
    c.turn_ttl = d(&s.turn_ttl, c.turn_ttl)?;
    c.relays = s.relay.clone().unwrap_or_default();
    c.argon2 = Argon2Cost {
        m_kib: s.argon2_m_kib.unwrap_or(c.argon2.m_kib),
        t: s.argon2_t.unwrap_or(c.argon2.t),
        p: s.argon2_p.unwrap_or(c.argon2.p),
    };
    c.hash_concurrency = s.hash_concurrency.unwrap_or(c.hash_concurrency);
    c.login_failures_per_account = s
        .login_failures_per_account
        .unwrap_or(c.login_failures_per_account);
    c.login_failures_per_ip = s.login_failures_per_ip.unwrap_or(c.login_failures_per_ip);
    c.login_window = d(&s.login_window, c.login_window)?;
    c.ring_timeout = d(&s.ring_timeout, c.ring_timeout)?;
    c.call_grace = d(&s.call_grace, c.call_grace)?;
    c.max_ws_message = s.max_ws_message.unwrap_or(c.max_ws_message);
    c.ws_read_buffer = s.ws_read_buffer.unwrap_or(c.ws_read_buffer);
    c.outbound_queue = s.outbound_queue.unwrap_or(c.outbound_queue);
    c.write_timeout = d(&s.write_timeout, c.write_timeout)?;
    c.ping_interval = d(&s.ping_interval, c.ping_interval)?;
    c.idle_timeout = d(&s.idle_timeout, c.idle_timeout)?;
    c.auth_timeout = d(&s.auth_timeout, c.auth_timeout)?;
    c.msg_rate = s.msg_rate.unwrap_or(c.msg_rate);
    c.msg_burst = s.msg_burst.unwrap_or(c.msg_burst);
    c.flood_close_after = s.flood_close_after.unwrap_or(c.flood_close_after);
    c.max_conns_per_ip = s.max_conns_per_ip.unwrap_or(c.max_conns_per_ip);
    c.max_candidates = s.max_candidates.unwrap_or(c.max_candidates);
    for cidr in s.deny_candidate.iter().flatten() {
        c.candidates.deny.push(parse_net(cidr)?);
    }
    c.candidates.allow_loopback = s
        .allow_loopback_candidates
        .unwrap_or_else(|| listen_addr(&s).ip().is_loopback());
    c.max_body_bytes = s.max_body_bytes.unwrap_or(c.max_body_bytes);
    c.shutdown_grace = d(&s.shutdown_grace, c.shutdown_grace)?;
    c.header_timeout = d(&s.header_timeout, c.header_timeout)?;
    c.dedup_retention = d(&s.dedup_retention, c.dedup_retention)?;
    c.directory.clone_from(&s.directory);
    c.cluster_token.clone_from(&s.cluster_token);
    c.public_url.clone_from(&s.public_url);
    if let Some(r) = &s.region {
        c.region.clone_from(r);
    }
    c.internal_url.clone_from(&s.internal_url);
    c.stun = if s.no_stun.unwrap_or(false) {
        None
    } else {
        Some(
            s.stun.unwrap_or(
                c.stun
                    .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 3479))),
            ),
        )
    };
    c.stun_alt = s.stun_alt;
    c.validate()?;
    Ok((s, c))
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (settings, cfg) = match load() {
        Ok(x) => x,
        Err(e) => {
            eprintln!("peerlink-signaling: {e:#}");
            std::process::exit(2);
        }
    };
    if let Err(e) = peerlink_cli::log::init(
        settings.log.as_deref().unwrap_or("info"),
        settings.log_format.unwrap_or_default(),
    ) {
        eprintln!("peerlink-signaling: {e}");
        std::process::exit(2);
    }
    let db_path = settings
        .db
        .clone()
        .unwrap_or_else(|| PathBuf::from("peerlink-signaling.db"));
    let store =
        SqliteStore::open(&db_path).with_context(|| format!("opening {}", db_path.display()))?;
    let (stun_addr, stun_alt) = (cfg.stun, cfg.stun_alt);
    let listen = listen_addr(&settings);

    // Bind everything, then announce.
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let http_addr = listener.local_addr()?;
    let mut cfg = cfg;
    if cfg.directory.is_some() && cfg.internal_url.is_none() {
        cfg.internal_url = Some(
            cfg.public_url
                .clone()
                .unwrap_or_else(|| format!("http://{http_addr}")),
        );
    }
    let state = AppState::new(cfg, Arc::new(store)).context("building node state")?;
    let stun = match stun_addr {
        Some(a) => Some(StunResponder::bind(a, stun_alt).await?),
        None => None,
    };
    if let Some(c) = state.cluster.as_ref() {
        c.start(state.hub.clone());
        if !c.wait_registered(Duration::from_secs(5)).await {
            tracing::warn!("directory registration not confirmed yet; retrying in the background");
        }
    }
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "http={http_addr}")?;
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
    tracing::info!(%http_addr, "peerlink-signaling listening");

    let stop = CancellationToken::new();
    if let Some(s) = stun {
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
    let server = tokio::spawn(serve(listener, router, header_timeout, server_stop));

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
