//! peerlink-sim: the reference client — connectivity agent, Opus media pipeline, encrypted file
//! transfer, call orchestration and the `demo` that runs a local fleet.
//!
//! The protocol state machines (`agent`, `turn`, `media`, `transfer`'s protocol) are sans-IO;
//! `call`, `fleet` and `demo` are the I/O layer (with `peerlink_api::signaling_client`, the
//! signaling client) on tokio and real UDP sockets.

pub mod agent;
pub mod call;
pub mod demo;
pub mod fleet;
pub mod media;
pub mod netsim;
pub mod transfer;
pub mod turn;
