//! Stateless nonces and the per-source limit on unauthenticated error replies.
//!
//! A nonce is `hex(ts) || hex(HMAC-SHA256(nonce_key, ts || client ip)[..12])` where `ts` is
//! seconds since [`super::Shared::epoch`] (common to all workers). Nothing is stored before a
//! request authenticates: a nonce is valid iff its MAC matches the IP address the request comes
//! from and its timestamp is not older than `nonce_lifetime` (nor in the future).
//!
//! The nonce is bound to the client's IP, not its port: a client that opens a new socket (a
//! second allocation, an ICE restart, another transport) reuses the realm and nonce it already
//! holds and sends credentials on its first Allocate, so it costs the relay no 401. A nonce
//! seen from another IP is refused (438), so it cannot be replayed from elsewhere.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use super::hash::SipState;

/// Bytes of the truncated nonce MAC (96 bits).
const NONCE_MAC_LEN: usize = 12;
/// Length of a nonce on the wire: 8 hex digits of timestamp + 24 of MAC.
pub const NONCE_LEN: usize = 8 + 2 * NONCE_MAC_LEN;

/// Why a presented nonce is not accepted (all answered 438).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NonceError {
    /// Not a nonce this relay could have made (format or MAC, incl. another client address).
    Forged,
    /// Older than the nonce lifetime.
    Expired,
}

/// Makes and checks stateless nonces.
#[derive(Clone)]
pub struct Nonces {
    key: [u8; 32],
    epoch: Instant,
    lifetime: Duration,
}

impl Nonces {
    /// Nonces keyed by `key`, timestamps counted from `epoch`, valid for `lifetime`.
    pub fn new(key: [u8; 32], epoch: Instant, lifetime: Duration) -> Self {
        Nonces {
            key,
            epoch,
            lifetime,
        }
    }

    fn ts(&self, now: Instant) -> u32 {
        let secs = now.saturating_duration_since(self.epoch).as_secs();
        u32::try_from(secs).unwrap_or(u32::MAX)
    }

    fn mac(&self, ts: u32, client: IpAddr) -> [u8; NONCE_MAC_LEN] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key)
            .expect("HMAC accepts keys of any length");
        mac.update(&ts.to_be_bytes());
        let ip = match client {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        mac.update(&ip);
        let tag = mac.finalize().into_bytes();
        let mut out = [0u8; NONCE_MAC_LEN];
        out.copy_from_slice(&tag[..NONCE_MAC_LEN]);
        out
    }

    /// A fresh nonce for `client` at `now`, written into `out`; returns it as text.
    pub fn make<'o>(
        &self,
        now: Instant,
        client: SocketAddr,
        out: &'o mut [u8; NONCE_LEN],
    ) -> &'o str {
        let ts = self.ts(now);
        let mac = self.mac(ts, client.ip());
        let mut raw = [0u8; 4 + NONCE_MAC_LEN];
        raw[..4].copy_from_slice(&ts.to_be_bytes());
        raw[4..].copy_from_slice(&mac);
        // hex digits are ASCII, so the buffer is valid UTF-8
        hex::encode_to_slice(raw, out).expect("NONCE_LEN is twice the raw length");
        std::str::from_utf8(out).unwrap_or_default()
    }

    /// Checks a nonce presented by `client` at `now`.
    pub fn check(&self, now: Instant, client: SocketAddr, nonce: &[u8]) -> Result<(), NonceError> {
        if nonce.len() != NONCE_LEN {
            return Err(NonceError::Forged);
        }
        let mut raw = [0u8; 4 + NONCE_MAC_LEN];
        hex::decode_to_slice(nonce, &mut raw).map_err(|_| NonceError::Forged)?;
        let ts = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]);
        let want = self.mac(ts, client.ip());
        if !bool::from(want.ct_eq(&raw[4..])) {
            return Err(NonceError::Forged);
        }
        let now_ts = self.ts(now);
        if ts > now_ts {
            return Err(NonceError::Forged);
        }
        if u64::from(now_ts - ts) >= self.lifetime.as_secs() {
            return Err(NonceError::Expired);
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    /// 0 = empty slot; otherwise a hash of the source IP (low bit forced to 1).
    tag: u64,
    /// Tokens in thousandths.
    milli: u64,
    /// Last refill, milliseconds since the limiter's epoch.
    at_ms: u64,
}

/// Token buckets per source IP in a fixed-size, direct-mapped table: memory never grows.
///
/// A slot holding another IP is taken over only once its bucket is full again (idle); until
/// then the two IPs share it, which can only make limiting stricter, never reset a victim's
/// bucket (a spoofed flood cannot launder its rate by evicting entries).
pub struct RateLimiter {
    slots: Vec<Bucket>,
    hasher: SipState,
    epoch: Instant,
    rate_milli_per_ms: u64,
    cap_milli: u64,
}

impl RateLimiter {
    /// `size` slots (at least 1), `rate` tokens per second, `burst` tokens at most.
    pub fn new(size: usize, rate: u32, burst: u32, seed: u64, epoch: Instant) -> Self {
        RateLimiter {
            slots: vec![Bucket::default(); size.max(1)],
            hasher: SipState::new(seed ^ 0x5241_5445),
            epoch,
            rate_milli_per_ms: u64::from(rate),
            cap_milli: u64::from(burst.max(1)) * 1000,
        }
    }

    /// Takes one token for `ip` at `now`; false = over the limit.
    pub fn allow(&mut self, now: Instant, ip: IpAddr) -> bool {
        use std::hash::BuildHasher;
        let h = self.hasher.hash_one(ip);
        let tag = h | 1;
        let idx = (h >> 1) as usize % self.slots.len();
        let now_ms = u64::try_from(now.saturating_duration_since(self.epoch).as_millis())
            .unwrap_or(u64::MAX);
        let (rate, cap) = (self.rate_milli_per_ms, self.cap_milli);
        let b = &mut self.slots[idx];
        let refill = |b: &mut Bucket| {
            let dt = now_ms.saturating_sub(b.at_ms);
            b.milli = b.milli.saturating_add(dt.saturating_mul(rate)).min(cap);
            b.at_ms = b.at_ms.max(now_ms);
        };
        if b.tag != 0 {
            refill(b);
        }
        if b.tag == 0 || (b.tag != tag && b.milli >= cap) {
            *b = Bucket {
                tag,
                milli: cap,
                at_ms: now_ms,
            };
        }
        if b.milli >= 1000 {
            b.milli -= 1000;
            true
        } else {
            false
        }
    }

    /// Slots in use (bounded by the table size).
    pub fn len(&self) -> usize {
        self.slots.iter().filter(|b| b.tag != 0).count()
    }

    /// True when no slot is in use.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fixed table size.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn nonce_round_trip_and_rejections() {
        let t0 = Instant::now();
        let n = Nonces::new([3; 32], t0, Duration::from_secs(600));
        let c = sa("198.51.100.9:4000");
        let mut buf = [0u8; NONCE_LEN];
        let now = t0 + Duration::from_secs(50);
        let nonce = n.make(now, c, &mut buf).to_owned();
        assert_eq!(n.check(now, c, nonce.as_bytes()), Ok(()));
        assert_eq!(
            n.check(now + Duration::from_secs(599), c, nonce.as_bytes()),
            Ok(())
        );
        assert_eq!(
            n.check(now + Duration::from_secs(600), c, nonce.as_bytes()),
            Err(NonceError::Expired)
        );
        // another port of the same IP (a new socket) -> accepted; another IP -> forged
        assert_eq!(
            n.check(now, sa("198.51.100.9:4001"), nonce.as_bytes()),
            Ok(())
        );
        assert_eq!(
            n.check(now, sa("198.51.100.8:4000"), nonce.as_bytes()),
            Err(NonceError::Forged)
        );
        // flipped digit, wrong length, non-hex -> forged
        let mut bad = nonce.clone().into_bytes();
        bad[20] = if bad[20] == b'0' { b'1' } else { b'0' };
        assert_eq!(n.check(now, c, &bad), Err(NonceError::Forged));
        assert_eq!(
            n.check(now, c, &nonce.as_bytes()[1..]),
            Err(NonceError::Forged)
        );
        assert_eq!(n.check(now, c, &[b'z'; NONCE_LEN]), Err(NonceError::Forged));
        // another key -> forged
        let other = Nonces::new([4; 32], t0, Duration::from_secs(600));
        assert_eq!(
            other.check(now, c, nonce.as_bytes()),
            Err(NonceError::Forged)
        );
        // a nonce from the future (timestamp edited, MAC recomputed would need the key)
        let later = n
            .make(now + Duration::from_secs(100), c, &mut buf)
            .to_owned();
        assert_eq!(n.check(now, c, later.as_bytes()), Err(NonceError::Forged));
    }

    #[test]
    fn rate_limiter_bounds_and_refills() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(64, 10, 5, 1, t0);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..5 {
            assert!(rl.allow(t0, ip));
        }
        assert!(!rl.allow(t0, ip));
        assert!(rl.allow(t0 + Duration::from_millis(100), ip)); // 10/s -> one token per 100 ms
        assert!(!rl.allow(t0 + Duration::from_millis(100), ip));
        // a flood from many sources never grows the table
        for i in 0..10_000u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            rl.allow(t0, ip);
        }
        assert!(rl.len() <= rl.capacity());
        assert_eq!(rl.capacity(), 64);
        // the victim's bucket was not reset by the flood
        assert!(!rl.allow(t0 + Duration::from_millis(100), ip));
    }
}
