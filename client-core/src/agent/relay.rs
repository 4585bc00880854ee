//! The agent's TURN allocations: start, fail over to the next relay or transport (the
//! ladder), release (a restart's, a closed agent's, one the call does not use), and the pairs
//! that end with them.

use super::*;

/// The TURN ladder: every relay over UDP, then over TCP, then over TLS (stable within each);
/// from `start` on when given, the transports below it after.
pub(super) fn ladder(mut relays: Vec<TurnConfig>, start: Option<TurnTransport>) -> Vec<TurnConfig> {
    let start = start.unwrap_or(TurnTransport::Udp);
    relays.sort_by_key(|t| (t.transport < start, t.transport));
    relays
}

impl Agent {
    /// Keeps the realm and nonce an allocation authenticated with, for the next Allocate on
    /// its server.
    pub(super) fn remember_turn_auth(&mut self, hint: Option<turn::AuthHint>) {
        let Some(hint) = hint else {
            return;
        };
        self.turn_auth.retain(|h| h.server != hint.server);
        if self.turn_auth.len() > self.cfg.turn_alternates.len() {
            self.turn_auth.remove(0);
        }
        self.turn_auth.push(hint);
    }

    /// Queues bytes of the current TURN client for `server`: a datagram from the TURN socket,
    /// or a write to its stream connection.
    pub(super) fn push_turn_out(&mut self, server: SocketAddr, payload: Vec<u8>) {
        match self.turn_stream {
            Some(_) => self.stream_ops.push_back(StreamOp::Write {
                server,
                bytes: payload,
            }),
            None => self.transmits.push_back(Transmit {
                socket: self.turn_socket,
                to: server,
                payload,
            }),
        }
    }

    /// The transport this side's packets on a pair through `via` leave on.
    pub(super) fn via_transport(&self, via: Via) -> TurnTransport {
        match via {
            Via::Relay => self.turn_transport,
            Via::Socket(_) => TurnTransport::Udp,
        }
    }

    /// Closes the stream connection of the current allocation, if it has one open.
    pub(super) fn close_turn_stream(&mut self) {
        if let Some(server) = self.turn_stream.take() {
            self.stream_ops.push_back(StreamOp::Close { server });
        }
    }

    /// Records how the current rung of the ladder went (the last attempt is the current one).
    pub(super) fn note_attempt(&mut self, outcome: TurnOutcome) {
        if let Some(a) = self.stats.turn_attempts.last_mut()
            && a.outcome == TurnOutcome::Pending
        {
            a.outcome = outcome;
        }
    }

    /// Moves the current allocation to the released list (Refresh LIFETIME 0 sent); one on a
    /// stream is released by closing its connection.
    pub(super) fn release_turn(&mut self, now: Instant) {
        self.turn_deferred_until = None;
        let held = self.turn.as_ref().and_then(TurnClient::auth_hint);
        self.remember_turn_auth(held);
        if self.turn_stream.is_some() {
            self.close_turn_stream();
            self.turn = None;
            return;
        }
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

    /// The index of the first relay of the next transport of the ladder, if any.
    fn next_rung(&self) -> Option<usize> {
        let cur = self.turn_order.get(self.turn_index)?.transport;
        (self.turn_index + 1..self.turn_order.len()).find(|&i| self.turn_order[i].transport != cur)
    }

    /// Where the ladder goes when the current Allocate is still unanswered: (when, to which
    /// index). The next relay of the same transport after `turn_alternate_after`; the next
    /// transport once the current one has had `turn_transport_after`, whichever comes first.
    fn unanswered_failover(&self) -> Option<(Instant, usize)> {
        let next = self.turn_index + 1;
        let cur = self.turn_order.get(self.turn_index)?.transport;
        let same = self
            .turn_order
            .get(next)
            .is_some_and(|t| t.transport == cur);
        let alternate = self
            .turn_started_at
            .filter(|_| same)
            .map(|s| (s + self.cfg.turn_alternate_after, next));
        let rung = self
            .next_rung()
            .zip(self.turn_rung_started_at)
            .map(|(i, s)| (s + self.cfg.turn_transport_after, i));
        match (alternate, rung) {
            (Some(a), Some(r)) => Some(if r.0 <= a.0 { r } else { a }),
            (a, r) => a.or(r),
        }
    }

    /// When [`Self::turn_failover`] has something to do for an unanswered Allocate.
    pub(super) fn turn_failover_at(&self) -> Option<Instant> {
        if self.turn_allocated_once {
            return None;
        }
        let t = self.turn.as_ref()?;
        if !matches!(
            t.state(),
            AllocationState::Allocating | AllocationState::Idle
        ) {
            return None;
        }
        self.unanswered_failover().map(|(at, _)| at)
    }

    /// Tries the next relay (or transport) when the Allocate on the current one failed or went
    /// unanswered for its bound ([`Self::unanswered_failover`]); starts a deferred Allocate when
    /// its time has come.
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
        let next = match self.turn.as_ref() {
            None if !self.turn_order.is_empty() => Some(self.turn_index + 1),
            None => None,
            Some(t) => match t.state() {
                AllocationState::Failed => Some(self.turn_index + 1),
                AllocationState::Allocating | AllocationState::Idle => self
                    .unanswered_failover()
                    .filter(|(at, _)| *at <= now)
                    .map(|(_, i)| i),
                _ => None,
            },
        };
        if let Some(next) = next {
            if self
                .turn
                .as_ref()
                .is_some_and(|t| t.state() == AllocationState::Failed)
            {
                // The reason was recorded when the Allocate failed.
            } else {
                self.note_attempt(TurnOutcome::NoAnswer);
            }
            // An unanswered Allocate is abandoned: nothing was granted to release (one on a
            // stream goes with its connection).
            self.close_turn_stream();
            self.turn = None;
            self.turn_index = next;
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
        let first_of_rung = self.turn_index == 0
            || self
                .turn_order
                .get(self.turn_index - 1)
                .is_none_or(|prev| prev.transport != tc.transport);
        if first_of_rung {
            self.turn_rung_started_at = Some(now);
        }
        let mut conf = turn::TurnConfig::new(tc.server, tc.username, tc.password);
        conf.rto = self.cfg.stun_rto;
        self.turn_transport = tc.transport;
        self.turn_stream = None;
        if tc.transport != TurnTransport::Udp {
            conf.transport = turn::ClientTransport::Stream;
            self.turn_stream = Some(tc.server);
            self.stream_ops.push_back(StreamOp::Open {
                server: tc.server,
                transport: tc.transport,
            });
        }
        self.stats.turn_attempts.push(TurnAttempt {
            transport: tc.transport,
            server: tc.server,
            outcome: TurnOutcome::Pending,
        });
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
        // A realm and nonce this agent already holds for the server (an earlier allocation, a
        // restart): the first Allocate authenticates and costs the relay no 401.
        let held = self.turn.as_ref().and_then(TurnClient::auth_hint);
        self.remember_turn_auth(held);
        if let Some(hint) = self.turn_auth.iter().find(|h| h.server == tc.server) {
            client.resume_auth(hint);
        }
        self.turn_started_at = Some(now);
        if client.allocate(now).is_ok() {
            self.turn = Some(client);
        }
        self.drain_turn(now);
    }
}
