//! The Redis [`DirectoryStore`]: presence, the node registry and the relay registry in one
//! Redis, so several directory replicas pointed at it answer as one directory. No replica
//! keeps a cache that changes answers: every read goes to Redis.
//!
//! Semantics are [`crate::memory::MemoryStore`]'s, decided by the caller's `now` (the same
//! store suite runs on both). Multi-key updates are Lua scripts (`redis_lua.rs`), so they
//! are atomic. Relay records are JSON values updated by compare-and-set: a heartbeat reads the
//! record and writes it back only if it is unchanged, else reads again. A relay choice reads
//! the records, decides in Rust (relay choice is [`crate::select`]) and counts what it handed
//! out with `HINCRBY` on a hash of its own, so concurrent choices through several replicas
//! never conflict (they may decide on the same figures; each choice is still counted).
//!
//! Key layout (`P` is the key prefix, default [`DEFAULT_PREFIX`]):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P:nodes` | set | ids of registered nodes |
//! | `P:node:<node>` | hash | `url`, `epoch`, `load`, `hb` (last heartbeat, ms) |
//! | `P:user:<user>` | hash | device -> `<epoch>\|<status>\|<last_seen_ms>\|<node>` |
//! | `P:pidx:<node>:<epoch>` | sorted set | that node epoch's entries (`<len(user)>:<user><device>`) scored by last write |
//! | `P:pepochs:<node>` | set | epochs of `<node>` that have an index |
//! | `P:pnodes` | set | nodes that have an index |
//! | `P:entries` | string | number of stored presence entries |
//! | `P:relays` | hash | relay id -> JSON record (figures, `last_heartbeat`) |
//! | `P:handed` | hash | relay id -> choices handed out since its last heartbeat |
//! | `P:stats:<kind>` | hash | relay, node or replica id -> `<written_ms> <JSON>`: the console's stats records (stale fields deleted when listed) |
//!
//! Time: timestamps in Redis must mean the same thing to every replica, so the binary reads
//! time from a [`RedisClock`]: Redis's own clock (`TIME`), sampled at start and every
//! [`CLOCK_RESYNC`], advanced in between by the local monotonic clock and never moving
//! backwards. The store itself never reads a clock; it uses the `now` it is given. Nothing
//! relies on Redis key expiry: records end by `now` (reads skip dead ones, the sweeper of any
//! replica deletes them), as in memory.
//!
//! After Redis loses its data (a restart without persistence, `FLUSHALL`), heartbeats are
//! answered `unknown_node` / `unknown_relay` and the registration loops register again and
//! republish their presence, as after a directory restart.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use peerlink_cli::redis_url::{RedisUrl, redact};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, RedisError, ServerErrorKind};
use serde::{Deserialize, Serialize};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{Instrument, debug, info_span};

use crate::clock::{Clock, Timestamp, duration_ms};
use crate::redis_lua::Scripts;
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

/// Key prefix when the URL names none.
pub const DEFAULT_PREFIX: &str = "peerlink:directory";
pub use peerlink_cli::redis_url::MAX_PREFIX_LEN;
/// Default bound of one connection attempt to Redis.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default bound of one command's answer: a request never waits longer on a dead Redis.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a [`RedisClock`] samples Redis's clock again (bounds the drift between replicas'
/// monotonic clocks).
pub const CLOCK_RESYNC: Duration = Duration::from_secs(30);
/// Compare-and-set attempts of one relay update before giving up (each attempt lost means
/// another writer changed the same relay in between).
const CAS_ATTEMPTS: usize = 32;
/// Longest random pause after a lost compare-and-set, microseconds.
const CAS_PAUSE_MAX_US: u64 = 2_000;

/// Where a Redis store lives: the connection URL and the key prefix
/// ([`peerlink_cli::redis_url`]).
pub type RedisLocation = RedisUrl;

/// Parse the store URL `redis://HOST:PORT[/DB][?prefix=P]`; the rest must be a URL the Redis
/// client accepts.
pub fn parse_location(text: &str) -> Result<RedisLocation, String> {
    let location = RedisUrl::parse(text, "store", DEFAULT_PREFIX)?;
    redis::Client::open(location.url.as_str())
        .map_err(|e| format!("store {:?}: {e}", redact(text)))?;
    Ok(location)
}

/// Connection bounds of a Redis store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedisOptions {
    /// Bound of one connection attempt.
    pub connect_timeout: Duration,
    /// Bound of one command's answer.
    pub response_timeout: Duration,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
        }
    }
}

/// Redis-backed directory store.
pub struct RedisStore {
    conn: ConnectionManager,
    location: RedisLocation,
    scripts: Arc<Scripts>,
    cfg: StoreConfig,
    presence_ttl_ms: u64,
    node_ttl_ms: u64,
    rng: Mutex<ChaCha8Rng>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("location", &self.location)
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// A Redis error as a store error: unreachable, timed out, loading or read-only is
/// [`StoreError::Unavailable`] (503, retried); a refused command is [`StoreError::Backend`].
fn store_err(e: RedisError) -> StoreError {
    let refused = matches!(
        e.kind(),
        ErrorKind::Server(
            ServerErrorKind::ResponseError
                | ServerErrorKind::ExecAbort
                | ServerErrorKind::NoScript
                | ServerErrorKind::CrossSlot
                | ServerErrorKind::NoPerm
        ) | ErrorKind::Parse
            | ErrorKind::UnexpectedReturnType
            | ErrorKind::InvalidClientConfig
    );
    if refused {
        StoreError::Backend(format!("redis: {e}"))
    } else {
        StoreError::Unavailable(format!("redis: {e}"))
    }
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Backend(format!("redis holds an unreadable {what}"))
}

fn parse_u64(s: &str, what: &str) -> Result<u64, StoreError> {
    s.parse().map_err(|_| corrupt(what))
}

/// A relay record as stored (JSON; the id is the hash field).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct StoredRelay {
    turn_addr: SocketAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    turn_tcp_addr: Option<SocketAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    turn_tls_addr: Option<SocketAddr>,
    metrics_addr: SocketAddr,
    region: String,
    load: f64,
    allocations: u64,
    capacity: u64,
    draining: bool,
    /// Written as 0: the count lives in `P:handed` (a record written before that counter
    /// existed may carry one, which adds to it).
    #[serde(default)]
    handed_out: u64,
    last_heartbeat: u64,
}

impl StoredRelay {
    fn record(&self, id: &str) -> RelayRecord {
        RelayRecord {
            relay_id: Arc::from(id),
            turn_addr: self.turn_addr,
            turn_tcp_addr: self.turn_tcp_addr,
            turn_tls_addr: self.turn_tls_addr,
            metrics_addr: self.metrics_addr,
            region: Arc::from(self.region.as_str()),
            load: self.load,
            allocations: self.allocations,
            capacity: self.capacity,
            draining: self.draining,
            handed_out: self.handed_out,
            last_heartbeat: Timestamp(self.last_heartbeat),
        }
    }

    fn json(&self) -> Result<String, StoreError> {
        serde_json::to_string(self).map_err(|e| StoreError::Backend(e.to_string()))
    }
}

/// Relay records as read (sorted by id), each with the exact stored text for the
/// compare-and-set.
struct RelaySnapshot {
    records: Vec<RelayRecord>,
    raw: Vec<String>,
}

/// Relay records from flat `HGETALL` answers of the records and of the handed-out counters.
fn relays_from_flat(flat: Vec<String>, handed: &[String]) -> Result<RelaySnapshot, StoreError> {
    let counters: std::collections::HashMap<&str, u64> = handed
        .chunks_exact(2)
        .map(|c| Ok((c[0].as_str(), parse_u64(&c[1], "handed-out counter")?)))
        .collect::<Result<_, StoreError>>()?;
    let mut pairs: Vec<(String, String)> = Vec::with_capacity(flat.len() / 2);
    let mut it = flat.into_iter();
    while let (Some(id), Some(raw)) = (it.next(), it.next()) {
        pairs.push((id, raw));
    }
    pairs.sort_by(|a, b| a.0.cmp(&b.0));
    let mut records = Vec::with_capacity(pairs.len());
    let mut raws = Vec::with_capacity(pairs.len());
    for (id, raw) in pairs {
        let s: StoredRelay = serde_json::from_str(&raw).map_err(|_| corrupt("relay record"))?;
        let mut r = s.record(&id);
        r.handed_out = r
            .handed_out
            .saturating_add(counters.get(id.as_str()).copied().unwrap_or(0));
        records.push(r);
        raws.push(raw);
    }
    Ok(RelaySnapshot { records, raw: raws })
}

/// A node record as read.
struct NodeRow {
    id: String,
    url: String,
    epoch: u64,
    load: f64,
    hb: Timestamp,
}

fn nodes_from_flat(flat: &[String]) -> Result<Vec<NodeRow>, StoreError> {
    flat.chunks_exact(5)
        .map(|c| {
            Ok(NodeRow {
                id: c[0].clone(),
                url: c[1].clone(),
                epoch: parse_u64(&c[2], "node epoch")?,
                load: c[3].parse().map_err(|_| corrupt("node load"))?,
                hb: Timestamp(parse_u64(&c[4], "node heartbeat")?),
            })
        })
        .collect()
}

/// A presence entry value: `<epoch>|<status>|<last_seen_ms>|<node>`.
struct Entry<'a> {
    epoch: u64,
    status: PresenceStatus,
    last_seen: Timestamp,
    node: &'a str,
}

fn status_text(s: PresenceStatus) -> &'static str {
    match s {
        PresenceStatus::Online => "online",
        PresenceStatus::Away => "away",
        PresenceStatus::Busy => "busy",
    }
}

fn parse_entry(v: &str) -> Option<Entry<'_>> {
    let mut parts = v.splitn(4, '|');
    let epoch = parts.next()?.parse().ok()?;
    let status = match parts.next()? {
        "online" => PresenceStatus::Online,
        "away" => PresenceStatus::Away,
        "busy" => PresenceStatus::Busy,
        _ => return None,
    };
    let last_seen = Timestamp(parts.next()?.parse().ok()?);
    Some(Entry {
        epoch,
        status,
        last_seen,
        node: parts.next()?,
    })
}

impl RedisStore {
    /// Connect (bounded by `opts.connect_timeout`) and check that Redis answers; fails when it
    /// does not. Later outages are survived: the connection is re-established in the
    /// background and requests fail fast with [`StoreError::Unavailable`] meanwhile.
    pub async fn connect(
        location: RedisLocation,
        cfg: StoreConfig,
        opts: RedisOptions,
    ) -> Result<Self, StoreError> {
        let client = redis::Client::open(location.url.as_str()).map_err(store_err)?;
        let mc = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(opts.connect_timeout))
            .set_response_timeout(Some(opts.response_timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let attempt = tokio::time::timeout(
            opts.connect_timeout + opts.response_timeout,
            ConnectionManager::new_with_config(client, mc),
        )
        .await
        .map_err(|_| {
            StoreError::Unavailable(format!(
                "redis {} did not answer within {:?}",
                location.redacted(),
                opts.connect_timeout
            ))
        })?;
        let mut conn = attempt.map_err(store_err)?;
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(store_err)?;
        let rng = match cfg.seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            None => ChaCha8Rng::from_os_rng(),
        };
        Ok(Self {
            conn,
            location,
            scripts: Arc::new(Scripts::new()),
            cfg,
            presence_ttl_ms: duration_ms(cfg.presence_ttl),
            node_ttl_ms: duration_ms(cfg.node_ttl),
            rng: Mutex::new(rng),
        })
    }

    /// Where this store lives.
    pub fn location(&self) -> &RedisLocation {
        &self.location
    }

    /// The configuration.
    pub fn config(&self) -> &StoreConfig {
        &self.cfg
    }

    /// Redis's clock in milliseconds since the Unix epoch (`TIME`).
    pub async fn redis_time_ms(&self) -> Result<u64, StoreError> {
        let (secs, micros): (u64, u64) = redis::cmd("TIME")
            .query_async(&mut self.conn.clone())
            .await
            .map_err(store_err)?;
        Ok(secs.saturating_mul(1000).saturating_add(micros / 1000))
    }

    fn retention_ms(&self) -> u64 {
        self.node_ttl_ms.max(self.presence_ttl_ms)
    }

    fn stats_key(&self, kind: StatsKind) -> String {
        format!("{}:stats:{}", self.location.prefix, kind.as_str())
    }

    fn relay_retention_ms(&self) -> u64 {
        self.node_ttl_ms.saturating_mul(RELAY_RETENTION_TTLS)
    }

    async fn run(
        &self,
        script: &redis::Script,
        args: Vec<String>,
    ) -> Result<Vec<String>, StoreError> {
        let mut inv = script.prepare_invoke();
        inv.arg(&self.location.prefix);
        for a in args {
            inv.arg(a);
        }
        inv.invoke_async(&mut self.conn.clone())
            .await
            .map_err(store_err)
    }

    fn stale_or_unknown(
        &self,
        out: &[String],
        node_id: &str,
        epoch: u64,
    ) -> Result<u64, StoreError> {
        match out {
            [tag, cur] if tag == "stale" => parse_u64(cur, "node epoch"),
            _ => Err(StoreError::UnknownNode {
                node_id: node_id.to_owned(),
                epoch,
            }),
        }
    }

    async fn write_presence(
        &self,
        node_id: &str,
        epoch: u64,
        entries: &[(&str, &str, PresenceStatus)],
        now: Timestamp,
    ) -> Result<(UpdateOutcome, u64), StoreError> {
        let mut args = Vec::with_capacity(3 + entries.len() * 3);
        args.push(node_id.to_owned());
        args.push(epoch.to_string());
        args.push(now.as_millis().to_string());
        for (user, device, status) in entries {
            args.push((*user).to_owned());
            args.push((*device).to_owned());
            args.push(status_text(*status).to_owned());
        }
        let out = self.run(&self.scripts.update_presence, args).await?;
        match out.as_slice() {
            [tag, n] if tag == "applied" => {
                Ok((UpdateOutcome::Applied, parse_u64(n, "script answer")?))
            }
            _ => {
                let current_epoch = self.stale_or_unknown(&out, node_id, epoch)?;
                Ok((UpdateOutcome::Stale { current_epoch }, 0))
            }
        }
    }

    async fn snapshot(&self) -> Result<(Vec<NodeRow>, RelaySnapshot, u64), StoreError> {
        let mut inv = self.scripts.snapshot.prepare_invoke();
        inv.arg(&self.location.prefix);
        let (nodes, relays, entries, handed): (Vec<String>, Vec<String>, Vec<String>, Vec<String>) =
            inv.invoke_async(&mut self.conn.clone())
                .await
                .map_err(store_err)?;
        let entries = match entries.first() {
            Some(e) => e.parse::<i64>().map_err(|_| corrupt("entry count"))?,
            None => 0,
        };
        Ok((
            nodes_from_flat(&nodes)?,
            relays_from_flat(relays, &handed)?,
            u64::try_from(entries).unwrap_or(0),
        ))
    }

    async fn read_relays(&self) -> Result<RelaySnapshot, StoreError> {
        let mut inv = self.scripts.read_relays.prepare_invoke();
        inv.arg(&self.location.prefix);
        let (flat, handed): (Vec<String>, Vec<String>) = inv
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(store_err)?;
        relays_from_flat(flat, &handed)
    }

    /// Apply `(id, expected, new)` relay writes if every expected record is still stored;
    /// false when another writer came first, after a short random pause (so writers racing
    /// for the same relays spread out instead of colliding again on the next attempt).
    async fn relays_cas(&self, ops: Vec<(String, String, String)>) -> Result<bool, StoreError> {
        let mut inv = self.scripts.relays_cas.prepare_invoke();
        inv.arg(&self.location.prefix);
        for (id, expected, new) in ops {
            inv.arg(id).arg(expected).arg(new);
        }
        let applied: i64 = inv
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(store_err)?;
        if applied != 1 {
            // Not the seeded choice RNG: a pause must not change which relays a seed picks.
            let pause = rand::random::<u64>() % (CAS_PAUSE_MAX_US + 1);
            tokio::time::sleep(Duration::from_micros(pause)).await;
        }
        Ok(applied == 1)
    }

    fn lost_race(what: &str) -> StoreError {
        StoreError::Unavailable(format!(
            "{what}: {CAS_ATTEMPTS} concurrent updates of the same relay won; retry"
        ))
    }
}

impl DirectoryStore for RedisStore {
    async fn register_node(
        &self,
        req: RegisterNodeRequest,
        now: Timestamp,
    ) -> Result<RegisterNodeResponse, StoreError> {
        let args = vec![
            req.node_id.clone(),
            req.internal_url.clone(),
            req.epoch.to_string(),
            req.load.to_string(),
            now.as_millis().to_string(),
        ];
        let out = self.run(&self.scripts.register_node, args).await?;
        match out.as_slice() {
            [tag, prev, purged] if tag == "ok" => Ok(RegisterNodeResponse {
                heartbeat_interval_ms: duration_ms(self.cfg.heartbeat_interval()),
                node_ttl_ms: self.node_ttl_ms,
                presence_ttl_ms: self.presence_ttl_ms,
                purged_presence: parse_u64(purged, "script answer")?,
                previous_epoch: if prev.is_empty() {
                    None
                } else {
                    Some(parse_u64(prev, "node epoch")?)
                },
            }),
            [tag, cur] if tag == "stale" => Err(StoreError::StaleEpoch {
                node_id: req.node_id,
                epoch: req.epoch,
                current_epoch: parse_u64(cur, "node epoch")?,
            }),
            _ => Err(corrupt("script answer")),
        }
    }

    async fn node_heartbeat(
        &self,
        node_id: &str,
        epoch: u64,
        load: f64,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let args = vec![
            node_id.to_owned(),
            epoch.to_string(),
            load.to_string(),
            now.as_millis().to_string(),
            self.retention_ms().to_string(),
        ];
        let out = self.run(&self.scripts.node_heartbeat, args).await?;
        match out.as_slice() {
            [tag] if tag == "ok" => Ok(()),
            _ => {
                let current_epoch = self.stale_or_unknown(&out, node_id, epoch)?;
                Err(StoreError::StaleEpoch {
                    node_id: node_id.to_owned(),
                    epoch,
                    current_epoch,
                })
            }
        }
    }

    async fn deregister_node(
        &self,
        node_id: &str,
        epoch: u64,
        _now: Timestamp,
    ) -> Result<DeregisterNodeResponse, StoreError> {
        let args = vec![node_id.to_owned(), epoch.to_string()];
        let out = self.run(&self.scripts.deregister_node, args).await?;
        match out.as_slice() {
            [tag, purged] if tag == "removed" || tag == "absent" => Ok(DeregisterNodeResponse {
                removed: tag == "removed",
                purged_presence: parse_u64(purged, "script answer")?,
            }),
            [tag, cur] if tag == "stale" => Err(StoreError::StaleEpoch {
                node_id: node_id.to_owned(),
                epoch,
                current_epoch: parse_u64(cur, "node epoch")?,
            }),
            _ => Err(corrupt("script answer")),
        }
    }

    async fn list_nodes(&self, now: Timestamp) -> Result<Vec<NodeInfo>, StoreError> {
        let (nodes, _, _) = self.snapshot().await?;
        let mut out: Vec<NodeInfo> = nodes
            .into_iter()
            .filter(|n| now.millis_since(n.hb) < self.node_ttl_ms)
            .map(|n| NodeInfo {
                node_id: n.id,
                internal_url: n.url,
                epoch: n.epoch,
                load: n.load,
                last_heartbeat_age_ms: now.millis_since(n.hb),
            })
            .collect();
        out.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        Ok(out)
    }

    async fn update_presence(
        &self,
        u: PresenceUpdate,
        now: Timestamp,
    ) -> Result<UpdateOutcome, StoreError> {
        let entries = [(u.user.as_str(), u.device.as_str(), u.status)];
        let (outcome, _) = self
            .write_presence(&u.node_id, u.node_epoch, &entries, now)
            .await?;
        Ok(outcome)
    }

    async fn update_presence_batch(
        &self,
        node_id: &str,
        node_epoch: u64,
        entries: Vec<NodePresence>,
        now: Timestamp,
    ) -> Result<(UpdateOutcome, u64), StoreError> {
        let entries: Vec<(&str, &str, PresenceStatus)> = entries
            .iter()
            .map(|e| (e.user.as_str(), e.device.as_str(), e.status))
            .collect();
        self.write_presence(node_id, node_epoch, &entries, now)
            .await
    }

    async fn remove_presence(
        &self,
        r: PresenceRemove,
        _now: Timestamp,
    ) -> Result<RemoveOutcome, StoreError> {
        let args = vec![r.user, r.device, r.node_id, r.node_epoch.to_string()];
        let out = self.run(&self.scripts.remove_presence, args).await?;
        match out.as_slice() {
            [tag] if tag == "removed" => Ok(RemoveOutcome::Removed),
            [tag] if tag == "notfound" => Ok(RemoveOutcome::NotFound),
            [tag, cur] if tag == "stale" => Ok(RemoveOutcome::Stale {
                current_epoch: parse_u64(cur, "node epoch")?,
            }),
            _ => Err(corrupt("script answer")),
        }
    }

    async fn lookup_users(
        &self,
        users: &[String],
        now: Timestamp,
    ) -> Result<Vec<UserLocation>, StoreError> {
        let out: Vec<Vec<String>> = {
            let mut inv = self.scripts.lookup.prepare_invoke();
            inv.arg(&self.location.prefix);
            for u in users {
                inv.arg(u);
            }
            inv.invoke_async(&mut self.conn.clone())
                .await
                .map_err(store_err)?
        };
        let mut it = out.into_iter();
        let nodes_flat = it.next().unwrap_or_default();
        // (url, epoch, hb) by node id.
        let mut nodes: std::collections::HashMap<&str, (&str, u64, Timestamp)> =
            std::collections::HashMap::new();
        for c in nodes_flat.chunks_exact(4) {
            nodes.insert(
                &c[0],
                (
                    &c[1],
                    parse_u64(&c[2], "node epoch")?,
                    Timestamp(parse_u64(&c[3], "node heartbeat")?),
                ),
            );
        }
        let retention = self.retention_ms();
        let mut answers = Vec::with_capacity(users.len());
        for (user, flat) in users.iter().zip(it.chain(std::iter::repeat(Vec::new()))) {
            let mut devices = Vec::new();
            for pair in flat.chunks_exact(2) {
                let Some(e) = parse_entry(&pair[1]) else {
                    return Err(corrupt("presence entry"));
                };
                // MemoryStore::entry_live, on the same rule.
                let node = nodes.get(e.node);
                let mut fresh = e.last_seen;
                if let Some(&(_, epoch, hb)) = node {
                    if e.epoch < epoch {
                        continue;
                    }
                    if e.epoch == epoch && now.millis_since(hb) < retention {
                        fresh = fresh.max(hb);
                    }
                }
                if now.millis_since(fresh) >= self.presence_ttl_ms {
                    continue;
                }
                devices.push(DeviceLocation {
                    device: pair[0].clone(),
                    node_id: e.node.to_owned(),
                    node_epoch: e.epoch,
                    node_url: node
                        .filter(|(_, epoch, _)| *epoch == e.epoch)
                        .map(|(url, _, _)| (*url).to_owned()),
                    status: e.status,
                    last_seen_age_ms: now.millis_since(e.last_seen),
                });
            }
            devices.sort_by(|a, b| a.device.cmp(&b.device));
            answers.push(UserLocation {
                user: user.clone(),
                devices,
            });
        }
        Ok(answers)
    }

    async fn register_relay(
        &self,
        req: RegisterRelayRequest,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let rec = StoredRelay {
            turn_addr: req.turn_addr,
            turn_tcp_addr: req.turn_tcp_addr,
            turn_tls_addr: req.turn_tls_addr,
            metrics_addr: req.metrics_addr,
            region: req.region,
            load: req.load,
            allocations: req.allocations,
            capacity: req.capacity,
            draining: req.draining,
            handed_out: 0,
            last_heartbeat: now.as_millis(),
        };
        let mut inv = self.scripts.register_relay.prepare_invoke();
        inv.arg(&self.location.prefix)
            .arg(&req.relay_id)
            .arg(rec.json()?);
        let _: i64 = inv
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(store_err)?;
        Ok(())
    }

    async fn relay_heartbeat(
        &self,
        req: RelayHeartbeatRequest,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let key = format!("{}:relays", self.location.prefix);
        for _ in 0..CAS_ATTEMPTS {
            let raw: Option<String> = redis::cmd("HGET")
                .arg(&key)
                .arg(&req.relay_id)
                .query_async(&mut self.conn.clone())
                .await
                .map_err(store_err)?;
            let unknown = || StoreError::UnknownRelay {
                relay_id: req.relay_id.clone(),
            };
            let Some(raw) = raw else {
                return Err(unknown());
            };
            let mut rec: StoredRelay =
                serde_json::from_str(&raw).map_err(|_| corrupt("relay record"))?;
            if now.millis_since(Timestamp(rec.last_heartbeat)) >= self.relay_retention_ms() {
                return Err(unknown());
            }
            rec.load = req.load;
            rec.allocations = req.allocations;
            rec.draining = req.draining;
            rec.handed_out = 0;
            rec.last_heartbeat = now.as_millis();
            if self
                .relays_cas(vec![(req.relay_id.clone(), raw, rec.json()?)])
                .await?
            {
                return Ok(());
            }
        }
        Err(Self::lost_race("relay heartbeat"))
    }

    async fn deregister_relay(&self, relay_id: &str) -> Result<bool, StoreError> {
        let mut inv = self.scripts.deregister_relay.prepare_invoke();
        inv.arg(&self.location.prefix).arg(relay_id);
        let removed: i64 = inv
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(store_err)?;
        Ok(removed > 0)
    }

    async fn list_relays(&self, now: Timestamp) -> Result<Vec<RelayInfo>, StoreError> {
        let snap = self.read_relays().await?;
        Ok(snap
            .records
            .iter()
            .map(|r| r.info(now, self.node_ttl_ms))
            .collect())
    }

    async fn choose_relays(
        &self,
        req: &ChooseRelaysRequest,
        now: Timestamp,
    ) -> Result<Vec<ChosenRelay>, StoreError> {
        let RelaySnapshot { mut records, .. } = self.read_relays().await?;
        let chosen = {
            let mut rng = self.rng.lock().unwrap_or_else(PoisonError::into_inner);
            select::choose(&mut records, req, now, self.node_ttl_ms, &mut *rng)
        };
        if chosen.is_empty() {
            return Ok(Vec::new());
        }
        let mut inv = self.scripts.hand_out.prepare_invoke();
        inv.arg(&self.location.prefix);
        for &i in &chosen {
            inv.arg(records[i].relay_id.as_ref());
        }
        let _: i64 = inv
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(store_err)?;
        Ok(chosen
            .into_iter()
            .map(|i| select::chosen_view(&records[i]))
            .collect())
    }

    async fn sweep(&self, now: Timestamp) -> Result<SweepStats, StoreError> {
        let args = vec![
            now.as_millis().to_string(),
            self.node_ttl_ms.to_string(),
            self.presence_ttl_ms.to_string(),
        ];
        let out = self.run(&self.scripts.sweep, args).await?;
        let [nodes, presence] = out.as_slice() else {
            return Err(corrupt("script answer"));
        };
        let mut stats = SweepStats {
            nodes: parse_u64(nodes, "script answer")?,
            presence: parse_u64(presence, "script answer")?,
            relays: 0,
        };
        // Relays past retention; one lost race leaves them to the next sweep.
        let snap = self.read_relays().await?;
        let retention = self.relay_retention_ms();
        let doomed: Vec<(String, String, String)> = snap
            .records
            .iter()
            .zip(snap.raw)
            .filter(|(r, _)| now.millis_since(r.last_heartbeat) >= retention)
            .map(|(r, raw)| (r.relay_id.to_string(), raw, String::new()))
            .collect();
        let n = doomed.len() as u64;
        if n > 0 && self.relays_cas(doomed).await? {
            stats.relays = n;
        }
        Ok(stats)
    }

    async fn put_stats(
        &self,
        kind: StatsKind,
        id: &str,
        json: String,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let _: i64 = redis::cmd("HSET")
            .arg(self.stats_key(kind))
            .arg(id)
            .arg(format!("{} {json}", now.as_millis()))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(store_err)?;
        Ok(())
    }

    async fn list_stats(
        &self,
        kind: StatsKind,
        max_age: Duration,
        now: Timestamp,
    ) -> Result<Vec<StatsRecord>, StoreError> {
        let key = self.stats_key(kind);
        let flat: Vec<String> = redis::cmd("HGETALL")
            .arg(&key)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(store_err)?;
        let max_age = duration_ms(max_age);
        let mut out = Vec::new();
        let mut stale = Vec::new();
        let mut it = flat.into_iter();
        while let (Some(id), Some(raw)) = (it.next(), it.next()) {
            let (at, json) = raw.split_once(' ').ok_or_else(|| corrupt("stats record"))?;
            let age_ms = now.millis_since(Timestamp(parse_u64(at, "stats record")?));
            if age_ms < max_age {
                out.push(StatsRecord {
                    id,
                    json: json.to_owned(),
                    age_ms,
                });
            } else {
                stale.push(id);
            }
        }
        if !stale.is_empty() {
            // A record rewritten since this read would be lost too: harmless, its writer
            // writes it again with its next heartbeat.
            let _: i64 = redis::cmd("HDEL")
                .arg(&key)
                .arg(stale)
                .query_async(&mut self.conn.clone())
                .await
                .map_err(store_err)?;
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn stats(&self, now: Timestamp) -> Result<StoreStats, StoreError> {
        let (nodes, relays, entries) = self.snapshot().await?;
        Ok(StoreStats {
            nodes: nodes
                .iter()
                .filter(|n| now.millis_since(n.hb) < self.node_ttl_ms)
                .count() as u64,
            relays_healthy: relays
                .records
                .iter()
                .filter(|r| r.healthy(now, self.node_ttl_ms))
                .count() as u64,
            relays_known: relays.records.len() as u64,
            presence_entries: entries,
        })
    }
}

/// Time on Redis's clock: milliseconds since the Unix epoch as Redis's `TIME` says, sampled at
/// start and every [`CLOCK_RESYNC`] by [`RedisClock::spawn_resync`], advanced in between by
/// the local monotonic clock. Never moves backwards (a resync that would step back holds the
/// clock until it catches up). Every replica on one Redis reads the same time base, so the
/// timestamps they store mean the same to all of them.
#[derive(Debug)]
pub struct RedisClock {
    base: Instant,
    /// Redis milliseconds at `base`.
    offset_ms: AtomicU64,
    /// The latest value handed out.
    last_ms: AtomicU64,
}

impl RedisClock {
    /// A clock anchored to `store`'s Redis now.
    pub async fn anchored(store: &RedisStore) -> Result<Arc<Self>, StoreError> {
        let clock = Arc::new(Self {
            base: Instant::now(),
            offset_ms: AtomicU64::new(0),
            last_ms: AtomicU64::new(0),
        });
        clock.resync(store).await?;
        Ok(clock)
    }

    async fn resync(&self, store: &RedisStore) -> Result<(), StoreError> {
        let asked = self.base.elapsed();
        let redis_ms = store.redis_time_ms().await?;
        let answered = self.base.elapsed();
        // Redis read its clock about half-way through the round trip.
        let local_ms = duration_ms((asked + answered) / 2);
        self.offset_ms
            .store(redis_ms.saturating_sub(local_ms), Ordering::SeqCst);
        Ok(())
    }

    /// Resync from `store` every [`CLOCK_RESYNC`] until the handle is dropped.
    pub fn spawn_resync(self: &Arc<Self>, store: Arc<RedisStore>) -> ClockResync {
        let cancel = CancellationToken::new();
        let token = cancel.clone();
        let clock = self.clone();
        tokio::spawn(
            async move {
                let mut tick = tokio::time::interval(CLOCK_RESYNC);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tick.tick().await;
                loop {
                    tokio::select! {
                        () = token.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    if let Err(e) = clock.resync(&store).await {
                        debug!(error = %e, "clock resync failed; keeping the last offset");
                    }
                }
            }
            .instrument(info_span!("redis_clock")),
        );
        ClockResync {
            _guard: cancel.drop_guard(),
        }
    }
}

impl Clock for RedisClock {
    fn now(&self) -> Timestamp {
        let t = self
            .offset_ms
            .load(Ordering::SeqCst)
            .saturating_add(duration_ms(self.base.elapsed()));
        let prev = self.last_ms.fetch_max(t, Ordering::SeqCst);
        Timestamp(prev.max(t))
    }
}

/// Owner of the [`RedisClock`] resync task; dropping it stops the task.
#[derive(Debug)]
pub struct ClockResync {
    _guard: DropGuard,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls_parse_and_bad_ones_are_refused() {
        let l = parse_location("redis://127.0.0.1:6379/2").unwrap();
        assert_eq!(l.url, "redis://127.0.0.1:6379/2");
        assert_eq!(l.prefix, DEFAULT_PREFIX);
        let l = parse_location("redis://:secret@h:1?prefix=fleet-a").unwrap();
        assert_eq!(l.prefix, "fleet-a");
        assert!(!l.redacted().contains("secret"), "{}", l.redacted());
        for bad in [
            "http://127.0.0.1:6379",
            "rediss://127.0.0.1:6379",
            "redis://",
            "redis:///3",
            "redis://h:1?db=2",
            "redis://h:1?prefix=",
            "redis://h:1?prefix=has space",
            "redis://h:notaport",
            "127.0.0.1:6379",
        ] {
            let e = parse_location(bad).unwrap_err();
            assert!(e.starts_with("store"), "{bad}: {e}");
        }
        assert_eq!(redact("redis://u:pw@h:1/0"), "redis://u:***@h:1/0");
        assert_eq!(redact("redis://h:1"), "redis://h:1");
    }

    #[test]
    fn entries_round_trip() {
        let e = parse_entry("18446744073709551615|busy|42|node|with|bars").unwrap();
        assert_eq!(e.epoch, u64::MAX);
        assert_eq!(e.status, PresenceStatus::Busy);
        assert_eq!(e.last_seen, Timestamp(42));
        assert_eq!(e.node, "node|with|bars");
        for bad in [
            "",
            "1|online|2",
            "x|online|2|n",
            "1|gone|2|n",
            "1|online|-2|n",
        ] {
            assert!(parse_entry(bad).is_none(), "{bad}");
        }
    }
}
