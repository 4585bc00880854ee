//! TURN over a real UDP socket: drives the sans-IO [`TurnClient`] with a tokio socket
//! (allocate, permission + channel, data, deallocate), and a media exchange between two
//! allocations on the same relay (Opus + AES-GCM [`MediaSession`]s, 20 ms pacing, everything
//! through the relay as ChannelData).
//!
//! What it is not: ICE. The relay path here is fixed (each side sends to the other's relayed
//! address); the connectivity agent chooses paths in a real call.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;

use crate::media::{FRAME, FRAME_SAMPLES, MediaSession};
use crate::turn::{Event, Input, TurnClient, TurnConfig};

/// Failures of the TURN path.
#[derive(Debug, thiserror::Error)]
pub enum TurnPathError {
    /// Socket failure.
    #[error("UDP socket: {0}")]
    Io(#[from] std::io::Error),
    /// The TURN client refused an operation.
    #[error("TURN: {0}")]
    Turn(#[from] crate::turn::TurnError),
    /// The server answered with a failure event.
    #[error("TURN {0}")]
    Failed(String),
    /// A bounded wait ran out.
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, &'static str),
    /// The media pipeline failed.
    #[error("media: {0}")]
    Media(#[from] crate::media::MediaError),
}

/// One TURN allocation driven over its own UDP socket.
pub struct TurnEndpoint {
    sock: UdpSocket,
    client: TurnClient,
    buf: Vec<u8>,
    out: Vec<u8>,
}

impl std::fmt::Debug for TurnEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TurnEndpoint")
            .field("local", &self.sock.local_addr().ok())
            .field("state", &self.client.state())
            .finish()
    }
}

/// What an allocation gave us.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Allocation {
    /// Our UDP socket.
    pub local: SocketAddr,
    /// Relayed transport address.
    pub relayed: SocketAddr,
    /// Our address as the relay saw it.
    pub mapped: Option<SocketAddr>,
    /// Granted lifetime, seconds.
    pub lifetime_s: u64,
    /// Allocate request -> success (including the 401 challenge round trip), ms.
    pub took_ms: f64,
}

impl TurnEndpoint {
    /// Bind a UDP socket on loopback of the server's family.
    pub async fn bind(config: TurnConfig) -> Result<Self, TurnPathError> {
        let local: SocketAddr = if config.server.is_ipv4() {
            SocketAddr::from(([127, 0, 0, 1], 0))
        } else {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 0))
        };
        let sock = UdpSocket::bind(local).await?;
        Ok(Self {
            sock,
            client: TurnClient::new(config),
            buf: vec![0u8; 65536],
            out: vec![0u8; 2048],
        })
    }

    /// The local socket address.
    pub fn local_addr(&self) -> Result<SocketAddr, TurnPathError> {
        Ok(self.sock.local_addr()?)
    }

    /// The TURN client.
    pub fn client(&self) -> &TurnClient {
        &self.client
    }

    async fn flush(&mut self) -> Result<(), TurnPathError> {
        while let Some(t) = self.client.poll_transmit() {
            self.sock.send_to(&t.payload, t.destination).await?;
        }
        Ok(())
    }

    /// Run the client (socket input, timers) until an event matches `pred`; a failure event
    /// or the timeout ends the wait with an error. Data arriving meanwhile is dropped.
    async fn drive_until(
        &mut self,
        timeout: Duration,
        what: &'static str,
        mut pred: impl FnMut(&Event) -> bool,
    ) -> Result<Event, TurnPathError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            self.flush().await?;
            while let Some(ev) = self.client.poll_event() {
                if pred(&ev) {
                    return Ok(ev);
                }
                match ev {
                    Event::AllocationFailed(e) | Event::AllocationLost(e) => {
                        return Err(TurnPathError::Failed(e.to_string()));
                    }
                    Event::PermissionFailed { error, .. }
                    | Event::ChannelBindFailed { error, .. } => {
                        return Err(TurnPathError::Failed(error.to_string()));
                    }
                    _ => {}
                }
            }
            let wake = self
                .client
                .poll_timeout()
                .map(tokio::time::Instant::from_std)
                .unwrap_or(deadline)
                .min(deadline);
            tokio::select! {
                r = self.sock.recv_from(&mut self.buf) => {
                    let (n, from) = r?;
                    // Bad or foreign input is ignored (typed error, no state change).
                    let _ = self.client.handle_input(Instant::now(), from, &self.buf[..n]);
                }
                _ = tokio::time::sleep_until(wake) => {
                    self.client.handle_timeout(Instant::now());
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(TurnPathError::Timeout(timeout, what));
            }
        }
    }

    /// Allocate (bounded by `timeout`).
    pub async fn allocate(&mut self, timeout: Duration) -> Result<Allocation, TurnPathError> {
        let t0 = Instant::now();
        self.client.allocate(t0)?;
        let ev = self
            .drive_until(timeout, "Allocate", |e| {
                matches!(e, Event::Allocated { .. })
            })
            .await?;
        match ev {
            Event::Allocated {
                relayed,
                mapped,
                lifetime,
            } => Ok(Allocation {
                local: self.local_addr()?,
                relayed,
                mapped,
                lifetime_s: lifetime.as_secs(),
                took_ms: t0.elapsed().as_secs_f64() * 1e3,
            }),
            other => Err(TurnPathError::Failed(format!("unexpected {other:?}"))),
        }
    }

    /// Install a permission for `peer` and bind a channel to it (bounded by `timeout`).
    pub async fn open_channel(
        &mut self,
        peer: SocketAddr,
        timeout: Duration,
    ) -> Result<u16, TurnPathError> {
        let now = Instant::now();
        self.client.create_permission(now, peer.ip())?;
        self.drive_until(timeout, "CreatePermission", |e| {
            matches!(e, Event::PermissionCreated { .. })
        })
        .await?;
        let ch = self.client.bind_channel(Instant::now(), peer)?;
        self.drive_until(
            timeout,
            "ChannelBind",
            |e| matches!(e, Event::ChannelBound { peer: p, .. } if *p == peer),
        )
        .await?;
        Ok(ch)
    }

    /// Release the allocation (bounded; a lost answer is not an error worth failing on).
    pub async fn deallocate(&mut self, timeout: Duration) -> Result<(), TurnPathError> {
        self.client.deallocate(Instant::now())?;
        self.drive_until(timeout, "deallocate", |e| matches!(e, Event::Deallocated))
            .await?;
        Ok(())
    }

    /// Send `data` to `peer` through the relay (ChannelData when bound).
    pub async fn send_to_peer(
        &mut self,
        peer: SocketAddr,
        data: &[u8],
    ) -> Result<(), TurnPathError> {
        if self.out.len() < data.len() + 64 {
            self.out.resize(data.len() + 64, 0);
        }
        let n = self.client.encode_data(peer, data, &mut self.out)?;
        let server = self.client.config().server;
        self.sock.send_to(&self.out[..n], server).await?;
        Ok(())
    }
}

/// One side of the relayed media exchange.
pub struct MediaSide<'a> {
    /// Its TURN endpoint.
    pub endpoint: &'a mut TurnEndpoint,
    /// Its media session.
    pub session: MediaSession,
    /// The peer's relayed address (where to send).
    pub peer: SocketAddr,
    /// PCM to send (48 kHz mono); sent frame by frame, zero-padded at the end.
    pub input: &'a [i16],
    /// What was played out (48 kHz mono).
    pub heard: Vec<i16>,
    /// Media packets handed to the relay.
    pub sent_packets: u64,
}

impl MediaSide<'_> {
    async fn on_datagram(&mut self, n: usize, from: SocketAddr) {
        let now = Instant::now();
        let ep = &mut *self.endpoint;
        if let Ok(Input::Data { data, .. }) = ep.client.handle_input(now, from, &ep.buf[..n]) {
            let _ = self.session.handle_packet(now, data);
        }
    }

    async fn tick(&mut self, now: Instant) -> Result<(), TurnPathError> {
        while let Some(f) = self.session.poll_frame(now) {
            self.heard.extend_from_slice(&f);
        }
        while let Some(r) = self.session.poll_transmit(now) {
            self.endpoint.send_to_peer(self.peer, &r).await?;
        }
        self.endpoint.client.handle_timeout(now);
        self.endpoint.flush().await?;
        Ok(())
    }

    async fn send_frame(&mut self, now: Instant, idx: usize) -> Result<(), TurnPathError> {
        let start = idx * FRAME_SAMPLES;
        let mut pcm = vec![0i16; FRAME_SAMPLES];
        if start < self.input.len() {
            let end = (start + FRAME_SAMPLES).min(self.input.len());
            pcm[..end - start].copy_from_slice(&self.input[start..end]);
        }
        if let Some(pkt) = self.session.send_frame(now, &pcm)? {
            self.endpoint.send_to_peer(self.peer, &pkt).await?;
            self.sent_packets += 1;
        }
        Ok(())
    }

    /// Whether every packet the peer sent (`peer_sent`) has been played out here.
    fn drained(&self, peer_sent: u64) -> bool {
        let s = self.session.stats();
        s.frames_played >= s.concealed + s.dtx_filled + peer_sent
    }

    fn wake(&self) -> Instant {
        let t = self.session.poll_timeout();
        match self.endpoint.client.poll_timeout() {
            Some(u) => t.min(u),
            None => t,
        }
    }
}

/// Full-duplex media between `a` and `b` for `frames` frames of 20 ms (paced by the clock),
/// then until both receivers have played out everything the other sent. Bounded: it ends
/// after `frames * 20 ms + tail` whatever arrives.
pub async fn exchange_media(
    a: &mut MediaSide<'_>,
    b: &mut MediaSide<'_>,
    frames: usize,
    tail: Duration,
) -> Result<(), TurnPathError> {
    let start = Instant::now();
    let end = start + FRAME * u32::try_from(frames).unwrap_or(u32::MAX) + tail;
    let mut next_frame = start;
    let mut idx = 0usize;
    let mut buf_a = vec![0u8; 65536];
    let mut buf_b = vec![0u8; 65536];
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        while idx < frames && now >= next_frame {
            a.send_frame(now, idx).await?;
            b.send_frame(now, idx).await?;
            idx += 1;
            next_frame += FRAME;
        }
        a.tick(now).await?;
        b.tick(now).await?;
        if idx >= frames && a.drained(b.sent_packets) && b.drained(a.sent_packets) {
            break;
        }
        let mut wake = a.wake().min(b.wake()).min(end);
        if idx < frames {
            wake = wake.min(next_frame);
        }
        let wake = tokio::time::Instant::from_std(wake.max(now));
        tokio::select! {
            r = a.endpoint.sock.recv_from(&mut buf_a) => {
                let (n, from) = r?;
                a.endpoint.buf[..n].copy_from_slice(&buf_a[..n]);
                a.on_datagram(n, from).await;
            }
            r = b.endpoint.sock.recv_from(&mut buf_b) => {
                let (n, from) = r?;
                b.endpoint.buf[..n].copy_from_slice(&buf_b[..n]);
                b.on_datagram(n, from).await;
            }
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
    Ok(())
}
