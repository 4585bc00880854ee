//! `peerlink-sim nat-check`: RFC 5780 NAT behaviour discovery against a STUN server with an
//! alternate address (peerlink-signaling with `--stun IP1:P1 --stun-alt IP2:P2`), over UDP
//! sockets of this host. The tests and their classification are
//! [`peerlink_client_core::natcheck`]; this module sends the requests, waits for the answers
//! and bounds the whole check in time.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use peerlink_client_core::natcheck::{
    self, AnswerError, BindingAnswer, NatReport, classify_filtering, classify_mapping,
    classify_ports,
};
use peerlink_proto::{Class, Message, Method, TransactionId};
use tokio::net::UdpSocket;
use tokio::time::Instant;

/// How the check runs.
#[derive(Clone, Debug)]
pub struct NatCheckOptions {
    /// How long one test waits for its answer (requests are sent three times within it).
    pub wait: Duration,
    /// Fresh sockets whose mappings decide the port allocation (at least 2).
    pub port_samples: usize,
    /// Bound on the whole check.
    pub timeout: Duration,
}

impl Default for NatCheckOptions {
    fn default() -> Self {
        Self {
            wait: Duration::from_millis(800),
            port_samples: 5,
            timeout: Duration::from_secs(10),
        }
    }
}

/// Why the check could not classify the network.
#[derive(Debug, thiserror::Error)]
pub enum NatCheckError {
    /// A socket could not be opened or used.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        source: io::Error,
    },
    /// The server did not answer a test that needs no NAT cooperation.
    #[error("no answer from the STUN server at {0} (is it reachable over UDP?)")]
    NoAnswer(SocketAddr),
    /// The server has no alternate address on another IP, so RFC 5780 tests are impossible.
    #[error(
        "the STUN server at {0} has no alternate address on a second IP (OTHER-ADDRESS); run \
         signaling with --stun-alt IP2:PORT on another IP of the host"
    )]
    NoAlternate(SocketAddr),
    /// The server refused a request.
    #[error("the STUN server at {server} refused a request: {error}")]
    Refused {
        /// The server address asked.
        server: SocketAddr,
        /// Its answer.
        error: AnswerError,
    },
    /// The whole check took longer than its bound.
    #[error("the NAT check did not finish within {0:?}")]
    Timeout(Duration),
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> NatCheckError {
    move |source| NatCheckError::Io { what, source }
}

/// Runs every test against the STUN server at `stun` and classifies the NAT in front of this
/// host. Bounded by `opts.timeout`.
pub async fn run(stun: SocketAddr, opts: &NatCheckOptions) -> Result<NatReport, NatCheckError> {
    tokio::time::timeout(opts.timeout, check(stun, opts))
        .await
        .map_err(|_| NatCheckError::Timeout(opts.timeout))?
}

async fn check(primary: SocketAddr, opts: &NatCheckOptions) -> Result<NatReport, NatCheckError> {
    let ip = local_ip_toward(primary).await?;
    let a = bind(ip).await?;
    let first = ask(&a, primary, false, false, opts.wait)
        .await?
        .ok_or(NatCheckError::NoAnswer(primary))?;
    let other = first
        .other
        .filter(|o| o.ip() != primary.ip())
        .ok_or(NatCheckError::NoAlternate(primary))?;
    let m1 = first.mapped;
    let nat = m1
        != a.local_addr()
            .map_err(io_err("reading the local address"))?;

    // Mapping: the same socket toward the alternate IP (primary port), then the alternate
    // address. The server answers both without a NAT's help, so no answer is an error.
    let alt_ip = SocketAddr::new(other.ip(), primary.port());
    let m2 = ask(&a, alt_ip, false, false, opts.wait)
        .await?
        .ok_or(NatCheckError::NoAnswer(alt_ip))?
        .mapped;
    let m3 = ask(&a, other, false, false, opts.wait)
        .await?
        .ok_or(NatCheckError::NoAnswer(other))?
        .mapped;
    let mapping = classify_mapping(m1, m2, m3);

    // Filtering: a fresh socket that has sent to the primary address only.
    let f = bind(ip).await?;
    let from_other_address = ask(&f, primary, true, true, opts.wait).await?.is_some();
    let from_other_port =
        !from_other_address && ask(&f, primary, false, true, opts.wait).await?.is_some();
    let filtering = classify_filtering(from_other_address, from_other_port);

    // Port allocation: fresh sockets, one after another, each asking the primary address.
    let mut samples = Vec::new();
    for _ in 0..opts.port_samples.max(2) {
        let s = bind(ip).await?;
        let local = s
            .local_addr()
            .map_err(io_err("reading the local address"))?;
        if let Some(ans) = ask(&s, primary, false, false, opts.wait).await? {
            samples.push((local.port(), ans.mapped.port()));
        }
    }
    let (port_allocation, port_delta) = classify_ports(&samples);

    let hairpin = hairpin(&a, m1, ip, primary, opts.wait).await?;
    Ok(NatReport {
        mapping,
        filtering,
        port_allocation,
        port_delta,
        hairpin,
        nat,
        mapped: m1,
    })
}

/// Whether a packet from a second socket of this host to `a`'s mapped address `m1` comes
/// back in to `a`. `a` first sends to the second socket's own mapping, so a filtering NAT lets
/// the hairpinned packet through when it hairpins at all.
async fn hairpin(
    a: &UdpSocket,
    m1: SocketAddr,
    ip: IpAddr,
    primary: SocketAddr,
    wait: Duration,
) -> Result<bool, NatCheckError> {
    let h = bind(ip).await?;
    let Some(mh) = ask(&h, primary, false, false, wait).await? else {
        return Ok(false);
    };
    let tid = TransactionId(rand::random());
    let probe = natcheck::binding_request(tid, false, false);
    // Opens `a`'s filter toward `h`'s mapping; `h` may or may not receive it.
    let _ = a.send_to(&probe, mh.mapped).await;
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 1500];
    let mut next_send = Instant::now();
    loop {
        if Instant::now() >= next_send {
            h.send_to(&probe, m1)
                .await
                .map_err(io_err("sending the hairpin probe"))?;
            next_send += wait / 3;
        }
        let until = next_send.min(deadline);
        match tokio::time::timeout_at(until, a.recv_from(&mut buf)).await {
            Ok(Ok((n, _))) => {
                if let Ok(m) = Message::parse(&buf[..n])
                    && m.class() == Class::Request
                    && m.method() == Method::BINDING
                    && m.transaction_id() == tid
                {
                    return Ok(true);
                }
            }
            Ok(Err(e)) => return Err(io_err("receiving the hairpin probe")(e)),
            Err(_) if Instant::now() >= deadline => return Ok(false),
            Err(_) => {}
        }
    }
}

/// The local IP this host uses toward `to` (the routing table's choice).
pub async fn local_ip_toward(to: SocketAddr) -> Result<IpAddr, NatCheckError> {
    let any: SocketAddr = if to.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let s = UdpSocket::bind(any)
        .await
        .map_err(io_err("opening a UDP socket"))?;
    s.connect(to)
        .await
        .map_err(io_err("finding the route to the STUN server"))?;
    Ok(s.local_addr()
        .map_err(io_err("reading the local address"))?
        .ip())
}

async fn bind(ip: IpAddr) -> Result<UdpSocket, NatCheckError> {
    UdpSocket::bind(SocketAddr::new(ip, 0))
        .await
        .map_err(io_err("opening a UDP socket"))
}

/// One Binding transaction: sent three times within `wait`, the first answer taken. `None` when
/// nothing answered (which is the result of a filtering test); a refusal is an error.
async fn ask(
    sock: &UdpSocket,
    to: SocketAddr,
    change_ip: bool,
    change_port: bool,
    wait: Duration,
) -> Result<Option<BindingAnswer>, NatCheckError> {
    let tid = TransactionId(rand::random());
    let req = natcheck::binding_request(tid, change_ip, change_port);
    let deadline = Instant::now() + wait;
    let mut next_send = Instant::now();
    let mut buf = [0u8; 1500];
    loop {
        if Instant::now() >= next_send && next_send < deadline {
            sock.send_to(&req, to)
                .await
                .map_err(io_err("sending a Binding request"))?;
            next_send += wait / 3;
        }
        let until = next_send.min(deadline);
        match tokio::time::timeout_at(until, sock.recv_from(&mut buf)).await {
            Ok(Ok((n, _from))) => match natcheck::parse_answer(&buf[..n], tid) {
                Ok(ans) => return Ok(Some(ans)),
                Err(error @ AnswerError::Error { .. }) => {
                    return Err(NatCheckError::Refused { server: to, error });
                }
                // Another transaction's late answer or a stray datagram.
                Err(_) => {}
            },
            Ok(Err(e)) => return Err(io_err("receiving a Binding answer")(e)),
            Err(_) if Instant::now() >= deadline => return Ok(None),
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against a responder without an alternate address: a clear error, within the bound.
    #[tokio::test]
    async fn a_server_without_an_alternate_address_is_a_clear_error() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        let answer = tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            let (n, from) = server.recv_from(&mut buf).await.unwrap();
            let m = Message::parse(&buf[..n]).unwrap();
            let mut out = vec![0u8; 256];
            let mut b = peerlink_proto::MessageBuilder::new(
                &mut out,
                peerlink_proto::MessageType::new(Class::Success, Method::BINDING),
                m.transaction_id(),
            )
            .unwrap();
            b.add(&peerlink_proto::attrs::XorMappedAddress(from))
                .unwrap();
            let n = b.finish();
            server.send_to(&out[..n], from).await.unwrap();
        });
        let err = run(addr, &NatCheckOptions::default()).await.unwrap_err();
        assert!(
            matches!(err, NatCheckError::NoAlternate(a) if a == addr),
            "{err}"
        );
        answer.await.unwrap();
    }

    #[tokio::test]
    async fn a_silent_server_is_no_answer_after_one_wait() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        let opts = NatCheckOptions {
            wait: Duration::from_millis(300),
            ..NatCheckOptions::default()
        };
        let err = run(addr, &opts).await.unwrap_err();
        assert!(
            matches!(err, NatCheckError::NoAnswer(a) if a == addr),
            "{err}"
        );
        drop(server);
    }
}
