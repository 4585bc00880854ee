//! The per-call machinery both roles share: the socket, the agent, media keys and the
//! session, what was sent and heard, and the moves on them (descriptions, trickle, the
//! agent's events, datagrams in, media ticks, close).

use super::*;

/// The per-call machinery both roles share.
pub(super) struct Leg {
    pub(super) role: IceRole,
    pub(super) sock: UdpSocket,
    /// The IPv6 socket beside an IPv4 `sock` (the agent's socket 1), when the host has IPv6.
    pub(super) sock6: Option<UdpSocket>,
    pub(super) agent: Agent,
    /// Our NAT classification, sent with our description.
    pub(super) nat: Option<peerlink_api::signaling::NatClass>,
    /// The peer's, from its description.
    pub(super) peer_nat: Option<peerlink_api::signaling::NatClass>,
    pub(super) keys: KeyExchange,
    pub(super) ufrag: String,
    pub(super) pwd: String,
    pub(super) call_id: Option<CallId>,
    /// Candidates found before the call id was known.
    pub(super) pending: Vec<Candidate>,
    pub(super) gathered_all: bool,
    pub(super) sent_eoc: bool,
    pub(super) relay_only: bool,
    pub(super) sent_cands: Vec<SocketAddr>,
    pub(super) local_cands: Vec<String>,
    pub(super) remote_cands: usize,
    pub(super) media: Option<MediaSession>,
    pub(super) path: Option<SelectedPath>,
    pub(super) path_changes: u64,
    pub(super) t_answer: Option<Instant>,
    pub(super) t_connected: Option<Instant>,
    pub(super) t_first_media: Option<Instant>,
    pub(super) input: Vec<i16>,
    pub(super) frame_idx: usize,
    pub(super) next_frame: Option<Instant>,
    pub(super) heard: Vec<i16>,
    pub(super) packets_sent: u64,
    pub(super) use_turn: bool,
    pub(super) peer_key: Option<[u8; 32]>,
    /// When to restart, when consent expired, the signaling outage (sans-IO).
    pub(super) rec: Recovery,
    pub(super) last_media_rx: Option<Instant>,
    pub(super) max_media_gap: Duration,
    pub(super) dropped_garbage: u64,
    pub(super) dropped_auth: u64,
    pub(super) dropped_replay: u64,
    pub(super) events: Option<tokio::sync::mpsc::UnboundedSender<CallEvent>>,
    /// File session: what to transfer, the QUIC identity, the peer's fingerprint.
    pub(super) file: Option<FileSide>,
    /// Where received QUIC datagrams go while a transfer runs.
    pub(super) quic_in: Option<Pipe>,
    /// Frames for signaling held while it is down.
    pub(super) sig_outbox: Vec<ClientMsg>,
    /// Connections of TURN allocations over TCP or TLS.
    pub(super) streams: Streams,
}

impl Leg {
    pub(super) async fn new(
        role: IceRole,
        sess: &SignalSession,
        opts: &CallOptions,
        input: Vec<i16>,
    ) -> Result<Self, CallError> {
        if opts.relay_only && !opts.use_turn {
            return Err(CallError::Connectivity(
                "relay-only needs TURN (drop --no-turn)".into(),
            ));
        }
        let sock = UdpSocket::bind(SocketAddr::new(opts.bind_ip, 0)).await?;
        let local = sock.local_addr()?;
        let sock6 = match v6_bind_ip(opts).await {
            Some(ip) => match UdpSocket::bind(SocketAddr::new(ip, 0)).await {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!("no IPv6 socket on {ip}: {e}");
                    None
                }
            },
            None => None,
        };
        let mut sockets = vec![local];
        if let Some(s) = &sock6 {
            sockets.push(s.local_addr()?);
        }
        let ufrag = random_token(8);
        let pwd = random_token(24);
        let mut cfg = AgentConfig::new(role, ufrag.clone(), pwd.clone(), opts.seed);
        cfg.stun_server = opts.stun;
        cfg.stun_server6 = opts.stun6;
        // A peer of the other family only can reach us through a relayed address of its family.
        cfg.relay_other_family = true;
        cfg.relay_only = opts.relay_only;
        if opts.relay_only {
            // Every pair is relayed: nothing direct to wait for.
            cfg.relay_fallback_after = Duration::ZERO;
        }
        if opts.use_turn {
            // A call still works without a relay (direct paths); say why in the log.
            match sess.turn_credentials().await {
                Ok(c) => {
                    let mut it = turn_configs(&c).into_iter();
                    cfg.turn = it.next();
                    cfg.turn_alternates = it.collect();
                }
                Err(e) if opts.relay_only => {
                    return Err(CallError::Connectivity(format!(
                        "relay-only call without TURN credentials: {e}"
                    )));
                }
                Err(e) => tracing::warn!("no TURN credentials, calling without a relay: {e}"),
            }
        }
        let agent = Agent::new(cfg, &sockets, Instant::now());
        Ok(Self {
            role,
            sock,
            sock6,
            agent,
            keys: KeyExchange::generate(&mut rand::rng()),
            ufrag,
            pwd,
            call_id: None,
            pending: Vec::new(),
            gathered_all: false,
            sent_eoc: false,
            relay_only: opts.relay_only,
            nat: opts.nat,
            peer_nat: None,
            sent_cands: Vec::new(),
            local_cands: Vec::new(),
            remote_cands: 0,
            media: None,
            path: None,
            path_changes: 0,
            t_answer: None,
            t_connected: None,
            t_first_media: None,
            input,
            frame_idx: 0,
            next_frame: None,
            heard: Vec::new(),
            packets_sent: 0,
            use_turn: opts.use_turn,
            peer_key: None,
            rec: Recovery::new(
                opts.consent_timeout,
                opts.restart_after_silence,
                opts.signal_grace,
            ),
            last_media_rx: None,
            max_media_gap: Duration::ZERO,
            dropped_garbage: 0,
            dropped_auth: 0,
            dropped_replay: 0,
            events: opts.events.clone(),
            file: None,
            quic_in: None,
            sig_outbox: Vec::new(),
            streams: Streams::new(opts.bind_ip, &turn_trust(opts)?),
        })
    }

    /// Our current description with every local candidate (for a re-sent restart).
    pub(super) fn full_desc(&mut self) -> SessionDesc {
        let mut d = self.desc();
        d.candidates = self
            .agent
            .local_candidates()
            .iter()
            .filter(|c| !self.relay_only || c.kind == CandidateKind::Relayed)
            .map(Into::into)
            .collect();
        d.end_of_candidates = self.sent_eoc;
        d
    }

    /// Our description with the candidates known now (they are then not trickled again).
    pub(super) fn desc(&mut self) -> SessionDesc {
        let mut candidates = Vec::new();
        for c in self.agent.local_candidates() {
            if self.relay_only && c.kind != CandidateKind::Relayed {
                continue;
            }
            if !self.sent_cands.contains(&c.addr) {
                self.sent_cands.push(c.addr);
                self.local_cands.push(format!("{:?} {}", c.kind, c.addr));
                candidates.push((&c).into());
            }
        }
        SessionDesc {
            ice_ufrag: self.ufrag.clone(),
            ice_pwd: self.pwd.clone(),
            public_key: base64::engine::general_purpose::STANDARD.encode(self.keys.public_key()),
            candidates,
            end_of_candidates: false,
            purpose: match &self.file {
                Some(f) => SessionPurpose::File {
                    name: f.name.clone(),
                    size: f.size,
                },
                None => SessionPurpose::Call,
            },
            transfer_fingerprint: self
                .file
                .as_ref()
                .map(|f| hex::encode(f.identity.fingerprint().0)),
            nat: self.nat,
        }
    }

    /// The peer's ICE credentials and candidates (an answer, an offer or a restart).
    pub(super) fn add_remote_ice(&mut self, d: &SessionDesc) {
        self.agent.set_remote_credentials(&d.ice_ufrag, &d.ice_pwd);
        let now = Instant::now();
        for c in &d.candidates {
            if let Ok(c) = Candidate::try_from(c) {
                self.agent.add_remote_candidate(c, now);
                self.remote_cands += 1;
            }
        }
        if d.end_of_candidates {
            self.agent.end_of_remote_candidates();
        }
    }

    pub(super) fn apply_remote(&mut self, d: &SessionDesc) -> Result<(), CallError> {
        self.add_remote_ice(d);
        if d.nat.is_some() {
            self.peer_nat = d.nat;
        }
        let peer_key = decode_key(&d.public_key)?;
        self.peer_key = Some(peer_key);
        if let Some(f) = self.file.as_mut() {
            let fp = d
                .transfer_fingerprint
                .as_deref()
                .ok_or_else(|| CallError::BadDesc("file session without a fingerprint".into()))?;
            f.peer_fp = Some(
                fp.parse()
                    .map_err(|e| CallError::BadDesc(format!("transfer fingerprint: {e}")))?,
            );
            // No media in a file session.
            return Ok(());
        }
        let call_id = self
            .call_id
            .clone()
            .ok_or_else(|| CallError::BadDesc("no call id yet".into()))?;
        let media_role = match self.role {
            IceRole::Controlling => MediaRole::Caller,
            IceRole::Controlled => MediaRole::Callee,
        };
        let keys = self
            .keys
            .derive(&peer_key, media_role, call_id.0.as_bytes())
            .map_err(|e| CallError::BadDesc(format!("key agreement: {e}")))?;
        self.media = Some(MediaSession::new(
            &MediaConfig::default(),
            keys,
            Instant::now(),
            &mut rand::rng(),
        )?);
        Ok(())
    }

    /// Trickle what the agent found, once the call id is known.
    pub(super) async fn trickle(&mut self, sess: &mut SignalSession) -> Result<(), CallError> {
        let Some(call_id) = self.call_id.clone() else {
            return Ok(());
        };
        for c in std::mem::take(&mut self.pending) {
            if self.sent_cands.contains(&c.addr)
                || (self.relay_only && c.kind != CandidateKind::Relayed)
            {
                continue;
            }
            self.sent_cands.push(c.addr);
            self.local_cands.push(format!("{:?} {}", c.kind, c.addr));
            let m = ClientMsg::Candidate {
                call_id: call_id.clone(),
                candidate: (&c).into(),
            };
            self.signal(sess, m).await;
        }
        if self.gathered_all && !self.sent_eoc {
            self.sent_eoc = true;
            self.signal(sess, ClientMsg::EndOfCandidates { call_id })
                .await;
        }
        Ok(())
    }

    /// Agent events -> signaling / state. Returns an error on connectivity loss.
    pub(super) async fn handle_events(
        &mut self,
        sess: &mut SignalSession,
    ) -> Result<(), CallError> {
        while let Some(ev) = self.agent.poll_event() {
            match ev {
                Event::LocalCandidate(c) => self.pending.push(c),
                Event::GatheringComplete => self.gathered_all = true,
                Event::Connected { path } => {
                    // After a restart the agent connects anew: a path change for the call.
                    let first = self.t_connected.is_none();
                    if !first {
                        self.path_changes += 1;
                    }
                    let now = Instant::now();
                    self.t_connected.get_or_insert(now);
                    self.rec.on_path(now);
                    self.path = Some(path);
                    self.emit(CallEvent::Path { path, first });
                }
                Event::PathChanged { path } => {
                    self.path = Some(path);
                    self.path_changes += 1;
                    self.rec.on_peer_heard(Instant::now());
                    self.emit(CallEvent::Path { path, first: false });
                }
                Event::Disconnected { reason } => {
                    if self.t_connected.is_none() && self.rec.restarts() == 0 {
                        // Never connected (e.g. every pair failed): nothing to recover.
                        return Err(CallError::Connectivity(format!("{reason:?}")));
                    }
                    // Not the end: the recovery logic restarts (or ends on consent expiry).
                    tracing::info!("path lost ({reason:?}); recovering");
                    self.rec.on_path_lost();
                }
            }
        }
        self.trickle(sess).await
    }

    pub(super) async fn flush(&mut self) -> Result<(), CallError> {
        while let Some(t) = self.agent.poll_transmit() {
            // Socket 0, or 1 for the IPv6 socket. A send error on one datagram (e.g. an
            // unreachable candidate) must not end the call.
            if let Err(e) = self.socket(t.socket).send_to(&t.payload, t.to).await {
                tracing::debug!("send to {} failed: {e}", t.to);
            }
        }
        self.flush_streams();
        Ok(())
    }

    /// Carries out the agent's operations on TURN stream connections.
    pub(super) fn flush_streams(&mut self) {
        while let Some(op) = self.agent.poll_stream_op() {
            self.streams.apply(op);
        }
    }

    /// An event of a TURN stream connection.
    pub(super) fn on_stream(&mut self, server: SocketAddr, ev: StreamEvent) {
        let now = Instant::now();
        match ev {
            StreamEvent::Data(bytes) => {
                for app in self.agent.handle_stream_data(now, server, &bytes) {
                    let crate::agent::AppData::Payload { data, .. } = app;
                    self.on_app(now, data);
                }
            }
            StreamEvent::Closed(why) => {
                tracing::info!("TURN stream ended: {why}");
                self.agent.handle_stream_closed(now, server);
            }
        }
        self.flush_streams();
    }

    pub(super) async fn send_app(&mut self, payload: &[u8]) -> Result<(), CallError> {
        match self.agent.send(Instant::now(), payload) {
            Ok(Some(t)) => {
                if let Err(e) = self.socket(t.socket).send_to(&t.payload, t.to).await {
                    tracing::debug!("media send to {} failed: {e}", t.to);
                }
            }
            Ok(None) => self.flush_streams(),
            Err(e) => tracing::debug!("media not sent: {e}"),
        }
        Ok(())
    }

    pub(super) fn emit(&self, ev: CallEvent) {
        if let Some(tx) = &self.events {
            let _ = tx.send(ev);
        }
    }

    /// The socket of the agent's index `i` (0: `sock`, 1: `sock6`).
    pub(super) fn socket(&self, i: usize) -> &UdpSocket {
        match (i, &self.sock6) {
            (1, Some(s)) => s,
            _ => &self.sock,
        }
    }

    /// A datagram of `n` bytes in `buf` from `from` on the agent's socket `socket`.
    pub(super) fn on_datagram_at(&mut self, socket: usize, n: usize, from: SocketAddr, buf: &[u8]) {
        let now = Instant::now();
        let data = &buf[..n];
        // RFC 7983: 4-63 is nobody's (ZRTP/DTLS, not used here).
        if matches!(data.first(), None | Some(4..=63)) {
            self.dropped_garbage += 1;
        }
        let Some(crate::agent::AppData::Payload { data, .. }) =
            self.agent.handle_datagram(now, socket, from, data)
        else {
            return;
        };
        self.on_app(now, data);
    }

    /// Application data the agent unwrapped (from a datagram or a TURN stream).
    pub(super) fn on_app(&mut self, now: Instant, data: std::borrow::Cow<'_, [u8]>) {
        if !matches!(data.first(), Some(128..=191)) {
            // QUIC (64-127, 192-255): the file transfer's, if one runs.
            match &self.quic_in {
                Some(pipe) => {
                    self.rec.on_peer_heard(now);
                    // A full pipe drops, like UDP; QUIC recovers.
                    let _ = pipe.try_push(data.to_vec());
                }
                None => self.dropped_garbage += 1,
            }
            return;
        }
        let Some(m) = self.media.as_mut() else {
            return;
        };
        match m.handle_packet(now, &data) {
            Received::Media(_) => {
                self.t_first_media.get_or_insert(now);
                self.rec.on_peer_heard(now);
                if let Some(prev) = self.last_media_rx {
                    self.max_media_gap =
                        self.max_media_gap.max(now.saturating_duration_since(prev));
                }
                self.last_media_rx = Some(now);
            }
            Received::Report(_) => self.rec.on_peer_heard(now),
            Received::Dropped(ReceiveDrop::Crypto(DropReason::AuthFailed)) => {
                self.dropped_auth += 1;
            }
            Received::Dropped(ReceiveDrop::Crypto(DropReason::Replayed | DropReason::TooOld)) => {
                self.dropped_replay += 1;
            }
            Received::Dropped(_) => self.dropped_garbage += 1,
        }
    }

    /// Releases the TURN allocation and waits (bounded) for the relay to confirm.
    pub(super) async fn close(&mut self) {
        let now = Instant::now();
        self.agent.close(now);
        let deadline = now + Duration::from_secs(2);
        let mut buf = vec![0u8; 65536];
        loop {
            let _ = self.flush().await;
            if self.agent.is_released() || Instant::now() >= deadline {
                break;
            }
            let wake = self
                .agent
                .poll_timeout()
                .unwrap_or(deadline)
                .min(deadline)
                .max(Instant::now());
            tokio::select! {
                r = recv_any(&self.sock, self.sock6.as_ref(), &mut buf) => {
                    if let Ok((i, n, from)) = r {
                        let _ = self.agent.handle_datagram(Instant::now(), i, from, &buf[..n]);
                    }
                }
                (server, ev) = self.streams.recv() => self.on_stream(server, ev),
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(wake)) => {
                    self.agent.handle_timeout(Instant::now());
                }
            }
        }
        if !self.agent.is_released() {
            tracing::warn!("TURN allocation release not confirmed; it expires on the relay");
        }
    }

    /// Media timers: send due frames (once connected), reports, playout.
    pub(super) async fn media_tick(&mut self, send_frames: bool) -> Result<(), CallError> {
        let now = Instant::now();
        let connected = self.path.is_some();
        if connected && send_frames && self.media.is_some() {
            let next = *self.next_frame.get_or_insert(now);
            if now >= next {
                let start = (self.frame_idx * FRAME_SAMPLES) % self.input.len().max(1);
                let mut pcm = vec![0i16; FRAME_SAMPLES];
                let end = (start + FRAME_SAMPLES).min(self.input.len());
                if end > start {
                    pcm[..end - start].copy_from_slice(&self.input[start..end]);
                }
                self.frame_idx += 1;
                self.next_frame = Some(next + FRAME);
                let pkt = match self.media.as_mut() {
                    Some(m) => m.send_frame(now, &pcm)?,
                    None => None,
                };
                if let Some(p) = pkt {
                    self.send_app(&p).await?;
                    self.packets_sent += 1;
                }
            }
        }
        let mut reports = Vec::new();
        if let Some(m) = self.media.as_mut() {
            while let Some(f) = m.poll_frame(now) {
                if self.t_first_media.is_some() {
                    self.heard.extend_from_slice(&f);
                }
            }
            if connected {
                while let Some(r) = m.poll_transmit(now) {
                    reports.push(r);
                }
            }
        }
        for r in reports {
            self.send_app(&r).await?;
        }
        Ok(())
    }

    pub(super) fn wake(&self, send_frames: bool, deadline: Instant) -> Instant {
        let mut w = deadline;
        if let Some(t) = self.agent.poll_timeout() {
            w = w.min(t);
        }
        if let Some(m) = &self.media {
            w = w.min(m.poll_timeout());
        }
        if send_frames && self.path.is_some() && self.media.is_some() {
            w = w.min(self.next_frame.unwrap_or_else(Instant::now));
        }
        if let Some(t) = self.rec.path_timeout(self.file.is_some()) {
            w = w.min(t);
        }
        w
    }
}

/// Every usable relay and transport of the credentials, in the order signaling gave them
/// (the agent tries them as its ladder: UDP, then TCP, then TLS).
pub(super) fn turn_configs(c: &TurnCredentials) -> Vec<TurnConfig> {
    let mut out: Vec<TurnConfig> = Vec::new();
    for u in c.uris.iter().filter_map(|u| TurnUri::parse(u)) {
        if !out
            .iter()
            .any(|t| t.server == u.addr && t.transport == u.transport)
        {
            out.push(TurnConfig {
                server: u.addr,
                transport: u.transport,
                username: c.username.clone(),
                password: c.password.clone(),
            });
        }
    }
    out
}

/// The roots TURN over TLS trusts: the call's, else the system's.
fn turn_trust(opts: &CallOptions) -> Result<peerlink_api::tls::Trust, CallError> {
    match &opts.turn_trust {
        Some(t) => Ok(t.clone()),
        None => peerlink_api::tls::Trust::system_shared()
            .map_err(|e| CallError::Connectivity(format!("TLS trust for TURN: {e}"))),
    }
}
