//! Pairs and connectivity checks: pairing local vias with remote candidates, pacing checks
//! per pair, and handling STUN requests and responses (peer-reflexive learning, role
//! conflicts).

use super::*;

impl Agent {
    /// The local vias remote candidates pair with: every socket of the same family (unless
    /// relay-only), and the relay once allocated.
    pub(super) fn pairing_vias(&self) -> Vec<Via> {
        let mut v: Vec<Via> = if self.cfg.relay_only {
            Vec::new()
        } else {
            (0..self.sockets.len()).map(Via::Socket).collect()
        };
        if self.relayed_addr().is_some() {
            v.push(Via::Relay);
        }
        v
    }

    /// A relayed address of ours (either allocation), if any is allocated.
    pub(super) fn relayed_addr(&self) -> Option<SocketAddr> {
        self.turn
            .iter()
            .chain(self.turn2.as_ref().map(|(_, t)| t))
            .filter(|t| t.state() == AllocationState::Allocated)
            .find_map(|t| t.relayed_addr())
    }

    /// Our address and candidate priority on `via` towards `remote` (the relayed address of
    /// the remote's family through the relay).
    pub(super) fn via_addr_priority(
        &self,
        via: Via,
        remote: SocketAddr,
    ) -> Option<(SocketAddr, u32)> {
        match via {
            Via::Socket(i) => self.sockets.get(i).map(|a| {
                (
                    *a,
                    candidate_priority(TYPE_PREF_HOST, self.socket_pref(i), 1),
                )
            }),
            Via::Relay => self.relayed_addr_for(remote).map(|a| {
                let pref = local_preference(a.ip(), 0);
                (a, candidate_priority(TYPE_PREF_RELAYED, pref, 1))
            }),
        }
    }

    pub(super) fn compute_priority(&self, local: u32, remote: u32) -> u64 {
        match self.role {
            Role::Controlling => pair_priority(local, remote),
            Role::Controlled => pair_priority(remote, local),
        }
    }

    /// Adds the pair (via, remote) unless present; returns its index.
    pub(super) fn add_pair(&mut self, now: Instant, via: Via, r: &Candidate) -> Option<usize> {
        if let Some(i) = self
            .pairs
            .iter()
            .position(|p| p.via == via && p.remote == r.addr)
        {
            return Some(i);
        }
        if self.cfg.relay_only && via != Via::Relay {
            return None;
        }
        let (local_addr, local_priority) = self.via_addr_priority(via, r.addr)?;
        if local_addr.is_ipv4() != r.addr.is_ipv4() {
            return None;
        }
        // Never check from our relay towards our own relayed address.
        if via == Via::Relay && r.addr == local_addr {
            return None;
        }
        self.pairs.push(Pair {
            via,
            local_addr,
            local_priority,
            remote: r.addr,
            remote_priority: r.priority,
            remote_kind: r.kind,
            priority: self.compute_priority(local_priority, r.priority),
            state: PairState::Waiting,
            nominated: false,
            created_at: now,
            started_at: self.remote_creds.as_ref().map(|_| now),
            next_check_at: self.remote_creds.as_ref().map(|_| now),
            last_sent: None,
            interval: self.cfg.check_interval,
            extra: 0,
            extra_given: false,
            last_rx: None,
            rtt: None,
        });
        if self.remote_creds.is_some() && self.checks_started_at.is_none() {
            self.checks_started_at = Some(now);
        }
        Some(self.pairs.len() - 1)
    }

    pub(super) fn pair_timers(&mut self, now: Instant) {
        if self.remote_creds.is_none() || self.dead {
            return;
        }
        if self.checks_started_at.is_none() && !self.pairs.is_empty() {
            self.checks_started_at = Some(now);
        }
        for i in 0..self.pairs.len() {
            if self.pairs[i].next_check_at.is_some() && self.pairs[i].started_at.is_none() {
                self.pairs[i].started_at = Some(now);
            }
            let p = &self.pairs[i];
            let Some(at) = p.next_check_at else { continue };
            if at > now || p.state == PairState::Failed {
                continue;
            }
            if p.state != PairState::Succeeded
                && p.started_at
                    .is_some_and(|s| now.saturating_duration_since(s) >= self.cfg.pair_timeout)
            {
                let p = &mut self.pairs[i];
                p.state = PairState::Failed;
                p.next_check_at = None;
                continue;
            }
            if p.state == PairState::Succeeded && p.extra == 0 {
                self.pairs[i].next_check_at = None;
                continue;
            }
            // Checks through our relay wait until the server has the peer's permission.
            if p.via == Via::Relay {
                let (remote, ip) = (p.remote, p.remote.ip());
                let ready = self
                    .relay_for_mut(remote)
                    .is_some_and(|(_, t)| t.has_permission(ip));
                if !ready {
                    if let Some((_, t)) = self.relay_for_mut(remote)
                        && !t.has_permission(ip)
                    {
                        let _ = t.create_permission(now, ip);
                    }
                    self.drain_turn(now);
                    self.pairs[i].next_check_at = Some(now + self.cfg.check_interval);
                    continue;
                }
            }
            self.send_check(now, i, false);
            let max = self.cfg.max_check_interval;
            let ci = self.cfg.check_interval;
            let p = &mut self.pairs[i];
            if p.state == PairState::Waiting {
                p.state = PairState::InProgress;
            }
            if p.extra > 0 {
                p.extra -= 1;
                p.next_check_at = Some(now + ci);
            } else if p.state == PairState::Succeeded {
                p.next_check_at = None;
            } else {
                p.next_check_at = Some(now + p.interval);
                p.interval = (p.interval * 3 / 2).min(max);
            }
        }
    }

    /// Sends one check on pair `i` (consent: a check on the selected pair without
    /// USE-CANDIDATE).
    pub(super) fn send_check(&mut self, now: Instant, i: usize, consent: bool) {
        let Some((rufrag, rpwd)) = self.remote_creds.clone() else {
            return;
        };
        let Some(p) = self.pairs.get(i) else { return };
        let (via, remote) = (p.via, p.remote);
        let prflx_priority = match via {
            Via::Socket(s) => candidate_priority(TYPE_PREF_PEER_REFLEXIVE, self.socket_pref(s), 1),
            Via::Relay => p.local_priority,
        };
        let use_candidate = self.role == Role::Controlling && !consent;
        let tid = TransactionId::random(&mut self.rng);
        let username = format!("{rufrag}:{}", self.cfg.local_ufrag);
        let role = self.role;
        let tie = self.tie_breaker;
        let built = build_stun(MessageType::BINDING_REQUEST, tid, |b| {
            b.add(&Username(&username))?;
            b.add(&Priority(prflx_priority))?;
            match role {
                Role::Controlling => b.add(&IceControlling(tie))?,
                Role::Controlled => b.add(&IceControlled(tie))?,
            }
            if use_candidate {
                b.add(&UseCandidate)?;
            }
            b.add_integrity(short_term_key(&rpwd))?;
            b.add_fingerprint()
        });
        let Ok(payload) = built else {
            self.stats.send_errors += 1;
            return;
        };
        if self.txns.len() >= MAX_TXNS {
            // Forget the oldest: a check that old has long been retransmitted anyway.
            if let Some(oldest) = self
                .txns
                .iter()
                .min_by_key(|(_, t)| t.sent_at)
                .map(|(k, _)| *k)
            {
                self.txns.remove(&oldest);
            }
        }
        self.txns.insert(
            tid,
            Txn {
                pair: i,
                sent_at: now,
                use_candidate,
                role,
            },
        );
        self.stats.checks_sent += 1;
        if consent {
            self.stats.consent_checks_sent += 1;
        }
        self.pairs[i].last_sent = Some(now);
        self.emit(now, via, remote, payload);
    }

    /// Queues `payload` to `to` on `via` (wrapping it for the relay).
    pub(super) fn emit(&mut self, now: Instant, via: Via, to: SocketAddr, payload: Vec<u8>) {
        match via {
            Via::Socket(socket) => self.transmits.push_back(Transmit {
                socket,
                to,
                payload,
            }),
            Via::Relay => {
                if self.emit_turn2(now, to, &payload) {
                    return;
                }
                let Some(t) = self.turn.as_mut() else {
                    self.stats.send_errors += 1;
                    return;
                };
                let mut buf = vec![0u8; payload.len() + TURN_OVERHEAD];
                let mut res = t.encode_data(to, &payload, &mut buf);
                if matches!(res, Err(turn::TurnError::NoPermission(_))) {
                    let _ = t.create_permission(now, to.ip());
                    res = t.encode_data(to, &payload, &mut buf);
                }
                match res {
                    Ok(n) => {
                        buf.truncate(n);
                        let server = t.config().server;
                        self.push_turn_out(server, buf);
                    }
                    Err(_) => self.stats.send_errors += 1,
                }
                self.drain_turn(now);
            }
        }
    }

    pub(super) fn handle_inner<'a>(
        &mut self,
        now: Instant,
        via: Via,
        from: SocketAddr,
        data: &'a [u8],
    ) -> Option<AppData<'a>> {
        match data.first() {
            Some(0..=3) => {
                self.handle_stun(now, via, from, data);
                None
            }
            // Media (128-191) and QUIC (64-127, 192-255): ChannelData only comes from the
            // TURN server and was handled before.
            Some(64..=255) => {
                let pair = self
                    .pairs
                    .iter()
                    .position(|p| p.via == via && p.remote == from);
                let path = match pair {
                    Some(i) => {
                        if self.role == Role::Controlled {
                            self.follow_peer(now, i);
                        }
                        self.pairs[i].kind()
                    }
                    None if self
                        .previous
                        .is_some_and(|(s, r)| via == Via::Socket(s) && r == from) =>
                    {
                        PathKind::Direct
                    }
                    None => {
                        self.stats.app_dropped += 1;
                        return None;
                    }
                };
                self.stats.app_received += 1;
                Some(AppData::Payload {
                    data: Cow::Borrowed(data),
                    path,
                })
            }
            _ => {
                self.stats.malformed += 1;
                None
            }
        }
    }

    pub(super) fn handle_stun(&mut self, now: Instant, via: Via, from: SocketAddr, data: &[u8]) {
        if let Via::Socket(s) = via
            && self.try_gather_response(s, from, data)
        {
            return;
        }
        let Ok(msg) = Message::parse(data) else {
            self.stats.malformed += 1;
            return;
        };
        if msg.method() != Method::BINDING {
            self.stats.malformed += 1;
            return;
        }
        match msg.class() {
            Class::Request => self.handle_request(now, via, from, &msg),
            Class::Success | Class::Error => self.handle_response(now, via, from, &msg),
            // Binding indications are keepalives: nothing to do.
            Class::Indication => {}
        }
    }

    pub(super) fn handle_request(
        &mut self,
        now: Instant,
        via: Via,
        from: SocketAddr,
        msg: &Message<'_>,
    ) {
        let Some(Ok(Username(user))) = msg.get::<Username>() else {
            self.stats.malformed += 1;
            return;
        };
        let Some((ours, theirs)) = user.split_once(':') else {
            self.stats.malformed += 1;
            return;
        };
        if ours != self.cfg.local_ufrag
            || self.remote_creds.as_ref().is_some_and(|(u, _)| u != theirs)
        {
            self.stats.wrong_username += 1;
            return;
        }
        if msg
            .verify_integrity(short_term_key(&self.cfg.local_pwd))
            .is_err()
        {
            self.stats.integrity_failures += 1;
            return;
        }
        let Some(Ok(Priority(prio))) = msg.get::<Priority>() else {
            self.stats.malformed += 1;
            return;
        };
        self.stats.checks_received += 1;
        let their_controlling = msg.get::<IceControlling>().and_then(Result::ok);
        let their_controlled = msg.get::<IceControlled>().and_then(Result::ok);
        match (self.role, their_controlling, their_controlled) {
            (Role::Controlling, Some(IceControlling(t)), _) => {
                self.stats.role_conflicts += 1;
                if self.tie_breaker >= t {
                    self.respond_error(now, via, from, msg, 487);
                    return;
                }
                self.switch_role(now, Role::Controlled);
            }
            (Role::Controlled, _, Some(IceControlled(t))) => {
                self.stats.role_conflicts += 1;
                if self.tie_breaker >= t {
                    self.switch_role(now, Role::Controlling);
                } else {
                    self.respond_error(now, via, from, msg, 487);
                    return;
                }
            }
            _ => {}
        }
        // Answer first: the peer's pair validates on our response.
        let pwd = self.cfg.local_pwd.clone();
        let resp = build_stun(MessageType::BINDING_SUCCESS, msg.transaction_id(), |b| {
            b.add(&XorMappedAddress(from))?;
            b.add_integrity(short_term_key(&pwd))?;
            b.add_fingerprint()
        });
        match resp {
            Ok(r) => self.emit(now, via, from, r),
            Err(_) => self.stats.send_errors += 1,
        }
        if self.dead {
            return;
        }
        // Learn a peer-reflexive remote candidate if the source is new.
        let remote = match self.remotes.iter().find(|r| r.addr == from) {
            Some(r) => r.clone(),
            None => {
                if self.remotes.len() >= MAX_REMOTE_CANDIDATES {
                    return;
                }
                // PRIORITY is what the sender's candidate would have: type preference 0 means
                // it sent through its relay, so the path is a relayed one.
                let kind = if prio >> 24 == u32::from(TYPE_PREF_RELAYED) {
                    CandidateKind::Relayed
                } else {
                    CandidateKind::PeerReflexive
                };
                let mut c = Candidate::new(kind, from, from, 0);
                c.priority = prio;
                self.remotes.push(c.clone());
                self.stats.peer_reflexive_learned += 1;
                c
            }
        };
        let Some(i) = self.add_pair(now, via, &remote) else {
            return;
        };
        let use_candidate = msg.get::<UseCandidate>().is_some();
        let extra = self.cfg.extra_checks;
        let creds = self.remote_creds.is_some();
        let p = &mut self.pairs[i];
        p.last_rx = Some(now);
        if use_candidate && self.role == Role::Controlled {
            p.nominated = true;
        }
        if p.state == PairState::Failed {
            p.state = PairState::Waiting;
            p.started_at = Some(now);
            p.interval = self.cfg.check_interval;
        }
        if !p.extra_given {
            p.extra_given = true;
            p.extra = p.extra.max(extra);
        }
        // Triggered check.
        if p.state != PairState::Succeeded || p.extra > 0 {
            let recently = p
                .last_sent
                .is_some_and(|t| now.saturating_duration_since(t) < TRIGGER_HOLDOFF);
            let at = if recently { now + TRIGGER_HOLDOFF } else { now };
            p.next_check_at = Some(p.next_check_at.map_or(at, |n| n.min(at)));
        }
        if creds && self.checks_started_at.is_none() {
            self.checks_started_at = Some(now);
        }
        if creds {
            self.pair_timers(now);
        }
        self.update_selection(now);
    }

    pub(super) fn respond_error(
        &mut self,
        now: Instant,
        via: Via,
        from: SocketAddr,
        msg: &Message<'_>,
        code: u16,
    ) {
        let pwd = self.cfg.local_pwd.clone();
        let resp = build_stun(MessageType::BINDING_ERROR, msg.transaction_id(), |b| {
            b.add(&ErrorCode::new(code))?;
            b.add_integrity(short_term_key(&pwd))?;
            b.add_fingerprint()
        });
        match resp {
            Ok(r) => self.emit(now, via, from, r),
            Err(_) => self.stats.send_errors += 1,
        }
    }

    pub(super) fn switch_role(&mut self, now: Instant, role: Role) {
        if self.role == role {
            return;
        }
        self.role = role;
        self.follow = Follow::default();
        self.stats.role_switches += 1;
        for i in 0..self.pairs.len() {
            let (l, r) = (self.pairs[i].local_priority, self.pairs[i].remote_priority);
            let prio = self.compute_priority(l, r);
            let p = &mut self.pairs[i];
            p.priority = prio;
            p.nominated = false;
            if p.state != PairState::Failed {
                // Recheck so nominations follow the new roles.
                p.extra = p.extra.max(1);
                p.next_check_at = Some(now);
            }
        }
    }

    pub(super) fn handle_response(
        &mut self,
        now: Instant,
        via: Via,
        from: SocketAddr,
        msg: &Message<'_>,
    ) {
        let tid = msg.transaction_id();
        let Some(txn) = self.txns.get(&tid).copied() else {
            self.stats.unmatched_responses += 1;
            return;
        };
        let Some((_, rpwd)) = self.remote_creds.as_ref() else {
            self.stats.unmatched_responses += 1;
            return;
        };
        if msg.verify_integrity(short_term_key(rpwd)).is_err() {
            self.stats.integrity_failures += 1;
            return;
        }
        let Some(p) = self.pairs.get(txn.pair) else {
            self.txns.remove(&tid);
            return;
        };
        if p.via != via || p.remote != from {
            self.stats.asymmetric_responses += 1;
            return;
        }
        self.txns.remove(&tid);
        if msg.class() == Class::Error {
            if let Some(Ok(e)) = msg.get::<ErrorCode>()
                && e.code == 487
            {
                self.stats.role_conflicts += 1;
                if self.role == txn.role {
                    self.switch_role(now, txn.role.opposite());
                }
                let p = &mut self.pairs[txn.pair];
                p.next_check_at = Some(now);
            }
            return;
        }
        self.stats.responses_received += 1;
        let extra = self.cfg.extra_checks;
        let role = self.role;
        let p = &mut self.pairs[txn.pair];
        p.rtt = Some(now.saturating_duration_since(txn.sent_at));
        p.last_rx = Some(now);
        if p.state != PairState::Succeeded {
            p.state = PairState::Succeeded;
            if !p.extra_given {
                p.extra_given = true;
                p.extra = extra;
                p.next_check_at = Some(now + self.cfg.check_interval);
            }
        }
        if txn.use_candidate && role == Role::Controlling {
            p.nominated = true;
        }
        if let Via::Socket(s) = via
            && let Some(Ok(XorMappedAddress(mapped))) = msg.get::<XorMappedAddress>()
            && !self.locals.iter().any(|l| l.cand.addr == mapped)
            && let Some(&base) = self.sockets.get(s)
        {
            let pref = self.socket_pref(s);
            let c = Candidate::new(CandidateKind::PeerReflexive, mapped, base, pref);
            self.add_local(c, false);
            self.stats.peer_reflexive_learned += 1;
        }
        self.update_selection(now);
    }
}
