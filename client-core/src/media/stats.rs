//! Per-call statistics, RFC 3550 interarrival jitter and the E-model (ITU-T G.107) estimate.

use std::time::Duration;

/// Counters and measurements of one call, from one endpoint's point of view.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CallStats {
    /// Media packets sent.
    pub packets_sent: u64,
    /// Media payload bytes sent (Opus bytes, before encryption).
    pub bytes_sent: u64,
    /// Frames not sent because the encoder was in DTX.
    pub dtx_frames_not_sent: u64,
    /// Media packets received and authenticated.
    pub packets_received: u64,
    /// Packets expected minus received, from sequence numbers (RFC 3550 A.3).
    pub packets_lost: i64,
    /// Frames recovered from the next packet's in-band FEC.
    pub recovered_fec: u64,
    /// Frames synthesised by PLC because their packet was missing (loss or lateness).
    pub concealed: u64,
    /// Frames filled during the peer's DTX (not a loss).
    pub dtx_filled: u64,
    /// Concealment frames inserted to grow the jitter buffer.
    pub stretched: u64,
    /// Frames decoded and discarded to shrink the jitter buffer.
    pub shrunk: u64,
    /// Packets that arrived after their playout time.
    pub late: u64,
    /// Packets whose frame slot already held a packet.
    pub duplicate: u64,
    /// Packets too far ahead of playout, dropped.
    pub too_early: u64,
    /// Packets whose authentication tag failed (wrong key, tampering, garbage).
    pub decrypt_failed: u64,
    /// Packets dropped by the replay window: already received (replay or network duplicate)
    /// or older than the window.
    pub replayed: u64,
    /// Datagrams that were not RTP, too short, or of an unknown payload type or stream.
    pub malformed: u64,
    /// Opus decode errors (the frame was concealed instead).
    pub decode_errors: u64,
    /// Frames handed to the application.
    pub frames_played: u64,
    /// RFC 3550 interarrival jitter of the received stream.
    pub jitter: Duration,
    /// Interarrival jitter the peer reports for our stream.
    pub remote_jitter: Option<Duration>,
    /// Cumulative loss the peer reports for our stream.
    pub remote_lost: Option<i64>,
    /// Loss fraction (0..1) of our stream in the peer's last report.
    pub remote_fraction_lost: Option<f64>,
    /// Opus packet-loss hint currently in use (%).
    pub loss_hint_pct: i32,
    /// Round-trip time from the report exchange (latest sample).
    pub rtt: Option<Duration>,
    /// Current jitter-buffer delay (playout offset above the fastest recent packet).
    pub playout_delay: Duration,
    /// Current jitter-buffer target.
    pub target_delay: Duration,
    /// From session start to the first frame played from a received packet.
    pub time_to_first_media: Option<Duration>,
    /// Estimated one-way mouth-to-ear delay used by the E-model.
    pub mouth_to_ear: Duration,
    /// Residual loss after FEC (concealed / slots), percent, used by the E-model.
    pub effective_loss_pct: f64,
    /// E-model transmission rating R.
    pub r_factor: f64,
    /// MOS-CQE from R (G.107 Annex B).
    pub mos: f64,
}

/// RFC 3550 §6.4.1 / Appendix A.8 interarrival jitter, in timestamp units.
#[derive(Debug, Clone, Default)]
pub struct JitterEstimator {
    last: Option<(f64, u32)>,
    jitter: f64,
}

impl JitterEstimator {
    /// Feeds one packet: its arrival time in timestamp units and its RTP timestamp
    /// (wrap-around safe: only differences of timestamps are used).
    pub fn update(&mut self, arrival_units: f64, rtp_timestamp: u32) {
        if let Some((last_arrival, last_ts)) = self.last {
            let ts_delta = f64::from(rtp_timestamp.wrapping_sub(last_ts) as i32);
            let d = ((arrival_units - last_arrival) - ts_delta).abs();
            self.jitter += (d - self.jitter) / 16.0;
        }
        self.last = Some((arrival_units, rtp_timestamp));
    }

    /// Current estimate in timestamp units.
    pub fn jitter_units(&self) -> f64 {
        self.jitter
    }
}

/// Simplified E-model (ITU-T G.107): `R = (Ro - Is) - Id - Ie,eff` (A = 0).
///
/// Constants and sources:
/// * `ro_minus_is = 93.2`: the rating G.107 gives with every parameter at its default
///   (Ro ≈ 94.8 minus Is ≈ 1.4 and the small default delay/echo terms) — the best a
///   narrowband connection can score.
/// * `Id`: only the absolute-delay term Idd of G.107 (06/2015) eq. 7-28 with the default
///   mT = 100 ms, sT = 1: `Idd = 25 * ((1 + X^6)^(1/6) - 3 (1 + (X/3)^6)^(1/6) + 2)`,
///   `X = log2(Ta / 100)` for Ta > 100 ms, else 0. Echo terms (Idte, Idle) are taken as
///   zero: we assume echo is controlled end to end.
/// * `Ie,eff = Ie + (95 - Ie) * Ppl / (Ppl / BurstR + Bpl)` (G.107 eq. 7-29).
///   Opus is not tabulated in G.113 Appendix I, so these are our stated assumptions:
///   `Ie = 0` (narrowband-transparent at >= 24 kbit/s, same as G.711's tabulated Ie = 0),
///   `Bpl = 25.1` (G.113 Appendix I planning value for G.711 with its Appendix I PLC under
///   random loss — a conservative stand-in for Opus PLC) and `BurstR = 1` (random loss).
///   `Ppl` is the residual loss after FEC (frames concealed because their packet was lost or
///   late), so FEC-recovered frames count as delivered.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EModel {
    /// Basic signal-to-noise minus simultaneous impairments (93.2).
    pub ro_minus_is: f64,
    /// Codec equipment impairment Ie (0 for Opus at 32 kbit/s, our assumption).
    pub ie: f64,
    /// Packet-loss robustness factor Bpl (25.1).
    pub bpl: f64,
    /// Burst ratio (1 = random loss).
    pub burst_r: f64,
}

impl Default for EModel {
    fn default() -> Self {
        Self {
            ro_minus_is: 93.2,
            ie: 0.0,
            bpl: 25.1,
            burst_r: 1.0,
        }
    }
}

impl EModel {
    /// Delay impairment Idd for a one-way mouth-to-ear delay.
    pub fn id(&self, one_way: Duration) -> f64 {
        let ta = one_way.as_secs_f64() * 1000.0;
        if ta <= 100.0 {
            return 0.0;
        }
        let x = (ta / 100.0).log2();
        25.0 * ((1.0 + x.powi(6)).powf(1.0 / 6.0) - 3.0 * (1.0 + (x / 3.0).powi(6)).powf(1.0 / 6.0)
            + 2.0)
    }

    /// Effective equipment impairment for a residual loss `ppl_pct` (percent).
    pub fn ie_eff(&self, ppl_pct: f64) -> f64 {
        let ppl = ppl_pct.max(0.0);
        self.ie + (95.0 - self.ie) * ppl / (ppl / self.burst_r + self.bpl)
    }

    /// Transmission rating R.
    pub fn r(&self, one_way: Duration, ppl_pct: f64) -> f64 {
        self.ro_minus_is - self.id(one_way) - self.ie_eff(ppl_pct)
    }

    /// MOS-CQE from R (G.107 Annex B, eq. B-4).
    pub fn mos(r: f64) -> f64 {
        if r <= 0.0 {
            1.0
        } else if r >= 100.0 {
            4.5
        } else {
            1.0 + 0.035 * r + r * (r - 60.0) * (100.0 - r) * 7e-6
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emodel_reference_points() {
        let e = EModel::default();
        assert!((e.r(Duration::from_millis(50), 0.0) - 93.2).abs() < 1e-9);
        assert!((EModel::mos(93.2) - 4.41).abs() < 0.01);
        // Idd by eq. 7-28: ≈ 3.0 at 200 ms, ≈ 24.1 at 400 ms.
        let id200 = e.id(Duration::from_millis(200));
        let id400 = e.id(Duration::from_millis(400));
        assert!((2.8..3.3).contains(&id200), "{id200}");
        assert!((23.5..24.6).contains(&id400), "{id400}");
        // 2 % random loss with Bpl 25.1: Ie,eff = 95*2/27.1 ≈ 7.0.
        assert!((e.ie_eff(2.0) - 7.01).abs() < 0.05);
        assert!(EModel::mos(50.0) < EModel::mos(80.0));
    }

    #[test]
    fn rfc3550_jitter_converges_to_mean_abs_difference() {
        let mut j = JitterEstimator::default();
        // Timestamps start just below the 32-bit wrap.
        let ts0 = u32::MAX - 960 * 500;
        for i in 0..2000u32 {
            // transit alternates by 160 units => |D| = 160 every packet
            let extra = if i % 2 == 0 { 0.0 } else { 160.0 };
            j.update(f64::from(i) * 960.0 + extra, ts0.wrapping_add(i * 960));
        }
        assert!((j.jitter_units() - 160.0).abs() < 1.0);
    }
}
