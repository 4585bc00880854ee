//! `peerlink-relay stats`: fetch `/stats` from a running relay (plain HTTP/1.1 over a
//! `TcpStream`, bounded by timeouts) and format the percentiles.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::metrics::{Percentiles, Stats};

/// Errors fetching stats.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    /// Connection or I/O failure.
    #[error("talking to {addr}")]
    Io {
        /// Metrics address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// Not a 200 response with a JSON body.
    #[error("bad response from {addr}: {reason}")]
    BadResponse {
        /// Metrics address.
        addr: SocketAddr,
        /// What was wrong.
        reason: String,
    },
}

/// Most bytes of a `/stats` response read.
const MAX_RESPONSE: u64 = 1 << 20;

/// GET `http://addr/stats`.
pub fn fetch(addr: SocketAddr, timeout: Duration) -> Result<Stats, StatsError> {
    let io = |source| StatsError::Io { addr, source };
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(io)?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(timeout)).map_err(io)?;
    write!(
        s,
        "GET /stats HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(io)?;
    let mut raw = Vec::new();
    s.take(MAX_RESPONSE).read_to_end(&mut raw).map_err(io)?;
    let bad = |reason: String| StatsError::BadResponse { addr, reason };
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no header terminator".into()))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200 ") {
        return Err(bad(format!("status line {status:?}")));
    }
    let body = &raw[split + 4..];
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body).ok_or_else(|| bad("bad chunked body".into()))?
    } else {
        body.to_vec()
    };
    serde_json::from_slice(&body).map_err(|e| bad(format!("json: {e}")))
}

fn dechunk(mut body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n")?;
        let size_str = std::str::from_utf8(&body[..line_end]).ok()?;
        let size = usize::from_str_radix(size_str.split(';').next()?.trim(), 16).ok()?;
        body = body.get(line_end + 2..)?;
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(body.get(..size)?);
        body = body.get(size + 2..)?;
    }
}

fn line(label: &str, p: &Percentiles) -> String {
    format!(
        "{label:<10} n={:<10} p50={:>6} p90={:>6} p99={:>6} p99.9={:>6} max={:>7}  (µs)",
        p.count, p.p50, p.p90, p.p99, p.p999, p.max
    )
}

/// Human-readable summary of a `/stats` document.
pub fn format(stats: &Stats) -> String {
    let c = |k: &str| stats.counters.get(k).copied().unwrap_or(0);
    format!(
        "peerlink-relay: io={} workers={} uptime={:.0}s draining={} allocations={}\n{}\n{}\n\
         forwarded: client->peer {}  peer->client {}  client->client {}   send errors {}  kernel rx drops {}\n",
        stats.io,
        stats.workers,
        stats.uptime_s,
        stats.draining,
        stats.allocations_active,
        line("interval", &stats.latency_interval_us),
        line("total", &stats.latency_total_us),
        c("forwarded_packets_client_to_peer"),
        c("forwarded_packets_peer_to_client"),
        c("forwarded_packets_client_to_client"),
        c("send_errors"),
        c("kernel_rx_drops"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dechunks() {
        assert_eq!(
            dechunk(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").unwrap(),
            b"abcde"
        );
        assert!(dechunk(b"zz\r\n").is_none());
        assert!(dechunk(b"5\r\nab").is_none());
    }
}
