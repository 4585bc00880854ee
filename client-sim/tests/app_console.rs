//! The directory's fleet console in a real browser against a running local fleet
//! (`deploy/local/fleet.sh up --relays 2`): `tests/ui/console.mjs` drives Debian's chromium
//! through playwright-core. The page refuses without the operator token, loads with it, lists
//! both relays, its latency plot grows live while relayed traffic flows (two TURN allocations
//! on the second relay sending to each other), and the second relay shows as draining after
//! SIGTERM (its allocations held, so it stays in its drain). The screenshot is kept under the
//! target directory and its path printed. Needs python3, prometheus, node, chromium and
//! `tests/ui/node_modules` (`scripts/setup.sh` installs them; the test skips with a message
//! when chromium or the node modules are missing).
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use peerlink_api::signaling_client::HttpApi;
use peerlink_sim::demo::turn_path::TurnEndpoint;
use peerlink_sim::turn::TurnConfig;
use peerlink_testkit::proc::workspace_bin;
use serde_json::Value;

/// Bound of the whole test.
const TEST: Duration = Duration::from_secs(180);
/// Bound of one fleet.sh command.
const SCRIPT: Duration = Duration::from_secs(90);
/// Bound of every wait inside the browser script.
const BROWSER_WAIT_MS: u64 = 30_000;

fn root() -> PathBuf {
    peerlink_testkit::workspace::root()
}

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

/// A fleet from the script; `down` when dropped.
struct Fleet {
    dir: PathBuf,
    bins: PathBuf,
    doc: Value,
}

impl Fleet {
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("bash");
        cmd.arg(root().join("deploy/local/fleet.sh"))
            .args(args)
            .arg("--dir")
            .arg(&self.dir)
            .env("PEERLINK_BIN_DIR", &self.bins);
        cmd
    }

    fn up(args: &[&str]) -> Fleet {
        for name in ["peerlink-directory", "peerlink-signaling"] {
            workspace_bin(name);
        }
        let bins = workspace_bin("peerlink-relay")
            .parent()
            .unwrap()
            .to_path_buf();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "peerlink-console-test-{}-{nanos}",
            std::process::id()
        ));
        let mut fleet = Fleet {
            dir,
            bins,
            doc: Value::Null,
        };
        let mut all = vec!["up"];
        all.extend_from_slice(args);
        let out = run(fleet.command(&all), SCRIPT);
        assert!(
            out.status.success(),
            "fleet.sh up failed:\n{}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        fleet.doc = serde_json::from_str(text(&out.stdout).trim()).unwrap();
        fleet
    }

    fn pid_of(&self, name: &str) -> u32 {
        let out = run(self.command(&["status"]), SCRIPT);
        let status: Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
        status["processes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .and_then(|p| p["pid"].as_u64())
            .unwrap_or_else(|| panic!("no {name} in {status}")) as u32
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if self.dir.exists() {
            let _ = run(self.command(&["down"]), SCRIPT);
        }
    }
}

/// Relayed traffic on one relay: two allocations sending to each other's relayed address
/// every 2 ms until `stop`; counts datagrams sent.
async fn pump(
    server: SocketAddr,
    user: String,
    pass: String,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) {
    let limit = Duration::from_secs(10);
    let mut a = TurnEndpoint::bind(TurnConfig::new(server, user.clone(), pass.clone()))
        .await
        .unwrap();
    let mut b = TurnEndpoint::bind(TurnConfig::new(server, user, pass))
        .await
        .unwrap();
    let ra = a.allocate(limit).await.unwrap().relayed;
    let rb = b.allocate(limit).await.unwrap().relayed;
    a.open_channel(rb, limit).await.unwrap();
    b.open_channel(ra, limit).await.unwrap();
    let payload = [0x5au8; 160];
    let mut tick = tokio::time::interval(Duration::from_millis(2));
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        // A send error (the relay going away at the end) just ends the traffic.
        if a.send_to_peer(rb, &payload).await.is_err()
            || b.send_to_peer(ra, &payload).await.is_err()
        {
            break;
        }
        sent.fetch_add(2, Ordering::Relaxed);
    }
    // The allocations end with the endpoints (dropped here), after the drain was seen.
}

fn ui_ready(ui: &Path) -> Result<(), String> {
    if !Path::new("/usr/bin/chromium").exists() {
        return Err("no /usr/bin/chromium (scripts/setup.sh installs it)".into());
    }
    if !ui.join("node_modules/playwright-core").is_dir() {
        return Err(format!(
            "no {}/node_modules/playwright-core (scripts/setup.sh installs it)",
            ui.display()
        ));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_in_a_browser_shows_relays_live_latency_and_a_drain() {
    let started = Instant::now();
    let ui = root().join("tests/ui");
    if let Err(why) = ui_ready(&ui) {
        eprintln!("skipped: {why}");
        return;
    }
    let fleet = Fleet::up(&["--relays", "2"]);
    let doc = &fleet.doc;
    let console = doc["console"]
        .as_str()
        .unwrap_or_else(|| panic!("console in {doc}"))
        .to_owned();
    let token = doc["operator_token"].as_str().unwrap().to_owned();
    assert!(
        console.starts_with("http://127.0.0.1:") && console.ends_with("/console"),
        "{console}"
    );
    assert!(token.len() >= 32, "a fresh random token: {token}");

    // Plain HTTP first: 401 without the token, the page with it.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let r = http.get(&console).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = http.get(&console).bearer_auth(&token).send().await.unwrap();
    assert_eq!(r.status(), 200);

    // TURN credentials from signaling, for allocations on the relay to drain.
    let signaling = doc["signaling"][0].as_str().unwrap();
    let api = HttpApi::new(signaling, Duration::from_secs(20)).unwrap();
    let user = format!("console-{}", std::process::id());
    api.register(&user, "a-long-password").await.unwrap();
    let tokens = api.login(&user, "a-long-password").await.unwrap();
    let creds = api.turn_credentials(&tokens.access_token).await.unwrap();
    let drain_turn = doc["relays"][1]["turn"].as_str().unwrap().to_owned();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let traffic = tokio::spawn(pump(
        drain_turn.parse().unwrap(),
        creds.username.clone(),
        creds.password.clone(),
        stop.clone(),
        sent.clone(),
    ));

    let shots = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
        .join("console-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let shot = shots.join("console.png");
    let _ = std::fs::remove_file(&shot);

    let mut node = Command::new("node")
        .arg(ui.join("console.mjs"))
        .current_dir(&ui)
        .env("CONSOLE_URL", &console)
        .env("OPERATOR_TOKEN", &token)
        .env("RELAYS", "2")
        .env("DRAIN_TURN", &drain_turn)
        .env("SCREENSHOT", &shot)
        .env("TIMEOUT_MS", BROWSER_WAIT_MS.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("node");
    let node_pid = node.id();
    let relay_pid = fleet.pid_of("relay-2");
    // The browser script's lines, read on a thread of their own so that the time bound holds.
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stdout = node.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let mut ok = false;
    loop {
        let left = TEST.saturating_sub(started.elapsed());
        let line = match rx.recv_timeout(left) {
            Ok(l) => l,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let _ = Command::new("kill")
                    .args(["-KILL", &node_pid.to_string()])
                    .status();
                panic!("the browser script did not finish within {TEST:?}: {lines:#?}");
            }
            Err(_) => break,
        };
        println!("browser: {line}");
        if line == "DRAIN" {
            assert!(sent.load(Ordering::Relaxed) > 0, "traffic flows");
            // SIGTERM: the relay drains (not ready, new allocations refused) while ours live.
            let st = Command::new("kill")
                .args(["-TERM", &relay_pid.to_string()])
                .status()
                .unwrap();
            assert!(st.success());
        }
        ok |= line == "OK";
        lines.push(line);
    }
    let status = node.wait().unwrap();
    stop.store(true, Ordering::Relaxed);
    let _ = tokio::time::timeout(Duration::from_secs(10), traffic).await;
    assert!(
        status.success() && ok,
        "browser script failed ({status}): {lines:#?}"
    );
    for want in [
        "STEP refused without the token",
        "STEP refused with a wrong token",
        "STEP console shows 2 relays",
        "STEP relay ",
    ] {
        assert!(
            lines.iter().any(|l| l.starts_with(want)),
            "{want} in {lines:#?}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("STEP latency plot updated live")),
        "{lines:#?}"
    );
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    println!("console screenshot: {}", shot.display());
}
