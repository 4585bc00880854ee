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
    /// Datagrams dropped as unparseable (bad first byte, malformed RTP, bad payload type).
    pub dropped_garbage: u64,
    /// Media datagrams dropped because authentication failed (wrong key, tampering).
    pub dropped_auth: u64,
    /// Media datagrams dropped as replays (index seen before or behind the window).
    pub dropped_replay: u64,
    /// Application datagrams dropped because they came from no candidate pair's address.
    pub dropped_unknown_source: u64,
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
    /// TURN allocations this side released mid-call because the call's path did not use them
    /// (RFC 8445 section 8.3; the agent's `release_unused_relay_after`).
    pub unused_relay_released: u64,
    /// Media.
    pub media: MediaFigures,
    /// Recording path, if any.
    pub recording: Option<String>,
    /// How the call ended.
    pub ended: String,
    /// Machine-readable end: "hangup" (we hung up after the duration), "peer_hangup",
    /// "peer_ended" (other signaling end reason), "consent_expired", "time_limit",
    /// "signaling_lost" (the signaling session could not be reopened within the grace).
    pub end: String,
    /// ICE restarts this side made (own and in answer to the peer's).
    pub restarts: u64,
    /// Times the signaling WebSocket was reopened during the call after it failed.
    pub signal_reconnects: u64,
    /// Longest interval between two accepted media packets after the first one, ms.
    pub max_media_gap_ms: f64,
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
    restarts: u64,
    /// We restarted and wait for the peer's description (an `ice_restart` arriving now is
    /// its answer, not a new restart).
    awaiting_restart_answer: bool,
    last_restart: Option<Instant>,
    /// The agent reported the path lost since the last restart.
    agent_lost: bool,
    last_peer_rx: Option<Instant>,
    last_media_rx: Option<Instant>,
    max_media_gap: Duration,
    dropped_garbage: u64,
    dropped_auth: u64,
    dropped_replay: u64,
    consent_timeout: Duration,
    restart_after_silence: Duration,
    events: Option<tokio::sync::mpsc::UnboundedSender<CallEvent>>,
    /// File session: what to transfer, the QUIC identity, the peer's fingerprint.
    file: Option<FileSide>,
    /// Where received QUIC datagrams go while a transfer runs.
    quic_in: Option<Pipe>,
    /// Signaling's WebSocket failed at this time and is not back yet.
    sig_down: Option<Instant>,
    /// Next reconnect attempt (while down).
    sig_retry_at: Option<Instant>,
    /// Wait before the next attempt after a failed one.
    sig_backoff: Duration,
    /// Frames for signaling held while it is down.
    sig_outbox: Vec<ClientMsg>,
    /// Why signaling went down last.
    sig_err: Option<String>,
    /// Reconnects so far.
    signal_reconnects: u64,
    signal_grace: Duration,
    /// After a reconnect: re-send our unanswered ICE restart at this time.
    resend_restart_at: Option<Instant>,
    /// After such a re-send: restart anew at this time if still unanswered (in a glare the
    /// peer takes the re-sent description as its answer, while its own may have been lost
    /// on the way to the dead socket; a new restart makes it answer).
    restart_followup_at: Option<Instant>,
}

/// First wait between two reconnect attempts (doubles each time).
const SIG_BACKOFF: Duration = Duration::from_millis(100);
/// Bound on one reconnect attempt.
const SIG_ATTEMPT: Duration = Duration::from_secs(2);
/// After a reconnect, how long held frames (e.g. the answer to our restart) get to arrive
/// before our unanswered restart is sent again.
const RESEND_RESTART_AFTER: Duration = Duration::from_millis(150);
/// After that re-send, how long the peer's answer gets before we restart anew.
const RESTART_FOLLOWUP_AFTER: Duration = Duration::from_millis(500);
/// Bound on one signaling write during a call (a dead socket must not stall media).
const SIG_WRITE: Duration = Duration::from_secs(2);

/// The file part of a file session.
struct FileSide {
    /// Sender: the file; receiver: the directory to save into.
    job: FileJob,
    name: String,
    size: u64,
    identity: TransferIdentity,
    peer_fp: Option<Fingerprint>,
    progress: bool,
    result: Option<Result<TransferReport, String>>,
}

enum FileJob {
    Send(PathBuf),
    Receive(PathBuf),
}

/// When the peer was last heard, for the silence that starts an ICE restart: its media and
/// reports (`peer_rx`), and in a file session, whose data may pause, also its authenticated
/// consent traffic on our selected pair. In a call the peer's media comes every 20 ms, and
/// checks that still arrive on our selected pair do not prove its media reaches us: the peer
/// may send it on a pair of its own, through a relay that died.
fn last_heard(peer_rx: Instant, selected_pair_rx: Option<Instant>, file_session: bool) -> Instant {
    match selected_pair_rx {
        Some(t) if file_session => peer_rx.max(t),
        _ => peer_rx,
    }
}

/// What the recovery logic wants next.
enum Recovery {
    Fine,
    Restart(&'static str),
    ConsentExpired,
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
            restarts: 0,
            awaiting_restart_answer: false,
            last_restart: None,
            agent_lost: false,
            last_peer_rx: None,
            last_media_rx: None,
            max_media_gap: Duration::ZERO,
            dropped_garbage: 0,
            dropped_auth: 0,
            dropped_replay: 0,
            consent_timeout: opts.consent_timeout,
            restart_after_silence: opts.restart_after_silence,
            events: opts.events.clone(),
            file: None,
            quic_in: None,
            sig_down: None,
            sig_retry_at: None,
            sig_backoff: SIG_BACKOFF,
            sig_outbox: Vec::new(),
            sig_err: None,
            signal_reconnects: 0,
            signal_grace: opts.signal_grace,
            resend_restart_at: None,
            restart_followup_at: None,
        })
    }

    /// Send a frame to signaling; while it is down (or if the write fails, which marks it
    /// down) the frame is queued for the reconnect.
    async fn signal(&mut self, sess: &mut SignalSession, msg: ClientMsg) {
        if self.sig_down.is_some() {
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
    fn signal_lost(&mut self, why: String, retry_at: Instant) {
        if self.sig_down.is_some() {
            return;
        }
        tracing::warn!("signaling lost mid-call ({why}); reconnecting");
        self.sig_down = Some(Instant::now());
        self.sig_retry_at = Some(retry_at);
        self.sig_backoff = SIG_BACKOFF;
        self.sig_err = Some(why);
        self.emit(CallEvent::Signaling { up: false });
    }

    /// When the grace for a signaling outage runs out (None while signaling is up).
    fn sig_grace_end(&self) -> Option<Instant> {
        self.sig_down.map(|t| t + self.signal_grace)
    }

    /// A reconnect attempt failed: try again after the backoff.
    fn reconnect_failed(&mut self, why: String) {
        tracing::info!("signaling reconnect failed: {why}");
        let now = Instant::now();
        self.sig_retry_at = Some(now + self.sig_backoff);
        self.sig_backoff = (self.sig_backoff * 2).min(Duration::from_secs(1));
        self.sig_err = Some(why);
    }

    /// The new connection is installed: send what was queued; an unanswered restart of ours
    /// goes out again shortly unless it was among the queued frames.
    async fn signal_restored(&mut self, sess: &mut SignalSession) {
        self.sig_down = None;
        self.sig_retry_at = None;
        self.signal_reconnects += 1;
        tracing::info!("signaling reconnected (#{})", self.signal_reconnects);
        self.emit(CallEvent::Signaling { up: true });
        let queued = std::mem::take(&mut self.sig_outbox);
        let had_restart = queued
            .iter()
            .any(|m| matches!(m, ClientMsg::IceRestart { .. }));
        if self.awaiting_restart_answer && !had_restart {
            self.resend_restart_at = Some(Instant::now() + RESEND_RESTART_AFTER);
        }
        for m in queued {
            self.signal(sess, m).await;
        }
    }

    /// Opens signaling again, blocking (media pauses), until it works or the grace ends.
    async fn restore_signal_now(&mut self, sess: &mut SignalSession) -> bool {
        while let Some(end) = self.sig_grace_end() {
            let now = Instant::now();
            if now >= end {
                return false;
            }
            if let Some(t) = self.sig_retry_at
                && t > now
            {
                tokio::time::sleep_until(tokio::time::Instant::from_std(t.min(end))).await;
                continue;
            }
            let bound = SIG_ATTEMPT.min(end.saturating_duration_since(now));
            match tokio::time::timeout(bound, sess.reopen()).await {
                Ok(Ok(r)) => {
                    sess.install(r);
                    self.signal_restored(sess).await;
                }
                Ok(Err(e)) => self.reconnect_failed(e.to_string()),
                Err(_) => self.reconnect_failed(format!("attempt timed out after {bound:?}")),
            }
        }
        true
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
                    self.last_peer_rx = Some(now);
                    self.path = Some(path);
                    self.emit(CallEvent::Path { path, first });
                }
                Event::PathChanged { path } => {
                    self.path = Some(path);
                    self.path_changes += 1;
                    self.last_peer_rx = Some(Instant::now());
                    self.emit(CallEvent::Path { path, first: false });
                }
                Event::Disconnected { reason } => {
                    if self.t_connected.is_none() && self.restarts == 0 {
                        // Never connected (e.g. every pair failed): nothing to recover.
                        return Err(CallError::Connectivity(format!("{reason:?}")));
                    }
                    // Not the end: the recovery logic restarts (or ends on consent expiry).
                    tracing::info!("path lost ({reason:?}); recovering");
                    self.agent_lost = true;
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
                    self.last_peer_rx = Some(now);
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
                self.last_peer_rx = Some(now);
                if let Some(prev) = self.last_media_rx {
                    self.max_media_gap =
                        self.max_media_gap.max(now.saturating_duration_since(prev));
                }
                self.last_media_rx = Some(now);
            }
            Received::Report(_) => self.last_peer_rx = Some(now),
            Received::Dropped(ReceiveDrop::Crypto(DropReason::AuthFailed)) => {
                self.dropped_auth += 1;
            }
            Received::Dropped(ReceiveDrop::Crypto(DropReason::Replayed | DropReason::TooOld)) => {
                self.dropped_replay += 1;
            }
            Received::Dropped(_) => self.dropped_garbage += 1,
        }
    }

    /// Whether the path needs an ICE restart, or the call is over (consent expired).
    fn recovery(&self, now: Instant) -> Recovery {
        let (Some(_), Some(peer_rx)) = (self.t_connected, self.last_peer_rx) else {
            return Recovery::Fine;
        };
        let last = last_heard(peer_rx, self.agent.selected_last_rx(), self.file.is_some());
        let silent = now.saturating_duration_since(last);
        if silent >= self.consent_timeout {
            return Recovery::ConsentExpired;
        }
        let backoff_over = self
            .last_restart
            .is_none_or(|t| now.saturating_duration_since(t) >= self.restart_backoff());
        if !backoff_over {
            return Recovery::Fine;
        }
        if self.agent_lost {
            return Recovery::Restart("path lost");
        }
        if silent >= self.silence_limit() {
            return Recovery::Restart("no packets from peer");
        }
        Recovery::Fine
    }

    /// Silence that starts a restart: media comes every 20 ms; a file transfer can pause
    /// (QUIC keep-alives and consent checks every 2 s then), so it gets more.
    fn silence_limit(&self) -> Duration {
        if self.file.is_some() {
            self.restart_after_silence.max(Duration::from_millis(2500))
        } else {
            self.restart_after_silence
        }
    }

    /// Least time between two own restarts (a restart needs a moment to validate a path).
    fn restart_backoff(&self) -> Duration {
        self.restart_after_silence.max(Duration::from_millis(500)) * 3 / 2
    }

    /// ICE restart: fresh TURN credentials, new ICE credentials, fresh gathering; our new
    /// description goes to the peer as `ice_restart`.
    async fn restart(&mut self, sess: &mut SignalSession, reason: &str) -> Result<(), CallError> {
        let Some(call_id) = self.call_id.clone() else {
            return Ok(());
        };
        if self.use_turn {
            match tokio::time::timeout(Duration::from_secs(2), sess.turn_credentials()).await {
                Ok(Ok(c)) => self.agent.set_turn_servers(turn_configs(&c)),
                Ok(Err(e)) => tracing::warn!("restart without fresh TURN credentials: {e}"),
                Err(_) => tracing::warn!("restart without fresh TURN credentials: timed out"),
            }
        }
        self.ufrag = random_token(8);
        self.pwd = random_token(24);
        let now = Instant::now();
        self.agent
            .restart(now, (self.ufrag.clone(), self.pwd.clone()));
        self.sent_cands.clear();
        self.pending.clear();
        self.gathered_all = false;
        self.sent_eoc = false;
        self.agent_lost = false;
        self.restarts += 1;
        self.last_restart = Some(now);
        self.awaiting_restart_answer = true;
        tracing::info!("ICE restart #{} ({reason})", self.restarts);
        self.emit(CallEvent::Restarted {
            restarts: self.restarts,
            reason: reason.to_owned(),
        });
        self.resend_restart_at = None;
        self.restart_followup_at = None;
        let desc = self.desc();
        self.signal(sess, ClientMsg::IceRestart { call_id, desc })
            .await;
        Ok(())
    }

    /// The peer restarted: restart too unless this is the answer to our own restart, then
    /// apply its credentials and candidates.
    async fn on_remote_restart(
        &mut self,
        sess: &mut SignalSession,
        d: &SessionDesc,
    ) -> Result<(), CallError> {
        let key = decode_key(&d.public_key)?;
        if self.peer_key.is_some_and(|k| k != key) {
            return Err(CallError::BadDesc(
                "the peer's public key changed in an ICE restart".into(),
            ));
        }
        if !self.awaiting_restart_answer {
            self.restart(sess, "peer restarted").await?;
        }
        self.awaiting_restart_answer = false;
        self.add_remote_ice(d);
        Ok(())
    }

    /// Starts the QUIC transfer of a file session over the selected path (virtual addresses:
    /// path changes and ICE restarts underneath are invisible to QUIC). Returns the pipe of
    /// datagrams QUIC wants sent and the task's handle.
    fn start_transfer(&mut self) -> Result<(Pipe, TransferTask), CallError> {
        let f = self
            .file
            .as_ref()
            .ok_or_else(|| CallError::Transfer("not a file session".into()))?;
        let peer_fp = f
            .peer_fp
            .ok_or_else(|| CallError::Transfer("no peer fingerprint".into()))?;
        let (role, local, peer) = match self.role {
            IceRole::Controlling => (
                TransferRole::Client,
                VIRTUAL_CLIENT_ADDR,
                VIRTUAL_SERVER_ADDR,
            ),
            IceRole::Controlled => (
                TransferRole::Server,
                VIRTUAL_SERVER_ADDR,
                VIRTUAL_CLIENT_ADDR,
            ),
        };
        let (path, handle) = DatagramPath::new(local, peer);
        self.quic_in = Some(handle.incoming.clone());
        let identity = f.identity.clone();
        let bar = ProgressBar::new(&f.name, !f.progress);
        let job = match &f.job {
            FileJob::Send(p) => FileJob::Send(p.clone()),
            FileJob::Receive(d) => FileJob::Receive(d.clone()),
        };
        let task = tokio::spawn(async move {
            let opts = EndpointOptions::default();
            let pc = crate::transfer::endpoint(path, &identity, peer_fp, role, &opts)
                .await
                .map_err(|e| format!("QUIC connection: {e}"))?;
            match job {
                FileJob::Send(p) => {
                    let r = crate::transfer::send_file(&pc.connection, &p, bar.callback()).await;
                    pc.close().await;
                    r.map_err(|e| e.to_string())
                }
                FileJob::Receive(dir) => {
                    let r =
                        crate::transfer::receive_file(&pc.connection, &dir, bar.callback()).await;
                    // The sender closes once it has our verdict; closing first could drop it.
                    if r.is_ok() {
                        let _ =
                            tokio::time::timeout(Duration::from_secs(5), pc.connection.closed())
                                .await;
                    }
                    pc.close().await;
                    r.map_err(|e| e.to_string())
                }
            }
        });
        Ok((handle.outgoing.clone(), task))
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
        if let (Some(_), Some(last)) = (self.t_connected, self.last_peer_rx) {
            w = w.min(last + self.silence_limit());
            w = w.min(last + self.consent_timeout);
            if let Some(r) = self.last_restart {
                w = w.min(r + self.restart_backoff());
            }
        }
        w
    }

    fn report(
        &self,
        peer: &str,
        (end, ended): (&str, String),
        invite_to_answer: Option<Duration>,
    ) -> CallReport {
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
            unused_relay_released: agent_stats.unused_relay_released,
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
                    dropped_garbage: self.dropped_garbage,
                    dropped_auth: self.dropped_auth,
                    dropped_replay: self.dropped_replay,
                    dropped_unknown_source: agent_stats.app_dropped,
                })
                .unwrap_or_default(),
            recording: None,
            ended,
            end: end.to_owned(),
            restarts: self.restarts,
            signal_reconnects: self.signal_reconnects,
            max_media_gap_ms: ms(self.max_media_gap),
        }
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

/// The attempt's outcome (pending forever without one).
async fn reopened(
    r: Option<&mut Reopening>,
) -> Result<Result<Reopened, SignalError>, tokio::time::error::Elapsed> {
    match r {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// Whether a signaling failure is final: this device was replaced by a newer session.
fn signal_fatal(e: &SignalError) -> bool {
    matches!(e, SignalError::Closed { code: 4001, .. })
}

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
    let mut reopening: Option<Reopening> = None;
    loop {
        leg.flush().await?;
        leg.handle_events(sess).await?;
        leg.flush().await?;
        let now = Instant::now();
        if let Some(end) = leg.sig_grace_end() {
            if reopening.is_none() && now >= end {
                return Ok(LoopEnd::SignalLost);
            }
            if reopening.is_none() && leg.sig_retry_at.is_none_or(|t| now >= t) {
                let bound = SIG_ATTEMPT.min(end.saturating_duration_since(now));
                reopening = Some(Box::pin(tokio::time::timeout(bound, sess.reopen())));
            }
        } else if let Some(t) = leg.resend_restart_at
            && now >= t
        {
            leg.resend_restart_at = None;
            if leg.awaiting_restart_answer
                && let Some(call_id) = leg.call_id.clone()
            {
                tracing::info!("re-sending our unanswered ICE restart after the reconnect");
                let desc = leg.full_desc();
                leg.signal(sess, ClientMsg::IceRestart { call_id, desc })
                    .await;
                leg.restart_followup_at = Some(Instant::now() + RESTART_FOLLOWUP_AFTER);
            }
        } else if let Some(t) = leg.restart_followup_at
            && now >= t
        {
            leg.restart_followup_at = None;
            if leg.awaiting_restart_answer {
                leg.restart(sess, "restart unanswered after a signaling reconnect")
                    .await?;
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
        match leg.recovery(now) {
            Recovery::Fine => {}
            Recovery::ConsentExpired => return Ok(LoopEnd::ConsentExpired),
            Recovery::Restart(why) => {
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
        if let Some(end) = leg.sig_grace_end() {
            deadline = deadline.min(end);
            if reopening.is_none()
                && let Some(t) = leg.sig_retry_at
            {
                deadline = deadline.min(t);
            }
        }
        for t in [leg.resend_restart_at, leg.restart_followup_at]
            .into_iter()
            .flatten()
        {
            deadline = deadline.min(t);
        }
        let sig_up = leg.sig_down.is_none();
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
            r = reopened(reopening.as_mut()) => {
                reopening = None;
                match r {
                    Ok(Ok(r)) => {
                        sess.install(r);
                        leg.signal_restored(sess).await;
                    }
                    Ok(Err(e)) => leg.reconnect_failed(e.to_string()),
                    Err(_) => leg.reconnect_failed("attempt timed out".into()),
                }
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
        && leg.sig_down.is_some()
        && !leg.restore_signal_now(sess).await
    {
        tracing::warn!("signaling still down at the end of the call; the server ends it");
    }
    let out = match res {
        Ok(LoopEnd::SignalLost) => {
            let why = leg.sig_err.clone().unwrap_or_default();
            Ok((
                "signaling_lost",
                format!(
                    "signaling lost: not reconnected within {:.1} s ({why})",
                    leg.signal_grace.as_secs_f64()
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
                    leg.consent_timeout.as_secs_f64()
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

/// Outcome of one file session (`send-file`, or a file accepted by `listen`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct FileReport {
    /// "sender" or "receiver".
    pub role: String,
    /// The other party.
    pub peer: String,
    /// Server call (session) id.
    pub call_id: String,
    /// File name as offered.
    pub name: String,
    /// File size, bytes.
    pub size: u64,
    /// Sender: the source; receiver: where the verified file was saved.
    pub file: String,
    /// File bytes carried in this session (less than `size` when resumed).
    pub bytes: u64,
    /// Transfer time (offer answered -> verdict), seconds.
    pub duration_s: f64,
    /// `bytes * 8 / duration`, bit/s.
    pub throughput_bps: f64,
    /// True when the receiver already held verified chunks (resumed download).
    pub resumed: bool,
    /// Bytes the receiver already held.
    pub resumed_from: u64,
    /// BLAKE3 of the whole file (hex), verified by the receiver.
    pub blake3: String,
    /// "direct" or "relay" (the path in use at the end).
    pub path: Option<String>,
    /// Path changes after connecting (restarts included).
    pub path_changes: u64,
    /// ICE restarts this side made.
    pub restarts: u64,
    /// Times the signaling WebSocket was reopened during the session after it failed.
    pub signal_reconnects: u64,
    /// QUIC smoothed RTT at the end, ms.
    pub rtt_ms: f64,
    /// Packets QUIC declared lost.
    pub lost_packets: u64,
    /// Answer -> path selected, ms.
    pub answer_to_connected_ms: Option<f64>,
    /// Machine-readable end (as in [`CallReport::end`]).
    pub end: String,
    /// How the session ended.
    pub ended: String,
}

/// A session declined by `listen` (a file offered without `--save-dir`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct DeclinedReport {
    /// The other party.
    pub peer: String,
    /// Server call (session) id.
    pub call_id: String,
    /// Why.
    pub reason: String,
}

/// What one answered session was (one JSON line per session for `listen --json`).
#[derive(Clone, Debug, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SessionReport {
    /// An audio call.
    Call(CallReport),
    /// A file session.
    File(FileReport),
    /// A session this side declined.
    Declined(DeclinedReport),
}

fn file_report(
    leg: &Leg,
    peer: &str,
    (end, ended): (&str, String),
) -> Result<FileReport, CallError> {
    let f = leg
        .file
        .as_ref()
        .ok_or_else(|| CallError::Transfer("not a file session".into()))?;
    let t = match &f.result {
        Some(Ok(t)) => t,
        Some(Err(e)) => return Err(CallError::Transfer(e.clone())),
        None => {
            return Err(CallError::Transfer(format!(
                "the session ended before the transfer finished ({ended})"
            )));
        }
    };
    let call = leg.report(peer, (end, ended), None);
    Ok(FileReport {
        role: match leg.role {
            IceRole::Controlling => "sender".into(),
            IceRole::Controlled => "receiver".into(),
        },
        peer: peer.to_owned(),
        call_id: call.call_id,
        name: t.name.clone(),
        size: t.size,
        file: t.path.display().to_string(),
        bytes: t.bytes,
        duration_s: t.duration.as_secs_f64(),
        throughput_bps: t.goodput_bps,
        resumed: t.resumed_from > 0,
        resumed_from: t.resumed_from,
        blake3: t.blake3.clone(),
        path: call.path,
        path_changes: call.path_changes,
        restarts: call.restarts,
        signal_reconnects: call.signal_reconnects,
        rtt_ms: t.rtt_ms,
        lost_packets: t.lost_packets,
        answer_to_connected_ms: call.answer_to_connected_ms,
        end: call.end,
        ended: call.ended,
    })
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
        if let Some(why) = leg.sig_down.and(leg.sig_err.clone()) {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The peer's media stopped at t0 (its relay died) while its checks kept arriving on our
    /// selected pair through another relay: in a call the silence still runs from t0, in a
    /// file session the checks count.
    #[test]
    fn consent_checks_do_not_hide_a_calls_lost_media() {
        let t0 = Instant::now();
        let check = t0 + Duration::from_millis(900);
        assert_eq!(last_heard(t0, Some(check), false), t0);
        assert_eq!(last_heard(t0, Some(check), true), check);
        assert_eq!(last_heard(check, Some(t0), true), check);
        assert_eq!(last_heard(t0, None, true), t0);
    }
}
