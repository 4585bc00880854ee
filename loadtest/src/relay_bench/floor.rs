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

use super::traffic::Priority;
use crate::fleet::stats;

/// The datagram that asks the echo for its stats.
pub const STATS_QUERY: &[u8] = b"peerlink-floor-stats?";

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
pub fn serve(listen: SocketAddr, lifetime: Duration) -> io::Result<()> {
    let sock = UdpSocket::bind(listen)?;
    serve_socket(&sock, lifetime)
}

fn serve_socket(sock: &UdpSocket, lifetime: Duration) -> io::Result<()> {
    let fd = sock.as_raw_fd();
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

    let mut interval = stats::histogram();
    let mut last = stats::histogram();
    let start = Instant::now();
    let mut rotate_at = start + INTERVAL;
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
                let doc = stats_json(&last).to_string();
                // SAFETY: the reply bytes and the sender's address (as the kernel wrote it, with
                // its length) are valid for the call.
                unsafe {
                    libc::sendto(
                        fd,
                        doc.as_ptr().cast(),
                        doc.len(),
                        libc::MSG_DONTWAIT,
                        std::ptr::from_ref(&names[i]).cast(),
                        h.msg_namelen,
                    )
                };
                continue;
            }
            if let Some(ts) = rx_timestamp_ns(h) {
                stats::record(&mut interval, now_ns.saturating_sub(ts) / 1000);
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
        let now = Instant::now();
        if now >= rotate_at {
            std::mem::swap(&mut last, &mut interval);
            interval.reset();
            rotate_at = now + INTERVAL;
        }
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
    ) -> io::Result<Self> {
        let addr = UdpSocket::bind((ip, 0))?.local_addr()?;
        let mut cmd = Command::new(exe);
        cmd.arg("floor-echo")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--lifetime-secs")
            .arg(lifetime.as_secs().max(1).to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        super::server::place(&mut cmd, cpu, priority);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echoes_every_datagram_and_reports_its_latency() {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        let server = std::thread::spawn(move || serve_socket(&sock, Duration::from_secs(2)));
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
