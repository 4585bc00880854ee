//! The servers under test: started as children pinned to one core, killed on drop, observed
//! through `/proc` (CPU time, RSS) and, for peerlink-relay, its `/stats` endpoint.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

/// Username every server is configured with.
pub const BENCH_USER: &str = "bench";
/// Password every server is configured with.
pub const BENCH_PASS: &str = "bench-pass";
/// Realm every server is configured with.
pub const BENCH_REALM: &str = "bench.peerlink";

/// Which server and variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ServerKind {
    /// peerlink-relay, `--io uring`, `--relay-workers` workers (default one).
    PeerlinkUring,
    /// peerlink-relay, `--io epoll`, `--relay-workers` workers (default one).
    PeerlinkEpoll,
    /// coturn `turnserver`, `--relay-workers` relay threads (default one).
    Coturn,
    /// A second peerlink-relay build (`--peerlink-base-bin`), `--io uring`: before/after a
    /// change in one run.
    BaseUring,
    /// The second build with `--io epoll`.
    BaseEpoll,
}

impl ServerKind {
    /// Short label for tables.
    pub fn label(self) -> &'static str {
        match self {
            ServerKind::PeerlinkUring => "peerlink-uring",
            ServerKind::PeerlinkEpoll => "peerlink-epoll",
            ServerKind::Coturn => "coturn",
            ServerKind::BaseUring => "base-uring",
            ServerKind::BaseEpoll => "base-epoll",
        }
    }
    /// True for peerlink-relay variants.
    pub fn is_peerlink(self) -> bool {
        !matches!(self, ServerKind::Coturn)
    }
    /// True for the second peerlink-relay build.
    pub fn is_base(self) -> bool {
        matches!(self, ServerKind::BaseUring | ServerKind::BaseEpoll)
    }
    /// The `--io` a peerlink-relay variant runs with.
    fn io(self) -> &'static str {
        match self {
            ServerKind::PeerlinkUring | ServerKind::BaseUring => "uring",
            _ => "epoll",
        }
    }
}

/// Why a server could not be started or observed.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The binary does not exist.
    #[error("{what} binary not found at {path} ({hint})")]
    MissingBinary {
        /// Which server.
        what: &'static str,
        /// Where we looked.
        path: PathBuf,
        /// How to get it.
        hint: &'static str,
    },
    /// Spawning failed.
    #[error("starting {what}: {source}")]
    Spawn {
        /// Which server.
        what: &'static str,
        /// Cause.
        source: std::io::Error,
    },
    /// The server exited or never answered.
    #[error("{what} not ready after {waited:?}: {detail}")]
    NotReady {
        /// Which server.
        what: &'static str,
        /// How long we waited.
        waited: Duration,
        /// Exit status / last error / log tail.
        detail: String,
    },
    /// The server exited during the run.
    #[error("{what} exited during the run: {detail}")]
    Exited {
        /// Which server.
        what: &'static str,
        /// Exit status and log tail.
        detail: String,
    },
    /// Reading `/proc` failed.
    #[error("reading /proc for pid {pid}: {source}")]
    Proc {
        /// The pid.
        pid: u32,
        /// Cause.
        source: std::io::Error,
    },
    /// A temp dir for logs could not be made.
    #[error("temp dir: {0}")]
    TempDir(std::io::Error),
}

/// How to start a server.
#[derive(Clone, Debug)]
pub struct ServerSpec {
    /// Which server.
    pub kind: ServerKind,
    /// TURN listen address (UDP).
    pub listen: SocketAddr,
    /// Relay IPs (both servers take several, also of one family).
    pub relay_ips: Vec<IpAddr>,
    /// Worker threads: peerlink-relay `--workers`, coturn `--relay-threads` (at least 1).
    pub workers: usize,
    /// Relayed port range.
    pub min_port: u16,
    /// Relayed port range, inclusive.
    pub max_port: u16,
    /// CPU to pin the server to (`None`: no pinning).
    pub cpu: Option<usize>,
    /// Scheduling of the server's threads.
    pub priority: super::traffic::Priority,
    /// peerlink-relay metrics address.
    pub metrics: SocketAddr,
    /// peerlink-relay binary.
    pub peerlink_bin: PathBuf,
    /// coturn binary.
    pub coturn_bin: PathBuf,
    /// Allocation quota to configure (per user and total).
    pub max_allocations: usize,
}

/// A running server; killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct ServerProcess {
    /// The spec it was started with.
    pub spec: ServerSpec,
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl ServerProcess {
    /// Starts the server and waits (bounded) until it answers a STUN Binding request.
    pub fn start(spec: ServerSpec, ready_timeout: Duration) -> Result<Self, ServerError> {
        let dir = tempfile::Builder::new()
            .prefix("peerlink-loadtest-")
            .tempdir()
            .map_err(ServerError::TempDir)?;
        let log = dir.path().join("server.log");
        let what = spec.kind.label();
        let mut cmd = match spec.kind {
            ServerKind::Coturn => coturn_command(&spec, dir.path(), &log)?,
            _ => peerlink_command(&spec)?,
        };
        let log_file =
            std::fs::File::create(&log).map_err(|e| ServerError::Spawn { what, source: e })?;
        let log_err = log_file
            .try_clone()
            .map_err(|e| ServerError::Spawn { what, source: e })?;
        cmd.stdin(Stdio::null()).stdout(log_file).stderr(log_err);
        place(&mut cmd, spec.cpu, spec.priority);
        peerlink_cli::process::die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .map_err(|e| ServerError::Spawn { what, source: e })?;
        let mut p = Self {
            spec,
            child,
            log,
            _dir: dir,
        };
        p.wait_ready(ready_timeout)?;
        Ok(p)
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last `max` bytes of the server's log.
    pub fn log_tail(&self, max: usize) -> String {
        let s = std::fs::read(&self.log).unwrap_or_default();
        let from = s.len().saturating_sub(max);
        String::from_utf8_lossy(&s[from..]).into_owned()
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), ServerError> {
        let what = self.spec.kind.label();
        let start = Instant::now();
        let sock = UdpSocket::bind((self.spec.listen.ip(), 0))
            .map_err(|e| ServerError::Spawn { what, source: e })?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .map_err(|e| ServerError::Spawn { what, source: e })?;
        let mut last = String::from("no answer");
        // Bounded: one probe per 100 ms until the deadline.
        while start.elapsed() < timeout {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(ServerError::NotReady {
                    what,
                    waited: start.elapsed(),
                    detail: format!("exited with {status}; log: {}", self.log_tail(2000)),
                });
            }
            let req = binding_request(start.elapsed().as_nanos() as u64);
            if let Err(e) = sock.send_to(&req, self.spec.listen) {
                last = e.to_string();
            }
            let mut buf = [0u8; 1500];
            match sock.recv_from(&mut buf) {
                Ok((n, from)) if from == self.spec.listen && n >= 20 => {
                    if self.spec.kind.is_peerlink() {
                        // Also wait for the metrics endpoint.
                        match fetch_stats(self.spec.metrics, Duration::from_millis(500)) {
                            Ok(_) => return Ok(()),
                            Err(e) => last = format!("metrics: {e}"),
                        }
                    } else {
                        return Ok(());
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    last = e.to_string();
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        Err(ServerError::NotReady {
            what,
            waited: start.elapsed(),
            detail: format!("{last}; log: {}", self.log_tail(2000)),
        })
    }

    /// Fails with the exit status and log tail if the server has exited.
    pub fn check_alive(&mut self) -> Result<(), ServerError> {
        match self.child.try_wait() {
            Ok(Some(status)) => Err(ServerError::Exited {
                what: self.spec.kind.label(),
                detail: format!("{status}; log tail:\n{}", self.log_tail(3000)),
            }),
            _ => Ok(()),
        }
    }

    /// CPU time (user + system, all threads) consumed so far.
    pub fn cpu_time(&self) -> Result<Duration, ServerError> {
        process_cpu_time(self.pid())
    }

    /// Voluntary context switches (all threads) so far: how often the server slept and was
    /// woken again. Per forwarded packet this says how well it batches.
    pub fn voluntary_switches(&self) -> Result<u64, ServerError> {
        process_voluntary_switches(self.pid())
    }

    /// Resident set size (VmRSS) in bytes.
    pub fn rss_bytes(&self) -> Result<u64, ServerError> {
        process_rss(self.pid())
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        // Kill only our own child, by pid; then reap it.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Makes the child `cmd` starts run on `cpu` (if given) with `priority`.
pub fn place(cmd: &mut Command, cpu: Option<usize>, priority: super::traffic::Priority) {
    if cpu.is_none() && priority == super::traffic::Priority::default() {
        return;
    }
    // SAFETY: the closure runs in the forked child before exec and only makes plain syscalls
    // (sched_setaffinity, setpriority, sched_setscheduler) on stack data: async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(cpu) = cpu {
                let mut set = nix::sched::CpuSet::new();
                set.set(cpu).map_err(std::io::Error::from)?;
                nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
                    .map_err(std::io::Error::from)?;
            }
            priority.apply()
        });
    }
}

fn binding_request(seed: u64) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..2].copy_from_slice(&0x0001u16.to_be_bytes());
    b[4..8].copy_from_slice(&peerlink_proto::MAGIC_COOKIE.to_be_bytes());
    b[8..16].copy_from_slice(&seed.to_be_bytes());
    b
}

fn check_bin(path: &Path, what: &'static str, hint: &'static str) -> Result<(), ServerError> {
    if path.is_file() {
        Ok(())
    } else {
        Err(ServerError::MissingBinary {
            what,
            path: path.to_owned(),
            hint,
        })
    }
}

fn peerlink_command(spec: &ServerSpec) -> Result<Command, ServerError> {
    check_bin(
        &spec.peerlink_bin,
        "peerlink-relay",
        "build it first: cargo build --release -p peerlink-relay (or pass --peerlink-bin)",
    )?;
    let mut cmd = Command::new(&spec.peerlink_bin);
    let io = spec.kind.io();
    cmd.arg("--listen").arg(spec.listen.to_string());
    for ip in &spec.relay_ips {
        cmd.arg("--relay-ip").arg(ip.to_string());
    }
    cmd.args(["--realm", BENCH_REALM])
        .args(["--user", &format!("{BENCH_USER}:{BENCH_PASS}")])
        .args(["--allow-peer", "127.0.0.0/8"])
        .arg("--workers")
        .arg(spec.workers.max(1).to_string())
        .args(["--io", io])
        .arg("--metrics")
        .arg(spec.metrics.to_string())
        .arg("--min-port")
        .arg(spec.min_port.to_string())
        .arg("--max-port")
        .arg(spec.max_port.to_string())
        .arg("--user-quota")
        .arg(spec.max_allocations.to_string())
        .arg("--max-allocations")
        .arg(spec.max_allocations.to_string())
        .args(["--log", "warn"]);
    Ok(cmd)
}

fn coturn_command(spec: &ServerSpec, dir: &Path, log: &Path) -> Result<Command, ServerError> {
    check_bin(
        &spec.coturn_bin,
        "coturn turnserver",
        "install the Debian package coturn",
    )?;
    let mut cmd = Command::new(&spec.coturn_bin);
    cmd.arg("-n") // no config file
        .arg("--listening-ip")
        .arg(spec.listen.ip().to_string())
        .arg("--listening-port")
        .arg(spec.listen.port().to_string());
    for ip in &spec.relay_ips {
        cmd.arg("--relay-ip").arg(ip.to_string());
    }
    cmd.arg("--min-port")
        .arg(spec.min_port.to_string())
        .arg("--max-port")
        .arg(spec.max_port.to_string())
        .arg("--lt-cred-mech")
        .arg("--user")
        .arg(format!("{BENCH_USER}:{BENCH_PASS}"))
        .arg("--realm")
        .arg(BENCH_REALM)
        .arg("--allow-loopback-peers")
        .args([
            "--no-tls",
            "--no-dtls",
            "--no-tcp",
            "--no-tcp-relay",
            "--no-cli",
        ])
        .arg("--relay-threads")
        .arg(spec.workers.max(1).to_string())
        .arg("--log-file")
        .arg(log.with_file_name("turnserver.log"))
        .args(["--no-stdout-log", "--simple-log"])
        .arg("--pidfile")
        .arg(dir.join("turnserver.pid"))
        .arg("--db")
        .arg(dir.join("turndb"))
        .arg("--total-quota")
        .arg(spec.max_allocations.to_string())
        .arg("--user-quota")
        .arg(spec.max_allocations.to_string());
    Ok(cmd)
}

/// CPU time of all threads of `pid`: the sum of `/proc/<pid>/task/*/schedstat` run times
/// (nanoseconds) when available, else utime + stime from `/proc/<pid>/stat` (clock ticks).
pub fn process_cpu_time(pid: u32) -> Result<Duration, ServerError> {
    let proc_err = |e| ServerError::Proc { pid, source: e };
    if let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        let mut total: u64 = 0;
        let mut any = false;
        for e in entries.flatten() {
            let Ok(s) = std::fs::read_to_string(e.path().join("schedstat")) else {
                continue;
            };
            if let Some(ns) = s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
            {
                total += ns;
                any = true;
            }
        }
        if any {
            return Ok(Duration::from_nanos(total));
        }
    }
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(proc_err)?;
    stat_cpu_time(&s).ok_or_else(|| proc_err(std::io::Error::other("unparsable /proc/pid/stat")))
}

/// utime + stime from the text of `/proc/<pid>/stat`.
pub fn stat_cpu_time(stat: &str) -> Option<Duration> {
    // The command name may contain spaces; fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3, utime field 14, stime field 15 (1-based in proc(5)).
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|h| *h > 0)?;
    Some(Duration::from_nanos((utime + stime) * 1_000_000_000 / hz))
}

/// Sum of `voluntary_ctxt_switches` over the threads of `pid` (`/proc/<pid>/task/*/status`).
pub fn process_voluntary_switches(pid: u32) -> Result<u64, ServerError> {
    let entries = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map_err(|e| ServerError::Proc { pid, source: e })?;
    let mut total = 0u64;
    for e in entries.flatten() {
        let Ok(s) = std::fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        total += s
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(total)
}

/// VmRSS of `pid` in bytes.
pub fn process_rss(pid: u32) -> Result<u64, ServerError> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| ServerError::Proc { pid, source: e })?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| ServerError::Proc {
            pid,
            source: std::io::Error::other("no VmRSS"),
        })
}

/// GETs `/stats` from a peerlink-relay metrics address (plain HTTP/1.0, bounded by `timeout`).
pub fn fetch_stats(addr: SocketAddr, timeout: Duration) -> std::io::Result<serde_json::Value> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "GET /stats HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut body = Vec::new();
    // Bounded: at most 4 MiB.
    s.take(4 << 20).read_to_end(&mut body)?;
    let text = String::from_utf8_lossy(&body);
    let (head, json) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no HTTP header end"))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(std::io::Error::other(format!(
            "status line: {}",
            head.lines().next().unwrap_or("")
        )));
    }
    serde_json::from_str(json).map_err(std::io::Error::other)
}

/// A UDP port on `ip` that was free a moment ago (bind to 0, read, release).
pub fn free_udp_port(ip: IpAddr) -> std::io::Result<u16> {
    Ok(UdpSocket::bind((ip, 0))?.local_addr()?.port())
}

/// A TCP port on `ip` that was free a moment ago.
pub fn free_tcp_port(ip: IpAddr) -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind((ip, 0))?.local_addr()?.port())
}

/// Where the workspace's build puts `peerlink-relay` for `profile`, relative to this crate.
pub fn default_peerlink_bin(profile: &str) -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("..").join("target"));
    target.join(profile).join("peerlink-relay")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_spaces_in_name() {
        let line = "1234 (turn server) S 1 2 3 4 5 6 7 8 9 10 300 200 0 0 20 0 4 0 100 0 0";
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        assert_eq!(
            stat_cpu_time(line),
            Some(Duration::from_nanos(500 * 1_000_000_000 / hz))
        );
        assert_eq!(stat_cpu_time("garbage"), None);
    }

    fn spec(kind: ServerKind) -> ServerSpec {
        // Any existing file passes the binary check; nothing is started.
        let exe = std::env::current_exe().unwrap();
        ServerSpec {
            kind,
            listen: "127.0.0.1:3478".parse().unwrap(),
            relay_ips: vec!["127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap()],
            workers: 3,
            min_port: 10000,
            max_port: 10999,
            cpu: None,
            priority: Default::default(),
            metrics: "127.0.0.1:9000".parse().unwrap(),
            peerlink_bin: exe.clone(),
            coturn_bin: exe,
            max_allocations: 100,
        }
    }

    /// The value after each occurrence of `flag`.
    fn values(cmd: &Command, flag: &str) -> Vec<String> {
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].clone())
            .collect()
    }

    #[test]
    fn commands_carry_every_relay_ip_and_the_worker_count() {
        let p = peerlink_command(&spec(ServerKind::PeerlinkUring)).unwrap();
        assert_eq!(values(&p, "--relay-ip"), ["127.0.0.1", "127.0.0.2"]);
        assert_eq!(values(&p, "--workers"), ["3"]);
        let dir = tempfile::tempdir().unwrap();
        let c = coturn_command(
            &spec(ServerKind::Coturn),
            dir.path(),
            &dir.path().join("log"),
        )
        .unwrap();
        assert_eq!(values(&c, "--relay-ip"), ["127.0.0.1", "127.0.0.2"]);
        assert_eq!(values(&c, "--relay-threads"), ["3"]);
    }

    #[test]
    fn own_process_is_observable() {
        let pid = std::process::id();
        assert!(process_rss(pid).unwrap() > 0);
        assert!(process_cpu_time(pid).is_ok());
        // This thread has slept at least once by now (test harness start-up).
        assert!(process_voluntary_switches(pid).is_ok());
    }
}
