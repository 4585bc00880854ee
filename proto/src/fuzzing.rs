//! The fuzz body, shared by `proto/fuzz` (cargo-fuzz target `parse`) and the corpus replay test
//! `proto/tests/fuzz_corpus.rs`. Not part of the supported API.

use core::fmt::Write;

use crate::attrs::describe;
use crate::channel::{self, ChannelData};
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
