//! The operators' console (`/console`) driven in-process with `tower::ServiceExt::oneshot`:
//! off without an operator token, 401 and the login form without the right token, the login
//! cookie, security headers, heartbeat snapshots validated and shown (rates, latency), the
//! event stream, and two replicas on one Redis showing the same fleet.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use futures_util::StreamExt;
use peerlink_api::directory::*;
use peerlink_api::fleet_stats::{LatencyHistogram, NodeStatsSnapshot, RelayStatsSnapshot};
use peerlink_directory::clock::{ManualClock, Timestamp};
use peerlink_directory::console::view::ReplicaRecord;
use peerlink_directory::console::{Beacon, Console};
use peerlink_directory::memory::MemoryStore;
use peerlink_directory::redis_store::{self, RedisOptions, RedisStore};
use peerlink_directory::server::{AppState, HttpLimits, app};
use peerlink_directory::store::{DirectoryStore, StoreConfig};
use serde_json::Value;
use tower::ServiceExt;

const CLUSTER: &str = "test-cluster-token";
const OPERATOR: &str = "operator-token-0123456789";

fn cfg() -> StoreConfig {
    StoreConfig {
        presence_ttl: Duration::from_secs(30),
        node_ttl: Duration::from_secs(10),
        seed: Some(1),
    }
}

fn state_on<S: DirectoryStore>(store: Arc<S>, clock: Arc<ManualClock>) -> AppState<S> {
    AppState::new(store, clock, cfg(), HttpLimits::default(), CLUSTER)
}

fn with_console<S: DirectoryStore>(st: AppState<S>, replica: &str) -> Router {
    app(st.with_console(Arc::new(Console::new(OPERATOR, replica))))
}

async fn send(app: &Router, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, String) {
    let r = tokio::time::timeout(Duration::from_secs(10), app.clone().oneshot(req))
        .await
        .unwrap()
        .unwrap();
    let status = r.status();
    let headers = r.headers().clone();
    let body = axum::body::to_bytes(r.into_body(), 16 << 20).await.unwrap();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

fn get(path: &str, auth: Option<(&str, &str)>) -> Request<Body> {
    let mut b = Request::builder().uri(path);
    if let Some((name, value)) = auth {
        b = b.header(name, value);
    }
    b.body(Body::empty()).unwrap()
}

fn bearer() -> (&'static str, String) {
    ("authorization", format!("Bearer {OPERATOR}"))
}

async fn post_json(app: &Router, path: &str, body: &impl serde::Serialize) -> (StatusCode, String) {
    let req = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(header::AUTHORIZATION, format!("Bearer {CLUSTER}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap();
    let (s, _, b) = send(app, req).await;
    (s, b)
}

async fn fleet(app: &Router) -> Value {
    let (b0, b1) = bearer();
    let (s, h, body) = send(app, get("/console/api/fleet", Some((b0, &b1)))).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert!(
        h[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    serde_json::from_str(&body).unwrap()
}

fn relay_reg(id: &str) -> RegisterRelayRequest {
    RegisterRelayRequest {
        relay_id: id.into(),
        turn_addr: "127.0.0.1:3478".parse().unwrap(),
        turn_tcp_addr: None,
        turn_tls_addr: None,
        metrics_addr: "127.0.0.1:9641".parse().unwrap(),
        region: "local".into(),
        capacity: 100,
        load: 0.0,
        allocations: 0,
        draining: false,
    }
}

fn relay_hb(id: &str, draining: bool, stats: RelayStatsSnapshot) -> RelayHeartbeatRequest {
    RelayHeartbeatRequest {
        relay_id: id.into(),
        load: 0.02,
        allocations: 2,
        draining,
        stats: Some(stats),
    }
}

fn relay_stats(uptime_ms: u64, packets: u64, lat: &[(u64, u64)]) -> RelayStatsSnapshot {
    RelayStatsSnapshot {
        uptime_ms,
        packets_forwarded: packets,
        bytes_forwarded: packets * 200,
        auth_failures: 3,
        allocations_created: 2,
        latency_us: LatencyHistogram::from_values(lat.iter().copied()),
    }
}

#[tokio::test]
async fn without_an_operator_token_there_is_no_console() {
    let clock = Arc::new(ManualClock::new(Timestamp(1_000)));
    let app = app(state_on(Arc::new(MemoryStore::new(cfg())), clock));
    for path in ["/console", "/console/api/fleet", "/console/events"] {
        let (b0, b1) = bearer();
        let (s, _, _) = send(&app, get(path, Some((b0, &b1)))).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{path}");
    }
    // The cluster token does not open it either.
    let (s, _, _) = send(
        &app,
        get(
            "/console",
            Some(("authorization", &format!("Bearer {CLUSTER}"))),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn the_console_needs_the_operator_token_and_login_sets_an_http_only_cookie() {
    let clock = Arc::new(ManualClock::new(Timestamp(1_000)));
    let app = with_console(state_on(Arc::new(MemoryStore::new(cfg())), clock), "me");
    // No token, a wrong one, the cluster token, a wrong cookie: 401, the login form.
    for auth in [
        None,
        Some(("authorization", "Bearer wrong-token-0123456789".to_owned())),
        Some(("authorization", format!("Bearer {CLUSTER}"))),
        Some((
            "cookie",
            "peerlink_console=wrong-token-0123456789".to_owned(),
        )),
        Some(("authorization", OPERATOR.to_owned())),
    ] {
        let (s, h, body) = send(
            &app,
            get("/console", auth.as_ref().map(|(a, b)| (*a, b.as_str()))),
        )
        .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{auth:?}");
        assert!(body.contains("action=\"/console/login\""), "{body}");
        assert!(!body.contains(OPERATOR));
        assert!(
            h[header::CONTENT_SECURITY_POLICY]
                .to_str()
                .unwrap()
                .contains("script-src 'self'")
        );
        for path in ["/console/api/fleet", "/console/events"] {
            let (s, _, body) = send(
                &app,
                get(path, auth.as_ref().map(|(a, b)| (*a, b.as_str()))),
            )
            .await;
            assert_eq!(s, StatusCode::UNAUTHORIZED, "{path} {auth:?}");
            assert!(!body.contains("relays"), "{body}");
        }
    }
    // The bearer header opens the page; assets need no token (they hold no data).
    let (b0, b1) = bearer();
    let (s, h, body) = send(&app, get("/console", Some((b0, &b1)))).await;
    assert_eq!(s, StatusCode::OK);
    assert!(body.contains("/console/app.js") && body.contains("id=\"fleet-hdr\""));
    assert_eq!(h[header::CACHE_CONTROL], "no-store");
    assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
    let (s, h, js) = send(&app, get("/console/app.js", None)).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        h[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/javascript")
    );
    assert!(
        !js.contains("innerHTML"),
        "the script never builds HTML from data"
    );

    // A wrong login: 401, no cookie. The right one: 303 and an HttpOnly cookie that works.
    let login = |token: &str| {
        Request::builder()
            .method(Method::POST)
            .uri("/console/login")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(format!("token={token}")))
            .unwrap()
    };
    let (s, h, _) = send(&app, login("not-the-token-at-all")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(h.get(header::SET_COOKIE).is_none());
    let (s, h, _) = send(&app, login(OPERATOR)).await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    assert_eq!(h[header::LOCATION], "/console");
    let cookie = h[header::SET_COOKIE].to_str().unwrap().to_owned();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/console"] {
        assert!(cookie.contains(attr), "{cookie}");
    }
    let pair = cookie.split(';').next().unwrap().to_owned();
    let (s, _, _) = send(
        &app,
        get("/console", Some(("cookie", &format!("other=1; {pair}")))),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    // A body that is no form is a clear 400, not a panic.
    let bad = Request::builder()
        .method(Method::POST)
        .uri("/console/login")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from("{}"))
        .unwrap();
    assert_eq!(send(&app, bad).await.0, StatusCode::BAD_REQUEST);
    // Logout clears the cookie.
    let out = Request::builder()
        .method(Method::POST)
        .uri("/console/logout")
        .body(Body::empty())
        .unwrap();
    let (s, h, _) = send(&app, out).await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    assert!(
        h[header::SET_COOKIE]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
}

#[tokio::test]
async fn heartbeat_snapshots_are_validated_and_shown() {
    let clock = Arc::new(ManualClock::new(Timestamp(1_000)));
    let app = with_console(
        state_on(Arc::new(MemoryStore::new(cfg())), clock.clone()),
        "me",
    );
    for id in ["r1", "r2"] {
        assert_eq!(
            post_json(&app, "/v1/relays/register", &relay_reg(id))
                .await
                .0,
            StatusCode::OK
        );
    }
    // Malformed snapshots: 400 invalid_field naming the problem; the heartbeat is not taken.
    let mut bad = relay_stats(1_000, 10, &[(50, 3)]);
    bad.latency_us.buckets.reverse();
    bad.latency_us.buckets.push((1, 1));
    let (s, body) = post_json(&app, "/v1/relays/heartbeat", &relay_hb("r1", false, bad)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body.contains("invalid_field") && body.contains("ascending"),
        "{body}"
    );
    let raw = serde_json::json!({"relay_id": "r1", "load": 0.0, "allocations": 0, "draining": false,
        "stats": {"uptime_ms": 1, "packets_forwarded": 1, "bytes_forwarded": 1, "auth_failures": 0,
                  "allocations_created": 0, "latency_us": {"buckets": [[99999, 1]], "max": 5}}});
    let (s, body) = post_json(&app, "/v1/relays/heartbeat", &raw).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("out of range"), "{body}");
    let garbage = serde_json::json!({"relay_id": "r1", "load": 0.0, "allocations": 0,
        "draining": false, "stats": {"latency_us": "lots"}});
    assert_eq!(
        post_json(&app, "/v1/relays/heartbeat", &garbage).await.0,
        StatusCode::UNPROCESSABLE_ENTITY
    );

    // Before any snapshot: the relays are listed without figures.
    let doc = fleet(&app).await;
    assert_eq!(doc["relays"].as_array().unwrap().len(), 2, "{doc}");
    assert!(doc["relays"][0]["stats"].is_null());
    assert_eq!(doc["replica_id"], "me");
    assert_eq!(doc["store_ok"], true);

    // Two snapshots of r1 two seconds apart (on its clock): rates and the recent latency.
    let hb = relay_hb("r1", false, relay_stats(10_000, 1_000, &[(40, 900)]));
    assert_eq!(
        post_json(&app, "/v1/relays/heartbeat", &hb).await.0,
        StatusCode::OK
    );
    fleet(&app).await;
    clock.advance(Duration::from_secs(2));
    let hb = relay_hb(
        "r1",
        false,
        relay_stats(12_000, 3_000, &[(40, 900), (400, 100)]),
    );
    assert_eq!(
        post_json(&app, "/v1/relays/heartbeat", &hb).await.0,
        StatusCode::OK
    );
    // r2 drains.
    let hb = relay_hb("r2", true, relay_stats(5_000, 0, &[]));
    assert_eq!(
        post_json(&app, "/v1/relays/heartbeat", &hb).await.0,
        StatusCode::OK
    );
    let node = RegisterNodeRequest {
        node_id: "sig-1".into(),
        internal_url: "http://127.0.0.1:8443".into(),
        epoch: 1,
        load: 0.0,
    };
    assert_eq!(
        post_json(&app, "/v1/nodes/register", &node).await.0,
        StatusCode::OK
    );
    let nhb = NodeHeartbeatRequest {
        node_id: "sig-1".into(),
        epoch: 1,
        load: 0.0,
        stats: Some(NodeStatsSnapshot {
            uptime_ms: 1_000,
            sessions_open: 7,
            invites: 4,
            errors: 1,
            login_failures: 2,
        }),
    };
    assert_eq!(
        post_json(&app, "/v1/nodes/heartbeat", &nhb).await.0,
        StatusCode::OK
    );

    let doc = fleet(&app).await;
    let r1 = &doc["relays"][0];
    assert_eq!(r1["relay_id"], "r1");
    let s = &r1["stats"];
    assert_eq!(s["packets_per_s"], 1_000.0, "{s}");
    assert_eq!(s["auth_failures"], 3);
    assert_eq!(s["latency_total"]["count"], 1_000);
    assert_eq!(s["latency_recent"]["count"], 100);
    let p50 = s["latency_recent"]["p50"].as_u64().unwrap();
    assert!((400..420).contains(&p50), "{p50}");
    assert_eq!(s["latency_total"]["points"].as_array().unwrap().len(), 41);
    let r2 = &doc["relays"][1];
    assert_eq!(r2["draining"], true);
    assert!(
        r2["stats"]["latency_total"].is_null(),
        "no samples: no ladder"
    );
    let f = &doc["fleet"];
    assert_eq!(f["relays"], 2);
    assert_eq!(f["relays_draining"], 1);
    assert_eq!(f["latency_total"]["count"], 1_000);
    assert_eq!(f["sessions"], 7);
    assert_eq!(doc["nodes"][0]["stats"]["sessions_open"], 7);
    // Nothing secret in the document.
    let text = doc.to_string();
    assert!(!text.contains(CLUSTER) && !text.contains(OPERATOR));

    // The event stream sends the same document as a `fleet` event.
    let (b0, b1) = bearer();
    let r = app
        .clone()
        .oneshot(get("/console/events", Some((b0, &b1))))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()[header::CONTENT_TYPE], "text/event-stream");
    let mut body = r.into_body().into_data_stream();
    let mut text = String::new();
    while !text.contains("\n\n") {
        let chunk = tokio::time::timeout(Duration::from_secs(5), body.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(text.starts_with("event: fleet\n"), "{text}");
    let data = text.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
    let ev: Value = serde_json::from_str(data).unwrap();
    assert_eq!(ev["relays"].as_array().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_redis_show_the_same_fleet() {
    let Some(server) = peerlink_testkit::redis::RedisServer::start() else {
        return;
    };
    let connect = || async {
        let loc =
            redis_store::parse_location(&format!("{}?prefix=console", server.url(0))).unwrap();
        tokio::time::timeout(
            Duration::from_secs(20),
            RedisStore::connect(loc, cfg(), RedisOptions::default()),
        )
        .await
        .unwrap()
        .unwrap()
    };
    let clock = Arc::new(ManualClock::new(Timestamp(1_000)));
    let (sa, sb) = (
        state_on(Arc::new(connect().await), clock.clone()),
        state_on(Arc::new(connect().await), clock.clone()),
    );
    // Each replica writes its own record; both list both.
    let record = |id: &str| ReplicaRecord {
        replica_id: id.into(),
        listen: format!("127.0.0.1:{}", if id == "a" { 1 } else { 2 }),
        store: "redis".into(),
        version: "test".into(),
        console: true,
    };
    let _beacons = (
        Beacon::spawn(sa.clone(), record("a")),
        Beacon::spawn(sb.clone(), record("b")),
    );
    let a = with_console(sa, "a");
    let b = with_console(sb, "b");
    assert_eq!(
        post_json(&a, "/v1/relays/register", &relay_reg("r1"))
            .await
            .0,
        StatusCode::OK
    );
    let hb = relay_hb("r1", true, relay_stats(10_000, 5, &[(40, 9)]));
    assert_eq!(
        post_json(&a, "/v1/relays/heartbeat", &hb).await.0,
        StatusCode::OK
    );
    // The heartbeat went to replica a; replica b's console shows it.
    let doc = fleet(&b).await;
    assert_eq!(doc["replica_id"], "b");
    let r1 = &doc["relays"][0];
    assert_eq!(r1["draining"], true);
    assert_eq!(r1["stats"]["latency_total"]["count"], 9, "{doc}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let doc = fleet(&b).await;
        let replicas = doc["replicas"].as_array().unwrap();
        if replicas.len() == 2 {
            assert_eq!(replicas[0]["replica_id"], "a");
            assert_eq!(replicas[0]["this"], false);
            assert_eq!(replicas[1]["this"], true);
            assert_eq!(replicas[1]["store"], "redis");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{doc}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
