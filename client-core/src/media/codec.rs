//! Opus (libopus via the `opus` crate): 48 kHz mono, 20 ms frames, VOIP application,
//! in-band FEC with a packet-loss hint, optional DTX.

use thiserror::Error;

/// Sample rate of the whole pipeline.
pub const SAMPLE_RATE: u32 = 48_000;
/// Samples per 20 ms frame at 48 kHz mono.
pub const FRAME_SAMPLES: usize = 960;
/// Largest Opus packet we produce (RFC 6716 caps a frame at 1275 bytes).
const MAX_PACKET: usize = 1275;

/// Codec failure.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CodecError {
    /// libopus returned an error.
    #[error("opus: {0}")]
    Opus(String),
    /// The PCM frame does not hold exactly [`FRAME_SAMPLES`] samples.
    #[error("PCM frame must be {FRAME_SAMPLES} samples, got {0}")]
    FrameSize(usize),
}

impl From<opus::Error> for CodecError {
    fn from(e: opus::Error) -> Self {
        CodecError::Opus(e.to_string())
    }
}

/// Encoder settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpusConfig {
    /// Target bitrate in bits/s (default 32 000).
    pub bitrate_bps: i32,
    /// In-band FEC (LBRR) on (default true). Only emitted when the loss hint is > 0.
    pub inband_fec: bool,
    /// Discontinuous transmission (default false).
    pub dtx: bool,
    /// Encoder complexity 0..=10 (default 10, libopus' own default).
    pub complexity: i32,
    /// Loss hint (%) used until the peer's reports give a measurement (default 0).
    pub initial_loss_hint_pct: i32,
}

impl Default for OpusConfig {
    fn default() -> Self {
        Self {
            bitrate_bps: 32_000,
            inband_fec: true,
            dtx: false,
            complexity: 10,
            initial_loss_hint_pct: 0,
        }
    }
}

/// Opus encoder for the pipeline's fixed format.
pub struct OpusEncoder {
    enc: opus::Encoder,
    loss_hint: i32,
    dtx: bool,
}

impl OpusEncoder {
    /// Creates and configures the encoder.
    pub fn new(config: &OpusConfig) -> Result<Self, CodecError> {
        let mut enc =
            opus::Encoder::new(SAMPLE_RATE, opus::Channels::Mono, opus::Application::Voip)?;
        enc.set_bitrate(opus::Bitrate::Bits(config.bitrate_bps))?;
        enc.set_inband_fec(config.inband_fec)?;
        enc.set_dtx(config.dtx)?;
        enc.set_complexity(config.complexity)?;
        let hint = config.initial_loss_hint_pct.clamp(0, 100);
        enc.set_packet_loss_perc(hint)?;
        Ok(Self {
            enc,
            loss_hint: hint,
            dtx: config.dtx,
        })
    }

    /// Encodes one 20 ms frame. With DTX, a packet of 2 bytes or less means "nothing to send".
    pub fn encode(&mut self, pcm: &[i16]) -> Result<Vec<u8>, CodecError> {
        if pcm.len() != FRAME_SAMPLES {
            return Err(CodecError::FrameSize(pcm.len()));
        }
        let mut out = vec![0u8; MAX_PACKET];
        let n = self.enc.encode(pcm, &mut out)?;
        out.truncate(n);
        Ok(out)
    }

    /// Whether DTX is enabled.
    pub fn dtx(&self) -> bool {
        self.dtx
    }

    /// Current packet-loss hint (%).
    pub fn loss_hint(&self) -> i32 {
        self.loss_hint
    }

    /// Sets the expected packet loss (%) that sizes the in-band FEC.
    pub fn set_loss_hint(&mut self, pct: i32) -> Result<(), CodecError> {
        let pct = pct.clamp(0, 100);
        if pct != self.loss_hint {
            self.enc.set_packet_loss_perc(pct)?;
            self.loss_hint = pct;
        }
        Ok(())
    }

    /// Encoder lookahead in samples (algorithmic delay beyond the frame).
    pub fn lookahead(&mut self) -> Result<usize, CodecError> {
        Ok(usize::try_from(self.enc.get_lookahead()?).unwrap_or(0))
    }
}

/// Opus decoder: normal decode, FEC decode and packet-loss concealment.
pub struct OpusDecoder {
    dec: opus::Decoder,
}

impl OpusDecoder {
    /// Creates a 48 kHz mono decoder.
    pub fn new() -> Result<Self, CodecError> {
        Ok(Self {
            dec: opus::Decoder::new(SAMPLE_RATE, opus::Channels::Mono)?,
        })
    }

    fn run(&mut self, input: &[u8], fec: bool) -> Result<Vec<i16>, CodecError> {
        let mut out = vec![0i16; FRAME_SAMPLES];
        let n = self.dec.decode(input, &mut out, fec)?;
        // Anything other than one 20 ms frame is padded/truncated to keep the output clock.
        out.truncate(n.min(FRAME_SAMPLES));
        out.resize(FRAME_SAMPLES, 0);
        Ok(out)
    }

    /// Decodes a received packet into one frame.
    pub fn decode(&mut self, packet: &[u8]) -> Result<Vec<i16>, CodecError> {
        if packet.is_empty() {
            return self.conceal();
        }
        self.run(packet, false)
    }

    /// Recovers the frame *before* `next_packet` from its in-band FEC (PLC if it carries none).
    pub fn decode_fec(&mut self, next_packet: &[u8]) -> Result<Vec<i16>, CodecError> {
        self.run(next_packet, true)
    }

    /// Packet-loss concealment: synthesises one frame from the decoder state.
    pub fn conceal(&mut self) -> Result<Vec<i16>, CodecError> {
        self.run(&[], false)
    }

    /// Whether `packet` carries in-band FEC (LBRR) data for the previous frame.
    pub fn has_fec(packet: &[u8]) -> bool {
        packet_has_lbrr(packet)
    }
}

/// Checks the LBRR flag of the first SILK frame of an Opus packet (RFC 6716 §4.2.3).
/// CELT-only packets never carry FEC. Returns false for anything unparseable.
pub fn packet_has_lbrr(packet: &[u8]) -> bool {
    let Some(&toc) = packet.first() else {
        return false;
    };
    let config = toc >> 3;
    // configs 0..=11 SILK-only, 12..=15 hybrid, 16..=31 CELT-only.
    if config >= 16 {
        return false;
    }
    let code = toc & 0x3;
    let frame_start = match code {
        0 | 1 => 1,
        2 => {
            // one- or two-byte length of the first frame follows
            match packet.get(1) {
                Some(&b) if b < 252 => 2,
                Some(_) => 3,
                None => return false,
            }
        }
        _ => {
            // code 3: frame count byte, optional padding bytes (not parsed precisely: the LBRR
            // flag sits in the first bits of the first frame, after the padding-length bytes).
            let Some(&fc) = packet.get(1) else {
                return false;
            };
            let mut i = 2;
            if fc & 0x40 != 0 {
                while let Some(&p) = packet.get(i) {
                    i += 1;
                    if p != 255 {
                        break;
                    }
                }
            }
            i
        }
    };
    // The first range-coded symbols are VAD flags then the LBRR flag; for a single 20 ms mono
    // SILK frame these are the two most significant bits of the first byte (each coded with
    // probability 1/2, which the range coder emits as plain bits at the start of a stream).
    packet.get(frame_start).is_some_and(|b| b & 0x40 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(n: usize, f: f32) -> Vec<i16> {
        (0..n)
            .map(|i| ((i as f32 * f * std::f32::consts::TAU / 48_000.0).sin() * 8000.0) as i16)
            .collect()
    }

    #[test]
    fn encode_decode_frame() {
        let mut enc = OpusEncoder::new(&OpusConfig::default()).unwrap();
        let mut dec = OpusDecoder::new().unwrap();
        let pcm = tone(FRAME_SAMPLES * 10, 300.0);
        let mut total = 0usize;
        for f in pcm.chunks(FRAME_SAMPLES) {
            let p = enc.encode(f).unwrap();
            assert!(!p.is_empty() && p.len() < 400);
            total += p.len();
            let out = dec.decode(&p).unwrap();
            assert_eq!(out.len(), FRAME_SAMPLES);
        }
        // ~32 kbps -> ~80 bytes per frame on average (VBR).
        assert!(total / 10 > 20 && total / 10 < 200, "avg {}", total / 10);
        assert_eq!(enc.encode(&pcm[..10]), Err(CodecError::FrameSize(10)));
        assert_eq!(dec.conceal().unwrap().len(), FRAME_SAMPLES);
        assert!(enc.lookahead().unwrap() > 0);
    }

    #[test]
    fn generated_signal_is_coded_as_speech() {
        // In the VOIP application Opus codes speech with SILK (alone or in hybrid mode);
        // CELT-only packets (TOC config >= 16) would mean it took the signal for music/noise.
        let input = crate::media::audio::speech_like(5.0, 1);
        let mut enc = OpusEncoder::new(&OpusConfig::default()).unwrap();
        let celt_only = input
            .chunks_exact(FRAME_SAMPLES)
            .map(|f| enc.encode(f).unwrap())
            .filter(|p| p[0] >> 3 >= 16)
            .count();
        assert!(celt_only < 5, "{celt_only} of 250 packets CELT-only");
    }

    #[test]
    fn decoder_rejects_garbage_without_panicking() {
        let mut dec = OpusDecoder::new().unwrap();
        for g in [&[0xffu8; 3][..], &[0x03, 0xff], &[0x0b; 1300]] {
            let _ = dec.decode(g);
            let _ = dec.decode_fec(g);
        }
    }
}
