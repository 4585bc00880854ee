//! The binary on `--store postgres://...` against a real PostgreSQL server
//! (`peerlink_testkit::postgres`): start-up refusals before any port is bound, the server
//! going away and coming back under a running node, and refresh-token rotation through the
//! HTTP API.
// Test helpers outside #[test] fns: a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Node, TestStore};
use serde_json::{Value, json};

/// Run the binary with `args` to its end (it must end within 60 s): exit code, stdout, stderr.
fn run_to_exit(args: &[&str]) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_peerlink-signaling"));
    cmd.args(["--listen", "127.0.0.1:0", "--no-stun", "--log", "warn"])
        .args(args)
        .env("PEERLINK_TOKEN_SECRET", common::TOKEN_SECRET)
        .env_remove("PEERLINK_STORE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    peerlink_cli::process::die_with_parent(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("peerlink-signaling {args:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_urls_credentials_servers_and_schemas_are_refused_before_binding() {
    let pg = peerlink_testkit::postgres::PgServer::start();
    let url = pg.create_database();
    let port = pg.port();
    let wrong_password = url.replace(pg.password(), "not-the-password");
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let unreachable = format!("postgres://peerlink:pw@127.0.0.1:{closed}/db");
    let bad_port = format!("postgres://peerlink:secret-pw@127.0.0.1:{port}x/db");
    let cases: [(&[&str], i32, &str); 5] = [
        (&["--store", &bad_port], 2, "bad PostgreSQL URL"),
        (&["--store", "mysql://h/db"], 2, "unknown store scheme"),
        (
            &["--store", &url, "--db", "/tmp/x.db"],
            2,
            "both --store and --db",
        ),
        (
            &["--store", &wrong_password],
            1,
            "password authentication failed",
        ),
        (
            &["--store", &unreachable, "--store-connect-timeout", "2s"],
            1,
            "cannot connect to PostgreSQL at postgres://peerlink:***@127.0.0.1",
        ),
    ];
    for (args, code, want) in cases {
        let (got, stdout, stderr) = run_to_exit(args);
        assert_eq!(got, Some(code), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
        assert!(!stdout.contains("http="), "{args:?} bound a port: {stdout}");
        assert!(
            !stderr.contains("secret-pw") && !stderr.contains("not-the-password"),
            "a password in the error: {stderr}"
        );
    }
    // A database migrated by a newer binary.
    peerlink_testkit::postgres::PgServer::execute(
        &url,
        "CREATE TABLE schema_migrations(
             version BIGINT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now());
         INSERT INTO schema_migrations(version) VALUES (1), (2), (99)",
    );
    let (code, stdout, stderr) = run_to_exit(&["--store", &url]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("database schema version 99 is newer than this binary supports"),
        "{stderr}"
    );
    assert!(stderr.contains("upgrade peerlink-signaling"), "{stderr}");
    assert!(!stdout.contains("http="));
}

async fn post(node: &Node, path: &str, body: Value) -> (u16, Value) {
    let r = tokio::time::timeout(
        common::WAIT,
        reqwest::Client::new()
            .post(node.url(path))
            .json(&body)
            .send(),
    )
    .await
    .expect("request timed out")
    .expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// PostgreSQL stops (immediate shutdown, as a crash) under a running node: sends get an
/// `error{code: storage}` frame and no ack, HTTP calls 503 `store_unavailable`; it starts
/// again on the same port and the node carries on by itself: the next send is acknowledged,
/// and every message acknowledged before, during or after is delivered, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_is_refused_cleanly_and_service_resumes_by_itself() {
    let mut store = TestStore::postgres();
    let node = Node::start_on(&store, &["--no-stun"]);
    node.token("bob").await;
    let mut alice = node.connect("alice", "d1").await;
    alice
        .send(json!({"type": "send_message", "id": "before", "to": "bob", "body": "one"}))
        .await;
    alice.recv_type("message_ack").await;

    store.server().stop_immediate();
    alice
        .send(json!({"type": "send_message", "id": "during", "to": "bob", "body": "two"}))
        .await;
    let e = alice.recv_type("error").await;
    assert_eq!(
        (e["code"].as_str(), e["id"].as_str()),
        (Some("storage"), Some("during")),
        "{e}"
    );
    let creds = json!({"username": "alice", "password": "password-123"});
    let (status, v) = post(&node, "/v1/login", creds.clone()).await;
    assert_eq!(
        (status, v["error"].as_str()),
        (503, Some("store_unavailable")),
        "{v}"
    );
    let carol = json!({"username": "carol", "password": "password-123"});
    assert_eq!(post(&node, "/v1/register", carol.clone()).await.0, 503);
    assert!(node.metric("message_store_errors_total").await >= 1);

    // Back on the same port, same data: no restart of the node.
    store.server().run();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        alice
            .send(json!({"type": "send_message", "id": "during", "to": "bob", "body": "two"}))
            .await;
        let v = alice.recv().await;
        if v["type"] == "message_ack" {
            break;
        }
        assert_eq!(v["code"], "storage", "{v}");
        assert!(Instant::now() < deadline, "the store did not come back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    alice
        .send(json!({"type": "send_message", "id": "after", "to": "bob", "body": "three"}))
        .await;
    alice.recv_type("message_ack").await;
    assert_eq!(post(&node, "/v1/register", carol).await.0, 201);
    assert_eq!(post(&node, "/v1/login", creds).await.0, 200);

    let mut bob = node.connect("bob", "phone").await;
    for (seq, id) in [(1, "before"), (2, "during"), (3, "after")] {
        let m = bob.recv_type("message").await;
        assert_eq!(
            (m["seq"].as_u64(), m["id"].as_str()),
            (Some(seq), Some(id)),
            "{m}"
        );
    }
    bob.send(json!({"type": "list_contacts"})).await;
    bob.recv_type("contacts").await;
}

/// Refresh rotation through the binary on PostgreSQL: rotate, reuse revokes the chain,
/// logout revokes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_rotation_and_logout_on_postgres() {
    let store = TestStore::postgres();
    let node = Node::start_on(&store, &["--no-stun"]);
    node.token("alice").await;
    let login = json!({"username": "alice", "password": "password-123", "device": "phone"});
    let (s, v) = post(&node, "/v1/login", login.clone()).await;
    assert_eq!(s, 200, "{v}");
    let t0 = v["refresh_token"].as_str().unwrap().to_owned();
    let (s, v) = post(&node, "/v1/refresh", json!({ "refresh_token": t0 })).await;
    assert_eq!(s, 200, "{v}");
    let t1 = v["refresh_token"].as_str().unwrap().to_owned();
    let (s, v) = post(&node, "/v1/refresh", json!({ "refresh_token": t0 })).await;
    assert_eq!((s, v["error"].as_str()), (401, Some("token_reused")));
    let (s, _) = post(&node, "/v1/refresh", json!({ "refresh_token": t1 })).await;
    assert_eq!(s, 401, "the chain is revoked");
    let (_, v) = post(&node, "/v1/login", login).await;
    let p0 = v["refresh_token"].as_str().unwrap().to_owned();
    let (s, _) = post(&node, "/v1/logout", json!({ "refresh_token": p0 })).await;
    assert_eq!(s, 204);
    let (s, _) = post(&node, "/v1/refresh", json!({ "refresh_token": p0 })).await;
    assert_eq!(s, 401);
}
