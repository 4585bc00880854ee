//! Deterministic in-process network emulator (sans-IO) for tests and simulations.
//!
//! One [`NetSim`] models one direction of a path: every datagram handed to
//! [`NetSim::push`] is either lost (independent random loss and/or a Gilbert-Elliott two-state
//! burst model), or scheduled for delivery after a base delay plus jitter, optionally delayed
//! further to force reordering, and optionally duplicated. [`NetSim::poll`] hands out the
//! datagrams whose delivery time has come; [`NetSim::poll_timeout`] says when the next one is due.
//!
//! All randomness comes from a seeded ChaCha RNG and time is an input, so a scenario replays
//! byte-for-byte for a given seed. It is generic over the payload type (any `Clone`, normally
//! `Vec<u8>`) so the media pipeline and the connectivity agent can both use it.
//!
//! It is not a bandwidth/queueing model: there is no link rate, no queue overflow and no
//! congestion; packets never wait for each other.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Gilbert-Elliott two-state loss model parameters (per packet transitions).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GilbertElliott {
    /// Probability of moving Good -> Bad before a packet.
    pub p_good_to_bad: f64,
    /// Probability of moving Bad -> Good before a packet.
    pub p_bad_to_good: f64,
    /// Loss probability while in the Good state.
    pub loss_in_good: f64,
    /// Loss probability while in the Bad state.
    pub loss_in_bad: f64,
}

impl GilbertElliott {
    /// Mean loss rate in steady state.
    pub fn mean_loss(&self) -> f64 {
        let denom = self.p_good_to_bad + self.p_bad_to_good;
        if denom <= 0.0 {
            return self.loss_in_good;
        }
        let pi_bad = self.p_good_to_bad / denom;
        pi_bad * self.loss_in_bad + (1.0 - pi_bad) * self.loss_in_good
    }
}

/// Configuration of one emulated path direction. `Default` is a perfect 0 ms wire.
#[derive(Debug, Clone, PartialEq)]
pub struct NetSimConfig {
    /// RNG seed; the same seed and inputs give the same outputs.
    pub seed: u64,
    /// Fixed one-way delay added to every packet.
    pub delay: Duration,
    /// Maximum extra delay; each packet draws uniformly from `0..=jitter` (may reorder).
    pub jitter: Duration,
    /// Independent random loss probability, 0.0..=1.0.
    pub loss: f64,
    /// Optional bursty loss model, applied in addition to `loss`.
    pub burst_loss: Option<GilbertElliott>,
    /// Probability that a packet is held back by `reorder_delay` extra (forced reordering).
    pub reorder: f64,
    /// Extra delay of a held-back packet.
    pub reorder_delay: Duration,
    /// Probability that a delivered packet is delivered twice.
    pub duplicate: f64,
    /// Extra delay of the duplicate copy relative to the original.
    pub duplicate_delay: Duration,
}

impl Default for NetSimConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            burst_loss: None,
            reorder: 0.0,
            reorder_delay: Duration::from_millis(30),
            duplicate: 0.0,
            duplicate_delay: Duration::from_millis(1),
        }
    }
}

/// Counters kept by the emulator.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetSimStats {
    /// Packets pushed.
    pub pushed: u64,
    /// Packets dropped by the random loss model.
    pub lost_random: u64,
    /// Packets dropped by the Gilbert-Elliott model.
    pub lost_burst: u64,
    /// Packets held back for forced reordering.
    pub reordered: u64,
    /// Extra copies created.
    pub duplicated: u64,
    /// Packets handed out by `poll` (copies included).
    pub delivered: u64,
}

struct Scheduled<T> {
    at: Instant,
    order: u64,
    payload: T,
}

impl<T> PartialEq for Scheduled<T> {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at && self.order == other.order
    }
}
impl<T> Eq for Scheduled<T> {}
impl<T> PartialOrd for Scheduled<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Scheduled<T> {
    fn cmp(&self, other: &Self) -> Ordering {
        // Reversed: BinaryHeap is a max-heap, we want the earliest first.
        other.at.cmp(&self.at).then(other.order.cmp(&self.order))
    }
}

/// One direction of an emulated network path (sans-IO queue).
pub struct NetSim<T = Vec<u8>> {
    config: NetSimConfig,
    rng: ChaCha8Rng,
    queue: BinaryHeap<Scheduled<T>>,
    order: u64,
    ge_bad: bool,
    stats: NetSimStats,
}

impl<T: Clone> NetSim<T> {
    /// Creates an emulator with the given configuration.
    pub fn new(config: NetSimConfig) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(config.seed),
            config,
            queue: BinaryHeap::new(),
            order: 0,
            ge_bad: false,
            stats: NetSimStats::default(),
        }
    }

    /// Current configuration.
    pub fn config(&self) -> &NetSimConfig {
        &self.config
    }

    /// Changes the path characteristics from now on (packets in flight keep their schedule).
    /// The RNG stream continues; the seed field is ignored.
    pub fn set_config(&mut self, config: NetSimConfig) {
        self.config = config;
    }

    /// Counters so far.
    pub fn stats(&self) -> NetSimStats {
        self.stats
    }

    /// Number of packets in flight.
    pub fn in_flight(&self) -> usize {
        self.queue.len()
    }

    /// Sends one packet into the path at time `now`.
    pub fn push(&mut self, now: Instant, payload: T) {
        self.stats.pushed += 1;
        // Draw every random number for every packet, in a fixed order, so that changing one
        // probability does not shift the random stream of the others.
        let r_loss: f64 = self.rng.random();
        let r_ge_trans: f64 = self.rng.random();
        let r_ge_loss: f64 = self.rng.random();
        let r_jitter: f64 = self.rng.random();
        let r_reorder: f64 = self.rng.random();
        let r_dup: f64 = self.rng.random();

        let mut burst_lost = false;
        if let Some(ge) = self.config.burst_loss {
            if self.ge_bad {
                if r_ge_trans < ge.p_bad_to_good {
                    self.ge_bad = false;
                }
            } else if r_ge_trans < ge.p_good_to_bad {
                self.ge_bad = true;
            }
            let p = if self.ge_bad {
                ge.loss_in_bad
            } else {
                ge.loss_in_good
            };
            burst_lost = r_ge_loss < p;
        }
        if r_loss < self.config.loss {
            self.stats.lost_random += 1;
            return;
        }
        if burst_lost {
            self.stats.lost_burst += 1;
            return;
        }
        let jitter = self.config.jitter.mul_f64(r_jitter);
        let mut at = now + self.config.delay + jitter;
        if r_reorder < self.config.reorder {
            self.stats.reordered += 1;
            at += self.config.reorder_delay;
        }
        if r_dup < self.config.duplicate {
            self.stats.duplicated += 1;
            self.schedule(at + self.config.duplicate_delay, payload.clone());
        }
        self.schedule(at, payload);
    }

    fn schedule(&mut self, at: Instant, payload: T) {
        self.order += 1;
        self.queue.push(Scheduled {
            at,
            order: self.order,
            payload,
        });
    }

    /// Returns the next packet due at or before `now`, if any.
    pub fn poll(&mut self, now: Instant) -> Option<T> {
        if self.queue.peek().is_some_and(|s| s.at <= now) {
            let s = self.queue.pop()?;
            self.stats.delivered += 1;
            Some(s.payload)
        } else {
            None
        }
    }

    /// When the next packet becomes due, if any is in flight.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.queue.peek().map(|s| s.at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(config: NetSimConfig, n: u32) -> (Vec<(u32, Duration)>, NetSimStats) {
        let t0 = Instant::now();
        let mut sim = NetSim::new(config);
        let mut out = Vec::new();
        for i in 0..n {
            let now = t0 + Duration::from_millis(u64::from(i) * 20);
            sim.push(now, i);
            while let Some(p) = sim.poll(now) {
                out.push((p, now - t0));
            }
        }
        let mut now = t0 + Duration::from_millis(u64::from(n) * 20);
        while let Some(at) = sim.poll_timeout() {
            now = now.max(at);
            while let Some(p) = sim.poll(now) {
                out.push((p, now - t0));
            }
        }
        (out, sim.stats())
    }

    #[test]
    fn perfect_wire_delivers_in_order_with_delay() {
        let cfg = NetSimConfig {
            delay: Duration::from_millis(40),
            ..Default::default()
        };
        let (out, st) = run(cfg, 100);
        assert_eq!(out.len(), 100);
        for (i, (p, _)) in out.iter().enumerate() {
            assert_eq!(*p as usize, i);
        }
        assert_eq!(st.delivered, 100);
    }

    #[test]
    fn same_seed_same_outcome_and_loss_rate_close() {
        let cfg = NetSimConfig {
            seed: 7,
            loss: 0.1,
            jitter: Duration::from_millis(30),
            ..Default::default()
        };
        let (a, sa) = run(cfg.clone(), 5000);
        let (b, _) = run(cfg, 5000);
        assert_eq!(a, b);
        let rate = sa.lost_random as f64 / 5000.0;
        assert!((0.08..0.12).contains(&rate), "loss rate {rate}");
    }

    #[test]
    fn jitter_reorders_and_duplicates_are_counted() {
        let cfg = NetSimConfig {
            seed: 3,
            jitter: Duration::from_millis(60),
            duplicate: 0.05,
            ..Default::default()
        };
        let (out, st) = run(cfg, 2000);
        let inversions = out.windows(2).filter(|w| w[1].0 < w[0].0).count();
        assert!(inversions > 50, "expected reordering, got {inversions}");
        assert_eq!(out.len() as u64, 2000 + st.duplicated);
        assert!(st.duplicated > 50);
    }

    #[test]
    fn gilbert_elliott_losses_are_bursty() {
        let ge = GilbertElliott {
            p_good_to_bad: 0.02,
            p_bad_to_good: 0.3,
            loss_in_good: 0.0,
            loss_in_bad: 0.8,
        };
        let cfg = NetSimConfig {
            seed: 11,
            burst_loss: Some(ge),
            ..Default::default()
        };
        let (out, st) = run(cfg, 20000);
        let rate = st.lost_burst as f64 / 20000.0;
        assert!(
            (rate - ge.mean_loss()).abs() < 0.015,
            "rate {rate} vs {}",
            ge.mean_loss()
        );
        // Consecutive-loss runs: with bursts, many losses are adjacent to another loss.
        let got: std::collections::HashSet<u32> = out.iter().map(|(p, _)| *p).collect();
        let lost: Vec<u32> = (0..20000).filter(|i| !got.contains(i)).collect();
        let adjacent = lost.windows(2).filter(|w| w[1] == w[0] + 1).count();
        assert!(
            adjacent as f64 > 0.4 * lost.len() as f64,
            "adjacent {adjacent} of {}",
            lost.len()
        );
    }
}
