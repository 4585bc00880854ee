//! Link conditions: nftables loss, the user-space delay line (delay, jitter, loss, TCP with
//! offloads through it) and the tbf rate limit.
#![allow(clippy::unwrap_used)] // test helpers, not only #[test] fns, unwrap

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::{Echo, blast, lab, recv_payload, warm_up, with_deadline};
use peerlink_netlab::{Lab, LinkConditions, NatKind};

const SINK: &str = "203.0.113.200:5000";

fn any() -> SocketAddr {
    "0.0.0.0:0".parse().unwrap()
}

/// A public sink host and a host behind a router with `conditions`.
fn setup(
    lab: &Lab,
    kind: NatKind,
    conditions: LinkConditions,
) -> (peerlink_netlab::Router, UdpSocket, UdpSocket) {
    let sink_host = lab
        .add_public_host("sink", "203.0.113.200".parse().unwrap())
        .unwrap();
    let sink = sink_host.udp_socket(SINK.parse().unwrap()).unwrap();
    let router = lab.add_nat_with(kind, conditions).unwrap();
    let alice = router.add_host("alice").unwrap();
    let tx = alice.udp_socket(any()).unwrap();
    (router, tx, sink)
}

/// Round-trip times of `n` sequential pings through `sock` to an echo at `to`.
fn rtts(sock: &UdpSocket, to: SocketAddr, n: u32) -> Vec<Duration> {
    (0..n)
        .map(|i| {
            let payload = format!("ping-{i}");
            let sent = Instant::now();
            sock.send_to(payload.as_bytes(), to).unwrap();
            recv_payload(sock, payload.as_bytes(), Duration::from_secs(3))
                .unwrap_or_else(|| panic!("ping {i} lost on a lossless link"));
            sent.elapsed()
        })
        .collect()
}

#[test]
fn nftables_loss_of_30_percent_drops_about_that_share() {
    if !peerlink_netlab::root_or_skip("nftables_loss_of_30_percent_drops_about_that_share") {
        return;
    }
    with_deadline(Duration::from_secs(45), || {
        let lab = lab();
        let cond = LinkConditions {
            loss_percent: 30,
            ..Default::default()
        };
        let (router, tx, sink) = setup(&lab, NatKind::FullCone, cond);
        assert!(
            router.wire_stats().is_none(),
            "loss alone needs no delay line"
        );
        warm_up(&tx, &sink, SINK.parse().unwrap(), Duration::from_secs(5));
        let got = blast(
            &tx,
            &sink,
            SINK.parse().unwrap(),
            1000,
            64,
            Duration::from_millis(500),
        );
        println!("30 % loss configured: {got} of 1000 datagrams arrived");
        assert!(
            (600..=800).contains(&got),
            "{got} of 1000 arrived, expected 600-800"
        );
    });
}

#[test]
fn delay_line_adds_the_configured_delay_and_loses_nothing() {
    if !peerlink_netlab::root_or_skip("delay_line_adds_the_configured_delay_and_loses_nothing") {
        return;
    }
    with_deadline(Duration::from_secs(45), || {
        let lab = lab();
        let cond = LinkConditions {
            delay: Duration::from_millis(20),
            ..Default::default()
        };
        let (router, tx, sink) = setup(&lab, NatKind::PortRestricted, cond);
        let echo = Echo::start(sink.try_clone().unwrap());
        // First ping also resolves ARP across the wire.
        let _ = rtts(&tx, SINK.parse().unwrap(), 1);
        let samples = rtts(&tx, SINK.parse().unwrap(), 15);
        let min = samples.iter().min().unwrap();
        println!(
            "20 ms one-way: RTT min {min:?}, max {:?}",
            samples.iter().max().unwrap()
        );
        assert!(
            *min >= Duration::from_millis(40),
            "RTT {min:?} below 2 x 20 ms"
        );
        drop(echo);

        // Lossless: a paced burst arrives complete.
        let got = blast(
            &tx,
            &sink,
            SINK.parse().unwrap(),
            300,
            200,
            Duration::from_secs(1),
        );
        let stats = router
            .wire_stats()
            .expect("a delayed link has a delay line");
        println!("burst through the delay line: {got}/300, {stats:?}");
        assert_eq!(got, 300, "all datagrams arrive when loss is 0");
        assert_eq!(stats.lost, 0);
        assert!(stats.forwarded >= 300);
    });
}

#[test]
fn delay_line_jitter_spreads_round_trips() {
    if !peerlink_netlab::root_or_skip("delay_line_jitter_spreads_round_trips") {
        return;
    }
    with_deadline(Duration::from_secs(45), || {
        let lab = lab();
        let cond = LinkConditions {
            delay: Duration::from_millis(20),
            jitter: Duration::from_millis(10),
            seed: 7,
            ..Default::default()
        };
        let (_router, tx, sink) = setup(&lab, NatKind::FullCone, cond);
        let _echo = Echo::start(sink.try_clone().unwrap());
        let _ = rtts(&tx, SINK.parse().unwrap(), 1);
        let samples = rtts(&tx, SINK.parse().unwrap(), 30);
        let (min, max) = (samples.iter().min().unwrap(), samples.iter().max().unwrap());
        println!("20 ms ± 10 ms one-way: RTT min {min:?}, max {max:?}");
        // Each direction is 10-30 ms: RTT at least 20 ms, and 30 samples spread out.
        assert!(
            *min >= Duration::from_millis(20),
            "RTT {min:?} below 2 x (20 - 10) ms"
        );
        assert!(
            *max - *min >= Duration::from_millis(5),
            "jitter left RTTs within {:?}",
            *max - *min
        );
    });
}

#[test]
fn delay_line_loss_drops_about_the_configured_share() {
    if !peerlink_netlab::root_or_skip("delay_line_loss_drops_about_the_configured_share") {
        return;
    }
    with_deadline(Duration::from_secs(45), || {
        let lab = lab();
        let cond = LinkConditions {
            delay: Duration::from_millis(2),
            loss_percent: 30,
            seed: 42,
            ..Default::default()
        };
        let (router, tx, sink) = setup(&lab, NatKind::Symmetric, cond);
        warm_up(&tx, &sink, SINK.parse().unwrap(), Duration::from_secs(5));
        let got = blast(
            &tx,
            &sink,
            SINK.parse().unwrap(),
            1000,
            64,
            Duration::from_millis(500),
        );
        let stats = router.wire_stats().unwrap();
        println!("30 % loss in the delay line: {got} of 1000 arrived, {stats:?}");
        assert!(
            (600..=800).contains(&got),
            "{got} of 1000 arrived, expected 600-800"
        );
        assert!(stats.lost > 0);
    });
}

#[test]
fn tcp_crosses_the_delay_line_intact() {
    if !peerlink_netlab::root_or_skip("tcp_crosses_the_delay_line_intact") {
        return;
    }
    with_deadline(Duration::from_secs(60), || {
        let lab = lab();
        let cond = LinkConditions {
            delay: Duration::from_millis(5),
            jitter: Duration::from_millis(1),
            seed: 3,
            ..Default::default()
        };
        let server = lab
            .add_public_host("server", "198.51.100.20".parse().unwrap())
            .unwrap();
        let listener = server
            .tcp_listener("198.51.100.20:8000".parse().unwrap())
            .unwrap();
        let router = lab.add_nat_with(NatKind::PortRestricted, cond).unwrap();
        let alice = router.add_host("alice").unwrap();

        const LEN: usize = 2 << 20;
        let data: Vec<u8> = (0..LEN).map(|i| (i * 31 % 251) as u8).collect();
        let receiver = std::thread::spawn(move || {
            let (mut conn, from) = listener.accept().unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut got = Vec::with_capacity(LEN);
            conn.read_to_end(&mut got).unwrap();
            (got, from)
        });
        let mut conn = alice
            .tcp_connect(
                "198.51.100.20:8000".parse().unwrap(),
                Duration::from_secs(5),
            )
            .unwrap();
        conn.set_write_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        conn.write_all(&data).unwrap();
        drop(conn);
        let (got, from) = receiver.join().unwrap();
        println!(
            "2 MiB over TCP through the delay line from {from}: {:?}",
            router.wire_stats()
        );
        assert_eq!(
            from.ip(),
            std::net::IpAddr::from(router.wan_ip()),
            "TCP is NATed too"
        );
        assert!(
            got == data,
            "stream corrupted or truncated ({} of {LEN} bytes)",
            got.len()
        );
    });
}

#[test]
fn rate_limit_drops_what_exceeds_it() {
    if !peerlink_netlab::root_or_skip("rate_limit_drops_what_exceeds_it") {
        return;
    }
    with_deadline(Duration::from_secs(45), || {
        let lab = lab();
        let cond = LinkConditions {
            rate_bps: Some(100_000),
            ..Default::default()
        };
        let (_router, tx, sink) = setup(&lab, NatKind::FullCone, cond);
        warm_up(&tx, &sink, SINK.parse().unwrap(), Duration::from_secs(5));
        // 300 KB at tens of Mbit/s into a 100 kbit/s link with a 50 ms queue.
        let got = blast(
            &tx,
            &sink,
            SINK.parse().unwrap(),
            300,
            1000,
            Duration::from_millis(700),
        );
        println!("rate 100 kbit/s: {got} of 300 x 1000-byte datagrams arrived");
        assert!(got > 0, "some traffic must pass the rate limit");
        assert!(
            got < 150,
            "{got} of 300 arrived: the rate limit did not drop the excess"
        );
    });
}

/// Whether a TCP connection from `host` to `to` opens within a short bound.
fn tcp_opens(host: &peerlink_netlab::Host, to: SocketAddr) -> bool {
    host.tcp_connect(to, Duration::from_millis(700)).is_ok()
}

#[test]
fn egress_rules_block_udp_or_all_but_the_allowed_tcp_ports() {
    use peerlink_netlab::Egress;
    if !peerlink_netlab::root_or_skip("egress_rules_block_udp_or_all_but_the_allowed_tcp_ports") {
        return;
    }
    with_deadline(Duration::from_secs(45), || {
        let lab = lab();
        let server = lab
            .add_public_host("srv", "203.0.113.200".parse().unwrap())
            .unwrap();
        let sink = server.udp_socket(SINK.parse().unwrap()).unwrap();
        sink.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let l443 = server
            .tcp_listener("203.0.113.200:443".parse().unwrap())
            .unwrap();
        let l3478 = server
            .tcp_listener("203.0.113.200:3478".parse().unwrap())
            .unwrap();
        let (p443, p3478): (SocketAddr, SocketAddr) = (
            "203.0.113.200:443".parse().unwrap(),
            "203.0.113.200:3478".parse().unwrap(),
        );
        let udp_arrives = |host: &peerlink_netlab::Host| {
            let tx = host.udp_socket(any()).unwrap();
            for _ in 0..5 {
                tx.send_to(b"probe", SINK.parse::<SocketAddr>().unwrap())
                    .unwrap();
            }
            let mut buf = [0u8; 16];
            sink.recv_from(&mut buf).is_ok()
        };
        for (egress, udp, tcp3478, tcp443) in [
            (Egress::Open, true, true, true),
            (Egress::NoUdp, false, true, true),
            (Egress::TcpPorts(&[443]), false, false, true),
        ] {
            let router = lab
                .add_nat_with(
                    NatKind::PortRestricted,
                    LinkConditions {
                        egress,
                        ..Default::default()
                    },
                )
                .unwrap();
            let host = router
                .add_host(&format!("h{}", router.wan_ip().octets()[3]))
                .unwrap();
            assert_eq!(udp_arrives(&host), udp, "{egress:?}: UDP");
            assert_eq!(tcp_opens(&host, p3478), tcp3478, "{egress:?}: TCP 3478");
            assert_eq!(tcp_opens(&host, p443), tcp443, "{egress:?}: TCP 443");
            // Nothing dropped is counted as forwarded.
            let (_, out) = router.udp_forwarded().unwrap();
            assert_eq!(out > 0, udp, "{egress:?}: UDP counter {out}");
            while sink.recv_from(&mut [0u8; 16]).is_ok() {}
        }
        drop((l443, l3478));
    });
}
