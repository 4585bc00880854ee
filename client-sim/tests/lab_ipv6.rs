//! Dual stack with the real client and services in a netlab lab whose internet carries IPv6
//! (`2001:db8::/64`, routed LANs without NAT66) beside IPv4 (documentation ranges, NATs):
//!
//! * both hosts dual stack, IPv4 behind symmetric NATs (IPv4 alone would need the relay):
//!   the call goes direct over IPv6 and the reports name an IPv6 pair between the hosts'
//!   global addresses; each side gathered relayed candidates of both families;
//! * an IPv6-only host calls an IPv4-only host behind a NAT: no direct pair can exist, and the
//!   call connects through the IPv6 relayed address the IPv4-only side allocated (its second
//!   allocation, REQUESTED-ADDRESS-FAMILY IPv6), which the IPv6-only side reaches straight.
//!
//! The services run with their defaults plus the lab's addresses (`World::start_dual_stack`).
//! Needs root (network namespaces); otherwise each test prints one "skipped" line and returns.
//! `cargo nextest run -p peerlink-sim --test lab_ipv6`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod lab;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use lab::{RELAY_IPS6, World, run_call, with_deadline};
use peerlink_netlab::{ExpectedPath, NatKind, expected_path};
use serde_json::Value;

/// Media duration of each call.
const CALL: Duration = Duration::from_secs(3);
/// Whole-test bound.
const DEADLINE: Duration = Duration::from_secs(170);

fn addr(r: &Value, key: &str) -> SocketAddr {
    r[key]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("report lacks `{key}`: {r}"))
}

fn candidates(r: &Value) -> Vec<String> {
    r["local_candidates"]
        .as_array()
        .unwrap_or_else(|| panic!("report lacks local_candidates: {r}"))
        .iter()
        .filter_map(|c| c.as_str().map(str::to_owned))
        .collect()
}

fn media_received(r: &Value) -> u64 {
    r["media"]["packets_received"].as_u64().unwrap_or(0)
}

#[test]
fn dual_stack_hosts_behind_symmetric_nats_call_direct_over_ipv6() {
    if !peerlink_netlab::root_or_skip(
        "dual_stack_hosts_behind_symmetric_nats_call_direct_over_ipv6",
    ) {
        return;
    }
    // Over IPv4 alone this pair goes through the relay.
    assert_eq!(
        expected_path(NatKind::Symmetric, NatKind::Symmetric),
        ExpectedPath::Relay
    );
    with_deadline(DEADLINE, || {
        let world = World::start_dual_stack();
        let ra = world.lab.add_nat_dual_stack(NatKind::Symmetric).unwrap();
        let rb = world.lab.add_nat_dual_stack(NatKind::Symmetric).unwrap();
        let a = world.client(&ra, "dual-a", "dual-alice");
        let b = world.client(&rb, "dual-b", "dual-bob");
        let out = run_call(&a, &b, CALL, &[]).unwrap_or_else(|e| panic!("{e}\n{}", world.logs()));
        for (who, r, me, peer) in [
            ("caller", &out.caller, &a, &b),
            ("callee", &out.callee, &b, &a),
        ] {
            assert_eq!(r["path"], "direct", "{who}: {r}");
            assert_eq!(r["family"], "ipv6", "{who}: {r}");
            let (local, remote) = (addr(r, "local"), addr(r, "remote"));
            assert_eq!(local.ip(), IpAddr::from(me.host.ip6().unwrap()), "{who}");
            assert_eq!(remote.ip(), IpAddr::from(peer.host.ip6().unwrap()), "{who}");
            assert!(media_received(r) > 0, "{who} heard nothing: {r}");
            let cands = candidates(r);
            let has = |kind: &str, v6: bool| {
                cands.iter().any(|c| {
                    c.split_once(' ').is_some_and(|(k, a)| {
                        k == kind && a.parse::<SocketAddr>().is_ok_and(|a| a.is_ipv6() == v6)
                    })
                })
            };
            for (kind, v6) in [
                ("Host", true),
                ("Host", false),
                ("ServerReflexive", false),
                ("Relayed", false),
                ("Relayed", true),
            ] {
                assert!(has(kind, v6), "{who} has no {kind} v6={v6}: {cands:?}");
            }
        }
        eprintln!(
            "dual stack behind symmetric NATs: {} {} {} -> {}, answer->connected {} ms",
            out.caller["path"],
            out.caller["family"],
            out.caller["local"],
            out.caller["remote"],
            out.caller["answer_to_connected_ms"]
        );
    });
}

#[test]
fn ipv6_only_host_calls_ipv4_only_host_through_the_relay() {
    if !peerlink_netlab::root_or_skip("ipv6_only_host_calls_ipv4_only_host_through_the_relay") {
        return;
    }
    with_deadline(DEADLINE, || {
        let world = World::start_dual_stack();
        let r4 = world.router(NatKind::PortRestricted);
        let v4 = world.client(&r4, "v4only", "v4-bob");
        assert_eq!(v4.host.ip6(), None);
        let v6 = world.client_v6_only("v6only", "v6-alice", "2001:db8::30".parse().unwrap());
        let out = run_call(&v6, &v4, CALL, &[]).unwrap_or_else(|e| panic!("{e}\n{}", world.logs()));
        let relay6: Vec<IpAddr> = RELAY_IPS6.iter().map(|&ip| ip.into()).collect();
        // The IPv6-only caller sends from its own address to the callee's IPv6 relayed one.
        let c = &out.caller;
        assert_eq!(c["path"], "relay", "{c}");
        assert_eq!(c["family"], "ipv6", "{c}");
        assert_eq!(addr(c, "local").ip(), IpAddr::from(v6.host.ip6().unwrap()));
        assert!(relay6.contains(&addr(c, "remote").ip()), "{c}");
        // The IPv4-only callee reaches the relay over IPv4 and sends from that relayed address.
        let e = &out.callee;
        assert_eq!(e["path"], "relay", "{e}");
        assert_eq!(e["family"], "ipv6", "{e}");
        assert!(relay6.contains(&addr(e, "local").ip()), "{e}");
        assert_eq!(addr(e, "remote").ip(), IpAddr::from(v6.host.ip6().unwrap()));
        assert!(
            candidates(e).iter().all(|c| !c.starts_with("Host [")),
            "an IPv4-only host has no IPv6 host candidate: {e}"
        );
        assert!(media_received(c) > 0 && media_received(e) > 0, "{c}\n{e}");
        eprintln!(
            "IPv6-only -> IPv4-only: caller {} -> {}, callee {} -> {}, answer->first media {} ms",
            c["local"], c["remote"], e["local"], e["remote"], c["answer_to_first_media_ms"]
        );
    });
}
