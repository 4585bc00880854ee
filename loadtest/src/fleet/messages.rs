//! Durable messages: senders on one signaling node each send a text message and wait for its
//! `message_ack` before sending the next (closed loop). The node acknowledges a message only
//! once its store committed it (SQLite fsync'd, or PostgreSQL with `synchronous_commit=on`), so
//! acknowledged messages per second is the rate at which the store makes messages durable.
//! The recipients are offline: the figure is the store's, not delivery's.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use peerlink_api::signaling::{ClientMsg, ServerMsg};
use peerlink_api::signaling_client::{ConnectOptions, Connection};
use serde::Serialize;

use super::proc;
use super::stats::{self, Percentiles};
use super::{FleetError, Result, within};

/// What to run.
#[derive(Clone, Debug)]
pub struct MessageConfig {
    /// `peerlink-signaling` binary.
    pub signaling_bin: PathBuf,
    /// Sending time.
    pub duration: Duration,
    /// Senders, each with one message in flight.
    pub concurrency: usize,
    /// The node's `--store` (`postgres://...`); None: SQLite in a temp dir on disk.
    pub store: Option<String>,
}

/// Figures of one run.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct MessageFigures {
    /// `sqlite` or `postgres`.
    pub store: String,
    /// Senders.
    pub concurrency: usize,
    /// Messages acknowledged.
    pub acked: u64,
    /// Acknowledged messages per second.
    pub rate: f64,
    /// Error frames instead of acks.
    pub errors: u64,
    /// Send -> ack, µs.
    pub latency: Percentiles,
}

/// Run one measurement (inside the caller's runtime).
pub async fn run(c: &MessageConfig) -> Result<MessageFigures> {
    if c.concurrency == 0 || c.concurrency > 1000 {
        return Err(FleetError::Invalid("concurrency must be 1..=1000".into()));
    }
    // On disk, like a PostgreSQL data directory: fsync costs what it costs there.
    let dir = proc::temp_dir(false)?;
    let mut flags: Vec<String> = ["--msg-rate", "100000", "--msg-burst", "100000"]
        .iter()
        .chain(&["--argon2-m-kib", "64", "--argon2-t", "1"])
        .map(|s| s.to_string())
        .collect();
    if let Some(s) = &c.store {
        flags.extend(["--store".to_owned(), s.clone()]);
    }
    let mut node = proc::start_signaling(&c.signaling_bin, dir.path(), "signaling", &flags, &[])?;
    let base = format!("http://{}", node.addr);
    let senders = within(
        Duration::from_secs(120),
        "sender accounts",
        super::accounts(&base, "sender", c.concurrency, 16),
    )
    .await?;
    within(
        Duration::from_secs(120),
        "recipient accounts",
        super::accounts(&base, "rcpt", c.concurrency, 16),
    )
    .await?;
    let api = super::signaling_api(&base)?;
    let opts = ConnectOptions {
        timeout: Duration::from_secs(30),
        ..ConnectOptions::default()
    };
    let mut conns = Vec::with_capacity(c.concurrency);
    for t in &senders {
        conns.push(Connection::open(&api, t, "bench", None, &opts).await?);
    }
    let start = Instant::now();
    let end = start + c.duration;
    let mut tasks = Vec::new();
    for (i, conn) in conns.into_iter().enumerate() {
        tasks.push(tokio::spawn(sender(conn, i, end)));
    }
    let mut lat = stats::histogram();
    let (mut acked, mut errors) = (0, 0);
    for t in tasks {
        let (h, a, e) = within(c.duration + Duration::from_secs(30), "sender", async {
            t.await
                .map_err(|e| FleetError::Protocol(format!("sender task: {e}")))?
        })
        .await?;
        lat.add(&h)
            .map_err(|e| FleetError::Protocol(e.to_string()))?;
        acked += a;
        errors += e;
    }
    let took = start.elapsed().as_secs_f64();
    if !node.alive() {
        return Err(node.failed("node exited during the run"));
    }
    Ok(MessageFigures {
        store: if c.store.is_some() {
            "postgres"
        } else {
            "sqlite"
        }
        .into(),
        concurrency: c.concurrency,
        acked,
        rate: acked as f64 / took.max(1e-9),
        errors,
        latency: Percentiles::of(&lat),
    })
}

/// One sender: message, wait for its ack, next, until `end`.
async fn sender(
    mut conn: Connection,
    i: usize,
    end: Instant,
) -> Result<(hdrhistogram::Histogram<u64>, u64, u64)> {
    let mut lat = stats::histogram();
    let (mut acked, mut errors) = (0, 0);
    let mut k = 0u64;
    while Instant::now() < end {
        k += 1;
        let id = format!("b{i}-{k}");
        let t0 = Instant::now();
        conn.send(&ClientMsg::SendMessage {
            id: id.clone(),
            to: format!("rcpt{i}"),
            from: None,
            body: "a durable benchmark message of a typical chat line's length".into(),
        })
        .await?;
        loop {
            let m = tokio::time::timeout(Duration::from_secs(30), conn.recv())
                .await
                .map_err(|_| FleetError::Timeout(format!("ack of {id}")))??;
            match m {
                ServerMsg::MessageAck { id: got, .. } if got == id => {
                    stats::record(
                        &mut lat,
                        u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX),
                    );
                    acked += 1;
                    break;
                }
                ServerMsg::Error { id: Some(got), .. } if got == id => {
                    errors += 1;
                    break;
                }
                _ => {}
            }
        }
    }
    Ok((lat, acked, errors))
}
