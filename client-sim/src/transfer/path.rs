//! The abstract datagram path QUIC runs over, and its `quinn::AsyncUdpSocket` adapter.
//!
//! A [`DatagramPath`] is the QUIC side of a point-to-point datagram pipe: quinn writes
//! datagrams into its outgoing [`Pipe`], the call layer drains them (and wraps them with the
//! agent's `send()`), and the call layer pushes received QUIC datagrams (after the agent's
//! first-byte demux) into its incoming [`Pipe`]. Addresses are virtual: every datagram is
//! reported as coming from the fixed peer address, so a switch between the direct path and the
//! TURN relay is invisible to QUIC (no connection migration needed).

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

use crate::transfer::pacing::{Pacer, PacingRate};

/// Datagrams a [`Pipe`] buffers by default (about 2.4 MB of 1200-byte datagrams).
pub const DEFAULT_PIPE_CAPACITY: usize = 2048;

/// Virtual address of the QUIC client side of a path (never bound to a socket).
pub const VIRTUAL_CLIENT_ADDR: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 1));
/// Virtual address of the QUIC server side of a path (never bound to a socket).
pub const VIRTUAL_SERVER_ADDR: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 2));

/// Why a datagram could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// The pipe holds its capacity of datagrams already (the datagram is dropped, as UDP would).
    #[error("datagram pipe full")]
    Full,
    /// The pipe was closed.
    #[error("datagram pipe closed")]
    Closed,
}

struct PipeInner {
    /// Datagrams with the instant they were queued.
    items: VecDeque<(std::time::Instant, Vec<u8>)>,
    capacity: usize,
    closed: bool,
    recv_waker: Option<Waker>,
    send_wakers: Vec<Waker>,
}

/// A bounded, single-consumer queue of datagrams with async readiness (one direction).
#[derive(Clone)]
pub struct Pipe {
    inner: Arc<Mutex<PipeInner>>,
}

impl fmt::Debug for Pipe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.lock();
        f.debug_struct("Pipe")
            .field("queued", &inner.items.len())
            .field("capacity", &inner.capacity)
            .field("closed", &inner.closed)
            .finish()
    }
}

impl Pipe {
    /// Creates a pipe holding at most `capacity` datagrams (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(PipeInner {
                items: VecDeque::new(),
                capacity: capacity.max(1),
                closed: false,
                recv_waker: None,
                send_wakers: Vec::new(),
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, PipeInner> {
        // A poisoned lock only means another thread panicked while holding it; the queue
        // itself is always consistent (every critical section is a few non-panicking steps).
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues one datagram without waiting.
    pub fn try_push(&self, datagram: Vec<u8>) -> Result<(), PushError> {
        let waker = {
            let mut inner = self.lock();
            if inner.closed {
                return Err(PushError::Closed);
            }
            if inner.items.len() >= inner.capacity {
                return Err(PushError::Full);
            }
            inner.items.push_back((std::time::Instant::now(), datagram));
            inner.recv_waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }

    /// Takes the next datagram, or registers the task; `Ready(None)` once closed and empty.
    pub fn poll_pop(&self, cx: &mut Context<'_>) -> Poll<Option<Vec<u8>>> {
        self.poll_pop_timed(cx).map(|o| o.map(|(_, d)| d))
    }

    /// Like [`Pipe::poll_pop`], with the instant the datagram was queued (its send time).
    pub fn poll_pop_timed(
        &self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<(std::time::Instant, Vec<u8>)>> {
        let (item, wakers) = {
            let mut inner = self.lock();
            match inner.items.pop_front() {
                Some(item) => (Some(item), std::mem::take(&mut inner.send_wakers)),
                None if inner.closed => return Poll::Ready(None),
                None => {
                    inner.recv_waker = Some(cx.waker().clone());
                    return Poll::Pending;
                }
            }
        };
        for w in wakers {
            w.wake();
        }
        Poll::Ready(item)
    }

    /// Waits for the next datagram; `None` once the pipe is closed and drained.
    pub async fn pop(&self) -> Option<Vec<u8>> {
        std::future::poll_fn(|cx| self.poll_pop(cx)).await
    }

    /// Waits for the next datagram and the instant it was queued.
    pub async fn pop_timed(&self) -> Option<(std::time::Instant, Vec<u8>)> {
        std::future::poll_fn(|cx| self.poll_pop_timed(cx)).await
    }

    /// Ready when there is room for a datagram (or the pipe is closed).
    pub fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<Result<(), PushError>> {
        let mut inner = self.lock();
        if inner.closed {
            return Poll::Ready(Err(PushError::Closed));
        }
        if inner.items.len() < inner.capacity {
            return Poll::Ready(Ok(()));
        }
        if !inner.send_wakers.iter().any(|w| w.will_wake(cx.waker())) {
            inner.send_wakers.push(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Closes the pipe: pushes fail, the consumer drains what is queued and then sees `None`.
    pub fn close(&self) {
        let (recv, sends) = {
            let mut inner = self.lock();
            inner.closed = true;
            (
                inner.recv_waker.take(),
                std::mem::take(&mut inner.send_wakers),
            )
        };
        recv.into_iter().chain(sends).for_each(Waker::wake);
    }

    /// Whether [`Pipe::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Datagrams currently queued.
    pub fn len(&self) -> usize {
        self.lock().items.len()
    }

    /// Whether no datagram is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The QUIC side of a point-to-point datagram path (turned into a quinn socket by
/// [`crate::transfer::endpoint`]).
#[derive(Debug, Clone)]
pub struct DatagramPath {
    local: SocketAddr,
    peer: SocketAddr,
    /// Datagrams QUIC wants sent (drained by the call layer / link).
    outgoing: Pipe,
    /// Datagrams received for QUIC (pushed by the call layer / link).
    incoming: Pipe,
}

/// The call-layer side of a [`DatagramPath`]: drain [`PathHandle::outgoing`] into the agent's
/// `send()`, push demuxed QUIC payloads into [`PathHandle::incoming`].
#[derive(Debug, Clone)]
pub struct PathHandle {
    /// Datagrams to send to the peer (pop them).
    pub outgoing: Pipe,
    /// Datagrams received from the peer (push them; a full pipe drops, like UDP).
    pub incoming: Pipe,
}

impl PathHandle {
    /// Closes both directions (QUIC then sees a silent path and times out).
    pub fn close(&self) {
        self.outgoing.close();
        self.incoming.close();
    }
}

impl DatagramPath {
    /// A path with virtual addresses `local`/`peer`, and the handle the call layer drives it with.
    pub fn new(local: SocketAddr, peer: SocketAddr) -> (Self, PathHandle) {
        let outgoing = Pipe::new(DEFAULT_PIPE_CAPACITY);
        let incoming = Pipe::new(DEFAULT_PIPE_CAPACITY);
        let handle = PathHandle {
            outgoing: outgoing.clone(),
            incoming: incoming.clone(),
        };
        (
            Self {
                local,
                peer,
                outgoing,
                incoming,
            },
            handle,
        )
    }

    /// Two paths wired back to back in memory: (client side, server side), lossless and instant.
    pub fn pair() -> (Self, Self) {
        let a_to_b = Pipe::new(DEFAULT_PIPE_CAPACITY);
        let b_to_a = Pipe::new(DEFAULT_PIPE_CAPACITY);
        (
            Self {
                local: VIRTUAL_CLIENT_ADDR,
                peer: VIRTUAL_SERVER_ADDR,
                outgoing: a_to_b.clone(),
                incoming: b_to_a.clone(),
            },
            Self {
                local: VIRTUAL_SERVER_ADDR,
                peer: VIRTUAL_CLIENT_ADDR,
                outgoing: b_to_a,
                incoming: a_to_b,
            },
        )
    }

    /// Local virtual address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Peer virtual address (the address to connect to).
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// The call-layer handle of this path (another reference to the same pipes).
    pub fn handle(&self) -> PathHandle {
        PathHandle {
            outgoing: self.outgoing.clone(),
            incoming: self.incoming.clone(),
        }
    }
}

/// Pacing state shared by the socket and its pollers.
#[derive(Debug, Default)]
struct PaceState {
    rate: PacingRate,
    /// The pacer and, when it said "not yet", the instant it allows the next datagram.
    inner: Mutex<(Pacer, Option<std::time::Instant>)>,
}

impl PaceState {
    fn lock(&self) -> MutexGuard<'_, (Pacer, Option<std::time::Instant>)> {
        // Poisoning cannot leave the pacer inconsistent (plain numeric updates).
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `quinn::AsyncUdpSocket` over a [`DatagramPath`], optionally paced at a published rate.
#[derive(Debug)]
pub(crate) struct PathSocket {
    path: DatagramPath,
    pace: Arc<PaceState>,
}

impl PathSocket {
    /// A socket sending at most at `rate` (0 = unpaced, beyond quinn's own pacing).
    pub(crate) fn new(path: DatagramPath, rate: PacingRate) -> Self {
        Self {
            path,
            pace: Arc::new(PaceState {
                rate,
                inner: Mutex::new((Pacer::new(), None)),
            }),
        }
    }
}

struct PathPoller {
    outgoing: Pipe,
    pace: Arc<PaceState>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl fmt::Debug for PathPoller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PathPoller")
            .field("outgoing", &self.outgoing)
            .finish()
    }
}

impl UdpPoller for PathPoller {
    fn poll_writable(mut self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        let blocked_until = self.pace.lock().1;
        if let Some(until) = blocked_until
            && until > std::time::Instant::now()
        {
            let deadline = tokio::time::Instant::from_std(until);
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            if sleep.deadline() != deadline {
                sleep.as_mut().reset(deadline);
            }
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        // A closed pipe is "writable": sends then succeed and vanish, like a dead link.
        self.outgoing.poll_writable(cx).map(|_| Ok(()))
    }
}

impl AsyncUdpSocket for PathSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(PathPoller {
            outgoing: self.path.outgoing.clone(),
            pace: self.pace.clone(),
            sleep: None,
        })
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        if transmit.destination != self.path.peer {
            // Only the peer is reachable on a point-to-point path; drop like an unroutable packet.
            tracing::trace!(dest = %transmit.destination, "datagram for unknown address dropped");
            return Ok(());
        }
        {
            let rate = self.pace.rate.get();
            let mut pace = self.pace.lock();
            match pace
                .0
                .check(std::time::Instant::now(), transmit.contents.len(), rate)
            {
                Ok(()) => pace.1 = None,
                Err(at) => {
                    pace.1 = Some(at);
                    return Err(io::ErrorKind::WouldBlock.into());
                }
            }
        }
        let datagrams: Vec<&[u8]> = match transmit.segment_size {
            Some(seg) if seg > 0 => transmit.contents.chunks(seg).collect(),
            _ => vec![transmit.contents],
        };
        for d in datagrams {
            match self.path.outgoing.try_push(d.to_vec()) {
                Ok(()) | Err(PushError::Closed) => {}
                Err(PushError::Full) => return Err(io::ErrorKind::WouldBlock.into()),
            }
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut n = 0;
        while n < bufs.len().min(meta.len()) {
            match self.path.incoming.poll_pop(cx) {
                Poll::Ready(Some(d)) => {
                    let buf = &mut bufs[n];
                    if d.len() > buf.len() {
                        // Larger than any QUIC datagram we allow: drop it.
                        continue;
                    }
                    buf[..d.len()].copy_from_slice(&d);
                    meta[n] = RecvMeta {
                        addr: self.path.peer,
                        len: d.len(),
                        stride: d.len(),
                        ecn: None,
                        dst_ip: None,
                    };
                    n += 1;
                }
                // Closed: a silent path. Returning an error would stop quinn's endpoint driver.
                Poll::Ready(None) | Poll::Pending => break,
            }
        }
        if n > 0 {
            Poll::Ready(Ok(n))
        } else {
            Poll::Pending
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.path.local)
    }

    fn may_fragment(&self) -> bool {
        // Keep quinn's path MTU discovery off: the relay path is smaller than the direct one.
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    #[test]
    fn pipe_bounds_and_close() {
        let p = Pipe::new(2);
        let mut cx = Context::from_waker(Waker::noop());
        assert!(p.poll_pop(&mut cx).is_pending());
        p.try_push(vec![1]).expect("room");
        p.try_push(vec![2]).expect("room");
        assert_eq!(p.try_push(vec![3]), Err(PushError::Full));
        assert!(p.poll_writable(&mut cx).is_pending());
        assert_eq!(p.poll_pop(&mut cx), Poll::Ready(Some(vec![1])));
        assert!(p.poll_writable(&mut cx).is_ready());
        p.close();
        assert_eq!(p.try_push(vec![4]), Err(PushError::Closed));
        assert_eq!(
            p.poll_pop(&mut cx),
            Poll::Ready(Some(vec![2])),
            "drains after close"
        );
        assert_eq!(p.poll_pop(&mut cx), Poll::Ready(None));
    }

    #[test]
    fn pair_is_cross_wired() {
        let (a, b) = DatagramPath::pair();
        assert_eq!(a.peer_addr(), b.local_addr());
        a.handle().outgoing.try_push(vec![9]).expect("room");
        assert_eq!(b.handle().incoming.len(), 1);
    }
}
