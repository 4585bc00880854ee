//! TURN over TCP and TLS (RFC 8656 client transports): the stream connections of one worker.
//!
//! # Design
//!
//! Each worker owns, next to its UDP listener and relayed sockets, its own `SO_REUSEPORT`
//! listener on every `--listen-tcp` / `--listen-tls` address (the kernel spreads connections
//! across workers) and the connections it accepted. [`Streams`] keeps them in an epoll set of
//! its own, level-triggered; the backend watches that one fd (the epoll backend as one more
//! entry of its set, io_uring with a one-shot `POLL_ADD` re-armed after each round) and calls
//! [`Streams::poll`] when it is readable. So both backends run the same stream code, and the
//! UDP hot path gains nothing but one branch for client-bound outputs whose client is on a
//! stream.
//!
//! A connection's bytes (decrypted by rustls for TLS) go through `peerlink_proto`'s
//! [`StreamFramer`](peerlink_proto::stream::StreamFramer); every complete frame is copied into
//! a per-worker buffer with the core's headroom and handed to the same [`Core`] as datagrams,
//! as [`Core::handle_client`] with a [`Link::Tcp`] / [`Link::Tls`] client. Authentication, peer
//! policy, quotas, permissions, channels and the short-circuit between allocations are the
//! core's and so the same for every transport. The outputs are acted on here: towards a peer
//! from the allocation's relayed socket (`sendto`; io_uring keeps the fd of a stream
//! allocation's relayed socket for this), towards a UDP client from the listener, towards a
//! stream client into that connection. Outputs of the UDP path for a stream client arrive
//! through [`Streams::deliver`]. A frame to a stream is written at once when the socket takes
//! it (ChannelData padded to 4); what it does not take waits in a send buffer of at most
//! [`StreamLimits::send_buffer`] bytes (rustls's own buffer, limited to the same, for TLS).
//!
//! When a connection closes, for whatever reason, its allocation is freed
//! ([`Core::close_stream`]; RFC 8656: an allocation over TCP lives with its connection).
//!
//! # Bounds
//!
//! * Frames longer than [`StreamLimits::max_frame`] (the largest datagram the UDP side takes)
//!   close the connection as soon as their header is read; a connection never holds more than
//!   one partial frame plus one read ([`READ_CHUNK`]).
//! * A client that stops reading is disconnected when a frame no longer fits its send buffer.
//! * Timeouts, checked every [`SWEEP_INTERVAL`]: an unfinished TLS handshake, a frame begun and
//!   not finished, and a connection without an allocation that sent no frame are closed after
//!   their timeout.
//! * At most [`StreamLimits::max_connections`] connections over all workers; one over that is
//!   accepted and closed at once (counted as refused).
//! * Fair share: at most [`READ_BUDGET`] bytes are read from one connection per round.
//!
//! Every close is one debug log line with its reason and one count in
//! `stream_connections_closed_total{transport,reason}`.

pub mod conn;

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use slab::Slab;

use crate::core::{Core, HEADROOM, Link, Output, SocketRef, StreamId, Transport};
use crate::metrics::{Direction, IoCounters};
use crate::net;
use crate::worker::SocketTable;
use conn::{CloseReason, Closing, Conn, Read1};
/// The certificate and key of the TLS listeners, reloaded on SIGHUP (shared with signaling).
pub use peerlink_cli::tls::{TlsError, TlsStore};

/// Bytes read from a socket at once.
pub const READ_CHUNK: usize = 16 * 1024;
/// Bytes read from one connection per round before the others get their turn.
pub const READ_BUDGET: usize = 64 * 1024;
/// How often timeouts are checked.
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(250);
/// Connections accepted per listener per round.
const ACCEPT_BATCH: usize = 64;
/// Epoll events taken per `epoll_wait`.
const EVENTS: usize = 256;
/// Rounds of `epoll_wait` per [`Streams::poll`].
const ROUNDS: usize = 4;
/// After an accept error (fd table full): the listener rests this long.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// Token bit of listeners in the streams' epoll set.
const LISTENER_BIT: u64 = 1 << 63;
/// Generations of connection slots fit in 31 bits (the token keeps the listener bit free).
const GEN_MASK: u32 = 0x7FFF_FFFF;

/// Limits of the stream connections.
#[derive(Clone, Debug)]
pub struct StreamLimits {
    /// Connections over all workers (`max_stream_connections`, default 10,000).
    pub max_connections: usize,
    /// An unfinished TLS handshake is closed after this (`stream_handshake_timeout`, 10 s).
    pub handshake_timeout: Duration,
    /// A connection without an allocation that sent no complete frame for this long is closed
    /// (`stream_idle_timeout`, 30 s).
    pub idle_timeout: Duration,
    /// A frame begun and not finished for this long closes the connection
    /// (`stream_stall_timeout`, 10 s).
    pub stall_timeout: Duration,
    /// Bytes waiting to be sent to one client before it is disconnected (256 KiB).
    pub send_buffer: usize,
    /// Longest frame accepted from a client (STUN message or ChannelData without padding).
    pub max_frame: usize,
}

impl Default for StreamLimits {
    fn default() -> Self {
        StreamLimits {
            max_connections: 10_000,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            stall_timeout: Duration::from_secs(10),
            send_buffer: SEND_BUFFER,
            max_frame: crate::epoll::PAYLOAD_CAP,
        }
    }
}

/// Default per-connection send buffer cap.
pub const SEND_BUFFER: usize = 256 * 1024;

/// Per-worker stream counters, by [`Transport::index`] (the UDP slot stays 0).
#[derive(Clone, Debug, Default, Serialize)]
pub struct StreamCounters {
    /// Connections accepted.
    pub accepted: [u64; 3],
    /// Connections refused over the connection limit.
    pub refused: [u64; 3],
    /// Connections open now.
    pub active: [u64; 3],
    /// Connections closed, by [`CloseReason::index`].
    pub closed: [[u64; CloseReason::COUNT]; 3],
    /// Frames received from clients.
    pub rx_frames: [u64; 3],
    /// Bytes of frames received (padding excluded).
    pub rx_bytes: [u64; 3],
    /// Frames sent to clients.
    pub tx_frames: [u64; 3],
    /// Bytes of frames sent (padding excluded).
    pub tx_bytes: [u64; 3],
    /// TLS handshakes completed.
    pub handshakes: u64,
}

impl StreamCounters {
    /// Adds another worker's counters.
    pub fn add(&mut self, o: &StreamCounters) {
        for t in 0..3 {
            self.accepted[t] += o.accepted[t];
            self.refused[t] += o.refused[t];
            self.active[t] += o.active[t];
            self.rx_frames[t] += o.rx_frames[t];
            self.rx_bytes[t] += o.rx_bytes[t];
            self.tx_frames[t] += o.tx_frames[t];
            self.tx_bytes[t] += o.tx_bytes[t];
            for r in 0..CloseReason::COUNT {
                self.closed[t][r] += o.closed[t][r];
            }
        }
        self.handshakes += o.handshakes;
    }
}

/// One stream listener of a worker.
struct Listener {
    sock: TcpListener,
    transport: Transport,
    /// Resting after an accept error until then (out of the epoll set meanwhile).
    paused_until: Option<Instant>,
}

/// What stream processing needs of its worker besides the connections.
pub struct CoreIo<'a> {
    /// The worker's core.
    pub core: &'a mut Core,
    /// Its relayed sockets.
    pub sockets: &'a mut SocketTable,
    /// Its reply scratch buffer.
    pub scratch: &'a mut [u8],
    /// Its UDP listener.
    pub listener: RawFd,
    /// Its I/O counters.
    pub counters: &'a mut IoCounters,
}

/// The stream listeners and connections of one worker.
pub struct Streams {
    worker: usize,
    epoll: OwnedFd,
    listeners: Vec<Listener>,
    conns: Slab<Conn>,
    next_generation: u32,
    limits: StreamLimits,
    tls: Option<TlsStore>,
    /// Connections over all workers.
    total: Arc<AtomicUsize>,
    chunk: Box<[u8]>,
    work: Box<[u8]>,
    events: Vec<libc::epoll_event>,
    doomed: Vec<(usize, Closing)>,
    next_sweep: Instant,
    /// Counters.
    pub counters: StreamCounters,
}

fn epoll_ctl(ep: RawFd, op: i32, fd: RawFd, events: u32, data: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: data };
    // SAFETY: `ev` is a valid epoll_event for the call.
    let rc = unsafe { libc::epoll_ctl(ep, op, fd, &mut ev) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn conn_token(key: usize, generation: u32) -> u64 {
    (u64::from(generation & GEN_MASK) << 32) | (key as u64 & 0xFFFF_FFFF)
}

/// The slab key and generation a stream id names.
fn untoken(id: u64) -> (usize, u32) {
    ((id & 0xFFFF_FFFF) as usize, (id >> 32) as u32 & GEN_MASK)
}

const CONN_EVENTS: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;

/// Binds one worker's listener on `addr` (`SO_REUSEPORT`, `SO_REUSEADDR`, non-blocking,
/// backlog 1024).
pub fn bind_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let s = Socket::new(domain, Type::STREAM.cloexec(), Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&SockAddr::from(addr))?;
    s.listen(1024)?;
    Ok(s.into())
}

impl Streams {
    /// The stream side of worker `worker`: `listeners` (bound, non-blocking) with their
    /// transport, `tls` for the TLS ones, `total` counting connections over all workers.
    pub fn new(
        worker: usize,
        listeners: Vec<(TcpListener, Transport)>,
        tls: Option<TlsStore>,
        limits: StreamLimits,
        total: Arc<AtomicUsize>,
    ) -> io::Result<Self> {
        // SAFETY: plain syscall; the result is checked and owned.
        let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh fd we own.
        let epoll = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut ls = Vec::with_capacity(listeners.len());
        for (i, (sock, transport)) in listeners.into_iter().enumerate() {
            sock.set_nonblocking(true)?;
            epoll_ctl(
                epoll.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                sock.as_raw_fd(),
                libc::EPOLLIN as u32,
                LISTENER_BIT | i as u64,
            )?;
            ls.push(Listener {
                sock,
                transport,
                paused_until: None,
            });
        }
        Ok(Streams {
            worker,
            epoll,
            listeners: ls,
            conns: Slab::new(),
            next_generation: 1,
            work: vec![0u8; HEADROOM + limits.max_frame].into_boxed_slice(),
            limits,
            tls,
            total,
            chunk: vec![0u8; READ_CHUNK].into_boxed_slice(),
            events: vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS],
            doomed: Vec::new(),
            next_sweep: Instant::now() + SWEEP_INTERVAL,
            counters: StreamCounters::default(),
        })
    }

    /// The fd the backend watches for readability: the streams' own epoll set.
    pub fn fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Connections open on this worker.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// When [`Streams::sweep`] is next due.
    pub fn next_sweep(&self) -> Instant {
        self.next_sweep
    }

    /// Handles whatever is ready: new connections, readable and writable ones.
    pub fn poll(&mut self, now: Instant, io: &mut CoreIo<'_>) {
        for _ in 0..ROUNDS {
            // SAFETY: `events` is a valid buffer of its length.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll.as_raw_fd(),
                    self.events.as_mut_ptr(),
                    self.events.len() as i32,
                    0,
                )
            };
            if n <= 0 {
                break;
            }
            for i in 0..n as usize {
                let (data, events) = (self.events[i].u64, self.events[i].events);
                if data & LISTENER_BIT != 0 {
                    self.accept(now, (data & !LISTENER_BIT) as usize);
                } else {
                    let (key, generation) = untoken(data);
                    self.on_conn(now, key, generation, events, io);
                }
            }
            self.reap(now, io.core, io.sockets);
            if (n as usize) < self.events.len() {
                break;
            }
        }
    }

    /// Closes connections whose timeout passed and wakes rested listeners; every
    /// [`SWEEP_INTERVAL`].
    pub fn sweep(&mut self, now: Instant, core: &mut Core, sockets: &mut SocketTable) {
        if now < self.next_sweep {
            return;
        }
        self.next_sweep = now + SWEEP_INTERVAL;
        let l = &self.limits;
        for (key, c) in self.conns.iter() {
            let why = if c.handshaking() && now >= c.accepted + l.handshake_timeout {
                Some((CloseReason::HandshakeTimeout, "TLS handshake not finished"))
            } else if c.framer.mid_frame() && now >= c.last_rx + l.stall_timeout {
                Some((CloseReason::Stalled, "stopped in the middle of a frame"))
            } else if now >= c.last_frame + l.idle_timeout
                && !core.has_allocation(&c.client(StreamId(conn_token(key, c.generation))), now)
            {
                Some((CloseReason::IdleTimeout, "no allocation and no request"))
            } else {
                None
            };
            if let Some((reason, detail)) = why {
                self.doomed.push((
                    key,
                    Closing {
                        reason,
                        detail: detail.into(),
                    },
                ));
            }
        }
        self.reap(now, core, sockets);
        for (i, l) in self.listeners.iter_mut().enumerate() {
            if l.paused_until.is_some_and(|t| now >= t) {
                l.paused_until = None;
                let _ = epoll_ctl(
                    self.epoll.as_raw_fd(),
                    libc::EPOLL_CTL_ADD,
                    l.sock.as_raw_fd(),
                    libc::EPOLLIN as u32,
                    LISTENER_BIT | i as u64,
                );
            }
        }
    }

    /// Writes one frame of the UDP path (`bytes`: a response, Data indication or ChannelData
    /// for this worker's stream client `link`). False when the connection is gone or was
    /// closed because the frame did not fit.
    pub fn deliver(
        &mut self,
        link: Link,
        bytes: &[u8],
        core: &mut Core,
        sockets: &mut SocketTable,
    ) -> bool {
        let ok = self.send(link, bytes);
        if !self.doomed.is_empty() {
            self.reap(Instant::now(), core, sockets);
        }
        ok
    }

    /// Closes every connection (worker stop); allocations are the core's to free.
    pub fn shutdown(&mut self) {
        let n = self.conns.len();
        self.conns.clear();
        self.total.fetch_sub(n, Ordering::Relaxed);
        self.counters.active = [0; 3];
    }

    fn accept(&mut self, now: Instant, index: usize) {
        for _ in 0..ACCEPT_BATCH {
            let Some(l) = self.listeners.get_mut(index) else {
                return;
            };
            let transport = l.transport;
            let (sock, peer) = match l.sock.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    continue;
                }
                Err(e) => {
                    // Out of fds or memory: rest the listener instead of spinning on it.
                    tracing::warn!(worker = self.worker, error = %e, "accept failed; pausing the listener");
                    let _ = epoll_ctl(
                        self.epoll.as_raw_fd(),
                        libc::EPOLL_CTL_DEL,
                        l.sock.as_raw_fd(),
                        0,
                        0,
                    );
                    l.paused_until = Some(now + ACCEPT_PAUSE);
                    return;
                }
            };
            let t = transport.index();
            if self.total.load(Ordering::Relaxed) >= self.limits.max_connections {
                self.counters.refused[t] += 1;
                tracing::debug!(worker = self.worker, %peer, "stream connection refused: limit reached");
                drop(sock);
                continue;
            }
            if let Err(e) = self.open(now, sock, peer, transport) {
                tracing::debug!(worker = self.worker, %peer, error = %e, "stream connection setup failed");
            }
        }
    }

    fn open(
        &mut self,
        now: Instant,
        sock: TcpStream,
        peer: SocketAddr,
        transport: Transport,
    ) -> io::Result<()> {
        sock.set_nonblocking(true)?;
        sock.set_nodelay(true)?;
        let (max, cap) = (self.limits.max_frame, self.limits.send_buffer);
        let mut conn = match (transport, &self.tls) {
            (Transport::Tls, Some(store)) => {
                let session = rustls::ServerConnection::new(store.current())
                    .map_err(|e| io::Error::other(e.to_string()))?;
                Conn::tls(sock, peer, session, max, cap, now)
            }
            (Transport::Tls, None) => return Err(io::Error::other("no TLS configuration")),
            _ => Conn::plain(sock, peer, max, cap, now),
        };
        let generation = self.next_generation;
        self.next_generation = (self.next_generation.wrapping_add(1) & GEN_MASK).max(1);
        conn.generation = generation;
        let fd = conn.fd();
        let key = self.conns.insert(conn);
        if let Err(e) = epoll_ctl(
            self.epoll.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            fd,
            CONN_EVENTS,
            conn_token(key, generation),
        ) {
            self.conns.remove(key);
            return Err(e);
        }
        self.total.fetch_add(1, Ordering::Relaxed);
        let t = transport.index();
        self.counters.accepted[t] += 1;
        self.counters.active[t] += 1;
        Ok(())
    }

    fn live(&self, key: usize, generation: u32) -> bool {
        self.conns
            .get(key)
            .is_some_and(|c| c.generation == generation)
    }

    fn on_conn(
        &mut self,
        now: Instant,
        key: usize,
        generation: u32,
        events: u32,
        io: &mut CoreIo<'_>,
    ) {
        if !self.live(key, generation) {
            return;
        }
        if events & libc::EPOLLOUT as u32 != 0
            && let Some(c) = self.conns.get_mut(key)
            && let Err(why) = c.flush()
        {
            self.doomed.push((key, why));
            return;
        }
        let readable = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;
        if events & readable != 0 {
            self.read(now, key, io);
        }
        self.update_interest(key);
    }

    /// Reads up to [`READ_BUDGET`] bytes from connection `key` and runs its frames.
    fn read(&mut self, now: Instant, key: usize, io: &mut CoreIo<'_>) {
        let mut budget = READ_BUDGET;
        loop {
            let Some(c) = self.conns.get_mut(key) else {
                return;
            };
            let was_handshaking = c.handshaking();
            let r = c.read_some(&mut self.chunk, now);
            if was_handshaking && !c.handshaking() {
                self.counters.handshakes += 1;
            }
            let done = match r {
                Ok(Read1::Bytes(n)) => {
                    budget = budget.saturating_sub(n);
                    budget == 0
                }
                Ok(Read1::WouldBlock) => true,
                Ok(Read1::Eof) => {
                    // Frames that arrived before the close still count.
                    self.frames(now, key, io);
                    if self.conns.contains(key) {
                        let detail = if self.conns.get(key).is_some_and(|c| c.framer.mid_frame()) {
                            "closed by the client in the middle of a frame"
                        } else {
                            "closed by the client"
                        };
                        self.doomed.push((
                            key,
                            Closing {
                                reason: CloseReason::PeerClosed,
                                detail: detail.into(),
                            },
                        ));
                    }
                    return;
                }
                Err(why) => {
                    self.doomed.push((key, why));
                    return;
                }
            };
            self.frames(now, key, io);
            if done || self.doomed.iter().any(|(k, _)| *k == key) {
                return;
            }
        }
    }

    /// Runs every complete frame of connection `key` through the core and acts on the outputs.
    fn frames(&mut self, now: Instant, key: usize, io: &mut CoreIo<'_>) {
        let mut work = std::mem::take(&mut self.work);
        while let Some(c) = self.conns.get_mut(key) {
            if self.doomed.iter().any(|(k, _)| *k == key) {
                break;
            }
            let id = StreamId(conn_token(key, c.generation));
            let client = c.client(id);
            let len = match c.framer.next_frame() {
                Ok(Some(f)) => {
                    let len = f.bytes.len();
                    match work.get_mut(HEADROOM..HEADROOM + len) {
                        Some(dst) => dst.copy_from_slice(f.bytes),
                        None => {
                            // Cannot happen (the framer caps frames at the buffer's size);
                            // closing beats a panic.
                            self.doomed.push((
                                key,
                                Closing {
                                    reason: CloseReason::BadFrame,
                                    detail: "frame larger than the work buffer".into(),
                                },
                            ));
                            break;
                        }
                    }
                    len
                }
                Ok(None) => {
                    c.framer.release();
                    break;
                }
                Err(e) => {
                    self.doomed.push((key, Closing::frame(e)));
                    break;
                }
            };
            c.last_frame = now;
            let t = client.link.transport().index();
            self.counters.rx_frames[t] += 1;
            self.counters.rx_bytes[t] += len as u64;
            let routed = io
                .core
                .handle_client(now, client, &mut work, len, io.scratch, io.sockets);
            self.act(routed.out, routed.link, &work, io);
        }
        self.work = work;
    }

    /// Carries out what the core said about one frame in `work`.
    fn act(&mut self, out: Output, link: Link, work: &[u8], io: &mut CoreIo<'_>) {
        match out {
            Output::Forward { from, to, range } => {
                let Some(bytes) = work.get(range) else {
                    return;
                };
                match from {
                    SocketRef::Relayed(id) => match io.sockets.fd_of(id) {
                        Some(fd) => match net::send_to(fd, bytes, to) {
                            Ok(n) => io.counters.forwarded(Direction::ClientToPeer, n),
                            Err(_) => io.counters.send_errors += 1,
                        },
                        None => io.counters.send_errors += 1,
                    },
                    SocketRef::Listener => self.relay_to_client(
                        link,
                        to,
                        bytes,
                        Direction::ClientToClient,
                        io.listener,
                        io.counters,
                    ),
                }
            }
            Output::Reply {
                from,
                to,
                len,
                data,
            } => {
                let Some(bytes) = io.scratch.get(..len) else {
                    return;
                };
                match from {
                    SocketRef::Listener => {
                        if data {
                            self.relay_to_client(
                                link,
                                to,
                                bytes,
                                Direction::ClientToClient,
                                io.listener,
                                io.counters,
                            );
                        } else {
                            let sent = match link {
                                Link::Udp => {
                                    net::send_to(io.listener, bytes, to).ok().inspect(|&n| {
                                        io.counters.client_tx(Transport::Udp, n);
                                    })
                                }
                                _ => self.send(link, bytes).then_some(bytes.len()),
                            };
                            match sent {
                                Some(n) => {
                                    io.counters.reply_packets += 1;
                                    io.counters.reply_bytes += n as u64;
                                }
                                None => io.counters.send_errors += 1,
                            }
                        }
                    }
                    SocketRef::Relayed(id) => match io.sockets.fd_of(id) {
                        Some(fd) if net::send_to(fd, bytes, to).is_ok() => {}
                        _ => io.counters.send_errors += 1,
                    },
                }
            }
            Output::Drop(_) => {}
        }
    }

    /// Relayed data for a client (short-circuited from a stream client): from the UDP
    /// listener or into the client's connection.
    fn relay_to_client(
        &mut self,
        link: Link,
        to: SocketAddr,
        bytes: &[u8],
        d: Direction,
        listener: RawFd,
        counters: &mut IoCounters,
    ) {
        let sent = match link {
            Link::Udp => net::send_to(listener, bytes, to).ok(),
            _ => self.send(link, bytes).then_some(bytes.len()),
        };
        match sent {
            Some(n) => {
                counters.fwd_packets[d as usize] += 1;
                counters.fwd_bytes[d as usize] += n as u64;
                if link == Link::Udp {
                    counters.client_tx(Transport::Udp, n);
                }
            }
            None => counters.send_errors += 1,
        }
    }

    /// Queues `bytes` on the connection of `link`; a connection that cannot take it is doomed.
    fn send(&mut self, link: Link, bytes: &[u8]) -> bool {
        let Some(StreamId(id)) = link.stream() else {
            return false;
        };
        let (key, generation) = untoken(id);
        let Some(c) = self
            .conns
            .get_mut(key)
            .filter(|c| c.generation == generation)
        else {
            return false;
        };
        if self.doomed.iter().any(|(k, _)| *k == key) {
            return false;
        }
        match c.send(bytes) {
            Ok(()) => {
                let t = link.transport().index();
                self.counters.tx_frames[t] += 1;
                self.counters.tx_bytes[t] += bytes.len() as u64;
                self.update_interest(key);
                true
            }
            Err(why) => {
                self.doomed.push((key, why));
                false
            }
        }
    }

    /// Watches EPOLLOUT exactly while output waits.
    fn update_interest(&mut self, key: usize) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        let want = c.pending_output();
        if want == c.watching_out {
            return;
        }
        let events = if want {
            CONN_EVENTS | libc::EPOLLOUT as u32
        } else {
            CONN_EVENTS
        };
        if epoll_ctl(
            self.epoll.as_raw_fd(),
            libc::EPOLL_CTL_MOD,
            c.fd(),
            events,
            conn_token(key, c.generation),
        )
        .is_ok()
        {
            c.watching_out = want;
        }
    }

    /// Closes the doomed connections: one log line each, their allocations freed.
    fn reap(&mut self, now: Instant, core: &mut Core, sockets: &mut SocketTable) {
        let _ = now;
        while let Some((key, why)) = self.doomed.pop() {
            let Some(c) = self.conns.try_remove(key) else {
                continue;
            };
            let id = StreamId(conn_token(key, c.generation));
            let client = c.client(id);
            let freed = core.close_stream(client, sockets);
            let t = client.link.transport().index();
            self.counters.closed[t][why.reason.index()] += 1;
            self.counters.active[t] = self.counters.active[t].saturating_sub(1);
            self.total.fetch_sub(1, Ordering::Relaxed);
            tracing::debug!(
                worker = self.worker,
                peer = %client.addr,
                transport = client.link.transport().as_str(),
                reason = why.reason.as_str(),
                allocation_freed = freed,
                "stream connection closed: {}",
                why.detail
            );
            // Dropping `c` closes the socket, which takes it out of the epoll set.
            drop(c);
        }
    }
}

impl Drop for Streams {
    fn drop(&mut self) {
        self.shutdown();
    }
}
