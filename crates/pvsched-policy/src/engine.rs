//! The engine: drivers by name, one per VM, replaceable at runtime; global and per-VM
//! enable/disable (RFC v1 patch 6); per-vCPU state; events in, decisions out.

use crate::driver::{Cause, Debts, Driver, VcpuCtx, VcpuState};
use crate::drivers::{DynamicDriver, NoneDriver, StaticDriver};
use crate::options::{DriverOptions, OptionError};
use crate::{BoostState, Decision, Event, Nanos, TimerKind, VcpuEvent, VcpuKey};
use pvsched_proto::Reasons;
use std::collections::BTreeMap;

/// Builds a driver from its options.
pub type Factory = fn(&DriverOptions) -> Result<Box<dyn Driver>, OptionError>;

/// Errors of engine configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// No driver of that name.
    #[error("unknown policy driver {name:?} (available: {known})")]
    UnknownDriver {
        /// The name asked for.
        name: String,
        /// The registered names.
        known: String,
    },
    /// The driver rejected its options.
    #[error(transparent)]
    Options(#[from] OptionError),
    /// No VM with that id.
    #[error("no VM {0}")]
    UnknownVm(u32),
    /// A VM with that id exists already.
    #[error("VM {0} exists already")]
    VmExists(u32),
}

/// Drivers by name.
#[derive(Clone)]
pub struct Registry {
    drivers: BTreeMap<&'static str, Factory>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::builtin()
    }
}

impl Registry {
    /// An empty registry.
    pub fn empty() -> Self {
        Registry {
            drivers: BTreeMap::new(),
        }
    }

    /// The built-in drivers: `none`, `static`, `dynamic`, `deadline-aware`.
    pub fn builtin() -> Self {
        let mut r = Self::empty();
        r.register("none", |o| Ok(Box::new(NoneDriver::from_options(o)?)));
        r.register("static", |o| Ok(Box::new(StaticDriver::from_options(o)?)));
        r.register("dynamic", |o| Ok(Box::new(DynamicDriver::from_options(o)?)));
        r.register("v3-default", |o| {
            Ok(Box::new(DynamicDriver::v3_default(o)?))
        });
        r.register("deadline-aware", |o| {
            Ok(Box::new(DynamicDriver::deadline_aware(o)?))
        });
        r
    }

    /// Adds (or replaces) a driver.
    pub fn register(&mut self, name: &'static str, factory: Factory) {
        self.drivers.insert(name, factory);
    }

    /// Registered names, sorted.
    pub fn names(&self) -> Vec<&'static str> {
        self.drivers.keys().copied().collect()
    }

    /// Builds driver `name` with `opts`.
    pub fn create(&self, name: &str, opts: &DriverOptions) -> Result<Box<dyn Driver>, EngineError> {
        let f = self
            .drivers
            .get(name)
            .ok_or_else(|| EngineError::UnknownDriver {
                name: name.to_string(),
                known: self.names().join(", "),
            })?;
        Ok(f(opts)?)
    }
}

struct VmEntry {
    driver: Box<dyn Driver>,
    enabled: bool,
    vcpus: BTreeMap<u32, VcpuState>,
}

/// The policy engine.
pub struct Engine {
    registry: Registry,
    vms: BTreeMap<u32, VmEntry>,
    enabled: bool,
    /// At most this many vCPUs boosted at once, over all VMs (`None`: no limit).
    max_boosted: Option<usize>,
    /// How long a boost keeps its cap slot while another waits ([`CAP_QUANTUM_NS`]).
    cap_quantum: Nanos,
    /// vCPUs holding a slot of the cap now (boosted in a class that takes extra share).
    boosted: usize,
    /// vCPUs whose boost waits for the cap.
    waiting: usize,
}

/// How long a boost the host asked for on its own (an interrupt, a wake-up) may wait for the
/// cap before it is dropped, and how long after its deadline a waiting lead boost still
/// starts: past that, the moment it was for has gone.
pub const CAP_WAIT_HOST_NS: Nanos = 2_000_000;

/// How long a boost keeps its slot of the host-wide cap while another boost waits for one:
/// once the waiter has waited this long and the longest-held boost has been held this long,
/// that boost yields its slot to the best waiting one and waits in turn (its request stands).
/// Without it one request held for the whole RT budget (500 ms by default) keeps every other
/// vCPU's boost waiting, also a sibling vCPU of the same guest that the holder spins on (an
/// IPI, a lock): with one slot on a two-CPU host, boosts then take turns a quantum each.
pub const CAP_QUANTUM_NS: Nanos = 1_000_000;

/// A boost waiting for the cap since `since` for `what` still makes sense at `now`.
fn wait_is_live(st: &VcpuState, since: Nanos, what: VcpuEvent, now: Nanos) -> bool {
    match what {
        // The guest's standing request (a contention verdict only re-offered it): live while
        // it stands and the vCPU is contended.
        VcpuEvent::Request(_)
        | VcpuEvent::Doorbell(_)
        | VcpuEvent::Intent(_)
        | VcpuEvent::Quiet(_) => !st.request.is_empty() && !st.quiet,
        // A lead boost is for a deadline the guest has not served yet (serving it publishes
        // the next one, which re-arms the lead timer): a deadline that passed while the vCPU
        // waited still has its interrupt pending, and the boost lets it be handled now rather
        // than behind the host's threads. Not for ever: a guest that publishes nothing more
        // is dropped like a host boost.
        VcpuEvent::Timer(TimerKind::Lead, gen) => {
            st.is_timer_current(TimerKind::Lead, gen)
                && !st.quiet
                && st
                    .deadline
                    .is_some_and(|d| now.saturating_sub(d) <= CAP_WAIT_HOST_NS)
        }
        VcpuEvent::Timer(kind, gen) => st.is_timer_current(kind, gen),
        VcpuEvent::Interrupt | VcpuEvent::Woken | VcpuEvent::Starved => {
            now.saturating_sub(since) <= CAP_WAIT_HOST_NS && !st.quiet
        }
        VcpuEvent::Registered => true,
        // Nothing else starts a boost worth replaying.
        _ => false,
    }
}

impl Default for Engine {
    fn default() -> Self {
        Engine::new(Registry::builtin())
    }
}

impl Engine {
    /// An engine with `registry`'s drivers, globally enabled, without VMs.
    pub fn new(registry: Registry) -> Self {
        Engine {
            registry,
            vms: BTreeMap::new(),
            enabled: true,
            max_boosted: None,
            cap_quantum: CAP_QUANTUM_NS,
            boosted: 0,
            waiting: 0,
        }
    }

    /// Limits how many vCPUs may be boosted at once over all VMs (`None`: no limit), counting
    /// only boosts in a class that takes extra CPU share (a custom slice takes none: it is never
    /// held back and holds no slot). A boost over the limit waits: when a boosted vCPU lets go, the waiting one with the earliest
    /// published deadline (then the oldest) is handed its event again. Boosts in force are
    /// not ended by a lower limit; new ones wait until fewer are boosted.
    pub fn set_max_boosted(&mut self, max: Option<usize>) {
        self.max_boosted = max;
    }

    /// Sets how long a boost keeps its slot of the cap while another boost waits (default
    /// [`CAP_QUANTUM_NS`], at least 1 µs): shorter turns share the slots more evenly, at the
    /// price of more changes of class.
    pub fn set_cap_quantum(&mut self, quantum: Nanos) {
        self.cap_quantum = quantum.max(1_000);
    }

    /// The limit set with [`Engine::set_max_boosted`].
    pub fn max_boosted(&self) -> Option<usize> {
        self.max_boosted
    }

    /// vCPUs holding a slot of the cap now, over all VMs: boosted in a class that takes extra
    /// CPU share ([`crate::BoostClass::takes_extra_share`]).
    pub fn boosted_now(&self) -> usize {
        self.boosted
    }

    /// True when the host-wide cap is reached: no further vCPU can be boosted now.
    pub fn cap_full(&self) -> bool {
        self.max_boosted.is_some_and(|m| self.boosted >= m)
    }

    /// True when a boost that a lead timer of `key` starts now would only wait for the cap: the
    /// cap is full, the driver's deadline class takes extra share ([`Driver::deadline_class`])
    /// and the vCPU does not sleep part of the time ([`crate::VcpuState::holds_cap_slot`]).
    pub fn lead_would_wait(&self, key: VcpuKey) -> bool {
        self.cap_full()
            && self.vms.get(&key.vm).is_none_or(|e| {
                e.driver
                    .deadline_class()
                    .is_none_or(|c| c.takes_extra_share())
                    && e.vcpus.get(&key.vcpu).is_none_or(|st| !st.sleeps)
            })
    }

    /// Counts boosted and waiting vCPUs again (after changes to many vCPUs at once).
    fn recount(&mut self) {
        let (mut b, mut w) = (0, 0);
        for e in self.vms.values() {
            for st in e.vcpus.values() {
                b += st.holds_cap_slot() as usize;
                w += st.capped.is_some() as usize;
            }
        }
        (self.boosted, self.waiting) = (b, w);
    }

    /// Runs the driver of `key`'s VM on `what` under the cap; keeps the counts; records a
    /// boost the cap held back. Returns false when the vCPU is unknown.
    fn drive(
        &mut self,
        key: VcpuKey,
        what: VcpuEvent,
        now: Nanos,
        out: &mut Vec<Decision>,
    ) -> bool {
        let full = self.cap_full();
        let Some(e) = self.vms.get_mut(&key.vm) else {
            return false;
        };
        let Some(st) = e.vcpus.get_mut(&key.vcpu) else {
            return false;
        };
        let (was, waited) = (st.holds_cap_slot(), st.capped.is_some());
        let boosted = st.is_boosted();
        {
            let mut ctx = VcpuCtx::new(key, st, now, out).with_cap(full && !boosted);
            e.driver.on_event(&mut ctx, what);
        }
        if std::mem::take(&mut st.cap_refused) {
            // Keep the first time it waited (oldest first), with the newest reason.
            let since = st.capped.map_or(now, |(t, _)| t);
            st.capped = Some((since, what));
            if !waited {
                // After a quantum, it may take the slot of the longest-held boost.
                VcpuCtx::new(key, st, now, out)
                    .arm(TimerKind::Cap, now.saturating_add(self.cap_quantum));
            }
        }
        if st.is_boosted() {
            st.capped = None;
        }
        let (is, waits) = (st.holds_cap_slot(), st.capped.is_some());
        self.boosted = self.boosted + is as usize - was as usize;
        self.waiting = self.waiting + waits as usize - waited as usize;
        true
    }

    /// While the cap allows, hands the best waiting boost (earliest published deadline,
    /// then oldest) its event again. Waits that no longer make sense are dropped.
    fn offer(&mut self, now: Nanos, out: &mut Vec<Decision>) {
        while self.waiting > 0 && !self.cap_full() {
            let mut best: Option<(Nanos, Nanos, VcpuKey, VcpuEvent)> = None;
            let mut stale = Vec::new();
            let global = self.enabled;
            for (&vm, e) in &self.vms {
                for (&vcpu, st) in &e.vcpus {
                    let Some((since, what)) = st.capped else {
                        continue;
                    };
                    let key = VcpuKey::new(vm, vcpu);
                    let live = global && e.enabled && wait_is_live(st, since, what, now);
                    if !live {
                        stale.push(key);
                        continue;
                    }
                    let rank = (st.deadline.unwrap_or(Nanos::MAX), since, key, what);
                    if best.is_none_or(|b| (rank.0, rank.1, rank.2) < (b.0, b.1, b.2)) {
                        best = Some(rank);
                    }
                }
            }
            for key in stale {
                if let Some(st) = self.vcpu_mut(key) {
                    st.capped = None;
                    self.waiting -= 1;
                }
            }
            let Some((_, _, key, what)) = best else {
                return;
            };
            // A request is handed over as it stands now (never a stale verdict); a v3 page as
            // last read.
            let what = match what {
                VcpuEvent::Request(_)
                | VcpuEvent::Doorbell(_)
                | VcpuEvent::Quiet(_)
                | VcpuEvent::Intent(_) => self.vcpu(key).map_or(what, |st| match st.v3 {
                    Some(v) => VcpuEvent::Intent(v.area),
                    None => VcpuEvent::Request(st.request),
                }),
                w => w,
            };
            self.drive(key, what, now, out);
            // Not boosted after all (the driver decided otherwise): it no longer waits.
            if let Some(st) = self.vcpu_mut(key) {
                if st.capped.take().is_some() {
                    self.waiting -= 1;
                }
            }
        }
    }

    /// A boost has waited a quantum for the cap (timer [`TimerKind::Cap`] of `key`): the
    /// boost held longest, if it has been held for a quantum, yields its slot (its vCPU is
    /// unboosted and told `Normal`); the best waiting boost gets the slot, and the holder
    /// waits in turn. Otherwise the waiter looks again when the oldest boost has been held a
    /// quantum.
    fn rotate(&mut self, key: VcpuKey, gen: u64, now: Nanos, out: &mut Vec<Decision>) {
        let quantum = self.cap_quantum;
        let waits = self.is_enabled(key.vm)
            && self.vcpu(key).is_some_and(|st| {
                st.is_timer_current(TimerKind::Cap, gen)
                    && st
                        .capped
                        .is_some_and(|(since, what)| wait_is_live(st, since, what, now))
            });
        if !waits {
            return;
        }
        if !self.cap_full() {
            self.offer(now, out);
            return;
        }
        let oldest = self
            .vms
            .iter()
            .filter(|(_, e)| e.enabled)
            .flat_map(|(&vm, e)| {
                e.vcpus
                    .iter()
                    .filter(|(_, st)| st.holds_cap_slot())
                    .filter_map(move |(&vcpu, st)| Some((st.boost?.since, VcpuKey::new(vm, vcpu))))
            })
            .min();
        let Some((since, holder)) = oldest else {
            return;
        };
        let turn = since.saturating_add(quantum);
        if turn > now {
            if let Some(st) = self.vcpu_mut(key) {
                VcpuCtx::new(key, st, now, out).arm(TimerKind::Cap, turn);
            }
            return;
        }
        self.yield_turn(holder, true, now, out);
    }

    /// Ends the boost of `holder` (holding a slot of the cap if `held`), which then waits for
    /// a slot in turn: its turn is over, or it needs one it does not have.
    fn yield_turn(&mut self, holder: VcpuKey, held: bool, now: Nanos, out: &mut Vec<Decision>) {
        let quantum = self.cap_quantum;
        if let Some(st) = self.vcpu_mut(holder) {
            let cause = st.boost.map(|b| b.cause);
            let mut ctx = VcpuCtx::new(holder, st, now, out);
            ctx.unboost(BoostState::Normal);
            ctx.state.counters.cap_yields += 1;
            if held {
                self.boosted -= 1;
            }
            // The slot goes to a waiting boost first (never straight back to the holder, even
            // with an earlier deadline)...
            self.offer(now, out);
            // ...then the holder waits for its turn with what it was boosted for: a static
            // boost, or the guest's request (handed over as it then stands). A host boost was
            // short: it is not resumed.
            let Some(st) = self.vcpu_mut(holder) else {
                return;
            };
            let again = match cause {
                Some(Cause::Static) => Some(VcpuEvent::Registered),
                Some(Cause::Request) => Some(VcpuEvent::Request(st.request)),
                _ => None,
            };
            if let Some(what) = again.filter(|_| !st.is_boosted()) {
                let new_wait = st.capped.replace((now, what)).is_none();
                VcpuCtx::new(holder, st, now, out).arm(TimerKind::Cap, now.saturating_add(quantum));
                self.waiting += usize::from(new_wait);
            }
            // A slot still free (the waiters had gone) goes to it at once.
            self.offer(now, out);
        }
    }

    /// `key`'s thread no longer sleeps part of the time: a boost it has that started while it
    /// slept (holding no slot, [`crate::VcpuState::holds_cap_slot`]) takes a slot if one is
    /// free, else ends and waits for one like a holder whose turn is over. Without this, two
    /// halting vCPUs boosted by `static` that turn busy would keep both CPUs at FIFO.
    fn sleeper_wakes(&mut self, key: VcpuKey, now: Nanos, out: &mut Vec<Decision>) {
        let full = self.cap_full();
        let Some(st) = self.vcpu_mut(key) else {
            return;
        };
        let Some(b) = st
            .boost
            .filter(|b| b.sleeper && b.class.takes_extra_share())
        else {
            return;
        };
        if !full {
            st.boost = Some(crate::driver::Boost {
                sleeper: false,
                ..b
            });
            self.boosted += 1;
            return;
        }
        self.yield_turn(key, false, now, out);
    }

    /// The registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Adds VM `vm` run by driver `driver` with `opts`.
    pub fn add_vm(
        &mut self,
        vm: u32,
        driver: &str,
        opts: &DriverOptions,
    ) -> Result<(), EngineError> {
        if self.vms.contains_key(&vm) {
            return Err(EngineError::VmExists(vm));
        }
        let driver = self.registry.create(driver, opts)?;
        self.vms.insert(
            vm,
            VmEntry {
                driver,
                enabled: true,
                vcpus: BTreeMap::new(),
            },
        );
        Ok(())
    }

    /// Removes VM `vm`, unboosting its vCPUs.
    pub fn remove_vm(&mut self, vm: u32, now: Nanos, out: &mut Vec<Decision>) {
        if let Some(mut e) = self.vms.remove(&vm) {
            for (&vcpu, st) in e.vcpus.iter_mut() {
                let mut ctx = VcpuCtx::new(VcpuKey::new(vm, vcpu), st, now, out);
                ctx.unboost(BoostState::Disabled);
                ctx.end_deboost();
            }
        }
        self.recount();
        self.offer(now, out);
    }

    /// The VMs, by id.
    pub fn vm_ids(&self) -> Vec<u32> {
        self.vms.keys().copied().collect()
    }

    /// Name of the driver running VM `vm`.
    pub fn driver_name(&self, vm: u32) -> Option<&'static str> {
        self.vms.get(&vm).map(|e| e.driver.name())
    }

    /// Id of the driver running VM `vm` (the slot's `policy` field).
    pub fn driver_id(&self, vm: u32) -> Option<u32> {
        self.vms.get(&vm).map(|e| e.driver.id())
    }

    /// True when boosting is on globally and for VM `vm`.
    pub fn is_enabled(&self, vm: u32) -> bool {
        self.enabled && self.vms.get(&vm).is_some_and(|e| e.enabled)
    }

    /// State of one vCPU.
    pub fn vcpu(&self, key: VcpuKey) -> Option<&VcpuState> {
        self.vms.get(&key.vm)?.vcpus.get(&key.vcpu)
    }

    /// State of one vCPU, to change.
    fn vcpu_mut(&mut self, key: VcpuKey) -> Option<&mut VcpuState> {
        self.vms.get_mut(&key.vm)?.vcpus.get_mut(&key.vcpu)
    }

    /// All vCPUs and their state.
    pub fn vcpus(&self) -> impl Iterator<Item = (VcpuKey, &VcpuState)> {
        self.vms.iter().flat_map(|(&vm, e)| {
            e.vcpus
                .iter()
                .map(move |(&vcpu, st)| (VcpuKey::new(vm, vcpu), st))
        })
    }

    /// Handles one event at `now`, appending decisions to `out`.
    pub fn handle(&mut self, ev: Event, now: Nanos, out: &mut Vec<Decision>) {
        let before = self.boosted;
        let global = self.enabled;
        let Some(e) = self.vms.get_mut(&ev.key.vm) else {
            return;
        };
        let enabled = global && e.enabled;
        match ev.what {
            VcpuEvent::Registered => {
                let st = e.vcpus.entry(ev.key.vcpu).or_default();
                if enabled {
                    self.drive(ev.key, VcpuEvent::Registered, now, out);
                } else {
                    VcpuCtx::new(ev.key, st, now, out).publish(BoostState::Disabled);
                }
            }
            VcpuEvent::Unregistered => {
                if let Some(mut st) = e.vcpus.remove(&ev.key.vcpu) {
                    let mut ctx = VcpuCtx::new(ev.key, &mut st, now, out);
                    e.driver.on_event(&mut ctx, VcpuEvent::Unregistered);
                    // Whatever the driver did, a vCPU that is gone is not boosted (nor
                    // deboosted).
                    ctx.unboost(BoostState::Disabled);
                    ctx.end_deboost();
                }
                self.recount();
            }
            VcpuEvent::Timer(TimerKind::Cap, gen) => {
                if enabled {
                    self.rotate(ev.key, gen, now, out);
                }
            }
            what => {
                let Some(st) = e.vcpus.get_mut(&ev.key.vcpu) else {
                    return;
                };
                match what {
                    // Kept whatever the driver, and while boosting is disabled.
                    VcpuEvent::Sleeps(s) => st.sleeps = s,
                    VcpuEvent::Pausable => st.pausable = true,
                    _ => {}
                }
                if enabled {
                    self.drive(ev.key, what, now, out);
                    if matches!(what, VcpuEvent::Sleeps(false)) {
                        self.sleeper_wakes(ev.key, now, out);
                    }
                } else if let VcpuEvent::Request(r) | VcpuEvent::Doorbell(r) = what {
                    // Remember it for when boosting is enabled again.
                    st.request = r;
                } else if let VcpuEvent::Intent(a) = what {
                    // Likewise for a v3 page (its reasons as the default selector reads them;
                    // the driver derives them again when it gets the page).
                    st.v3.get_or_insert_with(Default::default).area = a;
                    st.request = crate::v3::reasons(&Default::default(), 0, &a);
                } else if let VcpuEvent::Quiet(q) = what {
                    // Likewise: the verdict is only sent when it changes.
                    st.quiet = q;
                }
            }
        }
        if self.boosted < before {
            self.offer(now, out);
        }
    }

    /// Handles a batch of events.
    pub fn handle_all(
        &mut self,
        evs: impl IntoIterator<Item = Event>,
        now: Nanos,
        out: &mut Vec<Decision>,
    ) {
        for ev in evs {
            self.handle(ev, now, out);
        }
    }

    /// Enables or disables boosting globally (`vm` = `None`) or for one VM. Disabling
    /// unboosts and publishes `Disabled`; enabling hands every vCPU to its driver again.
    pub fn set_enabled(
        &mut self,
        vm: Option<u32>,
        enabled: bool,
        now: Nanos,
        out: &mut Vec<Decision>,
    ) -> Result<(), EngineError> {
        let before: Vec<(u32, bool)> = self.vms.keys().map(|&v| (v, self.is_enabled(v))).collect();
        match vm {
            None => self.enabled = enabled,
            Some(v) => {
                self.vms
                    .get_mut(&v)
                    .ok_or(EngineError::UnknownVm(v))?
                    .enabled = enabled
            }
        }
        for (v, was) in before {
            let is = self.is_enabled(v);
            if was != is {
                self.transition(v, is, now, out);
            }
        }
        self.recount();
        self.offer(now, out);
        Ok(())
    }

    /// Replaces VM `vm`'s driver. Its vCPUs are unboosted by the old driver's rules and
    /// handed to the new one as if just registered (with their current request).
    pub fn set_driver(
        &mut self,
        vm: u32,
        name: &str,
        opts: &DriverOptions,
        now: Nanos,
        out: &mut Vec<Decision>,
    ) -> Result<(), EngineError> {
        let driver = self.registry.create(name, opts)?;
        let enabled = self.is_enabled(vm);
        let e = self.vms.get_mut(&vm).ok_or(EngineError::UnknownVm(vm))?;
        if enabled {
            Self::reset_vcpus(vm, e, now, out, BoostState::Normal);
        }
        e.driver = driver;
        self.recount();
        if enabled {
            self.hand_over(vm, now, out);
        }
        self.recount();
        self.offer(now, out);
        Ok(())
    }

    /// Unboosts every vCPU of every VM and publishes `Disabled`: the engine's state when its
    /// host shuts down.
    pub fn shutdown(&mut self, now: Nanos, out: &mut Vec<Decision>) {
        for (&vm, e) in self.vms.iter_mut() {
            Self::reset_vcpus(vm, e, now, out, BoostState::Disabled);
        }
        self.recount();
    }

    fn transition(&mut self, vm: u32, enabled: bool, now: Nanos, out: &mut Vec<Decision>) {
        let Some(e) = self.vms.get_mut(&vm) else {
            return;
        };
        if enabled {
            self.hand_over(vm, now, out);
        } else {
            Self::reset_vcpus(vm, e, now, out, BoostState::Disabled);
            self.recount();
        }
    }

    /// Unboosts every vCPU of a VM, forgets throttles and invalidates pending timers.
    fn reset_vcpus(
        vm: u32,
        e: &mut VmEntry,
        now: Nanos,
        out: &mut Vec<Decision>,
        then: BoostState,
    ) {
        for (&vcpu, st) in e.vcpus.iter_mut() {
            let mut ctx = VcpuCtx::new(VcpuKey::new(vm, vcpu), st, now, out);
            ctx.unboost(then);
            // A deboost is the old driver's too: the next one decides again.
            ctx.end_deboost();
            ctx.state.throttled_until = None;
            ctx.state.debts = Debts {
                at: now,
                ..Debts::default()
            };
            for g in ctx.state.timer_gen.iter_mut() {
                *g += 1;
            }
            ctx.state.capped = None;
        }
    }

    /// Gives every vCPU of a VM to its driver (under the cap): registered, then its known
    /// request.
    fn hand_over(&mut self, vm: u32, now: Nanos, out: &mut Vec<Decision>) {
        let vcpus: Vec<u32> = self
            .vms
            .get(&vm)
            .map(|e| e.vcpus.keys().copied().collect())
            .unwrap_or_default();
        for vcpu in vcpus {
            let key = VcpuKey::new(vm, vcpu);
            self.drive(key, VcpuEvent::Registered, now, out);
            let (r, v3) = self
                .vcpu(key)
                .map_or((Reasons::NONE, None), |st| (st.request, st.v3));
            if let Some(v) = v3 {
                // A v3 page goes to the driver whatever it asks (a deboost asks nothing).
                self.drive(key, VcpuEvent::Intent(v.area), now, out);
            } else if !r.is_empty() {
                self.drive(key, VcpuEvent::Request(r), now, out);
            }
        }
    }
}
