//! The binary's UDP STUN responder on loopback: Binding answers, garbage dropped, and RFC 5780
//! CHANGE-REQUEST answered from the alternate sockets (127.0.0.1 / 127.0.0.2).
// Test helpers outside #[test] fns: a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::Node;
use peerlink_proto::attrs::{
    ChangeRequest, ErrorCode, OtherAddress, ResponseOrigin, Software, XorMappedAddress,
};
use peerlink_proto::{Message, MessageBuilder, MessageType, TransactionId};
use tokio::net::UdpSocket;

fn binding(tid: u8, change: Option<ChangeRequest>) -> Vec<u8> {
    let mut buf = vec![0u8; 128];
    let mut b = MessageBuilder::new(
        &mut buf,
        MessageType::BINDING_REQUEST,
        TransactionId([tid; 12]),
    )
    .unwrap();
    if let Some(c) = change {
        b.add(&c).unwrap();
    }
    b.add_fingerprint().unwrap();
    let n = b.finish();
    buf.truncate(n);
    buf
}

async fn recv(sock: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = vec![0u8; 1500];
    let (n, from) = tokio::time::timeout(Duration::from_secs(10), sock.recv_from(&mut buf))
        .await
        .expect("no STUN answer")
        .unwrap();
    buf.truncate(n);
    (buf, from)
}

/// Sends `req` to `server` and returns the answer (bounded wait).
async fn ask(sock: &UdpSocket, server: SocketAddr, req: &[u8]) -> Vec<u8> {
    sock.send_to(req, server).await.unwrap();
    recv(sock).await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binding_answer_and_garbage_dropped() {
    let d = tempfile::tempdir().unwrap();
    let node = Node::start(&d.path().join("db"), &[]);
    let server = node.stun[0];
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = sock.local_addr().unwrap();
    // Garbage first: it must produce no answer, so the first answer is the Binding's.
    for junk in [&b"hello"[..], &[0u8; 20][..], &[0xffu8; 100][..]] {
        sock.send_to(junk, server).await.unwrap();
    }
    sock.send_to(&binding(9, None), server).await.unwrap();
    let (resp, from) = recv(&sock).await;
    assert_eq!(from, server);
    let m = Message::parse(&resp).unwrap();
    assert_eq!(m.message_type(), MessageType::BINDING_SUCCESS);
    assert_eq!(m.transaction_id(), TransactionId([9; 12]));
    assert_eq!(m.get::<XorMappedAddress>().unwrap().unwrap().0, me);
    assert_eq!(
        m.get::<Software>().unwrap().unwrap().0,
        "peerlink-signaling"
    );
    assert!(m.has_fingerprint());
    assert!(m.get::<OtherAddress>().is_none(), "no alternate configured");
    assert_eq!(node.metric("stun_dropped_total").await, 3);
    assert_eq!(node.metric("stun_responses_total").await, 1);
    // CHANGE-REQUEST without an alternate: 420.
    let resp = ask(
        &sock,
        server,
        &binding(
            10,
            Some(ChangeRequest {
                change_ip: false,
                change_port: true,
            }),
        ),
    )
    .await;
    let m = Message::parse(&resp).unwrap();
    assert_eq!(m.get::<ErrorCode>().unwrap().unwrap().code, 420);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_request_answered_from_alternate_sockets() {
    let d = tempfile::tempdir().unwrap();
    let node = Node::start(&d.path().join("db"), &["--stun-alt", "127.0.0.2:0"]);
    assert_eq!(node.stun.len(), 4, "{:?}", node.stun);
    let primary = node.stun[0];
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = sock.local_addr().unwrap();
    let mut other = None;
    for (i, (ip, port)) in [(false, false), (false, true), (true, false), (true, true)]
        .into_iter()
        .enumerate()
    {
        let tid = 20 + i as u8;
        sock.send_to(
            &binding(
                tid,
                Some(ChangeRequest {
                    change_ip: ip,
                    change_port: port,
                }),
            ),
            primary,
        )
        .await
        .unwrap();
        let (resp, from) = recv(&sock).await;
        let m = Message::parse(&resp).unwrap();
        assert_eq!(m.message_type(), MessageType::BINDING_SUCCESS);
        assert_eq!(m.transaction_id(), TransactionId([tid; 12]));
        assert_eq!(m.get::<XorMappedAddress>().unwrap().unwrap().0, me);
        let origin = m.get::<ResponseOrigin>().unwrap().unwrap().0;
        assert_eq!(origin, from, "RESPONSE-ORIGIN is the socket that answered");
        assert_eq!(from.ip() != primary.ip(), ip, "change ip {ip}: {from}");
        assert_eq!(
            from.port() != primary.port(),
            port,
            "change port {port}: {from}"
        );
        let oa = m.get::<OtherAddress>().unwrap().unwrap().0;
        assert!(
            oa.ip() != primary.ip() && oa.port() != primary.port(),
            "{oa}"
        );
        other = Some(oa);
    }
    // The OTHER-ADDRESS answers Binding requests too (RFC 5780 test II/III use it).
    let oa = other.unwrap();
    sock.send_to(&binding(40, None), oa).await.unwrap();
    let (resp, from) = recv(&sock).await;
    assert_eq!(from, oa);
    assert_eq!(
        Message::parse(&resp)
            .unwrap()
            .get::<XorMappedAddress>()
            .unwrap()
            .unwrap()
            .0,
        me
    );
}

/// An attribute as (type, value).
type RawAttr = (u16, Vec<u8>);

/// A Binding request with the given raw attributes and a FINGERPRINT.
fn binding_with(tid: u8, attrs: &[RawAttr]) -> Vec<u8> {
    let mut buf = vec![0u8; 4096];
    let mut b = MessageBuilder::new(
        &mut buf,
        MessageType::BINDING_REQUEST,
        TransactionId([tid; 12]),
    )
    .unwrap();
    for (t, v) in attrs {
        b.add_raw(*t, v).unwrap();
    }
    b.add_fingerprint().unwrap();
    let n = b.finish();
    buf.truncate(n);
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_datagrams_dropped_and_bad_attributes_answered() {
    use rand::{Rng, SeedableRng};
    let d = tempfile::tempdir().unwrap();
    let node = Node::start(&d.path().join("db"), &[]);
    let server = node.stun[0];
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();

    let good = binding(1, None);
    let mut junk: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("19 bytes", good[..19].to_vec()),
        ("wrong magic cookie", {
            let mut v = good.clone();
            v[4] ^= 0xff;
            v
        }),
        ("first bits set", {
            let mut v = good.clone();
            v[0] |= 0xc0;
            v
        }),
        ("length not a multiple of 4", {
            let mut v = binding(1, None)[..20].to_vec();
            v[3] = 2;
            v.extend_from_slice(&[0, 0]);
            v
        }),
        ("length field larger than the datagram", {
            let mut v = good.clone();
            v[3] += 4;
            v
        }),
        ("datagram longer than the length field", {
            let mut v = good.clone();
            v.extend_from_slice(&[0; 4]);
            v
        }),
        ("attribute running past the end", {
            // Header length 8: one attribute header claiming 100 bytes, 4 bytes of value.
            let mut v = good[..20].to_vec();
            v[3] = 8;
            v.extend_from_slice(&[0x80, 0x22, 0, 100, b'a', b'b', b'c', b'd']);
            v
        }),
        ("wrong FINGERPRINT", {
            let mut v = good.clone();
            let n = v.len();
            v[n - 1] ^= 1;
            v
        }),
        ("attribute after FINGERPRINT", {
            let mut buf = vec![0u8; 128];
            let mut b = MessageBuilder::new(
                &mut buf,
                MessageType::BINDING_REQUEST,
                TransactionId([1; 12]),
            )
            .unwrap();
            b.add_fingerprint().unwrap();
            b.add_raw_unchecked(0x8022, b"late").unwrap();
            let n = b.finish();
            buf.truncate(n);
            buf
        }),
        (
            "truncated (larger than the receive buffer)",
            binding_with(1, &[(0xC0DE, vec![7u8; 4000])]),
        ),
        ("a success response", {
            let mut buf = vec![0u8; 64];
            let b = MessageBuilder::new(
                &mut buf,
                MessageType::BINDING_SUCCESS,
                TransactionId([1; 12]),
            )
            .unwrap();
            let n = b.finish();
            buf.truncate(n);
            buf
        }),
        ("an indication", {
            let mut buf = vec![0u8; 64];
            let mut b = MessageBuilder::new(
                &mut buf,
                MessageType::new(
                    peerlink_proto::Class::Indication,
                    peerlink_proto::Method::BINDING,
                ),
                TransactionId([1; 12]),
            )
            .unwrap();
            b.add_fingerprint().unwrap();
            let n = b.finish();
            buf.truncate(n);
            buf
        }),
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x57u64);
    for _ in 0..20 {
        let n = rng.random_range(0..600);
        junk.push(("random bytes", (0..n).map(|_| rng.random()).collect()));
    }
    for (_, j) in &junk {
        sock.send_to(j, server).await.unwrap();
    }
    // None of that is answered: the first answer is to this request.
    let resp = ask(&sock, server, &binding(9, None)).await;
    let m = Message::parse(&resp).unwrap();
    assert_eq!(m.transaction_id(), TransactionId([9; 12]));
    assert_eq!(m.message_type(), MessageType::BINDING_SUCCESS);
    assert_eq!(
        node.metric("stun_dropped_total").await,
        u64::try_from(junk.len()).unwrap()
    );

    // Unknown comprehension-required attributes: 420 listing them (optional ones are fine).
    let resp = ask(
        &sock,
        server,
        &binding_with(
            10,
            &[
                (0x7777, vec![1, 2, 3, 4]),
                (0xC0DE, vec![0; 4]),
                (0x0030, vec![]),
                (0x7777, vec![5; 4]),
            ],
        ),
    )
    .await;
    let m = Message::parse(&resp).unwrap();
    assert_eq!(m.transaction_id(), TransactionId([10; 12]));
    assert_eq!(m.get::<ErrorCode>().unwrap().unwrap().code, 420);
    let unknown = m
        .get::<peerlink_proto::attrs::UnknownAttributes>()
        .unwrap()
        .unwrap();
    assert_eq!(unknown.as_slice(), &[0x7777, 0x0030]);
    let resp = ask(&sock, server, &binding_with(11, &[(0xC0DE, vec![0; 8])])).await;
    let m = Message::parse(&resp).unwrap();
    assert_eq!(m.message_type(), MessageType::BINDING_SUCCESS);

    // Hostile attributes: 400, nothing echoed back.
    let username = peerlink_proto::attr_type::USERNAME;
    let hostile: Vec<(&str, Vec<RawAttr>)> = vec![
        (
            "CHANGE-REQUEST of 8 bytes",
            vec![(peerlink_proto::attr_type::CHANGE_REQUEST, vec![0; 8])],
        ),
        ("USERNAME of 600 bytes", vec![(username, vec![b'u'; 600])]),
        ("USERNAME not UTF-8", vec![(username, vec![0xff, 0xfe])]),
        (
            "REALM of 800 bytes",
            vec![(peerlink_proto::attr_type::REALM, vec![b'r'; 800])],
        ),
        (
            "NONCE of 200 characters",
            vec![(peerlink_proto::attr_type::NONCE, vec![b'n'; 200])],
        ),
    ];
    for (i, (what, attrs)) in hostile.iter().enumerate() {
        let tid = 20 + u8::try_from(i).unwrap();
        let resp = ask(&sock, server, &binding_with(tid, attrs)).await;
        let m = Message::parse(&resp).unwrap();
        assert_eq!(m.transaction_id(), TransactionId([tid; 12]), "{what}");
        assert_eq!(m.get::<ErrorCode>().unwrap().unwrap().code, 400, "{what}");
        assert!(m.raw(username).is_none(), "{what}");
        assert!(resp.len() < 200, "{what}: nothing echoed");
    }
    // A well-formed USERNAME is ignored (the responder authenticates nobody).
    let resp = ask(
        &sock,
        server,
        &binding_with(30, &[(username, b"alice:bob".to_vec())]),
    )
    .await;
    assert_eq!(
        Message::parse(&resp).unwrap().message_type(),
        MessageType::BINDING_SUCCESS
    );

    // Duplicate CHANGE-REQUEST: the first counts (this node has no alternate address).
    let cr = |ip: bool, port: bool| {
        (
            peerlink_proto::attr_type::CHANGE_REQUEST,
            vec![0, 0, 0, (u8::from(ip) << 2) | (u8::from(port) << 1)],
        )
    };
    let resp = ask(
        &sock,
        server,
        &binding_with(31, &[cr(false, false), cr(true, true)]),
    )
    .await;
    assert_eq!(
        Message::parse(&resp).unwrap().message_type(),
        MessageType::BINDING_SUCCESS
    );
    let resp = ask(
        &sock,
        server,
        &binding_with(32, &[cr(false, true), cr(false, false)]),
    )
    .await;
    let m = Message::parse(&resp).unwrap();
    assert_eq!(m.get::<ErrorCode>().unwrap().unwrap().code, 420);
    assert_eq!(
        node.metric("stun_errors_total").await,
        u64::try_from(hostile.len()).unwrap() + 2
    );
    assert_eq!(
        node.metric("stun_dropped_total").await,
        u64::try_from(junk.len()).unwrap()
    );
}

/// One responder per family: `--stun6` answers IPv6 clients with their IPv6 mapping, the
/// primary keeps answering IPv4 ones, and the binary announces it on a `stun6=` line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_responder_beside_the_ipv4_one() {
    let d = tempfile::tempdir().unwrap();
    let node = Node::start(&d.path().join("db"), &["--stun6", "[::1]:0"]);
    let v6 = node.stun6.expect("a stun6= line");
    assert!(
        v6.is_ipv6() && v6.ip().is_loopback() && v6.port() != 0,
        "{v6}"
    );
    let sock6 = UdpSocket::bind("[::1]:0").await.unwrap();
    sock6.send_to(&binding(6, None), v6).await.unwrap();
    let (resp, from) = recv(&sock6).await;
    assert_eq!(from, v6);
    let m = Message::parse(&resp).unwrap();
    assert_eq!(m.message_type(), MessageType::BINDING_SUCCESS);
    assert_eq!(
        m.get::<XorMappedAddress>().unwrap().unwrap().0,
        sock6.local_addr().unwrap()
    );
    let sock4 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let resp = ask(&sock4, node.stun[0], &binding(4, None)).await;
    let m = Message::parse(&resp).unwrap();
    assert_eq!(
        m.get::<XorMappedAddress>().unwrap().unwrap().0,
        sock4.local_addr().unwrap()
    );
    assert_eq!(node.metric("stun_responses_total").await, 2);
}
