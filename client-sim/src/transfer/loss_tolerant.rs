//! A congestion controller that does not take random loss for congestion.
//!
//! Cubic (like every loss-based controller) shrinks its window on every loss; at 1 % random
//! loss it keeps about a quarter of a 20 Mbit/s, 20 ms link. quinn 0.11's BBR ignores loss but
//! overshoots a one-BDP bottleneck queue: it sends ~2x the file's bytes, half of them dropped
//! at the queue (`benches/transfer_goodput.rs`). [`LossTolerantFactory`] wraps a loss-based
//! controller and passes a loss on as congestion only when the path shows it:
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

use std::any::Any;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics};
use quinn_proto::RttEstimator;

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

/// Wraps a controller factory (Cubic in practice) with [`LossTolerant`] loss classification.
pub struct LossTolerantFactory {
    inner: Arc<dyn ControllerFactory + Send + Sync>,
}

impl LossTolerantFactory {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn ControllerFactory + Send + Sync>) -> Self {
        Self { inner }
    }
}

impl ControllerFactory for LossTolerantFactory {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(LossTolerant {
            inner: self.inner.clone().build(now, current_mtu),
            judge: LossJudge::default(),
        })
    }
}

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

struct LossTolerant {
    inner: Box<dyn Controller>,
    judge: LossJudge,
}

impl Controller for LossTolerant {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.inner.on_sent(now, bytes, last_packet_number);
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &RttEstimator,
    ) {
        self.judge
            .on_ack(bytes, now.saturating_duration_since(sent));
        self.inner.on_ack(now, sent, bytes, app_limited, rtt);
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        self.inner
            .on_end_acks(now, in_flight, app_limited, largest_packet_num_acked);
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        if self.judge.on_loss(lost_bytes, is_persistent_congestion) {
            self.inner
                .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes);
        }
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.inner.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        self.inner.window()
    }

    fn metrics(&self) -> ControllerMetrics {
        self.inner.metrics()
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(Self {
            inner: self.inner.clone_box(),
            judge: self.judge.clone(),
        })
    }

    fn initial_window(&self) -> u64 {
        self.inner.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self.inner.into_any()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn random_loss_on_an_empty_queue_is_ignored() {
        let mut j = LossJudge::default();
        for _ in 0..100 {
            j.on_ack(1200, ms(20));
        }
        assert!(!j.on_loss(1200, false), "1 % loss at the base RTT");
        assert_eq!((j.congestive, j.ignored), (0, 1));
        // One late ACK (delayed ACK) does not make a queue.
        j.on_ack(1200, ms(45));
        assert!(!j.on_loss(1200, false));
    }

    #[test]
    fn loss_with_a_built_queue_is_congestion() {
        let mut j = LossJudge::default();
        for _ in 0..200 {
            j.on_ack(1200, ms(20));
        }
        for _ in 0..RECENT_SAMPLES {
            j.on_ack(1200, ms(32)); // 12 ms of queue on a 20 ms path: above half of it
        }
        assert!(j.on_loss(1200, false));
        // Just under the threshold (20 + 10 ms): not yet.
        for _ in 0..RECENT_SAMPLES {
            j.on_ack(1200, ms(29));
        }
        assert!(!j.on_loss(1200, false));
    }

    #[test]
    fn heavy_loss_or_persistent_congestion_backs_off_whatever_the_rtt() {
        let mut j = LossJudge::default();
        for _ in 0..90 {
            j.on_ack(1200, ms(20));
        }
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
        for _ in 0..2000 {
            j.on_ack(1200, ms(20));
        }
        assert!(
            j.loss_share() < early / 10.0,
            "{} vs {early}",
            j.loss_share()
        );
    }
}
