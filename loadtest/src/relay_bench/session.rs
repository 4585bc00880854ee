//! The control plane of the load generator: many [`TurnClient`]s, each on its own connected UDP
//! socket (a distinct 5-tuple), driven by one epoll loop with a deadline.
//!
//! This is the thin I/O layer around the sans-IO client: it moves transmits to sockets,
//! datagrams to `handle_input`, and runs `handle_timeout` when a client's timer is due.

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use peerlink_sim::turn::{AllocationState, Event, TurnClient, TurnConfig};

/// One allocation: a socket connected to the server and its TURN client.
#[derive(Debug)]
pub struct Session {
    /// Connected to the server; non-blocking.
    pub sock: UdpSocket,
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

/// A set of sessions and the epoll instance watching their sockets.
#[derive(Debug)]
pub struct Sessions {
    /// The sessions, index = epoll user data.
    pub list: Vec<Session>,
    epfd: RawFd,
}

/// How often [`Sessions::pump`] scans every client's timers.
pub const TIMER_SCAN: Duration = Duration::from_millis(10);
/// How often [`Sessions::pump`] calls its `poll` hook (at least).
pub const POLL_EVERY: Duration = Duration::from_millis(2);

/// Counters of a pump run.
#[derive(Clone, Copy, Debug, Default)]
pub struct PumpStats {
    /// Datagrams sent.
    pub sent: u64,
    /// Datagrams received.
    pub received: u64,
    /// Received datagrams the client rejected (late duplicates, stray data).
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
    /// Opens `n` sessions to `server`: sockets bound to `bind_ips` round-robin (ephemeral
    /// ports), connected, non-blocking, with `sock_buf` bytes of buffers; clients seeded from
    /// `seed` + index.
    pub fn open(
        n: usize,
        bind_ips: &[IpAddr],
        server: SocketAddr,
        make_config: impl Fn(usize) -> TurnConfig,
        sock_buf: usize,
    ) -> io::Result<Self> {
        // SAFETY: epoll_create1 has no memory-safety preconditions; the result is checked.
        let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epfd < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut me = Sessions {
            list: Vec::with_capacity(n),
            epfd,
        };
        let ips: Vec<IpAddr> = if bind_ips.is_empty() {
            vec![server.ip()]
        } else {
            bind_ips.to_vec()
        };
        for i in 0..n {
            let sock = UdpSocket::bind((ips[i % ips.len()], 0))?;
            sock.connect(server)?;
            sock.set_nonblocking(true)?;
            if sock_buf > 0 {
                // Best effort: the kernel caps it at rmem_max / wmem_max.
                let _ = set_buf_sizes(&sock, sock_buf);
            }
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: i as u64,
            };
            // SAFETY: epfd and the socket fd are open; ev is a valid epoll_event.
            let rc =
                unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, sock.as_raw_fd(), &mut ev) };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
            me.list.push(Session {
                sock,
                client: TurnClient::new(make_config(i)),
                peer: None,
                channel: None,
                last_error: None,
                alloc_started: None,
                allocated_at: None,
            });
        }
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

    /// Sends every queued transmit of session `i`.
    fn flush(&mut self, i: usize, stats: &mut PumpStats) {
        let s = &mut self.list[i];
        while let Some(t) = s.client.poll_transmit() {
            match s.sock.send(&t.payload) {
                Ok(_) => stats.sent += 1,
                Err(_) => stats.send_errors += 1,
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
                let i = ev.u64 as usize;
                let Some(s) = self.list.get_mut(i) else {
                    continue;
                };
                let from = s.client.config().server;
                // Bounded: at most 64 datagrams per socket per wakeup.
                for _ in 0..64 {
                    match s.sock.recv(&mut buf) {
                        Ok(len) => {
                            stats.received += 1;
                            if s.client.handle_input(now, from, &buf[..len]).is_err() {
                                stats.rejected += 1;
                            }
                        }
                        Err(_) => break,
                    }
                }
                self.dispatch_events(i, now, &mut on_event);
                self.flush(i, stats);
            }
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
            let s = &mut self.list[i];
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

    /// Sends Refresh LIFETIME 0 on every allocated session and waits (bounded) for answers.
    pub fn deallocate_all(&mut self, timeout: Duration) -> usize {
        let now = Instant::now();
        for s in &mut self.list {
            if s.client.state() == AllocationState::Allocated {
                let _ = s.client.deallocate(now);
            }
        }
        let mut stats = PumpStats::default();
        self.pump(
            now + timeout,
            |_, _, _, _| {},
            |ss, _| ss.count(AllocationState::Deallocating) == 0,
            &mut stats,
        );
        self.count(AllocationState::Closed)
    }

    /// Raw fds, in session order (for the data plane).
    pub fn fds(&self) -> Vec<RawFd> {
        self.list.iter().map(|s| s.sock.as_raw_fd()).collect()
    }
}

impl Drop for Sessions {
    fn drop(&mut self) {
        // SAFETY: epfd is an epoll fd we own and close once.
        unsafe { libc::close(self.epfd) };
    }
}
