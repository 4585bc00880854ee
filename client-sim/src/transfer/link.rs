//! In-process link emulation for transfer tests and benchmarks: a bottleneck
//! ([`RateLimitedLink`], sans-IO) followed by [`NetSim`] (delay, jitter, loss), driven between
//! two [`DatagramPath`]s by a small tokio task per direction ([`emulated_pair`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::netsim::{NetSim, NetSimConfig};
use crate::transfer::path::{DatagramPath, Pipe, VIRTUAL_CLIENT_ADDR, VIRTUAL_SERVER_ADDR};

/// Counters of a [`RateLimitedLink`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLinkStats {
    /// Datagrams offered to the link.
    pub pushed: u64,
    /// Datagrams dropped because the queue was full (tail drop).
    pub dropped_queue_full: u64,
    /// Datagrams that left the bottleneck.
    pub sent: u64,
    /// Bytes that left the bottleneck.
    pub sent_bytes: u64,
}

/// A bottleneck of fixed rate with a drop-tail FIFO queue (sans-IO; time is an input).
///
/// Each datagram leaves the queue after the previous one, `len * 8 / rate` seconds later.
#[derive(Debug)]
pub struct RateLimitedLink {
    rate_bps: u64,
    queue_limit_bytes: usize,
    queued_bytes: usize,
    busy_until: Option<Instant>,
    queue: VecDeque<(Instant, Vec<u8>)>,
    stats: RateLinkStats,
}

impl RateLimitedLink {
    /// A link of `rate_bps` bits per second (at least 1) whose queue holds `queue_limit_bytes`.
    pub fn new(rate_bps: u64, queue_limit_bytes: usize) -> Self {
        Self {
            rate_bps: rate_bps.max(1),
            queue_limit_bytes,
            queued_bytes: 0,
            busy_until: None,
            queue: VecDeque::new(),
            stats: RateLinkStats::default(),
        }
    }

    /// Offers a datagram at `now`; returns false if it was dropped (queue full).
    pub fn push(&mut self, now: Instant, datagram: Vec<u8>) -> bool {
        self.stats.pushed += 1;
        if self.queued_bytes + datagram.len() > self.queue_limit_bytes {
            self.stats.dropped_queue_full += 1;
            return false;
        }
        let start = match self.busy_until {
            Some(t) if t > now => t,
            _ => now,
        };
        let nanos = (datagram.len() as u128 * 8 * 1_000_000_000) / u128::from(self.rate_bps);
        let done = start + Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
        self.busy_until = Some(done);
        self.queued_bytes += datagram.len();
        self.queue.push_back((done, datagram));
        true
    }

    /// The next datagram that has left the link by `now`, with its departure time.
    pub fn poll(&mut self, now: Instant) -> Option<(Instant, Vec<u8>)> {
        if self.queue.front().is_some_and(|(at, _)| *at <= now) {
            let (at, d) = self.queue.pop_front()?;
            self.queued_bytes -= d.len();
            self.stats.sent += 1;
            self.stats.sent_bytes += d.len() as u64;
            Some((at, d))
        } else {
            None
        }
    }

    /// When the head of the queue leaves, if anything is queued.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.queue.front().map(|(at, _)| *at)
    }

    /// Counters so far.
    pub fn stats(&self) -> RateLinkStats {
        self.stats
    }
}

/// One direction of an emulated link.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// Bottleneck rate in bit/s; `None` = unlimited.
    pub rate_bps: Option<u64>,
    /// Bottleneck queue size in bytes (ignored when unlimited).
    pub queue_bytes: usize,
    /// Delay, jitter and loss applied after the bottleneck.
    pub netsim: NetSimConfig,
}

impl LinkConfig {
    /// A link of `rate_bps` with `one_way_delay`, random `loss` and a queue of one
    /// bandwidth-delay product of the round trip (at least 64 KB), seeded with `seed`.
    pub fn bottleneck(rate_bps: u64, one_way_delay: Duration, loss: f64, seed: u64) -> Self {
        let bdp = (rate_bps as f64 / 8.0 * (one_way_delay * 2).as_secs_f64()) as usize;
        Self {
            rate_bps: Some(rate_bps),
            queue_bytes: bdp.max(64 * 1024),
            netsim: NetSimConfig {
                seed,
                delay: one_way_delay,
                loss,
                ..NetSimConfig::default()
            },
        }
    }

    /// An unlimited-rate link with `one_way_delay` and random `loss`.
    pub fn lossy(one_way_delay: Duration, loss: f64, seed: u64) -> Self {
        Self {
            rate_bps: None,
            queue_bytes: 0,
            netsim: NetSimConfig {
                seed,
                delay: one_way_delay,
                loss,
                ..NetSimConfig::default()
            },
        }
    }
}

/// Counters of one emulated direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirectionStats {
    /// Datagrams taken from the sender.
    pub offered: u64,
    /// Bytes taken from the sender.
    pub offered_bytes: u64,
    /// Dropped while the link was cut.
    pub dropped_cut: u64,
    /// Dropped by the bottleneck queue.
    pub dropped_queue: u64,
    /// Dropped by the loss model.
    pub dropped_loss: u64,
    /// Handed to the receiver.
    pub delivered: u64,
}

/// Handle on a running emulated link: cut/restore it, read counters; stops the tasks on drop.
#[derive(Debug)]
pub struct EmulatedLink {
    up: Arc<AtomicBool>,
    stats: [Arc<Mutex<DirectionStats>>; 2],
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl EmulatedLink {
    /// Drops every datagram from now on (`false`) or lets them through again (`true`).
    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
    }

    /// Counters of the client->server direction.
    pub fn forward_stats(&self) -> DirectionStats {
        *self.stats[0].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counters of the server->client direction.
    pub fn backward_stats(&self) -> DirectionStats {
        *self.stats[1].lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for EmulatedLink {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Two paths (client side, server side) joined by emulated links; needs a tokio runtime.
pub fn emulated_pair(
    forward: LinkConfig,
    backward: LinkConfig,
) -> (DatagramPath, DatagramPath, EmulatedLink) {
    let (client, client_h) = DatagramPath::new(VIRTUAL_CLIENT_ADDR, VIRTUAL_SERVER_ADDR);
    let (server, server_h) = DatagramPath::new(VIRTUAL_SERVER_ADDR, VIRTUAL_CLIENT_ADDR);
    let up = Arc::new(AtomicBool::new(true));
    let stats = [
        Arc::new(Mutex::new(DirectionStats::default())),
        Arc::new(Mutex::new(DirectionStats::default())),
    ];
    let tasks = vec![
        tokio::spawn(run_direction(
            client_h.outgoing,
            server_h.incoming,
            forward,
            up.clone(),
            stats[0].clone(),
        )),
        tokio::spawn(run_direction(
            server_h.outgoing,
            client_h.incoming,
            backward,
            up.clone(),
            stats[1].clone(),
        )),
    ];
    (client, server, EmulatedLink { up, stats, tasks })
}

async fn run_direction(
    from: Pipe,
    to: Pipe,
    config: LinkConfig,
    up: Arc<AtomicBool>,
    stats: Arc<Mutex<DirectionStats>>,
) {
    let mut rate = config
        .rate_bps
        .map(|r| RateLimitedLink::new(r, config.queue_bytes));
    let mut sim: NetSim<Vec<u8>> = NetSim::new(config.netsim.clone());
    let mut local = DirectionStats::default();
    loop {
        let next = match (
            rate.as_ref().and_then(|r| r.poll_timeout()),
            sim.poll_timeout(),
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let sleep = async {
            match next {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            d = from.pop_timed() => {
                // Use the send time, not the pop time: a late link task must not turn a paced
                // flow into a burst at the bottleneck.
                let Some((sent_at, d)) = d else { break };
                let now = sent_at;
                local.offered += 1;
                local.offered_bytes += d.len() as u64;
                if !up.load(Ordering::SeqCst) {
                    local.dropped_cut += 1;
                } else if let Some(r) = rate.as_mut() {
                    if !r.push(now, d) {
                        local.dropped_queue += 1;
                    }
                } else {
                    let before = sim.stats().lost_random + sim.stats().lost_burst;
                    sim.push(now, d);
                    local.dropped_loss += sim.stats().lost_random + sim.stats().lost_burst - before;
                }
            }
            () = sleep => {}
        }
        let now = Instant::now();
        if let Some(r) = rate.as_mut() {
            while let Some((at, d)) = r.poll(now) {
                let before = sim.stats().lost_random + sim.stats().lost_burst;
                sim.push(at, d);
                local.dropped_loss += sim.stats().lost_random + sim.stats().lost_burst - before;
            }
        }
        while let Some(d) = sim.poll(now) {
            if up.load(Ordering::SeqCst) && to.try_push(d).is_ok() {
                local.delivered += 1;
            } else {
                local.dropped_cut += 1;
            }
        }
        *stats.lock().unwrap_or_else(|e| e.into_inner()) = local;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_link_paces_datagrams_at_its_rate() {
        let t0 = Instant::now();
        // 8 Mbit/s: a 1000-byte datagram takes 1 ms.
        let mut l = RateLimitedLink::new(8_000_000, 10_000);
        for _ in 0..5 {
            assert!(l.push(t0, vec![0; 1000]));
        }
        assert_eq!(l.poll_timeout(), Some(t0 + Duration::from_millis(1)));
        assert!(l.poll(t0).is_none());
        let mut out = Vec::new();
        while let Some((at, _)) = l.poll(t0 + Duration::from_millis(10)) {
            out.push(at - t0);
        }
        let want: Vec<_> = (1..=5).map(Duration::from_millis).collect();
        assert_eq!(out, want);
        // Idle link: the next datagram starts at its own arrival time.
        assert!(l.push(t0 + Duration::from_millis(20), vec![0; 1000]));
        assert_eq!(l.poll_timeout(), Some(t0 + Duration::from_millis(21)));
    }

    #[test]
    fn rate_link_tail_drops_when_queue_full() {
        let t0 = Instant::now();
        let mut l = RateLimitedLink::new(8_000_000, 2500);
        assert!(l.push(t0, vec![0; 1000]));
        assert!(l.push(t0, vec![0; 1000]));
        assert!(!l.push(t0, vec![0; 1000]));
        assert_eq!(l.stats().dropped_queue_full, 1);
        assert!(l.poll(t0 + Duration::from_millis(1)).is_some());
        assert!(
            l.push(t0 + Duration::from_millis(1), vec![0; 1000]),
            "room again"
        );
        assert_eq!(l.stats().pushed, 4);
    }

    #[tokio::test]
    async fn emulated_link_delays_and_can_be_cut() {
        let (a, b, link) = emulated_pair(
            LinkConfig::lossy(Duration::from_millis(20), 0.0, 1),
            LinkConfig::lossy(Duration::from_millis(20), 0.0, 2),
        );
        let t0 = Instant::now();
        a.handle().outgoing.try_push(vec![1, 2, 3]).expect("room");
        let got = tokio::time::timeout(Duration::from_secs(5), b.handle().incoming.pop())
            .await
            .expect("delivered in time");
        assert_eq!(got, Some(vec![1, 2, 3]));
        assert!(t0.elapsed() >= Duration::from_millis(20));
        link.set_up(false);
        a.handle().outgoing.try_push(vec![4]).expect("room");
        let res = tokio::time::timeout(Duration::from_millis(200), b.handle().incoming.pop()).await;
        assert!(res.is_err(), "nothing crosses a cut link");
        assert_eq!(link.forward_stats().dropped_cut, 1);
        assert_eq!(link.forward_stats().delivered, 1);
    }
}
