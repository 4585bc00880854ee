//! Fuzz target `parse`: STUN parse + every attribute decoded + integrity/fingerprint checks,
//! ChannelData (datagram and stream), the RFC 7983 demux and REST username validation.
//! The body lives in the library (`peerlink_proto::fuzzing::fuzz_parse`) so that
//! `proto/tests/fuzz_corpus.rs` replays the corpus through the same code without cargo-fuzz.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    peerlink_proto::fuzzing::fuzz_parse(data);
});
