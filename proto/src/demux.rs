//! First-byte demultiplexing of one UDP port (RFC 7983, with TURN ChannelData from RFC 8656).
//!
//! | first byte | kind          |
//! |------------|---------------|
//! | 0..=3      | STUN          |
//! | 16..=19    | ZRTP          |
//! | 20..=63    | DTLS          |
//! | 64..=79    | ChannelData   |
//! | 128..=191  | RTP / RTCP    |
//! | otherwise  | other (drop)  |
//!
//! This only routes: the chosen parser still validates the packet.

/// What a datagram is, judged by its first byte.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum PacketKind {
    /// STUN (first byte 0..=3).
    Stun,
    /// TURN ChannelData (first byte 0x40..=0x4F).
    ChannelData,
    /// DTLS (first byte 20..=63).
    Dtls,
    /// RTP or RTCP (first byte 128..=191).
    Rtp,
    /// ZRTP (first byte 16..=19).
    Zrtp,
    /// Anything else, including an empty datagram.
    Other,
}

/// Classifies a datagram by its first byte.
pub const fn classify(datagram: &[u8]) -> PacketKind {
    match datagram.first() {
        Some(0..=3) => PacketKind::Stun,
        Some(16..=19) => PacketKind::Zrtp,
        Some(20..=63) => PacketKind::Dtls,
        Some(64..=79) => PacketKind::ChannelData,
        Some(128..=191) => PacketKind::Rtp,
        _ => PacketKind::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_first_byte_maps_to_its_range() {
        for b in 0..=255u8 {
            let want = match b {
                0..=3 => PacketKind::Stun,
                16..=19 => PacketKind::Zrtp,
                20..=63 => PacketKind::Dtls,
                64..=79 => PacketKind::ChannelData,
                128..=191 => PacketKind::Rtp,
                _ => PacketKind::Other,
            };
            assert_eq!(classify(&[b, 0, 0, 0]), want, "first byte {b}");
        }
        assert_eq!(classify(&[]), PacketKind::Other);
    }
}
