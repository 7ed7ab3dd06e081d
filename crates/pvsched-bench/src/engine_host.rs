//! The host side of a run: one thread (`pvsched-engine`) that waits for the guests'
//! doorbells and slot changes and for the engine's timers, feeds them to the policy engine,
//! and applies its decisions to the vCPU threads through the mechanism. It runs one
//! real-time priority above boosted vCPUs, and restores every thread it boosted when it stops.

use crate::hist::{LatencyHistogram, LatencySummary};
use crate::worker::Worker;
use pvsched_guest::mailbox::{pv_status, Mailbox};
use pvsched_host::clock::{mono_ns, DeadlineTimer};
pub use pvsched_host::mechanism::helper_class;
use pvsched_host::mechanism::{Mechanism, MechanismStats, Publisher};
use pvsched_host::trace::{TraceConfig, TraceError, TraceHit, TraceSource};
use pvsched_host::SchedGuard;
use pvsched_policy::{
    BoostClass, BoostState, Decision, DriverOptions, Engine, EngineError, Event, Nanos, VcpuEvent,
    VcpuKey,
};
use pvsched_proto::abi::feature;
use pvsched_proto::negotiate::{decode_answer, Negotiated};
use pvsched_vmm::pvdevice::{PvDevice, PvEvent, PvPoller};
use pvsched_vmm::vm::rdtsc;
use pvsched_vmm::{RunningVm, TscClock};
use serde::{Deserialize, Serialize};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// Longest wait of the engine thread when nothing happens.
const IDLE_WAIT_MS: i32 = 10;
/// Rounds of handshake follow-ups handled per wake-up (a guest that flips its request as fast
/// as it can must not keep the engine thread busy forever).
const MAX_ROUNDS: usize = 8;
const TOKEN_TIMER: u64 = 1;
const TOKEN_PV: u64 = 2;
const TOKEN_TRACE: u64 = 3;
const TOKEN_INJECT: u64 = 4;

/// Which driver runs the VM, with its options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyConfig {
    /// Driver name (`none`, `static`, `dynamic`, `deadline-aware`).
    pub driver: String,
    /// Driver options.
    pub opts: DriverOptions,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            driver: "none".into(),
            opts: DriverOptions::new(),
        }
    }
}

impl PolicyConfig {
    /// The class the driver boosts to (its `class` option, default `fifo:10`), or `None` for
    /// a driver that never boosts.
    pub fn boost_class(&self) -> Option<BoostClass> {
        (self.driver != "none").then(|| {
            self.opts
                .class("class", BoostClass::default())
                .unwrap_or_default()
        })
    }
}

/// What the host saw of one vCPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCounts {
    /// Doorbell rings received.
    pub doorbells: u64,
    /// Slot updates observed (polls that found a new `seq`).
    pub updates_seen: u64,
    /// Times the slot failed to decode.
    pub bad_slots: u64,
}

/// What the policy did to one vCPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VcpuPolicyReport {
    /// Boosts.
    pub boosts: u64,
    /// Unboosts.
    pub unboosts: u64,
    /// Boosts ended by a budget.
    pub throttles: u64,
    /// Requests refused while throttled.
    pub refused: u64,
    /// Time boosted, ms.
    pub boosted_ms: f64,
}

/// Everything the engine thread reports.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostLoopReport {
    /// Driver name.
    pub driver: String,
    /// Protocol counts per vCPU.
    pub pv: Vec<HostCounts>,
    /// Policy counts per vCPU.
    pub policy: Vec<VcpuPolicyReport>,
    /// Boost decision → class applied.
    pub boost_latency: LatencySummary,
    /// Mechanism errors (first few).
    pub errors: Vec<String>,
    /// Host events (tracepoint hits) mapped to vCPUs.
    pub host_events: u64,
    /// Tracepoint records the kernel dropped.
    pub host_events_lost: u64,
}

/// The engine thread of a run.
pub struct HostLoop {
    worker: Worker<HostLoopReport>,
}

/// Errors of starting the engine thread.
#[derive(Debug, thiserror::Error)]
pub enum HostLoopError {
    /// The policy configuration is invalid.
    #[error("invalid policy")]
    Policy(#[from] EngineError),
    /// The tracepoint sources could not be opened.
    #[error("cannot open the host event sources")]
    Trace(#[from] TraceError),
    /// The thread or its wait set could not be created.
    #[error("cannot start the engine thread")]
    Io(#[from] std::io::Error),
}

struct PvPublisher<'a>(Option<&'a PvDevice>);

impl Publisher for PvPublisher<'_> {
    fn publish(&mut self, key: VcpuKey, state: BoostState) -> Option<u32> {
        self.0?.publish(key.vcpu as usize, state)
    }
}

impl HostLoop {
    /// Starts the engine thread for `vm` (VM id 0) with `policy`, fed by the protocol (when
    /// the VM offers it) and by the tracepoints in `trace`. Options and sources are checked
    /// here, so a bad policy fails before the guests run.
    pub fn start(
        vm: &mut RunningVm,
        policy: &PolicyConfig,
        trace: Option<TraceConfig>,
    ) -> Result<HostLoop, HostLoopError> {
        let mut engine = Engine::default();
        engine.add_vm(0, &policy.driver, &policy.opts)?;
        let tids = vm.tids();
        let device = vm.pv_device().cloned();
        let poller = match (vm.take_pv_events(), device.as_ref()) {
            (Some(rx), Some(dev)) => Some(PvPoller::new(dev, rx)?),
            _ => None,
        };
        let epoll = Epoll::new()?;
        let timer = DeadlineTimer::new()?;
        epoll.ctl(
            ControlOperation::Add,
            timer.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_TIMER),
        )?;
        if let Some(p) = &poller {
            epoll.ctl(
                ControlOperation::Add,
                p.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_PV),
            )?;
        }
        let trace = match trace {
            Some(cfg) => Some(TraceSource::open(&tids, cfg)?),
            None => None,
        };
        for fd in trace.iter().flat_map(|t| t.fds()) {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, TOKEN_TRACE),
            )?;
        }
        let inject = vm.inject_hook();
        epoll.ctl(
            ControlOperation::Add,
            inject.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_INJECT),
        )?;
        let own_class = policy.boost_class().map(helper_class);
        let driver = policy.driver.clone();
        let tsc = vm.tsc_clock();
        let worker = Worker::spawn("pvsched-engine", move |stop| {
            let mut state = LoopState {
                engine,
                mech: Mechanism::new(),
                device,
                poller,
                tsc,
                trace,
                inject,
                hits: Vec::new(),
                host_events: 0,
                counts: vec![HostCounts::default(); tids.len()],
                deadlines: vec![None; tids.len()],
                pending: Vec::new(),
            };
            // Outrank the vCPU threads it boosts, for as long as it runs.
            let _class = own_class.and_then(|c| SchedGuard::apply(0, c).ok());
            state.run(&tids, &epoll, &timer, stop);
            state.report(driver)
        })?;
        Ok(HostLoop { worker })
    }

    /// Stops the thread (every boosted thread restored) and returns its report.
    pub fn stop(mut self) -> HostLoopReport {
        self.worker.stop().unwrap_or_default()
    }
}

struct LoopState {
    engine: Engine,
    mech: Mechanism,
    device: Option<Arc<PvDevice>>,
    poller: Option<PvPoller>,
    tsc: TscClock,
    trace: Option<TraceSource>,
    inject: Arc<pvsched_vmm::InjectHook>,
    hits: Vec<TraceHit>,
    host_events: u64,
    counts: Vec<HostCounts>,
    deadlines: Vec<Option<u64>>,
    pending: Vec<Event>,
}

impl LoopState {
    fn run(&mut self, tids: &[i32], epoll: &Epoll, timer: &DeadlineTimer, stop: &AtomicBool) {
        for (i, &tid) in tids.iter().enumerate() {
            let key = VcpuKey::new(0, i as u32);
            self.mech.register(key, tid);
            self.pending.push(Event::new(key, VcpuEvent::Registered));
        }
        let mut ready = [EpollEvent::default(); 16];
        let mut pv_events = Vec::new();
        let mut trigger = mono_ns();
        loop {
            self.process(trigger);
            // Slot changes the guest made while we decided (a deadline published in the same
            // critical section that asked for the boost) are picked up now, not at the next
            // wake-up.
            for _ in 0..2 {
                self.poll_slots(&mut pv_events);
                if self.pending.is_empty() {
                    break;
                }
                self.process(mono_ns());
            }
            if stop.load(Ordering::Acquire) {
                break;
            }
            timer.set(self.mech.next_timer());
            let n = epoll.wait(IDLE_WAIT_MS, &mut ready).unwrap_or(0);
            if ready[..n].iter().any(|e| e.data() == TOKEN_TIMER) {
                timer.drain();
            }
            let now = mono_ns();
            trigger = self.drain_trace().map_or(now, |t| t.min(now));
            if ready[..n].iter().any(|e| e.data() == TOKEN_INJECT) {
                for vcpu in self.inject.take() {
                    self.host_events += 1;
                    self.pending.push(Event::new(
                        VcpuKey::new(0, vcpu as u32),
                        VcpuEvent::Interrupt,
                    ));
                }
            }
            self.poll_slots(&mut pv_events);
            self.mech.due_timers(now, &mut self.pending);
        }
        let mut out = Vec::new();
        self.engine.shutdown(mono_ns(), &mut out);
        self.apply(&out, mono_ns(), &mut Vec::new());
        self.mech.restore_all();
    }

    /// Turns pending tracepoint hits into events; returns the earliest hit time.
    fn drain_trace(&mut self) -> Option<Nanos> {
        let t = self.trace.as_mut()?;
        t.drain(&mut self.hits);
        let first = self.hits.iter().map(|h| h.time_ns).min();
        for h in self.hits.drain(..) {
            self.host_events += 1;
            self.pending
                .push(Event::new(VcpuKey::new(0, h.vcpu as u32), h.event.into()));
        }
        first
    }

    /// Collects doorbells and slot changes without waiting.
    fn poll_slots(&mut self, buf: &mut Vec<PvEvent>) {
        if let (Some(p), Some(dev)) = (self.poller.as_mut(), self.device.as_deref()) {
            let _ = p.poll(dev, std::time::Duration::ZERO, buf);
        }
        for e in buf.drain(..) {
            self.on_pv_event(e);
        }
    }

    /// Runs the pending events through the engine and applies the decisions, with a bounded
    /// number of handshake rounds.
    fn process(&mut self, trigger: Nanos) {
        let mut decisions = Vec::new();
        for _ in 0..MAX_ROUNDS {
            if self.pending.is_empty() {
                return;
            }
            decisions.clear();
            let now = mono_ns();
            let events = std::mem::take(&mut self.pending);
            self.engine.handle_all(events, now, &mut decisions);
            let mut follow = Vec::new();
            self.apply(&decisions, trigger, &mut follow);
            self.pending = follow;
        }
    }

    fn apply(&mut self, decisions: &[Decision], trigger: Nanos, follow: &mut Vec<Event>) {
        let mut publisher = PvPublisher(self.device.as_deref());
        self.mech
            .apply(decisions, &mut publisher, trigger, &mono_ns, follow);
    }

    fn on_pv_event(&mut self, e: PvEvent) {
        let key = |v: usize| VcpuKey::new(0, v as u32);
        match e {
            PvEvent::Doorbell { vcpu, count } => {
                self.counts[vcpu].doorbells += count;
                let what = match self.device.as_ref().map(|d| d.snapshot(vcpu)) {
                    Some(Ok(Some(s))) => VcpuEvent::Doorbell(s.reasons),
                    Some(Err(_)) => VcpuEvent::SlotInvalid,
                    _ => return,
                };
                self.pending.push(Event::new(key(vcpu), what));
            }
            PvEvent::RequestChanged { vcpu, snapshot } => {
                self.counts[vcpu].updates_seen += 1;
                self.pending
                    .push(Event::new(key(vcpu), VcpuEvent::Request(snapshot.reasons)));
                if snapshot.deadline_tsc != self.deadlines[vcpu] {
                    self.deadlines[vcpu] = snapshot.deadline_tsc;
                    let at = snapshot
                        .deadline_tsc
                        .map(|t| self.tsc.to_mono(t, rdtsc(), mono_ns()));
                    self.pending
                        .push(Event::new(key(vcpu), VcpuEvent::DeadlineHint(at)));
                }
            }
            PvEvent::BadSlot { vcpu, .. } => {
                self.counts[vcpu].bad_slots += 1;
                self.pending
                    .push(Event::new(key(vcpu), VcpuEvent::SlotInvalid));
            }
            PvEvent::SlotRegistered { vcpu, .. } => {
                // The slot is new: tell it the state the engine already decided.
                let k = key(vcpu);
                let state = self
                    .engine
                    .vcpu(k)
                    .and_then(|s| s.published)
                    .unwrap_or(BoostState::Normal);
                let mut follow = Vec::new();
                self.apply(&[Decision::Publish(k, state)], mono_ns(), &mut follow);
                self.pending.extend(follow);
            }
            PvEvent::Negotiated { .. }
            | PvEvent::SlotUnregistered { .. }
            | PvEvent::SlotRejected { .. } => {}
        }
    }

    fn report(&self, driver: String) -> HostLoopReport {
        let now = mono_ns();
        let policy = self
            .engine
            .vcpus()
            .map(|(_, s)| VcpuPolicyReport {
                boosts: s.counters.boosts,
                unboosts: s.counters.unboosts,
                throttles: s.counters.throttles,
                refused: s.counters.refused,
                boosted_ms: s.boosted_ns(now) as f64 / 1e6,
            })
            .collect();
        let stats: &MechanismStats = self.mech.stats();
        let mut lat = LatencyHistogram::new();
        for &ns in &stats.boost_latency_ns {
            lat.record_ns(ns);
        }
        HostLoopReport {
            driver,
            pv: self.counts.clone(),
            policy,
            boost_latency: lat.summary(),
            errors: stats.errors.iter().take(5).cloned().collect(),
            host_events: self.host_events,
            host_events_lost: self
                .trace
                .as_ref()
                .map_or(0, |t| t.lost() + t.counts().throttled),
        }
    }
}

/// The protocol's results on one vCPU: the guest's own counters and the host's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PvVcpuReport {
    /// Guest outcome of discovery/negotiation: `enabled`, `no-common-version`, `not-found`,
    /// `not-tried`.
    pub status: String,
    /// Requests the guest made.
    pub requests: u64,
    /// Requests that needed no doorbell.
    pub quiet: u64,
    /// "Boost me" doorbells the guest rang.
    pub boost_rings: u64,
    /// "Unboost me" doorbells the guest rang.
    pub unboost_rings: u64,
    /// What the host saw.
    pub host: HostCounts,
}

/// The protocol's results for a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PvReport {
    /// Negotiated version (0: none).
    pub version: u16,
    /// Negotiated feature names.
    pub features: Vec<String>,
    /// Per-vCPU results.
    pub per_vcpu: Vec<PvVcpuReport>,
}

/// Names of feature bits.
pub fn feature_names(bits: u32) -> Vec<String> {
    [
        (feature::DEADLINE_HINT, "deadline-hint"),
        (feature::VCPU_HINT, "vcpu-hint"),
        (feature::UNBOOST_DOORBELL, "unboost-doorbell"),
    ]
    .iter()
    .filter(|(b, _)| bits & b != 0)
    .map(|(_, n)| n.to_string())
    .collect()
}

fn status_name(s: u64) -> &'static str {
    match s {
        pv_status::ENABLED => "enabled",
        pv_status::NO_VERSION => "no-common-version",
        pv_status::NOT_FOUND => "not-found",
        pv_status::NOT_TRIED => "not-tried",
        _ => "unknown",
    }
}

/// Builds the report from the guests' mailboxes and the host's counts.
pub fn report(mailboxes: &[Mailbox], host: &[HostCounts]) -> PvReport {
    let negotiated: Option<Negotiated> = mailboxes
        .iter()
        .find(|m| m.pv_status == pv_status::ENABLED)
        .and_then(|m| decode_answer(m.pv_answer));
    PvReport {
        version: negotiated.map_or(0, |n| n.version),
        features: feature_names(negotiated.map_or(0, |n| n.features)),
        per_vcpu: mailboxes
            .iter()
            .enumerate()
            .map(|(i, m)| PvVcpuReport {
                status: status_name(m.pv_status).to_string(),
                requests: m.pv_requests,
                quiet: m.pv_quiet,
                boost_rings: m.pv_boost_rings,
                unboost_rings: m.pv_unboost_rings,
                host: host.get(i).copied().unwrap_or_default(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_boost_class_comes_from_its_options() {
        let p = PolicyConfig {
            driver: "dynamic".into(),
            opts: DriverOptions::parse(["class=rr:20"]).unwrap(),
        };
        assert_eq!(p.boost_class(), Some(BoostClass::Rr(20)));
        assert_eq!(PolicyConfig::default().boost_class(), None);
    }

    #[test]
    fn features_are_named() {
        assert_eq!(feature_names(feature::ALL_V1).len(), 3);
        assert_eq!(feature_names(feature::VCPU_HINT), ["vcpu-hint"]);
        assert!(feature_names(0).is_empty());
    }

    #[test]
    fn report_takes_the_negotiated_answer_and_counts() {
        let m = Mailbox {
            pv_status: pv_status::ENABLED,
            pv_answer: 1 | ((feature::DEADLINE_HINT as u64) << 32),
            pv_requests: 10,
            pv_boost_rings: 4,
            ..Default::default()
        };
        let off = Mailbox::default();
        let host = [HostCounts {
            doorbells: 4,
            ..Default::default()
        }];
        let r = report(&[m, off], &host);
        assert_eq!(r.version, 1);
        assert_eq!(r.features, ["deadline-hint"]);
        assert_eq!(r.per_vcpu[0].host.doorbells, 4);
        assert_eq!(r.per_vcpu[1].status, "not-tried");
        assert_eq!(r.per_vcpu[1].host, HostCounts::default());
    }
}
