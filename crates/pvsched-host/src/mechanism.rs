//! Applies the policy engine's decisions to real threads: boost and unboost vCPU threads with
//! `sched_setattr`, publish boost states to the guests, keep the engine's timers. Holds no
//! policy; restores every thread it boosted on unboost, on [`Mechanism::restore_all`] and on
//! drop (also during unwinding).

use crate::sched::{self, SchedClass, SchedGuard};
use pvsched_policy::{
    BoostClass, BoostState, Decision, Event, Nanos, TimerKind, VcpuEvent, VcpuKey,
};
use pvsched_proto::Reasons;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

/// Where boost states are published: the guest side of the protocol, if there is one.
pub trait Publisher {
    /// Publishes `state` for `key` and returns the guest's request read after a full fence,
    /// or `None` when the vCPU has no slot.
    fn publish(&mut self, key: VcpuKey, state: BoostState) -> Option<u32>;
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
        BoostClass::Fifo(p) | BoostClass::Rr(p) => SchedClass::Fifo((p + 1).min(99)),
        BoostClass::Deadline { .. } => SchedClass::Fifo(99),
    }
}

/// Counts and latencies of what the mechanism applied.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MechanismStats {
    /// Boosts applied.
    pub boosts: u64,
    /// Unboosts applied.
    pub unboosts: u64,
    /// Boost decision → class applied, ns, one entry per boost (trigger time to
    /// `sched_setattr` return).
    pub boost_latency_ns: Vec<u64>,
    /// Decisions that failed (thread gone, not permitted, ...), with the error text.
    pub errors: Vec<String>,
}

/// The mechanism of one engine host.
#[derive(Default)]
pub struct Mechanism {
    threads: BTreeMap<VcpuKey, i32>,
    boosted: BTreeMap<VcpuKey, SchedGuard>,
    timers: BinaryHeap<Reverse<(Nanos, VcpuKey, TimerKind, u64)>>,
    stats: MechanismStats,
}

impl Mechanism {
    /// A mechanism with no threads.
    pub fn new() -> Self {
        Self::default()
    }

    /// Associates vCPU `key` with thread `tid`.
    pub fn register(&mut self, key: VcpuKey, tid: i32) {
        self.threads.insert(key, tid);
    }

    /// Forgets vCPU `key`, restoring its thread if boosted.
    pub fn unregister(&mut self, key: VcpuKey) {
        self.unboost(key);
        self.threads.remove(&key);
    }

    /// The thread of `key`.
    pub fn tid(&self, key: VcpuKey) -> Option<i32> {
        self.threads.get(&key).copied()
    }

    /// True while `key`'s thread is boosted by this mechanism.
    pub fn is_boosted(&self, key: VcpuKey) -> bool {
        self.boosted.contains_key(&key)
    }

    /// What was applied so far.
    pub fn stats(&self) -> &MechanismStats {
        &self.stats
    }

    /// Applies `decisions` triggered by something observed at `trigger` (for the latency of
    /// boosts), using `now` to read the clock after each `sched_setattr`. Events the
    /// handshake produces (the request re-read after a publish) go to `followups`.
    pub fn apply(
        &mut self,
        decisions: &[Decision],
        publisher: &mut dyn Publisher,
        trigger: Nanos,
        now: &dyn Fn() -> Nanos,
        followups: &mut Vec<Event>,
    ) {
        for d in decisions {
            match *d {
                Decision::Boost(key, class) => self.boost(key, class, trigger, now),
                Decision::Unboost(key) => self.unboost(key),
                Decision::Publish(key, state) => {
                    let Some(request) = publisher.publish(key, state) else {
                        continue;
                    };
                    if matches!(state, BoostState::Normal | BoostState::Boosted) {
                        let what = match Reasons::from_bits(request) {
                            Some(r) => VcpuEvent::Request(r),
                            None => VcpuEvent::SlotInvalid,
                        };
                        followups.push(Event::new(key, what));
                    }
                }
                Decision::ArmTimer { key, at, kind, gen } => {
                    self.timers.push(Reverse((at, key, kind, gen)));
                }
            }
        }
    }

    fn boost(&mut self, key: VcpuKey, class: BoostClass, trigger: Nanos, now: &dyn Fn() -> Nanos) {
        let Some(&tid) = self.threads.get(&key) else {
            self.stats
                .errors
                .push(format!("{key}: boost of a vCPU without a thread"));
            return;
        };
        let class = sched_class(class);
        let result = match self.boosted.get(&key) {
            // Already boosted (class change): keep the original attributes recorded.
            Some(_) => sched::set(tid, &class.attr()),
            None => SchedGuard::apply(tid, class).map(|g| {
                self.boosted.insert(key, g);
            }),
        };
        match result {
            Ok(()) => {
                self.stats.boosts += 1;
                self.stats
                    .boost_latency_ns
                    .push(now().saturating_sub(trigger));
            }
            Err(e) => self.stats.errors.push(format!("{key}: {e}")),
        }
    }

    fn unboost(&mut self, key: VcpuKey) {
        if let Some(g) = self.boosted.remove(&key) {
            match g.restore() {
                Ok(()) => self.stats.unboosts += 1,
                Err(e) => self.stats.errors.push(format!("{key}: {e}")),
            }
        }
    }

    /// When the next timer is due.
    pub fn next_timer(&self) -> Option<Nanos> {
        self.timers.peek().map(|Reverse((at, ..))| *at)
    }

    /// Moves the timers due at `now` into `out` as events.
    pub fn due_timers(&mut self, now: Nanos, out: &mut Vec<Event>) {
        while let Some(Reverse((at, key, kind, gen))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            out.push(Event::new(key, VcpuEvent::Timer(kind, gen)));
        }
    }

    /// Restores every boosted thread now.
    pub fn restore_all(&mut self) {
        let keys: Vec<VcpuKey> = self.boosted.keys().copied().collect();
        for k in keys {
            self.unboost(k);
        }
    }
}

impl Drop for Mechanism {
    fn drop(&mut self) {
        self.restore_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pvsched_proto::abi::Reason;

    struct Slot(u32, Vec<BoostState>);
    impl Publisher for Slot {
        fn publish(&mut self, _: VcpuKey, state: BoostState) -> Option<u32> {
            self.1.push(state);
            Some(self.0)
        }
    }

    fn zero() -> Nanos {
        0
    }

    #[test]
    fn publish_feeds_the_handshake_back() {
        let mut m = Mechanism::new();
        let k = VcpuKey::new(0, 0);
        let mut slot = Slot(Reason::Irq.bit(), Vec::new());
        let mut follow = Vec::new();
        m.apply(
            &[
                Decision::Publish(k, BoostState::Normal),
                Decision::Publish(k, BoostState::Throttled),
            ],
            &mut slot,
            0,
            &zero,
            &mut follow,
        );
        assert_eq!(slot.1, [BoostState::Normal, BoostState::Throttled]);
        assert_eq!(
            follow,
            [Event::new(
                k,
                VcpuEvent::Request(Reasons::NONE.with(Reason::Irq))
            )],
            "re-read only after Normal/Boosted"
        );
        slot.0 = 0xffff_0000;
        follow.clear();
        m.apply(
            &[Decision::Publish(k, BoostState::Boosted)],
            &mut slot,
            0,
            &zero,
            &mut follow,
        );
        assert_eq!(follow, [Event::new(k, VcpuEvent::SlotInvalid)]);
    }

    #[test]
    fn helpers_outrank_the_boost_class() {
        assert_eq!(helper_class(BoostClass::Fifo(10)), SchedClass::Fifo(11));
        assert_eq!(helper_class(BoostClass::Rr(99)), SchedClass::Fifo(99));
    }

    #[test]
    fn timers_come_due_in_order() {
        let mut m = Mechanism::new();
        let k = VcpuKey::new(0, 1);
        let arm = |at, gen| Decision::ArmTimer {
            key: k,
            at,
            kind: TimerKind::Budget,
            gen,
        };
        m.apply(
            &[arm(30, 2), arm(10, 1)],
            &mut NoPublisher,
            0,
            &zero,
            &mut Vec::new(),
        );
        assert_eq!(m.next_timer(), Some(10));
        let mut out = Vec::new();
        m.due_timers(20, &mut out);
        assert_eq!(out, [Event::new(k, VcpuEvent::Timer(TimerKind::Budget, 1))]);
        assert_eq!(m.next_timer(), Some(30));
    }

    #[test]
    fn boost_without_thread_is_an_error_not_a_panic() {
        let mut m = Mechanism::new();
        m.apply(
            &[Decision::Boost(VcpuKey::new(3, 3), BoostClass::Fifo(5))],
            &mut NoPublisher,
            0,
            &zero,
            &mut Vec::new(),
        );
        assert_eq!(m.stats().errors.len(), 1);
    }

    /// Boosts a real thread and checks it is restored on unboost and on drop. Needs the
    /// privilege to set SCHED_FIFO.
    #[test]
    fn boosts_and_restores_a_real_thread() {
        let parked = pvsched_testutil::ParkedThread::spawn();
        let tid = parked.tid();
        let before = sched::get(tid).unwrap();
        let k = VcpuKey::new(0, 0);
        let mut m = Mechanism::new();
        m.register(k, tid);
        m.apply(
            &[Decision::Boost(k, BoostClass::Fifo(3))],
            &mut NoPublisher,
            0,
            &zero,
            &mut Vec::new(),
        );
        if !m.stats().errors.is_empty() {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED boosts_and_restores_a_real_thread: {}",
                m.stats().errors[0]
            );
        } else {
            assert_eq!(sched::get(tid).unwrap().priority, 3);
            m.apply(
                &[Decision::Unboost(k)],
                &mut NoPublisher,
                0,
                &zero,
                &mut Vec::new(),
            );
            assert_eq!(sched::get(tid).unwrap(), before);
            m.apply(
                &[Decision::Boost(k, BoostClass::Rr(4))],
                &mut NoPublisher,
                0,
                &zero,
                &mut Vec::new(),
            );
            assert_eq!(sched::get(tid).unwrap().policy, libc::SCHED_RR as u32);
            drop(m);
            assert_eq!(sched::get(tid).unwrap(), before, "restored on drop");
        }
        drop(parked);
    }
}
