//! Adaptive jitter buffer (sans-IO, codec-agnostic).
//!
//! Packets are keyed by their frame slot (RTP timestamp / 960). For every packet the buffer
//! records its *relative delay* `d = arrival - media_time` (both relative to the first packet).
//! A packet is on time iff `d <= D`, where `D` is the playout offset: frame `k` plays at
//! `epoch + k * 20 ms + D`. The target is
//!
//! `D* = min(d) + clamp(quantile_q(d - min(d)) + margin + fec_slack, min_delay, max_delay)`
//!
//! over a sliding window of recent packets; `fec_slack` is one frame so that packet N+1 is
//! usually present when N is due and its in-band FEC can stand in for a lost N.
//!
//! Adaptation happens in whole frames at playout ticks: when `D* > D` the buffer *stretches*
//! (emits one concealment frame without consuming a slot, `D += 20 ms`) — at the next quiet
//! frame, or at once if the shortfall exceeds the margin, because being too short means late
//! losses; when `D - D* >= shrink_threshold` it *shrinks* (decodes and
//! discards one frame, `D -= 20 ms`), immediately if the last output frame was quiet (a pause or
//! talkspurt boundary) and otherwise at most once per `shrink_interval`, so it comes back down
//! gently.
//!
//! Head-of-line stalls (media over TCP, e.g. a TURN allocation on a stream): a lost segment
//! holds back every packet behind it until its retransmission, and then they arrive in one
//! burst, the first with the stall's whole delay and the rest less and less. A burst is not a
//! loss: the packets are buffered (or counted late) like any other, and nothing restarts. But
//! the quantile alone would cover only part of the next stall (a stall of `n` frames is `n`
//! samples, a few percent of the window, with delays falling from its peak), so a burst of at
//! least [`BURST_MIN`] packets arriving within [`BURST_GAP`] holds its first packet's delay
//! in the target for [`STALL_HOLD`]: the next stall of that size is covered in full.
//!
//! Each tick yields what to play for one slot: the packet, the next packet's FEC, or a
//! concealment frame (loss, DTX gap or stretch). The caller owns the decoder.
//! Not handled: clock drift between sender and receiver, SSRC/timestamp restarts.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use super::codec::FRAME_SAMPLES;

/// Jitter buffer settings.
#[derive(Debug, Clone, PartialEq)]
pub struct JitterConfig {
    /// Frame duration (20 ms).
    pub frame: Duration,
    /// Smallest buffering target (default 20 ms).
    pub min_delay: Duration,
    /// Largest buffering target (default 400 ms).
    pub max_delay: Duration,
    /// Buffering before the first frame plays (default 40 ms).
    pub initial_delay: Duration,
    /// Added to the delay quantile (default 10 ms).
    pub margin: Duration,
    /// Quantile of recent relative delays to cover (default 0.98).
    pub quantile: f64,
    /// Number of recent packets in the delay window (default 250 = 5 s).
    pub window: usize,
    /// Add one frame to the target so the next packet's FEC is usually available (default true).
    pub fec_slack: bool,
    /// Excess over target that triggers a shrink (default 30 ms).
    pub shrink_threshold: Duration,
    /// Minimum spacing of shrinks during speech, in frames (default 50 = 1 s).
    pub shrink_interval_frames: u32,
}

impl Default for JitterConfig {
    fn default() -> Self {
        Self {
            frame: Duration::from_millis(20),
            min_delay: Duration::from_millis(20),
            max_delay: Duration::from_millis(400),
            initial_delay: Duration::from_millis(40),
            margin: Duration::from_millis(10),
            quantile: 0.98,
            window: 250,
            fec_slack: true,
            shrink_threshold: Duration::from_millis(30),
            shrink_interval_frames: 50,
        }
    }
}

/// What happened to an inserted packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertOutcome {
    /// Buffered for playout.
    Buffered,
    /// Its slot has already been played (or skipped): too late.
    Late,
    /// Its slot already holds a packet.
    Duplicate,
    /// Too far ahead of the playout point; dropped to bound memory.
    TooEarly,
}

/// Why a concealment frame is produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConcealReason {
    /// The slot's packet is missing (lost or not yet arrived) and no FEC is at hand.
    Lost,
    /// The sender was in DTX (no sequence gap): comfort/silence, not a loss.
    Dtx,
    /// Inserted to grow the buffer.
    Stretch,
}

/// What to play in one slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Playout {
    /// Decode this packet.
    Packet(Vec<u8>),
    /// The slot's packet is missing; decode the next packet's in-band FEC.
    Fec(Vec<u8>),
    /// Synthesize a frame (PLC).
    Conceal(ConcealReason),
}

/// The result of one playout tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tick {
    /// A packet to decode and discard first (shrink), to keep the decoder state continuous.
    pub discard: Option<Vec<u8>>,
    /// What to play now.
    pub play: Playout,
    /// Earlier slots reported as [`ConcealReason::Lost`] that turned out to be a DTX pause
    /// (the packet played now directly follows the previous one in sequence).
    pub dtx_reclassified: u64,
}

#[derive(Debug, Clone)]
struct Stored {
    index: u64,
    payload: Vec<u8>,
}

/// The adaptive jitter buffer.
#[derive(Debug, Clone)]
pub struct JitterBuffer {
    cfg: JitterConfig,
    epoch: Option<Instant>,
    first_ts: u64,
    ts_ref: u64,
    packets: BTreeMap<i64, Stored>,
    delays: VecDeque<f64>,
    target_offset: f64,
    offset: f64,
    next_frame: i64,
    last_played_index: Option<u64>,
    unconfirmed_gap: u64,
    frames_since_shrink: u32,
    started: bool,
    /// Arrival of the last packet, and the current burst: its length and first delay.
    last_arrival: Option<Instant>,
    burst_len: u32,
    burst_first_delay: f64,
    /// The delay of the last released stall, held in the target until the instant.
    stall: Option<(f64, Instant)>,
}

/// Bound on how far ahead of the playout point a packet may be buffered, in frames.
const MAX_AHEAD_FRAMES: i64 = 500;
/// Packets arriving this close after one another belong to one burst.
pub const BURST_GAP: Duration = Duration::from_millis(2);
/// Packets in one burst that make it a released stall (at 20 ms pacing, three packets at once
/// means at least 40 ms held back: path jitter alone rarely does that).
pub const BURST_MIN: u32 = 3;
/// How long a stall's delay stays in the target after its burst (stalls on a lossy TCP path
/// come every few seconds; after this long without one the buffer comes back down).
pub const STALL_HOLD: Duration = Duration::from_secs(10);

impl JitterBuffer {
    /// New, empty buffer.
    pub fn new(cfg: JitterConfig) -> Self {
        let initial = cfg.initial_delay.as_secs_f64();
        Self {
            cfg,
            epoch: None,
            first_ts: 0,
            ts_ref: 0,
            packets: BTreeMap::new(),
            delays: VecDeque::new(),
            target_offset: initial,
            offset: initial,
            next_frame: 0,
            last_played_index: None,
            unconfirmed_gap: 0,
            frames_since_shrink: 0,
            started: false,
            last_arrival: None,
            burst_len: 0,
            burst_first_delay: 0.0,
            stall: None,
        }
    }

    fn frame_secs(&self) -> f64 {
        self.cfg.frame.as_secs_f64()
    }

    fn unwrap_ts(&mut self, ts: u32) -> u64 {
        let diff = i64::from(ts.wrapping_sub(self.ts_ref as u32) as i32);
        let ext = (self.ts_ref as i64 + diff).max(0) as u64;
        if ext > self.ts_ref {
            self.ts_ref = ext;
        }
        ext
    }

    /// Adds a decrypted packet: `index` is its extended sequence number, `timestamp` its RTP
    /// timestamp (48 kHz).
    pub fn insert(
        &mut self,
        now: Instant,
        index: u64,
        timestamp: u32,
        payload: Vec<u8>,
    ) -> InsertOutcome {
        let epoch = match self.epoch {
            Some(e) => e,
            None => {
                // Start the extended timestamp far from zero so early reordering cannot underflow.
                self.ts_ref = (1 << 40) + u64::from(timestamp);
                self.first_ts = self.ts_ref;
                self.epoch = Some(now);
                now
            }
        };
        let ext = self.unwrap_ts(timestamp);
        let rel_samples = ext as i64 - self.first_ts as i64;
        let frame = rel_samples.div_euclid(FRAME_SAMPLES as i64);
        let media_time = rel_samples as f64 / 48_000.0;
        let d = now.saturating_duration_since(epoch).as_secs_f64() - media_time;
        self.delays.push_back(d);
        while self.delays.len() > self.cfg.window.max(1) {
            self.delays.pop_front();
        }
        self.note_burst(now, d);
        self.update_target();
        if frame < self.next_frame {
            if self.started {
                return InsertOutcome::Late;
            }
            // Reordered before playout began: start earlier, same offset (it may play at once).
            self.next_frame = frame;
        }
        if frame > self.next_frame + MAX_AHEAD_FRAMES {
            return InsertOutcome::TooEarly;
        }
        if self.packets.contains_key(&frame) {
            return InsertOutcome::Duplicate;
        }
        self.packets.insert(frame, Stored { index, payload });
        InsertOutcome::Buffered
    }

    /// Tracks bursts of arrivals; a long one is a released stall whose delay is held.
    fn note_burst(&mut self, now: Instant, d: f64) {
        let in_burst = self
            .last_arrival
            .is_some_and(|t| now.saturating_duration_since(t) <= BURST_GAP);
        self.last_arrival = Some(now);
        if in_burst {
            self.burst_len = self.burst_len.saturating_add(1);
        } else {
            self.burst_len = 1;
            self.burst_first_delay = d;
        }
        if self.burst_len == BURST_MIN {
            let peak = match self.stall {
                Some((p, until)) if until > now => p.max(self.burst_first_delay),
                _ => self.burst_first_delay,
            };
            self.stall = Some((peak, now + STALL_HOLD));
        }
        if self.stall.is_some_and(|(_, until)| until <= now) {
            self.stall = None;
        }
    }

    fn update_target(&mut self) {
        if self.delays.is_empty() {
            return;
        }
        let min = self.delays.iter().copied().fold(f64::INFINITY, f64::min);
        let mut rel: Vec<f64> = self.delays.iter().map(|d| d - min).collect();
        rel.sort_by(f64::total_cmp);
        let q = self.cfg.quantile.clamp(0.0, 1.0);
        let pos = ((rel.len() - 1) as f64 * q).ceil() as usize;
        let mut quant = rel[pos.min(rel.len() - 1)];
        if let Some((peak, _)) = self.stall {
            quant = quant.max(peak - min);
        }
        let slack = if self.cfg.fec_slack {
            self.frame_secs()
        } else {
            0.0
        };
        let want = (quant + self.cfg.margin.as_secs_f64() + slack).clamp(
            self.cfg.min_delay.as_secs_f64(),
            self.cfg.max_delay.as_secs_f64(),
        );
        self.target_offset = min + want;
    }

    fn play_at(&self, frame: i64) -> Option<Instant> {
        let epoch = self.epoch?;
        let secs = frame as f64 * self.frame_secs() + self.offset;
        Some(epoch + Duration::from_secs_f64(secs.max(0.0)))
    }

    /// When the next frame is due (None before the first packet).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.play_at(self.next_frame)
    }

    /// Current buffering delay: playout offset above the fastest recent packet.
    pub fn current_delay(&self) -> Duration {
        let min = self.delays.iter().copied().fold(f64::INFINITY, f64::min);
        if !min.is_finite() {
            return Duration::ZERO;
        }
        Duration::from_secs_f64((self.offset - min).max(0.0))
    }

    /// Current target buffering delay.
    pub fn target_delay(&self) -> Duration {
        let min = self.delays.iter().copied().fold(f64::INFINITY, f64::min);
        if !min.is_finite() {
            return self.cfg.initial_delay;
        }
        Duration::from_secs_f64((self.target_offset - min).max(0.0))
    }

    /// Packets waiting.
    pub fn len(&self) -> usize {
        self.packets.len()
    }

    /// Whether no packet is waiting.
    pub fn is_empty(&self) -> bool {
        self.packets.is_empty()
    }

    /// Produces the next slot's playout if it is due at `now`. `last_quiet` says whether the
    /// previous output frame was quiet, which allows an immediate shrink.
    pub fn poll(&mut self, now: Instant, last_quiet: bool) -> Option<Tick> {
        let due = self.play_at(self.next_frame)?;
        if now < due {
            return None;
        }
        self.started = true;
        let frame = self.frame_secs();
        self.frames_since_shrink = self.frames_since_shrink.saturating_add(1);
        let shortfall = self.target_offset - self.offset;
        // Grow at a pause; during speech only once the shortfall eats into the safety margin.
        if shortfall > 1e-6 && (last_quiet || shortfall > self.cfg.margin.as_secs_f64()) {
            self.offset += frame;
            return Some(Tick {
                discard: None,
                play: Playout::Conceal(ConcealReason::Stretch),
                dtx_reclassified: 0,
            });
        }
        let mut discard = None;
        let excess = self.offset - self.target_offset;
        if excess >= self.cfg.shrink_threshold.as_secs_f64() - 1e-9
            && (last_quiet || self.frames_since_shrink >= self.cfg.shrink_interval_frames)
        {
            self.frames_since_shrink = 0;
            self.offset -= frame;
            let skipped = self.packets.remove(&self.next_frame);
            if let Some(s) = &skipped {
                self.last_played_index = Some(s.index);
                self.unconfirmed_gap = 0;
            }
            discard = skipped.map(|s| s.payload);
            self.next_frame += 1;
        }
        let slot = self.next_frame;
        self.next_frame += 1;
        let mut dtx_reclassified = 0;
        let play = if let Some(s) = self.packets.remove(&slot) {
            if self.last_played_index.is_some_and(|li| s.index == li + 1) {
                dtx_reclassified = self.unconfirmed_gap;
            }
            self.unconfirmed_gap = 0;
            self.last_played_index = Some(s.index);
            Playout::Packet(s.payload)
        } else {
            let next = self
                .packets
                .range(slot + 1..)
                .next()
                .map(|(f, s)| (*f, s.index));
            let dtx = match (next, self.last_played_index) {
                (Some((_, ni)), Some(li)) => ni == li + 1,
                _ => false,
            };
            if dtx {
                Playout::Conceal(ConcealReason::Dtx)
            } else {
                match next {
                    Some((f, _)) if f == slot + 1 => {
                        let p = self.packets.get(&f).map(|s| s.payload.clone());
                        p.map_or(Playout::Conceal(ConcealReason::Lost), Playout::Fec)
                    }
                    _ => Playout::Conceal(ConcealReason::Lost),
                }
            }
        };
        if play == Playout::Conceal(ConcealReason::Lost) {
            self.unconfirmed_gap += 1;
        }
        // Drop anything that can no longer play.
        while let Some((&f, _)) = self.packets.first_key_value() {
            if f >= self.next_frame {
                break;
            }
            self.packets.pop_first();
        }
        Some(Tick {
            discard,
            play,
            dtx_reclassified,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    /// Media over TCP (a TURN allocation on a stream): a lost segment holds back everything
    /// behind it until the retransmission, then the held packets arrive in one burst. Packets
    /// go out every 20 ms and arrive 5 ms later, except that those sent during each stall
    /// arrive together with the first packet after it. Returns per packet its insert outcome
    /// and what played, slot by slot.
    fn hol_run(stalls: &[(u64, u64)], total: u64) -> (Vec<InsertOutcome>, Vec<Playout>) {
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new(JitterConfig::default());
        let arrive = |i: u64| -> u64 {
            for &(from, len) in stalls {
                if i >= from && i < from + len {
                    return 20 * (from + len) + 5;
                }
            }
            20 * i + 5
        };
        let mut order: Vec<u64> = (0..total).collect();
        order.sort_by_key(|&i| (arrive(i), i));
        let mut outcomes = vec![InsertOutcome::Buffered; total as usize];
        let mut played = Vec::new();
        let mut next = 0;
        let end = 20 * total + 1000;
        for t in 0..end {
            let now = t0 + ms(t);
            while next < order.len() && arrive(order[next]) <= t {
                let i = order[next];
                let ts = (7_000u32).wrapping_add((i as u32) * 960);
                outcomes[i as usize] = jb.insert(now, i, ts, vec![(i % 251) as u8]);
                next += 1;
            }
            while let Some(tick) = jb.poll(now, false) {
                if !matches!(tick.play, Playout::Conceal(ConcealReason::Stretch)) {
                    played.push(tick.play);
                }
            }
        }
        (outcomes, played)
    }

    #[test]
    fn a_stall_and_its_burst_do_not_reset_the_stream_and_the_buffer_grows_to_cover_it() {
        // Two 200 ms stalls (a retransmission after the minimum TCP RTO), 3 s apart.
        let stalls = [(100, 10), (250, 10)];
        let (outcomes, played) = hol_run(&stalls, 400);
        assert!(
            outcomes
                .iter()
                .all(|o| matches!(o, InsertOutcome::Buffered | InsertOutcome::Late)),
            "a burst is neither duplicate nor too early"
        );
        let late = |from: u64, len: u64| {
            (from..from + len)
                .filter(|&i| outcomes[i as usize] == InsertOutcome::Late)
                .count()
        };
        // The first stall is longer than the initial buffer: some of it plays late...
        let first = late(100, 10);
        assert!(first > 0 && first <= 10, "first stall: {first} late");
        // ...but the burst does not reset the stream: everything after it plays, in order.
        assert!(
            (110..250).all(|i| outcomes[i as usize] == InsertOutcome::Buffered),
            "packets after the burst are on time"
        );
        // The buffer has grown to cover a stall of that size: the second costs nothing.
        assert_eq!(late(250, 10), 0, "second stall covered");
        let packets: Vec<u8> = played
            .iter()
            .filter_map(|p| match p {
                Playout::Packet(v) => v.first().copied(),
                _ => None,
            })
            .collect();
        let mut sorted = packets.clone();
        sorted.dedup();
        assert_eq!(packets.len(), sorted.len(), "no packet plays twice");
        assert_eq!(
            packets.len() as u64 + first as u64,
            400,
            "every packet but the first stall's late ones plays"
        );
    }

    #[test]
    fn in_order_constant_delay_plays_every_packet_in_order() {
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new(JitterConfig::default());
        assert!(jb.poll_timeout().is_none());
        let mut played = Vec::new();
        let mut now = t0;
        let mut next_send = 0u64;
        while played.len() < 100 {
            if next_send < 120 && now >= t0 + ms(20 * next_send) {
                let ts = (1_000_000u32).wrapping_add((next_send as u32) * 960);
                assert_eq!(
                    jb.insert(now, next_send, ts, vec![next_send as u8]),
                    InsertOutcome::Buffered
                );
                next_send += 1;
            }
            while let Some(t) = jb.poll(now, false) {
                assert_eq!(t.discard, None);
                played.push(t.play);
            }
            now += ms(1);
        }
        for (i, p) in played.iter().enumerate() {
            assert_eq!(p, &Playout::Packet(vec![i as u8]));
        }
        assert_eq!(jb.current_delay(), ms(40));
    }

    #[test]
    fn missing_packet_uses_next_fec_then_conceals() {
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new(JitterConfig::default());
        jb.insert(t0, 10, 0, vec![0]);
        // slot 1 lost, slot 2 present; slots 3 and 4 lost
        jb.insert(t0 + ms(40), 12, 1920, vec![2]);
        jb.insert(t0 + ms(100), 15, 4800, vec![5]);
        let mut out = Vec::new();
        let mut now = t0;
        while out.len() < 6 {
            while let Some(t) = jb.poll(now, false) {
                out.push(t.play);
            }
            now += ms(1);
        }
        assert_eq!(out[0], Playout::Packet(vec![0]));
        assert_eq!(out[1], Playout::Fec(vec![2]));
        assert_eq!(out[2], Playout::Packet(vec![2]));
        assert_eq!(out[3], Playout::Conceal(ConcealReason::Lost));
        assert_eq!(out[4], Playout::Fec(vec![5]));
        assert_eq!(out[5], Playout::Packet(vec![5]));
    }

    #[test]
    fn packet_reordered_before_playout_start_is_played() {
        let t0 = Instant::now();
        let cfg = JitterConfig {
            fec_slack: false,
            ..Default::default()
        };
        let mut jb = JitterBuffer::new(cfg);
        assert_eq!(jb.insert(t0, 6, 960, vec![1]), InsertOutcome::Buffered);
        assert_eq!(
            jb.insert(t0 + ms(5), 5, 0, vec![0]),
            InsertOutcome::Buffered
        );
        let mut out = Vec::new();
        let mut now = t0;
        while out.len() < 2 {
            while let Some(t) = jb.poll(now, false) {
                out.push((t.play, now - t0));
            }
            now += ms(1);
        }
        assert_eq!(out[0], (Playout::Packet(vec![0]), ms(20)));
        assert_eq!(out[1].0, Playout::Packet(vec![1]));
        assert_eq!(out[1].1, ms(40), "frame 1 keeps its schedule");
    }

    #[test]
    fn dtx_gap_is_not_a_loss_and_late_packets_are_reported() {
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new(JitterConfig::default());
        jb.insert(t0, 1, 0, vec![0]);
        // sender in DTX for slots 1..4: next packet has the next sequence number
        jb.insert(t0 + ms(80), 2, 4 * 960, vec![4]);
        let mut out = Vec::new();
        let mut now = t0;
        while out.len() < 5 {
            while let Some(t) = jb.poll(now, false) {
                out.push(t.play);
            }
            now += ms(1);
        }
        assert_eq!(out[1], Playout::Conceal(ConcealReason::Dtx));
        assert_eq!(out[4], Playout::Packet(vec![4]));
        assert_eq!(jb.insert(now, 3, 960, vec![1]), InsertOutcome::Late);
        assert_eq!(
            jb.insert(now, 9, 960 * 100_000, vec![1]),
            InsertOutcome::TooEarly
        );
    }
}
