//! A call end to end over real UDP sockets through a local fleet: invite/accept with trickled
//! candidates via signaling, the connectivity agent's checks, Opus/AES-GCM media on the
//! selected path, recordings on both sides. The workspace must be built first.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use peerlink_api::signaling_client::{HttpApi, SignalSession};
use peerlink_sim::call::{self, CallOptions};
use peerlink_sim::fleet::{Fleet, FleetOptions, relay_stats};

const TEST: Duration = Duration::from_secs(120);

#[tokio::test]
async fn call_connects_directly_on_loopback_and_carries_media_both_ways() {
    tokio::time::timeout(TEST, async {
        let fleet = Fleet::start(FleetOptions::default()).await.unwrap();
        let api = HttpApi::new(&fleet.signaling_url, Duration::from_secs(30)).unwrap();
        for u in ["hana", "ivan"] {
            api.register(u, "password-123").await.unwrap();
        }
        let ta = api.login("hana", "password-123").await.unwrap();
        let tb = api.login("ivan", "password-123").await.unwrap();
        let mut alice = SignalSession::connect(api.clone(), ta, "a", None)
            .await
            .unwrap();
        let mut bob = SignalSession::connect(api.clone(), tb, "b", None)
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let base = CallOptions {
            stun: fleet.stun,
            // Long enough for each side to release its unused relay allocation (3 s after
            // the path settled) and go on with the call.
            duration: Duration::from_secs(5),
            ..CallOptions::default()
        };
        let bob_opts = CallOptions {
            record: Some(dir.path().join("bob.wav")),
            seed: 2,
            ..base.clone()
        };
        let callee = tokio::spawn(async move {
            let r = call::answer_next(
                &mut bob,
                Duration::from_secs(30),
                Duration::from_secs(30),
                &bob_opts,
            )
            .await;
            (r, bob)
        });
        let alice_opts = CallOptions {
            record: Some(dir.path().join("alice.wav")),
            seed: 1,
            ..base
        };
        let ra = call::call(&mut alice, "ivan", &alice_opts)
            .await
            .unwrap_or_else(|e| panic!("caller: {e}"));
        let (rb, _bob) = callee.await.unwrap();
        let rb = rb.unwrap_or_else(|e| panic!("callee: {e}"));
        eprintln!("{}", serde_json::to_string_pretty(&ra).unwrap());
        eprintln!("{}", serde_json::to_string_pretty(&rb).unwrap());

        assert_eq!(ra.role, "caller");
        assert_eq!(rb.role, "callee");
        assert_eq!(ra.call_id, rb.call_id);
        // Loopback host candidates: a direct pair validates.
        assert_eq!(ra.path.as_deref(), Some("direct"), "{ra:?}");
        assert_eq!(rb.path.as_deref(), Some("direct"), "{rb:?}");
        assert!(ra.answer_to_connected_ms.is_some() && ra.answer_to_first_media_ms.is_some());
        for r in [&ra, &rb] {
            // The agent gathered a relayed candidate with signaling-issued TURN credentials.
            assert!(
                r.local_candidates.iter().any(|c| c.starts_with("Relayed")),
                "{r:?}"
            );
            assert!(
                r.checks_sent > 0 && r.checks_to_connected_ms.is_some(),
                "{r:?}"
            );
            // The direct path does not use it: released mid-call, media went on.
            assert_eq!(r.unused_relay_released, 1, "{r:?}");
            assert!(r.media.packets_sent >= 200, "{r:?}");
            assert!(r.media.packets_received >= 100, "{r:?}");
            assert!(r.media.mos > 1.0, "{r:?}");
            let wav = peerlink_sim::media::audio::read_wav(std::path::Path::new(
                r.recording.as_deref().unwrap(),
            ))
            .unwrap();
            assert!(wav.len() >= 48_000 * 2, "{} samples", wav.len());
        }
        assert!(rb.ended.contains("Hangup"), "{}", rb.ended);
        fleet.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn relay_only_call_goes_through_the_relay() {
    tokio::time::timeout(TEST, async {
        let fleet = Fleet::start(FleetOptions::default()).await.unwrap();
        let api = HttpApi::new(&fleet.signaling_url, Duration::from_secs(30)).unwrap();
        for u in ["jill", "kurt"] {
            api.register(u, "password-123").await.unwrap();
        }
        let ta = api.login("jill", "password-123").await.unwrap();
        let tb = api.login("kurt", "password-123").await.unwrap();
        let mut alice = SignalSession::connect(api.clone(), ta, "a", None)
            .await
            .unwrap();
        let mut bob = SignalSession::connect(api.clone(), tb, "b", None)
            .await
            .unwrap();
        let opts = CallOptions {
            stun: fleet.stun,
            duration: Duration::from_secs(2),
            relay_only: true,
            ..CallOptions::default()
        };
        let ob = CallOptions {
            seed: 7,
            ..opts.clone()
        };
        let (ra, rb) = tokio::join!(
            call::call(&mut alice, "kurt", &opts),
            call::answer_next(
                &mut bob,
                Duration::from_secs(30),
                Duration::from_secs(30),
                &ob
            )
        );
        let (ra, rb) = (
            ra.unwrap_or_else(|e| panic!("caller: {e}")),
            rb.unwrap_or_else(|e| panic!("callee: {e}")),
        );
        let relay = fleet.relay.unwrap().turn;
        for r in [&ra, &rb] {
            assert_eq!(r.path.as_deref(), Some("relay"), "{r:?}");
            // Only relayed candidates were signalled.
            assert!(!r.local_candidates.is_empty(), "{r:?}");
            assert!(
                r.local_candidates.iter().all(|c| c.starts_with("Relayed")),
                "{r:?}"
            );
            assert!(r.media.packets_received >= 50, "{r:?}");
        }
        // The relay really carried the media.
        let mut forwarded = 0;
        for _ in 0..40 {
            let st = relay_stats(fleet.relay.unwrap().metrics, Duration::from_secs(10))
                .await
                .unwrap();
            // Media enters the relay either on a relayed socket (from the peer's host socket)
            // or on the listener from a client (relay to relay): count both entry points.
            forwarded = [
                "received_packets_relayed",
                "forwarded_packets_client_to_client",
                "forwarded_packets_client_to_peer",
            ]
            .iter()
            .map(|k| st.counters.get(*k).copied().unwrap_or(0))
            .sum::<u64>();
            if forwarded >= 150 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert!(
            forwarded >= 150,
            "relay {relay} carried only {forwarded} packets"
        );
        fleet.stop().await;
    })
    .await
    .expect("test timed out");
}

/// Dual stack on loopback: signaling's default IPv6 STUN responder (`[::1]`) beside the IPv4
/// one gives each side an IPv6 socket beside its IPv4 one; both families' host pairs validate
/// and the IPv6 one is selected (RFC 8421: `::1` outranks IPv4).
#[tokio::test]
async fn dual_stack_call_on_loopback_prefers_ipv6() {
    tokio::time::timeout(TEST, async {
        let fleet = Fleet::start(FleetOptions::default()).await.unwrap();
        let Some(stun6) = fleet.stun6 else {
            eprintln!("dual_stack_call_on_loopback_prefers_ipv6: skipped, no IPv6 loopback here");
            fleet.stop().await;
            return;
        };
        assert!(stun6.is_ipv6() && stun6.ip().is_loopback(), "{stun6}");
        let api = HttpApi::new(&fleet.signaling_url, Duration::from_secs(30)).unwrap();
        for u in ["lena", "milo"] {
            api.register(u, "password-123").await.unwrap();
        }
        let ta = api.login("lena", "password-123").await.unwrap();
        let tb = api.login("milo", "password-123").await.unwrap();
        let mut a = SignalSession::connect(api.clone(), ta, "a", None)
            .await
            .unwrap();
        let mut b = SignalSession::connect(api.clone(), tb, "b", None)
            .await
            .unwrap();
        let base = CallOptions {
            stun: fleet.stun,
            stun6: Some(stun6),
            duration: Duration::from_secs(2),
            ..CallOptions::default()
        };
        let b_opts = CallOptions {
            seed: 4,
            ..base.clone()
        };
        let callee = tokio::spawn(async move {
            let r = call::answer_next(
                &mut b,
                Duration::from_secs(30),
                Duration::from_secs(30),
                &b_opts,
            )
            .await;
            (r, b)
        });
        let a_opts = CallOptions { seed: 3, ..base };
        let ra = call::call(&mut a, "milo", &a_opts)
            .await
            .unwrap_or_else(|e| panic!("caller: {e}"));
        let (rb, _b) = callee.await.unwrap();
        let rb = rb.unwrap_or_else(|e| panic!("callee: {e}"));
        for r in [&ra, &rb] {
            assert_eq!(r.path.as_deref(), Some("direct"), "{r:?}");
            assert_eq!(r.family.as_deref(), Some("ipv6"), "{r:?}");
            let local: std::net::SocketAddr = r.local.as_deref().unwrap().parse().unwrap();
            assert!(local.is_ipv6() && local.ip().is_loopback(), "{r:?}");
            for prefix in ["Host 127.0.0.1:", "Host [::1]:"] {
                assert!(
                    r.local_candidates.iter().any(|c| c.starts_with(prefix)),
                    "{prefix} {r:?}"
                );
            }
            assert!(r.media.packets_received >= 50, "{r:?}");
        }
        fleet.stop().await;
    })
    .await
    .expect("test timed out");
}
