//! What a session reports: the call report with its media figures, the file and declined
//! session reports, and the per-session line `listen` prints.

use super::*;

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
    /// "ipv4" or "ipv6": the address family of the selected pair (both ends are of one; a
    /// relayed pair's is its relayed address's, whichever family reaches the relay).
    pub family: Option<String>,
    /// Our end of the selected path.
    pub local: Option<String>,
    /// The peer's end of the selected path.
    pub remote: Option<String>,
    /// How this side's packets on the selected path leave: "udp" (direct, or to a relay over
    /// UDP), "tcp" or "tls" (through our TURN allocation over TCP or TLS).
    pub transport: Option<String>,
    /// When the path is relayed: this side's transport to the relay it goes through ("udp",
    /// "tcp" or "tls"; "udp" when it goes through the peer's relay).
    pub relay_transport: Option<String>,
    /// The TURN ladder's rungs tried (this generation), e.g. "udp 203.0.113.210:3478 no
    /// answer", "tls 203.0.113.210:443 allocated".
    pub turn_attempts: Vec<String>,
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
    /// Both sides' NAT classifications (RFC 5780), as each found and sent it; `null` where a
    /// side sent none.
    pub nat: NatSides,
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

/// The NAT classification of each side of a call.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct NatSides {
    /// Ours.
    pub local: Option<peerlink_api::signaling::NatClass>,
    /// The peer's, from its description.
    pub peer: Option<peerlink_api::signaling::NatClass>,
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
// One per session, printed and dropped: boxing the call report would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum SessionReport {
    /// An audio call.
    Call(CallReport),
    /// A file session.
    File(FileReport),
    /// A session this side declined.
    Declined(DeclinedReport),
}

pub(super) fn file_report(
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

impl Leg {
    pub(super) fn report(
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
            family: self.path.map(|p| family_name(p.remote).into()),
            local: self.path.map(|p| p.local.to_string()),
            remote: self.path.map(|p| p.remote.to_string()),
            transport: self.path.map(|p| p.transport.as_str().to_owned()),
            relay_transport: self
                .path
                .filter(|p| p.kind == PathKind::Relay)
                .map(|p| p.transport.as_str().to_owned()),
            turn_attempts: agent_stats
                .turn_attempts
                .iter()
                .map(|a| {
                    let outcome = match &a.outcome {
                        TurnOutcome::Pending => "pending".to_owned(),
                        TurnOutcome::Allocated => "allocated".to_owned(),
                        TurnOutcome::NoAnswer => "no answer".to_owned(),
                        TurnOutcome::Failed(why) => format!("failed: {why}"),
                    };
                    format!("{} {} {outcome}", a.transport.as_str(), a.server)
                })
                .collect(),
            path_changes: self.path_changes,
            invite_to_answer_ms: invite_to_answer.map(ms),
            answer_to_connected_ms: since(self.t_connected),
            answer_to_first_media_ms: since(self.t_first_media),
            local_candidates: self.local_cands.clone(),
            remote_candidates: self.remote_cands,
            checks_sent: agent_stats.checks_sent,
            checks_to_connected_ms: agent_stats.time_to_connected.map(ms),
            unused_relay_released: agent_stats.unused_relay_released,
            nat: NatSides {
                local: self.nat,
                peer: self.peer_nat,
            },
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
            restarts: self.rec.restarts(),
            signal_reconnects: self.rec.reconnects(),
            max_media_gap_ms: ms(self.max_media_gap),
        }
    }
}
