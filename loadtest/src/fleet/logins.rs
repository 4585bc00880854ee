//! Login rate and latency of a signaling node (`POST /v1/login`, Argon2id-bound), next to a
//! baseline measured in the same run on the same machine: the raw Argon2id verify rate of the
//! `argon2` crate with the node's parameters on as many threads as the node hashes at once.
//! Rounds alternate baseline / logins; the first of each is discarded; medians are reported,
//! and their ratio shows the server's overhead (HTTP, JSON, SQLite lookup, token signing,
//! queueing). Logins are closed loop with `concurrency` clients.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHasher as _, PasswordVerifier as _, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use peerlink_api::signaling_client::HttpApi;
use serde::{Deserialize, Serialize};

use super::proc;
use super::stats::{self, Percentiles};
use super::{FleetError, Result, within};

/// Argon2id cost, given to the node (`--argon2-m-kib`, `--argon2-t`, `--argon2-p`) and used by
/// the baseline, so both hash alike by construction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Argon2Cost {
    /// Memory, KiB.
    pub m_kib: u32,
    /// Iterations.
    pub t: u32,
    /// Lanes.
    pub p: u32,
}

impl Default for Argon2Cost {
    /// OWASP's password storage minimum (m = 19 MiB, t = 2, p = 1), also the node's default.
    fn default() -> Self {
        Self {
            m_kib: 19_456,
            t: 2,
            p: 1,
        }
    }
}

/// Hashes a node computes at once by default (its `--hash-concurrency`); the node under test
/// is always started with the configured value.
pub const DEFAULT_HASH_CONCURRENCY: usize = 2;

/// What to run.
#[derive(Clone, Debug)]
pub struct LoginConfig {
    /// `peerlink-signaling` binary.
    pub signaling_bin: PathBuf,
    /// Clients logging in at once (each its own account).
    pub concurrency: usize,
    /// Length of each round.
    pub duration: Duration,
    /// Kept rounds (one more is run first and discarded).
    pub rounds: usize,
    /// Argon2id cost given to the node and used by the baseline.
    pub cost: Argon2Cost,
    /// Hashes the node computes at once (`--hash-concurrency`) = baseline threads.
    pub hash_concurrency: usize,
    /// Overall time limit.
    pub timeout: Duration,
}

impl LoginConfig {
    /// Defaults: the node's production cost and hash concurrency, 8 clients, 3 rounds.
    pub fn new(signaling_bin: PathBuf, duration: Duration) -> Self {
        Self {
            signaling_bin,
            concurrency: 8,
            duration,
            rounds: 3,
            cost: Argon2Cost::default(),
            hash_concurrency: DEFAULT_HASH_CONCURRENCY,
            timeout: Duration::from_secs(600),
        }
    }
}

/// Figures of one run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoginReport {
    /// Argon2id cost.
    pub cost: Argon2Cost,
    /// Node hash concurrency = baseline threads.
    pub hash_concurrency: usize,
    /// Clients.
    pub concurrency: usize,
    /// Kept rounds.
    pub rounds: usize,
    /// Raw Argon2id verifies/s per kept round.
    pub raw_rates: Vec<f64>,
    /// Successful logins/s per kept round.
    pub login_rates: Vec<f64>,
    /// Median raw verifies/s.
    pub raw_rate: f64,
    /// Median logins/s.
    pub login_rate: f64,
    /// login_rate / raw_rate.
    pub ratio: f64,
    /// Successful logins in kept rounds.
    pub logins_ok: u64,
    /// Failed login requests in kept rounds (any non-200 answer or transport error).
    pub logins_failed: u64,
    /// Login latency over kept rounds, µs.
    pub latency: Percentiles,
    /// Node CPU time per successful login in kept rounds, µs.
    pub node_cpu_us_per_login: f64,
    /// Baseline CPU time per raw verify (this process's CPU time / verifies), µs.
    pub raw_cpu_us_per_verify: f64,
}

impl LoginReport {
    /// Human table.
    pub fn table(&self) -> String {
        let mut s = format!(
            "logins against one peerlink-signaling node (Argon2id m={} KiB t={} p={}, {} hashes at once), {} clients\n",
            self.cost.m_kib, self.cost.t, self.cost.p, self.hash_concurrency, self.concurrency
        );
        s += &format!(
            "  {:<40} {:>10} {:>16}\n",
            "", "per second", "CPU per op (ms)"
        );
        s += &format!(
            "  {:<40} {:>10.1} {:>16.2}\n",
            format!(
                "raw argon2 verify, {} threads (baseline)",
                self.hash_concurrency
            ),
            self.raw_rate,
            self.raw_cpu_us_per_verify / 1000.0
        );
        s += &format!(
            "  {:<40} {:>10.1} {:>16.2}\n",
            "POST /v1/login",
            self.login_rate,
            self.node_cpu_us_per_login / 1000.0
        );
        s += &format!(
            "  ratio logins / raw verifies            {:>10.3}   (medians of {} rounds each, A/B alternating, first discarded)\n",
            self.ratio, self.rounds
        );
        s += &format!(
            "  CPU per login / CPU per raw verify     {:>10.3}   (steadier than the rates on a shared machine)\n",
            self.node_cpu_us_per_login / self.raw_cpu_us_per_verify.max(1e-9)
        );
        s += &format!(
            "  rounds: raw {:?}  logins {:?}\n",
            self.raw_rates.iter().map(|v| v.round()).collect::<Vec<_>>(),
            self.login_rates
                .iter()
                .map(|v| v.round())
                .collect::<Vec<_>>()
        );
        s += &format!(
            "  logins ok / failed                     {:>10} / {}\n",
            self.logins_ok, self.logins_failed
        );
        s += &stats::header("  latency");
        s += &stats::row(&self.latency, "  POST /v1/login");
        s
    }
}

/// Raw verifies per second on `threads` threads for `d` (PHC string with `cost`).
pub fn raw_verify_rate(cost: Argon2Cost, threads: usize, d: Duration) -> Result<(f64, u64)> {
    let params = Params::new(cost.m_kib, cost.t, cost.p, None)
        .map_err(|e| FleetError::Invalid(format!("argon2 params: {e}")))?;
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
    let salt = SaltString::encode_b64(b"loadtest-salt-16")
        .map_err(|e| FleetError::Invalid(format!("salt: {e}")))?;
    let phc = argon
        .hash_password(super::PASSWORD.as_bytes(), &salt)
        .map_err(|e| FleetError::Invalid(format!("hash: {e}")))?
        .to_string();
    let count = AtomicU64::new(0);
    let start = Instant::now();
    let end = start + d;
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                let Ok(parsed) = argon2::PasswordHash::new(&phc) else {
                    return;
                };
                // Bounded by time: each verify takes milliseconds.
                while Instant::now() < end {
                    if argon
                        .verify_password(super::PASSWORD.as_bytes(), &parsed)
                        .is_ok()
                    {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let n = count.load(Ordering::Relaxed);
    if n == 0 {
        return Err(FleetError::Protocol("baseline verified nothing".into()));
    }
    Ok((n as f64 / start.elapsed().as_secs_f64(), n))
}

struct Round {
    ok: u64,
    failed: u64,
    secs: f64,
    hist: hdrhistogram::Histogram<u64>,
}

async fn login_round(api: &HttpApi, users: &[String], d: Duration) -> Round {
    let start = Instant::now();
    let end = start + d;
    let tasks: Vec<_> = users
        .iter()
        .map(|u| {
            let (api, u) = (api.clone(), u.clone());
            tokio::spawn(async move {
                let mut h = stats::histogram();
                let (mut ok, mut failed) = (0u64, 0u64);
                while Instant::now() < end {
                    let t = Instant::now();
                    match super::login(&api, &u).await {
                        Ok(_) => {
                            ok += 1;
                            stats::record(
                                &mut h,
                                u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX),
                            );
                        }
                        Err(_) => failed += 1,
                    }
                }
                (ok, failed, h)
            })
        })
        .collect();
    let mut r = Round {
        ok: 0,
        failed: 0,
        secs: 0.0,
        hist: stats::histogram(),
    };
    for t in tasks {
        if let Ok((ok, failed, h)) = t.await {
            r.ok += ok;
            r.failed += failed;
            let _ = r.hist.add(&h);
        }
    }
    r.secs = start.elapsed().as_secs_f64();
    r
}

/// Run the benchmark (builds its own runtime).
pub fn run(c: &LoginConfig) -> Result<LoginReport> {
    if c.concurrency == 0 || c.concurrency > 10_000 || c.rounds == 0 || c.hash_concurrency == 0 {
        return Err(FleetError::Invalid(
            "concurrency 1..=10000, rounds and hash concurrency >= 1".into(),
        ));
    }
    let deadline = Instant::now() + c.timeout;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let dir = proc::temp_dir(true)?;
    let flags: Vec<String> = vec![
        "--argon2-m-kib".into(),
        c.cost.m_kib.to_string(),
        "--argon2-t".into(),
        c.cost.t.to_string(),
        "--argon2-p".into(),
        c.cost.p.to_string(),
        "--hash-concurrency".into(),
        c.hash_concurrency.to_string(),
    ];
    let node = proc::start_signaling(&c.signaling_bin, dir.path(), "signaling", &flags, &[])?;
    let base = format!("http://{}", node.addr);
    rt.block_on(within(
        Duration::from_secs(300),
        "creating login accounts",
        super::accounts(&base, "login", c.concurrency, c.concurrency),
    ))?;
    let api = super::signaling_api(&base)?;
    let users: Arc<Vec<String>> =
        Arc::new((0..c.concurrency).map(|i| format!("login{i}")).collect());
    let (mut raw_rates, mut login_rates) = (Vec::new(), Vec::new());
    let mut hist = stats::histogram();
    let (mut ok, mut failed, mut raw_n, mut raw_secs) = (0u64, 0u64, 0u64, 0.0f64);
    let mut cpu = Duration::ZERO;
    for round in 0..=c.rounds {
        if Instant::now() + 2 * c.duration > deadline {
            return Err(FleetError::Timeout(format!(
                "logins: round {round} would pass the time limit"
            )));
        }
        // This process's CPU time over the baseline (its runtime is idle meanwhile).
        let me0 = proc::cpu_time(std::process::id())?;
        let (raw, n) = raw_verify_rate(c.cost, c.hash_concurrency, c.duration)?;
        let raw_cpu = proc::cpu_time(std::process::id())?.saturating_sub(me0);
        let cpu0 = node.cpu_time()?;
        let r = rt.block_on(login_round(&api, &users, c.duration));
        let cpu1 = node.cpu_time()?;
        if round == 0 {
            continue;
        }
        raw_rates.push(raw);
        raw_n += n;
        raw_secs += raw_cpu.as_secs_f64();
        login_rates.push(r.ok as f64 / r.secs.max(1e-9));
        ok += r.ok;
        failed += r.failed;
        cpu += cpu1.saturating_sub(cpu0);
        let _ = hist.add(&r.hist);
    }
    drop(node);
    rt.shutdown_timeout(Duration::from_secs(5));
    let raw_rate = stats::median(&raw_rates);
    let login_rate = stats::median(&login_rates);
    Ok(LoginReport {
        cost: c.cost,
        hash_concurrency: c.hash_concurrency,
        concurrency: c.concurrency,
        rounds: c.rounds,
        raw_rates,
        login_rates,
        raw_rate,
        login_rate,
        ratio: login_rate / raw_rate.max(1e-9),
        logins_ok: ok,
        logins_failed: failed,
        latency: Percentiles::of(&hist),
        node_cpu_us_per_login: cpu.as_micros() as f64 / ok.max(1) as f64,
        raw_cpu_us_per_verify: raw_secs * 1e6 / raw_n.max(1) as f64,
    })
}
