//! The fleet's shared login throttle, with real processes on loopback: two signaling nodes on
//! one SQLite store and one `redis-server` (`--throttle-store`). Failed logins spread over both
//! nodes meet one limit; a successful login clears its account's count on every node; with
//! Redis gone, each node's own throttle still refuses a guesser and the errors are counted;
//! the shared counts resume when Redis returns; an unreachable or malformed throttle store
//! ends the node before it binds.
//!
//! Skips, with one line, when `redis-server` is not installed.
// Test helpers outside #[test] fns: a panic is the failure report.
#![allow(clippy::unwrap_used)]

#[macro_use]
#[allow(unused_macros)]
mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Node, WAIT};
use peerlink_testkit::redis::RedisServer;
use serde_json::json;

/// Failures per account per window on every node.
const PER_ACCOUNT: &str = "4";

async fn login(node: &Node, user: &str, password: &str) -> u16 {
    let body = json!({"username": user, "password": password});
    let r = tokio::time::timeout(
        WAIT,
        reqwest::Client::new()
            .post(node.url("/v1/login"))
            .json(&body)
            .send(),
    )
    .await
    .expect("login timeout")
    .expect("login");
    r.status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_spread_over_two_nodes_meet_one_limit() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let db = d.path().join("shared.db");
    let store = redis.url(0) + "?prefix=throttle-test";
    let flags = [
        "--throttle-store",
        &store,
        "--login-failures-per-account",
        PER_ACCOUNT,
        // One client IP (loopback) for every account here: keep the IP limit out of the way.
        "--login-failures-per-ip",
        "1000",
    ];
    let a = Node::start(&db, &flags);
    let b = Node::start(&db, &flags);
    a.token("alice").await; // registers alice (and logs in once)

    // Two wrong passwords on each node: the fourth failure reaches the fleet's limit, so the
    // next attempt is refused on either node, the right password included.
    for node in [&a, &b, &a, &b] {
        assert_eq!(login(node, "alice", "wrong-password").await, 401);
    }
    assert_eq!(login(&a, "alice", "password-123").await, 429);
    assert_eq!(login(&b, "alice", "wrong-password").await, 429);
    // Each node on its own has seen two failures only: without the shared count they would
    // have let these through.
    assert_eq!(a.metric("login_throttled_total").await, 1);
    assert_eq!(b.metric("login_throttled_total").await, 1);

    // Another account is not affected, and its success clears its count everywhere.
    a.token("bob").await;
    for node in [&a, &b, &a] {
        assert_eq!(login(node, "bob", "wrong-password").await, 401);
    }
    assert_eq!(login(&b, "bob", "password-123").await, 200);
    for node in [&a, &b, &a] {
        assert_eq!(login(node, "bob", "wrong-password").await, 401);
    }
    assert_eq!(
        login(&b, "bob", "password-123").await,
        200,
        "the success cleared the count: three more failures stay under the limit"
    );

    // Redis gone: logins still work, each node's own table still throttles, errors counted.
    redis.kill();
    a.token("carol").await;
    assert_eq!(login(&a, "carol", "password-123").await, 200);
    for _ in 0..4 {
        assert_eq!(login(&a, "carol", "wrong-password").await, 401);
    }
    assert_eq!(login(&a, "carol", "password-123").await, 429);
    assert!(a.metric("throttle_store_errors_total").await >= 1);

    // Redis back (empty): the shared counts resume by themselves (a fresh account per try, so
    // no node's own table stops the attempts first).
    redis.run();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    for i in 0.. {
        let user = format!("dave{i}");
        for node in [&a, &b] {
            assert_eq!(login(node, &user, "wrong-password").await, 401);
        }
        if redis.command(&["DBSIZE"]) != ":0" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no shared count after Redis returned"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[test]
fn an_unreachable_or_malformed_throttle_store_stops_the_node_before_it_binds() {
    let d = tempfile::tempdir().unwrap();
    let db = d.path().join("s.db");
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("redis://{}", dead.local_addr().unwrap());
    drop(dead);
    for (url, code, says) in [
        (dead_url.as_str(), 1, "throttle store"),
        ("http://127.0.0.1:6379", 2, "--throttle-store"),
        ("redis://127.0.0.1:6379?ttl=5", 2, "unknown parameter"),
    ] {
        let mut args = common::base_args(&db);
        args.extend(["--throttle-store".to_string(), url.to_string()]);
        let out = Command::new(env!("CARGO_BIN_EXE_peerlink-signaling"))
            .args(&args)
            .env("PEERLINK_TOKEN_SECRET", common::TOKEN_SECRET)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{url}: {err}");
        assert!(err.contains(says), "{url}: {err}");
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("http="),
            "{url}: bound a port"
        );
    }
}
