//! Service processes under test: locate the binary, start it with a log file, wait for its
//! "bound" line on stdout, read its memory and CPU from /proc, kill it on drop.

use std::io::{BufRead as _, BufReader, Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::{FleetError, Result};

/// Where the workspace's build puts binary `name`: `target/release` if it exists there, else
/// `target/debug` (`CARGO_TARGET_DIR` respected).
pub fn default_bin(name: &str) -> Result<PathBuf> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("..").join("target"));
    let release = target.join("release").join(name);
    if release.exists() {
        return Ok(release);
    }
    let debug = target.join("debug").join(name);
    if debug.exists() {
        return Ok(debug);
    }
    Err(FleetError::MissingBinary(release))
}

/// Raise this process's open-file limit (soft and, as root, hard) to at least `want`, capped
/// by `fs.nr_open`. Children started afterwards inherit it. Returns the soft limit now set.
pub fn raise_nofile(want: u64) -> Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(std::io::Error::from)?;
    if soft >= want {
        return Ok(soft);
    }
    let cap = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(hard);
    let target = want.min(cap.max(hard));
    // Raising the hard limit needs CAP_SYS_RESOURCE; fall back to the hard limit.
    if setrlimit(Resource::RLIMIT_NOFILE, target, target.max(hard)).is_err() {
        setrlimit(Resource::RLIMIT_NOFILE, hard.min(target), hard).map_err(std::io::Error::from)?;
    }
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).map_err(std::io::Error::from)?;
    Ok(soft)
}

/// Resident memory of `pid` in KiB (VmRSS from /proc/<pid>/status).
pub fn rss_kib(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| FleetError::Protocol(format!("no VmRSS for pid {pid}")))
}

/// Kernel memory held by all TCP sockets of the machine, bytes (`mem` pages of the `TCP:` line
/// of /proc/net/sockstat; socket buffers are not part of any process's RSS).
pub fn tcp_kernel_bytes() -> Result<u64> {
    let s = std::fs::read_to_string("/proc/net/sockstat")?;
    let line = s
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .ok_or_else(|| FleetError::Protocol("no TCP line in /proc/net/sockstat".into()))?;
    let mut it = line.split_whitespace();
    while let Some(w) = it.next() {
        if w == "mem" {
            let pages: u64 = it
                .next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| FleetError::Protocol("bad sockstat mem".into()))?;
            // SAFETY: sysconf only reads a configuration value.
            let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
            return Ok(pages * u64::try_from(page).unwrap_or(4096));
        }
    }
    Err(FleetError::Protocol("no mem field in sockstat".into()))
}

/// CPU time (user + system) consumed so far by `pid`, from /proc/<pid>/stat.
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = s
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| FleetError::Protocol("malformed /proc stat".into()))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // `rest` starts at field 3 (state), so utime (14) is index 11 and stime (15) index 12.
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).unwrap_or(100).max(1);
    Ok(Duration::from_nanos(
        (ticks(11) + ticks(12)).saturating_mul(1_000_000_000 / hz),
    ))
}

/// A running service under test; killed (and reaped) on drop.
pub struct Service {
    name: String,
    child: Child,
    log: PathBuf,
    /// The address the service announced on stdout.
    pub addr: String,
}

impl Service {
    /// Start `cmd` (stdout piped, stderr to `log`) and wait up to `wait` for a stdout line
    /// starting with `prefix`; the rest of that line is the address.
    pub fn start(
        name: &str,
        mut cmd: Command,
        log: &Path,
        prefix: &str,
        wait: Duration,
    ) -> Result<Self> {
        let bin = PathBuf::from(cmd.get_program());
        if !bin.exists() {
            return Err(FleetError::MissingBinary(bin));
        }
        let logf = std::fs::File::create(log)?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(logf));
        peerlink_cli::process::die_with_parent(&mut cmd);
        let mut child = cmd.spawn().map_err(|e| FleetError::Service {
            name: name.to_owned(),
            what: format!("spawn {}: {e}", bin.display()),
        })?;
        let stdout = child.stdout.take();
        let mut svc = Self {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
            addr: String::new(),
        };
        let Some(stdout) = stdout else {
            return Err(svc.failed("no stdout pipe"));
        };
        let (tx, rx) = mpsc::channel();
        let prefix = prefix.to_owned();
        // Reads stdout until EOF (the child's exit), so the pipe never fills up.
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(a) = line.strip_prefix(&prefix)
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(a.trim().to_owned());
                }
            }
        });
        match rx.recv_timeout(wait) {
            Ok(a) => {
                svc.addr = a;
                Ok(svc)
            }
            Err(_) => Err(svc.failed(&format!(
                "no '{}' line within {} s",
                prefix_of(&svc.name),
                wait.as_secs()
            ))),
        }
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory now, KiB.
    pub fn rss_kib(&self) -> Result<u64> {
        rss_kib(self.pid())
    }

    /// CPU time used so far.
    pub fn cpu_time(&self) -> Result<Duration> {
        cpu_time(self.pid())
    }

    /// Whether it is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// An error naming this service, with the tail of its log.
    pub fn failed(&mut self, what: &str) -> FleetError {
        let status = match self.child.try_wait() {
            Ok(Some(s)) => format!(" (exited: {s})"),
            _ => String::new(),
        };
        FleetError::Service {
            name: self.name.clone(),
            what: format!("{what}{status}; log tail:\n{}", self.log_tail(2048)),
        }
    }

    /// The last `n` bytes of the service's stderr log.
    pub fn log_tail(&self, n: u64) -> String {
        let Ok(mut f) = std::fs::File::open(&self.log) else {
            return String::new();
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(n)));
        let mut s = String::new();
        let _ = f.read_to_string(&mut s);
        s
    }
}

fn prefix_of(name: &str) -> &'static str {
    if name.contains("directory") {
        "listening on"
    } else {
        "http="
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start a signaling node: `extra` flags after the benchmark's defaults (loopback listen, no
/// STUN, warn logging, database `dir/shared.db` — nodes of one cluster share it — unless
/// `extra` names a `--store`, and log `dir/{name}.log`).
pub fn start_signaling(
    bin: &Path,
    dir: &Path,
    name: &str,
    extra: &[String],
    env: &[(&str, &str)],
) -> Result<Service> {
    let mut cmd = Command::new(bin);
    cmd.args(["--listen", "127.0.0.1:0", "--no-stun", "--log", "warn"]);
    if !extra.iter().any(|f| f == "--store") {
        cmd.arg("--db").arg(dir.join("shared.db"));
    }
    cmd.args(extra)
        .env("PEERLINK_TOKEN_SECRET", super::TOKEN_SECRET);
    for (k, v) in env {
        cmd.env(k, v);
    }
    Service::start(
        name,
        cmd,
        &dir.join(format!("{name}.log")),
        "http=",
        Duration::from_secs(30),
    )
}

/// Start a directory with long TTLs (entries stay live for the whole benchmark).
pub fn start_directory(bin: &Path, dir: &Path) -> Result<Service> {
    start_directory_with(bin, dir, "directory", &[])
}

/// [`start_directory`] named `name` (its log `dir/{name}.log`), `extra` flags after the
/// defaults (e.g. `--store redis://...`).
pub fn start_directory_with(
    bin: &Path,
    dir: &Path,
    name: &str,
    extra: &[String],
) -> Result<Service> {
    let mut cmd = Command::new(bin);
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--presence-ttl",
        "3600",
        "--node-ttl",
        "3600",
        "--seed",
        "1",
    ])
    .args(extra)
    .env("PEERLINK_CLUSTER_TOKEN", super::CLUSTER_TOKEN);
    Service::start(
        "peerlink-directory",
        cmd,
        &dir.join(format!("{name}.log")),
        "listening on",
        Duration::from_secs(30),
    )
}

/// A directory for temp databases: `/dev/shm` when present (RAM, so fsync costs nothing and
/// the disk of a shared machine does not pace the benchmark), else the system temp dir.
pub fn temp_dir(prefer_shm: bool) -> Result<tempfile::TempDir> {
    let shm = Path::new("/dev/shm");
    Ok(if prefer_shm && shm.is_dir() {
        tempfile::Builder::new()
            .prefix("peerlink-fleet-")
            .tempdir_in(shm)?
    } else {
        tempfile::Builder::new()
            .prefix("peerlink-fleet-")
            .tempdir()?
    })
}
