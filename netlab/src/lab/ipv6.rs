//! IPv6 in the lab: the internet's `2001:db8::/64` segment, public hosts with an IPv6 address
//! (dual stack or IPv6 only), and dual-stack routers that route a `/64` of their own to their
//! LAN — global addresses, no NAT66 and no IPv6 filter, as most IPv6 access networks deliver
//! them (only the routers' IPv4 side NATs).
//!
//! Address plan: the internet core is [`CORE6`] (`2001:db8::1`) on `br0`; public hosts take
//! `2001:db8::2`-`2001:db8::ffff`; router `n` (counted from 1) has WAN address
//! `2001:db8::1:n` and LAN `2001:db8:n::/64` (gateway `::1`, hosts `::2` upwards, the same
//! rank as their IPv4 address). Addresses are added without duplicate address detection
//! (`nodad`), so they are usable at once.

use super::*;

/// The internet core's IPv6 address: default gateway of public hosts and routers.
pub const CORE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
/// The internet segment's IPv6 prefix (`/64`).
pub const INTERNET6_PREFIX: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0);

/// A dual-stack router's IPv6 side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RouterV6 {
    /// WAN address on the internet segment.
    pub(crate) wan: Ipv6Addr,
    /// Its LAN's `/64` prefix (the gateway is `::1` in it).
    pub(crate) lan: Ipv6Addr,
}

fn on_internet_segment(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    s[..4] == [0x2001, 0xdb8, 0, 0] && s[4..7] == [0, 0, 0]
}

/// Turns IPv6 on in namespace `ns` (all interfaces, present and future).
fn ipv6_on(ns: &Netns, forwarding: bool) -> Result<()> {
    for scope in ["all", "default"] {
        ns.set_sysctl(&format!("net.ipv6.conf.{scope}.disable_ipv6"), "0")?;
        ns.set_sysctl(&format!("net.ipv6.conf.{scope}.accept_dad"), "0")?;
        if forwarding {
            ns.set_sysctl(&format!("net.ipv6.conf.{scope}.forwarding"), "1")?;
        }
    }
    Ok(())
}

impl Lab {
    /// Turns IPv6 on in the internet: [`CORE6`]`/64` on its bridge, forwarding between the
    /// segment and the routers' LANs. Idempotent. Labs start IPv4-only.
    pub fn enable_ipv6(&self) -> Result<()> {
        if self.shared.state()?.ipv6_on {
            return Ok(());
        }
        ipv6_on(&self.internet, true)?;
        ip_batch(
            Some(self.internet.name()),
            &[format!("addr add {CORE6}/64 dev {BRIDGE} nodad")],
        )?;
        self.shared.state()?.ipv6_on = true;
        Ok(())
    }

    fn claim_ip6(&self, ip: Ipv6Addr) -> Result<()> {
        let mut st = self.shared.state()?;
        if !st.ipv6_on {
            return Err(LabError::Ipv6Off);
        }
        if ip == CORE6 || !st.used_ips6.insert(ip) {
            return Err(LabError::Ipv6AddressInUse(ip));
        }
        Ok(())
    }

    /// Attaches a public host with IPv6 address `ip6` (in `2001:db8::/64`, see the address
    /// plan) and, when `ip4` is given, that IPv4 address as [`Lab::add_public_host`] gives it;
    /// without one the host is IPv6-only (its [`Host::ip`] is `0.0.0.0`).
    pub fn add_public_host_v6(
        &self,
        name: &str,
        ip4: Option<Ipv4Addr>,
        ip6: Ipv6Addr,
    ) -> Result<Host> {
        if !on_internet_segment(ip6) || ip6.segments()[7] < 2 {
            return Err(LabError::Ipv6AddressNotAllowed(ip6));
        }
        self.claim_ip6(ip6)?;
        let mut host = match ip4 {
            Some(ip) => self.add_public_host(name, ip)?,
            None => {
                self.shared.claim_host_name(name)?;
                let ns = self.shared.add_namespace(&format!("h-{name}"))?;
                let port = self.shared.next_port()?;
                self.attach_to_internet(&ns, "eth0", &port)?;
                ip_batch(Some(ns.name()), &["link set eth0 up".into()])?;
                Host {
                    ns,
                    name: name.to_owned(),
                    ip: Ipv4Addr::UNSPECIFIED,
                    gateway: Ipv4Addr::UNSPECIFIED,
                    behind: None,
                    ip6: None,
                }
            }
        };
        ipv6_on(&host.ns, false)?;
        ip_batch(
            Some(host.ns.name()),
            &[
                format!("addr add {ip6}/64 dev eth0 nodad"),
                format!("route add default via {CORE6}"),
            ],
        )?;
        host.ip6 = Some(ip6);
        let mut st = self.shared.state()?;
        st.public_hosts.retain(|h| h.name != host.name);
        st.public_hosts.push(host.clone());
        Ok(host)
    }

    /// Adds a router of `kind` (clean link) that also routes IPv6: its IPv4 side NATs as
    /// `kind` says, its IPv6 side routes the LAN's own `/64` with no translation and no filter.
    /// Hosts added behind it get an IPv6 address as well as an IPv4 one.
    pub fn add_nat_dual_stack(&self, kind: NatKind) -> Result<Router> {
        if !self.shared.state()?.ipv6_on {
            return Err(LabError::Ipv6Off);
        }
        let mut router = self.add_nat(kind)?;
        let n = self.shared.state()?.next_router;
        let n = u16::try_from(n).map_err(|_| LabError::PoolExhausted("IPv6 router LANs"))?;
        let v6 = RouterV6 {
            wan: Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 1, n),
            lan: Ipv6Addr::new(0x2001, 0xdb8, n, 0, 0, 0, 0, 0),
        };
        self.claim_ip6(v6.wan)?;
        let gw = lan_addr(v6.lan, 1);
        ipv6_on(&router.ns, true)?;
        ip_batch(
            Some(router.ns.name()),
            &[
                format!("addr add {}/64 dev {WAN_IF} nodad", v6.wan),
                format!("addr add {gw}/64 dev {LAN_IF} nodad"),
                format!("route add default via {CORE6}"),
            ],
        )?;
        ip_batch(
            Some(self.internet.name()),
            &[format!("route add {}/64 via {}", v6.lan, v6.wan)],
        )?;
        router.v6 = Some(v6);
        let mut st = self.shared.state()?;
        if let Some(r) = st
            .routers
            .iter_mut()
            .find(|r| r.ns.name() == router.ns.name())
        {
            r.v6 = Some(v6);
        }
        Ok(router)
    }
}

/// Address `host` (interface id) in the `/64` at `prefix`.
fn lan_addr(prefix: Ipv6Addr, host: u32) -> Ipv6Addr {
    let s = prefix.segments();
    let [hi, lo] = [(host >> 16) as u16, host as u16];
    Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, hi, lo)
}

impl Router {
    /// Its IPv6 LAN prefix (`/64`), for a dual-stack router.
    pub fn lan6(&self) -> Option<Ipv6Addr> {
        self.v6.map(|v| v.lan)
    }

    /// Its IPv6 WAN address, for a dual-stack router.
    pub fn wan_ip6(&self) -> Option<Ipv6Addr> {
        self.v6.map(|v| v.wan)
    }

    /// Gives the host `ns`, `rank`-th behind this router, its IPv6 address and route.
    pub(super) fn add_host_v6(&self, ns: &Netns, v6: &RouterV6, rank: u32) -> Result<Ipv6Addr> {
        let ip = lan_addr(v6.lan, rank + 1);
        ipv6_on(ns, false)?;
        ip_batch(
            Some(ns.name()),
            &[
                format!("addr add {ip}/64 dev eth0 nodad"),
                format!("route add default via {}", lan_addr(v6.lan, 1)),
            ],
        )?;
        Ok(ip)
    }
}

impl Host {
    /// The host's global IPv6 address, if it has one.
    pub fn ip6(&self) -> Option<Ipv6Addr> {
        self.ip6
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_plan() {
        assert!(on_internet_segment("2001:db8::200".parse().unwrap()));
        assert!(!on_internet_segment("2001:db8:1::200".parse().unwrap()));
        assert!(!on_internet_segment("2001:db9::200".parse().unwrap()));
        assert_eq!(
            lan_addr("2001:db8:7::".parse().unwrap(), 2),
            "2001:db8:7::2".parse::<Ipv6Addr>().unwrap()
        );
    }
}
