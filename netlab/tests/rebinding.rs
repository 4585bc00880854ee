//! NAT state knobs: flushing mappings (all, or UDP only, which TCP survives) rebinds a symmetric
//! NAT and recreates a full-cone mapping; a short conntrack UDP timeout closes an idle
//! port-restricted pinhole.
#![allow(clippy::unwrap_used)] // test helpers, not only #[test] fns, unwrap

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use common::{lab, recv_matching, recv_payload, with_deadline};
use peerlink_netlab::{Host, Lab, NatKind};

const WAIT: Duration = Duration::from_secs(3);

fn any() -> SocketAddr {
    "0.0.0.0:0".parse().unwrap()
}

fn servers(lab: &Lab) -> (Host, UdpSocket, UdpSocket) {
    let a = lab
        .add_public_host("srv-a", "203.0.113.200".parse().unwrap())
        .unwrap();
    let b = lab
        .add_public_host("srv-b", "198.51.100.20".parse().unwrap())
        .unwrap();
    let sa = a.udp_socket("203.0.113.200:3478".parse().unwrap()).unwrap();
    let sb = b.udp_socket("198.51.100.20:3478".parse().unwrap()).unwrap();
    (a, sa, sb)
}

/// Send `token` from `client` to `server` and return the source the server observed.
fn observed(client: &UdpSocket, server: &UdpSocket, token: &str) -> SocketAddr {
    client
        .send_to(token.as_bytes(), server.local_addr().unwrap())
        .unwrap();
    recv_payload(server, token.as_bytes(), WAIT).unwrap_or_else(|| panic!("{token} lost"))
}

#[test]
fn flushing_a_symmetric_nat_rebinds_the_next_packet_to_a_new_port() {
    if !peerlink_netlab::root_or_skip(
        "flushing_a_symmetric_nat_rebinds_the_next_packet_to_a_new_port",
    ) {
        return;
    }
    with_deadline(Duration::from_secs(30), || {
        let lab = lab();
        let (_a, sa, _sb) = servers(&lab);
        let router = lab.add_nat(NatKind::Symmetric).unwrap();
        let host = router.add_host("alice").unwrap();
        let client = host.udp_socket(any()).unwrap();
        let before = observed(&client, &sa, "one");
        assert_eq!(
            observed(&client, &sa, "two"),
            before,
            "stable while the entry lives"
        );
        router.flush_nat().unwrap();
        let after = observed(&client, &sa, "three");
        println!("symmetric NAT: {before} -> after flush {after}");
        assert_eq!(after.ip(), before.ip());
        assert_ne!(
            after.port(),
            before.port(),
            "the flush must rebind to a new external port"
        );
    });
}

#[test]
fn flushing_a_full_cone_nat_drops_the_mapping_until_the_host_sends_again() {
    if !peerlink_netlab::root_or_skip(
        "flushing_a_full_cone_nat_drops_the_mapping_until_the_host_sends_again",
    ) {
        return;
    }
    with_deadline(Duration::from_secs(30), || {
        let lab = lab();
        let (_a, sa, sb) = servers(&lab);
        let router = lab.add_nat(NatKind::FullCone).unwrap();
        let host = router.add_host("alice").unwrap();
        let client = host.udp_socket(any()).unwrap();
        let mapped = observed(&client, &sa, "open");
        // Full cone: anyone may send to the mapping.
        sb.send_to(b"in-1", mapped).unwrap();
        assert!(
            recv_payload(&client, b"in-1", WAIT).is_some(),
            "full cone admits a stranger"
        );

        router.flush_nat().unwrap();
        sb.send_to(b"in-2", mapped).unwrap(); // mapping gone: must be dropped
        let again = observed(&client, &sa, "reopen"); // recreates the mapping
        assert_eq!(
            again, mapped,
            "full cone recreates the same port-preserving mapping"
        );
        sb.send_to(b"in-3", mapped).unwrap();
        let mut seen = Vec::new();
        let got = recv_matching(&client, WAIT, |p, _| {
            seen.push(p.to_vec());
            p == b"in-3"
        });
        println!(
            "full cone after flush: received {:?}",
            seen.iter()
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect::<Vec<_>>()
        );
        assert!(got.is_some(), "recreated mapping admits the stranger again");
        assert!(
            !seen.iter().any(|p| p == b"in-2"),
            "a packet reached the host while the mapping was flushed"
        );
    });
}

#[test]
fn a_short_conntrack_udp_timeout_closes_an_idle_pinhole() {
    if !peerlink_netlab::root_or_skip("a_short_conntrack_udp_timeout_closes_an_idle_pinhole") {
        return;
    }
    with_deadline(Duration::from_secs(30), || {
        let lab = lab();
        let (_a, sa, _sb) = servers(&lab);
        let router = lab.add_nat(NatKind::PortRestricted).unwrap();
        router
            .set_conntrack_udp_timeout(Duration::from_secs(1), Duration::from_secs(1))
            .unwrap();
        assert_eq!(
            router
                .sysctl("net.netfilter.nf_conntrack_udp_timeout")
                .unwrap(),
            "1"
        );
        assert_eq!(
            router
                .sysctl("net.netfilter.nf_conntrack_udp_timeout_stream")
                .unwrap(),
            "1"
        );
        let host = router.add_host("alice").unwrap();
        let client = host.udp_socket(any()).unwrap();
        let mapped = observed(&client, &sa, "hello");
        sa.send_to(b"reply-fresh", mapped).unwrap();
        assert!(
            recv_payload(&client, b"reply-fresh", WAIT).is_some(),
            "fresh pinhole passes"
        );

        // Idle past the 1 s timeout: the pinhole closes (this wait *is* the behaviour).
        std::thread::sleep(Duration::from_millis(2500));
        sa.send_to(b"reply-stale", mapped).unwrap();
        // Reopen from inside and prove the stale reply never arrived.
        observed(&client, &sa, "hello-again");
        sa.send_to(b"reply-reopened", mapped).unwrap();
        let mut seen = Vec::new();
        let got = recv_matching(&client, WAIT, |p, _| {
            seen.push(p.to_vec());
            p == b"reply-reopened"
        });
        assert!(got.is_some(), "reopened pinhole passes");
        assert!(
            !seen.iter().any(|p| p == b"reply-stale"),
            "the idle pinhole should have expired"
        );
    });
}

#[test]
fn flushing_only_udp_rebinds_udp_and_keeps_tcp_connections() {
    if !peerlink_netlab::root_or_skip("flushing_only_udp_rebinds_udp_and_keeps_tcp_connections") {
        return;
    }
    with_deadline(Duration::from_secs(30), || {
        use std::io::{Read, Write};
        let lab = lab();
        let (a, sa, _sb) = servers(&lab);
        let listener = a
            .tcp_listener("203.0.113.200:8080".parse().unwrap())
            .unwrap();
        let router = lab.add_nat(NatKind::Symmetric).unwrap();
        let host = router.add_host("alice").unwrap();
        let mut tcp = host
            .tcp_connect("203.0.113.200:8080".parse().unwrap(), WAIT)
            .unwrap();
        let (mut server_side, _) = listener.accept().unwrap();
        for s in [&tcp, &server_side] {
            s.set_read_timeout(Some(WAIT)).unwrap();
        }
        let client = host.udp_socket(any()).unwrap();
        let before = observed(&client, &sa, "one");

        router.flush_udp_nat().unwrap();
        let after = observed(&client, &sa, "two");
        assert_ne!(after.port(), before.port(), "UDP must rebind");
        // The TCP connection's translation survived: both directions still work.
        tcp.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        server_side.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        server_side.write_all(b"pong").unwrap();
        tcp.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"pong");
        // An empty UDP table is not an error.
        drop(client);
        router.flush_udp_nat().unwrap();
        router.flush_udp_nat().unwrap();
    });
}
