//! Faults in the middle of a real call across real NATs: the relay carrying the
//! call is killed, a NAT forgets its mappings (conntrack flush = rebinding), the peer's
//! process vanishes. The services and clients are the real binaries in a netlab lab (see
//! `lab/mod.rs`). The tests assert what happens (the call recovers and runs to its end, or ends
//! saying the peer went away); how long it took (target: path lost -> media again within
//! 3 s) is printed with each report (`max_media_gap_ms`), not asserted.
//!
//! Needs root; `cargo nextest run -p peerlink-sim --test lab_faults`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod lab;

use std::time::{Duration, Instant};

use lab::{Finished, World, field_f64, wait_inbound_udp, with_deadline};
use peerlink_netlab::NatKind;

const DEADLINE: Duration = Duration::from_secs(170);

/// The JSON report of a finished peerlink-sim process, printed under `title`; panics with the
/// lab's logs when there is none.
fn finished_report(world: &World, f: &Finished, title: &str) -> serde_json::Value {
    let v = f
        .report()
        .unwrap_or_else(|e| panic!("{e}\n{}", world.logs()));
    print_report(title, &v);
    v
}

fn print_report(title: &str, v: &serde_json::Value) {
    println!(
        "{title}: path {} end {} ({}) restarts {} max_media_gap_ms {} rx {} path_changes {} \
         signal_reconnects {}",
        v["path"],
        v["end"],
        v["ended"],
        v["restarts"],
        v["max_media_gap_ms"],
        v["media"]["packets_received"],
        v["path_changes"],
        v["signal_reconnects"]
    );
}

#[test]
fn relay_killed_mid_call_media_resumes_on_the_other_relay() {
    if !peerlink_netlab::root_or_skip("relay_killed_mid_call_media_resumes_on_the_other_relay") {
        return;
    }
    with_deadline(DEADLINE, || {
        let mut world = World::start();
        let ra = world.router(NatKind::Symmetric);
        let rb = world.router(NatKind::Symmetric);
        let caller = world.client(&ra, "a", "relay-kill-a");
        let callee = world.client(&rb, "b", "relay-kill-b");
        let listener = callee.listen(&[]);
        caller
            .wait_online(&callee.user, Duration::from_secs(60))
            .unwrap();
        let base: Vec<u64> = world.relays.iter().map(|r| r.forwarded()).collect();
        let mut call = caller.call(&callee.user, Duration::from_secs(12), &[]);

        // Media flowing through the relays (symmetric <-> symmetric has no direct path).
        let deadline = Instant::now() + Duration::from_secs(60);
        let grown = loop {
            let now: Vec<u64> = world.relays.iter().map(|r| r.forwarded()).collect();
            let grown: Vec<u64> = now.iter().zip(&base).map(|(n, b)| n - b).collect();
            if grown.iter().sum::<u64>() >= 150 {
                break grown;
            }
            assert!(
                call.exited().is_none(),
                "call ended before relayed media flowed"
            );
            assert!(
                Instant::now() < deadline,
                "no relayed media: {grown:?}\n{}",
                world.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let victim = usize::from(grown[1] > grown[0]);
        let survivor = 1 - victim;
        let survivor_before = world.relays[survivor].forwarded();
        println!(
            "relayed media: {grown:?} packets per relay; killing relay {}",
            world.relays[victim].turn
        );
        world.relays[victim].kill();

        let fc = call.wait(Duration::from_secs(90));
        let fl = listener.wait(Duration::from_secs(20));
        let survivor_after = world.relays[survivor].forwarded();
        let a = finished_report(&world, &fc, "caller");
        let b = finished_report(&world, &fl, "callee");
        println!(
            "surviving relay forwarded {} packets after the kill",
            survivor_after - survivor_before
        );
        assert_eq!(a["end"], "hangup", "the call must run to its end: {a}");
        assert_eq!(a["path"], "relay", "{a}");
        assert!(field_f64(&a, "restarts") >= 1.0, "no ICE restart: {a}");
        assert_eq!(b["end"], "peer_hangup", "{b}");
        assert!(
            survivor_after - survivor_before >= 150,
            "the surviving relay carried only {} packets after the kill",
            survivor_after - survivor_before
        );
    });
}

/// A symmetric NAT (caller side) forgets its mappings mid-call: everything after the flush
/// leaves on a new random port. `full`: `conntrack -F` (TCP translations too, so the
/// signaling WebSocket through that NAT breaks as well); else UDP only.
fn rebinding(full: bool, tag: &str) {
    let world = World::start();
    let ra = world.router(NatKind::Symmetric);
    let rb = world.router(NatKind::FullCone);
    let caller = world.client(&ra, "a", &format!("{tag}-a"));
    let callee = world.client(&rb, "b", &format!("{tag}-b"));
    let listener = callee.listen(&[]);
    caller
        .wait_online(&callee.user, Duration::from_secs(60))
        .unwrap();
    let (base, _) = ra.udp_forwarded().unwrap();
    let mut call = caller.call(&callee.user, Duration::from_secs(10), &[]);
    let before = wait_inbound_udp(&ra, base, 150, Duration::from_secs(60), &mut call).unwrap();
    if full {
        ra.flush_nat().unwrap();
    } else {
        ra.flush_udp_nat().unwrap();
    }
    println!(
        "flushed {ra:?} ({}) after {} inbound datagrams",
        if full { "conntrack -F" } else { "UDP only" },
        before - base
    );

    let fc = call.wait(Duration::from_secs(90));
    let fl = listener.wait(Duration::from_secs(20));
    let (after, _) = ra.udp_forwarded().unwrap();
    let a = finished_report(&world, &fc, "caller");
    let b = finished_report(&world, &fl, "callee");
    println!(
        "inbound datagrams through the symmetric NAT after the flush: {}",
        after - before
    );
    assert_eq!(a["end"], "hangup", "the call must run to its end: {a}");
    if full {
        // conntrack -F also reset the caller's WebSocket to signaling: the call went on
        // through a reopened session (the hangup at the end went through it).
        assert!(
            a["signal_reconnects"].as_u64() >= Some(1),
            "the caller's signaling was never reopened: {a}"
        );
    }
    assert_eq!(b["end"], "peer_hangup", "{b}");
    assert!(
        after - before >= 150,
        "little media reached the caller after the flush"
    );
}

#[test]
fn nat_udp_rebinding_mid_call_recovers_and_the_call_completes() {
    if !peerlink_netlab::root_or_skip("nat_udp_rebinding_mid_call_recovers_and_the_call_completes")
    {
        return;
    }
    with_deadline(DEADLINE, || rebinding(false, "rebind-udp"));
}

#[test]
fn nat_conntrack_flush_mid_call_recovers_and_the_call_completes() {
    if !peerlink_netlab::root_or_skip(
        "nat_conntrack_flush_mid_call_recovers_and_the_call_completes",
    ) {
        return;
    }
    with_deadline(DEADLINE, || rebinding(true, "rebind-all"));
}

#[test]
fn callee_killed_mid_call_caller_ends_with_a_reason_within_consent_timeout() {
    if !peerlink_netlab::root_or_skip(
        "callee_killed_mid_call_caller_ends_with_a_reason_within_consent_timeout",
    ) {
        return;
    }
    with_deadline(DEADLINE, || {
        let world = World::start();
        let ra = world.router(NatKind::FullCone);
        let rb = world.router(NatKind::PortRestricted);
        let caller = world.client(&ra, "a", "vanish-a");
        let callee = world.client(&rb, "b", "vanish-b");
        let mut listener = callee.listen(&[]);
        caller
            .wait_online(&callee.user, Duration::from_secs(60))
            .unwrap();
        let (base, _) = ra.udp_forwarded().unwrap();
        let mut call = caller.call(&callee.user, Duration::from_secs(60), &[]);
        wait_inbound_udp(&ra, base, 150, Duration::from_secs(60), &mut call).unwrap();
        listener.kill();
        let killed = Instant::now();
        let fc = call.wait(Duration::from_secs(30));
        let took = killed.elapsed();
        let a = finished_report(&world, &fc, "caller");
        println!(
            "caller ended {:.2} s after the callee was killed",
            took.as_secs_f64()
        );
        // The call was placed for 60 s of media and waited for at most 30: it ended early, and
        // its end says the peer went away (how long that took is printed, not asserted).
        assert!(fc.status.is_some(), "the caller did not end: {a}");
        let end = a["end"].as_str().unwrap_or_default();
        assert!(
            matches!(end, "peer_ended" | "consent_expired"),
            "end {end:?} does not say the peer went away: {a}"
        );
        assert!(!a["ended"].as_str().unwrap_or_default().is_empty(), "{a}");
        drop(listener.wait(Duration::ZERO));
    });
}
