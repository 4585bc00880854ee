//! Two signaling nodes and the real directory binary on loopback: a call (invite, ringing,
//! accept, candidates both ways, hangup) and a message between users on different nodes.
//! The nodes share one store (accounts and messages), as the nodes of a fleet do: an SQLite
//! file, and for the tests run on both stores (`<test>::postgres`) a PostgreSQL database.
// Test helpers outside #[test] fns: a panic is the failure report.
#![allow(clippy::unwrap_used)]

#[macro_use]
mod common;

use std::process::Command;
use std::time::Duration;

use common::{Node, TestStore, desc};
use peerlink_testkit::proc::{Service, workspace_bin};
use serde_json::json;

const CLUSTER_TOKEN: &str = "two-node-cluster-token";

/// A running `peerlink-directory` (killed on drop).
struct Directory {
    _proc: Service,
    url: String,
}

fn start_directory() -> Directory {
    start_directory_with(&["--listen", "127.0.0.1:0"])
}

fn start_directory_with(args: &[&str]) -> Directory {
    let mut cmd = Command::new(workspace_bin("peerlink-directory"));
    cmd.args(args)
        .env("PEERLINK_CLUSTER_TOKEN", CLUSTER_TOKEN)
        .env("RUST_LOG", "warn");
    let mut proc = Service::start("peerlink-directory", cmd);
    let addr = proc.wait_for(Duration::from_secs(60), |l| {
        l.strip_prefix("listening on ").map(|a| a.trim().to_owned())
    });
    Directory {
        _proc: proc,
        url: format!("http://{addr}"),
    }
}

fn node(db: &std::path::Path, dir: &Directory, id: &str) -> Node {
    node_on_args(db, common::base_args(db), dir, id)
}

/// A node on `store` (SQLite file or PostgreSQL database).
fn node_on(store: &TestStore, dir: &Directory, id: &str) -> Node {
    node_on_args(&store.path(), common::store_args(store), dir, id)
}

fn node_on_args(db: &std::path::Path, mut args: Vec<String>, dir: &Directory, id: &str) -> Node {
    for a in [
        "--directory",
        &dir.url,
        "--node-id",
        id,
        "--cluster-token",
        CLUSTER_TOKEN,
    ] {
        args.push(a.to_string());
    }
    Node::start_raw(db, &args)
}

on_both_stores!(call_and_message_across_nodes);
async fn call_and_message_across_nodes(store: TestStore) {
    let dir = start_directory();
    let a = node_on(&store, &dir, "node-a");
    let b = node_on(&store, &dir, "node-b");

    let mut bob = b.connect("bob", "phone").await;
    let mut alice = a.connect("alice", "laptop").await;

    // Call: alice on A invites bob on B.
    let offer = desc("127.0.0.1", 2);
    alice
        .send(json!({"type": "invite", "to": "bob", "offer": offer}))
        .await;
    let sent = alice.recv_type("invite_sent").await;
    assert_eq!(sent["devices"], 1, "{sent}");
    let id = sent["call_id"].clone();
    let inc = bob.recv_type("incoming_call").await;
    assert_eq!(
        (
            inc["call_id"].clone(),
            inc["from"].clone(),
            inc["offer"].clone()
        ),
        (id.clone(), json!("alice"), offer)
    );
    bob.send(json!({"type": "ringing", "call_id": id})).await;
    assert_eq!(alice.recv_type("ringing").await["device"], "phone");
    let answer = desc("127.0.0.1", 1);
    bob.send(json!({"type": "accept", "call_id": id, "answer": answer}))
        .await;
    let acc = alice.recv_type("call_accepted").await;
    assert_eq!(acc["answer"], answer);
    let cand = json!({"foundation": "r1", "component": 1, "transport": "udp", "priority": 16777215,
                      "address": "127.0.0.1", "port": 61000, "type": "relay"});
    alice
        .send(json!({"type": "candidate", "call_id": id, "candidate": cand}))
        .await;
    assert_eq!(bob.recv_type("candidate").await["candidate"], cand);
    bob.send(json!({"type": "candidate", "call_id": id, "candidate": cand}))
        .await;
    assert_eq!(alice.recv_type("candidate").await["candidate"], cand);
    bob.send(json!({"type": "end_of_candidates", "call_id": id}))
        .await;
    alice.recv_type("end_of_candidates").await;
    bob.send(json!({"type": "hangup", "call_id": id})).await;
    let e = alice.recv_type("call_ended").await;
    assert_eq!(
        (e["call_id"].clone(), e["reason"].clone()),
        (id, json!("hangup"))
    );

    // Message: alice on A -> bob on B, delivered live.
    alice
        .send(json!({"type": "send_message", "id": "x-1", "to": "bob", "body": "across"}))
        .await;
    alice.recv_type("message_ack").await;
    let m = bob.recv_type("message").await;
    assert_eq!(
        (m["from"].as_str(), m["body"].as_str()),
        (Some("alice"), Some("across"))
    );
    assert!(a.metric("forwards_total").await >= 3);
    assert_eq!(a.metric("forward_errors_total").await, 0);

    // Presence across nodes: alice adds bob and sees him online (he is on node B).
    alice
        .send(json!({"type": "add_contact", "username": "bob"}))
        .await;
    assert_eq!(
        alice.recv_type("contacts").await["contacts"],
        json!([{"username": "bob", "status": "online"}])
    );

    // bob answers a second call and his connection drops: alice is told that bob went
    // offline, then, once his node's call grace (default 5 s) ran out without him coming
    // back, that the call ended (his node hangs up for him).
    alice
        .send(json!({"type": "invite", "to": "bob", "offer": desc("127.0.0.1", 1)}))
        .await;
    let id = alice.recv_type("invite_sent").await["call_id"].clone();
    bob.recv_type("incoming_call").await;
    bob.send(json!({"type": "accept", "call_id": id, "answer": desc("127.0.0.1", 1)}))
        .await;
    alice.recv_type("call_accepted").await;
    drop(bob);
    assert_eq!(alice.recv_type("presence").await["status"], "offline");
    let e = alice.recv_type("call_ended").await;
    assert_eq!(
        (e["call_id"].clone(), e["reason"].clone()),
        (id, json!("disconnected"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turn_credentials_name_the_relay_the_directory_chose() {
    use peerlink_api::directory::RegisterRelayRequest;
    use peerlink_api::directory_client::DirectoryClient;
    let d = tempfile::tempdir().unwrap();
    let db = d.path().join("shared.db");
    let dir = start_directory();
    let a = node(&db, &dir, "node-a");
    let relay = RegisterRelayRequest {
        relay_id: "relay-1".into(),
        turn_addr: "127.0.0.1:3478".parse().unwrap(),
        turn_tcp_addr: None,
        turn_tls_addr: None,
        metrics_addr: "127.0.0.1:9641".parse().unwrap(),
        region: "default".into(),
        capacity: 1000,
        load: 0.0,
        allocations: 0,
        draining: false,
    };
    // A second relay also listens for TCP and TLS clients.
    let streams = RegisterRelayRequest {
        relay_id: "relay-2".into(),
        turn_addr: "127.0.0.2:3478".parse().unwrap(),
        turn_tcp_addr: Some("127.0.0.2:3478".parse().unwrap()),
        turn_tls_addr: Some("127.0.0.2:443".parse().unwrap()),
        ..relay.clone()
    };
    let client = DirectoryClient::new(&dir.url, CLUSTER_TOKEN).unwrap();
    for r in [&relay, &streams] {
        tokio::time::timeout(common::WAIT, client.register_relay(r))
            .await
            .unwrap()
            .unwrap();
    }
    let token = a.token("alice").await;
    let r = reqwest::Client::new()
        .post(a.url("/v1/turn-credentials"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let c: serde_json::Value = r.json().await.unwrap();
    // Both relays, each with its ladder (UDP, TCP, TLS) in order, the better relay first.
    let one = json!(["turn:127.0.0.1:3478?transport=udp"]);
    let two = json!([
        "turn:127.0.0.2:3478?transport=udp",
        "turn:127.0.0.2:3478?transport=tcp",
        "turns:127.0.0.2:443?transport=tcp"
    ]);
    let uris = c["uris"].as_array().unwrap().clone();
    let joined = |a: &serde_json::Value, b: &serde_json::Value| {
        json!([a.as_array().unwrap().clone(), b.as_array().unwrap().clone()].concat())
    };
    assert!(
        json!(uris) == joined(&one, &two) || json!(uris) == joined(&two, &one),
        "{uris:?}"
    );
    let user = c["username"].as_str().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let checked =
        peerlink_proto::auth::rest::validate([common::TURN_SECRET.as_bytes()], user, now, 3600)
            .unwrap();
    assert_eq!(checked.first(), c["password"].as_str().unwrap());
}

/// Poll `cond` every 100 ms for at most 20 s (waiting on another process's timers).
async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

on_both_stores!(directory_restart_and_node_failover);
async fn directory_restart_and_node_failover(store: TestStore) {
    use peerlink_api::directory_client::DirectoryClient;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let dir_args = [
        "--listen",
        listen.as_str(),
        "--node-ttl",
        "1.5",
        "--presence-ttl",
        "3",
    ];
    let dir = start_directory_with(&dir_args);
    let a = node_on(&store, &dir, "node-a");
    let mut b = node_on(&store, &dir, "node-b");
    let mut bob = b.connect("bob", "phone").await;
    let mut alice = a.connect("alice", "laptop").await;
    let client = DirectoryClient::new(&dir.url, CLUSTER_TOKEN).unwrap();

    // The directory restarts empty; node B re-registers and republishes bob within a heartbeat.
    drop(dir);
    let dir = start_directory_with(&dir_args);
    eventually("bob republished", || async {
        client
            .lookup_user("bob")
            .await
            .is_ok_and(|l| l.devices.len() == 1)
    })
    .await;
    alice
        .send(json!({"type": "invite", "to": "bob", "offer": desc("127.0.0.1", 1)}))
        .await;
    let sent = alice.recv_type("invite_sent").await;
    assert_eq!(sent["devices"], 1, "{sent}");
    bob.recv_type("incoming_call").await;
    alice
        .send(json!({"type": "cancel", "call_id": sent["call_id"]}))
        .await;
    assert_eq!(bob.recv_type("call_ended").await["reason"], "cancelled");

    // Node B dies: bob shows offline within the presence TTL.
    let token = a.token("bob").await;
    b.child().kill().unwrap();
    b.child().wait().unwrap();
    drop(bob);
    eventually("bob offline", || async {
        client
            .lookup_user("bob")
            .await
            .is_ok_and(|l| l.devices.is_empty())
    })
    .await;
    // A message sent meanwhile is stored; bob reconnects to node A and gets it.
    alice
        .send(json!({"type": "send_message", "id": "while-away", "to": "bob", "body": "hi"}))
        .await;
    alice.recv_type("message_ack").await;
    let mut bob =
        common::Ws::connect(&a.ws_url(&format!("token={token}&device=phone&resume_from=0"))).await;
    assert_eq!(bob.recv_type("welcome").await["node"], "node-a");
    let m = bob.recv_type("message").await;
    assert_eq!(m["id"], "while-away");
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ice_restart_across_nodes() {
    let d = tempfile::tempdir().unwrap();
    let db = d.path().join("shared.db");
    let dir = start_directory();
    let a = node(&db, &dir, "node-a");
    let b = node(&db, &dir, "node-b");
    let mut phone = b.connect("bob", "phone").await;
    let mut desk = b.connect("bob", "desk").await;
    let mut eve = b.connect("eve", "e1").await;
    let mut alice = a.connect("alice", "laptop").await;

    alice
        .send(json!({"type": "invite", "to": "bob", "offer": desc("127.0.0.1", 1)}))
        .await;
    let sent = alice.recv_type("invite_sent").await;
    assert_eq!(sent["devices"], 2, "{sent}");
    let id = sent["call_id"].clone();
    phone.recv_type("incoming_call").await;
    desk.recv_type("incoming_call").await;
    let restart = |ufrag: &str, n: usize| {
        let mut d = desc("127.0.0.1", n);
        d["ice_ufrag"] = json!(ufrag);
        d["ice_pwd"] = json!(format!("{ufrag}newpassword0123456789"));
        json!({"type": "ice_restart", "call_id": id, "desc": d})
    };
    // Ringing: the callee's restart is forwarded to the arbiter (node A) and refused there.
    phone.send(restart("ring", 1)).await;
    assert_eq!(phone.recv_type("error").await["code"], "not_allowed");

    phone
        .send(json!({"type": "accept", "call_id": id, "answer": desc("127.0.0.1", 1)}))
        .await;
    alice.recv_type("call_accepted").await;
    desk.recv_type("answered_elsewhere").await;

    // Caller (node A) -> callee (node B).
    let f = restart("acr1", 2);
    alice.send(f.clone()).await;
    let r = phone.recv_type("ice_restart").await;
    assert_eq!(
        (r["call_id"].clone(), r["desc"].clone()),
        (id.clone(), f["desc"].clone())
    );
    // Callee (node B) -> caller (node A).
    let f = restart("bcr1", 3);
    phone.send(f.clone()).await;
    let r = alice.recv_type("ice_restart").await;
    assert_eq!(
        (r["call_id"].clone(), r["desc"].clone()),
        (id.clone(), f["desc"].clone())
    );

    // Refused across nodes too: the callee's other device, a stranger on the callee's node
    // that knows the call id, and bad descriptions from either side.
    desk.send(restart("desk", 1)).await;
    assert_eq!(desk.recv_type("error").await["code"], "not_allowed");
    eve.send(restart("evee", 1)).await;
    assert_eq!(eve.recv_type("error").await["code"], "not_allowed");
    let mut f = restart("bad1", 1);
    f["desc"]["transfer_fingerprint"] = json!("XYZ");
    phone.send(f).await;
    assert_eq!(phone.recv_type("error").await["code"], "invalid");
    phone.send(restart("bad2", 33)).await;
    assert_eq!(
        phone.recv_type("error").await["code"],
        "too_many_candidates"
    );
    let mut f = restart("bad3", 1);
    f["desc"]["purpose"] = json!({"kind": "file", "name": "..", "size": 3});
    alice.send(f).await;
    assert_eq!(alice.recv_type("error").await["code"], "invalid");

    // Nothing of the refused restarts reached anyone: the next frames are these answers.
    for ws in [&mut phone, &mut desk, &mut eve, &mut alice] {
        ws.send(json!({"type": "list_contacts"})).await;
        ws.recv_type("contacts").await;
    }
    alice.send(json!({"type": "hangup", "call_id": id})).await;
    assert_eq!(phone.recv_type("call_ended").await["reason"], "hangup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callee_reset_and_back_on_its_node_keeps_the_call() {
    // alice (node A, the arbiter) calls bob (node B). bob's connection is reset and he
    // reconnects to node B within its call grace: the call goes on, and what alice sent
    // meanwhile reaches him.
    let d = tempfile::tempdir().unwrap();
    let db = d.path().join("shared.db");
    let dir = start_directory();
    let a = node(&db, &dir, "node-a");
    let b = node(&db, &dir, "node-b");
    let mut bob = b.connect("bob", "phone").await;
    let mut alice = a.connect("alice", "laptop").await;
    alice
        .send(json!({"type": "add_contact", "username": "bob"}))
        .await;
    alice.recv_type("contacts").await;
    alice
        .send(json!({"type": "invite", "to": "bob", "offer": desc("127.0.0.1", 1)}))
        .await;
    let id = alice.recv_skip_presence().await["call_id"].clone();
    bob.recv_type("incoming_call").await;
    bob.send(json!({"type": "accept", "call_id": id, "answer": desc("127.0.0.1", 1)}))
        .await;
    assert_eq!(alice.recv_skip_presence().await["type"], "call_accepted");
    let restart = |ufrag: &str, n: usize| {
        let mut d = desc("127.0.0.1", n);
        d["ice_ufrag"] = json!(ufrag);
        d["ice_pwd"] = json!(format!("{ufrag}newpassword0123456789"));
        json!({"type": "ice_restart", "call_id": id, "desc": d})
    };

    bob.abort();
    // Node B handled the disconnect (presence follows it); the call did not end.
    alice.wait_presence("bob", "offline").await;
    let f = restart("acr1", 2);
    alice.send(f.clone()).await;
    let mut bob = b.connect("bob", "phone").await;
    let r = bob.recv_type("ice_restart").await;
    assert_eq!(
        (r["call_id"].clone(), r["desc"].clone()),
        (id.clone(), f["desc"].clone())
    );
    let f = restart("bcr1", 1);
    bob.send(f.clone()).await;
    let r = alice.recv_skip_presence().await;
    assert_eq!(
        (r["type"].clone(), r["desc"].clone()),
        (json!("ice_restart"), f["desc"].clone())
    );
    bob.send(json!({"type": "hangup", "call_id": id})).await;
    let e = alice.recv_skip_presence().await;
    assert_eq!(
        (e["type"].clone(), e["reason"].clone()),
        (json!("call_ended"), json!("hangup"))
    );
    assert_eq!(b.metric("call_grace_resumed_total").await, 1);
    assert_eq!(a.metric("calls_open").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_purges_its_old_presence_and_stale_epochs_lose() {
    use peerlink_api::directory::{
        PresenceStatus, PresenceUpdate, RegisterNodeRequest, UpdateOutcome,
    };
    use peerlink_api::directory_client::DirectoryClient;
    let d = tempfile::tempdir().unwrap();
    let db = d.path().join("shared.db");
    // A long presence TTL: what happens below is the epoch rule, not expiry.
    let dir = start_directory_with(&["--listen", "127.0.0.1:0", "--presence-ttl", "600"]);
    let a = node(&db, &dir, "node-a");
    let mut b = node(&db, &dir, "node-b");
    let client = DirectoryClient::new(&dir.url, CLUSTER_TOKEN).unwrap();
    let bob = b.connect("bob", "phone").await;
    let loc = client.lookup_user("bob").await.unwrap();
    assert_eq!(loc.devices.len(), 1);
    let old_epoch = loc.devices[0].node_epoch;

    // Node B dies without deregistering and comes back under the same id: a new epoch.
    b.child().kill().unwrap();
    b.child().wait().unwrap();
    drop(bob);
    let b = node(&db, &dir, "node-b");
    eventually("node-b re-registered", || async {
        client.list_nodes().await.is_ok_and(|n| {
            n.iter()
                .any(|n| n.node_id == "node-b" && n.epoch > old_epoch)
        })
    })
    .await;
    // bob's entry from the dead epoch is gone at once (the TTL is ten minutes).
    assert!(client.lookup_user("bob").await.unwrap().devices.is_empty());
    // A late write from the old epoch (a zombie of the dead process) is ignored.
    let zombie = PresenceUpdate {
        user: "bob".into(),
        device: "phone".into(),
        node_id: "node-b".into(),
        node_epoch: old_epoch,
        status: PresenceStatus::Online,
    };
    assert!(matches!(
        client.update_presence(&zombie).await.unwrap(),
        UpdateOutcome::Stale { current_epoch } if current_epoch > old_epoch
    ));
    assert!(client.lookup_user("bob").await.unwrap().devices.is_empty());
    // ...and so is re-registering with it.
    let stale = RegisterNodeRequest {
        node_id: "node-b".into(),
        internal_url: "http://127.0.0.1:9".into(),
        epoch: old_epoch,
        load: 0.0,
    };
    assert!(client.register_node(&stale).await.is_err());
    // An invite for bob now reaches nobody (no ghost delivery to the dead node)...
    let mut alice = a.connect("alice", "laptop").await;
    alice
        .send(json!({"type": "invite", "to": "bob", "offer": desc("127.0.0.1", 1)}))
        .await;
    assert_eq!(alice.recv_type("invite_sent").await["devices"], 0);
    alice.recv_type("call_ended").await;
    // ...until he reconnects to the restarted node.
    let mut bob = b.connect("bob", "phone").await;
    alice
        .send(json!({"type": "invite", "to": "bob", "offer": desc("127.0.0.1", 1)}))
        .await;
    assert_eq!(alice.recv_type("invite_sent").await["devices"], 1);
    bob.recv_type("incoming_call").await;
    assert_eq!(a.metric("forward_errors_total").await, 0);
}

/// A TCP proxy in front of a node's internal API that, on each of its first `lose`
/// connections, passes the request on and then closes without passing the answer back: the
/// node acted, the sender saw a failure. Later connections pass through untouched.
struct LossyProxy {
    addr: std::net::SocketAddr,
    upstream: std::sync::Arc<std::sync::Mutex<Option<std::net::SocketAddr>>>,
    lose: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    lost: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl LossyProxy {
    async fn start() -> LossyProxy {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let p = LossyProxy {
            addr: listener.local_addr().unwrap(),
            upstream: Default::default(),
            lose: Default::default(),
            lost: Default::default(),
        };
        let (upstream, lose, lost) = (p.upstream.clone(), p.lose.clone(), p.lost.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let Some(to) = *upstream.lock().unwrap() else {
                    continue;
                };
                let lossy = lose
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
                let lost = lost.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(to).await else {
                        return;
                    };
                    if !lossy {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        return;
                    }
                    // The whole request (it arrives in a burst), then wait for the answer to
                    // start, and drop it.
                    let mut buf = vec![0u8; 65536];
                    while let Ok(Ok(n)) =
                        tokio::time::timeout(Duration::from_millis(200), client.read(&mut buf))
                            .await
                    {
                        if n == 0 || server.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ =
                        tokio::time::timeout(Duration::from_secs(5), server.read(&mut buf)).await;
                    lost.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        p
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_whose_answer_is_lost_is_retried_and_reaches_the_callee_once() {
    use std::sync::atomic::Ordering;
    let d = tempfile::tempdir().unwrap();
    let db = d.path().join("shared.db");
    let dir = start_directory();
    let a = node(&db, &dir, "node-a");
    // Node B tells the fleet to reach it through the proxy.
    let proxy = LossyProxy::start().await;
    let mut args = common::base_args(&db);
    args.extend(["--internal-url".to_string(), proxy.url()]);
    let b = node_on_args(&db, args, &dir, "node-b");
    *proxy.upstream.lock().unwrap() = Some(b.http);

    let mut bob = b.connect("bob", "phone").await;
    let mut alice = a.connect("alice", "laptop").await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The answer to the first delivery of the invite to node B is lost.
    proxy.lose.store(1, Ordering::SeqCst);
    alice
        .send(json!({"type": "invite", "to": "bob", "offer": desc("127.0.0.1", 2)}))
        .await;
    let sent = alice.recv_type("invite_sent").await;
    let inc = bob.recv_type("incoming_call").await;
    assert_eq!(inc["call_id"], sent["call_id"]);
    assert_eq!(
        proxy.lost.load(Ordering::SeqCst),
        1,
        "the first answer was lost"
    );
    // Node A sent it again under the same id; node B delivered it once.
    let quiet = tokio::time::Instant::now() + Duration::from_millis(1500);
    while let Ok(Ok(v)) = tokio::time::timeout_at(quiet, bob.next()).await {
        assert_ne!(v["type"], "incoming_call", "delivered twice: {v}");
    }
    assert_eq!(a.metric("forward_errors_total").await, 0);
    // The call goes on normally.
    bob.send(json!({"type": "ringing", "call_id": sent["call_id"]}))
        .await;
    assert_eq!(alice.recv_type("ringing").await["device"], "phone");
}
