//! peerlink-proto: wire formats, no I/O.
#![deny(missing_docs)]
