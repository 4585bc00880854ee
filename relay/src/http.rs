//! The metrics/health HTTP server (off the hot path: a small tokio runtime on its own thread).
//!
//! `/metrics` Prometheus text, `/stats` JSON percentiles and counters, `/healthz` liveness,
//! `/readyz` readiness (503 while draining).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json};
use axum::routing::get;

use crate::metrics::MetricsHub;

/// The router (build once, serve anywhere; tested with `oneshot`).
pub fn app(hub: Arc<MetricsHub>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/stats", get(stats))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(hub)
}

async fn metrics(State(hub): State<Arc<MetricsHub>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        hub.prometheus(),
    )
}

async fn stats(State(hub): State<Arc<MetricsHub>>) -> impl IntoResponse {
    Json(hub.stats())
}

async fn readyz(State(hub): State<Arc<MetricsHub>>) -> impl IntoResponse {
    if hub.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    }
}

/// Serve `app(hub)` on `listener` until `shutdown` resolves (runs its own current-thread runtime;
/// call on a dedicated thread).
pub fn serve_blocking(
    listener: std::net::TcpListener,
    hub: Arc<MetricsHub>,
    shutdown: tokio::sync::oneshot::Receiver<()>,
) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        axum::serve(listener, app(hub))
            .with_graceful_shutdown(async move {
                let _ = shutdown.await;
            })
            .await
    })
}
