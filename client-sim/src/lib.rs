//! peerlink-sim: the reference client as a tokio application — calls and file transfers over
//! real UDP sockets and the signaling WebSocket, the local fleet launcher and the `demo`.
//!
//! The protocol state machines live in `peerlink-client-core` (sans-IO) and are re-exported
//! here under their own names: [`agent`], [`turn`], [`media`], [`netsim`]. This crate adds
//! the I/O around them: [`call`] (one call or file session, with
//! `peerlink_api::signaling_client`), [`transfer`] (QUIC file transfer over the call's path),
//! [`fleet`] (start a local directory, relays and signaling nodes), [`natcheck`] (RFC 5780 NAT
//! behaviour discovery) and [`demo`].

pub use peerlink_client_core::{agent, media, netsim, turn};

pub mod call;
pub mod demo;
pub mod fleet;
pub mod natcheck;
pub mod transfer;
