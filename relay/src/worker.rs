//! What both backends share: the per-worker table of relayed sockets (the core's
//! [`RelaySockets`]), the dispatch of one received datagram through the core, counters, the
//! latency histogram and the once-a-second report to the metrics thread.
//!
//! A backend owns the sockets' readiness/completion machinery; this module owns what the core
//! asked for. Nothing here allocates per packet.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::ops::{Range, RangeInclusive};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crossbeam_channel::Sender;
use hdrhistogram::Histogram;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use slab::Slab;

use crate::core::{
    AddrFamily, AllocationId, Client, Core, DropReason, HEADROOM, Link, OpenError, Opened, Output,
    PortRequest, RESERVATION_LIFETIME, RelaySockets, SCRATCH_LEN, SocketRef, Transport,
};
use crate::metrics::{Direction, IoCounters, REPORT_INTERVAL, SocketKind, WorkerReport};
use crate::net;
use crate::stream::{CoreIo, Streams};

/// Multiplicative hasher for `AllocationId` keys (a u32 the core already made unique; no
/// attacker controls it, so SipHash's DoS resistance buys nothing on this per-packet lookup).
#[derive(Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.0 = u64::from(n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// One relayed socket.
pub struct RelayedEntry {
    /// The socket, while this process holds it by fd. `None` once the io_uring backend moved it
    /// into its ring's registered file table (then the ring holds the only reference: no entry
    /// in the process's fd table, so RLIMIT_NOFILE does not bound the allocations).
    pub sock: Option<UdpSocket>,
    /// Allocation it belongs to.
    pub id: AllocationId,
    /// Generation (distinguishes a reused slab key from the previous occupant).
    pub generation: u32,
    /// Last SO_RXQ_OVFL value seen on it.
    pub last_ovfl: u32,
}

impl RelayedEntry {
    /// The socket's fd, while this process holds one.
    pub fn fd(&self) -> Option<RawFd> {
        self.sock.as_ref().map(AsRawFd::as_raw_fd)
    }
}

/// The relayed sockets of one worker, keyed by slab index and by `AllocationId`.
pub struct SocketTable {
    /// Entries; the key goes into completion tokens.
    pub slab: Slab<RelayedEntry>,
    by_id: HashMap<AllocationId, usize, BuildHasherDefault<IdHasher>>,
    /// Relay addresses per family; allocations take them in turn (`next_v4` / `next_v6`).
    relay_v4: Vec<IpAddr>,
    relay_v6: Vec<IpAddr>,
    next_v4: usize,
    next_v6: usize,
    ports: RangeInclusive<u16>,
    /// Relayed sockets must get an fd below this (RLIMIT_NOFILE minus [`FD_RESERVE`]).
    fd_ceiling: RawFd,
    rng: ChaCha8Rng,
    next_generation: u32,
    /// Opened since the backend last looked: (key, generation) to arm.
    pub opened: Vec<(usize, u32)>,
    /// Closed since the backend last looked: (key, generation, socket if still held by fd) to
    /// disarm and drop.
    pub closed: Vec<(usize, u32, Option<UdpSocket>)>,
    /// Sockets that failed to open.
    pub open_failures: u64,
    /// Ports held for RESERVATION-TOKENs (shared with the other workers).
    reservations: Arc<Reservations>,
}

impl SocketTable {
    /// An empty table binding on `relay_ips` within `ports`.
    pub fn new(relay_ips: &[IpAddr], ports: RangeInclusive<u16>, seed: u64) -> Self {
        Self {
            slab: Slab::with_capacity(1024),
            by_id: HashMap::with_capacity_and_hasher(1024, Default::default()),
            relay_v4: relay_ips.iter().copied().filter(IpAddr::is_ipv4).collect(),
            relay_v6: relay_ips.iter().copied().filter(IpAddr::is_ipv6).collect(),
            next_v4: 0,
            next_v6: 0,
            ports,
            fd_ceiling: fd_ceiling(),
            rng: ChaCha8Rng::seed_from_u64(seed),
            next_generation: 1,
            opened: Vec::with_capacity(64),
            closed: Vec::with_capacity(64),
            open_failures: 0,
            reservations: Arc::default(),
        }
    }

    /// Hold reserved ports in `reservations`, the table every worker of the relay shares.
    pub fn with_reservations(mut self, reservations: Arc<Reservations>) -> Self {
        self.reservations = reservations;
        self
    }

    /// Raw fd of `id`'s relayed socket (`None` also when the socket lives only in a ring).
    pub fn fd_of(&self, id: AllocationId) -> Option<RawFd> {
        self.key_fd_of(id).and_then(|(_, fd)| fd)
    }

    /// Slab key and raw fd (if this process still holds one) of `id`'s relayed socket.
    pub fn key_fd_of(&self, id: AllocationId) -> Option<(usize, Option<RawFd>)> {
        let key = *self.by_id.get(&id)?;
        self.slab.get(key).map(|e| (key, e.fd()))
    }

    /// Give up the fd of socket `key` (closing it) once an io_uring ring holds the socket in
    /// its registered file table; the ring's reference keeps the socket and its port.
    pub fn release_fd(&mut self, key: usize) {
        if let Some(e) = self.slab.get_mut(key) {
            e.sock = None;
        }
    }

    /// Entry `key` if it still has generation `generation`.
    pub fn live(&mut self, key: usize, generation: u32) -> Option<&mut RelayedEntry> {
        self.slab
            .get_mut(key)
            .filter(|e| e.generation == generation)
    }

    /// Relayed sockets open.
    pub fn len(&self) -> usize {
        self.slab.len()
    }

    /// No relayed sockets open.
    pub fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }
}

impl RelaySockets for SocketTable {
    fn open(
        &mut self,
        id: AllocationId,
        family: AddrFamily,
        port: PortRequest,
        now: Instant,
    ) -> Result<Opened, OpenError> {
        if self.by_id.contains_key(&id) {
            // The core never reuses a live id; refuse rather than leak the old socket.
            return Err(OpenError::Io(std::io::Error::other(
                "allocation id already has a socket",
            )));
        }
        let (sock, addr, token) = match port {
            PortRequest::Reserved(token) => {
                let (sock, addr) = self
                    .reservations
                    .take(&token, now)
                    .ok_or(OpenError::NoReservation)?;
                (sock, addr, None)
            }
            PortRequest::EvenReserveNext => {
                if self.reservations.is_full(now) {
                    self.open_failures += 1;
                    return Err(OpenError::NoPorts);
                }
                let pair = self.bind(family, |ip, ports, rng| {
                    net::bind_relayed_pair(ip, ports, rng)
                })?;
                let (next_sock, next_addr) = pair.next;
                let Some(token) = self.reservations.hold(next_sock, next_addr, now) else {
                    self.open_failures += 1;
                    return Err(OpenError::NoPorts);
                };
                (pair.even.0, pair.even.1, Some(token))
            }
            PortRequest::Any | PortRequest::Even => {
                let even = port == PortRequest::Even;
                let (sock, addr) = self.bind(family, |ip, ports, rng| {
                    net::bind_relayed(ip, ports, even, rng)
                })?;
                (sock, addr, None)
            }
        };
        // The kernel hands out the lowest free fd: one this high means the last few are all
        // that is left, and they stay for the metrics server and the other workers' listeners
        // (a full fd table would take /metrics and /healthz down with it).
        if sock.as_raw_fd() >= self.fd_ceiling {
            self.open_failures += 1;
            return Err(OpenError::Io(std::io::Error::from_raw_os_error(
                libc::EMFILE,
            )));
        }
        let generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1) & GEN_MASK;
        if self.next_generation == 0 {
            self.next_generation = 1;
        }
        let key = self.slab.insert(RelayedEntry {
            sock: Some(sock),
            id,
            generation,
            last_ovfl: 0,
        });
        self.by_id.insert(id, key);
        self.opened.push((key, generation));
        Ok(Opened { addr, token })
    }

    fn close(&mut self, id: AllocationId) {
        if let Some(key) = self.by_id.remove(&id)
            && let Some(entry) = self.slab.try_remove(key)
        {
            self.closed.push((key, entry.generation, entry.sock));
        }
    }
}

impl SocketTable {
    /// Bind with `bind` on the family's addresses in turn, starting after the last one used; an
    /// address whose ports are all taken passes the allocation on to the next.
    fn bind<T>(
        &mut self,
        family: AddrFamily,
        bind: impl Fn(IpAddr, RangeInclusive<u16>, &mut ChaCha8Rng) -> std::io::Result<Option<T>>,
    ) -> Result<T, OpenError> {
        let (ips, next) = match family {
            AddrFamily::V4 => (&self.relay_v4, &mut self.next_v4),
            AddrFamily::V6 => (&self.relay_v6, &mut self.next_v6),
        };
        if ips.is_empty() {
            return Err(OpenError::FamilyNotSupported);
        }
        let start = *next % ips.len();
        for i in 0..ips.len() {
            let ip = ips[(start + i) % ips.len()];
            match bind(ip, self.ports.clone(), &mut self.rng) {
                Ok(Some(bound)) => {
                    *next = start + i + 1;
                    return Ok(bound);
                }
                Ok(None) => {}
                Err(e) => {
                    self.open_failures += 1;
                    return Err(OpenError::Io(e));
                }
            }
        }
        self.open_failures += 1;
        Err(OpenError::NoPorts)
    }
}

/// At most this many ports are held for RESERVATION-TOKENs at once, over all workers: a hold
/// costs a socket and a port for [`RESERVATION_LIFETIME`] whether or not it is ever claimed.
pub const MAX_RESERVATIONS: usize = 1024;

/// Ports held by EVEN-PORT (R = 1) until their RESERVATION-TOKEN is used or
/// [`RESERVATION_LIFETIME`] passes. Shared by every worker (an Allocate with the token may land
/// on any of them); touched only by Allocate requests that reserve or claim, never per packet.
/// A hold that ran out is closed by the next of those (its port stays bound until then).
#[derive(Default)]
pub struct Reservations {
    held: Mutex<HashMap<[u8; 8], Held>>,
}

struct Held {
    sock: UdpSocket,
    addr: SocketAddr,
    expires: Instant,
}

impl Reservations {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 8], Held>> {
        // Plain map of sockets: a worker that panicked mid-update left it consistent.
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hold `sock` (bound on `addr`) under a fresh random token until `now` +
    /// [`RESERVATION_LIFETIME`]; `None` when [`MAX_RESERVATIONS`] are held.
    pub fn hold(&self, sock: UdpSocket, addr: SocketAddr, now: Instant) -> Option<[u8; 8]> {
        let mut held = self.lock();
        held.retain(|_, h| h.expires > now);
        if held.len() >= MAX_RESERVATIONS {
            return None;
        }
        let token = loop {
            let t: [u8; 8] = rand::random();
            if !held.contains_key(&t) {
                break t;
            }
        };
        held.insert(
            token,
            Held {
                sock,
                addr,
                expires: now + RESERVATION_LIFETIME,
            },
        );
        Some(token)
    }

    /// Take the socket held under `token`, if its hold is still live at `now`.
    pub fn take(&self, token: &[u8; 8], now: Instant) -> Option<(UdpSocket, SocketAddr)> {
        let mut held = self.lock();
        held.retain(|_, h| h.expires > now);
        held.remove(token).map(|h| (h.sock, h.addr))
    }

    /// Whether no further hold fits at `now`.
    pub fn is_full(&self, now: Instant) -> bool {
        let mut held = self.lock();
        held.retain(|_, h| h.expires > now);
        held.len() >= MAX_RESERVATIONS
    }

    /// Ports held at `now` (expired holds not yet dropped are not counted).
    pub fn len(&self, now: Instant) -> usize {
        self.lock().values().filter(|h| h.expires > now).count()
    }

    /// No port is held at `now`.
    pub fn is_empty(&self, now: Instant) -> bool {
        self.len(now) == 0
    }
}

/// File descriptors relayed sockets leave free for everything else (HTTP connections, logs).
pub const FD_RESERVE: RawFd = 32;

/// The first fd number a relayed socket may not have: RLIMIT_NOFILE minus [`FD_RESERVE`].
fn fd_ceiling() -> RawFd {
    let Some(limit) = net::nofile_limit() else {
        return RawFd::MAX;
    };
    RawFd::try_from(limit)
        .unwrap_or(RawFd::MAX)
        .saturating_sub(FD_RESERVE)
        .max(FD_RESERVE)
}

/// Generations fit in 24 bits (completion tokens carry them next to the slab key).
pub const GEN_MASK: u32 = 0x00FF_FFFF;

/// Where a datagram came from.
#[derive(Clone, Copy, Debug)]
pub enum Source {
    /// The worker's listener.
    Listener,
    /// A relayed socket: slab key and its allocation.
    Relayed(usize, AllocationId),
}

/// A zero-copy send the backend must perform: `frame[range]` from `fd` to `to`.
#[derive(Clone, Debug)]
pub struct ForwardAction {
    /// Socket to send from: always `Some` for the listener; `None` for a relayed socket that
    /// lives only in the io_uring ring's file table (named there by `key`).
    pub fd: Option<RawFd>,
    /// Slab key of that socket when it is a relayed one (`None`: the listener).
    pub key: Option<usize>,
    /// Destination.
    pub to: SocketAddr,
    /// Bytes of the frame (the slice handed to the core) to send.
    pub range: Range<usize>,
    /// For counters.
    pub direction: Direction,
}

/// Everything a worker owns besides its backend machinery.
pub struct WorkerCtx {
    /// Worker index.
    pub index: usize,
    /// The sans-IO core.
    pub core: Core,
    /// Relayed sockets.
    pub sockets: SocketTable,
    /// I/O counters.
    pub counters: IoCounters,
    /// Latency since the last report (µs).
    pub histogram: Histogram<u64>,
    /// Scratch buffer the core writes replies into.
    pub scratch: Box<[u8]>,
    /// The listener.
    pub listener: UdpSocket,
    /// SO_RXQ_OVFL last seen on the listener.
    pub listener_ovfl: u32,
    /// TCP/TLS listeners and connections (`None` without `--listen-tcp` / `--listen-tls`).
    pub streams: Option<Streams>,
    reports: Sender<WorkerReport>,
    next_report: Instant,
    stop: Arc<AtomicBool>,
}

impl WorkerCtx {
    /// A worker context.
    pub fn new(
        index: usize,
        core: Core,
        sockets: SocketTable,
        listener: UdpSocket,
        reports: Sender<WorkerReport>,
        stop: Arc<AtomicBool>,
    ) -> Self {
        Self {
            index,
            core,
            sockets,
            counters: IoCounters::new(),
            histogram: crate::metrics::new_latency_histogram(),
            scratch: vec![0u8; SCRATCH_LEN].into_boxed_slice(),
            listener,
            listener_ovfl: 0,
            streams: None,
            reports,
            next_report: Instant::now() + REPORT_INTERVAL,
            stop,
        }
    }

    /// Serve TCP/TLS clients with `streams` too.
    pub fn with_streams(mut self, streams: Streams) -> Self {
        self.streams = Some(streams);
        self
    }

    /// The streams' epoll fd, for the backend to watch.
    pub fn streams_fd(&self) -> Option<RawFd> {
        self.streams.as_ref().map(Streams::fd)
    }

    /// Handle whatever the stream connections have ready (the backend saw their fd readable).
    pub fn poll_streams(&mut self, now: Instant) {
        let Some(streams) = self.streams.as_mut() else {
            return;
        };
        let mut io = CoreIo {
            core: &mut self.core,
            sockets: &mut self.sockets,
            scratch: &mut self.scratch,
            listener: self.listener.as_raw_fd(),
            counters: &mut self.counters,
        };
        streams.poll(now, &mut io);
    }

    /// Whether allocation `id`'s relayed socket must keep its fd (its client is on a stream:
    /// the stream side sends with `sendto` on it, outside the ring).
    pub fn keeps_fd(&self, id: AllocationId) -> bool {
        self.core.client_of(id).is_some_and(|c| c.link != Link::Udp)
    }

    /// Whether the process asked workers to stop.
    pub fn should_stop(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Record one in-relay latency sample from a kernel receive timestamp to `sent_ns`: into the
    /// forwarding latency buckets (nanoseconds) and the interval HdrHistogram (microseconds).
    #[inline]
    pub fn record_latency(&mut self, rx_ns: u64, sent_ns: u64) {
        if rx_ns == 0 {
            return;
        }
        let ns = sent_ns.saturating_sub(rx_ns);
        self.histogram.saturating_record((ns / 1_000).max(1));
        self.counters.forward_latency.record(ns);
    }

    /// Count a drop.
    #[inline]
    pub fn count_drop(&mut self, reason: DropReason) {
        if let Some(c) = self.counters.drops.get_mut(reason.index()) {
            *c += 1;
        }
    }

    /// Account SO_RXQ_OVFL growth on a socket.
    #[inline]
    pub fn account_ovfl(&mut self, src: Source, ovfl: Option<u32>) {
        let Some(v) = ovfl else { return };
        let last = match src {
            Source::Listener => &mut self.listener_ovfl,
            Source::Relayed(key, _) => match self.sockets.slab.get_mut(key) {
                Some(e) => &mut e.last_ovfl,
                None => return,
            },
        };
        self.counters.kernel_rx_drops += u64::from(v.wrapping_sub(*last));
        *last = v;
    }

    /// Hand one datagram (`frame[HEADROOM..HEADROOM+len]`) to the core. Replies are sent here
    /// (synchronously: the scratch buffer is reused for the next datagram); a forward comes back
    /// for the backend to send zero-copy; drops are counted.
    pub fn dispatch(
        &mut self,
        now: Instant,
        src_kind: Source,
        src: SocketAddr,
        frame: &mut [u8],
        len: usize,
    ) -> Option<ForwardAction> {
        let kind = match src_kind {
            Source::Listener => SocketKind::Listener,
            Source::Relayed(..) => SocketKind::Relayed,
        };
        self.counters.rx_packets[kind as usize] += 1;
        self.counters.rx_bytes[kind as usize] += len as u64;
        if frame.len() < HEADROOM + len {
            self.count_drop(DropReason::Truncated);
            return None;
        }
        let routed = match src_kind {
            Source::Listener => {
                self.counters.client_rx_packets[Transport::Udp.index()] += 1;
                self.counters.client_rx_bytes[Transport::Udp.index()] += len as u64;
                self.core.handle_client(
                    now,
                    Client::udp(src),
                    frame,
                    len,
                    &mut self.scratch,
                    &mut self.sockets,
                )
            }
            Source::Relayed(_, id) => {
                self.core
                    .handle_peer(now, id, src, frame, len, &mut self.scratch)
            }
        };
        if routed.link != Link::Udp {
            self.deliver_to_stream(routed.out, routed.link, kind, frame);
            return None;
        }
        match routed.out {
            Output::Forward { from, to, range } => {
                if range.start > range.end || range.end > frame.len() {
                    self.count_drop(DropReason::Malformed);
                    return None;
                }
                let (fd, key, direction) = match (from, kind) {
                    (SocketRef::Listener, SocketKind::Listener) => (
                        Some(self.listener.as_raw_fd()),
                        None,
                        Direction::ClientToClient,
                    ),
                    (SocketRef::Listener, SocketKind::Relayed) => (
                        Some(self.listener.as_raw_fd()),
                        None,
                        Direction::PeerToClient,
                    ),
                    (SocketRef::Relayed(id), _) => match self.sockets.key_fd_of(id) {
                        Some((key, fd)) => (fd, Some(key), Direction::ClientToPeer),
                        None => {
                            self.count_drop(DropReason::NoAllocation);
                            return None;
                        }
                    },
                };
                Some(ForwardAction {
                    fd,
                    key,
                    to,
                    range,
                    direction,
                })
            }
            Output::Reply {
                from,
                to,
                len,
                data,
            } => {
                let fd = match from {
                    SocketRef::Listener => Some(self.listener.as_raw_fd()),
                    SocketRef::Relayed(id) => self.sockets.fd_of(id),
                };
                match (fd, self.scratch.get(..len)) {
                    (Some(fd), Some(bytes)) => match net::send_to(fd, bytes, to) {
                        Ok(n) if data => {
                            // A Data indication: relayed data, from a peer (or, short-circuited,
                            // from another allocation's client).
                            let d = match kind {
                                SocketKind::Relayed => Direction::PeerToClient,
                                SocketKind::Listener => Direction::ClientToClient,
                            };
                            self.counters.forwarded(d, n);
                        }
                        Ok(n) => {
                            self.counters.reply_packets += 1;
                            self.counters.reply_bytes += n as u64;
                            if from == SocketRef::Listener {
                                self.counters.client_tx(Transport::Udp, n);
                            }
                        }
                        Err(e) => {
                            self.counters.send_errors += 1;
                            tracing::trace!(worker = self.index, %to, error = %e, "reply send failed");
                        }
                    },
                    _ => self.count_drop(DropReason::NoAllocation),
                }
                None
            }
            // The core counts its own drops (CoreCounters::drops); io counts only the drops it
            // decides itself (truncation, vanished socket, bad range). Metrics add the two.
            Output::Drop(_) => None,
        }
    }

    /// A client-bound output of the UDP path whose client is on a TCP/TLS connection of this
    /// worker: its bytes (from the receive buffer or the scratch buffer) go into that
    /// connection, framed.
    #[cold]
    fn deliver_to_stream(&mut self, out: Output, link: Link, kind: SocketKind, frame: &[u8]) {
        let (bytes, data) = match &out {
            Output::Forward { range, .. } => (frame.get(range.clone()), true),
            Output::Reply { len, data, .. } => (self.scratch.get(..*len), *data),
            Output::Drop(_) => return,
        };
        let (Some(bytes), Some(streams)) = (bytes, self.streams.as_mut()) else {
            self.count_drop(DropReason::NoAllocation);
            return;
        };
        let n = bytes.len();
        if !streams.deliver(link, bytes, &mut self.core, &mut self.sockets) {
            self.counters.send_errors += 1;
            return;
        }
        if data {
            let d = match kind {
                SocketKind::Relayed => Direction::PeerToClient,
                SocketKind::Listener => Direction::ClientToClient,
            } as usize;
            self.counters.fwd_packets[d] += 1;
            self.counters.fwd_bytes[d] += n as u64;
        } else {
            self.counters.reply_packets += 1;
            self.counters.reply_bytes += n as u64;
        }
    }

    /// A relayed socket the core just opened: apply per-allocation options (DONT-FRAGMENT ->
    /// `IP_PMTUDISC_DO`, best effort) and return its fd for the backend to watch.
    pub fn prepare_opened(&mut self, key: usize, generation: u32) -> Option<RawFd> {
        let entry = self
            .sockets
            .slab
            .get(key)
            .filter(|e| e.generation == generation)?;
        let sock = entry.sock.as_ref()?;
        if self.core.dont_fragment(entry.id) {
            let _ = net::set_dont_fragment(sock);
        }
        Some(sock.as_raw_fd())
    }

    /// Run the core's timers and the streams' timeouts if due.
    pub fn poll_timers(&mut self, now: Instant) {
        if self.core.poll_timeout().is_some_and(|t| t <= now) {
            self.core.handle_timeout(now, &mut self.sockets);
        }
        if let Some(s) = self.streams.as_mut() {
            s.sweep(now, &mut self.core, &mut self.sockets);
        }
    }

    /// The next instant the loop must wake for (core timer, stream timeouts, report), capped
    /// at `cap` from now.
    pub fn next_wake(&self, now: Instant, cap: std::time::Duration) -> Instant {
        let mut t = (now + cap).min(self.next_report);
        if let Some(c) = self.core.poll_timeout() {
            t = t.min(c);
        }
        if let Some(s) = self.streams.as_ref().filter(|s| s.connections() > 0) {
            t = t.min(s.next_sweep());
        }
        t
    }

    /// Send the periodic report if due (one histogram clone a second; never blocks).
    pub fn maybe_report(&mut self, now: Instant) {
        if now < self.next_report {
            return;
        }
        self.next_report = now + REPORT_INTERVAL;
        self.force_report();
    }

    /// Free every allocation (end of a drain or stop) and send the final report. The sockets
    /// are closed when the backend drops the `closed` list (after its last submission).
    pub fn finish(&mut self) {
        if let Some(s) = self.streams.as_mut() {
            s.shutdown();
        }
        self.core.shutdown(&mut self.sockets);
        self.sockets.opened.clear();
        self.force_report();
    }

    /// Send a report now.
    pub fn force_report(&mut self) {
        self.counters.relay_open_failures = self.sockets.open_failures;
        self.counters.relayed_sockets = self.sockets.len() as u64;
        if let Some(s) = &self.streams {
            let st = &s.counters;
            for t in [Transport::Tcp, Transport::Tls] {
                let i = t.index();
                self.counters.client_rx_packets[i] = st.rx_frames[i];
                self.counters.client_rx_bytes[i] = st.rx_bytes[i];
                self.counters.client_tx_packets[i] = st.tx_frames[i];
                self.counters.client_tx_bytes[i] = st.tx_bytes[i];
            }
            self.counters.streams = st.clone();
        }
        let report = WorkerReport {
            worker: self.index,
            interval: self.histogram.clone(),
            io: self.counters.clone(),
            core: self.core.counters().clone(),
            allocations: self.core.allocations(),
        };
        self.histogram.reset();
        // A full channel means the metrics thread is behind: skip this one (counters are
        // cumulative; only the interval's latency samples are lost, never the worker blocked).
        let _ = self.reports.try_send(report);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(reservations: &Arc<Reservations>, seed: u64) -> SocketTable {
        SocketTable::new(&["127.0.0.1".parse().unwrap()], 40_000..=60_000, seed)
            .with_reservations(reservations.clone())
    }

    fn in_use(addr: SocketAddr) -> bool {
        std::net::UdpSocket::bind(addr).is_err()
    }

    #[test]
    fn a_reserved_port_is_held_for_its_token_on_any_worker_once() {
        let shared = Arc::new(Reservations::default());
        let (mut a, mut b) = (table(&shared, 1), table(&shared, 2));
        let now = Instant::now();
        let rtp = a
            .open(
                AllocationId(1),
                AddrFamily::V4,
                PortRequest::EvenReserveNext,
                now,
            )
            .unwrap();
        assert_eq!(rtp.addr.port() % 2, 0);
        let token = rtp.token.expect("a reservation token");
        let next = SocketAddr::new(rtp.addr.ip(), rtp.addr.port() + 1);
        assert!(in_use(next), "the next port is held");
        assert_eq!(shared.len(now), 1);
        // another worker's table claims it
        let rtcp = b
            .open(
                AllocationId(1),
                AddrFamily::V4,
                PortRequest::Reserved(token),
                now,
            )
            .unwrap();
        assert_eq!(
            rtcp,
            Opened {
                addr: next,
                token: None
            }
        );
        assert!(b.fd_of(AllocationId(1)).is_some());
        assert!(shared.is_empty(now));
        assert!(matches!(
            b.open(
                AllocationId(2),
                AddrFamily::V4,
                PortRequest::Reserved(token),
                now
            ),
            Err(OpenError::NoReservation)
        ));
    }

    #[test]
    fn an_unclaimed_reservation_ends_and_frees_its_port() {
        let shared = Arc::new(Reservations::default());
        let mut a = table(&shared, 3);
        let now = Instant::now();
        let rtp = a
            .open(
                AllocationId(1),
                AddrFamily::V4,
                PortRequest::EvenReserveNext,
                now,
            )
            .unwrap();
        let next = SocketAddr::new(rtp.addr.ip(), rtp.addr.port() + 1);
        let later = now + RESERVATION_LIFETIME + std::time::Duration::from_millis(1);
        assert!(matches!(
            a.open(
                AllocationId(2),
                AddrFamily::V4,
                PortRequest::Reserved(rtp.token.unwrap()),
                later
            ),
            Err(OpenError::NoReservation)
        ));
        assert!(!in_use(next), "the expired hold closed its socket");
    }

    #[test]
    fn reservations_are_bounded() {
        let shared = Arc::new(Reservations::default());
        let now = Instant::now();
        for _ in 0..MAX_RESERVATIONS {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let addr = s.local_addr().unwrap();
            assert!(shared.hold(s, addr, now).is_some());
        }
        let mut a = table(&shared, 4);
        assert!(matches!(
            a.open(
                AllocationId(1),
                AddrFamily::V4,
                PortRequest::EvenReserveNext,
                now
            ),
            Err(OpenError::NoPorts)
        ));
        // a plain allocation is unaffected
        a.open(AllocationId(1), AddrFamily::V4, PortRequest::Any, now)
            .unwrap();
        // and the holds end in time
        let later = now + RESERVATION_LIFETIME;
        assert!(shared.is_empty(later));
        assert!(!shared.is_full(later));
    }
}
