//! NAT kinds (RFC 4787 terms), what to expect between them, and their nftables rulesets.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

/// Name of every router's WAN interface.
pub const WAN_IF: &str = "wan0";
/// Name of every router's LAN bridge.
pub const LAN_IF: &str = "lan0";
/// Lifetime of an endpoint-independent mapping and of an address-restricted permission
/// (5 minutes; RFC 4787 REQ-5 asks for at least 2).
pub const MAPPING_TIMEOUT_SECS: u32 = 300;

/// The five router behaviours of the lab (RFC 4787 mapping and filtering).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NatKind {
    /// No translation: hosts behind this router have public addresses.
    Public,
    /// Endpoint-independent mapping, endpoint-independent filtering.
    FullCone,
    /// Endpoint-independent mapping, address-dependent filtering.
    AddressRestricted,
    /// Endpoint-independent mapping, address-and-port-dependent filtering.
    PortRestricted,
    /// Endpoint-dependent mapping (random port per destination), address-and-port-dependent
    /// filtering.
    Symmetric,
}

impl NatKind {
    /// All five kinds, from most to least permissive.
    pub const ALL: [NatKind; 5] = [
        NatKind::Public,
        NatKind::FullCone,
        NatKind::AddressRestricted,
        NatKind::PortRestricted,
        NatKind::Symmetric,
    ];

    /// Short lowercase label (used in namespace names and printed matrices).
    pub fn label(self) -> &'static str {
        match self {
            NatKind::Public => "public",
            NatKind::FullCone => "fullcone",
            NatKind::AddressRestricted => "addr",
            NatKind::PortRestricted => "port",
            NatKind::Symmetric => "sym",
        }
    }

    /// Whether the mapping is endpoint-independent (or there is no mapping at all).
    pub fn endpoint_independent_mapping(self) -> bool {
        self != NatKind::Symmetric
    }

    /// Whether this kind keeps a `fullcone` dynamic map (endpoint-independent mapping).
    pub(crate) fn has_fullcone_map(self) -> bool {
        matches!(
            self,
            NatKind::FullCone | NatKind::AddressRestricted | NatKind::PortRestricted
        )
    }
}

impl std::fmt::Display for NatKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// The path two peers end up on when they punch without port prediction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExpectedPath {
    /// A direct UDP path opens (possibly after peer-reflexive learning).
    Direct,
    /// No direct path: the call needs a relay.
    Relay,
}

/// The path two peers behind routers of kinds `a` and `b` end up on when they punch without
/// port prediction (symmetric in its arguments).
///
/// Everything punches directly except port-restricted ↔ symmetric and symmetric ↔ symmetric.
/// Address-restricted ↔ symmetric is direct only if the address-restricted side learns and
/// answers the peer-reflexive address the symmetric side's packets come from.
pub fn expected_path(a: NatKind, b: NatKind) -> ExpectedPath {
    use NatKind::{PortRestricted, Symmetric};
    match (a, b) {
        (Symmetric, Symmetric) | (PortRestricted, Symmetric) | (Symmetric, PortRestricted) => {
            ExpectedPath::Relay
        }
        _ => ExpectedPath::Direct,
    }
}

/// Named nftables counter (table `ip acct`) of UDP datagrams forwarded from the WAN inwards.
pub(crate) const UDP_IN: &str = "udp_in";
/// Named nftables counter (table `ip acct`) of UDP datagrams forwarded out of the WAN.
pub(crate) const UDP_OUT: &str = "udp_out";

/// Parse the `packets N` figure out of `nft list counter` output.
pub(crate) fn parse_counter_packets(listing: &str) -> Option<u64> {
    let mut words = listing.split_whitespace();
    while let Some(w) = words.next() {
        if w == "packets" {
            return words.next()?.parse().ok();
        }
    }
    None
}

/// The nftables ruleset of a router of `kind` with WAN address `wan`.
///
/// Each kind's RFC 4787 behaviour as nftables rules (a full-cone map for endpoint-independent
/// mapping, a `contacted` set for address-restricted filtering, conntrack-only filtering for
/// port-restricted and symmetric, `masquerade random` for symmetric mapping), plus the WAN
/// input drop every router needs.
pub(crate) fn router_ruleset(kind: NatKind, wan: Ipv4Addr) -> String {
    let t = MAPPING_TIMEOUT_SECS;
    let mut s = String::new();
    // Input drop on the WAN side: without it an early punch packet reaches the router's own
    // stack, confirms a conntrack entry, and the next outbound packet of a symmetric NAT
    // leaves on a new port.
    let _ = write!(
        s,
        r#"table ip fw {{
    chain input {{
        type filter hook input priority 0; policy accept;
        iif "{WAN_IF}" ct state established,related accept
        iif "{WAN_IF}" drop
    }}
}}
"#
    );
    // Accounting: UDP datagrams the router forwarded (after its filter) in each direction,
    // so tests can see traffic flow without timing guesses.
    let _ = write!(
        s,
        r#"table ip acct {{
    counter {UDP_IN} {{ }}
    counter {UDP_OUT} {{ }}
    chain forward {{
        type filter hook forward priority 10; policy accept;
        iif "{WAN_IF}" meta l4proto udp counter name "{UDP_IN}"
        oif "{WAN_IF}" meta l4proto udp counter name "{UDP_OUT}"
    }}
}}
"#
    );
    if kind.has_fullcone_map() {
        let _ = write!(
            s,
            r#"table ip nat {{
    map fullcone {{
        type inet_service : ipv4_addr . inet_service
        flags dynamic,timeout
        timeout {t}s
        size 65536
    }}
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        iif "{WAN_IF}" meta l4proto udp dnat to udp dport map @fullcone
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oif "{WAN_IF}" meta l4proto udp update @fullcone {{ udp sport timeout {t}s : ip saddr . udp sport }}
        oif "{WAN_IF}" snat to {wan}
    }}
}}
"#
        );
    }
    if kind == NatKind::Symmetric {
        let _ = write!(
            s,
            r#"table ip nat {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oif "{WAN_IF}" masquerade random
    }}
}}
"#
        );
    }
    match kind {
        NatKind::Public | NatKind::FullCone => {}
        NatKind::AddressRestricted => {
            let _ = write!(
                s,
                r#"table ip filter {{
    set contacted {{
        type ipv4_addr . inet_service
        flags dynamic,timeout
        timeout {t}s
    }}
    chain forward {{
        type filter hook forward priority 0; policy accept;
        oif "{WAN_IF}" meta l4proto udp update @contacted {{ ip daddr . udp sport timeout {t}s }}
        iif "{WAN_IF}" ct state established,related accept
        iif "{WAN_IF}" meta l4proto udp ip saddr . udp dport @contacted accept
        iif "{WAN_IF}" drop
    }}
}}
"#
            );
        }
        NatKind::PortRestricted | NatKind::Symmetric => {
            let _ = write!(
                s,
                r#"table ip filter {{
    chain forward {{
        type filter hook forward priority 0; policy accept;
        iif "{WAN_IF}" ct state established,related accept
        iif "{WAN_IF}" drop
    }}
}}
"#
            );
        }
    }
    s
}

/// What a router lets out of its LAN: everything, or only what a UDP-hostile firewall does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Egress {
    /// Everything leaves (the default).
    #[default]
    Open,
    /// No UDP leaves the LAN (every UDP datagram towards the WAN is dropped); TCP does.
    NoUdp,
    /// Only TCP to these destination ports leaves (an office network that allows HTTPS only:
    /// `TcpPorts(&[443])`); everything else towards the WAN is dropped.
    TcpPorts(&'static [u16]),
}

/// The nftables rules of `egress` on a router's forward path (empty for [`Egress::Open`]).
/// They run before the accounting counters, so dropped datagrams are not counted.
pub(crate) fn egress_ruleset(egress: Egress) -> String {
    let rules = match egress {
        Egress::Open => return String::new(),
        Egress::NoUdp => format!(r#"oif "{WAN_IF}" meta l4proto udp drop"#),
        Egress::TcpPorts(ports) => {
            let list: Vec<String> = ports.iter().map(u16::to_string).collect();
            format!(
                r#"oif "{WAN_IF}" tcp dport {{ {} }} accept
        oif "{WAN_IF}" drop"#,
                list.join(", ")
            )
        }
    };
    format!(
        r#"table ip egress {{
    chain forward {{
        type filter hook forward priority -20; policy accept;
        {rules}
    }}
}}
"#
    )
}

/// Random loss on a router's forward path, both directions, each `percent` %.
pub(crate) fn loss_ruleset(percent: u8) -> String {
    format!(
        r#"table ip linkloss {{
    chain forward {{
        type filter hook forward priority -10; policy accept;
        iif "{WAN_IF}" numgen random mod 100 < {percent} drop
        oif "{WAN_IF}" numgen random mod 100 < {percent} drop
    }}
}}
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expectation_table_is_symmetric_and_matches_netlab_md() {
        for a in NatKind::ALL {
            for b in NatKind::ALL {
                assert_eq!(expected_path(a, b), expected_path(b, a), "{a} vs {b}");
            }
        }
        let relay: Vec<_> = NatKind::ALL
            .iter()
            .flat_map(|&a| NatKind::ALL.iter().map(move |&b| (a, b)))
            .filter(|&(a, b)| expected_path(a, b) == ExpectedPath::Relay)
            .collect();
        assert_eq!(
            relay,
            vec![
                (NatKind::PortRestricted, NatKind::Symmetric),
                (NatKind::Symmetric, NatKind::PortRestricted),
                (NatKind::Symmetric, NatKind::Symmetric),
            ]
        );
    }

    #[test]
    fn rulesets_follow_the_recipes() {
        let wan = Ipv4Addr::new(203, 0, 113, 1);
        let sym = router_ruleset(NatKind::Symmetric, wan);
        assert!(sym.contains("masquerade random") && !sym.contains("fullcone"));
        let ar = router_ruleset(NatKind::AddressRestricted, wan);
        assert!(ar.contains("@contacted") && ar.contains("snat to 203.0.113.1"));
        let public = router_ruleset(NatKind::Public, wan);
        assert!(!public.contains("table ip nat") && public.contains("table ip fw"));
        // The map update must precede the snat: a nat statement ends the chain.
        let fc = router_ruleset(NatKind::FullCone, wan);
        assert!(fc.find("update @fullcone") < fc.find("snat to"));
        assert!(fc.contains("counter name \"udp_in\"") && fc.contains("priority 10"));
    }

    #[test]
    fn egress_rules_drop_what_the_firewall_forbids() {
        assert_eq!(egress_ruleset(Egress::Open), "");
        let no_udp = egress_ruleset(Egress::NoUdp);
        assert!(
            no_udp.contains("oif \"wan0\" meta l4proto udp drop"),
            "{no_udp}"
        );
        assert!(no_udp.contains("priority -20"), "before the counters");
        let https = egress_ruleset(Egress::TcpPorts(&[443, 8443]));
        let accept = https
            .find("tcp dport { 443, 8443 } accept")
            .expect("accept rule");
        let drop = https.find("oif \"wan0\" drop").expect("drop rule");
        assert!(accept < drop, "{https}");
    }

    #[test]
    fn counter_listing_parses() {
        let out = "table ip acct {\n\tcounter udp_in {\n\t\tpackets 42 bytes 1234\n\t}\n}\n";
        assert_eq!(parse_counter_packets(out), Some(42));
        assert_eq!(parse_counter_packets("nothing here"), None);
        assert_eq!(parse_counter_packets("packets x"), None);
    }
}
