//! The binary's configuration: a TOML file sets flags, the environment beats the file, and a
//! bad configuration exits with status 2 before anything is bound.
// Test helpers outside #[test] fns: a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Node, WAIT};

fn run_to_exit(args: &[&str], token_env: bool) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_peerlink-signaling"));
    cmd.args(args)
        .env_remove("PEERLINK_TOKEN_SECRET")
        .env_remove("PEERLINK_TURN_SECRET");
    if token_env {
        cmd.env("PEERLINK_TOKEN_SECRET", common::TOKEN_SECRET);
    }
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (status.code().unwrap_or(-1), err);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the binary did not exit on a bad configuration");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn bad_configuration_exits_before_binding() {
    let d = tempfile::tempdir().unwrap();
    let db = d.path().join("db");
    let db = db.to_str().unwrap();
    // No token secret.
    let (code, err) = run_to_exit(&["--listen", "127.0.0.1:0", "--db", db], false);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("token secret"), "{err}");
    // Unknown key in the TOML file.
    let cfg = d.path().join("bad.toml");
    std::fs::write(&cfg, "listen = \"127.0.0.1:0\"\nno_such_option = 1\n").unwrap();
    let (code, err) = run_to_exit(&["--config", cfg.to_str().unwrap(), "--db", db], true);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!(
            "config {}: unknown key `no_such_option`",
            cfg.display()
        )),
        "{err}"
    );
    // A bad duration in the file, named with its key.
    std::fs::write(&cfg, "listen = \"127.0.0.1:0\"\nring_timeout = \"soon\"\n").unwrap();
    let (code, err) = run_to_exit(&["--config", cfg.to_str().unwrap(), "--db", db], true);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("key `ring_timeout`: bad duration \"soon\""),
        "{err}"
    );
    // A bad duration.
    let (code, err) = run_to_exit(
        &[
            "--listen",
            "127.0.0.1:0",
            "--ring-timeout",
            "soon",
            "--db",
            db,
        ],
        true,
    );
    assert_eq!(code, 2, "{err}");
    // A call grace over the 10 minute cap.
    let (code, err) = run_to_exit(
        &["--listen", "127.0.0.1:0", "--call-grace", "11m", "--db", db],
        true,
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("call grace"), "{err}");
    // A range that is not one.
    let (code, err) = run_to_exit(
        &[
            "--listen",
            "127.0.0.1:0",
            "--deny-candidate",
            "10.0.0.0/33",
            "--db",
            db,
        ],
        true,
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("bad --deny-candidate \"10.0.0.0/33\""),
        "{err}"
    );
    // Nothing was created: the database is opened only after validation.
    assert!(!std::path::Path::new(db).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn toml_file_sets_flags() {
    let d = tempfile::tempdir().unwrap();
    let db = d.path().join("db");
    let cfg = d.path().join("node.toml");
    std::fs::write(
        &cfg,
        "listen = \"127.0.0.1:0\"\nstun = \"127.0.0.1:0\"\nmax_conns_per_ip = 1\nargon2_m_kib = 64\nargon2_t = 1\n\
         node_id = \"from-file\"\nlog = \"warn\"\ndeny_candidate = [\"100.64.0.0/10\", \"192.0.2.1\"]\n\
         token_secret = \"short\"\nring_timeout = 45\n",
    )
    .unwrap();
    let node = Node::start_raw(
        &db,
        &[
            "--config".into(),
            cfg.display().to_string(),
            "--db".into(),
            db.display().to_string(),
        ],
    );
    // The file's too-short token secret is replaced by PEERLINK_TOKEN_SECRET (the environment
    // beats the file), so the node started.
    let token = node.token("alice").await;
    let mut ws = common::Ws::connect(&node.ws_url(&format!("token={token}&device=a"))).await;
    assert_eq!(ws.recv_type("welcome").await["node"], "from-file");
    // The file's candidate ranges are refused (a bare address is a /32).
    node.token("bob").await;
    for ip in ["100.64.1.1", "192.0.2.1"] {
        ws.send(serde_json::json!({"type": "invite", "to": "bob", "offer": common::desc(ip, 1)}))
            .await;
        let e = ws.recv_type("error").await;
        assert_eq!(e["code"], "forbidden_candidate", "{ip}: {e}");
    }
    let r = tokio::time::timeout(
        WAIT,
        tokio_tungstenite::connect_async(node.ws_url(&format!("token={token}&device=b"))),
    )
    .await
    .unwrap();
    match r {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 429),
        other => panic!("expected 429 from max_conns_per_ip = 1, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_config_is_valid() {
    let d = tempfile::tempdir().unwrap();
    let db = d.path().join("db");
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml");
    let args: Vec<String> = [
        "--config",
        example,
        "--listen",
        "127.0.0.1:0",
        "--stun",
        "127.0.0.1:0",
        "--argon2-m-kib",
        "64",
        "--argon2-t",
        "1",
        "--log",
        "warn",
        "--db",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([db.display().to_string()])
    .collect();
    let node = Node::start_raw(&db, &args);
    let mut ws = node.connect("alice", "a").await;
    ws.send(serde_json::json!({"type": "list_contacts"})).await;
    ws.recv_type("contacts").await;
}
