//! Credentials: long-term keys, constant-time comparison, TURN REST (coturn use-auth-secret).
#![allow(clippy::unwrap_used)] // test helpers, not only #[test] fns, unwrap

use peerlink_proto::attrs::{Nonce, Realm, RequestedTransport, Username};
use peerlink_proto::auth::rest::{self, RestError};
use peerlink_proto::auth::{constant_time_eq, long_term_key, short_term_key};
use peerlink_proto::{IntegrityError, Message, MessageBuilder, MessageType, TransactionId};

const NOW: u64 = 1_700_000_000;

#[test]
fn long_term_key_is_md5_of_user_realm_password() {
    // Independently computed: md5(b"1700003600:alice:peerlink.test:pw").
    assert_eq!(
        hex::encode(long_term_key("1700003600:alice", "peerlink.test", "pw")),
        "64373842cf895a6a0f3dcbebaf0ef44f"
    );
    assert_eq!(short_term_key("abc"), b"abc");
}

#[test]
fn constant_time_eq_compares_content_and_length() {
    assert!(constant_time_eq(b"abc", b"abc"));
    assert!(!constant_time_eq(b"abc", b"abd"));
    assert!(!constant_time_eq(b"abc", b"abcd"));
    assert!(constant_time_eq(b"", b""));
}

#[test]
fn rest_password_matches_coturn_formula() {
    // Independently computed: base64(HMAC-SHA1(b"north-secret", b"1700003600:alice")).
    assert_eq!(
        rest::password(b"north-secret", "1700003600:alice"),
        "Ji4axghh2/aljHmsPgH9mtDGVLw="
    );
    let (user, pass) = rest::credentials(b"north-secret", "alice", NOW, 3600);
    assert_eq!(user, "1700003600:alice");
    assert_eq!(pass, "Ji4axghh2/aljHmsPgH9mtDGVLw=");
    assert_eq!(rest::username(5, "bob"), "5:bob");
}

#[test]
fn rest_validate_accepts_fresh_and_rejects_bad_timestamps() {
    let secrets: [&[u8]; 1] = [b"north-secret"];
    let p = rest::validate(secrets, "1700003600:alice", NOW, 86_400).unwrap();
    assert_eq!(p.first(), "Ji4axghh2/aljHmsPgH9mtDGVLw=");
    assert_eq!(p.len(), 1);
    assert_eq!(p.expiry(), 1_700_003_600);
    // Expiring exactly now is still accepted; one second earlier is not.
    assert!(rest::validate(secrets, "1700000000:alice", NOW, 86_400).is_ok());
    assert_eq!(
        rest::validate(secrets, "1699999999:alice", NOW, 86_400),
        Err(RestError::Expired {
            expiry: 1_699_999_999,
            now: NOW
        })
    );
    assert_eq!(
        rest::validate(secrets, "1700086401:alice", NOW, 86_400),
        Err(RestError::TooFarInFuture {
            expiry: 1_700_086_401,
            now: NOW,
            max_ttl: 86_400
        })
    );
    assert!(rest::validate(secrets, "1700086400:alice", NOW, 86_400).is_ok());
    for bad in [
        "abc:alice",
        ":alice",
        "-5:alice",
        "+5:alice",
        "17e9:alice",
        " 1700000001:a",
        "99999999999999999999999:alice",
    ] {
        assert_eq!(
            rest::validate(secrets, bad, NOW, 86_400),
            Err(RestError::NotNumeric),
            "{bad}"
        );
    }
    assert_eq!(
        rest::validate(secrets, "alice", NOW, 86_400),
        Err(RestError::NoTimestamp)
    );
    let long = format!("1700003600:{}", "a".repeat(600));
    assert_eq!(
        rest::validate(secrets, &long, NOW, 86_400),
        Err(RestError::UsernameTooLong { len: 611, max: 512 })
    );
    let none: [&[u8]; 0] = [];
    assert_eq!(
        rest::validate(none, "1700003600:alice", NOW, 60_000),
        Err(RestError::NoSecrets)
    );
    let many: [&[u8]; 5] = [b"1", b"2", b"3", b"4", b"5"];
    assert_eq!(
        rest::validate(many, "1700003600:alice", NOW, 60_000),
        Err(RestError::TooManySecrets {
            max: rest::MAX_SECRETS
        })
    );
}

/// The relay's full path: a client signs an Allocate with REST credentials issued under the
/// old secret; the relay, configured with [new, old] during rotation, finds a key that verifies.
#[test]
fn rest_rotation_end_to_end_with_message_integrity() {
    let realm = "peerlink.test";
    let (user, pass) = rest::credentials(b"old-secret", "alice", NOW, 600);
    let key = long_term_key(&user, realm, &pass);
    let mut buf = [0u8; 512];
    let tid = TransactionId([9; 12]);
    let mut b = MessageBuilder::new(&mut buf, MessageType::ALLOCATE_REQUEST, tid).unwrap();
    b.add(&RequestedTransport::UDP).unwrap();
    b.add(&Username(&user)).unwrap();
    b.add(&Realm(realm)).unwrap();
    b.add(&Nonce("n0nce")).unwrap();
    b.add_integrity(&key).unwrap();
    b.add_fingerprint().unwrap();
    let n = b.finish();

    let m = Message::parse(&buf[..n]).unwrap();
    let username = m.get::<Username>().unwrap().unwrap().0;
    let realm_in = m.get::<Realm>().unwrap().unwrap().0;
    let secrets: [&[u8]; 2] = [b"new-secret", b"old-secret"];
    let candidates = rest::validate(secrets, username, NOW + 10, 86_400).unwrap();
    assert_eq!(candidates.len(), 2);
    let results: Vec<_> = candidates
        .long_term_keys(username, realm_in)
        .map(|k| m.verify_integrity(&k))
        .collect();
    assert_eq!(results, [Err(IntegrityError::Mismatch), Ok(())]);

    // Only the new secret configured: no key verifies.
    let only_new: [&[u8]; 1] = [b"new-secret"];
    let c = rest::validate(only_new, username, NOW + 10, 86_400).unwrap();
    assert!(
        c.long_term_keys(username, realm_in)
            .all(|k| m.verify_integrity(&k).is_err())
    );
    // After expiry the username is refused before any HMAC is computed.
    assert!(matches!(
        rest::validate(secrets, username, NOW + 601, 86_400),
        Err(RestError::Expired { .. })
    ));
}
