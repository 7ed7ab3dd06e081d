//! The reference VMM's side of pvsched's engine runtime (`pvsched_host::runtime`): each vCPU
//! thread observes its own slot at the exits it takes anyway and applies its own boosts and
//! unboosts; the engine thread only handles what a vCPU cannot see (its timers while it is
//! preempted or halted, tracepoints, interrupts the VMM injects).
//!
//! The guest's doorbells are not waited on here: the vCPU thread reads its slot's `seq` (one
//! load) after every exit, which is sooner than a wake-up of another thread would be. Their
//! counts are still read for reports.

use crate::pvdevice::PvDevice;
use crate::vcpu::ExitHook;
use crate::vm::{rdtsc, InjectHook, RunningVm, TscClock};
use pvsched_host::clock::mono_ns;
use pvsched_host::pressure::QuietGate;
use pvsched_host::runtime::{
    EventSource, Runtime, RuntimeConfig, RuntimeError, RuntimeHandle, Status, VcpuHandle, VmParts,
};
use pvsched_host::trace::{TraceConfig, TraceError, TraceSource};
use pvsched_host::Publisher;
use pvsched_policy::{BoostState, DriverOptions, Event, Nanos, VcpuEvent, VcpuKey};
use pvsched_proto::v3::{AppliedState, GuestArea, PageError};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The VM id the testbed uses in its runtime.
pub const VM_ID: u32 = 0;

/// Errors of starting the engine for a VM.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The runtime refused the VM or a vCPU (bad policy, thread gone).
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The tracepoint sources could not be opened.
    #[error("cannot open the host event sources")]
    Trace(#[from] TraceError),
}

/// What the host saw of one vCPU's slot.
#[derive(Debug, Default)]
pub struct SlotCounts {
    /// Slot updates observed (a new `seq`).
    pub updates_seen: AtomicU64,
    /// Times the slot failed to decode.
    pub bad_slots: AtomicU64,
}

/// Publishes boost states into the guest's slots.
struct PvPublisher(Arc<PvDevice>);

impl Publisher for PvPublisher {
    fn publish(&mut self, key: VcpuKey, state: BoostState) -> Option<u32> {
        self.0.publish(key.vcpu as usize, state)
    }
    fn publish_v3(
        &mut self,
        key: VcpuKey,
        applied: AppliedState,
        ticket: u64,
    ) -> Option<Result<GuestArea, PageError>> {
        self.0.publish_v3(key.vcpu as usize, applied, ticket)
    }
}

/// Interrupts the VMM injects (irqfd), as events.
struct InjectSource(Arc<InjectHook>);

impl EventSource for InjectSource {
    fn name(&self) -> &str {
        "vmm-injections"
    }
    fn fd(&self) -> Option<RawFd> {
        Some(self.0.as_raw_fd())
    }
    fn drain(&mut self, _now: Nanos, out: &mut Vec<Event>) -> Option<Nanos> {
        for vcpu in self.0.take() {
            out.push(Event::new(
                VcpuKey::new(VM_ID, vcpu as u32),
                VcpuEvent::Interrupt,
            ));
        }
        None
    }
}

/// The exit hook of one vCPU thread.
struct PvExitHook {
    vcpu: usize,
    dev: Option<Arc<PvDevice>>,
    handle: VcpuHandle,
    tsc: TscClock,
    gpa: Option<u64>,
    seq: Option<u32>,
    /// The v3 page's guest words as last read.
    words: Option<[u64; 3]>,
    bad: bool,
    deadline: Option<u64>,
    republish: bool,
    events: Vec<VcpuEvent>,
    counts: Arc<SlotCounts>,
}

impl PvExitHook {
    /// Reads the slot if its `seq` moved (or it was just registered).
    fn observe(&mut self, dev: &PvDevice) {
        let gpa = dev.slot_gpa(self.vcpu);
        if gpa != self.gpa {
            if self.gpa.is_some() {
                // The slot or page went away or moved (unregistered, refused, renegotiated):
                // what it said no longer holds.
                self.events.push(VcpuEvent::SlotInvalid);
                self.bad = false;
            }
            self.gpa = gpa;
            self.seq = None;
            self.words = None;
            self.republish = gpa.is_some();
        }
        if dev.is_v3() {
            self.observe_v3(dev);
            return;
        }
        let Some(seq) = dev.seq(self.vcpu) else {
            return;
        };
        if self.seq == Some(seq) {
            return;
        }
        self.seq = Some(seq);
        match dev.snapshot(self.vcpu) {
            Ok(Some(s)) => {
                self.decoded(VcpuEvent::Request(s.reasons));
                if s.deadline_tsc != self.deadline {
                    self.deadline = s.deadline_tsc;
                    let at = s
                        .deadline_tsc
                        .map(|t| self.tsc.to_mono(t, rdtsc(), mono_ns()));
                    self.events.push(VcpuEvent::DeadlineHint(at));
                }
            }
            Ok(None) => {}
            Err(_) => self.undecodable(),
        }
    }
}

impl PvExitHook {
    /// The slot or page decoded into `ev`: counted and reported.
    fn decoded(&mut self, ev: VcpuEvent) {
        self.counts.updates_seen.fetch_add(1, Ordering::Relaxed);
        self.bad = false;
        self.events.push(ev);
    }

    /// The slot or page does not decode: reported once until it decodes again.
    fn undecodable(&mut self) {
        if !self.bad {
            self.bad = true;
            self.counts.bad_slots.fetch_add(1, Ordering::Relaxed);
            self.events.push(VcpuEvent::SlotInvalid);
        }
    }

    /// Reads the v3 page's three guest words (three loads) and reports the page when they
    /// changed.
    fn observe_v3(&mut self, dev: &PvDevice) {
        let Some(words) = dev.v3_words(self.vcpu) else {
            return;
        };
        if self.words == Some(words) {
            return;
        }
        self.words = Some(words);
        match dev.v3_area(self.vcpu) {
            Ok(Some(area)) => self.decoded(VcpuEvent::Intent(area)),
            Ok(None) => {}
            Err(_) => self.undecodable(),
        }
    }
}

impl ExitHook for PvExitHook {
    fn on_exit(&mut self) {
        let now = mono_ns();
        let due = self.handle.exit(now);
        if let Some(dev) = self.dev.clone() {
            self.observe(&dev);
        }
        if self.republish && self.handle.republish(now) {
            self.republish = false;
        }
        if self.events.is_empty() && !due {
            return;
        }
        if !self.handle.handle(now, &self.events) {
            // The engine is busy: read the slot afresh at the next exit.
            self.seq = None;
            self.words = None;
            self.deadline = None;
        }
        self.events.clear();
        // Paying back a boost by pausing (`repay=pause:`): leave the CPU for a while instead
        // of running the guest.
        self.handle.repay_pause();
    }
}

/// How a testbed VM's engine runs, beside its driver ([`VmEngine::start`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct VmEngineOptions {
    /// Boost only while the host's CPUs are contended (`None`: whenever the driver decides).
    pub quiet_gate: Option<QuietGate>,
    /// At most this many vCPUs boosted at once (`None`: no cap).
    pub max_boosted: Option<usize>,
    /// How the engine thread outranks the vCPUs it boosts.
    pub engine_class: pvsched_host::mechanism::EngineClass,
}

/// The engine of a testbed VM: the runtime, with every vCPU thread hooked.
pub struct VmEngine {
    runtime: Runtime,
    dev: Option<Arc<PvDevice>>,
    counts: Vec<Arc<SlotCounts>>,
}

impl VmEngine {
    /// Starts the runtime for `vm` (before [`RunningVm::go`]) with `driver` and `opts`, fed
    /// by the vCPU threads, by the VMM's injections and, with `trace`, by tracepoints; the
    /// rest as `with` says (quiet gate, host-wide cap, engine class).
    pub fn start(
        vm: &mut RunningVm,
        driver: &str,
        opts: &DriverOptions,
        trace: Option<TraceConfig>,
        with: VmEngineOptions,
    ) -> Result<VmEngine, EngineError> {
        let sources: Vec<Box<dyn EventSource>> = match trace {
            Some(cfg) => vec![Box::new(TraceSource::new(cfg)?)],
            None => Vec::new(),
        };
        let runtime = Runtime::start(RuntimeConfig {
            sources,
            quiet_gate: with.quiet_gate,
            max_boosted: with.max_boosted,
            engine_class: with.engine_class,
            ..RuntimeConfig::default()
        })?;
        let h = runtime.handle();
        let dev = vm.pv_device().cloned();
        // The hooks read the slots; nobody waits for the MSR event stream.
        drop(vm.take_pv_events());
        h.add_vm(
            VM_ID,
            driver,
            opts,
            VmParts {
                publisher: dev
                    .clone()
                    .map(|d| Box::new(PvPublisher(d)) as Box<dyn Publisher + Send>),
                sources: vec![Box::new(InjectSource(vm.inject_hook()))],
            },
        )?;
        let mut counts = Vec::new();
        for (i, tid) in vm.tids().into_iter().enumerate() {
            let handle = h.add_vcpu(VcpuKey::new(VM_ID, i as u32), tid, true)?;
            let c = Arc::new(SlotCounts::default());
            counts.push(c.clone());
            vm.set_exit_hook(
                i,
                Box::new(PvExitHook {
                    vcpu: i,
                    dev: dev.clone(),
                    handle,
                    tsc: vm.tsc_clock(),
                    gpa: None,
                    seq: None,
                    words: None,
                    bad: false,
                    deadline: None,
                    republish: false,
                    events: Vec::with_capacity(4),
                    counts: c,
                }),
            );
        }
        Ok(VmEngine {
            runtime,
            dev,
            counts,
        })
    }

    /// A handle for control requests and status.
    pub fn handle(&self) -> RuntimeHandle {
        self.runtime.handle()
    }

    /// Stops the runtime (every thread restored) and returns its final status and the slot
    /// counts per vCPU: (doorbells rung, updates seen, bad slots).
    pub fn stop(self) -> (Status, Vec<(u64, u64, u64)>) {
        let status = self.runtime.stop();
        let counts = self
            .counts
            .iter()
            .enumerate()
            .map(|(i, c)| {
                (
                    self.dev.as_ref().map_or(0, |d| d.take_doorbells(i)),
                    c.updates_seen.load(Ordering::Relaxed),
                    c.bad_slots.load(Ordering::Relaxed),
                )
            })
            .collect();
        (status, counts)
    }
}
