//! A device's session ends during a call: the call grace (frames for an away device are
//! queued until it reconnects or the grace runs out), and ending the calls of a device that
//! is gone.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;

use peerlink_api::signaling::{CallId, ClientMsg, EndReason, ServerMsg};

use super::{Away, CallState, Effect, MAX_AWAY_QUEUE, Target, perform};
use crate::cluster::{CallForward, Party};
use crate::state::AppState;

/// Deliver `msg` to the session of `user`/`device` on this node, or queue it while that device
/// is inside its call grace. Returns whether it was delivered or queued.
pub fn deliver_device(st: &AppState, user: &str, device: &str, msg: &ServerMsg) -> bool {
    let mut away = st.calls.lock_away();
    if let Some(a) = away.get_mut(&(user.to_owned(), device.to_owned())) {
        if a.queued.len() >= MAX_AWAY_QUEUE {
            a.queued.pop_front();
        }
        a.queued.push_back(msg.clone());
        return true;
    }
    // Sent under the lock, so frames queued before a reconnect stay ahead of later ones.
    st.hub.send_device(user, device, msg, &st.metrics)
}

/// Whether `user`/`device` (connected here) is a party of an accepted call: one this node
/// arbitrates, or one it answered that another node arbitrates.
fn in_accepted_call(st: &AppState, user: &str, device: &str) -> bool {
    let here = st.calls.lock().values().any(|c| {
        matches!(&c.state, CallState::Active(p) if
            (p.user == user && p.device == device && p.node.is_none())
            || (c.caller.user == user && c.caller.device == device && c.caller.node.is_none()))
    });
    here || !st.hub.answered_by(user, device).is_empty()
}

/// A session of `user`/`device` on this node ended (and no newer one of the device is here).
/// With a call grace and an accepted call, the device becomes *away* (see the module doc) and
/// only the invites it placed that still ring are cancelled; otherwise its calls end now.
pub async fn on_disconnect(st: &AppState, user: &str, device: &str) {
    let grace = st.cfg.call_grace;
    if grace.is_zero() || st.is_draining() || !in_accepted_call(st, user, device) {
        end_calls(st, user, device, false).await;
        return;
    }
    end_calls(st, user, device, true).await;
    let key = (user.to_owned(), device.to_owned());
    let generation = st.calls.next_generation.fetch_add(1, Ordering::Relaxed);
    {
        // Spawned under the lock: the timer cannot look for the entry before it exists.
        let mut away = st.calls.lock_away();
        let (st2, u, d) = (st.clone(), user.to_owned(), device.to_owned());
        let timer = tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            grace_expired(&st2, &u, &d, generation).await;
        })
        .abort_handle();
        let queued = match away.remove(&key) {
            Some(old) => {
                old.timer.abort();
                old.queued
            }
            None => VecDeque::new(),
        };
        away.insert(
            key,
            Away {
                generation,
                timer,
                queued,
            },
        );
    }
    tracing::info!(
        ?grace,
        "call party disconnected; keeping its calls for the grace"
    );
    // The device may have reconnected while the entry was being made.
    if st.hub.has_device(user, device) {
        on_reconnect(st, user, device);
    }
}

/// A session of `user`/`device` registered on this node: if the device was inside its call
/// grace, its calls continue and the frames queued meanwhile go to the new session.
pub fn on_reconnect(st: &AppState, user: &str, device: &str) {
    let mut away = st.calls.lock_away();
    let Some(a) = away.remove(&(user.to_owned(), device.to_owned())) else {
        return;
    };
    a.timer.abort();
    crate::metrics::Metrics::inc(&st.metrics.call_grace_resumed_total);
    tracing::info!(
        queued = a.queued.len(),
        "call party reconnected within the grace"
    );
    for m in &a.queued {
        st.hub.send_device(user, device, m, &st.metrics);
    }
}

async fn grace_expired(st: &AppState, user: &str, device: &str, generation: u64) {
    {
        let mut away = st.calls.lock_away();
        let key = (user.to_owned(), device.to_owned());
        if away.get(&key).is_none_or(|a| a.generation != generation) {
            return;
        }
        let Some(a) = away.remove(&key) else { return };
        if st.hub.has_device(user, device) {
            // Back, but its registration raced with this timer: hand over as on reconnect.
            crate::metrics::Metrics::inc(&st.metrics.call_grace_resumed_total);
            for m in &a.queued {
                st.hub.send_device(user, device, m, &st.metrics);
            }
            return;
        }
    }
    crate::metrics::Metrics::inc(&st.metrics.call_grace_expired_total);
    tracing::info!("call grace ran out; ending the calls of the disconnected party");
    end_calls(st, user, device, false).await;
}

/// Shutdown: end at once the calls of every device inside its call grace.
pub async fn end_graces_now(st: &AppState) {
    let gone: Vec<(String, String)> = {
        let mut away = st.calls.lock_away();
        away.drain()
            .map(|(k, a)| {
                a.timer.abort();
                k
            })
            .collect()
    };
    for (user, device) in gone {
        end_calls(st, &user, &device, false).await;
    }
}

/// End the calls `user`/`device` (connected here) is a party of, here and (through their
/// arbiter) calls it answered that another node arbitrates; `only_ringing`: just the invites
/// it placed that still ring.
async fn end_calls(st: &AppState, user: &str, device: &str, only_ringing: bool) {
    let mut fx = Vec::new();
    {
        let mut map = st.calls.lock();
        let ids: Vec<CallId> = map
            .iter()
            .filter(|(_, c)| {
                let ringing = matches!(c.state, CallState::Ringing);
                let caller = c.caller.user == user && c.caller.device == device && c.caller.node.is_none();
                let callee = matches!(&c.state, CallState::Active(p) if p.user == user && p.device == device && p.node.is_none());
                if only_ringing {
                    caller && ringing
                } else {
                    caller || callee
                }
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            let Some(c) = map.remove(&id) else { continue };
            st.metrics.calls_open.fetch_sub(1, Ordering::Relaxed);
            if let Some(t) = &c.timer {
                t.abort();
            }
            let ended = ServerMsg::CallEnded {
                call_id: id.clone(),
                reason: EndReason::Disconnected,
            };
            match c.state {
                CallState::Ringing => fx.push(Effect {
                    to: Target::User {
                        user: c.callee,
                        except_device: None,
                    },
                    msg: ended,
                }),
                CallState::Active(callee) => {
                    let other = if c.caller.user == user && c.caller.device == device {
                        callee
                    } else {
                        c.caller
                    };
                    fx.push(Effect {
                        to: Target::Party(other),
                        msg: ended,
                    });
                }
            }
        }
    }
    perform(st, fx).await;
    if only_ringing {
        return;
    }
    if let Some(cluster) = st.cluster.as_ref() {
        for (id, url) in st.hub.answered_by(user, device) {
            st.hub.drop_route(&id);
            let fwd = CallForward {
                from: Party {
                    user: user.to_owned(),
                    device: device.to_owned(),
                    node: Some(cluster.internal_url.clone()),
                },
                msg: ClientMsg::Hangup { call_id: id },
                gone: true,
            };
            if let Err(e) = cluster.forward_call(&url, &fwd).await {
                tracing::warn!(error = %e, "hangup of a disconnected callee not delivered");
            }
        }
    }
}
