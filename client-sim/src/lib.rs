//! peerlink-sim: the reference client — connectivity agent, Opus media pipeline, encrypted file
//! transfer and scripted multi-client scenarios. Issue #5.

pub mod agent;
pub mod turn;

pub mod media;
pub mod netsim;
pub mod signal_client;
pub mod fleet;
pub mod demo;
pub mod call;
