//! Short, bounded smoke runs of the relay benchmark against the real servers: coturn's
//! `turnserver` and peerlink-relay. They assert that packets were forwarded and counted and
//! that the report is well-formed — never speed.
//!
//! peerlink-relay's binary must be built first (`cargo build -p peerlink-relay`; a workspace
//! `cargo nextest run --workspace` builds it). If it is missing the test fails and says so.

use std::path::PathBuf;
use std::time::Duration;

use peerlink_loadtest::relay_bench::floor::FloorIo;
use peerlink_loadtest::relay_bench::report::{RoundFigures, TrafficReport};
use peerlink_loadtest::relay_bench::server::{ServerKind, default_peerlink_bin};
use peerlink_loadtest::relay_bench::traffic::{Receive, SendIo};
use peerlink_loadtest::relay_bench::{self, AllocConfig, Placement, Topology, TrafficConfig};

fn coturn_bin() -> PathBuf {
    let p = PathBuf::from("/usr/bin/turnserver");
    assert!(
        p.is_file(),
        "coturn's turnserver is not installed at {}: run scripts/setup.sh",
        p.display()
    );
    p
}

fn peerlink_bin() -> PathBuf {
    let p = default_peerlink_bin("debug");
    assert!(
        p.is_file(),
        "peerlink-relay binary missing at {}: build it first with `cargo build -p peerlink-relay` \
         (scripts/test.sh builds the whole workspace before running tests)",
        p.display()
    );
    p
}

/// A small, unpinned placement on a port range of its own (tests run in parallel).
fn placement(servers: Vec<ServerKind>, port_min: u16, port_max: u16) -> Placement {
    let mut p = Placement::new(default_peerlink_bin("debug"));
    p.servers = servers;
    p.server_cpu = None;
    p.gen_cpu = None;
    p.coturn_bin = coturn_bin();
    p.port_min = port_min;
    p.port_max = port_max;
    p.client_ips = 4;
    p.timeout = Duration::from_secs(90);
    p
}

fn small_traffic(p: Placement) -> TrafficConfig {
    let mut c = TrafficConfig::new(p);
    c.allocations = 20;
    c.rate = Some(1000.0);
    c.rounds = 2;
    c.duration = Duration::from_secs(1);
    c.drain = Duration::from_millis(500);
    c.tick = Duration::from_millis(1);
    c.send_io = SendIo::Syscall;
    c
}

/// One allocation round of `count` allocations (`concurrency` in flight), held 500 ms.
fn one_alloc_round(p: Placement, count: usize, concurrency: usize) -> AllocConfig {
    let mut c = AllocConfig::new(p);
    c.count = count;
    c.concurrency = concurrency;
    c.rounds = 1;
    c.hold = Some(Duration::from_millis(500));
    c.settle = Duration::from_millis(200);
    c
}

/// Every round forwarded packets and the books balance.
fn check_round(f: &RoundFigures) {
    assert!(f.sent > 0, "nothing sent: {f:?}");
    assert!(f.received > 0, "nothing received: {f:?}");
    assert_eq!(f.misrouted, 0, "{f:?}");
    // Per flow: lost = max(0, sent - received), duplicated = max(0, received - sent).
    assert_eq!(f.sent + f.duplicated, f.received + f.lost, "{f:?}");
    let loss = f.lost as f64 / f.sent as f64;
    assert!((f.loss_fraction - loss).abs() < 1e-12);
    assert!(
        f.e2e_p50_us > 0 && f.e2e_p50_us <= f.e2e_p99_us && f.e2e_p99_us <= f.e2e_max_us,
        "{f:?}"
    );
    assert!(f.server_cpu_s > 0.0, "server CPU not observed: {f:?}");
}

fn check_report(r: &TrafficReport, servers: &[ServerKind], allocations: usize) {
    assert_eq!(r.servers.len(), servers.len());
    for (s, kind) in r.servers.iter().zip(servers) {
        assert_eq!(s.server, *kind);
        assert_eq!(
            s.allocations, allocations,
            "{kind:?}: allocations alive at the end"
        );
        assert_eq!(s.fixed.len(), 2, "{kind:?}: one fixed round per round");
        s.fixed.iter().for_each(check_round);
    }
    for (sum, kind) in r.summary.iter().zip(servers) {
        assert_eq!(sum.server, kind.label());
        assert!(sum.cpu_us_per_pkt.is_some_and(|c| c > 0.0));
        assert!(sum.e2e_p99_us.is_some());
    }
    // JSON is well-formed and carries the summary.
    let json = serde_json::to_string(r).expect("report serialises");
    let v: serde_json::Value = serde_json::from_str(&json).expect("report JSON parses");
    assert_eq!(
        v["summary"].as_array().expect("summary is an array").len(),
        servers.len()
    );
    assert_eq!(v["config"]["allocations"], allocations);
    let table = r.table();
    for kind in servers {
        assert!(
            table.contains(kind.label()),
            "table lacks {}:\n{table}",
            kind.label()
        );
    }
}

#[test]
fn coturn_smoke_forwards_and_counts() {
    let servers = vec![ServerKind::Coturn];
    let mut c = small_traffic(placement(servers.clone(), 12000, 12999));
    // A tiny max search too: two short steps.
    c.max = true;
    c.search_start = 1000.0;
    c.search_steps = 2;
    c.search_duration = Duration::from_millis(400);
    let r = relay_bench::run_traffic(&c).expect("benchmark against coturn");
    check_report(&r, &servers, 20);
    let m = &r.servers[0].max;
    assert_eq!(m.len(), 2);
    assert!(m.iter().all(|m| !m.steps.is_empty() && m.steps.len() <= 2));
    m.iter().flat_map(|m| &m.steps).for_each(check_round);
}

#[test]
fn peerlink_smoke_forwards_and_counts_on_both_backends() {
    let bin = peerlink_bin();
    let servers = vec![ServerKind::PeerlinkUring, ServerKind::PeerlinkEpoll];
    let mut p = placement(servers.clone(), 13000, 14999);
    p.peerlink_bin = bin;
    let mut c = small_traffic(p);
    // The latency probe at an explicit rate and pacing step (no max search needed).
    c.half_load_rate = Some(800.0);
    c.half_load_tick = Duration::from_micros(200);
    c.half_load_probes = 2;
    // And the latency floors: the same probes through a bare echo process of each kind.
    c.floor_bin = Some(PathBuf::from(env!("CARGO_BIN_EXE_peerlink-loadtest")));
    c.floor_io = vec![FloorIo::Recvmmsg, FloorIo::Uring];
    let r = relay_bench::run_traffic(&c).expect("benchmark against peerlink-relay");
    check_report(&r, &servers, 20);
    assert_eq!(r.floors.len(), 2, "two floors");
    for h in r.floors.iter().flat_map(|f| {
        assert_eq!(f.probes.len(), 2, "two probes of {:?}", f.io);
        &f.probes
    }) {
        assert_eq!(h.round.offered_pps, 800.0);
        check_round(&h.round);
        // The echo measured its own kernel-timestamp-to-send latency for these packets.
        assert!(h.in_relay_samples.is_some_and(|n| n > 0.0), "{h:?}");
        let (p50, p99) = (h.in_relay_p50_us.unwrap(), h.in_relay_p99_us.unwrap());
        assert!(p50 >= 1.0 && p50 <= p99, "{h:?}");
    }
    for s in &r.servers {
        let stats = s.final_stats.as_ref().expect("peerlink /stats read");
        assert!(stats.get("latency_total_us").is_some(), "{stats}");
        assert_eq!(s.half_load.len(), 2, "two probes per server");
        let h = &s.half_load[1];
        assert_eq!(h.round.offered_pps, 800.0);
        check_round(&h.round);
        // /stats was read mid-round: the interval holds this round's packets.
        assert!(h.in_relay_samples.is_some_and(|n| n > 0.0), "{h:?}");
        let (p50, p99) = (h.in_relay_p50_us.unwrap(), h.in_relay_p99_us.unwrap());
        assert!(p50 >= 1.0 && p50 <= p99, "{h:?}");
    }
    let table = r.table();
    assert!(
        table.contains("half-load probe peerlink-uring: offered 800 pkt/s in 200 µs steps"),
        "{table}"
    );
    assert!(
        table.contains("half-load p99 peerlink-epoll: median") && table.contains("over 2 probes"),
        "{table}"
    );
    assert!(
        table.contains("half-load probe floor (bare UDP echo): offered 800 pkt/s")
            && table.contains("half-load p99 peerlink-uring / floor (bare UDP echo) = ")
            && table.contains("half-load probe floor (io_uring echo): offered 800 pkt/s")
            && table.contains("half-load p99 peerlink-epoll / floor (io_uring echo) = "),
        "{table}"
    );
    // The two backends' kept rounds compared pairwise (one kept round here).
    assert!(
        table.contains("io_uring cheaper in 0 of 1 rounds")
            || table.contains("io_uring cheaper in 1 of 1 rounds"),
        "{table}"
    );
}

/// Allocations with plain UDP peers: half the packets go client -> relay -> peer, half peer ->
/// relay -> client, on every server; peerlink forwards them through the relayed sockets (both
/// directions counted, nothing short-circuited). The generator spins for its packets here
/// (`--gen-receive spin`): the books must come out just as exact.
#[test]
fn peers_topology_forwards_both_ways_through_relayed_sockets() {
    let servers = vec![
        ServerKind::PeerlinkUring,
        ServerKind::PeerlinkEpoll,
        ServerKind::Coturn,
    ];
    let mut p = placement(servers.clone(), 18000, 19499);
    p.peerlink_bin = peerlink_bin();
    let mut c = small_traffic(p);
    c.topology = Topology::Peers;
    c.receive = Receive::Spin;
    c.half_load_probe = false;
    let r = relay_bench::run_traffic(&c).expect("peers benchmark");
    check_report(&r, &servers, 20);
    for s in r.servers.iter().filter(|s| s.server != ServerKind::Coturn) {
        let stats = s.final_stats.as_ref().expect("peerlink /stats read");
        let counter = |name: &str| stats["counters"][name].as_u64().unwrap_or(0);
        // (/stats lags the workers by up to a second: no exact totals here; the generator's
        // per-flow books in check_report are exact.)
        let (up, down) = (
            counter("forwarded_packets_client_to_peer"),
            counter("forwarded_packets_peer_to_client"),
        );
        assert!(up > 0 && down > 0, "{:?}: {stats}", s.server);
        assert_eq!(
            counter("forwarded_packets_client_to_client"),
            0,
            "{:?}",
            s.server
        );
    }
    assert!(r.table().contains("20 plain UDP peers"), "{}", r.table());
}

#[test]
fn coturn_alloc_smoke_counts_allocations_memory_and_hold() {
    let c = one_alloc_round(placement(vec![ServerKind::Coturn], 15000, 15999), 40, 10);
    let r = relay_bench::run_alloc(&c).expect("allocation benchmark against coturn");
    let round = &r.servers[0].rounds[0];
    assert_eq!(round.succeeded, 40, "{round:?}");
    assert_eq!(round.held_and_refreshed, Some(40), "{round:?}");
    assert_eq!(round.released, 40, "{round:?}");
    assert_eq!(round.relay_ips_used, 1, "{round:?}");
    // 4 client IPs: sessions share sockets, 4 per socket.
    assert_eq!(round.client_sockets, 10, "{round:?}");
    assert!(round.allocs_per_s > 0.0 && round.rss_before > 0 && round.rss_after > 0);
    assert!(r.table().contains("coturn"));
    let v: serde_json::Value = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
    assert_eq!(v["summary"][0]["server"], "coturn");
}

/// 300 allocations on shared client sockets (100 client IPs: 3 sockets, sessions told apart
/// by source IP via IP_PKTINFO) against peerlink-relay with two relay IPs and two workers:
/// every allocation is granted, refreshed after the hold and released.
#[test]
fn peerlink_alloc_on_shared_client_sockets_allocates_refreshes_and_releases_all() {
    let mut p = placement(vec![ServerKind::PeerlinkEpoll], 16000, 16999);
    p.peerlink_bin = peerlink_bin();
    p.relay_ips = vec![
        "127.0.0.1".parse().expect("ip"),
        "127.0.0.2".parse().expect("ip"),
    ];
    p.relay_workers = 2;
    p.client_ips = 100;
    p.timeout = Duration::from_secs(40);
    let c = one_alloc_round(p, 300, 100);
    assert!(c.shared_sockets());
    let r = relay_bench::run_alloc(&c).expect("allocation benchmark against peerlink-relay");
    let round = &r.servers[0].rounds[0];
    assert_eq!(round.client_sockets, 3, "{round:?}");
    assert_eq!(round.client_ips, 100, "{round:?}");
    assert_eq!(round.succeeded, 300, "{round:?}");
    assert_eq!(round.held_and_refreshed, Some(300), "{round:?}");
    assert_eq!(round.released, 300, "{round:?}");
    assert_eq!(round.relay_ips_used, 2, "{round:?}");
    assert_eq!(round.first_error, None, "{round:?}");
    let table = r.table();
    assert!(table.contains("held and refreshed 300/300"), "{table}");
    assert!(
        table.contains("3 client sockets over 100 client IPs"),
        "{table}"
    );
}

/// With one client IP the allocation run keeps one connected socket per allocation.
#[test]
fn peerlink_alloc_with_one_client_ip_uses_a_socket_per_allocation() {
    let mut p = placement(vec![ServerKind::PeerlinkUring], 17000, 17999);
    p.peerlink_bin = peerlink_bin();
    p.client_ips = 1;
    p.timeout = Duration::from_secs(40);
    let mut c = one_alloc_round(p, 20, 10);
    assert!(!c.shared_sockets());
    // The run's progress bar (hidden here: stderr is captured) counts its rounds.
    c.progress = peerlink_cli::progress::Bar::new(
        "allocation benchmark",
        peerlink_cli::progress::Unit::Steps,
        false,
    );
    let r = relay_bench::run_alloc(&c).expect("allocation benchmark against peerlink-relay");
    assert_eq!(c.progress.position(), 1, "one round of one server");
    let round = &r.servers[0].rounds[0];
    assert_eq!(round.client_sockets, 20, "{round:?}");
    assert_eq!(round.succeeded, 20, "{round:?}");
    assert_eq!(round.held_and_refreshed, Some(20), "{round:?}");
    assert_eq!(round.released, 20, "{round:?}");
}

/// `peerlink-loadtest relay-alloc`: a progress bar of the rounds on stderr with `--progress`
/// (stderr is a pipe here), none without it (not a terminal).
#[test]
fn the_cli_draws_a_progress_bar_only_when_asked_or_on_a_terminal() {
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_peerlink-loadtest"))
            .args([
                "relay-alloc",
                "--servers",
                "peerlink-uring",
                "--count",
                "10",
            ])
            .args(["--concurrency", "5", "--rounds", "2", "--server-cpu", "-1"])
            .args([
                "--gen-cpu",
                "-1",
                "--port-min",
                "18500",
                "--port-max",
                "18999",
            ])
            .args(["--timeout", "60", "--peerlink-bin"])
            .arg(peerlink_bin())
            .args(extra)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let with = run(&["--progress"]);
    assert!(with.contains("round 2/2") && with.contains("2/2"), "{with}");
    let without = run(&[]);
    assert!(!without.contains("round 1/2"), "{without}");
}
