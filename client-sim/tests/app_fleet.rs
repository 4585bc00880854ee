//! The local fleet and the demo end to end (real directory, relay and signaling binaries as
//! children), and the `peerlink-sim` CLI against a fleet. The workspace must be built first.
#![allow(clippy::unwrap_used)]

use std::process::Stdio;
use std::time::Duration;

use peerlink_api::signaling_client::{HttpApi, SignalSession};
use peerlink_sim::demo::{self, DemoOptions};
use peerlink_sim::fleet::{Fleet, FleetOptions, relay_stats};

/// Bound on a whole test (the machine is small and shared).
const TEST: Duration = Duration::from_secs(120);

#[tokio::test]
async fn demo_runs_end_to_end_on_a_local_fleet() {
    let out = tempfile::tempdir().unwrap();
    let opts = DemoOptions {
        out_dir: out.path().to_path_buf(),
        media_seconds: 2.0,
        ..DemoOptions::default()
    };
    let r = tokio::time::timeout(TEST, demo::run(opts, false))
        .await
        .expect("demo timed out")
        .unwrap_or_else(|e| panic!("demo failed: {e}"));
    let names: Vec<&str> = r.steps.iter().map(|s| s.step.as_str()).collect();
    for want in [
        "start local fleet",
        "register",
        "login",
        "WebSocket sessions",
        "presence",
        "chat (live)",
        "chat (offline + resume)",
        "call alice -> bob",
        "call alice -> bob (relay-only)",
        "TURN credentials",
        "TURN allocations",
        "permissions + channels",
        "media through relay",
        "deallocate",
        "relay /stats",
    ] {
        assert!(names.contains(&want), "missing step {want}: {names:?}");
    }
    let (ca, cb) = (r.call.as_ref().unwrap(), r.call_callee.as_ref().unwrap());
    assert_eq!(ca.call_id, cb.call_id);
    assert_eq!(ca.path.as_deref(), Some("direct"), "{ca:?}");
    for c in [ca, cb] {
        assert!(c.media.packets_received >= 80, "{c:?}");
        assert!(c.recording.is_some());
    }
    let [ra, rb] = r.call_relay_only.as_ref().unwrap();
    assert_eq!(ra.path.as_deref(), Some("relay"), "{ra:?}");
    assert_eq!(rb.path.as_deref(), Some("relay"), "{rb:?}");
    assert!(ra.media.packets_received >= 50 && rb.media.packets_received >= 50);
    assert_eq!(r.allocations.len(), 2);
    assert_ne!(r.allocations[0].relayed, r.allocations[1].relayed);
    let m = r.media.as_ref().expect("media report");
    for d in [&m.alice_to_bob, &m.bob_to_alice] {
        assert!(d.packets_sent >= 90, "{d:?}");
        // Loopback through one relay: at most a few packets may be lost on a loaded machine.
        assert!(d.packets_received * 10 >= d.packets_sent * 9, "{d:?}");
        assert!(d.mos > 1.0 && d.mos <= 5.0, "{d:?}");
        assert!(d.rtt_ms.is_some(), "{d:?}");
        let wav = peerlink_sim::media::audio::read_wav(std::path::Path::new(&d.recording)).unwrap();
        // At least 1.5 s of the 2 s sent were played out.
        assert!(wav.len() >= 48_000 * 3 / 2, "{} samples", wav.len());
    }
    let st = r.relay_stats.as_ref().expect("relay stats");
    assert!(st.latency_total_us.count > 0, "{st:?}");
    assert!(
        st.counters.get("allocations_created").copied().unwrap_or(0) >= 2,
        "{st:?}"
    );
    // The file session: 1 MiB alice -> bob, identical (the demo checks the bytes), verified.
    let [fs, fr] = r.file.as_ref().expect("file session report");
    assert_eq!((fs.role.as_str(), fr.role.as_str()), ("sender", "receiver"));
    assert_eq!((fs.size, fr.bytes), (1 << 20, 1 << 20));
    assert_eq!(fs.blake3, fr.blake3);
    assert!(!r.not_done.iter().any(|n| n.contains("file transfer")));
    let text = demo::render(&r);
    assert!(text.contains("file session"), "{text}");
    assert!(text.contains("media through the TURN relay"), "{text}");
    // Report is serialisable as one JSON object.
    let v = serde_json::to_value(&r).unwrap();
    assert!(v["steps"].is_array());
}

/// Run `peerlink-sim --json ARGS` (killed if it outlives the bound) and parse its one JSON object.
async fn cli(args: &[&str], state: &std::path::Path, server: &str) -> serde_json::Value {
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
    let out = tokio::time::timeout(Duration::from_secs(90), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("peerlink-sim {args:?} did not finish"))
        .unwrap();
    assert!(
        out.status.success(),
        "peerlink-sim {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not one JSON object ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[tokio::test]
async fn cli_register_login_chat_inbox_turn_check_call_listen() {
    tokio::time::timeout(TEST, async {
        let fleet = Fleet::start(FleetOptions::default()).await.unwrap();
        let server = fleet.signaling_url.clone();
        let dir = tempfile::tempdir().unwrap();
        let (sa, sb) = (dir.path().join("a.json"), dir.path().join("b.json"));
        cli(&["register", "frank"], &sa, &server).await;
        cli(&["register", "grace"], &sb, &server).await;
        let v = cli(&["login", "frank"], &sa, &server).await;
        assert_eq!(v["logged_in"], "frank");
        cli(&["login", "grace"], &sb, &server).await;
        let v = cli(&["chat", "grace", "hi grace"], &sa, &server).await;
        assert!(v["stored_at_ms"].as_u64().unwrap() > 0, "{v}");
        let v = cli(&["inbox", "--wait", "1s"], &sb, &server).await;
        let msgs = v["messages"].as_array().unwrap();
        assert_eq!(msgs.len(), 1, "{v}");
        assert_eq!(msgs[0]["body"], "hi grace");
        assert_eq!(msgs[0]["from"], "frank");
        // Acked and remembered: a second inbox shows nothing new.
        let v = cli(&["inbox", "--wait", "1s"], &sb, &server).await;
        assert_eq!(v["messages"].as_array().unwrap().len(), 0, "{v}");
        // A real allocation on the fleet's relay.
        let v = cli(&["turn-check"], &sa, &server).await;
        let relay = fleet.relay.unwrap();
        assert_eq!(v["relay"], relay.turn.to_string());
        assert!(
            v["allocation"]["relayed"]
                .as_str()
                .unwrap()
                .starts_with("127.0.0.1:")
        );
        // The relay merges its metrics once a second: poll, bounded.
        let mut created = 0;
        for _ in 0..40 {
            let st = relay_stats(relay.metrics, Duration::from_secs(10))
                .await
                .unwrap();
            created = st.counters.get("allocations_created").copied().unwrap_or(0);
            if created >= 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert!(created >= 1, "the relay never counted the allocation");

        // call / listen between the two CLI users, as two processes.
        let wav = dir.path().join("heard.wav");
        let stun = fleet.stun.unwrap().to_string();
        let listen = {
            let (sb, server, wav, stun) = (sb.clone(), server.clone(), wav.clone(), stun.clone());
            tokio::spawn(async move {
                let w = wav.display().to_string();
                let args = ["listen", "--wait", "60s", "--record", &w, "--stun", &stun];
                cli(&args, &sb, &server).await
            })
        };
        // The callee must be connected before the invite: watch grace's presence as frank
        // from a separate session (explicit signal, no retry loop).
        let api = HttpApi::new(&server, Duration::from_secs(30)).unwrap();
        let t = api.login("frank", "cli-password-123").await.unwrap();
        let mut watch = SignalSession::connect(api, t, "watcher", None)
            .await
            .unwrap();
        watch
            .wait_until_online("grace", Duration::from_secs(60))
            .await
            .unwrap();
        let a = cli(
            &["call", "grace", "--duration", "2s", "--stun", &stun],
            &sa,
            &server,
        )
        .await;
        let b = listen.await.unwrap();
        assert_eq!(a["call_id"], b["call_id"]);
        assert_eq!(a["path"], "direct", "{a}");
        assert_eq!(b["role"], "callee");
        assert!(
            b["media"]["packets_received"].as_u64().unwrap() >= 50,
            "{b}"
        );
        assert!(wav.is_file());
        watch.close().await;
        fleet.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn cli_with_several_server_urls_uses_the_first_that_answers() {
    tokio::time::timeout(TEST, async {
        let fleet = Fleet::start(FleetOptions::default()).await.unwrap();
        // A node that is down: a loopback port nothing listens on (connection refused).
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let servers = format!("http://{dead},{}", fleet.signaling_url);
        let dir = tempfile::tempdir().unwrap();
        let (sa, sb) = (dir.path().join("a.json"), dir.path().join("b.json"));
        for (user, state) in [("heidi", &sa), ("ivan", &sb)] {
            cli(&["register", user], state, &servers).await;
            let v = cli(&["login", user], state, &servers).await;
            assert_eq!(v["logged_in"], user, "{v}");
        }
        let v = cli(&["chat", "ivan", "through the second node"], &sa, &servers).await;
        assert!(v["stored_at_ms"].as_u64().unwrap() > 0, "{v}");
        let v = cli(&["inbox", "--wait", "1s"], &sb, &servers).await;
        let msgs = v["messages"].as_array().unwrap();
        assert_eq!(msgs.len(), 1, "{v}");
        assert_eq!(msgs[0]["body"], "through the second node");
        fleet.stop().await;
    })
    .await
    .expect("test timed out");
}

/// The `host:port` of an `http://host:port` URL.
fn authority(url: &str) -> String {
    url.trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned()
}

/// Start `peerlink-sim --json fleet`, check its services answer, send the launcher `signal`,
/// and require every service it started to stop listening within 10 s.
async fn fleet_command_services_stop_with_the_launcher(signal: libc::c_int) {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_peerlink-sim"))
        .args(["--json", "fleet"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("run peerlink-sim fleet");
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .expect("the fleet did not announce itself within 60 s")
        .unwrap()
        .expect("peerlink-sim fleet exited before announcing");
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let addrs: Vec<String> = [
        authority(v["directory"].as_str().unwrap()),
        authority(v["signaling"].as_str().unwrap()),
        v["relay_metrics"].as_str().unwrap().to_owned(),
    ]
    .into();
    for a in &addrs {
        tokio::net::TcpStream::connect(a)
            .await
            .unwrap_or_else(|e| panic!("{a} does not answer while the fleet runs: {e}"));
    }
    let pid = libc::pid_t::try_from(child.id().unwrap()).unwrap();
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("peerlink-sim fleet did not exit")
        .unwrap();
    assert!(!status.success(), "{status:?}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for a in &addrs {
        while tokio::net::TcpStream::connect(a).await.is_ok() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{a} still answers 10 s after its launcher got signal {signal}: orphaned"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test]
async fn fleet_command_stops_its_services_on_sigterm_and_sigint() {
    fleet_command_services_stop_with_the_launcher(libc::SIGTERM).await;
    fleet_command_services_stop_with_the_launcher(libc::SIGINT).await;
}

#[tokio::test]
async fn services_of_a_killed_fleet_command_exit_with_it() {
    fleet_command_services_stop_with_the_launcher(libc::SIGKILL).await;
}
