//! Candidates: our own type and conversions to/from the signaling wire type.

use std::net::SocketAddr;

use peerlink_api::signaling as sig;
use peerlink_proto::ice::{
    TYPE_PREF_HOST, TYPE_PREF_PEER_REFLEXIVE, TYPE_PREF_RELAYED, TYPE_PREF_SERVER_REFLEXIVE,
    candidate_priority,
};

/// The kind of a candidate (RFC 8445 section 5.1.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CandidateKind {
    /// A local interface address.
    Host,
    /// Our NAT mapping as a STUN server saw it.
    ServerReflexive,
    /// Learned from a connectivity check (a NAT mapping nobody announced).
    PeerReflexive,
    /// A TURN relayed address.
    Relayed,
}

impl CandidateKind {
    /// RFC 8445 type preference of this kind.
    pub fn type_preference(self) -> u8 {
        match self {
            CandidateKind::Host => TYPE_PREF_HOST,
            CandidateKind::ServerReflexive => TYPE_PREF_SERVER_REFLEXIVE,
            CandidateKind::PeerReflexive => TYPE_PREF_PEER_REFLEXIVE,
            CandidateKind::Relayed => TYPE_PREF_RELAYED,
        }
    }

    fn short(self) -> &'static str {
        match self {
            CandidateKind::Host => "h",
            CandidateKind::ServerReflexive => "s",
            CandidateKind::PeerReflexive => "p",
            CandidateKind::Relayed => "r",
        }
    }
}

/// One transport address a peer may be reached at (component 1, UDP).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// What kind of address this is.
    pub kind: CandidateKind,
    /// The transport address.
    pub addr: SocketAddr,
    /// The base: the local socket address it was derived from (itself for host and relayed).
    pub base: SocketAddr,
    /// RFC 8445 priority.
    pub priority: u32,
    /// Foundation (same kind + base IP + server -> same foundation).
    pub foundation: String,
    /// Component id (always 1 here).
    pub component: u8,
}

impl Candidate {
    /// A candidate with the RFC 8445 priority for `kind` and `local_pref`.
    pub fn new(kind: CandidateKind, addr: SocketAddr, base: SocketAddr, local_pref: u16) -> Self {
        let priority = candidate_priority(kind.type_preference(), local_pref, 1);
        let foundation = foundation_of(kind, base);
        Candidate {
            kind,
            addr,
            base,
            priority,
            foundation,
            component: 1,
        }
    }
}

/// A short deterministic foundation: kind letter + a hash of the base IP (ice-chars only).
fn foundation_of(kind: CandidateKind, base: SocketAddr) -> String {
    // FNV-1a over the IP octets: stable across runs, no RNG needed.
    let mut h: u32 = 0x811c_9dc5;
    let bytes: Vec<u8> = match base.ip() {
        std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
        std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    for b in bytes {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{}{:08x}", kind.short(), h)
}

/// Why a signaling candidate was not accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CandidateError {
    /// Component other than 1 (we run one component).
    #[error("unsupported component {0}")]
    Component(u8),
    /// Port 0 is not a reachable transport address.
    #[error("port 0")]
    PortZero,
    /// Foundation empty or longer than 32 characters.
    #[error("bad foundation")]
    Foundation,
}

impl From<&Candidate> for sig::Candidate {
    fn from(c: &Candidate) -> Self {
        let related = (c.kind != CandidateKind::Host && c.base != c.addr).then_some(c.base);
        sig::Candidate {
            foundation: c.foundation.clone(),
            component: c.component,
            transport: sig::Transport::Udp,
            priority: c.priority,
            address: c.addr.ip(),
            port: c.addr.port(),
            kind: match c.kind {
                CandidateKind::Host => sig::CandidateType::Host,
                CandidateKind::ServerReflexive => sig::CandidateType::Srflx,
                CandidateKind::PeerReflexive => sig::CandidateType::Prflx,
                CandidateKind::Relayed => sig::CandidateType::Relay,
            },
            related_address: related.map(|r| r.ip()),
            related_port: related.map(|r| r.port()),
        }
    }
}

impl From<Candidate> for sig::Candidate {
    fn from(c: Candidate) -> Self {
        sig::Candidate::from(&c)
    }
}

impl TryFrom<&sig::Candidate> for Candidate {
    type Error = CandidateError;
    fn try_from(c: &sig::Candidate) -> Result<Self, Self::Error> {
        if c.component != 1 {
            return Err(CandidateError::Component(c.component));
        }
        if c.port == 0 {
            return Err(CandidateError::PortZero);
        }
        if c.foundation.is_empty() || c.foundation.len() > 32 {
            return Err(CandidateError::Foundation);
        }
        let addr = SocketAddr::new(c.address, c.port);
        let base = match (c.related_address, c.related_port) {
            (Some(ip), Some(port)) => SocketAddr::new(ip, port),
            _ => addr,
        };
        Ok(Candidate {
            kind: match c.kind {
                sig::CandidateType::Host => CandidateKind::Host,
                sig::CandidateType::Srflx => CandidateKind::ServerReflexive,
                sig::CandidateType::Prflx => CandidateKind::PeerReflexive,
                sig::CandidateType::Relay => CandidateKind::Relayed,
            },
            addr,
            base,
            priority: c.priority,
            foundation: c.foundation.clone(),
            component: 1,
        })
    }
}

impl TryFrom<sig::Candidate> for Candidate {
    type Error = CandidateError;
    fn try_from(c: sig::Candidate) -> Result<Self, Self::Error> {
        Candidate::try_from(&c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signaling_round_trip() {
        let c = Candidate::new(
            CandidateKind::ServerReflexive,
            "203.0.113.1:4000".parse().unwrap(),
            "100.64.1.2:5000".parse().unwrap(),
            65535,
        );
        let s = sig::Candidate::from(&c);
        assert_eq!(s.kind, sig::CandidateType::Srflx);
        assert_eq!(s.related_port, Some(5000));
        let back = Candidate::try_from(&s).unwrap();
        assert_eq!(back, c);
        let json = serde_json::to_string(&s).unwrap();
        let parsed: sig::Candidate = serde_json::from_str(&json).unwrap();
        assert_eq!(Candidate::try_from(parsed).unwrap(), c);
    }

    #[test]
    fn bad_signaling_candidates_are_refused() {
        let c = Candidate::new(
            CandidateKind::Host,
            "203.0.113.1:4000".parse().unwrap(),
            "203.0.113.1:4000".parse().unwrap(),
            1,
        );
        let mut s = sig::Candidate::from(&c);
        s.component = 2;
        assert_eq!(Candidate::try_from(&s), Err(CandidateError::Component(2)));
        s.component = 1;
        s.port = 0;
        assert_eq!(Candidate::try_from(&s), Err(CandidateError::PortZero));
        s.port = 1;
        s.foundation = String::new();
        assert_eq!(Candidate::try_from(&s), Err(CandidateError::Foundation));
    }

    #[test]
    fn priorities_follow_type_preferences() {
        let a: SocketAddr = "203.0.113.1:1".parse().unwrap();
        let h = Candidate::new(CandidateKind::Host, a, a, 65535);
        let p = Candidate::new(CandidateKind::PeerReflexive, a, a, 65535);
        let s = Candidate::new(CandidateKind::ServerReflexive, a, a, 65535);
        let r = Candidate::new(CandidateKind::Relayed, a, a, 65535);
        assert!(h.priority > p.priority && p.priority > s.priority && s.priority > r.priority);
    }
}
