//! Process-level behaviour of `peerlink-relay` (the io_uring, runtime, resource and lifetime
//! rows of the bad-input list in `relay/README.md`), each on both backends: allocate/free
//! cycles leave fds, the allocation gauge and memory at baseline; drain on SIGTERM; a send
//! error keeps the allocation; metrics/stats/health shapes; the histogram log reads back; bad
//! config and forced io_uring fail before binding.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Relay, TurnClient, free_udp_port, peer, recv_from, wait_child};

const CHANNEL: u16 = 0x4001;

/// Allocate, permit `peer_addr`, bind `CHANNEL` to it; returns the relayed address.
fn setup_client(relay: &Relay, peer_addr: SocketAddr) -> (TurnClient, SocketAddr) {
    let mut c = TurnClient::new(relay.listen, "user", "pass");
    let relayed = c
        .allocate()
        .unwrap_or_else(|e| panic!("allocate: {e}\n{}", relay.log_text()));
    c.create_permission(peer_addr).expect("permission");
    c.channel_bind(CHANNEL, peer_addr).expect("channel bind");
    (c, relayed)
}

/// Send one ChannelData and one Send indication to `peer_sock` through the relay; both must
/// arrive from the relayed address with the right payload.
fn assert_relays(c: &TurnClient, peer_sock: &UdpSocket, relayed: SocketAddr, tag: &[u8]) {
    let peer_addr = peer_sock.local_addr().unwrap();
    c.send_channel(CHANNEL, tag);
    let (got, from) = recv_from(peer_sock, common::STEP).expect("ChannelData relayed to peer");
    assert_eq!(got, tag);
    assert_eq!(from, relayed);
    c.send_indication(peer_addr, tag);
    let (got, from) = recv_from(peer_sock, common::STEP).expect("Send indication relayed");
    assert_eq!(got, tag);
    assert_eq!(from, relayed);
    // And back: peer -> relayed address -> client as ChannelData.
    peer_sock.send_to(tag, relayed).unwrap();
    let back = c
        .recv(common::STEP)
        .expect("peer data relayed back to the client");
    assert_eq!(&back[0..2], &CHANNEL.to_be_bytes());
    assert_eq!(&back[4..4 + tag.len()], tag);
}

macro_rules! both {
    ($($name:ident),* $(,)?) => {
        mod uring { $(#[test] fn $name() { super::$name("uring"); })* }
        mod epoll { $(#[test] fn $name() { super::$name("epoll"); })* }
    };
}

both!(
    alloc_free_cycles_leave_no_residue,
    drain_on_sigterm_serves_existing_refuses_new,
    drain_timeout_exits_zero_with_allocations_left,
    send_error_keeps_allocation,
    metrics_stats_health_shapes,
    histogram_log_reads_back,
    binding_maps_exact_client_address,
    kernel_receive_buffer_drops_are_counted,
    truncated_datagram_is_dropped_and_counted,
    several_relay_ips_multiply_relayed_addresses,
    relayed_sockets_and_the_fd_limit,
    busy_poll_keeps_relaying_and_counts_its_hits,
);

fn alloc_free_cycles_leave_no_residue(io: &str) {
    const CYCLES: usize = 10_000;
    // A private range of 8 ports below the kernel's ephemeral range: 10,000 cycles through 8
    // ports only work if every freed port is really released, and afterwards all must be free.
    let ports = private_port_range(8);
    let (lo, hi) = (ports.start().to_string(), ports.end().to_string());
    let relay = Relay::start(io, &["--min-port", &lo, "--max-port", &hi]);
    let mut c = TurnClient::new(relay.listen, "user", "pass");
    // Warm up (nonce, first allocation, lazily sized tables), then take the baseline.
    for _ in 0..50 {
        c.allocate().expect("allocate");
        c.refresh(0).expect("free");
    }
    relay.wait_until("gauge back to 0", common::STEP, || {
        relay.stat("allocations_active") == 0
    });
    // Baseline: the smallest of a few samples (an HTTP connection of the stats poll above may
    // still be open for a moment).
    let mut fds = usize::MAX;
    let mut fd_list = Vec::new();
    for _ in 0..5 {
        if relay.fd_count() < fds {
            fds = relay.fd_count();
            fd_list = relay.fd_list();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let rss = relay.rss_kib();
    let started = Instant::now();
    for i in 0..CYCLES {
        let relayed = c
            .allocate()
            .unwrap_or_else(|e| panic!("allocate #{i}: {e}"));
        assert!(
            ports.contains(&relayed.port()),
            "{relayed} outside {ports:?}"
        );
        c.refresh(0).unwrap_or_else(|e| panic!("free #{i}: {e}"));
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "cycles too slow"
        );
    }
    // Reports arrive once a second: wait for one that covers every cycle.
    relay.wait_until(
        "a report covering all cycles, gauge at 0",
        common::STEP,
        || {
            relay.stat("allocations_created") >= (CYCLES + 50) as u64
                && relay.stat("allocations_active") == 0
                && relay.stat("relayed_sockets") == 0
        },
    );
    // Sockets are closed as soon as their close has been submitted; allow the loop a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    while relay.fd_count() > fds && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        relay.fd_count() <= fds,
        "fd count after {CYCLES} cycles: before {fd_list:#?} after {:#?}",
        relay.fd_list()
    );
    for port in ports.clone() {
        UdpSocket::bind(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("relayed port {port} still bound after the cycles: {e}"));
    }
    let grown = relay.rss_kib().saturating_sub(rss);
    assert!(
        grown < 16 * 1024,
        "RSS grew by {grown} KiB over {CYCLES} cycles"
    );
}

/// `n` consecutive free UDP ports on 127.0.0.1 (see [`free_range_on`]).
fn private_port_range(n: u16) -> std::ops::RangeInclusive<u16> {
    free_range_on(&["127.0.0.1"], n)
}

fn drain_on_sigterm_serves_existing_refuses_new(io: &str) {
    let mut relay = Relay::start(io, &["--drain-timeout", "60"]);
    let p = peer();
    let (mut a, relayed) = setup_client(&relay, p.local_addr().unwrap());
    assert_relays(&a, &p, relayed, b"before drain");
    relay.signal(libc::SIGTERM);
    relay.wait_until("readyz 503", common::STEP, || {
        matches!(relay.get("/readyz"), Ok((503, _)))
    });
    assert_eq!(relay.get("/healthz").unwrap().0, 200);
    // New allocations are refused...
    let mut b = TurnClient::new(relay.listen, "user", "pass");
    let err = b.allocate().expect_err("allocate while draining must fail");
    assert!(err == 508 || err == 403, "draining allocate answered {err}");
    // ...the existing one still relays, both ways...
    assert_relays(&a, &p, relayed, b"during drain");
    assert!(
        relay.child.try_wait().unwrap().is_none(),
        "must not exit while serving"
    );
    // ...and when it ends, the process exits 0.
    a.refresh(0).expect("free");
    let status = relay
        .wait_exit(Duration::from_secs(20))
        .expect("exit after last allocation");
    assert!(
        status.success(),
        "exit status {status:?}\n{}",
        relay.log_text()
    );
    assert!(relay.log_text().contains("drain complete"));
}

fn drain_timeout_exits_zero_with_allocations_left(io: &str) {
    let mut relay = Relay::start(io, &["--drain-timeout", "1"]);
    let p = peer();
    let (_a, _relayed) = setup_client(&relay, p.local_addr().unwrap());
    relay.signal(libc::SIGUSR1);
    let status = relay
        .wait_exit(Duration::from_secs(20))
        .expect("exit at drain timeout");
    assert!(status.success(), "{status:?}");
    assert!(
        relay.log_text().contains("drain timeout passed"),
        "{}",
        relay.log_text()
    );
}

fn send_error_keeps_allocation(io: &str) {
    let relay = Relay::start(io, &[]);
    let p = peer();
    let (c, relayed) = setup_client(&relay, p.local_addr().unwrap());
    // 127.0.0.1 is permitted; port 0 makes the kernel refuse the send (EINVAL) on the relayed
    // socket. The packet is dropped and counted; the allocation stays.
    let bad: SocketAddr = "127.0.0.1:0".parse().unwrap();
    for _ in 0..3 {
        c.send_indication(bad, b"to nowhere");
    }
    relay.wait_until("send error counted", common::STEP, || {
        relay.stat("send_errors") >= 3
    });
    assert_relays(&c, &p, relayed, b"still relaying");
    assert_eq!(relay.stat("allocations_active"), 1);
}

fn metrics_stats_health_shapes(io: &str) {
    let relay = Relay::start(io, &[]);
    let p = peer();
    let (c, relayed) = setup_client(&relay, p.local_addr().unwrap());
    for i in 0..20u8 {
        assert_relays(&c, &p, relayed, &[i; 100]);
    }
    relay.wait_until("latency samples", common::STEP, || {
        let (_, body) = relay.get("/stats").unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["latency_total_us"]["count"].as_u64().unwrap_or(0) >= 40
    });
    let (status, text) = relay.get("/metrics").unwrap();
    assert_eq!(status, 200);
    for family in [
        "forwarded_packets_total",
        "forwarded_bytes_total",
        "dropped_packets_total",
        "allocations_active",
        "allocations_created_total",
        "allocations_expired_total",
        "auth_failures_total",
        "kernel_receive_buffer_drops_total",
        "buffer_ring_empty_total",
        "completion_queue_overflow_total",
        "forward_latency_seconds",
    ] {
        let name = format!("peerlink_relay_{family}");
        assert!(text.contains(&format!("# HELP {name} ")), "HELP for {name}");
        assert!(text.contains(&format!("# TYPE {name} ")), "TYPE for {name}");
    }
    assert!(text.contains("# TYPE peerlink_relay_forward_latency_seconds histogram"));
    let value = |prefix: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no sample {prefix}\n{text}"))
    };
    assert!(value("peerlink_relay_forwarded_packets_total{direction=\"client_to_peer\"}") >= 40);
    assert!(value("peerlink_relay_forwarded_packets_total{direction=\"peer_to_client\"}") >= 20);
    assert_eq!(value("peerlink_relay_allocations_active "), 1);
    // Buckets are cumulative and end at the count.
    let buckets: Vec<u64> = text
        .lines()
        .filter(|l| l.starts_with("peerlink_relay_forward_latency_seconds_bucket"))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert!(buckets.len() > 5);
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
    let count = value("peerlink_relay_forward_latency_seconds_count");
    assert_eq!(*buckets.last().unwrap(), count);
    assert!(count >= 40);
    // No per-user labels anywhere.
    assert!(!text.contains("user=") && !text.contains("\"user\""));

    let (status, body) = relay.get("/stats").unwrap();
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["io"], io);
    assert_eq!(v["draining"], false);
    assert_eq!(v["allocations_active"], 1);
    for window in ["latency_interval_us", "latency_total_us"] {
        for field in ["count", "p50", "p90", "p99", "p999", "max", "mean"] {
            assert!(v[window][field].is_number(), "{window}.{field} in {body}");
        }
    }
    let t = &v["latency_total_us"];
    assert!(t["p50"].as_u64() <= t["p99"].as_u64() && t["p99"].as_u64() <= t["max"].as_u64());
    assert!(
        v["counters"]["forwarded_packets_client_to_peer"]
            .as_u64()
            .unwrap()
            >= 40
    );
    assert_eq!(relay.get("/healthz").unwrap(), (200, "ok\n".to_string()));
    assert_eq!(relay.get("/readyz").unwrap().0, 200);
    assert_eq!(relay.get("/nope").unwrap().0, 404);

    // The `stats` subcommand prints the same percentiles.
    let out = Command::new(common::bin())
        .args(["stats", "--metrics", &relay.metrics.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("p99=") && text.contains(&format!("io={io}")),
        "{text}"
    );
}

fn histogram_log_reads_back(io: &str) {
    use hdrhistogram::serialization::Deserializer;
    use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("latency.hlog");
    let mut relay = Relay::start(io, &["--histogram-log", path.to_str().unwrap()]);
    let p = peer();
    let (c, relayed) = setup_client(&relay, p.local_addr().unwrap());
    const ROUNDS: u64 = 30;
    for i in 0..ROUNDS {
        assert_relays(&c, &p, relayed, &(i as u32).to_be_bytes());
    }
    // Each round forwards at least 2 datagrams zero-copy (ChannelData out, peer data back as
    // ChannelData), each one latency sample.
    relay.signal(libc::SIGINT);
    let status = relay
        .wait_exit(Duration::from_secs(20))
        .expect("exit on SIGINT");
    assert!(status.success());
    let bytes = std::fs::read(&path).unwrap();
    let mut deserializer = Deserializer::new();
    let mut total = 0u64;
    let mut intervals = 0;
    for entry in IntervalLogIterator::new(&bytes) {
        if let LogEntry::Interval(h) = entry.expect("log entry parses") {
            let raw = base64::Engine::decode(
                &base64::engine::general_purpose::STANDARD,
                h.encoded_histogram(),
            )
            .unwrap();
            let hist: hdrhistogram::Histogram<u64> =
                deserializer.deserialize(&mut raw.as_slice()).unwrap();
            total += hist.len();
            intervals += 1;
        }
    }
    assert!(
        intervals >= 1,
        "no intervals in log:\n{}",
        String::from_utf8_lossy(&bytes)
    );
    assert!(total >= 2 * ROUNDS, "samples in log: {total}");
}

fn binding_maps_exact_client_address(io: &str) {
    let relay = Relay::start(io, &[]);
    let mut c = TurnClient::new(relay.listen, "user", "pass");
    assert_eq!(c.binding(), Some(c.local()));
}

/// Start the binary expecting it to fail; returns (exit code, stderr).
fn run_expect_failure(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let err_path = dir.path().join("stderr");
    let mut cmd = Command::new(common::bin());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .env_remove("PEERLINK_RELAY_AUTH_SECRET")
        .env_remove("PEERLINK_RELAY_DISABLE_IO_URING");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let status = wait_child(&mut child, Duration::from_secs(20));
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let err = std::fs::read_to_string(&err_path).unwrap_or_default();
    (status.expect("must exit promptly").code(), err)
}

#[test]
fn invalid_config_exits_before_binding() {
    // We hold the listen port (without SO_REUSEPORT): a relay that tried to bind before
    // validating would fail with a bind error instead of the config reason.
    let held = UdpSocket::bind("127.0.0.1:0").unwrap();
    let listen = held.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let unknown_key = dir.path().join("unknown.toml");
    std::fs::write(
        &unknown_key,
        "listen = \"127.0.0.1:1\"\nusers = [\"a:b\"]\nlisen = 3\n",
    )
    .unwrap();
    let bad_addr = dir.path().join("bad.toml");
    std::fs::write(&bad_addr, "listen = \"not-an-address\"\n").unwrap();
    let bad_duration = dir.path().join("duration.toml");
    std::fs::write(
        &bad_duration,
        "users = [\"a:b\"]\ndrain_timeout = \"soon\"\n",
    )
    .unwrap();
    let base = ["--listen", listen.as_str(), "--relay-ip", "127.0.0.1"];
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--user", "a:b", "--min-port", "6000", "--max-port", "5000"],
            "min-port",
        ),
        (vec!["--user", "a:b", "--realm", ""], "realm"),
        (vec![], "no credentials"),
        (vec!["--user", "nopass"], "NAME:PASSWORD"),
        (vec!["--user", "a:b", "--workers", "0"], "workers"),
        (vec!["--config", unknown_key.to_str().unwrap()], "lisen"),
        (vec!["--config", bad_addr.to_str().unwrap()], "listen"),
        (
            vec!["--config", bad_duration.to_str().unwrap()],
            "key `drain_timeout`: bad duration \"soon\"",
        ),
    ];
    for (extra, reason) in cases {
        let mut args: Vec<&str> = base.to_vec();
        args.extend(extra.iter().copied());
        let (code, err) = run_expect_failure(&args, &[]);
        assert_eq!(code, Some(2), "{args:?} exited {code:?}: {err}");
        assert!(
            err.contains(reason),
            "{args:?}: stderr should name {reason:?}: {err}"
        );
        assert!(
            !err.contains("binding"),
            "{args:?} tried to bind first: {err}"
        );
    }
    // A bad CLI value is refused by the parser, also before binding.
    let (code, err) = run_expect_failure(&["--listen", "999.1.1.1:3478", "--user", "a:b"], &[]);
    assert!(matches!(code, Some(c) if c != 0), "{err}");
    drop(held);
}

#[test]
fn forced_uring_unavailable_is_a_startup_error() {
    let port = free_udp_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let (code, err) = run_expect_failure(
        &[
            "--listen",
            &listen,
            "--user",
            "a:b",
            "--io",
            "uring",
            "--metrics",
            "127.0.0.1:0",
        ],
        &[("PEERLINK_RELAY_DISABLE_IO_URING", "1")],
    );
    assert!(matches!(code, Some(c) if c != 0), "{err}");
    assert!(err.contains("io_uring is unavailable"), "{err}");
    // The port was never bound (the probe runs first).
    UdpSocket::bind(&listen).expect("port stays free");
}

#[test]
fn auto_falls_back_to_epoll_with_one_log_line() {
    let relay = Relay::start_env("auto", &[], &[("PEERLINK_RELAY_DISABLE_IO_URING", "1")]);
    let (_, body) = relay.get("/stats").unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["io"], "epoll");
    let log = relay.log_text();
    assert_eq!(log.matches("using the epoll backend").count(), 1, "{log}");
    // And it works.
    let p = peer();
    let (c, relayed) = setup_client(&relay, p.local_addr().unwrap());
    assert_relays(&c, &p, relayed, b"epoll fallback");
}

#[test]
fn auto_uses_uring_when_available() {
    let relay = Relay::start("auto", &[]);
    let (_, body) = relay.get("/stats").unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["io"],
        "uring",
        "this kernel supports io_uring; log:\n{}",
        relay.log_text()
    );
}

#[test]
fn sigint_exits_immediately_and_cleanly() {
    let mut relay = Relay::start("uring", &[]);
    let p = peer();
    let (_c, _relayed) = setup_client(&relay, p.local_addr().unwrap());
    relay.signal(libc::SIGINT);
    let status = relay
        .wait_exit(Duration::from_secs(10))
        .expect("exit on SIGINT");
    assert!(status.success());
}

#[test]
fn toml_config_file_with_cli_override() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("relay.toml");
    let metrics_port = common::free_tcp_port();
    std::fs::write(
        &cfg,
        format!(
            "realm = \"filerealm\"\nusers = [\"user:pass\"]\nio = \"epoll\"\nmetrics = \"127.0.0.1:{metrics_port}\"\n"
        ),
    )
    .unwrap();
    // The harness passes --io uring, overriding the file's epoll.
    let relay = Relay::start("uring", &["--config", cfg.to_str().unwrap()]);
    let (_, body) = relay.get("/stats").unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["io"], "uring");
}

/// With a tiny provided-buffer ring, bursts find it empty (ENOBUFS): the receive is counted,
/// re-armed once buffers come back, and nothing is lost (the datagrams wait in the socket).
#[test]
fn uring_empty_buffer_ring_is_counted_and_rearmed() {
    use peerlink_proto::{Class, Message, MessageBuilder, MessageType, TransactionId};
    let relay = Relay::start("uring", &["--uring-buffers", "2"]);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut request = [0u8; 64];
    let mut got = 0usize;
    const CHUNKS: usize = 20;
    const BURST: usize = 50;
    let mut buf = [0u8; 2048];
    for _ in 0..CHUNKS {
        for _ in 0..BURST {
            let tid = TransactionId::random(&mut rand::rng());
            let b = MessageBuilder::new(&mut request, MessageType::BINDING_REQUEST, tid).unwrap();
            let n = b.finish();
            sock.send_to(&request[..n], relay.listen).unwrap();
        }
        let deadline = Instant::now() + common::STEP;
        let want = got + BURST;
        while got < want && Instant::now() < deadline {
            if let Ok((n, _)) = sock.recv_from(&mut buf) {
                let m = Message::parse(&buf[..n]).expect("a STUN response");
                assert_eq!(m.class(), Class::Success);
                got += 1;
            }
        }
        assert_eq!(got, want, "every Binding answered (re-armed after ENOBUFS)");
    }
    relay.wait_until("ENOBUFS counted", common::STEP, || {
        relay.stat("enobufs") > 0
    });
    assert!(relay.stat("rearms") > 0);
    assert_eq!(relay.stat("kernel_rx_drops"), 0);
}

/// A completion queue far too small for a burst (shrunk to 16 entries with
/// `PEERLINK_RELAY_URING_CQ_ENTRIES`): the kernel keeps the completions that do not fit, the
/// relay counts the overflow, re-arms the receive if the overflow ended it, and loses nothing:
/// every request of the burst is answered (completion queue overflow -> back-pressure,
/// counted).
#[test]
fn uring_completion_queue_overflow_is_counted_and_loses_nothing() {
    use peerlink_proto::{Class, Message, MessageBuilder, MessageType, TransactionId};
    use peerlink_relay::uring::CQ_ENTRIES_ENV;
    const BURST: usize = 150;
    let relay = Relay::start_env("uring", &[], &[(CQ_ENTRIES_ENV, "16")]);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    // The burst waits in the listener's receive buffer while the relay is stopped, then is
    // received all at once: far more completions than the queue holds.
    relay.signal(libc::SIGSTOP);
    let mut pending = std::collections::HashSet::new();
    let mut request = [0u8; 64];
    for _ in 0..BURST {
        let tid = TransactionId::random(&mut rand::rng());
        let n = MessageBuilder::new(&mut request, MessageType::BINDING_REQUEST, tid)
            .unwrap()
            .finish();
        sock.send_to(&request[..n], relay.listen).unwrap();
        pending.insert(tid);
    }
    relay.signal(libc::SIGCONT);
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + common::STEP;
    while !pending.is_empty() && Instant::now() < deadline {
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            let m = Message::parse(&buf[..n]).expect("a STUN response");
            assert_eq!(m.class(), Class::Success);
            pending.remove(&m.transaction_id());
        }
    }
    assert!(
        pending.is_empty(),
        "{} of {BURST} unanswered",
        pending.len()
    );
    relay.wait_until("overflow counted", common::STEP, || {
        relay.stat("cq_overflow") > 0
    });
    assert_eq!(relay.stat("kernel_rx_drops"), 0);
    // Still serving afterwards.
    let mut c = TurnClient::new(relay.listen, "user", "pass");
    c.allocate().expect("allocation after the overflow");
}

#[test]
fn second_relay_on_the_same_port_is_refused() {
    let first = Relay::start("epoll", &[]);
    let listen = first.listen.to_string();
    let (code, err) = run_expect_failure(
        &[
            "--listen",
            &listen,
            "--user",
            "a:b",
            "--io",
            "epoll",
            "--metrics",
            "127.0.0.1:0",
        ],
        &[],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("binding TURN listener"), "{err}");
    // The first one is unaffected.
    assert_eq!(first.get("/readyz").unwrap().0, 200);
}

/// Datagrams the kernel drops on a full listener receive buffer (the relay stopped with
/// SIGSTOP while a flood arrives) are counted via SO_RXQ_OVFL once the relay runs again.
fn kernel_receive_buffer_drops_are_counted(io: &str) {
    use peerlink_proto::{Message, MessageBuilder, MessageType, TransactionId};
    let relay = Relay::start(io, &[]);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    relay.signal(libc::SIGSTOP);
    let junk = [0xFFu8; 32]; // neither STUN nor ChannelData: dropped as not_stun once read
    for _ in 0..60_000 {
        let _ = sock.send_to(&junk, relay.listen);
    }
    relay.signal(libc::SIGCONT);
    // A Binding after the flood is still answered, and its control data carries the count.
    let mut req = [0u8; 64];
    let tid = TransactionId::random(&mut rand::rng());
    let n = MessageBuilder::new(&mut req, MessageType::BINDING_REQUEST, tid)
        .unwrap()
        .finish();
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + common::STEP;
    let mut answered = false;
    while !answered && Instant::now() < deadline {
        sock.send_to(&req[..n], relay.listen).unwrap();
        if let Ok((len, _)) = sock.recv_from(&mut buf) {
            answered = Message::parse(&buf[..len]).is_ok_and(|m| m.transaction_id() == tid);
        }
    }
    assert!(answered, "relay answers after the flood");
    relay.wait_until("kernel drops counted", common::STEP, || {
        relay.stat("kernel_rx_drops") > 0
    });
    assert!(relay.stat("dropped_not_stun") > 0);
}

/// A datagram longer than a receive buffer arrives truncated (MSG_TRUNC): dropped and counted,
/// never parsed (truncated datagram -> drop). Its first `PAYLOAD_CAP` bytes are a
/// complete Binding request, so a relay that parsed what it received would answer it; the same
/// request sent whole and alone is answered.
fn truncated_datagram_is_dropped_and_counted(io: &str) {
    use peerlink_proto::{Message, MessageBuilder, MessageType, TransactionId};
    use peerlink_relay::epoll::PAYLOAD_CAP;
    let relay = Relay::start(io, &[]);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let request = |tid| {
        let mut buf = vec![0u8; PAYLOAD_CAP + 1000];
        let mut b = MessageBuilder::new(&mut buf, MessageType::BINDING_REQUEST, tid).unwrap();
        // A comprehension-optional attribute that fills the message to exactly PAYLOAD_CAP.
        b.add_raw(0x8050, &vec![0x5a; PAYLOAD_CAP - 20 - 4])
            .unwrap();
        assert_eq!(b.finish(), PAYLOAD_CAP);
        buf
    };
    let answered = |tid| {
        let mut buf = [0u8; 2048];
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            if let Ok((len, _)) = sock.recv_from(&mut buf)
                && Message::parse(&buf[..len]).is_ok_and(|m| m.transaction_id() == tid)
            {
                return true;
            }
        }
        false
    };
    // Whole: answered.
    let tid = TransactionId::random(&mut rand::rng());
    sock.send_to(&request(tid)[..PAYLOAD_CAP], relay.listen)
        .unwrap();
    assert!(
        answered(tid),
        "a request of exactly PAYLOAD_CAP bytes is answered"
    );
    let before = relay.stat("dropped_truncated");
    // With 1,000 more bytes behind it: truncated by the receive, dropped, counted.
    let tid = TransactionId::random(&mut rand::rng());
    sock.send_to(&request(tid), relay.listen).unwrap();
    assert!(!answered(tid), "a truncated datagram must not be parsed");
    relay.wait_until("truncation counted", common::STEP, || {
        relay.stat("dropped_truncated") == before + 1
    });
    assert_eq!(relay.stat("allocations_active"), 0);
}

/// `n` consecutive UDP ports free on every one of `ips`, between 20000 and 32000 (below the
/// kernel's ephemeral range, so other tests' `bind(0)` sockets do not land there); random
/// start so that parallel tests rarely collide.
fn free_range_on(ips: &[&str], n: u16) -> std::ops::RangeInclusive<u16> {
    use rand::Rng;
    for _ in 0..200 {
        let lo: u16 = rand::rng().random_range(20_000..32_000 - n);
        let hi = lo + n - 1;
        if ips
            .iter()
            .all(|ip| (lo..=hi).all(|p| UdpSocket::bind((*ip, p)).is_ok()))
        {
            return lo..=hi;
        }
    }
    panic!("no free port range on {ips:?}");
}

/// Allocate until the relay says 508 or `max` allocations are held; the clients and their
/// relayed addresses, and the refusal if there was one.
fn allocate_up_to(relay: &Relay, max: usize) -> (Vec<(TurnClient, SocketAddr)>, Option<u16>) {
    let mut held = Vec::new();
    for i in 0..max {
        let mut c = TurnClient::new(relay.listen, "user", "pass");
        match c.allocate() {
            Ok(relayed) => held.push((c, relayed)),
            Err(code) => {
                assert_eq!(code, 508, "allocation #{i}: {}", relay.log_text());
                return (held, Some(code));
            }
        }
    }
    (held, None)
}

/// Several `--relay-ip` of one family: each IP has the whole port range, allocations take the
/// IPs in turn and data flows on every one; 508 only once every IP's ports are taken, and a
/// freed port is taken again.
fn several_relay_ips_multiply_relayed_addresses(io: &str) {
    let ips = ["127.0.0.5", "127.0.0.6"];
    let ports = free_range_on(&ips, 3);
    let (lo, hi) = (ports.start().to_string(), ports.end().to_string());
    let relay = Relay::start(
        io,
        &[
            "--relay-ip",
            ips[0],
            "--relay-ip",
            ips[1],
            "--min-port",
            &lo,
            "--max-port",
            &hi,
        ],
    );
    let (mut held, refused) = allocate_up_to(&relay, 7);
    assert_eq!(
        refused,
        Some(508),
        "the 7th allocation finds every port taken"
    );
    let mut addrs: Vec<SocketAddr> = held.iter().map(|(_, a)| *a).collect();
    addrs.sort();
    addrs.dedup();
    assert_eq!(addrs.len(), 6, "6 distinct relayed addresses: {addrs:?}");
    for ip in ips {
        let on_ip = addrs.iter().filter(|a| a.ip().to_string() == ip).count();
        assert_eq!(on_ip, 3, "{ip} holds 3 allocations: {addrs:?}");
        assert!(addrs.iter().all(|a| ports.contains(&a.port())), "{addrs:?}");
    }
    // Data flows through an allocation on each relay IP.
    let p = peer();
    let peer_addr = p.local_addr().unwrap();
    for ip in ips {
        let (c, relayed) = held
            .iter_mut()
            .find(|(_, a)| a.ip().to_string() == ip)
            .unwrap();
        c.create_permission(peer_addr).expect("permission");
        c.channel_bind(CHANNEL, peer_addr).expect("channel bind");
        assert_relays(c, &p, *relayed, ip.as_bytes());
    }
    // Free one: its relayed address can be allocated again.
    let (mut first, freed) = held.remove(0);
    first.refresh(0).expect("free");
    let mut again = TurnClient::new(relay.listen, "user", "pass");
    let deadline = Instant::now() + common::STEP;
    let got = loop {
        match again.allocate() {
            Ok(a) => break a,
            Err(508) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("allocation after a free: {e}"),
        }
    };
    assert_eq!(got, freed, "the only free relayed address");
}

/// With RLIMIT_NOFILE at 200: io_uring keeps relayed sockets only in its rings' registered file
/// tables (no fd each), so 600 allocations over 4 workers fit and relay data, and freeing them
/// releases every port; epoll needs an fd per socket and answers 508 once only the reserve of
/// fds is left, which keeps the TURN and HTTP sides serving.
fn relayed_sockets_and_the_fd_limit(io: &str) {
    const NOFILE: u64 = 200;
    const WANT: usize = 600;
    let relay = Relay::start_nofile(
        io,
        &[
            "--workers",
            "4",
            "--relay-ip",
            "127.0.0.7",
            "--relay-ip",
            "127.0.0.8",
            "--min-port",
            "20000",
            "--max-port",
            "31999",
            "--user-quota",
            "1000",
        ],
        NOFILE,
    );
    let (mut held, refused) = allocate_up_to(&relay, WANT);
    let fds = relay.fd_count();
    if io == "uring" {
        assert_eq!(refused, None, "io_uring holds {WANT} with {NOFILE} fds");
        assert_eq!(held.len(), WANT);
        assert!(fds < 100, "relayed sockets hold no fd: {fds} open");
    } else {
        assert_eq!(refused, Some(508), "epoll runs out of fds");
        assert!(
            (100..NOFILE as usize).contains(&held.len()),
            "epoll held {} before the fds ran out",
            held.len()
        );
        // Still serving: a Binding is answered.
        let mut probe = TurnClient::new(relay.listen, "user", "pass");
        assert!(probe.binding().is_some(), "relay answers after EMFILE");
        // The fds relayed sockets leave free keep the HTTP side up.
        assert_eq!(relay.get("/healthz").unwrap().0, 200);
    }
    let n = held.len() as u64;
    relay.wait_until("every relayed socket reported", common::STEP, || {
        relay.stat("relayed_sockets") == n && relay.stat("allocations_active") == n
    });
    for ip in ["127.0.0.7", "127.0.0.8"] {
        assert!(
            held.iter().any(|(_, a)| a.ip().to_string() == ip),
            "no allocation on {ip}"
        );
    }
    // The last allocation (on io_uring: one with no fd) relays both ways.
    let p = peer();
    let peer_addr = p.local_addr().unwrap();
    let (c, relayed) = held.last_mut().unwrap();
    c.create_permission(peer_addr).expect("permission");
    c.channel_bind(CHANNEL, peer_addr).expect("channel bind");
    assert_relays(c, &p, *relayed, b"beyond the fd limit");
    // Free everything: the rings let go of every socket, so every port is free again.
    let addrs: Vec<SocketAddr> = held.iter().map(|(_, a)| *a).collect();
    for (c, _) in &mut held {
        c.refresh(0).expect("free");
    }
    relay.wait_until("all freed", common::STEP, || {
        relay.stat("relayed_sockets") == 0 && relay.stat("allocations_active") == 0
    });
    let deadline = Instant::now() + common::STEP;
    for a in addrs {
        while UdpSocket::bind(a).is_err() {
            assert!(Instant::now() < deadline, "relayed address {a} still bound");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // Load fell: allocations succeed again (the server recovers).
    let (again, refused) = allocate_up_to(&relay, 20);
    assert_eq!((again.len(), refused), (20, None));
}

/// `--busy-poll-us`: after a wake-up with datagrams the worker polls instead of sleeping; a
/// stream of peer datagrams is relayed complete and in order, and some polls find the next
/// datagram (counted as hits); idle again, nothing more is polled.
fn busy_poll_keeps_relaying_and_counts_its_hits(io: &str) {
    const N: usize = 2000;
    let relay = Relay::start(io, &["--workers", "1", "--busy-poll-us", "500"]);
    let p = peer();
    let (c, relayed) = setup_client(&relay, p.local_addr().unwrap());
    // Room for the whole stream in the client's receive buffer (SO_RCVBUFFORCE: root, as the
    // suite runs), so a slow test thread cannot lose datagrams the relay delivered.
    let bytes: libc::c_int = 8 << 20;
    // SAFETY: the fd is open; `bytes` is a live c_int and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&c.sock),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const bytes).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVBUFFORCE: {}", std::io::Error::last_os_error());
    let sender = p.try_clone().unwrap();
    let feeder = std::thread::spawn(move || {
        for i in 0..N as u32 {
            sender.send_to(&i.to_be_bytes(), relayed).unwrap();
            // Paced a little (every 8th datagram waits 20 µs) so polls both hit and miss.
            if i % 8 == 7 {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
    });
    for i in 0..N as u32 {
        let d = c
            .recv(common::STEP)
            .unwrap_or_else(|| panic!("only {i} of {N} relayed"));
        assert_eq!(&d[0..2], &CHANNEL.to_be_bytes());
        assert_eq!(
            u32::from_be_bytes(d[4..8].try_into().unwrap()),
            i,
            "in order"
        );
    }
    feeder.join().unwrap();
    relay.wait_until("polls counted", common::STEP, || {
        relay.stat("busy_polls") > 0 && relay.stat("busy_poll_hits") > 0
    });
    let polls = relay.stat("busy_polls");
    assert!(relay.stat("busy_poll_hits") <= polls);
    // Idle: the worker sleeps again (no datagram, no poll).
    std::thread::sleep(Duration::from_millis(1500));
    let idle = relay.stat("busy_polls");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(relay.stat("busy_polls"), idle, "polling while idle");
    assert_relays(&c, &p, relayed, b"after polling");
}
