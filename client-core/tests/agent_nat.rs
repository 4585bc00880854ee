//! Deterministic NAT harness for the connectivity agent: a virtual clock, two agents behind
//! sans-IO fake NATs of the five RFC 4787 kinds, a fake STUN server, the REAL relay core
//! (`peerlink_relay::core::Core`, fake relayed sockets), per-link netsim delay/loss, and a
//! signaling channel with its own delay. Everything runs in-process in virtual time.
//!
//! Figures are printed (run with `--nocapture`); only behaviour is asserted.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use peerlink_client_core::agent::{
    Agent, AgentConfig, AppData, CandidateKind, DisconnectReason, Event, PathKind, Role,
    TurnConfig, TurnTransport,
};
use peerlink_client_core::netsim::{NetSim, NetSimConfig};
use peerlink_netlab::{ExpectedPath, NatKind, expected_path};
use peerlink_proto::attrs::XorMappedAddress;
use peerlink_proto::{Class, Message, MessageBuilder, MessageType, Method};
use peerlink_relay::core::{
    AddrFamily, AllocationId, Core, CoreConfig, HEADROOM, OpenError, Opened, Output, PortRequest,
    RelaySockets, SCRATCH_LEN, Shared, SocketRef, error_index,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const STUN_SERVER: &str = "198.51.100.200:3478";
const RELAY_IP: &str = "203.0.113.10";
const RELAY_LISTENER: &str = "203.0.113.10:3478";
const WAN: [&str; 2] = ["203.0.113.1", "198.51.100.1"];
const LAN: [&str; 2] = ["100.64.1.2:5000", "100.64.2.2:5000"];
const SECRET: &[u8] = b"relay-rest-secret";
const UNIX0: u64 = 1_800_000_000;
/// One-way delay of each access link (so peer-to-peer RTT = 4x this).
const LINK_DELAY: Duration = Duration::from_millis(15);
/// Signaling delivery delay.
const SIG_DELAY: Duration = Duration::from_millis(25);
/// Media packet interval once connected.
const MEDIA_EVERY: Duration = Duration::from_millis(20);

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

#[derive(Clone, Debug)]
struct Pkt {
    src: SocketAddr,
    dst: SocketAddr,
    data: Vec<u8>,
}

// ---------------------------------------------------------------------------------------------
// Fake NAT (RFC 4787 behaviours)

struct Mapping {
    internal: SocketAddr,
    /// Symmetric NATs map per destination.
    dest: Option<SocketAddr>,
    ext_port: u16,
    contacted: HashSet<SocketAddr>,
    last: Instant,
}

struct Nat {
    kind: NatKind,
    wan: IpAddr,
    maps: Vec<Mapping>,
    rng: ChaCha8Rng,
    next_port: u16,
    timeout: Duration,
}

impl Nat {
    fn new(kind: NatKind, wan: IpAddr, seed: u64, timeout: Duration) -> Self {
        Nat {
            kind,
            wan,
            maps: Vec::new(),
            rng: ChaCha8Rng::seed_from_u64(seed),
            next_port: 40_000,
            timeout,
        }
    }

    fn expire(&mut self, now: Instant) {
        let t = self.timeout;
        self.maps
            .retain(|m| now.saturating_duration_since(m.last) < t);
    }

    /// Translates an outgoing packet's source.
    fn outbound(&mut self, now: Instant, src: SocketAddr, dst: SocketAddr) -> SocketAddr {
        if self.kind == NatKind::Public {
            return src;
        }
        self.expire(now);
        let symmetric = self.kind == NatKind::Symmetric;
        let idx = self
            .maps
            .iter()
            .position(|m| m.internal == src && (!symmetric || m.dest == Some(dst)));
        let idx = match idx {
            Some(i) => i,
            None => {
                let port = if symmetric {
                    loop {
                        let p = self.rng.random_range(20_000..60_000u16);
                        if !self.maps.iter().any(|m| m.ext_port == p) {
                            break p;
                        }
                    }
                } else {
                    self.next_port += 1;
                    self.next_port
                };
                self.maps.push(Mapping {
                    internal: src,
                    dest: symmetric.then_some(dst),
                    ext_port: port,
                    contacted: HashSet::new(),
                    last: now,
                });
                self.maps.len() - 1
            }
        };
        let m = &mut self.maps[idx];
        m.contacted.insert(dst);
        m.last = now;
        SocketAddr::new(self.wan, m.ext_port)
    }

    /// Filters and translates an incoming packet; `None` = dropped.
    fn inbound(&mut self, now: Instant, from: SocketAddr, dst: SocketAddr) -> Option<SocketAddr> {
        if self.kind == NatKind::Public {
            return Some(dst);
        }
        self.expire(now);
        let kind = self.kind;
        let m = self.maps.iter_mut().find(|m| m.ext_port == dst.port())?;
        let allowed = match kind {
            NatKind::Public | NatKind::FullCone => true,
            NatKind::AddressRestricted => m.contacted.iter().any(|c| c.ip() == from.ip()),
            NatKind::PortRestricted | NatKind::Symmetric => m.contacted.contains(&from),
        };
        if allowed {
            m.last = now;
            Some(m.internal)
        } else {
            None
        }
    }

    /// Forgets every mapping (a NAT reboot / rebinding): the next packets get new ports.
    fn flush(&mut self) {
        self.maps.clear();
        self.next_port += 1000;
    }
}

// ---------------------------------------------------------------------------------------------
// The real relay core with fake relayed sockets

#[derive(Default)]
struct FakeRelaySockets {
    by_id: HashMap<AllocationId, SocketAddr>,
    next_port: u16,
}

impl RelaySockets for FakeRelaySockets {
    fn open(
        &mut self,
        id: AllocationId,
        family: AddrFamily,
        _port: PortRequest,
        _now: Instant,
    ) -> Result<Opened, OpenError> {
        if family != AddrFamily::V4 {
            return Err(OpenError::FamilyNotSupported);
        }
        self.next_port += 1;
        let addr = SocketAddr::new(RELAY_IP.parse().expect("ip"), 50_000 + self.next_port);
        self.by_id.insert(id, addr);
        Ok(Opened { addr, token: None })
    }
    fn close(&mut self, id: AllocationId) {
        self.by_id.remove(&id);
    }
}

// ---------------------------------------------------------------------------------------------
// World

#[derive(Clone, Debug)]
enum Sig {
    Creds(String, String),
    Candidate(peerlink_api::signaling::Candidate),
    EndOfCandidates,
}

struct Side {
    agent: Option<Agent>,
    start_at: Instant,
    lan: SocketAddr,
    nat: Nat,
    up: NetSim<Pkt>,
    down: NetSim<Pkt>,
    events: Vec<(Instant, Event)>,
    app_rx: Vec<(Instant, PathKind)>,
    /// Where the last application packet came from (for a relayed one: the relay).
    last_app_from: Option<SocketAddr>,
    next_media: Option<Instant>,
    generation: u32,
    cfg: AgentConfig,
}

#[derive(Clone)]
struct Scenario {
    kinds: [NatKind; 2],
    roles: [Role; 2],
    /// Start offset of each side from t0 (punch order and stagger).
    start: [Duration; 2],
    loss: f64,
    seed: u64,
    nat_timeout: Duration,
    relay_fallback_after: Duration,
    consent_timeout: Duration,
    /// Extra signaling delay of the candidates each side trickles.
    candidate_delay: [Duration; 2],
    with_turn: bool,
    /// Relay-only policy per side (only relayed candidates signaled and paired).
    relay_only: [bool; 2],
}

impl Scenario {
    fn new(a: NatKind, b: NatKind) -> Self {
        Scenario {
            kinds: [a, b],
            roles: [Role::Controlling, Role::Controlled],
            start: [Duration::ZERO, Duration::ZERO],
            loss: 0.0,
            seed: 1,
            nat_timeout: Duration::from_secs(30),
            relay_fallback_after: Duration::from_millis(600),
            consent_timeout: Duration::from_secs(5),
            candidate_delay: [Duration::ZERO; 2],
            with_turn: true,
            relay_only: [false; 2],
        }
    }
}

struct World {
    t0: Instant,
    now: Instant,
    sides: [Side; 2],
    relay: Core,
    relay_sockets: FakeRelaySockets,
    scratch: Vec<u8>,
    signaling: VecDeque<(Instant, usize, Sig)>,
    /// Direct traffic between the two WANs is dropped until then (None = never blocked).
    block_direct_until: Option<Instant>,
    /// Everything to/from side WANs is dropped while set (blackout).
    blackout: bool,
    /// Packets that went straight from one side's WAN to the other's (no relay between).
    wan_to_wan: u64,
    /// Restart both sides automatically on Disconnected (the app's behaviour).
    auto_restart: bool,
    /// When each restart was triggered.
    restarts: Vec<Instant>,
    answer_at: Option<Instant>,
    internet_drops: u64,
    /// Sides start sending media when they connect (off: only the agents' own traffic).
    media_on_connect: bool,
    relay_only: [bool; 2],
    candidate_delay: [Duration; 2],
}

impl World {
    fn new(sc: &Scenario) -> Self {
        let t0 = Instant::now();
        let mut cfg = CoreConfig::new(
            "peerlink.test",
            sa(RELAY_LISTENER),
            vec![RELAY_IP.parse().expect("ip")],
            [7; 32],
        );
        cfg.auth_secrets = vec![SECRET.to_vec()];
        cfg.port_range = 50_000..=50_999;
        cfg.allow_peers = vec![
            "203.0.113.0/24".parse().expect("net"),
            "198.51.100.0/24".parse().expect("net"),
        ];
        let shared = Arc::new(Shared::new(t0, UNIX0));
        let relay = Core::new(Arc::new(cfg), shared, sc.seed);
        let mk_side = |i: usize| {
            let wan: IpAddr = WAN[i].parse().expect("ip");
            let lan = if sc.kinds[i] == NatKind::Public {
                SocketAddr::new(wan, 5000)
            } else {
                sa(LAN[i])
            };
            let link = |salt: u64| {
                NetSim::new(NetSimConfig {
                    seed: sc.seed * 1000 + i as u64 * 10 + salt,
                    delay: LINK_DELAY,
                    loss: sc.loss,
                    ..NetSimConfig::default()
                })
            };
            let mut cfg = AgentConfig::new(
                sc.roles[i],
                format!("uf{i}g0"),
                format!("password-of-side-{i}-generation-0"),
                sc.seed * 100 + i as u64,
            );
            cfg.stun_server = Some(sa(STUN_SERVER));
            cfg.relay_fallback_after = sc.relay_fallback_after;
            cfg.consent_timeout = sc.consent_timeout;
            cfg.relay_only = sc.relay_only[i];
            if sc.with_turn {
                let (username, password) = peerlink_proto::auth::rest::credentials(
                    SECRET,
                    if i == 0 { "alice" } else { "bob" },
                    UNIX0,
                    24 * 3600,
                );
                cfg.turn = Some(TurnConfig {
                    server: sa(RELAY_LISTENER),
                    transport: TurnTransport::Udp,
                    username,
                    password,
                });
            }
            Side {
                agent: None,
                start_at: t0 + sc.start[i],
                lan,
                nat: Nat::new(sc.kinds[i], wan, sc.seed * 7 + i as u64, sc.nat_timeout),
                up: link(1),
                down: link(2),
                events: Vec::new(),
                app_rx: Vec::new(),
                last_app_from: None,
                next_media: None,
                generation: 0,
                cfg,
            }
        };
        World {
            t0,
            now: t0,
            sides: [mk_side(0), mk_side(1)],
            relay,
            relay_sockets: FakeRelaySockets::default(),
            scratch: vec![0u8; SCRATCH_LEN],
            signaling: VecDeque::new(),
            block_direct_until: None,
            blackout: false,
            wan_to_wan: 0,
            auto_restart: false,
            restarts: Vec::new(),
            answer_at: None,
            internet_drops: 0,
            media_on_connect: true,
            candidate_delay: sc.candidate_delay,
            relay_only: sc.relay_only,
        }
    }

    fn agent(&self, i: usize) -> &Agent {
        self.sides[i].agent.as_ref().expect("side started")
    }

    fn agent_mut(&mut self, i: usize) -> &mut Agent {
        self.sides[i].agent.as_mut().expect("side started")
    }

    fn send_sig(&mut self, to: usize, sig: Sig) {
        let at = self.now + SIG_DELAY;
        self.signaling.push_back((at, to, sig));
    }

    /// Starts side `i`: creates its agent; the later of the two sides also completes the
    /// offer/answer (credentials both ways).
    fn start_side(&mut self, i: usize) {
        let now = self.now;
        let s = &mut self.sides[i];
        let agent = Agent::new(s.cfg.clone(), &[s.lan], now);
        s.agent = Some(agent);
        let other = 1 - i;
        if self.sides[other].agent.is_some() {
            // Both exist: exchange credentials (offer/answer through signaling).
            for k in [0, 1] {
                let (u, p) = {
                    let (u, p) = self.agent(k).local_credentials();
                    (u.to_owned(), p.to_owned())
                };
                self.send_sig(1 - k, Sig::Creds(u, p));
            }
            self.answer_at = Some(now + SIG_DELAY);
        }
    }

    /// Restarts both agents with new credentials (the app does this through signaling).
    fn restart_both(&mut self) {
        let now = self.now;
        self.restarts.push(now);
        self.signaling.clear();
        for i in 0..2 {
            let s = &mut self.sides[i];
            s.generation += 1;
            s.next_media = None;
            let g = s.generation;
            if let Some(a) = s.agent.as_mut() {
                a.restart(
                    now,
                    (
                        format!("uf{i}g{g}"),
                        format!("password-of-side-{i}-generation-{g}"),
                    ),
                );
            }
        }
        for k in [0, 1] {
            let (u, p) = {
                let (u, p) = self.agent(k).local_credentials();
                (u.to_owned(), p.to_owned())
            };
            self.send_sig(1 - k, Sig::Creds(u, p));
        }
        // The local candidates were re-announced as events; they trickle in `drain`.
    }

    fn next_time(&self) -> Option<Instant> {
        let mut t: Vec<Instant> = Vec::new();
        for s in &self.sides {
            match &s.agent {
                None => t.push(s.start_at),
                Some(a) => {
                    t.extend(a.poll_timeout());
                    t.extend(s.next_media);
                }
            }
            t.extend(s.up.poll_timeout());
            t.extend(s.down.poll_timeout());
        }
        t.extend(self.relay.poll_timeout());
        t.extend(self.signaling.iter().map(|(at, _, _)| *at).min());
        if let Some(b) = self.block_direct_until
            && b > self.now
        {
            t.push(b);
        }
        t.into_iter().min()
    }

    /// Runs the world until `until` (virtual).
    fn run_until(&mut self, until: Instant) {
        let mut guard = 0u64;
        loop {
            guard += 1;
            assert!(guard < 5_000_000, "harness loop bound exceeded");
            self.process_now();
            let Some(next) = self.next_time() else { break };
            let next = next.max(self.now);
            if next > until {
                break;
            }
            if next == self.now {
                // Something is due now that process_now did not consume: make progress.
                self.process_now();
                let again = self.next_time().map(|n| n.max(self.now));
                if again == Some(self.now) {
                    self.now += Duration::from_micros(100);
                }
                continue;
            }
            self.now = next;
        }
        self.now = self.now.max(until);
        self.process_now();
    }

    fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        self.run_until(until);
    }

    fn process_now(&mut self) {
        let now = self.now;
        for i in 0..2 {
            if self.sides[i].agent.is_none() && self.sides[i].start_at <= now {
                self.start_side(i);
            }
        }
        // Signaling.
        // In time order (per-side delays differ), FIFO among equal times.
        while let Some(pos) = self
            .signaling
            .iter()
            .enumerate()
            .filter(|(_, (at, to, _))| *at <= now && self.sides[*to].agent.is_some())
            .min_by_key(|(k, (at, _, _))| (*at, *k))
            .map(|(k, _)| k)
        {
            let (_, to, sig) = self.signaling.remove(pos).expect("position is valid");
            let a = self.agent_mut(to);
            match sig {
                Sig::Creds(u, p) => a.set_remote_credentials(&u, &p),
                Sig::Candidate(c) => {
                    let c = peerlink_client_core::agent::Candidate::try_from(&c)
                        .expect("valid candidate");
                    a.add_remote_candidate(c, now);
                }
                Sig::EndOfCandidates => a.end_of_remote_candidates(),
            }
        }
        // Network.
        for i in 0..2 {
            while let Some(p) = self.sides[i].up.poll(now) {
                self.internet(p, 0);
            }
            while let Some(p) = self.sides[i].down.poll(now) {
                self.deliver(i, p);
            }
        }
        // Relay timers.
        if self.relay.poll_timeout().is_some_and(|t| t <= now) {
            self.relay.handle_timeout(now, &mut self.relay_sockets);
        }
        // Agent timers, media, outputs.
        for i in 0..2 {
            let Some(a) = self.sides[i].agent.as_mut() else {
                continue;
            };
            if a.poll_timeout().is_some_and(|t| t <= now) {
                a.handle_timeout(now);
            }
            if let Some(m) = self.sides[i].next_media
                && m <= now
            {
                let a = self.sides[i].agent.as_mut().expect("started");
                if let Ok(Some(t)) = a.send(now, &[0x80, 0x60, 0, 1, 2, 3, 4, 5]) {
                    self.outbound(i, t);
                }
                self.sides[i].next_media = Some(now + MEDIA_EVERY);
            }
            self.drain(i);
        }
    }

    fn drain(&mut self, i: usize) {
        let now = self.now;
        loop {
            let Some(a) = self.sides[i].agent.as_mut() else {
                return;
            };
            if let Some(t) = a.poll_transmit() {
                self.outbound(i, t);
                continue;
            }
            let Some(ev) = a.poll_event() else { break };
            match &ev {
                Event::LocalCandidate(c)
                    if self.relay_only[i] && c.kind != CandidateKind::Relayed => {}
                Event::LocalCandidate(c) => {
                    let sc = peerlink_api::signaling::Candidate::from(c);
                    let at = now + SIG_DELAY + self.candidate_delay[i];
                    self.signaling.push_back((at, 1 - i, Sig::Candidate(sc)));
                }
                Event::GatheringComplete => {
                    let at = now + SIG_DELAY + self.candidate_delay[i];
                    self.signaling.push_back((at, 1 - i, Sig::EndOfCandidates));
                }
                Event::Connected { .. } if self.media_on_connect => {
                    self.sides[i].next_media.get_or_insert(now);
                }
                Event::Disconnected { .. } => {
                    self.sides[i].next_media = None;
                }
                _ => {}
            }
            let disconnected = matches!(ev, Event::Disconnected { .. });
            self.sides[i].events.push((now, ev));
            if disconnected && self.auto_restart {
                self.restart_both();
            }
        }
    }

    fn outbound(&mut self, i: usize, t: peerlink_client_core::agent::Transmit) {
        let now = self.now;
        let s = &mut self.sides[i];
        assert_eq!(t.socket, 0, "one socket per agent here");
        let src = s.nat.outbound(now, s.lan, t.to);
        s.up.push(
            now,
            Pkt {
                src,
                dst: t.to,
                data: t.payload,
            },
        );
    }

    fn side_of_wan(&self, ip: IpAddr) -> Option<usize> {
        (0..2).find(|&i| self.sides[i].nat.wan == ip)
    }

    /// A packet on the internet (after the sender's access link).
    fn internet(&mut self, p: Pkt, depth: u32) {
        assert!(depth < 8, "routing loop");
        let now = self.now;
        let src_side = self.side_of_wan(p.src.ip());
        let dst_side = self.side_of_wan(p.dst.ip());
        if self.blackout && (src_side.is_some() || dst_side.is_some()) {
            self.internet_drops += 1;
            return;
        }
        if src_side.is_some() && dst_side.is_some() {
            self.wan_to_wan += 1;
        }
        if src_side.is_some()
            && dst_side.is_some()
            && self.block_direct_until.is_some_and(|b| now < b)
        {
            self.internet_drops += 1;
            return;
        }
        if p.dst == sa(STUN_SERVER) {
            if let Some(r) = stun_answer(&p) {
                self.internet(r, depth + 1);
            }
            return;
        }
        let listener = sa(RELAY_LISTENER);
        let relayed_id = self
            .relay_sockets
            .by_id
            .iter()
            .find(|(_, a)| **a == p.dst)
            .map(|(id, _)| *id);
        if p.dst == listener || relayed_id.is_some() {
            let mut buf = vec![0u8; HEADROOM + p.data.len()];
            buf[HEADROOM..].copy_from_slice(&p.data);
            let out = match relayed_id {
                None => self.relay.handle_listener(
                    now,
                    p.src,
                    &mut buf,
                    p.data.len(),
                    &mut self.scratch,
                    &mut self.relay_sockets,
                ),
                Some(id) => self.relay.handle_relayed(
                    now,
                    id,
                    p.src,
                    &mut buf,
                    p.data.len(),
                    &mut self.scratch,
                ),
            };
            let from_addr = |r: &SocketRef, socks: &FakeRelaySockets| match r {
                SocketRef::Listener => Some(listener),
                SocketRef::Relayed(id) => socks.by_id.get(id).copied(),
            };
            match out {
                Output::Forward { from, to, range } => {
                    if let Some(src) = from_addr(&from, &self.relay_sockets) {
                        let data = buf[range].to_vec();
                        self.internet(Pkt { src, dst: to, data }, depth + 1);
                    }
                }
                Output::Reply { from, to, len, .. } => {
                    if let Some(src) = from_addr(&from, &self.relay_sockets) {
                        let data = self.scratch[..len].to_vec();
                        self.internet(Pkt { src, dst: to, data }, depth + 1);
                    }
                }
                Output::Drop(_) => {}
            }
            return;
        }
        match dst_side {
            Some(j) => self.sides[j].down.push(now, p),
            None => self.internet_drops += 1, // private or unknown address: nowhere to go
        }
    }

    /// A packet reached side `j`'s NAT from the internet.
    fn deliver(&mut self, j: usize, p: Pkt) {
        let now = self.now;
        let Some(lan) = self.sides[j].nat.inbound(now, p.src, p.dst) else {
            return;
        };
        if lan != self.sides[j].lan {
            return;
        }
        let Some(a) = self.sides[j].agent.as_mut() else {
            return;
        };
        if let Some(AppData::Payload { path, .. }) = a.handle_datagram(now, 0, p.src, &p.data) {
            self.sides[j].app_rx.push((now, path));
            self.sides[j].last_app_from = Some(p.src);
        }
        self.drain(j);
    }

    /// The relayed address side `i`'s selected path goes through: its own (when it sends
    /// through its relay) or the peer's (when it sends to it); `None` for a direct path.
    fn relayed_in_use(&self, i: usize) -> Option<SocketAddr> {
        let path = self.agent(i).selected_path()?;
        if path.kind != PathKind::Relay {
            return None;
        }
        let own = self.agent(i).local_candidates().iter().any(|c| {
            c.kind == peerlink_client_core::agent::CandidateKind::Relayed && c.addr == path.local
        });
        Some(if own { path.local } else { path.remote })
    }

    /// Both sides send on the same pair: through the same relayed address, or both directly,
    /// each to the address the other's media comes from.
    fn assert_same_path(&self) {
        let relayed = self.relayed_in_use(0);
        assert_eq!(
            relayed,
            self.relayed_in_use(1),
            "the two sides send on different pairs: {:?} / {:?}",
            self.agent(0).selected_path(),
            self.agent(1).selected_path()
        );
        if relayed.is_none() {
            for i in 0..2 {
                let path = self.agent(i).selected_path().expect("a selected path");
                assert_eq!(
                    Some(path.remote),
                    self.sides[i].last_app_from,
                    "side {i} sends directly to {} but the peer's media comes from elsewhere",
                    path.remote
                );
            }
        }
    }

    /// The path kinds of the media side `i` received in the last second.
    fn recent_media(&self, i: usize) -> Vec<PathKind> {
        self.sides[i]
            .app_rx
            .iter()
            .filter(|(t, _)| *t + Duration::from_secs(1) >= self.now)
            .map(|(_, k)| *k)
            .collect()
    }

    /// Side `i` never disconnected and has a `kind` path selected (`case` names the run).
    fn assert_up_on(&self, i: usize, kind: PathKind, case: &str) {
        assert!(
            self.disconnects(i).is_empty(),
            "{case} side {i}: {:?}",
            self.disconnects(i)
        );
        assert_eq!(
            self.agent(i).selected_path().map(|p| p.kind),
            Some(kind),
            "{case} side {i}"
        );
    }

    fn connected_at(&self, i: usize) -> Option<(Instant, PathKind)> {
        self.sides[i].events.iter().find_map(|(t, e)| match e {
            Event::Connected { path } => Some((*t, path.kind)),
            _ => None,
        })
    }

    fn connected_at_after(&self, i: usize, after: Instant) -> Option<Instant> {
        self.sides[i].events.iter().find_map(|(t, e)| match e {
            Event::Connected { .. } if *t >= after => Some(*t),
            _ => None,
        })
    }

    fn first_media_after(&self, i: usize, t: Instant) -> Option<Instant> {
        self.sides[i]
            .app_rx
            .iter()
            .find(|(at, _)| *at >= t)
            .map(|(at, _)| *at)
    }

    fn disconnects(&self, i: usize) -> Vec<(Instant, DisconnectReason)> {
        self.sides[i]
            .events
            .iter()
            .filter_map(|(t, e)| match e {
                Event::Disconnected { reason } => Some((*t, reason.clone())),
                _ => None,
            })
            .collect()
    }
}

/// The fake STUN server: a Binding success with XOR-MAPPED-ADDRESS = the packet's source.
fn stun_answer(p: &Pkt) -> Option<Pkt> {
    let msg = Message::parse(&p.data).ok()?;
    if msg.method() != Method::BINDING || msg.class() != Class::Request {
        return None;
    }
    let mut buf = vec![0u8; 128];
    let mut b =
        MessageBuilder::new(&mut buf, MessageType::BINDING_SUCCESS, msg.transaction_id()).ok()?;
    b.add(&XorMappedAddress(p.src)).ok()?;
    b.add_fingerprint().ok()?;
    let n = b.finish();
    buf.truncate(n);
    Some(Pkt {
        src: p.dst,
        dst: p.src,
        data: buf,
    })
}

fn want(kind: ExpectedPath) -> PathKind {
    match kind {
        ExpectedPath::Direct => PathKind::Direct,
        ExpectedPath::Relay => PathKind::Relay,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs one scenario to a settled state and checks the path; returns (time to connected of
/// each side in ms, answer -> first media in ms).
fn run_matrix_case(sc: &Scenario) -> ([f64; 2], f64) {
    let mut w = World::new(sc);
    w.run_for(Duration::from_secs(4));
    let exp = want(expected_path(sc.kinds[0], sc.kinds[1]));
    let answer = w.answer_at.expect("offer/answer happened");
    let mut ttc = [0.0; 2];
    for (i, ttc_i) in ttc.iter_mut().enumerate() {
        let (_, first_kind) = w.connected_at(i).unwrap_or_else(|| {
            panic!(
                "{:?} side {i} never connected (stats {:?})",
                sc.kinds,
                w.agent(i).stats()
            )
        });
        let sel = w
            .agent(i)
            .selected_path()
            .unwrap_or_else(|| panic!("{:?} side {i}: no selected path", sc.kinds));
        assert_eq!(
            sel.kind,
            exp,
            "{:?} (start {:?}) side {i}: path kind; stats {:?}",
            sc.kinds,
            sc.start,
            w.agent(i).stats()
        );
        if sc.loss == 0.0 {
            assert_eq!(
                first_kind, exp,
                "{:?} side {i}: first selection should already be {exp:?}",
                sc.kinds
            );
        }
        assert!(
            w.disconnects(i).is_empty(),
            "{:?} side {i} disconnected",
            sc.kinds
        );
        // Media flows on the expected kind of path in the last second.
        let recent = w.recent_media(i);
        assert!(recent.len() >= 10, "{:?} side {i}: media stalls", sc.kinds);
        assert!(
            recent.iter().all(|k| *k == exp),
            "{:?} side {i}: media arrives on the wrong path kind",
            sc.kinds
        );
        *ttc_i = ms(w.agent(i).stats().time_to_connected.expect("connected"));
    }
    w.assert_same_path();
    let media = (0..2)
        .filter_map(|i| w.first_media_after(i, answer))
        .min()
        .expect("media arrived");
    (ttc, ms(media - answer))
}

fn timings() -> Vec<(&'static str, [Duration; 2])> {
    vec![
        ("simultaneous", [Duration::ZERO, Duration::ZERO]),
        (
            "A first +200ms",
            [Duration::ZERO, Duration::from_millis(200)],
        ),
        (
            "B first +200ms",
            [Duration::from_millis(200), Duration::ZERO],
        ),
    ]
}

#[test]
fn every_nat_pair_connects_on_the_expected_path() {
    let mut direct_ttc = Vec::new();
    let mut relay_ttc = Vec::new();
    let mut direct_media = Vec::new();
    let mut relay_media = Vec::new();
    for (label, start) in timings() {
        for a in NatKind::ALL {
            for b in NatKind::ALL {
                let mut sc = Scenario::new(a, b);
                sc.start = start;
                let (ttc, media) = run_matrix_case(&sc);
                let exp = want(expected_path(a, b));
                println!(
                    "{label:>15} {a:?} <-> {b:?}: {exp:?}, time to connected {:.0}/{:.0} ms, answer -> first media {media:.0} ms",
                    ttc[0], ttc[1]
                );
                if exp == PathKind::Direct {
                    direct_ttc.extend(ttc);
                    direct_media.push(media);
                } else {
                    relay_ttc.extend(ttc);
                    relay_media.push(media);
                }
            }
        }
    }
    let p50 = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let maxf = |v: &Vec<f64>| v.iter().copied().fold(0.0, f64::max);
    println!(
        "path RTT {:.0} ms; direct: time to connected p50 {:.0} ms max {:.0} ms, answer -> first media p50 {:.0} ms max {:.0} ms",
        ms(LINK_DELAY * 4),
        p50(&mut direct_ttc),
        maxf(&direct_ttc),
        p50(&mut direct_media),
        maxf(&direct_media)
    );
    println!(
        "relay: time to connected p50 {:.0} ms max {:.0} ms, answer -> first media p50 {:.0} ms max {:.0} ms",
        p50(&mut relay_ttc),
        maxf(&relay_ttc),
        p50(&mut relay_media),
        maxf(&relay_media)
    );
}

#[test]
fn relay_fallback_is_selected_within_the_window_when_direct_is_impossible() {
    for (label, start) in timings() {
        for (a, b) in [
            (NatKind::Symmetric, NatKind::Symmetric),
            (NatKind::Symmetric, NatKind::PortRestricted),
        ] {
            let mut sc = Scenario::new(a, b);
            sc.start = start;
            sc.relay_fallback_after = Duration::from_millis(500);
            let mut w = World::new(&sc);
            w.run_for(Duration::from_secs(3));
            let answer = w.answer_at.expect("answered");
            for i in 0..2 {
                let (_, kind) = w.connected_at(i).expect("connected");
                assert_eq!(kind, PathKind::Relay);
                let ttc = w.agent(i).stats().time_to_connected.expect("connected");
                // Not before the window (direct pairs still had their chance), and promptly
                // after it (the relayed pair had validated long before).
                assert!(
                    ttc >= sc.relay_fallback_after,
                    "{label} {a:?}/{b:?}: {ttc:?}"
                );
                assert!(
                    ttc <= sc.relay_fallback_after + Duration::from_millis(150),
                    "{label} {a:?}/{b:?}: relay selected late: {ttc:?}"
                );
            }
            let media = (0..2)
                .filter_map(|i| w.first_media_after(i, answer))
                .min()
                .expect("media");
            println!(
                "{label:>15} {a:?} <-> {b:?}: relay after {:.0}/{:.0} ms, answer -> first media via relay {:.0} ms",
                ms(w.agent(0).stats().time_to_connected.expect("c")),
                ms(w.agent(1).stats().time_to_connected.expect("c")),
                ms(media - answer)
            );
            assert!(media - answer <= Duration::from_millis(1500));
        }
    }
}

#[test]
fn later_direct_validation_moves_the_call_off_the_relay() {
    let mut sc = Scenario::new(NatKind::PortRestricted, NatKind::PortRestricted);
    sc.relay_fallback_after = Duration::from_millis(500);
    let mut w = World::new(&sc);
    w.block_direct_until = Some(w.t0 + Duration::from_millis(1500));
    w.run_for(Duration::from_secs(4));
    for i in 0..2 {
        let (t_conn, kind) = w.connected_at(i).expect("connected");
        assert_eq!(kind, PathKind::Relay, "side {i} first lands on the relay");
        let changed: Vec<_> = w.sides[i]
            .events
            .iter()
            .filter_map(|(t, e)| match e {
                Event::PathChanged { path } => Some((*t, path.kind)),
                _ => None,
            })
            .collect();
        // The caller (controlling) moves once, to direct. The callee may move once more,
        // earlier: from its own ranking of the relayed pairs onto the caller's.
        let max_changes = if i == 0 { 1 } else { 2 };
        assert!(
            (1..=max_changes).contains(&changed.len()),
            "side {i}: {changed:?}"
        );
        let (t_change, k) = *changed.last().expect("a change");
        assert_eq!(k, PathKind::Direct);
        assert!(t_change >= w.t0 + Duration::from_millis(1500));
        assert_eq!(
            w.agent(i).selected_path().expect("selected").kind,
            PathKind::Direct
        );
        // Media first came through the relay, and now comes directly.
        assert!(
            w.sides[i]
                .app_rx
                .iter()
                .any(|(t, k)| *t < t_change && *k == PathKind::Relay)
        );
        let last = w.sides[i].app_rx.last().expect("media");
        assert_eq!(last.1, PathKind::Direct);
        println!(
            "side {i}: relay at {:.0} ms, direct at {:.0} ms (direct unblocked at 1500 ms)",
            ms(t_conn - w.t0),
            ms(t_change - w.t0)
        );
        assert_eq!(
            w.agent(i).stats().path_changes as usize,
            changed.len(),
            "side {i}"
        );
    }
    w.assert_same_path();
}

#[test]
fn consent_expires_after_five_seconds_of_silence() {
    let sc = Scenario::new(NatKind::PortRestricted, NatKind::FullCone);
    let mut w = World::new(&sc);
    w.run_for(Duration::from_secs(2));
    for i in 0..2 {
        assert_eq!(w.connected_at(i).expect("connected").1, PathKind::Direct);
    }
    // A while of healthy consent first: no disconnect over 20 s with checks every 2 s.
    w.run_for(Duration::from_secs(20));
    assert!(w.disconnects(0).is_empty() && w.disconnects(1).is_empty());
    assert!(w.agent(0).stats().consent_checks_sent >= 8);
    let silence = w.now;
    w.blackout = true;
    w.run_for(Duration::from_secs(8));
    for i in 0..2 {
        let d = w.disconnects(i);
        assert_eq!(d.len(), 1, "side {i}: {d:?}");
        assert_eq!(d[0].1, DisconnectReason::ConsentExpired);
        let after = d[0].0 - silence;
        println!(
            "side {i}: Disconnected {:.0} ms after the path went silent",
            ms(after)
        );
        assert!(after >= Duration::from_millis(3000), "too early: {after:?}");
        assert!(after <= Duration::from_secs(5) + Duration::from_millis(100));
        assert!(w.agent(i).selected_path().is_none());
        assert!(w.agent_mut(i).send(silence, b"\x80x").is_err());
    }
}

#[test]
fn a_restart_reallocates_with_the_nonce_it_holds_and_costs_the_relay_no_401() {
    // Symmetric <-> symmetric: both sides need the relay. The NAT's new mapping after the flush
    // has a new port but the same public IP, so the nonce (bound to the IP) still holds.
    let sc = Scenario::new(NatKind::Symmetric, NatKind::Symmetric);
    let mut w = World::new(&sc);
    w.auto_restart = true;
    w.run_for(Duration::from_secs(3));
    assert!(w.connected_at(0).is_some() && w.connected_at(1).is_some());
    let challenged = |w: &World| w.relay.counters().resp_error[error_index(401)];
    let allocated = |w: &World| w.relay.counters().allocations_created;
    let (c0, a0) = (challenged(&w), allocated(&w));
    assert_eq!(c0, 2, "one 401 per side for the first allocation");
    w.sides[0].nat.flush();
    w.run_for(Duration::from_secs(12));
    assert!(!w.restarts.is_empty(), "no restart happened");
    assert!(allocated(&w) >= a0 + 2, "both sides allocated again");
    assert_eq!(
        challenged(&w),
        c0,
        "the new allocations authenticated at once"
    );
    for i in 0..2 {
        assert_eq!(
            w.agent(i).selected_path().expect("reconnected").kind,
            PathKind::Relay
        );
    }
}

#[test]
fn nat_rebinding_is_recovered_by_restart() {
    for (a, b, consent) in [
        (NatKind::PortRestricted, NatKind::PortRestricted, 5000),
        (NatKind::Symmetric, NatKind::AddressRestricted, 5000),
        (NatKind::Symmetric, NatKind::Symmetric, 5000),
        // A shorter consent timeout (an app choice) shortens the outage accordingly.
        (NatKind::PortRestricted, NatKind::PortRestricted, 2000),
    ] {
        let mut sc = Scenario::new(a, b);
        sc.consent_timeout = Duration::from_millis(consent);
        let mut w = World::new(&sc);
        w.auto_restart = true;
        w.run_for(Duration::from_secs(3));
        assert!(w.connected_at(0).is_some() && w.connected_at(1).is_some());
        let lost = w.now;
        w.sides[0].nat.flush();
        w.run_for(Duration::from_secs(12));
        assert!(!w.restarts.is_empty(), "{a:?}/{b:?}: no restart happened");
        let restart = w.restarts[0];
        // The first side to see consent expire makes the app restart both (through signaling).
        assert!(
            !w.disconnects(0).is_empty() || !w.disconnects(1).is_empty(),
            "{a:?}/{b:?}: nobody noticed the loss"
        );
        for i in 0..2 {
            assert_eq!(w.agent(i).stats().restarts, w.restarts.len() as u64);
            let sel = w.agent(i).selected_path().expect("reconnected");
            assert_eq!(sel.kind, want(expected_path(a, b)));
        }
        // Both directions flow again (one may never have stopped: a symmetric NAT's new
        // mapping still reaches an address-restricted peer).
        let media_again = (0..2)
            .map(|i| {
                let reconnected = w.connected_at_after(i, restart).expect("reconnected");
                w.first_media_after(i, reconnected).expect("media again")
            })
            .max()
            .expect("two sides");
        // Media keeps flowing at the end.
        for i in 0..2 {
            let last = w.sides[i].app_rx.last().expect("media").0;
            assert!(
                w.now - last < Duration::from_millis(200),
                "side {i} media stalled"
            );
        }
        println!(
            "{a:?} <-> {b:?} (consent {consent} ms): rebinding -> restart after {:.0} ms, media again {:.0} ms after the restart ({:.0} ms after the loss)",
            ms(restart - lost),
            ms(media_again - restart),
            ms(media_again - lost)
        );
    }
}

#[test]
fn role_conflicts_are_resolved() {
    for roles in [
        [Role::Controlling, Role::Controlling],
        [Role::Controlled, Role::Controlled],
    ] {
        for (a, b) in [
            (NatKind::FullCone, NatKind::PortRestricted),
            (NatKind::Symmetric, NatKind::Symmetric),
        ] {
            let mut sc = Scenario::new(a, b);
            sc.roles = roles;
            let mut w = World::new(&sc);
            w.run_for(Duration::from_secs(3));
            let exp = want(expected_path(a, b));
            for i in 0..2 {
                assert_eq!(
                    w.agent(i).selected_path().map(|p| p.kind),
                    Some(exp),
                    "{roles:?} {a:?}/{b:?} side {i}: {:?}",
                    w.agent(i).stats()
                );
            }
            assert_ne!(w.agent(0).role(), w.agent(1).role(), "{roles:?}");
            let conflicts = w.agent(0).stats().role_conflicts + w.agent(1).stats().role_conflicts;
            let switches = w.agent(0).stats().role_switches + w.agent(1).stats().role_switches;
            assert!(conflicts >= 1 && switches == 1, "{conflicts} {switches}");
        }
    }
}

/// A Binding request as the peer would send it, with `pwd` as integrity key.
fn fake_check(username: &str, pwd: &str, seed: u8) -> Vec<u8> {
    use peerlink_proto::TransactionId;
    use peerlink_proto::attrs::{IceControlling, Priority, Username};
    let mut buf = vec![0u8; 256];
    let mut b = MessageBuilder::new(
        &mut buf,
        MessageType::BINDING_REQUEST,
        TransactionId([seed; 12]),
    )
    .expect("buffer");
    b.add(&Username(username)).expect("attr");
    b.add(&Priority(1234)).expect("attr");
    b.add(&IceControlling(seed.into())).expect("attr");
    b.add_integrity(pwd.as_bytes()).expect("attr");
    b.add_fingerprint().expect("attr");
    let n = b.finish();
    buf.truncate(n);
    buf
}

#[test]
fn garbage_and_forged_checks_are_ignored_and_counted() {
    let sc = Scenario::new(NatKind::FullCone, NatKind::PortRestricted);
    let mut w = World::new(&sc);
    w.run_for(Duration::from_secs(2));
    let before = w.agent(1).stats();
    let sel = w.agent(1).selected_path().expect("connected");
    let now = w.now;
    let attacker = sa("203.0.113.99:6666");
    let (lu, _) = {
        let (u, p) = w.agent(1).local_credentials();
        (u.to_owned(), p.to_owned())
    };
    let (ru, _) = {
        let (u, p) = w.agent(0).local_credentials();
        (u.to_owned(), p.to_owned())
    };
    let b = w.agent_mut(1);
    // Garbage in the STUN range, in no range, and media from a stranger.
    assert!(
        b.handle_datagram(now, 0, attacker, &[0, 1, 0, 0, 9, 9])
            .is_none()
    );
    assert!(b.handle_datagram(now, 0, attacker, &[]).is_none());
    assert!(b.handle_datagram(now, 0, attacker, &[0x20, 1, 2]).is_none());
    assert!(b.handle_datagram(now, 0, attacker, &[0x80, 1, 2]).is_none());
    // A well-formed check with the right username but the wrong password.
    let forged = fake_check(&format!("{lu}:{ru}"), "not-the-password-at-all", 1);
    assert!(b.handle_datagram(now, 0, attacker, &forged).is_none());
    // The same from the selected remote address (a spoofer on path).
    assert!(b.handle_datagram(now, 0, sel.remote, &forged).is_none());
    // A check for another session.
    let other = fake_check("someone:else", "whatever-password-here", 2);
    assert!(b.handle_datagram(now, 0, attacker, &other).is_none());
    // An unsolicited success response.
    let mut buf = vec![0u8; 64];
    let mut m = MessageBuilder::new(
        &mut buf,
        MessageType::BINDING_SUCCESS,
        peerlink_proto::TransactionId([3; 12]),
    )
    .expect("buf");
    m.add(&XorMappedAddress(attacker)).expect("attr");
    let n = m.finish();
    assert!(b.handle_datagram(now, 0, attacker, &buf[..n]).is_none());
    // Out-of-range socket index.
    assert!(b.handle_datagram(now, 7, attacker, &forged).is_none());
    let after = b.stats();
    assert!(after.malformed >= before.malformed + 3, "{after:?}");
    assert_eq!(after.integrity_failures, before.integrity_failures + 2);
    assert!(after.wrong_username > before.wrong_username);
    assert!(after.unmatched_responses > before.unmatched_responses);
    assert!(after.app_dropped > before.app_dropped);
    assert_eq!(
        after.remote_candidates, before.remote_candidates,
        "no prflx from forgeries"
    );
    // Nothing was answered: forged checks get no response.
    let mut queued = Vec::new();
    while let Some(t) = b.poll_transmit() {
        queued.push(t);
    }
    assert!(
        queued.iter().all(|t| t.to != attacker),
        "answered a forgery"
    );
    for t in queued {
        w.outbound(1, t);
    }
    w.run_for(Duration::from_secs(3));
    assert!(w.disconnects(0).is_empty() && w.disconnects(1).is_empty());
    assert_eq!(
        w.agent(1).selected_path().map(|p| p.remote),
        Some(sel.remote)
    );
}

#[test]
fn random_and_mutated_datagrams_never_panic() {
    let t0 = Instant::now();
    let mut cfg = AgentConfig::new(Role::Controlled, "ufB", "password-bbbbbbbbbbbbbbbbbb", 9);
    cfg.stun_server = Some(sa(STUN_SERVER));
    cfg.turn = Some(TurnConfig {
        server: sa(RELAY_LISTENER),
        transport: TurnTransport::Udp,
        username: "u".into(),
        password: "p".into(),
    });
    let mut agent = Agent::new(cfg, &[sa("100.64.2.2:5000")], t0);
    agent.set_remote_credentials("ufA", "password-aaaaaaaaaaaaaaaaaa");
    let peer = sa("203.0.113.1:4000");
    agent.add_remote_candidate(
        peerlink_client_core::agent::Candidate::new(
            peerlink_client_core::agent::CandidateKind::ServerReflexive,
            peer,
            peer,
            1,
        ),
        t0,
    );
    let valid = fake_check("ufB:ufA", "password-bbbbbbbbbbbbbbbbbb", 5);
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let sources = [
        peer,
        sa(RELAY_LISTENER),
        sa(STUN_SERVER),
        sa("198.51.100.7:9"),
    ];
    let mut now = t0;
    for k in 0..30_000u32 {
        now += Duration::from_micros(300);
        let data: Vec<u8> = if k % 2 == 0 {
            let mut d = valid.clone();
            for _ in 0..rng.random_range(1..4) {
                let i = rng.random_range(0..d.len());
                d[i] = rng.random();
            }
            if rng.random_bool(0.2) {
                d.truncate(rng.random_range(0..d.len()));
            }
            d
        } else {
            let len = rng.random_range(0..120);
            let mut d: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            if let Some(f) = d.first_mut() {
                *f = [0u8, 1, 0x40, 0x41, 0x80, 0xC0][rng.random_range(0..6)];
            }
            d
        };
        let from = sources[rng.random_range(0..sources.len())];
        let _ = agent.handle_datagram(now, 0, from, &data);
        if agent.poll_timeout().is_some_and(|t| t <= now) {
            agent.handle_timeout(now);
        }
        while agent.poll_transmit().is_some() {}
        while agent.poll_event().is_some() {}
    }
    let s = agent.stats();
    assert!(s.malformed + s.integrity_failures + s.turn_input_errors + s.app_dropped > 10_000);
    // The one valid check (unmutated copies are rare) is still accepted afterwards.
    let _ = agent.handle_datagram(now, 0, peer, &valid);
    assert!(agent.stats().checks_received >= 1);
}

#[test]
fn five_percent_loss_still_connects() {
    let mut ttc = Vec::new();
    for seed in 1..=4u64 {
        for a in NatKind::ALL {
            for b in NatKind::ALL {
                let mut sc = Scenario::new(a, b);
                sc.seed = seed;
                // Each path crosses two access links: 2.5 % each ~= 5 % end to end.
                sc.loss = 0.025;
                if seed % 2 == 0 {
                    sc.start = [Duration::from_millis(200), Duration::ZERO];
                }
                let (t, _) = run_matrix_case(&sc);
                if expected_path(a, b) == ExpectedPath::Direct {
                    ttc.extend(t);
                }
            }
        }
    }
    ttc.sort_by(f64::total_cmp);
    println!(
        "5 % loss, direct: time to connected p50 {:.0} ms, p90 {:.0} ms, max {:.0} ms",
        ttc[ttc.len() / 2],
        ttc[ttc.len() * 9 / 10],
        ttc[ttc.len() - 1]
    );
}

#[test]
fn keepalives_hold_short_nat_timeouts_and_the_relay_allocation() {
    // Direct: NAT mappings expire after 4 s of silence; consent checks every 2 s keep them.
    let mut sc = Scenario::new(NatKind::PortRestricted, NatKind::PortRestricted);
    sc.nat_timeout = Duration::from_secs(4);
    let mut w = World::new(&sc);
    w.run_for(Duration::from_secs(2));
    // Stop media: only the agent's own keepalives cross the NATs from now on.
    for s in &mut w.sides {
        s.next_media = None;
    }
    // Media stays off: it only starts on Connected, which is not emitted again.
    let mut w2 = w;
    w2.run_for(Duration::from_secs(60));
    for i in 0..2 {
        w2.assert_up_on(i, PathKind::Direct, "direct, keepalives only");
    }
    // Relay: a 12-minute call crosses the allocation's refresh (lifetime 600 s), permission
    // refreshes (every 240 s) and a channel refresh (540 s).
    let sc = Scenario::new(NatKind::Symmetric, NatKind::Symmetric);
    let mut w = World::new(&sc);
    w.run_for(Duration::from_secs(12 * 60));
    for i in 0..2 {
        w.assert_up_on(i, PathKind::Relay, "12-minute relayed call");
        let last = w.sides[i].app_rx.last().expect("media").0;
        assert!(w.now - last < Duration::from_millis(200));
    }
    // Both send through the caller's choice: the allocation carrying the call is alive and
    // the other side's, unused, was released.
    w.assert_same_path();
    assert_eq!(w.relay.allocations(), 1);
}

#[test]
fn a_call_holds_only_the_allocation_it_uses() {
    // Every NAT pair: once the path has settled, a direct call holds no allocation on the relay
    // and a relayed one exactly the allocation both sides send through; media still flows.
    for a in NatKind::ALL {
        for b in NatKind::ALL {
            let sc = Scenario::new(a, b);
            let mut w = World::new(&sc);
            w.run_for(Duration::from_secs(2));
            assert_eq!(
                w.relay.allocations(),
                2,
                "{a:?}/{b:?}: both sides allocated"
            );
            w.run_for(Duration::from_secs(8));
            let exp = want(expected_path(a, b));
            let (held, released) = match exp {
                PathKind::Direct => (0, [1, 1]),
                PathKind::Relay => {
                    // The side whose allocation carries the call keeps it.
                    let carrier = (0..2)
                        .find(|&i| {
                            let path = w.agent(i).selected_path().expect("a path");
                            w.relayed_in_use(i) == Some(path.local)
                        })
                        .expect("one side sends through its own allocation");
                    let mut r = [1, 1];
                    r[carrier] = 0;
                    (1, r)
                }
            };
            assert_eq!(w.relay.allocations(), held, "{a:?}/{b:?} ({exp:?})");
            w.assert_same_path();
            let case = format!("{a:?}/{b:?}");
            for (i, released) in released.into_iter().enumerate() {
                let s = w.agent(i).stats();
                assert_eq!(s.unused_relay_released, released, "{case} side {i}");
                w.assert_up_on(i, exp, &case);
                assert!(
                    w.recent_media(i).len() >= 10,
                    "{case} side {i}: media stalls"
                );
            }
        }
    }
}

#[test]
fn an_allocation_the_peer_sends_to_is_kept() {
    // Without media the callee never follows the caller, so in relayed calls each side may
    // send through the other's allocation: neither side's selected pair goes through its own,
    // yet the peer's consent checks arrive through it. Releasing it would kill the peer's path;
    // the calls must stay up and keep their consent.
    for seed in 1..=3u64 {
        for a in NatKind::ALL {
            for b in NatKind::ALL {
                if expected_path(a, b) != ExpectedPath::Relay {
                    continue;
                }
                let mut sc = Scenario::new(a, b);
                sc.seed = seed;
                let mut w = World::new(&sc);
                w.media_on_connect = false;
                w.run_for(Duration::from_secs(30));
                let case = format!("{a:?}/{b:?} seed {seed}");
                for i in 0..2 {
                    w.assert_up_on(i, PathKind::Relay, &case);
                }
                // Whatever each side sends through is alive.
                let in_use: std::collections::HashSet<_> =
                    (0..2).filter_map(|i| w.relayed_in_use(i)).collect();
                assert_eq!(w.relay.allocations(), in_use.len(), "{case}");
            }
        }
    }
}

#[test]
fn without_a_relay_impossible_pairs_report_no_path() {
    let mut sc = Scenario::new(NatKind::Symmetric, NatKind::Symmetric);
    sc.with_turn = false;
    let mut w = World::new(&sc);
    w.run_for(Duration::from_secs(15));
    for i in 0..2 {
        assert!(w.connected_at(i).is_none());
        let d = w.disconnects(i);
        assert_eq!(d.len(), 1, "side {i}: {d:?}");
        assert_eq!(d[0].1, DisconnectReason::NoPath);
    }
}

#[test]
fn checks_carry_ice_attributes_and_short_term_integrity() {
    use peerlink_proto::attrs::{IceControlled, IceControlling, Priority, UseCandidate, Username};
    let t0 = Instant::now();
    let peer = sa("198.51.100.1:4000");
    let mk = |role, ufrag: &str, pwd: &str| {
        let mut a = Agent::new(
            AgentConfig::new(role, ufrag, pwd, 3),
            &[sa("203.0.113.1:5000")],
            t0,
        );
        a.set_remote_credentials("remoteufrag", "remote-password-0123456789");
        a.add_remote_candidate(
            peerlink_client_core::agent::Candidate::new(
                peerlink_client_core::agent::CandidateKind::Host,
                peer,
                peer,
                65535,
            ),
            t0,
        );
        a.handle_timeout(t0);
        a
    };
    for role in [Role::Controlling, Role::Controlled] {
        let mut a = mk(role, "localufrag", "local-password-0123456789");
        let t = a.poll_transmit().expect("a check goes out at once");
        assert_eq!((t.socket, t.to), (0, peer));
        let m = Message::parse(&t.payload).expect("valid STUN");
        assert_eq!(m.message_type(), MessageType::BINDING_REQUEST);
        assert!(m.has_fingerprint());
        m.verify_integrity(b"remote-password-0123456789")
            .expect("integrity with the REMOTE password");
        assert!(m.verify_integrity(b"local-password-0123456789").is_err());
        assert_eq!(
            m.get::<Username>(),
            Some(Ok(Username("remoteufrag:localufrag")))
        );
        assert!(matches!(m.get::<Priority>(), Some(Ok(Priority(p))) if p >> 24 == 110));
        match role {
            Role::Controlling => {
                assert!(m.get::<IceControlling>().is_some());
                assert!(m.get::<UseCandidate>().is_some(), "aggressive nomination");
            }
            Role::Controlled => {
                assert!(m.get::<IceControlled>().is_some());
                assert!(m.get::<UseCandidate>().is_none());
            }
        }
        // Paced retransmission: the next check is due within the first interval.
        let due = a.poll_timeout().expect("timer");
        assert!(due <= t0 + Duration::from_millis(25));
        a.handle_timeout(due);
        assert!(a.poll_transmit().is_some());
        let s = a.stats();
        assert_eq!((s.checks_sent, s.pairs), (2, 1));
    }
}

#[test]
fn send_before_connected_is_a_typed_error() {
    let t0 = Instant::now();
    let mut a = Agent::new(
        AgentConfig::new(Role::Controlling, "u1", "p1-xxxxxxxxxxxxxxxxxxxxxx", 1),
        &[sa("203.0.113.1:5000")],
        t0,
    );
    assert_eq!(
        a.send(t0, b"\x80hello"),
        Err(peerlink_client_core::agent::SendError::NotConnected)
    );
    // Host candidate announced; no servers configured -> gathering completes at once.
    assert!(matches!(a.poll_event(), Some(Event::LocalCandidate(_))));
    assert_eq!(a.poll_event(), Some(Event::GatheringComplete));
}

#[test]
fn a_relayed_address_learned_from_a_check_still_counts_as_relay() {
    // Side 1's candidates reach side 0 late, and the direct path is blocked for a while:
    // side 0 (public) first meets side 1's relayed address as the source of a check, i.e. as
    // a peer-reflexive candidate. It must still treat that path as relayed (PRIORITY carries
    // the relay type preference): not selected before the fallback window, reported as Relay.
    let mut sc = Scenario::new(NatKind::Public, NatKind::PortRestricted);
    sc.candidate_delay = [Duration::ZERO, Duration::from_millis(700)];
    let mut w = World::new(&sc);
    w.block_direct_until = Some(w.t0 + Duration::from_secs(3));
    w.run_for(Duration::from_millis(2500));
    for i in 0..2 {
        let (_, kind) = w.connected_at(i).expect("connected");
        assert_eq!(kind, PathKind::Relay, "side {i}");
        let ttc = w.agent(i).stats().time_to_connected.expect("connected");
        assert!(ttc >= sc.relay_fallback_after, "side {i}: {ttc:?}");
    }
    assert!(w.agent(0).stats().peer_reflexive_learned >= 1);
    // Once unblocked, the call moves to the direct path.
    w.run_for(Duration::from_secs(2));
    for i in 0..2 {
        assert_eq!(
            w.agent(i).selected_path().map(|p| p.kind),
            Some(PathKind::Direct)
        );
    }
}

#[test]
fn relay_only_side_never_sends_from_its_own_address_to_the_peer() {
    // Side 0 runs the relay-only policy between two public hosts, where a direct path would
    // work at once: every pair goes through side 0's relay, selected without waiting for a
    // direct fallback window, and no packet crosses from one WAN to the other directly.
    for relay_only in [[true, false], [true, true]] {
        let mut sc = Scenario::new(NatKind::Public, NatKind::FullCone);
        sc.relay_only = relay_only;
        sc.relay_fallback_after = Duration::ZERO;
        let mut w = World::new(&sc);
        w.run_for(Duration::from_secs(3));
        for i in 0..2 {
            let (_, kind) = w.connected_at(i).expect("connected");
            assert_eq!(kind, PathKind::Relay, "{relay_only:?} side {i}");
        }
        assert_eq!(w.wan_to_wan, 0, "{relay_only:?}: a packet went WAN to WAN");
        assert!(
            w.first_media_after(1, w.t0).is_some(),
            "no media reached side 1"
        );
    }
}

#[test]
fn restart_on_a_healthy_direct_path_costs_no_media_gap() {
    for (a, b) in [
        (NatKind::FullCone, NatKind::PortRestricted),
        (NatKind::Symmetric, NatKind::AddressRestricted),
    ] {
        let sc = Scenario::new(a, b);
        let mut w = World::new(&sc);
        w.run_for(Duration::from_secs(3));
        for i in 0..2 {
            let sel = w.agent(i).selected_path().expect("connected");
            assert_eq!(sel.kind, PathKind::Direct, "{a:?}/{b:?}");
        }
        // A false alarm: the app restarts although the path is fine, and keeps sending media.
        let restart = w.now;
        w.restart_both();
        for i in 0..2 {
            w.sides[i].next_media = Some(w.now);
        }
        w.run_for(Duration::from_secs(4));
        for i in 0..2 {
            assert_eq!(w.agent(i).stats().restarts, 1);
            assert!(
                w.connected_at_after(i, restart).is_some(),
                "{a:?}/{b:?}: side {i} did not reconnect after the restart"
            );
            let rx: Vec<Instant> = w.sides[i]
                .app_rx
                .iter()
                .map(|(t, _)| *t)
                .filter(|t| *t >= restart - Duration::from_millis(200))
                .collect();
            assert!(rx.len() >= 150, "side {i}: {} packets", rx.len());
            let gap = rx.windows(2).map(|p| p[1] - p[0]).max().expect("packets");
            // Media every 20 ms on a lossless link: the old path carried it until the new one
            // was selected, so no gap beyond jitter.
            assert!(
                gap <= MEDIA_EVERY * 3,
                "{a:?}/{b:?}: side {i} media gap {:.0} ms across the restart",
                ms(gap)
            );
            assert!(
                w.now - *rx.last().expect("packets") < Duration::from_millis(200),
                "side {i} media stalled"
            );
        }
    }
}
