//! Candidate policy: which addresses an offer, an answer, a trickled candidate or an ICE
//! restart may carry.
//!
//! Signaling never sends anything to a candidate address: it only forwards candidates from
//! one client to the other, so a candidate is no request forgery risk for the server. Host
//! candidates in private (RFC 1918), shared (100.64.0.0/10), link-local and unique-local
//! ranges are what nearly every client has, and what two hosts on one LAN connect over, so
//! they are accepted as ICE does everywhere. Refused are only the addresses that can never be
//! a peer's ([`NEVER_A_PEER_V4`]: unspecified, "this network", multicast, reserved and
//! broadcast; `::` and `ff00::/8`), loopback unless the node allows it, and the operator's
//! own `--deny-candidate` ranges. Every IPv6 spelling of an IPv4 address is judged as that
//! IPv4 address ([`peerlink_proto::addr::canonical`]).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use peerlink_proto::addr::canonical;

/// IPv4 ranges that are never a peer's address: (network, prefix length, what it is).
pub const NEVER_A_PEER_V4: &[([u8; 4], u8, &str)] = &[
    ([0, 0, 0, 0], 8, "\"this network\" (0.0.0.0/8)"),
    ([224, 0, 0, 0], 4, "multicast"),
    ([255, 255, 255, 255], 32, "broadcast"),
    ([240, 0, 0, 0], 4, "reserved (240.0.0.0/4)"),
];

/// Most `--deny-candidate` ranges a node accepts (each candidate is checked against all).
pub const MAX_DENY_RANGES: usize = 1024;

/// Why a candidate address is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// An address no peer can have (unspecified, multicast, broadcast, reserved).
    NotAPeer(&'static str),
    /// Loopback, on a node that does not accept it.
    Loopback,
    /// In a range the operator denied.
    Denied(IpNet),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NotAPeer(what) => write!(f, "is {what}, never a peer address"),
            Refusal::Loopback => f.write_str(
                "is loopback, accepted only by a node that listens on loopback or runs with \
                 --allow-loopback-candidates",
            ),
            Refusal::Denied(net) => {
                write!(f, "is in {net}, denied by this node (--deny-candidate)")
            }
        }
    }
}

/// The compiled policy of one node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CandidatePolicy {
    /// Ranges refused beyond the built-in ones (`--deny-candidate`).
    pub deny: Vec<IpNet>,
    /// Accept loopback candidates (`127.0.0.0/8`, `::1`).
    pub allow_loopback: bool,
}

fn v4_never_a_peer(ip: Ipv4Addr) -> Option<&'static str> {
    if ip.is_unspecified() {
        return Some("unspecified");
    }
    let a = u32::from(ip);
    NEVER_A_PEER_V4.iter().find_map(|&(net, len, what)| {
        let mask = u32::MAX << (32 - u32::from(len));
        (a & mask == u32::from(Ipv4Addr::from(net)) & mask).then_some(what)
    })
}

fn v6_never_a_peer(ip: Ipv6Addr) -> Option<&'static str> {
    if ip.is_unspecified() {
        Some("unspecified")
    } else if ip.is_multicast() {
        Some("multicast")
    } else {
        None
    }
}

impl CandidatePolicy {
    /// Judge one candidate address.
    pub fn check(&self, raw: IpAddr) -> Result<(), Refusal> {
        // `::` and `::1` before unwrapping: as IPv4-compatible spellings they would read as
        // 0.0.0.0 and 0.0.0.1.
        let ip = match raw {
            IpAddr::V6(v6) if v6.is_unspecified() || v6.is_loopback() => raw,
            _ => canonical(raw),
        };
        let never = match ip {
            IpAddr::V4(v4) => v4_never_a_peer(v4),
            IpAddr::V6(v6) => v6_never_a_peer(v6),
        };
        if let Some(what) = never {
            return Err(Refusal::NotAPeer(what));
        }
        if ip.is_loopback() && !self.allow_loopback {
            return Err(Refusal::Loopback);
        }
        if let Some(net) = self
            .deny
            .iter()
            .find(|n| n.contains(&ip) || n.contains(&raw))
        {
            return Err(Refusal::Denied(*net));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(p: &CandidatePolicy, s: &str) -> Result<(), Refusal> {
        p.check(s.parse().expect("address"))
    }

    #[test]
    fn host_addresses_of_real_clients_are_accepted_by_default() {
        let p = CandidatePolicy::default();
        for a in [
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.20",
            "100.64.0.1",
            "100.66.1.2",
            "100.127.255.254",
            "169.254.10.20",
            "203.0.113.7",
            "198.51.100.1",
            "8.8.8.8",
            "223.255.255.255",
            "fe80::1",
            "fc00::1",
            "fd12:3456::1",
            "2001:db8::1",
            "2606:4700::1111",
            "::ffff:10.0.0.1",
            "::ffff:203.0.113.5",
            "64:ff9b::c0a8:101",
        ] {
            assert_eq!(check(&p, a), Ok(()), "{a}");
        }
    }

    #[test]
    fn addresses_no_peer_can_have_are_refused_in_every_spelling() {
        let p = CandidatePolicy {
            allow_loopback: true,
            ..CandidatePolicy::default()
        };
        for a in [
            "0.0.0.0",
            "0.1.2.3",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "254.1.2.3",
            "255.255.255.255",
            "::",
            "ff02::1",
            "ff0e::1",
            "::ffff:0.0.0.0",
            "::ffff:224.0.0.1",
            "::ffff:255.255.255.255",
            "::240.0.0.1",
            "64:ff9b::e000:1",
            "2002:e000:1::",
            "::2",
        ] {
            assert!(
                matches!(check(&p, a), Err(Refusal::NotAPeer(_))),
                "{a}: {:?}",
                check(&p, a)
            );
        }
    }

    #[test]
    fn loopback_only_when_allowed() {
        let strict = CandidatePolicy::default();
        let demo = CandidatePolicy {
            allow_loopback: true,
            ..CandidatePolicy::default()
        };
        for a in ["127.0.0.1", "127.255.0.9", "::1", "::ffff:127.0.0.1"] {
            assert_eq!(check(&strict, a), Err(Refusal::Loopback), "{a}");
            assert_eq!(check(&demo, a), Ok(()), "{a}");
        }
    }

    #[test]
    fn operator_ranges_are_refused_in_every_spelling() {
        let p = CandidatePolicy {
            deny: vec![
                "10.0.0.0/8".parse().expect("net"),
                "fd00::/8".parse().expect("net"),
            ],
            allow_loopback: false,
        };
        for a in ["10.9.8.7", "::ffff:10.9.8.7", "64:ff9b::a09:807", "fd12::1"] {
            assert!(matches!(check(&p, a), Err(Refusal::Denied(_))), "{a}");
        }
        assert_eq!(check(&p, "192.168.1.1"), Ok(()));
        assert_eq!(check(&p, "fc00::1"), Ok(()));
        let e = check(&p, "10.1.1.1").expect_err("denied");
        assert_eq!(
            e.to_string(),
            "is in 10.0.0.0/8, denied by this node (--deny-candidate)"
        );
    }
}
