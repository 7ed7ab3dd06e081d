//! The guest side: boost requests with nesting per reason, released synchronously.
//!
//! Rules (`docs/protocol.md`, "Handshake"):
//!
//! - **enter(r)**: depth\[r\] += 1; if it was 0, set r's bit in `request`; `seq` += 1; full
//!   fence; then read `state`: if r was newly set and the state is `Normal`, ring the doorbell
//!   ("boost me"). When the vCPU is already `Boosted` nothing else happens: a lazy request
//!   costs a few stores and no exit.
//! - **exit(r)**: depth\[r\] -= 1; if it reached 0, clear r's bit; `seq` += 1; full fence; then
//!   if `request` is empty and the state is `Boosted`, ring the doorbell ("unboost me").
//!
//! Each vCPU updates only its own slot, with interrupts that could nest (NMIs aside) either
//! disabled or themselves following these rules, so the guest half has a single writer.

use crate::abi::{off, BoostState, Reason};
use crate::SlotMemory;
use core::sync::atomic::{fence, Ordering};

/// Rings the doorbell: on x86 an `out` to the vCPU's doorbell port.
pub trait Doorbell {
    /// Tells the host to look at this vCPU's slot now.
    fn ring(&self);
}

/// What a request or release did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Slot updated; no doorbell needed (already boosted, nested, or boosting is off).
    Quiet,
    /// Slot updated and the doorbell rung to ask for a boost.
    RangBoost,
    /// Slot updated and the doorbell rung to ask for an unboost.
    RangUnboost,
    /// Release without a matching request: nothing changed.
    Unbalanced,
    /// Nesting deeper than a byte can count: nothing changed.
    TooDeep,
}

/// The guest API on one vCPU's slot.
pub struct PvGuest<M: SlotMemory, D: Doorbell> {
    mem: M,
    bell: D,
}

impl<M: SlotMemory, D: Doorbell> PvGuest<M, D> {
    /// Uses the slot behind `mem`, registered with the host, and the vCPU's doorbell.
    pub fn new(mem: M, bell: D) -> Self {
        PvGuest { mem, bell }
    }

    /// The slot access.
    pub fn memory(&self) -> &M {
        &self.mem
    }

    fn state(&self) -> Option<BoostState> {
        BoostState::from_u32(self.mem.load_u32(off::STATE))
    }

    fn bump_seq(&self) {
        let s = self.mem.load_u32(off::SEQ);
        self.mem.store_u32(off::SEQ, s.wrapping_add(1));
    }

    /// Requests a boost for `reason` (nests).
    pub fn enter(&self, reason: Reason) -> Outcome {
        let d_off = off::DEPTH + reason.index();
        let depth = self.mem.load_u8(d_off);
        if depth == u8::MAX {
            return Outcome::TooDeep;
        }
        self.mem.store_u8(d_off, depth + 1);
        if depth == 0 {
            let req = self.mem.load_u32(off::REQUEST);
            self.mem.store_u32(off::REQUEST, req | reason.bit());
        }
        self.bump_seq();
        self.mem.fence();
        if depth == 0 && self.state() == Some(BoostState::Normal) {
            self.bell.ring();
            Outcome::RangBoost
        } else {
            Outcome::Quiet
        }
    }

    /// Releases one request for `reason`.
    pub fn exit(&self, reason: Reason) -> Outcome {
        let d_off = off::DEPTH + reason.index();
        let depth = self.mem.load_u8(d_off);
        if depth == 0 {
            return Outcome::Unbalanced;
        }
        self.mem.store_u8(d_off, depth - 1);
        if depth == 1 {
            let req = self.mem.load_u32(off::REQUEST);
            self.mem.store_u32(off::REQUEST, req & !reason.bit());
        }
        self.bump_seq();
        self.mem.fence();
        if self.mem.load_u32(off::REQUEST) == 0 && self.state() == Some(BoostState::Boosted) {
            self.bell.ring();
            Outcome::RangUnboost
        } else {
            Outcome::Quiet
        }
    }

    /// Hard-interrupt entry (RFC v1: `irqentry_enter`).
    pub fn irq_enter(&self) -> Outcome {
        self.enter(Reason::Irq)
    }

    /// Hard-interrupt exit.
    pub fn irq_exit(&self) -> Outcome {
        self.exit(Reason::Irq)
    }

    /// NMI entry.
    pub fn nmi_enter(&self) -> Outcome {
        self.enter(Reason::Nmi)
    }

    /// NMI exit.
    pub fn nmi_exit(&self) -> Outcome {
        self.exit(Reason::Nmi)
    }

    /// Softirq processing starts.
    pub fn softirq_enter(&self) -> Outcome {
        self.enter(Reason::Softirq)
    }

    /// Softirq processing ends.
    pub fn softirq_exit(&self) -> Outcome {
        self.exit(Reason::Softirq)
    }

    /// The scheduler switched an RT task in (`true`) or out (`false`).
    pub fn rt_task_switch(&self, rt_in: bool) -> Outcome {
        if rt_in {
            self.enter(Reason::RtTask)
        } else {
            self.exit(Reason::RtTask)
        }
    }

    /// Preemption disabled.
    pub fn preempt_disable(&self) -> Outcome {
        self.enter(Reason::PreemptDisabled)
    }

    /// Preemption enabled again.
    pub fn preempt_enable(&self) -> Outcome {
        self.exit(Reason::PreemptDisabled)
    }

    /// Publishes the next latency-critical deadline (guest TSC), or none.
    pub fn set_deadline(&self, tsc: Option<u64>) {
        self.mem.store_u64(off::DEADLINE_TSC, tsc.unwrap_or(0));
        self.bump_seq();
    }

    /// Names another vCPU (`vcpu` index) with a [`crate::abi::hint_kind`], or clears the hint.
    pub fn set_hint(&self, hint: Option<(u32, u32)>) {
        let (v, k) = hint.map_or((0, 0), |(v, k)| (v.saturating_add(1), k));
        self.mem.store_u32(off::HINT_VCPU, v);
        self.mem.store_u32(off::HINT_KIND, k);
        self.bump_seq();
    }

    /// A request for `reason` that is released when the guard drops.
    pub fn guard(&self, reason: Reason) -> BoostGuard<'_, M, D> {
        self.enter(reason);
        BoostGuard {
            guest: self,
            reason,
        }
    }
}

/// Holds a boost request; releases it on drop.
pub struct BoostGuard<'a, M: SlotMemory, D: Doorbell> {
    guest: &'a PvGuest<M, D>,
    reason: Reason,
}

impl<M: SlotMemory, D: Doorbell> Drop for BoostGuard<'_, M, D> {
    fn drop(&mut self) {
        self.guest.exit(self.reason);
    }
}

/// Slot access through a raw pointer, for guest kernels.
pub struct RawSlot(*mut u8);

impl RawSlot {
    /// Wraps the slot at `ptr`.
    ///
    /// # Safety
    ///
    /// `ptr` must point to a [`crate::abi::Slot`] that stays mapped and registered for as long
    /// as the `RawSlot` is used, and only this vCPU may write its guest half.
    pub unsafe fn new(ptr: *mut crate::abi::Slot) -> Self {
        RawSlot(ptr.cast())
    }
}

impl SlotMemory for RawSlot {
    fn load_u32(&self, off: usize) -> u32 {
        // SAFETY: `new`'s contract: the slot is mapped; every offset used is a field offset
        // inside it, aligned for its type.
        unsafe { self.0.add(off).cast::<u32>().read_volatile() }
    }
    fn store_u32(&self, off: usize, v: u32) {
        // SAFETY: as in `load_u32`.
        unsafe { self.0.add(off).cast::<u32>().write_volatile(v) }
    }
    fn load_u8(&self, off: usize) -> u8 {
        // SAFETY: as in `load_u32`.
        unsafe { self.0.add(off).read_volatile() }
    }
    fn store_u8(&self, off: usize, v: u8) {
        // SAFETY: as in `load_u32`.
        unsafe { self.0.add(off).write_volatile(v) }
    }
    fn store_u64(&self, off: usize, v: u64) {
        // SAFETY: as in `load_u32`.
        unsafe { self.0.add(off).cast::<u64>().write_volatile(v) }
    }
    fn fence(&self) {
        fence(Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::Slot;
    use core::cell::Cell;

    struct Bell<'a>(&'a Cell<u32>);
    impl Doorbell for Bell<'_> {
        fn ring(&self) {
            self.0.set(self.0.get() + 1);
        }
    }

    fn with_guest(
        state: BoostState,
        f: impl FnOnce(&PvGuest<RawSlot, Bell<'_>>, &Cell<u32>),
    ) -> Slot {
        let mut slot = Slot {
            state: state as u32,
            ..Slot::default()
        };
        let rings = Cell::new(0);
        {
            // SAFETY: `slot` outlives `g`, which this block drops.
            let g = PvGuest::new(unsafe { RawSlot::new(&mut slot) }, Bell(&rings));
            f(&g, &rings);
        }
        slot
    }

    #[test]
    fn first_request_rings_when_normal_nested_ones_do_not() {
        let slot = with_guest(BoostState::Normal, |g, rings| {
            assert_eq!(g.rt_task_switch(true), Outcome::RangBoost);
            assert_eq!(g.rt_task_switch(true), Outcome::Quiet, "nested");
            assert_eq!(g.irq_enter(), Outcome::RangBoost, "new reason");
            assert_eq!(rings.get(), 2);
        });
        assert_eq!(slot.request, Reason::RtTask.bit() | Reason::Irq.bit());
        assert_eq!(slot.depth[Reason::RtTask.index()], 2);
        assert_eq!(slot.seq, 3);
    }

    #[test]
    fn requests_while_boosted_are_lazy_and_last_release_rings() {
        let slot = with_guest(BoostState::Boosted, |g, rings| {
            assert_eq!(g.preempt_disable(), Outcome::Quiet);
            assert_eq!(g.softirq_enter(), Outcome::Quiet);
            assert_eq!(g.softirq_exit(), Outcome::Quiet, "preempt still held");
            assert_eq!(rings.get(), 0);
            assert_eq!(g.preempt_enable(), Outcome::RangUnboost);
            assert_eq!(rings.get(), 1);
        });
        assert_eq!(slot.request, 0);
        assert_eq!(slot.depth, [0; 8]);
    }

    #[test]
    fn disabled_and_throttled_never_ring() {
        for s in [BoostState::Disabled, BoostState::Throttled] {
            with_guest(s, |g, rings| {
                g.irq_enter();
                g.irq_exit();
                assert_eq!(rings.get(), 0, "{s:?}");
            });
        }
    }

    #[test]
    fn unbalanced_and_too_deep_change_nothing() {
        let slot = with_guest(BoostState::Normal, |g, _| {
            assert_eq!(g.irq_exit(), Outcome::Unbalanced);
            for _ in 0..255 {
                g.nmi_enter();
            }
            assert_eq!(g.nmi_enter(), Outcome::TooDeep);
        });
        assert_eq!(slot.depth[Reason::Nmi.index()], 255);
        assert_eq!(slot.depth[Reason::Irq.index()], 0);
    }

    #[test]
    fn guard_releases_on_drop_and_hints_are_written() {
        let slot = with_guest(BoostState::Boosted, |g, rings| {
            {
                let _g = g.guard(Reason::RtTask);
                assert_eq!(rings.get(), 0);
            }
            assert_eq!(rings.get(), 1, "unboost rung when the guard dropped");
            g.set_deadline(Some(1234));
            g.set_hint(Some((3, crate::abi::hint_kind::LOCK_HOLDER)));
        });
        assert_eq!(slot.deadline_tsc, 1234);
        assert_eq!((slot.hint_vcpu, slot.hint_kind), (4, 1));
    }
}
