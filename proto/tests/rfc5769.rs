//! RFC 5769 test vectors: parse, verify (integrity + fingerprint), re-encode byte for byte;
//! any single flipped bit or a wrong password fails.
#![allow(clippy::unwrap_used)] // test helpers, not only #[test] fns, unwrap

use std::net::SocketAddr;

use peerlink_proto::attrs::{
    IceControlled, Nonce, Priority, Realm, Software, Username, XorMappedAddress,
};
use peerlink_proto::auth::{long_term_key, short_term_key};
use peerlink_proto::{Class, IntegrityError, Message, MessageBuilder, Method, ParseError};

/// Section 2.1, "Sample Request" (username and SOFTWARE padded with 0x20 as in the RFC).
const REQUEST: &str = "000100582112a442b7e7a701bc34d686fa87dfae\
    802200105354554e207465737420636c69656e74\
    002400046e0001ff\
    80290008932ff9b151263b36\
    000600096576746a3a68367659202020\
    000800149aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a2\
    80280004e57a3bcf";
/// Section 2.2, "Sample IPv4 Response".
const RESPONSE_V4: &str = "0101003c2112a442b7e7a701bc34d686fa87dfae\
    8022000b7465737420766563746f7220\
    002000080001a147e112a643\
    000800142b91f599fd9e90c38c7489f92af9ba53f06be7d7\
    80280004c07d4c96";
/// Section 2.3, "Sample IPv6 Response".
const RESPONSE_V6: &str = "010100482112a442b7e7a701bc34d686fa87dfae\
    8022000b7465737420766563746f7220\
    002000140002a1470113a9faa5d3f179bc25f4b5bed2b9d9\
    00080014a382954e4be67bf11784c97c8292c275bfe3ed41\
    80280004c8fb0b4c";
/// Section 2.4, "Sample Request with Long-Term Authentication".
const REQUEST_LONG_TERM: &str = "000100602112a44278ad3433c6ad72c029da412e\
    00060012e3839ee38388e383aae38383e382afe382b90000\
    0015001c662f2f3439396b39353464364f4c33346f4c39465354767936347341\
    0014000b6578616d706c652e6f726700\
    00080014f67024656dd64a3e02b8e0712e85c9a28ca89666";

const PASSWORD: &str = "VOkJxbRl1RmTxUk/WvJxBt";
/// Username "<U+30DE><U+30C8><U+30EA><U+30C3><U+30AF><U+30B9>" (as bytes, already SASLprep'd).
const LT_USERNAME: &str = "\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}";
/// Password "The<U+00AD>M<U+00AA>tr<U+2168>" after SASLprep.
const LT_PASSWORD: &str = "TheMatrIX";
const LT_REALM: &str = "example.org";
const LT_NONCE: &str = "f//499k954d6OL34oL9FSTvy64sA";

fn bytes(hex_text: &str) -> Vec<u8> {
    let clean: String = hex_text.chars().filter(|c| !c.is_whitespace()).collect();
    hex::decode(clean).expect("fixture is hex")
}

fn lt_key() -> [u8; 16] {
    long_term_key(LT_USERNAME, LT_REALM, LT_PASSWORD)
}

#[test]
fn sample_request_parses_verifies_and_reencodes() {
    let wire = bytes(REQUEST);
    let m = Message::parse(&wire).expect("2.1 parses");
    assert_eq!(m.class(), Class::Request);
    assert_eq!(m.method(), Method::BINDING);
    assert_eq!(
        m.transaction_id().0,
        *b"\xb7\xe7\xa7\x01\xbc\x34\xd6\x86\xfa\x87\xdf\xae"
    );
    assert_eq!(m.get::<Software>(), Some(Ok(Software("STUN test client"))));
    assert_eq!(m.get::<Priority>(), Some(Ok(Priority(0x6e0001ff))));
    assert_eq!(
        m.get::<IceControlled>(),
        Some(Ok(IceControlled(0x932ff9b151263b36)))
    );
    assert_eq!(m.get::<Username>(), Some(Ok(Username("evtj:h6vY"))));
    assert!(m.has_fingerprint());
    assert!(m.has_integrity());
    assert!(m.unknown_comprehension_required().is_empty());
    m.verify_integrity(short_term_key(PASSWORD))
        .expect("right password");

    let mut buf = [0u8; 256];
    let mut b = MessageBuilder::new(&mut buf, m.message_type(), m.transaction_id()).unwrap();
    b.set_padding_byte(0x20);
    b.add(&Software("STUN test client")).unwrap();
    b.add(&Priority(0x6e0001ff)).unwrap();
    b.add(&IceControlled(0x932ff9b151263b36)).unwrap();
    b.add(&Username("evtj:h6vY")).unwrap();
    b.add_integrity(short_term_key(PASSWORD)).unwrap();
    b.add_fingerprint().unwrap();
    let n = b.finish();
    assert_eq!(hex::encode(&buf[..n]), hex::encode(&wire));
}

fn check_response(hex_text: &str, expect: SocketAddr) {
    let wire = bytes(hex_text);
    let m = Message::parse(&wire).expect("response parses");
    assert_eq!(m.class(), Class::Success);
    assert_eq!(m.method(), Method::BINDING);
    assert_eq!(m.get::<Software>(), Some(Ok(Software("test vector"))));
    assert_eq!(
        m.get::<XorMappedAddress>(),
        Some(Ok(XorMappedAddress(expect)))
    );
    assert!(m.has_fingerprint());
    m.verify_integrity(short_term_key(PASSWORD))
        .expect("right password");

    let mut buf = [0u8; 256];
    let mut b = MessageBuilder::new(&mut buf, m.message_type(), m.transaction_id()).unwrap();
    b.set_padding_byte(0x20);
    b.add(&Software("test vector")).unwrap();
    b.add(&XorMappedAddress(expect)).unwrap();
    b.add_integrity(short_term_key(PASSWORD)).unwrap();
    b.add_fingerprint().unwrap();
    let n = b.finish();
    assert_eq!(hex::encode(&buf[..n]), hex::encode(&wire));
}

#[test]
fn sample_ipv4_response_parses_verifies_and_reencodes() {
    check_response(RESPONSE_V4, "192.0.2.1:32853".parse().unwrap());
}

#[test]
fn sample_ipv6_response_parses_verifies_and_reencodes() {
    check_response(
        RESPONSE_V6,
        "[2001:db8:1234:5678:11:2233:4455:6677]:32853"
            .parse()
            .unwrap(),
    );
}

#[test]
fn sample_long_term_request_parses_verifies_and_reencodes() {
    let wire = bytes(REQUEST_LONG_TERM);
    let m = Message::parse(&wire).expect("2.4 parses");
    assert_eq!(m.class(), Class::Request);
    assert_eq!(m.get::<Username>(), Some(Ok(Username(LT_USERNAME))));
    assert_eq!(m.get::<Nonce>(), Some(Ok(Nonce(LT_NONCE))));
    assert_eq!(m.get::<Realm>(), Some(Ok(Realm(LT_REALM))));
    assert!(!m.has_fingerprint());
    m.verify_integrity(&lt_key()).expect("right password");

    let mut buf = [0u8; 256];
    let mut b = MessageBuilder::new(&mut buf, m.message_type(), m.transaction_id()).unwrap();
    b.add(&Username(LT_USERNAME)).unwrap();
    b.add(&Nonce(LT_NONCE)).unwrap();
    b.add(&Realm(LT_REALM)).unwrap();
    b.add_integrity(&lt_key()).unwrap();
    let n = b.finish();
    assert_eq!(hex::encode(&buf[..n]), hex::encode(&wire));
}

#[test]
fn wrong_password_fails_verification() {
    for v in [REQUEST, RESPONSE_V4, RESPONSE_V6] {
        let wire = bytes(v);
        let m = Message::parse(&wire).unwrap();
        assert_eq!(
            m.verify_integrity(b"VOkJxbRl1RmTxUk/WvJxBT"),
            Err(IntegrityError::Mismatch)
        );
        assert_eq!(m.verify_integrity(b""), Err(IntegrityError::Mismatch));
        // No MESSAGE-INTEGRITY-SHA256 in these vectors.
        assert_eq!(
            m.verify_integrity_sha256(b"x"),
            Err(IntegrityError::Missing)
        );
    }
    let wire = bytes(REQUEST_LONG_TERM);
    let m = Message::parse(&wire).unwrap();
    let wrong = long_term_key(LT_USERNAME, LT_REALM, "TheMatrix");
    assert_eq!(m.verify_integrity(&wrong), Err(IntegrityError::Mismatch));
}

/// Every single-bit flip anywhere in a vector makes parsing or verification fail.
/// "Verified" means: MESSAGE-INTEGRITY matches and, for the vectors that carry one, a
/// FINGERPRINT is present and matches (a flip in the FINGERPRINT type turns it into an unknown
/// attribute after MESSAGE-INTEGRITY, which RFC 8489 says to ignore: the message then has no
/// fingerprint, which a receiver that requires one rejects).
#[test]
fn any_flipped_bit_fails() {
    let cases: [(&str, Vec<u8>, bool); 4] = [
        (REQUEST, PASSWORD.as_bytes().to_vec(), true),
        (RESPONSE_V4, PASSWORD.as_bytes().to_vec(), true),
        (RESPONSE_V6, PASSWORD.as_bytes().to_vec(), true),
        (REQUEST_LONG_TERM, lt_key().to_vec(), false),
    ];
    for (v, key, with_fp) in cases {
        let wire = bytes(v);
        for i in 0..wire.len() {
            for bit in 0..8 {
                let mut w = wire.clone();
                w[i] ^= 1 << bit;
                let ok = Message::parse(&w)
                    .map(|m| m.verify_integrity(&key).is_ok() && m.has_fingerprint() == with_fp);
                assert!(
                    !matches!(ok, Ok(true)),
                    "flip of byte {i} bit {bit} went unnoticed"
                );
            }
        }
    }
}

#[test]
fn flipped_byte_in_fingerprinted_vector_is_a_fingerprint_mismatch() {
    let mut w = bytes(REQUEST);
    w[30] ^= 0x01; // inside SOFTWARE
    assert_eq!(
        Message::parse(&w).unwrap_err(),
        ParseError::FingerprintMismatch
    );
    let mut w = bytes(RESPONSE_V4);
    let last = w.len() - 1;
    w[last] ^= 0x80; // the CRC itself
    assert_eq!(
        Message::parse(&w).unwrap_err(),
        ParseError::FingerprintMismatch
    );
}
