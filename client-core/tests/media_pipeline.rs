//! The media pipeline end to end under the deterministic network emulator: jitter-buffer
//! adaptation, FEC and concealment counters, attacks and garbage, reports (RTT, loss hint), DTX.
//!
//! Run: `cargo nextest run -p peerlink-client-core --test media_pipeline`

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::time::{Duration, Instant};

use peerlink_client_core::media::audio::speech_like;
use peerlink_client_core::media::call_sim::CallSim;
use peerlink_client_core::media::{KeyExchange, MediaConfig, MediaSession, OpusConfig, Role};
use peerlink_client_core::netsim::{GilbertElliott, NetSimConfig};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

fn sim(seconds: f64, cfg: &MediaConfig, a2b: NetSimConfig, b2a: NetSimConfig) -> CallSim {
    CallSim::new(
        speech_like(seconds, 2),
        cfg,
        cfg,
        a2b,
        b2a,
        7,
        Instant::now(),
    )
    .unwrap()
}

fn path(seed: u64, delay: u64) -> NetSimConfig {
    NetSimConfig {
        seed,
        delay: ms(delay),
        ..Default::default()
    }
}

#[test]
fn jitter_and_reordering_no_late_drops_after_adaptation() {
    let net = NetSimConfig {
        seed: 21,
        delay: ms(40),
        jitter: ms(60),
        reorder: 0.02,
        reorder_delay: ms(25),
        duplicate: 0.02,
        ..Default::default()
    };
    let mut s = sim(40.0, &MediaConfig::default(), net, path(22, 40));
    s.run_until(Duration::from_secs(10)).unwrap();
    let early = s.bob.stats();
    s.run_to_end().unwrap();
    let end = s.bob.stats();
    println!(
        "after 10 s: {early:?}\nend: {end:?}\nnet {:?}",
        s.a2b.stats()
    );
    assert!(s.finished());
    assert!(s.a2b.stats().reordered > 20);
    // Network duplicates hit the replay window (SRTP cannot tell them from replays).
    assert!(s.a2b.stats().duplicated > 10);
    assert_eq!(end.replayed, s.a2b.stats().duplicated);
    assert_eq!(end.packets_lost, 0);
    // Adaptation happened (stretches) and then no packet arrived too late.
    assert!(end.stretched > 0);
    assert_eq!(end.late, early.late, "late drops after adaptation");
    // A 60 ms jitter spread needs more than 60 ms of buffer; bounded by the 400 ms maximum.
    assert!(
        end.playout_delay >= ms(60) && end.playout_delay <= ms(400),
        "{:?}",
        end.playout_delay
    );
    // RFC 3550 jitter of uniform 0..60 ms transit: E|X-Y| = 20 ms.
    assert!(
        end.jitter > ms(12) && end.jitter < ms(30),
        "{:?}",
        end.jitter
    );
    assert!(
        end.concealed <= end.late,
        "only late packets may be concealed here"
    );
}

#[test]
fn playout_delay_adapts_up_with_jitter_and_back_down() {
    let calm = NetSimConfig {
        seed: 31,
        delay: ms(30),
        jitter: ms(4),
        ..Default::default()
    };
    let stormy = NetSimConfig {
        jitter: ms(120),
        ..calm.clone()
    };
    let mut s = sim(60.0, &MediaConfig::default(), calm.clone(), path(32, 30));
    s.run_until(Duration::from_secs(15)).unwrap();
    let d_calm = s.bob.stats().playout_delay;
    s.a2b.set_config(stormy);
    s.run_until(Duration::from_secs(35)).unwrap();
    let st_storm = s.bob.stats();
    s.a2b.set_config(calm);
    s.run_to_end().unwrap();
    let st_end = s.bob.stats();
    println!(
        "calm {d_calm:?} storm {:?} end {:?}",
        st_storm.playout_delay, st_end.playout_delay
    );
    println!("{st_end:?}");
    assert!(d_calm <= ms(60), "{d_calm:?}");
    assert!(
        st_storm.playout_delay >= d_calm + ms(60),
        "{:?}",
        st_storm.playout_delay
    );
    assert!(
        st_end.playout_delay + ms(50) <= st_storm.playout_delay,
        "{:?}",
        st_end.playout_delay
    );
    assert!(st_end.playout_delay <= ms(80), "{:?}", st_end.playout_delay);
    assert!(st_end.shrunk > 0 && st_end.stretched > 0);
}

fn fec_run(use_fec: bool) -> peerlink_client_core::media::CallStats {
    let cfg = MediaConfig {
        use_fec,
        opus: OpusConfig {
            inband_fec: use_fec,
            ..Default::default()
        },
        ..Default::default()
    };
    let net = NetSimConfig {
        seed: 41,
        delay: ms(30),
        loss: 0.05,
        ..Default::default()
    };
    let mut s = sim(20.0, &cfg, net, path(42, 30));
    s.run_to_end().unwrap();
    let st = s.bob.stats();
    let alice = s.alice.stats();
    println!(
        "fec={use_fec} bob {st:?}\nalice hint {} rtt {:?}",
        alice.loss_hint_pct, alice.rtt
    );
    // The loss hint follows the measured loss reported back by Bob.
    if use_fec {
        assert!(
            (2..=10).contains(&alice.loss_hint_pct),
            "hint {}",
            alice.loss_hint_pct
        );
    }
    st
}

#[test]
fn fec_recovers_isolated_losses() {
    let with = fec_run(true);
    let without = fec_run(false);
    assert_eq!(with.packets_lost, without.packets_lost);
    assert!(with.packets_lost > 20);
    assert!(with.recovered_fec > 0);
    assert_eq!(without.recovered_fec, 0);
    assert!(with.concealed < without.concealed);
    assert_eq!(without.concealed as i64, without.packets_lost);
    assert_eq!(
        (with.recovered_fec + with.concealed) as i64,
        with.packets_lost
    );
    assert!(with.effective_loss_pct < without.effective_loss_pct);
}

#[test]
fn bursty_loss_is_concealed_and_counted() {
    let ge = GilbertElliott {
        p_good_to_bad: 0.02,
        p_bad_to_good: 0.35,
        loss_in_good: 0.0,
        loss_in_bad: 0.7,
    };
    let net = NetSimConfig {
        seed: 51,
        delay: ms(30),
        burst_loss: Some(ge),
        ..Default::default()
    };
    let mut s = sim(20.0, &MediaConfig::default(), net, path(52, 30));
    s.run_to_end().unwrap();
    let st = s.bob.stats();
    assert!(s.finished());
    assert_eq!(s.output.len(), 1000 * 960);
    assert!(st.packets_lost > 10);
    assert_eq!((st.recovered_fec + st.concealed) as i64, st.packets_lost);
    // Bursts defeat single-frame FEC more often than random loss does.
    assert!(st.concealed > 0);
}

#[test]
fn attacks_and_garbage_are_dropped_counted_and_never_played() {
    let cfg = MediaConfig::default();
    let run = |attack: bool| {
        let mut s = sim(6.0, &cfg, path(61, 30), path(62, 30));
        if attack {
            // Wrong key: a third party with its own keys targets Bob's stream.
            let mut rng = ChaCha8Rng::seed_from_u64(99);
            let eve = KeyExchange::generate(&mut rng);
            let other = KeyExchange::generate(&mut rng);
            let keys = eve
                .derive(&other.public_key(), Role::Caller, b"call-sim")
                .unwrap();
            let mut eve_s = MediaSession::new(&cfg, keys, Instant::now(), &mut rng).unwrap();
            let frame = vec![1000i16; 960];
            for i in 0..40u64 {
                let p = eve_s.send_frame(Instant::now(), &frame).unwrap().unwrap();
                s.inject.push((ms(500 + 50 * i), p));
            }
            // Garbage of many shapes.
            for i in 0..40u64 {
                let len = (i * 7 % 90) as usize;
                let g: Vec<u8> = (0..len)
                    .map(|j| (j as u8).wrapping_mul(31).wrapping_add(i as u8) | 0x80)
                    .collect();
                s.inject.push((ms(510 + 50 * i), g));
            }
        }
        s.run_until(Duration::from_secs(3)).unwrap();
        let mut replayed = 0u64;
        if attack {
            // Replays: every packet Alice sent so far that has arrived already (copies of
            // packets still in flight would be first arrivals, not replays).
            let now = s.elapsed();
            let replays: Vec<Vec<u8>> = s
                .sent_log
                .iter()
                .filter(|(t, _)| *t + ms(100) <= now)
                .map(|(_, p)| p.clone())
                .collect();
            replayed = replays.len() as u64;
            for p in replays {
                s.inject.push((now, p));
            }
        }
        s.run_to_end().unwrap();
        (s.output.clone(), s.bob.stats(), replayed)
    };
    let (clean_out, clean_st, _) = run(false);
    let (out, st, replays) = run(true);
    println!("attacked {st:?}\nclean {clean_st:?}");
    // 40 wrong-key packets; garbage long enough to look like RTP fails authentication too.
    assert!(st.decrypt_failed >= 40);
    assert!(st.malformed >= 20, "garbage counted: {}", st.malformed);
    assert_eq!(st.decrypt_failed + st.malformed, 80);
    assert!(replays > 140);
    assert_eq!(
        st.replayed, replays,
        "every replayed packet is dropped and counted"
    );
    assert_eq!(st.packets_received, clean_st.packets_received);
    // Nothing of it reached the speaker: output identical to the clean run.
    assert_eq!(out, clean_out);
    assert_eq!(
        clean_st.decrypt_failed + clean_st.replayed + clean_st.malformed,
        0
    );
}

#[test]
fn reports_measure_rtt_and_time_to_first_media() {
    let mut s = sim(5.0, &MediaConfig::default(), path(71, 30), path(72, 50));
    s.run_to_end().unwrap();
    let a = s.alice.stats();
    let b = s.bob.stats();
    println!("alice {a:?}\nbob {b:?}");
    let rtt = a.rtt.expect("alice got an RTT from Bob's reports");
    assert!(rtt >= ms(79) && rtt <= ms(81), "{rtt:?}");
    let rtt_b = b.rtt.expect("bob got an RTT from Alice's reports");
    assert!(rtt_b >= ms(79) && rtt_b <= ms(81), "{rtt_b:?}");
    // First frame sent at 0, 30 ms path, 40 ms initial buffer.
    assert_eq!(b.time_to_first_media, Some(ms(70)));
    assert_eq!(a.remote_lost, Some(0));
    assert_eq!(a.packets_sent, 250);
    // Mouth-to-ear: RTT/2 + buffer + 26.5 ms codec.
    assert!(
        b.mouth_to_ear >= ms(90) && b.mouth_to_ear <= ms(120),
        "{:?}",
        b.mouth_to_ear
    );
}

#[test]
fn dtx_skips_silence_and_playout_stays_continuous() {
    let cfg = MediaConfig {
        opus: OpusConfig {
            dtx: true,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut s = sim(10.0, &cfg, path(81, 30), path(82, 30));
    s.run_to_end().unwrap();
    let a = s.alice.stats();
    let b = s.bob.stats();
    println!("alice {a:?}\nbob {b:?}");
    assert!(a.dtx_frames_not_sent > 20, "{}", a.dtx_frames_not_sent);
    assert_eq!(a.packets_sent + a.dtx_frames_not_sent, 500);
    assert!(b.dtx_filled > 0);
    assert_eq!(b.packets_lost, 0);
    assert_eq!(b.concealed, 0, "DTX gaps are not losses");
    assert_eq!(s.output.len(), 500 * 960);
}
