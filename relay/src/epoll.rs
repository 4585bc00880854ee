//! The epoll backend: level-triggered epoll over the listener, the relayed sockets and the
//! TCP/TLS side's own epoll fd ([`crate::stream`]),
//! `recvmmsg` batches of [`BATCH`] into buffers that keep [`HEADROOM`] bytes in front of the
//! payload, and `sendmmsg` of forwards straight from those buffers (consecutive forwards from the
//! same socket go in one call). Used where io_uring is unavailable or with `--io epoll`.
//!
//! Same core, same counters, same latency measurement (kernel `SO_TIMESTAMPNS` from the
//! `recvmmsg` control area to the moment before `sendmmsg`).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use crate::core::{DropReason, HEADROOM};
use crate::metrics::Direction;
use crate::net::{self, RawAddr};
use crate::worker::{GEN_MASK, Source, WorkerCtx};

/// Datagrams per `recvmmsg` / `sendmmsg`.
pub const BATCH: usize = 32;
/// Payload capacity per receive buffer (same as the io_uring backend's).
pub const PAYLOAD_CAP: usize = crate::uring::BUF_SIZE - crate::uring::PAYLOAD_OFFSET;
/// Control bytes per message.
const CONTROL_SPACE: usize = 64;
/// `recvmmsg` rounds per ready socket per wakeup (fairness between sockets).
const MAX_ROUNDS: usize = 8;
/// Longest `epoll_wait` before the stop flag is looked at.
const MAX_WAIT: Duration = Duration::from_millis(50);
/// Token of the listener in epoll data.
const LISTENER_TOKEN: u64 = u64::MAX;
/// Token of the TCP/TLS side's own epoll fd (see [`crate::stream`]).
const STREAMS_TOKEN: u64 = u64::MAX - 1;

/// Errors of the epoll backend.
#[derive(Debug, thiserror::Error)]
pub enum EpollError {
    /// A system call failed.
    #[error("epoll backend: {0}")]
    Io(#[from] io::Error),
}

struct RxBatch {
    bufs: Vec<u8>,
    iovs: [libc::iovec; BATCH],
    names: [libc::sockaddr_in6; BATCH],
    controls: Vec<u8>,
    msgs: [libc::mmsghdr; BATCH],
}

/// A forward waiting for the batch's `sendmmsg`.
struct TxItem {
    fd: RawFd,
    idx: usize,
    start: usize,
    len: usize,
    addr: RawAddr,
    rx_ns: u64,
    direction: Direction,
}

fn epoll_ctl(ep: RawFd, op: i32, fd: RawFd, data: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: data,
    };
    // SAFETY: `ev` is a valid epoll_event for the call.
    let rc = unsafe { libc::epoll_ctl(ep, op, fd, &mut ev) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Run one worker on epoll until the stop flag is set.
pub fn run(mut ctx: WorkerCtx, busy_poll: Duration) -> Result<(), EpollError> {
    // SAFETY: plain syscall; the result is checked and owned.
    let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if raw < 0 {
        return Err(io::Error::last_os_error().into());
    }
    // SAFETY: `raw` is a fresh fd we own.
    let ep = unsafe { OwnedFd::from_raw_fd(raw) };
    let epfd = ep.as_raw_fd();
    epoll_ctl(
        epfd,
        libc::EPOLL_CTL_ADD,
        ctx.listener.as_raw_fd(),
        LISTENER_TOKEN,
    )?;
    if let Some(fd) = ctx.streams_fd() {
        epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd, STREAMS_TOKEN)?;
    }

    let stride = HEADROOM + PAYLOAD_CAP;
    let mut rx = Box::new(RxBatch {
        bufs: vec![0u8; stride * BATCH],
        iovs: [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; BATCH],
        // SAFETY: POD, zero is valid.
        names: unsafe { std::mem::zeroed() },
        controls: vec![0u8; CONTROL_SPACE * BATCH],
        // SAFETY: POD, zero is valid.
        msgs: unsafe { std::mem::zeroed() },
    });
    let mut tx: Vec<TxItem> = Vec::with_capacity(BATCH);
    // SAFETY: POD, zero is valid.
    let mut tx_msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    let mut tx_iovs = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; BATCH];
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    tracing::debug!(worker = ctx.index, "epoll worker started");

    // Whether the last wake-up had ready sockets (then `busy_poll` applies).
    let mut busy = false;
    while !ctx.should_stop() {
        let now = Instant::now();
        let wait = ctx.next_wake(now, MAX_WAIT).saturating_duration_since(now);
        let ms = wait.as_millis().min(i32::MAX as u128) as i32;
        let mut n = 0;
        if busy && !busy_poll.is_zero() {
            // Busy poll: epoll_wait without sleeping until a socket is ready or the budget
            // passes (one syscall per look: epoll has no shared-memory readiness flag).
            ctx.counters.busy_polls += 1;
            let until = now + busy_poll;
            loop {
                // SAFETY: `events` is a valid buffer of its length.
                n = unsafe { libc::epoll_wait(epfd, events.as_mut_ptr(), events.len() as i32, 0) };
                if n != 0 || Instant::now() >= until {
                    break;
                }
                std::hint::spin_loop();
            }
            if n > 0 {
                ctx.counters.busy_poll_hits += 1;
            }
        }
        if n == 0 {
            // SAFETY: `events` is a valid buffer of its length.
            n = unsafe { libc::epoll_wait(epfd, events.as_mut_ptr(), events.len() as i32, ms) };
        }
        busy = n > 0;
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e.into());
        }
        let now = Instant::now();
        for ev in events.iter().take(n as usize) {
            let data = ev.u64;
            if data == STREAMS_TOKEN {
                ctx.poll_streams(now);
                sync_sockets(&mut ctx, epfd)?;
                continue;
            }
            let (fd, src_kind) = if data == LISTENER_TOKEN {
                (ctx.listener.as_raw_fd(), Source::Listener)
            } else {
                let key = (data & 0xFFFF_FFFF) as usize;
                let generation = ((data >> 32) as u32) & GEN_MASK;
                // epoll keeps every relayed socket by fd (only io_uring releases them).
                match ctx.sockets.live(key, generation) {
                    Some(e) => match e.fd() {
                        Some(fd) => (fd, Source::Relayed(key, e.id)),
                        None => continue,
                    },
                    None => continue,
                }
            };
            for _ in 0..MAX_ROUNDS {
                let got = recv_batch(&mut rx, fd, stride)?;
                if got == 0 {
                    break;
                }
                for m in 0..got {
                    handle_one(&mut ctx, &mut rx, &mut tx, now, src_kind, m, stride);
                    // The core may have closed the socket this batch came from.
                    if let Source::Relayed(key, id) = src_kind
                        && ctx.sockets.slab.get(key).is_none_or(|e| e.id != id)
                    {
                        break;
                    }
                }
                flush(
                    &mut ctx,
                    &mut rx,
                    &mut tx,
                    &mut tx_msgs,
                    &mut tx_iovs,
                    stride,
                );
                sync_sockets(&mut ctx, epfd)?;
                if got < BATCH {
                    break;
                }
                if let Source::Relayed(key, id) = src_kind
                    && ctx.sockets.slab.get(key).is_none_or(|e| e.id != id)
                {
                    break;
                }
            }
        }
        ctx.poll_timers(now);
        sync_sockets(&mut ctx, epfd)?;
        ctx.maybe_report(now);
    }
    ctx.finish();
    ctx.sockets.closed.clear();
    Ok(())
}

/// Register sockets the core opened; closed ones leave epoll when their fd is closed.
fn sync_sockets(ctx: &mut WorkerCtx, epfd: RawFd) -> io::Result<()> {
    while let Some((key, generation)) = ctx.sockets.opened.pop() {
        if let Some(fd) = ctx.prepare_opened(key, generation) {
            let data = (u64::from(generation) << 32) | key as u64;
            epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd, data)?;
        }
    }
    // Dropping the socket closes the fd, which removes it from the epoll set.
    ctx.sockets.closed.clear();
    Ok(())
}

/// One `recvmmsg`; returns how many datagrams arrived (0 on EAGAIN).
fn recv_batch(rx: &mut RxBatch, fd: RawFd, stride: usize) -> io::Result<usize> {
    let bufs = rx.bufs.as_mut_ptr();
    let controls = rx.controls.as_mut_ptr();
    for i in 0..BATCH {
        // SAFETY: i * stride + HEADROOM + PAYLOAD_CAP <= bufs.len() by construction.
        rx.iovs[i].iov_base = unsafe { bufs.add(i * stride + HEADROOM) }.cast();
        rx.iovs[i].iov_len = PAYLOAD_CAP;
        let h = &mut rx.msgs[i].msg_hdr;
        h.msg_name = (&mut rx.names[i] as *mut libc::sockaddr_in6).cast();
        h.msg_namelen = net::SOCKADDR_SPACE as libc::socklen_t;
        h.msg_iov = &mut rx.iovs[i];
        h.msg_iovlen = 1;
        // SAFETY: i * CONTROL_SPACE + CONTROL_SPACE <= controls.len().
        h.msg_control = unsafe { controls.add(i * CONTROL_SPACE) }.cast();
        h.msg_controllen = CONTROL_SPACE;
        h.msg_flags = 0;
        rx.msgs[i].msg_len = 0;
    }
    // SAFETY: every msghdr points at memory in `rx`, valid for the call.
    let n = unsafe {
        libc::recvmmsg(
            fd,
            rx.msgs.as_mut_ptr(),
            BATCH as u32,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(0),
            // A pending socket error (e.g. ICMP) is reported once; the socket stays usable.
            Some(libc::ECONNREFUSED) | Some(libc::EHOSTUNREACH) | Some(libc::ENETUNREACH) => Ok(0),
            _ => Err(e),
        };
    }
    Ok(n as usize)
}

fn handle_one(
    ctx: &mut WorkerCtx,
    rx: &mut RxBatch,
    tx: &mut Vec<TxItem>,
    now: Instant,
    src_kind: Source,
    m: usize,
    stride: usize,
) {
    let hdr = &rx.msgs[m].msg_hdr;
    let len = rx.msgs[m].msg_len as usize;
    let truncated = hdr.msg_flags & libc::MSG_TRUNC != 0;
    let namelen = (hdr.msg_namelen as usize).min(net::SOCKADDR_SPACE);
    let controllen = hdr.msg_controllen.min(CONTROL_SPACE);
    // SAFETY: names[m] is a POD struct; viewing its first `namelen` bytes is in bounds.
    let name = unsafe {
        std::slice::from_raw_parts(
            (&rx.names[m] as *const libc::sockaddr_in6).cast::<u8>(),
            namelen,
        )
    };
    let src = net::parse_sockaddr(name);
    let meta = net::parse_cmsgs(&rx.controls[m * CONTROL_SPACE..m * CONTROL_SPACE + controllen]);
    ctx.account_ovfl(src_kind, meta.rxq_ovfl);
    let Some(src) = src else {
        ctx.counters.recv_errors += 1;
        return;
    };
    if truncated {
        let k = matches!(src_kind, Source::Relayed(..)) as usize;
        ctx.counters.rx_packets[k] += 1;
        ctx.count_drop(DropReason::Truncated);
        return;
    }
    let frame = &mut rx.bufs[m * stride..(m + 1) * stride];
    if let Some(f) = ctx.dispatch(now, src_kind, src, frame, len.min(PAYLOAD_CAP)) {
        let Some(fd) = f.fd else {
            // Unreachable with epoll (it never releases fds); counted, never a panic.
            ctx.counters.send_errors += 1;
            return;
        };
        let mut addr = RawAddr::zeroed();
        addr.set(f.to);
        tx.push(TxItem {
            fd,
            idx: m,
            start: f.range.start,
            len: f.range.len(),
            addr,
            rx_ns: meta.rx_time_ns.unwrap_or(0),
            direction: f.direction,
        });
    }
}

/// Send every queued forward: `sendmmsg` per run of consecutive items from the same socket.
fn flush(
    ctx: &mut WorkerCtx,
    rx: &mut RxBatch,
    tx: &mut Vec<TxItem>,
    msgs: &mut [libc::mmsghdr; BATCH],
    iovs: &mut [libc::iovec; BATCH],
    stride: usize,
) {
    if tx.is_empty() {
        return;
    }
    let bufs = rx.bufs.as_mut_ptr();
    for (i, item) in tx.iter().enumerate() {
        // SAFETY: start + len <= stride was checked by `dispatch` against the frame.
        iovs[i].iov_base = unsafe { bufs.add(item.idx * stride + item.start) }.cast();
        iovs[i].iov_len = item.len;
        let h = &mut msgs[i].msg_hdr;
        h.msg_name = item.addr.as_ptr().cast_mut();
        h.msg_namelen = item.addr.len;
        h.msg_iov = &mut iovs[i];
        h.msg_iovlen = 1;
        h.msg_control = std::ptr::null_mut();
        h.msg_controllen = 0;
        h.msg_flags = 0;
        msgs[i].msg_len = 0;
    }
    let sent_ns = net::realtime_ns();
    for item in tx.iter() {
        ctx.record_latency(item.rx_ns, sent_ns);
    }
    let mut start = 0;
    while start < tx.len() {
        let fd = tx[start].fd;
        let mut end = start + 1;
        while end < tx.len() && tx[end].fd == fd {
            end += 1;
        }
        while start < end {
            // SAFETY: msgs[start..end] point at live buffers, addresses and iovecs.
            let r = unsafe {
                libc::sendmmsg(
                    fd,
                    msgs[start..].as_mut_ptr(),
                    (end - start) as u32,
                    libc::MSG_DONTWAIT,
                )
            };
            if r <= 0 {
                // The first message failed: drop it (allocation kept), go on with the rest.
                ctx.counters.send_errors += 1;
                tracing::trace!(worker = ctx.index, error = %io::Error::last_os_error(), "forward send failed");
                start += 1;
            } else {
                for item in &tx[start..start + r as usize] {
                    ctx.counters.forwarded(item.direction, item.len);
                }
                start += r as usize;
            }
        }
    }
    tx.clear();
}
