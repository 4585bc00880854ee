//! IP address spellings: the IPv4 address an IPv6 address carries.
//!
//! Address policies (the relay's peer policy, signaling's candidate policy) judge an IPv6
//! spelling of an IPv4 address as that IPv4 address, so that `::ffff:127.0.0.1` cannot pass
//! where `127.0.0.1` would not.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The IPv4 address an IPv6 address carries, for every spelling a peer could use to smuggle
/// one: IPv4-mapped `::ffff:a.b.c.d`, IPv4-compatible `::a.b.c.d`, NAT64 `64:ff9b::/96`,
/// 6to4 `2002:AABB:CCDD::/16` and Teredo `2001:0::/32` (client address, bit-inverted).
///
/// `::` and `::1` come out as `0.0.0.0` and `0.0.0.1`, inside `0.0.0.0/8`.
pub fn embedded_v4(ip: &Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let o = ip.octets();
    let last32 = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    if s[..5] == [0, 0, 0, 0, 0] && (s[5] == 0xffff || s[5] == 0) {
        return Some(last32); // mapped or compatible
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(last32); // well-known NAT64 prefix
    }
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new(o[2], o[3], o[4], o[5])); // 6to4
    }
    if s[0] == 0x2001 && s[1] == 0 {
        return Some(Ipv4Addr::from(!u32::from(last32))); // Teredo client
    }
    None
}

/// The address as a policy sees it: IPv6 spellings of IPv4 become that IPv4 address.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => embedded_v4(&v6).map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> String {
        canonical(s.parse().expect("address")).to_string()
    }

    #[test]
    fn every_spelling_unwraps_to_its_ipv4_address() {
        assert_eq!(c("::ffff:127.0.0.1"), "127.0.0.1");
        assert_eq!(c("::10.0.0.1"), "10.0.0.1");
        assert_eq!(c("64:ff9b::a9fe:a9fe"), "169.254.169.254");
        assert_eq!(c("2002:c0a8:101::"), "192.168.1.1");
        assert_eq!(c("2001:0:4136:e378:8000:63bf:3fff:fdd2"), "192.0.2.45");
        assert_eq!(c("::"), "0.0.0.0");
        assert_eq!(c("::1"), "0.0.0.1");
        assert_eq!(c("2001:db8::1"), "2001:db8::1");
        assert_eq!(c("64:ff9b:1::1"), "64:ff9b:1::1");
        assert_eq!(c("198.51.100.7"), "198.51.100.7");
    }
}
