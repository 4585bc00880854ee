//! The expectation table itself: for every ordered pair of the five kinds, two hosts learn
//! their mapped addresses from a reflector, exchange them in-process and punch with plain
//! UDP; the outcome must match `expected_path`. Run simultaneously and with a 200 ms stagger
//! (the row side first), so every unordered pair is punched in both orders.
#![allow(clippy::unwrap_used)] // test helpers, not only #[test] fns, unwrap

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{PunchSide, lab, punch, with_deadline};
use peerlink_netlab::{ExpectedPath, Host, NatKind, Reflector, expected_path, query_mapped};

/// Each side punches for at most this long.
const BUDGET: Duration = Duration::from_secs(2);
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

struct Outcome {
    a: NatKind,
    b: NatKind,
    side_a: PunchSide,
    side_b: PunchSide,
}

impl Outcome {
    fn path(&self) -> ExpectedPath {
        if self.side_a.heard_peer && self.side_b.heard_peer {
            ExpectedPath::Direct
        } else {
            ExpectedPath::Relay
        }
    }
}

/// Punch all 25 ordered pairs concurrently; side A (row) starts `stagger` before side B.
fn round(
    hosts: &[(NatKind, Host, Host)],
    reflector: SocketAddr,
    stagger: Duration,
    round_id: u32,
) -> Vec<Outcome> {
    let any: SocketAddr = "0.0.0.0:0".parse().unwrap();
    let mut threads = Vec::new();
    for (i, (ka, ha, _)) in hosts.iter().enumerate() {
        for (j, (kb, _, hb)) in hosts.iter().enumerate() {
            let pair = round_id * 100 + (i * 5 + j) as u32;
            let sa = Arc::new(ha.udp_socket(any).unwrap());
            let sb = Arc::new(hb.udp_socket(any).unwrap());
            let (ka, kb) = (*ka, *kb);
            threads.push(std::thread::spawn(move || {
                let ma = query_mapped(&sa, reflector, QUERY_TIMEOUT).unwrap();
                let mb = query_mapped(&sb, reflector, QUERY_TIMEOUT).unwrap();
                // Exchange in-process (the signaling channel), then punch from both sides.
                let sb2 = Arc::clone(&sb);
                let tb =
                    std::thread::spawn(move || punch(&sb2, pair, 1, ma, stagger, BUDGET, true));
                let side_a = punch(&sa, pair, 0, mb, Duration::ZERO, BUDGET, true);
                let side_b = tb.join().unwrap();
                Outcome {
                    a: ka,
                    b: kb,
                    side_a,
                    side_b,
                }
            }));
        }
    }
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

fn print_matrix(title: &str, outcomes: &[Outcome]) {
    println!("\n{title} (row = side A, starts first; ✓ = as expected)");
    print!("{:>10}", "");
    for k in NatKind::ALL {
        print!("{:>12}", k.label());
    }
    println!();
    for ka in NatKind::ALL {
        print!("{:>10}", ka.label());
        for kb in NatKind::ALL {
            let o = outcomes.iter().find(|o| o.a == ka && o.b == kb).unwrap();
            let cell = match o.path() {
                ExpectedPath::Direct => "direct",
                ExpectedPath::Relay => "relay",
            };
            let mark = if o.path() == expected_path(ka, kb) {
                "✓"
            } else {
                "✗"
            };
            print!("{:>12}", format!("{cell} {mark}"));
        }
        println!();
    }
}

fn check(outcomes: &[Outcome], what: &str) {
    let mut wrong = Vec::new();
    for o in outcomes {
        let want = expected_path(o.a, o.b);
        if o.path() != want {
            wrong.push(format!(
                "{} -> {}: got {:?}, expected {want:?} (A: {:?}, B: {:?})",
                o.a,
                o.b,
                o.path(),
                o.side_a,
                o.side_b
            ));
        }
        if want == ExpectedPath::Relay {
            // Without port prediction, not a single packet gets through either way.
            assert!(
                !o.side_a.heard_peer && !o.side_b.heard_peer,
                "{what}: {} -> {} is a relay pair but a packet got through: {:?} / {:?}",
                o.a,
                o.b,
                o.side_a,
                o.side_b
            );
        }
    }
    assert!(
        wrong.is_empty(),
        "{what}: outcomes differ from the table:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn punching_matches_the_expectation_table_for_all_25_pairs() {
    if !peerlink_netlab::root_or_skip("punching_matches_the_expectation_table_for_all_25_pairs") {
        return;
    }
    with_deadline(Duration::from_secs(90), || {
        let lab = lab();
        let refl_host = lab
            .add_public_host("reflector", "203.0.113.200".parse().unwrap())
            .unwrap();
        let reflector = Reflector::start(vec![
            refl_host
                .udp_socket("203.0.113.200:3478".parse().unwrap())
                .unwrap(),
        ])
        .unwrap();
        let refl_addr = reflector.addrs()[0];
        // Two routers per kind, so pairs of the same kind cross two distinct NATs.
        let hosts: Vec<(NatKind, Host, Host)> = NatKind::ALL
            .iter()
            .map(|&k| {
                let r1 = lab.add_nat(k).unwrap();
                let r2 = lab.add_nat(k).unwrap();
                let h1 = r1.add_host(&format!("{}-a", k.label())).unwrap();
                let h2 = r2.add_host(&format!("{}-b", k.label())).unwrap();
                (k, h1, h2)
            })
            .collect();

        let simultaneous = round(&hosts, refl_addr, Duration::ZERO, 1);
        print_matrix("simultaneous start", &simultaneous);
        let staggered = round(&hosts, refl_addr, Duration::from_millis(200), 2);
        print_matrix("side B starts 200 ms after side A", &staggered);

        // Address-restricted <-> symmetric only works through peer-reflexive learning.
        for o in simultaneous.iter().chain(&staggered) {
            if o.a == NatKind::AddressRestricted && o.b == NatKind::Symmetric {
                assert!(
                    !o.side_a.learned.is_empty(),
                    "the address-restricted side must have learned the symmetric side's \
                     peer-reflexive address: {:?}",
                    o.side_a
                );
            }
        }
        check(&simultaneous, "simultaneous");
        check(&staggered, "staggered");
    });
}

#[test]
fn address_restricted_to_symmetric_needs_peer_reflexive_learning() {
    if !peerlink_netlab::root_or_skip(
        "address_restricted_to_symmetric_needs_peer_reflexive_learning",
    ) {
        return;
    }
    with_deadline(Duration::from_secs(40), || {
        let lab = lab();
        let refl_host = lab
            .add_public_host("reflector", "203.0.113.200".parse().unwrap())
            .unwrap();
        let reflector = Reflector::start(vec![
            refl_host
                .udp_socket("203.0.113.200:3478".parse().unwrap())
                .unwrap(),
        ])
        .unwrap();
        let refl_addr = reflector.addrs()[0];
        let ar = lab
            .add_nat(NatKind::AddressRestricted)
            .unwrap()
            .add_host("ar")
            .unwrap();
        let sym = lab
            .add_nat(NatKind::Symmetric)
            .unwrap()
            .add_host("sym")
            .unwrap();
        let any: SocketAddr = "0.0.0.0:0".parse().unwrap();
        let attempt = |learn: bool, pair: u32| {
            let sa = ar.udp_socket(any).unwrap();
            let sb = Arc::new(sym.udp_socket(any).unwrap());
            let ma = query_mapped(&sa, refl_addr, QUERY_TIMEOUT).unwrap();
            let mb = query_mapped(&sb, refl_addr, QUERY_TIMEOUT).unwrap();
            let sb2 = Arc::clone(&sb);
            let tb =
                std::thread::spawn(move || punch(&sb2, pair, 1, ma, Duration::ZERO, BUDGET, learn));
            let a = punch(&sa, pair, 0, mb, Duration::ZERO, BUDGET, learn);
            (a, tb.join().unwrap())
        };
        let (a, b) = attempt(false, 1);
        println!("without peer-reflexive learning: {a:?} / {b:?}");
        assert!(
            a.heard_peer && !b.heard_peer,
            "the symmetric side's new port reaches the address-restricted side, \
             but nothing comes back unless that source is answered"
        );
        let (a, b) = attempt(true, 2);
        println!("with peer-reflexive learning: {a:?} / {b:?}");
        assert!(
            a.heard_peer && b.heard_peer,
            "learning the prflx address opens the path"
        );
    });
}
