//! Sessions through the real binary: token checks, frame limits and errors, durable messages
//! (offline delivery, idempotent resends, conflicts, resume, kill -9), slow consumers,
//! contacts/presence and graceful shutdown.
// Test helpers outside #[test] fns: a panic is the failure report.
#![allow(clippy::unwrap_used)]

#[macro_use]
mod common;

use std::time::Duration;

use common::{Node, TestStore, WAIT, Ws};
use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

fn db() -> (tempfile::TempDir, std::path::PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("sig.db");
    (d, p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_checks_on_upgrade_and_first_frame() {
    let (_d, p) = db();
    let node = Node::start(&p, &["--token-ttl", "3s"]);
    node.token("alice").await;
    // Bad token in the URL: refused before the upgrade.
    let r = tokio::time::timeout(
        WAIT,
        tokio_tungstenite::connect_async(node.ws_url("token=nope")),
    )
    .await
    .unwrap();
    match r {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401),
        other => panic!("expected 401, got {other:?}"),
    }
    // No token: the first frame must authenticate.
    let mut ws = Ws::connect(&node.ws_url("device=d1")).await;
    ws.send(json!({"type": "list_contacts"})).await;
    assert_eq!(ws.closed().await.map(|c| c.0), Some(1008));
    let mut ws = Ws::connect(&node.ws_url("device=d1")).await;
    ws.send(json!({"type": "auth", "token": "garbage"})).await;
    assert_eq!(ws.closed().await.map(|c| c.0), Some(1008));
    let mut ws = Ws::connect(&node.ws_url("device=d1")).await;
    // A fresh 3 s token, so the expiry below happens mid-session.
    let token = node.token("alice").await;
    ws.send(json!({"type": "auth", "token": token})).await;
    assert_eq!(ws.recv_type("welcome").await["user"], "alice");
    // The 3 s token expires mid-session: goodbye, then close 1008 with a reason.
    let bye = ws.recv_type("goodbye").await;
    assert_eq!(bye["reason"], "token expired");
    let (code, reason) = ws.closed().await.expect("close frame");
    assert_eq!((code, reason.as_str()), (1008, "token expired"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_errors_and_limits() {
    let (_d, p) = db();
    let node = Node::start(
        &p,
        &["--max-ws-message", "8192", "--max-body-bytes", "4096"],
    );
    let mut ws = node.connect("alice", "d1").await;
    ws.send_raw(Message::Text("{not json".into())).await;
    let e = ws.recv_type("error").await;
    assert_eq!(e["code"], "bad_json");
    ws.send(json!({"type": "teleport"})).await;
    let e = ws.recv_type("error").await;
    assert_eq!(e["code"], "unknown_type");
    assert!(e["message"].as_str().unwrap().contains("teleport"));
    ws.send(json!({"type": "ack"})).await;
    assert_eq!(ws.recv_type("error").await["code"], "invalid");
    ws.send(json!({"no_type": 1})).await;
    assert_eq!(ws.recv_type("error").await["code"], "bad_json");
    // Still usable.
    ws.send(json!({"type": "list_contacts"})).await;
    ws.recv_type("contacts").await;
    // Oversize message -> 1009.
    ws.send_raw(Message::Text("x".repeat(9000).into())).await;
    assert_eq!(ws.closed().await.map(|c| c.0), Some(1009));
    // Binary -> 1003.
    let mut ws = node.connect("alice", "d1").await;
    ws.send_raw(Message::Binary(vec![1, 2, 3].into())).await;
    assert_eq!(ws.closed().await.map(|c| c.0), Some(1003));
    // Invalid UTF-8 in a text frame -> 1007 (sent as a raw frame).
    let mut ws = node.connect("alice", "d1").await;
    let frame = tokio_tungstenite::tungstenite::protocol::frame::Frame::message(
        vec![0xff, 0xfe, 0xfd],
        tokio_tungstenite::tungstenite::protocol::frame::coding::OpCode::Data(
            tokio_tungstenite::tungstenite::protocol::frame::coding::Data::Text,
        ),
        true,
    );
    ws.send_raw(Message::Frame(frame)).await;
    assert_eq!(ws.closed().await.map(|c| c.0), Some(1007));
    assert!(node.metric("protocol_closes_total").await >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_is_rate_limited_then_closed() {
    let (_d, p) = db();
    let node = Node::start(
        &p,
        &[
            "--msg-rate",
            "1",
            "--msg-burst",
            "5",
            "--flood-close-after",
            "10",
        ],
    );
    let mut ws = node.connect("alice", "d1").await;
    for _ in 0..40 {
        let _ =
            ws.s.feed(Message::Text(
                json!({"type": "list_contacts"}).to_string().into(),
            ))
            .await;
    }
    let _ = ws.s.flush().await;
    let mut contacts = 0;
    let mut limited = 0;
    let close = loop {
        match ws.next().await {
            Ok(v) if v["type"] == "contacts" => contacts += 1,
            Ok(v) if v["code"] == "rate_limited" => limited += 1,
            Ok(v) => panic!("unexpected {v}"),
            Err(common::Ended::Closed(c)) => break c,
            Err(common::Ended::Gone) => break None,
        }
    };
    assert!((5..40).contains(&contacts), "{contacts}");
    assert!(limited >= 1, "an error when the limit is hit");
    assert_eq!(close.map(|c| c.0), Some(1008));
    assert_eq!(node.metric("flood_closes_total").await, 1);
}

on_both_stores!(offline_message_dedup_conflict_and_ack);
async fn offline_message_dedup_conflict_and_ack(store: TestStore) {
    let node = Node::start_on(&store, &[]);
    node.token("bob").await;
    let mut alice = node.connect("alice", "d1").await;
    let msg = json!({"type": "send_message", "id": "m-1", "to": "bob", "body": "hello bob"});
    alice.send(msg.clone()).await;
    let ack = alice.recv_type("message_ack").await;
    assert_eq!(ack["id"], "m-1");
    // Resend with the same id and content: the original ack, nothing new stored.
    alice.send(msg.clone()).await;
    assert_eq!(alice.recv_type("message_ack").await, ack);
    // Same id, different content: conflict.
    alice
        .send(json!({"type": "send_message", "id": "m-1", "to": "bob", "body": "changed"}))
        .await;
    let e = alice.recv_type("error").await;
    assert_eq!(
        (e["code"].as_str(), e["id"].as_str()),
        (Some("conflict"), Some("m-1"))
    );
    alice
        .send(json!({"type": "send_message", "id": "m-2", "to": "bob", "body": "second"}))
        .await;
    alice.recv_type("message_ack").await;
    alice
        .send(json!({"type": "send_message", "id": "m-3", "to": "nobody", "body": "x"}))
        .await;
    assert_eq!(alice.recv_type("error").await["code"], "no_such_user");

    // Bob connects later and gets both, in order, once.
    let mut bob = node.connect("bob", "phone").await;
    let m1 = bob.recv_type("message").await;
    assert_eq!(
        (m1["seq"].as_u64(), m1["from"].as_str(), m1["body"].as_str()),
        (Some(1), Some("alice"), Some("hello bob"))
    );
    let m2 = bob.recv_type("message").await;
    assert_eq!(
        (m2["seq"].as_u64(), m2["id"].as_str()),
        (Some(2), Some("m-2"))
    );
    // Nothing else is queued: the next frame answers our request.
    bob.send(json!({"type": "list_contacts"})).await;
    bob.recv_type("contacts").await;
    bob.send(json!({"type": "ack", "seq": 2})).await;
    drop(bob);
    // After the ack, a new session of the same device gets nothing.
    let mut bob = node.connect("bob", "phone").await;
    bob.send(json!({"type": "list_contacts"})).await;
    bob.recv_type("contacts").await;
    // Live delivery while connected.
    alice
        .send(json!({"type": "send_message", "id": "m-4", "to": "bob", "body": "live"}))
        .await;
    alice.recv_type("message_ack").await;
    let m = bob.recv_type("message").await;
    assert_eq!(
        (m["seq"].as_u64(), m["body"].as_str()),
        (Some(3), Some("live"))
    );
    assert_eq!(node.metric("messages_stored_total").await, 3);
    assert_eq!(node.metric("message_duplicates_total").await, 1);
}

on_both_stores!(resume_after_dropped_connection_and_resync);
async fn resume_after_dropped_connection_and_resync(store: TestStore) {
    let node = Node::start_on(&store, &[]);
    let token = node.token("bob").await;
    let mut alice = node.connect("alice", "d1").await;
    let mut bob = node.connect("bob", "phone").await;
    for i in 1..=3 {
        alice.send(json!({"type": "send_message", "id": format!("m{i}"), "to": "bob", "body": format!("b{i}")})).await;
        alice.recv_type("message_ack").await;
        assert_eq!(bob.recv_type("message").await["seq"], i);
    }
    bob.send(json!({"type": "ack", "seq": 1})).await;
    // Drop the TCP connection without a close handshake.
    drop(bob);
    // Resume from 2 (processed 2, acked only 1): seq 3 is replayed.
    let mut bob =
        Ws::connect(&node.ws_url(&format!("token={token}&device=phone&resume_from=2"))).await;
    let w = bob.recv_type("welcome").await;
    assert_eq!(
        (w["resume"].as_str(), w["acked_seq"].as_u64()),
        (Some("resumed"), Some(2))
    );
    let m = bob.recv_type("message").await;
    assert_eq!(
        (m["seq"].as_u64(), m["body"].as_str()),
        (Some(3), Some("b3"))
    );
    drop(bob);
    // A resume point the server does not know: explicit resync and replay of what is pending.
    let mut bob =
        Ws::connect(&node.ws_url(&format!("token={token}&device=phone&resume_from=99"))).await;
    assert_eq!(bob.recv_type("welcome").await["resume"], "resync");
    let r = bob.recv_type("resync").await;
    assert_eq!(r["from_seq"], 2);
    assert_eq!(bob.recv_type("message").await["seq"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contacts_and_presence_pushed() {
    let (_d, p) = db();
    let node = Node::start(&p, &[]);
    node.token("bob").await;
    let mut alice = node.connect("alice", "d1").await;
    alice
        .send(json!({"type": "add_contact", "username": "Bob"}))
        .await;
    let c = alice.recv_type("contacts").await;
    assert_eq!(
        c["contacts"],
        json!([{"username": "bob", "status": "offline"}])
    );
    alice
        .send(json!({"type": "add_contact", "username": "nobody"}))
        .await;
    assert_eq!(alice.recv_type("error").await["code"], "no_such_user");
    let mut bob = node.connect("bob", "phone").await;
    assert_eq!(
        alice.recv_type("presence").await,
        json!({"type": "presence", "user": "bob", "status": "online"})
    );
    bob.send(json!({"type": "set_presence", "status": "away"}))
        .await;
    assert_eq!(alice.recv_type("presence").await["status"], "away");
    drop(bob);
    assert_eq!(alice.recv_type("presence").await["status"], "offline");
    alice
        .send(json!({"type": "remove_contact", "username": "bob"}))
        .await;
    assert_eq!(alice.recv_type("contacts").await["contacts"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_closed() {
    let (_d, p) = db();
    let node = Node::start(
        &p,
        &[
            "--outbound-queue",
            "4",
            "--write-timeout",
            "1s",
            "--msg-rate",
            "10000",
            "--msg-burst",
            "10000",
            "--max-body-bytes",
            "60000",
        ],
    );
    let token = node.token("victim").await;
    // The victim connects with a tiny receive buffer and never reads.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(2048).unwrap();
    let tcp = tokio::time::timeout(WAIT, sock.connect(node.http))
        .await
        .unwrap()
        .unwrap();
    let (victim, _) = tokio::time::timeout(
        WAIT,
        tokio_tungstenite::client_async(node.ws_url(&format!("token={token}&device=v")), tcp),
    )
    .await
    .unwrap()
    .unwrap();
    let mut alice = node.connect("alice", "d1").await;
    // 60 KB messages fill the victim's socket buffers and queue quickly; an invite now and
    // then tells whether the victim's session is still registered.
    let body = "z".repeat(60_000);
    let mut closed = false;
    for i in 0..2000 {
        alice.send(json!({"type": "send_message", "id": format!("big{i}"), "to": "victim", "body": body})).await;
        alice.recv_type("message_ack").await;
        if i % 8 != 7 {
            continue;
        }
        alice
            .send(json!({"type": "invite", "to": "victim", "offer": common::desc("127.0.0.1", 1)}))
            .await;
        let v = alice.recv_type("invite_sent").await;
        if v["devices"] == 0 {
            closed = true;
            break;
        }
        alice
            .send(json!({"type": "cancel", "call_id": v["call_id"]}))
            .await;
    }
    assert!(closed, "victim session never closed");
    assert_eq!(node.metric("slow_consumer_closes_total").await, 1);
    drop(victim);
}

on_both_stores!(kill_9_after_ack_loses_nothing);
async fn kill_9_after_ack_loses_nothing(store: TestStore) {
    let mut node = Node::start_on(&store, &[]);
    node.token("bob").await;
    let mut alice = node.connect("alice", "d1").await;
    alice
        .send(json!({"type": "send_message", "id": "durable-1", "to": "bob", "body": "survive"}))
        .await;
    alice.recv_type("message_ack").await;
    // SIGKILL right after the ack.
    node.child().kill().unwrap();
    node.child().wait().unwrap();
    drop(alice);
    let node = Node::start_on(&store, &[]);
    let mut bob = node.connect("bob", "phone").await;
    let m = bob.recv_type("message").await;
    assert_eq!(
        (m["id"].as_str(), m["body"].as_str()),
        (Some("durable-1"), Some("survive"))
    );
    // Exactly once: nothing else is queued, the next frame answers our request.
    bob.send(json!({"type": "list_contacts"})).await;
    bob.recv_type("contacts").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_1001_and_refuses_upgrades() {
    let (_d, p) = db();
    let mut node = Node::start(&p, &["--shutdown-grace", "5s"]);
    let token = node.token("alice").await;
    let mut ws = node.connect("alice", "d1").await;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(node.pid()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let bye = ws.recv_type("goodbye").await;
    assert!(bye["reconnect_after_ms"].as_u64().is_some());
    let (code, reason) = ws.closed().await.expect("close frame");
    assert_eq!(code, 1001);
    assert!(reason.contains("reconnect"), "{reason}");
    // During the grace period new upgrades get 503.
    let r = tokio::time::timeout(
        WAIT,
        tokio_tungstenite::connect_async(node.ws_url(&format!("token={token}"))),
    )
    .await
    .unwrap();
    match r {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 503),
        other => panic!("expected 503, got {other:?}"),
    }
    // Then the process exits 0.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = node.child().try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_and_silent_sessions_time_out() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_d, p) = db();
    let node = Node::start(
        &p,
        &[
            "--header-timeout",
            "1s",
            "--idle-timeout",
            "1s",
            "--ping-interval",
            "30s",
        ],
    );
    // Headers never completed: the server hangs up.
    let mut tcp = tokio::net::TcpStream::connect(node.http).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let mut seen = Vec::new();
    loop {
        let n = tokio::time::timeout(WAIT, tcp.read(&mut buf))
            .await
            .expect("slow-header connection kept open")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(!String::from_utf8_lossy(&seen).contains("200 OK"));
    // A silent WebSocket client (the server pings only every 30 s) is closed for idleness.
    let mut ws = node.connect("alice", "d1").await;
    assert_eq!(ws.closed().await, Some((1000, "idle timeout".to_string())));
    assert_eq!(node.metric("idle_closes_total").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_keep_a_reading_client_alive_and_per_ip_limit() {
    use futures_util::StreamExt;
    let (_d, p) = db();
    let node = Node::start(
        &p,
        &[
            "--idle-timeout",
            "2s",
            "--ping-interval",
            "200ms",
            "--max-conns-per-ip",
            "2",
        ],
    );
    let mut ws = node.connect("alice", "d1").await;
    // Keep reading (the client answers pings with pongs) for 2.5 idle timeouts.
    let until = tokio::time::Instant::now() + Duration::from_millis(5000);
    let mut pings = 0;
    while let Ok(m) = tokio::time::timeout_at(until, ws.s.next()).await {
        match m {
            Some(Ok(Message::Ping(_))) => pings += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(pings >= 3, "{pings}");
    ws.send(json!({"type": "list_contacts"})).await;
    ws.recv_type("contacts").await;
    // A second connection from 127.0.0.1 is fine, a third is refused.
    let _ws2 = node.connect("alice", "d2").await;
    let token = node.token("alice").await;
    let r = tokio::time::timeout(
        WAIT,
        tokio_tungstenite::connect_async(node.ws_url(&format!("token={token}&device=d3"))),
    )
    .await
    .unwrap();
    match r {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 429),
        other => panic!("expected 429, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_frames_never_break_the_session() {
    use rand::{Rng, SeedableRng};
    let (_d, p) = db();
    let mut node = Node::start(
        &p,
        &[
            "--msg-rate",
            "100000",
            "--msg-burst",
            "100000",
            "--outbound-queue",
            "1024",
        ],
    );
    node.token("bob").await;
    let mut ws = node.connect("alice", "d1").await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let types = [
        "auth",
        "invite",
        "ringing",
        "accept",
        "decline",
        "cancel",
        "hangup",
        "candidate",
        "end_of_candidates",
        "send_message",
        "ack",
        "add_contact",
        "remove_contact",
        "set_presence",
        "bogus",
    ];
    let values = [
        json!(null),
        json!(true),
        json!(-1),
        json!(u64::MAX),
        json!(1.5),
        json!("bob"),
        json!(""),
        json!("x".repeat(300)),
        json!([]),
        json!({}),
        json!({"foundation": "f", "component": 1}),
        json!("0123456789abcdef0123456789abcdef"),
    ];
    let fields = [
        "to",
        "from",
        "call_id",
        "id",
        "body",
        "seq",
        "token",
        "offer",
        "answer",
        "candidate",
        "status",
        "username",
    ];
    for i in 0..400 {
        let text = match i % 4 {
            0 => (0..rng.random_range(0..64))
                .map(|_| rng.random_range(' '..='~'))
                .collect::<String>(),
            1 => "[".repeat(rng.random_range(1..300)),
            _ => {
                let mut obj = serde_json::Map::new();
                obj.insert(
                    "type".into(),
                    json!(types[rng.random_range(0..types.len())]),
                );
                for _ in 0..rng.random_range(0..5) {
                    let f = fields[rng.random_range(0..fields.len())];
                    obj.insert(f.into(), values[rng.random_range(0..values.len())].clone());
                }
                serde_json::Value::Object(obj).to_string()
            }
        };
        ws.send_raw(Message::Text(text.into())).await;
    }
    ws.send(json!({"type": "list_contacts"})).await;
    let mut frames = 0;
    loop {
        let v = ws.recv().await;
        frames += 1;
        if v["type"] == "contacts" {
            break;
        }
        assert!(frames < 1000, "no answer to list_contacts");
    }
    assert!(node.child().try_wait().unwrap().is_none(), "the node died");
    assert!(node.metric("frame_errors_total").await > 100);
}
