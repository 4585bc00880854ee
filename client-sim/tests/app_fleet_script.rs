//! `deploy/local/fleet.sh` end to end: it starts a multi-node fleet of the workspace's binaries
//! and a real Prometheus; `peerlink-sim demo --server` makes calls and relayed media through
//! every signaling node and every relay of it; Prometheus's HTTP API then answers the p99 of
//! the relays' forwarding latency histogram, `up` for every target and every query of the
//! Grafana dashboard (`deploy/grafana/peerlink.json`); the signaling nodes
//! share one store; `down` leaves no process behind. A second case adds `--engines`
//! (PostgreSQL as the signaling nodes' store, redis for the directory). Needs python3, prometheus, PostgreSQL and redis-server
//! (`scripts/setup.sh` installs them); not root.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use peerlink_api::signaling_client::HttpApi;
use peerlink_testkit::proc::workspace_bin;
use serde_json::Value;

/// Bound on a whole test, from `up` to `down` (under nextest's backstop, so that the drop
/// guard still runs `down` when a step hangs).
const TEST: Duration = Duration::from_secs(150);
/// Bound on one `fleet.sh` command.
const SCRIPT: Duration = Duration::from_secs(90);
/// Bound on one demo run.
const DEMO: Duration = Duration::from_secs(90);
/// Bound on waiting for Prometheus to have scraped what the test needs.
const SCRAPE: Duration = Duration::from_secs(30);

fn script() -> PathBuf {
    peerlink_testkit::workspace::root().join("deploy/local/fleet.sh")
}

/// The directory of the service binaries (built when missing).
fn bin_dir() -> PathBuf {
    for name in ["peerlink-directory", "peerlink-signaling"] {
        workspace_bin(name);
    }
    workspace_bin("peerlink-relay")
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A state directory of the test's own, under the system temp dir (which PostgreSQL's user
/// can traverse when the test runs as root).
fn state_dir(name: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    std::env::temp_dir().join(format!(
        "peerlink-fleet-test-{name}-{}-{nanos}",
        std::process::id()
    ))
}

/// Run `cmd` to its end within `limit` (killed after), output captured.
fn run(mut cmd: Command, limit: Duration) -> Output {
    let shown = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {shown}: {e}"));
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap_or_else(|e| panic!("{shown}: {e}")),
        Err(_) => {
            // The child is ours: end it so that the test does not wait on it forever.
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("{shown} did not finish within {limit:?}");
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A fleet started by the script; `down` runs when it is dropped, also when the test fails.
struct FleetScript {
    dir: PathBuf,
    bins: PathBuf,
    fleet: Value,
    /// End of the test's time.
    deadline: Instant,
}

impl FleetScript {
    fn command(bins: &Path, args: &[&str], dir: &Path) -> Command {
        let mut cmd = Command::new("bash");
        cmd.arg(script())
            .args(args)
            .arg("--dir")
            .arg(dir)
            .env("PEERLINK_BIN_DIR", bins);
        cmd
    }

    fn up(name: &str, args: &[&str]) -> FleetScript {
        let bins = bin_dir();
        let dir = state_dir(name);
        let mut all = vec!["up"];
        all.extend_from_slice(args);
        let mut guard = FleetScript {
            dir: dir.clone(),
            bins: bins.clone(),
            fleet: Value::Null,
            deadline: Instant::now() + TEST,
        };
        let out = run(Self::command(&bins, &all, &dir), guard.left(SCRIPT));
        assert!(
            out.status.success(),
            "fleet.sh {all:?} failed ({}):\n{}{}",
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        );
        let stdout = text(&out.stdout);
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.len(), 1, "one JSON line on stdout: {stdout}");
        guard.fleet = serde_json::from_str(lines[0]).unwrap();
        guard
    }

    /// `limit`, or less when the test's time ends sooner.
    fn left(&self, limit: Duration) -> Duration {
        let left = self.deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "the test ran out of its {TEST:?}");
        limit.min(left)
    }

    fn run(&self, args: &[&str]) -> Output {
        run(
            Self::command(&self.bins, args, &self.dir),
            self.left(SCRIPT),
        )
    }

    fn status(&self) -> (bool, Value) {
        let out = self.run(&["status"]);
        (
            out.status.success(),
            serde_json::from_str(text(&out.stdout).trim())
                .unwrap_or_else(|e| panic!("status JSON: {e}: {}", text(&out.stdout))),
        )
    }

    fn strs(&self, key: &str) -> Vec<String> {
        self.fleet[key]
            .as_array()
            .unwrap_or_else(|| panic!("{key} in {}", self.fleet))
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect()
    }

    fn relays(&self) -> Vec<(String, String)> {
        self.fleet["relays"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let metrics = r["metrics"].as_str().unwrap();
                let addr = metrics
                    .strip_prefix("http://")
                    .and_then(|m| m.strip_suffix("/metrics"))
                    .unwrap_or_else(|| panic!("metrics URL {metrics}"));
                (r["turn"].as_str().unwrap().to_owned(), addr.to_owned())
            })
            .collect()
    }

    fn prometheus(&self) -> String {
        self.fleet["prometheus"]
            .as_str()
            .unwrap_or_else(|| panic!("a Prometheus in {}", self.fleet))
            .to_owned()
    }
}

impl Drop for FleetScript {
    fn drop(&mut self) {
        // Cleanup gets its own time, also after the test's ran out.
        if self.dir.exists() {
            let _ = run(Self::command(&self.bins, &["down"], &self.dir), SCRIPT);
        }
    }
}

/// Whether the process `pid` runs: it exists and has not exited (an exited process stays a
/// zombie until whoever adopted it reaps it).
fn exists(pid: u64) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which ends with the last ')'.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    state != Some("Z")
}

/// `peerlink-sim demo` against a signaling node of the fleet, its fixed-relay media through
/// `relay`; the parsed report.
fn demo(fleet: &FleetScript, server: &str, relay: &str, metrics: &str, out: &Path) -> Value {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_peerlink-sim"));
    cmd.args(["--json", "--server", server, "demo", "--media-seconds", "2"])
        .args(["--relay", relay, "--relay-metrics", metrics])
        .arg("--out")
        .arg(out)
        .env("PEERLINK_SIM_STATE", out.join("state.json"));
    let o = run(cmd, fleet.left(DEMO));
    assert!(
        o.status.success(),
        "demo via {server} / {relay} failed ({}):\n{}",
        o.status,
        text(&o.stderr)
    );
    serde_json::from_str(text(&o.stdout).trim()).unwrap()
}

/// One instant query against Prometheus's HTTP API: the result vector.
async fn query(prometheus: &str, q: &str) -> Vec<Value> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let r: Value = client
        .get(format!("{prometheus}/api/v1/query"))
        .query(&[("query", q)])
        .send()
        .await
        .unwrap_or_else(|e| panic!("querying {q}: {e}"))
        .json()
        .await
        .unwrap();
    assert_eq!(r["status"], "success", "{q}: {r}");
    r["data"]["result"].as_array().cloned().unwrap_or_default()
}

fn sample_value(v: &Value) -> f64 {
    v["value"][1].as_str().unwrap().parse().unwrap()
}

/// Query until `ok` accepts the result, within [`SCRAPE`]; the accepted result.
async fn query_until(fleet: &FleetScript, q: &str, ok: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let prometheus = fleet.prometheus();
    let prometheus = prometheus.as_str();
    let deadline = Instant::now() + fleet.left(SCRAPE);
    loop {
        let r = query(prometheus, q).await;
        if ok(&r) {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "{q} still answers {r:?} after {SCRAPE:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Every scraped target is up, and there is one per service.
async fn all_targets_up(fleet: &FleetScript) {
    let want = fleet.strs("signaling").len() + fleet.strs("directory").len() + fleet.relays().len();
    let up = query_until(fleet, "up", |r| {
        r.len() == want && r.iter().all(|s| sample_value(s) == 1.0)
    })
    .await;
    let jobs: Vec<&str> = up
        .iter()
        .map(|s| s["metric"]["job"].as_str().unwrap())
        .collect();
    for job in ["peerlink-directory", "peerlink-signaling", "peerlink-relay"] {
        assert!(jobs.contains(&job), "no {job} target in {up:?}");
    }
}

/// The Grafana dashboard `deploy/grafana/peerlink.json`: a dashboard with a Prometheus
/// datasource variable that every panel uses, and every PromQL expression of it, with the
/// dashboard's variables filled in as Grafana would (`$__rate_interval` as 1m), answers data
/// from the fleet's Prometheus.
async fn dashboard_queries_answer(fleet: &FleetScript) {
    let path = peerlink_testkit::workspace::root().join("deploy/grafana/peerlink.json");
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert!(
        dash["uid"].is_string() && dash["title"].is_string(),
        "{path:?}"
    );
    assert!(dash["schemaVersion"].as_u64().unwrap() >= 30);
    let vars = dash["templating"]["list"].as_array().unwrap();
    let ds = vars
        .iter()
        .find(|v| v["type"] == "datasource")
        .unwrap_or_else(|| panic!("no datasource variable in {vars:?}"));
    assert_eq!(ds["query"], "prometheus");
    let ds_ref = format!("${{{}}}", ds["name"].as_str().unwrap());
    // The other variables' values, as Grafana substitutes them.
    let mut subst: Vec<(String, String)> = vec![("$__rate_interval".into(), "1m".into())];
    for v in vars.iter().filter(|v| v["type"] == "custom") {
        let name = v["name"].as_str().unwrap();
        subst.push((
            format!("${name}"),
            v["current"]["value"].as_str().unwrap().to_owned(),
        ));
    }
    let mut exprs = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(
            p["datasource"]["uid"],
            ds_ref.as_str(),
            "panel {}",
            p["title"]
        );
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
        for t in targets {
            assert_eq!(t["datasource"]["uid"], ds_ref.as_str());
            let mut e = t["expr"].as_str().unwrap().to_owned();
            for (k, v) in &subst {
                e = e.replace(k.as_str(), v);
            }
            assert!(!e.contains('$'), "unsubstituted variable in {e}");
            exprs.push((p["title"].as_str().unwrap().to_owned(), e));
        }
    }
    assert!(exprs.len() >= 15, "{exprs:?}");
    for want in [
        "peerlink_relay_forward_latency_seconds_bucket",
        "peerlink_relay_forwarded_packets_total",
        "peerlink_relay_allocations_active",
        "peerlink_relay_auth_failures_total",
        "peerlink_signaling_sessions_open",
        "peerlink_signaling_calls_total",
        "peerlink_signaling_store_operation_duration_seconds_bucket",
    ] {
        assert!(
            exprs.iter().any(|(_, e)| e.contains(want)),
            "no panel over {want}"
        );
    }
    for (title, e) in &exprs {
        let r = query_until(fleet, e, |r| !r.is_empty()).await;
        println!("dashboard: {title}: {e} -> {} series", r.len());
    }
}

/// `down` stops every process `status` listed and removes the state directory; a second
/// `down` is a no-op.
fn down_leaves_nothing(fleet: FleetScript) {
    let (_, status) = fleet.status();
    let pids: Vec<u64> = status["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["pid"].as_u64().unwrap())
        .collect();
    assert!(pids.iter().all(|p| exists(*p)), "{status}");
    let out = fleet.run(&["down"]);
    assert!(out.status.success(), "down: {}", text(&out.stderr));
    let gone = |pids: &[u64]| pids.iter().all(|p| !exists(*p));
    assert!(gone(&pids), "still running after down: {pids:?}");
    assert!(!fleet.dir.exists(), "{} left behind", fleet.dir.display());
    let again = fleet.run(&["down"]);
    assert!(
        again.status.success(),
        "second down: {}",
        text(&again.stderr)
    );
}

/// An account registered on the first signaling node logs in on the second (one store).
async fn shared_accounts(signaling: &[String]) {
    let a = HttpApi::new(&signaling[0], Duration::from_secs(20)).unwrap();
    let b = HttpApi::new(&signaling[1], Duration::from_secs(20)).unwrap();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let user = format!("shared-{}-{nanos}", std::process::id());
    a.register(&user, "a-long-password").await.unwrap();
    b.login(&user, "a-long-password")
        .await
        .unwrap_or_else(|e| panic!("login on the second node: {e}"));
    assert!(b.login(&user, "a-wrong-password").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_script_two_signaling_nodes_two_relays_and_prometheus() {
    let fleet = FleetScript::up("plain", &["--signaling", "2", "--relays", "2"]);
    let f = &fleet.fleet;
    let signaling = fleet.strs("signaling");
    let relays = fleet.relays();
    assert_eq!(signaling.len(), 2, "{f}");
    assert_eq!(fleet.strs("directory").len(), 1, "{f}");
    assert_eq!(relays.len(), 2, "{f}");
    assert!(f["postgres"].is_null() && f["redis"].is_null(), "{f}");
    for url in signaling.iter().chain(&fleet.strs("directory")) {
        assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    }

    // Bad arguments are refused before anything starts (exit 2); a directory that is not a
    // fleet's state is never stopped or removed.
    let bad = fleet.run(&["up", "--relays", "0"]);
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad.stderr));
    let foreign = tempfile::tempdir().unwrap();
    std::fs::write(foreign.path().join("keep"), "mine").unwrap();
    let out = run(
        FleetScript::command(&fleet.bins, &["down"], foreign.path()),
        fleet.left(SCRIPT),
    );
    assert!(
        !out.status.success(),
        "down on a foreign directory succeeded"
    );
    assert!(foreign.path().join("keep").is_file());

    // A second `up` on the same state is refused, and the running fleet is untouched.
    let second = fleet.run(&["up"]);
    assert!(!second.status.success());
    assert!(
        text(&second.stderr).contains("already running"),
        "{}",
        text(&second.stderr)
    );
    let (healthy, status) = fleet.status();
    assert!(healthy, "{status}");
    let procs = status["processes"].as_array().unwrap();
    // Directory, 2 relays, 2 signaling nodes, Prometheus.
    assert_eq!(procs.len(), 6, "{status}");
    assert!(
        procs
            .iter()
            .all(|p| p["running"] == true && p["healthy"] == true),
        "{status}"
    );

    // The nodes share one SQLite store: an account registered on one logs in on the other.
    shared_accounts(&signaling).await;
    assert!(fleet.dir.join("signaling.db").is_file());

    // A demo through each signaling node, its relayed media through a relay of its own.
    let out = tempfile::tempdir().unwrap();
    for (i, (server, (turn, metrics))) in signaling.iter().zip(&relays).enumerate() {
        let dir = out.path().join(format!("demo-{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let r = demo(&fleet, server, turn, metrics, &dir);
        assert_eq!(r["relay"].as_str(), Some(turn.as_str()), "{r}");
        let relayed = &r["call_relay_only"][0];
        assert_eq!(relayed["path"], "relay", "{relayed}");
        let m = &r["media"]["alice_to_bob"];
        assert!(m["packets_received"].as_u64().unwrap() >= 50, "{m}");
        assert!(
            r["relay_stats"]["latency_total_us"]["count"]
                .as_u64()
                .unwrap()
                >= 100
        );
    }

    all_targets_up(&fleet).await;
    // Both relays forwarded, and Prometheus has their histograms.
    let per_relay = query_until(
        &fleet,
        "sum by (instance) (peerlink_relay_forward_latency_seconds_count)",
        |r| r.len() == 2 && r.iter().all(|s| sample_value(s) >= 100.0),
    )
    .await;
    for (_, metrics) in &relays {
        assert!(
            per_relay
                .iter()
                .any(|s| s["metric"]["instance"] == *metrics),
            "{metrics} in {per_relay:?}"
        );
    }
    let q = "histogram_quantile(0.99, sum by (le) (rate(peerlink_relay_forward_latency_seconds_bucket[30s])))";
    let p99 = query_until(&fleet, q, |r| {
        r.len() == 1 && sample_value(&r[0]).is_finite() && sample_value(&r[0]) > 0.0
    })
    .await;
    let p99 = sample_value(&p99[0]);
    assert!(p99 > 0.0 && p99 < 1.0, "p99 {p99} s");
    // The recording rule of deploy/prometheus/rules runs in the fleet's Prometheus too.
    query_until(&fleet, "peerlink:relay_forward_latency_seconds:p99", |r| {
        r.len() == 2
    })
    .await;
    println!(
        "fleet p99 forwarding latency over 30 s: {:.1} µs",
        p99 * 1e6
    );
    dashboard_queries_answer(&fleet).await;

    down_leaves_nothing(fleet);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_script_with_engines_shares_postgres_between_signaling_nodes() {
    let fleet = FleetScript::up(
        "engines",
        &[
            "--engines",
            "--signaling",
            "2",
            "--relays",
            "1",
            "--directories",
            "2",
        ],
    );
    let f = &fleet.fleet;
    let pg = f["postgres"].as_str().unwrap_or_else(|| panic!("{f}"));
    let redis = f["redis"].as_str().unwrap_or_else(|| panic!("{f}"));
    assert!(
        pg.starts_with("postgres://") && pg.contains("@127.0.0.1:"),
        "{pg}"
    );
    assert!(redis.starts_with("redis://127.0.0.1:"), "{redis}");
    let (healthy, status) = fleet.status();
    assert!(healthy, "{status}");
    let names: Vec<&str> = status["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(fleet.strs("directory").len(), 2, "{f}");
    for want in [
        "postgres",
        "redis",
        "directory-1",
        "directory-2",
        "relay-1",
        "signaling-1",
        "signaling-2",
    ] {
        assert!(names.contains(&want), "{want} in {names:?}");
    }

    // PostgreSQL behind both nodes (no SQLite file): an account registered on one logs in on
    // the other.
    let signaling = fleet.strs("signaling");
    shared_accounts(&signaling).await;
    assert!(!fleet.dir.join("signaling.db").exists());

    let (turn, metrics) = fleet.relays()[0].clone();
    let out = tempfile::tempdir().unwrap();
    let r = demo(&fleet, &signaling[1], &turn, &metrics, out.path());
    assert_eq!(r["call_relay_only"][0]["path"], "relay", "{r}");
    all_targets_up(&fleet).await;

    down_leaves_nothing(fleet);
}
