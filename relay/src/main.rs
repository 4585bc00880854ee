//! `peerlink-relay`: command line, configuration and wiring only (logic lives in the library).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use peerlink_relay::config::{Config, ConfigError, IoMode};
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

/// Every flag overrides the same key of the config file (see `Config` for defaults): it
/// serializes to that key, unset flags to nothing (`peerlink_cli::config`).
#[derive(Args, Debug, serde::Serialize)]
struct RunArgs {
    /// TOML config file; flags override its keys.
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// TURN/STUN UDP listen address [default 0.0.0.0:3478].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Relayed sockets bind here; repeat for more relayed addresses (allocations take the
    /// addresses of their family in turn) [default: the listen IP].
    #[arg(long)]
    #[serde(skip_serializing_if = "Vec::is_empty")]
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
    #[serde(rename = "auth_secrets", skip_serializing_if = "Vec::is_empty")]
    auth_secret: Vec<String>,
    /// Static user NAME:PASSWORD (repeatable).
    #[arg(long)]
    #[serde(rename = "users", skip_serializing_if = "Vec::is_empty")]
    user: Vec<String>,
    /// Peer range allowed even where the built-in policy denies it (repeatable).
    #[arg(long)]
    #[serde(rename = "allow_peers", skip_serializing_if = "Vec::is_empty")]
    allow_peer: Vec<ipnet::IpNet>,
    /// Extra peer range denied (repeatable).
    #[arg(long)]
    #[serde(rename = "deny_peers", skip_serializing_if = "Vec::is_empty")]
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
    /// Seconds a drain waits for allocations to end (or a duration: 30s, 2m) [default 30].
    #[arg(long, value_parser = peerlink_cli::parse_duration)]
    #[serde(with = "peerlink_cli::config::duration::option")]
    drain_timeout: Option<Duration>,
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
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    legacy_channel_range: bool,
    /// Answers to unauthenticated requests (401) per source IP and second, per worker; bounds
    /// how fast clients behind one NAT address start [default 2000].
    #[arg(long)]
    unauth_rate: Option<u32>,
    /// Burst of answers to unauthenticated requests per source IP, per worker [default 2000].
    #[arg(long)]
    unauth_burst: Option<u32>,
    /// How long a nonce stays valid (600s, 1h, or seconds) [default 600s].
    #[arg(long, value_parser = peerlink_cli::parse_duration)]
    #[serde(with = "peerlink_cli::config::duration::option")]
    nonce_lifetime: Option<Duration>,
    /// Provided receive buffers per io_uring worker (power of two) [default 1024].
    #[arg(long)]
    uring_buffers: Option<u32>,
    /// Poll this many µs after a wake-up that handled datagrams before sleeping (0..=1000;
    /// lower latency while traffic flows, more CPU) [default 0].
    #[arg(long)]
    busy_poll_us: Option<u32>,
    /// peerlink directory base URL (http://HOST:PORT): register and heartbeat there; repeat
    /// or separate with commas for several replicas (failover).
    #[arg(long, value_delimiter = ',')]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    directory: Vec<String>,
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
    #[serde(skip_serializing_if = "Vec::is_empty")]
    listen_tcp: Vec<SocketAddr>,
    /// TURN over TLS listen address, e.g. 0.0.0.0:443 (repeatable; needs --tls-cert and
    /// --tls-key) [default none].
    #[arg(long)]
    #[serde(skip_serializing_if = "Vec::is_empty")]
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
    /// How long a TLS handshake may take (10s, or seconds) [default 10s].
    #[arg(long, value_parser = peerlink_cli::parse_duration)]
    #[serde(with = "peerlink_cli::config::duration::option")]
    stream_handshake_timeout: Option<Duration>,
    /// How long a TCP/TLS connection without an allocation may go without a request
    /// [default 30s].
    #[arg(long, value_parser = peerlink_cli::parse_duration)]
    #[serde(with = "peerlink_cli::config::duration::option")]
    stream_idle_timeout: Option<Duration>,
    /// How long a frame begun on a TCP/TLS connection may take to complete [default 10s].
    #[arg(long, value_parser = peerlink_cli::parse_duration)]
    #[serde(with = "peerlink_cli::config::duration::option")]
    stream_stall_timeout: Option<Duration>,
}

/// The config file, then the environment, then the flags (`peerlink_cli::config::load`).
fn build_config(a: &RunArgs) -> Result<Config, ConfigError> {
    Ok(peerlink_cli::config::load(a.config.as_deref(), a)?)
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
    let validated = match build_config(&cli.run).and_then(Config::validate) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(args: &[&str]) -> RunArgs {
        let cli =
            Cli::try_parse_from(std::iter::once("peerlink-relay").chain(args.iter().copied()))
                .unwrap();
        assert!(cli.cmd.is_none());
        cli.run
    }

    #[test]
    fn directory_takes_several_urls_repeated_or_comma_separated() {
        let base = [
            "--listen",
            "127.0.0.1:3478",
            "--user",
            "a:b",
            "--cluster-token",
            "tok-tok-tok",
        ];
        let with = |extra: &[&str]| {
            let args: Vec<&str> = base.iter().chain(extra).copied().collect();
            build_config(&run_args(&args)).unwrap()
        };
        let c = with(&[
            "--directory",
            "http://a:1",
            "--directory",
            "http://b:2,http://c:3",
        ]);
        assert_eq!(
            c.directory.as_deref(),
            Some("http://a:1,http://b:2,http://c:3")
        );
        let v = c.validate().unwrap();
        assert_eq!(v.directory.unwrap().client.base_urls().len(), 3);
        assert!(with(&[]).directory.is_none());
        let bad = with(&["--directory", "http://a:1,https://b:2"]);
        assert!(bad.validate().is_err(), "every URL is checked");
    }

    #[test]
    fn every_flag_sets_its_config_key() {
        // Every flag given once (the environment variables may fill auth_secret and
        // cluster_token; the flags win over them).
        let a = run_args(&[
            "--listen",
            "127.0.0.1:4000",
            "--relay-ip",
            "127.0.0.2",
            "--relay-ip",
            "::1",
            "--realm",
            "r",
            "--auth-secret",
            "s1,s2",
            "--user",
            "a:b",
            "--user",
            "c:d",
            "--allow-peer",
            "10.0.0.0/8",
            "--deny-peer",
            "192.0.2.0/24",
            "--workers",
            "3",
            "--io",
            "epoll",
            "--metrics",
            "127.0.0.1:4001",
            "--min-port",
            "50000",
            "--max-port",
            "50100",
            "--max-allocations",
            "7",
            "--user-quota",
            "2",
            "--drain-timeout",
            "1m",
            "--histogram-log",
            "/tmp/h.hlog",
            "--log-level",
            "debug",
            "--log-format",
            "json",
            "--legacy-channel-range",
            "--uring-buffers",
            "64",
            "--busy-poll-us",
            "50",
            "--directory",
            "http://127.0.0.1:8500",
            "--cluster-token",
            "tok-tok-tok",
            "--relay-id",
            "r1",
            "--region",
            "eu",
            "--public-addr",
            "127.0.0.1:4000",
            "--listen-tcp",
            "127.0.0.1:4443",
            "--listen-tls",
            "127.0.0.1:4444",
            "--tls-cert",
            "/tmp/c.pem",
            "--tls-key",
            "/tmp/k.pem",
            "--max-stream-connections",
            "9",
            "--stream-handshake-timeout",
            "3s",
            "--stream-idle-timeout",
            "4",
            "--stream-stall-timeout",
            "2s",
        ]);
        let mut c = build_config(&a).unwrap();
        assert_eq!(
            c.listen_tcp,
            vec!["127.0.0.1:4443".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(
            c.listen_tls,
            vec!["127.0.0.1:4444".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(
            c.tls_cert.as_deref(),
            Some(std::path::Path::new("/tmp/c.pem"))
        );
        assert_eq!(
            c.tls_key.as_deref(),
            Some(std::path::Path::new("/tmp/k.pem"))
        );
        assert_eq!(c.max_stream_connections, 9);
        assert_eq!(c.stream_handshake_timeout, Duration::from_secs(3));
        assert_eq!(c.stream_idle_timeout, Duration::from_secs(4));
        assert_eq!(c.stream_stall_timeout, Duration::from_secs(2));
        assert_eq!(c.listen, "127.0.0.1:4000".parse().unwrap());
        assert_eq!(
            c.relay_ip,
            [
                "127.0.0.2".parse::<IpAddr>().unwrap(),
                "::1".parse().unwrap()
            ]
        );
        assert_eq!(c.realm, "r");
        assert_eq!(c.auth_secrets, ["s1", "s2"]);
        assert_eq!(c.users, ["a:b", "c:d"]);
        assert_eq!(
            c.allow_peers,
            ["10.0.0.0/8".parse::<ipnet::IpNet>().unwrap()]
        );
        assert_eq!(
            c.deny_peers,
            ["192.0.2.0/24".parse::<ipnet::IpNet>().unwrap()]
        );
        assert_eq!(c.workers, Some(3));
        assert_eq!(c.io, IoMode::Epoll);
        assert_eq!(c.metrics, "127.0.0.1:4001".parse().unwrap());
        assert_eq!((c.min_port, c.max_port), (50000, 50100));
        assert_eq!((c.max_allocations, c.user_quota), (7, 2));
        assert_eq!(c.drain_timeout, Duration::from_secs(60));
        assert_eq!(
            c.histogram_log.as_deref(),
            Some(std::path::Path::new("/tmp/h.hlog"))
        );
        assert_eq!(c.log_level, "debug");
        assert_eq!(c.log_format, peerlink_cli::log::LogFormat::Json);
        assert!(c.legacy_channel_range);
        assert_eq!((c.uring_buffers, c.busy_poll_us), (64, 50));
        assert_eq!(c.directory.as_deref(), Some("http://127.0.0.1:8500"));
        assert_eq!(c.cluster_token.as_deref(), Some("tok-tok-tok"));
        assert_eq!(c.relay_id.as_deref(), Some("r1"));
        assert_eq!(c.region, "eu");
        assert_eq!(c.public_addr, Some("127.0.0.1:4000".parse().unwrap()));
        // The TLS files named above do not exist; TLS validation is tested in `config`.
        c.listen_tls.clear();
        (c.tls_cert, c.tls_key) = (None, None);
        c.validate().unwrap();
    }

    #[test]
    fn flags_override_the_file_key_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:3478\"\nrealm = \"filerealm\"\nusers = [\"f:1\", \"g:2\"]\n\
             allow_peers = [\"10.0.0.0/8\"]\nio = \"epoll\"\ndrain_timeout = 5\n\
             legacy_channel_range = true\nmax_lifetime = \"2h\"\nrest_max_ttl = 600\n\
             unauth_rate = 50\nunauth_burst = 70\nnonce_lifetime = \"1h\"\n",
        )
        .unwrap();
        let file = path.to_str().unwrap();
        let c = build_config(&run_args(&["--config", file])).unwrap();
        assert_eq!(c.realm, "filerealm");
        assert_eq!(c.users, ["f:1", "g:2"]);
        assert_eq!(c.io, IoMode::Epoll);
        assert_eq!(
            c.drain_timeout,
            Duration::from_secs(5),
            "integer seconds, as before"
        );
        assert_eq!(c.max_lifetime, Duration::from_secs(7200));
        assert_eq!(c.rest_max_ttl, Duration::from_secs(600));
        assert!(c.legacy_channel_range);
        assert_eq!((c.unauth_rate, c.unauth_burst), (50, 70));
        assert_eq!(c.nonce_lifetime, Duration::from_secs(3600));
        assert_eq!(c.min_port, 49152, "a key in neither keeps its default");

        let c = build_config(&run_args(&[
            "--config",
            file,
            "--io",
            "uring",
            "--user",
            "c:3",
            "--drain-timeout",
            "90",
            "--unauth-burst",
            "5000",
        ]))
        .unwrap();
        assert_eq!(c.unauth_burst, 5000);
        assert_eq!(c.unauth_rate, 50, "the file's value where no flag is given");
        assert_eq!(c.io, IoMode::Uring);
        assert_eq!(c.users, ["c:3"], "a repeated flag replaces the file's list");
        assert_eq!(c.drain_timeout, Duration::from_secs(90));
        assert_eq!(c.realm, "filerealm");
        assert_eq!(
            c.allow_peers.len(),
            1,
            "an absent list flag keeps the file's list"
        );
        assert!(
            c.legacy_channel_range,
            "an absent switch keeps the file's true"
        );
    }

    #[test]
    fn bad_file_values_name_the_file_and_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.toml");
        for (text, want) in [
            ("lisen = \"1.2.3.4:5\"\n", "unknown key `lisen`"),
            (
                "listen = \"nope\"\n",
                "key `listen`: invalid socket address syntax",
            ),
            (
                "drain_timeout = \"soon\"\n",
                "key `drain_timeout`: bad duration \"soon\"",
            ),
            (
                "drain_timeout = -1\n",
                "key `drain_timeout`: bad duration -1",
            ),
            ("users = \"a:b\"\n", "key `users`: invalid type"),
            ("user = [\"a:b\"]\n", "unknown key `user`"),
        ] {
            std::fs::write(&path, text).unwrap();
            let e = build_config(&run_args(&["--config", path.to_str().unwrap()])).unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.starts_with(&format!("config {}: ", path.display())),
                "{text}: {msg}"
            );
            assert!(msg.contains(want), "{text}: {msg}");
        }
    }

    #[test]
    fn bad_flag_values_are_refused_by_the_parser() {
        for args in [
            &["--drain-timeout", "soon"][..],
            &["--drain-timeout", "-5"],
            &["--listen", "999.1.1.1:3478"],
            &["--io", "kqueue"],
        ] {
            let argv = std::iter::once("peerlink-relay").chain(args.iter().copied());
            assert!(Cli::try_parse_from(argv).is_err(), "{args:?}");
        }
    }
}
