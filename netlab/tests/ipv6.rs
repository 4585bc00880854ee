//! IPv6 in the lab: dual-stack routers route their LAN's global `/64` untranslated (the IPv4
//! side still NATs), IPv6-only public hosts reach them, and an IPv4-only host has no IPv6
//! route at all.
#![allow(clippy::unwrap_used)] // test helpers, not only #[test] fns, unwrap

mod common;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use common::{lab, recv_payload, with_deadline};
use peerlink_netlab::{LabError, NatKind};

const WAIT: Duration = Duration::from_secs(3);

#[test]
fn dual_stack_router_routes_v6_and_nats_v4() {
    if !peerlink_netlab::root_or_skip("dual_stack_router_routes_v6_and_nats_v4") {
        return;
    }
    with_deadline(Duration::from_secs(60), || {
        let lab = lab();
        // IPv6 is opt-in: asking for it first is a clear error.
        assert!(matches!(
            lab.add_nat_dual_stack(NatKind::Symmetric),
            Err(LabError::Ipv6Off)
        ));
        lab.enable_ipv6().unwrap();
        let v6: Ipv6Addr = "2001:db8::20".parse().unwrap();
        let server = lab
            .add_public_host_v6("srv", Some(Ipv4Addr::new(203, 0, 113, 200)), v6)
            .unwrap();
        let only6 = lab
            .add_public_host_v6("only6", None, "2001:db8::30".parse().unwrap())
            .unwrap();
        assert_eq!(only6.ip(), Ipv4Addr::UNSPECIFIED);
        let router = lab.add_nat_dual_stack(NatKind::Symmetric).unwrap();
        let host = router.add_host("dual").unwrap();
        let ip6 = host
            .ip6()
            .expect("a host behind a dual-stack router has IPv6");
        let lan6 = router.lan6().unwrap();
        assert_eq!(ip6.segments()[..4], lan6.segments()[..4]);
        let v4_router = lab.add_nat(NatKind::PortRestricted).unwrap();
        let v4_only = v4_router.add_host("v4only").unwrap();
        assert_eq!(v4_only.ip6(), None);

        // IPv6: the server sees the host's own global address (no NAT66), both ways.
        let srv6 = server.udp_socket(SocketAddr::new(v6.into(), 4000)).unwrap();
        let c6 = host.udp_socket(SocketAddr::new(ip6.into(), 5000)).unwrap();
        c6.send_to(b"hello6", srv6.local_addr().unwrap()).unwrap();
        let seen = recv_payload(&srv6, b"hello6", WAIT).expect("v6 datagram");
        assert_eq!(seen, c6.local_addr().unwrap());
        // Unsolicited from an IPv6-only host: routed in, no filter.
        let o6 = only6
            .udp_socket("[2001:db8::30]:6000".parse().unwrap())
            .unwrap();
        o6.send_to(b"unsolicited", c6.local_addr().unwrap())
            .unwrap();
        assert_eq!(
            recv_payload(&c6, b"unsolicited", WAIT),
            Some(o6.local_addr().unwrap())
        );
        // IPv4 from the same host is still translated by the symmetric NAT.
        let srv4 = server
            .udp_socket("203.0.113.200:4000".parse().unwrap())
            .unwrap();
        let c4 = host
            .udp_socket(SocketAddr::new(host.ip().into(), 5000))
            .unwrap();
        c4.send_to(b"hello4", srv4.local_addr().unwrap()).unwrap();
        let seen4 = recv_payload(&srv4, b"hello4", WAIT).expect("v4 datagram");
        assert_eq!(seen4.ip(), std::net::IpAddr::from(router.wan_ip()));
        // The IPv4-only host has no route to IPv6.
        let probe = v4_only.udp_socket("[::]:0".parse().unwrap()).unwrap();
        assert!(probe.connect(srv6.local_addr().unwrap()).is_err());
        // Addresses outside the plan or taken are refused.
        assert!(matches!(
            lab.add_public_host_v6("bad", None, "2001:db8:5::1".parse().unwrap()),
            Err(LabError::Ipv6AddressNotAllowed(_))
        ));
        assert!(matches!(
            lab.add_public_host_v6("dup", None, v6),
            Err(LabError::Ipv6AddressInUse(_))
        ));
    });
}
