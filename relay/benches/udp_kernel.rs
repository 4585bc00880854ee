//! What the kernel charges per datagram on the relay's listener, measured on this machine, to
//! ground two design decisions (README, "Relay against coturn"):
//!
//! 1. **Connected per-client sockets.** A UDP socket `connect`ed to its client sends without a
//!    route lookup per datagram. Linux >= 6.14 finds such sockets by a 4-tuple hash (hash4), so
//!    a server could give every client its own connected socket on the listening port. The
//!    catch: a datagram from a source with no connected socket (every Binding and Allocate
//!    from a new client) is still looked up by scanning every socket bound to that port.
//! 2. **What io_uring can save on one socket.** On the listener-only path both backends make
//!    the same kernel calls per datagram; io_uring saves only syscalls per wake-up, priced here.
//!
//! Everything runs on loopback in this one thread pinned to one CPU; CPU time is the thread's own
//! (`CLOCK_THREAD_CPUTIME_ID`). On loopback the sender's kernel also runs the receiver's socket
//! lookup and delivery, so the send figures include them. Ratios are against baselines from the
//! same run. `cargo bench -p peerlink-relay --bench udp_kernel [-- --sockets N]`.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;

use socket2::{Domain, Protocol, Socket, Type};

const PAYLOAD: [u8; 176] = [0; 176];
/// Destinations the sends rotate over (the benchmark's 200 allocations).
const DESTINATIONS: u16 = 200;
/// Datagrams per measured batch; the receivers are drained between batches.
const BATCH: usize = 20_000;
const REPEATS: usize = 5;

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn pin_to_cpu0() {
    use nix::sched::{CpuSet, sched_setaffinity};
    let mut set = CpuSet::new();
    if set.set(0).is_ok() {
        let _ = sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

/// Median of `REPEATS` runs of `batch`, in nanoseconds of CPU per call of `one`.
fn per_call(mut one: impl FnMut(usize), mut between: impl FnMut()) -> f64 {
    let mut runs: Vec<f64> = (0..REPEATS)
        .map(|_| {
            let t0 = thread_cpu_ns();
            for i in 0..BATCH {
                one(i);
            }
            let spent = thread_cpu_ns() - t0;
            between();
            spent as f64 / BATCH as f64
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[REPEATS / 2]
}

fn v4(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

/// A UDP socket on `addr` with SO_REUSEADDR (and SO_REUSEPORT when `reuseport`), non-blocking.
fn shared_port_socket(addr: SocketAddr, reuseport: bool) -> io::Result<UdpSocket> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    if reuseport {
        s.set_reuse_port(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s.into())
}

fn bound(addr: SocketAddr) -> io::Result<UdpSocket> {
    let s = UdpSocket::bind(addr)?;
    s.set_nonblocking(true)?;
    Ok(s)
}

/// Room for a whole batch in `s`'s receive queue (SO_RCVBUFFORCE: root; otherwise the datagrams
/// beyond the default buffer are dropped after the lookup, alike in every compared case).
fn roomy(s: &UdpSocket) {
    let bytes: libc::c_int = 64 << 20;
    // SAFETY: valid fd and option value of the declared size.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&bytes as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Raise the soft open-file limit to the hard one (thousands of sockets).
fn raise_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn drain(s: &UdpSocket) -> usize {
    let mut buf = [0u8; 512];
    let mut n = 0;
    while s.recv(&mut buf).is_ok() {
        n += 1;
    }
    n
}

/// Unconnected `sendto` over `DESTINATIONS` receivers against one connected socket per receiver.
fn sends() -> io::Result<(f64, f64)> {
    let lo = Ipv4Addr::LOCALHOST;
    let receivers: Vec<UdpSocket> = (0..DESTINATIONS)
        .map(|_| bound(v4(lo, 0)))
        .collect::<io::Result<_>>()?;
    let dests: Vec<SocketAddr> = receivers
        .iter()
        .map(|r| r.local_addr())
        .collect::<io::Result<_>>()?;
    let drain_all = || {
        for r in &receivers {
            drain(r);
        }
    };
    let unconnected = bound(v4(lo, 0))?;
    let connected: Vec<UdpSocket> = dests
        .iter()
        .map(|d| {
            let s = bound(v4(lo, 0))?;
            s.connect(d)?;
            Ok(s)
        })
        .collect::<io::Result<_>>()?;
    let n = dests.len();
    let sendto = per_call(
        |i| {
            let _ = unconnected.send_to(&PAYLOAD, dests[i % n]);
        },
        drain_all,
    );
    let send = per_call(
        |i| {
            let _ = connected[i % n].send(&PAYLOAD);
        },
        drain_all,
    );
    Ok((sendto, send))
}

/// Cost of a datagram to the listening port from a source without a connected socket (a new
/// client), then from a source with one, when `k` connected sockets share the listener's port.
fn lookups(k: usize) -> io::Result<(f64, f64)> {
    let lo = Ipv4Addr::LOCALHOST;
    let listener = shared_port_socket(v4(lo, 0), true)?;
    roomy(&listener);
    let port = listener.local_addr()?;
    // Clients on 127.0.2.x: one connected server-side socket each, like a per-client socket.
    let client_ip = |i: usize| Ipv4Addr::new(127, 0, 2 + (i / 50_000) as u8, 1);
    let client_port = |i: usize| 10_000 + (i % 50_000) as u16;
    let per_client: Vec<UdpSocket> = (0..k)
        .map(|i| {
            let s = shared_port_socket(port, false)?;
            s.connect(v4(client_ip(i), client_port(i)))?;
            Ok(s)
        })
        .collect::<io::Result<_>>()?;
    let stranger = bound(v4(Ipv4Addr::new(127, 0, 1, 1), 0))?;
    let unknown = per_call(
        |_| {
            let _ = stranger.send_to(&PAYLOAD, port);
        },
        || {
            drain(&listener);
        },
    );
    let known = match per_client.first() {
        Some(first) => {
            roomy(first);
            let client = bound(v4(client_ip(0), client_port(0)))?;
            per_call(
                |_| {
                    let _ = client.send_to(&PAYLOAD, port);
                },
                || {
                    drain(first);
                },
            )
        }
        None => unknown,
    };
    // Where the stranger's and the client's datagrams went: the listener and the client's own
    // socket respectively (checked so a misrouted run cannot print a figure).
    stranger.send_to(&PAYLOAD, port)?;
    std::thread::sleep(std::time::Duration::from_millis(5));
    if drain(&listener) != 1 {
        return Err(io::Error::other(
            "a stranger's datagram missed the listener",
        ));
    }
    Ok((unknown, known))
}

/// CPU per trivial syscall (`getppid`).
fn syscall() -> f64 {
    per_call(
        |_| {
            // SAFETY: getppid has no preconditions.
            std::hint::black_box(unsafe { libc::syscall(libc::SYS_getppid) });
        },
        || {},
    )
}

fn main() -> io::Result<()> {
    let mut most = 4096usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--sockets" {
            most = args.next().and_then(|v| v.parse().ok()).unwrap_or(most);
        }
    }
    pin_to_cpu0();
    raise_nofile();
    println!(
        "udp_kernel: 176-byte datagrams on loopback, CPU of this thread, median of {REPEATS} x {BATCH}"
    );

    let (sendto, send) = sends()?;
    println!(
        "send to {DESTINATIONS} clients: unconnected sendto {:.0} ns, connected send {:.0} ns per datagram: connected / unconnected = {:.2}",
        sendto,
        send,
        send / sendto
    );

    let (base, _) = lookups(0)?;
    println!("datagram from a new client, no connected sockets on the port: {base:.0} ns");
    for k in [256, 1024, most] {
        let (unknown, known) = lookups(k)?;
        println!(
            "  with {k:>6} connected sockets on the port: new client {unknown:>7.0} ns ({:.2}x; {:.1} ns per connected socket), known client {known:.0} ns",
            unknown / base,
            (unknown - base) / k as f64
        );
    }

    let sc = syscall();
    println!("one syscall (getppid): {sc:.0} ns");
    println!(
        "  a wake-up handling 15 datagrams (30k/s in 500 µs steps) and 6 syscalls fewer (io_uring vs epoll on one socket) saves {:.0} ns per datagram",
        6.0 * sc / 15.0
    );
    Ok(())
}
