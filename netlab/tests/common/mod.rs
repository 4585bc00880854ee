//! Helpers shared by the lab tests: root check, deadlines, bounded receives, a UDP puncher.
#![allow(dead_code)] // each test binary uses a different subset
#![allow(clippy::unwrap_used)] // test helpers unwrap

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use peerlink_netlab::Lab;

/// A fresh lab, or a clear failure when not root (CI runs these tests as root).
pub fn lab() -> Lab {
    match Lab::new() {
        Ok(lab) => lab,
        Err(e) => panic!(
            "peerlink-netlab tests need root with ip/nft/tc/conntrack installed \
             (scripts/setup.sh; CI runs as root): {e}"
        ),
    }
}

/// Run `body` on a thread and fail the test if it takes longer than `limit`.
///
/// On timeout the test panics on the calling thread; the process then exits and the
/// next `Lab::new` sweeps what the stuck body left behind.
pub fn with_deadline<T: Send + 'static>(
    limit: Duration,
    body: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        let out = body();
        let _ = tx.send(());
        out
    });
    match rx.recv_timeout(limit) {
        Ok(()) => handle.join().expect("test body panicked"),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => match handle.join() {
            Ok(_) => unreachable!("body finished without signalling"),
            Err(panic) => std::panic::resume_unwind(panic),
        },
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("test exceeded its deadline of {limit:?}")
        }
    }
}

/// Receive the first datagram accepted by `pred` within `timeout`.
pub fn recv_matching(
    sock: &UdpSocket,
    timeout: Duration,
    mut pred: impl FnMut(&[u8], SocketAddr) -> bool,
) -> Option<(Vec<u8>, SocketAddr)> {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 2048];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        sock.set_read_timeout(Some(left)).expect("set_read_timeout");
        match sock.recv_from(&mut buf) {
            Ok((n, from)) if pred(&buf[..n], from) => return Some((buf[..n].to_vec(), from)),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return None;
            }
            Err(e) => panic!("recv_from: {e}"),
        }
    }
}

/// Receive a datagram whose payload is exactly `payload`.
pub fn recv_payload(sock: &UdpSocket, payload: &[u8], timeout: Duration) -> Option<SocketAddr> {
    recv_matching(sock, timeout, |p, _| p == payload).map(|(_, from)| from)
}

/// Drain everything that arrives within `window`, returning the payloads.
pub fn drain(sock: &UdpSocket, window: Duration) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let deadline = Instant::now() + window;
    while let Some((p, _)) = recv_matching(
        sock,
        deadline.saturating_duration_since(Instant::now()),
        |_, _| true,
    ) {
        got.push(p);
    }
    got
}

/// What one side of a punch saw.
#[derive(Debug, Clone, Default)]
pub struct PunchSide {
    /// A packet of the peer arrived.
    pub heard_peer: bool,
    /// The peer told us it heard us.
    pub peer_heard_us: bool,
    /// Source of the first peer packet (mapped or peer-reflexive address of the peer).
    pub first_from: Option<SocketAddr>,
    /// Peer-reflexive addresses learned (sources other than the advertised mapped address).
    pub learned: Vec<SocketAddr>,
}

/// Interval between punch packets.
pub const PUNCH_INTERVAL: Duration = Duration::from_millis(20);
/// Rounds still sent after the first packet from the peer arrived.
pub const EXTRA_ROUNDS: u32 = 5;

fn punch_msg(pair: u32, side: u8, heard: bool) -> [u8; 7] {
    let p = pair.to_be_bytes();
    [b'P', p[0], p[1], p[2], p[3], side, u8::from(heard)]
}

/// Punch towards `peer_mapped` from `sock`: wait `start_delay`, then send every 20 ms for up
/// to `budget`; answer and add to the targets every source a peer packet comes from
/// (peer-reflexive learning); after hearing the peer, keep sending a few rounds and stop once
/// both sides know they heard each other. With `learn_prflx` false, packets from other
/// sources than `peer_mapped` still count as heard but are neither answered nor added.
pub fn punch(
    sock: &UdpSocket,
    pair: u32,
    side: u8,
    peer_mapped: SocketAddr,
    start_delay: Duration,
    budget: Duration,
    learn_prflx: bool,
) -> PunchSide {
    std::thread::sleep(start_delay);
    let mut out = PunchSide::default();
    let mut targets = vec![peer_mapped];
    let start = Instant::now();
    let mut next_send = start;
    let mut extra = 0u32;
    let mut buf = [0u8; 64];
    loop {
        let now = Instant::now();
        if now.duration_since(start) > budget
            || (out.heard_peer && out.peer_heard_us && extra >= EXTRA_ROUNDS)
        {
            break;
        }
        if now >= next_send {
            let msg = punch_msg(pair, side, out.heard_peer);
            for t in &targets {
                // A send error (e.g. ICMP-triggered ECONNREFUSED) is just a lost probe.
                let _ = sock.send_to(&msg, *t);
            }
            if out.heard_peer {
                extra += 1;
            }
            next_send += PUNCH_INTERVAL;
        }
        let wait = next_send
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        sock.set_read_timeout(Some(wait)).expect("set_read_timeout");
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            continue;
        };
        let p = &buf[..n];
        if n != 7 || p[0] != b'P' || p[1..5] != pair.to_be_bytes() || p[5] == side {
            continue;
        }
        if !out.heard_peer {
            out.first_from = Some(from);
        }
        out.heard_peer = true;
        out.peer_heard_us |= p[6] == 1;
        if !targets.contains(&from) {
            if !learn_prflx {
                // Only ever talk to the advertised address (a naive puncher).
                continue;
            }
            targets.push(from);
            out.learned.push(from);
        }
        let _ = sock.send_to(&punch_msg(pair, side, true), from);
    }
    out
}

/// A UDP echo server on its own thread, stopped and joined on drop.
pub struct Echo {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Echo {
    /// Echo every datagram arriving on `sock` back to its source.
    pub fn start(sock: UdpSocket) -> Echo {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop_t = std::sync::Arc::clone(&stop);
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop_t.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
        });
        Echo {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Send `count` datagrams (4-byte sequence numbers, padded to `size`) from `tx` to `to`,
/// paced in small bursts; count the distinct ones `rx` receives. Stops listening after
/// `quiet` without traffic once everything is sent.
pub fn blast(
    tx: &UdpSocket,
    rx: &UdpSocket,
    to: SocketAddr,
    count: u32,
    size: usize,
    quiet: Duration,
) -> usize {
    let rx = rx.try_clone().unwrap();
    // A large receive buffer, so a descheduled counter thread does not turn into "loss".
    let rcvbuf: libc::c_int = 4 << 20;
    // SAFETY: valid socket fd; pointer and length describe one c_int.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&rx),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const rcvbuf).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVBUFFORCE: {}", std::io::Error::last_os_error());
    let counter = std::thread::spawn(move || {
        let mut seen = std::collections::BTreeSet::new();
        let mut buf = [0u8; 2048];
        rx.set_read_timeout(Some(quiet)).unwrap();
        // The sender starts right away; the first read waits up to `quiet` for traffic.
        while let Ok((n, _)) = rx.recv_from(&mut buf) {
            if n >= 4 && buf[..4] != *b"warm" {
                seen.insert(u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]));
            }
        }
        seen.len()
    });
    let mut payload = vec![0u8; size.max(4)];
    for i in 0..count {
        payload[..4].copy_from_slice(&i.to_be_bytes());
        tx.send_to(&payload, to).unwrap();
        if i % 20 == 19 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    counter.join().unwrap()
}

/// Send "warm" datagrams until one arrives at `rx` (resolves ARP and opens NAT state), up to
/// `limit`; drains what is left so a following count starts clean.
pub fn warm_up(tx: &UdpSocket, rx: &UdpSocket, to: SocketAddr, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        assert!(
            Instant::now() < deadline,
            "warm-up: nothing got through to {to}"
        );
        tx.send_to(b"warm", to).unwrap();
        if recv_payload(rx, b"warm", Duration::from_millis(100)).is_some() {
            break;
        }
    }
    drain(rx, Duration::from_millis(100));
}
