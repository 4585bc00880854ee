//! The console's view of the fleet, sans I/O: [`FleetTracker::observe`] takes what the store
//! holds right now (relay and node registries, their heartbeat snapshots, the replicas'
//! records) and the wall-clock time, and returns the [`FleetDoc`] the page renders.
//!
//! Rates and recent latency come from the difference of two snapshots of one sender, timed on
//! the sender's own uptime; a sender that restarted (uptime or counters going back) starts a
//! new baseline. The fleet-wide latency over time is one point every [`FLEET_POINT_MS`]: the
//! sum over relays of the samples their snapshots added since the previous point, so every
//! sample counts once whatever the heartbeat phases. Memory is bounded: ids that left the
//! registry are forgotten, histories are rings.

use std::collections::{HashMap, VecDeque};

use peerlink_api::directory::{NodeInfo, RelayInfo};
use peerlink_api::fleet_stats::{LatencyHistogram, NodeStatsSnapshot, RelayStatsSnapshot};
use serde::{Deserialize, Serialize};

/// Time between two points of the fleet-wide latency history.
pub const FLEET_POINT_MS: u64 = 5_000;
/// Shortest span between two snapshots of one relay that rates and recent latency are taken
/// over: relays merge their figures once a second, so a shorter span may hold none.
pub const MIN_RATE_SPAN_MS: u64 = 2_000;
/// Points kept per history (fleet: 30 min at one per 5 s; relays: one per heartbeat).
pub const HISTORY_POINTS: usize = 360;

/// Quantiles of the percentile plot: 1 - 10^(-k/10) for k = 0..=40, i.e. 0 % to 99.99 %
/// evenly spaced on the log scale of 1 / (1 - q) that HdrHistogram plots use.
fn plot_quantiles() -> impl Iterator<Item = f64> {
    (0..=40).map(|k| 1.0 - 10f64.powf(-f64::from(k) / 10.0))
}

/// A distribution summarised for the page.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ladder {
    /// Samples.
    pub count: u64,
    /// `[quantile, µs]` for the percentile plot.
    pub points: Vec<(f64, u64)>,
    /// Median, µs.
    pub p50: u64,
    /// 90th percentile, µs.
    pub p90: u64,
    /// 99th percentile, µs.
    pub p99: u64,
    /// 99.9th percentile, µs.
    pub p999: u64,
    /// 99.99th percentile, µs.
    pub p9999: u64,
    /// Largest sample, µs.
    pub max: u64,
}

impl Ladder {
    /// Summarise `h` (`None` when it is empty).
    pub fn of(h: &LatencyHistogram) -> Option<Ladder> {
        let count = h.count();
        if count == 0 {
            return None;
        }
        Some(Ladder {
            count,
            points: plot_quantiles()
                .map(|q| (q, h.value_at_quantile(q)))
                .collect(),
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            p9999: h.value_at_quantile(0.9999),
            max: h.max,
        })
    }
}

/// One point of a latency history.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HistoryPoint {
    /// Unix time, ms.
    pub t: u64,
    /// Samples in the point's window.
    pub count: u64,
    /// Median, µs.
    pub p50: u64,
    /// 99th percentile, µs.
    pub p99: u64,
    /// 99.9th percentile, µs.
    pub p999: u64,
    /// 99.99th percentile, µs.
    pub p9999: u64,
}

impl HistoryPoint {
    fn of(t: u64, h: &LatencyHistogram) -> Option<Self> {
        let l = Ladder::of(h)?;
        Some(Self {
            t,
            count: l.count,
            p50: l.p50,
            p99: l.p99,
            p999: l.p999,
            p9999: l.p9999,
        })
    }
}

/// A directory replica's own record (written by each replica, JSON in the store).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    /// Replica id (host name and listen address).
    pub replica_id: String,
    /// Address it serves on.
    pub listen: String,
    /// `memory` or `redis`.
    pub store: String,
    /// Version of the binary.
    pub version: String,
    /// Whether its console is on.
    pub console: bool,
}

/// A replica as listed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplicaRow {
    /// The record.
    #[serde(flatten)]
    pub record: ReplicaRecord,
    /// Milliseconds since it last wrote its record.
    pub age_ms: u64,
    /// The replica answering this page.
    pub this: bool,
}

/// A relay's figures from its snapshots.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RelayFigures {
    /// Milliseconds since the snapshot was stored.
    pub age_ms: u64,
    /// Relay uptime, s.
    pub uptime_s: f64,
    /// Datagrams forwarded per second between its last two snapshots.
    pub packets_per_s: f64,
    /// Bytes forwarded per second between its last two snapshots.
    pub bytes_per_s: f64,
    /// Datagrams forwarded since start.
    pub packets_forwarded: u64,
    /// Auth failures since start.
    pub auth_failures: u64,
    /// Allocations created since start.
    pub allocations_created: u64,
    /// Latency since start.
    pub latency_total: Option<Ladder>,
    /// Latency between its last two snapshots.
    pub latency_recent: Option<Ladder>,
}

/// One relay row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RelayRow {
    /// Registry view.
    #[serde(flatten)]
    pub info: RelayInfo,
    /// Snapshot figures (none before its first heartbeat with stats).
    pub stats: Option<RelayFigures>,
    /// p50/p99/... per snapshot interval.
    pub history: Vec<HistoryPoint>,
}

/// A node's figures from its snapshots.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeFigures {
    /// Milliseconds since the snapshot was stored.
    pub age_ms: u64,
    /// Node uptime, s.
    pub uptime_s: f64,
    /// Sessions open.
    pub sessions_open: u64,
    /// Invites since start.
    pub invites: u64,
    /// Invites per second between its last two snapshots.
    pub invites_per_s: f64,
    /// Errors since start.
    pub errors: u64,
    /// Errors per second between its last two snapshots.
    pub errors_per_s: f64,
    /// Failed logins since start.
    pub login_failures: u64,
}

/// One signaling node row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeRow {
    /// Registry view.
    #[serde(flatten)]
    pub info: NodeInfo,
    /// Snapshot figures.
    pub stats: Option<NodeFigures>,
}

/// Fleet totals.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct FleetTotals {
    /// Relays known.
    pub relays: usize,
    /// Relays with a fresh heartbeat.
    pub relays_healthy: usize,
    /// Relays draining.
    pub relays_draining: usize,
    /// Allocations over all relays.
    pub allocations: u64,
    /// Datagrams per second over all relays.
    pub packets_per_s: f64,
    /// Signaling nodes live.
    pub nodes: usize,
    /// Sessions over all nodes.
    pub sessions: u64,
    /// Invites per second over all nodes.
    pub invites_per_s: f64,
    /// Errors per second over all nodes.
    pub errors_per_s: f64,
    /// Fleet latency since each relay started.
    pub latency_total: Option<Ladder>,
    /// Fleet latency over each relay's last snapshot interval.
    pub latency_recent: Option<Ladder>,
    /// Fleet latency, one point per [`FLEET_POINT_MS`].
    pub history: Vec<HistoryPoint>,
}

/// Everything the page shows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FleetDoc {
    /// Unix time of this view, ms.
    pub generated_unix_ms: u64,
    /// Replica answering.
    pub replica_id: String,
    /// Whether the store answered (when not, the rest is empty).
    pub store_ok: bool,
    /// Totals.
    pub fleet: FleetTotals,
    /// Relays, sorted by id.
    pub relays: Vec<RelayRow>,
    /// Live signaling nodes, sorted by id.
    pub nodes: Vec<NodeRow>,
    /// Directory replicas, sorted by id.
    pub replicas: Vec<ReplicaRow>,
}

/// Everything read from the store for one view.
#[derive(Debug, Clone, Default)]
pub struct Observation {
    /// `GET /v1/relays`.
    pub relays: Vec<RelayInfo>,
    /// `GET /v1/nodes`.
    pub nodes: Vec<NodeInfo>,
    /// Relay snapshots: (id, snapshot, age ms).
    pub relay_stats: Vec<(String, RelayStatsSnapshot, u64)>,
    /// Node snapshots: (id, snapshot, age ms).
    pub node_stats: Vec<(String, NodeStatsSnapshot, u64)>,
    /// Replica records: (record, age ms).
    pub replicas: Vec<(ReplicaRecord, u64)>,
}

#[derive(Debug, Default)]
struct RelayTrack {
    last: Option<RelayStatsSnapshot>,
    packets_per_s: f64,
    bytes_per_s: f64,
    recent: Option<LatencyHistogram>,
    /// Cumulative latency at the previous fleet point.
    baseline: Option<LatencyHistogram>,
    history: VecDeque<HistoryPoint>,
}

#[derive(Debug, Default)]
struct NodeTrack {
    last: Option<NodeStatsSnapshot>,
    invites_per_s: f64,
    errors_per_s: f64,
}

/// Per-rate helper: `(new - old) / seconds`, 0 when the clock did not move.
fn rate(new: u64, old: u64, secs: f64) -> f64 {
    if secs <= 0.0 {
        return 0.0;
    }
    new.saturating_sub(old) as f64 / secs
}

/// State kept between views (rates, recent windows, histories).
#[derive(Debug, Default)]
pub struct FleetTracker {
    relays: HashMap<String, RelayTrack>,
    nodes: HashMap<String, NodeTrack>,
    history: VecDeque<HistoryPoint>,
    last_point_ms: Option<u64>,
}

fn push_ring(ring: &mut VecDeque<HistoryPoint>, p: HistoryPoint) {
    if ring.len() == HISTORY_POINTS {
        ring.pop_front();
    }
    ring.push_back(p);
}

impl FleetTracker {
    /// A tracker with no history.
    pub fn new() -> Self {
        Self::default()
    }

    fn relay_snapshot(&mut self, id: &str, snap: &RelayStatsSnapshot, now_ms: u64) {
        let t = self.relays.entry(id.to_owned()).or_default();
        let Some(last) = &t.last else {
            t.last = Some(snap.clone());
            return;
        };
        let restarted_clock = snap.uptime_ms < last.uptime_ms;
        if !restarted_clock && snap.uptime_ms - last.uptime_ms < MIN_RATE_SPAN_MS {
            // The same snapshot again, or an extra heartbeat (a drain announced) right after
            // the last one: too short a span for a rate; the next one measures from `last`.
            return;
        }
        let restarted = snap.uptime_ms < last.uptime_ms
            || snap.packets_forwarded < last.packets_forwarded
            || snap.bytes_forwarded < last.bytes_forwarded;
        let recent = if restarted {
            None
        } else {
            snap.latency_us.since(&last.latency_us)
        };
        match recent {
            Some(recent) => {
                let secs = (snap.uptime_ms - last.uptime_ms) as f64 / 1000.0;
                t.packets_per_s = rate(snap.packets_forwarded, last.packets_forwarded, secs);
                t.bytes_per_s = rate(snap.bytes_forwarded, last.bytes_forwarded, secs);
                if let Some(p) = HistoryPoint::of(now_ms, &recent) {
                    push_ring(&mut t.history, p);
                }
                t.recent = Some(recent);
            }
            None => {
                // A restart (or a histogram that went back): start again from this one.
                t.packets_per_s = 0.0;
                t.bytes_per_s = 0.0;
                t.recent = None;
                t.baseline = None;
            }
        }
        t.last = Some(snap.clone());
    }

    fn node_snapshot(&mut self, id: &str, snap: &NodeStatsSnapshot) {
        let t = self.nodes.entry(id.to_owned()).or_default();
        if let Some(last) = &t.last {
            if last.uptime_ms == snap.uptime_ms {
                return;
            }
            if snap.uptime_ms > last.uptime_ms
                && snap.invites >= last.invites
                && snap.errors >= last.errors
            {
                let secs = (snap.uptime_ms - last.uptime_ms) as f64 / 1000.0;
                t.invites_per_s = rate(snap.invites, last.invites, secs);
                t.errors_per_s = rate(snap.errors, last.errors, secs);
            } else {
                t.invites_per_s = 0.0;
                t.errors_per_s = 0.0;
            }
        }
        t.last = Some(snap.clone());
    }

    /// A fleet point every [`FLEET_POINT_MS`]: what every relay added since the last one.
    fn fleet_point(&mut self, now_ms: u64) {
        if self
            .last_point_ms
            .is_some_and(|t| now_ms.saturating_sub(t) < FLEET_POINT_MS)
        {
            return;
        }
        self.last_point_ms = Some(now_ms);
        let mut window = LatencyHistogram::new();
        for t in self.relays.values_mut() {
            let Some(last) = &t.last else { continue };
            if let Some(d) = t.baseline.as_ref().and_then(|b| last.latency_us.since(b)) {
                window.merge(&d);
            }
            t.baseline = Some(last.latency_us.clone());
        }
        if let Some(p) = HistoryPoint::of(now_ms, &window) {
            push_ring(&mut self.history, p);
        }
    }

    /// The view of `obs` at wall-clock `now_ms`, answered by replica `replica_id`.
    pub fn observe(&mut self, now_ms: u64, replica_id: &str, obs: Observation) -> FleetDoc {
        // Forget what left the registry (bounded memory).
        self.relays
            .retain(|id, _| obs.relays.iter().any(|r| &r.relay_id == id));
        self.nodes
            .retain(|id, _| obs.nodes.iter().any(|n| &n.node_id == id));
        let mut relay_stats: HashMap<&str, (&RelayStatsSnapshot, u64)> = HashMap::new();
        for (id, snap, age) in &obs.relay_stats {
            if obs.relays.iter().any(|r| &r.relay_id == id) {
                self.relay_snapshot(id, snap, now_ms);
                relay_stats.insert(id, (snap, *age));
            }
        }
        let mut node_stats: HashMap<&str, (&NodeStatsSnapshot, u64)> = HashMap::new();
        for (id, snap, age) in &obs.node_stats {
            if obs.nodes.iter().any(|n| &n.node_id == id) {
                self.node_snapshot(id, snap);
                node_stats.insert(id, (snap, *age));
            }
        }
        self.fleet_point(now_ms);

        let mut fleet = FleetTotals::default();
        let mut total = LatencyHistogram::new();
        let mut recent = LatencyHistogram::new();
        let mut relays = Vec::with_capacity(obs.relays.len());
        for info in obs.relays {
            fleet.relays += 1;
            fleet.relays_healthy += usize::from(info.healthy);
            fleet.relays_draining += usize::from(info.draining);
            fleet.allocations = fleet.allocations.saturating_add(info.allocations);
            let track = self.relays.get(&info.relay_id);
            let stats = relay_stats.get(info.relay_id.as_str()).map(|&(snap, age)| {
                let r = track.and_then(|t| t.recent.as_ref());
                let (pps, bps) = track.map_or((0.0, 0.0), |t| (t.packets_per_s, t.bytes_per_s));
                if info.healthy {
                    fleet.packets_per_s += pps;
                    total.merge(&snap.latency_us);
                    if let Some(r) = r {
                        recent.merge(r);
                    }
                }
                RelayFigures {
                    age_ms: age,
                    uptime_s: snap.uptime_ms as f64 / 1000.0,
                    packets_per_s: pps,
                    bytes_per_s: bps,
                    packets_forwarded: snap.packets_forwarded,
                    auth_failures: snap.auth_failures,
                    allocations_created: snap.allocations_created,
                    latency_total: Ladder::of(&snap.latency_us),
                    latency_recent: r.and_then(Ladder::of),
                }
            });
            let history = track.map_or_else(Vec::new, |t| t.history.iter().cloned().collect());
            relays.push(RelayRow {
                info,
                stats,
                history,
            });
        }
        let mut nodes = Vec::with_capacity(obs.nodes.len());
        for info in obs.nodes {
            fleet.nodes += 1;
            let track = self.nodes.get(&info.node_id);
            let stats = node_stats.get(info.node_id.as_str()).map(|&(snap, age)| {
                let (ips, eps) = track.map_or((0.0, 0.0), |t| (t.invites_per_s, t.errors_per_s));
                fleet.sessions = fleet.sessions.saturating_add(snap.sessions_open);
                fleet.invites_per_s += ips;
                fleet.errors_per_s += eps;
                NodeFigures {
                    age_ms: age,
                    uptime_s: snap.uptime_ms as f64 / 1000.0,
                    sessions_open: snap.sessions_open,
                    invites: snap.invites,
                    invites_per_s: ips,
                    errors: snap.errors,
                    errors_per_s: eps,
                    login_failures: snap.login_failures,
                }
            });
            nodes.push(NodeRow { info, stats });
        }
        fleet.latency_total = Ladder::of(&total);
        fleet.latency_recent = Ladder::of(&recent);
        fleet.history = self.history.iter().cloned().collect();
        let mut replicas: Vec<ReplicaRow> = obs
            .replicas
            .into_iter()
            .map(|(record, age_ms)| ReplicaRow {
                this: record.replica_id == replica_id,
                record,
                age_ms,
            })
            .collect();
        replicas.sort_by(|a, b| a.record.replica_id.cmp(&b.record.replica_id));
        FleetDoc {
            generated_unix_ms: now_ms,
            replica_id: replica_id.to_owned(),
            store_ok: true,
            fleet,
            relays,
            nodes,
            replicas,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay(id: &str, healthy: bool, draining: bool) -> RelayInfo {
        RelayInfo {
            relay_id: id.into(),
            turn_addr: "127.0.0.1:3478".parse().unwrap(),
            turn_tcp_addr: None,
            turn_tls_addr: None,
            metrics_addr: "127.0.0.1:9641".parse().unwrap(),
            region: "local".into(),
            load: 0.1,
            allocations: 2,
            capacity: 10,
            draining,
            handed_out: 0,
            healthy,
            last_heartbeat_age_ms: 5,
        }
    }

    fn snap(uptime_ms: u64, packets: u64, lat: &[(u64, u64)]) -> RelayStatsSnapshot {
        RelayStatsSnapshot {
            uptime_ms,
            packets_forwarded: packets,
            bytes_forwarded: packets * 100,
            latency_us: LatencyHistogram::from_values(lat.iter().copied()),
            ..Default::default()
        }
    }

    fn obs(stats: Vec<(&str, RelayStatsSnapshot)>) -> Observation {
        Observation {
            relays: vec![relay("r1", true, false), relay("r2", true, true)],
            relay_stats: stats
                .into_iter()
                .map(|(id, s)| (id.to_owned(), s, 10))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn rates_and_recent_latency_come_from_two_snapshots() {
        let mut t = FleetTracker::new();
        let d = t.observe(0, "me", obs(vec![("r1", snap(1_000, 100, &[(50, 100)]))]));
        let r1 = &d.relays[0];
        assert_eq!(r1.stats.as_ref().unwrap().packets_per_s, 0.0);
        assert!(r1.stats.as_ref().unwrap().latency_recent.is_none());
        assert_eq!(d.fleet.relays, 2);
        assert_eq!(d.fleet.relays_draining, 1);
        assert!(d.relays[1].stats.is_none(), "r2 sent no stats");
        // Two seconds later on the relay's clock: 400 more packets, 100 slow samples.
        let later = snap(3_000, 500, &[(50, 100), (2_000, 100)]);
        let d = t.observe(1_000, "me", obs(vec![("r1", later.clone())]));
        let s = d.relays[0].stats.as_ref().unwrap();
        assert_eq!(s.packets_per_s, 200.0);
        assert_eq!(s.bytes_per_s, 20_000.0);
        let recent = s.latency_recent.as_ref().unwrap();
        assert_eq!(recent.count, 100);
        assert!(recent.p50 >= 2_000 && recent.p50 < 2_100, "{recent:?}");
        assert_eq!(s.latency_total.as_ref().unwrap().count, 200);
        assert_eq!(d.relays[0].history.len(), 1);
        assert_eq!(d.fleet.packets_per_s, 200.0);
        // An extra snapshot right after (a drain announced) keeps the last rates.
        let d = t.observe(
            1_500,
            "me",
            obs(vec![("r1", snap(3_400, 500, &[(50, 100), (2_000, 100)]))]),
        );
        assert_eq!(d.relays[0].stats.as_ref().unwrap().packets_per_s, 200.0);
        // The same snapshot again changes nothing.
        let again = t.observe(2_000, "me", obs(vec![("r1", later)]));
        assert_eq!(again.relays[0].history.len(), 1);
        assert_eq!(again.relays[0].stats.as_ref().unwrap().packets_per_s, 200.0);
        // A restart resets the rates instead of showing a negative or huge one.
        let d = t.observe(3_000, "me", obs(vec![("r1", snap(500, 10, &[(50, 1)]))]));
        let s = d.relays[0].stats.as_ref().unwrap();
        assert_eq!(s.packets_per_s, 0.0);
        assert!(s.latency_recent.is_none());
    }

    #[test]
    fn fleet_history_counts_every_sample_once() {
        let mut t = FleetTracker::new();
        t.observe(
            0,
            "me",
            obs(vec![
                ("r1", snap(1_000, 0, &[])),
                ("r2", snap(1_000, 0, &[])),
            ]),
        );
        // Several snapshots of both relays within one point window, then the next point.
        t.observe(
            1_000,
            "me",
            obs(vec![
                ("r1", snap(2_000, 10, &[(10, 10)])),
                ("r2", snap(2_000, 0, &[])),
            ]),
        );
        t.observe(
            2_000,
            "me",
            obs(vec![
                ("r1", snap(3_000, 20, &[(10, 20)])),
                ("r2", snap(3_000, 5, &[(100, 5)])),
            ]),
        );
        let d = t.observe(
            FLEET_POINT_MS,
            "me",
            obs(vec![
                ("r1", snap(3_000, 20, &[(10, 20)])),
                ("r2", snap(3_000, 5, &[(100, 5)])),
            ]),
        );
        assert_eq!(d.fleet.history.len(), 1);
        assert_eq!(d.fleet.history[0].count, 25);
        assert_eq!(d.fleet.latency_total.as_ref().unwrap().count, 25);
        // Relays that left the registry are forgotten.
        let d = t.observe(
            FLEET_POINT_MS + 1,
            "me",
            Observation {
                relays: vec![relay("r1", true, false)],
                ..Default::default()
            },
        );
        assert_eq!(d.relays.len(), 1);
        assert!(!t.relays.contains_key("r2"));
    }

    #[test]
    fn the_plot_ladder_spans_zero_to_four_nines() {
        let h = LatencyHistogram::from_values((1..=10_000).map(|v| (v, 1)));
        let l = Ladder::of(&h).unwrap();
        assert_eq!(l.points.len(), 41);
        assert_eq!(l.points[0], (0.0, 1));
        assert!((l.points[40].0 - 0.9999).abs() < 1e-12);
        assert!(l.points.windows(2).all(|w| w[0].1 <= w[1].1));
        assert!(l.p50 <= l.p99 && l.p99 <= l.p999 && l.p999 <= l.p9999 && l.p9999 <= l.max);
        assert_eq!(Ladder::of(&LatencyHistogram::new()), None);
    }
}
