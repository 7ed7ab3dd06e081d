//! pvsched's policy engine: which vCPU threads run boosted, when, and for how long.
//!
//! The engine is a pure, deterministic state machine: [`Event`]s and the current time go in,
//! [`Decision`]s come out (boost a vCPU thread to a class, unboost it, publish a boost state
//! to the guest, arm a timer). It makes no syscalls and reads no clock, so the testbed, the
//! daemon and the tests drive it the same way, and every driver is tested with scripted events
//! and fake time.
//!
//! Policy is pluggable, as in RFC v2's "pvsched drivers": a [`Driver`] is chosen per VM by
//! name from a [`Registry`] and can be replaced at runtime. Built in: `none`, `static`,
//! `dynamic` (RFC v1 semantics, with per-reason budgets and a cooldown) and `deadline-aware`
//! (boosts ahead of the guest's published deadline).
#![deny(missing_docs)]

pub mod driver;
pub mod drivers;
pub mod engine;
pub mod options;
pub mod v3;

pub use driver::{Cause, Counters, Debts, Driver, VcpuCtx, VcpuState};
pub use engine::{Engine, EngineError, Registry};
pub use options::{DriverOptions, OptionError};
pub use pvsched_proto::{BoostState, Reasons};

use serde::{Deserialize, Serialize};
use std::fmt;

/// Monotonic time, nanoseconds (the host's `CLOCK_MONOTONIC`).
pub type Nanos = u64;

/// A vCPU: its VM and its index in the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct VcpuKey {
    /// VM id, chosen by whoever hosts the engine.
    pub vm: u32,
    /// vCPU index in the VM.
    pub vcpu: u32,
}

impl VcpuKey {
    /// vCPU `vcpu` of VM `vm`.
    pub const fn new(vm: u32, vcpu: u32) -> Self {
        VcpuKey { vm, vcpu }
    }
}

impl fmt::Display for VcpuKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vm{}/vcpu{}", self.vm, self.vcpu)
    }
}

/// The scheduling class a boosted vCPU thread runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BoostClass {
    /// `SCHED_FIFO` at a priority.
    Fifo(u32),
    /// `SCHED_RR` at a priority.
    Rr(u32),
    /// `SCHED_DEADLINE`: the kernel enforces `runtime` per `period`.
    Deadline {
        /// Runtime per period, ns.
        runtime_ns: u64,
        /// Relative deadline, ns.
        deadline_ns: u64,
        /// Period, ns.
        period_ns: u64,
    },
    /// `SCHED_OTHER` (nice 0) with an EEVDF custom slice of this many ns (`sched_runtime`,
    /// Linux ≥ 6.12): an earlier virtual deadline and wake-up preemption, no extra CPU share.
    Slice(u64),
    /// `SCHED_OTHER` at this nice value: a larger CPU share while boosted.
    Nice(i32),
    /// `SCHED_IDLE`: below every nice level (a deboost: pvsched v3's guest IDLE task).
    Idle,
    /// A repayment only (`repay=pause:<duration>`), never a boost: the thread keeps its own
    /// attributes, and where the runtime owns the vCPU thread (the VMM calls its hooks) the
    /// thread leaves the CPU at each exit for up to this many ns while it pays back; where it
    /// cannot (a foreign VMM's threads) it runs at nice [`PAUSE_FALLBACK_NICE`] instead.
    Pause(u64),
}

/// Nice level a [`BoostClass::Pause`] repayment falls back to where the runtime cannot pause
/// the vCPU thread (the daemon, attached to a foreign VMM): `deadline-aware`'s repayment
/// before pausing was measured (docs/policy.md, "Paying back by pausing").
pub const PAUSE_FALLBACK_NICE: i32 = 10;

impl BoostClass {
    /// True for the real-time classes (FIFO, RR, DEADLINE), which outrank every fair task.
    pub fn is_realtime(&self) -> bool {
        matches!(
            self,
            BoostClass::Fifo(_) | BoostClass::Rr(_) | BoostClass::Deadline { .. }
        )
    }

    /// True when a thread in this class takes more CPU than its fair share: every class but
    /// a custom slice (same weight, earlier deadline) and a non-negative nice.
    pub fn takes_extra_share(&self) -> bool {
        match self {
            BoostClass::Slice(_) => false,
            BoostClass::Nice(n) => *n < 0,
            BoostClass::Idle | BoostClass::Pause(_) => false,
            _ => true,
        }
    }
}

impl Default for BoostClass {
    fn default() -> Self {
        BoostClass::Fifo(10)
    }
}

impl fmt::Display for BoostClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BoostClass::Fifo(p) => write!(f, "fifo:{p}"),
            BoostClass::Rr(p) => write!(f, "rr:{p}"),
            BoostClass::Deadline {
                runtime_ns,
                deadline_ns,
                period_ns,
            } => write!(f, "deadline:{runtime_ns}/{deadline_ns}/{period_ns}"),
            BoostClass::Slice(ns) => write!(f, "slice:{}us", ns / 1000),
            BoostClass::Nice(n) => write!(f, "nice:{n}"),
            BoostClass::Idle => write!(f, "idle"),
            BoostClass::Pause(ns) if ns % 1000 == 0 => write!(f, "pause:{}us", ns / 1000),
            BoostClass::Pause(ns) => write!(f, "pause:{ns}ns"),
        }
    }
}

/// Timers a driver can arm, one of each per vCPU; re-arming supersedes the previous one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum TimerKind {
    /// Check the current boost against its budget.
    Budget = 0,
    /// End of a throttle's cooldown.
    Cooldown = 1,
    /// Boost ahead of a guest deadline.
    Lead = 2,
    /// End of a repayment (the debt is paid back).
    Repay = 3,
    /// A boost waiting for the host-wide cap may take the slot of the longest-held boost
    /// (the engine's own timer: drivers never see it).
    Cap = 4,
}

impl TimerKind {
    /// Every kind.
    pub const ALL: [TimerKind; 5] = [
        TimerKind::Budget,
        TimerKind::Cooldown,
        TimerKind::Lead,
        TimerKind::Repay,
        TimerKind::Cap,
    ];
}

/// Something that happened to a vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuEvent {
    /// The vCPU's thread is known: the engine may now boost it.
    Registered,
    /// The vCPU is gone: it must not stay boosted.
    Unregistered,
    /// The host injected an interrupt into the vCPU (or its timer expired).
    Interrupt,
    /// The host woke the halted vCPU.
    Woken,
    /// The guest's request, as read from its slot (after a change, or after the host
    /// published a state).
    Request(Reasons),
    /// The guest rang its doorbell; its request as read right after.
    Doorbell(Reasons),
    /// The guest's next latency-critical deadline in host time, or none.
    DeadlineHint(Option<Nanos>),
    /// The guest's slot does not decode: stop trusting it.
    SlotInvalid,
    /// A timer armed earlier fired (with the generation it was armed with).
    Timer(TimerKind, u64),
    /// The vCPU is (`true`) or is no longer quiet: it does not wait for a CPU when unboosted,
    /// so a boost would gain the guest nothing and cost system calls; dynamic drivers boost
    /// only a contended vCPU. Sent by the runtime's quiet gate when its verdict changes.
    Quiet(bool),
    /// The vCPU, unboosted, waited for a CPU almost all of the last quiet-gate window: it is
    /// not getting a CPU at all (typically queued behind another vCPU's real-time boost on the
    /// same CPU). A repayment then gives nothing back and only keeps it from being picked:
    /// dynamic drivers end it, and give the vCPU a short host boost (like an interrupt's,
    /// within its budgets and the host-wide cap): as a real-time thread it is moved off that
    /// CPU by the kernel, or at least takes turns with the boost that starves it.
    Starved,
    /// The vCPU thread slept for part of the last quiet-gate window (`true`: it was runnable,
    /// running or waiting for a CPU, less than 90 % of it) or did not (`false`). Dynamic
    /// drivers do not make a vCPU that sleeps pay its boosts back: at nice 10 it waits behind
    /// the host's threads at each wake-up, which is when its guest needs the CPU (a halting
    /// guest's average went to 1.4-2.1x vanilla's). The price: what the repayment gave back
    /// stays with the VM (README, "A guest that halts between timer events"). Sent by the
    /// runtime's samplers when the answer changes.
    Sleeps(bool),
    /// The vCPU's thread pauses at its exits when it pays back by pausing
    /// ([`BoostClass::Pause`]): the runtime runs code on it (the VMM calls its hooks). Sent
    /// once, after [`VcpuEvent::Registered`]. Without it a `Pause` repayment is taken at nice
    /// [`PAUSE_FALLBACK_NICE`] for as long as a repayment at a nice level lasts.
    Pausable,
    /// The vCPU's thread was off the CPU this long (ns), pausing to pay back a boost. A
    /// pausable vCPU's repayment by pausing ends once its pauses add up to the boosted time
    /// it owes (not after as much wall-clock time: it runs its guest between pauses).
    Paused(Nanos),
    /// The guest's pvsched v3 page (its default guest area, decoded), read after a doorbell,
    /// a change, or the host's feedback: task intent, critical sections, ticket echo.
    Intent(pvsched_proto::v3::GuestArea),
}

/// An event for one vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// The vCPU.
    pub key: VcpuKey,
    /// What happened.
    pub what: VcpuEvent,
}

impl Event {
    /// `what` happened to `key`.
    pub const fn new(key: VcpuKey, what: VcpuEvent) -> Self {
        Event { key, what }
    }
}

/// What the mechanism must do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Put the vCPU thread in `class` (remembering its original attributes).
    Boost(VcpuKey, BoostClass),
    /// Restore the vCPU thread's original attributes.
    Unboost(VcpuKey),
    /// While unboosted: run the vCPU thread in `Some(class)` (below its normal weight) to pay
    /// back boosted time, or, with `None`, back in its original attributes. Never sent while
    /// the vCPU is boosted.
    Repay(VcpuKey, Option<BoostClass>),
    /// Publish `state` in the guest's slot. For `Normal` and `Boosted`, then re-read the
    /// request (after a full fence) and report it with a [`VcpuEvent::Request`] (the
    /// protocol's handshake); `Disabled` and `Throttled` need no re-read.
    Publish(VcpuKey, BoostState),
    /// Publish `applied` and `ticket` in the guest's v3 page (the [`Decision::Publish`] of a
    /// vCPU that speaks v3); with `reread`, then re-read the guest area (after a full fence)
    /// and report it with a [`VcpuEvent::Intent`].
    PublishV3 {
        /// The vCPU.
        key: VcpuKey,
        /// The applied-state word.
        applied: pvsched_proto::v3::AppliedState,
        /// The interrupt ticket (0: none issued yet).
        ticket: u64,
        /// Re-read and report the guest area.
        reread: bool,
    },
    /// Deliver [`VcpuEvent::Timer`]`(kind, gen)` at `at`.
    ArmTimer {
        /// The vCPU.
        key: VcpuKey,
        /// When.
        at: Nanos,
        /// Which timer.
        kind: TimerKind,
        /// Generation to echo back.
        gen: u64,
    },
}

impl Decision {
    /// The vCPU the decision is about.
    pub fn key(&self) -> VcpuKey {
        match *self {
            Decision::Boost(k, _)
            | Decision::Unboost(k)
            | Decision::Repay(k, _)
            | Decision::Publish(k, _) => k,
            Decision::ArmTimer { key, .. } | Decision::PublishV3 { key, .. } => key,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_display() {
        assert_eq!(BoostClass::Fifo(10).to_string(), "fifo:10");
        assert_eq!(BoostClass::Rr(3).to_string(), "rr:3");
        let d = BoostClass::Deadline {
            runtime_ns: 1,
            deadline_ns: 2,
            period_ns: 3,
        };
        assert_eq!(d.to_string(), "deadline:1/2/3");
        assert_eq!(BoostClass::Idle.to_string(), "idle");
        assert!(!BoostClass::Idle.takes_extra_share() && !BoostClass::Idle.is_realtime());
        assert_eq!(VcpuKey::new(1, 2).to_string(), "vm1/vcpu2");
    }
}
