//! Audio in and out: WAV files (48 kHz mono, 16-bit or 32-bit float) and a deterministic,
//! speech-like test signal.
//!
//! The generator is a small source-filter speech synthesiser: a Rosenberg glottal pulse train
//! with a phrase pitch contour (declination, syllable accents, jitter) drives a cascade of four
//! formant resonators that glide between vowel targets; syllables may start with an unvoiced
//! fricative (band-passed noise burst), and phrases are separated by pauses. Opus classifies it
//! as speech (voiced/unvoiced structure, 100-250 Hz pitch, formants), which is what the quality
//! tests need. It is not intelligible speech.

use std::f64::consts::PI;
use std::io::{Read, Seek, Write};
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use thiserror::Error;

use super::codec::SAMPLE_RATE;

/// WAV input/output failure.
#[derive(Debug, Error)]
pub enum AudioError {
    /// The file could not be read or written, or is not a WAV file.
    #[error("wav: {0}")]
    Wav(#[from] hound::Error),
    /// The file is valid but not in the one format the pipeline takes.
    #[error(
        "unsupported WAV format: {channels} channel(s), {sample_rate} Hz, {bits}-bit {kind}; \
         need 48000 Hz mono, 16-bit integer or 32-bit float (resample/downmix first, e.g. \
         `sox in.wav -r 48000 -c 1 -b 16 out.wav`)"
    )]
    Format {
        /// Channels found.
        channels: u16,
        /// Sample rate found.
        sample_rate: u32,
        /// Bits per sample found.
        bits: u16,
        /// "int" or "float".
        kind: &'static str,
    },
}

/// Reads a 48 kHz mono WAV (16-bit int or 32-bit float) from a reader, as 16-bit samples.
pub fn read_wav_from<R: Read>(reader: R) -> Result<Vec<i16>, AudioError> {
    let mut r = hound::WavReader::new(reader)?;
    let spec = r.spec();
    let kind = match spec.sample_format {
        hound::SampleFormat::Int => "int",
        hound::SampleFormat::Float => "float",
    };
    let ok_format = matches!(
        (spec.sample_format, spec.bits_per_sample),
        (hound::SampleFormat::Int, 16) | (hound::SampleFormat::Float, 32)
    );
    if spec.channels != 1 || spec.sample_rate != SAMPLE_RATE || !ok_format {
        return Err(AudioError::Format {
            channels: spec.channels,
            sample_rate: spec.sample_rate,
            bits: spec.bits_per_sample,
            kind,
        });
    }
    match spec.sample_format {
        hound::SampleFormat::Int => Ok(r.samples::<i16>().collect::<Result<Vec<_>, _>>()?),
        hound::SampleFormat::Float => Ok(r
            .samples::<f32>()
            .map(|s| s.map(f32_to_i16))
            .collect::<Result<Vec<_>, _>>()?),
    }
}

/// Reads a 48 kHz mono WAV file.
pub fn read_wav(path: &Path) -> Result<Vec<i16>, AudioError> {
    let f = std::fs::File::open(path).map_err(hound::Error::IoError)?;
    read_wav_from(std::io::BufReader::new(f))
}

/// Writes 48 kHz mono 16-bit samples as WAV to a writer.
pub fn write_wav_to<W: Write + Seek>(writer: W, samples: &[i16]) -> Result<(), AudioError> {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: SAMPLE_RATE,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::new(writer, spec)?;
    for &s in samples {
        w.write_sample(s)?;
    }
    w.finalize()?;
    Ok(())
}

/// Writes a 48 kHz mono 16-bit WAV file.
pub fn write_wav(path: &Path, samples: &[i16]) -> Result<(), AudioError> {
    let f = std::fs::File::create(path).map_err(hound::Error::IoError)?;
    write_wav_to(std::io::BufWriter::new(f), samples)
}

/// Float sample in -1..1 to 16-bit, clamped.
pub fn f32_to_i16(s: f32) -> i16 {
    (s * 32767.0).round().clamp(-32768.0, 32767.0) as i16
}

/// Vowel formant targets (Hz): F1..F4, roughly an adult male voice.
const VOWELS: [[f64; 4]; 6] = [
    [730.0, 1090.0, 2440.0, 3400.0], // a
    [530.0, 1840.0, 2480.0, 3500.0], // e
    [270.0, 2290.0, 3010.0, 3700.0], // i
    [570.0, 840.0, 2410.0, 3300.0],  // o
    [300.0, 870.0, 2240.0, 3300.0],  // u
    [660.0, 1720.0, 2410.0, 3450.0], // ae
];
/// Formant bandwidths (Hz).
const BANDWIDTHS: [f64; 4] = [80.0, 100.0, 140.0, 200.0];

/// Second-order resonator with unity gain at DC.
#[derive(Clone, Copy, Default)]
struct Resonator {
    a0: f64,
    b1: f64,
    b2: f64,
    y1: f64,
    y2: f64,
}

impl Resonator {
    fn set(&mut self, freq: f64, bw: f64) {
        let fs = f64::from(SAMPLE_RATE);
        let r = (-PI * bw / fs).exp();
        self.b1 = 2.0 * r * (2.0 * PI * freq / fs).cos();
        self.b2 = -r * r;
        self.a0 = 1.0 - self.b1 - self.b2;
    }
    fn run(&mut self, x: f64) -> f64 {
        let y = self.a0 * x + self.b1 * self.y1 + self.b2 * self.y2;
        self.y2 = self.y1;
        self.y1 = y;
        y
    }
}

#[derive(Clone, Copy)]
enum Segment {
    Pause,
    Fricative { center: f64 },
    Vowel { vowel: usize, accent: f64 },
}

/// Generates `seconds` of deterministic speech-like audio (48 kHz mono, 16-bit), starting and
/// ending with a short pause. Active speech sits around -20 dBFS RMS.
pub fn speech_like(seconds: f64, seed: u64) -> Vec<i16> {
    let fs = f64::from(SAMPLE_RATE);
    let total = (seconds * fs) as usize;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // Plan the segments: (segment, length in samples, phrase position 0..1)
    let mut plan: Vec<(Segment, usize, f64, f64)> = Vec::new();
    let mut planned = 0usize;
    let lead = (0.2 * fs) as usize;
    plan.push((Segment::Pause, lead, 0.0, 0.0));
    planned += lead;
    while planned < total {
        let syllables = rng.random_range(3..8);
        let mut phrase: Vec<(Segment, usize)> = Vec::new();
        for _ in 0..syllables {
            if rng.random::<f64>() < 0.45 {
                let len = (rng.random_range(0.04..0.10) * fs) as usize;
                phrase.push((
                    Segment::Fricative {
                        center: rng.random_range(3500.0..7000.0),
                    },
                    len,
                ));
            }
            let len = (rng.random_range(0.10..0.26) * fs) as usize;
            let accent = if rng.random::<f64>() < 0.3 {
                rng.random_range(1.05..1.25)
            } else {
                1.0
            };
            phrase.push((
                Segment::Vowel {
                    vowel: rng.random_range(0..VOWELS.len()),
                    accent,
                },
                len,
            ));
        }
        let phrase_len: usize = phrase.iter().map(|p| p.1).sum::<usize>().max(1);
        let mut pos = 0usize;
        for (seg, len) in phrase {
            let start = pos as f64 / phrase_len as f64;
            pos += len;
            plan.push((seg, len, start, pos as f64 / phrase_len as f64));
            planned += len;
        }
        let pause = (rng.random_range(0.15..0.6) * fs) as usize;
        plan.push((Segment::Pause, pause, 0.0, 0.0));
        planned += pause;
    }

    let f0_base = rng.random_range(105.0..135.0);
    let mut out = Vec::with_capacity(total);
    let mut formants = [Resonator::default(); 4];
    let mut fric = [Resonator::default(); 2];
    let mut cur = VOWELS[0];
    let mut phase = 0.0f64; // glottal phase in periods
    let mut period_jitter = 1.0f64;
    let mut prev = 0.0f64;
    for (seg, len, p0, p1) in plan {
        let attack = (0.025 * fs).min(len as f64 / 3.0);
        let release = (0.04 * fs).min(len as f64 / 3.0);
        for i in 0..len {
            if out.len() >= total {
                break;
            }
            let t = i as f64;
            let env = (t / attack)
                .min(1.0)
                .min((len as f64 - t) / release)
                .clamp(0.0, 1.0);
            let env = 0.5 - 0.5 * (PI * env).cos();
            let x = match seg {
                Segment::Pause => 0.0,
                Segment::Fricative { center } => {
                    if i % 48 == 0 {
                        fric[0].set(center, 1500.0);
                        fric[1].set(center * 1.3, 2000.0);
                    }
                    let n: f64 = rng.random_range(-1.0..1.0);
                    // band-pass: resonators, then a first difference removes the low end
                    let y0 = fric[0].run(n);
                    let y = fric[1].run(y0);
                    let hp = y - prev;
                    prev = y;
                    hp * 6.0 * env
                }
                Segment::Vowel { vowel, accent } => {
                    let target = VOWELS[vowel];
                    if i % 48 == 0 {
                        // glide formants toward the target with a ~40 ms time constant
                        for k in 0..4 {
                            cur[k] += (target[k] - cur[k]) * (1.0 - (-48.0 / (0.04 * fs)).exp());
                            formants[k].set(cur[k], BANDWIDTHS[k]);
                        }
                    }
                    let pos = p0 + (p1 - p0) * t / len as f64;
                    let declination = 1.15 - 0.3 * pos;
                    let bump = 1.0 + (accent - 1.0) * (PI * t / len as f64).sin();
                    let f0 = f0_base * declination * bump * period_jitter;
                    phase += f0 / fs;
                    if phase >= 1.0 {
                        phase -= 1.0;
                        period_jitter = 1.0 + rng.random_range(-0.01..0.01);
                    }
                    // Rosenberg pulse: 40 % opening, 16 % closing, then closed.
                    let g = if phase < 0.4 {
                        0.5 * (1.0 - (PI * phase / 0.4).cos())
                    } else if phase < 0.56 {
                        (PI * (phase - 0.4) / (2.0 * 0.16)).cos()
                    } else {
                        0.0
                    };
                    let aspiration: f64 = rng.random_range(-0.02..0.02);
                    let mut y = g + aspiration;
                    // cascade of formants, each with unity DC gain, then lip radiation (difference)
                    for f in formants.iter_mut() {
                        y = f.run(y);
                    }
                    let rad = y - prev;
                    prev = y;
                    rad * 40.0 * env
                }
            };
            out.push(x);
        }
    }
    out.resize(total, 0.0);
    // Normalise: active-speech RMS to -20 dBFS, then clamp.
    let active: Vec<f64> = out.iter().copied().filter(|s| s.abs() > 1e-4).collect();
    let rms = (active.iter().map(|s| s * s).sum::<f64>() / active.len().max(1) as f64).sqrt();
    let gain = if rms > 0.0 { 0.1 / rms } else { 0.0 };
    out.iter().map(|s| f32_to_i16((s * gain) as f32)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generator_is_deterministic_and_speech_like() {
        let a = speech_like(3.0, 42);
        let b = speech_like(3.0, 42);
        let c = speech_like(3.0, 43);
        assert_eq!(a.len(), 144_000);
        assert_eq!(a, b);
        assert_ne!(a, c);
        // Has pauses (silent 20 ms frames) and active frames.
        let frames: Vec<f64> = a
            .chunks(960)
            .map(|f| (f.iter().map(|&s| f64::from(s).powi(2)).sum::<f64>() / 960.0).sqrt())
            .collect();
        let silent = frames.iter().filter(|&&r| r < 30.0).count();
        let active = frames.iter().filter(|&&r| r > 1000.0).count();
        assert!(
            silent > 10 && active > 40,
            "silent {silent} active {active}"
        );
        assert!(a.iter().any(|&s| s.unsigned_abs() > 8000));
    }

    #[test]
    fn wav_round_trip_and_format_errors() {
        let pcm: Vec<i16> = (0..4800).map(|i| (i % 200) as i16 * 100).collect();
        let mut buf = std::io::Cursor::new(Vec::new());
        write_wav_to(&mut buf, &pcm).unwrap();
        buf.set_position(0);
        assert_eq!(read_wav_from(&mut buf).unwrap(), pcm);

        // float 48k mono accepted
        let mut fbuf = std::io::Cursor::new(Vec::new());
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: 48_000,
            bits_per_sample: 32,
            sample_format: hound::SampleFormat::Float,
        };
        let mut w = hound::WavWriter::new(&mut fbuf, spec).unwrap();
        for s in [0.0f32, 0.5, -1.0, 2.0] {
            w.write_sample(s).unwrap();
        }
        w.finalize().unwrap();
        fbuf.set_position(0);
        assert_eq!(
            read_wav_from(&mut fbuf).unwrap(),
            vec![0, 16384, -32767, 32767]
        );

        // stereo 44.1k rejected with a clear error
        let mut sbuf = std::io::Cursor::new(Vec::new());
        let spec = hound::WavSpec {
            channels: 2,
            sample_rate: 44_100,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let mut w = hound::WavWriter::new(&mut sbuf, spec).unwrap();
        w.write_sample(0i16).unwrap();
        w.write_sample(0i16).unwrap();
        w.finalize().unwrap();
        sbuf.set_position(0);
        let err = read_wav_from(&mut sbuf).unwrap_err();
        assert!(matches!(
            err,
            AudioError::Format {
                channels: 2,
                sample_rate: 44_100,
                ..
            }
        ));
        assert!(err.to_string().contains("need 48000 Hz mono"));
        assert!(matches!(
            read_wav_from(&b"not a wav"[..]),
            Err(AudioError::Wav(_))
        ));
    }
}
