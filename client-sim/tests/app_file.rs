//! File sessions end to end through a local fleet: `send_file` invites with purpose `file`
//! and a transfer fingerprint, the callee accepts into its save dir, QUIC runs over the
//! session's selected path (direct, or relay-only through the TURN relay), the copy is
//! identical; without a save dir the session is declined. The workspace must be built first.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use peerlink_sim::call::{self, CallError, CallOptions, SessionReport};
use peerlink_sim::fleet::{Fleet, FleetOptions, relay_stats};
use rand::RngCore as _;

const TEST: Duration = Duration::from_secs(150);

mod common;
use common::two_users;

async fn one_mib(relay_only: bool, names: (&str, &str)) {
    let fleet = Fleet::start(FleetOptions::default()).await.unwrap();
    let (mut alice, mut bob) = two_users(&fleet, names.0, names.1).await;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("payload.bin");
    let save = dir.path().join("inbox");
    std::fs::create_dir(&save).unwrap();
    let mut data = vec![0u8; 1 << 20];
    rand::rng().fill_bytes(&mut data);
    std::fs::write(&src, &data).unwrap();
    let oa = CallOptions {
        stun: fleet.stun,
        relay_only,
        duration: Duration::from_secs(60),
        seed: 41,
        ..CallOptions::default()
    };
    let ob = CallOptions {
        save_dir: Some(save.clone()),
        seed: 42,
        ..oa.clone()
    };
    let (ra, rb) = tokio::join!(
        call::send_file(&mut alice, names.1, &src, &oa),
        call::answer_session(
            &mut bob,
            Duration::from_secs(30),
            Duration::from_secs(60),
            &ob
        )
    );
    let ra = ra.unwrap_or_else(|e| panic!("sender: {e}"));
    let SessionReport::File(rb) = rb.unwrap_or_else(|e| panic!("receiver: {e}")) else {
        panic!("not a file session")
    };
    eprintln!("{}", serde_json::to_string_pretty(&ra).unwrap());
    eprintln!("{}", serde_json::to_string_pretty(&rb).unwrap());
    let want_path = if relay_only { "relay" } else { "direct" };
    for r in [&ra, &rb] {
        assert_eq!(r.path.as_deref(), Some(want_path), "{r:?}");
        assert_eq!(r.size, 1 << 20);
        assert_eq!(r.bytes, 1 << 20);
        assert!(!r.resumed);
        assert_eq!(r.blake3, blake3::hash(&data).to_hex().to_string());
    }
    assert_eq!(ra.role, "sender");
    assert_eq!(rb.role, "receiver");
    assert_eq!(ra.end, "hangup", "{ra:?}");
    // The saved file is the sent file, under the offered name, in the save dir.
    assert_eq!(std::path::Path::new(&rb.file), save.join("payload.bin"));
    assert!(std::fs::read(&rb.file).unwrap() == data, "file differs");
    if relay_only {
        // The relay carried the session: at least the file's bytes crossed it. Workers report
        // their counters once a second, so poll for a few seconds.
        let mut fwd = 0;
        let mut last = None;
        for _ in 0..40 {
            let st = relay_stats(fleet.relay.unwrap().metrics, Duration::from_secs(10))
                .await
                .unwrap();
            fwd = st
                .counters
                .iter()
                .filter(|(k, _)| k.starts_with("forwarded_bytes_"))
                .map(|(_, v)| *v)
                .sum::<u64>();
            last = Some(st);
            if fwd >= 1 << 20 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert!(fwd >= 1 << 20, "the relay forwarded {fwd} bytes: {last:?}");
    }
    fleet.stop().await;
}

#[tokio::test]
async fn one_mib_file_over_the_direct_path_arrives_identical() {
    tokio::time::timeout(TEST, one_mib(false, ("xena", "yuri")))
        .await
        .expect("test timed out");
}

#[tokio::test]
async fn one_mib_file_relay_only_arrives_identical() {
    tokio::time::timeout(TEST, one_mib(true, ("zack", "abby")))
        .await
        .expect("test timed out");
}

#[tokio::test]
async fn file_session_without_save_dir_is_declined() {
    tokio::time::timeout(TEST, async {
        let fleet = Fleet::start(FleetOptions::default()).await.unwrap();
        let (mut alice, mut bob) = two_users(&fleet, "carl", "dora").await;
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("x.bin");
        std::fs::write(&src, b"hello").unwrap();
        let opts = CallOptions {
            stun: fleet.stun,
            ..CallOptions::default()
        };
        let (ra, rb) = tokio::join!(
            call::send_file(&mut alice, "dora", &src, &opts),
            call::answer_session(
                &mut bob,
                Duration::from_secs(30),
                Duration::from_secs(30),
                &opts
            )
        );
        assert!(
            matches!(ra, Err(CallError::Ended(_))),
            "sender should see the decline: {ra:?}"
        );
        let SessionReport::Declined(d) = rb.unwrap() else {
            panic!("not declined")
        };
        assert!(d.reason.contains("x.bin"), "{d:?}");
        fleet.stop().await;
    })
    .await
    .expect("test timed out");
}
