//! The driver of TURN allocations over TCP and TLS: one connection per relay the agent names
//! ([`StreamOp`]), each a task that connects (bound to the call's host address), does the TLS
//! handshake (rustls, the call's trust roots, ALPN `stun.turn` of RFC 7443), writes what the
//! agent queues in order and hands what it reads back to the call loop. The agent frames; this
//! only moves bytes.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::agent::{StreamOp, TurnTransport};

/// Bound on a TCP connect plus the TLS handshake (the agent's ladder moves on earlier when
/// its own step passes; this frees the task).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// ALPN protocol of TURN over TLS (RFC 7443).
pub const ALPN_TURN: &[u8] = b"stun.turn";
/// Bytes read at once.
const READ_CHUNK: usize = 16 * 1024;
/// Writes queued for one connection; beyond it (a connection that takes nothing) writes are
/// dropped, as a full UDP socket would.
const WRITE_QUEUE: usize = 256;
/// Reads queued for the call loop; beyond it a connection stops reading (TCP back-pressure).
const READ_QUEUE: usize = 64;

/// What a connection task reports.
#[derive(Debug)]
pub(super) enum StreamEvent {
    /// Bytes read.
    Data(Vec<u8>),
    /// The connection ended (or never worked), and why.
    Closed(String),
}

struct Conn {
    id: u64,
    out: mpsc::Sender<Vec<u8>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The call's stream connections to TURN servers, keyed by server address.
pub(super) struct Streams {
    conns: HashMap<SocketAddr, Conn>,
    tx: mpsc::Sender<(SocketAddr, u64, StreamEvent)>,
    rx: mpsc::Receiver<(SocketAddr, u64, StreamEvent)>,
    tls: Arc<rustls::ClientConfig>,
    bind_ip: IpAddr,
    next_id: u64,
}

impl Streams {
    /// No connections yet; TLS ones will trust `trust`'s roots.
    pub(super) fn new(bind_ip: IpAddr, trust: &peerlink_api::tls::Trust) -> Self {
        let mut tls = (**trust.config()).clone();
        tls.alpn_protocols = vec![ALPN_TURN.to_vec()];
        let (tx, rx) = mpsc::channel(READ_QUEUE);
        Streams {
            conns: HashMap::new(),
            tx,
            rx,
            tls: Arc::new(tls),
            bind_ip,
            next_id: 0,
        }
    }

    /// Carries out one operation of the agent.
    pub(super) fn apply(&mut self, op: StreamOp) {
        match op {
            StreamOp::Open { server, transport } => {
                self.next_id += 1;
                let id = self.next_id;
                let (out, queue) = mpsc::channel(WRITE_QUEUE);
                let tls = (transport == TurnTransport::Tls).then(|| self.tls.clone());
                let task = tokio::spawn(run(server, self.bind_ip, tls, queue, self.tx.clone(), id));
                // An old connection to the same server goes (its task is aborted on drop).
                self.conns.insert(server, Conn { id, out, task });
            }
            StreamOp::Write { server, bytes } => {
                if let Some(c) = self.conns.get(&server)
                    && c.out.try_send(bytes).is_err()
                {
                    tracing::debug!("TURN stream to {server} not keeping up: write dropped");
                }
            }
            StreamOp::Close { server } => {
                self.conns.remove(&server);
            }
        }
    }

    /// The next event of a current connection (pending while there is none). Cancel-safe.
    pub(super) async fn recv(&mut self) -> (SocketAddr, StreamEvent) {
        loop {
            // `self.tx` keeps the channel open: `None` never comes.
            let Some((server, id, ev)) = self.rx.recv().await else {
                std::future::pending::<()>().await;
                continue;
            };
            let current = self.conns.get(&server).is_some_and(|c| c.id == id);
            if !current {
                continue;
            }
            if matches!(ev, StreamEvent::Closed(_)) {
                self.conns.remove(&server);
            }
            return (server, ev);
        }
    }
}

/// One connection: connect, maybe TLS, then move bytes both ways until either side ends.
async fn run(
    server: SocketAddr,
    bind_ip: IpAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
    queue: mpsc::Receiver<Vec<u8>>,
    events: mpsc::Sender<(SocketAddr, u64, StreamEvent)>,
    id: u64,
) {
    let what = if tls.is_some() { "TLS" } else { "TCP" };
    let end = match tokio::time::timeout(CONNECT_TIMEOUT, connect(server, bind_ip, tls)).await {
        Err(_) => format!("{what} connect to {server} timed out"),
        Ok(Err(e)) => format!("{what} connect to {server}: {e}"),
        Ok(Ok(stream)) => {
            tracing::debug!("TURN over {what} connected to {server}");
            match pump(stream, queue, &events, server, id).await {
                Ok(()) => format!("{what} connection to {server} closed by the relay"),
                Err(e) => format!("{what} connection to {server}: {e}"),
            }
        }
    };
    tracing::debug!("{end}");
    let _ = events.send((server, id, StreamEvent::Closed(end))).await;
}

/// A TCP or TLS stream, boxed to one type.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

async fn connect(
    server: SocketAddr,
    bind_ip: IpAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> std::io::Result<Box<dyn Io>> {
    let sock = if server.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    if bind_ip.is_ipv4() == server.is_ipv4() && !bind_ip.is_unspecified() {
        sock.bind(SocketAddr::new(bind_ip, 0))?;
    }
    let tcp: TcpStream = sock.connect(server).await?;
    let _ = tcp.set_nodelay(true);
    let Some(config) = tls else {
        return Ok(Box::new(tcp));
    };
    let name = rustls::pki_types::ServerName::IpAddress(server.ip().into());
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| {
            let why = peerlink_api::tls::tls_failure(&e).unwrap_or_else(|| e.to_string());
            std::io::Error::new(e.kind(), format!("TLS handshake: {why}"))
        })?;
    Ok(Box::new(stream))
}

async fn pump(
    stream: Box<dyn Io>,
    mut queue: mpsc::Receiver<Vec<u8>>,
    events: &mpsc::Sender<(SocketAddr, u64, StreamEvent)>,
    server: SocketAddr,
    id: u64,
) -> std::io::Result<()> {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        tokio::select! {
            r = rd.read(&mut buf) => {
                let n = r?;
                if n == 0 {
                    return Ok(());
                }
                if events
                    .send((server, id, StreamEvent::Data(buf[..n].to_vec())))
                    .await
                    .is_err()
                {
                    return Ok(());
                }
            }
            b = queue.recv() => match b {
                Some(bytes) => wr.write_all(&bytes).await?,
                None => {
                    // The call closed the connection.
                    let _ = wr.shutdown().await;
                    return Ok(());
                }
            },
        }
    }
}
