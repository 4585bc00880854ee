//! The `peerlink-sim` CLI's file sessions as separate processes against a local fleet:
//! `listen --save-dir DIR --sessions 2 --json` answers two `send-file --json` sessions (one
//! direct, then, after a restart of `listen` with `--relay-only`, both ends relay-only: the
//! relay-only policy only hides one side's own candidates) and prints one JSON line per session. The workspace must be built first.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use peerlink_api::signaling::{ClientMsg, PresenceStatus, ServerMsg};
use peerlink_api::signaling_client::{HttpApi, SignalSession};
use peerlink_sim::fleet::{Fleet, FleetOptions};
use rand::RngCore as _;

const TEST: Duration = Duration::from_secs(150);

/// Run `peerlink-sim --json ARGS` (killed if it outlives the bound); its stdout lines as JSON.
async fn cli(args: &[&str], state: &Path, server: &str) -> Vec<serde_json::Value> {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_peerlink-sim"))
        .args(["--json", "--server", server, "--state"])
        .arg(state)
        .args(args)
        .env("PEERLINK_PASSWORD", "cli-password-123")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run peerlink-sim");
    let out = tokio::time::timeout(Duration::from_secs(100), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("peerlink-sim {args:?} did not finish"))
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "peerlink-sim {args:?}: {}\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[tokio::test]
async fn cli_send_file_to_listen_with_two_sessions_direct_and_relay_only() {
    tokio::time::timeout(TEST, async {
        let fleet = Fleet::start(FleetOptions::default()).await.unwrap();
        let server = fleet.signaling_url.clone();
        let dir = tempfile::tempdir().unwrap();
        let (sa, sb) = (dir.path().join("a.json"), dir.path().join("b.json"));
        for (u, s) in [("hank", &sa), ("iris", &sb)] {
            cli(&["register", u], s, &server).await;
            cli(&["login", u], s, &server).await;
        }
        let src = dir.path().join("blob.bin");
        let mut data = vec![0u8; 300 * 1024];
        rand::rng().fill_bytes(&mut data);
        std::fs::write(&src, &data).unwrap();
        let save = dir.path().join("inbox");
        std::fs::create_dir(&save).unwrap();
        let stun = fleet.stun.unwrap().to_string();
        let listen = |sessions: &'static str, relay_only: bool| {
            let (sb, server, save, stun) = (sb.clone(), server.clone(), save.clone(), stun.clone());
            tokio::spawn(async move {
                let s = save.display().to_string();
                let mut args = vec![
                    "listen",
                    "--wait",
                    "60s",
                    "--sessions",
                    sessions,
                    "--save-dir",
                    &s,
                    "--stun",
                    &stun,
                ];
                if relay_only {
                    args.push("--relay-only");
                }
                cli(&args, &sb, &server).await
            })
        };
        let listen2 = listen("2", false);
        // The receiver must be online before each invite: watch its presence (explicit signal).
        let api = HttpApi::new(&server, Duration::from_secs(30)).unwrap();
        let t = api.login("hank", "cli-password-123").await.unwrap();
        let mut watch = SignalSession::connect(api, t, "watcher", None)
            .await
            .unwrap();
        watch
            .send(&ClientMsg::AddContact {
                username: "iris".into(),
            })
            .await
            .unwrap();
        let online = |m: &ServerMsg| match m {
            ServerMsg::Contacts { contacts } => contacts
                .iter()
                .any(|c| c.username == "iris" && c.status == PresenceStatus::Online),
            ServerMsg::Presence { user, status } => {
                user == "iris" && *status == PresenceStatus::Online
            }
            _ => false,
        };
        watch
            .wait_for(Duration::from_secs(60), "iris online", None, online)
            .await
            .unwrap();
        let s = src.display().to_string();
        let a1 = cli(&["send-file", "iris", &s, "--stun", &stun], &sa, &server).await;
        let a2 = cli(&["send-file", "iris", &s, "--stun", &stun], &sa, &server).await;
        let b = listen2.await.unwrap();
        // Relay-only on both ends, a third session in a new `listen`.
        let listen1 = listen("1", true);
        watch
            .wait_for(Duration::from_secs(60), "iris online again", None, online)
            .await
            .unwrap();
        let a3 = cli(
            &["send-file", "iris", &s, "--stun", &stun, "--relay-only"],
            &sa,
            &server,
        )
        .await;
        let b3 = listen1.await.unwrap();
        assert_eq!(
            (a1.len(), a2.len(), b.len(), a3.len(), b3.len()),
            (1, 1, 2, 1, 1),
            "{a1:?} {a2:?} {b:?} {a3:?} {b3:?}"
        );
        let want = blake3::hash(&data).to_hex().to_string();
        for (a, b, path) in [
            (&a1[0], &b[0], "direct"),
            (&a2[0], &b[1], "direct"),
            (&a3[0], &b3[0], "relay"),
        ] {
            assert_eq!(b["kind"], "file", "{b}");
            assert_eq!(a["call_id"], b["call_id"]);
            assert_eq!(a["role"], "sender");
            assert_eq!(b["role"], "receiver");
            assert_eq!(a["path"], path, "{a}");
            assert_eq!(b["path"], path, "{b}");
            assert_eq!(a["bytes"].as_u64(), Some(data.len() as u64), "{a}");
            assert_eq!(a["blake3"], want.as_str());
            assert_eq!(b["blake3"], want.as_str());
            assert_eq!(a["resumed"], false);
            assert!(a["throughput_bps"].as_f64().unwrap() > 0.0, "{a}");
            let saved = b["file"].as_str().unwrap();
            assert!(std::fs::read(saved).unwrap() == data, "{saved} differs");
        }
        // Same name twice: the second copy did not overwrite the first.
        assert_ne!(b[0]["file"], b[1]["file"]);
        fleet.stop().await;
    })
    .await
    .expect("test timed out");
}
