//! Replays every file of the checked-in fuzz corpora (`proto/fuzz/corpus/parse/`, `.../stream/`) through the
//! fuzz bodies, so the normal test run covers what the fuzzer found without cargo-fuzz.
#![allow(clippy::unwrap_used)] // test helpers, not only #[test] fns, unwrap

use std::path::Path;

#[test]
fn replay_parse_corpus() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/parse");
    let mut count = 0;
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus directory {}: {e}", dir.display()))
        .map(|e| e.expect("readable directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        let data = std::fs::read(&path).expect("readable corpus file");
        peerlink_proto::fuzzing::fuzz_parse(&data);
        count += 1;
    }
    // The seeds alone are more than this; an empty or missing corpus must fail.
    assert!(
        count >= 10,
        "only {count} corpus files in {}",
        dir.display()
    );
}

#[test]
fn replay_stream_corpus() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/stream");
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus directory {}: {e}", dir.display()))
        .map(|e| e.expect("readable directory entry").path())
        .collect();
    entries.sort();
    for path in &entries {
        let data = std::fs::read(path).expect("readable corpus file");
        peerlink_proto::fuzzing::fuzz_stream(&data);
    }
    // The seeds alone are more than this; an empty or missing corpus must fail.
    assert!(
        entries.len() >= 10,
        "only {} corpus files in {}",
        entries.len(),
        dir.display()
    );
}

proptest::proptest! {
    /// Random streams (mostly well-formed frames with random cuts and corruptions) through the
    /// stream fuzz body, so the invariants are exercised beyond the checked-in seeds.
    #[test]
    fn random_streams_hold_the_stream_invariants(
        seed in 0u8..=255,
        frames in proptest::collection::vec((0u8..4, 0usize..300, 0u8..=255), 0..8),
        tail in proptest::collection::vec(0u8..=255, 0..16),
    ) {
        let mut data = vec![seed];
        for (kind, len, fill) in frames {
            match kind {
                0 => {
                    let body = len & !3;
                    data.extend_from_slice(&0x0001u16.to_be_bytes());
                    data.extend_from_slice(&(body as u16).to_be_bytes());
                    data.extend_from_slice(&0x2112_A442u32.to_be_bytes());
                    data.extend(std::iter::repeat_n(fill, 12 + body));
                }
                1 | 2 => {
                    data.extend_from_slice(&(0x4000u16 + u16::from(fill)).to_be_bytes());
                    data.extend_from_slice(&(len as u16).to_be_bytes());
                    data.extend(std::iter::repeat_n(fill, len + (4 - len % 4) % 4));
                }
                _ => data.push(fill),
            }
        }
        data.extend_from_slice(&tail);
        peerlink_proto::fuzzing::fuzz_stream(&data);
    }
}
