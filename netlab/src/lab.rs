//! The lab builder: namespaces, the internet segment, routers and hosts, and their cleanup.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::ops::Deref;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::cmd::{self, ip_batch};
use crate::error::{LabError, Result};
use crate::nat::{self, Egress, LAN_IF, NatKind, WAN_IF};
use crate::ns::{NETNS_DIR, Netns};
use crate::wire::{DelayLine, WireConfig, WireStats};

mod ipv6;
pub use ipv6::{CORE6, INTERNET6_PREFIX};

/// Every namespace name of every lab starts `pl<pid>x<counter>-`; the sweep parses this.
const PREFIX_TAG: &str = "pl";
/// The internet's bridge, inside the internet namespace.
const BRIDGE: &str = "br0";
/// The internet core's address in 203.0.113.0/24: default gateway of routers and hosts there.
pub const CORE_A: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 254);
/// The internet core's address in 198.51.100.0/25: default gateway of public hosts there.
pub const CORE_B: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// Public-router LANs are /28s carved out of 198.51.100.128/25 (eight of them).
const PUBLIC_LAN_BASE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 128);
const PUBLIC_LAN_PREFIX: u8 = 28;
const PUBLIC_LAN_COUNT: u32 = 8;
/// NAT LANs are /24s out of 100.64.0.0/10 (shared address space, RFC 6598).
const NAT_LAN_BASE: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 0);
const NAT_LAN_COUNT: u32 = 1 << 14;
/// tbf queue: how much delay the rate limiter may add before it drops.
const TBF_LATENCY: &str = "50ms";

/// Per-process counter making each lab's prefix unique.
static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// State shared by the lab and every handle it gave out.
pub(crate) struct Shared {
    prefix: String,
    closed: AtomicBool,
    /// Pids of children started in lab namespaces and not yet reaped.
    pub(crate) children: Mutex<BTreeSet<u32>>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Full names of our namespaces, in creation order.
    namespaces: Vec<String>,
    host_names: BTreeSet<String>,
    used_ips: BTreeSet<Ipv4Addr>,
    /// Next index for ports on the internet bridge.
    next_port: u32,
    next_router: u32,
    next_nat_lan: u32,
    next_public_lan: u32,
    /// Hosts added so far behind each router (by router namespace).
    hosts_behind: BTreeMap<String, u32>,
    routers: Vec<Router>,
    public_hosts: Vec<Host>,
    /// Delay lines by router namespace.
    wires: BTreeMap<String, DelayLine>,
    /// IPv6 is on in the internet ([`Lab::enable_ipv6`]).
    ipv6_on: bool,
    used_ips6: BTreeSet<Ipv6Addr>,
}

impl Shared {
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    fn state(&self) -> Result<MutexGuard<'_, State>> {
        if self.is_closed() {
            return Err(LabError::Closed);
        }
        Ok(self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Create a namespace and record it for cleanup before anything else can fail.
    fn add_namespace(self: &Arc<Self>, short: &str) -> Result<Netns> {
        let name = format!("{}{short}", self.prefix);
        let mut st = self.state()?;
        cmd::run(
            std::process::Command::new("ip").args(["netns", "add", &name]),
            None,
        )?;
        st.namespaces.push(name.clone());
        drop(st);
        Ok(Netns::new(name, Arc::clone(self)))
    }

    fn claim_host_name(&self, name: &str) -> Result<()> {
        let valid = !name.is_empty()
            && name.len() <= 24
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        let mut st = self.state()?;
        if !valid || !st.host_names.insert(name.to_owned()) {
            return Err(LabError::InvalidName(name.to_owned()));
        }
        Ok(())
    }

    fn next_port(&self) -> Result<String> {
        let mut st = self.state()?;
        st.next_port += 1;
        Ok(format!("p{}", st.next_port))
    }

    /// Kill children, stop delay lines, delete namespaces. Idempotent.
    fn shutdown(&self) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        {
            let children = self.children.lock().unwrap_or_else(|p| p.into_inner());
            for &pid in children.iter() {
                // Only pids we spawned and have not reaped (so not recycled): safe to signal.
                if let Ok(pid) = i32::try_from(pid) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        // Delay-line threads live in wire namespaces: stop them first.
        let wires = std::mem::take(&mut st.wires);
        drop(wires);
        st.routers.clear();
        st.public_hosts.clear();
        let names: Vec<String> = st.namespaces.drain(..).rev().collect();
        drop(st);
        delete_namespaces(&names);
    }
}

fn delete_namespaces(names: &[String]) {
    if names.is_empty() {
        return;
    }
    let lines: Vec<String> = names.iter().map(|n| format!("netns del {n}")).collect();
    if ip_batch(None, &lines).is_ok() {
        return;
    }
    // The batch stops at the first failure: retry one by one, ignoring the already gone.
    for n in names {
        if Path::new(NETNS_DIR).join(n).exists()
            && let Err(e) = cmd::run(
                std::process::Command::new("ip").args(["netns", "del", n]),
                None,
            )
        {
            tracing::warn!(ns = %n, error = %e, "could not delete lab namespace");
        }
    }
}

/// Parse the owning pid out of a namespace name of our family (`pl<pid>x<n>-...`).
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX_TAG)?;
    let (pid, rest) = rest.split_once('x')?;
    let (counter, _) = rest.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(pid) || !digits(counter) {
        return None;
    }
    pid.parse().ok()
}

/// Delete namespaces of our prefix family whose owning process is gone; returns their names.
///
/// Only names of the exact form `pl<pid>x<counter>-...` whose pid has no `/proc` entry are
/// touched; everything else in `/run/netns` is left alone.
pub fn sweep_stale() -> Result<Vec<String>> {
    let dir = match std::fs::read_dir(NETNS_DIR) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(LabError::Io {
                what: format!("listing {NETNS_DIR}"),
                source,
            });
        }
    };
    let mut stale = Vec::new();
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(pid) = owner_pid(&name)
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            stale.push(name);
        }
    }
    stale.sort();
    for n in &stale {
        tracing::info!(ns = %n, "sweeping stale lab namespace");
    }
    delete_namespaces(&stale);
    Ok(stale)
}

/// Delay, jitter, loss and rate of a router's WAN link, and what its firewall lets out.
///
/// With `delay` or `jitter` non-zero the router's WAN goes through a delay line (a "wire"
/// namespace with a user-space forwarding thread); loss is then applied by that line with
/// the seeded RNG. Without them, loss is an nftables `numgen random` drop on the router's
/// forward path. Either way loss hits each direction independently. `rate_bps` puts a
/// `tbf` on both ends of the WAN link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkConditions {
    /// One-way delay added in each direction.
    pub delay: Duration,
    /// Each frame's delay is `delay ± jitter` (uniform); jitter reorders frames.
    pub jitter: Duration,
    /// Random loss in percent (0-100), per direction.
    pub loss_percent: u8,
    /// Rate limit in bits per second, each direction (`None`: unlimited).
    pub rate_bps: Option<u64>,
    /// Seed of the delay line's RNG (jitter and loss), for reproducible runs.
    pub seed: u64,
    /// What the router lets out of its LAN (default everything; [`Egress::NoUdp`] and
    /// [`Egress::TcpPorts`] make UDP-hostile networks).
    pub egress: Egress,
}

impl LinkConditions {
    fn needs_wire(&self) -> bool {
        !self.delay.is_zero() || !self.jitter.is_zero()
    }

    fn validate(&self) -> Result<()> {
        if self.loss_percent > 100 {
            return Err(LabError::InvalidConditions(format!(
                "loss_percent {} > 100",
                self.loss_percent
            )));
        }
        if self.jitter > self.delay {
            return Err(LabError::InvalidConditions(format!(
                "jitter {:?} larger than delay {:?}",
                self.jitter, self.delay
            )));
        }
        if self.rate_bps.is_some_and(|r| r < 8_000) {
            return Err(LabError::InvalidConditions("rate_bps below 8000".into()));
        }
        Ok(())
    }
}

/// A running lab: an internet segment plus the routers and hosts added to it.
///
/// Dropping it (also while unwinding from a panic) kills children started in its
/// namespaces, stops its delay lines and deletes every namespace it created; veths, bridges
/// and nftables rules live inside those namespaces and go with them. Nothing is ever created
/// in the caller's own namespace.
pub struct Lab {
    shared: Arc<Shared>,
    internet: Netns,
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab")
            .field("prefix", &self.shared.prefix)
            .finish()
    }
}

impl Lab {
    /// Sweep stale namespaces of dead runs, then build an empty internet segment.
    ///
    /// Fails with [`LabError::NotRoot`] unless running as root.
    pub fn new() -> Result<Self> {
        let euid = nix::unistd::geteuid();
        if !euid.is_root() {
            return Err(LabError::NotRoot {
                euid: euid.as_raw(),
            });
        }
        sweep_stale()?;
        let prefix = format!(
            "{PREFIX_TAG}{}x{}-",
            std::process::id(),
            LAB_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let shared = Arc::new(Shared {
            prefix,
            closed: AtomicBool::new(false),
            children: Mutex::new(BTreeSet::new()),
            state: Mutex::new(State::default()),
        });
        // From here on, an early return drops `lab` and cleans up what was built.
        let internet = shared.add_namespace("inet")?;
        let lab = Lab {
            shared: Arc::clone(&shared),
            internet,
        };
        let inet = &lab.internet;
        inet.set_sysctl("net.ipv4.ip_forward", "1")?;
        for scope in ["all", "default"] {
            inet.set_sysctl(&format!("net.ipv4.conf.{scope}.send_redirects"), "0")?;
            inet.set_sysctl(&format!("net.ipv6.conf.{scope}.disable_ipv6"), "1")?;
        }
        ip_batch(
            Some(inet.name()),
            &[
                "link set lo up".into(),
                format!("link add {BRIDGE} type bridge"),
                format!("link set {BRIDGE} up"),
                format!("addr add {CORE_A}/24 dev {BRIDGE}"),
                format!("addr add {CORE_B}/25 dev {BRIDGE}"),
            ],
        )?;
        Ok(lab)
    }

    /// This lab's namespace-name prefix (`pl<pid>x<n>-`).
    pub fn prefix(&self) -> &str {
        &self.shared.prefix
    }

    /// The internet namespace (bridge `br0`, core addresses [`CORE_A`] and [`CORE_B`]).
    pub fn internet(&self) -> &Netns {
        &self.internet
    }

    /// Full names of every namespace this lab created so far.
    pub fn namespaces(&self) -> Vec<String> {
        self.shared
            .state()
            .map(|st| st.namespaces.clone())
            .unwrap_or_default()
    }

    /// Hosts attached directly to the internet.
    pub fn internet_hosts(&self) -> Vec<Host> {
        self.shared
            .state()
            .map(|st| st.public_hosts.clone())
            .unwrap_or_default()
    }

    /// Routers added so far.
    pub fn routers(&self) -> Vec<Router> {
        self.shared
            .state()
            .map(|st| st.routers.clone())
            .unwrap_or_default()
    }

    /// Attach a host directly to the internet with address `ip`
    /// (203.0.113.1-253 or 198.51.100.2-127).
    pub fn add_public_host(&self, name: &str, ip: Ipv4Addr) -> Result<Host> {
        let [a, b, c, d] = ip.octets();
        let (prefix_len, gateway) = match (a, b, c, d) {
            (203, 0, 113, 1..=253) => (24, CORE_A),
            (198, 51, 100, 2..=127) => (25, CORE_B),
            _ => return Err(LabError::AddressNotAllowed(ip)),
        };
        self.shared.claim_host_name(name)?;
        self.claim_ip(ip)?;
        let ns = self.shared.add_namespace(&format!("h-{name}"))?;
        let port = self.shared.next_port()?;
        self.attach_to_internet(&ns, "eth0", &port)?;
        ip_batch(
            Some(ns.name()),
            &[
                format!("addr add {ip}/{prefix_len} dev eth0"),
                "link set eth0 up".into(),
                format!("route add default via {gateway}"),
            ],
        )?;
        let host = Host {
            ns,
            name: name.to_owned(),
            ip,
            gateway,
            behind: None,
            ip6: None,
        };
        self.shared.state()?.public_hosts.push(host.clone());
        Ok(host)
    }

    /// Add a router of `kind` with a clean link to the internet.
    pub fn add_nat(&self, kind: NatKind) -> Result<Router> {
        self.add_nat_with(kind, LinkConditions::default())
    }

    /// Add a router of `kind` whose WAN link has `conditions`.
    pub fn add_nat_with(&self, kind: NatKind, conditions: LinkConditions) -> Result<Router> {
        conditions.validate()?;
        let (index, lan_net, lan_prefix) = {
            let mut st = self.shared.state()?;
            let (net, prefix) = if kind == NatKind::Public {
                if st.next_public_lan >= PUBLIC_LAN_COUNT {
                    return Err(LabError::PoolExhausted("public-router LANs (8 per lab)"));
                }
                let net = u32::from(PUBLIC_LAN_BASE) + (st.next_public_lan << 4);
                st.next_public_lan += 1;
                (Ipv4Addr::from(net), PUBLIC_LAN_PREFIX)
            } else {
                st.next_nat_lan += 1;
                if st.next_nat_lan >= NAT_LAN_COUNT {
                    return Err(LabError::PoolExhausted("NAT LANs in 100.64.0.0/10"));
                }
                (
                    Ipv4Addr::from(u32::from(NAT_LAN_BASE) + (st.next_nat_lan << 8)),
                    24,
                )
            };
            st.next_router += 1;
            (st.next_router, net, prefix)
        };
        let wan_ip = self.claim_next_wan_ip()?;
        let lan_gateway = Ipv4Addr::from(u32::from(lan_net) + 1);
        let ns = self
            .shared
            .add_namespace(&format!("nat{index}-{}", kind.label()))?;
        let port = self.shared.next_port()?;
        ns.set_sysctl("net.ipv4.ip_forward", "1")?;

        let wire = if conditions.needs_wire() {
            let w = self.shared.add_namespace(&format!("wire{index}"))?;
            for scope in ["all", "default"] {
                w.set_sysctl(&format!("net.ipv6.conf.{scope}.disable_ipv6"), "1")?;
            }
            Some(w)
        } else {
            None
        };

        let mut lines = vec!["link set lo up".to_owned()];
        match &wire {
            Some(w) => lines.push(format!(
                "link add {WAN_IF} type veth peer name wa netns {}",
                w.name()
            )),
            None => lines.push(format!(
                "link add {WAN_IF} type veth peer name {port} netns {}",
                self.internet.name()
            )),
        }
        lines.extend([
            format!("link add {LAN_IF} type bridge"),
            format!("link set {LAN_IF} up"),
            format!("addr add {lan_gateway}/{lan_prefix} dev {LAN_IF}"),
        ]);
        ip_batch(Some(ns.name()), &lines)?;
        if let Some(w) = &wire {
            ip_batch(
                Some(w.name()),
                &[
                    "link set lo up".into(),
                    format!(
                        "link add wb type veth peer name {port} netns {}",
                        self.internet.name()
                    ),
                    "link set wa up".into(),
                    "link set wb up".into(),
                ],
            )?;
        }
        let mut inet_lines = vec![
            format!("link set {port} master {BRIDGE}"),
            format!("link set {port} up"),
        ];
        if kind == NatKind::Public {
            inet_lines.push(format!("route add {lan_net}/{lan_prefix} via {wan_ip}"));
        }
        ip_batch(Some(self.internet.name()), &inet_lines)?;
        ip_batch(
            Some(ns.name()),
            &[
                format!("addr add {wan_ip}/24 dev {WAN_IF}"),
                format!("link set {WAN_IF} up"),
                format!("route add default via {CORE_A}"),
            ],
        )?;

        let mut rules = nat::router_ruleset(kind, wan_ip);
        if wire.is_none() && conditions.loss_percent > 0 {
            rules.push_str(&nat::loss_ruleset(conditions.loss_percent));
        }
        rules.push_str(&nat::egress_ruleset(conditions.egress));
        cmd::ns_exec(ns.name(), &["nft", "-f", "-"], Some(&rules))?;

        if let Some(rate) = conditions.rate_bps {
            // Burst: 20 ms worth of traffic, at least two full frames.
            let burst = (rate / 8 / 50).max(3028);
            for (space, dev) in [(ns.name(), WAN_IF), (self.internet.name(), port.as_str())] {
                cmd::run(
                    std::process::Command::new("tc").args([
                        "-n",
                        space,
                        "qdisc",
                        "add",
                        "dev",
                        dev,
                        "root",
                        "tbf",
                        "rate",
                        &format!("{rate}bit"),
                        "burst",
                        &burst.to_string(),
                        "latency",
                        TBF_LATENCY,
                    ]),
                    None,
                )?;
            }
        }

        if let Some(w) = &wire {
            let line = DelayLine::start(
                w,
                "wa",
                "wb",
                WireConfig {
                    delay: conditions.delay,
                    jitter: conditions.jitter,
                    loss_percent: conditions.loss_percent,
                    seed: conditions.seed,
                },
            )?;
            self.shared
                .state()?
                .wires
                .insert(ns.name().to_owned(), line);
        }

        let router = Router {
            ns,
            kind,
            wan_ip,
            lan_gateway,
            lan_prefix,
            conditions,
            shared: Arc::clone(&self.shared),
            v6: None,
        };
        self.shared.state()?.routers.push(router.clone());
        tracing::debug!(router = %router.ns.name(), %wan_ip, ?kind, "router ready");
        Ok(router)
    }

    fn claim_ip(&self, ip: Ipv4Addr) -> Result<()> {
        let mut st = self.shared.state()?;
        if ip == CORE_A || ip == CORE_B || !st.used_ips.insert(ip) {
            return Err(LabError::AddressInUse(ip));
        }
        Ok(())
    }

    fn claim_next_wan_ip(&self) -> Result<Ipv4Addr> {
        let mut st = self.shared.state()?;
        for d in 1..=253u8 {
            let ip = Ipv4Addr::new(203, 0, 113, d);
            if st.used_ips.insert(ip) {
                return Ok(ip);
            }
        }
        Err(LabError::PoolExhausted(
            "router WAN addresses in 203.0.113.0/24",
        ))
    }

    /// Create `ifname` in `ns` with its peer `port` on the internet bridge (both up, no address).
    fn attach_to_internet(&self, ns: &Netns, ifname: &str, port: &str) -> Result<()> {
        ip_batch(
            Some(ns.name()),
            &[
                "link set lo up".into(),
                format!(
                    "link add {ifname} type veth peer name {port} netns {}",
                    self.internet.name()
                ),
            ],
        )?;
        ip_batch(
            Some(self.internet.name()),
            &[
                format!("link set {port} master {BRIDGE}"),
                format!("link set {port} up"),
            ],
        )
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.shared.shutdown();
    }
}

/// A NAT (or plain) router: namespace with `wan0` on the internet and bridge `lan0` for its
/// LAN. Cheap to clone; derefs to its [`Netns`].
#[derive(Clone)]
pub struct Router {
    ns: Netns,
    kind: NatKind,
    wan_ip: Ipv4Addr,
    lan_gateway: Ipv4Addr,
    lan_prefix: u8,
    conditions: LinkConditions,
    shared: Arc<Shared>,
    /// Its IPv6 side, for a dual-stack router ([`Lab::add_nat_dual_stack`]).
    v6: Option<ipv6::RouterV6>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("ns", &self.ns.name())
            .field("kind", &self.kind)
            .field("wan_ip", &self.wan_ip)
            .finish()
    }
}

impl Deref for Router {
    type Target = Netns;
    fn deref(&self) -> &Netns {
        &self.ns
    }
}

impl Router {
    /// The router's behaviour.
    pub fn kind(&self) -> NatKind {
        self.kind
    }

    /// The router's address on the internet (what peers see for a NAT).
    pub fn wan_ip(&self) -> Ipv4Addr {
        self.wan_ip
    }

    /// The router's address on its LAN (hosts' default gateway).
    pub fn lan_gateway(&self) -> Ipv4Addr {
        self.lan_gateway
    }

    /// The conditions of the router's WAN link.
    pub fn conditions(&self) -> LinkConditions {
        self.conditions
    }

    /// The router's namespace.
    pub fn ns(&self) -> &Netns {
        &self.ns
    }

    /// Counters of the router's delay line, if its link has one.
    pub fn wire_stats(&self) -> Option<WireStats> {
        self.shared
            .state()
            .ok()?
            .wires
            .get(self.ns.name())
            .map(DelayLine::stats)
    }

    /// Add a host on this router's LAN (next free address; default route via the router).
    pub fn add_host(&self, name: &str) -> Result<Host> {
        self.shared.claim_host_name(name)?;
        let (ip, port) = {
            let mut st = self.shared.state()?;
            let n = st
                .hosts_behind
                .entry(self.ns.name().to_owned())
                .or_insert(0);
            *n += 1;
            let max_hosts = (1u32 << (32 - u32::from(self.lan_prefix))) - 3;
            if *n > max_hosts {
                return Err(LabError::PoolExhausted(
                    "host addresses on this router's LAN",
                ));
            }
            (
                Ipv4Addr::from(u32::from(self.lan_gateway) + *n),
                format!("h{n}"),
            )
        };
        let ns = self.shared.add_namespace(&format!("h-{name}"))?;
        ip_batch(
            Some(ns.name()),
            &[
                "link set lo up".into(),
                format!(
                    "link add eth0 type veth peer name {port} netns {}",
                    self.ns.name()
                ),
            ],
        )?;
        ip_batch(
            Some(self.ns.name()),
            &[
                format!("link set {port} master {LAN_IF}"),
                format!("link set {port} up"),
            ],
        )?;
        ip_batch(
            Some(ns.name()),
            &[
                format!("addr add {ip}/{} dev eth0", self.lan_prefix),
                "link set eth0 up".into(),
                format!("route add default via {}", self.lan_gateway),
            ],
        )?;
        let ip6 = match &self.v6 {
            Some(v6) => {
                Some(self.add_host_v6(&ns, v6, u32::from(ip) - u32::from(self.lan_gateway))?)
            }
            None => None,
        };
        Ok(Host {
            ns,
            name: name.to_owned(),
            ip,
            gateway: self.lan_gateway,
            behind: Some(self.kind),
            ip6,
        })
    }

    /// UDP datagrams this router has forwarded so far, `(inbound, outbound)` across its WAN,
    /// counted after its filter (dropped datagrams are not counted).
    pub fn udp_forwarded(&self) -> Result<(u64, u64)> {
        let read = |name: &str| -> Result<u64> {
            let out = self
                .ns
                .exec(&["nft", "list", "counter", "ip", "acct", name])?;
            nat::parse_counter_packets(&out).ok_or_else(|| LabError::Command {
                cmd: format!("nft list counter ip acct {name}"),
                status: "0".into(),
                stderr: format!("no packet count in: {out}"),
            })
        };
        Ok((read(nat::UDP_IN)?, read(nat::UDP_OUT)?))
    }

    /// Forget every NAT mapping and filter permission, as a NAT reboot or rebinding would:
    /// `conntrack -F` in the router plus flushing the `fullcone` map and `contacted` set.
    ///
    /// This also breaks TCP connections through the router (their translations are gone);
    /// see [`Router::flush_udp_nat`] for a UDP-only rebinding.
    pub fn flush_nat(&self) -> Result<()> {
        self.ns.flush_conntrack()?;
        self.flush_nat_sets()
    }

    /// Forget the UDP mappings and permissions only (`conntrack -D -p udp` plus the
    /// `fullcone` map and `contacted` set, which hold only UDP), as a NAT whose UDP timeout
    /// expired would: TCP connections through the router survive.
    pub fn flush_udp_nat(&self) -> Result<()> {
        match self.ns.exec(&["conntrack", "-D", "-p", "udp"]) {
            Ok(_) => {}
            // Exit status 1 with nothing (or "0 flow entries ...") on stderr: nothing to delete.
            Err(LabError::Command { stderr, .. })
                if stderr.trim().is_empty() || stderr.contains("0 flow entries") => {}
            Err(e) => return Err(e),
        }
        self.flush_nat_sets()
    }

    fn flush_nat_sets(&self) -> Result<()> {
        let mut script = String::new();
        if self.kind.has_fullcone_map() {
            script.push_str("flush map ip nat fullcone\n");
        }
        if self.kind == NatKind::AddressRestricted {
            script.push_str("flush set ip filter contacted\n");
        }
        if !script.is_empty() {
            cmd::ns_exec(self.ns.name(), &["nft", "-f", "-"], Some(&script))?;
        }
        Ok(())
    }
}

/// A host: a namespace with `eth0`, either on the internet or behind a router.
/// Cheap to clone; derefs to its [`Netns`].
#[derive(Clone)]
pub struct Host {
    ns: Netns,
    name: String,
    ip: Ipv4Addr,
    gateway: Ipv4Addr,
    behind: Option<NatKind>,
    /// Its global IPv6 address, on a dual-stack or IPv6-only host.
    ip6: Option<Ipv6Addr>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("name", &self.name)
            .field("ip", &self.ip)
            .field("behind", &self.behind)
            .field("ip6", &self.ip6)
            .finish()
    }
}

impl Deref for Host {
    type Target = Netns;
    fn deref(&self) -> &Netns {
        &self.ns
    }
}

impl Host {
    /// The host's own IPv4 address on `eth0` (`0.0.0.0` on an IPv6-only host).
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The host's short name as given to `add_public_host`/`add_host`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The host's default gateway.
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// The kind of router it sits behind, `None` when attached directly to the internet.
    pub fn behind(&self) -> Option<NatKind> {
        self.behind
    }

    /// The host's namespace.
    pub fn ns(&self) -> &Netns {
        &self.ns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_parses_only_our_family() {
        assert_eq!(owner_pid("pl123x0-inet"), Some(123));
        assert_eq!(owner_pid("pl9x12-h-alice"), Some(9));
        assert_eq!(owner_pid("plx0-inet"), None);
        assert_eq!(owner_pid("pl12-inet"), None);
        assert_eq!(owner_pid("pl12x-inet"), None);
        assert_eq!(owner_pid("plop"), None);
        assert_eq!(owner_pid("docker-pl1x1-"), None);
    }

    #[test]
    fn conditions_are_validated() {
        let bad = LinkConditions {
            loss_percent: 101,
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        let jitter = LinkConditions {
            delay: Duration::from_millis(5),
            jitter: Duration::from_millis(10),
            ..Default::default()
        };
        assert!(jitter.validate().is_err());
        assert!(LinkConditions::default().validate().is_ok());
    }
}
