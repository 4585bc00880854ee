//! Directory lookup throughput: a program, not a timed test (`harness = false`).
//!
//! `cargo bench -p peerlink-directory --bench lookups [-- --quick]`
//!
//! 1. In-process store lookups per second on one thread (= per core) and on two threads,
//!    against a baseline measured in the same run: a bare `HashMap::get` + clone of the same
//!    records with no locks and no TTL logic (the floor of any in-memory lookup). Rounds
//!    alternate A/B; the first round of each is discarded.
//! 2. HTTP lookups per second over loopback (server and load generator in this process,
//!    sharing the machine's cores): single-user `GET /v1/presence/{user}` and 100-user batch
//!    `POST /v1/presence/lookup`.
//! 3. The same HTTP lookups with the state in Redis (`RedisStore` over Debian's
//!    `redis-server` on loopback, started for the run; skipped with one line when it is not
//!    installed), as ratios to phase 2 in the same run.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use peerlink_api::directory::*;
use peerlink_directory::clock::{SystemClock, Timestamp};
use peerlink_directory::memory::MemoryStore;
use peerlink_directory::redis_store::{self, RedisOptions, RedisStore};
use peerlink_directory::server::{AppState, HttpLimits, app};
use peerlink_directory::store::{DirectoryStore, StoreConfig};

const USERS: usize = 100_000;
const NODES: usize = 10;
const TOKEN: &str = "bench-token-123";

fn user(i: usize) -> String {
    format!("user-{i:07}")
}

fn populate(store: &MemoryStore, now: Timestamp) {
    for n in 0..NODES {
        store
            .register_node_now(
                RegisterNodeRequest {
                    node_id: format!("node-{n}"),
                    internal_url: format!("http://10.0.0.{n}:8443"),
                    epoch: 1,
                    load: 0.0,
                },
                now,
            )
            .expect("register");
    }
    for i in 0..USERS {
        store
            .update_presence_now(
                &PresenceUpdate {
                    user: user(i),
                    device: "phone".into(),
                    node_id: format!("node-{}", i % NODES),
                    node_epoch: 1,
                    status: PresenceStatus::Online,
                },
                now,
            )
            .expect("presence");
    }
}

/// Pseudo-random user order (xorshift; fixed seed).
fn order(n: usize, seed: u64) -> Vec<String> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            user((x % USERS as u64) as usize)
        })
        .collect()
}

fn run_for(d: Duration, mut f: impl FnMut(usize)) -> f64 {
    let start = Instant::now();
    let mut ops = 0usize;
    while start.elapsed() < d {
        for _ in 0..1024 {
            f(ops);
            ops += 1;
        }
    }
    ops as f64 / start.elapsed().as_secs_f64()
}

fn store_rounds(
    store: &MemoryStore,
    baseline: &HashMap<String, DeviceLocation>,
    d: Duration,
    rounds: usize,
) -> (f64, f64) {
    let keys = order(1 << 16, 0x9e37_79b9);
    let now = Timestamp(1_000);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for round in 0..=rounds {
        let ra = run_for(d, |i| {
            black_box(store.lookup_user_now(&keys[i & 0xffff], now));
        });
        let rb = run_for(d, |i| {
            let k = &keys[i & 0xffff];
            black_box(UserLocation {
                user: k.clone(),
                devices: baseline.get(k).cloned().into_iter().collect(),
            });
        });
        if round > 0 {
            a.push(ra);
            b.push(rb);
        }
    }
    (median(&mut a), median(&mut b))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn store_threads(store: &Arc<MemoryStore>, threads: usize, d: Duration) -> f64 {
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                let keys = order(1 << 16, 0x1234 + t as u64);
                run_for(d, |i| {
                    black_box(store.lookup_user_now(&keys[i & 0xffff], Timestamp(1_000)));
                })
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("thread")).sum()
}

async fn http_phase(base: &str, concurrency: usize, d: Duration, batch: usize) -> (f64, f64) {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()
        .expect("client");
    let start = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|t| {
            let client = client.clone();
            let base = base.to_owned();
            tokio::spawn(async move {
                let keys = order(4096, 0x5555 + t as u64);
                let mut reqs = 0u64;
                let mut i = 0usize;
                while start.elapsed() < d {
                    let resp = if batch == 1 {
                        client
                            .get(format!("{base}/v1/presence/{}", keys[i & 4095]))
                            .bearer_auth(TOKEN)
                            .send()
                            .await
                    } else {
                        let users: Vec<String> =
                            (0..batch).map(|j| keys[(i + j) & 4095].clone()).collect();
                        client
                            .post(format!("{base}/v1/presence/lookup"))
                            .bearer_auth(TOKEN)
                            .json(&LookupRequest { users })
                            .send()
                            .await
                    };
                    let resp = resp.expect("request");
                    assert!(resp.status().is_success());
                    black_box(resp.bytes().await.expect("body"));
                    reqs += 1;
                    i += batch;
                }
                reqs
            })
        })
        .collect();
    let mut total = 0u64;
    for t in tasks {
        total += t.await.expect("task");
    }
    let secs = start.elapsed().as_secs_f64();
    (total as f64 / secs, (total as usize * batch) as f64 / secs)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let d = if quick {
        Duration::from_millis(300)
    } else {
        Duration::from_secs(1)
    };
    let rounds = if quick { 2 } else { 5 };
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!(
        "directory lookups benchmark: {USERS} users on {NODES} nodes, {cores} cores available"
    );

    let cfg = StoreConfig {
        presence_ttl: Duration::from_secs(3_600),
        node_ttl: Duration::from_secs(3_600),
        seed: Some(1),
    };
    let store = Arc::new(MemoryStore::new(cfg));
    populate(&store, Timestamp(0));
    let baseline: HashMap<String, DeviceLocation> = (0..USERS)
        .map(|i| {
            let loc = store.lookup_user_now(&user(i), Timestamp(1_000));
            (user(i), loc.devices[0].clone())
        })
        .collect();

    let (mem, base) = store_rounds(&store, &baseline, d, rounds);
    println!(
        "store, 1 thread : {:>12.0} lookups/s   (bare HashMap::get+clone baseline {:>12.0}/s, ratio {:.2})",
        mem,
        base,
        mem / base
    );
    let two = store_threads(&store, 2, d * 2);
    println!(
        "store, 2 threads: {two:>12.0} lookups/s   ({:.2}x one thread)",
        two / mem
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        // Entries were written at t=0; with hour-long TTLs the fresh system clock keeps them live.
        let clock = Arc::new(SystemClock::new());
        let state = AppState::new(store.clone(), clock, cfg, HttpLimits::default(), TOKEN);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move { axum::serve(listener, app(state)).await });
        let base = format!("http://{addr}");
        let hd = d * 3;
        let (single, _) = http_phase(&base, 32, hd, 1).await;
        println!("http single     : {single:>12.0} lookups/s   (GET /v1/presence/{{user}}, 32 concurrent, loopback, server+client share {cores} cores)");
        let (rps, batch) = http_phase(&base, 16, hd, 100).await;
        println!("http batch x100 : {batch:>12.0} users/s     ({rps:.0} requests/s of 100 users, 16 concurrent)");
        server.abort();

        let Some(redis) = peerlink_testkit::redis::RedisServer::start() else {
            return;
        };
        let loc = redis_store::parse_location(&redis.url(0)).expect("redis url");
        let store = Arc::new(
            RedisStore::connect(loc, cfg, RedisOptions::default())
                .await
                .expect("redis store"),
        );
        // Redis stamps with the caller's clock; this run's clock starts at 0 like phase 2's.
        let clock = Arc::new(SystemClock::new());
        populate_async(&*store, Timestamp(0)).await;
        let state = AppState::new(store, clock, cfg, HttpLimits::default(), TOKEN);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move { axum::serve(listener, app(state)).await });
        let base = format!("http://{addr}");
        let (r_single, _) = http_phase(&base, 32, hd, 1).await;
        println!(
            "redis single    : {r_single:>12.0} lookups/s   ({:.2}x the in-memory store; redis-server on the same cores)",
            r_single / single
        );
        let (rps, r_batch) = http_phase(&base, 16, hd, 100).await;
        println!(
            "redis batch x100: {r_batch:>12.0} users/s     ({rps:.0} requests/s; {:.2}x the in-memory store)",
            r_batch / batch
        );
        server.abort();
    });
}

/// `populate` through the trait, in full batches (for a shared store).
async fn populate_async<S: DirectoryStore>(store: &S, now: Timestamp) {
    for n in 0..NODES {
        let req = RegisterNodeRequest {
            node_id: format!("node-{n}"),
            internal_url: format!("http://10.0.0.{n}:8443"),
            epoch: 1,
            load: 0.0,
        };
        store.register_node(req, now).await.expect("register");
    }
    for n in 0..NODES {
        let mine: Vec<NodePresence> = (n..USERS)
            .step_by(NODES)
            .map(|i| NodePresence {
                user: user(i),
                device: "phone".into(),
                status: PresenceStatus::Online,
            })
            .collect();
        for chunk in mine.chunks(MAX_PRESENCE_BATCH) {
            store
                .update_presence_batch(&format!("node-{n}"), 1, chunk.to_vec(), now)
                .await
                .expect("presence");
        }
    }
}
