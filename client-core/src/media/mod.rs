//! The media pipeline of a call (sans-IO): Opus, RTP-style framing, SRTP-like AES-GCM,
//! adaptive jitter buffer with in-band FEC and concealment, reports, statistics and quality.
//!
//! Send path: PCM frame (20 ms, 960 samples at 48 kHz mono) -> [`codec::OpusEncoder`] -> RTP
//! header -> AES-GCM ([`crypto::SrtpSender`]) -> datagram for the transport.
//! Receive path: datagram -> [`crypto::SrtpReceiver`] (replay window, authentication) ->
//! [`jitter::JitterBuffer`] -> at each playout tick: decode the packet, or the next packet's
//! in-band FEC, or conceal -> PCM frame.
//! Control: every `report_interval` each side sends an encrypted [`report::Report`] with its
//! sender counters and a receiver block about the peer's stream, which gives the RTT and the
//! loss that drives the encoder's FEC loss hint.
//!
//! Nothing here touches sockets or clocks: every call takes `now`, and [`MediaSession`]
//! says when it next needs to be polled ([`MediaSession::poll_timeout`]).
//! Not here: transport (the connectivity agent moves the bytes), resampling, echo
//! cancellation, clock-drift compensation.

pub mod audio;
pub mod call_sim;
pub mod codec;
pub mod crypto;
pub mod jitter;
pub mod quality;
pub mod report;
pub mod rtp;
pub mod stats;

use std::time::{Duration, Instant};

use thiserror::Error;

pub use codec::{CodecError, FRAME_SAMPLES, OpusConfig, SAMPLE_RATE};
pub use crypto::{DirectionKey, DropReason, KeyError, KeyExchange, MediaKeys, Role};
pub use jitter::JitterConfig;
pub use stats::{CallStats, EModel};

use codec::{OpusDecoder, OpusEncoder};
use crypto::{SrtpReceiver, SrtpSender};
use jitter::{ConcealReason, InsertOutcome, JitterBuffer, Playout};
use report::{CONTROL_PT, ReceiverInfo, Report, SenderInfo, from_q16, to_q16};
use stats::JitterEstimator;

/// Default RTP payload type for Opus (dynamic range, as commonly negotiated).
pub const OPUS_PT: u8 = 111;
/// Frame duration.
pub const FRAME: Duration = Duration::from_millis(20);
/// A frame is "quiet" below this RMS (about -45 dBFS): the jitter buffer may shrink there.
const QUIET_RMS: f64 = 184.0;

/// Media pipeline failure on the send side.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MediaError {
    /// Codec creation or encoding failed.
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// Pipeline settings.
#[derive(Debug, Clone, PartialEq)]
pub struct MediaConfig {
    /// Encoder settings (32 kbit/s, FEC on, DTX off by default).
    pub opus: OpusConfig,
    /// Jitter-buffer settings.
    pub jitter: JitterConfig,
    /// Use the next packet's in-band FEC for a missing frame (default true).
    pub use_fec: bool,
    /// RTP payload type of media (default [`OPUS_PT`]).
    pub payload_type: u8,
    /// Interval between control reports (default 1 s).
    pub report_interval: Duration,
    /// E-model constants.
    pub emodel: EModel,
}

impl Default for MediaConfig {
    fn default() -> Self {
        Self {
            opus: OpusConfig::default(),
            jitter: JitterConfig::default(),
            use_fec: true,
            payload_type: OPUS_PT,
            report_interval: Duration::from_secs(1),
            emodel: EModel::default(),
        }
    }
}

/// Send half: encoder, media stream encryption, control stream encryption, peer feedback.
pub struct MediaSender {
    enc: OpusEncoder,
    media: SrtpSender,
    control: SrtpSender,
    payload_type: u8,
    timestamp: u32,
    talkspurt_start: bool,
    epoch: Instant,
    packets_sent: u64,
    bytes_sent: u64,
    dtx_not_sent: u64,
    rtt: Option<Duration>,
    remote: Option<ReceiverInfo>,
    loss_ewma: f64,
    lookahead: usize,
}

impl MediaSender {
    /// Creates the send half. `ssrc`, `first_seq` and `first_timestamp` should be random.
    pub fn new(
        config: &MediaConfig,
        key: DirectionKey,
        ssrc: u32,
        first_seq: u16,
        first_timestamp: u32,
        now: Instant,
    ) -> Result<Self, MediaError> {
        let mut enc = OpusEncoder::new(&config.opus)?;
        let lookahead = enc.lookahead()?;
        Ok(Self {
            enc,
            media: SrtpSender::new(key.clone(), ssrc, first_seq),
            control: SrtpSender::new(key, ssrc.wrapping_add(1), first_seq ^ 0x5a5a),
            payload_type: config.payload_type,
            timestamp: first_timestamp,
            talkspurt_start: true,
            epoch: now,
            packets_sent: 0,
            bytes_sent: 0,
            dtx_not_sent: 0,
            rtt: None,
            remote: None,
            loss_ewma: f64::from(config.opus.initial_loss_hint_pct) / 100.0,
            lookahead,
        })
    }

    /// Encodes and encrypts one 20 ms frame. Returns `None` when DTX suppressed the frame.
    pub fn next_packet(
        &mut self,
        _now: Instant,
        pcm: &[i16],
    ) -> Result<Option<Vec<u8>>, MediaError> {
        let opus = self.enc.encode(pcm)?;
        let ts = self.timestamp;
        self.timestamp = self.timestamp.wrapping_add(FRAME_SAMPLES as u32);
        if self.enc.dtx() && opus.len() <= 2 {
            self.dtx_not_sent += 1;
            self.talkspurt_start = true;
            return Ok(None);
        }
        let marker = std::mem::take(&mut self.talkspurt_start);
        self.packets_sent += 1;
        self.bytes_sent += opus.len() as u64;
        Ok(Some(self.media.protect(
            marker,
            self.payload_type,
            ts,
            &opus,
        )))
    }

    /// Builds an encrypted control report carrying our sender info and `receiver` (about the
    /// peer's stream, from our [`MediaReceiver`]).
    pub fn build_report(&mut self, now: Instant, receiver: Option<ReceiverInfo>) -> Vec<u8> {
        let report = Report {
            sender: Some(SenderInfo {
                send_time: to_q16(now.saturating_duration_since(self.epoch)),
                packets_sent: self.packets_sent as u32,
                octets_sent: self.bytes_sent as u32,
            }),
            receiver,
        };
        let ts = self.timestamp;
        self.control
            .protect(false, CONTROL_PT, ts, &report.encode())
    }

    /// Applies the peer's receiver block about our stream: RTT sample and FEC loss hint.
    pub fn handle_receiver_info(
        &mut self,
        now: Instant,
        info: ReceiverInfo,
    ) -> Result<(), MediaError> {
        if info.lsr != 0 {
            let now_q = to_q16(now.saturating_duration_since(self.epoch));
            let rtt_q = now_q.wrapping_sub(info.lsr).wrapping_sub(info.dlsr);
            // Reject nonsense (clock wrap or a forged/stale LSR): more than 60 s.
            if rtt_q < (60 << 16) {
                self.rtt = Some(from_q16(rtt_q));
            }
        }
        if !info.media_received {
            return Ok(());
        }
        let frac = f64::from(info.fraction_lost) / 256.0;
        self.loss_ewma = 0.5 * self.loss_ewma + 0.5 * frac;
        // Hint = measured loss rounded up, at least 1 % once any loss was seen, capped at 25 %.
        let hint = (self.loss_ewma * 100.0).ceil().clamp(0.0, 25.0) as i32;
        self.enc.set_loss_hint(hint)?;
        self.remote = Some(info);
        Ok(())
    }

    /// Encoder lookahead (algorithmic delay beyond the frame), in samples.
    pub fn lookahead_samples(&self) -> usize {
        self.lookahead
    }

    /// Latest RTT sample.
    pub fn rtt(&self) -> Option<Duration> {
        self.rtt
    }

    fn fill_stats(&self, s: &mut CallStats) {
        s.packets_sent = self.packets_sent;
        s.bytes_sent = self.bytes_sent;
        s.dtx_frames_not_sent = self.dtx_not_sent;
        s.rtt = self.rtt;
        s.loss_hint_pct = self.enc.loss_hint();
        if let Some(r) = self.remote {
            s.remote_jitter = Some(Duration::from_secs_f64(
                f64::from(r.jitter) / f64::from(SAMPLE_RATE),
            ));
            s.remote_lost = Some(i64::from(r.cumulative_lost));
            s.remote_fraction_lost = Some(f64::from(r.fraction_lost) / 256.0);
        }
    }
}

/// What [`MediaReceiver::handle_packet`] did with a datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// A media packet was buffered (or counted late/duplicate).
    Media(InsertOutcome),
    /// A control report from the peer; its receiver block is about our stream.
    Report(Option<ReceiverInfo>),
    /// Dropped before use.
    Dropped(ReceiveDrop),
}

/// Why a datagram was dropped by the receiver.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ReceiveDrop {
    /// Rejected by the decryption layer.
    #[error(transparent)]
    Crypto(#[from] DropReason),
    /// Authenticated, but with a payload type we do not handle.
    #[error("unknown payload type {0}")]
    PayloadType(u8),
    /// Authenticated control packet that does not parse.
    #[error("bad report: {0}")]
    Report(#[from] report::ReportError),
}

/// Receive half: decryption, jitter buffer, decoder, statistics.
pub struct MediaReceiver {
    srtp: SrtpReceiver,
    dec: OpusDecoder,
    jb: JitterBuffer,
    use_fec: bool,
    payload_type: u8,
    emodel: EModel,
    created: Instant,
    epoch: Option<Instant>,
    stats: CallStats,
    media_ssrc: Option<u32>,
    base_seq: Option<u64>,
    max_seq: u64,
    expected_prior: u64,
    received_prior: u64,
    jitter: JitterEstimator,
    last_sr: Option<(u32, Instant)>,
    last_quiet: bool,
    codec_delay: Duration,
}

impl MediaReceiver {
    /// Creates the receive half with the peer's direction key.
    pub fn new(config: &MediaConfig, key: DirectionKey, now: Instant) -> Result<Self, MediaError> {
        Ok(Self {
            srtp: SrtpReceiver::new(key),
            dec: OpusDecoder::new()?,
            jb: JitterBuffer::new(config.jitter.clone()),
            use_fec: config.use_fec,
            payload_type: config.payload_type,
            emodel: config.emodel,
            created: now,
            epoch: None,
            stats: CallStats::default(),
            media_ssrc: None,
            base_seq: None,
            max_seq: 0,
            expected_prior: 0,
            received_prior: 0,
            jitter: JitterEstimator::default(),
            last_sr: None,
            last_quiet: true,
            // 20 ms packetisation + Opus lookahead (6.5 ms at 48 kHz, libopus default).
            codec_delay: FRAME + Duration::from_micros(6_500),
        })
    }

    /// Handles one datagram from the peer (media or control). Never panics.
    pub fn handle_packet(&mut self, now: Instant, datagram: &[u8]) -> Received {
        let pkt = match self.srtp.unprotect(datagram) {
            Ok(p) => p,
            Err(e) => {
                match e {
                    DropReason::AuthFailed => self.stats.decrypt_failed += 1,
                    DropReason::Replayed | DropReason::TooOld => self.stats.replayed += 1,
                    DropReason::Malformed(_) | DropReason::NoTag | DropReason::TooManyStreams => {
                        self.stats.malformed += 1
                    }
                }
                return Received::Dropped(e.into());
            }
        };
        if pkt.header.payload_type == CONTROL_PT {
            return match Report::decode(&pkt.payload) {
                Ok(r) => {
                    if let Some(s) = r.sender {
                        self.last_sr = Some((s.send_time, now));
                    }
                    Received::Report(r.receiver)
                }
                Err(e) => {
                    self.stats.malformed += 1;
                    Received::Dropped(e.into())
                }
            };
        }
        if pkt.header.payload_type != self.payload_type {
            self.stats.malformed += 1;
            return Received::Dropped(ReceiveDrop::PayloadType(pkt.header.payload_type));
        }
        // One media stream per call: a second media SSRC is not ours to play.
        match self.media_ssrc {
            None => self.media_ssrc = Some(pkt.header.ssrc),
            Some(s) if s != pkt.header.ssrc => {
                self.stats.malformed += 1;
                return Received::Dropped(ReceiveDrop::Crypto(DropReason::TooManyStreams));
            }
            Some(_) => {}
        }
        let epoch = *self.epoch.get_or_insert(now);
        self.stats.packets_received += 1;
        match self.base_seq {
            None => {
                self.base_seq = Some(pkt.index);
                self.max_seq = pkt.index;
            }
            Some(_) => self.max_seq = self.max_seq.max(pkt.index),
        }
        let arrival_units =
            now.saturating_duration_since(epoch).as_secs_f64() * f64::from(SAMPLE_RATE);
        self.jitter.update(arrival_units, pkt.header.timestamp);
        let outcome = self
            .jb
            .insert(now, pkt.index, pkt.header.timestamp, pkt.payload);
        match outcome {
            InsertOutcome::Buffered => {}
            InsertOutcome::Late => self.stats.late += 1,
            InsertOutcome::Duplicate => self.stats.duplicate += 1,
            InsertOutcome::TooEarly => self.stats.too_early += 1,
        }
        Received::Media(outcome)
    }

    /// Returns the next 20 ms PCM frame if one is due at `now`; call until `None`.
    pub fn poll_frame(&mut self, now: Instant) -> Option<Vec<i16>> {
        let tick = self.jb.poll(now, self.last_quiet)?;
        // Slots counted as concealed losses that were really the peer's DTX pause.
        let reclass = tick.dtx_reclassified.min(self.stats.concealed);
        self.stats.concealed -= reclass;
        self.stats.dtx_filled += reclass;
        if let Some(d) = tick.discard {
            self.stats.shrunk += 1;
            if self.dec.decode(&d).is_err() {
                self.stats.decode_errors += 1;
            }
        }
        let pcm = match tick.play {
            Playout::Packet(p) => {
                if self.stats.time_to_first_media.is_none() {
                    self.stats.time_to_first_media =
                        Some(now.saturating_duration_since(self.created));
                }
                self.dec.decode(&p).ok().or_else(|| {
                    self.stats.decode_errors += 1;
                    self.dec.conceal().ok()
                })
            }
            Playout::Fec(next) => {
                if self.use_fec && OpusDecoder::has_fec(&next) {
                    self.stats.recovered_fec += 1;
                    self.dec.decode_fec(&next).ok()
                } else {
                    self.stats.concealed += 1;
                    self.dec.conceal().ok()
                }
            }
            Playout::Conceal(reason) => {
                match reason {
                    ConcealReason::Lost => self.stats.concealed += 1,
                    ConcealReason::Dtx => self.stats.dtx_filled += 1,
                    ConcealReason::Stretch => self.stats.stretched += 1,
                }
                self.dec.conceal().ok()
            }
        };
        // libopus cannot fail on a correctly sized buffer; keep the clock running regardless.
        let pcm = pcm.unwrap_or_else(|| vec![0; FRAME_SAMPLES]);
        let energy: f64 = pcm.iter().map(|&s| f64::from(s) * f64::from(s)).sum();
        self.last_quiet = (energy / FRAME_SAMPLES as f64).sqrt() < QUIET_RMS;
        self.stats.frames_played += 1;
        Some(pcm)
    }

    /// When the next frame is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.jb.poll_timeout()
    }

    /// Receiver block for our next report: None before any media or report arrived. Before
    /// media arrives it still echoes the peer's sender timestamp (LSR/DLSR) so that the peer
    /// gets an RTT even on a one-way call.
    pub fn receiver_info(&mut self, now: Instant) -> Option<ReceiverInfo> {
        if self.base_seq.is_none() && self.last_sr.is_none() {
            return None;
        }
        let expected = self.base_seq.map_or(0, |base| self.max_seq - base + 1);
        let received = self.stats.packets_received;
        let exp_int = expected.saturating_sub(self.expected_prior);
        let rec_int = received.saturating_sub(self.received_prior);
        self.expected_prior = expected;
        self.received_prior = received;
        let lost_int = exp_int.saturating_sub(rec_int);
        let fraction = (lost_int << 8)
            .checked_div(exp_int)
            .map_or(0, |f| f.min(255) as u8);
        let (lsr, dlsr) = match self.last_sr {
            Some((t, at)) => (t, to_q16(now.saturating_duration_since(at))),
            None => (0, 0),
        };
        Some(ReceiverInfo {
            media_received: self.base_seq.is_some(),
            highest_ext_seq: self.max_seq as u32,
            cumulative_lost: (expected as i64 - received as i64)
                .clamp(i64::from(i32::MIN), i64::from(i32::MAX))
                as i32,
            fraction_lost: fraction,
            jitter: self.jitter.jitter_units() as u32,
            lsr,
            dlsr,
        })
    }

    /// Receive-side statistics; `rtt` (from our sender) feeds the E-model's delay.
    pub fn stats_with_rtt(&self, rtt: Option<Duration>) -> CallStats {
        let mut s = self.stats.clone();
        if let Some(base) = self.base_seq {
            s.packets_lost = (self.max_seq - base + 1) as i64 - s.packets_received as i64;
        }
        s.jitter = Duration::from_secs_f64(self.jitter.jitter_units() / f64::from(SAMPLE_RATE));
        s.playout_delay = self.jb.current_delay();
        s.target_delay = self.jb.target_delay();
        s.mouth_to_ear = rtt.map_or(Duration::ZERO, |r| r / 2) + s.playout_delay + self.codec_delay;
        let slots = s.frames_played.saturating_sub(s.stretched + s.dtx_filled);
        s.effective_loss_pct = if slots == 0 {
            0.0
        } else {
            100.0 * s.concealed as f64 / slots as f64
        };
        s.r_factor = self.emodel.r(s.mouth_to_ear, s.effective_loss_pct);
        s.mos = EModel::mos(s.r_factor);
        s
    }

    /// Receive-side statistics without an RTT.
    pub fn stats(&self) -> CallStats {
        self.stats_with_rtt(None)
    }
}

/// One endpoint's media for a call: a [`MediaSender`] and a [`MediaReceiver`] wired together
/// with the report exchange.
pub struct MediaSession {
    sender: MediaSender,
    receiver: MediaReceiver,
    next_report: Instant,
    report_interval: Duration,
}

impl MediaSession {
    /// Creates the session. Random stream parameters (SSRC, first sequence number and
    /// timestamp) come from `rng` so runs are reproducible with a seeded RNG.
    pub fn new<R: rand::RngCore + ?Sized>(
        config: &MediaConfig,
        keys: MediaKeys,
        now: Instant,
        rng: &mut R,
    ) -> Result<Self, MediaError> {
        let ssrc = rng.next_u32();
        let seq = (rng.next_u32() & 0xffff) as u16;
        let ts = rng.next_u32();
        Ok(Self {
            sender: MediaSender::new(config, keys.tx, ssrc, seq, ts, now)?,
            receiver: MediaReceiver::new(config, keys.rx, now)?,
            next_report: now + config.report_interval,
            report_interval: config.report_interval.max(Duration::from_millis(10)),
        })
    }

    /// Encodes and encrypts one outgoing frame (None when DTX suppressed it).
    pub fn send_frame(&mut self, now: Instant, pcm: &[i16]) -> Result<Option<Vec<u8>>, MediaError> {
        self.sender.next_packet(now, pcm)
    }

    /// Handles one datagram from the peer.
    pub fn handle_packet(&mut self, now: Instant, datagram: &[u8]) -> Received {
        let r = self.receiver.handle_packet(now, datagram);
        if let Received::Report(Some(info)) = r {
            // A loss-hint update cannot fail for a value in 0..=100; ignore the error path.
            let _ = self.sender.handle_receiver_info(now, info);
        }
        r
    }

    /// Next due output frame.
    pub fn poll_frame(&mut self, now: Instant) -> Option<Vec<i16>> {
        self.receiver.poll_frame(now)
    }

    /// A control report to send, when one is due.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Vec<u8>> {
        if now < self.next_report {
            return None;
        }
        while self.next_report <= now {
            self.next_report += self.report_interval;
        }
        let rr = self.receiver.receiver_info(now);
        Some(self.sender.build_report(now, rr))
    }

    /// Earliest time this session needs `poll_frame`/`poll_transmit` again.
    pub fn poll_timeout(&self) -> Instant {
        match self.receiver.poll_timeout() {
            Some(t) => t.min(self.next_report),
            None => self.next_report,
        }
    }

    /// Call statistics (both directions, E-model included).
    pub fn stats(&self) -> CallStats {
        let mut s = self.receiver.stats_with_rtt(self.sender.rtt());
        self.sender.fill_stats(&mut s);
        s
    }

    /// The send half.
    pub fn sender(&mut self) -> &mut MediaSender {
        &mut self.sender
    }

    /// The receive half.
    pub fn receiver(&mut self) -> &mut MediaReceiver {
        &mut self.receiver
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn pair() -> (MediaSession, MediaSession, Instant) {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let a = KeyExchange::generate(&mut rng);
        let b = KeyExchange::generate(&mut rng);
        let ka = a.derive(&b.public_key(), Role::Caller, b"t").unwrap();
        let kb = b.derive(&a.public_key(), Role::Callee, b"t").unwrap();
        let now = Instant::now();
        let cfg = MediaConfig::default();
        let sa = MediaSession::new(&cfg, ka, now, &mut rng).unwrap();
        let sb = MediaSession::new(&cfg, kb, now, &mut rng).unwrap();
        (sa, sb, now)
    }

    #[test]
    fn one_frame_through_and_timeouts() {
        let (mut a, mut b, now) = pair();
        assert_eq!(a.poll_timeout(), now + Duration::from_secs(1));
        let pcm = audio::speech_like(0.02, 1);
        let pkt = a.send_frame(now, &pcm).unwrap().unwrap();
        assert_eq!(
            b.handle_packet(now, &pkt),
            Received::Media(InsertOutcome::Buffered)
        );
        assert_eq!(b.poll_frame(now), None);
        let due = b.poll_timeout();
        assert_eq!(due, now + Duration::from_millis(40));
        assert_eq!(b.poll_frame(due).map(|f| f.len()), Some(FRAME_SAMPLES));
        assert_eq!(b.stats().frames_played, 1);
        assert_eq!(
            a.send_frame(now, &pcm[..100]),
            Err(MediaError::Codec(CodecError::FrameSize(100)))
        );
    }

    proptest! {
        #[test]
        fn receiver_never_panics_on_garbage(
            data in proptest::collection::vec(any::<u8>(), 0..400),
            rtp_like: bool,
        ) {
            let (_, mut b, now) = pair();
            let mut d = data;
            if rtp_like && !d.is_empty() {
                d[0] = 0x80 | (d[0] & 0x3f);
            }
            let r = b.handle_packet(now, &d);
            prop_assert!(matches!(r, Received::Dropped(_)));
            prop_assert!(b.poll_frame(now + Duration::from_secs(1)).is_none());
            let s = b.stats();
            prop_assert_eq!(s.decrypt_failed + s.malformed, 1);
        }
    }
}
