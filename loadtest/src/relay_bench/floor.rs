//! The latency floor of the half-load probe: a bare UDP echo that does no work at all, pinned
//! and scheduled exactly like the relay under test and measured the same way (kernel receive
//! timestamp -> send, one clock read per batch, a histogram rotated every second).
//!
//! The relay's in-relay latency includes what no relay can avoid on this placement: the wake-up
//! of a sleeping thread on another core (an inter-processor interrupt; on a virtual machine, the
//! exit and re-entry of a halted vCPU) and whatever the machine does meanwhile. The echo pays the
//! same and nothing else, so `relay p99 / floor p99`, measured in the same run with the same
//! traffic, says how much the relay itself adds.
//!
//! The echo runs as its own process (`peerlink-loadtest floor-echo`): one socket, blocking
//! `recvmmsg` (`MSG_WAITFORONE`) with `SO_TIMESTAMPNS`, and `sendmmsg` of every datagram back to
//! its sender. A datagram equal to [`STATS_QUERY`] is answered with the last complete second's
//! percentiles, as JSON in the shape of the relay's `/stats` (`latency_interval_us`).

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use super::traffic::Priority;
use crate::fleet::stats;

/// The datagram that asks the echo for its stats.
pub const STATS_QUERY: &[u8] = b"peerlink-floor-stats?";

/// How the echo receives and sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FloorIo {
    /// Blocking `recvmmsg` and `sendmmsg`: the cheapest wake-up path there is.
    Recvmmsg,
    /// io_uring as the relay's io_uring worker uses it: its floor against the `recvmmsg`
    /// one is what io_uring's own wake-up and completion path costs.
    Uring,
}

impl FloorIo {
    /// Label in tables.
    pub fn label(self) -> &'static str {
        match self {
            FloorIo::Recvmmsg => "floor (bare UDP echo)",
            FloorIo::Uring => "floor (io_uring echo)",
        }
    }
}

/// Datagrams per `recvmmsg`.
const BATCH: usize = 64;
/// Receive buffer per datagram (the benchmark's packets are 176 bytes).
const BUF: usize = 2048;
/// Control buffer per datagram, in u64 words (cmsg alignment): one `SCM_TIMESTAMPNS`.
const CONTROL_WORDS: usize = 8;
/// Histogram rotation, as the relay's reports.
const INTERVAL: Duration = Duration::from_secs(1);
/// How often a blocked receive wakes to check the lifetime and rotate.
const RECV_TIMEOUT: Duration = Duration::from_millis(50);

/// The stats document: `{"latency_interval_us": {count, mean, p50, p90, p99, p999, max}}`.
fn stats_json(h: &Histogram<u64>) -> serde_json::Value {
    serde_json::json!({ "latency_interval_us": stats::Percentiles::of(h) })
}

/// An echo's latency, kept as the relay keeps its own: the current second's histogram and the
/// last complete one's (what a stats query gets).
struct Latency {
    interval: Histogram<u64>,
    last: Histogram<u64>,
    rotate_at: Instant,
}

impl Latency {
    fn new(now: Instant) -> Self {
        Self {
            interval: stats::histogram(),
            last: stats::histogram(),
            rotate_at: now + INTERVAL,
        }
    }

    /// One datagram received at kernel time `rx_ns` and sent at `sent_ns` (ns since the epoch).
    fn record(&mut self, rx_ns: u64, sent_ns: u64) {
        stats::record(&mut self.interval, sent_ns.saturating_sub(rx_ns) / 1000);
    }

    /// Starts the next second once this one is over.
    fn rotate(&mut self, now: Instant) {
        if now >= self.rotate_at {
            std::mem::swap(&mut self.last, &mut self.interval);
            self.interval.reset();
            self.rotate_at = now + INTERVAL;
        }
    }

    /// Answers a [`STATS_QUERY`] from `to` (its first `len` bytes are the sender's address, as
    /// the kernel wrote it) with the last second.
    fn answer(&self, fd: std::os::fd::RawFd, to: &libc::sockaddr_storage, len: libc::socklen_t) {
        let doc = stats_json(&self.last).to_string();
        let len = len.min(size_of::<libc::sockaddr_storage>() as libc::socklen_t);
        // SAFETY: the reply bytes and `to` (at most its own size) are valid for the call.
        unsafe {
            libc::sendto(
                fd,
                doc.as_ptr().cast(),
                doc.len(),
                libc::MSG_DONTWAIT,
                std::ptr::from_ref(to).cast(),
                len,
            )
        };
    }
}

fn realtime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec on the stack.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The `SCM_TIMESTAMPNS` of a received message, in ns since the epoch.
fn rx_timestamp_ns(msg: &libc::msghdr) -> Option<u64> {
    // SAFETY: `msg` is the header recvmmsg filled: msg_control/msg_controllen describe our
    // control buffer, and the CMSG macros stay inside it.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                let ts = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::timespec>());
                return Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64);
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    None
}

/// Runs the echo on `listen` for `lifetime` (then returns): the `floor-echo` subcommand.
pub fn serve(listen: SocketAddr, lifetime: Duration, io: FloorIo) -> io::Result<()> {
    let sock = UdpSocket::bind(listen)?;
    match io {
        FloorIo::Recvmmsg => serve_socket(&sock, lifetime),
        FloorIo::Uring => serve_socket_uring(&sock, lifetime),
    }
}

fn enable_timestamps(fd: std::os::fd::RawFd) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: valid fd, option value is a c_int on the stack.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            std::ptr::from_ref(&one).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn serve_socket(sock: &UdpSocket, lifetime: Duration) -> io::Result<()> {
    let fd = sock.as_raw_fd();
    enable_timestamps(fd)?;
    let _ = socket2::SockRef::from(sock).set_recv_buffer_size(4 << 20);
    sock.set_read_timeout(Some(RECV_TIMEOUT))?;

    let mut bufs = vec![[0u8; BUF]; BATCH];
    // SAFETY: sockaddr_storage is plain old data; all-zero is valid.
    let mut names: Vec<libc::sockaddr_storage> = vec![unsafe { std::mem::zeroed() }; BATCH];
    let mut controls = vec![[0u64; CONTROL_WORDS]; BATCH];
    let mut iovs: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: BUF,
        })
        .collect();
    // SAFETY: mmsghdr is plain old data; all-zero (null pointers, zero lengths) is valid.
    let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; BATCH];
    let mut out: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; BATCH];
    let mut out_iovs: Vec<libc::iovec> = iovs.clone();
    // The receive headers point at their own name, iovec and control buffer for good (the
    // Vecs are never resized); only the in/out lengths are reset before every receive.
    for (i, m) in msgs.iter_mut().enumerate() {
        m.msg_hdr.msg_name = std::ptr::from_mut(&mut names[i]).cast();
        m.msg_hdr.msg_iov = &mut iovs[i];
        m.msg_hdr.msg_iovlen = 1;
        m.msg_hdr.msg_control = controls[i].as_mut_ptr().cast();
    }

    let start = Instant::now();
    let mut latency = Latency::new(start);
    while start.elapsed() < lifetime {
        for m in &mut msgs {
            m.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            m.msg_hdr.msg_controllen = size_of::<[u64; CONTROL_WORDS]>() as _;
            m.msg_hdr.msg_flags = 0;
        }
        // SAFETY: every header points at its own name, iovec (over its buffer) and control
        // buffer, all alive for the call; BATCH headers.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if !matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) {
                return Err(e);
            }
        }
        let now_ns = realtime_ns();
        let mut k = 0;
        for i in 0..n.max(0) as usize {
            let len = msgs[i].msg_len as usize;
            let h = &msgs[i].msg_hdr;
            if h.msg_flags & libc::MSG_TRUNC != 0 {
                continue;
            }
            if &bufs[i][..len] == STATS_QUERY {
                latency.answer(fd, &names[i], h.msg_namelen);
                continue;
            }
            if let Some(ts) = rx_timestamp_ns(h) {
                latency.record(ts, now_ns);
            }
            out_iovs[k] = libc::iovec {
                iov_base: bufs[i].as_mut_ptr().cast(),
                iov_len: len,
            };
            let o = &mut out[k].msg_hdr;
            o.msg_name = std::ptr::from_mut(&mut names[i]).cast();
            o.msg_namelen = h.msg_namelen;
            o.msg_iov = &mut out_iovs[k];
            o.msg_iovlen = 1;
            o.msg_control = std::ptr::null_mut();
            o.msg_controllen = 0;
            k += 1;
        }
        if k > 0 {
            // SAFETY: the first k headers point at live names and iovecs over our buffers.
            // A short count (full socket buffer) drops the rest, as a relay would.
            unsafe { libc::sendmmsg(fd, out.as_mut_ptr(), k as libc::c_uint, libc::MSG_DONTWAIT) };
        }
        latency.rotate(Instant::now());
    }
    Ok(())
}

/// Asks the echo at `addr` for its last second's stats.
pub fn query_stats(addr: SocketAddr, timeout: Duration) -> io::Result<serde_json::Value> {
    let ip: IpAddr = if addr.is_ipv4() {
        IpAddr::from([127, 0, 0, 1])
    } else {
        IpAddr::from(std::net::Ipv6Addr::LOCALHOST)
    };
    let s = UdpSocket::bind((ip, 0))?;
    s.set_read_timeout(Some(timeout))?;
    s.send_to(STATS_QUERY, addr)?;
    let mut buf = [0u8; 1024];
    let (n, _) = s.recv_from(&mut buf)?;
    serde_json::from_slice(&buf[..n]).map_err(io::Error::other)
}

/// The echo as a child process, pinned and scheduled like the servers; killed on drop.
#[derive(Debug)]
pub struct FloorProcess {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl FloorProcess {
    /// Starts `exe floor-echo` on a free port of `ip` and waits (bounded) for it to answer.
    pub fn start(
        exe: &Path,
        ip: IpAddr,
        cpu: Option<usize>,
        priority: Priority,
        lifetime: Duration,
        io: FloorIo,
    ) -> io::Result<Self> {
        let addr = UdpSocket::bind((ip, 0))?.local_addr()?;
        let mut cmd = Command::new(exe);
        let io_arg = clap::ValueEnum::to_possible_value(&io)
            .expect("every FloorIo is a --io value")
            .get_name()
            .to_owned();
        cmd.arg("floor-echo")
            .arg("--io")
            .arg(io_arg)
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--lifetime-secs")
            .arg(lifetime.as_secs().max(1).to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        super::server::place(&mut cmd, cpu, priority);
        peerlink_cli::process::die_with_parent(&mut cmd);
        let mut this = Self {
            child: cmd.spawn()?,
            addr,
        };
        let start = Instant::now();
        loop {
            if let Some(status) = this.child.try_wait()? {
                return Err(io::Error::other(format!("floor-echo exited: {status}")));
            }
            match query_stats(addr, Duration::from_millis(100)) {
                Ok(_) => return Ok(this),
                Err(e) if start.elapsed() > Duration::from_secs(10) => {
                    return Err(io::Error::other(format!("floor-echo not answering: {e}")));
                }
                Err(_) => {}
            }
        }
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for FloorProcess {
    fn drop(&mut self) {
        // Our own child, by pid; then reap it.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `SCM_TIMESTAMPNS` in `control`, a control area as the kernel wrote it into a received
/// buffer (at any alignment): copied into an aligned buffer and read by [`rx_timestamp_ns`].
fn control_timestamp_ns(control: &[u8]) -> Option<u64> {
    let mut aligned = [0u64; CONTROL_WORDS];
    let len = control.len().min(size_of_val(&aligned));
    // SAFETY: `len` bytes fit both the source slice and `aligned`.
    unsafe {
        std::ptr::copy_nonoverlapping(control.as_ptr(), aligned.as_mut_ptr().cast::<u8>(), len)
    };
    // SAFETY: msghdr is plain old data; all-zero is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_control = aligned.as_mut_ptr().cast();
    msg.msg_controllen = len as _;
    rx_timestamp_ns(&msg)
}

/// Provided buffers of the io_uring echo.
const URING_BUFFERS: u16 = 256;
/// Its buffer group.
const URING_BGID: u16 = 7;
/// `user_data` of its multishot receive (sends carry their buffer id).
const URING_RECV: u64 = u64::MAX;
/// Control area per received datagram: one `SCM_TIMESTAMPNS` (16-byte header + timespec).
const URING_CONTROL: usize = 32;
const _: () = assert!(URING_CONTROL <= CONTROL_WORDS * 8);

/// The provided-buffer ring of the io_uring echo: entries (page-aligned, as the kernel wants)
/// and the buffers they hand out.
struct EchoBufs {
    /// Ring entries; over-allocated by a page so that the entries can start on a page boundary.
    ring: Vec<u8>,
    first: usize,
    bufs: Vec<u8>,
    tail: u16,
}

impl EchoBufs {
    fn new() -> Self {
        let ring =
            vec![0u8; URING_BUFFERS as usize * size_of::<io_uring::types::BufRingEntry>() + 4096];
        let first = ring.as_ptr().align_offset(4096);
        let mut this = Self {
            ring,
            first,
            bufs: vec![0u8; URING_BUFFERS as usize * BUF],
            tail: 0,
        };
        for bid in 0..URING_BUFFERS {
            this.give(bid);
        }
        this.publish();
        this
    }

    fn entries(&mut self) -> *mut io_uring::types::BufRingEntry {
        // SAFETY: `first` is within `ring` and leaves room for every entry (see `new`).
        unsafe { self.ring.as_mut_ptr().add(self.first) }.cast()
    }

    /// Puts buffer `bid` back in the ring (visible to the kernel after `publish`).
    fn give(&mut self, bid: u16) {
        let addr = self.bufs[bid as usize * BUF..].as_mut_ptr() as u64;
        let slot = (self.tail & (URING_BUFFERS - 1)) as usize;
        // SAFETY: `slot` < URING_BUFFERS entries, all inside `ring`; we are the only writer.
        let e = unsafe { &mut *self.entries().add(slot) };
        e.set_addr(addr);
        e.set_len(BUF as u32);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Publishes the returned buffers: one release store of the ring's tail.
    fn publish(&mut self) {
        let tail = self.tail;
        // SAFETY: the ring's tail field lives in its first entry (kernel ABI), a u16 the
        // kernel reads concurrently, hence the atomic store.
        unsafe {
            let t = io_uring::types::BufRingEntry::tail(self.entries())
                .cast::<std::sync::atomic::AtomicU16>();
            (*t).store(tail, std::sync::atomic::Ordering::Release);
        }
    }

    fn buf(&self, bid: u16, len: usize) -> &[u8] {
        &self.bufs[bid as usize * BUF..bid as usize * BUF + len.min(BUF)]
    }
}

/// The echo on io_uring, set up like the relay's io_uring worker: a ring with
/// `SINGLE_ISSUER | DEFER_TASKRUN | COOP_TASKRUN | TASKRUN_FLAG`, one multishot `RECVMSG` into
/// a provided-buffer ring, every datagram sent back by a `SEND` (with destination address) of
/// the very buffer it arrived in, submitted in the same `io_uring_enter` that then waits for
/// the next datagram. Its floor against the `recvmmsg` echo's is what io_uring's own wake-up
/// and completion path costs.
fn serve_socket_uring(sock: &UdpSocket, lifetime: Duration) -> io::Result<()> {
    use io_uring::types::{Fd, RecvMsgOut, SubmitArgs, Timespec};
    use io_uring::{IoUring, cqueue, opcode};

    let fd = sock.as_raw_fd();
    enable_timestamps(fd)?;
    let _ = socket2::SockRef::from(sock).set_recv_buffer_size(4 << 20);
    // Declared before the ring, so dropped after it: the kernel never sees them freed.
    let mut bufs = EchoBufs::new();
    // SAFETY: msghdr is plain old data; all-zero is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_namelen = size_of::<libc::sockaddr_in6>() as u32;
    msg.msg_controllen = URING_CONTROL;
    // Where each buffer's datagram came from (the send's destination), per buffer id.
    // SAFETY: sockaddr_storage is plain old data; all-zero is valid.
    let mut from: Vec<libc::sockaddr_storage> =
        vec![unsafe { std::mem::zeroed() }; URING_BUFFERS as usize];

    let mut b = IoUring::builder();
    b.setup_single_issuer()
        .setup_defer_taskrun()
        .setup_coop_taskrun()
        .setup_taskrun_flag()
        .setup_cqsize(4096);
    let mut ring: IoUring = b.build(512)?;
    let ring_addr = bufs.entries() as u64;
    // SAFETY: the entries live in `bufs`, which outlives the ring.
    unsafe {
        ring.submitter()
            .register_buf_ring_with_flags(ring_addr, URING_BUFFERS, URING_BGID, 0)?;
    }
    let recv = opcode::RecvMsgMulti::new(Fd(fd), &msg, URING_BGID)
        .build()
        .user_data(URING_RECV);
    // SAFETY: `msg` outlives the ring; the buffers come from the registered ring.
    unsafe { ring.submission().push(&recv) }.map_err(|_| io::Error::other("sq full"))?;

    let start = Instant::now();
    let mut latency = Latency::new(start);
    let mut queued_sends = 0usize;
    let mut received: Vec<u64> = Vec::new();
    let mut cqes: Vec<cqueue::Entry> = Vec::new();
    while start.elapsed() < lifetime {
        // One clock read for the batch, right before the enter that submits its sends.
        let now_ns = realtime_ns();
        for ts in received.drain(..) {
            latency.record(ts, now_ns);
        }
        bufs.publish();
        let ts = Timespec::from(RECV_TIMEOUT);
        // The sends complete while they are submitted (MSG_DONTWAIT): wait for one more.
        match ring
            .submitter()
            .submit_with_args(queued_sends + 1, &SubmitArgs::new().timespec(&ts))
        {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR)) => {}
            Err(e) => return Err(e),
        }
        queued_sends = 0;
        // Copied out (the loop pushes SQEs); the Vec keeps its capacity from one wake-up to
        // the next.
        cqes.extend(ring.completion());
        for cqe in cqes.drain(..) {
            if cqe.user_data() != URING_RECV {
                // A send finished: its buffer goes back.
                bufs.give(cqe.user_data() as u16);
                continue;
            }
            if !cqueue::more(cqe.flags()) {
                // SAFETY: as for the first receive.
                unsafe { ring.submission().push(&recv) }
                    .map_err(|_| io::Error::other("sq full"))?;
            }
            let Some(bid) = cqueue::buffer_select(cqe.flags()) else {
                continue;
            };
            let Ok(len) = usize::try_from(cqe.result()) else {
                bufs.give(bid);
                continue;
            };
            let Ok(out) = RecvMsgOut::parse(bufs.buf(bid, len), &msg) else {
                bufs.give(bid);
                continue;
            };
            if out.is_payload_truncated() {
                bufs.give(bid);
                continue;
            }
            let name = out.name_data();
            let namelen = (out.incoming_name_len() as usize).min(name.len());
            // SAFETY: copies the kernel-written sockaddr (namelen bytes, <= sockaddr_in6)
            // into this buffer's aligned sockaddr_storage.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    name.as_ptr(),
                    std::ptr::from_mut(&mut from[bid as usize]).cast::<u8>(),
                    namelen,
                );
            }
            if let Some(ts) = control_timestamp_ns(out.control_data()) {
                received.push(ts);
            }
            let payload = out.payload_data();
            if payload == STATS_QUERY {
                latency.answer(fd, &from[bid as usize], namelen as libc::socklen_t);
                bufs.give(bid);
                continue;
            }
            let to = std::ptr::from_ref(&from[bid as usize]).cast::<libc::sockaddr>();
            let send = opcode::Send::new(Fd(fd), payload.as_ptr(), payload.len() as u32)
                .dest_addr(to)
                .dest_addr_len(namelen as libc::socklen_t)
                .flags(libc::MSG_DONTWAIT)
                .build()
                .user_data(u64::from(bid));
            // SAFETY: the payload (in buffer `bid`) and `from[bid]` stay untouched until the
            // send's completion gives the buffer back.
            if unsafe { ring.submission().push(&send) }.is_err() {
                bufs.give(bid);
                continue;
            }
            queued_sends += 1;
        }
        latency.rotate(Instant::now());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echoes_every_datagram_and_reports_its_latency() {
        check_echo(serve_socket);
    }

    #[test]
    fn the_io_uring_echo_does_the_same() {
        check_echo(serve_socket_uring);
    }

    fn check_echo(serve: fn(&UdpSocket, Duration) -> io::Result<()>) {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        let server = std::thread::spawn(move || serve(&sock, Duration::from_secs(2)));
        let c = UdpSocket::bind("127.0.0.1:0").unwrap();
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut got = 0;
        for i in 0..200u32 {
            let payload = i.to_be_bytes().repeat(44);
            c.send_to(&payload, addr).unwrap();
            let mut buf = [0u8; 512];
            let (n, from) = c.recv_from(&mut buf).unwrap();
            assert_eq!(from, addr);
            assert_eq!(&buf[..n], &payload[..], "echo {i}");
            got += 1;
        }
        assert_eq!(got, 200);
        // The samples show up in the stats once their second has been rotated out (the
        // receive timeout wakes the loop to rotate). The echoes may straddle a rotation, so
        // only some of them are certain to be in the last complete second.
        std::thread::sleep(Duration::from_millis(1200));
        let v = query_stats(addr, Duration::from_secs(2)).unwrap();
        let l = &v["latency_interval_us"];
        let count = l["count"].as_u64().unwrap();
        assert!((1..=200).contains(&count), "{v}");
        assert!(l["p99"].as_u64().unwrap() >= 1, "{v}");
        assert!(
            l["max"].as_u64().unwrap() >= l["p50"].as_u64().unwrap(),
            "{v}"
        );
        server.join().unwrap().unwrap();
    }
}
