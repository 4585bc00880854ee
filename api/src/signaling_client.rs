//! Async client of a peerlink signaling node: the HTTP API (register, login, token refresh,
//! TURN credentials) and the WebSocket session (`/v1/ws`) with typed frames
//! ([`ServerMsg`] in, [`ClientMsg`] out), cumulative message acks, duplicate suppression by
//! `seq`, reconnect with `resume_from`, and mid-session token refresh (`auth` frame).
//!
//! What it is: the transport for everything a client (the reference client, the load tester)
//! says to signaling (chat,
//! presence, call invitations and trickled candidates). A running call reconnects a dropped
//! session itself without stopping its media: [`SignalSession::reopen`] opens the new
//! connection without borrowing the session, [`SignalSession::install`] swaps it in.
//! Servers are `http://host:port` (WebSocket `ws://`) or `https://host:port` (WebSocket
//! `wss://`, rustls); an `https://` server's certificate must chain to the system's roots or
//! to a CA given with [`HttpApi::with_trust`] ([`crate::tls::Trust`]). A certificate that
//! does not verify is [`SignalError::Tls`], naming the server.
//!
//! What it is not: no automatic background reconnect loop (the caller decides when to
//! [`SignalSession::reconnect`]), no call state machine (the reference client's
//! `peerlink_sim::call` has one).
//!
//! Every network await is bounded by [`SignalSession::io_timeout`] or the HTTP client's timeout.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::signaling::{
    ClientMsg, Credentials, HttpError, PresenceStatus, RefreshRequest, ResumeOutcome, ServerMsg,
    TokenResponse, TurnCredentials,
};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Default bound on one HTTP request or one WebSocket handshake/write.
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(15);
/// Refresh the access token when it has less than this left.
pub const REFRESH_MARGIN: Duration = Duration::from_secs(60);

/// What went wrong talking to signaling.
#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    /// The server URL is not `http://host:port[/]` or `https://host:port[/]`.
    #[error("bad server URL {0:?} (want http://host:port or https://host:port)")]
    BadUrl(String),
    /// The CA files given to trust cannot be used.
    #[error(transparent)]
    Trust(#[from] crate::tls::TrustError),
    /// The TLS handshake with an `https://` server failed, typically because its certificate
    /// does not verify against the trusted CAs or does not name the host.
    #[error(
        "TLS with {server} failed: {reason} (is the server's certificate signed by a trusted CA?)"
    )]
    Tls {
        /// The server (`https://host:port`).
        server: String,
        /// rustls's reason, e.g. `invalid peer certificate: UnknownIssuer`.
        reason: String,
    },
    /// Transport failure of an HTTP request.
    #[error("HTTP request to {url} failed: {source}")]
    Http {
        /// Request URL.
        url: String,
        /// Cause.
        source: reqwest::Error,
    },
    /// The server answered an HTTP error.
    #[error("{url}: HTTP {status} {code}: {message}")]
    Api {
        /// Request URL.
        url: String,
        /// HTTP status.
        status: u16,
        /// Machine-readable code (e.g. `username_taken`, `invalid_credentials`).
        code: String,
        /// Human-readable text.
        message: String,
    },
    /// WebSocket failure.
    #[error("WebSocket: {0}")]
    Ws(#[from] tokio_tungstenite::tungstenite::Error),
    /// The session was closed by the server.
    #[error("session closed by server (code {code}: {reason})")]
    Closed {
        /// Close code (1000 if none was given).
        code: u16,
        /// Close reason text.
        reason: String,
    },
    /// A server frame did not parse or broke the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The server answered a frame with an `error` frame.
    #[error("server error {code:?}: {message}")]
    Server {
        /// Code.
        code: crate::signaling::ErrorCode,
        /// Detail.
        message: String,
    },
    /// A bounded wait ran out.
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, &'static str),
}

impl SignalError {
    /// HTTP status of an API error, if this is one.
    pub fn status(&self) -> Option<u16> {
        match self {
            SignalError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// The signaling node's HTTP API.
#[derive(Clone, Debug)]
pub struct HttpApi {
    base: String,
    /// `host[:port]` as given.
    authority: String,
    /// `host:port` to connect to (the scheme's port when none was given).
    connect_to: String,
    /// The TLS configuration of an `https://` server.
    tls: Option<crate::tls::Trust>,
    http: reqwest::Client,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl HttpApi {
    /// A client for `server` (`http://host:port`, or `https://host:port` trusting the system's
    /// roots), requests bounded by `timeout`.
    pub fn new(server: &str, timeout: Duration) -> Result<Self, SignalError> {
        Self::build(server, timeout, None)
    }

    /// A client for `server` trusting `trust` for `https://` (plain `http://` ignores it).
    pub fn with_trust(
        server: &str,
        timeout: Duration,
        trust: &crate::tls::Trust,
    ) -> Result<Self, SignalError> {
        Self::build(server, timeout, Some(trust))
    }

    fn build(
        server: &str,
        timeout: Duration,
        trust: Option<&crate::tls::Trust>,
    ) -> Result<Self, SignalError> {
        let bad = || SignalError::BadUrl(server.to_owned());
        let base = server.trim_end_matches('/').to_owned();
        let (rest, secure) = if let Some(r) = base.strip_prefix("http://") {
            (r, false)
        } else if let Some(r) = base.strip_prefix("https://") {
            (r, true)
        } else {
            return Err(bad());
        };
        if rest.is_empty()
            || rest.contains(['/', '?', '#', '@'])
            || rest.contains(char::is_whitespace)
        {
            return Err(bad());
        }
        let (host, port) = split_authority(rest).ok_or_else(bad)?;
        let port = port.unwrap_or(if secure { 443 } else { 80 });
        let connect_to = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let authority = rest.to_owned();
        let tls = match (secure, trust) {
            (false, _) => None,
            (true, Some(t)) => Some(t.clone()),
            (true, None) => Some(crate::tls::Trust::system_shared()?),
        };
        let builder = match &tls {
            Some(t) => t.reqwest_builder(),
            None => reqwest::Client::builder(),
        };
        let http = builder
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|source| SignalError::Http {
                url: base.clone(),
                source,
            })?;
        Ok(Self {
            base,
            authority,
            connect_to,
            tls,
            http,
        })
    }

    /// Base URL (`http://host:port` or `https://host:port`).
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Whether the server is `https://` (the WebSocket `wss://`).
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// WebSocket URL of `/v1/ws` with the given query.
    fn ws_url(&self, query: &str) -> String {
        let scheme = if self.tls.is_some() { "wss" } else { "ws" };
        format!("{scheme}://{}/v1/ws?{query}", self.authority)
    }

    /// The error of a failed request to `url`: [`SignalError::Tls`] when TLS failed.
    fn http_error(&self, url: &str, source: reqwest::Error) -> SignalError {
        match crate::tls::tls_failure(&source) {
            Some(reason) if self.tls.is_some() => SignalError::Tls {
                server: self.base.clone(),
                reason,
            },
            _ => SignalError::Http {
                url: url.to_owned(),
                source,
            },
        }
    }

    async fn post<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        bearer: Option<&str>,
        body: Option<&B>,
    ) -> Result<T, SignalError> {
        let url = format!("{}{}", self.base, path);
        let mut req = self.http.post(&url);
        if let Some(t) = bearer {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let http_err = |source| self.http_error(&url, source);
        let resp = req.send().await.map_err(http_err)?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(http_err)?;
        if !status.is_success() {
            let (code, message) = match serde_json::from_slice::<HttpError>(&bytes) {
                Ok(e) => (e.error, e.message),
                Err(_) => (
                    "http".to_owned(),
                    String::from_utf8_lossy(&bytes).chars().take(200).collect(),
                ),
            };
            return Err(SignalError::Api {
                url,
                status: status.as_u16(),
                code,
                message,
            });
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| SignalError::Protocol(format!("{url}: bad JSON answer: {e}")))
    }

    /// `POST /v1/register`. A taken name is `Api{status: 409}`.
    pub async fn register(&self, username: &str, password: &str) -> Result<(), SignalError> {
        let body = Credentials {
            username: username.to_owned(),
            password: password.to_owned(),
            device: None,
        };
        let _: serde_json::Value = self.post("/v1/register", None, Some(&body)).await?;
        Ok(())
    }

    /// `POST /v1/login`.
    pub async fn login(&self, username: &str, password: &str) -> Result<Tokens, SignalError> {
        let body = Credentials {
            username: username.to_owned(),
            password: password.to_owned(),
            device: None,
        };
        let t: TokenResponse = self.post("/v1/login", None, Some(&body)).await?;
        Ok(Tokens::from_response(t))
    }

    /// `POST /v1/refresh`.
    pub async fn refresh(&self, refresh_token: &str) -> Result<Tokens, SignalError> {
        let body = RefreshRequest {
            refresh_token: refresh_token.to_owned(),
        };
        let t: TokenResponse = self.post("/v1/refresh", None, Some(&body)).await?;
        Ok(Tokens::from_response(t))
    }

    /// `POST /v1/turn-credentials` (TURN REST ephemeral credentials and relay URIs).
    pub async fn turn_credentials(
        &self,
        access_token: &str,
    ) -> Result<TurnCredentials, SignalError> {
        self.post::<(), _>("/v1/turn-credentials", Some(access_token), None)
            .await
    }
}

/// Tokens of a logged-in user.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Tokens {
    /// Normalised username.
    pub username: String,
    /// Access token for the API and `/v1/ws`.
    pub access_token: String,
    /// Unix seconds at which the access token expires (computed at receipt).
    pub access_expires_at: u64,
    /// Refresh token.
    pub refresh_token: String,
}

impl Tokens {
    fn from_response(t: TokenResponse) -> Self {
        Self {
            username: t.username,
            access_token: t.access_token,
            access_expires_at: unix_now().saturating_add(t.expires_in),
            refresh_token: t.refresh_token,
        }
    }

    /// Whether the access token has less than [`REFRESH_MARGIN`] left.
    pub fn needs_refresh(&self) -> bool {
        unix_now().saturating_add(REFRESH_MARGIN.as_secs()) >= self.access_expires_at
    }
}

/// What `welcome` said about the session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Welcome {
    /// Authenticated user.
    pub user: String,
    /// Device id.
    pub device: String,
    /// Node serving the session.
    pub node: String,
    /// How `resume_from` was handled.
    pub resume: ResumeOutcome,
    /// Highest seq the server holds as acked by this device.
    pub acked_seq: u64,
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Where and how [`Connection::open`] connects. The defaults suit one client; a load
/// generator holding many sessions sets a source address and small buffers.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// Local address to connect from (e.g. one of 127.0.0.0/8, to spread source addresses)
    /// [default: chosen by the kernel].
    pub source: Option<IpAddr>,
    /// WebSocket read buffer, bytes [default: tungstenite's].
    pub read_buffer: Option<usize>,
    /// WebSocket write buffer, bytes (0 writes each frame through) [default: tungstenite's].
    pub write_buffer: Option<usize>,
    /// Bound on the TCP connect, the handshake, the `welcome` and each send
    /// [default: [`DEFAULT_IO_TIMEOUT`]].
    pub timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            source: None,
            read_buffer: None,
            write_buffer: None,
            timeout: DEFAULT_IO_TIMEOUT,
        }
    }
}

/// One open `/v1/ws` connection past its `welcome`: typed frames out and in, nothing more (no
/// acks, resume or duplicate suppression: [`SignalSession`] adds those on top).
pub struct Connection {
    ws: Ws,
    welcome: Welcome,
    timeout: Duration,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("welcome", &self.welcome)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Open `/v1/ws` as `device` with `access_token`; `resume_from` = the last seq this device
    /// processed (None for a fresh session). Returns once `welcome` has arrived; an `error`
    /// frame instead is [`SignalError::Server`].
    pub async fn open(
        api: &HttpApi,
        access_token: &str,
        device: &str,
        resume_from: Option<u64>,
        opts: &ConnectOptions,
    ) -> Result<Self, SignalError> {
        check_device(device)?;
        let mut query = format!("token={access_token}&device={device}");
        if let Some(seq) = resume_from {
            query.push_str(&format!("&resume_from={seq}"));
        }
        let url = api.ws_url(&query);
        let t = opts.timeout;
        let tcp = tokio::time::timeout(t, tcp_connect(&api.connect_to, opts.source))
            .await
            .map_err(|_| SignalError::Timeout(t, "TCP connect"))?
            .map_err(|e| SignalError::Ws(tungstenite::Error::Io(e)))?;
        // Frames are small and answered at once: no Nagle delay.
        tcp.set_nodelay(true)
            .map_err(|e| SignalError::Ws(tungstenite::Error::Io(e)))?;
        let stream = match &api.tls {
            None => MaybeTlsStream::Plain(tcp),
            Some(trust) => {
                let tls = tokio::time::timeout(t, tls_connect(api, trust, tcp))
                    .await
                    .map_err(|_| SignalError::Timeout(t, "TLS handshake"))??;
                MaybeTlsStream::Rustls(tls)
            }
        };
        let mut cfg = WebSocketConfig::default();
        if let Some(n) = opts.read_buffer {
            cfg = cfg.read_buffer_size(n);
        }
        if let Some(n) = opts.write_buffer {
            cfg = cfg.write_buffer_size(n);
        }
        let (mut ws, _) = tokio::time::timeout(
            t,
            tokio_tungstenite::client_async_with_config(url, stream, Some(cfg)),
        )
        .await
        .map_err(|_| SignalError::Timeout(t, "WebSocket handshake"))??;
        // The first frame is `welcome`; a `resync` may follow it (read later by `recv`).
        let first = tokio::time::timeout(t, read_frame(&mut ws))
            .await
            .map_err(|_| SignalError::Timeout(t, "welcome"))??;
        let welcome = match first {
            ServerMsg::Welcome {
                user,
                device,
                node,
                resume,
                acked_seq,
                ..
            } => Welcome {
                user,
                device,
                node,
                resume,
                acked_seq,
            },
            ServerMsg::Error { code, message, .. } => {
                return Err(SignalError::Server { code, message });
            }
            other => {
                return Err(SignalError::Protocol(format!(
                    "expected welcome first, got {other:?}"
                )));
            }
        };
        Ok(Self {
            ws,
            welcome,
            timeout: t,
        })
    }

    /// What `welcome` said.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// Send one frame (bounded by the connection's timeout).
    pub async fn send(&mut self, msg: &ClientMsg) -> Result<(), SignalError> {
        send_frame(&mut self.ws, msg, self.timeout).await
    }

    /// Next server frame. Cancel-safe; not bounded by itself.
    pub async fn recv(&mut self) -> Result<ServerMsg, SignalError> {
        read_frame(&mut self.ws).await
    }

    /// Separate halves, to send from one task while another reads.
    pub fn split(self) -> (ConnectionSender, ConnectionReceiver) {
        let (sink, stream) = self.ws.split();
        (
            ConnectionSender {
                sink,
                timeout: self.timeout,
            },
            ConnectionReceiver { stream },
        )
    }

    /// Close the WebSocket (normal closure), bounded.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.ws.close(None)).await;
    }
}

/// The sending half of a [`Connection`].
pub struct ConnectionSender {
    sink: SplitSink<Ws, Message>,
    timeout: Duration,
}

impl ConnectionSender {
    /// Send one frame (bounded by the connection's timeout).
    pub async fn send(&mut self, msg: &ClientMsg) -> Result<(), SignalError> {
        send_frame(&mut self.sink, msg, self.timeout).await
    }
}

/// The receiving half of a [`Connection`].
pub struct ConnectionReceiver {
    stream: SplitStream<Ws>,
}

impl ConnectionReceiver {
    /// Next server frame. Cancel-safe; not bounded by itself.
    pub async fn recv(&mut self) -> Result<ServerMsg, SignalError> {
        read_frame(&mut self.stream).await
    }
}

/// `host` and the port, if any, of `host[:port]` / `[v6][:port]`.
fn split_authority(a: &str) -> Option<(&str, Option<u16>)> {
    let (host, port) = if let Some(rest) = a.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        match after {
            "" => (h, None),
            p => (h, Some(p.strip_prefix(':')?)),
        }
    } else {
        match a.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (a, None),
        }
    };
    if host.is_empty() {
        return None;
    }
    let port = match port {
        Some(p) => Some(p.parse::<u16>().ok().filter(|&p| p != 0)?),
        None => None,
    };
    Some((host, port))
}

/// The TLS handshake of a `wss://` connection; a failure is [`SignalError::Tls`].
async fn tls_connect(
    api: &HttpApi,
    trust: &crate::tls::Trust,
    tcp: TcpStream,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, SignalError> {
    let host = split_authority(&api.authority)
        .map(|(h, _)| h)
        .unwrap_or_default();
    let name =
        rustls::pki_types::ServerName::try_from(host.to_owned()).map_err(|e| SignalError::Tls {
            server: api.base.clone(),
            reason: format!("{host:?} is not a valid server name: {e}"),
        })?;
    tokio_rustls::TlsConnector::from(trust.config().clone())
        .connect(name, tcp)
        .await
        .map_err(|e| SignalError::Tls {
            server: api.base.clone(),
            reason: crate::tls::tls_failure(&e).unwrap_or_else(|| e.to_string()),
        })
}

async fn tcp_connect(authority: &str, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let Some(src) = source else {
        return TcpStream::connect(authority).await;
    };
    let mut last = None;
    for addr in tokio::net::lookup_host(authority).await? {
        if addr.is_ipv4() != src.is_ipv4() {
            continue;
        }
        let sock = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        sock.bind(SocketAddr::new(src, 0))?;
        match sock.connect(addr).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::AddrNotAvailable,
            format!("{authority} has no address of the family of {src}"),
        )
    }))
}

/// A new connection of a session, opened by [`SignalSession::reopen`] and not yet installed.
#[derive(Debug)]
pub struct Reopened {
    conn: Connection,
    tokens: Tokens,
    /// The node it was opened on (the session's own, or one of its other nodes).
    api: HttpApi,
}

/// One WebSocket session of one device, plus the state needed to resume it.
pub struct SignalSession {
    api: HttpApi,
    /// Other nodes of the same fleet, tried in order when `api` cannot be reached.
    others: Vec<HttpApi>,
    tokens: Tokens,
    device: String,
    conn: Connection,
    /// Highest message seq handed to the application.
    delivered_seq: u64,
    /// Highest seq acked to the server (= processed).
    acked_seq: u64,
    /// Frames read while waiting for something else, handed out first by `recv`.
    backlog: VecDeque<ServerMsg>,
    io_timeout: Duration,
    msg_counter: u64,
}

impl std::fmt::Debug for SignalSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignalSession")
            .field("user", &self.tokens.username)
            .field("device", &self.device)
            .field("acked_seq", &self.acked_seq)
            .finish_non_exhaustive()
    }
}

fn check_device(device: &str) -> Result<(), SignalError> {
    let ok = (1..=64).contains(&device.len())
        && device
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(SignalError::Protocol(format!(
            "device id {device:?} must be 1-64 of [A-Za-z0-9_-]"
        )))
    }
}

impl SignalSession {
    /// Open `/v1/ws` as `device` with `tokens`; `resume_from` = the last seq this device
    /// processed (None for a fresh session). Waits (bounded) for `welcome`.
    pub async fn connect(
        api: HttpApi,
        tokens: Tokens,
        device: &str,
        resume_from: Option<u64>,
    ) -> Result<Self, SignalError> {
        let io_timeout = DEFAULT_IO_TIMEOUT;
        let conn = Self::open(&api, &tokens, device, resume_from, io_timeout).await?;
        let start = resume_from.unwrap_or(conn.welcome.acked_seq);
        Ok(Self {
            api,
            others: Vec::new(),
            tokens,
            device: device.to_owned(),
            conn,
            delivered_seq: start,
            acked_seq: start,
            backlog: VecDeque::new(),
            io_timeout,
            msg_counter: 0,
        })
    }

    async fn open(
        api: &HttpApi,
        tokens: &Tokens,
        device: &str,
        resume_from: Option<u64>,
        io_timeout: Duration,
    ) -> Result<Connection, SignalError> {
        let opts = ConnectOptions {
            timeout: io_timeout,
            ..ConnectOptions::default()
        };
        Connection::open(api, &tokens.access_token, device, resume_from, &opts).await
    }

    /// Connect to the first of `nodes` (signaling nodes of one fleet) that answers; the others
    /// become the session's failover list ([`with_failover`](Self::with_failover)). A node
    /// that refuses the session itself (bad token, a newer session of the device) ends the
    /// search with its error.
    pub async fn connect_any(
        mut nodes: Vec<HttpApi>,
        mut tokens: Tokens,
        device: &str,
        resume_from: Option<u64>,
    ) -> Result<Self, SignalError> {
        let (i, conn) =
            Self::open_any(&nodes, &mut tokens, device, resume_from, DEFAULT_IO_TIMEOUT).await?;
        let api = nodes.remove(i);
        let start = resume_from.unwrap_or(conn.welcome.acked_seq);
        Ok(Self {
            api,
            others: nodes,
            tokens,
            device: device.to_owned(),
            conn,
            delivered_seq: start,
            acked_seq: start,
            backlog: VecDeque::new(),
            io_timeout: DEFAULT_IO_TIMEOUT,
            msg_counter: 0,
        })
    }

    /// Other signaling nodes of the same fleet (same token secret and store): when the
    /// session's node cannot be reached, [`reconnect`](Self::reconnect) and
    /// [`reopen`](Self::reopen) try these in order, and the first that answers becomes the
    /// session's node.
    pub fn with_failover(mut self, others: Vec<HttpApi>) -> Self {
        self.others = others;
        self
    }

    /// The nodes a reconnect tries, in order: the session's own, then the others.
    fn candidates(&self) -> Vec<HttpApi> {
        let mut all = Vec::with_capacity(1 + self.others.len());
        all.push(self.api.clone());
        all.extend(
            self.others
                .iter()
                .filter(|o| o.base() != self.api.base())
                .cloned(),
        );
        all
    }

    /// Open a connection on the first of `nodes` that takes it: the node's index and the
    /// connection, or the last node's error. A node refusing the session itself (bad token,
    /// a newer session of the device) ends the search: another node would answer the same.
    async fn open_any(
        nodes: &[HttpApi],
        tokens: &mut Tokens,
        device: &str,
        resume_from: Option<u64>,
        io_timeout: Duration,
    ) -> Result<(usize, Connection), SignalError> {
        let mut last = SignalError::Protocol("no signaling node to connect to".into());
        for (i, api) in nodes.iter().enumerate() {
            let attempt = async {
                if tokens.needs_refresh() {
                    *tokens = api.refresh(&tokens.refresh_token).await?;
                }
                Self::open(api, tokens, device, resume_from, io_timeout).await
            };
            match attempt.await {
                Ok(c) => return Ok((i, c)),
                Err(e) if !unreachable(&e) => return Err(e),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Make `api` the session's node (the others stay in the failover list).
    fn switch_to(&mut self, api: HttpApi) {
        if api.base() != self.api.base() {
            let old = std::mem::replace(&mut self.api, api);
            self.others.retain(|o| o.base() != self.api.base());
            self.others.push(old);
        }
    }

    /// Log in over HTTP and connect in one step.
    pub async fn login_and_connect(
        server: &str,
        username: &str,
        password: &str,
        device: &str,
    ) -> Result<Self, SignalError> {
        let api = HttpApi::new(server, DEFAULT_IO_TIMEOUT)?;
        let tokens = api.login(username, password).await?;
        Self::connect(api, tokens, device, None).await
    }

    /// The `welcome` of the current connection.
    pub fn welcome(&self) -> &Welcome {
        &self.conn.welcome
    }

    /// Current tokens (persist them to skip the next login).
    pub fn tokens(&self) -> &Tokens {
        &self.tokens
    }

    /// The HTTP API of the same node.
    pub fn api(&self) -> &HttpApi {
        &self.api
    }

    /// This session's username.
    pub fn user(&self) -> &str {
        &self.tokens.username
    }

    /// Highest message seq acknowledged (processed) by this device.
    pub fn acked_seq(&self) -> u64 {
        self.acked_seq
    }

    /// Bound on handshakes and writes (default [`DEFAULT_IO_TIMEOUT`]).
    pub fn io_timeout(&self) -> Duration {
        self.io_timeout
    }

    /// Send one frame (bounded by the I/O timeout).
    pub async fn send(&mut self, msg: &ClientMsg) -> Result<(), SignalError> {
        self.conn.send(msg).await
    }

    /// Next server frame. `message` frames with a seq already handed out are dropped here.
    /// Cancel-safe (usable in `select!`) as long as the backlog is empty or the future is
    /// polled to completion. Not bounded by itself: wrap it in a timeout or use
    /// [`wait_for`](Self::wait_for).
    pub async fn recv(&mut self) -> Result<ServerMsg, SignalError> {
        if let Some(m) = self.backlog.pop_front() {
            return Ok(m);
        }
        loop {
            let m = self.conn.recv().await?;
            if let Some(m) = self.filter(m) {
                return Ok(m);
            }
        }
    }

    fn filter(&mut self, m: ServerMsg) -> Option<ServerMsg> {
        match &m {
            ServerMsg::Message { seq, .. } => {
                if *seq <= self.delivered_seq {
                    return None;
                }
                self.delivered_seq = *seq;
            }
            ServerMsg::Resync { from_seq, .. } => {
                // The server replays from `from_seq`: accept those seqs again.
                self.delivered_seq = *from_seq;
                self.acked_seq = self.acked_seq.min(*from_seq);
            }
            ServerMsg::AuthOk { .. } => {}
            _ => {}
        }
        Some(m)
    }

    /// Add `user` as a contact and wait until it shows online (in the contact list or by a
    /// presence event): the explicit signal that an invite to it will ring a device.
    pub async fn wait_until_online(
        &mut self,
        user: &str,
        timeout: Duration,
    ) -> Result<(), SignalError> {
        self.send(&ClientMsg::AddContact {
            username: user.to_owned(),
        })
        .await?;
        let online = |m: &ServerMsg| match m {
            ServerMsg::Contacts { contacts } => contacts
                .iter()
                .any(|c| c.username == user && c.status == PresenceStatus::Online),
            ServerMsg::Presence { user: u, status } => {
                u == user && *status == PresenceStatus::Online
            }
            _ => false,
        };
        self.wait_for(timeout, "contact online", None, online)
            .await
            .map(|_| ())
    }

    /// Read frames until `pred` matches one (returned); the others are kept, in order, for
    /// later [`recv`](Self::recv) calls. An `error` frame whose `id` equals `error_id` fails
    /// the wait. Bounded by `timeout`.
    pub async fn wait_for(
        &mut self,
        timeout: Duration,
        what: &'static str,
        error_id: Option<&str>,
        mut pred: impl FnMut(&ServerMsg) -> bool,
    ) -> Result<ServerMsg, SignalError> {
        // Look in the backlog first.
        if let Some(i) = self.backlog.iter().position(&mut pred)
            && let Some(m) = self.backlog.remove(i)
        {
            return Ok(m);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let m = tokio::time::timeout_at(deadline, self.conn.recv())
                .await
                .map_err(|_| SignalError::Timeout(timeout, what))??;
            let Some(m) = self.filter(m) else { continue };
            if pred(&m) {
                return Ok(m);
            }
            if let ServerMsg::Error { code, message, id } = &m
                && id.is_some()
                && id.as_deref() == error_id
            {
                return Err(SignalError::Server {
                    code: *code,
                    message: message.clone(),
                });
            }
            self.backlog.push_back(m);
        }
    }

    /// Acknowledge every message up to `seq` (cumulative); no-op if already acked.
    pub async fn ack(&mut self, seq: u64) -> Result<(), SignalError> {
        if seq <= self.acked_seq {
            return Ok(());
        }
        self.send(&ClientMsg::Ack { seq }).await?;
        self.acked_seq = seq;
        Ok(())
    }

    /// A fresh client message id (unique per session and time).
    pub fn next_message_id(&mut self) -> String {
        self.msg_counter += 1;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        format!(
            "{}-{}-{nanos:x}-{}",
            self.user(),
            self.device,
            self.msg_counter
        )
    }

    /// Send a durable text message and wait (bounded) for its `message_ack`; returns
    /// `(id, stored_at_ms)`.
    pub async fn send_message(
        &mut self,
        to: &str,
        body: &str,
        timeout: Duration,
    ) -> Result<(String, u64), SignalError> {
        let id = self.next_message_id();
        self.send(&ClientMsg::SendMessage {
            id: id.clone(),
            to: to.to_owned(),
            from: None,
            body: body.to_owned(),
        })
        .await?;
        let want = id.clone();
        let m = self
            .wait_for(
                timeout,
                "message_ack",
                Some(&id),
                |m| matches!(m, ServerMsg::MessageAck { id, .. } if *id == want),
            )
            .await?;
        match m {
            ServerMsg::MessageAck { stored_at_ms, .. } => Ok((id, stored_at_ms)),
            other => Err(SignalError::Protocol(format!("unexpected {other:?}"))),
        }
    }

    /// Refresh the access token over HTTP and hand it to the session (`auth` frame); waits
    /// (bounded) for `auth_ok`.
    pub async fn refresh_token(&mut self) -> Result<(), SignalError> {
        let t = self.api.refresh(&self.tokens.refresh_token).await?;
        self.tokens = t;
        let token = self.tokens.access_token.clone();
        self.send(&ClientMsg::Auth { token }).await?;
        let to = self.io_timeout;
        self.wait_for(to, "auth_ok", None, |m| {
            matches!(m, ServerMsg::AuthOk { .. })
        })
        .await?;
        Ok(())
    }

    /// Refresh the token if it expires within [`REFRESH_MARGIN`].
    pub async fn refresh_if_due(&mut self) -> Result<bool, SignalError> {
        if self.tokens.needs_refresh() {
            self.refresh_token().await?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Reconnect (e.g. after a drop) with `resume_from` = the last acked seq: unacked
    /// messages after it are replayed, duplicates of ones already handed out are dropped.
    /// Refreshes the access token first when due. Returns how the server handled it.
    pub async fn reconnect(&mut self) -> Result<ResumeOutcome, SignalError> {
        // Close the old socket politely; ignore failures (it may already be gone).
        let _ = tokio::time::timeout(Duration::from_secs(2), self.conn.ws.close(None)).await;
        let nodes = self.candidates();
        let mut tokens = self.tokens.clone();
        let (i, conn) = Self::open_any(
            &nodes,
            &mut tokens,
            &self.device,
            Some(self.acked_seq),
            self.io_timeout,
        )
        .await?;
        self.tokens = tokens;
        if let Some(api) = nodes.into_iter().nth(i) {
            self.switch_to(api);
        }
        // Messages after the acked seq that were handed out but not acked will be replayed;
        // deliver them again only if the application never acked them.
        self.delivered_seq = self.acked_seq;
        self.backlog.clear();
        let outcome = conn.welcome.resume;
        self.conn = conn;
        Ok(outcome)
    }

    /// Opens a new connection of this device with `resume_from` = the last acked seq (and a
    /// refreshed token when due) without borrowing the session, so the caller can keep
    /// working (e.g. media) while it runs; hand the result to [`install`](Self::install).
    /// Each step is bounded by the I/O timeout; bound the whole future as needed.
    pub fn reopen(
        &self,
    ) -> impl std::future::Future<Output = Result<Reopened, SignalError>> + Send + 'static {
        let nodes = self.candidates();
        let mut tokens = self.tokens.clone();
        let device = self.device.clone();
        let acked = self.acked_seq;
        let io_timeout = self.io_timeout;
        async move {
            let (i, conn) =
                Self::open_any(&nodes, &mut tokens, &device, Some(acked), io_timeout).await?;
            let api = nodes.into_iter().nth(i).ok_or_else(|| {
                SignalError::Protocol("reconnected to a node that is not in the list".into())
            })?;
            Ok(Reopened { conn, tokens, api })
        }
    }

    /// Replaces the (dead) connection with `r`: messages after the acked seq are replayed,
    /// non-message frames read but not yet handed out stay queued. Returns how the server
    /// handled the resume.
    pub fn install(&mut self, r: Reopened) -> ResumeOutcome {
        self.tokens = r.tokens;
        self.switch_to(r.api);
        self.delivered_seq = self.acked_seq;
        self.backlog
            .retain(|m| !matches!(m, ServerMsg::Message { .. }));
        let outcome = r.conn.welcome.resume;
        self.conn = r.conn;
        outcome
    }

    /// Get TURN credentials with this session's token.
    pub async fn turn_credentials(&self) -> Result<TurnCredentials, SignalError> {
        self.api.turn_credentials(&self.tokens.access_token).await
    }

    /// Close the WebSocket (normal closure), bounded.
    pub async fn close(self) {
        self.conn.close().await;
    }
}

async fn send_frame<S>(sink: &mut S, msg: &ClientMsg, timeout: Duration) -> Result<(), SignalError>
where
    S: futures_util::Sink<Message, Error = tungstenite::Error> + Unpin,
{
    let text = serde_json::to_string(msg)
        .map_err(|e| SignalError::Protocol(format!("encoding {msg:?}: {e}")))?;
    tokio::time::timeout(timeout, sink.send(Message::text(text)))
        .await
        .map_err(|_| SignalError::Timeout(timeout, "WebSocket send"))??;
    Ok(())
}

/// Whether `e` says the node could not be reached or is not serving (so another node of the
/// fleet may take the session): transport failures, timeouts, 5xx answers and 503 upgrades.
/// Whether `e` means the node could not be reached or is failing (connection refused or lost,
/// a timeout, a 5xx answer), so another node of the fleet may serve the same request.
pub fn is_unreachable(e: &SignalError) -> bool {
    unreachable(e)
}

fn unreachable(e: &SignalError) -> bool {
    match e {
        SignalError::Http { .. } | SignalError::Timeout(..) => true,
        SignalError::Api { status, .. } => *status >= 500,
        SignalError::Ws(tungstenite::Error::Http(r)) => r.status().is_server_error(),
        SignalError::Ws(tungstenite::Error::Io(_) | tungstenite::Error::ConnectionClosed) => true,
        SignalError::Ws(_) => false,
        SignalError::Closed { code, .. } => *code != 4001,
        _ => false,
    }
}

/// Read the next text frame as a [`ServerMsg`]; control frames are handled by tungstenite
/// (pongs are queued automatically), binary frames are a protocol error.
async fn read_frame<S>(ws: &mut S) -> Result<ServerMsg, SignalError>
where
    S: futures_util::Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    loop {
        let Some(frame) = ws.next().await else {
            return Err(SignalError::Closed {
                code: 1006,
                reason: "connection ended".into(),
            });
        };
        match frame? {
            Message::Text(t) => {
                return serde_json::from_str(t.as_str())
                    .map_err(|e| SignalError::Protocol(format!("bad server frame: {e}")));
            }
            Message::Close(c) => {
                let (code, reason) = c
                    .map(|c| (u16::from(c.code), c.reason.to_string()))
                    .unwrap_or((1000, String::new()));
                return Err(SignalError::Closed { code, reason });
            }
            Message::Binary(_) => {
                return Err(SignalError::Protocol("unexpected binary frame".into()));
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
    }
}

/// The address of a UDP TURN URI (`turn:host:port`, `?transport=udp` or none; IP literals or
/// `localhost` only, no DNS); `None` for TCP and TLS ones and anything else
/// ([`crate::signaling::TurnUri`] reads every transport).
pub fn parse_turn_uri(uri: &str) -> Option<std::net::SocketAddr> {
    crate::signaling::TurnUri::parse(uri)
        .filter(|u| u.transport == crate::signaling::TurnTransport::Udp)
        .map(|u| u.addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_uris() {
        let s = Duration::from_secs(1);
        for bad in [
            "ftp://x:1",
            "http://",
            "https://",
            "http://x:1/path",
            "http://x:0",
            "http://x:99999",
            "http://u@x:1",
            "https://[::1",
            "http://:80",
        ] {
            assert!(
                matches!(HttpApi::new(bad, s), Err(SignalError::BadUrl(_))),
                "{bad}"
            );
        }
        let a = HttpApi::new("http://127.0.0.1:8443/", s).unwrap();
        assert_eq!(a.base(), "http://127.0.0.1:8443");
        assert_eq!(a.ws_url("a=b"), "ws://127.0.0.1:8443/v1/ws?a=b");
        assert!(!a.is_tls());
        let a = HttpApi::new("https://localhost:8443", s).unwrap();
        assert!(a.is_tls());
        assert_eq!(a.ws_url("a=b"), "wss://localhost:8443/v1/ws?a=b");
        assert_eq!(a.connect_to, "localhost:8443");
        let a = HttpApi::new("https://[::1]", s).unwrap();
        assert_eq!(a.ws_url("a=b"), "wss://[::1]/v1/ws?a=b");
        assert_eq!(a.connect_to, "[::1]:443");
        assert_eq!(HttpApi::new("http://h", s).unwrap().connect_to, "h:80");
        assert_eq!(
            parse_turn_uri("turn:127.0.0.1:3478?transport=udp"),
            Some("127.0.0.1:3478".parse().unwrap())
        );
        assert_eq!(
            parse_turn_uri("turn:localhost:9"),
            Some("127.0.0.1:9".parse().unwrap())
        );
        assert_eq!(parse_turn_uri("turn:example.com:9"), None);
        assert_eq!(parse_turn_uri("stun:1.2.3.4:9"), None);
        assert_eq!(parse_turn_uri("turn:1.2.3.4:9?transport=tcp"), None);
        assert_eq!(parse_turn_uri("turns:1.2.3.4:443?transport=tcp"), None);
        assert!(check_device("phone-1").is_ok());
        assert!(check_device("").is_err());
        assert!(check_device("a b").is_err());
    }
}
