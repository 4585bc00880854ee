//! A local peerlink fleet on loopback for the demo and tests: `peerlink-directory`,
//! `peerlink-relay` (TURN; started without `--directory`, so it does not register there, and
//! with `--allow-peer 127.0.0.0/8`) and `peerlink-signaling` (with `--directory`, and every
//! relay given through its static `--relay` list, which TURN credentials fall back to when the
//! directory knows no relay), started as child processes on free loopback ports with embedded
//! defaults (in-memory directory, SQLite in a temp dir, fresh random secrets). Children are
//! killed when the [`Fleet`] is dropped, and get SIGTERM from the kernel when the launching
//! process dies however it dies ([`peerlink_cli::process::die_with_parent`]); logs (stderr)
//! go to files in the fleet's temp dir.
//!
//! What it is not: a deployment tool (see `deploy/`), and it never touches non-loopback
//! addresses. Binaries are found next to the running executable, in `$PEERLINK_BIN_DIR`, or in
//! the workspace's `target/{debug,release}`; a missing binary is a clear error (build the
//! workspace first).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use rand::RngCore as _;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};

/// Bound on each service's start-up.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Why the fleet could not start.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// A service binary is missing.
    #[error(
        "binary {name} not found (looked in: {looked}); build the workspace first (cargo build --workspace)"
    )]
    MissingBinary {
        /// Binary name.
        name: String,
        /// Directories searched.
        looked: String,
    },
    /// Local I/O failure (temp dir, log files, spawning).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A service did not become ready.
    #[error("{service} did not start: {reason}; log tail:\n{log}")]
    NotReady {
        /// Service name.
        service: String,
        /// Why.
        reason: String,
        /// Last lines of its stderr.
        log: String,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> FleetError {
    let what = what.into();
    move |source| FleetError::Io { what, source }
}

/// Directories searched for service binaries, in order.
pub fn binary_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("PEERLINK_BIN_DIR") {
        dirs.push(PathBuf::from(d));
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(d) = exe.parent()
    {
        dirs.push(d.to_path_buf());
        // Test executables live in target/<profile>/deps.
        if let Some(p) = d.parent() {
            dirs.push(p.to_path_buf());
        }
    }
    let ws_target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    dirs.push(ws_target.join("debug"));
    dirs.push(ws_target.join("release"));
    dirs
}

/// Find the service binary `name` (see [`binary_dirs`]).
pub fn locate_binary(name: &str) -> Result<PathBuf, FleetError> {
    let dirs = binary_dirs();
    for d in &dirs {
        let p = d.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(FleetError::MissingBinary {
        name: name.to_owned(),
        looked: dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// What to start.
#[derive(Clone, Debug)]
pub struct FleetOptions {
    /// Start a relay (default true).
    pub relay: bool,
    /// Relay worker threads (default 1: the demo machine is small).
    pub relay_workers: usize,
    /// Log filter for the services (default `warn`).
    pub log: String,
    /// Ring timeout of the signaling node (default 30 s).
    pub ring_timeout: Duration,
    /// Relays started besides the first (default 0); signaling lists all of them.
    pub extra_relays: usize,
}

impl Default for FleetOptions {
    fn default() -> Self {
        Self {
            relay: true,
            relay_workers: 1,
            log: "warn".into(),
            ring_timeout: Duration::from_secs(30),
            extra_relays: 0,
        }
    }
}

/// The relay of a local fleet.
#[derive(Clone, Copy, Debug)]
pub struct RelayInfo {
    /// TURN UDP address.
    pub turn: SocketAddr,
    /// Metrics HTTP address (`/stats`, `/healthz`).
    pub metrics: SocketAddr,
}

struct Service {
    name: &'static str,
    child: Child,
    log: PathBuf,
    /// TURN address, for relays.
    turn: Option<SocketAddr>,
}

/// A running local fleet. Dropping it kills every child.
pub struct Fleet {
    /// Directory base URL.
    pub directory_url: String,
    /// Signaling base URL (`http://127.0.0.1:PORT`).
    pub signaling_url: String,
    /// Signaling STUN responder address.
    pub stun: Option<SocketAddr>,
    /// Signaling's IPv6 STUN responder (`[::1]`), when the host has IPv6.
    pub stun6: Option<SocketAddr>,
    /// The (first) relay, if started.
    pub relay: Option<RelayInfo>,
    /// Every relay started, the first one first.
    pub relays: Vec<RelayInfo>,
    services: Vec<Service>,
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("directory_url", &self.directory_url)
            .field("signaling_url", &self.signaling_url)
            .field("stun", &self.stun)
            .field("stun6", &self.stun6)
            .field("relay", &self.relay)
            .field("dir", &self.dir.path())
            .finish()
    }
}

fn random_secret() -> String {
    let mut b = [0u8; 24];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// A free loopback port for `udp` or TCP (bound then released: a small race remains, which
/// start-up detects as a failed service).
fn free_port(udp: bool) -> Result<u16, FleetError> {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let port = if udp {
        std::net::UdpSocket::bind(any)
            .and_then(|s| s.local_addr())
            .map_err(io_err("binding a probe UDP socket"))?
            .port()
    } else {
        std::net::TcpListener::bind(any)
            .and_then(|s| s.local_addr())
            .map_err(io_err("binding a probe TCP socket"))?
            .port()
    };
    Ok(port)
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Fleet {
    /// Start directory, relay (if asked) and signaling; returns once each is ready
    /// (bounded by [`START_TIMEOUT`] per service).
    pub async fn start(opts: FleetOptions) -> Result<Fleet, FleetError> {
        let dir = tempfile::Builder::new()
            .prefix("peerlink-fleet-")
            .tempdir()
            .map_err(io_err("creating the fleet temp dir"))?;
        let directory_bin = locate_binary("peerlink-directory")?;
        let signaling_bin = locate_binary("peerlink-signaling")?;
        let relay_bin = if opts.relay {
            Some(locate_binary("peerlink-relay")?)
        } else {
            None
        };
        let cluster_token = random_secret();
        let token_secret = random_secret();
        let turn_secret = random_secret();
        let mut fleet = Fleet {
            directory_url: String::new(),
            signaling_url: String::new(),
            stun: None,
            stun6: None,
            relay: None,
            relays: Vec::new(),
            services: Vec::new(),
            dir,
        };

        // Directory.
        let mut cmd = Command::new(&directory_bin);
        cmd.args(["--listen", "127.0.0.1:0"])
            .env("PEERLINK_CLUSTER_TOKEN", &cluster_token)
            .env("RUST_LOG", &opts.log);
        let mut out = fleet.spawn("directory", cmd)?;
        let lines = fleet
            .read_announce("directory", &mut out, |l, acc| {
                if let Some(a) = l.strip_prefix("listening on ") {
                    acc.push(a.trim().to_owned());
                }
                !acc.is_empty()
            })
            .await?;
        let dir_addr = lines.first().cloned().unwrap_or_default();
        fleet.directory_url = format!("http://{dir_addr}");
        drain(out);

        // Relay.
        for _ in 0..relay_bin.as_ref().map_or(0, |_| 1 + opts.extra_relays) {
            let Some(bin) = relay_bin.as_ref() else { break };
            let mut started = false;
            let mut last_err = String::new();
            // A picked port can be taken between probe and bind: retry a few times.
            for _attempt in 0..3 {
                let turn = SocketAddr::from(([127, 0, 0, 1], free_port(true)?));
                let metrics = SocketAddr::from(([127, 0, 0, 1], free_port(false)?));
                let mut cmd = Command::new(bin);
                cmd.args(["--listen", &turn.to_string()])
                    .args(["--relay-ip", "127.0.0.1", "--realm", "peerlink"])
                    .args(["--allow-peer", "127.0.0.0/8"])
                    .args(["--metrics", &metrics.to_string()])
                    .args(["--workers", &opts.relay_workers.to_string()])
                    .args(["--log", &opts.log])
                    .env("PEERLINK_RELAY_AUTH_SECRET", &turn_secret);
                let out = fleet.spawn("relay", cmd)?;
                if let Some(s) = fleet.services.last_mut() {
                    s.turn = Some(turn);
                }
                drain(out);
                match fleet.wait_http_ok("relay", metrics, "/readyz").await {
                    Ok(()) => {
                        let info = RelayInfo { turn, metrics };
                        fleet.relay.get_or_insert(info);
                        fleet.relays.push(info);
                        started = true;
                        break;
                    }
                    Err(e) => {
                        last_err = e.to_string();
                        if let Some(mut s) = fleet.services.pop() {
                            let _ = s.child.start_kill();
                            let _ = s.child.wait().await;
                        }
                    }
                }
            }
            if !started {
                return Err(FleetError::NotReady {
                    service: "relay".into(),
                    reason: "three start attempts failed".into(),
                    log: last_err,
                });
            }
        }

        // Signaling.
        let db = fleet.dir.path().join("signaling.db");
        let mut cmd = Command::new(&signaling_bin);
        cmd.args(["--listen", "127.0.0.1:0", "--stun", "127.0.0.1:0"])
            .args(["--directory", &fleet.directory_url])
            .args([
                "--ring-timeout",
                &format!("{}ms", opts.ring_timeout.as_millis()),
            ])
            .args(["--log", &opts.log])
            .arg("--db")
            .arg(&db)
            .env("PEERLINK_TOKEN_SECRET", &token_secret)
            .env("PEERLINK_TURN_SECRET", &turn_secret)
            .env("PEERLINK_CLUSTER_TOKEN", &cluster_token);
        for r in &fleet.relays {
            cmd.args(["--relay", &r.turn.to_string()]);
        }
        let mut out = fleet.spawn("signaling", cmd)?;
        let lines = fleet
            .read_announce("signaling", &mut out, |l, acc| {
                if l.starts_with("http=") || l.starts_with("stun") {
                    acc.push(l.to_owned());
                }
                // `stun6=` (if any) comes before `stun=`, the last line.
                l.starts_with("stun=")
            })
            .await?;
        drain(out);
        for l in lines {
            if let Some(a) = l.strip_prefix("http=") {
                fleet.signaling_url = format!("http://{a}");
            } else if let Some(a) = l.strip_prefix("stun=") {
                fleet.stun = a.split(',').next().and_then(|s| s.parse().ok());
            } else if let Some(a) = l.strip_prefix("stun6=") {
                fleet.stun6 = a.parse().ok();
            }
        }
        Ok(fleet)
    }

    fn spawn(&mut self, name: &'static str, mut cmd: Command) -> Result<ChildStdout, FleetError> {
        let log = self.dir.path().join(format!("{name}.log"));
        let file =
            std::fs::File::create(&log).map_err(io_err(format!("creating {}", log.display())))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(file))
            .kill_on_drop(true);
        peerlink_cli::process::die_with_parent(cmd.as_std_mut());
        let mut child = cmd.spawn().map_err(io_err(format!("spawning {name}")))?;
        let out = child.stdout.take().ok_or_else(|| FleetError::NotReady {
            service: name.into(),
            reason: "no stdout pipe".into(),
            log: String::new(),
        })?;
        self.services.push(Service {
            name,
            child,
            log,
            turn: None,
        });
        Ok(out)
    }

    fn not_ready(&self, name: &str, reason: impl Into<String>) -> FleetError {
        let log = self
            .services
            .iter()
            .rev()
            .find(|s| s.name == name)
            .map(|s| tail(&s.log, 20))
            .unwrap_or_default();
        FleetError::NotReady {
            service: name.into(),
            reason: reason.into(),
            log,
        }
    }

    async fn read_announce(
        &self,
        name: &'static str,
        out: &mut ChildStdout,
        mut done: impl FnMut(&str, &mut Vec<String>) -> bool,
    ) -> Result<Vec<String>, FleetError> {
        let mut acc = Vec::new();
        let mut reader = BufReader::new(out);
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        let mut line = String::new();
        loop {
            line.clear();
            let n = tokio::time::timeout_at(deadline, reader.read_line(&mut line))
                .await
                .map_err(|_| self.not_ready(name, "no address announced in time"))?
                .map_err(|e| self.not_ready(name, e.to_string()))?;
            if n == 0 {
                return Err(self.not_ready(name, "exited before announcing its address"));
            }
            if done(line.trim_end(), &mut acc) {
                return Ok(acc);
            }
        }
    }

    async fn wait_http_ok(
        &mut self,
        name: &'static str,
        addr: SocketAddr,
        path: &str,
    ) -> Result<(), FleetError> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| self.not_ready(name, e.to_string()))?;
        let url = format!("http://{addr}{path}");
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(r) = client.get(&url).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            if let Some(s) = self.services.iter_mut().rev().find(|s| s.name == name)
                && let Ok(Some(status)) = s.child.try_wait()
            {
                return Err(self.not_ready(name, format!("exited with {status}")));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(self.not_ready(name, format!("{url} not ready in time")));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Signaling base URL.
    pub fn server(&self) -> &str {
        &self.signaling_url
    }

    /// The fleet's temp dir (database, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether every child is still running.
    pub fn all_running(&mut self) -> bool {
        self.services
            .iter_mut()
            .all(|s| matches!(s.child.try_wait(), Ok(None)))
    }

    /// Services that have exited since start, each with its exit status and log tail.
    pub fn exited(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        for s in &mut self.services {
            if let Ok(Some(status)) = s.child.try_wait() {
                out.push(format!(
                    "{} exited ({status}); log tail:\n{}",
                    s.name,
                    tail(&s.log, 12)
                ));
            }
        }
        out
    }

    /// Kill the relay listening on `turn` with SIGKILL (a crash: no drain, no goodbye) and
    /// wait for it to exit (bounded). False if there is no such running relay.
    pub async fn kill_relay(&mut self, turn: SocketAddr) -> bool {
        let Some(s) = self.services.iter_mut().find(|s| s.turn == Some(turn)) else {
            return false;
        };
        if s.child.start_kill().is_err() {
            return false;
        }
        tokio::time::timeout(Duration::from_secs(5), s.child.wait())
            .await
            .is_ok()
    }

    /// Kill every child and wait for it (bounded).
    pub async fn stop(mut self) {
        for s in self.services.iter_mut().rev() {
            let _ = s.child.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(5), s.child.wait()).await;
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for s in &mut self.services {
            let _ = s.child.start_kill();
        }
    }
}

/// Keep reading a child's stdout to its end so that its later writes never fail.
fn drain(out: ChildStdout) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(out).lines();
        while let Ok(Some(_)) = lines.next_line().await {}
    });
}

/// Subset of the relay's `/stats` document used in reports.
#[derive(Clone, Debug, Default, serde::Deserialize, serde::Serialize)]
pub struct RelayStats {
    /// I/O backend in use.
    #[serde(default)]
    pub io: String,
    /// Live allocations.
    #[serde(default)]
    pub allocations_active: u64,
    /// In-relay latency (µs) since start.
    #[serde(default)]
    pub latency_total_us: RelayPercentiles,
    /// Counters by name.
    #[serde(default)]
    pub counters: std::collections::BTreeMap<String, u64>,
}

/// Percentiles (µs) from the relay's `/stats`.
#[derive(Clone, Debug, Default, serde::Deserialize, serde::Serialize)]
pub struct RelayPercentiles {
    /// Samples.
    #[serde(default)]
    pub count: u64,
    /// Median.
    #[serde(default)]
    pub p50: u64,
    /// 90th.
    #[serde(default)]
    pub p90: u64,
    /// 99th.
    #[serde(default)]
    pub p99: u64,
    /// Max.
    #[serde(default)]
    pub max: u64,
}

/// GET `http://metrics/stats` from a relay (bounded by `timeout`).
pub async fn relay_stats(metrics: SocketAddr, timeout: Duration) -> Result<RelayStats, String> {
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .map_err(|e| e.to_string())?;
    let r = client
        .get(format!("http://{metrics}/stats"))
        .send()
        .await
        .map_err(|e| format!("relay /stats: {e}"))?;
    if !r.status().is_success() {
        return Err(format!("relay /stats: HTTP {}", r.status()));
    }
    r.json()
        .await
        .map_err(|e| format!("relay /stats JSON: {e}"))
}
