//! `peerlink-relay`: command line, configuration and wiring only (logic lives in the library).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use peerlink_relay::config::{Config, IoMode};
use peerlink_relay::server::{self, Exit};
use peerlink_relay::stats_client;

/// peerlink TURN relay (RFC 8656 over UDP, TCP and TLS) with io_uring and epoll backends.
#[derive(Parser, Debug)]
#[command(
    name = "peerlink-relay",
    version,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Print live latency percentiles and counters from a running relay's /stats.
    Stats {
        /// Refresh every second until interrupted.
        #[arg(long)]
        watch: bool,
        /// The relay's metrics address.
        #[arg(long, default_value = "127.0.0.1:9641")]
        metrics: SocketAddr,
    },
}

/// Every flag overrides the same key of the config file (see `Config` for defaults).
#[derive(Args, Debug)]
struct RunArgs {
    /// TOML config file; flags override its keys.
    #[arg(long)]
    config: Option<PathBuf>,
    /// TURN/STUN UDP listen address [default 0.0.0.0:3478].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Relayed sockets bind here; repeat for more relayed addresses (allocations take the
    /// addresses of their family in turn) [default: the listen IP].
    #[arg(long)]
    relay_ip: Vec<IpAddr>,
    /// REALM [default peerlink].
    #[arg(long)]
    realm: Option<String>,
    /// TURN REST shared secret(s), comma-separated for rotation.
    #[arg(
        long,
        env = "PEERLINK_RELAY_AUTH_SECRET",
        value_delimiter = ',',
        hide_env_values = true
    )]
    auth_secret: Vec<String>,
    /// Static user NAME:PASSWORD (repeatable).
    #[arg(long)]
    user: Vec<String>,
    /// Peer range allowed even where the built-in policy denies it (repeatable).
    #[arg(long)]
    allow_peer: Vec<ipnet::IpNet>,
    /// Extra peer range denied (repeatable).
    #[arg(long)]
    deny_peer: Vec<ipnet::IpNet>,
    /// Worker threads [default: available cores].
    #[arg(long)]
    workers: Option<usize>,
    /// I/O backend [default auto].
    #[arg(long, value_enum)]
    io: Option<IoMode>,
    /// Metrics/health HTTP address [default 127.0.0.1:9641].
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Lowest relayed port [default 49152].
    #[arg(long)]
    min_port: Option<u16>,
    /// Highest relayed port [default 65535].
    #[arg(long)]
    max_port: Option<u16>,
    /// Allocation cap over all workers [default 100000].
    #[arg(long)]
    max_allocations: Option<usize>,
    /// Allocations per username [default 100].
    #[arg(long)]
    user_quota: Option<usize>,
    /// Seconds a drain waits for allocations to end [default 30].
    #[arg(long)]
    drain_timeout: Option<u64>,
    /// Write an HdrHistogram interval log (V2 compressed) of in-relay latency here.
    #[arg(long)]
    histogram_log: Option<PathBuf>,
    /// Log filter in RUST_LOG syntax, e.g. `info` or `peerlink_relay=debug,warn` [default info].
    #[arg(long = "log", alias = "log-level", value_name = "FILTER")]
    log_level: Option<String>,
    /// Log line format: `text`, or `json` (one object per line) [default text].
    #[arg(long, value_enum, value_name = "FORMAT")]
    log_format: Option<peerlink_cli::log::LogFormat>,
    /// Accept ChannelBind numbers up to 0x7FFF (RFC 5766 clients such as coturn's uclient).
    #[arg(long)]
    legacy_channel_range: bool,
    /// Provided receive buffers per io_uring worker (power of two) [default 1024].
    #[arg(long)]
    uring_buffers: Option<u32>,
    /// Poll this many µs after a wake-up that handled datagrams before sleeping (0..=1000;
    /// lower latency while traffic flows, more CPU) [default 0].
    #[arg(long)]
    busy_poll_us: Option<u32>,
    /// peerlink directory base URL (http://HOST:PORT): register and heartbeat there.
    #[arg(long)]
    directory: Option<String>,
    /// Cluster bearer token for the directory.
    #[arg(long, env = "PEERLINK_CLUSTER_TOKEN", hide_env_values = true)]
    cluster_token: Option<String>,
    /// Relay id announced to the directory [default HOSTNAME-LISTENPORT].
    #[arg(long)]
    relay_id: Option<String>,
    /// Region announced to the directory [default local].
    #[arg(long)]
    region: Option<String>,
    /// TURN address clients should use, announced to the directory [default: the listen address].
    #[arg(long)]
    public_addr: Option<SocketAddr>,
    /// TURN over TCP listen address (repeatable) [default none].
    #[arg(long)]
    listen_tcp: Vec<SocketAddr>,
    /// TURN over TLS listen address, e.g. 0.0.0.0:443 (repeatable; needs --tls-cert and
    /// --tls-key) [default none].
    #[arg(long)]
    listen_tls: Vec<SocketAddr>,
    /// PEM certificate chain for the TLS listeners (re-read on SIGHUP).
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// PEM private key for the TLS listeners (re-read on SIGHUP).
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// TCP and TLS client connections over all workers [default 10000].
    #[arg(long)]
    max_stream_connections: Option<usize>,
    /// Seconds a TLS handshake may take [default 10].
    #[arg(long)]
    stream_handshake_timeout: Option<u64>,
    /// Seconds a TCP/TLS connection without an allocation may go without a request [default 30].
    #[arg(long)]
    stream_idle_timeout: Option<u64>,
    /// Seconds a frame begun on a TCP/TLS connection may take to complete [default 10].
    #[arg(long)]
    stream_stall_timeout: Option<u64>,
}

fn build_config(a: RunArgs) -> anyhow::Result<Config> {
    let mut c = match &a.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    macro_rules! set {
        ($($field:ident <- $arg:ident),* $(,)?) => { $(if let Some(v) = a.$arg { c.$field = v; })* };
    }
    macro_rules! set_vec {
        ($($field:ident <- $arg:ident),* $(,)?) => { $(if !a.$arg.is_empty() { c.$field = a.$arg; })* };
    }
    set!(listen <- listen, realm <- realm, io <- io, metrics <- metrics, min_port <- min_port,
         max_port <- max_port, max_allocations <- max_allocations, user_quota <- user_quota,
         drain_timeout <- drain_timeout, log_level <- log_level, log_format <- log_format, uring_buffers <- uring_buffers,
         busy_poll_us <- busy_poll_us, region <- region,
         max_stream_connections <- max_stream_connections,
         stream_handshake_timeout <- stream_handshake_timeout,
         stream_idle_timeout <- stream_idle_timeout, stream_stall_timeout <- stream_stall_timeout);
    macro_rules! set_opt {
        ($($field:ident <- $arg:ident),* $(,)?) => { $(if a.$arg.is_some() { c.$field = a.$arg; })* };
    }
    set_opt!(directory <- directory, cluster_token <- cluster_token, relay_id <- relay_id,
             public_addr <- public_addr, tls_cert <- tls_cert, tls_key <- tls_key);
    if a.legacy_channel_range {
        c.legacy_channel_range = true;
    }
    if let Some(w) = a.workers {
        c.workers = Some(w);
    }
    if let Some(p) = a.histogram_log {
        c.histogram_log = Some(p);
    }
    set_vec!(relay_ip <- relay_ip, auth_secrets <- auth_secret, users <- user,
             allow_peers <- allow_peer, deny_peers <- deny_peer, listen_tcp <- listen_tcp,
             listen_tls <- listen_tls);
    Ok(c)
}

fn stats(watch: bool, metrics: SocketAddr) -> anyhow::Result<()> {
    loop {
        let s = stats_client::fetch(metrics, Duration::from_secs(5))
            .with_context(|| format!("fetching /stats from {metrics}"))?;
        print!("{}", stats_client::format(&s));
        if !watch {
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(1));
        println!();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Cmd::Stats { watch, metrics }) = cli.cmd {
        return match stats(watch, metrics) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("peerlink-relay stats: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    // Configuration is read and validated completely before any socket is bound.
    let validated = match build_config(cli.run).and_then(|c| Ok(c.validate()?)) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("peerlink-relay: {e:#}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) =
        peerlink_cli::log::init(&validated.config.log_level, validated.config.log_format)
    {
        eprintln!("peerlink-relay: {e}");
        return ExitCode::from(2);
    }
    match server::run(validated) {
        Ok(exit) => {
            tracing::info!(?exit, "peerlink-relay stopped");
            debug_assert!(matches!(
                exit,
                Exit::Interrupted | Exit::Drained | Exit::DrainTimeout
            ));
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("peerlink-relay: {e}");
            eprintln!("peerlink-relay: {e}");
            ExitCode::FAILURE
        }
    }
}
