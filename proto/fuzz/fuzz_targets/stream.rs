//! Fuzz target `stream`: TURN over TCP/TLS framing (STUN and padded ChannelData back to back)
//! through `peerlink_proto::stream::StreamFramer`, fed whole and in reads of varying size; the
//! frames and the error must not depend on the cut. The body lives in the library
//! (`peerlink_proto::fuzzing::fuzz_stream`) so that `proto/tests/fuzz_corpus.rs` replays the
//! corpus through the same code without cargo-fuzz.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    peerlink_proto::fuzzing::fuzz_stream(data);
});
