//! The node's registry of live sessions: who is connected here on which device, their bounded
//! outbound queues, per-IP connection counts, and call routes learned from other nodes.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::ws::Utf8Bytes;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use peerlink_api::signaling::{CallId, PresenceStatus, ServerMsg};

/// Close code for a slow consumer / flood / expiry (RFC 6455 policy violation).
pub const CLOSE_POLICY: u16 = 1008;
/// Close code for a session replaced by a newer one of the same device.
pub const CLOSE_REPLACED: u16 = 4001;

/// Controls one session's lifetime: the first close reason wins.
#[derive(Debug, Default)]
pub struct SessionCtl {
    cancel: CancellationToken,
    reason: Mutex<Option<(u16, String)>>,
}

impl SessionCtl {
    /// Ask the session to close with `code` and `reason` (first caller wins).
    pub fn close(&self, code: u16, reason: &str) {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            *r = Some((code, reason.to_owned()));
        }
        drop(r);
        self.cancel.cancel();
    }
    /// The close reason, once closing.
    pub fn reason(&self) -> Option<(u16, String)> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
    /// Resolves once closing.
    pub async fn closed(&self) {
        self.cancel.cancelled().await
    }
    /// Whether closing.
    pub fn is_closed(&self) -> bool {
        self.cancel.is_cancelled()
    }
}

/// One live session on this node.
#[derive(Clone, Debug)]
pub struct LocalSession {
    /// Connection id (unique per node run).
    pub conn_id: u64,
    /// Device id.
    pub device: String,
    /// Bounded outbound queue (serialised frames).
    pub tx: mpsc::Sender<Utf8Bytes>,
    /// Lifetime control.
    pub ctl: Arc<SessionCtl>,
    /// Presence status (PresenceStatus as u8: 0 online, 1 away).
    pub status: Arc<AtomicU8>,
    /// Woken when new messages for the user were stored.
    pub inbox: Arc<Notify>,
}

/// A call arbitrated by another node, as seen from the callee's node.
#[derive(Debug)]
struct Route {
    arbiter: String,
    since: Instant,
    /// The local (user, device) that answered it, if one did.
    answered_by: Option<(String, String)>,
}

/// Registry of local sessions.
#[derive(Default)]
pub struct Hub {
    sessions: Mutex<HashMap<String, Vec<LocalSession>>>,
    ip_counts: Mutex<HashMap<IpAddr, u32>>,
    routes: Mutex<HashMap<CallId, Route>>,
    next_conn: AtomicU64,
}

/// Decrements the per-IP count on drop.
pub struct IpGuard {
    hub: Arc<Hub>,
    ip: IpAddr,
}

impl Drop for IpGuard {
    fn drop(&mut self) {
        let mut m = self.hub.ip_counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// Serialise a server frame once for any number of recipients.
pub fn encode(msg: &ServerMsg) -> Utf8Bytes {
    // Serialising these plain structs cannot fail (no maps with non-string keys).
    Utf8Bytes::from(serde_json::to_string(msg).unwrap_or_else(|_| String::from("{}")))
}

fn status_of(v: u8) -> PresenceStatus {
    if v == 1 {
        PresenceStatus::Away
    } else {
        PresenceStatus::Online
    }
}

impl Hub {
    /// Take one connection slot for `ip`, or None when it already has `limit`.
    pub fn acquire_ip(self: &Arc<Self>, ip: IpAddr, limit: u32) -> Option<IpGuard> {
        let mut m = self.ip_counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(IpGuard {
            hub: self.clone(),
            ip,
        })
    }

    /// A fresh connection id.
    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Register a session; an older session of the same user and device is closed.
    /// Returns true when this is the user's first session on this node.
    pub fn register(&self, user: &str, s: LocalSession) -> bool {
        let mut m = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let list = m.entry(user.to_owned()).or_default();
        let first = list.is_empty();
        list.retain(|old| {
            if old.device == s.device {
                old.ctl
                    .close(CLOSE_REPLACED, "replaced by a newer session of this device");
                false
            } else {
                true
            }
        });
        list.push(s);
        first
    }

    /// Remove a session; returns true when the user has no session left on this node.
    pub fn unregister(&self, user: &str, conn_id: u64) -> bool {
        let mut m = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let Some(list) = m.get_mut(user) else {
            return false;
        };
        let before = list.len();
        list.retain(|s| s.conn_id != conn_id);
        let removed = list.len() != before;
        if list.is_empty() {
            m.remove(user);
            return removed;
        }
        false
    }

    /// Sessions of `user` on this node.
    pub fn sessions_of(&self, user: &str) -> Vec<LocalSession> {
        let m = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        m.get(user).cloned().unwrap_or_default()
    }

    /// Whether `user`/`device` has a session here.
    pub fn has_device(&self, user: &str, device: &str) -> bool {
        self.sessions_of(user).iter().any(|s| s.device == device)
    }

    /// Presence of `user` as seen on this node.
    pub fn local_presence(&self, user: &str) -> PresenceStatus {
        let list = self.sessions_of(user);
        if list.is_empty() {
            PresenceStatus::Offline
        } else if list
            .iter()
            .any(|s| status_of(s.status.load(Ordering::Relaxed)) == PresenceStatus::Online)
        {
            PresenceStatus::Online
        } else {
            PresenceStatus::Away
        }
    }

    /// Queue a frame to one session; a full queue closes it as a slow consumer.
    pub fn push(&self, s: &LocalSession, frame: Utf8Bytes, metrics: &Metrics) -> bool {
        match s.tx.try_send(frame) {
            Ok(()) => {
                Metrics::inc(&metrics.frames_out_total);
                true
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                if !s.ctl.is_closed() {
                    Metrics::inc(&metrics.slow_consumer_closes_total);
                }
                s.ctl
                    .close(CLOSE_POLICY, "slow consumer: outbound queue full");
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Send to every local device of `user` except `except_device`; returns how many got it.
    pub fn send_user(
        &self,
        user: &str,
        except_device: Option<&str>,
        msg: &ServerMsg,
        metrics: &Metrics,
    ) -> u32 {
        let frame = encode(msg);
        let mut n = 0;
        for s in self.sessions_of(user) {
            if Some(s.device.as_str()) == except_device {
                continue;
            }
            if self.push(&s, frame.clone(), metrics) {
                n += 1;
            }
        }
        n
    }

    /// Send to one local device; false if it is not here or its queue is full.
    pub fn send_device(
        &self,
        user: &str,
        device: &str,
        msg: &ServerMsg,
        metrics: &Metrics,
    ) -> bool {
        let frame = encode(msg);
        self.sessions_of(user)
            .iter()
            .filter(|s| s.device == device)
            .any(|s| self.push(s, frame.clone(), metrics))
    }

    /// Wake every local session of `user` to read new messages from the store.
    pub fn notify_inbox(&self, user: &str) {
        for s in self.sessions_of(user) {
            s.inbox.notify_one();
        }
    }

    /// (user, device, status) of every local session (for republishing presence).
    pub fn all_sessions_by_user(&self) -> Vec<(String, String, PresenceStatus)> {
        let m = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        m.iter()
            .flat_map(|(u, l)| {
                l.iter().map(move |s| {
                    (
                        u.clone(),
                        s.device.clone(),
                        status_of(s.status.load(Ordering::Relaxed)),
                    )
                })
            })
            .collect()
    }

    /// Every local session (for shutdown).
    pub fn all_sessions(&self) -> Vec<LocalSession> {
        let m = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        m.values().flatten().cloned().collect()
    }

    /// Remember that `call` is arbitrated by the node at `url`.
    pub fn set_route(&self, call: &CallId, url: &str, now: Instant) {
        let mut m = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() > 100_000 {
            // Bound the table: routes older than a day are stale.
            m.retain(|_, r| now.duration_since(r.since).as_secs() < 86_400);
        }
        let r = m.entry(call.clone()).or_insert_with(|| Route {
            arbiter: String::new(),
            since: now,
            answered_by: None,
        });
        url.clone_into(&mut r.arbiter);
    }

    /// The arbiter node URL of a call learned from another node.
    pub fn route(&self, call: &CallId) -> Option<String> {
        self.routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(call)
            .map(|r| r.arbiter.clone())
    }

    /// Record that a local device answered a call arbitrated elsewhere.
    pub fn mark_answered(&self, call: &CallId, user: &str, device: &str) {
        if let Some(r) = self
            .routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(call)
        {
            r.answered_by = Some((user.to_owned(), device.to_owned()));
        }
    }

    /// Calls arbitrated elsewhere that `user`/`device` answered: (call, arbiter URL).
    pub fn answered_by(&self, user: &str, device: &str) -> Vec<(CallId, String)> {
        self.routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, r)| {
                r.answered_by
                    .as_ref()
                    .is_some_and(|(u, d)| u == user && d == device)
            })
            .map(|(c, r)| (c.clone(), r.arbiter.clone()))
            .collect()
    }

    /// Forget a call route.
    pub fn drop_route(&self, call: &CallId) {
        self.routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(call);
    }
}
