//! Relay choice for a call: pure logic over relay records, time and RNG passed in.
//!
//! Eligible relays have a fresh heartbeat, are not draining and are not full. They are tried
//! in tiers — the caller's region, then the callee's, then any — and within a tier one relay
//! is picked by *power of two random choices*: sample two distinct relays uniformly, keep the
//! one with the lower effective load. Effective load corrects the last reported figures with
//! the allocations handed out since the last heartbeat (each choice increments the relay's
//! `handed_out`; its next heartbeat resets it), so a burst of calls between two heartbeats
//! spreads instead of piling onto the relay that looked least loaded at the last heartbeat.

use std::net::SocketAddr;
use std::sync::Arc;

use rand::Rng;

use crate::clock::Timestamp;
use peerlink_api::directory::{ChooseRelaysRequest, ChosenRelay, MAX_CHOOSE_COUNT, RelayInfo};

/// Everything the directory knows about one relay.
#[derive(Debug, Clone, PartialEq)]
pub struct RelayRecord {
    /// Relay id.
    pub relay_id: Arc<str>,
    /// Public TURN address.
    pub turn_addr: SocketAddr,
    /// TURN-over-TCP address, if it listens for TCP clients.
    pub turn_tcp_addr: Option<SocketAddr>,
    /// TURN-over-TLS address, if it listens for TLS clients.
    pub turn_tls_addr: Option<SocketAddr>,
    /// Metrics address.
    pub metrics_addr: SocketAddr,
    /// Region.
    pub region: Arc<str>,
    /// Reported load, 0.0 = idle, 1.0 = full.
    pub load: f64,
    /// Reported allocations.
    pub allocations: u64,
    /// Capacity in allocations.
    pub capacity: u64,
    /// Draining flag.
    pub draining: bool,
    /// Choices handed out since the last heartbeat.
    pub handed_out: u64,
    /// Last heartbeat or registration.
    pub last_heartbeat: Timestamp,
}

impl RelayRecord {
    /// The API view of this relay at `now` (healthy per `ttl_ms`).
    pub fn info(&self, now: Timestamp, ttl_ms: u64) -> RelayInfo {
        RelayInfo {
            relay_id: self.relay_id.to_string(),
            turn_addr: self.turn_addr,
            turn_tcp_addr: self.turn_tcp_addr,
            turn_tls_addr: self.turn_tls_addr,
            metrics_addr: self.metrics_addr,
            region: self.region.to_string(),
            load: self.load,
            allocations: self.allocations,
            capacity: self.capacity,
            draining: self.draining,
            handed_out: self.handed_out,
            healthy: self.healthy(now, ttl_ms),
            last_heartbeat_age_ms: now.millis_since(self.last_heartbeat),
        }
    }

    /// Heartbeat fresh at `now` (strictly younger than `ttl_ms`).
    pub fn healthy(&self, now: Timestamp, ttl_ms: u64) -> bool {
        now.millis_since(self.last_heartbeat) < ttl_ms
    }

    /// Reported load corrected by the allocations handed out since the last heartbeat:
    /// the larger of the reported load and allocation utilisation, plus the handed-out share.
    pub fn effective_load(&self) -> f64 {
        let cap = self.capacity.max(1) as f64;
        let utilisation = self.allocations as f64 / cap;
        self.load.max(utilisation) + self.handed_out as f64 / cap
    }

    /// No room for one more allocation.
    pub fn full(&self) -> bool {
        self.allocations.saturating_add(self.handed_out) >= self.capacity
    }

    /// Eligible for a new call at `now`.
    pub fn eligible(&self, now: Timestamp, ttl_ms: u64) -> bool {
        self.healthy(now, ttl_ms) && !self.draining && !self.full()
    }
}

/// Choose up to `req.count` distinct relays from `relays`, best first, incrementing
/// `handed_out` of each chosen one. Returns the chosen relays' indices into `relays`.
pub fn choose<R: Rng + ?Sized>(
    relays: &mut [RelayRecord],
    req: &ChooseRelaysRequest,
    now: Timestamp,
    ttl_ms: u64,
    rng: &mut R,
) -> Vec<usize> {
    let count = req.count.clamp(1, MAX_CHOOSE_COUNT) as usize;
    let tier_of = |r: &RelayRecord| -> u8 {
        if *r.region == *req.caller_region {
            0
        } else if req.callee_region.as_deref() == Some(&*r.region) {
            1
        } else {
            2
        }
    };
    let mut chosen: Vec<usize> = Vec::with_capacity(count);
    let mut pool: Vec<usize> = Vec::with_capacity(relays.len());
    while chosen.len() < count {
        let mut picked = None;
        for tier in 0..3u8 {
            pool.clear();
            pool.extend((0..relays.len()).filter(|&i| {
                !chosen.contains(&i)
                    && tier_of(&relays[i]) == tier
                    && relays[i].eligible(now, ttl_ms)
            }));
            if pool.is_empty() {
                continue;
            }
            picked = Some(power_of_two(relays, &pool, rng));
            break;
        }
        let Some(i) = picked else { break };
        relays[i].handed_out = relays[i].handed_out.saturating_add(1);
        chosen.push(i);
    }
    chosen
}

/// Power of two random choices over the non-empty `pool` of indices.
fn power_of_two<R: Rng + ?Sized>(relays: &[RelayRecord], pool: &[usize], rng: &mut R) -> usize {
    match pool {
        [only] => *only,
        _ => {
            let a = rng.random_range(0..pool.len());
            // Second sample distinct from the first.
            let mut b = rng.random_range(0..pool.len() - 1);
            if b >= a {
                b += 1;
            }
            let (ra, rb) = (pool[a], pool[b]);
            if relays[rb].effective_load() < relays[ra].effective_load() {
                rb
            } else {
                ra
            }
        }
    }
}

/// The API view of a chosen relay.
pub fn chosen_view(r: &RelayRecord) -> ChosenRelay {
    ChosenRelay {
        relay_id: r.relay_id.to_string(),
        turn_addr: r.turn_addr,
        turn_tcp_addr: r.turn_tcp_addr,
        turn_tls_addr: r.turn_tls_addr,
        region: r.region.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    const TTL: u64 = 10_000;

    fn relay(id: &str, region: &str, load: f64, at: u64) -> RelayRecord {
        RelayRecord {
            relay_id: Arc::from(id),
            turn_addr: "127.0.0.1:3478".parse().unwrap(),
            turn_tcp_addr: None,
            turn_tls_addr: None,
            metrics_addr: "127.0.0.1:9641".parse().unwrap(),
            region: Arc::from(region),
            load,
            allocations: 0,
            capacity: 10_000,
            draining: false,
            handed_out: 0,
            last_heartbeat: Timestamp(at),
        }
    }

    fn req(caller: &str, callee: Option<&str>, count: u32) -> ChooseRelaysRequest {
        ChooseRelaysRequest {
            caller_region: caller.into(),
            callee_region: callee.map(Into::into),
            count,
        }
    }

    fn ids(relays: &[RelayRecord], picked: &[usize]) -> Vec<String> {
        picked
            .iter()
            .map(|&i| relays[i].relay_id.to_string())
            .collect()
    }

    #[test]
    fn caller_region_preferred_then_callee_then_any() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let now = Timestamp(1_000);
        // The EU relay is idle, the US ones busy: region still wins over load.
        let mut relays = vec![
            relay("eu1", "eu", 0.0, 0),
            relay("us1", "us", 0.9, 0),
            relay("ap1", "ap", 0.5, 0),
        ];
        for _ in 0..20 {
            let p = choose(&mut relays, &req("us", None, 1), now, TTL, &mut rng);
            assert_eq!(ids(&relays, &p), ["us1"]);
        }
        let p = choose(&mut relays, &req("us", Some("ap"), 3), now, TTL, &mut rng);
        assert_eq!(
            ids(&relays, &p),
            ["us1", "ap1", "eu1"],
            "caller, callee, then any"
        );
        let p = choose(&mut relays, &req("sa", None, 1), now, TTL, &mut rng);
        assert_eq!(
            p.len(),
            1,
            "no relay in the caller's region: any region serves"
        );
    }

    #[test]
    fn draining_unhealthy_and_full_relays_are_excluded() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let now = Timestamp(20_000);
        let mut draining = relay("a-draining", "eu", 0.0, now.0);
        draining.draining = true;
        let stale = relay("b-stale", "eu", 0.0, now.0 - TTL); // exactly TTL old: dead
        let mut full = relay("c-full", "eu", 0.0, now.0);
        full.allocations = full.capacity;
        let ok = relay("d-ok", "eu", 0.99, now.0 - TTL + 1);
        let mut relays = vec![draining, stale, full, ok];
        for _ in 0..50 {
            let p = choose(&mut relays, &req("eu", None, 4), now, TTL, &mut rng);
            assert_eq!(ids(&relays, &p), ["d-ok"]);
        }
        relays.truncate(3);
        assert!(choose(&mut relays, &req("eu", None, 1), now, TTL, &mut rng).is_empty());
    }

    #[test]
    fn handed_out_makes_a_relay_full() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut r = relay("only", "eu", 0.0, 0);
        r.capacity = 3;
        let mut relays = vec![r];
        let now = Timestamp(1);
        for _ in 0..3 {
            assert_eq!(
                choose(&mut relays, &req("eu", None, 1), now, TTL, &mut rng).len(),
                1
            );
        }
        assert!(choose(&mut relays, &req("eu", None, 1), now, TTL, &mut rng).is_empty());
        assert_eq!(relays[0].handed_out, 3);
    }

    fn burst(seed: u64, n: usize) -> [u64; 4] {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut relays: Vec<_> = (0..4)
            .map(|i| relay(&format!("r{i}"), "eu", 0.25, 0))
            .collect();
        let mut counts = [0u64; 4];
        for _ in 0..n {
            for i in choose(
                &mut relays,
                &req("eu", None, 1),
                Timestamp(5),
                TTL,
                &mut rng,
            ) {
                counts[i] += 1;
            }
        }
        counts
    }

    /// What "always pick the least loaded by the last heartbeat" would do with the same burst.
    fn least_loaded_stale(relays: &[RelayRecord], n: usize) -> Vec<u64> {
        let mut counts = vec![0u64; relays.len()];
        for _ in 0..n {
            let best = (0..relays.len())
                .min_by(|&a, &b| relays[a].load.total_cmp(&relays[b].load))
                .unwrap();
            counts[best] += 1;
        }
        counts
    }

    #[test]
    fn power_of_two_spreads_a_burst_over_equal_relays() {
        // Power of two choices with the handed-out correction keeps the gap between the most
        // and least chosen relay at O(log log n): a handful, whatever the seed. 1,000 calls
        // over 4 relays: each gets 250 +- a few. Checked over 200 seeds, so the bound is not
        // an accident of one seed; the fixed seed 42 is the headline case.
        let c = burst(42, 1_000);
        assert_eq!(c.iter().sum::<u64>(), 1_000);
        assert!(c.iter().all(|&x| (240..=260).contains(&x)), "{c:?}");
        for seed in 0..200 {
            let c = burst(seed, 1_000);
            let (min, max) = (c.iter().min().unwrap(), c.iter().max().unwrap());
            assert!(max - min <= 12, "seed {seed}: {c:?}");
        }
        let relays: Vec<_> = (0..4)
            .map(|i| relay(&format!("r{i}"), "eu", 0.25, 0))
            .collect();
        let stale = least_loaded_stale(&relays, 1_000);
        assert_eq!(
            *stale.iter().max().unwrap(),
            1_000,
            "the baseline piles everything on one"
        );
    }

    #[test]
    fn correction_evens_out_unequal_reported_loads() {
        // A reports 10 % load, B 20 %, capacity 100 each. A burst of 100 calls between two
        // heartbeats should equalise effective load (about 55 / 45), not send all to A.
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let mut a = relay("a", "eu", 0.1, 0);
        let mut b = relay("b", "eu", 0.2, 0);
        a.capacity = 100;
        b.capacity = 100;
        let mut relays = vec![a, b];
        for _ in 0..100 {
            choose(
                &mut relays,
                &req("eu", None, 1),
                Timestamp(1),
                TTL,
                &mut rng,
            );
        }
        assert_eq!(relays[0].handed_out + relays[1].handed_out, 100);
        assert!(
            (54..=56).contains(&relays[0].handed_out),
            "{}",
            relays[0].handed_out
        );
        assert_eq!(least_loaded_stale(&relays, 100), [100, 0]);
    }

    #[test]
    fn count_gives_distinct_relays_and_is_capped() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let mut relays: Vec<_> = (0..12)
            .map(|i| relay(&format!("r{i}"), "eu", 0.0, 0))
            .collect();
        let p = choose(
            &mut relays,
            &req("eu", None, 100),
            Timestamp(1),
            TTL,
            &mut rng,
        );
        assert_eq!(p.len(), MAX_CHOOSE_COUNT as usize);
        let mut d = p.clone();
        d.sort_unstable();
        d.dedup();
        assert_eq!(d.len(), p.len());
    }
}
