//! `peerlink-loadtest`: command line and wiring only (the benchmark lives in the library).

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use peerlink_loadtest::relay_bench::server::{self, ServerKind};
use peerlink_loadtest::relay_bench::traffic::{self, Priority, Receive, SendIo};
use peerlink_loadtest::relay_bench::{self, AllocConfig, Placement, Topology, TrafficConfig};

#[path = "fleet/cli.rs"]
mod fleet_cli;

/// peerlink load tester.
#[derive(Parser, Debug)]
#[command(name = "peerlink-loadtest", version)]
struct Cli {
    /// Logging, on stderr [default filter: $RUST_LOG, else warn].
    #[command(flatten)]
    log: peerlink_cli::log::LogArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// TURN relay forwarding benchmark: peerlink-relay vs coturn, side by side.
    Relay(RelayArgs),
    /// TURN allocation benchmark: allocations/s, RSS per idle allocation, `--hold N`.
    RelayAlloc(AllocArgs),
    /// Signaling and directory benchmarks (idle-sessions, invites, logins, directory).
    #[command(flatten)]
    Fleet(fleet_cli::FleetCmd),
    /// The half-load latency floor: a bare UDP echo (started by `relay`; not for direct use).
    #[command(hide = true)]
    FloorEcho(FloorArgs),
}

#[derive(Args, Debug)]
struct FloorArgs {
    /// UDP address to echo on.
    #[arg(long)]
    listen: std::net::SocketAddr,
    /// Exit after this many seconds.
    #[arg(long, default_value_t = 600)]
    lifetime_secs: u64,
    /// How the echo receives and sends.
    #[arg(long, value_enum, default_value = "recvmmsg")]
    io: relay_bench::floor::FloorIo,
}

/// Where and what to run (shared by both subcommands).
#[derive(Args, Debug)]
struct PlacementArgs {
    /// Servers to compare (repeat or comma-separate).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [ServerKind::PeerlinkUring, ServerKind::PeerlinkEpoll, ServerKind::Coturn])]
    servers: Vec<ServerKind>,
    /// CPU the servers are pinned to (-1: unpinned).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    server_cpu: i64,
    /// CPU the generator threads are pinned to (-1: unpinned).
    #[arg(long, default_value_t = 1, allow_hyphen_values = true)]
    gen_cpu: i64,
    /// peerlink-relay binary [default: <workspace>/target/release/peerlink-relay].
    #[arg(long)]
    peerlink_bin: Option<PathBuf>,
    /// A second peerlink-relay build, run as the servers `base-uring` / `base-epoll` (compare
    /// two builds, e.g. before and after a change, in the same run).
    #[arg(long)]
    peerlink_base_bin: Option<PathBuf>,
    /// coturn's turnserver binary.
    #[arg(long, default_value = "/usr/bin/turnserver")]
    coturn_bin: PathBuf,
    /// Relay IPs, comma-separated (all loopback 127.0.0.x work); every server gets all of
    /// them (each IP has the whole relayed port range), the first is also the listen address.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
    relay_ips: Vec<IpAddr>,
    /// Worker threads per server: peerlink-relay `--workers`, coturn `--relay-threads`
    /// (pass --server-cpu -1 to let them use more than one core).
    #[arg(long, default_value_t = 1)]
    relay_workers: usize,
    /// Relayed port range shared (split) between the servers.
    #[arg(long, default_value_t = 10000)]
    port_min: u16,
    /// Relayed port range, inclusive.
    #[arg(long, default_value_t = 31999)]
    port_max: u16,
    /// Spread clients over this many loopback source IPs (127.1.x.y, up to 12.5M); 1 = all on
    /// the server's IP. Servers may limit unauthenticated replies per source IP. relay-alloc
    /// with more than 1 shares sockets: one per this many allocations (e.g. --hold 100000
    /// --client-ips 50000: 2 sockets); with 1, one socket per allocation.
    #[arg(long, default_value_t = 64)]
    client_ips: usize,
    /// Nice value for the servers and the generator threads (e.g. -10 on a shared machine so
    /// other work does not preempt the measured processes; same for every server).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    nice: i32,
    /// Run the servers and the generator threads under SCHED_FIFO at this priority (1..=99;
    /// root): nothing of the normal class (kernel threads included) delays them. Same for
    /// every server.
    #[arg(long)]
    rt_priority: Option<u8>,
    /// Overall time limit in seconds.
    #[arg(long, default_value_t = 900)]
    timeout: u64,
    /// Seed for transaction ids.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print the full JSON report on stdout (the table goes to stderr).
    #[arg(long)]
    json: bool,
    /// Draw a progress bar of the rounds on stderr even when it is not a terminal (it is
    /// drawn on a terminal anyway).
    #[arg(long)]
    progress: bool,
}

#[derive(Args, Debug)]
struct RelayArgs {
    #[command(flatten)]
    place: PlacementArgs,
    /// Allocations per server (>= 2, even; the published figures use >= 100).
    #[arg(long, default_value_t = 200)]
    allocations: usize,
    /// Fixed offered rate, packets/s over all flows (0: skip fixed-rate rounds).
    #[arg(long, default_value_t = 30_000.0)]
    rate: f64,
    /// Also find the highest rate with loss <= --loss-threshold.
    #[arg(long)]
    max: bool,
    /// Rounds per server (A/B alternating; the first is discarded).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seconds of sending per fixed-rate round.
    #[arg(long, default_value_t = 2.0)]
    duration: f64,
    /// Seconds of sending per max-search step.
    #[arg(long, default_value_t = 1.0)]
    search_duration: f64,
    /// Max-search steps per round.
    #[arg(long, default_value_t = 8)]
    search_steps: usize,
    /// First rate the max search tries.
    #[arg(long, default_value_t = 50_000.0)]
    search_start: f64,
    /// Loss allowed in the max search, percent.
    #[arg(long, default_value_t = 0.1)]
    loss_threshold: f64,
    /// Milliseconds to keep receiving after the sender stops.
    #[arg(long, default_value_t = 300)]
    drain_ms: u64,
    /// Pacing step in microseconds (packets due are sent as one burst per step).
    #[arg(long, default_value_t = 500)]
    burst_us: u64,
    /// Sender I/O [default: uring when available].
    #[arg(long, value_enum)]
    send_io: Option<SendIo>,
    /// How the generator waits for the packets the servers deliver.
    #[arg(long, value_enum, default_value_t = Receive::Wait)]
    gen_receive: Receive,
    /// Who the allocations talk to: each other in pairs (client -> relay -> relay -> client),
    /// or each a plain UDP peer (client <-> relay <-> peer, through the relayed sockets).
    #[arg(long, value_enum, default_value_t = Topology::Pairs)]
    topology: Topology,
    /// Skip peerlink's half-load /stats probe.
    #[arg(long)]
    no_half_load: bool,
    /// Half-load probes per peerlink server (alternating between servers; the figure is the
    /// median p99).
    #[arg(long, default_value_t = 3)]
    half_load_probes: usize,
    /// Pacing step of the half-load probe in microseconds. Fine by default: at half load a
    /// relay serving many independent callers sees arrivals spread out; with --burst-us's 500
    /// µs the p99 would be the time to drain each step's burst.
    #[arg(long, default_value_t = 50)]
    half_load_burst_us: u64,
    /// Rate of the half-load probe, packets/s [default: half the measured max; needs --max
    /// unless given].
    #[arg(long)]
    half_load_rate: Option<f64>,
    /// Skip the generator-only ceiling (with --max: the same search over direct socket
    /// pairs, no relay).
    #[arg(long)]
    no_baseline: bool,
    /// Skip the half-load latency floor: the same probes through a bare UDP echo placed like
    /// the servers (same CPU, priority and traffic), whose p99 is what the machine's own
    /// wake-up and delivery path costs with no relay work at all.
    #[arg(long)]
    no_floor: bool,
    /// The floors to probe (repeat or comma-separate): `recvmmsg` (a blocking `recvmmsg`
    /// echo) and/or `uring` (an echo on io_uring set up like the relay's worker, whose floor
    /// against the first is what io_uring's own wake-up path costs).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "recvmmsg")]
    floor_io: Vec<relay_bench::floor::FloorIo>,
}

#[derive(Args, Debug)]
struct AllocArgs {
    #[command(flatten)]
    place: PlacementArgs,
    /// Allocations per round.
    #[arg(long, default_value_t = 2000)]
    count: usize,
    /// Allocations in flight at once.
    #[arg(long, default_value_t = 500)]
    concurrency: usize,
    /// Rounds per server (the first is discarded).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Hold N allocations (overrides --count), keep them refreshed for --hold-secs, then
    /// refresh all and count the survivors.
    #[arg(long)]
    hold: Option<usize>,
    /// Seconds to hold.
    #[arg(long, default_value_t = 10)]
    hold_secs: u64,
}

fn cpu(v: i64) -> Option<usize> {
    usize::try_from(v).ok()
}

fn placement(a: &PlacementArgs) -> anyhow::Result<Placement> {
    let bin = a
        .peerlink_bin
        .clone()
        .unwrap_or_else(|| server::default_peerlink_bin("release"));
    let mut p = Placement::new(bin);
    p.servers = a.servers.clone();
    p.peerlink_base_bin = a.peerlink_base_bin.clone();
    p.server_cpu = cpu(a.server_cpu);
    p.gen_cpu = cpu(a.gen_cpu);
    p.coturn_bin = a.coturn_bin.clone();
    anyhow::ensure!(
        !a.relay_ips.is_empty(),
        "--relay-ips must name at least one address"
    );
    p.relay_ips = a.relay_ips.clone();
    anyhow::ensure!(
        (1..=1024).contains(&a.relay_workers),
        "--relay-workers must be in 1..=1024"
    );
    p.relay_workers = a.relay_workers;
    anyhow::ensure!(
        a.port_min < a.port_max,
        "--port-min must be below --port-max"
    );
    p.port_min = a.port_min;
    p.port_max = a.port_max;
    p.timeout = Duration::from_secs(a.timeout);
    anyhow::ensure!(
        a.client_ips <= Placement::MAX_CLIENT_IPS,
        "--client-ips must be at most {}",
        Placement::MAX_CLIENT_IPS
    );
    p.client_ips = a.client_ips.max(1);
    anyhow::ensure!((-20..=19).contains(&a.nice), "--nice must be in -20..=19");
    if let Some(rt) = a.rt_priority {
        anyhow::ensure!((1..=99).contains(&rt), "--rt-priority must be in 1..=99");
    }
    p.priority = Priority {
        nice: a.nice,
        fifo: a.rt_priority,
    };
    p.seed = a.seed;
    Ok(p)
}

fn secs(v: f64, name: &str) -> anyhow::Result<Duration> {
    anyhow::ensure!(
        v.is_finite() && v > 0.0 && v < 3600.0,
        "{name} must be in (0, 3600) seconds"
    );
    Ok(Duration::from_secs_f64(v))
}

/// The rounds' progress bar on stderr: drawn on a terminal, or anywhere with `--progress`.
fn rounds_bar(label: &str, force: bool) -> peerlink_cli::progress::Bar {
    use peerlink_cli::progress::{Bar, Unit, wanted};
    Bar::new(label, Unit::Steps, wanted(force))
}

fn relay(a: RelayArgs) -> anyhow::Result<()> {
    let mut c = TrafficConfig::new(placement(&a.place)?);
    c.progress = rounds_bar("relay benchmark", a.place.progress);
    anyhow::ensure!(
        a.allocations >= 2 && a.allocations.is_multiple_of(2),
        "--allocations must be even and >= 2"
    );
    c.allocations = a.allocations;
    c.topology = a.topology;
    anyhow::ensure!(a.rate >= 0.0 && a.rate.is_finite(), "--rate must be >= 0");
    c.rate = (a.rate > 0.0).then_some(a.rate);
    c.max = a.max;
    anyhow::ensure!(a.rounds >= 1, "--rounds must be >= 1");
    c.rounds = a.rounds;
    c.duration = secs(a.duration, "--duration")?;
    c.search_duration = secs(a.search_duration, "--search-duration")?;
    c.search_steps = a.search_steps.max(1);
    c.search_start = a.search_start.max(100.0);
    c.loss_threshold = a.loss_threshold / 100.0;
    c.drain = Duration::from_millis(a.drain_ms);
    c.tick = Duration::from_micros(a.burst_us.max(50));
    c.half_load_probe = !a.no_half_load;
    anyhow::ensure!(a.half_load_probes >= 1, "--half-load-probes must be >= 1");
    c.half_load_probes = a.half_load_probes;
    c.half_load_tick = Duration::from_micros(a.half_load_burst_us.max(10));
    if let Some(r) = a.half_load_rate {
        anyhow::ensure!(r > 0.0 && r.is_finite(), "--half-load-rate must be > 0");
    }
    c.half_load_rate = a.half_load_rate;
    c.baseline = !a.no_baseline;
    if !a.no_floor {
        c.floor_bin = Some(std::env::current_exe().context("locating peerlink-loadtest")?);
    }
    c.floor_io = a.floor_io;
    c.receive = a.gen_receive;
    if let Some(io) = a.send_io {
        anyhow::ensure!(
            io != SendIo::Uring || traffic::uring_available(),
            "io_uring is not available here"
        );
        c.send_io = io;
    }
    let json = a.place.json;
    let report = relay_bench::run_traffic(&c).context("relay benchmark")?;
    if json {
        eprint!("{}", report.table());
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

fn relay_alloc(a: AllocArgs) -> anyhow::Result<()> {
    let mut c = AllocConfig::new(placement(&a.place)?);
    c.progress = rounds_bar("allocation benchmark", a.place.progress);
    c.count = a.hold.unwrap_or(a.count);
    c.concurrency = a.concurrency.max(1);
    c.rounds = a.rounds.max(1);
    c.hold = a.hold.map(|_| Duration::from_secs(a.hold_secs));
    let json = a.place.json;
    let report = relay_bench::run_alloc(&c).context("allocation benchmark")?;
    if json {
        eprint!("{}", report.table());
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = peerlink_cli::log::init(
        &cli.log.filter("RUST_LOG", "warn"),
        cli.log.log_format.unwrap_or_default(),
    ) {
        eprintln!("peerlink-loadtest: {e}");
        return ExitCode::from(2);
    }
    let res = match cli.cmd {
        Cmd::Relay(a) => relay(a),
        Cmd::RelayAlloc(a) => relay_alloc(a),
        Cmd::Fleet(c) => fleet_cli::run(c),
        Cmd::FloorEcho(a) => {
            relay_bench::floor::serve(a.listen, Duration::from_secs(a.lifetime_secs), a.io)
                .context("floor-echo")
        }
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
