//! A user-space delay line: this kernel has no `netem`, so delay and jitter come from a thread
//! that moves Ethernet frames between two veth ends of a "wire" namespace through a timed queue.
//!
//! Frames are read and written through `AF_PACKET` sockets with `PACKET_VNET_HDR`, so
//! checksum-offloaded and GSO frames cross the wire intact (the virtio header carries the
//! offload state). Each frame gets `delay ± jitter` (uniform, seeded RNG) and may be dropped
//! with `loss_percent` %; frames leave in order of their due time, so jitter reorders, as
//! on a real path.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering as AtomicOrdering};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{LabError, Result};
use crate::ns::{Netns, NsJoinHandle};

/// Longest idle sleep of the delay-line thread, which bounds how long stopping it takes.
const IDLE_POLL: Duration = Duration::from_millis(20);
/// Frames queued in the line at most (both directions); more are tail-dropped.
const QUEUE_LIMIT: usize = 65_536;
/// Frames read from one side per wake-up before serving the other side and the queue.
const READ_BATCH: usize = 256;
/// Kernel buffer for each packet socket, so a burst is not lost while the thread is descheduled.
const SOCKET_BUFFER: libc::c_int = 8 << 20;
/// Receive buffer: a 64 KiB GSO frame plus the 10-byte virtio header, with room to spare.
const FRAME_BUFFER: usize = 70_000;

/// Settings of one delay line.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WireConfig {
    pub delay: Duration,
    pub jitter: Duration,
    pub loss_percent: u8,
    pub seed: u64,
}

/// Counters of a delay line, both directions together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WireStats {
    /// Frames delivered to the far side.
    pub forwarded: u64,
    /// Frames dropped by the configured random loss.
    pub lost: u64,
    /// Frames dropped because the queue was full or the far side refused them.
    pub overflowed: u64,
}

#[derive(Default)]
struct Counters {
    forwarded: AtomicU64,
    lost: AtomicU64,
    overflowed: AtomicU64,
}

/// A running delay line; stopped and joined on drop.
pub(crate) struct DelayLine {
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    thread: Option<NsJoinHandle<()>>,
}

struct Queued {
    due: Instant,
    seq: u64,
    to_b: bool,
    frame: Vec<u8>,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Queued {
    // Reversed: BinaryHeap is a max-heap and we want the earliest due frame on top.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.due, other.seq).cmp(&(self.due, self.seq))
    }
}

impl DelayLine {
    /// Start a delay line inside `ns` between interfaces `if_a` and `if_b` (both must exist
    /// there and be up). Returns once both sockets are bound.
    pub(crate) fn start(ns: &Netns, if_a: &str, if_b: &str, cfg: WireConfig) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let (tx, rx) = std::sync::mpsc::sync_channel::<io::Result<()>>(1);
        let (a_name, b_name) = (if_a.to_owned(), if_b.to_owned());
        let (stop_t, counters_t) = (Arc::clone(&stop), Arc::clone(&counters));
        let thread = ns.spawn_thread("netlab-wire", move || {
            let sockets = open_packet_socket(&a_name).and_then(|a| {
                let b = open_packet_socket(&b_name)?;
                Ok((a, b))
            });
            match sockets {
                Ok((a, b)) => {
                    let _ = tx.send(Ok(()));
                    run_line(&a, &b, cfg, &stop_t, &counters_t);
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        })?;
        let ready = rx
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("delay-line thread ended before reporting")));
        let mut line = Self {
            stop,
            counters,
            thread: Some(thread),
        };
        if let Err(source) = ready {
            line.stop();
            return Err(LabError::Io {
                what: format!("opening packet sockets on {if_a}/{if_b} in {}", ns.name()),
                source,
            });
        }
        Ok(line)
    }

    /// Current counters.
    pub(crate) fn stats(&self) -> WireStats {
        WireStats {
            forwarded: self.counters.forwarded.load(AtomicOrdering::Relaxed),
            lost: self.counters.lost.load(AtomicOrdering::Relaxed),
            overflowed: self.counters.overflowed.load(AtomicOrdering::Relaxed),
        }
    }

    /// Stop the thread and wait for it (idempotent).
    pub(crate) fn stop(&mut self) {
        self.stop.store(true, AtomicOrdering::Relaxed);
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::warn!("delay-line thread panicked");
        }
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        self.stop();
    }
}

fn set_int_opt(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `fd` is an open socket; we pass a valid pointer to a c_int and its exact size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// An `AF_PACKET` raw socket bound to `ifname` (in the calling thread's namespace), carrying
/// virtio-net headers, ignoring its own outgoing frames, non-blocking.
fn open_packet_socket(ifname: &str) -> io::Result<OwnedFd> {
    // Protocol 0 at creation: receive nothing until bound to the one interface we want.
    // SAFETY: plain socket(2) call; the result is checked before use.
    let raw = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a freshly created descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let r = fd.as_raw_fd();
    set_int_opt(r, libc::SOL_PACKET, libc::PACKET_VNET_HDR, 1)?;
    set_int_opt(r, libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, 1)?;
    set_int_opt(r, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, SOCKET_BUFFER)?;
    set_int_opt(r, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, SOCKET_BUFFER)?;
    let ifindex = nix::net::if_::if_nametoindex(ifname).map_err(io::Error::from)?;
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as libc::c_ushort;
    sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
    sll.sll_ifindex = libc::c_int::try_from(ifindex)
        .map_err(|_| io::Error::other("interface index out of range"))?;
    // SAFETY: `sll` is a valid sockaddr_ll and we pass its exact size.
    let rc = unsafe {
        libc::bind(
            r,
            (&raw const sll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Receive one frame (virtio header included). `Ok(None)`: nothing to read now.
fn recv_frame(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: `buf` is valid for `buf.len()` bytes; `sll`/`len` describe a valid buffer.
        let n = unsafe {
            libc::recvfrom(
                fd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_TRUNC,
                (&raw mut sll).cast(),
                &raw mut len,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock => Ok(None),
                io::ErrorKind::Interrupted => continue,
                _ => Err(e),
            };
        }
        let n = n as usize;
        if sll.sll_pkttype == libc::PACKET_OUTGOING || n > buf.len() {
            // Our own transmissions (belt and braces) or a frame larger than any MTU here.
            continue;
        }
        return Ok(Some(n));
    }
}

fn send_frame(fd: RawFd, frame: &[u8]) -> io::Result<()> {
    // SAFETY: `frame` is valid for `frame.len()` bytes; the socket is bound, so no address.
    let n = unsafe { libc::send(fd, frame.as_ptr().cast(), frame.len(), 0) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Wait until one of the sockets is readable or `timeout` passes; returns (a, b) readiness.
fn wait_readable(a: RawFd, b: RawFd, timeout: Duration) -> (bool, bool) {
    let mut fds = [
        libc::pollfd {
            fd: a,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: b,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: `fds` is a valid array of 2 pollfd; `ts` is a valid timespec; no signal mask.
    let rc = unsafe { libc::ppoll(fds.as_mut_ptr(), 2, &raw const ts, std::ptr::null()) };
    if rc <= 0 {
        return (false, false);
    }
    let ready = |p: &libc::pollfd| p.revents & (libc::POLLIN | libc::POLLERR) != 0;
    (ready(&fds[0]), ready(&fds[1]))
}

fn run_line(a: &OwnedFd, b: &OwnedFd, cfg: WireConfig, stop: &AtomicBool, counters: &Counters) {
    let (a, b) = (a.as_raw_fd(), b.as_raw_fd());
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let jitter_ns = i64::try_from(cfg.jitter.as_nanos()).unwrap_or(i64::MAX);
    let mut queue: BinaryHeap<Queued> = BinaryHeap::new();
    let mut seq: u64 = 0;
    let mut buf = vec![0u8; FRAME_BUFFER];
    while !stop.load(AtomicOrdering::Relaxed) {
        let now = Instant::now();
        while queue.peek().is_some_and(|q| q.due <= now) {
            let Some(q) = queue.pop() else { break };
            let to = if q.to_b { b } else { a };
            match send_frame(to, &q.frame) {
                Ok(()) => counters.forwarded.fetch_add(1, AtomicOrdering::Relaxed),
                Err(_) => counters.overflowed.fetch_add(1, AtomicOrdering::Relaxed),
            };
        }
        let timeout = queue
            .peek()
            .map_or(IDLE_POLL, |q| q.due.saturating_duration_since(now))
            .min(IDLE_POLL);
        let (ra, rb) = wait_readable(a, b, timeout);
        for (ready, from, to_b) in [(ra, a, true), (rb, b, false)] {
            if !ready {
                continue;
            }
            for _ in 0..READ_BATCH {
                let n = match recv_frame(from, &mut buf) {
                    Ok(Some(n)) => n,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "delay line: receive failed");
                        // Do not spin on a persistent error; the stop flag is still honoured.
                        std::thread::sleep(IDLE_POLL);
                        break;
                    }
                };
                if cfg.loss_percent > 0 && rng.random_range(0..100u8) < cfg.loss_percent {
                    counters.lost.fetch_add(1, AtomicOrdering::Relaxed);
                    continue;
                }
                if queue.len() >= QUEUE_LIMIT {
                    counters.overflowed.fetch_add(1, AtomicOrdering::Relaxed);
                    continue;
                }
                let offset = if jitter_ns > 0 {
                    rng.random_range(-jitter_ns..=jitter_ns)
                } else {
                    0
                };
                let base = i64::try_from(cfg.delay.as_nanos()).unwrap_or(i64::MAX);
                let one_way =
                    Duration::from_nanos(u64::try_from(base.saturating_add(offset)).unwrap_or(0));
                queue.push(Queued {
                    due: Instant::now() + one_way,
                    seq,
                    to_b,
                    frame: buf[..n].to_vec(),
                });
                seq += 1;
            }
        }
    }
}
