//! `peerlink-sim nat-check` behind real kernel NATs: in a netlab lab, signaling runs its STUN
//! responder on two IPs of a public host (`--stun IP1:3479 --stun-alt IP2:3480`) and the real
//! client classifies the NAT in front of it, behind a router of each of the five kinds; every
//! classification must be the one the router implements (RFC 4787 mapping and filtering;
//! the symmetric router's ports are random). A call between two of them then carries both
//! classifications in both reports.
//!
//! Needs root (network namespaces); otherwise the test prints one "skipped" line and returns.
//! `cargo nextest run -p peerlink-sim --test lab_natcheck`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod lab;

use std::time::Duration;

use lab::{World, with_deadline};
use peerlink_netlab::NatKind;

/// Bound on the whole test.
const DEADLINE: Duration = Duration::from_secs(150);

/// (mapping, filtering) the router of `kind` implements.
fn expected(kind: NatKind) -> (&'static str, &'static str) {
    match kind {
        NatKind::Public | NatKind::FullCone => ("endpoint-independent", "endpoint-independent"),
        NatKind::AddressRestricted => ("endpoint-independent", "address-dependent"),
        NatKind::PortRestricted => ("endpoint-independent", "address-and-port-dependent"),
        NatKind::Symmetric => ("address-and-port-dependent", "address-and-port-dependent"),
    }
}

#[test]
fn nat_check_classifies_every_kind_of_router() {
    if !peerlink_netlab::root_or_skip("nat_check_classifies_every_kind_of_router") {
        return;
    }
    with_deadline(DEADLINE, || {
        let world = World::start();
        let stun = world.stun.to_string();
        let mut rows = Vec::new();
        std::thread::scope(|s| {
            let handles: Vec<_> = NatKind::ALL
                .iter()
                .map(|&kind| {
                    let world = &world;
                    let stun = stun.clone();
                    s.spawn(move || {
                        let router = world.router(kind);
                        let name = format!("nc-{}", kind.label());
                        let client = world.client(&router, &name, &name);
                        let r = client.run_ok(
                            &["nat-check", "--stun", &stun, "--timeout", "30s"],
                            Duration::from_secs(40),
                        );
                        (kind, r, client)
                    })
                })
                .collect();
            for h in handles {
                rows.push(h.join().expect("nat-check thread"));
            }
        });
        let mut table = String::from(
            "\nnat-check behind each router kind\n\
             router    mapping                     filtering                   ports       hairpin\n",
        );
        for (kind, r, _) in &rows {
            table.push_str(&format!(
                "{:<9} {:<27} {:<27} {:<11} {}\n",
                kind.label(),
                r["mapping"].as_str().unwrap_or("?"),
                r["filtering"].as_str().unwrap_or("?"),
                r["port_allocation"].as_str().unwrap_or("?"),
                r["hairpin"]
            ));
        }
        println!("{table}");
        for (kind, r, _) in &rows {
            let (mapping, filtering) = expected(*kind);
            assert_eq!(r["mapping"], mapping, "{kind:?}: {r}");
            assert_eq!(r["filtering"], filtering, "{kind:?}: {r}");
            assert_eq!(r["nat"], *kind != NatKind::Public, "{kind:?}: {r}");
            assert!(r["hairpin"].is_boolean(), "{kind:?}: {r}");
            let mapped: std::net::SocketAddr = r["mapped"].as_str().unwrap().parse().unwrap();
            if *kind == NatKind::Symmetric {
                assert_eq!(r["port_allocation"], "random", "{kind:?}: {r}");
            } else if *kind == NatKind::Public {
                assert_eq!(r["port_allocation"], "preserving", "{kind:?}: {r}");
            }
            assert!(mapped.ip().is_ipv4(), "{kind:?}: {r}");
        }

        // A call sends each side's classification with its description (found when the call
        // or listen starts, cached per network): both reports show both.
        let client = |k: NatKind| &rows.iter().find(|(kind, _, _)| *kind == k).unwrap().2;
        let (sym, port) = (client(NatKind::Symmetric), client(NatKind::PortRestricted));
        let call = lab::run_call(sym, port, Duration::from_secs(2), &[]).expect("call");
        let (sym_nat, port_nat) = (&call.caller["nat"], &call.callee["nat"]);
        assert_eq!(
            sym_nat["local"]["mapping"], "address-and-port-dependent",
            "{sym_nat}"
        );
        assert_eq!(
            sym_nat["peer"]["mapping"], "endpoint-independent",
            "{sym_nat}"
        );
        assert_eq!(
            sym_nat["peer"]["filtering"], "address-and-port-dependent",
            "{sym_nat}"
        );
        assert_eq!(port_nat["local"], sym_nat["peer"], "{port_nat}");
        assert_eq!(port_nat["peer"], sym_nat["local"], "{port_nat}");
    });
}
