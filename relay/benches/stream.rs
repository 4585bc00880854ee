//! TURN over TCP and TLS, priced: relay memory per idle connection and TCP forwarding against
//! coturn. Prints figures; asserts nothing about speed.
//!
//! 1. RSS per idle connection: the relay (`--workers 2`) before and after 10,000 TCP, then
//!    10,000 TLS connections that each completed one Binding transaction and then stay quiet.
//! 2. Forwarding over TCP: `CLIENTS` TCP clients allocate, bind a channel to a UDP peer socket
//!    and send 172-byte ChannelData as fast as their connection takes it for `SECONDS`; the
//!    peers count what arrives. Figures: datagrams/s at the peers and the relay's CPU time per
//!    datagram (all its threads, from `/proc/PID/task/*/schedstat`). Run against
//!    peerlink-relay on both backends (one worker) and coturn's `turnserver` TCP listener (one
//!    relay thread), started in the same run on loopback.
//!
//! `cargo bench -p peerlink-relay --bench stream` (needs the Debian `coturn` package for the
//! comparison; without it that row is skipped).

#![allow(clippy::unwrap_used)] // a benchmark program: a failed unwrap is a failed run

#[path = "../tests/common/stream_client.rs"]
mod stream_client;

use std::io::Write;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use stream_client::{StreamClient, Transport, tcp_connect, tls_connect, write_cert};

const IDLE_CONNECTIONS: usize = 10_000;
const CLIENTS: usize = 4;
const SECONDS: u64 = 5;
const PAYLOAD: usize = 172;
const CHANNEL: u16 = 0x4001;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let p = l.local_addr().unwrap().port();
    drop(l);
    p
}

fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a valid struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    lim.rlim_cur
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

fn cpu_ns(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

fn wait_tcp(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(addr).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing listens on {addr}");
}

/// peerlink-relay with a TCP and a TLS listener.
fn start_peerlink(io: &str, workers: usize, dir: &Path) -> (Proc, SocketAddr, SocketAddr) {
    let (cert, key, _) = write_cert(dir);
    let udp = free_port();
    let tcp: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let tls: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_peerlink-relay"))
        .args([
            "--listen",
            &format!("127.0.0.1:{udp}"),
            "--relay-ip",
            "127.0.0.1",
        ])
        .args(["--user", "user:pass", "--allow-peer", "127.0.0.0/8"])
        .args(["--metrics", &format!("127.0.0.1:{}", free_port())])
        .args([
            "--io",
            io,
            "--workers",
            &workers.to_string(),
            "--log",
            "warn",
        ])
        .args([
            "--listen-tcp",
            &tcp.to_string(),
            "--listen-tls",
            &tls.to_string(),
        ])
        .args([
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ])
        .args([
            "--max-stream-connections",
            "30000",
            "--stream-idle-timeout",
            "3600",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let p = Proc(child);
    wait_tcp(tcp);
    (p, tcp, tls)
}

/// coturn's turnserver with its TCP listener (TLS and DTLS off), one relay thread.
fn start_coturn(dir: &Path) -> Option<(Proc, SocketAddr)> {
    let port = free_port();
    let child = Command::new("turnserver")
        .args([
            "-n",
            "--listening-ip",
            "127.0.0.1",
            "--listening-port",
            &port.to_string(),
        ])
        .args([
            "--relay-ip",
            "127.0.0.1",
            "--lt-cred-mech",
            "--user",
            "user:pass",
        ])
        .args(["--realm", "peerlink", "--allow-loopback-peers"])
        .args([
            "--no-tls",
            "--no-dtls",
            "--no-tcp-relay",
            "--no-cli",
            "--relay-threads",
            "1",
        ])
        .arg("--log-file")
        .arg(dir.join("turnserver.log"))
        .args(["--no-stdout-log", "--simple-log"])
        .arg("--pidfile")
        .arg(dir.join("turnserver.pid"))
        .arg("--db")
        .arg(dir.join("turndb"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let p = Proc(child);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_tcp(addr);
    Some((p, addr))
}

/// RSS per idle connection (bytes) for `n` connections made by `connect`.
fn idle_rss(pid: u32, n: usize, connect: &dyn Fn() -> Transport) -> (f64, Duration) {
    std::thread::sleep(Duration::from_millis(500));
    let before = rss_kib(pid);
    let t0 = Instant::now();
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let mut c = StreamClient::new(connect(), "user", "pass");
        assert!(c.binding_ok(), "Binding over a fresh connection");
        held.push(c);
    }
    let took = t0.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let after = rss_kib(pid);
    drop(held);
    (
        (after.saturating_sub(before) * 1024) as f64 / n as f64,
        took,
    )
}

/// Forwarding over TCP to `server`: (datagrams/s at the peers, relay CPU ns per datagram).
fn forward(pid: u32, server: SocketAddr) -> (f64, f64) {
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    let mut senders = Vec::new();
    for _ in 0..CLIENTS {
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        peer.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut c = StreamClient::new(tcp_connect(server), "user", "pass");
        c.allocate().unwrap();
        let peer_addr = peer.local_addr().unwrap();
        c.create_permission(peer_addr).unwrap();
        c.channel_bind(CHANNEL, peer_addr).unwrap();
        let (stop2, got) = (stop.clone(), received.clone());
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop2.load(Ordering::Relaxed) {
                if peer.recv(&mut buf).is_ok() {
                    got.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
        senders.push(c);
    }
    // 64 ChannelData frames per write (172 bytes: no padding needed).
    let mut batch = Vec::new();
    for _ in 0..64 {
        batch.extend_from_slice(&CHANNEL.to_be_bytes());
        batch.extend_from_slice(&(PAYLOAD as u16).to_be_bytes());
        batch.extend(std::iter::repeat_n(0x42u8, PAYLOAD));
    }
    let batch = Arc::new(batch);
    std::thread::sleep(Duration::from_millis(300));
    let (cpu0, got0, t0) = (
        cpu_ns(pid),
        received.load(Ordering::Relaxed),
        Instant::now(),
    );
    for c in senders {
        let (stop2, batch) = (stop.clone(), batch.clone());
        threads.push(std::thread::spawn(move || {
            let Transport::Tcp(mut s) = c.io else { return };
            s.set_write_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            while !stop2.load(Ordering::Relaxed) {
                let _ = s.write_all(&batch);
            }
        }));
    }
    std::thread::sleep(Duration::from_secs(SECONDS));
    let (cpu1, got1, t1) = (
        cpu_ns(pid),
        received.load(Ordering::Relaxed),
        Instant::now(),
    );
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let n = (got1 - got0).max(1);
    (
        n as f64 / (t1 - t0).as_secs_f64(),
        (cpu1 - cpu0) as f64 / n as f64,
    )
}

fn main() {
    let nofile = raise_nofile();
    let dir = tempfile::tempdir().unwrap();
    println!("# TURN over TCP/TLS (RLIMIT_NOFILE {nofile})");

    let (relay, tcp, tls) = start_peerlink("uring", 2, dir.path());
    let pid = relay.0.id();
    let (per_tcp, t_tcp) = idle_rss(pid, IDLE_CONNECTIONS, &|| tcp_connect(tcp));
    println!(
        "idle RSS per TCP connection: {per_tcp:.0} bytes ({IDLE_CONNECTIONS} connections, set up in {:.1} s)",
        t_tcp.as_secs_f64()
    );
    let (per_tls, t_tls) = idle_rss(pid, IDLE_CONNECTIONS, &|| tls_connect(tls).0);
    println!(
        "idle RSS per TLS connection: {per_tls:.0} bytes ({IDLE_CONNECTIONS} connections, set up in {:.1} s)",
        t_tls.as_secs_f64()
    );
    drop(relay);

    println!("# TCP forwarding: {CLIENTS} clients, {PAYLOAD}-byte ChannelData, {SECONDS} s each");
    for io in ["uring", "epoll"] {
        let sub = dir.path().join(io);
        std::fs::create_dir_all(&sub).unwrap();
        let (relay, tcp, _) = start_peerlink(io, 1, &sub);
        let (pps, ns) = forward(relay.0.id(), tcp);
        println!(
            "peerlink-relay ({io}, 1 worker): {pps:.0} datagrams/s, {ns:.0} ns CPU per datagram"
        );
    }
    let sub = dir.path().join("coturn");
    std::fs::create_dir_all(&sub).unwrap();
    match start_coturn(&sub) {
        Some((coturn, addr)) => {
            let (pps, ns) = forward(coturn.0.id(), addr);
            println!(
                "coturn turnserver (1 relay thread): {pps:.0} datagrams/s, {ns:.0} ns CPU per datagram"
            );
        }
        None => println!("coturn turnserver not installed: skipped"),
    }
}
