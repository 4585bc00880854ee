//! Dual stack in the call driver: receiving on the IPv4 and the IPv6 socket, where the IPv6
//! socket binds, and the family a report names.

use super::*;

/// The next datagram on `sock` or `sock6`: (agent socket index, length, source). A free
/// function so the future borrows the sockets only, not the whole (non-`Sync`) leg.
pub(super) async fn recv_any(
    sock: &UdpSocket,
    sock6: Option<&UdpSocket>,
    buf: &mut [u8],
) -> std::io::Result<(usize, usize, SocketAddr)> {
    let Some(s6) = sock6 else {
        return sock.recv_from(buf).await.map(|(n, a)| (0, n, a));
    };
    loop {
        let (i, s) = tokio::select! {
            r = sock.readable() => { r?; (0, sock) }
            r = s6.readable() => { r?; (1, s6) }
        };
        match s.try_recv_from(buf) {
            Ok((n, a)) => return Ok((i, n, a)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Where the IPv6 socket binds beside an IPv4 one: `opts.bind6`, else the source address the
/// host would use towards the IPv6 STUN server (none without a route, or when it is
/// link-local: such a candidate needs a scope the peer cannot use).
pub(super) async fn v6_bind_ip(opts: &CallOptions) -> Option<std::net::IpAddr> {
    if !opts.bind_ip.is_ipv4() {
        return None;
    }
    if let Some(ip) = opts.bind6 {
        return Some(ip);
    }
    let stun6 = opts.stun6?;
    let probe = UdpSocket::bind("[::]:0").await.ok()?;
    // connect() on UDP sends nothing: it only picks the route and source address.
    probe.connect(stun6).await.ok()?;
    let ip = probe.local_addr().ok()?.ip();
    let usable = match ip {
        std::net::IpAddr::V6(v6) => {
            !v6.is_unspecified() && !v6.is_unicast_link_local() && v6.to_ipv4_mapped().is_none()
        }
        std::net::IpAddr::V4(_) => false,
    };
    usable.then_some(ip)
}

/// "ipv4" or "ipv6".
pub(super) fn family_name(a: SocketAddr) -> &'static str {
    if a.is_ipv4() { "ipv4" } else { "ipv6" }
}
