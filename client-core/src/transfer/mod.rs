//! The file-transfer protocol (see [`protocol`]); the QUIC session that carries it is
//! `peerlink-sim`'s `transfer` module.

pub mod protocol;
