//! The built-in drivers: `none`, `static`, `dynamic`, `deadline-aware`.

use crate::driver::{Boost, Cause, Driver, VcpuCtx};
use crate::options::{DriverOptions, OptionError};
use crate::v3::{self, Selection, SelectorConfig};
use crate::{BoostClass, Nanos, TimerKind, VcpuEvent};
use pvsched_proto::abi::Reason;
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
            VcpuEvent::Unregistered => {
                ctx.unboost(BoostState::Disabled);
                ctx.end_deboost();
            }
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
        let class = o.class("class", BoostClass::default())?;
        check_below_engine("class", class)?;
        Ok(StaticDriver { class })
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
            VcpuEvent::Unregistered => {
                ctx.unboost(BoostState::Disabled);
                ctx.end_deboost();
            }
            VcpuEvent::Request(r) | VcpuEvent::Doorbell(r) => ctx.state.request = r,
            _ => {}
        }
    }
}

/// How long a release check waits while the vCPU is boosted (its debts are not paid back
/// meanwhile): at most one look per millisecond, and a latch clears at most this late after the
/// boost ends.
const RELEASE_POLL_BOOSTED_NS: Nanos = 1_000_000;

/// Parameters of the `dynamic` and `deadline-aware` drivers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DynamicParams {
    /// Class of a boosted vCPU thread (the default of the three below).
    pub class: BoostClass,
    /// Class of a boost that starts for a critical section or a host interrupt/wake-up.
    pub class_cs: BoostClass,
    /// Class of a boost that starts for an RT-task request.
    pub class_task: BoostClass,
    /// Class of a boost ahead of a guest deadline (`deadline-aware`).
    pub class_deadline: BoostClass,
    /// Limit of the critical-section debt (IRQ, NMI, softirq, preempt-off, host-held boosts).
    pub cs_budget: Nanos,
    /// Limit of the generic debt (all boosted time).
    pub rt_budget: Nanos,
    /// Unboosted time that pays back one unit of debt, in thousandths (1000: v3's 1:1).
    pub recovery_milli: u64,
    /// A throttle latch holds at least this long, even once its debt is paid back.
    pub cooldown: Nanos,
    /// A host-initiated boost (interrupt, wake-up, deadline) holds this long without a guest
    /// request. Repeated interrupts extend it; its time is charged to the critical-section
    /// debt.
    pub irq_hold: Nanos,
    /// `deadline-aware` only: how long before the guest's deadline to boost.
    pub lead: Option<Nanos>,
    /// While a generic debt remains after a boost in a class that takes extra CPU share
    /// (real-time, negative nice), the vCPU runs in this (fair) class until the debt is paid
    /// back, so that boosting does not add to its CPU share; `None`: off.
    pub repay: Option<BoostClass>,
    /// When a repayment starts: after a throttle only (the default: a vCPU that ran out of
    /// budget gives back what it took), or after every boost.
    pub repay_on: RepayOn,
    /// `v3-default` only: pvsched v3's selector picks the class of every boost and deboost
    /// from the guest's v3 page.
    pub selector: Option<SelectorConfig>,
    /// The nice value the selector takes as the vCPU threads' baseline (`v3-default`).
    pub baseline_nice: i8,
    /// `v3-default`: apply deboosts (below-baseline selections). Off, a vCPU stays at its
    /// baseline when its guest runs idle or low-priority work.
    pub deboost: bool,
}

/// When the `dynamic` drivers make a vCPU pay back its boosted time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepayOn {
    /// After a boost that ended in a throttle (its debt reached a limit).
    Throttle,
    /// After every boost in a class that takes extra CPU share.
    Boost,
}

/// Nice level of the default repayment: a vCPU that ran out of budget gives its boosted time
/// back at this weight (measured against 10 and 19: docs/policy.md, "Repayment").
pub const DEFAULT_REPAY_NICE: i32 = 5;

/// How long before the guest's published deadline `deadline-aware` boosts by default, ns.
/// Every boost's lead is boosted time that counts against the debts and holds a slot of the
/// host-wide cap: 50 µs against 100 µs (bench, 2026-12-04, docs/policy.md "The lead") left
/// the host load more in 6 of 6 busy cells, fewer throttles, and a lower p99 in 5 of 6.
pub const DEADLINE_LEAD_NS: Nanos = 50 * US;

/// How `deadline-aware` pays back every boost by default (after each boost, not only after
/// throttles: docs/policy.md, "Repayment"): its vCPU thread leaves the CPU for up to this
/// many ns at each exit ([`BoostClass::Pause`]; nice [`crate::PAUSE_FALLBACK_NICE`] where the
/// runtime cannot pause it), until its pauses add up to its boosted time. Measured side by
/// side against nice 10 (docs/policy.md, "Paying back by pausing"): a vCPU repaying at nice
/// 10 makes its CPU look light, the kernel moves a host thread onto it and the other vCPU
/// takes a CPU alone; pausing keeps both vCPUs among the host's threads (alone 3 % of samples
/// instead of 63 %), lowered the average latency, and, paid in paused time, brought the VM's
/// CPU share to within 5 points of vanilla's in three of four busy cells (1 ms pauses
/// overshoot: the VM fell 22 points below).
pub const DEADLINE_REPAY_PAUSE_NS: Nanos = 200 * US;

impl Default for DynamicParams {
    /// pvsched v3's debt limits (2 ms critical sections, 500 ms generic), 1:1 recovery; a
    /// vCPU throttled by them repays its boosted time at nice [`DEFAULT_REPAY_NICE`].
    fn default() -> Self {
        DynamicParams {
            class: BoostClass::default(),
            class_cs: BoostClass::default(),
            class_task: BoostClass::default(),
            class_deadline: BoostClass::default(),
            cs_budget: 2 * MS,
            rt_budget: 500 * MS,
            recovery_milli: 1000,
            cooldown: MS,
            irq_hold: 200 * US,
            lead: None,
            repay: Some(BoostClass::Nice(DEFAULT_REPAY_NICE)),
            repay_on: RepayOn::Throttle,
            selector: None,
            baseline_nice: 0,
            deboost: false,
        }
    }
}

const DYNAMIC_KEYS: &[&str] = &[
    "class",
    "class_cs",
    "class_task",
    "cs_budget",
    "rt_budget",
    "recovery",
    "cooldown",
    "irq_hold",
    "repay",
    "repay_on",
];
/// Every option key the `dynamic` drivers know (`deadline-aware`'s, a superset of `dynamic`'s).
pub const OPTION_KEYS: &[&str] = DEADLINE_KEYS;

const DEADLINE_KEYS: &[&str] = &[
    "class",
    "class_cs",
    "class_task",
    "class_deadline",
    "cs_budget",
    "rt_budget",
    "recovery",
    "cooldown",
    "irq_hold",
    "lead",
    "repay",
    "repay_on",
];

const V3_KEYS: &[&str] = &[
    "cs_budget",
    "rt_budget",
    "recovery",
    "cooldown",
    "irq_hold",
    "cs_rt_prio",
    "deadline_rt_prio",
    "guest_rt_cap",
    "baseline_nice",
    "deboost",
];

/// Longest debt limit, hold or lead accepted.
const MAX_DURATION: Nanos = 10_000 * MS;

fn bad(key: &str, value: impl ToString, why: &'static str) -> OptionError {
    OptionError::Value {
        key: key.into(),
        value: value.to_string(),
        why,
    }
}

/// `dynamic`'s default class for RT-task requests: an EEVDF custom slice of this many ns,
/// not FIFO. Measured side by side (docs/policy.md, "RT-task boosts on a custom slice"): with
/// the guest's deadline task on a busy host, FIFO task boosts took `dynamic`'s p99 to 1.7–2.0×
/// vanilla's and the host load to 0.86–0.93; on the slice, 1.02–1.14× and 1.00–1.02.
pub const DYNAMIC_TASK_SLICE_NS: Nanos = 100 * US;

impl DynamicParams {
    /// `dynamic`'s defaults: [`DynamicParams::default`], with RT-task requests boosted to a
    /// custom slice of [`DYNAMIC_TASK_SLICE_NS`] (the kernel's shortest) unless `class` or
    /// `class_task` says otherwise. Hosts whose kernel keeps no custom slice get FIFO instead
    /// (the runtime passes `class_task` then).
    pub fn dynamic_default() -> Self {
        DynamicParams {
            class_task: BoostClass::Slice(DYNAMIC_TASK_SLICE_NS),
            ..DynamicParams::default()
        }
    }

    /// `deadline-aware`'s defaults: [`DynamicParams::default`], but every boost that took
    /// extra CPU share is paid back by pausing ([`DEADLINE_REPAY_PAUSE_NS`]), so that the host
    /// load is no worse off (measured: docs/policy.md, "Repayment"). `dynamic` keeps repaying after
    /// throttles only: its boosts mostly cover critical sections of a running vCPU, which
    /// took nothing, and repaying them starves it.
    pub fn deadline_default() -> Self {
        DynamicParams {
            lead: Some(DEADLINE_LEAD_NS),
            repay: Some(BoostClass::Pause(DEADLINE_REPAY_PAUSE_NS)),
            repay_on: RepayOn::Boost,
            ..DynamicParams::default()
        }
    }

    /// The parameters `o` sets over the defaults `d` (a `lead` only where `d` has one).
    fn from_options(o: &DriverOptions, d: DynamicParams) -> Result<Self, OptionError> {
        let class = o.class("class", d.class)?;
        let p = DynamicParams {
            class,
            class_cs: o.class("class_cs", class)?,
            // `class` sets every kind; without it each keeps the driver's default.
            class_task: o.class(
                "class_task",
                if o.get("class").is_some() {
                    class
                } else {
                    d.class_task
                },
            )?,
            class_deadline: o.class("class_deadline", class)?,
            cs_budget: o.duration("cs_budget", d.cs_budget)?,
            rt_budget: o.duration("rt_budget", d.rt_budget)?,
            recovery_milli: match o.get("recovery") {
                None => d.recovery_milli,
                Some(v) => parse_ratio_milli(v)
                    .ok_or_else(|| bad("recovery", v, "expected a ratio from 0.1 to 100"))?,
            },
            cooldown: o.duration("cooldown", d.cooldown)?,
            irq_hold: o.duration("irq_hold", d.irq_hold)?,
            lead: match d.lead {
                Some(default) => Some(o.duration("lead", default)?),
                None => None,
            },
            repay: match o.get("repay") {
                None => d.repay,
                Some("off") => None,
                Some(v) => Some(
                    crate::options::parse_repay(v)
                        .ok_or_else(|| bad("repay", v, crate::options::REPAY_FORMS))?,
                ),
            },
            repay_on: match o.get("repay_on") {
                None => d.repay_on,
                Some("throttle") => RepayOn::Throttle,
                Some("boost") => RepayOn::Boost,
                Some(v) => return Err(bad("repay_on", v, "expected throttle or boost")),
            },
            selector: d.selector,
            baseline_nice: d.baseline_nice,
            deboost: d.deboost,
        };
        for (key, c) in [
            ("class", p.class),
            ("class_cs", p.class_cs),
            ("class_task", p.class_task),
            ("class_deadline", p.class_deadline),
        ] {
            check_below_engine(key, c)?;
        }
        for (key, v) in [
            ("cs_budget", p.cs_budget),
            ("rt_budget", p.rt_budget),
            ("cooldown", p.cooldown),
        ] {
            if v == 0 {
                return Err(bad(
                    key,
                    "0",
                    "must be above zero: no boost without a bound",
                ));
            }
        }
        for (key, v) in [
            ("cs_budget", p.cs_budget),
            ("rt_budget", p.rt_budget),
            ("cooldown", p.cooldown),
            ("irq_hold", p.irq_hold),
            ("lead", p.lead.unwrap_or(0)),
        ] {
            if v > MAX_DURATION {
                return Err(bad(key, format!("{v}ns"), "must be at most 10s"));
            }
        }
        Ok(p)
    }
}

/// The engine thread runs one real-time priority above every class it applies: a class at
/// FIFO/RR 99 would leave it nothing to outrank with.
fn check_below_engine(key: &str, c: BoostClass) -> Result<(), OptionError> {
    match c {
        BoostClass::Fifo(p) | BoostClass::Rr(p) if p >= 99 => Err(bad(
            key,
            c,
            "priority 99 leaves the engine thread no priority above its vCPUs (at most 98)",
        )),
        _ => Ok(()),
    }
}

/// Parses a recovery ratio (`1`, `2`, `0.5`, `1:1`, `3:2`: unboosted time per boosted time)
/// into thousandths, within 0.1..=100.
fn parse_ratio_milli(v: &str) -> Option<u64> {
    let milli = |x: &str| -> Option<u64> {
        let x = x.trim();
        let (int, frac) = x.split_once('.').unwrap_or((x, ""));
        // Digits only: `str::parse` would also take a sign (`+1`, `1.+5`).
        let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if int.is_empty() && frac.is_empty() || frac.len() > 3 || !digits(int) || !digits(frac) {
            return None;
        }
        let int: u64 = if int.is_empty() { 0 } else { int.parse().ok()? };
        let frac: u64 = if frac.is_empty() {
            0
        } else {
            frac.parse::<u64>().ok()? * 10u64.pow(3 - frac.len() as u32)
        };
        int.checked_mul(1000)?.checked_add(frac)
    };
    let r = match v.split_once(':') {
        // "boosted:unboosted", v3 style: 1:1.
        Some((b, u)) => {
            let (b, u) = (milli(b)?, milli(u)?);
            (b > 0).then(|| u.saturating_mul(1000) / b)?
        }
        None => milli(v)?,
    };
    (100..=100_000).contains(&r).then_some(r)
}

/// A host interrupt, wake-up or starvation for a v3 vCPU: its deboost ends now (whatever the
/// host boost then decides: the cap, a latch or a quiet host may refuse it) and none starts
/// until the guest's page changes.
fn hold_deboost(ctx: &mut VcpuCtx<'_>) {
    if let Some(v) = ctx.state.v3.as_mut() {
        v.deboost_hold = true;
        ctx.end_deboost();
    }
}

/// Linux's priority scale for a class, lower is more urgent (as `v3::HostPrio::rank`).
fn class_rank(c: BoostClass) -> i32 {
    match c {
        BoostClass::Deadline { .. } => -1,
        BoostClass::Fifo(p) | BoostClass::Rr(p) => 99 - p as i32,
        BoostClass::Nice(n) => 120 + n,
        BoostClass::Slice(_) | BoostClass::Pause(_) => 120,
        BoostClass::Idle => 140,
    }
}

/// True while a host interrupt boost waits for a v3 guest to echo its ticket: the guest has
/// not taken the interrupt yet, so an empty page says nothing about it (the hold still ends
/// the boost).
fn awaits_ack(ctx: &VcpuCtx<'_>, b: Boost) -> bool {
    b.cause == Cause::Interrupt
        && ctx.now < b.hold_until
        && ctx.state.v3.is_some_and(|v| v.ticket_outstanding)
}

/// `dynamic`: RFC v1 semantics with pvsched v3's budgets. Boosts when the host injects an
/// interrupt or wakes the vCPU and when the guest requests; unboosts when the guest releases
/// (synchronously, through its doorbell); charges boosted time to two debts (all time, and
/// critical-section time), paid back by unboosted time; a debt at its limit throttles until
/// it is paid back.
#[derive(Debug)]
pub struct DynamicDriver {
    p: DynamicParams,
    name: &'static str,
}

impl DynamicDriver {
    /// `dynamic` with options `class`, `cs_budget`, `rt_budget`, `recovery`, `cooldown`,
    /// `irq_hold`.
    pub fn from_options(o: &DriverOptions) -> Result<Self, OptionError> {
        o.check_known("dynamic", DYNAMIC_KEYS)?;
        Ok(DynamicDriver {
            p: DynamicParams::from_options(o, DynamicParams::dynamic_default())?,
            name: "dynamic",
        })
    }

    /// `deadline-aware`: `dynamic` plus a boost `lead` ([`DEADLINE_LEAD_NS`]) ahead of the guest's
    /// published deadline, so no reaction delay is paid when its timer fires.
    pub fn deadline_aware(o: &DriverOptions) -> Result<Self, OptionError> {
        o.check_known("deadline-aware", DEADLINE_KEYS)?;
        Ok(DynamicDriver {
            p: DynamicParams::from_options(o, DynamicParams::deadline_default())?,
            name: "deadline-aware",
        })
    }

    /// `v3-default`: pvsched v3's default policy for guests that speak the v3 page. Its
    /// selector maps the guest's task intent and critical sections to a host class (options
    /// `cs_rt_prio`, `deadline_rt_prio`, `guest_rt_cap`, `baseline_nice`), deboosts a vCPU
    /// whose guest runs idle or low-priority work, and bounds boosts by the two debts
    /// (`cs_budget`, `rt_budget`, `recovery`, `cooldown`); host interrupts boost for
    /// `irq_hold` or until the guest echoes their ticket; `deboost=off` keeps the baseline.
    /// No repayment beyond the debts' 1:1
    /// recovery (v3 has none), no deadline lead (the v3 page carries no deadline).
    pub fn v3_default(o: &DriverOptions) -> Result<Self, OptionError> {
        o.check_known("v3-default", V3_KEYS)?;
        let d = SelectorConfig::default();
        let prio = |key: &str, default: u32| -> Result<u32, OptionError> {
            match o.get(key) {
                None => Ok(default),
                Some(v) => v
                    .parse()
                    .map_err(|_| bad(key, v, "expected a FIFO priority")),
            }
        };
        let selector = SelectorConfig {
            cs_rt_prio: prio("cs_rt_prio", d.cs_rt_prio)?,
            deadline_rt_prio: prio("deadline_rt_prio", d.deadline_rt_prio)?,
            guest_rt_cap: prio("guest_rt_cap", d.guest_rt_cap)?,
        };
        selector.validate()?;
        let baseline_nice = match o.get("baseline_nice") {
            None => 0,
            Some(v) => v
                .parse::<i8>()
                .ok()
                .filter(|n| (-20..=19).contains(n))
                .ok_or_else(|| bad("baseline_nice", v, "expected a nice value from -20 to 19"))?,
        };
        let mut p = DynamicParams::from_options(o, DynamicParams::default())?;
        p.class = BoostClass::Fifo(selector.cs_rt_prio);
        p.class_cs = p.class;
        p.class_task = p.class;
        p.class_deadline = p.class;
        p.repay = None;
        p.selector = Some(selector);
        p.baseline_nice = baseline_nice;
        p.deboost = match o.get("deboost") {
            None | Some("on") => true,
            Some("off") => false,
            Some(v) => return Err(bad("deboost", v, "expected on or off")),
        };
        Ok(DynamicDriver {
            p,
            name: "v3-default",
        })
    }

    /// The parameters in force.
    pub fn params(&self) -> DynamicParams {
        self.p
    }

    /// Interrupt and deadline boosts are charged like a critical section while no guest
    /// request holds them, so a guest that makes the host inject interrupts back to back
    /// cannot stay boosted.
    fn host_initiated(&self, b: Boost) -> bool {
        matches!(b.cause, Cause::Interrupt | Cause::Deadline)
    }

    /// True when the current boost is charged to the critical-section debt.
    fn charges_cs(&self, ctx: &VcpuCtx<'_>) -> bool {
        crate::driver::charges_cs(ctx.state)
    }

    /// `v3-default`: the selector's answer for the vCPU's page under its latches (`None`
    /// without a selector or a page).
    fn selection(&self, ctx: &VcpuCtx<'_>) -> Option<Selection> {
        let cfg = self.p.selector?;
        let v3 = ctx.state.v3?;
        let d = ctx.state.debts;
        Some(v3::select(
            &cfg,
            self.p.baseline_nice,
            &v3.area,
            d.cs_latched,
            d.generic_latched,
        ))
    }

    /// The class a request boost runs in: the selector's when it selects a boost, else the
    /// configured class for the request's kind. `None`: the selector selects no boost.
    fn request_class(&self, ctx: &VcpuCtx<'_>) -> Option<BoostClass> {
        if let Some(sel) = self.selection(ctx) {
            return sel
                .prio
                .above(self.p.baseline_nice)
                .then(|| sel.prio.class());
        }
        if self.p.selector.is_some() {
            // v3-default without a page: nothing to select from.
            return None;
        }
        Some(if ctx.state.request.contains(Reason::RtTask) {
            self.p.class_task
        } else {
            self.p.class_cs
        })
    }

    /// `v3-default`: an unboosted vCPU whose guest runs below the baseline (idle, a higher
    /// nice) is deboosted to that class; back to its original attributes otherwise.
    fn update_deboost(&self, ctx: &mut VcpuCtx<'_>) {
        if ctx.state.is_boosted() {
            return;
        }
        let hold = ctx.state.v3.is_some_and(|v| v.deboost_hold);
        let below = self
            .selection(ctx)
            .filter(|_| self.p.deboost && !hold)
            .filter(|s| s.prio.below(self.p.baseline_nice))
            .filter(|_| ctx.state.published != Some(BoostState::Disabled));
        match below {
            Some(s) => ctx.deboost(s.prio.class()),
            None => ctx.end_deboost(),
        }
    }

    /// Unboosted time `dt` pays back this much debt; the rounding remainder is carried in
    /// `carry` to the next call.
    fn repaid(&self, dt: Nanos, carry: &mut u64) -> Nanos {
        let r = self.p.recovery_milli as u128;
        let total = dt as u128 * 1000 + *carry as u128;
        *carry = (total % r) as u64;
        (total / r).min(Nanos::MAX as u128) as Nanos
    }

    /// Debt `d` is paid back after this much unboosted time.
    fn repay_time(&self, d: Nanos) -> Nanos {
        ((d as u128 * self.p.recovery_milli as u128).div_ceil(1000)).min(Nanos::MAX as u128)
            as Nanos
    }

    /// Charges (or pays back) the time since the last accounting, in the state the vCPU was in
    /// during that time. Runs first for every event. A boost the host alone held is charged
    /// only up to the end of its hold: a host that checks it late pays, not the guest.
    fn account(&self, ctx: &mut VcpuCtx<'_>) {
        let now = ctx.now;
        let cs = self.charges_cs(ctx);
        let pays_by_pausing = self.pause_repay(ctx).is_some();
        let s = &mut *ctx.state;
        let from = s.debts.at;
        s.debts.at = now.max(from);
        let dt = now.saturating_sub(from);
        match s.boost {
            Some(b) => {
                let end = if self.host_initiated(b) && s.request.is_empty() {
                    now.min(b.hold_until.max(from))
                } else {
                    now
                };
                let charged = end.saturating_sub(from);
                s.debts.generic = s.debts.generic.saturating_add(charged);
                if b.class.takes_extra_share() && pays_by_pausing {
                    s.pause_owed = s.pause_owed.saturating_add(charged).min(self.p.rt_budget);
                }
                if cs {
                    s.debts.cs = s.debts.cs.saturating_add(charged);
                }
            }
            None => {
                let r = self.repaid(dt, &mut s.debts.carry);
                s.debts.generic = s.debts.generic.saturating_sub(r);
                s.debts.cs = s.debts.cs.saturating_sub(r);
                if s.debts.generic == 0 && s.debts.cs == 0 {
                    s.debts.carry = 0;
                }
            }
        }
    }

    /// True when a boost for the current request (or the host, `host` true) is refused.
    fn refuses(&self, ctx: &VcpuCtx<'_>, host: bool) -> bool {
        let d = ctx.state.debts;
        d.generic_latched || (d.cs_latched && (host || !ctx.state.request.contains(Reason::RtTask)))
    }

    /// When the current boost must be checked next: a debt reaching its limit, or the end of
    /// a host hold without request.
    fn next_check(&self, ctx: &VcpuCtx<'_>) -> Option<Nanos> {
        let s = &ctx.state;
        let b = s.boost?;
        let now = ctx.now;
        let generic = now.saturating_add(self.p.rt_budget.saturating_sub(s.debts.generic));
        let cs = (self.charges_cs(ctx) && !s.debts.cs_latched)
            .then(|| now.saturating_add(self.p.cs_budget.saturating_sub(s.debts.cs)));
        let hold = s.request.is_empty().then_some(b.hold_until);
        [Some(generic), cs, hold].into_iter().flatten().min()
    }

    fn rearm(&self, ctx: &mut VcpuCtx<'_>) {
        if let Some(at) = self.next_check(ctx) {
            // An overdue check (a late timer) runs at once.
            let at = at.max(ctx.now);
            ctx.arm(TimerKind::Budget, at);
        }
    }

    /// Arms the check that clears the latches once their debts are paid back.
    fn arm_release(&self, ctx: &mut VcpuCtx<'_>) {
        let d = ctx.state.debts;
        let mut owed = 0;
        if d.generic_latched {
            owed = owed.max(d.generic);
        }
        if d.cs_latched {
            owed = owed.max(d.cs);
        }
        // While boosted (an RT task may run while only the critical-section latch is set),
        // nothing is paid back: the debt stays as it is until the boost ends, so looking again
        // when it would be paid back at once would re-arm this check every few nanoseconds.
        let soonest = if ctx.state.is_boosted() {
            ctx.now.saturating_add(RELEASE_POLL_BOOSTED_NS)
        } else {
            ctx.now
        };
        let at = ctx
            .now
            .saturating_add(self.repay_time(owed))
            .max(ctx.state.throttled_until.unwrap_or(0))
            .max(soonest);
        ctx.arm(TimerKind::Cooldown, at);
    }

    /// A boost the host starts on its own, held at least until `hold_until` without a
    /// request, releasable by the guest from `release_after`.
    fn host_boost(
        &self,
        ctx: &mut VcpuCtx<'_>,
        cause: Cause,
        release_after: Nanos,
        hold_until: Nanos,
        ticket: bool,
    ) {
        if let Some(b) = ctx.state.boost.as_mut() {
            b.hold_until = b.hold_until.max(hold_until);
            b.release_after = b.release_after.max(release_after);
            if ticket && ctx.state.v3.is_some() {
                // A v3 guest acknowledges each interrupt it is handed: a new ticket.
                ctx.issue_ticket();
                ctx.publish(BoostState::Boosted);
            }
        } else if ctx.state.quiet {
            ctx.state.counters.skipped_quiet += 1;
            return;
        } else if self.refuses(ctx, true) {
            ctx.state.counters.refused += 1;
            return;
        } else {
            let class = if cause == Cause::Deadline {
                self.p.class_deadline
            } else {
                self.p.class_cs
            };
            if ticket && !ctx.cap_full(class) {
                ctx.issue_ticket();
            }
            ctx.boost(class, cause, release_after, hold_until);
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
        if ctx.state.published == Some(BoostState::Disabled) && !ctx.state.muted {
            // The slot decodes again after it was found invalid: resume. Publishing Normal
            // makes the mechanism re-read the request and report it.
            ctx.publish(BoostState::Normal);
            return;
        }
        if ctx.state.request.is_empty() {
            match ctx.state.boost {
                Some(b) if self.releasable(ctx, b) && !awaits_ack(ctx, b) => {
                    self.unboost(ctx, BoostState::Normal)
                }
                Some(_) => self.rearm(ctx),
                None => {}
            }
            return;
        }
        if ctx.state.is_boosted() {
            if self.refuses(ctx, false) {
                // A critical section alone while its debt is latched: the RT task that held
                // the boost has gone.
                self.throttle(ctx);
            } else {
                // v3: the class follows the selection (a critical section ended, a task of
                // another priority runs).
                if let (Some(_), Some(c)) = (self.p.selector, self.request_class(ctx)) {
                    // While the host's own hold runs (an interrupt not yet taken), the
                    // boost never becomes less urgent than what the host applied.
                    let keep = ctx.state.boost.filter(|b| {
                        awaits_ack(ctx, *b) || (self.host_initiated(*b) && ctx.now < b.hold_until)
                    });
                    let c = match keep {
                        Some(b) if class_rank(b.class) < class_rank(c) => b.class,
                        _ => c,
                    };
                    ctx.reclass(c);
                    ctx.refresh_v3();
                }
                self.rearm(ctx);
            }
        } else if ctx.state.quiet {
            ctx.state.counters.skipped_quiet += 1;
        } else if self.refuses(ctx, false) {
            ctx.state.counters.refused += 1;
        } else if let Some(class) = self.request_class(ctx) {
            ctx.boost(class, Cause::Request, now, now);
            self.rearm(ctx);
        }
    }

    /// Ends the boost as throttled and arms the latches' release.
    ///
    /// After a throttle the vCPU repays (with `repay` on) when the guest asked for what ran
    /// out: the generic debt, or a critical-section boost its own request started. A boost
    /// the host started on its own (ahead of a deadline, for an interrupt) that ran into the
    /// critical-section limit is only throttled: the guest did not ask for it, and making it
    /// run below its fair share afterwards only delays its next deadline further.
    fn throttle(&self, ctx: &mut VcpuCtx<'_>) {
        ctx.state.counters.throttles += 1;
        let generic = ctx.state.debts.generic_latched;
        if generic {
            ctx.state.counters.generic_throttles += 1;
        }
        let asked = generic || ctx.state.boost.is_some_and(|b| b.cause == Cause::Request);
        let extra = ctx.state.boost.is_some_and(|b| b.class.takes_extra_share());
        self.unboost(ctx, BoostState::Throttled);
        ctx.state.throttled_until = Some(ctx.now.saturating_add(self.p.cooldown));
        self.arm_release(ctx);
        // Ran out of budget: it gives back what it took, below its normal weight.
        if extra && asked && self.p.repay_on == RepayOn::Throttle {
            self.repay_if_owed(ctx);
        }
    }

    /// Ends the boost; with `repay` on and a debt left, the vCPU pays it back below its
    /// normal weight until the debt is zero.
    fn unboost(&self, ctx: &mut VcpuCtx<'_>, then: BoostState) {
        // A boost that took no more than its fair share (a custom slice) has nothing to give
        // back; its time still counts against the budgets.
        let extra = ctx.state.boost.is_some_and(|b| b.class.takes_extra_share());
        ctx.unboost(then);
        if extra && self.p.repay_on == RepayOn::Boost {
            self.repay_if_owed(ctx);
        }
    }

    /// The repayment class when the vCPU pays back in paused time: the driver repays by
    /// pausing ([`BoostClass::Pause`]) and the vCPU's thread can pause.
    fn pause_repay(&self, ctx: &VcpuCtx<'_>) -> Option<BoostClass> {
        self.p
            .repay
            .filter(|c| matches!(c, BoostClass::Pause(_)) && ctx.state.pausable)
    }

    fn repay_if_owed(&self, ctx: &mut VcpuCtx<'_>) {
        let Some(class) = self.p.repay else { return };
        if ctx.state.quiet || ctx.state.sleeps {
            // Nobody waits for the CPU: there is nobody to give it back to. Or the vCPU
            // sleeps part of the time: below its weight it would wait behind the host's
            // threads each time it wakes (see `VcpuEvent::Sleeps` for the price).
            return;
        }
        if let Some(class) = self.pause_repay(ctx) {
            // Paid back in paused time: it ends when the pauses add up to what is owed
            // (`VcpuEvent::Paused`), however long the guest runs between them.
            if ctx.state.pause_owed > 0
                && !ctx.state.is_boosted()
                && ctx.state.repay_since.is_none()
            {
                ctx.start_repay(class);
            }
            return;
        }
        // A vCPU that cannot pause pays back at a nice level, for as long as the debt says.
        let class = match class {
            BoostClass::Pause(_) => BoostClass::Nice(crate::PAUSE_FALLBACK_NICE),
            c => c,
        };
        let owed = ctx.state.debts.generic;
        if owed == 0 || ctx.state.is_boosted() {
            return;
        }
        if ctx.state.repay_since.is_none() {
            ctx.start_repay(class);
        }
        let at = ctx.now.saturating_add(self.repay_time(owed));
        ctx.arm(TimerKind::Repay, at);
    }

    /// The repayment's end: the debt is paid back (or more is owed: look again then).
    fn check_repay(&self, ctx: &mut VcpuCtx<'_>) {
        if ctx.state.is_boosted()
            || ctx.state.repay_since.is_none()
            || self.pause_repay(ctx).is_some()
        {
            return;
        }
        if ctx.state.debts.generic == 0 {
            ctx.end_repay();
        } else {
            self.repay_if_owed(ctx);
        }
    }

    fn check_budget(&self, ctx: &mut VcpuCtx<'_>) {
        if ctx.state.boost.is_none() {
            return;
        }
        let d = ctx.state.debts;
        if d.generic >= self.p.rt_budget {
            ctx.state.debts.generic_latched = true;
        }
        if self.charges_cs(ctx) && d.cs >= self.p.cs_budget {
            ctx.state.debts.cs_latched = true;
        }
        let host_only = ctx.state.request.is_empty();
        if ctx.state.debts.latched() && self.refuses(ctx, host_only) {
            self.throttle(ctx);
        } else if self.next_check(ctx).is_none_or(|t| t <= ctx.now) {
            // Nothing holds the boost any longer (the hold ran out, no request): end it.
            self.unboost(ctx, BoostState::Normal);
        } else {
            self.rearm(ctx);
        }
    }

    /// The release check: clears the latches whose debt is paid back.
    fn check_release(&self, ctx: &mut VcpuCtx<'_>) {
        if ctx.state.throttled_until.is_some_and(|t| ctx.now < t) {
            self.arm_release(ctx);
            return;
        }
        let d = &mut ctx.state.debts;
        if d.generic_latched && d.generic == 0 {
            d.generic_latched = false;
        }
        if d.cs_latched && d.cs == 0 {
            d.cs_latched = false;
        }
        if d.latched() {
            self.arm_release(ctx);
        } else {
            ctx.state.throttled_until = None;
            if !ctx.state.is_boosted() {
                // The mechanism re-reads the request after publishing and reports it. While
                // quiet a v1 guest is told not to ring (see `VcpuEvent::Quiet`).
                ctx.state.muted = ctx.state.quiet && ctx.state.v3.is_none();
                ctx.publish(if ctx.state.muted {
                    BoostState::Disabled
                } else {
                    BoostState::Normal
                });
            }
        }
    }
}

impl Driver for DynamicDriver {
    fn name(&self) -> &'static str {
        self.name
    }
    fn id(&self) -> u32 {
        if self.p.selector.is_some() {
            4
        } else if self.p.lead.is_some() {
            3
        } else {
            2
        }
    }
    fn deadline_class(&self) -> Option<BoostClass> {
        Some(self.p.class_deadline)
    }
    fn on_event(&mut self, ctx: &mut VcpuCtx<'_>, ev: VcpuEvent) {
        self.account(ctx);
        self.handle(ctx, ev);
        if self.p.selector.is_some() {
            self.update_deboost(ctx);
        }
    }
}

impl DynamicDriver {
    fn handle(&self, ctx: &mut VcpuCtx<'_>, ev: VcpuEvent) {
        let now = ctx.now;
        match ev {
            VcpuEvent::Registered => {
                let v1 = ctx.state.v3.is_none();
                ctx.state.muted = v1 && ctx.state.quiet && !ctx.state.is_throttled();
                ctx.publish(if ctx.state.is_throttled() {
                    BoostState::Throttled
                } else if ctx.state.muted {
                    BoostState::Disabled
                } else {
                    BoostState::Normal
                })
            }
            VcpuEvent::Unregistered => {
                ctx.state.muted = false;
                ctx.unboost(BoostState::Disabled);
                ctx.end_deboost();
            }
            VcpuEvent::Request(r) | VcpuEvent::Doorbell(r) => {
                ctx.state.request = r;
                self.on_request(ctx);
            }
            VcpuEvent::Interrupt | VcpuEvent::Woken => {
                hold_deboost(ctx);
                self.host_boost(
                    ctx,
                    Cause::Interrupt,
                    now,
                    now.saturating_add(self.p.irq_hold),
                    true,
                );
            }
            VcpuEvent::Intent(area) => {
                let v3 = ctx.state.v3.get_or_insert_with(Default::default);
                if v3.area != area {
                    // The guest ran since the host's interrupt: its page speaks again.
                    v3.deboost_hold = false;
                }
                v3.area = area;
                if v3.ticket_outstanding && area.ack != 0 && area.ack == v3.ticket {
                    v3.ticket_outstanding = false;
                    ctx.state.counters.tickets[1] += 1;
                    // The guest took the interrupt and its critical-section state says so
                    // from here: the host's hold has done its job.
                    if let Some(b) = ctx.state.boost.as_mut() {
                        if b.cause == Cause::Interrupt {
                            b.hold_until = b.hold_until.min(now);
                        }
                    }
                }
                let cfg = self.p.selector.unwrap_or_default();
                ctx.state.request = v3::reasons(&cfg, self.p.baseline_nice, &area);
                self.on_request(ctx);
            }
            VcpuEvent::DeadlineHint(d) => {
                ctx.state.deadline = d;
                if let (Some(lead), Some(d), false) = (self.p.lead, d, ctx.state.quiet) {
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
                        self.unboost(ctx, BoostState::Normal);
                    }
                }
            }
            VcpuEvent::SlotInvalid => {
                ctx.state.counters.bad_slots += 1;
                ctx.state.muted = false;
                ctx.state.request = Default::default();
                if let Some(v3) = ctx.state.v3.as_mut() {
                    v3.area = Default::default();
                }
                if ctx.state.boost.is_some_and(|b| b.cause == Cause::Request) {
                    self.unboost(ctx, BoostState::Disabled);
                } else {
                    ctx.publish(BoostState::Disabled);
                    // A host boost kept: without the request, its hold is what ends it.
                    self.rearm(ctx);
                }
                // A v3 page that is garbage or gone is forgotten: no deboost from it, and
                // the next page read (or a v1 slot) starts afresh.
                ctx.end_deboost();
                ctx.state.v3 = None;
            }
            VcpuEvent::Timer(kind, gen) if ctx.is_current(kind, gen) => match kind {
                TimerKind::Budget => self.check_budget(ctx),
                TimerKind::Cooldown => self.check_release(ctx),
                TimerKind::Repay => self.check_repay(ctx),
                TimerKind::Lead => {
                    // More than the cap's wait past the deadline, the moment has gone (a
                    // timer deferred or run that late).
                    let late = |d: Nanos| now.saturating_sub(d) > crate::engine::CAP_WAIT_HOST_NS;
                    if let Some(d) = ctx.state.deadline.filter(|&d| !late(d)) {
                        // Late (the cap made it wait, or the timer ran late): the guest's
                        // interrupt is pending, so the hold counts from now.
                        let hold = d.max(now).saturating_add(self.p.irq_hold);
                        self.host_boost(ctx, Cause::Deadline, d, hold, false);
                    }
                }
                // The engine's own timer (it never reaches a driver).
                TimerKind::Cap => {}
            },
            VcpuEvent::Timer(..) => {}
            VcpuEvent::Sleeps(true) => {
                // A repayment in progress ends (the debt still falls with unboosted time,
                // and what was owed in paused time is forgiven).
                ctx.state.pause_owed = 0;
                if !ctx.state.is_boosted() {
                    ctx.end_repay();
                }
            }
            // Kept by the engine (`VcpuState::pausable`).
            VcpuEvent::Pausable => {}
            VcpuEvent::Paused(ns) => {
                let s = &mut *ctx.state;
                s.pause_owed = s.pause_owed.saturating_sub(ns);
                if s.pause_owed == 0 && !s.is_boosted() && self.pause_repay(ctx).is_some() {
                    ctx.end_repay();
                }
            }
            // Its next boost is paid back again, once it ends.
            VcpuEvent::Sleeps(false) => {}
            VcpuEvent::Starved => {
                if !ctx.state.is_boosted() {
                    ctx.end_repay();
                    hold_deboost(ctx);
                    // A short host boost (within its budgets, waiting for the cap like any):
                    // as a real-time thread it is moved off the CPU it is stuck on, or takes
                    // its turn there.
                    self.host_boost(
                        ctx,
                        Cause::Interrupt,
                        now,
                        now.saturating_add(self.p.irq_hold),
                        false,
                    );
                }
            }
            VcpuEvent::Quiet(quiet) => {
                ctx.state.quiet = quiet;
                // While quiet no request can start a boost: a protocol-v1 guest that was told
                // `Normal` is told `Disabled`, so it rings no doorbell for nothing, and
                // `Normal` again when the host is contended (then its request is read again).
                let v1 = ctx.state.v3.is_none();
                if quiet {
                    // Nothing to protect the vCPU from: end the boost, and any repayment
                    // (nobody waits for what it would give back).
                    ctx.state.pause_owed = 0;
                    let rest = if v1 {
                        BoostState::Disabled
                    } else {
                        BoostState::Normal
                    };
                    if ctx.state.is_boosted() {
                        ctx.unboost(rest);
                        ctx.state.muted = v1;
                    } else {
                        ctx.end_repay();
                        if v1 && matches!(ctx.state.published, None | Some(BoostState::Normal)) {
                            ctx.publish(BoostState::Disabled);
                            ctx.state.muted = true;
                        }
                    }
                    // Lead timers are not armed while quiet; an armed one is dropped.
                    ctx.state.timer_gen[TimerKind::Lead as usize] += 1;
                } else {
                    if std::mem::take(&mut ctx.state.muted)
                        && ctx.state.published == Some(BoostState::Disabled)
                    {
                        ctx.publish(BoostState::Normal);
                    }
                    if let (Some(lead), Some(d)) = (self.p.lead, ctx.state.deadline) {
                        if d > now {
                            ctx.arm(TimerKind::Lead, d.saturating_sub(lead).max(now));
                        }
                    }
                    if !ctx.state.request.is_empty() {
                        self.on_request(ctx);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_ratio_milli;

    #[test]
    fn recovery_ratios_parse() {
        assert_eq!(parse_ratio_milli("1"), Some(1000));
        assert_eq!(parse_ratio_milli("0.5"), Some(500));
        assert_eq!(parse_ratio_milli("1:1"), Some(1000));
        assert_eq!(parse_ratio_milli("1:2"), Some(2000));
        assert_eq!(parse_ratio_milli("2:1"), Some(500));
        for bad in [
            "0", "0.01", "101", "x", "", ":", "1:0", "0:1", "1.2345", "-1", "+1", "1.+5", "1:+2",
        ] {
            assert_eq!(parse_ratio_milli(bad), None, "{bad}");
        }
    }
}
