//! Async HTTP client for the directory (plain HTTP, reqwest) and the registration loops that
//! keep a signaling node or relay registered across directory restarts.
//!
//! A [`NodeRegistration`] (from [`DirectoryClient::spawn_node_registration`]) registers, then
//! heartbeats every `heartbeat_interval_ms` the directory recommends. When a heartbeat answers
//! `unknown_node` (the directory restarted and forgot us) it re-registers at once and republishes
//! the node's presence entries from a [`PresenceSource`]. A `stale_epoch` answer means a newer
//! incarnation of this node exists: the loop stops. Dropping the handle stops the loop.
//! [`RelayRegistration`] does the same for relays.
//!
//! A client may hold several directory URLs (replicas on one shared store, given as a
//! comma-separated list): a request that fails with a connection error, a timeout or a 5xx
//! answer goes to the next URL, and the client sticks to the one that answered until it fails.
//! Every clone shares that choice. Retrying after a timeout may apply a request twice; every
//! request of this API is idempotent except a relay choice, where the retry counts one extra
//! `handed_out` until the relay's next heartbeat resets it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use reqwest::{StatusCode, Url};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::directory::*;

/// Default per-request timeout of the client.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Delay before retrying a failed registration when the directory gave no interval yet.
pub const DEFAULT_RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// What went wrong talking to the directory.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The base URL does not parse or cannot take paths.
    #[error("invalid directory URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL given.
        url: String,
        /// Why it was refused.
        reason: String,
    },
    /// Connection, timeout or body transport failure.
    #[error("directory request failed: {0}")]
    Transport(#[from] reqwest::Error),
    /// The directory answered with an error body.
    #[error("directory answered {status}: {code:?}: {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// Error code from the body.
        code: ErrorCode,
        /// Message from the body.
        message: String,
    },
    /// The directory answered something that is not our API (e.g. a proxy's error page).
    #[error("unexpected answer {status}: {body}")]
    Unexpected {
        /// HTTP status.
        status: u16,
        /// First bytes of the body.
        body: String,
    },
}

impl ClientError {
    /// The API error code, if the directory answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Api { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// True when another directory replica may answer: a connection error, a timeout or a
    /// 5xx answer (such as `store_unavailable`).
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::InvalidUrl { .. } => false,
            ClientError::Transport(e) => !e.is_decode() && !e.is_builder(),
            ClientError::Api { status, .. } | ClientError::Unexpected { status, .. } => {
                *status >= 500
            }
        }
    }

    /// True when the directory does not know this node/relay and it must register again.
    pub fn is_unknown(&self) -> bool {
        matches!(
            self.code(),
            Some(ErrorCode::UnknownNode) | Some(ErrorCode::UnknownRelay)
        )
    }
}

/// Async client of the directory's internal API, over one or several replicas' base URLs.
/// Cheap to clone.
#[derive(Debug, Clone)]
pub struct DirectoryClient {
    http: reqwest::Client,
    bases: Arc<[Url]>,
    /// Index into `bases` of the URL that answered last.
    current: Arc<AtomicUsize>,
    auth: Arc<str>,
}

/// Most base URLs one client takes.
pub const MAX_DIRECTORY_URLS: usize = 16;

/// Parse a comma-separated list of `http://` base URLs (spaces around commas ignored; at
/// least one, at most [`MAX_DIRECTORY_URLS`]).
pub fn parse_base_urls(list: &str) -> Result<Vec<Url>, ClientError> {
    let invalid = |url: &str, reason: &str| ClientError::InvalidUrl {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let mut out = Vec::new();
    for one in list.split(',').map(str::trim) {
        if one.is_empty() {
            return Err(invalid(list, "empty entry in the URL list"));
        }
        let base = Url::parse(one).map_err(|e| invalid(one, &e.to_string()))?;
        if base.cannot_be_a_base() || !matches!(base.scheme(), "http") {
            return Err(invalid(one, "need an http:// base URL"));
        }
        out.push(base);
    }
    if out.len() > MAX_DIRECTORY_URLS {
        return Err(invalid(
            list,
            &format!("at most {MAX_DIRECTORY_URLS} directory URLs"),
        ));
    }
    Ok(out)
}

impl DirectoryClient {
    /// Client for `base_urls` (`http://127.0.0.1:8500`, or several replicas' URLs separated
    /// by commas) with the shared cluster token.
    pub fn new(base_urls: &str, cluster_token: &str) -> Result<Self, ClientError> {
        Self::with_timeout(base_urls, cluster_token, DEFAULT_REQUEST_TIMEOUT)
    }

    /// Same as [`DirectoryClient::new`] with a custom per-request timeout (per URL tried).
    pub fn with_timeout(
        base_urls: &str,
        cluster_token: &str,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let bases = parse_base_urls(base_urls)?;
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()?;
        Ok(Self {
            http,
            bases: bases.into(),
            current: Arc::new(AtomicUsize::new(0)),
            auth: Arc::from(format!("Bearer {cluster_token}")),
        })
    }

    /// The base URL this client talks to now (the one that answered last).
    pub fn base_url(&self) -> &Url {
        let i = self.current.load(Ordering::Relaxed) % self.bases.len();
        &self.bases[i]
    }

    /// Every base URL, in the order given.
    pub fn base_urls(&self) -> &[Url] {
        &self.bases
    }

    /// Send `build(url)` to the current base URL, then to the next ones while the answer is
    /// retryable ([`ClientError::is_retryable`]); the first that answers becomes current.
    async fn send<R, F>(&self, segments: &[&str], build: F) -> Result<R, ClientError>
    where
        R: DeserializeOwned,
        F: Fn(Url) -> reqwest::RequestBuilder,
    {
        let n = self.bases.len();
        let first = self.current.load(Ordering::Relaxed) % n;
        let mut last = None;
        for k in 0..n {
            let i = (first + k) % n;
            let url = Self::join(&self.bases[i], segments)?;
            let result = match build(url).send().await {
                Ok(resp) => Self::decode(resp).await,
                Err(e) => Err(ClientError::Transport(e)),
            };
            match result {
                Err(e) if e.is_retryable() => {
                    if n > 1 {
                        debug!(directory = %self.bases[i], error = %e, "directory failed; trying the next");
                    }
                    last = Some(e);
                }
                done => {
                    if i != first {
                        info!(directory = %self.bases[i], "switched to another directory");
                        self.current.store(i, Ordering::Relaxed);
                    }
                    return done;
                }
            }
        }
        Err(last.unwrap_or_else(|| ClientError::InvalidUrl {
            url: String::new(),
            reason: "no directory URL".to_owned(),
        }))
    }

    fn join(base: &Url, segments: &[&str]) -> Result<Url, ClientError> {
        let mut url = base.clone();
        {
            let mut path = url
                .path_segments_mut()
                .map_err(|()| ClientError::InvalidUrl {
                    url: base.to_string(),
                    reason: "cannot be a base".to_owned(),
                })?;
            path.pop_if_empty();
            path.extend(segments);
        }
        Ok(url)
    }

    async fn decode<R: DeserializeOwned>(resp: reqwest::Response) -> Result<R, ClientError> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp.json::<R>().await?);
        }
        let bytes = resp.bytes().await?;
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => Err(ClientError::Api {
                status: status.as_u16(),
                code: body.error.code,
                message: body.error.message,
            }),
            Err(_) => Err(ClientError::Unexpected {
                status: status.as_u16(),
                body: String::from_utf8_lossy(&bytes[..bytes.len().min(256)]).into_owned(),
            }),
        }
    }

    async fn post<B: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        segments: &[&str],
        body: &B,
    ) -> Result<R, ClientError> {
        self.send(segments, |url| {
            self.http
                .post(url)
                .header(reqwest::header::AUTHORIZATION, &*self.auth)
                .json(body)
        })
        .await
    }

    async fn get<R: DeserializeOwned>(&self, segments: &[&str]) -> Result<R, ClientError> {
        self.send(segments, |url| {
            self.http
                .get(url)
                .header(reqwest::header::AUTHORIZATION, &*self.auth)
        })
        .await
    }

    /// `GET /healthz` of the current directory: Ok when it answers 200.
    pub async fn health(&self) -> Result<(), ClientError> {
        let url = Self::join(self.base_url(), &["healthz"])?;
        let resp = self.http.get(url).send().await?;
        let status = resp.status();
        if status == StatusCode::OK {
            Ok(())
        } else {
            Err(ClientError::Unexpected {
                status: status.as_u16(),
                body: String::new(),
            })
        }
    }

    /// Register (or re-register) a signaling node.
    pub async fn register_node(
        &self,
        req: &RegisterNodeRequest,
    ) -> Result<RegisterNodeResponse, ClientError> {
        self.post(&["v1", "nodes", "register"], req).await
    }

    /// Heartbeat a node (keeps it and its presence entries alive).
    pub async fn node_heartbeat(
        &self,
        req: &NodeHeartbeatRequest,
    ) -> Result<HeartbeatResponse, ClientError> {
        self.post(&["v1", "nodes", "heartbeat"], req).await
    }

    /// Remove a node and its presence entries (clean shutdown).
    pub async fn deregister_node(
        &self,
        node_id: &str,
        epoch: u64,
    ) -> Result<DeregisterNodeResponse, ClientError> {
        let req = DeregisterNodeRequest {
            node_id: node_id.to_owned(),
            epoch,
        };
        self.post(&["v1", "nodes", "deregister"], &req).await
    }

    /// Live signaling nodes.
    pub async fn list_nodes(&self) -> Result<Vec<NodeInfo>, ClientError> {
        Ok(self.get::<NodeList>(&["v1", "nodes"]).await?.nodes)
    }

    /// Set one device's presence.
    pub async fn update_presence(
        &self,
        update: &PresenceUpdate,
    ) -> Result<UpdateOutcome, ClientError> {
        self.post(&["v1", "presence"], update).await
    }

    /// Set many presence entries of one node (at most [`MAX_PRESENCE_BATCH`] per call).
    pub async fn update_presence_batch(
        &self,
        req: &PresenceBatchRequest,
    ) -> Result<PresenceBatchResponse, ClientError> {
        self.post(&["v1", "presence", "batch"], req).await
    }

    /// Remove one device's presence (only if it still points at `node_id`).
    pub async fn remove_presence(
        &self,
        req: &PresenceRemove,
    ) -> Result<RemoveOutcome, ClientError> {
        self.post(&["v1", "presence", "remove"], req).await
    }

    /// Where is `user`: all live devices with their nodes and the nodes' internal URLs.
    pub async fn lookup_user(&self, user: &str) -> Result<UserLocation, ClientError> {
        self.get(&["v1", "presence", user]).await
    }

    /// Batch lookup (contact lists); one answer per user, same order.
    pub async fn lookup_users(&self, users: &[String]) -> Result<Vec<UserLocation>, ClientError> {
        let req = LookupRequest {
            users: users.to_vec(),
        };
        Ok(self
            .post::<_, LookupResponse>(&["v1", "presence", "lookup"], &req)
            .await?
            .users)
    }

    /// Register (or re-register) a relay.
    pub async fn register_relay(
        &self,
        req: &RegisterRelayRequest,
    ) -> Result<RegisterRelayResponse, ClientError> {
        self.post(&["v1", "relays", "register"], req).await
    }

    /// Heartbeat a relay with its current figures.
    pub async fn relay_heartbeat(
        &self,
        req: &RelayHeartbeatRequest,
    ) -> Result<HeartbeatResponse, ClientError> {
        self.post(&["v1", "relays", "heartbeat"], req).await
    }

    /// Remove a relay.
    pub async fn deregister_relay(
        &self,
        relay_id: &str,
    ) -> Result<DeregisterRelayResponse, ClientError> {
        let req = DeregisterRelayRequest {
            relay_id: relay_id.to_owned(),
        };
        self.post(&["v1", "relays", "deregister"], &req).await
    }

    /// All known relays (healthy or not).
    pub async fn list_relays(&self) -> Result<Vec<RelayInfo>, ClientError> {
        Ok(self.get::<RelayList>(&["v1", "relays"]).await?.relays)
    }

    /// Choose relays for a call; empty when none is usable.
    pub async fn choose_relays(
        &self,
        req: &ChooseRelaysRequest,
    ) -> Result<Vec<ChosenRelay>, ClientError> {
        Ok(self
            .post::<_, ChooseRelaysResponse>(&["v1", "relays", "choose"], req)
            .await?
            .relays)
    }

    /// Start the node registration loop (register, heartbeat, re-register + republish presence
    /// when the directory forgot us). Stops when the returned handle is dropped.
    pub fn spawn_node_registration<P: PresenceSource>(
        &self,
        registration: RegisterNodeRequest,
        presence: P,
    ) -> NodeRegistration {
        self.spawn_node_registration_with_stats(registration, presence, NoNodeStats)
    }

    /// [`Self::spawn_node_registration`], each heartbeat also carrying the figures of `stats`
    /// for the operators' console.
    pub fn spawn_node_registration_with_stats<P: PresenceSource, N: NodeStatsSource>(
        &self,
        registration: RegisterNodeRequest,
        presence: P,
        stats: N,
    ) -> NodeRegistration {
        let cancel = CancellationToken::new();
        let (tx, rx) = watch::channel(RegistrationState::default());
        let load = Arc::new(AtomicU64::new(registration.load.to_bits()));
        let span = info_span!("node_registration", node_id = %registration.node_id, epoch = registration.epoch);
        let who = NodeRegistrant {
            reg: registration,
            presence,
            stats,
            load: load.clone(),
        };
        tokio::spawn(run_registration(self.clone(), who, tx, cancel.clone()).instrument(span));
        NodeRegistration {
            _guard: cancel.clone().drop_guard(),
            cancel,
            state: rx,
            load,
        }
    }

    /// Start the relay registration loop (register, heartbeat with figures from `status`,
    /// re-register when the directory forgot us). Stops when the returned handle is dropped.
    pub fn spawn_relay_registration<S: RelayStatusSource>(
        &self,
        registration: RegisterRelayRequest,
        status: S,
    ) -> RelayRegistration {
        let cancel = CancellationToken::new();
        let (tx, rx) = watch::channel(RegistrationState::default());
        let span = info_span!("relay_registration", relay_id = %registration.relay_id);
        let who = RelayRegistrant {
            reg: registration,
            status,
        };
        tokio::spawn(run_registration(self.clone(), who, tx, cancel.clone()).instrument(span));
        RelayRegistration {
            _guard: cancel.clone().drop_guard(),
            cancel,
            state: rx,
        }
    }
}

/// Supplies the current presence entries of a node, for republishing after a directory restart.
pub trait PresenceSource: Send + Sync + 'static {
    /// Every device session this node holds right now.
    fn current_presence(&self) -> Vec<NodePresence>;
}

impl<F> PresenceSource for F
where
    F: Fn() -> Vec<NodePresence> + Send + Sync + 'static,
{
    fn current_presence(&self) -> Vec<NodePresence> {
        self()
    }
}

/// Supplies a signaling node's console figures for its heartbeats.
pub trait NodeStatsSource: Send + Sync + 'static {
    /// Figures right now (`None`: send none).
    fn current_stats(&self) -> Option<NodeStatsSnapshot>;
}

impl<F> NodeStatsSource for F
where
    F: Fn() -> Option<NodeStatsSnapshot> + Send + Sync + 'static,
{
    fn current_stats(&self) -> Option<NodeStatsSnapshot> {
        self()
    }
}

/// A node that reports no console figures.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoNodeStats;

impl NodeStatsSource for NoNodeStats {
    fn current_stats(&self) -> Option<NodeStatsSnapshot> {
        None
    }
}

/// A relay's current figures, sent with each heartbeat.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RelayStatus {
    /// Load figure, 0.0 = idle, 1.0 = full.
    pub load: f64,
    /// Allocations held.
    pub allocations: u64,
    /// Draining flag.
    pub draining: bool,
}

/// Supplies a relay's current figures for its heartbeats.
pub trait RelayStatusSource: Send + Sync + 'static {
    /// Figures right now.
    fn current_status(&self) -> RelayStatus;

    /// Console figures right now, sent with heartbeats (default none).
    fn current_stats(&self) -> Option<RelayStatsSnapshot> {
        None
    }
}

impl<F> RelayStatusSource for F
where
    F: Fn() -> RelayStatus + Send + Sync + 'static,
{
    fn current_status(&self) -> RelayStatus {
        self()
    }
}

/// Observable state of a registration loop.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistrationState {
    /// Successful registrations so far (1 after the first, +1 per re-registration).
    pub registrations: u64,
    /// Presence entries republished by the last (re-)registration (nodes only).
    pub republished: u64,
    /// Successful heartbeats so far.
    pub heartbeats: u64,
    /// Currently believed registered.
    pub registered: bool,
    /// The loop stopped because a newer epoch of this node exists.
    pub superseded: bool,
    /// Last error seen, if the last attempt failed.
    pub last_error: Option<String>,
}

/// Handle of a running node registration loop; dropping it stops the loop.
#[derive(Debug)]
pub struct NodeRegistration {
    _guard: DropGuard,
    cancel: CancellationToken,
    state: watch::Receiver<RegistrationState>,
    load: Arc<AtomicU64>,
}

impl NodeRegistration {
    /// Set the load reported with the next heartbeat.
    pub fn set_load(&self, load: f64) {
        self.load.store(load.to_bits(), Ordering::Relaxed);
    }

    /// Current loop state.
    pub fn state(&self) -> RegistrationState {
        self.state.borrow().clone()
    }

    /// A receiver that changes whenever the loop state changes (for waiting on events).
    pub fn subscribe(&self) -> watch::Receiver<RegistrationState> {
        self.state.clone()
    }

    /// Stop the loop (same as dropping the handle; does not deregister).
    pub fn stop(&self) {
        self.cancel.cancel();
    }
}

/// Handle of a running relay registration loop; dropping it stops the loop.
#[derive(Debug)]
pub struct RelayRegistration {
    _guard: DropGuard,
    cancel: CancellationToken,
    state: watch::Receiver<RegistrationState>,
}

impl RelayRegistration {
    /// Current loop state.
    pub fn state(&self) -> RegistrationState {
        self.state.borrow().clone()
    }

    /// A receiver that changes whenever the loop state changes.
    pub fn subscribe(&self) -> watch::Receiver<RegistrationState> {
        self.state.clone()
    }

    /// Stop the loop (does not deregister).
    pub fn stop(&self) {
        self.cancel.cancel();
    }
}

/// Sleep for `d` unless cancelled; false when cancelled.
async fn pause(cancel: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        () = cancel.cancelled() => false,
        () = tokio::time::sleep(d) => true,
    }
}

fn interval_from_ms(ms: u64) -> Duration {
    // A directory could answer 0; never spin.
    Duration::from_millis(ms.max(50))
}

/// What one registration loop keeps registered: a signaling node or a relay.
trait Registrant: Send + 'static {
    /// "node" or "relay", for log lines.
    const WHAT: &'static str;

    /// Register (or re-register): the heartbeat interval and the presence entries republished.
    fn register(
        &mut self,
        client: &DirectoryClient,
    ) -> impl Future<Output = Result<(Duration, u64), ClientError>> + Send;

    /// One heartbeat: the next interval.
    fn heartbeat(
        &mut self,
        client: &DirectoryClient,
    ) -> impl Future<Output = Result<Duration, ClientError>> + Send;
}

struct NodeRegistrant<P, N> {
    reg: RegisterNodeRequest,
    presence: P,
    stats: N,
    load: Arc<AtomicU64>,
}

impl<P: PresenceSource, N: NodeStatsSource> Registrant for NodeRegistrant<P, N> {
    const WHAT: &'static str = "node";

    async fn register(&mut self, client: &DirectoryClient) -> Result<(Duration, u64), ClientError> {
        self.reg.load = f64::from_bits(self.load.load(Ordering::Relaxed));
        let resp = client.register_node(&self.reg).await?;
        let entries = self.presence.current_presence();
        let mut republished = 0u64;
        for chunk in entries.chunks(MAX_PRESENCE_BATCH) {
            let req = PresenceBatchRequest {
                node_id: self.reg.node_id.clone(),
                node_epoch: self.reg.epoch,
                entries: chunk.to_vec(),
            };
            republished += client.update_presence_batch(&req).await?.applied;
        }
        info!(
            republished,
            purged = resp.purged_presence,
            "registered with directory"
        );
        Ok((interval_from_ms(resp.heartbeat_interval_ms), republished))
    }

    async fn heartbeat(&mut self, client: &DirectoryClient) -> Result<Duration, ClientError> {
        let hb = NodeHeartbeatRequest {
            node_id: self.reg.node_id.clone(),
            epoch: self.reg.epoch,
            load: f64::from_bits(self.load.load(Ordering::Relaxed)),
            stats: self.stats.current_stats(),
        };
        let r = client.node_heartbeat(&hb).await?;
        Ok(interval_from_ms(r.heartbeat_interval_ms))
    }
}

struct RelayRegistrant<S> {
    reg: RegisterRelayRequest,
    status: S,
}

impl<S: RelayStatusSource> Registrant for RelayRegistrant<S> {
    const WHAT: &'static str = "relay";

    async fn register(&mut self, client: &DirectoryClient) -> Result<(Duration, u64), ClientError> {
        let st = self.status.current_status();
        self.reg.load = st.load;
        self.reg.allocations = st.allocations;
        self.reg.draining = st.draining;
        let resp = client.register_relay(&self.reg).await?;
        info!("relay registered with directory");
        Ok((interval_from_ms(resp.heartbeat_interval_ms), 0))
    }

    async fn heartbeat(&mut self, client: &DirectoryClient) -> Result<Duration, ClientError> {
        let st = self.status.current_status();
        let hb = RelayHeartbeatRequest {
            relay_id: self.reg.relay_id.clone(),
            load: st.load,
            allocations: st.allocations,
            draining: st.draining,
            stats: self.status.current_stats(),
        };
        let r = client.relay_heartbeat(&hb).await?;
        Ok(interval_from_ms(r.heartbeat_interval_ms))
    }
}

/// The registration loop of both kinds: register (retrying), heartbeat every interval the
/// directory recommends, re-register at once when it forgot us, stop for good when a newer
/// epoch of us is registered or when cancelled.
async fn run_registration<R: Registrant>(
    client: DirectoryClient,
    mut who: R,
    state: watch::Sender<RegistrationState>,
    cancel: CancellationToken,
) {
    let what = R::WHAT;
    let superseded = |e: &ClientError| {
        warn!(error = %e, "a newer epoch of this {what} is registered; stopping");
        state.send_modify(|s| {
            s.superseded = true;
            s.registered = false;
        });
    };
    let mut interval = DEFAULT_RETRY_INTERVAL;
    let mut registered = false;
    loop {
        if !registered {
            let attempt = tokio::select! {
                () = cancel.cancelled() => return,
                r = who.register(&client) => r,
            };
            match attempt {
                Ok((i, republished)) => {
                    interval = i;
                    registered = true;
                    state.send_modify(|s| {
                        s.registrations += 1;
                        s.republished = republished;
                        s.registered = true;
                        s.last_error = None;
                    });
                }
                Err(e) if e.code() == Some(ErrorCode::StaleEpoch) => return superseded(&e),
                Err(e) => {
                    debug!(error = %e, "{what} registration failed; retrying");
                    state.send_modify(|s| s.last_error = Some(e.to_string()));
                }
            }
        }
        if !pause(&cancel, interval).await {
            return;
        }
        if !registered {
            continue;
        }
        let result = tokio::select! {
            () = cancel.cancelled() => return,
            r = who.heartbeat(&client) => r,
        };
        match result {
            Ok(i) => {
                interval = i;
                state.send_modify(|s| {
                    s.heartbeats += 1;
                    s.last_error = None;
                });
            }
            Err(e) if e.is_unknown() => {
                // Re-register at once (top of the loop), no extra wait.
                info!("directory does not know this {what}; re-registering");
                registered = false;
                state.send_modify(|s| s.registered = false);
            }
            Err(e) if e.code() == Some(ErrorCode::StaleEpoch) => return superseded(&e),
            Err(e) => {
                debug!(error = %e, "{what} heartbeat failed");
                state.send_modify(|s| s.last_error = Some(e.to_string()));
            }
        }
    }
}
