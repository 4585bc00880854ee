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
