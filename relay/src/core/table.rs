//! The allocation table of one worker: a slab of allocations, O(1) maps from client 5-tuple and
//! relayed address to allocation, per-allocation permission and channel maps, and a timer heap.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use slab::Slab;

use super::hash::{FastState, SipState};
use super::{AllocationId, Client};

/// Slab slot bits of an [`AllocationId`]; the remaining high bits are a generation counter.
pub const SLOT_BITS: u32 = 20;
/// Most allocations one worker holds (slot space of an id).
pub const MAX_SLOTS: usize = 1 << SLOT_BITS;
const SLOT_MASK: u32 = (1 << SLOT_BITS) - 1;
/// RFC 8656 section 12: a channel number / peer pair stays reserved this long after the
/// binding expires, so the number is not reused for another peer while packets are in flight.
pub const CHANNEL_COOLDOWN: Duration = Duration::from_secs(300);

/// One channel binding.
#[derive(Clone, Copy, Debug)]
pub struct Channel {
    /// The bound peer.
    pub peer: SocketAddr,
    /// End of the binding (then `CHANNEL_COOLDOWN` more before the entry is removed).
    pub expires: Instant,
}

/// Token bucket in bytes for the optional per-allocation bandwidth cap.
#[derive(Clone, Copy, Debug)]
pub struct ByteBucket {
    tokens: u64,
    cap: u64,
    rate: u64,
    at: Instant,
}

impl ByteBucket {
    /// Full bucket of one second (at least 64 KiB so one maximal datagram always fits).
    pub fn new(rate_bps: u64, now: Instant) -> Self {
        let cap = rate_bps.max(65_536);
        ByteBucket {
            tokens: cap,
            cap,
            rate: rate_bps,
            at: now,
        }
    }
    /// Takes `n` bytes; false = over the cap (the packet is dropped).
    pub fn take(&mut self, now: Instant, n: usize) -> bool {
        let dt = now.saturating_duration_since(self.at);
        if !dt.is_zero() {
            let add = (u128::from(self.rate) * dt.as_nanos() / 1_000_000_000) as u64;
            self.tokens = self.tokens.saturating_add(add).min(self.cap);
            self.at = now;
        }
        let n = n as u64;
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

/// A response kept for retransmissions of the last request on an allocation.
#[derive(Clone, Debug, Default)]
pub struct Cached {
    /// Transaction id of the request.
    pub tid: [u8; 12],
    /// Method of the request.
    pub method: u16,
    /// The response bytes.
    pub bytes: Vec<u8>,
}

/// One allocation.
#[derive(Debug)]
pub struct Allocation {
    /// Its id (slot + generation).
    pub id: AllocationId,
    /// Client transport address and link (the 5-tuple: client, listener, transport; a stream
    /// client is its connection).
    pub client: Client,
    /// Relayed transport address.
    pub relayed: SocketAddr,
    /// Username that created it.
    pub username: Box<str>,
    /// Long-term key that authenticated it (signs its responses).
    pub key: [u8; 16],
    /// End of life unless refreshed.
    pub expires: Instant,
    /// Permissions: peer IP -> expiry.
    pub perms: HashMap<IpAddr, Instant, SipState>,
    /// Channels: number -> binding.
    pub channels: HashMap<u16, Channel, FastState>,
    /// Reverse channel map: peer -> number.
    pub peer_channels: HashMap<SocketAddr, u16, SipState>,
    /// The Allocate success response, for retransmissions of the creating transaction (kept
    /// apart so a later 437 to another Allocate transaction cannot displace it).
    pub allocated: Option<Cached>,
    /// Last response to any other request, for retransmissions.
    pub last: Option<Cached>,
    /// DONT-FRAGMENT was asked for.
    pub dont_fragment: bool,
    /// Client -> peer bandwidth cap.
    pub up: Option<ByteBucket>,
    /// Peer -> client bandwidth cap.
    pub down: Option<ByteBucket>,
    /// Deadline of this allocation's live timer-heap entry.
    scheduled: Option<Instant>,
}

impl Allocation {
    /// Whether `ip` holds an unexpired permission.
    #[inline]
    pub fn permitted(&self, ip: IpAddr, now: Instant) -> bool {
        matches!(self.perms.get(&ip), Some(&exp) if exp > now)
    }

    /// The active binding of `channel`.
    #[inline]
    pub fn channel(&self, channel: u16, now: Instant) -> Option<SocketAddr> {
        match self.channels.get(&channel) {
            Some(c) if c.expires > now => Some(c.peer),
            _ => None,
        }
    }

    /// The channel actively bound to `peer`.
    #[inline]
    pub fn channel_of(&self, peer: &SocketAddr, now: Instant) -> Option<u16> {
        let ch = *self.peer_channels.get(peer)?;
        self.channel(ch, now).map(|_| ch)
    }

    /// Earliest instant something of this allocation expires.
    fn next_deadline(&self) -> Instant {
        let mut t = self.expires;
        for &e in self.perms.values() {
            t = t.min(e);
        }
        for c in self.channels.values() {
            t = t.min(c.expires + CHANNEL_COOLDOWN);
        }
        t
    }

    /// Removes permissions and channel entries that ended at `now`.
    fn sweep(&mut self, now: Instant) {
        self.perms.retain(|_, e| *e > now);
        let peer_channels = &mut self.peer_channels;
        self.channels.retain(|_, c| {
            let keep = c.expires + CHANNEL_COOLDOWN > now;
            if !keep {
                peer_channels.remove(&c.peer);
            }
            keep
        });
    }
}

/// Fields of a new allocation.
pub struct NewAllocation {
    /// Client transport address and link.
    pub client: Client,
    /// Relayed transport address.
    pub relayed: SocketAddr,
    /// Username.
    pub username: Box<str>,
    /// Long-term key.
    pub key: [u8; 16],
    /// Expiry.
    pub expires: Instant,
    /// DONT-FRAGMENT.
    pub dont_fragment: bool,
    /// Bandwidth cap in bytes/s.
    pub bandwidth: Option<u64>,
    /// Creation time.
    pub now: Instant,
}

/// The allocation table.
pub struct Table {
    slab: Slab<Allocation>,
    by_client: HashMap<Client, AllocationId, SipState>,
    by_relayed: HashMap<SocketAddr, AllocationId, FastState>,
    timers: BinaryHeap<Reverse<(Instant, u32)>>,
    generation: u32,
    sip: SipState,
}

impl Table {
    /// An empty table; `sip` keys the maps over attacker-chosen keys.
    pub fn new(sip: SipState) -> Self {
        Table {
            slab: Slab::new(),
            by_client: HashMap::with_hasher(sip),
            by_relayed: HashMap::with_hasher(FastState),
            timers: BinaryHeap::new(),
            generation: 0,
            sip,
        }
    }

    /// Live allocations.
    pub fn len(&self) -> usize {
        self.slab.len()
    }

    /// True when no allocation is alive.
    pub fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }

    /// Entries of every index (allocations, both maps, timer heap) — for leak tests.
    pub fn footprint(&self) -> (usize, usize, usize, usize) {
        (
            self.slab.len(),
            self.by_client.len(),
            self.by_relayed.len(),
            self.timers.len(),
        )
    }

    /// The id the next insert will use, or None when the worker's slot space is full.
    pub fn next_id(&self) -> Option<AllocationId> {
        let slot = self.slab.vacant_key();
        if slot >= MAX_SLOTS {
            return None;
        }
        let generation = self.generation.wrapping_add(1) & (u32::MAX >> SLOT_BITS);
        Some(AllocationId((generation << SLOT_BITS) | slot as u32))
    }

    /// Inserts an allocation under the id `next_id` returned.
    pub fn insert(&mut self, id: AllocationId, new: NewAllocation) {
        self.generation = id.0 >> SLOT_BITS;
        let alloc = Allocation {
            id,
            client: new.client,
            relayed: new.relayed,
            username: new.username,
            key: new.key,
            expires: new.expires,
            perms: HashMap::with_hasher(self.sip),
            channels: HashMap::with_hasher(FastState),
            peer_channels: HashMap::with_hasher(self.sip),
            allocated: None,
            last: None,
            dont_fragment: new.dont_fragment,
            up: new.bandwidth.map(|b| ByteBucket::new(b, new.now)),
            down: new.bandwidth.map(|b| ByteBucket::new(b, new.now)),
            scheduled: None,
        };
        let slot = self.slab.insert(alloc);
        debug_assert_eq!(slot as u32, id.0 & SLOT_MASK);
        self.by_client.insert(new.client, id);
        self.by_relayed.insert(new.relayed, id);
        self.reschedule(id);
    }

    /// Removes an allocation; returns it.
    pub fn remove(&mut self, id: AllocationId) -> Option<Allocation> {
        self.get(id)?;
        let a = self.slab.remove((id.0 & SLOT_MASK) as usize);
        self.by_client.remove(&a.client);
        self.by_relayed.remove(&a.relayed);
        self.compact_timers();
        Some(a)
    }

    /// The allocation `id` (generation checked).
    #[inline]
    pub fn get(&self, id: AllocationId) -> Option<&Allocation> {
        self.slab
            .get((id.0 & SLOT_MASK) as usize)
            .filter(|a| a.id == id)
    }

    /// The allocation `id`, mutably.
    #[inline]
    pub fn get_mut(&mut self, id: AllocationId) -> Option<&mut Allocation> {
        self.slab
            .get_mut((id.0 & SLOT_MASK) as usize)
            .filter(|a| a.id == id)
    }

    /// The allocation of a client 5-tuple.
    #[inline]
    pub fn by_client(&self, client: &Client) -> Option<AllocationId> {
        self.by_client.get(client).copied()
    }

    /// The allocation of this worker owning relayed address `addr`.
    #[inline]
    pub fn by_relayed(&self, addr: &SocketAddr) -> Option<AllocationId> {
        if self.by_relayed.is_empty() {
            return None;
        }
        self.by_relayed.get(addr).copied()
    }

    /// Makes sure the timer heap fires no later than this allocation's next deadline.
    pub fn reschedule(&mut self, id: AllocationId) {
        let Some(a) = self.get_mut(id) else { return };
        let t = a.next_deadline();
        if a.scheduled.is_none_or(|s| t < s) {
            a.scheduled = Some(t);
            self.timers.push(Reverse((t, id.0)));
        }
    }

    /// Stale heap entries of freed allocations are skipped when they fire; when they outnumber
    /// the live ones the heap is rebuilt, so its size stays O(live allocations) under churn.
    fn compact_timers(&mut self) {
        if self.timers.len() <= 2 * self.slab.len() + 64 {
            return;
        }
        self.timers = self
            .slab
            .iter()
            .filter_map(|(_, a)| a.scheduled.map(|t| Reverse((t, a.id.0))))
            .collect();
    }

    /// Earliest timer.
    pub fn next_timer(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((t, _))| *t)
    }

    /// Pops due timers, sweeps their allocations and returns the ids whose allocation expired
    /// (still in the table: the caller frees them).
    pub fn expire(&mut self, now: Instant, expired: &mut Vec<AllocationId>) {
        while let Some(&Reverse((t, raw))) = self.timers.peek() {
            if t > now {
                break;
            }
            self.timers.pop();
            let id = AllocationId(raw);
            let Some(a) = self.get_mut(id) else { continue };
            if a.scheduled != Some(t) {
                continue; // superseded by an earlier entry
            }
            a.scheduled = None;
            if a.expires <= now {
                expired.push(id);
                continue;
            }
            a.sweep(now);
            self.reschedule(id);
        }
    }

    /// Ids of every allocation (for shutdown).
    pub fn ids(&self) -> Vec<AllocationId> {
        self.slab.iter().map(|(_, a)| a.id).collect()
    }
}
