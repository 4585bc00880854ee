//! UDP STUN Binding responder for NAT mapping discovery (RFC 8489), with RFC 5780 behaviour
//! discovery when a second address is configured.
//!
//! Sockets are "slots" by (IP, port): primary-ip:primary-port, primary-ip:alt-port,
//! alt-ip:primary-port and alt-ip:alt-port — as many as the two configured addresses allow
//! (two when only the port differs, four when IP and port differ). A Binding request is
//! answered with XOR-MAPPED-ADDRESS, SOFTWARE and FINGERPRINT, plus RESPONSE-ORIGIN and
//! OTHER-ADDRESS when an alternate address exists. CHANGE-REQUEST is honoured by answering
//! from the slot with the other IP and/or port; a change the addresses cannot provide is
//! answered 420 (UNKNOWN-ATTRIBUTES: CHANGE-REQUEST), as RFC 5780 section 7.2 says of a server
//! without that alternate. A malformed CHANGE-REQUEST, or an oversized / non-UTF-8 USERNAME,
//! REALM or NONCE, is answered 400; an unknown comprehension-required attribute 420 with
//! UNKNOWN-ATTRIBUTES. Anything that is not a well-formed Binding request (short, wrong magic
//! cookie, bad lengths, bad FINGERPRINT, truncated, not a request) is dropped silently and
//! counted. [`respond`] is the sans-IO core; [`StunResponder`] drives sockets.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use peerlink_proto::attrs::{
    ChangeRequest, ErrorCode, Nonce, OtherAddress, Realm, ResponseOrigin, Software,
    UnknownAttributes, Username, XorMappedAddress,
};
use peerlink_proto::{Class, Message, MessageBuilder, MessageType, Method, attr_type};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// SOFTWARE attribute value.
pub const SOFTWARE: &str = "peerlink-signaling";
/// Receive buffer; a datagram filling it completely is treated as truncated and dropped.
const RECV_BUF: usize = 2048;

/// The up-to-four local addresses, indexed by `ip * 2 + port` (0 = primary, 1 = alternate).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    /// Bound address of each slot, if that slot exists.
    pub slots: [Option<SocketAddr>; 4],
}

impl Layout {
    /// The alternate (other IP, other port) address, for OTHER-ADDRESS.
    pub fn other_address(&self) -> Option<SocketAddr> {
        self.slots[3].or(self.slots[1]).or(self.slots[2])
    }
}

/// What to do with one datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Send `out[..len]` from slot `from` to the source.
    Reply {
        /// Slot to send from.
        from: usize,
        /// Length written to `out`.
        len: usize,
        /// True for an error response.
        error: bool,
    },
    /// Drop silently (garbage, not a Binding request, truncated).
    Drop,
}

/// Answer one datagram received on slot `on` from `src`, writing any response into `out`.
pub fn respond(
    layout: &Layout,
    on: usize,
    src: SocketAddr,
    datagram: &[u8],
    out: &mut [u8],
) -> Verdict {
    let Ok(msg) = Message::parse(datagram) else {
        return Verdict::Drop;
    };
    if msg.class() != Class::Request || msg.method() != Method::BINDING {
        return Verdict::Drop;
    }
    let tid = msg.transaction_id();
    let unknown = msg.unknown_comprehension_required();
    if !unknown.is_empty() {
        return error(out, on, tid, 420, Some(unknown));
    }
    // The responder authenticates nobody, but a USERNAME, REALM or NONCE that is oversized or
    // not valid UTF-8 marks a malformed (or hostile) request: 400, and nothing of it is kept.
    if msg.get::<Username>().is_some_and(|r| r.is_err())
        || msg.get::<Realm>().is_some_and(|r| r.is_err())
        || msg.get::<Nonce>().is_some_and(|r| r.is_err())
    {
        return error(out, on, tid, 400, None);
    }
    let mut from = on;
    if let Some(cr) = msg.get::<ChangeRequest>() {
        let Ok(cr) = cr else {
            return error(out, on, tid, 400, None);
        };
        let target = on ^ (usize::from(cr.change_ip) << 1) ^ usize::from(cr.change_port);
        if layout.slots.get(target).copied().flatten().is_none() {
            let mut ua = UnknownAttributes::new();
            let _ = ua.push(attr_type::CHANGE_REQUEST);
            return error(out, on, tid, 420, Some(ua));
        }
        from = target;
    }
    let Some(origin) = layout.slots.get(from).copied().flatten() else {
        return Verdict::Drop;
    };
    let mut build = || -> Result<usize, peerlink_proto::EncodeError> {
        let mut b =
            MessageBuilder::new(out, MessageType::new(Class::Success, Method::BINDING), tid)?;
        b.add(&XorMappedAddress(src))?;
        if let Some(other) = layout.other_address() {
            b.add(&ResponseOrigin(origin))?;
            b.add(&OtherAddress(other))?;
        }
        b.add(&Software(SOFTWARE))?;
        b.add_fingerprint()?;
        Ok(b.finish())
    };
    match build() {
        Ok(len) => Verdict::Reply {
            from,
            len,
            error: false,
        },
        Err(_) => Verdict::Drop,
    }
}

fn error(
    out: &mut [u8],
    on: usize,
    tid: peerlink_proto::TransactionId,
    code: u16,
    unknown: Option<UnknownAttributes>,
) -> Verdict {
    let mut build = || -> Result<usize, peerlink_proto::EncodeError> {
        let mut b = MessageBuilder::new(out, MessageType::new(Class::Error, Method::BINDING), tid)?;
        b.add(&ErrorCode::new(code))?;
        if let Some(u) = &unknown {
            b.add(u)?;
        }
        b.add(&Software(SOFTWARE))?;
        b.add_fingerprint()?;
        Ok(b.finish())
    };
    match build() {
        Ok(len) => Verdict::Reply {
            from: on,
            len,
            error: true,
        },
        Err(_) => Verdict::Drop,
    }
}

/// STUN setup failures.
#[derive(Debug, thiserror::Error)]
pub enum StunError {
    /// A socket could not be bound.
    #[error("cannot bind STUN socket {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
}

/// Bound STUN sockets.
pub struct StunResponder {
    layout: Layout,
    sockets: [Option<Arc<UdpSocket>>; 4],
}

async fn bind(addr: SocketAddr) -> Result<Arc<UdpSocket>, StunError> {
    UdpSocket::bind(addr)
        .await
        .map(Arc::new)
        .map_err(|source| StunError::Bind { addr, source })
}

impl StunResponder {
    /// Bind the primary address and, with `alt`, the slots the two addresses allow. Port 0
    /// picks a free port (the derived slots then reuse the chosen ports).
    pub async fn bind(primary: SocketAddr, alt: Option<SocketAddr>) -> Result<Self, StunError> {
        let mut sockets: [Option<Arc<UdpSocket>>; 4] = Default::default();
        let mut layout = Layout::default();
        let p = bind(primary).await?;
        let pa = p.local_addr().map_err(|source| StunError::Bind {
            addr: primary,
            source,
        })?;
        layout.slots[0] = Some(pa);
        sockets[0] = Some(p);
        if let Some(alt) = alt {
            let a = bind(alt).await?;
            let aa = a
                .local_addr()
                .map_err(|source| StunError::Bind { addr: alt, source })?;
            let (diff_ip, diff_port) = (aa.ip() != pa.ip(), aa.port() != pa.port());
            let slot = (usize::from(diff_ip) << 1) | usize::from(diff_port);
            layout.slots[slot] = Some(aa);
            sockets[slot] = Some(a);
            if diff_ip && diff_port {
                for (slot, addr) in [
                    (1, SocketAddr::new(pa.ip(), aa.port())),
                    (2, SocketAddr::new(aa.ip(), pa.port())),
                ] {
                    sockets[slot] = Some(bind(addr).await?);
                    layout.slots[slot] = Some(addr);
                }
            }
        }
        Ok(Self { layout, sockets })
    }

    /// The bound slots.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Serve until `cancel` fires: one receive task per socket.
    pub async fn run(self, state: crate::state::AppState, cancel: CancellationToken) {
        let sockets = Arc::new(self.sockets);
        let mut tasks = tokio::task::JoinSet::new();
        for slot in 0..4 {
            if sockets[slot].is_none() {
                continue;
            }
            let (sockets, st, cancel, layout) =
                (sockets.clone(), state.clone(), cancel.clone(), self.layout);
            tasks.spawn(async move {
                let Some(sock) = sockets[slot].clone() else {
                    return;
                };
                let mut buf = vec![0u8; RECV_BUF];
                let mut out = vec![0u8; 512];
                loop {
                    let (n, src) = tokio::select! {
                        _ = cancel.cancelled() => return,
                        r = sock.recv_from(&mut buf) => match r {
                            Ok(x) => x,
                            Err(_) => continue,
                        },
                    };
                    let m = &st.metrics;
                    if n >= RECV_BUF {
                        Metrics::inc(&m.stun_dropped_total);
                        continue;
                    }
                    match respond(&layout, slot, src, &buf[..n], &mut out) {
                        Verdict::Drop => Metrics::inc(&m.stun_dropped_total),
                        Verdict::Reply { from, len, error } => {
                            let Some(s) = sockets.get(from).cloned().flatten() else {
                                continue;
                            };
                            if s.send_to(&out[..len], src).await.is_ok() {
                                if error {
                                    Metrics::inc(&m.stun_errors_total);
                                } else {
                                    m.stun_responses_total.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                    }
                }
            });
        }
        while tasks.join_next().await.is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use peerlink_proto::TransactionId;

    fn request(change: Option<ChangeRequest>, extra_unknown: bool) -> Vec<u8> {
        let mut buf = vec![0u8; 256];
        let mut b = MessageBuilder::new(
            &mut buf,
            MessageType::BINDING_REQUEST,
            TransactionId([7; 12]),
        )
        .unwrap();
        if let Some(c) = change {
            b.add(&c).unwrap();
        }
        if extra_unknown {
            b.add_raw(0x7777, &[1, 2, 3, 4]).unwrap();
        }
        b.add_fingerprint().unwrap();
        let n = b.finish();
        buf.truncate(n);
        buf
    }

    fn four() -> Layout {
        Layout {
            slots: [
                Some("127.0.0.1:3479".parse().unwrap()),
                Some("127.0.0.1:3480".parse().unwrap()),
                Some("127.0.0.2:3479".parse().unwrap()),
                Some("127.0.0.2:3480".parse().unwrap()),
            ],
        }
    }

    #[test]
    fn binding_answer_has_mapping_and_fingerprint() {
        let layout = Layout {
            slots: [Some("127.0.0.1:3479".parse().unwrap()), None, None, None],
        };
        let src: SocketAddr = "203.0.113.9:40000".parse().unwrap();
        let mut out = [0u8; 512];
        let Verdict::Reply {
            from: 0,
            len,
            error: false,
        } = respond(&layout, 0, src, &request(None, false), &mut out)
        else {
            panic!("no reply")
        };
        let m = Message::parse(&out[..len]).unwrap();
        assert_eq!(m.message_type(), MessageType::BINDING_SUCCESS);
        assert_eq!(m.transaction_id(), TransactionId([7; 12]));
        assert_eq!(m.get::<XorMappedAddress>().unwrap().unwrap().0, src);
        assert!(m.has_fingerprint());
        assert!(m.get::<OtherAddress>().is_none());
    }

    #[test]
    fn change_request_picks_slot() {
        let layout = four();
        let src: SocketAddr = "127.0.0.1:5555".parse().unwrap();
        let mut out = [0u8; 512];
        let cases = [
            ((false, false), 0),
            ((false, true), 1),
            ((true, false), 2),
            ((true, true), 3),
        ];
        for ((ip, port), want) in cases {
            let req = request(
                Some(ChangeRequest {
                    change_ip: ip,
                    change_port: port,
                }),
                false,
            );
            let Verdict::Reply { from, len, .. } = respond(&layout, 0, src, &req, &mut out) else {
                panic!()
            };
            assert_eq!(from, want);
            let m = Message::parse(&out[..len]).unwrap();
            assert_eq!(
                m.get::<ResponseOrigin>().unwrap().unwrap().0,
                layout.slots[want].unwrap()
            );
            assert_eq!(
                m.get::<OtherAddress>().unwrap().unwrap().0,
                layout.slots[3].unwrap()
            );
        }
    }

    #[test]
    fn impossible_change_is_420_and_garbage_dropped() {
        let layout = Layout {
            slots: [
                Some("127.0.0.1:3479".parse().unwrap()),
                Some("127.0.0.1:3480".parse().unwrap()),
                None,
                None,
            ],
        };
        let src: SocketAddr = "127.0.0.1:5555".parse().unwrap();
        let mut out = [0u8; 512];
        let req = request(
            Some(ChangeRequest {
                change_ip: true,
                change_port: false,
            }),
            false,
        );
        let Verdict::Reply {
            error: true, len, ..
        } = respond(&layout, 0, src, &req, &mut out)
        else {
            panic!()
        };
        let m = Message::parse(&out[..len]).unwrap();
        assert_eq!(m.get::<ErrorCode>().unwrap().unwrap().code, 420);
        let Verdict::Reply {
            error: true, len, ..
        } = respond(&layout, 0, src, &request(None, true), &mut out)
        else {
            panic!()
        };
        let m = Message::parse(&out[..len]).unwrap();
        assert_eq!(m.get::<ErrorCode>().unwrap().unwrap().code, 420);
        for junk in [
            &b""[..],
            &[0u8; 19][..],
            &[0xffu8; 64][..],
            b"GET / HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(respond(&layout, 0, src, junk, &mut out), Verdict::Drop);
        }
        // A success response (not a request) is dropped too.
        let mut buf = [0u8; 64];
        let b = MessageBuilder::new(
            &mut buf,
            MessageType::BINDING_SUCCESS,
            TransactionId([1; 12]),
        )
        .unwrap();
        let n = b.finish();
        assert_eq!(respond(&layout, 0, src, &buf[..n], &mut out), Verdict::Drop);
    }
}
