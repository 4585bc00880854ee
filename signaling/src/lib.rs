//! peerlink-signaling: accounts and login, WebSocket sessions, call invitations with candidate
//! and key exchange, durable text messages, contacts and presence, TURN credentials and the UDP
//! STUN responder (RFC 5780 behaviour discovery when a second address is configured).
//!
//! It is: an axum service built by [`http::app`] over a [`store::Store`] (SQLite by default, or PostgreSQL),
//! and a multi-node mode through the directory ([`cluster`]). The WebSocket protocol and HTTP
//! bodies it speaks are `peerlink_api::signaling`, which clients share without linking this
//! crate.
//!
//! It is not: a media path (media and files flow peer to peer or through relays), a relay, or
//! the directory itself; it never sees media keys (only public keys pass through).

#![deny(missing_docs)]

pub mod auth;
pub mod calls;
pub mod candidates;
pub mod cluster;
pub mod config;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod serve;
pub mod session;
pub mod state;
pub mod store;
pub mod stun;
pub mod throttle;

pub use config::Config;
pub use http::app;
pub use state::AppState;
