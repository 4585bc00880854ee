//! Gathering: host candidates from the sockets, server-reflexive ones from STUN Binding
//! responses, relayed ones from the TURN allocation; `gathering_complete` when all are in.

use super::*;

impl Agent {
    pub(super) fn start_gathering(&mut self, now: Instant) {
        self.gathering_reported = false;
        self.turn2_tried = false;
        for (i, addr) in self.sockets.clone().into_iter().enumerate() {
            let pref = self.socket_pref(i);
            let c = Candidate::new(CandidateKind::Host, addr, addr, pref);
            self.add_local(c, true);
        }
        {
            for i in 0..self.sockets.len() {
                let Some(server) = self.stun_for(i) else {
                    continue;
                };
                let tid = TransactionId::random(&mut self.rng);
                let mut buf = vec![0u8; 64];
                let payload = match MessageBuilder::new(&mut buf, MessageType::BINDING_REQUEST, tid)
                    .and_then(|mut b| {
                        b.add_fingerprint()?;
                        Ok(b.finish())
                    }) {
                    Ok(n) => {
                        buf.truncate(n);
                        buf
                    }
                    Err(_) => {
                        self.stats.send_errors += 1;
                        continue;
                    }
                };
                self.transmits.push_back(Transmit {
                    socket: i,
                    to: server,
                    payload: payload.clone(),
                });
                self.gathers.push(Gather {
                    socket: i,
                    server,
                    tid,
                    payload,
                    transmissions: 1,
                    rto: self.cfg.stun_rto,
                    next_at: now + self.cfg.stun_rto,
                    done: false,
                });
            }
        }
        self.turn_order = relay::ladder(self.turn_list(), self.turn_transport_worked);
        self.stats.turn_attempts.clear();
        self.turn_rung_started_at = None;
        self.turn_index = 0;
        self.turn_allocated_once = false;
        self.turn_started_at = None;
        self.keep_reachable_relays();
        if let Some(first) = self.turn_order.first().map(|t| t.server) {
            let releasing = self.retired.iter().any(|(_, t)| t.config().server == first);
            if releasing {
                // Same relay (and likely the same 5-tuple) as the allocation being released:
                // let the release land first, or the relay answers 437.
                self.turn_deferred_until = Some(now + self.cfg.turn_alternate_after);
            } else {
                self.start_turn(now);
            }
        }
        self.check_gathering_complete();
    }

    pub(super) fn gather_timers(&mut self, now: Instant) {
        for g in self
            .gathers
            .iter_mut()
            .filter(|g| !g.done && g.next_at <= now)
        {
            if g.transmissions >= self.cfg.stun_max_transmissions {
                g.done = true;
                continue;
            }
            g.transmissions += 1;
            g.rto = (g.rto * 2).min(MAX_STUN_RTO);
            g.next_at = now + g.rto;
            self.transmits.push_back(Transmit {
                socket: g.socket,
                to: g.server,
                payload: g.payload.clone(),
            });
        }
        self.check_gathering_complete();
    }

    /// A Binding response to our server-reflexive request? Consumes it if so.
    pub(super) fn try_gather_response(
        &mut self,
        socket: usize,
        from: SocketAddr,
        data: &[u8],
    ) -> bool {
        if !self.is_stun_server(from) {
            return false;
        }
        let Ok(msg) = Message::parse(data) else {
            return false;
        };
        if msg.method() != Method::BINDING || !matches!(msg.class(), Class::Success | Class::Error)
        {
            return false;
        }
        let tid = msg.transaction_id();
        let Some(g) = self
            .gathers
            .iter_mut()
            .find(|g| g.tid == tid && g.socket == socket)
        else {
            return false;
        };
        let was_done = g.done;
        g.done = true;
        if !was_done
            && msg.class() == Class::Success
            && let Some(Ok(XorMappedAddress(mapped))) = msg.get::<XorMappedAddress>()
        {
            self.add_srflx(socket, mapped);
        }
        self.check_gathering_complete();
        true
    }

    pub(super) fn add_srflx(&mut self, socket: usize, mapped: SocketAddr) {
        let Some(&base) = self.sockets.get(socket) else {
            return;
        };
        if self.locals.iter().any(|l| l.cand.addr == mapped) {
            return;
        }
        let c = Candidate::new(
            CandidateKind::ServerReflexive,
            mapped,
            base,
            self.socket_pref(socket),
        );
        // Server-reflexive candidates are trickled but not paired: their base (the host
        // socket) already is (RFC 8445 section 6.1.2.4).
        self.add_local(c, true);
    }

    pub(super) fn add_local(&mut self, c: Candidate, announce: bool) {
        if announce {
            self.events.push_back(Event::LocalCandidate(c.clone()));
        }
        self.locals.push(Local { cand: c });
    }

    pub(super) fn check_gathering_complete(&mut self) {
        if self.gathering_reported {
            return;
        }
        let stun_done = self.gathers.iter().all(|g| g.done) && !self.turn2_pending();
        let turn_done = self.turn_deferred_until.is_none()
            && self
                .turn
                .as_ref()
                .is_none_or(|t| t.state() != AllocationState::Allocating)
            && (self.turn_allocated_once || self.turn_index + 1 >= self.turn_order.len());
        if stun_done && turn_done {
            self.gathering_reported = true;
            self.events.push_back(Event::GatheringComplete);
        }
    }

    pub(super) fn drain_turn(&mut self, now: Instant) {
        self.drain_turn2(now);
        let Some(t) = self.turn.as_mut() else {
            return;
        };
        let server = t.config().server;
        let mut events = Vec::new();
        while let Some(ev) = t.poll_event() {
            events.push(ev);
        }
        for ev in events {
            match ev {
                turn::Event::Allocated {
                    relayed, mapped, ..
                } => {
                    self.turn_allocated_once = true;
                    self.turn_transport_worked = Some(self.turn_transport);
                    self.note_attempt(TurnOutcome::Allocated);
                    // Over TCP or TLS the relay saw our TCP mapping: no UDP candidate.
                    if let Some(m) = mapped.filter(|_| self.turn_stream.is_none()) {
                        self.add_srflx(self.turn_socket, m);
                    }
                    let pref = local_preference(relayed.ip(), 0);
                    let c = Candidate::new(CandidateKind::Relayed, relayed, relayed, pref);
                    self.add_local(c, true);
                    let ips: Vec<_> = self
                        .remotes
                        .iter()
                        .map(|r| r.addr.ip())
                        .filter(|ip| ip.is_ipv4() == relayed.is_ipv4())
                        .collect();
                    if let Some(t) = self.turn.as_mut() {
                        for ip in ips {
                            if !t.has_permission(ip) {
                                let _ = t.create_permission(now, ip);
                            }
                        }
                    }
                    for r in self.remotes.clone() {
                        self.add_pair(now, Via::Relay, &r);
                    }
                    self.start_turn2(now);
                }
                turn::Event::AllocationFailed(e) => {
                    self.note_attempt(TurnOutcome::Failed(e.to_string()));
                    self.close_turn_stream();
                }
                turn::Event::Redirected { from, to } if self.turn_stream.is_some() => {
                    // The alternate is another connection.
                    self.stream_ops.push_back(StreamOp::Close { server: from });
                    self.turn_stream = Some(to);
                    self.stream_ops.push_back(StreamOp::Open {
                        server: to,
                        transport: self.turn_transport,
                    });
                }
                turn::Event::AllocationLost(e) => {
                    self.close_turn_stream();
                    self.end_relayed_pairs();
                    if self
                        .selected
                        .and_then(|i| self.pairs.get(i))
                        .is_some_and(|p| p.via == Via::Relay && p.state == PairState::Failed)
                    {
                        self.disconnect(DisconnectReason::RelayLost(e));
                    }
                }
                _ => {}
            }
        }
        if !self.turn_allocated_once
            && self
                .turn
                .as_ref()
                .is_some_and(|t| t.state() == AllocationState::Failed)
            && self.turn_index + 1 < self.turn_order.len()
        {
            self.turn_failover(now);
            return;
        }
        let mut out = Vec::new();
        if let Some(t) = self.turn.as_mut() {
            while let Some(tx) = t.poll_transmit() {
                out.push(tx);
            }
        }
        for tx in out {
            let to = if tx.destination == server {
                server
            } else {
                tx.destination
            };
            self.push_turn_out(to, tx.payload);
        }
        self.check_gathering_complete();
    }
}
