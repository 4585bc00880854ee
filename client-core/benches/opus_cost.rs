//! CPU cost of the media pipeline per 20 ms frame, as a share of one core.
//!
//! Measures, side by side in alternating rounds (first round discarded, median reported):
//! * A: Opus encode + decode of one frame (the codec alone, libopus);
//! * B: the whole pipeline: `MediaSender::next_packet` (encode, RTP, AES-GCM) +
//!   `MediaReceiver::handle_packet` (replay check, decrypt, jitter buffer) +
//!   `MediaReceiver::poll_frame` (decode) — no network in between.
//!
//! Time is the thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`), so other load on the shared machine
//! inflates it less than wall time would. Share of a core = CPU time per frame / 20 ms.
//! Target: codec < 1 % of a core. A complexity sweep prints cost against the quality
//! score so the default complexity is a measured choice.
//! Run: `cargo bench -p peerlink-client-core --bench opus_cost`

#![allow(clippy::unwrap_used)] // benchmark program: a failure should abort loudly

use std::hint::black_box;
use std::time::{Duration, Instant};

use peerlink_client_core::media::audio::speech_like;
use peerlink_client_core::media::codec::{OpusDecoder, OpusEncoder};
use peerlink_client_core::media::quality::compare;
use peerlink_client_core::media::{
    FRAME, FRAME_SAMPLES, KeyExchange, MediaConfig, MediaReceiver, MediaSender, OpusConfig, Role,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const ROUNDS: usize = 9;

/// CPU time consumed by the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_THREAD_CPUTIME_ID is supported on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// (encode time, decode time, frames, decoded output)
fn codec_round(input: &[i16], opus: &OpusConfig) -> (Duration, Duration, usize, Vec<i16>) {
    let mut enc = OpusEncoder::new(opus).unwrap();
    let mut dec = OpusDecoder::new().unwrap();
    let mut out = Vec::with_capacity(input.len());
    let (mut t_enc, mut t_dec, mut n) = (Duration::ZERO, Duration::ZERO, 0);
    for f in input.chunks_exact(FRAME_SAMPLES) {
        let t0 = thread_cpu();
        let p = enc.encode(black_box(f)).unwrap();
        let t1 = thread_cpu();
        let pcm = dec.decode(&p).unwrap();
        let t2 = thread_cpu();
        out.extend_from_slice(black_box(&pcm));
        t_enc += t1 - t0;
        t_dec += t2 - t1;
        n += 1;
    }
    (t_enc, t_dec, n, out)
}

fn pipeline_round(input: &[i16], cfg: &MediaConfig) -> (Duration, usize) {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let a = KeyExchange::generate(&mut rng);
    let b = KeyExchange::generate(&mut rng);
    let ka = a.derive(&b.public_key(), Role::Caller, b"bench").unwrap();
    let kb = b.derive(&a.public_key(), Role::Callee, b"bench").unwrap();
    // Virtual time: a fixed base advanced by 20 ms per frame (the pipeline never reads clocks).
    let base = Instant::now();
    let mut tx = MediaSender::new(cfg, ka.tx, 0x1234, 1, 0, base).unwrap();
    let mut rx = MediaReceiver::new(cfg, kb.rx, base).unwrap();
    let mut played = 0usize;
    let start = thread_cpu();
    for (i, f) in input.chunks_exact(FRAME_SAMPLES).enumerate() {
        let now = base + FRAME * i as u32;
        if let Some(p) = tx.next_packet(now, f).unwrap() {
            rx.handle_packet(now, &p);
        }
        while let Some(pcm) = rx.poll_frame(now) {
            black_box(pcm);
            played += 1;
        }
    }
    (thread_cpu() - start, played.max(1))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn pct(us: f64) -> f64 {
    100.0 * us / (FRAME.as_secs_f64() * 1e6)
}

fn main() {
    let input = speech_like(10.0, 1);
    let cfg = MediaConfig::default();
    let (mut enc_us, mut dec_us, mut codec_us, mut pipe_us) = (vec![], vec![], vec![], vec![]);
    for round in 0..ROUNDS {
        let (te, td, n, _) = codec_round(&input, &cfg.opus);
        let (tp, played) = pipeline_round(&input, &cfg);
        if round == 0 {
            continue; // warm-up
        }
        let e = te.as_secs_f64() * 1e6 / n as f64;
        let d = td.as_secs_f64() * 1e6 / n as f64;
        enc_us.push(e);
        dec_us.push(d);
        codec_us.push(e + d);
        pipe_us.push(tp.as_secs_f64() * 1e6 / played as f64);
    }
    let spread = |v: &[f64]| {
        let mn = v.iter().copied().fold(f64::INFINITY, f64::min);
        let mx = v.iter().copied().fold(0.0, f64::max);
        format!("{mn:.1}..{mx:.1} us")
    };
    let spreads = format!("codec {}, pipeline {}", spread(&codec_us), spread(&pipe_us));
    let (e, d) = (median(enc_us), median(dec_us));
    let (c, p) = (median(codec_us), median(pipe_us));
    println!(
        "opus_cost: 48 kHz mono, 20 ms frames, {} kbit/s, FEC on, complexity {} (default)",
        cfg.opus.bitrate_bps / 1000,
        cfg.opus.complexity
    );
    println!(
        "{} measured rounds (+1 warm-up) of 500 frames; medians of thread CPU time per frame:",
        ROUNDS - 1
    );
    println!(
        "  opus encode            {e:7.1} us = {:6.3} % of one core",
        pct(e)
    );
    println!(
        "  opus decode            {d:7.1} us = {:6.3} % of one core",
        pct(d)
    );
    println!(
        "  opus encode + decode   {c:7.1} us = {:6.3} % of one core  (target < 1 %)",
        pct(c)
    );
    println!(
        "  whole pipeline (tx+rx) {p:7.1} us = {:6.3} % of one core",
        pct(p)
    );
    println!("  pipeline / codec       {:7.3}", p / c);
    println!("  spread: {spreads}");

    println!(
        "complexity sweep (3 rounds each, median; quality = RMS log-spectral distance, lower is better):"
    );
    for complexity in [10, 8, 7, 6, 5, 4, 3, 0] {
        let opus = OpusConfig {
            complexity,
            ..cfg.opus.clone()
        };
        let mut costs = vec![];
        let mut out = vec![];
        for _ in 0..3 {
            let (te, td, n, o) = codec_round(&input, &opus);
            costs.push((te + td).as_secs_f64() * 1e6 / n as f64);
            out = o;
        }
        let c = median(costs);
        let q = compare(&input, &out, 48_000);
        println!(
            "  complexity {complexity:2}: encode+decode {c:7.1} us = {:6.3} % of one core, quality {:.3} dB",
            pct(c),
            q.score()
        );
    }
}
