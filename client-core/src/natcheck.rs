//! NAT behaviour discovery (RFC 5780) against a STUN server with an alternate address: the
//! messages, and the classification of what the tests observed.
//!
//! The tests (run by the caller, which owns the sockets and the clock; `peerlink-sim nat-check`
//! drives them) and what each decides:
//!
//! * **Mapping** (RFC 5780 section 4.3): from one socket, Binding to the primary address
//!   (`IP1:P1`), to the alternate IP with the primary port (`IP2:P1`) and to the alternate
//!   address (`IP2:P2`). The same mapped address for all: endpoint-independent; a new one for a
//!   new IP only: address-dependent; a new one for a new port too: address-and-port-dependent.
//! * **Filtering** (section 4.4), from a fresh socket that has sent to nothing else: Binding to
//!   the primary address with CHANGE-REQUEST (change IP and port). An answer (it comes from
//!   `IP2:P2`): endpoint-independent. Otherwise with CHANGE-REQUEST (change port): an answer
//!   (from `IP1:P2`) means address-dependent; none, address-and-port-dependent.
//! * **Port allocation**: several fresh sockets ask the primary address, in order. Mapped port
//!   equal to the local port on every socket: `preserving`; consecutive mapped ports a constant
//!   small step apart: `sequential` with that delta; anything else: `random`.
//! * **Hairpinning** (section 4.6): a second socket sends to the first socket's mapped address;
//!   if the first socket receives it, the NAT hairpins.
//!
//! What it is not: no sockets, no clock, no retransmission policy (the caller's); no TCP test
//! and no binding-lifetime discovery (section 4.5).

use std::net::SocketAddr;

use peerlink_proto::attrs::{
    ChangeRequest, ErrorCode, OtherAddress, ResponseOrigin, XorMappedAddress,
};
use peerlink_proto::{Class, Message, MessageBuilder, MessageType, Method, TransactionId};
use serde::Serialize;

pub use peerlink_api::signaling::{
    NatClass, NatFiltering as Filtering, NatMapping as Mapping, NatPortAllocation as PortAllocation,
};

/// The classification of one network, as `peerlink-sim nat-check --json` prints it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NatReport {
    /// Mapping behaviour.
    pub mapping: Mapping,
    /// Filtering behaviour.
    pub filtering: Filtering,
    /// Port allocation.
    pub port_allocation: PortAllocation,
    /// The step between consecutive mappings when `port_allocation` is sequential.
    pub port_delta: Option<i32>,
    /// Whether the NAT forwards a packet from inside to its own mapped address back inside.
    pub hairpin: bool,
    /// False when the mapped address is the local one (no NAT on the path).
    pub nat: bool,
    /// The mapped address of the first test.
    pub mapped: SocketAddr,
}

impl NatReport {
    /// What a party tells its peer.
    pub fn class(&self) -> NatClass {
        NatClass {
            mapping: self.mapping,
            filtering: self.filtering,
            port_allocation: self.port_allocation,
            port_delta: self.port_delta,
            hairpin: self.hairpin,
        }
    }
}

/// Largest constant step between consecutive mappings still called sequential.
pub const MAX_SEQUENTIAL_DELTA: i32 = NatClass::MAX_PORT_DELTA;

/// A Binding request, with CHANGE-REQUEST when either flag is set, into a new buffer.
pub fn binding_request(tid: TransactionId, change_ip: bool, change_port: bool) -> Vec<u8> {
    let mut buf = vec![0u8; 64];
    let n = (|| -> Result<usize, peerlink_proto::EncodeError> {
        let mut b = MessageBuilder::new(&mut buf, MessageType::BINDING_REQUEST, tid)?;
        if change_ip || change_port {
            b.add(&ChangeRequest {
                change_ip,
                change_port,
            })?;
        }
        b.add_fingerprint()?;
        Ok(b.finish())
    })()
    .unwrap_or(0);
    buf.truncate(n);
    buf
}

/// What a Binding success response says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BindingAnswer {
    /// XOR-MAPPED-ADDRESS: the request's source as the server saw it.
    pub mapped: SocketAddr,
    /// RESPONSE-ORIGIN: the server address that sent the answer.
    pub origin: Option<SocketAddr>,
    /// OTHER-ADDRESS: the server's alternate address (IP2:P2).
    pub other: Option<SocketAddr>,
}

/// Why a datagram is not the answer to a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnswerError {
    /// Not a STUN message, or not a Binding response.
    #[error("not a STUN Binding response")]
    NotBinding,
    /// A response to another transaction.
    #[error("a response to another transaction")]
    OtherTransaction,
    /// An error response (e.g. 420: the server has no alternate address for CHANGE-REQUEST).
    #[error("error response {code}: {reason}")]
    Error {
        /// ERROR-CODE.
        code: u16,
        /// Its reason phrase.
        reason: String,
    },
    /// A success response without XOR-MAPPED-ADDRESS.
    #[error("Binding response without XOR-MAPPED-ADDRESS")]
    NoMappedAddress,
}

/// Parses the answer to the request with transaction id `tid`.
pub fn parse_answer(datagram: &[u8], tid: TransactionId) -> Result<BindingAnswer, AnswerError> {
    let msg = Message::parse(datagram).map_err(|_| AnswerError::NotBinding)?;
    if msg.method() != Method::BINDING || msg.class() == Class::Request {
        return Err(AnswerError::NotBinding);
    }
    if msg.transaction_id() != tid {
        return Err(AnswerError::OtherTransaction);
    }
    if msg.class() == Class::Error {
        let (code, reason) = match msg.get::<ErrorCode>() {
            Some(Ok(e)) => (e.code, e.reason.to_owned()),
            _ => (0, String::new()),
        };
        return Err(AnswerError::Error { code, reason });
    }
    let mapped = match msg.get::<XorMappedAddress>() {
        Some(Ok(XorMappedAddress(a))) => a,
        _ => return Err(AnswerError::NoMappedAddress),
    };
    let origin = match msg.get::<ResponseOrigin>() {
        Some(Ok(ResponseOrigin(a))) => Some(a),
        _ => None,
    };
    let other = match msg.get::<OtherAddress>() {
        Some(Ok(OtherAddress(a))) => Some(a),
        _ => None,
    };
    Ok(BindingAnswer {
        mapped,
        origin,
        other,
    })
}

/// Mapping behaviour from the mapped addresses seen by the primary address (`m1`), the
/// alternate IP with the primary port (`m2`) and the alternate address (`m3`).
pub fn classify_mapping(m1: SocketAddr, m2: SocketAddr, m3: SocketAddr) -> Mapping {
    if m1 == m2 {
        Mapping::EndpointIndependent
    } else if m2 == m3 {
        Mapping::AddressDependent
    } else {
        Mapping::AddressAndPortDependent
    }
}

/// Filtering behaviour from whether an answer came from the other IP and port
/// (`from_other_address`) and, when not, whether one came from the other port alone.
pub fn classify_filtering(from_other_address: bool, from_other_port: bool) -> Filtering {
    if from_other_address {
        Filtering::EndpointIndependent
    } else if from_other_port {
        Filtering::AddressDependent
    } else {
        Filtering::AddressAndPortDependent
    }
}

/// Port allocation from `(local port, mapped port)` of fresh sockets in the order their first
/// packets left (at least two samples for a pattern; one sample or none gives `Random` unless
/// it preserves).
pub fn classify_ports(samples: &[(u16, u16)]) -> (PortAllocation, Option<i32>) {
    if !samples.is_empty() && samples.iter().all(|(local, mapped)| local == mapped) {
        return (PortAllocation::Preserving, None);
    }
    let deltas: Vec<i32> = samples
        .windows(2)
        .map(|w| i32::from(w[1].1) - i32::from(w[0].1))
        .collect();
    match deltas.first() {
        Some(&d) if d != 0 && d.abs() <= MAX_SEQUENTIAL_DELTA && deltas.iter().all(|&x| x == d) => {
            (PortAllocation::Sequential, Some(d))
        }
        _ => (PortAllocation::Random, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn mapping_follows_which_destinations_got_new_mappings() {
        let (a, b, c) = (
            sa("203.0.113.1:4000"),
            sa("203.0.113.1:4001"),
            sa("203.0.113.1:4002"),
        );
        assert_eq!(classify_mapping(a, a, a), Mapping::EndpointIndependent);
        assert_eq!(classify_mapping(a, b, b), Mapping::AddressDependent);
        assert_eq!(classify_mapping(a, b, c), Mapping::AddressAndPortDependent);
    }

    #[test]
    fn filtering_follows_which_changed_answers_arrived() {
        assert_eq!(
            classify_filtering(true, true),
            Filtering::EndpointIndependent
        );
        assert_eq!(
            classify_filtering(true, false),
            Filtering::EndpointIndependent
        );
        assert_eq!(classify_filtering(false, true), Filtering::AddressDependent);
        assert_eq!(
            classify_filtering(false, false),
            Filtering::AddressAndPortDependent
        );
    }

    #[test]
    fn ports_preserving_sequential_or_random() {
        assert_eq!(
            classify_ports(&[(40000, 40000), (40007, 40007)]),
            (PortAllocation::Preserving, None)
        );
        assert_eq!(
            classify_ports(&[(40000, 1024), (40007, 1025), (40011, 1026)]),
            (PortAllocation::Sequential, Some(1))
        );
        assert_eq!(
            classify_ports(&[(1, 5000), (2, 4998), (3, 4996)]),
            (PortAllocation::Sequential, Some(-2))
        );
        assert_eq!(
            classify_ports(&[(1, 5000), (2, 5001), (3, 5003)]),
            (PortAllocation::Random, None)
        );
        assert_eq!(
            classify_ports(&[(1, 5000), (2, 9000)]),
            (PortAllocation::Random, None)
        );
        assert_eq!(classify_ports(&[]), (PortAllocation::Random, None));
        assert_eq!(classify_ports(&[(1, 7)]), (PortAllocation::Random, None));
        // A repeated port is not a sequence.
        assert_eq!(
            classify_ports(&[(1, 7), (2, 7)]),
            (PortAllocation::Random, None)
        );
    }

    #[test]
    fn requests_and_answers_round_trip() {
        let tid = TransactionId([5; 12]);
        let req = binding_request(tid, true, false);
        let m = Message::parse(&req).unwrap();
        assert_eq!(m.message_type(), MessageType::BINDING_REQUEST);
        assert_eq!(
            m.get::<ChangeRequest>().unwrap().unwrap(),
            ChangeRequest {
                change_ip: true,
                change_port: false
            }
        );
        assert!(
            Message::parse(&binding_request(tid, false, false))
                .unwrap()
                .get::<ChangeRequest>()
                .is_none()
        );

        let mut buf = vec![0u8; 256];
        let mut b = MessageBuilder::new(
            &mut buf,
            MessageType::new(Class::Success, Method::BINDING),
            tid,
        )
        .unwrap();
        b.add(&XorMappedAddress(sa("203.0.113.5:6000"))).unwrap();
        b.add(&ResponseOrigin(sa("198.51.100.1:3478"))).unwrap();
        b.add(&OtherAddress(sa("198.51.100.2:3479"))).unwrap();
        let n = b.finish();
        let ans = parse_answer(&buf[..n], tid).unwrap();
        assert_eq!(ans.mapped, sa("203.0.113.5:6000"));
        assert_eq!(ans.origin, Some(sa("198.51.100.1:3478")));
        assert_eq!(ans.other, Some(sa("198.51.100.2:3479")));
        assert_eq!(
            parse_answer(&buf[..n], TransactionId([6; 12])),
            Err(AnswerError::OtherTransaction)
        );
        assert_eq!(parse_answer(&req, tid), Err(AnswerError::NotBinding));
        assert_eq!(parse_answer(b"junk", tid), Err(AnswerError::NotBinding));

        let mut b = MessageBuilder::new(
            &mut buf,
            MessageType::new(Class::Error, Method::BINDING),
            tid,
        )
        .unwrap();
        b.add(&ErrorCode::new(420)).unwrap();
        let n = b.finish();
        assert!(matches!(
            parse_answer(&buf[..n], tid),
            Err(AnswerError::Error { code: 420, .. })
        ));
    }

    proptest::proptest! {
        /// Any bytes: a parse error or an answer, never a panic.
        #[test]
        fn parse_answer_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = parse_answer(&bytes, TransactionId([1; 12]));
        }
    }
}
