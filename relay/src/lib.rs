//! peerlink-relay: the TURN relay (RFC 8656 over UDP, TCP and TLS) that carries calls whose NATs defeat hole
//! punching. A sans-IO core driven by io_uring (default) and epoll backends.
//!
//! What it is: [`core`] (all protocol state; no I/O), two I/O backends
//! ([`uring`], [`epoll`]) that move datagrams between sockets and the core without copying,
//! [`worker`] (what both backends share), [`metrics`] + [`http`] (Prometheus, JSON percentiles,
//! HdrHistogram interval logs), [`registration`] (registers and heartbeats with the peerlink
//! directory under `--directory`), [`config`] (TOML + CLI), and [`server`] (wiring, signals, drain).
//!
//! Clients reach it over UDP, TCP or TLS ([`stream`]: the TCP/TLS connections of a worker,
//! driving the same core).
//!
//! What it is not: no TCP allocations (RFC 6062), no ICE, no relay choice (the directory's job).

#![warn(missing_docs)]

pub mod config;
pub mod core;
pub mod epoll;
pub mod http;
pub mod metrics;
pub mod net;
pub mod registration;
pub mod server;
pub mod stats_client;
pub mod stream;
pub mod uring;
pub mod worker;
