//! The directory's internal HTTP/JSON API: request and response bodies (serde).
//!
//! Every `/v1/*` request carries `Authorization: Bearer <cluster token>`. Errors come back as
//! [`ErrorBody`] with a stable [`ErrorCode`]. Paths:
//!
//! | method + path | body -> answer |
//! |---|---|
//! | `POST /v1/nodes/register` | [`RegisterNodeRequest`] -> [`RegisterNodeResponse`] (409 `stale_epoch`) |
//! | `POST /v1/nodes/heartbeat` | [`NodeHeartbeatRequest`] -> [`HeartbeatResponse`] (404 `unknown_node`, 409 `stale_epoch`) |
//! | `POST /v1/nodes/deregister` | [`DeregisterNodeRequest`] -> [`DeregisterNodeResponse`] |
//! | `GET /v1/nodes` | -> [`NodeList`] (live nodes) |
//! | `POST /v1/presence` | [`PresenceUpdate`] -> [`UpdateOutcome`] (404 `unknown_node`) |
//! | `POST /v1/presence/batch` | [`PresenceBatchRequest`] -> [`PresenceBatchResponse`] |
//! | `POST /v1/presence/remove` | [`PresenceRemove`] -> [`RemoveOutcome`] |
//! | `GET /v1/presence/{user}` | -> [`UserLocation`] |
//! | `POST /v1/presence/lookup` | [`LookupRequest`] -> [`LookupResponse`] |
//! | `POST /v1/relays/register` | [`RegisterRelayRequest`] -> [`RegisterRelayResponse`] |
//! | `POST /v1/relays/heartbeat` | [`RelayHeartbeatRequest`] -> [`HeartbeatResponse`] (404 `unknown_relay`) |
//! | `POST /v1/relays/deregister` | [`DeregisterRelayRequest`] -> [`DeregisterRelayResponse`] |
//! | `GET /v1/relays` | -> [`RelayList`] (all known relays, with `healthy`) |
//! | `POST /v1/relays/choose` | [`ChooseRelaysRequest`] -> [`ChooseRelaysResponse`] |
//! | `GET /healthz` | -> `ok` (no token) |
//! | `GET /console` | the operators' fleet console (operator token, not the cluster token; off unless configured) |
//! | `GET /metrics` | -> Prometheus text (no token) |
//!
//! Presence rule: an entry is live while its own last update or its node's last heartbeat (same
//! epoch) is within the presence TTL. A node registering with a newer epoch purges every entry of
//! its older epochs at once; an update carrying an older epoch than the node's current one is
//! ignored and answered `{"outcome":"stale","current_epoch":N}`.
//!
//! Heartbeats may carry a stats snapshot ([`crate::fleet_stats`]) that the directory keeps
//! beside the registry for its console; a malformed one is refused with 400 `invalid_field`.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

pub use crate::fleet_stats::{NodeStatsSnapshot, RelayStatsSnapshot};

/// Longest accepted user, device, node or relay id (bytes).
pub const MAX_ID_LEN: usize = 128;
/// Longest accepted region name (bytes).
pub const MAX_REGION_LEN: usize = 64;
/// Longest accepted node internal URL (bytes).
pub const MAX_URL_LEN: usize = 512;
/// Most users in one batch lookup.
pub const MAX_LOOKUP_BATCH: usize = 5_000;
/// Most entries in one presence batch (the client splits bigger republishes).
pub const MAX_PRESENCE_BATCH: usize = 5_000;
/// Most relays one choice may return.
pub const MAX_CHOOSE_COUNT: u32 = 8;

/// A device's presence status as its user set it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PresenceStatus {
    /// Connected and available.
    Online,
    /// Connected, idle.
    Away,
    /// Connected, do not disturb.
    Busy,
}

/// `POST /v1/nodes/register`: a signaling node announces itself (again) with its epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegisterNodeRequest {
    /// Stable node id (e.g. host name).
    pub node_id: String,
    /// Base URL other nodes use to reach it (node-to-node delivery), e.g. `http://10.0.0.5:8443`.
    pub internal_url: String,
    /// Incarnation number; a restarted node must use a larger one (e.g. start time in ms).
    pub epoch: u64,
    /// Load figure, 0.0 = idle, 1.0 = full (default 0).
    #[serde(default)]
    pub load: f64,
}

/// Answer to a node registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterNodeResponse {
    /// Recommended heartbeat interval (node TTL / 3), milliseconds.
    pub heartbeat_interval_ms: u64,
    /// Node liveness TTL, milliseconds.
    pub node_ttl_ms: u64,
    /// Presence TTL, milliseconds.
    pub presence_ttl_ms: u64,
    /// Presence entries of older epochs of this node purged by this registration.
    pub purged_presence: u64,
    /// The epoch this node had before, if the directory knew it.
    pub previous_epoch: Option<u64>,
}

/// `POST /v1/nodes/heartbeat`: keeps the node and all its presence entries alive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeHeartbeatRequest {
    /// Node id as registered.
    pub node_id: String,
    /// Epoch as registered.
    pub epoch: u64,
    /// Current load, 0.0 = idle, 1.0 = full (default 0).
    #[serde(default)]
    pub load: f64,
    /// Figures for the operators' console (default none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<NodeStatsSnapshot>,
}

/// Answer to a node or relay heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    /// Recommended heartbeat interval, milliseconds.
    pub heartbeat_interval_ms: u64,
}

/// `POST /v1/nodes/deregister`: a node shutting down cleanly; its presence goes at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeregisterNodeRequest {
    /// Node id.
    pub node_id: String,
    /// Epoch being retired; an older epoch than the current one is ignored.
    pub epoch: u64,
}

/// Answer to a node deregistration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeregisterNodeResponse {
    /// Whether the node (at that epoch) was known and removed.
    pub removed: bool,
    /// Presence entries removed with it.
    pub purged_presence: u64,
}

/// One signaling node as listed by `GET /v1/nodes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Node id.
    pub node_id: String,
    /// Internal base URL.
    pub internal_url: String,
    /// Current epoch.
    pub epoch: u64,
    /// Last reported load.
    pub load: f64,
    /// Milliseconds since its last heartbeat or registration.
    pub last_heartbeat_age_ms: u64,
}

/// `GET /v1/nodes` answer: nodes whose heartbeat is fresh.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeList {
    /// Live nodes, sorted by id.
    pub nodes: Vec<NodeInfo>,
}

/// `POST /v1/presence`: set one device's presence (creates or refreshes the entry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceUpdate {
    /// User id.
    pub user: String,
    /// Device id (unique per user).
    pub device: String,
    /// Signaling node holding the device's session.
    pub node_id: String,
    /// That node's epoch.
    pub node_epoch: u64,
    /// Status.
    pub status: PresenceStatus,
}

/// Result of a presence write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum UpdateOutcome {
    /// The write took effect.
    Applied,
    /// Ignored: it carried an older epoch than the node's current one.
    Stale {
        /// The node's current epoch.
        current_epoch: u64,
    },
}

/// One entry of a node's presence batch (node id and epoch are the batch's).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodePresence {
    /// User id.
    pub user: String,
    /// Device id.
    pub device: String,
    /// Status.
    pub status: PresenceStatus,
}

/// `POST /v1/presence/batch`: many entries of one node (republish after a directory restart).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceBatchRequest {
    /// Node id.
    pub node_id: String,
    /// Node epoch.
    pub node_epoch: u64,
    /// Entries (at most [`MAX_PRESENCE_BATCH`]).
    pub entries: Vec<NodePresence>,
}

/// Answer to a presence batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceBatchResponse {
    /// Applied, or stale (nothing applied).
    #[serde(flatten)]
    pub outcome: UpdateOutcome,
    /// Entries written.
    pub applied: u64,
}

/// `POST /v1/presence/remove`: a device logged off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceRemove {
    /// User id.
    pub user: String,
    /// Device id.
    pub device: String,
    /// Node that held the session; the entry is removed only if it still points there.
    pub node_id: String,
    /// That node's epoch.
    pub node_epoch: u64,
}

/// Result of a presence removal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum RemoveOutcome {
    /// The entry was removed.
    Removed,
    /// No such entry for that node (absent, expired, or moved to another node).
    NotFound,
    /// Ignored: older epoch than the node's current one.
    Stale {
        /// The node's current epoch.
        current_epoch: u64,
    },
}

/// Where one device of a user is connected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceLocation {
    /// Device id.
    pub device: String,
    /// Signaling node holding it.
    pub node_id: String,
    /// That node's epoch.
    pub node_epoch: u64,
    /// The node's internal URL (absent if the node record has expired meanwhile).
    pub node_url: Option<String>,
    /// Status.
    pub status: PresenceStatus,
    /// Milliseconds since the entry was last written.
    pub last_seen_age_ms: u64,
}

/// All live devices of one user (empty `devices` = offline).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserLocation {
    /// User id.
    pub user: String,
    /// Live devices, sorted by device id.
    pub devices: Vec<DeviceLocation>,
}

/// `POST /v1/presence/lookup`: batch lookup (contact lists).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LookupRequest {
    /// Users to look up (at most [`MAX_LOOKUP_BATCH`]).
    pub users: Vec<String>,
}

/// Answer to a batch lookup: one [`UserLocation`] per requested user, same order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LookupResponse {
    /// Per-user locations.
    pub users: Vec<UserLocation>,
}

/// `POST /v1/relays/register`: a relay announces itself (again).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegisterRelayRequest {
    /// Stable relay id.
    pub relay_id: String,
    /// Public TURN address clients allocate on.
    pub turn_addr: SocketAddr,
    /// TURN-over-TCP address, when the relay listens for TCP clients (default none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub turn_tcp_addr: Option<SocketAddr>,
    /// TURN-over-TLS address, when the relay listens for TLS clients (default none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub turn_tls_addr: Option<SocketAddr>,
    /// Metrics HTTP address.
    pub metrics_addr: SocketAddr,
    /// Region name (e.g. `eu-west`).
    pub region: String,
    /// Allocations it can hold.
    pub capacity: u64,
    /// Load figure, 0.0 = idle, 1.0 = full (default 0).
    #[serde(default)]
    pub load: f64,
    /// Allocations currently held (default 0).
    #[serde(default)]
    pub allocations: u64,
    /// Draining: serves existing allocations, takes no new calls (default false).
    #[serde(default)]
    pub draining: bool,
}

/// Answer to a relay registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterRelayResponse {
    /// Recommended heartbeat interval (relay TTL / 3), milliseconds.
    pub heartbeat_interval_ms: u64,
    /// Relay liveness TTL, milliseconds.
    pub relay_ttl_ms: u64,
}

/// `POST /v1/relays/heartbeat`: current figures; resets the relay's "handed out" counter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelayHeartbeatRequest {
    /// Relay id as registered.
    pub relay_id: String,
    /// Load figure, 0.0 = idle, 1.0 = full.
    pub load: f64,
    /// Allocations currently held.
    pub allocations: u64,
    /// Draining flag.
    pub draining: bool,
    /// Figures for the operators' console (default none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<RelayStatsSnapshot>,
}

/// `POST /v1/relays/deregister`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeregisterRelayRequest {
    /// Relay id.
    pub relay_id: String,
}

/// Answer to a relay deregistration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeregisterRelayResponse {
    /// Whether the relay was known.
    pub removed: bool,
}

/// One relay as listed by `GET /v1/relays`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelayInfo {
    /// Relay id.
    pub relay_id: String,
    /// Public TURN address.
    pub turn_addr: SocketAddr,
    /// TURN-over-TCP address, when the relay listens for TCP clients (default none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub turn_tcp_addr: Option<SocketAddr>,
    /// TURN-over-TLS address, when the relay listens for TLS clients (default none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub turn_tls_addr: Option<SocketAddr>,
    /// Metrics address.
    pub metrics_addr: SocketAddr,
    /// Region.
    pub region: String,
    /// Last reported load.
    pub load: f64,
    /// Last reported allocations.
    pub allocations: u64,
    /// Capacity.
    pub capacity: u64,
    /// Draining flag.
    pub draining: bool,
    /// Choices handed out since its last heartbeat.
    pub handed_out: u64,
    /// Heartbeat fresh (within the node TTL).
    pub healthy: bool,
    /// Milliseconds since its last heartbeat.
    pub last_heartbeat_age_ms: u64,
}

/// `GET /v1/relays` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelayList {
    /// Relays, sorted by id.
    pub relays: Vec<RelayInfo>,
}

fn default_count() -> u32 {
    1
}

/// `POST /v1/relays/choose`: pick relays for a call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChooseRelaysRequest {
    /// Caller's region (preferred).
    pub caller_region: String,
    /// Callee's region, tried after the caller's.
    #[serde(default)]
    pub callee_region: Option<String>,
    /// How many distinct relays (1..=[`MAX_CHOOSE_COUNT`], default 1).
    #[serde(default = "default_count")]
    pub count: u32,
}

/// One chosen relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChosenRelay {
    /// Relay id.
    pub relay_id: String,
    /// Public TURN address to allocate on.
    pub turn_addr: SocketAddr,
    /// TURN-over-TCP address, when the relay listens for TCP clients (default none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub turn_tcp_addr: Option<SocketAddr>,
    /// TURN-over-TLS address, when the relay listens for TLS clients (default none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub turn_tls_addr: Option<SocketAddr>,
    /// Its region.
    pub region: String,
}

/// Answer to a relay choice: up to `count` distinct relays, best first; empty if none is usable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChooseRelaysResponse {
    /// Chosen relays.
    pub relays: Vec<ChosenRelay>,
}

/// Stable machine-readable error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Missing or wrong cluster token (401).
    Unauthorized,
    /// Body is not valid JSON for this endpoint (400 / 415 / 422).
    BadRequest,
    /// A field is out of range (400).
    InvalidField,
    /// Body over the size limit (413).
    PayloadTooLarge,
    /// Node not registered at this epoch: register (again) (404).
    UnknownNode,
    /// Relay not registered: register (again) (404).
    UnknownRelay,
    /// Older epoch than the node's current one (409).
    StaleEpoch,
    /// No such route (404).
    NotFound,
    /// Request took too long (408).
    Timeout,
    /// Storage backend failure (500).
    Internal,
    /// The storage backend (Redis) cannot be reached right now (503); retry, also at another
    /// directory replica.
    StoreUnavailable,
}

/// Error payload inside [`ErrorBody`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Machine-readable code.
    pub code: ErrorCode,
    /// Human-readable explanation.
    pub message: String,
}

/// Every non-2xx answer's body: `{"error":{"code":"...","message":"..."}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}
