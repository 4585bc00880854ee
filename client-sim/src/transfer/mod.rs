//! Encrypted, integrity-checked, resumable file transfer over QUIC on the call's datagram path.
//!
//! What it is: quinn (QUIC) running over an abstract [`DatagramPath`] — the call's hole-punched
//! direct path or its TURN relay — with loss-tolerant Cubic congestion control
//! ([`loss_tolerant`]: random loss does not shrink the window, a built queue does), QUIC-bit
//! greasing off (so the
//! call socket's first-byte demux keeps working, RFC 9443) and a 1200-byte UDP payload that also
//! fits the relay. TLS 1.3 uses per-call self-signed certificates pinned by SHA-256 fingerprint
//! in both directions ([`TransferIdentity`], fingerprints carried by signaling). The file is
//! announced with its BLAKE3 and per-chunk BLAKE3 hashes, received into a temp file with a
//! sidecar state, verified chunk by chunk and as a whole, and renamed on success; a new
//! connection resumes from the chunks the receiver re-verified ([`protocol`] has the flow).
//!
//! What it is not: it does not own sockets or connectivity — the call layer moves the
//! datagrams ([`PathHandle`]) through the agent's `send()`/`handle_datagram()`. One file per
//! stream; no directories, no compression.
//!
//! Testing aids: [`DatagramPath::pair`] (in-memory) and [`link::emulated_pair`] (bottleneck rate
//! + [`crate::netsim`] delay/loss).

pub mod endpoint;
pub mod identity;
pub mod link;
pub mod loss_tolerant;
pub mod pacing;
pub mod path;
pub mod progress;
pub use peerlink_client_core::transfer::protocol;
pub mod session;

pub use endpoint::{
    CongestionControl, EndpointError, EndpointOptions, MAX_QUIC_UDP_PAYLOAD, PeerConnection,
    TransferRole, endpoint, endpoint_config,
};
pub use identity::{Fingerprint, IdentityError, TransferIdentity};
pub use link::{EmulatedLink, LinkConfig, RateLimitedLink, emulated_pair};
pub use path::{DatagramPath, PathHandle, Pipe, PushError};
pub use progress::{Progress, ProgressBar};
pub use session::{
    Direction, TransferError, TransferOptions, TransferReport, receive_file, receive_file_with,
    send_file, send_file_with,
};
