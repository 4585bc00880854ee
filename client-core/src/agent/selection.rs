//! Selection and consent: which valid pair carries the call (the relay only after its
//! window, the controlled side following the controlling side's path), consent checks on
//! it, and disconnection when no path is left.

use super::*;

impl Agent {
    pub(super) fn relay_allowed(&self, now: Instant) -> bool {
        let window = self
            .checks_started_at
            .is_some_and(|s| now.saturating_duration_since(s) >= self.cfg.relay_fallback_after);
        let direct_hopeless = self.remote_done
            && self
                .pairs
                .iter()
                .filter(|p| p.kind() == PathKind::Direct)
                .all(|p| p.state == PairState::Failed);
        window || direct_hopeless
    }

    /// Controlled side: application data from the controlling side arrived on pair `i`.
    pub(super) fn follow_peer(&mut self, now: Instant, i: usize) {
        let f = &mut self.follow;
        if f.chosen == Some(i) || (f.chosen.is_none() && self.selected == Some(i)) {
            f.pair = None;
            f.count = 0;
            return;
        }
        if f.pair == Some(i) {
            f.count += 1;
        } else {
            f.pair = Some(i);
            f.count = 1;
        }
        if f.count >= FOLLOW_AFTER {
            f.chosen = Some(i);
            f.pair = None;
            f.count = 0;
            self.update_selection(now);
        }
    }

    /// Whether pair `i` may be selected: valid, nominated, and direct unless relays are allowed.
    pub(super) fn selectable(&self, i: usize, relay_ok: bool) -> bool {
        self.pairs.get(i).is_some_and(|p| {
            p.state == PairState::Succeeded
                && p.nominated
                && (relay_ok || p.kind() == PathKind::Direct)
        })
    }

    pub(super) fn update_selection(&mut self, now: Instant) {
        if self.dead {
            return;
        }
        let relay_ok = self.relay_allowed(now);
        // The controlling side's path, if it is one we may use; else our own ranking.
        let followed = self.follow.chosen.filter(|&c| self.selectable(c, relay_ok));
        let best = followed.or_else(|| {
            (0..self.pairs.len())
                .filter(|&i| self.selectable(i, relay_ok))
                .max_by_key(|&i| self.pairs[i].key())
        });
        let Some(b) = best else { return };
        let better = match self.selected {
            None => true,
            Some(s) => s != b && (followed == Some(b) || self.pairs[b].key() > self.pairs[s].key()),
        };
        if !better {
            return;
        }
        self.selected = Some(b);
        self.selected_at = Some(now);
        self.previous = None;
        self.next_consent_at = Some(now + self.cfg.keepalive_interval);
        let p = self.pairs[b].clone();
        if p.via == Via::Relay
            && let Some((_, t)) = self.relay_for_mut(p.remote)
            && t.channel_for(p.remote).is_none()
        {
            let _ = t.bind_channel(now, p.remote);
            self.drain_turn(now);
        }
        if p.kind() == PathKind::Direct {
            // Nothing pending below a selected direct pair can win any more: stop its checks.
            for q in self.pairs.iter_mut() {
                if q.state != PairState::Succeeded && q.key() < p.key() {
                    q.state = PairState::Failed;
                    q.next_check_at = None;
                }
            }
        }
        let path = SelectedPath {
            kind: p.kind(),
            local: p.local_addr,
            remote: p.remote,
            rtt: p.rtt,
            transport: self.via_transport(p.via),
        };
        if self.connected_once {
            self.stats.path_changes += 1;
            self.events.push_back(Event::PathChanged { path });
        } else {
            self.connected_once = true;
            self.stats.time_to_connected = self
                .checks_started_at
                .map(|s| now.saturating_duration_since(s));
            self.events.push_back(Event::Connected { path });
        }
    }

    pub(super) fn consent_timers(&mut self, now: Instant) {
        let Some(s) = self.selected else { return };
        let Some(p) = self.pairs.get(s) else { return };
        let last = p_last(p).unwrap_or(now);
        if now.saturating_duration_since(last) >= self.cfg.consent_timeout {
            self.disconnect(DisconnectReason::ConsentExpired);
            return;
        }
        if self.next_consent_at.is_some_and(|t| t <= now) {
            self.send_check(now, s, true);
            let silent = now.saturating_duration_since(last) >= self.cfg.keepalive_interval;
            let every = if silent {
                self.cfg.keepalive_interval / 4
            } else {
                self.cfg.keepalive_interval
            };
            self.next_consent_at = Some(now + every);
        }
    }

    pub(super) fn disconnect(&mut self, reason: DisconnectReason) {
        if self.dead {
            return;
        }
        self.dead = true;
        self.selected = None;
        self.previous = None;
        self.next_consent_at = None;
        for p in &mut self.pairs {
            p.next_check_at = None;
        }
        self.events.push_back(Event::Disconnected { reason });
    }

    pub(super) fn check_no_path(&mut self) {
        if self.dead
            || self.connected_once
            || !self.remote_done
            || self.remote_creds.is_none()
            || self.pairs.is_empty()
            || !self.gathering_reported
        {
            return;
        }
        if self.pairs.iter().all(|p| p.state == PairState::Failed) {
            self.disconnect(DisconnectReason::NoPath);
        }
    }
}
