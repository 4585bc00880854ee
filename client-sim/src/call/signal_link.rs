//! The call's link to signaling: frames held while the WebSocket is down, reconnects with
//! backoff inside the signaling grace, and what is sent again once it is back.

use super::*;

/// Bound on one signaling write during a call (a dead socket must not stall media).
pub(super) const SIG_WRITE: Duration = Duration::from_secs(2);

/// The attempt's outcome (pending forever without one).
pub(super) async fn reopened(
    r: Option<&mut Reopening>,
) -> Result<Result<Reopened, SignalError>, tokio::time::error::Elapsed> {
    match r {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// Whether a signaling failure is final: this device was replaced by a newer session.
pub(super) fn signal_fatal(e: &SignalError) -> bool {
    matches!(e, SignalError::Closed { code: 4001, .. })
}

impl Leg {
    /// Send a frame to signaling; while it is down (or if the write fails, which marks it
    /// down) the frame is queued for the reconnect.
    pub(super) async fn signal(&mut self, sess: &mut SignalSession, msg: ClientMsg) {
        if self.rec.signal_down() {
            self.sig_outbox.push(msg);
            return;
        }
        let err = match tokio::time::timeout(SIG_WRITE, sess.send(&msg)).await {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("write timed out after {SIG_WRITE:?}"),
        };
        self.signal_lost(err, Instant::now());
        self.sig_outbox.push(msg);
    }

    /// Signaling failed: reconnect from `retry_at` on (no-op if already down).
    pub(super) fn signal_lost(&mut self, why: String, retry_at: Instant) {
        let text = why.clone();
        if self.rec.on_signal_lost(Instant::now(), retry_at, why) {
            tracing::warn!("signaling lost mid-call ({text}); reconnecting");
            self.emit(CallEvent::Signaling { up: false });
        }
    }

    /// A reconnect attempt failed: try again after the backoff.
    pub(super) fn reconnect_failed(&mut self, why: String) {
        tracing::info!("signaling reconnect failed: {why}");
        self.rec.on_reconnect_failed(Instant::now(), why);
    }

    /// The attempt's outcome, installed when it worked.
    pub(super) async fn reconnected(
        &mut self,
        sess: &mut SignalSession,
        r: Result<Result<Reopened, SignalError>, tokio::time::error::Elapsed>,
        bound: Duration,
    ) {
        match r {
            Ok(Ok(r)) => {
                sess.install(r);
                self.signal_restored(sess).await;
            }
            Ok(Err(e)) => self.reconnect_failed(e.to_string()),
            Err(_) => self.reconnect_failed(format!("attempt timed out after {bound:?}")),
        }
    }

    /// The new connection is installed: send what was queued; an unanswered restart of ours
    /// goes out again shortly unless it was among the queued frames.
    async fn signal_restored(&mut self, sess: &mut SignalSession) {
        let queued = std::mem::take(&mut self.sig_outbox);
        let had_restart = queued
            .iter()
            .any(|m| matches!(m, ClientMsg::IceRestart { .. }));
        self.rec.on_signal_restored(Instant::now(), had_restart);
        tracing::info!("signaling reconnected (#{})", self.rec.reconnects());
        self.emit(CallEvent::Signaling { up: true });
        for m in queued {
            self.signal(sess, m).await;
        }
    }

    /// Opens signaling again, blocking (media pauses), until it works or the grace ends.
    pub(super) async fn restore_signal_now(&mut self, sess: &mut SignalSession) -> bool {
        // An attempt the call loop had started went with it.
        self.rec.on_reconnect_abandoned();
        while self.rec.signal_down() {
            match self.rec.poll_signal(Instant::now()) {
                SignalNext::Lost => return false,
                SignalNext::Reconnect(bound) => {
                    let r = tokio::time::timeout(bound, sess.reopen()).await;
                    self.reconnected(sess, r, bound).await;
                }
                _ => {
                    if let Some(t) = self.rec.signal_timeout() {
                        tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await;
                    }
                }
            }
        }
        true
    }
}
