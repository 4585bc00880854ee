//! Call signaling: invite -> ringing -> accept / decline / cancel / ring timeout -> hangup, with
//! trickled candidates. The node that received the invite arbitrates the call (it alone
//! decides who answered first); callee frames reach it directly or forwarded from the
//! callee's node.
//!
//! Call grace: when the session of a party of an accepted call (its caller device, or the
//! device that answered) ends without a hangup, the device is marked *away* on the node it was
//! connected to for `call_grace` instead of ending its calls. Frames for an away device
//! (candidates, `ice_restart`, `call_ended`, ...) are queued, bounded, and handed to its next
//! session on this node; when the grace runs out first, its calls end as `disconnected`.
//! Ringing calls it placed are cancelled at once, as are all its calls when the grace is 0 or
//! the node is shutting down.
//!
//! Here: the call table and its arbitration (invite, answer, restart, hangup, ring timeout)
//! and the delivery of their effects; in `validate`, the checks of descriptions and
//! candidates; in `grace`, what happens when a party's session ends.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::Ordering;

use tokio::task::AbortHandle;

mod grace;
mod validate;

pub use grace::{deliver_device, end_graces_now, on_disconnect, on_reconnect};
use validate::{check_candidate, check_desc};

use crate::auth::normalize_username;
use crate::cluster::{CallForward, DeliverRequest, Party};
use crate::state::AppState;
use peerlink_api::signaling::{CallId, ClientMsg, EndReason, ErrorCode, ServerMsg, SessionDesc};

/// Most calls one user may have ringing or active at once (as caller).
pub const MAX_CALLS_PER_CALLER: usize = 8;
/// Longest `req` correlation token.
const MAX_REQ_LEN: usize = 64;

#[derive(Debug)]
enum CallState {
    Ringing,
    Active(Party),
}

#[derive(Debug)]
struct Call {
    caller: Party,
    callee: String,
    state: CallState,
    timer: Option<AbortHandle>,
    caller_candidates: usize,
    callee_candidates: usize,
    /// Public keys of the offer and the answer: an ICE restart must keep its party's key.
    caller_key: String,
    callee_key: String,
}

/// Most frames queued for one away device; older ones are dropped first.
pub const MAX_AWAY_QUEUE: usize = 64;

/// A device of this node whose session dropped during an accepted call (see the module doc).
#[derive(Debug)]
struct Away {
    /// Distinguishes successive disconnects of the same device (a stale timer does nothing).
    generation: u64,
    timer: AbortHandle,
    queued: VecDeque<ServerMsg>,
}

/// Calls arbitrated by this node, and this node's devices inside their call grace.
#[derive(Default)]
pub struct Calls {
    map: Mutex<HashMap<CallId, Call>>,
    away: Mutex<HashMap<(String, String), Away>>,
    next_generation: std::sync::atomic::AtomicU64,
}

impl Calls {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<CallId, Call>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn lock_away(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Away>> {
        self.away.lock().unwrap_or_else(|p| p.into_inner())
    }
    /// Whether `user`/`device` is inside its call grace on this node.
    pub fn is_away(&self, user: &str, device: &str) -> bool {
        self.lock_away()
            .contains_key(&(user.to_owned(), device.to_owned()))
    }
    /// Whether this node arbitrates `id`.
    pub fn contains(&self, id: &CallId) -> bool {
        self.lock().contains_key(id)
    }
    /// Number of calls arbitrated here.
    pub fn len(&self) -> usize {
        self.lock().len()
    }
    /// The session of `party` in call `id` is now on `node` (None = this node).
    fn move_party(&self, id: &CallId, party: &Party, node: Option<String>) {
        if let Some(c) = self.lock().get_mut(id) {
            if c.caller == *party {
                c.caller.node = node;
            } else if let CallState::Active(p) = &mut c.state
                && p == party
            {
                p.node = node;
            }
        }
    }
    /// Whether no call is arbitrated here.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

enum Target {
    Party(Party),
    User {
        user: String,
        except_device: Option<String>,
    },
}

struct Effect {
    to: Target,
    msg: ServerMsg,
}

/// An `error` frame.
pub fn err(code: ErrorCode, message: impl Into<String>, id: Option<String>) -> ServerMsg {
    ServerMsg::Error {
        code,
        message: message.into(),
        id,
    }
}

/// The call a call frame refers to.
pub fn call_id_of(msg: &ClientMsg) -> Option<&CallId> {
    match msg {
        ClientMsg::Ringing { call_id }
        | ClientMsg::Accept { call_id, .. }
        | ClientMsg::Decline { call_id }
        | ClientMsg::Cancel { call_id }
        | ClientMsg::Hangup { call_id }
        | ClientMsg::Candidate { call_id, .. }
        | ClientMsg::EndOfCandidates { call_id }
        | ClientMsg::IceRestart { call_id, .. } => Some(call_id),
        _ => None,
    }
}

/// Handle a call frame from a session on this node; returns frames for the sender.
pub async fn client_msg(st: &AppState, from: Party, msg: ClientMsg) -> Vec<ServerMsg> {
    if let ClientMsg::Invite {
        to,
        from: claimed,
        req,
        offer,
    } = msg
    {
        return invite(st, from, to, claimed, req, offer).await;
    }
    let Some(id) = call_id_of(&msg).cloned() else {
        return vec![err(ErrorCode::Invalid, "not a call message", None)];
    };
    if st.calls.contains(&id) {
        return arbitrate(st, from, msg).await;
    }
    if let (Some(url), Some(cluster)) = (st.hub.route(&id), st.cluster.as_ref()) {
        crate::metrics::Metrics::inc(&st.metrics.forwards_total);
        let fwd = CallForward {
            from: Party {
                node: Some(cluster.internal_url.clone()),
                ..from
            },
            msg,
            gone: false,
        };
        let accept = matches!(fwd.msg, ClientMsg::Accept { .. });
        return match cluster.forward_call(&url, &fwd).await {
            Ok(replies) => {
                if accept && !replies.iter().any(|r| matches!(r, ServerMsg::Error { .. })) {
                    st.hub.mark_answered(&id, &fwd.from.user, &fwd.from.device);
                }
                replies
            }
            Err(e) => {
                crate::metrics::Metrics::inc(&st.metrics.forward_errors_total);
                vec![err(
                    ErrorCode::Internal,
                    format!("call's node unreachable: {e}"),
                    None,
                )]
            }
        };
    }
    vec![err(ErrorCode::NoSuchCall, format!("no call {id}"), None)]
}

async fn invite(
    st: &AppState,
    from: Party,
    to: String,
    claimed: Option<String>,
    req: Option<String>,
    offer: SessionDesc,
) -> Vec<ServerMsg> {
    if claimed.as_ref().is_some_and(|c| *c != from.user) {
        return vec![err(
            ErrorCode::ForgedFrom,
            "`from` must be the authenticated user",
            req,
        )];
    }
    if req.as_ref().is_some_and(|r| r.len() > MAX_REQ_LEN) {
        return vec![err(
            ErrorCode::Invalid,
            "req longer than 64 characters",
            None,
        )];
    }
    let Ok(callee) = normalize_username(&to) else {
        return vec![err(ErrorCode::NoSuchUser, "no such user", req)];
    };
    if callee == from.user {
        return vec![err(ErrorCode::Invalid, "cannot call yourself", req)];
    }
    if let Err((code, message)) = check_desc(st, &offer) {
        return vec![err(code, message, req)];
    }
    let c2 = callee.clone();
    match st.db.call(move |s| s.user_exists(&c2)).await {
        Ok(true) => {}
        Ok(false) => return vec![err(ErrorCode::NoSuchUser, "no such user", req)],
        Err(e) => return vec![err(ErrorCode::Internal, e.to_string(), req)],
    }
    let call_id = CallId::from_bytes(rand::random());
    {
        let mut map = st.calls.lock();
        let mine = map.values().filter(|c| c.caller.user == from.user).count();
        if mine >= MAX_CALLS_PER_CALLER {
            return vec![err(ErrorCode::NotAllowed, "too many calls at once", req)];
        }
        map.insert(
            call_id.clone(),
            Call {
                caller: from.clone(),
                callee: callee.clone(),
                state: CallState::Ringing,
                timer: None,
                caller_candidates: offer.candidates.len(),
                callee_candidates: 0,
                caller_key: offer.public_key.clone(),
                callee_key: String::new(),
            },
        );
    }
    crate::metrics::Metrics::inc(&st.metrics.calls_total);
    st.metrics.calls_open.fetch_add(1, Ordering::Relaxed);
    let incoming = ServerMsg::IncomingCall {
        call_id: call_id.clone(),
        from: from.user.clone(),
        from_device: from.device.clone(),
        offer,
    };
    let n = perform(
        st,
        vec![Effect {
            to: Target::User {
                user: callee.clone(),
                except_device: None,
            },
            msg: incoming,
        }],
    )
    .await;
    if n == 0
        && let Some(c) = st.cluster.as_ref()
        && c.lookup_fails(&callee).await
    {
        // Not "unavailable": the callee may well be online on another node.
        remove(st, &call_id);
        return vec![err(
            ErrorCode::Internal,
            "the directory cannot be reached, so the callee's devices cannot be found; try again",
            req,
        )];
    }
    let mut out = vec![ServerMsg::InviteSent {
        req,
        call_id: call_id.clone(),
        devices: n,
    }];
    if n == 0 {
        if remove(st, &call_id).is_some() {
            out.push(ServerMsg::CallEnded {
                call_id,
                reason: EndReason::Unavailable,
            });
        }
        return out;
    }
    let st2 = st.clone();
    let id2 = call_id.clone();
    let timeout = st.cfg.ring_timeout;
    let handle = tokio::spawn(async move {
        tokio::time::sleep(timeout).await;
        ring_timeout(&st2, &id2).await;
    })
    .abort_handle();
    match st.calls.lock().get_mut(&call_id) {
        Some(c) if matches!(c.state, CallState::Ringing) => c.timer = Some(handle),
        _ => handle.abort(),
    }
    out
}

fn remove(st: &AppState, id: &CallId) -> Option<Call> {
    let c = st.calls.lock().remove(id);
    if let Some(c) = &c {
        st.metrics.calls_open.fetch_sub(1, Ordering::Relaxed);
        if let Some(t) = &c.timer {
            t.abort();
        }
    }
    c
}

async fn ring_timeout(st: &AppState, id: &CallId) {
    let call = {
        let mut map = st.calls.lock();
        match map.get(id) {
            Some(c) if matches!(c.state, CallState::Ringing) => map.remove(id),
            _ => None,
        }
    };
    let Some(call) = call else { return };
    st.metrics.calls_open.fetch_sub(1, Ordering::Relaxed);
    let ended = ServerMsg::CallEnded {
        call_id: id.clone(),
        reason: EndReason::Timeout,
    };
    perform(
        st,
        vec![
            Effect {
                to: Target::Party(call.caller),
                msg: ended.clone(),
            },
            Effect {
                to: Target::User {
                    user: call.callee,
                    except_device: None,
                },
                msg: ended,
            },
        ],
    )
    .await;
}

/// Process a call frame on the arbitrating node; returns frames for the sender.
pub async fn arbitrate(st: &AppState, from: Party, msg: ClientMsg) -> Vec<ServerMsg> {
    let Some(id) = call_id_of(&msg).cloned() else {
        return vec![err(ErrorCode::Invalid, "not a call message", None)];
    };
    // Validate candidate payloads before touching state.
    match &msg {
        ClientMsg::Accept { answer: d, .. } | ClientMsg::IceRestart { desc: d, .. } => {
            if let Err((code, message)) = check_desc(st, d) {
                return vec![err(code, message, None)];
            }
        }
        ClientMsg::Candidate { candidate, .. } => {
            if let Err((code, message)) = check_candidate(st, candidate) {
                return vec![err(code, message, None)];
            }
        }
        _ => {}
    }
    let max_cands = st.cfg.max_candidates;
    let (effects, replies) = {
        let mut map = st.calls.lock();
        let Some(call) = map.get_mut(&id) else {
            return vec![err(ErrorCode::NoSuchCall, format!("no call {id}"), None)];
        };
        let is_caller = from.user == call.caller.user && from.device == call.caller.device;
        let is_callee = !is_caller && from.user == call.callee;
        let is_answerer = matches!(&call.state, CallState::Active(p) if p.user == from.user && p.device == from.device);
        if !is_caller && !is_callee {
            return vec![err(ErrorCode::NotAllowed, "not a party of this call", None)];
        }
        let callee_all = |except: Option<String>| Target::User {
            user: call.callee.clone(),
            except_device: except,
        };
        let mut fx = Vec::new();
        let mut end = false;
        match (msg, &call.state) {
            (ClientMsg::Ringing { .. }, CallState::Ringing) if is_callee => {
                fx.push(Effect {
                    to: Target::Party(call.caller.clone()),
                    msg: ServerMsg::Ringing {
                        call_id: id.clone(),
                        device: from.device.clone(),
                    },
                });
            }
            (ClientMsg::Accept { answer, .. }, CallState::Ringing) if is_callee => {
                call.callee_candidates = answer.candidates.len();
                call.callee_key.clone_from(&answer.public_key);
                call.state = CallState::Active(from.clone());
                if let Some(t) = call.timer.take() {
                    t.abort();
                }
                fx.push(Effect {
                    to: Target::Party(call.caller.clone()),
                    msg: ServerMsg::CallAccepted {
                        call_id: id.clone(),
                        device: from.device.clone(),
                        answer,
                    },
                });
                fx.push(Effect {
                    to: callee_all(Some(from.device.clone())),
                    msg: ServerMsg::AnsweredElsewhere {
                        call_id: id.clone(),
                    },
                });
            }
            (ClientMsg::Decline { .. } | ClientMsg::Hangup { .. }, CallState::Ringing)
                if is_callee =>
            {
                let ended = ServerMsg::CallEnded {
                    call_id: id.clone(),
                    reason: EndReason::Declined,
                };
                fx.push(Effect {
                    to: Target::Party(call.caller.clone()),
                    msg: ended.clone(),
                });
                fx.push(Effect {
                    to: callee_all(Some(from.device.clone())),
                    msg: ended,
                });
                end = true;
            }
            (ClientMsg::Cancel { .. } | ClientMsg::Hangup { .. }, CallState::Ringing)
                if is_caller =>
            {
                let ended = ServerMsg::CallEnded {
                    call_id: id.clone(),
                    reason: EndReason::Cancelled,
                };
                fx.push(Effect {
                    to: callee_all(None),
                    msg: ended,
                });
                end = true;
            }
            (ClientMsg::Hangup { .. }, CallState::Active(callee)) if is_caller || is_answerer => {
                let other = if is_caller {
                    callee.clone()
                } else {
                    call.caller.clone()
                };
                fx.push(Effect {
                    to: Target::Party(other),
                    msg: ServerMsg::CallEnded {
                        call_id: id.clone(),
                        reason: EndReason::Hangup,
                    },
                });
                end = true;
            }
            (ClientMsg::Candidate { candidate, .. }, state) if is_caller || is_answerer => {
                let count = if is_caller {
                    &mut call.caller_candidates
                } else {
                    &mut call.callee_candidates
                };
                if *count >= max_cands {
                    return vec![err(
                        ErrorCode::TooManyCandidates,
                        format!("at most {max_cands} candidates per party"),
                        None,
                    )];
                }
                *count += 1;
                let to = match (is_caller, state) {
                    (true, CallState::Ringing) => callee_all(None),
                    (true, CallState::Active(p)) => Target::Party(p.clone()),
                    (false, _) => Target::Party(call.caller.clone()),
                };
                fx.push(Effect {
                    to,
                    msg: ServerMsg::Candidate {
                        call_id: id.clone(),
                        candidate,
                    },
                });
            }
            (ClientMsg::EndOfCandidates { .. }, state) if is_caller || is_answerer => {
                let to = match (is_caller, state) {
                    (true, CallState::Ringing) => callee_all(None),
                    (true, CallState::Active(p)) => Target::Party(p.clone()),
                    (false, _) => Target::Party(call.caller.clone()),
                };
                fx.push(Effect {
                    to,
                    msg: ServerMsg::EndOfCandidates {
                        call_id: id.clone(),
                    },
                });
            }
            (ClientMsg::IceRestart { desc, .. }, CallState::Active(callee))
                if is_caller || is_answerer =>
            {
                // A restart begins a new candidate generation for the restarting party; its
                // key (which the media keys derive from) stays the one of the offer/answer.
                let (count, key, other) = if is_caller {
                    (
                        &mut call.caller_candidates,
                        &call.caller_key,
                        callee.clone(),
                    )
                } else {
                    (
                        &mut call.callee_candidates,
                        &call.callee_key,
                        call.caller.clone(),
                    )
                };
                if desc.public_key != *key {
                    return vec![err(
                        ErrorCode::Invalid,
                        "an ICE restart must keep the public key of the offer/answer",
                        None,
                    )];
                }
                *count = desc.candidates.len();
                fx.push(Effect {
                    to: Target::Party(other),
                    msg: ServerMsg::IceRestart {
                        call_id: id.clone(),
                        desc,
                    },
                });
            }
            (ClientMsg::Accept { .. }, CallState::Active(_)) => {
                return vec![err(
                    ErrorCode::NoSuchCall,
                    format!("call {id} was already answered"),
                    None,
                )];
            }
            _ => {
                return vec![err(
                    ErrorCode::NotAllowed,
                    format!("not allowed in this state of call {id}"),
                    None,
                )];
            }
        }
        if end && let Some(c) = map.remove(&id) {
            {
                st.metrics.calls_open.fetch_sub(1, Ordering::Relaxed);
                if let Some(t) = c.timer {
                    t.abort();
                }
            }
        }
        (fx, Vec::new())
    };
    perform(st, effects).await;
    replies
}

/// On the arbiter: the session of `from` (on another node) ended; end call `id` if `from` is
/// its caller or answering callee, telling the other party `disconnected`.
pub async fn remote_party_gone(st: &AppState, from: Party, id: CallId) {
    let other = {
        let mut map = st.calls.lock();
        let Some(c) = map.get(&id) else { return };
        let same =
            |p: &Party| p.user == from.user && p.device == from.device && p.node == from.node;
        let other = match &c.state {
            CallState::Active(callee) if same(callee) => Target::Party(c.caller.clone()),
            CallState::Active(callee) if same(&c.caller) => Target::Party(callee.clone()),
            CallState::Ringing if same(&c.caller) => Target::User {
                user: c.callee.clone(),
                except_device: None,
            },
            _ => return,
        };
        if let Some(c) = map.remove(&id) {
            st.metrics.calls_open.fetch_sub(1, Ordering::Relaxed);
            if let Some(t) = c.timer {
                t.abort();
            }
        }
        other
    };
    let ended = ServerMsg::CallEnded {
        call_id: id,
        reason: EndReason::Disconnected,
    };
    perform(
        st,
        vec![Effect {
            to: other,
            msg: ended,
        }],
    )
    .await;
}

/// Whether a frame of call `call` no longer needs to arrive: the call has ended here. A frame
/// of no call (or the call's end itself, sent after the call is gone) is never moot.
fn moot(st: &AppState, call: Option<&CallId>) -> bool {
    call.is_some_and(|id| !st.calls.contains(id) && st.hub.route(id).is_none())
}

/// The call a server frame belongs to, unless it is the call's end (which must arrive even
/// though the call is gone by then).
fn call_id_of_server(msg: &ServerMsg) -> Option<&CallId> {
    match msg {
        ServerMsg::IncomingCall { call_id, .. }
        | ServerMsg::Ringing { call_id, .. }
        | ServerMsg::CallAccepted { call_id, .. } => Some(call_id),
        _ => None,
    }
}

/// Deliver effects locally or through other nodes (retried, see
/// [`crate::cluster::Cluster::deliver_reliably`]); returns how many sessions got them.
/// A frame for `party` could not reach its node at `failed` (the node died, say): when the
/// directory has the device on another node now (it reconnected there), or on this one, the
/// frame goes there, and the call remembers the new node. Returns the sessions reached.
async fn redeliver(
    st: &AppState,
    cluster: &crate::cluster::Cluster,
    party: &Party,
    failed: &str,
    mut req: DeliverRequest,
) -> u32 {
    let Some(now_at) = cluster.node_of_device(&party.user, &party.device).await else {
        return 0;
    };
    if now_at.as_deref() == Some(failed) {
        return 0;
    }
    if let Some(id) = call_id_of_server(&req.msg).or(match &req.msg {
        ServerMsg::CallEnded { call_id, .. } => Some(call_id),
        _ => None,
    }) {
        st.calls.move_party(id, party, now_at.clone());
    }
    tracing::info!(
        user = %party.user,
        device = %party.device,
        node = now_at.as_deref().unwrap_or("this node"),
        "call party moved to another node"
    );
    match now_at {
        None => u32::from(deliver_device(st, &party.user, &party.device, &req.msg)),
        Some(url) => {
            req.id = None;
            cluster
                .deliver_reliably(&url, req, || false)
                .await
                .unwrap_or_else(|e| {
                    crate::metrics::Metrics::inc(&st.metrics.forward_errors_total);
                    tracing::warn!(error = %e, "delivery to the party's new node failed");
                    0
                })
        }
    }
}

async fn perform(st: &AppState, effects: Vec<Effect>) -> u32 {
    let mut total = 0;
    let arbiter = st.cluster.as_ref().map(|c| c.internal_url.clone());
    for e in effects {
        match e.to {
            Target::Party(p) => match &p.node {
                None => total += u32::from(deliver_device(st, &p.user, &p.device, &e.msg)),
                Some(url) => {
                    let Some(cluster) = st.cluster.as_ref() else {
                        continue;
                    };
                    let call = call_id_of_server(&e.msg).cloned();
                    let req = DeliverRequest {
                        user: p.user.clone(),
                        device: Some(p.device.clone()),
                        except_device: None,
                        msg: e.msg,
                        arbiter: arbiter.clone(),
                        id: None,
                    };
                    crate::metrics::Metrics::inc(&st.metrics.forwards_total);
                    match cluster
                        .deliver_reliably(url, req.clone(), || moot(st, call.as_ref()))
                        .await
                    {
                        Ok(n) => total += n,
                        Err(err) => {
                            crate::metrics::Metrics::inc(&st.metrics.forward_errors_total);
                            tracing::warn!(error = %err, "delivery to another node failed");
                            total += redeliver(st, cluster, &p, url, req).await;
                        }
                    }
                }
            },
            Target::User {
                user,
                except_device,
            } => {
                total += st
                    .hub
                    .send_user(&user, except_device.as_deref(), &e.msg, &st.metrics);
                if let Some(cluster) = st.cluster.as_ref() {
                    for url in cluster.nodes_of(&user).await {
                        let call = call_id_of_server(&e.msg).cloned();
                        let req = DeliverRequest {
                            user: user.clone(),
                            device: None,
                            except_device: except_device.clone(),
                            msg: e.msg.clone(),
                            arbiter: arbiter.clone(),
                            id: None,
                        };
                        crate::metrics::Metrics::inc(&st.metrics.forwards_total);
                        match cluster
                            .deliver_reliably(&url, req, || moot(st, call.as_ref()))
                            .await
                        {
                            Ok(n) => total += n,
                            Err(err) => {
                                crate::metrics::Metrics::inc(&st.metrics.forward_errors_total);
                                tracing::warn!(error = %err, "delivery to another node failed");
                            }
                        }
                    }
                }
            }
        }
    }
    total
}
