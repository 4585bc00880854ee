//! Interop with coturn's own clients (Debian package `coturn`): `turnutils_uclient` in
//! ChannelData, send-indication and client-to-client modes, against `turnutils_peer`, with a
//! static user and with a TURN REST secret, over UDP, TCP (`-t`) and TLS (`-t -S`);
//! `turnutils_stunclient` for Binding. Every scenario runs on both backends. Each run is small (`-n 50 -m 5 -l 170`) and bounded by a timeout.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{KillOnDrop, Relay, free_udp_port, wait_child};

const MESSAGES: u64 = 50;
const CLIENTS: u64 = 5;
const LEN: u64 = 170;

/// What uclient reported.
#[derive(Debug, Default)]
struct Outcome {
    sent: Option<u64>,
    received: Option<u64>,
    lost: Option<u64>,
    errors: Vec<String>,
    /// TLS handshakes the relay refused (TLS 1.0/1.1 attempts; see `parse_uclient`).
    tls_refusals: u64,
}

fn parse_uclient(out: &str) -> Outcome {
    let mut o = Outcome::default();
    let num_after = |line: &str, key: &str| -> Option<u64> {
        let rest = &line[line.find(key)? + key.len()..];
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        digits.parse().ok()
    };
    // uclient opens a "probe" socket, allocates on it, closes it without deallocating, then
    // allocates on a new socket. When the kernel hands the new socket the probe's port (seen in
    // a packet capture of a failed CI run: Allocate + Refresh from port P, then a fresh Allocate
    // from P), the 5-tuple still has the probe's allocation and any TURN server answers 437
    // (RFC 8656 7.2); uclient logs "error 437", then "trying allocate again", reopens the socket
    // and carries on. That recovery is uclient's own design, not a fault of the server.
    let recovered_437 = out.contains("trying allocate again 437");
    // With -S, uclient opens each connection with a TLS method picked from several, TLS 1.0
    // and 1.1 among them; the relay (rustls) refuses those versions, and uclient reconnects
    // with another method until one connects. Those refusals are expected, not failures.
    let tls_retried = out.contains("tls_connect: client session connected");
    for line in out.lines() {
        if recovered_437 && line.contains("error 437 (Allocation Mismatch)") {
            continue;
        }
        if tls_retried
            && (line.contains("tls_connect: cannot connect")
                || line.contains("alert handshake failure")
                || line.contains("alert protocol version"))
        {
            if line.contains("tls_connect: cannot connect") {
                o.tls_refusals += 1;
            }
            continue;
        }
        // Final totals line: "start_mclient: tot_send_msgs=250, tot_recv_msgs=250"
        if line.contains("tot_send_msgs=") && !line.contains("msz=") {
            o.sent = num_after(line, "tot_send_msgs=");
            o.received = num_after(line, "tot_recv_msgs=");
        }
        if line.contains("Total lost packets") {
            o.lost = num_after(line, "Total lost packets ");
        }
        if line.contains("error") || line.contains("Cannot") || line.contains("cannot") {
            o.errors.push(line.to_string());
        }
    }
    o
}

#[derive(Clone, Copy)]
enum Auth {
    User,
    Rest,
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// ChannelData towards turnutils_peer.
    Channel,
    /// Send/Data indications towards turnutils_peer (`-s`).
    Send,
    /// Client to client through two allocations (`-y`), ChannelData.
    C2c,
    /// Client to client with Send/Data indications (`-y -s`).
    C2cSend,
}

/// How uclient reaches the relay.
#[derive(Clone, Copy, PartialEq)]
enum Via {
    Udp,
    /// `-t`, to the relay's `--listen-tcp`.
    Tcp,
    /// `-t -S`, to the relay's `--listen-tls`.
    Tls,
}

fn run_uclient(io: &str, mode: Mode, auth: Auth) {
    run_uclient_on(io, mode, auth, false, Via::Udp);
}

fn run_uclient_via(io: &str, mode: Mode, auth: Auth, via: Via) {
    run_uclient_on(io, mode, auth, false, via);
}

fn run_uclient_on(io: &str, mode: Mode, auth: Auth, ipv6: bool, via: Via) {
    // coturn's uclient picks channel numbers in RFC 5766's 0x4000-0x7FFF.
    let certs = tempfile::tempdir().unwrap();
    let (cert, key, _) = common::stream_client::write_cert(certs.path());
    let stream_port = common::free_tcp_port();
    let stream_addr = format!("127.0.0.1:{stream_port}");
    let mut extra = vec!["--legacy-channel-range"];
    match via {
        Via::Udp => {}
        Via::Tcp => extra.extend(["--listen-tcp", &stream_addr]),
        Via::Tls => extra.extend([
            "--listen-tls",
            &stream_addr,
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ]),
    }
    let relay = if ipv6 {
        Relay::start_v6(io, &extra)
    } else {
        Relay::start(io, &extra)
    };
    let host = relay.listen.ip().to_string();
    let server_port = match via {
        Via::Udp => relay.listen.port(),
        Via::Tcp | Via::Tls => stream_port,
    };
    let peer_port = free_udp_port();
    let _peer = if matches!(mode, Mode::Channel | Mode::Send) {
        let child = Command::new("turnutils_peer")
            .args(["-L", &host, "-p", &peer_port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("turnutils_peer (Debian package coturn) must be installed");
        // The peer binds at once; give it a moment without relying on it for correctness (a
        // missing peer would show up as lost packets, failing the test loudly).
        std::thread::sleep(Duration::from_millis(200));
        Some(KillOnDrop(child))
    } else {
        None
    };
    let mut args: Vec<String> = vec![
        // Without -c every client allocates an RTP/RTCP pair: EVEN-PORT with the R bit, then
        // RESERVATION-TOKEN for the odd port.
        "-n".into(),
        MESSAGES.to_string(),
        "-m".into(),
        CLIENTS.to_string(),
        "-l".into(),
        LEN.to_string(),
        "-e".into(),
        host.clone(),
        "-r".into(),
        peer_port.to_string(),
        "-p".into(),
        server_port.to_string(),
        "-z".into(),
        "5".into(),
    ];
    match mode {
        Mode::Channel => {}
        Mode::Send => args.push("-s".into()),
        Mode::C2c => args.push("-y".into()),
        Mode::C2cSend => {
            args.push("-y".into());
            args.push("-s".into());
        }
    }
    match auth {
        Auth::User => args.extend(["-u", "user", "-w", "pass"].map(String::from)),
        Auth::Rest => args.extend(["-u", "alice", "-W", "secret"].map(String::from)),
    }
    if ipv6 {
        args.push("-x".into()); // ask for an IPv6 relayed address
    }
    match via {
        Via::Udp => {}
        Via::Tcp => args.push("-t".into()),
        Via::Tls => args.extend(["-t", "-S"].map(String::from)),
    }
    args.push(host.clone());
    let out_path = tempfile::NamedTempFile::new().unwrap();
    // One open file description for both streams (a clone shares the offset), so stdout and
    // stderr lines append instead of overwriting each other.
    let out_file = out_path.reopen().unwrap();
    let child = Command::new("turnutils_uclient")
        .args(&args)
        .stdout(out_file.try_clone().unwrap())
        .stderr(out_file)
        .spawn()
        .expect("turnutils_uclient (Debian package coturn) must be installed");
    let mut child = KillOnDrop(child);
    let status = wait_child(&mut child.0, Duration::from_secs(90));
    let out = std::fs::read_to_string(out_path.path()).unwrap();
    assert!(
        status.is_some(),
        "uclient did not finish in time:\n{out}\nrelay:\n{}",
        relay.log_text()
    );
    let o = parse_uclient(&out);
    // In client-to-client mode uclient pairs clients up, rounding an odd -m up to even.
    let clients = if matches!(mode, Mode::C2c | Mode::C2cSend) {
        CLIENTS.div_ceil(2) * 2
    } else {
        CLIENTS
    };
    assert!(o.errors.is_empty(), "uclient errors: {:?}\n{out}", o.errors);
    // Every client sends MESSAGES on its RTP allocation and some RTCP on the reserved one.
    let expected = MESSAGES * clients;
    let sent = o.sent.unwrap_or_else(|| panic!("no sent count\n{out}"));
    assert!(sent >= expected, "sent {sent} < {expected}\n{out}");
    assert_eq!(o.received, Some(sent), "received count\n{out}");
    assert_eq!(o.lost, Some(0), "lost packets\n{out}");
    // uclient's RTCP allocations took the ports its RTP allocations reserved with EVEN-PORT
    // (R bit); an unusable token would have shown up as a uclient error above. The workers
    // report their counters once a second.
    relay.wait_until("reservations counted", Duration::from_secs(5), || {
        relay.stat("reservations_claimed") >= 1
    });
    assert!(relay.stat("ports_reserved") >= relay.stat("reservations_claimed"));
    // The relay's own counters saw the traffic: every message crossed it once from a client,
    // to a peer or (short-circuited, as ChannelData or as a Data indication built from a Send
    // indication) to another client of the same worker.
    relay.wait_until("relay counters", Duration::from_secs(5), || {
        relay.stat("forwarded_packets_client_to_peer")
            + relay.stat("forwarded_packets_client_to_client")
            >= expected
    });
    assert_eq!(relay.stat("send_errors"), 0);
    // Over TCP/TLS every client connected as a stream (and no datagram came from uclient's
    // clients on the UDP listener besides none at all).
    match via {
        Via::Udp => {}
        Via::Tcp => assert!(relay.stat("stream_accepted_tcp") >= clients, "{out}"),
        Via::Tls => {
            assert!(relay.stat("stream_accepted_tls") >= clients, "{out}");
            assert!(relay.stat("tls_handshakes") >= clients, "{out}");
            // The refusals uclient logged were TLS-error closes on the relay's side (uclient
            // logs some refusals more than once, so the counts are not compared exactly).
            if o.tls_refusals > 0 {
                relay.wait_until("refused handshakes counted", Duration::from_secs(5), || {
                    relay.stat("stream_closed_tls_tls_error") >= 1
                });
            }
        }
    }
    if via != Via::Udp {
        assert_eq!(relay.stat("client_received_packets_udp"), 0, "{out}");
    }
}

macro_rules! interop {
    ($($name:ident: $mode:expr, $auth:expr;)*) => {
        mod uring {
            use super::*;
            $(#[test] fn $name() { run_uclient("uring", $mode, $auth); })*
        }
        mod epoll {
            use super::*;
            $(#[test] fn $name() { run_uclient("epoll", $mode, $auth); })*
        }
    };
}

interop! {
    channel_data_static_user: Mode::Channel, Auth::User;
    channel_data_rest_secret: Mode::Channel, Auth::Rest;
    send_indication_static_user: Mode::Send, Auth::User;
    send_indication_rest_secret: Mode::Send, Auth::Rest;
    client_to_client_static_user: Mode::C2c, Auth::User;
    client_to_client_rest_secret: Mode::C2c, Auth::Rest;
    client_to_client_send_static_user: Mode::C2cSend, Auth::User;
    client_to_client_send_rest_secret: Mode::C2cSend, Auth::Rest;
}

macro_rules! interop_stream {
    ($($name:ident: $mode:expr, $auth:expr, $via:expr;)*) => {
        mod stream_uring {
            use super::*;
            $(#[test] fn $name() { run_uclient_via("uring", $mode, $auth, $via); })*
        }
        mod stream_epoll {
            use super::*;
            $(#[test] fn $name() { run_uclient_via("epoll", $mode, $auth, $via); })*
        }
    };
}

// uclient over TCP (`-t`) and TLS (`-t -S`); its peers and relayed traffic stay UDP.
interop_stream! {
    tcp_channel_data_static_user: Mode::Channel, Auth::User, Via::Tcp;
    tcp_channel_data_rest_secret: Mode::Channel, Auth::Rest, Via::Tcp;
    tcp_send_indication_static_user: Mode::Send, Auth::User, Via::Tcp;
    tcp_send_indication_rest_secret: Mode::Send, Auth::Rest, Via::Tcp;
    tcp_client_to_client_static_user: Mode::C2c, Auth::User, Via::Tcp;
    tcp_client_to_client_send_rest_secret: Mode::C2cSend, Auth::Rest, Via::Tcp;
    tls_channel_data_static_user: Mode::Channel, Auth::User, Via::Tls;
    tls_channel_data_rest_secret: Mode::Channel, Auth::Rest, Via::Tls;
    tls_send_indication_static_user: Mode::Send, Auth::User, Via::Tls;
    tls_send_indication_rest_secret: Mode::Send, Auth::Rest, Via::Tls;
    tls_client_to_client_static_user: Mode::C2c, Auth::User, Via::Tls;
    tls_client_to_client_send_rest_secret: Mode::C2cSend, Auth::Rest, Via::Tls;
}

fn run_stunclient(io: &str) {
    let relay = Relay::start(io, &[]);
    // Bind the client on a loopback address other than 127.0.0.1, so that a correct mapping
    // (the address the relay saw) is distinguishable from a default.
    let local_ip = "127.0.0.5";
    let out = Command::new("timeout")
        .args(["20", "turnutils_stunclient", "-L", local_ip, "-p"])
        .arg(relay.listen.port().to_string())
        .arg("127.0.0.1")
        .output()
        .expect("turnutils_stunclient must be installed");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "stunclient failed:\n{text}\nrelay:\n{}",
        relay.log_text()
    );
    // stunclient prints "IPv4. UDP reflexive addr: 127.0.0.5:41234". It does not print its own
    // port, so the exact address is checked by `binding_maps_exact_client_address` in
    // lifecycle.rs with our own client; here the IP must be the one the client bound.
    let reflexive = text
        .lines()
        .find(|l| l.contains("reflexive addr"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|a| a.trim().parse::<std::net::SocketAddr>().ok())
        .unwrap_or_else(|| panic!("no reflexive address in stunclient output:\n{text}"));
    assert_eq!(reflexive.ip().to_string(), local_ip, "{text}");
    assert_ne!(reflexive.port(), 0);
    assert_ne!(reflexive.port(), relay.listen.port());
}

#[test]
fn ipv6_channel_data_uring() {
    run_uclient_on("uring", Mode::Channel, Auth::User, true, Via::Udp);
}

#[test]
fn ipv6_channel_data_epoll() {
    run_uclient_on("epoll", Mode::Channel, Auth::User, true, Via::Udp);
}

#[test]
fn ipv6_client_to_client_uring() {
    run_uclient_on("uring", Mode::C2c, Auth::Rest, true, Via::Udp);
}

#[test]
fn ipv6_client_to_client_epoll() {
    run_uclient_on("epoll", Mode::C2c, Auth::Rest, true, Via::Udp);
}

#[test]
fn stunclient_mapping_uring() {
    run_stunclient("uring");
}

#[test]
fn stunclient_mapping_epoll() {
    run_stunclient("epoll");
}

#[test]
fn parses_uclient_output() {
    let sample = "7: : start_mclient: msz=5, tot_send_msgs=203, tot_recv_msgs=203\n\
                  7: : start_mclient: tot_send_msgs=250, tot_recv_msgs=249\n\
                  7: : Total lost packets 1 (0.400000%), total send dropped 0 (0.000000%)\n";
    let o = parse_uclient(sample);
    assert_eq!(
        (o.sent, o.received, o.lost),
        (Some(250), Some(249), Some(1))
    );
    assert!(o.errors.is_empty());

    // A 437 that uclient recovered from (new socket, new allocation) is not an error...
    let recovered = "0: : error 437 (Allocation Mismatch)\n\
                     0: : trying allocate again 437...\n\
                     5: : start_mclient: tot_send_msgs=250, tot_recv_msgs=250\n";
    let o = parse_uclient(recovered);
    assert!(o.errors.is_empty(), "{:?}", o.errors);
    assert_eq!((o.sent, o.received), (Some(250), Some(250)));
    // ...but a 437 without the retry, or any other error, still is.
    let o = parse_uclient("0: : error 437 (Allocation Mismatch)\n");
    assert_eq!(o.errors.len(), 1);
    let o = parse_uclient(&format!(
        "{recovered}0: : channel bind: error 403 (Forbidden)\n"
    ));
    assert_eq!(o.errors.len(), 1);
}
