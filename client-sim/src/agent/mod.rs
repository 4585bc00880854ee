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
//! What it is not: no sockets, clock reads or unseeded randomness; one component, UDP only;
//! no port prediction (symmetric <-> port-restricted goes through the relay); no ICE-lite.

mod candidate;
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
pub use types::{
    AgentConfig, AgentStats, AppData, DisconnectReason, Event, PathKind, Role, SelectedPath,
    SendError, Transmit, TurnConfig,
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
        if let Some(t) = self.turn.as_mut()
            && t.state() == AllocationState::Allocated
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
        let from_turn = socket == self.turn_socket
            && self
                .turn
                .as_ref()
                .is_some_and(|t| t.config().server == from);
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
            // Same relay as a released allocation: maybe the answer to its release.
            if res.is_err()
                && kind == PacketKind::Stun
                && self.feed_retired(now, socket, from, data)
            {
                return None;
            }
            return match res {
                Ok(turn::Input::Data { peer, data: inner }) => {
                    self.relay_rx_at = Some(now);
                    self.drain_turn(now);
                    self.handle_inner(now, Via::Relay, peer, inner)
                }
                Ok(turn::Input::Control) => {
                    self.drain_turn(now);
                    None
                }
                Err(_) => {
                    self.stats.turn_input_errors += 1;
                    None
                }
            };
        }
        self.handle_inner(now, Via::Socket(socket), from, data)
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
            if t.state() == AllocationState::Allocating
                && self.turn_index + 1 < self.turn_order.len()
            {
                consider(
                    self.turn_started_at
                        .map(|s| s + self.cfg.turn_alternate_after),
                );
            }
        }
        for (_, t) in &self.retired {
            consider(t.poll_timeout());
        }
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
    /// on a bound channel, else a Send indication).
    pub fn send(&mut self, _now: Instant, payload: &[u8]) -> Result<Transmit, SendError> {
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
                let turn = self.turn.as_mut().ok_or(SendError::NotConnected)?;
                let mut buf = vec![0u8; payload.len() + TURN_OVERHEAD];
                let n = turn.encode_data(remote, payload, &mut buf)?;
                buf.truncate(n);
                Transmit {
                    socket: self.turn_socket,
                    to: turn.config().server,
                    payload: buf,
                }
            }
        };
        self.stats.app_sent += 1;
        Ok(t)
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
        self.turn.is_none() && self.retired.is_empty()
    }

    /// Moves the current allocation to the released list (Refresh LIFETIME 0 sent).
    fn release_turn(&mut self, now: Instant) {
        self.turn_deferred_until = None;
        if let Some(mut old) = self.turn.take()
            && old.state() == AllocationState::Allocated
            && old.deallocate(now).is_ok()
        {
            self.retired.push((self.turn_socket, old));
            self.drain_retired(now);
        }
    }

    /// When our allocation is to be released as unused (module docs), if it is unused now:
    /// allocated, the selected pair not through it, and both the selection and the last
    /// datagram through it at least `release_unused_relay_after` old at that instant.
    fn unused_relay_release_at(&self) -> Option<Instant> {
        let after = self.cfg.release_unused_relay_after?;
        if self.dead || self.relayed_addr().is_none() {
            return None;
        }
        let p = self.pairs.get(self.selected?)?;
        if p.via == Via::Relay {
            return None;
        }
        let selected_at = self.selected_at?;
        let since = self.relay_rx_at.map_or(selected_at, |t| t.max(selected_at));
        Some(since + after)
    }

    /// Releases our allocation once [`Self::unused_relay_release_at`] has come: Refresh
    /// LIFETIME 0, and the pairs through it end (no checks, never selected).
    fn release_unused_relay(&mut self, now: Instant) {
        if self.unused_relay_release_at().is_none_or(|at| at > now) {
            return;
        }
        self.end_relayed_pairs();
        self.release_turn(now);
        self.stats.unused_relay_released += 1;
    }

    /// Our allocation is gone (lost, or released as unused): the pairs through it fail and
    /// are checked no more.
    fn end_relayed_pairs(&mut self) {
        for p in self.pairs.iter_mut().filter(|p| p.via == Via::Relay) {
            p.state = PairState::Failed;
            p.next_check_at = None;
        }
    }

    /// Hands a STUN message from `from` on `socket` to the released allocation on that relay,
    /// if there is one (the answer to its Refresh LIFETIME 0). `true` when one took it.
    fn feed_retired(&mut self, now: Instant, socket: usize, from: SocketAddr, data: &[u8]) -> bool {
        let Some(r) = self
            .retired
            .iter_mut()
            .find(|(s, t)| *s == socket && t.config().server == from)
        else {
            return false;
        };
        let _ = r.1.handle_input(now, from, data);
        self.drain_retired(now);
        true
    }

    /// Sends what released allocations have to send; forgets the finished ones.
    fn drain_retired(&mut self, _now: Instant) {
        for (socket, t) in &mut self.retired {
            while let Some(tx) = t.poll_transmit() {
                self.transmits.push_back(Transmit {
                    socket: *socket,
                    to: tx.destination,
                    payload: tx.payload,
                });
            }
            while t.poll_event().is_some() {}
        }
        self.retired.retain(|(_, t)| {
            matches!(
                t.state(),
                AllocationState::Deallocating | AllocationState::Allocated
            )
        });
    }

    /// Tries the next relay when the Allocate on the current one failed or went unanswered
    /// for `turn_alternate_after`; starts a deferred Allocate when its time has come.
    fn turn_failover(&mut self, now: Instant) {
        if let Some(until) = self.turn_deferred_until {
            let server = self.turn_order.get(self.turn_index).map(|t| t.server);
            let busy = self
                .retired
                .iter()
                .any(|(_, t)| Some(t.config().server) == server);
            if !busy || now >= until {
                self.turn_deferred_until = None;
                self.start_turn(now);
            }
            return;
        }
        if self.turn_allocated_once || self.turn_index + 1 >= self.turn_order.len() {
            return;
        }
        let stuck = match self.turn.as_ref() {
            None => !self.turn_order.is_empty(),
            Some(t) => match t.state() {
                AllocationState::Failed => true,
                AllocationState::Allocating | AllocationState::Idle => {
                    self.turn_started_at.is_some_and(|s| {
                        now.saturating_duration_since(s) >= self.cfg.turn_alternate_after
                    })
                }
                _ => false,
            },
        };
        if stuck {
            // An unanswered Allocate is abandoned: nothing was granted to release.
            self.turn = None;
            self.turn_index += 1;
            self.stats.turn_failovers += 1;
            self.start_turn(now);
        }
    }

    /// Starts the Allocate on `turn_order[turn_index]`.
    fn start_turn(&mut self, now: Instant) {
        let Some(tc) = self.turn_order.get(self.turn_index).cloned() else {
            return;
        };
        if self.sockets.is_empty() {
            return;
        }
        self.turn_generation += 1;
        let mut conf = turn::TurnConfig::new(tc.server, tc.username, tc.password);
        conf.rto = self.cfg.stun_rto;
        conf.seed = self
            .cfg
            .seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(self.turn_generation);
        self.turn_socket = self
            .sockets
            .iter()
            .position(|s| s.is_ipv4() == tc.server.is_ipv4())
            .unwrap_or(0);
        let mut client = TurnClient::new(conf);
        self.turn_started_at = Some(now);
        if client.allocate(now).is_ok() {
            self.turn = Some(client);
        }
        self.drain_turn(now);
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
            })
    }

    // -----------------------------------------------------------------------------------------
    // Gathering

    fn start_gathering(&mut self, now: Instant) {
        self.gathering_reported = false;
        for (i, addr) in self.sockets.clone().into_iter().enumerate() {
            let pref = local_pref(i);
            let c = Candidate::new(CandidateKind::Host, addr, addr, pref);
            self.add_local(c, true);
        }
        if let Some(server) = self.cfg.stun_server {
            for i in 0..self.sockets.len() {
                if self.sockets[i].is_ipv4() != server.is_ipv4() {
                    continue;
                }
                let tid = TransactionId::random(&mut self.rng);
                let mut buf = vec![0u8; 64];
                let payload = match MessageBuilder::new(&mut buf, MessageType::BINDING_REQUEST, tid)
                    .and_then(|mut b| {
                        b.add_fingerprint()?;
                        Ok(b.finish())
                    }) {
                    Ok(n) => {
                        buf.truncate(n);
                        buf
                    }
                    Err(_) => {
                        self.stats.send_errors += 1;
                        continue;
                    }
                };
                self.transmits.push_back(Transmit {
                    socket: i,
                    to: server,
                    payload: payload.clone(),
                });
                self.gathers.push(Gather {
                    socket: i,
                    tid,
                    payload,
                    transmissions: 1,
                    rto: self.cfg.stun_rto,
                    next_at: now + self.cfg.stun_rto,
                    done: false,
                });
            }
        }
        self.turn_order = self.turn_list();
        self.turn_index = 0;
        self.turn_allocated_once = false;
        self.turn_started_at = None;
        if let Some(first) = self.turn_order.first().map(|t| t.server) {
            let releasing = self.retired.iter().any(|(_, t)| t.config().server == first);
            if releasing {
                // Same relay (and likely the same 5-tuple) as the allocation being released:
                // let the release land first, or the relay answers 437.
                self.turn_deferred_until = Some(now + self.cfg.turn_alternate_after);
            } else {
                self.start_turn(now);
            }
        }
        self.check_gathering_complete();
    }

    fn gather_timers(&mut self, now: Instant) {
        let Some(server) = self.cfg.stun_server else {
            return;
        };
        for g in self
            .gathers
            .iter_mut()
            .filter(|g| !g.done && g.next_at <= now)
        {
            if g.transmissions >= self.cfg.stun_max_transmissions {
                g.done = true;
                continue;
            }
            g.transmissions += 1;
            g.rto = (g.rto * 2).min(MAX_STUN_RTO);
            g.next_at = now + g.rto;
            self.transmits.push_back(Transmit {
                socket: g.socket,
                to: server,
                payload: g.payload.clone(),
            });
        }
        self.check_gathering_complete();
    }

    /// A Binding response to our server-reflexive request? Consumes it if so.
    fn try_gather_response(&mut self, socket: usize, from: SocketAddr, data: &[u8]) -> bool {
        if self.cfg.stun_server != Some(from) {
            return false;
        }
        let Ok(msg) = Message::parse(data) else {
            return false;
        };
        if msg.method() != Method::BINDING || !matches!(msg.class(), Class::Success | Class::Error)
        {
            return false;
        }
        let tid = msg.transaction_id();
        let Some(g) = self
            .gathers
            .iter_mut()
            .find(|g| g.tid == tid && g.socket == socket)
        else {
            return false;
        };
        let was_done = g.done;
        g.done = true;
        if !was_done
            && msg.class() == Class::Success
            && let Some(Ok(XorMappedAddress(mapped))) = msg.get::<XorMappedAddress>()
        {
            self.add_srflx(socket, mapped);
        }
        self.check_gathering_complete();
        true
    }

    fn add_srflx(&mut self, socket: usize, mapped: SocketAddr) {
        let Some(&base) = self.sockets.get(socket) else {
            return;
        };
        if self.locals.iter().any(|l| l.cand.addr == mapped) {
            return;
        }
        let c = Candidate::new(
            CandidateKind::ServerReflexive,
            mapped,
            base,
            local_pref(socket),
        );
        // Server-reflexive candidates are trickled but not paired: their base (the host
        // socket) already is (RFC 8445 section 6.1.2.4).
        self.add_local(c, true);
    }

    fn add_local(&mut self, c: Candidate, announce: bool) {
        if announce {
            self.events.push_back(Event::LocalCandidate(c.clone()));
        }
        self.locals.push(Local { cand: c });
    }

    fn check_gathering_complete(&mut self) {
        if self.gathering_reported {
            return;
        }
        let stun_done = self.gathers.iter().all(|g| g.done);
        let turn_done = self.turn_deferred_until.is_none()
            && self
                .turn
                .as_ref()
                .is_none_or(|t| t.state() != AllocationState::Allocating)
            && (self.turn_allocated_once || self.turn_index + 1 >= self.turn_order.len());
        if stun_done && turn_done {
            self.gathering_reported = true;
            self.events.push_back(Event::GatheringComplete);
        }
    }

    fn drain_turn(&mut self, now: Instant) {
        let Some(t) = self.turn.as_mut() else {
            return;
        };
        let server = t.config().server;
        let mut events = Vec::new();
        while let Some(ev) = t.poll_event() {
            events.push(ev);
        }
        for ev in events {
            match ev {
                turn::Event::Allocated {
                    relayed, mapped, ..
                } => {
                    self.turn_allocated_once = true;
                    if let Some(m) = mapped {
                        self.add_srflx(self.turn_socket, m);
                    }
                    let c = Candidate::new(CandidateKind::Relayed, relayed, relayed, 65535);
                    self.add_local(c, true);
                    let ips: Vec<_> = self.remotes.iter().map(|r| r.addr.ip()).collect();
                    if let Some(t) = self.turn.as_mut() {
                        for ip in ips {
                            if !t.has_permission(ip) {
                                let _ = t.create_permission(now, ip);
                            }
                        }
                    }
                    for r in self.remotes.clone() {
                        self.add_pair(now, Via::Relay, &r);
                    }
                }
                turn::Event::AllocationLost(e) => {
                    self.end_relayed_pairs();
                    if self
                        .selected
                        .and_then(|i| self.pairs.get(i))
                        .is_some_and(|p| p.via == Via::Relay)
                    {
                        self.disconnect(DisconnectReason::RelayLost(e));
                    }
                }
                _ => {}
            }
        }
        if !self.turn_allocated_once
            && self
                .turn
                .as_ref()
                .is_some_and(|t| t.state() == AllocationState::Failed)
            && self.turn_index + 1 < self.turn_order.len()
        {
            self.turn_failover(now);
            return;
        }
        if let Some(t) = self.turn.as_mut() {
            while let Some(tx) = t.poll_transmit() {
                self.transmits.push_back(Transmit {
                    socket: self.turn_socket,
                    to: if tx.destination == server {
                        server
                    } else {
                        tx.destination
                    },
                    payload: tx.payload,
                });
            }
        }
        self.check_gathering_complete();
    }

    // -----------------------------------------------------------------------------------------
    // Pairs and checks

    /// The local vias remote candidates pair with: every socket of the same family (unless
    /// relay-only), and the relay once allocated.
    fn pairing_vias(&self) -> Vec<Via> {
        let mut v: Vec<Via> = if self.cfg.relay_only {
            Vec::new()
        } else {
            (0..self.sockets.len()).map(Via::Socket).collect()
        };
        if self.relayed_addr().is_some() {
            v.push(Via::Relay);
        }
        v
    }

    fn relayed_addr(&self) -> Option<SocketAddr> {
        self.turn
            .as_ref()
            .filter(|t| t.state() == AllocationState::Allocated)
            .and_then(|t| t.relayed_addr())
    }

    fn via_addr_priority(&self, via: Via) -> Option<(SocketAddr, u32)> {
        match via {
            Via::Socket(i) => self
                .sockets
                .get(i)
                .map(|a| (*a, candidate_priority(TYPE_PREF_HOST, local_pref(i), 1))),
            Via::Relay => self
                .relayed_addr()
                .map(|a| (a, candidate_priority(TYPE_PREF_RELAYED, 65535, 1))),
        }
    }

    fn compute_priority(&self, local: u32, remote: u32) -> u64 {
        match self.role {
            Role::Controlling => pair_priority(local, remote),
            Role::Controlled => pair_priority(remote, local),
        }
    }

    /// Adds the pair (via, remote) unless present; returns its index.
    fn add_pair(&mut self, now: Instant, via: Via, r: &Candidate) -> Option<usize> {
        if let Some(i) = self
            .pairs
            .iter()
            .position(|p| p.via == via && p.remote == r.addr)
        {
            return Some(i);
        }
        if self.cfg.relay_only && via != Via::Relay {
            return None;
        }
        let (local_addr, local_priority) = self.via_addr_priority(via)?;
        if local_addr.is_ipv4() != r.addr.is_ipv4() {
            return None;
        }
        // Never check from our relay towards our own relayed address.
        if via == Via::Relay && r.addr == local_addr {
            return None;
        }
        self.pairs.push(Pair {
            via,
            local_addr,
            local_priority,
            remote: r.addr,
            remote_priority: r.priority,
            remote_kind: r.kind,
            priority: self.compute_priority(local_priority, r.priority),
            state: PairState::Waiting,
            nominated: false,
            created_at: now,
            started_at: self.remote_creds.as_ref().map(|_| now),
            next_check_at: self.remote_creds.as_ref().map(|_| now),
            last_sent: None,
            interval: self.cfg.check_interval,
            extra: 0,
            extra_given: false,
            last_rx: None,
            rtt: None,
        });
        if self.remote_creds.is_some() && self.checks_started_at.is_none() {
            self.checks_started_at = Some(now);
        }
        Some(self.pairs.len() - 1)
    }

    fn pair_timers(&mut self, now: Instant) {
        if self.remote_creds.is_none() || self.dead {
            return;
        }
        if self.checks_started_at.is_none() && !self.pairs.is_empty() {
            self.checks_started_at = Some(now);
        }
        for i in 0..self.pairs.len() {
            if self.pairs[i].next_check_at.is_some() && self.pairs[i].started_at.is_none() {
                self.pairs[i].started_at = Some(now);
            }
            let p = &self.pairs[i];
            let Some(at) = p.next_check_at else { continue };
            if at > now || p.state == PairState::Failed {
                continue;
            }
            if p.state != PairState::Succeeded
                && p.started_at
                    .is_some_and(|s| now.saturating_duration_since(s) >= self.cfg.pair_timeout)
            {
                let p = &mut self.pairs[i];
                p.state = PairState::Failed;
                p.next_check_at = None;
                continue;
            }
            if p.state == PairState::Succeeded && p.extra == 0 {
                self.pairs[i].next_check_at = None;
                continue;
            }
            // Checks through our relay wait until the server has the peer's permission.
            if p.via == Via::Relay {
                let ip = p.remote.ip();
                let ready = self.turn.as_ref().is_some_and(|t| t.has_permission(ip));
                if !ready {
                    if let Some(t) = self.turn.as_mut()
                        && t.state() == AllocationState::Allocated
                        && !t.has_permission(ip)
                    {
                        let _ = t.create_permission(now, ip);
                    }
                    self.drain_turn(now);
                    self.pairs[i].next_check_at = Some(now + self.cfg.check_interval);
                    continue;
                }
            }
            self.send_check(now, i, false);
            let max = self.cfg.max_check_interval;
            let ci = self.cfg.check_interval;
            let p = &mut self.pairs[i];
            if p.state == PairState::Waiting {
                p.state = PairState::InProgress;
            }
            if p.extra > 0 {
                p.extra -= 1;
                p.next_check_at = Some(now + ci);
            } else if p.state == PairState::Succeeded {
                p.next_check_at = None;
            } else {
                p.next_check_at = Some(now + p.interval);
                p.interval = (p.interval * 3 / 2).min(max);
            }
        }
    }

    /// Sends one check on pair `i` (consent: a check on the selected pair without
    /// USE-CANDIDATE).
    fn send_check(&mut self, now: Instant, i: usize, consent: bool) {
        let Some((rufrag, rpwd)) = self.remote_creds.clone() else {
            return;
        };
        let Some(p) = self.pairs.get(i) else { return };
        let (via, remote) = (p.via, p.remote);
        let prflx_priority = match via {
            Via::Socket(s) => candidate_priority(TYPE_PREF_PEER_REFLEXIVE, local_pref(s), 1),
            Via::Relay => p.local_priority,
        };
        let use_candidate = self.role == Role::Controlling && !consent;
        let tid = TransactionId::random(&mut self.rng);
        let username = format!("{rufrag}:{}", self.cfg.local_ufrag);
        let role = self.role;
        let tie = self.tie_breaker;
        let built = build_stun(MessageType::BINDING_REQUEST, tid, |b| {
            b.add(&Username(&username))?;
            b.add(&Priority(prflx_priority))?;
            match role {
                Role::Controlling => b.add(&IceControlling(tie))?,
                Role::Controlled => b.add(&IceControlled(tie))?,
            }
            if use_candidate {
                b.add(&UseCandidate)?;
            }
            b.add_integrity(short_term_key(&rpwd))?;
            b.add_fingerprint()
        });
        let Ok(payload) = built else {
            self.stats.send_errors += 1;
            return;
        };
        if self.txns.len() >= MAX_TXNS {
            // Forget the oldest: a check that old has long been retransmitted anyway.
            if let Some(oldest) = self
                .txns
                .iter()
                .min_by_key(|(_, t)| t.sent_at)
                .map(|(k, _)| *k)
            {
                self.txns.remove(&oldest);
            }
        }
        self.txns.insert(
            tid,
            Txn {
                pair: i,
                sent_at: now,
                use_candidate,
                role,
            },
        );
        self.stats.checks_sent += 1;
        if consent {
            self.stats.consent_checks_sent += 1;
        }
        self.pairs[i].last_sent = Some(now);
        self.emit(now, via, remote, payload);
    }

    /// Queues `payload` to `to` on `via` (wrapping it for the relay).
    fn emit(&mut self, now: Instant, via: Via, to: SocketAddr, payload: Vec<u8>) {
        match via {
            Via::Socket(socket) => self.transmits.push_back(Transmit {
                socket,
                to,
                payload,
            }),
            Via::Relay => {
                let Some(t) = self.turn.as_mut() else {
                    self.stats.send_errors += 1;
                    return;
                };
                let mut buf = vec![0u8; payload.len() + TURN_OVERHEAD];
                let mut res = t.encode_data(to, &payload, &mut buf);
                if matches!(res, Err(turn::TurnError::NoPermission(_))) {
                    let _ = t.create_permission(now, to.ip());
                    res = t.encode_data(to, &payload, &mut buf);
                }
                match res {
                    Ok(n) => {
                        buf.truncate(n);
                        let server = t.config().server;
                        self.transmits.push_back(Transmit {
                            socket: self.turn_socket,
                            to: server,
                            payload: buf,
                        });
                    }
                    Err(_) => self.stats.send_errors += 1,
                }
                self.drain_turn(now);
            }
        }
    }

    fn handle_inner<'a>(
        &mut self,
        now: Instant,
        via: Via,
        from: SocketAddr,
        data: &'a [u8],
    ) -> Option<AppData<'a>> {
        match data.first() {
            Some(0..=3) => {
                self.handle_stun(now, via, from, data);
                None
            }
            // Media (128-191) and QUIC (64-127, 192-255): ChannelData only comes from the
            // TURN server and was handled before.
            Some(64..=255) => {
                let pair = self
                    .pairs
                    .iter()
                    .position(|p| p.via == via && p.remote == from);
                let path = match pair {
                    Some(i) => {
                        if self.role == Role::Controlled {
                            self.follow_peer(now, i);
                        }
                        self.pairs[i].kind()
                    }
                    None if self
                        .previous
                        .is_some_and(|(s, r)| via == Via::Socket(s) && r == from) =>
                    {
                        PathKind::Direct
                    }
                    None => {
                        self.stats.app_dropped += 1;
                        return None;
                    }
                };
                self.stats.app_received += 1;
                Some(AppData::Payload {
                    data: Cow::Borrowed(data),
                    path,
                })
            }
            _ => {
                self.stats.malformed += 1;
                None
            }
        }
    }

    fn handle_stun(&mut self, now: Instant, via: Via, from: SocketAddr, data: &[u8]) {
        if let Via::Socket(s) = via
            && self.try_gather_response(s, from, data)
        {
            return;
        }
        let Ok(msg) = Message::parse(data) else {
            self.stats.malformed += 1;
            return;
        };
        if msg.method() != Method::BINDING {
            self.stats.malformed += 1;
            return;
        }
        match msg.class() {
            Class::Request => self.handle_request(now, via, from, &msg),
            Class::Success | Class::Error => self.handle_response(now, via, from, &msg),
            // Binding indications are keepalives: nothing to do.
            Class::Indication => {}
        }
    }

    fn handle_request(&mut self, now: Instant, via: Via, from: SocketAddr, msg: &Message<'_>) {
        let Some(Ok(Username(user))) = msg.get::<Username>() else {
            self.stats.malformed += 1;
            return;
        };
        let Some((ours, theirs)) = user.split_once(':') else {
            self.stats.malformed += 1;
            return;
        };
        if ours != self.cfg.local_ufrag
            || self.remote_creds.as_ref().is_some_and(|(u, _)| u != theirs)
        {
            self.stats.wrong_username += 1;
            return;
        }
        if msg
            .verify_integrity(short_term_key(&self.cfg.local_pwd))
            .is_err()
        {
            self.stats.integrity_failures += 1;
            return;
        }
        let Some(Ok(Priority(prio))) = msg.get::<Priority>() else {
            self.stats.malformed += 1;
            return;
        };
        self.stats.checks_received += 1;
        let their_controlling = msg.get::<IceControlling>().and_then(Result::ok);
        let their_controlled = msg.get::<IceControlled>().and_then(Result::ok);
        match (self.role, their_controlling, their_controlled) {
            (Role::Controlling, Some(IceControlling(t)), _) => {
                self.stats.role_conflicts += 1;
                if self.tie_breaker >= t {
                    self.respond_error(now, via, from, msg, 487);
                    return;
                }
                self.switch_role(now, Role::Controlled);
            }
            (Role::Controlled, _, Some(IceControlled(t))) => {
                self.stats.role_conflicts += 1;
                if self.tie_breaker >= t {
                    self.switch_role(now, Role::Controlling);
                } else {
                    self.respond_error(now, via, from, msg, 487);
                    return;
                }
            }
            _ => {}
        }
        // Answer first: the peer's pair validates on our response.
        let pwd = self.cfg.local_pwd.clone();
        let resp = build_stun(MessageType::BINDING_SUCCESS, msg.transaction_id(), |b| {
            b.add(&XorMappedAddress(from))?;
            b.add_integrity(short_term_key(&pwd))?;
            b.add_fingerprint()
        });
        match resp {
            Ok(r) => self.emit(now, via, from, r),
            Err(_) => self.stats.send_errors += 1,
        }
        if self.dead {
            return;
        }
        // Learn a peer-reflexive remote candidate if the source is new.
        let remote = match self.remotes.iter().find(|r| r.addr == from) {
            Some(r) => r.clone(),
            None => {
                if self.remotes.len() >= MAX_REMOTE_CANDIDATES {
                    return;
                }
                // PRIORITY is what the sender's candidate would have: type preference 0 means
                // it sent through its relay, so the path is a relayed one.
                let kind = if prio >> 24 == u32::from(TYPE_PREF_RELAYED) {
                    CandidateKind::Relayed
                } else {
                    CandidateKind::PeerReflexive
                };
                let mut c = Candidate::new(kind, from, from, 0);
                c.priority = prio;
                self.remotes.push(c.clone());
                self.stats.peer_reflexive_learned += 1;
                c
            }
        };
        let Some(i) = self.add_pair(now, via, &remote) else {
            return;
        };
        let use_candidate = msg.get::<UseCandidate>().is_some();
        let extra = self.cfg.extra_checks;
        let creds = self.remote_creds.is_some();
        let p = &mut self.pairs[i];
        p.last_rx = Some(now);
        if use_candidate && self.role == Role::Controlled {
            p.nominated = true;
        }
        if p.state == PairState::Failed {
            p.state = PairState::Waiting;
            p.started_at = Some(now);
            p.interval = self.cfg.check_interval;
        }
        if !p.extra_given {
            p.extra_given = true;
            p.extra = p.extra.max(extra);
        }
        // Triggered check.
        if p.state != PairState::Succeeded || p.extra > 0 {
            let recently = p
                .last_sent
                .is_some_and(|t| now.saturating_duration_since(t) < TRIGGER_HOLDOFF);
            let at = if recently { now + TRIGGER_HOLDOFF } else { now };
            p.next_check_at = Some(p.next_check_at.map_or(at, |n| n.min(at)));
        }
        if creds && self.checks_started_at.is_none() {
            self.checks_started_at = Some(now);
        }
        if creds {
            self.pair_timers(now);
        }
        self.update_selection(now);
    }

    fn respond_error(
        &mut self,
        now: Instant,
        via: Via,
        from: SocketAddr,
        msg: &Message<'_>,
        code: u16,
    ) {
        let pwd = self.cfg.local_pwd.clone();
        let resp = build_stun(MessageType::BINDING_ERROR, msg.transaction_id(), |b| {
            b.add(&ErrorCode::new(code))?;
            b.add_integrity(short_term_key(&pwd))?;
            b.add_fingerprint()
        });
        match resp {
            Ok(r) => self.emit(now, via, from, r),
            Err(_) => self.stats.send_errors += 1,
        }
    }

    fn switch_role(&mut self, now: Instant, role: Role) {
        if self.role == role {
            return;
        }
        self.role = role;
        self.follow = Follow::default();
        self.stats.role_switches += 1;
        for i in 0..self.pairs.len() {
            let (l, r) = (self.pairs[i].local_priority, self.pairs[i].remote_priority);
            let prio = self.compute_priority(l, r);
            let p = &mut self.pairs[i];
            p.priority = prio;
            p.nominated = false;
            if p.state != PairState::Failed {
                // Recheck so nominations follow the new roles.
                p.extra = p.extra.max(1);
                p.next_check_at = Some(now);
            }
        }
    }

    fn handle_response(&mut self, now: Instant, via: Via, from: SocketAddr, msg: &Message<'_>) {
        let tid = msg.transaction_id();
        let Some(txn) = self.txns.get(&tid).copied() else {
            self.stats.unmatched_responses += 1;
            return;
        };
        let Some((_, rpwd)) = self.remote_creds.as_ref() else {
            self.stats.unmatched_responses += 1;
            return;
        };
        if msg.verify_integrity(short_term_key(rpwd)).is_err() {
            self.stats.integrity_failures += 1;
            return;
        }
        let Some(p) = self.pairs.get(txn.pair) else {
            self.txns.remove(&tid);
            return;
        };
        if p.via != via || p.remote != from {
            self.stats.asymmetric_responses += 1;
            return;
        }
        self.txns.remove(&tid);
        if msg.class() == Class::Error {
            if let Some(Ok(e)) = msg.get::<ErrorCode>()
                && e.code == 487
            {
                self.stats.role_conflicts += 1;
                if self.role == txn.role {
                    self.switch_role(now, txn.role.opposite());
                }
                let p = &mut self.pairs[txn.pair];
                p.next_check_at = Some(now);
            }
            return;
        }
        self.stats.responses_received += 1;
        let extra = self.cfg.extra_checks;
        let role = self.role;
        let p = &mut self.pairs[txn.pair];
        p.rtt = Some(now.saturating_duration_since(txn.sent_at));
        p.last_rx = Some(now);
        if p.state != PairState::Succeeded {
            p.state = PairState::Succeeded;
            if !p.extra_given {
                p.extra_given = true;
                p.extra = extra;
                p.next_check_at = Some(now + self.cfg.check_interval);
            }
        }
        if txn.use_candidate && role == Role::Controlling {
            p.nominated = true;
        }
        if let Via::Socket(s) = via
            && let Some(Ok(XorMappedAddress(mapped))) = msg.get::<XorMappedAddress>()
            && !self.locals.iter().any(|l| l.cand.addr == mapped)
            && let Some(&base) = self.sockets.get(s)
        {
            let c = Candidate::new(CandidateKind::PeerReflexive, mapped, base, local_pref(s));
            self.add_local(c, false);
            self.stats.peer_reflexive_learned += 1;
        }
        self.update_selection(now);
    }

    // -----------------------------------------------------------------------------------------
    // Selection, consent

    fn relay_allowed(&self, now: Instant) -> bool {
        let window = self
            .checks_started_at
            .is_some_and(|s| now.saturating_duration_since(s) >= self.cfg.relay_fallback_after);
        let direct_hopeless = self.remote_done
            && self
                .pairs
                .iter()
                .filter(|p| p.kind() == PathKind::Direct)
                .all(|p| p.state == PairState::Failed);
        window || direct_hopeless
    }

    /// Controlled side: application data from the controlling side arrived on pair `i`.
    fn follow_peer(&mut self, now: Instant, i: usize) {
        let f = &mut self.follow;
        if f.chosen == Some(i) || (f.chosen.is_none() && self.selected == Some(i)) {
            f.pair = None;
            f.count = 0;
            return;
        }
        if f.pair == Some(i) {
            f.count += 1;
        } else {
            f.pair = Some(i);
            f.count = 1;
        }
        if f.count >= FOLLOW_AFTER {
            f.chosen = Some(i);
            f.pair = None;
            f.count = 0;
            self.update_selection(now);
        }
    }

    /// Whether pair `i` may be selected: valid, nominated, and direct unless relays are allowed.
    fn selectable(&self, i: usize, relay_ok: bool) -> bool {
        self.pairs.get(i).is_some_and(|p| {
            p.state == PairState::Succeeded
                && p.nominated
                && (relay_ok || p.kind() == PathKind::Direct)
        })
    }

    fn update_selection(&mut self, now: Instant) {
        if self.dead {
            return;
        }
        let relay_ok = self.relay_allowed(now);
        // The controlling side's path, if it is one we may use; else our own ranking.
        let followed = self.follow.chosen.filter(|&c| self.selectable(c, relay_ok));
        let best = followed.or_else(|| {
            (0..self.pairs.len())
                .filter(|&i| self.selectable(i, relay_ok))
                .max_by_key(|&i| self.pairs[i].key())
        });
        let Some(b) = best else { return };
        let better = match self.selected {
            None => true,
            Some(s) => s != b && (followed == Some(b) || self.pairs[b].key() > self.pairs[s].key()),
        };
        if !better {
            return;
        }
        self.selected = Some(b);
        self.selected_at = Some(now);
        self.previous = None;
        self.next_consent_at = Some(now + self.cfg.keepalive_interval);
        let p = self.pairs[b].clone();
        if p.via == Via::Relay
            && let Some(t) = self.turn.as_mut()
            && t.channel_for(p.remote).is_none()
        {
            let _ = t.bind_channel(now, p.remote);
            self.drain_turn(now);
        }
        if p.kind() == PathKind::Direct {
            // Nothing pending below a selected direct pair can win any more: stop its checks.
            for q in self.pairs.iter_mut() {
                if q.state != PairState::Succeeded && q.key() < p.key() {
                    q.state = PairState::Failed;
                    q.next_check_at = None;
                }
            }
        }
        let path = SelectedPath {
            kind: p.kind(),
            local: p.local_addr,
            remote: p.remote,
            rtt: p.rtt,
        };
        if self.connected_once {
            self.stats.path_changes += 1;
            self.events.push_back(Event::PathChanged { path });
        } else {
            self.connected_once = true;
            self.stats.time_to_connected = self
                .checks_started_at
                .map(|s| now.saturating_duration_since(s));
            self.events.push_back(Event::Connected { path });
        }
    }

    fn consent_timers(&mut self, now: Instant) {
        let Some(s) = self.selected else { return };
        let Some(p) = self.pairs.get(s) else { return };
        let last = p_last(p).unwrap_or(now);
        if now.saturating_duration_since(last) >= self.cfg.consent_timeout {
            self.disconnect(DisconnectReason::ConsentExpired);
            return;
        }
        if self.next_consent_at.is_some_and(|t| t <= now) {
            self.send_check(now, s, true);
            let silent = now.saturating_duration_since(last) >= self.cfg.keepalive_interval;
            let every = if silent {
                self.cfg.keepalive_interval / 4
            } else {
                self.cfg.keepalive_interval
            };
            self.next_consent_at = Some(now + every);
        }
    }

    fn disconnect(&mut self, reason: DisconnectReason) {
        if self.dead {
            return;
        }
        self.dead = true;
        self.selected = None;
        self.previous = None;
        self.next_consent_at = None;
        for p in &mut self.pairs {
            p.next_check_at = None;
        }
        self.events.push_back(Event::Disconnected { reason });
    }

    fn check_no_path(&mut self) {
        if self.dead
            || self.connected_once
            || !self.remote_done
            || self.remote_creds.is_none()
            || self.pairs.is_empty()
            || !self.gathering_reported
        {
            return;
        }
        if self.pairs.iter().all(|p| p.state == PairState::Failed) {
            self.disconnect(DisconnectReason::NoPath);
        }
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

/// Local preference of socket `i`: earlier sockets are preferred.
fn local_pref(i: usize) -> u16 {
    65535u16.saturating_sub(u16::try_from(i).unwrap_or(u16::MAX))
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
