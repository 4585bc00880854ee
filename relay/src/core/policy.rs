//! Peer policy: which peer addresses an allocation may talk to.
//!
//! Deny by default every range that would let the relay reach into private networks or the
//! relay host itself (loopback, private, link-local incl. cloud metadata, CGNAT, ULA, multicast,
//! reserved, documentation, benchmarking, IETF protocol assignments), every IPv4-in-IPv6 spelling
//! checked as the IPv4 address it carries, and the relay's own listener and service ports.
//! `allow_peers` overrides the range checks (labs, tests) but never the service ports. Relayed
//! addresses of this relay (`relay_addrs` x `port_range`) are legitimate peers even inside a
//! denied range: two callers behind symmetric NATs meet exactly that way.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::RangeInclusive;

use ipnet::IpNet;

use super::CoreConfig;

/// IPv4 ranges never reachable as peers: (network, prefix length).
const DENIED_V4: &[([u8; 4], u8)] = &[
    ([0, 0, 0, 0], 8),       // "this network"
    ([10, 0, 0, 0], 8),      // private
    ([100, 64, 0, 0], 10),   // CGNAT
    ([127, 0, 0, 0], 8),     // loopback
    ([169, 254, 0, 0], 16),  // link-local (cloud metadata)
    ([172, 16, 0, 0], 12),   // private
    ([192, 0, 0, 0], 24),    // IETF protocol assignments
    ([192, 0, 2, 0], 24),    // documentation TEST-NET-1
    ([192, 88, 99, 0], 24),  // deprecated 6to4 relay anycast
    ([192, 168, 0, 0], 16),  // private
    ([198, 18, 0, 0], 15),   // benchmarking
    ([198, 51, 100, 0], 24), // documentation TEST-NET-2
    ([203, 0, 113, 0], 24),  // documentation TEST-NET-3
    ([224, 0, 0, 0], 4),     // multicast
    ([240, 0, 0, 0], 4),     // reserved, incl. 255.255.255.255
];

/// IPv6 ranges never reachable as peers (those carrying IPv4 are handled before this list).
const DENIED_V6: &[([u16; 8], u8)] = &[
    ([0, 0, 0, 0, 0, 0, 0, 0], 128),         // unspecified
    ([0, 0, 0, 0, 0, 0, 0, 1], 128),         // loopback
    ([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48),  // local-use NAT64 (RFC 8215)
    ([0x100, 0, 0, 0, 0, 0, 0, 0], 64),      // discard-only
    ([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32), // documentation
    ([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7),      // ULA
    ([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10),     // link-local
    ([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10),     // deprecated site-local
    ([0xff00, 0, 0, 0, 0, 0, 0, 0], 8),      // multicast
];

use peerlink_proto::addr::canonical;

fn v4_denied(ip: Ipv4Addr) -> bool {
    let a = u32::from(ip);
    DENIED_V4.iter().any(|&(net, len)| {
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
        a & mask == u32::from(Ipv4Addr::from(net)) & mask
    })
}

fn v6_denied(ip: Ipv6Addr) -> bool {
    let a = u128::from(ip);
    DENIED_V6.iter().any(|&(net, len)| {
        let mask = if len == 0 {
            0
        } else {
            u128::MAX << (128 - len)
        };
        a & mask == u128::from(Ipv6Addr::from(net)) & mask
    })
}

/// Whether the built-in policy denies `ip` (after unwrapping IPv4-in-IPv6 spellings).
pub fn builtin_denied(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => v4_denied(v4),
        IpAddr::V6(v6) => v6_denied(v6),
    }
}

/// The verdict on one peer address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The peer may be reached.
    Allowed,
    /// One of the relay's own listener/service sockets.
    ServicePort,
    /// In a denied range (built-in or `deny_peers`).
    DeniedRange,
}

/// Compiled peer policy of one core.
#[derive(Clone, Debug)]
pub struct PeerPolicy {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
    relay_ips: Vec<IpAddr>,
    port_range: RangeInclusive<u16>,
    services: Vec<SocketAddr>,
}

impl PeerPolicy {
    /// Compile the policy from the configuration.
    pub fn new(cfg: &CoreConfig) -> Self {
        let mut services = vec![cfg.listener_addr];
        services.extend(cfg.service_ports.iter().copied());
        PeerPolicy {
            allow: cfg.allow_peers.clone(),
            deny: cfg.deny_peers.clone(),
            relay_ips: cfg.relay_addrs.iter().map(|ip| canonical(*ip)).collect(),
            port_range: cfg.port_range.clone(),
            services,
        }
    }

    fn is_relay_host(&self, ip: IpAddr) -> bool {
        self.relay_ips.contains(&ip)
    }

    fn is_service(&self, ip: IpAddr, port: u16) -> bool {
        self.services.iter().any(|s| {
            if s.port() != port {
                return false;
            }
            let sip = canonical(s.ip());
            // A wildcard-bound service answers on every address of the host we know of.
            sip == ip
                || (sip.is_unspecified()
                    && (ip.is_loopback() || ip.is_unspecified() || self.is_relay_host(ip)))
        })
    }

    /// Judge `peer`.
    pub fn check(&self, peer: SocketAddr) -> Verdict {
        let raw = peer.ip();
        let ip = canonical(raw);
        if self.is_service(ip, peer.port()) {
            return Verdict::ServicePort;
        }
        if self
            .allow
            .iter()
            .any(|n| n.contains(&ip) || n.contains(&raw))
        {
            return Verdict::Allowed;
        }
        if self.is_relay_host(ip) && self.port_range.contains(&peer.port()) {
            return Verdict::Allowed;
        }
        if self
            .deny
            .iter()
            .any(|n| n.contains(&ip) || n.contains(&raw))
            || builtin_denied(raw)
        {
            return Verdict::DeniedRange;
        }
        Verdict::Allowed
    }

    /// Whether `peer` may be reached.
    pub fn allowed(&self, peer: SocketAddr) -> bool {
        self.check(peer) == Verdict::Allowed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn cfg() -> CoreConfig {
        let mut c = CoreConfig::new(
            "r",
            "203.0.113.7:3478".parse().unwrap(),
            vec!["203.0.113.7".parse().unwrap()],
            [7; 32],
        );
        c.port_range = 50000..=50100;
        c.service_ports = vec!["0.0.0.0:9641".parse().unwrap()];
        c
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn every_denied_range_is_denied_and_public_allowed() {
        let p = PeerPolicy::new(&cfg());
        let denied = [
            "127.0.0.1:9",
            "127.255.1.2:9",
            "0.0.0.0:9",
            "0.1.2.3:9",
            "10.1.2.3:9",
            "172.16.0.1:9",
            "172.31.255.255:9",
            "192.168.1.1:9",
            "169.254.169.254:80",
            "100.64.0.1:9",
            "100.127.255.254:9",
            "224.0.0.1:9",
            "239.255.255.250:1900",
            "240.0.0.1:9",
            "255.255.255.255:9",
            "192.0.2.1:9",
            "198.51.100.1:9",
            "203.0.113.1:9",
            "198.18.0.1:9",
            "198.19.255.255:9",
            "192.0.0.8:9",
            "[::]:9",
            "[::1]:9",
            "[fe80::1]:9",
            "[febf::1]:9",
            "[fc00::1]:9",
            "[fd12:3456::1]:9",
            "[ff02::1]:9",
            "[ff0e::1]:9",
            "[2001:db8::1]:9",
            // IPv4-in-IPv6 spellings of denied IPv4 addresses
            "[::ffff:127.0.0.1]:9",
            "[::ffff:10.0.0.1]:9",
            "[::ffff:169.254.169.254]:80",
            "[::127.0.0.1]:9",
            "[::10.0.0.1]:9",
            "[64:ff9b::7f00:1]:9",
            "[64:ff9b::a00:1]:9",
            "[64:ff9b::a9fe:a9fe]:80",
            "[2002:7f00:1::]:9",
            "[2002:a00:1::1]:9",
            "[2002:c0a8:101::]:9",
            "[64:ff9b:1::1]:9",
        ];
        for d in denied {
            assert_eq!(p.check(sa(d)), Verdict::DeniedRange, "{d} must be denied");
        }
        let allowed = [
            "8.8.8.8:53",
            "1.1.1.1:9",
            "172.32.0.1:9",
            "100.128.0.1:9",
            "198.20.0.1:9",
            "[2606:4700::1111]:9",
            "[::ffff:8.8.8.8]:9",
            "[64:ff9b::808:808]:9",
            "[2002:808:808::]:9",
        ];
        for a in allowed {
            assert_eq!(p.check(sa(a)), Verdict::Allowed, "{a} must be allowed");
        }
    }

    #[test]
    fn service_ports_denied_own_relayed_range_allowed() {
        let p = PeerPolicy::new(&cfg());
        // own relayed addresses (in a documentation range) are legitimate peers
        assert_eq!(p.check(sa("203.0.113.7:50000")), Verdict::Allowed);
        assert_eq!(p.check(sa("203.0.113.7:50100")), Verdict::Allowed);
        assert_eq!(p.check(sa("[::ffff:203.0.113.7]:50050")), Verdict::Allowed);
        // ... but not outside the port range, nor the listener / service ports
        assert_eq!(p.check(sa("203.0.113.7:50101")), Verdict::DeniedRange);
        assert_eq!(p.check(sa("203.0.113.7:3478")), Verdict::ServicePort);
        assert_eq!(p.check(sa("203.0.113.7:9641")), Verdict::ServicePort);
        assert_eq!(
            p.check(sa("[::ffff:203.0.113.7]:3478")),
            Verdict::ServicePort
        );
        assert_eq!(p.check(sa("127.0.0.1:9641")), Verdict::ServicePort);
    }

    #[test]
    fn allow_peers_overrides_ranges_not_services() {
        let mut c = cfg();
        c.allow_peers = vec!["127.0.0.0/8".parse().unwrap()];
        c.deny_peers = vec!["8.8.8.0/24".parse().unwrap()];
        c.listener_addr = sa("127.0.0.1:3478");
        let p = PeerPolicy::new(&c);
        assert_eq!(p.check(sa("127.0.0.1:5000")), Verdict::Allowed);
        assert_eq!(p.check(sa("[::ffff:127.0.0.1]:5000")), Verdict::Allowed);
        assert_eq!(p.check(sa("127.0.0.1:3478")), Verdict::ServicePort);
        assert_eq!(p.check(sa("10.0.0.1:5000")), Verdict::DeniedRange);
        assert_eq!(p.check(sa("8.8.8.8:53")), Verdict::DeniedRange);
    }

    #[test]
    fn teredo_client_is_checked() {
        // Teredo client 10.0.0.1 is stored bit-inverted in the last 32 bits.
        let p = PeerPolicy::new(&cfg());
        assert_eq!(
            p.check(sa("[2001:0:4136:e378:8000:63bf:f5ff:fffe]:9")),
            Verdict::DeniedRange
        );
    }
}
