//! Multi-node operation: registration and presence in the directory, and the authenticated
//! node-to-node API (`/internal/v1/*`, bearer cluster token) used to deliver events to users
//! connected to other nodes, to forward callee frames to the node arbitrating a call, and to
//! wake other nodes' sessions when a message for their user was stored.
//!
//! Accounts and messages live in the shared [`crate::store::Store`] (one SQLite file or
//! one PostgreSQL database for the whole fleet), so a node only nudges the recipient's nodes; the
//! message itself is read from the store by the recipient's session.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use peerlink_api::directory::{
    ChooseRelaysRequest, NodePresence, PresenceRemove, PresenceStatus as DirStatus, PresenceUpdate,
    RegisterNodeRequest,
};
use peerlink_api::directory_client::{DirectoryClient, NodeRegistration, NodeStatsSource};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::hub::Hub;
use peerlink_api::signaling::{ClientMsg, PresenceStatus, ServerMsg, TurnTransport, TurnUri};

/// Timeout of one node-to-node request.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);
/// First wait before a failed delivery to another node is sent again (then doubling).
pub const RETRY_BACKOFF: Duration = Duration::from_millis(100);
/// How long a delivery to another node is retried: a call that cannot reach its party for
/// this long is re-established by its clients rather than waited for.
pub const RETRY_FOR: Duration = Duration::from_secs(3);

/// Node-to-node failures.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The other node or the directory could not be reached or answered an error.
    #[error("cluster request failed: {0}")]
    Request(String),
    /// The other node refused the request (a 4xx answer): sending it again cannot help.
    #[error("cluster request refused: {0}")]
    Refused(String),
}

impl ClusterError {
    /// Whether the same request may succeed when sent again (unreachable, timed out, 5xx).
    pub fn is_retryable(&self) -> bool {
        matches!(self, ClusterError::Request(_))
    }
}

/// A call party: user, device and the node holding the session (None = this node).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Party {
    /// Username.
    pub user: String,
    /// Device id.
    pub device: String,
    /// Internal URL of the node holding the session; None when it is the local node.
    #[serde(default)]
    pub node: Option<String>,
}

/// `POST /internal/v1/deliver`: hand a server frame to local sessions of `user`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeliverRequest {
    /// Recipient user.
    pub user: String,
    /// Only this device, if set.
    #[serde(default)]
    pub device: Option<String>,
    /// Every device except this one, if set.
    #[serde(default)]
    pub except_device: Option<String>,
    /// The frame.
    pub msg: ServerMsg,
    /// Internal URL of the node arbitrating the call the frame belongs to (for callee replies).
    #[serde(default)]
    pub arbiter: Option<String>,
    /// Idempotency id: a delivery sent again with the same id (its answer was lost) is
    /// answered from memory and reaches no session twice.
    #[serde(default)]
    pub id: Option<String>,
}

/// Answer of `/internal/v1/deliver`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeliverResponse {
    /// Sessions that got the frame.
    pub delivered: u32,
}

/// `POST /internal/v1/call`: a call frame from a party connected to another node.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CallForward {
    /// The authenticated sender (its node set).
    pub from: Party,
    /// The frame.
    pub msg: ClientMsg,
    /// The sender's session ended: end the call (`msg` names it) as `disconnected`.
    #[serde(default)]
    pub gone: bool,
}

/// Answer of `/internal/v1/call`: frames for the sender.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CallForwardResponse {
    /// Replies to hand to the sender's session.
    pub replies: Vec<ServerMsg>,
}

/// `POST /internal/v1/inbox`: new messages were stored for `user`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InboxNudge {
    /// Recipient.
    pub user: String,
}

fn to_dir(s: PresenceStatus) -> DirStatus {
    match s {
        PresenceStatus::Away => DirStatus::Away,
        _ => DirStatus::Online,
    }
}

/// Directory and node-to-node client of one node.
pub struct Cluster {
    dir: DirectoryClient,
    http: reqwest::Client,
    auth: String,
    /// This node's id.
    pub node_id: String,
    /// This node's epoch (start time, ms).
    pub epoch: u64,
    /// This node's internal URL.
    pub internal_url: String,
    region: String,
    registration: Mutex<Option<NodeRegistration>>,
}

impl Cluster {
    /// Clients for the directory at `directory` and for other nodes.
    pub fn new(
        directory: &str,
        internal_url: &str,
        token: &str,
        cfg: &Config,
    ) -> Result<Self, ClusterError> {
        let dir = DirectoryClient::with_timeout(directory, token, FORWARD_TIMEOUT)
            .map_err(|e| ClusterError::Request(e.to_string()))?;
        // Other nodes close a keep-alive connection that stays idle for their header timeout;
        // dropping pooled connections well before that avoids sending on one being closed.
        // `https://` node URLs verify against the system's roots and the cluster's CAs.
        let trust = cfg
            .cluster_trust()
            .map_err(|e| ClusterError::Request(e.to_string()))?;
        let http = trust
            .reqwest_builder()
            .timeout(FORWARD_TIMEOUT)
            .connect_timeout(FORWARD_TIMEOUT)
            .pool_idle_timeout(cfg.header_timeout / 2)
            .build()
            .map_err(|e| ClusterError::Request(e.to_string()))?;
        Ok(Self {
            dir,
            http,
            auth: format!("Bearer {token}"),
            node_id: cfg.node_id.clone(),
            epoch: crate::state::now_unix_ms(),
            internal_url: internal_url.trim_end_matches('/').to_owned(),
            region: cfg.region.clone(),
            registration: Mutex::new(None),
        })
    }

    /// Start the registration loop (register, heartbeat with the console figures of `stats`,
    /// re-register and republish the presence of every local session after a directory
    /// restart).
    pub fn start(&self, hub: Arc<Hub>, stats: impl NodeStatsSource) {
        let req = RegisterNodeRequest {
            node_id: self.node_id.clone(),
            internal_url: self.internal_url.clone(),
            epoch: self.epoch,
            load: 0.0,
        };
        let source = move || {
            hub.all_sessions_by_user()
                .into_iter()
                .map(|(user, device, status)| NodePresence {
                    user,
                    device,
                    status: to_dir(status),
                })
                .collect::<Vec<_>>()
        };
        let reg = self
            .dir
            .spawn_node_registration_with_stats(req, source, stats);
        *self.registration.lock().unwrap_or_else(|p| p.into_inner()) = Some(reg);
    }

    /// Wait (at most `limit`) until the directory has registered this node; false on timeout.
    pub async fn wait_registered(&self, limit: Duration) -> bool {
        let rx = self
            .registration
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(NodeRegistration::subscribe);
        let Some(mut rx) = rx else { return false };
        tokio::time::timeout(limit, rx.wait_for(|s| s.registered))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Deregister at shutdown (best effort).
    pub async fn stop(&self) {
        let reg = self
            .registration
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        drop(reg);
        let _ = self.dir.deregister_node(&self.node_id, self.epoch).await;
    }

    /// Publish a device's presence.
    pub async fn publish(&self, user: &str, device: &str, status: PresenceStatus) {
        let upd = PresenceUpdate {
            user: user.to_owned(),
            device: device.to_owned(),
            node_id: self.node_id.clone(),
            node_epoch: self.epoch,
            status: to_dir(status),
        };
        if let Err(e) = self.dir.update_presence(&upd).await {
            tracing::warn!(error = %e, "presence publish failed");
        }
    }

    /// Remove a device's presence.
    pub async fn unpublish(&self, user: &str, device: &str) {
        let req = PresenceRemove {
            user: user.to_owned(),
            device: device.to_owned(),
            node_id: self.node_id.clone(),
            node_epoch: self.epoch,
        };
        if let Err(e) = self.dir.remove_presence(&req).await {
            tracing::warn!(error = %e, "presence removal failed");
        }
    }

    /// Internal URLs of the other nodes holding sessions of `user`.
    pub async fn nodes_of(&self, user: &str) -> Vec<String> {
        match self.dir.lookup_user(user).await {
            Ok(loc) => loc
                .devices
                .into_iter()
                .filter(|d| d.node_id != self.node_id)
                .filter_map(|d| d.node_url)
                .map(|u| u.trim_end_matches('/').to_owned())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "directory lookup failed");
                Vec::new()
            }
        }
    }

    /// Whether looking `user` up in the directory fails (every replica unreachable or
    /// answering an error), as opposed to answering that the user has no device.
    pub async fn lookup_fails(&self, user: &str) -> bool {
        self.dir.lookup_user(user).await.is_err()
    }

    /// Where the directory has `user`'s `device` now: `Some(None)` on this node,
    /// `Some(Some(url))` on another one, `None` when it is nowhere (or the directory is
    /// unreachable). A device whose node died reconnects to another node; a frame that could
    /// not reach the old node is sent where this says.
    pub async fn node_of_device(&self, user: &str, device: &str) -> Option<Option<String>> {
        let loc = match self.dir.lookup_user(user).await {
            Ok(loc) => loc,
            Err(e) => {
                tracing::warn!(error = %e, "directory lookup failed");
                return None;
            }
        };
        let d = loc.devices.into_iter().find(|d| d.device == device)?;
        if d.node_id == self.node_id {
            return Some(None);
        }
        d.node_url.map(|u| Some(u.trim_end_matches('/').to_owned()))
    }

    /// Presence of `user` across the fleet (best status of any device).
    pub async fn presence(&self, user: &str) -> PresenceStatus {
        match self.dir.lookup_user(user).await {
            Ok(loc) if loc.devices.iter().any(|d| d.status != DirStatus::Away) => {
                PresenceStatus::Online
            }
            Ok(loc) if !loc.devices.is_empty() => PresenceStatus::Away,
            _ => PresenceStatus::Offline,
        }
    }

    /// The TURN URIs of the relays the directory chooses, each relay's in ladder order (UDP,
    /// then TCP and TLS where it listens for them).
    pub async fn relays(&self) -> Vec<TurnUri> {
        let req = ChooseRelaysRequest {
            caller_region: self.region.clone(),
            callee_region: None,
            count: 2,
        };
        match self.dir.choose_relays(&req).await {
            Ok(r) => r
                .into_iter()
                .flat_map(|c| {
                    let udp = Some(TurnUri {
                        transport: TurnTransport::Udp,
                        addr: c.turn_addr,
                    });
                    let tcp = c.turn_tcp_addr.map(|addr| TurnUri {
                        transport: TurnTransport::Tcp,
                        addr,
                    });
                    let tls = c.turn_tls_addr.map(|addr| TurnUri {
                        transport: TurnTransport::Tls,
                        addr,
                    });
                    [udp, tcp, tls].into_iter().flatten()
                })
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "relay choice failed");
                Vec::new()
            }
        }
    }

    async fn post<Q: Serialize, A: for<'de> Deserialize<'de>>(
        &self,
        node_url: &str,
        path: &str,
        body: &Q,
    ) -> Result<A, ClusterError> {
        let url = format!("{}{}", node_url.trim_end_matches('/'), path);
        let resp = self
            .http
            .post(&url)
            .header(reqwest::header::AUTHORIZATION, &self.auth)
            .json(body)
            .send()
            .await
            .map_err(|e| ClusterError::Request(e.to_string()))?;
        if resp.status().is_client_error() {
            return Err(ClusterError::Refused(format!(
                "{url} answered {}",
                resp.status()
            )));
        }
        if !resp.status().is_success() {
            return Err(ClusterError::Request(format!(
                "{url} answered {}",
                resp.status()
            )));
        }
        resp.json::<A>()
            .await
            .map_err(|e| ClusterError::Request(e.to_string()))
    }

    /// Deliver a frame to sessions on another node (one attempt; see [`Self::deliver_reliably`]).
    pub async fn deliver(&self, node_url: &str, req: &DeliverRequest) -> Result<u32, ClusterError> {
        let r: DeliverResponse = self.post(node_url, "/internal/v1/deliver", req).await?;
        Ok(r.delivered)
    }

    /// Deliver a frame to sessions on another node until it answers (see [`retry`]), under
    /// one idempotency id so that an attempt whose answer was lost is not delivered twice.
    /// Stops early when `moot()` turns true (the call the frame belongs to has ended).
    pub async fn deliver_reliably(
        &self,
        node_url: &str,
        mut req: DeliverRequest,
        moot: impl Fn() -> bool,
    ) -> Result<u32, ClusterError> {
        if req.id.is_none() {
            req.id = Some(hex::encode(rand::random::<[u8; 16]>()));
        }
        retry(moot, || self.deliver(node_url, &req)).await
    }

    /// Forward a callee's call frame to the arbitrating node; returns replies for the sender.
    pub async fn forward_call(
        &self,
        node_url: &str,
        req: &CallForward,
    ) -> Result<Vec<ServerMsg>, ClusterError> {
        let r: CallForwardResponse = self.post(node_url, "/internal/v1/call", req).await?;
        Ok(r.replies)
    }

    /// Tell another node that messages for `user` were stored, until it answers (see
    /// [`retry`]; a nudge is idempotent).
    pub async fn nudge_inbox_reliably(
        &self,
        node_url: &str,
        user: &str,
    ) -> Result<(), ClusterError> {
        retry(|| false, || self.nudge_inbox(node_url, user)).await
    }

    /// Tell another node that messages for `user` were stored (one attempt).
    pub async fn nudge_inbox(&self, node_url: &str, user: &str) -> Result<(), ClusterError> {
        let _: serde_json::Value = self
            .post(
                node_url,
                "/internal/v1/inbox",
                &InboxNudge {
                    user: user.to_owned(),
                },
            )
            .await?;
        Ok(())
    }
}

/// Run `attempt` until it succeeds: a failure that may pass (unreachable, timed out, 5xx) is
/// tried again after [`RETRY_BACKOFF`], doubling, for up to [`RETRY_FOR`]; a refusal (4xx),
/// the time running out or `moot()` turning true ends it with the last error.
pub async fn retry<T, F, Fut>(moot: impl Fn() -> bool, mut attempt: F) -> Result<T, ClusterError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClusterError>>,
{
    let give_up = tokio::time::Instant::now() + RETRY_FOR;
    let mut backoff = RETRY_BACKOFF;
    loop {
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(e) if !e.is_retryable() => return Err(e),
            Err(e) => {
                if moot() || tokio::time::Instant::now() + backoff > give_up {
                    return Err(e);
                }
                tracing::debug!(error = %e, retry_in = ?backoff, "request to another node failed");
                tokio::time::sleep(backoff).await;
                backoff = backoff.saturating_mul(2);
            }
        }
    }
}
