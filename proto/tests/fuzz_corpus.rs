//! Replays every file of the checked-in fuzz corpus (`proto/fuzz/corpus/parse/`) through the
//! fuzz body, so the normal test run covers what the fuzzer found without cargo-fuzz.
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
