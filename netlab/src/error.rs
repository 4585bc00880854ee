//! The lab's error type.

use std::net::Ipv4Addr;

/// Everything that can go wrong while building or driving a lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// The lab needs root (CAP_NET_ADMIN + CAP_SYS_ADMIN) to create namespaces.
    #[error("peerlink-netlab needs root (effective uid is {euid}); run the lab tests as root")]
    NotRoot {
        /// The effective uid we ran with.
        euid: u32,
    },
    /// A helper program (`ip`, `nft`, `tc`, `conntrack`) could not be started.
    #[error("could not start `{cmd}`: {source} (is it installed? scripts/setup.sh installs it)")]
    Spawn {
        /// The command line.
        cmd: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A helper program ran but failed.
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        cmd: String,
        /// Its exit status.
        status: String,
        /// What it wrote to stderr.
        stderr: String,
    },
    /// Entering a namespace (`setns`) failed.
    #[error("cannot enter network namespace {ns}: {source}")]
    Setns {
        /// Namespace name.
        ns: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// An I/O operation inside the lab failed.
    #[error("{what}: {source}")]
    Io {
        /// What we were doing.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The address is already used in this lab.
    #[error("address {0} is already used in this lab")]
    AddressInUse(Ipv4Addr),
    /// The address is not one a public host may use (see the address plan in the crate doc).
    #[error(
        "address {0} is not allowed for a public host: use 203.0.113.1-253 or 198.51.100.2-127"
    )]
    AddressNotAllowed(Ipv4Addr),
    /// An IPv6 address already taken in this lab.
    #[error("address {0} is already used in this lab")]
    Ipv6AddressInUse(std::net::Ipv6Addr),
    /// The IPv6 address is not one a public host may use (see the address plan).
    #[error(
        "address {0} is not allowed for a public host: use 2001:db8::2-2001:db8::ffff (2001:db8::/64)"
    )]
    Ipv6AddressNotAllowed(std::net::Ipv6Addr),
    /// An IPv6 part of the lab was asked for before [`crate::Lab::enable_ipv6`].
    #[error("IPv6 is off in this lab: call Lab::enable_ipv6 first")]
    Ipv6Off,
    /// An address pool of the lab ran out.
    #[error("address pool exhausted: {0}")]
    PoolExhausted(&'static str),
    /// The name is invalid or already used in this lab.
    #[error("invalid or duplicate name {0:?} (use 1-24 chars of [a-z0-9-], unique per lab)")]
    InvalidName(String),
    /// The link conditions are out of range.
    #[error("invalid link conditions: {0}")]
    InvalidConditions(String),
    /// The lab was already dropped.
    #[error("the lab was dropped")]
    Closed,
    /// A helper thread died without a result.
    #[error("helper thread for namespace {0} panicked")]
    ThreadPanicked(String),
    /// A reply could not be parsed or did not arrive.
    #[error("reflector: {0}")]
    Reflector(String),
}

/// Result alias for lab operations.
pub type Result<T, E = LabError> = std::result::Result<T, E>;
