//! peerlink-directory: presence (user -> device -> node), the signaling-node and relay registry
//! with liveness, and relay choice for calls. Issue #4.
