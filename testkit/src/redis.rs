//! A real Redis server for tests: Debian's `redis-server` on a free loopback port, working in a
//! temporary directory, without persistence (`--save '' --appendonly no`), so a restart starts
//! empty. It is killed (SIGKILL) and its directory removed on drop, and it gets SIGTERM from the
//! kernel if the test process dies first.
//!
//! [`RedisServer::start`] returns `None`, after printing one line, when `redis-server` is not
//! installed (`scripts/setup.sh` installs it, so in CI these tests run).

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The server binary, looked up on `PATH`.
pub const BINARY: &str = "redis-server";
/// How long a server gets to answer `PING` after it starts.
const START_WAIT: Duration = Duration::from_secs(30);

/// A Redis server for one test.
#[derive(Debug)]
pub struct RedisServer {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

fn find_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(BINARY))
        .find(|p| p.is_file())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Send one command in RESP and read the first reply line (enough for PING, FLUSHALL).
fn command(addr: SocketAddr, args: &[&str]) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(req.as_bytes())?;
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).trim_end().to_owned())
}

impl RedisServer {
    /// Start a server on a free loopback port and wait until it answers `PING`; `None` (with
    /// one line on stderr) when `redis-server` is not installed.
    pub fn start() -> Option<RedisServer> {
        let Some(bin) = find_binary() else {
            eprintln!("skipped: {BINARY} not installed (scripts/setup.sh installs redis-server)");
            return None;
        };
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "peerlink-redis-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).expect("creating the server's temporary directory");
        let mut server = RedisServer {
            bin,
            dir,
            port: free_port(),
            child: None,
        };
        // Another process may take the free port before the server binds it: then a new one.
        for _ in 0..3 {
            match server.try_run() {
                Ok(()) => return Some(server),
                Err(_) => server.port = free_port(),
            }
        }
        server.run();
        Some(server)
    }

    /// Start the server process (again, after [`kill`](Self::kill): same port, empty) and wait
    /// until it answers `PING`.
    pub fn run(&mut self) {
        if let Err(e) = self.try_run() {
            panic!("{e}");
        }
    }

    /// [`run`](Self::run), with an exit at start (e.g. the port was taken) as an error.
    fn try_run(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "the server is running already");
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.log())
            .expect("opening the server log");
        let mut cmd = Command::new(&self.bin);
        cmd.current_dir(&self.dir)
            .args(["--bind", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .args(["--databases", "16", "--logfile", ""])
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log);
        peerlink_cli::process::die_with_parent(&mut cmd);
        self.child = Some(cmd.spawn().expect("spawning redis-server"));
        let deadline = Instant::now() + START_WAIT;
        loop {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                self.child = None;
                return Err(format!(
                    "redis-server exited at start ({status}): {}",
                    self.log_tail()
                ));
            }
            match command(self.addr(), &["PING"]) {
                Ok(r) if r == "+PONG" => return Ok(()),
                _ if Instant::now() > deadline => panic!(
                    "redis-server did not answer PING within {START_WAIT:?}: {}",
                    self.log_tail()
                ),
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    fn log(&self) -> PathBuf {
        self.dir.join("redis.log")
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(20);
        format!("its log ends: {}", lines[from..].join("\n"))
    }

    /// The loopback address it listens on.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `redis://127.0.0.1:PORT/DB`.
    pub fn url(&self, db: u8) -> String {
        format!("redis://127.0.0.1:{}/{db}", self.port)
    }

    /// Run one command (e.g. `FLUSHALL`) and return its first reply line.
    pub fn command(&self, args: &[&str]) -> String {
        command(self.addr(), args).expect("a command to the test server")
    }

    /// SIGKILL the server and wait for it (its data is gone: no persistence); [`run`] starts
    /// it again on the same port.
    ///
    /// [`run`]: Self::run
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A stopped process dies of SIGKILL as well.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stop (`SIGSTOP`) or continue (`SIGCONT`) the server: stopped, it accepts connections
    /// in the kernel but answers nothing, like a hung server.
    pub fn set_stopped(&self, stopped: bool) {
        let Some(child) = self.child.as_ref() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
        let sig = if stopped {
            nix::sys::signal::Signal::SIGSTOP
        } else {
            nix::sys::signal::Signal::SIGCONT
        };
        nix::sys::signal::kill(pid, sig).expect("signalling redis-server");
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

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
