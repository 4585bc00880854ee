//! peerlink-proto: the wire formats of peerlink, with no I/O.
//!
//! What it is: a zero-copy STUN/TURN codec (RFC 8489, RFC 8656, RFC 5780 and RFC 8445
//! attributes; parsing borrows from the datagram, encoding writes into a caller buffer),
//! TURN ChannelData framing, stream framing for TURN over TCP/TLS ([`stream`]), the RFC 7983 first-byte demultiplexer, credentials (long-term
//! and short-term keys, MESSAGE-INTEGRITY / -SHA256 / FINGERPRINT, TURN REST ephemeral
//! credentials compatible with coturn's `use-auth-secret`), and [`addr`] (the IPv4 address an
//! IPv6 spelling carries, for the address policies of the relay and signaling).
//!
//! What it is not: no sockets, no clock reads, no randomness of its own (callers pass `now`
//! and an RNG), no allocation or session state machines — the relay, signaling and client
//! crates build those on top.
//!
//! ```
//! use peerlink_proto::attrs::{Username, XorMappedAddress};
//! use peerlink_proto::{Message, MessageBuilder, MessageType, TransactionId};
//!
//! // A client's Binding request, short-term (ICE) credentials.
//! let key = peerlink_proto::auth::short_term_key("ice-password");
//! let mut buf = [0u8; 128];
//! let mut b = MessageBuilder::new(&mut buf, MessageType::BINDING_REQUEST, TransactionId([1; 12]))?;
//! b.add(&Username("remote:local"))?;
//! b.add_integrity(key)?;
//! b.add_fingerprint()?;
//! let n = b.finish();
//!
//! // The server side: parse (validates length, chain and FINGERPRINT), check, answer.
//! let req = Message::parse(&buf[..n])?;
//! assert!(req.unknown_comprehension_required().is_empty());
//! req.verify_integrity(key)?;
//! assert_eq!(req.get::<Username>(), Some(Ok(Username("remote:local"))));
//!
//! let mut out = [0u8; 128];
//! let mut r = MessageBuilder::new(&mut out, MessageType::BINDING_SUCCESS, req.transaction_id())?;
//! r.add(&XorMappedAddress("192.0.2.1:3478".parse()?))?;
//! r.add_fingerprint()?;
//! let m = r.finish();
//! assert_eq!(Message::parse(&out[..m])?.get::<XorMappedAddress>().map(|a| a.map(|a| a.0.port())), Some(Ok(3478)));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

pub mod addr;
pub mod attrs;
pub mod auth;
pub mod channel;
pub mod demux;
pub mod error_code;
pub mod ice;
pub mod stream;
pub mod stun;

#[doc(hidden)]
pub mod fuzzing;

pub use attrs::{AddressFamily, attr_type};
pub use channel::{ChannelData, ChannelDataError};
pub use demux::{PacketKind, classify};
pub use error_code::reason_phrase;
pub use stun::{
    AttrError, Attribute, Class, EncodeError, HEADER_LEN, IntegrityError, MAGIC_COOKIE, Message,
    MessageBuilder, MessageType, Method, ParseError, RawAttribute, RawAttributes, TransactionId,
    UnknownAttrs,
};
