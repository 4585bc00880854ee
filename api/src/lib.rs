//! peerlink-api: the APIs the services speak, as data.
//!
//! It is: the serde types of the signaling node's WebSocket protocol and HTTP bodies
//! ([`signaling`]), of the directory's internal REST API ([`directory`]), and the relay's
//! `/stats` document ([`relay`]), and the stats snapshots relays and nodes attach to their
//! directory heartbeats ([`fleet_stats`]). Clients,
//! services and tools meet each other only through these types, over the wire. With the
//! `client` feature it also holds the typed async clients: of the directory
//! (`directory_client`), with the register/heartbeat loops that signaling nodes and relays run,
//! and of a signaling node (`signaling_client`: HTTP API and WebSocket session, `http://` or
//! `https://`), and which CAs those clients trust for TLS (`tls`).
//!
//! It is not: a server, a store or a codec of binary wire formats (STUN/TURN live in
//! `peerlink-proto`). Without the `client` feature it has no I/O and depends only on serde.

#![deny(missing_docs)]

pub mod directory;
#[cfg(feature = "client")]
pub mod directory_client;
pub mod fleet_stats;
pub mod relay;
pub mod signaling;
#[cfg(feature = "client")]
pub mod signaling_client;
#[cfg(feature = "client")]
pub mod tls;
