//! peerlink-loadtest: the relay benchmark against coturn (`relay_bench`) and the signaling and
//! directory benchmarks (`fleet`), on top of the client library.
//!
//! What it is: a load generator (many TURN allocations with distinct 5-tuples, paced
//! ChannelData traffic, receive-side counting, microsecond HdrHistograms) and a harness that
//! starts the servers under test itself, pins them to a core and reports medians and ratios
//! measured side by side in one run. What it is not: a test suite — tests assert behaviour,
//! this crate's binary prints figures.

pub mod fleet;
pub mod relay_bench;
