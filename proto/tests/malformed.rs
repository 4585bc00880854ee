//! Every malformed STUN/TURN input (short datagrams, wrong magic cookie, bad lengths, attributes
//! past the end, zero-length values, hostile text) gets its typed error, never a panic.
#![allow(clippy::unwrap_used)] // test helpers, not only #[test] fns, unwrap

use peerlink_proto::attrs::{
    AlternateServer, ChannelNumber, DontFragment, ErrorCode, EvenPort, Lifetime, MappedAddress,
    Nonce, Realm, Software, UnknownAttributes, Username, XorMappedAddress, XorPeerAddress,
    attr_type, escape,
};
use peerlink_proto::channel::{self, ChannelData, ChannelDataError};
use peerlink_proto::{
    AttrError, EncodeError, IntegrityError, Message, MessageBuilder, MessageType, ParseError,
    TransactionId,
};

const TID: TransactionId = TransactionId([7; 12]);

/// A Binding request with the given raw attributes (ordering rules not enforced).
fn msg_with(attrs: &[(u16, &[u8])]) -> Vec<u8> {
    let mut buf = vec![0u8; 70_000];
    let mut b = MessageBuilder::new(&mut buf, MessageType::BINDING_REQUEST, TID).unwrap();
    for (t, v) in attrs {
        b.add_raw_unchecked(*t, v).unwrap();
    }
    let n = b.finish();
    buf.truncate(n);
    buf
}

#[test]
fn shorter_than_header() {
    for len in 0..20 {
        let buf = vec![0u8; len];
        assert_eq!(
            Message::parse(&buf).unwrap_err(),
            ParseError::TooShort { len }
        );
    }
}

#[test]
fn wrong_magic_cookie() {
    let mut m = msg_with(&[]);
    m[4] = 0x21;
    m[7] = 0x43;
    assert_eq!(Message::parse(&m).unwrap_err(), ParseError::BadMagicCookie);
}

#[test]
fn first_two_bits_set_is_not_stun() {
    let mut m = msg_with(&[]);
    m[0] |= 0x80;
    assert_eq!(Message::parse(&m).unwrap_err(), ParseError::NotStun);
}

#[test]
fn random_bytes_are_rejected() {
    // A fixed pseudo-random stream (xorshift) - deterministic, no RNG crate needed.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut accepted = 0;
    for _ in 0..2000 {
        let mut buf = [0u8; 64];
        for b in buf.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        if Message::parse(&buf).is_ok() {
            accepted += 1;
        }
    }
    assert_eq!(accepted, 0);
}

#[test]
fn length_not_multiple_of_4() {
    let mut m = msg_with(&[(attr_type::SOFTWARE, b"abcd")]);
    m[3] = 6;
    m.truncate(26);
    assert_eq!(
        Message::parse(&m).unwrap_err(),
        ParseError::LengthNotMultipleOf4 { len: 6 }
    );
}

#[test]
fn length_not_matching_datagram() {
    let m = msg_with(&[(attr_type::SOFTWARE, b"abcd")]);
    // Truncated (as with MSG_TRUNC) ...
    assert_eq!(
        Message::parse(&m[..m.len() - 4]).unwrap_err(),
        ParseError::LengthMismatch {
            header: 28,
            datagram: 24
        }
    );
    // ... or with trailing bytes.
    let mut longer = m.clone();
    longer.extend_from_slice(&[0, 0, 0, 0]);
    assert_eq!(
        Message::parse(&longer).unwrap_err(),
        ParseError::LengthMismatch {
            header: 28,
            datagram: 32
        }
    );
}

#[test]
fn attribute_running_past_the_end() {
    let mut m = msg_with(&[(attr_type::SOFTWARE, b"abcd")]);
    m[22..24].copy_from_slice(&100u16.to_be_bytes());
    assert_eq!(
        Message::parse(&m).unwrap_err(),
        ParseError::AttributeOverrun {
            typ: attr_type::SOFTWARE,
            offset: 20
        }
    );
    // Value fits but its padding would not: impossible with aligned lengths, but the last
    // attribute claiming 5 bytes in a 4-byte slot is caught too.
    let mut m = msg_with(&[(attr_type::SOFTWARE, b"abcd")]);
    m[23] = 5;
    assert!(matches!(
        Message::parse(&m).unwrap_err(),
        ParseError::AttributeOverrun { .. }
    ));
}

#[test]
fn zero_length_address_and_error_code() {
    let m = msg_with(&[
        (attr_type::XOR_MAPPED_ADDRESS, b""),
        (attr_type::MAPPED_ADDRESS, b""),
        (attr_type::XOR_PEER_ADDRESS, b""),
        (attr_type::ALTERNATE_SERVER, b""),
        (attr_type::ERROR_CODE, b""),
    ]);
    let m = Message::parse(&m).unwrap();
    let z = |typ| AttrError::ZeroLength { typ };
    assert_eq!(
        m.get::<XorMappedAddress>().unwrap(),
        Err(z(attr_type::XOR_MAPPED_ADDRESS))
    );
    assert_eq!(
        m.get::<MappedAddress>().unwrap(),
        Err(z(attr_type::MAPPED_ADDRESS))
    );
    assert_eq!(
        m.get::<XorPeerAddress>().unwrap(),
        Err(z(attr_type::XOR_PEER_ADDRESS))
    );
    assert_eq!(
        m.get::<AlternateServer>().unwrap(),
        Err(z(attr_type::ALTERNATE_SERVER))
    );
    assert_eq!(m.get::<ErrorCode>().unwrap(), Err(z(attr_type::ERROR_CODE)));
}

#[test]
fn bad_address_family_and_lengths() {
    let m = msg_with(&[
        (attr_type::XOR_MAPPED_ADDRESS, &[0, 3, 0, 1, 1, 2, 3, 4]),
        (attr_type::XOR_PEER_ADDRESS, &[0, 1, 0, 1, 1, 2, 3]),
        (attr_type::MAPPED_ADDRESS, &[0, 2, 0, 1, 1, 2, 3, 4]),
    ]);
    let m = Message::parse(&m).unwrap();
    assert_eq!(
        m.get::<XorMappedAddress>(),
        Some(Err(AttrError::BadFamily(3)))
    );
    assert_eq!(
        m.get::<XorPeerAddress>(),
        Some(Err(AttrError::BadLength {
            typ: attr_type::XOR_PEER_ADDRESS,
            len: 7
        }))
    );
    assert_eq!(
        m.get::<MappedAddress>(),
        Some(Err(AttrError::BadLength {
            typ: attr_type::MAPPED_ADDRESS,
            len: 8
        }))
    );
}

#[test]
fn bad_error_code_values() {
    let m = msg_with(&[(attr_type::ERROR_CODE, &[0, 0, 2, 1])]);
    assert_eq!(
        Message::parse(&m).unwrap().get::<ErrorCode>(),
        Some(Err(AttrError::BadErrorClass))
    );
    let m = msg_with(&[(attr_type::ERROR_CODE, &[0, 0, 4, 100])]);
    assert_eq!(
        Message::parse(&m).unwrap().get::<ErrorCode>(),
        Some(Err(AttrError::BadErrorNumber))
    );
    let m = msg_with(&[(attr_type::ERROR_CODE, &[0, 0, 4])]);
    assert_eq!(
        Message::parse(&m).unwrap().get::<ErrorCode>(),
        Some(Err(AttrError::BadLength {
            typ: attr_type::ERROR_CODE,
            len: 3
        }))
    );
    let m = msg_with(&[(attr_type::ERROR_CODE, &[0, 0, 4, 38, 0xff])]);
    assert_eq!(
        Message::parse(&m).unwrap().get::<ErrorCode>(),
        Some(Err(AttrError::NotUtf8 {
            typ: attr_type::ERROR_CODE
        }))
    );
    let m = msg_with(&[(attr_type::ERROR_CODE, b"\0\0\x04\x26Stale Nonce")]);
    assert_eq!(
        Message::parse(&m).unwrap().get::<ErrorCode>(),
        Some(Ok(ErrorCode {
            code: 438,
            reason: "Stale Nonce"
        }))
    );
}

#[test]
fn unknown_comprehension_required_is_reported_for_420() {
    let m = msg_with(&[
        (0x7777, b"x"),
        (attr_type::SOFTWARE, b"ok"),
        (0xC001, b"optional, ignored"),
        (0x0002, b"abcd"), // RESPONSE-ADDRESS (RFC 3489), not supported
        (0x7777, b"dup"),
    ]);
    let m = Message::parse(&m).unwrap();
    let unknown = m.unknown_comprehension_required();
    assert_eq!(unknown.as_slice(), &[0x7777, 0x0002]);

    // The list goes straight into the 420 answer.
    let mut buf = [0u8; 256];
    let mut b =
        MessageBuilder::new(&mut buf, MessageType::BINDING_ERROR, m.transaction_id()).unwrap();
    b.add(&ErrorCode::new(420)).unwrap();
    b.add(&unknown).unwrap();
    let n = b.finish();
    let answer = Message::parse(&buf[..n]).unwrap();
    assert_eq!(
        answer.get::<ErrorCode>(),
        Some(Ok(ErrorCode {
            code: 420,
            reason: "Unknown Attribute"
        }))
    );
    assert_eq!(
        answer
            .get::<UnknownAttributes>()
            .unwrap()
            .unwrap()
            .as_slice(),
        &[0x7777, 0x0002]
    );
}

#[test]
fn unknown_list_is_capped() {
    let types: Vec<u16> = (0x7000..0x7020).collect();
    let attrs: Vec<(u16, &[u8])> = types.iter().map(|t| (*t, &b""[..])).collect();
    let m = msg_with(&attrs);
    let m = Message::parse(&m).unwrap();
    let u = m.unknown_comprehension_required();
    assert_eq!(u.len(), UnknownAttributes::CAPACITY);
    assert_eq!(u.as_slice(), &types[..UnknownAttributes::CAPACITY]);
    // Decoding an UNKNOWN-ATTRIBUTES longer than the capacity is a typed error.
    let long: Vec<u8> = types.iter().flat_map(|t| t.to_be_bytes()).collect();
    let m = msg_with(&[(attr_type::UNKNOWN_ATTRIBUTES, &long)]);
    assert_eq!(
        Message::parse(&m).unwrap().get::<UnknownAttributes>(),
        Some(Err(AttrError::TooLong {
            typ: attr_type::UNKNOWN_ATTRIBUTES,
            len: 32,
            max: 16
        }))
    );
}

#[test]
fn duplicate_attributes_first_counts() {
    let m = msg_with(&[
        (attr_type::LIFETIME, &600u32.to_be_bytes()),
        (attr_type::USERNAME, b"alice"),
        (attr_type::LIFETIME, &0u32.to_be_bytes()),
        (attr_type::USERNAME, b"mallory"),
    ]);
    let m = Message::parse(&m).unwrap();
    assert_eq!(m.get::<Lifetime>(), Some(Ok(Lifetime(600))));
    assert_eq!(m.get::<Username>(), Some(Ok(Username("alice"))));
    assert_eq!(m.raw(attr_type::USERNAME), Some(&b"alice"[..]));
    assert_eq!(m.attributes().count(), 4);
}

#[test]
fn attributes_after_integrity_are_ignored_except_fingerprint() {
    let key = b"key";
    let mut buf = [0u8; 512];
    let mut b = MessageBuilder::new(&mut buf, MessageType::ALLOCATE_REQUEST, TID).unwrap();
    b.add(&Username("alice")).unwrap();
    b.add_integrity(key).unwrap();
    assert_eq!(b.add(&Lifetime(0)), Err(EncodeError::AfterIntegrity));
    assert_eq!(
        b.add_raw(attr_type::LIFETIME, &[0; 4]),
        Err(EncodeError::AfterIntegrity)
    );
    // Hostile sender: LIFETIME and a second USERNAME after MESSAGE-INTEGRITY.
    b.add_raw_unchecked(attr_type::LIFETIME, &0u32.to_be_bytes())
        .unwrap();
    b.add_raw_unchecked(attr_type::USERNAME, b"mallory")
        .unwrap();
    b.add_raw_unchecked(0x7999, b"unknown but ignored").unwrap();
    b.add_fingerprint().unwrap();
    let n = b.finish();
    let m = Message::parse(&buf[..n]).unwrap();
    assert!(m.has_fingerprint());
    assert_eq!(m.get::<Lifetime>(), None);
    assert_eq!(m.get::<Username>(), Some(Ok(Username("alice"))));
    assert!(m.unknown_comprehension_required().is_empty());
    let types: Vec<u16> = m.attributes().map(|a| a.typ).collect();
    assert_eq!(types, [attr_type::USERNAME, attr_type::MESSAGE_INTEGRITY]);
    // The integrity covers only what precedes it, so it still verifies.
    assert_eq!(m.verify_integrity(key), Ok(()));
}

#[test]
fn sha256_integrity_after_sha1_counts_and_later_attributes_do_not() {
    let key = b"key";
    let mut buf = [0u8; 512];
    let mut b = MessageBuilder::new(&mut buf, MessageType::BINDING_REQUEST, TID).unwrap();
    b.add(&Username("alice")).unwrap();
    b.add_integrity(key).unwrap();
    b.add_integrity_sha256(key).unwrap();
    assert_eq!(b.add_integrity(key), Err(EncodeError::AfterIntegrity));
    b.add_raw_unchecked(attr_type::SOFTWARE, b"late").unwrap();
    b.add_fingerprint().unwrap();
    assert_eq!(b.add_fingerprint(), Err(EncodeError::AfterIntegrity));
    let n = b.finish();
    let m = Message::parse(&buf[..n]).unwrap();
    assert!(m.has_integrity() && m.has_integrity_sha256() && m.has_fingerprint());
    assert_eq!(m.verify_integrity(key), Ok(()));
    assert_eq!(m.verify_integrity_sha256(key), Ok(()));
    assert_eq!(
        m.verify_integrity_sha256(b"other"),
        Err(IntegrityError::Mismatch)
    );
    assert_eq!(m.get::<Software>(), None);
}

#[test]
fn truncated_sha256_integrity_is_accepted_bad_lengths_are_not() {
    let key = b"key";
    let mut full = [0u8; 256];
    let mut b = MessageBuilder::new(&mut full, MessageType::BINDING_REQUEST, TID).unwrap();
    b.add(&Username("alice")).unwrap();
    b.add_integrity_sha256(key).unwrap();
    let n = b.finish();
    let tag: Vec<u8> = full[n - 32..n].to_vec();
    // Re-sign with a 16-byte truncation: HMAC over header with length covering 16 bytes.
    let mut buf = [0u8; 256];
    let mut b = MessageBuilder::new(&mut buf, MessageType::BINDING_REQUEST, TID).unwrap();
    b.add(&Username("alice")).unwrap();
    b.add_raw(attr_type::MESSAGE_INTEGRITY_SHA256, &tag[..16])
        .unwrap();
    let n = b.finish();
    // The 16-byte prefix of the full tag is computed over a different length field: mismatch.
    assert_eq!(
        Message::parse(&buf[..n])
            .unwrap()
            .verify_integrity_sha256(key),
        Err(IntegrityError::Mismatch)
    );
    // A properly truncated one verifies.
    let mut b = MessageBuilder::new(&mut buf, MessageType::BINDING_REQUEST, TID).unwrap();
    b.add(&Username("alice")).unwrap();
    b.add_integrity_sha256_truncated(key, 16).unwrap();
    let n = b.finish();
    assert_eq!(n, 20 + 12 + 20);
    let m = Message::parse(&buf[..n]).unwrap();
    assert_eq!(m.verify_integrity_sha256(key), Ok(()));
    assert_eq!(
        m.verify_integrity_sha256(b"kez"),
        Err(IntegrityError::Mismatch)
    );
    let mut b = MessageBuilder::new(&mut buf, MessageType::BINDING_REQUEST, TID).unwrap();
    assert_eq!(
        b.add_integrity_sha256_truncated(key, 18),
        Err(EncodeError::InvalidValue {
            typ: attr_type::MESSAGE_INTEGRITY_SHA256
        })
    );
    // A 12-byte value has an invalid length.
    let mut b = MessageBuilder::new(&mut buf, MessageType::BINDING_REQUEST, TID).unwrap();
    b.add_raw(attr_type::MESSAGE_INTEGRITY_SHA256, &tag[..12])
        .unwrap();
    let n = b.finish();
    assert_eq!(
        Message::parse(&buf[..n])
            .unwrap()
            .verify_integrity_sha256(key),
        Err(IntegrityError::BadLength)
    );
    // MESSAGE-INTEGRITY of the wrong length.
    let mut b = MessageBuilder::new(&mut buf, MessageType::BINDING_REQUEST, TID).unwrap();
    b.add_raw(attr_type::MESSAGE_INTEGRITY, &[0; 16]).unwrap();
    let n = b.finish();
    assert_eq!(
        Message::parse(&buf[..n]).unwrap().verify_integrity(key),
        Err(IntegrityError::BadLength)
    );
    assert_eq!(
        Message::parse(&buf[..n])
            .unwrap()
            .verify_integrity_sha256(key),
        Err(IntegrityError::Missing)
    );
}

#[test]
fn fingerprint_not_last_or_wrong() {
    let mut buf = [0u8; 256];
    let mut b = MessageBuilder::new(&mut buf, MessageType::BINDING_REQUEST, TID).unwrap();
    b.add(&Software("x")).unwrap();
    b.add_fingerprint().unwrap();
    b.add_raw_unchecked(attr_type::SOFTWARE, b"after").unwrap();
    let n = b.finish();
    assert_eq!(
        Message::parse(&buf[..n]).unwrap_err(),
        ParseError::FingerprintNotLast
    );

    let mut b = MessageBuilder::new(&mut buf, MessageType::BINDING_REQUEST, TID).unwrap();
    b.add(&Software("x")).unwrap();
    b.add_fingerprint().unwrap();
    let n = b.finish();
    assert!(Message::parse(&buf[..n]).unwrap().has_fingerprint());
    buf[n - 1] ^= 1;
    assert_eq!(
        Message::parse(&buf[..n]).unwrap_err(),
        ParseError::FingerprintMismatch
    );

    let m = msg_with(&[(attr_type::FINGERPRINT, &[0; 8])]);
    assert_eq!(
        Message::parse(&m).unwrap_err(),
        ParseError::BadFingerprintLength
    );
}

#[test]
fn hostile_text_lengths_are_typed_errors() {
    let long_user = vec![b'u'; 513];
    let ok_user = vec![b'u'; 512];
    let m = msg_with(&[(attr_type::USERNAME, &long_user)]);
    assert_eq!(
        Message::parse(&m).unwrap().get::<Username>(),
        Some(Err(AttrError::TooLong {
            typ: attr_type::USERNAME,
            len: 513,
            max: 512
        }))
    );
    let m = msg_with(&[(attr_type::USERNAME, &ok_user)]);
    assert!(matches!(
        Message::parse(&m).unwrap().get::<Username>(),
        Some(Ok(_))
    ));

    // REALM: 128 ASCII characters are too many; 127 are fine.
    let m = msg_with(&[
        (attr_type::REALM, &[b'r'; 128]),
        (attr_type::NONCE, &[b'n'; 127]),
    ]);
    let p = Message::parse(&m).unwrap();
    assert_eq!(
        p.get::<Realm>(),
        Some(Err(AttrError::TooManyChars {
            typ: attr_type::REALM,
            chars: 128,
            max: 127
        }))
    );
    assert!(matches!(p.get::<Nonce>(), Some(Ok(_))));
    // NONCE: more than 762 bytes.
    let m = msg_with(&[(attr_type::NONCE, &[b'n'; 763])]);
    assert_eq!(
        Message::parse(&m).unwrap().get::<Nonce>(),
        Some(Err(AttrError::TooLong {
            typ: attr_type::NONCE,
            len: 763,
            max: 762
        }))
    );
    // 127 three-byte characters (381 bytes) are fine, 128 are not.
    let s127 = "\u{20AC}".repeat(127);
    let s128 = "\u{20AC}".repeat(128);
    let m = msg_with(&[
        (attr_type::REALM, s127.as_bytes()),
        (attr_type::NONCE, s128.as_bytes()),
    ]);
    let p = Message::parse(&m).unwrap();
    assert_eq!(p.get::<Realm>(), Some(Ok(Realm(&s127))));
    assert_eq!(
        p.get::<Nonce>(),
        Some(Err(AttrError::TooManyChars {
            typ: attr_type::NONCE,
            chars: 128,
            max: 127
        }))
    );
    // Not UTF-8, and empty.
    let m = msg_with(&[(attr_type::USERNAME, b"\xff\xfe"), (attr_type::REALM, b"")]);
    let p = Message::parse(&m).unwrap();
    assert_eq!(
        p.get::<Username>(),
        Some(Err(AttrError::NotUtf8 {
            typ: attr_type::USERNAME
        }))
    );
    assert_eq!(
        p.get::<Realm>(),
        Some(Err(AttrError::ZeroLength {
            typ: attr_type::REALM
        }))
    );

    // The builder refuses to produce them.
    let mut buf = vec![0u8; 4096];
    let mut b = MessageBuilder::new(&mut buf, MessageType::BINDING_REQUEST, TID).unwrap();
    let too_long = "u".repeat(513);
    assert_eq!(
        b.add(&Username(&too_long)),
        Err(EncodeError::ValueTooLong {
            typ: attr_type::USERNAME,
            len: 513,
            max: 512
        })
    );
    assert_eq!(
        b.add(&Realm(&s128)),
        Err(EncodeError::ValueTooLong {
            typ: attr_type::REALM,
            len: 128,
            max: 127
        })
    );
    assert_eq!(b.len(), 20, "a refused attribute leaves nothing behind");
}

#[test]
fn escaped_text_is_safe_for_logs() {
    let hostile = b"alice\n\"; DROP TABLE users; --\x1b[31m\\\xff";
    let s = escape(hostile).to_string();
    assert_eq!(
        s,
        "alice\\x0a\\x22; DROP TABLE users; --\\x1b[31m\\x5c\\xff"
    );
    assert!(s.bytes().all(|b| (0x20..0x7f).contains(&b)));
    let long = vec![b'a'; 1000];
    let s = escape(&long).to_string();
    assert!(s.ends_with("...(+872 bytes)"), "{s}");
    assert_eq!(Username("a\tb").escaped().to_string(), "a\\x09b");
}

#[test]
fn other_attribute_value_errors() {
    let m = msg_with(&[
        (attr_type::CHANNEL_NUMBER, &[0x3f, 0xff, 0, 0]),
        (attr_type::LIFETIME, &[0, 0, 1]),
        (attr_type::DONT_FRAGMENT, &[1]),
        (attr_type::EVEN_PORT, &[0x80, 0, 0]),
    ]);
    let p = Message::parse(&m).unwrap();
    assert_eq!(
        p.get::<ChannelNumber>(),
        Some(Err(AttrError::ChannelOutOfRange(0x3fff)))
    );
    assert_eq!(
        p.get::<Lifetime>(),
        Some(Err(AttrError::BadLength {
            typ: attr_type::LIFETIME,
            len: 3
        }))
    );
    assert_eq!(
        p.get::<DontFragment>(),
        Some(Err(AttrError::BadLength {
            typ: attr_type::DONT_FRAGMENT,
            len: 1
        }))
    );
    assert_eq!(
        p.get::<EvenPort>(),
        Some(Err(AttrError::BadLength {
            typ: attr_type::EVEN_PORT,
            len: 3
        }))
    );
    let m = msg_with(&[(attr_type::CHANNEL_NUMBER, &[0x50, 0x00, 0, 0])]);
    assert_eq!(
        Message::parse(&m).unwrap().get::<ChannelNumber>(),
        Some(Err(AttrError::ChannelOutOfRange(0x5000)))
    );
}

#[test]
fn channel_data_errors() {
    assert_eq!(
        ChannelData::parse(&[0x40, 0]),
        Err(ChannelDataError::TooShort { len: 2 })
    );
    assert_eq!(
        ChannelData::parse(&[0x3f, 0xff, 0, 0]),
        Err(ChannelDataError::ChannelOutOfRange(0x3fff))
    );
    assert_eq!(
        ChannelData::parse(&[0x50, 0x00, 0, 0]),
        Err(ChannelDataError::ChannelOutOfRange(0x5000))
    );
    // Length longer than the datagram.
    assert_eq!(
        ChannelData::parse(&[0x40, 0x01, 0, 5, 1, 2, 3, 4]),
        Err(ChannelDataError::LengthMismatch {
            declared: 5,
            available: 4
        })
    );
    // Up to 3 bytes of padding are fine, more are not.
    let ok = ChannelData::parse(&[0x40, 0x01, 0, 5, 1, 2, 3, 4, 5, 0, 0, 0]).unwrap();
    assert_eq!(
        ok,
        ChannelData {
            channel: 0x4001,
            data: &[1, 2, 3, 4, 5]
        }
    );
    assert_eq!(
        ChannelData::parse(&[0x40, 0x01, 0, 1, 1, 0, 0, 0, 0]),
        Err(ChannelDataError::LengthMismatch {
            declared: 1,
            available: 5
        })
    );
    // Encoding checks the channel and the buffer.
    let mut out = [0u8; 8];
    assert_eq!(
        channel::encode(0x3000, &[1], &mut out, false),
        Err(ChannelDataError::ChannelOutOfRange(0x3000))
    );
    assert_eq!(
        channel::encode(0x4000, &[1; 5], &mut out, true),
        Err(ChannelDataError::BufferTooSmall {
            needed: 12,
            available: 8
        })
    );
    let mut hdr = [0u8; 4];
    assert_eq!(
        channel::write_header(0x4000, 70_000, &mut hdr),
        Err(ChannelDataError::PayloadTooLong { len: 70_000 })
    );
}

#[test]
fn channel_data_stream_framing() {
    let mut buf = [0u8; 64];
    let a = channel::encode(0x4000, b"hello", &mut buf, true).unwrap();
    assert_eq!(a, 12);
    let b = channel::encode(0x4FFF, b"", &mut buf[a..], true).unwrap();
    let stream = &buf[..a + b];
    // Partial input: need more.
    for cut in 0..a {
        assert_eq!(ChannelData::parse_stream(&stream[..cut]), Ok(None));
    }
    let (f1, used) = ChannelData::parse_stream(stream).unwrap().unwrap();
    assert_eq!((f1.channel, f1.data, used), (0x4000, &b"hello"[..], 12));
    let (f2, used2) = ChannelData::parse_stream(&stream[used..]).unwrap().unwrap();
    assert_eq!((f2.channel, f2.data, used2), (0x4FFF, &b""[..], 4));
    assert_eq!(
        ChannelData::parse_stream(&[0x00, 0x01, 0, 0]),
        Err(ChannelDataError::ChannelOutOfRange(1))
    );
    // The UDP form of the same frame (padding included) parses too.
    assert_eq!(ChannelData::parse(&stream[..12]).unwrap(), f1);
}

#[test]
fn builder_errors() {
    let mut small = [0u8; 10];
    assert_eq!(
        MessageBuilder::new(&mut small, MessageType::BINDING_REQUEST, TID).unwrap_err(),
        EncodeError::BufferTooSmall {
            needed: 20,
            available: 10
        }
    );
    let mut buf = [0u8; 30];
    let bad = MessageType::new(
        peerlink_proto::Class::Request,
        peerlink_proto::Method(0x1000),
    );
    assert_eq!(
        MessageBuilder::new(&mut buf, bad, TID).unwrap_err(),
        EncodeError::BadMethod(0x1000)
    );
    let mut b = MessageBuilder::new(&mut buf, MessageType::BINDING_REQUEST, TID).unwrap();
    assert_eq!(
        b.add(&Software("0123456789")),
        Err(EncodeError::BufferTooSmall {
            needed: 36,
            available: 30
        })
    );
    assert_eq!(
        b.add(&ErrorCode {
            code: 200,
            reason: ""
        }),
        Err(EncodeError::InvalidValue {
            typ: attr_type::ERROR_CODE
        })
    );
    assert_eq!(b.finish(), 20);
    // The whole message is limited by the 16-bit length field.
    let mut big = vec![0u8; 200_000];
    let mut b = MessageBuilder::new(&mut big, MessageType::DATA_INDICATION, TID).unwrap();
    let payload = vec![0u8; 65_000];
    b.add(&peerlink_proto::attrs::Data(&payload)).unwrap();
    assert!(matches!(
        b.add(&peerlink_proto::attrs::Data(&payload)),
        Err(EncodeError::ValueTooLong { .. })
    ));
}
