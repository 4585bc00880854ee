//! The reference client's TURN path against real relays registered with a real directory: a
//! full relay answers Allocate with 300 Try Alternate naming another healthy relay, and the
//! client allocates there and relays through it.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use peerlink_sim::demo::turn_path::TurnEndpoint;
use peerlink_sim::turn::TurnConfig;
use peerlink_testkit::proc::{Service, workspace_bin};

const TOKEN: &str = "turn-redirect-test-token";
const STEP: Duration = Duration::from_secs(20);

fn free_udp() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}
fn free_tcp() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// `GET path` on `addr`: (status, body), or None when it does not answer.
fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

/// One counter of a relay's `/stats`.
fn stat(metrics: SocketAddr, name: &str) -> u64 {
    let (_, body) = get(metrics, "/stats").expect("relay /stats");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    if name == "allocations_active" {
        return v[name].as_u64().unwrap();
    }
    v["counters"][name].as_u64().unwrap()
}

fn wait(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + STEP;
    while Instant::now() < deadline {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}");
}

struct Relay {
    _proc: Service,
    turn: SocketAddr,
    metrics: SocketAddr,
}

fn start_relay(directory: &str, id: &str, extra: &[&str]) -> Relay {
    let (turn, metrics) = (free_udp(), free_tcp());
    let mut cmd = Command::new(workspace_bin("peerlink-relay"));
    cmd.args([
        "--listen",
        &turn.to_string(),
        "--metrics",
        &metrics.to_string(),
    ])
    .args([
        "--relay-ip",
        "127.0.0.1",
        "--workers",
        "1",
        "--user",
        "user:pass",
    ])
    .args(["--allow-peer", "127.0.0.0/8", "--relay-id", id])
    .args(["--directory", directory])
    .args(extra)
    .env("PEERLINK_CLUSTER_TOKEN", TOKEN)
    .stderr(Stdio::null());
    let proc = Service::start(id, cmd);
    wait("relay ready", || {
        get(metrics, "/readyz").is_some_and(|(s, _)| s == 200)
    });
    Relay {
        _proc: proc,
        turn,
        metrics,
    }
}

#[tokio::test(flavor = "current_thread")]
async fn the_client_follows_try_alternate_to_a_healthy_relay() {
    let mut cmd = Command::new(workspace_bin("peerlink-directory"));
    cmd.args(["--listen", "127.0.0.1:0", "--node-ttl", "3"])
        .env("PEERLINK_CLUSTER_TOKEN", TOKEN)
        .env("RUST_LOG", "warn");
    let mut directory = Service::start("peerlink-directory", cmd);
    let dir_addr: SocketAddr = directory.wait_for(STEP, |l| {
        l.strip_prefix("listening on ").map(|a| a.parse().unwrap())
    });
    let url = format!("http://{dir_addr}");
    let full = start_relay(&url, "relay-full", &["--max-allocations", "1"]);
    let alternate = start_relay(&url, "relay-alternate", &[]);

    let endpoint = |server| TurnEndpoint::bind(TurnConfig::new(server, "user", "pass"));
    let mut first = endpoint(full.turn).await.unwrap();
    first.allocate(STEP).await.unwrap();
    assert_eq!(first.client().config().server, full.turn);

    // The full relay redirects once it has read the directory's relay list (every 5 s);
    // until then it answers 508 and the allocation fails.
    let deadline = Instant::now() + STEP;
    let (mut second, allocation) = loop {
        let mut ep = endpoint(full.turn).await.unwrap();
        match ep.allocate(STEP).await {
            Ok(a) => break (ep, a),
            Err(e) if Instant::now() < deadline && e.to_string().contains("508") => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("allocation failed: {e}"),
        }
    };
    assert_eq!(second.client().config().server, alternate.turn);
    assert_eq!(allocation.relayed.ip(), alternate.turn.ip());
    wait("the redirect counted", || {
        stat(full.metrics, "allocations_redirected") == 1
    });
    wait("the allocation on the alternate", || {
        stat(alternate.metrics, "allocations_active") == 1
    });

    // Media flows through the alternate: a peer on loopback hears the client and answers.
    let peer = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let peer_addr = peer.local_addr().unwrap();
    second.open_channel(peer_addr, STEP).await.unwrap();
    second
        .send_to_peer(peer_addr, b"hello via the alternate")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = tokio::time::timeout(STEP, peer.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], b"hello via the alternate");
    assert_eq!(from, allocation.relayed);
    second.deallocate(STEP).await.unwrap();
    first.deallocate(STEP).await.unwrap();
}
