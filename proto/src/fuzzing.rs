//! The fuzz bodies, shared by `proto/fuzz` (cargo-fuzz targets `parse` and `stream`) and the
//! corpus replay tests `proto/tests/fuzz_corpus.rs`. Not part of the supported API.

use core::fmt::Write;

use crate::attrs::describe;
use crate::channel::{self, ChannelData};
use crate::stream::{self, FrameKind, StreamError, StreamFramer};
use crate::stun::{Message, MessageBuilder, ParseError};
use crate::{auth, demux};

/// The fixed key integrity checks use while fuzzing.
pub const FUZZ_KEY: &[u8] = b"peerlink-fuzz-key";

/// A `fmt::Write` that only counts, so rendering needs no allocation.
struct Sink(usize);

impl Write for Sink {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        self.0 += s.len();
        Ok(())
    }
}

/// Runs every parser on `data` and checks the invariants that must hold for any input:
/// no panic, and whatever parses re-encodes to something that parses the same way.
pub fn fuzz_parse(data: &[u8]) {
    let _ = demux::classify(data);
    check_stun(data);

    // The fuzzer cannot forge CRCs: repair a wrong FINGERPRINT (always the last 8 bytes) and
    // go on with the repaired message, which must then parse.
    if let Err(ParseError::FingerprintMismatch) = Message::parse(data) {
        let mut fixed = [0u8; 65_600];
        let n = data.len();
        assert!(
            n >= 28 && n <= fixed.len(),
            "FINGERPRINT needs a header and 8 bytes"
        );
        fixed[..n].copy_from_slice(data);
        let crc = crc32fast::hash(&fixed[..n - 8]) ^ crate::stun::FINGERPRINT_XOR;
        fixed[n - 4..n].copy_from_slice(&crc.to_be_bytes());
        let repaired = Message::parse(&fixed[..n]);
        assert!(
            repaired.is_ok(),
            "repaired FINGERPRINT still fails: {repaired:?}"
        );
        check_stun(&fixed[..n]);
    }

    check_channel_and_text(data);
}

/// Parses `data` as STUN and, when it parses, decodes everything and checks re-encoding.
fn check_stun(data: &[u8]) {
    if let Ok(msg) = Message::parse(data) {
        let tid = msg.transaction_id();
        let mut sink = Sink(0);
        for a in msg.attributes() {
            let _ = write!(sink, "{}", describe(a, tid));
        }
        let unknown = msg.unknown_comprehension_required();
        assert!(unknown.iter().all(|t| t < 0x8000));
        let _ = msg.verify_integrity(FUZZ_KEY);
        let _ = msg.verify_integrity_sha256(FUZZ_KEY);

        // Re-encode the attributes that count (integrity and fingerprint regenerated).
        let mut buf = [0u8; 65_600];
        // Room for the regenerated MESSAGE-INTEGRITY (24) and FINGERPRINT (8).
        let fits = msg.len() + 32 <= crate::stun::HEADER_LEN + crate::stun::MAX_BODY_LEN;
        if let (true, Ok(mut b)) = (fits, MessageBuilder::new(&mut buf, msg.message_type(), tid)) {
            let copied = crate::stun::copy_attributes(&msg, &mut b);
            assert!(
                copied.is_ok(),
                "re-encoding a parsed message failed: {copied:?}"
            );
            let with_mi = msg.has_integrity();
            if with_mi {
                assert!(b.add_integrity(FUZZ_KEY).is_ok());
            }
            assert!(b.add_fingerprint().is_ok());
            let n = b.finish();
            let again = Message::parse(&buf[..n]);
            assert!(
                again.is_ok(),
                "re-encoded message does not parse: {again:?}"
            );
            if let Ok(again) = again {
                assert_eq!(again.message_type(), msg.message_type());
                assert!(again.has_fingerprint());
                assert_eq!(with_mi, again.verify_integrity(FUZZ_KEY).is_ok());
                let a = msg.attributes().filter(|a| !is_integrity(a.typ));
                let b = again.attributes().filter(|a| !is_integrity(a.typ));
                assert!(a.eq(b), "attributes changed in a round trip");
            }
        }
    }
}

/// ChannelData (datagram and stream forms) and REST username validation.
fn check_channel_and_text(data: &[u8]) {
    if let Ok(cd) = ChannelData::parse(data) {
        let mut out = [0u8; 65_600];
        for pad in [false, true] {
            let n = cd.encode(&mut out, pad);
            assert!(n.is_ok());
            if let Ok(n) = n {
                assert_eq!(ChannelData::parse(&out[..n]), Ok(cd));
            }
        }
    }
    if let Ok(Some((cd, used))) = ChannelData::parse_stream(data) {
        assert!(used <= data.len());
        assert_eq!(used, channel::encoded_len(cd.data.len(), true));
    }

    if let Ok(text) = core::str::from_utf8(data) {
        let secrets: [&[u8]; 2] = [b"secret-a", b"secret-b"];
        if let Ok(p) = auth::rest::validate(secrets, text, 1_700_000_000, 86_400) {
            assert_eq!(p.len(), 2);
        }
    }
}

fn is_integrity(typ: u16) -> bool {
    matches!(
        typ,
        crate::attrs::attr_type::MESSAGE_INTEGRITY
            | crate::attrs::attr_type::MESSAGE_INTEGRITY_SHA256
    )
}

/// Frame cap of the stream fuzz body: small enough that the fuzzer reaches it.
pub const FUZZ_MAX_FRAME: usize = 1024;

/// Frames `data` as one TCP/TLS stream and checks what must hold for any input: no panic; the
/// frames and the final error do not depend on how the bytes were cut into reads (the first
/// byte of `data` picks the read sizes); every frame is STUN or ChannelData of the length its
/// header declares, within the cap; the framer never holds more than was pushed and not taken.
pub fn fuzz_stream(data: &[u8]) {
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    let whole = frame_all(stream, &[stream.len().max(1)]);
    let sizes = [usize::from(seed % 7) + 1, usize::from(seed / 7 % 13) + 1, 1];
    let pieces = frame_all(stream, &sizes);
    assert_eq!(whole, pieces, "framing depends on how the stream was cut");

    let (frames, consumed, err) = whole;
    assert!(consumed <= stream.len());
    let mut at = 0;
    for (kind, bytes) in &frames {
        assert!(bytes.len() <= FUZZ_MAX_FRAME);
        assert_eq!(&stream[at..at + bytes.len()], bytes.as_slice());
        match kind {
            FrameKind::Stun => {
                assert_eq!(bytes[0] >> 6, 0);
                let body = usize::from(u16::from_be_bytes([bytes[2], bytes[3]]));
                assert_eq!(bytes.len(), crate::stun::HEADER_LEN + body);
                // A STUN frame is exactly what a datagram would be: the codec must not panic.
                let _ = Message::parse(bytes);
                at += bytes.len();
            }
            FrameKind::ChannelData => {
                assert_eq!(bytes[0] >> 6, 1);
                let payload = usize::from(u16::from_be_bytes([bytes[2], bytes[3]]));
                assert_eq!(bytes.len(), channel::CHANNEL_HEADER_LEN + payload);
                at += bytes.len() + stream::channel_padding(bytes.len());
            }
        }
    }
    assert_eq!(at, consumed);
    if let Some(e) = err {
        // The error is about the frame right after the last good one.
        assert_eq!(
            stream::frame_extent(&stream[consumed..], FUZZ_MAX_FRAME),
            Err(e)
        );
    }
}

/// Frames, bytes consumed by them and the error (if any) of `stream` pushed in reads of the
/// `sizes` in turn (`Vec`s are fine here: the stream body is not about allocation).
type Framed = (Vec<(FrameKind, Vec<u8>)>, usize, Option<StreamError>);

fn frame_all(stream: &[u8], sizes: &[usize]) -> Framed {
    let mut f = StreamFramer::new(FUZZ_MAX_FRAME);
    let mut frames = Vec::new();
    let mut consumed = 0;
    let mut rest = stream;
    let mut i = 0;
    let mut err = None;
    while !rest.is_empty() && err.is_none() {
        let n = sizes[i % sizes.len()].min(rest.len());
        i += 1;
        f.push(&rest[..n]);
        rest = &rest[n..];
        loop {
            match f.next_frame() {
                Ok(Some(fr)) => {
                    consumed += match fr.kind {
                        FrameKind::Stun => fr.bytes.len(),
                        FrameKind::ChannelData => {
                            fr.bytes.len() + stream::channel_padding(fr.bytes.len())
                        }
                    };
                    frames.push((fr.kind, fr.bytes.to_vec()));
                }
                Ok(None) => break,
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        assert!(f.buffered() <= stream.len() - consumed);
    }
    (frames, consumed, err)
}
