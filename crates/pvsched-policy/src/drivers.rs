//! The built-in drivers: `none`, `static`, `dynamic`, `deadline-aware`.

use crate::driver::{Boost, Cause, Driver, VcpuCtx};
use crate::options::{DriverOptions, OptionError};
use crate::{BoostClass, Nanos, TimerKind, VcpuEvent};
use pvsched_proto::BoostState;

const MS: Nanos = 1_000_000;
const US: Nanos = 1_000;

/// `none`: vanilla; never boosts, tells the guest boosting is off.
#[derive(Debug, Default)]
pub struct NoneDriver;

impl NoneDriver {
    /// Builds it from options (it has none).
    pub fn from_options(o: &DriverOptions) -> Result<Self, OptionError> {
        o.check_known("none", &[])?;
        Ok(NoneDriver)
    }
}

impl Driver for NoneDriver {
    fn name(&self) -> &'static str {
        "none"
    }
    fn id(&self) -> u32 {
        0
    }
    fn on_event(&mut self, ctx: &mut VcpuCtx<'_>, ev: VcpuEvent) {
        match ev {
            VcpuEvent::Registered => ctx.publish(BoostState::Disabled),
            VcpuEvent::Unregistered => ctx.unboost(BoostState::Disabled),
            _ => {}
        }
    }
}

/// `static`: every vCPU always boosted (crosvm `--rt-cpus` style); no budget, by design the
/// baseline that shows what unbounded boosting costs the host.
#[derive(Debug)]
pub struct StaticDriver {
    class: BoostClass,
}

impl StaticDriver {
    /// Options: `class` (default `fifo:10`).
    pub fn from_options(o: &DriverOptions) -> Result<Self, OptionError> {
        o.check_known("static", &["class"])?;
        Ok(StaticDriver {
            class: o.class("class", BoostClass::default())?,
        })
    }
}

impl Driver for StaticDriver {
    fn name(&self) -> &'static str {
        "static"
    }
    fn id(&self) -> u32 {
        1
    }
    fn on_event(&mut self, ctx: &mut VcpuCtx<'_>, ev: VcpuEvent) {
        match ev {
            VcpuEvent::Registered => {
                ctx.boost(self.class, Cause::Static, Nanos::MAX, Nanos::MAX);
            }
            VcpuEvent::Unregistered => ctx.unboost(BoostState::Disabled),
            VcpuEvent::Request(r) | VcpuEvent::Doorbell(r) => ctx.state.request = r,
            _ => {}
        }
    }
}

/// Parameters of the `dynamic` and `deadline-aware` drivers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DynamicParams {
    /// Class of a boosted vCPU thread.
    pub class: BoostClass,
    /// Longest boost for kernel critical sections (IRQ, NMI, softirq, preempt-off).
    pub cs_budget: Nanos,
    /// Longest boost for an RT task.
    pub rt_budget: Nanos,
    /// After a budget ran out, boosts are refused for this long.
    pub cooldown: Nanos,
    /// A host-initiated boost (interrupt, wake-up, deadline) holds this long without a guest
    /// request. Repeated interrupts extend it, but a host-initiated boost never lasts longer
    /// than `cs_budget` in one go.
    pub irq_hold: Nanos,
    /// `deadline-aware` only: how long before the guest's deadline to boost.
    pub lead: Option<Nanos>,
}

impl Default for DynamicParams {
    /// RFC v1 / ChromeOS budgets: 3 ms critical sections, 500 ms RT task.
    fn default() -> Self {
        DynamicParams {
            class: BoostClass::default(),
            cs_budget: 3 * MS,
            rt_budget: 500 * MS,
            cooldown: 100 * MS,
            irq_hold: 200 * US,
            lead: None,
        }
    }
}

const DYNAMIC_KEYS: &[&str] = &["class", "cs_budget", "rt_budget", "cooldown", "irq_hold"];
const DEADLINE_KEYS: &[&str] = &[
    "class",
    "cs_budget",
    "rt_budget",
    "cooldown",
    "irq_hold",
    "lead",
];

impl DynamicParams {
    fn from_options(o: &DriverOptions, lead: Option<Nanos>) -> Result<Self, OptionError> {
        let d = DynamicParams::default();
        let p = DynamicParams {
            class: o.class("class", d.class)?,
            cs_budget: o.duration("cs_budget", d.cs_budget)?,
            rt_budget: o.duration("rt_budget", d.rt_budget)?,
            cooldown: o.duration("cooldown", d.cooldown)?,
            irq_hold: o.duration("irq_hold", d.irq_hold)?,
            lead: match lead {
                Some(default) => Some(o.duration("lead", default)?),
                None => None,
            },
        };
        if p.cs_budget == 0 || p.rt_budget == 0 {
            return Err(OptionError::Value {
                key: "cs_budget/rt_budget".into(),
                value: "0".into(),
                why: "a budget must be above zero: no boost without a budget",
            });
        }
        Ok(p)
    }
}

/// `dynamic`: RFC v1 semantics. Boosts when the host injects an interrupt or wakes the vCPU
/// and when the guest requests; unboosts when the guest releases (synchronously, through its
/// doorbell); bounds every boost by a per-reason budget, after which it unboosts and refuses
/// boosts for a cooldown.
#[derive(Debug)]
pub struct DynamicDriver {
    p: DynamicParams,
    name: &'static str,
}

impl DynamicDriver {
    /// `dynamic` with options `class`, `cs_budget`, `rt_budget`, `cooldown`, `irq_hold`.
    pub fn from_options(o: &DriverOptions) -> Result<Self, OptionError> {
        o.check_known("dynamic", DYNAMIC_KEYS)?;
        Ok(DynamicDriver {
            p: DynamicParams::from_options(o, None)?,
            name: "dynamic",
        })
    }

    /// `deadline-aware`: `dynamic` plus a boost `lead` (default 100 µs) ahead of the guest's
    /// published deadline, so no reaction delay is paid when its timer fires.
    pub fn deadline_aware(o: &DriverOptions) -> Result<Self, OptionError> {
        o.check_known("deadline-aware", DEADLINE_KEYS)?;
        Ok(DynamicDriver {
            p: DynamicParams::from_options(o, Some(100 * US))?,
            name: "deadline-aware",
        })
    }

    /// The parameters in force.
    pub fn params(&self) -> DynamicParams {
        self.p
    }

    /// When the current boost must be checked next.
    fn next_check(&self, ctx: &VcpuCtx<'_>) -> Option<Nanos> {
        let s = &ctx.state;
        let b = s.boost?;
        let cs = s.cs_since.map(|t| t.saturating_add(self.p.cs_budget));
        let rt = s.rt_since.map(|t| t.saturating_add(self.p.rt_budget));
        let hold = s.request.is_empty().then_some(b.hold_until);
        let host = (self.host_initiated(b) && s.request.is_empty())
            .then(|| b.since.saturating_add(self.p.cs_budget));
        [cs, rt, hold, host].into_iter().flatten().min()
    }

    /// Interrupt and deadline boosts are budgeted like a critical section as a whole while no
    /// guest request holds them, so a guest that makes the host inject interrupts back to
    /// back cannot stay boosted.
    fn host_initiated(&self, b: Boost) -> bool {
        matches!(b.cause, Cause::Interrupt | Cause::Deadline)
    }

    fn rearm(&self, ctx: &mut VcpuCtx<'_>) {
        if let Some(at) = self.next_check(ctx) {
            // An overdue check (a late timer) runs at once.
            let at = at.max(ctx.now);
            ctx.arm(TimerKind::Budget, at);
        }
    }

    /// A boost the host starts on its own, held at least until `hold_until` without a
    /// request, releasable by the guest from `release_after`.
    fn host_boost(
        &self,
        ctx: &mut VcpuCtx<'_>,
        cause: Cause,
        release_after: Nanos,
        hold_until: Nanos,
    ) {
        if ctx.state.is_throttled(ctx.now) {
            ctx.state.counters.refused += 1;
            return;
        }
        if let Some(b) = ctx.state.boost.as_mut() {
            b.hold_until = b.hold_until.max(hold_until);
            b.release_after = b.release_after.max(release_after);
        } else {
            ctx.boost(self.p.class, cause, release_after, hold_until);
        }
        self.rearm(ctx);
    }

    /// True when an empty request may end boost `b` now. A deadline boost is kept until its
    /// deadline has passed *and* the guest has published its next deadline: unboosting in
    /// between lets a host thread preempt the vCPU before it could say when it next needs
    /// to run (calibration.md, "dlNNf").
    fn releasable(&self, ctx: &VcpuCtx<'_>, b: Boost) -> bool {
        ctx.now >= b.release_after
            && (b.cause != Cause::Deadline
                || ctx.state.deadline.is_some_and(|d| d > b.release_after))
    }

    fn on_request(&self, ctx: &mut VcpuCtx<'_>) {
        let now = ctx.now;
        if ctx.state.published == Some(BoostState::Disabled) {
            // The slot decodes again after it was found invalid: resume. Publishing Normal
            // makes the mechanism re-read the request and report it.
            ctx.publish(BoostState::Normal);
            return;
        }
        if ctx.state.request.is_empty() {
            match ctx.state.boost {
                Some(b) if self.releasable(ctx, b) => ctx.unboost(BoostState::Normal),
                Some(_) => {
                    ctx.note_held_reasons();
                    self.rearm(ctx);
                }
                None => {}
            }
            return;
        }
        if ctx.state.is_boosted() {
            ctx.note_held_reasons();
            self.rearm(ctx);
        } else if ctx.state.is_throttled(now) {
            ctx.state.counters.refused += 1;
        } else {
            ctx.boost(self.p.class, Cause::Request, now, now);
            self.rearm(ctx);
        }
    }

    fn check_budget(&self, ctx: &mut VcpuCtx<'_>) {
        let now = ctx.now;
        let Some(b) = ctx.state.boost else { return };
        let over = |since: Option<Nanos>, budget: Nanos| {
            since.is_some_and(|t| now >= t.saturating_add(budget))
        };
        // A boost held only by the host (no guest request) is budgeted as a whole; while the
        // guest holds a request, that request's budgets apply.
        // A hold that ran out before the budget did ends the boost normally, however late
        // this check runs (a host that ran it late must not turn it into a throttle).
        let host_over = self.host_initiated(b)
            && ctx.state.request.is_empty()
            && b.hold_until >= b.since.saturating_add(self.p.cs_budget)
            && over(Some(b.since), self.p.cs_budget);
        if host_over
            || over(ctx.state.cs_since, self.p.cs_budget)
            || over(ctx.state.rt_since, self.p.rt_budget)
        {
            ctx.state.counters.throttles += 1;
            ctx.unboost(BoostState::Throttled);
            let until = now.saturating_add(self.p.cooldown);
            ctx.state.throttled_until = Some(until);
            ctx.arm(TimerKind::Cooldown, until);
        } else if self.next_check(ctx).is_none_or(|t| t <= now) {
            // Nothing holds the boost any longer (the hold ran out and no budgeted reason is
            // held): end it. A budget check always ends the boost or looks further ahead.
            ctx.unboost(BoostState::Normal);
        } else {
            self.rearm(ctx);
        }
    }
}

impl Driver for DynamicDriver {
    fn name(&self) -> &'static str {
        self.name
    }
    fn id(&self) -> u32 {
        if self.p.lead.is_some() {
            3
        } else {
            2
        }
    }
    fn on_event(&mut self, ctx: &mut VcpuCtx<'_>, ev: VcpuEvent) {
        let now = ctx.now;
        match ev {
            VcpuEvent::Registered => ctx.publish(BoostState::Normal),
            VcpuEvent::Unregistered => ctx.unboost(BoostState::Disabled),
            VcpuEvent::Request(r) | VcpuEvent::Doorbell(r) => {
                ctx.state.request = r;
                self.on_request(ctx);
            }
            VcpuEvent::Interrupt | VcpuEvent::Woken => {
                self.host_boost(
                    ctx,
                    Cause::Interrupt,
                    now,
                    now.saturating_add(self.p.irq_hold),
                );
            }
            VcpuEvent::DeadlineHint(d) => {
                ctx.state.deadline = d;
                if let (Some(lead), Some(d)) = (self.p.lead, d) {
                    if d > now {
                        ctx.arm(TimerKind::Lead, d.saturating_sub(lead).max(now));
                    }
                }
                // The next deadline is known: a deadline boost waiting for it can end.
                if let Some(b) = ctx.state.boost {
                    if b.cause == Cause::Deadline
                        && ctx.state.request.is_empty()
                        && self.releasable(ctx, b)
                    {
                        ctx.unboost(BoostState::Normal);
                    }
                }
            }
            VcpuEvent::SlotInvalid => {
                ctx.state.counters.bad_slots += 1;
                ctx.state.request = Default::default();
                if ctx.state.boost.is_some_and(|b| b.cause == Cause::Request) {
                    ctx.unboost(BoostState::Disabled);
                } else {
                    ctx.publish(BoostState::Disabled);
                }
            }
            VcpuEvent::Timer(kind, gen) if ctx.is_current(kind, gen) => match kind {
                TimerKind::Budget => self.check_budget(ctx),
                TimerKind::Cooldown => {
                    ctx.state.throttled_until = None;
                    // The mechanism re-reads the request after publishing and reports it.
                    ctx.publish(BoostState::Normal);
                }
                TimerKind::Lead => {
                    if let Some(d) = ctx.state.deadline {
                        self.host_boost(ctx, Cause::Deadline, d, d.saturating_add(self.p.irq_hold));
                    }
                }
            },
            VcpuEvent::Timer(..) => {}
        }
    }
}
