//! Framing of STUN messages and ChannelData on a byte stream (TURN over TCP or TLS: RFC 8656
//! section 12.5, RFC 8489 section 6.2.2).
//!
//! On a stream the two kinds of message follow each other back to back with nothing in
//! between. The first two bits of a frame tell them apart (`00` STUN, `01` ChannelData; RFC
//! 7983). A STUN message is its 20-byte header plus the length field; a ChannelData message is
//! its 4-byte header plus the length field, padded with zeros to a multiple of 4 (the padding is
//! part of the stream and is consumed, but not part of the frame handed out).
//!
//! [`StreamFramer`] is sans-IO: the caller pushes the bytes it read and takes complete frames
//! out. It never panics on any input: anything that cannot start a frame (first bits `10` or
//! `11`, a STUN header without the magic cookie or with a length that is not a multiple of 4) or
//! a frame longer than the cap is a [`StreamError`], after which the stream is out of step and
//! the framer keeps answering with that error (the connection must be closed).
//!
//! ```
//! use peerlink_proto::stream::{FrameKind, StreamFramer};
//!
//! let mut f = StreamFramer::new(4096);
//! // ChannelData on channel 0x4001 with 5 payload bytes, padded to 8, in two pieces.
//! f.push(&[0x40, 0x01, 0x00, 0x05, b'h', b'e']);
//! assert!(f.next_frame()?.is_none());
//! f.push(&[b'l', b'l', b'o', 0, 0, 0]);
//! let frame = f.next_frame()?.expect("complete");
//! assert_eq!(frame.kind, FrameKind::ChannelData);
//! assert_eq!(frame.bytes, &[0x40, 0x01, 0x00, 0x05, b'h', b'e', b'l', b'l', b'o']);
//! assert!(f.next_frame()?.is_none());
//! assert_eq!(f.buffered(), 0);
//! # Ok::<(), peerlink_proto::stream::StreamError>(())
//! ```

use crate::channel::CHANNEL_HEADER_LEN;
use crate::stun::{HEADER_LEN, MAGIC_COOKIE};

/// Why a stream cannot be framed any further.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// The first two bits are `10` or `11`: neither STUN nor ChannelData.
    #[error("byte 0x{0:02x} starts neither a STUN message nor ChannelData")]
    UnknownFrame(u8),
    /// A STUN header whose magic cookie is wrong.
    #[error("STUN header without the magic cookie (0x{0:08x})")]
    BadCookie(u32),
    /// A STUN header whose length field is not a multiple of 4.
    #[error("STUN length {0} is not a multiple of 4")]
    UnalignedLength(usize),
    /// The frame (header and payload, padding excluded) is longer than the cap.
    #[error("frame of {len} bytes is longer than the {max}-byte cap")]
    TooLong {
        /// The frame's length as its header declares it.
        len: usize,
        /// The cap.
        max: usize,
    },
}

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// A STUN message (request, response or indication).
    Stun,
    /// A ChannelData message.
    ChannelData,
}

/// One complete frame, borrowed from the framer's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// STUN or ChannelData.
    pub kind: FrameKind,
    /// The whole message without stream padding: a STUN message as it would be a datagram, a
    /// ChannelData header and its payload.
    pub bytes: &'a [u8],
}

/// Where the frame at the front of `buf` ends, judged from as many header bytes as `buf` has.
///
/// `Ok(None)`: more bytes are needed to tell. `Ok(Some((kind, len, consumed)))`: the frame is
/// `len` bytes (padding excluded) and takes `consumed` bytes of the stream (padding included);
/// `buf` may still be shorter than that. Checks happen as soon as their bytes are there, so a
/// bad header is refused before its payload arrives.
pub fn frame_extent(
    buf: &[u8],
    max_frame: usize,
) -> Result<Option<(FrameKind, usize, usize)>, StreamError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    match first >> 6 {
        0 => {
            if let [_, _, hi, lo, c0, c1, c2, c3, ..] = *buf {
                let cookie = u32::from_be_bytes([c0, c1, c2, c3]);
                if cookie != MAGIC_COOKIE {
                    return Err(StreamError::BadCookie(cookie));
                }
                let body = usize::from(u16::from_be_bytes([hi, lo]));
                if body % 4 != 0 {
                    return Err(StreamError::UnalignedLength(body));
                }
                let len = HEADER_LEN + body;
                if len > max_frame {
                    return Err(StreamError::TooLong {
                        len,
                        max: max_frame,
                    });
                }
                Ok(Some((FrameKind::Stun, len, len)))
            } else {
                Ok(None)
            }
        }
        1 => {
            if let [_, _, hi, lo, ..] = *buf {
                let payload = usize::from(u16::from_be_bytes([hi, lo]));
                let len = CHANNEL_HEADER_LEN + payload;
                if len > max_frame {
                    return Err(StreamError::TooLong {
                        len,
                        max: max_frame,
                    });
                }
                let consumed = CHANNEL_HEADER_LEN + ((payload + 3) & !3);
                Ok(Some((FrameKind::ChannelData, len, consumed)))
            } else {
                Ok(None)
            }
        }
        _ => Err(StreamError::UnknownFrame(first)),
    }
}

/// Bytes of zero padding that follow a ChannelData frame of `len` bytes (header included) on a
/// stream, so the next frame starts at a multiple of 4.
pub const fn channel_padding(len: usize) -> usize {
    (4 - len % 4) % 4
}

/// Reassembles frames from the bytes of one stream. Holds at most one partial frame between
/// calls once the complete ones were taken; its buffer is given back when empty
/// ([`StreamFramer::release`]).
#[derive(Debug, Default)]
pub struct StreamFramer {
    buf: Vec<u8>,
    start: usize,
    max_frame: usize,
    failed: Option<StreamError>,
}

impl StreamFramer {
    /// A framer that refuses frames longer than `max_frame` bytes (padding excluded).
    pub fn new(max_frame: usize) -> Self {
        StreamFramer {
            buf: Vec::new(),
            start: 0,
            max_frame,
            failed: None,
        }
    }

    /// Appends bytes read from the stream. Ignored once the framer has failed.
    pub fn push(&mut self, data: &[u8]) {
        if self.failed.is_some() || data.is_empty() {
            return;
        }
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// The next complete frame, `None` when more bytes are needed. After an error every call
    /// returns the same error.
    pub fn next_frame(&mut self) -> Result<Option<Frame<'_>>, StreamError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let rest = self.buf.get(self.start..).unwrap_or_default();
        let (kind, len, consumed) = match frame_extent(rest, self.max_frame) {
            Ok(Some(x)) => x,
            Ok(None) => return Ok(None),
            Err(e) => {
                self.failed = Some(e);
                self.buf = Vec::new();
                self.start = 0;
                return Err(e);
            }
        };
        if rest.len() < consumed {
            return Ok(None);
        }
        let at = self.start;
        self.start += consumed;
        Ok(Some(Frame {
            kind,
            bytes: &self.buf[at..at + len],
        }))
    }

    /// Bytes held that are not yet part of a frame handed out.
    pub fn buffered(&self) -> usize {
        self.buf.len().saturating_sub(self.start)
    }

    /// True when a frame has begun but is not complete (a stream that stops here stalled
    /// mid-frame).
    pub fn mid_frame(&self) -> bool {
        self.buffered() > 0
    }

    /// The error that stopped the framer, if any.
    pub fn error(&self) -> Option<StreamError> {
        self.failed
    }

    /// Gives the buffer's memory back when nothing is pending (an idle connection then holds
    /// none).
    pub fn release(&mut self) {
        if self.buffered() == 0 {
            self.buf = Vec::new();
            self.start = 0;
        }
    }

    /// Bytes of memory the buffer holds.
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn stun(body: usize) -> Vec<u8> {
        let mut m = vec![0u8; HEADER_LEN + body];
        m[0..2].copy_from_slice(&0x0001u16.to_be_bytes());
        m[2..4].copy_from_slice(&(body as u16).to_be_bytes());
        m[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        for (i, b) in m[8..].iter_mut().enumerate() {
            *b = i as u8;
        }
        m
    }

    fn channel(ch: u16, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&ch.to_be_bytes());
        m.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        m.extend_from_slice(payload);
        m.resize(m.len() + channel_padding(m.len()), 0);
        m
    }

    fn frames(f: &mut StreamFramer) -> Result<Vec<(FrameKind, Vec<u8>)>, StreamError> {
        let mut out = Vec::new();
        while let Some(fr) = f.next_frame()? {
            out.push((fr.kind, fr.bytes.to_vec()));
        }
        Ok(out)
    }

    #[test]
    fn back_to_back_frames_of_both_kinds() {
        let a = stun(8);
        let b = channel(0x4001, b"hello");
        let c = channel(0x4FFF, b"");
        let d = stun(0);
        let stream = [a.clone(), b.clone(), c.clone(), d.clone()].concat();
        let mut f = StreamFramer::new(4096);
        f.push(&stream);
        let got = frames(&mut f).unwrap();
        assert_eq!(
            got,
            vec![
                (FrameKind::Stun, a),
                (FrameKind::ChannelData, b[..9].to_vec()),
                (FrameKind::ChannelData, c),
                (FrameKind::Stun, d),
            ]
        );
        assert_eq!(f.buffered(), 0);
        assert!(!f.mid_frame());
    }

    #[test]
    fn every_split_gives_the_same_frames() {
        let stream = [
            stun(12),
            channel(0x4000, b"abc"),
            channel(0x4002, b"abcd"),
            stun(4),
        ]
        .concat();
        let mut whole = StreamFramer::new(4096);
        whole.push(&stream);
        let want = frames(&mut whole).unwrap();
        for cut in 0..=stream.len() {
            for cut2 in cut..=stream.len() {
                let mut f = StreamFramer::new(4096);
                let mut got = Vec::new();
                for part in [&stream[..cut], &stream[cut..cut2], &stream[cut2..]] {
                    f.push(part);
                    got.extend(frames(&mut f).unwrap());
                }
                assert_eq!(got, want, "cuts at {cut}, {cut2}");
                assert_eq!(f.buffered(), 0);
            }
        }
    }

    #[test]
    fn one_byte_at_a_time_and_mid_frame() {
        let stream = [channel(0x4001, b"x"), stun(4)].concat();
        let mut f = StreamFramer::new(4096);
        let mut got = 0;
        for (i, b) in stream.iter().enumerate() {
            f.push(std::slice::from_ref(b));
            let n = frames(&mut f).unwrap().len();
            got += n;
            if n == 0 && i + 1 < stream.len() {
                assert!(f.mid_frame(), "byte {i}");
            }
        }
        assert_eq!(got, 2);
        assert!(!f.mid_frame());
    }

    #[test]
    fn padding_is_waited_for_and_consumed() {
        let b = channel(0x4001, b"hello");
        let mut f = StreamFramer::new(4096);
        f.push(&b[..9]);
        assert_eq!(f.next_frame().unwrap(), None, "padding not there yet");
        f.push(&b[9..]);
        assert!(f.next_frame().unwrap().is_some());
        assert_eq!(f.buffered(), 0);
    }

    #[test]
    fn garbage_is_an_error_that_sticks() {
        for (bytes, want) in [
            (vec![0x80, 0, 0, 0], StreamError::UnknownFrame(0x80)),
            (vec![0xFF], StreamError::UnknownFrame(0xFF)),
            (
                vec![0, 1, 0, 0, 1, 2, 3, 4],
                StreamError::BadCookie(0x0102_0304),
            ),
            (
                [&[0u8, 1, 0, 6][..], &MAGIC_COOKIE.to_be_bytes()].concat(),
                StreamError::UnalignedLength(6),
            ),
        ] {
            let mut f = StreamFramer::new(4096);
            f.push(&bytes);
            assert_eq!(f.next_frame(), Err(want));
            f.push(&stun(0));
            assert_eq!(f.next_frame(), Err(want), "sticky");
            assert_eq!(f.error(), Some(want));
            assert_eq!(f.buffered(), 0, "memory given back");
        }
    }

    #[test]
    fn oversized_frames_are_refused_from_the_header_alone() {
        let mut f = StreamFramer::new(1000);
        f.push(&[0x40, 0x01, 0xFF, 0xFF]);
        assert_eq!(
            f.next_frame(),
            Err(StreamError::TooLong {
                len: 65539,
                max: 1000
            })
        );
        let mut f = StreamFramer::new(100);
        f.push(&stun(100)[..8]);
        assert_eq!(
            f.next_frame(),
            Err(StreamError::TooLong { len: 120, max: 100 })
        );
        // Exactly the cap is fine.
        let mut f = StreamFramer::new(120);
        f.push(&stun(100));
        assert_eq!(f.next_frame().unwrap().map(|fr| fr.bytes.len()), Some(120));
    }

    #[test]
    fn release_gives_memory_back_only_when_empty() {
        let mut f = StreamFramer::new(4096);
        f.push(&stun(16)[..10]);
        f.release();
        assert!(f.capacity() > 0, "a partial frame is kept");
        f.push(&stun(16)[10..]);
        assert!(f.next_frame().unwrap().is_some());
        f.release();
        assert_eq!(f.capacity(), 0);
    }

    #[test]
    fn extent_of_short_headers() {
        assert_eq!(frame_extent(&[], 100), Ok(None));
        assert_eq!(frame_extent(&[0x40, 1, 0], 100), Ok(None));
        assert_eq!(frame_extent(&[0, 1, 0, 0, 0x21, 0x12, 0xA4], 100), Ok(None));
        assert_eq!(
            frame_extent(&[0x7F, 0xFF, 0, 1], 100),
            Ok(Some((FrameKind::ChannelData, 5, 8)))
        );
        assert_eq!(channel_padding(4), 0);
        assert_eq!(channel_padding(5), 3);
        assert_eq!(channel_padding(7), 1);
    }
}
