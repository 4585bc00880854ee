//! `peerlink-directory`: CLI, configuration and wiring of the directory service.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use peerlink_cli::log::LogArgs;
use peerlink_directory::clock::{Clock, SystemClock};
use peerlink_directory::config::{
    self, OPERATOR_TOKEN_ENV, STORE_ENV, Settings, StoreLocation, TOKEN_ENV,
};
use peerlink_directory::console::{self, Beacon, Console, view::ReplicaRecord};
use peerlink_directory::memory::MemoryStore;
use peerlink_directory::redis_store::{RedisClock, RedisStore};
use peerlink_directory::server::{AppState, Sweeper, app, sweep_interval};
use peerlink_directory::store::DirectoryStore;
use tracing::{info, warn};

// Each setting flag serializes to the key of the same name in the config file, unset ones to
// nothing (`peerlink_cli::config`: the file, then the environment, then the flags).
/// peerlink directory: presence, signaling-node and relay registry, relay choice.
#[derive(Debug, Parser, serde::Serialize)]
#[command(version, about)]
struct Cli {
    /// Listen address [default: 127.0.0.1:8500].
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Shared cluster token (bearer); better given through the environment.
    #[arg(long, env = TOKEN_ENV, hide_env_values = true)]
    cluster_token: Option<String>,
    /// Presence TTL in seconds (or a duration: 30s, 1m) [default: 30].
    #[arg(long, value_parser = peerlink_cli::parse_duration)]
    #[serde(with = "peerlink_cli::config::duration::option")]
    presence_ttl: Option<Duration>,
    /// Node and relay liveness TTL in seconds (or a duration) [default: 10].
    #[arg(long, value_parser = peerlink_cli::parse_duration)]
    #[serde(with = "peerlink_cli::config::duration::option")]
    node_ttl: Option<Duration>,
    /// Relay-choice RNG seed [default: OS entropy].
    #[arg(long)]
    #[serde(serialize_with = "config::seed::serialize")]
    seed: Option<u64>,
    /// Whole-request timeout in seconds (or a duration) [default: 10].
    #[arg(long, value_parser = peerlink_cli::parse_duration)]
    #[serde(with = "peerlink_cli::config::duration::option")]
    request_timeout: Option<Duration>,
    /// Request body limit in bytes [default: 2 MiB].
    #[arg(long)]
    body_limit: Option<usize>,
    /// Where state lives: memory, or redis://[user:password@]HOST:PORT[/DB][?prefix=P] shared
    /// by every replica on it [default: memory].
    #[arg(long, env = STORE_ENV, hide_env_values = true)]
    store: Option<String>,
    /// Redis: bound of one connection attempt and of one command's answer [default: 2s].
    #[arg(long, value_parser = peerlink_cli::parse_duration)]
    #[serde(with = "peerlink_cli::config::duration::option")]
    store_timeout: Option<Duration>,
    /// Operator token of the fleet console at /console (off without one); better given
    /// through the environment or a file.
    #[arg(long, env = OPERATOR_TOKEN_ENV, hide_env_values = true)]
    operator_token: Option<String>,
    /// File whose first line is the operator token of the fleet console.
    #[arg(long)]
    operator_token_file: Option<PathBuf>,
    /// TOML config file; flags override its values.
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Logging [default filter: $RUST_LOG, else info].
    #[command(flatten)]
    #[serde(skip)]
    log: LogArgs,
}

/// The config file, then the environment, then the flags; validated.
fn load(cli: &Cli) -> Result<config::Config, config::ConfigError> {
    peerlink_cli::config::load::<Settings>(cli.config.as_deref(), cli)?.validate()
}

/// Exit status of a refused configuration or an unreachable store at start.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = peerlink_cli::log::init(
        &cli.log.filter("RUST_LOG", "info"),
        cli.log.log_format.unwrap_or_default(),
    ) {
        eprintln!("peerlink-directory: {e:#}");
        return ExitCode::from(EXIT_CONFIG);
    }
    // Validated before any socket is bound: bad config exits here.
    let cfg = match load(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("peerlink-directory: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("peerlink-directory: starting the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Exit::Config(e)) => {
            eprintln!("peerlink-directory: {e:#}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(Exit::Failed(e)) => {
            eprintln!("peerlink-directory: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Why the service ended.
enum Exit {
    /// Before binding: the store could not be opened (exit 2).
    Config(anyhow::Error),
    /// While serving (exit 1).
    Failed(anyhow::Error),
}

/// Open the store (Redis must answer now: nothing is bound before it does), then serve.
async fn run(cfg: config::Config) -> Result<(), Exit> {
    match &cfg.location {
        StoreLocation::Memory => {
            let store = Arc::new(MemoryStore::new(cfg.store));
            serve(&cfg, store, Arc::new(SystemClock::new()))
                .await
                .map_err(Exit::Failed)
        }
        StoreLocation::Redis(location) => {
            let shown = location.redacted();
            let store = RedisStore::connect(location.clone(), cfg.store, cfg.redis)
                .await
                .map(Arc::new)
                .map_err(|e| Exit::Config(anyhow::anyhow!("store {shown}: {e}")))?;
            let clock = RedisClock::anchored(&store)
                .await
                .map_err(|e| Exit::Config(anyhow::anyhow!("store {shown}: {e}")))?;
            let _resync = clock.spawn_resync(store.clone());
            info!(store = %shown, "redis store open");
            serve(&cfg, store, clock).await.map_err(Exit::Failed)
        }
    }
}

async fn serve<S: DirectoryStore>(
    cfg: &config::Config,
    store: Arc<S>,
    clock: Arc<dyn Clock>,
) -> anyhow::Result<()> {
    let mut state = AppState::new(store, clock, cfg.store, cfg.limits, &cfg.cluster_token);
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    let local = listener.local_addr().context("reading the bound address")?;
    let replica_id = console::replica_id(local);
    let console = cfg
        .operator_token
        .as_deref()
        .map(|t| Arc::new(Console::new(t, &replica_id)));
    if let Some(c) = &console {
        state = state.with_console(c.clone());
        info!(url = %format!("http://{local}/console"), "fleet console on");
    }
    let sweeper = Sweeper::spawn(state.clone(), sweep_interval(&cfg.store));
    let _beacon = Beacon::spawn(
        state.clone(),
        ReplicaRecord {
            replica_id,
            listen: local.to_string(),
            store: match cfg.location {
                StoreLocation::Memory => "memory",
                StoreLocation::Redis(_) => "redis",
            }
            .to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            console: console.is_some(),
        },
    );
    info!(%local, store = %cfg.location.redacted(), presence_ttl = ?cfg.store.presence_ttl, node_ttl = ?cfg.store.node_ttl, "directory listening");
    // Machine-readable readiness line for launchers and tests.
    println!("listening on {local}");
    let streams = console.clone();
    axum::serve(listener, app(state))
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            // Event streams never end by themselves: end them so the shutdown can finish.
            if let Some(c) = streams {
                c.close_streams();
            }
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("peerlink-directory").chain(args.iter().copied()))
            .unwrap()
    }

    #[test]
    fn every_flag_sets_its_key_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("directory.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:9000\"\ncluster_token = \"file-token\"\npresence_ttl = 5\n\
             node_ttl = 2.5\nseed = 7\nrequest_timeout = 3\nbody_limit = 2048\n",
        )
        .unwrap();
        let file = path.to_str().unwrap();
        let cfg = load(&cli(&["--config", file, "--cluster-token", "file-token"])).unwrap();
        assert_eq!(cfg.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(cfg.store.node_ttl, Duration::from_millis(2500));
        assert_eq!(cfg.limits.body_limit, 2048);
        let cfg = load(&cli(&[
            "--config",
            file,
            "--listen",
            "127.0.0.1:9001",
            "--cluster-token",
            "flag-token",
            "--presence-ttl",
            "1.5",
            "--node-ttl",
            "2s",
            "--seed",
            "18446744073709551615",
            "--request-timeout",
            "1m",
            "--body-limit",
            "4096",
            "--store",
            "redis://127.0.0.1:6379/1?prefix=f",
            "--store-timeout",
            "750ms",
        ]))
        .unwrap();
        assert_eq!(cfg.listen, "127.0.0.1:9001".parse().unwrap());
        assert_eq!(cfg.cluster_token, "flag-token");
        assert_eq!(cfg.store.presence_ttl, Duration::from_millis(1500));
        assert_eq!(cfg.store.node_ttl, Duration::from_secs(2));
        assert_eq!(cfg.store.seed, Some(u64::MAX));
        assert_eq!(cfg.limits.request_timeout, Duration::from_secs(60));
        assert_eq!(cfg.limits.body_limit, 4096);
        assert_eq!(cfg.location.redacted(), "redis://127.0.0.1:6379/1?prefix=f");
        assert_eq!(cfg.redis.response_timeout, Duration::from_millis(750));
    }

    #[test]
    fn bad_values_name_their_origin() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("directory.toml");
        std::fs::write(&path, "nodettl = 1\n").unwrap();
        let e = load(&cli(&["--config", path.to_str().unwrap()])).unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("config {}: unknown key `nodettl`", path.display())),
            "{e}"
        );
        for args in [
            &["--node-ttl", "ten"][..],
            &["--presence-ttl", "-1"],
            &["--seed", "-1"],
        ] {
            let argv = std::iter::once("peerlink-directory").chain(args.iter().copied());
            assert!(Cli::try_parse_from(argv).is_err(), "{args:?}");
        }
        let e = load(&cli(&["--cluster-token", "0123456789", "--node-ttl", "0"])).unwrap_err();
        assert!(e.to_string().contains("node_ttl must be between"), "{e}");
    }
}
