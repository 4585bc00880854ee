//! The provided-buffer ring (`IORING_REGISTER_PBUF_RING`) a worker's multishot receives draw from.
//!
//! Ownership of a buffer id (`bid`) moves in a cycle, tracked in [`BufState`]:
//! `InRing` (kernel may fill it) -> `Received` (a CQE handed it to us; we parse it, the core
//! works on it in place) -> either straight back `InRing` (drop / reply) or `Sending` (a
//! `SEND` SQE points into it) -> `InRing` when the send's CQE arrives. A buffer is never in two
//! states at once; returning one twice or one we do not hold is refused (and is a bug).
//!
//! Returns are written into the ring memory immediately and published to the kernel with one
//! release store of the tail per loop iteration ([`BufRing::publish`]).

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;

/// Where a buffer is in its ownership cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BufState {
    /// In the ring: the kernel may fill it.
    InRing,
    /// Handed to us by a receive completion.
    Received,
    /// Referenced by an in-flight send.
    Sending,
}

/// Errors of the buffer-ring bookkeeping.
#[derive(Debug, thiserror::Error)]
pub enum BufRingError {
    /// Entry count must be a power of two between 1 and 32768.
    #[error("buffer ring entries must be a power of two in 1..=32768, got {0}")]
    BadEntries(u32),
    /// mmap of the ring or buffers failed.
    #[error("allocating buffer ring memory: {0}")]
    Alloc(io::Error),
}

/// One anonymous, page-aligned mapping (freed on drop).
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> Result<Self, BufRingError> {
        // SAFETY: anonymous private mapping, no file; the result is checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(BufRingError::Alloc(io::Error::last_os_error()));
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or(BufRingError::Alloc(io::Error::from(
            io::ErrorKind::OutOfMemory,
        )))?;
        Ok(Self { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned; nothing references it after drop
        // (the ring is unregistered / destroyed before the BufRing is dropped: see Worker).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A provided-buffer ring plus the buffers it hands out.
pub struct BufRing {
    ring: Mapping,
    bufs: Mapping,
    entries: u16,
    buf_size: usize,
    /// Our tail (entries written so far); published to the kernel by `publish`.
    tail: u16,
    state: Vec<BufState>,
    held: usize,
}

impl BufRing {
    /// Allocate `entries` buffers of `buf_size` bytes each (all initially in the ring).
    pub fn new(entries: u32, buf_size: usize) -> Result<Self, BufRingError> {
        if entries == 0 || entries > 32768 || !entries.is_power_of_two() {
            return Err(BufRingError::BadEntries(entries));
        }
        let ring = Mapping::new(entries as usize * std::mem::size_of::<BufRingEntry>())?;
        let bufs = Mapping::new(entries as usize * buf_size)?;
        let mut this = Self {
            ring,
            bufs,
            entries: entries as u16,
            buf_size,
            tail: 0,
            state: vec![BufState::Received; entries as usize],
            held: entries as usize,
        };
        for bid in 0..entries as u16 {
            this.give_back(bid);
        }
        this.publish();
        Ok(this)
    }

    /// Address of the ring memory (for `register_buf_ring_with_flags`).
    pub fn ring_addr(&self) -> u64 {
        self.ring.ptr.as_ptr() as u64
    }

    /// Number of ring entries.
    pub fn entries(&self) -> u16 {
        self.entries
    }

    /// Size of every buffer.
    pub fn buf_size(&self) -> usize {
        self.buf_size
    }

    /// Buffers currently held by us (received or sending), i.e. not available to the kernel.
    pub fn held(&self) -> usize {
        self.held
    }

    /// State of buffer `bid`.
    pub fn state(&self, bid: u16) -> Option<BufState> {
        self.state.get(bid as usize).copied()
    }

    /// A completion handed us `bid`: mark it received. `false` if the id is out of range or the
    /// kernel could not have owned it (bookkeeping bug; the caller counts it).
    pub fn take(&mut self, bid: u16) -> bool {
        match self.state.get_mut(bid as usize) {
            Some(s @ BufState::InRing) => {
                *s = BufState::Received;
                self.held += 1;
                true
            }
            _ => false,
        }
    }

    /// A received buffer is now referenced by a send.
    pub fn mark_sending(&mut self, bid: u16) -> bool {
        match self.state.get_mut(bid as usize) {
            Some(s @ BufState::Received) => {
                *s = BufState::Sending;
                true
            }
            _ => false,
        }
    }

    /// Return `bid` (received or sent) to the ring. `false` if it was already there.
    pub fn recycle(&mut self, bid: u16) -> bool {
        match self.state.get(bid as usize) {
            Some(BufState::Received | BufState::Sending) => {
                self.give_back(bid);
                true
            }
            _ => false,
        }
    }

    fn give_back(&mut self, bid: u16) {
        let mask = self.entries - 1;
        let slot = (self.tail & mask) as usize;
        // SAFETY: `slot < entries` and the mapping holds `entries` BufRingEntry values; the
        // kernel only reads entries between its head and our published tail, and this slot is
        // past the published tail (we hold this buffer, so the ring has a free slot for it).
        let entry = unsafe { &mut *self.ring.ptr.as_ptr().cast::<BufRingEntry>().add(slot) };
        entry.set_addr(self.buf_ptr(bid) as u64);
        entry.set_len(self.buf_size as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
        self.state[bid as usize] = BufState::InRing;
        self.held -= 1;
    }

    /// Make every returned buffer visible to the kernel (one release store).
    pub fn publish(&self) {
        // SAFETY: the ring base is a valid, initialised BufRingEntry array; `tail` gives the
        // address of the shared tail field, which the kernel reads with acquire semantics.
        unsafe {
            let tail = BufRingEntry::tail(self.ring.ptr.as_ptr().cast::<BufRingEntry>());
            (*(tail as *const AtomicU16)).store(self.tail, Ordering::Release);
        }
    }

    fn buf_ptr(&self, bid: u16) -> *mut u8 {
        // SAFETY: bid < entries (callers check), so the offset stays inside the mapping.
        unsafe { self.bufs.ptr.as_ptr().add(bid as usize * self.buf_size) }
    }

    /// Buffer `bid`, if we hold it (received or sending).
    pub fn buf_mut(&mut self, bid: u16) -> Option<&mut [u8]> {
        match self.state.get(bid as usize) {
            // SAFETY: we hold the buffer (the kernel will not write it until we return it) and
            // the `&mut self` borrow makes this the only reference.
            Some(BufState::Received | BufState::Sending) => {
                Some(unsafe { std::slice::from_raw_parts_mut(self.buf_ptr(bid), self.buf_size) })
            }
            _ => None,
        }
    }

    /// Entry `slot` of the ring as published (tests only: check what the kernel would read).
    #[cfg(test)]
    fn entry(&self, slot: u16) -> (u64, u32, u16) {
        // SAFETY: slot masked into range; the mapping is initialised.
        let e = unsafe {
            &*self
                .ring
                .ptr
                .as_ptr()
                .cast::<BufRingEntry>()
                .add((slot & (self.entries - 1)) as usize)
        };
        (e.addr(), e.len(), e.bid())
    }

    /// Published tail (tests only).
    #[cfg(test)]
    fn published_tail(&self) -> u16 {
        // SAFETY: as in `publish`.
        unsafe {
            let tail = BufRingEntry::tail(self.ring.ptr.as_ptr().cast::<BufRingEntry>());
            (*(tail as *const AtomicU16)).load(Ordering::Acquire)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_full_and_cycles_ownership() {
        let mut ring = BufRing::new(8, 256).unwrap();
        assert_eq!(ring.held(), 0);
        assert_eq!(ring.published_tail(), 8);
        for slot in 0..8u16 {
            let (addr, len, bid) = ring.entry(slot);
            assert_eq!(bid, slot);
            assert_eq!(len, 256);
            assert_eq!(addr, ring.buf_ptr(bid) as u64);
        }
        // Kernel hands out bid 3; we forward it (sending), then the send completes.
        assert!(ring.take(3));
        assert!(!ring.take(3), "taken twice");
        assert_eq!(ring.held(), 1);
        assert!(ring.buf_mut(3).is_some());
        assert!(ring.buf_mut(4).is_none(), "not ours");
        assert!(ring.mark_sending(3));
        assert!(!ring.mark_sending(3));
        assert!(ring.recycle(3));
        assert!(!ring.recycle(3), "double return refused");
        assert_eq!(ring.held(), 0);
        // Not visible to the kernel until published.
        assert_eq!(ring.published_tail(), 8);
        ring.publish();
        assert_eq!(ring.published_tail(), 9);
        let (_, _, bid) = ring.entry(8);
        assert_eq!(bid, 3);
    }

    #[test]
    fn tail_wraps_and_bounds_are_checked() {
        let mut ring = BufRing::new(4, 64).unwrap();
        for round in 0..20_000u32 {
            let bid = (round % 4) as u16;
            assert!(ring.take(bid));
            assert!(ring.recycle(bid));
            ring.publish();
        }
        assert_eq!(ring.published_tail(), (4u32 + 20_000) as u16);
        assert!(!ring.take(4));
        assert!(!ring.recycle(u16::MAX));
        assert!(BufRing::new(3, 64).is_err());
        assert!(BufRing::new(0, 64).is_err());
    }
}
