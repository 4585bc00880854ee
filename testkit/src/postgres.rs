//! A real PostgreSQL server for tests: Debian's `postgresql` binaries
//! (`/usr/lib/postgresql/<version>/bin/{initdb,postgres}`), a fresh cluster in a temporary
//! directory, listening on a free loopback port with password (SCRAM) authentication and the
//! production durability settings (`fsync=on`, `synchronous_commit=on`). As root it runs as
//! the `postgres` system user (initdb refuses root; the Debian package creates that user),
//! owning the temporary directory. It is stopped and its directory removed on drop, and it
//! gets SIGTERM from the kernel if the test process dies first.
//!
//! Each test takes a database of its own ([`PgServer::create_database`]), so tests can share
//! one server and run in parallel. Without the binaries, [`PgServer::start`] panics naming
//! `scripts/setup.sh`, which installs them: a PostgreSQL test never skips silently.

use std::fs::File;
use std::hash::{BuildHasher as _, Hasher as _};
use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The superuser every test server is created with.
pub const USER: &str = "peerlink";

/// How long a server gets to accept connections after it starts.
const START_WAIT: Duration = Duration::from_secs(60);

/// A PostgreSQL server for one test (or a few sharing it).
#[derive(Debug)]
pub struct PgServer {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    password: String,
    owner: Option<(u32, u32)>,
    child: Option<Child>,
}

fn random_hex() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(N.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

/// The newest `/usr/lib/postgresql/<version>/bin` holding `initdb` and `postgres`.
fn bin_dir() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("postgres").is_file()).then_some((v, bin))
        })
        .collect();
    found.sort();
    match found.pop() {
        Some((_, b)) => b,
        None => panic!(
            "PostgreSQL server binaries not found (/usr/lib/postgresql/<version>/bin/initdb and \
             postgres): run scripts/setup.sh, which installs Debian's postgresql package"
        ),
    }
}

/// As root: the `postgres` user's uid and gid (the server cannot run as root).
fn server_owner() -> Option<(u32, u32)> {
    let me = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(0);
    if me != 0 {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let ids = passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 3 && f[0] == "postgres").then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
    });
    match ids.flatten() {
        Some(ids) => Some(ids),
        None => panic!(
            "running as root and there is no `postgres` user to run PostgreSQL as: run \
             scripts/setup.sh (Debian's postgresql package creates the user)"
        ),
    }
}

/// Run `f` on a thread of its own: the sync `postgres` client starts a runtime of its own,
/// which must not happen on a thread already inside one (an async test).
fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| match s.spawn(f).join() {
        Ok(v) => v,
        Err(p) => std::panic::resume_unwind(p),
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl PgServer {
    /// initdb a cluster in a new temporary directory and start it on a free loopback port;
    /// returns once it accepts connections.
    pub fn start() -> PgServer {
        let bin = bin_dir();
        let owner = server_owner();
        let dir = std::env::temp_dir().join(format!("peerlink-pg-{}", random_hex()));
        std::fs::create_dir(&dir).expect("creating the server's temporary directory");
        let mut server = PgServer {
            bin,
            dir,
            port: free_port(),
            password: random_hex(),
            owner,
            child: None,
        };
        std::fs::set_permissions(&server.dir, std::fs::Permissions::from_mode(0o700))
            .expect("chmod of the temporary directory");
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&server.dir, Some(uid), Some(gid))
                .expect("chown of the temporary directory to postgres");
        }
        let pwfile = server.dir.join("pwfile");
        std::fs::write(&pwfile, &server.password).expect("writing the password file");
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&pwfile, Some(uid), Some(gid)).expect("chown of pwfile");
        }
        // --no-sync only skips initdb's own final flush of the new files (the test removes
        // them anyway); the server runs with fsync on.
        let mut initdb = server.command("initdb");
        initdb
            .arg("-D")
            .arg(server.data())
            .args([
                "-U",
                USER,
                "--auth=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .arg("--no-sync");
        let out = initdb.output().expect("running initdb");
        assert!(
            out.status.success(),
            "initdb failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        server.run();
        server
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(program));
        cmd.current_dir(&self.dir).stdin(Stdio::null());
        if let Some((uid, gid)) = self.owner {
            cmd.uid(uid).gid(gid).env("HOME", &self.dir);
        }
        cmd
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    /// Start the server process on the cluster (again, after [`stop_immediate`]: same
    /// port, same data) and wait until it accepts connections.
    ///
    /// [`stop_immediate`]: Self::stop_immediate
    pub fn run(&mut self) {
        assert!(self.child.is_none(), "the server is running already");
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log())
            .expect("opening the server log");
        let log2 = log.try_clone().expect("log file handle");
        let mut cmd = self.command("postgres");
        cmd.arg("-D")
            .arg(self.data())
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("port={}", self.port))
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.dir.display()))
            .args(["-c", "fsync=on", "-c", "synchronous_commit=on"])
            .args(["-c", "shared_buffers=16MB", "-c", "max_connections=60"])
            .stdout(log)
            .stderr(log2);
        peerlink_cli::process::die_with_parent(&mut cmd);
        let child = cmd.spawn().expect("spawning postgres");
        self.child = Some(child);
        let deadline = Instant::now() + START_WAIT;
        loop {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                self.child = None;
                panic!("postgres exited at start ({status}): {}", self.log_tail());
            }
            match off_runtime(|| self.admin().map(drop)) {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => {
                    panic!(
                        "postgres did not accept connections within {START_WAIT:?}: {e}; {}",
                        self.log_tail()
                    )
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(20);
        format!("its log ends: {}", lines[from..].join("\n"))
    }

    fn admin(&self) -> Result<postgres::Client, postgres::Error> {
        postgres::Config::new()
            .host("127.0.0.1")
            .port(self.port)
            .user(USER)
            .password(&self.password)
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(2))
            .connect(postgres::NoTls)
    }

    /// The loopback port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The superuser's password.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// The URL of database `db` as the superuser.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://{USER}:{}@127.0.0.1:{}/{db}",
            self.password, self.port
        )
    }

    /// Create a new empty database `t_<random>` and return its URL.
    pub fn create_database(&self) -> String {
        let name = format!("t_{}", random_hex());
        off_runtime(|| {
            let mut c = self.admin().expect("connecting to the test server");
            c.batch_execute(&format!("CREATE DATABASE {name}"))
                .expect("CREATE DATABASE");
        });
        self.url(&name)
    }

    /// Run `sql` in the database at `url` (e.g. to look behind a store's back).
    pub fn execute(url: &str, sql: &str) {
        off_runtime(|| {
            let mut c = postgres::Client::connect(url, postgres::NoTls).expect("connecting");
            c.batch_execute(sql).expect("executing SQL");
        });
    }

    /// Stop the server as a crash would: immediate shutdown (SIGQUIT: no checkpoint, every
    /// connection cut), then wait for it. Committed data survives (fsync on); [`run`]
    /// starts it again with crash recovery.
    ///
    /// [`run`]: Self::run
    pub fn stop_immediate(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGQUIT);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Kill the server with SIGKILL to the postmaster (`kill -9`: no shutdown at all), then
    /// wait (bounded) until its backends, which notice the postmaster's death, have exited
    /// too, so that [`run`] finds no old shared memory in use and starts it again with crash
    /// recovery. Committed data survives (fsync on).
    ///
    /// [`run`]: Self::run
    pub fn kill(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let backends = children_of(child.id());
        let _ = child.kill();
        let _ = child.wait();
        let deadline = Instant::now() + Duration::from_secs(15);
        while backends.iter().any(|&p| alive(p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the server process is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The server's temporary directory (removed on drop).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// `/proc/<pid>/stat` fields after the command name: state, ppid, ...
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = s.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// The processes whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let ppid = pid.to_string();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| stat_fields(p).is_some_and(|f| f.get(1) == Some(&ppid)))
        .collect()
}

/// Whether `pid` runs (a zombie waiting to be reaped does not).
fn alive(pid: u32) -> bool {
    stat_fields(pid).is_some_and(|f| f.first().is_some_and(|s| s != "Z"))
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop_immediate();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
