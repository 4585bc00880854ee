//! peerlink-directory: presence (user -> device -> signaling node), the signaling-node and relay
//! registry with liveness by heartbeat, and relay choice for calls.
//!
//! It is: an axum service ([`server::app`]) over a storage trait ([`store::DirectoryStore`])
//! whose embedded default is in memory ([`memory::MemoryStore`]); with
//! [`redis_store::RedisStore`] several replicas share one Redis and answer as one directory. Its REST bodies are
//! `peerlink_api::directory`; signaling nodes and relays talk to it through
//! `peerlink_api::directory_client` (feature `client`), whose heartbeat loops re-register
//! after a directory restart.
//!
//! It also serves the operators' live fleet console ([`console`], behind an operator token),
//! fed by the stats snapshots relays and nodes attach to their heartbeats.
//!
//! It is not: an account store, a message store or a router of signaling traffic; it only says
//! where users and relays are. It holds no durable state — after a restart (of the directory,
//! or of a Redis without persistence) nodes and relays re-register and republish within one
//! heartbeat.

pub mod clock;
pub mod config;
pub mod console;
pub mod memory;
mod redis_lua;
pub mod redis_store;
pub mod select;
pub mod server;
pub mod store;
