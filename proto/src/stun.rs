//! STUN messages (RFC 8489): a zero-copy parser and an in-place builder.
//!
//! Flow: a datagram arrives; [`crate::demux::classify`] says "STUN"; [`Message::parse`]
//! validates the header, the length, the whole attribute chain and FINGERPRINT (position and
//! CRC) without allocating, and records where MESSAGE-INTEGRITY(-SHA256) sit. The caller then
//! reads typed attributes with [`Message::get`], checks
//! [`Message::unknown_comprehension_required`] (answer 420 if not empty), and verifies
//! integrity with [`Message::verify_integrity`] once it knows the key. Answers are written
//! into a caller buffer by [`MessageBuilder`].
//!
//! Attribute order rules (RFC 8489 section 14.5/14.6): attributes after MESSAGE-INTEGRITY are
//! ignored except MESSAGE-INTEGRITY-SHA256 and FINGERPRINT; attributes after
//! MESSAGE-INTEGRITY-SHA256 are ignored except FINGERPRINT; FINGERPRINT must be last.
//! Duplicates: the first occurrence counts.

use core::fmt;

use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::attrs::{UnknownAttributes, attr_type};

/// The fixed value in bytes 4..8 of every RFC 5389/8489 STUN message.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// Length of the STUN header: type (2), length (2), cookie (4), transaction id (12).
pub const HEADER_LEN: usize = 20;
/// Length of an attribute header: type (2) and length (2).
pub const ATTR_HEADER_LEN: usize = 4;
/// Value XORed into the CRC-32 of a FINGERPRINT attribute ("STUN" in ASCII).
pub const FINGERPRINT_XOR: u32 = 0x5354_554e;
/// Length of a MESSAGE-INTEGRITY value (HMAC-SHA1).
pub const INTEGRITY_LEN: usize = 20;
/// Full length of a MESSAGE-INTEGRITY-SHA256 value (it may be truncated to 16..=32, step 4).
pub const INTEGRITY_SHA256_LEN: usize = 32;
/// Largest message body: the 16-bit length field, rounded down to a multiple of 4.
pub const MAX_BODY_LEN: usize = 0xFFFC;

/// A 96-bit STUN transaction id. Callers supply the randomness.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct TransactionId(pub [u8; 12]);

impl TransactionId {
    /// Wraps 12 bytes.
    pub const fn from_bytes(bytes: [u8; 12]) -> Self {
        Self(bytes)
    }
    /// Draws 12 random bytes from the caller's RNG (seed it from config in tests).
    pub fn random<R: rand::RngCore + ?Sized>(rng: &mut R) -> Self {
        let mut b = [0u8; 12];
        rng.fill_bytes(&mut b);
        Self(b)
    }
    /// The 12 bytes.
    pub const fn as_bytes(&self) -> &[u8; 12] {
        &self.0
    }
}

impl fmt::Display for TransactionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// The class of a STUN message (two bits of the message type).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Class {
    /// A request (0b00).
    Request,
    /// An indication (0b01).
    Indication,
    /// A success response (0b10).
    Success,
    /// An error response (0b11).
    Error,
}

impl Class {
    /// The 2-bit class value (C1 C0).
    pub const fn bits(self) -> u16 {
        match self {
            Class::Request => 0,
            Class::Indication => 1,
            Class::Success => 2,
            Class::Error => 3,
        }
    }
    /// From the 2-bit value (higher bits ignored).
    pub const fn from_bits(b: u16) -> Self {
        match b & 3 {
            0 => Class::Request,
            1 => Class::Indication,
            2 => Class::Success,
            _ => Class::Error,
        }
    }
}

/// A 12-bit STUN method.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct Method(pub u16);

impl Method {
    /// Binding (RFC 8489).
    pub const BINDING: Method = Method(0x001);
    /// Allocate (RFC 8656).
    pub const ALLOCATE: Method = Method(0x003);
    /// Refresh (RFC 8656).
    pub const REFRESH: Method = Method(0x004);
    /// Send (RFC 8656, indication only).
    pub const SEND: Method = Method(0x006);
    /// Data (RFC 8656, indication only).
    pub const DATA: Method = Method(0x007);
    /// CreatePermission (RFC 8656).
    pub const CREATE_PERMISSION: Method = Method(0x008);
    /// ChannelBind (RFC 8656).
    pub const CHANNEL_BIND: Method = Method(0x009);
    /// Largest method value that fits the 12 method bits.
    pub const MAX: u16 = 0x0FFF;

    /// A readable name for logs ("Binding", ... or "0x0123").
    pub fn name(self) -> &'static str {
        match self {
            Method::BINDING => "Binding",
            Method::ALLOCATE => "Allocate",
            Method::REFRESH => "Refresh",
            Method::SEND => "Send",
            Method::DATA => "Data",
            Method::CREATE_PERMISSION => "CreatePermission",
            Method::CHANNEL_BIND => "ChannelBind",
            _ => "Unknown",
        }
    }
}

/// Class and method: the 14 significant bits of the message type field.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct MessageType {
    /// Request, indication, success or error.
    pub class: Class,
    /// Binding, Allocate, ...
    pub method: Method,
}

impl MessageType {
    /// Binding request.
    pub const BINDING_REQUEST: MessageType = MessageType::new(Class::Request, Method::BINDING);
    /// Binding success response.
    pub const BINDING_SUCCESS: MessageType = MessageType::new(Class::Success, Method::BINDING);
    /// Binding error response.
    pub const BINDING_ERROR: MessageType = MessageType::new(Class::Error, Method::BINDING);
    /// Binding indication (keepalive).
    pub const BINDING_INDICATION: MessageType =
        MessageType::new(Class::Indication, Method::BINDING);
    /// Allocate request.
    pub const ALLOCATE_REQUEST: MessageType = MessageType::new(Class::Request, Method::ALLOCATE);
    /// Allocate success response.
    pub const ALLOCATE_SUCCESS: MessageType = MessageType::new(Class::Success, Method::ALLOCATE);
    /// Allocate error response.
    pub const ALLOCATE_ERROR: MessageType = MessageType::new(Class::Error, Method::ALLOCATE);
    /// Send indication.
    pub const SEND_INDICATION: MessageType = MessageType::new(Class::Indication, Method::SEND);
    /// Data indication.
    pub const DATA_INDICATION: MessageType = MessageType::new(Class::Indication, Method::DATA);

    /// Builds a message type.
    pub const fn new(class: Class, method: Method) -> Self {
        Self { class, method }
    }

    /// The 16-bit wire value (top two bits zero). Method bits above 12 are dropped;
    /// [`MessageBuilder::new`] rejects such methods.
    pub const fn to_u16(self) -> u16 {
        let m = self.method.0 & Method::MAX;
        let c = self.class.bits();
        (m & 0x000F) | ((m & 0x0070) << 1) | ((m & 0x0F80) << 2) | ((c & 1) << 4) | ((c & 2) << 7)
    }

    /// From the 16-bit wire value; the top two bits are ignored (the parser rejects them).
    pub const fn from_u16(v: u16) -> Self {
        let m = (v & 0x000F) | ((v >> 1) & 0x0070) | ((v >> 2) & 0x0F80);
        let c = ((v >> 4) & 1) | ((v >> 7) & 2);
        Self {
            class: Class::from_bits(c),
            method: Method(m),
        }
    }

    /// The same method with another class (e.g. the success type for a request).
    pub const fn with_class(self, class: Class) -> Self {
        Self {
            class,
            method: self.method,
        }
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let class = match self.class {
            Class::Request => "request",
            Class::Indication => "indication",
            Class::Success => "success response",
            Class::Error => "error response",
        };
        match self.method.name() {
            "Unknown" => write!(f, "method 0x{:03x} {class}", self.method.0),
            name => write!(f, "{name} {class}"),
        }
    }
}

/// Why a datagram is not a valid STUN message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Fewer than 20 bytes.
    #[error("datagram of {len} bytes is shorter than the 20-byte STUN header")]
    TooShort {
        /// Bytes received.
        len: usize,
    },
    /// The two most significant bits of the first byte are not zero.
    #[error("first two bits are not zero: not STUN")]
    NotStun,
    /// Bytes 4..8 are not 0x2112A442.
    #[error("magic cookie is not 0x2112A442")]
    BadMagicCookie,
    /// The header's length field is not a multiple of 4.
    #[error("message length {len} is not a multiple of 4")]
    LengthNotMultipleOf4 {
        /// The length field.
        len: usize,
    },
    /// 20 + the header's length field differs from the datagram length.
    #[error("header says {header} bytes in total, datagram has {datagram}")]
    LengthMismatch {
        /// 20 + the header's length field.
        header: usize,
        /// Bytes received.
        datagram: usize,
    },
    /// An attribute's value (with padding) runs past the end of the message.
    #[error("attribute 0x{typ:04x} at offset {offset} runs past the end of the message")]
    AttributeOverrun {
        /// Attribute type.
        typ: u16,
        /// Offset of the attribute header in the message.
        offset: usize,
    },
    /// An attribute follows FINGERPRINT.
    #[error("FINGERPRINT is not the last attribute")]
    FingerprintNotLast,
    /// The FINGERPRINT CRC does not match the message.
    #[error("FINGERPRINT does not match the message")]
    FingerprintMismatch,
    /// The FINGERPRINT value is not 4 bytes.
    #[error("FINGERPRINT value is not 4 bytes")]
    BadFingerprintLength,
}

/// Why an attribute value could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AttrError {
    /// The value has a length this attribute cannot have.
    #[error("attribute 0x{typ:04x}: invalid value length {len}")]
    BadLength {
        /// Attribute type.
        typ: u16,
        /// Value length.
        len: usize,
    },
    /// An address family other than 0x01 (IPv4) or 0x02 (IPv6).
    #[error("unknown address family 0x{0:02x}")]
    BadFamily(u8),
    /// An empty value where one is required (address, ERROR-CODE, USERNAME, ...).
    #[error("attribute 0x{typ:04x}: empty value")]
    ZeroLength {
        /// Attribute type.
        typ: u16,
    },
    /// Text that is not UTF-8.
    #[error("attribute 0x{typ:04x}: text is not UTF-8")]
    NotUtf8 {
        /// Attribute type.
        typ: u16,
    },
    /// A value longer than the RFC allows (bytes, or entries for UNKNOWN-ATTRIBUTES).
    #[error("attribute 0x{typ:04x}: length {len} exceeds the maximum {max}")]
    TooLong {
        /// Attribute type.
        typ: u16,
        /// Value length.
        len: usize,
        /// Largest allowed.
        max: usize,
    },
    /// Text with more characters than the RFC allows (REALM, NONCE, SOFTWARE, reason).
    #[error("attribute 0x{typ:04x}: {chars} characters exceed the maximum {max}")]
    TooManyChars {
        /// Attribute type.
        typ: u16,
        /// Characters found.
        chars: usize,
        /// Largest allowed.
        max: usize,
    },
    /// ERROR-CODE class outside 3..=6.
    #[error("ERROR-CODE class outside 3..=6")]
    BadErrorClass,
    /// ERROR-CODE number above 99.
    #[error("ERROR-CODE number above 99")]
    BadErrorNumber,
    /// CHANNEL-NUMBER outside 0x4000..=0x4FFF.
    #[error("channel number 0x{0:04x} outside 0x4000..=0x4FFF")]
    ChannelOutOfRange(u16),
}

/// Why MESSAGE-INTEGRITY(-SHA256) verification failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IntegrityError {
    /// The message has no such attribute.
    #[error("message has no integrity attribute")]
    Missing,
    /// The HMAC does not match (wrong key or altered message).
    #[error("message integrity does not match")]
    Mismatch,
    /// The attribute value has an invalid length.
    #[error("integrity attribute has an invalid length")]
    BadLength,
}

/// Why a message could not be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The caller's buffer is too small.
    #[error("buffer too small: need {needed} bytes, have {available}")]
    BufferTooSmall {
        /// Bytes needed in total.
        needed: usize,
        /// Buffer length.
        available: usize,
    },
    /// A value (or the whole message) is longer than the RFC or the length field allows.
    #[error("attribute 0x{typ:04x}: value of {len} exceeds the maximum {max}")]
    ValueTooLong {
        /// Attribute type (0 for the whole message).
        typ: u16,
        /// Length (bytes or characters).
        len: usize,
        /// Largest allowed.
        max: usize,
    },
    /// An attribute was added after MESSAGE-INTEGRITY(-SHA256) or FINGERPRINT.
    #[error("attribute added after MESSAGE-INTEGRITY or FINGERPRINT")]
    AfterIntegrity,
    /// A value out of its range (e.g. an ERROR-CODE outside 300..=699).
    #[error("attribute 0x{typ:04x}: value out of range")]
    InvalidValue {
        /// Attribute type.
        typ: u16,
    },
    /// The method does not fit 12 bits.
    #[error("method 0x{0:04x} does not fit 12 bits")]
    BadMethod(u16),
}

/// One attribute as it appears on the wire: type and value (padding excluded).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct RawAttribute<'a> {
    /// Attribute type.
    pub typ: u16,
    /// Value bytes, borrowed from the datagram.
    pub value: &'a [u8],
}

impl RawAttribute<'_> {
    /// Comprehension-required attributes have types 0x0000..=0x7FFF.
    pub const fn comprehension_required(&self) -> bool {
        self.typ < 0x8000
    }
}

/// A typed STUN attribute: its type code and value codec.
pub trait Attribute<'a>: Sized {
    /// The attribute type code.
    const TYPE: u16;
    /// Decodes a value (without padding). `tid` is needed by XOR'd addresses.
    fn decode(value: &'a [u8], tid: &TransactionId) -> Result<Self, AttrError>;
    /// Length of the encoded value, without padding.
    fn encoded_len(&self) -> usize;
    /// Writes the value into `out[..self.encoded_len()]` (callers pass at least that much).
    fn encode(&self, tid: &TransactionId, out: &mut [u8]) -> Result<(), EncodeError>;
}

/// Iterator over the attributes of a parsed message that count: in order, up to and including
/// MESSAGE-INTEGRITY / MESSAGE-INTEGRITY-SHA256, ignoring what RFC 8489 says to ignore and
/// never yielding FINGERPRINT.
#[derive(Clone, Debug)]
pub struct RawAttributes<'a> {
    buf: &'a [u8],
    pos: usize,
    seen_mi: bool,
    done: bool,
}

impl<'a> Iterator for RawAttributes<'a> {
    type Item = RawAttribute<'a>;

    fn next(&mut self) -> Option<RawAttribute<'a>> {
        while !self.done {
            // `Message::parse` validated the chain; `read_attr` re-checks bounds anyway.
            let (typ, value, next) = read_attr(self.buf, self.pos).ok()?;
            self.pos = next;
            match typ {
                attr_type::FINGERPRINT => {
                    self.done = true;
                    return None;
                }
                attr_type::MESSAGE_INTEGRITY_SHA256 => {
                    self.done = true;
                    return Some(RawAttribute { typ, value });
                }
                _ if self.seen_mi => continue,
                attr_type::MESSAGE_INTEGRITY => {
                    self.seen_mi = true;
                    return Some(RawAttribute { typ, value });
                }
                _ => return Some(RawAttribute { typ, value }),
            }
        }
        None
    }
}

/// Reads the attribute at `pos`: (type, value, offset of the next attribute).
fn read_attr(buf: &[u8], pos: usize) -> Result<(u16, &[u8], usize), ParseError> {
    let hdr = buf
        .get(pos..pos + ATTR_HEADER_LEN)
        .ok_or(ParseError::AttributeOverrun {
            typ: 0,
            offset: pos,
        })?;
    let typ = u16::from_be_bytes([hdr[0], hdr[1]]);
    let len = usize::from(u16::from_be_bytes([hdr[2], hdr[3]]));
    let start = pos + ATTR_HEADER_LEN;
    let end = start + len;
    let padded = start + pad4(len);
    if padded > buf.len() {
        return Err(ParseError::AttributeOverrun { typ, offset: pos });
    }
    Ok((typ, &buf[start..end], padded))
}

/// Rounds up to a multiple of 4.
pub(crate) const fn pad4(n: usize) -> usize {
    (n + 3) & !3
}

/// The comprehension-required attribute types of a message this codec does not know; put them
/// in an UNKNOWN-ATTRIBUTES attribute of a 420 answer.
pub type UnknownAttrs = UnknownAttributes;

/// A validated, borrowed view of one STUN message.
#[derive(Clone, Copy, Debug)]
pub struct Message<'a> {
    buf: &'a [u8],
    mi: Option<usize>,
    mi256: Option<usize>,
    fp: Option<usize>,
}

impl<'a> Message<'a> {
    /// Validates a whole datagram as one STUN message (see the module docs for the rules).
    pub fn parse(buf: &'a [u8]) -> Result<Message<'a>, ParseError> {
        if buf.len() < HEADER_LEN {
            return Err(ParseError::TooShort { len: buf.len() });
        }
        if buf[0] & 0xC0 != 0 {
            return Err(ParseError::NotStun);
        }
        if u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) != MAGIC_COOKIE {
            return Err(ParseError::BadMagicCookie);
        }
        let body = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
        if !body.is_multiple_of(4) {
            return Err(ParseError::LengthNotMultipleOf4 { len: body });
        }
        if HEADER_LEN + body != buf.len() {
            return Err(ParseError::LengthMismatch {
                header: HEADER_LEN + body,
                datagram: buf.len(),
            });
        }
        let mut msg = Message {
            buf,
            mi: None,
            mi256: None,
            fp: None,
        };
        let mut pos = HEADER_LEN;
        while pos < buf.len() {
            if msg.fp.is_some() {
                return Err(ParseError::FingerprintNotLast);
            }
            let (typ, value, next) = read_attr(buf, pos)?;
            match typ {
                attr_type::FINGERPRINT => {
                    if value.len() != 4 {
                        return Err(ParseError::BadFingerprintLength);
                    }
                    msg.fp = Some(pos);
                }
                // Everything else after MESSAGE-INTEGRITY-SHA256 is ignored.
                _ if msg.mi256.is_some() => {}
                attr_type::MESSAGE_INTEGRITY_SHA256 => msg.mi256 = Some(pos),
                // Everything else after MESSAGE-INTEGRITY is ignored (the first MI counts).
                _ if msg.mi.is_some() => {}
                attr_type::MESSAGE_INTEGRITY => msg.mi = Some(pos),
                _ => {}
            }
            pos = next;
        }
        if let Some(fp) = msg.fp {
            let value = &buf[fp + ATTR_HEADER_LEN..fp + ATTR_HEADER_LEN + 4];
            let wire = u32::from_be_bytes([value[0], value[1], value[2], value[3]]);
            if wire != crc32fast::hash(&buf[..fp]) ^ FINGERPRINT_XOR {
                return Err(ParseError::FingerprintMismatch);
            }
        }
        Ok(msg)
    }

    /// Class and method.
    pub fn message_type(&self) -> MessageType {
        MessageType::from_u16(u16::from_be_bytes([self.buf[0], self.buf[1]]))
    }
    /// The class.
    pub fn class(&self) -> Class {
        self.message_type().class
    }
    /// The method.
    pub fn method(&self) -> Method {
        self.message_type().method
    }
    /// The transaction id.
    pub fn transaction_id(&self) -> TransactionId {
        let mut t = [0u8; 12];
        t.copy_from_slice(&self.buf[8..HEADER_LEN]);
        TransactionId(t)
    }
    /// The whole message.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.buf
    }
    /// Total length in bytes.
    pub fn len(&self) -> usize {
        self.buf.len()
    }
    /// True for a message without attributes.
    pub fn is_empty(&self) -> bool {
        self.buf.len() == HEADER_LEN
    }
    /// The attributes that count, in order (see [`RawAttributes`]).
    pub fn attributes(&self) -> RawAttributes<'a> {
        RawAttributes {
            buf: self.buf,
            pos: HEADER_LEN,
            seen_mi: false,
            done: false,
        }
    }
    /// The value of the first attribute of type `typ` that counts.
    pub fn raw(&self, typ: u16) -> Option<&'a [u8]> {
        self.attributes().find(|a| a.typ == typ).map(|a| a.value)
    }
    /// The first attribute of type `A`, decoded; `None` if absent.
    pub fn get<A: Attribute<'a>>(&self) -> Option<Result<A, AttrError>> {
        let tid = self.transaction_id();
        self.raw(A::TYPE).map(|v| A::decode(v, &tid))
    }
    /// True if an attribute of type `typ` counts in this message.
    pub fn contains(&self, typ: u16) -> bool {
        self.raw(typ).is_some()
    }
    /// Comprehension-required (< 0x8000) attribute types this codec does not know, in order,
    /// without duplicates, at most [`UnknownAttributes::CAPACITY`]. Non-empty -> answer 420.
    pub fn unknown_comprehension_required(&self) -> UnknownAttrs {
        let mut out = UnknownAttributes::new();
        for a in self.attributes() {
            if a.comprehension_required() && !attr_type::is_known(a.typ) && !out.contains(a.typ) {
                // A full list is still a valid 420 answer; further types are dropped.
                let _ = out.push(a.typ);
            }
        }
        out
    }
    /// True if the message ends with a (verified) FINGERPRINT.
    pub fn has_fingerprint(&self) -> bool {
        self.fp.is_some()
    }
    /// True if MESSAGE-INTEGRITY counts in this message.
    pub fn has_integrity(&self) -> bool {
        self.mi.is_some()
    }
    /// True if MESSAGE-INTEGRITY-SHA256 counts in this message.
    pub fn has_integrity_sha256(&self) -> bool {
        self.mi256.is_some()
    }

    /// Verifies MESSAGE-INTEGRITY (HMAC-SHA1) with `key`, in constant time.
    pub fn verify_integrity(&self, key: &[u8]) -> Result<(), IntegrityError> {
        let pos = self.mi.ok_or(IntegrityError::Missing)?;
        let value = self.attr_value_at(pos);
        if value.len() != INTEGRITY_LEN {
            return Err(IntegrityError::BadLength);
        }
        let mut mac =
            <Hmac<Sha1> as Mac>::new_from_slice(key).map_err(|_| IntegrityError::Mismatch)?;
        self.feed_prefix(pos, INTEGRITY_LEN, |d| mac.update(d));
        let tag = mac.finalize().into_bytes();
        if bool::from(tag.as_slice().ct_eq(value)) {
            Ok(())
        } else {
            Err(IntegrityError::Mismatch)
        }
    }

    /// Verifies MESSAGE-INTEGRITY-SHA256 with `key` (truncated values of 16..=32 bytes, step 4,
    /// are compared against the HMAC prefix), in constant time.
    pub fn verify_integrity_sha256(&self, key: &[u8]) -> Result<(), IntegrityError> {
        let pos = self.mi256.ok_or(IntegrityError::Missing)?;
        let value = self.attr_value_at(pos);
        if !(16..=INTEGRITY_SHA256_LEN).contains(&value.len()) || !value.len().is_multiple_of(4) {
            return Err(IntegrityError::BadLength);
        }
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(key).map_err(|_| IntegrityError::Mismatch)?;
        self.feed_prefix(pos, value.len(), |d| mac.update(d));
        let tag = mac.finalize().into_bytes();
        if bool::from(tag[..value.len()].ct_eq(value)) {
            Ok(())
        } else {
            Err(IntegrityError::Mismatch)
        }
    }

    /// The value of the attribute whose header is at `pos` (validated by `parse`).
    fn attr_value_at(&self, pos: usize) -> &'a [u8] {
        match read_attr(self.buf, pos) {
            Ok((_, v, _)) => v,
            Err(_) => &[],
        }
    }

    /// Feeds the bytes an integrity HMAC covers: the header with its length patched to end just
    /// after the integrity attribute at `pos` (value `vlen` bytes), then the attributes before it.
    fn feed_prefix(&self, pos: usize, vlen: usize, mut feed: impl FnMut(&[u8])) {
        let patched = (pos + ATTR_HEADER_LEN + vlen - HEADER_LEN) as u16;
        feed(&self.buf[0..2]);
        feed(&patched.to_be_bytes());
        feed(&self.buf[4..pos]);
    }
}

/// For stream transports: the total length of the STUN message starting at `buf`, from its
/// header, once 4 bytes are available (`None` before that).
pub fn framed_len(buf: &[u8]) -> Option<usize> {
    match buf {
        [_, _, a, b, ..] => Some(HEADER_LEN + usize::from(u16::from_be_bytes([*a, *b]))),
        _ => None,
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum BuildState {
    Open,
    AfterMi,
    AfterMi256,
    AfterFp,
}

/// Writes one STUN message into a caller buffer, without allocating.
#[derive(Debug)]
pub struct MessageBuilder<'b> {
    buf: &'b mut [u8],
    len: usize,
    tid: TransactionId,
    state: BuildState,
    padding: u8,
}

impl<'b> MessageBuilder<'b> {
    /// Starts a message: writes the header (length 0).
    pub fn new(
        buf: &'b mut [u8],
        typ: MessageType,
        tid: TransactionId,
    ) -> Result<Self, EncodeError> {
        if typ.method.0 > Method::MAX {
            return Err(EncodeError::BadMethod(typ.method.0));
        }
        if buf.len() < HEADER_LEN {
            return Err(EncodeError::BufferTooSmall {
                needed: HEADER_LEN,
                available: buf.len(),
            });
        }
        buf[0..2].copy_from_slice(&typ.to_u16().to_be_bytes());
        buf[2..4].copy_from_slice(&[0, 0]);
        buf[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        buf[8..HEADER_LEN].copy_from_slice(&tid.0);
        Ok(Self {
            buf,
            len: HEADER_LEN,
            tid,
            state: BuildState::Open,
            padding: 0,
        })
    }

    /// Sets the byte used for attribute padding (default 0, as RFC 8489 says; RFC 5389 allowed
    /// any value and the RFC 5769 vectors use 0x20).
    pub fn set_padding_byte(&mut self, byte: u8) {
        self.padding = byte;
    }

    /// The transaction id.
    pub fn transaction_id(&self) -> TransactionId {
        self.tid
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if nothing but the header was written.
    pub fn is_empty(&self) -> bool {
        self.len == HEADER_LEN
    }

    /// Appends a typed attribute (padded to 4 bytes).
    pub fn add<'x, A: Attribute<'x>>(&mut self, attr: &A) -> Result<(), EncodeError> {
        if self.state != BuildState::Open {
            return Err(EncodeError::AfterIntegrity);
        }
        let vlen = attr.encoded_len();
        let tid = self.tid;
        let start = self.reserve(A::TYPE, vlen)?;
        // On error nothing is committed: the header length field is only updated below.
        attr.encode(&tid, &mut self.buf[start..start + vlen])?;
        self.commit(start, vlen);
        Ok(())
    }

    /// Appends an attribute from its type and raw value (padded to 4 bytes).
    pub fn add_raw(&mut self, typ: u16, value: &[u8]) -> Result<(), EncodeError> {
        if self.state != BuildState::Open {
            return Err(EncodeError::AfterIntegrity);
        }
        self.add_raw_unchecked(typ, value)
    }

    /// Like [`add_raw`](Self::add_raw) but ignoring the ordering rules (it may follow
    /// MESSAGE-INTEGRITY or FINGERPRINT): only for building hostile test input.
    pub fn add_raw_unchecked(&mut self, typ: u16, value: &[u8]) -> Result<(), EncodeError> {
        let start = self.reserve(typ, value.len())?;
        self.buf[start..start + value.len()].copy_from_slice(value);
        self.commit(start, value.len());
        Ok(())
    }

    /// Appends MESSAGE-INTEGRITY (HMAC-SHA1 with `key`).
    pub fn add_integrity(&mut self, key: &[u8]) -> Result<(), EncodeError> {
        if self.state != BuildState::Open {
            return Err(EncodeError::AfterIntegrity);
        }
        let start = self.reserve(attr_type::MESSAGE_INTEGRITY, INTEGRITY_LEN)?;
        self.set_len_field(start + INTEGRITY_LEN);
        // HMAC accepts keys of any length.
        let mut mac =
            <Hmac<Sha1> as Mac>::new_from_slice(key).map_err(|_| EncodeError::InvalidValue {
                typ: attr_type::MESSAGE_INTEGRITY,
            })?;
        mac.update(&self.buf[..start - ATTR_HEADER_LEN]);
        let tag = mac.finalize().into_bytes();
        self.buf[start..start + INTEGRITY_LEN].copy_from_slice(&tag);
        self.commit(start, INTEGRITY_LEN);
        self.state = BuildState::AfterMi;
        Ok(())
    }

    /// Appends MESSAGE-INTEGRITY-SHA256 (full 32-byte HMAC-SHA256 with `key`).
    pub fn add_integrity_sha256(&mut self, key: &[u8]) -> Result<(), EncodeError> {
        self.add_integrity_sha256_truncated(key, INTEGRITY_SHA256_LEN)
    }

    /// Appends MESSAGE-INTEGRITY-SHA256 truncated to `len` bytes (16..=32, a multiple of 4).
    pub fn add_integrity_sha256_truncated(
        &mut self,
        key: &[u8],
        len: usize,
    ) -> Result<(), EncodeError> {
        let typ = attr_type::MESSAGE_INTEGRITY_SHA256;
        if !(16..=INTEGRITY_SHA256_LEN).contains(&len) || !len.is_multiple_of(4) {
            return Err(EncodeError::InvalidValue { typ });
        }
        if !matches!(self.state, BuildState::Open | BuildState::AfterMi) {
            return Err(EncodeError::AfterIntegrity);
        }
        let start = self.reserve(typ, len)?;
        self.set_len_field(start + len);
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key)
            .map_err(|_| EncodeError::InvalidValue { typ })?;
        mac.update(&self.buf[..start - ATTR_HEADER_LEN]);
        let tag = mac.finalize().into_bytes();
        self.buf[start..start + len].copy_from_slice(&tag[..len]);
        self.commit(start, len);
        self.state = BuildState::AfterMi256;
        Ok(())
    }

    /// Appends FINGERPRINT; nothing may follow it.
    pub fn add_fingerprint(&mut self) -> Result<(), EncodeError> {
        if self.state == BuildState::AfterFp {
            return Err(EncodeError::AfterIntegrity);
        }
        let start = self.reserve(attr_type::FINGERPRINT, 4)?;
        self.set_len_field(start + 4);
        let crc = crc32fast::hash(&self.buf[..start - ATTR_HEADER_LEN]) ^ FINGERPRINT_XOR;
        self.buf[start..start + 4].copy_from_slice(&crc.to_be_bytes());
        self.commit(start, 4);
        self.state = BuildState::AfterFp;
        Ok(())
    }

    /// Ends the message; it is in `buf[..n]`.
    pub fn finish(self) -> usize {
        self.len
    }

    /// Checks room for an attribute with a `vlen`-byte value, writes its header, returns the
    /// value offset. The message length field is updated by `commit`.
    fn reserve(&mut self, typ: u16, vlen: usize) -> Result<usize, EncodeError> {
        if vlen > usize::from(u16::MAX) {
            return Err(EncodeError::ValueTooLong {
                typ,
                len: vlen,
                max: usize::from(u16::MAX),
            });
        }
        let total = self.len + ATTR_HEADER_LEN + pad4(vlen);
        if total - HEADER_LEN > MAX_BODY_LEN {
            return Err(EncodeError::ValueTooLong {
                typ,
                len: total - HEADER_LEN,
                max: MAX_BODY_LEN,
            });
        }
        if total > self.buf.len() {
            return Err(EncodeError::BufferTooSmall {
                needed: total,
                available: self.buf.len(),
            });
        }
        let h = self.len;
        self.buf[h..h + 2].copy_from_slice(&typ.to_be_bytes());
        self.buf[h + 2..h + 4].copy_from_slice(&(vlen as u16).to_be_bytes());
        Ok(h + ATTR_HEADER_LEN)
    }

    /// Pads the value at `start`, advances the length and updates the header length field.
    fn commit(&mut self, start: usize, vlen: usize) {
        let end = start + pad4(vlen);
        self.buf[start + vlen..end].fill(self.padding);
        self.len = end;
        self.set_len_field(end);
    }

    fn set_len_field(&mut self, total: usize) {
        let body = (total - HEADER_LEN) as u16;
        self.buf[2..4].copy_from_slice(&body.to_be_bytes());
    }
}

/// Writes the attributes of `msg` that count into `b` unchanged (a helper for re-encoding
/// tests and proxies); integrity and fingerprint are not copied.
pub fn copy_attributes(msg: &Message<'_>, b: &mut MessageBuilder<'_>) -> Result<(), EncodeError> {
    for a in msg.attributes() {
        if matches!(
            a.typ,
            attr_type::MESSAGE_INTEGRITY | attr_type::MESSAGE_INTEGRITY_SHA256
        ) {
            continue;
        }
        b.add_raw(a.typ, a.value)?;
    }
    Ok(())
}

pub use crate::attrs::AddressFamily;
pub use crate::error_code;
