//! RTP fixed header (RFC 3550 §5.1): encode and bounds-checked parse.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! |V=2|P|X|  CC   |M|     PT      |       sequence number         |
//! |                           timestamp                           |
//! |           synchronization source (SSRC) identifier            |
//! |            contributing source (CSRC) identifiers (CC x 32)   |
//! | [extension: profile (16) | length in 32-bit words (16) | ...] |
//! ```
//! We emit no CSRCs, extensions or padding; the parser accepts them (skipping CSRCs and the
//! extension, reporting the padding) and never panics on garbage.

use thiserror::Error;

/// Length of the fixed RTP header.
pub const RTP_HEADER_LEN: usize = 12;

/// Why a datagram is not a well-formed RTP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum RtpError {
    /// Shorter than the 12-byte fixed header.
    #[error("packet too short for the RTP fixed header ({0} bytes)")]
    TooShort(usize),
    /// Version field is not 2.
    #[error("unsupported RTP version {0}")]
    BadVersion(u8),
    /// The CSRC list or extension header runs past the end of the packet.
    #[error("RTP header extends past the end of the packet")]
    Truncated,
    /// The padding count is zero or larger than the payload.
    #[error("invalid RTP padding length")]
    BadPadding,
}

/// The parts of an RTP header this client uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtpHeader {
    /// Marker bit (set on the first packet of a talkspurt).
    pub marker: bool,
    /// Payload type, 7 bits.
    pub payload_type: u8,
    /// Sequence number.
    pub sequence: u16,
    /// Media timestamp (48 kHz clock for Opus).
    pub timestamp: u32,
    /// Synchronization source.
    pub ssrc: u32,
}

impl RtpHeader {
    /// Writes the 12-byte fixed header (V=2, no padding, no extension, no CSRC) into `out`.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.push(0x80);
        out.push((u8::from(self.marker) << 7) | (self.payload_type & 0x7f));
        out.extend_from_slice(&self.sequence.to_be_bytes());
        out.extend_from_slice(&self.timestamp.to_be_bytes());
        out.extend_from_slice(&self.ssrc.to_be_bytes());
    }

    /// Encodes the header followed by `payload`.
    pub fn encode(&self, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::with_capacity(RTP_HEADER_LEN + payload.len());
        self.write(&mut v);
        v.extend_from_slice(payload);
        v
    }
}

/// A parsed RTP packet borrowing the datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtpPacket<'a> {
    /// The header fields.
    pub header: RtpHeader,
    /// Length of the whole header (fixed + CSRCs + extension); the AEAD's associated data.
    pub header_len: usize,
    /// Bytes between the header and the padding (for SRTP: ciphertext + tag).
    pub payload: &'a [u8],
}

impl<'a> RtpPacket<'a> {
    /// Parses a datagram; never panics, whatever the input.
    pub fn parse(buf: &'a [u8]) -> Result<Self, RtpError> {
        let (header, len) = Self::parse_header(buf)?;
        let mut end = buf.len();
        if buf[0] & 0x20 != 0 {
            let pad = usize::from(buf[end - 1]);
            if pad == 0 || pad > end - len {
                return Err(RtpError::BadPadding);
            }
            end -= pad;
        }
        Ok(Self {
            header,
            header_len: len,
            payload: &buf[len..end],
        })
    }

    /// Parses the header only (fixed part, CSRCs, extension) and returns it with its length.
    /// Padding is not interpreted: under SRTP it is inside the encrypted part.
    pub fn parse_header(buf: &[u8]) -> Result<(RtpHeader, usize), RtpError> {
        if buf.len() < RTP_HEADER_LEN {
            return Err(RtpError::TooShort(buf.len()));
        }
        let b0 = buf[0];
        let version = b0 >> 6;
        if version != 2 {
            return Err(RtpError::BadVersion(version));
        }
        let extension = b0 & 0x10 != 0;
        let cc = usize::from(b0 & 0x0f);
        let header = RtpHeader {
            marker: buf[1] & 0x80 != 0,
            payload_type: buf[1] & 0x7f,
            sequence: u16::from_be_bytes([buf[2], buf[3]]),
            timestamp: u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]),
            ssrc: u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]),
        };
        let mut len = RTP_HEADER_LEN + 4 * cc;
        if buf.len() < len {
            return Err(RtpError::Truncated);
        }
        if extension {
            let ext = buf.get(len..len + 4).ok_or(RtpError::Truncated)?;
            let words = usize::from(u16::from_be_bytes([ext[2], ext[3]]));
            len += 4 + 4 * words;
            if buf.len() < len {
                return Err(RtpError::Truncated);
            }
        }
        Ok((header, len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_bytes() {
        let h = RtpHeader {
            marker: true,
            payload_type: 111,
            sequence: 0x1234,
            timestamp: 0xdeadbeef,
            ssrc: 0x01020304,
        };
        let wire = h.encode(&[0xaa, 0xbb]);
        assert_eq!(
            wire,
            [
                0x80, 0xef, 0x12, 0x34, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 0xaa, 0xbb
            ]
        );
        let p = RtpPacket::parse(&wire).unwrap();
        assert_eq!(p.header, h);
        assert_eq!(p.payload, &[0xaa, 0xbb]);
    }

    #[test]
    fn csrc_extension_and_padding_are_skipped() {
        // V=2 P=1 X=1 CC=1, PT 0, seq 1, ts 2, ssrc 3, csrc, ext(1 word), payload 1 byte, pad 3.
        let mut wire = vec![0xb1, 0x00, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3];
        wire.extend_from_slice(&[9, 9, 9, 9]);
        wire.extend_from_slice(&[0xbe, 0xde, 0, 1, 7, 7, 7, 7]);
        wire.push(0x55);
        wire.extend_from_slice(&[0, 0, 3]);
        let p = RtpPacket::parse(&wire).unwrap();
        assert_eq!(p.header_len, 24);
        assert_eq!(p.payload, &[0x55]);
    }

    #[test]
    fn typed_errors() {
        assert_eq!(RtpPacket::parse(&[0x80; 5]), Err(RtpError::TooShort(5)));
        assert_eq!(RtpPacket::parse(&[0x40; 12]), Err(RtpError::BadVersion(1)));
        assert_eq!(RtpPacket::parse(&[0x8f; 12]), Err(RtpError::Truncated));
        let mut pad = vec![0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(RtpPacket::parse(&pad), Err(RtpError::BadPadding));
        pad[12] = 2;
        assert_eq!(RtpPacket::parse(&pad), Err(RtpError::BadPadding));
        let ext = [0x90, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5];
        assert_eq!(RtpPacket::parse(&ext), Err(RtpError::Truncated));
    }

    proptest! {
        #[test]
        fn round_trip(marker: bool, pt in 0u8..128, seq: u16, ts: u32, ssrc: u32,
                      payload in proptest::collection::vec(any::<u8>(), 0..300)) {
            let h = RtpHeader { marker, payload_type: pt, sequence: seq, timestamp: ts, ssrc };
            let wire = h.encode(&payload);
            let p = RtpPacket::parse(&wire).unwrap();
            prop_assert_eq!(p.header, h);
            prop_assert_eq!(p.header_len, RTP_HEADER_LEN);
            prop_assert_eq!(p.payload, &payload[..]);
        }

        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(p) = RtpPacket::parse(&data) {
                prop_assert!(p.header_len + p.payload.len() <= data.len());
            }
        }

        #[test]
        fn garbage_with_valid_version_never_panics(
            b0 in 0x80u8..0xc0, rest in proptest::collection::vec(any::<u8>(), 0..120)) {
            let mut data = vec![b0];
            data.extend_from_slice(&rest);
            let _ = RtpPacket::parse(&data);
        }
    }
}
