//! The data path: ChannelData and Send from clients, datagrams from peers, and the
//! allocation-to-allocation short-circuit. No heap allocation, no lock, no shared atomic.

use std::net::SocketAddr;
use std::time::Instant;

use peerlink_proto::attrs::{Data, XorPeerAddress};
use peerlink_proto::channel::{CHANNEL_HEADER_LEN, ChannelData, ChannelDataError};
use peerlink_proto::{MessageBuilder, MessageType, TransactionId};

use super::{AllocationId, Client, Core, DropReason, HEADROOM, Output, SocketRef};

impl Core {
    /// ChannelData from a client on the listener.
    pub(super) fn channel_from_client(
        &mut self,
        now: Instant,
        src: Client,
        buf: &mut [u8],
        end: usize,
        scratch: &mut [u8],
    ) -> Output {
        let (channel, dlen) = match ChannelData::parse(&buf[HEADROOM..end]) {
            Ok(cd) => (cd.channel, cd.data.len()),
            Err(ChannelDataError::ChannelOutOfRange(ch)) if self.channel_ok(ch) => {
                match legacy_length(&buf[HEADROOM..end]) {
                    Some(dlen) => (ch, dlen),
                    None => return Output::Drop(Some(DropReason::BadLength)),
                }
            }
            Err(ChannelDataError::ChannelOutOfRange(_)) => {
                return Output::Drop(Some(DropReason::BadChannel));
            }
            Err(ChannelDataError::LengthMismatch { .. }) => {
                return Output::Drop(Some(DropReason::BadLength));
            }
            Err(_) => return Output::Drop(Some(DropReason::Malformed)),
        };
        let Some(id) = self.live(&src, now) else {
            return Output::Drop(Some(DropReason::NoAllocation));
        };
        let Some(peer) = self.table.get(id).and_then(|a| a.channel(channel, now)) else {
            return Output::Drop(Some(DropReason::UnboundChannel));
        };
        let start = HEADROOM + CHANNEL_HEADER_LEN;
        self.client_to_peer(now, id, peer, buf, start, dlen, scratch, false)
    }

    /// Relays `buf[start..start+dlen]` from allocation `id` to `peer` (from a ChannelData or a
    /// Send indication; `check_policy` for Send, whose peer was not vetted by a ChannelBind).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn client_to_peer(
        &mut self,
        now: Instant,
        id: AllocationId,
        peer: SocketAddr,
        buf: &mut [u8],
        start: usize,
        dlen: usize,
        scratch: &mut [u8],
        check_policy: bool,
    ) -> Output {
        if start.checked_add(dlen).is_none_or(|e| e > buf.len()) {
            return Output::Drop(Some(DropReason::Malformed));
        }
        if check_policy && !self.policy.allowed(peer) {
            return Output::Drop(Some(DropReason::PeerDenied));
        }
        let Some(a) = self.table.get_mut(id) else {
            return Output::Drop(Some(DropReason::NoAllocation));
        };
        if !a.permitted(peer.ip(), now) {
            return Output::Drop(Some(DropReason::NoPermission));
        }
        if let Some(up) = a.up.as_mut()
            && !up.take(now, dlen)
        {
            return Output::Drop(Some(DropReason::Bandwidth));
        }
        let from = a.relayed;
        self.counters.packets_client_to_peer += 1;
        self.counters.bytes_client_to_peer += dlen as u64;
        if let Some(other) = self.table.by_relayed(&peer) {
            return self.deliver_local(now, other, from, buf, start, dlen, scratch);
        }
        Output::Forward {
            from: SocketRef::Relayed(id),
            to: peer,
            range: start..start + dlen,
        }
    }

    /// Short-circuit: `payload` sent from relayed address `from` to allocation `target` of this
    /// worker, as if it had crossed the kernel: permission, bandwidth, then ChannelData framed
    /// in place (the 4 bytes before the payload are rewritten) or a Data indication in scratch.
    #[allow(clippy::too_many_arguments)]
    fn deliver_local(
        &mut self,
        now: Instant,
        target: AllocationId,
        from: SocketAddr,
        buf: &mut [u8],
        start: usize,
        dlen: usize,
        scratch: &mut [u8],
    ) -> Output {
        let Some(b) = self.table.get_mut(target).filter(|b| b.expires > now) else {
            return Output::Drop(Some(DropReason::NoAllocation));
        };
        if !b.permitted(from.ip(), now) {
            return Output::Drop(Some(DropReason::NoPermission));
        }
        if let Some(down) = b.down.as_mut()
            && !down.take(now, dlen)
        {
            return Output::Drop(Some(DropReason::Bandwidth));
        }
        let client = b.client;
        let channel = b.channel_of(&from, now);
        self.counters.short_circuited += 1;
        self.counters.packets_peer_to_client += 1;
        self.counters.bytes_peer_to_client += dlen as u64;
        self.frame_for_client(client, channel, from, buf, start, dlen, scratch)
    }

    /// A datagram from `src` on the relayed socket of `id`.
    pub(super) fn relayed(
        &mut self,
        now: Instant,
        id: AllocationId,
        src: SocketAddr,
        buf: &mut [u8],
        len: usize,
        scratch: &mut [u8],
    ) -> Output {
        if HEADROOM.checked_add(len).is_none_or(|e| e > buf.len()) {
            return Output::Drop(Some(DropReason::Malformed));
        }
        let Some(a) = self.table.get_mut(id).filter(|a| a.expires > now) else {
            return Output::Drop(Some(DropReason::NoAllocation));
        };
        if !a.permitted(src.ip(), now) {
            return Output::Drop(Some(DropReason::NoPermission));
        }
        if let Some(down) = a.down.as_mut()
            && !down.take(now, len)
        {
            return Output::Drop(Some(DropReason::Bandwidth));
        }
        let client = a.client;
        let channel = a.channel_of(&src, now);
        self.counters.packets_peer_to_client += 1;
        self.counters.bytes_peer_to_client += len as u64;
        self.frame_for_client(client, channel, src, buf, HEADROOM, len, scratch)
    }

    /// Frames `buf[start..start+dlen]` from `peer` for `client`: ChannelData in place when a
    /// channel is bound (needs 4 bytes before `start`), else a Data indication in scratch. The
    /// client's link (the listener, or its TCP/TLS connection) is left in `self.dest`.
    #[allow(clippy::too_many_arguments)]
    fn frame_for_client(
        &mut self,
        client: Client,
        channel: Option<u16>,
        peer: SocketAddr,
        buf: &mut [u8],
        start: usize,
        dlen: usize,
        scratch: &mut [u8],
    ) -> Output {
        if let (Some(ch), Some(hstart)) = (channel, start.checked_sub(CHANNEL_HEADER_LEN)) {
            // Written by hand rather than with proto's `write_header`, which only knows the
            // RFC 8656 range (`legacy_channel_range` binds up to 0x7FFF).
            let Ok(len16) = u16::try_from(dlen) else {
                return Output::Drop(Some(DropReason::Malformed));
            };
            buf[hstart..hstart + 2].copy_from_slice(&ch.to_be_bytes());
            buf[hstart + 2..start].copy_from_slice(&len16.to_be_bytes());
            self.dest = client.link;
            return Output::Forward {
                from: SocketRef::Listener,
                to: client.addr,
                range: hstart..start + dlen,
            };
        }
        let tid = TransactionId(self.next_tid());
        let Ok(mut b) = MessageBuilder::new(scratch, MessageType::DATA_INDICATION, tid) else {
            return Output::Drop(Some(DropReason::Internal));
        };
        if b.add(&XorPeerAddress(peer)).is_err() || b.add(&Data(&buf[start..start + dlen])).is_err()
        {
            // A payload too large for a STUN message: only a channel could carry it.
            return Output::Drop(Some(DropReason::TooLarge));
        }
        self.dest = client.link;
        Output::Reply {
            from: SocketRef::Listener,
            to: client.addr,
            len: b.finish(),
            data: true,
        }
    }
}

/// Payload length of a ChannelData datagram whose channel proto's parser refused as out of the
/// RFC 8656 range (legacy RFC 5766 numbers): same length rules as `ChannelData::parse` — the
/// payload fits, followed by at most the padding up to the next multiple of 4.
fn legacy_length(d: &[u8]) -> Option<usize> {
    let [_, _, hi, lo, ..] = *d else { return None };
    let declared = usize::from(u16::from_be_bytes([hi, lo]));
    let available = d.len() - CHANNEL_HEADER_LEN;
    (declared <= available && available <= (declared + 3) & !3).then_some(declared)
}
