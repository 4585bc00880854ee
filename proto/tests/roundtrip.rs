//! Property tests: every attribute and every message kind survives encode -> parse unchanged.
#![allow(clippy::unwrap_used)] // test helpers, not only #[test] fns, unwrap

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};

use peerlink_proto::attrs::*;
use peerlink_proto::auth::long_term_key;
use peerlink_proto::channel::{self, ChannelData};
use peerlink_proto::{
    Attribute, Class, Message, MessageBuilder, MessageType, Method, TransactionId,
};
use proptest::prelude::*;

fn tid() -> impl Strategy<Value = TransactionId> {
    any::<[u8; 12]>().prop_map(TransactionId)
}

fn addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<u32>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port)),
        (any::<u128>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(ip),
            port,
            0,
            0
        ))),
    ]
}

fn family() -> impl Strategy<Value = AddressFamily> {
    prop_oneof![Just(AddressFamily::V4), Just(AddressFamily::V6)]
}

/// Text of 1..=127 characters within `max_bytes` (any Unicode scalar values).
fn text(max_bytes: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(any::<char>(), 1..=127).prop_map(move |cs| {
        let mut s = String::new();
        for c in cs {
            if s.len() + c.len_utf8() > max_bytes {
                break;
            }
            s.push(c);
        }
        if s.is_empty() { "x".to_string() } else { s }
    })
}

/// Encodes `attr` alone in a message (with integrity and fingerprint), parses it back and
/// decodes it again.
fn roundtrip<A>(attr: &A, tid: TransactionId) -> Result<(), TestCaseError>
where
    A: for<'a> Attribute<'a> + PartialEq + std::fmt::Debug,
{
    let mut buf = vec![0u8; 70_000];
    let mut b = MessageBuilder::new(&mut buf, MessageType::ALLOCATE_REQUEST, tid).unwrap();
    b.add(attr).unwrap();
    b.add_integrity(b"k").unwrap();
    b.add_fingerprint().unwrap();
    let n = b.finish();
    let m = Message::parse(&buf[..n]).unwrap();
    let got = m.get::<A>().unwrap().unwrap();
    prop_assert_eq!(&got, attr);
    prop_assert_eq!(m.verify_integrity(b"k"), Ok(()));
    prop_assert_eq!(m.raw(A::TYPE).map(<[u8]>::len), Some(attr.encoded_len()));
    Ok(())
}

macro_rules! borrowed_roundtrip {
    ($name:ident, $strategy:expr, $build:expr) => {
        proptest! {
            #[test]
            fn $name(v in $strategy, t in tid()) {
                let attr = $build(&v);
                let mut buf = vec![0u8; 70_000];
                let mut b = MessageBuilder::new(&mut buf, MessageType::BINDING_REQUEST, t).unwrap();
                b.add(&attr).unwrap();
                b.add_fingerprint().unwrap();
                let n = b.finish();
                let m = Message::parse(&buf[..n]).unwrap();
                prop_assert_eq!(m.get(), Some(Ok(attr)));
            }
        }
    };
}

proptest! {
    #[test]
    fn address_attributes(a in addr(), t in tid()) {
        roundtrip(&MappedAddress(a), t)?;
        roundtrip(&XorMappedAddress(a), t)?;
        roundtrip(&XorPeerAddress(a), t)?;
        roundtrip(&XorRelayedAddress(a), t)?;
        roundtrip(&AlternateServer(a), t)?;
        roundtrip(&ResponseOrigin(a), t)?;
        roundtrip(&OtherAddress(a), t)?;
    }

    #[test]
    fn xor_addresses_are_not_stored_in_clear(a in addr(), t in tid()) {
        let mut out = [0u8; 20];
        XorMappedAddress(a).encode(&t, &mut out).unwrap();
        let mut plain = [0u8; 20];
        MappedAddress(a).encode(&t, &mut plain).unwrap();
        // The port is always XOR'd with 0x2112, so the encodings always differ.
        prop_assert_ne!(&out[2..4], &plain[2..4]);
    }

    #[test]
    fn numeric_attributes(x in any::<u32>(), y in any::<u64>(), ch in 0x4000u16..=0x4FFF, t in tid()) {
        roundtrip(&Lifetime(x), t)?;
        roundtrip(&Priority(x), t)?;
        roundtrip(&IceControlled(y), t)?;
        roundtrip(&IceControlling(y), t)?;
        roundtrip(&ChannelNumber(ch), t)?;
        roundtrip(&RequestedTransport(x as u8), t)?;
        roundtrip(&ReservationToken(y.to_be_bytes()), t)?;
    }

    #[test]
    fn flag_and_family_attributes(r in any::<bool>(), c in any::<bool>(), f in family(), t in tid()) {
        roundtrip(&DontFragment, t)?;
        roundtrip(&UseCandidate, t)?;
        roundtrip(&EvenPort { reserve: r }, t)?;
        roundtrip(&ChangeRequest { change_ip: r, change_port: c }, t)?;
        roundtrip(&RequestedAddressFamily(f), t)?;
        roundtrip(&AdditionalAddressFamily(f), t)?;
    }

    #[test]
    fn unknown_attributes(types in proptest::collection::vec(any::<u16>(), 0..=16), t in tid()) {
        roundtrip(&UnknownAttributes::from_slice(&types).unwrap(), t)?;
    }

    #[test]
    fn message_type_bits(method in 0u16..=0x0FFF, class in 0u16..4) {
        let mt = MessageType::new(Class::from_bits(class), Method(method));
        let v = mt.to_u16();
        prop_assert_eq!(v & 0xC000, 0);
        prop_assert_eq!(MessageType::from_u16(v), mt);
    }

    /// Any message kind with any list of attributes (raw), optionally signed and fingerprinted.
    #[test]
    fn whole_messages(
        method in 0u16..=0x0FFF,
        class in 0u16..4,
        t in tid(),
        attrs in proptest::collection::vec(
            (0x8000u16..=0xFFFF, proptest::collection::vec(any::<u8>(), 0..64)), 0..8),
        mi in any::<bool>(),
        mi256 in any::<bool>(),
        fp in any::<bool>(),
        password in "[ -~]{0,40}",
    ) {
        let key = long_term_key("user", "realm", &password);
        let mt = MessageType::new(Class::from_bits(class), Method(method));
        let mut buf = vec![0u8; 2048];
        let mut b = MessageBuilder::new(&mut buf, mt, t).unwrap();
        let attrs: Vec<_> = attrs.into_iter()
            .filter(|(ty, _)| *ty != attr_type::FINGERPRINT)
            .collect();
        for (ty, v) in &attrs {
            b.add_raw(*ty, v).unwrap();
        }
        if mi { b.add_integrity(&key).unwrap(); }
        if mi256 { b.add_integrity_sha256(&key).unwrap(); }
        if fp { b.add_fingerprint().unwrap(); }
        let n = b.finish();
        let m = Message::parse(&buf[..n]).unwrap();
        prop_assert_eq!(m.message_type(), mt);
        prop_assert_eq!(m.transaction_id(), t);
        prop_assert_eq!(m.len(), n);
        prop_assert_eq!((m.has_integrity(), m.has_integrity_sha256(), m.has_fingerprint()), (mi, mi256, fp));
        let got: Vec<(u16, Vec<u8>)> = m.attributes()
            .filter(|a| a.typ != attr_type::MESSAGE_INTEGRITY && a.typ != attr_type::MESSAGE_INTEGRITY_SHA256)
            .map(|a| (a.typ, a.value.to_vec()))
            .collect();
        prop_assert_eq!(got, attrs);
        prop_assert!(m.unknown_comprehension_required().is_empty());
        if mi { prop_assert_eq!(m.verify_integrity(&key), Ok(())); }
        if mi256 { prop_assert_eq!(m.verify_integrity_sha256(&key), Ok(())); }
    }

    #[test]
    fn channel_data(ch in 0x4000u16..=0x4FFF, payload in proptest::collection::vec(any::<u8>(), 0..300), pad in any::<bool>()) {
        let mut out = vec![0u8; 400];
        let n = channel::encode(ch, &payload, &mut out, pad).unwrap();
        prop_assert_eq!(n, channel::encoded_len(payload.len(), pad));
        let cd = ChannelData::parse(&out[..n]).unwrap();
        prop_assert_eq!(cd, ChannelData { channel: ch, data: &payload });
        if pad {
            prop_assert_eq!(ChannelData::parse_stream(&out[..n]).unwrap(), Some((cd, n)));
        }
        let mut hdr = [0u8; 4];
        channel::write_header(ch, payload.len(), &mut hdr).unwrap();
        prop_assert_eq!(&hdr[..], &out[..4]);
    }
}

borrowed_roundtrip!(username, text(512), |s: &String| Username(leak(s)));
borrowed_roundtrip!(realm, text(762), |s: &String| Realm(leak(s)));
borrowed_roundtrip!(nonce, text(762), |s: &String| Nonce(leak(s)));
borrowed_roundtrip!(software, text(762), |s: &String| Software(leak(s)));
borrowed_roundtrip!(error_code, (300u16..700, text(762)), |(c, s): &(
    u16,
    String
)| ErrorCode {
    code: *c,
    reason: leak(s)
});
borrowed_roundtrip!(
    address_error_code,
    (300u16..700, text(762), family()),
    |(c, s, f): &(u16, String, AddressFamily)| AddressErrorCode {
        family: *f,
        code: *c,
        reason: leak(s)
    }
);
borrowed_roundtrip!(
    data,
    proptest::collection::vec(any::<u8>(), 0..2000),
    |v: &Vec<u8>| Data(Box::leak(v.clone().into_boxed_slice()))
);

/// Gives test strings a `'static` lifetime (tests only; the leak is bounded by the case count).
fn leak(s: &str) -> &'static str {
    Box::leak(s.to_string().into_boxed_str())
}
