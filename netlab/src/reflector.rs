//! A tiny UDP reflector (a STUN stand-in for lab tests): every datagram is answered with the
//! source address the reflector observed, so a host learns its mapped (server-reflexive)
//! address.
//!
//! Wire format: request = any payload up to [`MAX_NONCE`] bytes (the nonce); reply =
//! `MAPPED <ip>:<port> <nonce>`.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{LabError, Result};

/// Longest nonce the reflector echoes back.
pub const MAX_NONCE: usize = 64;
const TAG: &[u8] = b"MAPPED ";
/// How often the serving threads check for shutdown.
const STOP_POLL: Duration = Duration::from_millis(50);
/// Interval between retries of [`query_mapped`].
const RETRY: Duration = Duration::from_millis(100);

/// A running reflector: one thread per socket, stopped and joined on drop.
pub struct Reflector {
    addrs: Vec<SocketAddr>,
    stop: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Reflector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reflector")
            .field("addrs", &self.addrs)
            .finish()
    }
}

impl Reflector {
    /// Serve on `sockets` (typically made with [`crate::Netns::udp_socket`] on public hosts).
    pub fn start(sockets: Vec<UdpSocket>) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        let mut addrs = Vec::new();
        let mut threads = Vec::new();
        let io = |what: &str, source| LabError::Io {
            what: what.to_owned(),
            source,
        };
        for sock in sockets {
            let addr = sock
                .local_addr()
                .map_err(|e| io("reflector local_addr", e))?;
            sock.set_read_timeout(Some(STOP_POLL))
                .map_err(|e| io("reflector read timeout", e))?;
            addrs.push(addr);
            let (stop, served) = (Arc::clone(&stop), Arc::clone(&served));
            let t = std::thread::Builder::new()
                .name("netlab-reflect".into())
                .spawn(move || serve(&sock, &stop, &served))
                .map_err(|e| io("spawning reflector thread", e))?;
            threads.push(t);
        }
        Ok(Self {
            addrs,
            stop,
            served,
            threads,
        })
    }

    /// The addresses it serves on.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Requests answered so far (counted just before each answer is sent).
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

impl Drop for Reflector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn serve(sock: &UdpSocket, stop: &AtomicBool, served: &AtomicU64) {
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            continue;
        };
        let nonce = &buf[..n.min(MAX_NONCE)];
        let mut reply = Vec::with_capacity(TAG.len() + 32 + nonce.len());
        reply.extend_from_slice(TAG);
        reply.extend_from_slice(from.to_string().as_bytes());
        reply.push(b' ');
        reply.extend_from_slice(nonce);
        // Counted before sending, so a client that got its answer sees the count.
        served.fetch_add(1, Ordering::Relaxed);
        let _ = sock.send_to(&reply, from);
    }
}

/// Parse a reflector reply; `None` unless it is well-formed and carries `nonce`.
pub fn parse_reply(reply: &[u8], nonce: &[u8]) -> Option<SocketAddr> {
    let rest = reply.strip_prefix(TAG)?;
    let space = rest.iter().position(|&b| b == b' ')?;
    let (addr, tail) = rest.split_at(space);
    if tail.get(1..)? != nonce {
        return None;
    }
    std::str::from_utf8(addr).ok()?.parse().ok()
}

/// Ask the reflector at `reflector` which address `sock` is seen from, retrying every
/// 100 ms until `timeout`. Leaves `sock`'s read timeout as it found it.
pub fn query_mapped(
    sock: &UdpSocket,
    reflector: SocketAddr,
    timeout: Duration,
) -> Result<SocketAddr> {
    let io = |source| LabError::Io {
        what: "reflector query".to_owned(),
        source,
    };
    let previous = sock.read_timeout().map_err(io)?;
    let nonce = format!("q{:016x}", rand::random::<u64>());
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 256];
    let result = (|| {
        while Instant::now() < deadline {
            sock.send_to(nonce.as_bytes(), reflector).map_err(io)?;
            let attempt_end = (Instant::now() + RETRY).min(deadline);
            loop {
                let left = attempt_end.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                sock.set_read_timeout(Some(left)).map_err(io)?;
                match sock.recv_from(&mut buf) {
                    Ok((n, from)) if from == reflector => {
                        if let Some(mapped) = parse_reply(&buf[..n], nonce.as_bytes()) {
                            return Ok(mapped);
                        }
                    }
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        break;
                    }
                    Err(e) => return Err(io(e)),
                }
            }
        }
        Err(LabError::Reflector(format!(
            "no answer from {reflector} within {timeout:?}"
        )))
    })();
    sock.set_read_timeout(previous).map_err(io)?;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_parse_and_reject_garbage() {
        let ok = b"MAPPED 203.0.113.5:4000 abc";
        assert_eq!(
            parse_reply(ok, b"abc"),
            Some("203.0.113.5:4000".parse().unwrap())
        );
        assert_eq!(parse_reply(ok, b"abd"), None);
        for bad in [
            &b""[..],
            b"MAPPED",
            b"MAPPED ",
            b"MAPPED 1.2.3.4:5",
            b"MAPPED x abc",
            b"MAPPED \xff\xfe abc",
            b"HELLO 1.2.3.4:5 abc",
        ] {
            assert_eq!(parse_reply(bad, b"abc"), None, "{bad:?}");
        }
    }

    #[test]
    fn reflects_the_observed_source_on_loopback() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let reflector = Reflector::start(vec![server]).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mapped = query_mapped(&client, reflector.addrs()[0], Duration::from_secs(5)).unwrap();
        assert_eq!(mapped, client.local_addr().unwrap());
        assert!(reflector.served() >= 1);
    }
}
