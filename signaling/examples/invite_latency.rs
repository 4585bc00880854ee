//! Benchmark program (not a test): invite delivery latency (caller sends `invite` -> callee
//! receives `incoming_call`) through a signaling node on loopback at a paced rate.
//!
//! `cargo build --release -p peerlink-signaling --examples &&
//!  target/release/examples/invite_latency [INVITES_PER_SEC [SECONDS [PAIRS]]]`
//! (defaults 2000, 5, 20). Each callee declines at once, so calls do not pile up.

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const TOKEN_SECRET: &str = "invite-bench-token-secret-0123456789";

fn offer(seq: usize) -> Value {
    json!({
        "ice_ufrag": format!("u{seq:08}"),
        "ice_pwd": "abcdefghijklmnopqrstuvwx",
        "public_key": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
        "candidates": [{"foundation": "1", "component": 1, "transport": "udp", "priority": 2130706431u32,
                        "address": "203.0.113.10", "port": 40000, "type": "host"}],
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let rate: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(2000);
    let secs: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(5);
    let pairs: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(20);
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .and_then(|p| p.parent())
        .context("exe dir")?
        .join("peerlink-signaling");
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
            "--log",
            "warn",
        ])
        .args([
            "--msg-rate",
            "100000",
            "--msg-burst",
            "100000",
            "--max-conns-per-ip",
            "10000",
            "--outbound-queue",
            "4096",
        ])
        .arg("--db")
        .arg(tmp.path().join("db"))
        .env("PEERLINK_TOKEN_SECRET", TOKEN_SECRET)
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let http = {
        use std::io::BufRead;
        let mut found = None;
        for line in std::io::BufReader::new(stdout).lines() {
            if let Some(a) = line?.strip_prefix("http=") {
                found = Some(a.to_owned());
                break;
            }
        }
        found.context("no http= line")?
    };
    let r = run(&http, rate, secs, pairs).await;
    let _ = child.kill();
    let _ = child.wait();
    r
}

async fn login(http: &str, user: &str) -> anyhow::Result<String> {
    let c = reqwest::Client::new();
    let body = json!({"username": user, "password": "password-123"});
    c.post(format!("http://{http}/v1/register"))
        .json(&body)
        .send()
        .await?;
    let v: Value = c
        .post(format!("http://{http}/v1/login"))
        .json(&body)
        .send()
        .await?
        .json()
        .await?;
    Ok(v["access_token"].as_str().context("token")?.to_owned())
}

async fn run(http: &str, rate: usize, secs: usize, pairs: usize) -> anyhow::Result<()> {
    let total = rate * secs;
    let sent_at: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; total]));
    let lat: Arc<Mutex<Vec<u64>>> = Arc::new(Mutex::new(Vec::with_capacity(total)));
    let mut tasks = Vec::new();
    let per_pair = total / pairs;
    let interval = Duration::from_secs_f64(pairs as f64 / rate as f64);
    for p in 0..pairs {
        let (caller, callee) = (format!("caller{p}"), format!("callee{p}"));
        let (ct, et) = (login(http, &caller).await?, login(http, &callee).await?);
        let (mut cws, _) =
            tokio_tungstenite::connect_async(format!("ws://{http}/v1/ws?token={ct}&device=d"))
                .await?;
        let (mut ews, _) =
            tokio_tungstenite::connect_async(format!("ws://{http}/v1/ws?token={et}&device=d"))
                .await?;
        cws.next().await; // welcome
        ews.next().await;
        let (lat2, sent2) = (lat.clone(), sent_at.clone());
        tasks.push(tokio::spawn(async move {
            // Callee: record the delivery time, decline at once.
            let mut got = 0;
            while got < per_pair {
                let Ok(Some(Ok(Message::Text(t)))) =
                    tokio::time::timeout(Duration::from_secs(10), ews.next()).await
                else {
                    break;
                };
                let now = Instant::now();
                let v: Value = serde_json::from_str(t.as_str()).unwrap_or_default();
                if v["type"] != "incoming_call" {
                    continue;
                }
                got += 1;
                let seq: usize = v["offer"]["ice_ufrag"]
                    .as_str()
                    .and_then(|u| u[1..].parse().ok())
                    .unwrap_or(usize::MAX);
                let at = sent2
                    .lock()
                    .map(|s| s.get(seq).copied().flatten())
                    .ok()
                    .flatten();
                if let (Some(at), Ok(mut l)) = (at, lat2.lock()) {
                    l.push(u64::try_from(now.duration_since(at).as_micros()).unwrap_or(u64::MAX));
                }
                let _ = ews
                    .send(Message::Text(
                        json!({"type": "decline", "call_id": v["call_id"]})
                            .to_string()
                            .into(),
                    ))
                    .await;
            }
        }));
        let sent3 = sent_at.clone();
        tasks.push(tokio::spawn(async move {
            let (mut tx, mut rx) = cws.split();
            let drain = tokio::spawn(async move { while let Some(Ok(_)) = rx.next().await {} });
            let mut tick = tokio::time::interval(interval);
            for k in 0..per_pair {
                tick.tick().await;
                let seq = p * per_pair + k;
                if let Ok(mut s) = sent3.lock() {
                    s[seq] = Some(Instant::now());
                }
                let m = json!({"type": "invite", "to": format!("callee{p}"), "offer": offer(seq)});
                if tx.send(Message::Text(m.to_string().into())).await.is_err() {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            drain.abort();
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let mut l = lat.lock().map(|l| l.clone()).unwrap_or_default();
    l.sort_unstable();
    if l.is_empty() {
        bail!("no invite delivered");
    }
    let pct = |p: f64| l[((l.len() as f64 * p) as usize).min(l.len() - 1)] as f64 / 1000.0;
    println!(
        "invites: {} of {} delivered at {} /s over {} pairs",
        l.len(),
        pairs * per_pair,
        rate,
        pairs
    );
    println!(
        "caller send -> callee receive: p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
        pct(0.5),
        pct(0.99),
        pct(0.999),
        pct(1.0)
    );
    Ok(())
}
