//! The io_uring backend: one ring per worker (`SINGLE_ISSUER | DEFER_TASKRUN | COOP_TASKRUN`),
//! multishot `RECVMSG` on the listener and on every relayed socket, all drawing from one
//! provided-buffer ring; forwards are `SENDMSG` of the very receive buffer.
//!
//! # Buffer layout (headroom)
//!
//! A multishot `recvmsg` writes, at the start of the provided buffer, a 16-byte
//! `io_uring_recvmsg_out` header, then a name area of exactly `msg_namelen` bytes, then a control
//! area of exactly `msg_controllen` bytes, then the payload:
//!
//! ```text
//! 0        16                  44                                   100   104            4096
//! | header | name (28 = sin6)  | control (60: used <= 56)           |hroom| payload ... |
//! ```
//!
//! We ask for `msg_controllen = 60` although our two control messages (`SCM_TIMESTAMPNS`, 32
//! bytes, and `SO_RXQ_OVFL`, 24 bytes) need at most 56: the last 4 bytes of the control area
//! (offsets 100..104) are never written by the kernel, so they are free HEADROOM right before the
//! payload at offset 104 (8-aligned). The frame handed to the core is `buf[100..]`, so the core
//! sees `frame[HEADROOM..HEADROOM+len]` as the contract says and may write a ChannelData header
//! into `frame[0..4]`; the header and name are parsed (copied into locals) before the core runs.
//! No byte is copied: the send's iovec points into the same buffer, which stays ours (state
//! `Sending` in [`bufring::BufRing`]) until the send's completion returns it to the ring.
//!
//! # Loop
//!
//! One `io_uring_enter` per iteration submits everything queued and waits for at least one
//! completion or the next timer (core timeout, 1 s report, 50 ms stop-flag poll). Before it,
//! returned buffers are published (one tail store) and the send-submission time is taken for the
//! latency histogram. Multishot receives that end without `IORING_CQE_F_MORE` are re-armed;
//! ENOBUFS (ring empty) is counted and the receive re-armed once buffers are back; a full
//! completion queue (EBUSY from enter, or the overflow flag) is counted and the loop drains
//! completions before submitting more. Replies (STUN responses, Data indications) are written by
//! the core into a per-worker scratch buffer reused for the next datagram, so they are sent with
//! a direct non-blocking `sendto` rather than queued.

pub mod bufring;

use std::io;
use std::net::UdpSocket;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use io_uring::types::{Fd, SubmitArgs, Timespec};
use io_uring::{IoUring, cqueue, opcode, squeue};

use crate::core::{DropReason, HEADROOM};
use crate::metrics::Direction;
use crate::net::{self, RawAddr};
use crate::worker::{ForwardAction, GEN_MASK, Source, WorkerCtx};
use bufring::BufRing;

/// Environment variable that makes the io_uring probe fail as if seccomp denied it (for tests
/// and for operators who want to rule io_uring out without changing flags).
pub const DISABLE_ENV: &str = "PEERLINK_RELAY_DISABLE_IO_URING";

/// Default provided buffers per worker (power of two; `uring_buffers` in the config).
pub const BUF_ENTRIES: u32 = 1024;
/// Size of each provided buffer.
pub const BUF_SIZE: usize = 4096;
/// `io_uring_recvmsg_out` header size.
const RECVMSG_OUT: usize = 16;
/// Name area: room for a `sockaddr_in6`.
const NAME_SPACE: usize = net::SOCKADDR_SPACE;
/// Control area: what our cmsgs need plus slack that becomes the headroom (see module docs).
const CONTROL_SPACE: usize = 60;
/// Offset of the payload in a provided buffer.
pub const PAYLOAD_OFFSET: usize = RECVMSG_OUT + NAME_SPACE + CONTROL_SPACE;
/// Offset of the frame handed to the core (payload minus headroom).
pub const FRAME_OFFSET: usize = PAYLOAD_OFFSET - HEADROOM;
const _: () = assert!(net::CONTROL_NEEDED + HEADROOM <= CONTROL_SPACE);
const _: () = assert!(PAYLOAD_OFFSET.is_multiple_of(8));

/// Buffer group id of the worker's ring.
const BGID: u16 = 0;
/// Submission queue entries.
const SQ_ENTRIES: u32 = 2048;
/// Completion queue entries per provided buffer (receives + sends in flight, with margin).
const CQ_PER_BUFFER: u32 = 8;
/// Longest wait in the kernel before the stop flag is looked at.
const MAX_WAIT: Duration = Duration::from_millis(50);

const KIND_LISTENER: u64 = 1;
const KIND_RELAYED: u64 = 2;
const KIND_SEND: u64 = 3;
const KIND_CANCEL: u64 = 4;

/// Completion token: kind (8 bits) | generation (24 bits) | key (32 bits).
fn token(kind: u64, generation: u32, key: usize) -> u64 {
    (kind << 56) | (u64::from(generation & GEN_MASK) << 32) | (key as u64 & 0xFFFF_FFFF)
}

fn untoken(t: u64) -> (u64, u32, usize) {
    (
        t >> 56,
        ((t >> 32) as u32) & GEN_MASK,
        (t & 0xFFFF_FFFF) as usize,
    )
}

/// Errors of the io_uring backend.
#[derive(Debug, thiserror::Error)]
pub enum UringError {
    /// io_uring cannot be used here (kernel, seccomp, sysctl, or the disable variable).
    #[error("io_uring unavailable: {0}")]
    Unavailable(String),
    /// Setting up the ring or its buffers failed.
    #[error("io_uring setup: {0}")]
    Setup(#[from] io::Error),
    /// Buffer ring allocation failed.
    #[error(transparent)]
    BufRing(#[from] bufring::BufRingError),
}

/// Check that io_uring with everything this backend uses works here: ring setup, a provided
/// buffer ring, and a multishot `recvmsg` that delivers one datagram. Fails with
/// [`UringError::Unavailable`] when [`DISABLE_ENV`] is set to a non-empty value other than `0`.
pub fn probe() -> Result<(), UringError> {
    if std::env::var(DISABLE_ENV).is_ok_and(|v| !v.is_empty() && v != "0") {
        return Err(UringError::Unavailable(format!(
            "disabled by {DISABLE_ENV}"
        )));
    }
    let unavailable = |what: &str, e: io::Error| UringError::Unavailable(format!("{what}: {e}"));
    let mut ring: IoUring = IoUring::new(8).map_err(|e| unavailable("io_uring_setup", e))?;
    let bufs = BufRing::new(4, 256)?;
    // SAFETY: the ring memory lives in `bufs`, which outlives the registration (unregistered
    // below; and `ring` is dropped before `bufs` at the end of this function in any case).
    unsafe {
        ring.submitter()
            .register_buf_ring_with_flags(bufs.ring_addr(), bufs.entries(), BGID, 0)
            .map_err(|e| unavailable("provided buffer ring", e))?;
    }
    let (a, b) = std::os::unix::net::UnixDatagram::pair()?;
    let mut msg: libc::msghdr = zeroed_msghdr();
    msg.msg_namelen = 0;
    let sqe = opcode::RecvMsgMulti::new(Fd(b.as_raw_fd()), &msg, BGID)
        .build()
        .user_data(1);
    // SAFETY: `msg` outlives the operation (the ring is dropped at the end of this scope, before
    // `msg`, which was declared earlier); buffers come from the registered ring.
    unsafe { ring.submission().push(&sqe) }
        .map_err(|_| UringError::Unavailable("submission queue full".into()))?;
    a.send(b"probe")?;
    let ts = Timespec::new().sec(2);
    let args = SubmitArgs::new().timespec(&ts);
    match ring.submitter().submit_with_args(1, &args) {
        Ok(_) => {}
        Err(e) if e.raw_os_error() == Some(libc::ETIME) => {}
        Err(e) => return Err(unavailable("io_uring_enter", e)),
    }
    let cqe = ring.completion().next().ok_or_else(|| {
        UringError::Unavailable("multishot recvmsg produced no completion".into())
    })?;
    if cqe.result() < 0 {
        return Err(unavailable(
            "multishot recvmsg",
            io::Error::from_raw_os_error(-cqe.result()),
        ));
    }
    drop(ring);
    drop(bufs);
    Ok(())
}

fn zeroed_msghdr() -> libc::msghdr {
    // SAFETY: msghdr is plain old data; all-zero (null pointers, zero lengths) is valid.
    unsafe { std::mem::zeroed() }
}

/// Where a send's buffer and address live while the kernel owns them (one slot per buffer id:
/// a buffer is in at most one send).
struct SendSlot {
    addr: RawAddr,
    iov: libc::iovec,
    msg: libc::msghdr,
    direction: Direction,
}

/// The parts of a multishot `recvmsg` result the worker needs.
#[derive(Debug, PartialEq, Eq)]
pub struct RecvLayout {
    /// Source address bytes (may be shorter than `NAME_SPACE`).
    pub name_len: usize,
    /// Control bytes the kernel wrote.
    pub control_len: usize,
    /// Payload bytes present in the buffer.
    pub payload_len: usize,
    /// MSG_TRUNC: the datagram was larger than the buffer.
    pub truncated: bool,
}

/// Parse the `io_uring_recvmsg_out` header of a completed multishot receive whose CQE result
/// was `res` bytes. `None` when the result cannot hold our fixed layout.
pub fn parse_recvmsg_out(buf: &[u8], res: usize) -> Option<RecvLayout> {
    if res < PAYLOAD_OFFSET || res > buf.len() {
        return None;
    }
    let word = |i: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(
            buf.get(i * 4..i * 4 + 4)?.try_into().ok()?,
        ))
    };
    let (namelen, controllen, payloadlen, flags) = (word(0)?, word(1)?, word(2)?, word(3)?);
    let present = res - PAYLOAD_OFFSET;
    Some(RecvLayout {
        name_len: (namelen as usize).min(NAME_SPACE),
        control_len: (controllen as usize).min(CONTROL_SPACE),
        payload_len: (payloadlen as usize).min(present),
        truncated: flags & (libc::MSG_TRUNC as u32) != 0 || payloadlen as usize > present,
    })
}

/// One worker's ring and its bookkeeping.
struct Uring {
    starved: Vec<(u64, RawFd)>,
    pending_cancels: Vec<u64>,
    pending_latency: Vec<u64>,
    deferred_close: Vec<UdpSocket>,
    overflow_seen: u32,
}

fn build_ring(cq_entries: u32) -> io::Result<IoUring> {
    let mut b = IoUring::builder();
    b.setup_single_issuer()
        .setup_defer_taskrun()
        .setup_coop_taskrun()
        .setup_cqsize(cq_entries)
        .setup_clamp();
    match b.build(SQ_ENTRIES) {
        Ok(r) => Ok(r),
        Err(_) => {
            // Older kernels (< 6.1) lack DEFER_TASKRUN; run without the optional flags.
            let mut b = IoUring::builder();
            b.setup_cqsize(cq_entries).setup_clamp();
            b.build(SQ_ENTRIES)
        }
    }
}

/// Run one worker on io_uring until the stop flag is set. Must run on the worker's own thread
/// (the ring is single-issuer and created here).
pub fn run(mut ctx: WorkerCtx, buffers: u32) -> Result<(), UringError> {
    // Declaration order matters for drop order: the ring (declared later) is dropped first, so
    // the kernel never touches `bufs`, `slots` or `recv_msg` after they are freed.
    let mut bufs = BufRing::new(buffers, BUF_SIZE)?;
    let mut slots: Vec<SendSlot> = (0..buffers)
        .map(|_| SendSlot {
            addr: RawAddr::zeroed(),
            iov: libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            },
            msg: zeroed_msghdr(),
            direction: Direction::ClientToPeer,
        })
        .collect();
    let mut recv_msg = Box::new(zeroed_msghdr());
    recv_msg.msg_namelen = NAME_SPACE as libc::socklen_t;
    recv_msg.msg_controllen = CONTROL_SPACE;
    let mut ring = build_ring((buffers * CQ_PER_BUFFER).clamp(4096, 65536))?;
    // SAFETY: `bufs` outlives `ring` (declared before it), so the registered memory stays valid.
    unsafe {
        ring.submitter()
            .register_buf_ring_with_flags(bufs.ring_addr(), bufs.entries(), BGID, 0)?;
    }
    let (submitter, mut sq, mut cq) = ring.split();
    let mut st = Uring {
        starved: Vec::with_capacity(64),
        pending_cancels: Vec::with_capacity(64),
        pending_latency: Vec::with_capacity(buffers as usize),
        deferred_close: Vec::with_capacity(64),
        overflow_seen: 0,
    };
    let listener_fd = ctx.listener.as_raw_fd();
    let recv_ptr: *const libc::msghdr = &*recv_msg;
    let arm = |sq: &mut squeue::SubmissionQueue<'_>, tok: u64, fd: RawFd| -> io::Result<bool> {
        let sqe = opcode::RecvMsgMulti::new(Fd(fd), recv_ptr, BGID)
            .build()
            .user_data(tok);
        push(sq, &submitter, &sqe)
    };
    if !arm(&mut sq, token(KIND_LISTENER, 0, 0), listener_fd)? {
        return Err(UringError::Setup(io::Error::other(
            "cannot queue the listener receive",
        )));
    }
    tracing::debug!(worker = ctx.index, "io_uring worker started");

    loop {
        if ctx.should_stop() {
            break;
        }
        // Re-arm receives that ended (ring empty: ENOBUFS, or any end without MORE) once the
        // ring has buffers again.
        if !st.starved.is_empty() && bufs.held() < bufs.entries() as usize {
            while let Some((tok, fd)) = st.starved.pop() {
                if !arm(&mut sq, tok, fd)? {
                    st.starved.push((tok, fd));
                    break;
                }
                ctx.counters.rearms += 1;
            }
        }
        // Cancels that found the submission queue full last time.
        while let Some(tok) = st.pending_cancels.pop() {
            if !queue_cancel(&mut sq, &submitter, tok)? {
                st.pending_cancels.push(tok);
                break;
            }
        }
        bufs.publish();
        let now = Instant::now();
        let wake = ctx.next_wake(now, MAX_WAIT);
        let wait = wake.saturating_duration_since(now);
        let ts = Timespec::from(wait);
        let args = SubmitArgs::new().timespec(&ts);
        sq.sync();
        // Latency: kernel receive timestamp -> this submission.
        if !st.pending_latency.is_empty() {
            let sent = net::realtime_ns();
            for i in 0..st.pending_latency.len() {
                let rx = st.pending_latency[i];
                ctx.record_latency(rx, sent);
            }
            st.pending_latency.clear();
        }
        let want = if cq.is_empty() { 1 } else { 0 };
        match submitter.submit_with_args(want, &args) {
            Ok(_) => {}
            Err(e) => match e.raw_os_error() {
                Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EAGAIN) => {}
                Some(libc::EBUSY) => {
                    // Completion queue overflowed: stop submitting until it is drained.
                    ctx.counters.cq_overflow += 1;
                }
                _ => return Err(UringError::Setup(e)),
            },
        }
        // Sockets closed by the core are released only now that the SQEs that might name their
        // fd were submitted (the kernel holds its own file reference from here on).
        st.deferred_close.clear();
        if sq.cq_overflow() {
            ctx.counters.cq_overflow += 1;
        }
        cq.sync();
        let overflow = cq.overflow();
        if overflow != st.overflow_seen {
            ctx.counters.cq_overflow += u64::from(overflow.wrapping_sub(st.overflow_seen));
            st.overflow_seen = overflow;
        }
        let now = Instant::now();
        for cqe in &mut cq {
            let (kind, generation, key) = untoken(cqe.user_data());
            let res = cqe.result();
            let flags = cqe.flags();
            match kind {
                KIND_SEND => {
                    let bid = key as u16;
                    if let Some(slot) = slots.get(bid as usize) {
                        if res < 0 {
                            ctx.counters.send_errors += 1;
                            tracing::trace!(
                                worker = ctx.index,
                                errno = -res,
                                "forward send failed"
                            );
                        } else {
                            let d = slot.direction as usize;
                            ctx.counters.fwd_packets[d] += 1;
                            ctx.counters.fwd_bytes[d] += res as u64;
                        }
                    }
                    bufs.recycle(bid);
                }
                KIND_LISTENER | KIND_RELAYED => {
                    let source = if kind == KIND_LISTENER {
                        Some((Source::Listener, listener_fd))
                    } else {
                        ctx.sockets
                            .live(key, generation)
                            .map(|e| (Source::Relayed(key, e.id), e.sock.as_raw_fd()))
                    };
                    let more = cqueue::more(flags);
                    let bid = cqueue::buffer_select(flags);
                    // A multishot receive that ended (no MORE) is re-armed at the top of the next
                    // iteration, once the ring has a free buffer; cancelled ones (socket closed)
                    // and those of vanished sockets are not.
                    if !more
                        && res != -libc::ECANCELED
                        && let Some((_, fd)) = source
                    {
                        st.starved.push((cqe.user_data(), fd));
                    }
                    if res < 0 {
                        if let Some(bid) = bid
                            && bufs.take(bid)
                        {
                            bufs.recycle(bid);
                        }
                        if res == -libc::ENOBUFS {
                            ctx.counters.enobufs += 1;
                        } else if res != -libc::ECANCELED {
                            ctx.counters.recv_errors += 1;
                        }
                        continue;
                    }
                    let Some(bid) = bid else {
                        ctx.counters.recv_errors += 1;
                        continue;
                    };
                    if !bufs.take(bid) {
                        // Kernel handed us a buffer we think we hold: bookkeeping bug. Count it
                        // and leave the buffer alone rather than corrupt an in-flight send.
                        ctx.counters.recv_errors += 1;
                        continue;
                    }
                    match source {
                        Some((src_kind, _)) => handle_datagram(
                            &mut ctx,
                            &mut bufs,
                            &mut slots,
                            &mut st,
                            &mut sq,
                            &submitter,
                            now,
                            src_kind,
                            bid,
                            res as usize,
                        )?,
                        None => {
                            bufs.recycle(bid);
                        }
                    }
                }
                _ => {} // KIND_CANCEL: nothing to do.
            }
            after_core(&mut ctx, &mut st, &mut sq, &submitter, &arm)?;
        }
        ctx.poll_timers(now);
        after_core(&mut ctx, &mut st, &mut sq, &submitter, &arm)?;
        ctx.maybe_report(now);
    }
    ctx.finish();
    // Cancel everything in flight and wait (bounded) for the kernel to let go of our buffers.
    let _ = push(
        &mut sq,
        &submitter,
        &opcode::AsyncCancel2::new(io_uring::types::CancelBuilder::any())
            .build()
            .user_data(token(KIND_CANCEL, 0, 0)),
    );
    sq.sync();
    let ts = Timespec::new().nsec(100_000_000);
    let _ = submitter.submit_with_args(1, &SubmitArgs::new().timespec(&ts));
    cq.sync();
    for _ in &mut cq {}
    drop(cq);
    drop(sq);
    drop(ring);
    drop(slots);
    drop(bufs);
    Ok(())
}

/// Arm receives on sockets the core opened, cancel those it closed.
fn after_core(
    ctx: &mut WorkerCtx,
    st: &mut Uring,
    sq: &mut squeue::SubmissionQueue<'_>,
    submitter: &io_uring::Submitter<'_>,
    arm: &impl Fn(&mut squeue::SubmissionQueue<'_>, u64, RawFd) -> io::Result<bool>,
) -> io::Result<()> {
    while let Some((key, generation)) = ctx.sockets.opened.pop() {
        if let Some(fd) = ctx.prepare_opened(key, generation) {
            let tok = token(KIND_RELAYED, generation, key);
            if !arm(sq, tok, fd)? {
                st.starved.push((tok, fd));
            }
        }
    }
    while let Some((key, generation, sock)) = ctx.sockets.closed.pop() {
        let tok = token(KIND_RELAYED, generation, key);
        if !queue_cancel(sq, submitter, tok)? {
            st.pending_cancels.push(tok);
        }
        st.starved.retain(|(t, _)| *t != tok);
        st.deferred_close.push(sock);
    }
    Ok(())
}

/// Queue the cancellation of the multishot receive `tok` (its socket was closed). `false` when
/// the submission queue is full (retried next iteration: until the cancel lands, the kernel
/// keeps the socket's file, and so its port, alive).
fn queue_cancel(
    sq: &mut squeue::SubmissionQueue<'_>,
    submitter: &io_uring::Submitter<'_>,
    tok: u64,
) -> io::Result<bool> {
    let cancel = opcode::AsyncCancel::new(tok)
        .build()
        .user_data(token(KIND_CANCEL, 0, 0));
    push(sq, submitter, &cancel)
}

/// Push an SQE, submitting first if the queue is full. `Ok(false)` when it stays full (the
/// kernel refuses submissions while the completion queue overflows: back-pressure); the caller
/// drops or retries the operation.
fn push(
    sq: &mut squeue::SubmissionQueue<'_>,
    submitter: &io_uring::Submitter<'_>,
    sqe: &squeue::Entry,
) -> io::Result<bool> {
    for _ in 0..2 {
        // SAFETY: every SQE we build points at memory that outlives the operation: the shared
        // receive msghdr (boxed for the worker's life), send slots indexed by a buffer id we hold
        // until the completion, and buffers from the registered ring.
        if unsafe { sq.push(sqe) }.is_ok() {
            return Ok(true);
        }
        sq.sync();
        match submitter.submit() {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => return Err(e),
        }
        sq.sync();
    }
    Ok(false)
}

#[allow(clippy::too_many_arguments)]
fn handle_datagram(
    ctx: &mut WorkerCtx,
    bufs: &mut BufRing,
    slots: &mut [SendSlot],
    st: &mut Uring,
    sq: &mut squeue::SubmissionQueue<'_>,
    submitter: &io_uring::Submitter<'_>,
    now: Instant,
    src_kind: Source,
    bid: u16,
    res: usize,
) -> io::Result<()> {
    let Some(buf) = bufs.buf_mut(bid) else {
        return Ok(());
    };
    let Some(layout) = parse_recvmsg_out(buf, res) else {
        ctx.counters.recv_errors += 1;
        bufs.recycle(bid);
        return Ok(());
    };
    let src = net::parse_sockaddr(&buf[RECVMSG_OUT..RECVMSG_OUT + layout.name_len]);
    let ctrl_start = RECVMSG_OUT + NAME_SPACE;
    let meta = net::parse_cmsgs(&buf[ctrl_start..ctrl_start + layout.control_len]);
    ctx.account_ovfl(src_kind, meta.rxq_ovfl);
    let Some(src) = src else {
        ctx.counters.recv_errors += 1;
        bufs.recycle(bid);
        return Ok(());
    };
    if layout.truncated {
        let k = matches!(src_kind, Source::Relayed(..)) as usize;
        ctx.counters.rx_packets[k] += 1;
        ctx.count_drop(DropReason::Truncated);
        bufs.recycle(bid);
        return Ok(());
    }
    let frame = &mut buf[FRAME_OFFSET..];
    let action = ctx.dispatch(now, src_kind, src, frame, layout.payload_len);
    let Some(ForwardAction {
        fd,
        to,
        range,
        direction,
    }) = action
    else {
        bufs.recycle(bid);
        return Ok(());
    };
    let base = frame.as_mut_ptr();
    let Some(slot) = slots.get_mut(bid as usize) else {
        bufs.recycle(bid);
        return Ok(());
    };
    slot.addr.set(to);
    // SAFETY: `range` was checked against the frame length in `dispatch`.
    slot.iov.iov_base = unsafe { base.add(range.start) }.cast();
    slot.iov.iov_len = range.len();
    slot.msg = zeroed_msghdr();
    slot.msg.msg_name = slot.addr.as_ptr().cast_mut();
    slot.msg.msg_namelen = slot.addr.len;
    slot.msg.msg_iov = &mut slot.iov;
    slot.msg.msg_iovlen = 1;
    slot.direction = direction;
    bufs.mark_sending(bid);
    let sqe = opcode::SendMsg::new(Fd(fd), &slot.msg)
        .build()
        .user_data(token(KIND_SEND, 0, bid as usize));
    if !push(sq, submitter, &sqe)? {
        // Submission queue full under completion-queue back-pressure: drop this packet.
        ctx.counters.sq_full_drops += 1;
        bufs.recycle(bid);
        return Ok(());
    }
    if let Some(rx) = meta.rx_time_ns {
        st.pending_latency.push(rx);
    }
    Ok(())
}

/// A relayed-socket lookup helper for tests of the token encoding.
#[cfg(test)]
fn roundtrip(kind: u64, generation: u32, key: usize) -> (u64, u32, usize) {
    untoken(token(kind, generation, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip() {
        assert_eq!(
            roundtrip(KIND_RELAYED, 0xABCDEF, 123_456),
            (KIND_RELAYED, 0xABCDEF, 123_456)
        );
        assert_eq!(roundtrip(KIND_SEND, 0, 1023), (KIND_SEND, 0, 1023));
        assert_eq!(roundtrip(KIND_LISTENER, GEN_MASK + 5, 0).1, 4);
    }

    #[test]
    fn layout_constants() {
        assert_eq!(PAYLOAD_OFFSET, 104);
        assert_eq!(FRAME_OFFSET, 100);
        const { assert!(BUF_SIZE > PAYLOAD_OFFSET + 1500) };
    }

    #[test]
    fn parses_recvmsg_out_header() {
        let mut buf = vec![0u8; BUF_SIZE];
        let words = [16u32, 56, 200, 0];
        for (i, w) in words.iter().enumerate() {
            buf[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        let l = parse_recvmsg_out(&buf, PAYLOAD_OFFSET + 200).unwrap();
        assert_eq!(
            l,
            RecvLayout {
                name_len: 16,
                control_len: 56,
                payload_len: 200,
                truncated: false
            }
        );
        // Kernel says the payload was longer than what landed: truncated.
        let l = parse_recvmsg_out(&buf, PAYLOAD_OFFSET + 100).unwrap();
        assert!(l.truncated);
        assert_eq!(l.payload_len, 100);
        // MSG_TRUNC flag.
        buf[12..16].copy_from_slice(&(libc::MSG_TRUNC as u32).to_ne_bytes());
        assert!(
            parse_recvmsg_out(&buf, PAYLOAD_OFFSET + 200)
                .unwrap()
                .truncated
        );
        // Results too short for the header or longer than the buffer are refused.
        assert!(parse_recvmsg_out(&buf, PAYLOAD_OFFSET - 1).is_none());
        assert!(parse_recvmsg_out(&buf, BUF_SIZE + 1).is_none());
        // Oversized name/control lengths are clamped to the fixed areas.
        buf[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        buf[4..8].copy_from_slice(&1000u32.to_ne_bytes());
        let l = parse_recvmsg_out(&buf, PAYLOAD_OFFSET).unwrap();
        assert_eq!((l.name_len, l.control_len), (NAME_SPACE, CONTROL_SPACE));
    }
}
