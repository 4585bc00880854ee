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
    sock.send_to(
        &binding(
            10,
            Some(ChangeRequest {
                change_ip: false,
                change_port: true,
            }),
        ),
        server,
    )
    .await
    .unwrap();
    let (resp, _) = recv(&sock).await;
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
