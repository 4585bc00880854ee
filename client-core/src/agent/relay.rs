//! The agent's TURN allocations: start, fail over to the next relay, release (a restart's,
//! a closed agent's, one the call does not use), and the pairs that end with them.

use super::*;

impl Agent {
    /// Moves the current allocation to the released list (Refresh LIFETIME 0 sent).
    pub(super) fn release_turn(&mut self, now: Instant) {
        self.turn_deferred_until = None;
        if let Some(mut old) = self.turn.take()
            && old.state() == AllocationState::Allocated
            && old.deallocate(now).is_ok()
        {
            self.retired.push((self.turn_socket, old));
            self.drain_retired(now);
        }
    }

    /// When our allocation is to be released as unused (module docs), if it is unused now:
    /// allocated, the selected pair not through it, and both the selection and the last
    /// datagram through it at least `release_unused_relay_after` old at that instant.
    pub(super) fn unused_relay_release_at(&self) -> Option<Instant> {
        let after = self.cfg.release_unused_relay_after?;
        if self.dead || self.relayed_addr().is_none() {
            return None;
        }
        let p = self.pairs.get(self.selected?)?;
        if p.via == Via::Relay {
            return None;
        }
        let selected_at = self.selected_at?;
        let since = self.relay_rx_at.map_or(selected_at, |t| t.max(selected_at));
        Some(since + after)
    }

    /// Releases our allocation once [`Self::unused_relay_release_at`] has come: Refresh
    /// LIFETIME 0, and the pairs through it end (no checks, never selected).
    pub(super) fn release_unused_relay(&mut self, now: Instant) {
        if self.unused_relay_release_at().is_none_or(|at| at > now) {
            return;
        }
        self.release_turn(now);
        self.release_turn2(now);
        self.end_relayed_pairs();
        self.stats.unused_relay_released += 1;
    }

    /// Our allocation is gone (lost, or released as unused): the pairs through it fail and
    /// are checked no more (those of a family another allocation still relays live on).
    pub(super) fn end_relayed_pairs(&mut self) {
        let live: Vec<bool> = self
            .pairs
            .iter()
            .map(|p| self.relayed_addr_for(p.remote).is_some())
            .collect();
        for (p, _) in self
            .pairs
            .iter_mut()
            .zip(live)
            .filter(|(p, live)| p.via == Via::Relay && !live)
        {
            p.state = PairState::Failed;
            p.next_check_at = None;
        }
    }

    /// Hands a STUN message from `from` on `socket` to the released allocation on that relay,
    /// if there is one (the answer to its Refresh LIFETIME 0). `true` when one took it.
    pub(super) fn feed_retired(
        &mut self,
        now: Instant,
        socket: usize,
        from: SocketAddr,
        data: &[u8],
    ) -> bool {
        let Some(r) = self
            .retired
            .iter_mut()
            .find(|(s, t)| *s == socket && t.config().server == from)
        else {
            return false;
        };
        let _ = r.1.handle_input(now, from, data);
        self.drain_retired(now);
        true
    }

    /// Sends what released allocations have to send; forgets the finished ones.
    pub(super) fn drain_retired(&mut self, _now: Instant) {
        for (socket, t) in &mut self.retired {
            while let Some(tx) = t.poll_transmit() {
                self.transmits.push_back(Transmit {
                    socket: *socket,
                    to: tx.destination,
                    payload: tx.payload,
                });
            }
            while t.poll_event().is_some() {}
        }
        self.retired.retain(|(_, t)| {
            matches!(
                t.state(),
                AllocationState::Deallocating | AllocationState::Allocated
            )
        });
    }

    /// Tries the next relay when the Allocate on the current one failed or went unanswered
    /// for `turn_alternate_after`; starts a deferred Allocate when its time has come.
    pub(super) fn turn_failover(&mut self, now: Instant) {
        if let Some(until) = self.turn_deferred_until {
            let server = self.turn_order.get(self.turn_index).map(|t| t.server);
            let busy = self
                .retired
                .iter()
                .any(|(_, t)| Some(t.config().server) == server);
            if !busy || now >= until {
                self.turn_deferred_until = None;
                self.start_turn(now);
            }
            return;
        }
        if self.turn_allocated_once || self.turn_index + 1 >= self.turn_order.len() {
            return;
        }
        let stuck = match self.turn.as_ref() {
            None => !self.turn_order.is_empty(),
            Some(t) => match t.state() {
                AllocationState::Failed => true,
                AllocationState::Allocating | AllocationState::Idle => {
                    self.turn_started_at.is_some_and(|s| {
                        now.saturating_duration_since(s) >= self.cfg.turn_alternate_after
                    })
                }
                _ => false,
            },
        };
        if stuck {
            // An unanswered Allocate is abandoned: nothing was granted to release.
            self.turn = None;
            self.turn_index += 1;
            self.stats.turn_failovers += 1;
            self.start_turn(now);
        }
    }

    /// Starts the Allocate on `turn_order[turn_index]`.
    pub(super) fn start_turn(&mut self, now: Instant) {
        let Some(tc) = self.turn_order.get(self.turn_index).cloned() else {
            return;
        };
        if self.sockets.is_empty() {
            return;
        }
        self.turn_generation += 1;
        let mut conf = turn::TurnConfig::new(tc.server, tc.username, tc.password);
        conf.rto = self.cfg.stun_rto;
        conf.seed = self
            .cfg
            .seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(self.turn_generation);
        self.turn_socket = self
            .sockets
            .iter()
            .position(|s| s.is_ipv4() == tc.server.is_ipv4())
            .unwrap_or(0);
        let mut client = TurnClient::new(conf);
        self.turn_started_at = Some(now);
        if client.allocate(now).is_ok() {
            self.turn = Some(client);
        }
        self.drain_turn(now);
    }
}
