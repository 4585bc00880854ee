//! The embedded in-memory [`DirectoryStore`]: presence in sharded `RwLock`ed maps keyed by
//! user, nodes in one `RwLock`ed map, relays (few) in one `Mutex`ed sorted vector with the
//! seeded relay-choice RNG.
//!
//! Lock order is always nodes -> presence shard, and relays on their own; a presence write
//! holds the nodes read lock while it checks the epoch and writes, so once a registration with
//! a newer epoch has swapped the node record, no write of the older epoch can land after the
//! purge. Expiry is both lazy (reads skip dead entries) and eager ([`MemoryStore::sweep`]).

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::clock::{Timestamp, duration_ms};
use crate::select::{self, RelayRecord};
use crate::store::{
    DirectoryStore, RELAY_RETENTION_TTLS, StatsKind, StatsRecord, StoreConfig, StoreError,
    StoreStats, SweepStats,
};
use peerlink_api::directory::{
    ChooseRelaysRequest, ChosenRelay, DeregisterNodeResponse, DeviceLocation, NodeInfo,
    NodePresence, PresenceRemove, PresenceStatus, PresenceUpdate, RegisterNodeRequest,
    RegisterNodeResponse, RegisterRelayRequest, RelayHeartbeatRequest, RelayInfo, RemoveOutcome,
    UpdateOutcome, UserLocation,
};

/// Presence shards (a power of two; enough that 2-16 cores rarely meet on one lock).
const PRESENCE_SHARDS: usize = 64;

#[derive(Debug, Clone)]
struct NodeRecord {
    internal_url: Arc<str>,
    epoch: u64,
    load: f64,
    last_heartbeat: Timestamp,
}

#[derive(Debug, Clone)]
struct DeviceRecord {
    device: Box<str>,
    node_id: Arc<str>,
    node_epoch: u64,
    status: PresenceStatus,
    last_seen: Timestamp,
}

type Nodes = HashMap<Arc<str>, NodeRecord>;
type Shard = HashMap<Box<str>, Vec<DeviceRecord>>;

struct Relays {
    /// Sorted by relay id.
    list: Vec<RelayRecord>,
    rng: ChaCha8Rng,
}

/// In-memory directory store (the embedded default).
pub struct MemoryStore {
    cfg: StoreConfig,
    presence_ttl_ms: u64,
    node_ttl_ms: u64,
    nodes: RwLock<Nodes>,
    shards: Box<[RwLock<Shard>]>,
    hasher: RandomState,
    entries: AtomicU64,
    relays: Mutex<Relays>,
    /// Console stats records: (kind, id) -> (written, JSON).
    stats: Mutex<StatsMap>,
}

type StatsMap = BTreeMap<(StatsKind, Arc<str>), (Timestamp, String)>;

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("cfg", &self.cfg)
            .field("entries", &self.entries.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

fn lock<T>(l: &Mutex<T>) -> MutexGuard<'_, T> {
    l.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Epoch check of a presence write against the node registry.
enum EpochCheck<'a> {
    Current(&'a Arc<str>),
    Stale(u64),
}

fn check_epoch<'a>(
    nodes: &'a Nodes,
    node_id: &str,
    epoch: u64,
) -> Result<EpochCheck<'a>, StoreError> {
    match nodes.get_key_value(node_id) {
        Some((id, n)) if n.epoch == epoch => Ok(EpochCheck::Current(id)),
        Some((_, n)) if epoch < n.epoch => Ok(EpochCheck::Stale(n.epoch)),
        _ => Err(StoreError::UnknownNode {
            node_id: node_id.to_owned(),
            epoch,
        }),
    }
}

impl MemoryStore {
    /// Empty store with these TTLs and seed.
    pub fn new(cfg: StoreConfig) -> Self {
        let rng = match cfg.seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            None => ChaCha8Rng::from_os_rng(),
        };
        Self {
            cfg,
            presence_ttl_ms: duration_ms(cfg.presence_ttl),
            node_ttl_ms: duration_ms(cfg.node_ttl),
            nodes: RwLock::new(HashMap::new()),
            shards: (0..PRESENCE_SHARDS)
                .map(|_| RwLock::new(HashMap::new()))
                .collect(),
            hasher: RandomState::new(),
            entries: AtomicU64::new(0),
            relays: Mutex::new(Relays {
                list: Vec::new(),
                rng,
            }),
            stats: Mutex::new(BTreeMap::new()),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &StoreConfig {
        &self.cfg
    }

    fn shard(&self, user: &str) -> &RwLock<Shard> {
        // PRESENCE_SHARDS is a power of two, so masking keeps the index in range.
        let h = self.hasher.hash_one(user) as usize;
        &self.shards[h & (PRESENCE_SHARDS - 1)]
    }

    fn node_alive(&self, n: &NodeRecord, now: Timestamp) -> bool {
        now.millis_since(n.last_heartbeat) < self.node_ttl_ms
    }

    /// Node records stay (for URL resolution and keeping their entries alive) until both TTLs
    /// have passed since the last heartbeat.
    fn node_retained(&self, n: &NodeRecord, now: Timestamp) -> bool {
        now.millis_since(n.last_heartbeat) < self.node_ttl_ms.max(self.presence_ttl_ms)
    }

    /// Whether a presence entry is live: its own write or its node's heartbeat (same epoch)
    /// within the presence TTL, and not from an older epoch than the node's current one.
    fn entry_live(&self, d: &DeviceRecord, nodes: &Nodes, now: Timestamp) -> bool {
        let mut fresh = d.last_seen;
        if let Some(n) = nodes.get(&d.node_id) {
            if d.node_epoch < n.epoch {
                return false;
            }
            if d.node_epoch == n.epoch && self.node_retained(n, now) {
                fresh = fresh.max(n.last_heartbeat);
            }
        }
        now.millis_since(fresh) < self.presence_ttl_ms
    }

    /// Remove every presence entry of `node_id` with an epoch below `below` (all of them when
    /// `below` is `u64::MAX`... plus that epoch itself when `inclusive`).
    fn purge_node(&self, node_id: &str, below: u64, inclusive: bool) -> u64 {
        let mut purged = 0u64;
        for shard in self.shards.iter() {
            let mut shard = write(shard);
            shard.retain(|_, devices| {
                devices.retain(|d| {
                    let doomed = &*d.node_id == node_id
                        && (d.node_epoch < below || (inclusive && d.node_epoch == below));
                    purged += u64::from(doomed);
                    !doomed
                });
                !devices.is_empty()
            });
        }
        self.entries.fetch_sub(purged, Ordering::Relaxed);
        purged
    }

    fn write_entry(
        &self,
        node_id: &Arc<str>,
        node_epoch: u64,
        user: &str,
        device: &str,
        status: PresenceStatus,
        now: Timestamp,
    ) {
        let mut shard = write(self.shard(user));
        let devices = match shard.get_mut(user) {
            Some(d) => d,
            None => shard.entry(Box::from(user)).or_default(),
        };
        if let Some(d) = devices.iter_mut().find(|d| &*d.device == device) {
            d.node_id = node_id.clone();
            d.node_epoch = node_epoch;
            d.status = status;
            d.last_seen = now;
        } else {
            devices.push(DeviceRecord {
                device: Box::from(device),
                node_id: node_id.clone(),
                node_epoch,
                status,
                last_seen: now,
            });
            self.entries.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn locate(&self, nodes: &Nodes, user: &str, now: Timestamp) -> UserLocation {
        let shard = read(self.shard(user));
        let mut devices: Vec<DeviceLocation> = match shard.get(user) {
            None => Vec::new(),
            Some(list) => list
                .iter()
                .filter(|d| self.entry_live(d, nodes, now))
                .map(|d| DeviceLocation {
                    device: d.device.to_string(),
                    node_id: d.node_id.to_string(),
                    node_epoch: d.node_epoch,
                    node_url: nodes
                        .get(&d.node_id)
                        .filter(|n| n.epoch == d.node_epoch)
                        .map(|n| n.internal_url.to_string()),
                    status: d.status,
                    last_seen_age_ms: now.millis_since(d.last_seen),
                })
                .collect(),
        };
        drop(shard);
        devices.sort_by(|a, b| a.device.cmp(&b.device));
        UserLocation {
            user: user.to_owned(),
            devices,
        }
    }

    // ---- synchronous core (the trait's futures are these, already complete) ----

    /// See [`DirectoryStore::register_node`].
    pub fn register_node_now(
        &self,
        req: RegisterNodeRequest,
        now: Timestamp,
    ) -> Result<RegisterNodeResponse, StoreError> {
        let previous_epoch;
        let purge_below;
        {
            let mut nodes = write(&self.nodes);
            let prev = nodes.get(req.node_id.as_str()).map(|n| n.epoch);
            if let Some(current) = prev
                && req.epoch < current
            {
                return Err(StoreError::StaleEpoch {
                    node_id: req.node_id,
                    epoch: req.epoch,
                    current_epoch: current,
                });
            }
            previous_epoch = prev;
            purge_below = req.epoch;
            let key: Arc<str> = match nodes.get_key_value(req.node_id.as_str()) {
                Some((k, _)) => k.clone(),
                None => Arc::from(req.node_id.as_str()),
            };
            nodes.insert(
                key,
                NodeRecord {
                    internal_url: Arc::from(req.internal_url.as_str()),
                    epoch: req.epoch,
                    load: req.load,
                    last_heartbeat: now,
                },
            );
        }
        // Entries of older epochs are already invisible (lazy rule); free them now. This
        // also covers entries left from an incarnation whose record had expired.
        let purged = self.purge_node(&req.node_id, purge_below, false);
        Ok(RegisterNodeResponse {
            heartbeat_interval_ms: duration_ms(self.cfg.heartbeat_interval()),
            node_ttl_ms: self.node_ttl_ms,
            presence_ttl_ms: self.presence_ttl_ms,
            purged_presence: purged,
            previous_epoch,
        })
    }

    /// See [`DirectoryStore::node_heartbeat`].
    pub fn node_heartbeat_now(
        &self,
        node_id: &str,
        epoch: u64,
        load: f64,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let mut nodes = write(&self.nodes);
        match nodes.get_mut(node_id) {
            Some(n) if n.epoch == epoch && self.node_retained(n, now) => {
                n.last_heartbeat = now;
                n.load = load;
                Ok(())
            }
            Some(n) if epoch < n.epoch => Err(StoreError::StaleEpoch {
                node_id: node_id.to_owned(),
                epoch,
                current_epoch: n.epoch,
            }),
            _ => Err(StoreError::UnknownNode {
                node_id: node_id.to_owned(),
                epoch,
            }),
        }
    }

    /// See [`DirectoryStore::deregister_node`].
    pub fn deregister_node_now(
        &self,
        node_id: &str,
        epoch: u64,
    ) -> Result<DeregisterNodeResponse, StoreError> {
        {
            let mut nodes = write(&self.nodes);
            match nodes.get(node_id) {
                Some(n) if n.epoch == epoch => {
                    nodes.remove(node_id);
                }
                Some(n) if epoch < n.epoch => {
                    return Err(StoreError::StaleEpoch {
                        node_id: node_id.to_owned(),
                        epoch,
                        current_epoch: n.epoch,
                    });
                }
                _ => {
                    return Ok(DeregisterNodeResponse {
                        removed: false,
                        purged_presence: self.purge_node(node_id, epoch, true),
                    });
                }
            }
        }
        Ok(DeregisterNodeResponse {
            removed: true,
            purged_presence: self.purge_node(node_id, epoch, true),
        })
    }

    /// See [`DirectoryStore::list_nodes`].
    pub fn list_nodes_now(&self, now: Timestamp) -> Vec<NodeInfo> {
        let nodes = read(&self.nodes);
        let mut out: Vec<NodeInfo> = nodes
            .iter()
            .filter(|(_, n)| self.node_alive(n, now))
            .map(|(id, n)| NodeInfo {
                node_id: id.to_string(),
                internal_url: n.internal_url.to_string(),
                epoch: n.epoch,
                load: n.load,
                last_heartbeat_age_ms: now.millis_since(n.last_heartbeat),
            })
            .collect();
        out.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        out
    }

    /// See [`DirectoryStore::update_presence`].
    pub fn update_presence_now(
        &self,
        u: &PresenceUpdate,
        now: Timestamp,
    ) -> Result<UpdateOutcome, StoreError> {
        let nodes = read(&self.nodes);
        match check_epoch(&nodes, &u.node_id, u.node_epoch)? {
            EpochCheck::Stale(current_epoch) => Ok(UpdateOutcome::Stale { current_epoch }),
            EpochCheck::Current(id) => {
                self.write_entry(id, u.node_epoch, &u.user, &u.device, u.status, now);
                Ok(UpdateOutcome::Applied)
            }
        }
    }

    /// See [`DirectoryStore::update_presence_batch`].
    pub fn update_presence_batch_now(
        &self,
        node_id: &str,
        node_epoch: u64,
        entries: &[NodePresence],
        now: Timestamp,
    ) -> Result<(UpdateOutcome, u64), StoreError> {
        let nodes = read(&self.nodes);
        match check_epoch(&nodes, node_id, node_epoch)? {
            EpochCheck::Stale(current_epoch) => Ok((UpdateOutcome::Stale { current_epoch }, 0)),
            EpochCheck::Current(id) => {
                for e in entries {
                    self.write_entry(id, node_epoch, &e.user, &e.device, e.status, now);
                }
                Ok((UpdateOutcome::Applied, entries.len() as u64))
            }
        }
    }

    /// See [`DirectoryStore::remove_presence`].
    pub fn remove_presence_now(&self, r: &PresenceRemove) -> Result<RemoveOutcome, StoreError> {
        let nodes = read(&self.nodes);
        if let Some(n) = nodes.get(r.node_id.as_str())
            && r.node_epoch < n.epoch
        {
            return Ok(RemoveOutcome::Stale {
                current_epoch: n.epoch,
            });
        }
        let mut shard = write(self.shard(&r.user));
        let Some(devices) = shard.get_mut(r.user.as_str()) else {
            return Ok(RemoveOutcome::NotFound);
        };
        let before = devices.len();
        devices.retain(|d| {
            !(*d.device == *r.device && *d.node_id == *r.node_id && d.node_epoch == r.node_epoch)
        });
        let removed = before - devices.len();
        if devices.is_empty() {
            shard.remove(r.user.as_str());
        }
        self.entries.fetch_sub(removed as u64, Ordering::Relaxed);
        Ok(if removed > 0 {
            RemoveOutcome::Removed
        } else {
            RemoveOutcome::NotFound
        })
    }

    /// Where is `user` (the single-user form of [`DirectoryStore::lookup_users`]).
    pub fn lookup_user_now(&self, user: &str, now: Timestamp) -> UserLocation {
        let nodes = read(&self.nodes);
        self.locate(&nodes, user, now)
    }

    /// See [`DirectoryStore::lookup_users`].
    pub fn lookup_users_now(&self, users: &[String], now: Timestamp) -> Vec<UserLocation> {
        let nodes = read(&self.nodes);
        users.iter().map(|u| self.locate(&nodes, u, now)).collect()
    }

    /// See [`DirectoryStore::put_stats`].
    pub fn put_stats_now(&self, kind: StatsKind, id: &str, json: String, now: Timestamp) {
        lock(&self.stats).insert((kind, Arc::from(id)), (now, json));
    }

    /// See [`DirectoryStore::list_stats`].
    pub fn list_stats_now(
        &self,
        kind: StatsKind,
        max_age: Duration,
        now: Timestamp,
    ) -> Vec<StatsRecord> {
        let max_age = crate::clock::duration_ms(max_age);
        let mut stats = lock(&self.stats);
        stats.retain(|(k, _), (at, _)| *k != kind || now.millis_since(*at) < max_age);
        stats
            .range((kind, Arc::from(""))..)
            .take_while(|((k, _), _)| *k == kind)
            .map(|((_, id), (at, json))| StatsRecord {
                id: id.to_string(),
                json: json.clone(),
                age_ms: now.millis_since(*at),
            })
            .collect()
    }

    /// See [`DirectoryStore::register_relay`].
    pub fn register_relay_now(&self, req: RegisterRelayRequest, now: Timestamp) {
        let rec = RelayRecord {
            relay_id: Arc::from(req.relay_id.as_str()),
            turn_addr: req.turn_addr,
            turn_tcp_addr: req.turn_tcp_addr,
            turn_tls_addr: req.turn_tls_addr,
            metrics_addr: req.metrics_addr,
            region: Arc::from(req.region.as_str()),
            load: req.load,
            allocations: req.allocations,
            capacity: req.capacity,
            draining: req.draining,
            handed_out: 0,
            last_heartbeat: now,
        };
        let mut relays = lock(&self.relays);
        match relays
            .list
            .binary_search_by(|r| (*r.relay_id).cmp(req.relay_id.as_str()))
        {
            Ok(i) => relays.list[i] = rec,
            Err(i) => relays.list.insert(i, rec),
        }
    }

    /// See [`DirectoryStore::relay_heartbeat`].
    pub fn relay_heartbeat_now(
        &self,
        req: &RelayHeartbeatRequest,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let mut relays = lock(&self.relays);
        let retention = self.node_ttl_ms.saturating_mul(RELAY_RETENTION_TTLS);
        let found = relays
            .list
            .binary_search_by(|r| (*r.relay_id).cmp(req.relay_id.as_str()))
            .ok()
            .filter(|&i| now.millis_since(relays.list[i].last_heartbeat) < retention);
        let Some(i) = found else {
            return Err(StoreError::UnknownRelay {
                relay_id: req.relay_id.clone(),
            });
        };
        let r = &mut relays.list[i];
        r.load = req.load;
        r.allocations = req.allocations;
        r.draining = req.draining;
        r.handed_out = 0;
        r.last_heartbeat = now;
        Ok(())
    }

    /// See [`DirectoryStore::deregister_relay`].
    pub fn deregister_relay_now(&self, relay_id: &str) -> bool {
        let mut relays = lock(&self.relays);
        match relays
            .list
            .binary_search_by(|r| (*r.relay_id).cmp(relay_id))
        {
            Ok(i) => {
                relays.list.remove(i);
                true
            }
            Err(_) => false,
        }
    }

    /// See [`DirectoryStore::list_relays`].
    pub fn list_relays_now(&self, now: Timestamp) -> Vec<RelayInfo> {
        let relays = lock(&self.relays);
        relays
            .list
            .iter()
            .map(|r| r.info(now, self.node_ttl_ms))
            .collect()
    }

    /// See [`DirectoryStore::choose_relays`].
    pub fn choose_relays_now(&self, req: &ChooseRelaysRequest, now: Timestamp) -> Vec<ChosenRelay> {
        let mut guard = lock(&self.relays);
        let Relays { list, rng } = &mut *guard;
        select::choose(list, req, now, self.node_ttl_ms, rng)
            .into_iter()
            .map(|i| select::chosen_view(&list[i]))
            .collect()
    }

    /// See [`DirectoryStore::sweep`].
    pub fn sweep_now(&self, now: Timestamp) -> SweepStats {
        let mut stats = SweepStats::default();
        {
            let mut nodes = write(&self.nodes);
            let before = nodes.len();
            nodes.retain(|_, n| self.node_retained(n, now));
            stats.nodes = (before - nodes.len()) as u64;
        }
        {
            let retention = self.node_ttl_ms.saturating_mul(RELAY_RETENTION_TTLS);
            let mut relays = lock(&self.relays);
            let before = relays.list.len();
            relays
                .list
                .retain(|r| now.millis_since(r.last_heartbeat) < retention);
            stats.relays = (before - relays.list.len()) as u64;
        }
        let nodes = read(&self.nodes);
        for shard in self.shards.iter() {
            let mut shard = write(shard);
            shard.retain(|_, devices| {
                devices.retain(|d| {
                    let live = self.entry_live(d, &nodes, now);
                    stats.presence += u64::from(!live);
                    live
                });
                !devices.is_empty()
            });
        }
        drop(nodes);
        self.entries.fetch_sub(stats.presence, Ordering::Relaxed);
        stats
    }

    /// See [`DirectoryStore::stats`].
    pub fn stats_now(&self, now: Timestamp) -> StoreStats {
        let nodes = read(&self.nodes)
            .values()
            .filter(|n| self.node_alive(n, now))
            .count() as u64;
        let relays = lock(&self.relays);
        StoreStats {
            nodes,
            relays_healthy: relays
                .list
                .iter()
                .filter(|r| r.healthy(now, self.node_ttl_ms))
                .count() as u64,
            relays_known: relays.list.len() as u64,
            presence_entries: self.entries.load(Ordering::Relaxed),
        }
    }
}

impl DirectoryStore for MemoryStore {
    async fn register_node(
        &self,
        req: RegisterNodeRequest,
        now: Timestamp,
    ) -> Result<RegisterNodeResponse, StoreError> {
        self.register_node_now(req, now)
    }

    async fn node_heartbeat(
        &self,
        node_id: &str,
        epoch: u64,
        load: f64,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        self.node_heartbeat_now(node_id, epoch, load, now)
    }

    async fn deregister_node(
        &self,
        node_id: &str,
        epoch: u64,
        _now: Timestamp,
    ) -> Result<DeregisterNodeResponse, StoreError> {
        self.deregister_node_now(node_id, epoch)
    }

    async fn list_nodes(&self, now: Timestamp) -> Result<Vec<NodeInfo>, StoreError> {
        Ok(self.list_nodes_now(now))
    }

    async fn update_presence(
        &self,
        update: PresenceUpdate,
        now: Timestamp,
    ) -> Result<UpdateOutcome, StoreError> {
        self.update_presence_now(&update, now)
    }

    async fn update_presence_batch(
        &self,
        node_id: &str,
        node_epoch: u64,
        entries: Vec<NodePresence>,
        now: Timestamp,
    ) -> Result<(UpdateOutcome, u64), StoreError> {
        self.update_presence_batch_now(node_id, node_epoch, &entries, now)
    }

    async fn remove_presence(
        &self,
        req: PresenceRemove,
        _now: Timestamp,
    ) -> Result<RemoveOutcome, StoreError> {
        self.remove_presence_now(&req)
    }

    async fn lookup_users(
        &self,
        users: &[String],
        now: Timestamp,
    ) -> Result<Vec<UserLocation>, StoreError> {
        Ok(self.lookup_users_now(users, now))
    }

    async fn register_relay(
        &self,
        req: RegisterRelayRequest,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        self.register_relay_now(req, now);
        Ok(())
    }

    async fn relay_heartbeat(
        &self,
        req: RelayHeartbeatRequest,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        self.relay_heartbeat_now(&req, now)
    }

    async fn deregister_relay(&self, relay_id: &str) -> Result<bool, StoreError> {
        Ok(self.deregister_relay_now(relay_id))
    }

    async fn list_relays(&self, now: Timestamp) -> Result<Vec<RelayInfo>, StoreError> {
        Ok(self.list_relays_now(now))
    }

    async fn choose_relays(
        &self,
        req: &ChooseRelaysRequest,
        now: Timestamp,
    ) -> Result<Vec<ChosenRelay>, StoreError> {
        Ok(self.choose_relays_now(req, now))
    }

    async fn sweep(&self, now: Timestamp) -> Result<SweepStats, StoreError> {
        Ok(self.sweep_now(now))
    }

    async fn put_stats(
        &self,
        kind: StatsKind,
        id: &str,
        json: String,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        self.put_stats_now(kind, id, json, now);
        Ok(())
    }

    async fn list_stats(
        &self,
        kind: StatsKind,
        max_age: Duration,
        now: Timestamp,
    ) -> Result<Vec<StatsRecord>, StoreError> {
        Ok(self.list_stats_now(kind, max_age, now))
    }

    async fn stats(&self, now: Timestamp) -> Result<StoreStats, StoreError> {
        Ok(self.stats_now(now))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const S: u64 = 1_000;

    fn store() -> MemoryStore {
        MemoryStore::new(StoreConfig {
            presence_ttl: Duration::from_secs(30),
            node_ttl: Duration::from_secs(10),
            seed: Some(7),
        })
    }

    fn t(secs: f64) -> Timestamp {
        Timestamp((secs * S as f64) as u64)
    }

    fn register(s: &MemoryStore, node: &str, epoch: u64, now: Timestamp) -> RegisterNodeResponse {
        s.register_node_now(
            RegisterNodeRequest {
                node_id: node.into(),
                internal_url: format!("http://{node}.internal:8443"),
                epoch,
                load: 0.0,
            },
            now,
        )
        .unwrap()
    }

    fn presence(user: &str, device: &str, node: &str, epoch: u64) -> PresenceUpdate {
        PresenceUpdate {
            user: user.into(),
            device: device.into(),
            node_id: node.into(),
            node_epoch: epoch,
            status: PresenceStatus::Online,
        }
    }

    fn devices(s: &MemoryStore, user: &str, now: Timestamp) -> Vec<(String, String)> {
        s.lookup_user_now(user, now)
            .devices
            .into_iter()
            .map(|d| (d.device, d.node_id))
            .collect()
    }

    #[test]
    fn presence_expires_after_ttl_without_refresh() {
        let s = store();
        register(&s, "n1", 1, t(0.0));
        assert_eq!(
            s.update_presence_now(&presence("alice", "phone", "n1", 1), t(0.0)),
            Ok(UpdateOutcome::Applied)
        );
        let loc = s.lookup_user_now("alice", t(29.999));
        assert_eq!(loc.devices.len(), 1);
        let d = &loc.devices[0];
        assert_eq!(d.node_url.as_deref(), Some("http://n1.internal:8443"));
        assert_eq!(d.last_seen_age_ms, 29_999);
        // Neither the entry nor its node was refreshed for a full TTL: gone (lazily).
        assert!(devices(&s, "alice", t(30.0)).is_empty());
        assert_eq!(
            s.stats_now(t(30.0)).presence_entries,
            1,
            "still stored until swept"
        );
        let swept = s.sweep_now(t(30.0));
        assert_eq!(swept.presence, 1);
        assert_eq!(
            swept.nodes, 1,
            "node record retained until both TTLs passed"
        );
        assert_eq!(s.stats_now(t(30.0)).presence_entries, 0);
    }

    #[test]
    fn node_heartbeats_keep_entries_alive_and_death_expires_them_within_ttl() {
        let s = store();
        register(&s, "n1", 1, t(0.0));
        s.update_presence_now(&presence("alice", "phone", "n1", 1), t(0.0))
            .unwrap();
        s.update_presence_now(&presence("bob", "pc", "n1", 1), t(1.0))
            .unwrap();
        // The node heartbeats every ~3.3 s up to t=100; entries are never refreshed one by one.
        let mut now = 0.0;
        while now < 100.0 {
            now += 3.3;
            s.node_heartbeat_now("n1", 1, 0.1, t(now)).unwrap();
            s.sweep_now(t(now));
        }
        assert_eq!(devices(&s, "alice", t(now)).len(), 1);
        assert_eq!(s.list_nodes_now(t(now)).len(), 1);
        // The node dies at `now`: listed dead after the node TTL, users offline within the
        // presence TTL.
        assert!(s.list_nodes_now(t(now + 10.0)).is_empty());
        assert_eq!(devices(&s, "bob", t(now + 29.9)).len(), 1);
        assert!(devices(&s, "alice", t(now + 30.0)).is_empty());
        assert!(devices(&s, "bob", t(now + 30.0)).is_empty());
        let swept = s.sweep_now(t(now + 30.0));
        assert_eq!((swept.presence, swept.nodes), (2, 1));
        assert_eq!(
            s.node_heartbeat_now("n1", 1, 0.0, t(now + 31.0)),
            Err(StoreError::UnknownNode {
                node_id: "n1".into(),
                epoch: 1
            }),
            "a forgotten node is told to register again"
        );
    }

    #[test]
    fn new_epoch_purges_old_entries_at_once() {
        let s = store();
        register(&s, "n1", 1, t(0.0));
        register(&s, "n2", 1, t(0.0));
        for u in ["a", "b", "c"] {
            s.update_presence_now(&presence(u, "d", "n1", 1), t(1.0))
                .unwrap();
        }
        s.update_presence_now(&presence("a", "laptop", "n2", 1), t(1.0))
            .unwrap();
        assert_eq!(s.stats_now(t(1.0)).presence_entries, 4);
        let r = register(&s, "n1", 2, t(2.0));
        assert_eq!(r.purged_presence, 3);
        assert_eq!(r.previous_epoch, Some(1));
        assert_eq!(r.heartbeat_interval_ms, 3_333);
        assert_eq!(
            devices(&s, "a", t(2.0)),
            [("laptop".to_owned(), "n2".to_owned())]
        );
        assert!(devices(&s, "b", t(2.0)).is_empty());
        assert_eq!(s.stats_now(t(2.0)).presence_entries, 1);
        // Same epoch again (e.g. after the directory forgot it) purges nothing.
        s.update_presence_now(&presence("b", "d", "n1", 2), t(3.0))
            .unwrap();
        assert_eq!(register(&s, "n1", 2, t(4.0)).purged_presence, 0);
        assert_eq!(devices(&s, "b", t(4.0)).len(), 1);
    }

    #[test]
    fn stale_epoch_updates_are_ignored() {
        let s = store();
        register(&s, "n1", 5, t(0.0));
        s.update_presence_now(&presence("a", "d", "n1", 5), t(0.0))
            .unwrap();
        assert_eq!(
            s.update_presence_now(&presence("zed", "d", "n1", 4), t(1.0)),
            Ok(UpdateOutcome::Stale { current_epoch: 5 })
        );
        assert!(devices(&s, "zed", t(1.0)).is_empty());
        let batch = [NodePresence {
            user: "y".into(),
            device: "d".into(),
            status: PresenceStatus::Busy,
        }];
        assert_eq!(
            s.update_presence_batch_now("n1", 3, &batch, t(1.0)),
            Ok((UpdateOutcome::Stale { current_epoch: 5 }, 0))
        );
        assert!(devices(&s, "y", t(1.0)).is_empty());
        let rm = PresenceRemove {
            user: "a".into(),
            device: "d".into(),
            node_id: "n1".into(),
            node_epoch: 4,
        };
        assert_eq!(
            s.remove_presence_now(&rm),
            Ok(RemoveOutcome::Stale { current_epoch: 5 })
        );
        assert_eq!(
            devices(&s, "a", t(1.0)).len(),
            1,
            "stale removal did not remove"
        );
        assert!(matches!(
            s.register_node_now(
                RegisterNodeRequest {
                    node_id: "n1".into(),
                    internal_url: "http://x".into(),
                    epoch: 4,
                    load: 0.0
                },
                t(1.0)
            ),
            Err(StoreError::StaleEpoch {
                current_epoch: 5,
                ..
            })
        ));
        assert!(matches!(
            s.node_heartbeat_now("n1", 4, 0.0, t(1.0)),
            Err(StoreError::StaleEpoch {
                current_epoch: 5,
                ..
            })
        ));
        assert!(matches!(
            s.deregister_node_now("n1", 4),
            Err(StoreError::StaleEpoch { .. })
        ));
        assert_eq!(
            s.list_nodes_now(t(1.0))[0].epoch,
            5,
            "the zombie changed nothing"
        );
    }

    #[test]
    fn writes_for_unknown_nodes_or_future_epochs_are_refused() {
        let s = store();
        assert!(matches!(
            s.update_presence_now(&presence("a", "d", "ghost", 1), t(0.0)),
            Err(StoreError::UnknownNode { .. })
        ));
        register(&s, "n1", 1, t(0.0));
        assert!(matches!(
            s.update_presence_now(&presence("a", "d", "n1", 2), t(0.0)),
            Err(StoreError::UnknownNode { .. })
        ));
        assert!(matches!(
            s.node_heartbeat_now("n1", 2, 0.0, t(0.0)),
            Err(StoreError::UnknownNode { .. })
        ));
        assert_eq!(s.stats_now(t(0.0)).presence_entries, 0);
    }

    #[test]
    fn device_moving_to_another_node_is_not_removed_by_the_old_one() {
        let s = store();
        register(&s, "n1", 1, t(0.0));
        register(&s, "n2", 1, t(0.0));
        s.update_presence_now(&presence("a", "phone", "n1", 1), t(0.0))
            .unwrap();
        s.update_presence_now(&presence("a", "phone", "n2", 1), t(1.0))
            .unwrap();
        assert_eq!(s.stats_now(t(1.0)).presence_entries, 1);
        let rm = |node: &str| PresenceRemove {
            user: "a".into(),
            device: "phone".into(),
            node_id: node.into(),
            node_epoch: 1,
        };
        assert_eq!(
            s.remove_presence_now(&rm("n1")),
            Ok(RemoveOutcome::NotFound)
        );
        assert_eq!(
            devices(&s, "a", t(1.0)),
            [("phone".to_owned(), "n2".to_owned())]
        );
        assert_eq!(s.remove_presence_now(&rm("n2")), Ok(RemoveOutcome::Removed));
        assert!(devices(&s, "a", t(1.0)).is_empty());
        assert_eq!(s.stats_now(t(1.0)).presence_entries, 0);
    }

    #[test]
    fn deregister_removes_node_and_presence() {
        let s = store();
        register(&s, "n1", 1, t(0.0));
        s.update_presence_now(&presence("a", "d", "n1", 1), t(0.0))
            .unwrap();
        s.update_presence_now(&presence("b", "d", "n1", 1), t(0.0))
            .unwrap();
        assert_eq!(
            s.deregister_node_now("n1", 1),
            Ok(DeregisterNodeResponse {
                removed: true,
                purged_presence: 2
            })
        );
        assert!(s.list_nodes_now(t(0.0)).is_empty());
        assert!(devices(&s, "a", t(0.0)).is_empty());
    }

    #[test]
    fn batch_lookup_keeps_order_and_reports_offline_users() {
        let s = store();
        register(&s, "n1", 1, t(0.0));
        s.update_presence_now(&presence("a", "d2", "n1", 1), t(0.0))
            .unwrap();
        s.update_presence_now(&presence("a", "d1", "n1", 1), t(0.0))
            .unwrap();
        let users: Vec<String> = ["nobody", "a"].map(String::from).to_vec();
        let out = s.lookup_users_now(&users, t(1.0));
        assert_eq!(out[0].user, "nobody");
        assert!(out[0].devices.is_empty());
        let devs: Vec<_> = out[1].devices.iter().map(|d| d.device.as_str()).collect();
        assert_eq!(devs, ["d1", "d2"]);
    }

    fn relay_req(id: &str) -> RegisterRelayRequest {
        RegisterRelayRequest {
            relay_id: id.into(),
            turn_addr: "127.0.0.1:3478".parse().unwrap(),
            turn_tcp_addr: None,
            turn_tls_addr: None,
            metrics_addr: "127.0.0.1:9641".parse().unwrap(),
            region: "eu".into(),
            capacity: 1_000,
            load: 0.0,
            allocations: 0,
            draining: false,
        }
    }

    #[test]
    fn relay_heartbeat_resets_handed_out_and_liveness_follows_ttl() {
        let s = store();
        s.register_relay_now(relay_req("r1"), t(0.0));
        s.register_relay_now(relay_req("r2"), t(0.0));
        let req = ChooseRelaysRequest {
            caller_region: "eu".into(),
            callee_region: None,
            count: 1,
        };
        for _ in 0..10 {
            assert_eq!(s.choose_relays_now(&req, t(1.0)).len(), 1);
        }
        let handed = |s: &MemoryStore| -> Vec<u64> {
            s.list_relays_now(t(1.0))
                .iter()
                .map(|r| r.handed_out)
                .collect()
        };
        let h = handed(&s);
        assert_eq!(h.iter().sum::<u64>(), 10);
        assert!(h.iter().all(|&x| x > 0), "both used: {h:?}");
        let hb = RelayHeartbeatRequest {
            relay_id: "r1".into(),
            load: 0.2,
            allocations: h[0],
            draining: false,
            stats: None,
        };
        s.relay_heartbeat_now(&hb, t(1.0)).unwrap();
        let after = handed(&s);
        assert_eq!(after, [0, h[1]], "heartbeat reset only r1's counter");
        // r2 stops heartbeating: unhealthy after the TTL, so only r1 is chosen.
        let hb = RelayHeartbeatRequest {
            relay_id: "r1".into(),
            load: 0.2,
            allocations: 0,
            draining: false,
            stats: None,
        };
        s.relay_heartbeat_now(&hb, t(9.0)).unwrap();
        for _ in 0..10 {
            let c = s.choose_relays_now(&req, t(10.0));
            assert_eq!(c[0].relay_id, "r1");
        }
        assert!(!s.list_relays_now(t(10.0))[1].healthy);
        // Draining: nothing left.
        let hb = RelayHeartbeatRequest {
            relay_id: "r1".into(),
            load: 0.2,
            allocations: 0,
            draining: true,
            stats: None,
        };
        s.relay_heartbeat_now(&hb, t(10.0)).unwrap();
        assert!(s.choose_relays_now(&req, t(10.0)).is_empty());
        // Swept after three TTLs; then its heartbeat is refused as unknown.
        assert_eq!(s.sweep_now(t(30.0)).relays, 1);
        assert!(matches!(
            s.relay_heartbeat_now(
                &RelayHeartbeatRequest {
                    relay_id: "r2".into(),
                    load: 0.0,
                    allocations: 0,
                    draining: false,
                    stats: None,
                },
                t(30.0)
            ),
            Err(StoreError::UnknownRelay { .. })
        ));
        assert!(s.deregister_relay_now("r1"));
        assert!(!s.deregister_relay_now("r1"));
    }
}
