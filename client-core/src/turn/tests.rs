//! Unit tests: a virtual clock and a scripted fake server built with proto's `MessageBuilder`.

use super::*;
use peerlink_proto::attrs::UnknownAttributes;
use proptest::prelude::*;

const SERVER: &str = "127.0.0.1:3478";
const USER: &str = "alice";
const PASS: &str = "secret";
const REALM: &str = "peerlink.test";
const RELAYED: &str = "127.0.0.1:50000";
const MAPPED: &str = "127.0.0.1:40000";
const PEER: &str = "127.0.0.1:50002";

fn server() -> SocketAddr {
    SERVER.parse().unwrap()
}
fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}
fn key() -> [u8; 16] {
    auth::long_term_key(USER, REALM, PASS)
}

fn client(seed: u64) -> TurnClient {
    TurnClient::new(TurnConfig::new(server(), USER, PASS).with_seed(seed))
}

/// Takes exactly one pending transmit (asserting there is one and only one).
fn one_transmit(c: &mut TurnClient) -> Vec<u8> {
    let t = c.poll_transmit().expect("a transmit");
    assert_eq!(t.destination, server());
    assert!(c.poll_transmit().is_none(), "more than one transmit");
    t.payload
}

/// A response to `req` built by the fake server: `class` of the request's method, attributes
/// added by `f`, MESSAGE-INTEGRITY with `key` if given, then FINGERPRINT.
fn reply(
    req: &[u8],
    class: Class,
    key: Option<&[u8]>,
    f: impl FnOnce(&mut MessageBuilder<'_>),
) -> Vec<u8> {
    let m = Message::parse(req).unwrap();
    let mut buf = vec![0u8; 1024];
    let mut b = MessageBuilder::new(
        &mut buf,
        m.message_type().with_class(class),
        m.transaction_id(),
    )
    .unwrap();
    f(&mut b);
    if let Some(k) = key {
        b.add_integrity(k).unwrap();
    }
    b.add_fingerprint().unwrap();
    let n = b.finish();
    buf.truncate(n);
    buf
}

fn challenge(req: &[u8], code: u16, nonce: &str) -> Vec<u8> {
    reply(req, Class::Error, None, |b| {
        b.add(&ErrorCode::new(code)).unwrap();
        b.add(&Realm(REALM)).unwrap();
        b.add(&Nonce(nonce)).unwrap();
    })
}

fn allocate_ok(req: &[u8], lifetime: u32) -> Vec<u8> {
    reply(req, Class::Success, Some(&key()), |b| {
        b.add(&XorRelayedAddress(addr(RELAYED))).unwrap();
        b.add(&XorMappedAddress(addr(MAPPED))).unwrap();
        b.add(&Lifetime(lifetime)).unwrap();
    })
}

/// The authenticated request is well-formed: USERNAME/REALM/NONCE and a verifying MI.
fn assert_authenticated(req: &[u8], nonce: &str) {
    let m = Message::parse(req).unwrap();
    assert_eq!(m.get::<Username>().unwrap().unwrap().0, USER);
    assert_eq!(m.get::<Realm>().unwrap().unwrap().0, REALM);
    assert_eq!(m.get::<Nonce>().unwrap().unwrap().0, nonce);
    m.verify_integrity(&key())
        .expect("integrity verifies with the long-term key");
    assert!(m.has_fingerprint());
}

/// Drives a fresh client through 401 -> authenticated Allocate -> success.
fn allocated(t0: Instant, lifetime: u32) -> TurnClient {
    let mut c = client(1);
    c.allocate(t0).unwrap();
    let req = one_transmit(&mut c);
    c.handle_input(t0, server(), &challenge(&req, 401, "n1"))
        .unwrap();
    let req2 = one_transmit(&mut c);
    assert_authenticated(&req2, "n1");
    c.handle_input(t0, server(), &allocate_ok(&req2, lifetime))
        .unwrap();
    assert!(matches!(c.poll_event(), Some(Event::Allocated { .. })));
    c
}

#[test]
fn allocate_401_then_success() {
    let t0 = Instant::now();
    let mut c = client(7);
    c.allocate(t0).unwrap();
    assert_eq!(c.state(), AllocationState::Allocating);
    let req = one_transmit(&mut c);
    let m = Message::parse(&req).unwrap();
    assert_eq!(m.message_type(), MessageType::ALLOCATE_REQUEST);
    assert_eq!(
        m.get::<RequestedTransport>().unwrap().unwrap(),
        RequestedTransport::UDP
    );
    assert!(!m.has_integrity(), "first Allocate is unauthenticated");

    let resp = challenge(&req, 401, "nonce-1");
    let input = c.handle_input(t0, server(), &resp).unwrap();
    assert_eq!(input, Input::Control);
    assert!(c.poll_event().is_none());
    let req2 = one_transmit(&mut c);
    assert_ne!(
        Message::parse(&req2).unwrap().transaction_id(),
        m.transaction_id()
    );
    assert_authenticated(&req2, "nonce-1");

    c.handle_input(t0, server(), &allocate_ok(&req2, 600))
        .unwrap();
    assert_eq!(
        c.poll_event(),
        Some(Event::Allocated {
            relayed: addr(RELAYED),
            mapped: Some(addr(MAPPED)),
            lifetime: Duration::from_secs(600)
        })
    );
    assert_eq!(c.state(), AllocationState::Allocated);
    assert_eq!(c.relayed_addr(), Some(addr(RELAYED)));
    assert_eq!(c.outstanding_requests(), 0);
}

#[test]
fn requested_address_family_goes_in_the_allocate_only_when_set() {
    use peerlink_proto::attrs::RequestedAddressFamily;
    let mut plain = client(1);
    plain.allocate(Instant::now()).unwrap();
    let req = one_transmit(&mut plain);
    assert!(
        Message::parse(&req)
            .unwrap()
            .get::<RequestedAddressFamily>()
            .is_none()
    );
    let mut conf = TurnConfig::new(server(), USER, PASS).with_seed(2);
    conf.requested_family = Some(AddressFamily::V6);
    let mut v6 = TurnClient::new(conf);
    v6.allocate(Instant::now()).unwrap();
    let req = one_transmit(&mut v6);
    let m = Message::parse(&req).unwrap();
    assert_eq!(
        m.get::<RequestedAddressFamily>().map(|r| r.unwrap().0),
        Some(AddressFamily::V6)
    );
}

#[test]
fn rest_credentials_authenticate() {
    let t0 = Instant::now();
    let cfg = TurnConfig::rest(server(), b"shared", "bob", 1_700_000_000, 3600);
    assert_eq!(cfg.username, "1700003600:bob");
    let (user, pass) = (cfg.username.clone(), cfg.password.clone());
    let mut c = TurnClient::new(cfg);
    c.allocate(t0).unwrap();
    let req = one_transmit(&mut c);
    c.handle_input(t0, server(), &challenge(&req, 401, "n"))
        .unwrap();
    let req2 = one_transmit(&mut c);
    let m = Message::parse(&req2).unwrap();
    assert_eq!(m.get::<Username>().unwrap().unwrap().0, user);
    m.verify_integrity(&auth::long_term_key(&user, REALM, &pass))
        .unwrap();
}

#[test]
fn stale_nonce_438_is_retried_with_new_nonce() {
    let t0 = Instant::now();
    let mut c = client(2);
    c.allocate(t0).unwrap();
    let req = one_transmit(&mut c);
    c.handle_input(t0, server(), &challenge(&req, 401, "old"))
        .unwrap();
    let req2 = one_transmit(&mut c);
    c.handle_input(t0, server(), &challenge(&req2, 438, "fresh"))
        .unwrap();
    let req3 = one_transmit(&mut c);
    assert_authenticated(&req3, "fresh");
    c.handle_input(t0, server(), &allocate_ok(&req3, 600))
        .unwrap();
    assert!(matches!(c.poll_event(), Some(Event::Allocated { .. })));
}

#[test]
fn stale_nonce_loop_is_bounded() {
    let t0 = Instant::now();
    let mut c = client(3);
    c.allocate(t0).unwrap();
    let mut req = one_transmit(&mut c);
    c.handle_input(t0, server(), &challenge(&req, 401, "n0"))
        .unwrap();
    req = one_transmit(&mut c);
    for i in 0..=MAX_STALE_NONCE_RETRIES {
        c.handle_input(t0, server(), &challenge(&req, 438, &format!("n{}", i + 1)))
            .unwrap();
        if i < MAX_STALE_NONCE_RETRIES {
            req = one_transmit(&mut c);
        }
    }
    assert!(c.poll_transmit().is_none());
    assert!(matches!(
        c.poll_event(),
        Some(Event::AllocationFailed(TurnError::StaleNonceLoop { .. }))
    ));
    assert_eq!(c.state(), AllocationState::Failed);
}

#[test]
fn a_resumed_nonce_authenticates_the_first_allocate() {
    let t0 = Instant::now();
    let first = allocated(t0, 600);
    let hint = first
        .auth_hint()
        .expect("challenged, so it holds realm and nonce");
    assert_eq!((hint.realm.as_str(), hint.nonce.as_str()), (REALM, "n1"));
    let mut c = client(2);
    assert!(c.resume_auth(&hint));
    c.allocate(t0).unwrap();
    let req = one_transmit(&mut c);
    assert_authenticated(&req, "n1");
    c.handle_input(t0, server(), &allocate_ok(&req, 600))
        .unwrap();
    assert!(matches!(c.poll_event(), Some(Event::Allocated { .. })));
    // A hint for another server, or after the allocation started, is not taken.
    let other = AuthHint {
        server: addr("127.0.0.1:3479"),
        ..hint.clone()
    };
    assert!(!client(3).resume_auth(&other));
    assert!(!c.resume_auth(&hint));
}

#[test]
fn a_resumed_nonce_the_server_refuses_falls_back_to_its_challenge_once() {
    let t0 = Instant::now();
    let hint = AuthHint {
        server: server(),
        realm: "old-realm".into(),
        nonce: "old".into(),
    };
    for code in [401, 438] {
        let mut c = client(5);
        assert!(c.resume_auth(&hint));
        c.allocate(t0).unwrap();
        let req = one_transmit(&mut c);
        assert!(Message::parse(&req).unwrap().has_integrity());
        c.handle_input(t0, server(), &challenge(&req, code, "fresh"))
            .unwrap();
        let req2 = one_transmit(&mut c);
        assert_authenticated(&req2, "fresh");
        // The retry is not a resumption any more: a second 401 is a wrong password.
        c.handle_input(t0, server(), &challenge(&req2, 401, "fresh"))
            .unwrap();
        assert_eq!(
            c.poll_event(),
            Some(Event::AllocationFailed(TurnError::Unauthorized {
                method: "Allocate"
            }))
        );
    }
}

#[test]
fn wrong_password_fails_with_unauthorized() {
    let t0 = Instant::now();
    let mut c = client(4);
    c.allocate(t0).unwrap();
    let req = one_transmit(&mut c);
    c.handle_input(t0, server(), &challenge(&req, 401, "n"))
        .unwrap();
    let req2 = one_transmit(&mut c);
    c.handle_input(t0, server(), &challenge(&req2, 401, "n"))
        .unwrap();
    assert_eq!(
        c.poll_event(),
        Some(Event::AllocationFailed(TurnError::Unauthorized {
            method: "Allocate"
        }))
    );
}

#[test]
fn other_error_codes_fail_with_rejected() {
    let t0 = Instant::now();
    let mut c = client(5);
    c.allocate(t0).unwrap();
    let req = one_transmit(&mut c);
    let resp = reply(&req, Class::Error, None, |b| {
        b.add(&ErrorCode::new(486)).unwrap()
    });
    c.handle_input(t0, server(), &resp).unwrap();
    assert!(matches!(
        c.poll_event(),
        Some(Event::AllocationFailed(TurnError::Rejected {
            code: 486,
            ..
        }))
    ));
}

#[test]
fn retransmission_follows_rfc8489_schedule_then_times_out() {
    let t0 = Instant::now();
    let mut c = client(6);
    c.allocate(t0).unwrap();
    let first = one_transmit(&mut c);
    let mut sent_at = vec![Duration::ZERO];
    let mut now = t0;
    // Step the virtual clock in 100 ms ticks for at most 60 s.
    for _ in 0..600 {
        now += Duration::from_millis(100);
        c.handle_timeout(now);
        while let Some(t) = c.poll_transmit() {
            assert_eq!(t.payload, first, "retransmissions repeat the same request");
            sent_at.push(now - t0);
        }
        if c.state() == AllocationState::Failed {
            break;
        }
    }
    let ms: Vec<u128> = sent_at.iter().map(|d| d.as_millis()).collect();
    assert_eq!(ms, vec![0, 500, 1500, 3500, 7500, 15500, 31500]);
    assert_eq!((now - t0).as_millis(), 39_500);
    assert_eq!(
        c.poll_event(),
        Some(Event::AllocationFailed(TurnError::Timeout {
            method: "Allocate",
            transmissions: 7
        }))
    );
}

#[test]
fn late_response_after_retransmission_is_accepted_once() {
    let t0 = Instant::now();
    let mut c = client(8);
    c.allocate(t0).unwrap();
    let req = one_transmit(&mut c);
    c.handle_timeout(t0 + Duration::from_millis(500));
    let again = one_transmit(&mut c);
    assert_eq!(req, again);
    let resp = challenge(&req, 401, "n");
    c.handle_input(t0, server(), &resp).unwrap();
    assert_eq!(
        c.handle_input(t0, server(), &resp),
        Err(InputError::UnknownTransaction)
    );
}

#[test]
fn refresh_timing_and_deallocate() {
    let t0 = Instant::now();
    let mut c = allocated(t0, 600);
    assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(540)));
    c.handle_timeout(t0 + Duration::from_secs(539));
    assert!(c.poll_transmit().is_none());
    let t1 = t0 + Duration::from_secs(540);
    c.handle_timeout(t1);
    let req = one_transmit(&mut c);
    let m = Message::parse(&req).unwrap();
    assert_eq!(m.method(), Method::REFRESH);
    assert_eq!(m.get::<Lifetime>().unwrap().unwrap().0, 600);
    assert_authenticated(&req, "n1");
    let resp = reply(&req, Class::Success, Some(&key()), |b| {
        b.add(&Lifetime(300)).unwrap()
    });
    c.handle_input(t1, server(), &resp).unwrap();
    assert_eq!(
        c.poll_event(),
        Some(Event::Refreshed {
            lifetime: Duration::from_secs(300)
        })
    );
    assert_eq!(c.poll_timeout(), Some(t1 + Duration::from_secs(240)));

    c.deallocate(t1).unwrap();
    let req = one_transmit(&mut c);
    let m = Message::parse(&req).unwrap();
    assert_eq!(m.method(), Method::REFRESH);
    assert_eq!(m.get::<Lifetime>().unwrap().unwrap().0, 0);
    let resp = reply(&req, Class::Success, Some(&key()), |b| {
        b.add(&Lifetime(0)).unwrap()
    });
    c.handle_input(t1, server(), &resp).unwrap();
    assert_eq!(c.poll_event(), Some(Event::Deallocated));
    assert_eq!(c.state(), AllocationState::Closed);
    assert_eq!(c.poll_timeout(), None);
}

#[test]
fn unanswered_refresh_loses_the_allocation() {
    let t0 = Instant::now();
    let mut c = allocated(t0, 600);
    let mut now = t0 + Duration::from_secs(540);
    for _ in 0..100 {
        c.handle_timeout(now);
        while c.poll_transmit().is_some() {}
        if c.state() != AllocationState::Allocated {
            break;
        }
        now += Duration::from_secs(1);
    }
    assert!(matches!(
        c.poll_event(),
        Some(Event::AllocationLost(TurnError::Timeout { .. }))
    ));
}

#[test]
fn permission_is_created_and_refreshed_every_four_minutes() {
    let t0 = Instant::now();
    let mut c = allocated(t0, 3600);
    let peer = addr(PEER);
    c.create_permission(t0, peer.ip()).unwrap();
    let req = one_transmit(&mut c);
    let m = Message::parse(&req).unwrap();
    assert_eq!(m.method(), Method::CREATE_PERMISSION);
    assert_eq!(
        m.get::<XorPeerAddress>().unwrap().unwrap().0.ip(),
        peer.ip()
    );
    assert!(!c.has_permission(peer.ip()));
    c.handle_input(
        t0,
        server(),
        &reply(&req, Class::Success, Some(&key()), |_| {}),
    )
    .unwrap();
    assert_eq!(
        c.poll_event(),
        Some(Event::PermissionCreated { peer: peer.ip() })
    );
    assert!(c.has_permission(peer.ip()));
    assert_eq!(c.poll_timeout(), Some(t0 + PERMISSION_REFRESH));
    let t1 = t0 + PERMISSION_REFRESH;
    c.handle_timeout(t1);
    let req = one_transmit(&mut c);
    assert_eq!(
        Message::parse(&req).unwrap().method(),
        Method::CREATE_PERMISSION
    );
    c.handle_input(
        t1,
        server(),
        &reply(&req, Class::Success, Some(&key()), |_| {}),
    )
    .unwrap();
    assert_eq!(c.poll_timeout(), Some(t1 + PERMISSION_REFRESH));
}

#[test]
fn channel_bind_refresh_and_framing_both_ways() {
    let t0 = Instant::now();
    let mut c = allocated(t0, 3600);
    let peer = addr(PEER);
    let mut out = [0u8; 256];

    // No permission, no channel: sending is refused.
    assert_eq!(
        c.encode_data(peer, b"x", &mut out),
        Err(TurnError::NoPermission(peer))
    );

    let ch = c.bind_channel(t0, peer).unwrap();
    assert_eq!(ch, 0x4000);
    let req = one_transmit(&mut c);
    let m = Message::parse(&req).unwrap();
    assert_eq!(m.method(), Method::CHANNEL_BIND);
    assert_eq!(m.get::<ChannelNumber>().unwrap().unwrap().0, 0x4000);
    assert_eq!(m.get::<XorPeerAddress>().unwrap().unwrap().0, peer);

    // Before the binding is confirmed data goes out as a Send indication.
    let n = c.encode_data(peer, b"hello", &mut out).unwrap();
    let ind = Message::parse(&out[..n]).unwrap();
    assert_eq!(ind.message_type(), MessageType::SEND_INDICATION);
    assert_eq!(ind.get::<XorPeerAddress>().unwrap().unwrap().0, peer);
    assert_eq!(ind.get::<Data>().unwrap().unwrap().0, b"hello");

    c.handle_input(
        t0,
        server(),
        &reply(&req, Class::Success, Some(&key()), |_| {}),
    )
    .unwrap();
    assert_eq!(
        c.poll_event(),
        Some(Event::ChannelBound {
            peer,
            channel: 0x4000
        })
    );
    assert_eq!(c.channel_for(peer), Some(0x4000));
    assert!(
        c.has_permission(peer.ip()),
        "a channel binding installs the permission"
    );

    // Outgoing ChannelData.
    let n = c.encode_data(peer, b"hello", &mut out).unwrap();
    assert_eq!(
        &out[..n],
        &[0x40, 0x00, 0x00, 0x05, b'h', b'e', b'l', b'l', b'o']
    );
    c.send(peer, b"hi").unwrap();
    assert_eq!(
        one_transmit(&mut c),
        vec![0x40, 0x00, 0x00, 0x02, b'h', b'i']
    );

    // Incoming ChannelData (with UDP padding) and Data indications.
    let incoming = [0x40, 0x00, 0x00, 0x03, 1, 2, 3, 0];
    assert_eq!(
        c.handle_input(t0, server(), &incoming),
        Ok(Input::Data {
            peer,
            data: &[1, 2, 3]
        })
    );
    assert_eq!(
        c.handle_input(t0, server(), &[0x40, 0x01, 0x00, 0x00]),
        Err(InputError::UnknownChannel(0x4001))
    );
    let mut buf = [0u8; 128];
    let mut b = MessageBuilder::new(
        &mut buf,
        MessageType::DATA_INDICATION,
        TransactionId([9; 12]),
    )
    .unwrap();
    b.add(&XorPeerAddress(peer)).unwrap();
    b.add(&Data(b"abc")).unwrap();
    let n = b.finish();
    assert_eq!(
        c.handle_input(t0, server(), &buf[..n]),
        Ok(Input::Data { peer, data: b"abc" })
    );

    // The channel is refreshed 9 minutes after binding, with the same number.
    let due = t0 + CHANNEL_REFRESH;
    c.handle_timeout(due);
    let mut refreshed = None;
    while let Some(t) = c.poll_transmit() {
        let m = Message::parse(&t.payload).unwrap();
        if m.method() == Method::CHANNEL_BIND {
            refreshed = Some(m.get::<ChannelNumber>().unwrap().unwrap().0);
        }
    }
    assert_eq!(refreshed, Some(0x4000));
}

#[test]
fn response_with_bad_integrity_is_dropped() {
    let t0 = Instant::now();
    let mut c = client(9);
    c.allocate(t0).unwrap();
    let req = one_transmit(&mut c);
    c.handle_input(t0, server(), &challenge(&req, 401, "n"))
        .unwrap();
    let req2 = one_transmit(&mut c);
    let forged = reply(&req2, Class::Success, Some(b"wrong key"), |b| {
        b.add(&XorRelayedAddress(addr(RELAYED))).unwrap();
    });
    assert_eq!(
        c.handle_input(t0, server(), &forged),
        Err(InputError::IntegrityMismatch)
    );
    assert_eq!(c.state(), AllocationState::Allocating);
    c.handle_input(t0, server(), &allocate_ok(&req2, 600))
        .unwrap();
    assert_eq!(c.state(), AllocationState::Allocated);
}

#[test]
fn input_from_elsewhere_and_non_turn_is_rejected() {
    let t0 = Instant::now();
    let mut c = allocated(t0, 600);
    let other = addr("127.0.0.1:9999");
    assert_eq!(
        c.handle_input(t0, other, &[0x40, 0, 0, 0]),
        Err(InputError::UnexpectedSource(other))
    );
    assert_eq!(
        c.handle_input(t0, server(), &[0x80, 1, 2, 3]),
        Err(InputError::NotTurn)
    );
    assert_eq!(c.handle_input(t0, server(), &[]), Err(InputError::NotTurn));
    // An unknown comprehension-required attribute in a Data indication is not our problem, but
    // a request is unexpected.
    let mut buf = [0u8; 64];
    let b = MessageBuilder::new(
        &mut buf,
        MessageType::BINDING_REQUEST,
        TransactionId([1; 12]),
    )
    .unwrap();
    let n = b.finish();
    assert!(matches!(
        c.handle_input(t0, server(), &buf[..n]),
        Err(InputError::Unexpected(_))
    ));
    let _ = UnknownAttributes::new();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Arbitrary bytes never panic, in any state.
    #[test]
    fn garbage_input_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300), first in 0u8..=0x4f) {
        let t0 = Instant::now();
        let mut c = allocated(t0, 600);
        let _ = c.bind_channel(t0, addr(PEER));
        let mut b = bytes.clone();
        if let Some(x) = b.first_mut() { *x = first; }
        let _ = c.handle_input(t0, server(), &bytes);
        let _ = c.handle_input(t0, server(), &b);
        c.handle_timeout(t0 + Duration::from_secs(1));
    }

    /// Mutated real responses never panic and never leave the client inconsistent.
    #[test]
    fn mutated_responses_never_panic(pos in 0usize..200, val in any::<u8>(), cut in 0usize..200) {
        let t0 = Instant::now();
        let mut c = client(11);
        c.allocate(t0).unwrap();
        let req = one_transmit(&mut c);
        let mut resp = challenge(&req, 401, "n");
        if pos < resp.len() { resp[pos] = val; }
        let _ = c.handle_input(t0, server(), &resp[..cut.min(resp.len())]);
        let _ = c.handle_input(t0, server(), &resp);
        while c.poll_transmit().is_some() {}
        c.handle_timeout(t0 + Duration::from_secs(100));
        while c.poll_event().is_some() {}
    }
}

/// A 300 answer to the authenticated Allocate `req`, naming `alt`, with integrity if `signed`.
fn try_alternate(req: &[u8], alt: SocketAddr, signed: bool) -> Vec<u8> {
    let k = key();
    reply(req, Class::Error, signed.then_some(&k[..]), |b| {
        b.add(&ErrorCode::new(300)).unwrap();
        b.add(&AlternateServer(alt)).unwrap();
    })
}

/// The client's authenticated Allocate on its current server (after a 401 there).
fn authed_allocate(c: &mut TurnClient, t0: Instant, from: SocketAddr, nonce: &str) -> Vec<u8> {
    let t = c.poll_transmit().expect("an Allocate");
    assert_eq!(t.destination, from);
    c.handle_input(t0, from, &challenge(&t.payload, 401, nonce))
        .unwrap();
    let t = c.poll_transmit().expect("the authenticated Allocate");
    assert_eq!(t.destination, from);
    assert_authenticated(&t.payload, nonce);
    t.payload
}

#[test]
fn try_alternate_moves_the_allocation_to_the_named_server() {
    let t0 = Instant::now();
    let alt = addr("127.0.0.2:3478");
    let mut c = client(3);
    c.allocate(t0).unwrap();
    let req = authed_allocate(&mut c, t0, server(), "n1");
    c.handle_input(t0, server(), &try_alternate(&req, alt, true))
        .unwrap();
    assert_eq!(
        c.poll_event(),
        Some(Event::Redirected {
            from: server(),
            to: alt
        })
    );
    assert_eq!(c.config().server, alt);
    // the alternate is asked afresh (its own nonce), and its answers are the ones accepted
    let t = c.poll_transmit().unwrap();
    assert_eq!(t.destination, alt);
    assert!(!Message::parse(&t.payload).unwrap().has_integrity());
    assert!(c.handle_input(t0, server(), &t.payload).is_err());
    c.handle_input(t0, alt, &challenge(&t.payload, 401, "n2"))
        .unwrap();
    let t = c.poll_transmit().unwrap();
    assert_eq!(t.destination, alt);
    assert_authenticated(&t.payload, "n2");
    c.handle_input(t0, alt, &allocate_ok(&t.payload, 600))
        .unwrap();
    assert!(matches!(c.poll_event(), Some(Event::Allocated { .. })));
    assert_eq!(c.state(), AllocationState::Allocated);
}

#[test]
fn an_unsigned_or_looping_redirect_fails_the_allocation() {
    let t0 = Instant::now();
    let alt = addr("127.0.0.2:3478");
    // unsigned answer to an authenticated request: not followed
    let mut c = client(4);
    c.allocate(t0).unwrap();
    let req = authed_allocate(&mut c, t0, server(), "n1");
    c.handle_input(t0, server(), &try_alternate(&req, alt, false))
        .unwrap();
    assert!(matches!(
        c.poll_event(),
        Some(Event::AllocationFailed(TurnError::Rejected {
            code: 300,
            ..
        }))
    ));
    assert_eq!(c.config().server, server());
    // A -> B -> A: the second redirect is refused
    let mut c = client(5);
    c.allocate(t0).unwrap();
    let req = authed_allocate(&mut c, t0, server(), "n1");
    c.handle_input(t0, server(), &try_alternate(&req, alt, true))
        .unwrap();
    assert!(matches!(c.poll_event(), Some(Event::Redirected { .. })));
    let req = authed_allocate(&mut c, t0, alt, "n2");
    c.handle_input(t0, alt, &try_alternate(&req, server(), true))
        .unwrap();
    assert!(matches!(
        c.poll_event(),
        Some(Event::AllocationFailed(TurnError::Rejected {
            code: 300,
            ..
        }))
    ));
}

// --- TURN over a stream (TCP / TLS) ---

fn stream_client(seed: u64) -> TurnClient {
    TurnClient::new(
        TurnConfig::new(server(), USER, PASS)
            .with_seed(seed)
            .with_transport(ClientTransport::Stream),
    )
}

/// Feeds `bytes` to a stream client in pieces of `chunk` and collects every frame's input.
fn feed(c: &mut TurnClient, t: Instant, bytes: &[u8], chunk: usize) -> Vec<StreamInput> {
    let mut out = Vec::new();
    for piece in bytes.chunks(chunk.max(1)) {
        c.handle_stream_bytes(piece).unwrap();
        while let Some(i) = c.poll_stream_input(t).unwrap() {
            out.push(i);
        }
    }
    out
}

/// A stream client through 401 -> Allocate -> success, every frame split at `chunk`.
fn stream_allocated(t0: Instant, chunk: usize) -> TurnClient {
    let mut c = stream_client(21);
    c.allocate(t0).unwrap();
    let req = one_transmit(&mut c);
    assert_eq!(
        feed(&mut c, t0, &challenge(&req, 401, "n1"), chunk),
        vec![StreamInput::Control]
    );
    let req2 = one_transmit(&mut c);
    assert_authenticated(&req2, "n1");
    assert_eq!(
        feed(&mut c, t0, &allocate_ok(&req2, 600), chunk),
        vec![StreamInput::Control]
    );
    assert!(matches!(c.poll_event(), Some(Event::Allocated { .. })));
    c
}

/// Binds a channel to PEER over the stream; returns its number.
fn stream_bound(c: &mut TurnClient, t0: Instant) -> u16 {
    let ch = c.bind_channel(t0, addr(PEER)).unwrap();
    let req = one_transmit(c);
    let ok = reply(&req, Class::Success, Some(&key()), |_| {});
    assert_eq!(feed(c, t0, &ok, 64), vec![StreamInput::Control]);
    assert!(matches!(c.poll_event(), Some(Event::ChannelBound { .. })));
    ch
}

#[test]
fn stream_frames_are_reassembled_from_any_split() {
    let t0 = Instant::now();
    for chunk in [1, 3, 7, 20, 4096] {
        let mut c = stream_allocated(t0, chunk);
        assert_eq!(c.state(), AllocationState::Allocated, "chunk {chunk}");
        let ch = stream_bound(&mut c, t0);
        // Two padded ChannelData frames and a Data indication back to back in one read.
        let mut bytes = vec![0x40, ch as u8, 0, 5, 1, 2, 3, 4, 5, 0, 0, 0];
        bytes.extend_from_slice(&[0x40, ch as u8, 0, 4, 9, 8, 7, 6]);
        let mut buf = [0u8; 128];
        let mut b = MessageBuilder::new(
            &mut buf,
            MessageType::DATA_INDICATION,
            TransactionId([3; 12]),
        )
        .unwrap();
        b.add(&XorPeerAddress(addr(PEER))).unwrap();
        b.add(&Data(b"abc")).unwrap();
        let n = b.finish();
        bytes.extend_from_slice(&buf[..n]);
        let got = feed(&mut c, t0, &bytes, chunk);
        let data = |d: &[u8]| StreamInput::Data {
            peer: addr(PEER),
            data: d.to_vec(),
        };
        assert_eq!(
            got,
            vec![data(&[1, 2, 3, 4, 5]), data(&[9, 8, 7, 6]), data(b"abc")],
            "chunk {chunk}"
        );
    }
}

#[test]
fn stream_channel_data_is_padded_to_four() {
    let t0 = Instant::now();
    let mut c = stream_allocated(t0, 4096);
    let ch = stream_bound(&mut c, t0);
    c.send(addr(PEER), b"hello").unwrap();
    assert_eq!(
        one_transmit(&mut c),
        vec![
            0x40, ch as u8, 0x00, 0x05, b'h', b'e', b'l', b'l', b'o', 0, 0, 0
        ]
    );
    c.send(addr(PEER), b"four").unwrap();
    assert_eq!(one_transmit(&mut c).len(), 8, "already aligned: no padding");
    // The datagram client does not pad.
    let mut d = allocated(t0, 600);
    let _ = d.bind_channel(t0, addr(PEER)).unwrap();
    let req = one_transmit(&mut d);
    d.handle_input(
        t0,
        server(),
        &reply(&req, Class::Success, Some(&key()), |_| {}),
    )
    .unwrap();
    d.send(addr(PEER), b"hello").unwrap();
    assert_eq!(one_transmit(&mut d).len(), 9);
}

#[test]
fn stream_requests_are_not_retransmitted_but_time_out() {
    let t0 = Instant::now();
    let mut c = stream_client(22);
    c.allocate(t0).unwrap();
    let _ = one_transmit(&mut c);
    assert_eq!(c.poll_timeout(), Some(t0 + STREAM_TRANSACTION_TIMEOUT));
    for s in [1, 5, 20, 39] {
        c.handle_timeout(t0 + Duration::from_secs(s));
        assert!(c.poll_transmit().is_none(), "no retransmission at {s} s");
        assert_eq!(c.state(), AllocationState::Allocating);
    }
    c.handle_timeout(t0 + STREAM_TRANSACTION_TIMEOUT);
    assert_eq!(
        c.poll_event(),
        Some(Event::AllocationFailed(TurnError::Timeout {
            method: "Allocate",
            transmissions: 1
        }))
    );
    assert_eq!(c.state(), AllocationState::Failed);
    // A shorter bound is the caller's to choose.
    let mut cfg = TurnConfig::new(server(), USER, PASS).with_transport(ClientTransport::Stream);
    cfg.stream_timeout = Duration::from_secs(2);
    let mut c = TurnClient::new(cfg);
    c.allocate(t0).unwrap();
    assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(2)));
}

#[test]
fn stream_garbage_and_oversized_frames_end_the_allocation() {
    let t0 = Instant::now();
    for (bytes, want) in [
        (vec![0xFF, 1, 2, 3], StreamError::UnknownFrame(0xFF)),
        (vec![0x80, 0, 0, 0], StreamError::UnknownFrame(0x80)),
        (
            vec![0, 1, 0, 0, 0xDE, 0xAD, 0xBE, 0xEF],
            StreamError::BadCookie(0xDEAD_BEEF),
        ),
        (
            vec![0x40, 0x00, 0xFF, 0xFF],
            StreamError::TooLong {
                len: 65539,
                max: MAX_STREAM_FRAME,
            },
        ),
    ] {
        let mut c = stream_allocated(t0, 4096);
        c.handle_stream_bytes(&bytes).unwrap();
        assert_eq!(
            c.poll_stream_input(t0),
            Err(TurnError::Stream(want)),
            "{bytes:?}"
        );
        assert_eq!(
            c.poll_event(),
            Some(Event::AllocationLost(TurnError::Stream(want)))
        );
        assert_eq!(c.state(), AllocationState::Failed);
        // The stream stays refused: it is out of step.
        c.handle_stream_bytes(&[0x40, 0, 0, 0]).unwrap();
        assert_eq!(c.poll_stream_input(t0), Err(TurnError::Stream(want)));
        assert!(
            TurnError::Stream(want)
                .to_string()
                .contains("TURN stream broken"),
            "a clear error"
        );
    }
    // While allocating, the Allocate fails instead.
    let mut c = stream_client(23);
    c.allocate(t0).unwrap();
    c.handle_stream_bytes(&[0xC0; 8]).unwrap();
    assert!(c.poll_stream_input(t0).is_err());
    assert!(matches!(
        c.poll_event(),
        Some(Event::AllocationFailed(TurnError::Stream(_)))
    ));
    assert_eq!(c.outstanding_requests(), 0);
}

#[test]
fn stream_that_stops_mid_frame_or_closes_ends_the_allocation() {
    let t0 = Instant::now();
    // Truncated: half a ChannelData frame, then the connection ends.
    let mut c = stream_allocated(t0, 4096);
    let ch = stream_bound(&mut c, t0);
    c.handle_stream_bytes(&[0x40, ch as u8, 0, 100, 1, 2, 3])
        .unwrap();
    assert_eq!(c.poll_stream_input(t0), Ok(None), "waits for the rest");
    c.handle_stream_closed(t0);
    let lost = c.poll_event();
    assert_eq!(
        lost,
        Some(Event::AllocationLost(TurnError::ConnectionClosed {
            mid_frame: true
        }))
    );
    assert!(
        TurnError::ConnectionClosed { mid_frame: true }
            .to_string()
            .contains("in the middle of a frame")
    );
    // A clean end between frames.
    let mut c = stream_allocated(t0, 4096);
    c.handle_stream_closed(t0);
    assert_eq!(
        c.poll_event(),
        Some(Event::AllocationLost(TurnError::ConnectionClosed {
            mid_frame: false
        }))
    );
    // A connect that never worked fails the Allocate.
    let mut c = stream_client(24);
    c.allocate(t0).unwrap();
    c.handle_stream_closed(t0);
    assert!(matches!(
        c.poll_event(),
        Some(Event::AllocationFailed(TurnError::ConnectionClosed { .. }))
    ));
    // Closing while releasing completes the release (the server frees it with the connection).
    let mut c = stream_allocated(t0, 4096);
    c.deallocate(t0).unwrap();
    let _ = one_transmit(&mut c);
    c.handle_stream_closed(t0);
    assert_eq!(c.poll_event(), Some(Event::Deallocated));
    assert_eq!(c.state(), AllocationState::Closed);
}

#[test]
fn well_framed_but_bad_messages_are_dropped_and_the_stream_goes_on() {
    let t0 = Instant::now();
    let mut c = stream_allocated(t0, 4096);
    let ch = stream_bound(&mut c, t0);
    // Unbound channel, a response to nothing, a STUN request (not for a client): all dropped.
    let mut bytes = vec![0x4F, 0xFF, 0, 1, 7, 0, 0, 0];
    let stray = reply(
        &[0u8; 20]
            .iter()
            .enumerate()
            .map(|(i, _)| match i {
                1 => 0x03,
                4 => 0x21,
                5 => 0x12,
                6 => 0xA4,
                7 => 0x42,
                _ => 0,
            })
            .collect::<Vec<u8>>(),
        Class::Success,
        None,
        |_| {},
    );
    bytes.extend_from_slice(&stray);
    let mut buf = [0u8; 64];
    let b = MessageBuilder::new(
        &mut buf,
        MessageType::BINDING_REQUEST,
        TransactionId([1; 12]),
    )
    .unwrap();
    let n = b.finish();
    bytes.extend_from_slice(&buf[..n]);
    bytes.extend_from_slice(&[0x40, ch as u8, 0, 2, 0xAB, 0xCD, 0, 0]);
    let got = feed(&mut c, t0, &bytes, 5);
    assert_eq!(got.len(), 4, "{got:?}");
    assert_eq!(
        got[0],
        StreamInput::Dropped(InputError::UnknownChannel(0x4FFF))
    );
    assert_eq!(got[1], StreamInput::Dropped(InputError::UnknownTransaction));
    assert!(matches!(
        got[2],
        StreamInput::Dropped(InputError::Unexpected(_))
    ));
    assert_eq!(
        got[3],
        StreamInput::Data {
            peer: addr(PEER),
            data: vec![0xAB, 0xCD]
        }
    );
    assert_eq!(c.state(), AllocationState::Allocated);
}

#[test]
fn stream_calls_on_a_datagram_client_are_refused() {
    let t0 = Instant::now();
    let mut c = client(25);
    assert_eq!(
        c.handle_stream_bytes(&[0; 4]),
        Err(TurnError::WrongTransport(ClientTransport::Datagram))
    );
    assert_eq!(
        c.poll_stream_input(t0),
        Err(TurnError::WrongTransport(ClientTransport::Datagram))
    );
    c.handle_stream_closed(t0);
    assert_eq!(c.state(), AllocationState::Idle);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    /// Arbitrary stream bytes in arbitrary reads never panic; once the framing fails it keeps
    /// failing, and the allocation is gone.
    #[test]
    fn stream_garbage_never_panics(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
        chunk in 1usize..40,
        first in 0u8..=0x7f,
    ) {
        let t0 = Instant::now();
        let mut c = stream_allocated(t0, 4096);
        let _ = stream_bound(&mut c, t0);
        let mut b = bytes.clone();
        if let Some(x) = b.first_mut() { *x = first; }
        let mut failed = false;
        for piece in b.chunks(chunk) {
            c.handle_stream_bytes(piece).unwrap();
            loop {
                match c.poll_stream_input(t0) {
                    Ok(Some(_)) => prop_assert!(!failed, "a frame after the stream broke"),
                    Ok(None) => break,
                    Err(_) => { failed = true; break; }
                }
            }
        }
        if failed {
            prop_assert_eq!(c.state(), AllocationState::Failed);
        }
        c.handle_stream_closed(t0);
        c.handle_timeout(t0 + Duration::from_secs(100));
        while c.poll_event().is_some() {}
        while c.poll_transmit().is_some() {}
    }
}
