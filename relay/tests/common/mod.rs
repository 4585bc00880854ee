//! Shared test harness: start `peerlink-relay` as a child process (killed on drop), talk HTTP to
//! its metrics port, and a small TURN client built on peerlink-proto's codec.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use peerlink_proto::attrs::{
    ChannelNumber, Data, ErrorCode, Lifetime, Nonce, Realm, RequestedTransport, Username,
    XorMappedAddress, XorPeerAddress, XorRelayedAddress,
};
use peerlink_proto::auth::long_term_key;
use peerlink_proto::{Class, Message, MessageBuilder, MessageType, Method, TransactionId};

pub mod stream_client;

/// Both backends, for parametrised tests.
pub const BACKENDS: [&str; 2] = ["uring", "epoll"];

/// Generous bound for anything a loaded 2-core machine should finish.
pub const STEP: Duration = Duration::from_secs(10);

/// A free UDP port (on 127.0.0.1 and ::1) for a service the test starts (relay listener,
/// coturn peer). Drawn from 10000-19999, below both the kernel's ephemeral range (32768-60999)
/// and relayed ports (49152-65535 by default; 20000-31999 for tests with private ranges), so
/// parallel tests' relays and clients cannot take it between this check and the child's bind.
pub fn free_udp_port() -> u16 {
    free_port(|p| UdpSocket::bind(("127.0.0.1", p)).is_ok() && UdpSocket::bind(("::1", p)).is_ok())
}

/// A free TCP port on 127.0.0.1 (same range as [`free_udp_port`]).
pub fn free_tcp_port() -> u16 {
    free_port(|p| TcpListener::bind(("127.0.0.1", p)).is_ok())
}

fn free_port(free: impl Fn(u16) -> bool) -> u16 {
    use rand::Rng;
    for _ in 0..1000 {
        let p = rand::rng().random_range(10_000..20_000);
        if free(p) {
            return p;
        }
    }
    panic!("no free port in 10000-19999");
}

/// A running relay child process.
pub struct Relay {
    pub child: Child,
    pub listen: SocketAddr,
    pub metrics: SocketAddr,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

/// Path of the relay binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_peerlink-relay")
}

impl Relay {
    /// Start with `--io <io>` on loopback, user `user:pass`, REST secret `secret`, loopback peers
    /// allowed, plus `extra` args; waits until /readyz answers 200.
    pub fn start(io: &str, extra: &[&str]) -> Relay {
        Self::start_env(io, extra, &[])
    }

    /// Like `start` with extra environment variables.
    pub fn start_env(io: &str, extra: &[&str], env: &[(&str, &str)]) -> Relay {
        Self::start_full(io, "127.0.0.1", extra, env, None)
    }

    /// Like `start`, listening and relaying on IPv6 loopback (`::1`).
    pub fn start_v6(io: &str, extra: &[&str]) -> Relay {
        Self::start_full(io, "::1", extra, &[], None)
    }

    /// Like `start` with RLIMIT_NOFILE (soft and hard) set to `nofile` for the relay process.
    pub fn start_nofile(io: &str, extra: &[&str], nofile: u64) -> Relay {
        Self::start_full(io, "127.0.0.1", extra, &[], Some(nofile))
    }

    fn start_full(
        io: &str,
        host: &str,
        extra: &[&str],
        env: &[(&str, &str)],
        nofile: Option<u64>,
    ) -> Relay {
        let ip: std::net::IpAddr = host.parse().unwrap();
        let allow = if ip.is_ipv4() {
            "127.0.0.0/8"
        } else {
            "::1/128"
        };
        for _attempt in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            let log = dir.path().join("relay.log");
            let listen = SocketAddr::new(ip, free_udp_port());
            let metrics: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
            // `extra` may name its own relay IPs and worker count instead of the defaults.
            let relay_ip: &[&str] = if extra.contains(&"--relay-ip") {
                &[]
            } else {
                &["--relay-ip", host]
            };
            let workers: &[&str] = if extra.contains(&"--workers") {
                &[]
            } else {
                &["--workers", "2"]
            };
            let log_flags: &[&str] = if extra.contains(&"--log") {
                &[]
            } else {
                &["--log-level", "info"]
            };
            let mut args: Vec<String> = [
                "--listen",
                &listen.to_string(),
                "--realm",
                "peerlink",
                "--user",
                "user:pass",
                "--auth-secret",
                "secret",
                "--allow-peer",
                allow,
                "--io",
                io,
                "--metrics",
                &metrics.to_string(),
            ]
            .iter()
            .chain(log_flags)
            .chain(relay_ip)
            .chain(workers)
            .map(|s| s.to_string())
            .collect();
            args.extend(extra.iter().map(|s| s.to_string()));
            let logf = std::fs::File::create(&log).unwrap();
            let mut cmd = Command::new(bin());
            cmd.args(&args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(logf)
                .env_remove("PEERLINK_RELAY_AUTH_SECRET")
                .env_remove("PEERLINK_RELAY_DISABLE_IO_URING")
                .env_remove("PEERLINK_RELAY_URING_CQ_ENTRIES");
            for (k, v) in env {
                cmd.env(k, v);
            }
            if let Some(n) = nofile {
                use std::os::unix::process::CommandExt;
                let lim = libc::rlimit {
                    rlim_cur: n,
                    rlim_max: n,
                };
                // SAFETY: setrlimit is async-signal-safe; `lim` is a plain value moved in.
                unsafe {
                    cmd.pre_exec(move || {
                        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                            Ok(())
                        } else {
                            Err(std::io::Error::last_os_error())
                        }
                    });
                }
            }
            let child = cmd.spawn().unwrap();
            let mut relay = Relay {
                child,
                listen,
                metrics,
                log,
                _dir: dir,
            };
            let deadline = Instant::now() + STEP;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = relay.child.try_wait() {
                    break;
                }
                if let Ok((200, _)) = relay.get("/readyz") {
                    return relay;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            // A port raced away or a slow start: show the log and retry with new ports.
            eprintln!("relay did not become ready; log:\n{}", relay.log_text());
        }
        panic!("relay failed to start three times");
    }

    /// The relay's stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// GET `path` on the metrics port -> (status, body).
    pub fn get(&self, path: &str) -> std::io::Result<(u16, String)> {
        http_get(self.metrics, path)
    }

    /// A counter from /stats.
    pub fn stat(&self, name: &str) -> u64 {
        let (_, body) = self.get("/stats").unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        if name == "allocations_active" {
            return v["allocations_active"].as_u64().unwrap();
        }
        v["counters"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("no counter {name}"))
    }

    /// Wait (bounded) until `f()` holds, polling.
    pub fn wait_until(&self, what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if f() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "timed out waiting for {what}; relay log:\n{}",
            self.log_text()
        );
    }

    /// Send a signal.
    pub fn signal(&self, sig: i32) {
        // SAFETY (test): signalling our own child by pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Wait for exit (bounded).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_child(&mut self.child, timeout)
    }

    /// Open fds of the relay process.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    /// Open fds of the relay process with what they point at (for diagnostics).
    pub fn fd_list(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| {
                let target = std::fs::read_link(e.path()).unwrap_or_default();
                format!(
                    "{} -> {}",
                    e.file_name().to_string_lossy(),
                    target.display()
                )
            })
            .collect();
        v.sort();
        v
    }

    /// Resident set size in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Wait for a child to exit, bounded.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Minimal HTTP/1.1 GET with timeouts.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(STEP))?;
    s.set_write_timeout(Some(STEP))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}

/// A child process killed on drop (for coturn's tools).
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An owned response.
pub struct Response {
    pub bytes: Vec<u8>,
}

impl Response {
    pub fn msg(&self) -> Message<'_> {
        Message::parse(&self.bytes).unwrap()
    }
    pub fn class(&self) -> Class {
        self.msg().class()
    }
    pub fn error_code(&self) -> Option<u16> {
        self.msg()
            .get::<ErrorCode>()
            .and_then(|r| r.ok())
            .map(|e| e.code)
    }
}

/// A small TURN client (UDP) with long-term credentials.
pub struct TurnClient {
    pub sock: UdpSocket,
    pub server: SocketAddr,
    user: String,
    key: [u8; 16],
    realm: Option<String>,
    nonce: Option<String>,
    pass: String,
}

impl TurnClient {
    pub fn new(server: SocketAddr, user: &str, pass: &str) -> Self {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        Self {
            sock,
            server,
            user: user.into(),
            key: [0; 16],
            realm: None,
            nonce: None,
            pass: pass.into(),
        }
    }

    pub fn local(&self) -> SocketAddr {
        self.sock.local_addr().unwrap()
    }

    fn build(
        &self,
        typ: MessageType,
        tid: TransactionId,
        auth: bool,
        add: &dyn Fn(&mut MessageBuilder<'_>),
    ) -> Vec<u8> {
        let mut buf = vec![0u8; 2048];
        let mut b = MessageBuilder::new(&mut buf, typ, tid).unwrap();
        add(&mut b);
        if auth && let (Some(realm), Some(nonce)) = (&self.realm, &self.nonce) {
            b.add(&Username(&self.user)).unwrap();
            b.add(&Realm(realm)).unwrap();
            b.add(&Nonce(nonce)).unwrap();
            b.add_integrity(&self.key).unwrap();
        }
        b.add_fingerprint().unwrap();
        let n = b.finish();
        buf.truncate(n);
        buf
    }

    /// Send a request (retransmitting) and return its response; handles 401/438 once by
    /// (re)authenticating.
    pub fn request(
        &mut self,
        method: Method,
        add: &dyn Fn(&mut MessageBuilder<'_>),
    ) -> Option<Response> {
        for _ in 0..3 {
            let tid = TransactionId::random(&mut rand::rng());
            let typ = MessageType::new(Class::Request, method);
            let req = self.build(typ, tid, true, add);
            let resp = self.transact(&req, tid)?;
            match resp.error_code() {
                Some(401) | Some(438) if resp.class() == Class::Error => {
                    let m = resp.msg();
                    let realm = m
                        .get::<Realm>()
                        .and_then(|r| r.ok())
                        .map(|r| r.0.to_string());
                    let nonce = m
                        .get::<Nonce>()
                        .and_then(|r| r.ok())
                        .map(|r| r.0.to_string());
                    let had = self.nonce.is_some() && resp.error_code() == Some(401);
                    if let (Some(realm), Some(nonce)) = (realm, nonce) {
                        self.key = long_term_key(&self.user, &realm, &self.pass);
                        self.realm = Some(realm);
                        self.nonce = Some(nonce);
                    }
                    if had {
                        return Some(resp);
                    }
                }
                _ => return Some(resp),
            }
        }
        None
    }

    fn transact(&self, req: &[u8], tid: TransactionId) -> Option<Response> {
        let mut buf = vec![0u8; 65536];
        for _ in 0..6 {
            self.sock.send_to(req, self.server).unwrap();
            let deadline = Instant::now() + Duration::from_millis(500);
            while Instant::now() < deadline {
                match self.sock.recv_from(&mut buf) {
                    Ok((n, _)) => {
                        if let Ok(m) = Message::parse(&buf[..n])
                            && m.transaction_id() == tid
                        {
                            return Some(Response {
                                bytes: buf[..n].to_vec(),
                            });
                        }
                    }
                    Err(_) => break,
                }
            }
        }
        None
    }

    /// Allocate; Ok(relayed address) or Err(error code).
    pub fn allocate(&mut self) -> Result<SocketAddr, u16> {
        let r = self
            .request(Method::ALLOCATE, &|b| {
                b.add(&RequestedTransport::UDP).unwrap()
            })
            .ok_or(0u16)?;
        if r.class() == Class::Success {
            let relayed = r.msg().get::<XorRelayedAddress>().unwrap().unwrap().0;
            Ok(relayed)
        } else {
            Err(r.error_code().unwrap_or(0))
        }
    }

    /// The XOR-MAPPED-ADDRESS of the last successful Allocate/Binding.
    pub fn binding(&mut self) -> Option<SocketAddr> {
        let r = self.request(Method::BINDING, &|_| {})?;
        r.msg()
            .get::<XorMappedAddress>()
            .and_then(|a| a.ok())
            .map(|a| a.0)
    }

    pub fn refresh(&mut self, lifetime: u32) -> Result<(), u16> {
        let r = self
            .request(Method::REFRESH, &|b| b.add(&Lifetime(lifetime)).unwrap())
            .ok_or(0u16)?;
        if r.class() == Class::Success {
            Ok(())
        } else {
            Err(r.error_code().unwrap_or(0))
        }
    }

    pub fn create_permission(&mut self, peer: SocketAddr) -> Result<(), u16> {
        let r = self
            .request(Method::CREATE_PERMISSION, &|b| {
                b.add(&XorPeerAddress(peer)).unwrap()
            })
            .ok_or(0u16)?;
        if r.class() == Class::Success {
            Ok(())
        } else {
            Err(r.error_code().unwrap_or(0))
        }
    }

    pub fn channel_bind(&mut self, channel: u16, peer: SocketAddr) -> Result<(), u16> {
        let r = self
            .request(Method::CHANNEL_BIND, &|b| {
                b.add(&ChannelNumber(channel)).unwrap();
                b.add(&XorPeerAddress(peer)).unwrap();
            })
            .ok_or(0u16)?;
        if r.class() == Class::Success {
            Ok(())
        } else {
            Err(r.error_code().unwrap_or(0))
        }
    }

    pub fn send_indication(&self, peer: SocketAddr, data: &[u8]) {
        let tid = TransactionId::random(&mut rand::rng());
        let msg = self.build(MessageType::SEND_INDICATION, tid, false, &|b| {
            b.add(&XorPeerAddress(peer)).unwrap();
            b.add(&Data(data)).unwrap();
        });
        self.sock.send_to(&msg, self.server).unwrap();
    }

    pub fn send_channel(&self, channel: u16, data: &[u8]) {
        let mut msg = Vec::with_capacity(4 + data.len() + 3);
        msg.extend_from_slice(&channel.to_be_bytes());
        msg.extend_from_slice(&(data.len() as u16).to_be_bytes());
        msg.extend_from_slice(data);
        while msg.len() % 4 != 0 {
            msg.push(0);
        }
        self.sock.send_to(&msg, self.server).unwrap();
    }

    /// Next datagram from the server within `timeout`.
    pub fn recv(&self, timeout: Duration) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 65536];
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok((n, _)) = self.sock.recv_from(&mut buf) {
                return Some(buf[..n].to_vec());
            }
        }
        None
    }
}

/// A UDP peer on loopback.
pub fn peer() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    s
}

/// Receive one datagram on `s` within `timeout`.
pub fn recv_from(s: &UdpSocket, timeout: Duration) -> Option<(Vec<u8>, SocketAddr)> {
    let mut buf = vec![0u8; 65536];
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok((n, from)) = s.recv_from(&mut buf) {
            return Some((buf[..n].to_vec(), from));
        }
    }
    None
}
