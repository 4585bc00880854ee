//! Dual stack (RFC 8421): local preferences by address family and interface, the STUN server
//! of each socket's family, and the allocation of the other relayed family.
//!
//! * **Local preference** is `precedence << 8 | (255 - n)`: the RFC 6724 default policy
//!   precedence of the candidate's address (`::1` 50, global IPv6 40, IPv4 35, 6to4 30,
//!   Teredo 5, ULA 3, deprecated ranges 1) above the socket's rank `n` among the sockets of
//!   its family (the interface). A global IPv6 pair therefore outranks its IPv4 counterpart,
//!   so a direct IPv6 path wins when both sides have one (RFC 8421 section 4); checks on all
//!   pairs run at once, so IPv4 pairs are never starved (the interleaving the RFC asks for).
//! * **Pairs are of one family**: a local candidate pairs only with remote candidates of its
//!   own family (`add_pair`), relayed pairs with the allocation of the remote's family.
//! * **Two relayed families.** A TURN allocation relays one family, and a relay takes one
//!   allocation per 5-tuple (RFC 8656 has ADDITIONAL-ADDRESS-FAMILY for both in one; the
//!   relays here answer it 440). The first allocation gets the server's default, IPv4. With
//!   `relay_other_family`, once it is granted a second Allocate asks for the other family
//!   (REQUESTED-ADDRESS-FAMILY) over another 5-tuple: another local socket of the relay's
//!   family, else the next relay in the list from the same socket. A relay without an
//!   address of that family answers 440 and the call goes on with one. Gathering waits for
//!   the second one at most `turn_alternate_after`.
//! * **Bridging families.** A peer with IPv6 only cannot reach an IPv4 relay, but it reaches
//!   our IPv6 relayed address straight from its socket: the allocation of the other family
//!   on the side that reaches the relay bridges the two. Equally, a peer that reaches a relay
//!   over IPv6 gets an IPv4 relayed address from its first allocation (the default family).

use std::net::IpAddr;

use peerlink_proto::AddressFamily;

use super::*;

/// RFC 6724 default policy table precedence of `ip` (IPv4 as `::ffff:0:0/96`, 35).
pub fn family_precedence(ip: IpAddr) -> u8 {
    let v6 = match ip {
        IpAddr::V4(_) => return 35,
        IpAddr::V6(v6) => v6,
    };
    if v6.to_ipv4_mapped().is_some() {
        return 35;
    }
    let s = v6.segments();
    if v6.is_loopback() {
        50
    } else if s[0] == 0x2002 {
        // 6to4
        30
    } else if s[0] == 0x2001 && s[1] == 0 {
        // Teredo
        5
    } else if s[0] & 0xfe00 == 0xfc00 {
        // Unique local
        3
    } else if s[0] & 0xffc0 == 0xfec0 || s[0] & 0xffc0 == 0xfe80 || s[0] == 0x3ffe {
        // Site-local, link-local (needs a scope the candidate cannot carry), 6bone
        1
    } else if s[..6] == [0; 6] {
        // IPv4-compatible (::/96)
        1
    } else {
        40
    }
}

/// RFC 8421 local preference of a candidate on `ip` from the `nth` socket of its family.
pub fn local_preference(ip: IpAddr, nth: usize) -> u16 {
    let rank = u16::try_from(nth.min(255)).unwrap_or(255);
    (u16::from(family_precedence(ip)) << 8) | (255 - rank)
}

impl Agent {
    /// Local preference of socket `i` (its address, its rank among the sockets of its family).
    pub(super) fn socket_pref(&self, i: usize) -> u16 {
        let Some(addr) = self.sockets.get(i) else {
            return 0;
        };
        let nth = self.sockets[..i]
            .iter()
            .filter(|s| s.is_ipv4() == addr.is_ipv4())
            .count();
        local_preference(addr.ip(), nth)
    }

    /// The STUN server for local socket `i`: the configured one of its family.
    pub(super) fn stun_for(&self, i: usize) -> Option<SocketAddr> {
        let addr = self.sockets.get(i)?;
        [self.cfg.stun_server, self.cfg.stun_server6]
            .into_iter()
            .flatten()
            .find(|s| s.is_ipv4() == addr.is_ipv4())
    }

    /// Whether `from` is one of our STUN servers.
    pub(super) fn is_stun_server(&self, from: SocketAddr) -> bool {
        self.cfg.stun_server == Some(from) || self.cfg.stun_server6 == Some(from)
    }

    /// Our relayed address of the family of `remote`, if an allocation has one.
    pub(super) fn relayed_addr_for(&self, remote: SocketAddr) -> Option<SocketAddr> {
        self.turn
            .iter()
            .chain(self.turn2.as_ref().map(|(_, t)| t))
            .filter(|t| t.state() == AllocationState::Allocated)
            .filter_map(|t| t.relayed_addr())
            .find(|r| r.is_ipv4() == remote.is_ipv4())
    }

    /// The allocation relaying the family of `remote` (and its local socket), once allocated.
    pub(super) fn relay_for_mut(&mut self, remote: SocketAddr) -> Option<(usize, &mut TurnClient)> {
        let fits = |t: &TurnClient| {
            t.state() == AllocationState::Allocated
                && t.relayed_addr()
                    .is_some_and(|r| r.is_ipv4() == remote.is_ipv4())
        };
        if self.turn.as_ref().is_some_and(fits) {
            let s = self.turn_socket;
            return self.turn.as_mut().map(|t| (s, t));
        }
        match self.turn2.as_mut() {
            Some((s, t)) if fits(t) => Some((*s, t)),
            _ => None,
        }
    }

    /// Drops relays of a family no socket has (an IPv6-only host, IPv4 relays): out of reach.
    pub(super) fn keep_reachable_relays(&mut self) {
        let sockets = &self.sockets;
        self.turn_order
            .retain(|t| sockets.iter().any(|s| s.is_ipv4() == t.server.is_ipv4()));
    }

    /// The second allocation when it relays the family of `remote` (it is allocated).
    fn turn2_for(&mut self, remote: SocketAddr) -> Option<(usize, &mut TurnClient)> {
        match self.turn2.as_mut() {
            Some((s, t))
                if t.state() == AllocationState::Allocated
                    && t.relayed_addr()
                        .is_some_and(|r| r.is_ipv4() == remote.is_ipv4()) =>
            {
                Some((*s, t))
            }
            _ => None,
        }
    }

    /// Queues `payload` to `to` through the second allocation if it relays `to`'s family;
    /// `false` leaves it to the first.
    pub(super) fn emit_turn2(&mut self, now: Instant, to: SocketAddr, payload: &[u8]) -> bool {
        let Some((socket, t)) = self.turn2_for(to) else {
            return false;
        };
        let mut buf = vec![0u8; payload.len() + TURN_OVERHEAD];
        let mut res = t.encode_data(to, payload, &mut buf);
        if matches!(res, Err(turn::TurnError::NoPermission(_))) {
            let _ = t.create_permission(now, to.ip());
            res = t.encode_data(to, payload, &mut buf);
        }
        match res {
            Ok(n) => {
                buf.truncate(n);
                let server = t.config().server;
                self.transmits.push_back(Transmit {
                    socket,
                    to: server,
                    payload: buf,
                });
            }
            Err(_) => self.stats.send_errors += 1,
        }
        self.drain_turn2(now);
        true
    }

    /// An application payload to `remote` wrapped for the second allocation, if it relays
    /// `remote`'s family.
    pub(super) fn wrap_turn2(
        &mut self,
        remote: SocketAddr,
        payload: &[u8],
    ) -> Result<Option<Transmit>, SendError> {
        let Some((socket, t)) = self.turn2_for(remote) else {
            return Ok(None);
        };
        let mut buf = vec![0u8; payload.len() + TURN_OVERHEAD];
        let n = t.encode_data(remote, payload, &mut buf)?;
        buf.truncate(n);
        Ok(Some(Transmit {
            socket,
            to: t.config().server,
            payload: buf,
        }))
    }

    /// Whether a datagram from `from` on `socket` is the second allocation's server.
    pub(super) fn is_turn2_server(&self, socket: usize, from: SocketAddr) -> bool {
        self.turn2
            .as_ref()
            .is_some_and(|(s, t)| *s == socket && t.config().server == from)
    }

    /// Input from the second allocation's server (module docs).
    pub(super) fn turn2_input<'a>(
        &mut self,
        now: Instant,
        socket: usize,
        from: SocketAddr,
        data: &'a [u8],
    ) -> Option<AppData<'a>> {
        let (_, t) = self.turn2.as_mut()?;
        let res = t.handle_input(now, from, data);
        self.after_turn_input(now, (socket, from, data), res, true)
    }

    /// Starts the Allocate of the other family once the first allocation was granted.
    pub(super) fn start_turn2(&mut self, now: Instant) {
        // Over UDP only: an allocation over TCP or TLS says this network passes no UDP.
        if !self.cfg.relay_other_family || self.turn2_tried || self.turn_stream.is_some() {
            return;
        }
        let Some(first) = self.turn.as_ref() else {
            return;
        };
        let Some(relayed) = first.relayed_addr() else {
            return;
        };
        self.turn2_tried = true;
        let want = if relayed.is_ipv4() {
            AddressFamily::V6
        } else {
            AddressFamily::V4
        };
        let first_conf = first.config().clone();
        let s0 = self.turn_socket;
        let busy = |agent: &Agent, s: usize, server: SocketAddr| {
            (s == s0 && server == first_conf.server)
                || agent
                    .retired
                    .iter()
                    .any(|(rs, t)| *rs == s && t.config().server == server)
        };
        // Another socket of the relay's family to the same relay, else the next relay.
        let mut choice = None;
        for (s, a) in self.sockets.iter().enumerate() {
            if a.is_ipv4() == first_conf.server.is_ipv4() && !busy(self, s, first_conf.server) {
                choice = Some((
                    s,
                    first_conf.server,
                    first_conf.username.clone(),
                    first_conf.password.clone(),
                ));
                break;
            }
        }
        if choice.is_none() {
            for tc in &self.turn_order {
                if tc.server == first_conf.server || tc.transport != TurnTransport::Udp {
                    continue;
                }
                let socket = std::iter::once(s0).chain(0..self.sockets.len()).find(|&s| {
                    self.sockets
                        .get(s)
                        .is_some_and(|a| a.is_ipv4() == tc.server.is_ipv4())
                        && !busy(self, s, tc.server)
                });
                if let Some(s) = socket {
                    choice = Some((s, tc.server, tc.username.clone(), tc.password.clone()));
                    break;
                }
            }
        }
        let Some((socket, server, username, password)) = choice else {
            return;
        };
        self.turn_generation += 1;
        let mut conf = turn::TurnConfig::new(server, username, password);
        conf.rto = self.cfg.stun_rto;
        conf.requested_family = Some(want);
        conf.seed = self
            .cfg
            .seed
            .wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
            .wrapping_add(self.turn_generation);
        let mut client = TurnClient::new(conf);
        if client.allocate(now).is_ok() {
            self.turn2 = Some((socket, client));
            self.turn2_started_at = Some(now);
        }
        self.drain_turn2(now);
    }

    /// Gathering waits for the second allocation only this long (module docs).
    pub(super) fn turn2_pending(&self) -> bool {
        self.turn2
            .as_ref()
            .is_some_and(|(_, t)| t.state() == AllocationState::Allocating)
            && self.turn2_started_at.is_some()
    }

    /// When gathering stops waiting for the second allocation.
    pub(super) fn turn2_wait_until(&self) -> Option<Instant> {
        self.turn2_pending()
            .then(|| {
                self.turn2_started_at
                    .map(|s| s + self.cfg.turn_alternate_after)
            })
            .flatten()
    }

    /// Timers of the second allocation; gathering gives up waiting for it after a while.
    pub(super) fn turn2_timers(&mut self, now: Instant) {
        if let Some((_, t)) = self.turn2.as_mut() {
            t.handle_timeout(now);
        }
        if self.turn2_wait_until().is_some_and(|at| at <= now) {
            // Still allocating (it may yet succeed), but gathering is not held up by it.
            self.turn2_started_at = None;
        }
        self.drain_turn2(now);
        self.check_gathering_complete();
    }

    /// Events and datagrams of the second allocation.
    pub(super) fn drain_turn2(&mut self, now: Instant) {
        let Some((socket, t)) = self.turn2.as_mut() else {
            return;
        };
        let socket = *socket;
        let mut events = Vec::new();
        while let Some(ev) = t.poll_event() {
            events.push(ev);
        }
        for ev in events {
            match ev {
                turn::Event::Allocated { relayed, .. } => {
                    let pref = local_preference(relayed.ip(), 0);
                    let c = Candidate::new(CandidateKind::Relayed, relayed, relayed, pref);
                    self.add_local(c, true);
                    let ips: Vec<_> = self
                        .remotes
                        .iter()
                        .map(|r| r.addr.ip())
                        .filter(|ip| ip.is_ipv4() == relayed.is_ipv4())
                        .collect();
                    if let Some((_, t)) = self.turn2.as_mut() {
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
                    let v4 = self
                        .turn2
                        .as_ref()
                        .and_then(|(_, t)| t.relayed_addr())
                        .map(|r| r.is_ipv4());
                    let mut lost_selected = false;
                    for (i, p) in self.pairs.iter_mut().enumerate() {
                        if p.via == Via::Relay && Some(p.remote.is_ipv4()) == v4 {
                            p.state = PairState::Failed;
                            p.next_check_at = None;
                            lost_selected |= self.selected == Some(i);
                        }
                    }
                    if lost_selected {
                        self.disconnect(DisconnectReason::RelayLost(e));
                    }
                }
                _ => {}
            }
        }
        if let Some((_, t)) = self.turn2.as_mut() {
            while let Some(tx) = t.poll_transmit() {
                self.transmits.push_back(Transmit {
                    socket,
                    to: tx.destination,
                    payload: tx.payload,
                });
            }
        }
        self.check_gathering_complete();
    }

    /// Releases the second allocation (Refresh LIFETIME 0) with the first.
    pub(super) fn release_turn2(&mut self, now: Instant) {
        self.turn2_started_at = None;
        if let Some((socket, mut old)) = self.turn2.take()
            && old.state() == AllocationState::Allocated
            && old.deallocate(now).is_ok()
        {
            self.retired.push((socket, old));
            self.drain_retired(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn precedence_follows_rfc_6724() {
        assert_eq!(family_precedence(ip("::1")), 50);
        assert_eq!(family_precedence(ip("2001:db8::1")), 40);
        assert_eq!(family_precedence(ip("203.0.113.1")), 35);
        assert_eq!(family_precedence(ip("::ffff:203.0.113.1")), 35);
        assert_eq!(family_precedence(ip("2002:cb00:7101::1")), 30);
        assert_eq!(family_precedence(ip("2001:0:4136:e378::1")), 5);
        assert_eq!(family_precedence(ip("fd00::1")), 3);
        assert_eq!(family_precedence(ip("fe80::1")), 1);
        assert_eq!(family_precedence(ip("fec0::1")), 1);
        assert_eq!(family_precedence(ip("::203.0.113.1")), 1);
    }

    #[test]
    fn global_v6_outranks_v4_and_interfaces_rank_within_a_family() {
        let v6 = local_preference(ip("2001:db8::1"), 0);
        let v6b = local_preference(ip("2001:db8:1::1"), 1);
        let v4 = local_preference(ip("203.0.113.1"), 0);
        let v4b = local_preference(ip("198.51.100.1"), 1);
        let ula = local_preference(ip("fd00::1"), 0);
        assert!(v6 > v6b && v6b > v4 && v4 > v4b && v4b > ula);
        // The second v6 interface still beats the first v4 one (family first).
        assert_eq!(v6 >> 8, 40);
        assert_eq!(v4 & 0xff, 255);
        assert_eq!(v4b & 0xff, 254);
        assert_eq!(local_preference(ip("203.0.113.1"), 1000) & 0xff, 0);
    }

    const V4: &str = "203.0.113.5:4000";
    const V6: &str = "[2001:db8:1::5]:4000";

    fn agent(role: Role, ufrag: &str, sockets: &[SocketAddr], now: Instant) -> Agent {
        let mut cfg = AgentConfig::new(role, ufrag, format!("{ufrag}-password-0123456789"), 7);
        cfg.stun_server = Some("203.0.113.200:3479".parse().unwrap());
        cfg.stun_server6 = Some("[2001:db8::200]:3479".parse().unwrap());
        Agent::new(cfg, sockets, now)
    }

    #[test]
    fn each_socket_asks_the_stun_server_of_its_family() {
        let now = Instant::now();
        let socks: Vec<SocketAddr> = vec![V4.parse().unwrap(), V6.parse().unwrap()];
        let mut a = agent(Role::Controlling, "aaaa", &socks, now);
        let mut sent = Vec::new();
        while let Some(t) = a.poll_transmit() {
            sent.push((t.socket, t.to));
        }
        sent.sort();
        assert_eq!(
            sent,
            vec![
                (0, "203.0.113.200:3479".parse().unwrap()),
                (1, "[2001:db8::200]:3479".parse().unwrap())
            ]
        );
        // Host candidates of both families, the v6 one preferred.
        let hosts = a.local_candidates();
        assert_eq!(hosts.len(), 2);
        let (h4, h6) = (&hosts[0], &hosts[1]);
        assert!(h4.addr.is_ipv4() && h6.addr.is_ipv6());
        assert!(h6.priority > h4.priority);
        assert_eq!(
            h6.priority,
            candidate_priority(TYPE_PREF_HOST, local_preference(h6.addr.ip(), 0), 1)
        );
    }

    #[test]
    fn pairs_are_formed_within_a_family_only() {
        let now = Instant::now();
        let socks: Vec<SocketAddr> = vec![V4.parse().unwrap(), V6.parse().unwrap()];
        let mut a = agent(Role::Controlling, "aaaa", &socks, now);
        a.set_remote_credentials("bbbb", "bbbb-password-0123456789");
        let r4: SocketAddr = "198.51.100.9:5000".parse().unwrap();
        let r6: SocketAddr = "[2001:db8:2::9]:5000".parse().unwrap();
        let r6b: SocketAddr = "[2001:db8:2::a]:5000".parse().unwrap();
        for (r, pref) in [(r4, 0), (r6, 0), (r6b, 1)] {
            let c = Candidate::new(CandidateKind::Host, r, r, local_preference(r.ip(), pref));
            a.add_remote_candidate(c, now);
        }
        assert_eq!(a.pairs.len(), 3);
        for p in &a.pairs {
            assert_eq!(p.local_addr.is_ipv4(), p.remote.is_ipv4(), "{p:?}");
        }
        // RFC 8421: the v6 pairs rank above the v4 one.
        let prio = |r: SocketAddr| a.pairs.iter().find(|p| p.remote == r).unwrap().priority;
        assert!(prio(r6) > prio(r6b) && prio(r6b) > prio(r4));
        // A v4-only agent pairs with nothing of the v6 peer.
        let mut b = agent(Role::Controlled, "cccc", &socks[..1], now);
        b.set_remote_credentials("dddd", "dddd-password-0123456789");
        b.add_remote_candidate(Candidate::new(CandidateKind::Host, r6, r6, 1), now);
        assert!(b.pairs.is_empty());
        assert_eq!(b.stats().remote_candidates, 1);
    }

    /// Two dual-stack agents on one wire (no NAT): both select the IPv6 pair.
    #[test]
    fn the_v6_direct_path_wins_when_both_sides_have_one() {
        let start = Instant::now();
        let sa: Vec<SocketAddr> = vec![V4.parse().unwrap(), V6.parse().unwrap()];
        let sb: Vec<SocketAddr> = vec![
            "198.51.100.9:5000".parse().unwrap(),
            "[2001:db8:2::9]:5000".parse().unwrap(),
        ];
        let mut a = agent(Role::Controlling, "aaaa", &sa, start);
        let mut b = agent(Role::Controlled, "bbbb", &sb, start);
        let (ua, pa) = {
            let (u, p) = a.local_credentials();
            (u.to_owned(), p.to_owned())
        };
        let (ub, pb) = {
            let (u, p) = b.local_credentials();
            (u.to_owned(), p.to_owned())
        };
        a.set_remote_credentials(&ub, &pb);
        b.set_remote_credentials(&ua, &pa);
        for c in b.local_candidates() {
            a.add_remote_candidate(c, start);
        }
        for c in a.local_candidates() {
            b.add_remote_candidate(c, start);
        }
        let mut now = start;
        let mut paths = (None, None);
        for _ in 0..400 {
            now += Duration::from_millis(5);
            a.handle_timeout(now);
            b.handle_timeout(now);
            for _ in 0..4 {
                let mut moved = false;
                while let Some(t) = a.poll_transmit() {
                    moved = true;
                    if let Some(i) = sb.iter().position(|s| *s == t.to) {
                        let _ = b.handle_datagram(now, i, sa[t.socket], &t.payload);
                    }
                }
                while let Some(t) = b.poll_transmit() {
                    moved = true;
                    if let Some(i) = sa.iter().position(|s| *s == t.to) {
                        let _ = a.handle_datagram(now, i, sb[t.socket], &t.payload);
                    }
                }
                if !moved {
                    break;
                }
            }
            while let Some(e) = a.poll_event() {
                if let Event::Connected { path } | Event::PathChanged { path } = e {
                    paths.0 = Some(path);
                }
            }
            while let Some(e) = b.poll_event() {
                if let Event::Connected { path } | Event::PathChanged { path } = e {
                    paths.1 = Some(path);
                }
            }
        }
        let (pa, pb) = (paths.0.expect("a connected"), paths.1.expect("b connected"));
        assert_eq!(pa.kind, PathKind::Direct);
        assert_eq!((pa.local, pa.remote), (sa[1], sb[1]), "{pa:?}");
        assert_eq!((pb.local, pb.remote), (sb[1], sa[1]), "{pb:?}");
        assert_eq!(a.selected_path(), Some(pa));
    }

    // --- The allocation of the other family, against a scripted TURN server ---

    use peerlink_proto::attrs::{
        Lifetime, Nonce, Realm, RequestedAddressFamily, XorRelayedAddress,
    };

    const USER: &str = "1900000000:alice";
    const PASS: &str = "turn-password";
    const REALM: &str = "peerlink";
    const RELAY_A: &str = "203.0.113.210:3478";
    const RELAY_B: &str = "203.0.113.211:3478";

    fn turn_agent(sockets: &[SocketAddr], now: Instant) -> Agent {
        let mut cfg = AgentConfig::new(Role::Controlling, "aaaa", "aaaa-password-0123456789", 9);
        let tc = |s: &str| TurnConfig {
            server: s.parse().unwrap(),
            transport: TurnTransport::Udp,
            username: USER.into(),
            password: PASS.into(),
        };
        cfg.turn = Some(tc(RELAY_A));
        cfg.turn_alternates = vec![tc(RELAY_B)];
        cfg.relay_other_family = true;
        Agent::new(cfg, sockets, now)
    }

    /// Answers `req` as the relay would: 401 to an unauthenticated Allocate, success with
    /// `relayed` to an authenticated one.
    fn turn_answer(req: &[u8], relayed: SocketAddr) -> Vec<u8> {
        let m = Message::parse(req).unwrap();
        assert_eq!(m.method(), Method::ALLOCATE);
        let authed = m.get::<Username>().is_some();
        let class = if authed { Class::Success } else { Class::Error };
        let mut buf = vec![0u8; 512];
        let mut b = MessageBuilder::new(
            &mut buf,
            m.message_type().with_class(class),
            m.transaction_id(),
        )
        .unwrap();
        if authed {
            b.add(&XorRelayedAddress(relayed)).unwrap();
            b.add(&Lifetime(600)).unwrap();
            b.add_integrity(&peerlink_proto::auth::long_term_key(USER, REALM, PASS))
                .unwrap();
        } else {
            b.add(&ErrorCode::new(401)).unwrap();
            b.add(&Realm(REALM)).unwrap();
            b.add(&Nonce("nonce-1")).unwrap();
        }
        b.add_fingerprint().unwrap();
        let n = b.finish();
        buf.truncate(n);
        buf
    }

    /// The Allocates the agent sent: (socket, server, requested family).
    fn allocates(a: &mut Agent) -> Vec<(usize, SocketAddr, Option<AddressFamily>, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some(t) = a.poll_transmit() {
            let Ok(m) = Message::parse(&t.payload) else {
                continue;
            };
            if m.method() == Method::ALLOCATE {
                let f = m.get::<RequestedAddressFamily>().map(|r| r.unwrap().0);
                out.push((t.socket, t.to, f, t.payload.clone()));
            }
        }
        out
    }

    /// Runs one Allocate (challenge, then success with `relayed`) expected on (socket, server).
    fn grant(
        a: &mut Agent,
        now: Instant,
        want: (usize, &str, Option<AddressFamily>),
        relayed: &str,
    ) {
        let relayed: SocketAddr = relayed.parse().unwrap();
        let server: SocketAddr = want.1.parse().unwrap();
        for _ in 0..2 {
            let sent = allocates(a);
            assert_eq!(sent.len(), 1, "one Allocate: {sent:?}");
            let (socket, to, family, req) = &sent[0];
            assert_eq!((*socket, *to, *family), (want.0, server, want.2));
            let _ = a.handle_datagram(now, *socket, server, &turn_answer(req, relayed));
            if a.local_candidates().iter().any(|c| c.addr == relayed) {
                return;
            }
        }
        panic!("{relayed} not granted");
    }

    #[test]
    fn the_other_family_goes_to_the_next_relay_from_the_only_socket() {
        let now = Instant::now();
        let mut a = turn_agent(&[V4.parse().unwrap()], now);
        grant(&mut a, now, (0, RELAY_A, None), "203.0.113.210:50000");
        // Same socket, same relay is the same 5-tuple: the next relay, asked for IPv6.
        grant(
            &mut a,
            now,
            (0, RELAY_B, Some(AddressFamily::V6)),
            "[2001:db8::211]:50001",
        );
        let relayed: Vec<SocketAddr> = a
            .local_candidates()
            .iter()
            .filter(|c| c.kind == CandidateKind::Relayed)
            .map(|c| c.addr)
            .collect();
        assert_eq!(relayed.len(), 2);
        assert!(relayed[0].is_ipv4() && relayed[1].is_ipv6());
        // A peer's candidates pair with the relayed address of their family.
        a.set_remote_credentials("bbbb", "bbbb-password-0123456789");
        let r6: SocketAddr = "[2001:db8::30]:7000".parse().unwrap();
        let r4: SocketAddr = "198.51.100.9:7000".parse().unwrap();
        for r in [r6, r4] {
            a.add_remote_candidate(Candidate::new(CandidateKind::Host, r, r, 1), now);
        }
        let relayed_pair = |r: SocketAddr| {
            a.pairs
                .iter()
                .find(|p| p.via == Via::Relay && p.remote == r)
                .map(|p| p.local_addr)
        };
        assert_eq!(relayed_pair(r6), Some(relayed[1]));
        assert_eq!(relayed_pair(r4), Some(relayed[0]));
        // The IPv4-only socket pairs with the IPv4 peer only.
        assert!(
            !a.pairs
                .iter()
                .any(|p| p.via == Via::Socket(0) && p.remote == r6)
        );
        // Both are released on close.
        a.close(now);
        let released: Vec<SocketAddr> = std::iter::from_fn(|| a.poll_transmit())
            .filter(|t| Message::parse(&t.payload).is_ok_and(|m| m.method() == Method::REFRESH))
            .map(|t| t.to)
            .collect();
        assert_eq!(released.len(), 2, "{released:?}");
        assert!(!a.is_released());
    }

    #[test]
    fn the_other_family_prefers_another_socket_to_the_same_relay() {
        let now = Instant::now();
        let socks: Vec<SocketAddr> = vec![
            V4.parse().unwrap(),
            "203.0.113.5:4001".parse().unwrap(),
            V6.parse().unwrap(),
        ];
        let mut a = turn_agent(&socks, now);
        grant(&mut a, now, (0, RELAY_A, None), "203.0.113.210:50000");
        grant(
            &mut a,
            now,
            (1, RELAY_A, Some(AddressFamily::V6)),
            "[2001:db8::210]:50002",
        );
    }

    #[test]
    fn ipv6_only_skips_ipv4_relays_one_relay_gives_one_family_and_440_ends_the_wait() {
        let now = Instant::now();
        let mut a = turn_agent(&[V6.parse().unwrap()], now);
        // No socket reaches an IPv4 relay: nothing is sent to one, gathering is complete.
        assert!(allocates(&mut a).is_empty());
        let mut done = false;
        while let Some(e) = a.poll_event() {
            done |= e == Event::GatheringComplete;
        }
        assert!(done);
        // An IPv4-only agent with one relay: no other 5-tuple, so no second Allocate.
        let mut cfg = AgentConfig::new(Role::Controlled, "cccc", "cccc-password-0123456789", 3);
        cfg.turn = Some(TurnConfig {
            server: RELAY_A.parse().unwrap(),
            transport: TurnTransport::Udp,
            username: USER.into(),
            password: PASS.into(),
        });
        cfg.relay_other_family = true;
        let mut b = Agent::new(cfg, &[V4.parse().unwrap()], now);
        grant(&mut b, now, (0, RELAY_A, None), "203.0.113.210:50000");
        assert!(allocates(&mut b).is_empty());
        assert!(std::iter::from_fn(|| b.poll_event()).any(|e| e == Event::GatheringComplete));
        // A relay without IPv6 answers the second Allocate 440: gathering completes with one.
        let mut c = turn_agent(&[V4.parse().unwrap()], now);
        grant(&mut c, now, (0, RELAY_A, None), "203.0.113.210:50000");
        while c.poll_event().is_some() {}
        let sent = allocates(&mut c);
        assert_eq!(sent.len(), 1);
        let b_addr: SocketAddr = RELAY_B.parse().unwrap();
        let dummy: SocketAddr = "[2001:db8::1]:1".parse().unwrap();
        let _ = c.handle_datagram(now, 0, b_addr, &turn_answer(&sent[0].3, dummy));
        let sent = allocates(&mut c);
        assert_eq!(sent.len(), 1, "the authenticated retry");
        let m = Message::parse(&sent[0].3).unwrap();
        let mut buf = vec![0u8; 256];
        let mut r = MessageBuilder::new(
            &mut buf,
            m.message_type().with_class(Class::Error),
            m.transaction_id(),
        )
        .unwrap();
        r.add(&ErrorCode::new(440)).unwrap();
        r.add_integrity(&peerlink_proto::auth::long_term_key(USER, REALM, PASS))
            .unwrap();
        r.add_fingerprint().unwrap();
        let n = r.finish();
        let _ = c.handle_datagram(now, 0, b_addr, &buf[..n]);
        assert!(std::iter::from_fn(|| c.poll_event()).any(|e| e == Event::GatheringComplete));
        let relayed = c
            .local_candidates()
            .iter()
            .filter(|l| l.kind == CandidateKind::Relayed)
            .count();
        assert_eq!(relayed, 1);
    }
}
