//! Idle sessions over several signaling nodes and client processes, for machines where one
//! process may not hold enough descriptors (a hard `RLIMIT_NOFILE` that cannot be raised
//! without CAP_SYS_RESOURCE): K standalone nodes (own temp database each) and K client worker
//! processes (this binary's hidden `idle-worker` subcommand), one per node. The sum of the
//! nodes' `sessions_open` gauges is the machine's concurrent session count; RSS growth per
//! session is measured per node exactly as in [`super::idle`].
//!
//! Worker protocol (lines on stdin/stdout): the worker opens the warm-up sessions and prints
//! `{"phase":"warm",..}`; on a stdin line it opens the rest and prints `{"phase":"open",..}`;
//! on the next line (or stdin EOF) it closes everything and prints `{"phase":"done",..}`.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::idle::{IdleConfig, Opener, WARMUP};
use super::proc::{self, Service};
use super::{FleetError, Result, within};

/// Descriptors kept free per process beyond one per session.
const FD_SLACK: u64 = 512;

/// What one worker process does.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Node address.
    pub addr: SocketAddr,
    /// JSON file with the access tokens (array of strings).
    pub tokens_file: PathBuf,
    /// Sessions after the warm-up.
    pub sessions: usize,
    /// Sessions per account.
    pub devices_per_user: usize,
    /// Source addresses 127.0.0.2 ..
    pub source_ips: usize,
    /// Handshakes in flight.
    pub concurrency: usize,
    /// Overall time limit.
    pub timeout: Duration,
}

/// One phase line of a worker.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WorkerLine {
    /// `warm`, `open` or `done`.
    pub phase: String,
    /// Sessions opened in this phase.
    pub opened: usize,
    /// Sessions that failed in this phase.
    pub failed: usize,
    /// First failure.
    pub first_error: Option<String>,
    /// Seconds the phase took.
    pub secs: f64,
    /// Sessions seen closed early (phase `done`).
    pub closed_early: u64,
}

fn emit(l: &WorkerLine) -> Result<()> {
    let s = serde_json::to_string(l).map_err(|e| FleetError::Protocol(e.to_string()))?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{s}")?;
    out.flush()?;
    Ok(())
}

/// Run a worker (the hidden `idle-worker` subcommand).
pub fn run_worker(w: &WorkerConfig) -> Result<()> {
    let need = (w.sessions + WARMUP) as u64 + FD_SLACK;
    let nofile = proc::raise_nofile(need)?;
    if nofile < need {
        return Err(FleetError::Invalid(format!(
            "worker: open-file limit {nofile} < {need}"
        )));
    }
    let tokens: Vec<String> = serde_json::from_slice(&std::fs::read(&w.tokens_file)?)
        .map_err(|e| FleetError::Protocol(format!("tokens file: {e}")))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    // stdin lines, read on a plain thread; EOF ends the channel.
    let (tx, rx) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            if line.is_err() || tx.send(()).is_err() {
                break;
            }
        }
    });
    let r = rt.block_on(async {
        within(w.timeout, "idle worker", async {
            let closed = Arc::new(AtomicU64::new(0));
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            let opener = Opener {
                api: super::signaling_api(&format!("http://{}", w.addr))?,
                tokens: Arc::new(tokens),
                devices_per_user: w.devices_per_user,
                source_ips: w.source_ips,
                closed: closed.clone(),
                stop: stop_rx,
            };
            let t = Instant::now();
            let warm = opener.open_range(0..WARMUP, w.concurrency).await;
            emit(&WorkerLine {
                phase: "warm".into(),
                opened: warm.holders.len(),
                failed: warm.failed,
                first_error: warm.first_error,
                secs: t.elapsed().as_secs_f64(),
                closed_early: 0,
            })?;
            let mut holders = warm.holders;
            wait_line(&rx, w.timeout).await;
            let t = Instant::now();
            let main = opener
                .open_range(WARMUP..WARMUP + w.sessions, w.concurrency)
                .await;
            emit(&WorkerLine {
                phase: "open".into(),
                opened: main.holders.len(),
                failed: main.failed,
                first_error: main.first_error,
                secs: t.elapsed().as_secs_f64(),
                closed_early: 0,
            })?;
            holders.extend(main.holders);
            wait_line(&rx, w.timeout).await;
            let closed_early = closed.load(Ordering::Relaxed);
            let _ = stop_tx.send(true);
            for h in &holders {
                h.abort();
            }
            emit(&WorkerLine {
                phase: "done".into(),
                closed_early,
                ..WorkerLine::default()
            })
        })
        .await
    });
    rt.shutdown_timeout(Duration::from_secs(5));
    r
}

/// Wait (off the runtime's threads) for one stdin line, EOF or `limit`.
async fn wait_line(rx: &mpsc::Receiver<()>, limit: Duration) {
    tokio::task::block_in_place(|| {
        let _ = rx.recv_timeout(limit);
    });
}

/// Per-node figures.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeRow {
    /// Sessions requested on this node (besides warm-up).
    pub requested: usize,
    /// Sessions opened (besides warm-up).
    pub opened: usize,
    /// Sessions that failed to open.
    pub failed: usize,
    /// The node's `sessions_open` gauge with everything open.
    pub gauge: i64,
    /// The gauge after the hold.
    pub gauge_after_hold: i64,
    /// Sessions the worker saw closed early.
    pub closed_early: u64,
    /// Seconds to open.
    pub open_secs: f64,
    /// RSS after warm-up, KiB.
    pub rss_base_kib: u64,
    /// RSS with everything open, KiB.
    pub rss_after_kib: u64,
    /// RSS after the hold, KiB.
    pub rss_after_hold_kib: u64,
    /// Growth per session, bytes.
    pub bytes_per_session: f64,
}

/// Figures of a multi-node run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MultiReport {
    /// Nodes (= worker processes).
    pub nodes: usize,
    /// Sessions requested over all nodes (besides warm-up).
    pub requested: usize,
    /// Sessions opened over all nodes (besides warm-up).
    pub opened: usize,
    /// Sessions that failed.
    pub failed: usize,
    /// First failure.
    pub first_error: Option<String>,
    /// Sum of the nodes' gauges with everything open (includes warm-up).
    pub concurrent_sessions: i64,
    /// Sum of the gauges after the hold.
    pub concurrent_after_hold: i64,
    /// Open-file limit of each process.
    pub nofile_limit: u64,
    /// Seconds the opening phase took (workers in parallel).
    pub open_secs: f64,
    /// Sum of RSS growth over sum of opened sessions, bytes per session.
    pub bytes_per_session: f64,
    /// One node's projected RSS at 100,000 sessions (mean base + growth), MiB.
    pub projected_100k_mib: f64,
    /// Per-node rows.
    pub per_node: Vec<NodeRow>,
    /// Node flags.
    pub node_flags: Vec<String>,
}

impl MultiReport {
    /// Human table.
    pub fn table(&self) -> String {
        let mut s = format!(
            "idle WebSocket sessions on {} peerlink-signaling nodes + {} client processes (loopback; RLIMIT_NOFILE {} per process)\n",
            self.nodes, self.nodes, self.nofile_limit
        );
        s += &format!(
            "  sessions requested / opened / failed  {} / {} / {} (+{} warm-up per node)\n",
            self.requested, self.opened, self.failed, WARMUP
        );
        if let Some(e) = &self.first_error {
            s += &format!("  first failure: {e}\n");
        }
        s += &format!(
            "  concurrent sessions (sum of node gauges)  {} (after hold: {})\n",
            self.concurrent_sessions, self.concurrent_after_hold
        );
        s += &format!("  opening took {:.1} s\n", self.open_secs);
        s += &format!(
            "  {:<5} {:>9} {:>9} {:>8} {:>12} {:>12} {:>12} {:>10}\n",
            "node",
            "opened",
            "gauge",
            "closed",
            "RSS base KiB",
            "RSS open KiB",
            "after hold",
            "B/session"
        );
        for (i, r) in self.per_node.iter().enumerate() {
            s += &format!(
                "  {:<5} {:>9} {:>9} {:>8} {:>12} {:>12} {:>12} {:>10.0}\n",
                i,
                r.opened,
                r.gauge,
                r.closed_early,
                r.rss_base_kib,
                r.rss_after_kib,
                r.rss_after_hold_kib,
                r.bytes_per_session
            );
        }
        s += &format!(
            "  RSS per idle session (all nodes)      {:.0} bytes   (target <= 10,240; Centrifugo ~30 KB)\n",
            self.bytes_per_session
        );
        s += &format!(
            "  projected one-node RSS at 100,000     {:.0} MiB     (target <= 1024)\n",
            self.projected_100k_mib
        );
        s += &format!("  node flags: {}\n", self.node_flags.join(" "));
        s
    }
}

struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Worker {
    fn next(&mut self, phase: &str, limit: Duration) -> Result<WorkerLine> {
        let l = self
            .lines
            .recv_timeout(limit)
            .map_err(|_| FleetError::Timeout(format!("worker phase {phase}")))?;
        let w: WorkerLine = serde_json::from_str(&l)
            .map_err(|e| FleetError::Protocol(format!("worker line {l:?}: {e}")))?;
        if w.phase != phase {
            return Err(FleetError::Protocol(format!(
                "worker said {:?}, expected {phase}",
                w.phase
            )));
        }
        Ok(w)
    }
    fn go(&mut self) {
        if let Some(s) = self.stdin.as_mut() {
            let _ = writeln!(s, "go");
            let _ = s.flush();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stdin.take();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run `c.sessions` over `nodes` nodes; `worker_exe` is this binary (for `idle-worker`).
pub fn run(c: &IdleConfig, nodes: usize, worker_exe: &std::path::Path) -> Result<MultiReport> {
    if nodes == 0 || nodes > 64 || c.sessions < nodes || c.source_ips == 0 || c.source_ips > 250 {
        return Err(FleetError::Invalid(
            "nodes 1..=64, sessions >= nodes, source IPs 1..=250".into(),
        ));
    }
    let per_node = c.sessions.div_ceil(nodes);
    let need = (per_node + WARMUP) as u64 + FD_SLACK;
    let nofile = proc::raise_nofile(need)?;
    if nofile < need {
        return Err(FleetError::Invalid(format!(
            "open-file limit {nofile} < {need} needed per process: use more --nodes"
        )));
    }
    let deadline = Instant::now() + c.timeout;
    let left = || deadline.saturating_duration_since(Instant::now());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let dir = proc::temp_dir(c.db_on_shm)?;
    let per_ip = ((per_node + WARMUP).div_ceil(c.source_ips) + 16).max(32);
    let mut flags: Vec<String> = vec![
        "--max-conns-per-ip".into(),
        per_ip.to_string(),
        "--argon2-m-kib".into(),
        "64".into(),
        "--argon2-t".into(),
        "1".into(),
    ];
    flags.extend(c.extra_flags.iter().cloned());

    let mut svcs: Vec<Service> = Vec::new();
    let mut workers: Vec<Worker> = Vec::new();
    let mut requested = Vec::new();
    for k in 0..nodes {
        // Even split; the first `sessions % nodes` nodes take one more.
        let n = c.sessions / nodes + usize::from(k < c.sessions % nodes);
        requested.push(n);
        let sub = dir.path().join(format!("node{k}"));
        std::fs::create_dir_all(&sub)?;
        let svc = proc::start_signaling(
            &c.signaling_bin,
            &sub,
            &format!("signaling-{k}"),
            &flags,
            &[],
        )?;
        let base = format!("http://{}", svc.addr);
        let users = (n + WARMUP).div_ceil(c.devices_per_user);
        let tokens = rt.block_on(within(
            Duration::from_secs(300).min(left()),
            "creating accounts",
            super::accounts(&base, &format!("idle{k}x"), users, 16),
        ))?;
        let tf = sub.join("tokens.json");
        std::fs::write(
            &tf,
            serde_json::to_vec(&tokens).map_err(|e| FleetError::Protocol(e.to_string()))?,
        )?;
        let mut worker = Command::new(worker_exe);
        worker
            .arg("idle-worker")
            .args(["--addr", &svc.addr])
            .arg("--tokens-file")
            .arg(&tf)
            .args(["--sessions", &n.to_string()])
            .args(["--devices-per-user", &c.devices_per_user.to_string()])
            .args(["--source-ips", &c.source_ips.to_string()])
            .args(["--concurrency", &c.concurrency.to_string()])
            .args(["--timeout", &left().as_secs().max(1).to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(sub.join("worker.log"))?));
        peerlink_cli::process::die_with_parent(&mut worker);
        let mut child = worker.spawn()?;
        let stdin = child.stdin.take();
        let out = child
            .stdout
            .take()
            .ok_or_else(|| FleetError::Protocol("worker stdout".into()))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        svcs.push(svc);
        workers.push(Worker {
            child,
            stdin,
            lines: rx,
        });
    }
    // Warm-up everywhere, then the baselines.
    for w in &mut workers {
        let l = w.next("warm", left())?;
        if l.failed > 0 {
            return Err(FleetError::Protocol(format!(
                "warm-up failed: {}",
                l.first_error.unwrap_or_default()
            )));
        }
    }
    std::thread::sleep(c.settle);
    let base: Vec<u64> = svcs.iter().map(|s| s.rss_kib()).collect::<Result<_>>()?;
    let t0 = Instant::now();
    for w in &mut workers {
        w.go();
    }
    let mut opened_lines = Vec::new();
    for w in &mut workers {
        opened_lines.push(w.next("open", left())?);
    }
    let open_secs = t0.elapsed().as_secs_f64();
    std::thread::sleep(c.settle);
    let after: Vec<u64> = svcs.iter().map(|s| s.rss_kib()).collect::<Result<_>>()?;
    let gauges: Vec<i64> = svcs
        .iter()
        .map(|s| {
            rt.block_on(super::signaling_metric(
                &format!("http://{}", s.addr),
                "sessions_open",
            ))
        })
        .collect::<Result<_>>()?;
    std::thread::sleep(c.hold);
    let hold: Vec<u64> = svcs.iter().map(|s| s.rss_kib()).collect::<Result<_>>()?;
    let gauges_hold: Vec<i64> = svcs
        .iter()
        .map(|s| {
            rt.block_on(super::signaling_metric(
                &format!("http://{}", s.addr),
                "sessions_open",
            ))
        })
        .collect::<Result<_>>()?;
    let mut done = Vec::new();
    for w in &mut workers {
        w.go();
    }
    for w in &mut workers {
        done.push(w.next("done", Duration::from_secs(30).min(left()))?);
    }
    for s in &mut svcs {
        if !s.alive() {
            return Err(s.failed("node exited during the run"));
        }
    }
    let mut rows = Vec::new();
    for k in 0..nodes {
        let o = &opened_lines[k];
        rows.push(NodeRow {
            requested: requested[k],
            opened: o.opened,
            failed: o.failed,
            gauge: gauges[k],
            gauge_after_hold: gauges_hold[k],
            closed_early: done[k].closed_early,
            open_secs: o.secs,
            rss_base_kib: base[k],
            rss_after_kib: after[k],
            rss_after_hold_kib: hold[k],
            bytes_per_session: after[k].saturating_sub(base[k]) as f64 * 1024.0
                / o.opened.max(1) as f64,
        });
    }
    drop(workers);
    drop(svcs);
    rt.shutdown_timeout(Duration::from_secs(5));
    let opened: usize = rows.iter().map(|r| r.opened).sum();
    let growth: u64 = rows
        .iter()
        .map(|r| r.rss_after_kib.saturating_sub(r.rss_base_kib))
        .sum();
    let per = growth as f64 * 1024.0 / opened.max(1) as f64;
    let mean_base = rows.iter().map(|r| r.rss_base_kib).sum::<u64>() as f64 / nodes as f64;
    Ok(MultiReport {
        nodes,
        requested: c.sessions,
        opened,
        failed: rows.iter().map(|r| r.failed).sum(),
        first_error: opened_lines.iter().find_map(|l| l.first_error.clone()),
        concurrent_sessions: gauges.iter().sum(),
        concurrent_after_hold: gauges_hold.iter().sum(),
        nofile_limit: nofile,
        open_secs,
        bytes_per_session: per,
        projected_100k_mib: (mean_base * 1024.0 + per * 100_000.0) / 1_048_576.0,
        per_node: rows,
        node_flags: flags,
    })
}
