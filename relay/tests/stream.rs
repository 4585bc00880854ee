//! TURN over TCP and TLS on the running `peerlink-relay` binary, on both backends: allocate
//! over each, relay to a UDP peer and back (Send/Data indications and ChannelData, the
//! stream padding included), the allocation freed when the connection closes, bad input and
//! timeouts closing only the offending connection, the connection limit, the certificate
//! reload on SIGHUP, and the configuration errors that stop the relay before it binds.
//! Loopback only; every wait is bounded.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::stream_client::{StreamClient, tcp_connect, tls_connect, write_cert};
use common::{Relay, STEP, free_tcp_port, peer, recv_from};

const CHANNEL: u16 = 0x4001;

/// A relay with a TCP and a TLS listener (and `extra` flags); the certificate's directory
/// stays alive with the returned guard.
struct StreamRelay {
    relay: Relay,
    tcp: SocketAddr,
    tls: SocketAddr,
    dir: tempfile::TempDir,
    cert_der: Vec<u8>,
}

fn start(io: &str, extra: &[&str]) -> StreamRelay {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, cert_der) = write_cert(dir.path());
    let tcp: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
    let tls: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
    let (tcp_s, tls_s) = (tcp.to_string(), tls.to_string());
    let mut args = vec![
        "--listen-tcp",
        &tcp_s,
        "--listen-tls",
        &tls_s,
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--log",
        "peerlink_relay=debug,info",
    ];
    args.extend_from_slice(extra);
    let relay = Relay::start(io, &args);
    StreamRelay {
        relay,
        tcp,
        tls,
        dir,
        cert_der,
    }
}

fn connect(r: &StreamRelay, tls: bool) -> StreamClient {
    let io = if tls {
        tls_connect(r.tls).0
    } else {
        tcp_connect(r.tcp)
    };
    StreamClient::new(io, "user", "pass")
}

/// A Prometheus sample by its exact name and labels (`name{labels}` or `name`).
fn metric(r: &Relay, sample: &str) -> u64 {
    let (_, body) = r.get("/metrics").unwrap();
    body.lines()
        .find_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            (k == sample).then(|| v.parse::<f64>().ok())?
        })
        .map(|v| v as u64)
        .unwrap_or_else(|| panic!("no sample {sample} in\n{body}"))
}

/// Wait until `sample` reaches `want` (the metrics lag the workers by up to a second).
fn wait_metric(r: &Relay, sample: &str, want: u64) {
    r.wait_until(&format!("{sample} == {want}"), STEP, || {
        metric(r, sample) == want
    });
}

macro_rules! both {
    ($($name:ident),* $(,)?) => {
        mod uring { $(#[test] fn $name() { super::$name("uring"); })* }
        mod epoll { $(#[test] fn $name() { super::$name("epoll"); })* }
    };
}

both!(
    allocate_and_relay_over_tcp_and_tls,
    closing_the_connection_frees_the_allocation,
    bad_input_closes_only_that_connection,
    silent_and_stalled_connections_time_out,
    connection_limit_refuses_the_excess,
    sighup_reloads_the_certificate_for_new_handshakes,
    stream_and_udp_clients_short_circuit,
    a_client_that_stops_reading_is_disconnected,
);

/// Send indication out and Data indication back; then ChannelData both ways, with payload
/// lengths that need padding, two frames back to back from the relay.
fn relay_round_trip(r: &StreamRelay, tls: bool) -> StreamClient {
    let p = peer();
    let peer_addr = p.local_addr().unwrap();
    let mut c = connect(r, tls);
    let relayed = c.allocate().unwrap_or_else(|e| {
        panic!(
            "allocate over {}: {e}\n{}",
            if tls { "TLS" } else { "TCP" },
            r.relay.log_text()
        )
    });
    c.create_permission(peer_addr).unwrap();
    c.send_indication(peer_addr, b"send-indication");
    let (got, from) = recv_from(&p, STEP).expect("Send indication relayed to the peer");
    assert_eq!((got.as_slice(), from), (&b"send-indication"[..], relayed));
    p.send_to(b"data-back", relayed).unwrap();
    let (from, data) = c.recv_data(STEP).expect("Data indication over the stream");
    assert_eq!((from, data.as_slice()), (peer_addr, &b"data-back"[..]));

    c.channel_bind(CHANNEL, peer_addr).unwrap();
    for payload in [&b"a"[..], b"abcde", b"abcdefgh"] {
        c.send_channel(CHANNEL, payload);
        let (got, from) = recv_from(&p, STEP).expect("ChannelData relayed to the peer");
        assert_eq!((got.as_slice(), from), (payload, relayed));
    }
    // Two datagrams of odd lengths: their ChannelData frames arrive padded, back to back.
    p.send_to(b"xyz", relayed).unwrap();
    p.send_to(b"12345", relayed).unwrap();
    assert_eq!(c.recv_channel(STEP), Some((CHANNEL, b"xyz".to_vec())));
    assert_eq!(c.recv_channel(STEP), Some((CHANNEL, b"12345".to_vec())));
    assert!(c.binding_ok());
    c
}

fn allocate_and_relay_over_tcp_and_tls(io: &str) {
    let r = start(io, &[]);
    // Both clients stay connected (an allocation lives with its connection).
    let _tcp = relay_round_trip(&r, false);
    let _tls = relay_round_trip(&r, true);
    wait_metric(
        &r.relay,
        "peerlink_relay_allocations_active_by_transport{transport=\"tcp\"}",
        1,
    );
    wait_metric(
        &r.relay,
        "peerlink_relay_allocations_active_by_transport{transport=\"tls\"}",
        1,
    );
    wait_metric(
        &r.relay,
        "peerlink_relay_allocations_active_by_transport{transport=\"udp\"}",
        0,
    );
    assert!(
        metric(
            &r.relay,
            "peerlink_relay_client_received_packets_total{transport=\"tcp\"}"
        ) >= 8
    );
    assert!(
        metric(
            &r.relay,
            "peerlink_relay_client_sent_packets_total{transport=\"tls\"}"
        ) >= 8
    );
    assert!(metric(&r.relay, "peerlink_relay_tls_handshakes_total") >= 1);
}

fn closing_the_connection_frees_the_allocation(io: &str) {
    let r = start(io, &[]);
    for tls in [false, true] {
        let mut c = connect(&r, tls);
        c.allocate().unwrap();
        r.relay.wait_until("one allocation", STEP, || {
            r.relay.stat("allocations_active") == 1
        });
        drop(c);
        r.relay
            .wait_until("allocation freed with its connection", STEP, || {
                r.relay.stat("allocations_active") == 0
            });
    }
    wait_metric(&r.relay, "peerlink_relay_allocations_closed_total", 2);
    wait_metric(
        &r.relay,
        "peerlink_relay_stream_connections_closed_total{transport=\"tcp\",reason=\"peer_closed\"}",
        1,
    );
    wait_metric(
        &r.relay,
        "peerlink_relay_stream_connections{transport=\"tls\"}",
        0,
    );
    assert_eq!(r.relay.stat("relayed_sockets"), 0);
}

fn bad_input_closes_only_that_connection(io: &str) {
    let r = start(io, &[]);
    // A working client on each transport, with allocations, throughout.
    let p = peer();
    let peer_addr = p.local_addr().unwrap();
    let mut good_tcp = connect(&r, false);
    let mut good_tls = connect(&r, true);
    let relayed_tcp = good_tcp.allocate().unwrap();
    let relayed_tls = good_tls.allocate().unwrap();
    good_tcp.create_permission(peer_addr).unwrap();
    good_tls.create_permission(peer_addr).unwrap();

    let cases: [(&str, bool, Vec<u8>); 5] = [
        ("garbage over TCP", false, vec![0xFF; 64]),
        ("garbage over TLS", true, b"GET / HTTP/1.1\r\n\r\n".to_vec()),
        (
            "oversized ChannelData length",
            false,
            vec![0x40, 0x01, 0xFF, 0xFF, 1, 2, 3, 4],
        ),
        ("STUN length not a multiple of 4", true, {
            let mut m = vec![0, 1, 0, 6, 0x21, 0x12, 0xA4, 0x42];
            m.extend_from_slice(&[0; 18]);
            m
        }),
        (
            "STUN without the magic cookie",
            false,
            vec![0, 1, 0, 0, 1, 2, 3, 4, 0, 0, 0, 0],
        ),
    ];
    for (what, tls, bytes) in cases {
        let mut bad = connect(&r, tls);
        bad.write_raw(&bytes).unwrap();
        assert!(
            bad.closed_within(STEP),
            "{what}: connection not closed\n{}",
            r.relay.log_text()
        );
    }
    // Not even a TLS ClientHello: raw bytes on the TLS port are a TLS error.
    let mut raw = TcpStream::connect(r.tls).unwrap();
    raw.write_all(&[0x16, 0x03, 0x01, 0xFF, 0xFF, 0, 0, 0])
        .unwrap();
    let mut bad = StreamClient::new(common::stream_client::Transport::Tcp(raw), "user", "pass");
    assert!(bad.closed_within(STEP), "bad TLS record not closed");

    wait_metric(
        &r.relay,
        "peerlink_relay_stream_connections_closed_total{transport=\"tcp\",reason=\"bad_frame\"}",
        3,
    );
    // Plaintext "GET ..." inside TLS frames as a ChannelData longer than the cap.
    wait_metric(
        &r.relay,
        "peerlink_relay_stream_connections_closed_total{transport=\"tls\",reason=\"bad_frame\"}",
        2,
    );
    wait_metric(
        &r.relay,
        "peerlink_relay_stream_connections_closed_total{transport=\"tls\",reason=\"tls_error\"}",
        1,
    );
    // The good clients did not notice.
    for (c, relayed) in [(&mut good_tcp, relayed_tcp), (&mut good_tls, relayed_tls)] {
        c.send_indication(peer_addr, b"still-here");
        let (got, from) = recv_from(&p, STEP).expect("good client still relays");
        assert_eq!((got.as_slice(), from), (&b"still-here"[..], relayed));
        assert!(c.binding_ok());
    }
    r.relay
        .wait_until("both allocations still counted", STEP, || {
            r.relay.stat("allocations_active") == 2
        });
    let log = r.relay.log_text();
    assert!(log.contains("stream connection closed"), "{log}");
}

fn silent_and_stalled_connections_time_out(io: &str) {
    let r = start(
        io,
        &[
            "--stream-handshake-timeout",
            "1",
            "--stream-stall-timeout",
            "1",
            "--stream-idle-timeout",
            "2",
        ],
    );
    let mut good = connect(&r, true);
    good.allocate().unwrap();
    // A TLS client that never sends its ClientHello: closed by the handshake timeout.
    let silent_tls = TcpStream::connect(r.tls).unwrap();
    let mut silent_tls = StreamClient::new(
        common::stream_client::Transport::Tcp(silent_tls),
        "user",
        "pass",
    );
    // A TCP client that stops in the middle of a STUN header.
    let mut stalled = connect(&r, false);
    stalled.write_raw(&[0, 1, 0, 8, 0x21, 0x12]).unwrap();
    // A TCP client that sends nothing at all: closed by the idle timeout.
    let mut idle = connect(&r, false);
    assert!(
        silent_tls.closed_within(STEP),
        "silent TLS handshake not closed"
    );
    assert!(stalled.closed_within(STEP), "stalled frame not closed");
    assert!(idle.closed_within(STEP), "idle connection not closed");
    wait_metric(
        &r.relay,
        "peerlink_relay_stream_connections_closed_total{transport=\"tls\",reason=\"handshake_timeout\"}",
        1,
    );
    wait_metric(
        &r.relay,
        "peerlink_relay_stream_connections_closed_total{transport=\"tcp\",reason=\"stalled_mid_frame\"}",
        1,
    );
    wait_metric(
        &r.relay,
        "peerlink_relay_stream_connections_closed_total{transport=\"tcp\",reason=\"idle_timeout\"}",
        1,
    );
    // The client with an allocation stays, well past the idle timeout.
    std::thread::sleep(Duration::from_millis(2500));
    assert!(good.binding_ok(), "connection with an allocation closed");
    r.relay
        .wait_until("the allocation still counted", STEP, || {
            r.relay.stat("allocations_active") == 1
        });
}

fn connection_limit_refuses_the_excess(io: &str) {
    let r = start(io, &["--max-stream-connections", "2"]);
    let mut a = connect(&r, false);
    let mut b = connect(&r, true);
    assert!(a.binding_ok() && b.binding_ok());
    let mut c = connect(&r, false);
    assert!(
        c.closed_within(STEP),
        "third connection accepted over the limit of 2"
    );
    wait_metric(
        &r.relay,
        "peerlink_relay_stream_connections_refused_total{transport=\"tcp\"}",
        1,
    );
    drop(a);
    r.relay.wait_until("a slot is free again", STEP, || {
        let mut d = connect(&r, false);
        d.binding_ok()
    });
    assert!(b.binding_ok());
}

fn sighup_reloads_the_certificate_for_new_handshakes(io: &str) {
    let r = start(io, &[]);
    let (io1, first) = tls_connect(r.tls);
    assert_eq!(first, r.cert_der);
    let mut old = StreamClient::new(io1, "user", "pass");
    old.allocate().unwrap();
    let (_, _, new_der) = write_cert(r.dir.path());
    assert_ne!(new_der, r.cert_der);
    r.relay.signal(libc::SIGHUP);
    r.relay.wait_until("reload logged", STEP, || {
        r.relay.log_text().contains("TLS certificate reloaded")
    });
    let (io2, second) = tls_connect(r.tls);
    assert_eq!(
        second, new_der,
        "a new handshake presents the new certificate"
    );
    let mut fresh = StreamClient::new(io2, "user", "pass");
    assert!(fresh.binding_ok());
    // The connection made before the reload is served as before, allocation and all.
    assert!(old.binding_ok());
    r.relay
        .wait_until("the old allocation still counted", STEP, || {
            r.relay.stat("allocations_active") == 1
        });
    // A broken file on reload keeps the current certificate.
    std::fs::write(r.dir.path().join("cert.pem"), "garbage").unwrap();
    r.relay.signal(libc::SIGHUP);
    r.relay.wait_until("failed reload logged", STEP, || {
        r.relay.log_text().contains("TLS reload failed")
    });
    let (_, third) = tls_connect(r.tls);
    assert_eq!(third, new_der);
}

/// A TCP client and a UDP client of one relay reach each other through their allocations
/// (with one worker, so the short-circuit inside the process is taken).
fn stream_and_udp_clients_short_circuit(io: &str) {
    let r = start(io, &["--workers", "1"]);
    let mut s = connect(&r, false);
    let rs = s.allocate().unwrap();
    let mut u = common::TurnClient::new(r.relay.listen, "user", "pass");
    let ru = u.allocate().unwrap();
    s.create_permission(ru).unwrap();
    u.create_permission(rs).unwrap();
    u.channel_bind(CHANNEL, rs).unwrap();
    s.channel_bind(0x4002, ru).unwrap();
    u.send_channel(CHANNEL, b"udp->tcp");
    assert_eq!(s.recv_channel(STEP), Some((0x4002, b"udp->tcp".to_vec())));
    s.send_channel(0x4002, b"tcp->udp!");
    let back = u
        .recv(STEP)
        .expect("stream client's data reaches the UDP client");
    assert_eq!(&back[..2], &CHANNEL.to_be_bytes());
    assert_eq!(&back[4..13], b"tcp->udp!");
    r.relay.wait_until("short-circuited", STEP, || {
        r.relay.stat("forwarded_packets_client_to_client") >= 2
    });
}

#[test]
fn tls_listener_without_certificate_or_with_unreadable_pem_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.pem");
    std::fs::write(&bad, "not a certificate").unwrap();
    let missing = dir.path().join("missing.pem");
    let port = free_tcp_port().to_string();
    let tls = format!("127.0.0.1:{port}");
    let cases: [(Vec<&str>, &str); 3] = [
        (
            vec!["--listen-tls", &tls],
            "needs both --tls-cert and --tls-key",
        ),
        (
            vec![
                "--listen-tls",
                &tls,
                "--tls-cert",
                bad.to_str().unwrap(),
                "--tls-key",
                bad.to_str().unwrap(),
            ],
            "bad.pem",
        ),
        (
            vec![
                "--listen-tls",
                &tls,
                "--tls-cert",
                missing.to_str().unwrap(),
                "--tls-key",
                bad.to_str().unwrap(),
            ],
            "missing.pem",
        ),
    ];
    for (args, want) in cases {
        let out = Command::new(common::bin())
            .args(["--listen", "127.0.0.1:3478", "--user", "u:p"])
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        // Nothing was bound: the port is still free.
        assert!(std::net::TcpListener::bind(&tls).is_ok());
    }
}

/// A TCP client that never reads while its peer floods it: once the kernel's buffers and the
/// relay's send buffer are full, the relay closes that connection (never blocking the worker)
/// and frees its allocation; another client is served throughout.
fn a_client_that_stops_reading_is_disconnected(io: &str) {
    let r = start(io, &[]);
    let p = peer();
    let peer_addr = p.local_addr().unwrap();
    // A small receive window, set before connecting, so the kernel holds little for it.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect_timeout(&r.tcp.into(), STEP).unwrap();
    let tcp: TcpStream = sock.into();
    tcp.set_read_timeout(Some(STEP)).unwrap();
    let mut sleeper = StreamClient::new(common::stream_client::Transport::Tcp(tcp), "user", "pass");
    let relayed = sleeper.allocate().unwrap();
    sleeper.create_permission(peer_addr).unwrap();
    sleeper.channel_bind(CHANNEL, peer_addr).unwrap();
    let mut other = connect(&r, true);
    other.allocate().unwrap();
    let payload = vec![0x5A; 3000];
    let sample = "peerlink_relay_stream_connections_closed_total{transport=\"tcp\",reason=\"send_buffer_full\"}";
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut sent = 0u64;
    // At most 40,000 datagrams (120 MB), paced in bursts, until the relay gives up on it.
    while sent < 40_000 && std::time::Instant::now() < deadline {
        for _ in 0..200 {
            let _ = p.send_to(&payload, relayed);
            sent += 1;
        }
        std::thread::sleep(Duration::from_millis(2));
        if sent.is_multiple_of(2000) && metric(&r.relay, sample) >= 1 {
            break;
        }
    }
    wait_metric(&r.relay, sample, 1);
    r.relay
        .wait_until("the sleeper's allocation freed", STEP, || {
            r.relay.stat("allocations_active") == 1
        });
    assert!(other.binding_ok(), "the other client is still served");
    // RSS stays bounded: the relay did not buffer the flood.
    assert!(
        r.relay.rss_kib() < 200 * 1024,
        "RSS {} KiB",
        r.relay.rss_kib()
    );
}
