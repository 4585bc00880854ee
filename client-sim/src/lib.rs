//! peerlink-sim: the reference client — connectivity agent, Opus media pipeline, encrypted file
//! transfer, the signaling client, call orchestration and the `demo` that runs a local fleet.
//!
//! The protocol state machines (`agent`, `turn`, `media`, `transfer`'s protocol) are sans-IO;
//! `call`, `signal_client`, `fleet` and `demo` are the I/O layer on tokio and real UDP sockets.
//! Issue #5.

pub mod agent;
pub mod call;
pub mod demo;
pub mod fleet;
pub mod media;
pub mod netsim;
pub mod signal_client;
pub mod transfer;
pub mod turn;
