//! Small bounded runs of the fleet subcommands against the real services (debug builds):
//! each asserts the JSON report is well formed and its counts are consistent. Never speed.
//!
//! The service binaries are `target/debug/peerlink-{signaling,directory}`; when missing they
//! are built once with `cargo build`.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use peerlink_loadtest::fleet::directory::DirectoryReport;
use peerlink_loadtest::fleet::idle::{IdleReport, WARMUP};
use peerlink_loadtest::fleet::idle_multi::MultiReport;
use peerlink_loadtest::fleet::invites::InviteReport;
use peerlink_loadtest::fleet::logins::LoginReport;

static BUILD: Mutex<()> = Mutex::new(());

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// Path of a service binary (debug), built if it is not there yet.
fn service(name: &str) -> PathBuf {
    let p = target_dir().join("debug").join(name);
    let _g = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    if !p.exists() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let st = Command::new(cargo)
            .args([
                "build",
                "-p",
                "peerlink-signaling",
                "-p",
                "peerlink-directory",
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build");
        assert!(st.success(), "building the services failed");
    }
    assert!(p.exists(), "{} missing after build", p.display());
    p
}

/// Run the load tester with `args`, killing it after `limit`; returns (success, stdout, stderr).
fn loadtest(args: &[&str], limit: Duration) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_peerlink-loadtest"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn peerlink-loadtest");
    let out = child.stdout.take().expect("stdout");
    let err = child.stderr.take().expect("stderr");
    let read = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let (o, e) = (read(Box::new(out)), read(Box::new(err)));
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break Some(s);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (o, e) = (o.join().expect("stdout"), e.join().expect("stderr"));
    assert!(
        status.is_some(),
        "peerlink-loadtest {args:?} timed out; stderr:\n{e}"
    );
    (status.is_some_and(|s| s.success()), o, e)
}

fn run_json<T: serde::de::DeserializeOwned>(args: &[&str]) -> T {
    let (ok, out, err) = loadtest(args, Duration::from_secs(240));
    assert!(ok, "peerlink-loadtest {args:?} failed:\n{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON ({e}):\n{out}\n{err}"))
}

#[test]
fn fleet_idle_sessions_small() {
    let sig = service("peerlink-signaling");
    let r: IdleReport = run_json(&[
        "idle-sessions",
        "--json",
        "--sessions",
        "200",
        "--devices-per-user",
        "50",
        "--source-ips",
        "4",
        "--settle",
        "0.3",
        "--hold",
        "0.3",
        "--timeout",
        "200",
        "--signaling-bin",
        sig.to_str().expect("utf-8 path"),
    ]);
    assert_eq!(r.requested, 200);
    assert_eq!(r.opened, 200);
    assert_eq!(r.failed, 0, "{:?}", r.first_error);
    assert_eq!(r.warmup, WARMUP);
    let all = i64::try_from(200 + WARMUP).expect("small");
    assert_eq!(
        r.server_sessions_open, all,
        "node gauge counts every session"
    );
    assert_eq!(r.server_sessions_after_hold, all);
    assert_eq!(r.closed_early, 0);
    assert_eq!(r.users, (200 + WARMUP).div_ceil(50));
    assert_eq!(r.source_ips, 4);
    assert!(r.max_conns_per_ip >= (200 + WARMUP).div_ceil(4));
    assert!(r.rss_base_kib > 0 && r.rss_after_kib > 0);
    assert!(r.bytes_per_session.is_finite() && r.bytes_per_session >= 0.0);
}

#[test]
fn fleet_idle_sessions_two_nodes_two_workers() {
    let sig = service("peerlink-signaling");
    let r: MultiReport = run_json(&[
        "idle-sessions",
        "--json",
        "--nodes",
        "2",
        "--sessions",
        "101",
        "--devices-per-user",
        "40",
        "--source-ips",
        "3",
        "--settle",
        "0.3",
        "--hold",
        "0.3",
        "--timeout",
        "200",
        "--signaling-bin",
        sig.to_str().expect("utf-8 path"),
    ]);
    assert_eq!(r.nodes, 2);
    assert_eq!(r.per_node.len(), 2);
    assert_eq!(r.requested, 101);
    assert_eq!(r.opened, 101, "{:?}", r.first_error);
    assert_eq!(r.failed, 0);
    let split: Vec<usize> = r.per_node.iter().map(|n| n.requested).collect();
    assert_eq!(split, vec![51, 50]);
    let all = i64::try_from(101 + 2 * WARMUP).expect("small");
    assert_eq!(r.concurrent_sessions, all);
    assert_eq!(r.concurrent_after_hold, all);
    for n in &r.per_node {
        assert_eq!(n.opened, n.requested);
        assert_eq!(n.gauge, i64::try_from(n.opened + WARMUP).expect("small"));
        assert_eq!(n.closed_early, 0);
    }
}

fn check_invites(r: &InviteReport, sent: u64) {
    assert_eq!(r.sent, sent);
    assert_eq!(r.delivered, r.sent, "every invite delivered: {r:?}");
    assert_eq!(r.duplicates, 0);
    assert_eq!(r.invite_sent, r.sent);
    assert_eq!(r.call_ended, r.sent, "every call declined and ended");
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(r.latency.count, r.delivered);
    assert_eq!(r.latency_from_schedule.count, r.delivered);
    assert!(r.latency.ordered() && r.latency_from_schedule.ordered());
    assert!(r.sent_rate > 0.0);
}

#[test]
fn fleet_invites_one_node() {
    let sig = service("peerlink-signaling");
    let r: InviteReport = run_json(&[
        "invites",
        "--json",
        "--rate",
        "100",
        "--duration",
        "2s",
        "--pairs",
        "10",
        "--timeout",
        "200",
        "--signaling-bin",
        sig.to_str().expect("utf-8 path"),
    ]);
    assert_eq!(r.nodes, 1);
    check_invites(&r, 200);
}

#[test]
fn fleet_invites_two_nodes() {
    let sig = service("peerlink-signaling");
    let dir = service("peerlink-directory");
    let r: InviteReport = run_json(&[
        "invites",
        "--json",
        "--nodes",
        "2",
        "--rate",
        "50",
        "--duration",
        "2s",
        "--pairs",
        "5",
        "--timeout",
        "200",
        "--signaling-bin",
        sig.to_str().expect("utf-8 path"),
        "--directory-bin",
        dir.to_str().expect("utf-8 path"),
    ]);
    assert_eq!(r.nodes, 2);
    check_invites(&r, 100);
}

#[test]
fn fleet_logins_small() {
    let sig = service("peerlink-signaling");
    let r: LoginReport = run_json(&[
        "logins",
        "--json",
        "--concurrency",
        "2",
        "--duration",
        "500ms",
        "--rounds",
        "1",
        "--argon2-m-kib",
        "64",
        "--argon2-t",
        "1",
        "--timeout",
        "200",
        "--signaling-bin",
        sig.to_str().expect("utf-8 path"),
    ]);
    assert_eq!(r.cost.m_kib, 64);
    assert_eq!(r.raw_rates.len(), 1);
    assert_eq!(r.login_rates.len(), 1);
    assert!(r.logins_ok > 0 && r.logins_failed == 0, "{r:?}");
    assert_eq!(r.latency.count, r.logins_ok);
    assert!(r.latency.ordered());
    assert!(r.raw_rate > 0.0 && r.login_rate > 0.0);
    assert!((r.ratio - r.login_rate / r.raw_rate).abs() < 1e-9);
}

#[test]
fn fleet_directory_small() {
    let dir = service("peerlink-directory");
    let r: DirectoryReport = run_json(&[
        "directory",
        "--json",
        "--users",
        "1000",
        "--duration",
        "300ms",
        "--rounds",
        "1",
        "--concurrency",
        "4",
        "--batch-concurrency",
        "2",
        "--batch",
        "10",
        "--timeout",
        "200",
        "--directory-bin",
        dir.to_str().expect("utf-8 path"),
    ]);
    assert_eq!(r.floor_rates.len(), 1);
    assert!(r.floor_per_sec > 0.0);
    for (p, per_req) in [(&r.single, 1u64), (&r.batched, 10)] {
        assert!(p.requests_ok > 0, "{p:?}");
        assert_eq!(p.requests_failed, 0);
        assert_eq!(p.users_answered, p.requests_ok * per_req);
        assert_eq!(p.users_missing, 0, "every user is online");
        assert_eq!(p.latency.count, p.requests_ok);
        assert!(p.latency.ordered());
    }
}

#[test]
fn fleet_missing_binary_fails_clearly() {
    let (ok, _out, err) = loadtest(
        &[
            "invites",
            "--duration",
            "1s",
            "--signaling-bin",
            "/nonexistent/peerlink-signaling",
        ],
        Duration::from_secs(60),
    );
    assert!(!ok);
    assert!(err.contains("not found"), "{err}");
}

#[test]
fn fleet_engines_small() {
    let installed = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| e.path().join("bin/initdb").is_file());
    let redis = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("redis-server").is_file()));
    if !installed || !redis {
        eprintln!(
            "skipped: PostgreSQL or redis-server not installed (scripts/setup.sh installs both)"
        );
        return;
    }
    let sig = service("peerlink-signaling");
    let dir = service("peerlink-directory");
    let r: serde_json::Value = run_json(&[
        "engines",
        "--json",
        "--rounds",
        "1",
        "--rate",
        "50",
        "--duration",
        "1s",
        "--pairs",
        "4",
        "--message-duration",
        "1s",
        "--message-concurrency",
        "2",
        "--timeout",
        "200",
        "--signaling-bin",
        sig.to_str().expect("utf-8 path"),
        "--directory-bin",
        dir.to_str().expect("utf-8 path"),
    ]);
    for arm in ["invites_embedded", "invites_engines"] {
        let rounds = r[arm].as_array().expect("rounds");
        assert_eq!(rounds.len(), 1, "{r}");
        let inv: InviteReport =
            serde_json::from_value(rounds[0].clone()).expect("an invite report");
        assert_eq!(inv.nodes, 3);
        check_invites(&inv, 50);
    }
    for (arm, store) in [
        ("messages_sqlite", "sqlite"),
        ("messages_postgres", "postgres"),
    ] {
        let m = &r[arm][0];
        assert_eq!(m["store"], store, "{r}");
        assert!(m["acked"].as_u64().expect("acked") > 0, "{r}");
        assert_eq!(m["errors"], 0, "{r}");
        assert_eq!(m["latency"]["count"], m["acked"], "{r}");
    }
}
