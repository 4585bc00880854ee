//! Media encryption: X25519 key agreement, HKDF-SHA256 key schedule and SRTP-like AES-GCM
//! packet protection (RFC 7714 nonce and AAD, RFC 3711 index estimation and replay window).
//!
//! Flow: each side makes a [`KeyExchange`] (an X25519 secret from a seeded/OS RNG) and sends its
//! public key through signaling. Signaling relays public keys only, so it never learns media
//! keys. Each side then calls [`KeyExchange::derive`] with the peer's public key and its
//! [`Role`] and gets [`MediaKeys`]: one AES-256-GCM key + 12-byte salt per direction.
//!
//! Key schedule: `PRK = HKDF-Extract(salt = min(pkA,pkB) || max(pkA,pkB), IKM = X25519(a, B))`,
//! then `OKM = HKDF-Expand(PRK, "peerlink media v1 " || direction || context, 44)` split into a
//! 32-byte key and a 12-byte salt, `direction` being `caller->callee` or `callee->caller`. The
//! caller (controlling side) sends with `caller->callee`.
//!
//! Packets: RTP header in clear (the AEAD associated data), payload encrypted; 16-byte tag
//! appended. Nonce = salt XOR (`00 00` || SSRC || ROC || SEQ) as in RFC 7714 §8.1. The receiver
//! estimates the rollover counter from the sequence number (RFC 3711 Appendix A), checks a
//! 128-packet replay window *before* decrypting, and updates its state only after the tag
//! verifies, so garbage cannot move the window.

use std::collections::HashMap;

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes128Gcm, Aes256Gcm, Nonce, Tag};
use hkdf::Hkdf;
use sha2::Sha256;
use thiserror::Error;
use x25519_dalek::{PublicKey, StaticSecret};

use super::rtp::{RtpError, RtpHeader, RtpPacket};

/// AES-GCM authentication tag length.
pub const TAG_LEN: usize = 16;
/// Replay window size in packets (RFC 3711 requires at least 64).
pub const REPLAY_WINDOW: u64 = 128;
/// Most SSRCs a receiver tracks per direction (media + control + a spare for a restart).
const MAX_STREAMS: usize = 4;

/// Which end of the call this endpoint is; decides the sending direction label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The inviting, ICE-controlling side.
    Caller,
    /// The invited side.
    Callee,
}

/// Key agreement failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum KeyError {
    /// The peer's public key is a low-order point: the shared secret would be all zeros.
    #[error("peer public key is not contributory (low-order point)")]
    NonContributory,
    /// Both sides used the same public key (reflected key).
    #[error("peer public key equals our own")]
    Reflected,
}

/// Our X25519 key pair for one call.
pub struct KeyExchange {
    secret: StaticSecret,
    public: PublicKey,
}

impl KeyExchange {
    /// Builds the key pair from 32 random bytes (from the caller's CSPRNG; tests pass a seeded one).
    pub fn from_random_bytes(bytes: [u8; 32]) -> Self {
        let secret = StaticSecret::from(bytes);
        let public = PublicKey::from(&secret);
        Self { secret, public }
    }

    /// Builds the key pair from an RNG.
    pub fn generate<R: rand::RngCore + ?Sized>(rng: &mut R) -> Self {
        let mut b = [0u8; 32];
        rng.fill_bytes(&mut b);
        Self::from_random_bytes(b)
    }

    /// Our public key, to send through signaling.
    pub fn public_key(&self) -> [u8; 32] {
        self.public.to_bytes()
    }

    /// Derives the per-direction media keys. `context` binds the keys to the call (e.g. the call
    /// id); both sides must pass the same bytes.
    pub fn derive(
        &self,
        peer_public: &[u8; 32],
        role: Role,
        context: &[u8],
    ) -> Result<MediaKeys, KeyError> {
        let ours = self.public.to_bytes();
        if &ours == peer_public {
            return Err(KeyError::Reflected);
        }
        let shared = self.secret.diffie_hellman(&PublicKey::from(*peer_public));
        if !shared.was_contributory() {
            return Err(KeyError::NonContributory);
        }
        let (lo, hi) = if ours < *peer_public {
            (ours, *peer_public)
        } else {
            (*peer_public, ours)
        };
        let mut salt = [0u8; 64];
        salt[..32].copy_from_slice(&lo);
        salt[32..].copy_from_slice(&hi);
        let hk = Hkdf::<Sha256>::new(Some(&salt), shared.as_bytes());
        let expand = |dir: &[u8]| -> DirectionKey {
            let mut info = b"peerlink media v1 ".to_vec();
            info.extend_from_slice(dir);
            info.extend_from_slice(context);
            let mut okm = [0u8; 44];
            hk.expand(&info, &mut okm)
                .expect("44 bytes is far below HKDF-SHA256's 8160-byte limit");
            let mut key = [0u8; 32];
            key.copy_from_slice(&okm[..32]);
            let mut s = [0u8; 12];
            s.copy_from_slice(&okm[32..]);
            DirectionKey::new(key, s)
        };
        let c2e = expand(b"caller->callee");
        let e2c = expand(b"callee->caller");
        Ok(match role {
            Role::Caller => MediaKeys { tx: c2e, rx: e2c },
            Role::Callee => MediaKeys { tx: e2c, rx: c2e },
        })
    }
}

/// AES-GCM with the key size of the suite (we derive 256-bit keys; 128-bit keys exist for
/// RFC 7714's AEAD_AES_128_GCM test vectors and interop).
#[derive(Clone)]
#[allow(clippy::large_enum_variant)] // one per stream direction, built once, never moved hot
enum Cipher {
    Aes128(Aes128Gcm),
    Aes256(Aes256Gcm),
}

impl Cipher {
    fn encrypt(&self, nonce: &[u8; 12], aad: &[u8], body: &mut [u8]) -> Tag {
        let n = Nonce::from_slice(nonce);
        let r = match self {
            Cipher::Aes128(c) => c.encrypt_in_place_detached(n, aad, body),
            Cipher::Aes256(c) => c.encrypt_in_place_detached(n, aad, body),
        };
        r.expect("AES-GCM encryption only fails for inputs over 64 GiB")
    }

    fn decrypt(&self, nonce: &[u8; 12], aad: &[u8], body: &mut [u8], tag: &[u8]) -> bool {
        let (n, t) = (Nonce::from_slice(nonce), Tag::from_slice(tag));
        match self {
            Cipher::Aes128(c) => c.decrypt_in_place_detached(n, aad, body, t).is_ok(),
            Cipher::Aes256(c) => c.decrypt_in_place_detached(n, aad, body, t).is_ok(),
        }
    }
}

/// One direction's AEAD key and salt.
#[derive(Clone)]
pub struct DirectionKey {
    cipher: Cipher,
    salt: [u8; 12],
    fingerprint: [u8; 4],
}

impl std::fmt::Debug for DirectionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DirectionKey(fp={:02x?})", self.fingerprint)
    }
}

impl DirectionKey {
    /// Builds an AES-256-GCM key from raw material (normally from [`KeyExchange::derive`]).
    pub fn new(key: [u8; 32], salt: [u8; 12]) -> Self {
        Self::with_cipher(Cipher::Aes256(Aes256Gcm::new(&key.into())), &key, salt)
    }

    /// Builds an AES-128-GCM key (RFC 7714 AEAD_AES_128_GCM; test vectors, interop).
    pub fn new_aes128(key: [u8; 16], salt: [u8; 12]) -> Self {
        Self::with_cipher(Cipher::Aes128(Aes128Gcm::new(&key.into())), &key, salt)
    }

    fn with_cipher(cipher: Cipher, key: &[u8], salt: [u8; 12]) -> Self {
        use sha2::Digest;
        let d = Sha256::digest(key);
        Self {
            cipher,
            salt,
            fingerprint: [d[0], d[1], d[2], d[3]],
        }
    }

    /// A short non-secret fingerprint (first bytes of SHA-256 of the key) for logs and tests.
    pub fn fingerprint(&self) -> [u8; 4] {
        self.fingerprint
    }

    fn nonce(&self, ssrc: u32, roc: u32, seq: u16) -> [u8; 12] {
        let mut iv = [0u8; 12];
        iv[2..6].copy_from_slice(&ssrc.to_be_bytes());
        iv[6..10].copy_from_slice(&roc.to_be_bytes());
        iv[10..12].copy_from_slice(&seq.to_be_bytes());
        for (b, s) in iv.iter_mut().zip(self.salt) {
            *b ^= s;
        }
        iv
    }
}

/// Both directions' keys for one endpoint.
#[derive(Debug, Clone)]
pub struct MediaKeys {
    /// Key we encrypt with.
    pub tx: DirectionKey,
    /// Key we decrypt with.
    pub rx: DirectionKey,
}

/// The sending half of one RTP stream: sequence numbering, rollover counter, encryption.
#[derive(Debug, Clone)]
pub struct SrtpSender {
    key: DirectionKey,
    ssrc: u32,
    next_seq: u16,
    roc: u32,
}

impl SrtpSender {
    /// New stream with the given SSRC and first sequence number (pick it at random).
    pub fn new(key: DirectionKey, ssrc: u32, first_seq: u16) -> Self {
        Self {
            key,
            ssrc,
            next_seq: first_seq,
            roc: 0,
        }
    }

    /// SSRC of this stream.
    pub fn ssrc(&self) -> u32 {
        self.ssrc
    }

    /// The (ROC, SEQ) the next packet will use.
    pub fn next_index(&self) -> (u32, u16) {
        (self.roc, self.next_seq)
    }

    /// Builds and encrypts one packet, consuming a sequence number.
    pub fn protect(
        &mut self,
        marker: bool,
        payload_type: u8,
        timestamp: u32,
        payload: &[u8],
    ) -> Vec<u8> {
        let header = RtpHeader {
            marker,
            payload_type,
            sequence: self.next_seq,
            timestamp,
            ssrc: self.ssrc,
        };
        let out = protect_with(&self.key, &header, self.roc, payload);
        self.next_seq = self.next_seq.wrapping_add(1);
        if self.next_seq == 0 {
            self.roc = self.roc.wrapping_add(1);
        }
        out
    }
}

/// Encrypts `payload` under `header` with an explicit ROC (exposed for tests and tools).
pub fn protect_with(key: &DirectionKey, header: &RtpHeader, roc: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + payload.len() + TAG_LEN);
    header.write(&mut out);
    let hlen = out.len();
    out.extend_from_slice(payload);
    let nonce = key.nonce(header.ssrc, roc, header.sequence);
    let (aad, body) = out.split_at_mut(hlen);
    let tag = key.cipher.encrypt(&nonce, aad, body);
    out.extend_from_slice(&tag);
    out
}

/// Why an incoming packet was dropped before it could be played.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum DropReason {
    /// Not a parseable RTP packet.
    #[error("malformed: {0}")]
    Malformed(#[from] RtpError),
    /// Payload shorter than the authentication tag.
    #[error("too short for the authentication tag")]
    NoTag,
    /// This index was already received (a replay, or a duplicate made by the network —
    /// indistinguishable at this layer).
    #[error("replayed packet index")]
    Replayed,
    /// Older than the replay window: cannot be checked, so dropped as a possible replay.
    #[error("packet index behind the replay window")]
    TooOld,
    /// Tag did not verify: wrong key, tampering or garbage.
    #[error("authentication failed")]
    AuthFailed,
    /// A new SSRC arrived while the receiver already tracks the maximum number of streams.
    #[error("too many streams")]
    TooManyStreams,
}

/// A successfully decrypted packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unprotected {
    /// Its RTP header.
    pub header: RtpHeader,
    /// 48-bit extended sequence number (ROC << 16 | SEQ).
    pub index: u64,
    /// Decrypted payload.
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone)]
struct ReplayState {
    roc: u32,
    s_l: u16,
    max_index: u64,
    window: u128,
}

impl ReplayState {
    /// RFC 3711 Appendix A: the ROC to use for `seq`, as a signed value (may be -1).
    fn estimate(&self, seq: u16) -> i64 {
        let roc = i64::from(self.roc);
        let (s_l, seq) = (i64::from(self.s_l), i64::from(seq));
        if s_l < 32768 {
            if seq - s_l > 32768 { roc - 1 } else { roc }
        } else if s_l - 32768 > seq {
            roc + 1
        } else {
            roc
        }
    }

    fn check(&self, index: u64) -> Result<(), DropReason> {
        if index > self.max_index {
            return Ok(());
        }
        let delta = self.max_index - index;
        if delta >= REPLAY_WINDOW {
            return Err(DropReason::TooOld);
        }
        if self.window & (1u128 << delta) != 0 {
            return Err(DropReason::Replayed);
        }
        Ok(())
    }

    fn accept(&mut self, index: u64) {
        if index > self.max_index {
            let shift = index - self.max_index;
            self.window = if shift >= 128 {
                0
            } else {
                self.window << shift
            };
            self.window |= 1;
            self.max_index = index;
            self.roc = (index >> 16) as u32;
            self.s_l = (index & 0xffff) as u16;
        } else {
            self.window |= 1u128 << (self.max_index - index);
        }
    }
}

/// The receiving half: decrypts packets from one peer (all its SSRCs) with one direction key.
#[derive(Debug, Clone)]
pub struct SrtpReceiver {
    key: DirectionKey,
    streams: HashMap<u32, ReplayState>,
}

impl SrtpReceiver {
    /// Receiver for the peer's direction key.
    pub fn new(key: DirectionKey) -> Self {
        Self {
            key,
            streams: HashMap::new(),
        }
    }

    /// Checks, authenticates and decrypts one datagram. Never panics on any input.
    pub fn unprotect(&mut self, datagram: &[u8]) -> Result<Unprotected, DropReason> {
        let pkt = RtpPacket::parse_header(datagram)?;
        let (header, hlen) = (pkt.0, pkt.1);
        let body = &datagram[hlen..];
        if body.len() < TAG_LEN {
            return Err(DropReason::NoTag);
        }
        let index = match self.streams.get(&header.ssrc) {
            Some(st) => {
                let v = st.estimate(header.sequence);
                if v < 0 {
                    return Err(DropReason::TooOld);
                }
                let index = ((v as u64) << 16) | u64::from(header.sequence);
                st.check(index)?;
                index
            }
            None => {
                if self.streams.len() >= MAX_STREAMS {
                    return Err(DropReason::TooManyStreams);
                }
                u64::from(header.sequence)
            }
        };
        let roc = (index >> 16) as u32;
        let (ct, tag) = body.split_at(body.len() - TAG_LEN);
        let mut payload = ct.to_vec();
        let nonce = self.key.nonce(header.ssrc, roc, header.sequence);
        if !self
            .key
            .cipher
            .decrypt(&nonce, &datagram[..hlen], &mut payload, tag)
        {
            return Err(DropReason::AuthFailed);
        }
        let st = self.streams.entry(header.ssrc).or_insert(ReplayState {
            roc: 0,
            s_l: header.sequence,
            max_index: index,
            window: 0,
        });
        st.accept(index);
        Ok(Unprotected {
            header,
            index,
            payload,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn keys() -> (MediaKeys, MediaKeys) {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let a = KeyExchange::generate(&mut rng);
        let b = KeyExchange::generate(&mut rng);
        let ka = a.derive(&b.public_key(), Role::Caller, b"call-1").unwrap();
        let kb = b.derive(&a.public_key(), Role::Callee, b"call-1").unwrap();
        (ka, kb)
    }

    #[test]
    fn both_sides_agree_and_directions_differ() {
        let (a, b) = keys();
        assert_eq!(a.tx.fingerprint(), b.rx.fingerprint());
        assert_eq!(a.rx.fingerprint(), b.tx.fingerprint());
        assert_ne!(a.tx.fingerprint(), a.rx.fingerprint());
    }

    #[test]
    fn context_changes_keys_and_bad_public_keys_rejected() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let a = KeyExchange::generate(&mut rng);
        let b = KeyExchange::generate(&mut rng);
        let k1 = a.derive(&b.public_key(), Role::Caller, b"x").unwrap();
        let k2 = a.derive(&b.public_key(), Role::Caller, b"y").unwrap();
        assert_ne!(k1.tx.fingerprint(), k2.tx.fingerprint());
        assert_eq!(
            a.derive(&[0u8; 32], Role::Caller, b"").err(),
            Some(KeyError::NonContributory)
        );
        assert_eq!(
            a.derive(&a.public_key(), Role::Caller, b"").err(),
            Some(KeyError::Reflected)
        );
    }

    /// RFC 7714 §16.1 (AEAD_AES_128_GCM): key 000102..0f, salt "Quid pro quo", ROC 0,
    /// SSRC 0x5501a0b2, SEQ 0xf17b; plaintext "Gallia est omnis divisa in partes tres".
    #[test]
    fn rfc7714_known_vector() {
        let hex = |s: &str| -> Vec<u8> {
            let s: String = s.split_whitespace().collect();
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                .collect()
        };
        let mut key = [0u8; 16];
        key.iter_mut().enumerate().for_each(|(i, k)| *k = i as u8);
        let salt: [u8; 12] = hex("517569642070726f2071756f").try_into().unwrap();
        let plain = hex(
            "8040f17b 8041f8d3 5501a0b2 47616c6c 69612065 7374206f 6d6e6973 20646976
             69736120 696e2070 61727465 73207472 6573",
        );
        let expected = hex(
            "8040f17b 8041f8d3 5501a0b2 f24de3a3 fb34de6c acba861c 9d7e4bca be633bd5
             0d294e6f 42a5f47a 51c7d19b 36de3adf 8833899d 7f27beb1 6a9152cf 765ee439 0cce",
        );
        let k = DirectionKey::new_aes128(key, salt);
        let (header, hlen) = RtpPacket::parse_header(&plain).unwrap();
        assert_eq!(
            (header.ssrc, header.sequence, hlen),
            (0x5501a0b2, 0xf17b, 12)
        );
        assert_eq!(protect_with(&k, &header, 0, &plain[12..]), expected);
        let mut rx = SrtpReceiver::new(k);
        let got = rx.unprotect(&expected).unwrap();
        assert_eq!(got.payload, &plain[12..]);
        assert_eq!(got.payload, b"Gallia est omnis divisa in partes tres");
    }

    #[test]
    fn round_trip() {
        let (a, b) = keys();
        let mut tx = SrtpSender::new(a.tx, 0x1234_5678, 100);
        let mut rx = SrtpReceiver::new(b.rx);
        for i in 0..10u32 {
            let payload = vec![i as u8; 50 + i as usize];
            let wire = tx.protect(i == 0, 111, i * 960, &payload);
            assert_eq!(wire.len(), 12 + payload.len() + TAG_LEN);
            assert_ne!(&wire[12..12 + payload.len()], &payload[..]);
            let got = rx.unprotect(&wire).unwrap();
            assert_eq!(got.payload, payload);
            assert_eq!(got.header.timestamp, i * 960);
            assert_eq!(got.index, 100 + u64::from(i));
        }
    }

    #[test]
    fn wrong_key_replay_and_tamper_are_dropped() {
        let (a, b) = keys();
        let mut tx = SrtpSender::new(a.tx.clone(), 1, 0);
        // Our own tx key is not the peer's rx key: wrong key.
        let mut wrong = SrtpReceiver::new(a.rx);
        let mut rx = SrtpReceiver::new(b.rx);
        let p0 = tx.protect(false, 111, 0, b"hello");
        assert_eq!(wrong.unprotect(&p0), Err(DropReason::AuthFailed));
        assert!(rx.unprotect(&p0).is_ok());
        assert_eq!(rx.unprotect(&p0), Err(DropReason::Replayed));
        let mut bad = tx.protect(false, 111, 960, b"world");
        bad[5] ^= 1; // header (AAD) tampered
        assert_eq!(rx.unprotect(&bad), Err(DropReason::AuthFailed));
        bad[5] ^= 1;
        // A forged packet must not have advanced the window: the genuine one still decrypts.
        assert!(rx.unprotect(&bad).is_ok());
        assert_eq!(
            rx.unprotect(&[0x80, 0, 0]),
            Err(DropReason::Malformed(RtpError::TooShort(3)))
        );
        assert_eq!(rx.unprotect(&[0x80; 20]), Err(DropReason::NoTag));
    }

    #[test]
    fn reordered_within_window_accepted_old_rejected() {
        let (a, b) = keys();
        let mut tx = SrtpSender::new(a.tx, 9, 500);
        let mut rx = SrtpReceiver::new(b.rx);
        let pkts: Vec<Vec<u8>> = (0..200u32)
            .map(|i| tx.protect(false, 111, i, &[1, 2, 3]))
            .collect();
        // Deliver 0, then 150..200, then 100..150 reversed (within 128 of 199), then 10 (too old).
        rx.unprotect(&pkts[0]).unwrap();
        for p in &pkts[150..200] {
            rx.unprotect(p).unwrap();
        }
        for p in pkts[100..150].iter().rev() {
            rx.unprotect(p).unwrap();
        }
        assert_eq!(rx.unprotect(&pkts[10]), Err(DropReason::TooOld));
        assert_eq!(rx.unprotect(&pkts[120]), Err(DropReason::Replayed));
    }

    #[test]
    fn roc_rollover_at_65535() {
        let (a, b) = keys();
        let mut tx = SrtpSender::new(a.tx, 77, 65530);
        let mut rx = SrtpReceiver::new(b.rx);
        let pkts: Vec<Vec<u8>> = (0..12u32)
            .map(|i| tx.protect(false, 111, i, &[i as u8]))
            .collect();
        assert_eq!(tx.next_index(), (1, 6));
        // Deliver with a reorder across the wrap: 65534, 0(ROC1), 65535, 1, ...
        let order = [0, 1, 2, 3, 4, 6, 5, 7, 8, 9, 11, 10];
        for &i in &order {
            let got = rx.unprotect(&pkts[i]).unwrap();
            assert_eq!(got.index, 65530 + i as u64, "packet {i}");
            assert_eq!(got.payload, [i as u8]);
        }
        // Replay of a pre-wrap packet after the wrap is still detected.
        assert_eq!(rx.unprotect(&pkts[5]), Err(DropReason::Replayed));
        // The same (SSRC, SEQ) with ROC 0 vs ROC 1 used different nonces: a ROC-0 packet with
        // seq 2 cannot be confused with ROC-1 seq 2.
        let hdr = RtpHeader {
            marker: false,
            payload_type: 111,
            sequence: 7,
            timestamp: 0,
            ssrc: 77,
        };
        let (ka, _) = keys();
        let forged_old_roc = protect_with(&ka.tx, &hdr, 0, &[0]);
        assert_eq!(rx.unprotect(&forged_old_roc), Err(DropReason::AuthFailed));
    }
}
