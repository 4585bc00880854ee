//! The WebSocket JSON protocol between clients and a signaling node: serde types only, no I/O.
//!
//! Every frame is one JSON object with a `"type"` field (snake_case). Flow of a call:
//!
//! ```text
//! caller                         signaling                          callee (every device)
//!   invite{to, offer, req} ──────▶  invite_sent{req, call_id}  ──▶ caller
//!                                    incoming_call{call_id, from, offer} ──────────────▶
//!                                ◀────────────────────────────────────── ringing{call_id}
//!   ◀── ringing{call_id, device}
//!                                ◀───────────────────────────── accept{call_id, answer}
//!   ◀── call_accepted{call_id, device, answer}      answered_elsewhere{call_id} ──▶ others
//!   candidate{call_id, candidate} / end_of_candidates{call_id}  ◀──────▶ (both ways)
//!   hangup{call_id} ──────────────▶  call_ended{call_id, reason: hangup} ──────────────▶
//! ```
//!
//! Instead of accepting, the callee may `decline`; the caller may `cancel` while it rings; the
//! server ends an unanswered call after the ring timeout (`call_ended{reason: timeout}`).
//!
//! Call grace: when the connection of a party of an *accepted* call (the caller's device or the
//! device that answered) drops without a `hangup` (a reset NAT, a lost network, an idle or
//! slow-consumer close), the call is kept for `call_grace` (default 5 s, `--call-grace`; 0
//! turns it off). If the same user and device reconnects to the same node within it, the call
//! continues: frames for it sent meanwhile (`candidate`, `ice_restart`, `call_ended`, ...; at
//! most 64, oldest dropped first) follow its `welcome`, and frames from either side work as
//! before. Otherwise the other party gets `call_ended{reason: disconnected}` once the grace
//! has run out. A connection that closes cleanly without a `hangup` gets the grace too: a
//! client leaving for good hangs up first. An invite that still rings is cancelled as soon as
//! its caller drops (`call_ended{disconnected}` to the callee), and when a node shuts down,
//! calls waiting for a party end at once. A reconnect to a *different* node does not pick the
//! call up: it ends when the grace runs out.
//!
//! Text messages: `send_message{id, to, body}` is answered by `message_ack{id, stored_at_ms}`
//! only once the message is durable (fsync'd), or by `error{code: storage|conflict|..., id}`.
//! A resend with the same `id` and content gets the original ack (one stored message); the same
//! `id` with other content gets `conflict`. Recipients get `message{seq, id, from, body,
//! sent_at_ms}`; `seq` is monotonic per recipient (and so per device), in order; a device
//! acknowledges cumulatively with `ack{seq}`; a message is deleted once every device of the
//! recipient acknowledged it. Only `message` frames carry `seq`: call, presence and contact
//! events are live only and never replayed.
//!
//! Connecting: `GET /v1/ws?token=ACCESS&device=ID&resume_from=SEQ` (`device`: 1-64 of
//! `[A-Za-z0-9_-]`, default `default`; a newer session of the same device replaces the older,
//! which is closed with 4001). Without `token` the first frame must be `auth{token}` (within
//! 10 s). The first server frame is `welcome`. `resume_from` = the last `seq` the device
//! processed: unacked messages after it are replayed (`welcome.resume = resumed`); without it
//! pending messages after the device's last ack follow (`fresh`); if the server cannot honour
//! it (ahead of the server, or behind the device's own ack) it answers `resync{reason,
//! from_seq}` and replays from `from_seq`. Clients drop `message` frames with a `seq` they
//! have already processed. Before the token expires the client sends `auth{token}` with a
//! fresh token (answered `auth_ok`); otherwise it gets `goodbye` and close 1008.
//!
//! Errors and closes: a bad frame gets `error{code, message, id?}` and the session stays open
//! (`bad_json`, `unknown_type`, `invalid`, `forged_from`, `too_many_candidates`,
//! `forbidden_candidate`, `no_such_user`, `no_such_call`, `not_allowed`, `rate_limited`,
//! `conflict`, `storage`, `unauthorized`, `internal`). Close codes: 1009 frame/message too big,
//! 1007 bad UTF-8, 1003 binary frame, 1008 policy (auth failed, token expired, flood, slow
//! consumer), 1000 idle timeout, 1001 server shutdown (after `goodbye{reconnect_after_ms}`),
//! 4001 replaced by a newer session of the same device.
//!
//! | client -> server | fields |
//! |---|---|
//! | `auth` | `token` |
//! | `invite` | `to`, `offer: SessionDesc`, `req?`, `from?` (must be self) |
//! | `ringing` / `decline` / `cancel` / `hangup` / `end_of_candidates` | `call_id` |
//! | `accept` | `call_id`, `answer: SessionDesc` |
//! | `candidate` | `call_id`, `candidate: Candidate` |
//! | `ice_restart` | `call_id`, `desc: SessionDesc` (accepted calls only; forwarded to the other party) |
//! | `send_message` | `id`, `to`, `body`, `from?` (must be self) |
//! | `ack` | `seq` |
//! | `add_contact` / `remove_contact` | `username` |
//! | `list_contacts` | — |
//! | `set_presence` | `status` (`online` / `away`) |
//!
//! | server -> client | fields |
//! |---|---|
//! | `welcome` | `user`, `device`, `node`, `resume`, `acked_seq`, `max_message_bytes`, `token_expires_at` |
//! | `resync` | `reason`, `from_seq` |
//! | `error` | `code`, `message`, `id?` |
//! | `auth_ok` | `token_expires_at` |
//! | `invite_sent` | `req?`, `call_id`, `devices` (0 -> `call_ended{unavailable}` follows) |
//! | `incoming_call` | `call_id`, `from`, `from_device`, `offer` |
//! | `ringing` | `call_id`, `device` |
//! | `call_accepted` | `call_id`, `device`, `answer` |
//! | `answered_elsewhere` | `call_id` |
//! | `call_ended` | `call_id`, `reason` (`declined`, `cancelled`, `timeout`, `hangup`, `unavailable`, `disconnected`) |
//! | `candidate` / `end_of_candidates` | `call_id`, (`candidate`) |
//! | `ice_restart` | `call_id`, `desc` (the other party's new ICE credentials and candidates) |
//! | `message_ack` | `id`, `stored_at_ms` |
//! | `message` | `seq`, `id`, `from`, `body`, `sent_at_ms` |
//! | `contacts` | `contacts: [{username, status}]` |
//! | `presence` | `user`, `status` (`online`, `away`, `offline`) |
//! | `goodbye` | `reason`, `reconnect_after_ms` |
//!
//! `SessionDesc` = `{ice_ufrag (4-256), ice_pwd (22-256), public_key (base64 X25519, 32 bytes),
//! candidates: [Candidate] (<= 32), end_of_candidates, purpose?: {kind: "call"} | {kind: "file",
//! name (1-255 bytes, not `.`/`..`, no `/`, `\\` or control characters), size}, transfer_fingerprint? (64 lowercase hex), nat?: {mapping, filtering, port_allocation,
//! port_delta? (only when sequential, 1-16 either way), hairpin}}`; `Candidate` = `{foundation, component,
//! transport: "udp", priority, address, port, type: host|srflx|prflx|relay, related_address?,
//! related_port?}`. Candidates whose address no peer can have (unspecified, multicast,
//! broadcast, 0.0.0.0/8, 240.0.0.0/4, in any IPv6 spelling) are refused; private, shared,
//! link-local and unique-local host candidates pass; loopback passes only on a node that
//! listens on loopback or runs with `--allow-loopback-candidates`; operators may refuse more
//! with `--deny-candidate` (see `peerlink_signaling::candidates`).

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

/// Server-generated random call identifier (32 lowercase hex digits).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CallId(pub String);

impl CallId {
    /// Wrap 16 random bytes as a call id.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(hex::encode(bytes))
    }
    /// Whether the string has the shape of a server-generated call id.
    pub fn is_well_formed(&self) -> bool {
        self.0.len() == 32
            && self
                .0
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    }
}

impl std::fmt::Display for CallId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// ICE candidate type (RFC 8445 section 5.1.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CandidateType {
    /// A local interface address.
    Host,
    /// Server-reflexive: the NAT mapping learned from STUN.
    Srflx,
    /// Peer-reflexive: learned from an incoming connectivity check.
    Prflx,
    /// A TURN relayed address.
    Relay,
}

/// Candidate transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// UDP (the only transport peerlink's agent uses).
    Udp,
}

/// One ICE candidate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    /// Foundation (1-32 ice-chars).
    pub foundation: String,
    /// Component id (1 = RTP/data).
    pub component: u8,
    /// Transport protocol.
    pub transport: Transport,
    /// Candidate priority.
    pub priority: u32,
    /// Transport address.
    pub address: IpAddr,
    /// Port.
    pub port: u16,
    /// Candidate type.
    #[serde(rename = "type")]
    pub kind: CandidateType,
    /// Related address (base of a reflexive/relayed candidate), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub related_address: Option<IpAddr>,
    /// Related port, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub related_port: Option<u16>,
}

/// A party's side of a call: ICE credentials, media key and the candidates gathered so far.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionDesc {
    /// ICE username fragment (4-256 chars).
    pub ice_ufrag: String,
    /// ICE password (22-256 chars).
    pub ice_pwd: String,
    /// X25519 public key, standard base64 of 32 bytes.
    pub public_key: String,
    /// Candidates known now; more may trickle with `candidate`.
    #[serde(default)]
    pub candidates: Vec<Candidate>,
    /// True when no more candidates will follow.
    #[serde(default)]
    pub end_of_candidates: bool,
    /// What the session carries: an audio call (the default) or one file transfer.
    #[serde(default, skip_serializing_if = "SessionPurpose::is_call")]
    pub purpose: SessionPurpose,
    /// SHA-256 fingerprint (64 lowercase hex digits) of this party's per-session QUIC/TLS
    /// certificate, pinned by the other party for file transfer; absent when it sends none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer_fingerprint: Option<String>,
    /// This party's NAT as it classified it (RFC 5780 behaviour discovery), when it could.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat: Option<NatClass>,
}

/// How a NAT maps an internal address to external ones (RFC 4787 section 4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NatMapping {
    /// One mapping for every destination (also: no NAT at all).
    EndpointIndependent,
    /// A new mapping per destination IP.
    AddressDependent,
    /// A new mapping per destination IP and port ("symmetric").
    AddressAndPortDependent,
}

/// Which inbound packets a NAT lets through to a mapping (RFC 4787 section 5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NatFiltering {
    /// From anyone.
    EndpointIndependent,
    /// From IPs the inside host sent to.
    AddressDependent,
    /// From IP and port pairs the inside host sent to.
    AddressAndPortDependent,
}

/// How a NAT picks the external port of a new mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NatPortAllocation {
    /// The external port is the internal one.
    Preserving,
    /// Each new mapping's port is the previous one plus a constant delta.
    Sequential,
    /// No pattern.
    Random,
}

/// A party's NAT classification, sent with its description (`peerlink-sim nat-check`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatClass {
    /// Mapping behaviour.
    pub mapping: NatMapping,
    /// Filtering behaviour.
    pub filtering: NatFiltering,
    /// Port allocation.
    pub port_allocation: NatPortAllocation,
    /// The step between consecutive mappings when the allocation is sequential (at most
    /// [`NatClass::MAX_PORT_DELTA`] either way).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_delta: Option<i32>,
    /// Whether the NAT forwards a packet from inside to its own mapped address back inside.
    pub hairpin: bool,
}

impl NatClass {
    /// Largest step between consecutive mappings still called sequential.
    pub const MAX_PORT_DELTA: i32 = 16;

    /// Whether the fields agree with each other (a peer's classification is only a hint).
    pub fn is_consistent(&self) -> bool {
        match (self.port_allocation, self.port_delta) {
            (NatPortAllocation::Sequential, Some(d)) => d != 0 && d.abs() <= Self::MAX_PORT_DELTA,
            (NatPortAllocation::Sequential, None) => false,
            (_, delta) => delta.is_none(),
        }
    }
}

impl std::fmt::Display for NatMapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NatMapping::EndpointIndependent => "endpoint-independent",
            NatMapping::AddressDependent => "address-dependent",
            NatMapping::AddressAndPortDependent => "address-and-port-dependent",
        })
    }
}

impl std::fmt::Display for NatFiltering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NatFiltering::EndpointIndependent => "endpoint-independent",
            NatFiltering::AddressDependent => "address-dependent",
            NatFiltering::AddressAndPortDependent => "address-and-port-dependent",
        })
    }
}

impl std::fmt::Display for NatPortAllocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NatPortAllocation::Preserving => "preserving",
            NatPortAllocation::Sequential => "sequential",
            NatPortAllocation::Random => "random",
        })
    }
}

/// What a session carries.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SessionPurpose {
    /// An audio call (Opus media).
    #[default]
    Call,
    /// One file sent by the caller (QUIC over the session's path).
    File {
        /// File name (1-255 bytes, not `.`/`..`, no path separators or control characters).
        name: String,
        /// Size in bytes.
        size: u64,
    },
}

impl SessionPurpose {
    /// True for an audio call (the default, left out of the JSON).
    pub fn is_call(&self) -> bool {
        matches!(self, SessionPurpose::Call)
    }
}

/// Presence status shown to contacts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PresenceStatus {
    /// Connected and available.
    Online,
    /// Connected, away.
    Away,
    /// No session anywhere.
    Offline,
}

/// Frames a client sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMsg {
    /// Authenticate (first frame, when the token was not in the URL) or refresh the session's
    /// token before it expires (must name the same user).
    Auth {
        /// Access token from `/v1/login` or `/v1/refresh`.
        token: String,
    },
    /// Start a call to `to`; answered with `invite_sent{req, call_id}`.
    Invite {
        /// Callee username.
        to: String,
        /// Optional; when present it must equal the authenticated user.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<String>,
        /// Client correlation token echoed in `invite_sent` (max 64 chars).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req: Option<String>,
        /// Caller's ICE credentials, key and candidates.
        offer: SessionDesc,
    },
    /// Callee device: the invite arrived and rings.
    Ringing {
        /// Call.
        call_id: CallId,
    },
    /// Callee device answers.
    Accept {
        /// Call.
        call_id: CallId,
        /// Callee's ICE credentials, key and candidates.
        answer: SessionDesc,
    },
    /// Callee refuses the call (ends it on every device).
    Decline {
        /// Call.
        call_id: CallId,
    },
    /// Caller withdraws the invite before it is answered.
    Cancel {
        /// Call.
        call_id: CallId,
    },
    /// Either party ends an accepted call.
    Hangup {
        /// Call.
        call_id: CallId,
    },
    /// Trickle one more candidate to the other party.
    Candidate {
        /// Call.
        call_id: CallId,
        /// The candidate.
        candidate: Candidate,
    },
    /// No more candidates from this party.
    EndOfCandidates {
        /// Call.
        call_id: CallId,
    },
    /// ICE restart in an accepted call: new ICE credentials and candidates of this party (the
    /// public key must stay the one of its offer/answer, else `invalid`); forwarded to the
    /// other party as `ice_restart`. Refused (`not_allowed`) while ringing and from anyone but
    /// the caller's device and the answering device.
    IceRestart {
        /// Call.
        call_id: CallId,
        /// This party's new ICE credentials and candidates.
        desc: SessionDesc,
    },
    /// Send a durable text message.
    SendMessage {
        /// Client message id (1-64 chars of [A-Za-z0-9._:-]); resends reuse it.
        id: String,
        /// Recipient username.
        to: String,
        /// Optional; when present it must equal the authenticated user.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<String>,
        /// UTF-8 text.
        body: String,
    },
    /// Cumulative acknowledgement of every `message` with `seq` up to this one.
    Ack {
        /// Highest processed sequence.
        seq: u64,
    },
    /// Add a user to the buddy list.
    AddContact {
        /// Username.
        username: String,
    },
    /// Remove a user from the buddy list.
    RemoveContact {
        /// Username.
        username: String,
    },
    /// Ask for the buddy list with presence (answered with `contacts`).
    ListContacts,
    /// Set own presence (online/away) shown to contacts.
    SetPresence {
        /// New status (offline is not settable).
        status: PresenceStatus,
    },
}

impl ClientMsg {
    /// Every `type` value a client may send.
    pub const TYPES: &'static [&'static str] = &[
        "auth",
        "invite",
        "ringing",
        "accept",
        "decline",
        "cancel",
        "hangup",
        "candidate",
        "end_of_candidates",
        "ice_restart",
        "send_message",
        "ack",
        "add_contact",
        "remove_contact",
        "list_contacts",
        "set_presence",
    ];
}

/// How a session's `resume_from` was handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResumeOutcome {
    /// No `resume_from` given: a fresh session; pending messages follow.
    Fresh,
    /// Resumed: messages after `resume_from` that are still unacked follow.
    Resumed,
    /// `resume_from` could not be honoured; a `resync` frame follows.
    Resync,
}

/// Why a call ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// The callee declined.
    Declined,
    /// The caller cancelled before an answer.
    Cancelled,
    /// Nobody answered within the ring timeout.
    Timeout,
    /// A party hung up.
    Hangup,
    /// The callee has no online device.
    Unavailable,
    /// A party's session went away.
    Disconnected,
}

/// Machine-readable error codes in `error` frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame is not valid JSON or misses the `type` field.
    BadJson,
    /// `type` names no known client message.
    UnknownType,
    /// A field is missing, has the wrong type or an invalid value.
    Invalid,
    /// `from` names someone else than the authenticated user.
    ForgedFrom,
    /// Too many candidates.
    TooManyCandidates,
    /// A candidate points at a forbidden (private/loopback/...) address.
    ForbiddenCandidate,
    /// The user does not exist.
    NoSuchUser,
    /// The call does not exist or is not in a state for this message.
    NoSuchCall,
    /// Not allowed for this session (e.g. wrong party of the call).
    NotAllowed,
    /// Too many frames: slow down (the connection closes if it goes on).
    RateLimited,
    /// The same client message id was used for different content.
    Conflict,
    /// The message could not be stored durably; it was NOT accepted.
    Storage,
    /// The token is invalid or for another user.
    Unauthorized,
    /// A server-side failure (e.g. another node unreachable).
    Internal,
}

/// One buddy-list entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContactEntry {
    /// Username.
    pub username: String,
    /// Current presence.
    pub status: PresenceStatus,
}

/// Frames the server sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    /// First frame of an authenticated session.
    Welcome {
        /// Authenticated username.
        user: String,
        /// Device id of this session.
        device: String,
        /// Node serving the session.
        node: String,
        /// How `resume_from` was handled.
        resume: ResumeOutcome,
        /// Highest message `seq` the server holds as acknowledged by this device.
        acked_seq: u64,
        /// Largest accepted text frame, bytes.
        max_message_bytes: usize,
        /// Unix seconds at which the session's token expires (send `auth` before).
        token_expires_at: u64,
    },
    /// The client's resume point could not be honoured; pending messages are replayed from
    /// `from_seq` and the client should rebuild live state (contacts, calls).
    Resync {
        /// Why.
        reason: String,
        /// Messages after this seq follow.
        from_seq: u64,
    },
    /// An error about one client frame; the session stays open unless a close follows.
    Error {
        /// Code.
        code: ErrorCode,
        /// Human-readable detail naming the problem.
        message: String,
        /// The client message id or request token it refers to, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
    /// `auth` mid-session accepted: the session now expires later.
    AuthOk {
        /// New expiry, unix seconds.
        token_expires_at: u64,
    },
    /// The invite was accepted for delivery; the server's call id.
    InviteSent {
        /// Echo of the invite's `req`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req: Option<String>,
        /// Call id.
        call_id: CallId,
        /// How many callee devices it reached.
        devices: u32,
    },
    /// An invite to this user (sent to every online device).
    IncomingCall {
        /// Call id.
        call_id: CallId,
        /// Caller username (always the authenticated caller).
        from: String,
        /// Caller's device.
        from_device: String,
        /// Caller's ICE credentials, key and candidates.
        offer: SessionDesc,
    },
    /// A callee device rings.
    Ringing {
        /// Call.
        call_id: CallId,
        /// The ringing device.
        device: String,
    },
    /// The callee answered on `device`.
    CallAccepted {
        /// Call.
        call_id: CallId,
        /// Answering device.
        device: String,
        /// Callee's ICE credentials, key and candidates.
        answer: SessionDesc,
    },
    /// Another device of this user answered the call.
    AnsweredElsewhere {
        /// Call.
        call_id: CallId,
    },
    /// The call is over.
    CallEnded {
        /// Call.
        call_id: CallId,
        /// Why.
        reason: EndReason,
    },
    /// A trickled candidate from the other party.
    Candidate {
        /// Call.
        call_id: CallId,
        /// The candidate.
        candidate: Candidate,
    },
    /// The other party has no more candidates.
    EndOfCandidates {
        /// Call.
        call_id: CallId,
    },
    /// The other party restarted ICE: its new credentials and candidates.
    IceRestart {
        /// Call.
        call_id: CallId,
        /// The other party's new ICE credentials and candidates.
        desc: SessionDesc,
    },
    /// The sender's message is durable (or was already: a resend with the same id).
    MessageAck {
        /// Client message id.
        id: String,
        /// Server time the message was first stored, unix ms.
        stored_at_ms: u64,
    },
    /// A text message for this user.
    Message {
        /// Per-recipient monotonic sequence (ack it with `ack{seq}`).
        seq: u64,
        /// The sender's client message id.
        id: String,
        /// Sender username.
        from: String,
        /// Text.
        body: String,
        /// Server time it was stored, unix ms.
        sent_at_ms: u64,
    },
    /// The buddy list.
    Contacts {
        /// Entries.
        contacts: Vec<ContactEntry>,
    },
    /// A contact's presence changed.
    Presence {
        /// Username.
        user: String,
        /// New status.
        status: PresenceStatus,
    },
    /// The server is about to close the session (shutdown, expiry); reconnect later.
    Goodbye {
        /// Why.
        reason: String,
        /// Suggested delay before reconnecting, ms.
        reconnect_after_ms: u64,
    },
}

/// Body of `POST /v1/register` and `POST /v1/login`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Credentials {
    /// Username (normalised by the server: trimmed, ASCII-lowercased).
    pub username: String,
    /// Password (8-256 bytes).
    pub password: String,
    /// Login only: the device the refresh token is for (as in `/v1/ws?device=`; 1-64 of
    /// `[A-Za-z0-9_-]`). Its tokens form one chain: rotated by `/v1/refresh`, revoked together
    /// by `/v1/logout` or when a revoked one is presented again. Without it, the login starts
    /// a chain of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

/// Answer of `POST /v1/login` and `POST /v1/refresh`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenResponse {
    /// Normalised username.
    pub username: String,
    /// Short-lived access token (HS256 JWT) for the API and `/v1/ws`.
    pub access_token: String,
    /// Lifetime of `access_token`, seconds.
    pub expires_in: u64,
    /// Longer-lived refresh token for `POST /v1/refresh`.
    pub refresh_token: String,
}

/// Body of `POST /v1/refresh` and `POST /v1/logout`. A refresh token is good for one
/// refresh: the answer carries its successor, and the token itself is revoked. Presenting a
/// revoked one again revokes every token of its device (a copy is in someone else's hands);
/// logout revokes them too.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RefreshRequest {
    /// Refresh token from login or the last refresh.
    pub refresh_token: String,
}

/// Answer of `POST /v1/turn-credentials` (coturn REST API format).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TurnCredentials {
    /// `expiry_unix:username`.
    pub username: String,
    /// base64(HMAC-SHA1(secret, username)).
    pub password: String,
    /// Seconds the credentials stay valid.
    pub ttl: u64,
    /// Relay URIs (RFC 7065), for each relay in the order a client should try them:
    /// `turn:H:P?transport=udp`, then `turn:H:P?transport=tcp` and `turns:H:P?transport=tcp`
    /// when the relay listens for TCP and TLS clients. See [`TurnUri`].
    pub uris: Vec<String>,
}

/// How a client reaches a TURN server (RFC 8656 client transports).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TurnTransport {
    /// UDP datagrams.
    Udp,
    /// A TCP connection.
    Tcp,
    /// TLS over TCP.
    Tls,
}

impl TurnTransport {
    /// `udp`, `tcp` or `tls`.
    pub fn as_str(self) -> &'static str {
        match self {
            TurnTransport::Udp => "udp",
            TurnTransport::Tcp => "tcp",
            TurnTransport::Tls => "tls",
        }
    }
}

/// One TURN server URI (RFC 7065: `turn:` / `turns:` host, port, `?transport=`), with the host
/// an IP address (or `localhost`). `turn:` without a transport is UDP; `turns:` is TLS over TCP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TurnUri {
    /// The client transport.
    pub transport: TurnTransport,
    /// The server's address.
    pub addr: SocketAddr,
}

impl TurnUri {
    /// Parse one URI; `None` for another scheme, a host name other than `localhost`, or a
    /// transport this client does not speak (`turns:` over UDP is DTLS).
    pub fn parse(uri: &str) -> Option<TurnUri> {
        let (secure, rest) = match uri.split_once(':')? {
            ("turn", rest) => (false, rest),
            ("turns", rest) => (true, rest),
            _ => return None,
        };
        let (hostport, query) = match rest.split_once('?') {
            Some((h, q)) => (h, Some(q)),
            None => (rest, None),
        };
        let transport = match query {
            None => None,
            Some(q) => Some(q.strip_prefix("transport=")?),
        };
        let transport = match (secure, transport) {
            (false, None | Some("udp")) => TurnTransport::Udp,
            (false, Some("tcp")) => TurnTransport::Tcp,
            (true, None | Some("tcp")) => TurnTransport::Tls,
            _ => return None,
        };
        let addr = match hostport.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                let (host, port) = hostport.rsplit_once(':')?;
                let port: u16 = port.parse().ok()?;
                if host != "localhost" {
                    return None;
                }
                SocketAddr::from(([127, 0, 0, 1], port))
            }
        };
        Some(TurnUri { transport, addr })
    }
}

impl std::fmt::Display for TurnUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.transport {
            TurnTransport::Udp => write!(f, "turn:{}?transport=udp", self.addr),
            TurnTransport::Tcp => write!(f, "turn:{}?transport=tcp", self.addr),
            TurnTransport::Tls => write!(f, "turns:{}?transport=tcp", self.addr),
        }
    }
}

/// JSON error body of the HTTP API.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HttpError {
    /// Short machine-readable code.
    pub error: String,
    /// Human-readable text.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nat_class_rides_in_the_description_and_is_checked_for_consistency() {
        let class = NatClass {
            mapping: NatMapping::AddressAndPortDependent,
            filtering: NatFiltering::AddressAndPortDependent,
            port_allocation: NatPortAllocation::Sequential,
            port_delta: Some(2),
            hairpin: false,
        };
        assert!(class.is_consistent());
        let v = serde_json::to_value(class).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"mapping": "address-and-port-dependent",
                "filtering": "address-and-port-dependent", "port_allocation": "sequential",
                "port_delta": 2, "hairpin": false})
        );
        assert_eq!(serde_json::from_value::<NatClass>(v).unwrap(), class);
        for bad in [
            NatClass {
                port_delta: None,
                ..class
            },
            NatClass {
                port_delta: Some(0),
                ..class
            },
            NatClass {
                port_delta: Some(17),
                ..class
            },
            NatClass {
                port_allocation: NatPortAllocation::Random,
                ..class
            },
        ] {
            assert!(!bad.is_consistent(), "{bad:?}");
        }
        assert!(
            serde_json::from_value::<NatClass>(serde_json::json!({"mapping": "cone",
                "filtering": "endpoint-independent", "port_allocation": "random",
                "hairpin": false}))
            .is_err()
        );
    }

    #[test]
    fn turn_uris_name_their_transport_and_round_trip() {
        let a: SocketAddr = "198.51.100.1:3478".parse().unwrap();
        for (uri, transport) in [
            ("turn:198.51.100.1:3478", TurnTransport::Udp),
            ("turn:198.51.100.1:3478?transport=udp", TurnTransport::Udp),
            ("turn:198.51.100.1:3478?transport=tcp", TurnTransport::Tcp),
            ("turns:198.51.100.1:3478?transport=tcp", TurnTransport::Tls),
            ("turns:198.51.100.1:3478", TurnTransport::Tls),
        ] {
            let u = TurnUri::parse(uri).unwrap_or_else(|| panic!("{uri}"));
            assert_eq!((u.transport, u.addr), (transport, a), "{uri}");
            assert_eq!(TurnUri::parse(&u.to_string()), Some(u));
        }
        let v6 = TurnUri::parse("turns:[2001:db8::1]:443?transport=tcp").unwrap();
        assert_eq!(v6.addr, "[2001:db8::1]:443".parse().unwrap());
        assert_eq!(
            TurnUri::parse("turn:localhost:9").map(|u| u.addr),
            Some("127.0.0.1:9".parse().unwrap())
        );
        for bad in [
            "stun:198.51.100.1:3478",
            "turns:198.51.100.1:3478?transport=udp",
            "turn:198.51.100.1:3478?transport=sctp",
            "turn:198.51.100.1:3478?foo=bar",
            "turn:example.com:3478",
            "turn:198.51.100.1",
            "turn:",
            "",
        ] {
            assert_eq!(TurnUri::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn client_types_list_matches_enum() {
        for t in ClientMsg::TYPES {
            let v = serde_json::json!({"type": t});
            let err = serde_json::from_value::<ClientMsg>(v).err();
            if let Some(e) = err {
                assert!(!e.to_string().contains("unknown variant"), "{t}: {e}");
            }
        }
    }

    /// The `type` of a client frame; the match has no wildcard, so a new variant fails to
    /// compile here until it is named (and then must be in `TYPES`, checked below).
    fn type_name(m: &ClientMsg) -> &'static str {
        match m {
            ClientMsg::Auth { .. } => "auth",
            ClientMsg::Invite { .. } => "invite",
            ClientMsg::Ringing { .. } => "ringing",
            ClientMsg::Accept { .. } => "accept",
            ClientMsg::Decline { .. } => "decline",
            ClientMsg::Cancel { .. } => "cancel",
            ClientMsg::Hangup { .. } => "hangup",
            ClientMsg::Candidate { .. } => "candidate",
            ClientMsg::EndOfCandidates { .. } => "end_of_candidates",
            ClientMsg::IceRestart { .. } => "ice_restart",
            ClientMsg::SendMessage { .. } => "send_message",
            ClientMsg::Ack { .. } => "ack",
            ClientMsg::AddContact { .. } => "add_contact",
            ClientMsg::RemoveContact { .. } => "remove_contact",
            ClientMsg::ListContacts => "list_contacts",
            ClientMsg::SetPresence { .. } => "set_presence",
        }
    }

    #[test]
    fn every_client_variant_is_listed_in_types() {
        let desc = SessionDesc {
            ice_ufrag: "abcd".into(),
            ice_pwd: "0123456789012345678901".into(),
            public_key: "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into(),
            candidates: Vec::new(),
            end_of_candidates: false,
            purpose: SessionPurpose::Call,
            transfer_fingerprint: None,
            nat: None,
        };
        let id = || CallId("0".repeat(32));
        let cand = Candidate {
            foundation: "1".into(),
            component: 1,
            transport: Transport::Udp,
            priority: 1,
            address: "192.0.2.1".parse().unwrap(),
            port: 5000,
            kind: CandidateType::Host,
            related_address: None,
            related_port: None,
        };
        let all = [
            ClientMsg::Auth { token: "t".into() },
            ClientMsg::Invite {
                to: "bob".into(),
                from: None,
                req: None,
                offer: desc.clone(),
            },
            ClientMsg::Ringing { call_id: id() },
            ClientMsg::Accept {
                call_id: id(),
                answer: desc.clone(),
            },
            ClientMsg::Decline { call_id: id() },
            ClientMsg::Cancel { call_id: id() },
            ClientMsg::Hangup { call_id: id() },
            ClientMsg::Candidate {
                call_id: id(),
                candidate: cand,
            },
            ClientMsg::EndOfCandidates { call_id: id() },
            ClientMsg::IceRestart {
                call_id: id(),
                desc,
            },
            ClientMsg::SendMessage {
                id: "m".into(),
                to: "bob".into(),
                from: None,
                body: "b".into(),
            },
            ClientMsg::Ack { seq: 1 },
            ClientMsg::AddContact {
                username: "bob".into(),
            },
            ClientMsg::RemoveContact {
                username: "bob".into(),
            },
            ClientMsg::ListContacts,
            ClientMsg::SetPresence {
                status: PresenceStatus::Away,
            },
        ];
        assert_eq!(all.len(), ClientMsg::TYPES.len());
        for m in &all {
            let v = serde_json::to_value(m).unwrap();
            let ty = v["type"].as_str().unwrap();
            assert_eq!(ty, type_name(m));
            assert!(ClientMsg::TYPES.contains(&ty), "{ty} missing from TYPES");
            assert_eq!(&serde_json::from_value::<ClientMsg>(v).unwrap(), m);
        }
    }

    #[test]
    fn purpose_and_fingerprint_shape() {
        let v = serde_json::json!({"ice_ufrag": "abcd", "ice_pwd": "0123456789012345678901",
            "public_key": "k", "candidates": [],
            "purpose": {"kind": "file", "name": "a.txt", "size": 12},
            "transfer_fingerprint": "ab".repeat(32)});
        let d: SessionDesc = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(
            d.purpose,
            SessionPurpose::File {
                name: "a.txt".into(),
                size: 12
            }
        );
        let mut back = serde_json::to_value(&d).unwrap();
        back.as_object_mut().unwrap().remove("end_of_candidates");
        assert_eq!(back, v);
        // The default purpose (a call) and an absent fingerprint stay off the wire.
        let plain = SessionDesc {
            purpose: SessionPurpose::Call,
            transfer_fingerprint: None,
            nat: None,
            ..d
        };
        let s = serde_json::to_string(&plain).unwrap();
        assert!(!s.contains("purpose") && !s.contains("fingerprint"), "{s}");
    }

    #[test]
    fn invite_roundtrip_and_shape() {
        let m = ClientMsg::Invite {
            to: "bob".into(),
            from: None,
            req: Some("r1".into()),
            offer: SessionDesc {
                ice_ufrag: "abcd".into(),
                ice_pwd: "0123456789012345678901".into(),
                public_key: "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into(),
                candidates: vec![Candidate {
                    foundation: "1".into(),
                    component: 1,
                    transport: Transport::Udp,
                    priority: 2130706431,
                    address: "192.0.2.1".parse().unwrap(),
                    port: 5000,
                    kind: CandidateType::Host,
                    related_address: None,
                    related_port: None,
                }],
                end_of_candidates: false,
                purpose: Default::default(),
                transfer_fingerprint: None,
                nat: None,
            },
        };
        let s = serde_json::to_string(&m).unwrap();
        assert!(s.contains(r#""type":"invite""#), "{s}");
        assert!(s.contains(r#""type":"host""#), "{s}");
        assert_eq!(serde_json::from_str::<ClientMsg>(&s).unwrap(), m);
        let e = ServerMsg::CallEnded {
            call_id: CallId("x".into()),
            reason: EndReason::Timeout,
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"type":"call_ended","call_id":"x","reason":"timeout"}"#
        );
    }
}
