//! Congestion-control helpers around quinn's controllers, all applied by one wrapper,
//! [`ShapedFactory`]: loss classification ([`super::loss_tolerant::LossJudge`], on with the
//! default controller), a window cap from the measured delivery rate ([`DeliveryMeter`], on by
//! default) and optional pacing at the controller's own rate ([`PacingRate`] + [`Pacer`], off by
//! default).
//!
//! quinn 0.11 paces every controller by `cwnd / srtt`; for BBR, whose window is a gain above
//! the bandwidth-delay product, that lets bursts overflow shallow bottleneck queues. BBR does
//! compute a pacing rate (bandwidth estimate x pacing gain); the wrapper can publish that rate
//! into a [`PacingRate`], and the path socket holds datagrams back (`WouldBlock` + timer) so
//! they leave at that rate ([`Pacer`], sans-IO).

use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics};
use quinn_proto::RttEstimator;

use super::loss_tolerant::LossJudge;

/// Burst allowed above the rate: this long at the current rate, at least [`MIN_BURST_BYTES`].
pub const BURST_TIME: Duration = Duration::from_millis(2);
/// Minimum burst in bytes (two full datagrams).
pub const MIN_BURST_BYTES: f64 = 2400.0;

/// The latest pacing rate in bytes per second (0 = not paced), shared controller -> socket.
#[derive(Debug, Clone, Default)]
pub struct PacingRate(Arc<AtomicU64>);

impl PacingRate {
    /// Current rate in bytes/s (0 = unpaced).
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Sets the rate in bytes/s.
    pub fn set(&self, bytes_per_sec: u64) {
        self.0.store(bytes_per_sec, Ordering::Relaxed);
    }
}

/// Token-bucket pacer (sans-IO): may a datagram of `len` bytes leave at `now`?
#[derive(Debug)]
pub struct Pacer {
    tokens: f64,
    last: Option<Instant>,
}

impl Default for Pacer {
    fn default() -> Self {
        Self::new()
    }
}

impl Pacer {
    /// A pacer with a full burst allowance.
    pub fn new() -> Self {
        Self {
            tokens: MIN_BURST_BYTES,
            last: None,
        }
    }

    /// `Ok` and consumes tokens if the datagram may leave now, else the instant it may.
    pub fn check(&mut self, now: Instant, len: usize, rate: u64) -> Result<(), Instant> {
        if rate == 0 {
            return Ok(());
        }
        let rate_f = rate as f64;
        let burst = (rate_f * BURST_TIME.as_secs_f64()).max(MIN_BURST_BYTES);
        let elapsed = self
            .last
            .map_or(Duration::ZERO, |l| now.saturating_duration_since(l));
        self.last = Some(now);
        self.tokens = (self.tokens + elapsed.as_secs_f64() * rate_f).min(burst);
        let need = len as f64;
        if self.tokens >= need {
            self.tokens -= need;
            Ok(())
        } else {
            Err(now + Duration::from_secs_f64((need - self.tokens) / rate_f))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacer_spaces_datagrams_at_the_rate() {
        let t0 = Instant::now();
        let mut p = Pacer::new();
        let rate = 1_200_000; // 1200 bytes per ms
        assert!(p.check(t0, 1200, rate).is_ok());
        assert!(p.check(t0, 1200, rate).is_ok(), "burst of two");
        let ready = p.check(t0, 1200, rate).expect_err("paced");
        assert_eq!(ready, t0 + Duration::from_millis(1));
        assert!(p.check(ready, 1200, rate).is_ok());
        assert!(
            p.check(t0 + Duration::from_secs(5), 1, 0).is_ok(),
            "rate 0 = unpaced"
        );
    }
}

/// Window gain over the measured bandwidth-delay product of [`Shaping::delivery_cap`].
pub const CAP_GAIN: f64 = 1.5;
/// How long a delivery-rate sample counts towards the maximum.
const CAP_RATE_WINDOW: Duration = Duration::from_secs(2);

/// Delivery-rate meter (sans-IO): cumulative acked bytes sampled over >= 1 min-RTT intervals.
#[derive(Debug, Clone, Default)]
pub struct DeliveryMeter {
    acked: u64,
    interval_start: Option<(Instant, u64)>,
    samples: std::collections::VecDeque<(Instant, f64)>,
    min_rtt: Option<Duration>,
}

impl DeliveryMeter {
    /// Records `bytes` newly acknowledged at `now`, with the path's current min RTT.
    pub fn on_ack(&mut self, now: Instant, bytes: u64, min_rtt: Duration) {
        self.acked += bytes;
        if !min_rtt.is_zero() {
            self.min_rtt = Some(min_rtt);
        }
        let span = self
            .min_rtt
            .unwrap_or(Duration::from_millis(10))
            .max(Duration::from_millis(5));
        match self.interval_start {
            None => self.interval_start = Some((now, self.acked - bytes)),
            Some((t0, a0)) => {
                let dt = now.saturating_duration_since(t0);
                if dt >= span {
                    let rate = (self.acked - a0) as f64 / dt.as_secs_f64();
                    self.samples.push_back((now, rate));
                    self.interval_start = Some((now, self.acked));
                }
            }
        }
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > CAP_RATE_WINDOW)
        {
            self.samples.pop_front();
        }
    }

    /// The cap in bytes, once a rate and an RTT are known.
    pub fn cap(&self) -> Option<u64> {
        let rtt = self.min_rtt?;
        let rate = self
            .samples
            .iter()
            .map(|s| s.1)
            .fold(None, |m: Option<f64>, r| Some(m.map_or(r, |m| m.max(r))))?;
        Some((rate * rtt.as_secs_f64() * CAP_GAIN) as u64)
    }
}

/// What [`ShapedFactory`] adds around a controller; each part is optional.
#[derive(Debug, Clone, Default)]
pub struct Shaping {
    /// Pass a loss on as congestion only when the path shows it
    /// ([`super::loss_tolerant::LossJudge`]).
    pub loss_judge: bool,
    /// Cap the window at [`CAP_GAIN`] x (max delivery rate measured from ACKs over ~1 RTT
    /// intervals) x min RTT ([`DeliveryMeter`]): guards against a runaway bandwidth estimate
    /// (quinn 0.11's BBR grows its window far above the path's BDP on a rate-limited link).
    pub delivery_cap: bool,
    /// Publish the controller's own pacing rate here after every ACK batch and loss.
    pub publish_rate: Option<PacingRate>,
}

/// Builds controllers from `inner` with the [`Shaping`] parts around them.
pub struct ShapedFactory {
    inner: Arc<dyn ControllerFactory + Send + Sync>,
    shaping: Shaping,
}

impl ShapedFactory {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn ControllerFactory + Send + Sync>, shaping: Shaping) -> Self {
        Self { inner, shaping }
    }
}

impl ControllerFactory for ShapedFactory {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(Shaped {
            inner: self.inner.clone().build(now, current_mtu),
            judge: self.shaping.loss_judge.then(LossJudge::default),
            meter: self.shaping.delivery_cap.then(DeliveryMeter::default),
            rate: self.shaping.publish_rate.clone(),
        })
    }
}

struct Shaped {
    inner: Box<dyn Controller>,
    judge: Option<LossJudge>,
    meter: Option<DeliveryMeter>,
    rate: Option<PacingRate>,
}

impl Shaped {
    fn publish(&self) {
        if let Some(rate) = &self.rate {
            rate.set(self.inner.metrics().pacing_rate.unwrap_or(0) / 8);
        }
    }
}

impl Controller for Shaped {
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
        if let Some(j) = &mut self.judge {
            j.on_ack(bytes, now.saturating_duration_since(sent));
        }
        if let Some(m) = &mut self.meter {
            m.on_ack(now, bytes, rtt.min());
        }
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
        self.publish();
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        let congestion = self
            .judge
            .as_mut()
            .is_none_or(|j| j.on_loss(lost_bytes, is_persistent_congestion));
        if congestion {
            self.inner
                .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes);
        }
        self.publish();
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.inner.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        let w = self.inner.window();
        match self.meter.as_ref().and_then(DeliveryMeter::cap) {
            Some(cap) => w.min(cap.max(self.inner.initial_window())),
            None => w,
        }
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut m = self.inner.metrics();
        m.congestion_window = self.window();
        m
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(Self {
            inner: self.inner.clone_box(),
            judge: self.judge.clone(),
            meter: self.meter.clone(),
            // A clone is an inspection copy; it must not steer the live socket's pacer.
            rate: None,
        })
    }

    fn initial_window(&self) -> u64 {
        self.inner.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self.inner.into_any()
    }
}
