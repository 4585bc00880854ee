//! Call grace through the real binary: an accepted call survives a party's connection being
//! reset (as `conntrack -F` on its NAT does) when the same device reconnects within
//! `--call-grace`; frames for it are queued meanwhile. Without a reconnect the other party
//! hears `call_ended{disconnected}` once the grace has run out. Ringing invites and
//! `--call-grace 0` keep the immediate end.
// Test helpers outside #[test] fns: a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Node, Ws, desc};
use serde_json::{Value, json};

fn db() -> (tempfile::TempDir, std::path::PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("sig.db");
    (d, p)
}

/// An `ice_restart` frame with a new ufrag/pwd (the key stays the one of `desc`).
fn restart(id: &Value, ufrag: &str, n: usize) -> Value {
    let mut d = desc("127.0.0.1", n);
    d["ice_ufrag"] = json!(ufrag);
    d["ice_pwd"] = json!(format!("{ufrag}newpassword0123456789"));
    json!({"type": "ice_restart", "call_id": id, "desc": d})
}

fn cand(port: u16) -> Value {
    json!({"foundation": "g1", "component": 1, "transport": "udp", "priority": 1694498815u32,
           "address": "127.0.0.1", "port": port, "type": "srflx"})
}

/// bob (watching alice's presence) and alice in an accepted call placed by alice.
async fn accepted_call(node: &Node) -> (Ws, Ws, Value) {
    let mut bob = node.connect("bob", "phone").await;
    let mut alice = node.connect("alice", "laptop").await;
    bob.send(json!({"type": "add_contact", "username": "alice"}))
        .await;
    // alice's `presence{online}` may reach bob before or after the answer: her session
    // announces itself after her welcome, so possibly after bob added her.
    bob.recv_type_skip_presence("contacts").await;
    alice
        .send(json!({"type": "invite", "to": "bob", "offer": desc("127.0.0.1", 1)}))
        .await;
    let id = alice.recv_type("invite_sent").await["call_id"].clone();
    let inc = bob.recv_skip_presence().await;
    assert_eq!(
        (inc["type"].clone(), inc["call_id"].clone()),
        (json!("incoming_call"), id.clone())
    );
    bob.send(json!({"type": "accept", "call_id": id, "answer": desc("127.0.0.1", 1)}))
        .await;
    assert_eq!(alice.recv_type("call_accepted").await["call_id"], id);
    (alice, bob, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_call_survives_a_reset_caller_that_reconnects() {
    let (_d, p) = db();
    // A long grace: this test is about what happens inside it, not about its length.
    let node = Node::start(&p, &["--call-grace", "60s"]);
    let (alice, mut bob, id) = accepted_call(&node).await;

    alice.abort();
    // alice's presence goes offline only after the server handled her disconnect; the call
    // must not end on the way.
    bob.wait_presence("alice", "offline").await;

    // bob restarts ICE and trickles while alice is away: queued for her.
    let bob_restart = restart(&id, "bobr1", 2);
    bob.send(bob_restart.clone()).await;
    bob.send(json!({"type": "candidate", "call_id": id, "candidate": cand(50001)}))
        .await;

    // alice comes back on the same device: the queued frames follow her welcome.
    let mut alice = node.connect("alice", "laptop").await;
    let r = alice.recv_type("ice_restart").await;
    assert_eq!(
        (r["call_id"].clone(), r["desc"].clone()),
        (id.clone(), bob_restart["desc"].clone())
    );
    assert_eq!(alice.recv_type("candidate").await["candidate"], cand(50001));

    // Both directions work on the kept call.
    let alice_restart = restart(&id, "alir1", 1);
    alice.send(alice_restart.clone()).await;
    let r = bob.recv_skip_presence().await;
    assert_eq!(r["type"], "ice_restart", "{r}");
    assert_eq!(r["desc"], alice_restart["desc"]);
    let bob_restart = restart(&id, "bobr2", 1);
    bob.send(bob_restart.clone()).await;
    let r = alice.recv_type("ice_restart").await;
    assert_eq!(r["desc"], bob_restart["desc"]);

    // Hangup works as always.
    bob.send(json!({"type": "hangup", "call_id": id})).await;
    let e = alice.recv_type("call_ended").await;
    assert_eq!(
        (e["call_id"].clone(), e["reason"].clone()),
        (id.clone(), json!("hangup"))
    );
    alice.send(json!({"type": "hangup", "call_id": id})).await;
    assert_eq!(alice.recv_type("error").await["code"], "no_such_call");
    assert_eq!(node.metric("call_grace_resumed_total").await, 1);
    assert_eq!(node.metric("call_grace_expired_total").await, 0);
    assert_eq!(node.metric("calls_open").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answerer_reset_and_back_gets_the_hangup_sent_meanwhile() {
    let (_d, p) = db();
    let node = Node::start(&p, &["--call-grace", "60s"]);
    node.token("bob").await;
    let mut carol = node.connect("carol", "c1").await;
    carol
        .send(json!({"type": "add_contact", "username": "bob"}))
        .await;
    carol.recv_type("contacts").await;
    let (mut alice, bob, id) = accepted_call(&node).await;

    // The answering device (bob) is reset; alice hangs up while he is away.
    bob.abort();
    carol.wait_presence("bob", "offline").await;
    alice.send(json!({"type": "hangup", "call_id": id})).await;
    let mut bob = node.connect("bob", "phone").await;
    let e = bob.recv_skip_presence().await;
    assert_eq!(
        (e["type"].clone(), e["call_id"].clone(), e["reason"].clone()),
        (json!("call_ended"), id, json!("hangup"))
    );
    assert_eq!(node.metric("calls_open").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_reconnect_the_call_ends_disconnected_after_the_grace() {
    let (_d, p) = db();
    let grace = Duration::from_secs(4);
    let node = Node::start(&p, &["--call-grace", "4s"]);
    let (alice, mut bob, id) = accepted_call(&node).await;

    let dropped = Instant::now();
    alice.abort();
    let mut ended = None;
    for _ in 0..10 {
        let v = bob.recv().await;
        if v["type"] == "call_ended" {
            ended = Some(v);
            break;
        }
        assert_eq!(v["type"], "presence", "{v}");
    }
    let waited = dropped.elapsed();
    let e = ended.expect("call_ended");
    assert_eq!(
        (e["call_id"].clone(), e["reason"].clone()),
        (id, json!("disconnected"))
    );
    // Behaviour, not speed: not ended at the disconnect, but once the grace ran out.
    assert!(
        waited >= grace / 2,
        "ended after {waited:?}, before the grace"
    );
    assert!(
        waited <= grace + Duration::from_secs(15),
        "ended after {waited:?}"
    );
    assert_eq!(node.metric("call_grace_expired_total").await, 1);
    assert_eq!(node.metric("calls_open").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ringing_invites_and_zero_grace_end_at_once() {
    // A caller that drops while its invite rings cancels it at once: with a 60 s grace the
    // callee would otherwise wait past the harness's 20 s frame wait.
    let (_d, p) = db();
    let node = Node::start(&p, &["--call-grace", "60s"]);
    let mut bob = node.connect("bob", "phone").await;
    let alice = {
        let mut alice = node.connect("alice", "laptop").await;
        alice
            .send(json!({"type": "invite", "to": "bob", "offer": desc("127.0.0.1", 1)}))
            .await;
        let id = alice.recv_type("invite_sent").await["call_id"].clone();
        assert_eq!(bob.recv_type("incoming_call").await["call_id"], id);
        (alice, id)
    };
    let (alice, id) = alice;
    alice.abort();
    let e = bob.recv_skip_presence().await;
    assert_eq!(
        (e["type"].clone(), e["call_id"].clone(), e["reason"].clone()),
        (json!("call_ended"), id, json!("disconnected"))
    );
    drop(node);

    // --call-grace 0: an accepted call ends as soon as a party's connection drops.
    let (_d, p) = db();
    let node = Node::start(&p, &["--call-grace", "0s"]);
    let (alice, mut bob, id) = accepted_call(&node).await;
    alice.abort();
    let e = bob.recv_skip_presence().await;
    assert_eq!(
        (e["type"].clone(), e["call_id"].clone(), e["reason"].clone()),
        (json!("call_ended"), id, json!("disconnected"))
    );
    assert_eq!(node.metric("call_grace_expired_total").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_wait_for_the_grace() {
    // A party inside a 60 s grace; SIGTERM: the other party hears call_ended before goodbye
    // (not never, as when shutdown left the grace timer pending) and the node exits.
    let (_d, p) = db();
    let mut node = Node::start(&p, &["--call-grace", "60s"]);
    let (alice, mut bob, id) = accepted_call(&node).await;
    alice.abort();
    bob.wait_presence("alice", "offline").await;
    let started = Instant::now();
    let pid = nix::unistd::Pid::from_raw(i32::try_from(node.pid()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let e = bob.recv_skip_presence().await;
    assert_eq!(
        (e["type"].clone(), e["call_id"].clone(), e["reason"].clone()),
        (json!("call_ended"), id, json!("disconnected"))
    );
    assert_eq!(bob.recv_skip_presence().await["type"], "goodbye");
    assert_eq!(bob.closed().await.map(|c| c.0), Some(1001));
    let status = loop {
        if let Some(s) = node.child().try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(40),
            "node did not exit"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "{status}");
}
