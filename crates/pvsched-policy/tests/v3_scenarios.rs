//! `v3-default` with fake time: a guest that publishes a pvsched v3 page (task intent,
//! critical sections, ticket echoes) and what class its vCPU thread is put in, what the host
//! publishes back, how the debts throttle, and that every deboost is undone.

use pvsched_policy::{
    BoostClass, Decision, DriverOptions, Engine, Event, Nanos, VcpuEvent, VcpuKey,
};
use pvsched_proto::v3::{
    applied_flag, cs, hint, AppliedState, BoostKind, GuestArea, TaskDesc, TaskIntent,
};
use std::cmp::Reverse;
use std::collections::BinaryHeap;

const US: Nanos = 1_000;
const MS: Nanos = 1_000_000;
const V: VcpuKey = VcpuKey::new(0, 0);

/// The vCPU thread's class as the host would see it: `None` = its original attributes.
struct Sim {
    engine: Engine,
    now: Nanos,
    timers: BinaryHeap<Reverse<(Nanos, VcpuKey, pvsched_policy::TimerKind, u64)>>,
    page: GuestArea,
    class: Option<BoostClass>,
    applied: AppliedState,
    ticket: u64,
    /// The guest echoes tickets by itself (as its interrupt handler would).
    echo: bool,
    log: Vec<Decision>,
}

impl Sim {
    fn new(opts: &[&str]) -> Self {
        let mut engine = Engine::default();
        engine
            .add_vm(
                0,
                "v3-default",
                &DriverOptions::parse(opts.iter().copied()).unwrap(),
            )
            .unwrap();
        let mut s = Sim {
            engine,
            now: 0,
            timers: BinaryHeap::new(),
            page: GuestArea::default(),
            class: None,
            applied: AppliedState::default(),
            ticket: 0,
            echo: false,
            log: Vec::new(),
        };
        s.event(VcpuEvent::Registered);
        s.event(VcpuEvent::Intent(s.page));
        s
    }

    fn apply(&mut self, ds: Vec<Decision>) {
        let mut follow = Vec::new();
        for d in ds {
            self.log.push(d);
            match d {
                Decision::Boost(_, c) => self.class = Some(c),
                Decision::Unboost(_) | Decision::Repay(_, None) => self.class = None,
                Decision::Repay(_, Some(c)) => {
                    assert!(
                        !matches!(self.class, Some(BoostClass::Fifo(_)))
                            || self.applied.boost == BoostKind::Baseline,
                        "deboost of a boosted thread"
                    );
                    self.class = Some(c)
                }
                // Before its first page read the engine does not know the vCPU speaks v3.
                Decision::Publish(..) => assert!(
                    self.engine.vcpu(V).is_none_or(|st| st.v3.is_none()),
                    "a v3 vCPU got a v1 publish: {d:?}"
                ),
                Decision::PublishV3 {
                    applied,
                    ticket,
                    reread,
                    ..
                } => {
                    self.applied = applied;
                    self.ticket = ticket;
                    if self.echo && ticket != 0 && self.page.ack != ticket {
                        self.page.ack = ticket;
                    }
                    if reread {
                        follow.push(VcpuEvent::Intent(self.page));
                    }
                }
                Decision::ArmTimer { key, at, kind, gen } => {
                    self.timers.push(Reverse((at, key, kind, gen)))
                }
            }
        }
        for ev in follow {
            self.event(ev);
        }
    }

    fn event(&mut self, what: VcpuEvent) {
        let mut out = Vec::new();
        self.engine.handle(Event::new(V, what), self.now, &mut out);
        self.apply(out);
    }

    fn advance(&mut self, to: Nanos) {
        while let Some(&Reverse((at, key, kind, gen))) = self.timers.peek() {
            if at > to {
                break;
            }
            self.timers.pop();
            self.now = self.now.max(at);
            let mut out = Vec::new();
            self.engine.handle(
                Event::new(key, VcpuEvent::Timer(kind, gen)),
                self.now,
                &mut out,
            );
            self.apply(out);
        }
        self.now = to;
    }

    /// The guest publishes and rings its doorbell.
    fn guest(&mut self, current: TaskDesc, pending: Option<TaskDesc>, cs_bits: u64) {
        self.page.intent = TaskIntent {
            current,
            pending,
            idle: current == TaskDesc::idle(),
        };
        self.page.cs = cs_bits;
        self.event(VcpuEvent::Intent(self.page));
    }
}

#[test]
fn a_guest_rt_task_boosts_to_its_capped_priority_and_normal_work_restores() {
    let mut s = Sim::new(&[]);
    assert_eq!(s.class, None);
    s.guest(TaskDesc::fifo(80), None, 0);
    assert_eq!(
        s.class,
        Some(BoostClass::Fifo(50)),
        "FIFO 80 capped at guest_rt_cap 50"
    );
    assert_eq!(s.applied.boost, BoostKind::Task);
    assert_eq!(s.applied.hints, hint::KICK_DEBOOST);
    s.guest(TaskDesc::fifo(10), None, 0);
    assert_eq!(
        s.class,
        Some(BoostClass::Fifo(10)),
        "the class follows the task"
    );
    s.guest(TaskDesc::deadline(), None, 0);
    assert_eq!(
        s.class,
        Some(BoostClass::Fifo(50)),
        "guest DEADLINE: FIFO deadline_rt_prio"
    );
    s.guest(TaskDesc::normal(0), None, 0);
    assert_eq!(s.class, None);
    assert_eq!(s.applied, AppliedState::default());
    // A pending RT task boosts an otherwise normal vCPU.
    s.guest(TaskDesc::normal(0), Some(TaskDesc::fifo(5)), 0);
    assert_eq!(s.class, Some(BoostClass::Fifo(5)));
    // A negative nice is a (fair) boost; a positive one a deboost.
    s.guest(TaskDesc::normal(-5), None, 0);
    assert_eq!(s.class, Some(BoostClass::Nice(-5)));
    s.guest(TaskDesc::batch(10), None, 0);
    assert_eq!(s.class, Some(BoostClass::Nice(10)));
    assert_eq!(s.applied.boost, BoostKind::Baseline);
}

#[test]
fn an_idle_guest_is_deboosted_and_restored_exactly() {
    let mut s = Sim::new(&[]);
    s.guest(TaskDesc::idle(), None, 0);
    assert_eq!(s.class, Some(BoostClass::Idle));
    assert!(s.log.contains(&Decision::Repay(V, Some(BoostClass::Idle))));
    s.guest(TaskDesc::fifo(20), None, 0);
    assert_eq!(
        s.class,
        Some(BoostClass::Fifo(20)),
        "RT work lifts it straight to FIFO"
    );
    s.guest(TaskDesc::idle(), None, 0);
    assert_eq!(s.class, Some(BoostClass::Idle));
    s.guest(TaskDesc::normal(0), None, 0);
    assert_eq!(s.class, None, "back to the original attributes");
    s.guest(TaskDesc::idle(), None, 0);
    s.advance(5 * MS);
    s.event(VcpuEvent::Unregistered);
    assert_eq!(s.class, None, "unregistering restores a deboosted thread");
    let st = s.engine.vcpu(V);
    assert!(st.is_none());
    // With deboost off, idle and low-priority work keep the baseline.
    let mut s = Sim::new(&["deboost=off"]);
    s.guest(TaskDesc::idle(), None, 0);
    assert_eq!(s.class, None);
    s.guest(TaskDesc::batch(19), None, 0);
    assert_eq!(s.class, None);
    s.guest(TaskDesc::fifo(7), None, 0);
    assert_eq!(s.class, Some(BoostClass::Fifo(7)));
}

#[test]
fn a_critical_section_boosts_above_tasks_and_hands_back_to_the_task() {
    let mut s = Sim::new(&[]);
    s.guest(TaskDesc::normal(0), None, cs::SOFTIRQ);
    assert_eq!(s.class, Some(BoostClass::Fifo(60)));
    assert_eq!(s.applied.boost, BoostKind::Cs);
    s.guest(TaskDesc::fifo(10), None, cs::SOFTIRQ);
    assert_eq!(s.class, Some(BoostClass::Fifo(60)), "CS outranks the task");
    s.guest(TaskDesc::fifo(10), None, 0);
    assert_eq!(s.class, Some(BoostClass::Fifo(10)));
    assert_eq!(s.applied.boost, BoostKind::Task);
    s.guest(TaskDesc::idle(), None, 0);
    assert_eq!(s.class, Some(BoostClass::Idle));
}

#[test]
fn an_interrupt_ticket_echoed_ends_the_host_hold() {
    let mut s = Sim::new(&["irq_hold=500us"]);
    s.event(VcpuEvent::Interrupt);
    assert_eq!(s.class, Some(BoostClass::Fifo(60)));
    assert_eq!(s.applied.boost, BoostKind::Cs);
    assert_eq!(s.ticket, 1);
    // The guest takes the interrupt: hardirq set, then the echo.
    s.now += 20 * US;
    s.page.cs = cs::HARDIRQ;
    s.page.ack = 1;
    s.event(VcpuEvent::Intent(s.page));
    assert_eq!(
        s.class,
        Some(BoostClass::Fifo(60)),
        "its handler holds the boost"
    );
    s.now += 30 * US;
    s.guest(TaskDesc::normal(0), None, 0);
    assert_eq!(
        s.class, None,
        "unboosted at the handler's end, 50 us in, not after 500 us"
    );
    let st = s.engine.vcpu(V).unwrap();
    assert_eq!(st.counters.tickets, [1, 1]);
    assert!(st.counters.boosted_ns <= 50 * US);

    // Without an echo, the hold runs its course.
    s.now += MS;
    s.event(VcpuEvent::Interrupt);
    let t2 = s.ticket;
    assert!(t2 > 1, "a new ticket (increasing, seeded from the clock)");
    s.advance(s.now + 100 * US);
    assert_eq!(s.class, Some(BoostClass::Fifo(60)));
    s.advance(s.now + 500 * US);
    assert_eq!(s.class, None);
    // A stale echo (the previous ticket) does not end a new hold.
    s.now += MS;
    s.event(VcpuEvent::Interrupt);
    s.page.ack = t2;
    s.now += 10 * US;
    s.event(VcpuEvent::Intent(s.page));
    assert!(s.ticket > t2);
    assert_eq!(
        s.class,
        Some(BoostClass::Fifo(60)),
        "the previous ticket does not acknowledge the new one"
    );
}

#[test]
fn debts_throttle_a_guest_that_asks_too_much_and_flag_it() {
    let mut s = Sim::new(&[]);
    // A critical section that never ends: the 2 ms CS limit throttles it.
    s.guest(TaskDesc::normal(0), None, cs::PREEMPT_DISABLED);
    s.advance(3 * MS);
    assert_eq!(s.class, None);
    assert_ne!(s.applied.flags & applied_flag::CS_THROTTLED, 0);
    // The task shows through a CS throttle.
    s.guest(TaskDesc::fifo(30), None, cs::PREEMPT_DISABLED);
    assert_eq!(s.class, Some(BoostClass::Fifo(30)));
    // An RT task that never ends: the 500 ms generic limit throttles it; a deboost request
    // still works while throttled, a boost does not.
    s.guest(TaskDesc::fifo(30), None, 0);
    s.advance(600 * MS);
    assert_eq!(s.class, None, "throttled by the generic debt");
    assert_ne!(s.applied.flags & applied_flag::TOTAL_THROTTLED, 0);
    let st = s.engine.vcpu(V).unwrap();
    assert!(st.counters.generic_throttles >= 1);
    assert!(st.boosted_ns(s.now) <= 505 * MS, "{}", st.boosted_ns(s.now));
    s.guest(TaskDesc::idle(), None, 0);
    assert_eq!(
        s.class,
        Some(BoostClass::Idle),
        "a deboost survives the throttle"
    );
    s.guest(TaskDesc::fifo(30), None, 0);
    assert_eq!(s.class, None, "clamped to the baseline");
    // Paid back 1:1, it may boost again.
    s.advance(s.now + 600 * MS);
    s.guest(TaskDesc::fifo(30), None, 0);
    assert_eq!(s.class, Some(BoostClass::Fifo(30)));
}

#[test]
fn options_are_checked() {
    let mut e = Engine::default();
    for bad in [
        &["cs_rt_prio=99"][..],
        &["cs_rt_prio=40"],
        &["guest_rt_cap=0"],
        &["baseline_nice=20"],
        &["lead=100us"],
        &["repay=nice:5"],
        &["deboost=maybe"],
    ] {
        assert!(
            e.add_vm(
                1,
                "v3-default",
                &DriverOptions::parse(bad.iter().copied()).unwrap()
            )
            .is_err(),
            "{bad:?}"
        );
    }
    e.add_vm(
        1,
        "v3-default",
        &DriverOptions::parse(["cs_rt_prio=30", "guest_rt_cap=20", "deadline_rt_prio=25"]).unwrap(),
    )
    .unwrap();
}

mod random {
    use super::*;
    use proptest::prelude::*;

    fn task() -> impl Strategy<Value = TaskDesc> {
        prop_oneof![
            (-20i8..=19).prop_map(TaskDesc::normal),
            (-20i8..=19).prop_map(TaskDesc::batch),
            (1u8..=99).prop_map(TaskDesc::fifo),
            Just(TaskDesc::idle()),
            Just(TaskDesc::deadline()),
        ]
    }

    #[derive(Clone, Debug)]
    enum Step {
        Page(TaskDesc, Option<TaskDesc>, u64),
        Interrupt,
        Echo,
        Wait(Nanos),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (task(), proptest::option::of(task()), 0u64..16)
                .prop_map(|(c, p, b)| Step::Page(c, p, b)),
            Just(Step::Interrupt),
            Just(Step::Echo),
            (1u64..3000).prop_map(|us| Step::Wait(us * US)),
        ]
    }

    proptest! {
        /// Whatever the guest publishes and the host injects: only the classes the selector
        /// may choose (FIFO at most cs_rt_prio, never DEADLINE), boosted time within the
        /// debts' bound, and the original attributes after unregistering.
        #[test]
        fn any_guest_stays_within_the_selector_and_the_debts(
            steps in proptest::collection::vec(step(), 1..200),
        ) {
            let mut s = Sim::new(&["rt_budget=20ms"]);
            for st in steps {
                match st {
                    Step::Page(c, p, b) => s.guest(c, p, b),
                    Step::Interrupt => s.event(VcpuEvent::Interrupt),
                    Step::Echo => {
                        s.page.ack = s.ticket;
                        s.event(VcpuEvent::Intent(s.page));
                    }
                    Step::Wait(d) => s.advance(s.now + d),
                }
                match s.class {
                    Some(BoostClass::Fifo(p)) => prop_assert!(p <= 60),
                    Some(BoostClass::Nice(n)) => prop_assert!((-20..=19).contains(&n)),
                    Some(BoostClass::Idle) | None => {}
                    Some(c) => prop_assert!(false, "class {c}"),
                }
                let b = s.engine.vcpu(V).unwrap().boosted_ns(s.now);
                // 1:1 recovery: at most half the time plus the generic limit (and one
                // late budget check's worth of slack, none with fake time).
                prop_assert!(b <= s.now / 2 + 20 * MS, "{b} boosted in {}", s.now);
            }
            s.event(VcpuEvent::Unregistered);
            prop_assert_eq!(s.class, None);
        }
    }
}

#[test]
fn a_deboost_ends_when_the_engine_lets_go_of_the_vcpu() {
    // Disabled, then enabled again: the deboost ends, then comes back from the page.
    let mut s = Sim::new(&[]);
    s.guest(TaskDesc::idle(), None, 0);
    assert_eq!(s.class, Some(BoostClass::Idle));
    let mut out = Vec::new();
    s.engine
        .set_enabled(Some(0), false, s.now, &mut out)
        .unwrap();
    s.apply(out);
    assert_eq!(s.class, None, "disabled: original attributes");
    let mut out = Vec::new();
    s.engine
        .set_enabled(Some(0), true, s.now, &mut out)
        .unwrap();
    s.apply(out);
    assert_eq!(
        s.class,
        Some(BoostClass::Idle),
        "enabled: the page decides again"
    );
    // Replaced by a driver that never deboosts.
    let mut out = Vec::new();
    s.engine
        .set_driver(0, "none", &DriverOptions::new(), s.now, &mut out)
        .unwrap();
    s.apply(out);
    assert_eq!(s.class, None, "the old driver's deboost ends with it");
    // Back to v3-default, then the VM goes.
    let mut out = Vec::new();
    s.engine
        .set_driver(0, "v3-default", &DriverOptions::new(), s.now, &mut out)
        .unwrap();
    s.apply(out);
    assert_eq!(s.class, Some(BoostClass::Idle));
    let mut out = Vec::new();
    s.engine.remove_vm(0, s.now, &mut out);
    s.apply(out);
    assert_eq!(s.class, None, "removing the VM restores its threads");
}

#[test]
fn a_boost_the_cap_held_back_is_offered_again_from_the_page() {
    // Two v3 vCPUs, cap 1: the second one's RT intent waits and gets its boost as soon as
    // the first lets go.
    let mut e = Engine::default();
    e.set_max_boosted(Some(1));
    e.add_vm(0, "v3-default", &DriverOptions::new()).unwrap();
    let k1 = VcpuKey::new(0, 1);
    let fifo = |p| GuestArea {
        intent: TaskIntent {
            current: TaskDesc::fifo(p),
            pending: None,
            idle: false,
        },
        ..GuestArea::default()
    };
    let mut out = Vec::new();
    for k in [V, k1] {
        e.handle(Event::new(k, VcpuEvent::Registered), 0, &mut out);
    }
    e.handle(Event::new(V, VcpuEvent::Intent(fifo(10))), 0, &mut out);
    e.handle(Event::new(k1, VcpuEvent::Intent(fifo(20))), 0, &mut out);
    assert!(e.vcpu(V).unwrap().is_boosted());
    assert!(!e.vcpu(k1).unwrap().is_boosted(), "capped");
    assert_eq!(e.vcpu(k1).unwrap().counters.capped, 1);
    out.clear();
    e.handle(
        Event::new(V, VcpuEvent::Intent(GuestArea::default())),
        10 * US,
        &mut out,
    );
    assert!(!e.vcpu(V).unwrap().is_boosted());
    assert!(
        e.vcpu(k1).unwrap().is_boosted(),
        "the waiting page got the slot"
    );
    assert!(out.contains(&Decision::Boost(k1, BoostClass::Fifo(20))));
}

#[test]
fn an_interrupt_ends_a_deboost_even_when_its_boost_is_refused() {
    let mut s = Sim::new(&[]);
    // A critical section past its budget latches the CS debt: host boosts are refused.
    s.guest(TaskDesc::normal(0), None, cs::PREEMPT_DISABLED);
    s.advance(3 * MS);
    s.guest(TaskDesc::idle(), None, 0);
    assert_eq!(s.class, Some(BoostClass::Idle), "deboosted while throttled");
    s.event(VcpuEvent::Interrupt);
    assert_eq!(
        s.class, None,
        "the refused interrupt boost still lifts the deboost"
    );
    // The page read again unchanged (the guest has not run) does not deboost it again.
    s.event(VcpuEvent::Intent(s.page));
    assert_eq!(s.class, None);
    // Once the guest's page moves, it speaks again.
    s.guest(TaskDesc::normal(0), None, cs::HARDIRQ);
    s.guest(TaskDesc::idle(), None, 0);
    assert_eq!(s.class, Some(BoostClass::Idle));
}

#[test]
fn a_held_interrupt_boost_is_not_lowered_by_the_task_intent() {
    let mut s = Sim::new(&["irq_hold=500us"]);
    s.event(VcpuEvent::Interrupt);
    assert_eq!(s.class, Some(BoostClass::Fifo(60)));
    // The page shows an RT task at FIFO 10, the interrupt not taken yet (no echo).
    s.now += 50 * US;
    s.guest(TaskDesc::fifo(10), None, 0);
    assert_eq!(
        s.class,
        Some(BoostClass::Fifo(60)),
        "the hold keeps its class"
    );
    s.advance(s.now + 500 * US);
    s.guest(TaskDesc::fifo(10), Some(TaskDesc::normal(0)), 0);
    assert_eq!(
        s.class,
        Some(BoostClass::Fifo(10)),
        "after the hold: the task's"
    );
}

#[test]
fn a_page_that_goes_away_ends_its_deboost_and_is_forgotten() {
    let mut s = Sim::new(&[]);
    s.guest(TaskDesc::batch(10), None, 0);
    assert_eq!(s.class, Some(BoostClass::Nice(10)));
    s.event(VcpuEvent::SlotInvalid);
    assert_eq!(s.class, None);
    assert!(s.engine.vcpu(V).unwrap().v3.is_none(), "forgotten");
    // A new page starts afresh.
    s.guest(TaskDesc::idle(), None, 0);
    assert_eq!(s.class, Some(BoostClass::Idle));
}
