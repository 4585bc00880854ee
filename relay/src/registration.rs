//! Directory registration: with `--directory URL` the relay registers its public TURN
//! address, metrics address, region and capacity with the peerlink directory, then heartbeats
//! its load, allocation count and draining state, with a compact stats snapshot for the
//! operators' console ([`MetricsHub::snapshot`]: forwarded packets and bytes, auth failures,
//! the forwarding latency distribution).
//!
//! The loop itself is [`RelayRegistration`] from `peerlink_api::directory_client` (register, heartbeat at the
//! interval the directory recommends, re-register when a restarted directory answers
//! `unknown_relay`, retry while the directory is unreachable). This module feeds it from the
//! [`MetricsHub`] ([`HubStatus`]), runs it on the metrics thread's current-thread tokio runtime
//! (never on a worker), logs one line per directory outage, sends an extra heartbeat the moment
//! a drain starts ([`DrainNotice`]), and deregisters on exit, bounded by [`DEREGISTER_TIMEOUT`].
//!
//! Load figure: `allocations / capacity` (capacity = `--max-allocations`), clamped to 0..=1. The
//! relay measures no worker busy fraction, so the figure says how full the allocation table is,
//! not how busy the CPUs are. Allocation counts come from the hub, i.e. from the workers' last
//! once-a-second reports: a heartbeat may lag the truth by about a second.
//!
//! What it is not: no directory client of its own, no relay choice, no authentication beyond
//! the cluster bearer token.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use peerlink_api::directory::{
    RegisterRelayRequest, RelayHeartbeatRequest, RelayInfo, RelayStatsSnapshot,
};
use peerlink_api::directory_client::{
    DirectoryClient, RelayRegistration, RelayStatus, RelayStatusSource,
};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::core::{Alternate, Shared};
use crate::metrics::MetricsHub;

/// Upper bound of the best-effort deregistration on exit.
pub const DEREGISTER_TIMEOUT: Duration = Duration::from_secs(2);
/// Per-request timeout of the relay's directory client (registration, heartbeats).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// How often the relay re-reads the directory's relay list for its alternates.
pub const ALTERNATES_REFRESH: Duration = Duration::from_secs(5);
/// Failed reads of the relay list in a row after which the alternates are dropped (an old
/// list may name relays that are gone).
const ALTERNATES_STALE_AFTER: u32 = 3;

/// The relays worth redirecting new allocations to: healthy, not draining, not full, not this
/// one; least loaded first.
pub fn alternates_of(relays: &[RelayInfo], own_id: &str) -> Vec<Alternate> {
    let mut usable: Vec<&RelayInfo> = relays
        .iter()
        .filter(|r| {
            r.relay_id != own_id
                && r.healthy
                && !r.draining
                && (r.capacity == 0 || r.allocations < r.capacity)
        })
        .collect();
    usable.sort_by(|a, b| a.load.total_cmp(&b.load).then(a.relay_id.cmp(&b.relay_id)));
    usable
        .into_iter()
        .map(|r| Alternate {
            udp: r.turn_addr,
            tcp: r.turn_tcp_addr,
            tls: r.turn_tls_addr,
        })
        .collect()
}

/// What the relay announces to the directory (validated configuration; see `Config`).
#[derive(Clone, Debug)]
pub struct DirectorySettings {
    /// Client of the directory (URL and cluster token already checked).
    pub client: DirectoryClient,
    /// Stable relay id.
    pub relay_id: String,
    /// Region name.
    pub region: String,
    /// TURN address clients should allocate on.
    pub turn_addr: SocketAddr,
    /// TURN-over-TCP address announced (the first `--listen-tcp`), if any.
    pub turn_tcp_addr: Option<SocketAddr>,
    /// TURN-over-TLS address announced (the first `--listen-tls`), if any.
    pub turn_tls_addr: Option<SocketAddr>,
    /// Allocations the relay can hold (`--max-allocations`).
    pub capacity: u64,
}

/// The load figure sent to the directory: `allocations / capacity`, clamped to 0..=1
/// (1 when capacity is 0, which validation forbids).
pub fn load_figure(allocations: u64, capacity: u64) -> f64 {
    if capacity == 0 {
        return 1.0;
    }
    (allocations as f64 / capacity as f64).clamp(0.0, 1.0)
}

/// Heartbeat figures read from the metrics hub.
#[derive(Clone)]
pub struct HubStatus {
    hub: Arc<MetricsHub>,
    capacity: u64,
}

impl HubStatus {
    /// Figures of `hub` for a relay holding at most `capacity` allocations.
    pub fn new(hub: Arc<MetricsHub>, capacity: u64) -> Self {
        Self { hub, capacity }
    }
}

impl RelayStatusSource for HubStatus {
    fn current_status(&self) -> RelayStatus {
        let allocations = self.hub.allocations() as u64;
        RelayStatus {
            load: load_figure(allocations, self.capacity),
            allocations,
            draining: !self.hub.is_ready(),
        }
    }

    fn current_stats(&self) -> Option<RelayStatsSnapshot> {
        Some(self.hub.snapshot())
    }
}

/// Held by the supervising thread: tells the registration a drain started, so the directory
/// hears `draining = true` at once instead of at the next regular heartbeat.
#[derive(Clone, Debug)]
pub struct DrainNotice(Arc<Notify>);

impl DrainNotice {
    /// Call after the hub is marked draining.
    pub fn drain_started(&self) {
        self.0.notify_one();
    }
}

/// A registration not started yet (built on the supervising thread, started on the metrics
/// thread's runtime).
pub struct Registrar {
    settings: DirectorySettings,
    request: RegisterRelayRequest,
    status: HubStatus,
    drain: Arc<Notify>,
    alternates: Option<Arc<Shared>>,
}

impl Registrar {
    /// Registration of a relay whose metrics HTTP is bound on `metrics_addr`, fed by `hub`.
    pub fn new(
        settings: DirectorySettings,
        metrics_addr: SocketAddr,
        hub: Arc<MetricsHub>,
    ) -> (Registrar, DrainNotice) {
        let request = RegisterRelayRequest {
            relay_id: settings.relay_id.clone(),
            turn_addr: settings.turn_addr,
            turn_tcp_addr: settings.turn_tcp_addr,
            turn_tls_addr: settings.turn_tls_addr,
            metrics_addr,
            region: settings.region.clone(),
            capacity: settings.capacity,
            load: 0.0,
            allocations: 0,
            draining: false,
        };
        let status = HubStatus::new(hub, settings.capacity);
        let drain = Arc::new(Notify::new());
        let notice = DrainNotice(drain.clone());
        (
            Registrar {
                settings,
                request,
                status,
                drain,
                alternates: None,
            },
            notice,
        )
    }

    /// Also keep `shared`'s alternates ([`Shared::set_alternates`]) to the healthy relays the
    /// directory lists, refreshed every [`ALTERNATES_REFRESH`].
    pub fn with_alternates(mut self, shared: Arc<Shared>) -> Self {
        self.alternates = Some(shared);
        self
    }

    /// Start the registration loop and its helpers on the current tokio runtime (must be called
    /// inside it). They make progress whenever that runtime is driven.
    pub fn start(self) -> Running {
        let Registrar {
            settings,
            request,
            status,
            drain,
            alternates,
        } = self;
        let directories = settings
            .client
            .base_urls()
            .iter()
            .map(|u| u.as_str())
            .collect::<Vec<_>>()
            .join(",");
        tracing::info!(
            directory = %directories,
            relay_id = %settings.relay_id,
            turn_addr = %settings.turn_addr,
            region = %settings.region,
            capacity = settings.capacity,
            "registering with the directory"
        );
        let registration = settings
            .client
            .spawn_relay_registration(request, status.clone());
        let watcher = tokio::spawn(log_outages(registration.subscribe(), directories));
        let drainer = tokio::spawn(announce_drain(
            drain,
            settings.client.clone(),
            settings.relay_id.clone(),
            status,
        ));
        let mut helpers = vec![watcher, drainer];
        if let Some(shared) = alternates {
            helpers.push(tokio::spawn(learn_alternates(
                settings.client.clone(),
                settings.relay_id.clone(),
                shared,
            )));
        }
        Running {
            registration,
            helpers,
            client: settings.client,
            relay_id: settings.relay_id,
        }
    }
}

/// A running registration.
pub struct Running {
    registration: RelayRegistration,
    helpers: Vec<JoinHandle<()>>,
    client: DirectoryClient,
    relay_id: String,
}

impl Running {
    /// Whether the directory currently has this relay registered (as far as the loop knows).
    pub fn registered(&self) -> bool {
        self.registration.state().registered
    }

    /// Stop heartbeating and deregister, best effort, bounded by [`DEREGISTER_TIMEOUT`].
    pub async fn shutdown(self) {
        self.registration.stop();
        for h in &self.helpers {
            h.abort();
        }
        drop(self.registration);
        // Let the loop observe the cancellation before the deregistration goes out, so it cannot
        // re-register behind it.
        tokio::task::yield_now().await;
        match tokio::time::timeout(
            DEREGISTER_TIMEOUT,
            self.client.deregister_relay(&self.relay_id),
        )
        .await
        {
            Ok(Ok(r)) => tracing::info!(known = r.removed, "deregistered from the directory"),
            Ok(Err(e)) => tracing::warn!("deregistering from the directory failed: {e}"),
            Err(_) => tracing::warn!(
                "deregistering from the directory timed out after {:?}",
                DEREGISTER_TIMEOUT
            ),
        }
    }
}

/// One warning line when the directory becomes unreachable (or refuses us), one info line when
/// it answers again; the loop keeps retrying either way.
async fn log_outages(
    mut state: tokio::sync::watch::Receiver<peerlink_api::directory_client::RegistrationState>,
    url: String,
) {
    let mut failing = false;
    while state.changed().await.is_ok() {
        let (err, registered) = {
            let s = state.borrow_and_update();
            (s.last_error.clone(), s.registered)
        };
        match err {
            Some(e) if !failing => {
                failing = true;
                tracing::warn!(
                    directory = %url,
                    "directory unreachable or refusing the relay ({e}); still serving, retrying"
                );
            }
            None if failing => {
                failing = false;
                tracing::info!(directory = %url, registered, "directory answering again");
            }
            _ => {}
        }
    }
}

/// Keeps `shared`'s alternates to the directory's healthy relays, every [`ALTERNATES_REFRESH`].
async fn learn_alternates(client: DirectoryClient, relay_id: String, shared: Arc<Shared>) {
    let mut failures = 0u32;
    let mut tick = tokio::time::interval(ALTERNATES_REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match client.list_relays().await {
            Ok(relays) => {
                failures = 0;
                shared.set_alternates(alternates_of(&relays, &relay_id));
            }
            Err(e) => {
                failures += 1;
                if failures == ALTERNATES_STALE_AFTER {
                    tracing::debug!("relay list unavailable ({e}); no alternates until it returns");
                    shared.set_alternates(Vec::new());
                }
            }
        }
    }
}

/// On drain start, heartbeat at once with the hub's figures (now `draining = true`).
async fn announce_drain(
    drain: Arc<Notify>,
    client: DirectoryClient,
    relay_id: String,
    status: HubStatus,
) {
    drain.notified().await;
    let st = status.current_status();
    let hb = RelayHeartbeatRequest {
        relay_id,
        load: st.load,
        allocations: st.allocations,
        draining: st.draining,
        stats: status.current_stats(),
    };
    match client.relay_heartbeat(&hb).await {
        Ok(_) => tracing::info!("drain announced to the directory"),
        Err(e) => tracing::warn!(
            "announcing the drain to the directory failed ({e}); the next registration or \
             heartbeat carries it"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str, port: u16, load: f64, f: impl FnOnce(&mut RelayInfo)) -> RelayInfo {
        let mut r = RelayInfo {
            relay_id: id.into(),
            turn_addr: SocketAddr::from(([198, 51, 100, 1], port)),
            turn_tcp_addr: None,
            turn_tls_addr: Some(SocketAddr::from(([198, 51, 100, 1], 443))),
            metrics_addr: SocketAddr::from(([198, 51, 100, 1], 9641)),
            region: "eu".into(),
            load,
            allocations: 10,
            capacity: 100,
            draining: false,
            handed_out: 0,
            healthy: true,
            last_heartbeat_age_ms: 0,
        };
        f(&mut r);
        r
    }

    #[test]
    fn alternates_are_the_other_healthy_open_relays_least_loaded_first() {
        let relays = vec![
            info("me", 1, 0.0, |_| {}),
            info("busy", 2, 0.9, |_| {}),
            info("idle", 3, 0.1, |_| {}),
            info("draining", 4, 0.0, |r| r.draining = true),
            info("dead", 5, 0.0, |r| r.healthy = false),
            info("full", 6, 0.0, |r| r.allocations = 100),
        ];
        let alts = alternates_of(&relays, "me");
        let ports: Vec<u16> = alts.iter().map(|a| a.udp.port()).collect();
        assert_eq!(ports, vec![3, 2]);
        assert_eq!(
            alts[0].tls,
            Some(SocketAddr::from(([198, 51, 100, 1], 443)))
        );
        assert_eq!(alts[0].tcp, None);
    }

    #[test]
    fn load_is_allocation_fill_clamped() {
        assert_eq!(load_figure(0, 100), 0.0);
        assert_eq!(load_figure(25, 100), 0.25);
        assert_eq!(load_figure(100, 100), 1.0);
        assert_eq!(load_figure(150, 100), 1.0);
        assert_eq!(load_figure(1, 0), 1.0);
    }

    #[test]
    fn hub_status_reports_draining() {
        let hub = Arc::new(MetricsHub::new(1, "epoll"));
        let s = HubStatus::new(hub.clone(), 10);
        assert_eq!(
            s.current_status(),
            RelayStatus {
                load: 0.0,
                allocations: 0,
                draining: false
            }
        );
        hub.set_draining();
        assert!(s.current_status().draining);
    }
}
