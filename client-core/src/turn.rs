//! Sans-IO TURN client (RFC 8656 over UDP, TCP or TLS): one allocation per [`TurnClient`].
//!
//! Flow: [`TurnClient::allocate`] sends an unauthenticated Allocate; the server answers
//! 401 with REALM and NONCE; the client derives the long-term key (MD5 of
//! `user:realm:pass`, static or TURN REST credentials) and retries with USERNAME, REALM,
//! NONCE and MESSAGE-INTEGRITY. A 438 (stale nonce) is retried with the new nonce, a bounded
//! number of times. Once [`Event::Allocated`] arrives the caller installs permissions
//! ([`TurnClient::create_permission`]) and binds channels ([`TurnClient::bind_channel`]).
//! Outgoing data is framed as ChannelData when a channel is bound, as a Send indication
//! otherwise ([`TurnClient::encode_data`]); incoming Data indications and ChannelData are
//! decoded by [`TurnClient::handle_input`].
//!
//! Timers (all driven by [`TurnClient::handle_timeout`] with the caller's `now`): requests
//! are retransmitted with RFC 8489's RTO (500 ms, doubling, 7 transmissions, a final wait of
//! 16 RTO); the allocation is refreshed a minute before it expires; permissions every 4
//! minutes (they last 5); channels 9 minutes after binding (they last 10).
//! [`TurnClient::deallocate`] sends Refresh with LIFETIME 0.
//!
//! A client that already holds the server's realm and nonce (from another allocation of the same
//! host: peerlink-relay binds nonces to the client's IP, not its port) starts authenticated:
//! [`TurnClient::auth_hint`] on the old client, [`TurnClient::resume_auth`] on the new one, and
//! its first Allocate carries credentials, costing the server no 401. A 401 or 438 to such a
//! request falls back to the ordinary challenge once.
//!
//! Over a stream (TCP, or TLS: [`ClientTransport::Stream`], RFC 8656 section 3.1) the caller
//! moves the connection's bytes: what it reads goes to [`TurnClient::handle_stream_bytes`],
//! complete frames come out of [`TurnClient::poll_stream_input`] (STUN messages and ChannelData
//! reassembled by `peerlink_proto`'s [`StreamFramer`], whatever the reads' sizes); transmits are
//! written to the connection in order. ChannelData sent is padded to a multiple of 4 (RFC 8656
//! section 12.5). Requests are not retransmitted on a reliable transport (RFC 8489 section
//! 6.2.2); a transaction fails after [`TurnConfig::stream_timeout`] (39.5 s, RFC 8489's Ti).
//! The stream is the allocation: bytes that cannot be framed (garbage, a frame longer than
//! [`MAX_STREAM_FRAME`]) or the connection closing ([`TurnClient::handle_stream_closed`], also
//! in the middle of a frame) end it with a [`TurnError::Stream`] or
//! [`TurnError::ConnectionClosed`], and the caller closes the connection.
//!
//! A 300 (Try Alternate) answer to Allocate moves the client to the ALTERNATE-SERVER (with
//! integrity when the request was authenticated; at most [`MAX_REDIRECTS`], never back to a
//! server that redirected): [`Event::Redirected`], then the Allocate starts over there.
//!
//! What it is not: no sockets, no clock reads, no unseeded randomness (transaction ids come
//! from a ChaCha RNG seeded from [`TurnConfig::seed`]); no connections (the caller opens them,
//! TLS included); no TCP relayed transport (RFC 6062); no IPv6 dual allocation, no MESSAGE-INTEGRITY-SHA256 / PASSWORD-ALGORITHMS negotiation (coturn and
//! peerlink-relay both accept classic MESSAGE-INTEGRITY).

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use peerlink_proto::attrs::{
    AlternateServer, ChannelNumber, Data, ErrorCode, Lifetime, Nonce, Realm,
    RequestedAddressFamily, RequestedTransport, Software, Username, XorMappedAddress,
    XorPeerAddress, XorRelayedAddress,
};
use peerlink_proto::channel::{self, ChannelData, ChannelDataError};
use peerlink_proto::stream::{StreamError, StreamFramer};
use peerlink_proto::{
    AddressFamily, AttrError, Class, EncodeError, Message, MessageBuilder, MessageType, Method,
    PacketKind, ParseError, TransactionId, auth, classify,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// RFC 8489 initial retransmission timeout.
pub const DEFAULT_RTO: Duration = Duration::from_millis(500);
/// RFC 8489 `Rc`: transmissions of one request before giving up.
pub const DEFAULT_MAX_TRANSMISSIONS: u32 = 7;
/// RFC 8489 `Rm`: the wait after the last transmission, in multiples of the initial RTO.
pub const LAST_WAIT_FACTOR: u32 = 16;
/// Lifetime we ask for (RFC 8656 default allocation lifetime).
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(600);
/// Permissions last 300 s (RFC 8656 section 9); refresh them after 4 minutes.
pub const PERMISSION_REFRESH: Duration = Duration::from_secs(240);
/// Channel bindings last 600 s (RFC 8656 section 12); refresh them after 9 minutes.
pub const CHANNEL_REFRESH: Duration = Duration::from_secs(540);
/// How many 438 (stale nonce) answers in a row one request may get before it fails.
pub const MAX_STALE_NONCE_RETRIES: u8 = 3;
/// How many 300 (Try Alternate) redirects one allocation follows before it fails.
pub const MAX_REDIRECTS: usize = 3;
/// Size of the buffer requests are encoded into (a TURN request never comes close).
const REQUEST_BUF: usize = 1280;
/// RFC 8489 `Ti`: how long a request over a reliable transport waits for its answer.
pub const STREAM_TRANSACTION_TIMEOUT: Duration = Duration::from_millis(39_500);
/// Longest frame taken from a stream (STUN message or ChannelData, padding excluded): twice
/// what any relay forwards (peerlink-relay takes datagrams up to 4 KB). A longer header means
/// a broken or hostile stream, which is closed before its payload is buffered.
pub const MAX_STREAM_FRAME: usize = 8192;

/// How the client's messages reach the server.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum ClientTransport {
    /// UDP: one message per datagram, requests retransmitted.
    #[default]
    Datagram,
    /// A TCP or TLS connection: messages back to back, ChannelData padded, no retransmissions.
    Stream,
}

/// How a client is configured. Field docs state defaults set by [`TurnConfig::new`].
#[derive(Clone, Debug)]
pub struct TurnConfig {
    /// The TURN server's UDP address.
    pub server: SocketAddr,
    /// Long-term credential username.
    pub username: String,
    /// Long-term credential password.
    pub password: String,
    /// Requested allocation lifetime (default 600 s; the server may grant less).
    pub lifetime: Duration,
    /// Initial retransmission timeout (default 500 ms).
    pub rto: Duration,
    /// Transmissions per request before it fails (default 7).
    pub max_transmissions: u32,
    /// Seed of the transaction-id RNG (default 0; give every client its own).
    pub seed: u64,
    /// Family of the relayed address to ask for (REQUESTED-ADDRESS-FAMILY, RFC 8656): `None`
    /// sends no attribute, and the server relays IPv4 (default none).
    pub requested_family: Option<AddressFamily>,
    /// SOFTWARE attribute to send (default none).
    pub software: Option<String>,
    /// Append FINGERPRINT to requests (default true).
    pub fingerprint: bool,
    /// Datagrams or a stream (default [`ClientTransport::Datagram`]).
    pub transport: ClientTransport,
    /// Over a stream: how long a request waits for its answer (default
    /// [`STREAM_TRANSACTION_TIMEOUT`]).
    pub stream_timeout: Duration,
}

impl TurnConfig {
    /// A config with static long-term credentials and the defaults above.
    pub fn new(
        server: SocketAddr,
        username: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        Self {
            server,
            username: username.into(),
            password: password.into(),
            lifetime: DEFAULT_LIFETIME,
            rto: DEFAULT_RTO,
            max_transmissions: DEFAULT_MAX_TRANSMISSIONS,
            seed: 0,
            requested_family: None,
            software: None,
            fingerprint: true,
            transport: ClientTransport::Datagram,
            stream_timeout: STREAM_TRANSACTION_TIMEOUT,
        }
    }

    /// A config with TURN REST ephemeral credentials (coturn `use-auth-secret` style):
    /// username `"<now_unix + ttl>:<user>"`, password `base64(HMAC-SHA1(secret, username))`.
    pub fn rest(
        server: SocketAddr,
        secret: &[u8],
        user: &str,
        now_unix: u64,
        ttl_secs: u64,
    ) -> Self {
        let (username, password) = auth::rest::credentials(secret, user, now_unix, ttl_secs);
        Self::new(server, username, password)
    }

    /// Sets the RNG seed (builder style).
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Sets the transport (builder style).
    pub fn with_transport(mut self, transport: ClientTransport) -> Self {
        self.transport = transport;
        self
    }
}

/// Where the allocation stands.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum AllocationState {
    /// Nothing sent yet.
    Idle,
    /// Allocate in flight (including the authentication round trip).
    Allocating,
    /// The server granted the allocation.
    Allocated,
    /// Refresh with LIFETIME 0 in flight.
    Deallocating,
    /// The allocation is gone (deallocated or expired); terminal.
    Closed,
    /// Allocation failed or a refresh failed; terminal.
    Failed,
}

/// Something the caller must send: `payload` to `destination` (always the server).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Transmit {
    /// Where to send.
    pub destination: SocketAddr,
    /// The datagram.
    pub payload: Vec<u8>,
}

/// What happened, for the caller.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Event {
    /// The allocation was granted.
    Allocated {
        /// The relayed transport address peers send to.
        relayed: SocketAddr,
        /// Our address as the server saw it (if the server said).
        mapped: Option<SocketAddr>,
        /// Granted lifetime.
        lifetime: Duration,
    },
    /// Allocate failed; the client is in [`AllocationState::Failed`].
    AllocationFailed(TurnError),
    /// A refresh succeeded.
    Refreshed {
        /// Granted lifetime.
        lifetime: Duration,
    },
    /// A refresh failed or the allocation expired; the client is in
    /// [`AllocationState::Failed`].
    AllocationLost(TurnError),
    /// The allocation was released (Refresh LIFETIME 0 answered, or given up on).
    Deallocated,
    /// A permission for `peer` is installed (or refreshed).
    PermissionCreated {
        /// The peer IP.
        peer: IpAddr,
    },
    /// CreatePermission failed for these peers.
    PermissionFailed {
        /// The peer IPs of the failed request.
        peers: Vec<IpAddr>,
        /// Why.
        error: TurnError,
    },
    /// A channel is bound (or refreshed).
    ChannelBound {
        /// The peer transport address.
        peer: SocketAddr,
        /// The channel number.
        channel: u16,
    },
    /// The server answered Allocate with 300 Try Alternate: the client now talks to `to`
    /// ([`TurnConfig::server`] changed) and has sent the Allocate there.
    Redirected {
        /// The server that redirected.
        from: SocketAddr,
        /// Its ALTERNATE-SERVER.
        to: SocketAddr,
    },
    /// ChannelBind failed; the channel is forgotten.
    ChannelBindFailed {
        /// The peer transport address.
        peer: SocketAddr,
        /// Why.
        error: TurnError,
    },
}

/// Why a TURN operation failed.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
pub enum TurnError {
    /// No response after all retransmissions.
    #[error("{method} request got no response after {transmissions} transmissions")]
    Timeout {
        /// Method name.
        method: &'static str,
        /// Transmissions made.
        transmissions: u32,
    },
    /// The server answered with an error code.
    #[error("{method} rejected: {code} {reason}")]
    Rejected {
        /// Method name.
        method: &'static str,
        /// The ERROR-CODE.
        code: u16,
        /// The reason phrase.
        reason: String,
    },
    /// 401 although we sent credentials: wrong username or password.
    #[error("{method}: server rejected our credentials (401)")]
    Unauthorized {
        /// Method name.
        method: &'static str,
    },
    /// A 401 without REALM and NONCE: cannot authenticate.
    #[error("{method}: 401 without REALM and NONCE")]
    MissingChallenge {
        /// Method name.
        method: &'static str,
    },
    /// Too many 438 (stale nonce) answers in a row.
    #[error("{method}: stale nonce {retries} times in a row")]
    StaleNonceLoop {
        /// Method name.
        method: &'static str,
        /// Retries made.
        retries: u8,
    },
    /// A success or error response lacks a required attribute.
    #[error("{method} response lacks {attr}")]
    MissingAttribute {
        /// Method name.
        method: &'static str,
        /// Attribute name.
        attr: &'static str,
    },
    /// A response attribute could not be decoded.
    #[error("malformed attribute in response: {0}")]
    Attr(#[from] AttrError),
    /// The operation needs a granted allocation.
    #[error("allocation is not active (state {0:?})")]
    NotAllocated(AllocationState),
    /// [`TurnClient::allocate`] was called twice.
    #[error("allocate called in state {0:?}")]
    AlreadyStarted(AllocationState),
    /// Data to a peer without a permission or channel.
    #[error("no permission for peer {0}")]
    NoPermission(SocketAddr),
    /// All 4096 channel numbers are in use.
    #[error("no free channel number")]
    ChannelsExhausted,
    /// The allocation expired without a successful refresh.
    #[error("allocation expired")]
    Expired,
    /// A message could not be encoded (buffer too small, value too long).
    #[error("encoding failed: {0}")]
    Encode(#[from] EncodeError),
    /// ChannelData could not be encoded.
    #[error("ChannelData encoding failed: {0}")]
    ChannelData(#[from] ChannelDataError),
    /// The stream from the server cannot be framed (garbage, an oversized frame): the
    /// connection must be closed, and the allocation is gone with it.
    #[error("TURN stream broken: {0}")]
    Stream(#[from] StreamError),
    /// The stream connection to the server closed (the allocation lives with it).
    #[error("TURN connection closed{}", if *.mid_frame { " in the middle of a frame" } else { "" })]
    ConnectionClosed {
        /// A frame had begun and not finished.
        mid_frame: bool,
    },
    /// A stream call on a datagram client, or the reverse.
    #[error("not a {0:?} client")]
    WrongTransport(ClientTransport),
}

/// Why an incoming datagram was not accepted. The client state is unchanged by such input.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
pub enum InputError {
    /// The datagram did not come from the server.
    #[error("datagram from {0}, not from the TURN server")]
    UnexpectedSource(SocketAddr),
    /// Neither STUN nor ChannelData (by RFC 7983 first byte).
    #[error("datagram is neither STUN nor ChannelData")]
    NotTurn,
    /// Invalid STUN.
    #[error("invalid STUN: {0}")]
    Stun(#[from] ParseError),
    /// Invalid ChannelData.
    #[error("invalid ChannelData: {0}")]
    ChannelData(#[from] ChannelDataError),
    /// ChannelData on a channel we have not bound.
    #[error("ChannelData on unbound channel 0x{0:04x}")]
    UnknownChannel(u16),
    /// A response that matches no outstanding request (late duplicate, or forged).
    #[error("response matches no outstanding transaction")]
    UnknownTransaction,
    /// A response whose MESSAGE-INTEGRITY does not verify: dropped.
    #[error("response integrity does not verify")]
    IntegrityMismatch,
    /// A STUN message a client does not expect (a request, or an unknown indication).
    #[error("unexpected {0}")]
    Unexpected(MessageType),
    /// A Data indication with a malformed or missing attribute.
    #[error("bad Data indication: {0}")]
    BadDataIndication(&'static str),
}

/// The result of accepted input.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Input<'a> {
    /// Application data from `peer` (borrowed from the datagram).
    Data {
        /// The peer's transport address.
        peer: SocketAddr,
        /// The payload.
        data: &'a [u8],
    },
    /// A control message was consumed; check [`TurnClient::poll_event`] and friends.
    Control,
}

#[derive(Clone, Debug)]
enum RequestKind {
    Allocate,
    Refresh { lifetime: u32 },
    CreatePermission { peers: Vec<IpAddr> },
    ChannelBind { channel: u16, peer: SocketAddr },
}

impl RequestKind {
    fn method(&self) -> Method {
        match self {
            RequestKind::Allocate => Method::ALLOCATE,
            RequestKind::Refresh { .. } => Method::REFRESH,
            RequestKind::CreatePermission { .. } => Method::CREATE_PERMISSION,
            RequestKind::ChannelBind { .. } => Method::CHANNEL_BIND,
        }
    }
}

#[derive(Debug)]
struct Transaction {
    tid: TransactionId,
    kind: RequestKind,
    bytes: Vec<u8>,
    transmissions: u32,
    next_at: Instant,
    rto: Duration,
    stale_retries: u8,
    authenticated: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Binding {
    Pending,
    Active,
}

#[derive(Clone, Copy, Debug)]
struct Permission {
    state: Binding,
    in_flight: bool,
    refresh_at: Option<Instant>,
}

#[derive(Clone, Copy, Debug)]
struct Channel {
    number: u16,
    state: Binding,
    in_flight: bool,
    refresh_at: Option<Instant>,
}

/// Credentials learned from the server's challenge.
#[derive(Clone, Debug)]
struct AuthState {
    realm: String,
    nonce: String,
    key: [u8; 16],
    /// Taken over from another client ([`TurnClient::resume_auth`]), not yet confirmed by an
    /// answer of this server to this client: a 401 falls back to its challenge once.
    resumed: bool,
}

/// A server's realm and nonce as one client learned them, for the next client of the same host
/// and server ([`TurnClient::auth_hint`], [`TurnClient::resume_auth`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthHint {
    /// The server that issued them.
    pub server: SocketAddr,
    /// Its REALM.
    pub realm: String,
    /// Its NONCE.
    pub nonce: String,
}

/// One TURN allocation as a sans-IO state machine.
#[derive(Debug)]
pub struct TurnClient {
    config: TurnConfig,
    rng: ChaCha8Rng,
    state: AllocationState,
    auth: Option<AuthState>,
    relayed: Option<SocketAddr>,
    mapped: Option<SocketAddr>,
    expires_at: Option<Instant>,
    refresh_at: Option<Instant>,
    refresh_in_flight: bool,
    transactions: Vec<Transaction>,
    permissions: HashMap<IpAddr, Permission>,
    channels: HashMap<SocketAddr, Channel>,
    channel_peers: HashMap<u16, SocketAddr>,
    next_channel: u16,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    /// Servers that redirected this allocation (a loop back to one of them fails it).
    redirected_from: Vec<SocketAddr>,
    /// Stream transport: reassembles frames from the connection's bytes.
    framer: StreamFramer,
}

/// One frame taken from the stream.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum StreamInput {
    /// Application data from `peer`.
    Data {
        /// The peer's transport address.
        peer: SocketAddr,
        /// The payload.
        data: Vec<u8>,
    },
    /// A control message was consumed; check [`TurnClient::poll_event`] and friends.
    Control,
    /// A well-framed message that was not accepted (unknown channel, bad STUN, a response to
    /// nothing): dropped, the stream goes on.
    Dropped(InputError),
}

impl TurnClient {
    /// A client in [`AllocationState::Idle`].
    pub fn new(config: TurnConfig) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(config.seed);
        Self {
            config,
            rng,
            state: AllocationState::Idle,
            auth: None,
            relayed: None,
            mapped: None,
            expires_at: None,
            refresh_at: None,
            refresh_in_flight: false,
            transactions: Vec::new(),
            permissions: HashMap::new(),
            channels: HashMap::new(),
            channel_peers: HashMap::new(),
            next_channel: channel::CHANNEL_MIN,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            redirected_from: Vec::new(),
            framer: StreamFramer::new(MAX_STREAM_FRAME),
        }
    }

    fn is_stream(&self) -> bool {
        self.config.transport == ClientTransport::Stream
    }

    /// The configuration.
    pub fn config(&self) -> &TurnConfig {
        &self.config
    }
    /// Where the allocation stands.
    pub fn state(&self) -> AllocationState {
        self.state
    }
    /// The relayed address, once allocated.
    pub fn relayed_addr(&self) -> Option<SocketAddr> {
        self.relayed
    }
    /// Our server-reflexive address, if the server reported it.
    pub fn mapped_addr(&self) -> Option<SocketAddr> {
        self.mapped
    }
    /// The bound (confirmed) channel number for `peer`.
    pub fn channel_for(&self, peer: SocketAddr) -> Option<u16> {
        self.channels
            .get(&peer)
            .filter(|c| c.state == Binding::Active)
            .map(|c| c.number)
    }
    /// True if a permission for `ip` is installed (confirmed by the server).
    pub fn has_permission(&self, ip: IpAddr) -> bool {
        self.permissions
            .get(&ip)
            .is_some_and(|p| p.state == Binding::Active)
    }
    /// Requests still waiting for an answer.
    pub fn outstanding_requests(&self) -> usize {
        self.transactions.len()
    }

    /// The realm and nonce this client authenticates with, once the server challenged it.
    pub fn auth_hint(&self) -> Option<AuthHint> {
        self.auth.as_ref().map(|a| AuthHint {
            server: self.config.server,
            realm: a.realm.clone(),
            nonce: a.nonce.clone(),
        })
    }

    /// Authenticate from the first request on with `hint` (learned by another client of this
    /// host from the same server). Ignored (false) when the hint is for another server or the
    /// allocation has started.
    pub fn resume_auth(&mut self, hint: &AuthHint) -> bool {
        if hint.server != self.config.server || self.state != AllocationState::Idle {
            return false;
        }
        let key = auth::long_term_key(&self.config.username, &hint.realm, &self.config.password);
        self.auth = Some(AuthState {
            realm: hint.realm.clone(),
            nonce: hint.nonce.clone(),
            key,
            resumed: true,
        });
        true
    }

    /// Starts the allocation: queues an Allocate request.
    pub fn allocate(&mut self, now: Instant) -> Result<(), TurnError> {
        if self.state != AllocationState::Idle {
            return Err(TurnError::AlreadyStarted(self.state));
        }
        self.state = AllocationState::Allocating;
        self.start(now, RequestKind::Allocate)
    }

    /// Installs (or refreshes) a permission for `peer`; [`Event::PermissionCreated`] follows.
    pub fn create_permission(&mut self, now: Instant, peer: IpAddr) -> Result<(), TurnError> {
        self.require_allocated()?;
        let p = self.permissions.entry(peer).or_insert(Permission {
            state: Binding::Pending,
            in_flight: false,
            refresh_at: None,
        });
        if p.in_flight {
            return Ok(());
        }
        p.in_flight = true;
        self.start(now, RequestKind::CreatePermission { peers: vec![peer] })
    }

    /// Binds a channel to `peer` (also installing its permission); returns the channel number.
    /// Data uses it once [`Event::ChannelBound`] arrives.
    pub fn bind_channel(&mut self, now: Instant, peer: SocketAddr) -> Result<u16, TurnError> {
        self.require_allocated()?;
        if let Some(c) = self.channels.get(&peer) {
            return Ok(c.number);
        }
        if self.next_channel > channel::CHANNEL_MAX {
            return Err(TurnError::ChannelsExhausted);
        }
        let number = self.next_channel;
        self.next_channel += 1;
        self.channels.insert(
            peer,
            Channel {
                number,
                state: Binding::Pending,
                in_flight: true,
                refresh_at: None,
            },
        );
        self.channel_peers.insert(number, peer);
        self.start(
            now,
            RequestKind::ChannelBind {
                channel: number,
                peer,
            },
        )?;
        Ok(number)
    }

    /// Refreshes the allocation now (normally the timer does it); [`Event::Refreshed`] or
    /// [`Event::AllocationLost`] follows. A no-op while a refresh is in flight.
    pub fn refresh(&mut self, now: Instant) -> Result<(), TurnError> {
        self.require_allocated()?;
        if self.refresh_in_flight {
            return Ok(());
        }
        self.refresh_in_flight = true;
        let lifetime = secs_u32(self.config.lifetime);
        let res = self.start(now, RequestKind::Refresh { lifetime });
        if res.is_err() {
            self.refresh_in_flight = false;
        }
        res
    }

    /// Releases the allocation: Refresh with LIFETIME 0; [`Event::Deallocated`] follows.
    pub fn deallocate(&mut self, now: Instant) -> Result<(), TurnError> {
        self.require_allocated()?;
        self.state = AllocationState::Deallocating;
        self.refresh_at = None;
        // Outstanding refreshes of the allocation itself are superseded.
        self.transactions
            .retain(|t| !matches!(t.kind, RequestKind::Refresh { .. }));
        self.start(now, RequestKind::Refresh { lifetime: 0 })
    }

    /// Frames `data` for `peer` into `out`: ChannelData if a channel is bound, else a Send
    /// indication (which needs a permission, pending or installed). Returns the length.
    pub fn encode_data(
        &mut self,
        peer: SocketAddr,
        data: &[u8],
        out: &mut [u8],
    ) -> Result<usize, TurnError> {
        self.require_allocated()?;
        if let Some(ch) = self.channel_for(peer) {
            return Ok(channel::encode(ch, data, out, self.is_stream())?);
        }
        if !self.permissions.contains_key(&peer.ip()) && !self.channels.contains_key(&peer) {
            return Err(TurnError::NoPermission(peer));
        }
        let tid = TransactionId::random(&mut self.rng);
        let mut b = MessageBuilder::new(out, MessageType::SEND_INDICATION, tid)?;
        b.add(&XorPeerAddress(peer))?;
        b.add(&Data(data))?;
        Ok(b.finish())
    }

    /// Like [`encode_data`](Self::encode_data) but queues a [`Transmit`].
    pub fn send(&mut self, peer: SocketAddr, data: &[u8]) -> Result<(), TurnError> {
        let mut buf = vec![0u8; data.len() + 64];
        let n = self.encode_data(peer, data, &mut buf)?;
        buf.truncate(n);
        self.transmits.push_back(Transmit {
            destination: self.config.server,
            payload: buf,
        });
        Ok(())
    }

    /// Feeds one datagram received from `from`. Errors leave the state unchanged.
    pub fn handle_input<'a>(
        &mut self,
        now: Instant,
        from: SocketAddr,
        datagram: &'a [u8],
    ) -> Result<Input<'a>, InputError> {
        if from != self.config.server {
            return Err(InputError::UnexpectedSource(from));
        }
        match classify(datagram) {
            PacketKind::ChannelData => {
                let cd = ChannelData::parse(datagram)?;
                let peer = *self
                    .channel_peers
                    .get(&cd.channel)
                    .ok_or(InputError::UnknownChannel(cd.channel))?;
                Ok(Input::Data {
                    peer,
                    data: cd.data,
                })
            }
            PacketKind::Stun => {
                let msg = Message::parse(datagram)?;
                match msg.class() {
                    Class::Indication if msg.method() == Method::DATA => {
                        let peer = match msg.get::<XorPeerAddress>() {
                            Some(Ok(a)) => a.0,
                            Some(Err(_)) => {
                                return Err(InputError::BadDataIndication("bad XOR-PEER-ADDRESS"));
                            }
                            None => {
                                return Err(InputError::BadDataIndication("no XOR-PEER-ADDRESS"));
                            }
                        };
                        let data = match msg.get::<Data>() {
                            Some(Ok(d)) => d.0,
                            _ => return Err(InputError::BadDataIndication("no DATA")),
                        };
                        Ok(Input::Data { peer, data })
                    }
                    Class::Success | Class::Error => {
                        self.handle_response(now, &msg)?;
                        Ok(Input::Control)
                    }
                    _ => Err(InputError::Unexpected(msg.message_type())),
                }
            }
            _ => Err(InputError::NotTurn),
        }
    }

    /// Stream transport: appends bytes read from the connection (any split). Complete frames
    /// are then taken with [`poll_stream_input`](Self::poll_stream_input).
    pub fn handle_stream_bytes(&mut self, bytes: &[u8]) -> Result<(), TurnError> {
        if !self.is_stream() {
            return Err(TurnError::WrongTransport(self.config.transport));
        }
        self.framer.push(bytes);
        Ok(())
    }

    /// Stream transport: the next complete frame, handled as a datagram from the server would
    /// be; `Ok(None)` when more bytes are needed. An error means the stream is out of step (or
    /// was closed): the allocation has ended with it ([`Event::AllocationFailed`] or
    /// [`Event::AllocationLost`]) and the caller closes the connection.
    pub fn poll_stream_input(&mut self, now: Instant) -> Result<Option<StreamInput>, TurnError> {
        if !self.is_stream() {
            return Err(TurnError::WrongTransport(self.config.transport));
        }
        let bytes = match self.framer.next_frame() {
            Ok(Some(f)) => f.bytes.to_vec(),
            Ok(None) => {
                self.framer.release();
                return Ok(None);
            }
            Err(e) => {
                self.break_stream(TurnError::Stream(e));
                return Err(TurnError::Stream(e));
            }
        };
        let server = self.config.server;
        Ok(Some(match self.handle_input(now, server, &bytes) {
            Ok(Input::Data { peer, data }) => StreamInput::Data {
                peer,
                data: data.to_vec(),
            },
            Ok(Input::Control) => StreamInput::Control,
            Err(e) => StreamInput::Dropped(e),
        }))
    }

    /// Stream transport: the connection closed (end of stream, reset, a failed connect or
    /// handshake). The allocation is gone with it (RFC 8656: an allocation over TCP lives with
    /// its connection); ending mid-frame is said in the error.
    pub fn handle_stream_closed(&mut self, _now: Instant) {
        if !self.is_stream() {
            return;
        }
        let mid_frame = self.framer.mid_frame();
        self.framer = StreamFramer::new(MAX_STREAM_FRAME);
        self.break_stream(TurnError::ConnectionClosed { mid_frame });
    }

    /// The stream is unusable: whatever was in progress ends with `error`.
    fn break_stream(&mut self, error: TurnError) {
        match self.state {
            AllocationState::Allocating => {
                self.state = AllocationState::Failed;
                self.transactions.clear();
                self.events.push_back(Event::AllocationFailed(error));
            }
            AllocationState::Allocated => self.lose(error),
            // The release is as good as done: the server frees the allocation with the
            // connection.
            AllocationState::Deallocating => self.close(),
            AllocationState::Idle | AllocationState::Closed | AllocationState::Failed => {}
        }
    }

    /// Runs due timers: retransmissions, request timeouts, refreshes, expiry.
    pub fn handle_timeout(&mut self, now: Instant) {
        // Retransmissions and timeouts.
        let stream = self.is_stream();
        let mut i = 0;
        while i < self.transactions.len() {
            let t = &mut self.transactions[i];
            if t.next_at > now {
                i += 1;
                continue;
            }
            // No retransmissions on a reliable transport (RFC 8489 section 6.2.2).
            if !stream && t.transmissions < self.config.max_transmissions {
                t.transmissions += 1;
                t.rto = t.rto.saturating_mul(2);
                t.next_at = if t.transmissions == self.config.max_transmissions {
                    now + self.config.rto.saturating_mul(LAST_WAIT_FACTOR)
                } else {
                    now + t.rto
                };
                self.transmits.push_back(Transmit {
                    destination: self.config.server,
                    payload: t.bytes.clone(),
                });
                i += 1;
            } else {
                let t = self.transactions.swap_remove(i);
                let err = TurnError::Timeout {
                    method: t.kind.method().name(),
                    transmissions: t.transmissions,
                };
                self.fail(now, t.kind, err);
            }
        }
        if !matches!(self.state, AllocationState::Allocated) {
            return;
        }
        if self.expires_at.is_some_and(|e| e <= now) {
            self.lose(TurnError::Expired);
            return;
        }
        if !self.refresh_in_flight && self.refresh_at.is_some_and(|r| r <= now) {
            self.refresh_in_flight = true;
            let lifetime = secs_u32(self.config.lifetime);
            self.start_or_lose(now, RequestKind::Refresh { lifetime });
        }
        let due: Vec<IpAddr> = self
            .permissions
            .iter_mut()
            .filter(|(_, p)| !p.in_flight && p.refresh_at.is_some_and(|r| r <= now))
            .map(|(ip, p)| {
                p.in_flight = true;
                *ip
            })
            .collect();
        if !due.is_empty() {
            self.start_or_lose(now, RequestKind::CreatePermission { peers: due });
        }
        let due: Vec<(SocketAddr, u16)> = self
            .channels
            .iter_mut()
            .filter(|(_, c)| !c.in_flight && c.refresh_at.is_some_and(|r| r <= now))
            .map(|(peer, c)| {
                c.in_flight = true;
                (*peer, c.number)
            })
            .collect();
        for (peer, channel) in due {
            self.start_or_lose(now, RequestKind::ChannelBind { channel, peer });
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) should run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut next = self.transactions.iter().map(|t| t.next_at).min();
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        if self.state == AllocationState::Allocated {
            consider(self.expires_at);
            if !self.refresh_in_flight {
                consider(self.refresh_at);
            }
            for p in self.permissions.values().filter(|p| !p.in_flight) {
                consider(p.refresh_at);
            }
            for c in self.channels.values().filter(|c| !c.in_flight) {
                consider(c.refresh_at);
            }
        }
        next
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    fn require_allocated(&self) -> Result<(), TurnError> {
        if self.state == AllocationState::Allocated {
            Ok(())
        } else {
            Err(TurnError::NotAllocated(self.state))
        }
    }

    /// Starts a request (first transmission now).
    fn start(&mut self, now: Instant, kind: RequestKind) -> Result<(), TurnError> {
        self.start_with(now, kind, 0)
    }

    /// Starts a periodic request; if it cannot even be encoded the allocation is lost.
    fn start_or_lose(&mut self, now: Instant, kind: RequestKind) {
        if let Err(e) = self.start(now, kind) {
            self.lose(e);
        }
    }

    fn start_with(
        &mut self,
        now: Instant,
        kind: RequestKind,
        stale_retries: u8,
    ) -> Result<(), TurnError> {
        let tid = TransactionId::random(&mut self.rng);
        let bytes = self.encode_request(tid, &kind)?;
        self.transmits.push_back(Transmit {
            destination: self.config.server,
            payload: bytes.clone(),
        });
        let rto = self.config.rto;
        let next_at = if self.is_stream() {
            now + self.config.stream_timeout
        } else if self.config.max_transmissions <= 1 {
            now + rto.saturating_mul(LAST_WAIT_FACTOR)
        } else {
            now + rto
        };
        self.transactions.push(Transaction {
            tid,
            kind,
            bytes,
            transmissions: 1,
            next_at,
            rto,
            stale_retries,
            authenticated: self.auth.is_some(),
        });
        Ok(())
    }

    fn encode_request(&self, tid: TransactionId, kind: &RequestKind) -> Result<Vec<u8>, TurnError> {
        let mut buf = vec![0u8; REQUEST_BUF];
        let typ = MessageType::new(Class::Request, kind.method());
        let mut b = MessageBuilder::new(&mut buf, typ, tid)?;
        match kind {
            RequestKind::Allocate => {
                b.add(&RequestedTransport::UDP)?;
                if let Some(f) = self.config.requested_family {
                    b.add(&RequestedAddressFamily(f))?;
                }
                b.add(&Lifetime(secs_u32(self.config.lifetime)))?;
            }
            RequestKind::Refresh { lifetime } => b.add(&Lifetime(*lifetime))?,
            RequestKind::CreatePermission { peers } => {
                for ip in peers {
                    b.add(&XorPeerAddress(SocketAddr::new(*ip, 0)))?;
                }
            }
            RequestKind::ChannelBind { channel, peer } => {
                b.add(&ChannelNumber(*channel))?;
                b.add(&XorPeerAddress(*peer))?;
            }
        }
        if let Some(sw) = &self.config.software {
            b.add(&Software(sw))?;
        }
        if let Some(a) = &self.auth {
            b.add(&Username(&self.config.username))?;
            b.add(&Realm(&a.realm))?;
            b.add(&Nonce(&a.nonce))?;
            b.add_integrity(&a.key)?;
        }
        if self.config.fingerprint {
            b.add_fingerprint()?;
        }
        let n = b.finish();
        buf.truncate(n);
        Ok(buf)
    }

    fn handle_response(&mut self, now: Instant, msg: &Message<'_>) -> Result<(), InputError> {
        let tid = msg.transaction_id();
        let idx = self
            .transactions
            .iter()
            .position(|t| t.tid == tid && t.kind.method() == msg.method())
            .ok_or(InputError::UnknownTransaction)?;
        // A response to an authenticated request that carries integrity must verify with our
        // key; one that does not is dropped as if never received (RFC 8489 section 9.2.5).
        if self.transactions[idx].authenticated && msg.has_integrity() {
            let key = self.auth.as_ref().map(|a| a.key).unwrap_or_default();
            msg.verify_integrity(&key)
                .map_err(|_| InputError::IntegrityMismatch)?;
        }
        let t = self.transactions.swap_remove(idx);
        let method = t.kind.method().name();
        if msg.class() == Class::Error {
            let (code, reason) = match msg.get::<ErrorCode>() {
                Some(Ok(e)) => (e.code, e.reason.to_owned()),
                Some(Err(e)) => {
                    self.fail(now, t.kind, TurnError::Attr(e));
                    return Ok(());
                }
                None => {
                    self.fail(
                        now,
                        t.kind,
                        TurnError::MissingAttribute {
                            method,
                            attr: "ERROR-CODE",
                        },
                    );
                    return Ok(());
                }
            };
            self.handle_error(now, t, code, reason, msg);
            return Ok(());
        }
        if let Some(a) = &mut self.auth {
            a.resumed = false;
        }
        match self.handle_success(now, &t.kind, msg) {
            Ok(()) => {}
            Err(e) => self.fail(now, t.kind, e),
        }
        Ok(())
    }

    fn handle_error(
        &mut self,
        now: Instant,
        t: Transaction,
        code: u16,
        reason: String,
        msg: &Message<'_>,
    ) {
        let method = t.kind.method().name();
        let nonce = match msg.get::<Nonce>() {
            Some(Ok(n)) => Some(n.0.to_owned()),
            _ => None,
        };
        let realm = match msg.get::<Realm>() {
            Some(Ok(r)) => Some(r.0.to_owned()),
            _ => None,
        };
        let redirect = match t.kind {
            RequestKind::Allocate if code == 300 => self.usable_alternate(msg, t.authenticated),
            _ => None,
        };
        if let Some(alternate) = redirect {
            let from = self.config.server;
            self.redirected_from.push(from);
            self.config.server = alternate;
            // The alternate issues its own nonce (and maybe realm): start unauthenticated.
            self.auth = None;
            // Over a stream the alternate is a new connection: nothing of the old one carries.
            self.framer = StreamFramer::new(MAX_STREAM_FRAME);
            self.events.push_back(Event::Redirected {
                from,
                to: alternate,
            });
            self.retry(now, t.kind, 0);
            return;
        }
        // Any answer from this server settles whether a resumed nonce works.
        let resumed = self.auth.as_ref().is_some_and(|a| a.resumed);
        if let Some(a) = &mut self.auth {
            a.resumed = false;
        }
        match code {
            401 if !t.authenticated || resumed => {
                let (Some(realm), Some(nonce)) = (realm, nonce) else {
                    self.fail(now, t.kind, TurnError::MissingChallenge { method });
                    return;
                };
                let key = auth::long_term_key(&self.config.username, &realm, &self.config.password);
                self.auth = Some(AuthState {
                    realm,
                    nonce,
                    key,
                    resumed: false,
                });
                self.retry(now, t.kind, t.stale_retries);
            }
            401 => self.fail(now, t.kind, TurnError::Unauthorized { method }),
            438 => {
                let Some(nonce) = nonce else {
                    self.fail(
                        now,
                        t.kind,
                        TurnError::MissingAttribute {
                            method,
                            attr: "NONCE",
                        },
                    );
                    return;
                };
                if t.stale_retries >= MAX_STALE_NONCE_RETRIES {
                    self.fail(
                        now,
                        t.kind,
                        TurnError::StaleNonceLoop {
                            method,
                            retries: t.stale_retries,
                        },
                    );
                    return;
                }
                match (&mut self.auth, realm) {
                    (Some(a), realm) => {
                        if let Some(r) = realm.filter(|r| *r != a.realm) {
                            a.key = auth::long_term_key(
                                &self.config.username,
                                &r,
                                &self.config.password,
                            );
                            a.realm = r;
                        }
                        a.nonce = nonce;
                    }
                    (None, Some(realm)) => {
                        let key = auth::long_term_key(
                            &self.config.username,
                            &realm,
                            &self.config.password,
                        );
                        self.auth = Some(AuthState {
                            realm,
                            nonce,
                            key,
                            resumed: false,
                        });
                    }
                    (None, None) => {
                        self.fail(
                            now,
                            t.kind,
                            TurnError::MissingAttribute {
                                method,
                                attr: "REALM",
                            },
                        );
                        return;
                    }
                }
                self.retry(now, t.kind, t.stale_retries + 1);
            }
            _ => self.fail(
                now,
                t.kind,
                TurnError::Rejected {
                    method,
                    code,
                    reason,
                },
            ),
        }
    }

    /// The ALTERNATE-SERVER of a 300 answer, if the client may follow it: signed when the
    /// request was (integrity was checked against our key on arrival, so nobody off the path
    /// can steer the allocation), not back to a server that redirected, at most
    /// [`MAX_REDIRECTS`] times.
    fn usable_alternate(&self, msg: &Message<'_>, authenticated: bool) -> Option<SocketAddr> {
        let alternate = msg.get::<AlternateServer>()?.ok()?.0;
        let trusted = !authenticated || msg.has_integrity();
        let looped = alternate == self.config.server
            || self.redirected_from.contains(&alternate)
            || self.redirected_from.len() >= MAX_REDIRECTS;
        (trusted && !looped).then_some(alternate)
    }

    fn retry(&mut self, now: Instant, kind: RequestKind, stale_retries: u8) {
        if let Err(e) = self.start_with(now, kind.clone(), stale_retries) {
            self.fail(now, kind, e);
        }
    }

    fn handle_success(
        &mut self,
        now: Instant,
        kind: &RequestKind,
        msg: &Message<'_>,
    ) -> Result<(), TurnError> {
        let method = kind.method().name();
        match kind {
            RequestKind::Allocate => {
                let relayed = match msg.get::<XorRelayedAddress>() {
                    Some(r) => r?.0,
                    None => {
                        return Err(TurnError::MissingAttribute {
                            method,
                            attr: "XOR-RELAYED-ADDRESS",
                        });
                    }
                };
                let mapped = msg
                    .get::<XorMappedAddress>()
                    .and_then(Result::ok)
                    .map(|a| a.0);
                let lifetime = match msg.get::<Lifetime>() {
                    Some(l) => Duration::from_secs(u64::from(l?.0)),
                    None => self.config.lifetime,
                };
                self.relayed = Some(relayed);
                self.mapped = mapped;
                self.state = AllocationState::Allocated;
                self.set_lifetime(now, lifetime);
                self.events.push_back(Event::Allocated {
                    relayed,
                    mapped,
                    lifetime,
                });
            }
            RequestKind::Refresh { lifetime: 0 } => {
                self.close();
            }
            RequestKind::Refresh { .. } => {
                self.refresh_in_flight = false;
                let lifetime = match msg.get::<Lifetime>() {
                    Some(l) => Duration::from_secs(u64::from(l?.0)),
                    None => self.config.lifetime,
                };
                if self.state == AllocationState::Allocated {
                    self.set_lifetime(now, lifetime);
                    self.events.push_back(Event::Refreshed { lifetime });
                }
            }
            RequestKind::CreatePermission { peers } => {
                for ip in peers {
                    if let Some(p) = self.permissions.get_mut(ip) {
                        p.state = Binding::Active;
                        p.in_flight = false;
                        p.refresh_at = Some(now + PERMISSION_REFRESH);
                    }
                    self.events
                        .push_back(Event::PermissionCreated { peer: *ip });
                }
            }
            RequestKind::ChannelBind { peer, channel } => {
                if let Some(c) = self.channels.get_mut(peer) {
                    c.state = Binding::Active;
                    c.in_flight = false;
                    c.refresh_at = Some(now + CHANNEL_REFRESH);
                }
                // A channel binding installs or refreshes the permission for the peer's IP.
                let p = self.permissions.entry(peer.ip()).or_insert(Permission {
                    state: Binding::Active,
                    in_flight: false,
                    refresh_at: None,
                });
                p.state = Binding::Active;
                if !p.in_flight {
                    p.refresh_at = Some(now + PERMISSION_REFRESH);
                }
                self.events.push_back(Event::ChannelBound {
                    peer: *peer,
                    channel: *channel,
                });
            }
        }
        Ok(())
    }

    fn set_lifetime(&mut self, now: Instant, lifetime: Duration) {
        self.expires_at = Some(now + lifetime);
        // Refresh a minute early (half-way for short lifetimes).
        let early = if lifetime > Duration::from_secs(120) {
            lifetime - Duration::from_secs(60)
        } else {
            lifetime / 2
        };
        self.refresh_at = Some(now + early);
    }

    /// A request failed for good.
    fn fail(&mut self, _now: Instant, kind: RequestKind, error: TurnError) {
        match kind {
            RequestKind::Allocate => {
                self.state = AllocationState::Failed;
                self.events.push_back(Event::AllocationFailed(error));
            }
            RequestKind::Refresh { lifetime: 0 } => {
                // Given up on: the server will expire it anyway.
                self.close();
            }
            RequestKind::Refresh { .. } => {
                self.refresh_in_flight = false;
                if self.state == AllocationState::Allocated {
                    self.lose(error);
                }
            }
            RequestKind::CreatePermission { peers } => {
                for ip in &peers {
                    if let Some(p) = self.permissions.get_mut(ip) {
                        p.in_flight = false;
                        if p.state == Binding::Pending {
                            self.permissions.remove(ip);
                        } else {
                            // Keep trying at the next refresh; the old one may still hold.
                            p.refresh_at = None;
                        }
                    }
                }
                self.events
                    .push_back(Event::PermissionFailed { peers, error });
            }
            RequestKind::ChannelBind { peer, channel } => {
                self.channels.remove(&peer);
                self.channel_peers.remove(&channel);
                self.events
                    .push_back(Event::ChannelBindFailed { peer, error });
            }
        }
    }

    fn lose(&mut self, error: TurnError) {
        self.state = AllocationState::Failed;
        self.transactions.clear();
        self.refresh_at = None;
        self.events.push_back(Event::AllocationLost(error));
    }

    fn close(&mut self) {
        self.state = AllocationState::Closed;
        self.transactions.clear();
        self.refresh_at = None;
        self.expires_at = None;
        self.events.push_back(Event::Deallocated);
    }
}

fn secs_u32(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests;
