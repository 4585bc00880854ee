//! Benchmark program (not a test): memory per idle WebSocket session of a signaling node.
//!
//! Starts the `peerlink-signaling` binary (the release build if present, else debug), opens
//! N authenticated idle sessions from several loopback source addresses, and prints the
//! node's resident memory growth per session (VmRSS from /proc, Linux only).
//!
//! `cargo build --release -p peerlink-signaling --examples &&
//!  target/release/examples/idle_sessions [SESSIONS [NODE FLAGS..]]` (default 5000).

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use tokio_tungstenite::client_async;

const TOKEN_SECRET: &str = "idle-bench-token-secret-0123456789";

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(5000);
    let exe = std::env::current_exe()?;
    let dir = exe.parent().and_then(|p| p.parent()).context("exe dir")?;
    let bin = dir.join("peerlink-signaling");
    if !bin.exists() {
        bail!("{} not found: build the binary first", bin.display());
    }
    let tmp = tempfile::tempdir()?;
    let mut child = Command::new(&bin)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--no-stun",
            "--argon2-m-kib",
            "64",
            "--argon2-t",
            "1",
        ])
        .args([
            "--log",
            "warn",
            "--max-conns-per-ip",
            "100000",
            "--idle-timeout",
            "1h",
        ])
        .args(std::env::args().skip(2))
        .arg("--db")
        .arg(tmp.path().join("db"))
        .env("PEERLINK_TOKEN_SECRET", TOKEN_SECRET)
        .stdout(Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let stdout = child.stdout.take().context("stdout")?;
    let mut http = None;
    for line in std::io::BufReader::new(stdout).lines() {
        if let Some(a) = line?.strip_prefix("http=") {
            http = Some(a.to_owned());
            break;
        }
    }
    let result = run(n, pid, &http.context("no http= line")?).await;
    let _ = child.kill();
    let _ = child.wait();
    result
}

async fn run(n: usize, pid: u32, http: &str) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let users = 64;
    let mut tokens = Vec::new();
    for u in 0..users {
        let body = serde_json::json!({"username": format!("idle{u}"), "password": "password-123"});
        client
            .post(format!("http://{http}/v1/register"))
            .json(&body)
            .send()
            .await?;
        let v: serde_json::Value = client
            .post(format!("http://{http}/v1/login"))
            .json(&body)
            .send()
            .await?
            .json()
            .await?;
        tokens.push(v["access_token"].as_str().context("token")?.to_owned());
    }
    let addr: std::net::SocketAddr = http.parse()?;
    let mut conns = Vec::with_capacity(n);
    let connect = |i: usize| {
        let token = tokens[i % users].clone();
        async move {
            // Spread source addresses over 127.0.0.0/8 to stay clear of port exhaustion.
            let sock = tokio::net::TcpSocket::new_v4()?;
            sock.bind(std::net::SocketAddr::from((
                [127, 1, (i / 250) as u8, (i % 250) as u8 + 1],
                0,
            )))?;
            let tcp = sock.connect(addr).await?;
            let url = format!("ws://{addr}/v1/ws?token={token}&device=d{}", i / users);
            let (mut ws, _) = client_async(url, tcp).await?;
            // Wait for the welcome so the session is fully set up.
            let _ = tokio::time::timeout(Duration::from_secs(30), ws.next()).await?;
            anyhow::Ok(ws)
        }
    };
    for i in 0..100 {
        conns.push(connect(i).await?);
    }
    let base = rss_kib(pid)?;
    let start = Instant::now();
    for i in 100..n + 100 {
        conns.push(connect(i).await?);
    }
    // Let allocator and runtime settle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(pid)?;
    let per = (after.saturating_sub(base)) as f64 * 1024.0 / n as f64;
    println!(
        "sessions: {n} (+100 warm-up), opened in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    println!("node RSS: {base} KiB -> {after} KiB");
    println!("per idle session: {per:.0} bytes");
    println!(
        "projected for 100,000 sessions: {:.0} MiB",
        per * 100_000.0 / 1_048_576.0
    );
    drop(conns);
    Ok(())
}
