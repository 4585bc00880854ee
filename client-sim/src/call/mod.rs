//! A call over real UDP sockets (tokio): signaling ([`SignalSession`]) carries the invite /
//! accept with ICE credentials, candidates (trickled) and the X25519 public key; the sans-IO
//! connectivity agent ([`crate::agent::Agent`]) gathers (host, server-reflexive from
//! signaling's STUN port, relayed from a TURN allocation with signaling-issued credentials),
//! runs the checks and selects a path; media ([`MediaSession`]: Opus, AES-GCM keys derived
//! from the X25519 exchange bound to the call id) flows on that path with 20 ms pacing, and
//! what is heard is recorded. The result is a [`CallReport`].
//!
//! One UDP socket per call, bound on the given host address. Everything that arrives on it is
//! handed to the agent, which keeps STUN/TURN for itself and returns media payloads.
//!
//! Recovery: when neither media nor reports have come from the peer for `restart_after_silence`
//! (1 s; media flows every 20 ms; its consent checks do not count, as they do not prove its
//! media reaches us) or the agent reports the path lost, the call makes an ICE
//! restart: fresh TURN credentials, new ICE credentials, fresh gathering (the relay that
//! carried a dead relayed path is tried last, an unanswered relay is skipped after 400 ms),
//! and an `ice_restart` through signaling; the peer restarts too once (glare: both restarting
//! at once apply each other's description, no ping-pong). Media keys stay (the X25519 exchange
//! is kept; a changed public key ends the call). Media keeps going on an old direct path
//! until the restart selects a new one (a restart on a healthy path costs no gap). No packet
//! from the peer for `consent_timeout` (5 s) ends the call ("consent expired"), and it is
//! hung up via signaling. At the end the TURN allocation is released (Refresh LIFETIME 0).
//!
//! Signaling loss: when the WebSocket fails once the call is answered (read/write error, a
//! close, a `goodbye`), the call goes on: media keeps flowing on the current path, ICE
//! restarts still run, and frames for signaling are queued. The session is reopened at once
//! (same device, `resume_from` = last acked seq; after a `goodbye` once its
//! `reconnect_after_ms` has passed), retried after 100, 200, 400 ms ... each attempt bounded,
//! within `signal_grace` (4 s; signaling keeps an answered call for its `--call-grace`, 5 s by
//! default, and delivers frames held for it after `welcome`). Once reconnected the queue is
//! sent and, if our ICE restart is still unanswered 150 ms later (a frame written into the
//! dead socket may be lost), its full description is sent again; still unanswered 500 ms
//! after that (a glare whose other half was lost), a new restart follows. Reconnects are
//! counted in
//! `signal_reconnects`. No reconnect within the grace ends the call (`end`
//! "signaling_lost", "signaling lost: ...").
//!
//! Bad media input (garbage, wrong key, replays, unknown sources) is dropped and counted in
//! [`MediaFigures`], never played.
//!
//! What it is not: no multi-party, no video, no device audio (WAV in, WAV out).
//!
//! Here: the call's `Leg` (socket, agent, media), its event loop and the entry points; in
//! `recovery`, the sans-IO decisions of restarts, consent and signaling reconnects (tested on
//! a virtual clock); in `signal_link`, the link to signaling that carries them out; in `file`,
//! the file part of a file session; in `report`, what a session reports.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine as _;
use peerlink_api::signaling::{
    CallId, ClientMsg, EndReason, ServerMsg, SessionDesc, SessionPurpose, TurnCredentials,
};
use rand::{Rng as _, RngCore as _};
use tokio::net::UdpSocket;

use crate::agent::{
    Agent, AgentConfig, Candidate, CandidateKind, Event, PathKind, Role as IceRole, SelectedPath,
    TurnConfig,
};
use crate::media::{
    DropReason, FRAME, FRAME_SAMPLES, KeyExchange, MediaConfig, MediaSession, ReceiveDrop,
    Received, Role as MediaRole, audio,
};
use crate::transfer::path::{VIRTUAL_CLIENT_ADDR, VIRTUAL_SERVER_ADDR};
use crate::transfer::{
    DatagramPath, EndpointOptions, Fingerprint, Pipe, ProgressBar, TransferIdentity,
    TransferReport, TransferRole,
};
use peerlink_api::signaling_client::{Reopened, SignalError, SignalSession, parse_turn_uri};

mod file;
mod recovery;
mod report;
mod signal_link;

use file::*;
use recovery::*;
use report::*;
pub use report::{CallReport, DeclinedReport, FileReport, MediaFigures, SessionReport};
use signal_link::*;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Signaling failed.
    #[error("signaling: {0}")]
    Signal(#[from] SignalError),
    /// Socket failure.
    #[error("UDP socket: {0}")]
    Io(#[from] std::io::Error),
    /// The media pipeline failed.
    #[error("media: {0}")]
    Media(#[from] crate::media::MediaError),
    /// The peer's key or description was unusable.
    #[error("bad session description: {0}")]
    BadDesc(String),
    /// The call ended before it connected.
    #[error("call ended before connecting: {0:?}")]
    Ended(EndReason),
    /// Connectivity was lost or never found.
    #[error("connectivity: {0}")]
    Connectivity(String),
    /// A bounded wait ran out.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// Audio file I/O.
    #[error("audio: {0}")]
    Audio(String),
    /// The file transfer of a file session failed.
    #[error("file transfer: {0}")]
    Transfer(String),
}

/// How to run a call.
#[derive(Clone, Debug)]
pub struct CallOptions {
    /// Host address the call's UDP socket binds on (default 127.0.0.1).
    pub bind_ip: IpAddr,
    /// Signaling's STUN responder (server-reflexive candidate), if known.
    pub stun: Option<SocketAddr>,
    /// Ask signaling for TURN credentials and gather a relayed candidate (default true).
    pub use_turn: bool,
    /// Signal only relayed candidates (like WebRTC's relay-only policy: host addresses are not
    /// revealed and every pair goes through a TURN relay). Needs `use_turn`.
    pub relay_only: bool,
    /// WAV to send (48 kHz mono 16-bit); default: the speech-like generator.
    pub audio: Option<PathBuf>,
    /// Where to record what is heard.
    pub record: Option<PathBuf>,
    /// Media duration once connected (the caller hangs up after it; default 10 s).
    pub duration: Duration,
    /// Bound on ringing + connecting (default 40 s).
    pub setup_timeout: Duration,
    /// Seed for the agent and the speech generator.
    pub seed: u64,
    /// No packet from the peer this long ends the call ("consent expired"; default 5 s).
    pub consent_timeout: Duration,
    /// No packet from the peer this long (while media is expected) starts an ICE restart
    /// (default 1 s).
    pub restart_after_silence: Duration,
    /// Where to send [`CallEvent`]s while the call runs (observability, tests).
    pub events: Option<tokio::sync::mpsc::UnboundedSender<CallEvent>>,
    /// Callee: accept file sessions and save the files here (without it they are declined).
    pub save_dir: Option<PathBuf>,
    /// Draw a transfer progress bar on stderr (file sessions; hidden when not a TTY).
    pub progress: bool,
    /// How long an answered call waits for signaling to come back after its WebSocket failed
    /// (default 4 s, within signaling's default call grace of 5 s); then it ends
    /// ("signaling lost").
    pub signal_grace: Duration,
}

/// Something that happened during a call (sent to [`CallOptions::events`]).
#[derive(Clone, Debug)]
pub enum CallEvent {
    /// A path was selected (first time, or again after a restart / path change).
    Path {
        /// The path.
        path: SelectedPath,
        /// True for the first path of the call.
        first: bool,
    },
    /// The signaling WebSocket failed mid-call (`up: false`) or was reconnected (`up: true`).
    Signaling {
        /// Whether signaling is usable again.
        up: bool,
    },
    /// This side made an ICE restart.
    Restarted {
        /// Restarts so far.
        restarts: u64,
        /// Why.
        reason: String,
    },
}

impl Default for CallOptions {
    fn default() -> Self {
        Self {
            bind_ip: IpAddr::from([127, 0, 0, 1]),
            stun: None,
            use_turn: true,
            relay_only: false,
            audio: None,
            record: None,
            duration: Duration::from_secs(10),
            setup_timeout: Duration::from_secs(40),
            seed: rand::rng().next_u64(),
            consent_timeout: Duration::from_secs(5),
            restart_after_silence: Duration::from_secs(1),
            events: None,
            save_dir: None,
            progress: false,
            signal_grace: Duration::from_secs(4),
        }
    }
}

fn random_token(len: usize) -> String {
    const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| char::from(CHARS[rng.random_range(0..CHARS.len())]))
        .collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn decode_key(b64: &str) -> Result<[u8; 32], CallError> {
    let v = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| CallError::BadDesc(format!("public key: {e}")))?;
    v.try_into()
        .map_err(|_| CallError::BadDesc("public key is not 32 bytes".into()))
}

/// The per-call machinery both roles share.
struct Leg {
    role: IceRole,
    sock: UdpSocket,
    agent: Agent,
    keys: KeyExchange,
    ufrag: String,
    pwd: String,
    call_id: Option<CallId>,
    /// Candidates found before the call id was known.
    pending: Vec<Candidate>,
    gathered_all: bool,
    sent_eoc: bool,
    relay_only: bool,
    sent_cands: Vec<SocketAddr>,
    local_cands: Vec<String>,
    remote_cands: usize,
    media: Option<MediaSession>,
    path: Option<SelectedPath>,
    path_changes: u64,
    t_answer: Option<Instant>,
    t_connected: Option<Instant>,
    t_first_media: Option<Instant>,
    input: Vec<i16>,
    frame_idx: usize,
    next_frame: Option<Instant>,
    heard: Vec<i16>,
    packets_sent: u64,
    use_turn: bool,
    peer_key: Option<[u8; 32]>,
    /// When to restart, when consent expired, the signaling outage (sans-IO).
    rec: Recovery,
    last_media_rx: Option<Instant>,
    max_media_gap: Duration,
    dropped_garbage: u64,
    dropped_auth: u64,
    dropped_replay: u64,
    events: Option<tokio::sync::mpsc::UnboundedSender<CallEvent>>,
    /// File session: what to transfer, the QUIC identity, the peer's fingerprint.
    file: Option<FileSide>,
    /// Where received QUIC datagrams go while a transfer runs.
    quic_in: Option<Pipe>,
    /// Frames for signaling held while it is down.
    sig_outbox: Vec<ClientMsg>,
}

impl Leg {
    async fn new(
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
        let ufrag = random_token(8);
        let pwd = random_token(24);
        let mut cfg = AgentConfig::new(role, ufrag.clone(), pwd.clone(), opts.seed);
        cfg.stun_server = opts.stun;
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
        let agent = Agent::new(cfg, &[local], Instant::now());
        Ok(Self {
            role,
            sock,
            agent,
            keys: KeyExchange::generate(&mut rand::rng()),
            ufrag,
            pwd,
            call_id: None,
            pending: Vec::new(),
            gathered_all: false,
            sent_eoc: false,
            relay_only: opts.relay_only,
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
        })
    }

    /// Our current description with every local candidate (for a re-sent restart).
    fn full_desc(&mut self) -> SessionDesc {
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
    fn desc(&mut self) -> SessionDesc {
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
        }
    }

    /// The peer's ICE credentials and candidates (an answer, an offer or a restart).
    fn add_remote_ice(&mut self, d: &SessionDesc) {
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

    fn apply_remote(&mut self, d: &SessionDesc) -> Result<(), CallError> {
        self.add_remote_ice(d);
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
    async fn trickle(&mut self, sess: &mut SignalSession) -> Result<(), CallError> {
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
    async fn handle_events(&mut self, sess: &mut SignalSession) -> Result<(), CallError> {
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

    async fn flush(&mut self) -> Result<(), CallError> {
        while let Some(t) = self.agent.poll_transmit() {
            // One socket per call: index 0. A send error on one datagram (e.g. an unreachable
            // candidate) must not end the call.
            if let Err(e) = self.sock.send_to(&t.payload, t.to).await {
                tracing::debug!("send to {} failed: {e}", t.to);
            }
        }
        Ok(())
    }

    async fn send_app(&mut self, payload: &[u8]) -> Result<(), CallError> {
        match self.agent.send(Instant::now(), payload) {
            Ok(t) => {
                if let Err(e) = self.sock.send_to(&t.payload, t.to).await {
                    tracing::debug!("media send to {} failed: {e}", t.to);
                }
            }
            Err(e) => tracing::debug!("media not sent: {e}"),
        }
        Ok(())
    }

    fn emit(&self, ev: CallEvent) {
        if let Some(tx) = &self.events {
            let _ = tx.send(ev);
        }
    }

    fn on_datagram(&mut self, n: usize, from: SocketAddr, buf: &[u8]) {
        let now = Instant::now();
        let data = &buf[..n];
        // RFC 7983: 4-63 is nobody's (ZRTP/DTLS, not used here).
        if matches!(data.first(), None | Some(4..=63)) {
            self.dropped_garbage += 1;
        }
        let Some(crate::agent::AppData::Payload { data, .. }) =
            self.agent.handle_datagram(now, 0, from, data)
        else {
            return;
        };
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
    async fn close(&mut self) {
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
                r = self.sock.recv_from(&mut buf) => {
                    if let Ok((n, from)) = r {
                        let _ = self.agent.handle_datagram(Instant::now(), 0, from, &buf[..n]);
                    }
                }
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
    async fn media_tick(&mut self, send_frames: bool) -> Result<(), CallError> {
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

    fn wake(&self, send_frames: bool, deadline: Instant) -> Instant {
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

/// Every usable relay of the credentials, in the order signaling gave them.
fn turn_configs(c: &TurnCredentials) -> Vec<TurnConfig> {
    let mut out: Vec<TurnConfig> = Vec::new();
    for server in c.uris.iter().filter_map(|u| parse_turn_uri(u)) {
        if !out.iter().any(|t| t.server == server) {
            out.push(TurnConfig {
                server,
                username: c.username.clone(),
                password: c.password.clone(),
            });
        }
    }
    out
}

fn load_input(opts: &CallOptions, seconds: f64, seed: u64) -> Result<Vec<i16>, CallError> {
    match &opts.audio {
        Some(p) => audio::read_wav(p).map_err(|e| CallError::Audio(e.to_string())),
        None => Ok(audio::speech_like(seconds.max(1.0), seed)),
    }
}

fn finish(leg: &Leg, opts: &CallOptions, mut r: CallReport) -> Result<CallReport, CallError> {
    if let Some(p) = &opts.record {
        audio::write_wav(p, &leg.heard).map_err(|e| CallError::Audio(e.to_string()))?;
        r.recording = Some(p.display().to_string());
    }
    Ok(r)
}

/// What the shared loop should do on a call event.
enum Flow {
    Continue,
    Ended(EndReason),
}

/// The transfer task of a file session.
type TransferTask = tokio::task::JoinHandle<Result<TransferReport, String>>;

/// Next datagram QUIC wants sent (pending forever without a transfer).
async fn next_out(pipe: Option<&Pipe>) -> Option<Vec<u8>> {
    match pipe {
        Some(p) => p.pop().await,
        None => std::future::pending().await,
    }
}

/// The transfer's outcome (pending forever without a transfer).
async fn transfer_done(task: Option<&mut TransferTask>) -> Result<TransferReport, String> {
    match task {
        Some(t) => t
            .await
            .unwrap_or_else(|e| Err(format!("transfer task failed: {e}"))),
        None => std::future::pending().await,
    }
}

/// Why the call loop returned.
enum LoopEnd {
    /// The file transfer finished (its result is in the leg).
    FileDone,
    /// The media duration (caller) or the hard deadline passed.
    TimeUp,
    /// Signaling ended the call.
    Peer(EndReason),
    /// Nothing from the peer for the consent timeout.
    ConsentExpired,
    /// Signaling could not be reopened within the grace.
    SignalLost,
}

/// A reconnect attempt in flight (owns everything it needs; the call goes on meanwhile).
type Reopening = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<Result<Reopened, SignalError>, tokio::time::error::Elapsed>,
            > + Send,
    >,
>;

/// Handle one signaling frame of the call.
async fn on_signal(
    leg: &mut Leg,
    sess: &mut SignalSession,
    m: ServerMsg,
) -> Result<Flow, CallError> {
    let ours = |id: &CallId| leg.call_id.as_ref() == Some(id);
    match m {
        ServerMsg::Candidate { call_id, candidate } if ours(&call_id) => {
            if let Ok(c) = Candidate::try_from(&candidate) {
                leg.agent.add_remote_candidate(c, Instant::now());
                leg.remote_cands += 1;
            }
        }
        ServerMsg::EndOfCandidates { call_id } if ours(&call_id) => {
            leg.agent.end_of_remote_candidates();
        }
        ServerMsg::IceRestart { call_id, desc } if ours(&call_id) => {
            leg.on_remote_restart(sess, &desc).await?;
        }
        ServerMsg::CallEnded { call_id, reason } if ours(&call_id) => {
            return Ok(Flow::Ended(reason));
        }
        _ => {}
    }
    Ok(Flow::Continue)
}

/// Drive the call until `deadline` (media for the caller's duration), a `call_ended`, or
/// consent expiry. `connect_deadline` bounds the time to the first selected path.
async fn run_loop(
    leg: &mut Leg,
    sess: &mut SignalSession,
    media_duration: Option<Duration>,
    hard_deadline: Instant,
    connect_deadline: Instant,
) -> Result<LoopEnd, CallError> {
    let mut buf = vec![0u8; 65536];
    let mut xfer: Option<(Pipe, TransferTask)> = None;
    // Receiver: after the transfer, wait this long for the sender's hangup.
    let mut linger: Option<Instant> = None;
    let mut reopening: Option<(Reopening, Duration)> = None;
    loop {
        leg.flush().await?;
        leg.handle_events(sess).await?;
        leg.flush().await?;
        let now = Instant::now();
        match leg.rec.poll_signal(now) {
            SignalNext::Fine => {}
            SignalNext::Lost => return Ok(LoopEnd::SignalLost),
            SignalNext::Reconnect(bound) => {
                reopening = Some((Box::pin(tokio::time::timeout(bound, sess.reopen())), bound));
            }
            SignalNext::ResendRestart => {
                if let Some(call_id) = leg.call_id.clone() {
                    tracing::info!("re-sending our unanswered ICE restart after the reconnect");
                    let desc = leg.full_desc();
                    leg.signal(sess, ClientMsg::IceRestart { call_id, desc })
                        .await;
                }
            }
            SignalNext::Restart(why) => {
                leg.restart(sess, why).await?;
                continue;
            }
        }
        if leg.t_connected.is_none() && now >= connect_deadline {
            return Err(CallError::Timeout("a connected path"));
        }
        if linger.is_some_and(|t| now >= t) {
            return Ok(LoopEnd::FileDone);
        }
        if xfer.is_none()
            && leg.t_connected.is_some()
            && leg.file.as_ref().is_some_and(|f| f.result.is_none())
        {
            xfer = Some(leg.start_transfer()?);
        }
        if let (Some(d), Some(tc)) = (media_duration, leg.t_connected)
            && now >= tc + d
        {
            return Ok(LoopEnd::TimeUp);
        }
        if now >= hard_deadline {
            return Ok(LoopEnd::TimeUp);
        }
        match leg
            .rec
            .poll_path(now, leg.agent.selected_last_rx(), leg.file.is_some())
        {
            PathNext::Fine => {}
            PathNext::ConsentExpired => return Ok(LoopEnd::ConsentExpired),
            PathNext::Restart(why) => {
                leg.restart(sess, why).await?;
                continue;
            }
        }
        leg.media_tick(true).await?;
        let mut deadline = hard_deadline;
        if leg.t_connected.is_none() {
            deadline = deadline.min(connect_deadline);
        }
        if let (Some(d), Some(tc)) = (media_duration, leg.t_connected) {
            deadline = deadline.min(tc + d);
        }
        if let Some(t) = linger {
            deadline = deadline.min(t);
        }
        if let Some(t) = leg.rec.signal_timeout() {
            deadline = deadline.min(t);
        }
        let sig_up = !leg.rec.signal_down();
        let wake = tokio::time::Instant::from_std(leg.wake(true, deadline).max(now));
        let out = xfer.as_ref().map(|x| x.0.clone());
        tokio::select! {
            r = leg.sock.recv_from(&mut buf) => {
                match r {
                    Ok((n, from)) => leg.on_datagram(n, from, &buf),
                    // ICMP-induced errors (port unreachable) on UDP are not fatal.
                    Err(e) => tracing::debug!("recv: {e}"),
                }
            }
            Some(d) = next_out(out.as_ref()) => {
                leg.send_app(&d).await?;
            }
            r = transfer_done(xfer.as_mut().map(|x| &mut x.1)) => {
                xfer = None;
                if let Some(p) = leg.quic_in.take() {
                    p.close();
                }
                let ok = r.is_ok();
                if let Some(f) = leg.file.as_mut() {
                    f.result = Some(r);
                }
                if leg.role == IceRole::Controlling || !ok {
                    return Ok(LoopEnd::FileDone);
                }
                linger = Some(Instant::now() + Duration::from_secs(3));
            }
            r = reopened(reopening.as_mut().map(|(f, _)| f)) => {
                let bound = reopening.take().map_or(Duration::ZERO, |(_, b)| b);
                leg.reconnected(sess, r, bound).await;
            }
            m = sess.recv(), if sig_up => {
                let m = match m {
                    Ok(ServerMsg::Goodbye { reason, reconnect_after_ms }) => {
                        let at = Instant::now() + Duration::from_millis(reconnect_after_ms);
                        leg.signal_lost(format!("goodbye: {reason}"), at);
                        continue;
                    }
                    Ok(m) => m,
                    Err(e) if signal_fatal(&e) => return Err(e.into()),
                    Err(e) => {
                        leg.signal_lost(e.to_string(), Instant::now());
                        continue;
                    }
                };
                if let Flow::Ended(r) = on_signal(leg, sess, m).await? {
                    if let Some((_, task)) = xfer.take() {
                        // The sender hangs up after our verdict: let the task finish.
                        let r = tokio::time::timeout(Duration::from_secs(5), task)
                            .await
                            .map_err(|_| "transfer did not finish after hangup".to_owned())
                            .and_then(|j| j.unwrap_or_else(|e| Err(e.to_string())));
                        if let Some(f) = leg.file.as_mut() {
                            f.result = Some(r);
                        }
                    }
                    return Ok(LoopEnd::Peer(r));
                }
            }
            _ = tokio::time::sleep_until(wake) => {
                leg.agent.handle_timeout(Instant::now());
            }
        }
    }
}

async fn hangup(sess: &mut SignalSession, call_id: Option<&CallId>) -> Result<(), SignalError> {
    match call_id {
        Some(c) => tokio::time::timeout(
            SIG_WRITE,
            sess.send(&ClientMsg::Hangup { call_id: c.clone() }),
        )
        .await
        .map_err(|_| SignalError::Timeout(SIG_WRITE, "hangup"))?,
        None => Ok(()),
    }
}

/// Runs the connected part of a call, hangs up as needed, releases the relay allocation and
/// says how the call ended: (machine-readable end, text).
async fn run_and_end(
    leg: &mut Leg,
    sess: &mut SignalSession,
    media_duration: Option<Duration>,
    hard_deadline: Instant,
    connect_deadline: Instant,
) -> Result<(&'static str, String), CallError> {
    let res = run_loop(leg, sess, media_duration, hard_deadline, connect_deadline).await;
    let call_id = leg.call_id.clone();
    // Ending while signaling is down: get it back (within the grace) to say so.
    if matches!(&res, Ok(e) if !matches!(e, LoopEnd::SignalLost))
        && leg.rec.signal_down()
        && !leg.restore_signal_now(sess).await
    {
        tracing::warn!("signaling still down at the end of the call; the server ends it");
    }
    let out = match res {
        Ok(LoopEnd::SignalLost) => {
            let why = leg.rec.last_signal_error().unwrap_or_default().to_owned();
            Ok((
                "signaling_lost",
                format!(
                    "signaling lost: not reconnected within {:.1} s ({why})",
                    leg.rec.signal_grace().as_secs_f64()
                ),
            ))
        }
        Ok(LoopEnd::Peer(EndReason::Hangup)) => Ok((
            "peer_hangup",
            format!("peer ended the call ({:?})", EndReason::Hangup),
        )),
        Ok(LoopEnd::Peer(r)) => Ok(("peer_ended", format!("peer ended the call ({r:?})"))),
        Ok(LoopEnd::ConsentExpired) => {
            let _ = hangup(sess, call_id.as_ref()).await;
            Ok((
                "consent_expired",
                format!(
                    "consent expired: no packets from peer for {} s",
                    leg.rec.consent_timeout().as_secs_f64()
                ),
            ))
        }
        Ok(LoopEnd::FileDone) => match hangup(sess, call_id.as_ref()).await {
            Ok(()) => Ok(("hangup", "hung up after the transfer".to_owned())),
            Err(e) => Err(e.into()),
        },
        Ok(LoopEnd::TimeUp) => match hangup(sess, call_id.as_ref()).await {
            Ok(()) if media_duration.is_some() => {
                Ok(("hangup", "hung up after the media duration".to_owned()))
            }
            Ok(()) => Ok(("time_limit", "hung up at the time limit".to_owned())),
            Err(e) => Err(e.into()),
        },
        Err(e) => {
            // Best effort: the peer must not wait for consent expiry.
            let _ = hangup(sess, call_id.as_ref()).await;
            Err(e)
        }
    };
    leg.close().await;
    out
}

/// Invite `peer` (a call, or a file session when `file` is set), run the session and end it.
async fn place(
    sess: &mut SignalSession,
    peer: &str,
    opts: &CallOptions,
    file: Option<FileSide>,
) -> Result<(Leg, (&'static str, String), Duration), CallError> {
    let input = if file.is_some() {
        Vec::new()
    } else {
        load_input(opts, opts.duration.as_secs_f64(), opts.seed ^ 1)?
    };
    let is_file = file.is_some();
    let mut leg = Leg::new(IceRole::Controlling, sess, opts, input).await?;
    leg.file = file;
    let setup_deadline = Instant::now() + opts.setup_timeout;
    let offer = leg.desc();
    let req = random_token(12);
    let t_invite = Instant::now();
    sess.send(&ClientMsg::Invite {
        to: peer.to_owned(),
        from: None,
        req: Some(req.clone()),
        offer,
    })
    .await?;
    let want = req.clone();
    let m = sess
        .wait_for(
            opts.setup_timeout,
            "invite_sent",
            Some(&req),
            |m| matches!(m, ServerMsg::InviteSent { req: Some(r), .. } if *r == want),
        )
        .await?;
    let ServerMsg::InviteSent { call_id, .. } = m else {
        return Err(CallError::BadDesc("unexpected answer to invite".into()));
    };
    leg.call_id = Some(call_id.clone());
    leg.trickle(sess).await?;

    // Ring: keep the agent gathering while waiting for the answer.
    let mut buf = vec![0u8; 65536];
    let invite_to_answer;
    loop {
        leg.flush().await?;
        leg.handle_events(sess).await?;
        leg.flush().await?;
        if let Some(why) = leg.rec.signal_error().map(str::to_owned) {
            // Before the answer the server cancels the invite of a dropped caller.
            leg.close().await;
            return Err(CallError::Signal(SignalError::Protocol(format!(
                "signaling lost while ringing: {why}"
            ))));
        }
        let now = Instant::now();
        if now >= setup_deadline {
            let _ = sess
                .send(&ClientMsg::Cancel {
                    call_id: call_id.clone(),
                })
                .await;
            leg.close().await;
            return Err(CallError::Timeout("the callee to answer"));
        }
        let wake = tokio::time::Instant::from_std(leg.wake(false, setup_deadline).max(now));
        tokio::select! {
            r = leg.sock.recv_from(&mut buf) => {
                if let Ok((n, from)) = r { leg.on_datagram(n, from, &buf); }
            }
            m = sess.recv() => match m? {
                ServerMsg::CallAccepted { call_id: c, answer, .. } if c == call_id => {
                    leg.t_answer = Some(Instant::now());
                    invite_to_answer = t_invite.elapsed();
                    if let Err(e) = leg.apply_remote(&answer) {
                        let _ = hangup(sess, Some(&call_id)).await;
                        leg.close().await;
                        return Err(e);
                    }
                    break;
                }
                ServerMsg::CallEnded { call_id: c, reason } if c == call_id => {
                    leg.close().await;
                    return Err(CallError::Ended(reason));
                }
                other => { on_signal(&mut leg, sess, other).await?; }
            },
            _ = tokio::time::sleep_until(wake) => leg.agent.handle_timeout(Instant::now()),
        }
    }

    let connect_deadline = setup_deadline.max(Instant::now() + Duration::from_secs(10));
    let hard = Instant::now() + opts.setup_timeout + opts.duration;
    let media = (!is_file).then_some(opts.duration);
    let ended = run_and_end(&mut leg, sess, media, hard, connect_deadline).await?;
    Ok((leg, ended, invite_to_answer))
}

/// Call `peer` and run the call for `opts.duration` of media, then hang up.
pub async fn call(
    sess: &mut SignalSession,
    peer: &str,
    opts: &CallOptions,
) -> Result<CallReport, CallError> {
    let (leg, ended, invite_to_answer) = place(sess, peer, opts, None).await?;
    let r = leg.report(peer, ended, Some(invite_to_answer));
    finish(&leg, opts, r)
}

/// Send the file at `path` to `peer` in a file session (purpose `file`, QUIC over the
/// session's selected path, pinned certificates), bounded by `opts.setup_timeout +
/// opts.duration`; hangs up when the receiver confirmed the BLAKE3.
pub async fn send_file(
    sess: &mut SignalSession,
    peer: &str,
    path: &std::path::Path,
    opts: &CallOptions,
) -> Result<FileReport, CallError> {
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(CallError::Transfer(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| CallError::Transfer(format!("{} has no UTF-8 name", path.display())))?
        .to_owned();
    let file = FileSide {
        job: FileJob::Send(path.to_path_buf()),
        name,
        size: meta.len(),
        identity: TransferIdentity::generate().map_err(|e| CallError::Transfer(e.to_string()))?,
        peer_fp: None,
        progress: opts.progress,
        result: None,
    };
    let (leg, ended, _) = place(sess, peer, opts, Some(file)).await?;
    file_report(&leg, peer, ended)
}

/// Wait (bounded by `wait`) for an incoming session and answer it: a call runs until the
/// caller hangs up (bounded by `opts.setup_timeout + max_duration`); a file session is
/// accepted into `opts.save_dir` (declined without one) and ends after the transfer.
pub async fn answer_session(
    sess: &mut SignalSession,
    wait: Duration,
    max_duration: Duration,
    opts: &CallOptions,
) -> Result<SessionReport, CallError> {
    let m = sess
        .wait_for(wait, "incoming_call", None, |m| {
            matches!(m, ServerMsg::IncomingCall { .. })
        })
        .await?;
    let ServerMsg::IncomingCall {
        call_id,
        from,
        offer,
        ..
    } = m
    else {
        return Err(CallError::BadDesc("not an incoming call".into()));
    };
    let file = match &offer.purpose {
        SessionPurpose::Call => None,
        SessionPurpose::File { name, size } => {
            let Some(dir) = opts.save_dir.clone() else {
                sess.send(&ClientMsg::Decline {
                    call_id: call_id.clone(),
                })
                .await?;
                return Ok(SessionReport::Declined(DeclinedReport {
                    peer: from,
                    call_id: call_id.0,
                    reason: format!("file {name:?} ({size} bytes) offered, but no --save-dir"),
                }));
            };
            Some(FileSide {
                job: FileJob::Receive(dir),
                name: name.clone(),
                size: *size,
                identity: TransferIdentity::generate()
                    .map_err(|e| CallError::Transfer(e.to_string()))?,
                peer_fp: None,
                progress: opts.progress,
                result: None,
            })
        }
    };
    let is_file = file.is_some();
    sess.send(&ClientMsg::Ringing {
        call_id: call_id.clone(),
    })
    .await?;
    let input = if is_file {
        Vec::new()
    } else {
        load_input(opts, 5.0, opts.seed ^ 2)?
    };
    let mut leg = Leg::new(IceRole::Controlled, sess, opts, input).await?;
    leg.call_id = Some(call_id.clone());
    leg.file = file;
    if let Err(e) = leg.apply_remote(&offer) {
        let _ = sess.send(&ClientMsg::Decline { call_id }).await;
        leg.close().await;
        return Err(e);
    }
    let answer = leg.desc();
    sess.send(&ClientMsg::Accept {
        call_id: call_id.clone(),
        answer,
    })
    .await?;
    leg.t_answer = Some(Instant::now());
    let now = Instant::now();
    let connect_deadline = now + opts.setup_timeout;
    let hard = now + opts.setup_timeout + max_duration;
    let ended = run_and_end(&mut leg, sess, None, hard, connect_deadline).await?;
    if is_file {
        return Ok(SessionReport::File(file_report(&leg, &from, ended)?));
    }
    let r = leg.report(&from, ended, None);
    Ok(SessionReport::Call(finish(&leg, opts, r)?))
}

/// Wait (bounded by `wait`) for an incoming call, answer it, and run it until the caller
/// hangs up (bounded by `opts.setup_timeout + max_duration`). A file session is declined
/// (or, with `opts.save_dir`, received) and reported as an error: this wants a call.
pub async fn answer_next(
    sess: &mut SignalSession,
    wait: Duration,
    max_duration: Duration,
    opts: &CallOptions,
) -> Result<CallReport, CallError> {
    match answer_session(sess, wait, max_duration, opts).await? {
        SessionReport::Call(r) => Ok(r),
        SessionReport::File(r) => Err(CallError::BadDesc(format!(
            "expected a call, got a file session ({})",
            r.name
        ))),
        SessionReport::Declined(d) => Err(CallError::BadDesc(format!(
            "expected a call, declined a file session: {}",
            d.reason
        ))),
    }
}
