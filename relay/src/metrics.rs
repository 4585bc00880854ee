//! Metrics off the hot path: workers keep plain counters, the fixed buckets of the forwarding
//! latency histogram ([`ForwardLatency`]) and an interval HdrHistogram of the same latency, and
//! once a second send a [`WorkerReport`] over a crossbeam channel. The
//! metrics thread ([`run_metrics_thread`]) merges them into a [`MetricsHub`], which the HTTP
//! server renders as Prometheus text ([`MetricsHub::prometheus`]) and JSON ([`MetricsHub::stats`]),
//! and optionally appends each merged interval to an HdrHistogram interval log (V2, deflate).
//! The metrics thread also owns a current-thread tokio runtime that drives the directory
//! registration ([`crate::registration`]) while it sleeps between merges.
//!
//! No per-user labels; every metric has HELP/TYPE lines and its unit in the name.

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, TryRecvError};
use hdrhistogram::Histogram;
use hdrhistogram::serialization::V2DeflateSerializer;
use hdrhistogram::serialization::interval_log::IntervalLogWriterBuilder;
use serde::Serialize;

use peerlink_api::fleet_stats::{LatencyHistogram, RelayStatsSnapshot};
pub use peerlink_api::relay::{Percentiles, Stats};
use peerlink_cli::metrics::Exposition;

use crate::core::{CoreCounters, DropReason, ERROR_CODES, Transport};
use crate::registration::Registrar;
use crate::stream::StreamCounters;
use crate::stream::conn::CloseReason;

/// Highest latency the histograms track (µs): 60 s; larger values saturate.
pub const LATENCY_MAX_US: u64 = 60_000_000;
/// Significant figures of the latency histograms (3 = 0.1 % resolution).
pub const LATENCY_SIGFIG: u8 = 3;
/// Upper bounds of the buckets of `peerlink_relay_forward_latency_seconds` (plus `+Inf`), in
/// nanoseconds (what the worker counts in) and in seconds (what the exposition says). Dense
/// between 10 and 500 µs, where a healthy relay's forwarding latency lies; the coarse tail tells
/// a stalled worker (milliseconds) from a descheduled one (tens of milliseconds and more).
pub const FORWARD_LATENCY_BUCKETS: [(u64, f64); 13] = [
    (5_000, 5e-6),
    (10_000, 1e-5),
    (25_000, 2.5e-5),
    (50_000, 5e-5),
    (75_000, 7.5e-5),
    (100_000, 1e-4),
    (150_000, 1.5e-4),
    (250_000, 2.5e-4),
    (500_000, 5e-4),
    (1_000_000, 1e-3),
    (2_500_000, 2.5e-3),
    (10_000_000, 1e-2),
    (100_000_000, 1e-1),
];
/// Slots of [`ForwardLatency::counts`]: one per bucket plus the one above the last bound.
pub const FORWARD_LATENCY_SLOTS: usize = FORWARD_LATENCY_BUCKETS.len() + 1;
/// How often workers report and the metrics thread merges.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// How often the metrics thread takes reports off the channel (hub figures lag at most this).
pub const MERGE_TICK: Duration = Duration::from_millis(100);

/// A fresh latency histogram (µs).
pub fn new_latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_US, LATENCY_SIGFIG)
        .expect("constant bounds 1..60e6 with 3 significant figures are valid")
}

/// Socket a datagram arrived on / left from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketKind {
    /// The TURN listener (client side).
    Listener = 0,
    /// A relayed socket (peer side).
    Relayed = 1,
}

/// Direction of a forwarded (zero-copy) datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Client -> peer (received on the listener, sent from a relayed socket).
    ClientToPeer = 0,
    /// Peer -> client (received on a relayed socket, sent from the listener).
    PeerToClient = 1,
    /// Client -> client short-circuited inside one worker (listener to listener).
    ClientToClient = 2,
}

impl Direction {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::ClientToPeer => "client_to_peer",
            Direction::PeerToClient => "peer_to_client",
            Direction::ClientToClient => "client_to_client",
        }
    }
    /// All directions in index order.
    pub const ALL: [Direction; 3] = [
        Direction::ClientToPeer,
        Direction::PeerToClient,
        Direction::ClientToClient,
    ];
}

/// The forwarding latency histogram of one worker (or merged): plain counters per fixed bucket,
/// cumulative since start. Recording is a binary search over 13 bounds and two additions: no
/// allocation, no lock, no atomic.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ForwardLatency {
    /// Samples per bucket alone (not cumulative): slot `i` counts samples above bound `i - 1`
    /// and at most bound `i` of [`FORWARD_LATENCY_BUCKETS`]; the last slot counts those above
    /// every bound.
    pub counts: [u64; FORWARD_LATENCY_SLOTS],
    /// Sum of the samples, nanoseconds.
    pub sum_ns: u64,
}

impl ForwardLatency {
    /// Count one sample of `ns` nanoseconds.
    #[inline]
    pub fn record(&mut self, ns: u64) {
        // Prometheus buckets are `le`: a sample equal to a bound belongs to that bound's bucket.
        let slot = FORWARD_LATENCY_BUCKETS.partition_point(|&(bound, _)| bound < ns);
        if let Some(c) = self.counts.get_mut(slot) {
            *c += 1;
        }
        self.sum_ns = self.sum_ns.saturating_add(ns);
    }

    /// Samples counted.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    fn add(&mut self, o: &ForwardLatency) {
        for (a, b) in self.counts.iter_mut().zip(&o.counts) {
            *a += b;
        }
        self.sum_ns = self.sum_ns.saturating_add(o.sum_ns);
    }

    /// Add to `e` as the histogram `forward_latency_seconds` (bounds in seconds, the `+Inf`
    /// bucket being the count, the sum in seconds).
    fn expose(&self, e: &mut Exposition) {
        let buckets = FORWARD_LATENCY_BUCKETS
            .iter()
            .zip(&self.counts)
            .map(|(&(_, seconds), &n)| (seconds, n))
            .collect();
        e.histogram(
            "forward_latency_seconds",
            "Time a forwarded UDP datagram spends inside the relay: kernel receive timestamp to \
             send submission, in seconds.",
            self.sum_ns as f64 / 1e9,
            self.count(),
            buckets,
        );
    }
}

/// Per-worker I/O counters (plain u64, cumulative since the worker started).
#[derive(Clone, Debug, Default, Serialize)]
pub struct IoCounters {
    /// Datagrams received, by [`SocketKind`].
    pub rx_packets: [u64; 2],
    /// Bytes received, by [`SocketKind`].
    pub rx_bytes: [u64; 2],
    /// Datagrams forwarded (send completed), by [`Direction`].
    pub fwd_packets: [u64; 3],
    /// Bytes forwarded (send completed), by [`Direction`].
    pub fwd_bytes: [u64; 3],
    /// STUN replies / Data indications sent.
    pub reply_packets: u64,
    /// Bytes of replies sent.
    pub reply_bytes: u64,
    /// Datagrams dropped, by [`DropReason::index`] (what the core returned plus io's truncation).
    pub drops: Vec<u64>,
    /// Sends that failed (packet dropped, allocation kept).
    pub send_errors: u64,
    /// Receive completions with an error other than ENOBUFS.
    pub recv_errors: u64,
    /// Receives that found the buffer ring empty (ENOBUFS) and were re-armed.
    pub enobufs: u64,
    /// Times the completion queue overflowed (back-pressure applied).
    pub cq_overflow: u64,
    /// Forwards dropped because the submission queue stayed full (completion back-pressure).
    pub sq_full_drops: u64,
    /// Multishot receives re-armed after a completion without MORE.
    pub rearms: u64,
    /// Busy polls started (`--busy-poll-us`): wake-ups after which the worker polled instead
    /// of sleeping at once.
    pub busy_polls: u64,
    /// Busy polls that found new datagrams before their budget ran out (a sleep and wake-up
    /// saved).
    pub busy_poll_hits: u64,
    /// Datagrams the kernel dropped on our sockets' full receive buffers (SO_RXQ_OVFL).
    pub kernel_rx_drops: u64,
    /// Relayed sockets that could not be opened (no port, socket error).
    pub relay_open_failures: u64,
    /// Forwarding latency of the datagrams forwarded over UDP.
    pub forward_latency: ForwardLatency,
    /// Relayed sockets open now.
    pub relayed_sockets: u64,
    /// Messages received from clients (datagrams on the listener, frames of streams), by
    /// [`Transport::index`]. The stream slots of this and the three below are filled from
    /// `streams` at report time.
    pub client_rx_packets: [u64; 3],
    /// Bytes of those messages.
    pub client_rx_bytes: [u64; 3],
    /// Messages sent to clients (responses, Data indications, ChannelData), by transport.
    pub client_tx_packets: [u64; 3],
    /// Bytes of those messages.
    pub client_tx_bytes: [u64; 3],
    /// TCP/TLS connection counters.
    pub streams: StreamCounters,
}

impl IoCounters {
    /// Zeroed counters with the drop array sized for every reason.
    pub fn new() -> Self {
        Self {
            drops: vec![0; DropReason::COUNT],
            ..Default::default()
        }
    }

    /// A datagram of `bytes` forwarded in direction `d` over UDP (towards a peer, or towards a
    /// UDP client from the listener).
    #[inline]
    pub fn forwarded(&mut self, d: Direction, bytes: usize) {
        self.fwd_packets[d as usize] += 1;
        self.fwd_bytes[d as usize] += bytes as u64;
        if d != Direction::ClientToPeer {
            self.client_tx(Transport::Udp, bytes);
        }
    }

    /// A message of `bytes` sent to a client over `t`.
    #[inline]
    pub fn client_tx(&mut self, t: Transport, bytes: usize) {
        self.client_tx_packets[t.index()] += 1;
        self.client_tx_bytes[t.index()] += bytes as u64;
    }

    fn add(&mut self, o: &IoCounters) {
        for i in 0..2 {
            self.rx_packets[i] += o.rx_packets[i];
            self.rx_bytes[i] += o.rx_bytes[i];
        }
        for i in 0..3 {
            self.fwd_packets[i] += o.fwd_packets[i];
            self.fwd_bytes[i] += o.fwd_bytes[i];
        }
        self.reply_packets += o.reply_packets;
        self.reply_bytes += o.reply_bytes;
        if self.drops.len() < o.drops.len() {
            self.drops.resize(o.drops.len(), 0);
        }
        for (a, b) in self.drops.iter_mut().zip(&o.drops) {
            *a += b;
        }
        self.send_errors += o.send_errors;
        self.recv_errors += o.recv_errors;
        self.enobufs += o.enobufs;
        self.cq_overflow += o.cq_overflow;
        self.rearms += o.rearms;
        self.busy_polls += o.busy_polls;
        self.busy_poll_hits += o.busy_poll_hits;
        self.sq_full_drops += o.sq_full_drops;
        self.kernel_rx_drops += o.kernel_rx_drops;
        self.relay_open_failures += o.relay_open_failures;
        self.forward_latency.add(&o.forward_latency);
        self.relayed_sockets += o.relayed_sockets;
        for t in 0..3 {
            self.client_rx_packets[t] += o.client_rx_packets[t];
            self.client_rx_bytes[t] += o.client_rx_bytes[t];
            self.client_tx_packets[t] += o.client_tx_packets[t];
            self.client_tx_bytes[t] += o.client_tx_bytes[t];
        }
        self.streams.add(&o.streams);
    }
}

/// What a worker sends to the metrics thread once a second.
pub struct WorkerReport {
    /// Worker index.
    pub worker: usize,
    /// Latency recorded since the previous report (the worker resets its own).
    pub interval: Histogram<u64>,
    /// Cumulative io counters.
    pub io: IoCounters,
    /// Cumulative core counters.
    pub core: CoreCounters,
    /// Live allocations on this worker.
    pub allocations: usize,
}

/// Merged state, updated by the metrics thread, read by HTTP handlers.
struct MergedState {
    io: Vec<IoCounters>,
    core: Vec<CoreCounters>,
    allocations: Vec<usize>,
    total: Histogram<u64>,
    last_interval: Histogram<u64>,
}

/// Shared metrics state: readiness flags plus the merged counters and histograms.
pub struct MetricsHub {
    started: Instant,
    workers: usize,
    io_backend: &'static str,
    draining: AtomicBool,
    state: Mutex<MergedState>,
}

impl MetricsHub {
    /// A hub for `workers` workers running the `io_backend` backend.
    pub fn new(workers: usize, io_backend: &'static str) -> Self {
        Self {
            started: Instant::now(),
            workers,
            io_backend,
            draining: AtomicBool::new(false),
            state: Mutex::new(MergedState {
                io: vec![IoCounters::new(); workers],
                core: vec![CoreCounters::default(); workers],
                allocations: vec![0; workers],
                total: new_latency_histogram(),
                last_interval: new_latency_histogram(),
            }),
        }
    }

    /// Mark draining (readiness false).
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Ready = not draining.
    pub fn is_ready(&self) -> bool {
        !self.draining.load(Ordering::Relaxed)
    }

    /// Live allocations over all workers as last reported.
    pub fn allocations(&self) -> usize {
        self.lock().allocations.iter().sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MergedState> {
        // A panic while holding this lock would already have taken the process down; recover
        // the data rather than poisoning every later scrape.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fold one worker report in (counters replace, interval histogram accumulates into
    /// `pending` and the since-start histogram).
    fn apply(&self, report: WorkerReport, pending: &mut Histogram<u64>) {
        let mut st = self.lock();
        let w = report.worker;
        if w < st.io.len() {
            st.io[w] = report.io;
            st.core[w] = report.core;
            st.allocations[w] = report.allocations;
        }
        let _ = st.total.add(&report.interval);
        let _ = pending.add(&report.interval);
    }

    fn set_interval(&self, h: &Histogram<u64>) {
        let mut st = self.lock();
        st.last_interval.reset();
        let _ = st.last_interval.add(h);
    }

    fn merged(
        &self,
    ) -> (
        IoCounters,
        CoreCounters,
        u64,
        Histogram<u64>,
        Histogram<u64>,
    ) {
        let st = self.lock();
        let mut io = IoCounters::new();
        for w in &st.io {
            io.add(w);
        }
        let core = sum_core(&st.core);
        // Drops are counted where they are decided: the core's plus io's own (truncation, ...).
        for (a, b) in io.drops.iter_mut().zip(core.drops.iter()) {
            *a += b;
        }
        let allocs = st.allocations.iter().sum::<usize>() as u64;
        (io, core, allocs, st.total.clone(), st.last_interval.clone())
    }

    /// Flat counter list (name without prefix, value) shared by `/stats` and tests.
    fn counter_list(io: &IoCounters, core: &CoreCounters) -> Vec<(String, u64)> {
        let mut v = Vec::new();
        for d in Direction::ALL {
            v.push((
                format!("forwarded_packets_{}", d.as_str()),
                io.fwd_packets[d as usize],
            ));
            v.push((
                format!("forwarded_bytes_{}", d.as_str()),
                io.fwd_bytes[d as usize],
            ));
        }
        v.push(("received_packets_listener".into(), io.rx_packets[0]));
        v.push(("received_packets_relayed".into(), io.rx_packets[1]));
        v.push(("received_bytes_listener".into(), io.rx_bytes[0]));
        v.push(("received_bytes_relayed".into(), io.rx_bytes[1]));
        v.push(("reply_packets".into(), io.reply_packets));
        v.push(("reply_bytes".into(), io.reply_bytes));
        for r in DropReason::ALL {
            v.push((
                format!("dropped_{}", r.as_str()),
                io.drops.get(r.index()).copied().unwrap_or(0),
            ));
        }
        v.push(("send_errors".into(), io.send_errors));
        v.push(("recv_errors".into(), io.recv_errors));
        v.push(("enobufs".into(), io.enobufs));
        v.push(("cq_overflow".into(), io.cq_overflow));
        v.push(("rearms".into(), io.rearms));
        v.push(("busy_polls".into(), io.busy_polls));
        v.push(("busy_poll_hits".into(), io.busy_poll_hits));
        v.push(("sq_full_drops".into(), io.sq_full_drops));
        v.push(("kernel_rx_drops".into(), io.kernel_rx_drops));
        v.push(("relay_open_failures".into(), io.relay_open_failures));
        v.push(("relayed_sockets".into(), io.relayed_sockets));
        v.push(("allocations_created".into(), core.allocations_created));
        v.push(("allocations_expired".into(), core.allocations_expired));
        v.push(("allocations_deleted".into(), core.allocations_deleted));
        v.push(("allocations_closed".into(), core.allocations_closed));
        v.push(("ports_reserved".into(), core.ports_reserved));
        v.push(("reservations_claimed".into(), core.reservations_claimed));
        v.push(("allocations_redirected".into(), core.redirected));
        for t in Transport::ALL {
            let i = t.index();
            let n = t.as_str();
            v.push((
                format!("allocations_active_{n}"),
                core.allocations_active_by[i],
            ));
            v.push((
                format!("allocations_created_{n}"),
                core.allocations_created_by[i],
            ));
            v.push((
                format!("client_received_packets_{n}"),
                io.client_rx_packets[i],
            ));
            v.push((format!("client_received_bytes_{n}"), io.client_rx_bytes[i]));
            v.push((format!("client_sent_packets_{n}"), io.client_tx_packets[i]));
            v.push((format!("client_sent_bytes_{n}"), io.client_tx_bytes[i]));
        }
        let st = &io.streams;
        for t in [Transport::Tcp, Transport::Tls] {
            let i = t.index();
            let n = t.as_str();
            v.push((format!("stream_connections_{n}"), st.active[i]));
            v.push((format!("stream_accepted_{n}"), st.accepted[i]));
            v.push((format!("stream_refused_{n}"), st.refused[i]));
            for r in CloseReason::ALL {
                v.push((
                    format!("stream_closed_{n}_{}", r.as_str()),
                    st.closed[i][r.index()],
                ));
            }
        }
        v.push(("tls_handshakes".into(), st.handshakes));
        v.push(("auth_failures".into(), core.auth_failures));
        v.push(("stale_nonces".into(), core.stale_nonces));
        v
    }

    /// The `/stats` document.
    pub fn stats(&self) -> Stats {
        let (io, core, allocs, total, interval) = self.merged();
        Stats {
            uptime_s: self.started.elapsed().as_secs_f64(),
            draining: !self.is_ready(),
            workers: self.workers,
            io: self.io_backend.to_string(),
            latency_interval_us: Percentiles::of(&interval),
            latency_total_us: Percentiles::of(&total),
            allocations_active: allocs,
            counters: Self::counter_list(&io, &core).into_iter().collect(),
        }
    }

    /// The stats snapshot sent with directory heartbeats: cumulative counters and the
    /// since-start latency distribution in the shared bucketing of
    /// `peerlink_api::fleet_stats` (bounded: at most one entry per bucket in 1 µs..60 s).
    pub fn snapshot(&self) -> RelayStatsSnapshot {
        let (io, core, _, total, _) = self.merged();
        let latency_us = LatencyHistogram::from_values(
            total
                .iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value())),
        );
        RelayStatsSnapshot {
            uptime_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            packets_forwarded: io.fwd_packets.iter().sum(),
            bytes_forwarded: io.fwd_bytes.iter().sum(),
            auth_failures: core.auth_failures,
            allocations_created: core.allocations_created,
            latency_us,
        }
    }

    /// Prometheus text exposition (format 0.0.4).
    pub fn prometheus(&self) -> String {
        let (io, core, allocs, _, _) = self.merged();
        let dir = |a: &[u64; 3]| -> Vec<(String, u64)> {
            Direction::ALL
                .iter()
                .map(|d| (d.as_str().to_owned(), a[*d as usize]))
                .collect()
        };
        let sock = |a: &[u64; 2]| -> Vec<(String, u64)> {
            vec![("listener".into(), a[0]), ("relayed".into(), a[1])]
        };
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let mut e = Exposition::new();
        e.counters(
            "forwarded_packets_total",
            "Datagrams relayed, by direction.",
            "direction",
            dir(&io.fwd_packets),
        );
        e.counters(
            "forwarded_bytes_total",
            "Bytes relayed (datagram payload as sent), by direction.",
            "direction",
            dir(&io.fwd_bytes),
        );
        e.counters(
            "received_packets_total",
            "Datagrams received, by socket kind.",
            "socket",
            sock(&io.rx_packets),
        );
        e.counters(
            "received_bytes_total",
            "Bytes received, by socket kind.",
            "socket",
            sock(&io.rx_bytes),
        );
        e.counter(
            "reply_packets_total",
            "STUN responses and Data indications sent.",
            io.reply_packets,
        );
        e.counter(
            "reply_bytes_total",
            "Bytes of STUN responses and Data indications sent.",
            io.reply_bytes,
        );
        let drops: Vec<(String, u64)> = DropReason::ALL
            .iter()
            .map(|r| {
                (
                    r.as_str().to_owned(),
                    io.drops.get(r.index()).copied().unwrap_or(0),
                )
            })
            .collect();
        e.counters(
            "dropped_packets_total",
            "Datagrams dropped without a reply, by reason.",
            "reason",
            drops,
        );
        e.counter(
            "send_errors_total",
            "Sends that failed (packet dropped, allocation kept).",
            io.send_errors,
        );
        e.counter(
            "receive_errors_total",
            "Receive completions with an error other than ENOBUFS.",
            io.recv_errors,
        );
        e.counter("buffer_ring_empty_total", "Receives that found the provided-buffer ring empty (ENOBUFS); replenished and re-armed.", io.enobufs);
        e.counter(
            "completion_queue_overflow_total",
            "io_uring completion queue overflows (back-pressure applied).",
            io.cq_overflow,
        );
        e.counter("submission_queue_full_drops_total", "Forwards dropped because the submission queue stayed full under completion back-pressure.", io.sq_full_drops);
        e.counter(
            "busy_polls_total",
            "Busy polls started after a wake-up that handled datagrams (--busy-poll-us).",
            io.busy_polls,
        );
        e.counter(
            "busy_poll_hits_total",
            "Busy polls that found new datagrams before their budget ran out.",
            io.busy_poll_hits,
        );
        e.counter(
            "multishot_rearms_total",
            "Multishot receives re-armed after ending without MORE.",
            io.rearms,
        );
        e.counter(
            "kernel_receive_buffer_drops_total",
            "Datagrams the kernel dropped on full socket receive buffers (SO_RXQ_OVFL).",
            io.kernel_rx_drops,
        );
        e.counter(
            "relay_socket_open_failures_total",
            "Relayed sockets that could not be opened.",
            io.relay_open_failures,
        );
        e.gauge(
            "relayed_sockets",
            "Relayed sockets open.",
            gauge(io.relayed_sockets),
        );
        e.gauge("allocations_active", "Allocations alive.", gauge(allocs));
        e.counter(
            "allocations_created_total",
            "Allocations created.",
            core.allocations_created,
        );
        e.counter(
            "allocations_expired_total",
            "Allocations freed because their lifetime ran out.",
            core.allocations_expired,
        );
        e.counter(
            "allocations_deleted_total",
            "Allocations freed by Refresh with LIFETIME 0.",
            core.allocations_deleted,
        );
        e.counter(
            "allocations_closed_total",
            "Allocations freed because their TCP or TLS connection closed.",
            core.allocations_closed,
        );
        e.counter(
            "ports_reserved_total",
            "Ports held for a RESERVATION-TOKEN (EVEN-PORT with the R bit).",
            core.ports_reserved,
        );
        e.counter(
            "reservations_claimed_total",
            "Allocations made on a port reserved by an earlier EVEN-PORT.",
            core.reservations_claimed,
        );
        e.counter(
            "allocations_redirected_total",
            "Allocate requests answered 300 Try Alternate with another relay (draining or full).",
            core.redirected,
        );
        let by_transport = |a: &[u64; 3]| -> Vec<(String, u64)> {
            Transport::ALL
                .iter()
                .map(|t| (t.as_str().to_owned(), a[t.index()]))
                .collect()
        };
        let streams_only = |a: &[u64; 3]| -> Vec<(String, u64)> {
            [Transport::Tcp, Transport::Tls]
                .iter()
                .map(|t| (t.as_str().to_owned(), a[t.index()]))
                .collect()
        };
        e.counters(
            "allocations_by_transport_created_total",
            "Allocations created, by client transport.",
            "transport",
            by_transport(&core.allocations_created_by),
        );
        e.gauges(
            "allocations_active_by_transport",
            "Allocations alive, by client transport.",
            "transport",
            by_transport(&core.allocations_active_by)
                .into_iter()
                .map(|(t, n)| (t, gauge(n))),
        );
        e.counters(
            "client_received_packets_total",
            "Messages received from clients (datagrams, stream frames), by client transport.",
            "transport",
            by_transport(&io.client_rx_packets),
        );
        e.counters(
            "client_received_bytes_total",
            "Bytes of messages received from clients, by client transport.",
            "transport",
            by_transport(&io.client_rx_bytes),
        );
        e.counters(
            "client_sent_packets_total",
            "Messages sent to clients (responses, Data indications, ChannelData), by client transport.",
            "transport",
            by_transport(&io.client_tx_packets),
        );
        e.counters(
            "client_sent_bytes_total",
            "Bytes of messages sent to clients, by client transport.",
            "transport",
            by_transport(&io.client_tx_bytes),
        );
        let st = &io.streams;
        e.gauges(
            "stream_connections",
            "TCP and TLS client connections open, by transport.",
            "transport",
            streams_only(&st.active)
                .into_iter()
                .map(|(t, n)| (t, gauge(n))),
        );
        e.counters(
            "stream_connections_accepted_total",
            "TCP and TLS client connections accepted, by transport.",
            "transport",
            streams_only(&st.accepted),
        );
        e.counters(
            "stream_connections_refused_total",
            "TCP and TLS client connections closed at once over the connection limit.",
            "transport",
            streams_only(&st.refused),
        );
        let closed = [Transport::Tcp, Transport::Tls].into_iter().flat_map(|t| {
            CloseReason::ALL.iter().map(move |r| {
                (
                    vec![t.as_str().to_owned(), r.as_str().to_owned()],
                    st.closed[t.index()][r.index()],
                )
            })
        });
        e.counters_by(
            "stream_connections_closed_total",
            "TCP and TLS client connections closed, by transport and reason.",
            &["transport", "reason"],
            closed,
        );
        e.counter(
            "tls_handshakes_total",
            "TLS handshakes completed.",
            st.handshakes,
        );
        e.counter(
            "auth_failures_total",
            "Requests rejected for bad credentials (401 after credentials were presented).",
            core.auth_failures,
        );
        e.counter(
            "stale_nonces_total",
            "Requests answered 438 (stale, forged or other-address nonce).",
            core.stale_nonces,
        );
        let reqs = vec![
            ("binding".to_string(), core.req_binding),
            ("allocate".to_string(), core.req_allocate),
            ("refresh".to_string(), core.req_refresh),
            ("create_permission".to_string(), core.req_create_permission),
            ("channel_bind".to_string(), core.req_channel_bind),
            ("send_indication".to_string(), core.ind_send),
            ("other".to_string(), core.req_other),
        ];
        e.counters(
            "requests_total",
            "STUN/TURN requests and indications received, by method.",
            "method",
            reqs,
        );
        let mut resps = vec![("success".to_string(), core.resp_success)];
        for (i, code) in ERROR_CODES.iter().enumerate() {
            let label = if *code == 0 {
                "other".to_string()
            } else {
                code.to_string()
            };
            resps.push((label, core.resp_error.get(i).copied().unwrap_or(0)));
        }
        e.counters(
            "responses_total",
            "STUN responses sent, by result (success or error code).",
            "code",
            resps,
        );
        // The forwarding latency histogram, cumulative since start.
        io.forward_latency.expose(&mut e);
        e.gauge("workers", "Worker threads.", gauge(self.workers as u64));
        e.gauge(
            "draining",
            "1 while draining (not ready).",
            gauge(u64::from(!self.is_ready())),
        );
        e.render("peerlink_relay")
    }
}

fn sum_core(all: &[CoreCounters]) -> CoreCounters {
    let mut t = CoreCounters::default();
    for c in all {
        t.req_binding += c.req_binding;
        t.req_allocate += c.req_allocate;
        t.req_refresh += c.req_refresh;
        t.req_create_permission += c.req_create_permission;
        t.req_channel_bind += c.req_channel_bind;
        t.ind_send += c.ind_send;
        t.req_other += c.req_other;
        t.resp_success += c.resp_success;
        for (a, b) in t.resp_error.iter_mut().zip(c.resp_error.iter()) {
            *a += b;
        }
        t.allocations_created += c.allocations_created;
        t.allocations_expired += c.allocations_expired;
        t.allocations_deleted += c.allocations_deleted;
        t.allocations_closed += c.allocations_closed;
        for i in 0..3 {
            t.allocations_created_by[i] += c.allocations_created_by[i];
            t.allocations_active_by[i] += c.allocations_active_by[i];
        }
        for (a, b) in t.drops.iter_mut().zip(c.drops.iter()) {
            *a += b;
        }
        t.auth_failures += c.auth_failures;
        t.stale_nonces += c.stale_nonces;
        t.packets_client_to_peer += c.packets_client_to_peer;
        t.bytes_client_to_peer += c.bytes_client_to_peer;
        t.packets_peer_to_client += c.packets_peer_to_client;
        t.bytes_peer_to_client += c.bytes_peer_to_client;
        t.short_circuited += c.short_circuited;
        t.ports_reserved += c.ports_reserved;
        t.reservations_claimed += c.reservations_claimed;
        t.redirected += c.redirected;
    }
    t
}

/// Errors of the metrics thread.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The thread's tokio runtime (timers, directory registration) could not be built.
    #[error("metrics thread runtime: {0}")]
    Runtime(std::io::Error),
    /// The histogram log file could not be created or written.
    #[error("histogram log {path}: {source}")]
    Log {
        /// Log path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// Run the metrics thread: merge reports into `hub` every [`REPORT_INTERVAL`], append each merged
/// interval to `histogram_log` if given, and drive `registrar` (directory registration) on this
/// thread's current-thread tokio runtime. Returns when every sender is gone, after the
/// registration deregistered (bounded).
pub fn run_metrics_thread(
    hub: Arc<MetricsHub>,
    rx: Receiver<WorkerReport>,
    histogram_log: Option<PathBuf>,
    registrar: Option<Registrar>,
) -> Result<(), MetricsError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(MetricsError::Runtime)?;
    let registration = registrar.map(|r| rt.block_on(async { r.start() }));
    let merged = merge_loop(&rt, &hub, &rx, histogram_log);
    if let Some(r) = registration {
        rt.block_on(r.shutdown());
    }
    merged
}

/// The merge loop. Reports are taken off the channel every [`MERGE_TICK`]; between ticks the
/// thread sleeps inside `rt`, which is what drives the runtime's tasks (the registration).
fn merge_loop(
    rt: &tokio::runtime::Runtime,
    hub: &MetricsHub,
    rx: &Receiver<WorkerReport>,
    histogram_log: Option<PathBuf>,
) -> Result<(), MetricsError> {
    let start_wall = SystemTime::now();
    let start = Instant::now();
    let mut file = match &histogram_log {
        // Unbuffered: one interval line a second, visible to readers as soon as it is written.
        Some(path) => Some(File::create(path).map_err(|source| MetricsError::Log {
            path: path.clone(),
            source,
        })?),
        None => None,
    };
    let mut serializer = V2DeflateSerializer::new();
    let log_err = |e: std::io::Error| MetricsError::Log {
        path: histogram_log.clone().unwrap_or_default(),
        source: e,
    };
    let mut writer = match file.as_mut() {
        Some(f) => Some(
            IntervalLogWriterBuilder::new()
                .add_comment("peerlink-relay in-relay latency, microseconds")
                .with_start_time(start_wall)
                .with_base_time(start_wall)
                .begin_log_with(f, &mut serializer)
                .map_err(log_err)?,
        ),
        None => None,
    };
    let mut pending = new_latency_histogram();
    let mut interval_start = Instant::now();
    let mut finished = false;
    while !finished {
        let deadline = interval_start + REPORT_INTERVAL;
        let wake = deadline.min(Instant::now() + MERGE_TICK);
        rt.block_on(async move { tokio::time::sleep_until(wake.into()).await });
        loop {
            match rx.try_recv() {
                Ok(report) => hub.apply(report, &mut pending),
                Err(TryRecvError::Empty) => break,
                // Workers gone: close the last (partial) interval below, then stop.
                Err(TryRecvError::Disconnected) => {
                    finished = true;
                    break;
                }
            }
        }
        if !finished && Instant::now() < deadline {
            continue;
        }
        let now = Instant::now();
        hub.set_interval(&pending);
        if let Some(w) = writer.as_mut() {
            let begin = interval_start.duration_since(start);
            let dur = now.duration_since(interval_start);
            w.write_histogram(&pending, begin, dur, None)
                .map_err(|e| match e {
                    hdrhistogram::serialization::interval_log::IntervalLogWriterError::IoError(
                        e,
                    ) => log_err(e),
                    other => log_err(std::io::Error::other(format!("{other:?}"))),
                })?;
        }
        pending.reset();
        interval_start = now;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_and_stats_reflect_reports() {
        let hub = Arc::new(MetricsHub::new(2, "uring"));
        let mut pending = new_latency_histogram();
        for w in 0..2 {
            let mut io = IoCounters::new();
            io.fwd_packets[Direction::ClientToPeer as usize] = 10;
            io.drops[DropReason::NoPermission.index()] = 1;
            let mut h = new_latency_histogram();
            for us in [7u64, 8, 9, 30, 2000] {
                h.record(us).unwrap();
                io.forward_latency.record(us * 1_000);
            }
            let mut core = CoreCounters {
                allocations_created: 5,
                ..Default::default()
            };
            core.drops[DropReason::NoPermission.index()] = 2;
            hub.apply(
                WorkerReport {
                    worker: w,
                    interval: h,
                    io,
                    core,
                    allocations: 2,
                },
                &mut pending,
            );
        }
        hub.set_interval(&pending);
        // The heartbeat snapshot carries the same figures, in the shared bucketing.
        let snap = hub.snapshot();
        snap.validate().unwrap();
        assert_eq!(snap.packets_forwarded, 20);
        assert_eq!(snap.allocations_created, 10);
        assert_eq!(snap.latency_us.count(), 10);
        assert_eq!(snap.latency_us.max, 2000);
        assert_eq!(snap.latency_us.value_at_quantile(0.5), 9);
        let text = hub.prometheus();
        assert!(
            text.contains(
                "peerlink_relay_forwarded_packets_total{direction=\"client_to_peer\"} 20"
            )
        );
        assert!(text.contains("peerlink_relay_dropped_packets_total{reason=\"no_permission\"} 6"));
        assert!(text.contains("peerlink_relay_allocations_active 4"));
        assert!(text.contains("peerlink_relay_allocations_created_total 10"));
        let sample = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
                .unwrap_or_else(|| panic!("no sample {name} in\n{text}"))
        };
        // The exposition spells bounds as Rust's shortest round-trip text (`5e-6` as `5e-06`).
        let bucket = |le: f64| -> f64 {
            text.lines()
                .find_map(|l| {
                    let rest =
                        l.strip_prefix("peerlink_relay_forward_latency_seconds_bucket{le=\"")?;
                    let (bound, v) = rest.split_once("\"} ")?;
                    let bound: f64 = bound.parse().ok()?;
                    (bound == le).then(|| v.parse().ok())?
                })
                .unwrap_or_else(|| panic!("no bucket le={le} in\n{text}"))
        };
        assert!(text.contains("# TYPE peerlink_relay_forward_latency_seconds histogram"));
        // 7, 8 and 9 µs from each worker are at most 10 µs; 30 µs joins at 50 µs; 2 ms at 2.5 ms.
        assert_eq!(bucket(5e-6), 0.0);
        assert_eq!(bucket(1e-5), 6.0);
        assert_eq!(bucket(2.5e-5), 6.0);
        assert_eq!(bucket(5e-5), 8.0);
        assert_eq!(bucket(1e-3), 8.0);
        assert_eq!(bucket(2.5e-3), 10.0);
        assert_eq!(bucket(f64::INFINITY), 10.0);
        assert_eq!(sample("peerlink_relay_forward_latency_seconds_count"), 10.0);
        let sum = sample("peerlink_relay_forward_latency_seconds_sum");
        assert!((sum - 2.0 * 2054e-6).abs() < 1e-12, "{sum}");
        // Every sample line belongs to a family declared with HELP and TYPE.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            let base = name
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(
                text.contains(&format!("# TYPE {base} "))
                    || text.contains(&format!("# TYPE {name} ")),
                "{line}"
            );
        }
        let stats = hub.stats();
        assert_eq!(stats.latency_total_us.count, 10);
        assert_eq!(stats.latency_interval_us.count, 10);
        assert_eq!(stats.latency_total_us.max, hub.lock().total.max());
        assert!(stats.latency_total_us.p50 >= 8 && stats.latency_total_us.p50 <= 9);
        assert_eq!(stats.counters["dropped_no_permission"], 6);
        assert!(hub.is_ready());
        hub.set_draining();
        assert!(!hub.is_ready());
        assert!(hub.prometheus().contains("peerlink_relay_draining 1"));
    }

    #[test]
    fn forward_latency_buckets_are_le_and_exposed_cumulatively() {
        // Seconds and nanoseconds say the same bounds, ascending.
        for (ns, s) in FORWARD_LATENCY_BUCKETS {
            assert!((ns as f64 / 1e9 - s).abs() < s * 1e-12, "{ns} ns vs {s} s");
        }
        assert!(FORWARD_LATENCY_BUCKETS.windows(2).all(|w| w[0].0 < w[1].0));
        let mut h = ForwardLatency::default();
        // On a bound, just above it, below the first, above the last.
        for ns in [
            0,
            5_000,
            5_001,
            10_000,
            74_999,
            75_000,
            75_001,
            100_000_000,
            100_000_001,
        ] {
            h.record(ns);
        }
        let mut want = [0u64; FORWARD_LATENCY_SLOTS];
        want[0] = 2; // 0 and 5000 (le 5e-6)
        want[1] = 2; // 5001 and 10000 (le 1e-5)
        want[4] = 2; // 74999 and 75000 (le 7.5e-5)
        want[5] = 1; // 75001 (le 1e-4)
        want[12] = 1; // 100 ms exactly (le 0.1)
        want[13] = 1; // above every bound: only in +Inf
        assert_eq!(h.counts, want);
        assert_eq!(h.count(), 9);
        assert_eq!(
            h.sum_ns,
            5_000 + 5_001 + 10_000 + 74_999 + 75_000 + 75_001 + 200_000_001
        );
        // A saturated sum stays saturated instead of wrapping.
        let mut big = ForwardLatency::default();
        big.record(u64::MAX);
        big.record(u64::MAX);
        assert_eq!(big.sum_ns, u64::MAX);

        let mut e = Exposition::new();
        h.expose(&mut e);
        let text = e.render("peerlink_relay");
        let cumulative: Vec<(f64, u64)> = text
            .lines()
            .filter_map(|l| {
                let rest = l.strip_prefix("peerlink_relay_forward_latency_seconds_bucket{le=\"")?;
                let (le, v) = rest.split_once("\"} ")?;
                Some((le.parse().ok()?, v.parse().ok()?))
            })
            .collect();
        let les: Vec<f64> = cumulative.iter().map(|(l, _)| *l).collect();
        assert_eq!(
            les,
            [
                5e-6,
                1e-5,
                2.5e-5,
                5e-5,
                7.5e-5,
                1e-4,
                1.5e-4,
                2.5e-4,
                5e-4,
                1e-3,
                2.5e-3,
                1e-2,
                1e-1,
                f64::INFINITY
            ],
            "{text}"
        );
        let counts: Vec<u64> = cumulative.iter().map(|(_, v)| *v).collect();
        assert_eq!(counts, [2, 4, 4, 4, 6, 7, 7, 7, 7, 7, 7, 7, 8, 9], "{text}");
        assert!(
            text.contains("peerlink_relay_forward_latency_seconds_count 9"),
            "{text}"
        );
    }

    /// `promtool check metrics` (Prometheus's own parser and linter) accepts the whole
    /// exposition, the histogram included.
    #[test]
    fn promtool_accepts_the_exposition() {
        use std::io::Write as _;
        let hub = MetricsHub::new(1, "epoll");
        let mut pending = new_latency_histogram();
        let mut io = IoCounters::new();
        for ns in [3_000, 40_000, 120_000, 7_000_000] {
            io.forward_latency.record(ns);
        }
        hub.apply(
            WorkerReport {
                worker: 0,
                interval: new_latency_histogram(),
                io,
                core: CoreCounters::default(),
                allocations: 0,
            },
            &mut pending,
        );
        let text = hub.prometheus();
        let mut child = match std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
        {
            Ok(c) => c,
            Err(e) => panic!("promtool: {e}: run `bash scripts/setup.sh` (it installs it)"),
        };
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics ({}):\n{}{}\n{text}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
