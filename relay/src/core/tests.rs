//! Deterministic tests of the core: a virtual clock, a fake `RelaySockets`, and a mini TURN
//! client that builds requests with peerlink-proto's `MessageBuilder`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use peerlink_proto::attrs::{
    AlternateServer, Data, ErrorCode, EvenPort, Lifetime, Nonce, Realm, RequestedAddressFamily,
    RequestedTransport, ReservationToken, UnknownAttributes, Username, XorMappedAddress,
    XorPeerAddress, XorRelayedAddress, attr_type,
};
use peerlink_proto::auth::{long_term_key, rest};
use peerlink_proto::channel::ChannelData;
use peerlink_proto::{
    AddressFamily, Class, Message, MessageBuilder, MessageType, Method, TransactionId,
};

use super::*;

const REALM: &str = "peerlink.test";
const RELAY_IP: &str = "203.0.113.10"; // a documentation range: denied unless it is our relay
const LISTENER: &str = "203.0.113.10:3478";
const METRICS: &str = "203.0.113.10:9641";
const PORTS: RangeInclusive<u16> = 50_000..=50_999;
/// Unix time at the harness epoch.
const UNIX0: u64 = 1_800_000_000;

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

// ---------------------------------------------------------------------------------------------
// Fake relayed sockets

struct FakeSockets {
    open: HashMap<AllocationId, SocketAddr>,
    /// Ports held for RESERVATION-TOKENs: token -> (address, hold ends).
    held: HashMap<[u8; 8], (SocketAddr, Instant)>,
    next_token: u8,
    v4: Option<IpAddr>,
    v6: Option<IpAddr>,
    /// At most this many sockets at once (simulates the port range running out).
    limit: usize,
    opened: u64,
    closed: u64,
}

impl FakeSockets {
    fn new(v4: Option<IpAddr>, v6: Option<IpAddr>) -> Self {
        FakeSockets {
            open: HashMap::new(),
            held: HashMap::new(),
            next_token: 1,
            v4,
            v6,
            limit: usize::MAX,
            opened: 0,
            closed: 0,
        }
    }
}

impl RelaySockets for FakeSockets {
    fn open(
        &mut self,
        id: AllocationId,
        family: AddrFamily,
        port: PortRequest,
        now: Instant,
    ) -> Result<Opened, OpenError> {
        assert!(
            !self.open.contains_key(&id),
            "id {id:?} reused while its socket is open"
        );
        self.held.retain(|_, (_, until)| *until > now);
        if let PortRequest::Reserved(token) = port {
            let (addr, _) = self.held.remove(&token).ok_or(OpenError::NoReservation)?;
            self.open.insert(id, addr);
            self.opened += 1;
            return Ok(Opened { addr, token: None });
        }
        let ip = match family {
            AddrFamily::V4 => self.v4,
            AddrFamily::V6 => self.v6,
        }
        .ok_or(OpenError::FamilyNotSupported)?;
        if self.open.len() >= self.limit {
            return Err(OpenError::NoPorts);
        }
        let mut used: Vec<u16> = self.open.values().map(|a| a.port()).collect();
        used.extend(self.held.values().map(|(a, _)| a.port()));
        let even = port != PortRequest::Any;
        let pair = port == PortRequest::EvenReserveNext;
        let port = PORTS
            .clone()
            .find(|p| {
                !used.contains(p)
                    && (!even || p % 2 == 0)
                    && (!pair || (*p < *PORTS.end() && !used.contains(&(p + 1))))
            })
            .ok_or(OpenError::NoPorts)?;
        let addr = SocketAddr::new(ip, port);
        self.open.insert(id, addr);
        self.opened += 1;
        let token = pair.then(|| {
            let t = [self.next_token; 8];
            self.next_token += 1;
            self.held.insert(
                t,
                (SocketAddr::new(ip, port + 1), now + RESERVATION_LIFETIME),
            );
            t
        });
        Ok(Opened { addr, token })
    }

    fn close(&mut self, id: AllocationId) {
        assert!(
            self.open.remove(&id).is_some(),
            "close of a socket that is not open"
        );
        self.closed += 1;
    }
}

// ---------------------------------------------------------------------------------------------
// Harness: core + fake sockets + virtual clock

/// What the backend would put on the wire for one output.
#[derive(Debug)]
struct Sent {
    out: Output,
    bytes: Vec<u8>,
    /// Link of the client a client-bound output goes to.
    link: Link,
}

impl Sent {
    fn reply(&self) -> &[u8] {
        assert!(
            matches!(self.out, Output::Reply { .. }),
            "expected a reply, got {:?}",
            self.out
        );
        &self.bytes
    }
    fn drop_reason(&self) -> Option<DropReason> {
        match self.out {
            Output::Drop(r) => r,
            ref o => panic!("expected a drop, got {o:?}"),
        }
    }
}

struct Harness {
    core: Core,
    sockets: FakeSockets,
    shared: Arc<Shared>,
    cfg: Arc<CoreConfig>,
    now: Instant,
    /// The receive buffer of the last datagram (to check zero-copy ranges).
    last_buf: Vec<u8>,
}

fn base_config() -> CoreConfig {
    let mut cfg = CoreConfig::new(
        REALM,
        sa(LISTENER),
        vec![RELAY_IP.parse().unwrap()],
        [9; 32],
    );
    cfg.port_range = PORTS;
    cfg.service_ports = vec![sa(METRICS)];
    cfg.users
        .insert("alice".into(), long_term_key("alice", REALM, "alice-pw"));
    cfg.users
        .insert("bob".into(), long_term_key("bob", REALM, "bob-pw"));
    cfg.users
        .insert("carol".into(), long_term_key("carol", REALM, "carol-pw"));
    cfg.auth_secrets = vec![b"secret-one".to_vec()];
    cfg
}

impl Harness {
    fn new() -> Self {
        Self::with(|_| {})
    }

    fn with(tweak: impl FnOnce(&mut CoreConfig)) -> Self {
        let mut cfg = base_config();
        tweak(&mut cfg);
        let v4 = cfg.relay_addrs.iter().copied().find(IpAddr::is_ipv4);
        let v6 = cfg.relay_addrs.iter().copied().find(IpAddr::is_ipv6);
        let t0 = Instant::now();
        let shared = Arc::new(Shared::new(t0, UNIX0));
        let cfg = Arc::new(cfg);
        Harness {
            core: Core::new(cfg.clone(), shared.clone(), 42),
            sockets: FakeSockets::new(v4, v6),
            shared,
            cfg,
            now: t0 + Duration::from_secs(10),
            last_buf: Vec::new(),
        }
    }

    /// A datagram from a client to the listener.
    fn client_sends(&mut self, src: SocketAddr, datagram: &[u8]) -> Sent {
        let mut buf = vec![0xEE; HEADROOM + datagram.len()];
        buf[HEADROOM..].copy_from_slice(datagram);
        let mut scratch = vec![0u8; SCRATCH_LEN];
        let out = self.core.handle_listener(
            self.now,
            src,
            &mut buf,
            datagram.len(),
            &mut scratch,
            &mut self.sockets,
        );
        self.finish(out, Link::Udp, buf, scratch)
    }

    /// A message from `client` (a datagram, or one frame of its stream) through
    /// `Core::handle_client`.
    fn client_sends_on(&mut self, client: super::Client, message: &[u8]) -> Sent {
        let mut buf = vec![0xEE; HEADROOM + message.len()];
        buf[HEADROOM..].copy_from_slice(message);
        let mut scratch = vec![0u8; SCRATCH_LEN];
        let r = self.core.handle_client(
            self.now,
            client,
            &mut buf,
            message.len(),
            &mut scratch,
            &mut self.sockets,
        );
        self.finish(r.out, r.link, buf, scratch)
    }

    /// A datagram from a peer to the relayed socket of `id`.
    fn peer_sends(&mut self, id: AllocationId, src: SocketAddr, payload: &[u8]) -> Sent {
        let mut buf = vec![0xEE; HEADROOM + payload.len()];
        buf[HEADROOM..].copy_from_slice(payload);
        let mut scratch = vec![0u8; SCRATCH_LEN];
        let r = self
            .core
            .handle_peer(self.now, id, src, &mut buf, payload.len(), &mut scratch);
        self.finish(r.out, r.link, buf, scratch)
    }

    fn finish(&mut self, out: Output, link: Link, buf: Vec<u8>, scratch: Vec<u8>) -> Sent {
        let bytes = match &out {
            Output::Forward { range, .. } => buf[range.clone()].to_vec(),
            Output::Reply { len, .. } => scratch[..*len].to_vec(),
            Output::Drop(_) => Vec::new(),
        };
        self.last_buf = buf;
        Sent { out, bytes, link }
    }

    /// Moves the virtual clock, firing due timers like a backend would.
    fn advance(&mut self, d: Duration) {
        let target = self.now + d;
        while let Some(t) = self.core.poll_timeout() {
            if t > target {
                break;
            }
            self.now = self.now.max(t);
            self.core.handle_timeout(self.now, &mut self.sockets);
        }
        self.now = target;
        self.core.handle_timeout(self.now, &mut self.sockets);
    }

    fn id_of(&self, relayed: SocketAddr) -> AllocationId {
        *self
            .sockets
            .open
            .iter()
            .find(|(_, a)| **a == relayed)
            .map(|(id, _)| id)
            .expect("relayed address has an open socket")
    }

    fn drops(&self, r: DropReason) -> u64 {
        self.core.counters().drops_for(r)
    }
}

// ---------------------------------------------------------------------------------------------
// Mini TURN client

type Attrs<'a> = &'a dyn Fn(&mut MessageBuilder<'_>);

fn no_attrs(_: &mut MessageBuilder<'_>) {}

fn udp(b: &mut MessageBuilder<'_>) {
    b.add(&RequestedTransport::UDP).unwrap();
}

struct Client {
    addr: SocketAddr,
    /// How the client reaches the relay (UDP unless a test says otherwise).
    link: Link,
    user: String,
    key: [u8; 16],
    nonce: Option<String>,
    tid: u64,
    fingerprint: bool,
    relayed: Option<SocketAddr>,
}

impl Client {
    fn new(addr: &str, user: &str, pass: &str) -> Self {
        Client {
            addr: sa(addr),
            link: Link::Udp,
            user: user.into(),
            key: long_term_key(user, REALM, pass),
            nonce: None,
            tid: 0,
            fingerprint: false,
            relayed: None,
        }
    }

    fn rest(addr: &str, secret: &[u8], expiry: u64, user: &str) -> Self {
        let name = rest::username(expiry, user);
        let pw = rest::password(secret, &name);
        Client::new(addr, &name, &pw)
    }

    /// The same user over a TCP (`tls` false) or TLS connection `id` from the same address.
    fn over_stream(&self, id: u64, tls: bool) -> Self {
        let mut c = Client::new("0.0.0.0:0", &self.user, "unused");
        c.addr = self.addr;
        c.key = self.key;
        c.link = if tls {
            Link::Tls(StreamId(id))
        } else {
            Link::Tcp(StreamId(id))
        };
        c.tid = 1_000_000 * (id + 1);
        c
    }

    /// The core's view of this client.
    fn core_client(&self) -> super::Client {
        super::Client {
            addr: self.addr,
            link: self.link,
        }
    }

    fn next_tid(&mut self) -> TransactionId {
        self.tid += 1;
        let mut t = [0u8; 12];
        t[..8].copy_from_slice(&self.tid.to_be_bytes());
        t[8..10].copy_from_slice(&self.addr.port().to_be_bytes());
        TransactionId(t)
    }

    /// A request with a fresh transaction id.
    fn mk(&mut self, method: Method, attrs: Attrs<'_>, auth: bool) -> Vec<u8> {
        let tid = self.next_tid();
        self.build(tid, method, attrs, auth)
    }

    /// A request; `auth` adds USERNAME, REALM, NONCE and MESSAGE-INTEGRITY.
    fn build(&self, tid: TransactionId, method: Method, attrs: Attrs<'_>, auth: bool) -> Vec<u8> {
        self.build_class(tid, Class::Request, method, attrs, auth)
    }

    fn build_class(
        &self,
        tid: TransactionId,
        class: Class,
        method: Method,
        attrs: Attrs<'_>,
        auth: bool,
    ) -> Vec<u8> {
        let mut buf = vec![0u8; 4096];
        let mut b = MessageBuilder::new(&mut buf, MessageType::new(class, method), tid).unwrap();
        attrs(&mut b);
        if auth {
            b.add(&Username(&self.user)).unwrap();
            b.add(&Realm(REALM)).unwrap();
            b.add(&Nonce(self.nonce.as_deref().unwrap_or("no-nonce-yet")))
                .unwrap();
            b.add_integrity(&self.key).unwrap();
        }
        if self.fingerprint {
            b.add_fingerprint().unwrap();
        }
        let n = b.finish();
        buf.truncate(n);
        buf
    }

    /// Sends an authenticated request; on 401/438 learns the nonce and retries once.
    fn transact(&mut self, h: &mut Harness, method: Method, attrs: Attrs<'_>) -> Vec<u8> {
        for _ in 0..2 {
            let tid = self.next_tid();
            let req = self.build(tid, method, attrs, self.nonce.is_some());
            let sent = h.client_sends_on(self.core_client(), &req);
            assert_eq!(
                sent.link, self.link,
                "the answer goes back on the request's link"
            );
            let resp = sent.reply().to_vec();
            let m = Message::parse(&resp).unwrap();
            assert_eq!(m.transaction_id(), tid);
            match err_code(&resp) {
                Some(401) | Some(438) if self.nonce.is_none() || err_code(&resp) == Some(438) => {
                    self.nonce = Some(nonce_of(&resp));
                }
                _ => return resp,
            }
        }
        panic!("no answer after learning the nonce");
    }

    fn allocate(&mut self, h: &mut Harness) -> Result<SocketAddr, u16> {
        self.allocate_with(h, &udp)
    }

    fn allocate_with(&mut self, h: &mut Harness, attrs: Attrs<'_>) -> Result<SocketAddr, u16> {
        self.allocate_reserving(h, attrs).map(|(r, _)| r)
    }

    /// Allocate and return the RESERVATION-TOKEN of the answer too.
    fn allocate_reserving(
        &mut self,
        h: &mut Harness,
        attrs: Attrs<'_>,
    ) -> Result<(SocketAddr, Option<[u8; 8]>), u16> {
        let resp = self.transact(h, Method::ALLOCATE, attrs);
        if let Some(code) = err_code(&resp) {
            return Err(code);
        }
        let m = Message::parse(&resp).unwrap();
        m.verify_integrity(&self.key)
            .expect("success response carries our MESSAGE-INTEGRITY");
        let XorRelayedAddress(r) = m.get::<XorRelayedAddress>().unwrap().unwrap();
        self.relayed = Some(r);
        let token = m.get::<ReservationToken>().map(|t| t.unwrap().0);
        Ok((r, token))
    }

    fn refresh(&mut self, h: &mut Harness, lifetime: Option<u32>) -> Vec<u8> {
        self.transact(h, Method::REFRESH, &move |b| {
            if let Some(l) = lifetime {
                b.add(&Lifetime(l)).unwrap();
            }
        })
    }

    fn permit(&mut self, h: &mut Harness, peers: &[SocketAddr]) -> Option<u16> {
        let peers = peers.to_vec();
        let resp = self.transact(h, Method::CREATE_PERMISSION, &move |b| {
            for p in &peers {
                b.add(&XorPeerAddress(*p)).unwrap();
            }
        });
        err_code(&resp)
    }

    fn bind(&mut self, h: &mut Harness, ch: u16, peer: SocketAddr) -> Option<u16> {
        let resp = self.transact(h, Method::CHANNEL_BIND, &move |b| {
            b.add_raw(0x000C, &[(ch >> 8) as u8, ch as u8, 0, 0])
                .unwrap();
            b.add(&XorPeerAddress(peer)).unwrap();
        });
        err_code(&resp)
    }

    fn send_indication(&mut self, peer: SocketAddr, data: &[u8]) -> Vec<u8> {
        let tid = self.next_tid();
        let data = data.to_vec();
        self.build_class(
            tid,
            Class::Indication,
            Method::SEND,
            &move |b| {
                b.add(&XorPeerAddress(peer)).unwrap();
                b.add(&Data(&data)).unwrap();
            },
            false,
        )
    }
}

fn err_code(resp: &[u8]) -> Option<u16> {
    let m = Message::parse(resp).expect("response parses");
    match m.class() {
        Class::Success => None,
        Class::Error => Some(m.get::<ErrorCode>().unwrap().unwrap().code),
        c => panic!("not a response: {c:?}"),
    }
}

fn nonce_of(resp: &[u8]) -> String {
    let m = Message::parse(resp).unwrap();
    m.get::<Nonce>()
        .expect("NONCE present")
        .unwrap()
        .0
        .to_owned()
}

fn lifetime_of(resp: &[u8]) -> u32 {
    let m = Message::parse(resp).unwrap();
    m.get::<Lifetime>().unwrap().unwrap().0
}

fn channel_data(ch: u16, payload: &[u8]) -> Vec<u8> {
    // raw framing, so tests can also build invalid channel numbers
    let mut v = Vec::with_capacity(4 + payload.len());
    v.extend_from_slice(&ch.to_be_bytes());
    v.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

const PEER: &str = "93.184.216.34:7000";
const PEER2: &str = "8.8.4.4:7001";

/// alice allocated at 198.51.100.20:40000.
fn alice(h: &mut Harness) -> Client {
    let mut c = Client::new("198.51.100.20:40000", "alice", "alice-pw");
    c.allocate(h).expect("alice allocates");
    c
}

// ---------------------------------------------------------------------------------------------
// Binding, parsing, drops

#[test]
fn binding_answers_xor_mapped_address_and_fingerprint() {
    let mut h = Harness::new();
    let mut c = Client::new("198.51.100.7:5555", "alice", "x");
    c.fingerprint = true;
    let tid = c.next_tid();
    let req = c.build(tid, Method::BINDING, &no_attrs, false);
    let resp = h.client_sends(c.addr, &req).reply().to_vec();
    let m = Message::parse(&resp).unwrap();
    assert_eq!(m.class(), Class::Success);
    assert_eq!(m.method(), Method::BINDING);
    assert_eq!(m.transaction_id(), tid);
    assert_eq!(m.get::<XorMappedAddress>().unwrap().unwrap().0, c.addr);
    assert!(m.has_fingerprint());
    // without FINGERPRINT in the request, none in the response
    c.fingerprint = false;
    let req = c.mk(Method::BINDING, &no_attrs, false);
    let resp = h.client_sends(c.addr, &req).reply().to_vec();
    assert!(!Message::parse(&resp).unwrap().has_fingerprint());
    assert_eq!(h.core.counters().req_binding, 2);
    assert_eq!(h.core.allocations(), 0);
}

#[test]
fn unknown_comprehension_required_attribute_gets_420_listing_it() {
    let mut h = Harness::new();
    let mut c = Client::new("198.51.100.7:5555", "alice", "alice-pw");
    let req = c.mk(
        Method::BINDING,
        &|b| {
            b.add_raw(0x7F01, &[1, 2, 3, 4]).unwrap();
            b.add_raw(0xC001, &[1, 2, 3, 4]).unwrap(); // comprehension-optional: ignored
        },
        false,
    );
    let resp = h.client_sends(c.addr, &req).reply().to_vec();
    assert_eq!(err_code(&resp), Some(420));
    let m = Message::parse(&resp).unwrap();
    assert_eq!(
        m.get::<UnknownAttributes>().unwrap().unwrap().as_slice(),
        &[0x7F01]
    );

    // Authenticated Allocate with an unknown attribute: 420 with MESSAGE-INTEGRITY, no state.
    let resp = c.transact(&mut h, Method::ALLOCATE, &|b| {
        udp(b);
        b.add_raw(0x7F02, &[0; 4]).unwrap();
    });
    assert_eq!(err_code(&resp), Some(420));
    let m = Message::parse(&resp).unwrap();
    assert_eq!(
        m.get::<UnknownAttributes>().unwrap().unwrap().as_slice(),
        &[0x7F02]
    );
    m.verify_integrity(&c.key).unwrap();
    assert_eq!(h.core.allocations(), 0);
}

#[test]
fn malformed_short_and_non_stun_datagrams_are_dropped_without_state() {
    let mut h = Harness::new();
    let src = sa("198.51.100.7:5555");
    let c = Client::new("198.51.100.7:5555", "alice", "x");
    let good = c.build(TransactionId([1; 12]), Method::BINDING, &no_attrs, false);
    let cases: Vec<(Vec<u8>, DropReason)> = vec![
        (vec![], DropReason::NotStun),
        (vec![0x00, 0x01, 0x00], DropReason::NotStun), // < 20 bytes
        (good[..19].to_vec(), DropReason::NotStun),    // truncated header
        (
            {
                let mut v = good.clone();
                v[4] ^= 0xFF;
                v
            },
            DropReason::NotStun,
        ), // bad cookie
        (vec![0xC3; 40], DropReason::NotStun),         // random high bytes
        (vec![0x80; 60], DropReason::NotStun),         // RTP-looking
        (
            {
                let mut v = good.clone();
                v[3] = 2;
                v
            },
            DropReason::Malformed,
        ), // length not /4
        (
            {
                let mut v = good.clone();
                v.extend_from_slice(&[0; 4]);
                v
            },
            DropReason::Malformed,
        ),
        // attribute running past the end
        (
            {
                let mut v = good.clone();
                v[3] = 8;
                v.extend_from_slice(&[0x80, 0x22, 0x00, 0x40, 0, 0, 0, 0]);
                v
            },
            DropReason::Malformed,
        ),
        // bad FINGERPRINT
        (
            {
                let mut c2 = Client::new("198.51.100.7:5555", "alice", "x");
                c2.fingerprint = true;
                let mut v = c2.build(TransactionId([2; 12]), Method::BINDING, &no_attrs, false);
                let n = v.len();
                v[n - 1] ^= 1;
                v
            },
            DropReason::BadFingerprint,
        ),
        // a success response arriving at the relay
        (
            c.build_class(
                TransactionId([3; 12]),
                Class::Success,
                Method::BINDING,
                &no_attrs,
                false,
            ),
            DropReason::Unexpected,
        ),
    ];
    for (i, (dgram, reason)) in cases.iter().enumerate() {
        let sent = h.client_sends(src, dgram);
        assert_eq!(sent.drop_reason(), Some(*reason), "case {i}");
    }
    assert_eq!(h.core.table_sizes(), (0, 0, 0, 0, 0));
    assert_eq!(h.drops(DropReason::NotStun), 6);
    assert_eq!(h.drops(DropReason::Malformed), 3);
}

#[test]
fn bad_channel_data_is_dropped_with_reason() {
    let mut h = Harness::new();
    let mut a = alice(&mut h);
    let peer = sa(PEER);
    assert_eq!(a.bind(&mut h, 0x4001, peer), None);
    let before = h.core.counters().packets_client_to_peer;
    // out of range channel numbers
    assert_eq!(
        h.client_sends(a.addr, &channel_data(0x5000, b"x"))
            .drop_reason(),
        Some(DropReason::BadChannel)
    );
    assert_eq!(
        h.client_sends(a.addr, &channel_data(0x7FFF, b"x"))
            .drop_reason(),
        Some(DropReason::BadChannel)
    );
    // unbound
    assert_eq!(
        h.client_sends(a.addr, &channel_data(0x4002, b"x"))
            .drop_reason(),
        Some(DropReason::UnboundChannel)
    );
    // wrong length: claims more than present, or more than 3 bytes of trailing garbage
    let mut long = channel_data(0x4001, b"abcd");
    long[3] = 9;
    assert_eq!(
        h.client_sends(a.addr, &long).drop_reason(),
        Some(DropReason::BadLength)
    );
    let mut extra = channel_data(0x4001, b"abcd");
    extra.extend_from_slice(&[0; 8]);
    assert_eq!(
        h.client_sends(a.addr, &extra).drop_reason(),
        Some(DropReason::BadLength)
    );
    // too short for a header
    assert_eq!(
        h.client_sends(a.addr, &[0x40, 0x01]).drop_reason(),
        Some(DropReason::Malformed)
    );
    // from a 5-tuple without allocation
    assert_eq!(
        h.client_sends(sa("198.51.100.99:1"), &channel_data(0x4001, b"x"))
            .drop_reason(),
        Some(DropReason::NoAllocation)
    );
    assert_eq!(h.core.counters().packets_client_to_peer, before);
    assert_eq!(h.core.allocations(), 1);
}

// ---------------------------------------------------------------------------------------------
// Authentication

#[test]
fn no_credentials_get_401_with_realm_and_nonce_and_no_state() {
    let mut h = Harness::new();
    let mut c = Client::new("198.51.100.20:40000", "alice", "alice-pw");
    let req = c.mk(Method::ALLOCATE, &udp, false);
    let resp = h.client_sends(c.addr, &req).reply().to_vec();
    assert_eq!(err_code(&resp), Some(401));
    let m = Message::parse(&resp).unwrap();
    assert_eq!(m.get::<Realm>().unwrap().unwrap().0, REALM);
    assert!(!nonce_of(&resp).is_empty());
    assert!(!m.has_integrity());
    // nothing but one (fixed-size) rate-limit slot
    assert_eq!(h.core.table_sizes(), (0, 0, 0, 0, 1));
    assert_eq!(h.sockets.opened, 0);
    assert_eq!(h.shared.total_allocations(), 0);
}

#[test]
fn forged_expired_and_other_address_nonces_get_438_with_a_fresh_nonce() {
    let mut h = Harness::with(|c| c.nonce_lifetime = Duration::from_secs(60));
    let mut c = Client::new("198.51.100.20:40000", "alice", "alice-pw");
    // forged
    c.nonce = Some("0000000000000000000000000000abcd".into());
    let resp = h.client_sends(c.addr, &c.mk(Method::ALLOCATE, &udp, true));
    let resp = resp.reply().to_vec();
    assert_eq!(err_code(&resp), Some(438));
    let fresh = nonce_of(&resp);
    assert!(!Message::parse(&resp).unwrap().has_integrity());
    // the fresh nonce works
    c.nonce = Some(fresh.clone());
    let ok = h.client_sends(c.addr, &c.mk(Method::ALLOCATE, &udp, true));
    assert_eq!(err_code(ok.reply()), None);
    // the same nonce from another IP address -> 438
    let mut other = Client::new("198.51.100.21:40000", "alice", "alice-pw");
    other.nonce = Some(fresh.clone());
    let resp = h.client_sends(other.addr, &other.mk(Method::ALLOCATE, &udp, true));
    assert_eq!(err_code(resp.reply()), Some(438));
    // expired: after the nonce lifetime the next request gets 438 and a new nonce
    h.advance(h.cfg.nonce_lifetime);
    let resp = c.refresh(&mut h, Some(600)); // transact retries after learning the new nonce
    assert_eq!(err_code(&resp), None);
    assert_ne!(c.nonce.as_deref(), Some(fresh.as_str()));
    assert_eq!(h.core.counters().stale_nonces, 3);
    assert_eq!(h.core.allocations(), 1);
}

#[test]
fn bad_message_integrity_or_unknown_user_gets_401() {
    let mut h = Harness::new();
    let mut wrong = Client::new("198.51.100.20:40000", "alice", "not-the-password");
    let resp = wrong.transact(&mut h, Method::ALLOCATE, &udp);
    assert_eq!(err_code(&resp), Some(401));
    // a flipped byte after a correct MI: the MI no longer matches
    let mut c = Client::new("198.51.100.20:40000", "alice", "alice-pw");
    c.nonce = wrong.nonce.clone();
    let mut req = c.mk(Method::ALLOCATE, &udp, true);
    let n = req.len();
    req[n - 1] ^= 0x01;
    assert_eq!(err_code(h.client_sends(c.addr, &req).reply()), Some(401));
    let mut nobody = Client::new("198.51.100.20:40000", "mallory", "pw");
    nobody.nonce = wrong.nonce.clone();
    assert_eq!(
        err_code(&nobody.transact(&mut h, Method::ALLOCATE, &udp)),
        Some(401)
    );
    // MI present but USERNAME missing -> 400
    let mut b = vec![0u8; 512];
    let mut mb = MessageBuilder::new(
        &mut b,
        MessageType::ALLOCATE_REQUEST,
        TransactionId([5; 12]),
    )
    .unwrap();
    udp(&mut mb);
    mb.add_integrity(&c.key).unwrap();
    let n = mb.finish();
    assert_eq!(err_code(h.client_sends(c.addr, &b[..n]).reply()), Some(400));
    assert_eq!(h.core.counters().auth_failures, 3);
    assert_eq!(h.core.allocations(), 0);
}

#[test]
fn rest_credentials_expiry_range_and_rotation() {
    let mut h = Harness::with(|c| {
        c.auth_secrets = vec![b"new-secret".to_vec(), b"old-secret".to_vec()];
        c.rest_max_ttl = Duration::from_secs(86_400);
    });
    let now_unix = UNIX0 + 10;
    // both secrets are accepted during rotation
    let mut a = Client::rest("198.51.100.30:1000", b"new-secret", now_unix + 3600, "u1");
    assert!(a.allocate(&mut h).is_ok());
    let mut b = Client::rest("198.51.100.30:1001", b"old-secret", now_unix + 3600, "u2");
    assert!(b.allocate(&mut h).is_ok());
    // unknown secret, expired, far future, non-numeric -> 401
    let mut bad = Client::rest("198.51.100.30:1002", b"other-secret", now_unix + 3600, "u3");
    assert_eq!(bad.allocate(&mut h), Err(401));
    let mut expired = Client::rest("198.51.100.30:1003", b"new-secret", now_unix - 1, "u4");
    assert_eq!(expired.allocate(&mut h), Err(401));
    let mut far = Client::rest(
        "198.51.100.30:1004",
        b"new-secret",
        now_unix + 86_400 + 100,
        "u5",
    );
    assert_eq!(far.allocate(&mut h), Err(401));
    let name = "12ab:u6";
    let mut nonnum = Client::new(
        "198.51.100.30:1005",
        name,
        &rest::password(b"new-secret", name),
    );
    assert_eq!(nonnum.allocate(&mut h), Err(401));
    assert_eq!(h.core.allocations(), 2);
    // credentials valid now expire with the monotonic clock
    let mut short = Client::rest("198.51.100.30:1006", b"new-secret", now_unix + 100, "u7");
    h.advance(Duration::from_secs(101));
    assert_eq!(short.allocate(&mut h), Err(401));
}

#[test]
fn unauthenticated_401s_are_rate_limited_per_source_ip() {
    let mut h = Harness::with(|c| {
        c.unauth_rate_per_sec = 1;
        c.unauth_burst = 3;
    });
    let c = Client::new("198.51.100.20:40000", "alice", "alice-pw");
    let mut replies = 0;
    for i in 0..10u8 {
        let req = c.build(TransactionId([i; 12]), Method::ALLOCATE, &udp, false);
        match h.client_sends(c.addr, &req).out {
            Output::Reply { .. } => replies += 1,
            Output::Drop(Some(DropReason::RateLimited)) => {}
            ref o => panic!("unexpected {o:?}"),
        }
    }
    assert_eq!(replies, 3);
    assert_eq!(h.drops(DropReason::RateLimited), 7);
    // another source is not affected; the first recovers after a second
    let other = Client::new("198.51.100.21:40000", "alice", "alice-pw");
    let req = other.build(TransactionId([99; 12]), Method::ALLOCATE, &udp, false);
    assert!(matches!(
        h.client_sends(other.addr, &req).out,
        Output::Reply { .. }
    ));
    h.advance(Duration::from_secs(1));
    let req = c.build(TransactionId([100; 12]), Method::ALLOCATE, &udp, false);
    assert!(matches!(
        h.client_sends(c.addr, &req).out,
        Output::Reply { .. }
    ));
}

#[test]
fn a_new_socket_of_the_same_ip_allocates_with_its_nonce_on_the_first_request() {
    let mut h = Harness::new();
    let mut first = Client::new("198.51.100.20:40000", "alice", "alice-pw");
    first.allocate(&mut h).unwrap();
    let challenged = h.core.counters().resp_error[error_index(401)];
    // A second socket of the same host reuses realm and nonce: one request, no 401.
    let mut second = Client::new("198.51.100.20:40001", "alice", "alice-pw");
    second.nonce = first.nonce.clone();
    let tid = second.next_tid();
    let req = second.build(tid, Method::ALLOCATE, &udp, true);
    let resp = h.client_sends(second.addr, &req).reply().to_vec();
    assert_eq!(
        err_code(&resp),
        None,
        "first Allocate of the new socket succeeds"
    );
    assert_eq!(h.core.counters().resp_error[error_index(401)], challenged);
    assert_eq!(h.core.allocations(), 2);
}

#[test]
fn a_thousand_clients_behind_one_address_are_all_challenged_under_the_default_limits() {
    // Defaults (no limiter overrides): 1,000 sockets of one NAT address send their first,
    // unauthenticated Allocate at the same instant; every one gets its 401 and then allocates.
    let mut h = Harness::with(|c| c.max_allocations_per_user = 2_000);
    let mut clients: Vec<Client> = (0..1000u32)
        .map(|i| {
            Client::new(
                &format!("198.51.100.20:{}", 20_000 + i),
                "alice",
                "alice-pw",
            )
        })
        .collect();
    for c in &mut clients {
        let tid = c.next_tid();
        let req = c.build(tid, Method::ALLOCATE, &udp, false);
        let resp = h.client_sends(c.addr, &req).reply().to_vec();
        assert_eq!(err_code(&resp), Some(401));
        c.nonce = Some(nonce_of(&resp));
    }
    assert_eq!(h.drops(DropReason::RateLimited), 0);
    for c in &mut clients {
        c.allocate(&mut h).unwrap();
    }
    assert_eq!(h.core.allocations(), 1000);
}

#[test]
fn unauthenticated_errors_carry_only_what_the_protocol_requires() {
    // Even with SOFTWARE configured, a 401/438/400 to an unauthenticated request carries only
    // ERROR-CODE (plus REALM and NONCE for 401/438, FINGERPRINT iff the request had one): a
    // spoofed request reflects as little as TURN allows.
    let mut h = Harness::with(|c| c.software = Some("peerlink-relay".into()));
    for fingerprint in [false, true] {
        let mut c = Client::new("198.51.100.20:40000", "alice", "alice-pw");
        c.fingerprint = fingerprint;
        let tid = c.next_tid();
        let req = c.build(tid, Method::ALLOCATE, &udp, false);
        let resp = h.client_sends(c.addr, &req).reply().to_vec();
        assert_eq!(err_code(&resp), Some(401));
        let m = Message::parse(&resp).unwrap();
        let types: Vec<u16> = m.attributes().map(|a| a.typ).collect();
        assert_eq!(
            types,
            [attr_type::ERROR_CODE, attr_type::REALM, attr_type::NONCE]
        );
        let realm_attr = 4 + REALM.len().next_multiple_of(4);
        let expected = 20 + (4 + 4 + "Unauthorized".len()) + realm_attr + (4 + auth::NONCE_LEN);
        assert_eq!(resp.len(), expected + if fingerprint { 8 } else { 0 });
    }
    // A credentialed request with a forged nonce: 438, same shape.
    let mut forged = Client::new("198.51.100.20:40000", "alice", "alice-pw");
    forged.nonce = Some("0000000000000000000000000000abcd".into());
    let tid = forged.next_tid();
    let resp = h
        .client_sends(
            forged.addr,
            &forged.build(tid, Method::ALLOCATE, &udp, true),
        )
        .reply()
        .to_vec();
    assert_eq!(err_code(&resp), Some(438));
    assert!(
        Message::parse(&resp)
            .unwrap()
            .raw(attr_type::SOFTWARE)
            .is_none()
    );
}

#[test]
fn spoofed_allocate_flood_keeps_memory_flat() {
    let mut h = Harness::new();
    let cap = h.cfg.rate_table_size;
    for i in 0..100_000u32 {
        let ip = std::net::Ipv4Addr::from(0x0B00_0000 + i); // 11.x.y.z, distinct per request
        let src = SocketAddr::new(IpAddr::V4(ip), (i % 60_000) as u16 + 1024);
        let mut b = [0u8; 64];
        let mut mb = MessageBuilder::new(
            &mut b,
            MessageType::ALLOCATE_REQUEST,
            TransactionId([7; 12]),
        )
        .unwrap();
        udp(&mut mb);
        let n = mb.finish();
        let out = h.client_sends(src, &b[..n]).out;
        assert!(matches!(
            out,
            Output::Reply { .. } | Output::Drop(Some(DropReason::RateLimited))
        ));
    }
    let (allocs, by_client, by_relayed, timers, rate) = h.core.table_sizes();
    assert_eq!((allocs, by_client, by_relayed, timers), (0, 0, 0, 0));
    assert!(rate <= cap, "rate table {rate} > capacity {cap}");
    assert_eq!(h.sockets.opened, 0);
    assert_eq!(
        h.core.counters().errors_for(401) + h.drops(DropReason::RateLimited),
        100_000
    );
}

// ---------------------------------------------------------------------------------------------
// Allocate

#[test]
fn allocate_success_carries_relayed_lifetime_mapped_and_integrity() {
    let mut h = Harness::new();
    let mut c = Client::new("198.51.100.20:40000", "alice", "alice-pw");
    c.fingerprint = true;
    let resp = c.transact(&mut h, Method::ALLOCATE, &|b| {
        udp(b);
        b.add_raw(0x001A, &[]).unwrap(); // DONT-FRAGMENT accepted
    });
    assert_eq!(err_code(&resp), None);
    let m = Message::parse(&resp).unwrap();
    m.verify_integrity(&c.key).unwrap();
    assert!(m.has_fingerprint());
    let relayed = m.get::<XorRelayedAddress>().unwrap().unwrap().0;
    assert_eq!(relayed.ip(), RELAY_IP.parse::<IpAddr>().unwrap());
    assert!(PORTS.contains(&relayed.port()));
    assert_eq!(m.get::<Lifetime>().unwrap().unwrap().0, 600);
    assert_eq!(m.get::<XorMappedAddress>().unwrap().unwrap().0, c.addr);
    assert_eq!(h.core.allocations(), 1);
    assert_eq!(h.shared.total_allocations(), 1);
    let id = h.id_of(relayed);
    assert_eq!(h.core.relayed_addr(id), Some(relayed));
    assert!(h.core.dont_fragment(id));
    assert_eq!(h.core.counters().allocations_created, 1);
}

#[test]
fn requested_transport_must_be_udp() {
    let mut h = Harness::new();
    let mut c = Client::new("198.51.100.20:40000", "alice", "alice-pw");
    assert_eq!(
        c.allocate_with(&mut h, &|b| b.add(&RequestedTransport::TCP).unwrap()),
        Err(442)
    );
    assert_eq!(c.allocate_with(&mut h, &no_attrs), Err(400));
    assert_eq!(h.core.allocations(), 0);
    assert_eq!(h.sockets.opened, 0);
}

#[test]
fn lifetime_default_clamped_and_floored() {
    let mut h = Harness::new();
    let mut c = Client::new("198.51.100.20:40000", "alice", "alice-pw");
    let resp = c.transact(&mut h, Method::ALLOCATE, &|b| {
        udp(b);
        b.add(&Lifetime(1_000_000)).unwrap();
    });
    assert_eq!(lifetime_of(&resp), 3600);
    let mut d = Client::new("198.51.100.20:40001", "bob", "bob-pw");
    let resp = d.transact(&mut h, Method::ALLOCATE, &|b| {
        udp(b);
        b.add(&Lifetime(5)).unwrap();
    });
    assert_eq!(lifetime_of(&resp), 600);
    assert_eq!(lifetime_of(&c.refresh(&mut h, Some(99_999))), 3600);
    assert_eq!(lifetime_of(&c.refresh(&mut h, Some(120))), 120);
    assert_eq!(lifetime_of(&c.refresh(&mut h, None)), 600);
}

#[test]
fn retransmitted_allocate_gets_the_same_answer_and_one_allocation() {
    let mut h = Harness::new();
    let mut c = Client::new("198.51.100.20:40000", "alice", "alice-pw");
    let first = c.transact(&mut h, Method::ALLOCATE, &udp);
    assert_eq!(err_code(&first), None);
    let tid = Message::parse(&first).unwrap().transaction_id();
    let again = c.build(tid, Method::ALLOCATE, &udp, true);
    let second = h.client_sends(c.addr, &again).reply().to_vec();
    assert_eq!(first, second);
    assert_eq!(h.core.allocations(), 1);
    assert_eq!(h.sockets.opened, 1);
    // a new transaction on the allocated 5-tuple -> 437, with MESSAGE-INTEGRITY
    let resp = c.transact(&mut h, Method::ALLOCATE, &udp);
    assert_eq!(err_code(&resp), Some(437));
    Message::parse(&resp)
        .unwrap()
        .verify_integrity(&c.key)
        .unwrap();
    // the original transaction is still answered with its success, even after the 437
    assert_eq!(h.client_sends(c.addr, &again).reply(), &first[..]);
    assert_eq!(h.core.allocations(), 1);
    assert_eq!(h.core.counters().allocations_created, 1);
    // retransmitted CreatePermission / Refresh: same bytes, nothing new done
    let perm = c.transact(&mut h, Method::CREATE_PERMISSION, &|b| {
        b.add(&XorPeerAddress(sa(PEER))).unwrap();
    });
    assert_eq!(err_code(&perm), None);
    let ptid = Message::parse(&perm).unwrap().transaction_id();
    let preq = c.build(
        ptid,
        Method::CREATE_PERMISSION,
        &|b| {
            b.add(&XorPeerAddress(sa(PEER))).unwrap();
        },
        true,
    );
    assert_eq!(h.client_sends(c.addr, &preq).reply(), &perm[..]);
    let successes = h.core.counters().resp_success;
    assert_eq!(h.client_sends(c.addr, &preq).reply(), &perm[..]);
    assert_eq!(
        h.core.counters().resp_success,
        successes,
        "replayed, not re-executed"
    );
}

#[test]
fn another_users_allocation_gets_441() {
    let mut h = Harness::new();
    let a = alice(&mut h);
    let mut bob_same_tuple = Client::new("198.51.100.20:40000", "bob", "bob-pw");
    assert_eq!(bob_same_tuple.permit(&mut h, &[sa(PEER)]), Some(441));
    let resp = bob_same_tuple.refresh(&mut h, Some(0));
    assert_eq!(err_code(&resp), Some(441));
    Message::parse(&resp)
        .unwrap()
        .verify_integrity(&bob_same_tuple.key)
        .unwrap();
    assert_eq!(bob_same_tuple.bind(&mut h, 0x4000, sa(PEER)), Some(441));
    // alice's allocation is untouched
    assert_eq!(h.core.allocations(), 1);
    assert!(h.sockets.open.values().any(|r| Some(*r) == a.relayed));
}

#[test]
fn even_port_reservation_token_and_address_family() {
    let mut h = Harness::with(|c| c.relay_addrs.push("2001:db8::10".parse().unwrap()));
    // occupy an even port so EVEN-PORT has to skip to the next even one
    let mut first = Client::new("198.51.100.20:40000", "alice", "alice-pw");
    first.allocate(&mut h).unwrap();
    let mut c = Client::new("198.51.100.20:40001", "alice", "alice-pw");
    let r = c
        .allocate_with(&mut h, &|b| {
            udp(b);
            b.add(&EvenPort { reserve: false }).unwrap();
        })
        .unwrap();
    assert_eq!(r.port() % 2, 0);
    assert_eq!(r.port(), 50_002);
    // R=1: an even port, and the next one held under the RESERVATION-TOKEN of the answer
    let mut d = Client::new("198.51.100.20:40002", "alice", "alice-pw");
    let (rtp, token) = d
        .allocate_reserving(&mut h, &|b| {
            udp(b);
            b.add(&EvenPort { reserve: true }).unwrap();
        })
        .unwrap();
    assert_eq!(rtp.port() % 2, 0);
    let token = token.expect("R=1 answer carries a RESERVATION-TOKEN");
    // the token together with EVEN-PORT or an address family -> 400
    let mut e = Client::new("198.51.100.20:40003", "alice", "alice-pw");
    let with_token = move |b: &mut MessageBuilder<'_>| {
        udp(b);
        b.add(&ReservationToken(token)).unwrap();
    };
    assert_eq!(
        e.allocate_with(&mut h, &|b| {
            with_token(b);
            b.add(&EvenPort { reserve: false }).unwrap();
        }),
        Err(400)
    );
    assert_eq!(
        e.allocate_with(&mut h, &|b| {
            with_token(b);
            b.add(&RequestedAddressFamily(AddressFamily::V4)).unwrap();
        }),
        Err(400)
    );
    // a plain allocation never lands on the held port
    let mut other = Client::new("198.51.100.20:40004", "alice", "alice-pw");
    assert_ne!(other.allocate(&mut h).unwrap().port(), rtp.port() + 1);
    // the token gets exactly the held port, once
    let rtcp = e.allocate_with(&mut h, &with_token).unwrap();
    assert_eq!(rtcp, SocketAddr::new(rtp.ip(), rtp.port() + 1));
    let mut again = Client::new("198.51.100.20:40005", "alice", "alice-pw");
    assert_eq!(again.allocate_with(&mut h, &with_token), Err(508));
    // an unknown token -> 508
    assert_eq!(
        again.allocate_with(&mut h, &|b| {
            udp(b);
            b.add(&ReservationToken([0xEE; 8])).unwrap();
        }),
        Err(508)
    );
    // an unclaimed hold ends after RESERVATION_LIFETIME
    let (_, late) = again
        .allocate_reserving(&mut h, &|b| {
            udp(b);
            b.add(&EvenPort { reserve: true }).unwrap();
        })
        .unwrap();
    h.advance(RESERVATION_LIFETIME + Duration::from_secs(1));
    let late = late.unwrap();
    let mut d = Client::new("198.51.100.20:40006", "alice", "alice-pw");
    assert_eq!(
        d.allocate_with(&mut h, &move |b| {
            udp(b);
            b.add(&ReservationToken(late)).unwrap();
        }),
        Err(508)
    );
    // IPv6 relayed address on request
    let r6 = d
        .allocate_with(&mut h, &|b| {
            udp(b);
            b.add(&RequestedAddressFamily(AddressFamily::V6)).unwrap();
        })
        .unwrap();
    assert!(r6.is_ipv6());
    // unknown family value -> 440
    let mut f = Client::new("198.51.100.20:40007", "alice", "alice-pw");
    assert_eq!(
        f.allocate_with(&mut h, &|b| {
            udp(b);
            b.add_raw(0x0017, &[0x03, 0, 0, 0]).unwrap();
        }),
        Err(440)
    );
    // first, c, d (R=1), e (the token), other, again (R=1), d (v6)
    assert_eq!(h.core.allocations(), 7);
}

#[test]
fn address_family_without_relay_address_gets_440() {
    let mut h = Harness::new(); // IPv4 only
    let mut c = Client::new("198.51.100.20:40000", "alice", "alice-pw");
    assert_eq!(
        c.allocate_with(&mut h, &|b| {
            udp(b);
            b.add(&RequestedAddressFamily(AddressFamily::V6)).unwrap();
        }),
        Err(440)
    );
    assert_eq!(h.core.allocations(), 0);
}

#[test]
fn quotas_486_and_508_then_recovery() {
    let mut h = Harness::with(|c| {
        c.max_allocations_per_user = 2;
        c.max_allocations = 3;
    });
    let mut a1 = Client::new("198.51.100.20:1", "alice", "alice-pw");
    let mut a2 = Client::new("198.51.100.20:2", "alice", "alice-pw");
    let mut a3 = Client::new("198.51.100.20:3", "alice", "alice-pw");
    a1.allocate(&mut h).unwrap();
    a2.allocate(&mut h).unwrap();
    assert_eq!(a3.allocate(&mut h), Err(486));
    let mut b1 = Client::new("198.51.100.21:1", "bob", "bob-pw");
    let mut c1 = Client::new("198.51.100.22:1", "carol", "carol-pw");
    b1.allocate(&mut h).unwrap();
    assert_eq!(c1.allocate(&mut h), Err(508));
    // load falls -> both recover
    assert_eq!(err_code(&a1.refresh(&mut h, Some(0))), None);
    assert_eq!(c1.allocate(&mut h).map(|_| ()), Ok(()));
    assert_eq!(err_code(&a2.refresh(&mut h, Some(0))), None);
    assert!(a3.allocate(&mut h).is_ok());
    assert_eq!(h.shared.total_allocations(), 3);
}

#[test]
fn out_of_ports_gets_508_and_recovers() {
    let mut h = Harness::new();
    h.sockets.limit = 1;
    let mut a = alice(&mut h);
    let mut b = Client::new("198.51.100.21:1", "bob", "bob-pw");
    assert_eq!(b.allocate(&mut h), Err(508));
    assert_eq!(
        h.shared.total_allocations(),
        1,
        "failed open gives its quota back"
    );
    assert_eq!(err_code(&a.refresh(&mut h, Some(0))), None);
    assert!(b.allocate(&mut h).is_ok());
}

#[test]
fn draining_refuses_new_allocations_and_serves_existing() {
    let mut h = Harness::new();
    let mut a = alice(&mut h);
    h.shared.set_draining(true);
    let mut b = Client::new("198.51.100.21:1", "bob", "bob-pw");
    assert_eq!(b.allocate(&mut h), Err(508));
    assert_eq!(err_code(&a.refresh(&mut h, Some(600))), None);
    assert_eq!(a.permit(&mut h, &[sa(PEER)]), None);
    h.shared.set_draining(false);
    assert!(b.allocate(&mut h).is_ok());
}

/// The ALTERNATE-SERVER of a 300 answer, checked for our integrity.
fn alternate_of(c: &Client, resp: &[u8]) -> SocketAddr {
    let m = Message::parse(resp).unwrap();
    assert_eq!(m.get::<ErrorCode>().unwrap().unwrap().code, 300);
    m.verify_integrity(&c.key)
        .expect("a 300 carries MESSAGE-INTEGRITY, so a client can trust the redirect");
    m.get::<AlternateServer>().unwrap().unwrap().0
}

const ALT_V4: &str = "198.51.100.50:3478";
const ALT_TLS: &str = "198.51.100.50:443";

fn with_alternates(h: &Harness) {
    h.shared.set_alternates(vec![
        Alternate {
            udp: sa("[2001:db8::50]:3478"),
            tcp: None,
            tls: None,
        },
        Alternate {
            udp: sa(ALT_V4),
            tcp: None,
            tls: Some(sa(ALT_TLS)),
        },
    ]);
}

#[test]
fn a_draining_relay_names_an_alternate_of_the_clients_family_and_transport() {
    let mut h = Harness::new();
    with_alternates(&h);
    let mut a = alice(&mut h);
    h.shared.set_draining(true);
    let mut b = Client::new("198.51.100.21:1", "bob", "bob-pw");
    let resp = b.transact(&mut h, Method::ALLOCATE, &udp);
    assert_eq!(alternate_of(&b, &resp), sa(ALT_V4));
    // over TLS: the alternate's TLS listener; over TCP: none has one -> 508
    let mut tls = b.over_stream(1, true);
    let resp = tls.transact(&mut h, Method::ALLOCATE, &udp);
    assert_eq!(alternate_of(&tls, &resp), sa(ALT_TLS));
    let mut tcp = b.over_stream(2, false);
    assert_eq!(tcp.allocate(&mut h), Err(508));
    // the existing allocation is served as before
    assert_eq!(err_code(&a.refresh(&mut h, Some(600))), None);
    assert_eq!(h.core.counters().redirected, 2);
    assert_eq!(h.core.counters().errors_for(300), 2);
    assert_eq!(h.core.allocations(), 1);
}

#[test]
fn a_full_relay_redirects_and_one_without_alternates_answers_508() {
    let mut h = Harness::with(|c| c.max_allocations = 1);
    let _a = alice(&mut h);
    let mut b = Client::new("198.51.100.21:1", "bob", "bob-pw");
    assert_eq!(b.allocate(&mut h), Err(508));
    with_alternates(&h);
    let resp = b.transact(&mut h, Method::ALLOCATE, &udp);
    assert_eq!(alternate_of(&b, &resp), sa(ALT_V4));
    // an IPv6 client is named the IPv6 alternate
    let mut v6 = Client::new("[2001:db8::21]:1", "bob", "bob-pw");
    let resp = v6.transact(&mut h, Method::ALLOCATE, &udp);
    assert_eq!(alternate_of(&v6, &resp), sa("[2001:db8::50]:3478"));
    // and the list emptied -> 508 again
    h.shared.set_alternates(Vec::new());
    assert_eq!(b.allocate(&mut h), Err(508));
}

#[test]
fn a_reservation_token_is_never_redirected() {
    let mut h = Harness::new();
    let mut a = Client::new("198.51.100.20:40000", "alice", "alice-pw");
    let (_, token) = a
        .allocate_reserving(&mut h, &|b| {
            udp(b);
            b.add(&EvenPort { reserve: true }).unwrap();
        })
        .unwrap();
    let token = token.unwrap();
    with_alternates(&h);
    h.shared.set_draining(true);
    let mut b = Client::new("198.51.100.21:1", "bob", "bob-pw");
    assert_eq!(
        b.allocate_with(&mut h, &move |m| {
            udp(m);
            m.add(&ReservationToken(token)).unwrap();
        }),
        Err(508)
    );
}

// ---------------------------------------------------------------------------------------------
// Refresh and lifetimes

#[test]
fn refresh_lifetime_zero_deletes_and_closes_the_socket() {
    let mut h = Harness::new();
    let mut a = alice(&mut h);
    assert_eq!(h.sockets.open.len(), 1);
    let resp = a.refresh(&mut h, Some(0));
    assert_eq!(err_code(&resp), None);
    assert_eq!(lifetime_of(&resp), 0);
    Message::parse(&resp)
        .unwrap()
        .verify_integrity(&a.key)
        .unwrap();
    assert_eq!(h.core.allocations(), 0);
    assert!(h.sockets.open.is_empty());
    assert_eq!(h.core.counters().allocations_deleted, 1);
    // no allocation any more -> 437
    assert_eq!(err_code(&a.refresh(&mut h, Some(600))), Some(437));
    let (allocs, by_client, by_relayed, _, _) = h.core.table_sizes();
    assert_eq!((allocs, by_client, by_relayed), (0, 0, 0));
}

#[test]
fn allocation_without_refresh_is_freed_on_time() {
    let mut h = Harness::new();
    let a = alice(&mut h);
    let id = h.id_of(a.relayed.unwrap());
    h.advance(Duration::from_secs(599));
    assert_eq!(h.core.allocations(), 1);
    h.advance(Duration::from_secs(1));
    assert_eq!(h.core.allocations(), 0);
    assert!(h.sockets.open.is_empty());
    assert_eq!(h.core.counters().allocations_expired, 1);
    assert_eq!(h.shared.total_allocations(), 0);
    assert_eq!(
        h.peer_sends(id, sa(PEER), b"late").drop_reason(),
        Some(DropReason::NoAllocation)
    );
    assert_eq!(h.core.poll_timeout(), None);
}

#[test]
fn refreshed_allocation_lives_on_and_a_shortened_one_ends_early() {
    let mut h = Harness::new();
    let mut a = alice(&mut h);
    h.advance(Duration::from_secs(500));
    assert_eq!(err_code(&a.refresh(&mut h, Some(600))), None);
    h.advance(Duration::from_secs(500)); // 1000 s after allocation: alive thanks to the refresh
    assert_eq!(h.core.allocations(), 1);
    assert_eq!(err_code(&a.refresh(&mut h, Some(30))), None);
    h.advance(Duration::from_secs(30));
    assert_eq!(h.core.allocations(), 0);
    assert!(h.sockets.open.is_empty());
}

#[test]
fn ten_thousand_allocate_free_cycles_leave_nothing_behind() {
    let mut h = Harness::new();
    for i in 0..10_000u32 {
        let mut c = Client::new("198.51.100.20:40000", "alice", "alice-pw");
        c.addr = SocketAddr::new(c.addr.ip(), 1024 + (i % 50_000) as u16);
        c.nonce = Some({
            let mut buf = [0u8; auth::NONCE_LEN];
            h.core.nonces.make(h.now, c.addr, &mut buf).to_owned()
        });
        c.allocate(&mut h).expect("allocate");
        assert_eq!(c.permit(&mut h, &[sa(PEER)]), None);
        assert_eq!(c.bind(&mut h, 0x4000, sa(PEER2)), None);
        if i % 2 == 0 {
            assert_eq!(err_code(&c.refresh(&mut h, Some(0))), None);
            assert!(
                h.core.table_sizes().3 <= 2 * h.core.allocations() + 64,
                "timer heap bounded"
            );
        } else {
            h.advance(Duration::from_secs(601)); // expiry path
        }
    }
    h.advance(Duration::from_secs(3600));
    let (a, b, c, timers, _) = h.core.table_sizes();
    assert_eq!((a, b, c, timers), (0, 0, 0, 0));
    assert!(h.sockets.open.is_empty());
    assert_eq!(h.sockets.opened, 10_000);
    assert_eq!(h.sockets.closed, 10_000);
    assert_eq!(h.shared.total_allocations(), 0);
    assert_eq!(h.shared.users_with_allocations(), 0);
    assert_eq!(h.core.poll_timeout(), None);
}

// ---------------------------------------------------------------------------------------------
// Permissions, channels, data

#[test]
fn create_permission_with_several_peers_and_data_both_ways() {
    let mut h = Harness::new();
    let mut a = alice(&mut h);
    let id = h.id_of(a.relayed.unwrap());
    let (p1, p2) = (sa(PEER), sa(PEER2));
    // no permission yet: Send dropped, peer traffic dropped
    let ind = a.send_indication(p1, b"hello");
    assert_eq!(
        h.client_sends(a.addr, &ind).drop_reason(),
        Some(DropReason::NoPermission)
    );
    assert_eq!(
        h.peer_sends(id, p1, b"hi").drop_reason(),
        Some(DropReason::NoPermission)
    );
    assert_eq!(a.permit(&mut h, &[p1, p2]), None);
    // Send -> forwarded zero-copy from the relayed socket
    let ind = a.send_indication(p1, b"hello");
    let sent = h.client_sends(a.addr, &ind);
    match &sent.out {
        Output::Forward { from, to, range } => {
            assert_eq!(*from, SocketRef::Relayed(id));
            assert_eq!(*to, p1);
            assert_eq!(&h.last_buf[range.clone()], b"hello");
        }
        o => panic!("{o:?}"),
    }
    // peer -> client without channel: Data indication
    let sent = h.peer_sends(id, p2, b"from-peer");
    let m = Message::parse(sent.reply()).unwrap();
    assert_eq!(m.message_type(), MessageType::DATA_INDICATION);
    assert_eq!(m.get::<XorPeerAddress>().unwrap().unwrap().0, p2);
    assert_eq!(m.get::<Data>().unwrap().unwrap().0, b"from-peer");
    assert!(
        matches!(sent.out, Output::Reply { from: SocketRef::Listener, to, .. } if to == a.addr)
    );
    // permission is per IP: another port of the same peer IP passes
    let other_port = SocketAddr::new(p2.ip(), 9);
    assert!(matches!(
        h.peer_sends(id, other_port, b"x").out,
        Output::Reply { .. }
    ));
    let c = h.core.counters();
    assert_eq!((c.packets_client_to_peer, c.bytes_client_to_peer), (1, 5));
    assert_eq!((c.packets_peer_to_client, c.bytes_peer_to_client), (2, 10));
}

#[test]
fn permission_expires_after_300s_and_data_does_not_refresh_it() {
    let mut h = Harness::new();
    let mut a = alice(&mut h);
    let id = h.id_of(a.relayed.unwrap());
    let p = sa(PEER);
    assert_eq!(a.permit(&mut h, &[p]), None);
    for _ in 0..29 {
        h.advance(Duration::from_secs(10));
        assert!(matches!(
            h.peer_sends(id, p, b"x").out,
            Output::Reply { .. }
        ));
        let ind = a.send_indication(p, b"y");
        assert!(matches!(
            h.client_sends(a.addr, &ind).out,
            Output::Forward { .. }
        ));
    }
    h.advance(Duration::from_secs(10)); // 300 s after CreatePermission
    assert_eq!(
        h.peer_sends(id, p, b"x").drop_reason(),
        Some(DropReason::NoPermission)
    );
    let ind = a.send_indication(p, b"y");
    assert_eq!(
        h.client_sends(a.addr, &ind).drop_reason(),
        Some(DropReason::NoPermission)
    );
    // refreshing with CreatePermission brings it back
    assert_eq!(a.permit(&mut h, &[p]), None);
    assert!(matches!(
        h.peer_sends(id, p, b"x").out,
        Output::Reply { .. }
    ));
    assert!(h.drops(DropReason::NoPermission) >= 2);
}

#[test]
fn denied_peer_in_create_permission_is_403_all_or_nothing() {
    let mut h = Harness::new();
    let mut a = alice(&mut h);
    let id = h.id_of(a.relayed.unwrap());
    let resp = a.transact(&mut h, Method::CREATE_PERMISSION, &|b| {
        b.add(&XorPeerAddress(sa(PEER))).unwrap();
        b.add(&XorPeerAddress(sa("10.0.0.5:80"))).unwrap();
    });
    assert_eq!(err_code(&resp), Some(403));
    Message::parse(&resp)
        .unwrap()
        .verify_integrity(&a.key)
        .unwrap();
    // the allowed peer of the same request got no permission either
    assert_eq!(
        h.peer_sends(id, sa(PEER), b"x").drop_reason(),
        Some(DropReason::NoPermission)
    );
    // no XOR-PEER-ADDRESS -> 400; peer of the other family -> 443
    assert_eq!(
        err_code(&a.transact(&mut h, Method::CREATE_PERMISSION, &no_attrs)),
        Some(400)
    );
    assert_eq!(a.permit(&mut h, &[sa("[2606:4700::1111]:80")]), Some(443));
}

#[test]
fn every_denied_range_and_ipv4_in_ipv6_spelling_is_403_and_send_is_dropped() {
    let mut h = Harness::with(|c| c.relay_addrs.push("2001:db8::10".parse().unwrap()));
    let mut v4 = alice(&mut h);
    let mut v6 = Client::new("198.51.100.20:40001", "alice", "alice-pw");
    v6.allocate_with(&mut h, &|b| {
        udp(b);
        b.add(&RequestedAddressFamily(AddressFamily::V6)).unwrap();
    })
    .unwrap();
    let denied_v4 = [
        "127.0.0.1:80",
        "0.0.0.0:80",
        "0.1.2.3:80",
        "10.1.1.1:80",
        "172.16.5.4:80",
        "192.168.0.1:80",
        "169.254.169.254:80",
        "100.64.0.1:80",
        "224.0.0.251:5353",
        "240.0.0.1:80",
        "255.255.255.255:80",
        "192.0.2.1:80",
        "198.51.100.1:80",
        "203.0.113.99:80",
        "198.18.0.1:80",
        "198.19.1.1:80",
        "192.0.0.1:80",
        LISTENER,
        METRICS,
    ];
    let denied_v6 = [
        "[::]:80",
        "[::1]:80",
        "[fe80::1]:80",
        "[fc00::1]:80",
        "[fd00::1]:80",
        "[ff02::1]:80",
        "[2001:db8::1]:80",
        "[::ffff:127.0.0.1]:80",
        "[::ffff:10.0.0.1]:80",
        "[::ffff:169.254.169.254]:80",
        "[::127.0.0.1]:80",
        "[::192.168.1.1]:80",
        "[64:ff9b::7f00:1]:80",
        "[64:ff9b::a9fe:a9fe]:80",
        "[2002:7f00:1::1]:80",
        "[2002:c0a8:101::1]:80",
        "[::ffff:203.0.113.10]:3478",
    ];
    for (client, list) in [(&mut v4, &denied_v4[..]), (&mut v6, &denied_v6[..])] {
        for p in list {
            let peer = sa(p);
            assert_eq!(
                client.permit(&mut h, &[peer]),
                Some(403),
                "CreatePermission {p}"
            );
            assert_eq!(
                client.bind(&mut h, 0x4100, peer),
                Some(403),
                "ChannelBind {p}"
            );
            let ind = client.send_indication(peer, b"x");
            assert_eq!(
                h.client_sends(client.addr, &ind).drop_reason(),
                Some(DropReason::PeerDenied),
                "Send {p}"
            );
        }
    }
    assert_eq!(
        h.drops(DropReason::PeerDenied),
        (denied_v4.len() + denied_v6.len()) as u64
    );
    assert_eq!(
        h.core.counters().errors_for(403),
        2 * (denied_v4.len() + denied_v6.len()) as u64
    );
    // public peers of both families are fine
    assert_eq!(v4.permit(&mut h, &[sa(PEER)]), None);
    assert_eq!(
        v6.permit(
            &mut h,
            &[sa("[2606:4700::1111]:80"), sa("[::ffff:8.8.8.8]:53")]
        ),
        None
    );
}

#[test]
fn allow_peers_overrides_the_policy_but_not_service_ports() {
    let mut h = Harness::with(|c| c.allow_peers = vec!["10.0.0.0/8".parse().unwrap()]);
    let mut a = alice(&mut h);
    let id = h.id_of(a.relayed.unwrap());
    assert_eq!(a.permit(&mut h, &[sa("10.1.2.3:5000")]), None);
    let ind = a.send_indication(sa("10.1.2.3:5000"), b"lab");
    assert!(matches!(
        h.client_sends(a.addr, &ind).out,
        Output::Forward { .. }
    ));
    assert!(matches!(
        h.peer_sends(id, sa("10.1.2.3:5000"), b"x").out,
        Output::Reply { .. }
    ));
    assert_eq!(a.permit(&mut h, &[sa("192.168.1.1:5000")]), Some(403));
    assert_eq!(a.permit(&mut h, &[sa(METRICS)]), Some(403));
}

#[test]
fn own_relayed_addresses_are_peers_but_service_ports_are_not() {
    let mut h = Harness::new();
    let mut a = alice(&mut h);
    let mut b = Client::new("198.51.100.21:1", "bob", "bob-pw");
    let rb = b.allocate(&mut h).unwrap();
    // bob's relayed address sits in 203.0.113.0/24 (documentation: denied), yet it is a peer
    assert_eq!(a.permit(&mut h, &[rb]), None);
    assert_eq!(
        a.bind(&mut h, 0x4000, SocketAddr::new(rb.ip(), 50_999)),
        None
    );
    // the permission covers the IP, but Send towards the listener/metrics ports stays denied
    for svc in [LISTENER, METRICS] {
        let ind = a.send_indication(sa(svc), b"x");
        assert_eq!(
            h.client_sends(a.addr, &ind).drop_reason(),
            Some(DropReason::PeerDenied)
        );
        assert_eq!(a.bind(&mut h, 0x4001, sa(svc)), Some(403));
    }
    // outside the relay port range on the relay IP: denied
    assert_eq!(
        a.permit(&mut h, &[SocketAddr::new(rb.ip(), 1000)]),
        Some(403)
    );
}

#[test]
fn channel_bind_rules_and_channel_data_both_ways() {
    let mut h = Harness::new();
    let mut a = alice(&mut h);
    let id = h.id_of(a.relayed.unwrap());
    let (p1, p2) = (sa(PEER), sa(PEER2));
    assert_eq!(a.bind(&mut h, 0x3FFF, p1), Some(400));
    assert_eq!(a.bind(&mut h, 0x5000, p1), Some(400));
    assert_eq!(a.bind(&mut h, 0x4000, p1), None);
    assert_eq!(
        a.bind(&mut h, 0x4000, p2),
        Some(400),
        "channel bound to another peer"
    );
    assert_eq!(
        a.bind(&mut h, 0x4001, p1),
        Some(400),
        "peer bound to another channel"
    );
    assert_eq!(
        a.bind(&mut h, 0x4000, p1),
        None,
        "rebinding the same pair refreshes"
    );
    assert_eq!(a.bind(&mut h, 0x4FFF, p2), None);
    // ChannelData client -> peer: payload forwarded zero-copy from the relayed socket
    let sent = h.client_sends(a.addr, &channel_data(0x4000, b"media!"));
    match &sent.out {
        Output::Forward { from, to, range } => {
            assert_eq!((*from, *to), (SocketRef::Relayed(id), p1));
            assert_eq!(*range, HEADROOM + 4..HEADROOM + 4 + 6);
            assert_eq!(sent.bytes, b"media!");
        }
        o => panic!("{o:?}"),
    }
    // padded ChannelData (UDP may pad to 4) is accepted
    let mut padded = channel_data(0x4000, b"abc");
    padded.push(0);
    assert!(matches!(
        h.client_sends(a.addr, &padded).out,
        Output::Forward { .. }
    ));
    // peer -> client over the channel: header written into the headroom, same buffer
    let sent = h.peer_sends(id, p2, b"reply");
    match &sent.out {
        Output::Forward { from, to, range } => {
            assert_eq!((*from, *to), (SocketRef::Listener, a.addr));
            assert_eq!(*range, 0..HEADROOM + 5);
        }
        o => panic!("{o:?}"),
    }
    let cd = ChannelData::parse(&sent.bytes).unwrap();
    assert_eq!((cd.channel, cd.data), (0x4FFF, &b"reply"[..]));
    // ChannelBind installed the permission: Send to p1 passes without CreatePermission
    let ind = a.send_indication(p1, b"s");
    assert!(matches!(
        h.client_sends(a.addr, &ind).out,
        Output::Forward { .. }
    ));
}

#[test]
fn channel_expiry_and_permission_from_channel_bind() {
    let mut h = Harness::new();
    let mut a = alice(&mut h);
    assert_eq!(err_code(&a.refresh(&mut h, Some(3600))), None);
    let p = sa(PEER);
    assert_eq!(a.bind(&mut h, 0x4000, p), None);
    // the permission (300 s) ends before the channel (600 s): data needs both
    h.advance(Duration::from_secs(300));
    assert_eq!(
        h.client_sends(a.addr, &channel_data(0x4000, b"x"))
            .drop_reason(),
        Some(DropReason::NoPermission)
    );
    assert_eq!(a.permit(&mut h, &[p]), None);
    assert!(matches!(
        h.client_sends(a.addr, &channel_data(0x4000, b"x")).out,
        Output::Forward { .. }
    ));
    h.advance(Duration::from_secs(300)); // channel ends at 600 s
    assert_eq!(
        h.client_sends(a.addr, &channel_data(0x4000, b"x"))
            .drop_reason(),
        Some(DropReason::UnboundChannel)
    );
    // during the cool-down the number cannot go to another peer, but the same pair rebinds
    assert_eq!(a.bind(&mut h, 0x4000, sa(PEER2)), Some(400));
    assert_eq!(a.bind(&mut h, 0x4000, p), None);
    assert!(matches!(
        h.client_sends(a.addr, &channel_data(0x4000, b"x")).out,
        Output::Forward { .. }
    ));
}

#[test]
fn short_circuit_between_allocations_of_one_worker() {
    let mut h = Harness::new();
    let mut a = alice(&mut h);
    let mut b = Client::new("198.51.100.21:1", "bob", "bob-pw");
    let rb = b.allocate(&mut h).unwrap();
    let ra = a.relayed.unwrap();
    let (ida, idb) = (h.id_of(ra), h.id_of(rb));
    assert_eq!(a.bind(&mut h, 0x4000, rb), None);
    // bob has no permission for alice's relayed address yet: dropped as the kernel path would
    let sent = h.client_sends(a.addr, &channel_data(0x4000, b"ping"));
    assert_eq!(sent.drop_reason(), Some(DropReason::NoPermission));
    // bob permits alice but has no channel: fallback Data indication via scratch
    assert_eq!(b.permit(&mut h, &[ra]), None);
    let sent = h.client_sends(a.addr, &channel_data(0x4000, b"ping"));
    assert!(
        matches!(sent.out, Output::Reply { from: SocketRef::Listener, to, .. } if to == b.addr)
    );
    let m = Message::parse(&sent.bytes).unwrap();
    assert_eq!(m.message_type(), MessageType::DATA_INDICATION);
    assert_eq!(m.get::<XorPeerAddress>().unwrap().unwrap().0, ra);
    assert_eq!(m.get::<Data>().unwrap().unwrap().0, b"ping");
    // bob binds a channel to alice: ChannelData header rewritten in place, zero copy
    assert_eq!(b.bind(&mut h, 0x4ABC, ra), None);
    let sent = h.client_sends(a.addr, &channel_data(0x4000, b"pong!"));
    match &sent.out {
        Output::Forward { from, to, range } => {
            assert_eq!((*from, *to), (SocketRef::Listener, b.addr));
            assert_eq!(
                *range,
                HEADROOM..HEADROOM + 4 + 5,
                "range points into the receive buffer"
            );
        }
        o => panic!("{o:?}"),
    }
    let cd = ChannelData::parse(&sent.bytes).unwrap();
    assert_eq!((cd.channel, cd.data), (0x4ABC, &b"pong!"[..]));
    assert_eq!(
        &h.last_buf[..HEADROOM],
        &[0xEE; HEADROOM],
        "headroom untouched"
    );
    // a Send indication from alice to bob's relayed address is short-circuited too
    let ind = a.send_indication(rb, b"via-send");
    let sent = h.client_sends(a.addr, &ind);
    assert!(
        matches!(sent.out, Output::Forward { from: SocketRef::Listener, to, .. } if to == b.addr)
    );
    let cd = ChannelData::parse(&sent.bytes).unwrap();
    assert_eq!((cd.channel, cd.data), (0x4ABC, &b"via-send"[..]));
    let c = h.core.counters();
    assert_eq!(c.short_circuited, 3);
    // the first packet left alice's allocation and was refused at bob's, as on the kernel path
    assert_eq!(c.packets_client_to_peer, 4);
    assert_eq!(c.packets_peer_to_client, 3);
    let _ = (ida, idb);
}

#[test]
fn send_indication_edge_cases_are_dropped() {
    let mut h = Harness::new();
    let mut a = alice(&mut h);
    assert_eq!(a.permit(&mut h, &[sa(PEER)]), None);
    // no allocation on this 5-tuple
    let stranger = Client::new("198.51.100.99:9", "x", "y");
    let ind = a.send_indication(sa(PEER), b"x");
    assert_eq!(
        h.client_sends(stranger.addr, &ind).drop_reason(),
        Some(DropReason::NoAllocation)
    );
    // missing DATA
    let tid = a.next_tid();
    let ind = a.build_class(
        tid,
        Class::Indication,
        Method::SEND,
        &|b| {
            b.add(&XorPeerAddress(sa(PEER))).unwrap();
        },
        false,
    );
    assert_eq!(
        h.client_sends(a.addr, &ind).drop_reason(),
        Some(DropReason::Malformed)
    );
    // unknown comprehension-required attribute in an indication: silently discarded
    let ind = a.build_class(
        tid,
        Class::Indication,
        Method::SEND,
        &|b| {
            b.add(&XorPeerAddress(sa(PEER))).unwrap();
            b.add(&Data(b"x")).unwrap();
            b.add_raw(0x7ABC, &[0; 4]).unwrap();
        },
        false,
    );
    assert_eq!(
        h.client_sends(a.addr, &ind).drop_reason(),
        Some(DropReason::Unexpected)
    );
    assert_eq!(h.core.counters().packets_client_to_peer, 0);
}

#[test]
fn bandwidth_cap_drops_and_counts() {
    let mut h = Harness::with(|c| c.bandwidth_limit_bps = Some(100_000));
    let mut a = alice(&mut h);
    let id = h.id_of(a.relayed.unwrap());
    assert_eq!(a.bind(&mut h, 0x4000, sa(PEER)), None);
    let payload = vec![7u8; 1000];
    let mut forwarded = 0;
    for _ in 0..200 {
        if let Output::Forward { .. } = h.client_sends(a.addr, &channel_data(0x4000, &payload)).out
        {
            forwarded += 1;
        }
    }
    assert_eq!(forwarded, 100, "one second of budget (100 kB) then drops");
    assert_eq!(h.drops(DropReason::Bandwidth), 100);
    h.advance(Duration::from_millis(100)); // 10 kB refilled
    let mut more = 0;
    for _ in 0..20 {
        if let Output::Forward { .. } = h.client_sends(a.addr, &channel_data(0x4000, &payload)).out
        {
            more += 1;
        }
    }
    assert_eq!(more, 10);
    // the other direction has its own budget
    assert!(matches!(
        h.peer_sends(id, sa(PEER), &payload).out,
        Output::Forward { .. }
    ));
}

#[test]
fn unknown_method_and_relayed_traffic_for_unknown_allocation() {
    let mut h = Harness::new();
    let c = Client::new("198.51.100.20:40000", "alice", "alice-pw");
    let req = c.build(TransactionId([1; 12]), Method(0x0ABC), &no_attrs, false);
    assert_eq!(err_code(h.client_sends(c.addr, &req).reply()), Some(400));
    let bogus = AllocationId(12345);
    assert_eq!(
        h.peer_sends(bogus, sa(PEER), b"x").drop_reason(),
        Some(DropReason::NoAllocation)
    );
    // the headroom contract: a buffer shorter than HEADROOM + len never panics
    let mut scratch = vec![0u8; SCRATCH_LEN];
    let mut tiny = [0u8; 3];
    let out = h
        .core
        .handle_listener(h.now, c.addr, &mut tiny, 10, &mut scratch, &mut h.sockets);
    assert_eq!(out, Output::Drop(Some(DropReason::Malformed)));
    let out = h
        .core
        .handle_relayed(h.now, bogus, c.addr, &mut tiny, 10, &mut scratch);
    assert_eq!(out, Output::Drop(Some(DropReason::Malformed)));
}

#[test]
fn stale_allocation_ids_do_not_reach_a_reused_slot() {
    let mut h = Harness::new();
    let mut a = alice(&mut h);
    let old = h.id_of(a.relayed.unwrap());
    assert_eq!(err_code(&a.refresh(&mut h, Some(0))), None);
    let mut b = Client::new("198.51.100.21:1", "bob", "bob-pw");
    let rb = b.allocate(&mut h).unwrap();
    let new = h.id_of(rb);
    assert_ne!(old, new, "generation bits differ");
    assert_eq!(old.0 & 0xFFFFF, new.0 & 0xFFFFF, "same slab slot reused");
    assert_eq!(b.permit(&mut h, &[sa(PEER)]), None);
    assert_eq!(
        h.peer_sends(old, sa(PEER), b"x").drop_reason(),
        Some(DropReason::NoAllocation)
    );
    assert!(matches!(
        h.peer_sends(new, sa(PEER), b"x").out,
        Output::Reply { .. }
    ));
}

#[test]
fn drop_reason_labels_are_unique_and_indexed() {
    let mut seen = std::collections::HashSet::new();
    for (i, r) in DropReason::ALL.iter().enumerate() {
        assert_eq!(r.index(), i);
        assert!(seen.insert(r.as_str()));
    }
    assert_eq!(DropReason::COUNT, DropReason::ALL.len());
    assert_eq!(error_index(437), 5);
    assert_eq!(ERROR_CODES[error_index(999)], 0);
}

#[test]
fn shutdown_and_drop_release_everything() {
    let mut h = Harness::new();
    let _a = alice(&mut h);
    let mut b = Client::new("198.51.100.21:1", "bob", "bob-pw");
    b.allocate(&mut h).unwrap();
    h.core.shutdown(&mut h.sockets);
    assert!(h.sockets.open.is_empty());
    assert_eq!(h.shared.total_allocations(), 0);
    let mut c = Client::new("198.51.100.22:1", "carol", "carol-pw");
    c.allocate(&mut h).unwrap();
    let shared = h.shared.clone();
    drop(h);
    assert_eq!(shared.total_allocations(), 0);
}

#[test]
fn legacy_channel_range_is_opt_in() {
    // default: RFC 8656 range only (tested above); with the option, RFC 5766's 0x4000-0x7FFF
    let mut h = Harness::with(|c| c.legacy_channel_range = true);
    let mut a = alice(&mut h);
    let id = h.id_of(a.relayed.unwrap());
    assert_eq!(a.bind(&mut h, 0x7BEC, sa(PEER)), None);
    assert_eq!(a.bind(&mut h, 0x8000, sa(PEER2)), Some(400));
    let sent = h.client_sends(a.addr, &channel_data(0x7BEC, b"old"));
    assert!(matches!(sent.out, Output::Forward { to, .. } if to == sa(PEER)));
    assert_eq!(sent.bytes, b"old");
    let mut bad = channel_data(0x7BEC, b"old");
    bad.extend_from_slice(&[0; 4]);
    assert_eq!(
        h.client_sends(a.addr, &bad).drop_reason(),
        Some(DropReason::BadLength)
    );
    let sent = h.peer_sends(id, sa(PEER), b"back");
    assert_eq!(&sent.bytes[..4], &[0x7B, 0xEC, 0, 4]);
    assert_eq!(&sent.bytes[4..], b"back");
}

mod no_alloc {
    //! The hot path must not touch the heap: a counting global allocator (per thread) proves it.
    use super::*;
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    struct Counting;

    thread_local! {
        static ALLOCS: Cell<u64> = const { Cell::new(0) };
    }

    // SAFETY: forwards every call to `System` unchanged; only counts allocations.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
            // SAFETY: same contract as the caller's.
            unsafe { System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: same contract as the caller's.
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
            let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
            // SAFETY: same contract as the caller's.
            unsafe { System.realloc(ptr, layout, new) }
        }
    }

    #[global_allocator]
    static GLOBAL: Counting = Counting;

    fn allocs() -> u64 {
        ALLOCS.with(Cell::get)
    }

    #[test]
    fn data_path_does_not_allocate() {
        let mut h = Harness::new();
        let mut a = alice(&mut h);
        let mut b = Client::new("198.51.100.21:1", "bob", "bob-pw");
        let rb = b.allocate(&mut h).unwrap();
        let ra = a.relayed.unwrap();
        let ida = h.id_of(ra);
        assert_eq!(a.bind(&mut h, 0x4000, sa(PEER)), None);
        assert_eq!(a.bind(&mut h, 0x4001, rb), None);
        assert_eq!(a.permit(&mut h, &[sa(PEER2)]), None);
        assert_eq!(b.bind(&mut h, 0x4002, ra), None);
        let send = a.send_indication(sa(PEER2), b"send-payload");
        let cd_peer = channel_data(0x4000, &[1; 160]);
        let cd_short = channel_data(0x4001, &[2; 160]);
        let mut buf = vec![0u8; 2048];
        let mut scratch = vec![0u8; SCRATCH_LEN];
        let (now, core, sockets) = (h.now, &mut h.core, &mut h.sockets);
        // the counter does see allocations on this thread
        let probe = allocs();
        drop(std::hint::black_box(vec![1u8; 8]));
        assert!(allocs() > probe);
        let before = allocs();
        let mut forwards = 0;
        for _ in 0..1000 {
            for (dgram, src) in [(&cd_peer, a.addr), (&cd_short, a.addr), (&send, a.addr)] {
                buf[HEADROOM..HEADROOM + dgram.len()].copy_from_slice(dgram);
                let out =
                    core.handle_listener(now, src, &mut buf, dgram.len(), &mut scratch, sockets);
                assert!(matches!(out, Output::Forward { .. }), "{out:?}");
                forwards += 1;
            }
            // peer -> client over a channel, and a Data indication (no channel for PEER2)
            for peer in [sa(PEER), sa(PEER2)] {
                buf[HEADROOM..HEADROOM + 100].fill(3);
                let out = core.handle_relayed(now, ida, peer, &mut buf, 100, &mut scratch);
                assert!(
                    matches!(out, Output::Forward { .. } | Output::Reply { .. }),
                    "{out:?}"
                );
            }
        }
        assert_eq!(allocs() - before, 0, "heap allocations on the data path");
        assert_eq!(forwards, 3000);
        assert_eq!(h.core.counters().short_circuited, 1000);
    }
}

#[test]
fn hostile_username_realm_nonce_get_400_without_state() {
    let mut h = Harness::new();
    let mut c = Client::new("198.51.100.20:40000", "alice", "alice-pw");
    let _ = c.transact(&mut h, Method::BINDING, &no_attrs); // no nonce needed; warm up
    let nonce = {
        let mut buf = [0u8; auth::NONCE_LEN];
        h.core.nonces.make(h.now, c.addr, &mut buf).to_owned()
    };
    let long = vec![b'a'; 600];
    let bad_utf8 = [0xFFu8, 0xFE, 0x41, 0x42];
    for (typ, value) in [
        (0x0006u16, &long[..]),
        (0x0014, &long[..]),
        (0x0006, &bad_utf8[..]),
    ] {
        let mut buf = vec![0u8; 2048];
        let tid = c.next_tid();
        let mut b = MessageBuilder::new(&mut buf, MessageType::ALLOCATE_REQUEST, tid).unwrap();
        udp(&mut b);
        if typ != 0x0006 {
            b.add(&Username("alice")).unwrap();
        }
        b.add_raw(typ, value).unwrap();
        if typ != 0x0014 {
            b.add(&Realm(REALM)).unwrap();
        }
        b.add(&Nonce(&nonce)).unwrap();
        b.add_integrity(&c.key).unwrap();
        let n = b.finish();
        let resp = h.client_sends(c.addr, &buf[..n]).reply().to_vec();
        assert_eq!(err_code(&resp), Some(400), "attribute 0x{typ:04x}");
        assert!(!Message::parse(&resp).unwrap().has_integrity());
    }
    assert_eq!(h.core.table_sizes().0, 0);
}

#[test]
fn additional_address_family_is_answered_with_address_error_code() {
    use peerlink_proto::attrs::{AdditionalAddressFamily, AddressErrorCode};
    let mut h = Harness::with(|c| c.relay_addrs.push("2001:db8::10".parse().unwrap()));
    let mut c = Client::new("198.51.100.20:40000", "alice", "alice-pw");
    let resp = c.transact(&mut h, Method::ALLOCATE, &|b| {
        udp(b);
        b.add(&AdditionalAddressFamily(AddressFamily::V6)).unwrap();
    });
    assert_eq!(err_code(&resp), None);
    let m = Message::parse(&resp).unwrap();
    assert!(m.get::<XorRelayedAddress>().unwrap().unwrap().0.is_ipv4());
    let aec = m.get::<AddressErrorCode>().unwrap().unwrap();
    assert_eq!((aec.family, aec.code), (AddressFamily::V6, 440));
    // ADDITIONAL-ADDRESS-FAMILY IPv4, or with REQUESTED-ADDRESS-FAMILY: 400
    let mut d = Client::new("198.51.100.20:40001", "alice", "alice-pw");
    let v4 = |b: &mut MessageBuilder<'_>| {
        udp(b);
        b.add(&AdditionalAddressFamily(AddressFamily::V4)).unwrap();
    };
    assert_eq!(d.allocate_with(&mut h, &v4), Err(400));
    let both = |b: &mut MessageBuilder<'_>| {
        udp(b);
        b.add(&RequestedAddressFamily(AddressFamily::V4)).unwrap();
        b.add(&AdditionalAddressFamily(AddressFamily::V6)).unwrap();
    };
    assert_eq!(d.allocate_with(&mut h, &both), Err(400));
    // Refresh naming the other family: 443
    let resp = c.transact(&mut h, Method::REFRESH, &|b| {
        b.add(&RequestedAddressFamily(AddressFamily::V6)).unwrap();
    });
    assert_eq!(err_code(&resp), Some(443));
    assert_eq!(h.core.allocations(), 1);
}

#[test]
fn random_and_bit_flipped_datagrams_never_panic_nor_create_state() {
    let mut h = Harness::new();
    let mut c = Client::new("198.51.100.20:40000", "alice", "alice-pw");
    c.nonce = Some({
        let mut buf = [0u8; auth::NONCE_LEN];
        h.core.nonces.make(h.now, c.addr, &mut buf).to_owned()
    });
    let valid = c.mk(Method::ALLOCATE, &udp, true);
    let mut rng = 0x1234_5678_u64;
    for i in 0..20_000u32 {
        let r = hash::splitmix(&mut rng);
        let dgram: Vec<u8> = if i % 2 == 0 {
            // random bytes, biased towards STUN / ChannelData first bytes
            let len = (r % 120) as usize;
            let mut v: Vec<u8> = (0..len).map(|_| hash::splitmix(&mut rng) as u8).collect();
            if let Some(b) = v.first_mut() {
                *b = [0x00, 0x01, 0x40, 0x4F, 0x7F, *b][(r >> 8) as usize % 6];
            }
            v
        } else {
            // one to three bit flips in an authenticated Allocate: MI covers every byte
            let mut v = valid.clone();
            for k in 0..=(r % 3) {
                let bit = (hash::splitmix(&mut rng) >> k) as usize % (v.len() * 8);
                v[bit / 8] ^= 1 << (bit % 8);
            }
            if v == valid {
                continue; // the same bit flipped twice
            }
            v
        };
        let out = h.client_sends(c.addr, &dgram).out;
        assert!(!matches!(out, Output::Forward { .. }), "{out:?}");
        let id = AllocationId((r >> 32) as u32);
        let _ = h.peer_sends(id, sa(PEER), &dgram);
    }
    assert_eq!(h.core.allocations(), 0);
    assert_eq!(h.sockets.opened, 0);
    // the unmodified request still works
    assert_eq!(err_code(h.client_sends(c.addr, &valid).reply()), None);
    assert_eq!(h.core.allocations(), 1);
}

// ---------------------------------------------------------------------------------------------
// Clients over TCP and TLS (the backend hands in whole frames; the core keys them by link)

#[test]
fn stream_clients_are_other_5_tuples_than_the_udp_client_at_the_same_address() {
    let mut h = Harness::new();
    let udp_alice = alice(&mut h);
    let mut tcp_alice = udp_alice.over_stream(1, false);
    let mut tls_alice = udp_alice.over_stream(2, true);
    let r_tcp = tcp_alice
        .allocate(&mut h)
        .expect("TCP allocation beside the UDP one");
    let r_tls = tls_alice
        .allocate(&mut h)
        .expect("TLS allocation beside both");
    let r_udp = udp_alice.relayed.unwrap();
    assert!(r_udp != r_tcp && r_tcp != r_tls && r_udp != r_tls);
    assert_eq!(h.core.allocations(), 3);
    // A second TCP connection from the same address (another listener) is yet another client.
    let mut tcp2 = udp_alice.over_stream(3, false);
    assert!(tcp2.allocate(&mut h).is_ok());
    // Refresh with LIFETIME 0 on one link deletes only that link's allocation.
    assert_eq!(err_code(&tcp_alice.refresh(&mut h, Some(0))), None);
    assert_eq!(h.core.allocations(), 3);
    assert!(h.core.has_allocation(&udp_alice.core_client(), h.now));
    assert!(!h.core.has_allocation(&tcp_alice.core_client(), h.now));
    assert!(h.core.has_allocation(&tls_alice.core_client(), h.now));
    let c = h.core.counters();
    assert_eq!(c.allocations_created_by, [1, 2, 1]);
    assert_eq!(c.allocations_active_by, [1, 1, 1]);
}

#[test]
fn binding_over_a_stream_maps_the_connection_address_and_answers_on_it() {
    let mut h = Harness::new();
    let c = Client::new("198.51.100.7:5000", "alice", "alice-pw").over_stream(9, true);
    let req = c.build(TransactionId([7; 12]), Method::BINDING, &no_attrs, false);
    let sent = h.client_sends_on(c.core_client(), &req);
    assert_eq!(sent.link, Link::Tls(StreamId(9)));
    assert!(
        matches!(sent.out, Output::Reply { from: SocketRef::Listener, to, .. } if to == c.addr)
    );
    let m = Message::parse(sent.reply()).unwrap();
    assert_eq!(m.get::<XorMappedAddress>().unwrap().unwrap().0, c.addr);
}

#[test]
fn peer_data_for_a_stream_client_is_routed_to_its_connection() {
    let mut h = Harness::new();
    let mut c = Client::new("198.51.100.30:6000", "bob", "bob-pw").over_stream(5, false);
    let r = c.allocate(&mut h).unwrap();
    let id = h.id_of(r);
    assert_eq!(h.core.client_of(id), Some(c.core_client()));
    assert_eq!(c.permit(&mut h, &[sa(PEER)]), None);
    // Client -> peer: a Send indication framed on the stream leaves from the relayed socket.
    let ind = c.send_indication(sa(PEER), b"up");
    let sent = h.client_sends_on(c.core_client(), &ind);
    assert!(
        matches!(sent.out, Output::Forward { from: SocketRef::Relayed(i), to, .. } if i == id && to == sa(PEER))
    );
    assert_eq!(sent.bytes, b"up");
    // Peer -> client without a channel: a Data indication towards the connection.
    let sent = h.peer_sends(id, sa(PEER), b"down");
    assert_eq!(sent.link, Link::Tcp(StreamId(5)));
    assert!(matches!(sent.out, Output::Reply { data: true, to, .. } if to == c.addr));
    // With a channel: ChannelData in place (unpadded: padding is the stream writer's job).
    assert_eq!(c.bind(&mut h, 0x4001, sa(PEER)), None);
    let sent = h.peer_sends(id, sa(PEER), b"down!");
    assert_eq!(sent.link, Link::Tcp(StreamId(5)));
    assert!(matches!(
        sent.out,
        Output::Forward {
            from: SocketRef::Listener,
            ..
        }
    ));
    assert_eq!(ChannelData::parse(&sent.bytes).unwrap().data, b"down!");
    // ChannelData from the stream (framer took the padding off) goes to the peer.
    let sent = h.client_sends_on(c.core_client(), &channel_data(0x4001, b"abc"));
    assert!(matches!(
        sent.out,
        Output::Forward {
            from: SocketRef::Relayed(_),
            ..
        }
    ));
    assert_eq!(sent.bytes, b"abc");
    // The same bytes from the UDP client at the same address: no allocation there.
    let sent = h.client_sends(c.addr, &channel_data(0x4001, b"abc"));
    assert_eq!(sent.drop_reason(), Some(DropReason::NoAllocation));
}

#[test]
fn closing_a_stream_frees_its_allocation_and_nothing_else() {
    let mut h = Harness::new();
    let mut udp = alice(&mut h);
    let mut tcp = udp.over_stream(1, false);
    tcp.allocate(&mut h).unwrap();
    let closed_before = h.sockets.closed;
    assert!(h.core.close_stream(tcp.core_client(), &mut h.sockets));
    assert_eq!(h.sockets.closed, closed_before + 1, "relayed socket closed");
    assert!(
        !h.core.close_stream(tcp.core_client(), &mut h.sockets),
        "only once"
    );
    let never = udp.over_stream(77, true);
    assert!(!h.core.close_stream(never.core_client(), &mut h.sockets));
    assert!(h.core.has_allocation(&udp.core_client(), h.now));
    assert_eq!(h.core.allocations(), 1);
    let c = h.core.counters();
    assert_eq!((c.allocations_closed, c.allocations_deleted), (1, 0));
    assert_eq!(c.allocations_active_by, [1, 0, 0]);
    // The quota is given back: the user can allocate again on a new connection.
    assert_eq!(h.shared.total_allocations(), 1);
    let mut again = udp.over_stream(2, false);
    assert!(again.allocate(&mut h).is_ok());
    assert_eq!(err_code(&udp.refresh(&mut h, Some(0))), None);
    let (a, b, c, _, _) = h.core.table_sizes();
    assert_eq!((a, b, c), (1, 1, 1));
}

#[test]
fn short_circuit_reaches_a_stream_client_on_its_connection() {
    let mut h = Harness::new();
    let mut a = alice(&mut h); // UDP
    let mut b = Client::new("198.51.100.21:1", "bob", "bob-pw").over_stream(4, true);
    let rb = b.allocate(&mut h).unwrap();
    let ra = a.relayed.unwrap();
    assert_eq!(a.bind(&mut h, 0x4000, rb), None);
    assert_eq!(b.permit(&mut h, &[ra]), None);
    // UDP alice -> TLS bob, no channel on bob's side: Data indication for bob's connection.
    let sent = h.client_sends(a.addr, &channel_data(0x4000, b"ping"));
    assert!(matches!(sent.out, Output::Reply { data: true, to, .. } if to == b.addr));
    let sent = h.client_sends_on(a.core_client(), &channel_data(0x4000, b"ping"));
    assert_eq!(sent.link, Link::Tls(StreamId(4)));
    // bob binds a channel: ChannelData rewritten in place for bob's connection.
    assert_eq!(b.bind(&mut h, 0x4ABC, ra), None);
    let sent = h.client_sends_on(a.core_client(), &channel_data(0x4000, b"pong"));
    assert_eq!(sent.link, Link::Tls(StreamId(4)));
    assert!(
        matches!(sent.out, Output::Forward { from: SocketRef::Listener, to, .. } if to == b.addr)
    );
    // TLS bob -> UDP alice: the answer goes to alice's UDP link.
    assert_eq!(a.permit(&mut h, &[rb]), None);
    let ind = b.send_indication(ra, b"back");
    let sent = h.client_sends_on(b.core_client(), &ind);
    assert_eq!(sent.link, Link::Udp);
    assert!(
        matches!(sent.out, Output::Forward { from: SocketRef::Listener, to, .. } if to == a.addr)
    );
    assert_eq!(h.core.counters().short_circuited, 4);
}
