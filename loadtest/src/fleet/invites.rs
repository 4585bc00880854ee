//! Invite delivery latency: caller sends `invite` -> callee receives `incoming_call`, through
//! one signaling node or across two or three (callers on the first, callees on the others, a
//! real directory between them), at a fixed offered rate. The nodes and the directory run on
//! their embedded stores (one SQLite file, the in-memory directory) or on engines
//! ([`Stores`]: PostgreSQL and Redis).
//!
//! Pacing is open loop: invite `k` is due at `start + k / rate` whatever happened to earlier
//! ones (a slow server does not lower the offered rate); a pacer thread hands each due invite
//! to its caller's task through an unbounded queue. Latency is reported twice: from the
//! moment the frame was handed to the socket (the server's and network's share), and from
//! the moment it was due (adds the generator's own lateness, so coordinated omission would
//! show). Each callee declines at once, so calls do not pile up. The node's per-session frame
//! rate limit (default 20/s) is raised for the benchmark; everything else is the default.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use peerlink_api::signaling::{
    CallId, Candidate, CandidateType, ClientMsg, ServerMsg, SessionDesc, Transport,
};
use peerlink_api::signaling_client::{ConnectOptions, Connection, SignalError};
use serde::Serialize;

use super::proc::{self, Service};
use super::stats::{self, Percentiles};
use super::{FleetError, Result, within};

/// What to run.
#[derive(Clone, Debug)]
pub struct InviteConfig {
    /// `peerlink-signaling` binary.
    pub signaling_bin: PathBuf,
    /// `peerlink-directory` binary (needed for two nodes).
    pub directory_bin: Option<PathBuf>,
    /// Offered invites per second over all pairs.
    pub rate: f64,
    /// Sending time.
    pub duration: Duration,
    /// Caller/callee pairs.
    pub pairs: usize,
    /// 1: everyone on one node; 2 or 3: callers on node 1, callees on the others.
    pub nodes: usize,
    /// Longest wait for outstanding deliveries after the last send.
    pub drain: Duration,
    /// Overall time limit.
    pub timeout: Duration,
    /// Extra flags for the nodes.
    pub extra_flags: Vec<String>,
    /// Engines to run on instead of the embedded stores.
    pub stores: Option<Stores>,
}

/// Where a fleet of the benchmark keeps its state when not in the embedded stores.
#[derive(Clone, Debug)]
pub struct Stores {
    /// The nodes' `--store` (`postgres://...`).
    pub signaling: String,
    /// The directory's `--store` (`redis://...`).
    pub directory: String,
}

impl InviteConfig {
    /// Defaults: 100 pairs on one node, 2 s drain.
    pub fn new(signaling_bin: PathBuf, rate: f64, duration: Duration) -> Self {
        Self {
            signaling_bin,
            directory_bin: None,
            rate,
            duration,
            pairs: 100,
            nodes: 1,
            drain: Duration::from_secs(2),
            timeout: Duration::from_secs(300),
            extra_flags: Vec::new(),
            stores: None,
        }
    }
}

/// Figures of one run.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct InviteReport {
    /// Signaling nodes.
    pub nodes: usize,
    /// Caller/callee pairs.
    pub pairs: usize,
    /// Configured rate, invites/s.
    pub offered_rate: f64,
    /// Invites sent.
    pub sent: u64,
    /// Achieved send rate (sent over the first-to-last-send window), invites/s.
    pub sent_rate: f64,
    /// Largest lateness of a send against its schedule, µs.
    pub max_send_lag_us: u64,
    /// Distinct invites delivered to a callee.
    pub delivered: u64,
    /// Invites delivered more than once.
    pub duplicates: u64,
    /// `invite_sent` answers the callers got.
    pub invite_sent: u64,
    /// `call_ended` events the callers got (declines).
    pub call_ended: u64,
    /// Error frames, by code.
    pub errors: BTreeMap<String, u64>,
    /// Caller send -> callee receive, µs.
    pub latency: Percentiles,
    /// Scheduled send time -> callee receive, µs (includes generator lateness).
    pub latency_from_schedule: Percentiles,
    /// Node flags used (besides listen/db/log).
    pub node_flags: Vec<String>,
}

impl InviteReport {
    /// Human table.
    pub fn table(&self) -> String {
        let mut s = format!(
            "invite delivery through {} peerlink-signaling node(s), {} pairs, loopback\n",
            self.nodes, self.pairs
        );
        s += &format!(
            "  offered / achieved send rate   {:>10.0} / {:.0} invites/s (max send lag {:.3} ms)\n",
            self.offered_rate,
            self.sent_rate,
            self.max_send_lag_us as f64 / 1000.0
        );
        s += &format!(
            "  sent / delivered / duplicates  {:>10} / {} / {}\n",
            self.sent, self.delivered, self.duplicates
        );
        s += &format!(
            "  invite_sent / call_ended       {:>10} / {}\n",
            self.invite_sent, self.call_ended
        );
        let errs: Vec<String> = self
            .errors
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        s += &format!(
            "  error frames                   {:>10}\n",
            if errs.is_empty() {
                "none".to_owned()
            } else {
                errs.join(", ")
            }
        );
        s += &stats::header("  latency");
        s += &stats::row(&self.latency, "  caller send -> callee receive");
        s += &stats::row(
            &self.latency_from_schedule,
            "  scheduled send -> callee receive",
        );
        s += "  target: p99 <= 10 ms at 2,000 invites/s\n";
        s += &format!("  node flags: {}\n", self.node_flags.join(" "));
        s
    }
}

/// Run the benchmark (builds its own runtime).
pub fn run(c: &InviteConfig) -> Result<InviteReport> {
    if !(c.rate.is_finite() && c.rate > 0.0 && c.rate <= 1_000_000.0) {
        return Err(FleetError::Invalid("rate must be in (0, 1e6]".into()));
    }
    if c.pairs == 0 || c.pairs > 5000 || !(1..=3).contains(&c.nodes) {
        return Err(FleetError::Invalid(
            "pairs must be 1..=5000 and nodes 1, 2 or 3".into(),
        ));
    }
    if c.stores.is_some() && c.nodes == 1 {
        return Err(FleetError::Invalid(
            "engines need a fleet: nodes 2 or 3".into(),
        ));
    }
    let total = (c.rate * c.duration.as_secs_f64()).round() as usize;
    if total == 0 || total > 50_000_000 {
        return Err(FleetError::Invalid(
            "rate x duration must give 1..=50,000,000 invites".into(),
        ));
    }
    proc::raise_nofile(65_536)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let r = rt.block_on(async { within(c.timeout, "invites", run_async(c, total)).await });
    rt.shutdown_timeout(Duration::from_secs(5));
    r
}

fn offer(k: usize) -> SessionDesc {
    SessionDesc {
        // The invite's index travels in the ufrag (ice-chars only).
        ice_ufrag: format!("lt{k:010}"),
        ice_pwd: "abcdefghijklmnopqrstuvwx".into(),
        public_key: "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=".into(),
        candidates: vec![Candidate {
            foundation: "1".into(),
            component: 1,
            transport: Transport::Udp,
            priority: 2_130_706_431,
            address: std::net::IpAddr::from([127, 0, 0, 1]),
            port: 40_000,
            kind: CandidateType::Host,
            related_address: None,
            related_port: None,
        }],
        end_of_candidates: true,
        purpose: Default::default(),
        transfer_fingerprint: None,
        nat: None,
    }
}

fn index_of(d: &SessionDesc) -> Option<usize> {
    d.ice_ufrag.strip_prefix("lt")?.parse().ok()
}

async fn connect(addr: &str, token: &str) -> Result<Connection> {
    let api = super::signaling_api(&format!("http://{addr}"))?;
    let opts = ConnectOptions {
        timeout: Duration::from_secs(30),
        ..ConnectOptions::default()
    };
    Ok(Connection::open(&api, token, "bench", None, &opts).await?)
}

/// Shared between the generator tasks; all indices are invite numbers.
struct Shared {
    /// When each invite was handed to its socket, µs after `t0` (+1; 0 = not sent).
    sent_us: Vec<AtomicU64>,
    /// Whether each invite reached its callee.
    seen: Vec<AtomicBool>,
    delivered: AtomicU64,
    sent: AtomicU64,
    t0: Instant,
    /// When invite 0 is due, µs after `t0`.
    start_us: u64,
    rate: f64,
}

impl Shared {
    fn due_us(&self, k: usize) -> u64 {
        self.start_us + (k as f64 * 1e6 / self.rate) as u64
    }
    fn now_us(&self) -> u64 {
        u64::try_from(self.t0.elapsed().as_micros()).unwrap_or(u64::MAX)
    }
}

#[derive(Default)]
struct CallerCounts {
    sent: u64,
    first_send_us: u64,
    last_send_us: u64,
    max_lag_us: u64,
    invite_sent: u64,
    call_ended: u64,
    errors: BTreeMap<String, u64>,
}

async fn run_async(c: &InviteConfig, total: usize) -> Result<InviteReport> {
    let dir = proc::temp_dir(true)?;
    let mut flags: Vec<String> = [
        "--msg-rate",
        "100000",
        "--msg-burst",
        "100000",
        "--max-conns-per-ip",
        "20000",
        // Accounts are only set-up here.
        "--argon2-m-kib",
        "64",
        "--argon2-t",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    flags.extend(c.extra_flags.iter().cloned());

    let mut _directory: Option<Service> = None;
    let mut nodes: Vec<Service> = Vec::new();
    if c.nodes >= 2 {
        let bin = c.directory_bin.clone().ok_or_else(|| {
            FleetError::Invalid("several nodes need the peerlink-directory binary".into())
        })?;
        let dir_flags: Vec<String> = match &c.stores {
            Some(s) => vec!["--store".into(), s.directory.clone()],
            None => Vec::new(),
        };
        let d = proc::start_directory_with(&bin, dir.path(), "directory", &dir_flags)?;
        let url = format!("http://{}", d.addr);
        _directory = Some(d);
        for n in 0..c.nodes {
            let mut f = flags.clone();
            f.extend([
                "--directory".to_owned(),
                url.clone(),
                "--node-id".to_owned(),
                format!("bench-node-{n}"),
            ]);
            if let Some(s) = &c.stores {
                f.extend(["--store".to_owned(), s.signaling.clone()]);
            }
            nodes.push(proc::start_signaling(
                &c.signaling_bin,
                dir.path(),
                &format!("signaling-{n}"),
                &f,
                &[("PEERLINK_CLUSTER_TOKEN", super::CLUSTER_TOKEN)],
            )?);
        }
    } else {
        nodes.push(proc::start_signaling(
            &c.signaling_bin,
            dir.path(),
            "signaling",
            &flags,
            &[],
        )?);
    }
    let caller_node = nodes[0].addr.clone();
    // Callees on every other node, in turn (on the only one when there is one).
    let callee_nodes: Vec<String> = nodes.iter().skip(1).map(|n| n.addr.clone()).collect();
    let callee_node = |p: usize| match callee_nodes.len() {
        0 => caller_node.clone(),
        n => callee_nodes[p % n].clone(),
    };
    let base = format!("http://{caller_node}");
    let callers = within(
        Duration::from_secs(120),
        "caller accounts",
        super::accounts(&base, "caller", c.pairs, 16),
    )
    .await?;
    let callees = within(
        Duration::from_secs(120),
        "callee accounts",
        super::accounts(&base, "callee", c.pairs, 16),
    )
    .await?;
    let mut caller_ws = Vec::with_capacity(c.pairs);
    let mut callee_ws = Vec::with_capacity(c.pairs);
    for p in 0..c.pairs {
        callee_ws.push(connect(&callee_node(p), &callees[p]).await?);
        caller_ws.push(connect(&caller_node, &callers[p]).await?);
    }

    let t0 = Instant::now();
    let shared = Arc::new(Shared {
        sent_us: (0..total).map(|_| AtomicU64::new(0)).collect(),
        seen: (0..total).map(|_| AtomicBool::new(false)).collect(),
        delivered: AtomicU64::new(0),
        sent: AtomicU64::new(0),
        t0,
        start_us: 200_000,
        rate: c.rate,
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

    let mut callee_tasks = Vec::new();
    for ws in callee_ws {
        callee_tasks.push(tokio::spawn(callee(ws, shared.clone(), stop_rx.clone())));
    }
    let mut caller_tasks = Vec::new();
    let mut due_txs = Vec::new();
    for (p, ws) in caller_ws.into_iter().enumerate() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        due_txs.push(tx);
        caller_tasks.push(tokio::spawn(caller(
            ws,
            rx,
            format!("callee{p}"),
            shared.clone(),
            stop_rx.clone(),
        )));
    }
    let pacer = {
        let sh = shared.clone();
        let stop = stop_rx.clone();
        std::thread::spawn(move || pace(&sh, total, &due_txs, &stop))
    };
    // Wait for the senders (bounded by the schedule), then for outstanding deliveries.
    let send_end = Duration::from_micros(shared.due_us(total)) + c.drain + Duration::from_secs(5);
    let deadline = tokio::time::Instant::from_std(t0 + send_end);
    loop {
        let sent = shared.sent.load(Ordering::Relaxed);
        let senders_done = caller_tasks.iter().all(|t| t.is_finished());
        let all_in = shared.delivered.load(Ordering::Relaxed) >= sent;
        if senders_done && all_in {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let trailing invite_sent / call_ended frames arrive before stopping the readers.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = stop_tx.send(true);
    let _ = tokio::task::spawn_blocking(move || pacer.join()).await;

    let mut counts = CallerCounts {
        first_send_us: u64::MAX,
        ..CallerCounts::default()
    };
    for t in caller_tasks {
        let r = within(Duration::from_secs(10), "caller task", async {
            t.await
                .map_err(|e| FleetError::Protocol(format!("caller task: {e}")))?
        })
        .await?;
        counts.sent += r.sent;
        counts.first_send_us = counts.first_send_us.min(r.first_send_us);
        counts.last_send_us = counts.last_send_us.max(r.last_send_us);
        counts.max_lag_us = counts.max_lag_us.max(r.max_lag_us);
        counts.invite_sent += r.invite_sent;
        counts.call_ended += r.call_ended;
        for (k, v) in r.errors {
            *counts.errors.entry(k).or_default() += v;
        }
    }
    let mut lat = stats::histogram();
    let mut lat_sched = stats::histogram();
    let mut duplicates = 0;
    for t in callee_tasks {
        let (h1, h2, dup) = within(Duration::from_secs(10), "callee task", async {
            t.await
                .map_err(|e| FleetError::Protocol(format!("callee task: {e}")))?
        })
        .await?;
        lat.add(&h1)
            .map_err(|e| FleetError::Protocol(e.to_string()))?;
        lat_sched
            .add(&h2)
            .map_err(|e| FleetError::Protocol(e.to_string()))?;
        duplicates += dup;
    }
    for n in &mut nodes {
        if !n.alive() {
            return Err(n.failed("node exited during the run"));
        }
    }
    let window = counts.last_send_us.saturating_sub(counts.first_send_us) as f64 / 1e6;
    Ok(InviteReport {
        nodes: c.nodes,
        pairs: c.pairs,
        offered_rate: c.rate,
        sent: counts.sent,
        // n sends span n-1 intervals.
        sent_rate: if window > 0.0 {
            counts.sent.saturating_sub(1) as f64 / window
        } else {
            0.0
        },
        max_send_lag_us: counts.max_lag_us,
        delivered: shared.delivered.load(Ordering::Relaxed),
        duplicates,
        invite_sent: counts.invite_sent,
        call_ended: counts.call_ended,
        errors: counts.errors,
        latency: Percentiles::of(&lat),
        latency_from_schedule: Percentiles::of(&lat_sched),
        node_flags: flags,
    })
}

/// Open-loop pacer (a plain thread: precise sleeps, unlike the runtime's 1 ms timer wheel):
/// hands invite `k` to pair `k % pairs` at its due time, never waiting for the senders.
fn pace(
    sh: &Shared,
    total: usize,
    txs: &[tokio::sync::mpsc::UnboundedSender<usize>],
    stop: &tokio::sync::watch::Receiver<bool>,
) {
    for k in 0..total {
        if *stop.borrow() {
            break;
        }
        let due = sh.t0 + Duration::from_micros(sh.due_us(k));
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        if let Some(tx) = txs.get(k % txs.len().max(1)) {
            let _ = tx.send(k);
        }
    }
}

fn error_code(code: &impl Serialize) -> String {
    serde_json::to_value(code)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| "unknown".into())
}

/// One caller: sends its share of the schedule (every `pairs`-th invite from `p`) and counts
/// what the node answers.
async fn caller(
    conn: Connection,
    mut due_rx: tokio::sync::mpsc::UnboundedReceiver<usize>,
    to: String,
    sh: Arc<Shared>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<CallerCounts> {
    let (mut tx, mut rx) = conn.split();
    let mut stop_r = stop.clone();
    let reader = tokio::spawn(async move {
        let mut c = CallerCounts::default();
        loop {
            tokio::select! {
                m = rx.recv() => match m {
                    Ok(ServerMsg::InviteSent { .. }) => c.invite_sent += 1,
                    Ok(ServerMsg::CallEnded { .. }) => c.call_ended += 1,
                    Ok(ServerMsg::Error { code, .. }) => {
                        *c.errors.entry(error_code(&code)).or_default() += 1;
                    }
                    Ok(_) => {}
                    Err(SignalError::Protocol(_)) => {
                        *c.errors.entry("unparsed_frame".into()).or_default() += 1;
                    }
                    Err(_) => {
                        *c.errors.entry("caller_session_closed".into()).or_default() += 1;
                        break;
                    }
                },
                r = stop_r.changed() => if r.is_err() || *stop_r.borrow() { break },
            }
        }
        c
    });
    let mut c = CallerCounts {
        first_send_us: u64::MAX,
        ..CallerCounts::default()
    };
    // The pacer thread hands over each invite when it is due; ends when the pacer is done.
    while let Some(k) = due_rx.recv().await {
        if *stop.borrow() {
            break;
        }
        let due = sh.due_us(k);
        let msg = ClientMsg::Invite {
            to: to.clone(),
            from: None,
            req: None,
            offer: offer(k),
        };
        let now = sh.now_us();
        c.max_lag_us = c.max_lag_us.max(now.saturating_sub(due));
        c.first_send_us = c.first_send_us.min(now);
        c.last_send_us = now;
        if let Some(s) = sh.sent_us.get(k) {
            s.store(now + 1, Ordering::Relaxed);
        }
        if tx.send(&msg).await.is_err() {
            break;
        }
        c.sent += 1;
        sh.sent.fetch_add(1, Ordering::Relaxed);
    }
    let r = reader
        .await
        .map_err(|e| FleetError::Protocol(format!("caller reader: {e}")))?;
    c.invite_sent = r.invite_sent;
    c.call_ended = r.call_ended;
    c.errors = r.errors;
    Ok(c)
}

/// One callee: records each `incoming_call`'s latency and declines it.
async fn callee(
    mut conn: Connection,
    sh: Arc<Shared>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(Histogram<u64>, Histogram<u64>, u64)> {
    let mut lat = stats::histogram();
    let mut lat_sched = stats::histogram();
    let mut dup = 0;
    loop {
        let m = tokio::select! {
            m = conn.recv() => m,
            r = stop.changed() => {
                if r.is_err() || *stop.borrow() { break }
                continue;
            }
        };
        let m = match m {
            Ok(m) => m,
            Err(SignalError::Protocol(_)) => continue,
            Err(_) => break,
        };
        let now = sh.now_us();
        let ServerMsg::IncomingCall { call_id, offer, .. } = m else {
            continue;
        };
        if let Some(k) = index_of(&offer)
            && let (Some(sent), Some(seen)) = (sh.sent_us.get(k), sh.seen.get(k))
        {
            if seen.swap(true, Ordering::Relaxed) {
                dup += 1;
            } else {
                sh.delivered.fetch_add(1, Ordering::Relaxed);
                let s = sent.load(Ordering::Relaxed);
                if s != 0 {
                    stats::record(&mut lat, now.saturating_sub(s - 1));
                }
                stats::record(&mut lat_sched, now.saturating_sub(sh.due_us(k)));
            }
        }
        let decline = ClientMsg::Decline {
            call_id: CallId(call_id.0),
        };
        if conn.send(&decline).await.is_err() {
            break;
        }
    }
    Ok((lat, lat_sched, dup))
}
