//! One TCP or TLS client connection: its non-blocking socket, the TLS session (rustls, driven
//! by hand: `read_tls` / `process_new_packets` / `write_tls`), the framer that cuts the
//! plaintext into STUN and ChannelData frames, and the bounded send buffer.
//!
//! Nothing here knows the core: [`Conn::read_some`] moves bytes from the socket into the
//! framer, [`Conn::send`] queues one outgoing frame (ChannelData padded to 4), [`Conn::flush`]
//! writes what is queued. Every error is a [`CloseReason`]; none panics.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Instant;

use peerlink_proto::stream::{StreamError, StreamFramer, channel_padding};

use crate::core::{Client, Link, StreamId, Transport};

/// Why a connection was closed (a label of `stream_connections_closed_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed it (EOF, TLS close_notify).
    PeerClosed = 0,
    /// A socket error (reset, broken pipe).
    Io = 1,
    /// The bytes do not frame as STUN / ChannelData, or a frame is longer than the cap.
    BadFrame = 2,
    /// The TLS layer failed (bad handshake, bad record).
    Tls = 3,
    /// The TLS handshake did not finish in time.
    HandshakeTimeout = 4,
    /// No allocation and no frame for the idle timeout.
    IdleTimeout = 5,
    /// A frame was begun and not finished in time.
    Stalled = 6,
    /// The client stopped reading: its send buffer filled.
    SendOverflow = 7,
}

impl CloseReason {
    /// Number of reasons.
    pub const COUNT: usize = 8;
    /// Every reason, in index order.
    pub const ALL: [CloseReason; Self::COUNT] = [
        CloseReason::PeerClosed,
        CloseReason::Io,
        CloseReason::BadFrame,
        CloseReason::Tls,
        CloseReason::HandshakeTimeout,
        CloseReason::IdleTimeout,
        CloseReason::Stalled,
        CloseReason::SendOverflow,
    ];

    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::PeerClosed => "peer_closed",
            CloseReason::Io => "io_error",
            CloseReason::BadFrame => "bad_frame",
            CloseReason::Tls => "tls_error",
            CloseReason::HandshakeTimeout => "handshake_timeout",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::Stalled => "stalled_mid_frame",
            CloseReason::SendOverflow => "send_buffer_full",
        }
    }

    /// Index into counter arrays.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Why a connection is closed, with the detail for its log line.
#[derive(Debug)]
pub struct Closing {
    /// The reason (for counters).
    pub reason: CloseReason,
    /// What happened, for the log.
    pub detail: String,
}

impl Closing {
    fn new(reason: CloseReason, detail: impl std::fmt::Display) -> Self {
        Closing {
            reason,
            detail: detail.to_string(),
        }
    }

    /// A framing error.
    pub fn frame(e: StreamError) -> Self {
        Closing::new(CloseReason::BadFrame, e)
    }
}

/// What one read did.
#[derive(Debug, PartialEq, Eq)]
pub enum Read1 {
    /// Bytes arrived on the socket (for TLS: that many ciphertext bytes; the plaintext, if any,
    /// is in the framer).
    Bytes(usize),
    /// Nothing more to read now.
    WouldBlock,
    /// The client closed its side.
    Eof,
}

/// The transport session of a connection.
enum Session {
    /// Plain TCP: queued output waits in `Conn::out`.
    Plain,
    /// TLS: rustls holds the queued output (bounded by its buffer limit).
    Tls(Box<rustls::ServerConnection>),
}

/// One client connection of a worker.
pub struct Conn {
    sock: TcpStream,
    peer: SocketAddr,
    session: Session,
    /// Frames being reassembled from the plaintext.
    pub framer: StreamFramer,
    out: VecDeque<u8>,
    send_cap: usize,
    /// Generation of its slab slot (part of its [`StreamId`]).
    pub generation: u32,
    /// When it was accepted.
    pub accepted: Instant,
    /// Last time bytes arrived.
    pub last_rx: Instant,
    /// Last time a complete frame arrived (or the accept).
    pub last_frame: Instant,
    /// EPOLLOUT is in its epoll interest.
    pub watching_out: bool,
}

impl Conn {
    /// A plain TCP connection (the socket is already non-blocking).
    pub fn plain(
        sock: TcpStream,
        peer: SocketAddr,
        max_frame: usize,
        send_cap: usize,
        now: Instant,
    ) -> Self {
        Self::with(sock, peer, Session::Plain, max_frame, send_cap, now)
    }

    /// A TLS connection whose handshake starts now.
    pub fn tls(
        sock: TcpStream,
        peer: SocketAddr,
        mut tls: rustls::ServerConnection,
        max_frame: usize,
        send_cap: usize,
        now: Instant,
    ) -> Self {
        tls.set_buffer_limit(Some(send_cap));
        Self::with(
            sock,
            peer,
            Session::Tls(Box::new(tls)),
            max_frame,
            send_cap,
            now,
        )
    }

    fn with(
        sock: TcpStream,
        peer: SocketAddr,
        session: Session,
        max_frame: usize,
        send_cap: usize,
        now: Instant,
    ) -> Self {
        Conn {
            sock,
            peer,
            session,
            framer: StreamFramer::new(max_frame),
            out: VecDeque::new(),
            send_cap,
            generation: 0,
            accepted: now,
            last_rx: now,
            last_frame: now,
            watching_out: false,
        }
    }

    /// The socket's fd (for epoll).
    pub fn fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.sock.as_raw_fd()
    }

    /// The client's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// TCP or TLS.
    pub fn transport(&self) -> Transport {
        match self.session {
            Session::Plain => Transport::Tcp,
            Session::Tls(_) => Transport::Tls,
        }
    }

    /// The core's name for this client, given its stream id.
    pub fn client(&self, id: StreamId) -> Client {
        Client {
            addr: self.peer,
            link: match self.session {
                Session::Plain => Link::Tcp(id),
                Session::Tls(_) => Link::Tls(id),
            },
        }
    }

    /// A TLS handshake is still under way.
    pub fn handshaking(&self) -> bool {
        match &self.session {
            Session::Plain => false,
            Session::Tls(t) => t.is_handshaking(),
        }
    }

    /// Output is waiting for the socket to become writable.
    pub fn pending_output(&self) -> bool {
        match &self.session {
            Session::Plain => !self.out.is_empty(),
            Session::Tls(t) => t.wants_write(),
        }
    }

    /// Heap bytes this connection holds in its own buffers (framer and plain send buffer;
    /// rustls's buffers are bounded by its limit).
    pub fn buffered(&self) -> usize {
        self.framer.capacity() + self.out.capacity()
    }

    /// One read from the socket into the framer (through TLS for a TLS connection); `chunk`
    /// is scratch space for the bytes.
    pub fn read_some(&mut self, chunk: &mut [u8], now: Instant) -> Result<Read1, Closing> {
        let r = match &mut self.session {
            Session::Plain => match self.sock.read(chunk) {
                Ok(0) => Read1::Eof,
                Ok(n) => {
                    self.framer.push(&chunk[..n]);
                    Read1::Bytes(n)
                }
                Err(e) => return io_outcome(e),
            },
            Session::Tls(tls) => {
                let n = match tls.read_tls(&mut self.sock) {
                    Ok(0) => return Ok(Read1::Eof),
                    Ok(n) => n,
                    Err(e) => return io_outcome(e),
                };
                if let Err(e) = tls.process_new_packets() {
                    // Best effort: tell the client why (the alert rustls queued).
                    let _ = tls.write_tls(&mut self.sock);
                    return Err(Closing::new(CloseReason::Tls, e));
                }
                let mut eof = false;
                loop {
                    match tls.reader().read(chunk) {
                        Ok(0) => {
                            eof = true;
                            break;
                        }
                        Ok(m) => self.framer.push(&chunk[..m]),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(Closing::new(CloseReason::Tls, e)),
                    }
                }
                // Handshake messages (and alerts) rustls wants to send.
                self.flush()?;
                if eof { Read1::Eof } else { Read1::Bytes(n) }
            }
        };
        if let Read1::Bytes(_) = r {
            self.last_rx = now;
        }
        Ok(r)
    }

    /// Queues one frame towards the client: `bytes` then, for ChannelData (first bits `01`),
    /// zero padding to a multiple of 4 (RFC 8656 section 12.5). Written at once as far as the
    /// socket takes it; the rest waits within the send cap. A frame that does not fit closes
    /// the connection (the client stopped reading), so a worker never blocks on it and memory
    /// never grows past the cap.
    pub fn send(&mut self, bytes: &[u8]) -> Result<(), Closing> {
        const ZEROS: [u8; 3] = [0; 3];
        let pad = if bytes.first().is_some_and(|b| b >> 6 == 1) {
            &ZEROS[..channel_padding(bytes.len())]
        } else {
            &ZEROS[..0]
        };
        let overflow = || {
            Closing::new(
                CloseReason::SendOverflow,
                "send buffer full: the client stopped reading",
            )
        };
        match &mut self.session {
            Session::Plain => {
                let mut written = 0;
                if self.out.is_empty() {
                    match self
                        .sock
                        .write_vectored(&[IoSlice::new(bytes), IoSlice::new(pad)])
                    {
                        Ok(n) => written = n,
                        Err(e) if is_retry(&e) => {}
                        Err(e) => return Err(Closing::new(CloseReason::Io, e)),
                    }
                }
                let total = bytes.len() + pad.len();
                if written < total {
                    if self.out.len() + (total - written) > self.send_cap {
                        return Err(overflow());
                    }
                    if written < bytes.len() {
                        self.out.extend(&bytes[written..]);
                        self.out.extend(pad);
                    } else {
                        self.out.extend(&pad[written - bytes.len()..]);
                    }
                }
                Ok(())
            }
            Session::Tls(tls) => {
                // Frame and padding in one write, so they go out as one TLS record: some
                // clients (coturn's) take every record for a message of its own.
                let mut w = tls.writer();
                let n = if pad.is_empty() {
                    w.write(bytes)
                } else {
                    w.write_vectored(&[IoSlice::new(bytes), IoSlice::new(pad)])
                }
                .map_err(|e| Closing::new(CloseReason::Tls, e))?;
                if n < bytes.len() + pad.len() {
                    return Err(overflow());
                }
                self.flush()
            }
        }
    }

    /// Writes queued output until it is all sent or the socket would block.
    pub fn flush(&mut self) -> Result<(), Closing> {
        match &mut self.session {
            Session::Plain => {
                while !self.out.is_empty() {
                    let (a, b) = self.out.as_slices();
                    match self
                        .sock
                        .write_vectored(&[IoSlice::new(a), IoSlice::new(b)])
                    {
                        Ok(0) => return Err(Closing::new(CloseReason::Io, "write returned 0")),
                        Ok(n) => {
                            self.out.drain(..n);
                        }
                        Err(e) if is_retry(&e) => return Ok(()),
                        Err(e) => return Err(Closing::new(CloseReason::Io, e)),
                    }
                }
                // An idle connection holds no send buffer.
                self.out = VecDeque::new();
                Ok(())
            }
            Session::Tls(tls) => {
                while tls.wants_write() {
                    match tls.write_tls(&mut self.sock) {
                        Ok(0) => return Err(Closing::new(CloseReason::Io, "write returned 0")),
                        Ok(_) => {}
                        Err(e) if is_retry(&e) => return Ok(()),
                        Err(e) => return Err(Closing::new(CloseReason::Io, e)),
                    }
                }
                Ok(())
            }
        }
    }
}

fn is_retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

fn io_outcome(e: io::Error) -> Result<Read1, Closing> {
    if is_retry(&e) {
        Ok(Read1::WouldBlock)
    } else {
        Err(Closing::new(CloseReason::Io, e))
    }
}
