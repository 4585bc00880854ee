//! Loss classification: a loss-based controller that does not take random loss for congestion.
//!
//! Cubic (like every loss-based controller) shrinks its window on every loss; at 1 % random
//! loss it keeps about a quarter of a 20 Mbit/s, 20 ms link. quinn 0.11's BBR ignores loss but
//! overshoots a one-BDP bottleneck queue: it sends ~2x the file's bytes, half of them dropped
//! at the queue (`benches/transfer_goodput.rs`). [`LossJudge`] decides, for a loss-based
//! controller wrapped by [`super::pacing::ShapedFactory`], whether a loss is passed on as
//! congestion; it is, only when the path shows it:
//!
//! * the recent RTT (the minimum of the last [`RECENT_SAMPLES`] samples, so one delayed ACK
//!   does not count) is above the path's minimum by [`QUEUE_FRACTION`] of it (at least
//!   [`MIN_QUEUE_DELAY`]): a queue has built, so the loss is likely its overflow (a half-full
//!   queue of one BDP, the bench's bottleneck, is already past it); or
//! * more than [`LOSS_CEILING`] of the recent bytes were lost: whatever the RTT says, the path
//!   drops too much (a policer, a shallow buffer), and backing off is the safe answer; or
//! * the loss is persistent congestion (quinn's own verdict).
//!
//! Otherwise the loss is random (radio, a lossy hop) and the window stays. With a queue at the
//! bottleneck the window still converges: it grows until the queue delay passes the threshold,
//! and from then on the next loss, random or not, backs it off.

use std::collections::VecDeque;
use std::time::Duration;

/// RTT samples whose minimum is the "recent" RTT.
pub const RECENT_SAMPLES: usize = 8;
/// Queueing delay, as a fraction of the minimum RTT, above which a loss counts as congestion.
pub const QUEUE_FRACTION: f64 = 0.5;
/// Floor of that queueing delay (timer and ACK jitter on very short paths).
pub const MIN_QUEUE_DELAY: Duration = Duration::from_millis(2);
/// Share of recent bytes lost above which every loss counts as congestion.
pub const LOSS_CEILING: f64 = 0.10;
/// Bytes (acked + lost) after which the loss counters are halved: "recent" is the last few
/// hundred KB.
const LOSS_WINDOW_BYTES: f64 = 512.0 * 1024.0;

/// The loss classification, sans-IO.
#[derive(Debug, Clone, Default)]
pub struct LossJudge {
    min_rtt: Option<Duration>,
    recent: VecDeque<Duration>,
    acked: f64,
    lost: f64,
    /// Losses passed on as congestion.
    pub congestive: u64,
    /// Losses kept from the controller as random.
    pub ignored: u64,
}

impl LossJudge {
    /// `bytes` acknowledged, with an RTT sample.
    pub fn on_ack(&mut self, bytes: u64, rtt: Duration) {
        if !rtt.is_zero() {
            self.min_rtt = Some(self.min_rtt.map_or(rtt, |m| m.min(rtt)));
            if self.recent.len() == RECENT_SAMPLES {
                self.recent.pop_front();
            }
            self.recent.push_back(rtt);
        }
        self.acked += bytes as f64;
        self.decay();
    }

    /// `bytes` declared lost: is it congestion?
    pub fn on_loss(&mut self, bytes: u64, persistent: bool) -> bool {
        self.lost += bytes as f64;
        self.decay();
        let congestion = persistent || self.loss_share() > LOSS_CEILING || self.queue_built();
        if congestion {
            self.congestive += 1;
        } else {
            self.ignored += 1;
        }
        congestion
    }

    /// Share of recent bytes lost.
    pub fn loss_share(&self) -> f64 {
        let total = self.acked + self.lost;
        if total <= 0.0 { 0.0 } else { self.lost / total }
    }

    /// Whether the recent RTT shows a queue (no RTT yet: assume so, stay conservative).
    pub fn queue_built(&self) -> bool {
        let (Some(min), Some(recent)) = (self.min_rtt, self.recent.iter().min()) else {
            return true;
        };
        let allowed = min.mul_f64(QUEUE_FRACTION).max(MIN_QUEUE_DELAY);
        *recent > min + allowed
    }

    fn decay(&mut self) {
        if self.acked + self.lost > LOSS_WINDOW_BYTES {
            self.acked /= 2.0;
            self.lost /= 2.0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    /// `n` ACKs of one 1200-byte datagram each, every one with an RTT sample of `rtt_ms`.
    fn acks(j: &mut LossJudge, n: usize, rtt_ms: u64) {
        for _ in 0..n {
            j.on_ack(1200, ms(rtt_ms));
        }
    }

    #[test]
    fn random_loss_on_an_empty_queue_is_ignored() {
        let mut j = LossJudge::default();
        acks(&mut j, 100, 20);
        assert!(!j.on_loss(1200, false), "1 % loss at the base RTT");
        assert_eq!((j.congestive, j.ignored), (0, 1));
        // One late ACK (delayed ACK) does not make a queue.
        j.on_ack(1200, ms(45));
        assert!(!j.on_loss(1200, false));
    }

    #[test]
    fn loss_with_a_built_queue_is_congestion() {
        let mut j = LossJudge::default();
        acks(&mut j, 200, 20);
        // 12 ms of queue on a 20 ms path: above half of it.
        acks(&mut j, RECENT_SAMPLES, 32);
        assert!(j.on_loss(1200, false));
        // Just under the threshold (20 + 10 ms): not yet.
        acks(&mut j, RECENT_SAMPLES, 29);
        assert!(!j.on_loss(1200, false));
    }

    #[test]
    fn heavy_loss_or_persistent_congestion_backs_off_whatever_the_rtt() {
        let mut j = LossJudge::default();
        acks(&mut j, 90, 20);
        for _ in 0..13 {
            j.on_loss(1200, false);
        }
        // ~13 % of recent bytes lost: a policer, not radio noise.
        assert!(j.loss_share() > LOSS_CEILING);
        assert!(j.on_loss(1200, false));
        let mut k = LossJudge::default();
        k.on_ack(1200, ms(20));
        assert!(k.on_loss(1200, true), "persistent congestion");
        // Before any RTT sample a loss counts (nothing says it is random).
        assert!(LossJudge::default().on_loss(1200, false));
    }

    #[test]
    fn the_loss_share_forgets_old_bytes() {
        let mut j = LossJudge::default();
        j.on_ack(12_000, ms(20));
        for _ in 0..3 {
            j.on_loss(1200, false);
        }
        let early = j.loss_share();
        acks(&mut j, 2000, 20);
        assert!(
            j.loss_share() < early / 10.0,
            "{} vs {early}",
            j.loss_share()
        );
    }
}
