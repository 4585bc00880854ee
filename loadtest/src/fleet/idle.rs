//! Idle WebSocket sessions per signaling node: open N authenticated sessions, hold them idle
//! (answering the server's pings), and report the node's RSS growth per session.
//!
//! Accounts: `ceil(N / devices_per_user)` users, each with many devices (the protocol allows
//! any number of devices per user; one session per device). Client sockets are bound to
//! source addresses 127.0.0.2.. before connecting so no single source IP runs out of
//! ephemeral ports; the node's per-IP session limit (`--max-conns-per-ip`, default 32) is
//! raised to fit that spread and reported.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use peerlink_api::signaling_client::{ConnectOptions, Connection, HttpApi};
use serde::Serialize;

use super::proc;
use super::{FleetError, Result, within};

/// Sessions opened before the baseline RSS reading (runtime, buffers and pools warmed up).
pub const WARMUP: usize = 200;
/// Descriptors kept free beyond one per session (listener, database, pipes, HTTP clients).
const FD_SLACK: u64 = 512;

/// What to run.
#[derive(Clone, Debug)]
pub struct IdleConfig {
    /// `peerlink-signaling` binary.
    pub signaling_bin: PathBuf,
    /// Sessions to open and hold (besides the warm-up ones).
    pub sessions: usize,
    /// Devices (sessions) per account.
    pub devices_per_user: usize,
    /// Source addresses 127.0.0.2 .. 127.0.0.(1+source_ips).
    pub source_ips: usize,
    /// Connection attempts in flight.
    pub concurrency: usize,
    /// Wait after the last session opened before reading RSS.
    pub settle: Duration,
    /// Keep every session open this long after the reading, then check they all survived.
    pub hold: Duration,
    /// Overall time limit.
    pub timeout: Duration,
    /// Put the node's database on /dev/shm.
    pub db_on_shm: bool,
    /// Extra flags for the node (appended after the benchmark's own).
    pub extra_flags: Vec<String>,
}

impl IdleConfig {
    /// Defaults for `sessions` sessions.
    pub fn new(signaling_bin: PathBuf, sessions: usize) -> Self {
        Self {
            signaling_bin,
            sessions,
            devices_per_user: 100,
            source_ips: 64,
            concurrency: 256,
            settle: Duration::from_secs(3),
            hold: Duration::from_secs(5),
            timeout: Duration::from_secs(900),
            db_on_shm: true,
            extra_flags: Vec::new(),
        }
    }
}

/// Figures of one run.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct IdleReport {
    /// Sessions requested (besides the warm-up).
    pub requested: usize,
    /// Sessions that got their `welcome` (besides the warm-up).
    pub opened: usize,
    /// Sessions that failed to open.
    pub failed: usize,
    /// The first failure, if any.
    pub first_error: Option<String>,
    /// Warm-up sessions opened before the baseline reading.
    pub warmup: usize,
    /// The node's own `sessions_open` gauge after opening (includes warm-up).
    pub server_sessions_open: i64,
    /// Sessions still open after the hold, by the node's gauge.
    pub server_sessions_after_hold: i64,
    /// Sessions the client saw closed before the end.
    pub closed_early: u64,
    /// Accounts used.
    pub users: usize,
    /// Sessions (devices) per account.
    pub devices_per_user: usize,
    /// Source IPs used.
    pub source_ips: usize,
    /// The node's per-IP session limit for this run.
    pub max_conns_per_ip: usize,
    /// Open-file limit set for the load tester and the node.
    pub nofile_limit: u64,
    /// Seconds to open the sessions.
    pub open_secs: f64,
    /// Sessions opened per second.
    pub open_rate: f64,
    /// Node RSS after warm-up, KiB.
    pub rss_base_kib: u64,
    /// Node RSS with every session open, KiB.
    pub rss_after_kib: u64,
    /// Node RSS after the hold, KiB.
    pub rss_after_hold_kib: u64,
    /// Growth per session, bytes.
    pub bytes_per_session: f64,
    /// Machine-wide kernel TCP memory growth per session (both ends of each loopback
    /// connection, mostly buffers), bytes; not part of the node's RSS.
    pub kernel_tcp_bytes_per_session: f64,
    /// Projection for 100,000 sessions (base + growth), MiB.
    pub projected_100k_mib: f64,
    /// Node flags used (besides listen/db/log).
    pub node_flags: Vec<String>,
}

impl IdleReport {
    /// Human table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        s += "idle WebSocket sessions on one peerlink-signaling node (loopback)\n";
        s += &format!(
            "  sessions requested / opened     {:>10} / {} (+{} warm-up)\n",
            self.requested, self.opened, self.warmup
        );
        s += &format!(
            "  node sessions_open gauge        {:>10} (after hold: {})\n",
            self.server_sessions_open, self.server_sessions_after_hold
        );
        s += &format!(
            "  failed to open / closed early   {:>10} / {}\n",
            self.failed, self.closed_early
        );
        if let Some(e) = &self.first_error {
            s += &format!("  first failure: {e}\n");
        }
        s += &format!(
            "  accounts x devices              {:>10} x {}\n",
            self.users, self.devices_per_user
        );
        s += &format!(
            "  source IPs / per-IP limit       {:>10} / {} (node default 32, raised for the benchmark)\n",
            self.source_ips, self.max_conns_per_ip
        );
        s += &format!(
            "  RLIMIT_NOFILE                   {:>10}\n",
            self.nofile_limit
        );
        s += &format!(
            "  open time                       {:>10.1} s ({:.0} sessions/s)\n",
            self.open_secs, self.open_rate
        );
        s += &format!(
            "  node RSS base -> all open       {:>10} KiB -> {} KiB (after hold {} KiB)\n",
            self.rss_base_kib, self.rss_after_kib, self.rss_after_hold_kib
        );
        s += &format!(
            "  RSS per idle session            {:>10.0} bytes   (target <= 10,240; Centrifugo ~30 KB)\n",
            self.bytes_per_session
        );
        s += &format!(
            "  kernel TCP memory per session   {:>10.0} bytes   (machine-wide, both ends; not in RSS)\n",
            self.kernel_tcp_bytes_per_session
        );
        s += &format!(
            "  projected RSS at 100,000        {:>10.0} MiB     (target <= 1024)\n",
            self.projected_100k_mib
        );
        s += &format!("  node flags: {}\n", self.node_flags.join(" "));
        s
    }
}

/// Run the benchmark (builds its own runtime).
pub fn run(c: &IdleConfig) -> Result<IdleReport> {
    if c.sessions == 0 || c.devices_per_user == 0 || c.source_ips == 0 || c.source_ips > 250 {
        return Err(FleetError::Invalid(
            "sessions, devices per user must be > 0; source IPs 1..=250".into(),
        ));
    }
    let total = c.sessions + WARMUP;
    let nofile = proc::raise_nofile((total as u64).saturating_mul(2) + 4096)?;
    // One descriptor per session in the node and one in this process, plus some slack.
    if nofile < total as u64 + FD_SLACK {
        return Err(FleetError::Invalid(format!(
            "open-file limit {nofile} is too low for {total} sessions: raising the hard \
             RLIMIT_NOFILE needs CAP_SYS_RESOURCE, which this process lacks; at most {} \
             sessions (+{WARMUP} warm-up) fit in one process here; spread them with --nodes K",
            nofile.saturating_sub(FD_SLACK + WARMUP as u64)
        )));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let timeout = c.timeout;
    let r = rt.block_on(async { within(timeout, "idle sessions", run_async(c, nofile)).await });
    rt.shutdown_timeout(Duration::from_secs(5));
    r
}

async fn run_async(c: &IdleConfig, nofile: u64) -> Result<IdleReport> {
    let total = c.sessions + WARMUP;
    // Never below the node's default of 32.
    let per_ip = (total.div_ceil(c.source_ips) + 16).max(32);
    let dir = proc::temp_dir(c.db_on_shm)?;
    let mut flags: Vec<String> = [
        "--max-conns-per-ip",
        &per_ip.to_string(),
        // Accounts are only set-up here; session memory does not depend on the hash cost.
        "--argon2-m-kib",
        "64",
        "--argon2-t",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    flags.extend(c.extra_flags.iter().cloned());
    let mut node = proc::start_signaling(&c.signaling_bin, dir.path(), "signaling", &flags, &[])?;
    let base = format!("http://{}", node.addr);
    let api = super::signaling_api(&base)?;

    let users = total.div_ceil(c.devices_per_user);
    let tokens = within(
        Duration::from_secs(300),
        "creating accounts",
        super::accounts(&base, "idle", users, 16),
    )
    .await?;
    let tokens = Arc::new(tokens);
    let closed = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

    let opener = Opener {
        api,
        tokens: tokens.clone(),
        devices_per_user: c.devices_per_user,
        source_ips: c.source_ips,
        closed: closed.clone(),
        stop: stop_rx,
    };
    // Warm-up, then the baseline reading.
    let warm = opener.open_range(0..WARMUP, c.concurrency).await;
    if let Some(e) = warm.first_error {
        return Err(FleetError::Protocol(format!("warm-up session failed: {e}")));
    }
    let mut holders = warm.holders;
    tokio::time::sleep(c.settle).await;
    let rss_base = node.rss_kib()?;
    let tcp_base = proc::tcp_kernel_bytes().unwrap_or(0);

    let t0 = Instant::now();
    let main = opener.open_range(WARMUP..total, c.concurrency).await;
    holders.extend(main.holders);
    let open_secs = t0.elapsed().as_secs_f64();
    let opened = holders.len() - WARMUP;
    tokio::time::sleep(c.settle).await;
    if !node.alive() {
        return Err(node.failed("node exited"));
    }
    let rss_after = node.rss_kib()?;
    let tcp_after = proc::tcp_kernel_bytes().unwrap_or(0);
    let gauge = super::signaling_metric(&base, "sessions_open").await?;
    tokio::time::sleep(c.hold).await;
    let rss_hold = node.rss_kib()?;
    let gauge_hold = super::signaling_metric(&base, "sessions_open").await?;
    let closed_early = closed.load(Ordering::Relaxed);

    let _ = stop_tx.send(true);
    for h in &holders {
        h.abort();
    }
    drop(node);

    let per = (rss_after.saturating_sub(rss_base)) as f64 * 1024.0 / opened.max(1) as f64;
    Ok(IdleReport {
        requested: c.sessions,
        opened,
        failed: main.failed,
        first_error: main.first_error,
        warmup: WARMUP,
        server_sessions_open: gauge,
        server_sessions_after_hold: gauge_hold,
        closed_early,
        users,
        devices_per_user: c.devices_per_user,
        source_ips: c.source_ips,
        max_conns_per_ip: per_ip,
        nofile_limit: nofile,
        open_secs,
        open_rate: opened as f64 / open_secs.max(1e-9),
        rss_base_kib: rss_base,
        rss_after_kib: rss_after,
        rss_after_hold_kib: rss_hold,
        bytes_per_session: per,
        kernel_tcp_bytes_per_session: tcp_after.saturating_sub(tcp_base) as f64
            / opened.max(1) as f64,
        projected_100k_mib: (rss_base as f64 * 1024.0 + per * 100_000.0) / 1_048_576.0,
        node_flags: flags,
    })
}

/// Sessions opened by [`Opener::open_range`].
#[derive(Default)]
pub(crate) struct Opened {
    /// One holder task per open session.
    pub holders: Vec<tokio::task::JoinHandle<()>>,
    /// Sessions that failed to open.
    pub failed: usize,
    /// The first failure.
    pub first_error: Option<String>,
}

/// Opens and holds sessions against one node.
pub(crate) struct Opener {
    /// The node's HTTP API (its address).
    pub api: HttpApi,
    /// Access token per account.
    pub tokens: Arc<Vec<String>>,
    /// Sessions per account.
    pub devices_per_user: usize,
    /// Source addresses 127.0.0.2 ..
    pub source_ips: usize,
    /// Sessions seen closed before the end.
    pub closed: Arc<AtomicU64>,
    /// Ends every holder.
    pub stop: tokio::sync::watch::Receiver<bool>,
}

impl Opener {
    /// Open sessions `range` (index -> account, device and source IP) with `concurrency`
    /// handshakes in flight; each is then held by its own task.
    pub(crate) async fn open_range(
        &self,
        range: std::ops::Range<usize>,
        concurrency: usize,
    ) -> Opened {
        let results: Vec<Result<tokio::task::JoinHandle<()>>> = futures_util::stream::iter(range)
            .map(|i| self.open(i))
            .buffer_unordered(concurrency.max(1))
            .collect()
            .await;
        let mut o = Opened::default();
        for r in results {
            match r {
                Ok(h) => o.holders.push(h),
                Err(e) => {
                    o.failed += 1;
                    o.first_error.get_or_insert_with(|| e.to_string());
                }
            }
        }
        o
    }

    async fn open(&self, i: usize) -> Result<tokio::task::JoinHandle<()>> {
        let user = i / self.devices_per_user;
        let token = self
            .tokens
            .get(user)
            .ok_or_else(|| FleetError::Invalid("session index beyond accounts".into()))?;
        // 127.0.0.2 ..= 127.0.0.(1+source_ips); every address is loopback.
        let octet = 2 + (i % self.source_ips) as u8;
        let opts = ConnectOptions {
            source: Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, octet))),
            // Small client buffers: 100k clients live in this process too.
            read_buffer: Some(4096),
            write_buffer: Some(0),
            timeout: Duration::from_secs(30),
        };
        let device = format!("d{}", i % self.devices_per_user);
        let mut conn = Connection::open(&self.api, token, &device, None, &opts)
            .await
            .map_err(|e| FleetError::Protocol(format!("session {i}: {e}")))?;
        let closed = self.closed.clone();
        let mut stop = self.stop.clone();
        // Hold: keep reading so pings are answered; end on stop or close.
        Ok(tokio::spawn(async move {
            loop {
                tokio::select! {
                    m = conn.recv() => if m.is_err() {
                        closed.fetch_add(1, Ordering::Relaxed);
                        return;
                    },
                    r = stop.changed() => {
                        if r.is_err() || *stop.borrow() {
                            return;
                        }
                    }
                }
            }
        }))
    }
}
