//! peerlink-client-core: the reference client's protocol logic, sans-IO.
//!
//! Every state machine here is driven by its caller: it is handed datagrams and the monotonic
//! `now`, says what to send and when it next wants to be called, and never opens a socket,
//! reads a clock, spawns a task or draws unseeded randomness. The tokio application that
//! owns sockets, signaling and timers is `peerlink-sim`; the load tester uses the TURN client
//! alone (with `default-features = false`, no media).
//!
//! * [`agent`] — the connectivity agent (ICE: gathering host, server-reflexive and relayed
//!   candidates, connectivity checks, nomination, consent, restarts).
//! * [`turn`] — the TURN client (RFC 8656 over UDP, TCP or TLS: allocate, refresh, permissions,
//!   channels).
//! * [`recovery`] — when a call restarts ICE, reconnects signaling or is over.
//! * [`media`] (feature `media`) — the voice pipeline: Opus, media keys and AEAD, RTP-style
//!   packets, jitter buffer and concealment, receiver reports, call statistics and MOS.
//! * [`transfer`] — the file-transfer protocol's messages (the QUIC session runs in
//!   `peerlink-sim`).
//! * [`netsim`] — a deterministic lossy, delaying link for tests and simulations.

pub mod agent;
#[cfg(feature = "media")]
pub mod media;
pub mod netsim;
pub mod recovery;
pub mod transfer;
pub mod turn;
