//! Call recovery: when to restart ICE (the peer has gone silent, the agent lost the path),
//! when the call is over (consent expired), and the signaling link's outage (reconnect with
//! backoff inside the grace; after a reconnect, our unanswered restart is sent again and, if
//! still unanswered, made anew).
//!
//! [`Recovery`] is sans-IO: the call loop feeds it what happened (`on_*`, with `now`), asks it
//! what to do ([`Recovery::poll_path`], [`Recovery::poll_signal`]) and when to ask next
//! ([`Recovery::path_timeout`], [`Recovery::signal_timeout`]); sockets, signaling and timers stay in the loop. The unit tests
//! drive it on a virtual clock.

use std::time::{Duration, Instant};

/// First wait between two reconnect attempts (doubles each time, up to [`SIG_BACKOFF_MAX`]).
pub const SIG_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between two reconnect attempts.
pub const SIG_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Bound on one reconnect attempt.
pub const SIG_ATTEMPT: Duration = Duration::from_secs(2);
/// After a reconnect, how long held frames (e.g. the answer to our restart) get to arrive
/// before our unanswered restart is sent again.
pub const RESEND_RESTART_AFTER: Duration = Duration::from_millis(150);
/// After that re-send, how long the peer's answer gets before we restart anew.
pub const RESTART_FOLLOWUP_AFTER: Duration = Duration::from_millis(500);
/// Least silence that restarts a file session (its data may pause; keep-alives every 2 s).
const FILE_SILENCE: Duration = Duration::from_millis(2500);

/// When the peer was last heard, for the silence that starts an ICE restart: its media and
/// reports (`peer_rx`), and in a file session, whose data may pause, also its authenticated
/// consent traffic on our selected pair. In a call the peer's media comes every 20 ms, and
/// checks that still arrive on our selected pair do not prove its media reaches us: the peer
/// may send it on a pair of its own, through a relay that died.
pub fn last_heard(
    peer_rx: Instant,
    selected_pair_rx: Option<Instant>,
    file_session: bool,
) -> Instant {
    match selected_pair_rx {
        Some(t) if file_session => peer_rx.max(t),
        _ => peer_rx,
    }
}

/// What the path needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathNext {
    /// Nothing.
    Fine,
    /// An ICE restart, for this reason.
    Restart(&'static str),
    /// No packet from the peer for the consent timeout: the call is over.
    ConsentExpired,
}

/// What the signaling link needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignalNext {
    /// Nothing.
    Fine,
    /// Still down when the grace ran out: the call is over.
    Lost,
    /// Start a reconnect attempt, bounded by this.
    Reconnect(Duration),
    /// Send our unanswered restart's full description again.
    ResendRestart,
    /// Our re-sent restart is still unanswered: restart anew, for this reason.
    Restart(&'static str),
}

/// The recovery state of one call.
#[derive(Debug)]
pub struct Recovery {
    /// No packet from the peer this long ends the call.
    consent_timeout: Duration,
    /// Silence that starts a restart (in a call).
    restart_after_silence: Duration,
    /// How long signaling may stay down.
    signal_grace: Duration,
    connected: bool,
    last_peer_rx: Option<Instant>,
    last_restart: Option<Instant>,
    /// The agent reported the path lost since the last restart.
    path_lost: bool,
    /// We restarted and wait for the peer's description.
    awaiting_answer: bool,
    restarts: u64,
    resend_restart_at: Option<Instant>,
    restart_followup_at: Option<Instant>,
    /// Signaling went down at this time and is not back yet.
    sig_down: Option<Instant>,
    /// Next reconnect attempt (while down).
    sig_retry_at: Option<Instant>,
    sig_backoff: Duration,
    /// A reconnect attempt is running.
    reconnecting: bool,
    /// Why signaling went down or the last attempt failed.
    sig_err: Option<String>,
    reconnects: u64,
}

impl Recovery {
    /// A call that has not connected yet, signaling up.
    pub fn new(
        consent_timeout: Duration,
        restart_after_silence: Duration,
        signal_grace: Duration,
    ) -> Self {
        Self {
            consent_timeout,
            restart_after_silence,
            signal_grace,
            connected: false,
            last_peer_rx: None,
            last_restart: None,
            path_lost: false,
            awaiting_answer: false,
            restarts: 0,
            resend_restart_at: None,
            restart_followup_at: None,
            sig_down: None,
            sig_retry_at: None,
            sig_backoff: SIG_BACKOFF,
            reconnecting: false,
            sig_err: None,
            reconnects: 0,
        }
    }

    // ---- the path

    /// A path was selected (first, or again after a restart) or changed: the peer counts as
    /// heard.
    pub fn on_path(&mut self, now: Instant) {
        self.connected = true;
        self.last_peer_rx = Some(now);
    }

    /// Media or a report from the peer arrived.
    pub fn on_peer_heard(&mut self, now: Instant) {
        self.last_peer_rx = Some(now);
    }

    /// The agent lost the path.
    pub fn on_path_lost(&mut self) {
        self.path_lost = true;
    }

    /// We sent an ICE restart.
    pub fn on_restart(&mut self, now: Instant) {
        self.path_lost = false;
        self.restarts += 1;
        self.last_restart = Some(now);
        self.awaiting_answer = true;
        self.resend_restart_at = None;
        self.restart_followup_at = None;
    }

    /// The peer's `ice_restart` arrived: whether we must restart too first (it is not the
    /// answer to ours). Call [`on_peer_description`](Self::on_peer_description) after.
    pub fn peer_restart_needs_ours(&self) -> bool {
        !self.awaiting_answer
    }

    /// The peer's restart description was applied: ours, if any, is answered.
    pub fn on_peer_description(&mut self) {
        self.awaiting_answer = false;
    }

    /// Silence that starts a restart: media comes every 20 ms; a file transfer can pause
    /// (QUIC keep-alives and consent checks every 2 s then), so it gets more.
    fn silence_limit(&self, file_session: bool) -> Duration {
        if file_session {
            self.restart_after_silence.max(FILE_SILENCE)
        } else {
            self.restart_after_silence
        }
    }

    /// Least time between two own restarts (a restart needs a moment to validate a path).
    fn restart_backoff(&self) -> Duration {
        self.restart_after_silence.max(Duration::from_millis(500)) * 3 / 2
    }

    /// Whether the path needs a restart, or the call is over. `selected_pair_rx`: when the
    /// agent last heard anything authenticated on the selected pair (see [`last_heard`]).
    pub fn poll_path(
        &self,
        now: Instant,
        selected_pair_rx: Option<Instant>,
        file_session: bool,
    ) -> PathNext {
        let (true, Some(peer_rx)) = (self.connected, self.last_peer_rx) else {
            return PathNext::Fine;
        };
        let silent =
            now.saturating_duration_since(last_heard(peer_rx, selected_pair_rx, file_session));
        if silent >= self.consent_timeout {
            return PathNext::ConsentExpired;
        }
        let backoff_over = self
            .last_restart
            .is_none_or(|t| now.saturating_duration_since(t) >= self.restart_backoff());
        if !backoff_over {
            return PathNext::Fine;
        }
        if self.path_lost {
            return PathNext::Restart("path lost");
        }
        if silent >= self.silence_limit(file_session) {
            return PathNext::Restart("no packets from peer");
        }
        PathNext::Fine
    }

    // ---- signaling

    /// Signaling failed; reconnect from `retry_at` on. False if it was down already.
    pub fn on_signal_lost(&mut self, now: Instant, retry_at: Instant, why: String) -> bool {
        if self.sig_down.is_some() {
            return false;
        }
        self.sig_down = Some(now);
        self.sig_retry_at = Some(retry_at);
        self.sig_backoff = SIG_BACKOFF;
        self.sig_err = Some(why);
        true
    }

    /// A reconnect attempt failed: the next one after the backoff, which doubles.
    pub fn on_reconnect_failed(&mut self, now: Instant, why: String) {
        self.reconnecting = false;
        self.sig_retry_at = Some(now + self.sig_backoff);
        self.sig_backoff = (self.sig_backoff * 2).min(SIG_BACKOFF_MAX);
        self.sig_err = Some(why);
    }

    /// Signaling is back. `restart_queued`: our restart is among the frames held for it (sent
    /// now); otherwise an unanswered restart of ours goes out again shortly.
    pub fn on_signal_restored(&mut self, now: Instant, restart_queued: bool) {
        self.sig_down = None;
        self.sig_retry_at = None;
        self.reconnecting = false;
        self.reconnects += 1;
        if self.awaiting_answer && !restart_queued {
            self.resend_restart_at = Some(now + RESEND_RESTART_AFTER);
        }
    }

    /// When the grace for the current outage runs out (None while signaling is up).
    fn grace_end(&self) -> Option<Instant> {
        self.sig_down.map(|t| t + self.signal_grace)
    }

    /// What the signaling link needs now. A [`SignalNext::Reconnect`] counts as started: its
    /// outcome goes to [`on_signal_restored`](Self::on_signal_restored) or
    /// [`on_reconnect_failed`](Self::on_reconnect_failed).
    pub fn poll_signal(&mut self, now: Instant) -> SignalNext {
        if let Some(end) = self.grace_end() {
            if self.reconnecting {
                return SignalNext::Fine;
            }
            if now >= end {
                return SignalNext::Lost;
            }
            if self.sig_retry_at.is_none_or(|t| now >= t) {
                self.reconnecting = true;
                return SignalNext::Reconnect(SIG_ATTEMPT.min(end - now));
            }
        } else if let Some(t) = self.resend_restart_at
            && now >= t
        {
            self.resend_restart_at = None;
            if self.awaiting_answer {
                self.restart_followup_at = Some(now + RESTART_FOLLOWUP_AFTER);
                return SignalNext::ResendRestart;
            }
        } else if let Some(t) = self.restart_followup_at
            && now >= t
        {
            self.restart_followup_at = None;
            if self.awaiting_answer {
                return SignalNext::Restart("restart unanswered after a signaling reconnect");
            }
        }
        SignalNext::Fine
    }

    /// When [`poll_path`](Self::poll_path) may next have something to say.
    pub fn path_timeout(&self, file_session: bool) -> Option<Instant> {
        let (true, Some(last)) = (self.connected, self.last_peer_rx) else {
            return None;
        };
        let mut t = (last + self.silence_limit(file_session)).min(last + self.consent_timeout);
        if let Some(r) = self.last_restart {
            t = t.min(r + self.restart_backoff());
        }
        Some(t)
    }

    /// When [`poll_signal`](Self::poll_signal) may next have something to say.
    pub fn signal_timeout(&self) -> Option<Instant> {
        let retry = self.sig_retry_at.filter(|_| !self.reconnecting);
        [
            self.grace_end(),
            self.grace_end().and(retry),
            self.resend_restart_at,
            self.restart_followup_at,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// A reconnect attempt was dropped unfinished (the call loop ended).
    pub fn on_reconnect_abandoned(&mut self) {
        self.reconnecting = false;
    }

    // ---- what the call and its report read

    /// Whether signaling is down.
    pub fn signal_down(&self) -> bool {
        self.sig_down.is_some()
    }

    /// Why signaling went down (or its last reconnect failed), while it is down.
    pub fn signal_error(&self) -> Option<&str> {
        self.sig_down.and(self.sig_err.as_deref())
    }

    /// Why signaling went down last, also once it is back.
    pub fn last_signal_error(&self) -> Option<&str> {
        self.sig_err.as_deref()
    }

    /// How long signaling may stay down.
    pub fn signal_grace(&self) -> Duration {
        self.signal_grace
    }

    /// The consent timeout.
    pub fn consent_timeout(&self) -> Duration {
        self.consent_timeout
    }

    /// Our ICE restarts so far.
    pub fn restarts(&self) -> u64 {
        self.restarts
    }

    /// Signaling reconnects so far.
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);
    const MS: Duration = Duration::from_millis(1);

    /// The defaults of a call: consent 5 s, restart after 1 s of silence, signaling grace 4 s.
    fn rec() -> Recovery {
        Recovery::new(5 * S, S, 4 * S)
    }

    /// The peer's media stopped at t0 (its relay died) while its checks kept arriving on our
    /// selected pair through another relay: in a call the silence still runs from t0, in a
    /// file session the checks count.
    #[test]
    fn consent_checks_do_not_hide_a_calls_lost_media() {
        let t0 = Instant::now();
        let check = t0 + 900 * MS;
        assert_eq!(last_heard(t0, Some(check), false), t0);
        assert_eq!(last_heard(t0, Some(check), true), check);
        assert_eq!(last_heard(check, Some(t0), true), check);
        assert_eq!(last_heard(t0, None, true), t0);
    }

    #[test]
    fn silence_restarts_then_the_backoff_holds_then_consent_expires() {
        let t0 = Instant::now();
        let mut r = rec();
        // Nothing before the call connects, however long.
        assert_eq!(r.poll_path(t0 + 60 * S, None, false), PathNext::Fine);
        assert_eq!(r.path_timeout(false), None);
        r.on_path(t0);
        r.on_peer_heard(t0 + 100 * MS);
        assert_eq!(r.poll_path(t0 + 1099 * MS, None, false), PathNext::Fine);
        assert_eq!(r.path_timeout(false), Some(t0 + 1100 * MS));
        assert_eq!(
            r.poll_path(t0 + 1100 * MS, None, false),
            PathNext::Restart("no packets from peer")
        );
        r.on_restart(t0 + 1100 * MS);
        assert_eq!(r.restarts(), 1);
        // Still silent: no second restart within the backoff (1.5 s).
        assert_eq!(r.poll_path(t0 + 2500 * MS, None, false), PathNext::Fine);
        assert_eq!(
            r.poll_path(t0 + 2600 * MS, None, false),
            PathNext::Restart("no packets from peer")
        );
        // Five seconds after the last packet the call is over.
        assert_eq!(
            r.poll_path(t0 + 5100 * MS, None, false),
            PathNext::ConsentExpired
        );
        // Heard again in time: fine.
        r.on_peer_heard(t0 + 5 * S);
        assert_eq!(r.poll_path(t0 + 5100 * MS, None, false), PathNext::Fine);
    }

    #[test]
    fn a_lost_path_restarts_at_once_and_a_file_session_waits_longer_for_silence() {
        let t0 = Instant::now();
        let mut r = rec();
        r.on_path(t0);
        r.on_path_lost();
        assert_eq!(
            r.poll_path(t0 + MS, None, false),
            PathNext::Restart("path lost")
        );
        r.on_restart(t0 + MS);
        // The restart clears the loss; within its backoff nothing more happens, after it the
        // silence counts again.
        assert_eq!(r.poll_path(t0 + S, None, false), PathNext::Fine);
        assert_eq!(
            r.poll_path(t0 + 1501 * MS, None, false),
            PathNext::Restart("no packets from peer")
        );

        let mut f = rec();
        f.on_path(t0);
        assert_eq!(f.poll_path(t0 + 2 * S, None, true), PathNext::Fine);
        // Consent traffic on the selected pair counts in a file session.
        assert_eq!(
            f.poll_path(t0 + 3 * S, Some(t0 + 2 * S), true),
            PathNext::Fine
        );
        assert_eq!(
            f.poll_path(t0 + 3 * S, None, true),
            PathNext::Restart("no packets from peer")
        );
    }

    #[test]
    fn signaling_reconnects_with_a_doubling_backoff_until_the_grace_runs_out() {
        let t0 = Instant::now();
        let mut r = rec();
        assert_eq!(r.poll_signal(t0), SignalNext::Fine);
        assert!(r.on_signal_lost(t0, t0, "reset".into()));
        assert!(!r.on_signal_lost(t0 + MS, t0 + MS, "again".into()));
        assert_eq!(r.signal_error(), Some("reset"));
        assert_eq!(r.poll_signal(t0), SignalNext::Reconnect(SIG_ATTEMPT));
        // One attempt at a time.
        assert_eq!(r.poll_signal(t0 + MS), SignalNext::Fine);
        let mut now = t0 + 10 * MS;
        let mut waits = Vec::new();
        loop {
            r.on_reconnect_failed(now, "refused".into());
            let next = r.signal_timeout().expect("a retry or the grace end");
            waits.push(next - now);
            now = next;
            match r.poll_signal(now) {
                SignalNext::Reconnect(bound) => {
                    assert!(bound <= SIG_ATTEMPT && now + bound <= t0 + 4 * S);
                }
                SignalNext::Lost => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(
            &waits[..5],
            &[100 * MS, 200 * MS, 400 * MS, 800 * MS, 1000 * MS]
        );
        assert_eq!(now, t0 + 4 * S, "lost exactly when the grace ran out");
        assert_eq!(r.signal_error(), Some("refused"));
        assert_eq!(r.reconnects(), 0);
    }

    #[test]
    fn an_unanswered_restart_is_sent_again_after_a_reconnect_then_made_anew() {
        let t0 = Instant::now();
        let mut r = rec();
        r.on_path(t0);
        r.on_restart(t0);
        r.on_signal_lost(t0 + MS, t0 + MS, "reset".into());
        assert_eq!(r.poll_signal(t0 + MS), SignalNext::Reconnect(SIG_ATTEMPT));
        // The restart was written before the outage was noticed: not among the held frames.
        r.on_signal_restored(t0 + 50 * MS, false);
        assert!(!r.signal_down());
        assert_eq!(r.reconnects(), 1);
        assert_eq!(r.poll_signal(t0 + 199 * MS), SignalNext::Fine);
        assert_eq!(r.signal_timeout(), Some(t0 + 200 * MS));
        assert_eq!(r.poll_signal(t0 + 200 * MS), SignalNext::ResendRestart);
        assert_eq!(r.poll_signal(t0 + 699 * MS), SignalNext::Fine);
        assert_eq!(
            r.poll_signal(t0 + 700 * MS),
            SignalNext::Restart("restart unanswered after a signaling reconnect")
        );

        // Answered before the follow-up: nothing more.
        let mut a = rec();
        a.on_path(t0);
        a.on_restart(t0);
        a.on_signal_lost(t0, t0, "reset".into());
        a.poll_signal(t0);
        a.on_signal_restored(t0 + 50 * MS, false);
        assert_eq!(a.poll_signal(t0 + 200 * MS), SignalNext::ResendRestart);
        assert!(
            !a.peer_restart_needs_ours(),
            "the peer's restart answers ours"
        );
        a.on_peer_description();
        assert_eq!(a.poll_signal(t0 + S), SignalNext::Fine);

        // Our restart was held and went out with the reconnect: nothing to re-send.
        let mut q = rec();
        q.on_restart(t0);
        q.on_signal_lost(t0, t0, "reset".into());
        q.poll_signal(t0);
        q.on_signal_restored(t0 + 50 * MS, true);
        assert_eq!(q.poll_signal(t0 + S), SignalNext::Fine);
        assert_eq!(q.signal_timeout(), None);
    }

    #[test]
    fn a_peer_restart_outside_our_own_needs_ours_first() {
        let mut r = rec();
        assert!(r.peer_restart_needs_ours());
        r.on_restart(Instant::now());
        r.on_peer_description();
        assert!(r.peer_restart_needs_ours());
    }
}
