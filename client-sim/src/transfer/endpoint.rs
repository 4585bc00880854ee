//! QUIC endpoint setup over a [`DatagramPath`]: pinned-certificate TLS in both directions,
//! loss-tolerant Cubic congestion control (or quinn's BBR / Cubic), QUIC-bit greasing off (RFC 9443 first-byte demux), and a
//! conservative 1200-byte UDP payload so the same connection fits the TURN relay path.

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint, EndpointConfig, IdleTimeout, TransportConfig, VarInt};

use crate::transfer::identity::{
    Fingerprint, PinnedVerifier, SERVER_NAME, TransferIdentity, provider,
};
use crate::transfer::pacing::{PacingRate, ShapedFactory, Shaping};
use crate::transfer::path::{DatagramPath, PathSocket};
use quinn::congestion::ControllerFactory;

/// Largest UDP payload QUIC emits. 1200 is QUIC's minimum, so MTU discovery is unnecessary and
/// a datagram still fits the relay path after TURN ChannelData adds its 4-byte header
/// (the call layer must accept QUIC payloads up to this size plus 4 on the relay).
pub const MAX_QUIC_UDP_PAYLOAD: u16 = 1200;

/// ALPN protocol id of the transfer protocol.
pub const ALPN: &[u8] = b"peerlink-transfer/1";

/// Which QUIC role this side plays (the caller, ICE-controlling, is the client).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferRole {
    /// Opens the QUIC connection.
    Client,
    /// Accepts the QUIC connection.
    Server,
}

/// Congestion controller of the QUIC connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CongestionControl {
    /// quinn's BBR: ignores random loss, but overshoots a shallow bottleneck queue (it sends
    /// ~2x the file's bytes on a one-BDP queue, `benches/transfer_goodput.rs`).
    Bbr,
    /// quinn's default Cubic (baseline): every loss halves its goodput's prospects.
    Cubic,
    /// Default: Cubic that backs off only for losses the path shows to be congestion
    /// ([`super::loss_tolerant`]): BBR's goodput under random loss, Cubic's bytes.
    #[default]
    LossTolerantCubic,
}

/// Tunables of [`endpoint`]. `Default` suits a call: loss-tolerant Cubic, 10 s idle timeout, 10 s
/// handshake timeout.
#[derive(Debug, Clone)]
pub struct EndpointOptions {
    /// Congestion controller (default loss-tolerant Cubic).
    pub congestion: CongestionControl,
    /// The connection closes after this long without any packet from the peer (default 10 s).
    pub idle_timeout: Duration,
    /// Give up the handshake after this long (default 10 s).
    pub handshake_timeout: Duration,
    /// Per-stream and connection flow-control window in bytes (default 16 MiB).
    pub window: u32,
    /// Also pace datagrams at the controller's own pacing rate (BBR's bandwidth estimate x
    /// gain) on top of quinn's `cwnd / srtt` pacing. Default false: quinn 0.11's BBR rate
    /// estimate is unstable (measured 0.45x..14x of a 20 Mbit/s link), so this lowered goodput in
    /// `benches/transfer_goodput.rs`. No effect with Cubic, which reports no rate.
    pub pace_at_controller_rate: bool,
    /// Cap the congestion window at 1.5x the BDP measured from ACKed bytes (see
    /// [`Shaping::delivery_cap`]).
    pub cap_window_to_delivery_rate: bool,
}

impl Default for EndpointOptions {
    fn default() -> Self {
        Self {
            congestion: CongestionControl::LossTolerantCubic,
            idle_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            window: 16 * 1024 * 1024,
            pace_at_controller_rate: false,
            cap_window_to_delivery_rate: true,
        }
    }
}

/// Failure to set up the QUIC connection.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The TLS configuration was rejected (bad key or certificate).
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The TLS configuration lacks the cipher suite QUIC needs for Initial packets.
    #[error("TLS configuration has no QUIC initial cipher suite")]
    NoInitialCipherSuite,
    /// An option value is out of range.
    #[error("invalid option: {0}")]
    InvalidOption(&'static str),
    /// The endpoint could not be created.
    #[error("endpoint: {0}")]
    Io(#[from] std::io::Error),
    /// The connection attempt could not start.
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The handshake failed (includes a wrong peer fingerprint).
    #[error("handshake: {0}")]
    Handshake(#[from] quinn::ConnectionError),
    /// No handshake completed within the handshake timeout.
    #[error("handshake timed out")]
    HandshakeTimeout,
    /// The endpoint was closed while waiting for the peer.
    #[error("endpoint closed before a connection arrived")]
    EndpointClosed,
}

/// An established, authenticated QUIC connection and the endpoint driving it (keep both).
#[derive(Debug)]
pub struct PeerConnection {
    /// The endpoint (owns the path socket).
    pub endpoint: Endpoint,
    /// The connection to the peer, whose certificate matched the expected fingerprint.
    pub connection: Connection,
}

impl PeerConnection {
    /// Closes the connection gracefully and waits (bounded) for the close to be sent.
    pub async fn close(self) {
        self.connection.close(VarInt::from_u32(0), b"done");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }
}

fn transport(
    options: &EndpointOptions,
    rate: &PacingRate,
) -> Result<TransportConfig, EndpointError> {
    let mut t = TransportConfig::default();
    t.initial_mtu(MAX_QUIC_UDP_PAYLOAD)
        .min_mtu(MAX_QUIC_UDP_PAYLOAD)
        .mtu_discovery_config(None)
        .max_idle_timeout(Some(
            IdleTimeout::try_from(options.idle_timeout)
                .map_err(|_| EndpointError::InvalidOption("idle_timeout"))?,
        ))
        .keep_alive_interval(Some(options.idle_timeout / 3))
        .stream_receive_window(VarInt::from_u32(options.window))
        .receive_window(VarInt::from_u32(options.window))
        .send_window(u64::from(options.window));
    let cubic = || Arc::new(quinn::congestion::CubicConfig::default());
    let (cc, loss_judge): (Arc<dyn ControllerFactory + Send + Sync>, bool) =
        match options.congestion {
            CongestionControl::Bbr => (Arc::new(quinn::congestion::BbrConfig::default()), false),
            CongestionControl::Cubic => (cubic(), false),
            CongestionControl::LossTolerantCubic => (cubic(), true),
        };
    let shaping = Shaping {
        loss_judge,
        delivery_cap: options.cap_window_to_delivery_rate,
        publish_rate: options.pace_at_controller_rate.then(|| rate.clone()),
    };
    t.congestion_controller_factory(Arc::new(ShapedFactory::new(cc, shaping)));
    Ok(t)
}

/// The endpoint configuration: greasing of the QUIC bit off so every QUIC packet keeps its
/// first byte in 64..=127 / 192..=255 (RFC 9443 demux next to STUN, ChannelData and RTP).
pub fn endpoint_config() -> EndpointConfig {
    let mut c = EndpointConfig::default();
    c.grease_quic_bit(false);
    c
}

/// Sets up QUIC over `path` and returns the authenticated connection to the peer whose
/// certificate has `expected_peer` as SHA-256 fingerprint.
pub async fn endpoint(
    path: DatagramPath,
    identity: &TransferIdentity,
    expected_peer: Fingerprint,
    role: TransferRole,
    options: &EndpointOptions,
) -> Result<PeerConnection, EndpointError> {
    let provider = provider();
    let verifier = PinnedVerifier::new(expected_peer, &provider);
    let rate = PacingRate::default();
    let transport = Arc::new(transport(options, &rate)?);
    let peer = path.peer_addr();
    let socket = Arc::new(PathSocket::new(path, rate));
    let runtime = Arc::new(quinn::TokioRuntime);
    match role {
        TransferRole::Client => {
            let mut tls = rustls::ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_client_auth_cert(vec![identity.cert.clone()], identity.key_der())?;
            tls.alpn_protocols = vec![ALPN.to_vec()];
            let crypto =
                QuicClientConfig::try_from(tls).map_err(|_| EndpointError::NoInitialCipherSuite)?;
            let mut client = quinn::ClientConfig::new(Arc::new(crypto));
            client.transport_config(transport);
            let endpoint =
                Endpoint::new_with_abstract_socket(endpoint_config(), None, socket, runtime)?;
            let connecting = endpoint.connect_with(client, peer, SERVER_NAME)?;
            let connection = tokio::time::timeout(options.handshake_timeout, connecting)
                .await
                .map_err(|_| EndpointError::HandshakeTimeout)??;
            Ok(PeerConnection {
                endpoint,
                connection,
            })
        }
        TransferRole::Server => {
            let mut tls = rustls::ServerConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .with_client_cert_verifier(verifier)
                .with_single_cert(vec![identity.cert.clone()], identity.key_der())?;
            tls.alpn_protocols = vec![ALPN.to_vec()];
            let crypto =
                QuicServerConfig::try_from(tls).map_err(|_| EndpointError::NoInitialCipherSuite)?;
            let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
            server.transport_config(transport);
            let endpoint = Endpoint::new_with_abstract_socket(
                endpoint_config(),
                Some(server),
                socket,
                runtime,
            )?;
            let accept = async {
                // Bounded by the outer timeout; a failed attempt (e.g. bad fingerprint) ends it.
                let incoming = endpoint
                    .accept()
                    .await
                    .ok_or(EndpointError::EndpointClosed)?;
                Ok::<_, EndpointError>(incoming.await?)
            };
            let connection = tokio::time::timeout(options.handshake_timeout, accept)
                .await
                .map_err(|_| EndpointError::HandshakeTimeout)??;
            Ok(PeerConnection {
                endpoint,
                connection,
            })
        }
    }
}
