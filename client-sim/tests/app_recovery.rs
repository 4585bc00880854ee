//! Call recovery over real processes on loopback: the relay carrying a relay-only call is
//! killed with SIGKILL mid-call (the call must continue through the other relay after an ICE
//! restart), the callee vanishes (the caller must end on consent expiry), and allocations do
//! not outlive the call. The workspace must be built first.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use peerlink_api::signaling_client::{HttpApi, SignalSession};
use peerlink_sim::call::{self, CallEvent, CallOptions};
use peerlink_sim::fleet::{Fleet, FleetOptions, relay_stats};
use tokio::sync::mpsc;

const TEST: Duration = Duration::from_secs(150);

mod common;
use common::two_users;

/// Waits (bounded) for the first selected path of a call.
async fn first_path(rx: &mut mpsc::UnboundedReceiver<CallEvent>) {
    tokio::time::timeout(Duration::from_secs(40), async {
        while let Some(ev) = rx.recv().await {
            if let CallEvent::Path { first: true, .. } = ev {
                return;
            }
        }
        panic!("event channel closed before a path was selected");
    })
    .await
    .expect("no path selected in time");
}

async fn allocations(metrics: std::net::SocketAddr) -> u64 {
    relay_stats(metrics, Duration::from_secs(10))
        .await
        .unwrap()
        .allocations_active
}

/// Polls (bounded) until the relay reports no active allocation.
async fn wait_no_allocations(metrics: std::net::SocketAddr) -> u64 {
    let mut n = u64::MAX;
    for _ in 0..40 {
        n = allocations(metrics).await;
        if n == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    n
}

#[tokio::test]
async fn relay_killed_mid_call_call_continues_through_the_other_relay() {
    tokio::time::timeout(TEST, async {
        let mut fleet = Fleet::start(FleetOptions {
            extra_relays: 1,
            ..FleetOptions::default()
        })
        .await
        .unwrap();
        assert_eq!(fleet.relays.len(), 2);
        let (mut alice, mut bob) = two_users(&fleet, "rita", "sven").await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let opts = CallOptions {
            stun: fleet.stun,
            duration: Duration::from_secs(9),
            relay_only: true,
            seed: 11,
            events: Some(tx),
            ..CallOptions::default()
        };
        let ob = CallOptions {
            seed: 12,
            events: None,
            ..opts.clone()
        };
        let relays = fleet.relays.clone();
        let killer = async {
            first_path(&mut rx).await;
            // Let media flow a moment, then crash the relay that holds the allocations.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let mut victim = None;
            for r in &relays {
                if allocations(r.metrics).await > 0 {
                    victim = Some(*r);
                    break;
                }
            }
            let victim = victim.expect("no relay holds the call's allocations");
            assert!(fleet.kill_relay(victim.turn).await, "kill relay");
            victim
        };
        let (ra, rb, victim) = tokio::join!(
            call::call(&mut alice, "sven", &opts),
            call::answer_next(
                &mut bob,
                Duration::from_secs(30),
                Duration::from_secs(60),
                &ob
            ),
            killer
        );
        let (ra, rb) = (
            ra.unwrap_or_else(|e| panic!("caller: {e}")),
            rb.unwrap_or_else(|e| panic!("callee: {e}")),
        );
        eprintln!("{}", serde_json::to_string_pretty(&ra).unwrap());
        eprintln!("{}", serde_json::to_string_pretty(&rb).unwrap());
        let mut restarted = false;
        while let Ok(ev) = rx.try_recv() {
            restarted |= matches!(ev, CallEvent::Restarted { .. });
        }
        assert!(restarted, "the caller never restarted");
        assert_eq!(ra.end, "hangup", "{ra:?}");
        assert_eq!(rb.end, "peer_hangup", "{rb:?}");
        assert!(ra.restarts >= 1 && rb.restarts >= 1, "{ra:?} {rb:?}");
        for r in [&ra, &rb] {
            assert_eq!(r.path.as_deref(), Some("relay"), "{r:?}");
            // Media stopped when the relay died and resumed: the longest gap is the outage,
            // measured between two accepted packets, so packets came after it. How long it
            // lasted is a figure (target <= 3 s, docs/BENCHMARKS.md), printed, not asserted.
            eprintln!("media gap across the relay kill: {} ms", r.max_media_gap_ms);
            assert!(r.max_media_gap_ms >= 300.0, "no outage: {r:?}");
            // ~75 packets before the kill at 50/s: most of the call came after the outage.
            assert!(r.media.packets_received >= 200, "{r:?}");
        }
        // The surviving relay carried the rest of the call, and both allocations on it were
        // released at the end.
        let survivor = relays.iter().find(|r| r.turn != victim.turn).unwrap();
        let st = relay_stats(survivor.metrics, Duration::from_secs(10))
            .await
            .unwrap();
        let created = st.counters.get("allocations_created").copied();
        assert!(created >= Some(2), "{st:?}");
        assert!(
            st.counters.get("allocations_deleted").copied() >= Some(2),
            "allocations not released by LIFETIME 0: {st:?}"
        );
        assert_eq!(wait_no_allocations(survivor.metrics).await, 0);
        fleet.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn callee_vanishes_caller_ends_on_consent_expiry() {
    tokio::time::timeout(TEST, async {
        let fleet = Fleet::start(FleetOptions::default()).await.unwrap();
        let (mut alice, mut bob) = two_users(&fleet, "tina", "umar").await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let opts = CallOptions {
            stun: fleet.stun,
            duration: Duration::from_secs(60),
            seed: 21,
            ..CallOptions::default()
        };
        let ob = CallOptions {
            seed: 22,
            events: Some(tx),
            ..opts.clone()
        };
        let callee = async {
            let run = call::answer_next(
                &mut bob,
                Duration::from_secs(30),
                Duration::from_secs(60),
                &ob,
            );
            // The callee's process "dies" for the media path: its call (socket, agent) is
            // dropped while its signaling session stays up, so only consent can tell.
            tokio::select! {
                r = run => panic!("callee ended on its own: {r:?}"),
                () = async {
                    first_path(&mut rx).await;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                } => {}
            }
            Instant::now()
        };
        let (ra, vanished_at) = tokio::join!(call::call(&mut alice, "umar", &opts), callee);
        let ended_after = vanished_at.elapsed();
        let ra = ra.unwrap_or_else(|e| panic!("caller: {e}"));
        eprintln!("{}", serde_json::to_string_pretty(&ra).unwrap());
        assert_eq!(ra.end, "consent_expired", "{ra:?}");
        assert!(ra.ended.starts_with("consent expired"), "{}", ra.ended);
        assert!(ra.restarts >= 1, "{ra:?}");
        // Not before the 5 s of silence that consent allows (less the 1 s the callee's media
        // was gone before `vanished_at`); the end reason says consent ended it, not the 60 s.
        eprintln!("the caller ended {ended_after:?} after the callee vanished");
        assert!(
            ended_after >= Duration::from_secs(4),
            "ended {ended_after:?} after the callee vanished: before consent expired"
        );
        // The caller released its relay allocation (the callee's, never closed, remains).
        let metrics = fleet.relay.unwrap().metrics;
        let mut active = u64::MAX;
        for _ in 0..40 {
            active = allocations(metrics).await;
            if active <= 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert!(active <= 1, "{active} allocations left");
        fleet.stop().await;
    })
    .await
    .expect("test timed out");
}

/// A TCP proxy on loopback between one client and signaling, which the test can cut: every
/// proxied connection is dropped at once, and with `stay_down` new ones are refused too.
struct CutProxy {
    addr: std::net::SocketAddr,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
    accept: tokio::task::JoinHandle<()>,
}

impl CutProxy {
    async fn start(upstream_url: &str) -> Self {
        let upstream: std::net::SocketAddr = upstream_url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let down = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (c2, d2) = (conns.clone(), down.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if d2.load(std::sync::atomic::Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let h = tokio::spawn(async move {
                    let Ok(Ok(mut up)) = tokio::time::timeout(
                        Duration::from_secs(5),
                        tokio::net::TcpStream::connect(upstream),
                    )
                    .await
                    else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                });
                c2.lock().unwrap().push(h);
            }
        });
        Self {
            addr,
            conns,
            down,
            accept,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Drops every proxied connection; with `stay_down` refuses new ones from now on.
    fn cut(&self, stay_down: bool) -> usize {
        self.down
            .store(stay_down, std::sync::atomic::Ordering::SeqCst);
        let mut conns = self.conns.lock().unwrap();
        let n = conns.iter().filter(|h| !h.is_finished()).count();
        for h in conns.drain(..) {
            h.abort();
        }
        n
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut(true);
    }
}

/// Caller `a` reaches signaling through `proxy`, callee `b` directly.
async fn users_behind_proxy(
    fleet: &Fleet,
    proxy: &CutProxy,
    a: &str,
    b: &str,
) -> (SignalSession, SignalSession) {
    let direct = HttpApi::new(&fleet.signaling_url, Duration::from_secs(30)).unwrap();
    for u in [a, b] {
        direct.register(u, "password-123").await.unwrap();
    }
    let via = HttpApi::new(&proxy.url(), Duration::from_secs(30)).unwrap();
    let ta = via.login(a, "password-123").await.unwrap();
    let tb = direct.login(b, "password-123").await.unwrap();
    let sa = SignalSession::connect(via, ta, "a", None).await.unwrap();
    let sb = SignalSession::connect(direct, tb, "b", None).await.unwrap();
    (sa, sb)
}

#[tokio::test]
async fn caller_signaling_cut_mid_call_reconnects_and_the_call_completes() {
    tokio::time::timeout(TEST, async {
        let fleet = Fleet::start(FleetOptions::default()).await.unwrap();
        let proxy = CutProxy::start(&fleet.signaling_url).await;
        let (mut alice, mut bob) = users_behind_proxy(&fleet, &proxy, "vera", "walt").await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let opts = CallOptions {
            stun: fleet.stun,
            duration: Duration::from_secs(7),
            seed: 31,
            events: Some(tx),
            ..CallOptions::default()
        };
        let ob = CallOptions {
            seed: 32,
            events: None,
            ..opts.clone()
        };
        let cutter = async {
            first_path(&mut rx).await;
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let n = proxy.cut(false);
            assert!(n >= 1, "no live signaling connection through the proxy");
            // The caller notices and comes back (bounded by the test timeout).
            let (mut down, mut up) = (false, false);
            while let Some(ev) = rx.recv().await {
                match ev {
                    CallEvent::Signaling { up: false } => down = true,
                    CallEvent::Signaling { up: true } => {
                        up = true;
                        break;
                    }
                    _ => {}
                }
            }
            (down, up)
        };
        let (ra, rb, (down, up)) = tokio::join!(
            call::call(&mut alice, "walt", &opts),
            call::answer_next(
                &mut bob,
                Duration::from_secs(30),
                Duration::from_secs(60),
                &ob
            ),
            cutter
        );
        let (ra, rb) = (
            ra.unwrap_or_else(|e| panic!("caller: {e}")),
            rb.unwrap_or_else(|e| panic!("callee: {e}")),
        );
        eprintln!("{}", serde_json::to_string_pretty(&ra).unwrap());
        eprintln!("{}", serde_json::to_string_pretty(&rb).unwrap());
        assert!(down && up, "signaling events: down {down}, up {up}");
        assert!(ra.signal_reconnects >= 1, "{ra:?}");
        assert_eq!(rb.signal_reconnects, 0, "{rb:?}");
        // The hangup went through the reopened session.
        assert_eq!(ra.end, "hangup", "{ra:?}");
        assert_eq!(rb.end, "peer_hangup", "{rb:?}");
        for r in [&ra, &rb] {
            // The media path was never touched: no silence long enough for a restart.
            eprintln!(
                "media gap across the signaling cut: {} ms",
                r.max_media_gap_ms
            );
            assert_eq!(r.restarts, 0, "{r:?}");
            assert!(r.media.packets_received >= 200, "{r:?}");
        }
        drop(proxy);
        fleet.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn caller_signaling_stays_down_the_call_ends_with_signaling_lost() {
    tokio::time::timeout(TEST, async {
        let fleet = Fleet::start(FleetOptions::default()).await.unwrap();
        let proxy = CutProxy::start(&fleet.signaling_url).await;
        let (mut alice, mut bob) = users_behind_proxy(&fleet, &proxy, "xena", "yuri").await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let opts = CallOptions {
            stun: fleet.stun,
            duration: Duration::from_secs(60),
            seed: 41,
            events: Some(tx),
            ..CallOptions::default()
        };
        let ob = CallOptions {
            seed: 42,
            events: None,
            ..opts.clone()
        };
        let grace = opts.signal_grace;
        let cutter = async {
            first_path(&mut rx).await;
            tokio::time::sleep(Duration::from_millis(1500)).await;
            assert!(proxy.cut(true) >= 1, "no live connection through the proxy");
            Instant::now()
        };
        let (ra, rb, cut_at) = tokio::join!(
            call::call(&mut alice, "yuri", &opts),
            call::answer_next(
                &mut bob,
                Duration::from_secs(30),
                Duration::from_secs(60),
                &ob
            ),
            cutter
        );
        let took = cut_at.elapsed();
        let ra = ra.unwrap_or_else(|e| panic!("caller: {e}"));
        let rb = rb.unwrap_or_else(|e| panic!("callee: {e}"));
        eprintln!("{}", serde_json::to_string_pretty(&ra).unwrap());
        eprintln!("{}", serde_json::to_string_pretty(&rb).unwrap());
        assert_eq!(ra.end, "signaling_lost", "{ra:?}");
        assert!(ra.ended.starts_with("signaling lost"), "{}", ra.ended);
        assert_eq!(ra.signal_reconnects, 0, "{ra:?}");
        // The callee learns from signaling once its call grace (5 s) has run out.
        assert_eq!(rb.end, "peer_ended", "{rb:?}");
        assert!(rb.ended.contains("Disconnected"), "{}", rb.ended);
        // Not before the grace ran out; the end reasons above say signaling ended it, not the
        // 60 s duration.
        eprintln!("ended {took:?} after the cut (grace {grace:?})");
        assert!(
            took >= grace,
            "ended {took:?} after the cut, within the grace {grace:?}"
        );
        fleet.stop().await;
    })
    .await
    .expect("test timed out");
}
