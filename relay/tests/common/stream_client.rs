//! A TURN client over TCP or TLS for the tests (long-term credentials, frames cut with
//! peerlink-proto's stream framer), and the certificate helpers the TLS tests share.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use peerlink_proto::attrs::{
    ChannelNumber, Data, ErrorCode, Nonce, Realm, RequestedTransport, Username, XorPeerAddress,
    XorRelayedAddress,
};
use peerlink_proto::auth::long_term_key;
use peerlink_proto::stream::{FrameKind, StreamFramer};
use peerlink_proto::{Class, Message, MessageBuilder, MessageType, Method, TransactionId};
use peerlink_testkit::tls::pem_block;
use rustls::pki_types::{CertificateDer, ServerName};

/// A self-signed certificate for `localhost` written as PEM into `dir` (`cert.pem`,
/// `key.pem`); returns the paths and the certificate's DER.
pub fn write_cert(dir: &Path) -> (PathBuf, PathBuf, Vec<u8>) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    // Written to a temporary name and renamed, so a reload never sees half a file.
    let tmp_c = dir.join("cert.pem.tmp");
    let tmp_k = dir.join("key.pem.tmp");
    std::fs::write(&tmp_c, pem_block("CERTIFICATE", ck.cert.der())).unwrap();
    std::fs::write(
        &tmp_k,
        pem_block("PRIVATE KEY", &ck.signing_key.serialize_der()),
    )
    .unwrap();
    std::fs::rename(&tmp_k, &key).unwrap();
    std::fs::rename(&tmp_c, &cert).unwrap();
    (cert, key, ck.cert.der().to_vec())
}

/// A verifier that accepts any server certificate: the tests compare the certificate they
/// got with the one they wrote instead.
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn client_config() -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
        .with_no_client_auth();
    Arc::new(cfg)
}

/// The byte stream under the client: plain TCP or TLS over TCP.
pub enum Transport {
    Tcp(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Transport {
    fn tcp(&self) -> &TcpStream {
        match self {
            Transport::Tcp(s) => s,
            Transport::Tls(s) => s.get_ref(),
        }
    }
}

impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Transport::Tcp(s) => s.read(buf),
            Transport::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Transport {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Transport::Tcp(s) => s.write(buf),
            Transport::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Transport::Tcp(s) => s.flush(),
            Transport::Tls(s) => s.flush(),
        }
    }
}

/// A TLS connection to `addr` with its handshake done; returns it and the server's leaf
/// certificate (DER).
pub fn tls_connect(addr: SocketAddr) -> (Transport, Vec<u8>) {
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    tcp.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(client_config(), name).unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).unwrap();
    }
    let leaf = s.conn.peer_certificates().unwrap()[0].to_vec();
    (Transport::Tls(Box::new(s)), leaf)
}

/// A plain TCP connection to `addr`.
pub fn tcp_connect(addr: SocketAddr) -> Transport {
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    tcp.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    tcp.set_nodelay(true).unwrap();
    Transport::Tcp(tcp)
}

/// A TURN client on one stream.
pub struct StreamClient {
    pub io: Transport,
    framer: StreamFramer,
    user: String,
    pass: String,
    key: [u8; 16],
    realm: Option<String>,
    nonce: Option<String>,
    /// Frames that arrived while a response was awaited (data for the test to read).
    pending: std::collections::VecDeque<(FrameKind, Vec<u8>)>,
}

impl StreamClient {
    pub fn new(io: Transport, user: &str, pass: &str) -> Self {
        StreamClient {
            io,
            framer: StreamFramer::new(70_000),
            user: user.into(),
            pass: pass.into(),
            key: [0; 16],
            realm: None,
            nonce: None,
            pending: Default::default(),
        }
    }

    /// Local address of the connection.
    pub fn local(&self) -> SocketAddr {
        self.io.tcp().local_addr().unwrap()
    }

    fn build(
        &self,
        typ: MessageType,
        tid: TransactionId,
        add: &dyn Fn(&mut MessageBuilder<'_>),
    ) -> Vec<u8> {
        let mut buf = vec![0u8; 4096];
        let mut b = MessageBuilder::new(&mut buf, typ, tid).unwrap();
        add(&mut b);
        if typ.class == Class::Request
            && let (Some(realm), Some(nonce)) = (&self.realm, &self.nonce)
        {
            b.add(&Username(&self.user)).unwrap();
            b.add(&Realm(realm)).unwrap();
            b.add(&Nonce(nonce)).unwrap();
            b.add_integrity(&self.key).unwrap();
        }
        b.add_fingerprint().unwrap();
        let n = b.finish();
        buf.truncate(n);
        buf
    }

    /// Writes raw bytes.
    pub fn write_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.io.write_all(bytes)?;
        self.io.flush()
    }

    /// The next frame within `timeout` (`None`: timeout or the stream ended).
    pub fn recv_frame(&mut self, timeout: Duration) -> Option<(FrameKind, Vec<u8>)> {
        if let Some(f) = self.pending.pop_front() {
            return Some(f);
        }
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 8192];
        loop {
            if let Some(f) = self.framer.next_frame().unwrap() {
                return Some((f.kind, f.bytes.to_vec()));
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            self.io
                .tcp()
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            match self.io.read(&mut buf) {
                Ok(0) => return None,
                Ok(n) => self.framer.push(&buf[..n]),
                Err(_) => return None,
            }
        }
    }

    /// True when the server closed the connection within `timeout` (EOF or reset).
    pub fn closed_within(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            self.io
                .tcp()
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            match self.io.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => return true,
            }
        }
        false
    }

    fn transact(&mut self, req: &[u8], tid: TransactionId) -> Option<Vec<u8>> {
        self.write_raw(req).ok()?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let (kind, bytes) = self.recv_frame(left)?;
            if kind == FrameKind::Stun
                && let Ok(m) = Message::parse(&bytes)
                && m.transaction_id() == tid
            {
                return Some(bytes);
            }
            self.pending.push_back((kind, bytes));
        }
        None
    }

    /// A request (authenticating once on 401/438); the response bytes.
    pub fn request(
        &mut self,
        method: Method,
        add: &dyn Fn(&mut MessageBuilder<'_>),
    ) -> Option<Vec<u8>> {
        for _ in 0..3 {
            let tid = TransactionId::random(&mut rand::rng());
            let req = self.build(MessageType::new(Class::Request, method), tid, add);
            let resp = self.transact(&req, tid)?;
            let m = Message::parse(&resp).unwrap();
            let code = m.get::<ErrorCode>().and_then(|r| r.ok()).map(|e| e.code);
            match code {
                Some(401) | Some(438) => {
                    let realm = m
                        .get::<Realm>()
                        .and_then(|r| r.ok())
                        .map(|r| r.0.to_string());
                    let nonce = m
                        .get::<Nonce>()
                        .and_then(|r| r.ok())
                        .map(|r| r.0.to_string());
                    let had = self.nonce.is_some() && code == Some(401);
                    if let (Some(realm), Some(nonce)) = (realm, nonce) {
                        self.key = long_term_key(&self.user, &realm, &self.pass);
                        self.realm = Some(realm);
                        self.nonce = Some(nonce);
                    }
                    if had {
                        return Some(resp);
                    }
                }
                _ => return Some(resp),
            }
        }
        None
    }

    fn ok_or_code(resp: Option<Vec<u8>>) -> Result<Vec<u8>, u16> {
        let resp = resp.ok_or(0u16)?;
        let m = Message::parse(&resp).unwrap();
        if m.class() == Class::Success {
            Ok(resp)
        } else {
            Err(m
                .get::<ErrorCode>()
                .and_then(|r| r.ok())
                .map(|e| e.code)
                .unwrap_or(0))
        }
    }

    /// Allocate; the relayed address.
    pub fn allocate(&mut self) -> Result<SocketAddr, u16> {
        let r = Self::ok_or_code(self.request(Method::ALLOCATE, &|b| {
            b.add(&RequestedTransport::UDP).unwrap()
        }))?;
        Ok(Message::parse(&r)
            .unwrap()
            .get::<XorRelayedAddress>()
            .unwrap()
            .unwrap()
            .0)
    }

    pub fn create_permission(&mut self, peer: SocketAddr) -> Result<(), u16> {
        Self::ok_or_code(self.request(Method::CREATE_PERMISSION, &|b| {
            b.add(&XorPeerAddress(peer)).unwrap()
        }))
        .map(|_| ())
    }

    pub fn channel_bind(&mut self, channel: u16, peer: SocketAddr) -> Result<(), u16> {
        Self::ok_or_code(self.request(Method::CHANNEL_BIND, &|b| {
            b.add(&ChannelNumber(channel)).unwrap();
            b.add(&XorPeerAddress(peer)).unwrap();
        }))
        .map(|_| ())
    }

    /// A Binding request's success, as a liveness check.
    pub fn binding_ok(&mut self) -> bool {
        Self::ok_or_code(self.request(Method::BINDING, &|_| {})).is_ok()
    }

    pub fn send_indication(&mut self, peer: SocketAddr, data: &[u8]) {
        let tid = TransactionId::random(&mut rand::rng());
        let msg = self.build(MessageType::SEND_INDICATION, tid, &|b| {
            b.add(&XorPeerAddress(peer)).unwrap();
            b.add(&Data(data)).unwrap();
        });
        self.write_raw(&msg).unwrap();
    }

    /// ChannelData, padded to 4 as streams require.
    pub fn send_channel(&mut self, channel: u16, data: &[u8]) {
        let mut msg = Vec::with_capacity(4 + data.len() + 3);
        msg.extend_from_slice(&channel.to_be_bytes());
        msg.extend_from_slice(&(data.len() as u16).to_be_bytes());
        msg.extend_from_slice(data);
        while msg.len() % 4 != 0 {
            msg.push(0);
        }
        self.write_raw(&msg).unwrap();
    }

    /// The payload of the next Data indication from `peer`, within `timeout`.
    pub fn recv_data(&mut self, timeout: Duration) -> Option<(SocketAddr, Vec<u8>)> {
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let (kind, bytes) = self.recv_frame(left)?;
            if kind != FrameKind::Stun {
                continue;
            }
            let m = Message::parse(&bytes).unwrap();
            if m.message_type() == MessageType::DATA_INDICATION {
                let peer = m.get::<XorPeerAddress>().unwrap().unwrap().0;
                return Some((peer, m.get::<Data>().unwrap().unwrap().0.to_vec()));
            }
        }
        None
    }

    /// The next ChannelData (channel, payload) within `timeout`.
    pub fn recv_channel(&mut self, timeout: Duration) -> Option<(u16, Vec<u8>)> {
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let (kind, bytes) = self.recv_frame(left)?;
            if kind == FrameKind::ChannelData {
                let ch = u16::from_be_bytes([bytes[0], bytes[1]]);
                return Some((ch, bytes[4..].to_vec()));
            }
        }
        None
    }
}
