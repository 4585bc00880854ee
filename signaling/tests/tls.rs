//! The binary with `--tls-cert/--tls-key`: HTTPS and WSS with the typed client trusting a
//! private CA made at test time, a certificate error without that CA, SIGHUP reloads (a good
//! pair is taken, a bad file keeps the old one), silent and garbage TCP clients closed without
//! touching others, drain over TLS, two nodes talking `https://` to each other with
//! `--cluster-ca`, and the flags checked before anything is bound.
// Test helpers outside #[test] fns: a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Node, WAIT};
use peerlink_api::signaling::{ClientMsg, ServerMsg};
use peerlink_api::signaling_client::{HttpApi, SignalError, SignalSession, Tokens};
use peerlink_api::tls::Trust;
use peerlink_testkit::proc::{Service, workspace_bin};
use peerlink_testkit::tls::{ServerFiles, TestCa};

const PASSWORD: &str = "password-123";

/// A CA, its certificate file, and a server certificate it signed for localhost/127.0.0.1.
struct Pki {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    ca: TestCa,
    ca_file: PathBuf,
    server: ServerFiles,
}

fn pki(name: &str) -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let ca = TestCa::new(name);
    let ca_file = ca.write_cert(&path.join("ca.pem"));
    let server = ca.write_server(&path, "server", &["localhost", "127.0.0.1"]);
    Pki {
        _dir: dir,
        dir: path,
        ca,
        ca_file,
        server,
    }
}

fn tls_node(db: &Path, files: &ServerFiles, extra: &[&str]) -> Node {
    let mut args = vec![
        "--tls-cert",
        files.cert.to_str().unwrap(),
        "--tls-key",
        files.key.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    Node::start(db, &args)
}

fn trust(ca: &Path) -> Trust {
    Trust::with_ca_files(&[ca]).unwrap()
}

fn api(url: &str, trust: &Trust) -> HttpApi {
    HttpApi::with_trust(url, WAIT, trust).unwrap()
}

/// Register (a taken name is fine) and log in.
async fn account(api: &HttpApi, user: &str) -> Result<Tokens, SignalError> {
    match tokio::time::timeout(WAIT, api.register(user, PASSWORD))
        .await
        .expect("register within the wait")
    {
        Ok(()) => {}
        Err(e) if e.status() == Some(409) => {}
        Err(e) => return Err(e),
    }
    tokio::time::timeout(WAIT, api.login(user, PASSWORD))
        .await
        .expect("login within the wait")
}

/// A Prometheus value of the node, read over HTTPS.
async fn metric(url: &str, trust: &Trust, name: &str) -> u64 {
    let c = trust.reqwest_builder().timeout(WAIT).build().unwrap();
    let text = c
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("peerlink_signaling_{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("metric {name} missing"))
}

fn assert_certificate_error(e: &SignalError, server: &str) {
    assert!(
        matches!(e, SignalError::Tls { .. }),
        "not a TLS error: {e:?}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains(server) && msg.contains("certificate"),
        "the error names the server and the certificate: {msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_and_wss_with_the_typed_client_and_a_private_ca() {
    let p = pki("peerlink test CA");
    let node = tls_node(&p.dir.join("sig.db"), &p.server, &[]);
    let t = trust(&p.ca_file);
    // By name and by address: the certificate carries both.
    for url in [
        format!("https://localhost:{}", node.http.port()),
        format!("https://127.0.0.1:{}", node.http.port()),
    ] {
        let api = api(&url, &t);
        assert!(api.is_tls());
        account(&api, "alice").await.unwrap();
    }
    let url = format!("https://localhost:{}", node.http.port());
    let a = api(&url, &t);
    let alice = account(&a, "alice").await.unwrap();
    let bob = account(&a, "bob").await.unwrap();
    let mut bob = tokio::time::timeout(WAIT, SignalSession::connect(a.clone(), bob, "phone", None))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(bob.welcome().user, "bob");
    let mut alice = tokio::time::timeout(WAIT, SignalSession::connect(a, alice, "laptop", None))
        .await
        .unwrap()
        .unwrap();
    alice.send_message("bob", "over wss", WAIT).await.unwrap();
    let m = bob
        .wait_for(WAIT, "message", None, |m| {
            matches!(m, ServerMsg::Message { .. })
        })
        .await
        .unwrap();
    match m {
        ServerMsg::Message { from, body, .. } => {
            assert_eq!((from.as_str(), body.as_str()), ("alice", "over wss"))
        }
        other => panic!("{other:?}"),
    }
    assert!(metric(&url, &t, "tls_handshakes_total").await >= 4);
    assert_eq!(metric(&url, &t, "tls_handshake_failures_total").await, 0);

    // Plain HTTP to the TLS listener is a failed handshake, not an answer.
    let plain = HttpApi::new(&format!("http://127.0.0.1:{}", node.http.port()), WAIT).unwrap();
    assert!(account(&plain, "carol").await.is_err());
    assert_eq!(metric(&url, &t, "tls_handshake_failures_total").await, 1);
}

/// The ALPN protocol the node picks when a client offers `offer`.
async fn negotiated(addr: std::net::SocketAddr, t: &Trust, offer: &[&[u8]]) -> Option<Vec<u8>> {
    let mut cfg = (**t.config()).clone();
    cfg.alpn_protocols = offer.iter().map(|p| p.to_vec()).collect();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio::time::timeout(
        WAIT,
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg)).connect(name, tcp),
    )
    .await
    .unwrap()
    .unwrap();
    tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_offers_h2_and_http1() {
    let p = pki("peerlink test CA");
    let node = tls_node(&p.dir.join("sig.db"), &p.server, &[]);
    let t = trust(&p.ca_file);
    let h2: &[u8] = b"h2";
    let h1: &[u8] = b"http/1.1";
    assert_eq!(
        negotiated(node.http, &t, &[h2, h1]).await.as_deref(),
        Some(h2)
    );
    assert_eq!(negotiated(node.http, &t, &[h1]).await.as_deref(), Some(h1));
    assert_eq!(negotiated(node.http, &t, &[]).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_ca_the_client_refuses_the_certificate() {
    let p = pki("peerlink test CA");
    let node = tls_node(&p.dir.join("sig.db"), &p.server, &[]);
    let url = format!("https://localhost:{}", node.http.port());
    // System roots only.
    let e = account(&HttpApi::new(&url, WAIT).unwrap(), "alice")
        .await
        .unwrap_err();
    assert_certificate_error(&e, &url);
    // Another CA.
    let other = pki("another CA");
    let e = account(&api(&url, &trust(&other.ca_file)), "alice")
        .await
        .unwrap_err();
    assert_certificate_error(&e, &url);
    // The WebSocket too: tokens from a trusting client, the session from one that is not.
    let tokens = account(&api(&url, &trust(&p.ca_file)), "alice")
        .await
        .unwrap();
    let e = tokio::time::timeout(
        WAIT,
        SignalSession::connect(HttpApi::new(&url, WAIT).unwrap(), tokens, "laptop", None),
    )
    .await
    .unwrap()
    .unwrap_err();
    assert_certificate_error(&e, &url);
    // A certificate for another name.
    let wrong = p.ca.write_server(&p.dir, "elsewhere", &["elsewhere.test"]);
    let node2 = tls_node(&p.dir.join("sig2.db"), &wrong, &[]);
    let url2 = format!("https://localhost:{}", node2.http.port());
    let e = account(&api(&url2, &trust(&p.ca_file)), "alice")
        .await
        .unwrap_err();
    assert_certificate_error(&e, &url2);
}

/// Whether a client trusting `t` gets an answer from `url` now.
async fn accepted(url: &str, t: &Trust) -> bool {
    account(&api(url, t), "probe").await.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_and_a_bad_file_keeps_the_old_one() {
    let first = pki("first CA");
    let second = pki("second CA");
    // The node reads its own copies, which the test replaces.
    let live = ServerFiles {
        cert: first.dir.join("live.crt"),
        key: first.dir.join("live.key"),
    };
    std::fs::copy(&first.server.cert, &live.cert).unwrap();
    std::fs::copy(&first.server.key, &live.key).unwrap();
    let node = tls_node(&first.dir.join("sig.db"), &live, &[]);
    let url = format!("https://localhost:{}", node.http.port());
    let (t1, t2) = (trust(&first.ca_file), trust(&second.ca_file));
    assert!(accepted(&url, &t1).await);
    assert!(!accepted(&url, &t2).await);
    // An open session outlives the reload.
    let tokens = account(&api(&url, &t1), "alice").await.unwrap();
    let mut open = SignalSession::connect(api(&url, &t1), tokens, "laptop", None)
        .await
        .unwrap();

    std::fs::copy(&second.server.cert, &live.cert).unwrap();
    std::fs::copy(&second.server.key, &live.key).unwrap();
    let pid = nix::unistd::Pid::from_raw(node.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    let deadline = Instant::now() + WAIT;
    while !accepted(&url, &t2).await {
        assert!(
            Instant::now() < deadline,
            "the second certificate never served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!accepted(&url, &t1).await, "the first certificate is gone");
    open.send_message("alice", "still here", WAIT)
        .await
        .unwrap();

    // A broken file and SIGHUP: one failed reload, the second certificate keeps serving.
    std::fs::write(&live.cert, "not a certificate\n").unwrap();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    let deadline = Instant::now() + WAIT;
    while metric(&url, &t2, "tls_reload_failures_total").await == 0 {
        assert!(
            Instant::now() < deadline,
            "the failed reload was not counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(accepted(&url, &t2).await);
    assert!(!accepted(&url, &t1).await);
    // A key that does not match the certificate is refused the same way.
    std::fs::copy(&first.server.cert, &live.cert).unwrap();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    let deadline = Instant::now() + WAIT;
    while metric(&url, &t2, "tls_reload_failures_total").await < 2 {
        assert!(
            Instant::now() < deadline,
            "the mismatched pair was not refused"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(accepted(&url, &t2).await);
}

/// Read until EOF or error; how long it took, or None when `limit` passed first.
fn closed_within(s: &mut std::net::TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 4096];
    while start.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(_) => return Some(start.elapsed()),
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_garbage_clients_are_closed_and_others_served() {
    let p = pki("peerlink test CA");
    let node = tls_node(
        &p.dir.join("sig.db"),
        &p.server,
        &["--tls-handshake-timeout", "1s"],
    );
    let url = format!("https://localhost:{}", node.http.port());
    let t = trust(&p.ca_file);
    let mut silent = std::net::TcpStream::connect(node.http).unwrap();
    let mut garbage = std::net::TcpStream::connect(node.http).unwrap();
    garbage.write_all(&[0x16, 0x03, 0x01, 0xff, 0xff]).unwrap();
    garbage.write_all(&[0xab; 512]).unwrap();
    // A record header promising more than ever comes: only the timeout ends it.
    let mut trickle = std::net::TcpStream::connect(node.http).unwrap();
    trickle
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .unwrap();
    // Meanwhile a real client is served.
    let tokens = account(&api(&url, &t), "alice").await.unwrap();
    let mut session = SignalSession::connect(api(&url, &t), tokens, "laptop", None)
        .await
        .unwrap();
    let limit = Duration::from_secs(15);
    let g = tokio::task::spawn_blocking(move || closed_within(&mut garbage, limit));
    let s = tokio::task::spawn_blocking(move || closed_within(&mut silent, limit));
    let tr = tokio::task::spawn_blocking(move || closed_within(&mut trickle, limit));
    assert!(g.await.unwrap().is_some(), "garbage was not closed");
    assert!(s.await.unwrap().is_some(), "a silent client was not closed");
    assert!(
        tr.await.unwrap().is_some(),
        "a stalled handshake was not closed"
    );
    assert!(metric(&url, &t, "tls_handshake_failures_total").await >= 3);
    // The session that was open all along still works, and new clients are served.
    session
        .send_message("alice", "unaffected", WAIT)
        .await
        .unwrap();
    assert!(accepted(&url, &t).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_wss_sessions() {
    let p = pki("peerlink test CA");
    let mut node = tls_node(
        &p.dir.join("sig.db"),
        &p.server,
        &["--shutdown-grace", "0s"],
    );
    let url = format!("https://localhost:{}", node.http.port());
    let t = trust(&p.ca_file);
    let tokens = account(&api(&url, &t), "alice").await.unwrap();
    let mut session = SignalSession::connect(api(&url, &t), tokens, "laptop", None)
        .await
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(node.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let bye = tokio::time::timeout(WAIT, session.recv()).await.unwrap();
    assert!(
        matches!(bye, Ok(ServerMsg::Goodbye { .. })),
        "goodbye first: {bye:?}"
    );
    let closed = tokio::time::timeout(WAIT, session.recv()).await.unwrap();
    assert!(
        matches!(closed, Err(SignalError::Closed { code: 1001, .. })),
        "then close 1001: {closed:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = node.child().try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the node did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tls_nodes_deliver_to_each_other_with_the_cluster_ca() {
    const CLUSTER_TOKEN: &str = "tls-cluster-token";
    let p = pki("fleet CA");
    let mut cmd = Command::new(workspace_bin("peerlink-directory"));
    cmd.args(["--listen", "127.0.0.1:0"])
        .env("PEERLINK_CLUSTER_TOKEN", CLUSTER_TOKEN)
        .env("RUST_LOG", "warn");
    let mut dir = Service::start("peerlink-directory", cmd);
    let dir_addr = dir.wait_for(Duration::from_secs(60), |l| {
        l.strip_prefix("listening on ").map(|a| a.trim().to_owned())
    });
    let dir_url = format!("http://{dir_addr}");
    let db = p.dir.join("shared.db");
    let ca = p.ca_file.to_str().unwrap();
    let start = |id: &str| {
        tls_node(
            &db,
            &p.server,
            &[
                "--directory",
                &dir_url,
                "--node-id",
                id,
                "--cluster-token",
                CLUSTER_TOKEN,
                "--cluster-ca",
                ca,
            ],
        )
    };
    let a = start("node-a");
    let b = start("node-b");
    let t = trust(&p.ca_file);
    let (url_a, url_b) = (
        format!("https://127.0.0.1:{}", a.http.port()),
        format!("https://127.0.0.1:{}", b.http.port()),
    );
    let bob = account(&api(&url_b, &t), "bob").await.unwrap();
    let mut bob = SignalSession::connect(api(&url_b, &t), bob, "phone", None)
        .await
        .unwrap();
    let alice = account(&api(&url_a, &t), "alice").await.unwrap();
    let mut alice = SignalSession::connect(api(&url_a, &t), alice, "laptop", None)
        .await
        .unwrap();
    // bob is on node B: alice sees him online through the directory and node B's https URL.
    alice.wait_until_online("bob", WAIT).await.unwrap();
    alice.send_message("bob", "across", WAIT).await.unwrap();
    let m = bob
        .wait_for(WAIT, "message", None, |m| {
            matches!(m, ServerMsg::Message { .. })
        })
        .await
        .unwrap();
    assert!(matches!(m, ServerMsg::Message { body, .. } if body == "across"));
    // A call: the invite goes from node A to node B over https.
    let offer = serde_json::from_value(common::desc("127.0.0.1", 1)).unwrap();
    alice
        .send(&ClientMsg::Invite {
            to: "bob".into(),
            from: None,
            req: None,
            offer,
        })
        .await
        .unwrap();
    let inc = bob
        .wait_for(WAIT, "incoming_call", None, |m| {
            matches!(m, ServerMsg::IncomingCall { .. })
        })
        .await
        .unwrap();
    assert!(matches!(inc, ServerMsg::IncomingCall { from, .. } if from == "alice"));
    assert!(metric(&url_a, &t, "forwards_total").await >= 1);
    assert_eq!(metric(&url_a, &t, "forward_errors_total").await, 0);

    // A node that does not trust the fleet's CA cannot reach node B.
    let c = tls_node(
        &db,
        &p.server,
        &[
            "--directory",
            &dir_url,
            "--node-id",
            "node-c",
            "--cluster-token",
            CLUSTER_TOKEN,
        ],
    );
    let url_c = format!("https://127.0.0.1:{}", c.http.port());
    let carol = account(&api(&url_c, &t), "carol").await.unwrap();
    let mut carol = SignalSession::connect(api(&url_c, &t), carol, "desk", None)
        .await
        .unwrap();
    carol.wait_until_online("bob", WAIT).await.unwrap();
    let offer = serde_json::from_value(common::desc("127.0.0.1", 1)).unwrap();
    carol
        .send(&ClientMsg::Invite {
            to: "bob".into(),
            from: None,
            req: None,
            offer,
        })
        .await
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while metric(&url_c, &t, "forward_errors_total").await == 0 {
        assert!(
            Instant::now() < deadline,
            "node C reached node B without the CA"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn run_to_exit(args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_peerlink-signaling"));
    cmd.args(args)
        .env("PEERLINK_TOKEN_SECRET", common::TOKEN_SECRET)
        .env_remove("PEERLINK_TLS_CERT")
        .env_remove("PEERLINK_TLS_KEY")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let (mut out, mut err) = (String::new(), String::new());
            child
                .stdout
                .take()
                .unwrap()
                .read_to_string(&mut out)
                .unwrap();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (status.code().unwrap_or(-1), out, err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the binary did not exit on a bad TLS configuration");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn tls_flags_are_checked_before_binding() {
    let p = pki("peerlink test CA");
    let db = p.dir.join("sig.db");
    let db = db.to_str().unwrap();
    let (cert, key) = (
        p.server.cert.to_str().unwrap(),
        p.server.key.to_str().unwrap(),
    );
    let base = [
        "--listen",
        "127.0.0.1:0",
        "--stun",
        "127.0.0.1:0",
        "--db",
        db,
    ];
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter()
            .chain(extra.iter())
            .map(|s| s.to_string())
            .collect()
    };
    let check = |extra: &[&str], want: &str| {
        let args = with(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, out, err) = run_to_exit(&args);
        assert_eq!(code, 2, "{extra:?}: {err}");
        assert!(err.contains(want), "{extra:?}: want {want:?} in {err}");
        assert!(
            !out.contains("http="),
            "{extra:?}: bound before failing: {out}"
        );
    };
    check(&["--tls-cert", cert], "--tls-cert needs --tls-key");
    check(&["--tls-key", key], "--tls-key needs --tls-cert");
    let missing = p.dir.join("missing.pem");
    let missing = missing.to_str().unwrap();
    check(
        &["--tls-cert", missing, "--tls-key", key],
        &format!("TLS certificate {missing}"),
    );
    check(
        &["--tls-cert", cert, "--tls-key", cert],
        &format!("TLS key {cert}"),
    );
    let other = p.ca.write_server(&p.dir, "other", &["localhost"]);
    check(
        &["--tls-cert", cert, "--tls-key", other.key.to_str().unwrap()],
        "TLS certificate",
    );
    check(
        &["--cluster-ca", missing],
        &format!("--cluster-ca: CA file {missing}"),
    );
    // The TOML keys, with the same checks.
    let toml = p.dir.join("node.toml");
    std::fs::write(&toml, format!("tls_cert = \"{cert}\"\n")).unwrap();
    check(
        &["--config", toml.to_str().unwrap()],
        "--tls-cert needs --tls-key",
    );
    // The environment variables.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_peerlink-signaling"));
    cmd.args(with(&[]))
        .env("PEERLINK_TOKEN_SECRET", common::TOKEN_SECRET)
        .env("PEERLINK_TLS_CERT", cert)
        .env_remove("PEERLINK_TLS_KEY")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-cert needs --tls-key"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_toml_keys_and_environment_serve_tls() {
    let p = pki("peerlink test CA");
    let toml = p.dir.join("node.toml");
    std::fs::write(
        &toml,
        format!("tls_cert = \"{}\"\n", p.server.cert.display()),
    )
    .unwrap();
    let db = p.dir.join("sig.db");
    let mut args = common::base_args(&db);
    args.extend(["--config".into(), toml.display().to_string()]);
    let node = Node::start_raw_with(&db, &args, |c| {
        c.env("PEERLINK_TLS_KEY", &p.server.key);
    });
    let url = format!("https://localhost:{}", node.http.port());
    account(&api(&url, &trust(&p.ca_file)), "alice")
        .await
        .unwrap();
}
