//! Model check (loom) of the boost-state handshake between the guest API and the host's
//! `publish_state`: under every interleaving loom explores, once the guest has finished and
//! the host has handled every doorbell, the vCPU is boosted exactly when the guest still
//! requests it: no lost boost, no lost unboost. A host that skips the re-check after
//! publishing is shown to lose a boost, so the check can fail.
//!
//! The full fence of the protocol (`mfence`, `fence(SeqCst)`) is modelled as a read-modify-
//! write on one location shared by both sides: loom treats `SeqCst` as `AcqRel`, too weak for
//! this store→fence→load (Dekker) pattern, while RMWs on one location are totally ordered and
//! each synchronizes with the one before it, which is exactly what the fences' single total
//! order provides here.

use loom::sync::atomic::{AtomicU32, AtomicU8, Ordering::*};
use loom::sync::Arc;
use pvsched_proto::abi::{off, BoostState};
use pvsched_proto::guest::{Doorbell, PvGuest};
use pvsched_proto::host::publish_state;
use pvsched_proto::SlotMemory;

/// The handshake-relevant words of a slot, as model-checker atomics.
struct ModelSlot {
    seq: AtomicU32,
    request: AtomicU32,
    state: AtomicU32,
    depth: [AtomicU8; 5],
    rings: AtomicU32,
    fence: AtomicU32,
}

impl ModelSlot {
    fn new(state: BoostState) -> Self {
        ModelSlot {
            seq: AtomicU32::new(0),
            request: AtomicU32::new(0),
            state: AtomicU32::new(state as u32),
            depth: std::array::from_fn(|_| AtomicU8::new(0)),
            rings: AtomicU32::new(0),
            fence: AtomicU32::new(0),
        }
    }

    fn word(&self, off: usize) -> &AtomicU32 {
        match off {
            off::SEQ => &self.seq,
            off::REQUEST => &self.request,
            off::STATE => &self.state,
            o => panic!("word at {o} not modelled"),
        }
    }
}

#[derive(Clone)]
struct Shared(Arc<ModelSlot>);

impl SlotMemory for Shared {
    fn load_u32(&self, off: usize) -> u32 {
        self.0.word(off).load(Relaxed)
    }
    fn store_u32(&self, off: usize, v: u32) {
        self.0.word(off).store(v, Relaxed)
    }
    fn load_u8(&self, off: usize) -> u8 {
        self.0.depth[off - off::DEPTH].load(Relaxed)
    }
    fn store_u8(&self, off: usize, v: u8) {
        self.0.depth[off - off::DEPTH].store(v, Relaxed)
    }
    fn store_u64(&self, _off: usize, _v: u64) {}
    fn fence(&self) {
        self.0.fence.fetch_add(1, AcqRel);
    }
}

/// The doorbell is an eventfd: writing it (release) and reading it (acquire) are syscalls
/// that order the guest's slot stores before the host's loads.
impl Doorbell for Shared {
    fn ring(&self) {
        self.0.rings.fetch_add(1, Release);
    }
}

fn take_rings(slot: &Shared) -> u32 {
    slot.0.rings.swap(0, Acquire)
}

/// The host's reaction to a doorbell (or to anything else): make the boost follow the
/// request. With `recheck`, it re-reads the request after publishing, as the protocol says.
fn host_process(slot: &Shared, boosted: &mut bool, recheck: bool) {
    let mut request = slot.load_u32(off::REQUEST);
    loop {
        let want = request != 0;
        if want == *boosted {
            return;
        }
        *boosted = want;
        let state = if want {
            BoostState::Boosted
        } else {
            BoostState::Normal
        };
        if recheck {
            request = publish_state(slot, state);
        } else {
            slot.store_u32(off::STATE, state as u32);
            return;
        }
    }
}

/// Runs `guest_ops` against a host that processes once spontaneously and once per doorbell
/// seen, then drains the remaining doorbells and checks the invariant.
fn check(initial: BoostState, recheck: bool, guest_ops: fn(&PvGuest<Shared, Shared>)) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    builder.check(move || {
        let slot = Shared(Arc::new(ModelSlot::new(initial)));
        let guest = {
            let s = slot.clone();
            loom::thread::spawn(move || {
                let g = PvGuest::new(s.clone(), s);
                guest_ops(&g);
            })
        };
        let mut boosted = initial == BoostState::Boosted;
        // Spontaneous decision (e.g. after injecting an interrupt or a budget check).
        host_process(&slot, &mut boosted, recheck);
        if take_rings(&slot) > 0 {
            host_process(&slot, &mut boosted, recheck);
        }
        guest.join().unwrap();
        while take_rings(&slot) > 0 {
            host_process(&slot, &mut boosted, recheck);
        }
        let request = slot.0.request.load(Relaxed);
        assert_eq!(
            boosted,
            request != 0,
            "lost boost or unboost: request {request:#x} state {} seq {}",
            slot.0.state.load(Relaxed),
            slot.0.seq.load(Relaxed)
        );
        let state = slot.0.state.load(Relaxed);
        let expected = if boosted {
            BoostState::Boosted
        } else {
            BoostState::Normal
        };
        assert_eq!(state, expected as u32, "published state matches the host's");
    });
}

#[test]
fn request_then_release_from_normal() {
    check(BoostState::Normal, true, |g| {
        g.rt_task_switch(true);
        g.rt_task_switch(false);
    });
}

#[test]
fn nested_reasons_from_normal_end_requested() {
    check(BoostState::Normal, true, |g| {
        g.rt_task_switch(true);
        g.irq_enter();
        g.irq_exit();
    });
}

#[test]
fn request_while_host_unboosts_is_not_lost() {
    check(BoostState::Boosted, true, |g| {
        g.rt_task_switch(true);
    });
}

#[test]
fn release_while_host_boosts_is_not_lost() {
    check(BoostState::Normal, true, |g| {
        g.softirq_enter();
        g.softirq_exit();
    });
}

#[test]
#[should_panic(expected = "lost boost or unboost")]
fn host_without_recheck_loses_a_boost() {
    check(BoostState::Boosted, false, |g| {
        g.rt_task_switch(true);
    });
}
