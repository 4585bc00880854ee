//! Calls through the real binary: invite/ringing/accept/hangup with candidate exchange, two
//! callee devices, decline, cancel, ring timeout, and validation (forged from, candidates).
// Test helpers outside #[test] fns: a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Node, desc};
use serde_json::{Value, json};

fn db() -> (tempfile::TempDir, std::path::PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("sig.db");
    (d, p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invite_ring_accept_trickle_hangup() {
    let (_d, p) = db();
    let node = Node::start(&p, &[]);
    let mut bob = node.connect("bob", "phone").await;
    let mut alice = node.connect("alice", "laptop").await;

    let offer = desc("127.0.0.1", 2);
    alice
        .send(json!({"type": "invite", "to": "bob", "req": "r1", "offer": offer}))
        .await;
    let sent = alice.recv_type("invite_sent").await;
    assert_eq!(sent["req"], "r1");
    assert_eq!(sent["devices"], 1);
    let call_id = sent["call_id"].as_str().unwrap().to_owned();
    assert_eq!(call_id.len(), 32);

    let inc = bob.recv_type("incoming_call").await;
    assert_eq!(inc["call_id"], call_id.as_str());
    assert_eq!(inc["from"], "alice");
    assert_eq!(inc["from_device"], "laptop");
    assert_eq!(inc["offer"], offer);

    bob.send(json!({"type": "ringing", "call_id": call_id}))
        .await;
    let r = alice.recv_type("ringing").await;
    assert_eq!(r["device"], "phone");

    let answer = desc("127.0.0.1", 3);
    bob.send(json!({"type": "accept", "call_id": call_id, "answer": answer}))
        .await;
    let acc = alice.recv_type("call_accepted").await;
    assert_eq!(acc["device"], "phone");
    assert_eq!(acc["answer"], answer);

    let cand = json!({"foundation": "s1", "component": 1, "transport": "udp", "priority": 1694498815u32,
                      "address": "127.0.0.1", "port": 50000, "type": "srflx",
                      "related_address": "127.0.0.1", "related_port": 40000});
    alice
        .send(json!({"type": "candidate", "call_id": call_id, "candidate": cand}))
        .await;
    let c = bob.recv_type("candidate").await;
    assert_eq!(c["candidate"], cand);
    bob.send(json!({"type": "end_of_candidates", "call_id": call_id}))
        .await;
    alice.recv_type("end_of_candidates").await;

    alice
        .send(json!({"type": "hangup", "call_id": call_id}))
        .await;
    let e = bob.recv_type("call_ended").await;
    assert_eq!(e["reason"], "hangup");
    // The call is gone.
    bob.send(json!({"type": "hangup", "call_id": call_id}))
        .await;
    assert_eq!(bob.recv_type("error").await["code"], "no_such_call");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_devices_one_answers_other_hears_answered_elsewhere() {
    let (_d, p) = db();
    let node = Node::start(&p, &[]);
    let mut phone = node.connect("bob", "phone").await;
    let mut desk = node.connect("bob", "desk").await;
    let mut alice = node.connect("alice", "a1").await;
    alice
        .send(json!({"type": "invite", "to": "bob", "offer": desc("127.0.0.1", 1)}))
        .await;
    let sent = alice.recv_type("invite_sent").await;
    assert_eq!(sent["devices"], 2);
    let id = sent["call_id"].clone();
    assert_eq!(phone.recv_type("incoming_call").await["call_id"], id);
    assert_eq!(desk.recv_type("incoming_call").await["call_id"], id);
    phone.send(json!({"type": "ringing", "call_id": id})).await;
    desk.send(json!({"type": "ringing", "call_id": id})).await;
    alice.recv_type("ringing").await;
    alice.recv_type("ringing").await;
    desk.send(json!({"type": "accept", "call_id": id, "answer": desc("127.0.0.1", 1)}))
        .await;
    assert_eq!(alice.recv_type("call_accepted").await["device"], "desk");
    assert_eq!(phone.recv_type("answered_elsewhere").await["call_id"], id);
    // A late accept from the phone loses.
    phone
        .send(json!({"type": "accept", "call_id": id, "answer": desc("127.0.0.1", 1)}))
        .await;
    assert_eq!(phone.recv_type("error").await["code"], "no_such_call");
    // The answering device hangs up; alice hears it.
    desk.send(json!({"type": "hangup", "call_id": id})).await;
    assert_eq!(alice.recv_type("call_ended").await["reason"], "hangup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decline_cancel_and_ring_timeout() {
    let (_d, p) = db();
    let node = Node::start(&p, &["--ring-timeout", "3s"]);
    let mut bob = node.connect("bob", "phone").await;
    let mut alice = node.connect("alice", "a1").await;

    // Decline.
    alice
        .send(json!({"type": "invite", "to": "bob", "offer": desc("127.0.0.1", 1)}))
        .await;
    let id = alice.recv_type("invite_sent").await["call_id"].clone();
    bob.recv_type("incoming_call").await;
    bob.send(json!({"type": "decline", "call_id": id})).await;
    let e = alice.recv_type("call_ended").await;
    assert_eq!(
        (e["call_id"].clone(), e["reason"].clone()),
        (id, json!("declined"))
    );

    // Cancel.
    alice
        .send(json!({"type": "invite", "to": "bob", "offer": desc("127.0.0.1", 1)}))
        .await;
    let id = alice.recv_type("invite_sent").await["call_id"].clone();
    bob.recv_type("incoming_call").await;
    alice.send(json!({"type": "cancel", "call_id": id})).await;
    let e = bob.recv_type("call_ended").await;
    assert_eq!(
        (e["call_id"].clone(), e["reason"].clone()),
        (id, json!("cancelled"))
    );

    // Ring timeout: nobody answers within 3 s; both sides are told.
    alice
        .send(json!({"type": "invite", "to": "bob", "offer": desc("127.0.0.1", 1)}))
        .await;
    let id = alice.recv_type("invite_sent").await["call_id"].clone();
    bob.recv_type("incoming_call").await;
    let e = alice.recv_type("call_ended").await;
    assert_eq!(
        (e["call_id"].clone(), e["reason"].clone()),
        (id.clone(), json!("timeout"))
    );
    assert_eq!(bob.recv_type("call_ended").await["reason"], "timeout");
    bob.send(json!({"type": "accept", "call_id": id, "answer": desc("127.0.0.1", 1)}))
        .await;
    assert_eq!(bob.recv_type("error").await["code"], "no_such_call");

    // Offline callee: unavailable at once.
    alice
        .send(json!({"type": "invite", "to": "carol", "offer": desc("127.0.0.1", 1)}))
        .await;
    assert_eq!(alice.recv_type("error").await["code"], "no_such_user");
    node.token("carol").await;
    alice
        .send(json!({"type": "invite", "to": "carol", "offer": desc("127.0.0.1", 1)}))
        .await;
    assert_eq!(alice.recv_type("invite_sent").await["devices"], 0);
    assert_eq!(alice.recv_type("call_ended").await["reason"], "unavailable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_from_and_hostile_candidates_rejected() {
    let (_d, p) = db();
    // The default candidate policy.
    let node = Node::start(&p, &[]);
    let mut bob = node.connect("bob", "phone").await;
    let mut alice = node.connect("alice", "a1").await;
    alice.send(json!({"type": "invite", "to": "bob", "from": "mallory", "offer": desc("203.0.113.7", 1)})).await;
    assert_eq!(alice.recv_type("error").await["code"], "forged_from");
    alice.send(json!({"type": "send_message", "id": "m1", "to": "bob", "from": "mallory", "body": "hi"})).await;
    assert_eq!(alice.recv_type("error").await["code"], "forged_from");
    for ip in [
        "0.0.0.0",
        "224.0.0.1",
        "255.255.255.255",
        "240.0.0.1",
        "::",
        "ff02::1",
        "::ffff:224.0.0.251",
    ] {
        alice
            .send(json!({"type": "invite", "to": "bob", "offer": desc(ip, 1)}))
            .await;
        let e = alice.recv_type("error").await;
        assert_eq!(e["code"], "forbidden_candidate", "{ip}: {e}");
        assert!(
            e["message"]
                .as_str()
                .unwrap()
                .contains("never a peer address"),
            "{ip}: {e}"
        );
    }
    alice
        .send(json!({"type": "invite", "to": "bob", "offer": desc("203.0.113.7", 33)}))
        .await;
    assert_eq!(
        alice.recv_type("error").await["code"],
        "too_many_candidates"
    );
    let mut bad_key = desc("203.0.113.7", 1);
    bad_key["public_key"] = json!("c2hvcnQ=");
    alice
        .send(json!({"type": "invite", "to": "bob", "offer": bad_key}))
        .await;
    assert_eq!(alice.recv_type("error").await["code"], "invalid");
    // A public candidate passes; nothing of the rejected invites reached bob.
    alice.send(json!({"type": "invite", "to": "bob", "from": "alice", "offer": desc("203.0.113.7", 1)})).await;
    let id = alice.recv_type("invite_sent").await["call_id"].clone();
    assert_eq!(bob.recv_type("incoming_call").await["call_id"], id);
    // Only a party may act on the call; a multicast trickled candidate is refused.
    let mut eve = node.connect("eve", "e1").await;
    eve.send(json!({"type": "cancel", "call_id": id})).await;
    assert_eq!(eve.recv_type("error").await["code"], "not_allowed");
    let cand = json!({"foundation": "x", "component": 1, "transport": "udp", "priority": 1,
                      "address": "239.255.255.250", "port": 9, "type": "host"});
    alice
        .send(json!({"type": "candidate", "call_id": id, "candidate": cand}))
        .await;
    assert_eq!(
        alice.recv_type("error").await["code"],
        "forbidden_candidate"
    );
}

/// An offer whose candidates are host candidates at `ips` (one each).
fn host_offer(ips: &[&str]) -> Value {
    let mut d = desc("203.0.113.7", ips.len());
    for (c, ip) in d["candidates"].as_array_mut().unwrap().iter_mut().zip(ips) {
        c["address"] = json!(ip);
        c["type"] = json!("host");
    }
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_candidates_behind_nats_are_forwarded_by_default() {
    let (_d, p) = db();
    let node = Node::start(&p, &[]);
    let mut bob = node.connect("bob", "phone").await;
    let mut alice = node.connect("alice", "a1").await;
    // What clients behind NATs and on LANs have: RFC 1918, shared (CGNAT), link-local,
    // unique-local and link-local v6; loopback too, since this node listens on loopback.
    let ips = [
        "10.0.0.1",
        "172.20.1.2",
        "192.168.1.20",
        "100.66.1.2",
        "169.254.10.20",
        "fd12:3456::1",
        "fe80::1",
        "::ffff:192.168.1.21",
        "127.0.0.1",
    ];
    let offer = host_offer(&ips);
    alice
        .send(json!({"type": "invite", "to": "bob", "offer": offer}))
        .await;
    let id = alice.recv_type("invite_sent").await["call_id"].clone();
    let inc = bob.recv_type("incoming_call").await;
    assert_eq!(inc["call_id"], id);
    assert_eq!(inc["offer"]["candidates"], offer["candidates"]);
    // Trickled and answered host candidates pass the same way.
    let cand = json!({"foundation": "t1", "component": 1, "transport": "udp", "priority": 1,
                      "address": "100.64.7.8", "port": 9, "type": "host"});
    alice
        .send(json!({"type": "candidate", "call_id": id, "candidate": cand}))
        .await;
    assert_eq!(bob.recv_type("candidate").await["candidate"], cand);
    let answer = host_offer(&["192.168.1.30", "fd00::30"]);
    bob.send(json!({"type": "accept", "call_id": id, "answer": answer}))
        .await;
    let acc = alice.recv_type("call_accepted").await;
    assert_eq!(acc["answer"]["candidates"], answer["candidates"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_ranges_and_loopback_off_a_loopback_node_are_refused() {
    let (_d, p) = db();
    // Listening on every address (not loopback only): loopback candidates are refused, and
    // the operator's ranges too.
    let mut args = common::base_args(&p);
    let at = args.iter().position(|a| a == "--listen").unwrap();
    args[at + 1] = "0.0.0.0:0".into();
    args.extend(
        [
            "--deny-candidate",
            "192.168.0.0/16",
            "--deny-candidate",
            "fd00::/8",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    let node = Node::start_raw(&p, &args);
    let mut bob = node.connect("bob", "phone").await;
    let mut alice = node.connect("alice", "a1").await;
    for (ip, why) in [
        ("127.0.0.1", "is loopback"),
        ("::1", "is loopback"),
        ("::ffff:127.0.0.1", "is loopback"),
        ("192.168.1.20", "192.168.0.0/16"),
        ("::ffff:192.168.1.20", "192.168.0.0/16"),
        ("fd12::1", "fd00::/8"),
    ] {
        alice
            .send(json!({"type": "invite", "to": "bob", "offer": host_offer(&[ip])}))
            .await;
        let e = alice.recv_type("error").await;
        assert_eq!(e["code"], "forbidden_candidate", "{ip}: {e}");
        assert!(e["message"].as_str().unwrap().contains(why), "{ip}: {e}");
    }
    // Other private ranges still pass.
    alice
        .send(json!({"type": "invite", "to": "bob", "offer": host_offer(&["10.1.2.3", "fc00::1"])}))
        .await;
    let id = alice.recv_type("invite_sent").await["call_id"].clone();
    assert_eq!(bob.recv_type("incoming_call").await["call_id"], id);

    // A loopback node refuses loopback too when told so.
    let (_d2, p2) = db();
    let strict = Node::start(&p2, &["--allow-loopback-candidates", "false"]);
    let mut carol = strict.connect("carol", "c1").await;
    strict.token("dave").await;
    carol
        .send(json!({"type": "invite", "to": "dave", "offer": host_offer(&["127.0.0.1"])}))
        .await;
    assert_eq!(
        carol.recv_type("error").await["code"],
        "forbidden_candidate"
    );
}
