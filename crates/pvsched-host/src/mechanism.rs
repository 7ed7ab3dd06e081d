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

/// The class a helper thread (an engine or controller) needs to outrank vCPU threads boosted
/// to `c`: one FIFO priority above (FIFO 99 above `SCHED_DEADLINE`, which no FIFO outranks).
pub fn helper_class(c: BoostClass) -> SchedClass {
    match c {
        // Fair classes: the engine at FIFO 1 already runs before them.
        BoostClass::Slice(_) | BoostClass::Nice(_) | BoostClass::Idle => SchedClass::Fifo(1),
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
