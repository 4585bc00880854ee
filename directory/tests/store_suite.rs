//! The store suite, written once against the `DirectoryStore` trait with virtual time (every
//! call passes `now`) and run on both stores: `memory::*` on `MemoryStore`, `redis::*` on
//! `RedisStore` over a real Redis (`peerlink_testkit::redis`: Debian's `redis-server`, one
//! server per test, no persistence). The Redis-only tests below check what only a shared
//! store has: two replicas on one Redis answer as one, key prefixes keep fleets apart, an
//! outage is an `Unavailable` error (503 over HTTP) and service resumes by itself.
// Test helpers outside #[test] fns: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use peerlink_api::directory::*;
use peerlink_directory::clock::{ManualClock, Timestamp};
use peerlink_directory::memory::MemoryStore;
use peerlink_directory::redis_store::{self, RedisOptions, RedisStore};
use peerlink_directory::server::{AppState, HttpLimits, app};
use peerlink_directory::store::{DirectoryStore, StatsKind, StoreConfig, StoreError};
use peerlink_testkit::redis::RedisServer;
use tower::ServiceExt;

const S: f64 = 1_000.0;
/// Bound of every store call (a hung Redis fails the test instead of hanging it).
const STEP: Duration = Duration::from_secs(20);

fn cfg() -> StoreConfig {
    StoreConfig {
        presence_ttl: Duration::from_secs(30),
        node_ttl: Duration::from_secs(10),
        seed: Some(7),
    }
}

fn t(secs: f64) -> Timestamp {
    Timestamp((secs * S) as u64)
}

async fn bounded<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(STEP, f)
        .await
        .expect("store call in time")
}

fn opts() -> RedisOptions {
    RedisOptions {
        connect_timeout: Duration::from_secs(2),
        response_timeout: Duration::from_secs(2),
    }
}

async fn redis_store(server: &RedisServer, db: u8, prefix: &str) -> RedisStore {
    let loc = redis_store::parse_location(&format!("{}?prefix={prefix}", server.url(db))).unwrap();
    bounded(RedisStore::connect(loc, cfg(), opts()))
        .await
        .unwrap()
}

async fn register<S: DirectoryStore>(
    s: &S,
    node: &str,
    epoch: u64,
    now: Timestamp,
) -> RegisterNodeResponse {
    bounded(s.register_node(
        RegisterNodeRequest {
            node_id: node.into(),
            internal_url: format!("http://{node}.internal:8443"),
            epoch,
            load: 0.0,
        },
        now,
    ))
    .await
    .unwrap()
}

fn presence(user: &str, device: &str, node: &str, epoch: u64) -> PresenceUpdate {
    PresenceUpdate {
        user: user.into(),
        device: device.into(),
        node_id: node.into(),
        node_epoch: epoch,
        status: PresenceStatus::Online,
    }
}

async fn put<S: DirectoryStore>(s: &S, u: PresenceUpdate, now: Timestamp) -> UpdateOutcome {
    bounded(s.update_presence(u, now)).await.unwrap()
}

async fn lookup<S: DirectoryStore>(s: &S, user: &str, now: Timestamp) -> UserLocation {
    let mut v = bounded(s.lookup_users(&[user.to_owned()], now))
        .await
        .unwrap();
    assert_eq!(v.len(), 1);
    v.pop().unwrap()
}

async fn devices<S: DirectoryStore>(s: &S, user: &str, now: Timestamp) -> Vec<(String, String)> {
    lookup(s, user, now)
        .await
        .devices
        .into_iter()
        .map(|d| (d.device, d.node_id))
        .collect()
}

async fn entries<S: DirectoryStore>(s: &S, now: Timestamp) -> u64 {
    bounded(s.stats(now)).await.unwrap().presence_entries
}

async fn sweep<S: DirectoryStore>(s: &S, now: Timestamp) -> peerlink_directory::store::SweepStats {
    bounded(s.sweep(now)).await.unwrap()
}

async fn nodes<S: DirectoryStore>(s: &S, now: Timestamp) -> Vec<NodeInfo> {
    bounded(s.list_nodes(now)).await.unwrap()
}

async fn relays<S: DirectoryStore>(s: &S, now: Timestamp) -> Vec<RelayInfo> {
    bounded(s.list_relays(now)).await.unwrap()
}

fn relay_req(id: &str) -> RegisterRelayRequest {
    RegisterRelayRequest {
        relay_id: id.into(),
        turn_addr: "127.0.0.1:3478".parse().unwrap(),
        turn_tcp_addr: None,
        turn_tls_addr: None,
        metrics_addr: "127.0.0.1:9641".parse().unwrap(),
        region: "eu".into(),
        capacity: 1_000,
        load: 0.0,
        allocations: 0,
        draining: false,
    }
}

fn relay_hb(id: &str, allocations: u64, draining: bool) -> RelayHeartbeatRequest {
    RelayHeartbeatRequest {
        relay_id: id.into(),
        load: 0.2,
        allocations,
        draining,
        stats: None,
    }
}

// ---- the suite ----

async fn presence_expires_after_ttl_without_refresh<S: DirectoryStore>(s: S) {
    register(&s, "n1", 1, t(0.0)).await;
    assert_eq!(
        put(&s, presence("alice", "phone", "n1", 1), t(0.0)).await,
        UpdateOutcome::Applied
    );
    let loc = lookup(&s, "alice", t(29.999)).await;
    assert_eq!(loc.devices.len(), 1);
    let d = &loc.devices[0];
    assert_eq!(d.node_url.as_deref(), Some("http://n1.internal:8443"));
    assert_eq!(d.node_epoch, 1);
    assert_eq!(d.status, PresenceStatus::Online);
    assert_eq!(d.last_seen_age_ms, 29_999);
    assert!(devices(&s, "alice", t(30.0)).await.is_empty());
    assert_eq!(entries(&s, t(30.0)).await, 1, "still stored until swept");
    let swept = sweep(&s, t(30.0)).await;
    assert_eq!(swept.presence, 1);
    assert_eq!(
        swept.nodes, 1,
        "node record retained until both TTLs passed"
    );
    assert_eq!(entries(&s, t(30.0)).await, 0);
}

async fn node_heartbeats_keep_entries_alive_and_death_expires_them<S: DirectoryStore>(s: S) {
    register(&s, "n1", 1, t(0.0)).await;
    put(&s, presence("alice", "phone", "n1", 1), t(0.0)).await;
    put(&s, presence("bob", "pc", "n1", 1), t(1.0)).await;
    let mut now = 0.0;
    while now < 100.0 {
        now += 3.3;
        bounded(s.node_heartbeat("n1", 1, 0.1, t(now)))
            .await
            .unwrap();
        assert_eq!(sweep(&s, t(now)).await.presence, 0);
    }
    assert_eq!(devices(&s, "alice", t(now)).await.len(), 1);
    let listed = nodes(&s, t(now)).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].load, 0.1);
    assert!(nodes(&s, t(now + 10.0)).await.is_empty());
    assert_eq!(devices(&s, "bob", t(now + 29.9)).await.len(), 1);
    assert!(devices(&s, "alice", t(now + 30.0)).await.is_empty());
    assert!(devices(&s, "bob", t(now + 30.0)).await.is_empty());
    let swept = sweep(&s, t(now + 30.0)).await;
    assert_eq!((swept.presence, swept.nodes), (2, 1));
    assert_eq!(
        bounded(s.node_heartbeat("n1", 1, 0.0, t(now + 31.0))).await,
        Err(StoreError::UnknownNode {
            node_id: "n1".into(),
            epoch: 1
        }),
        "a forgotten node is told to register again"
    );
}

async fn new_epoch_purges_old_entries_at_once<S: DirectoryStore>(s: S) {
    register(&s, "n1", 1, t(0.0)).await;
    register(&s, "n2", 1, t(0.0)).await;
    for u in ["a", "b", "c"] {
        put(&s, presence(u, "d", "n1", 1), t(1.0)).await;
    }
    put(&s, presence("a", "laptop", "n2", 1), t(1.0)).await;
    assert_eq!(entries(&s, t(1.0)).await, 4);
    let r = register(&s, "n1", 2, t(2.0)).await;
    assert_eq!(r.purged_presence, 3);
    assert_eq!(r.previous_epoch, Some(1));
    assert_eq!(r.heartbeat_interval_ms, 3_333);
    assert_eq!(
        (r.node_ttl_ms, r.presence_ttl_ms),
        (10_000, 30_000),
        "TTLs announced"
    );
    assert_eq!(
        devices(&s, "a", t(2.0)).await,
        [("laptop".to_owned(), "n2".to_owned())]
    );
    assert!(devices(&s, "b", t(2.0)).await.is_empty());
    assert_eq!(entries(&s, t(2.0)).await, 1);
    put(&s, presence("b", "d", "n1", 2), t(3.0)).await;
    assert_eq!(register(&s, "n1", 2, t(4.0)).await.purged_presence, 0);
    assert_eq!(devices(&s, "b", t(4.0)).await.len(), 1);
    assert_eq!(register(&s, "n3", 1, t(4.0)).await.previous_epoch, None);
}

async fn stale_epoch_updates_are_ignored<S: DirectoryStore>(s: S) {
    register(&s, "n1", 5, t(0.0)).await;
    put(&s, presence("a", "d", "n1", 5), t(0.0)).await;
    assert_eq!(
        put(&s, presence("zed", "d", "n1", 4), t(1.0)).await,
        UpdateOutcome::Stale { current_epoch: 5 }
    );
    assert!(devices(&s, "zed", t(1.0)).await.is_empty());
    let batch = vec![NodePresence {
        user: "y".into(),
        device: "d".into(),
        status: PresenceStatus::Busy,
    }];
    assert_eq!(
        bounded(s.update_presence_batch("n1", 3, batch, t(1.0))).await,
        Ok((UpdateOutcome::Stale { current_epoch: 5 }, 0))
    );
    assert!(devices(&s, "y", t(1.0)).await.is_empty());
    let rm = PresenceRemove {
        user: "a".into(),
        device: "d".into(),
        node_id: "n1".into(),
        node_epoch: 4,
    };
    assert_eq!(
        bounded(s.remove_presence(rm, t(1.0))).await,
        Ok(RemoveOutcome::Stale { current_epoch: 5 })
    );
    assert_eq!(
        devices(&s, "a", t(1.0)).await.len(),
        1,
        "stale removal did not remove"
    );
    let old = RegisterNodeRequest {
        node_id: "n1".into(),
        internal_url: "http://x".into(),
        epoch: 4,
        load: 0.0,
    };
    assert!(matches!(
        bounded(s.register_node(old, t(1.0))).await,
        Err(StoreError::StaleEpoch {
            current_epoch: 5,
            ..
        })
    ));
    assert!(matches!(
        bounded(s.node_heartbeat("n1", 4, 0.0, t(1.0))).await,
        Err(StoreError::StaleEpoch {
            current_epoch: 5,
            ..
        })
    ));
    assert!(matches!(
        bounded(s.deregister_node("n1", 4, t(1.0))).await,
        Err(StoreError::StaleEpoch { .. })
    ));
    let listed = nodes(&s, t(1.0)).await;
    assert_eq!(listed[0].epoch, 5, "the zombie changed nothing");
    assert_eq!(listed[0].internal_url, "http://n1.internal:8443");
}

async fn epochs_beyond_2_pow_53_compare_exactly<S: DirectoryStore>(s: S) {
    // Epochs are u64: adjacent values near the top must not round together.
    let big = u64::MAX - 1;
    register(&s, "n1", big, t(0.0)).await;
    assert_eq!(
        put(&s, presence("a", "d", "n1", big - 1), t(0.0)).await,
        UpdateOutcome::Stale { current_epoch: big }
    );
    assert!(matches!(
        bounded(s.update_presence(presence("a", "d", "n1", u64::MAX), t(0.0))).await,
        Err(StoreError::UnknownNode { .. })
    ));
    assert_eq!(
        put(&s, presence("a", "d", "n1", big), t(0.0)).await,
        UpdateOutcome::Applied
    );
    assert_eq!(lookup(&s, "a", t(0.0)).await.devices[0].node_epoch, big);
    let r = register(&s, "n1", u64::MAX, t(1.0)).await;
    assert_eq!((r.previous_epoch, r.purged_presence), (Some(big), 1));
    // 10 < 9 as text but not as a number.
    register(&s, "n2", 9, t(1.0)).await;
    assert_eq!(register(&s, "n2", 10, t(1.0)).await.previous_epoch, Some(9));
}

async fn writes_for_unknown_nodes_or_future_epochs_are_refused<S: DirectoryStore>(s: S) {
    assert!(matches!(
        bounded(s.update_presence(presence("a", "d", "ghost", 1), t(0.0))).await,
        Err(StoreError::UnknownNode { .. })
    ));
    register(&s, "n1", 1, t(0.0)).await;
    assert!(matches!(
        bounded(s.update_presence(presence("a", "d", "n1", 2), t(0.0))).await,
        Err(StoreError::UnknownNode { .. })
    ));
    assert!(matches!(
        bounded(s.node_heartbeat("n1", 2, 0.0, t(0.0))).await,
        Err(StoreError::UnknownNode { .. })
    ));
    assert!(matches!(
        bounded(s.update_presence_batch("ghost", 1, Vec::new(), t(0.0))).await,
        Err(StoreError::UnknownNode { .. })
    ));
    assert_eq!(entries(&s, t(0.0)).await, 0);
}

async fn device_moving_to_another_node_is_not_removed_by_the_old_one<S: DirectoryStore>(s: S) {
    register(&s, "n1", 1, t(0.0)).await;
    register(&s, "n2", 1, t(0.0)).await;
    put(&s, presence("a", "phone", "n1", 1), t(0.0)).await;
    put(&s, presence("a", "phone", "n2", 1), t(1.0)).await;
    assert_eq!(entries(&s, t(1.0)).await, 1);
    let rm = |node: &str| PresenceRemove {
        user: "a".into(),
        device: "phone".into(),
        node_id: node.into(),
        node_epoch: 1,
    };
    assert_eq!(
        bounded(s.remove_presence(rm("n1"), t(1.0))).await,
        Ok(RemoveOutcome::NotFound)
    );
    assert_eq!(
        devices(&s, "a", t(1.0)).await,
        [("phone".to_owned(), "n2".to_owned())]
    );
    // n1 re-registering with a newer epoch does not purge what now belongs to n2.
    assert_eq!(register(&s, "n1", 2, t(1.0)).await.purged_presence, 0);
    assert_eq!(
        bounded(s.remove_presence(rm("n2"), t(1.0))).await,
        Ok(RemoveOutcome::Removed)
    );
    assert!(devices(&s, "a", t(1.0)).await.is_empty());
    assert_eq!(entries(&s, t(1.0)).await, 0);
}

async fn deregister_removes_node_and_presence<S: DirectoryStore>(s: S) {
    register(&s, "n1", 1, t(0.0)).await;
    put(&s, presence("a", "d", "n1", 1), t(0.0)).await;
    put(&s, presence("b", "d", "n1", 1), t(0.0)).await;
    assert_eq!(
        bounded(s.deregister_node("n1", 1, t(0.0))).await,
        Ok(DeregisterNodeResponse {
            removed: true,
            purged_presence: 2
        })
    );
    assert!(nodes(&s, t(0.0)).await.is_empty());
    assert!(devices(&s, "a", t(0.0)).await.is_empty());
    assert_eq!(
        bounded(s.deregister_node("n1", 1, t(0.0))).await,
        Ok(DeregisterNodeResponse {
            removed: false,
            purged_presence: 0
        })
    );
    assert_eq!(entries(&s, t(0.0)).await, 0);
}

async fn batch_lookup_keeps_order_and_reports_offline_users<S: DirectoryStore>(s: S) {
    register(&s, "n1", 1, t(0.0)).await;
    put(&s, presence("a", "d2", "n1", 1), t(0.0)).await;
    put(&s, presence("a", "d1", "n1", 1), t(0.0)).await;
    let batch: Vec<NodePresence> = (0..MAX_PRESENCE_BATCH)
        .map(|i| NodePresence {
            user: format!("u{i}"),
            device: "x".into(),
            status: PresenceStatus::Away,
        })
        .collect();
    assert_eq!(
        bounded(s.update_presence_batch("n1", 1, batch, t(0.5))).await,
        Ok((UpdateOutcome::Applied, MAX_PRESENCE_BATCH as u64))
    );
    let last = format!("u{}", MAX_PRESENCE_BATCH - 1);
    let users: Vec<String> = ["nobody", "a", &last].map(String::from).to_vec();
    let out = bounded(s.lookup_users(&users, t(1.0))).await.unwrap();
    assert_eq!(out[0].user, "nobody");
    assert!(out[0].devices.is_empty());
    let devs: Vec<_> = out[1].devices.iter().map(|d| d.device.as_str()).collect();
    assert_eq!(devs, ["d1", "d2"]);
    assert_eq!(out[2].devices[0].status, PresenceStatus::Away);
    assert_eq!(entries(&s, t(1.0)).await, MAX_PRESENCE_BATCH as u64 + 2);
    // A full lookup batch, in order.
    let users: Vec<String> = (0..MAX_LOOKUP_BATCH).map(|i| format!("u{i}")).collect();
    let out = bounded(s.lookup_users(&users, t(1.0))).await.unwrap();
    assert_eq!(out.len(), MAX_LOOKUP_BATCH);
    assert!(
        out.iter()
            .zip(&users)
            .all(|(l, u)| l.user == *u && l.devices.len() == 1)
    );
    // A new epoch purges the whole batch at once.
    let r = register(&s, "n1", 2, t(2.0)).await;
    assert_eq!(r.purged_presence, MAX_PRESENCE_BATCH as u64 + 2);
    assert_eq!(entries(&s, t(2.0)).await, 0);
    assert!(
        bounded(s.lookup_users(&[], t(1.0)))
            .await
            .unwrap()
            .is_empty()
    );
}

async fn relay_heartbeat_resets_handed_out_and_liveness_follows_ttl<S: DirectoryStore>(s: S) {
    bounded(s.register_relay(relay_req("r1"), t(0.0)))
        .await
        .unwrap();
    // r2 also serves TCP and TLS clients: the addresses come back in lists and choices.
    let tcp: std::net::SocketAddr = "127.0.0.1:3478".parse().unwrap();
    let tls: std::net::SocketAddr = "127.0.0.1:443".parse().unwrap();
    let streams = RegisterRelayRequest {
        turn_tcp_addr: Some(tcp),
        turn_tls_addr: Some(tls),
        ..relay_req("r2")
    };
    bounded(s.register_relay(streams, t(0.0))).await.unwrap();
    let listed = relays(&s, t(0.0)).await;
    assert_eq!(
        (listed[1].turn_tcp_addr, listed[1].turn_tls_addr),
        (Some(tcp), Some(tls))
    );
    assert_eq!(
        (listed[0].turn_tcp_addr, listed[0].turn_tls_addr),
        (None, None)
    );
    let req = ChooseRelaysRequest {
        caller_region: "eu".into(),
        callee_region: None,
        count: 1,
    };
    let both = ChooseRelaysRequest {
        count: 2,
        ..req.clone()
    };
    let chosen = bounded(s.choose_relays(&both, t(0.5))).await.unwrap();
    let r2 = chosen.iter().find(|c| c.relay_id == "r2").unwrap();
    assert_eq!((r2.turn_tcp_addr, r2.turn_tls_addr), (Some(tcp), Some(tls)));
    // (the handed-out counters start from this choice's two)
    for _ in 0..10 {
        assert_eq!(
            bounded(s.choose_relays(&req, t(1.0))).await.unwrap().len(),
            1
        );
    }
    let h: Vec<u64> = relays(&s, t(1.0))
        .await
        .iter()
        .map(|r| r.handed_out)
        .collect();
    assert_eq!(h.iter().sum::<u64>(), 12);
    assert!(h.iter().all(|&x| x > 0), "both used: {h:?}");
    bounded(s.relay_heartbeat(relay_hb("r1", h[0], false), t(1.0)))
        .await
        .unwrap();
    let after: Vec<u64> = relays(&s, t(1.0))
        .await
        .iter()
        .map(|r| r.handed_out)
        .collect();
    assert_eq!(after, [0, h[1]], "heartbeat reset only r1's counter");
    bounded(s.relay_heartbeat(relay_hb("r1", 0, false), t(9.0)))
        .await
        .unwrap();
    for _ in 0..10 {
        let c = bounded(s.choose_relays(&req, t(10.0))).await.unwrap();
        assert_eq!(c[0].relay_id, "r1");
    }
    let listed = relays(&s, t(10.0)).await;
    assert!(!listed[1].healthy);
    assert_eq!(listed[0].last_heartbeat_age_ms, 1_000);
    let stats = bounded(s.stats(t(10.0))).await.unwrap();
    assert_eq!((stats.relays_healthy, stats.relays_known), (1, 2));
    bounded(s.relay_heartbeat(relay_hb("r1", 0, true), t(10.0)))
        .await
        .unwrap();
    assert!(
        bounded(s.choose_relays(&req, t(10.0)))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(sweep(&s, t(30.0)).await.relays, 1);
    assert!(matches!(
        bounded(s.relay_heartbeat(relay_hb("r2", 0, false), t(30.0))).await,
        Err(StoreError::UnknownRelay { .. })
    ));
    assert!(bounded(s.deregister_relay("r1")).await.unwrap());
    assert!(!bounded(s.deregister_relay("r1")).await.unwrap());
    assert!(relays(&s, t(30.0)).await.is_empty());
}

async fn relay_choice_is_the_same_for_a_seed<S: DirectoryStore>(s: S) {
    // Same seed, same records, same requests: the same choices on either store (both run
    // `select::choose` over records sorted by id).
    for (i, id) in ["r3", "r1", "r4", "r2"].iter().enumerate() {
        let mut r = relay_req(id);
        r.allocations = i as u64 * 10;
        r.region = if i % 2 == 0 { "eu" } else { "us" }.into();
        bounded(s.register_relay(r, t(0.0))).await.unwrap();
    }
    let req = ChooseRelaysRequest {
        caller_region: "us".into(),
        callee_region: Some("eu".into()),
        count: 3,
    };
    let mut picks = Vec::new();
    for _ in 0..6 {
        let c = bounded(s.choose_relays(&req, t(1.0))).await.unwrap();
        picks.push(
            c.iter()
                .map(|r| r.relay_id.clone())
                .collect::<Vec<_>>()
                .join(","),
        );
    }
    let reference = MemoryStore::new(cfg());
    for (i, id) in ["r3", "r1", "r4", "r2"].iter().enumerate() {
        let mut r = relay_req(id);
        r.allocations = i as u64 * 10;
        r.region = if i % 2 == 0 { "eu" } else { "us" }.into();
        reference.register_relay_now(r, t(0.0));
    }
    let expected: Vec<String> = (0..6)
        .map(|_| {
            reference
                .choose_relays_now(&req, t(1.0))
                .iter()
                .map(|r| r.relay_id.clone())
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect();
    assert_eq!(picks, expected);
    assert!(picks.iter().all(|p| p.split(',').count() == 3), "{picks:?}");
}

async fn stats_records_replace_expire_and_keep_kinds_apart<S: DirectoryStore>(s: S) {
    let put = |kind, id: &'static str, json: &'static str, now| {
        let s = &s;
        async move {
            bounded(s.put_stats(kind, id, json.to_owned(), now))
                .await
                .unwrap()
        }
    };
    let list = |kind, max_age: f64, now| {
        let s = &s;
        async move {
            bounded(s.list_stats(kind, Duration::from_secs_f64(max_age), now))
                .await
                .unwrap()
                .into_iter()
                .map(|r| (r.id, r.json, r.age_ms))
                .collect::<Vec<_>>()
        }
    };
    put(StatsKind::Relay, "r2", r#"{"a":1}"#, t(0.0)).await;
    put(StatsKind::Relay, "r1", r#"{"a":2}"#, t(1.0)).await;
    put(StatsKind::Node, "r1", r#"{"node":true}"#, t(1.0)).await;
    // Sorted by id, with their ages; kinds apart.
    assert_eq!(
        list(StatsKind::Relay, 30.0, t(2.0)).await,
        vec![
            ("r1".to_owned(), r#"{"a":2}"#.to_owned(), 1_000),
            ("r2".to_owned(), r#"{"a":1}"#.to_owned(), 2_000),
        ]
    );
    assert_eq!(list(StatsKind::Node, 30.0, t(2.0)).await.len(), 1);
    assert!(list(StatsKind::Replica, 30.0, t(2.0)).await.is_empty());
    // A newer record replaces the older one.
    put(StatsKind::Relay, "r2", r#"{"a":3}"#, t(3.0)).await;
    let r = list(StatsKind::Relay, 30.0, t(3.0)).await;
    assert_eq!(r[1], ("r2".to_owned(), r#"{"a":3}"#.to_owned(), 0));
    // Older than max_age: no longer listed, and gone for good; other kinds untouched.
    assert_eq!(
        list(StatsKind::Relay, 5.0, t(7.0)).await,
        vec![("r2".to_owned(), r#"{"a":3}"#.to_owned(), 4_000)]
    );
    assert_eq!(list(StatsKind::Relay, 30.0, t(7.0)).await.len(), 1);
    assert_eq!(list(StatsKind::Node, 30.0, t(7.0)).await.len(), 1);
}

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(peerlink_directory::memory::MemoryStore::new(super::cfg())).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(server) = peerlink_testkit::redis::RedisServer::start() else {
                        return;
                    };
                    super::$name(super::redis_store(&server, 0, "suite").await).await;
                }
            )*
        }
    };
}

suite!(
    presence_expires_after_ttl_without_refresh,
    node_heartbeats_keep_entries_alive_and_death_expires_them,
    new_epoch_purges_old_entries_at_once,
    stale_epoch_updates_are_ignored,
    epochs_beyond_2_pow_53_compare_exactly,
    writes_for_unknown_nodes_or_future_epochs_are_refused,
    device_moving_to_another_node_is_not_removed_by_the_old_one,
    deregister_removes_node_and_presence,
    batch_lookup_keeps_order_and_reports_offline_users,
    relay_heartbeat_resets_handed_out_and_liveness_follows_ttl,
    relay_choice_is_the_same_for_a_seed,
    stats_records_replace_expire_and_keep_kinds_apart,
);

// ---- Redis only ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_redis_answer_as_one_and_prefixes_keep_fleets_apart() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let a = Arc::new(redis_store(&server, 0, "fleet").await);
    let b = Arc::new(redis_store(&server, 0, "fleet").await);
    let other = redis_store(&server, 0, "other-fleet").await;
    let other_db = redis_store(&server, 1, "fleet").await;
    register(&*a, "n1", 1, t(0.0)).await;
    put(&*b, presence("alice", "phone", "n1", 1), t(0.0)).await;
    assert_eq!(devices(&*a, "alice", t(1.0)).await.len(), 1);
    // A newer epoch registered through one replica purges what the other wrote.
    assert_eq!(register(&*b, "n1", 2, t(1.0)).await.purged_presence, 1);
    assert!(devices(&*a, "alice", t(1.0)).await.is_empty());
    assert_eq!(
        put(&*a, presence("alice", "phone", "n1", 1), t(1.0)).await,
        UpdateOutcome::Stale { current_epoch: 2 }
    );
    assert!(nodes(&other, t(1.0)).await.is_empty(), "another prefix");
    assert!(
        nodes(&other_db, t(1.0)).await.is_empty(),
        "another database"
    );

    // Concurrent choices through both replicas: every one is counted exactly once.
    for id in ["r1", "r2", "r3"] {
        bounded(a.register_relay(relay_req(id), t(1.0)))
            .await
            .unwrap();
    }
    let req = ChooseRelaysRequest {
        caller_region: "eu".into(),
        callee_region: None,
        count: 2,
    };
    let mut tasks = Vec::new();
    for i in 0..8 {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        let req = req.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            for _ in 0..25 {
                n += s.choose_relays(&req, t(2.0)).await.unwrap().len() as u64;
            }
            n
        }));
    }
    let mut chosen = 0;
    for task in tasks {
        chosen += bounded(task).await.unwrap();
    }
    assert_eq!(chosen, 8 * 25 * 2);
    let handed: u64 = relays(&*b, t(2.0)).await.iter().map(|r| r.handed_out).sum();
    assert_eq!(handed, chosen, "no increment lost between replicas");
    // One replica's sweep is every replica's.
    assert_eq!(sweep(&*a, t(100.0)).await.relays, 3);
    assert!(relays(&*b, t(100.0)).await.is_empty());
}

async fn http_get(app: &axum::Router, path: &str) -> (StatusCode, serde_json::Value) {
    let req = Request::get(path)
        .header(header::AUTHORIZATION, "Bearer suite-token")
        .body(Body::empty())
        .unwrap();
    let resp = bounded(app.clone().oneshot(req)).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_answers_503_and_service_resumes_by_itself() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let store = Arc::new(redis_store(&server, 0, "outage").await);
    register(&*store, "n1", 1, t(0.0)).await;
    let clock = Arc::new(ManualClock::new(t(1.0)));
    let state = AppState::new(
        store.clone(),
        clock,
        cfg(),
        HttpLimits::default(),
        "suite-token",
    );
    let app = app(state);
    let (status, body) = http_get(&app, "/v1/nodes").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["nodes"].as_array().unwrap().len(), 1);

    // Hung (SIGSTOP): answered 503 once the response timeout (2 s) passes, not never.
    server.set_stopped(true);
    let started = tokio::time::Instant::now();
    let (status, body) = http_get(&app, "/v1/nodes").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "store_unavailable", "{body}");
    assert!(
        started.elapsed() >= Duration::from_millis(1_500),
        "waited for the timeout"
    );
    server.set_stopped(false);
    let deadline = tokio::time::Instant::now() + STEP;
    while http_get(&app, "/v1/nodes").await.0 != StatusCode::OK {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no answer after SIGCONT"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Gone (SIGKILL) for a while: every request is refused fast, through several reconnect
    // attempts.
    server.kill();
    let outage = tokio::time::Instant::now();
    while outage.elapsed() < Duration::from_secs(4) {
        for path in ["/v1/nodes", "/v1/relays", "/v1/presence/alice"] {
            let (status, body) = http_get(&app, path).await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{path}: {body}");
            assert_eq!(body["error"]["code"], "store_unavailable", "{path}: {body}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(matches!(
        bounded(store.stats(t(1.0))).await,
        Err(StoreError::Unavailable(_))
    ));
    let metrics = {
        let req = Request::get("/metrics").body(Body::empty()).unwrap();
        let resp = bounded(app.clone().oneshot(req)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "metrics stay up");
        let b = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        String::from_utf8(b.to_vec()).unwrap()
    };
    assert!(
        metrics.contains("peerlink_directory_store_up 0"),
        "{metrics}"
    );
    assert!(!metrics.contains("peerlink_directory_nodes "), "{metrics}");
    let errors: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("peerlink_directory_store_errors_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(errors >= 3, "{metrics}");

    // Back (empty: no persistence): answers again without any restart of the directory.
    server.run();
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let (status, body) = http_get(&app, "/v1/nodes").await;
        if status == StatusCode::OK {
            assert!(body["nodes"].as_array().unwrap().is_empty(), "{body}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still {status} after Redis came back: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(matches!(
        bounded(store.node_heartbeat("n1", 1, 0.0, t(1.5))).await,
        Err(StoreError::UnknownNode { .. })
    ));
    register(&*store, "n1", 1, t(2.0)).await;
    assert_eq!(nodes(&*store, t(2.0)).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_redis_at_connect_is_an_error_in_bounded_time() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let loc = redis_store::parse_location(&format!("redis://127.0.0.1:{port}")).unwrap();
    let r = bounded(RedisStore::connect(loc, cfg(), opts())).await;
    assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
}
