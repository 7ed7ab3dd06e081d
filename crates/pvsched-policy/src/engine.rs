//! The engine: drivers by name, one per VM, replaceable at runtime; global and per-VM
//! enable/disable (RFC v1 patch 6); per-vCPU state; events in, decisions out.

use crate::driver::{Debts, Driver, VcpuCtx, VcpuState};
use crate::drivers::{DynamicDriver, NoneDriver, StaticDriver};
use crate::options::{DriverOptions, OptionError};
use crate::{BoostState, Decision, Event, Nanos, VcpuEvent, VcpuKey};
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
        }
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
            }
        }
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
        let global = self.enabled;
        let Some(e) = self.vms.get_mut(&ev.key.vm) else {
            return;
        };
        let enabled = global && e.enabled;
        match ev.what {
            VcpuEvent::Registered => {
                let st = e.vcpus.entry(ev.key.vcpu).or_default();
                let mut ctx = VcpuCtx::new(ev.key, st, now, out);
                if enabled {
                    e.driver.on_event(&mut ctx, VcpuEvent::Registered);
                } else {
                    ctx.publish(BoostState::Disabled);
                }
            }
            VcpuEvent::Unregistered => {
                if let Some(mut st) = e.vcpus.remove(&ev.key.vcpu) {
                    let mut ctx = VcpuCtx::new(ev.key, &mut st, now, out);
                    e.driver.on_event(&mut ctx, VcpuEvent::Unregistered);
                    // Whatever the driver did, a vCPU that is gone is not boosted.
                    ctx.unboost(BoostState::Disabled);
                }
            }
            what => {
                let Some(st) = e.vcpus.get_mut(&ev.key.vcpu) else {
                    return;
                };
                if enabled {
                    let mut ctx = VcpuCtx::new(ev.key, st, now, out);
                    e.driver.on_event(&mut ctx, what);
                } else if let VcpuEvent::Request(r) | VcpuEvent::Doorbell(r) = what {
                    // Remember it for when boosting is enabled again.
                    st.request = r;
                } else if let VcpuEvent::Quiet(q) = what {
                    // Likewise: the verdict is only sent when it changes.
                    st.quiet = q;
                }
            }
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
        if enabled {
            Self::hand_over(vm, e, now, out);
        }
        Ok(())
    }

    /// Unboosts every vCPU of every VM and publishes `Disabled`: the engine's state when its
    /// host shuts down.
    pub fn shutdown(&mut self, now: Nanos, out: &mut Vec<Decision>) {
        for (&vm, e) in self.vms.iter_mut() {
            Self::reset_vcpus(vm, e, now, out, BoostState::Disabled);
        }
    }

    fn transition(&mut self, vm: u32, enabled: bool, now: Nanos, out: &mut Vec<Decision>) {
        let Some(e) = self.vms.get_mut(&vm) else {
            return;
        };
        if enabled {
            Self::hand_over(vm, e, now, out);
        } else {
            Self::reset_vcpus(vm, e, now, out, BoostState::Disabled);
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
            ctx.state.throttled_until = None;
            ctx.state.debts = Debts {
                at: now,
                ..Debts::default()
            };
            for g in ctx.state.timer_gen.iter_mut() {
                *g += 1;
            }
        }
    }

    /// Gives every vCPU of a VM to its driver: registered, then its known request.
    fn hand_over(vm: u32, e: &mut VmEntry, now: Nanos, out: &mut Vec<Decision>) {
        for (&vcpu, st) in e.vcpus.iter_mut() {
            let mut ctx = VcpuCtx::new(VcpuKey::new(vm, vcpu), st, now, out);
            e.driver.on_event(&mut ctx, VcpuEvent::Registered);
            let r = ctx.state.request;
            if !r.is_empty() {
                e.driver.on_event(&mut ctx, VcpuEvent::Request(r));
            }
        }
    }
}
