//! The driver interface: per-vCPU state the engine keeps, and the context through which a
//! driver turns an event into decisions.

use crate::{BoostClass, Decision, Nanos, TimerKind, VcpuEvent, VcpuKey};
use pvsched_proto::v3::{applied_flag, hint, AppliedState, BoostKind, GuestArea};
use pvsched_proto::{BoostState, Reason, Reasons};
use serde::{Deserialize, Serialize};

/// Why a vCPU is boosted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Cause {
    /// Always (the `static` driver).
    Static,
    /// The guest asked.
    Request,
    /// The host injected an interrupt or woke the vCPU.
    Interrupt,
    /// Ahead of the guest's published deadline.
    Deadline,
}

impl Cause {
    /// Index in [`Counters::by_cause_ns`].
    pub fn index(self) -> usize {
        match self {
            Cause::Static => 0,
            Cause::Request => 1,
            Cause::Interrupt => 2,
            Cause::Deadline => 3,
        }
    }
}

/// A boost in progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Boost {
    /// Since when.
    pub since: Nanos,
    /// Why.
    pub cause: Cause,
    /// From then on, an empty guest request ends the boost (a deadline boost is not released
    /// before its deadline).
    pub release_after: Nanos,
    /// Until then the boost holds even without a guest request (host-initiated boosts).
    pub hold_until: Nanos,
    /// The class it runs in.
    pub class: BoostClass,
    /// The vCPU thread slept part of the time when it started: it holds no slot of the
    /// host-wide cap, whatever its class ([`VcpuState::holds_cap_slot`]).
    pub sleeper: bool,
}

/// Per-vCPU counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Boosts started.
    pub boosts: u64,
    /// Boosts ended.
    pub unboosts: u64,
    /// Boosts ended because a budget ran out.
    pub throttles: u64,
    /// Requests refused while throttled.
    pub refused: u64,
    /// Total time spent boosted (completed boosts), ns.
    pub boosted_ns: u64,
    /// Slots found invalid.
    pub bad_slots: u64,
    /// Time spent paying back boosted time below normal weight (completed repayments), ns.
    pub repaid_ns: u64,
    /// Boosts not started because the host was quiet.
    #[serde(default)]
    pub skipped_quiet: u64,
    /// Boosts that had to wait because `max_boosted` vCPUs were boosted already.
    #[serde(default)]
    pub capped: u64,
    /// Boosts ended to hand their slot of the host-wide cap to a boost that waited for it
    /// (see [`crate::engine::CAP_QUANTUM_NS`]).
    #[serde(default)]
    pub cap_yields: u64,
    /// Boosted time of completed boosts by the cause that started them, ns, indexed by
    /// [`Cause::index`] (static, request, interrupt, deadline).
    #[serde(default)]
    pub by_cause_ns: [u64; 4],
    /// Throttles at which the generic debt was at its limit (the others: the critical-section
    /// debt alone).
    #[serde(default)]
    pub generic_throttles: u64,
    /// Longest completed boost, ns.
    #[serde(default)]
    pub longest_ns: u64,
    /// Time spent deboosted (below the baseline because the guest runs idle or low-priority
    /// work, pvsched v3), completed deboosts, ns.
    #[serde(default)]
    pub deboosted_ns: u64,
    /// Interrupt tickets issued (v3) and acknowledged by the guest.
    #[serde(default)]
    pub tickets: [u64; 2],
}

/// Boosted-time debts (pvsched v3's model): every boosted nanosecond is charged to `generic`,
/// and also to `cs` while the boost serves a critical section (or the host alone); unboosted
/// time pays both back at the driver's recovery ratio. A debt that reaches its limit latches
/// a throttle, which clears only once that debt is paid back to zero.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Debts {
    /// Debt of all boosted time, ns.
    pub generic: Nanos,
    /// Debt of critical-section (and host-held) boosted time, ns.
    pub cs: Nanos,
    /// Accounted up to here.
    pub at: Nanos,
    /// Unboosted time not yet converted into repayment (thousandths of ns): accounting in
    /// small steps loses nothing to rounding.
    pub carry: u64,
    /// The generic debt reached its limit and is not paid back yet: no boost at all.
    pub generic_latched: bool,
    /// The critical-section debt reached its limit and is not paid back yet: only an RT-task
    /// request is boosted.
    pub cs_latched: bool,
}

impl Debts {
    /// True while a latch is set.
    pub fn latched(&self) -> bool {
        self.generic_latched || self.cs_latched
    }
}

/// What the engine knows about one vCPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuState {
    /// The boost in progress, if any.
    pub boost: Option<Boost>,
    /// The guest's last known request.
    pub request: Reasons,
    /// Boosted-time debts and throttle latches.
    pub debts: Debts,
    /// A latch is not cleared before then (the `cooldown` after a throttle).
    pub throttled_until: Option<Nanos>,
    /// The guest's next deadline, host time.
    pub deadline: Option<Nanos>,
    /// The state last published to the guest.
    pub published: Option<BoostState>,
    /// Since when the vCPU pays back boosted time below its normal weight, if it does.
    pub repay_since: Option<Nanos>,
    /// The host is quiet (see [`VcpuEvent::Quiet`]).
    pub quiet: bool,
    /// The vCPU thread sleeps part of the time (see [`VcpuEvent::Sleeps`]).
    pub sleeps: bool,
    /// The vCPU thread can pause at its exits (see [`VcpuEvent::Pausable`]).
    pub pausable: bool,
    /// Boosted time (in classes that take extra CPU share) not yet given back by pausing, ns
    /// (a pausable vCPU whose driver repays by pausing; at most the generic debt's limit).
    pub pause_owed: Nanos,
    /// `Disabled` was published because the host is quiet (not because the slot is
    /// invalid): `Normal` is published again when it is not.
    pub muted: bool,
    /// Generation of each [`TimerKind`].
    pub timer_gen: [u64; TimerKind::ALL.len()],
    /// Counters.
    pub counters: Counters,
    /// A boost the host-wide cap held back: since when, and the event that asked for it
    /// (handed to the driver again when a boosted vCPU lets go).
    pub capped: Option<(Nanos, VcpuEvent)>,
    /// Set by [`VcpuCtx::boost`] when the cap refused it (the engine records the event).
    pub(crate) cap_refused: bool,
    /// The guest speaks pvsched v3: its page as last read, and the host's ticket.
    pub v3: Option<V3Vcpu>,
    /// Deboosted (v3): since when, in which class.
    pub deboost: Option<(Nanos, BoostClass)>,
}

/// What the engine keeps of a vCPU that speaks pvsched v3.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct V3Vcpu {
    /// The guest area as last read.
    pub area: GuestArea,
    /// The last interrupt ticket issued (0: none yet).
    pub ticket: u64,
    /// The guest has not echoed [`V3Vcpu::ticket`] yet.
    pub ticket_outstanding: bool,
    /// The applied state last published.
    pub applied: AppliedState,
    /// The host saw an interrupt or wake-up (or a starved vCPU) since the page last changed:
    /// no deboost until the guest's page moves (the interrupt is pending; the page read
    /// before it says nothing about what runs next).
    pub deboost_hold: bool,
}

/// True when the boost in `s` is charged to the critical-section debt: a critical-section
/// request holds it, or the host started it (interrupt, deadline) and no request holds it.
pub fn charges_cs(s: &VcpuState) -> bool {
    let Some(b) = s.boost else { return false };
    let cs_request = s.request.bits() & !Reason::RtTask.bit() != 0;
    let host = matches!(b.cause, Cause::Interrupt | Cause::Deadline);
    cs_request || (host && s.request.is_empty())
}

impl VcpuState {
    /// True while boosted.
    pub fn is_boosted(&self) -> bool {
        self.boost.is_some()
    }

    /// True while boosted in a class that takes extra CPU share by a boost that started while
    /// the vCPU thread did not sleep part of the time: such a boost holds a slot of the
    /// host-wide cap. The cap keeps boosted vCPUs from filling the host's CPUs; one whose thread
    /// sleeps (runnable less than 90 % of the time, [`VcpuEvent::Sleeps`]) cannot, and two
    /// such vCPUs whose guests wake at the same moment would otherwise take turns at every
    /// wake-up (measured 2026-12-04, a Linux guest under QEMU TCG with cyclictest on both
    /// CPUs: one vCPU's boosts waited 765 times in 20 s). Its boosts stay bounded by its
    /// budgets.
    pub fn holds_cap_slot(&self) -> bool {
        self.boost
            .is_some_and(|b| b.class.takes_extra_share() && !b.sleeper)
    }

    /// True while a throttle latch is set.
    pub fn is_throttled(&self) -> bool {
        self.debts.latched()
    }

    /// True when timer `kind` armed with generation `gen` is still wanted: neither re-armed
    /// nor cancelled since. A host may drop timers for which this is false.
    pub fn is_timer_current(&self, kind: TimerKind, gen: u64) -> bool {
        self.timer_gen[kind as usize] == gen
            // The cap's timer is for a boost that waits: once it waits no longer (it got a
            // slot, or its wait went stale), the timer has nothing to do.
            && (kind != TimerKind::Cap || self.capped.is_some())
    }

    /// Boosted time including the boost in progress, at `now`.
    pub fn boosted_ns(&self, now: Nanos) -> u64 {
        self.counters.boosted_ns + self.boost.map_or(0, |b| now.saturating_sub(b.since))
    }

    /// [`Self::boosted_ns`] by the cause that started each boost ([`Cause::index`]).
    pub fn boosted_by_cause_ns(&self, now: Nanos) -> [u64; 4] {
        let mut t = self.counters.by_cause_ns;
        if let Some(b) = self.boost {
            t[b.cause.index()] += now.saturating_sub(b.since);
        }
        t
    }
}

/// A driver's view of one vCPU while it handles an event: its state, the time, and where
/// decisions go. The helpers keep counters and the handshake consistent across drivers.
pub struct VcpuCtx<'a> {
    /// The vCPU.
    pub key: VcpuKey,
    /// Its state.
    pub state: &'a mut VcpuState,
    /// Now.
    pub now: Nanos,
    out: &'a mut Vec<Decision>,
    /// The host-wide cap is reached: a new boost must wait.
    cap_full: bool,
}

impl<'a> VcpuCtx<'a> {
    /// A context writing decisions to `out`.
    pub fn new(
        key: VcpuKey,
        state: &'a mut VcpuState,
        now: Nanos,
        out: &'a mut Vec<Decision>,
    ) -> Self {
        VcpuCtx {
            key,
            state,
            now,
            out,
            cap_full: false,
        }
    }

    /// True when the host-wide cap is reached and a new boost in `class` would wait (a class
    /// that takes no extra CPU share, or a vCPU that sleeps part of the time, never waits: it
    /// holds no slot, [`VcpuState::holds_cap_slot`]).
    pub fn cap_full(&self, class: BoostClass) -> bool {
        self.cap_full
            && self.state.boost.is_none()
            && class.takes_extra_share()
            && !self.state.sleeps
    }

    /// The same, with the host-wide cap reached (`full`): [`VcpuCtx::boost`] then waits.
    pub(crate) fn with_cap(mut self, full: bool) -> Self {
        self.cap_full = full;
        self
    }

    /// Starts a boost in `class` for `cause` (see [`Boost`] for the two times) and publishes
    /// `Boosted`. No-op when already boosted; when the host-wide cap is reached and `class`
    /// takes extra CPU share, the boost waits (counted as `capped`; the engine offers it again
    /// when a boost ends). A class that takes no extra share (a custom slice) neither waits
    /// nor holds a slot: the cap bounds what boosts take from the host, and it takes nothing.
    pub fn boost(
        &mut self,
        class: BoostClass,
        cause: Cause,
        release_after: Nanos,
        hold_until: Nanos,
    ) {
        if self.state.boost.is_some() {
            return;
        }
        if self.cap_full(class) {
            if !self.state.cap_refused && self.state.capped.is_none() {
                self.state.counters.capped += 1;
            }
            self.state.cap_refused = true;
            // Waiting for a slot, it runs at its normal weight: repaying now would only keep
            // it longer from what it waits for (its debt still falls with unboosted time).
            self.end_repay();
            return;
        }
        // A boost supersedes a repayment or a deboost (the class it applies replaces theirs).
        if let Some(t) = self.state.repay_since.take() {
            self.state.counters.repaid_ns += self.now.saturating_sub(t);
            self.state.timer_gen[TimerKind::Repay as usize] += 1;
        }
        if let Some((t, _)) = self.state.deboost.take() {
            self.state.counters.deboosted_ns += self.now.saturating_sub(t);
        }
        self.state.boost = Some(Boost {
            class,
            sleeper: self.state.sleeps,
            since: self.now,
            cause,
            release_after,
            hold_until,
        });
        self.state.counters.boosts += 1;
        self.out.push(Decision::Boost(self.key, class));
        self.publish(BoostState::Boosted);
    }

    /// Runs the unboosted vCPU in `class` to pay back boosted time (no-op while boosted).
    pub fn start_repay(&mut self, class: BoostClass) {
        if self.state.boost.is_some() {
            return;
        }
        if self.state.repay_since.is_none() {
            self.state.repay_since = Some(self.now);
        }
        self.out.push(Decision::Repay(self.key, Some(class)));
    }

    /// Ends a repayment (no-op when none): the vCPU goes back to its original attributes.
    pub fn end_repay(&mut self) {
        if let Some(t) = self.state.repay_since.take() {
            self.state.counters.repaid_ns += self.now.saturating_sub(t);
            self.state.timer_gen[TimerKind::Repay as usize] += 1;
            if self.state.boost.is_none() {
                self.out.push(Decision::Repay(self.key, None));
            }
        }
    }

    /// Ends the boost (if any) and a repayment (if any), and publishes `then`.
    pub fn unboost(&mut self, then: BoostState) {
        self.end_repay();
        if let Some(b) = self.state.boost.take() {
            let d = self.now.saturating_sub(b.since);
            self.state.counters.unboosts += 1;
            self.state.counters.boosted_ns += d;
            self.state.counters.by_cause_ns[b.cause.index()] += d;
            self.state.counters.longest_ns = self.state.counters.longest_ns.max(d);
            // A budget check is about the boost that just ended: cancel it, so that a host
            // does not wake up for a timer with nothing left to check.
            self.state.timer_gen[TimerKind::Budget as usize] += 1;
            self.out.push(Decision::Unboost(self.key));
        }
        self.publish(then);
    }

    /// Changes the class of the boost in progress (no-op when not boosted or unchanged).
    pub fn reclass(&mut self, class: BoostClass) {
        if let Some(b) = self.state.boost.as_mut() {
            if b.class != class {
                b.class = class;
                self.out.push(Decision::Boost(self.key, class));
            }
        }
    }

    /// Runs the unboosted vCPU below its baseline in `class` (v3's deboost; no-op while
    /// boosted or already there). Restored by [`VcpuCtx::end_deboost`], a boost, or exit.
    pub fn deboost(&mut self, class: BoostClass) {
        if self.state.boost.is_some() || self.state.deboost.is_some_and(|(_, c)| c == class) {
            return;
        }
        // A deboost replaces a repayment (both run the thread below its weight).
        if let Some(t) = self.state.repay_since.take() {
            self.state.counters.repaid_ns += self.now.saturating_sub(t);
            self.state.timer_gen[TimerKind::Repay as usize] += 1;
        }
        let since = self.state.deboost.map_or(self.now, |(t, _)| t);
        self.state.deboost = Some((since, class));
        self.out.push(Decision::Repay(self.key, Some(class)));
    }

    /// Ends a deboost (no-op when none): back to the original attributes.
    pub fn end_deboost(&mut self) {
        if let Some((t, _)) = self.state.deboost.take() {
            self.state.counters.deboosted_ns += self.now.saturating_sub(t);
            if self.state.boost.is_none() && self.state.repay_since.is_none() {
                self.out.push(Decision::Repay(self.key, None));
            }
        }
    }

    /// Publishes `state` to the guest (the mechanism re-reads the request afterwards). For a
    /// guest that speaks v3, the applied-state word says the same: the kind of boost in force
    /// (task or critical section), the throttle flags, and, while boosted, the hint to ring
    /// when its intent drops.
    pub fn publish(&mut self, state: BoostState) {
        self.state.published = Some(state);
        let Some(v3) = self.state.v3 else {
            self.out.push(Decision::Publish(self.key, state));
            return;
        };
        let d = self.state.debts;
        let mut applied = AppliedState::default();
        // What is applied, also when the page is no longer trusted (a host boost may hold).
        if self.state.boost.is_some() {
            applied.boost = if charges_cs(self.state) {
                BoostKind::Cs
            } else {
                BoostKind::Task
            };
        }
        if state != BoostState::Disabled {
            if self.state.boost.is_some() {
                applied.hints = hint::KICK_DEBOOST;
            }
            if d.cs_latched {
                applied.flags |= applied_flag::CS_THROTTLED;
            }
            if d.generic_latched {
                applied.flags |= applied_flag::TOTAL_THROTTLED;
            }
        }
        if let Some(v) = self.state.v3.as_mut() {
            v.applied = applied;
        }
        self.out.push(Decision::PublishV3 {
            key: self.key,
            applied,
            ticket: v3.ticket,
            reread: matches!(state, BoostState::Normal | BoostState::Boosted),
        });
    }

    /// Publishes `Boosted` again when what a v3 guest would read has changed (the kind of the
    /// boost after a change of class). No-op for v1 guests and unboosted vCPUs.
    pub fn refresh_v3(&mut self) {
        let Some(v3) = self.state.v3 else { return };
        if self.state.boost.is_none() {
            return;
        }
        let kind = if charges_cs(self.state) {
            BoostKind::Cs
        } else {
            BoostKind::Task
        };
        if v3.applied.boost != kind {
            self.publish(BoostState::Boosted);
        }
    }

    /// Issues a new interrupt ticket (v3; no-op otherwise): published with the next
    /// [`VcpuCtx::publish`].
    pub fn issue_ticket(&mut self) {
        if let Some(v3) = self.state.v3.as_mut() {
            // Increasing and seeded from the clock: a host that restarts (the daemon) does
            // not reissue a ticket the guest already echoed.
            v3.ticket = v3.ticket.wrapping_add(1).max(self.now).max(1);
            v3.ticket_outstanding = true;
            self.state.counters.tickets[0] += 1;
        }
    }

    /// Arms timer `kind` at `at`; an earlier timer of the same kind becomes stale.
    pub fn arm(&mut self, kind: TimerKind, at: Nanos) {
        let g = &mut self.state.timer_gen[kind as usize];
        *g += 1;
        self.out.push(Decision::ArmTimer {
            key: self.key,
            at,
            kind,
            gen: *g,
        });
    }

    /// True when a fired timer is the latest of its kind.
    pub fn is_current(&self, kind: TimerKind, gen: u64) -> bool {
        self.state.is_timer_current(kind, gen)
    }
}

/// A policy: turns a vCPU's events into decisions. One instance per VM.
pub trait Driver: Send {
    /// The name it is registered under.
    fn name(&self) -> &'static str;

    /// A small number identifying the driver to the guest (slot field `policy`).
    fn id(&self) -> u32;

    /// Handles `ev` for the vCPU in `ctx`.
    fn on_event(&mut self, ctx: &mut VcpuCtx<'_>, ev: VcpuEvent);

    /// The class of the boosts its lead timers ([`TimerKind::Lead`]) start, if it arms any:
    /// the host asks it to tell whether such a boost would only wait for the host-wide cap.
    /// `None` (the default) counts as a class that takes extra share, which waits.
    fn deadline_class(&self) -> Option<BoostClass> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boost_and_unboost_keep_counters() {
        let mut st = VcpuState::default();
        let mut out = Vec::new();
        let key = VcpuKey::new(0, 0);
        VcpuCtx::new(key, &mut st, 100, &mut out).boost(BoostClass::Fifo(5), Cause::Request, 0, 0);
        VcpuCtx::new(key, &mut st, 150, &mut out).boost(BoostClass::Fifo(5), Cause::Request, 0, 0);
        assert_eq!(st.counters.boosts, 1, "second boost is a no-op");
        assert_eq!(st.boosted_ns(170), 70);
        VcpuCtx::new(key, &mut st, 400, &mut out).unboost(BoostState::Normal);
        assert_eq!(st.counters.boosted_ns, 300);
        assert_eq!(
            out,
            [
                Decision::Boost(key, BoostClass::Fifo(5)),
                Decision::Publish(key, BoostState::Boosted),
                Decision::Unboost(key),
                Decision::Publish(key, BoostState::Normal),
            ]
        );
    }

    #[test]
    fn stale_timers_are_recognised() {
        let mut st = VcpuState::default();
        let mut out = Vec::new();
        let mut ctx = VcpuCtx::new(VcpuKey::new(0, 0), &mut st, 0, &mut out);
        ctx.arm(TimerKind::Budget, 10);
        ctx.arm(TimerKind::Budget, 20);
        assert!(!ctx.is_current(TimerKind::Budget, 1));
        assert!(ctx.is_current(TimerKind::Budget, 2));
        assert!(!ctx.is_current(TimerKind::Lead, 2));
    }
}
