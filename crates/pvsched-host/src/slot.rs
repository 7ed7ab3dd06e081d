//! A pvsched slot in guest memory (a `vm-memory` mapping), accessed with atomics: the host
//! side of the protocol's shared memory, for the reference VMM and for the daemon's mapping of
//! a VMM's guest-memory file alike.

use pvsched_proto::v3::{self, AppliedState, GuestArea, PageError};
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

/// A pvsched v3 page (`pvsched_proto::v3`) in guest memory, for the reference VMM and the
/// daemon alike: negotiated when it is attached, its guest words read atomically, the host's
/// feedback published with the protocol's fence and re-read. The address was validated
/// (4096-aligned, inside guest memory) by the caller; a failed access reads as zeros.
pub struct GuestPage<'a> {
    slot: GuestSlot<'a>,
    mem: &'a GuestMemoryMmap,
    gpa: u64,
}

impl<'a> GuestPage<'a> {
    /// The page at `gpa`.
    pub fn new(mem: &'a GuestMemoryMmap, gpa: u64) -> Self {
        GuestPage {
            slot: GuestSlot::new(mem, gpa),
            mem,
            gpa,
        }
    }

    /// Negotiates the page as it stands (`v3::negotiate`: the ABI's rejection order) and
    /// writes the answer into its header, the status last after a fence so that a guest that
    /// sees it sees the rest; an enabled page also gets a zero host area. `None` when the
    /// page cannot be read.
    pub fn negotiate(&self) -> Option<v3::Status> {
        let mut page = vec![0u8; v3::PAGE_SIZE];
        self.mem
            .read_slice(&mut page, GuestAddress(self.gpa))
            .ok()?;
        let answer = v3::negotiate(&page).ok()?;
        let mut header = [0u8; 64];
        answer.write(&mut header);
        if answer.status == v3::Status::Enabled {
            self.slot
                .store_u64(v3::off::APPLIED_STATE, AppliedState::default().encode());
            self.slot.store_u64(v3::off::INTERRUPT_TICKET, 0);
        }
        for off in [
            v3::off::HOST_ABI_VERSION,
            v3::off::ACCEPTED_MODE,
            v3::off::HEADER_RESERVED,
        ] {
            let w = u32::from_le_bytes([
                header[off],
                header[off + 1],
                header[off + 2],
                header[off + 3],
            ]);
            self.slot.store_u32(off, w);
        }
        self.slot.fence();
        self.slot.store_u32(v3::off::STATUS, answer.status as u32);
        Some(answer.status)
    }

    /// Attaches a page a running guest may have been using with another host (the daemon
    /// attaching, or restarted): a page already `Enabled` whose request is the default one is
    /// adopted as it is (its acknowledgement may be nonzero; the host area is reset); a page
    /// whose request is still all zeros (the guest has not written it) is left untouched and
    /// reported `Disabled`; anything else is negotiated afresh ([`GuestPage::negotiate`]).
    pub fn attach(&self) -> Option<v3::Status> {
        let mut header = [0u8; v3::off::STATUS];
        self.mem
            .read_slice(&mut header, GuestAddress(self.gpa))
            .ok()?;
        let request = v3::Request::read(&header).ok()?;
        if header.iter().all(|&b| b == 0) {
            return Some(v3::Status::Disabled);
        }
        let enabled = self.slot.load_u32(v3::off::STATUS) == v3::Status::Enabled as u32;
        if enabled && request == v3::Request::default_policy() {
            self.slot
                .store_u64(v3::off::APPLIED_STATE, AppliedState::default().encode());
            return Some(v3::Status::Enabled);
        }
        self.negotiate()
    }

    /// The three guest words (task intent, critical sections, acknowledgement), each loaded
    /// atomically: a cheap "did it change?".
    pub fn words(&self) -> [u64; 3] {
        [
            self.slot.load_u64(v3::off::TASK_INTENT),
            self.slot.load_u64(v3::off::CS_STATE),
            self.slot.load_u64(v3::off::INTERRUPT_ACK),
        ]
    }

    /// The guest area decoded (its reserved bytes checked too).
    pub fn area(&self) -> Result<GuestArea, PageError> {
        let [intent, cs, ack] = self.words();
        let mut reserved = [0u8; v3::off::APPLIED_STATE - v3::off::GUEST_RESERVED];
        self.mem
            .read_slice(
                &mut reserved,
                GuestAddress(self.gpa + v3::off::GUEST_RESERVED as u64),
            )
            .map_err(|_| PageError::Short { len: 0 })?;
        v3::decode_guest_words(intent, cs, ack, &reserved)
    }

    /// Publishes `applied` and `ticket`, then (after a full fence) re-reads the guest area.
    pub fn publish(&self, applied: AppliedState, ticket: u64) -> Result<GuestArea, PageError> {
        self.slot.store_u64(v3::off::INTERRUPT_TICKET, ticket);
        self.slot
            .store_u64(v3::off::APPLIED_STATE, applied.encode());
        self.slot.fence();
        self.area()
    }
}

#[cfg(test)]
mod page_tests {
    use super::*;
    use pvsched_proto::v3::{Request, Status, TaskDesc, TaskIntent};

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap()
    }

    #[test]
    fn a_page_is_negotiated_read_and_published() {
        let m = mem();
        let mut req = [0u8; 64];
        Request::default_policy().write(&mut req);
        m.write_slice(&req, GuestAddress(0x1000)).unwrap();
        let p = GuestPage::new(&m, 0x1000);
        assert_eq!(p.negotiate(), Some(Status::Enabled));
        let status: u32 = m.read_obj(GuestAddress(0x1000 + 48)).unwrap();
        assert_eq!(status, 1);
        let intent = TaskIntent {
            current: TaskDesc::fifo(9),
            pending: None,
            idle: false,
        };
        m.write_obj(intent.encode(), GuestAddress(0x1000 + 64))
            .unwrap();
        assert_eq!(p.area().unwrap().intent, intent);
        let applied = AppliedState {
            boost: v3::BoostKind::Task,
            hints: 1,
            flags: 0,
        };
        assert_eq!(p.publish(applied, 7).unwrap().intent, intent);
        let w: u64 = m.read_obj(GuestAddress(0x1000 + 128)).unwrap();
        assert_eq!(w, applied.encode());
        let t: u64 = m.read_obj(GuestAddress(0x1000 + 136)).unwrap();
        assert_eq!(t, 7);
        // Another page with a wrong ABI version: refused, reason in its header.
        let mut r = Request::default_policy();
        r.abi_version = 9;
        r.write(&mut req);
        m.write_slice(&req, GuestAddress(0x2000)).unwrap();
        assert_eq!(
            GuestPage::new(&m, 0x2000).negotiate(),
            Some(Status::AbiMismatch)
        );
        let status: u32 = m.read_obj(GuestAddress(0x2000 + 48)).unwrap();
        assert_eq!(status, Status::AbiMismatch as u32);
        // Attaching: the live, enabled page (whose guest echoed a ticket) is adopted, not
        // refused for its acknowledgement; an untouched page is left alone.
        m.write_obj(5u64, GuestAddress(0x1000 + 80)).unwrap();
        assert_eq!(p.attach(), Some(Status::Enabled));
        let w: u64 = m.read_obj(GuestAddress(0x1000 + 128)).unwrap();
        assert_eq!(w, 0, "host area reset");
        assert_eq!(
            p.negotiate(),
            Some(Status::Disabled),
            "a fresh negotiation refuses it"
        );
        assert_eq!(GuestPage::new(&m, 0x3000).attach(), Some(Status::Disabled));
        let status: u32 = m.read_obj(GuestAddress(0x3000 + 48)).unwrap();
        assert_eq!(status, 0, "nothing written into an untouched page");
    }
}
