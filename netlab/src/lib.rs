//! peerlink-netlab: real NATs on one machine, for tests.
//!
//! A [`Lab`] builds network namespaces joined by veth pairs: an "internet" namespace with a
//! bridge, public hosts on it, and routers of the five RFC 4787 kinds ([`NatKind`]) whose
//! NAT and filtering are nftables rules (see [`NatKind`] for each recipe), each with hosts on its own
//! LAN. Tests then own sockets, threads and processes inside any of those namespaces from
//! one test process. Per-link conditions ([`LinkConditions`]) add loss (nftables),
//! rate (`tbf`) and delay/jitter (a user-space delay line, since this kernel has no `netem`);
//! routers can forget their mappings ([`Router::flush_nat`]) to simulate NAT rebinding, and
//! count the UDP datagrams they forward ([`Router::udp_forwarded`]) so tests can see traffic flow.
//!
//! What it is not: a network emulator for timing-sensitive logic (use the deterministic
//! in-process harness for that), nor portable — it needs Linux, root, `ip`, `nft`, `tc`
//! and `conntrack`.
//!
//! # Address plan
//! - internet: 203.0.113.0/24 and 198.51.100.0/24 only (documentation ranges); the internet
//!   core (the bridge itself, forwarding between the two ranges) is 203.0.113.254 and
//!   198.51.100.1; routers' WAN addresses are allocated from 203.0.113.1 upwards; public
//!   hosts may use 203.0.113.1-253 and 198.51.100.2-127.
//! - NAT LANs: a /24 each out of 100.64.0.0/10 (router `.1`, hosts from `.2`).
//! - IPv6, opt-in ([`Lab::enable_ipv6`]): the internet is `2001:db8::/64` with the core at
//!   [`CORE6`] (`2001:db8::1`); public hosts may use `2001:db8::2`-`::ffff`
//!   ([`Lab::add_public_host_v6`], dual stack or IPv6-only); a dual-stack router
//!   ([`Lab::add_nat_dual_stack`]) `n` has WAN `2001:db8::1:n` and routes `2001:db8:n::/64` to
//!   its LAN untranslated and unfiltered (no NAT66) while its IPv4 side NATs.
//! - [`NatKind::Public`] routers do not translate: their LAN is a /28 out of
//!   198.51.100.128/25 routed by the core, so hosts behind them have public addresses.
//!
//! Nothing is routed to the machine's real interfaces: the lab namespaces have no path out
//! of the lab, and nothing is created in the caller's own namespace.
//!
//! # Cleanup
//! Namespace names carry a per-run prefix `pl<pid>x<n>-`. Dropping the [`Lab`] (also while
//! unwinding from a panic) kills the children it started, stops its delay lines and
//! deletes all its namespaces, which takes their veths, bridges and rules with them.
//! [`Lab::new`] first sweeps namespaces of the same prefix family whose pid is dead
//! ([`sweep_stale`]). A socket still open after the drop keeps its (now unnamed) namespace
//! alive until it is closed.
//!
//! # Example
//! ```no_run
//! use std::time::Duration;
//! use peerlink_netlab::{Lab, LinkConditions, NatKind, Reflector, query_mapped};
//!
//! # fn main() -> Result<(), peerlink_netlab::LabError> {
//! let lab = Lab::new()?; // needs root
//! let server = lab.add_public_host("server", "203.0.113.200".parse().unwrap())?;
//! let reflector = Reflector::start(vec![server.udp_socket("0.0.0.0:3478".parse().unwrap())?])?;
//!
//! let slow = LinkConditions {
//!     delay: Duration::from_millis(20),
//!     jitter: Duration::from_millis(2),
//!     loss_percent: 1,
//!     ..Default::default()
//! };
//! let router = lab.add_nat_with(NatKind::PortRestricted, slow)?;
//! let alice = router.add_host("alice")?;
//!
//! // A socket inside alice's namespace, owned by this (test) thread.
//! let sock = alice.udp_socket("0.0.0.0:0".parse().unwrap())?;
//! let mapped = query_mapped(&sock, reflector.addrs()[0], Duration::from_secs(5))?;
//! assert_eq!(mapped.ip(), router.wan_ip());
//!
//! // A whole client on a thread inside the namespace (a tokio runtime built there keeps
//! // its worker threads there too).
//! let ip = alice.run(|| std::net::UdpSocket::bind("0.0.0.0:0").map(|s| s.local_addr()))?;
//! # let _ = ip;
//! router.flush_nat()?; // NAT rebinding
//! # Ok(()) }
//! // Dropping `lab` removes everything.
//! ```

mod cmd;
mod error;
mod lab;
mod nat;
mod ns;
mod reflector;
mod root;
mod wire;

pub use error::{LabError, Result};
pub use lab::{CORE_A, CORE_B, Host, Lab, LinkConditions, Router, sweep_stale};
pub use nat::{Egress, ExpectedPath, LAN_IF, MAPPING_TIMEOUT_SECS, NatKind, WAN_IF, expected_path};
pub use ns::{Netns, NsChild, NsJoinHandle};
pub use reflector::{MAX_NONCE, Reflector, parse_reply, query_mapped};
pub use root::root_or_skip;
pub use wire::WireStats;
// IPv6 (`lab::ipv6`).
pub use lab::{CORE6, INTERNET6_PREFIX};
