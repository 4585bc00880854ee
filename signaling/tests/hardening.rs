//! Bad inputs and faults (`signaling/README.md`) against the real binary that the other suites
//! do not cover: fragmented messages over the limit, unauthenticated upgrades and silent
//! connections, per-IP slots, forged tokens (alg none / HS512 / RS256 header, audience,
//! issuer, expiry) on the upgrade and in `auth` frames, trickled candidates capped and every
//! address no peer can have refused, resends after a reconnect deduplicated, and a full disk
//! (no ack, an explicit error, nothing stored).
// Test helpers outside #[test] fns: a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::{Node, TOKEN_SECRET, WAIT, Ws, desc};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

fn db() -> (tempfile::TempDir, std::path::PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("sig.db");
    (d, p)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Read until the server closes the TCP connection; returns what it sent. Panics if it stays
/// open longer than the wait.
async fn read_to_close(tcp: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = tokio::time::timeout(WAIT, tcp.read(&mut buf))
            .await
            .expect("the server kept the connection open")
            .unwrap_or(0);
        if n == 0 {
            return seen;
        }
        seen.extend_from_slice(&buf[..n]);
    }
}

/// The HTTP status of a refused upgrade (panics if the upgrade succeeded).
async fn upgrade_status(url: &str) -> u16 {
    let r = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("upgrade timed out");
    match r {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("upgrade to {url} was accepted"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragmented_message_over_the_limit_is_closed_1009() {
    let (_d, p) = db();
    let node = Node::start(
        &p,
        &["--max-ws-message", "8192", "--max-body-bytes", "4096"],
    );
    let mut ws = node.connect("alice", "d1").await;
    // A small message in two fragments is reassembled and answered.
    let text = json!({"type": "list_contacts"}).to_string().into_bytes();
    let (a, b) = text.split_at(5);
    ws.send_raw(Message::Frame(Frame::message(
        a.to_vec(),
        OpCode::Data(Data::Text),
        false,
    )))
    .await;
    ws.send_raw(Message::Frame(Frame::message(
        b.to_vec(),
        OpCode::Data(Data::Continue),
        true,
    )))
    .await;
    ws.recv_type("contacts").await;
    // Fragments of 3000 bytes, each under the limit, adding up past it: 1009.
    ws.send_raw(Message::Frame(Frame::message(
        vec![b' '; 3000],
        OpCode::Data(Data::Text),
        false,
    )))
    .await;
    for _ in 0..3 {
        ws.send_raw(Message::Frame(Frame::message(
            vec![b' '; 3000],
            OpCode::Data(Data::Continue),
            false,
        )))
        .await;
    }
    assert_eq!(ws.closed().await.map(|c| c.0), Some(1009));
    assert_eq!(node.metric("protocol_closes_total").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_upgrades_and_silent_connections_are_closed() {
    let (_d, p) = db();
    let node = Node::start(
        &p,
        &[
            "--auth-timeout",
            "1s",
            "--header-timeout",
            "1s",
            "--max-conns-per-ip",
            "1",
        ],
    );
    let token = node.token("alice").await;
    // Upgraded without a token, and never authenticates: closed 1008 after the auth timeout.
    let mut ws = Ws::connect(&node.ws_url("device=d1")).await;
    // While it waits for its auth frame it holds this IP's only slot.
    assert_eq!(
        upgrade_status(&node.ws_url(&format!("token={token}&device=d2"))).await,
        429
    );
    let (code, reason) = ws.closed().await.expect("close frame");
    assert_eq!(code, 1008);
    assert!(reason.contains("auth"), "{reason}");
    // A TCP connection that sends nothing at all is closed by the header timeout.
    let mut tcp = tokio::net::TcpStream::connect(node.http).await.unwrap();
    assert!(read_to_close(&mut tcp).await.is_empty());
    // An upgrade request whose headers never finish is closed without an upgrade.
    let mut tcp = tokio::net::TcpStream::connect(node.http).await.unwrap();
    let partial = format!(
        "GET /v1/ws?token={token}&device=d3 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
    );
    tcp.write_all(partial.as_bytes()).await.unwrap();
    let seen = read_to_close(&mut tcp).await;
    assert!(
        !String::from_utf8_lossy(&seen).contains("101"),
        "{}",
        String::from_utf8_lossy(&seen)
    );
    // A keep-alive connection idle after its first request is closed as well.
    let mut tcp = tokio::net::TcpStream::connect(node.http).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let seen = read_to_close(&mut tcp).await;
    assert!(String::from_utf8_lossy(&seen).contains("200 OK"));
    // The slot was given back: an authenticated session from this IP works.
    let _ws = node.connect("alice", "d4").await;
    assert!(node.metric("upgrades_refused_total").await >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_ip_limit_counts_sessions_per_address_and_frees_slots() {
    let (_d, p) = db();
    let node = Node::start(&p, &["--max-conns-per-ip", "1"]);
    let token = node.token("alice").await;
    let url = |dev: &str| node.ws_url(&format!("token={token}&device={dev}"));
    let mut first = node.connect("alice", "d1").await;
    assert_eq!(upgrade_status(&url("d2")).await, 429);
    // Another source address has its own slots.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let tcp = tokio::time::timeout(WAIT, sock.connect(node.http))
        .await
        .unwrap()
        .unwrap();
    let (s, _) = tokio::time::timeout(
        WAIT,
        tokio_tungstenite::client_async(url("d3"), tokio_tungstenite::MaybeTlsStream::Plain(tcp)),
    )
    .await
    .unwrap()
    .unwrap();
    let mut other_ws = Ws { s };
    other_ws.recv_type("welcome").await;
    // When the first session ends its slot is released (bounded retries: the release runs
    // on the server after the close handshake).
    first.s.close(None).await.unwrap();
    let _ = first.closed().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url("d4")))
            .await
            .unwrap()
        {
            Ok((s, _)) => {
                let mut ws = Ws { s };
                ws.recv_type("welcome").await;
                break;
            }
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status() == 429 => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "slot never released"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

/// A token with an arbitrary header, signed HMAC-SHA256 with `secret` (alg confusion).
fn with_header(header: Value, claims: &Value, secret: &str) -> String {
    let msg = format!("{}.{}", b64(&header), b64(claims));
    let sig = jsonwebtoken::crypto::sign(
        msg.as_bytes(),
        &EncodingKey::from_secret(secret.as_bytes()),
        Algorithm::HS256,
    )
    .unwrap();
    format!("{msg}.{sig}")
}

fn signed(alg: Algorithm, claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(alg),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_expired_tokens_refused_on_upgrade_and_in_auth_frames() {
    let (_d, p) = db();
    let node = Node::start(&p, &[]);
    let login: Value = {
        node.token("alice").await;
        let r = reqwest::Client::new()
            .post(node.url("/v1/login"))
            .json(&json!({"username": "alice", "password": "password-123"}))
            .send()
            .await
            .unwrap();
        r.json().await.unwrap()
    };
    let good = json!({"sub": "alice", "aud": "peerlink-signaling", "iss": "peerlink",
                      "exp": now() + 600, "iat": now()});
    // Sanity: a correctly forged HS256 token is accepted, so the refusals below are about
    // the one thing each case changes.
    let ok = signed(Algorithm::HS256, &good, TOKEN_SECRET);
    let mut ws = Ws::connect(&node.ws_url(&format!("token={ok}&device=ok"))).await;
    ws.recv_type("welcome").await;

    let with = |k: &str, v: Value| {
        let mut c = good.clone();
        c[k] = v;
        c
    };
    let mut no_exp = good.clone();
    no_exp.as_object_mut().unwrap().remove("exp");
    let payload = b64(&good);
    let cases: Vec<(&str, String)> = vec![
        (
            "alg none",
            format!("{}.{payload}.", b64(&json!({"alg": "none", "typ": "JWT"}))),
        ),
        (
            "alg none with a signature",
            with_header(json!({"alg": "none", "typ": "JWT"}), &good, TOKEN_SECRET),
        ),
        ("HS512", signed(Algorithm::HS512, &good, TOKEN_SECRET)),
        ("HS384", signed(Algorithm::HS384, &good, TOKEN_SECRET)),
        (
            "RS256 header, HMAC signature",
            with_header(json!({"alg": "RS256", "typ": "JWT"}), &good, TOKEN_SECRET),
        ),
        (
            "wrong secret",
            signed(Algorithm::HS256, &good, "another-secret-another-secret-xyz"),
        ),
        (
            "wrong audience",
            signed(Algorithm::HS256, &with("aud", json!("other")), TOKEN_SECRET),
        ),
        (
            "refresh token",
            login["refresh_token"].as_str().unwrap().to_owned(),
        ),
        (
            "wrong issuer",
            signed(Algorithm::HS256, &with("iss", json!("evil")), TOKEN_SECRET),
        ),
        (
            "expired",
            signed(
                Algorithm::HS256,
                &with("exp", json!(now() - 1)),
                TOKEN_SECRET,
            ),
        ),
        ("no expiry", signed(Algorithm::HS256, &no_exp, TOKEN_SECRET)),
        (
            "subject not normalised",
            signed(Algorithm::HS256, &with("sub", json!("Alice")), TOKEN_SECRET),
        ),
        ("truncated", ok[..ok.len() - 3].to_owned()),
        ("garbage", "a.b.c".into()),
    ];
    let refused_before = node.metric("upgrades_refused_total").await;
    for (what, tok) in &cases {
        // In the URL: refused before the upgrade.
        assert_eq!(
            upgrade_status(&node.ws_url(&format!("token={tok}&device=x"))).await,
            401,
            "{what}"
        );
        // As the first frame: closed 1008, no welcome.
        let mut ws = Ws::connect(&node.ws_url("device=x")).await;
        ws.send(json!({"type": "auth", "token": tok})).await;
        match ws.next().await {
            Err(common::Ended::Closed(c)) => assert_eq!(c.map(|c| c.0), Some(1008), "{what}"),
            other => panic!("{what}: {other:?}"),
        }
        // Mid-session re-authentication: an error frame, the session keeps its old token.
        let mut live = node.connect("alice", "live").await;
        live.send(json!({"type": "auth", "token": tok})).await;
        assert_eq!(
            live.recv_type("error").await["code"],
            "unauthorized",
            "{what}"
        );
        live.send(json!({"type": "list_contacts"})).await;
        live.recv_type("contacts").await;
    }
    assert_eq!(
        node.metric("upgrades_refused_total").await - refused_before,
        2 * u64::try_from(cases.len()).unwrap()
    );
    // A valid token of another user cannot take over a session.
    let bob = node.token("bob").await;
    let mut live = node.connect("alice", "live").await;
    live.send(json!({"type": "auth", "token": bob})).await;
    assert_eq!(live.recv_type("error").await["code"], "unauthorized");
    // A fresh token of the same user is accepted.
    let fresh = node.token("alice").await;
    live.send(json!({"type": "auth", "token": fresh})).await;
    assert!(
        live.recv_type("auth_ok").await["token_expires_at"]
            .as_u64()
            .is_some()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickle_is_capped_and_every_never_a_peer_address_refused() {
    let (_d, p) = db();
    let node = Node::start(
        &p,
        &[
            "--msg-rate",
            "1000",
            "--msg-burst",
            "1000",
            "--max-candidates",
            "8",
        ],
    );
    let mut bob = node.connect("bob", "phone").await;
    let mut alice = node.connect("alice", "a1").await;
    for ip in [
        "0.0.0.0",
        "0.1.2.3",
        "224.0.0.1",
        "239.255.255.250",
        "240.0.0.1",
        "254.255.255.255",
        "255.255.255.255",
        "::",
        "ff02::1",
        "ff0e::1",
        "::ffff:0.0.0.0",
        "::ffff:224.0.0.1",
        "::ffff:255.255.255.255",
        "::240.0.0.1",
        "64:ff9b::e000:1",
    ] {
        alice
            .send(json!({"type": "invite", "to": "bob", "offer": desc(ip, 1)}))
            .await;
        let e = alice.recv_type("error").await;
        assert_eq!(e["code"], "forbidden_candidate", "{ip}: {e}");
    }
    // Hundreds of candidates are refused as a whole.
    alice
        .send(json!({"type": "invite", "to": "bob", "offer": desc("203.0.113.7", 300)}))
        .await;
    assert_eq!(
        alice.recv_type("error").await["code"],
        "too_many_candidates"
    );
    // Everything else passes: public, private and shared host addresses alike.
    alice
        .send(json!({"type": "invite", "to": "bob", "offer": desc("100.128.0.1", 3)}))
        .await;
    let id = alice.recv_type("invite_sent").await["call_id"].clone();
    bob.recv_type("incoming_call").await;
    // Trickled while ringing and after the answer: at most 8 per party in total.
    let cand = |port: u16| {
        json!({"foundation": format!("t{port}"), "component": 1, "transport": "udp",
               "priority": 1, "address": "203.0.113.7", "port": port, "type": "srflx"})
    };
    for port in 1..=3 {
        alice
            .send(json!({"type": "candidate", "call_id": id, "candidate": cand(port)}))
            .await;
        assert_eq!(bob.recv_type("candidate").await["candidate"], cand(port));
    }
    bob.send(json!({"type": "accept", "call_id": id, "answer": desc("203.0.113.9", 7)}))
        .await;
    alice.recv_type("call_accepted").await;
    for port in 4..=5 {
        alice
            .send(json!({"type": "candidate", "call_id": id, "candidate": cand(port)}))
            .await;
        assert_eq!(bob.recv_type("candidate").await["candidate"], cand(port));
    }
    alice
        .send(json!({"type": "candidate", "call_id": id, "candidate": cand(6)}))
        .await;
    assert_eq!(
        alice.recv_type("error").await["code"],
        "too_many_candidates"
    );
    bob.send(json!({"type": "candidate", "call_id": id, "candidate": cand(7)}))
        .await;
    assert_eq!(alice.recv_type("candidate").await["candidate"], cand(7));
    bob.send(json!({"type": "candidate", "call_id": id, "candidate": cand(8)}))
        .await;
    assert_eq!(bob.recv_type("error").await["code"], "too_many_candidates");
    // A multicast trickled candidate is refused too, and nothing refused reached the other
    // side.
    let mut multicast = cand(9);
    multicast["address"] = json!("224.0.0.9");
    bob.send(json!({"type": "candidate", "call_id": id, "candidate": multicast}))
        .await;
    assert_eq!(bob.recv_type("error").await["code"], "forbidden_candidate");
    for ws in [&mut alice, &mut bob] {
        ws.send(json!({"type": "list_contacts"})).await;
        ws.recv_type("contacts").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resend_after_reconnect_is_deduplicated() {
    let (_d, p) = db();
    let node = Node::start(&p, &[]);
    node.token("bob").await;
    // alice sends and loses her connection before reading the ack.
    let mut alice = node.connect("alice", "d1").await;
    alice
        .send(json!({"type": "send_message", "id": "once", "to": "bob", "body": "exactly once"}))
        .await;
    drop(alice);
    // She reconnects and resends (twice): one stored message, the same ack each time.
    let mut alice = node.connect("alice", "d1").await;
    let msg = json!({"type": "send_message", "id": "once", "to": "bob", "body": "exactly once"});
    alice.send(msg.clone()).await;
    let ack = alice.recv_type("message_ack").await;
    alice.send(msg).await;
    assert_eq!(alice.recv_type("message_ack").await, ack);
    // bob gets it once, drops the connection without acknowledging, and resumes from the
    // seq he processed: no duplicate. A fresh session replays it with the same seq and id,
    // by which the client drops what it already has.
    let token = node.token("bob").await;
    let mut bob = node.connect("bob", "phone").await;
    let m = bob.recv_type("message").await;
    assert_eq!(
        (m["seq"].as_u64(), m["id"].as_str()),
        (Some(1), Some("once"))
    );
    bob.send(json!({"type": "list_contacts"})).await;
    bob.recv_type("contacts").await;
    drop(bob);
    let mut bob =
        Ws::connect(&node.ws_url(&format!("token={token}&device=phone&resume_from=1"))).await;
    assert_eq!(bob.recv_type("welcome").await["resume"], "resumed");
    bob.send(json!({"type": "list_contacts"})).await;
    bob.recv_type("contacts").await;
    drop(bob);
    assert_eq!(node.metric("messages_stored_total").await, 1);
    assert!(node.metric("message_duplicates_total").await >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_gives_no_ack_and_an_explicit_error() {
    use nix::sys::resource::{Resource, setrlimit};
    use nix::sys::signal::{SigHandler, Signal, signal};
    use std::os::unix::process::CommandExt;
    let (_d, p) = db();
    // The node may not grow any file past 1 MiB (RLIMIT_FSIZE; SIGXFSZ ignored, so writes
    // past it fail with EFBIG / short writes, which SQLite reports like a full disk).
    let mut args = common::base_args(&p);
    args.extend(["--msg-rate", "1000", "--msg-burst", "1000"].map(String::from));
    let limited = Node::start_raw_with(&p, &args, |cmd| {
        // SAFETY: runs in the forked child before exec; setrlimit and signal(SIG_IGN) are
        // plain async-signal-safe system calls that touch no memory shared with the parent.
        unsafe {
            cmd.pre_exec(|| {
                signal(Signal::SIGXFSZ, SigHandler::SigIgn).map_err(std::io::Error::from)?;
                setrlimit(Resource::RLIMIT_FSIZE, 1 << 20, 1 << 20).map_err(std::io::Error::from)
            });
        }
    });
    limited.token("bob").await;
    let mut alice = limited.connect("alice", "d1").await;
    let body = "d".repeat(16_000);
    let mut acked = Vec::new();
    let failed = loop {
        assert!(acked.len() < 500, "the file size limit never hit");
        let id = format!("m{}", acked.len());
        alice
            .send(json!({"type": "send_message", "id": id, "to": "bob", "body": body}))
            .await;
        let r = alice.recv().await;
        match r["type"].as_str() {
            Some("message_ack") => {
                assert_eq!(r["id"], id.as_str());
                acked.push(id);
            }
            Some("error") => {
                assert_eq!(
                    (r["code"].as_str(), r["id"].as_str()),
                    (Some("storage"), Some(id.as_str())),
                    "{r}"
                );
                break id;
            }
            _ => panic!("unexpected {r}"),
        }
    };
    assert!(!acked.is_empty(), "some messages fit before the limit");
    assert_eq!(limited.metric("message_store_errors_total").await, 1);
    // The session is still usable.
    alice.send(json!({"type": "list_contacts"})).await;
    alice.recv_type("contacts").await;
    drop(alice);
    drop(limited);

    // After a restart without the limit: every acknowledged message is there, in order, and
    // the refused one is not.
    let node = Node::start(&p, &[]);
    let mut bob = node.connect("bob", "phone").await;
    for (i, id) in acked.iter().enumerate() {
        let m = bob.recv_type("message").await;
        assert_eq!(
            (m["seq"].as_u64(), m["id"].as_str()),
            (Some(i as u64 + 1), Some(id.as_str()))
        );
    }
    bob.send(json!({"type": "list_contacts"})).await;
    bob.recv_type("contacts").await;
    // Nothing of the refused send was recorded: resending it now stores it as new.
    let mut alice = node.connect("alice", "d1").await;
    alice
        .send(json!({"type": "send_message", "id": failed, "to": "bob", "body": body}))
        .await;
    alice.recv_type("message_ack").await;
    assert_eq!(node.metric("message_duplicates_total").await, 0);
    assert_eq!(
        bob.recv_type("message").await["seq"].as_u64(),
        Some(acked.len() as u64 + 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_guessing_is_throttled_with_one_error() {
    let (_d, p) = db();
    let node = Node::start(&p, &["--login-failures-per-account", "3"]);
    node.token("alice").await;
    let c = reqwest::Client::new();
    let login = |user: &str, pw: &str| {
        let req = c
            .post(node.url("/v1/login"))
            .json(&json!({"username": user, "password": pw}));
        async move {
            let r = tokio::time::timeout(WAIT, req.send())
                .await
                .unwrap()
                .unwrap();
            let status = r.status().as_u16();
            (status, r.text().await.unwrap())
        }
    };
    // Wrong password, unknown user, malformed name: one answer.
    let wrong = login("alice", "wrong-password").await;
    assert_eq!(wrong.0, 401);
    assert_eq!(login("nobody", "wrong-password").await, wrong);
    assert_eq!(login("x y", "wrong-password").await, wrong);
    // Three failures for alice (however the name is spelt) block her account, even with the right password.
    assert_eq!(login("alice", "still-wrong").await, wrong);
    assert_eq!(login("ALICE ", "wrong-again").await, wrong);
    let (status, body) = login("alice", "password-123").await;
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("throttled"), "{body}");
    assert!(node.metric("login_throttled_total").await >= 1);
}
