//! Shared node state handed to every handler and session.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{HashError, PasswordHasher, Throttle, Tokens};
use crate::calls::Calls;
use crate::cluster::Cluster;
use crate::config::{Config, ConfigError};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::store::{Db, Store};

/// Most keys each login throttle table tracks.
const THROTTLE_MAX_KEYS: usize = 100_000;

/// Failure to build the node state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Password hasher setup failed.
    #[error(transparent)]
    Hash(#[from] HashError),
    /// Cluster client setup failed.
    #[error("cluster setup: {0}")]
    Cluster(String),
}

/// Everything shared by handlers and sessions of one node.
pub struct Shared {
    /// Configuration.
    pub cfg: Config,
    /// Storage.
    pub db: Db,
    /// Password hashing.
    pub hasher: PasswordHasher,
    /// Token issuing/verification.
    pub tokens: Tokens,
    /// Login failures per account.
    pub throttle_account: Throttle,
    /// Login failures per IP.
    pub throttle_ip: Throttle,
    /// Idempotency ids of deliveries from other nodes seen lately, with what each delivered.
    pub deliveries: SeenDeliveries,
    /// The fleet's login failures, when a throttle store is configured (checked beside the
    /// node's own tables).
    pub shared_throttle: std::sync::OnceLock<crate::throttle::SharedThrottle>,
    /// Live sessions.
    pub hub: Arc<Hub>,
    /// Calls arbitrated here.
    pub calls: Calls,
    /// Counters.
    pub metrics: Metrics,
    /// Other nodes and the directory (None = standalone).
    pub cluster: Option<Cluster>,
    /// Set when shutdown begins: upgrades get 503.
    pub draining: AtomicBool,
    /// Cancelled when shutdown begins.
    pub shutdown: CancellationToken,
    /// Session tasks (awaited at shutdown).
    pub tasks: TaskTracker,
}

/// Cheap-to-clone handle to [`Shared`].
#[derive(Clone)]
pub struct AppState(pub Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// Current unix time, seconds.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Current unix time, milliseconds.
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl AppState {
    /// Build the state of a node (validates `cfg`; computes the dummy password hash).
    pub fn new(cfg: Config, store: Arc<dyn Store>) -> Result<Self, StateError> {
        cfg.validate()?;
        let hasher = PasswordHasher::new(cfg.argon2, cfg.hash_concurrency)?;
        let tokens = Tokens::new(
            &cfg.token_secret,
            &cfg.token_issuer,
            cfg.token_ttl,
            cfg.refresh_ttl,
        );
        let cluster = match (&cfg.directory, &cfg.internal_url, &cfg.cluster_token) {
            (Some(dir), Some(internal), Some(token)) => Some(
                Cluster::new(dir, internal, token, &cfg)
                    .map_err(|e| StateError::Cluster(e.to_string()))?,
            ),
            (Some(_), _, _) => {
                return Err(StateError::Cluster(
                    "a directory needs an internal URL and a cluster token".into(),
                ));
            }
            _ => None,
        };
        let metrics = Metrics::default();
        Ok(Self(Arc::new(Shared {
            throttle_account: Throttle::new(
                cfg.login_failures_per_account,
                cfg.login_window,
                THROTTLE_MAX_KEYS,
            ),
            throttle_ip: Throttle::new(
                cfg.login_failures_per_ip,
                cfg.login_window,
                THROTTLE_MAX_KEYS,
            ),
            cfg,
            db: Db(store, metrics.store_latency.clone()),
            hasher,
            tokens,
            hub: Arc::new(Hub::default()),
            calls: Calls::default(),
            metrics,
            cluster,
            draining: AtomicBool::new(false),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            shared_throttle: std::sync::OnceLock::new(),
            deliveries: SeenDeliveries::default(),
        })))
    }

    /// Count login failures in the fleet's shared throttle too (set once, before serving).
    pub fn share_login_throttle(&self, t: crate::throttle::SharedThrottle) {
        let _ = self.shared_throttle.set(t);
    }

    /// Periodic housekeeping: forget message ids older than the dedup retention and refresh
    /// tokens past their expiry.
    pub async fn maintain(&self) {
        let before = now_unix_ms().saturating_sub(
            u64::try_from(self.cfg.dedup_retention.as_millis()).unwrap_or(u64::MAX),
        );
        match self.db.call(move |s| s.prune_message_ids(before)).await {
            Ok(n) if n > 0 => tracing::info!(pruned = n, "old message ids forgotten"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "message id pruning failed"),
        }
        let now = now_unix_ms();
        match self.db.call(move |s| s.prune_refresh_tokens(now)).await {
            Ok(n) if n > 0 => tracing::info!(pruned = n, "expired refresh tokens forgotten"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "refresh token pruning failed"),
        }
    }

    /// Whether shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Begin shutdown: refuse new upgrades, end the calls of parties inside their call grace,
    /// say goodbye to every session and close it with 1001, then wait (at most `wait`) for the sessions to end.
    pub async fn drain(&self, wait: Duration) {
        self.draining.store(true, Ordering::Release);
        self.shutdown.cancel();
        let hint = u64::try_from(self.cfg.reconnect_hint.as_millis()).unwrap_or(u64::MAX);
        let bye = peerlink_api::signaling::ServerMsg::Goodbye {
            reason: "server shutting down".into(),
            reconnect_after_ms: hint,
        };
        let frame = crate::hub::encode(&bye);
        // Calls waiting for a disconnected party end now, not when its grace runs out.
        crate::calls::end_graces_now(self).await;
        for s in self.hub.all_sessions() {
            let _ = s.tx.try_send(frame.clone());
            s.ctl.close(
                1001,
                &format!("server shutting down; reconnect in {hint} ms"),
            );
        }
        self.tasks.close();
        let _ = tokio::time::timeout(wait, self.tasks.wait()).await;
    }
}

/// How long a delivery's idempotency id is remembered: longer than a sender retries it.
pub const DELIVERY_ID_MEMORY: std::time::Duration = std::time::Duration::from_secs(60);
/// Most idempotency ids remembered at once (older ones are forgotten first when full).
pub const MAX_DELIVERY_IDS: usize = 65_536;

/// The idempotency ids of deliveries from other nodes seen within [`DELIVERY_ID_MEMORY`], with
/// what each delivered, so that one sent again after a lost answer reaches no session twice.
#[derive(Debug, Default)]
pub struct SeenDeliveries {
    seen: std::sync::Mutex<std::collections::HashMap<String, (std::time::Instant, u32)>>,
}

impl SeenDeliveries {
    /// `Some(delivered)` when `id` was seen already; otherwise `None`, and `id` is recorded
    /// (with 0 until [`Self::record`]) before the caller delivers.
    pub fn first_or_seen(&self, id: &str, now: std::time::Instant) -> Option<u32> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, n)) = seen.get(id) {
            return Some(*n);
        }
        if seen.len() >= MAX_DELIVERY_IDS {
            seen.retain(|_, (at, _)| now.duration_since(*at) < DELIVERY_ID_MEMORY);
            if seen.len() >= MAX_DELIVERY_IDS {
                // Still full of recent ids: forget the oldest.
                if let Some(oldest) = seen
                    .iter()
                    .min_by_key(|(_, (at, _))| *at)
                    .map(|(k, _)| k.clone())
                {
                    seen.remove(&oldest);
                }
            }
        }
        seen.insert(id.to_owned(), (now, 0));
        None
    }

    /// What the delivery `id` reached.
    pub fn record(&self, id: &str, delivered: u32) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = seen.get_mut(id) {
            e.1 = delivered;
        }
    }
}
