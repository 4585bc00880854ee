//! The NAT matrix with the real client: in a netlab lab, the real services
//! (directory, signaling with its STUN responder, two relays) run on public hosts and real
//! `peerlink-sim` processes run behind NAT routers of the five RFC 4787 kinds. Every ordered
//! pair (caller kind × callee kind) makes a 5 s Opus call and then sends a 1 MiB file (QUIC
//! over the session's path, one `listen --sessions 2 --save-dir` answering both); every call
//! and transfer must connect and end on the path `netlab::expected_path` predicts, and the
//! stored file must equal the original byte for byte. Each test is one caller kind (one
//! matrix row, its five pairs run concurrently, each pair behind its own routers) and prints
//! its row: final path, answer -> connected / first media, transfer throughput.
//!
//! Needs root (network namespaces); otherwise each test prints one "skipped" line and returns,
//! like netlab's own tests. `cargo nextest run -p peerlink-sim --test lab_matrix`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod lab;

use std::time::Duration;

use lab::{CallOutcome, TransferOutcome, World, call_then_transfer, with_deadline};
use peerlink_netlab::{ExpectedPath, NatKind, expected_path};

/// Media duration of each call.
const CALL: Duration = Duration::from_secs(5);
/// Size of each pair's file.
const FILE: usize = 1 << 20;
/// Whole-row bound (the nextest backstop for lab tests is longer).
const ROW_DEADLINE: Duration = Duration::from_secs(170);

struct PairResult {
    callee_kind: NatKind,
    expected: ExpectedPath,
    call: Result<CallOutcome, String>,
    file: Result<TransferOutcome, String>,
}

fn expected_label(p: ExpectedPath) -> &'static str {
    match p {
        ExpectedPath::Direct => "direct",
        ExpectedPath::Relay => "relay",
    }
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.0}"))
}

fn print_row(caller_kind: NatKind, results: &[PairResult]) {
    let mut s = format!(
        "\nNAT lab matrix, caller behind {caller_kind} (5 s Opus call, then 1 MiB file per pair)\n\
         {:<8} {:<8} {:<8} {:>10} {:>10} {:>8} {:>8} {:>8} {:>10}  verdict\n",
        "callee",
        "expected",
        "path",
        "ans->conn",
        "ans->media",
        "rx pkts",
        "mos",
        "file on",
        "file Mb/s"
    );
    for r in results {
        let (path, conn, media, rx, mos) = match &r.call {
            Ok(c) => (
                c.path().unwrap_or("none").to_owned(),
                ms(c.caller["answer_to_connected_ms"].as_f64()),
                ms(c.answer_to_first_media_ms()),
                c.caller["media"]["packets_received"]
                    .as_u64()
                    .map_or("-".into(), |v| v.to_string()),
                c.caller["media"]["mos"]
                    .as_f64()
                    .map_or("-".into(), |v| format!("{v:.2}")),
            ),
            Err(_) => (
                "FAILED".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ),
        };
        let (fpath, fmbps) = match &r.file {
            Ok(f) => (
                f.path.clone().unwrap_or_else(|| "none".into()),
                format!("{:.2}", f.throughput_bps / 1e6),
            ),
            Err(_) => ("FAILED".into(), "-".into()),
        };
        let verdict = if verdict(r).is_ok() { "ok" } else { "WRONG" };
        s.push_str(&format!(
            "{:<8} {:<8} {:<8} {:>10} {:>10} {:>8} {:>8} {:>8} {:>10}  {verdict}\n",
            r.callee_kind.label(),
            expected_label(r.expected),
            path,
            conn,
            media,
            rx,
            mos,
            fpath,
            fmbps
        ));
    }
    println!("{s}");
}

/// Why a pair's result is not what the matrix demands.
fn verdict(r: &PairResult) -> Result<(), String> {
    let c = r.call.as_ref().map_err(Clone::clone)?;
    let want = expected_label(r.expected);
    for (side, rep) in [("caller", &c.caller), ("callee", &c.callee)] {
        let path = rep["path"].as_str().unwrap_or("none");
        if path != want {
            return Err(format!(
                "{side} ended on path {path}, expected {want}: {rep}"
            ));
        }
        let rx = rep["media"]["packets_received"].as_u64().unwrap_or(0);
        // 5 s at 50 packets/s; allow for start-up and the last frames in flight.
        if rx < 150 {
            return Err(format!("{side} received only {rx} media packets: {rep}"));
        }
    }
    if c.caller["call_id"] != c.callee["call_id"] {
        return Err(format!("call ids differ: {} vs {}", c.caller, c.callee));
    }
    if c.answer_to_first_media_ms().is_none() {
        return Err(format!("caller heard no media: {}", c.caller));
    }
    if c.caller["end"] != "hangup" {
        return Err(format!(
            "the caller did not hang up after the media: {}",
            c.caller
        ));
    }
    let f = r.file.as_ref().map_err(Clone::clone)?;
    for (side, rep) in [("sender", &f.sender), ("receiver", &f.receiver)] {
        let path = rep["path"].as_str().unwrap_or("none");
        if path != want {
            return Err(format!(
                "file {side} ended on path {path}, expected {want}: {rep}"
            ));
        }
    }
    if f.receiver["bytes"].as_u64() != Some(FILE as u64) {
        return Err(format!(
            "receiver carried other than {FILE} bytes: {}",
            f.receiver
        ));
    }
    Ok(())
}

fn row(caller_kind: NatKind) {
    with_deadline(ROW_DEADLINE, move || {
        let world = World::start();
        let caller_router = world.router(caller_kind);
        let relayed_before: u64 = world.relays.iter().map(lab::Relay::forwarded).sum();
        let results: Vec<PairResult> = std::thread::scope(|s| {
            let handles: Vec<_> = NatKind::ALL
                .iter()
                .enumerate()
                .map(|(j, &callee_kind)| {
                    let world = &world;
                    let caller_router = &caller_router;
                    s.spawn(move || {
                        let callee_router = world.router(callee_kind);
                        let a = caller_kind.label();
                        let b = callee_kind.label();
                        let caller =
                            world.client(caller_router, &format!("c{j}"), &format!("c-{a}-{b}"));
                        let callee =
                            world.client(&callee_router, &format!("e{j}"), &format!("e-{a}-{b}"));
                        let (call, file) = call_then_transfer(world, &caller, &callee, CALL, FILE);
                        PairResult {
                            callee_kind,
                            expected: expected_path(caller_kind, callee_kind),
                            call,
                            file,
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("pair thread"))
                .collect()
        });
        print_row(caller_kind, &results);
        let relayed = world.relays.iter().map(lab::Relay::forwarded).sum::<u64>() - relayed_before;
        let relay_pairs = results
            .iter()
            .filter(|r| r.expected == ExpectedPath::Relay)
            .count() as u64;
        println!("packets that entered the relays: {relayed} ({relay_pairs} relay pair(s))");
        let mut failures: Vec<String> = results
            .iter()
            .filter_map(|r| {
                verdict(r)
                    .err()
                    .map(|e| format!("{caller_kind} -> {}: {e}", r.callee_kind))
            })
            .collect();
        // Each relayed pair's call alone is ~250 media packets each way through a relay (rows
        // without one see ~200-400: allocations, checks on relayed candidates).
        if relayed < 500 * relay_pairs {
            failures.push(format!(
                "the relays carried only {relayed} packets for {relay_pairs} relay pair(s)"
            ));
        }
        if !failures.is_empty() {
            panic!(
                "{} problem(s):\n{}\n\nservice logs:\n{}",
                failures.len(),
                failures.join("\n\n"),
                world.logs()
            );
        }
    });
}

#[test]
fn caller_public() {
    if !peerlink_netlab::root_or_skip("caller_public") {
        return;
    }
    row(NatKind::Public);
}

#[test]
fn caller_full_cone() {
    if !peerlink_netlab::root_or_skip("caller_full_cone") {
        return;
    }
    row(NatKind::FullCone);
}

#[test]
fn caller_address_restricted() {
    if !peerlink_netlab::root_or_skip("caller_address_restricted") {
        return;
    }
    row(NatKind::AddressRestricted);
}

#[test]
fn caller_port_restricted() {
    if !peerlink_netlab::root_or_skip("caller_port_restricted") {
        return;
    }
    row(NatKind::PortRestricted);
}

#[test]
fn caller_symmetric() {
    if !peerlink_netlab::root_or_skip("caller_symmetric") {
        return;
    }
    row(NatKind::Symmetric);
}

/// Two hosts on one LAN behind one symmetric NAT, services on their defaults: the NAT does
/// not hairpin and maps every destination to a new port, so the only direct path between the
/// two is their host candidates (private addresses signaling must forward). The call and the
/// file must both go direct, between the two LAN addresses, with no relay in between.
#[test]
fn two_hosts_on_one_lan_connect_directly_on_host_candidates() {
    if !peerlink_netlab::root_or_skip("two_hosts_on_one_lan_connect_directly_on_host_candidates") {
        return;
    }
    with_deadline(ROW_DEADLINE, || {
        let world = World::start();
        let router = world.router(NatKind::Symmetric);
        let caller = world.client(&router, "lan1", "lan-caller");
        let callee = world.client(&router, "lan2", "lan-callee");
        let relayed_before: u64 = world.relays.iter().map(lab::Relay::forwarded).sum();
        let (call, file) = call_then_transfer(&world, &caller, &callee, CALL, FILE);
        let relayed = world.relays.iter().map(lab::Relay::forwarded).sum::<u64>() - relayed_before;
        let r = PairResult {
            callee_kind: NatKind::Symmetric,
            expected: ExpectedPath::Direct,
            call,
            file,
        };
        println!("\ntwo hosts on one LAN behind one symmetric NAT");
        print_row(NatKind::Symmetric, std::slice::from_ref(&r));
        println!("packets that entered the relays: {relayed}");
        if let Err(e) = verdict(&r) {
            panic!("{e}\n\nservice logs:\n{}", world.logs());
        }
        let c = r.call.as_ref().expect("checked by verdict");
        let ip = |v: &serde_json::Value| {
            v.as_str()
                .and_then(|s| s.parse::<std::net::SocketAddr>().ok())
                .map(|a| a.ip())
        };
        for (side, rep, me, peer) in [
            ("caller", &c.caller, &caller, &callee),
            ("callee", &c.callee, &callee, &caller),
        ] {
            assert_eq!(
                ip(&rep["local"]),
                Some(me.host.ip().into()),
                "{side} did not send from its host address: {rep}"
            );
            assert_eq!(
                ip(&rep["remote"]),
                Some(peer.host.ip().into()),
                "{side} did not reach the peer's host address: {rep}"
            );
        }
        // The media went host to host: the relays saw at most allocations and checks, never
        // the ~250 media packets each way of a relayed call.
        assert!(
            relayed < 250,
            "the relays carried {relayed} packets of a LAN call"
        );
    });
}
