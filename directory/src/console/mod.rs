//! The operators' fleet console at `/console`: signaling nodes, relays, directory replicas and
//! the relays' forwarding latency (HDR percentile plots per relay and fleet-wide, percentiles
//! over time), updated live over server-sent events.
//!
//! Where the figures come from: relays and signaling nodes attach a compact stats snapshot
//! (`peerlink_api::fleet_stats`) to their heartbeats; the directory validates it and keeps
//! the latest one per sender in its store ([`crate::store::DirectoryStore::put_stats`]), so
//! with several replicas on one Redis every replica's console shows the same fleet. The
//! directory never connects to relays or nodes for this (their metrics ports may be private,
//! and the addresses are whatever registrants claim). Each replica also writes a record of
//! its own ([`Beacon`]) so that the console lists the replicas sharing the store.
//!
//! Access: only with an operator token configured (`--operator-token-file`,
//! `PEERLINK_OPERATOR_TOKEN`, or `operator_token` in the TOML file); without one, `/console`
//! does not exist (404). Requests need the token as `Authorization: Bearer <token>` or in the
//! HttpOnly, SameSite=Strict cookie that the login form (`POST /console/login`) sets; both are
//! compared in constant time; anything else is answered 401 with the login form. The page is
//! static HTML, CSS and JavaScript embedded in the binary (no CDN, works offline, a strict
//! Content-Security-Policy with no inline script); it fetches [`view::FleetDoc`] JSON and sets
//! every string with `textContent`. The documents hold no secret: no token, no credential,
//! no store URL.
//!
//! | method + path | answer |
//! |---|---|
//! | `GET /console` | the console page (401: the login form) |
//! | `POST /console/login` | form `token=...` -> 303 to `/console` with the cookie (401: the form again) |
//! | `POST /console/logout` | 303 to `/console`, cookie cleared |
//! | `GET /console/api/fleet` | [`view::FleetDoc`] JSON |
//! | `GET /console/events` | `text/event-stream`: a `fleet` event with a [`view::FleetDoc`] every [`TICK`] |
//! | `GET /console/app.js`, `/console/app.css` | the page's script and style (no data; no token) |

pub mod view;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{Form, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use futures_util::stream::{self, Stream};
use serde::Deserialize;
use subtle::ConstantTimeEq;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{Instrument, debug, info_span, warn};

use crate::server::AppState;
use crate::store::{DirectoryStore, RELAY_RETENTION_TTLS, StatsKind};
use view::{FleetDoc, FleetTracker, Observation, ReplicaRecord};

/// How often the event stream sends a fresh view.
pub const TICK: Duration = Duration::from_secs(1);
/// An event stream ends after this long (the browser reconnects at once); bounds how long a
/// connection lives and lets a graceful shutdown finish.
pub const STREAM_LIFETIME: Duration = Duration::from_secs(600);
/// How often each replica rewrites its own record.
pub const BEACON_INTERVAL: Duration = Duration::from_secs(2);
/// A replica record older than this is no longer listed.
pub const REPLICA_MAX_AGE: Duration = Duration::from_secs(7);
/// Name of the session cookie.
pub const COOKIE: &str = "peerlink_console";
/// Lifetime of the session cookie.
pub const COOKIE_MAX_AGE_S: u64 = 12 * 3600;

const PAGE: &str = include_str!("index.html");
const LOGIN: &str = include_str!("login.html");
const SCRIPT: &str = include_str!("app.js");
const STYLE: &str = include_str!("app.css");

/// Content-Security-Policy of every console answer: nothing but this origin's own script and
/// style, no inline code, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The console of one replica: its operator token and its tracker.
pub struct Console {
    token: Box<[u8]>,
    replica_id: String,
    tracker: Mutex<FleetTracker>,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("replica_id", &self.replica_id)
            .finish_non_exhaustive()
    }
}

impl Console {
    /// A console accepting `operator_token`, answering as `replica_id`.
    pub fn new(operator_token: &str, replica_id: &str) -> Self {
        Self {
            token: operator_token.as_bytes().into(),
            replica_id: replica_id.to_owned(),
            tracker: Mutex::new(FleetTracker::new()),
            shutdown: CancellationToken::new(),
        }
    }

    /// End every event stream (call before a graceful shutdown).
    pub fn close_streams(&self) {
        self.shutdown.cancel();
    }

    fn accepts(&self, presented: &[u8]) -> bool {
        // The length is not secret; the bytes are compared in constant time.
        bool::from(presented.ct_eq(&self.token))
    }

    /// Whether the request carries the operator token (bearer header or cookie).
    fn authorized(&self, headers: &HeaderMap) -> bool {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
        if bearer.is_some_and(|t| self.accepts(t)) {
            return true;
        }
        headers
            .get_all(header::COOKIE)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b';'))
            .filter_map(|c| {
                c.trim_ascii()
                    .strip_prefix(COOKIE.as_bytes())?
                    .strip_prefix(b"=")
            })
            .any(|t| self.accepts(t))
    }
}

/// Routes of the console (merged into the service router when a token is configured).
pub fn routes<S: DirectoryStore>(console: Arc<Console>) -> Router<AppState<S>> {
    let guarded = Router::new()
        .route("/console", get(page))
        .route("/console/", get(page))
        .route("/console/api/fleet", get(fleet_json::<S>))
        .route("/console/events", get(events::<S>))
        .route_layer(middleware::from_fn_with_state(
            console.clone(),
            require_operator,
        ));
    Router::new()
        .merge(guarded)
        .route("/console/login", post(login))
        .route("/console/logout", post(logout))
        .route(
            "/console/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            "/console/app.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
        .layer(axum::Extension(console))
        .layer(middleware::from_fn(security_headers))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// Headers of every console answer: CSP, no sniffing, no caching, no referrer.
async fn security_headers(req: Request, next: Next) -> Response {
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    r
}

fn login_page(status: StatusCode, message: &str) -> Response {
    // The message is one of our own constants; nothing from the request is echoed.
    let body = LOGIN.replace("{{message}}", message);
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::WWW_AUTHENTICATE,
                "Bearer realm=\"peerlink console\"",
            ),
        ],
        body,
    )
        .into_response()
}

async fn require_operator(
    State(console): State<Arc<Console>>,
    req: Request,
    next: Next,
) -> Response {
    if console.authorized(req.headers()) {
        return next.run(req).await;
    }
    if req.uri().path().starts_with("/console/api") || req.uri().path() == "/console/events" {
        return (
            StatusCode::UNAUTHORIZED,
            [(
                header::WWW_AUTHENTICATE,
                "Bearer realm=\"peerlink console\"",
            )],
            "operator token required\n",
        )
            .into_response();
    }
    login_page(StatusCode::UNAUTHORIZED, "")
}

async fn page() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], PAGE).into_response()
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(
    axum::Extension(console): axum::Extension<Arc<Console>>,
    form: Result<Form<LoginForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let Ok(Form(f)) = form else {
        return login_page(StatusCode::BAD_REQUEST, "Enter the operator token.");
    };
    if !console.accepts(f.token.as_bytes()) {
        return login_page(StatusCode::UNAUTHORIZED, "Wrong token.");
    }
    // The token was checked above: printable ASCII without spaces, a valid cookie value.
    let cookie = format!(
        "{COOKIE}={}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={COOKIE_MAX_AGE_S}",
        f.token
    );
    let mut r = Redirect::to("/console").into_response();
    match HeaderValue::from_str(&cookie) {
        Ok(v) => {
            r.headers_mut().insert(header::SET_COOKIE, v);
        }
        Err(_) => return login_page(StatusCode::BAD_REQUEST, "Unusable token."),
    }
    r
}

async fn logout() -> Response {
    let mut r = Redirect::to("/console").into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "peerlink_console=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
    r
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Read everything the view needs from the store (records that do not parse are skipped: they
/// were validated when stored, so only a foreign writer could have put them there).
async fn read<S: DirectoryStore>(
    st: &AppState<S>,
) -> Result<Observation, crate::store::StoreError> {
    let now = st.clock.now();
    let retention = st.config.node_ttl * u32::try_from(RELAY_RETENTION_TTLS).unwrap_or(3);
    let relays = st.store.list_relays(now).await?;
    let nodes = st.store.list_nodes(now).await?;
    fn parse<T: serde::de::DeserializeOwned>(kind: &str, id: &str, json: &str) -> Option<T> {
        let r = serde_json::from_str(json);
        if r.is_err() {
            debug!(kind, id, "unreadable stats record skipped");
        }
        r.ok()
    }
    let relay_stats = st
        .store
        .list_stats(StatsKind::Relay, retention, now)
        .await?
        .into_iter()
        .filter_map(|r| Some((r.id.clone(), parse("relay", &r.id, &r.json)?, r.age_ms)))
        .collect();
    let node_stats = st
        .store
        .list_stats(StatsKind::Node, retention, now)
        .await?
        .into_iter()
        .filter_map(|r| Some((r.id.clone(), parse("node", &r.id, &r.json)?, r.age_ms)))
        .collect();
    let replicas = st
        .store
        .list_stats(StatsKind::Replica, REPLICA_MAX_AGE, now)
        .await?
        .into_iter()
        .filter_map(|r| Some((parse("replica", &r.id, &r.json)?, r.age_ms)))
        .collect();
    Ok(Observation {
        relays,
        nodes,
        relay_stats,
        node_stats,
        replicas,
    })
}

/// One view of the fleet now.
pub async fn fleet_doc<S: DirectoryStore>(st: &AppState<S>, console: &Console) -> FleetDoc {
    let now = unix_ms();
    match read(st).await {
        Ok(obs) => console
            .tracker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe(now, &console.replica_id, obs),
        Err(e) => {
            debug!(error = %e, "console: store unavailable");
            FleetDoc {
                generated_unix_ms: now,
                replica_id: console.replica_id.clone(),
                store_ok: false,
                fleet: Default::default(),
                relays: Vec::new(),
                nodes: Vec::new(),
                replicas: Vec::new(),
            }
        }
    }
}

async fn fleet_json<S: DirectoryStore>(
    State(st): State<AppState<S>>,
    axum::Extension(console): axum::Extension<Arc<Console>>,
) -> Response {
    axum::Json(fleet_doc(&st, &console).await).into_response()
}

async fn events<S: DirectoryStore>(
    State(st): State<AppState<S>>,
    axum::Extension(console): axum::Extension<Arc<Console>>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let until = tokio::time::Instant::now() + STREAM_LIFETIME;
    let cancel = console.shutdown.clone();
    let stream = stream::unfold((st, console, true), move |(st, console, first)| {
        let cancel = cancel.clone();
        async move {
            if !first {
                tokio::select! {
                    () = cancel.cancelled() => return None,
                    () = tokio::time::sleep(TICK) => {}
                }
            }
            if tokio::time::Instant::now() >= until || cancel.is_cancelled() {
                return None;
            }
            let doc = fleet_doc(&st, &console).await;
            let event = Event::default()
                .event("fleet")
                .json_data(&doc)
                .unwrap_or_else(|_| Event::default().event("error").data("encoding failed"));
            Some((Ok(event), (st, console, false)))
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// This replica's id: its host name and listen address.
pub fn replica_id(listen: std::net::SocketAddr) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "directory".to_owned());
    format!("{host}/{listen}")
}

/// Owned task writing this replica's record every [`BEACON_INTERVAL`]; stops when dropped.
#[derive(Debug)]
pub struct Beacon {
    _guard: DropGuard,
    task: tokio::task::JoinHandle<()>,
}

impl Beacon {
    /// Spawn the beacon of `record` over `state`'s store.
    pub fn spawn<S: DirectoryStore>(state: AppState<S>, record: ReplicaRecord) -> Self {
        let cancel = CancellationToken::new();
        let token = cancel.clone();
        let task = tokio::spawn(
            async move {
                let json = match serde_json::to_string(&record) {
                    Ok(j) => j,
                    Err(e) => return warn!(error = %e, "replica record does not encode"),
                };
                let mut tick = tokio::time::interval(BEACON_INTERVAL);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        () = token.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    let r = state
                        .store
                        .put_stats(
                            StatsKind::Replica,
                            &record.replica_id,
                            json.clone(),
                            state.clock.now(),
                        )
                        .await;
                    if let Err(e) = r {
                        debug!(error = %e, "writing the replica record failed");
                    }
                }
            }
            .instrument(info_span!("beacon")),
        );
        Self {
            _guard: cancel.drop_guard(),
            task,
        }
    }

    /// Whether the task ended (it ends only when stopped).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}
