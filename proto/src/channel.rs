//! TURN ChannelData framing (RFC 8656 section 12.4).
//!
//! A ChannelData message is a 4-byte header (channel number 0x4000..=0x4FFF, payload length)
//! followed by the payload. Over UDP the datagram may carry up to 3 bytes of padding after the
//! payload; over TCP/TLS the payload is always padded to a multiple of 4 so the next frame starts
//! aligned. Parsing borrows the payload; encoding writes into a caller buffer, or just the
//! header ([`write_header`]) for in-place framing in a headroom before the payload.

/// Lowest channel number.
pub const CHANNEL_MIN: u16 = 0x4000;
/// Highest channel number (RFC 8656 narrowed the range to 0x4000..=0x4FFF).
pub const CHANNEL_MAX: u16 = 0x4FFF;
/// Header length: channel number (2) and length (2).
pub const CHANNEL_HEADER_LEN: usize = 4;

/// Why a ChannelData message is invalid or cannot be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChannelDataError {
    /// Fewer than 4 bytes.
    #[error("ChannelData of {len} bytes is shorter than its 4-byte header")]
    TooShort {
        /// Bytes received.
        len: usize,
    },
    /// Channel number outside 0x4000..=0x4FFF.
    #[error("channel number 0x{0:04x} outside 0x4000..=0x4FFF")]
    ChannelOutOfRange(u16),
    /// The length field does not match the datagram (too long, or more than 3 bytes of
    /// trailing padding).
    #[error("ChannelData length field says {declared} payload bytes, datagram has {available}")]
    LengthMismatch {
        /// The length field.
        declared: usize,
        /// Bytes after the header.
        available: usize,
    },
    /// Payload longer than 65535 bytes.
    #[error("payload of {len} bytes does not fit the 16-bit length field")]
    PayloadTooLong {
        /// Payload length.
        len: usize,
    },
    /// The caller's buffer is too small.
    #[error("buffer too small: need {needed} bytes, have {available}")]
    BufferTooSmall {
        /// Bytes needed.
        needed: usize,
        /// Buffer length.
        available: usize,
    },
}

/// True if `ch` is a valid channel number.
pub const fn is_valid_channel(ch: u16) -> bool {
    ch >= CHANNEL_MIN && ch <= CHANNEL_MAX
}

const fn pad4(n: usize) -> usize {
    (n + 3) & !3
}

/// One ChannelData message, borrowing its payload.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ChannelData<'a> {
    /// The channel number.
    pub channel: u16,
    /// The payload (padding excluded).
    pub data: &'a [u8],
}

impl<'a> ChannelData<'a> {
    /// Parses one datagram (UDP): the length must fit, and at most 3 bytes of padding (up to
    /// the next multiple of 4) may follow the payload.
    pub fn parse(buf: &'a [u8]) -> Result<ChannelData<'a>, ChannelDataError> {
        let (channel, declared) = header(buf)?;
        let available = buf.len() - CHANNEL_HEADER_LEN;
        if declared > available || available > pad4(declared) {
            return Err(ChannelDataError::LengthMismatch {
                declared,
                available,
            });
        }
        Ok(ChannelData {
            channel,
            data: &buf[CHANNEL_HEADER_LEN..CHANNEL_HEADER_LEN + declared],
        })
    }

    /// Parses one frame from the front of a stream buffer (TCP/TLS, payload padded to 4).
    /// `Ok(None)` means more bytes are needed; `Ok(Some((frame, consumed)))` gives the frame
    /// and how many bytes it took, padding included.
    pub fn parse_stream(
        buf: &'a [u8],
    ) -> Result<Option<(ChannelData<'a>, usize)>, ChannelDataError> {
        if buf.len() < CHANNEL_HEADER_LEN {
            return Ok(None);
        }
        let (channel, declared) = header(buf)?;
        let consumed = CHANNEL_HEADER_LEN + pad4(declared);
        if buf.len() < consumed {
            return Ok(None);
        }
        let data = &buf[CHANNEL_HEADER_LEN..CHANNEL_HEADER_LEN + declared];
        Ok(Some((ChannelData { channel, data }, consumed)))
    }

    /// Length of this frame on the wire (with stream padding if `stream_padding`).
    pub fn encoded_len(&self, stream_padding: bool) -> usize {
        encoded_len(self.data.len(), stream_padding)
    }

    /// Writes this frame into `out`; returns the bytes written.
    pub fn encode(&self, out: &mut [u8], stream_padding: bool) -> Result<usize, ChannelDataError> {
        encode(self.channel, self.data, out, stream_padding)
    }
}

/// Reads and checks the header: (channel, declared length).
fn header(buf: &[u8]) -> Result<(u16, usize), ChannelDataError> {
    let [a, b, c, d, ..] = *buf else {
        return Err(ChannelDataError::TooShort { len: buf.len() });
    };
    let channel = u16::from_be_bytes([a, b]);
    if !is_valid_channel(channel) {
        return Err(ChannelDataError::ChannelOutOfRange(channel));
    }
    Ok((channel, usize::from(u16::from_be_bytes([c, d]))))
}

/// Length on the wire of a frame carrying `payload_len` bytes.
pub const fn encoded_len(payload_len: usize, stream_padding: bool) -> usize {
    CHANNEL_HEADER_LEN
        + if stream_padding {
            pad4(payload_len)
        } else {
            payload_len
        }
}

/// Writes a ChannelData header (for framing in place, in a 4-byte headroom before the payload).
pub fn write_header(
    channel: u16,
    payload_len: usize,
    out: &mut [u8; 4],
) -> Result<(), ChannelDataError> {
    if !is_valid_channel(channel) {
        return Err(ChannelDataError::ChannelOutOfRange(channel));
    }
    let len = u16::try_from(payload_len)
        .map_err(|_| ChannelDataError::PayloadTooLong { len: payload_len })?;
    out[..2].copy_from_slice(&channel.to_be_bytes());
    out[2..].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

/// Writes a whole frame into `out`; with `stream_padding` the payload is zero-padded to 4.
/// Returns the bytes written.
pub fn encode(
    channel: u16,
    payload: &[u8],
    out: &mut [u8],
    stream_padding: bool,
) -> Result<usize, ChannelDataError> {
    let total = encoded_len(payload.len(), stream_padding);
    if out.len() < total {
        return Err(ChannelDataError::BufferTooSmall {
            needed: total,
            available: out.len(),
        });
    }
    let mut hdr = [0u8; 4];
    write_header(channel, payload.len(), &mut hdr)?;
    out[..CHANNEL_HEADER_LEN].copy_from_slice(&hdr);
    let end = CHANNEL_HEADER_LEN + payload.len();
    out[CHANNEL_HEADER_LEN..end].copy_from_slice(payload);
    out[end..total].fill(0);
    Ok(total)
}
