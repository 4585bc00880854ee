//! `app()` driven in-process with `tower::ServiceExt::oneshot`: every endpoint, auth failures,
//! bad JSON, size limits, and TTLs under a virtual clock. The behaviour tests run on both
//! stores (`memory::*`, and `redis::*` over a real `redis-server`).

// Test code: unwrap on fixtures is fine (clippy.toml allows it inside #[test] fns only).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use peerlink_api::directory::*;
use peerlink_directory::clock::{ManualClock, Timestamp};
use peerlink_directory::memory::MemoryStore;
use peerlink_directory::redis_store::{self, RedisOptions, RedisStore};
use peerlink_directory::server::{AppState, HttpLimits, app};
use peerlink_directory::store::{DirectoryStore, StoreConfig};
use peerlink_testkit::redis::RedisServer;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tower::ServiceExt;

const TOKEN: &str = "test-cluster-token";
const BODY_LIMIT: usize = 64 * 1024;

struct Harness {
    app: Router,
    clock: Arc<ManualClock>,
}

fn test_cfg() -> StoreConfig {
    StoreConfig {
        presence_ttl: Duration::from_secs(30),
        node_ttl: Duration::from_secs(10),
        seed: Some(1),
    }
}

fn harness_on<S: DirectoryStore>(store: S) -> Harness {
    let cfg = test_cfg();
    let clock = Arc::new(ManualClock::new(Timestamp(1_000)));
    let state = AppState::new(
        Arc::new(store),
        clock.clone(),
        cfg,
        HttpLimits {
            request_timeout: Duration::from_secs(5),
            body_limit: BODY_LIMIT,
        },
        TOKEN,
    );
    Harness {
        app: app(state),
        clock,
    }
}

fn harness() -> Harness {
    harness_on(MemoryStore::new(test_cfg()))
}

/// The same service over a `RedisStore` on a server of its own (`None` without redis-server).
async fn redis_harness() -> Option<(Harness, RedisServer)> {
    let server = RedisServer::start()?;
    let loc = redis_store::parse_location(&server.url(0)).unwrap();
    let store = tokio::time::timeout(
        Duration::from_secs(20),
        RedisStore::connect(loc, test_cfg(), RedisOptions::default()),
    )
    .await
    .unwrap()
    .unwrap();
    Some((harness_on(store), server))
}

/// The HTTP behaviour tests, on both stores: `memory::NAME` and `redis::NAME`.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::harness()).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some((h, _server)) = super::redis_harness().await else {
                        return;
                    };
                    super::$name(h).await;
                }
            )*
        }
    };
}

on_both_stores!(
    healthz_and_metrics_need_no_token,
    node_and_presence_lifecycle_over_http,
    presence_ttl_over_http_with_virtual_time,
    relay_registry_and_choice_over_http,
);

struct Answer {
    status: StatusCode,
    body: Vec<u8>,
}

impl Answer {
    fn json<T: DeserializeOwned>(&self) -> T {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{e}: status {} body {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn error(&self) -> ErrorDetail {
        self.json::<ErrorBody>().error
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl Harness {
    async fn raw(&self, req: Request<Body>) -> Answer {
        let resp = tokio::time::timeout(Duration::from_secs(10), self.app.clone().oneshot(req))
            .await
            .expect("request timed out")
            .expect("infallible");
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), 16 * 1024 * 1024)
            .await
            .expect("body");
        Answer {
            status,
            body: body.to_vec(),
        }
    }

    async fn post<B: Serialize>(&self, path: &str, body: &B) -> Answer {
        self.raw(
            Request::post(path)
                .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(serde_json::to_vec(body).unwrap()))
                .unwrap(),
        )
        .await
    }

    async fn get(&self, path: &str) -> Answer {
        self.raw(
            Request::get(path)
                .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
    }

    async fn ok<B: Serialize, R: DeserializeOwned>(&self, path: &str, body: &B) -> R {
        let a = self.post(path, body).await;
        assert_eq!(a.status, StatusCode::OK, "{path}: {}", a.text());
        a.json()
    }

    async fn register_node(&self, id: &str, epoch: u64) -> RegisterNodeResponse {
        self.ok(
            "/v1/nodes/register",
            &RegisterNodeRequest {
                node_id: id.into(),
                internal_url: format!("http://{id}:8443"),
                epoch,
                load: 0.0,
            },
        )
        .await
    }

    async fn presence(&self, user: &str, device: &str, node: &str, epoch: u64) -> Answer {
        self.post(
            "/v1/presence",
            &PresenceUpdate {
                user: user.into(),
                device: device.into(),
                node_id: node.into(),
                node_epoch: epoch,
                status: PresenceStatus::Online,
            },
        )
        .await
    }
}

fn relay_req(id: &str, region: &str) -> RegisterRelayRequest {
    RegisterRelayRequest {
        relay_id: id.into(),
        turn_addr: "127.0.0.1:3478".parse().unwrap(),
        turn_tcp_addr: None,
        turn_tls_addr: None,
        metrics_addr: "127.0.0.1:9641".parse().unwrap(),
        region: region.into(),
        capacity: 100,
        load: 0.0,
        allocations: 0,
        draining: false,
    }
}

const V1_ROUTES: &[(&str, &str)] = &[
    ("POST", "/v1/nodes/register"),
    ("POST", "/v1/nodes/heartbeat"),
    ("POST", "/v1/nodes/deregister"),
    ("GET", "/v1/nodes"),
    ("POST", "/v1/presence"),
    ("POST", "/v1/presence/batch"),
    ("POST", "/v1/presence/remove"),
    ("POST", "/v1/presence/lookup"),
    ("GET", "/v1/presence/alice"),
    ("POST", "/v1/relays/register"),
    ("POST", "/v1/relays/heartbeat"),
    ("POST", "/v1/relays/deregister"),
    ("GET", "/v1/relays"),
    ("POST", "/v1/relays/choose"),
];

#[tokio::test]
async fn every_v1_route_refuses_missing_or_wrong_token() {
    let h = harness();
    let auths: [Option<String>; 5] = [
        None,
        Some("Bearer wrong-token-of-same-len".into()),
        Some(format!("Bearer {TOKEN}x")),
        Some(format!("Basic {TOKEN}")),
        Some(format!("bearer{TOKEN}")),
    ];
    for (method, path) in V1_ROUTES {
        for auth in &auths {
            let mut b = Request::builder()
                .method(Method::from_bytes(method.as_bytes()).unwrap())
                .uri(*path)
                .header(header::CONTENT_TYPE, "application/json");
            if let Some(a) = auth {
                b = b.header(header::AUTHORIZATION, a);
            }
            let a = h.raw(b.body(Body::from("{}")).unwrap()).await;
            assert_eq!(
                a.status,
                StatusCode::UNAUTHORIZED,
                "{method} {path} {auth:?}"
            );
            assert_eq!(a.error().code, ErrorCode::Unauthorized);
        }
    }
    // Nothing was created by the refused requests.
    assert!(h.get("/v1/nodes").await.json::<NodeList>().nodes.is_empty());
    let m = h
        .raw(Request::get("/metrics").body(Body::empty()).unwrap())
        .await;
    assert!(
        m.text().contains(&format!(
            "peerlink_directory_unauthorized_total {}",
            V1_ROUTES.len() * 5
        )),
        "{}",
        m.text()
    );
}

async fn healthz_and_metrics_need_no_token(h: Harness) {
    let a = h
        .raw(Request::get("/healthz").body(Body::empty()).unwrap())
        .await;
    assert_eq!((a.status, a.text().as_str()), (StatusCode::OK, "ok"));
    h.register_node("n1", 1).await;
    h.presence("alice", "phone", "n1", 1).await;
    h.get("/v1/presence/alice").await;
    let m = h
        .raw(Request::get("/metrics").body(Body::empty()).unwrap())
        .await;
    assert_eq!(m.status, StatusCode::OK);
    let text = m.text();
    for line in [
        "peerlink_directory_nodes 1",
        "peerlink_directory_presence_entries 1",
        "peerlink_directory_lookups_total 1",
        "peerlink_directory_relays_healthy 0",
        "peerlink_directory_choose_requests_total 0",
        "# TYPE peerlink_directory_lookups_total counter",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
}

#[tokio::test]
async fn bad_json_gets_a_clear_error() {
    let h = harness();
    let send = |body: &'static str, ctype: Option<&'static str>| {
        let mut b = Request::post("/v1/nodes/register")
            .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"));
        if let Some(c) = ctype {
            b = b.header(header::CONTENT_TYPE, c);
        }
        b.body(Body::from(body)).unwrap()
    };
    let a = h.raw(send("{not json", Some("application/json"))).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    let e = a.error();
    assert_eq!(e.code, ErrorCode::BadRequest);
    assert!(e.message.to_lowercase().contains("json"), "{}", e.message);

    let a = h
        .raw(send(
            r#"{"node_id":"n1","epoch":1}"#,
            Some("application/json"),
        ))
        .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);
    let e = a.error();
    assert_eq!(e.code, ErrorCode::BadRequest);
    assert!(
        e.message.contains("internal_url"),
        "names the field: {}",
        e.message
    );

    let a = h
        .raw(send(
            r#"{"node_id":"n1","internal_url":"http://x","epoch":-1}"#,
            Some("application/json"),
        ))
        .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(a.error().message.contains("epoch"));

    let a = h.raw(send("{}", None)).await;
    assert_eq!(a.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(a.error().code, ErrorCode::BadRequest);

    // Field validation.
    for (path, body) in [
        (
            "/v1/nodes/register",
            serde_json::json!({"node_id":"","internal_url":"http://x","epoch":1}),
        ),
        (
            "/v1/nodes/register",
            serde_json::json!({"node_id":"n","internal_url":"ftp://x","epoch":1}),
        ),
        (
            "/v1/nodes/register",
            serde_json::json!({"node_id":"x".repeat(MAX_ID_LEN + 1),"internal_url":"http://x","epoch":1}),
        ),
        (
            "/v1/nodes/heartbeat",
            serde_json::json!({"node_id":"n","epoch":1,"load":-1.0}),
        ),
        (
            "/v1/presence",
            serde_json::json!({"user":"a\u{0}b","device":"d","node_id":"n","node_epoch":1,"status":"online"}),
        ),
        (
            "/v1/relays/choose",
            serde_json::json!({"caller_region":"eu","count":0}),
        ),
        (
            "/v1/relays/choose",
            serde_json::json!({"caller_region":"eu","count":MAX_CHOOSE_COUNT + 1}),
        ),
        ("/v1/relays/choose", serde_json::json!({"caller_region":""})),
        (
            "/v1/relays/register",
            serde_json::json!({"relay_id":"r","turn_addr":"127.0.0.1:3478","metrics_addr":"127.0.0.1:9641","region":"eu","capacity":0}),
        ),
    ] {
        let a = h.post(path, &body).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{path} {body}");
        assert_eq!(a.error().code, ErrorCode::InvalidField, "{path} {body}");
    }
    let a = h
        .post(
            "/v1/presence",
            &serde_json::json!({"user":"a","device":"d","node_id":"n","node_epoch":1,"status":"asleep"}),
        )
        .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        a.error().message.contains("status"),
        "{}",
        a.error().message
    );
    // Unknown route: JSON 404.
    let a = h.get("/v1/nope").await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert_eq!(a.error().code, ErrorCode::NotFound);
}

#[tokio::test]
async fn oversized_bodies_and_batches_are_refused() {
    let h = harness();
    h.register_node("n1", 1).await;
    let big = LookupRequest {
        users: vec!["u".repeat(100); BODY_LIMIT / 100 + 10],
    };
    let a = h.post("/v1/presence/lookup", &big).await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(a.error().code, ErrorCode::PayloadTooLarge);
    // Within the byte limit but over the count limit.
    let many = LookupRequest {
        users: vec!["u".into(); MAX_LOOKUP_BATCH + 1],
    };
    let a = h.post("/v1/presence/lookup", &many).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(a.error().code, ErrorCode::InvalidField);
    let batch = PresenceBatchRequest {
        node_id: "n1".into(),
        node_epoch: 1,
        entries: vec![
            NodePresence {
                user: "u".into(),
                device: "d".into(),
                status: PresenceStatus::Online
            };
            MAX_PRESENCE_BATCH + 1
        ],
    };
    let a = h.post("/v1/presence/batch", &batch).await;
    // Over the byte limit of this harness already (5,001 x ~40 bytes > 64 KiB).
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE);
    // Chunked streaming body without a Content-Length is limited too.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..100).map(|_| Ok(vec![b' '; 1024])).collect();
    let req = Request::post("/v1/presence/lookup")
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(futures_util::stream::iter(chunks)))
        .unwrap();
    let a = h.raw(req).await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE);
}

async fn node_and_presence_lifecycle_over_http(h: Harness) {
    let r = h.register_node("n1", 1).await;
    assert_eq!(r.heartbeat_interval_ms, 3_333);
    assert_eq!((r.node_ttl_ms, r.presence_ttl_ms), (10_000, 30_000));
    assert_eq!(r.previous_epoch, None);
    h.register_node("n2", 1).await;

    let a = h.presence("alice", "phone", "n1", 1).await;
    assert_eq!(a.json::<UpdateOutcome>(), UpdateOutcome::Applied);
    assert_eq!(a.text(), r#"{"outcome":"applied"}"#);
    let batch: PresenceBatchResponse = h
        .ok(
            "/v1/presence/batch",
            &PresenceBatchRequest {
                node_id: "n2".into(),
                node_epoch: 1,
                entries: vec![
                    NodePresence {
                        user: "alice".into(),
                        device: "laptop".into(),
                        status: PresenceStatus::Away,
                    },
                    NodePresence {
                        user: "bob smith/ü".into(),
                        device: "pc".into(),
                        status: PresenceStatus::Busy,
                    },
                ],
            },
        )
        .await;
    assert_eq!(batch.outcome, UpdateOutcome::Applied);
    assert_eq!(batch.applied, 2);

    // Single lookup, including a user id that needs percent-encoding in the path.
    let loc: UserLocation = h.get("/v1/presence/alice").await.json();
    let devs: Vec<_> = loc
        .devices
        .iter()
        .map(|d| (d.device.as_str(), d.node_id.as_str(), d.node_url.as_deref()))
        .collect();
    assert_eq!(
        devs,
        [
            ("laptop", "n2", Some("http://n2:8443")),
            ("phone", "n1", Some("http://n1:8443"))
        ]
    );
    let loc: UserLocation = h.get("/v1/presence/bob%20smith%2F%C3%BC").await.json();
    assert_eq!(loc.user, "bob smith/ü");
    assert_eq!(loc.devices[0].status, PresenceStatus::Busy);

    // Batch lookup: order kept, offline users present with no devices.
    let look: LookupResponse = h
        .ok(
            "/v1/presence/lookup",
            &LookupRequest {
                users: vec!["carol".into(), "alice".into()],
            },
        )
        .await;
    assert_eq!(look.users[0].user, "carol");
    assert!(look.users[0].devices.is_empty());
    assert_eq!(look.users[1].devices.len(), 2);

    // Heartbeats; unknown node and stale epoch.
    let hb: HeartbeatResponse = h
        .ok(
            "/v1/nodes/heartbeat",
            &NodeHeartbeatRequest {
                node_id: "n1".into(),
                epoch: 1,
                load: 0.5,
                stats: None,
            },
        )
        .await;
    assert_eq!(hb.heartbeat_interval_ms, 3_333);
    let a = h
        .post(
            "/v1/nodes/heartbeat",
            &NodeHeartbeatRequest {
                node_id: "ghost".into(),
                epoch: 1,
                load: 0.0,
                stats: None,
            },
        )
        .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert_eq!(a.error().code, ErrorCode::UnknownNode);
    let a = h.presence("x", "d", "ghost", 1).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert_eq!(a.error().code, ErrorCode::UnknownNode);

    // n1 restarts with epoch 2: its old entries vanish at once; its zombie is ignored.
    let r = h.register_node("n1", 2).await;
    assert_eq!((r.purged_presence, r.previous_epoch), (1, Some(1)));
    let a = h.presence("alice", "tablet", "n1", 1).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.text(), r#"{"outcome":"stale","current_epoch":2}"#);
    let loc: UserLocation = h.get("/v1/presence/alice").await.json();
    assert_eq!(loc.devices.len(), 1);
    assert_eq!(loc.devices[0].device, "laptop");
    let a = h
        .post(
            "/v1/nodes/register",
            &RegisterNodeRequest {
                node_id: "n1".into(),
                internal_url: "http://n1:8443".into(),
                epoch: 1,
                load: 0.0,
            },
        )
        .await;
    assert_eq!(a.status, StatusCode::CONFLICT);
    assert_eq!(a.error().code, ErrorCode::StaleEpoch);

    // Remove.
    let rm = PresenceRemove {
        user: "alice".into(),
        device: "laptop".into(),
        node_id: "n2".into(),
        node_epoch: 1,
    };
    let out: RemoveOutcome = h.ok("/v1/presence/remove", &rm).await;
    assert_eq!(out, RemoveOutcome::Removed);
    let out: RemoveOutcome = h.ok("/v1/presence/remove", &rm).await;
    assert_eq!(out, RemoveOutcome::NotFound);

    // List and deregister.
    let nodes: NodeList = h.get("/v1/nodes").await.json();
    let ids: Vec<_> = nodes
        .nodes
        .iter()
        .map(|n| (n.node_id.as_str(), n.epoch))
        .collect();
    assert_eq!(ids, [("n1", 2), ("n2", 1)]);
    let d: DeregisterNodeResponse = h
        .ok(
            "/v1/nodes/deregister",
            &DeregisterNodeRequest {
                node_id: "n2".into(),
                epoch: 1,
            },
        )
        .await;
    assert_eq!(
        d,
        DeregisterNodeResponse {
            removed: true,
            purged_presence: 1
        }
    );
    let loc: UserLocation = h.get("/v1/presence/bob%20smith%2F%C3%BC").await.json();
    assert!(loc.devices.is_empty());
}

async fn presence_ttl_over_http_with_virtual_time(h: Harness) {
    h.register_node("n1", 1).await;
    h.presence("alice", "phone", "n1", 1).await;
    // The node keeps heartbeating for a minute: alice stays online.
    for _ in 0..20 {
        h.clock.advance(Duration::from_secs(3));
        let a = h
            .post(
                "/v1/nodes/heartbeat",
                &NodeHeartbeatRequest {
                    node_id: "n1".into(),
                    epoch: 1,
                    load: 0.0,
                    stats: None,
                },
            )
            .await;
        assert_eq!(a.status, StatusCode::OK);
    }
    let loc: UserLocation = h.get("/v1/presence/alice").await.json();
    assert_eq!(loc.devices.len(), 1);
    assert_eq!(loc.devices[0].last_seen_age_ms, 60_000);
    // The node dies: after the node TTL it is no longer listed; after the presence TTL
    // alice is offline.
    h.clock.advance(Duration::from_secs(10));
    assert!(h.get("/v1/nodes").await.json::<NodeList>().nodes.is_empty());
    assert_eq!(
        h.get("/v1/presence/alice")
            .await
            .json::<UserLocation>()
            .devices
            .len(),
        1
    );
    h.clock.advance(Duration::from_secs(20));
    assert!(
        h.get("/v1/presence/alice")
            .await
            .json::<UserLocation>()
            .devices
            .is_empty()
    );
}

async fn relay_registry_and_choice_over_http(h: Harness) {
    for (id, region) in [("eu1", "eu"), ("eu2", "eu"), ("us1", "us")] {
        let r: RegisterRelayResponse = h.ok("/v1/relays/register", &relay_req(id, region)).await;
        assert_eq!(
            r,
            RegisterRelayResponse {
                heartbeat_interval_ms: 3_333,
                relay_ttl_ms: 10_000
            }
        );
    }
    let c: ChooseRelaysResponse = h
        .ok(
            "/v1/relays/choose",
            &serde_json::json!({"caller_region":"us","callee_region":"eu","count":2}),
        )
        .await;
    assert_eq!(c.relays.len(), 2);
    assert_eq!(c.relays[0].relay_id, "us1");
    assert_eq!(c.relays[1].region, "eu");
    // Default count is 1.
    let c: ChooseRelaysResponse = h
        .ok(
            "/v1/relays/choose",
            &serde_json::json!({"caller_region":"eu"}),
        )
        .await;
    assert_eq!(c.relays.len(), 1);
    assert_eq!(c.relays[0].region, "eu");

    let list: RelayList = h.get("/v1/relays").await.json();
    assert_eq!(list.relays.len(), 3);
    assert_eq!(list.relays.iter().map(|r| r.handed_out).sum::<u64>(), 3);
    assert!(list.relays.iter().all(|r| r.healthy));

    // Heartbeat resets the counter and can mark draining.
    for id in ["eu1", "eu2"] {
        let _: HeartbeatResponse = h
            .ok(
                "/v1/relays/heartbeat",
                &RelayHeartbeatRequest {
                    relay_id: id.into(),
                    load: 0.1,
                    allocations: 1,
                    draining: id == "eu1",
                    stats: None,
                },
            )
            .await;
    }
    let list: RelayList = h.get("/v1/relays").await.json();
    assert_eq!(list.relays[0].handed_out, 0);
    assert!(list.relays[0].draining);
    for _ in 0..10 {
        let c: ChooseRelaysResponse = h
            .ok(
                "/v1/relays/choose",
                &serde_json::json!({"caller_region":"eu"}),
            )
            .await;
        assert_eq!(c.relays[0].relay_id, "eu2", "draining eu1 is never chosen");
    }
    // Unknown relay heartbeat -> 404 unknown_relay.
    let a = h
        .post(
            "/v1/relays/heartbeat",
            &RelayHeartbeatRequest {
                relay_id: "nope".into(),
                load: 0.0,
                allocations: 0,
                draining: false,
                stats: None,
            },
        )
        .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert_eq!(a.error().code, ErrorCode::UnknownRelay);
    // After the TTL nothing is healthy: an empty choice.
    h.clock.advance(Duration::from_secs(10));
    let c: ChooseRelaysResponse = h
        .ok(
            "/v1/relays/choose",
            &serde_json::json!({"caller_region":"eu"}),
        )
        .await;
    assert!(c.relays.is_empty());
    let d: DeregisterRelayResponse = h
        .ok(
            "/v1/relays/deregister",
            &DeregisterRelayRequest {
                relay_id: "us1".into(),
            },
        )
        .await;
    assert!(d.removed);
    assert_eq!(
        h.get("/v1/relays").await.json::<RelayList>().relays.len(),
        2
    );
    let m = h
        .raw(Request::get("/metrics").body(Body::empty()).unwrap())
        .await;
    assert!(
        m.text()
            .contains("peerlink_directory_choices_empty_total 1")
    );
    assert!(m.text().contains("peerlink_directory_relays_known 2"));
}

#[tokio::test(start_paused = true)]
async fn a_request_that_never_finishes_times_out() {
    // Virtual time: the 5 s request timeout fires without waiting 5 real seconds.
    let h = harness();
    let never = futures_util::stream::pending::<Result<Vec<u8>, std::io::Error>>();
    let req = Request::post("/v1/presence/lookup")
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(never))
        .unwrap();
    let a = h.raw(req).await;
    assert_eq!(a.status, StatusCode::REQUEST_TIMEOUT);
}

#[tokio::test(start_paused = true)]
async fn sweeper_removes_expired_entries_and_stops_on_request() {
    use peerlink_directory::server::{Sweeper, sweep_interval};
    let cfg = StoreConfig {
        presence_ttl: Duration::from_secs(30),
        node_ttl: Duration::from_secs(10),
        seed: Some(1),
    };
    let clock = Arc::new(ManualClock::new(Timestamp(0)));
    let store = Arc::new(MemoryStore::new(cfg));
    let state = AppState::new(
        store.clone(),
        clock.clone(),
        cfg,
        HttpLimits::default(),
        TOKEN,
    );
    store
        .register_node_now(
            RegisterNodeRequest {
                node_id: "n1".into(),
                internal_url: "http://n1".into(),
                epoch: 1,
                load: 0.0,
            },
            Timestamp(0),
        )
        .unwrap();
    for u in ["a", "b", "c"] {
        store
            .update_presence_now(
                &PresenceUpdate {
                    user: u.into(),
                    device: "d".into(),
                    node_id: "n1".into(),
                    node_epoch: 1,
                    status: PresenceStatus::Online,
                },
                Timestamp(0),
            )
            .unwrap();
    }
    let every = sweep_interval(&cfg);
    assert_eq!(every, Duration::from_millis(2_500));
    let sweeper = Sweeper::spawn(state.clone(), every);
    // Virtual clock past both TTLs; then let the sweeper tick (tokio's paused time).
    clock.set(Timestamp(30_000));
    let mut waited = Duration::ZERO;
    while store.stats_now(Timestamp(30_000)).presence_entries > 0 {
        assert!(waited < Duration::from_secs(60), "sweeper never ran");
        tokio::time::sleep(every).await;
        waited += every;
    }
    let app = app(state);
    let m = app
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let text = axum::body::to_bytes(m.into_body(), 1 << 20).await.unwrap();
    let text = String::from_utf8_lossy(&text);
    assert!(
        text.contains("peerlink_directory_swept_presence_total 3"),
        "{text}"
    );
    assert!(
        text.contains("peerlink_directory_swept_nodes_total 1"),
        "{text}"
    );
    timeout_stop(sweeper).await;
}

async fn timeout_stop(s: peerlink_directory::server::Sweeper) {
    tokio::time::timeout(Duration::from_secs(10), s.stop())
        .await
        .expect("sweeper stopped");
}
