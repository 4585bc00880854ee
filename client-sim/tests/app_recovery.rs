//! Call recovery over real processes on loopback: the relay carrying a relay-only call is
//! killed with SIGKILL mid-call (the call must continue through the other relay after an ICE
//! restart), the callee vanishes (the caller must end on consent expiry), and allocations do
//! not outlive the call. The workspace must be built first.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use peerlink_sim::call::{self, CallEvent, CallOptions};
use peerlink_sim::fleet::{Fleet, FleetOptions, relay_stats};
use peerlink_sim::signal_client::{HttpApi, SignalSession};
use tokio::sync::mpsc;

const TEST: Duration = Duration::from_secs(150);

async fn two_users(fleet: &Fleet, a: &str, b: &str) -> (SignalSession, SignalSession) {
    let api = HttpApi::new(&fleet.signaling_url, Duration::from_secs(30)).unwrap();
    for u in [a, b] {
        api.register(u, "password-123").await.unwrap();
    }
    let ta = api.login(a, "password-123").await.unwrap();
    let tb = api.login(b, "password-123").await.unwrap();
    let sa = SignalSession::connect(api.clone(), ta, "a", None)
        .await
        .unwrap();
    let sb = SignalSession::connect(api, tb, "b", None).await.unwrap();
    (sa, sb)
}

/// Waits (bounded) for the first selected path of a call.
async fn first_path(rx: &mut mpsc::UnboundedReceiver<CallEvent>) {
    tokio::time::timeout(Duration::from_secs(40), async {
        while let Some(ev) = rx.recv().await {
            if let CallEvent::Path { first: true, .. } = ev {
                return;
            }
        }
        panic!("event channel closed before a path was selected");
    })
    .await
    .expect("no path selected in time");
}

async fn allocations(metrics: std::net::SocketAddr) -> u64 {
    relay_stats(metrics, Duration::from_secs(10))
        .await
        .unwrap()
        .allocations_active
}

/// Polls (bounded) until the relay reports no active allocation.
async fn wait_no_allocations(metrics: std::net::SocketAddr) -> u64 {
    let mut n = u64::MAX;
    for _ in 0..40 {
        n = allocations(metrics).await;
        if n == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    n
}

#[tokio::test]
async fn relay_killed_mid_call_call_continues_through_the_other_relay() {
    tokio::time::timeout(TEST, async {
        let mut fleet = Fleet::start(FleetOptions {
            extra_relays: 1,
            ..FleetOptions::default()
        })
        .await
        .unwrap();
        assert_eq!(fleet.relays.len(), 2);
        let (mut alice, mut bob) = two_users(&fleet, "rita", "sven").await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let opts = CallOptions {
            stun: fleet.stun,
            duration: Duration::from_secs(9),
            relay_only: true,
            seed: 11,
            events: Some(tx),
            ..CallOptions::default()
        };
        let ob = CallOptions {
            seed: 12,
            events: None,
            ..opts.clone()
        };
        let relays = fleet.relays.clone();
        let killer = async {
            first_path(&mut rx).await;
            // Let media flow a moment, then crash the relay that holds the allocations.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let mut victim = None;
            for r in &relays {
                if allocations(r.metrics).await > 0 {
                    victim = Some(*r);
                    break;
                }
            }
            let victim = victim.expect("no relay holds the call's allocations");
            assert!(fleet.kill_relay(victim.turn).await, "kill relay");
            victim
        };
        let (ra, rb, victim) = tokio::join!(
            call::call(&mut alice, "sven", &opts),
            call::answer_next(
                &mut bob,
                Duration::from_secs(30),
                Duration::from_secs(60),
                &ob
            ),
            killer
        );
        let (ra, rb) = (
            ra.unwrap_or_else(|e| panic!("caller: {e}")),
            rb.unwrap_or_else(|e| panic!("callee: {e}")),
        );
        eprintln!("{}", serde_json::to_string_pretty(&ra).unwrap());
        eprintln!("{}", serde_json::to_string_pretty(&rb).unwrap());
        let mut restarted = false;
        while let Ok(ev) = rx.try_recv() {
            restarted |= matches!(ev, CallEvent::Restarted { .. });
        }
        assert!(restarted, "the caller never restarted");
        assert_eq!(ra.end, "hangup", "{ra:?}");
        assert_eq!(rb.end, "peer_hangup", "{rb:?}");
        assert!(ra.restarts >= 1 && rb.restarts >= 1, "{ra:?} {rb:?}");
        for r in [&ra, &rb] {
            assert_eq!(r.path.as_deref(), Some("relay"), "{r:?}");
            // Media stopped when the relay died and resumed: the longest gap is the outage,
            // measured between two accepted packets, so packets came after it.
            assert!(
                r.max_media_gap_ms >= 300.0 && r.max_media_gap_ms <= 3000.0,
                "media gap {} ms",
                r.max_media_gap_ms
            );
            assert!(r.media.packets_received >= 200, "{r:?}");
        }
        // The surviving relay carried the rest of the call, and both allocations on it were
        // released at the end.
        let survivor = relays.iter().find(|r| r.turn != victim.turn).unwrap();
        let st = relay_stats(survivor.metrics, Duration::from_secs(10))
            .await
            .unwrap();
        let created = st.counters.get("allocations_created").copied();
        assert!(created >= Some(2), "{st:?}");
        assert!(
            st.counters.get("allocations_deleted").copied() >= Some(2),
            "allocations not released by LIFETIME 0: {st:?}"
        );
        assert_eq!(wait_no_allocations(survivor.metrics).await, 0);
        fleet.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn callee_vanishes_caller_ends_on_consent_expiry() {
    tokio::time::timeout(TEST, async {
        let fleet = Fleet::start(FleetOptions::default()).await.unwrap();
        let (mut alice, mut bob) = two_users(&fleet, "tina", "umar").await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let opts = CallOptions {
            stun: fleet.stun,
            duration: Duration::from_secs(60),
            seed: 21,
            ..CallOptions::default()
        };
        let ob = CallOptions {
            seed: 22,
            events: Some(tx),
            ..opts.clone()
        };
        let callee = async {
            let run = call::answer_next(
                &mut bob,
                Duration::from_secs(30),
                Duration::from_secs(60),
                &ob,
            );
            // The callee's process "dies" for the media path: its call (socket, agent) is
            // dropped while its signaling session stays up, so only consent can tell.
            tokio::select! {
                r = run => panic!("callee ended on its own: {r:?}"),
                () = async {
                    first_path(&mut rx).await;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                } => {}
            }
            Instant::now()
        };
        let (ra, vanished_at) = tokio::join!(call::call(&mut alice, "umar", &opts), callee);
        let ended_after = vanished_at.elapsed();
        let ra = ra.unwrap_or_else(|e| panic!("caller: {e}"));
        eprintln!("{}", serde_json::to_string_pretty(&ra).unwrap());
        assert_eq!(ra.end, "consent_expired", "{ra:?}");
        assert!(ra.ended.starts_with("consent expired"), "{}", ra.ended);
        assert!(ra.restarts >= 1, "{ra:?}");
        // 5 s of silence plus slack for a loaded machine; well under the 60 s duration.
        assert!(
            ended_after >= Duration::from_secs(4) && ended_after <= Duration::from_secs(9),
            "ended {ended_after:?} after the callee vanished"
        );
        // The caller released its relay allocation (the callee's, never closed, remains).
        let metrics = fleet.relay.unwrap().metrics;
        let mut active = u64::MAX;
        for _ in 0..40 {
            active = allocations(metrics).await;
            if active <= 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert!(active <= 1, "{active} allocations left");
        fleet.stop().await;
    })
    .await
    .expect("test timed out");
}
