//! Service processes for tests: find a workspace binary, start it, wait for its announce line,
//! and kill it when the test is done with it (also when the test panics).

use std::io::BufRead as _;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// Environment variable naming a directory to take service binaries from instead.
pub const BIN_DIR_ENV: &str = "PEERLINK_BIN_DIR";

/// A binary of the workspace (binaries are named like their packages): in `$PEERLINK_BIN_DIR`
/// when set, else next to the running test's own binaries (same profile), built with
/// `cargo build` when missing (once per name and process).
pub fn workspace_bin(name: &str) -> PathBuf {
    static BUILT: Mutex<Vec<String>> = Mutex::new(Vec::new());
    if let Some(d) = std::env::var_os(BIN_DIR_ENV) {
        let p = PathBuf::from(d).join(name);
        assert!(p.is_file(), "{} not found (${BIN_DIR_ENV})", p.display());
        return p;
    }
    // A test runs as target/<profile>/deps/<test>-<hash>.
    let exe = std::env::current_exe().expect("the test knows its own path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binaries live in target/<profile>/deps")
        .to_path_buf();
    let path = dir.join(name);
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if !path.is_file() && !built.iter().any(|b| b == name) {
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.args(["build", "-p", name, "--bin", name])
            .current_dir(crate::workspace::root());
        if dir.file_name().is_some_and(|d| d == "release") {
            cmd.arg("--release");
        }
        eprintln!(
            "testkit: {name} missing in {}: running {cmd:?}",
            dir.display()
        );
        let status = cmd.status().expect("running cargo build");
        assert!(status.success(), "cargo build of {name} failed ({status})");
        built.push(name.to_owned());
    }
    assert!(
        path.is_file(),
        "{} missing after cargo build",
        path.display()
    );
    path
}

/// A process a test started: its stdout is read line by line on a thread (so the child never
/// blocks on a full pipe) and handed out by [`next_line`](Self::next_line); it is killed
/// (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct Service {
    name: String,
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Service {
    /// Spawn `cmd` with stdout piped (stdin closed; stderr as `cmd` set it).
    pub fn start(name: &str, mut cmd: Command) -> Service {
        peerlink_cli::process::die_with_parent(&mut cmd);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name} ({cmd:?}): {e}"));
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Service {
            name: name.to_owned(),
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The next stdout line, or None when the process closed stdout or `limit` passed.
    pub fn next_line(&mut self, limit: Duration) -> Option<String> {
        let line = self.lines.recv_timeout(limit).ok()?;
        self.seen.push(line.clone());
        Some(line)
    }

    /// Read stdout until `pick` accepts a line (its answer is returned); panics naming the
    /// service and what it printed when stdout ends or `limit` passes first.
    pub fn wait_for<T>(&mut self, limit: Duration, mut pick: impl FnMut(&str) -> Option<T>) -> T {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let got = pick(&line);
                    self.seen.push(line);
                    if let Some(v) = got {
                        return v;
                    }
                }
                Err(e) => {
                    let why = match e {
                        RecvTimeoutError::Timeout => format!("nothing within {limit:?}"),
                        RecvTimeoutError::Disconnected => {
                            format!("stdout closed (exit: {:?})", self.child.try_wait())
                        }
                    };
                    panic!(
                        "{} did not announce itself: {why}; it printed {:?}",
                        self.name, self.seen
                    );
                }
            }
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process, e.g. to signal it or poll its exit.
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// SIGKILL and reap it.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        let _ = self.child.kill();
        self.child.wait().ok()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
