//! The real `peerlink-directory` binary on loopback, driven through `DirectoryClient`:
//! SIGKILL + restart on the same port -> the registration loops re-register node and relay
//! within one heartbeat and republish presence; a dead node's users go offline within the
//! presence TTL; SIGTERM exits cleanly; bad configuration exits 2 before binding, and so do a
//! bad store URL and an unreachable Redis; with `--store redis://` (or the environment
//! variable) two directory processes share one Redis.

// Test code: unwrap on fixtures is fine (clippy.toml allows it inside #[test] fns only).
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use peerlink_api::directory::*;
use peerlink_api::directory_client::{DirectoryClient, RegistrationState, RelayStatus};
use peerlink_testkit::proc::Service;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::watch;
use tokio::time::timeout;

const TOKEN: &str = "integration-token";
const BIN: &str = env!("CARGO_BIN_EXE_peerlink-directory");
/// Generous bound for anything on this shared, loaded machine.
const STEP: Duration = Duration::from_secs(30);

/// A running directory process (`peerlink_testkit::proc::Service`: stdout drained, killed and
/// reaped on drop).
struct Directory {
    svc: Service,
    addr: SocketAddr,
}

impl Directory {
    async fn start(port: u16, extra: &[&str]) -> Directory {
        let mut cmd = std::process::Command::new(BIN);
        cmd.arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .args(extra)
            .env_remove("PEERLINK_CLUSTER_TOKEN")
            .env("PEERLINK_CLUSTER_TOKEN", TOKEN)
            .env("RUST_LOG", "warn")
            .stderr(Stdio::inherit());
        let mut svc = Service::start("peerlink-directory", cmd);
        let addr: SocketAddr = svc.wait_for(STEP, |l| {
            l.strip_prefix("listening on ").and_then(|a| a.parse().ok())
        });
        Directory { svc, addr }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn kill9(mut self) {
        self.svc.kill().expect("SIGKILL and reap");
    }

    /// Its exit status, waiting up to `bound` for it.
    async fn exit_within(&mut self, bound: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + bound;
        loop {
            if let Some(status) = self.svc.child().try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "still running after {bound:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

async fn wait_state(
    rx: &mut watch::Receiver<RegistrationState>,
    what: &str,
    bound: Duration,
    f: impl FnMut(&RegistrationState) -> bool,
) -> RegistrationState {
    let got = timeout(bound, rx.wait_for(f))
        .await
        .ok()
        .map(|r| r.expect("registration loop alive").clone());
    got.unwrap_or_else(|| panic!("timed out waiting for {what}: {:?}", *rx.borrow()))
}

async fn metric(dir_url: &str, name: &str) -> u64 {
    let text = timeout(STEP, async {
        reqwest::get(format!("{dir_url}/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    })
    .await
    .expect("metrics in time");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} missing"))
        .parse()
        .expect("number")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_reregisters_within_one_heartbeat_and_republishes_presence() {
    // node TTL 3 s -> recommended heartbeat 1 s; presence TTL 4 s.
    let args = ["--node-ttl", "3", "--presence-ttl", "4", "--seed", "7"];
    let port = free_port();
    let dir = Directory::start(port, &args).await;
    let client = DirectoryClient::new(&dir.url(), TOKEN).expect("client");

    // The node's own view of its sessions, which the loop republishes.
    let sessions = Arc::new(std::sync::Mutex::new(vec![
        NodePresence {
            user: "alice".into(),
            device: "phone".into(),
            status: PresenceStatus::Online,
        },
        NodePresence {
            user: "bob".into(),
            device: "pc".into(),
            status: PresenceStatus::Busy,
        },
    ]));
    let src = sessions.clone();
    let node = client.spawn_node_registration(
        RegisterNodeRequest {
            node_id: "sig-1".into(),
            internal_url: "http://127.0.0.1:18443".into(),
            epoch: 1,
            load: 0.0,
        },
        move || src.lock().unwrap().clone(),
    );
    let relay = client.spawn_relay_registration(
        RegisterRelayRequest {
            relay_id: "relay-1".into(),
            turn_addr: "127.0.0.1:3478".parse().unwrap(),
            turn_tcp_addr: None,
            turn_tls_addr: None,
            metrics_addr: "127.0.0.1:9641".parse().unwrap(),
            region: "eu".into(),
            capacity: 1000,
            load: 0.0,
            allocations: 0,
            draining: false,
        },
        || RelayStatus {
            load: 0.25,
            allocations: 12,
            draining: false,
        },
    );
    let mut node_rx = node.subscribe();
    let mut relay_rx = relay.subscribe();
    let s = wait_state(&mut node_rx, "first node registration", STEP, |s| {
        s.registrations == 1
    })
    .await;
    assert_eq!(s.republished, 2);
    wait_state(&mut relay_rx, "first relay registration", STEP, |s| {
        s.registrations == 1
    })
    .await;
    // At least one heartbeat each goes through before the crash.
    wait_state(&mut node_rx, "node heartbeat", STEP, |s| s.heartbeats >= 1).await;
    wait_state(&mut relay_rx, "relay heartbeat", STEP, |s| {
        s.heartbeats >= 1
    })
    .await;
    let loc = client.lookup_user("alice").await.expect("lookup");
    assert_eq!(loc.devices.len(), 1);
    let relays = client.list_relays().await.expect("relays");
    assert_eq!(
        relays[0].allocations, 12,
        "heartbeat carried the status source"
    );

    // Crash the directory and bring it back on the same port, empty.
    dir.kill9().await;
    assert!(
        client.lookup_user("alice").await.is_err(),
        "directory is down"
    );
    let dir = Directory::start(port, &args).await;
    let restarted = Instant::now();

    let interval = Duration::from_secs(1);
    let margin = Duration::from_secs(3);
    let (node_done, relay_done) = tokio::join!(
        async {
            let s = wait_state(&mut node_rx, "node re-registration", STEP, |s| {
                s.registrations >= 2
            })
            .await;
            (s, restarted.elapsed())
        },
        async {
            wait_state(&mut relay_rx, "relay re-registration", STEP, |s| {
                s.registrations >= 2
            })
            .await;
            restarted.elapsed()
        }
    );
    let (s, node_took) = node_done;
    let relay_took = relay_done;
    eprintln!("re-registered: node after {node_took:?}, relay after {relay_took:?}");
    assert_eq!(
        s.republished, 2,
        "presence republished with the re-registration"
    );
    assert!(
        node_took <= interval + margin && relay_took <= interval + margin,
        "re-registered after {node_took:?} / {relay_took:?}; heartbeat interval {interval:?}"
    );
    // Each loop re-registered on its first heartbeat answered by the new directory.
    assert_eq!(
        metric(&dir.url(), "peerlink_directory_unknown_heartbeats_total").await,
        2
    );
    assert_eq!(
        metric(&dir.url(), "peerlink_directory_node_registrations_total").await,
        1
    );

    let nodes = client.list_nodes().await.expect("nodes");
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].node_id, "sig-1");
    let found = client
        .lookup_users(&["alice".into(), "bob".into(), "carol".into()])
        .await
        .expect("lookup");
    assert_eq!(found[0].devices[0].device, "phone");
    assert_eq!(
        found[0].devices[0].node_url.as_deref(),
        Some("http://127.0.0.1:18443")
    );
    assert_eq!(found[1].devices[0].status, PresenceStatus::Busy);
    assert!(found[2].devices.is_empty());
    let chosen = client
        .choose_relays(&ChooseRelaysRequest {
            caller_region: "eu".into(),
            callee_region: None,
            count: 1,
        })
        .await
        .expect("choose");
    assert_eq!(chosen[0].relay_id, "relay-1");

    // The node dies (its loop stops; no deregistration): users offline within the presence
    // TTL (4 s) plus sweep/poll slack, and it is no longer listed.
    drop(node);
    let died = Instant::now();
    let offline = timeout(STEP, async {
        loop {
            let loc = client.lookup_user("alice").await.expect("lookup");
            if loc.devices.is_empty() {
                return died.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("alice went offline");
    eprintln!("alice offline {offline:?} after her node died");
    assert!(
        offline <= Duration::from_secs(4) + margin,
        "offline after {offline:?}"
    );
    assert!(client.list_nodes().await.expect("nodes").is_empty());
    drop(relay);
}

#[tokio::test]
async fn sigterm_shuts_down_cleanly() {
    let mut dir = Directory::start(0, &[]).await;
    let client = DirectoryClient::new(&dir.url(), TOKEN).expect("client");
    timeout(STEP, client.health())
        .await
        .expect("in time")
        .expect("healthy");
    let wrong = DirectoryClient::new(&dir.url(), "not-the-token").expect("client");
    let err = timeout(STEP, wrong.list_nodes())
        .await
        .expect("in time")
        .expect_err("401");
    assert_eq!(err.code(), Some(ErrorCode::Unauthorized));
    let pid = nix::unistd::Pid::from_raw(i32::try_from(dir.svc.pid()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let status = dir.exit_within(STEP).await;
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn config_file_is_used_and_bad_config_exits_before_binding() {
    let tmp = tempfile::tempdir().expect("tmp");
    let good = tmp.path().join("good.toml");
    std::fs::write(
        &good,
        "node_ttl = 6\npresence_ttl = 12\nseed = 3\ncluster_token = \"from-the-file\"\n",
    )
    .expect("write");
    // The file's token is overridden by the environment variable the harness sets.
    let dir = Directory::start(0, &["--config", good.to_str().expect("utf8")]).await;
    let client = DirectoryClient::new(&dir.url(), TOKEN).expect("client");
    let r = timeout(
        STEP,
        client.register_node(&RegisterNodeRequest {
            node_id: "n".into(),
            internal_url: "http://127.0.0.1:1".into(),
            epoch: 1,
            load: 0.0,
        }),
    )
    .await
    .expect("in time")
    .expect("register");
    assert_eq!(
        (r.node_ttl_ms, r.presence_ttl_ms, r.heartbeat_interval_ms),
        (6_000, 12_000, 2_000)
    );
    dir.kill9().await;

    // Bad configurations: non-zero exit, nothing bound (the port stays free).
    let port = free_port();
    let bad_toml = tmp.path().join("bad.toml");
    std::fs::write(&bad_toml, "node_ttl = \"ten\"\n").expect("write");
    let unknown_key = tmp.path().join("unknown.toml");
    std::fs::write(&unknown_key, "nodettl = 1\n").expect("write");
    let listen = format!("127.0.0.1:{port}");
    let cases: Vec<(Vec<String>, bool)> = vec![
        (vec!["--listen".into(), listen.clone()], false), // no token at all
        (
            vec![
                "--listen".into(),
                listen.clone(),
                "--config".into(),
                bad_toml.display().to_string(),
            ],
            true,
        ),
        (
            vec![
                "--listen".into(),
                listen.clone(),
                "--config".into(),
                unknown_key.display().to_string(),
            ],
            true,
        ),
        (
            vec![
                "--listen".into(),
                listen.clone(),
                "--config".into(),
                "/nonexistent/x.toml".into(),
            ],
            true,
        ),
        (
            vec![
                "--listen".into(),
                listen.clone(),
                "--node-ttl".into(),
                "0".into(),
            ],
            true,
        ),
        (
            vec![
                "--listen".into(),
                listen.clone(),
                "--presence-ttl".into(),
                "abc".into(),
            ],
            true,
        ),
        (vec!["--listen".into(), "not-an-address".into()], true),
    ];
    for (args, with_token) in cases {
        let mut cmd = Command::new(BIN);
        cmd.args(&args)
            .env_remove("PEERLINK_CLUSTER_TOKEN")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if with_token {
            cmd.env("PEERLINK_CLUSTER_TOKEN", TOKEN);
        }
        let out = timeout(STEP, cmd.output())
            .await
            .expect("exits in time")
            .expect("run");
        assert_eq!(out.status.code(), Some(2), "{args:?} should fail with 2");
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("listening on"),
            "{args:?} bound before failing"
        );
        assert!(
            !out.stderr.is_empty(),
            "{args:?}: error explained on stderr"
        );
    }
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("port was never bound");
}

#[tokio::test]
async fn log_format_json_writes_one_object_per_line_and_a_bad_filter_is_refused() {
    let mut cmd = Command::new(BIN);
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--log",
        "info",
        "--log-format",
        "json",
    ])
    .env("PEERLINK_CLUSTER_TOKEN", TOKEN)
    .env_remove("RUST_LOG")
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    let mut child = cmd.spawn().expect("spawn directory");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let line = timeout(STEP, stderr.next_line())
        .await
        .expect("a log line in time")
        .expect("read stderr")
        .expect("the directory logs its start at info");
    let v: serde_json::Value = serde_json::from_str(&line)
        .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line:?}"));
    assert_eq!(v["level"], "INFO", "{line}");
    assert!(
        v["fields"].is_object() && v["timestamp"].is_string(),
        "{line}"
    );
    assert!(
        !line.contains('\u{1b}'),
        "no ANSI colour off a terminal: {line:?}"
    );
    child.start_kill().expect("kill");
    let _ = child.wait().await;

    let out = timeout(
        STEP,
        Command::new(BIN)
            .args(["--listen", "127.0.0.1:0", "--log", "[[["])
            .env("PEERLINK_CLUSTER_TOKEN", TOKEN)
            .output(),
    )
    .await
    .expect("exits in time")
    .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad log filter"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_store_or_unreachable_redis_exits_2_before_binding() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let dead = format!("redis://127.0.0.1:{}/0", free_port());
    let cases: Vec<(Vec<&str>, Option<&str>, &str)> = vec![
        (vec!["--store", "redis://"], None, "no host"),
        (
            vec!["--store", "rediss://127.0.0.1:6379"],
            None,
            "expected `memory` or redis://",
        ),
        (
            vec!["--store", "postgres://127.0.0.1/x"],
            None,
            "expected `memory` or redis://",
        ),
        (
            vec!["--store", "redis://127.0.0.1:6379?db=1"],
            None,
            "unknown parameter",
        ),
        (vec![], Some("sqlite"), "expected `memory` or redis://"),
        (vec!["--store", &dead], None, "storage backend unavailable"),
        (
            vec!["--store", &dead, "--store-timeout", "0"],
            None,
            "store_timeout must be",
        ),
    ];
    for (args, env, want) in cases {
        let mut cmd = Command::new(BIN);
        cmd.args(["--listen", &listen])
            .args(&args)
            .env("PEERLINK_CLUSTER_TOKEN", TOKEN)
            .env_remove("PEERLINK_DIRECTORY_STORE")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(e) = env {
            cmd.env("PEERLINK_DIRECTORY_STORE", e);
        }
        let out = timeout(STEP, cmd.output())
            .await
            .expect("exits in time")
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}: {err}");
        assert!(err.contains(want), "{args:?} {env:?}: {err}");
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("listening on"),
            "{args:?} bound before failing"
        );
    }
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("port was never bound");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_one_redis_are_one_directory() {
    let Some(redis) = peerlink_testkit::redis::RedisServer::start() else {
        return;
    };
    // One from the flag, one from the environment variable.
    let store = format!("{}?prefix=bin", redis.url(3));
    let a = Directory::start(0, &["--store", &store, "--node-ttl", "3"]).await;
    let b = {
        let mut cmd = std::process::Command::new(BIN);
        cmd.args(["--listen", "127.0.0.1:0"])
            .env("PEERLINK_CLUSTER_TOKEN", TOKEN)
            .env("PEERLINK_DIRECTORY_STORE", &store)
            .args(["--node-ttl", "3"])
            .env("RUST_LOG", "warn")
            .stderr(Stdio::inherit());
        let mut svc = Service::start("peerlink-directory", cmd);
        let addr: SocketAddr = svc.wait_for(STEP, |l| {
            l.strip_prefix("listening on ").and_then(|a| a.parse().ok())
        });
        Directory { svc, addr }
    };
    let ca = DirectoryClient::new(&a.url(), TOKEN).expect("client");
    let cb = DirectoryClient::new(&b.url(), TOKEN).expect("client");
    // Late in A's life, so that a clock of A's own (origin at its start) would disagree with
    // the restarted A's below.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let r = timeout(
        STEP,
        ca.register_node(&RegisterNodeRequest {
            node_id: "n".into(),
            internal_url: "http://127.0.0.1:1".into(),
            epoch: 1,
            load: 0.0,
        }),
    )
    .await
    .expect("in time")
    .expect("register");
    assert_eq!(r.previous_epoch, None);
    let update = PresenceUpdate {
        user: "alice".into(),
        device: "phone".into(),
        node_id: "n".into(),
        node_epoch: 1,
        status: PresenceStatus::Online,
    };
    let put = cb.update_presence(&update);
    assert_eq!(
        timeout(STEP, put).await.expect("in time").expect("update"),
        UpdateOutcome::Applied
    );
    let loc = timeout(STEP, ca.lookup_user("alice"))
        .await
        .expect("in time")
        .expect("lookup");
    assert_eq!(loc.devices.len(), 1, "written through B, read through A");
    assert!(
        loc.devices[0].last_seen_age_ms < 5_000,
        "the replicas share one clock: {} ms",
        loc.devices[0].last_seen_age_ms
    );
    assert_eq!(metric(&b.url(), "peerlink_directory_store_up").await, 1);
    assert_eq!(metric(&a.url(), "peerlink_directory_nodes").await, 1);
    assert_eq!(
        metric(&b.url(), "peerlink_directory_presence_entries").await,
        1
    );
    // Restarting one replica loses nothing: the state is in Redis, and so is the time base
    // (a clock starting at the process start would make the stored heartbeat look fresh).
    a.kill9().await;
    let a = Directory::start(0, &["--store", &store, "--node-ttl", "3"]).await;
    let ca = DirectoryClient::new(&a.url(), TOKEN).expect("client");
    let nodes = timeout(STEP, ca.list_nodes())
        .await
        .expect("in time")
        .expect("nodes");
    assert_eq!(nodes.len(), 1);
    assert!(nodes[0].last_heartbeat_age_ms < 3_000, "{nodes:?}");
    tokio::time::sleep(Duration::from_millis(3_200)).await;
    let nodes = timeout(STEP, ca.list_nodes())
        .await
        .expect("in time")
        .expect("nodes");
    assert!(nodes.is_empty(), "dead after the node TTL: {nodes:?}");
}
