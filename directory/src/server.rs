//! The HTTP service: [`app`] builds the axum `Router` over an [`AppState`]; [`Sweeper`] is the
//! owned background expiry task; [`Metrics`] are the counters behind `/metrics`.
//!
//! Paths and bodies are listed in [`peerlink_api::directory`]. `/v1/*` needs `Authorization: Bearer <token>`
//! (compared in constant time); `/healthz` and `/metrics` do not. `/console` (when an operator
//! token is configured) takes the operator token instead ([`crate::console`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use peerlink_cli::metrics::Exposition;
use serde::de::DeserializeOwned;
use subtle::ConstantTimeEq;
use tokio_util::sync::{CancellationToken, DropGuard};
use tower_http::timeout::TimeoutLayer;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::clock::{Clock, duration_ms};
use crate::console::Console;
use crate::store::{DirectoryStore, StatsKind, StoreConfig, StoreError};
use peerlink_api::directory::*;

/// Default request timeout.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Default body limit: a full presence batch of long ids fits (5,000 x ~300 bytes).
pub const DEFAULT_BODY_LIMIT: usize = 2 * 1024 * 1024;

/// Limits of the HTTP layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Whole-request timeout (answered 408).
    pub request_timeout: Duration,
    /// Largest accepted request body in bytes (answered 413).
    pub body_limit: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            body_limit: DEFAULT_BODY_LIMIT,
        }
    }
}

/// Counters for `/metrics` (gauges come from the store at scrape time).
#[derive(Debug, Default)]
pub struct Metrics {
    lookup_requests: AtomicU64,
    lookups: AtomicU64,
    choose_requests: AtomicU64,
    relays_chosen: AtomicU64,
    choices_empty: AtomicU64,
    presence_writes: AtomicU64,
    stale_updates: AtomicU64,
    node_registrations: AtomicU64,
    relay_registrations: AtomicU64,
    unknown_heartbeats: AtomicU64,
    unauthorized: AtomicU64,
    swept_presence: AtomicU64,
    swept_nodes: AtomicU64,
    swept_relays: AtomicU64,
    store_errors: AtomicU64,
    store_down: AtomicBool,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Shared state of the service.
pub struct AppState<S> {
    /// Storage backend.
    pub store: Arc<S>,
    /// Source of "now".
    pub clock: Arc<dyn Clock>,
    /// TTLs (for answers; the store applies them).
    pub config: StoreConfig,
    /// HTTP limits.
    pub limits: HttpLimits,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// The operators' console, when an operator token is configured.
    pub console: Option<Arc<Console>>,
    token: Arc<[u8]>,
}

impl<S> Clone for AppState<S> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            clock: self.clock.clone(),
            config: self.config,
            limits: self.limits,
            metrics: self.metrics.clone(),
            console: self.console.clone(),
            token: self.token.clone(),
        }
    }
}

impl<S: DirectoryStore> AppState<S> {
    /// State over `store`, reading time from `clock`, accepting `cluster_token`.
    pub fn new(
        store: Arc<S>,
        clock: Arc<dyn Clock>,
        config: StoreConfig,
        limits: HttpLimits,
        cluster_token: &str,
    ) -> Self {
        Self {
            store,
            clock,
            config,
            limits,
            metrics: Arc::new(Metrics::default()),
            console: None,
            token: Arc::from(cluster_token.as_bytes()),
        }
    }

    /// Serve the operators' console ([`crate::console`]) too.
    pub fn with_console(mut self, console: Arc<Console>) -> Self {
        self.console = Some(console);
        self
    }
}

/// An API error answer: status + `{"error":{"code","message"}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Error code.
    pub code: ErrorCode,
    /// Message.
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorCode::InvalidField, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

/// Count a backend failure (unreachable or refusing store) and log it; pass `r` on.
/// One log line per outage: at the first failure and when the store answers again.
fn counted<T>(m: &Metrics, r: Result<T, StoreError>) -> Result<T, StoreError> {
    match &r {
        Err(e @ (StoreError::Unavailable(_) | StoreError::Backend(_))) => {
            bump(&m.store_errors, 1);
            if !m.store_down.swap(true, Ordering::Relaxed) {
                warn!(error = %e, "store failed; answering 503 until it is back");
            } else {
                debug!(error = %e, "store failed");
            }
        }
        _ => {
            if m.store_down.load(Ordering::Relaxed) && m.store_down.swap(false, Ordering::Relaxed) {
                info!("store answers again");
            }
        }
    }
    r
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let msg = e.to_string();
        match e {
            StoreError::UnknownNode { .. } => {
                Self::new(StatusCode::NOT_FOUND, ErrorCode::UnknownNode, msg)
            }
            StoreError::StaleEpoch { .. } => {
                Self::new(StatusCode::CONFLICT, ErrorCode::StaleEpoch, msg)
            }
            StoreError::UnknownRelay { .. } => {
                Self::new(StatusCode::NOT_FOUND, ErrorCode::UnknownRelay, msg)
            }
            StoreError::Unavailable(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::StoreUnavailable,
                msg,
            ),
            StoreError::Backend(_) => {
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal, msg)
            }
        }
    }
}

/// JSON body extractor whose rejections are [`ApiError`]s naming the problem.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rej) => Err(json_rejection(rej)),
        }
    }
}

fn json_rejection(rej: JsonRejection) -> ApiError {
    let status = rej.status();
    let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
        ErrorCode::PayloadTooLarge
    } else {
        ErrorCode::BadRequest
    };
    ApiError::new(status, code, rej.body_text())
}

/// Path extractor with [`ApiError`] rejections.
struct ApiPath<T>(T);

impl<S, T> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(v)) => Ok(ApiPath(v)),
            Err(rej) => Err(path_rejection(rej)),
        }
    }
}

fn path_rejection(rej: PathRejection) -> ApiError {
    ApiError::new(rej.status(), ErrorCode::BadRequest, rej.body_text())
}

// ---- validation (network input: typed errors, never panics) ----

fn check_id(field: &str, v: &str) -> Result<(), ApiError> {
    if v.is_empty() {
        return Err(ApiError::invalid(format!("{field} is empty")));
    }
    if v.len() > MAX_ID_LEN {
        return Err(ApiError::invalid(format!(
            "{field} is {} bytes; at most {MAX_ID_LEN}",
            v.len()
        )));
    }
    if v.chars().any(char::is_control) {
        return Err(ApiError::invalid(format!(
            "{field} contains control characters"
        )));
    }
    Ok(())
}

fn check_region(field: &str, v: &str) -> Result<(), ApiError> {
    if v.is_empty() || v.len() > MAX_REGION_LEN || v.chars().any(char::is_control) {
        return Err(ApiError::invalid(format!(
            "{field} must be 1..={MAX_REGION_LEN} bytes without control characters"
        )));
    }
    Ok(())
}

fn check_load(v: f64) -> Result<(), ApiError> {
    if !v.is_finite() || v < 0.0 {
        return Err(ApiError::invalid("load must be a finite number >= 0"));
    }
    Ok(())
}

fn check_url(v: &str) -> Result<(), ApiError> {
    let ok = !v.is_empty()
        && v.len() <= MAX_URL_LEN
        && (v.starts_with("http://") || v.starts_with("https://"))
        && !v.chars().any(|c| c.is_control() || c.is_whitespace());
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "internal_url must be an http(s) URL of at most {MAX_URL_LEN} bytes"
        )))
    }
}

/// Build the service router over `state`: routes, auth, body limit, timeout.
pub fn app<S: DirectoryStore>(state: AppState<S>) -> Router {
    let v1 = Router::new()
        .route("/nodes/register", post(register_node::<S>))
        .route("/nodes/heartbeat", post(node_heartbeat::<S>))
        .route("/nodes/deregister", post(deregister_node::<S>))
        .route("/nodes", get(list_nodes::<S>))
        .route("/presence", post(update_presence::<S>))
        .route("/presence/batch", post(update_presence_batch::<S>))
        .route("/presence/remove", post(remove_presence::<S>))
        .route("/presence/lookup", post(lookup_users::<S>))
        .route("/presence/{user}", get(lookup_user::<S>))
        .route("/relays/register", post(register_relay::<S>))
        .route("/relays/heartbeat", post(relay_heartbeat::<S>))
        .route("/relays/deregister", post(deregister_relay::<S>))
        .route("/relays", get(list_relays::<S>))
        .route("/relays/choose", post(choose_relays::<S>))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_token::<S>,
        ));
    let mut root = Router::new()
        .nest("/v1", v1)
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics::<S>));
    if let Some(console) = state.console.clone() {
        root = root.merge(crate::console::routes::<S>(console));
    }
    root.fallback(|| async {
        ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, "no such route")
    })
    .layer(DefaultBodyLimit::max(state.limits.body_limit))
    .layer(TimeoutLayer::with_status_code(
        StatusCode::REQUEST_TIMEOUT,
        state.limits.request_timeout,
    ))
    .with_state(state)
}

async fn require_token<S: DirectoryStore>(
    State(state): State<AppState<S>>,
    req: Request,
    next: Next,
) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    let ok = match presented {
        // Length is not secret; the bytes are compared in constant time.
        Some(t) => bool::from(t.ct_eq(&state.token)),
        None => false,
    };
    if ok {
        next.run(req).await
    } else {
        bump(&state.metrics.unauthorized, 1);
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "missing or wrong cluster token (Authorization: Bearer <token>)",
        )
        .into_response()
    }
}

async fn register_node<S: DirectoryStore>(
    State(st): State<AppState<S>>,
    ApiJson(req): ApiJson<RegisterNodeRequest>,
) -> Result<Json<RegisterNodeResponse>, ApiError> {
    check_id("node_id", &req.node_id)?;
    check_url(&req.internal_url)?;
    check_load(req.load)?;
    let node_id = req.node_id.clone();
    let resp = counted(
        &st.metrics,
        st.store.register_node(req, st.clock.now()).await,
    )?;
    bump(&st.metrics.node_registrations, 1);
    debug!(%node_id, purged = resp.purged_presence, "node registered");
    Ok(Json(resp))
}

async fn node_heartbeat<S: DirectoryStore>(
    State(st): State<AppState<S>>,
    ApiJson(req): ApiJson<NodeHeartbeatRequest>,
) -> Result<Json<HeartbeatResponse>, ApiError> {
    check_id("node_id", &req.node_id)?;
    check_load(req.load)?;
    let stats = stats_json(req.stats.as_ref(), |s| s.validate())?;
    let r = counted(
        &st.metrics,
        st.store
            .node_heartbeat(&req.node_id, req.epoch, req.load, st.clock.now())
            .await,
    );
    if matches!(r, Err(StoreError::UnknownNode { .. })) {
        bump(&st.metrics.unknown_heartbeats, 1);
    }
    r?;
    if let Some(json) = stats {
        let r = st
            .store
            .put_stats(StatsKind::Node, &req.node_id, json, st.clock.now())
            .await;
        counted(&st.metrics, r)?;
    }
    Ok(Json(HeartbeatResponse {
        heartbeat_interval_ms: duration_ms(st.config.heartbeat_interval()),
    }))
}

async fn deregister_node<S: DirectoryStore>(
    State(st): State<AppState<S>>,
    ApiJson(req): ApiJson<DeregisterNodeRequest>,
) -> Result<Json<DeregisterNodeResponse>, ApiError> {
    check_id("node_id", &req.node_id)?;
    let r = st
        .store
        .deregister_node(&req.node_id, req.epoch, st.clock.now())
        .await;
    Ok(Json(counted(&st.metrics, r)?))
}

async fn list_nodes<S: DirectoryStore>(
    State(st): State<AppState<S>>,
) -> Result<Json<NodeList>, ApiError> {
    let nodes = counted(&st.metrics, st.store.list_nodes(st.clock.now()).await)?;
    Ok(Json(NodeList { nodes }))
}

fn count_outcome(m: &Metrics, outcome: UpdateOutcome, written: u64) {
    match outcome {
        UpdateOutcome::Applied => bump(&m.presence_writes, written),
        UpdateOutcome::Stale { .. } => bump(&m.stale_updates, 1),
    }
}

async fn update_presence<S: DirectoryStore>(
    State(st): State<AppState<S>>,
    ApiJson(req): ApiJson<PresenceUpdate>,
) -> Result<Json<UpdateOutcome>, ApiError> {
    check_id("user", &req.user)?;
    check_id("device", &req.device)?;
    check_id("node_id", &req.node_id)?;
    let outcome = counted(
        &st.metrics,
        st.store.update_presence(req, st.clock.now()).await,
    )?;
    count_outcome(&st.metrics, outcome, 1);
    Ok(Json(outcome))
}

async fn update_presence_batch<S: DirectoryStore>(
    State(st): State<AppState<S>>,
    ApiJson(req): ApiJson<PresenceBatchRequest>,
) -> Result<Json<PresenceBatchResponse>, ApiError> {
    check_id("node_id", &req.node_id)?;
    if req.entries.len() > MAX_PRESENCE_BATCH {
        return Err(ApiError::invalid(format!(
            "{} entries; at most {MAX_PRESENCE_BATCH} per batch",
            req.entries.len()
        )));
    }
    for e in &req.entries {
        check_id("user", &e.user)?;
        check_id("device", &e.device)?;
    }
    let r = st
        .store
        .update_presence_batch(&req.node_id, req.node_epoch, req.entries, st.clock.now())
        .await;
    let (outcome, applied) = counted(&st.metrics, r)?;
    count_outcome(&st.metrics, outcome, applied);
    Ok(Json(PresenceBatchResponse { outcome, applied }))
}

async fn remove_presence<S: DirectoryStore>(
    State(st): State<AppState<S>>,
    ApiJson(req): ApiJson<PresenceRemove>,
) -> Result<Json<RemoveOutcome>, ApiError> {
    check_id("user", &req.user)?;
    check_id("device", &req.device)?;
    check_id("node_id", &req.node_id)?;
    let outcome = counted(
        &st.metrics,
        st.store.remove_presence(req, st.clock.now()).await,
    )?;
    if matches!(outcome, RemoveOutcome::Stale { .. }) {
        bump(&st.metrics.stale_updates, 1);
    }
    Ok(Json(outcome))
}

async fn lookup_user<S: DirectoryStore>(
    State(st): State<AppState<S>>,
    ApiPath(user): ApiPath<String>,
) -> Result<Json<UserLocation>, ApiError> {
    check_id("user", &user)?;
    let users = [user];
    let mut found = counted(
        &st.metrics,
        st.store.lookup_users(&users, st.clock.now()).await,
    )?;
    bump(&st.metrics.lookup_requests, 1);
    bump(&st.metrics.lookups, 1);
    let [user] = users;
    let loc = found.pop().unwrap_or(UserLocation {
        user,
        devices: Vec::new(),
    });
    Ok(Json(loc))
}

async fn lookup_users<S: DirectoryStore>(
    State(st): State<AppState<S>>,
    ApiJson(req): ApiJson<LookupRequest>,
) -> Result<Json<LookupResponse>, ApiError> {
    if req.users.len() > MAX_LOOKUP_BATCH {
        return Err(ApiError::invalid(format!(
            "{} users; at most {MAX_LOOKUP_BATCH} per lookup",
            req.users.len()
        )));
    }
    for u in &req.users {
        check_id("user", u)?;
    }
    let users = counted(
        &st.metrics,
        st.store.lookup_users(&req.users, st.clock.now()).await,
    )?;
    bump(&st.metrics.lookup_requests, 1);
    bump(&st.metrics.lookups, users.len() as u64);
    Ok(Json(LookupResponse { users }))
}

/// A heartbeat's stats snapshot, validated, as the JSON text to store.
fn stats_json<T: serde::Serialize>(
    stats: Option<&T>,
    validate: impl FnOnce(&T) -> Result<(), peerlink_api::fleet_stats::SnapshotError>,
) -> Result<Option<String>, ApiError> {
    let Some(s) = stats else { return Ok(None) };
    validate(s).map_err(|e| ApiError::invalid(format!("stats: {e}")))?;
    serde_json::to_string(s)
        .map(Some)
        .map_err(|e| ApiError::invalid(format!("stats: {e}")))
}

fn check_relay_registration(req: &RegisterRelayRequest) -> Result<(), ApiError> {
    check_id("relay_id", &req.relay_id)?;
    check_region("region", &req.region)?;
    check_load(req.load)?;
    if req.capacity == 0 {
        return Err(ApiError::invalid("capacity must be at least 1"));
    }
    Ok(())
}

async fn register_relay<S: DirectoryStore>(
    State(st): State<AppState<S>>,
    ApiJson(req): ApiJson<RegisterRelayRequest>,
) -> Result<Json<RegisterRelayResponse>, ApiError> {
    check_relay_registration(&req)?;
    counted(
        &st.metrics,
        st.store.register_relay(req, st.clock.now()).await,
    )?;
    bump(&st.metrics.relay_registrations, 1);
    Ok(Json(RegisterRelayResponse {
        heartbeat_interval_ms: duration_ms(st.config.heartbeat_interval()),
        relay_ttl_ms: duration_ms(st.config.node_ttl),
    }))
}

async fn relay_heartbeat<S: DirectoryStore>(
    State(st): State<AppState<S>>,
    ApiJson(req): ApiJson<RelayHeartbeatRequest>,
) -> Result<Json<HeartbeatResponse>, ApiError> {
    check_id("relay_id", &req.relay_id)?;
    check_load(req.load)?;
    let stats = stats_json(req.stats.as_ref(), |s| s.validate())?;
    let relay_id = req.relay_id.clone();
    let r = counted(
        &st.metrics,
        st.store.relay_heartbeat(req, st.clock.now()).await,
    );
    if matches!(r, Err(StoreError::UnknownRelay { .. })) {
        bump(&st.metrics.unknown_heartbeats, 1);
    }
    r?;
    if let Some(json) = stats {
        let r = st
            .store
            .put_stats(StatsKind::Relay, &relay_id, json, st.clock.now())
            .await;
        counted(&st.metrics, r)?;
    }
    Ok(Json(HeartbeatResponse {
        heartbeat_interval_ms: duration_ms(st.config.heartbeat_interval()),
    }))
}

async fn deregister_relay<S: DirectoryStore>(
    State(st): State<AppState<S>>,
    ApiJson(req): ApiJson<DeregisterRelayRequest>,
) -> Result<Json<DeregisterRelayResponse>, ApiError> {
    check_id("relay_id", &req.relay_id)?;
    let removed = counted(&st.metrics, st.store.deregister_relay(&req.relay_id).await)?;
    Ok(Json(DeregisterRelayResponse { removed }))
}

async fn list_relays<S: DirectoryStore>(
    State(st): State<AppState<S>>,
) -> Result<Json<RelayList>, ApiError> {
    let relays = counted(&st.metrics, st.store.list_relays(st.clock.now()).await)?;
    Ok(Json(RelayList { relays }))
}

async fn choose_relays<S: DirectoryStore>(
    State(st): State<AppState<S>>,
    ApiJson(req): ApiJson<ChooseRelaysRequest>,
) -> Result<Json<ChooseRelaysResponse>, ApiError> {
    check_region("caller_region", &req.caller_region)?;
    if let Some(r) = &req.callee_region {
        check_region("callee_region", r)?;
    }
    if req.count == 0 || req.count > MAX_CHOOSE_COUNT {
        return Err(ApiError::invalid(format!(
            "count must be 1..={MAX_CHOOSE_COUNT}"
        )));
    }
    let relays = counted(
        &st.metrics,
        st.store.choose_relays(&req, st.clock.now()).await,
    )?;
    bump(&st.metrics.choose_requests, 1);
    bump(&st.metrics.relays_chosen, relays.len() as u64);
    if relays.is_empty() {
        bump(&st.metrics.choices_empty, 1);
    }
    Ok(Json(ChooseRelaysResponse { relays }))
}

async fn metrics<S: DirectoryStore>(State(st): State<AppState<S>>) -> Response {
    let stats = counted(&st.metrics, st.store.stats(st.clock.now()).await);
    let m = &st.metrics;
    let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let mut e = Exposition::new();
    e.gauge(
        "store_up",
        "1 when the store answered this scrape, 0 when it could not be reached.",
        i64::from(stats.is_ok()),
    );
    // Without the store the gauges are unknown: left out rather than reported as zero.
    if let Ok(stats) = stats {
        e.gauge(
            "nodes",
            "Signaling nodes with a fresh heartbeat.",
            gauge(stats.nodes),
        );
        e.gauge(
            "relays_healthy",
            "Relays with a fresh heartbeat.",
            gauge(stats.relays_healthy),
        );
        e.gauge(
            "relays_known",
            "Relays known (healthy or not yet swept).",
            gauge(stats.relays_known),
        );
        e.gauge(
            "presence_entries",
            "Stored presence entries (expired ones linger until the next sweep).",
            gauge(stats.presence_entries),
        );
    }
    e.counter(
        "store_errors_total",
        "Store operations that failed (store unreachable, timed out or refusing).",
        c(&m.store_errors),
    );
    e.counter(
        "lookup_requests_total",
        "Presence lookup requests (single or batch).",
        c(&m.lookup_requests),
    );
    e.counter("lookups_total", "Users looked up.", c(&m.lookups));
    e.counter(
        "choose_requests_total",
        "Relay choice requests.",
        c(&m.choose_requests),
    );
    e.counter(
        "relays_chosen_total",
        "Relays handed out by choices.",
        c(&m.relays_chosen),
    );
    e.counter(
        "choices_empty_total",
        "Relay choices that found no usable relay.",
        c(&m.choices_empty),
    );
    e.counter(
        "presence_writes_total",
        "Presence entries written.",
        c(&m.presence_writes),
    );
    e.counter(
        "stale_updates_total",
        "Presence writes ignored for an older node epoch.",
        c(&m.stale_updates),
    );
    e.counter(
        "node_registrations_total",
        "Signaling node registrations.",
        c(&m.node_registrations),
    );
    e.counter(
        "relay_registrations_total",
        "Relay registrations.",
        c(&m.relay_registrations),
    );
    e.counter(
        "unknown_heartbeats_total",
        "Heartbeats from unknown nodes or relays (told to re-register).",
        c(&m.unknown_heartbeats),
    );
    e.counter(
        "unauthorized_total",
        "Requests refused for a missing or wrong cluster token.",
        c(&m.unauthorized),
    );
    e.counter(
        "swept_presence_total",
        "Presence entries removed by the sweeper.",
        c(&m.swept_presence),
    );
    e.counter(
        "swept_nodes_total",
        "Node records removed by the sweeper.",
        c(&m.swept_nodes),
    );
    e.counter(
        "swept_relays_total",
        "Relay records removed by the sweeper.",
        c(&m.swept_relays),
    );
    (
        [(header::CONTENT_TYPE, peerlink_cli::metrics::CONTENT_TYPE)],
        e.render("peerlink_directory"),
    )
        .into_response()
}

/// Interval of the background sweeper for these TTLs: a quarter of the shorter TTL, at least
/// 10 ms, at most 5 s.
pub fn sweep_interval(cfg: &StoreConfig) -> Duration {
    (cfg.node_ttl.min(cfg.presence_ttl) / 4)
        .clamp(Duration::from_millis(10), Duration::from_secs(5))
}

/// Owned background expiry task; stops when dropped or [`Sweeper::stop`]ped.
#[derive(Debug)]
pub struct Sweeper {
    cancel: CancellationToken,
    _guard: DropGuard,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Sweeper {
    /// Spawn the sweeper for `state` on the current runtime.
    pub fn spawn<S: DirectoryStore>(state: AppState<S>, every: Duration) -> Self {
        let cancel = CancellationToken::new();
        let token = cancel.clone();
        let task = tokio::spawn(
            async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        () = token.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    // A failed sweep (store unreachable) is counted; the next tick tries again.
                    let Some(s) = st_sweep(&state).await else {
                        continue;
                    };
                    if s.presence + s.nodes + s.relays > 0 {
                        debug!(
                            presence = s.presence,
                            nodes = s.nodes,
                            relays = s.relays,
                            "swept"
                        );
                    }
                }
            }
            .instrument(info_span!("sweeper")),
        );
        Self {
            _guard: cancel.clone().drop_guard(),
            cancel,
            task: Some(task),
        }
    }

    /// Stop and wait for the task to end.
    pub async fn stop(mut self) {
        self.cancel.cancel();
        if let Some(t) = self.task.take()
            && let Err(e) = t.await
        {
            warn!(error = %e, "sweeper task ended abnormally");
        }
    }
}

async fn st_sweep<S: DirectoryStore>(st: &AppState<S>) -> Option<crate::store::SweepStats> {
    let s = counted(&st.metrics, st.store.sweep(st.clock.now()).await).ok()?;
    bump(&st.metrics.swept_presence, s.presence);
    bump(&st.metrics.swept_nodes, s.nodes);
    bump(&st.metrics.swept_relays, s.relays);
    Some(s)
}
