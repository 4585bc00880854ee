//! A deterministic two-party call harness: two [`MediaSession`]s joined by two
//! [`NetSim`] directions, driven on a virtual clock. Alice speaks `input`; Bob records what he
//! hears. Used by the tests, the benchmark and scenario code; no threads, sockets or clock reads
//! (the start `Instant` is an input).

use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{
    CallStats, FRAME, FRAME_SAMPLES, KeyExchange, MediaConfig, MediaError, MediaSession, Role,
};
use crate::netsim::{NetSim, NetSimConfig};

/// The call under simulation.
pub struct CallSim {
    /// The caller (speaks).
    pub alice: MediaSession,
    /// The callee (listens and records).
    pub bob: MediaSession,
    /// Alice -> Bob path.
    pub a2b: NetSim<Vec<u8>>,
    /// Bob -> Alice path.
    pub b2a: NetSim<Vec<u8>>,
    /// What Bob heard, frame after frame.
    pub output: Vec<i16>,
    /// Extra datagrams injected towards Bob at given times (attacks, replays, garbage).
    pub inject: Vec<(Duration, Vec<u8>)>,
    /// Copies of every datagram Alice sent, with its send time (for replay tests).
    pub sent_log: Vec<(Duration, Vec<u8>)>,
    input: Vec<i16>,
    t0: Instant,
    now: Instant,
    next_frame: usize,
}

impl CallSim {
    /// Sets up the call: key exchange (seeded), sessions and network paths, clock at `t0`.
    pub fn new(
        input: Vec<i16>,
        alice_cfg: &MediaConfig,
        bob_cfg: &MediaConfig,
        a2b: NetSimConfig,
        b2a: NetSimConfig,
        seed: u64,
        t0: Instant,
    ) -> Result<Self, MediaError> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let ka = KeyExchange::generate(&mut rng);
        let kb = KeyExchange::generate(&mut rng);
        let keys_a = ka
            .derive(&kb.public_key(), Role::Caller, b"call-sim")
            .expect("keys from a seeded RNG are valid X25519 scalars and distinct");
        let keys_b = kb
            .derive(&ka.public_key(), Role::Callee, b"call-sim")
            .expect("keys from a seeded RNG are valid X25519 scalars and distinct");
        Ok(Self {
            alice: MediaSession::new(alice_cfg, keys_a, t0, &mut rng)?,
            bob: MediaSession::new(bob_cfg, keys_b, t0, &mut rng)?,
            a2b: NetSim::new(a2b),
            b2a: NetSim::new(b2a),
            output: Vec::new(),
            inject: Vec::new(),
            sent_log: Vec::new(),
            input,
            t0,
            now: t0,
            next_frame: 0,
        })
    }

    /// Virtual time since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.t0
    }

    /// Number of 20 ms frames in the input (a partial last frame is dropped).
    pub fn input_frames(&self) -> usize {
        self.input.len() / FRAME_SAMPLES
    }

    fn slots_played(s: &CallStats) -> u64 {
        (s.frames_played + s.shrunk).saturating_sub(s.stretched)
    }

    /// Whether Bob has played a slot for every input frame.
    pub fn finished(&self) -> bool {
        Self::slots_played(&self.bob.stats()) >= self.input_frames() as u64
    }

    /// Runs the call until `until` (virtual time since start) or until Bob has played every
    /// frame, whichever is first.
    pub fn run_until(&mut self, until: Duration) -> Result<(), MediaError> {
        let end = self.t0 + until;
        // Bounded: at most a few events per millisecond of virtual time.
        let max_steps = 20 * (until.as_millis() as usize + 1000);
        for _ in 0..max_steps {
            if self.finished() {
                return Ok(());
            }
            // Process everything due at `now`.
            let send_at = self.t0 + FRAME * self.next_frame as u32;
            if self.next_frame < self.input_frames() && send_at <= self.now {
                let f = &self.input
                    [self.next_frame * FRAME_SAMPLES..(self.next_frame + 1) * FRAME_SAMPLES];
                if let Some(pkt) = self.alice.send_frame(self.now, f)? {
                    self.sent_log.push((self.elapsed(), pkt.clone()));
                    self.a2b.push(self.now, pkt);
                }
                self.next_frame += 1;
            }
            let el = self.elapsed();
            let mut i = 0;
            while i < self.inject.len() {
                if self.inject[i].0 <= el {
                    let (_, p) = self.inject.remove(i);
                    self.bob.handle_packet(self.now, &p);
                } else {
                    i += 1;
                }
            }
            while let Some(p) = self.a2b.poll(self.now) {
                self.bob.handle_packet(self.now, &p);
            }
            while let Some(p) = self.b2a.poll(self.now) {
                self.alice.handle_packet(self.now, &p);
            }
            while let Some(p) = self.alice.poll_transmit(self.now) {
                self.a2b.push(self.now, p);
            }
            while let Some(p) = self.bob.poll_transmit(self.now) {
                self.b2a.push(self.now, p);
            }
            while !self.finished() {
                match self.bob.poll_frame(self.now) {
                    Some(f) => self.output.extend_from_slice(&f),
                    None => break,
                }
            }
            // Alice plays nothing (one-way speech) but her receiver clock must not back up.
            while self.alice.poll_frame(self.now).is_some() {}
            if self.finished() || self.now >= end {
                return Ok(());
            }
            // Advance to the next event.
            let mut next = end;
            if self.next_frame < self.input_frames() {
                next = next.min(self.t0 + FRAME * self.next_frame as u32);
            }
            for t in [self.a2b.poll_timeout(), self.b2a.poll_timeout()]
                .into_iter()
                .flatten()
            {
                next = next.min(t);
            }
            next = next
                .min(self.alice.poll_timeout())
                .min(self.bob.poll_timeout());
            if let Some(t) = self.inject.iter().map(|(d, _)| self.t0 + *d).min() {
                next = next.min(t);
            }
            self.now = next.max(self.now);
        }
        Ok(())
    }

    /// Runs until Bob has played every input frame (bounded by the input length plus 10 s).
    pub fn run_to_end(&mut self) -> Result<(), MediaError> {
        let limit = FRAME * self.input_frames() as u32 + Duration::from_secs(10);
        self.run_until(limit)
    }
}

/// Encodes and decodes `input` without any network: the codec-only reference.
pub fn codec_only(input: &[i16], config: &MediaConfig) -> Result<Vec<i16>, MediaError> {
    let mut enc = super::codec::OpusEncoder::new(&config.opus)?;
    let mut dec = super::codec::OpusDecoder::new()?;
    let mut out = Vec::with_capacity(input.len());
    for f in input.chunks_exact(FRAME_SAMPLES) {
        let p = enc.encode(f)?;
        out.extend(dec.decode(&p)?);
    }
    Ok(out)
}
