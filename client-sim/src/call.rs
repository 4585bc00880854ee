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
//! What it is not: no multi-party, no video, no ICE restart on path loss yet (a
//! `Disconnected` event ends the call with an error), no device audio (WAV in, WAV out).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine as _;
use peerlink_signaling::protocol::{
    CallId, ClientMsg, EndReason, ServerMsg, SessionDesc, TurnCredentials,
};
use rand::{Rng as _, RngCore as _};
use tokio::net::UdpSocket;

use crate::agent::{
    Agent, AgentConfig, Candidate, CandidateKind, Event, PathKind, Role as IceRole, SelectedPath,
    TurnConfig,
};
use crate::media::{
    FRAME, FRAME_SAMPLES, KeyExchange, MediaConfig, MediaSession, Received, Role as MediaRole,
    audio,
};
use crate::signal_client::{SignalError, SignalSession, parse_turn_uri};

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
        }
    }
}

/// Media figures of one call (what this side received, and its own sending).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct MediaFigures {
    /// Media packets this side sent.
    pub packets_sent: u64,
    /// Media packets received.
    pub packets_received: u64,
    /// Packets lost (receiver's count).
    pub packets_lost: i64,
    /// Frames recovered from in-band FEC.
    pub recovered_fec: u64,
    /// Frames concealed.
    pub concealed: u64,
    /// Interarrival jitter, ms.
    pub jitter_ms: f64,
    /// Round-trip time from control reports, ms.
    pub rtt_ms: Option<f64>,
    /// E-model MOS.
    pub mos: f64,
    /// Seconds of audio recorded.
    pub recorded_s: f64,
}

/// The call report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CallReport {
    /// "caller" or "callee".
    pub role: String,
    /// The other party.
    pub peer: String,
    /// Server call id.
    pub call_id: String,
    /// "direct" or "relay" (the path in use at the end).
    pub path: Option<String>,
    /// Our end of the selected path.
    pub local: Option<String>,
    /// The peer's end of the selected path.
    pub remote: Option<String>,
    /// Path changes after connecting (e.g. relay -> direct).
    pub path_changes: u64,
    /// Caller: invite sent -> accepted (ringing + answering); callee: none.
    pub invite_to_answer_ms: Option<f64>,
    /// Answer (caller: accept received; callee: accept sent) -> path selected.
    pub answer_to_connected_ms: Option<f64>,
    /// Answer -> first media packet received and accepted.
    pub answer_to_first_media_ms: Option<f64>,
    /// Local candidates gathered (host, srflx, relay).
    pub local_candidates: Vec<String>,
    /// Remote candidates received.
    pub remote_candidates: usize,
    /// Connectivity checks this side sent (consent checks included).
    pub checks_sent: u64,
    /// Agent: checks started -> path selected, ms.
    pub checks_to_connected_ms: Option<f64>,
    /// Media.
    pub media: MediaFigures,
    /// Recording path, if any.
    pub recording: Option<String>,
    /// How the call ended.
    pub ended: String,
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
        if opts.use_turn {
            // A call still works without a relay (direct paths); say why in the log.
            match sess.turn_credentials().await {
                Ok(c) => cfg.turn = turn_config(&c),
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
        })
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
            purpose: Default::default(),
            transfer_fingerprint: None,
        }
    }

    fn apply_remote(&mut self, d: &SessionDesc) -> Result<(), CallError> {
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
        let peer_key = decode_key(&d.public_key)?;
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
            sess.send(&ClientMsg::Candidate {
                call_id: call_id.clone(),
                candidate: (&c).into(),
            })
            .await?;
        }
        if self.gathered_all && !self.sent_eoc {
            self.sent_eoc = true;
            sess.send(&ClientMsg::EndOfCandidates { call_id }).await?;
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
                    self.t_connected.get_or_insert_with(Instant::now);
                    self.path = Some(path);
                }
                Event::PathChanged { path } => {
                    self.path = Some(path);
                    self.path_changes += 1;
                }
                Event::Disconnected { reason } => {
                    return Err(CallError::Connectivity(format!("{reason:?}")));
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

    fn on_datagram(&mut self, n: usize, from: SocketAddr, buf: &[u8]) {
        let now = Instant::now();
        let Some(crate::agent::AppData::Payload { data, .. }) =
            self.agent.handle_datagram(now, 0, from, &buf[..n])
        else {
            return;
        };
        if let Some(m) = self.media.as_mut()
            && let Received::Media(_) = m.handle_packet(now, &data)
        {
            self.t_first_media.get_or_insert(now);
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
        w
    }

    fn report(&self, peer: &str, ended: String, invite_to_answer: Option<Duration>) -> CallReport {
        let stats = self.media.as_ref().map(|m| m.stats());
        let agent_stats = self.agent.stats();
        let ta = self.t_answer;
        let since = |t: Option<Instant>| match (ta, t) {
            (Some(a), Some(b)) => Some(ms(b.saturating_duration_since(a))),
            _ => None,
        };
        CallReport {
            role: match self.role {
                IceRole::Controlling => "caller".into(),
                IceRole::Controlled => "callee".into(),
            },
            peer: peer.to_owned(),
            call_id: self
                .call_id
                .as_ref()
                .map(|c| c.0.clone())
                .unwrap_or_default(),
            path: self.path.map(|p| match p.kind {
                PathKind::Direct => "direct".into(),
                PathKind::Relay => "relay".into(),
            }),
            local: self.path.map(|p| p.local.to_string()),
            remote: self.path.map(|p| p.remote.to_string()),
            path_changes: self.path_changes,
            invite_to_answer_ms: invite_to_answer.map(ms),
            answer_to_connected_ms: since(self.t_connected),
            answer_to_first_media_ms: since(self.t_first_media),
            local_candidates: self.local_cands.clone(),
            remote_candidates: self.remote_cands,
            checks_sent: agent_stats.checks_sent,
            checks_to_connected_ms: agent_stats.time_to_connected.map(ms),
            media: stats
                .map(|s| MediaFigures {
                    packets_sent: self.packets_sent,
                    packets_received: s.packets_received,
                    packets_lost: s.packets_lost,
                    recovered_fec: s.recovered_fec,
                    concealed: s.concealed,
                    jitter_ms: ms(s.jitter),
                    rtt_ms: s.rtt.map(ms),
                    mos: s.mos,
                    recorded_s: self.heard.len() as f64 / f64::from(crate::media::SAMPLE_RATE),
                })
                .unwrap_or_default(),
            recording: None,
            ended,
        }
    }
}

fn turn_config(c: &TurnCredentials) -> Option<TurnConfig> {
    let server = c.uris.iter().find_map(|u| parse_turn_uri(u))?;
    Some(TurnConfig {
        server,
        username: c.username.clone(),
        password: c.password.clone(),
    })
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

/// Handle one signaling frame of the call.
fn on_signal(leg: &mut Leg, m: ServerMsg) -> Result<Flow, CallError> {
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
        ServerMsg::CallEnded { call_id, reason } if ours(&call_id) => {
            return Ok(Flow::Ended(reason));
        }
        _ => {}
    }
    Ok(Flow::Continue)
}

/// Drive the call until `deadline` (media for the caller's duration) or a `call_ended`.
/// `until_connected` bounds the time to the first selected path.
async fn run_loop(
    leg: &mut Leg,
    sess: &mut SignalSession,
    media_duration: Option<Duration>,
    hard_deadline: Instant,
    connect_deadline: Instant,
) -> Result<Option<EndReason>, CallError> {
    let mut buf = vec![0u8; 65536];
    loop {
        leg.flush().await?;
        leg.handle_events(sess).await?;
        leg.flush().await?;
        let now = Instant::now();
        if leg.path.is_none() && now >= connect_deadline {
            return Err(CallError::Timeout("a connected path"));
        }
        if let (Some(d), Some(tc)) = (media_duration, leg.t_connected)
            && now >= tc + d
        {
            return Ok(None);
        }
        if now >= hard_deadline {
            return Ok(None);
        }
        leg.media_tick(true).await?;
        let mut deadline = hard_deadline;
        if leg.path.is_none() {
            deadline = deadline.min(connect_deadline);
        }
        if let (Some(d), Some(tc)) = (media_duration, leg.t_connected) {
            deadline = deadline.min(tc + d);
        }
        let wake = tokio::time::Instant::from_std(leg.wake(true, deadline).max(now));
        tokio::select! {
            r = leg.sock.recv_from(&mut buf) => {
                match r {
                    Ok((n, from)) => leg.on_datagram(n, from, &buf),
                    // ICMP-induced errors (port unreachable) on UDP are not fatal.
                    Err(e) => tracing::debug!("recv: {e}"),
                }
            }
            m = sess.recv() => {
                if let Flow::Ended(r) = on_signal(leg, m?)? {
                    return Ok(Some(r));
                }
            }
            _ = tokio::time::sleep_until(wake) => {
                leg.agent.handle_timeout(Instant::now());
            }
        }
    }
}

/// Call `peer` and run the call for `opts.duration` of media, then hang up.
pub async fn call(
    sess: &mut SignalSession,
    peer: &str,
    opts: &CallOptions,
) -> Result<CallReport, CallError> {
    let input = load_input(opts, opts.duration.as_secs_f64(), opts.seed ^ 1)?;
    let mut leg = Leg::new(IceRole::Controlling, sess, opts, input).await?;
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
        let now = Instant::now();
        if now >= setup_deadline {
            let _ = sess
                .send(&ClientMsg::Cancel {
                    call_id: call_id.clone(),
                })
                .await;
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
                    leg.apply_remote(&answer)?;
                    break;
                }
                ServerMsg::CallEnded { call_id: c, reason } if c == call_id => {
                    return Err(CallError::Ended(reason));
                }
                other => { on_signal(&mut leg, other)?; }
            },
            _ = tokio::time::sleep_until(wake) => leg.agent.handle_timeout(Instant::now()),
        }
    }

    let connect_deadline = setup_deadline.max(Instant::now() + Duration::from_secs(10));
    let hard = Instant::now() + opts.setup_timeout + opts.duration;
    let ended = run_loop(&mut leg, sess, Some(opts.duration), hard, connect_deadline).await?;
    let ended = match ended {
        Some(r) => format!("peer ended the call ({r:?})"),
        None => {
            sess.send(&ClientMsg::Hangup { call_id }).await?;
            "hung up after the media duration".into()
        }
    };
    let r = leg.report(peer, ended, Some(invite_to_answer));
    finish(&leg, opts, r)
}

/// Wait (bounded by `wait`) for an incoming call, answer it, and run it until the caller
/// hangs up (bounded by `opts.setup_timeout + max_duration`).
pub async fn answer_next(
    sess: &mut SignalSession,
    wait: Duration,
    max_duration: Duration,
    opts: &CallOptions,
) -> Result<CallReport, CallError> {
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
    sess.send(&ClientMsg::Ringing {
        call_id: call_id.clone(),
    })
    .await?;
    let input = load_input(opts, 5.0, opts.seed ^ 2)?;
    let mut leg = Leg::new(IceRole::Controlled, sess, opts, input).await?;
    leg.call_id = Some(call_id.clone());
    leg.apply_remote(&offer)?;
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
    let ended = run_loop(&mut leg, sess, None, hard, connect_deadline).await?;
    let ended = match ended {
        Some(r) => format!("caller ended the call ({r:?})"),
        None => {
            sess.send(&ClientMsg::Hangup { call_id }).await?;
            "hung up at the time limit".into()
        }
    };
    let r = leg.report(&from, ended, None);
    finish(&leg, opts, r)
}
