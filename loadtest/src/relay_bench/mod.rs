//! `peerlink-loadtest relay`: peerlink-relay against coturn, side by side in one run.
//!
//! Flow of a traffic run: every server under test is started
//! as a child pinned to one core (`--server-cpu`, default 0); N allocations (distinct client
//! sockets = distinct 5-tuples) are made on each, paired A<->B, and every allocation binds a
//! channel to its partner's relayed address, so each packet goes client -> relay -> relay ->
//! client. Then rounds alternate between servers (the order rotates each round); per round
//! and server: a fixed-rate measurement (`--rate`) and/or a max-rate search (`--max`:
//! highest rate with loss <= `--loss-threshold`, by doubling then bisection over short
//! rounds). The first round of each server is discarded; medians of the rest are reported,
//! with the ratios peerlink/coturn. The generator (sender + receiver threads) runs on
//! `--gen-cpu` (default 1) and reports its own CPU so a generator-bound figure is flagged.
//!
//! The allocation run (`relay-alloc`) measures allocations per second with many clients
//! allocating concurrently, the RSS growth per idle allocation, and (`--hold N`) how many
//! allocations a server holds and still refreshes.

pub mod floor;
pub mod report;
pub mod server;
pub mod session;
pub mod traffic;

use std::cell::Cell;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use peerlink_client_core::turn::{AllocationState, Event, TurnConfig};
use serde::Serialize;

use report::{
    AllocReport, AllocServerReport, MaxSearch, RoundFigures, ServerReport, TrafficReport,
};
use server::{BENCH_PASS, BENCH_USER, ServerKind, ServerProcess, ServerSpec};
use session::{PumpStats, Sessions};
use traffic::{Flow, Receive, RoundSpec, SendIo};

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A server failed to start or be observed.
    #[error(transparent)]
    Server(#[from] server::ServerError),
    /// Socket setup failed.
    #[error("socket setup: {0}")]
    Io(#[from] std::io::Error),
    /// The generator failed.
    #[error(transparent)]
    Traffic(#[from] traffic::TrafficError),
    /// Allocations or channel bindings did not all succeed.
    #[error("{server}: {what}: {ok}/{wanted} succeeded; first error: {first_error}")]
    Setup {
        /// Server label.
        server: &'static str,
        /// What was being set up.
        what: &'static str,
        /// Successes.
        ok: usize,
        /// Wanted.
        wanted: usize,
        /// The first client error seen.
        first_error: String,
    },
    /// The overall `--timeout` passed.
    #[error("overall timeout of {0:?} reached")]
    Timeout(Duration),
    /// A bad parameter.
    #[error("invalid parameter: {0}")]
    Invalid(String),
}

/// Where servers run and how they are reached; shared by both runs.
#[derive(Clone, Debug, Serialize)]
pub struct Placement {
    /// Servers to run, in order.
    pub servers: Vec<ServerKind>,
    /// CPU for the servers (`None`: unpinned).
    pub server_cpu: Option<usize>,
    /// CPU for the generator threads (`None`: unpinned).
    pub gen_cpu: Option<usize>,
    /// peerlink-relay binary.
    pub peerlink_bin: PathBuf,
    /// A second peerlink-relay build for the `base-*` servers (before/after a change).
    pub peerlink_base_bin: Option<PathBuf>,
    /// coturn binary.
    pub coturn_bin: PathBuf,
    /// Relay IPs (several for `--hold` beyond one IP's ports); every server gets all of them,
    /// the first is also the listen address.
    pub relay_ips: Vec<IpAddr>,
    /// Lowest relayed port; the range up to `port_max` is split between servers.
    pub port_min: u16,
    /// Highest relayed port.
    pub port_max: u16,
    /// Worker threads per server: peerlink-relay `--workers`, coturn `--relay-threads`.
    pub relay_workers: usize,
    /// Scheduling of servers and generator threads (nice 0, normal class: unchanged). A
    /// negative nice value or SCHED_FIFO keeps other work from preempting the measured
    /// processes.
    pub priority: traffic::Priority,
    /// Client source addresses: sessions spread over this many loopback IPs (127.1.x.y) when
    /// more than 1, as distinct clients would come from distinct addresses (per-source limits
    /// apply). The allocation run then shares sockets between sessions (one per `client_ips`
    /// sessions, see [`session::Sessions::open_shared`]).
    pub client_ips: usize,
    /// Socket buffer size for generator sockets (bytes).
    pub sock_buf: usize,
    /// Overall time limit.
    pub timeout: Duration,
    /// Seed for transaction ids.
    pub seed: u64,
}

impl Placement {
    /// Defaults: all three servers, server on CPU 0, generator on CPU 1, relayed ports
    /// 10000-31999 (below the ephemeral range the client sockets use).
    pub fn new(peerlink_bin: PathBuf) -> Self {
        Self {
            servers: vec![
                ServerKind::PeerlinkUring,
                ServerKind::PeerlinkEpoll,
                ServerKind::Coturn,
            ],
            server_cpu: Some(0),
            gen_cpu: Some(1),
            peerlink_bin,
            peerlink_base_bin: None,
            coturn_bin: PathBuf::from("/usr/bin/turnserver"),
            relay_ips: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
            port_min: 10000,
            port_max: 31999,
            relay_workers: 1,
            client_ips: 64,
            priority: traffic::Priority::default(),
            sock_buf: 4 << 20,
            timeout: Duration::from_secs(900),
            seed: 1,
        }
    }

    /// The spec of server `idx` of `of` sharing the port range.
    fn spec(&self, kind: ServerKind, idx: usize, of: usize) -> Result<ServerSpec, BenchError> {
        let ip = self
            .relay_ips
            .first()
            .copied()
            .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let span = (usize::from(self.port_max) - usize::from(self.port_min) + 1) / of.max(1);
        if span < 16 {
            return Err(BenchError::Invalid(format!(
                "port range {}-{} too small for {of} servers",
                self.port_min, self.port_max
            )));
        }
        let lo = usize::from(self.port_min) + idx * span;
        let hi = lo + span - 1;
        // Both servers take several relay IPs (peerlink-relay: of one family too; allocations
        // take them in turn).
        let relay_ips = if self.relay_ips.is_empty() {
            vec![ip]
        } else {
            self.relay_ips.clone()
        };
        Ok(ServerSpec {
            kind,
            listen: SocketAddr::new(ip, server::free_udp_port(ip)?),
            relay_ips,
            workers: self.relay_workers.max(1),
            min_port: lo as u16,
            max_port: hi as u16,
            cpu: self.server_cpu,
            priority: self.priority,
            metrics: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), server::free_tcp_port(ip)?),
            peerlink_bin: if kind.is_base() {
                self.peerlink_base_bin.clone().ok_or_else(|| {
                    BenchError::Invalid(format!("{} needs --peerlink-base-bin", kind.label()))
                })?
            } else {
                self.peerlink_bin.clone()
            },
            coturn_bin: self.coturn_bin.clone(),
            max_allocations: 200_000,
        })
    }

    /// Most client source IPs [`Placement::client_addrs`] makes (127.1-200.1-250.1-250).
    pub const MAX_CLIENT_IPS: usize = 250 * 250 * 200;

    /// The client source IPs: `client_ips` (at most [`Placement::MAX_CLIENT_IPS`]) distinct
    /// loopback addresses 127.h.m.l, or the server's IP when `client_ips` <= 1.
    pub fn client_addrs(&self, server: SocketAddr) -> Vec<IpAddr> {
        if self.client_ips <= 1 {
            return vec![server.ip()];
        }
        (0..self.client_ips.min(Self::MAX_CLIENT_IPS))
            .map(|k| {
                let hi = 1 + (k / 62_500) as u8;
                let mid = ((k / 250) % 250) as u8 + 1;
                let lo = (k % 250) as u8 + 1;
                IpAddr::V4(Ipv4Addr::new(127, hi, mid, lo))
            })
            .collect()
    }

    /// The TURN client configuration of session `i` against `server` (bench credentials,
    /// FINGERPRINT, a per-session seed).
    pub fn client_config(&self, server: SocketAddr, i: usize) -> TurnConfig {
        let mut c = TurnConfig::new(server, BENCH_USER, BENCH_PASS)
            .with_seed(self.seed.wrapping_mul(1_000_003) ^ i as u64);
        c.fingerprint = true;
        c
    }
}

/// Who the allocations talk to in a traffic run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Topology {
    /// Allocations in pairs, each sending to its partner's relayed address: client -> relay ->
    /// relay -> client (both callers behind NATs that need the relay). peerlink-relay
    /// short-circuits these inside a worker, so only its listener socket carries traffic.
    Pairs,
    /// Each allocation with a plain UDP peer (one caller needs the relay, the other does not):
    /// client -> relay -> peer and peer -> relay -> client, half the packets each way, through
    /// every allocation's relayed socket.
    Peers,
}

impl Topology {
    /// "100 pairs" / "200 plain UDP peers" for `n` allocations.
    pub fn describe(self, n: usize) -> String {
        match self {
            Topology::Pairs => format!("{} pairs", n / 2),
            Topology::Peers => format!("{n} plain UDP peers"),
        }
    }
}

/// Parameters of a traffic run (`peerlink-loadtest relay`).
#[derive(Clone, Debug, Serialize)]
pub struct TrafficConfig {
    /// Servers, CPUs, binaries.
    pub placement: Placement,
    /// Allocations per server (even; paired).
    pub allocations: usize,
    /// Who the allocations talk to.
    pub topology: Topology,
    /// Fixed offered rate (packets/s over all flows); `None` skips the fixed-rate rounds.
    pub rate: Option<f64>,
    /// Run the max-rate search.
    pub max: bool,
    /// Rounds per server (the first is discarded).
    pub rounds: usize,
    /// Sending time of a fixed-rate round.
    pub duration: Duration,
    /// Sending time of a max-search step.
    pub search_duration: Duration,
    /// Receive time after the sender stops.
    pub drain: Duration,
    /// Pacing step.
    pub tick: Duration,
    /// Loss allowed in the max search (fraction).
    pub loss_threshold: f64,
    /// First rate the search tries.
    pub search_start: f64,
    /// Highest rate the search tries.
    pub search_cap: f64,
    /// Steps per search.
    pub search_steps: usize,
    /// Measure peerlink's in-relay p99 from `/stats` at half its max rate.
    pub half_load_probe: bool,
    /// Half-load probes per peerlink server (alternating between servers like the rounds; the
    /// figure is their median p99).
    pub half_load_probes: usize,
    /// Pacing step of the half-load probe: fine, because at half load a relay serving many
    /// independent callers sees arrivals spread out, not the whole step's packets at once
    /// (with 500 µs steps its p99 would be the time to drain a 50-packet burst).
    pub half_load_tick: Duration,
    /// Rate of the half-load probe (`None`: half the measured max; then `max` is needed).
    pub half_load_rate: Option<f64>,
    /// Sender I/O.
    pub send_io: SendIo,
    /// How the generator waits for packets.
    pub receive: Receive,
    /// With `max`: also search the generator's own ceiling over direct socket pairs.
    pub baseline: bool,
    /// The `peerlink-loadtest` binary to run the half-load latency floor with (a bare UDP echo,
    /// [`floor`]); `None`: no floor.
    #[serde(skip)]
    pub floor_bin: Option<std::path::PathBuf>,
    /// The floors to probe, each its own echo process, in turn with the servers.
    pub floor_io: Vec<floor::FloorIo>,
    /// Progress of the run on stderr (hidden by default).
    #[serde(skip)]
    pub progress: peerlink_cli::progress::Bar,
}

impl TrafficConfig {
    /// A round at `rate_pps` for `duration` in `tick` steps, with this run's drain, generator
    /// placement, sender and receiver.
    fn round(&self, round_id: u32, rate_pps: f64, duration: Duration, tick: Duration) -> RoundSpec {
        RoundSpec {
            round_id,
            rate_pps,
            duration,
            drain: self.drain,
            tick,
            cpu: self.placement.gen_cpu,
            send_io: self.send_io,
            priority: self.placement.priority,
            receive: self.receive,
        }
    }

    /// The defaults: 200 allocations, 5 rounds, 2 s fixed rounds, 1 s search steps.
    pub fn new(placement: Placement) -> Self {
        Self {
            placement,
            progress: peerlink_cli::progress::Bar::hidden(),
            allocations: 200,
            topology: Topology::Pairs,
            rate: Some(30_000.0),
            max: false,
            rounds: 5,
            duration: Duration::from_secs(2),
            search_duration: Duration::from_secs(1),
            drain: Duration::from_millis(300),
            tick: Duration::from_micros(500),
            loss_threshold: 0.001,
            search_start: 50_000.0,
            search_cap: 2_000_000.0,
            search_steps: 10,
            half_load_probe: true,
            half_load_probes: 3,
            half_load_tick: Duration::from_micros(50),
            half_load_rate: None,
            baseline: true,
            floor_bin: None,
            floor_io: vec![floor::FloorIo::Recvmmsg],
            receive: Receive::Wait,
            send_io: if traffic::uring_available() {
                SendIo::Uring
            } else {
                SendIo::Syscall
            },
        }
    }
}

/// A server with its allocations paired (or given peers) and channels bound.
struct Prepared {
    server: ServerProcess,
    sessions: Sessions,
    /// The plain peer sockets of [`Topology::Peers`] (flow `n + i` is peer `i`).
    _peers: Vec<UdpSocket>,
    flows: Vec<Flow>,
}

/// Allocates `n` sessions (at most `window` in flight) until done or `deadline`.
fn allocate_all(sessions: &mut Sessions, window: usize, deadline: Instant) -> (usize, Duration) {
    let n = sessions.len();
    let start = Instant::now();
    let mut next = 0usize;
    let mut stats = PumpStats::default();
    let last_ok = Cell::new(start);
    let ok = Cell::new(0usize);
    let failed = Cell::new(0usize);
    sessions.pump(
        deadline,
        |_, ev, _, now| match ev {
            Event::Allocated { .. } => {
                ok.set(ok.get() + 1);
                last_ok.set(now);
            }
            Event::AllocationFailed(_) => failed.set(failed.get() + 1),
            _ => {}
        },
        |ss, now| {
            let done = ok.get() + failed.get();
            let in_flight = next.saturating_sub(done);
            if next < n && in_flight < window {
                let k = (window - in_flight).min(n - next);
                ss.start_allocations(next..next + k, now, &mut PumpStats::default());
                next += k;
            }
            done >= n
        },
        &mut stats,
    );
    (ok.get(), last_ok.get().duration_since(start))
}

fn prepare(
    p: &Placement,
    spec: ServerSpec,
    n: usize,
    topology: Topology,
    sock_buf: usize,
    deadline: Instant,
) -> Result<Prepared, BenchError> {
    let label = spec.kind.label();
    let listen = spec.listen;
    let server = ServerProcess::start(spec, Duration::from_secs(20))?;
    let mut sessions = Sessions::open(
        n,
        &p.client_addrs(listen),
        listen,
        |i| p.client_config(listen, i),
        sock_buf,
    )?;
    let setup_deadline = deadline.min(Instant::now() + Duration::from_secs(60));
    let (ok, _) = allocate_all(&mut sessions, 256, setup_deadline);
    if ok < n {
        return Err(BenchError::Setup {
            server: label,
            what: "allocations",
            ok,
            wanted: n,
            first_error: sessions.first_error().unwrap_or("timeout").to_owned(),
        });
    }
    // Peers: one plain socket per allocation on the client IPs, sending to (connected to)
    // that allocation's relayed address.
    let mut peers = Vec::new();
    if topology == Topology::Peers {
        let ips = p.client_addrs(listen);
        for i in 0..n {
            let relayed = sessions.list[i]
                .client
                .relayed_addr()
                .ok_or_else(|| BenchError::Invalid("allocated without a relayed address".into()))?;
            let s = plain_socket(ips[(n + i) % ips.len()], sock_buf)?;
            s.connect(relayed)?;
            peers.push(s);
        }
    }
    let now = Instant::now();
    let mut stats = PumpStats::default();
    for i in 0..n {
        let peer = match topology {
            Topology::Pairs => sessions.list[i ^ 1].client.relayed_addr(),
            Topology::Peers => match peers.get(i) {
                Some(p) => Some(p.local_addr()?),
                None => None,
            },
        };
        sessions.with_client(i, &mut stats, |s| {
            s.peer = peer;
            if let Some(peer) = peer
                && let Err(e) = s.client.bind_channel(now, peer)
            {
                s.last_error = Some(e.to_string());
            }
        });
    }
    sessions.pump(
        setup_deadline,
        |_, _, _, _| {},
        |ss, _| {
            ss.list
                .iter()
                .all(|s| s.channel.is_some() || s.last_error.is_some())
        },
        &mut stats,
    );
    let bound = sessions.list.iter().filter(|s| s.channel.is_some()).count();
    if bound < n {
        return Err(BenchError::Setup {
            server: label,
            what: "channel bindings",
            ok: bound,
            wanted: n,
            first_error: sessions.first_error().unwrap_or("timeout").to_owned(),
        });
    }
    let fds = sessions.fds()?;
    let mut flows: Vec<Flow> = sessions
        .list
        .iter()
        .enumerate()
        .map(|(i, s)| Flow {
            fd: fds[i],
            channel: s.channel.unwrap_or(0),
            dest: match topology {
                Topology::Pairs => i ^ 1,
                Topology::Peers => n + i,
            },
        })
        .collect();
    flows.extend(peers.iter().enumerate().map(|(i, s)| Flow {
        fd: s.as_raw_fd(),
        channel: traffic::RAW,
        dest: i,
    }));
    Ok(Prepared {
        server,
        sessions,
        _peers: peers,
        flows,
    })
}

/// A non-blocking UDP socket on `ip` (ephemeral port) with `sock_buf` bytes of buffers (best
/// effort: the kernel caps them at rmem_max / wmem_max).
fn plain_socket(ip: IpAddr, sock_buf: usize) -> std::io::Result<UdpSocket> {
    let s = UdpSocket::bind((ip, 0))?;
    let _ = socket2::SockRef::from(&s).set_recv_buffer_size(sock_buf);
    let _ = socket2::SockRef::from(&s).set_send_buffer_size(sock_buf);
    s.set_nonblocking(true)?;
    Ok(s)
}

/// `n` sockets connected pairwise (0<->1, 2<->3, ...) on the client IPs: the generator
/// talking to itself, for its own ceiling.
fn direct_pairs(p: &Placement, n: usize) -> Result<(Vec<UdpSocket>, Vec<Flow>), BenchError> {
    let ips = p.client_addrs(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0));
    let mut socks = Vec::with_capacity(n);
    for i in 0..n {
        socks.push(plain_socket(ips[i % ips.len()], p.sock_buf)?);
    }
    for i in (0..n).step_by(2) {
        let (a, b) = (socks[i].local_addr()?, socks[i + 1].local_addr()?);
        socks[i].connect(b)?;
        socks[i + 1].connect(a)?;
    }
    let flows = framed_flows(&socks, |i| i ^ 1);
    Ok((socks, flows))
}

/// One flow per plain socket, sending ChannelData-framed packets (as a client would) that
/// arrive at flow `dest(i)`'s socket.
fn framed_flows(socks: &[UdpSocket], dest: impl Fn(usize) -> usize) -> Vec<Flow> {
    socks
        .iter()
        .enumerate()
        .map(|(i, s)| Flow {
            fd: s.as_raw_fd(),
            channel: peerlink_proto::channel::CHANNEL_MIN,
            dest: dest(i),
        })
        .collect()
}

/// Lets due refreshes (permissions every 4 min, channels, allocation) happen between rounds.
fn maintain(prep: &mut Prepared) {
    let mut stats = PumpStats::default();
    prep.sessions.pump(
        Instant::now() + Duration::from_millis(500),
        |_, _, _, _| {},
        |ss, _| ss.busy() == 0,
        &mut stats,
    );
}

/// One measured round with the server's CPU time around it.
fn measured_round(
    prep: &mut Prepared,
    spec: &RoundSpec,
    probe: Option<(Duration, &mut dyn FnMut())>,
) -> Result<RoundFigures, BenchError> {
    maintain(prep);
    let sleeps0 = prep.server.voluntary_switches()?;
    let cpu0 = prep.server.cpu_time()?;
    let r = traffic::run_round(&prep.flows, spec, probe)?;
    prep.server.check_alive()?;
    let cpu1 = prep.server.cpu_time()?;
    let sleeps1 = prep.server.voluntary_switches()?;
    Ok(RoundFigures::new(&r, cpu1.saturating_sub(cpu0))
        .with_server_sleeps(sleeps1.saturating_sub(sleeps0)))
}

/// Re-measurements of one step when the generator fell short without a busy core.
const MAX_HICCUP_RETRIES: usize = 2;

/// The max-rate search on one server: doubling until loss, then bisection.
fn search_max(
    cfg: &TrafficConfig,
    round_id: &mut u32,
    mut measure: impl FnMut(&RoundSpec) -> Result<RoundFigures, BenchError>,
) -> Result<MaxSearch, BenchError> {
    let mut lo: Option<RoundFigures> = None;
    let mut hi: Option<f64> = None;
    let mut rate = cfg.search_start;
    let mut steps = Vec::new();
    let mut generator_limited = false;
    let mut retries = 0;
    for _ in 0..cfg.search_steps {
        *round_id += 1;
        let spec = cfg.round(*round_id, rate, cfg.search_duration, cfg.tick);
        let f = measure(&spec)?;
        let ok = f.loss_fraction <= cfg.loss_threshold;
        steps.push(f.clone());
        let saturated = f.gen_core_fraction > traffic::GENERATOR_BUSY;
        if f.generator_limited && !saturated && retries < MAX_HICCUP_RETRIES {
            // The generator fell short with its core not busy: it was descheduled (a shared
            // or virtualised machine). Measure this rate again.
            retries += 1;
            continue;
        }
        retries = 0;
        if ok {
            if lo.as_ref().is_none_or(|l| l.received_pps < f.received_pps) {
                lo = Some(f);
            }
            if saturated {
                // The generator's core is full: it cannot offer more; the server was not
                // the limit.
                generator_limited = true;
                break;
            }
        } else {
            hi = Some(hi.map_or(rate, |h: f64| h.min(rate)));
        }
        let lo_rate = lo.as_ref().map_or(0.0, |l| l.offered_pps);
        rate = match hi {
            None => (rate * 2.0).min(cfg.search_cap),
            Some(h) => {
                if lo_rate > 0.0 && h / lo_rate < 1.03 {
                    break;
                }
                if lo_rate == 0.0 {
                    // Start below what got through at the lossy rate.
                    (steps
                        .last()
                        .map_or(h / 2.0, |s: &RoundFigures| s.received_pps)
                        * 0.9)
                        .min(h / 1.5)
                } else {
                    (lo_rate + h) / 2.0
                }
            }
        };
        if lo_rate >= cfg.search_cap {
            break;
        }
    }
    Ok(MaxSearch {
        best: lo,
        steps,
        generator_limited,
    })
}

/// Runs the traffic benchmark.
pub fn run_traffic(cfg: &TrafficConfig) -> Result<TrafficReport, BenchError> {
    if cfg.allocations < 2 || !cfg.allocations.is_multiple_of(2) {
        return Err(BenchError::Invalid(
            "allocations must be even and >= 2".into(),
        ));
    }
    if cfg.rate.is_none() && !cfg.max && cfg.half_load_rate.is_none() {
        return Err(BenchError::Invalid(
            "nothing to measure: give --rate, --max and/or --half-load-rate".into(),
        ));
    }
    if cfg.placement.servers.is_empty() || cfg.rounds == 0 {
        return Err(BenchError::Invalid(
            "need at least one server and one round".into(),
        ));
    }
    let started = Instant::now();
    let deadline = started + cfg.placement.timeout;
    // Setup and between-round maintenance run on this thread, next to the generator.
    traffic::pin(cfg.placement.gen_cpu, cfg.placement.priority);
    session::raise_nofile_limit();
    let servers = &cfg.placement.servers;
    let mut preps = Vec::new();
    for (i, kind) in servers.iter().enumerate() {
        let spec = cfg.placement.spec(*kind, i, servers.len())?;
        preps.push(prepare(
            &cfg.placement,
            spec,
            cfg.allocations,
            cfg.topology,
            cfg.placement.sock_buf,
            deadline,
        )?);
    }
    // The generator's own ceiling: the same search over direct socket pairs, no relay.
    let generator_baseline = if cfg.baseline && cfg.max {
        let (_socks, flows) = direct_pairs(&cfg.placement, cfg.allocations)?;
        // Round ids of their own (the sockets are not shared with the servers' rounds).
        let mut baseline_round = 0x8000_0000u32;
        Some(search_max(cfg, &mut baseline_round, |spec| {
            let r = traffic::run_round(&flows, spec, None)?;
            Ok(RoundFigures::new(&r, Duration::ZERO))
        })?)
    } else {
        None
    };
    let mut reports: Vec<ServerReport> = servers.iter().map(|k| ServerReport::new(*k)).collect();
    let mut round_id = 0u32;
    let bar = &cfg.progress;
    let probes = if (cfg.max || cfg.half_load_rate.is_some()) && cfg.half_load_probe {
        cfg.half_load_probes * servers.iter().filter(|k| k.is_peerlink()).count()
    } else {
        0
    };
    bar.set_length((cfg.rounds * servers.len() + probes) as u64);
    for r in 0..cfg.rounds {
        // Alternate: rotate the order every round.
        for j in 0..servers.len() {
            if Instant::now() >= deadline {
                return Err(BenchError::Timeout(cfg.placement.timeout));
            }
            let s = (j + r) % servers.len();
            let prep = &mut preps[s];
            if let Some(rate) = cfg.rate {
                round_id += 1;
                let spec = cfg.round(round_id, rate, cfg.duration, cfg.tick);
                let f = measured_round(prep, &spec, None)?;
                reports[s].fixed.push(f);
            }
            if cfg.max {
                let m = search_max(cfg, &mut round_id, |spec| measured_round(prep, spec, None))?;
                reports[s].max.push(m);
            }
            bar.set_message(format!("round {}/{}", r + 1, cfg.rounds));
            bar.inc(1);
        }
    }
    // peerlink's in-relay latency at half of its (median) max rate, from /stats; and the same
    // traffic through the latency floor (a bare echo placed like the servers), in turn.
    let mut floor_probes = Vec::new();
    if (cfg.max || cfg.half_load_rate.is_some()) && cfg.half_load_probe {
        let dur = cfg.duration.max(Duration::from_millis(2500));
        let read_at = dur - Duration::from_millis(400);
        // Each peerlink server's probe rate (None: not probed); the floor takes the first.
        let rates: Vec<Option<f64>> = (0..preps.len())
            .map(|s| {
                preps[s].server.spec.kind.is_peerlink().then_some(())?;
                cfg.half_load_rate
                    .or_else(|| reports[s].max_pps_median().map(|m| m / 2.0))
            })
            .collect();
        let mut floors = Vec::new();
        if let (Some(bin), Some(&rate)) = (&cfg.floor_bin, rates.iter().flatten().next()) {
            for &io in &cfg.floor_io {
                floors.push(Floor::start(cfg, bin, rate, deadline, io)?);
            }
        }
        let slots = preps.len() + floors.len();
        for p in 0..cfg.half_load_probes {
            // Alternate the order from probe to probe, as the rounds do.
            for j in 0..slots {
                let s = (j + p) % slots;
                if Instant::now() >= deadline {
                    return Err(BenchError::Timeout(cfg.placement.timeout));
                }
                round_id += 1;
                if let Some(k) = s.checked_sub(preps.len()) {
                    let fl = &mut floors[k];
                    let spec = cfg.round(round_id, fl.rate, dur, cfg.half_load_tick);
                    fl.probe(&spec, read_at)?;
                    continue;
                }
                let Some(rate) = rates[s] else { continue };
                let prep = &mut preps[s];
                let spec = cfg.round(round_id, rate, dur, cfg.half_load_tick);
                let metrics = prep.server.spec.metrics;
                let mut stats: Option<serde_json::Value> = None;
                let mut probe = || {
                    stats = server::fetch_stats(metrics, Duration::from_secs(1)).ok();
                };
                let f = measured_round(prep, &spec, Some((read_at, &mut probe)))?;
                reports[s].half_load.push(report::HalfLoad::new(f, stats));
                bar.set_message(format!(
                    "half-load probe {}/{}",
                    p + 1,
                    cfg.half_load_probes
                ));
                bar.inc(1);
            }
        }
        // The echoes stop here (dropped), their probes go to the report.
        floor_probes = floors.into_iter().map(|f| f.probes).collect();
    }
    for (s, prep) in preps.iter_mut().enumerate() {
        if prep.server.spec.kind.is_peerlink()
            && let Ok(v) = server::fetch_stats(prep.server.spec.metrics, Duration::from_secs(1))
        {
            reports[s].final_stats = Some(v);
        }
        reports[s].allocations = prep.sessions.count(AllocationState::Allocated);
    }
    bar.finish();
    let mut report = TrafficReport::new(cfg, reports, started.elapsed());
    report.set_generator_baseline(generator_baseline);
    report.set_floors(floor_probes);
    Ok(report)
}

/// The half-load latency floor: the echo process and the generator's sockets to it.
struct Floor {
    process: floor::FloorProcess,
    _socks: Vec<UdpSocket>,
    flows: Vec<Flow>,
    /// Probe rate (the first peerlink server's half load).
    rate: f64,
    /// Which echo, and its probes so far.
    probes: report::FloorProbes,
}

impl Floor {
    /// Starts the echo on the servers' CPU and priority, and as many client sockets as the
    /// servers have allocations, on the same client IPs, each echoed back to itself.
    fn start(
        cfg: &TrafficConfig,
        bin: &std::path::Path,
        rate: f64,
        deadline: Instant,
        io: floor::FloorIo,
    ) -> Result<Self, BenchError> {
        let p = &cfg.placement;
        let lifetime = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(5);
        let process = floor::FloorProcess::start(
            bin,
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            p.server_cpu,
            p.priority,
            lifetime,
            io,
        )?;
        let ips = p.client_addrs(process.addr);
        let mut socks = Vec::with_capacity(cfg.allocations);
        for i in 0..cfg.allocations {
            let s = plain_socket(ips[i % ips.len()], p.sock_buf)?;
            s.connect(process.addr)?;
            socks.push(s);
        }
        let flows = framed_flows(&socks, |i| i);
        Ok(Self {
            process,
            _socks: socks,
            flows,
            rate,
            probes: report::FloorProbes {
                io,
                probes: Vec::new(),
            },
        })
    }

    /// One probe: the round, with the echo's stats read `read_at` into it; kept in `probes`.
    fn probe(&mut self, spec: &RoundSpec, read_at: Duration) -> Result<(), BenchError> {
        let cpu0 = server::process_cpu_time(self.process.pid())?;
        let addr = self.process.addr;
        let mut stats: Option<serde_json::Value> = None;
        let mut probe = || {
            stats = floor::query_stats(addr, Duration::from_secs(1)).ok();
        };
        let r = traffic::run_round(&self.flows, spec, Some((read_at, &mut probe)))?;
        let cpu1 = server::process_cpu_time(self.process.pid())?;
        self.probes.probes.push(report::HalfLoad::new(
            RoundFigures::new(&r, cpu1.saturating_sub(cpu0)),
            stats,
        ));
        Ok(())
    }
}

/// Parameters of an allocation run (`peerlink-loadtest relay-alloc`).
#[derive(Clone, Debug, Serialize)]
pub struct AllocConfig {
    /// Servers, CPUs, binaries.
    pub placement: Placement,
    /// Allocations per round.
    pub count: usize,
    /// Allocations in flight at once.
    pub concurrency: usize,
    /// Rounds per server (the first is discarded).
    pub rounds: usize,
    /// Hold the allocations this long, then refresh them all and count the survivors.
    pub hold: Option<Duration>,
    /// Idle time before reading RSS after allocating.
    pub settle: Duration,
    /// Progress of the run on stderr (hidden by default).
    #[serde(skip)]
    pub progress: peerlink_cli::progress::Bar,
}

impl AllocConfig {
    /// Defaults: 2000 allocations, 500 in flight, 3 rounds.
    pub fn new(placement: Placement) -> Self {
        Self {
            placement,
            progress: peerlink_cli::progress::Bar::hidden(),
            count: 2000,
            concurrency: 500,
            rounds: 3,
            hold: None,
            settle: Duration::from_millis(500),
        }
    }

    /// True if sessions share client sockets (`client_ips` > 1): one socket per
    /// `client_ips` sessions instead of one per session.
    pub fn shared_sockets(&self) -> bool {
        self.placement.client_ips > 1
    }

    /// Client sockets a round opens: ceil(count / client IPs) shared, or one per allocation.
    pub fn client_sockets(&self) -> usize {
        if self.shared_sockets() {
            let ips = self.placement.client_ips.min(Placement::MAX_CLIENT_IPS);
            self.count.div_ceil(ips)
        } else {
            self.count
        }
    }
}

/// One allocation round on a fresh server.
fn alloc_round(
    cfg: &AllocConfig,
    kind: ServerKind,
    deadline: Instant,
) -> Result<report::AllocRound, BenchError> {
    let p = &cfg.placement;
    let spec = p.spec(kind, 0, 1)?;
    let listen = spec.listen;
    let server = ServerProcess::start(spec, Duration::from_secs(20))?;
    let client_ips = p.client_addrs(listen);
    let mut sessions = if cfg.shared_sockets() {
        // Sessions share sockets (one per client_ips sessions), told apart by source IP; many
        // sessions answer on one socket, hence the larger buffers.
        Sessions::open_shared(
            cfg.count,
            &client_ips,
            listen,
            |i| p.client_config(listen, i),
            p.sock_buf,
        )?
    } else {
        // One socket per session, spread over the client IPs.
        Sessions::open(
            cfg.count,
            &client_ips,
            listen,
            |i| p.client_config(listen, i),
            0,
        )?
    };
    std::thread::sleep(cfg.settle);
    let rss_before = server.rss_bytes()?;
    let cpu0 = server.cpu_time()?;
    let gen0 = traffic::thread_cpu();
    let round_deadline = deadline.min(Instant::now() + Duration::from_secs(120));
    let phase = Instant::now();
    let (ok, elapsed) = allocate_all(&mut sessions, cfg.concurrency, round_deadline);
    // The generator's share of its core over the whole phase (refusals after the last grant
    // included), not over the time to the last grant.
    let phase = phase.elapsed();
    let gen_cpu = traffic::thread_cpu().saturating_sub(gen0);
    let cpu = server.cpu_time()?.saturating_sub(cpu0);
    std::thread::sleep(cfg.settle);
    let rss_after = server.rss_bytes()?;
    let mut held = None;
    if let Some(hold) = cfg.hold {
        let mut stats = PumpStats::default();
        // Keep the allocations alive (timers run) for the hold period.
        sessions.pump(
            (Instant::now() + hold).min(deadline),
            |_, _, _, _| {},
            |_, _| false,
            &mut stats,
        );
        let left = deadline.saturating_duration_since(Instant::now());
        held = Some(sessions.refresh_all(left.min(Duration::from_secs(60))));
    }
    let first_error = sessions.first_error().map(str::to_owned);
    let relay_ips_used = sessions
        .list
        .iter()
        .filter_map(|s| s.client.relayed_addr().map(|a| a.ip()))
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    let released = sessions.deallocate_all(Duration::from_secs(10));
    let client_sockets = sessions.sockets();
    drop(sessions);
    Ok(report::AllocRound {
        attempted: cfg.count,
        client_sockets,
        client_ips: client_ips.len(),
        succeeded: ok,
        elapsed_s: elapsed.as_secs_f64(),
        allocs_per_s: if elapsed.is_zero() {
            0.0
        } else {
            ok as f64 / elapsed.as_secs_f64()
        },
        server_cpu_us_per_alloc: if ok == 0 {
            0.0
        } else {
            cpu.as_secs_f64() * 1e6 / ok as f64
        },
        gen_core_fraction: gen_cpu.as_secs_f64() / phase.as_secs_f64().max(1e-9),
        rss_before,
        rss_after,
        rss_bytes_per_alloc: if ok == 0 {
            0.0
        } else {
            (rss_after as f64 - rss_before as f64) / ok as f64
        },
        held_and_refreshed: held,
        relay_ips_used,
        released,
        first_error,
    })
}

/// Runs the allocation benchmark (rate, memory, optional hold).
pub fn run_alloc(cfg: &AllocConfig) -> Result<AllocReport, BenchError> {
    if cfg.count == 0 || cfg.rounds == 0 || cfg.concurrency == 0 {
        return Err(BenchError::Invalid(
            "count, rounds and concurrency must be > 0".into(),
        ));
    }
    let started = Instant::now();
    let deadline = started + cfg.placement.timeout;
    // The allocating generator runs on this thread.
    traffic::pin(cfg.placement.gen_cpu, cfg.placement.priority);
    let limit = session::raise_nofile_limit();
    // Client sockets plus some headroom (epoll, server logs, /proc reads, metrics).
    let sockets = cfg.client_sockets();
    if sockets as u64 + 64 > limit {
        return Err(BenchError::Invalid(format!(
            "{} allocations need {sockets} client sockets{} (+64 spare fds) but RLIMIT_NOFILE is {limit}",
            cfg.count,
            if cfg.shared_sockets() {
                format!(" over {} client IPs", cfg.placement.client_ips)
            } else {
                " (one each with --client-ips 1; more client IPs share sockets)".to_owned()
            },
        )));
    }
    let servers = &cfg.placement.servers;
    let mut reports: Vec<AllocServerReport> =
        servers.iter().map(|k| AllocServerReport::new(*k)).collect();
    cfg.progress.set_length((cfg.rounds * servers.len()) as u64);
    for r in 0..cfg.rounds {
        for j in 0..servers.len() {
            if Instant::now() >= deadline {
                return Err(BenchError::Timeout(cfg.placement.timeout));
            }
            let s = (j + r) % servers.len();
            let round = alloc_round(cfg, servers[s], deadline)?;
            reports[s].rounds.push(round);
            cfg.progress
                .set_message(format!("round {}/{}", r + 1, cfg.rounds));
            cfg.progress.inc(1);
        }
    }
    cfg.progress.finish();
    Ok(AllocReport::new(cfg, reports, started.elapsed()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Figures of a synthetic round: loss above `capacity`, generator shortfall above `gen_max`.
    fn synthetic(rate: f64, capacity: f64, gen_max: f64) -> RoundFigures {
        let offered = rate;
        let sent_pps = rate.min(gen_max);
        let received_pps = sent_pps.min(capacity);
        let sent = sent_pps as u64;
        let received = received_pps as u64;
        RoundFigures {
            offered_pps: offered,
            sent_pps,
            received_pps,
            sent,
            received,
            lost: sent - received,
            loss_fraction: (sent - received) as f64 / sent as f64,
            duplicated: 0,
            misrouted: 0,
            stray: 0,
            send_errors: 0,
            e2e_p50_us: 10,
            e2e_p90_us: 20,
            e2e_p99_us: 30,
            e2e_p999_us: 40,
            e2e_max_us: 50,
            server_cpu_s: 0.5,
            server_cpu_us_per_pkt: 5.0,
            server_core_fraction: 0.5,
            gen_core_fraction: 0.5,
            generator_limited: sent_pps < traffic::GENERATOR_SHORTFALL * offered,
            server_sleeps_per_kpkt: 0.0,
        }
    }

    fn cfg(steps: usize) -> TrafficConfig {
        let mut c = TrafficConfig::new(Placement::new(PathBuf::from("/nonexistent")));
        c.search_steps = steps;
        c.search_start = 50_000.0;
        c
    }

    #[test]
    fn search_converges_below_capacity() {
        let mut id = 0;
        let m = search_max(&cfg(10), &mut id, |s| {
            Ok(synthetic(s.rate_pps, 123_000.0, 1e9))
        })
        .unwrap();
        let best = m.best.unwrap().received_pps;
        assert!(
            (123_000.0 * 0.95..=123_000.0).contains(&best),
            "best {best}"
        );
        assert!(!m.generator_limited);
        assert!(m.steps.len() <= 10);
        assert_eq!(id as usize, m.steps.len(), "one round id per step");
    }

    #[test]
    fn search_stops_when_the_generator_core_is_full() {
        let mut id = 0;
        let m = search_max(&cfg(10), &mut id, |s| {
            let mut f = synthetic(s.rate_pps, 1e9, 150_000.0);
            f.gen_core_fraction = if f.generator_limited { 0.99 } else { 0.5 };
            Ok(f)
        })
        .unwrap();
        assert!(m.generator_limited);
        // 50k, 100k ok; 200k: generator full -> stop with what it delivered.
        assert_eq!(m.steps.len(), 3);
        assert_eq!(m.best.unwrap().received_pps, 150_000.0);
    }

    #[test]
    fn search_retries_a_step_the_generator_fell_short_on() {
        let mut id = 0;
        let mut calls = 0;
        let m = search_max(&cfg(10), &mut id, |s| {
            calls += 1;
            // The second measurement is a hiccup: generator short, core idle.
            let gen_max = if calls == 2 { s.rate_pps * 0.5 } else { 1e9 };
            Ok(synthetic(s.rate_pps, 123_000.0, gen_max))
        })
        .unwrap();
        assert!(!m.generator_limited);
        assert_eq!(
            m.steps[1].offered_pps, m.steps[2].offered_pps,
            "hiccup step repeated"
        );
        let best = m.best.unwrap().received_pps;
        assert!(best >= 123_000.0 * 0.9, "best {best}");
    }

    #[test]
    fn search_from_a_lossy_start_goes_down() {
        let mut id = 0;
        let m = search_max(&cfg(8), &mut id, |s| {
            Ok(synthetic(s.rate_pps, 20_000.0, 1e9))
        })
        .unwrap();
        let best = m.best.unwrap().received_pps;
        assert!((20_000.0 * 0.8..=20_000.0).contains(&best), "best {best}");
    }

    #[test]
    fn client_addrs_are_distinct_loopback() {
        let mut p = Placement::new(PathBuf::from("/nonexistent"));
        p.client_ips = 70_000;
        let server = SocketAddr::from(([127, 0, 0, 1], 3478));
        let ips = p.client_addrs(server);
        assert_eq!(ips.len(), 70_000);
        let set: std::collections::HashSet<_> = ips.iter().collect();
        assert_eq!(set.len(), ips.len());
        assert!(ips.iter().all(|ip| ip.is_loopback()));
        p.client_ips = 1;
        assert_eq!(p.client_addrs(server), vec![server.ip()]);
    }

    #[test]
    fn every_server_gets_all_relay_ips_and_the_worker_count() {
        let mut p = Placement::new(PathBuf::from("/nonexistent"));
        p.relay_ips = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        p.relay_workers = 4;
        for kind in [
            ServerKind::PeerlinkUring,
            ServerKind::PeerlinkEpoll,
            ServerKind::Coturn,
        ] {
            let spec = p.spec(kind, 0, 1).unwrap();
            assert_eq!(spec.relay_ips, p.relay_ips, "{kind:?}");
            assert_eq!(spec.listen.ip(), p.relay_ips[0], "{kind:?}");
            assert_eq!(spec.workers, 4, "{kind:?}");
        }
        p.relay_workers = 0;
        assert_eq!(p.spec(ServerKind::Coturn, 0, 1).unwrap().workers, 1);
    }

    #[test]
    fn alloc_runs_share_sockets_with_several_client_ips() {
        let mut c = AllocConfig::new(Placement::new(PathBuf::from("/nonexistent")));
        c.count = 100_000;
        c.placement.client_ips = 50_000;
        assert!(c.shared_sockets());
        assert_eq!(c.client_sockets(), 2);
        c.placement.client_ips = 30_000;
        assert_eq!(c.client_sockets(), 4);
        c.placement.client_ips = 1;
        assert!(!c.shared_sockets());
        assert_eq!(c.client_sockets(), 100_000);
        // 50k client IPs: distinct, and the shared layout accepts them.
        c.placement.client_ips = 50_000;
        let server = SocketAddr::from(([127, 0, 0, 1], 3478));
        let ips = c.placement.client_addrs(server);
        let ss = Sessions::open_shared(
            c.count,
            &ips,
            server,
            |i| c.placement.client_config(server, i),
            0,
        )
        .unwrap();
        assert_eq!(ss.sockets(), 2);
        assert_eq!(ss.len(), 100_000);
        assert_eq!(
            ss.local_addr(50_001).map(|a| a.ip()),
            Some(ips[1]),
            "index 50001 is on socket 1, IP 1"
        );
    }

    #[test]
    fn port_ranges_split_without_overlap() {
        let p = Placement::new(PathBuf::from("/nonexistent"));
        let specs: Vec<ServerSpec> = (0..3)
            .map(|i| p.spec(ServerKind::Coturn, i, 3).unwrap())
            .collect();
        for w in specs.windows(2) {
            assert!(w[0].max_port < w[1].min_port);
        }
        assert!(specs[0].min_port >= p.port_min && specs[2].max_port <= p.port_max);
    }
}
