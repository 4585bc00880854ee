//! `DirectoryClient` against the real `app()` served on loopback in-process: every client
//! method, error mapping, and the registration loop's stale-epoch stop and drop-cancel.

// Test code: unwrap on fixtures is fine (clippy.toml allows it inside #[test] fns only).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use peerlink_api::directory::*;
use peerlink_api::directory_client::{ClientError, DirectoryClient};
use peerlink_directory::clock::SystemClock;
use peerlink_directory::memory::MemoryStore;
use peerlink_directory::server::{AppState, HttpLimits, app};
use peerlink_directory::store::StoreConfig;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "client-test-token";
const STEP: Duration = Duration::from_secs(30);

struct Server {
    url: String,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

async fn serve(node_ttl: Duration) -> Server {
    let cfg = StoreConfig {
        presence_ttl: Duration::from_secs(30),
        node_ttl,
        seed: Some(5),
    };
    let state = AppState::new(
        Arc::new(MemoryStore::new(cfg)),
        Arc::new(SystemClock::new()),
        cfg,
        HttpLimits::default(),
        TOKEN,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let s = stop.clone();
    let task = tokio::spawn(async move {
        axum::serve(listener, app(state))
            .with_graceful_shutdown(async move { s.cancelled().await })
            .await
            .unwrap();
    });
    Server {
        url,
        stop,
        task: Some(task),
    }
}

async fn t<F: std::future::Future>(f: F) -> F::Output {
    timeout(STEP, f).await.expect("timed out")
}

#[tokio::test]
async fn every_client_method_round_trips() {
    let srv = serve(Duration::from_secs(10)).await;
    let c = DirectoryClient::new(&format!("{}/", srv.url), TOKEN).unwrap();
    t(c.health()).await.unwrap();
    let r = t(c.register_node(&RegisterNodeRequest {
        node_id: "n1".into(),
        internal_url: "http://127.0.0.1:1".into(),
        epoch: 3,
        load: 0.2,
    }))
    .await
    .unwrap();
    assert_eq!(r.heartbeat_interval_ms, 3_333);
    t(c.node_heartbeat(&NodeHeartbeatRequest {
        node_id: "n1".into(),
        epoch: 3,
        load: 0.3,
        stats: None,
    }))
    .await
    .unwrap();
    let weird = "ann/ë ?#%";
    let out = t(c.update_presence(&PresenceUpdate {
        user: weird.into(),
        device: "d".into(),
        node_id: "n1".into(),
        node_epoch: 3,
        status: PresenceStatus::Away,
    }))
    .await
    .unwrap();
    assert_eq!(out, UpdateOutcome::Applied);
    let b = t(c.update_presence_batch(&PresenceBatchRequest {
        node_id: "n1".into(),
        node_epoch: 3,
        entries: vec![NodePresence {
            user: "bo".into(),
            device: "d".into(),
            status: PresenceStatus::Online,
        }],
    }))
    .await
    .unwrap();
    assert_eq!(b.applied, 1);
    let loc = t(c.lookup_user(weird)).await.unwrap();
    assert_eq!(loc.user, weird, "path segment encoded and decoded");
    assert_eq!(loc.devices[0].status, PresenceStatus::Away);
    let many = t(c.lookup_users(&[weird.into(), "bo".into()]))
        .await
        .unwrap();
    assert_eq!(many.len(), 2);
    assert_eq!(many[1].devices.len(), 1);
    let nodes = t(c.list_nodes()).await.unwrap();
    assert_eq!(nodes[0].load, 0.3);
    let rm = t(c.remove_presence(&PresenceRemove {
        user: "bo".into(),
        device: "d".into(),
        node_id: "n1".into(),
        node_epoch: 3,
    }))
    .await
    .unwrap();
    assert_eq!(rm, RemoveOutcome::Removed);

    let reg = RegisterRelayRequest {
        relay_id: "r1".into(),
        turn_addr: "127.0.0.1:3478".parse().unwrap(),
        turn_tcp_addr: None,
        turn_tls_addr: None,
        metrics_addr: "127.0.0.1:9641".parse().unwrap(),
        region: "eu".into(),
        capacity: 10,
        load: 0.0,
        allocations: 0,
        draining: false,
    };
    t(c.register_relay(&reg)).await.unwrap();
    let chosen = t(c.choose_relays(&ChooseRelaysRequest {
        caller_region: "eu".into(),
        callee_region: None,
        count: 2,
    }))
    .await
    .unwrap();
    assert_eq!(chosen.len(), 1);
    assert_eq!(chosen[0].turn_addr, reg.turn_addr);
    t(c.relay_heartbeat(&RelayHeartbeatRequest {
        relay_id: "r1".into(),
        load: 0.5,
        allocations: 1,
        draining: false,
        stats: None,
    }))
    .await
    .unwrap();
    assert_eq!(t(c.list_relays()).await.unwrap()[0].allocations, 1);
    assert!(t(c.deregister_relay("r1")).await.unwrap().removed);
    let d = t(c.deregister_node("n1", 3)).await.unwrap();
    assert_eq!(d.purged_presence, 1);

    // Error mapping.
    let e = t(c.node_heartbeat(&NodeHeartbeatRequest {
        node_id: "n1".into(),
        epoch: 3,
        load: 0.0,
        stats: None,
    }))
    .await
    .unwrap_err();
    assert!(e.is_unknown(), "{e}");
    assert!(matches!(e, ClientError::Api { status: 404, .. }));
    let e = t(c.relay_heartbeat(&RelayHeartbeatRequest {
        relay_id: "r1".into(),
        load: 0.0,
        allocations: 0,
        draining: false,
        stats: None,
    }))
    .await
    .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::UnknownRelay));
    let bad = DirectoryClient::new(&srv.url, "wrong-token").unwrap();
    let e = t(bad.list_nodes()).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Unauthorized));
    assert!(matches!(
        DirectoryClient::new("not a url", TOKEN),
        Err(ClientError::InvalidUrl { .. })
    ));
    assert!(matches!(
        DirectoryClient::new("https://127.0.0.1:1", TOKEN),
        Err(ClientError::InvalidUrl { .. })
    ));
    drop(srv);
}

#[tokio::test]
async fn registration_loop_stops_when_superseded_and_when_dropped() {
    // Node TTL 300 ms -> heartbeat every 100 ms.
    let srv = serve(Duration::from_millis(300)).await;
    let c = DirectoryClient::new(&srv.url, TOKEN).unwrap();
    let reg = RegisterNodeRequest {
        node_id: "n1".into(),
        internal_url: "http://127.0.0.1:1".into(),
        epoch: 1,
        load: 0.0,
    };
    let h = c.spawn_node_registration(reg.clone(), Vec::new);
    h.set_load(0.7);
    let mut rx = h.subscribe();
    t(rx.wait_for(|s| s.heartbeats >= 2)).await.unwrap();
    assert!((t(c.list_nodes()).await.unwrap()[0].load - 0.7).abs() < 1e-9);
    // A newer incarnation registers: the old loop learns it is stale and stops.
    t(c.register_node(&RegisterNodeRequest {
        epoch: 2,
        ..reg.clone()
    }))
    .await
    .unwrap();
    let s = t(rx.wait_for(|s| s.superseded)).await.unwrap().clone();
    assert!(!s.registered);
    assert_eq!(s.registrations, 1, "it did not fight the newer epoch");
    // The task ended: its sender is gone.
    assert!(t(rx.changed()).await.is_err());
    assert_eq!(t(c.list_nodes()).await.unwrap()[0].epoch, 2);

    // Dropping a live loop's handle ends the task too.
    let h2 = c.spawn_node_registration(RegisterNodeRequest { epoch: 3, ..reg }, Vec::new);
    let mut rx2 = h2.subscribe();
    t(rx2.wait_for(|s| s.registrations == 1)).await.unwrap();
    drop(h2);
    let ended = timeout(STEP, async { while rx2.changed().await.is_ok() {} }).await;
    assert!(
        ended.is_ok(),
        "loop task ended after its handle was dropped"
    );
    drop(h);
}

/// A loopback HTTP server that answers every request `503` with a body that is not our API.
async fn always_503() -> (String, tokio::task::JoinHandle<()>) {
    use axum::http::StatusCode;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let router =
        axum::Router::new().fallback(|| async { (StatusCode::SERVICE_UNAVAILABLE, "down") });
    let task = tokio::spawn(async move {
        axum::serve(listener, router).await.unwrap();
    });
    (url, task)
}

#[tokio::test]
async fn several_urls_fail_over_on_connection_errors_and_5xx_and_stick() {
    let srv = serve(Duration::from_secs(10)).await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let (broken, broken_task) = always_503().await;
    let c = DirectoryClient::new(&format!("{dead}, {broken},{}", srv.url), TOKEN).unwrap();
    assert_eq!(c.base_urls().len(), 3);
    assert_eq!(c.base_url().as_str(), format!("{dead}/"));
    let reg = RegisterNodeRequest {
        node_id: "n1".into(),
        internal_url: "http://127.0.0.1:1".into(),
        epoch: 1,
        load: 0.0,
    };
    t(c.register_node(&reg)).await.unwrap();
    assert_eq!(
        c.base_url().as_str(),
        format!("{}/", srv.url),
        "sticks to the one that answered"
    );
    let clone = c.clone();
    assert_eq!(t(clone.list_nodes()).await.unwrap().len(), 1);
    assert_eq!(clone.base_url().as_str(), format!("{}/", srv.url));
    // A 4xx answer is an answer: no failover.
    let e = t(c.node_heartbeat(&NodeHeartbeatRequest {
        node_id: "ghost".into(),
        epoch: 1,
        load: 0.0,
        stats: None,
    }))
    .await
    .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::UnknownNode));
    assert_eq!(c.base_url().as_str(), format!("{}/", srv.url));
    // Every URL failing: the last error, retryable.
    drop(srv);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let e = t(c.list_nodes()).await.unwrap_err();
    assert!(e.is_retryable(), "{e}");
    broken_task.abort();
    // Bad lists are refused up front.
    for bad in [
        "",
        "http://a:1,",
        "http://a:1,https://b:2",
        "http://a:1, ,http://b:2",
    ] {
        assert!(
            matches!(
                DirectoryClient::new(bad, TOKEN),
                Err(ClientError::InvalidUrl { .. })
            ),
            "{bad:?}"
        );
    }
    let many = vec!["http://127.0.0.1:1"; 17].join(",");
    assert!(DirectoryClient::new(&many, TOKEN).is_err());
}
