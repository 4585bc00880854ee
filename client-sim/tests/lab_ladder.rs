//! The TURN fallback ladder across UDP-hostile networks, with the real client and services in
//! a netlab lab (relays listening for TURN over UDP and TCP on 3478 and over TLS on 443):
//!
//! * the caller's router drops every UDP datagram from its LAN: the call connects through a
//!   TURN allocation over TCP, and the caller's report says so;
//! * the caller's router lets only TCP to 443 out (and to signaling's port 8443, or the
//!   client could not log in): the call connects through TURN over TLS on 443;
//! * both routers drop all UDP: both sides relay over TCP, and the media crosses between
//!   their two allocations.
//!
//! Otherwise the callee sits behind an ordinary port-restricted NAT. Each test checks both reports,
//! the ladder's rungs, that media flowed, and that no UDP left the caller's LAN.
//!
//! Needs root (network namespaces); otherwise each test prints one "skipped" line and returns.
//! `cargo nextest run -p peerlink-sim --test lab_ladder`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod lab;

use std::time::Duration;

use lab::{CallOutcome, World, run_call, with_deadline};
use peerlink_netlab::{Egress, LinkConditions, NatKind};
use serde_json::Value;

/// Media duration of each call.
const CALL: Duration = Duration::from_secs(4);
/// Whole-test bound.
const DEADLINE: Duration = Duration::from_secs(150);
/// Signaling's HTTP port in the lab (the client must reach it to log in and call).
const SIGNALING_PORT: u16 = 8443;

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// A call from behind a router with `egress` to a port-restricted NAT with `callee_egress`;
/// checks what both sides report and returns the outcome and the UDP datagrams that left the
/// caller's LAN.
fn hostile_call(egress: Egress, callee_egress: Egress, tag: &str) -> (CallOutcome, u64) {
    let world = World::start();
    let hostile = world
        .lab
        .add_nat_with(
            NatKind::PortRestricted,
            LinkConditions {
                egress,
                ..Default::default()
            },
        )
        .expect("hostile router");
    let open = world
        .lab
        .add_nat_with(
            NatKind::PortRestricted,
            LinkConditions {
                egress: callee_egress,
                ..Default::default()
            },
        )
        .expect("callee router");
    let caller = world.client(&hostile, &format!("{tag}c"), &format!("{tag}-caller"));
    let callee = world.client(&open, &format!("{tag}e"), &format!("{tag}-callee"));
    let out = run_call(&caller, &callee, CALL, &[]).unwrap_or_else(|e| panic!("{e}"));
    let (_, udp_out) = hostile.udp_forwarded().expect("router counters");
    for (side, rep) in [("caller", &out.caller), ("callee", &out.callee)] {
        assert_eq!(rep["path"], "relay", "{side}: {rep}");
        let rx = rep["media"]["packets_received"].as_u64().unwrap_or(0);
        // 4 s at 50 packets/s; allow for start-up and the last frames in flight.
        assert!(rx >= 120, "{side} received only {rx} media packets: {rep}");
        assert!(
            rep["answer_to_connected_ms"].as_f64().is_some(),
            "{side}: no setup time: {rep}"
        );
    }
    assert_eq!(out.caller["end"], "hangup", "{}", out.caller);
    assert_eq!(out.caller["call_id"], out.callee["call_id"]);
    if callee_egress == Egress::Open {
        // The callee reaches the caller's relay over plain UDP.
        assert_eq!(out.callee["transport"], "udp", "{}", out.callee);
    }
    println!(
        "{tag}: caller transport {} (relay {}), answer -> connected {:.0} ms, mos {:.2}; ladder {:?}",
        out.caller["transport"],
        out.caller["relay_transport"],
        out.caller["answer_to_connected_ms"]
            .as_f64()
            .unwrap_or(-1.0),
        out.caller["media"]["mos"].as_f64().unwrap_or(0.0),
        strs(&out.caller["turn_attempts"])
    );
    (out, udp_out)
}

#[test]
fn udp_blocked_call_connects_over_turn_tcp() {
    if !peerlink_netlab::root_or_skip("udp_blocked_call_connects_over_turn_tcp") {
        return;
    }
    with_deadline(DEADLINE, || {
        let (out, udp_out) = hostile_call(Egress::NoUdp, Egress::Open, "noudp");
        let c = &out.caller;
        assert_eq!(udp_out, 0, "UDP left the blocked LAN");
        assert_eq!(c["transport"], "tcp", "{c}");
        assert_eq!(c["relay_transport"], "tcp", "{c}");
        let ladder = strs(&c["turn_attempts"]);
        assert!(
            ladder
                .first()
                .is_some_and(|r| r.starts_with("udp ") && r.ends_with("no answer")),
            "UDP first, unanswered: {ladder:?}"
        );
        assert!(
            ladder
                .last()
                .is_some_and(|r| r.starts_with("tcp ") && r.ends_with("allocated")),
            "TCP allocated last: {ladder:?}"
        );
        assert!(
            !ladder.iter().any(|r| r.starts_with("tls ")),
            "TLS not needed: {ladder:?}"
        );
    });
}

#[test]
fn only_tcp_443_call_connects_over_turn_tls() {
    if !peerlink_netlab::root_or_skip("only_tcp_443_call_connects_over_turn_tls") {
        return;
    }
    with_deadline(DEADLINE, || {
        let (out, udp_out) = hostile_call(
            Egress::TcpPorts(&[lab::TLS_PORT, SIGNALING_PORT]),
            Egress::Open,
            "https",
        );
        let c = &out.caller;
        assert_eq!(udp_out, 0, "UDP left the LAN");
        assert_eq!(c["transport"], "tls", "{c}");
        assert_eq!(c["relay_transport"], "tls", "{c}");
        let ladder = strs(&c["turn_attempts"]);
        let first = |t: &str| ladder.iter().position(|r| r.starts_with(t));
        assert!(
            first("udp ") < first("tcp ") && first("tcp ") < first("tls "),
            "UDP, then TCP, then TLS: {ladder:?}"
        );
        assert!(
            ladder.last().is_some_and(|r| r.starts_with("tls ")
                && r.contains(":443 ")
                && r.ends_with("allocated")),
            "TLS on 443 allocated last: {ladder:?}"
        );
    });
}

#[test]
fn both_sides_udp_blocked_call_connects_relay_to_relay_over_tcp() {
    if !peerlink_netlab::root_or_skip(
        "both_sides_udp_blocked_call_connects_relay_to_relay_over_tcp",
    ) {
        return;
    }
    with_deadline(DEADLINE, || {
        let (out, udp_out) = hostile_call(Egress::NoUdp, Egress::NoUdp, "both");
        assert_eq!(udp_out, 0, "UDP left the caller's LAN");
        for (side, rep) in [("caller", &out.caller), ("callee", &out.callee)] {
            assert_eq!(rep["transport"], "tcp", "{side}: {rep}");
        }
    });
}
