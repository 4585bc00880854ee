//! ICE restart and session purpose through the real binary (one node): `ice_restart` is
//! forwarded both ways in an accepted call and refused while ringing, from non-parties, from a
//! callee device that did not answer, and with a bad description; `purpose` and
//! `transfer_fingerprint` travel unchanged through invite and accept.
// Test helpers outside #[test] fns: a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Node, Ws, desc};
use serde_json::{Value, json};

fn db() -> (tempfile::TempDir, std::path::PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("sig.db");
    (d, p)
}

/// A description for a restart: new ICE credentials, `n` public candidates, same key.
fn restarted(n: usize, ufrag: &str) -> Value {
    let mut d = desc("203.0.113.7", n);
    d["ice_ufrag"] = json!(ufrag);
    d["ice_pwd"] = json!(format!("{ufrag}restartedpassword0123"));
    d
}

/// The next frame must be the answer to a `list_contacts`: nothing else was queued.
async fn nothing_pending(ws: &mut Ws) {
    ws.send(json!({"type": "list_contacts"})).await;
    ws.recv_type("contacts").await;
}

async fn error_code(ws: &mut Ws, frame: Value) -> String {
    ws.send(frame).await;
    let e = ws.recv_type("error").await;
    e["code"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ice_restart_forwarded_both_ways_and_refused_otherwise() {
    let (_d, p) = db();
    // Default candidate policy: restarts carrying addresses no peer can have are refused. The
    // rate limit is raised: this test sends many frames in a burst.
    let node = Node::start(&p, &["--msg-rate", "1000", "--msg-burst", "1000"]);
    let mut phone = node.connect("bob", "phone").await;
    let mut desk = node.connect("bob", "desk").await;
    let mut eve = node.connect("eve", "e1").await;
    let mut alice = node.connect("alice", "laptop").await;

    alice
        .send(json!({"type": "invite", "to": "bob", "offer": desc("203.0.113.7", 1)}))
        .await;
    let id = alice.recv_type("invite_sent").await["call_id"].clone();
    phone.recv_type("incoming_call").await;
    desk.recv_type("incoming_call").await;

    // While ringing, neither side may restart.
    let restart = |d: Value| json!({"type": "ice_restart", "call_id": id, "desc": d});
    assert_eq!(
        error_code(&mut alice, restart(restarted(1, "car1"))).await,
        "not_allowed"
    );
    assert_eq!(
        error_code(&mut phone, restart(restarted(1, "cal1"))).await,
        "not_allowed"
    );

    let answer = desc("203.0.113.9", 1);
    phone
        .send(json!({"type": "accept", "call_id": id, "answer": answer}))
        .await;
    alice.recv_type("call_accepted").await;
    desk.recv_type("answered_elsewhere").await;

    // Caller -> answering callee.
    let d = restarted(2, "car2");
    alice.send(restart(d.clone())).await;
    let r = phone.recv_type("ice_restart").await;
    assert_eq!((r["call_id"].clone(), r["desc"].clone()), (id.clone(), d));
    // Callee -> caller (the callee keeps the key of its answer).
    let mut d = restarted(3, "cal2");
    d["public_key"] = answer["public_key"].clone();
    phone.send(restart(d.clone())).await;
    let r = alice.recv_type("ice_restart").await;
    assert_eq!((r["call_id"].clone(), r["desc"].clone()), (id.clone(), d));

    // The callee's other device and a stranger may not.
    assert_eq!(
        error_code(&mut desk, restart(restarted(1, "desk"))).await,
        "not_allowed"
    );
    assert_eq!(
        error_code(&mut eve, restart(restarted(1, "evee"))).await,
        "not_allowed"
    );
    // An unknown call.
    assert_eq!(
        error_code(
            &mut alice,
            json!({"type": "ice_restart", "call_id": "0".repeat(32), "desc": restarted(1, "nope")})
        )
        .await,
        "no_such_call"
    );

    // Bad descriptions.
    let mut bad: Vec<(&str, Value, &str)> = Vec::new();
    let mut d = restarted(1, "bad1");
    d["candidates"][0]["address"] = json!("224.0.0.1");
    bad.push(("multicast candidate", d, "forbidden_candidate"));
    let mut d = restarted(1, "bad2");
    d["candidates"][0]["address"] = json!("::ffff:0.0.0.0");
    bad.push(("mapped unspecified candidate", d, "forbidden_candidate"));
    bad.push((
        "33 candidates",
        restarted(33, "bad3"),
        "too_many_candidates",
    ));
    bad.push((
        "300 candidates",
        restarted(300, "bad4"),
        "too_many_candidates",
    ));
    for fp in [
        String::new(),
        "AB".repeat(32),
        "ab".repeat(31) + "a",
        "ab".repeat(33),
        "zz".repeat(32),
    ] {
        let mut d = restarted(1, "bad5");
        d["transfer_fingerprint"] = json!(fp);
        bad.push(("bad fingerprint", d, "invalid"));
    }
    for name in ["", "a/b", "../x", "..", ".", "a\\b", "x\ny", "nul\0"] {
        let mut d = restarted(1, "bad6");
        d["purpose"] = json!({"kind": "file", "name": name, "size": 1});
        bad.push(("bad file name", d, "invalid"));
    }
    let mut d = restarted(1, "bad7");
    d["purpose"] = json!({"kind": "file", "name": "x".repeat(256), "size": 1});
    bad.push(("256-byte file name", d, "invalid"));
    let mut d = restarted(1, "bad8");
    d["public_key"] = json!("ICEhISEhISEhISEhISEhISEhISEhISEhISEhISEhISE=");
    bad.push(("another public key", d, "invalid"));
    let mut d = restarted(1, "bad9");
    d["ice_ufrag"] = json!("");
    bad.push(("empty ufrag", d, "invalid"));
    let mut d = restarted(1, "bada");
    d["ice_pwd"] = json!("short");
    bad.push(("short pwd", d, "invalid"));
    for (what, d, code) in bad {
        assert_eq!(error_code(&mut alice, restart(d)).await, code, "{what}");
    }
    // A restart without a desc, or with a malformed one, is an invalid frame.
    alice
        .send(json!({"type": "ice_restart", "call_id": id}))
        .await;
    assert_eq!(alice.recv_type("error").await["code"], "invalid");

    // A restart starts a new candidate generation: 32 in the restart, then none trickled.
    alice.send(restart(restarted(32, "gen3"))).await;
    assert_eq!(
        phone.recv_type("ice_restart").await["desc"]["ice_ufrag"],
        "gen3"
    );
    let cand = json!({"foundation": "t", "component": 1, "transport": "udp", "priority": 1,
                      "address": "203.0.113.7", "port": 9, "type": "srflx"});
    assert_eq!(
        error_code(
            &mut alice,
            json!({"type": "candidate", "call_id": id, "candidate": cand})
        )
        .await,
        "too_many_candidates"
    );
    // ...and a smaller restart makes room again.
    alice.send(restart(restarted(1, "gen4"))).await;
    assert_eq!(
        phone.recv_type("ice_restart").await["desc"]["ice_ufrag"],
        "gen4"
    );
    alice
        .send(json!({"type": "candidate", "call_id": id, "candidate": cand}))
        .await;
    assert_eq!(phone.recv_type("candidate").await["candidate"], cand);

    // None of the refused frames reached anyone.
    nothing_pending(&mut phone).await;
    nothing_pending(&mut desk).await;
    nothing_pending(&mut eve).await;
    nothing_pending(&mut alice).await;

    phone.send(json!({"type": "hangup", "call_id": id})).await;
    assert_eq!(alice.recv_type("call_ended").await["reason"], "hangup");
    // After the call, a restart is refused, and nothing of the call is left.
    assert_eq!(
        error_code(&mut alice, restart(restarted(1, "late"))).await,
        "no_such_call"
    );
    assert_eq!(node.metric("calls_open").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purpose_and_fingerprint_round_trip_through_invite_and_accept() {
    let (_d, p) = db();
    let node = Node::start(&p, &[]);
    let mut bob = node.connect("bob", "phone").await;
    let mut alice = node.connect("alice", "laptop").await;

    // A bad purpose or fingerprint in the invite is refused before bob hears anything.
    let mut offer = desc("203.0.113.7", 1);
    offer["purpose"] = json!({"kind": "file", "name": "../etc/passwd", "size": 10});
    assert_eq!(
        error_code(
            &mut alice,
            json!({"type": "invite", "to": "bob", "req": "r0", "offer": offer})
        )
        .await,
        "invalid"
    );
    let mut offer = desc("203.0.113.7", 1);
    offer["transfer_fingerprint"] = json!("0".repeat(63));
    assert_eq!(
        error_code(
            &mut alice,
            json!({"type": "invite", "to": "bob", "offer": offer})
        )
        .await,
        "invalid"
    );
    nothing_pending(&mut bob).await;

    // A file offer with a fingerprint reaches bob unchanged.
    let mut offer = desc("203.0.113.7", 1);
    offer["purpose"] = json!({"kind": "file", "name": "holiday photo.jpg", "size": 123_456_789u64});
    offer["transfer_fingerprint"] = json!("0123456789abcdef".repeat(4));
    alice
        .send(json!({"type": "invite", "to": "bob", "offer": offer}))
        .await;
    let id = alice.recv_type("invite_sent").await["call_id"].clone();
    let inc = bob.recv_type("incoming_call").await;
    assert_eq!(inc["offer"], offer);

    // A bad fingerprint in the answer is refused; a good one reaches alice unchanged.
    let mut answer = desc("203.0.113.9", 1);
    answer["transfer_fingerprint"] = json!("F".repeat(64));
    assert_eq!(
        error_code(
            &mut bob,
            json!({"type": "accept", "call_id": id, "answer": answer})
        )
        .await,
        "invalid"
    );
    answer["transfer_fingerprint"] = json!("fedcba9876543210".repeat(4));
    bob.send(json!({"type": "accept", "call_id": id, "answer": answer}))
        .await;
    let acc = alice.recv_type("call_accepted").await;
    assert_eq!(acc["answer"], answer);
    // A restart of a file session keeps its purpose and fingerprint on the wire.
    let mut d = restarted(1, "file2");
    d["purpose"] = offer["purpose"].clone();
    d["transfer_fingerprint"] = offer["transfer_fingerprint"].clone();
    alice
        .send(json!({"type": "ice_restart", "call_id": id, "desc": d}))
        .await;
    assert_eq!(bob.recv_type("ice_restart").await["desc"], d);
    alice.send(json!({"type": "hangup", "call_id": id})).await;
    bob.recv_type("call_ended").await;

    // A plain call: an explicit `{"kind": "call"}` is accepted and, being the default, is
    // left out of what the callee gets (old clients see the shape they know).
    let mut offer = desc("203.0.113.7", 1);
    offer["purpose"] = json!({"kind": "call"});
    alice
        .send(json!({"type": "invite", "to": "bob", "offer": offer}))
        .await;
    alice.recv_type("invite_sent").await;
    let inc = bob.recv_type("incoming_call").await;
    let got = inc["offer"].as_object().unwrap();
    assert!(!got.contains_key("purpose"), "{inc}");
    assert!(!got.contains_key("transfer_fingerprint"), "{inc}");
    assert_eq!(inc["offer"], desc("203.0.113.7", 1));
}
