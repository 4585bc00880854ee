//! peerlink-testkit: test support shared by the workspace's crates (dev-only, never shipped).
//!
//! [`postgres`] runs a real PostgreSQL server (Debian's binaries) in a temporary directory,
//! one database per test. [`redis`] runs a real Redis server (Debian's `redis-server`) without
//! persistence on a free loopback port. [`proc`] starts the services' binaries for tests (find, build when missing, wait for the
//! announce line, kill on drop). [`tls`] makes a private CA and server certificates as PEM
//! files for TLS tests. [`workspace`] reads the workspace's crate graph from
//! `cargo metadata` and `cargo tree`; the test `tests/dependency_rules.rs` holds the crates to
//! the layering rules with it.

#![deny(missing_docs)]

pub mod postgres;
pub mod proc;
pub mod redis;
pub mod tls;
pub mod workspace;
