//! Bad media input during a real call on loopback: garbage, packets encrypted with a wrong
//! key, replays of a real packet (all "from" the caller's address, sent through a raw socket
//! with the caller's source port) and packets from an unknown source are injected at the
//! callee's call socket. They must be dropped and counted, never played.
//!
//! Needs CAP_NET_RAW (root) for the raw socket; the workspace must be built first.
#![allow(clippy::unwrap_used)]

use std::io::Read as _;
use std::net::{SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use peerlink_sim::call::{self, CallEvent, CallOptions};
use peerlink_sim::fleet::{Fleet, FleetOptions};
use peerlink_sim::media::{KeyExchange, MediaConfig, MediaSession, Role};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::mpsc;

mod common;

const TEST: Duration = Duration::from_secs(120);

fn v4(a: SocketAddr) -> SocketAddrV4 {
    match a {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(_) => panic!("loopback IPv4 expected, got {a}"),
    }
}

/// A UDP datagram `from` -> `to` built by hand (the kernel adds the IP header with source
/// 127.0.0.1; checksum 0 = none, allowed for IPv4).
fn udp(from: SocketAddrV4, to: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(8 + payload.len()).unwrap();
    let mut v = Vec::with_capacity(8 + payload.len());
    v.extend_from_slice(&from.port().to_be_bytes());
    v.extend_from_slice(&to.port().to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(&[0, 0]);
    v.extend_from_slice(payload);
    v
}

/// Captures (bounded) one media datagram `from` -> `to` off a raw UDP socket.
fn capture_media(raw: &Socket, from: SocketAddrV4, to: SocketAddrV4) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = vec![0u8; 2048];
    let mut r: &Socket = raw;
    while Instant::now() < deadline {
        let Ok(n) = r.read(&mut buf) else { continue };
        let pkt = &buf[..n];
        // IPv4 header (IHL words), then UDP.
        let Some(&vihl) = pkt.first() else { continue };
        let ihl = usize::from(vihl & 0x0f) * 4;
        if n < ihl + 9 || pkt[12..16] != from.ip().octets() || pkt[16..20] != to.ip().octets() {
            continue;
        }
        let udp = &pkt[ihl..];
        let sport = u16::from_be_bytes([udp[0], udp[1]]);
        let dport = u16::from_be_bytes([udp[2], udp[3]]);
        if sport == from.port() && dport == to.port() && (128..=191).contains(&udp[8]) {
            return udp[8..].to_vec();
        }
    }
    panic!("no media packet {from} -> {to} captured");
}

#[tokio::test]
async fn garbage_wrong_key_replays_and_strangers_are_dropped_and_counted() {
    tokio::time::timeout(TEST, async {
        let fleet = Fleet::start(FleetOptions::default()).await.unwrap();
        let (mut alice, mut bob) = common::two_users(&fleet, "vera", "walt").await;
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let opts = CallOptions {
            stun: fleet.stun,
            duration: Duration::from_secs(5),
            use_turn: false,
            seed: 31,
            ..CallOptions::default()
        };
        let ob = CallOptions {
            seed: 32,
            record: Some(dir.path().join("bob.wav")),
            events: Some(tx),
            ..opts.clone()
        };
        let injector = async {
            let path = tokio::time::timeout(Duration::from_secs(40), async {
                loop {
                    match rx.recv().await {
                        Some(CallEvent::Path { path, first: true }) => return path,
                        Some(_) => {}
                        None => panic!("callee events closed"),
                    }
                }
            })
            .await
            .expect("callee never connected");
            let (callee, caller) = (v4(path.local), v4(path.remote));
            let counts = tokio::task::spawn_blocking(move || {
                let raw = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::UDP))
                    .expect("raw socket (needs CAP_NET_RAW)");
                raw.set_read_timeout(Some(Duration::from_millis(200)))
                    .unwrap();
                let real = capture_media(&raw, caller, callee);
                std::thread::sleep(Duration::from_millis(500));
                let dst = SocketAddr::V4(callee).into();
                let send = |payload: &[u8]| {
                    raw.send_to(&udp(caller, callee, payload), &dst).unwrap();
                };
                // Garbage: a first byte nobody owns, and "RTP" too short to parse.
                for i in 0..5u8 {
                    send(&[0x20, i, 1, 2, 3, 4, 5, 6]);
                    send(&[0x80, i, 7]);
                }
                // Well-formed media under a key from another exchange.
                let mut rng = rand::rng();
                let (a, b) = (
                    KeyExchange::generate(&mut rng),
                    KeyExchange::generate(&mut rng),
                );
                let keys = a
                    .derive(&b.public_key(), Role::Caller, b"other call")
                    .unwrap();
                let now = Instant::now();
                let mut m =
                    MediaSession::new(&MediaConfig::default(), keys, now, &mut rng).unwrap();
                let mut wrong = 0;
                for i in 0..20u32 {
                    let t = now + Duration::from_millis(20 * u64::from(i));
                    if let Some(p) = m.send_frame(t, &[1000i16; 960]).unwrap() {
                        send(&p);
                        wrong += 1;
                    }
                }
                // Replays of a real packet of this call.
                for _ in 0..5 {
                    send(&real);
                }
                wrong
            })
            .await
            .unwrap();
            // A stranger (no candidate pair has its address) sends media-looking bytes.
            let stranger = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            for _ in 0..5 {
                stranger
                    .send_to(
                        &[0x80, 0x78, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 9, 9],
                        path.local,
                    )
                    .await
                    .unwrap();
            }
            counts
        };
        let (ra, rb, wrong) = tokio::join!(
            call::call(&mut alice, "walt", &opts),
            call::answer_next(
                &mut bob,
                Duration::from_secs(30),
                Duration::from_secs(60),
                &ob
            ),
            injector
        );
        let (ra, rb) = (
            ra.unwrap_or_else(|e| panic!("caller: {e}")),
            rb.unwrap_or_else(|e| panic!("callee: {e}")),
        );
        eprintln!("{}", serde_json::to_string_pretty(&rb.media).unwrap());
        assert!(wrong >= 10, "only {wrong} wrong-key packets made");
        let m = &rb.media;
        assert!(m.dropped_garbage >= 10, "{m:?}");
        assert!(m.dropped_auth >= wrong, "{m:?}");
        assert!(m.dropped_replay >= 5, "{m:?}");
        assert!(m.dropped_unknown_source >= 5, "{m:?}");
        // The caller got nothing injected: its counters stay at zero.
        let c = &ra.media;
        assert_eq!(
            (
                c.dropped_garbage,
                c.dropped_auth,
                c.dropped_replay,
                c.dropped_unknown_source
            ),
            (0, 0, 0, 0),
            "{c:?}"
        );
        // Nothing injected was played: the callee accepted no more media packets than the
        // caller sent, and the call ended normally.
        assert!(
            m.packets_received <= ra.media.packets_sent,
            "received {} > sent {}",
            m.packets_received,
            ra.media.packets_sent
        );
        assert_eq!(rb.end, "peer_hangup", "{rb:?}");
        assert!(m.packets_received >= 150, "{m:?}");
        fleet.stop().await;
    })
    .await
    .expect("test timed out");
}
