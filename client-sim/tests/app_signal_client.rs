//! The signaling client against the real `peerlink-signaling` binary (child process on free
//! loopback ports, temp database, killed on drop). The workspace must be built first
//! (`cargo build --workspace`); a missing binary fails with a clear message.
#![allow(clippy::unwrap_used)]

use std::process::Stdio;
use std::time::Duration;

use peerlink_api::signaling::{ClientMsg, ResumeOutcome, ServerMsg};
use peerlink_api::signaling_client::{HttpApi, SignalError, SignalSession, parse_turn_uri};
use peerlink_sim::fleet::locate_binary;
use tokio::io::{AsyncBufReadExt, BufReader};

/// Bound on every single wait.
const WAIT: Duration = Duration::from_secs(30);
/// Bound on a whole test.
const TEST: Duration = Duration::from_secs(120);
const PW: &str = "password-123";

struct Node {
    _child: tokio::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

async fn start_node() -> Node {
    let bin = locate_binary("peerlink-signaling").unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(bin)
        .args(["--listen", "127.0.0.1:0", "--stun", "127.0.0.1:0"])
        .args(["--argon2-m-kib", "64", "--argon2-t", "1", "--log", "warn"])
        .args(["--relay", "127.0.0.1:3478"])
        .arg("--db")
        .arg(dir.path().join("s.db"))
        .env(
            "PEERLINK_TOKEN_SECRET",
            "app-test-token-secret-0123456789abcdef",
        )
        .env("PEERLINK_TURN_SECRET", "app-test-turn-secret")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn peerlink-signaling");
    let out = child.stdout.take().unwrap();
    let mut lines = BufReader::new(out).lines();
    let url = tokio::time::timeout(WAIT, async {
        loop {
            let l = lines.next_line().await.unwrap().expect("signaling exited");
            if let Some(a) = l.strip_prefix("http=") {
                return format!("http://{a}");
            }
        }
    })
    .await
    .expect("signaling did not announce http=");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Node {
        _child: child,
        url,
        _dir: dir,
    }
}

async fn account(api: &HttpApi, user: &str) -> peerlink_api::signaling_client::Tokens {
    api.register(user, PW).await.unwrap();
    api.login(user, PW).await.unwrap()
}

async fn next_message(s: &mut SignalSession) -> (u64, String, String) {
    let m = s
        .wait_for(WAIT, "message", None, |m| {
            matches!(m, ServerMsg::Message { .. })
        })
        .await
        .unwrap();
    match m {
        ServerMsg::Message {
            seq, from, body, ..
        } => (seq, from, body),
        _ => unreachable!(),
    }
}

#[tokio::test]
async fn register_login_chat_and_inbox_between_two_clients() {
    tokio::time::timeout(TEST, async {
        let node = start_node().await;
        let api = HttpApi::new(&node.url, WAIT).unwrap();
        let alice_t = account(&api, "alice").await;
        let bob_t = account(&api, "bob").await;
        assert_eq!(alice_t.username, "alice");

        // Typed HTTP errors.
        let e = api.register("alice", PW).await.unwrap_err();
        assert_eq!(e.status(), Some(409), "{e}");
        let e = api.login("alice", "wrong-password").await.unwrap_err();
        assert_eq!(e.status(), Some(401), "{e}");

        // Offline delivery: bob is not connected when alice writes.
        let mut alice = SignalSession::connect(api.clone(), alice_t, "laptop", None)
            .await
            .unwrap();
        assert_eq!(alice.welcome().user, "alice");
        let (id, stored) = alice
            .send_message("bob", "first, while offline", WAIT)
            .await
            .unwrap();
        assert!(stored > 0 && !id.is_empty());

        let mut bob = SignalSession::connect(api.clone(), bob_t, "phone", None)
            .await
            .unwrap();
        assert_eq!(bob.welcome().resume, ResumeOutcome::Fresh);
        let (seq1, from, body) = next_message(&mut bob).await;
        assert_eq!(
            (from.as_str(), body.as_str()),
            ("alice", "first, while offline")
        );
        bob.ack(seq1).await.unwrap();

        // Live delivery.
        alice
            .send_message("bob", "second, live", WAIT)
            .await
            .unwrap();
        let (seq2, _, body) = next_message(&mut bob).await;
        assert_eq!(body, "second, live");
        assert!(seq2 > seq1);
        bob.ack(seq2).await.unwrap();

        // A message to nobody is a typed server error, and the session stays usable.
        let e = alice
            .send_message("nobody-here", "x", WAIT)
            .await
            .unwrap_err();
        assert!(matches!(e, SignalError::Server { .. }), "{e}");
        alice.send_message("bob", "third", WAIT).await.unwrap();
        let (_, _, body) = next_message(&mut bob).await;
        assert_eq!(body, "third");
        alice.close().await;
        bob.close().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn reconnect_resumes_unacked_messages_once() {
    tokio::time::timeout(TEST, async {
        let node = start_node().await;
        let api = HttpApi::new(&node.url, WAIT).unwrap();
        let alice_t = account(&api, "carol").await;
        let bob_t = account(&api, "dave").await;
        let mut alice = SignalSession::connect(api.clone(), alice_t, "d1", None)
            .await
            .unwrap();
        let mut bob = SignalSession::connect(api.clone(), bob_t, "d1", None)
            .await
            .unwrap();

        alice.send_message("dave", "m1", WAIT).await.unwrap();
        let (s1, _, _) = next_message(&mut bob).await;
        bob.ack(s1).await.unwrap();
        alice.send_message("dave", "m2", WAIT).await.unwrap();
        let (s2, _, b2) = next_message(&mut bob).await;
        assert_eq!(b2, "m2");
        // m2 is NOT acked: a reconnect must replay it, and only it.
        let outcome = bob.reconnect().await.unwrap();
        assert_eq!(outcome, ResumeOutcome::Resumed);
        let (s2b, _, b2b) = next_message(&mut bob).await;
        assert_eq!((s2b, b2b.as_str()), (s2, "m2"));
        bob.ack(s2b).await.unwrap();

        // After the ack, a second reconnect replays nothing: the next message is m3.
        let outcome = bob.reconnect().await.unwrap();
        assert_eq!(outcome, ResumeOutcome::Resumed);
        alice.send_message("dave", "m3", WAIT).await.unwrap();
        let (s3, _, b3) = next_message(&mut bob).await;
        assert_eq!(b3, "m3");
        assert!(s3 > s2);
        assert_eq!(bob.acked_seq(), s2);

        // Token refresh mid-session (auth frame, auth_ok) and TURN credentials.
        let before = bob.tokens().clone();
        bob.refresh_token().await.unwrap();
        assert_eq!(bob.tokens().username, "dave");
        assert!(!bob.tokens().refresh_token.is_empty());
        let creds = bob.turn_credentials().await.unwrap();
        assert!(creds.username.ends_with(":dave"), "{}", creds.username);
        assert_eq!(
            creds.uris.iter().find_map(|u| parse_turn_uri(u)),
            Some("127.0.0.1:3478".parse().unwrap())
        );
        assert!(before.access_expires_at <= bob.tokens().access_expires_at);

        // The session still carries frames after the refresh.
        bob.send(&ClientMsg::ListContacts).await.unwrap();
        bob.wait_for(WAIT, "contacts", None, |m| {
            matches!(m, ServerMsg::Contacts { .. })
        })
        .await
        .unwrap();
        bob.close().await;
        alice.close().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn bad_token_is_refused_with_a_typed_error() {
    tokio::time::timeout(TEST, async {
        let node = start_node().await;
        let api = HttpApi::new(&node.url, WAIT).unwrap();
        let mut t = account(&api, "erin").await;
        t.access_token = "not-a-token".into();
        let e = SignalSession::connect(api.clone(), t.clone(), "d", None)
            .await
            .unwrap_err();
        // The server refuses the upgrade (HTTP 401) or closes with 1008.
        assert!(
            matches!(
                e,
                SignalError::Ws(_) | SignalError::Closed { .. } | SignalError::Server { .. }
            ),
            "{e}"
        );
        let e = api.turn_credentials("not-a-token").await.unwrap_err();
        assert_eq!(e.status(), Some(401), "{e}");
        let e = api.refresh("garbage").await.unwrap_err();
        assert_eq!(e.status(), Some(401), "{e}");
    })
    .await
    .expect("test timed out");
}
