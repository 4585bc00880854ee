//! Typed STUN/TURN/ICE attributes: one struct per attribute, borrowing text and bytes from the
//! datagram. Each implements [`Attribute`] (decode from a value, encode into a buffer).
//!
//! Covered: RFC 8489 (MAPPED-ADDRESS, XOR-MAPPED-ADDRESS, USERNAME, ERROR-CODE, REALM, NONCE,
//! UNKNOWN-ATTRIBUTES, SOFTWARE, ALTERNATE-SERVER), RFC 8656 (CHANNEL-NUMBER, LIFETIME,
//! XOR-PEER-ADDRESS, DATA, XOR-RELAYED-ADDRESS, REQUESTED-TRANSPORT, DONT-FRAGMENT, EVEN-PORT,
//! RESERVATION-TOKEN, REQUESTED-ADDRESS-FAMILY, ADDITIONAL-ADDRESS-FAMILY, ADDRESS-ERROR-CODE),
//! RFC 5780 (CHANGE-REQUEST, RESPONSE-ORIGIN, OTHER-ADDRESS) and RFC 8445 (PRIORITY,
//! USE-CANDIDATE, ICE-CONTROLLED, ICE-CONTROLLING). MESSAGE-INTEGRITY(-SHA256) and FINGERPRINT
//! are handled by the message itself ([`crate::stun::Message::verify_integrity`],
//! [`crate::stun::MessageBuilder::add_integrity`]).

use core::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};

use crate::channel::{CHANNEL_MAX, CHANNEL_MIN};
use crate::stun::{AttrError, Attribute, EncodeError, MAGIC_COOKIE, RawAttribute, TransactionId};

/// Attribute type codes.
pub mod attr_type {
    /// MAPPED-ADDRESS (RFC 8489).
    pub const MAPPED_ADDRESS: u16 = 0x0001;
    /// CHANGE-REQUEST (RFC 5780).
    pub const CHANGE_REQUEST: u16 = 0x0003;
    /// USERNAME (RFC 8489).
    pub const USERNAME: u16 = 0x0006;
    /// MESSAGE-INTEGRITY (RFC 8489).
    pub const MESSAGE_INTEGRITY: u16 = 0x0008;
    /// ERROR-CODE (RFC 8489).
    pub const ERROR_CODE: u16 = 0x0009;
    /// UNKNOWN-ATTRIBUTES (RFC 8489).
    pub const UNKNOWN_ATTRIBUTES: u16 = 0x000A;
    /// CHANNEL-NUMBER (RFC 8656).
    pub const CHANNEL_NUMBER: u16 = 0x000C;
    /// LIFETIME (RFC 8656).
    pub const LIFETIME: u16 = 0x000D;
    /// XOR-PEER-ADDRESS (RFC 8656).
    pub const XOR_PEER_ADDRESS: u16 = 0x0012;
    /// DATA (RFC 8656).
    pub const DATA: u16 = 0x0013;
    /// REALM (RFC 8489).
    pub const REALM: u16 = 0x0014;
    /// NONCE (RFC 8489).
    pub const NONCE: u16 = 0x0015;
    /// XOR-RELAYED-ADDRESS (RFC 8656).
    pub const XOR_RELAYED_ADDRESS: u16 = 0x0016;
    /// REQUESTED-ADDRESS-FAMILY (RFC 8656).
    pub const REQUESTED_ADDRESS_FAMILY: u16 = 0x0017;
    /// EVEN-PORT (RFC 8656).
    pub const EVEN_PORT: u16 = 0x0018;
    /// REQUESTED-TRANSPORT (RFC 8656).
    pub const REQUESTED_TRANSPORT: u16 = 0x0019;
    /// DONT-FRAGMENT (RFC 8656).
    pub const DONT_FRAGMENT: u16 = 0x001A;
    /// MESSAGE-INTEGRITY-SHA256 (RFC 8489).
    pub const MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
    /// PASSWORD-ALGORITHM (RFC 8489; not implemented by this codec).
    pub const PASSWORD_ALGORITHM: u16 = 0x001D;
    /// USERHASH (RFC 8489; not implemented by this codec).
    pub const USERHASH: u16 = 0x001E;
    /// XOR-MAPPED-ADDRESS (RFC 8489).
    pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
    /// RESERVATION-TOKEN (RFC 8656).
    pub const RESERVATION_TOKEN: u16 = 0x0022;
    /// PRIORITY (RFC 8445).
    pub const PRIORITY: u16 = 0x0024;
    /// USE-CANDIDATE (RFC 8445).
    pub const USE_CANDIDATE: u16 = 0x0025;
    /// PADDING (RFC 5780; not implemented by this codec).
    pub const PADDING: u16 = 0x0026;
    /// RESPONSE-PORT (RFC 5780; not implemented by this codec).
    pub const RESPONSE_PORT: u16 = 0x0027;
    /// ADDITIONAL-ADDRESS-FAMILY (RFC 8656).
    pub const ADDITIONAL_ADDRESS_FAMILY: u16 = 0x8000;
    /// ADDRESS-ERROR-CODE (RFC 8656).
    pub const ADDRESS_ERROR_CODE: u16 = 0x8001;
    /// PASSWORD-ALGORITHMS (RFC 8489; not implemented by this codec).
    pub const PASSWORD_ALGORITHMS: u16 = 0x8002;
    /// ALTERNATE-DOMAIN (RFC 8489; not implemented by this codec).
    pub const ALTERNATE_DOMAIN: u16 = 0x8003;
    /// ICMP (RFC 8656; not implemented by this codec).
    pub const ICMP: u16 = 0x8004;
    /// SOFTWARE (RFC 8489).
    pub const SOFTWARE: u16 = 0x8022;
    /// ALTERNATE-SERVER (RFC 8489).
    pub const ALTERNATE_SERVER: u16 = 0x8023;
    /// FINGERPRINT (RFC 8489).
    pub const FINGERPRINT: u16 = 0x8028;
    /// ICE-CONTROLLED (RFC 8445).
    pub const ICE_CONTROLLED: u16 = 0x8029;
    /// ICE-CONTROLLING (RFC 8445).
    pub const ICE_CONTROLLING: u16 = 0x802A;
    /// RESPONSE-ORIGIN (RFC 5780).
    pub const RESPONSE_ORIGIN: u16 = 0x802B;
    /// OTHER-ADDRESS (RFC 5780).
    pub const OTHER_ADDRESS: u16 = 0x802C;

    /// True for the types this codec understands (decodes, or handles in the message).
    pub const fn is_known(typ: u16) -> bool {
        matches!(
            typ,
            MAPPED_ADDRESS
                | CHANGE_REQUEST
                | USERNAME
                | MESSAGE_INTEGRITY
                | ERROR_CODE
                | UNKNOWN_ATTRIBUTES
                | CHANNEL_NUMBER
                | LIFETIME
                | XOR_PEER_ADDRESS
                | DATA
                | REALM
                | NONCE
                | XOR_RELAYED_ADDRESS
                | REQUESTED_ADDRESS_FAMILY
                | EVEN_PORT
                | REQUESTED_TRANSPORT
                | DONT_FRAGMENT
                | MESSAGE_INTEGRITY_SHA256
                | XOR_MAPPED_ADDRESS
                | RESERVATION_TOKEN
                | PRIORITY
                | USE_CANDIDATE
                | ADDITIONAL_ADDRESS_FAMILY
                | ADDRESS_ERROR_CODE
                | SOFTWARE
                | ALTERNATE_SERVER
                | FINGERPRINT
                | ICE_CONTROLLED
                | ICE_CONTROLLING
                | RESPONSE_ORIGIN
                | OTHER_ADDRESS
        )
    }

    /// The RFC name of a type, for logs.
    pub const fn name(typ: u16) -> Option<&'static str> {
        Some(match typ {
            MAPPED_ADDRESS => "MAPPED-ADDRESS",
            CHANGE_REQUEST => "CHANGE-REQUEST",
            USERNAME => "USERNAME",
            MESSAGE_INTEGRITY => "MESSAGE-INTEGRITY",
            ERROR_CODE => "ERROR-CODE",
            UNKNOWN_ATTRIBUTES => "UNKNOWN-ATTRIBUTES",
            CHANNEL_NUMBER => "CHANNEL-NUMBER",
            LIFETIME => "LIFETIME",
            XOR_PEER_ADDRESS => "XOR-PEER-ADDRESS",
            DATA => "DATA",
            REALM => "REALM",
            NONCE => "NONCE",
            XOR_RELAYED_ADDRESS => "XOR-RELAYED-ADDRESS",
            REQUESTED_ADDRESS_FAMILY => "REQUESTED-ADDRESS-FAMILY",
            EVEN_PORT => "EVEN-PORT",
            REQUESTED_TRANSPORT => "REQUESTED-TRANSPORT",
            DONT_FRAGMENT => "DONT-FRAGMENT",
            MESSAGE_INTEGRITY_SHA256 => "MESSAGE-INTEGRITY-SHA256",
            PASSWORD_ALGORITHM => "PASSWORD-ALGORITHM",
            USERHASH => "USERHASH",
            XOR_MAPPED_ADDRESS => "XOR-MAPPED-ADDRESS",
            RESERVATION_TOKEN => "RESERVATION-TOKEN",
            PRIORITY => "PRIORITY",
            USE_CANDIDATE => "USE-CANDIDATE",
            PADDING => "PADDING",
            RESPONSE_PORT => "RESPONSE-PORT",
            ADDITIONAL_ADDRESS_FAMILY => "ADDITIONAL-ADDRESS-FAMILY",
            ADDRESS_ERROR_CODE => "ADDRESS-ERROR-CODE",
            PASSWORD_ALGORITHMS => "PASSWORD-ALGORITHMS",
            ALTERNATE_DOMAIN => "ALTERNATE-DOMAIN",
            ICMP => "ICMP",
            SOFTWARE => "SOFTWARE",
            ALTERNATE_SERVER => "ALTERNATE-SERVER",
            FINGERPRINT => "FINGERPRINT",
            ICE_CONTROLLED => "ICE-CONTROLLED",
            ICE_CONTROLLING => "ICE-CONTROLLING",
            RESPONSE_ORIGIN => "RESPONSE-ORIGIN",
            OTHER_ADDRESS => "OTHER-ADDRESS",
            _ => return None,
        })
    }
}

/// USERNAME must be fewer than 513 bytes (RFC 8489 section 14.3).
pub const MAX_USERNAME_BYTES: usize = 512;
/// REALM, NONCE, SOFTWARE and reason phrases: fewer than 763 bytes when decoding.
pub const MAX_TEXT_BYTES: usize = 762;
/// REALM, NONCE, SOFTWARE and reason phrases: fewer than 128 characters.
pub const MAX_TEXT_CHARS: usize = 127;

/// An IP address family as coded in STUN (0x01 IPv4, 0x02 IPv6).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum AddressFamily {
    /// IPv4 (0x01).
    V4,
    /// IPv6 (0x02).
    V6,
}

impl AddressFamily {
    /// The wire value.
    pub const fn to_u8(self) -> u8 {
        match self {
            AddressFamily::V4 => 0x01,
            AddressFamily::V6 => 0x02,
        }
    }
    /// From the wire value.
    pub const fn from_u8(v: u8) -> Result<Self, AttrError> {
        match v {
            0x01 => Ok(AddressFamily::V4),
            0x02 => Ok(AddressFamily::V6),
            other => Err(AttrError::BadFamily(other)),
        }
    }
    /// The family of an address.
    pub const fn of(addr: &SocketAddr) -> Self {
        match addr {
            SocketAddr::V4(_) => AddressFamily::V4,
            SocketAddr::V6(_) => AddressFamily::V6,
        }
    }
}

fn check_len(typ: u16, value: &[u8], want: usize) -> Result<(), AttrError> {
    if value.len() == want {
        Ok(())
    } else if value.is_empty() {
        Err(AttrError::ZeroLength { typ })
    } else {
        Err(AttrError::BadLength {
            typ,
            len: value.len(),
        })
    }
}

fn be_u32(v: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&v[..4]);
    u32::from_be_bytes(b)
}

fn be_u64(v: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&v[..8]);
    u64::from_be_bytes(b)
}

/// The 16-byte XOR mask of IPv6 XOR addresses: magic cookie then transaction id.
fn xor_mask(tid: &TransactionId) -> [u8; 16] {
    let mut m = [0u8; 16];
    m[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    m[4..].copy_from_slice(&tid.0);
    m
}

fn decode_addr(typ: u16, v: &[u8], xor: Option<&TransactionId>) -> Result<SocketAddr, AttrError> {
    if v.is_empty() {
        return Err(AttrError::ZeroLength { typ });
    }
    if v.len() < 4 {
        return Err(AttrError::BadLength { typ, len: v.len() });
    }
    let family = AddressFamily::from_u8(v[1])?;
    let mut port = u16::from_be_bytes([v[2], v[3]]);
    if xor.is_some() {
        port ^= (MAGIC_COOKIE >> 16) as u16;
    }
    match family {
        AddressFamily::V4 => {
            if v.len() != 8 {
                return Err(AttrError::BadLength { typ, len: v.len() });
            }
            let mut a = be_u32(&v[4..8]);
            if xor.is_some() {
                a ^= MAGIC_COOKIE;
            }
            Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(a)), port))
        }
        AddressFamily::V6 => {
            if v.len() != 20 {
                return Err(AttrError::BadLength { typ, len: v.len() });
            }
            let mut a = [0u8; 16];
            a.copy_from_slice(&v[4..20]);
            if let Some(tid) = xor {
                for (b, m) in a.iter_mut().zip(xor_mask(tid)) {
                    *b ^= m;
                }
            }
            Ok(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a),
                port,
                0,
                0,
            )))
        }
    }
}

const fn addr_len(a: &SocketAddr) -> usize {
    match a {
        SocketAddr::V4(_) => 8,
        SocketAddr::V6(_) => 20,
    }
}

fn encode_addr(
    a: &SocketAddr,
    xor: Option<&TransactionId>,
    out: &mut [u8],
) -> Result<(), EncodeError> {
    let need = addr_len(a);
    let out = out_slice(out, need)?;
    out[0] = 0;
    out[1] = AddressFamily::of(a).to_u8();
    let mut port = a.port();
    if xor.is_some() {
        port ^= (MAGIC_COOKIE >> 16) as u16;
    }
    out[2..4].copy_from_slice(&port.to_be_bytes());
    match a {
        SocketAddr::V4(v4) => {
            let mut ip = u32::from(*v4.ip());
            if xor.is_some() {
                ip ^= MAGIC_COOKIE;
            }
            out[4..8].copy_from_slice(&ip.to_be_bytes());
        }
        SocketAddr::V6(v6) => {
            let mut ip = v6.ip().octets();
            if let Some(tid) = xor {
                for (b, m) in ip.iter_mut().zip(xor_mask(tid)) {
                    *b ^= m;
                }
            }
            out[4..20].copy_from_slice(&ip);
        }
    }
    Ok(())
}

fn out_slice(out: &mut [u8], need: usize) -> Result<&mut [u8], EncodeError> {
    let available = out.len();
    out.get_mut(..need).ok_or(EncodeError::BufferTooSmall {
        needed: need,
        available,
    })
}

macro_rules! address_attr {
    ($(#[$doc:meta])* $name:ident, $typ:path, $xor:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
        pub struct $name(pub SocketAddr);

        impl<'a> Attribute<'a> for $name {
            const TYPE: u16 = $typ;
            fn decode(value: &'a [u8], tid: &TransactionId) -> Result<Self, AttrError> {
                decode_addr(Self::TYPE, value, if $xor { Some(tid) } else { None }).map(Self)
            }
            fn encoded_len(&self) -> usize {
                addr_len(&self.0)
            }
            fn encode(&self, tid: &TransactionId, out: &mut [u8]) -> Result<(), EncodeError> {
                encode_addr(&self.0, if $xor { Some(tid) } else { None }, out)
            }
        }
    };
}

address_attr!(
    /// MAPPED-ADDRESS: the reflexive address, not XOR'd (legacy clients).
    MappedAddress, attr_type::MAPPED_ADDRESS, false
);
address_attr!(
    /// XOR-MAPPED-ADDRESS: the reflexive transport address of the client.
    XorMappedAddress, attr_type::XOR_MAPPED_ADDRESS, true
);
address_attr!(
    /// XOR-PEER-ADDRESS: a peer of a TURN allocation.
    XorPeerAddress, attr_type::XOR_PEER_ADDRESS, true
);
address_attr!(
    /// XOR-RELAYED-ADDRESS: the relayed transport address of an allocation.
    XorRelayedAddress, attr_type::XOR_RELAYED_ADDRESS, true
);
address_attr!(
    /// ALTERNATE-SERVER: the server to try instead (with 300 Try Alternate).
    AlternateServer, attr_type::ALTERNATE_SERVER, false
);
address_attr!(
    /// RESPONSE-ORIGIN (RFC 5780): the address the response was sent from.
    ResponseOrigin, attr_type::RESPONSE_ORIGIN, false
);
address_attr!(
    /// OTHER-ADDRESS (RFC 5780): the server's alternate address and port.
    OtherAddress, attr_type::OTHER_ADDRESS, false
);

/// Validates a text attribute: UTF-8, byte and character limits, optionally non-empty.
fn decode_text(
    typ: u16,
    v: &[u8],
    max_bytes: usize,
    max_chars: Option<usize>,
    allow_empty: bool,
) -> Result<&str, AttrError> {
    if v.is_empty() && !allow_empty {
        return Err(AttrError::ZeroLength { typ });
    }
    if v.len() > max_bytes {
        return Err(AttrError::TooLong {
            typ,
            len: v.len(),
            max: max_bytes,
        });
    }
    let s = core::str::from_utf8(v).map_err(|_| AttrError::NotUtf8 { typ })?;
    if let Some(max) = max_chars {
        let chars = s.chars().count();
        if chars > max {
            return Err(AttrError::TooManyChars { typ, chars, max });
        }
    }
    Ok(s)
}

fn check_text_encode(
    typ: u16,
    s: &str,
    max_bytes: usize,
    max_chars: Option<usize>,
) -> Result<(), EncodeError> {
    if s.len() > max_bytes {
        return Err(EncodeError::ValueTooLong {
            typ,
            len: s.len(),
            max: max_bytes,
        });
    }
    if let Some(max) = max_chars {
        let chars = s.chars().count();
        if chars > max {
            return Err(EncodeError::ValueTooLong {
                typ,
                len: chars,
                max,
            });
        }
    }
    Ok(())
}

macro_rules! text_attr {
    ($(#[$doc:meta])* $name:ident, $typ:path, $max_bytes:expr, $max_chars:expr, $empty:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
        pub struct $name<'a>(pub &'a str);

        impl<'a> Attribute<'a> for $name<'a> {
            const TYPE: u16 = $typ;
            fn decode(value: &'a [u8], _tid: &TransactionId) -> Result<Self, AttrError> {
                decode_text(Self::TYPE, value, $max_bytes, $max_chars, $empty).map(Self)
            }
            fn encoded_len(&self) -> usize {
                self.0.len()
            }
            fn encode(&self, _tid: &TransactionId, out: &mut [u8]) -> Result<(), EncodeError> {
                check_text_encode(Self::TYPE, self.0, $max_bytes, $max_chars)?;
                out_slice(out, self.0.len())?.copy_from_slice(self.0.as_bytes());
                Ok(())
            }
        }

        impl $name<'_> {
            /// The text escaped for logs (see [`escape`]).
            pub fn escaped(&self) -> Escaped<'_> {
                escape(self.0.as_bytes())
            }
        }
    };
}

text_attr!(
    /// USERNAME: UTF-8, fewer than 513 bytes, not empty.
    Username, attr_type::USERNAME, MAX_USERNAME_BYTES, None, false
);
text_attr!(
    /// REALM: UTF-8, fewer than 128 characters / 763 bytes, not empty.
    Realm, attr_type::REALM, MAX_TEXT_BYTES, Some(MAX_TEXT_CHARS), false
);
text_attr!(
    /// NONCE: fewer than 128 characters / 763 bytes, not empty.
    Nonce, attr_type::NONCE, MAX_TEXT_BYTES, Some(MAX_TEXT_CHARS), false
);
text_attr!(
    /// SOFTWARE: UTF-8 product description, fewer than 128 characters / 763 bytes.
    Software, attr_type::SOFTWARE, MAX_TEXT_BYTES, Some(MAX_TEXT_CHARS), true
);

/// Splits an error code into the (class, number) bytes, checking the ranges.
fn split_code(typ: u16, code: u16) -> Result<(u8, u8), EncodeError> {
    let class = code / 100;
    if !(3..=6).contains(&class) {
        return Err(EncodeError::InvalidValue { typ });
    }
    Ok((class as u8, (code % 100) as u8))
}

/// Decodes the class/number bytes and reason of ERROR-CODE / ADDRESS-ERROR-CODE.
fn decode_code(typ: u16, v: &[u8]) -> Result<(u16, &str), AttrError> {
    if v.is_empty() {
        return Err(AttrError::ZeroLength { typ });
    }
    if v.len() < 4 {
        return Err(AttrError::BadLength { typ, len: v.len() });
    }
    let class = v[2] & 0x07;
    let number = v[3];
    if !(3..=6).contains(&class) {
        return Err(AttrError::BadErrorClass);
    }
    if number > 99 {
        return Err(AttrError::BadErrorNumber);
    }
    let reason = decode_text(typ, &v[4..], MAX_TEXT_BYTES, Some(MAX_TEXT_CHARS), true)?;
    Ok((u16::from(class) * 100 + u16::from(number), reason))
}

/// ERROR-CODE: a code 300..=699 and a UTF-8 reason phrase.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct ErrorCode<'a> {
    /// The code, e.g. 401.
    pub code: u16,
    /// The reason phrase.
    pub reason: &'a str,
}

impl ErrorCode<'static> {
    /// An error code with its standard reason phrase ([`crate::error_code::reason_phrase`]).
    pub fn new(code: u16) -> Self {
        Self {
            code,
            reason: crate::error_code::reason_phrase(code),
        }
    }
}

impl<'a> Attribute<'a> for ErrorCode<'a> {
    const TYPE: u16 = attr_type::ERROR_CODE;
    fn decode(value: &'a [u8], _tid: &TransactionId) -> Result<Self, AttrError> {
        decode_code(Self::TYPE, value).map(|(code, reason)| Self { code, reason })
    }
    fn encoded_len(&self) -> usize {
        4 + self.reason.len()
    }
    fn encode(&self, _tid: &TransactionId, out: &mut [u8]) -> Result<(), EncodeError> {
        let (class, number) = split_code(Self::TYPE, self.code)?;
        check_text_encode(
            Self::TYPE,
            self.reason,
            MAX_TEXT_BYTES,
            Some(MAX_TEXT_CHARS),
        )?;
        let out = out_slice(out, self.encoded_len())?;
        out[..4].copy_from_slice(&[0, 0, class, number]);
        out[4..].copy_from_slice(self.reason.as_bytes());
        Ok(())
    }
}

/// ADDRESS-ERROR-CODE (RFC 8656): which address family of a dual allocation failed, and why.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct AddressErrorCode<'a> {
    /// The family that could not be allocated.
    pub family: AddressFamily,
    /// The code, e.g. 440.
    pub code: u16,
    /// The reason phrase.
    pub reason: &'a str,
}

impl<'a> Attribute<'a> for AddressErrorCode<'a> {
    const TYPE: u16 = attr_type::ADDRESS_ERROR_CODE;
    fn decode(value: &'a [u8], _tid: &TransactionId) -> Result<Self, AttrError> {
        let (code, reason) = decode_code(Self::TYPE, value)?;
        let family = AddressFamily::from_u8(value[0])?;
        Ok(Self {
            family,
            code,
            reason,
        })
    }
    fn encoded_len(&self) -> usize {
        4 + self.reason.len()
    }
    fn encode(&self, _tid: &TransactionId, out: &mut [u8]) -> Result<(), EncodeError> {
        let (class, number) = split_code(Self::TYPE, self.code)?;
        check_text_encode(
            Self::TYPE,
            self.reason,
            MAX_TEXT_BYTES,
            Some(MAX_TEXT_CHARS),
        )?;
        let out = out_slice(out, self.encoded_len())?;
        out[..4].copy_from_slice(&[self.family.to_u8(), 0, class, number]);
        out[4..].copy_from_slice(self.reason.as_bytes());
        Ok(())
    }
}

/// UNKNOWN-ATTRIBUTES: a fixed-capacity list of attribute types (no allocation).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct UnknownAttributes {
    types: [u16; UnknownAttributes::CAPACITY],
    len: usize,
}

impl UnknownAttributes {
    /// Most types held (a message with more unknown types gets the first 16 reported).
    pub const CAPACITY: usize = 16;

    /// An empty list.
    pub const fn new() -> Self {
        Self {
            types: [0; Self::CAPACITY],
            len: 0,
        }
    }
    /// A list from a slice; `None` if it has more than [`Self::CAPACITY`] entries.
    pub fn from_slice(types: &[u16]) -> Option<Self> {
        let mut s = Self::new();
        for &t in types {
            s.push(t).ok()?;
        }
        Some(s)
    }
    /// Appends a type; `Err(typ)` when full.
    pub fn push(&mut self, typ: u16) -> Result<(), u16> {
        let slot = self.types.get_mut(self.len).ok_or(typ)?;
        *slot = typ;
        self.len += 1;
        Ok(())
    }
    /// The types.
    pub fn as_slice(&self) -> &[u16] {
        &self.types[..self.len]
    }
    /// True if `typ` is in the list.
    pub fn contains(&self, typ: u16) -> bool {
        self.as_slice().contains(&typ)
    }
    /// Number of types.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True if empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Iterates over the types.
    pub fn iter(&self) -> impl Iterator<Item = u16> + '_ {
        self.as_slice().iter().copied()
    }
}

impl<'a> Attribute<'a> for UnknownAttributes {
    const TYPE: u16 = attr_type::UNKNOWN_ATTRIBUTES;
    fn decode(value: &'a [u8], _tid: &TransactionId) -> Result<Self, AttrError> {
        if !value.len().is_multiple_of(2) {
            return Err(AttrError::BadLength {
                typ: Self::TYPE,
                len: value.len(),
            });
        }
        let count = value.len() / 2;
        if count > Self::CAPACITY {
            return Err(AttrError::TooLong {
                typ: Self::TYPE,
                len: count,
                max: Self::CAPACITY,
            });
        }
        let mut s = Self::new();
        for pair in value.chunks_exact(2) {
            s.types[s.len] = u16::from_be_bytes([pair[0], pair[1]]);
            s.len += 1;
        }
        Ok(s)
    }
    fn encoded_len(&self) -> usize {
        2 * self.len
    }
    fn encode(&self, _tid: &TransactionId, out: &mut [u8]) -> Result<(), EncodeError> {
        let out = out_slice(out, self.encoded_len())?;
        for (chunk, t) in out.chunks_exact_mut(2).zip(self.iter()) {
            chunk.copy_from_slice(&t.to_be_bytes());
        }
        Ok(())
    }
}

/// CHANNEL-NUMBER: a channel 0x4000..=0x4FFF (decoding checks the range; encoding does not, so
/// tests can build out-of-range requests).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct ChannelNumber(pub u16);

impl<'a> Attribute<'a> for ChannelNumber {
    const TYPE: u16 = attr_type::CHANNEL_NUMBER;
    fn decode(value: &'a [u8], _tid: &TransactionId) -> Result<Self, AttrError> {
        check_len(Self::TYPE, value, 4)?;
        let ch = u16::from_be_bytes([value[0], value[1]]);
        if !(CHANNEL_MIN..=CHANNEL_MAX).contains(&ch) {
            return Err(AttrError::ChannelOutOfRange(ch));
        }
        Ok(Self(ch))
    }
    fn encoded_len(&self) -> usize {
        4
    }
    fn encode(&self, _tid: &TransactionId, out: &mut [u8]) -> Result<(), EncodeError> {
        let out = out_slice(out, 4)?;
        out[..2].copy_from_slice(&self.0.to_be_bytes());
        out[2..4].copy_from_slice(&[0, 0]);
        Ok(())
    }
}

macro_rules! int_attr {
    ($(#[$doc:meta])* $name:ident, $typ:path, $int:ty, $n:literal, $read:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
        pub struct $name(pub $int);

        impl<'a> Attribute<'a> for $name {
            const TYPE: u16 = $typ;
            fn decode(value: &'a [u8], _tid: &TransactionId) -> Result<Self, AttrError> {
                check_len(Self::TYPE, value, $n)?;
                Ok(Self($read(value)))
            }
            fn encoded_len(&self) -> usize {
                $n
            }
            fn encode(&self, _tid: &TransactionId, out: &mut [u8]) -> Result<(), EncodeError> {
                out_slice(out, $n)?.copy_from_slice(&self.0.to_be_bytes());
                Ok(())
            }
        }
    };
}

int_attr!(
    /// LIFETIME: seconds until the allocation expires (0 deletes it).
    Lifetime, attr_type::LIFETIME, u32, 4, be_u32
);
int_attr!(
    /// PRIORITY (ICE): the priority of the peer-reflexive candidate.
    Priority, attr_type::PRIORITY, u32, 4, be_u32
);
int_attr!(
    /// ICE-CONTROLLED: the agent's tie-breaker; the sender is the controlled agent.
    IceControlled, attr_type::ICE_CONTROLLED, u64, 8, be_u64
);
int_attr!(
    /// ICE-CONTROLLING: the agent's tie-breaker; the sender is the controlling agent.
    IceControlling, attr_type::ICE_CONTROLLING, u64, 8, be_u64
);

macro_rules! flag_attr {
    ($(#[$doc:meta])* $name:ident, $typ:path) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
        pub struct $name;

        impl<'a> Attribute<'a> for $name {
            const TYPE: u16 = $typ;
            fn decode(value: &'a [u8], _tid: &TransactionId) -> Result<Self, AttrError> {
                if value.is_empty() {
                    Ok(Self)
                } else {
                    Err(AttrError::BadLength { typ: Self::TYPE, len: value.len() })
                }
            }
            fn encoded_len(&self) -> usize {
                0
            }
            fn encode(&self, _tid: &TransactionId, _out: &mut [u8]) -> Result<(), EncodeError> {
                Ok(())
            }
        }
    };
}

flag_attr!(
    /// DONT-FRAGMENT: the client asks for the DF bit on relayed packets (no value).
    DontFragment, attr_type::DONT_FRAGMENT
);
flag_attr!(
    /// USE-CANDIDATE (ICE): the controlling agent nominates this pair (no value).
    UseCandidate, attr_type::USE_CANDIDATE
);

/// DATA: the payload of Send and Data indications, borrowed.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Data<'a>(pub &'a [u8]);

impl<'a> Attribute<'a> for Data<'a> {
    const TYPE: u16 = attr_type::DATA;
    fn decode(value: &'a [u8], _tid: &TransactionId) -> Result<Self, AttrError> {
        Ok(Self(value))
    }
    fn encoded_len(&self) -> usize {
        self.0.len()
    }
    fn encode(&self, _tid: &TransactionId, out: &mut [u8]) -> Result<(), EncodeError> {
        out_slice(out, self.0.len())?.copy_from_slice(self.0);
        Ok(())
    }
}

/// REQUESTED-TRANSPORT: the IP protocol number of the relayed transport (17 = UDP).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct RequestedTransport(pub u8);

impl RequestedTransport {
    /// UDP (IP protocol 17), the only transport RFC 8656 allocations relay.
    pub const UDP: RequestedTransport = RequestedTransport(17);
    /// TCP (IP protocol 6, RFC 6062).
    pub const TCP: RequestedTransport = RequestedTransport(6);
}

impl<'a> Attribute<'a> for RequestedTransport {
    const TYPE: u16 = attr_type::REQUESTED_TRANSPORT;
    fn decode(value: &'a [u8], _tid: &TransactionId) -> Result<Self, AttrError> {
        check_len(Self::TYPE, value, 4)?;
        Ok(Self(value[0]))
    }
    fn encoded_len(&self) -> usize {
        4
    }
    fn encode(&self, _tid: &TransactionId, out: &mut [u8]) -> Result<(), EncodeError> {
        out_slice(out, 4)?.copy_from_slice(&[self.0, 0, 0, 0]);
        Ok(())
    }
}

/// EVEN-PORT: ask for an even relayed port, and optionally reserve the next one.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct EvenPort {
    /// The R bit: reserve the next-higher port too.
    pub reserve: bool,
}

impl<'a> Attribute<'a> for EvenPort {
    const TYPE: u16 = attr_type::EVEN_PORT;
    fn decode(value: &'a [u8], _tid: &TransactionId) -> Result<Self, AttrError> {
        // RFC 8656 says 1 byte; 4 bytes (padding counted) are accepted from older stacks.
        match value.len() {
            1 | 4 => Ok(Self {
                reserve: value[0] & 0x80 != 0,
            }),
            0 => Err(AttrError::ZeroLength { typ: Self::TYPE }),
            len => Err(AttrError::BadLength {
                typ: Self::TYPE,
                len,
            }),
        }
    }
    fn encoded_len(&self) -> usize {
        1
    }
    fn encode(&self, _tid: &TransactionId, out: &mut [u8]) -> Result<(), EncodeError> {
        out_slice(out, 1)?[0] = if self.reserve { 0x80 } else { 0 };
        Ok(())
    }
}

/// RESERVATION-TOKEN: names a port reserved by an earlier EVEN-PORT allocation.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct ReservationToken(pub [u8; 8]);

impl<'a> Attribute<'a> for ReservationToken {
    const TYPE: u16 = attr_type::RESERVATION_TOKEN;
    fn decode(value: &'a [u8], _tid: &TransactionId) -> Result<Self, AttrError> {
        check_len(Self::TYPE, value, 8)?;
        let mut t = [0u8; 8];
        t.copy_from_slice(value);
        Ok(Self(t))
    }
    fn encoded_len(&self) -> usize {
        8
    }
    fn encode(&self, _tid: &TransactionId, out: &mut [u8]) -> Result<(), EncodeError> {
        out_slice(out, 8)?.copy_from_slice(&self.0);
        Ok(())
    }
}

macro_rules! family_attr {
    ($(#[$doc:meta])* $name:ident, $typ:path) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
        pub struct $name(pub AddressFamily);

        impl<'a> Attribute<'a> for $name {
            const TYPE: u16 = $typ;
            fn decode(value: &'a [u8], _tid: &TransactionId) -> Result<Self, AttrError> {
                check_len(Self::TYPE, value, 4)?;
                AddressFamily::from_u8(value[0]).map(Self)
            }
            fn encoded_len(&self) -> usize {
                4
            }
            fn encode(&self, _tid: &TransactionId, out: &mut [u8]) -> Result<(), EncodeError> {
                out_slice(out, 4)?.copy_from_slice(&[self.0.to_u8(), 0, 0, 0]);
                Ok(())
            }
        }
    };
}

family_attr!(
    /// REQUESTED-ADDRESS-FAMILY: the family of the relayed address asked for.
    RequestedAddressFamily, attr_type::REQUESTED_ADDRESS_FAMILY
);
family_attr!(
    /// ADDITIONAL-ADDRESS-FAMILY: ask for a second (IPv6) relayed address too.
    AdditionalAddressFamily, attr_type::ADDITIONAL_ADDRESS_FAMILY
);

/// CHANGE-REQUEST (RFC 5780): ask the server to answer from another IP and/or port.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct ChangeRequest {
    /// Flag A: answer from the alternate IP.
    pub change_ip: bool,
    /// Flag B: answer from the alternate port.
    pub change_port: bool,
}

impl<'a> Attribute<'a> for ChangeRequest {
    const TYPE: u16 = attr_type::CHANGE_REQUEST;
    fn decode(value: &'a [u8], _tid: &TransactionId) -> Result<Self, AttrError> {
        check_len(Self::TYPE, value, 4)?;
        Ok(Self {
            change_ip: value[3] & 0x04 != 0,
            change_port: value[3] & 0x02 != 0,
        })
    }
    fn encoded_len(&self) -> usize {
        4
    }
    fn encode(&self, _tid: &TransactionId, out: &mut [u8]) -> Result<(), EncodeError> {
        let flags = (u8::from(self.change_ip) << 2) | (u8::from(self.change_port) << 1);
        out_slice(out, 4)?.copy_from_slice(&[0, 0, 0, flags]);
        Ok(())
    }
}

/// Bytes rendered safe for logs: printable ASCII as is, everything else (control characters,
/// quotes, backslashes, non-ASCII) as `\xNN`, cut after a maximum with a count of what was left.
#[derive(Clone, Copy, Debug)]
pub struct Escaped<'a> {
    bytes: &'a [u8],
    max: usize,
}

/// Default number of input bytes [`escape`] renders before cutting.
pub const ESCAPE_DEFAULT_MAX: usize = 128;

/// Escapes attacker-controlled text (USERNAME, REALM, NONCE, SOFTWARE, ...) for a log line.
pub fn escape(bytes: &[u8]) -> Escaped<'_> {
    Escaped {
        bytes,
        max: ESCAPE_DEFAULT_MAX,
    }
}

impl<'a> Escaped<'a> {
    /// Renders at most `max` input bytes.
    pub fn with_max(bytes: &'a [u8], max: usize) -> Self {
        Escaped { bytes, max }
    }
}

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = self.bytes.len().min(self.max);
        for &b in &self.bytes[..shown] {
            if (0x20..0x7F).contains(&b) && b != b'\\' && b != b'"' {
                write!(f, "{}", char::from(b))?;
            } else {
                write!(f, "\\x{b:02x}")?;
            }
        }
        if shown < self.bytes.len() {
            write!(f, "...(+{} bytes)", self.bytes.len() - shown)?;
        }
        Ok(())
    }
}

/// A readable, log-safe rendering of one attribute: "NAME: value" (decoded when this codec
/// knows the type, hex otherwise). Created by [`describe`].
#[derive(Clone, Copy, Debug)]
pub struct Describe<'a> {
    attr: RawAttribute<'a>,
    tid: TransactionId,
}

/// Renders an attribute for logs and tools; text is escaped, long values are cut.
pub fn describe(attr: RawAttribute<'_>, tid: TransactionId) -> Describe<'_> {
    Describe { attr, tid }
}

struct Hex<'a>(&'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = self.0.len().min(64);
        for b in &self.0[..shown] {
            write!(f, "{b:02x}")?;
        }
        if shown < self.0.len() {
            write!(f, "...(+{} bytes)", self.0.len() - shown)?;
        }
        Ok(())
    }
}

impl fmt::Display for Describe<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use attr_type as t;
        let v = self.attr.value;
        let tid = &self.tid;
        match attr_type::name(self.attr.typ) {
            Some(n) => write!(f, "{n}: ")?,
            None => write!(f, "0x{:04x}: ", self.attr.typ)?,
        }
        fn show<'a, A: Attribute<'a>>(
            f: &mut fmt::Formatter<'_>,
            v: &'a [u8],
            tid: &TransactionId,
            render: impl FnOnce(&mut fmt::Formatter<'_>, A) -> fmt::Result,
        ) -> fmt::Result {
            match A::decode(v, tid) {
                Ok(a) => render(f, a),
                Err(e) => write!(f, "<invalid: {e}> {}", Hex(v)),
            }
        }
        match self.attr.typ {
            t::MAPPED_ADDRESS => show(f, v, tid, |f, a: MappedAddress| write!(f, "{}", a.0)),
            t::XOR_MAPPED_ADDRESS => show(f, v, tid, |f, a: XorMappedAddress| write!(f, "{}", a.0)),
            t::XOR_PEER_ADDRESS => show(f, v, tid, |f, a: XorPeerAddress| write!(f, "{}", a.0)),
            t::XOR_RELAYED_ADDRESS => {
                show(f, v, tid, |f, a: XorRelayedAddress| write!(f, "{}", a.0))
            }
            t::ALTERNATE_SERVER => show(f, v, tid, |f, a: AlternateServer| write!(f, "{}", a.0)),
            t::RESPONSE_ORIGIN => show(f, v, tid, |f, a: ResponseOrigin| write!(f, "{}", a.0)),
            t::OTHER_ADDRESS => show(f, v, tid, |f, a: OtherAddress| write!(f, "{}", a.0)),
            t::USERNAME | t::REALM | t::NONCE | t::SOFTWARE => write!(f, "\"{}\"", escape(v)),
            t::ERROR_CODE => show(f, v, tid, |f, a: ErrorCode<'_>| {
                write!(f, "{} \"{}\"", a.code, escape(a.reason.as_bytes()))
            }),
            t::ADDRESS_ERROR_CODE => show(f, v, tid, |f, a: AddressErrorCode<'_>| {
                write!(
                    f,
                    "{:?} {} \"{}\"",
                    a.family,
                    a.code,
                    escape(a.reason.as_bytes())
                )
            }),
            t::UNKNOWN_ATTRIBUTES => show(f, v, tid, |f, a: UnknownAttributes| {
                for (i, t) in a.iter().enumerate() {
                    write!(f, "{}0x{t:04x}", if i == 0 { "" } else { ", " })?;
                }
                Ok(())
            }),
            t::CHANNEL_NUMBER => show(f, v, tid, |f, a: ChannelNumber| write!(f, "0x{:04x}", a.0)),
            t::LIFETIME => show(f, v, tid, |f, a: Lifetime| write!(f, "{} s", a.0)),
            t::PRIORITY => show(f, v, tid, |f, a: Priority| write!(f, "{}", a.0)),
            t::ICE_CONTROLLED => show(f, v, tid, |f, a: IceControlled| write!(f, "{:#018x}", a.0)),
            t::ICE_CONTROLLING => {
                show(f, v, tid, |f, a: IceControlling| write!(f, "{:#018x}", a.0))
            }
            t::REQUESTED_TRANSPORT => show(f, v, tid, |f, a: RequestedTransport| match a.0 {
                17 => write!(f, "UDP"),
                6 => write!(f, "TCP"),
                p => write!(f, "protocol {p}"),
            }),
            t::EVEN_PORT => show(f, v, tid, |f, a: EvenPort| {
                write!(f, "reserve={}", a.reserve)
            }),
            t::REQUESTED_ADDRESS_FAMILY => show(f, v, tid, |f, a: RequestedAddressFamily| {
                write!(f, "{:?}", a.0)
            }),
            t::ADDITIONAL_ADDRESS_FAMILY => show(f, v, tid, |f, a: AdditionalAddressFamily| {
                write!(f, "{:?}", a.0)
            }),
            t::CHANGE_REQUEST => show(f, v, tid, |f, a: ChangeRequest| {
                write!(f, "change_ip={} change_port={}", a.change_ip, a.change_port)
            }),
            t::DONT_FRAGMENT | t::USE_CANDIDATE if v.is_empty() => write!(f, "(set)"),
            t::DATA => write!(f, "{} bytes {}", v.len(), Hex(v)),
            _ => write!(f, "{}", Hex(v)),
        }
    }
}
