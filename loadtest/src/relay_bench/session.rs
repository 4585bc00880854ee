//! The control plane of the load generator: many [`TurnClient`]s driven by one epoll loop
//! with a deadline, each with a distinct 5-tuple towards the server.
//!
//! Two socket layouts:
//! - one connected UDP socket per session ([`Sessions::open`]): what the traffic benchmark
//!   uses (its data plane sends on each session's fd, [`Sessions::fds`]);
//! - shared sockets ([`Sessions::open_shared`]): many sessions on one unconnected socket
//!   bound to `0.0.0.0:0`, told apart by their source IP. Sends carry an `IP_PKTINFO` control
//!   message naming the session's source address; receives read the datagram's destination
//!   address from the `IP_PKTINFO` the kernel attaches. With M client IPs, N sessions need
//!   ceil(N / M) sockets, so 100k allocations fit in a process with a small RLIMIT_NOFILE.
//!
//! This is the thin I/O layer around the sans-IO client: it moves transmits to sockets,
//! datagrams to `handle_input`, and runs `handle_timeout` when a client's timer is due.

use std::collections::HashMap;
use std::io;
use std::mem::{offset_of, size_of};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use peerlink_client_core::turn::{AllocationState, Event, TurnClient, TurnConfig};

/// One allocation: its TURN client and the benchmark's state around it. The socket it uses
/// belongs to [`Sessions`] (its own or a shared one, depending on the layout).
#[derive(Debug)]
pub struct Session {
    /// The sans-IO client.
    pub client: TurnClient,
    /// Peer this session's traffic goes to (partner's relayed address), once known.
    pub peer: Option<SocketAddr>,
    /// Channel bound to `peer`, once confirmed.
    pub channel: Option<u16>,
    /// Last error event, for reporting.
    pub last_error: Option<String>,
    /// When Allocate was started / answered (for allocation latency).
    pub alloc_started: Option<Instant>,
    /// When the allocation was granted.
    pub allocated_at: Option<Instant>,
}

impl Session {
    fn new(config: TurnConfig) -> Self {
        Self {
            client: TurnClient::new(config),
            peer: None,
            channel: None,
            last_error: None,
            alloc_started: None,
            allocated_at: None,
        }
    }
}

/// How sessions map onto sockets.
#[derive(Debug)]
enum Layout {
    /// `socks[i]` is session i's own socket, connected to the server; epoll data = i.
    PerSession,
    /// Sessions share unconnected sockets; epoll data = socket index.
    Shared(SharedLayout),
}

/// The shared layout: with M source IPs, session i uses socket i / M and source IP i % M.
#[derive(Debug)]
struct SharedLayout {
    /// Source IPs, in session order within a socket.
    ips: Vec<Ipv4Addr>,
    /// Index of each source IP in `ips`.
    ip_index: HashMap<Ipv4Addr, usize>,
    /// Number of sessions.
    sessions: usize,
}

impl SharedLayout {
    /// The layout of `sessions` sessions over `ips` (IPv4, distinct, at least one).
    fn new(ips: &[IpAddr], sessions: usize) -> io::Result<Self> {
        if ips.is_empty() {
            return Err(invalid("shared client sockets need at least one source IP"));
        }
        let mut v4 = Vec::with_capacity(ips.len());
        let mut ip_index = HashMap::with_capacity(ips.len());
        for (k, ip) in ips.iter().enumerate() {
            let IpAddr::V4(ip) = *ip else {
                return Err(invalid(&format!(
                    "shared client sockets are IPv4 only, got source IP {ip}"
                )));
            };
            if ip_index.insert(ip, k).is_some() {
                return Err(invalid(&format!("source IP {ip} is given twice")));
            }
            v4.push(ip);
        }
        Ok(Self {
            ips: v4,
            ip_index,
            sessions,
        })
    }

    /// Sockets needed: ceil(sessions / IPs).
    fn sockets(&self) -> usize {
        self.sessions.div_ceil(self.ips.len().max(1))
    }

    /// Socket index and source IP of session `i` (`None` past the last session).
    fn place(&self, i: usize) -> Option<(usize, Ipv4Addr)> {
        if i >= self.sessions {
            return None;
        }
        let m = self.ips.len();
        let ip = *self.ips.get(i.checked_rem(m)?)?;
        Some((i / m, ip))
    }

    /// The session a datagram to `ip` on socket `sock` belongs to, if any.
    fn lookup(&self, sock: usize, ip: Ipv4Addr) -> Option<usize> {
        let k = *self.ip_index.get(&ip)?;
        let i = sock.checked_mul(self.ips.len())?.checked_add(k)?;
        (i < self.sessions).then_some(i)
    }
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.to_owned())
}

/// A set of sessions, their sockets and the epoll instance watching the sockets.
#[derive(Debug)]
pub struct Sessions {
    /// The sessions.
    pub list: Vec<Session>,
    socks: Vec<UdpSocket>,
    layout: Layout,
    epfd: RawFd,
}

/// How often [`Sessions::pump`] scans every client's timers.
pub const TIMER_SCAN: Duration = Duration::from_millis(10);
/// How often [`Sessions::pump`] calls its `poll` hook (at least).
pub const POLL_EVERY: Duration = Duration::from_millis(2);
/// Refreshes and deallocations [`Sessions::refresh_all`] and [`Sessions::deallocate_all`]
/// keep in flight.
pub const WINDOW: usize = 1000;
/// Datagrams read from one per-session socket per wakeup.
const PER_SESSION_READ_BATCH: usize = 64;
/// Datagrams read from one shared socket per wakeup (many sessions share it).
pub const SHARED_READ_BATCH: usize = 256;

/// Counters of a pump run.
#[derive(Clone, Copy, Debug, Default)]
pub struct PumpStats {
    /// Datagrams sent.
    pub sent: u64,
    /// Datagrams received.
    pub received: u64,
    /// Received datagrams the client rejected (late duplicates, stray data), or that no
    /// session claims (shared sockets: unknown destination IP, no `IP_PKTINFO`, truncated).
    pub rejected: u64,
    /// Send errors.
    pub send_errors: u64,
}

/// Sets RLIMIT_NOFILE's soft limit to its hard limit; returns the new soft limit.
pub fn raise_nofile_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Err(_) => 1024,
    }
}

fn set_buf_sizes(sock: &UdpSocket, bytes: usize) -> io::Result<()> {
    let s = socket2::SockRef::from(sock);
    s.set_recv_buffer_size(bytes)?;
    s.set_send_buffer_size(bytes)?;
    Ok(())
}

impl Sessions {
    /// An empty set with its epoll instance.
    fn empty(n: usize, layout: Layout) -> io::Result<Self> {
        // SAFETY: epoll_create1 has no memory-safety preconditions; the result is checked.
        let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epfd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Sessions {
            list: Vec::with_capacity(n),
            socks: Vec::new(),
            layout,
            epfd,
        })
    }

    /// Adds `sock` as socket `self.socks.len()`, watched for input with that index as data.
    fn add_socket(&mut self, sock: UdpSocket, sock_buf: usize) -> io::Result<()> {
        sock.set_nonblocking(true)?;
        if sock_buf > 0 {
            // Best effort: the kernel caps it at rmem_max / wmem_max.
            let _ = set_buf_sizes(&sock, sock_buf);
        }
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: self.socks.len() as u64,
        };
        // SAFETY: epfd and the socket fd are open; ev is a valid epoll_event.
        let rc =
            unsafe { libc::epoll_ctl(self.epfd, libc::EPOLL_CTL_ADD, sock.as_raw_fd(), &mut ev) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        self.socks.push(sock);
        Ok(())
    }

    /// Opens `n` sessions to `server`, one socket each: sockets bound to `bind_ips`
    /// round-robin (ephemeral ports), connected, non-blocking, with `sock_buf` bytes of
    /// buffers; client `i`'s configuration from `make_config(i)`.
    pub fn open(
        n: usize,
        bind_ips: &[IpAddr],
        server: SocketAddr,
        make_config: impl Fn(usize) -> TurnConfig,
        sock_buf: usize,
    ) -> io::Result<Self> {
        let mut me = Self::empty(n, Layout::PerSession)?;
        me.socks.reserve(n);
        let ips: Vec<IpAddr> = if bind_ips.is_empty() {
            vec![server.ip()]
        } else {
            bind_ips.to_vec()
        };
        for i in 0..n {
            let sock = UdpSocket::bind((ips[i % ips.len()], 0))?;
            sock.connect(server)?;
            me.add_socket(sock, sock_buf)?;
            me.list.push(Session::new(make_config(i)));
        }
        Ok(me)
    }

    /// Opens `n` sessions to `server` (IPv4) on shared sockets: with M = `client_ips.len()`
    /// distinct IPv4 source addresses, sessions `k*M .. (k+1)*M` share socket k (bound to
    /// `0.0.0.0:0`, unconnected, non-blocking, `IP_PKTINFO` on, `sock_buf` bytes of buffers)
    /// and send from `client_ips[0..M]` in turn. ceil(n / M) sockets in all.
    pub fn open_shared(
        n: usize,
        client_ips: &[IpAddr],
        server: SocketAddr,
        make_config: impl Fn(usize) -> TurnConfig,
        sock_buf: usize,
    ) -> io::Result<Self> {
        if !server.is_ipv4() {
            return Err(invalid(&format!(
                "shared client sockets are IPv4 only, server is {server}"
            )));
        }
        let layout = SharedLayout::new(client_ips, n)?;
        let sockets = layout.sockets();
        let mut me = Self::empty(n, Layout::Shared(layout))?;
        me.socks.reserve(sockets);
        for _ in 0..sockets {
            let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            enable_pktinfo(&sock)?;
            me.add_socket(sock, sock_buf)?;
        }
        me.list.extend((0..n).map(|i| Session::new(make_config(i))));
        Ok(me)
    }

    /// Number of sessions.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// True if there are none.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Number of UDP sockets the sessions use (one per session, or the shared ones).
    pub fn sockets(&self) -> usize {
        self.socks.len()
    }

    /// True if sessions share sockets ([`Sessions::open_shared`]).
    pub fn is_shared(&self) -> bool {
        matches!(self.layout, Layout::Shared(_))
    }

    /// Local address session `i` sends from (`None` past the last session).
    pub fn local_addr(&self, i: usize) -> Option<SocketAddr> {
        match &self.layout {
            Layout::PerSession => self.socks.get(i)?.local_addr().ok(),
            Layout::Shared(l) => {
                let (k, ip) = l.place(i)?;
                let port = self.socks.get(k)?.local_addr().ok()?.port();
                Some(SocketAddr::V4(SocketAddrV4::new(ip, port)))
            }
        }
    }

    /// Sends every queued transmit of session `i`.
    fn flush(&mut self, i: usize, stats: &mut PumpStats) {
        let Some(s) = self.list.get_mut(i) else {
            return;
        };
        match &self.layout {
            Layout::PerSession => {
                let sock = self.socks.get(i);
                while let Some(t) = s.client.poll_transmit() {
                    match sock.map(|sock| sock.send(&t.payload)) {
                        Some(Ok(_)) => stats.sent += 1,
                        _ => stats.send_errors += 1,
                    }
                }
            }
            Layout::Shared(l) => {
                let place = l.place(i);
                let sock = place.and_then(|(k, _)| self.socks.get(k));
                while let Some(t) = s.client.poll_transmit() {
                    let res = match (sock, place, t.destination) {
                        (Some(sock), Some((_, src)), SocketAddr::V4(to)) => {
                            send_from(sock, src, to, &t.payload)
                        }
                        _ => Err(invalid("no shared socket or non-IPv4 destination")),
                    };
                    match res {
                        Ok(_) => stats.sent += 1,
                        Err(_) => stats.send_errors += 1,
                    }
                }
            }
        }
    }

    /// Drives all sessions until `poll(self, now)` returns true or `deadline` passes.
    /// `on_event` sees every event (session index, event, the session, now); `poll` runs at
    /// least every [`POLL_EVERY`] and may start new work (e.g. refill an allocation window).
    /// Returns whether `poll` said done.
    pub fn pump(
        &mut self,
        deadline: Instant,
        mut on_event: impl FnMut(usize, Event, &mut Session, Instant),
        mut poll: impl FnMut(&mut Sessions, Instant) -> bool,
        stats: &mut PumpStats,
    ) -> bool {
        let mut events: Vec<libc::epoll_event> =
            vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
        let mut buf = vec![0u8; 2048];
        let mut last_scan: Option<Instant> = None;
        let mut last_poll: Option<Instant> = None;
        loop {
            let now = Instant::now();
            // Timers: a full scan every TIMER_SCAN (RTOs are hundreds of ms).
            if last_scan.is_none_or(|t| now.duration_since(t) >= TIMER_SCAN) {
                last_scan = Some(now);
                for i in 0..self.list.len() {
                    if self.list[i].client.poll_timeout().is_some_and(|t| t <= now) {
                        self.list[i].client.handle_timeout(now);
                    }
                    self.dispatch_events(i, now, &mut on_event);
                    self.flush(i, stats);
                }
            }
            if last_poll.is_none_or(|t| now.duration_since(t) >= POLL_EVERY) {
                last_poll = Some(now);
                if poll(self, now) {
                    return true;
                }
            }
            if now >= deadline {
                return false;
            }
            let ms = deadline
                .saturating_duration_since(now)
                .as_millis()
                .clamp(1, 2) as i32;
            // SAFETY: `events` is a valid buffer of `events.len()` entries.
            let n = unsafe {
                libc::epoll_wait(self.epfd, events.as_mut_ptr(), events.len() as i32, ms)
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return false;
            }
            let now = Instant::now();
            for ev in &events[..n as usize] {
                self.read(ev.u64 as usize, &mut buf, now, &mut on_event, stats);
            }
        }
    }

    /// Reads socket `k` (bounded) and hands what came to its sessions: with a socket per
    /// session, socket `k` is session `k`'s (connected to the server); a shared socket's
    /// datagrams go to the session their destination IP names, and those no session claims
    /// are counted as rejected.
    fn read(
        &mut self,
        k: usize,
        buf: &mut [u8],
        now: Instant,
        on_event: &mut impl FnMut(usize, Event, &mut Session, Instant),
        stats: &mut PumpStats,
    ) {
        if !self.is_shared() {
            let (Some(s), Some(sock)) = (self.list.get_mut(k), self.socks.get(k)) else {
                return;
            };
            let from = s.client.config().server;
            // Bounded: at most PER_SESSION_READ_BATCH datagrams per socket per wakeup.
            for _ in 0..PER_SESSION_READ_BATCH {
                match sock.recv(buf) {
                    Ok(len) => {
                        stats.received += 1;
                        if s.client.handle_input(now, from, &buf[..len]).is_err() {
                            stats.rejected += 1;
                        }
                    }
                    Err(_) => break,
                }
            }
            self.dispatch_events(k, now, on_event);
            self.flush(k, stats);
            return;
        }
        // Bounded: at most SHARED_READ_BATCH datagrams per socket per wakeup (level-triggered
        // epoll reports the rest on the next wait).
        for _ in 0..SHARED_READ_BATCH {
            let Some(sock) = self.socks.get(k) else {
                return;
            };
            let r = match recv_with_dst(sock, buf) {
                Ok(r) => r,
                Err(_) => break,
            };
            stats.received += 1;
            let target = match (&self.layout, r.dst, r.from, r.truncated) {
                (Layout::Shared(l), Some(dst), Some(from), false) => {
                    l.lookup(k, dst).map(|i| (i, from))
                }
                _ => None,
            };
            let Some((i, from)) = target else {
                stats.rejected += 1;
                continue;
            };
            let Some(s) = self.list.get_mut(i) else {
                stats.rejected += 1;
                continue;
            };
            let data = buf.get(..r.len).unwrap_or_default();
            if s.client
                .handle_input(now, SocketAddr::V4(from), data)
                .is_err()
            {
                stats.rejected += 1;
            }
            self.dispatch_events(i, now, on_event);
            self.flush(i, stats);
        }
    }

    fn dispatch_events(
        &mut self,
        i: usize,
        now: Instant,
        on_event: &mut impl FnMut(usize, Event, &mut Session, Instant),
    ) {
        // Bounded: events are produced by input and timers, not by the callback's own
        // requests (those only queue transmits); cap anyway.
        for _ in 0..1024 {
            let Some(s) = self.list.get_mut(i) else {
                break;
            };
            let Some(ev) = s.client.poll_event() else {
                break;
            };
            match &ev {
                Event::Allocated { .. } => s.allocated_at = Some(now),
                Event::ChannelBound { peer, channel } if Some(*peer) == s.peer => {
                    s.channel = Some(*channel)
                }
                Event::AllocationFailed(e) | Event::AllocationLost(e) => {
                    s.last_error = Some(e.to_string())
                }
                Event::ChannelBindFailed { error, .. } => s.last_error = Some(error.to_string()),
                Event::PermissionFailed { error, .. } => s.last_error = Some(error.to_string()),
                _ => {}
            }
            on_event(i, ev, s, now);
        }
    }

    /// Starts Allocate on the idle sessions in `range` and sends the requests at once.
    pub fn start_allocations(
        &mut self,
        range: std::ops::Range<usize>,
        now: Instant,
        stats: &mut PumpStats,
    ) {
        for i in range {
            let Some(s) = self.list.get_mut(i) else { break };
            if s.client.state() == AllocationState::Idle && s.client.allocate(now).is_ok() {
                s.alloc_started = Some(now);
            }
            self.flush(i, stats);
        }
    }

    /// Runs `f` on session `i`'s client and sends what it queued.
    pub fn with_client(&mut self, i: usize, stats: &mut PumpStats, f: impl FnOnce(&mut Session)) {
        if let Some(s) = self.list.get_mut(i) {
            f(s);
            self.flush(i, stats);
        }
    }

    /// How many sessions are in `state`.
    pub fn count(&self, state: AllocationState) -> usize {
        self.list
            .iter()
            .filter(|s| s.client.state() == state)
            .count()
    }

    /// How many sessions are still waiting for an answer to some request.
    pub fn busy(&self) -> usize {
        self.list
            .iter()
            .filter(|s| s.client.outstanding_requests() > 0)
            .count()
    }

    /// The first error any session reported.
    pub fn first_error(&self) -> Option<&str> {
        self.list.iter().find_map(|s| s.last_error.as_deref())
    }

    /// Starts `start` on every session in order, with at most `window` of them in flight
    /// (`in_flight` counts them; a burst of 100k would overflow the server's socket and wait on
    /// retransmits), and pumps until every session was started and none is in flight, or
    /// `timeout` passed. `on_event` sees every event meanwhile.
    fn windowed(
        &mut self,
        timeout: Duration,
        window: usize,
        in_flight: impl Fn(&Sessions) -> usize,
        mut start: impl FnMut(&mut Session, Instant) -> bool,
        on_event: impl FnMut(usize, Event, &mut Session, Instant),
    ) {
        let deadline = Instant::now() + timeout;
        let mut next = 0usize;
        let mut stats = PumpStats::default();
        self.pump(
            deadline,
            on_event,
            |ss, now| {
                let mut room = window.saturating_sub(in_flight(ss));
                // Bounded: `next` only grows, up to the number of sessions.
                while room > 0 && next < ss.list.len() {
                    let i = next;
                    next += 1;
                    let mut started = false;
                    ss.with_client(i, &mut PumpStats::default(), |s| started = start(s, now));
                    if started {
                        room -= 1;
                    }
                }
                next >= ss.list.len() && in_flight(ss) == 0
            },
            &mut stats,
        );
    }

    /// Sends Refresh LIFETIME 0 on every allocated session, at most [`WINDOW`] in flight, and
    /// waits (bounded by `timeout`) for answers. Returns the sessions closed.
    pub fn deallocate_all(&mut self, timeout: Duration) -> usize {
        self.windowed(
            timeout,
            WINDOW,
            |ss| ss.count(AllocationState::Deallocating),
            |s, now| {
                s.client.state() == AllocationState::Allocated && s.client.deallocate(now).is_ok()
            },
            |_, _, _, _| {},
        );
        self.count(AllocationState::Closed)
    }

    /// Refreshes every allocated session, at most [`WINDOW`] busy at once, and waits (bounded
    /// by `timeout`) for answers. Returns the allocations the server refreshed.
    pub fn refresh_all(&mut self, timeout: Duration) -> usize {
        let mut refreshed = 0usize;
        self.windowed(
            timeout,
            WINDOW,
            Sessions::busy,
            |s, now| {
                s.client.state() == AllocationState::Allocated && s.client.refresh(now).is_ok()
            },
            |_, ev, _, _| {
                if matches!(ev, Event::Refreshed { .. }) {
                    refreshed += 1;
                }
            },
        );
        refreshed
    }

    /// Raw fds, in session order (for the data plane). Only sessions with a socket of their
    /// own have one: with shared sockets ([`Sessions::open_shared`]) this fails.
    pub fn fds(&self) -> io::Result<Vec<RawFd>> {
        match self.layout {
            Layout::PerSession => Ok(self.socks.iter().map(AsRawFd::as_raw_fd).collect()),
            Layout::Shared(_) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "sessions on shared sockets have no fd of their own",
            )),
        }
    }
}

impl Drop for Sessions {
    fn drop(&mut self) {
        // SAFETY: epfd is an epoll fd we own and close once.
        unsafe { libc::close(self.epfd) };
    }
}

/// Turns on `IP_PKTINFO`: each received datagram carries its destination address.
fn enable_pktinfo(sock: &UdpSocket) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: the fd is open; `on` is a live c_int and the length passed is its size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_PKTINFO,
            (&raw const on).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

// Control messages, encoded and parsed as bytes (no pointer casts into the buffer).
// Layout (Linux): a `cmsghdr` {len: usize, level: c_int, type: c_int} padded to a multiple of
// size_of::<usize>(), then the data; the next message starts at the aligned end of `len`.
const _: () = assert!(offset_of!(libc::cmsghdr, cmsg_len) == 0);
const _: () = assert!(offset_of!(libc::cmsghdr, cmsg_level) == size_of::<usize>());
const _: () = assert!(offset_of!(libc::cmsghdr, cmsg_type) == size_of::<usize>() + 4);

/// CMSG_ALIGN: rounds up to a multiple of size_of::<usize>().
const fn cmsg_align(len: usize) -> usize {
    (len + size_of::<usize>() - 1) & !(size_of::<usize>() - 1)
}
/// Offset of a control message's data from its header (CMSG_LEN(0)).
const CMSG_HDR: usize = cmsg_align(size_of::<libc::cmsghdr>());
/// Bytes of an `in_pktinfo`.
const PKTINFO_LEN: usize = size_of::<libc::in_pktinfo>();
/// CMSG_SPACE(sizeof(in_pktinfo)): one `IP_PKTINFO` message.
const PKTINFO_SPACE: usize = CMSG_HDR + cmsg_align(PKTINFO_LEN);
/// Receive control buffer: an `IP_PKTINFO` message and room for one more of that size.
const RECV_CONTROL: usize = 2 * PKTINFO_SPACE;

/// A control buffer aligned for `cmsghdr` (the kernel expects aligned headers).
#[repr(C)]
struct CmsgBuf<const N: usize> {
    _align: [libc::cmsghdr; 0],
    bytes: [u8; N],
}

impl<const N: usize> CmsgBuf<N> {
    fn zeroed() -> Self {
        Self {
            _align: [],
            bytes: [0; N],
        }
    }
}

/// The bytes of one `IP_PKTINFO` control message asking to send from `src` (ifindex 0: the
/// route decides the interface).
fn encode_pktinfo(src: Ipv4Addr) -> [u8; PKTINFO_SPACE] {
    let mut b = [0u8; PKTINFO_SPACE];
    let len = CMSG_HDR + PKTINFO_LEN;
    let level = offset_of!(libc::cmsghdr, cmsg_level);
    let ty = offset_of!(libc::cmsghdr, cmsg_type);
    let spec_dst = CMSG_HDR + offset_of!(libc::in_pktinfo, ipi_spec_dst);
    b[..size_of::<usize>()].copy_from_slice(&len.to_ne_bytes());
    b[level..level + 4].copy_from_slice(&libc::IPPROTO_IP.to_ne_bytes());
    b[ty..ty + 4].copy_from_slice(&libc::IP_PKTINFO.to_ne_bytes());
    // ipi_ifindex and ipi_addr stay 0; in_addr is in network byte order = octet order.
    b[spec_dst..spec_dst + 4].copy_from_slice(&src.octets());
    b
}

fn read_usize(b: &[u8], at: usize) -> Option<usize> {
    let end = at.checked_add(size_of::<usize>())?;
    Some(usize::from_ne_bytes(b.get(at..end)?.try_into().ok()?))
}

fn read_i32(b: &[u8], at: usize) -> Option<i32> {
    let end = at.checked_add(4)?;
    Some(i32::from_ne_bytes(b.get(at..end)?.try_into().ok()?))
}

/// The destination address (`ipi_addr`) of the first `IP_PKTINFO` message in `control` (the
/// bytes the kernel filled in, `msg_controllen` of them). Bounds-checked throughout: a
/// truncated or malformed message ends the walk with `None`.
pub fn parse_pktinfo_dst(control: &[u8]) -> Option<Ipv4Addr> {
    let level_at = offset_of!(libc::cmsghdr, cmsg_level);
    let type_at = offset_of!(libc::cmsghdr, cmsg_type);
    let addr_at = offset_of!(libc::in_pktinfo, ipi_addr);
    let mut off = 0usize;
    // Bounded: every step advances by at least CMSG_HDR bytes within `control`.
    while off.checked_add(CMSG_HDR)? <= control.len() {
        let len = read_usize(control, off)?;
        let level = read_i32(control, off + level_at)?;
        let ty = read_i32(control, off + type_at)?;
        if len < CMSG_HDR || len > control.len() - off {
            return None;
        }
        let data = control.get(off + CMSG_HDR..off + len)?;
        if level == libc::IPPROTO_IP && ty == libc::IP_PKTINFO {
            let a: [u8; 4] = data
                .get(addr_at..addr_at.checked_add(4)?)?
                .try_into()
                .ok()?;
            return Some(Ipv4Addr::from(a));
        }
        off = off.checked_add(cmsg_align(len))?;
    }
    None
}

/// A datagram read from a shared socket.
#[derive(Debug)]
struct Received {
    /// Bytes in the buffer.
    len: usize,
    /// Sender (`None`: no IPv4 source address).
    from: Option<SocketAddrV4>,
    /// Destination IP from `IP_PKTINFO` (`None`: no or malformed control message).
    dst: Option<Ipv4Addr>,
    /// The datagram did not fit the buffer.
    truncated: bool,
}

fn sockaddr_v4(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.ip().octets()),
        },
        sin_zero: [0; 8],
    }
}

/// Sends `payload` to `to` from source IP `src` on an unconnected socket (`IP_PKTINFO`).
fn send_from(
    sock: &UdpSocket,
    src: Ipv4Addr,
    to: SocketAddrV4,
    payload: &[u8],
) -> io::Result<usize> {
    let mut name = sockaddr_v4(to);
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr().cast_mut().cast(),
        iov_len: payload.len(),
    };
    let mut control = CmsgBuf::<PKTINFO_SPACE>::zeroed();
    control.bytes = encode_pktinfo(src);
    let msg = msghdr_v4(&mut name, &mut iov, &mut control.bytes);
    // SAFETY: the fd is open; msg points at `name`, `iov` (over `payload`, only read) and
    // `control`, all alive for the call, with their true lengths.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, 0) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// A `msghdr` over an IPv4 name, one iovec and a control area (pointers into the arguments,
/// which must outlive its use).
fn msghdr_v4(
    name: &mut libc::sockaddr_in,
    iov: &mut libc::iovec,
    control: &mut [u8],
) -> libc::msghdr {
    // SAFETY: msghdr is plain old data; all-zero (null pointers, zero lengths) is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = std::ptr::from_mut(name).cast();
    msg.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    msg.msg_iov = iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len() as _;
    msg
}

/// Receives one datagram into `buf` with its sender and its destination IP (`IP_PKTINFO`).
fn recv_with_dst(sock: &UdpSocket, buf: &mut [u8]) -> io::Result<Received> {
    let mut name = sockaddr_v4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = CmsgBuf::<RECV_CONTROL>::zeroed();
    let mut msg = msghdr_v4(&mut name, &mut iov, &mut control.bytes);
    // SAFETY: the fd is open; msg points at `name`, `iov` (over `buf`) and `control`, all
    // alive and exclusively borrowed for the call, with their true lengths; the kernel
    // writes at most those lengths.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, 0) };
    let len = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    let from = (msg.msg_namelen as usize >= size_of::<libc::sockaddr_in>()
        && i32::from(name.sin_family) == libc::AF_INET)
        .then(|| {
            SocketAddrV4::new(
                Ipv4Addr::from(name.sin_addr.s_addr.to_ne_bytes()),
                u16::from_be(name.sin_port),
            )
        });
    let control_len = msg.msg_controllen.min(RECV_CONTROL);
    Ok(Received {
        len: len.min(buf.len()),
        from,
        dst: parse_pktinfo_dst(&control.bytes[..control_len]),
        truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    /// A control message as the kernel would lay it out, built with libc's CMSG macros.
    fn kernel_cmsg(level: i32, ty: i32, data: &[u8]) -> Vec<u8> {
        // SAFETY (test): the CMSG_* helpers compute sizes, and CMSG_FIRSTHDR / CMSG_DATA
        // point into `buf`, which is CMSG_SPACE(data.len()) bytes and aligned below.
        unsafe {
            let space = libc::CMSG_SPACE(data.len() as u32) as usize;
            let mut store = vec![0u64; space.div_ceil(8)];
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_control = store.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_len = libc::CMSG_LEN(data.len() as u32) as _;
            (*c).cmsg_level = level;
            (*c).cmsg_type = ty;
            std::ptr::copy_nonoverlapping(data.as_ptr(), libc::CMSG_DATA(c), data.len());
            std::slice::from_raw_parts(store.as_ptr().cast::<u8>(), space).to_vec()
        }
    }

    fn pktinfo_bytes(ifindex: i32, spec_dst: Ipv4Addr, addr: Ipv4Addr) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&ifindex.to_ne_bytes());
        d.extend_from_slice(&spec_dst.octets());
        d.extend_from_slice(&addr.octets());
        d
    }

    #[test]
    fn cmsg_layout_matches_libc() {
        // SAFETY (test): pure size computations.
        let (len0, space) = unsafe {
            (
                libc::CMSG_LEN(0) as usize,
                libc::CMSG_SPACE(PKTINFO_LEN as u32) as usize,
            )
        };
        assert_eq!(CMSG_HDR, len0);
        assert_eq!(PKTINFO_SPACE, space);
        assert_eq!(PKTINFO_LEN, 12);
        let ours = encode_pktinfo(v4("127.1.2.3"));
        let theirs = kernel_cmsg(
            libc::IPPROTO_IP,
            libc::IP_PKTINFO,
            &pktinfo_bytes(0, v4("127.1.2.3"), Ipv4Addr::UNSPECIFIED),
        );
        assert_eq!(&ours[..], &theirs[..]);
    }

    #[test]
    fn parses_pktinfo_among_other_messages() {
        let want = v4("127.1.250.7");
        let one = kernel_cmsg(
            libc::IPPROTO_IP,
            libc::IP_PKTINFO,
            &pktinfo_bytes(1, v4("127.0.0.1"), want),
        );
        assert_eq!(parse_pktinfo_dst(&one), Some(want));
        // After a message of another kind (odd length: the next one starts aligned).
        let mut two = kernel_cmsg(libc::SOL_SOCKET, libc::SO_TIMESTAMP, &[7u8; 5]);
        two.extend_from_slice(&one);
        assert_eq!(parse_pktinfo_dst(&two), Some(want));
        // Only other kinds: none.
        let other = kernel_cmsg(libc::IPPROTO_IP, libc::IP_TTL, &64i32.to_ne_bytes());
        assert_eq!(parse_pktinfo_dst(&other), None);
        assert_eq!(parse_pktinfo_dst(&[]), None);
    }

    #[test]
    fn truncated_or_garbage_control_data_yields_none_without_panicking() {
        let good = kernel_cmsg(
            libc::IPPROTO_IP,
            libc::IP_PKTINFO,
            &pktinfo_bytes(0, v4("127.0.0.1"), v4("127.1.1.1")),
        );
        // Every truncation of a valid message: the full one parses, shorter ones that cut
        // into the pktinfo do not (cmsg_len then exceeds the buffer).
        let full = CMSG_HDR + PKTINFO_LEN;
        for cut in 0..good.len() {
            let r = parse_pktinfo_dst(&good[..cut]);
            if cut >= full {
                assert_eq!(r, Some(v4("127.1.1.1")), "cut {cut}");
            } else {
                assert_eq!(r, None, "cut {cut}");
            }
        }
        // cmsg_len too small, zero, past the end, huge.
        for bad_len in [0usize, 1, CMSG_HDR - 1, good.len() + 1, usize::MAX] {
            let mut b = good.clone();
            b[..size_of::<usize>()].copy_from_slice(&bad_len.to_ne_bytes());
            assert_eq!(parse_pktinfo_dst(&b), None, "len {bad_len}");
        }
        // A pktinfo message whose data is too short for ipi_addr.
        let short = kernel_cmsg(libc::IPPROTO_IP, libc::IP_PKTINFO, &[1, 2, 3, 4, 5, 6]);
        assert_eq!(parse_pktinfo_dst(&short), None);
        // Pseudo-random garbage of every length up to 200 bytes: never panics.
        let mut x = 0x1234_5678_9abc_def0u64;
        for n in 0..200 {
            let bytes: Vec<u8> = (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = parse_pktinfo_dst(&bytes);
        }
        // A valid-looking chain whose second header is cut off.
        let mut chain = kernel_cmsg(libc::SOL_SOCKET, libc::SO_TIMESTAMP, &[0u8; 16]);
        chain.extend_from_slice(&good[..CMSG_HDR - 1]);
        assert_eq!(parse_pktinfo_dst(&chain), None);
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn shared_layout_places_and_looks_up_sessions() {
        let l = SharedLayout::new(&ips(&["127.1.1.1", "127.1.1.2", "127.1.1.3"]), 7).unwrap();
        assert_eq!(l.sockets(), 3);
        let placed: Vec<(usize, Ipv4Addr)> = (0..7).map(|i| l.place(i).unwrap()).collect();
        assert_eq!(placed[0], (0, v4("127.1.1.1")));
        assert_eq!(placed[2], (0, v4("127.1.1.3")));
        assert_eq!(placed[3], (1, v4("127.1.1.1")));
        assert_eq!(placed[6], (2, v4("127.1.1.1")));
        assert_eq!(l.place(7), None);
        for (i, (k, ip)) in placed.iter().enumerate() {
            assert_eq!(l.lookup(*k, *ip), Some(i));
        }
        // Past the last session on the last socket, an unknown IP, an unknown socket.
        assert_eq!(l.lookup(2, v4("127.1.1.2")), None);
        assert_eq!(l.lookup(0, v4("127.9.9.9")), None);
        assert_eq!(l.lookup(3, v4("127.1.1.1")), None);
        assert_eq!(l.lookup(usize::MAX, v4("127.1.1.3")), None);
        // Exact multiples and fewer sessions than IPs.
        assert_eq!(
            SharedLayout::new(&ips(&["127.1.1.1"]), 5)
                .unwrap()
                .sockets(),
            5
        );
        let few = SharedLayout::new(&ips(&["127.1.1.1", "127.1.1.2"]), 1).unwrap();
        assert_eq!(few.sockets(), 1);
        assert_eq!(few.lookup(0, v4("127.1.1.2")), None);
        assert_eq!(
            SharedLayout::new(&ips(&["127.1.1.1"]), 0)
                .unwrap()
                .sockets(),
            0
        );
    }

    #[test]
    fn shared_layout_rejects_bad_ip_lists() {
        assert!(SharedLayout::new(&[], 3).is_err());
        assert!(SharedLayout::new(&ips(&["127.1.1.1", "::1"]), 3).is_err());
        assert!(SharedLayout::new(&ips(&["127.1.1.1", "127.1.1.1"]), 3).is_err());
    }

    /// Two sessions on one shared socket: each datagram leaves from the session's own source
    /// IP, and answers to each IP come back tagged with it.
    #[test]
    fn pktinfo_round_trip_over_loopback() {
        let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
        echo.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let server = echo.local_addr().unwrap();
        let cfg = |_| TurnConfig::new(server, "u", "p");
        let ss =
            Sessions::open_shared(4, &ips(&["127.1.0.5", "127.1.0.6"]), server, cfg, 0).unwrap();
        assert!(ss.is_shared());
        assert_eq!(ss.sockets(), 2);
        assert!(ss.fds().is_err(), "no per-session fds in shared mode");
        let SocketAddr::V4(to) = server else {
            panic!("v4")
        };
        for (i, k, ip) in [
            (0, 0, "127.1.0.5"),
            (1, 0, "127.1.0.6"),
            (3, 1, "127.1.0.6"),
        ] {
            send_from(&ss.socks[k], v4(ip), to, b"hello").unwrap();
            let mut b = [0u8; 64];
            let (n, from) = echo.recv_from(&mut b).unwrap();
            assert_eq!(&b[..n], b"hello");
            assert_eq!(from.ip(), IpAddr::V4(v4(ip)));
            assert_eq!(from.port(), ss.socks[k].local_addr().unwrap().port());
            assert_eq!(ss.local_addr(i), Some(from));
            echo.send_to(b"back", from).unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            let r = loop {
                match recv_with_dst(&ss.socks[k], &mut b) {
                    Ok(r) => break r,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        assert!(Instant::now() < deadline, "no answer");
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(e) => panic!("{e}"),
                }
            };
            assert_eq!(&b[..r.len], b"back");
            assert_eq!(r.from, Some(to));
            assert_eq!(r.dst, Some(v4(ip)));
            assert!(!r.truncated);
        }
    }

    #[test]
    fn per_session_mode_keeps_one_connected_socket_each() {
        let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
        let server = echo.local_addr().unwrap();
        let ss = Sessions::open(3, &[], server, |_| TurnConfig::new(server, "u", "p"), 0).unwrap();
        assert!(!ss.is_shared());
        assert_eq!(ss.sockets(), 3);
        assert_eq!(ss.fds().unwrap().len(), 3);
        assert!(
            Sessions::open_shared(3, &[], server, |_| TurnConfig::new(server, "u", "p"), 0)
                .is_err()
        );
    }
}
