//! `peerlink-directory`: CLI, configuration and wiring of the directory service.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use peerlink_cli::log::LogArgs;
use peerlink_directory::clock::SystemClock;
use peerlink_directory::config::{FileConfig, TOKEN_ENV};
use peerlink_directory::memory::MemoryStore;
use peerlink_directory::server::{AppState, Sweeper, app, sweep_interval};
use tracing::{info, warn};

/// peerlink directory: presence, signaling-node and relay registry, relay choice.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Listen address [default: 127.0.0.1:8500].
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Shared cluster token (bearer); better given through the environment.
    #[arg(long, env = TOKEN_ENV, hide_env_values = true)]
    cluster_token: Option<String>,
    /// Presence TTL in seconds [default: 30].
    #[arg(long)]
    presence_ttl: Option<f64>,
    /// Node and relay liveness TTL in seconds [default: 10].
    #[arg(long)]
    node_ttl: Option<f64>,
    /// Relay-choice RNG seed [default: OS entropy].
    #[arg(long)]
    seed: Option<u64>,
    /// Whole-request timeout in seconds [default: 10].
    #[arg(long)]
    request_timeout: Option<f64>,
    /// Request body limit in bytes [default: 2 MiB].
    #[arg(long)]
    body_limit: Option<usize>,
    /// TOML config file; flags override its values.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Logging [default filter: $RUST_LOG, else info].
    #[command(flatten)]
    log: LogArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    peerlink_cli::log::init(
        &cli.log.filter("RUST_LOG", "info"),
        cli.log.log_format.unwrap_or_default(),
    )?;
    let file = match &cli.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let flags = FileConfig {
        listen: cli.listen,
        cluster_token: cli.cluster_token,
        presence_ttl: cli.presence_ttl,
        node_ttl: cli.node_ttl,
        seed: cli.seed,
        request_timeout: cli.request_timeout,
        body_limit: cli.body_limit,
    };
    // Validated before any socket is bound: bad config exits non-zero here.
    let cfg = file.merge(flags).finish()?;
    let rt = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    rt.block_on(serve(cfg))
}

async fn serve(cfg: peerlink_directory::config::Config) -> anyhow::Result<()> {
    let store = Arc::new(MemoryStore::new(cfg.store));
    let state = AppState::new(
        store,
        Arc::new(SystemClock::new()),
        cfg.store,
        cfg.limits,
        &cfg.cluster_token,
    );
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    let local = listener.local_addr().context("reading the bound address")?;
    let sweeper = Sweeper::spawn(state.clone(), sweep_interval(&cfg.store));
    info!(%local, presence_ttl = ?cfg.store.presence_ttl, node_ttl = ?cfg.store.node_ttl, "directory listening");
    // Machine-readable readiness line for launchers and tests.
    println!("listening on {local}");
    axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("serving HTTP")?;
    sweeper.stop().await;
    info!("directory stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            warn!(error = %e, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => info!("ctrl-c: shutting down"),
        () = term => info!("SIGTERM: shutting down"),
    }
}
