//! A pvsched slot in guest memory (a `vm-memory` mapping), accessed with atomics: the host
//! side of the protocol's shared memory, for the reference VMM and for the daemon's mapping of
//! a VMM's guest-memory file alike.

use pvsched_proto::SlotMemory;
use std::sync::atomic::Ordering;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// A slot in guest memory, accessed with atomics. Addresses were validated at registration;
/// a failed access reads as 0 and writes nothing.
pub struct GuestSlot<'a> {
    mem: &'a GuestMemoryMmap,
    gpa: u64,
}

impl<'a> GuestSlot<'a> {
    /// The slot at `gpa`.
    pub fn new(mem: &'a GuestMemoryMmap, gpa: u64) -> Self {
        GuestSlot { mem, gpa }
    }

    fn addr(&self, off: usize) -> GuestAddress {
        GuestAddress(self.gpa + off as u64)
    }

    /// Loads the `u64` at byte offset `off` atomically (a v3 page's words); 0 on failure.
    pub fn load_u64(&self, off: usize) -> u64 {
        self.mem
            .load(self.addr(off), Ordering::Acquire)
            .unwrap_or(0)
    }
}

impl SlotMemory for GuestSlot<'_> {
    fn load_u32(&self, off: usize) -> u32 {
        self.mem
            .load(self.addr(off), Ordering::Acquire)
            .unwrap_or(0)
    }
    fn store_u32(&self, off: usize, v: u32) {
        let _ = self.mem.store(v, self.addr(off), Ordering::Release);
    }
    fn load_u8(&self, off: usize) -> u8 {
        self.mem
            .load(self.addr(off), Ordering::Acquire)
            .unwrap_or(0)
    }
    fn store_u8(&self, off: usize, v: u8) {
        let _ = self.mem.store(v, self.addr(off), Ordering::Release);
    }
    fn store_u64(&self, off: usize, v: u64) {
        let _ = self.mem.store(v, self.addr(off), Ordering::Release);
    }
    fn fence(&self) {
        std::sync::atomic::fence(Ordering::SeqCst);
    }
}
