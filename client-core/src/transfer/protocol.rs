//! The transfer protocol on one QUIC bidirectional stream, and its sans-IO pieces.
//!
//! Flow (the sender opens the stream):
//! 1. sender -> `Offer { name, size, blake3, chunk_size, chunk_hashes }`
//! 2. receiver -> `Resume { have }` (chunk-index ranges it already holds *and* has re-verified
//!    against `chunk_hashes`), or `Reject { reason }`
//! 3. sender -> the bytes of every chunk not in `have`, in index order, then FIN
//! 4. receiver verifies each chunk as it arrives and the whole-file BLAKE3 at the end, renames
//!    the temp file, and answers `Done { ok, reason }`.
//!
//! Control messages are length-prefixed JSON (u32 big-endian length, bounded by
//! [`MAX_MESSAGE_LEN`]). Everything here is pure: framing, validation, the chunk plan and the
//! receiver's sidecar state.

use serde::{Deserialize, Serialize};

/// Protocol version carried in the offer.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest control message accepted (an offer with ~100k chunk hashes).
pub const MAX_MESSAGE_LEN: usize = 8 * 1024 * 1024;
/// Smallest chunk size accepted in an offer.
pub const MIN_CHUNK_SIZE: u64 = 4 * 1024;
/// Largest chunk size accepted in an offer (bounds the receiver's buffer).
pub const MAX_CHUNK_SIZE: u64 = 64 * 1024 * 1024;
/// Default chunk size: the resume granularity (and per-chunk hash) of small and medium files.
pub const DEFAULT_CHUNK_SIZE: u64 = 256 * 1024;
/// Target maximum number of chunks; larger files get bigger chunks.
pub const MAX_CHUNKS: u64 = 65_536;
/// Longest file name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 255;

/// A BLAKE3 hash, hex-encoded on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct HashHex(pub [u8; 32]);

impl std::fmt::Debug for HashHex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl std::fmt::Display for HashHex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl From<blake3::Hash> for HashHex {
    fn from(h: blake3::Hash) -> Self {
        Self(*h.as_bytes())
    }
}

impl Serialize for HashHex {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(self.0))
    }
}

impl<'de> Deserialize<'de> for HashHex {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let v = hex::decode(s).map_err(serde::de::Error::custom)?;
        let a: [u8; 32] = v
            .try_into()
            .map_err(|_| serde::de::Error::custom("hash must be 32 bytes"))?;
        Ok(Self(a))
    }
}

/// What the sender announces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    /// [`PROTOCOL_VERSION`].
    pub version: u32,
    /// Plain file name (no directories).
    pub name: String,
    /// File size in bytes.
    pub size: u64,
    /// BLAKE3 of the whole file.
    pub blake3: HashHex,
    /// Chunk size in bytes (the last chunk may be shorter).
    pub chunk_size: u64,
    /// BLAKE3 of each chunk, in order.
    pub chunk_hashes: Vec<HashHex>,
}

/// A control message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// Sender's announcement.
    Offer(Offer),
    /// Receiver's answer: half-open chunk-index ranges `[start, end)` it already holds, verified.
    Resume {
        /// Verified chunk ranges, sorted, non-overlapping.
        have: Vec<(u64, u64)>,
    },
    /// Receiver declines the offer.
    Reject {
        /// Why.
        reason: String,
    },
    /// Receiver's final verdict after the data.
    Done {
        /// Whether the file verified and was stored.
        ok: bool,
        /// Why not, if not ok.
        reason: Option<String>,
    },
}

/// A protocol violation by the peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A control message length exceeds [`MAX_MESSAGE_LEN`].
    #[error("control message too long ({0} bytes)")]
    MessageTooLong(usize),
    /// A control message is not valid JSON of the expected shape.
    #[error("malformed control message: {0}")]
    Malformed(String),
    /// A different message was expected at this point.
    #[error("unexpected message, expected {0}")]
    Unexpected(&'static str),
    /// The offer's version is not ours.
    #[error("unsupported protocol version {0}")]
    Version(u32),
    /// The offered name is not a plain file name.
    #[error("unsafe or empty file name")]
    BadName,
    /// The chunk size is out of range.
    #[error("chunk size {0} out of range")]
    BadChunkSize(u64),
    /// The number of chunk hashes does not match size / chunk size.
    #[error("offer has {got} chunk hashes, size needs {want}")]
    ChunkCount {
        /// Hashes present.
        got: usize,
        /// Hashes required.
        want: u64,
    },
    /// Resume ranges are unsorted, overlapping or out of bounds.
    #[error("invalid resume ranges")]
    BadRanges,
}

/// Encodes a control message as a length-prefixed frame.
pub fn encode_message(m: &Message) -> Vec<u8> {
    // Serialising these plain structs to a Vec cannot fail (no maps with non-string keys).
    let body = serde_json::to_vec(m).unwrap_or_default();
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Checks a frame length prefix.
pub fn check_length(prefix: [u8; 4]) -> Result<usize, ProtocolError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_MESSAGE_LEN {
        return Err(ProtocolError::MessageTooLong(len));
    }
    Ok(len)
}

/// Decodes a frame body.
pub fn decode_message(body: &[u8]) -> Result<Message, ProtocolError> {
    serde_json::from_slice(body).map_err(|e| ProtocolError::Malformed(e.to_string()))
}

/// The chunk size used for a file of `size` bytes.
pub fn chunk_size_for(size: u64) -> u64 {
    let mut c = DEFAULT_CHUNK_SIZE;
    while size.div_ceil(c) > MAX_CHUNKS && c < MAX_CHUNK_SIZE {
        c *= 2;
    }
    c
}

/// Number of chunks of a file.
pub fn chunk_count(size: u64, chunk_size: u64) -> u64 {
    if chunk_size == 0 {
        0
    } else {
        size.div_ceil(chunk_size)
    }
}

/// Byte offset and length of chunk `index`.
pub fn chunk_span(size: u64, chunk_size: u64, index: u64) -> (u64, u64) {
    let start = index.saturating_mul(chunk_size).min(size);
    let end = start.saturating_add(chunk_size).min(size);
    (start, end - start)
}

/// Whether `name` is a plain, safe file name to create in the download directory.
pub fn is_safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name != "."
        && name != ".."
        && !name.starts_with('.')
        && !name
            .chars()
            .any(|c| c == '/' || c == '\\' || c == ':' || c.is_control())
}

impl Offer {
    /// Validates an offer received from the network.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        if self.version != PROTOCOL_VERSION {
            return Err(ProtocolError::Version(self.version));
        }
        if !is_safe_name(&self.name) {
            return Err(ProtocolError::BadName);
        }
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&self.chunk_size) {
            return Err(ProtocolError::BadChunkSize(self.chunk_size));
        }
        let want = chunk_count(self.size, self.chunk_size);
        if self.chunk_hashes.len() as u64 != want {
            return Err(ProtocolError::ChunkCount {
                got: self.chunk_hashes.len(),
                want,
            });
        }
        Ok(())
    }

    /// Number of chunks.
    pub fn chunks(&self) -> u64 {
        chunk_count(self.size, self.chunk_size)
    }

    /// Byte offset and length of chunk `index`.
    pub fn span(&self, index: u64) -> (u64, u64) {
        chunk_span(self.size, self.chunk_size, index)
    }
}

/// Half-open ranges of the set bits.
pub fn ranges_from_bits(bits: &[bool]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, &b) in bits.iter().enumerate() {
        match (b, start) {
            (true, None) => start = Some(i as u64),
            (false, Some(s)) => {
                out.push((s, i as u64));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        out.push((s, bits.len() as u64));
    }
    out
}

/// Bits for `n` chunks from sorted, non-overlapping, in-bounds ranges.
pub fn bits_from_ranges(ranges: &[(u64, u64)], n: u64) -> Result<Vec<bool>, ProtocolError> {
    let len = usize::try_from(n).map_err(|_| ProtocolError::BadRanges)?;
    let mut bits = vec![false; len];
    let mut prev_end = 0;
    for &(s, e) in ranges {
        if s < prev_end || s >= e || e > n {
            return Err(ProtocolError::BadRanges);
        }
        for b in &mut bits[s as usize..e as usize] {
            *b = true;
        }
        prev_end = e;
    }
    Ok(bits)
}

/// The receiver's sidecar: which chunks of the temp file it believes it has written.
///
/// Only a hint: every claimed chunk is re-hashed against the new offer before resuming.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartialState {
    /// Name of the file the temp file belongs to.
    pub name: String,
    /// Its size.
    pub size: u64,
    /// Its whole-file BLAKE3.
    pub blake3: HashHex,
    /// Its chunk size.
    pub chunk_size: u64,
    /// Chunk ranges written so far.
    pub have: Vec<(u64, u64)>,
}

impl PartialState {
    /// The state of a partial download of `offer` holding the chunk ranges `have`.
    pub fn new(offer: &Offer, have: Vec<(u64, u64)>) -> Self {
        Self {
            name: offer.name.clone(),
            size: offer.size,
            blake3: offer.blake3,
            chunk_size: offer.chunk_size,
            have,
        }
    }

    /// The chunks this state claims for `offer`, or none if it belongs to another file.
    pub fn claimed_for(&self, offer: &Offer) -> Vec<bool> {
        let n = offer.chunks();
        let same = self.name == offer.name
            && self.size == offer.size
            && self.blake3 == offer.blake3
            && self.chunk_size == offer.chunk_size;
        if !same {
            return vec![false; usize::try_from(n).unwrap_or(0)];
        }
        bits_from_ranges(&self.have, n)
            .unwrap_or_else(|_| vec![false; usize::try_from(n).unwrap_or(0)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(size: u64) -> Offer {
        let cs = chunk_size_for(size);
        Offer {
            version: PROTOCOL_VERSION,
            name: "a.bin".into(),
            size,
            blake3: HashHex([1; 32]),
            chunk_size: cs,
            chunk_hashes: vec![HashHex([2; 32]); chunk_count(size, cs) as usize],
        }
    }

    #[test]
    fn message_round_trip() {
        for m in [
            Message::Offer(offer(1_000_000)),
            Message::Resume {
                have: vec![(0, 2), (5, 7)],
            },
            Message::Reject {
                reason: "no".into(),
            },
            Message::Done {
                ok: true,
                reason: None,
            },
        ] {
            let f = encode_message(&m);
            let len = check_length([f[0], f[1], f[2], f[3]]).unwrap();
            assert_eq!(len, f.len() - 4);
            assert_eq!(decode_message(&f[4..]).unwrap(), m);
        }
    }

    #[test]
    fn bad_frames_are_errors() {
        assert!(check_length(u32::MAX.to_be_bytes()).is_err());
        assert!(decode_message(b"\xff\x00garbage").is_err());
        assert!(decode_message(br#"{"type":"offer","name":1}"#).is_err());
        assert!(decode_message(br#"{"type":"offer","version":1,"name":"x","size":1,"blake3":"zz","chunk_size":4096,"chunk_hashes":[]}"#).is_err());
    }

    #[test]
    fn offer_validation() {
        assert!(offer(0).validate().is_ok());
        assert!(offer(10 << 20).validate().is_ok());
        let mut o = offer(1 << 20);
        o.name = "../etc/passwd".into();
        assert_eq!(o.validate(), Err(ProtocolError::BadName));
        let mut o = offer(1 << 20);
        o.chunk_hashes.pop();
        assert!(matches!(
            o.validate(),
            Err(ProtocolError::ChunkCount { .. })
        ));
        let mut o = offer(1 << 20);
        o.chunk_size = 1;
        assert!(o.validate().is_err());
        for bad in ["", ".", "..", ".hidden", "a/b", "a\\b", "c:d", "x\0y"] {
            assert!(!is_safe_name(bad), "{bad:?}");
        }
        assert!(is_safe_name("report 2024.pdf"));
    }

    #[test]
    fn chunk_sizes_bound_the_chunk_count() {
        assert_eq!(chunk_size_for(0), DEFAULT_CHUNK_SIZE);
        let big = 100u64 << 30;
        assert!(chunk_count(big, chunk_size_for(big)) <= MAX_CHUNKS);
        assert_eq!(chunk_span(10, 4, 2), (8, 2));
        assert_eq!(chunk_span(10, 4, 9), (10, 0));
    }

    #[test]
    fn ranges_round_trip_and_reject_bad() {
        let bits = vec![true, true, false, true, false, false, true];
        let r = ranges_from_bits(&bits);
        assert_eq!(r, vec![(0, 2), (3, 4), (6, 7)]);
        assert_eq!(bits_from_ranges(&r, 7).unwrap(), bits);
        assert!(bits_from_ranges(&[(0, 8)], 7).is_err());
        assert!(bits_from_ranges(&[(2, 3), (1, 2)], 7).is_err());
        assert!(bits_from_ranges(&[(3, 3)], 7).is_err());
        assert!(bits_from_ranges(&[(0, 2), (1, 3)], 7).is_err());
    }

    #[test]
    fn sidecar_of_another_file_claims_nothing() {
        let o = offer(1 << 20);
        let st = PartialState::new(&o, vec![(0, 2)]);
        assert_eq!(st.claimed_for(&o), vec![true, true, false, false]);
        let mut other = o.clone();
        other.blake3 = HashHex([9; 32]);
        assert_eq!(st.claimed_for(&other), vec![false; 4]);
    }
}
