//! A call over real UDP sockets (tokio): signaling ([`SignalSession`]) carries the invite /
//! accept with ICE credentials, candidates (trickled) and the X25519 public key; the sans-IO
//! connectivity agent ([`crate::agent::Agent`]) gathers (host, server-reflexive from
//! signaling's STUN port, relayed from a TURN allocation with signaling-issued credentials),
//! runs the checks and selects a path; media ([`MediaSession`]: Opus, AES-GCM keys derived
//! from the X25519 exchange bound to the call id) flows on that path with 20 ms pacing, and
//! what is heard is recorded. The result is a [`CallReport`].
//!
//! One UDP socket per call, bound on the given host address, and an IPv6 one beside an IPv4
//! one when the host has IPv6 (`bind6`, or the source address towards signaling's IPv6 STUN
//! address; link-local addresses are not used): the agent gathers and pairs on both families
//! and prefers IPv6 (RFC 8421). Everything that arrives on them is handed to the agent, which
//! keeps STUN/TURN for itself and returns media payloads.
//!
//! The relayed candidate comes from the TURN ladder: every relay signaling offers is tried
//! over UDP first; when UDP has given no allocation within the agent's
//! `TURN_TRANSPORT_STEP` (1 s), over TCP (`turn:H:P?transport=tcp`), then over TLS
//! (`turns:H:P?transport=tcp`, trusting `turn_trust`: `peerlink-sim --ca`). A TCP or TLS
//! allocation lives on a connection of its own (`stream`: one task per connection, bound on
//! the same host address); checks and media through it are ChannelData on that stream. The
//! report names the transport of the selected path and the ladder's rungs.
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
//! Here: the options, events, errors and the entry points (place, answer). In `leg`, the
//! call's `Leg` (socket, agent, media) and its moves; in `run`, the event loop both roles run
//! once the call is set up, hang-up and the report. The decisions of restarts, consent and
//! signaling reconnects are `peerlink_client_core::recovery` (sans-IO, tested on a virtual
//! clock); in `restart`, carrying out an ICE restart; in `signal_link`, the link to signaling
//! that carries out reconnects; in `file`, the file part of a file session; in `report`, what a
//! session reports.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine as _;
use peerlink_api::signaling::{
    CallId, ClientMsg, EndReason, ServerMsg, SessionDesc, SessionPurpose, TurnCredentials, TurnUri,
};
use rand::{Rng as _, RngCore as _};
use tokio::net::UdpSocket;

use crate::agent::{
    Agent, AgentConfig, Candidate, CandidateKind, Event, PathKind, Role as IceRole, SelectedPath,
    TurnConfig, TurnOutcome,
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
use peerlink_api::signaling_client::{Reopened, SignalError, SignalSession};

mod dual;
mod file;
mod leg;
mod report;
mod restart;
mod run;
mod signal_link;
mod stream;

use dual::*;
use file::*;
use leg::*;
use peerlink_client_core::recovery::*;
use report::*;
pub use report::{CallReport, DeclinedReport, FileReport, MediaFigures, SessionReport};
use run::*;
use signal_link::*;
use stream::*;

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
    /// This host's NAT classification (`crate::natcheck`), sent to the peer with the
    /// candidates and shown in the report (default none).
    pub nat: Option<peerlink_api::signaling::NatClass>,
    /// Signaling's STUN responder of the other family than `stun` (IPv6 beside IPv4), if
    /// known: the IPv6 socket's server-reflexive candidate, and how the IPv6 source address is
    /// found when `bind6` is not given (default none).
    pub stun6: Option<SocketAddr>,
    /// IPv6 address of the IPv6 socket bound beside an IPv4 `bind_ip` (default: the source
    /// address towards `stun6`, when there is a route and it is not link-local).
    pub bind6: Option<IpAddr>,
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
    /// Trust roots for TURN over TLS (default: the system's; `peerlink-sim` passes its
    /// `--ca` files).
    pub turn_trust: Option<peerlink_api::tls::Trust>,
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
            nat: None,
            stun6: None,
            bind6: None,
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
            turn_trust: None,
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
            r = recv_any(&leg.sock, leg.sock6.as_ref(), &mut buf) => {
                if let Ok((i, n, from)) = r { leg.on_datagram_at(i, n, from, &buf); }
            }
            (server, ev) = leg.streams.recv() => leg.on_stream(server, ev),
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
