//! Connectivity and transfer figures of the real client across real NATs (`docs/BENCHMARKS.md`,
//! "NAT lab"), measured in a netlab lab with the real services.
//!
//! A plain program (`harness = false`), needs root (network namespaces):
//! `cargo bench -p peerlink-sim --bench lab [-- --calls 20 --relay-calls 8 --size-mib 8
//! --rate-mbps 16]`. It prints, each against a baseline measured in the same run:
//! - direct path (full cone ↔ port-restricted, 10 ms one-way delay on each WAN link): answer ->
//!   first media p50/p90 over N calls vs. the path RTT (measured through the same links with
//!   UDP round trips) + 100 ms;
//! - relay fallback (symmetric ↔ symmetric, same links): answer -> first media vs. 1.5 s;
//! - file transfer over a 20 ms RTT, 1 % loss, rate-capped link: goodput as a % of the link's
//!   capacity, measured by saturating the same link with UDP (target ≥ 80 %).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/lab/mod.rs"]
mod lab;

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lab::{Client, World, run_call};
use peerlink_netlab::{Host, Lab, LabError, LinkConditions, NatKind, Reflector, query_mapped};

struct Args {
    calls: usize,
    relay_calls: usize,
    size_mib: usize,
    rate_mbps: u64,
}

fn parse_args() -> Args {
    let mut a = Args {
        calls: 20,
        relay_calls: 8,
        size_mib: 8,
        rate_mbps: 16,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let val = argv.get(i + 1).cloned().unwrap_or_default();
        let used = match argv[i].as_str() {
            "--calls" => val.parse().map(|v| a.calls = v).is_ok(),
            "--relay-calls" => val.parse().map(|v| a.relay_calls = v).is_ok(),
            "--size-mib" => val.parse().map(|v| a.size_mib = v).is_ok(),
            "--rate-mbps" => val.parse().map(|v| a.rate_mbps = v).is_ok(),
            _ => false, // e.g. `--bench` passed by cargo
        };
        i += if used { 2 } else { 1 };
    }
    a
}

fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let idx = ((p / 100.0) * (s.len() - 1) as f64).round() as usize;
    s[idx.min(s.len() - 1)]
}

/// Median UDP round trip from `host` to the reflector (one query = one round trip).
fn median_rtt_ms(host: &Host, reflector: SocketAddr, n: usize) -> f64 {
    let sock = host.udp_socket("0.0.0.0:0".parse().unwrap()).unwrap();
    // Warm up ARP and the NAT mapping.
    query_mapped(&sock, reflector, Duration::from_secs(5)).unwrap();
    let mut rtts = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        query_mapped(&sock, reflector, Duration::from_secs(5)).unwrap();
        rtts.push(t.elapsed().as_secs_f64() * 1e3);
    }
    percentile(&rtts, 50.0)
}

/// `n` sequential calls of `dur` between the pair; answer -> first media of each (caller).
fn time_calls(
    caller: &Client,
    callee: &Client,
    n: usize,
    dur: Duration,
) -> (Vec<f64>, Vec<String>) {
    let mut t = Vec::new();
    let mut problems = Vec::new();
    for i in 0..n {
        match run_call(caller, callee, dur, &[]) {
            Ok(c) => match (c.answer_to_first_media_ms(), c.path()) {
                (Some(ms), Some(path)) => {
                    t.push(ms);
                    eprintln!("  call {i}: {path}, answer -> first media {ms:.0} ms");
                }
                _ => problems.push(format!("call {i}: no media: {}", c.caller)),
            },
            Err(e) => problems.push(format!("call {i}: {e}")),
        }
    }
    (t, problems)
}

/// Saturate the path `from` -> `to_mapped` with 1,200-byte UDP datagrams at `offered_bps` for
/// `secs` and return the delivered bit rate measured at `rx` (steady state: the first half
/// second is skipped).
fn udp_capacity_bps(
    tx: &UdpSocket,
    rx: UdpSocket,
    to: SocketAddr,
    offered_bps: u64,
    secs: f64,
) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let bytes = Arc::new(AtomicU64::new(0));
    let counting = Arc::new(AtomicBool::new(false));
    let (stop_r, bytes_r, counting_r) =
        (Arc::clone(&stop), Arc::clone(&bytes), Arc::clone(&counting));
    rx.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !stop_r.load(Ordering::Relaxed) {
            if let Ok((n, _)) = rx.recv_from(&mut buf)
                && counting_r.load(Ordering::Relaxed)
            {
                bytes_r.fetch_add(n as u64 + 28, Ordering::Relaxed); // + IP/UDP headers
            }
        }
    });
    let payload = [0x5au8; 1200];
    let interval = Duration::from_secs_f64(1228.0 * 8.0 / offered_bps as f64);
    let start = Instant::now();
    let warm = Duration::from_millis(500);
    let end = start + Duration::from_secs_f64(secs);
    let mut next = start;
    let mut counted_from = None;
    while Instant::now() < end {
        if counted_from.is_none() && start.elapsed() >= warm {
            counting.store(true, Ordering::Relaxed);
            counted_from = Some(Instant::now());
        }
        let _ = tx.send_to(&payload, to);
        next += interval;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
    }
    // Let the queue drain into the counter, then stop.
    std::thread::sleep(Duration::from_millis(100));
    let counted = counted_from.map_or(0.0, |t| t.elapsed().as_secs_f64());
    counting.store(false, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    bytes.load(Ordering::Relaxed) as f64 * 8.0 / counted.max(1e-3)
}

fn main() {
    let args = parse_args();
    match Lab::new() {
        Ok(l) => drop(l),
        Err(LabError::NotRoot { euid }) => {
            eprintln!(
                "the lab bench needs root (network namespaces, nftables); effective uid is \
                 {euid}. Run it as root: sudo -E cargo bench -p peerlink-sim --bench lab"
            );
            std::process::exit(2);
        }
        Err(e) => {
            eprintln!("cannot build a lab: {e}");
            std::process::exit(2);
        }
    }
    println!(
        "peerlink NAT-lab bench: client {}, services {}",
        lab::sim_bin().display(),
        lab::service_bin("peerlink-signaling")
            .parent()
            .map_or_else(String::new, |p| p.display().to_string())
    );

    let world = World::start();
    let reflector_sock = world
        .svc
        .udp_socket("203.0.113.200:4000".parse().unwrap())
        .unwrap();
    let reflector = Reflector::start(vec![reflector_sock]).unwrap();
    let refl = reflector.addrs()[0];
    let one_way = Duration::from_millis(10);
    let delayed = LinkConditions {
        delay: one_way,
        seed: 7,
        ..Default::default()
    };

    // --- Direct path.
    let ra = world.lab.add_nat_with(NatKind::FullCone, delayed).unwrap();
    let rb = world
        .lab
        .add_nat_with(NatKind::PortRestricted, delayed)
        .unwrap();
    let a = world.client(&ra, "a", "bench-direct-a");
    let b = world.client(&rb, "b", "bench-direct-b");
    // Path RTT between a and b = RTT(a <-> svc) + RTT(b <-> svc): svc's own link has no delay.
    let rtt_a = median_rtt_ms(&a.host, refl, 20);
    let rtt_b = median_rtt_ms(&b.host, refl, 20);
    let path_rtt = rtt_a + rtt_b;
    eprintln!("direct calls (full cone <-> port-restricted):");
    let (direct, direct_problems) = time_calls(&a, &b, args.calls, Duration::from_secs(1));

    // --- Relay fallback.
    let rc = world.lab.add_nat_with(NatKind::Symmetric, delayed).unwrap();
    let rd = world.lab.add_nat_with(NatKind::Symmetric, delayed).unwrap();
    let c = world.client(&rc, "c", "bench-relay-c");
    let d = world.client(&rd, "d", "bench-relay-d");
    eprintln!("relay calls (symmetric <-> symmetric):");
    let (relay, relay_problems) = time_calls(&c, &d, args.relay_calls, Duration::from_secs(1));

    // --- Transfer link: 20 ms RTT (10 ms each way on the receiver's WAN), 1 % loss, rate cap.
    let rate_bps = args.rate_mbps * 1_000_000;
    let lossy = LinkConditions {
        delay: one_way,
        loss_percent: 1,
        rate_bps: Some(rate_bps),
        seed: 11,
        ..Default::default()
    };
    let rs = world.lab.add_nat(NatKind::FullCone).unwrap();
    let rr = world.lab.add_nat_with(NatKind::FullCone, lossy).unwrap();
    let s = world.client(&rs, "s", "bench-xfer-s");
    let r = world.client(&rr, "r", "bench-xfer-r");
    // Capacity baseline: UDP from s to r's full-cone mapping, offered at 1.5x the cap.
    let rx = r.host.udp_socket("0.0.0.0:0".parse().unwrap()).unwrap();
    let r_mapped = query_mapped(&rx, refl, Duration::from_secs(5)).unwrap();
    let tx = s.host.udp_socket("0.0.0.0:0".parse().unwrap()).unwrap();
    let capacity = udp_capacity_bps(&tx, rx, r_mapped, rate_bps * 3 / 2, 4.0);
    let rtt_r = median_rtt_ms(&r.host, refl, 20);
    let transfer = transfer_goodput(&world, &s, &r, args.size_mib);

    // --- Table.
    println!();
    println!(
        "baseline: path RTT {path_rtt:.1} ms (UDP round trips a<->svc {rtt_a:.1} ms + b<->svc {rtt_b:.1} ms)"
    );
    println!(
        "{:<44} {:>9} {:>9} {:>16} {:>8}",
        "figure", "p50", "p90", "target", "p50/tgt"
    );
    let direct_target = path_rtt + 100.0;
    println!(
        "{:<44} {:>6.0} ms {:>6.0} ms {:>13.0} ms {:>8.2}",
        format!("direct: answer -> first media (n={})", direct.len()),
        percentile(&direct, 50.0),
        percentile(&direct, 90.0),
        direct_target,
        percentile(&direct, 50.0) / direct_target
    );
    println!(
        "{:<44} {:>6.0} ms {:>6.0} ms {:>13.0} ms {:>8.2}",
        format!("relay fallback: answer -> first media (n={})", relay.len()),
        percentile(&relay, 50.0),
        percentile(&relay, 90.0),
        1500.0,
        percentile(&relay, 50.0) / 1500.0
    );
    println!(
        "transfer link: {} Mbit/s cap, 1 % loss, RTT {:.1} ms (r<->svc); measured UDP capacity {:.2} Mbit/s",
        args.rate_mbps,
        rtt_r,
        capacity / 1e6
    );
    match &transfer {
        Ok((bps, secs, path)) => println!(
            "file transfer {} MiB ({path}, verified): {:.2} Mbit/s in {:.2} s = {:.1} % of the measured capacity (target >= 80 %)",
            args.size_mib,
            bps / 1e6,
            secs,
            100.0 * bps / capacity
        ),
        Err(e) => println!("file transfer: not measured: {e}"),
    }
    let mut failed = false;
    for p in direct_problems.iter().chain(&relay_problems) {
        println!("problem: {p}");
        failed = true;
    }
    drop(reflector);
    if failed {
        std::process::exit(1);
    }
}

/// Send a `size_mib` file from `s` to `r` with the real CLI; goodput (verified file bytes /
/// transfer time) and seconds.
fn transfer_goodput(
    world: &World,
    s: &Client,
    r: &Client,
    size_mib: usize,
) -> Result<(f64, f64, String), String> {
    lab::transfer(world, s, r, size_mib << 20)
        .map(|t| (t.throughput_bps, t.seconds, t.path.unwrap_or_default()))
}
