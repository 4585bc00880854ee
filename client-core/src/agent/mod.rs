//! Sans-IO connectivity agent (ICE-style, RFC 8445 / RFC 7675 ideas) of the reference client.
//!
//! One [`Agent`] per call. It gathers candidates (host: the sockets it is given;
//! server-reflexive: a Binding request to signaling's STUN port, retransmitted from 150 ms;
//! relayed: a TURN allocation through [`crate::turn::TurnClient`]), trickles them as
//! [`Event::LocalCandidate`], runs connectivity checks from both sides at once, nominates,
//! selects a path, keeps it alive and watches consent. Application payloads are framed for the
//! selected path by [`Agent::send`] and unwrapped by [`Agent::handle_datagram`].
//!
//! ## Decisions
//!
//! * **Aggressive nomination.** Every check the controlling side sends carries USE-CANDIDATE,
//!   so a pair is nominated the moment it validates: setup costs one round trip after the
//!   NATs opened instead of two (regular nomination adds a nomination round). Both sides then
//!   select the best nominated valid pair, and may move to a better one later
//!   ([`Event::PathChanged`]).
//! * **The controlled side follows the controlling side's path.** With several nominated
//!   pairs the two sides can rank them differently (a peer-reflexive remote candidate carries
//!   the priority from the check, not the peer's own), so each could send on a different pair,
//!   e.g. through two different relays. RFC 8445 lets the controlling agent decide; it shows
//!   its choice by sending application data on it. Once [`FOLLOW_AFTER`] consecutive
//!   application packets arrive on one selectable pair other than ours, the controlled side
//!   selects that pair and keeps it while it stays selectable (stragglers on an old path do
//!   not move it back).
//! * **Checks are paced per pair**, not by one global Ta: first check at once, then every
//!   `check_interval` (25 ms) growing 1.5x to `max_check_interval` (250 ms); a pair fails
//!   after `pair_timeout` (8 s). An incoming check triggers an immediate check on its pair.
//!   After the first success or first incoming check on a pair, `extra_checks` more follow
//!   at `check_interval` (early probes die at a NAT before the outgoing check of the host
//!   behind it has created the entry that lets them in).
//! * **Relay fallback by a window.** Direct pairs are selectable at once. Pairs through a relay
//!   (ours or the peer's) become selectable `relay_fallback_after` (600 ms) after checks began,
//!   or earlier if every direct pair has failed. Direct pairs keep being checked after a relay
//!   selection until their own deadline; a direct pair that validates later takes over.
//!   Once a direct pair is selected, lower-priority pending pairs stop.
//! * **Consent** (RFC 7675-like): a Binding request on the selected pair every
//!   `keepalive_interval` (2 s; every 500 ms once the path has been silent that long). An
//!   authenticated response or an authenticated check from the peer on that pair refreshes it;
//!   after `consent_timeout` (5 s) of silence: [`Event::Disconnected`]. Recovery is
//!   [`Agent::restart`] with new credentials (the app exchanges them through signaling).
//!   A restart on a *direct* path that is still alive (e.g. a false alarm from loss) costs no
//!   media: until a new pair is selected, [`Agent::send`] keeps using the old path and
//!   application data from it is still accepted (a relayed old path cannot stay: its
//!   allocation is released by the restart). It is dropped once the agent disconnects.
//! * **Role conflicts** (RFC 8445 section 7.3.1.1): tie-breakers from the seeded RNG; 487
//!   answers; the loser switches role and rechecks.
//! * Peer-reflexive candidates: an authenticated check from an unknown address adds a remote
//!   peer-reflexive candidate (priority from PRIORITY) and a pair with the local candidate it
//!   arrived on; an unknown XOR-MAPPED-ADDRESS in a response adds a local peer-reflexive
//!   candidate (not trickled, RFC 8445 section 7.2.5.3.1).
//! * Relayed pairs: permissions are installed for every remote candidate IP once allocated;
//!   checks through the relay wait for the permission; a channel is bound when a relayed pair
//!   is selected (ChannelData then, Send indications until then).
//!
//! * **Several relays**: `turn` then `turn_alternates` are tried in order; an Allocate that
//!   fails or gets no answer within `turn_alternate_after` (400 ms) moves on to the next relay.
//!   On [`Agent::restart`] the relay of a dead relayed path goes last.
//! * **The TURN ladder** (UDP-hostile networks): the relays are tried over UDP first, then
//!   over TCP, then over TLS (stable order within each transport). A transport that has given
//!   no allocation [`TURN_TRANSPORT_STEP`] (1 s, `turn_transport_after`) after its first
//!   Allocate gives way to the next; a refused connection moves on at once. A TCP or TLS
//!   allocation lives on a connection the driver owns ([`StreamOp`]: open, write, close;
//!   [`Agent::handle_stream_data`], [`Agent::handle_stream_closed`]); checks and media through
//!   it are ChannelData (or Send indications) on that stream. It is released by closing the
//!   connection. The selected path says which transport it uses ([`SelectedPath::transport`]).
//!   After a TCP or TLS allocation, a restart's ladder starts at that transport (the ones
//!   below it are tried after): the network it found is likely still the same.
//! * **Allocations do not outlive the agent**: a restart releases the old allocation and
//!   [`Agent::close`] the current one (Refresh LIFETIME 0, retransmitted until answered; a new
//!   Allocate on the same relay waits for the release so the relay does not answer 437).
//! * **Nor their use** (RFC 8445 section 8.3): once the selected pair has not gone through our
//!   allocation for `release_unused_relay_after` (3 s) and nothing has arrived through it for
//!   as long, it is released and our relayed pairs end. A direct call then holds no allocation
//!   and a relayed one only the allocation both sides send through. Nothing arriving through
//!   it is the guard: the controlling side may be sending to our relayed address, and its
//!   consent checks (every 2 s) and media arrive there until we follow it.
//!
//! The public API and the agent's state are here; `gather` holds candidate gathering,
//! `relay` the TURN allocations, `checks` the pairs and connectivity checks, `selection` the
//! path selection and consent, `family` dual stack (RFC 8421 local preferences, a STUN
//! server per family, same-family pairs, the allocation of the other relayed family).
//!
//! What it is not: no sockets, clock reads or unseeded randomness; one component; direct
//! paths over UDP only (TCP and TLS only to the relay);
//! no port prediction (symmetric <-> port-restricted goes through the relay); no ICE-lite.

mod candidate;
mod checks;
mod family;
mod gather;
mod relay;
mod selection;
mod types;

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use peerlink_proto::attrs::{
    ErrorCode, IceControlled, IceControlling, Priority, UseCandidate, Username, XorMappedAddress,
};
use peerlink_proto::auth::short_term_key;
use peerlink_proto::ice::{
    TYPE_PREF_HOST, TYPE_PREF_PEER_REFLEXIVE, TYPE_PREF_RELAYED, candidate_priority, pair_priority,
};
use peerlink_proto::{
    Class, EncodeError, Message, MessageBuilder, MessageType, Method, PacketKind, TransactionId,
    classify,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::turn::{self, AllocationState, TurnClient};

pub use candidate::{Candidate, CandidateError, CandidateKind};
pub use family::{family_precedence, local_preference};
pub use types::{
    AgentConfig, AgentStats, AppData, DisconnectReason, Event, PathKind, Role, SelectedPath,
    SendError, StreamOp, TURN_TRANSPORT_STEP, Transmit, TurnAttempt, TurnConfig, TurnOutcome,
    TurnTransport,
};

/// Size of the buffer checks and responses are encoded into (USERNAME can be 512 bytes).
const STUN_BUF: usize = 1024;
/// TURN framing overhead bound (Send indication header + XOR-PEER-ADDRESS (v6) + DATA + pad).
const TURN_OVERHEAD: usize = 64;
/// A triggered check is not re-sent on a pair that sent one this recently.
const TRIGGER_HOLDOFF: Duration = Duration::from_millis(10);
/// Outstanding check transactions are forgotten after this long.
const TXN_LIFETIME: Duration = Duration::from_secs(10);
/// Bound on outstanding check transactions (a flood of pairs cannot grow memory unbounded).
const MAX_TXNS: usize = 4096;
/// Bound on remote candidates (signaling allows 32 per message; prflx add more).
const MAX_REMOTE_CANDIDATES: usize = 128;
/// Largest retransmission interval of server-reflexive Binding requests.
const MAX_STUN_RTO: Duration = Duration::from_millis(1600);

/// Where a local candidate sends from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Via {
    /// Straight out of local socket `i`.
    Socket(usize),
    /// Through our TURN allocation.
    Relay,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PairState {
    Waiting,
    InProgress,
    Succeeded,
    Failed,
}

#[derive(Clone, Debug)]
struct Pair {
    via: Via,
    /// Our address on this pair (socket address, or our relayed address).
    local_addr: SocketAddr,
    local_priority: u32,
    remote: SocketAddr,
    remote_priority: u32,
    remote_kind: CandidateKind,
    priority: u64,
    state: PairState,
    nominated: bool,
    /// When the pair was formed.
    created_at: Instant,
    /// When checks on this pair were first scheduled (deadline base).
    started_at: Option<Instant>,
    next_check_at: Option<Instant>,
    last_sent: Option<Instant>,
    interval: Duration,
    extra: u8,
    extra_given: bool,
    last_rx: Option<Instant>,
    rtt: Option<Duration>,
}

impl Pair {
    fn kind(&self) -> PathKind {
        if self.via == Via::Relay || self.remote_kind == CandidateKind::Relayed {
            PathKind::Relay
        } else {
            PathKind::Direct
        }
    }
    /// Selection order: direct before relay, then priority.
    fn key(&self) -> (bool, u64) {
        (self.kind() == PathKind::Direct, self.priority)
    }
}

/// Application packets in a row on one pair before the controlled side follows the
/// controlling side onto it.
pub const FOLLOW_AFTER: u32 = 3;

/// Where the controlling side's application data arrives (controlled side only).
#[derive(Clone, Copy, Debug, Default)]
struct Follow {
    /// The pair the last application packets arrived on, if not the followed one...
    pair: Option<usize>,
    /// ...and how many arrived on it in a row.
    count: u32,
    /// The pair the controlling side sends on: selected while it is selectable.
    chosen: Option<usize>,
}

#[derive(Clone, Copy, Debug)]
struct Txn {
    pair: usize,
    sent_at: Instant,
    use_candidate: bool,
    role: Role,
}

#[derive(Clone, Debug)]
struct Gather {
    socket: usize,
    /// The STUN server asked (the one of the socket's family).
    server: SocketAddr,
    tid: TransactionId,
    payload: Vec<u8>,
    transmissions: u32,
    rto: Duration,
    next_at: Instant,
    done: bool,
}

#[derive(Clone, Debug)]
struct Local {
    cand: Candidate,
}

/// The connectivity agent of one call. See the module docs.
pub struct Agent {
    cfg: AgentConfig,
    rng: ChaCha8Rng,
    role: Role,
    tie_breaker: u64,
    sockets: Vec<SocketAddr>,
    locals: Vec<Local>,
    remotes: Vec<Candidate>,
    remote_creds: Option<(String, String)>,
    remote_done: bool,
    pairs: Vec<Pair>,
    txns: HashMap<TransactionId, Txn>,
    gathers: Vec<Gather>,
    turn: Option<TurnClient>,
    turn_socket: usize,
    turn_generation: u64,
    /// Relays of this generation in the order they are tried (the first is `cfg.turn`).
    turn_order: Vec<TurnConfig>,
    /// Index in `turn_order` of the relay `turn` talks to.
    turn_index: usize,
    /// When the current Allocate started (for trying the next relay).
    turn_started_at: Option<Instant>,
    /// The allocation of this generation succeeded once (no more failover).
    turn_allocated_once: bool,
    /// Allocate deferred until a released allocation on the same relay is gone (same
    /// 5-tuple: the relay would answer 437), at the latest until this instant.
    turn_deferred_until: Option<Instant>,
    /// Allocations being released (Refresh LIFETIME 0 in flight) after a restart or close.
    retired: Vec<(usize, TurnClient)>,
    /// Realm and nonce per relay this agent authenticated with: the next Allocate there (a
    /// restart, a failover back) starts authenticated. At most one per configured relay.
    turn_auth: Vec<turn::AuthHint>,
    /// The client transport of `turn`.
    turn_transport: TurnTransport,
    /// The server whose stream connection `turn` uses while it is open.
    turn_stream: Option<SocketAddr>,
    /// When the first Allocate of the current transport's rung started (the ladder's bound).
    turn_rung_started_at: Option<Instant>,
    /// The transport of the last allocation granted: a restart's ladder starts there.
    turn_transport_worked: Option<TurnTransport>,
    /// Operations on stream connections for the driver.
    stream_ops: VecDeque<StreamOp>,
    gathering_reported: bool,
    selected: Option<usize>,
    /// Controlled side: the pair the controlling side sends application data on (module docs).
    follow: Follow,
    /// When the current pair was selected.
    selected_at: Option<Instant>,
    /// When something (a check, a response, media) last arrived through our allocation.
    relay_rx_at: Option<Instant>,
    /// The direct path selected before a restart (local socket, remote address): still used
    /// for application data until a new pair is selected.
    previous: Option<(usize, SocketAddr)>,
    next_consent_at: Option<Instant>,
    connected_once: bool,
    dead: bool,
    checks_started_at: Option<Instant>,
    events: VecDeque<Event>,
    transmits: VecDeque<Transmit>,
    stats: AgentStats,
    /// The allocation of the other relayed family and its local socket (`family`).
    turn2: Option<(usize, TurnClient)>,
    /// When its Allocate started, while gathering waits for it.
    turn2_started_at: Option<Instant>,
    /// It was tried in this generation.
    turn2_tried: bool,
}

impl Agent {
    /// A new agent with one host candidate per local socket; gathering starts at once.
    pub fn new(config: AgentConfig, local_sockets: &[SocketAddr], now: Instant) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let tie_breaker = rng.random::<u64>();
        let mut agent = Agent {
            role: config.role,
            cfg: config,
            rng,
            tie_breaker,
            sockets: local_sockets.to_vec(),
            locals: Vec::new(),
            remotes: Vec::new(),
            remote_creds: None,
            remote_done: false,
            pairs: Vec::new(),
            txns: HashMap::new(),
            gathers: Vec::new(),
            turn: None,
            turn_socket: 0,
            turn_generation: 0,
            turn_order: Vec::new(),
            turn_index: 0,
            turn_started_at: None,
            turn_allocated_once: false,
            turn_deferred_until: None,
            retired: Vec::new(),
            turn_auth: Vec::new(),
            turn_transport: TurnTransport::Udp,
            turn_stream: None,
            turn_rung_started_at: None,
            turn_transport_worked: None,
            stream_ops: VecDeque::new(),
            gathering_reported: false,
            selected: None,
            follow: Follow::default(),
            selected_at: None,
            relay_rx_at: None,
            previous: None,
            next_consent_at: None,
            connected_once: false,
            dead: false,
            checks_started_at: None,
            events: VecDeque::new(),
            transmits: VecDeque::new(),
            stats: AgentStats::default(),
            turn2: None,
            turn2_started_at: None,
            turn2_tried: false,
        };
        agent.start_gathering(now);
        agent
    }

    /// Our current role (may change after a role conflict).
    pub fn role(&self) -> Role {
        self.role
    }

    /// Our local ICE credentials (ufrag, pwd) of this generation.
    pub fn local_credentials(&self) -> (&str, &str) {
        (&self.cfg.local_ufrag, &self.cfg.local_pwd)
    }

    /// Local candidates of this generation (peer-reflexive included).
    pub fn local_candidates(&self) -> Vec<Candidate> {
        self.locals.iter().map(|l| l.cand.clone()).collect()
    }

    /// The peer's ICE credentials (from the offer/answer). Checks start once they are known.
    pub fn set_remote_credentials(&mut self, ufrag: &str, pwd: &str) {
        self.remote_creds = Some((ufrag.to_owned(), pwd.to_owned()));
        // Pairs formed before (from trickled candidates or incoming checks) start now; the
        // next handle_timeout sends. `now` is not known here: use the pairs' creation marks.
        for p in &mut self.pairs {
            if p.state == PairState::Waiting && p.next_check_at.is_none() {
                // Due at once; the pair's deadline starts at its first check.
                p.next_check_at = Some(p.created_at);
                p.started_at = None;
            }
        }
    }

    /// Adds a remote candidate (trickled through signaling) and pairs it.
    pub fn add_remote_candidate(&mut self, c: Candidate, now: Instant) {
        if c.component != 1 {
            return;
        }
        if let Some(r) = self.remotes.iter_mut().find(|r| r.addr == c.addr) {
            // Learned as peer-reflexive from a check before signaling delivered it: adopt the
            // signaled kind and priority (RFC 8445 section 7.3.1.3).
            if r.kind == CandidateKind::PeerReflexive && c.kind != CandidateKind::PeerReflexive {
                *r = c.clone();
                for i in 0..self.pairs.len() {
                    if self.pairs[i].remote == c.addr {
                        let l = self.pairs[i].local_priority;
                        let prio = self.compute_priority(l, c.priority);
                        let p = &mut self.pairs[i];
                        p.remote_kind = c.kind;
                        p.remote_priority = c.priority;
                        p.priority = prio;
                    }
                }
            }
            return;
        }
        if self.remotes.len() >= MAX_REMOTE_CANDIDATES {
            return;
        }
        let ip = c.addr.ip();
        self.remotes.push(c.clone());
        self.stats.remote_candidates = self.remotes.len();
        if let Some((_, t)) = self.relay_for_mut(c.addr)
            && !t.has_permission(ip)
        {
            let _ = t.create_permission(now, ip);
        }
        self.drain_turn(now);
        let vias: Vec<Via> = self.pairing_vias();
        for via in vias {
            self.add_pair(now, via, &c);
        }
    }

    /// The peer has sent all its candidates (lets the agent declare failure early).
    pub fn end_of_remote_candidates(&mut self) {
        self.remote_done = true;
    }

    /// A datagram arrived on local socket `socket` from `from`. Returns application data (media
    /// or QUIC) if it was not for the agent, unwrapped from TURN framing if relayed.
    pub fn handle_datagram<'a>(
        &mut self,
        now: Instant,
        socket: usize,
        from: SocketAddr,
        data: &'a [u8],
    ) -> Option<AppData<'a>> {
        if socket >= self.sockets.len() {
            self.stats.malformed += 1;
            return None;
        }
        let kind = classify(data);
        if matches!(kind, PacketKind::Stun | PacketKind::ChannelData)
            && self.is_turn2_server(socket, from)
        {
            return self.turn2_input(now, socket, from, data);
        }
        let from_turn = socket == self.turn_socket
            && self.turn.as_ref().is_some_and(|t| {
                t.config().server == from && t.config().transport == turn::ClientTransport::Datagram
            });
        // The answer to a Refresh LIFETIME 0 of a released allocation.
        if !from_turn && kind == PacketKind::Stun && self.feed_retired(now, socket, from, data) {
            return None;
        }
        if from_turn && matches!(kind, PacketKind::Stun | PacketKind::ChannelData) {
            if kind == PacketKind::Stun && self.try_gather_response(socket, from, data) {
                return None;
            }
            let turn = self.turn.as_mut()?;
            let res = turn.handle_input(now, from, data);
            return self.after_turn_input(now, (socket, from, data), res, false);
        }
        self.handle_inner(now, Via::Socket(socket), from, data)
    }

    /// What an allocation's input leads to: relayed application data goes on to the agent,
    /// the allocation's own traffic is drained, errors are counted. A STUN message it does not
    /// take may answer the release of an allocation on the same relay. `second`: the input
    /// was the other family's allocation's.
    pub(super) fn after_turn_input<'a>(
        &mut self,
        now: Instant,
        (socket, from, data): (usize, SocketAddr, &'a [u8]),
        res: Result<turn::Input<'a>, turn::InputError>,
        second: bool,
    ) -> Option<AppData<'a>> {
        if res.is_err()
            && classify(data) == PacketKind::Stun
            && self.feed_retired(now, socket, from, data)
        {
            return None;
        }
        let inner = match res {
            Ok(turn::Input::Data { peer, data: inner }) => {
                self.relay_rx_at = Some(now);
                Some((peer, inner))
            }
            Ok(turn::Input::Control) => None,
            Err(_) => {
                self.stats.turn_input_errors += 1;
                return None;
            }
        };
        if second {
            self.drain_turn2(now);
        } else {
            self.drain_turn(now);
        }
        let (peer, inner) = inner?;
        self.handle_inner(now, Via::Relay, peer, inner)
    }

    /// Runs due timers: retransmissions, checks, consent, relay fallback, TURN refreshes.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.gather_timers(now);
        for (_, t) in &mut self.retired {
            t.handle_timeout(now);
        }
        self.drain_retired(now);
        if let Some(t) = self.turn.as_mut() {
            t.handle_timeout(now);
        }
        self.drain_turn(now);
        self.turn2_timers(now);
        self.turn_failover(now);
        self.pair_timers(now);
        self.consent_timers(now);
        self.update_selection(now);
        self.release_unused_relay(now);
        self.check_no_path();
        self.txns
            .retain(|_, t| now.saturating_duration_since(t.sent_at) < TXN_LIFETIME);
    }

    /// When [`handle_timeout`](Self::handle_timeout) should run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n: Instant| n.min(t)));
            }
        };
        for g in self.gathers.iter().filter(|g| !g.done) {
            consider(Some(g.next_at));
        }
        if let Some(t) = &self.turn {
            consider(t.poll_timeout());
        }
        consider(self.turn_failover_at());
        for (_, t) in &self.retired {
            consider(t.poll_timeout());
        }
        if let Some((_, t)) = &self.turn2 {
            consider(t.poll_timeout());
        }
        consider(self.turn2_wait_until());
        consider(self.turn_deferred_until);
        consider(self.unused_relay_release_at());
        if self.remote_creds.is_some() && !self.dead {
            for p in &self.pairs {
                if p.state != PairState::Failed {
                    consider(p.next_check_at);
                }
            }
        }
        if let Some(s) = self.selected.and_then(|i| self.pairs.get(i)) {
            consider(self.next_consent_at);
            consider(p_last(s).map(|t| t + self.cfg.consent_timeout));
        } else if !self.dead
            && let Some(start) = self.checks_started_at
            && self
                .pairs
                .iter()
                .any(|p| p.kind() == PathKind::Relay && p.state == PairState::Succeeded)
        {
            consider(Some(start + self.cfg.relay_fallback_after));
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

    /// Wraps an application payload for the selected path (direct: as is; relay: ChannelData
    /// on a bound channel, else a Send indication). `None`: it went through our allocation over
    /// TCP or TLS and waits in [`poll_stream_op`](Self::poll_stream_op).
    pub fn send(&mut self, _now: Instant, payload: &[u8]) -> Result<Option<Transmit>, SendError> {
        let (via, remote) = match self.selected.and_then(|i| self.pairs.get(i)) {
            Some(p) => (p.via, p.remote),
            None => match self.previous {
                Some((socket, remote)) => (Via::Socket(socket), remote),
                None => return Err(SendError::NotConnected),
            },
        };
        let t = match via {
            Via::Socket(socket) => Transmit {
                socket,
                to: remote,
                payload: payload.to_vec(),
            },
            Via::Relay => {
                if let Some(t) = self.wrap_turn2(remote, payload)? {
                    self.stats.app_sent += 1;
                    return Ok(Some(t));
                }
                let turn = self.turn.as_mut().ok_or(SendError::NotConnected)?;
                let mut buf = vec![0u8; payload.len() + TURN_OVERHEAD];
                let n = turn.encode_data(remote, payload, &mut buf)?;
                buf.truncate(n);
                let server = turn.config().server;
                self.stats.app_sent += 1;
                if self.turn_stream.is_some() {
                    self.stream_ops
                        .push_back(StreamOp::Write { server, bytes: buf });
                    return Ok(None);
                }
                Transmit {
                    socket: self.turn_socket,
                    to: server,
                    payload: buf,
                }
            }
        };
        if matches!(via, Via::Socket(_)) {
            self.stats.app_sent += 1;
        }
        Ok(Some(t))
    }

    /// The next operation on a stream connection to a TURN server over TCP or TLS.
    pub fn poll_stream_op(&mut self) -> Option<StreamOp> {
        self.stream_ops.pop_front()
    }

    /// Bytes read from the stream connection to `server`. Returns the application data (media
    /// or QUIC) they completed, unwrapped from TURN framing; STUN and TURN control messages are
    /// kept. Bytes of a connection the agent no longer uses are ignored; bytes that break the
    /// framing end the allocation (the connection is then to be closed: a
    /// [`StreamOp::Close`] follows).
    pub fn handle_stream_data(
        &mut self,
        now: Instant,
        server: SocketAddr,
        bytes: &[u8],
    ) -> Vec<AppData<'static>> {
        let mut out = Vec::new();
        if self.turn_stream != Some(server) {
            return out;
        }
        let Some(t) = self.turn.as_mut() else {
            return out;
        };
        if t.handle_stream_bytes(bytes).is_err() {
            return out;
        }
        while let Some(t) = self.turn.as_mut() {
            match t.poll_stream_input(now) {
                Ok(Some(turn::StreamInput::Data { peer, data })) => {
                    self.relay_rx_at = Some(now);
                    self.drain_turn(now);
                    if let Some(app) = self.handle_inner(now, Via::Relay, peer, &data) {
                        out.push(match app {
                            AppData::Payload { data, path } => AppData::Payload {
                                data: Cow::Owned(data.into_owned()),
                                path,
                            },
                        });
                    }
                }
                Ok(Some(turn::StreamInput::Control)) => self.drain_turn(now),
                Ok(Some(turn::StreamInput::Dropped(_))) => self.stats.turn_input_errors += 1,
                Ok(None) => break,
                Err(_) => {
                    self.stats.turn_input_errors += 1;
                    self.drain_turn(now);
                    break;
                }
            }
        }
        out
    }

    /// The stream connection to `server` ended (closed, reset, or its connect or TLS handshake
    /// failed). Its allocation is gone: the next rung of the ladder is tried, or the relayed
    /// pairs through it end.
    pub fn handle_stream_closed(&mut self, now: Instant, server: SocketAddr) {
        if self.turn_stream != Some(server) {
            return;
        }
        // The connection is gone already: no Close for it.
        self.turn_stream = None;
        if let Some(t) = self.turn.as_mut() {
            t.handle_stream_closed(now);
        }
        self.drain_turn(now);
        self.turn_failover(now);
    }

    /// ICE restart after path loss: new local credentials, forget the peer's candidates and all
    /// pairs, gather again (new server-reflexive mapping, new TURN allocation). The app sends
    /// the new credentials and candidates through signaling, and feeds the peer's new ones.
    pub fn restart(&mut self, now: Instant, new_local: (String, String)) {
        let old_path_relay = self
            .selected
            .and_then(|i| self.pairs.get(i))
            .is_some_and(|p| p.kind() == PathKind::Relay);
        // A direct path may still work (the restart may be a false alarm): keep sending on it
        // until the restart selects a new pair. A relayed one goes with its allocation.
        let old_direct = self
            .selected
            .and_then(|i| self.pairs.get(i))
            .and_then(|p| match p.via {
                Via::Socket(s) if p.kind() == PathKind::Direct => Some((s, p.remote)),
                _ => None,
            });
        self.previous = old_direct.or(self.previous);
        self.cfg.local_ufrag = new_local.0;
        self.cfg.local_pwd = new_local.1;
        self.remote_creds = None;
        self.remote_done = false;
        self.remotes.clear();
        self.pairs.clear();
        self.txns.clear();
        self.selected = None;
        self.follow = Follow::default();
        self.selected_at = None;
        self.relay_rx_at = None;
        self.next_consent_at = None;
        self.connected_once = false;
        self.dead = false;
        self.checks_started_at = None;
        self.role = self.cfg.role;
        self.stats.restarts += 1;
        self.stats.selected = None;
        self.stats.time_to_connected = None;
        self.stats.pairs = 0;
        self.stats.valid_pairs = 0;
        self.stats.remote_candidates = 0;
        // The relay carrying a dead relayed path (or one whose allocation failed) is tried
        // last this time: it may be the reason for the restart.
        let old_server = self.turn.as_ref().map(|t| t.config().server);
        let suspect = self
            .turn
            .as_ref()
            .is_some_and(|t| t.state() != AllocationState::Allocated)
            || old_path_relay;
        if let (Some(old), true) = (old_server, suspect) {
            let servers = self.turn_list();
            let (mut keep, last): (Vec<_>, Vec<_>) =
                servers.into_iter().partition(|t| t.server != old);
            keep.extend(last);
            let mut it = keep.into_iter();
            self.cfg.turn = it.next();
            self.cfg.turn_alternates = it.collect();
        }
        // The old allocation may sit on a dead NAT mapping: release it, start anew.
        self.release_turn(now);
        self.release_turn2(now);
        self.locals.clear();
        self.gathers.clear();
        self.start_gathering(now);
    }

    /// Replaces the relays (e.g. fresh TURN credentials before a [`restart`](Self::restart));
    /// they are used from the next gathering on. The first is tried first.
    pub fn set_turn_servers(&mut self, servers: Vec<TurnConfig>) {
        let mut it = servers.into_iter();
        self.cfg.turn = it.next();
        self.cfg.turn_alternates = it.collect();
    }

    /// The relays configured, in the order they would be tried.
    pub fn turn_list(&self) -> Vec<TurnConfig> {
        self.cfg
            .turn
            .iter()
            .chain(self.cfg.turn_alternates.iter())
            .cloned()
            .collect()
    }

    /// The relay the current allocation is on (or being requested from), if any.
    pub fn turn_server(&self) -> Option<SocketAddr> {
        self.turn.as_ref().map(|t| t.config().server)
    }

    /// Ends the agent: releases the TURN allocation (Refresh LIFETIME 0, retransmitted by
    /// [`handle_timeout`](Self::handle_timeout) until answered) and stops checks and consent.
    /// [`is_released`](Self::is_released) tells when nothing is left on any relay.
    pub fn close(&mut self, now: Instant) {
        self.release_turn(now);
        self.release_turn2(now);
        self.dead = true;
        self.selected = None;
        self.previous = None;
        self.next_consent_at = None;
        for p in &mut self.pairs {
            p.next_check_at = None;
        }
        self.gathers.clear();
    }

    /// True when no allocation of this agent is alive or being released on a relay.
    pub fn is_released(&self) -> bool {
        self.turn.is_none() && self.turn2.is_none() && self.retired.is_empty()
    }

    /// Counters and figures.
    pub fn stats(&self) -> AgentStats {
        let mut s = self.stats.clone();
        s.selected = self.selected_path();
        s.pairs = self.pairs.len();
        s.valid_pairs = self
            .pairs
            .iter()
            .filter(|p| p.state == PairState::Succeeded)
            .count();
        s.local_candidates = self.locals.len();
        s.remote_candidates = self.remotes.len();
        s
    }

    /// When the peer last answered or sent an authenticated check on the selected pair.
    pub fn selected_last_rx(&self) -> Option<Instant> {
        self.selected
            .and_then(|i| self.pairs.get(i))
            .and_then(|p| p.last_rx)
    }

    /// The selected path, if any.
    pub fn selected_path(&self) -> Option<SelectedPath> {
        self.selected
            .and_then(|i| self.pairs.get(i))
            .map(|p| SelectedPath {
                kind: p.kind(),
                local: p.local_addr,
                remote: p.remote,
                rtt: p.rtt,
                transport: self.via_transport(p.via),
            })
    }
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("role", &self.role)
            .field("sockets", &self.sockets)
            .field("pairs", &self.pairs.len())
            .field("selected", &self.selected_path())
            .finish_non_exhaustive()
    }
}

fn p_last(p: &Pair) -> Option<Instant> {
    p.last_rx
}

/// Encodes a STUN message with `fill` adding the attributes.
fn build_stun(
    typ: MessageType,
    tid: TransactionId,
    fill: impl FnOnce(&mut MessageBuilder<'_>) -> Result<(), EncodeError>,
) -> Result<Vec<u8>, EncodeError> {
    let mut buf = vec![0u8; STUN_BUF];
    let mut b = MessageBuilder::new(&mut buf, typ, tid)?;
    fill(&mut b)?;
    let n = b.finish();
    buf.truncate(n);
    Ok(buf)
}
