//! Public configuration, events, outputs and statistics of the agent.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::time::Duration;

use crate::turn::TurnError;
pub use peerlink_api::signaling::TurnTransport;

/// How long one client transport of the TURN ladder (UDP, then TCP) may go without an
/// allocation before the next (TCP, then TLS) is tried: the default of
/// [`AgentConfig::turn_transport_after`]. One second covers a few UDP round trips, so a network
/// that answers at all answers within it, and keeps the fallback well within a call's setup.
pub const TURN_TRANSPORT_STEP: Duration = Duration::from_secs(1);

/// ICE role (RFC 8445 section 6.1.1): the caller is controlling.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Nominates pairs (the caller).
    Controlling,
    /// Follows the controlling side's nominations (the callee).
    Controlled,
}

impl Role {
    /// The other role.
    pub fn opposite(self) -> Role {
        match self {
            Role::Controlling => Role::Controlled,
            Role::Controlled => Role::Controlling,
        }
    }
}

/// Whether a path goes peer to peer or through a TURN relay (ours or the peer's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PathKind {
    /// Straight between the two peers' NAT mappings.
    Direct,
    /// Through a TURN relay.
    Relay,
}

/// The path application data uses now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SelectedPath {
    /// Direct or relayed.
    pub kind: PathKind,
    /// Our end: a local socket address, or our relayed address when we send through our relay.
    pub local: SocketAddr,
    /// The peer's transport address we send to.
    pub remote: SocketAddr,
    /// Round-trip time of the last check on this pair, if measured.
    pub rtt: Option<Duration>,
    /// How this side's packets on the path leave: UDP (direct, or to a relay over UDP), or
    /// the TCP or TLS connection of our TURN allocation.
    pub transport: TurnTransport,
}

/// Why the agent gave up on the call's connectivity; the app restarts through signaling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DisconnectReason {
    /// No authenticated response on the selected path for `consent_timeout` (RFC 7675).
    ConsentExpired,
    /// The selected path went through our TURN allocation, and it was lost.
    RelayLost(TurnError),
    /// Every candidate pair failed (after end-of-candidates) and none was ever selected.
    NoPath,
}

/// Something the application must act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A new local candidate to trickle to the peer through signaling.
    LocalCandidate(super::Candidate),
    /// Every local candidate of this generation has been found (or given up on).
    GatheringComplete,
    /// A path was selected for the first time (in this generation).
    Connected {
        /// The selected path.
        path: SelectedPath,
    },
    /// The selected path changed (e.g. relay -> direct).
    PathChanged {
        /// The new path.
        path: SelectedPath,
    },
    /// Connectivity is lost; call [`super::Agent::restart`] after a new exchange.
    Disconnected {
        /// Why.
        reason: DisconnectReason,
    },
}

/// A datagram to send from local socket `socket` to `to`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// Index of the local socket (order of `local_sockets` given to [`super::Agent::new`]).
    pub socket: usize,
    /// Destination.
    pub to: SocketAddr,
    /// The datagram.
    pub payload: Vec<u8>,
}

/// Application data (media, QUIC) the agent found in a datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AppData<'a> {
    /// A payload, unwrapped from TURN framing if it came through a relay.
    Payload {
        /// The bytes (borrowed from the datagram).
        data: Cow<'a, [u8]>,
        /// The path it came on.
        path: PathKind,
    },
}

/// What the driver must do with the connection of a TURN allocation over TCP or TLS. The
/// connections are keyed by the server's address; the operations come in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamOp {
    /// Open a connection to `server` over `transport` (TCP, or TLS over TCP). Report its
    /// bytes with [`super::Agent::handle_stream_data`] and its end (also a failed connect or
    /// handshake) with [`super::Agent::handle_stream_closed`].
    Open {
        /// The TURN server's TCP or TLS listener.
        server: SocketAddr,
        /// TCP or TLS.
        transport: TurnTransport,
    },
    /// Write `bytes` to the connection to `server` (after its open, in order).
    Write {
        /// The server.
        server: SocketAddr,
        /// The bytes (whole STUN messages or padded ChannelData).
        bytes: Vec<u8>,
    },
    /// Close the connection to `server`: its allocation is released, abandoned or broken
    /// (closing it frees the allocation on the server).
    Close {
        /// The server.
        server: SocketAddr,
    },
}

/// One rung of the TURN ladder tried in this generation and how it went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TurnAttempt {
    /// The client transport.
    pub transport: TurnTransport,
    /// The server tried.
    pub server: SocketAddr,
    /// How it went.
    pub outcome: TurnOutcome,
}

/// The outcome of one [`TurnAttempt`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TurnOutcome {
    /// Still waiting for the allocation.
    Pending,
    /// The allocation was granted.
    Allocated,
    /// Given up on: no allocation within the bound.
    NoAnswer,
    /// The Allocate failed (refused, connection failed or closed).
    Failed(String),
}

/// Why [`super::Agent::send`] could not wrap a payload.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// No path is selected (not yet connected, or disconnected).
    #[error("no path selected")]
    NotConnected,
    /// The relayed path could not frame the payload.
    #[error("relay framing failed: {0}")]
    Relay(#[from] TurnError),
}

/// Long-term (TURN REST) credentials for the relay the directory chose, and how to reach it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TurnConfig {
    /// The relay's listener for `transport`.
    pub server: SocketAddr,
    /// UDP, TCP or TLS.
    pub transport: TurnTransport,
    /// Username (REST: `"<expiry>:<user>"`).
    pub username: String,
    /// Password (REST: base64 HMAC).
    pub password: String,
}

/// How an agent is configured. [`AgentConfig::new`] sets the defaults stated per field.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Our role (caller = controlling). A role conflict is resolved by tie-breakers.
    pub role: Role,
    /// Our ICE username fragment.
    pub local_ufrag: String,
    /// Our ICE password.
    pub local_pwd: String,
    /// Seed of the RNG (transaction ids, tie-breaker). Give each agent its own.
    pub seed: u64,
    /// STUN server for the server-reflexive candidate (signaling's STUN port), if any.
    pub stun_server: Option<SocketAddr>,
    /// TURN relay for the relayed candidate, if any.
    pub turn: Option<TurnConfig>,
    /// Further relays tried in order when the allocation on the one before fails or gets no
    /// answer within `turn_alternate_after` (default none).
    pub turn_alternates: Vec<TurnConfig>,
    /// How long an Allocate may go unanswered before the next relay is tried (default 400 ms).
    pub turn_alternate_after: Duration,
    /// The TURN ladder: relays are tried over UDP first, then TCP, then TLS (each transport's
    /// relays in order). A transport that has not given an allocation this long after its
    /// first Allocate gives way to the next (default [`TURN_TRANSPORT_STEP`], 1 s).
    pub turn_transport_after: Duration,
    /// First interval between checks on one pair (default 25 ms).
    pub check_interval: Duration,
    /// Largest interval checks back off to (default 250 ms).
    pub max_check_interval: Duration,
    /// A pair that has not validated this long after its first check fails (default 8 s).
    pub pair_timeout: Duration,
    /// A relayed pair may be selected once no direct pair validated this long after checks
    /// started (default 600 ms: answer -> first media via relay stays under 1.5 s).
    pub relay_fallback_after: Duration,
    /// The selected path is dead after this long without an authenticated answer (default 5 s).
    pub consent_timeout: Duration,
    /// Consent checks (which also keep NAT mappings open) on the selected pair (default 2 s);
    /// when the path has been silent that long, they go 4x faster.
    pub keepalive_interval: Duration,
    /// Initial retransmission timeout of STUN/TURN requests to servers (default 150 ms).
    pub stun_rto: Duration,
    /// Transmissions of a server-reflexive Binding request (default 6).
    pub stun_max_transmissions: u32,
    /// Extra checks sent on a pair right after its first success or first incoming check
    /// (the peer's early probes may have died at our NAT before our own outgoing check
    /// created its entry; default 3).
    pub extra_checks: u8,
    /// Check and send only through the TURN relay (WebRTC's relay-only policy): no pair uses a
    /// host socket, so the peer never learns this side's host or NAT address (default false).
    pub relay_only: bool,
    /// Release our TURN allocation once it is not needed (RFC 8445 section 8.3 frees unused
    /// candidates): when the selected pair has not gone through it for this long and nothing
    /// (checks, consent, media) has arrived through it for as long, Refresh LIFETIME 0 is sent
    /// and our relayed pairs end. A call then holds only the allocation it uses; a restart
    /// allocates anew. `None` keeps the allocation for the whole call (default 3 s).
    pub release_unused_relay_after: Option<Duration>,
    /// A second STUN server, for the sockets of the other family than `stun_server`'s
    /// (signaling's IPv6 STUN address beside its IPv4 one): each socket asks the server of
    /// its own family (default none).
    pub stun_server6: Option<SocketAddr>,
    /// Once the first TURN allocation is granted, ask for a relayed address of the other
    /// family too (REQUESTED-ADDRESS-FAMILY), over another socket of the relay's family or
    /// from the same socket to the next relay: a peer of only that family can then reach us
    /// through it (default false; see the `family` notes in the module docs).
    pub relay_other_family: bool,
}

impl AgentConfig {
    /// A configuration with the defaults above and no servers.
    pub fn new(
        role: Role,
        local_ufrag: impl Into<String>,
        local_pwd: impl Into<String>,
        seed: u64,
    ) -> Self {
        AgentConfig {
            role,
            local_ufrag: local_ufrag.into(),
            local_pwd: local_pwd.into(),
            seed,
            stun_server: None,
            turn: None,
            turn_alternates: Vec::new(),
            turn_alternate_after: Duration::from_millis(400),
            turn_transport_after: TURN_TRANSPORT_STEP,
            check_interval: Duration::from_millis(25),
            max_check_interval: Duration::from_millis(250),
            pair_timeout: Duration::from_secs(8),
            relay_fallback_after: Duration::from_millis(600),
            consent_timeout: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(2),
            stun_rto: Duration::from_millis(150),
            stun_max_transmissions: 6,
            extra_checks: 3,
            relay_only: false,
            release_unused_relay_after: Some(Duration::from_secs(3)),
            stun_server6: None,
            relay_other_family: false,
        }
    }
}

/// Counters and figures of one agent (over all generations unless said otherwise).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentStats {
    /// Connectivity checks sent (incl. triggered, extra and consent checks).
    pub checks_sent: u64,
    /// Authenticated checks received from the peer.
    pub checks_received: u64,
    /// Authenticated check responses received.
    pub responses_received: u64,
    /// Consent checks sent on the selected pair.
    pub consent_checks_sent: u64,
    /// Checks or responses whose MESSAGE-INTEGRITY did not verify (dropped).
    pub integrity_failures: u64,
    /// Checks for another ufrag / from an old generation (dropped).
    pub wrong_username: u64,
    /// Datagrams that parse as nothing we accept (garbage, malformed STUN, unknown methods).
    pub malformed: u64,
    /// Responses matching no outstanding check (late, duplicated or forged).
    pub unmatched_responses: u64,
    /// Responses from an address other than the one checked (non-symmetric).
    pub asymmetric_responses: u64,
    /// Role conflicts seen (487 sent or received, or a request with our own role).
    pub role_conflicts: u64,
    /// Times we switched role.
    pub role_switches: u64,
    /// Candidate pairs formed (this generation).
    pub pairs: usize,
    /// Pairs validated (this generation).
    pub valid_pairs: usize,
    /// Local candidates (this generation, peer-reflexive included).
    pub local_candidates: usize,
    /// Remote candidates (this generation, peer-reflexive included).
    pub remote_candidates: usize,
    /// Peer-reflexive candidates learned (local from XOR-MAPPED-ADDRESS, remote from checks).
    pub peer_reflexive_learned: u64,
    /// The selected path now.
    pub selected: Option<SelectedPath>,
    /// From checks starting (credentials and a remote candidate known) to Connected, in the
    /// current generation.
    pub time_to_connected: Option<Duration>,
    /// Selected path changes (after the first Connected).
    pub path_changes: u64,
    /// Restarts.
    pub restarts: u64,
    /// Relays given up on (no answer in time or Allocate failed) for the next one.
    pub turn_failovers: u64,
    /// The TURN ladder's rungs tried in the current generation, in order.
    pub turn_attempts: Vec<TurnAttempt>,
    /// Allocations released because the call settled on a pair that does not use them
    /// (`release_unused_relay_after`).
    pub unused_relay_released: u64,
    /// Application payloads wrapped by `send`.
    pub app_sent: u64,
    /// Application payloads handed up.
    pub app_received: u64,
    /// Application-looking datagrams from unknown sources (dropped).
    pub app_dropped: u64,
    /// TURN input the TURN client refused (unknown channel, bad framing, ...).
    pub turn_input_errors: u64,
    /// Outgoing messages we could not encode or frame (never expected).
    pub send_errors: u64,
}
