//! Each router kind maps and filters as RFC 4787 says, measured with plain UDP sockets from a
//! host behind it against servers on two public hosts (two addresses, two ports each).
#![allow(clippy::unwrap_used)] // test helpers, not only #[test] fns, unwrap

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use common::{drain, lab, recv_payload, with_deadline};
use peerlink_netlab::{Host, NatKind, Router};

const WAIT: Duration = Duration::from_secs(3);

/// Server sockets: s[0] = first address two ports, s[1] = second address two ports.
struct Servers {
    s: [[UdpSocket; 2]; 2],
}

impl Servers {
    fn addr(&self, host: usize, port: usize) -> SocketAddr {
        self.s[host][port].local_addr().unwrap()
    }
}

fn servers(a: &Host, b: &Host) -> Servers {
    let bind = |h: &Host, port: u16| h.udp_socket(SocketAddr::new(h.ip().into(), port)).unwrap();
    Servers {
        s: [
            [bind(a, 3478), bind(a, 3479)],
            [bind(b, 3478), bind(b, 3479)],
        ],
    }
}

/// Send `token` from `client` to server (h, p) and return the source address it observed.
fn observed(client: &UdpSocket, srv: &Servers, h: usize, p: usize, token: &[u8]) -> SocketAddr {
    client.send_to(token, srv.addr(h, p)).unwrap();
    recv_payload(&srv.s[h][p], token, WAIT).unwrap_or_else(|| {
        panic!(
            "server {h}/{p} did not receive {:?}",
            String::from_utf8_lossy(token)
        )
    })
}

/// Does an unsolicited `probe` from server (h, p) to `mapped` reach `client`? Decided by a
/// control packet from the contacted server (0, 0), sent after the probe, that always passes.
fn passes(
    client: &UdpSocket,
    srv: &Servers,
    h: usize,
    p: usize,
    mapped: SocketAddr,
    tag: &str,
) -> bool {
    let probe = format!("probe-{tag}");
    let control = format!("control-{tag}");
    srv.s[h][p].send_to(probe.as_bytes(), mapped).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    srv.s[0][0].send_to(control.as_bytes(), mapped).unwrap();
    let mut got = Vec::new();
    let arrived = common::recv_matching(client, WAIT, |payload, _| {
        got.push(payload.to_vec());
        payload == control.as_bytes()
    });
    assert!(
        arrived.is_some(),
        "{tag}: the control packet from the contacted server must pass"
    );
    got.extend(drain(client, Duration::from_millis(100)));
    got.iter().any(|g| g == probe.as_bytes())
}

fn check_kind(router: &Router, host: &Host, srv: &Servers) {
    let kind = router.kind();
    let any = "0.0.0.0:0".parse().unwrap();

    // Mapping: one socket talks to three destinations.
    let client = host.udp_socket(any).unwrap();
    let local = SocketAddr::new(host.ip().into(), client.local_addr().unwrap().port());
    let m1 = observed(&client, srv, 0, 0, format!("map1-{kind}").as_bytes());
    let m2 = observed(&client, srv, 0, 1, format!("map2-{kind}").as_bytes());
    let m3 = observed(&client, srv, 1, 0, format!("map3-{kind}").as_bytes());
    match kind {
        NatKind::Public => {
            assert_eq!([m1, m2, m3], [local; 3], "public: no translation");
        }
        NatKind::FullCone | NatKind::AddressRestricted | NatKind::PortRestricted => {
            assert_eq!(
                m1.ip(),
                std::net::IpAddr::from(router.wan_ip()),
                "{kind}: translated"
            );
            assert!(
                m1 == m2 && m2 == m3,
                "{kind}: endpoint-independent mapping: {m1} {m2} {m3}"
            );
        }
        NatKind::Symmetric => {
            for m in [m1, m2, m3] {
                assert_eq!(
                    m.ip(),
                    std::net::IpAddr::from(router.wan_ip()),
                    "{kind}: translated"
                );
            }
            assert!(
                !(m1 == m2 && m2 == m3),
                "symmetric: endpoint-dependent mapping expected, got {m1} for all"
            );
        }
    }

    // Filtering: a fresh socket contacts only server (0, 0).
    let client = host.udp_socket(any).unwrap();
    let mapped = observed(&client, srv, 0, 0, format!("filt-{kind}").as_bytes());
    let new_addr = passes(&client, srv, 1, 0, mapped, &format!("{kind}-new-address"));
    let new_port = passes(&client, srv, 0, 1, mapped, &format!("{kind}-new-port"));
    let (want_addr, want_port) = match kind {
        NatKind::Public | NatKind::FullCone => (true, true),
        NatKind::AddressRestricted => (false, true),
        NatKind::PortRestricted | NatKind::Symmetric => (false, false),
    };
    println!(
        "{kind:>8}: mapping {m1} {m2} {m3}; unsolicited from new address: {}, from contacted address new port: {}",
        if new_addr { "allowed" } else { "blocked" },
        if new_port { "allowed" } else { "blocked" },
    );
    assert_eq!(new_addr, want_addr, "{kind}: filtering of a new address");
    assert_eq!(
        new_port, want_port,
        "{kind}: filtering of a new port on the contacted address"
    );
}

#[test]
fn every_kind_maps_and_filters_per_rfc4787() {
    if !peerlink_netlab::root_or_skip("every_kind_maps_and_filters_per_rfc4787") {
        return;
    }
    with_deadline(Duration::from_secs(60), || {
        let lab = lab();
        let a = lab
            .add_public_host("srv-a", "203.0.113.200".parse().unwrap())
            .unwrap();
        let b = lab
            .add_public_host("srv-b", "198.51.100.20".parse().unwrap())
            .unwrap();
        let srv = servers(&a, &b);
        assert_eq!(lab.internet_hosts().len(), 2);
        for kind in NatKind::ALL {
            let router = lab.add_nat(kind).unwrap();
            let host = router.add_host(&format!("c-{}", kind.label())).unwrap();
            check_kind(&router, &host, &srv);
        }
    });
}

#[test]
fn forwarded_udp_is_counted_after_the_filter() {
    if !peerlink_netlab::root_or_skip("forwarded_udp_is_counted_after_the_filter") {
        return;
    }
    with_deadline(Duration::from_secs(60), || {
        let lab = lab();
        let a = lab
            .add_public_host("srv-a", "203.0.113.200".parse().unwrap())
            .unwrap();
        let srv = a.udp_socket("203.0.113.200:4000".parse().unwrap()).unwrap();
        let other = a.udp_socket("203.0.113.200:4001".parse().unwrap()).unwrap();
        let router = lab.add_nat(NatKind::PortRestricted).unwrap();
        let host = router.add_host("c").unwrap();
        let client = host.udp_socket("0.0.0.0:0".parse().unwrap()).unwrap();
        assert_eq!(router.udp_forwarded().unwrap(), (0, 0));
        let mut mapped = None;
        for i in 0..10u8 {
            let tok = [b'o', i];
            client.send_to(&tok, srv.local_addr().unwrap()).unwrap();
            mapped = recv_payload(&srv, &tok, WAIT);
            assert!(mapped.is_some(), "datagram {i} did not arrive");
        }
        let mapped = mapped.unwrap();
        for i in 0..10u8 {
            let tok = [b'i', i];
            srv.send_to(&tok, mapped).unwrap();
            assert!(
                recv_payload(&client, &tok, WAIT).is_some(),
                "reply {i} lost"
            );
        }
        // Unsolicited from a port the host never contacted: filtered, so not counted.
        for _ in 0..5 {
            other.send_to(b"x", mapped).unwrap();
        }
        assert!(drain(&client, Duration::from_millis(200)).is_empty());
        assert_eq!(router.udp_forwarded().unwrap(), (10, 10));
    });
}
