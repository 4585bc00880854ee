//! The data path of both backends does no heap allocation per packet: a worker runs in this test
//! process on its own thread under a counting global allocator, and relaying thousands of
//! ChannelData packets in both directions (after a warm-up) costs only the handful of
//! allocations of the once-a-second metrics report, not one per packet.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{TurnClient, peer, recv_from};
use peerlink_relay::core::{Core, CoreConfig, Shared};
use peerlink_relay::worker::{SocketTable, WorkerCtx};
use peerlink_relay::{epoll, net, uring};

struct Counting;

thread_local! {
    static TRACK: Cell<bool> = const { Cell::new(false) };
}
static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if TRACK.with(|t| t.get()) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if TRACK.with(|t| t.get()) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const CHANNEL: u16 = 0x4002;

fn run(io: &'static str, busy_poll: Duration) {
    let listener = net::bind_listener("127.0.0.1:0".parse().unwrap()).unwrap();
    let listen = listener.local_addr().unwrap();
    let mut cfg = CoreConfig::new(
        "peerlink",
        listen,
        vec!["127.0.0.1".parse().unwrap()],
        [7; 32],
    );
    cfg.users = HashMap::from([(
        "user".to_string(),
        peerlink_proto::auth::long_term_key("user", "peerlink", "pass"),
    )]);
    cfg.allow_peers = vec!["127.0.0.0/8".parse().unwrap()];
    let shared = Arc::new(Shared::new(Instant::now(), 1_800_000_000));
    let core = Core::new(Arc::new(cfg), shared, 1);
    let table = SocketTable::new(&["127.0.0.1".parse().unwrap()], 49152..=65535, 2);
    let (tx, rx) = crossbeam_channel::bounded(64);
    let stop = Arc::new(AtomicBool::new(false));
    let ctx = WorkerCtx::new(0, core, table, listener, tx, stop.clone());
    let worker = std::thread::spawn(move || {
        TRACK.with(|t| t.set(true));
        let r = match io {
            "uring" => uring::run(ctx, 256, busy_poll).map_err(|e| e.to_string()),
            _ => epoll::run(ctx, busy_poll).map_err(|e| e.to_string()),
        };
        TRACK.with(|t| t.set(false));
        r
    });
    // Drain reports so the channel never fills.
    let drain = std::thread::spawn(move || while rx.recv().is_ok() {});

    let p = peer();
    let peer_addr = p.local_addr().unwrap();
    let mut c = TurnClient::new(listen, "user", "pass");
    let relayed: SocketAddr = c.allocate().unwrap();
    c.create_permission(peer_addr).unwrap();
    c.channel_bind(CHANNEL, peer_addr).unwrap();
    let payload = [0xABu8; 160];
    let round = |n: usize| {
        for _ in 0..n {
            c.send_channel(CHANNEL, &payload);
            let (got, _) = recv_from(&p, Duration::from_secs(5)).expect("client -> peer");
            assert_eq!(got.len(), payload.len());
            p.send_to(&payload, relayed).unwrap();
            let back = c.recv(Duration::from_secs(5)).expect("peer -> client");
            assert_eq!(back.len(), 4 + payload.len());
        }
    };
    round(300); // warm-up: lazily grown tables, first report, ...
    let before = ALLOCS.load(Ordering::Relaxed);
    // The worker's own setup (buffers, tables, relayed socket) was counted: the probe works.
    assert!(before > 0, "allocation counting must see the worker thread");
    const PACKETS: usize = 2_000;
    round(PACKETS / 2);
    let during = ALLOCS.load(Ordering::Relaxed) - before;
    stop.store(true, Ordering::Relaxed);
    worker.join().unwrap().unwrap();
    drain.join().unwrap();
    // Each second the worker clones its histogram and counters for the metrics thread: a few
    // allocations per second. One allocation per packet would be >= 2000.
    assert!(
        during < 100,
        "{io}: {during} allocations on the worker for {PACKETS} packets"
    );
}

#[test]
fn uring_data_path_does_not_allocate() {
    run("uring", Duration::ZERO);
}

/// The busy-poll path (`--busy-poll-us`) handles the same datagrams without allocating either.
#[test]
fn uring_busy_poll_does_not_allocate() {
    run("uring", Duration::from_micros(200));
}

#[test]
fn epoll_busy_poll_does_not_allocate() {
    run("epoll", Duration::from_micros(200));
}

#[test]
fn epoll_data_path_does_not_allocate() {
    run("epoll", Duration::ZERO);
}
