//! Command line of the fleet benchmarks (part of the `peerlink-loadtest` binary, included by
//! `main.rs` with `#[path]`; not a module of the library): clap arguments and wiring only.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use peerlink_loadtest::fleet::{self, directory, idle, idle_multi, invites, logins, on_engines};
use serde::Serialize;

/// Signaling and directory benchmarks.
#[derive(Subcommand, Debug)]
pub enum FleetCmd {
    /// Idle WebSocket sessions on one signaling node: RSS per session (target 100,000).
    IdleSessions(IdleArgs),
    /// Invite delivery latency (caller send -> callee receive) at a fixed open-loop rate.
    Invites(InviteArgs),
    /// Login rate and latency next to the raw Argon2id verify rate (same params, same run).
    Logins(LoginArgs),
    /// Directory lookups over HTTP next to the same process's GET /healthz rate (same run).
    Directory(DirectoryArgs),
    /// Invites over 3 nodes and durable messages on PostgreSQL + Redis next to the embedded
    /// stores (SQLite + in-memory directory), same run; starts the engines itself.
    Engines(EnginesArgs),
    /// Client worker process of `idle-sessions --nodes K` (internal).
    #[command(hide = true)]
    IdleWorker(IdleWorkerArgs),
}

/// `idle-worker` (internal; started by `idle-sessions --nodes K`).
#[derive(Args, Debug)]
pub struct IdleWorkerArgs {
    /// Node address.
    #[arg(long)]
    addr: std::net::SocketAddr,
    /// Tokens file (JSON array).
    #[arg(long)]
    tokens_file: PathBuf,
    /// Sessions after the warm-up.
    #[arg(long)]
    sessions: usize,
    /// Sessions per account.
    #[arg(long)]
    devices_per_user: usize,
    /// Source addresses.
    #[arg(long)]
    source_ips: usize,
    /// Handshakes in flight.
    #[arg(long)]
    concurrency: usize,
    /// Time limit, seconds.
    #[arg(long)]
    timeout: u64,
}

/// Flags every fleet subcommand has.
#[derive(Args, Debug)]
pub struct Common {
    /// peerlink-signaling binary [default: <workspace>/target/release, else target/debug].
    #[arg(long)]
    signaling_bin: Option<PathBuf>,
    /// peerlink-directory binary [default: <workspace>/target/release, else target/debug].
    #[arg(long)]
    directory_bin: Option<PathBuf>,
    /// Overall time limit, seconds.
    #[arg(long, default_value_t = 900)]
    timeout: u64,
    /// Print the JSON report on stdout (the table goes to stderr).
    #[arg(long)]
    json: bool,
}

impl Common {
    fn signaling(&self) -> anyhow::Result<PathBuf> {
        match &self.signaling_bin {
            Some(p) => Ok(p.clone()),
            None => Ok(fleet::default_bin("peerlink-signaling")?),
        }
    }
    fn directory(&self) -> anyhow::Result<PathBuf> {
        match &self.directory_bin {
            Some(p) => Ok(p.clone()),
            None => Ok(fleet::default_bin("peerlink-directory")?),
        }
    }
}

/// `idle-sessions`.
#[derive(Args, Debug)]
pub struct IdleArgs {
    #[command(flatten)]
    common: Common,
    /// Sessions to open and hold.
    #[arg(long, default_value_t = 100_000)]
    sessions: usize,
    /// Sessions (devices) per account.
    #[arg(long, default_value_t = 100)]
    devices_per_user: usize,
    /// Client source addresses 127.0.0.2 .. 127.0.0.(1+N).
    #[arg(long, default_value_t = 64)]
    source_ips: usize,
    /// Handshakes in flight.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Spread the sessions over this many nodes, each with its own client process (for
    /// machines where one process cannot hold enough descriptors).
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// Seconds to wait before reading RSS.
    #[arg(long, default_value_t = 3.0)]
    settle: f64,
    /// Seconds to keep all sessions open after the reading.
    #[arg(long, default_value_t = 5.0)]
    hold: f64,
    /// Keep the node's database on disk (system temp dir) instead of /dev/shm.
    #[arg(long)]
    db_on_disk: bool,
    /// Extra node flags (repeat, e.g. --node-flag=--ping-interval --node-flag=30s).
    #[arg(long = "node-flag", allow_hyphen_values = true)]
    node_flags: Vec<String>,
}

/// `invites`.
#[derive(Args, Debug)]
pub struct InviteArgs {
    #[command(flatten)]
    common: Common,
    /// Offered invites per second.
    #[arg(long, default_value_t = 2000.0)]
    rate: f64,
    /// Sending time, e.g. 10s, 500ms.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Caller/callee pairs.
    #[arg(long, default_value_t = 100)]
    pairs: usize,
    /// Signaling nodes: 1, or 2-3 (callers on one, callees on the others, real directory).
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// Longest wait for outstanding deliveries after the last send.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    drain: Duration,
    /// Extra node flags.
    #[arg(long = "node-flag", allow_hyphen_values = true)]
    node_flags: Vec<String>,
}

/// `engines`.
#[derive(Args, Debug)]
pub struct EnginesArgs {
    #[command(flatten)]
    common: Common,
    /// Offered invites per second.
    #[arg(long, default_value_t = 2000.0)]
    rate: f64,
    /// Invite sending time of each run.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Caller/callee pairs.
    #[arg(long, default_value_t = 100)]
    pairs: usize,
    /// Message sending time of each run.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    message_duration: Duration,
    /// Message senders (each waits for its ack before the next message).
    #[arg(long, default_value_t = 16)]
    message_concurrency: usize,
    /// Kept rounds (one more runs first and is discarded).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
}

/// `logins`.
#[derive(Args, Debug)]
pub struct LoginArgs {
    #[command(flatten)]
    common: Common,
    /// Clients logging in at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Length of each round (login and baseline).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    duration: Duration,
    /// Kept rounds (one more runs first and is discarded).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Argon2id memory, KiB [default: the node's, 19456].
    #[arg(long)]
    argon2_m_kib: Option<u32>,
    /// Argon2id iterations [default: the node's, 2].
    #[arg(long)]
    argon2_t: Option<u32>,
    /// Argon2id lanes [default: the node's, 1].
    #[arg(long)]
    argon2_p: Option<u32>,
    /// Hashes the node computes at once [default: the node's, 2].
    #[arg(long)]
    hash_concurrency: Option<usize>,
}

/// `directory`.
#[derive(Args, Debug)]
pub struct DirectoryArgs {
    #[command(flatten)]
    common: Common,
    /// Length of each phase of a round.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    duration: Duration,
    /// Users present.
    #[arg(long, default_value_t = 100_000)]
    users: usize,
    /// Concurrent single-lookup clients.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Concurrent batch clients.
    #[arg(long, default_value_t = 16)]
    batch_concurrency: usize,
    /// Users per batch lookup.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Kept rounds (one more runs first and is discarded).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

/// A phase length: any duration `peerlink_cli::parse_duration` reads, in (0, 1h].
fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = peerlink_cli::parse_duration(s).map_err(|e| e.to_string())?;
    if d.is_zero() || d > Duration::from_secs(3600) {
        return Err(format!("duration {s:?} must be in (0, 1h]"));
    }
    Ok(d)
}

fn print<R: Serialize>(json: bool, table: String, report: &R) -> anyhow::Result<()> {
    if json {
        eprint!("{table}");
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        print!("{table}");
    }
    Ok(())
}

/// Run one fleet subcommand.
pub fn run(cmd: FleetCmd) -> anyhow::Result<()> {
    match cmd {
        FleetCmd::IdleSessions(a) => {
            let mut c = idle::IdleConfig::new(a.common.signaling()?, a.sessions);
            c.devices_per_user = a.devices_per_user;
            c.source_ips = a.source_ips;
            c.concurrency = a.concurrency;
            anyhow::ensure!(
                (0.0..=3600.0).contains(&a.settle) && (0.0..=3600.0).contains(&a.hold),
                "--settle and --hold must be 0..=3600 seconds"
            );
            c.settle = Duration::from_secs_f64(a.settle);
            c.hold = Duration::from_secs_f64(a.hold);
            c.timeout = Duration::from_secs(a.common.timeout);
            c.db_on_shm = !a.db_on_disk;
            c.extra_flags = a.node_flags;
            if a.nodes > 1 {
                let exe = std::env::current_exe().context("locating this binary")?;
                let r = idle_multi::run(&c, a.nodes, &exe).context("idle-sessions benchmark")?;
                return print(a.common.json, r.table(), &r);
            }
            let r = idle::run(&c).context("idle-sessions benchmark")?;
            print(a.common.json, r.table(), &r)
        }
        FleetCmd::IdleWorker(a) => {
            let w = idle_multi::WorkerConfig {
                addr: a.addr,
                tokens_file: a.tokens_file,
                sessions: a.sessions,
                devices_per_user: a.devices_per_user.max(1),
                source_ips: a.source_ips.clamp(1, 250),
                concurrency: a.concurrency.max(1),
                timeout: Duration::from_secs(a.timeout),
            };
            idle_multi::run_worker(&w).context("idle worker")?;
            Ok(())
        }
        FleetCmd::Invites(a) => {
            let mut c = invites::InviteConfig::new(a.common.signaling()?, a.rate, a.duration);
            if a.nodes >= 2 {
                c.directory_bin = Some(a.common.directory()?);
            }
            c.pairs = a.pairs;
            c.nodes = a.nodes;
            c.drain = a.drain;
            c.timeout = Duration::from_secs(a.common.timeout);
            c.extra_flags = a.node_flags;
            let r = invites::run(&c).context("invites benchmark")?;
            print(a.common.json, r.table(), &r)
        }
        FleetCmd::Engines(a) => {
            let c = on_engines::EnginesConfig {
                signaling_bin: a.common.signaling()?,
                directory_bin: a.common.directory()?,
                rate: a.rate,
                duration: a.duration,
                pairs: a.pairs,
                message_duration: a.message_duration,
                message_concurrency: a.message_concurrency,
                rounds: a.rounds,
            };
            let r = on_engines::run(&c).context("engines benchmark")?;
            print(a.common.json, r.table(a.duration), &r)
        }
        FleetCmd::Logins(a) => {
            let mut c = logins::LoginConfig::new(a.common.signaling()?, a.duration);
            c.concurrency = a.concurrency;
            c.rounds = a.rounds;
            c.cost.m_kib = a.argon2_m_kib.unwrap_or(c.cost.m_kib);
            c.cost.t = a.argon2_t.unwrap_or(c.cost.t);
            c.cost.p = a.argon2_p.unwrap_or(c.cost.p);
            c.hash_concurrency = a.hash_concurrency.unwrap_or(c.hash_concurrency);
            c.timeout = Duration::from_secs(a.common.timeout);
            let r = logins::run(&c).context("logins benchmark")?;
            print(a.common.json, r.table(), &r)
        }
        FleetCmd::Directory(a) => {
            let mut c = directory::DirectoryConfig::new(a.common.directory()?, a.duration);
            c.users = a.users;
            c.concurrency = a.concurrency;
            c.batch_concurrency = a.batch_concurrency;
            c.batch = a.batch;
            c.rounds = a.rounds;
            c.timeout = Duration::from_secs(a.common.timeout);
            let r = directory::run(&c).context("directory benchmark")?;
            print(a.common.json, r.table(), &r)
        }
    }
}
