//! The engine side of a run, as the bench reports it: the reference VMM's engine
//! ([`pvsched_vmm::engine::VmEngine`], built on `pvsched_host::runtime`) started for the VM,
//! and its typed status turned into the run's report.

use pvsched_guest::mailbox::{pv_status, Mailbox};
pub use pvsched_host::mechanism::helper_class;
use pvsched_host::mechanism::EngineClass;
use pvsched_host::pressure::QuietGate;
use pvsched_host::runtime::{Cost, Status};
use pvsched_host::stats::LatencyStats;
use pvsched_host::trace::TraceConfig;
use pvsched_policy::{BoostClass, DriverOptions};
use pvsched_proto::abi::feature;
use pvsched_proto::negotiate::{decode_answer, Negotiated};
use pvsched_vmm::engine::{EngineError, VmEngine};
use pvsched_vmm::RunningVm;
use serde::{Deserialize, Serialize};

/// Which driver runs the VM, with its options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyConfig {
    /// Driver name (`none`, `static`, `dynamic`, `deadline-aware`).
    pub driver: String,
    /// Driver options.
    pub opts: DriverOptions,
    /// Boost only while the host's CPUs are contended (`None`: always).
    pub quiet_gate: Option<QuietGate>,
    /// At most this many vCPUs boosted at once (`None`: no cap).
    pub max_boosted: Option<usize>,
    /// How the engine thread (and an external daemon's engine) outranks the boosted vCPUs.
    /// The run's controller always takes its deadline reservation (`experiment::run`).
    pub engine_class: EngineClass,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            driver: "none".into(),
            opts: DriverOptions::new(),
            quiet_gate: None,
            max_boosted: None,
            engine_class: EngineClass::default(),
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
    /// Time spent paying back boosted time below normal weight, ms.
    #[serde(default)]
    pub repaid_ms: f64,
    /// Of that, time the vCPU thread paused off the CPU (a repayment pause), ms.
    #[serde(default)]
    pub paused_ms: f64,
    /// Boosts that waited for the host-wide cap.
    #[serde(default)]
    pub capped: u64,
    /// Boosts ended to hand their slot of the host-wide cap to one that waited a quantum.
    #[serde(default)]
    pub cap_yields: u64,
    /// Time boosted by the cause that started each boost (static, request, interrupt,
    /// deadline), ms.
    #[serde(default)]
    pub by_cause_ms: [f64; 4],
    /// Throttles by the generic debt.
    #[serde(default)]
    pub generic_throttles: u64,
    /// Longest boost, ms.
    #[serde(default)]
    pub longest_ms: f64,
    /// Time deboosted (v3), ms.
    #[serde(default)]
    pub deboosted_ms: f64,
    /// Interrupt tickets issued and echoed (v3).
    #[serde(default)]
    pub tickets: [u64; 2],
}

/// Everything the engine reports about a run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostLoopReport {
    /// Driver name.
    pub driver: String,
    /// Protocol counts per vCPU.
    pub pv: Vec<HostCounts>,
    /// Policy counts per vCPU.
    pub policy: Vec<VcpuPolicyReport>,
    /// Boost decision → class applied, all vCPUs.
    pub boost_latency: LatencyStats,
    /// Errors applying decisions (the last few).
    pub errors: Vec<String>,
    /// Host events (tracepoints, VMM injections) for the VM's vCPUs.
    pub host_events: u64,
    /// Tracepoint records the kernel dropped.
    pub host_events_lost: u64,
    /// What the engine cost.
    pub cost: Cost,
}

impl HostLoopReport {
    /// The report of a runtime's final status.
    pub fn from_status(driver: String, status: &Status, pv: Vec<HostCounts>) -> Self {
        let vm = status.vms.first();
        HostLoopReport {
            driver,
            pv,
            policy: vm
                .map(|v| {
                    v.vcpus
                        .iter()
                        .map(|c| VcpuPolicyReport {
                            boosts: c.boosts,
                            unboosts: c.unboosts,
                            throttles: c.throttles,
                            refused: c.refused,
                            boosted_ms: c.boosted_ms,
                            repaid_ms: c.repaid_ms,
                            paused_ms: c.paused_ms,
                            capped: c.capped,
                            cap_yields: c.cap_yields,
                            by_cause_ms: c.boosted_by_cause_ms,
                            generic_throttles: c.generic_throttles,
                            longest_ms: c.longest_boost_ms,
                            deboosted_ms: c.deboosted_ms,
                            tickets: c.tickets,
                        })
                        .collect()
                })
                .unwrap_or_default(),
            boost_latency: vm.map(|v| v.boost_latency).unwrap_or_default(),
            errors: status.errors.clone(),
            host_events: vm.map_or(0, |v| v.host_events),
            host_events_lost: status.host_events_lost,
            cost: status.cost.clone(),
        }
    }
}

/// The engine of a run.
pub struct HostLoop {
    engine: VmEngine,
    driver: String,
}

impl HostLoop {
    /// Starts the engine for `vm` (before it runs) with `policy`, fed by its vCPU threads and
    /// VMM hooks and by the tracepoints in `trace`. Options and sources are checked here, so
    /// a bad policy fails before the guests run.
    pub fn start(
        vm: &mut RunningVm,
        policy: &PolicyConfig,
        trace: Option<TraceConfig>,
    ) -> Result<HostLoop, EngineError> {
        Ok(HostLoop {
            engine: VmEngine::start(
                vm,
                &policy.driver,
                &policy.opts,
                trace,
                pvsched_vmm::engine::VmEngineOptions {
                    quiet_gate: policy.quiet_gate,
                    max_boosted: policy.max_boosted,
                    engine_class: policy.engine_class,
                },
            )?,
            driver: policy.driver.clone(),
        })
    }

    /// Stops the engine (every boosted thread restored) and returns its report.
    pub fn stop(self) -> HostLoopReport {
        let (status, counts) = self.engine.stop();
        let pv = counts
            .into_iter()
            .map(|(doorbells, updates_seen, bad_slots)| HostCounts {
                doorbells,
                updates_seen,
                bad_slots,
            })
            .collect();
        HostLoopReport::from_status(self.driver, &status, pv)
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
        pv_status::ENABLED_V3 => "enabled (v3 page)",
        pv_status::V3_REFUSED => "v3 page refused",
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
        .find(|m| matches!(m.pv_status, pv_status::ENABLED | pv_status::ENABLED_V3))
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
            quiet_gate: None,
            max_boosted: None,
            engine_class: EngineClass::default(),
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
