//! The data plane of the load generator: one thread pinned to the generator core that paces
//! packets out (io_uring batches across sockets, or one `send` per packet as a fallback) and,
//! between pacing steps, waits for and counts incoming packets (epoll_pwait2 with a
//! nanosecond timeout + `recvmmsg`). One thread, so sending and receiving never compete for
//! the core with each other.
//!
//! Every packet is a ChannelData frame with a 172-byte payload: magic, round id, sender flow,
//! sequence number and send timestamp (ns since the round's base instant). The receiver
//! counts per sending flow (loss = sent - received after a drain period) and records the
//! end-to-end latency (µs) in an HdrHistogram.

use std::io;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use peerlink_proto::channel::{CHANNEL_HEADER_LEN, write_header};

/// Payload bytes per packet (172, the size every published relay figure uses).
pub const PAYLOAD_LEN: usize = 172;
/// Bytes of one datagram: ChannelData header + payload.
pub const PACKET_LEN: usize = CHANNEL_HEADER_LEN + PAYLOAD_LEN;
/// Marks our payloads ("PLLT").
const MAGIC: u32 = 0x504c_4c54;
/// Largest latency recorded (µs); larger values saturate.
const MAX_LATENCY_US: u64 = 10_000_000;
/// Datagrams per `recvmmsg`.
const RECV_BATCH: usize = 64;
/// io_uring submission queue size (and in-flight send slots).
const RING_ENTRIES: u32 = 1024;
/// Cap on packets issued in one pacing step (keeps bursts bounded after a stall).
const MAX_BURST: u64 = 4096;
/// Below this fraction of the offered rate the generator is the limit.
pub const GENERATOR_SHORTFALL: f64 = 0.9;
/// Above this fraction of its core the generator is the limit.
pub const GENERATOR_BUSY: f64 = 0.92;
/// Packets owed after a stall are sent at most this many ticks' worth at once.
const MAX_DEBT_TICKS: f64 = 4.0;

/// One sending direction: a socket, the channel bound to its partner's relayed address, and
/// the index of the flow (socket) that should receive it.
#[derive(Clone, Copy, Debug)]
pub struct Flow {
    /// The sending socket (connected to the server, or for a peer to its client's relayed
    /// address).
    pub fd: RawFd,
    /// Channel number bound to the partner; [`RAW`] for a peer socket, which sends the bare
    /// payload (the relay adds the ChannelData header on the way to the client).
    pub channel: u16,
    /// Index of the receiving flow.
    pub dest: usize,
}

/// `Flow::channel` of a plain peer socket: no ChannelData header (sends and receives bare
/// payloads).
pub const RAW: u16 = 0;

/// The bytes of a filled packet buffer that `flow` sends: all of it (ChannelData), or the bare
/// payload for a peer socket.
fn wire_range(channel: u16) -> std::ops::Range<usize> {
    if channel == RAW {
        CHANNEL_HEADER_LEN..PACKET_LEN
    } else {
        0..PACKET_LEN
    }
}

/// How the sender hands packets to the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SendIo {
    /// io_uring: one submission per pacing step, across all sockets.
    Uring,
    /// One `send(2)` per packet.
    Syscall,
}

/// How the generator waits for incoming packets between pacing steps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Receive {
    /// Sleep in `epoll_pwait2` until a packet arrives or the next step is due. On loopback
    /// every packet the server sends to a sleeping generator also pays for waking it (the
    /// sender's kernel does the wake-up, an inter-processor interrupt here).
    #[default]
    Wait,
    /// After each step, poll without sleeping until as many packets as the step sent have
    /// arrived (then sleep until the next step): the server's sends find the generator awake,
    /// as a remote receiver behind a NIC would cost it nothing. The generator's busy share
    /// counts only the polls that found packets. It still sleeps between the last arrival and
    /// the next step, so under SCHED_FIFO it stays clear of the real-time throttle (by default
    /// 50 ms off the CPU in every second for a thread that never sleeps).
    Spin,
}

/// One round's parameters.
#[derive(Clone, Debug)]
pub struct RoundSpec {
    /// Distinguishes this round's packets from late ones of earlier rounds.
    pub round_id: u32,
    /// Total offered packets per second over all flows.
    pub rate_pps: f64,
    /// Sending time.
    pub duration: Duration,
    /// Extra receive time after the sender stops.
    pub drain: Duration,
    /// Pacing step: packets due are sent in a burst every `tick`.
    pub tick: Duration,
    /// CPU to pin both generator threads to.
    pub cpu: Option<usize>,
    /// Sender I/O.
    pub send_io: SendIo,
    /// Scheduling of the generator threads.
    pub priority: Priority,
    /// How the generator waits for packets.
    pub receive: Receive,
}

/// Scheduling applied to the measured processes and the generator threads, the same for every
/// server.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Priority {
    /// Nice value (0: unchanged; negative needs privileges).
    pub nice: i32,
    /// `SCHED_FIFO` at this priority (1..=99) instead of the normal class: a woken thread
    /// preempts normal-class work at once instead of waiting for the end of its time slice
    /// (on a non-preemptible kernel, as here, kernel code such as kdamond's still runs to its
    /// next scheduling point first). Needs root or CAP_SYS_NICE.
    pub fifo: Option<u8>,
}

impl Priority {
    /// Apply to the calling thread (threads it creates later inherit it). Only plain syscalls
    /// on stack data: safe to call between fork and exec.
    pub fn apply(self) -> io::Result<()> {
        if self.nice != 0 {
            // SAFETY: setpriority with PRIO_PROCESS and tid 0 affects only the calling thread
            // on Linux; no memory is passed.
            if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, self.nice) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        if let Some(p) = self.fifo {
            let param = libc::sched_param {
                sched_priority: i32::from(p),
            };
            // SAFETY: `param` is a valid sched_param on the stack; pid 0 is the calling thread.
            if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// What one round measured.
#[derive(Clone, Debug)]
pub struct RoundResult {
    /// Packets the kernel accepted.
    pub sent: u64,
    /// Our packets received on the right socket in this round.
    pub received: u64,
    /// Sum over flows of max(0, sent - received).
    pub lost: u64,
    /// Sum over flows of max(0, received - sent) (duplicates).
    pub duplicated: u64,
    /// Our packets on the wrong socket (should be 0).
    pub misrouted: u64,
    /// Other datagrams (late packets of earlier rounds, STUN).
    pub stray: u64,
    /// Sends the kernel refused.
    pub send_errors: u64,
    /// End-to-end latency, µs.
    pub latency_us: Histogram<u64>,
    /// Time the sender spent sending.
    pub send_elapsed: Duration,
    /// Offered rate.
    pub offered_pps: f64,
    /// Achieved send rate (sent / send_elapsed).
    pub sent_pps: f64,
    /// Delivered rate (received / send_elapsed).
    pub received_pps: f64,
    /// Generator thread CPU (sending and receiving; with [`Receive::Spin`], without the polls
    /// that found nothing).
    pub generator_cpu: Duration,
    /// Wall time of the whole round.
    pub wall: Duration,
}

impl RoundResult {
    /// Loss fraction (0..=1).
    pub fn loss_fraction(&self) -> f64 {
        if self.sent == 0 {
            0.0
        } else {
            self.lost as f64 / self.sent as f64
        }
    }
    /// Generator CPU (sender + receiver) as a fraction of one core over the sending time.
    pub fn generator_core_fraction(&self) -> f64 {
        let busy = self.generator_cpu.as_secs_f64();
        busy / self.send_elapsed.as_secs_f64().max(1e-9)
    }
    /// True if the generator offered less than 90 % of the requested rate or its core was
    /// busy nearly all the time: then the figure measures the generator, not the server.
    /// (Smaller shortfalls happen when other work on a shared core deschedules the generator
    /// for a few ms; the round still measured the server at the rate actually sent.)
    pub fn generator_limited(&self) -> bool {
        self.sent_pps < GENERATOR_SHORTFALL * self.offered_pps
            || self.generator_core_fraction() > GENERATOR_BUSY
    }
}

/// Why a round could not run.
#[derive(Debug, thiserror::Error)]
pub enum TrafficError {
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        /// Which call.
        what: &'static str,
        /// Cause.
        source: io::Error,
    },
    /// A thread panicked.
    #[error("generator thread panicked")]
    ThreadPanic,
    /// No flows.
    #[error("no flows to send on")]
    NoFlows,
}

fn sys(what: &'static str) -> impl FnOnce(io::Error) -> TrafficError {
    move |source| TrafficError::Sys { what, source }
}

/// Pins the calling thread to `cpu` and sets its priority (both best effort).
pub fn pin(cpu: Option<usize>, priority: Priority) {
    if let Err(e) = priority.apply() {
        eprintln!("generator: cannot apply {priority:?}: {e}");
    }
    if let Some(cpu) = cpu {
        let mut set = nix::sched::CpuSet::new();
        if set.set(cpu).is_ok() {
            // Best effort: an unavailable CPU leaves the thread unpinned.
            let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
        }
    }
    // 1 µs timer slack so the pacing sleeps are precise.
    // SAFETY: prctl(PR_SET_TIMERSLACK) takes an integer argument only.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1, 0, 0, 0) };
}

/// CPU time of the calling thread.
pub fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Writes one packet: ChannelData header then the payload fields.
fn fill_packet(
    buf: &mut [u8; PACKET_LEN],
    channel: u16,
    round: u32,
    flow: u32,
    seq: u64,
    ts_ns: u64,
) {
    let mut hdr = [0u8; CHANNEL_HEADER_LEN];
    // Channel numbers come from the TURN client (always valid) and the length is constant.
    let _ = write_header(channel, PAYLOAD_LEN, &mut hdr);
    buf[..4].copy_from_slice(&hdr);
    let p = &mut buf[CHANNEL_HEADER_LEN..];
    p[0..4].copy_from_slice(&MAGIC.to_be_bytes());
    p[4..8].copy_from_slice(&round.to_be_bytes());
    p[8..12].copy_from_slice(&flow.to_be_bytes());
    p[12..20].copy_from_slice(&seq.to_be_bytes());
    p[20..28].copy_from_slice(&ts_ns.to_be_bytes());
}

/// Decoded payload fields: (round, flow, seq, ts_ns), if this is one of our packets: a
/// ChannelData frame (at a client) or a bare payload (at a peer socket).
fn parse_packet(d: &[u8]) -> Option<(u32, u32, u64, u64)> {
    let p = if d.len() == PACKET_LEN && (0x40..=0x4f).contains(&d[0]) {
        &d[CHANNEL_HEADER_LEN..]
    } else if d.len() == PAYLOAD_LEN {
        d
    } else {
        return None;
    };
    let u32_at = |i: usize| u32::from_be_bytes([p[i], p[i + 1], p[i + 2], p[i + 3]]);
    let u64_at = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&p[i..i + 8]);
        u64::from_be_bytes(b)
    };
    if u32_at(0) != MAGIC {
        return None;
    }
    Some((u32_at(4), u32_at(8), u64_at(12), u64_at(20)))
}

/// Runs one round over `flows` (receiving on the same sockets) on one generator thread.
/// `probe`, if given, runs on the calling thread `at` after the start (e.g. to read the
/// server's stats mid-load).
pub fn run_round(
    flows: &[Flow],
    spec: &RoundSpec,
    probe: Option<(Duration, &mut dyn FnMut())>,
) -> Result<RoundResult, TrafficError> {
    if flows.is_empty() {
        return Err(TrafficError::NoFlows);
    }
    let base = Instant::now();
    let out = std::thread::scope(|s| {
        let g = s.spawn(|| generator(flows, spec, base));
        if let Some((at, f)) = probe {
            let when = base + at;
            let now = Instant::now();
            if when > now {
                std::thread::sleep(when - now);
            }
            f();
        }
        g.join()
    });
    let wall = base.elapsed();
    let g = out.map_err(|_| TrafficError::ThreadPanic)??;
    let mut lost = 0;
    let mut duplicated = 0;
    for (s, r) in g.sent.iter().zip(&g.received) {
        lost += s.saturating_sub(*r);
        duplicated += r.saturating_sub(*s);
    }
    let sent: u64 = g.sent.iter().sum();
    let received: u64 = g.received.iter().sum();
    let secs = g.send_elapsed.as_secs_f64().max(1e-9);
    Ok(RoundResult {
        sent,
        received,
        lost,
        duplicated,
        misrouted: g.misrouted,
        stray: g.stray,
        send_errors: g.send_errors,
        latency_us: g.hist,
        send_elapsed: g.send_elapsed,
        offered_pps: spec.rate_pps,
        sent_pps: sent as f64 / secs,
        received_pps: received as f64 / secs,
        generator_cpu: g.cpu,
        wall,
    })
}

struct GenOut {
    sent: Vec<u64>,
    received: Vec<u64>,
    send_errors: u64,
    misrouted: u64,
    stray: u64,
    hist: Histogram<u64>,
    send_elapsed: Duration,
    cpu: Duration,
}

/// The receive side: epoll over all flows' sockets, `recvmmsg` batches.
struct Receiver {
    epoll: Epoll,
    bufs: Vec<[u8; 2048]>,
    iovs: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
    events: Vec<libc::epoll_event>,
    received: Vec<u64>,
    total: u64,
    misrouted: u64,
    stray: u64,
    hist: Histogram<u64>,
}

impl Receiver {
    fn new(flows: &[Flow]) -> Result<Box<Self>, TrafficError> {
        let epoll = Epoll::new().map_err(sys("epoll_create1"))?;
        for (i, f) in flows.iter().enumerate() {
            epoll.add(f.fd, i as u64).map_err(sys("epoll_ctl"))?;
        }
        let hist = Histogram::<u64>::new_with_bounds(1, MAX_LATENCY_US, 3).map_err(|e| {
            TrafficError::Sys {
                what: "histogram",
                source: io::Error::other(e),
            }
        })?;
        // Boxed so the iovec/mmsghdr pointers into `bufs` stay valid (the heap buffers of the
        // Vecs never move; the Box keeps the struct itself in place too).
        let mut r = Box::new(Self {
            epoll,
            bufs: vec![[0u8; 2048]; RECV_BATCH],
            iovs: Vec::with_capacity(RECV_BATCH),
            // SAFETY: mmsghdr is plain data; all-zero is a valid value.
            msgs: vec![unsafe { std::mem::zeroed() }; RECV_BATCH],
            events: vec![libc::epoll_event { events: 0, u64: 0 }; 256],
            received: vec![0; flows.len()],
            total: 0,
            misrouted: 0,
            stray: 0,
            hist,
        });
        let iovs: Vec<libc::iovec> = r
            .bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        r.iovs = iovs;
        let Self { msgs, iovs, .. } = &mut *r;
        for (m, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
        }
        Ok(r)
    }

    /// Waits up to `timeout` for datagrams and counts what arrived; returns the number of
    /// ready sockets.
    fn poll(&mut self, flows: &[Flow], round: u32, base: Instant, timeout: Duration) -> usize {
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: events is a valid buffer; ts a valid timespec; no signal mask.
        let n = unsafe {
            libc::epoll_pwait2(
                self.epoll.0,
                self.events.as_mut_ptr(),
                self.events.len() as i32,
                &ts,
                std::ptr::null(),
            )
        };
        let ready = usize::try_from(n).unwrap_or(0);
        for e in 0..ready {
            let i = self.events[e].u64 as usize;
            let Some(flow) = flows.get(i) else { continue };
            // Bounded: at most 8 batches per socket per wakeup, so pacing stays on time.
            for _ in 0..8 {
                // SAFETY: msgs point at RECV_BATCH valid iovecs over live buffers.
                let got = unsafe {
                    libc::recvmmsg(
                        flow.fd,
                        self.msgs.as_mut_ptr(),
                        RECV_BATCH as u32,
                        libc::MSG_DONTWAIT,
                        std::ptr::null_mut(),
                    )
                };
                if got <= 0 {
                    break;
                }
                let now_ns = base.elapsed().as_nanos() as u64;
                for k in 0..got as usize {
                    let len = (self.msgs[k].msg_len as usize).min(self.bufs[k].len());
                    match parse_packet(&self.bufs[k][..len]) {
                        Some((r, from, _seq, ts)) if r == round => {
                            let from = from as usize;
                            if flows.get(from).is_some_and(|f| f.dest == i) {
                                self.received[from] += 1;
                                self.total += 1;
                                self.hist
                                    .saturating_record(now_ns.saturating_sub(ts) / 1000);
                            } else {
                                self.misrouted += 1;
                            }
                        }
                        _ => self.stray += 1,
                    }
                }
                if (got as usize) < RECV_BATCH {
                    break;
                }
            }
        }
        ready
    }

    /// Receives until `deadline`. With [`Receive::Spin`], first polls without sleeping until
    /// `want` packets have been counted in all (adding the time of the polls that found
    /// nothing to `idle`); then waits.
    fn until(
        &mut self,
        flows: &[Flow],
        spec: &RoundSpec,
        base: Instant,
        deadline: Instant,
        want: u64,
        idle: &mut Duration,
    ) {
        if spec.receive == Receive::Spin {
            while self.total < want {
                let t = Instant::now();
                if t >= deadline {
                    return;
                }
                if self.poll(flows, spec.round_id, base, Duration::ZERO) == 0 {
                    *idle += t.elapsed();
                }
            }
        }
        let wait = deadline.saturating_duration_since(Instant::now());
        self.poll(flows, spec.round_id, base, wait);
    }
}

/// The generator loop: every `tick`, issue what the rate says is due (round-robin over
/// flows); in between, wait for and count incoming packets. After `duration`, keep
/// receiving until everything sent arrived or `drain` passed.
fn generator(flows: &[Flow], spec: &RoundSpec, base: Instant) -> Result<GenOut, TrafficError> {
    pin(spec.cpu, spec.priority);
    let cpu0 = thread_cpu();
    let mut rx = Receiver::new(flows)?;
    let mut ring = match spec.send_io {
        SendIo::Uring => Some(UringSender::new().map_err(sys("io_uring setup"))?),
        SendIo::Syscall => None,
    };
    let mut sent = vec![0u64; flows.len()];
    let mut seq = vec![0u64; flows.len()];
    let mut send_errors = 0u64;
    let mut issued: u64 = 0;
    let mut next_flow = 0usize;
    let mut pkt = [0u8; PACKET_LEN];
    let start = Instant::now();
    let end = start + spec.duration;
    let hard_stop = end + spec.drain + Duration::from_secs(5);
    let max_debt = (spec.rate_pps * spec.tick.as_secs_f64() * MAX_DEBT_TICKS) as u64 + 1;
    let mut next_tick = start;
    let mut send_elapsed = None;
    // Spinning polls that found nothing (not generator work).
    let mut idle = Duration::ZERO;
    // With Receive::Spin: poll until this many packets have arrived.
    let mut want = 0u64;
    loop {
        let now = Instant::now();
        if send_elapsed.is_none() && now >= end {
            if let Some(r) = &mut ring {
                r.finish(&mut sent, &mut send_errors);
            }
            send_elapsed = Some(now.duration_since(start));
        }
        if let Some(el) = send_elapsed {
            let total: u64 = sent.iter().sum();
            if rx.total >= total || now >= start + el + spec.drain || now >= hard_stop {
                break;
            }
            rx.until(
                flows,
                spec,
                base,
                now + Duration::from_millis(1),
                want,
                &mut idle,
            );
            continue;
        }
        if now >= next_tick {
            let due = (spec.rate_pps * now.duration_since(start).as_secs_f64()) as u64;
            // If we fell behind (descheduled), skip what is owed beyond MAX_DEBT_TICKS ticks
            // rather than blasting a catch-up burst the server would be blamed for; the
            // shortfall shows as sent_pps < offered_pps (generator-limited).
            if due.saturating_sub(issued) > max_debt {
                issued = due - max_debt;
            }
            let n = due.saturating_sub(issued).min(MAX_BURST);
            want = rx.total + n;
            for _ in 0..n {
                let f = next_flow;
                next_flow = (next_flow + 1) % flows.len();
                let flow = &flows[f];
                let ts = base.elapsed().as_nanos() as u64;
                match &mut ring {
                    Some(r) => {
                        let slot = r.slot(&mut sent, &mut send_errors);
                        fill_packet(
                            &mut r.bufs[slot],
                            flow.channel,
                            spec.round_id,
                            f as u32,
                            seq[f],
                            ts,
                        );
                        r.push(slot, flow, f as u32, &mut sent, &mut send_errors);
                    }
                    None => {
                        fill_packet(&mut pkt, flow.channel, spec.round_id, f as u32, seq[f], ts);
                        let wire = &pkt[wire_range(flow.channel)];
                        // SAFETY: `wire` is valid for its length; fd is an open socket.
                        let rc = unsafe {
                            libc::send(
                                flow.fd,
                                wire.as_ptr().cast(),
                                wire.len(),
                                libc::MSG_DONTWAIT,
                            )
                        };
                        if rc == wire.len() as isize {
                            sent[f] += 1;
                        } else {
                            send_errors += 1;
                        }
                    }
                }
                seq[f] += 1;
            }
            issued += n;
            if let Some(r) = &mut ring {
                r.submit(&mut sent, &mut send_errors);
            }
            next_tick += spec.tick;
            if next_tick < now {
                next_tick = now + spec.tick;
            }
        }
        // Receive until the next tick.
        rx.until(flows, spec, base, next_tick.min(end), want, &mut idle);
    }
    let send_elapsed = send_elapsed.unwrap_or_else(|| start.elapsed());
    let cpu = (thread_cpu() - cpu0).saturating_sub(idle);
    let Receiver {
        received,
        misrouted,
        stray,
        hist,
        ..
    } = *rx;
    Ok(GenOut {
        sent,
        received,
        send_errors,
        misrouted,
        stray,
        hist,
        send_elapsed,
        cpu,
    })
}

/// io_uring `Send` submissions with owned slot buffers, recycled on completion.
struct UringSender {
    ring: io_uring::IoUring,
    bufs: Vec<[u8; PACKET_LEN]>,
    slot_flow: Vec<u32>,
    /// Bytes the send of each slot carries (a peer's bare payload is shorter).
    slot_len: Vec<u32>,
    free: Vec<usize>,
    in_flight: usize,
}

impl UringSender {
    fn new() -> io::Result<Self> {
        let ring = io_uring::IoUring::new(RING_ENTRIES)?;
        let n = RING_ENTRIES as usize;
        Ok(Self {
            ring,
            bufs: vec![[0u8; PACKET_LEN]; n],
            slot_flow: vec![0; n],
            slot_len: vec![0; n],
            free: (0..n).rev().collect(),
            in_flight: 0,
        })
    }

    /// A free slot, waiting for completions if all are in flight.
    fn slot(&mut self, sent: &mut [u64], errors: &mut u64) -> usize {
        // Bounded: each round either frees a slot or waits for at least one completion.
        loop {
            if let Some(s) = self.free.pop() {
                return s;
            }
            let _ = self.ring.submit_and_wait(1);
            self.reap(sent, errors);
        }
    }

    fn push(&mut self, slot: usize, f: &Flow, flow: u32, sent: &mut [u64], errors: &mut u64) {
        self.slot_flow[slot] = flow;
        let wire = &self.bufs[slot][wire_range(f.channel)];
        self.slot_len[slot] = wire.len() as u32;
        let sqe = io_uring::opcode::Send::new(
            io_uring::types::Fd(f.fd),
            wire.as_ptr(),
            wire.len() as u32,
        )
        .build()
        .user_data(slot as u64);
        // SAFETY: the buffer lives in `self.bufs` (never reallocated) and the slot is not
        // reused until its completion is reaped; fd stays open for the whole round.
        while unsafe { self.ring.submission().push(&sqe) }.is_err() {
            // Queue full: hand what we have to the kernel and collect completions.
            let _ = self.ring.submit();
            self.reap(sent, errors);
        }
        self.in_flight += 1;
    }

    fn submit(&mut self, sent: &mut [u64], errors: &mut u64) {
        let _ = self.ring.submit();
        self.reap(sent, errors);
    }

    fn reap(&mut self, sent: &mut [u64], errors: &mut u64) {
        for cqe in self.ring.completion() {
            let slot = cqe.user_data() as usize;
            let want = self.slot_len.get(slot).copied().unwrap_or(0) as i32;
            if want > 0 && cqe.result() == want {
                if let Some(f) = self.slot_flow.get(slot) {
                    sent[*f as usize] += 1;
                }
            } else {
                *errors += 1;
            }
            self.free.push(slot);
            self.in_flight -= 1;
        }
    }

    fn finish(&mut self, sent: &mut [u64], errors: &mut u64) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.in_flight > 0 && Instant::now() < deadline {
            let _ = self.ring.submit_and_wait(1);
            self.reap(sent, errors);
        }
    }
}

/// A minimal owned epoll instance.
struct Epoll(RawFd);

impl Epoll {
    fn new() -> io::Result<Self> {
        // SAFETY: no preconditions; result checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(Self(fd))
        }
    }
    fn add(&self, fd: RawFd, data: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: data,
        };
        // SAFETY: both fds are open; ev is valid.
        if unsafe { libc::epoll_ctl(self.0, libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        // SAFETY: we own the fd and close it once.
        unsafe { libc::close(self.0) };
    }
}

/// True if this kernel lets us set up an io_uring.
pub fn uring_available() -> bool {
    io_uring::IoUring::new(8).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    #[test]
    fn packet_round_trips() {
        let mut b = [0u8; PACKET_LEN];
        fill_packet(&mut b, 0x4001, 7, 3, 99, 123_456);
        assert_eq!(&b[..4], &[0x40, 0x01, 0x00, PAYLOAD_LEN as u8]);
        assert_eq!(parse_packet(&b), Some((7, 3, 99, 123_456)));
        assert_eq!(parse_packet(&b[..100]), None);
        b[4] ^= 1;
        assert_eq!(parse_packet(&b), None);
    }

    #[test]
    fn priority_applies_to_the_calling_thread_only() {
        // A raised nice value (allowed without privileges) lands on the thread that applied it.
        let seen = std::thread::spawn(|| {
            Priority {
                nice: 3,
                fifo: None,
            }
            .apply()
            .expect("raising nice is always allowed");
            // SAFETY: getpriority with PRIO_PROCESS and 0 reads the calling thread's value.
            unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
        })
        .join()
        .unwrap();
        assert_eq!(seen, 3);
        // SAFETY: as above, for this (untouched) thread.
        let here = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
        assert_ne!(here, 3);
        // SCHED_FIFO either applies (root) or fails with a clear OS error, never silently.
        let fifo = std::thread::spawn(|| {
            let r = Priority {
                nice: 0,
                fifo: Some(1),
            }
            .apply();
            // SAFETY: sched_getscheduler(0) reads the calling thread's policy.
            (r.is_ok(), unsafe { libc::sched_getscheduler(0) })
        })
        .join()
        .unwrap();
        assert_eq!(fifo.0, fifo.1 == libc::SCHED_FIFO, "{fifo:?}");
    }

    /// Loopback without a relay: two sockets connected to each other stand in for the
    /// relay path, so the generator's counting and pacing are checked on their own.
    fn direct_pair() -> (UdpSocket, UdpSocket) {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        a.connect(b.local_addr().unwrap()).unwrap();
        b.connect(a.local_addr().unwrap()).unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        (a, b)
    }

    fn run(send_io: SendIo, receive: Receive) -> RoundResult {
        let (a, b) = direct_pair();
        let flows = [
            Flow {
                fd: a.as_raw_fd(),
                channel: 0x4000,
                dest: 1,
            },
            Flow {
                fd: b.as_raw_fd(),
                channel: 0x4000,
                dest: 0,
            },
        ];
        let spec = RoundSpec {
            round_id: 1,
            rate_pps: 2000.0,
            duration: Duration::from_millis(300),
            drain: Duration::from_millis(300),
            tick: Duration::from_millis(1),
            cpu: None,
            send_io,
            priority: Priority::default(),
            receive,
        };
        let r = run_round(&flows, &spec, None).unwrap();
        assert!(r.sent > 100, "sent {}", r.sent);
        assert_eq!(r.received, r.sent);
        assert_eq!(r.lost, 0);
        assert_eq!(r.misrouted, 0);
        assert_eq!(r.latency_us.len(), r.received);
        r
    }

    #[test]
    fn counts_every_packet_with_syscalls() {
        run(SendIo::Syscall, Receive::Wait);
    }

    #[test]
    fn spinning_receiver_counts_every_packet() {
        run(SendIo::Syscall, Receive::Spin);
    }

    /// Every packet goes to a socket nobody reads, so a spinning generator never sees the
    /// packets it waits for and spins through every step and the drain: its thread is on the
    /// CPU nearly all the round, yet its busy share counts only the sending.
    #[test]
    fn a_spinning_receivers_idle_polls_are_not_generator_work() {
        let (a, _unread) = direct_pair();
        let flows = [Flow {
            fd: a.as_raw_fd(),
            channel: 0x4000,
            dest: 0,
        }];
        let spec = RoundSpec {
            round_id: 3,
            rate_pps: 1000.0,
            duration: Duration::from_millis(300),
            drain: Duration::from_millis(300),
            tick: Duration::from_millis(1),
            cpu: None,
            send_io: SendIo::Syscall,
            priority: Priority::default(),
            receive: Receive::Spin,
        };
        let r = run_round(&flows, &spec, None).unwrap();
        assert!(r.sent > 100 && r.received == 0 && r.lost == r.sent, "{r:?}");
        assert!(
            r.generator_core_fraction() < 0.5,
            "busy share {} while spinning for packets that never came",
            r.generator_core_fraction()
        );
    }

    #[test]
    fn counts_every_packet_with_uring() {
        if !uring_available() {
            panic!("io_uring is not available on this kernel; run with the syscall sender");
        }
        run(SendIo::Uring, Receive::Wait);
    }

    #[test]
    fn loss_is_sent_minus_received() {
        // Flow 0 sends into a socket nobody maps back (dest 1 but we close nothing): make
        // flow 1's packets arrive on flow 1's own socket = misrouted, so they count as lost.
        let (a, b) = direct_pair();
        let flows = [
            Flow {
                fd: a.as_raw_fd(),
                channel: 0x4000,
                dest: 1,
            },
            // Wrong dest on purpose: b's packets arrive at a, whose index is 0 != 1.
            Flow {
                fd: b.as_raw_fd(),
                channel: 0x4000,
                dest: 1,
            },
        ];
        let spec = RoundSpec {
            round_id: 2,
            rate_pps: 1000.0,
            duration: Duration::from_millis(200),
            drain: Duration::from_millis(200),
            tick: Duration::from_millis(1),
            cpu: None,
            send_io: SendIo::Syscall,
            priority: Priority::default(),
            receive: Receive::Wait,
        };
        let r = run_round(&flows, &spec, None).unwrap();
        assert!(r.sent > 50);
        assert_eq!(r.misrouted + r.received, r.sent);
        assert_eq!(r.lost, r.sent - r.received);
        assert!(r.lost > 0 && r.received > 0);
        assert!(
            (r.loss_fraction() - 0.5).abs() < 0.1,
            "{}",
            r.loss_fraction()
        );
    }
}
