//! Directory lookups over HTTP against a real `peerlink-directory` process (single-user
//! `GET /v1/presence/{user}` and batch `POST /v1/presence/lookup`, through the project's own
//! `DirectoryClient`), with the rate of the same process's `GET /healthz` (an HTTP request that
//! does no work) at the same concurrency measured in the same run as the baseline: the ratio
//! says what a lookup costs beyond the HTTP round trip. Rounds alternate floor / single /
//! batch; the first round is discarded; medians are reported. Per-core figures divide lookups by the directory
//! process's own CPU time (user + system) over the same rounds; the load generator runs on the
//! same two cores, so the wall-clock rates understate what a dedicated core would do.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use peerlink_api::directory::{
    NodePresence, PresenceBatchRequest, PresenceStatus, RegisterNodeRequest,
};
use peerlink_api::directory_client::DirectoryClient;
use serde::Serialize;

use super::proc;
use super::stats::{self, Percentiles};
use super::{FleetError, Result, within};

/// Signaling nodes the users are spread over.
const NODES: usize = 10;

/// What to run.
#[derive(Clone, Debug)]
pub struct DirectoryConfig {
    /// `peerlink-directory` binary.
    pub directory_bin: PathBuf,
    /// Users with one online device each.
    pub users: usize,
    /// Concurrent single-lookup clients.
    pub concurrency: usize,
    /// Concurrent batch clients.
    pub batch_concurrency: usize,
    /// Users per batch lookup.
    pub batch: usize,
    /// Length of each phase of a round.
    pub duration: Duration,
    /// Kept rounds (one more is run first and discarded).
    pub rounds: usize,
    /// Overall time limit.
    pub timeout: Duration,
}

impl DirectoryConfig {
    /// Defaults: 100,000 users, 32 single clients, 16 batch clients of 100 users, 3 rounds.
    pub fn new(directory_bin: PathBuf, duration: Duration) -> Self {
        Self {
            directory_bin,
            users: 100_000,
            concurrency: 32,
            batch_concurrency: 16,
            batch: 100,
            duration,
            rounds: 3,
            timeout: Duration::from_secs(600),
        }
    }
}

/// One HTTP phase's figures over the kept rounds.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct HttpPhase {
    /// Requests/s per kept round.
    pub request_rates: Vec<f64>,
    /// Median requests/s.
    pub requests_per_sec: f64,
    /// Median users looked up per second.
    pub lookups_per_sec: f64,
    /// Users looked up per second of the directory's CPU time.
    pub lookups_per_cpu_sec: f64,
    /// Requests that succeeded.
    pub requests_ok: u64,
    /// Requests that failed.
    pub requests_failed: u64,
    /// Users looked up (answers counted).
    pub users_answered: u64,
    /// Answers without the user's device (should be 0: every user is online).
    pub users_missing: u64,
    /// Request latency, µs.
    pub latency: Percentiles,
}

/// Figures of one run.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct DirectoryReport {
    /// Users present.
    pub users: usize,
    /// Kept rounds.
    pub rounds: usize,
    /// Single-lookup clients.
    pub concurrency: usize,
    /// Batch clients.
    pub batch_concurrency: usize,
    /// Users per batch.
    pub batch: usize,
    /// `GET /healthz` requests/s per kept round, `concurrency` clients (the baseline).
    pub floor_rates: Vec<f64>,
    /// Median `GET /healthz` requests/s.
    pub floor_per_sec: f64,
    /// Single lookups over HTTP.
    pub single: HttpPhase,
    /// Batch lookups over HTTP.
    pub batched: HttpPhase,
}

impl DirectoryReport {
    /// Human table.
    pub fn table(&self) -> String {
        let mut s = format!(
            "directory lookups: {} users on {NODES} nodes, loopback HTTP (DirectoryClient), medians of {} rounds\n",
            self.users, self.rounds
        );
        s += &format!(
            "  {:<44} {:>12} {:>16} {:>12} {:>10}\n",
            "", "lookups/s", "per CPU-second", "requests/s", "vs floor"
        );
        s += &format!(
            "  {:<44} {:>12} {:>16} {:>12.0} {:>10}\n",
            format!("HTTP GET /healthz, {} clients (floor)", self.concurrency),
            "-",
            "-",
            self.floor_per_sec,
            "1.000"
        );
        let row = |name: String, p: &HttpPhase| {
            format!(
                "  {:<44} {:>12.0} {:>16.0} {:>12.0} {:>10.3}\n",
                name,
                p.lookups_per_sec,
                p.lookups_per_cpu_sec,
                p.requests_per_sec,
                p.requests_per_sec / self.floor_per_sec.max(1e-9)
            )
        };
        s += &row(
            format!("HTTP GET single, {} clients", self.concurrency),
            &self.single,
        );
        s += &row(
            format!(
                "HTTP POST batch x{}, {} clients",
                self.batch, self.batch_concurrency
            ),
            &self.batched,
        );
        s += &format!(
            "  requests ok/failed: single {}/{}, batch {}/{}; users answered without device: {}\n",
            self.single.requests_ok,
            self.single.requests_failed,
            self.batched.requests_ok,
            self.batched.requests_failed,
            self.single.users_missing + self.batched.users_missing
        );
        s += "  target: >= 50,000 lookups/s per core (per CPU-second of the directory process)\n";
        s += &stats::header("  request latency");
        s += &stats::row(&self.single.latency, "  single GET");
        s += &stats::row(
            &self.batched.latency,
            &format!("  batch POST x{}", self.batch),
        );
        s
    }
}

fn user(i: usize) -> String {
    format!("user-{i:07}")
}

/// Pseudo-random user indices (xorshift, fixed seed).
fn order(n: usize, users: usize, seed: u64) -> Vec<String> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            user((x % users as u64) as usize)
        })
        .collect()
}

fn node_req(n: usize) -> RegisterNodeRequest {
    RegisterNodeRequest {
        node_id: format!("node-{n}"),
        internal_url: format!("http://127.0.0.1:{}", 9000 + n),
        epoch: 1,
        load: 0.0,
    }
}

fn entries(n: usize, users: usize) -> Vec<NodePresence> {
    (n..users)
        .step_by(NODES)
        .map(|i| NodePresence {
            user: user(i),
            device: "phone".into(),
            status: PresenceStatus::Online,
        })
        .collect()
}

/// `GET /healthz` requests/s of `tasks` closed-loop clients for `d`.
async fn floor_phase(client: &DirectoryClient, tasks: usize, d: Duration) -> f64 {
    let start = Instant::now();
    let end = start + d;
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut ok = 0u64;
                while Instant::now() < end {
                    if client.health().await.is_ok() {
                        ok += 1;
                    }
                }
                ok
            })
        })
        .collect();
    let mut ok = 0u64;
    for h in handles {
        ok += h.await.unwrap_or(0);
    }
    ok as f64 / start.elapsed().as_secs_f64().max(1e-9)
}

struct Phase {
    ok: u64,
    failed: u64,
    answered: u64,
    missing: u64,
    secs: f64,
    hist: hdrhistogram::Histogram<u64>,
}

async fn http_phase(
    client: &DirectoryClient,
    users: usize,
    tasks: usize,
    batch: usize,
    d: Duration,
) -> Phase {
    let start = Instant::now();
    let end = start + d;
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let client = client.clone();
            tokio::spawn(async move {
                let keys = order(4096, users, 0x5555 + t as u64);
                let mut h = stats::histogram();
                let (mut ok, mut failed, mut answered, mut missing) = (0u64, 0u64, 0u64, 0u64);
                let mut i = 0usize;
                while Instant::now() < end {
                    let t0 = Instant::now();
                    let r = if batch == 1 {
                        client
                            .lookup_user(&keys[i % keys.len()])
                            .await
                            .map(|u| vec![u])
                    } else {
                        let us: Vec<String> = (0..batch)
                            .map(|j| keys[(i + j) % keys.len()].clone())
                            .collect();
                        client.lookup_users(&us).await
                    };
                    let us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
                    match r {
                        Ok(locs) => {
                            ok += 1;
                            stats::record(&mut h, us);
                            answered += locs.len() as u64;
                            missing += locs.iter().filter(|l| l.devices.is_empty()).count() as u64;
                        }
                        Err(_) => failed += 1,
                    }
                    i += batch;
                }
                (ok, failed, answered, missing, h)
            })
        })
        .collect();
    let mut p = Phase {
        ok: 0,
        failed: 0,
        answered: 0,
        missing: 0,
        secs: 0.0,
        hist: stats::histogram(),
    };
    for h in handles {
        if let Ok((ok, failed, answered, missing, hist)) = h.await {
            p.ok += ok;
            p.failed += failed;
            p.answered += answered;
            p.missing += missing;
            let _ = p.hist.add(&hist);
        }
    }
    p.secs = start.elapsed().as_secs_f64();
    p
}

#[derive(Default)]
struct Acc {
    rates: Vec<f64>,
    lookup_rates: Vec<f64>,
    ok: u64,
    failed: u64,
    answered: u64,
    missing: u64,
    cpu: Duration,
    hist: Option<hdrhistogram::Histogram<u64>>,
}

impl Acc {
    fn add(&mut self, p: &Phase, cpu: Duration) {
        self.rates.push(p.ok as f64 / p.secs.max(1e-9));
        self.lookup_rates.push(p.answered as f64 / p.secs.max(1e-9));
        self.ok += p.ok;
        self.failed += p.failed;
        self.answered += p.answered;
        self.missing += p.missing;
        self.cpu += cpu;
        let h = self.hist.get_or_insert_with(stats::histogram);
        let _ = h.add(&p.hist);
    }
    fn done(self) -> HttpPhase {
        HttpPhase {
            requests_per_sec: stats::median(&self.rates),
            lookups_per_sec: stats::median(&self.lookup_rates),
            lookups_per_cpu_sec: self.answered as f64 / self.cpu.as_secs_f64().max(1e-9),
            request_rates: self.rates,
            requests_ok: self.ok,
            requests_failed: self.failed,
            users_answered: self.answered,
            users_missing: self.missing,
            latency: self.hist.as_ref().map(Percentiles::of).unwrap_or_default(),
        }
    }
}

/// Run the benchmark (builds its own runtime).
pub fn run(c: &DirectoryConfig) -> Result<DirectoryReport> {
    if c.users < NODES || c.users > 10_000_000 || c.concurrency == 0 || c.batch_concurrency == 0 {
        return Err(FleetError::Invalid(
            "users 10..=10,000,000; concurrencies >= 1".into(),
        ));
    }
    if c.batch < 2 || c.batch > peerlink_api::directory::MAX_LOOKUP_BATCH || c.rounds == 0 {
        return Err(FleetError::Invalid(
            "batch must be 2..=5000 and rounds >= 1".into(),
        ));
    }
    let deadline = Instant::now() + c.timeout;
    proc::raise_nofile(65_536)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let dir = proc::temp_dir(true)?;
    let node = proc::start_directory(&c.directory_bin, dir.path())?;
    let client = DirectoryClient::new(&format!("http://{}", node.addr), super::CLUSTER_TOKEN)?;

    rt.block_on(within(
        Duration::from_secs(300),
        "populating the directory",
        async {
            for n in 0..NODES {
                client.register_node(&node_req(n)).await?;
                for chunk in entries(n, c.users).chunks(peerlink_api::directory::MAX_PRESENCE_BATCH)
                {
                    client
                        .update_presence_batch(&PresenceBatchRequest {
                            node_id: format!("node-{n}"),
                            node_epoch: 1,
                            entries: chunk.to_vec(),
                        })
                        .await?;
                }
            }
            Ok(())
        },
    ))?;

    let (mut floor_rates, mut single, mut batched) = (Vec::new(), Acc::default(), Acc::default());
    for round in 0..=c.rounds {
        if Instant::now() + 3 * c.duration > deadline {
            return Err(FleetError::Timeout(format!(
                "directory: round {round} would pass the time limit"
            )));
        }
        let fr = rt.block_on(floor_phase(&client, c.concurrency, c.duration));
        let cpu0 = node.cpu_time()?;
        let s = rt.block_on(http_phase(&client, c.users, c.concurrency, 1, c.duration));
        let cpu1 = node.cpu_time()?;
        let b = rt.block_on(http_phase(
            &client,
            c.users,
            c.batch_concurrency,
            c.batch,
            c.duration,
        ));
        let cpu2 = node.cpu_time()?;
        if round == 0 {
            continue;
        }
        floor_rates.push(fr);
        single.add(&s, cpu1.saturating_sub(cpu0));
        batched.add(&b, cpu2.saturating_sub(cpu1));
    }
    drop(node);
    rt.shutdown_timeout(Duration::from_secs(5));
    Ok(DirectoryReport {
        users: c.users,
        rounds: c.rounds,
        concurrency: c.concurrency,
        batch_concurrency: c.batch_concurrency,
        batch: c.batch,
        floor_per_sec: stats::median(&floor_rates),
        floor_rates,
        single: single.done(),
        batched: batched.done(),
    })
}
