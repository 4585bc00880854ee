//! Interop with a real coturn `turnserver` on loopback (installed by `scripts/setup.sh`):
//! our encoder's requests are accepted, our parser reads coturn's answers (FINGERPRINT and
//! MESSAGE-INTEGRITY verified with our keys), our TURN REST credentials match coturn's
//! `use-auth-secret`, and our ChannelData framing relays both ways.
//!
//! The test starts its own turnserver (no config file, loopback only, no CLI/TCP/TLS) and kills
//! it on drop. Every receive has a timeout; loops are bounded.
#![allow(clippy::unwrap_used)] // test helpers, not only #[test] fns, unwrap

use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use peerlink_proto::attrs::{
    ChannelNumber, ErrorCode, Lifetime, Nonce, Realm, RequestedTransport, Software, Username,
    XorMappedAddress, XorPeerAddress, XorRelayedAddress,
};
use peerlink_proto::auth::{long_term_key, rest};
use peerlink_proto::channel::{self, ChannelData};
use peerlink_proto::{
    Class, Message, MessageBuilder, MessageType, Method, PacketKind, TransactionId, classify,
};

const SECRET: &str = "interop-shared-secret";
const REALM: &str = "peerlink.test";

struct Turnserver {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Turnserver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_turnserver(port: u16) -> Turnserver {
    let dir = tempfile::tempdir().unwrap();
    // A relay port range unlikely to collide with other tests running coturn at the same time.
    let base = 20_000 + (u32::from(port) % 20_000) as u16;
    let child = Command::new("turnserver")
        .args([
            "-n",
            "--listening-ip",
            "127.0.0.1",
            "--relay-ip",
            "127.0.0.1",
        ])
        .args(["--listening-port", &port.to_string()])
        .args([
            "--min-port",
            &base.to_string(),
            "--max-port",
            &(base + 50).to_string(),
        ])
        .args([
            "--use-auth-secret",
            "--static-auth-secret",
            SECRET,
            "--realm",
            REALM,
        ])
        .args([
            "--fingerprint",
            "--allow-loopback-peers",
            "--no-cli",
            "--no-tcp",
            "--no-tls",
        ])
        .args([
            "--no-dtls",
            "--no-tcp-relay",
            "--simple-log",
            "--no-stdout-log",
        ])
        .arg("--log-file")
        .arg(dir.path().join("turn.log"))
        .arg("--pidfile")
        .arg(dir.path().join("turn.pid"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("turnserver (coturn) must be installed: run scripts/setup.sh");
    Turnserver { child, _dir: dir }
}

struct Client {
    sock: UdpSocket,
    server: SocketAddr,
    next: u8,
}

impl Client {
    fn new(server: SocketAddr) -> Self {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        Client {
            sock,
            server,
            next: 0,
        }
    }

    /// An unauthenticated Allocate: coturn answers 401 with REALM and a NONCE; returns it.
    fn nonce(&mut self) -> String {
        let mut buf = [0u8; 256];
        let mut out = [0u8; 1500];
        let tid = self.tid();
        let mut b = MessageBuilder::new(&mut buf, MessageType::ALLOCATE_REQUEST, tid).unwrap();
        b.add(&RequestedTransport::UDP).unwrap();
        b.add_fingerprint().unwrap();
        let len = b.finish();
        let n = self
            .transact(&buf[..len], tid, &mut out)
            .expect("answer to Allocate");
        let m = Message::parse(&out[..n]).unwrap();
        assert_eq!(m.class(), Class::Error);
        assert_eq!(m.get::<ErrorCode>().unwrap().unwrap().code, 401);
        assert_eq!(m.get::<Realm>(), Some(Ok(Realm(REALM))));
        m.get::<Nonce>().unwrap().unwrap().0.to_string()
    }

    fn tid(&mut self) -> TransactionId {
        self.next = self.next.wrapping_add(1);
        let mut t = *b"interop-tid0";
        t[11] = self.next;
        TransactionId(t)
    }

    /// Sends `req` and waits (bounded) for the answer with the same transaction id.
    fn transact(&self, req: &[u8], tid: TransactionId, out: &mut [u8]) -> Option<usize> {
        for _ in 0..3 {
            self.sock.send_to(req, self.server).unwrap();
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline {
                let Ok((n, _)) = self.sock.recv_from(out) else {
                    break;
                };
                if Message::parse(&out[..n]).is_ok_and(|m| m.transaction_id() == tid) {
                    return Some(n);
                }
            }
        }
        None
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn coturn_accepts_our_requests_and_we_parse_its_answers() {
    let port = free_udp_port();
    let _server = start_turnserver(port);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut c = Client {
        sock,
        server: SocketAddr::from(([127, 0, 0, 1], port)),
        next: 0,
    };
    let me = c.sock.local_addr().unwrap();
    let mut buf = [0u8; 1500];
    let mut out = [0u8; 1500];

    // 1. Binding: wait (bounded, 10 s) until coturn is up; check XOR-MAPPED-ADDRESS.
    let started = Instant::now();
    let n = loop {
        let tid = c.tid();
        let mut b = MessageBuilder::new(&mut buf, MessageType::BINDING_REQUEST, tid).unwrap();
        b.add_fingerprint().unwrap();
        let len = b.finish();
        if let Some(n) = c.transact(&buf[..len], tid, &mut out) {
            break n;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "turnserver did not answer"
        );
    };
    let m = Message::parse(&out[..n]).unwrap();
    assert_eq!((m.class(), m.method()), (Class::Success, Method::BINDING));
    assert!(m.has_fingerprint());
    assert_eq!(m.get::<XorMappedAddress>(), Some(Ok(XorMappedAddress(me))));
    assert!(matches!(m.get::<Software>(), Some(Ok(_))));

    // 2. Allocate without credentials: 401 with REALM and NONCE.
    let nonce = c.nonce();

    let allocate = |c: &mut Client, nonce: &str, user: &str, pass: &str, out: &mut [u8]| {
        let mut buf = [0u8; 1500];
        let tid = c.tid();
        let key = long_term_key(user, REALM, pass);
        let mut b = MessageBuilder::new(&mut buf, MessageType::ALLOCATE_REQUEST, tid).unwrap();
        b.add(&RequestedTransport::UDP).unwrap();
        b.add(&Lifetime(300)).unwrap();
        b.add(&Username(user)).unwrap();
        b.add(&Realm(REALM)).unwrap();
        b.add(&Nonce(nonce)).unwrap();
        b.add_integrity(&key).unwrap();
        b.add_fingerprint().unwrap();
        let len = b.finish();
        (
            c.transact(&buf[..len], tid, out)
                .expect("answer to Allocate"),
            key,
        )
    };

    // 3. Wrong password and expired REST username: coturn refuses (401), as `rest::validate` does.
    let (user, _) = rest::credentials(SECRET.as_bytes(), "alice", now_unix(), 600);
    // Each refused attempt on its own 5-tuple (coturn keeps per-5-tuple session state).
    let mut bad = Client::new(c.server);
    let bad_nonce = bad.nonce();
    let (n, _) = allocate(&mut bad, &bad_nonce, &user, "wrong-password", &mut out);
    let m = Message::parse(&out[..n]).unwrap();
    assert_eq!(m.get::<ErrorCode>().unwrap().unwrap().code, 401);
    let expired = rest::username(now_unix() - 60, "alice");
    let mut bad = Client::new(c.server);
    let bad_nonce = bad.nonce();
    let (n, _) = allocate(
        &mut bad,
        &bad_nonce,
        &expired,
        &rest::password(SECRET.as_bytes(), &expired),
        &mut out,
    );
    let m = Message::parse(&out[..n]).unwrap();
    assert_eq!(m.get::<ErrorCode>().unwrap().unwrap().code, 401);
    assert!(rest::validate([SECRET.as_bytes()], &expired, now_unix(), 86_400).is_err());

    // 4. Our REST credentials: success; coturn's answer verifies with our long-term key.
    let (user, pass) = rest::credentials(SECRET.as_bytes(), "alice", now_unix(), 600);
    let candidates = rest::validate([SECRET.as_bytes()], &user, now_unix(), 86_400).unwrap();
    assert_eq!(candidates.first(), pass);
    let (n, key) = allocate(&mut c, &nonce, &user, &pass, &mut out);
    let m = Message::parse(&out[..n]).unwrap();
    assert_eq!(
        (m.class(), m.method()),
        (Class::Success, Method::ALLOCATE),
        "{:?}",
        m.get::<ErrorCode>()
    );
    m.verify_integrity(&key)
        .expect("coturn's MESSAGE-INTEGRITY verifies with our key");
    assert!(m.has_fingerprint());
    let relayed = m.get::<XorRelayedAddress>().unwrap().unwrap().0;
    assert_eq!(relayed.ip().to_string(), "127.0.0.1");
    assert_eq!(m.get::<XorMappedAddress>(), Some(Ok(XorMappedAddress(me))));
    assert!(m.get::<Lifetime>().unwrap().unwrap().0 > 0);

    // 5. ChannelBind a loopback peer, then relay ChannelData both ways.
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let tid = c.tid();
    let mut b = MessageBuilder::new(
        &mut buf,
        MessageType::new(Class::Request, Method::CHANNEL_BIND),
        tid,
    )
    .unwrap();
    b.add(&ChannelNumber(0x4001)).unwrap();
    b.add(&XorPeerAddress(peer_addr)).unwrap();
    b.add(&Username(&user)).unwrap();
    b.add(&Realm(REALM)).unwrap();
    b.add(&Nonce(&nonce)).unwrap();
    b.add_integrity(&key).unwrap();
    b.add_fingerprint().unwrap();
    let len = b.finish();
    let n = c
        .transact(&buf[..len], tid, &mut out)
        .expect("answer to ChannelBind");
    let m = Message::parse(&out[..n]).unwrap();
    assert_eq!(m.class(), Class::Success, "{:?}", m.get::<ErrorCode>());
    m.verify_integrity(&key).unwrap();

    let len = channel::encode(0x4001, b"hello peer", &mut buf, false).unwrap();
    c.sock.send_to(&buf[..len], c.server).unwrap();
    let (n, from) = peer
        .recv_from(&mut out)
        .expect("the peer receives the relayed payload");
    assert_eq!(&out[..n], b"hello peer");
    assert_eq!(from, relayed);

    peer.send_to(b"hello client", relayed).unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut got = None;
    while Instant::now() < deadline && got.is_none() {
        let Ok((n, _)) = c.sock.recv_from(&mut out) else {
            continue;
        };
        if classify(&out[..n]) == PacketKind::ChannelData {
            let cd = ChannelData::parse(&out[..n]).unwrap();
            got = Some((cd.channel, cd.data.to_vec()));
        }
    }
    assert_eq!(got, Some((0x4001, b"hello client".to_vec())));
}
