//! The HTTP accept loop: like `axum::serve` (HTTP/1 and HTTP/2 with upgrades, `ConnectInfo`
//! of the peer, graceful shutdown) plus a header read timeout, so slow-header (slowloris)
//! connections are closed: hyper's own timer for HTTP/1 headers (`axum::serve` sets no timer,
//! which leaves it inert) and a first-request deadline covering the protocol sniffing before
//! it (a silent socket sends nothing hyper would time).
//!
//! [`serve_tls`] is the same over TLS (HTTPS, and WSS for the upgrades): each accepted
//! connection first completes a rustls handshake with the certificate current at accept time
//! ([`TlsStore::current`], so a SIGHUP reload reaches new connections only), bounded by its
//! own timeout; ALPN offers `h2` and `http/1.1`, and the HTTP/1.1 upgrade to a WebSocket works
//! as over plain TCP. A handshake that fails or runs out of time closes that connection alone,
//! with one debug log line and one count in `tls_handshake_failures_total`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use peerlink_cli::tls::TlsStore;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::state::AppState;

/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// How long open HTTP connections get to finish after `stop`.
const CONN_DRAIN: Duration = Duration::from_secs(5);

/// The ALPN protocols the TLS listener offers, most preferred first: HTTP/2 for API requests
/// of clients that speak it, HTTP/1.1 for everyone else and for WebSocket upgrades.
pub fn alpn() -> Vec<Vec<u8>> {
    vec![b"h2".to_vec(), b"http/1.1".to_vec()]
}

/// What [`serve_tls`] needs besides the router.
#[derive(Clone)]
pub struct TlsServing {
    /// The certificate and key (reloaded by the binary on SIGHUP).
    pub store: TlsStore,
    /// A handshake not finished within this closes the connection.
    pub handshake_timeout: Duration,
    /// The node, whose metrics count the handshakes (`tls_handshakes_total`,
    /// `tls_handshake_failures_total`).
    pub state: AppState,
}

/// Serve `router` on `listener` until `stop` fires; a client that has not sent its complete
/// request headers within `header_timeout` is disconnected.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    header_timeout: Duration,
    stop: CancellationToken,
) {
    accept_loop(listener, router, header_timeout, None, stop).await
}

/// [`serve`] over TLS: every connection starts with a handshake bounded by
/// [`TlsServing::handshake_timeout`]; the header deadline starts after it.
pub async fn serve_tls(
    listener: TcpListener,
    router: Router,
    header_timeout: Duration,
    tls: TlsServing,
    stop: CancellationToken,
) {
    accept_loop(listener, router, header_timeout, Some(tls), stop).await
}

async fn accept_loop(
    listener: TcpListener,
    router: Router,
    header_timeout: Duration,
    tls: Option<TlsServing>,
    stop: CancellationToken,
) {
    let conns = TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let router = router.clone();
        let stop = stop.clone();
        let Some(tls) = tls.clone() else {
            conns.spawn(connection(
                TokioIo::new(tcp),
                peer,
                router,
                header_timeout,
                stop,
            ));
            continue;
        };
        conns.spawn(async move {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.store.current());
            let handshake = tokio::select! {
                _ = stop.cancelled() => return,
                r = tokio::time::timeout(tls.handshake_timeout, acceptor.accept(tcp)) => r,
            };
            match handshake {
                Ok(Ok(stream)) => {
                    let m = &tls.state.metrics;
                    m.tls_handshakes_total.fetch_add(1, Ordering::Relaxed);
                    connection(TokioIo::new(stream), peer, router, header_timeout, stop).await;
                }
                Ok(Err(e)) => {
                    let m = &tls.state.metrics;
                    m.tls_handshake_failures_total.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                }
                Err(_) => {
                    let m = &tls.state.metrics;
                    m.tls_handshake_failures_total.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%peer, timeout = ?tls.handshake_timeout, "TLS handshake timed out");
                }
            }
        });
    }
    conns.close();
    let _ = tokio::time::timeout(CONN_DRAIN, conns.wait()).await;
}

/// One HTTP connection, over plain TCP or TLS, until it ends or `stop` drains it.
async fn connection<I>(
    io: TokioIo<I>,
    peer: SocketAddr,
    router: Router,
    header_timeout: Duration,
    stop: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Set by the first request. hyper's header timeout only runs once hyper-util has sniffed
    // the protocol (HTTP/1 vs the HTTP/2 preface), which waits for bytes without a deadline:
    // a silent socket, or one trickling a preface, would stay open for ever. So a connection
    // without a request after `header_timeout` is dropped here.
    let seen = Arc::new(AtomicBool::new(false));
    let seen_svc = seen.clone();
    let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        seen_svc.store(true, Ordering::Release);
        req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
        let r = router.clone();
        async move {
            Ok::<Response<Body>, Infallible>(
                r.oneshot(req.map(Body::new))
                    .await
                    .unwrap_or_else(|e| match e {}),
            )
        }
    });
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    builder.http2().timer(TokioTimer::new());
    let conn = builder.serve_connection_with_upgrades(io, svc);
    let mut conn = std::pin::pin!(conn);
    let first_request = tokio::time::sleep(header_timeout);
    let mut first_request = std::pin::pin!(first_request);
    let mut armed = true;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::trace!(error = %e, %peer, "connection ended with an error");
                }
                break;
            }
            _ = stop.cancelled() => {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(CONN_DRAIN, conn).await;
                break;
            }
            _ = &mut first_request, if armed => {
                if !seen.load(Ordering::Acquire) {
                    tracing::trace!(%peer, "no request within the header timeout");
                    break;
                }
                armed = false;
            }
        }
    }
}
