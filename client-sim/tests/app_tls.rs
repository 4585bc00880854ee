//! The `peerlink-sim` CLI against a signaling node serving HTTPS/WSS with a certificate from a
//! private CA made at test time: `--ca` trusts it (register, login, chat, inbox, and a call
//! between two CLI processes); without it the command fails naming the server and the
//! certificate; a CA file that cannot be used exits with status 2.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use peerlink_api::signaling_client::{HttpApi, SignalSession};
use peerlink_api::tls::Trust;
use peerlink_testkit::proc::{Service, workspace_bin};
use peerlink_testkit::tls::TestCa;

const TEST: Duration = Duration::from_secs(150);
const PASSWORD: &str = "cli-password-123";

/// `peerlink-signaling` with `--tls-cert/--tls-key` on loopback; its `https://localhost:PORT`.
fn tls_signaling(dir: &Path, ca: &TestCa) -> (Service, String) {
    let files = ca.write_server(dir, "server", &["localhost", "127.0.0.1"]);
    let mut cmd = Command::new(workspace_bin("peerlink-signaling"));
    cmd.args(["--listen", "127.0.0.1:0", "--no-stun", "--log", "warn"])
        .args(["--argon2-m-kib", "64", "--argon2-t", "1"])
        .arg("--db")
        .arg(dir.join("sig.db"))
        .arg("--tls-cert")
        .arg(&files.cert)
        .arg("--tls-key")
        .arg(&files.key)
        .env(
            "PEERLINK_TOKEN_SECRET",
            "tls-cli-token-secret-0123456789abcdef",
        )
        .stderr(Stdio::inherit());
    let mut proc = Service::start("peerlink-signaling", cmd);
    let addr: std::net::SocketAddr = proc.wait_for(Duration::from_secs(60), |l| {
        l.strip_prefix("http=").map(|a| a.parse().unwrap())
    });
    (proc, format!("https://localhost:{}", addr.port()))
}

/// Run `peerlink-sim --json --server SERVER --state STATE [--ca CA] ARGS` to its end.
async fn run(args: &[&str], state: &Path, server: &str, ca: Option<&Path>) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_peerlink-sim"));
    cmd.args(["--json", "--server", server, "--state"])
        .arg(state)
        .env_remove("PEERLINK_CA")
        .env("PEERLINK_PASSWORD", PASSWORD)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(ca) = ca {
        cmd.arg("--ca").arg(ca);
    }
    let child = cmd.args(args).spawn().expect("run peerlink-sim");
    tokio::time::timeout(Duration::from_secs(90), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("peerlink-sim {args:?} did not finish"))
        .unwrap()
}

/// [`run`] that must succeed; its one JSON object.
async fn cli(args: &[&str], state: &Path, server: &str, ca: &Path) -> serde_json::Value {
    let out = run(args, state, server, Some(ca)).await;
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
async fn cli_over_https_with_a_private_ca() {
    tokio::time::timeout(TEST, async {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("peerlink test CA");
        let ca_file = ca.write_cert(&dir.path().join("ca.pem"));
        let (_node, server) = tls_signaling(dir.path(), &ca);
        let (sa, sb) = (dir.path().join("a.json"), dir.path().join("b.json"));
        for (u, s) in [("frank", &sa), ("grace", &sb)] {
            cli(&["register", u], s, &server, &ca_file).await;
            let v = cli(&["login", u], s, &server, &ca_file).await;
            assert_eq!(v["logged_in"], u);
        }
        let v = cli(&["chat", "grace", "hi over tls"], &sa, &server, &ca_file).await;
        assert!(v["stored_at_ms"].as_u64().unwrap() > 0, "{v}");
        let v = cli(&["inbox", "--wait", "1s"], &sb, &server, &ca_file).await;
        let msgs = v["messages"].as_array().unwrap();
        assert_eq!(msgs.len(), 1, "{v}");
        assert_eq!(
            (msgs[0]["from"].as_str(), msgs[0]["body"].as_str()),
            (Some("frank"), Some("hi over tls"))
        );

        // A call between two CLI processes, signalled over wss.
        let listen = {
            let (sb, server, ca_file) = (sb.clone(), server.clone(), ca_file.clone());
            tokio::spawn(async move {
                let args = ["listen", "--wait", "60s", "--no-turn"];
                cli(&args, &sb, &server, &ca_file).await
            })
        };
        let trust = Trust::with_ca_files(&[&ca_file]).unwrap();
        let api = HttpApi::with_trust(&server, Duration::from_secs(30), &trust).unwrap();
        let t = api.login("frank", PASSWORD).await.unwrap();
        let mut watch = SignalSession::connect(api, t, "watcher", None)
            .await
            .unwrap();
        watch
            .wait_until_online("grace", Duration::from_secs(60))
            .await
            .unwrap();
        let a = cli(
            &["call", "grace", "--duration", "2s", "--no-turn"],
            &sa,
            &server,
            &ca_file,
        )
        .await;
        let b = listen.await.unwrap();
        assert_eq!(a["call_id"], b["call_id"]);
        assert_eq!(a["path"], "direct", "{a}");
        assert!(
            b["media"]["packets_received"].as_u64().unwrap() >= 25,
            "{b}"
        );
        watch.close().await;

        // Without --ca: a certificate error naming the server, and the hint.
        let out = run(&["login", "frank"], &sa, &server, None).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains(&server) && err.contains("certificate") && err.contains("--ca"),
            "{err}"
        );
        // A CA file that is not one: status 2, the file named.
        let junk: PathBuf = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let out = run(&["login", "frank"], &sa, &server, Some(&junk)).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(&junk.display().to_string()), "{err}");
    })
    .await
    .expect("test timed out");
}
