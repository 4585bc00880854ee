//! Figures per round, medians per server, ratios peerlink/coturn; a human table and JSON.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use super::server::ServerKind;
use super::traffic::RoundResult;
use super::{AllocConfig, TrafficConfig};

/// The figures of one measured round.
#[derive(Clone, Debug, Serialize)]
pub struct RoundFigures {
    /// Offered packets/s.
    pub offered_pps: f64,
    /// Packets/s the kernel accepted from the generator.
    pub sent_pps: f64,
    /// Packets/s delivered to the receiving clients (forwarded by the relay).
    pub received_pps: f64,
    /// Packets sent.
    pub sent: u64,
    /// Packets received.
    pub received: u64,
    /// Packets lost (per-flow sent - received, summed).
    pub lost: u64,
    /// lost / sent.
    pub loss_fraction: f64,
    /// Duplicates, misrouted packets, stray datagrams, send errors (all should be 0).
    pub duplicated: u64,
    /// Our packets on the wrong socket.
    pub misrouted: u64,
    /// Datagrams that were not this round's packets.
    pub stray: u64,
    /// Sends the kernel refused.
    pub send_errors: u64,
    /// End-to-end latency percentiles (µs).
    pub e2e_p50_us: u64,
    /// 90th percentile.
    pub e2e_p90_us: u64,
    /// 99th percentile.
    pub e2e_p99_us: u64,
    /// 99.9th percentile.
    pub e2e_p999_us: u64,
    /// Maximum.
    pub e2e_max_us: u64,
    /// Server CPU time (all threads) during the round, seconds.
    pub server_cpu_s: f64,
    /// Server CPU µs per forwarded (received) packet.
    pub server_cpu_us_per_pkt: f64,
    /// Server CPU / round wall time.
    pub server_core_fraction: f64,
    /// Generator CPU (sender + receiver) / round wall time.
    pub gen_core_fraction: f64,
    /// The generator, not the server, was the limit in this round.
    pub generator_limited: bool,
    /// Times the server's threads went to sleep (voluntary context switches) per 1000
    /// forwarded packets: wake-ups dominate CPU per packet at a fixed rate.
    pub server_sleeps_per_kpkt: f64,
}

impl RoundFigures {
    /// From a round's result and the server CPU time it used.
    pub fn new(r: &RoundResult, server_cpu: Duration) -> Self {
        let h = &r.latency_us;
        let q = |x: f64| {
            if h.is_empty() {
                0
            } else {
                h.value_at_quantile(x)
            }
        };
        Self {
            offered_pps: r.offered_pps,
            sent_pps: r.sent_pps,
            received_pps: r.received_pps,
            sent: r.sent,
            received: r.received,
            lost: r.lost,
            loss_fraction: r.loss_fraction(),
            duplicated: r.duplicated,
            misrouted: r.misrouted,
            stray: r.stray,
            send_errors: r.send_errors,
            e2e_p50_us: q(0.5),
            e2e_p90_us: q(0.9),
            e2e_p99_us: q(0.99),
            e2e_p999_us: q(0.999),
            e2e_max_us: if h.is_empty() { 0 } else { h.max() },
            server_cpu_s: server_cpu.as_secs_f64(),
            server_cpu_us_per_pkt: if r.received == 0 {
                0.0
            } else {
                server_cpu.as_secs_f64() * 1e6 / r.received as f64
            },
            server_core_fraction: server_cpu.as_secs_f64() / r.wall.as_secs_f64().max(1e-9),
            gen_core_fraction: r.generator_core_fraction(),
            generator_limited: r.generator_limited(),
            server_sleeps_per_kpkt: 0.0,
        }
    }

    /// Adds the server's voluntary context switches during the round.
    pub fn with_server_sleeps(mut self, sleeps: u64) -> Self {
        self.server_sleeps_per_kpkt = if self.received == 0 {
            0.0
        } else {
            sleeps as f64 * 1000.0 / self.received as f64
        };
        self
    }
}

/// One max-rate search.
#[derive(Clone, Debug, Serialize)]
pub struct MaxSearch {
    /// The highest-rate step within the loss threshold.
    pub best: Option<RoundFigures>,
    /// Every step.
    pub steps: Vec<RoundFigures>,
    /// The search stopped because the generator could not offer more.
    pub generator_limited: bool,
}

/// Target for the in-relay p99 at half of max load, µs.
pub const IN_RELAY_P99_TARGET_US: f64 = 50.0;

/// The half-load round with peerlink's own in-relay latency.
#[derive(Clone, Debug, Serialize)]
pub struct HalfLoad {
    /// The round.
    pub round: RoundFigures,
    /// `/stats` latency_interval_us.p50 read near the end of the round.
    pub in_relay_p50_us: Option<f64>,
    /// `/stats` latency_interval_us.p99.
    pub in_relay_p99_us: Option<f64>,
    /// Samples in that interval.
    pub in_relay_samples: Option<f64>,
    /// `/stats` latency_interval_us.p90.
    pub in_relay_p90_us: Option<f64>,
    /// `/stats` latency_interval_us.p999.
    pub in_relay_p999_us: Option<f64>,
    /// `/stats` latency_interval_us.max.
    pub in_relay_max_us: Option<f64>,
}

impl HalfLoad {
    /// From the round and the `/stats` document read during it.
    pub fn new(round: RoundFigures, stats: Option<serde_json::Value>) -> Self {
        let get = |k: &str| {
            stats
                .as_ref()
                .and_then(|s| s.get("latency_interval_us"))
                .and_then(|l| l.get(k))
                .and_then(|v| v.as_f64())
        };
        Self {
            in_relay_p50_us: get("p50"),
            in_relay_p99_us: get("p99"),
            in_relay_samples: get("count"),
            in_relay_p90_us: get("p90"),
            in_relay_p999_us: get("p999"),
            in_relay_max_us: get("max"),
            round,
        }
    }
}

/// The half-load probes through one latency floor (an echo placed like the servers;
/// `latency_interval_us` is its own), in order.
#[derive(Clone, Debug, Serialize)]
pub struct FloorProbes {
    /// Which echo.
    pub io: super::floor::FloorIo,
    /// Its probes.
    pub probes: Vec<HalfLoad>,
}

impl FloorProbes {
    /// The median p99 over the probes.
    pub fn p99(&self) -> Option<f64> {
        median(p99s(&self.probes))
    }
}

/// The p99 of each probe that read its stats, in order.
fn p99s(probes: &[HalfLoad]) -> Vec<f64> {
    probes.iter().filter_map(|h| h.in_relay_p99_us).collect()
}

/// One half-load probe's line.
fn half_load_line(label: &str, h: &HalfLoad, tick_us: u128) -> String {
    let f = &h.round;
    format!(
        "  half-load probe {label}: offered {:.0} pkt/s in {tick_us} µs steps, sent {:.0}, loss {:.3}%, generator core {:.0}%, in-process p50 {} / p90 {} / p99 {} / p99.9 {} / max {} µs over {} samples\n",
        f.offered_pps,
        f.sent_pps,
        f.loss_fraction * 100.0,
        f.gen_core_fraction * 100.0,
        fmt1(h.in_relay_p50_us),
        fmt1(h.in_relay_p90_us),
        fmt1(h.in_relay_p99_us),
        fmt1(h.in_relay_p999_us),
        fmt1(h.in_relay_max_us),
        fmt0(h.in_relay_samples),
    )
}

/// Everything measured on one server in a traffic run.
#[derive(Clone, Debug, Serialize)]
pub struct ServerReport {
    /// Which server.
    pub server: ServerKind,
    /// Allocations alive at the end.
    pub allocations: usize,
    /// Fixed-rate rounds (all, including the discarded first).
    pub fixed: Vec<RoundFigures>,
    /// Max searches (all, including the discarded first).
    pub max: Vec<MaxSearch>,
    /// peerlink only: the half-load probes, in order.
    pub half_load: Vec<HalfLoad>,
    /// peerlink only: `/stats` at the end.
    pub final_stats: Option<serde_json::Value>,
}

/// uring/epoll CPU per packet at the fixed rate, round by round (the two ran back to back in
/// each round, so a shared host's drift hits both): spread of the ratios and how often io_uring
/// was cheaper. `None` without both servers' kept rounds.
fn paired_note(u: Option<&ServerSummary>, e: Option<&ServerSummary>) -> Option<String> {
    let (u, e) = (u?, e?);
    let ratios: Vec<f64> = u
        .cpu_us_per_pkt_rounds
        .iter()
        .zip(&e.cpu_us_per_pkt_rounds)
        .filter(|(a, b)| **a > 0.0 && **b > 0.0)
        .map(|(a, b)| a / b)
        .collect();
    if ratios.is_empty() {
        return None;
    }
    let wins = ratios.iter().filter(|r| **r < 1.0).count();
    let (lo, hi) = range(&ratios);
    let n = ratios.len();
    Some(format!(
        "uring/epoll CPU us/pkt at fixed rate, round by round: median {:.2}, range {lo:.2}-{hi:.2}; io_uring cheaper in {wins} of {n} rounds (sign test: p = {:.3} for a split this uneven between equals)",
        median(ratios).unwrap_or(f64::NAN),
        sign_test_p(wins, n)
    ))
}

/// Two-sided exact sign test: the probability that two equally costly servers, each cheaper
/// in a round with probability 1/2, split `n` rounds at least as unevenly as `wins` to
/// `n - wins`. Small values mean the split is not noise. Under this host's 15-30 %
/// round-to-round noise a ~1 % difference was not resolved by 400 rounds (p = 0.10).
pub fn sign_test_p(wins: usize, n: usize) -> f64 {
    if n == 0 {
        return 1.0;
    }
    let extreme = wins.max(n - wins);
    // ln P(X = i) for X ~ Binomial(n, 1/2), built up term by term (no overflow for large n).
    let mut ln_pmf = -(n as f64) * std::f64::consts::LN_2;
    let mut tail = 0.0;
    for i in 0..=n {
        if i >= extreme {
            tail += ln_pmf.exp();
        }
        ln_pmf += ((n - i) as f64 / (i + 1) as f64).ln();
    }
    (2.0 * tail).min(1.0)
}

/// Smallest and largest of the values.
fn range(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &x| {
            (l.min(x), h.max(x))
        })
}

/// Median of the values (None if empty).
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

/// The rounds that count: all but the first (unless there is only one).
fn kept<T>(v: &[T]) -> &[T] {
    if v.len() > 1 { &v[1..] } else { v }
}

impl ServerReport {
    /// Empty report for `server`.
    pub fn new(server: ServerKind) -> Self {
        Self {
            server,
            allocations: 0,
            fixed: Vec::new(),
            max: Vec::new(),
            half_load: Vec::new(),
            final_stats: None,
        }
    }
    /// The in-relay p99 of each half-load probe that read `/stats`, in order.
    pub fn half_load_p99s(&self) -> Vec<f64> {
        p99s(&self.half_load)
    }

    /// Median forwarded packets/s at <= threshold loss.
    pub fn max_pps_median(&self) -> Option<f64> {
        median(
            kept(&self.max)
                .iter()
                .map(|m| m.best.as_ref().map_or(0.0, |b| b.received_pps))
                .collect(),
        )
    }
    /// Median server CPU µs per packet at the best max-search step (saturation).
    pub fn max_cpu_us_per_pkt_median(&self) -> Option<f64> {
        median(
            kept(&self.max)
                .iter()
                .filter_map(|m| m.best.as_ref().map(|b| b.server_cpu_us_per_pkt))
                .collect(),
        )
    }
    fn fixed_median(&self, f: impl Fn(&RoundFigures) -> f64) -> Option<f64> {
        median(kept(&self.fixed).iter().map(f).collect())
    }
    /// Kept max searches that stopped at the generator's limit.
    pub fn max_generator_limited_rounds(&self) -> usize {
        kept(&self.max)
            .iter()
            .filter(|m| m.generator_limited)
            .count()
    }
    /// Kept fixed-rate rounds where the generator offered less than the rate.
    pub fn fixed_generator_short_rounds(&self) -> usize {
        kept(&self.fixed)
            .iter()
            .filter(|f| f.generator_limited)
            .count()
    }
    /// The summary row.
    pub fn summary(&self) -> ServerSummary {
        ServerSummary {
            server: self.server.label(),
            max_pps: self.max_pps_median(),
            max_pps_rounds: kept(&self.max)
                .iter()
                .map(|m| m.best.as_ref().map_or(0.0, |b| b.received_pps))
                .collect(),
            cpu_us_per_pkt_at_max: self.max_cpu_us_per_pkt_median(),
            cpu_us_per_pkt: self.fixed_median(|f| f.server_cpu_us_per_pkt),
            sleeps_per_kpkt: self.fixed_median(|f| f.server_sleeps_per_kpkt),
            cpu_us_per_pkt_rounds: kept(&self.fixed)
                .iter()
                .map(|f| f.server_cpu_us_per_pkt)
                .collect(),
            e2e_p50_us: self.fixed_median(|f| f.e2e_p50_us as f64),
            e2e_p99_us: self.fixed_median(|f| f.e2e_p99_us as f64),
            fixed_loss: self.fixed_median(|f| f.loss_fraction),
            fixed_received_pps: self.fixed_median(|f| f.received_pps),
            gen_core_fraction: self.fixed_median(|f| f.gen_core_fraction),
            in_relay_p99_us_half_load: median(self.half_load_p99s()),
            max_generator_limited_rounds: self.max_generator_limited_rounds(),
            fixed_generator_short_rounds: self.fixed_generator_short_rounds(),
            generator_limited: !self.max.is_empty()
                && self.max_generator_limited_rounds() * 2 > kept(&self.max).len(),
        }
    }
}

/// Medians of one server (kept rounds only).
#[derive(Clone, Debug, Serialize)]
pub struct ServerSummary {
    /// Server label.
    pub server: &'static str,
    /// Forwarded packets/s at <= threshold loss (median).
    pub max_pps: Option<f64>,
    /// Per kept round.
    pub max_pps_rounds: Vec<f64>,
    /// Server CPU µs per packet at that rate (median).
    pub cpu_us_per_pkt_at_max: Option<f64>,
    /// Server CPU µs per forwarded packet at the fixed rate (median).
    pub cpu_us_per_pkt: Option<f64>,
    /// Server sleeps (voluntary context switches) per 1000 forwarded packets at the fixed
    /// rate (median).
    pub sleeps_per_kpkt: Option<f64>,
    /// Per kept round.
    pub cpu_us_per_pkt_rounds: Vec<f64>,
    /// End-to-end p50 at the fixed rate (µs, median over rounds).
    pub e2e_p50_us: Option<f64>,
    /// End-to-end p99 at the fixed rate (µs, median over rounds).
    pub e2e_p99_us: Option<f64>,
    /// Loss at the fixed rate (median).
    pub fixed_loss: Option<f64>,
    /// Delivered packets/s at the fixed rate (median).
    pub fixed_received_pps: Option<f64>,
    /// Generator core use at the fixed rate (median).
    pub gen_core_fraction: Option<f64>,
    /// peerlink: in-relay p99 (µs) from `/stats` at half its max rate, median over the probes.
    pub in_relay_p99_us_half_load: Option<f64>,
    /// Kept max searches that stopped at the generator's limit.
    pub max_generator_limited_rounds: usize,
    /// Kept fixed-rate rounds where the generator was the limit (see `generator_limited`).
    pub fixed_generator_short_rounds: usize,
    /// Most kept max searches stopped at the generator's limit: `max_pps` is a lower bound.
    pub generator_limited: bool,
}

/// A ratio of two servers' figures.
#[derive(Clone, Debug, Serialize)]
pub struct Ratio {
    /// What is compared.
    pub figure: String,
    /// Numerator server.
    pub a: &'static str,
    /// Denominator server.
    pub b: &'static str,
    /// a's value.
    pub a_value: f64,
    /// b's value.
    pub b_value: f64,
    /// a / b.
    pub ratio: f64,
    /// The target for this ratio, as text.
    pub target: &'static str,
}

fn ratio(
    figure: &str,
    a: &ServerSummary,
    b: &ServerSummary,
    av: Option<f64>,
    bv: Option<f64>,
    target: &'static str,
) -> Option<Ratio> {
    let (x, y) = (av?, bv?);
    if y == 0.0 {
        return None;
    }
    Some(Ratio {
        figure: figure.to_owned(),
        a: a.server,
        b: b.server,
        a_value: x,
        b_value: y,
        ratio: x / y,
        target,
    })
}

/// The result of `peerlink-loadtest relay`.
#[derive(Clone, Debug, Serialize)]
pub struct TrafficReport {
    /// What was run.
    pub config: TrafficConfig,
    /// Medians per server.
    pub summary: Vec<ServerSummary>,
    /// Ratios peerlink/coturn (and uring/epoll).
    pub ratios: Vec<Ratio>,
    /// Caveats worth reading.
    pub notes: Vec<String>,
    /// Every round of every server.
    pub servers: Vec<ServerReport>,
    /// The generator's own ceiling (direct socket pairs, no relay), if measured.
    pub generator_baseline: Option<MaxSearch>,
    /// The half-load probes through each latency floor.
    pub floors: Vec<FloorProbes>,
    /// Wall time of the run.
    pub elapsed_s: f64,
}

impl TrafficReport {
    /// Builds summaries, ratios and notes.
    pub fn new(config: &TrafficConfig, servers: Vec<ServerReport>, elapsed: Duration) -> Self {
        let summary: Vec<ServerSummary> = servers.iter().map(ServerReport::summary).collect();
        let mut ratios = Vec::new();
        let find = |k: ServerKind| summary.iter().find(|s| s.server == k.label());
        let coturn = find(ServerKind::Coturn);
        for p in [ServerKind::PeerlinkUring, ServerKind::PeerlinkEpoll] {
            let (Some(a), Some(b)) = (find(p), coturn) else {
                continue;
            };
            ratios.extend(ratio(
                "forwarded pkt/s at <= loss threshold",
                a,
                b,
                a.max_pps,
                b.max_pps,
                ">= 2.0",
            ));
            ratios.extend(ratio(
                "server CPU us/pkt at fixed rate",
                a,
                b,
                a.cpu_us_per_pkt,
                b.cpu_us_per_pkt,
                "<= 0.5",
            ));
            ratios.extend(ratio(
                "server CPU us/pkt at max rate",
                a,
                b,
                a.cpu_us_per_pkt_at_max,
                b.cpu_us_per_pkt_at_max,
                "(info)",
            ));
            ratios.extend(ratio(
                "e2e latency p50 at fixed rate",
                a,
                b,
                a.e2e_p50_us,
                b.e2e_p50_us,
                "(info)",
            ));
            ratios.extend(ratio(
                "e2e latency p99 at fixed rate",
                a,
                b,
                a.e2e_p99_us,
                b.e2e_p99_us,
                "(info)",
            ));
        }
        if let (Some(u), Some(e)) = (
            find(ServerKind::PeerlinkUring),
            find(ServerKind::PeerlinkEpoll),
        ) {
            ratios.extend(ratio(
                "uring/epoll forwarded pkt/s",
                u,
                e,
                u.max_pps,
                e.max_pps,
                "> 1.0",
            ));
            ratios.extend(ratio(
                "uring/epoll CPU us/pkt at fixed rate",
                u,
                e,
                u.cpu_us_per_pkt,
                e.cpu_us_per_pkt,
                "< 1.0",
            ));
        }
        for (new, base) in [
            (ServerKind::PeerlinkUring, ServerKind::BaseUring),
            (ServerKind::PeerlinkEpoll, ServerKind::BaseEpoll),
        ] {
            let (Some(a), Some(b)) = (find(new), find(base)) else {
                continue;
            };
            ratios.extend(ratio(
                "this build / base build pkt/s",
                a,
                b,
                a.max_pps,
                b.max_pps,
                "(info)",
            ));
            ratios.extend(ratio(
                "this build / base build CPU at fixed rate",
                a,
                b,
                a.cpu_us_per_pkt,
                b.cpu_us_per_pkt,
                "(info)",
            ));
        }
        let mut notes = vec![
            "server CPU = sum of the server's threads' run time (/proc/<pid>/task/*/schedstat) over the round incl. drain; \
             on loopback the sender's kernel delivers into the receiver's socket, so each side's receive-path softirq \
             work is charged to whoever sent"
                .to_owned(),
            format!("first round of each server discarded; medians of the remaining {}", config.rounds.saturating_sub(1).max(1)),
        ];
        for s in &summary {
            if s.max_generator_limited_rounds > 0 {
                notes.push(format!(
                    "{}: {} of the kept max searches stopped because the GENERATOR's core was full (not because of loss): \
                     their max is a lower bound for the server{}",
                    s.server,
                    s.max_generator_limited_rounds,
                    if s.generator_limited { " (most rounds: the median is a lower bound)" } else { "" }
                ));
            }
            if s.fixed_generator_short_rounds > 0 {
                notes.push(format!(
                    "{}: in {} kept fixed-rate rounds the generator offered < 90% of --rate or its core was > 92% busy; CPU/pkt and latency are per delivered packet and stay comparable",
                    s.server, s.fixed_generator_short_rounds
                ));
            }
        }
        if let Some(note) = paired_note(
            find(ServerKind::PeerlinkUring),
            find(ServerKind::PeerlinkEpoll),
        ) {
            notes.push(note);
        }
        let lossy: Vec<&str> = summary
            .iter()
            .filter(|s| s.fixed_loss.is_some_and(|l| l > config.loss_threshold))
            .map(|s| s.server)
            .collect();
        if !lossy.is_empty() {
            notes.push(format!(
                "fixed rate {:?} pkt/s exceeded the loss threshold on {}: CPU/pkt there is at saturation, pick a lower --rate",
                config.rate,
                lossy.join(", ")
            ));
        }
        Self {
            config: config.clone(),
            summary,
            ratios,
            notes,
            servers,
            generator_baseline: None,
            floors: Vec::new(),
            elapsed_s: elapsed.as_secs_f64(),
        }
    }

    /// Records the generator's own ceiling and flags servers whose max came close to it.
    pub fn set_generator_baseline(&mut self, b: Option<MaxSearch>) {
        let ceiling = b
            .as_ref()
            .and_then(|b| b.best.as_ref())
            .map(|f| f.received_pps);
        if let Some(c) = ceiling {
            for s in &self.summary {
                if s.max_pps.is_some_and(|m| m >= 0.9 * c) {
                    self.notes.push(format!(
                        "{}: max rate is within 10% of the generator's own ceiling ({c:.0} pkt/s over direct socket pairs): the generator may be the limit",
                        s.server
                    ));
                }
            }
        }
        self.generator_baseline = b;
    }

    /// Records the latency floors' probes.
    pub fn set_floors(&mut self, floors: Vec<FloorProbes>) {
        self.floors = floors;
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut o = String::new();
        let c = &self.config;
        let _ = writeln!(
            o,
            "peerlink-loadtest relay: {} allocations ({}), {}-byte payloads, {} rounds (first discarded), server CPU {:?}, generator CPU {:?}, sender {:?}, receiver {:?}",
            c.allocations,
            c.topology.describe(c.allocations),
            super::traffic::PAYLOAD_LEN,
            c.rounds,
            c.placement.server_cpu,
            c.placement.gen_cpu,
            c.send_io,
            c.receive
        );
        let _ = writeln!(
            o,
            "{:<16} {:>12} {:>10} {:>12} {:>11} {:>9} {:>9} {:>8} {:>8} {:>12}",
            "server",
            "max pkt/s",
            "us/pkt@max",
            "us/pkt@rate",
            "sleeps/kpkt",
            "p50 us",
            "p99 us",
            "loss",
            "gen core",
            "in-relay p99"
        );
        for s in &self.summary {
            let _ = writeln!(
                o,
                "{:<16} {:>12} {:>10} {:>12} {:>11} {:>9} {:>9} {:>8} {:>8} {:>12}{}",
                s.server,
                fmt0(s.max_pps),
                fmt2(s.cpu_us_per_pkt_at_max),
                fmt2(s.cpu_us_per_pkt),
                fmt0(s.sleeps_per_kpkt),
                fmt0(s.e2e_p50_us),
                fmt0(s.e2e_p99_us),
                s.fixed_loss
                    .map_or("-".into(), |l| format!("{:.3}%", l * 100.0)),
                s.gen_core_fraction
                    .map_or("-".into(), |g| format!("{:.0}%", g * 100.0)),
                fmt1(s.in_relay_p99_us_half_load),
                if s.generator_limited {
                    "  [generator-limited]"
                } else {
                    ""
                }
            );
        }
        let tick = c.half_load_tick.as_micros();
        let probes = self
            .servers
            .iter()
            .map(|r| (r.server.label(), &r.half_load))
            .chain(self.floors.iter().map(|f| (f.io.label(), &f.probes)));
        for (label, half_load) in probes.clone() {
            for h in half_load {
                o.push_str(&half_load_line(label, h, tick));
            }
        }
        for (label, half_load) in probes {
            let p99 = p99s(half_load);
            if p99.len() < 2 {
                continue;
            }
            let under = p99.iter().filter(|&&v| v < IN_RELAY_P99_TARGET_US).count();
            let (lo, hi) = range(&p99);
            let _ = writeln!(
                o,
                "  half-load p99 {label}: median {} µs over {} probes ({lo:.0}-{hi:.0}), under {IN_RELAY_P99_TARGET_US:.0} µs in {under}",
                fmt1(median(p99.clone())),
                p99.len(),
            );
        }
        for f in &self.floors {
            let Some(floor) = f.p99() else { continue };
            for s in &self.summary {
                if let Some(p99) = s.in_relay_p99_us_half_load {
                    let _ = writeln!(
                        o,
                        "  half-load p99 {} / {} = {:.2} ({p99:.0} vs {floor:.0} µs): what the relay adds to the wake-up and delivery path a do-nothing echo pays too",
                        s.server,
                        f.io.label(),
                        p99 / floor
                    );
                }
            }
        }
        if let Some(b) = &self.generator_baseline {
            let _ = writeln!(
                o,
                "{:<16} {:>12}   (generator alone over direct socket pairs, no relay{})",
                "generator-only",
                fmt0(b.best.as_ref().map(|f| f.received_pps)),
                if b.generator_limited {
                    "; stopped at its own limit"
                } else {
                    ""
                }
            );
        }
        if let Some(r) = c.rate {
            let _ = writeln!(
                o,
                "(us/pkt@rate, sleeps/kpkt, p50, p99, loss at fixed {r:.0} pkt/s; max = highest rate with loss <= {:.2}%)",
                c.loss_threshold * 100.0
            );
        }
        if !self.ratios.is_empty() {
            let _ = writeln!(o, "\nratios (medians):");
            for r in &self.ratios {
                let _ = writeln!(
                    o,
                    "  {:<40} {:>15} / {:<15} = {:>6.2}   ({:.2} vs {:.2}; target {})",
                    r.figure, r.a, r.b, r.ratio, r.a_value, r.b_value, r.target
                );
            }
        }
        if !self.notes.is_empty() {
            let _ = writeln!(o, "\nnotes:");
            for n in &self.notes {
                let _ = writeln!(o, "  - {n}");
            }
        }
        let _ = writeln!(o, "elapsed {:.1} s", self.elapsed_s);
        o
    }
}

fn fmt0(v: Option<f64>) -> String {
    v.map_or("-".into(), |x| format!("{x:.0}"))
}
fn fmt1(v: Option<f64>) -> String {
    v.map_or("-".into(), |x| format!("{x:.1}"))
}
fn fmt2(v: Option<f64>) -> String {
    v.map_or("-".into(), |x| format!("{x:.2}"))
}

/// One allocation round.
#[derive(Clone, Debug, Serialize)]
pub struct AllocRound {
    /// Allocations attempted.
    pub attempted: usize,
    /// UDP sockets the generator used (one per allocation, or shared ones).
    pub client_sockets: usize,
    /// Client source IPs the allocations came from.
    pub client_ips: usize,
    /// Allocations granted.
    pub succeeded: usize,
    /// First request to last grant, seconds.
    pub elapsed_s: f64,
    /// succeeded / elapsed.
    pub allocs_per_s: f64,
    /// Server CPU µs per granted allocation (incl. the 401 round trip).
    pub server_cpu_us_per_alloc: f64,
    /// Generator thread CPU / allocation phase wall time (near 1: generator-limited).
    pub gen_core_fraction: f64,
    /// Server VmRSS before allocating (bytes).
    pub rss_before: u64,
    /// Server VmRSS with all allocations idle (bytes).
    pub rss_after: u64,
    /// (rss_after - rss_before) / succeeded: total user-space RSS growth per allocation,
    /// including whatever the server keeps per relayed socket; kernel socket memory is not in
    /// RSS and not counted.
    pub rss_bytes_per_alloc: f64,
    /// With `--hold`: allocations that answered a Refresh after the hold.
    pub held_and_refreshed: Option<usize>,
    /// Distinct relay IPs among the granted relayed addresses.
    pub relay_ips_used: usize,
    /// Allocations released with Refresh LIFETIME 0 at the end.
    pub released: usize,
    /// The first client error, if any.
    pub first_error: Option<String>,
}

/// All allocation rounds of one server.
#[derive(Clone, Debug, Serialize)]
pub struct AllocServerReport {
    /// Which server.
    pub server: ServerKind,
    /// Rounds, including the discarded first.
    pub rounds: Vec<AllocRound>,
}

impl AllocServerReport {
    /// Empty.
    pub fn new(server: ServerKind) -> Self {
        Self {
            server,
            rounds: Vec::new(),
        }
    }
    fn med(&self, f: impl Fn(&AllocRound) -> f64) -> Option<f64> {
        median(kept(&self.rounds).iter().map(f).collect())
    }
    /// The summary row.
    pub fn summary(&self) -> AllocSummary {
        AllocSummary {
            server: self.server.label(),
            allocs_per_s: self.med(|r| r.allocs_per_s),
            succeeded: self.med(|r| r.succeeded as f64),
            server_cpu_us_per_alloc: self.med(|r| r.server_cpu_us_per_alloc),
            rss_bytes_per_alloc: self.med(|r| r.rss_bytes_per_alloc),
            gen_core_fraction: self.med(|r| r.gen_core_fraction),
            held_and_refreshed: self
                .med(|r| r.held_and_refreshed.map_or(f64::NAN, |h| h as f64))
                .filter(|v| !v.is_nan()),
        }
    }
}

/// Medians of one server's allocation rounds.
#[derive(Clone, Debug, Serialize)]
pub struct AllocSummary {
    /// Server label.
    pub server: &'static str,
    /// Allocations per second.
    pub allocs_per_s: Option<f64>,
    /// Allocations granted per round.
    pub succeeded: Option<f64>,
    /// Server CPU per allocation (µs).
    pub server_cpu_us_per_alloc: Option<f64>,
    /// RSS growth per idle allocation (bytes; see [`AllocRound::rss_bytes_per_alloc`]).
    pub rss_bytes_per_alloc: Option<f64>,
    /// Generator core use while allocating.
    pub gen_core_fraction: Option<f64>,
    /// With `--hold`: allocations still refreshable after the hold.
    pub held_and_refreshed: Option<f64>,
}

/// The result of `peerlink-loadtest relay-alloc`.
#[derive(Clone, Debug, Serialize)]
pub struct AllocReport {
    /// What was run.
    pub config: AllocConfig,
    /// Medians per server.
    pub summary: Vec<AllocSummary>,
    /// Ratios peerlink/coturn.
    pub ratios: Vec<Ratio>,
    /// Caveats.
    pub notes: Vec<String>,
    /// Every round.
    pub servers: Vec<AllocServerReport>,
    /// Wall time.
    pub elapsed_s: f64,
}

impl AllocReport {
    /// Builds summaries and ratios.
    pub fn new(config: &AllocConfig, servers: Vec<AllocServerReport>, elapsed: Duration) -> Self {
        let summary: Vec<AllocSummary> = servers.iter().map(AllocServerReport::summary).collect();
        let mut ratios = Vec::new();
        let coturn = summary
            .iter()
            .find(|s| s.server == ServerKind::Coturn.label());
        for a in summary
            .iter()
            .filter(|s| s.server != ServerKind::Coturn.label())
        {
            let Some(b) = coturn else { break };
            let mk = |figure: &str, x: Option<f64>, y: Option<f64>, target| {
                let (x, y) = (x?, y?);
                (y != 0.0).then(|| Ratio {
                    figure: figure.into(),
                    a: a.server,
                    b: b.server,
                    a_value: x,
                    b_value: y,
                    ratio: x / y,
                    target,
                })
            };
            ratios.extend(mk(
                "allocations/s",
                a.allocs_per_s,
                b.allocs_per_s,
                "(absolute target >= 10000/s)",
            ));
            ratios.extend(mk(
                "RSS bytes per idle allocation",
                a.rss_bytes_per_alloc,
                b.rss_bytes_per_alloc,
                "(absolute target <= 2 KB beyond the socket)",
            ));
            ratios.extend(mk(
                "server CPU us per allocation",
                a.server_cpu_us_per_alloc,
                b.server_cpu_us_per_alloc,
                "(info)",
            ));
        }
        let notes = vec![
            "allocs/s = granted allocations / (first Allocate sent -> last grant), each allocation = 2 round trips (401 challenge + authenticated retry), one generator thread".to_owned(),
            "RSS per allocation = VmRSS growth / allocations: user-space memory incl. what the server keeps per relayed socket; kernel socket buffers are not in RSS".to_owned(),
            if config.shared_sockets() {
                format!(
                    "client sockets: shared, one per {} client IPs ({} for {} allocations); each allocation has its own source IP on its socket (IP_PKTINFO)",
                    config.placement.client_ips,
                    config.client_sockets(),
                    config.count
                )
            } else {
                format!("client sockets: one per allocation (--client-ips 1); RLIMIT_NOFILE caps --count/--hold in one generator process ({} requested)", config.count)
            },
        ];
        Self {
            config: config.clone(),
            summary,
            ratios,
            notes,
            servers,
            elapsed_s: elapsed.as_secs_f64(),
        }
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut o = String::new();
        let c = &self.config;
        let _ = writeln!(
            o,
            "peerlink-loadtest relay-alloc: {} allocations per round, {} in flight, {} rounds (first discarded){}",
            c.count,
            c.concurrency,
            c.rounds,
            c.hold
                .map_or(String::new(), |h| format!(", held {:?} then refreshed", h))
        );
        let _ = writeln!(
            o,
            "{:<16} {:>12} {:>10} {:>14} {:>14} {:>17} {:>9}",
            "server",
            "allocs/s",
            "granted",
            "CPU us/alloc",
            "RSS B/alloc",
            "held/granted",
            "gen core"
        );
        for s in &self.summary {
            let held = match s.held_and_refreshed {
                Some(h) => format!("{h:.0}/{}", fmt0(s.succeeded)),
                None => "-".into(),
            };
            let _ = writeln!(
                o,
                "{:<16} {:>12} {:>10} {:>14} {:>14} {:>17} {:>9}{}",
                s.server,
                fmt0(s.allocs_per_s),
                fmt0(s.succeeded),
                fmt1(s.server_cpu_us_per_alloc),
                fmt0(s.rss_bytes_per_alloc),
                held,
                s.gen_core_fraction
                    .map_or("-".into(), |g| format!("{:.0}%", g * 100.0)),
                if s.gen_core_fraction.is_some_and(|g| g > 0.9) {
                    "  [generator-limited]"
                } else {
                    ""
                }
            );
        }
        let _ = writeln!(o, "\nrounds (the first of each server is discarded):");
        for srv in &self.servers {
            for (k, r) in srv.rounds.iter().enumerate() {
                let _ = writeln!(
                    o,
                    "  {:<16} #{k}: granted {}/{}, {}, released {}/{}, relay IPs used {}, {} client sockets over {} client IPs{}",
                    srv.server.label(),
                    r.succeeded,
                    r.attempted,
                    r.held_and_refreshed
                        .map_or("not held".to_owned(), |h| format!(
                            "held and refreshed {h}/{}",
                            r.succeeded
                        )),
                    r.released,
                    r.succeeded,
                    r.relay_ips_used,
                    r.client_sockets,
                    r.client_ips,
                    r.first_error
                        .as_ref()
                        .map_or(String::new(), |e| format!("; first error: {e}"))
                );
            }
        }
        if !self.ratios.is_empty() {
            let _ = writeln!(o, "\nratios (medians):");
            for r in &self.ratios {
                let _ = writeln!(
                    o,
                    "  {:<32} {:>15} / {:<8} = {:>6.2}   ({:.1} vs {:.1}; {})",
                    r.figure, r.a, r.b, r.ratio, r.a_value, r.b_value, r.target
                );
            }
        }
        let _ = writeln!(o, "\nnotes:");
        for n in &self.notes {
            let _ = writeln!(o, "  - {n}");
        }
        let _ = writeln!(o, "elapsed {:.1} s", self.elapsed_s);
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_kept_rounds() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(kept(&[1, 2, 3]), &[2, 3]);
        assert_eq!(kept(&[1]), &[1]);
    }

    #[test]
    fn sign_test_matches_the_exact_binomial_tail() {
        // Every split of 10: P(10 of 10 or 0 of 10) = 2 / 1024.
        assert!((sign_test_p(10, 10) - 2.0 / 1024.0).abs() < 1e-12);
        assert!((sign_test_p(0, 10) - 2.0 / 1024.0).abs() < 1e-12);
        // 8 of 10: 2 * (45 + 10 + 1) / 1024.
        assert!((sign_test_p(8, 10) - 112.0 / 1024.0).abs() < 1e-12);
        // An even split is what equals give.
        assert_eq!(sign_test_p(10, 20), 1.0);
        assert_eq!(sign_test_p(0, 0), 1.0);
        // The 201-round `pairs` run in docs/BENCHMARKS.md: 118 of 200, p = 0.0131 (summed from
        // the binomial coefficients in exact integers).
        assert!((sign_test_p(118, 200) - 0.013_130).abs() < 1e-5);
        // Large n stays finite (no 2^-n underflow before the terms grow).
        let p = sign_test_p(1100, 2000);
        assert!(p > 0.0 && p < 1e-4, "{p}");
    }
}
