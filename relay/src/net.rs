//! Socket plumbing shared by both backends: socket options, the relayed-port picker, sockaddr
//! encoding/decoding and control-message (cmsg) parsing. No protocol logic.
//!
//! Everything that parses kernel-written bytes (`parse_sockaddr`, `parse_cmsgs`) works on plain
//! byte slices with bounds checks, so it is unit-testable and never reads out of bounds.

use std::io;
use std::mem::size_of;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;

use rand::Rng;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Receive and send buffer size asked of the kernel for every UDP socket (bytes). Generous so
/// that a burst while a worker is busy does not overflow; the kernel caps it at `rmem_max` /
/// `wmem_max` (and doubles it for bookkeeping).
pub const SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// Random port attempts before the picker falls back to a linear scan of the range.
const RANDOM_PORT_ATTEMPTS: usize = 32;

/// Options every UDP socket of the relay gets: non-blocking, big buffers, kernel receive
/// timestamps (`SO_TIMESTAMPNS`) and receive-queue drop counts (`SO_RXQ_OVFL`).
fn configure(socket: &Socket) -> io::Result<()> {
    socket.set_nonblocking(true)?;
    // Best effort: a smaller buffer than asked is not an error (rmem_max caps it).
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    set_int_opt(socket, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1)?;
    // SO_RXQ_OVFL is optional (counts kernel receive-buffer drops); ignore if unsupported.
    let _ = set_int_opt(socket, libc::SOL_SOCKET, libc::SO_RXQ_OVFL, 1);
    Ok(())
}

fn set_int_opt(socket: &Socket, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: `value` is a valid c_int for the duration of the call and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn new_udp(addr: &SocketAddr) -> io::Result<Socket> {
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let socket = Socket::new(domain, Type::DGRAM.cloexec(), Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // One family per socket: v4 clients reach the v4 listener, never as mapped addresses.
        socket.set_only_v6(true)?;
    }
    Ok(socket)
}

/// Bind one worker's listener: `SO_REUSEPORT` so every worker binds the same address and the
/// kernel spreads clients across workers by 4-tuple hash.
pub fn bind_listener(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = new_udp(&addr)?;
    socket.set_reuse_port(true)?;
    configure(&socket)?;
    socket.bind(&SockAddr::from(addr))?;
    Ok(socket.into())
}

/// Bind a relayed socket on `ip` with a port from `range` (random with retry, then a linear scan
/// from a random start), `SO_REUSEADDR` off. `even` restricts to even ports (EVEN-PORT).
/// Returns `Ok(None)` when every port of the range is taken.
pub fn bind_relayed<R: Rng>(
    ip: IpAddr,
    range: std::ops::RangeInclusive<u16>,
    even: bool,
    rng: &mut R,
) -> io::Result<Option<(UdpSocket, SocketAddr)>> {
    let (lo, hi) = (*range.start(), *range.end());
    if lo > hi {
        return Ok(None);
    }
    let span = u32::from(hi) - u32::from(lo) + 1;
    let try_port = |port: u16| -> io::Result<Option<(UdpSocket, SocketAddr)>> {
        if even && !port.is_multiple_of(2) {
            return Ok(None);
        }
        try_bind(SocketAddr::new(ip, port))
    };
    for _ in 0..RANDOM_PORT_ATTEMPTS {
        let mut port = lo + rng.random_range(0..span) as u16;
        if even && !port.is_multiple_of(2) {
            port = if port > lo {
                port - 1
            } else {
                port.saturating_add(1)
            };
            if port > hi {
                continue;
            }
        }
        if let Some(found) = try_port(port)? {
            return Ok(Some(found));
        }
    }
    let start = rng.random_range(0..span);
    for i in 0..span {
        let port = lo + ((start + i) % span) as u16;
        if let Some(found) = try_port(port)? {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

/// Bind two relayed sockets on `ip` at an even port `P` and at `P + 1`, both within `range`
/// (EVEN-PORT with the R bit: `P + 1` is held for a later RESERVATION-TOKEN). Candidates are
/// tried like [`bind_relayed`] does (random even ports, then a scan); `Ok(None)` when no such
/// pair is free.
pub fn bind_relayed_pair<R: Rng>(
    ip: IpAddr,
    range: std::ops::RangeInclusive<u16>,
    rng: &mut R,
) -> io::Result<Option<RelayedPair>> {
    let (lo, hi) = (*range.start(), *range.end());
    if lo >= hi {
        return Ok(None);
    }
    // Even ports P with P + 1 still in range.
    let first = lo + lo % 2;
    if first >= hi {
        return Ok(None);
    }
    let pairs = u32::from(hi - first).div_ceil(2).max(1);
    let try_pair = |port: u16| -> io::Result<Option<RelayedPair>> {
        let Some(odd) = port.checked_add(1).filter(|p| *p <= hi) else {
            return Ok(None);
        };
        let Some((even_sock, even_addr)) = try_bind(SocketAddr::new(ip, port))? else {
            return Ok(None);
        };
        let Some((odd_sock, odd_addr)) = try_bind(SocketAddr::new(ip, odd))? else {
            return Ok(None);
        };
        Ok(Some(RelayedPair {
            even: (even_sock, even_addr),
            next: (odd_sock, odd_addr),
        }))
    };
    for _ in 0..RANDOM_PORT_ATTEMPTS {
        let port = first + 2 * rng.random_range(0..pairs) as u16;
        if let Some(found) = try_pair(port)? {
            return Ok(Some(found));
        }
    }
    let start = rng.random_range(0..pairs);
    for i in 0..pairs {
        let port = first + 2 * ((start + i) % pairs) as u16;
        if let Some(found) = try_pair(port)? {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

/// The two sockets of [`bind_relayed_pair`].
#[derive(Debug)]
pub struct RelayedPair {
    /// The even port, for the allocation being made.
    pub even: (UdpSocket, SocketAddr),
    /// The next port, to be reserved.
    pub next: (UdpSocket, SocketAddr),
}

/// Bind a configured relayed socket on `addr`; `Ok(None)` when the port is in use.
fn try_bind(addr: SocketAddr) -> io::Result<Option<(UdpSocket, SocketAddr)>> {
    let socket = new_udp(&addr)?;
    configure(&socket)?;
    match socket.bind(&SockAddr::from(addr)) {
        Ok(()) => Ok(Some((socket.into(), addr))),
        Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Set the DF bit on everything `sock` sends (`IP_MTU_DISCOVER` = `IP_PMTUDISC_DO`, or the
/// IPv6 equivalent), for allocations that asked for DONT-FRAGMENT.
pub fn set_dont_fragment(sock: &UdpSocket) -> io::Result<()> {
    let v6 = sock.local_addr()?.is_ipv6();
    let (level, name, value) = if v6 {
        (
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_DO,
        )
    } else {
        (
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DO,
        )
    };
    // SAFETY: `value` is a valid c_int for the call; the fd is open for the borrow's duration.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A socket address in the C layout the kernel takes for `sendmsg`, with its length.
#[derive(Clone, Copy)]
pub struct RawAddr {
    /// Storage big enough for `sockaddr_in6`.
    pub storage: libc::sockaddr_in6,
    /// Bytes of `storage` in use.
    pub len: libc::socklen_t,
}

impl RawAddr {
    /// An all-zero address (placeholder).
    pub fn zeroed() -> Self {
        // SAFETY: sockaddr_in6 is plain old data; all-zero is a valid value.
        Self {
            storage: unsafe { std::mem::zeroed() },
            len: 0,
        }
    }

    /// Encode `addr` in place (no allocation).
    pub fn set(&mut self, addr: SocketAddr) {
        match addr {
            SocketAddr::V4(v4) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: v4.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(v4.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_in (16 bytes) fits in sockaddr_in6 (28 bytes); both are POD
                // and the destination is properly aligned for the (smaller-aligned) source.
                unsafe {
                    std::ptr::write((&mut self.storage as *mut libc::sockaddr_in6).cast(), sin);
                }
                self.len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            }
            SocketAddr::V6(v6) => {
                self.storage = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: v6.port().to_be(),
                    sin6_flowinfo: v6.flowinfo(),
                    sin6_addr: libc::in6_addr {
                        s6_addr: v6.ip().octets(),
                    },
                    sin6_scope_id: v6.scope_id(),
                };
                self.len = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            }
        }
    }

    /// Pointer for `msg_name`.
    pub fn as_ptr(&self) -> *const libc::c_void {
        (&self.storage as *const libc::sockaddr_in6).cast()
    }
}

/// Bytes reserved for a source address in receive headers (`sockaddr_in6`).
pub const SOCKADDR_SPACE: usize = size_of::<libc::sockaddr_in6>();

/// Decode a kernel-written `sockaddr_in`/`sockaddr_in6`; `None` for anything else or too short.
pub fn parse_sockaddr(name: &[u8]) -> Option<SocketAddr> {
    let family = u16::from_ne_bytes([*name.first()?, *name.get(1)?]);
    let port = u16::from_be_bytes([*name.get(2)?, *name.get(3)?]);
    if i32::from(family) == libc::AF_INET {
        let ip: [u8; 4] = name.get(4..8)?.try_into().ok()?;
        Some(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port)))
    } else if i32::from(family) == libc::AF_INET6 {
        let flow = u32::from_ne_bytes(name.get(4..8)?.try_into().ok()?);
        let ip: [u8; 16] = name.get(8..24)?.try_into().ok()?;
        let scope = u32::from_ne_bytes(name.get(24..28)?.try_into().ok()?);
        Some(SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(ip),
            port,
            flow,
            scope,
        )))
    } else {
        None
    }
}

/// Ancillary data the relay asks for on every receive.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RxMeta {
    /// Kernel receive timestamp (CLOCK_REALTIME) in nanoseconds since the epoch.
    pub rx_time_ns: Option<u64>,
    /// `SO_RXQ_OVFL`: cumulative count of datagrams the kernel dropped on this socket.
    pub rxq_ovfl: Option<u32>,
}

const CMSG_ALIGN: usize = size_of::<usize>();

const fn cmsg_align(len: usize) -> usize {
    (len + CMSG_ALIGN - 1) & !(CMSG_ALIGN - 1)
}

/// Size of a `cmsghdr` (len: usize, level: i32, type: i32) on this platform.
const CMSG_HDR: usize = cmsg_align(size_of::<usize>() + 2 * size_of::<i32>());

/// `CMSG_SPACE(n)`: bytes a control message with `n` data bytes occupies.
pub const fn cmsg_space(n: usize) -> usize {
    CMSG_HDR + cmsg_align(n)
}

/// Control-area bytes the relay's two control messages need: `SCM_TIMESTAMPNS` (a 16-byte
/// timespec) and `SO_RXQ_OVFL` (a u32).
pub const CONTROL_NEEDED: usize = cmsg_space(16) + cmsg_space(4);

/// Parse the control area the kernel filled (`msg_control[..msg_controllen]`). Unknown messages
/// are skipped; a malformed length ends the walk (never reads out of bounds).
pub fn parse_cmsgs(control: &[u8]) -> RxMeta {
    let mut meta = RxMeta::default();
    let mut off = 0usize;
    while off + CMSG_HDR <= control.len() {
        let Some(len_bytes) = control.get(off..off + size_of::<usize>()) else {
            break;
        };
        let Ok(len_arr) = len_bytes.try_into() else {
            break;
        };
        let cmsg_len = usize::from_ne_bytes(len_arr);
        let level = read_i32(control, off + size_of::<usize>());
        let kind = read_i32(control, off + size_of::<usize>() + 4);
        let (Some(level), Some(kind)) = (level, kind) else {
            break;
        };
        if cmsg_len < CMSG_HDR || off + cmsg_len > control.len() {
            break;
        }
        let data = &control[off + CMSG_HDR..off + cmsg_len];
        if level == libc::SOL_SOCKET && kind == libc::SCM_TIMESTAMPNS && data.len() >= 16 {
            let sec = i64::from_ne_bytes(data[0..8].try_into().unwrap_or([0; 8]));
            let nsec = i64::from_ne_bytes(data[8..16].try_into().unwrap_or([0; 8]));
            if sec >= 0 && (0..1_000_000_000).contains(&nsec) {
                meta.rx_time_ns = Some(sec as u64 * 1_000_000_000 + nsec as u64);
            }
        } else if level == libc::SOL_SOCKET && kind == libc::SO_RXQ_OVFL && data.len() >= 4 {
            meta.rxq_ovfl = Some(u32::from_ne_bytes(data[0..4].try_into().unwrap_or([0; 4])));
        }
        off += cmsg_align(cmsg_len);
    }
    meta
}

fn read_i32(buf: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_ne_bytes(buf.get(at..at + 4)?.try_into().ok()?))
}

/// CLOCK_REALTIME now, in nanoseconds since the epoch (the clock kernel timestamps use).
pub fn realtime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer for clock_gettime.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    (ts.tv_sec.max(0) as u64) * 1_000_000_000 + ts.tv_nsec.max(0) as u64
}

/// The process's RLIMIT_NOFILE soft limit (`None` if it cannot be read): the highest fd + 1
/// a socket can get, and the kernel's cap on an io_uring ring's registered file table.
pub fn nofile_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid out pointer for the call.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0).then_some(lim.rlim_cur)
}

/// Synchronous non-blocking `sendto` (used for core replies written in the scratch buffer).
pub fn send_to(fd: i32, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
    let mut raw = RawAddr::zeroed();
    raw.set(to);
    // SAFETY: `buf` is valid for `buf.len()` bytes and `raw` holds a valid sockaddr of `raw.len`.
    let rc = unsafe {
        libc::sendto(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
            raw.as_ptr().cast(),
            raw.len,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmsg(level: i32, kind: i32, data: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; cmsg_space(data.len())];
        let len = CMSG_HDR + data.len();
        out[..8].copy_from_slice(&len.to_ne_bytes());
        out[8..12].copy_from_slice(&level.to_ne_bytes());
        out[12..16].copy_from_slice(&kind.to_ne_bytes());
        out[CMSG_HDR..CMSG_HDR + data.len()].copy_from_slice(data);
        out
    }

    fn timespec(sec: i64, nsec: i64) -> Vec<u8> {
        let mut v = sec.to_ne_bytes().to_vec();
        v.extend_from_slice(&nsec.to_ne_bytes());
        v
    }

    #[test]
    fn parses_timestamp_and_overflow_counter() {
        let mut control = cmsg(libc::SOL_SOCKET, libc::SCM_TIMESTAMPNS, &timespec(12, 345));
        control.extend(cmsg(
            libc::SOL_SOCKET,
            libc::SO_RXQ_OVFL,
            &7u32.to_ne_bytes(),
        ));
        assert_eq!(control.len(), CONTROL_NEEDED);
        let meta = parse_cmsgs(&control);
        assert_eq!(meta.rx_time_ns, Some(12_000_000_345));
        assert_eq!(meta.rxq_ovfl, Some(7));
    }

    #[test]
    fn skips_unknown_and_stops_at_bad_lengths() {
        let mut control = cmsg(libc::IPPROTO_IP, libc::IP_TTL, &64i32.to_ne_bytes());
        control.extend(cmsg(
            libc::SOL_SOCKET,
            libc::SO_RXQ_OVFL,
            &3u32.to_ne_bytes(),
        ));
        assert_eq!(parse_cmsgs(&control).rxq_ovfl, Some(3));
        // Length running past the end: the walk stops, nothing is read.
        let mut bad = cmsg(libc::SOL_SOCKET, libc::SCM_TIMESTAMPNS, &timespec(1, 1));
        bad[..8].copy_from_slice(&1000usize.to_ne_bytes());
        assert_eq!(parse_cmsgs(&bad), RxMeta::default());
        // Length shorter than a header: stop, no infinite loop.
        let mut zero = cmsg(libc::SOL_SOCKET, libc::SCM_TIMESTAMPNS, &timespec(1, 1));
        zero[..8].copy_from_slice(&0usize.to_ne_bytes());
        assert_eq!(parse_cmsgs(&zero), RxMeta::default());
        // Truncated buffers of every length never panic.
        let good = cmsg(libc::SOL_SOCKET, libc::SCM_TIMESTAMPNS, &timespec(5, 6));
        for n in 0..good.len() {
            assert_eq!(parse_cmsgs(&good[..n]).rx_time_ns, None);
        }
        assert_eq!(parse_cmsgs(&good).rx_time_ns, Some(5_000_000_006));
        // Nonsense nanoseconds are ignored.
        let weird = cmsg(
            libc::SOL_SOCKET,
            libc::SCM_TIMESTAMPNS,
            &timespec(5, 2_000_000_000),
        );
        assert_eq!(parse_cmsgs(&weird).rx_time_ns, None);
    }

    #[test]
    fn sockaddr_round_trip() {
        for addr in ["127.0.0.1:3478", "[::1]:49152", "[fe80::1%2]:9"] {
            let addr: SocketAddr = addr.parse().unwrap();
            let mut raw = RawAddr::zeroed();
            raw.set(addr);
            // SAFETY (test): reading the initialised prefix of a POD struct as bytes.
            let bytes =
                unsafe { std::slice::from_raw_parts(raw.as_ptr().cast::<u8>(), raw.len as usize) };
            assert_eq!(parse_sockaddr(bytes), Some(addr));
            // Shorter than the fields that matter (v4: family+port+addr = 8; v6: all 28).
            let needed = if addr.is_ipv4() { 8 } else { 28 };
            for n in 0..needed {
                assert_eq!(parse_sockaddr(&bytes[..n]), None, "{addr} cut at {n}");
            }
        }
        assert_eq!(parse_sockaddr(&[]), None);
        assert_eq!(parse_sockaddr(&[0u8; 28]), None);
    }

    #[test]
    fn relayed_port_picker_honours_range_parity_and_exhaustion() {
        let mut rng = rand::rng();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
        let base = probe.local_addr().unwrap().port();
        drop(probe);
        // A range of one port: first bind takes it, second finds none.
        let (sock, addr) = bind_relayed(ip, base..=base, false, &mut rng)
            .unwrap()
            .unwrap();
        assert_eq!(addr.port(), base);
        assert!(
            bind_relayed(ip, base..=base, false, &mut rng)
                .unwrap()
                .is_none()
        );
        drop(sock);
        let lo = base & !1;
        if let Some((_s, addr)) =
            bind_relayed(ip, lo..=lo.saturating_add(9), true, &mut rng).unwrap()
        {
            assert_eq!(addr.port() % 2, 0);
            assert!((lo..=lo + 9).contains(&addr.port()));
        }
    }
}
