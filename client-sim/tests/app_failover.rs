//! Failover of a fleet on engines, all real processes on loopback: PostgreSQL
//! (`peerlink_testkit::postgres`, fsync on) holding accounts and messages, Redis
//! (`peerlink_testkit::redis`) holding the directory's state and the shared login throttle, two
//! `peerlink-directory` replicas on that Redis, two `peerlink-relay`s and three
//! `peerlink-signaling` nodes, each started with its documented defaults plus the store flags
//! and both directory URLs (as `deploy/local/fleet.sh up --engines` does).
//!
//! During calls and chat, one piece at a time dies by SIGKILL: a directory replica and a
//! signaling node (the callee's: its clients reconnect to another node and the call goes on),
//! a relay (the relayed call re-establishes through the other one), Redis and PostgreSQL
//! (restarted: clients get error frames meanwhile, not hangs, and every message the sender got
//! an ack for is delivered exactly once). Nothing that survives is restarted.
//!
//! Takes the service binaries from the same target directory (built when missing). Skips, with
//! one line, when the PostgreSQL server binaries or `redis-server` are not installed
//! (`scripts/setup.sh` installs both).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use peerlink_api::signaling::{ClientMsg, ErrorCode, ServerMsg};
use peerlink_api::signaling_client::{HttpApi, SignalError, SignalSession};
use peerlink_sim::call::{self, CallEvent, CallOptions, CallReport};
use peerlink_sim::fleet::relay_stats;
use peerlink_testkit::postgres::PgServer;
use peerlink_testkit::proc::{Service, workspace_bin};
use peerlink_testkit::redis::RedisServer;
use tokio::sync::{mpsc, watch};

/// Bound on a whole test.
const TEST: Duration = Duration::from_secs(150);
/// Bound on one service's start.
const START: Duration = Duration::from_secs(60);
/// How long a call or a message may take to come back after a piece of the fleet died.
const RECOVERY: Duration = Duration::from_secs(3);
const PASSWORD: &str = "failover-password-1";
const TOKEN_SECRET: &str = "failover-token-secret-0123456789abcdef";
const TURN_SECRET: &str = "failover-turn-secret-0123456789";
const CLUSTER_TOKEN: &str = "failover-cluster-token";

fn free_port(udp: bool) -> u16 {
    if udp {
        std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    } else {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }
}

/// Whether Debian's PostgreSQL server binaries are installed (what `PgServer` runs).
fn postgres_installed() -> bool {
    std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| e.path().join("bin/initdb").is_file() && e.path().join("bin/postgres").is_file())
}

/// A service of the fleet: its process (None once killed) and log.
struct Proc {
    proc: Option<Service>,
    log: std::path::PathBuf,
}

impl Proc {
    fn start(name: &str, mut cmd: Command, dir: &std::path::Path) -> Proc {
        let log = dir.join(format!("{name}.log"));
        cmd.stderr(std::fs::File::create(&log).unwrap());
        Proc {
            proc: Some(Service::start(name, cmd)),
            log,
        }
    }

    fn service(&mut self) -> &mut Service {
        self.proc.as_mut().expect("the service runs")
    }

    /// SIGKILL (kill -9) and reap it.
    fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    fn log_tail(&self) -> String {
        let t = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

struct Relay {
    proc: Proc,
    metrics: SocketAddr,
}

struct Node {
    proc: Proc,
    url: String,
    stun: SocketAddr,
}

/// The fleet on engines.
struct EngineFleet {
    pg: PgServer,
    redis: RedisServer,
    directories: Vec<(Proc, String)>,
    relays: Vec<Relay>,
    nodes: Vec<Node>,
    dir: tempfile::TempDir,
}

impl EngineFleet {
    /// PostgreSQL, Redis, 2 directory replicas, 2 relays and 3 signaling nodes; None (after
    /// one line) when an engine is not installed.
    async fn start() -> Option<EngineFleet> {
        if !postgres_installed() {
            eprintln!(
                "skipped: PostgreSQL server binaries not installed (scripts/setup.sh installs postgresql)"
            );
            return None;
        }
        let redis = RedisServer::start()?;
        let dir = tempfile::tempdir().unwrap();
        let (pg, directories) = tokio::task::block_in_place(|| {
            let pg = PgServer::start();
            let directories: Vec<(Proc, String)> = (0..2)
                .map(|i| {
                    let mut cmd = Command::new(workspace_bin("peerlink-directory"));
                    cmd.args(["--listen", "127.0.0.1:0", "--store", &redis.url(0)])
                        .env("PEERLINK_CLUSTER_TOKEN", CLUSTER_TOKEN)
                        .env("RUST_LOG", "warn");
                    let mut p = Proc::start(&format!("directory-{i}"), cmd, dir.path());
                    let addr: SocketAddr = p.service().wait_for(START, |l| {
                        l.strip_prefix("listening on ").and_then(|a| a.parse().ok())
                    });
                    (p, format!("http://{addr}"))
                })
                .collect();
            (pg, directories)
        });
        let mut fleet = EngineFleet {
            pg,
            redis,
            directories,
            relays: Vec::new(),
            nodes: Vec::new(),
            dir,
        };
        let dirs = fleet.directory_list();
        tokio::task::block_in_place(|| {
            for i in 0..2 {
                let turn = SocketAddr::from(([127, 0, 0, 1], free_port(true)));
                let metrics = SocketAddr::from(([127, 0, 0, 1], free_port(false)));
                let mut cmd = Command::new(workspace_bin("peerlink-relay"));
                cmd.args(["--listen", &turn.to_string()])
                    .args(["--metrics", &metrics.to_string()])
                    .args(["--allow-peer", "127.0.0.0/8", "--directory", &dirs])
                    .env("PEERLINK_RELAY_AUTH_SECRET", TURN_SECRET)
                    .env("PEERLINK_CLUSTER_TOKEN", CLUSTER_TOKEN);
                let proc = Proc::start(&format!("relay-{i}"), cmd, fleet.dir.path());
                fleet.relays.push(Relay { proc, metrics });
            }
            let store = fleet.pg.create_database();
            for i in 0..3 {
                let mut cmd = Command::new(workspace_bin("peerlink-signaling"));
                cmd.args(["--listen", "127.0.0.1:0", "--stun", "127.0.0.1:0"])
                    .args(["--directory", &dirs])
                    .args(["--node-id", &format!("signaling-{i}")])
                    .args(["--throttle-store", &fleet.redis.url(1)])
                    .env("PEERLINK_STORE", &store)
                    .env("PEERLINK_TOKEN_SECRET", TOKEN_SECRET)
                    .env("PEERLINK_TURN_SECRET", TURN_SECRET)
                    .env("PEERLINK_CLUSTER_TOKEN", CLUSTER_TOKEN);
                let mut proc = Proc::start(&format!("signaling-{i}"), cmd, fleet.dir.path());
                let mut http = None;
                let mut stun = None;
                while http.is_none() || stun.is_none() {
                    let l = proc.service().wait_for(START, |l| {
                        (l.starts_with("http=") || l.starts_with("stun=")).then(|| l.to_owned())
                    });
                    if let Some(a) = l.strip_prefix("http=") {
                        http = Some(format!("http://{a}"));
                    } else if let Some(a) = l.strip_prefix("stun=") {
                        stun = a.split(',').next().and_then(|s| s.parse().ok());
                    }
                }
                fleet.nodes.push(Node {
                    proc,
                    url: http.unwrap(),
                    stun: stun.unwrap(),
                });
            }
        });
        for r in &fleet.relays {
            wait_http(&format!("http://{}/readyz", r.metrics)).await;
        }
        fleet.wait_directory_knows(2, 3).await;
        Some(fleet)
    }

    /// Both directory URLs, comma separated (what `--directory` takes for failover).
    fn directory_list(&self) -> String {
        self.directories
            .iter()
            .map(|(_, u)| u.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Wait (bounded) until a live directory replica counts `relays` healthy relays and
    /// `nodes` signaling nodes.
    async fn wait_directory_knows(&self, relays: u64, nodes: u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(3))
            .build()
            .unwrap();
        loop {
            for (p, url) in &self.directories {
                if p.proc.is_none() {
                    continue;
                }
                if let Ok(r) = http.get(format!("{url}/metrics")).send().await
                    && let Ok(text) = r.text().await
                {
                    let metric = |name: &str| {
                        text.lines()
                            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                            .and_then(|v| v.trim().parse::<f64>().ok())
                            .unwrap_or(-1.0)
                    };
                    if metric("peerlink_directory_relays_healthy") >= relays as f64
                        && metric("peerlink_directory_nodes") >= nodes as f64
                    {
                        return;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "the directory did not list {relays} relays and {nodes} nodes in time; logs:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for (p, _) in &self.directories {
            out += &format!("--- {}\n{}\n", p.log.display(), p.log_tail());
        }
        for r in &self.relays {
            out += &format!("--- {}\n{}\n", r.proc.log.display(), r.proc.log_tail());
        }
        for n in &self.nodes {
            out += &format!("--- {}\n{}\n", n.proc.log.display(), n.proc.log_tail());
        }
        out
    }

    fn api(&self, node: usize) -> HttpApi {
        HttpApi::new(&self.nodes[node].url, Duration::from_secs(10)).unwrap()
    }

    /// Register `user` through `node` and connect device `device` there, with every other
    /// node as its failover list.
    async fn user(&self, user: &str, device: &str, node: usize) -> SignalSession {
        let api = self.api(node);
        match api.register(user, PASSWORD).await {
            Err(e) if e.status() != Some(409) => panic!("register {user}: {e}"),
            _ => {}
        }
        let t = api.login(user, PASSWORD).await.unwrap();
        let others = (0..self.nodes.len())
            .filter(|&i| i != node)
            .map(|i| self.api(i))
            .collect();
        SignalSession::connect(api, t, device, None)
            .await
            .unwrap()
            .with_failover(others)
    }
}

async fn wait_http(url: &str) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let deadline = Instant::now() + START;
    loop {
        if let Ok(r) = http.get(url).send().await
            && r.status().is_success()
        {
            return;
        }
        assert!(Instant::now() < deadline, "{url} not ready in time");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits (bounded) for the first selected path of a call.
async fn first_path(rx: &mut mpsc::UnboundedReceiver<CallEvent>) {
    tokio::time::timeout(Duration::from_secs(40), async {
        while let Some(ev) = rx.recv().await {
            if let CallEvent::Path { first: true, .. } = ev {
                return;
            }
        }
        panic!("event channel closed before a path was selected");
    })
    .await
    .expect("no path selected in time");
}

/// Send a durable message with the client id `id` and wait (bounded) for its ack: Ok when
/// acknowledged, else the error (an `error` frame naming the id, or the connection failing).
async fn send_with_id(
    s: &mut SignalSession,
    id: &str,
    to: &str,
    body: &str,
) -> Result<(), SignalError> {
    s.send(&ClientMsg::SendMessage {
        id: id.to_owned(),
        to: to.to_owned(),
        from: None,
        body: body.to_owned(),
    })
    .await?;
    s.wait_for(
        Duration::from_secs(10),
        "message_ack",
        Some(id),
        |m| matches!(m, ServerMsg::MessageAck { id: got, .. } if got == id),
    )
    .await
    .map(drop)
}

/// Reconnect `s` (to its node or, when that one is gone, another), bounded.
async fn reconnect(s: &mut SignalSession) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match s.reconnect().await {
            Ok(_) => return,
            Err(e) => {
                assert!(Instant::now() < deadline, "no node took the session: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// What a chat sender saw.
#[derive(Debug, Default)]
struct Sent {
    /// Ids the server acknowledged.
    acked: Vec<String>,
    /// Errors while a dependency was down, with how long the answer took.
    errors: Vec<(String, Duration)>,
}

/// Send `n` messages to `to`, one every `every`: a message the server refused or did not
/// acknowledge is sent again under the same id until it is acknowledged (bounded).
async fn chat_sender(
    mut s: SignalSession,
    to: &str,
    n: usize,
    every: Duration,
) -> (SignalSession, Sent) {
    let mut out = Sent::default();
    for i in 0..n {
        let id = format!("{}-m{i}", s.user());
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            let t0 = Instant::now();
            match send_with_id(&mut s, &id, to, &format!("message {i}")).await {
                Ok(()) => {
                    out.acked.push(id.clone());
                    break;
                }
                Err(e) => {
                    out.errors.push((e.to_string(), t0.elapsed()));
                    assert!(Instant::now() < deadline, "{id} never acknowledged: {e}");
                    if !matches!(e, SignalError::Server { .. }) {
                        reconnect(&mut s).await;
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
        tokio::time::sleep(every).await;
    }
    (s, out)
}

/// Receive messages (acking each) until every id in `want` (once it is known) has arrived;
/// reconnects when the connection fails. Returns how often each id arrived and the number of
/// reconnects.
async fn chat_receiver(
    mut s: SignalSession,
    mut want: watch::Receiver<Option<Vec<String>>>,
) -> (SignalSession, BTreeMap<String, usize>, usize) {
    let mut got: BTreeMap<String, usize> = BTreeMap::new();
    let mut reconnects = 0;
    let mut done_by: Option<Instant> = None;
    loop {
        let all_in = want
            .borrow_and_update()
            .as_ref()
            .is_some_and(|w| w.iter().all(|id| got.contains_key(id)));
        if all_in {
            // Everything is in: linger a moment for duplicates, then stop.
            let by = *done_by.get_or_insert_with(|| Instant::now() + Duration::from_secs(1));
            if Instant::now() >= by {
                return (s, got, reconnects);
            }
        }
        match tokio::time::timeout(Duration::from_millis(200), s.recv()).await {
            Err(_) => {}
            Ok(Ok(ServerMsg::Message { seq, id, .. })) => {
                *got.entry(id).or_default() += 1;
                if s.ack(seq).await.is_err() {
                    reconnects += 1;
                    reconnect(&mut s).await;
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) => {
                reconnects += 1;
                reconnect(&mut s).await;
            }
        }
    }
}

/// Every acknowledged message arrived exactly once; nothing arrived twice.
fn assert_exactly_once(sent: &Sent, got: &BTreeMap<String, usize>) {
    for id in &sent.acked {
        assert_eq!(
            got.get(id).copied(),
            Some(1),
            "acknowledged message {id} delivered {:?} times",
            got.get(id)
        );
    }
    for (id, n) in got {
        assert_eq!(*n, 1, "message {id} delivered {n} times");
    }
}

fn opts(fleet: &EngineFleet, node: usize, seed: u64, duration: Duration) -> CallOptions {
    CallOptions {
        stun: Some(fleet.nodes[node].stun),
        duration,
        seed,
        ..CallOptions::default()
    }
}

fn check_continued(r: &CallReport, want_end: &str) {
    eprintln!(
        "{} {}: {}",
        r.role,
        r.peer,
        serde_json::to_string(r).unwrap()
    );
    assert_eq!(r.end, want_end, "{r:?}");
    eprintln!("{}: longest media gap {} ms", r.role, r.max_media_gap_ms);
    assert!(
        r.max_media_gap_ms < RECOVERY.as_millis() as f64,
        "media stopped for {} ms: {r:?}",
        r.max_media_gap_ms
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_replica_and_signaling_node_die_during_a_call_and_chat() {
    tokio::time::timeout(TEST, async {
        let Some(mut fleet) = EngineFleet::start().await else {
            return;
        };
        // The call: alice on node 0 (which arbitrates it), bob on node 1. The chat: carol on
        // node 2 writes to dave on node 1. Node 1 dies during both.
        let mut alice = fleet.user("alice", "a", 0).await;
        let mut bob = fleet.user("bob", "b", 1).await;
        let carol = fleet.user("carol", "c", 2).await;
        let dave = fleet.user("dave", "d", 1).await;
        alice
            .wait_until_online("bob", Duration::from_secs(20))
            .await
            .unwrap();

        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut oa = opts(&fleet, 0, 31, Duration::from_secs(10));
        oa.events = Some(tx);
        let (btx, mut brx) = mpsc::unbounded_channel();
        let mut ob = opts(&fleet, 1, 32, Duration::from_secs(10));
        ob.events = Some(btx);
        let (want_tx, want_rx) = watch::channel(None);
        let receiver = tokio::spawn(chat_receiver(dave, want_rx));
        let sender = tokio::spawn(chat_sender(carol, "dave", 40, Duration::from_millis(150)));

        let killer = async {
            first_path(&mut rx).await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            fleet.directories[0].0.kill();
            tokio::time::sleep(Duration::from_secs(1)).await;
            fleet.nodes[1].proc.kill();
        };
        let (ra, rb, ()) = tokio::join!(
            call::call(&mut alice, "bob", &oa),
            call::answer_next(
                &mut bob,
                Duration::from_secs(30),
                Duration::from_secs(60),
                &ob
            ),
            killer
        );
        let ra = ra.unwrap_or_else(|e| panic!("caller: {e}\n{}", fleet.logs()));
        let rb = rb.unwrap_or_else(|e| panic!("callee: {e}\n{}", fleet.logs()));
        // Media never depended on the dead node; bob's session went to another node, and the
        // hang-up reached him there.
        check_continued(&ra, "hangup");
        check_continued(&rb, "peer_hangup");
        let mut bob_signal = Vec::new();
        while let Ok(ev) = brx.try_recv() {
            if let CallEvent::Signaling { up } = ev {
                bob_signal.push(up);
            }
        }
        assert_eq!(bob_signal, [false, true], "bob's signaling during the call");
        assert!(rb.signal_reconnects >= 1, "{rb:?}");
        assert_ne!(
            bob.api().base(),
            fleet.nodes[1].url,
            "bob is on another node now"
        );

        let (carol, sent) = sender.await.unwrap();
        want_tx.send(Some(sent.acked.clone())).unwrap();
        let (dave, got, reconnects) = tokio::time::timeout(Duration::from_secs(30), receiver)
            .await
            .expect("the receiver did not get every acknowledged message")
            .unwrap();
        assert_eq!(sent.acked.len(), 40, "{sent:?}");
        assert!(reconnects >= 1, "dave's node died under him");
        assert_ne!(dave.api().base(), fleet.nodes[1].url);
        assert_exactly_once(&sent, &got);

        // Bob is reachable on his new node: a second call, placed by him this time.
        let mut oa2 = opts(&fleet, 0, 33, Duration::from_secs(2));
        oa2.events = None;
        let ob2 = opts(&fleet, 1, 34, Duration::from_secs(2));
        let (rb2, ra2) = tokio::join!(
            call::call(&mut bob, "alice", &ob2),
            call::answer_next(
                &mut alice,
                Duration::from_secs(30),
                Duration::from_secs(60),
                &oa2
            ),
        );
        assert_eq!(rb2.unwrap().end, "hangup");
        assert_eq!(ra2.unwrap().end, "peer_hangup");
        for s in [alice, bob, carol, dave] {
            s.close().await;
        }
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_dies_during_a_relayed_call_which_moves_to_the_other_relay() {
    tokio::time::timeout(TEST, async {
        let Some(mut fleet) = EngineFleet::start().await else {
            return;
        };
        let mut alice = fleet.user("rita", "a", 0).await;
        let mut bob = fleet.user("sven", "b", 1).await;
        alice
            .wait_until_online("sven", Duration::from_secs(20))
            .await
            .unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut oa = opts(&fleet, 0, 41, Duration::from_secs(9));
        oa.relay_only = true;
        oa.events = Some(tx);
        let mut ob = opts(&fleet, 1, 42, Duration::from_secs(9));
        ob.relay_only = true;
        let metrics: Vec<SocketAddr> = fleet.relays.iter().map(|r| r.metrics).collect();
        let killer = async {
            first_path(&mut rx).await;
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let mut victim = None;
            for (i, m) in metrics.iter().enumerate() {
                if relay_stats(*m, Duration::from_secs(5))
                    .await
                    .unwrap()
                    .allocations_active
                    > 0
                {
                    victim = Some(i);
                    break;
                }
            }
            let victim = victim.expect("no relay holds the call's allocations");
            fleet.relays[victim].proc.kill();
            victim
        };
        let (ra, rb, victim) = tokio::join!(
            call::call(&mut alice, "sven", &oa),
            call::answer_next(
                &mut bob,
                Duration::from_secs(30),
                Duration::from_secs(60),
                &ob
            ),
            killer
        );
        let ra = ra.unwrap_or_else(|e| panic!("caller: {e}\n{}", fleet.logs()));
        let rb = rb.unwrap_or_else(|e| panic!("callee: {e}\n{}", fleet.logs()));
        for (r, end) in [(&ra, "hangup"), (&rb, "peer_hangup")] {
            eprintln!("{}", serde_json::to_string(r).unwrap());
            assert_eq!(r.end, end, "{r:?}");
            assert_eq!(r.path.as_deref(), Some("relay"), "{r:?}");
            assert!(r.restarts >= 1, "{r:?}");
            // The outage is measured between two packets, so media came back after it.
            eprintln!("media gap across the relay kill: {} ms", r.max_media_gap_ms);
            assert!(r.max_media_gap_ms >= 300.0, "no outage: {r:?}");
            assert!(
                r.max_media_gap_ms < RECOVERY.as_millis() as f64,
                "the call took {} ms to re-establish",
                r.max_media_gap_ms
            );
        }
        let survivor = fleet.relays[1 - victim].metrics;
        let st = relay_stats(survivor, Duration::from_secs(5)).await.unwrap();
        assert!(
            st.counters.get("allocations_created").copied() >= Some(2),
            "{st:?}"
        );
        alice.close().await;
        bob.close().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_and_postgres_die_and_come_back_during_a_call_and_chat() {
    tokio::time::timeout(TEST, async {
        let Some(mut fleet) = EngineFleet::start().await else {
            return;
        };
        let mut alice = fleet.user("alice", "a", 0).await;
        let mut bob = fleet.user("bob", "b", 1).await;
        let mut carol = fleet.user("carol", "c", 2).await;
        let dave = fleet.user("dave", "d", 1).await;
        alice
            .wait_until_online("bob", Duration::from_secs(20))
            .await
            .unwrap();
        // erin (node 2) will try to call dave (node 1) while Redis is down.
        let mut erin = fleet.user("erin", "e", 2).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut oa = opts(&fleet, 0, 51, Duration::from_secs(16));
        oa.events = Some(tx);
        let ob = opts(&fleet, 1, 52, Duration::from_secs(16));
        let (want_tx, want_rx) = watch::channel(None);
        let receiver = tokio::spawn(chat_receiver(dave, want_rx));

        let chaos = async {
            first_path(&mut rx).await;
            let mut sent = Sent::default();
            // Redis dies (and with it every directory entry: no persistence).
            tokio::task::block_in_place(|| fleet.redis.kill());
            let t0 = Instant::now();
            // An invite to a user on another node cannot be routed: a clear error, at once.
            let e = call::call(&mut erin, "dave", &opts(&fleet, 2, 53, Duration::from_secs(1)))
                .await
                .expect_err("an invite routed with the directory down");
            eprintln!("invite with Redis down ({:?}): {e}", t0.elapsed());
            assert!(
                matches!(&e, call::CallError::Signal(SignalError::Server { code: ErrorCode::Internal, message })
                    if message.contains("directory")),
                "{e}"
            );
            // Logins go on (the shared throttle falls back to each node's own table), and
            // messages are durable in PostgreSQL.
            fleet.api(2).login("carol", PASSWORD).await.unwrap();
            let id = "carol-during-redis".to_owned();
            send_with_id(&mut carol, &id, "dave", "while redis is down").await.unwrap();
            sent.acked.push(id);
            tokio::time::sleep(Duration::from_secs(1)).await;
            tokio::task::block_in_place(|| fleet.redis.run());
            // Nodes and relays register again and republish presence (about one
            // heartbeat); then invites find their callee again.
            fleet.wait_directory_knows(2, 3).await;

            // PostgreSQL dies.
            tokio::task::block_in_place(|| fleet.pg.kill());
            let id = "carol-during-postgres".to_owned();
            let t0 = Instant::now();
            let e = send_with_id(&mut carol, &id, "dave", "while postgres is down")
                .await
                .expect_err("a message acknowledged with PostgreSQL down");
            let took = t0.elapsed();
            eprintln!("message with PostgreSQL down ({took:?}): {e}");
            assert!(
                matches!(&e, SignalError::Server { code: ErrorCode::Storage, .. }),
                "{e}"
            );
            sent.errors.push((e.to_string(), took));
            let e = fleet.api(0).login("carol", PASSWORD).await.unwrap_err();
            eprintln!("login with PostgreSQL down: {e}");
            assert!(e.status().is_some_and(|s| s >= 500), "{e}");
            tokio::task::block_in_place(|| fleet.pg.run());
            // The same message again, under the same id, until it is acknowledged.
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                match send_with_id(&mut carol, &id, "dave", "while postgres is down").await {
                    Ok(()) => break,
                    Err(e) => {
                        assert!(Instant::now() < deadline, "never acknowledged after PostgreSQL came back: {e}");
                        if !matches!(e, SignalError::Server { .. }) {
                            reconnect(&mut carol).await;
                        }
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                }
            }
            sent.acked.push(id);
            for i in 0..5 {
                let id = format!("carol-after-{i}");
                send_with_id(&mut carol, &id, "dave", "after").await.unwrap();
                sent.acked.push(id);
            }
            sent
        };
        let (ra, rb, sent) = tokio::join!(
            call::call(&mut alice, "bob", &oa),
            call::answer_next(&mut bob, Duration::from_secs(30), Duration::from_secs(60), &ob),
            chaos
        );
        let ra = ra.unwrap_or_else(|e| panic!("caller: {e}\n{}", fleet.logs()));
        let rb = rb.unwrap_or_else(|e| panic!("callee: {e}\n{}", fleet.logs()));
        check_continued(&ra, "hangup");
        check_continued(&rb, "peer_hangup");

        want_tx.send(Some(sent.acked.clone())).unwrap();
        let (dave, got, _) = tokio::time::timeout(Duration::from_secs(30), receiver)
            .await
            .expect("the receiver did not get every acknowledged message")
            .unwrap();
        assert_exactly_once(&sent, &got);

        // Everything works again without restarting a service: a call across nodes.
        let (re, rd) = {
            let mut dave = dave;
            let oe = opts(&fleet, 2, 54, Duration::from_secs(2));
            let od = opts(&fleet, 1, 55, Duration::from_secs(2));
            let r = tokio::join!(
                call::call(&mut erin, "dave", &oe),
                call::answer_next(&mut dave, Duration::from_secs(30), Duration::from_secs(60), &od),
            );
            dave.close().await;
            r
        };
        assert_eq!(re.unwrap().end, "hangup");
        assert_eq!(rd.unwrap().end, "peer_hangup");
        for s in [alice, bob, carol, erin] {
            s.close().await;
        }
    })
    .await
    .expect("test timed out");
}
