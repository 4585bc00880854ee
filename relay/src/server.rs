//! Process wiring: pick the backend, bind every socket, start workers, the metrics thread and the
//! HTTP thread, then supervise: signals (SIGTERM/SIGUSR1 drain, SIGINT stop, SIGHUP TLS
//! certificate reload), drain completion,
//! and worker death (which takes the process down with an error). With `--directory`, the
//! metrics thread also registers the relay; a drain start is announced to it at once.

use std::net::{TcpListener, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::config::{IoMode, Validated};
use crate::core::{Core, Shared, Transport};
use crate::metrics::{MetricsHub, run_metrics_thread};
use crate::registration::Registrar;
use crate::stream::{self, Streams, TlsStore};
use crate::worker::{Reservations, SocketTable, WorkerCtx};
use crate::{epoll, http, net, uring};

/// The backend a relay runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// io_uring.
    Uring,
    /// epoll.
    Epoll,
}

impl Backend {
    /// Label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Uring => "uring",
            Backend::Epoll => "epoll",
        }
    }
}

/// Why the relay could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// `--io uring` demanded but unavailable.
    #[error("--io uring was requested but io_uring is unavailable: {0}")]
    UringRequired(String),
    /// Binding a socket failed.
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        /// Which socket.
        what: &'static str,
        /// Address.
        addr: std::net::SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// Spawning a thread or blocking signals failed.
    #[error("starting: {0}")]
    Start(std::io::Error),
    /// A worker died.
    #[error("worker {index} died: {reason}")]
    WorkerDied {
        /// Worker index.
        index: usize,
        /// Error or panic message.
        reason: String,
    },
    /// The metrics thread died.
    #[error("metrics thread died: {0}")]
    MetricsDied(String),
}

/// Choose the backend for `mode`, probing io_uring. Logs exactly one line on fallback.
pub fn choose_backend(mode: IoMode) -> Result<Backend, ServerError> {
    match mode {
        IoMode::Epoll => Ok(Backend::Epoll),
        IoMode::Uring => match uring::probe() {
            Ok(()) => Ok(Backend::Uring),
            Err(e) => Err(ServerError::UringRequired(e.to_string())),
        },
        IoMode::Auto => match uring::probe() {
            Ok(()) => Ok(Backend::Uring),
            Err(e) => {
                tracing::warn!("io_uring unavailable ({e}); using the epoll backend");
                Ok(Backend::Epoll)
            }
        },
    }
}

/// How the relay ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// SIGINT.
    Interrupted,
    /// Drain finished: every allocation ended.
    Drained,
    /// Drain timeout passed with allocations left.
    DrainTimeout,
}

fn signal_set() -> nix::sys::signal::SigSet {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGUSR1);
    set.add(Signal::SIGINT);
    set.add(Signal::SIGHUP);
    set
}

/// Wait up to `timeout` for one of our signals; `None` on timeout.
fn wait_signal(set: &nix::sys::signal::SigSet, timeout: Duration) -> Option<i32> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `set` is a valid sigset, info may be null, `ts` is valid for the call.
    let sig = unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), &ts) };
    (sig > 0).then_some(sig)
}

/// Run the relay until SIGINT, or a drain (SIGTERM/SIGUSR1) completes or times out.
pub fn run(v: Validated) -> Result<Exit, ServerError> {
    let backend = choose_backend(v.config.io)?;
    // Signals are blocked before any thread exists, so every thread inherits the mask and only
    // this thread's sigtimedwait receives them.
    let sigs = signal_set();
    sigs.thread_block()
        .map_err(|e| ServerError::Start(e.into()))?;

    let cfg = &v.config;
    // SO_REUSEPORT would let a second relay (same user) silently share the port and split the
    // clients between two processes: first claim the address alone, then release it for the
    // worker group.
    drop(
        UdpSocket::bind(cfg.listen).map_err(|source| ServerError::Bind {
            what: "TURN listener (exclusive check)",
            addr: cfg.listen,
            source,
        })?,
    );
    let mut listeners: Vec<UdpSocket> = Vec::with_capacity(v.workers);
    for _ in 0..v.workers {
        let sock = net::bind_listener(cfg.listen).map_err(|source| ServerError::Bind {
            what: "TURN listener",
            addr: cfg.listen,
            source,
        })?;
        listeners.push(sock);
    }
    let mut stream_listeners = bind_stream_listeners(cfg, v.workers)?;
    let http_listener = TcpListener::bind(cfg.metrics).map_err(|source| ServerError::Bind {
        what: "metrics HTTP",
        addr: cfg.metrics,
        source,
    })?;
    let metrics_addr = http_listener.local_addr().map_err(ServerError::Start)?;
    let listen_addr = listeners
        .first()
        .and_then(|l| l.local_addr().ok())
        .unwrap_or(cfg.listen);

    let core_cfg = v.core_config(metrics_addr);
    let unix_now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let shared = Arc::new(Shared::new(Instant::now(), unix_now));
    let hub = Arc::new(MetricsHub::new(v.workers, backend.as_str()));
    let stop = Arc::new(AtomicBool::new(false));
    let (report_tx, report_rx) = crossbeam_channel::bounded(64 * v.workers.max(1));

    let metrics_hub = hub.clone();
    let log_path = cfg.histogram_log.clone();
    let (registrar, drain_notice) = match &v.directory {
        Some(d) => {
            let (r, n) = Registrar::new(d.clone(), metrics_addr, hub.clone());
            (Some(r.with_alternates(shared.clone())), Some(n))
        }
        None => (None, None),
    };
    let metrics_thread = std::thread::Builder::new()
        .name("relay-metrics".into())
        .spawn(move || run_metrics_thread(metrics_hub, report_rx, log_path, registrar))
        .map_err(ServerError::Start)?;

    let (http_stop_tx, http_stop_rx) = tokio::sync::oneshot::channel();
    let http_hub = hub.clone();
    let http_thread = std::thread::Builder::new()
        .name("relay-http".into())
        .spawn(move || {
            if let Err(e) = http::serve_blocking(http_listener, http_hub, http_stop_rx) {
                tracing::error!("metrics HTTP server failed: {e}");
            }
        })
        .map_err(ServerError::Start)?;

    let stream_total = Arc::new(AtomicUsize::new(0));
    let stream_limits = cfg.stream_limits();
    let mut workers: Vec<WorkerHandle> = Vec::new();
    let seed_base: u64 = rand::random();
    let reservations = Arc::new(Reservations::default());
    let uring_buffers = cfg.uring_buffers;
    let busy_poll = std::time::Duration::from_micros(u64::from(cfg.busy_poll_us));
    for (index, listener) in listeners.into_iter().enumerate() {
        let core = Core::new(
            core_cfg.clone(),
            shared.clone(),
            seed_base.wrapping_add(index as u64),
        );
        let table = SocketTable::new(
            &v.relay_ips,
            cfg.min_port..=cfg.max_port,
            seed_base.rotate_left(17).wrapping_add(index as u64),
        )
        .with_reservations(reservations.clone());
        let mut ctx = WorkerCtx::new(
            index,
            core,
            table,
            listener,
            report_tx.clone(),
            stop.clone(),
        );
        if let Some(mine) = stream_listeners.get_mut(index).map(std::mem::take)
            && !mine.is_empty()
        {
            let streams = Streams::new(
                index,
                mine,
                v.tls.clone(),
                stream_limits.clone(),
                stream_total.clone(),
            )
            .map_err(ServerError::Start)?;
            ctx = ctx.with_streams(streams);
        }
        let handle = std::thread::Builder::new()
            .name(format!("relay-worker-{index}"))
            .spawn(move || match backend {
                Backend::Uring => {
                    uring::run(ctx, uring_buffers, busy_poll).map_err(|e| e.to_string())
                }
                Backend::Epoll => epoll::run(ctx, busy_poll).map_err(|e| e.to_string()),
            })
            .map_err(ServerError::Start)?;
        workers.push((index, handle));
    }
    drop(report_tx);
    tracing::info!(
        listen = %listen_addr,
        metrics = %metrics_addr,
        io = backend.as_str(),
        workers = v.workers,
        relay_ips = ?v.relay_ips,
        listen_tcp = ?cfg.listen_tcp,
        listen_tls = ?cfg.listen_tls,
        ports = %format!("{}-{}", cfg.min_port, cfg.max_port),
        "peerlink-relay ready"
    );

    let mut drain_deadline: Option<Instant> = None;
    let outcome = loop {
        if let Some(sig) = wait_signal(&sigs, Duration::from_millis(100)) {
            if sig == libc::SIGINT {
                tracing::info!("SIGINT: stopping now");
                break Ok(Exit::Interrupted);
            }
            if sig == libc::SIGHUP {
                reload_tls(v.tls.as_ref());
            } else if drain_deadline.is_none() {
                let name = if sig == libc::SIGTERM {
                    "SIGTERM"
                } else {
                    "SIGUSR1"
                };
                tracing::info!(
                    allocations = shared.total_allocations(),
                    timeout_s = v.drain_timeout().as_secs(),
                    "{name}: draining (not ready; new allocations refused)"
                );
                hub.set_draining();
                shared.set_draining(true);
                if let Some(n) = &drain_notice {
                    n.drain_started();
                }
                drain_deadline = Some(Instant::now() + v.drain_timeout());
            }
        }
        if let Some(died) = reap_dead_worker(&mut workers) {
            break Err(died);
        }
        if metrics_thread.is_finished() {
            break Err(ServerError::MetricsDied("metrics thread exited".into()));
        }
        if let Some(deadline) = drain_deadline {
            if shared.total_allocations() == 0 {
                tracing::info!("drain complete: no allocations left");
                break Ok(Exit::Drained);
            }
            if Instant::now() >= deadline {
                tracing::info!(
                    allocations = shared.total_allocations(),
                    "drain timeout passed; exiting"
                );
                break Ok(Exit::DrainTimeout);
            }
        }
    };

    stop.store(true, Ordering::Relaxed);
    for (index, handle) in workers {
        match handle.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(worker = index, "worker failed while stopping: {e}"),
            Err(p) => tracing::error!(worker = index, "worker panicked: {}", panic_message(&p)),
        }
    }
    let _ = http_stop_tx.send(());
    let _ = http_thread.join();
    match metrics_thread.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            if outcome.is_ok() {
                return Err(ServerError::MetricsDied(e.to_string()));
            }
        }
        Err(p) => {
            if outcome.is_ok() {
                return Err(ServerError::MetricsDied(panic_message(&p)));
            }
        }
    }
    outcome
}

/// SIGHUP: re-read the TLS certificate and key. New handshakes use them; established
/// connections keep theirs. A failed reload keeps the previous pair.
fn reload_tls(tls: Option<&TlsStore>) {
    let Some(store) = tls else {
        tracing::info!("SIGHUP: no TLS listener, nothing to reload");
        return;
    };
    match store.reload() {
        Ok(()) => tracing::info!(
            cert = %store.cert_path().display(),
            "SIGHUP: TLS certificate reloaded; new handshakes use it"
        ),
        Err(e) => {
            tracing::warn!("SIGHUP: TLS reload failed, keeping the previous certificate: {e}")
        }
    }
}

/// Every worker's TCP/TLS listeners: for each worker, one `SO_REUSEPORT` socket per
/// `listen_tcp` and `listen_tls` address, after an exclusive bind proved no other process
/// holds the address.
fn bind_stream_listeners(
    cfg: &crate::config::Config,
    workers: usize,
) -> Result<Vec<Vec<(TcpListener, Transport)>>, ServerError> {
    let addrs: Vec<(std::net::SocketAddr, Transport)> = cfg
        .listen_tcp
        .iter()
        .map(|a| (*a, Transport::Tcp))
        .chain(cfg.listen_tls.iter().map(|a| (*a, Transport::Tls)))
        .collect();
    let mut out: Vec<Vec<(TcpListener, Transport)>> = (0..workers).map(|_| Vec::new()).collect();
    for (addr, transport) in addrs {
        let what = match transport {
            Transport::Tls => "TURN over TLS listener",
            _ => "TURN over TCP listener",
        };
        drop(TcpListener::bind(addr).map_err(|source| ServerError::Bind { what, addr, source })?);
        for mine in out.iter_mut() {
            let l = stream::bind_listener(addr).map_err(|source| ServerError::Bind {
                what,
                addr,
                source,
            })?;
            mine.push((l, transport));
        }
    }
    Ok(out)
}

/// A worker thread handle: `Err` carries the fatal error.
type WorkerHandle = (usize, JoinHandle<Result<(), String>>);

/// If a worker thread has ended (while the relay is not stopping, any end is a death: error,
/// panic, or an unexpected return), remove it, log it loudly and return the error that takes
/// the process down.
fn reap_dead_worker(workers: &mut Vec<WorkerHandle>) -> Option<ServerError> {
    let pos = workers.iter().position(|(_, h)| h.is_finished())?;
    let (index, handle) = workers.swap_remove(pos);
    let reason = match handle.join() {
        Ok(Ok(())) => "exited unexpectedly".to_string(),
        Ok(Err(e)) => e,
        Err(panic) => panic_message(&panic),
    };
    tracing::error!(
        worker = index,
        "worker died: {reason}; shutting the relay down"
    );
    Some(ServerError::WorkerDied { index, reason })
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        format!("panic: {s}")
    } else if let Some(s) = p.downcast_ref::<String>() {
        format!("panic: {s}")
    } else {
        "panic".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait_finished(workers: &[WorkerHandle]) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !workers.iter().any(|(_, h)| h.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_panicking_or_failing_worker_is_reported() {
        let alive = Arc::new(AtomicBool::new(true));
        let a2 = alive.clone();
        let mut workers: Vec<WorkerHandle> = vec![
            (
                0,
                std::thread::spawn(move || {
                    while a2.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Ok(())
                }),
            ),
            (1, std::thread::spawn(|| panic!("boom"))),
        ];
        wait_finished(&workers);
        match reap_dead_worker(&mut workers) {
            Some(ServerError::WorkerDied { index: 1, reason }) => assert!(reason.contains("boom")),
            other => panic!("expected worker 1 death, got {other:?}"),
        }
        assert!(
            reap_dead_worker(&mut workers).is_none(),
            "healthy worker is not reaped"
        );
        workers.push((2, std::thread::spawn(|| Err("ring broke".to_string()))));
        wait_finished(&workers);
        match reap_dead_worker(&mut workers) {
            Some(ServerError::WorkerDied { index: 2, reason }) => assert_eq!(reason, "ring broke"),
            other => panic!("expected worker 2 death, got {other:?}"),
        }
        alive.store(false, Ordering::Relaxed);
    }
}
