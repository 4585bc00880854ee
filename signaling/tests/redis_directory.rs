//! A fleet on a Redis-backed directory, all real processes on loopback: `redis-server`
//! (`peerlink_testkit::redis`, no persistence), two `peerlink-directory` replicas on it, a
//! `peerlink-relay` and a signaling node both given both directory URLs, and a user connected
//! to the node. Redis loses its data (`FLUSHALL`, then SIGKILL and a restart): relay, node and
//! the user's presence are whole again within about one heartbeat interval. One directory is
//! SIGKILLed: relay and node keep heartbeating through the other, whose records stay fresh,
//! and a lookup and a relay choice (TURN credentials) work through it.
//!
//! Takes `peerlink-directory` and `peerlink-relay` from the same target directory (built when
//! missing). Skips, with one line, when `redis-server` is not installed.
// Test helpers outside #[test] fns: a panic is the failure report.
#![allow(clippy::unwrap_used)]

#[macro_use]
#[allow(unused_macros)]
mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::Node;
use peerlink_api::directory_client::DirectoryClient;
use peerlink_testkit::proc::{Service, workspace_bin};
use peerlink_testkit::redis::RedisServer;

const TOKEN: &str = "redis-fleet-cluster-token";
/// Directory node/relay TTL: heartbeats every TTL / 3 = 500 ms.
const NODE_TTL: &str = "1.5";
const HEARTBEAT: Duration = Duration::from_millis(500);
/// Slack for a loaded 2-core machine on top of the protocol's delays.
const MARGIN: Duration = Duration::from_secs(8);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Directory {
    proc: Service,
    url: String,
}

fn start_directory(store: &str) -> Directory {
    let mut cmd = Command::new(workspace_bin("peerlink-directory"));
    cmd.args(["--listen", "127.0.0.1:0", "--store", store])
        .args(["--node-ttl", NODE_TTL, "--presence-ttl", "3"])
        .env("PEERLINK_CLUSTER_TOKEN", TOKEN)
        .env("RUST_LOG", "warn");
    let mut proc = Service::start("peerlink-directory", cmd);
    let addr: SocketAddr = proc.wait_for(Duration::from_secs(60), |l| {
        l.strip_prefix("listening on ").and_then(|a| a.parse().ok())
    });
    Directory {
        proc,
        url: format!("http://{addr}"),
    }
}

/// A relay registering with `directories`; its TURN port.
fn start_relay(directories: &str) -> (Service, u16) {
    let port = free_udp_port();
    let mut cmd = Command::new(workspace_bin("peerlink-relay"));
    cmd.args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--relay-ip", "127.0.0.1", "--workers", "1", "--io", "epoll"])
        .args(["--user", "user:pass", "--allow-peer", "127.0.0.0/8"])
        .args(["--metrics", &format!("127.0.0.1:{}", free_port())])
        .args(["--directory", directories, "--cluster-token", TOKEN])
        .args(["--relay-id", "relay-1", "--region", "default"])
        .args(["--log-level", "warn"])
        .env_remove("PEERLINK_CLUSTER_TOKEN");
    (Service::start("peerlink-relay", cmd), port)
}

/// What the directory at `client` says about the fleet: relay healthy, node live, alice's
/// device listed with the node's URL.
async fn whole(client: &DirectoryClient) -> bool {
    let bound = Duration::from_secs(3);
    let relays = tokio::time::timeout(bound, client.list_relays()).await;
    let nodes = tokio::time::timeout(bound, client.list_nodes()).await;
    let alice = tokio::time::timeout(bound, client.lookup_user("alice")).await;
    let (Ok(Ok(relays)), Ok(Ok(nodes)), Ok(Ok(alice))) = (relays, nodes, alice) else {
        return false;
    };
    relays.iter().any(|r| r.relay_id == "relay-1" && r.healthy)
        && nodes.iter().any(|n| n.node_id == "node-1")
        && alice.devices.len() == 1
        && alice.devices[0].node_url.is_some()
}

/// Wait until `whole`, at most `bound`; the time it took.
async fn until_whole(client: &DirectoryClient, what: &str, bound: Duration) -> Duration {
    let start = Instant::now();
    while !whole(client).await {
        assert!(
            start.elapsed() < bound,
            "{what}: registries not whole after {bound:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

async fn metric(url: &str, name: &str) -> u64 {
    let text = tokio::time::timeout(Duration::from_secs(5), async {
        reqwest::get(format!("{url}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    })
    .await
    .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("peerlink_directory_{name} ")))
        .unwrap_or_else(|| panic!("{name} missing"))
        .parse()
        .unwrap()
}

/// Registrations seen by both directories (a replica counts what it served).
async fn registrations(dirs: &[&Directory]) -> u64 {
    let mut n = 0;
    for d in dirs {
        n += metric(&d.url, "node_registrations_total").await;
        n += metric(&d.url, "relay_registrations_total").await;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_data_loss_and_a_dead_directory_replica() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let store = format!("{}?prefix=fleet", redis.url(0));
    let a = start_directory(&store);
    let b = start_directory(&store);
    let both = format!("{},{}", a.url, b.url);
    let (_relay, turn_port) = start_relay(&both);
    let db_dir = tempfile::tempdir().unwrap();
    let node = Node::start(
        &db_dir.path().join("node.db"),
        &[
            "--directory",
            &both,
            "--node-id",
            "node-1",
            "--cluster-token",
            TOKEN,
        ],
    );
    let _alice = node.connect("alice", "phone").await;
    let via_a = DirectoryClient::new(&a.url, TOKEN).unwrap();
    let via_b = DirectoryClient::new(&b.url, TOKEN).unwrap();
    until_whole(&via_a, "start", Duration::from_secs(30)).await;
    until_whole(&via_b, "start, the other replica", Duration::from_secs(5)).await;

    // Redis forgets everything: heartbeats are answered "unknown", the loops register again
    // and the node republishes alice.
    let before = registrations(&[&a, &b]).await;
    assert_eq!(redis.command(&["FLUSHALL"]), "+OK");
    let took = until_whole(&via_b, "after FLUSHALL", HEARTBEAT + MARGIN).await;
    eprintln!("whole again {took:?} after FLUSHALL (heartbeat interval {HEARTBEAT:?})");
    assert!(
        registrations(&[&a, &b]).await >= before + 2,
        "node and relay registered again"
    );

    // Redis dies (SIGKILL) and comes back empty on the same port.
    let before = registrations(&[&a, &b]).await;
    redis.kill();
    let r = tokio::time::timeout(Duration::from_secs(10), via_a.list_nodes())
        .await
        .unwrap();
    let e = r.unwrap_err();
    assert_eq!(
        e.code(),
        Some(peerlink_api::directory::ErrorCode::StoreUnavailable),
        "{e}"
    );
    tokio::time::sleep(2 * HEARTBEAT).await;
    redis.run();
    let took = until_whole(&via_a, "after a Redis restart", HEARTBEAT + MARGIN).await;
    eprintln!("whole again {took:?} after the Redis restart");
    assert!(registrations(&[&a, &b]).await >= before + 2);

    // Directory A dies: everyone heartbeats through B; records stay fresh throughout.
    let Directory {
        proc: mut a_proc, ..
    } = a;
    a_proc.kill().unwrap();
    let watch = Instant::now();
    while watch.elapsed() < 6 * HEARTBEAT {
        assert!(
            whole(&via_b).await,
            "records went stale {:?} after directory A died",
            watch.elapsed()
        );
        let nodes = via_b.list_nodes().await.unwrap();
        assert!(
            nodes[0].last_heartbeat_age_ms < 1_500,
            "node heartbeat {} ms old",
            nodes[0].last_heartbeat_age_ms
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A relay choice through the node's directory client (TURN credentials name our relay)
    // and a lookup, both served by B.
    let token = node.token("bob").await;
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        reqwest::Client::new()
            .post(node.url("/v1/turn-credentials"))
            .bearer_auth(&token)
            .send(),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(r.status(), 200);
    let creds: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        creds["uris"],
        serde_json::json!([format!("turn:127.0.0.1:{turn_port}?transport=udp")]),
        "the relay the directory chose"
    );
    let both_client = DirectoryClient::new(&both, TOKEN).unwrap();
    let alice = both_client.lookup_user("alice").await.unwrap();
    assert_eq!(alice.devices.len(), 1);
    assert_eq!(both_client.base_url().as_str(), format!("{}/", b.url));
}
