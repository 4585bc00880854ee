//! RTCP-like sender/receiver reports, carried encrypted like media (own SSRC, payload type
//! [`CONTROL_PT`]) so the path never sees them in clear.
//!
//! Each report may hold a sender part (our send clock and counters) and a receiver part about
//! the peer's stream (RFC 3550 §6.4 fields: highest extended sequence, cumulative lost, fraction
//! lost, interarrival jitter, LSR, DLSR). Round-trip time on receipt of a receiver part:
//! `RTT = now - LSR - DLSR`, all in our own clock (1/65536 s units, like the middle 32 bits of
//! an NTP timestamp), so the two clocks never need to agree.
//!
//! Wire (big endian): `version(1)=1 | flags(1) [bit0 sender, bit1 receiver, bit2 media seen]`, then if sender:
//! `send_time u32 | packets_sent u32 | octets_sent u32`, then if receiver:
//! `highest_ext_seq u32 | cumulative_lost i32 | fraction_lost u8 | jitter u32 | lsr u32 | dlsr u32`.

use thiserror::Error;

/// Payload type of control packets (dynamic range, distinct from media).
pub const CONTROL_PT: u8 = 127;
const VERSION: u8 = 1;
const SENDER_LEN: usize = 12;
const RECEIVER_LEN: usize = 21;

/// Report decoding failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ReportError {
    /// Shorter than its flags announce.
    #[error("report truncated")]
    Truncated,
    /// Unknown version byte.
    #[error("unknown report version {0}")]
    Version(u8),
}

/// Sender part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SenderInfo {
    /// Sender's clock at sending, 1/65536 s since its own epoch (wraps).
    pub send_time: u32,
    /// Media packets sent so far.
    pub packets_sent: u32,
    /// Media payload octets sent so far.
    pub octets_sent: u32,
}

/// Receiver part (about the peer's media stream).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiverInfo {
    /// Whether any media was received; if not, only `lsr`/`dlsr` are meaningful.
    pub media_received: bool,
    /// Highest extended sequence number received (low 32 bits).
    pub highest_ext_seq: u32,
    /// Packets expected minus received, cumulative.
    pub cumulative_lost: i32,
    /// Loss since the previous report, in 1/256.
    pub fraction_lost: u8,
    /// RFC 3550 interarrival jitter, in timestamp units.
    pub jitter: u32,
    /// `send_time` of the last sender part received (0 if none).
    pub lsr: u32,
    /// Delay since that sender part arrived, 1/65536 s.
    pub dlsr: u32,
}

/// A control report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Report {
    /// Sender part, if we send media.
    pub sender: Option<SenderInfo>,
    /// Receiver part, if we receive media.
    pub receiver: Option<ReceiverInfo>,
}

impl Report {
    /// Serialises the report.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(2 + SENDER_LEN + RECEIVER_LEN);
        let media = self.receiver.is_some_and(|r| r.media_received);
        let flags = u8::from(self.sender.is_some())
            | (u8::from(self.receiver.is_some()) << 1)
            | (u8::from(media) << 2);
        v.push(VERSION);
        v.push(flags);
        if let Some(s) = self.sender {
            v.extend_from_slice(&s.send_time.to_be_bytes());
            v.extend_from_slice(&s.packets_sent.to_be_bytes());
            v.extend_from_slice(&s.octets_sent.to_be_bytes());
        }
        if let Some(r) = self.receiver {
            v.extend_from_slice(&r.highest_ext_seq.to_be_bytes());
            v.extend_from_slice(&r.cumulative_lost.to_be_bytes());
            v.push(r.fraction_lost);
            v.extend_from_slice(&r.jitter.to_be_bytes());
            v.extend_from_slice(&r.lsr.to_be_bytes());
            v.extend_from_slice(&r.dlsr.to_be_bytes());
        }
        v
    }

    /// Parses a report; never panics.
    pub fn decode(buf: &[u8]) -> Result<Self, ReportError> {
        let (&ver, rest) = buf.split_first().ok_or(ReportError::Truncated)?;
        if ver != VERSION {
            return Err(ReportError::Version(ver));
        }
        let (&flags, mut rest) = rest.split_first().ok_or(ReportError::Truncated)?;
        let mut take = |n: usize| -> Result<&[u8], ReportError> {
            if rest.len() < n {
                return Err(ReportError::Truncated);
            }
            let (a, b) = rest.split_at(n);
            rest = b;
            Ok(a)
        };
        let be32 = |b: &[u8], i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut r = Report::default();
        if flags & 1 != 0 {
            let b = take(SENDER_LEN)?;
            r.sender = Some(SenderInfo {
                send_time: be32(b, 0),
                packets_sent: be32(b, 4),
                octets_sent: be32(b, 8),
            });
        }
        if flags & 2 != 0 {
            let b = take(RECEIVER_LEN)?;
            r.receiver = Some(ReceiverInfo {
                media_received: flags & 4 != 0,
                highest_ext_seq: be32(b, 0),
                cumulative_lost: be32(b, 4) as i32,
                fraction_lost: b[8],
                jitter: be32(b, 9),
                lsr: be32(b, 13),
                dlsr: be32(b, 17),
            });
        }
        Ok(r)
    }
}

/// Converts a duration to 1/65536 s units (wrapping at 2^32, ~18 h).
pub fn to_q16(d: std::time::Duration) -> u32 {
    ((d.as_secs() << 16) as u32)
        .wrapping_add(((u64::from(d.subsec_nanos()) << 16) / 1_000_000_000) as u32)
}

/// Converts 1/65536 s units to a duration.
pub fn from_q16(v: u32) -> std::time::Duration {
    std::time::Duration::from_nanos((u64::from(v) * 1_000_000_000) >> 16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn q16_round_trip() {
        let d = std::time::Duration::from_millis(1234);
        let back = from_q16(to_q16(d));
        assert!(back.abs_diff(d) < std::time::Duration::from_micros(20));
    }

    proptest! {
        #[test]
        fn round_trip(s in proptest::option::of((any::<u32>(), any::<u32>(), any::<u32>())),
                      r in proptest::option::of((any::<u32>(), any::<i32>(), any::<u8>(), any::<u32>(), any::<u32>(), any::<u32>()))) {
            let rep = Report {
                sender: s.map(|(a, b, c)| SenderInfo { send_time: a, packets_sent: b, octets_sent: c }),
                receiver: r.map(|(a, b, c, d, e, f)| ReceiverInfo { media_received: a % 2 == 0,
                    highest_ext_seq: a, cumulative_lost: b, fraction_lost: c, jitter: d, lsr: e, dlsr: f }),
            };
            prop_assert_eq!(Report::decode(&rep.encode()), Ok(rep));
        }

        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Report::decode(&data);
        }
    }
}
