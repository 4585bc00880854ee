//! The storage trait behind the directory. The embedded default is
//! [`crate::memory::MemoryStore`]; [`crate::redis_store::RedisStore`] keeps the same state in
//! Redis so several directory replicas answer as one. Every method returns a `Send` future and
//! takes `now` explicitly (TTL logic is driven by the caller's clock, so tests use virtual
//! time and run the same suite on both stores). Every method can fail with
//! [`StoreError::Unavailable`] when a shared backend cannot be reached.
//!
//! Inputs are validated by the HTTP layer before they reach a store.

use std::future::Future;
use std::time::Duration;

use crate::clock::Timestamp;
use peerlink_api::directory::{
    ChooseRelaysRequest, ChosenRelay, DeregisterNodeResponse, NodeInfo, NodePresence,
    PresenceRemove, PresenceUpdate, RegisterNodeRequest, RegisterNodeResponse,
    RegisterRelayRequest, RelayHeartbeatRequest, RelayInfo, RemoveOutcome, UpdateOutcome,
    UserLocation,
};

/// Default presence TTL.
pub const DEFAULT_PRESENCE_TTL: Duration = Duration::from_secs(30);
/// Default node and relay liveness TTL.
pub const DEFAULT_NODE_TTL: Duration = Duration::from_secs(10);

/// A relay record is kept (listed as unhealthy) this many node TTLs after its last heartbeat.
pub const RELAY_RETENTION_TTLS: u64 = 3;

/// TTLs and the relay-choice seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreConfig {
    /// A presence entry lives this long after its last write or its node's last heartbeat.
    pub presence_ttl: Duration,
    /// A node or relay is live this long after its last heartbeat.
    pub node_ttl: Duration,
    /// Seed of the relay-choice RNG (`None` = from OS entropy).
    pub seed: Option<u64>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            presence_ttl: DEFAULT_PRESENCE_TTL,
            node_ttl: DEFAULT_NODE_TTL,
            seed: None,
        }
    }
}

impl StoreConfig {
    /// Recommended heartbeat interval: a third of the node TTL, so two lost heartbeats are
    /// tolerated before a node or relay counts as dead.
    pub fn heartbeat_interval(&self) -> Duration {
        self.node_ttl / 3
    }
}

/// Why a store refused an operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The node is not registered at this epoch (never, expired, or the directory restarted).
    #[error("unknown node {node_id:?} at epoch {epoch}; register first")]
    UnknownNode {
        /// Node id.
        node_id: String,
        /// Epoch the caller used.
        epoch: u64,
    },
    /// The caller's epoch is older than the node's current one.
    #[error("stale epoch {epoch} for node {node_id:?}; current is {current_epoch}")]
    StaleEpoch {
        /// Node id.
        node_id: String,
        /// Epoch the caller used.
        epoch: u64,
        /// Current epoch.
        current_epoch: u64,
    },
    /// The relay is not registered.
    #[error("unknown relay {relay_id:?}; register first")]
    UnknownRelay {
        /// Relay id.
        relay_id: String,
    },
    /// The backend cannot be reached or did not answer in time (answered 503; the request
    /// may be retried, also at another replica).
    #[error("storage backend unavailable: {0}")]
    Unavailable(String),
    /// The backend failed otherwise (refused a command, held data it cannot read).
    #[error("storage backend failed: {0}")]
    Backend(String),
}

/// Gauges for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Live signaling nodes.
    pub nodes: u64,
    /// Healthy relays (fresh heartbeat).
    pub relays_healthy: u64,
    /// Known relays (healthy or not yet swept).
    pub relays_known: u64,
    /// Stored presence entries (expired ones linger until the next sweep).
    pub presence_entries: u64,
}

/// What one sweep removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepStats {
    /// Node records removed.
    pub nodes: u64,
    /// Relay records removed.
    pub relays: u64,
    /// Presence entries removed.
    pub presence: u64,
}

/// What a stats record describes (see [`DirectoryStore::put_stats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StatsKind {
    /// A relay's heartbeat snapshot.
    Relay,
    /// A signaling node's heartbeat snapshot.
    Node,
    /// A directory replica's own record (each replica writes its own).
    Replica,
}

impl StatsKind {
    /// Name used in storage keys.
    pub fn as_str(self) -> &'static str {
        match self {
            StatsKind::Relay => "relay",
            StatsKind::Node => "node",
            StatsKind::Replica => "replica",
        }
    }
}

/// One stored stats record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsRecord {
    /// Relay, node or replica id.
    pub id: String,
    /// The record as JSON text (validated before it was stored).
    pub json: String,
    /// Milliseconds since it was written.
    pub age_ms: u64,
}

/// Presence, node registry and relay registry storage. All TTL decisions use `now`.
pub trait DirectoryStore: Send + Sync + 'static {
    /// Register a node; a newer epoch purges every presence entry of older epochs.
    fn register_node(
        &self,
        req: RegisterNodeRequest,
        now: Timestamp,
    ) -> impl Future<Output = Result<RegisterNodeResponse, StoreError>> + Send;

    /// Heartbeat a node at its current epoch.
    fn node_heartbeat(
        &self,
        node_id: &str,
        epoch: u64,
        load: f64,
        now: Timestamp,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Remove a node (at `epoch`) and its presence entries.
    fn deregister_node(
        &self,
        node_id: &str,
        epoch: u64,
        now: Timestamp,
    ) -> impl Future<Output = Result<DeregisterNodeResponse, StoreError>> + Send;

    /// Live nodes, sorted by id.
    fn list_nodes(
        &self,
        now: Timestamp,
    ) -> impl Future<Output = Result<Vec<NodeInfo>, StoreError>> + Send;

    /// Write one presence entry.
    fn update_presence(
        &self,
        update: PresenceUpdate,
        now: Timestamp,
    ) -> impl Future<Output = Result<UpdateOutcome, StoreError>> + Send;

    /// Write many presence entries of one node; returns the outcome and how many were written.
    fn update_presence_batch(
        &self,
        node_id: &str,
        node_epoch: u64,
        entries: Vec<NodePresence>,
        now: Timestamp,
    ) -> impl Future<Output = Result<(UpdateOutcome, u64), StoreError>> + Send;

    /// Remove one presence entry if it still points at the given node.
    fn remove_presence(
        &self,
        req: PresenceRemove,
        now: Timestamp,
    ) -> impl Future<Output = Result<RemoveOutcome, StoreError>> + Send;

    /// Live devices of each user, in request order.
    fn lookup_users(
        &self,
        users: &[String],
        now: Timestamp,
    ) -> impl Future<Output = Result<Vec<UserLocation>, StoreError>> + Send;

    /// Register or replace a relay (resets its handed-out counter).
    fn register_relay(
        &self,
        req: RegisterRelayRequest,
        now: Timestamp,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Heartbeat a relay; resets its handed-out counter.
    fn relay_heartbeat(
        &self,
        req: RelayHeartbeatRequest,
        now: Timestamp,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Remove a relay; true if it was known.
    fn deregister_relay(
        &self,
        relay_id: &str,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// All known relays, sorted by id.
    fn list_relays(
        &self,
        now: Timestamp,
    ) -> impl Future<Output = Result<Vec<RelayInfo>, StoreError>> + Send;

    /// Choose up to `count` relays (see [`crate::select`]); increments their handed-out counters.
    fn choose_relays(
        &self,
        req: &ChooseRelaysRequest,
        now: Timestamp,
    ) -> impl Future<Output = Result<Vec<ChosenRelay>, StoreError>> + Send;

    /// Remove everything expired at `now`.
    fn sweep(&self, now: Timestamp) -> impl Future<Output = Result<SweepStats, StoreError>> + Send;

    /// Gauges at `now`.
    fn stats(&self, now: Timestamp) -> impl Future<Output = Result<StoreStats, StoreError>> + Send;

    /// Keep `json` as the latest stats record of `id` (replacing the previous one), for the
    /// console. Records are kept beside the registry, not in it, so that relay choice never
    /// reads them.
    fn put_stats(
        &self,
        kind: StatsKind,
        id: &str,
        json: String,
        now: Timestamp,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Every record of `kind` written less than `max_age` ago, sorted by id; older ones are
    /// dropped.
    fn list_stats(
        &self,
        kind: StatsKind,
        max_age: Duration,
        now: Timestamp,
    ) -> impl Future<Output = Result<Vec<StatsRecord>, StoreError>> + Send;
}
