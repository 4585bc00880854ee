//! The io_uring backend: one ring per worker (`SINGLE_ISSUER | DEFER_TASKRUN | COOP_TASKRUN`),
//! multishot `RECVMSG` on the listener and on every relayed socket, all drawing from one
//! provided-buffer ring; forwards are `SEND`s with a destination address (sendto) of the very
//! receive buffer. The listener and the relayed sockets sit in the ring's registered file table;
//! a relayed socket there gives up its fd, so the ring holds the only reference and the
//! process's RLIMIT_NOFILE does not bound the allocations (the table size, capped by the kernel
//! at RLIMIT_NOFILE per ring, does).
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
//! One `io_uring_enter` per iteration submits everything queued and waits. Sends carry
//! `MSG_DONTWAIT`, so each completes during the enter that submits it; the wait therefore asks
//! for one completion more than the sends it carries, and ends at the next receive or timer
//! (core timeout, 1 s report, 50 ms stop-flag poll) rather than at those inline completions.
//! Under heavy load (more than 1/8 of the buffers held) the sends are submitted without waiting
//! instead, and their buffers recycled before the next wait. While a batch of completions is
//! handled, forwards are submitted every `FLUSH_EVERY` so a long batch does not hold its first
//! ones back; the latency clock (kernel receive timestamp -> send submission) is read once per
//! submission. Before the wait, returned buffers are published (one tail store). Multishot
//! receives that end without `IORING_CQE_F_MORE` are re-armed; ENOBUFS (ring empty) is counted
//! and the receive re-armed once buffers are back; a full completion queue (EBUSY from enter, or
//! the overflow flag) is counted and the loop drains completions before submitting more.
//! Replies (STUN responses, Data indications) are written by the core into a per-worker scratch
//! buffer reused for the next datagram, so they are sent with a direct non-blocking `sendto`
//! rather than queued (one syscall per reply: requests, and peer data without a channel).
//!
//! TCP/TLS clients ([`crate::stream`]) live in an epoll set of their own; the ring polls its fd
//! with a one-shot `POLL_ADD` (re-armed after each round) and the stream side reads, writes and
//! runs the core outside the ring. The relayed socket of a stream client's allocation keeps its
//! fd after registration, because the stream side sends on it with `sendto`.

pub mod bufring;

use std::io;
use std::net::UdpSocket;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use io_uring::types::{self, Fd, SubmitArgs, Timespec};
use io_uring::{IoUring, cqueue, opcode, squeue};

use crate::core::{DropReason, HEADROOM};
use crate::metrics::Direction;
use crate::net::{self, RawAddr};
use crate::worker::{ForwardAction, GEN_MASK, Source, WorkerCtx};
use bufring::BufRing;

/// Environment variable that makes the io_uring probe fail as if seccomp denied it (for tests
/// and for operators who want to rule io_uring out without changing flags).
pub const DISABLE_ENV: &str = "PEERLINK_RELAY_DISABLE_IO_URING";

/// Environment variable that shrinks every worker's completion queue to this many entries
/// (at least 16; the submission queue to half as many), so that tests can make it overflow.
/// Not for production: the default sizes leave room for every buffer's completions.
pub const CQ_ENTRIES_ENV: &str = "PEERLINK_RELAY_URING_CQ_ENTRIES";

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
/// Forwards queued while handling one batch of completions are submitted (without waiting)
/// every this many, so the first forwards of a long batch do not wait for its end.
const FLUSH_EVERY: u32 = 32;
/// With more than `entries / HELD_FOR_SEPARATE_WAIT` buffers held, sends are submitted without
/// waiting and the wait comes after their buffers went back to the ring.
const HELD_FOR_SEPARATE_WAIT: usize = 8;

const KIND_LISTENER: u64 = 1;
const KIND_RELAYED: u64 = 2;
const KIND_SEND: u64 = 3;
const KIND_CANCEL: u64 = 4;
/// The one-shot poll on the TCP/TLS side's epoll fd ([`crate::stream`]).
const KIND_STREAMS: u64 = 5;

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
/// buffer ring, a multishot `recvmsg` that delivers one datagram, and a `SEND` with a
/// destination address (sendto; Linux 6.0) that sends one. Fails with
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
    // sendto through io_uring: a loopback UDP socket sends one datagram to itself.
    let udp = UdpSocket::bind((std::net::Ipv4Addr::LOCALHOST, 0))?;
    let mut to = RawAddr::zeroed();
    to.set(udp.local_addr()?);
    let payload = *b"probe";
    let sqe = send_sqe(
        Target::Fd(udp.as_raw_fd()),
        payload.as_ptr(),
        payload.len() as u32,
        &to,
        2,
    );
    // SAFETY: `payload` and `to` outlive the operation: it completes within the submit below
    // (MSG_DONTWAIT) and the ring is dropped before them in any case.
    unsafe { ring.submission().push(&sqe) }
        .map_err(|_| UringError::Unavailable("submission queue full".into()))?;
    match ring.submitter().submit_with_args(1, &args) {
        Ok(_) => {}
        Err(e) if e.raw_os_error() == Some(libc::ETIME) => {}
        Err(e) => return Err(unavailable("io_uring_enter", e)),
    }
    let sent = ring
        .completion()
        .find(|c| c.user_data() == 2)
        .ok_or_else(|| UringError::Unavailable("send produced no completion".into()))?;
    if sent.result() != payload.len() as i32 {
        return Err(unavailable(
            "send with destination address",
            io::Error::from_raw_os_error(-sent.result().min(0)),
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

/// Where a send's destination lives while the kernel owns the buffer (one slot per buffer id:
/// a buffer is in at most one send).
struct SendSlot {
    addr: RawAddr,
    direction: Direction,
}

/// How an SQE names a socket: a slot of the ring's registered file table (no file lookup and
/// reference count per operation), or a plain fd when the table is unavailable or full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Fixed(u32),
    Fd(RawFd),
}

/// A multishot `RECVMSG` on `target` into the buffer group.
fn recv_sqe(target: Target, msg: *const libc::msghdr, tok: u64) -> squeue::Entry {
    match target {
        Target::Fixed(i) => opcode::RecvMsgMulti::new(types::Fixed(i), msg, BGID).build(),
        Target::Fd(fd) => opcode::RecvMsgMulti::new(Fd(fd), msg, BGID).build(),
    }
    .user_data(tok)
}

/// A `SEND` of `len` bytes at `buf` to `addr` (sendto semantics). `MSG_DONTWAIT`: the kernel
/// completes it (or fails it with EAGAIN, a drop like epoll's `sendmmsg`) while we submit,
/// instead of parking it on the socket's poll queue; so every send of a submission has its
/// completion posted when `io_uring_enter` returns, which the wait count relies on.
fn send_sqe(target: Target, buf: *const u8, len: u32, addr: &RawAddr, tok: u64) -> squeue::Entry {
    let dest = addr.as_ptr().cast::<libc::sockaddr>();
    match target {
        Target::Fixed(i) => opcode::Send::new(types::Fixed(i), buf, len)
            .dest_addr(dest)
            .dest_addr_len(addr.len)
            .flags(libc::MSG_DONTWAIT)
            .build(),
        Target::Fd(fd) => opcode::Send::new(Fd(fd), buf, len)
            .dest_addr(dest)
            .dest_addr_len(addr.len)
            .flags(libc::MSG_DONTWAIT)
            .build(),
    }
    .user_data(tok)
}

/// The ring's registered file table: slot 0 is the listener, slot `key + 1` the relayed socket
/// with slab key `key`. Sockets whose slot would be past the table (or all of them, if the
/// kernel refused the table) are used by plain fd.
///
/// A relayed socket in the table gives up its fd at once ([`SocketTable::release_fd`]): the
/// ring's reference keeps the socket open and its port bound, and the process's fd table (and
/// so RLIMIT_NOFILE) no longer bounds how many allocations a worker holds; the table does
/// (the kernel caps it at RLIMIT_NOFILE per ring, so more workers hold more).
///
/// [`SocketTable::release_fd`]: crate::worker::SocketTable::release_fd
struct FixedFiles {
    /// Slots in the table (0: no table).
    cap: u32,
    /// `registered[key]`: the relayed socket with this slab key is in slot `key + 1`.
    registered: Vec<bool>,
}

impl FixedFiles {
    /// Largest table the kernel allows (`IORING_MAX_FIXED_FILES`); it also caps the table at
    /// RLIMIT_NOFILE.
    const MAX_SLOTS: u32 = 1 << 20;

    /// A table for the listener and up to `relayed` relayed sockets (fewer if the limits say so).
    fn new(submitter: &io_uring::Submitter<'_>, listener_fd: RawFd, relayed: usize) -> Self {
        let none = Self {
            cap: 0,
            registered: Vec::new(),
        };
        let Some(limit) = net::nofile_limit() else {
            return none;
        };
        let cap = u32::try_from(limit)
            .unwrap_or(u32::MAX)
            .min(u32::try_from(relayed.saturating_add(1)).unwrap_or(u32::MAX))
            .min(Self::MAX_SLOTS);
        if cap == 0 || submitter.register_files_sparse(cap).is_err() {
            return none;
        }
        if submitter.register_files_update(0, &[listener_fd]).is_err() {
            let _ = submitter.unregister_files();
            return none;
        }
        Self {
            cap,
            registered: vec![false; cap as usize - 1],
        }
    }

    fn listener(&self, fd: RawFd) -> Target {
        if self.cap > 0 {
            Target::Fixed(0)
        } else {
            Target::Fd(fd)
        }
    }

    /// How to name relayed socket `key` (`fd`: its fd if the process still holds one).
    fn relayed(&self, key: usize, fd: Option<RawFd>) -> Option<Target> {
        match self.registered.get(key) {
            Some(true) => Some(Target::Fixed(key as u32 + 1)),
            _ => fd.map(Target::Fd),
        }
    }

    /// Put a socket the core opened into its slot (one `io_uring_register`, per allocation).
    fn register(&mut self, submitter: &io_uring::Submitter<'_>, key: usize, fd: RawFd) -> Target {
        if let Some(r) = self.registered.get_mut(key)
            && submitter
                .register_files_update(key as u32 + 1, &[fd])
                .is_ok()
        {
            *r = true;
            return Target::Fixed(key as u32 + 1);
        }
        Target::Fd(fd)
    }

    /// Empty the slot of a closed socket, so the kernel drops its reference to the file. The
    /// socket (and its port) goes once no reference is left: the table's, a receive still in
    /// flight on it (until its cancellation completes) and our fd if we kept one.
    fn unregister(&mut self, submitter: &io_uring::Submitter<'_>, key: usize) {
        if let Some(r) = self.registered.get_mut(key)
            && *r
        {
            *r = false;
            // -1 empties a slot; failure would leave the file referenced until the ring ends.
            if submitter
                .register_files_update(key as u32 + 1, &[-1])
                .is_err()
            {
                tracing::warn!(key, "could not clear a registered file slot");
            }
        }
    }
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

/// One worker's ring bookkeeping.
struct Uring {
    /// Multishot receives to (re-)arm once the buffer ring has room: token and socket.
    starved: Vec<(u64, Target)>,
    pending_cancels: Vec<u64>,
    /// Kernel receive timestamps of forwards queued but not yet submitted.
    pending_latency: Vec<u64>,
    /// `SEND`s queued since the last submission (each posts exactly one completion during
    /// the submission that carries it).
    unsubmitted_sends: u32,
    /// Sockets the core closed, kept open until no queued SQE can name their fd
    /// ([`Io::settle`]).
    deferred_close: Vec<UdpSocket>,
    overflow_seen: u32,
    /// The poll on the streams' epoll fd is in flight.
    streams_armed: bool,
    fixed: FixedFiles,
    /// Receive msghdr shared by every multishot receive (boxed for the worker's life).
    recv_msg: *const libc::msghdr,
}

/// What the loop and its helpers work on besides the worker context: the buffer ring and the
/// send slots (owned by [`run`], declared before the ring so they outlive it), the loop's own
/// state and the ring's three halves.
struct Io<'a, 'r> {
    bufs: &'a mut BufRing,
    slots: &'a mut [SendSlot],
    st: Uring,
    sq: squeue::SubmissionQueue<'r>,
    submitter: io_uring::Submitter<'r>,
    cq: cqueue::CompletionQueue<'r>,
}

impl Io<'_, '_> {
    /// Push an SQE, submitting first if the queue is full. `Ok(false)` when it stays full (the
    /// kernel refuses submissions while the completion queue overflows: back-pressure); the
    /// caller drops or retries the operation.
    fn push(&mut self, sqe: &squeue::Entry) -> io::Result<bool> {
        for _ in 0..2 {
            // SAFETY: every SQE we build points at memory that outlives the operation: the
            // shared receive msghdr (boxed for the worker's life), send slots indexed by a
            // buffer id we hold until the completion, and buffers from the registered ring.
            if unsafe { self.sq.push(sqe) }.is_ok() {
                return Ok(true);
            }
            self.sq.sync();
            match self.submitter.submit() {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => return Err(e),
            }
            self.settle();
        }
        Ok(false)
    }

    /// After an `io_uring_enter` that submitted: once the submission queue is empty, no send
    /// is left unsubmitted and no SQE can still name a socket the core closed, so those
    /// sockets are released (the kernel holds its own file reference from here on).
    fn settle(&mut self) {
        self.sq.sync();
        if self.sq.is_empty() {
            self.st.unsubmitted_sends = 0;
            self.st.deferred_close.clear();
        }
    }

    /// Queue the multishot receive `tok` on `target`; `false` when the queue stays full.
    fn arm(&mut self, tok: u64, target: Target) -> io::Result<bool> {
        let sqe = recv_sqe(target, self.st.recv_msg, tok);
        self.push(&sqe)
    }

    /// Queue the cancellation of the multishot receive `tok` (its socket was closed). `false`
    /// when the submission queue is full (retried next iteration: until the cancel lands, the
    /// kernel keeps the socket's file, and so its port, alive).
    fn cancel(&mut self, tok: u64) -> io::Result<bool> {
        let cancel = opcode::AsyncCancel::new(tok)
            .build()
            .user_data(token(KIND_CANCEL, 0, 0));
        self.push(&cancel)
    }

    /// Record the latency of every queued forward as of now (one clock read) and submit them
    /// without waiting: a long batch does not hold its first forwards back until its end.
    fn flush(&mut self, ctx: &mut WorkerCtx) -> io::Result<()> {
        self.st.record_latency(ctx);
        self.sq.sync();
        let r = self.submitter.submit();
        self.submitted(ctx, r)
    }

    /// Book-keeping after an `io_uring_enter` that submitted: a timeout or interruption is
    /// no error, a full completion queue (EBUSY: the kernel refuses submissions until it is
    /// drained, or the overflow flag) is counted, then [`Io::settle`].
    fn submitted(&mut self, ctx: &mut WorkerCtx, r: io::Result<usize>) -> io::Result<()> {
        if let Err(e) = r {
            match e.raw_os_error() {
                Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EAGAIN) => {}
                Some(libc::EBUSY) => ctx.counters.cq_overflow += 1,
                _ => return Err(e),
            }
        }
        if self.sq.cq_overflow() {
            ctx.counters.cq_overflow += 1;
        }
        self.settle();
        Ok(())
    }
}

impl Uring {
    /// Latency: kernel receive timestamp -> this submission, for every queued forward.
    fn record_latency(&mut self, ctx: &mut WorkerCtx) {
        if self.pending_latency.is_empty() {
            return;
        }
        let sent = net::realtime_ns();
        for &rx in &self.pending_latency {
            ctx.record_latency(rx, sent);
        }
        self.pending_latency.clear();
    }
}

/// Submission and completion queue sizes: the defaults for `buffers` provided buffers, or the
/// small ones [`CQ_ENTRIES_ENV`] asks for.
fn ring_sizes(buffers: u32) -> (u32, u32) {
    match std::env::var(CQ_ENTRIES_ENV)
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
    {
        Some(cq) => {
            let cq = cq.clamp(16, 65536);
            (cq / 2, cq)
        }
        None => (SQ_ENTRIES, (buffers * CQ_PER_BUFFER).clamp(4096, 65536)),
    }
}

fn build_ring(sq_entries: u32, cq_entries: u32) -> io::Result<IoUring> {
    let mut b = IoUring::builder();
    b.setup_single_issuer()
        .setup_defer_taskrun()
        .setup_coop_taskrun()
        .setup_taskrun_flag()
        .setup_cqsize(cq_entries)
        .setup_clamp();
    match b.build(sq_entries) {
        Ok(r) => Ok(r),
        Err(_) => {
            // Older kernels (< 6.1) lack DEFER_TASKRUN; run without the optional flags.
            let mut b = IoUring::builder();
            b.setup_cqsize(cq_entries).setup_clamp();
            b.build(sq_entries)
        }
    }
}

/// Run one worker on io_uring until the stop flag is set. Must run on the worker's own thread
/// (the ring is single-issuer and created here).
pub fn run(mut ctx: WorkerCtx, buffers: u32, busy_poll: Duration) -> Result<(), UringError> {
    // Declaration order matters for drop order: the ring (declared later) is dropped first, so
    // the kernel never touches `bufs`, `slots` or `recv_msg` after they are freed.
    let mut bufs = BufRing::new(buffers, BUF_SIZE)?;
    let mut slots: Vec<SendSlot> = (0..buffers)
        .map(|_| SendSlot {
            addr: RawAddr::zeroed(),
            direction: Direction::ClientToPeer,
        })
        .collect();
    let mut recv_msg = Box::new(zeroed_msghdr());
    recv_msg.msg_namelen = NAME_SPACE as libc::socklen_t;
    recv_msg.msg_controllen = CONTROL_SPACE;
    let (sq_entries, cq_entries) = ring_sizes(buffers);
    let mut ring = build_ring(sq_entries, cq_entries)?;
    // SAFETY: `bufs` outlives `ring` (declared before it), so the registered memory stays valid.
    unsafe {
        ring.submitter()
            .register_buf_ring_with_flags(bufs.ring_addr(), bufs.entries(), BGID, 0)?;
    }
    let (submitter, sq, cq) = ring.split();
    let listener_fd = ctx.listener.as_raw_fd();
    let relayed_slots = ctx.core.max_allocations();
    let fixed = FixedFiles::new(&submitter, listener_fd, relayed_slots);
    let mut io = Io {
        bufs: &mut bufs,
        slots: &mut slots,
        st: Uring {
            starved: Vec::with_capacity(64),
            pending_cancels: Vec::with_capacity(64),
            pending_latency: Vec::with_capacity(buffers as usize),
            unsubmitted_sends: 0,
            deferred_close: Vec::with_capacity(64),
            overflow_seen: 0,
            streams_armed: false,
            fixed,
            recv_msg: &*recv_msg,
        },
        sq,
        submitter,
        cq,
    };
    let listener = io.st.fixed.listener(listener_fd);
    if !io.arm(token(KIND_LISTENER, 0, 0), listener)? {
        return Err(UringError::Setup(io::Error::other(
            "cannot queue the listener receive",
        )));
    }
    // Arms the poll on the streams' epoll fd, if there is one.
    after_core(&mut ctx, &mut io)?;
    tracing::debug!(
        worker = ctx.index,
        registered_files = io.st.fixed.cap,
        "io_uring worker started"
    );

    let mut now = Instant::now();
    // Whether the last wake-up handled anything but send completions (then `busy_poll` applies).
    let mut busy = false;
    loop {
        if ctx.should_stop() {
            break;
        }
        // Re-arm receives that ended (ring empty: ENOBUFS, or any end without MORE) once the
        // ring has buffers again.
        if !io.st.starved.is_empty() && io.bufs.held() < io.bufs.entries() as usize {
            while let Some((tok, target)) = io.st.starved.pop() {
                if !io.arm(tok, target)? {
                    io.st.starved.push((tok, target));
                    break;
                }
                ctx.counters.rearms += 1;
            }
        }
        // Cancels that found the submission queue full last time.
        while let Some(tok) = io.st.pending_cancels.pop() {
            if !io.cancel(tok)? {
                io.st.pending_cancels.push(tok);
                break;
            }
        }
        io.bufs.publish();
        // One io_uring_enter submits everything queued and sleeps until a completion beyond
        // those of the sends it carries arrives (they complete during the submission), or the
        // next timer. The completion queue is empty here: every completion was handled below.
        let wake = ctx.next_wake(now, MAX_WAIT);
        let ts = Timespec::from(wake.saturating_duration_since(now));
        let args = SubmitArgs::new().timespec(&ts);
        io.st.record_latency(&mut ctx);
        io.sq.sync();
        // Busy poll: when it handles new datagrams (their forwards queued), this round does
        // not sleep at all.
        let polled = busy && !busy_poll.is_zero() && {
            ctx.counters.busy_polls += 1;
            poll_busy(&mut ctx, &mut io, busy_poll)?
        };
        if polled {
            ctx.counters.busy_poll_hits += 1;
            now = Instant::now();
        } else {
            // Light load: sleep in the same enter that submits the sends (one syscall per
            // batch; the sent buffers wait in the completion queue until the next wake-up).
            // Heavy load (many buffers held): submit without waiting, recycle the sent buffers
            // at once, and wait in the next iteration, so the buffer ring never runs dry
            // because sent buffers sat in the completion queue.
            let want = if io.sq.is_empty() || io.st.unsubmitted_sends == 0 {
                1
            } else if io.bufs.held() > io.bufs.entries() as usize / HELD_FOR_SEPARATE_WAIT {
                0
            } else {
                io.st.unsubmitted_sends as usize + 1
            };
            let r = io.submitter.submit_with_args(want, &args);
            io.submitted(&mut ctx, r)?;
            now = Instant::now();
            // Drain the completion queue, including the send completions of mid-batch flushes.
            busy = drain(&mut ctx, &mut io, now)? > 0;
        }
        ctx.poll_timers(now);
        after_core(&mut ctx, &mut io)?;
        ctx.maybe_report(now);
    }
    ctx.finish();
    // Cancel everything in flight and wait (bounded) for the kernel to let go of our buffers.
    let _ = io.push(
        &opcode::AsyncCancel2::new(io_uring::types::CancelBuilder::any())
            .build()
            .user_data(token(KIND_CANCEL, 0, 0)),
    );
    io.sq.sync();
    let ts = Timespec::new().nsec(100_000_000);
    let _ = io
        .submitter
        .submit_with_args(1, &SubmitArgs::new().timespec(&ts));
    io.cq.sync();
    for _ in &mut io.cq {}
    drop(io);
    drop(ring);
    drop(slots);
    drop(bufs);
    drop(recv_msg);
    Ok(())
}

/// Handle every completion in the queue, including those that arrive meanwhile; returns how
/// many were not send completions (received datagrams, ended receives, cancellations).
fn drain(ctx: &mut WorkerCtx, io: &mut Io<'_, '_>, now: Instant) -> io::Result<u32> {
    let mut others = 0u32;
    loop {
        io.cq.sync();
        let overflow = io.cq.overflow();
        if overflow != io.st.overflow_seen {
            ctx.counters.cq_overflow += u64::from(overflow.wrapping_sub(io.st.overflow_seen));
            io.st.overflow_seen = overflow;
        }
        if io.cq.is_empty() {
            return Ok(others);
        }
        while let Some(cqe) = io.cq.next() {
            if untoken(cqe.user_data()).0 != KIND_SEND {
                others += 1;
            }
            handle_cqe(ctx, io, now, &cqe)?;
            after_core(ctx, io)?;
            if io.st.unsubmitted_sends >= FLUSH_EVERY {
                io.flush(ctx)?;
            }
        }
    }
}

/// Busy poll (`--busy-poll-us`): submit what is queued, then watch the ring's task-run flag
/// (set by the kernel when a datagram arrived on a watched socket; a memory read, no syscall)
/// for up to `budget`, and when it is set run that work and handle the completions. `true` when
/// datagrams were handled (the caller goes round again without sleeping), `false` when the
/// budget passed with nothing but send completions.
fn poll_busy(ctx: &mut WorkerCtx, io: &mut Io<'_, '_>, budget: Duration) -> io::Result<bool> {
    let until = Instant::now() + budget;
    let mut enter = true;
    loop {
        if enter {
            // Submits the queued sends and runs deferred task work (arrived datagrams)
            // without waiting for anything.
            // SAFETY: no extended argument is passed; the SQEs were built by `push` (their
            // memory outlives the operations, see there).
            let r = unsafe {
                io.submitter.enter::<libc::sigset_t>(
                    io.sq.len() as u32,
                    0,
                    io_uring::EnterFlags::GETEVENTS.bits(),
                    None,
                )
            };
            io.submitted(ctx, r)?;
            if drain(ctx, io, Instant::now())? > 0 {
                return Ok(true);
            }
        }
        if Instant::now() >= until {
            return Ok(false);
        }
        std::hint::spin_loop();
        enter = io.sq.taskrun() || !io.sq.is_empty();
    }
}

/// Handle one completion: a send that finished (its buffer goes back to the ring) or a
/// received datagram (through the core; a forward is queued as a `SEND` of the same buffer).
fn handle_cqe(
    ctx: &mut WorkerCtx,
    io: &mut Io<'_, '_>,
    now: Instant,
    cqe: &cqueue::Entry,
) -> io::Result<()> {
    let (kind, generation, key) = untoken(cqe.user_data());
    let res = cqe.result();
    let flags = cqe.flags();
    match kind {
        KIND_SEND => {
            let bid = key as u16;
            if let Some(slot) = io.slots.get(bid as usize) {
                if res < 0 {
                    ctx.counters.send_errors += 1;
                    tracing::trace!(worker = ctx.index, errno = -res, "forward send failed");
                } else {
                    ctx.counters.forwarded(slot.direction, res as usize);
                }
            }
            io.bufs.recycle(bid);
        }
        KIND_LISTENER | KIND_RELAYED => {
            let source = if kind == KIND_LISTENER {
                Some((
                    Source::Listener,
                    io.st.fixed.listener(ctx.listener.as_raw_fd()),
                ))
            } else {
                ctx.sockets.live(key, generation).and_then(|e| {
                    let target = io.st.fixed.relayed(key, e.fd())?;
                    Some((Source::Relayed(key, e.id), target))
                })
            };
            let more = cqueue::more(flags);
            let bid = cqueue::buffer_select(flags);
            // A multishot receive that ended (no MORE) is re-armed at the top of the next
            // iteration, once the ring has a free buffer; cancelled ones (socket closed) and
            // those of vanished sockets are not.
            if !more
                && res != -libc::ECANCELED
                && let Some((_, target)) = source
            {
                io.st.starved.push((cqe.user_data(), target));
            }
            if res < 0 {
                if let Some(bid) = bid
                    && io.bufs.take(bid)
                {
                    io.bufs.recycle(bid);
                }
                if res == -libc::ENOBUFS {
                    ctx.counters.enobufs += 1;
                } else if res != -libc::ECANCELED {
                    ctx.counters.recv_errors += 1;
                }
                return Ok(());
            }
            let Some(bid) = bid else {
                ctx.counters.recv_errors += 1;
                return Ok(());
            };
            if !io.bufs.take(bid) {
                // Kernel handed us a buffer we think we hold: bookkeeping bug. Count it and
                // leave the buffer alone rather than corrupt an in-flight send.
                ctx.counters.recv_errors += 1;
                return Ok(());
            }
            match source {
                Some((src_kind, _)) => {
                    handle_datagram(ctx, io, now, src_kind, bid, res as usize)?;
                }
                None => {
                    io.bufs.recycle(bid);
                }
            }
        }
        KIND_STREAMS => {
            io.st.streams_armed = false;
            ctx.poll_streams(now);
        }
        _ => {} // KIND_CANCEL: nothing to do.
    }
    Ok(())
}

/// Arm receives on sockets the core opened, cancel those it closed. Closed ones first: a slab
/// key freed and reused within one batch must end up registered for the new socket.
fn after_core(ctx: &mut WorkerCtx, io: &mut Io<'_, '_>) -> io::Result<()> {
    while let Some((key, generation, sock)) = ctx.sockets.closed.pop() {
        let tok = token(KIND_RELAYED, generation, key);
        if !io.cancel(tok)? {
            io.st.pending_cancels.push(tok);
        }
        io.st.starved.retain(|(t, _)| *t != tok);
        io.st.fixed.unregister(&io.submitter, key);
        if let Some(sock) = sock {
            io.st.deferred_close.push(sock);
        }
    }
    // The streams' epoll fd: one one-shot poll at a time, re-armed once it fired (a one-shot
    // poll completes at once when the set is still ready, so nothing left over is missed).
    if !io.st.streams_armed
        && let Some(fd) = ctx.streams_fd()
    {
        let sqe = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
            .build()
            .user_data(token(KIND_STREAMS, 0, 0));
        if io.push(&sqe)? {
            io.st.streams_armed = true;
        }
    }
    while let Some((key, generation)) = ctx.sockets.opened.pop() {
        if let Some(fd) = ctx.prepare_opened(key, generation) {
            let tok = token(KIND_RELAYED, generation, key);
            let target = io.st.fixed.register(&io.submitter, key, fd);
            let keep = ctx
                .sockets
                .slab
                .get(key)
                .is_some_and(|e| ctx.keeps_fd(e.id));
            if let Target::Fixed(_) = target
                && !keep
            {
                // The ring holds the socket now; the fd would only count against RLIMIT_NOFILE.
                // A stream client's socket keeps it: the stream side sends on it with sendto.
                ctx.sockets.release_fd(key);
            }
            if !io.arm(tok, target)? {
                io.st.starved.push((tok, target));
            }
        }
    }
    Ok(())
}

fn handle_datagram(
    ctx: &mut WorkerCtx,
    io: &mut Io<'_, '_>,
    now: Instant,
    src_kind: Source,
    bid: u16,
    res: usize,
) -> io::Result<()> {
    let Some(buf) = io.bufs.buf_mut(bid) else {
        return Ok(());
    };
    let Some(layout) = parse_recvmsg_out(buf, res) else {
        ctx.counters.recv_errors += 1;
        io.bufs.recycle(bid);
        return Ok(());
    };
    let src = net::parse_sockaddr(&buf[RECVMSG_OUT..RECVMSG_OUT + layout.name_len]);
    let ctrl_start = RECVMSG_OUT + NAME_SPACE;
    let meta = net::parse_cmsgs(&buf[ctrl_start..ctrl_start + layout.control_len]);
    ctx.account_ovfl(src_kind, meta.rxq_ovfl);
    let Some(src) = src else {
        ctx.counters.recv_errors += 1;
        io.bufs.recycle(bid);
        return Ok(());
    };
    if layout.truncated {
        let k = matches!(src_kind, Source::Relayed(..)) as usize;
        ctx.counters.rx_packets[k] += 1;
        ctx.count_drop(DropReason::Truncated);
        io.bufs.recycle(bid);
        return Ok(());
    }
    let frame = &mut buf[FRAME_OFFSET..];
    let action = ctx.dispatch(now, src_kind, src, frame, layout.payload_len);
    let Some(ForwardAction {
        fd,
        key,
        to,
        range,
        direction,
    }) = action
    else {
        io.bufs.recycle(bid);
        return Ok(());
    };
    // SAFETY: `range` was checked against the frame length in `dispatch`.
    let data = unsafe { frame.as_ptr().add(range.start) };
    let Some(slot) = io.slots.get_mut(bid as usize) else {
        io.bufs.recycle(bid);
        return Ok(());
    };
    let Ok(len) = u32::try_from(range.len()) else {
        io.bufs.recycle(bid);
        return Ok(());
    };
    let target = match (key, fd) {
        (None, Some(fd)) => Some(io.st.fixed.listener(fd)),
        (Some(k), fd) => io.st.fixed.relayed(k, fd),
        (None, None) => None,
    };
    let Some(target) = target else {
        // A relayed socket neither in the table nor held by fd: cannot happen, never panics.
        ctx.counters.send_errors += 1;
        io.bufs.recycle(bid);
        return Ok(());
    };
    slot.addr.set(to);
    slot.direction = direction;
    let sqe = send_sqe(
        target,
        data,
        len,
        &slot.addr,
        token(KIND_SEND, 0, bid as usize),
    );
    io.bufs.mark_sending(bid);
    if !io.push(&sqe)? {
        // Submission queue full under completion-queue back-pressure: drop this packet.
        ctx.counters.sq_full_drops += 1;
        io.bufs.recycle(bid);
        return Ok(());
    }
    io.st.unsubmitted_sends += 1;
    if let Some(rx) = meta.rx_time_ns {
        io.st.pending_latency.push(rx);
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
