//! The sans-IO TURN core of peerlink-relay (RFC 8656 with UDP, TCP and TLS clients, STUN per
//! RFC 8489).
//!
//! What it is: all protocol state of one worker — allocations, long-term authentication,
//! permissions, channels, quotas, peer policy — driven by an I/O backend that hands in
//! datagrams and the monotonic `now`, and acts on the returned [`Output`]. What it is not: no
//! sockets, threads, clock reads or unseeded randomness; relayed sockets belong to io and are
//! opened/closed through [`RelaySockets`].
//!
//! ## Clients and links
//!
//! A client is a [`Client`]: its address and its [`Link`] (the UDP listener, or one TCP/TLS
//! connection named by the backend). Allocations are keyed by it, so a stream client and the
//! UDP client at the same address are two 5-tuples. A stream frame (one STUN message or one
//! ChannelData without its padding) comes in through [`Core::handle_client`] exactly like a
//! datagram; every output towards a client comes back as a [`Routed`] naming that client's
//! link, and the backend writes stream-bound ones into the connection.
//! [`Core::close_stream`] frees the allocation of a connection that closed.
//!
//! ## Flow
//!
//! Every datagram sits at `buf[HEADROOM..HEADROOM + len]`, with [`HEADROOM`] spare bytes before
//! it so a ChannelData header can be written in place.
//!
//! * **Listener, first bits `00` (STUN)** — parsed by `peerlink_proto::Message`.
//!   Binding is answered at once (XOR-MAPPED-ADDRESS). Allocate / Refresh / CreatePermission /
//!   ChannelBind go: retransmission cache (same transaction id on this 5-tuple's allocation ->
//!   the same bytes) -> long-term authentication -> 420 for unknown comprehension-required
//!   attributes -> the method. Authentication is stateless until it succeeds: no
//!   MESSAGE-INTEGRITY -> 401 with REALM and a nonce that MACs (timestamp, client IP)
//!   ([`auth::Nonces`]); forged / expired / other-IP nonce -> 438 with a fresh one; then
//!   static users, else TURN REST (`<expiry>:<user>`, every configured secret tried). Every
//!   answer to an unauthenticated request (401/438/400) passes a fixed-size per-source-IP token
//!   bucket table ([`auth::RateLimiter`], `--unauth-rate`/`--unauth-burst`); over the limit it
//!   is dropped and counted. Such answers carry nothing beyond ERROR-CODE, REALM and NONCE (and
//!   FINGERPRINT when the request had one). Answers to
//!   authenticated requests, errors included, carry MESSAGE-INTEGRITY; FINGERPRINT when the
//!   request had one. Send indications are checked against the peer policy on every packet and
//!   forwarded zero-copy (the DATA value of the receive buffer).
//! * **Listener, first bits `01` (ChannelData)** — 5-tuple -> allocation -> channel -> peer
//!   (permission checked, optional bandwidth cap), then `Forward` of the payload from the
//!   allocation's relayed socket.
//! * **Relayed socket** ([`Core::handle_relayed`]) — permission by peer IP; a bound channel ->
//!   4-byte header written into the headroom and the same buffer forwarded to the client;
//!   otherwise a Data indication is built in the scratch buffer.
//! * **Short-circuit** — when the peer is the relayed address of another allocation of this
//!   worker, the packet never leaves the process: the target's permission and bandwidth are
//!   checked as if it had arrived on its socket, then the 4 bytes before the payload are
//!   rewritten into the target's ChannelData header (`Forward` from the listener, zero copy) or,
//!   with no channel, a Data indication goes out via scratch. Across workers it takes the
//!   kernel like any peer traffic.
//! * **Timers** — one min-heap entry per allocation at its next deadline (allocation expiry,
//!   a permission or channel end); [`Core::poll_timeout`] / [`Core::handle_timeout`] free
//!   expired allocations (closing their socket via [`RelaySockets::close`]) and sweep
//!   permissions (300 s, never refreshed by data) and channels (600 s + 5 min cool-down).
//!
//! ## Decisions
//!
//! * EVEN-PORT asks io for an even port; with R=1 io also holds the next port for
//!   [`RESERVATION_LIFETIME`] and the answer carries the RESERVATION-TOKEN naming it. An
//!   Allocate with that token gets the held port (once); an unknown, used or expired token is
//!   508, and a token together with EVEN-PORT or an address family is 400 (RFC 8656 7.2). The
//!   holds are io's (shared by every worker, bounded in number), not the core's.
//! * ADDITIONAL-ADDRESS-FAMILY (dual allocation) is not offered: the IPv4 allocation proceeds
//!   and the answer carries ADDRESS-ERROR-CODE 440 for IPv6.
//! * Draining ([`Shared::set_draining`]): new Allocate -> 508 (Insufficient Capacity: "try
//!   another server"), everything on existing allocations keeps working.
//! * Try Alternate: when io has named other relays ([`Shared::set_alternates`], learned from
//!   the directory), an authenticated Allocate this relay cannot take — draining, the total
//!   quota, no port, no id — gets 300 with ALTERNATE-SERVER (the best alternate serving the
//!   client's transport and address family) instead of 508; without one it stays 508. A
//!   RESERVATION-TOKEN names a port of this relay, so its failures stay 508.
//! * Quotas: per user over all workers -> 486; total over all workers, out of ports, or this
//!   worker's id space full -> 508. They live in [`Shared`], touched only on allocate/free.
//! * Channel numbers: 0x4000-0x4FFF (RFC 8656); `legacy_channel_range` opts into RFC 5766's
//!   0x4000-0x7FFF for old clients (coturn's `turnutils_uclient`).
//! * Peer policy ([`policy`]): built-in deny list incl. every IPv4-in-IPv6 spelling, the relay's
//!   own listener and service ports; `allow_peers` overrides ranges (not service ports); this
//!   relay's relayed addresses (`relay_addrs` x `port_range`) are always legitimate peers.
//!
//! ## Hot path
//!
//! ChannelData and peer datagrams do no heap allocation (a test proves it with a counting
//! allocator), take no lock and touch no shared atomic: a slab of allocations, SipHash maps
//! (keyed from the seed) for attacker-chosen keys (client 5-tuple, peer addresses), a fast
//! hasher for relay-chosen ones (relayed addresses, channel numbers), plain `u64` counters.
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::{Range, RangeInclusive};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub mod auth;
mod data;
pub mod hash;
pub mod policy;
mod request;
pub mod table;
#[cfg(test)]
mod tests;

/// Bytes backends reserve BEFORE each received datagram (room for a ChannelData header).
pub const HEADROOM: usize = 4;
/// Size of the scratch buffer backends pass for replies (largest UDP payload + STUN overhead).
pub const SCRATCH_LEN: usize = 65_536 + 64;

/// Handle of one allocation inside one worker's core: slab slot plus generation bits.
/// Opaque to io; unique per worker among live allocations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AllocationId(pub u32);

/// Which socket a datagram is sent from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketRef {
    /// The worker's TURN listener socket (towards clients).
    Listener,
    /// The relayed socket of an allocation (towards peers).
    Relayed(AllocationId),
}

/// The transport a client reaches the relay over (the protocol of its 5-tuple). Relayed
/// traffic towards peers is UDP whatever the client's transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    /// UDP datagrams on the listener.
    Udp = 0,
    /// A TCP connection.
    Tcp = 1,
    /// A TLS connection over TCP.
    Tls = 2,
}

impl Transport {
    /// Every transport, in index order.
    pub const ALL: [Transport; 3] = [Transport::Udp, Transport::Tcp, Transport::Tls];

    /// Metric label: `udp`, `tcp`, `tls`.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
        }
    }

    /// Index into per-transport counter arrays.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// One TCP or TLS connection of a worker, named by its backend (opaque to the core, unique
/// among the worker's live connections).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StreamId(pub u64);

/// How the relay reaches a client: the worker's UDP listener, or one TCP/TLS connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Link {
    /// Datagrams on the listener.
    Udp,
    /// A TCP connection.
    Tcp(StreamId),
    /// A TLS connection.
    Tls(StreamId),
}

impl Link {
    /// The connection, for a stream link.
    pub fn stream(self) -> Option<StreamId> {
        match self {
            Link::Udp => None,
            Link::Tcp(s) | Link::Tls(s) => Some(s),
        }
    }

    /// The transport of this link.
    pub fn transport(self) -> Transport {
        match self {
            Link::Udp => Transport::Udp,
            Link::Tcp(_) => Transport::Tcp,
            Link::Tls(_) => Transport::Tls,
        }
    }
}

/// A client as the core keys its allocation: transport address and link. A TCP client at
/// 1.2.3.4:5000 is not the UDP client at 1.2.3.4:5000, and two connections are two clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Client {
    /// The client's address as the relay sees it (source of its datagrams or connection).
    pub addr: SocketAddr,
    /// How it is reached.
    pub link: Link,
}

impl Client {
    /// A UDP client at `addr`.
    pub fn udp(addr: SocketAddr) -> Self {
        Client {
            addr,
            link: Link::Udp,
        }
    }
}

/// An [`Output`] and, when it goes to a client (`from` is [`SocketRef::Listener`]), the link
/// that reaches that client: a stream link means "write it to that connection" (framed; a
/// ChannelData padded to 4), not "send it from the listener".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Routed {
    /// What to do.
    pub out: Output,
    /// The client's link for outputs towards a client; [`Link::Udp`] otherwise.
    pub link: Link,
}

/// Address family of a relayed address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AddrFamily {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

/// What the backend must do with the datagram it just handed in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Send `buf[range]` — the RECEIVE buffer itself (core may have written a 4-byte ChannelData
    /// header into the headroom or rewritten one in place) — from `from` to `to`. Zero copy.
    Forward {
        /// Socket to send from.
        from: SocketRef,
        /// Destination.
        to: SocketAddr,
        /// Bytes of the receive buffer to send.
        range: Range<usize>,
    },
    /// Send `scratch[..len]` (a STUN response / Data indication the core wrote) from `from` to `to`.
    Reply {
        /// Socket to send from.
        from: SocketRef,
        /// Destination.
        to: SocketAddr,
        /// Bytes of the scratch buffer to send.
        len: usize,
        /// True for a Data indication: relayed data (counted as forwarded, not as a reply).
        data: bool,
    },
    /// Nothing to send; `reason` says why (io counts it; `None` = consumed normally).
    Drop(Option<DropReason>),
}

macro_rules! drop_reasons {
    ($($(#[$doc:meta])* $name:ident => $label:literal,)*) => {
        /// Why a datagram was dropped without a reply (metric label via [`DropReason::as_str`]).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum DropReason { $($(#[$doc])* $name,)* }
        impl DropReason {
            /// Every reason, in index order (for metric registration).
            pub const ALL: &'static [DropReason] = &[$(DropReason::$name,)*];
            /// Number of reasons.
            pub const COUNT: usize = Self::ALL.len();
            /// Stable snake_case label for metrics.
            pub fn as_str(self) -> &'static str {
                match self { $(DropReason::$name => $label,)* }
            }
            /// Dense index into [`DropReason::ALL`].
            pub fn index(self) -> usize { self as usize }
        }
    };
}

drop_reasons! {
    /// STUN-looking datagram that does not parse (bad length, attribute past the end, ...).
    Malformed => "malformed",
    /// Neither STUN nor ChannelData (or shorter than any of them).
    NotStun => "not_stun",
    /// Datagram truncated by the kernel (MSG_TRUNC); io reports it, the core never sees it.
    Truncated => "truncated",
    /// No allocation for this 5-tuple / allocation id (or it expired).
    NoAllocation => "no_allocation",
    /// Peer has no (unexpired) permission.
    NoPermission => "no_permission",
    /// ChannelData on a channel number not bound on this allocation.
    UnboundChannel => "unbound_channel",
    /// ChannelData with a channel number outside 0x4000-0x4FFF.
    BadChannel => "bad_channel",
    /// ChannelData whose length field does not match the datagram.
    BadLength => "bad_length",
    /// Send indication towards a peer the policy denies.
    PeerDenied => "peer_denied",
    /// Error reply suppressed by the per-source rate limit for unauthenticated requests.
    RateLimited => "rate_limited",
    /// Per-allocation bandwidth cap exceeded.
    Bandwidth => "bandwidth",
    /// Valid STUN that the relay does not act on (responses, unknown indications, bad Send).
    Unexpected => "unexpected",
    /// Request whose FINGERPRINT is present but wrong.
    BadFingerprint => "bad_fingerprint",
    /// Peer datagram too large to fit a Data indication (and no channel to carry it).
    TooLarge => "too_large",
    /// A reply could not be encoded (never expected; counted rather than panicking).
    Internal => "internal",
}

/// Why a relayed socket could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Every port of the range is in use (-> 508).
    #[error("no free relay port")]
    NoPorts,
    /// The relay has no address of the requested family (-> 440).
    #[error("no relay address of the requested family")]
    FamilyNotSupported,
    /// A RESERVATION-TOKEN names no live reservation: unknown, taken or expired (-> 508).
    #[error("no port reserved under this token")]
    NoReservation,
    /// Any other socket error (-> 508).
    #[error("relay socket: {0}")]
    Io(#[from] std::io::Error),
}

/// How the relayed port of a new allocation is chosen (EVEN-PORT, RESERVATION-TOKEN).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortRequest {
    /// Any port of the range.
    Any,
    /// An even port (EVEN-PORT with R = 0).
    Even,
    /// An even port `P`, with `P + 1` held for a later allocation (EVEN-PORT with R = 1);
    /// the answer names the hold by its token.
    EvenReserveNext,
    /// The port held under this RESERVATION-TOKEN (taken, so a token serves once).
    Reserved([u8; 8]),
}

/// A relayed socket opened for an allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Opened {
    /// Its bound address (the XOR-RELAYED-ADDRESS).
    pub addr: SocketAddr,
    /// With [`PortRequest::EvenReserveNext`]: the RESERVATION-TOKEN of the port held.
    pub token: Option<[u8; 8]>,
}

/// How long a port reserved by EVEN-PORT (R = 1) is held for its RESERVATION-TOKEN
/// (RFC 8656 7.2: about 30 seconds).
pub const RESERVATION_LIFETIME: Duration = Duration::from_secs(30);

/// Implemented by each backend (a fake in core's unit tests). Relayed sockets live in io.
pub trait RelaySockets {
    /// Bind a UDP socket for allocation `id` on the relay address of `family`, its port chosen
    /// as `port` asks (for [`PortRequest::Reserved`] the held socket is taken and `family` is
    /// not looked at); return the bound address. `now` drives the expiry of reservations.
    fn open(
        &mut self,
        id: AllocationId,
        family: AddrFamily,
        port: PortRequest,
        now: Instant,
    ) -> Result<Opened, OpenError>;
    /// Close the relayed socket of `id` (allocation freed or expired).
    fn close(&mut self, id: AllocationId);
}

/// Static configuration of the core, built by io from CLI/TOML (plain struct, no serde).
#[derive(Clone, Debug)]
pub struct CoreConfig {
    /// REALM sent to clients and used in long-term keys.
    pub realm: String,
    /// SOFTWARE attribute on responses (None = omitted).
    pub software: Option<String>,
    /// Static users: name -> long-term key MD5(name:realm:password).
    pub users: HashMap<String, [u8; 16]>,
    /// TURN REST shared secrets (coturn `use-auth-secret`); all are accepted (rotation), at most
    /// `peerlink_proto::auth::rest::MAX_SECRETS` (4) — further ones are ignored.
    pub auth_secrets: Vec<Vec<u8>>,
    /// REST usernames whose expiry lies further than this in the future are refused.
    pub rest_max_ttl: Duration,
    /// Key of the stateless nonce MAC.
    pub nonce_key: [u8; 32],
    /// How long a nonce stays valid (then 438).
    pub nonce_lifetime: Duration,
    /// Public addresses relayed sockets bind on (at most one per family is used).
    pub relay_addrs: Vec<IpAddr>,
    /// The TURN listener address (denied as a peer).
    pub listener_addr: SocketAddr,
    /// Port range of relayed sockets (relayed addresses of this relay are legitimate peers).
    pub port_range: RangeInclusive<u16>,
    /// Other service sockets of this host (metrics, admin): denied as peers.
    pub service_ports: Vec<SocketAddr>,
    /// Peer ranges allowed even when the built-in policy denies them (labs, tests).
    pub allow_peers: Vec<ipnet::IpNet>,
    /// Extra peer ranges denied on top of the built-in policy.
    pub deny_peers: Vec<ipnet::IpNet>,
    /// Allocation lifetime when the client asks for none (600 s).
    pub default_lifetime: Duration,
    /// Allocation lifetime ceiling (3600 s).
    pub max_lifetime: Duration,
    /// Permission lifetime (300 s).
    pub permission_lifetime: Duration,
    /// Channel binding lifetime (600 s).
    pub channel_lifetime: Duration,
    /// Allocation cap over all workers (-> 508).
    pub max_allocations: usize,
    /// Allocation cap per username over all workers (-> 486).
    pub max_allocations_per_user: usize,
    /// Permissions per allocation cap (-> 508).
    pub max_permissions: usize,
    /// Channels per allocation cap (-> 508).
    pub max_channels: usize,
    /// Accept channel numbers 0x4000-0x7FFF (RFC 5766, what coturn and its `turnutils_uclient`
    /// use) instead of RFC 8656's 0x4000-0x4FFF. Off by default; for interop with old clients.
    pub legacy_channel_range: bool,
    /// Optional per-allocation bandwidth cap in bytes/s, each direction (excess dropped).
    pub bandwidth_limit_bps: Option<u64>,
    /// Unauthenticated error replies (401/438/400) allowed per source IP per second, per
    /// worker (default [`DEFAULT_UNAUTH_RATE`]).
    pub unauth_rate_per_sec: u32,
    /// Burst of unauthenticated error replies per source IP, per worker (default
    /// [`DEFAULT_UNAUTH_BURST`]).
    pub unauth_burst: u32,
    /// Entries of the per-source rate-limit table (fixed memory).
    pub rate_table_size: usize,
}

impl CoreConfig {
    /// A configuration with the RFC defaults; fill in users/secrets as needed.
    pub fn new(
        realm: impl Into<String>,
        listener_addr: SocketAddr,
        relay_addrs: Vec<IpAddr>,
        nonce_key: [u8; 32],
    ) -> Self {
        CoreConfig {
            realm: realm.into(),
            software: None,
            users: HashMap::new(),
            auth_secrets: Vec::new(),
            rest_max_ttl: Duration::from_secs(24 * 3600),
            nonce_key,
            nonce_lifetime: Duration::from_secs(600),
            relay_addrs,
            listener_addr,
            port_range: 49152..=65535,
            service_ports: Vec::new(),
            allow_peers: Vec::new(),
            deny_peers: Vec::new(),
            default_lifetime: Duration::from_secs(600),
            max_lifetime: Duration::from_secs(3600),
            permission_lifetime: Duration::from_secs(300),
            channel_lifetime: Duration::from_secs(600),
            max_allocations: 100_000,
            max_allocations_per_user: 100,
            max_permissions: 256,
            max_channels: 256,
            legacy_channel_range: false,
            bandwidth_limit_bps: None,
            unauth_rate_per_sec: DEFAULT_UNAUTH_RATE,
            unauth_burst: DEFAULT_UNAUTH_BURST,
            rate_table_size: 8192,
        }
    }
}

/// Default rate of unauthenticated error replies per source IP and second (per worker).
///
/// Thousands of clients behind one carrier-grade NAT or office address each need one 401 before
/// they can authenticate (fewer when they reuse a nonce, which is bound to the IP alone). A
/// reflected flood aimed at one victim gets at most this many replies per second per worker,
/// each no larger than TURN requires (about 90 bytes with an 8-byte realm): some 1.4 Mbit/s per
/// worker at most, where an unlimited server reflects whatever it is sent.
pub const DEFAULT_UNAUTH_RATE: u32 = 2000;
/// Default burst of unauthenticated error replies per source IP (per worker): 2,000 clients
/// behind one address that start at once are all challenged at once.
pub const DEFAULT_UNAUTH_BURST: u32 = 2000;

/// State shared by all workers' cores. Touched only on allocate/free, never per packet.
#[derive(Debug)]
pub struct Shared {
    /// Draining: new Allocate requests are refused (508), existing allocations are served.
    pub draining: AtomicBool,
    /// Monotonic origin of nonce timestamps (common to all workers).
    pub epoch: Instant,
    /// Unix time (seconds) at `epoch`; REST expiry = this + (now - epoch), so wall-clock steps
    /// after start change nothing.
    pub unix_at_epoch: u64,
    total: AtomicUsize,
    per_user: Mutex<HashMap<String, usize>>,
    alternates: Mutex<Vec<Alternate>>,
}

/// Another relay of the fleet that takes new allocations, learned from the directory: where a
/// client of each transport reaches it. A draining or full relay names one in ALTERNATE-SERVER.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Alternate {
    /// Its UDP TURN address.
    pub udp: SocketAddr,
    /// Its TURN-over-TCP address, if it has one.
    pub tcp: Option<SocketAddr>,
    /// Its TURN-over-TLS address, if it has one.
    pub tls: Option<SocketAddr>,
}

impl Alternate {
    /// Where a client on `transport` reaches it, if it serves that transport.
    pub fn addr_for(&self, transport: Transport) -> Option<SocketAddr> {
        match transport {
            Transport::Udp => Some(self.udp),
            Transport::Tcp => self.tcp,
            Transport::Tls => self.tls,
        }
    }
}

impl Shared {
    /// Shared state anchored at `epoch` (monotonic) which corresponds to `unix_at_epoch` seconds.
    pub fn new(epoch: Instant, unix_at_epoch: u64) -> Self {
        Shared {
            draining: AtomicBool::new(false),
            epoch,
            unix_at_epoch,
            total: AtomicUsize::new(0),
            per_user: Mutex::new(HashMap::new()),
            alternates: Mutex::new(Vec::new()),
        }
    }
    /// Replace the relays to redirect new allocations to when this one is draining or full,
    /// best first.
    pub fn set_alternates(&self, alternates: Vec<Alternate>) {
        *self.alternates.lock().unwrap_or_else(|e| e.into_inner()) = alternates;
    }
    /// The best alternate a client on `transport` at an address of `client`'s family can
    /// reach (ALTERNATE-SERVER must have the family of the request's source, RFC 8489 14.15).
    pub fn alternate_for(&self, transport: Transport, client: SocketAddr) -> Option<SocketAddr> {
        let alternates = self.alternates.lock().unwrap_or_else(|e| e.into_inner());
        alternates
            .iter()
            .filter_map(|a| a.addr_for(transport))
            .find(|a| a.is_ipv4() == client.is_ipv4())
    }
    /// Start (or stop) draining.
    pub fn set_draining(&self, on: bool) {
        self.draining.store(on, Ordering::Relaxed);
    }
    /// Whether the relay is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
    /// Allocations alive over all workers.
    pub fn total_allocations(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }
    /// Distinct usernames holding allocations (bounded by the allocation count).
    pub fn users_with_allocations(&self) -> usize {
        self.per_user.lock().map(|m| m.len()).unwrap_or(0)
    }
}

/// Per-worker counters: plain u64, read by io's metrics flush.
#[derive(Clone, Debug, Default)]
pub struct CoreCounters {
    /// Binding requests.
    pub req_binding: u64,
    /// Allocate requests.
    pub req_allocate: u64,
    /// Refresh requests.
    pub req_refresh: u64,
    /// CreatePermission requests.
    pub req_create_permission: u64,
    /// ChannelBind requests.
    pub req_channel_bind: u64,
    /// Send indications.
    pub ind_send: u64,
    /// Requests of other methods (answered 400).
    pub req_other: u64,
    /// Success responses sent.
    pub resp_success: u64,
    /// Error responses sent, indexed by [`error_index`] (see [`ERROR_CODES`]).
    pub resp_error: [u64; ERROR_CODES.len()],
    /// Allocations created.
    pub allocations_created: u64,
    /// Allocations freed by expiry.
    pub allocations_expired: u64,
    /// Allocations freed by Refresh LIFETIME=0.
    pub allocations_deleted: u64,
    /// Allocations freed because their TCP/TLS connection closed.
    pub allocations_closed: u64,
    /// Allocations created, per client transport ([`Transport::index`]).
    pub allocations_created_by: [u64; 3],
    /// Allocations alive now, per client transport (a gauge kept with the counters).
    pub allocations_active_by: [u64; 3],
    /// Drops, indexed by [`DropReason::index`].
    pub drops: [u64; DropReason::COUNT],
    /// Authentication failures (401 after credentials were presented, 438 not included).
    pub auth_failures: u64,
    /// Stale/forged nonces (438).
    pub stale_nonces: u64,
    /// Packets relayed client -> peer.
    pub packets_client_to_peer: u64,
    /// Payload bytes relayed client -> peer.
    pub bytes_client_to_peer: u64,
    /// Packets relayed peer -> client.
    pub packets_peer_to_client: u64,
    /// Payload bytes relayed peer -> client.
    pub bytes_peer_to_client: u64,
    /// Packets short-circuited between two allocations of this worker.
    pub short_circuited: u64,
    /// Ports held for a RESERVATION-TOKEN (EVEN-PORT with the R bit).
    pub ports_reserved: u64,
    /// Allocations made on a reserved port (RESERVATION-TOKEN).
    pub reservations_claimed: u64,
    /// Allocate requests sent to another relay (300 Try Alternate).
    pub redirected: u64,
}

/// Error codes the core answers with, in the order of [`CoreCounters::resp_error`].
pub const ERROR_CODES: [u16; 15] = [
    300, 400, 401, 403, 420, 437, 438, 440, 441, 442, 443, 486, 500, 508, 0,
];

/// Index of `code` in [`ERROR_CODES`] (the last slot, labelled 0, collects anything else).
pub fn error_index(code: u16) -> usize {
    ERROR_CODES
        .iter()
        .position(|&c| c == code)
        .unwrap_or(ERROR_CODES.len() - 1)
}

impl CoreCounters {
    /// Drops counted for `reason`.
    pub fn drops_for(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()]
    }
    /// Error responses counted for `code`.
    pub fn errors_for(&self, code: u16) -> u64 {
        self.resp_error[error_index(code)]
    }
}

/// Why an allocation could not be counted against the shared quotas.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum QuotaError {
    /// The user holds `max_allocations_per_user` already (486).
    User,
    /// The relay holds `max_allocations` already (508).
    Total,
}

impl Shared {
    fn lock_users(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        // A poisoned lock only means another worker panicked mid-update of plain counters;
        // the process is going down anyway (workers die loudly), keep serving meanwhile.
        self.per_user.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one more allocation for `user` if both quotas allow it.
    pub(crate) fn try_reserve(
        &self,
        user: &str,
        max_total: usize,
        max_user: usize,
    ) -> Result<(), QuotaError> {
        let mut users = self.lock_users();
        if self.total.load(Ordering::Relaxed) >= max_total {
            return Err(QuotaError::Total);
        }
        let n = users.get(user).copied().unwrap_or(0);
        if n >= max_user {
            return Err(QuotaError::User);
        }
        users.insert(user.to_owned(), n + 1);
        self.total.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Gives back one allocation of `user`.
    pub(crate) fn release(&self, user: &str) {
        let mut users = self.lock_users();
        if let Some(n) = users.get_mut(user) {
            *n -= 1;
            if *n == 0 {
                users.remove(user);
            }
            self.total.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// How an allocation ended (for counters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FreeReason {
    Expired,
    Deleted,
    Closed,
    Shutdown,
}

/// One worker's TURN state machine: allocations, auth, permissions, channels, quotas.
/// Shared-nothing except [`Shared`]; time comes in as `now`.
pub struct Core {
    cfg: Arc<CoreConfig>,
    shared: Arc<Shared>,
    policy: policy::PeerPolicy,
    nonces: auth::Nonces,
    limiter: auth::RateLimiter,
    table: table::Table,
    counters: CoreCounters,
    /// Relay address per family (the first configured of each).
    relay_v4: Option<IpAddr>,
    relay_v6: Option<IpAddr>,
    /// splitmix64 state for Data indication transaction ids.
    rng: u64,
    /// Reused buffer for expired ids.
    expired: Vec<AllocationId>,
    /// Link of the client the output being built goes to (see [`Routed`]).
    dest: Link,
}

impl Core {
    /// A core for one worker; `seed` keys its hash tables (DoS resistance) deterministically.
    pub fn new(config: Arc<CoreConfig>, shared: Arc<Shared>, seed: u64) -> Self {
        let mut s = seed;
        let sip = hash::SipState::new(hash::splitmix(&mut s));
        let limiter = auth::RateLimiter::new(
            config.rate_table_size,
            config.unauth_rate_per_sec,
            config.unauth_burst,
            hash::splitmix(&mut s),
            shared.epoch,
        );
        Core {
            policy: policy::PeerPolicy::new(&config),
            nonces: auth::Nonces::new(config.nonce_key, shared.epoch, config.nonce_lifetime),
            limiter,
            table: table::Table::new(sip),
            counters: CoreCounters::default(),
            relay_v4: config.relay_addrs.iter().copied().find(IpAddr::is_ipv4),
            relay_v6: config.relay_addrs.iter().copied().find(IpAddr::is_ipv6),
            rng: hash::splitmix(&mut s),
            expired: Vec::new(),
            dest: Link::Udp,
            cfg: config,
            shared,
        }
    }

    /// A datagram of `len` bytes at `buf[HEADROOM..HEADROOM+len]` arrived on the listener from
    /// `src` (a UDP client). Every client-bound output goes to a UDP client here unless a
    /// short-circuit reached a stream client: backends that serve streams use
    /// [`Core::handle_client`], which says.
    pub fn handle_listener(
        &mut self,
        now: Instant,
        src: SocketAddr,
        buf: &mut [u8],
        len: usize,
        scratch: &mut [u8],
        sockets: &mut dyn RelaySockets,
    ) -> Output {
        self.handle_client(now, Client::udp(src), buf, len, scratch, sockets)
            .out
    }

    /// A message of `len` bytes at `buf[HEADROOM..HEADROOM+len]` from `client`: a datagram on
    /// the listener ([`Link::Udp`]) or one frame of a TCP/TLS connection (a STUN message, or a
    /// ChannelData without its stream padding).
    pub fn handle_client(
        &mut self,
        now: Instant,
        client: Client,
        buf: &mut [u8],
        len: usize,
        scratch: &mut [u8],
        sockets: &mut dyn RelaySockets,
    ) -> Routed {
        self.dest = client.link;
        let out = self.listener(now, client, buf, len, scratch, sockets);
        self.count(&out);
        self.routed(out)
    }

    /// A datagram arrived on the relayed socket of `id` from peer `src` (same buffer layout).
    pub fn handle_relayed(
        &mut self,
        now: Instant,
        id: AllocationId,
        src: SocketAddr,
        buf: &mut [u8],
        len: usize,
        scratch: &mut [u8],
    ) -> Output {
        self.handle_peer(now, id, src, buf, len, scratch).out
    }

    /// [`Core::handle_relayed`] with the link of the client the output goes to.
    pub fn handle_peer(
        &mut self,
        now: Instant,
        id: AllocationId,
        src: SocketAddr,
        buf: &mut [u8],
        len: usize,
        scratch: &mut [u8],
    ) -> Routed {
        self.dest = Link::Udp;
        let out = self.relayed(now, id, src, buf, len, scratch);
        self.count(&out);
        self.routed(out)
    }

    /// The TCP/TLS connection of `client` closed: its allocation, if any, is freed (RFC 8656
    /// section 3.1: an allocation over TCP or TLS lives as long as its connection). Returns
    /// whether there was one.
    pub fn close_stream(&mut self, client: Client, sockets: &mut dyn RelaySockets) -> bool {
        match self.table.by_client(&client) {
            Some(id) => {
                self.free(id, sockets, FreeReason::Closed);
                true
            }
            None => false,
        }
    }

    /// Whether `client` holds a live allocation.
    pub fn has_allocation(&self, client: &Client, now: Instant) -> bool {
        self.live(client, now).is_some()
    }

    /// The client of allocation `id`, if alive.
    pub fn client_of(&self, id: AllocationId) -> Option<Client> {
        self.table.get(id).map(|a| a.client)
    }

    /// Expire allocations/permissions/channels due at `now`; closes sockets of freed allocations.
    pub fn handle_timeout(&mut self, now: Instant, sockets: &mut dyn RelaySockets) {
        let mut expired = std::mem::take(&mut self.expired);
        self.table.expire(now, &mut expired);
        for id in expired.drain(..) {
            self.free(id, sockets, FreeReason::Expired);
        }
        self.expired = expired;
    }

    /// When `handle_timeout` should next be called (None = nothing scheduled).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.table.next_timer()
    }

    /// This worker's counters.
    pub fn counters(&self) -> &CoreCounters {
        &self.counters
    }

    /// The configured allocation cap over all workers (io sizes per-worker tables by it).
    pub fn max_allocations(&self) -> usize {
        self.cfg.max_allocations
    }

    /// Live allocations on this worker.
    pub fn allocations(&self) -> usize {
        self.table.len()
    }

    /// Frees every allocation of this worker (closing their sockets), e.g. at the end of a drain.
    pub fn shutdown(&mut self, sockets: &mut dyn RelaySockets) {
        for id in self.table.ids() {
            self.free(id, sockets, FreeReason::Shutdown);
        }
    }

    /// Relayed address of allocation `id`, if alive.
    pub fn relayed_addr(&self, id: AllocationId) -> Option<SocketAddr> {
        self.table.get(id).map(|a| a.relayed)
    }

    /// Whether `ch` is a channel number this core binds (0x4000-0x4FFF, or up to 0x7FFF with
    /// `legacy_channel_range`).
    pub(crate) fn channel_ok(&self, ch: u16) -> bool {
        let max = if self.cfg.legacy_channel_range {
            0x7FFF
        } else {
            0x4FFF
        };
        (0x4000..=max).contains(&ch)
    }

    /// Whether allocation `id` asked for DONT-FRAGMENT (io may set IP_PMTUDISC_DO on its socket).
    pub fn dont_fragment(&self, id: AllocationId) -> bool {
        self.table.get(id).is_some_and(|a| a.dont_fragment)
    }

    /// Sizes of the core's tables: (allocations, 5-tuple map, relayed map, timer heap,
    /// rate-limit slots in use). Every one is bounded; for leak tests and debugging.
    pub fn table_sizes(&self) -> (usize, usize, usize, usize, usize) {
        let (a, b, c, d) = self.table.footprint();
        (a, b, c, d, self.limiter.len())
    }

    fn free(&mut self, id: AllocationId, sockets: &mut dyn RelaySockets, why: FreeReason) {
        if let Some(a) = self.table.remove(id) {
            sockets.close(id);
            self.shared.release(&a.username);
            let t = a.client.link.transport().index();
            self.counters.allocations_active_by[t] =
                self.counters.allocations_active_by[t].saturating_sub(1);
            match why {
                FreeReason::Expired => self.counters.allocations_expired += 1,
                FreeReason::Deleted => self.counters.allocations_deleted += 1,
                FreeReason::Closed => self.counters.allocations_closed += 1,
                FreeReason::Shutdown => {}
            }
        }
    }

    /// `out` with the link of its client (`Link::Udp` unless it goes to a stream client).
    fn routed(&mut self, out: Output) -> Routed {
        let link = std::mem::replace(&mut self.dest, Link::Udp);
        let to_client = matches!(
            out,
            Output::Forward {
                from: SocketRef::Listener,
                ..
            } | Output::Reply {
                from: SocketRef::Listener,
                ..
            }
        );
        Routed {
            out,
            link: if to_client { link } else { Link::Udp },
        }
    }

    fn count(&mut self, out: &Output) {
        if let Output::Drop(Some(r)) = out {
            self.counters.drops[r.index()] += 1;
        }
    }

    fn next_tid(&mut self) -> [u8; 12] {
        let a = hash::splitmix(&mut self.rng).to_le_bytes();
        let b = hash::splitmix(&mut self.rng).to_le_bytes();
        let mut t = [0u8; 12];
        t[..8].copy_from_slice(&a);
        t[8..].copy_from_slice(&b[..4]);
        t
    }
}

impl Drop for Core {
    /// Gives this worker's allocations back to the shared quotas (sockets are io's to close).
    fn drop(&mut self) {
        for id in self.table.ids() {
            if let Some(a) = self.table.remove(id) {
                self.shared.release(&a.username);
            }
        }
    }
}
