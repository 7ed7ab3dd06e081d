//! The testbed's mailbox: one per vCPU, shared between the VMM and the guest.
//!
//! This is the *measurement* ABI of the testbed guest (parameters in, samples out), not the
//! pvsched protocol. Every field is a little-endian `u64` at a fixed offset; the guest
//! addresses them from the mailbox base it receives in `%rbx`, the VMM through
//! [`Mailbox`] offsets (`core::mem::offset_of!`).
//!
//! Ownership: fields up to `stop` are written by the VMM before the vCPU starts (`stop` also
//! while it runs); all others are written by the guest only. The latency ring is a single
//! producer (guest) / single consumer (VMM) ring: the guest writes `ring[head % RING_LEN]`
//! and then increments `ring_head`; x86 stores are not reordered with each other, so a VMM
//! that reads `ring_head` with acquire ordering sees the entries below it.

/// `Mailbox::magic` value the VMM writes and the guest checks.
pub const MAILBOX_MAGIC: u64 = 0x7076_7363_6865_6431; // "pvsched1"

/// Number of entries in the wake-latency ring (a power of two).
pub const RING_LEN: usize = 4096;

/// Size of the per-vCPU region (mailbox, ring, stack) in guest memory.
pub const VCPU_REGION_SIZE: u64 = 0x10000;

/// Offset of the wake-latency ring inside the per-vCPU region.
pub const RING_OFFSET: u64 = 0x1000;

/// Bit in [`Mailbox::flags`]: keep the vCPU busy between timer events (`--guest-load busy`).
pub const FLAG_BUSY: u64 = 1 << 0;

/// Bit in [`Mailbox::flags`]: after setting up pvsched, run the lazy-request exercise once
/// (test hook, see `docs/testbed.md`).
pub const FLAG_PV_EXERCISE: u64 = 1 << 1;

/// Bit in [`Mailbox::flags`]: after setting up pvsched, behave like a rogue guest: request a
/// boost (a preempt-off section) and spin forever without releasing it, staying interruptible
/// and stoppable (test hook).
pub const FLAG_PV_ROGUE: u64 = 1 << 2;

/// Bit in [`Mailbox::flags`]: after setting up pvsched, switch between an RT-task request and
/// an IRQ request every [`Mailbox::pv_alternate_tsc`] cycles, never releasing both (the
/// budget dodge of per-reason timers), staying interruptible and stoppable.
pub const FLAG_PV_ALTERNATE: u64 = 1 << 3;

/// Offset of the pvsched slot inside the per-vCPU region (128-byte aligned).
pub const SLOT_OFFSET: u64 = 0x800;

/// Offset of the pvsched v3 page inside the per-vCPU region (4096-byte aligned), used when
/// the guest negotiates version 3 (`pvsched vm --pv v3`).
pub const V3_PAGE_OFFSET: u64 = 0x9000;

/// Values of [`Mailbox::pv_status`].
pub mod pv_status {
    /// The guest was told not to use pvsched (`pv_offer` = 0).
    pub const NOT_TRIED: u64 = 0;
    /// No pvsched signature in CPUID.
    pub const NOT_FOUND: u64 = 1;
    /// Negotiation found no common version: running without boosting.
    pub const NO_VERSION: u64 = 2;
    /// Negotiated and slot registered: requests are published.
    pub const ENABLED: u64 = 3;
    /// Version 3 negotiated and the v3 page enabled: task intent and critical sections are
    /// published in the page.
    pub const ENABLED_V3: u64 = 4;
    /// Version 3 negotiated but the host refused the page: the status is in the page's
    /// header; running without boosting.
    pub const V3_REFUSED: u64 = 5;
}

/// Shift of the fault-injection field in [`Mailbox::flags`] (test hook, see [`FaultInjection`]).
pub const FLAG_FAULT_SHIFT: u32 = 8;

/// Guest phases reported in [`Mailbox::state`].
pub mod state {
    /// The vCPU has not executed guest code yet.
    pub const NOT_STARTED: u64 = 0;
    /// The guest is calibrating its work loop.
    pub const CALIBRATING: u64 = 1;
    /// The latency probe and the deadline task are running.
    pub const RUNNING: u64 = 2;
    /// The guest saw `stop` and finished cleanly.
    pub const DONE: u64 = 3;
}

/// A fault the guest raises on purpose at start, so tests can check that faults become
/// clear errors rather than hangs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum FaultInjection {
    /// Run normally.
    None = 0,
    /// Execute `ud2` (#UD, vector 6).
    InvalidOpcode = 1,
    /// Execute `popcnt`, which KVM's instruction emulator does not implement; where guest
    /// CPL0 code runs natively (VMX/SVM) it simply executes.
    UnsupportedInstruction = 2,
    /// Load from a non-canonical address (#GP, vector 13).
    GeneralProtection = 3,
    /// Load from an unmapped address (#PF, vector 14).
    PageFault = 4,
}

/// The mailbox at the start of each vCPU's region. `repr(C)`, all `u64`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Mailbox {
    /// [`MAILBOX_MAGIC`].
    pub magic: u64,
    /// Index of this vCPU.
    pub vcpu_index: u64,
    /// Latency-probe period in TSC cycles.
    pub interval_tsc: u64,
    /// Deadline-task period in TSC cycles; 0 disables the task.
    pub task_period_tsc: u64,
    /// Work per deadline-task job, in TSC cycles as measured by the guest's calibration.
    pub task_work_tsc: u64,
    /// [`FLAG_BUSY`] and the fault-injection field.
    pub flags: u64,
    /// Non-zero: the guest stops at its next loop iteration.
    pub stop: u64,
    /// Guest phase, see [`state`].
    pub state: u64,
    /// TSC read by the timer handler's first instruction.
    pub fired_tsc: u64,
    /// Timer interrupts taken.
    pub irqs: u64,
    /// Timer interrupts already processed by the main loop.
    pub irqs_seen: u64,
    /// Deadline currently programmed into IA32_TSC_DEADLINE.
    pub armed_tsc: u64,
    /// Next latency-probe deadline.
    pub probe_deadline: u64,
    /// Next deadline-task release that the timer will signal.
    pub task_release: u64,
    /// Release time of the oldest job not yet run.
    pub job_release: u64,
    /// Jobs released and not yet run.
    pub jobs_pending: u64,
    /// Latency samples written to the ring so far (the ring's head).
    pub ring_head: u64,
    /// Samples where the interrupt arrived before the deadline (recorded as 0).
    pub early: u64,
    /// Deadline-task jobs completed.
    pub jobs_done: u64,
    /// Jobs that finished after their deadline (release + period).
    pub glitches: u64,
    /// Largest job response time (finish − release), TSC cycles.
    pub response_max: u64,
    /// Sum of job response times, TSC cycles.
    pub response_sum: u64,
    /// Iterations of the work loop per job, from calibration.
    pub work_iters: u64,
    /// Calibrated TSC cycles per work-loop iteration.
    pub work_iter_tsc: u64,
    /// Exits to the VMM taken to stay interruptible (busy wait and work loop).
    pub yield_exits: u64,
    /// Interrupts taken on the external-event vector (injected by the VMM, e.g. via irqfd).
    pub event_irqs: u64,
    /// TSC read by the external-event handler's first instruction, last time it ran.
    pub event_tsc: u64,
    /// pvsched offer the guest makes (versions bitmap | features << 32); 0: do not use
    /// pvsched.
    pub pv_offer: u64,
    /// Iterations of the lazy-request exercise ([`FLAG_PV_EXERCISE`]).
    pub pv_exercise_iters: u64,
    /// Outcome of discovery and negotiation, see [`pv_status`].
    pub pv_status: u64,
    /// First pvsched MSR, from CPUID.
    pub pv_msr_base: u64,
    /// This vCPU's doorbell port, from CPUID.
    pub pv_port: u64,
    /// The host's answer to the offer (version | features << 32).
    pub pv_answer: u64,
    /// Boost requests made (every enter hook).
    pub pv_requests: u64,
    /// Requests that needed no doorbell (already boosted, or nested).
    pub pv_quiet: u64,
    /// "Boost me" doorbells rung.
    pub pv_boost_rings: u64,
    /// "Unboost me" doorbells rung.
    pub pv_unboost_rings: u64,
    /// Probe periods skipped because their deadline had already passed when the probe
    /// re-armed (cyclictest's rule: a late guest skips to the next period in the future
    /// instead of accumulating a backlog that would read as latency).
    pub overruns: u64,
    /// Deadline-task jobs missed: releases skipped because the task was already more than a
    /// period behind, plus the backlog dropped then (an audio xrun: the task restarts with
    /// the latest release instead of working off a backlog it can never catch up with).
    pub task_missed: u64,
    /// Exits taken before a halt so the host sees the deadline just armed (protocol v1 only;
    /// a busy guest's next yield exit, a few instructions after the re-arm, does that).
    pub deadline_exits: u64,
    /// Length of one phase of [`FLAG_PV_ALTERNATE`], TSC cycles.
    pub pv_alternate_tsc: u64,
    /// v3: the `task_intent` word published while the deadline task runs a job.
    pub pv_v3_task: u64,
    /// v3: the `task_intent` word published while running anything else (the busy loop).
    pub pv_v3_busy: u64,
    /// v3: the `task_intent` word published while halted.
    pub pv_v3_idle: u64,
    /// v3: private nesting depth per critical-section bit (bytes: NMI, hardirq, softirq,
    /// preempt-off), the page holding only the aggregate bits.
    pub pv_v3_depth: u64,
    /// v3: 1 while the deadline task's intent is published.
    pub pv_v3_in_task: u64,
    /// v3: interrupt tickets echoed.
    pub pv_acks: u64,
}

impl Mailbox {
    /// Fault injection requested by `flags`.
    pub fn fault_injection(&self) -> u64 {
        (self.flags >> FLAG_FAULT_SHIFT) & 0xff
    }
}

const _: () = assert!(core::mem::size_of::<Mailbox>() <= SLOT_OFFSET as usize);
const _: () = assert!(SLOT_OFFSET.is_multiple_of(128) && SLOT_OFFSET + 128 <= RING_OFFSET);
const _: () = assert!(RING_LEN.is_power_of_two());
const _: () = assert!(RING_OFFSET as usize + RING_LEN * 8 < VCPU_REGION_SIZE as usize - 0x1000);
const _: () = assert!(
    V3_PAGE_OFFSET.is_multiple_of(4096)
        && V3_PAGE_OFFSET >= RING_OFFSET + RING_LEN as u64 * 8
        && V3_PAGE_OFFSET + 0x1000 + 0x4000 <= VCPU_REGION_SIZE,
    "the v3 page lies between the ring and at least 16 KiB of stack"
);
const _: () = assert!(core::mem::offset_of!(Mailbox, magic) == 0);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_injection_field_round_trips() {
        let m = Mailbox {
            flags: FLAG_BUSY | ((FaultInjection::PageFault as u64) << FLAG_FAULT_SHIFT),
            ..Default::default()
        };
        assert_eq!(m.fault_injection(), 4);
        assert_eq!(m.flags & FLAG_BUSY, FLAG_BUSY);
    }

    #[test]
    fn stack_has_room_above_ring() {
        let ring_end = RING_OFFSET + (RING_LEN as u64) * 8;
        assert!(VCPU_REGION_SIZE - ring_end >= 0x1000);
    }
}
