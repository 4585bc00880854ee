//! The agent's TURN ladder, sans-IO on a virtual clock: UDP first, then TCP, then TLS, with a
//! fake TURN server answering over the stream (the agent's [`StreamOp`]s are the driver's job).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use peerlink_client_core::agent::{
    Agent, AgentConfig, CandidateKind, Event, Role, StreamOp, TURN_TRANSPORT_STEP, TurnConfig,
    TurnOutcome, TurnTransport,
};
use peerlink_proto::attrs::{
    ErrorCode, Lifetime, Nonce, Realm, XorMappedAddress, XorRelayedAddress,
};
use peerlink_proto::{Class, Message, MessageBuilder};

const REALM: &str = "peerlink.test";
const RELAYED: &str = "203.0.113.10:50000";

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn relay(server: &str, transport: TurnTransport) -> TurnConfig {
    TurnConfig {
        server: sa(server),
        transport,
        username: "1700000000:alice".into(),
        password: "pw".into(),
    }
}

/// The three rungs of one relay, in the order signaling lists them (per relay).
fn agent(t0: Instant) -> Agent {
    let mut cfg = AgentConfig::new(Role::Controlling, "ufA", "password-aaaaaaaaaaaaaaaaaa", 5);
    let mut list = vec![
        relay("203.0.113.10:3478", TurnTransport::Udp),
        relay("203.0.113.10:3478", TurnTransport::Tcp),
        relay("203.0.113.10:443", TurnTransport::Tls),
    ];
    cfg.turn = Some(list.remove(0));
    cfg.turn_alternates = list;
    Agent::new(cfg, &[sa("100.64.1.2:5000")], t0)
}

fn ops(a: &mut Agent) -> Vec<StreamOp> {
    std::iter::from_fn(|| a.poll_stream_op()).collect()
}

/// Runs the agent's timers up to `until` in 10 ms steps, dropping its datagrams (UDP blocked).
fn run_until(a: &mut Agent, from: Instant, until: Instant) -> usize {
    let mut dropped = 0;
    let mut now = from;
    while now < until {
        now += Duration::from_millis(10);
        if a.poll_timeout().is_some_and(|t| t <= now) {
            a.handle_timeout(now);
        }
        while a.poll_transmit().is_some() {
            dropped += 1;
        }
    }
    dropped
}

/// The fake server's answer to the request `req`: 401 with a nonce, or success with a relayed
/// address (signed with the long-term key).
fn answer(req: &[u8]) -> Vec<u8> {
    let m = Message::parse(req).unwrap();
    let mut buf = vec![0u8; 512];
    let authed = m.has_integrity();
    let class = if authed { Class::Success } else { Class::Error };
    let mut b = MessageBuilder::new(
        &mut buf,
        m.message_type().with_class(class),
        m.transaction_id(),
    )
    .unwrap();
    if authed {
        b.add(&XorRelayedAddress(sa(RELAYED))).unwrap();
        b.add(&XorMappedAddress(sa("203.0.113.1:40000"))).unwrap();
        b.add(&Lifetime(600)).unwrap();
        let key = peerlink_proto::auth::long_term_key("1700000000:alice", REALM, "pw");
        b.add_integrity(&key).unwrap();
    } else {
        b.add(&ErrorCode::new(401)).unwrap();
        b.add(&Realm(REALM)).unwrap();
        b.add(&Nonce("nonce-1")).unwrap();
    }
    b.add_fingerprint().unwrap();
    let n = b.finish();
    buf.truncate(n);
    buf
}

#[test]
fn udp_then_tcp_then_tls_and_the_allocation_rides_the_stream() {
    let t0 = Instant::now();
    let mut a = agent(t0);
    assert!(ops(&mut a).is_empty(), "UDP first: no connection yet");
    let tcp = sa("203.0.113.10:3478");
    let tls = sa("203.0.113.10:443");

    // UDP gets no answer: TCP is opened exactly one step after the first Allocate.
    let dropped = run_until(
        &mut a,
        t0,
        t0 + TURN_TRANSPORT_STEP - Duration::from_millis(10),
    );
    assert!(dropped >= 2, "UDP Allocates were sent ({dropped})");
    assert!(ops(&mut a).is_empty(), "not before the step");
    run_until(
        &mut a,
        t0 + TURN_TRANSPORT_STEP - Duration::from_millis(10),
        t0 + TURN_TRANSPORT_STEP,
    );
    let got = ops(&mut a);
    assert_eq!(
        got.first(),
        Some(&StreamOp::Open {
            server: tcp,
            transport: TurnTransport::Tcp
        }),
        "{got:?}"
    );
    assert!(matches!(got.get(1), Some(StreamOp::Write { server, .. }) if *server == tcp));

    // The TCP connection is refused: TLS at once.
    let now = t0 + TURN_TRANSPORT_STEP + Duration::from_millis(5);
    a.handle_stream_closed(now, tcp);
    let got = ops(&mut a);
    assert_eq!(
        got.first(),
        Some(&StreamOp::Open {
            server: tls,
            transport: TurnTransport::Tls
        }),
        "{got:?}"
    );
    let Some(StreamOp::Write { bytes, .. }) = got.get(1) else {
        panic!("no Allocate on TLS: {got:?}");
    };
    // 401 then success, delivered one byte at a time.
    for b in answer(bytes) {
        assert!(a.handle_stream_data(now, tls, &[b]).is_empty());
    }
    let got = ops(&mut a);
    let Some(StreamOp::Write { bytes, .. }) = got.first() else {
        panic!("no authenticated Allocate: {got:?}");
    };
    let resp = answer(bytes);
    let (x, y) = resp.split_at(7);
    a.handle_stream_data(now, tls, x);
    a.handle_stream_data(now, tls, y);
    let mut relayed = None;
    while let Some(ev) = a.poll_event() {
        if let Event::LocalCandidate(c) = ev {
            assert_ne!(
                c.kind,
                CandidateKind::ServerReflexive,
                "a TCP mapping is no UDP candidate"
            );
            if c.kind == CandidateKind::Relayed {
                relayed = Some(c.addr);
            }
        }
    }
    assert_eq!(relayed, Some(sa(RELAYED)));
    let attempts = a.stats().turn_attempts;
    let summary: Vec<_> = attempts
        .iter()
        .map(|t| (t.transport, t.outcome.clone()))
        .collect();
    assert_eq!(summary[0], (TurnTransport::Udp, TurnOutcome::NoAnswer));
    assert!(
        matches!(summary[1], (TurnTransport::Tcp, TurnOutcome::Failed(ref why)) if why.contains("closed")),
        "{summary:?}"
    );
    assert_eq!(summary[2], (TurnTransport::Tls, TurnOutcome::Allocated));

    // Garbage on the stream ends the allocation and closes the connection.
    a.handle_stream_data(now, tls, &[0xFF, 0xFF, 0xFF, 0xFF]);
    assert!(ops(&mut a).contains(&StreamOp::Close { server: tls }));
    // Bytes of a connection no longer in use are ignored.
    assert!(a.handle_stream_data(now, tls, &[0x40, 0, 0, 0]).is_empty());
}

#[test]
fn closing_the_agent_closes_the_stream() {
    let t0 = Instant::now();
    let mut a = agent(t0);
    let step = t0 + TURN_TRANSPORT_STEP;
    run_until(&mut a, t0, step);
    let tcp = sa("203.0.113.10:3478");
    let got = ops(&mut a);
    let Some(StreamOp::Write { bytes, .. }) = got.get(1) else {
        panic!("{got:?}");
    };
    a.handle_stream_data(step, tcp, &answer(bytes));
    let got = ops(&mut a);
    let Some(StreamOp::Write { bytes, .. }) = got.first() else {
        panic!("{got:?}");
    };
    a.handle_stream_data(step, tcp, &answer(bytes));
    assert!(!a.is_released());
    a.close(step);
    assert_eq!(ops(&mut a), vec![StreamOp::Close { server: tcp }]);
    assert!(a.is_released(), "closing the connection releases it");
}

#[test]
fn a_tcp_connect_that_hangs_gives_way_to_tls_after_a_step() {
    let t0 = Instant::now();
    let mut a = agent(t0);
    run_until(&mut a, t0, t0 + TURN_TRANSPORT_STEP);
    assert!(matches!(
        ops(&mut a).first(),
        Some(StreamOp::Open {
            transport: TurnTransport::Tcp,
            ..
        })
    ));
    // Nothing comes back on TCP (SYN dropped): TLS one step later, TCP closed first.
    let from = t0 + TURN_TRANSPORT_STEP;
    run_until(
        &mut a,
        from,
        from + TURN_TRANSPORT_STEP + Duration::from_millis(20),
    );
    let got = ops(&mut a);
    assert_eq!(
        got[0],
        StreamOp::Close {
            server: sa("203.0.113.10:3478")
        }
    );
    assert_eq!(
        got[1],
        StreamOp::Open {
            server: sa("203.0.113.10:443"),
            transport: TurnTransport::Tls
        }
    );
}

#[test]
fn a_restart_after_a_tcp_allocation_starts_the_ladder_at_tcp() {
    let t0 = Instant::now();
    let mut a = agent(t0);
    let step = t0 + TURN_TRANSPORT_STEP;
    run_until(&mut a, t0, step);
    let tcp = sa("203.0.113.10:3478");
    let got = ops(&mut a);
    let Some(StreamOp::Write { bytes, .. }) = got.get(1) else {
        panic!("{got:?}");
    };
    a.handle_stream_data(step, tcp, &answer(bytes));
    let got = ops(&mut a);
    let Some(StreamOp::Write { bytes, .. }) = got.first() else {
        panic!("{got:?}");
    };
    a.handle_stream_data(step, tcp, &answer(bytes));
    while a.poll_transmit().is_some() {}
    a.restart(step, ("ufA2".into(), "password-cccccccccccccccccc".into()));
    let got = ops(&mut a);
    assert_eq!(
        got[..2],
        [
            StreamOp::Close { server: tcp },
            StreamOp::Open {
                server: tcp,
                transport: TurnTransport::Tcp
            }
        ],
        "{got:?}"
    );
    let ladder: Vec<_> = a
        .stats()
        .turn_attempts
        .iter()
        .map(|t| t.transport)
        .collect();
    assert_eq!(
        ladder,
        [TurnTransport::Tcp],
        "this generation starts at TCP"
    );
}

#[test]
fn try_alternate_over_a_stream_moves_to_a_new_connection() {
    use peerlink_proto::attrs::AlternateServer;
    let t0 = Instant::now();
    let mut a = agent(t0);
    let step = t0 + TURN_TRANSPORT_STEP;
    run_until(&mut a, t0, step);
    let tcp = sa("203.0.113.10:3478");
    let alt = sa("203.0.113.11:3478");
    let got = ops(&mut a);
    let Some(StreamOp::Write { bytes, .. }) = got.get(1) else {
        panic!("{got:?}");
    };
    // 401, then a signed 300 naming the alternate's TCP listener.
    a.handle_stream_data(step, tcp, &answer(bytes));
    let got = ops(&mut a);
    let Some(StreamOp::Write { bytes, .. }) = got.first() else {
        panic!("{got:?}");
    };
    let m = Message::parse(bytes).unwrap();
    let mut buf = vec![0u8; 256];
    let mut b = MessageBuilder::new(
        &mut buf,
        m.message_type().with_class(Class::Error),
        m.transaction_id(),
    )
    .unwrap();
    b.add(&ErrorCode::new(300)).unwrap();
    b.add(&AlternateServer(alt)).unwrap();
    let key = peerlink_proto::auth::long_term_key("1700000000:alice", REALM, "pw");
    b.add_integrity(&key).unwrap();
    let n = b.finish();
    a.handle_stream_data(step, tcp, &buf[..n]);
    let got = ops(&mut a);
    assert_eq!(got[0], StreamOp::Close { server: tcp }, "{got:?}");
    assert_eq!(
        got[1],
        StreamOp::Open {
            server: alt,
            transport: TurnTransport::Tcp
        }
    );
    let Some(StreamOp::Write { server, bytes }) = got.get(2) else {
        panic!("no Allocate to the alternate: {got:?}");
    };
    assert_eq!(*server, alt);
    // The alternate allocates; the old connection's bytes are ignored from now on.
    assert!(a.handle_stream_data(step, tcp, &[0xFF; 8]).is_empty());
    a.handle_stream_data(step, alt, &answer(bytes));
    let got = ops(&mut a);
    let Some(StreamOp::Write { bytes, .. }) = got.first() else {
        panic!("{got:?}");
    };
    a.handle_stream_data(step, alt, &answer(bytes));
    let last = a.stats().turn_attempts.last().cloned().unwrap();
    assert_eq!(last.outcome, TurnOutcome::Allocated);
    assert!(
        ops(&mut a)
            .iter()
            .all(|o| !matches!(o, StreamOp::Close { .. }))
    );
}
