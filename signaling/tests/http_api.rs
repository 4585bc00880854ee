//! The HTTP API through `app()` with `tower::ServiceExt::oneshot`: accounts, login errors and
//! throttling, token checks, TURN credentials, health and metrics, internal API auth.
// Test helpers outside #[test] fns: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::connect_info::MockConnectInfo;
use axum::http::{Request, StatusCode};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use peerlink_api::signaling::{ErrorCode, ServerMsg, TokenResponse, TurnCredentials};
use peerlink_signaling::auth::{Argon2Cost, Claims};
use peerlink_signaling::store::SqliteStore;
use peerlink_signaling::store::Store;
use peerlink_signaling::{AppState, Config, app};
use serde_json::{Value, json};
use tower::ServiceExt;

const SECRET: &str = "test-token-secret-0123456789abcdef";
const TURN: &str = "turn-secret";

fn config() -> Config {
    Config {
        token_secret: SECRET.as_bytes().to_vec(),
        turn_secret: Some(TURN.as_bytes().to_vec()),
        relays: vec!["127.0.0.1:3478".into()],
        // Cheap hashing keeps debug-build tests fast; the code path is the same.
        argon2: Argon2Cost {
            m_kib: 64,
            t: 1,
            p: 1,
        },
        login_failures_per_account: 3,
        login_failures_per_ip: 6,
        stun: None,
        ..Config::default()
    }
}

fn state(cfg: Config) -> AppState {
    AppState::new(cfg, Arc::new(SqliteStore::in_memory().unwrap())).unwrap()
}

fn router(st: &AppState, ip: [u8; 4]) -> Router {
    app(st.clone()).layer(MockConnectInfo(SocketAddr::from((ip, 40000))))
}

async fn call(
    r: Router,
    method: &str,
    path: &str,
    body: Option<Value>,
    bearer: Option<&str>,
) -> (StatusCode, Value) {
    let mut b = Request::builder().method(method).uri(path);
    if let Some(t) = bearer {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    let req = match body {
        Some(v) => b
            .header("content-type", "application/json")
            .body(Body::from(v.to_string()))
            .unwrap(),
        None => b.body(Body::empty()).unwrap(),
    };
    let resp = tokio::time::timeout(Duration::from_secs(30), r.oneshot(req))
        .await
        .expect("request timed out")
        .unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
    (status, v)
}

async fn register(st: &AppState, user: &str, pw: &str) -> StatusCode {
    call(
        router(st, [127, 0, 0, 1]),
        "POST",
        "/v1/register",
        Some(json!({"username": user, "password": pw})),
        None,
    )
    .await
    .0
}

async fn login(st: &AppState, ip: [u8; 4], user: &str, pw: &str) -> (StatusCode, Value) {
    call(
        router(st, ip),
        "POST",
        "/v1/login",
        Some(json!({"username": user, "password": pw})),
        None,
    )
    .await
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn register_normalises_and_rejects_duplicates() {
    let st = state(config());
    assert_eq!(
        register(&st, "  Alice ", "password-1").await,
        StatusCode::CREATED
    );
    assert_eq!(
        register(&st, "ALICE", "password-2").await,
        StatusCode::CONFLICT
    );
    assert_eq!(
        register(&st, "al", "password-1").await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        register(&st, "al ice", "password-1").await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(register(&st, "bob", "short").await, StatusCode::BAD_REQUEST);
    let (s, v) = login(&st, [127, 0, 0, 1], "alice", "password-1").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let t: TokenResponse = serde_json::from_value(v).unwrap();
    assert_eq!(t.username, "alice");
    assert_eq!(t.expires_in, 15 * 60);
    // Login with a differently spelled name works too.
    assert_eq!(
        login(&st, [127, 0, 0, 1], " ALICE", "password-1").await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn login_error_is_uniform() {
    let st = state(config());
    register(&st, "alice", "password-1").await;
    let wrong = login(&st, [127, 0, 0, 1], "alice", "wrong-password").await;
    let unknown = login(&st, [127, 0, 0, 2], "nobody", "wrong-password").await;
    let malformed = login(&st, [127, 0, 0, 3], "x y", "wrong-password").await;
    assert_eq!(wrong.0, StatusCode::UNAUTHORIZED);
    assert_eq!(wrong, unknown);
    assert_eq!(wrong, malformed);
    assert_eq!(wrong.1["error"], "invalid_credentials");
    // A password longer than any account can have fails the same way, even when it starts
    // with the real (maximum-length) password.
    let max_pw = "p".repeat(256);
    register(&st, "carol", &max_pw).await;
    assert_eq!(
        login(&st, [127, 0, 0, 4], "carol", &max_pw).await.0,
        StatusCode::OK
    );
    let longer = login(&st, [127, 0, 0, 5], "carol", &format!("{max_pw}x")).await;
    assert_eq!(longer, wrong);
}

#[tokio::test]
async fn login_throttled_per_account_and_per_ip() {
    let st = state(config());
    register(&st, "alice", "password-1").await;
    register(&st, "bob", "password-1").await;
    // Three failures for alice from different IPs block the account, even with the right password.
    for i in 0..3 {
        assert_eq!(
            login(&st, [127, 0, 1, i], "alice", "bad-password").await.0,
            StatusCode::UNAUTHORIZED
        );
    }
    let (s, v) = login(&st, [127, 0, 1, 9], "alice", "password-1").await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    // Unknown accounts are throttled the same way (no oracle).
    for _ in 0..3 {
        login(&st, [127, 0, 2, 1], "ghost", "bad-password").await;
    }
    assert_eq!(
        login(&st, [127, 0, 2, 2], "ghost", "bad-password").await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    // bob is unaffected from a fresh IP.
    assert_eq!(
        login(&st, [127, 0, 3, 1], "bob", "password-1").await.0,
        StatusCode::OK
    );
    // Per IP: six failures (over several accounts) block that IP, not others.
    for u in ["u1xx", "u2xx", "u3xx", "u4xx", "u5xx", "u6xx"] {
        login(&st, [127, 0, 4, 1], u, "bad-password").await;
    }
    assert_eq!(
        login(&st, [127, 0, 4, 1], "bob", "password-1").await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        login(&st, [127, 0, 4, 2], "bob", "password-1").await.0,
        StatusCode::OK
    );
    let (_, m) = call(router(&st, [127, 0, 0, 1]), "GET", "/metrics", None, None).await;
    let m = m.as_str().unwrap().to_owned();
    assert!(
        m.contains("peerlink_signaling_login_throttled_total 3"),
        "{m}"
    );
}

fn forge(claims: &Claims, alg: Algorithm, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(alg),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn tokens_are_checked_strictly() {
    let st = state(config());
    register(&st, "alice", "password-1").await;
    let (_, v) = login(&st, [127, 0, 0, 1], "alice", "password-1").await;
    let t: TokenResponse = serde_json::from_value(v).unwrap();
    let r = || router(&st, [127, 0, 0, 1]);
    assert_eq!(
        call(
            r(),
            "POST",
            "/v1/turn-credentials",
            None,
            Some(&t.access_token)
        )
        .await
        .0,
        StatusCode::OK
    );

    let good = Claims {
        sub: "alice".into(),
        aud: "peerlink-signaling".into(),
        iss: "peerlink".into(),
        exp: now() + 600,
        iat: now(),
        jti: None,
    };
    assert_eq!(
        call(
            r(),
            "POST",
            "/v1/turn-credentials",
            None,
            Some(&forge(&good, Algorithm::HS256, SECRET))
        )
        .await
        .0,
        StatusCode::OK
    );
    let cases = [
        ("wrong alg", forge(&good, Algorithm::HS384, SECRET)),
        (
            "wrong secret",
            forge(&good, Algorithm::HS256, "another-secret-another-secret-xx"),
        ),
        (
            "wrong audience",
            forge(
                &Claims {
                    aud: "other".into(),
                    ..good.clone()
                },
                Algorithm::HS256,
                SECRET,
            ),
        ),
        (
            "wrong issuer",
            forge(
                &Claims {
                    iss: "evil".into(),
                    ..good.clone()
                },
                Algorithm::HS256,
                SECRET,
            ),
        ),
        (
            "expired",
            forge(
                &Claims {
                    exp: now() - 1,
                    iat: now() - 900,
                    ..good.clone()
                },
                Algorithm::HS256,
                SECRET,
            ),
        ),
        ("refresh token as access", t.refresh_token.clone()),
        ("garbage", "not-a-token".into()),
    ];
    for (what, tok) in cases {
        let (s, _) = call(r(), "POST", "/v1/turn-credentials", None, Some(&tok)).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{what}");
    }
    assert_eq!(
        call(r(), "POST", "/v1/turn-credentials", None, None)
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );

    // Refresh: only a refresh token works.
    let (s, v) = call(
        r(),
        "POST",
        "/v1/refresh",
        Some(json!({"refresh_token": t.refresh_token})),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(v["access_token"].as_str().is_some());
    let (s, _) = call(
        r(),
        "POST",
        "/v1/refresh",
        Some(json!({"refresh_token": t.access_token})),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

async fn refresh(st: &AppState, token: &str) -> (StatusCode, Value) {
    call(
        router(st, [127, 0, 0, 1]),
        "POST",
        "/v1/refresh",
        Some(json!({ "refresh_token": token })),
        None,
    )
    .await
}

/// Rotation: each refresh token works once and yields the next; presenting a used one again
/// revokes the device's whole chain; logout revokes it too; a validly signed refresh token
/// the store never issued, or one without an id, is refused.
#[tokio::test]
async fn refresh_tokens_rotate_reuse_revokes_the_chain_and_logout_revokes() {
    let st = state(config());
    register(&st, "alice", "password-1").await;
    let r = || router(&st, [127, 0, 0, 1]);
    let body = json!({"username": "alice", "password": "password-1", "device": "phone"});
    let (s, v) = call(r(), "POST", "/v1/login", Some(body.clone()), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let t0 = v["refresh_token"].as_str().unwrap().to_owned();
    let (s, v) = refresh(&st, &t0).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let t1 = v["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(t0, t1, "a new refresh token");
    let (s, v) = refresh(&st, &t1).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let t2 = v["refresh_token"].as_str().unwrap().to_owned();
    // t1 again: reuse. Refused, and t2 (the live one of the chain) dies with it.
    let (s, v) = refresh(&st, &t1).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("token_reused"))
    );
    let (s, v) = refresh(&st, &t2).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("token_reused"))
    );

    // Another device's chain is not touched by that; logout ends it.
    let other = json!({"username": "alice", "password": "password-1", "device": "laptop"});
    let (_, v) = call(r(), "POST", "/v1/login", Some(other), None).await;
    let l0 = v["refresh_token"].as_str().unwrap().to_owned();
    let (_, v) = call(r(), "POST", "/v1/login", Some(body), None).await;
    let p0 = v["refresh_token"].as_str().unwrap().to_owned();
    let (s, v) = refresh(&st, &l0).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let l1 = v["refresh_token"].as_str().unwrap().to_owned();
    let (s, _) = call(
        r(),
        "POST",
        "/v1/logout",
        Some(json!({ "refresh_token": l1 })),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(refresh(&st, &l1).await.0, StatusCode::UNAUTHORIZED);
    // The phone's new login is a live chain of its own.
    assert_eq!(refresh(&st, &p0).await.0, StatusCode::OK);

    // Signed with the right secret, but never issued (or no id at all): refused.
    let forged = Claims {
        sub: "alice".into(),
        aud: "peerlink-refresh".into(),
        iss: "peerlink".into(),
        exp: now() + 600,
        iat: now(),
        jti: Some("0123456789abcdef".into()),
    };
    let (s, v) = refresh(&st, &forge(&forged, Algorithm::HS256, SECRET)).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_token"))
    );
    let no_id = Claims {
        jti: None,
        ..forged
    };
    assert_eq!(
        refresh(&st, &forge(&no_id, Algorithm::HS256, SECRET))
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    let bad_device = json!({"username": "alice", "password": "password-1", "device": "a b"});
    assert_eq!(
        call(r(), "POST", "/v1/login", Some(bad_device), None)
            .await
            .0,
        StatusCode::BAD_REQUEST
    );
    let (_, m) = call(r(), "GET", "/metrics", None, None).await;
    assert!(
        m.as_str()
            .unwrap()
            .contains("peerlink_signaling_refresh_reuses_total 3"),
        "{m}"
    );
}

#[tokio::test]
async fn turn_credentials_verify_with_proto() {
    let st = state(config());
    register(&st, "alice", "password-1").await;
    let (_, v) = login(&st, [127, 0, 0, 1], "alice", "password-1").await;
    let t: TokenResponse = serde_json::from_value(v).unwrap();
    let (s, v) = call(
        router(&st, [127, 0, 0, 1]),
        "POST",
        "/v1/turn-credentials",
        None,
        Some(&t.access_token),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let c: TurnCredentials = serde_json::from_value(v).unwrap();
    assert_eq!(c.ttl, 3600);
    assert_eq!(
        c.uris,
        vec!["turn:127.0.0.1:3478?transport=udp".to_string()]
    );
    let (exp, user) = c.username.split_once(':').unwrap();
    assert_eq!(user, "alice");
    let exp: u64 = exp.parse().unwrap();
    assert!(exp >= now() + 3590 && exp <= now() + 3600);
    let checked =
        peerlink_proto::auth::rest::validate([TURN.as_bytes()], &c.username, now(), 3600).unwrap();
    assert_eq!(checked.first(), c.password);
    assert!(
        peerlink_proto::auth::rest::validate([&b"other"[..]], &c.username, now(), 3600)
            .unwrap()
            .first()
            != c.password
    );
}

#[tokio::test]
async fn health_metrics_and_internal_auth() {
    let mut cfg = config();
    cfg.cluster_token = Some("cluster-token".into());
    let st = state(cfg);
    let r = || router(&st, [127, 0, 0, 1]);
    let (s, v) = call(r(), "GET", "/healthz", None, None).await;
    assert_eq!((s, v.as_str()), (StatusCode::OK, Some("ok")));
    let (s, v) = call(r(), "GET", "/readyz", None, None).await;
    assert_eq!((s, v.as_str()), (StatusCode::OK, Some("ready")));
    let (s, v) = call(r(), "GET", "/metrics", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        v.as_str()
            .unwrap()
            .contains("# TYPE peerlink_signaling_sessions_open gauge")
    );
    let body =
        json!({"user": "alice", "msg": {"type": "presence", "user": "bob", "status": "online"}});
    assert_eq!(
        call(
            r(),
            "POST",
            "/internal/v1/deliver",
            Some(body.clone()),
            None
        )
        .await
        .0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(
            r(),
            "POST",
            "/internal/v1/deliver",
            Some(body.clone()),
            Some("wrong")
        )
        .await
        .0,
        StatusCode::UNAUTHORIZED
    );
    let (s, v) = call(
        r(),
        "POST",
        "/internal/v1/deliver",
        Some(body.clone()),
        Some("cluster-token"),
    )
    .await;
    assert_eq!((s, v["delivered"].as_u64()), (StatusCode::OK, Some(0)));
    // Without a cluster token the internal API does not exist.
    let st2 = state(config());
    assert_eq!(
        call(
            router(&st2, [127, 0, 0, 1]),
            "POST",
            "/internal/v1/deliver",
            Some(body),
            Some("x")
        )
        .await
        .0,
        StatusCode::NOT_FOUND
    );
    // Oversized bodies are refused.
    let big = json!({"username": "a".repeat(100_000), "password": "x"});
    assert_eq!(
        call(r(), "POST", "/v1/register", Some(big), None).await.0,
        StatusCode::PAYLOAD_TOO_LARGE
    );
}

#[test]
fn config_validation_refuses_bad_settings() {
    assert!(Config::default().validate().is_err(), "empty token secret");
    let mut c = config();
    assert!(c.validate().is_ok());
    c.directory = Some("http://127.0.0.1:8500".into());
    assert!(c.validate().is_err(), "directory without cluster token");
}

#[tokio::test]
async fn failed_commit_gives_storage_error_not_ack() {
    let store = Arc::new(SqliteStore::in_memory().unwrap());
    let st = AppState::new(config(), store.clone()).unwrap();
    register(&st, "alice", "password-1").await;
    register(&st, "bob", "password-1").await;
    let ok = peerlink_signaling::session::send_message(
        &st,
        "alice",
        "m0".into(),
        "bob".into(),
        None,
        "small".into(),
    )
    .await;
    assert!(matches!(ok, ServerMsg::MessageAck { .. }), "{ok:?}");
    // The database cannot grow any more: the next commit fails like a full disk.
    store.cap_size(0).unwrap();
    let body = "x".repeat(16 * 1024);
    let r = peerlink_signaling::session::send_message(
        &st,
        "alice",
        "m1".into(),
        "bob".into(),
        None,
        body.clone(),
    )
    .await;
    match r {
        ServerMsg::Error { code, id, .. } => {
            assert_eq!(code, ErrorCode::Storage);
            assert_eq!(id.as_deref(), Some("m1"));
        }
        other => panic!("expected a storage error, got {other:?}"),
    }
    assert_eq!(
        st.metrics
            .message_store_errors_total
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // Nothing of m1 was stored: bob's inbox holds only m0, and m1 is not known as sent.
    let pending = store.pending("bob", 0, 10).unwrap();
    assert_eq!(
        pending
            .iter()
            .map(|m| m.client_id.as_str())
            .collect::<Vec<_>>(),
        vec!["m0"]
    );
    store.cap_size(1000).unwrap();
    let again = peerlink_signaling::session::send_message(
        &st,
        "alice",
        "m1".into(),
        "bob".into(),
        None,
        body,
    )
    .await;
    assert!(
        matches!(again, ServerMsg::MessageAck { .. }),
        "a retry after the fault succeeds: {again:?}"
    );
}

#[tokio::test]
async fn readiness_turns_503_when_the_drain_begins() {
    let st = state(config());
    let r = || router(&st, [127, 0, 0, 1]);
    st.drain(std::time::Duration::from_millis(100)).await;
    for path in ["/readyz", "/healthz"] {
        let (s, v) = call(r(), "GET", path, None, None).await;
        assert_eq!(
            (s, v.as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, Some("draining")),
            "{path}"
        );
    }
}
