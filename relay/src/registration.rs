//! Directory registration: with `--directory URL` the relay registers its public TURN
//! address, metrics address, region and capacity with the peerlink directory, then heartbeats
//! its load, allocation count and draining state.
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

use peerlink_api::directory::{RegisterRelayRequest, RelayHeartbeatRequest};
use peerlink_api::directory_client::{
    DirectoryClient, RelayRegistration, RelayStatus, RelayStatusSource,
};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::metrics::MetricsHub;

/// Upper bound of the best-effort deregistration on exit.
pub const DEREGISTER_TIMEOUT: Duration = Duration::from_secs(2);
/// Per-request timeout of the relay's directory client (registration, heartbeats).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

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
            },
            notice,
        )
    }

    /// Start the registration loop and its helpers on the current tokio runtime (must be called
    /// inside it). They make progress whenever that runtime is driven.
    pub fn start(self) -> Running {
        let Registrar {
            settings,
            request,
            status,
            drain,
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
        Running {
            registration,
            helpers: vec![watcher, drainer],
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
