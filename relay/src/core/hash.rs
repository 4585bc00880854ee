//! Hashers for the core's tables, both deterministic given the core's seed.
//!
//! [`SipState`]: std's SipHash keyed with secret material from the seed, for keys an attacker
//! chooses (client 5-tuples, peer addresses, source IPs). [`FastState`]: a multiplicative
//! hash for keys the relay chooses itself (its relayed addresses) or from a tiny space
//! (channel numbers).

use std::hash::{BuildHasher, Hasher};

/// SipHash-1-3 (std's `DefaultHasher`) with a 128-bit secret absorbed before the key.
#[derive(Clone, Copy, Debug)]
pub struct SipState {
    k0: u64,
    k1: u64,
}

impl SipState {
    /// Derive the secret from `seed` (splitmix64 so nearby seeds give unrelated keys).
    pub fn new(seed: u64) -> Self {
        let mut s = seed;
        SipState {
            k0: splitmix(&mut s),
            k1: splitmix(&mut s),
        }
    }
}

impl BuildHasher for SipState {
    type Hasher = std::collections::hash_map::DefaultHasher;
    fn build_hasher(&self) -> Self::Hasher {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        h.write_u64(self.k0);
        h.write_u64(self.k1);
        h
    }
}

/// splitmix64 step.
pub fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Builder of [`FastHasher`].
#[derive(Clone, Copy, Debug, Default)]
pub struct FastState;

impl BuildHasher for FastState {
    type Hasher = FastHasher;
    fn build_hasher(&self) -> FastHasher {
        FastHasher(0)
    }
}

/// FxHash-style word hasher: rotate, xor, multiply.
#[derive(Clone, Copy, Debug)]
pub struct FastHasher(u64);

const K: u64 = 0xf135_7aea_2e62_a9c5;

impl FastHasher {
    #[inline]
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(26) ^ w).wrapping_mul(K);
    }
}

impl Hasher for FastHasher {
    #[inline]
    fn finish(&self) -> u64 {
        // fold high bits down: hashbrown uses the top 7 bits as tags and low bits as index
        self.0 ^ (self.0 >> 29)
    }
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(w));
        }
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u16(&mut self, i: u16) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
}
