//! The HTTP API: `fn app(state) -> Router` with accounts, tokens, TURN credentials, the
//! WebSocket endpoint, health, metrics and the node-to-node internal API.
//!
//! | method + path | body -> answer |
//! |---|---|
//! | `POST /v1/register` | `Credentials` -> 201 `{"username"}`, 400 invalid, 409 taken |
//! | `POST /v1/login` | `Credentials` (with an optional `device`) -> `TokenResponse`, 401 `invalid_credentials`, 429 `throttled` |
//! | `POST /v1/refresh` | `RefreshRequest` -> `TokenResponse` with the next refresh token (the one presented is revoked), 401 `invalid_token`, 401 `token_reused` (a revoked token: its device's chain is revoked) |
//! | `POST /v1/logout` | `RefreshRequest` -> 204 (every refresh token of its device revoked), 401 |
//! | `POST /v1/turn-credentials` | (Bearer access token) -> `TurnCredentials`, 401, 503 |
//! | `GET /v1/ws?token=&device=&resume_from=` | WebSocket upgrade (see [`peerlink_api::signaling`]) |
//! | `GET /healthz` | `ok` (503 `draining` during shutdown) |
//! | `GET /readyz` | `ready`: the node takes new sessions (503 `draining` from SIGTERM on); for load balancers and readiness probes |
//! | `GET /metrics` | Prometheus text |
//! | `POST /internal/v1/{deliver,call,inbox}` | node-to-node, Bearer cluster token |
//!
//! A store that cannot be reached (PostgreSQL down, no pooled connection in time) answers 503
//! `store_unavailable` with `Retry-After`; other storage failures 500 `storage`. Readiness does
//! not follow the store: every node shares it, and a fleet with no ready node would only turn
//! those clear 503s into refused connections.

use std::net::SocketAddr;
use std::time::Instant;

use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;

use crate::auth::{PASSWORD_MAX, PASSWORD_MIN, ThrottleKey, TokenKind, normalize_username};
use crate::cluster::{
    CallForward, CallForwardResponse, DeliverRequest, DeliverResponse, InboxNudge,
};
use crate::metrics::Metrics;
use crate::state::{AppState, now_unix, now_unix_ms};
use crate::store::{RefreshOutcome, StoreError};
use peerlink_api::signaling::{
    Credentials, HttpError, RefreshRequest, ServerMsg, TokenResponse, TurnCredentials,
};

/// A JSON error response.
pub fn error_response(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(HttpError {
            error: code.to_owned(),
            message: message.to_owned(),
        }),
    )
        .into_response()
}

/// Build the node's router.
pub fn app(state: AppState) -> Router {
    let timeout = state.cfg.http_timeout;
    let body = state.cfg.max_http_body;
    Router::new()
        .route("/v1/register", post(register))
        .route("/v1/login", post(login))
        .route("/v1/refresh", post(refresh))
        .route("/v1/logout", post(logout))
        .route("/v1/turn-credentials", post(turn_credentials))
        .route("/v1/ws", get(crate::session::ws_upgrade))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/internal/v1/deliver", post(internal_deliver))
        .route("/internal/v1/call", post(internal_call))
        .route("/internal/v1/inbox", post(internal_inbox))
        .layer(DefaultBodyLimit::max(body))
        .layer(RequestBodyLimitLayer::new(body))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            timeout,
        ))
        .with_state(state)
}

async fn healthz(State(st): State<AppState>) -> Response {
    if st.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response()
    } else {
        "ok".into_response()
    }
}

async fn readyz(State(st): State<AppState>) -> Response {
    if st.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response()
    } else {
        "ready".into_response()
    }
}

async fn metrics(State(st): State<AppState>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            peerlink_cli::metrics::CONTENT_TYPE,
        )],
        st.metrics.render(),
    )
        .into_response()
}

fn bad_password(p: &str) -> bool {
    p.len() < PASSWORD_MIN || p.len() > PASSWORD_MAX
}

async fn register(State(st): State<AppState>, Json(c): Json<Credentials>) -> Response {
    let user = match normalize_username(&c.username) {
        Ok(u) => u,
        Err(e) => {
            return error_response(StatusCode::BAD_REQUEST, "invalid_username", &e.to_string());
        }
    };
    if bad_password(&c.password) {
        return error_response(
            StatusCode::BAD_REQUEST,
            "invalid_password",
            &format!("password must be {PASSWORD_MIN}-{PASSWORD_MAX} bytes"),
        );
    }
    let hash = match st.hasher.hash(c.password).await {
        Ok(h) => h,
        Err(e) => return error_response(StatusCode::SERVICE_UNAVAILABLE, "busy", &e.to_string()),
    };
    let u2 = user.clone();
    match st
        .db
        .call(move |s| s.create_user(&u2, &hash, now_unix_ms()))
        .await
    {
        Ok(()) => {
            Metrics::inc(&st.metrics.registrations_total);
            (
                StatusCode::CREATED,
                Json(serde_json::json!({ "username": user })),
            )
                .into_response()
        }
        Err(StoreError::UserExists) => {
            error_response(StatusCode::CONFLICT, "username_taken", "username is taken")
        }
        Err(e) => storage_error(&e),
    }
}

/// The answer to a storage failure: 503 with `Retry-After` while the store cannot be reached,
/// else 500.
pub fn storage_error(e: &StoreError) -> Response {
    match e {
        StoreError::Unavailable(_) => {
            let mut r = error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                &e.to_string(),
            );
            r.headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from(1u32));
            r
        }
        _ => error_response(StatusCode::INTERNAL_SERVER_ERROR, "storage", &e.to_string()),
    }
}

fn token_failed() -> Response {
    error_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        "token",
        "token signing failed",
    )
}

fn ms_of(unix_s: u64) -> u64 {
    unix_s.saturating_mul(1000)
}

/// The token answer: a new access token and `refresh_token`.
fn token_answer(st: &AppState, user: &str, refresh_token: String) -> Response {
    match st.tokens.issue(TokenKind::Access, user, now_unix()) {
        Ok((access_token, _)) => Json(TokenResponse {
            username: user.to_owned(),
            access_token,
            expires_in: st.tokens.access_ttl.as_secs(),
            refresh_token,
        })
        .into_response(),
        Err(_) => token_failed(),
    }
}

/// Tokens for a login: a refresh token starting (or continuing) `device`'s chain, recorded
/// in the store before it is handed out.
async fn tokens_for_login(st: &AppState, user: &str, device: String) -> Response {
    let now = now_unix();
    let Ok((refresh_token, claims)) = st.tokens.issue_refresh(user, now) else {
        return token_failed();
    };
    let hash = crate::store::refresh_token_hash(claims.jti.as_deref().unwrap_or_default());
    let u2 = user.to_owned();
    let exp = ms_of(claims.exp);
    match st
        .db
        .call(move |s| s.add_refresh_token(&hash, &u2, &device, exp, now_unix_ms()))
        .await
    {
        Ok(()) => token_answer(st, user, refresh_token),
        Err(e) => storage_error(&e),
    }
}

const INVALID: &str = "invalid credentials";

async fn login(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Json(c): Json<Credentials>,
) -> Response {
    let device = match c.device.as_deref() {
        Some(d) if crate::session::valid_device(d) => d.to_owned(),
        Some(_) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "invalid_device",
                "device must be 1-64 of A-Z a-z 0-9 _ -",
            );
        }
        None => format!("login-{}", hex::encode(rand::random::<[u8; 8]>())),
    };
    let now = Instant::now();
    let ip_key = ThrottleKey::Ip(peer.ip());
    // Unknown, malformed and existing names share one throttle key space and one answer.
    let norm = normalize_username(&c.username).ok();
    let account = norm
        .clone()
        .unwrap_or_else(|| c.username.trim().to_ascii_lowercase());
    let acct_key = ThrottleKey::Account(account.clone());
    let shared = st.shared_throttle.get();
    let store_errors = &st.metrics.throttle_store_errors_total;
    let shared_blocked = match shared {
        Some(t) => t.blocked(peer.ip(), &account, store_errors).await,
        None => false,
    };
    if shared_blocked
        || st.throttle_ip.blocked(&ip_key, now)
        || st.throttle_account.blocked(&acct_key, now)
    {
        Metrics::inc(&st.metrics.login_throttled_total);
        let mut r = error_response(
            StatusCode::TOO_MANY_REQUESTS,
            "throttled",
            "too many failed attempts; try later",
        );
        r.headers_mut().insert(
            "retry-after",
            axum::http::HeaderValue::from(st.cfg.login_window.as_secs()),
        );
        return r;
    }
    let stored = match &norm {
        Some(u) => {
            let u2 = u.clone();
            match st.db.call(move |s| s.password_hash(&u2)).await {
                Ok(h) => h,
                Err(e) => return storage_error(&e),
            }
        }
        None => None,
    };
    // No account has a password over the limit: check such a one against the dummy hash
    // (same work, bounded input) so it fails in the same way.
    let (password, stored) = if c.password.len() > PASSWORD_MAX {
        let mut p = c.password;
        let mut cut = PASSWORD_MAX;
        while !p.is_char_boundary(cut) {
            cut -= 1;
        }
        p.truncate(cut);
        (p, None)
    } else {
        (c.password, stored)
    };
    let ok = match st.hasher.verify(password, stored).await {
        Ok(ok) => ok,
        Err(e) => return error_response(StatusCode::SERVICE_UNAVAILABLE, "busy", &e.to_string()),
    };
    match (ok, norm) {
        (true, Some(user)) => {
            st.throttle_account.reset(&acct_key);
            if let Some(t) = shared {
                t.reset(&account, store_errors).await;
            }
            Metrics::inc(&st.metrics.logins_total);
            tokens_for_login(&st, &user, device).await
        }
        _ => {
            st.throttle_ip.fail(ip_key, Instant::now());
            st.throttle_account.fail(acct_key, Instant::now());
            if let Some(t) = shared {
                t.fail(peer.ip(), &account, store_errors).await;
            }
            Metrics::inc(&st.metrics.login_failures_total);
            error_response(StatusCode::UNAUTHORIZED, "invalid_credentials", INVALID)
        }
    }
}

async fn refresh(State(st): State<AppState>, Json(r): Json<RefreshRequest>) -> Response {
    let now = now_unix();
    let claims = match st.tokens.verify(TokenKind::Refresh, &r.refresh_token, now) {
        Ok(c) => c,
        Err(e) => return error_response(StatusCode::UNAUTHORIZED, "invalid_token", &e.to_string()),
    };
    let old = crate::store::refresh_token_hash(claims.jti.as_deref().unwrap_or_default());
    let Ok((next_token, next)) = st.tokens.issue_refresh(&claims.sub, now) else {
        return token_failed();
    };
    let new = crate::store::refresh_token_hash(next.jti.as_deref().unwrap_or_default());
    let exp = ms_of(next.exp);
    let outcome = st
        .db
        .call(move |s| s.rotate_refresh_token(&old, &new, exp, now_unix_ms()))
        .await;
    match outcome {
        Ok(RefreshOutcome::Rotated { user, .. }) if user == claims.sub => {
            Metrics::inc(&st.metrics.refreshes_total);
            token_answer(&st, &user, next_token)
        }
        Ok(RefreshOutcome::Rotated { .. }) => error_response(
            StatusCode::UNAUTHORIZED,
            "invalid_token",
            "token of another user",
        ),
        Ok(RefreshOutcome::Reused { user, device }) => {
            Metrics::inc(&st.metrics.refresh_reuses_total);
            tracing::warn!(%user, %device, "revoked refresh token presented: device's tokens revoked");
            error_response(
                StatusCode::UNAUTHORIZED,
                "token_reused",
                "refresh token was already used or revoked; every token of its device is revoked: log in again",
            )
        }
        Ok(RefreshOutcome::Expired) => {
            error_response(StatusCode::UNAUTHORIZED, "invalid_token", "token expired")
        }
        Ok(RefreshOutcome::Unknown) => error_response(
            StatusCode::UNAUTHORIZED,
            "invalid_token",
            "unknown refresh token",
        ),
        Err(e) => storage_error(&e),
    }
}

async fn logout(State(st): State<AppState>, Json(r): Json<RefreshRequest>) -> Response {
    let claims = match st
        .tokens
        .verify(TokenKind::Refresh, &r.refresh_token, now_unix())
    {
        Ok(c) => c,
        Err(e) => return error_response(StatusCode::UNAUTHORIZED, "invalid_token", &e.to_string()),
    };
    let hash = crate::store::refresh_token_hash(claims.jti.as_deref().unwrap_or_default());
    match st.db.call(move |s| s.revoke_refresh_chain(&hash)).await {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => storage_error(&e),
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

async fn turn_credentials(State(st): State<AppState>, headers: HeaderMap) -> Response {
    let Some(token) = bearer(&headers) else {
        return error_response(
            StatusCode::UNAUTHORIZED,
            "invalid_token",
            "missing bearer token",
        );
    };
    let claims = match st.tokens.verify(TokenKind::Access, token, now_unix()) {
        Ok(c) => c,
        Err(e) => return error_response(StatusCode::UNAUTHORIZED, "invalid_token", &e.to_string()),
    };
    let Some(secret) = st.cfg.turn_secret.as_ref() else {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_turn",
            "no TURN secret configured",
        );
    };
    let mut relays: Vec<String> = match st.cluster.as_ref() {
        Some(c) => c
            .relays()
            .await
            .into_iter()
            .map(|u| u.to_string())
            .collect(),
        None => Vec::new(),
    };
    if relays.is_empty() {
        relays = st
            .cfg
            .relays
            .iter()
            .map(|r| format!("turn:{r}?transport=udp"))
            .collect();
    }
    let ttl = st.cfg.turn_ttl.as_secs();
    let (username, password) =
        peerlink_proto::auth::rest::credentials(secret, &claims.sub, now_unix(), ttl);
    Metrics::inc(&st.metrics.turn_credentials_total);
    Json(TurnCredentials {
        username,
        password,
        ttl,
        uris: relays,
    })
    .into_response()
}

/// None when the request carries the cluster token; else the rejection.
fn cluster_auth(st: &AppState, headers: &HeaderMap) -> Option<Response> {
    let Some(expected) = st.cfg.cluster_token.as_deref() else {
        return Some(error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            "no cluster configured",
        ));
    };
    let ok = bearer(headers).is_some_and(|t| {
        use subtle::ConstantTimeEq;
        bool::from(t.as_bytes().ct_eq(expected.as_bytes()))
    });
    if ok {
        None
    } else {
        Some(error_response(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "bad cluster token",
        ))
    }
}

async fn internal_deliver(
    State(st): State<AppState>,
    headers: HeaderMap,
    Json(req): Json<DeliverRequest>,
) -> Response {
    if let Some(r) = cluster_auth(&st, &headers) {
        return r;
    }
    let now = std::time::Instant::now();
    // The same delivery again (the sender lost our answer): answer what it reached, do nothing.
    if let Some(id) = &req.id
        && let Some(delivered) = st.deliveries.first_or_seen(id, now)
    {
        return Json(DeliverResponse { delivered }).into_response();
    }
    match (&req.msg, &req.arbiter) {
        (ServerMsg::IncomingCall { call_id, .. }, Some(url)) => st.hub.set_route(call_id, url, now),
        (
            ServerMsg::CallAccepted { call_id, .. } | ServerMsg::Ringing { call_id, .. },
            Some(url),
        ) => st.hub.set_route(call_id, url, now),
        (ServerMsg::CallEnded { call_id, .. }, _) => st.hub.drop_route(call_id),
        _ => {}
    }
    let delivered = match &req.device {
        Some(d) => u32::from(crate::calls::deliver_device(&st, &req.user, d, &req.msg)),
        None => st.hub.send_user(
            &req.user,
            req.except_device.as_deref(),
            &req.msg,
            &st.metrics,
        ),
    };
    if let Some(id) = &req.id {
        st.deliveries.record(id, delivered);
    }
    Json(DeliverResponse { delivered }).into_response()
}

async fn internal_call(
    State(st): State<AppState>,
    headers: HeaderMap,
    Json(req): Json<CallForward>,
) -> Response {
    if let Some(r) = cluster_auth(&st, &headers) {
        return r;
    }
    if req.gone {
        if let Some(id) = crate::calls::call_id_of(&req.msg).cloned() {
            crate::calls::remote_party_gone(&st, req.from, id).await;
        }
        return Json(CallForwardResponse {
            replies: Vec::new(),
        })
        .into_response();
    }
    let replies = crate::calls::arbitrate(&st, req.from, req.msg).await;
    Json(CallForwardResponse { replies }).into_response()
}

async fn internal_inbox(
    State(st): State<AppState>,
    headers: HeaderMap,
    Json(req): Json<InboxNudge>,
) -> Response {
    if let Some(r) = cluster_auth(&st, &headers) {
        return r;
    }
    st.hub.notify_inbox(&req.user);
    Json(serde_json::json!({})).into_response()
}
