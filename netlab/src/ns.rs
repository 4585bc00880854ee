//! A handle on one lab namespace: sockets, threads and child processes inside it.

use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sched::{CloneFlags, setns};

use crate::cmd;
use crate::error::{LabError, Result};
use crate::lab::Shared;

/// Where `ip netns` keeps its named namespaces.
pub(crate) const NETNS_DIR: &str = "/run/netns";

/// Enter the named network namespace on the *calling thread* (other threads are unaffected).
pub(crate) fn enter_netns(name: &str) -> Result<()> {
    let path = PathBuf::from(NETNS_DIR).join(name);
    let file = File::open(&path).map_err(|source| LabError::Setns {
        ns: name.to_owned(),
        source,
    })?;
    setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| LabError::Setns {
        ns: name.to_owned(),
        source: std::io::Error::from(e),
    })
}

/// One network namespace of a lab (internet, router, host or wire).
///
/// Cheap to clone. Sockets made here keep their namespace for their whole life, whatever
/// thread later uses them, so one test process can own sockets in many namespaces.
#[derive(Clone)]
pub struct Netns {
    name: String,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Netns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netns").field("name", &self.name).finish()
    }
}

impl Netns {
    pub(crate) fn new(name: String, shared: Arc<Shared>) -> Self {
        Self { name, shared }
    }

    /// The namespace's full name as `ip netns list` shows it (carries the lab's prefix).
    pub fn name(&self) -> &str {
        &self.name
    }

    fn check_open(&self) -> Result<()> {
        if self.shared.is_closed() {
            Err(LabError::Closed)
        } else {
            Ok(())
        }
    }

    /// Run `f` on a fresh thread inside this namespace and wait for its result.
    ///
    /// Threads that `f` spawns (a tokio runtime's workers, for instance) start inside the
    /// namespace too. A panic in `f` is resumed on the caller.
    pub fn run<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> Result<T> {
        self.check_open()?;
        let name = self.name.clone();
        std::thread::scope(|s| {
            let handle = std::thread::Builder::new()
                .name(thread_name(&name))
                .spawn_scoped(s, || -> Result<T> {
                    enter_netns(&name)?;
                    Ok(f())
                })
                .map_err(|source| LabError::Io {
                    what: format!("spawning a thread for namespace {name}"),
                    source,
                })?;
            match handle.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Start `f` on a named thread inside this namespace and return its handle (not joined).
    ///
    /// Returns only after the thread has entered the namespace, so a setns failure is an
    /// error here rather than a silent run in the wrong namespace.
    pub fn spawn_thread<T, F>(&self, thread: &str, f: F) -> Result<NsJoinHandle<T>>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        self.check_open()?;
        let name = self.name.clone();
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<()>>(1);
        let handle = std::thread::Builder::new()
            .name(thread.chars().take(15).collect())
            .spawn(move || {
                let entered = enter_netns(&name);
                let ok = entered.is_ok();
                // The caller blocks on this message; if it is gone nobody wants the result.
                let _ = tx.send(entered);
                // `f` never runs outside the namespace.
                ok.then(f)
            })
            .map_err(|source| LabError::Io {
                what: format!("spawning thread {thread}"),
                source,
            })?;
        match rx.recv() {
            Ok(Ok(())) => Ok(NsJoinHandle(handle)),
            Ok(Err(e)) => {
                let _ = handle.join();
                Err(e)
            }
            Err(_) => {
                let _ = handle.join();
                Err(LabError::ThreadPanicked(self.name.clone()))
            }
        }
    }

    /// A UDP socket bound to `addr` inside this namespace.
    pub fn udp_socket(&self, addr: SocketAddr) -> Result<UdpSocket> {
        self.run(move || UdpSocket::bind(addr))?
            .map_err(|source| LabError::Io {
                what: format!("binding UDP {addr} in {}", self.name),
                source,
            })
    }

    /// A TCP listener bound to `addr` inside this namespace.
    pub fn tcp_listener(&self, addr: SocketAddr) -> Result<TcpListener> {
        self.run(move || TcpListener::bind(addr))?
            .map_err(|source| LabError::Io {
                what: format!("listening on TCP {addr} in {}", self.name),
                source,
            })
    }

    /// A TCP connection from inside this namespace to `addr`, bounded by `timeout`.
    pub fn tcp_connect(&self, addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
        self.run(move || TcpStream::connect_timeout(&addr, timeout))?
            .map_err(|source| LabError::Io {
                what: format!("connecting TCP to {addr} from {}", self.name),
                source,
            })
    }

    /// Run a program inside this namespace to completion and return its stdout.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        self.check_open()?;
        cmd::ns_exec(&self.name, args, None)
    }

    /// Set a sysctl (dotted key, e.g. `net.ipv4.ip_forward`) inside this namespace.
    pub fn set_sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = sysctl_path(key);
        let value = value.to_owned();
        self.run(move || std::fs::write(&path, value.as_bytes()))?
            .map_err(|source| LabError::Io {
                what: format!("writing sysctl {key} in {}", self.name),
                source,
            })
    }

    /// Read a sysctl (dotted key) inside this namespace.
    pub fn sysctl(&self, key: &str) -> Result<String> {
        let path = sysctl_path(key);
        self.run(move || std::fs::read_to_string(&path))?
            .map(|s| s.trim().to_owned())
            .map_err(|source| LabError::Io {
                what: format!("reading sysctl {key} in {}", self.name),
                source,
            })
    }

    /// Start `cmd` inside this namespace (via `ip netns exec`); stdin is null, stdout and
    /// stderr are inherited. The child is killed when the returned guard drops.
    ///
    /// Program, arguments, environment changes and working directory of `cmd` are kept;
    /// its stdio settings cannot be read back from a `Command`, use
    /// [`Netns::spawn_piped`] to capture output.
    pub fn spawn(&self, cmd: Command) -> Result<NsChild> {
        self.spawn_with(cmd, false)
    }

    /// Like [`Netns::spawn`] but with stdout and stderr piped (take them from
    /// [`NsChild::child_mut`]).
    pub fn spawn_piped(&self, cmd: Command) -> Result<NsChild> {
        self.spawn_with(cmd, true)
    }

    fn spawn_with(&self, cmd: Command, piped: bool) -> Result<NsChild> {
        self.check_open()?;
        let mut wrapped = Command::new("ip");
        wrapped
            .args(["netns", "exec", &self.name])
            .arg(cmd.get_program())
            .args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => wrapped.env(k, v),
                None => wrapped.env_remove(k),
            };
        }
        if let Some(dir) = cmd.get_current_dir() {
            wrapped.current_dir(dir);
        }
        wrapped.stdin(Stdio::null());
        if piped {
            wrapped.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        // Register under the lock so the lab's drop cannot miss a child started concurrently.
        let mut children = self
            .shared
            .children
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        self.check_open()?;
        let child = wrapped.spawn().map_err(|source| LabError::Spawn {
            cmd: format!("ip netns exec {} {:?}", self.name, cmd.get_program()),
            source,
        })?;
        // `ip netns exec` execs the program in place (no fork), so this pid is the program's.
        children.insert(child.id());
        drop(children);
        Ok(NsChild {
            child,
            shared: Arc::clone(&self.shared),
        })
    }
}

impl Netns {
    /// Set the conntrack UDP timeouts of this namespace
    /// (`net.netfilter.nf_conntrack_udp_timeout` and `..._stream`, whole seconds, min 1).
    pub fn set_conntrack_udp_timeout(&self, udp: Duration, stream: Duration) -> Result<()> {
        let secs = |d: Duration| d.as_secs().max(1).to_string();
        self.set_sysctl("net.netfilter.nf_conntrack_udp_timeout", &secs(udp))?;
        self.set_sysctl(
            "net.netfilter.nf_conntrack_udp_timeout_stream",
            &secs(stream),
        )
    }

    /// Flush this namespace's conntrack table (`conntrack -F`).
    pub fn flush_conntrack(&self) -> Result<()> {
        self.exec(&["conntrack", "-F"]).map(drop)
    }
}

/// The handle of a thread started with [`Netns::spawn_thread`].
#[derive(Debug)]
pub struct NsJoinHandle<T>(JoinHandle<Option<T>>);

impl<T> NsJoinHandle<T> {
    /// Wait for the thread; `Err` carries its panic payload.
    pub fn join(self) -> std::thread::Result<T> {
        match self.0.join()? {
            Some(v) => Ok(v),
            // Unreachable in practice: spawn_thread only hands out threads that entered.
            None => Err(Box::new("thread did not enter its namespace")),
        }
    }

    /// Whether the thread has finished.
    pub fn is_finished(&self) -> bool {
        self.0.is_finished()
    }
}

/// A child process running inside a lab namespace; killed (SIGKILL) and reaped on drop.
pub struct NsChild {
    child: Child,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for NsChild {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NsChild")
            .field("pid", &self.child.id())
            .finish()
    }
}

impl NsChild {
    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The underlying process (to take piped stdout/stderr, `try_wait`, ...).
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for NsChild {
    fn drop(&mut self) {
        // Already-exited children make kill fail harmlessly; wait reaps either way.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut children = self
            .shared
            .children
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        children.remove(&self.child.id());
    }
}

fn sysctl_path(key: &str) -> PathBuf {
    PathBuf::from("/proc/sys").join(key.replace('.', "/"))
}

/// Linux thread names are at most 15 bytes; keep the distinctive tail of the namespace name.
fn thread_name(ns: &str) -> String {
    let chars: Vec<char> = ns.chars().collect();
    let start = chars.len().saturating_sub(15);
    chars[start..].iter().collect()
}
