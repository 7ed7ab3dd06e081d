//! How decisions map onto the host: the scheduling class that implements a boost class, the
//! class a helper thread needs to outrank boosted vCPUs, and where boost states are published
//! (the guest side of the protocol). The runtime (`crate::runtime`) applies them.

use crate::sched::SchedClass;
use pvsched_policy::{BoostClass, BoostState, VcpuKey};
use pvsched_proto::v3::{AppliedState, GuestArea, PageError};

/// Where boost states are published: the guest side of the protocol, if there is one.
pub trait Publisher {
    /// Publishes `state` for `key` and returns the guest's request read after a full fence,
    /// or `None` when the vCPU has no slot.
    fn publish(&mut self, key: VcpuKey, state: BoostState) -> Option<u32>;

    /// Publishes the host's feedback in the v3 page of `key` (applied state, interrupt
    /// ticket) and returns the guest area read after a full fence, decoded; `None` when the
    /// vCPU has no v3 page (the default).
    fn publish_v3(
        &mut self,
        _key: VcpuKey,
        _applied: AppliedState,
        _ticket: u64,
    ) -> Option<Result<GuestArea, PageError>> {
        None
    }
}

/// A publisher for VMs without the protocol.
pub struct NoPublisher;

impl Publisher for NoPublisher {
    fn publish(&mut self, _: VcpuKey, _: BoostState) -> Option<u32> {
        None
    }
}

/// The scheduling class that implements a boost class.
pub fn sched_class(c: BoostClass) -> SchedClass {
    match c {
        BoostClass::Slice(ns) => SchedClass::Slice(ns),
        BoostClass::Nice(n) => SchedClass::Nice(n),
        BoostClass::Idle => SchedClass::Idle,
        // Where the thread cannot be paused (the runtime applies its own attributes to a
        // thread that can).
        BoostClass::Pause(_) => SchedClass::Nice(pvsched_policy::PAUSE_FALLBACK_NICE),
        BoostClass::Fifo(p) => SchedClass::Fifo(p),
        BoostClass::Rr(p) => SchedClass::Rr(p),
        BoostClass::Deadline {
            runtime_ns,
            deadline_ns,
            period_ns,
        } => SchedClass::Deadline {
            runtime: runtime_ns,
            deadline: deadline_ns,
            period: period_ns,
        },
    }
}

/// How the engine thread outranks the vCPU threads it boosts. Measured side by side at 500 µs
/// on the 2-CPU machine with the bench's controller on its deadline reservation (README, "Where
/// the engine thread runs", run c): no gain from `Deadline` (same placement and average
/// latency, the host load a little lower), so `Fifo` is the default. The bench's controller
/// always takes the reservation: as a FIFO thread it got boosted vCPUs pushed onto the
/// sibling's CPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineClass {
    /// One FIFO priority above the boost class ([`helper_class`]): the default.
    #[default]
    Fifo,
    /// A deadline reservation ([`helper_deadline`]) where the kernel admits it, else FIFO.
    Deadline,
}

impl std::str::FromStr for EngineClass {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "deadline" => Ok(EngineClass::Deadline),
            "fifo" => Ok(EngineClass::Fifo),
            other => Err(format!("engine class `{other}`: expected deadline or fifo")),
        }
    }
}

impl std::fmt::Display for EngineClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EngineClass::Deadline => "deadline",
            EngineClass::Fifo => "fifo",
        })
    }
}

/// Puts helper thread `tid` above vCPU threads boosted to `fifo_above` (a FIFO class from
/// [`helper_class`]) the way `how` says, recording its attributes to restore; returns the
/// guard, the attributes it got and, when a deadline reservation was refused for the FIFO
/// fallback, the kernel's refusal.
pub fn outrank_vcpus(
    tid: i32,
    how: EngineClass,
    fifo_above: SchedClass,
) -> Result<
    (
        crate::sched::SchedGuard,
        crate::sched::SchedAttr,
        Option<crate::sched::Error>,
    ),
    crate::sched::Error,
> {
    match how {
        EngineClass::Deadline => {
            crate::sched::SchedGuard::apply_either(tid, &helper_deadline(), fifo_above)
        }
        EngineClass::Fifo => {
            crate::sched::SchedGuard::apply(tid, fifo_above).map(|g| (g, fifo_above.attr(), None))
        }
    }
}

/// Runtime of the deadline reservation helper threads take ([`helper_deadline`]), ns.
pub const HELPER_RUNTIME_NS: u64 = 300_000;
/// Period (and deadline) of that reservation, ns.
pub const HELPER_PERIOD_NS: u64 = 1_000_000;

/// What a helper thread runs at when the kernel admits it (the bench's controller always, an
/// engine thread with [`EngineClass::Deadline`]): a `SCHED_DEADLINE` reservation of
/// [`HELPER_RUNTIME_NS`] every [`HELPER_PERIOD_NS`], reclaiming unused bandwidth beyond it. A deadline thread runs before every FIFO/RR thread,
/// so it outranks any boost, and it takes no part in real-time balancing: when it wakes on a
/// CPU where a boosted vCPU runs, that vCPU waits for it there. A FIFO helper instead makes
/// that CPU "overloaded" with two real-time threads, and the kernel pushes the vCPU to the
/// other CPU, often onto its sibling vCPU (traced in an 8 s `deadline-aware` run: 1 130 of
/// 1 154 vCPU migrations were real-time pushes and pulls, 609 of them started by the FIFO
/// engine and controller threads; docs/policy.md, "Helper threads on a deadline reservation").
/// Where the kernel refuses
/// it (admission control full, a thread not allowed on every CPU), [`helper_class`] is the
/// fallback. What that changes for the guest and the host: [`EngineClass`].
pub fn helper_deadline() -> crate::sched::SchedAttr {
    crate::sched::SchedAttr::reclaiming_deadline(HELPER_RUNTIME_NS, HELPER_PERIOD_NS)
}

/// The FIFO class a helper thread (an engine or controller) needs to outrank vCPU threads
/// boosted to `c` when it cannot have [`helper_deadline`]: one FIFO priority above (FIFO 99
/// above `SCHED_DEADLINE`, which no FIFO outranks).
pub fn helper_class(c: BoostClass) -> SchedClass {
    match c {
        // Fair classes: the engine at FIFO 1 already runs before them.
        BoostClass::Slice(_) | BoostClass::Nice(_) | BoostClass::Idle | BoostClass::Pause(_) => {
            SchedClass::Fifo(1)
        }
        BoostClass::Fifo(p) | BoostClass::Rr(p) => SchedClass::Fifo((p + 1).min(99)),
        BoostClass::Deadline { .. } => SchedClass::Fifo(99),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers_outrank_the_boost_class() {
        assert_eq!(helper_class(BoostClass::Fifo(10)), SchedClass::Fifo(11));
        assert_eq!(helper_class(BoostClass::Rr(99)), SchedClass::Fifo(99));
        let d = BoostClass::Deadline {
            runtime_ns: 1_000_000,
            deadline_ns: 2_000_000,
            period_ns: 2_000_000,
        };
        assert_eq!(helper_class(d), SchedClass::Fifo(99));
        assert_eq!(sched_class(BoostClass::Rr(3)), SchedClass::Rr(3));
        assert_eq!(
            NoPublisher.publish(VcpuKey::new(0, 0), BoostState::Normal),
            None
        );
    }
}
