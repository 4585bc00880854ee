//! The fleet on engines against the embedded stores, side by side in one run: invites through
//! three signaling nodes on PostgreSQL with the directory on Redis against the same three nodes
//! on one SQLite file with the in-memory directory ([`super::invites`]), and durable messages
//! on PostgreSQL against SQLite ([`super::messages`]). Rounds alternate the two arms; the
//! first round is discarded. PostgreSQL and Redis are started by the benchmark
//! ([`super::engines`]), each round on a fresh database and key prefix.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use super::engines::{Postgres, Redis};
use super::invites::{self, InviteConfig, InviteReport, Stores};
use super::messages::{self, MessageConfig, MessageFigures};
use super::{FleetError, Result, proc};

/// What to run.
#[derive(Clone, Debug)]
pub struct EnginesConfig {
    /// `peerlink-signaling` binary.
    pub signaling_bin: PathBuf,
    /// `peerlink-directory` binary.
    pub directory_bin: PathBuf,
    /// Offered invites per second.
    pub rate: f64,
    /// Invite sending time per run.
    pub duration: Duration,
    /// Caller/callee pairs.
    pub pairs: usize,
    /// Message sending time per run.
    pub message_duration: Duration,
    /// Message senders.
    pub message_concurrency: usize,
    /// Kept rounds (one more runs first and is discarded).
    pub rounds: usize,
}

/// Figures of the comparison.
#[derive(Clone, Debug, Serialize)]
pub struct EnginesReport {
    /// Invites, embedded stores, each kept round.
    pub invites_embedded: Vec<InviteReport>,
    /// Invites, PostgreSQL + Redis, each kept round.
    pub invites_engines: Vec<InviteReport>,
    /// Durable messages on SQLite, each kept round.
    pub messages_sqlite: Vec<MessageFigures>,
    /// Durable messages on PostgreSQL, each kept round.
    pub messages_postgres: Vec<MessageFigures>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Delivered invites per second of sending time.
fn delivered_rate(r: &InviteReport, duration: Duration) -> f64 {
    r.delivered as f64 / duration.as_secs_f64()
}

impl EnginesReport {
    /// Human table (medians of the kept rounds, and the ratios engines / embedded).
    pub fn table(&self, duration: Duration) -> String {
        let inv = |v: &[InviteReport]| {
            (
                median(v.iter().map(|r| delivered_rate(r, duration)).collect()),
                median(v.iter().map(|r| r.latency.p50 as f64 / 1000.0).collect()),
                median(v.iter().map(|r| r.latency.p99 as f64 / 1000.0).collect()),
                v.iter().map(|r| r.delivered).sum::<u64>(),
                v.iter().map(|r| r.sent).sum::<u64>(),
            )
        };
        let (er, e50, e99, ed, es) = inv(&self.invites_embedded);
        let (pr, p50, p99, pd, ps) = inv(&self.invites_engines);
        let msg = |v: &[MessageFigures]| {
            (
                median(v.iter().map(|m| m.rate).collect()),
                median(v.iter().map(|m| m.latency.p99 as f64 / 1000.0).collect()),
                v.iter().map(|m| m.errors).sum::<u64>(),
            )
        };
        let (sr, s99, serr) = msg(&self.messages_sqlite);
        let (gr, g99, gerr) = msg(&self.messages_postgres);
        let mut s = format!(
            "fleet on engines against the embedded stores, medians of {} kept round(s)\n",
            self.invites_embedded.len()
        );
        s += "invites through 3 signaling nodes (callers on one, callees on the other two)\n";
        s += &format!(
            "  embedded (SQLite + memory directory)  {er:>8.0} delivered/s  p50 {e50:.2} ms  p99 {e99:.2} ms  ({ed}/{es} delivered)\n"
        );
        s += &format!(
            "  PostgreSQL + Redis directory          {pr:>8.0} delivered/s  p50 {p50:.2} ms  p99 {p99:.2} ms  ({pd}/{ps} delivered)\n"
        );
        s += &format!(
            "  engines / embedded                    {:>8.2}x rate       p99 {:.2}x\n",
            pr / er.max(1e-9),
            p99 / e99.max(1e-9)
        );
        s += "durable messages, one node, each sender waits for its ack\n";
        s += &format!(
            "  SQLite      {sr:>8.0} acked/s  p99 {s99:.2} ms  errors {serr}\n  PostgreSQL  {gr:>8.0} acked/s  p99 {g99:.2} ms  errors {gerr}\n"
        );
        s += &format!(
            "  PostgreSQL / SQLite {:.2}x messages/s\n",
            gr / sr.max(1e-9)
        );
        s
    }
}

/// Run the comparison (builds its own runtime for the message runs; the invite runs build
/// theirs).
pub fn run(c: &EnginesConfig) -> Result<EnginesReport> {
    if c.rounds == 0 || c.rounds > 20 {
        return Err(FleetError::Invalid("rounds must be 1..=20".into()));
    }
    // Both stores on the same medium (the system temp dir): fsync costs the same to both.
    let parent = proc::temp_dir(false)?;
    let mut pg = Postgres::start(parent.path())?;
    let redis = Redis::start(parent.path())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut report = EnginesReport {
        invites_embedded: Vec::new(),
        invites_engines: Vec::new(),
        messages_sqlite: Vec::new(),
        messages_postgres: Vec::new(),
    };
    for round in 0..=c.rounds {
        let keep = round > 0;
        let mut ic = InviteConfig::new(c.signaling_bin.clone(), c.rate, c.duration);
        ic.directory_bin = Some(c.directory_bin.clone());
        ic.nodes = 3;
        ic.pairs = c.pairs;
        let embedded = invites::run(&ic)?;
        ic.stores = Some(Stores {
            signaling: pg.create_database()?,
            directory: redis.url(0, &format!("bench{round}")),
        });
        let engines = invites::run(&ic)?;
        eprintln!(
            "round {round}{}: invites p99 embedded {:.2} ms, engines {:.2} ms",
            if keep { "" } else { " (discarded)" },
            embedded.latency.p99 as f64 / 1000.0,
            engines.latency.p99 as f64 / 1000.0
        );
        let mut mc = MessageConfig {
            signaling_bin: c.signaling_bin.clone(),
            duration: c.message_duration,
            concurrency: c.message_concurrency,
            store: None,
        };
        let sqlite = rt.block_on(messages::run(&mc))?;
        mc.store = Some(pg.create_database()?);
        let postgres = rt.block_on(messages::run(&mc))?;
        eprintln!(
            "round {round}: messages/s SQLite {:.0}, PostgreSQL {:.0}",
            sqlite.rate, postgres.rate
        );
        if keep {
            report.invites_embedded.push(embedded);
            report.invites_engines.push(engines);
            report.messages_sqlite.push(sqlite);
            report.messages_postgres.push(postgres);
        }
    }
    rt.shutdown_timeout(Duration::from_secs(5));
    Ok(report)
}
