//! pvsched v3's default selector: what host scheduling class a vCPU thread gets for what its
//! guest publishes in the v3 page (task intent and critical-section state), under the two
//! debts' throttles.
//!
//! The rules (pvsched/linux, `Documentation/virt/kvm/pvsched-v3.rst`, "Built-in request
//! selection"), restated: guest NORMAL and BATCH map to host NORMAL at the guest's nice; IDLE
//! to host IDLE; FIFO and RR to host FIFO at the guest's priority capped at `guest_rt_cap`;
//! guest DEADLINE to host FIFO at `deadline_rt_prio`; host DEADLINE is never chosen. A
//! pending task replaces the current one only when strictly more urgent. An active critical
//! section, unless its debt is throttled, selects FIFO at `cs_rt_prio`. A generic throttle
//! clamps every candidate above the baseline to the baseline, but a request below it (a
//! deboost) survives. Pure: no clock, no state.

use crate::{BoostClass, OptionError, Reasons};
use pvsched_proto::v3::{cs, sched, GuestArea, TaskDesc};
use pvsched_proto::Reason;

/// The selector's priorities.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SelectorConfig {
    /// FIFO priority of a critical-section boost (above the two others).
    pub cs_rt_prio: u32,
    /// FIFO priority for a guest DEADLINE task.
    pub deadline_rt_prio: u32,
    /// Highest FIFO priority a guest FIFO/RR task gets.
    pub guest_rt_cap: u32,
}

impl Default for SelectorConfig {
    /// pvsched v3's defaults: critical sections at FIFO 60, guest DEADLINE at 50, guest
    /// FIFO/RR capped at 50.
    fn default() -> Self {
        SelectorConfig {
            cs_rt_prio: 60,
            deadline_rt_prio: 50,
            guest_rt_cap: 50,
        }
    }
}

impl SelectorConfig {
    /// Checks the priorities: each 1..=98 (the engine thread runs one above the highest) and
    /// the critical-section priority strictly above the two others, so that a selection at
    /// `cs_rt_prio` always means a critical section.
    pub fn validate(&self) -> Result<(), OptionError> {
        for (key, p) in [
            ("cs_rt_prio", self.cs_rt_prio),
            ("deadline_rt_prio", self.deadline_rt_prio),
            ("guest_rt_cap", self.guest_rt_cap),
        ] {
            if !(1..=98).contains(&p) {
                return Err(OptionError::Value {
                    key: key.into(),
                    value: p.to_string(),
                    why: "expected a FIFO priority from 1 to 98 (the engine thread runs one above)",
                });
            }
        }
        if self.cs_rt_prio <= self.deadline_rt_prio || self.cs_rt_prio <= self.guest_rt_cap {
            return Err(OptionError::Value {
                key: "cs_rt_prio".into(),
                value: self.cs_rt_prio.to_string(),
                why: "must be above deadline_rt_prio and guest_rt_cap",
            });
        }
        Ok(())
    }
}

/// A host scheduling class the selector can choose.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HostPrio {
    /// `SCHED_NORMAL` at a nice value.
    Normal(i8),
    /// `SCHED_IDLE`.
    Idle,
    /// `SCHED_FIFO` at a priority.
    Fifo(u32),
}

impl HostPrio {
    /// Linux's priority scale, lower is more urgent: FIFO p → 99 − p, NORMAL n → 120 + n,
    /// IDLE below every nice (140).
    pub fn rank(self) -> i32 {
        match self {
            HostPrio::Fifo(p) => 99 - p as i32,
            HostPrio::Normal(n) => 120 + n as i32,
            HostPrio::Idle => 140,
        }
    }

    /// More urgent than the baseline (a boost).
    pub fn above(self, baseline_nice: i8) -> bool {
        match self {
            HostPrio::Fifo(_) => true,
            HostPrio::Normal(n) => n < baseline_nice,
            HostPrio::Idle => false,
        }
    }

    /// Less urgent than the baseline (a deboost).
    pub fn below(self, baseline_nice: i8) -> bool {
        match self {
            HostPrio::Fifo(_) => false,
            HostPrio::Normal(n) => n > baseline_nice,
            HostPrio::Idle => true,
        }
    }

    /// The boost class that applies it.
    pub fn class(self) -> BoostClass {
        match self {
            HostPrio::Normal(n) => BoostClass::Nice(n as i32),
            HostPrio::Idle => BoostClass::Idle,
            HostPrio::Fifo(p) => BoostClass::Fifo(p),
        }
    }
}

/// Where a selection came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    /// Nothing asked: the baseline.
    Baseline,
    /// The guest's task intent (a boost or a deboost).
    Task,
    /// A critical section.
    Cs,
}

/// The selector's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Selection {
    /// The host class.
    pub prio: HostPrio,
    /// What it is for.
    pub source: Source,
}

/// Maps a guest task description to a host class.
pub fn map(cfg: &SelectorConfig, d: TaskDesc) -> HostPrio {
    match d.class {
        sched::FIFO | sched::RR => HostPrio::Fifo((d.rt_prio as u32).min(cfg.guest_rt_cap)),
        sched::IDLE => HostPrio::Idle,
        sched::DEADLINE => HostPrio::Fifo(cfg.deadline_rt_prio),
        // NORMAL and BATCH (the decoder admits no other class).
        _ => HostPrio::Normal(d.nice),
    }
}

/// Selects the host class for `area` (decoded, so its tuples are valid) with the baseline at
/// `baseline_nice` and the throttles as given.
pub fn select(
    cfg: &SelectorConfig,
    baseline_nice: i8,
    area: &GuestArea,
    cs_throttled: bool,
    generic_throttled: bool,
) -> Selection {
    let baseline = HostPrio::Normal(baseline_nice);
    let pending = area.intent.pending.map(|p| map(cfg, p));
    if generic_throttled {
        // A ceiling at the baseline: candidates above it are clamped, deboosts survive.
        let clamp = |p: HostPrio| if p.above(baseline_nice) { baseline } else { p };
        let current = map(cfg, area.intent.current);
        let mut sel = Selection {
            prio: clamp(current),
            source: if current.below(baseline_nice) {
                Source::Task
            } else {
                Source::Baseline
            },
        };
        if let Some(p) = pending.map(clamp) {
            if p.rank() < sel.prio.rank() {
                sel = Selection {
                    prio: p,
                    source: Source::Task,
                };
            }
        }
        return sel;
    }
    if area.cs != 0 && !cs_throttled {
        return Selection {
            prio: HostPrio::Fifo(cfg.cs_rt_prio),
            source: Source::Cs,
        };
    }
    let mut prio = map(cfg, area.intent.current);
    if let Some(p) = pending {
        if p.rank() < prio.rank() {
            prio = p;
        }
    }
    Selection {
        prio,
        source: Source::Task,
    }
}

/// The guest's page as protocol-v1 reasons, for the engine's request bookkeeping and for
/// drivers that speak only reasons: each critical-section bit as its reason, and
/// [`Reason::RtTask`] when the current or a pending task maps above the baseline.
pub fn reasons(cfg: &SelectorConfig, baseline_nice: i8, area: &GuestArea) -> Reasons {
    let mut r = Reasons::NONE;
    for (bit, reason) in [
        (cs::NMI, Reason::Nmi),
        (cs::HARDIRQ, Reason::Irq),
        (cs::SOFTIRQ, Reason::Softirq),
        (cs::PREEMPT_DISABLED, Reason::PreemptDisabled),
    ] {
        if area.cs & bit != 0 {
            r = r.with(reason);
        }
    }
    let task_above = core::iter::once(area.intent.current)
        .chain(area.intent.pending)
        .any(|d| map(cfg, d).above(baseline_nice));
    if task_above {
        r = r.with(Reason::RtTask);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use pvsched_proto::v3::TaskIntent;

    const CFG: SelectorConfig = SelectorConfig {
        cs_rt_prio: 60,
        deadline_rt_prio: 50,
        guest_rt_cap: 50,
    };

    /// Every tuple the default guest area allows.
    fn valid_tasks() -> Vec<TaskDesc> {
        let mut v = Vec::new();
        for class in [sched::NORMAL, sched::BATCH] {
            for nice in -20..=19 {
                v.push(TaskDesc {
                    class,
                    nice,
                    rt_prio: 0,
                });
            }
        }
        for class in [sched::FIFO, sched::RR] {
            for rt_prio in 1..=99 {
                v.push(TaskDesc {
                    class,
                    nice: 0,
                    rt_prio,
                });
            }
        }
        v.push(TaskDesc::idle());
        v.push(TaskDesc::deadline());
        v
    }

    fn area(current: TaskDesc, pending: Option<TaskDesc>, cs: u64) -> GuestArea {
        GuestArea {
            intent: TaskIntent {
                current,
                pending,
                idle: false,
            },
            cs,
            ack: 0,
        }
    }

    #[test]
    fn every_allowed_task_maps_as_documented() {
        let tasks = valid_tasks();
        assert_eq!(tasks.len(), 80 + 198 + 2);
        for d in tasks {
            let want = match d.class {
                sched::NORMAL | sched::BATCH => HostPrio::Normal(d.nice),
                sched::FIFO | sched::RR => HostPrio::Fifo((d.rt_prio as u32).min(50)),
                sched::IDLE => HostPrio::Idle,
                _ => HostPrio::Fifo(50),
            };
            assert_eq!(map(&CFG, d), want, "{d:?}");
            // Never host DEADLINE, never a FIFO priority at or above critical sections'.
            if let HostPrio::Fifo(p) = map(&CFG, d) {
                assert!(p < CFG.cs_rt_prio);
            }
            let s = select(&CFG, 0, &area(d, None, 0), false, false);
            assert_eq!(
                s,
                Selection {
                    prio: want,
                    source: Source::Task
                }
            );
        }
    }

    #[test]
    fn rejected_tuples_never_reach_the_selector() {
        // The decoder is the gate: every tuple it refuses, none it admits, is outside the
        // list above (checked exhaustively in pvsched-proto); here the classes the doc names
        // as invalid.
        for d in [
            TaskDesc {
                class: 7,
                nice: 0,
                rt_prio: 0,
            }, // EXT
            TaskDesc {
                class: 4,
                nice: 0,
                rt_prio: 0,
            }, // unused value
            TaskDesc {
                class: sched::FIFO,
                nice: 0,
                rt_prio: 0,
            },
            TaskDesc {
                class: sched::NORMAL,
                nice: 20,
                rt_prio: 0,
            },
            TaskDesc {
                class: sched::IDLE,
                nice: 1,
                rt_prio: 0,
            },
            TaskDesc {
                class: sched::DEADLINE,
                nice: 0,
                rt_prio: 1,
            },
        ] {
            let w = TaskIntent {
                current: d,
                pending: None,
                idle: false,
            }
            .encode();
            assert!(TaskIntent::decode(w).is_err(), "{d:?}");
        }
    }

    #[test]
    fn pending_wins_only_when_strictly_more_urgent() {
        let tasks = valid_tasks();
        for &c in tasks.iter().step_by(3) {
            for &p in tasks.iter().step_by(5) {
                let s = select(&CFG, 0, &area(c, Some(p), 0), false, false);
                let (mc, mp) = (map(&CFG, c), map(&CFG, p));
                let want = if mp.rank() < mc.rank() { mp } else { mc };
                assert_eq!(s.prio, want, "{c:?} / {p:?}");
                assert_eq!(s.source, Source::Task);
            }
        }
        // A tie keeps current: FIFO 70 and FIFO 80 both cap at 50.
        let s = select(
            &CFG,
            0,
            &area(TaskDesc::fifo(70), Some(TaskDesc::fifo(80)), 0),
            false,
            false,
        );
        assert_eq!(s.prio, HostPrio::Fifo(50));
    }

    #[test]
    fn a_critical_section_wins_unless_throttled() {
        for bits in 1..=cs::VALID {
            for d in [TaskDesc::idle(), TaskDesc::normal(10), TaskDesc::fifo(99)] {
                let a = area(d, None, bits);
                assert_eq!(
                    select(&CFG, 0, &a, false, false),
                    Selection {
                        prio: HostPrio::Fifo(60),
                        source: Source::Cs
                    }
                );
                // CS throttled: the task request shows through.
                assert_eq!(
                    select(&CFG, 0, &a, true, false),
                    Selection {
                        prio: map(&CFG, d),
                        source: Source::Task
                    }
                );
            }
        }
    }

    #[test]
    fn a_generic_throttle_clamps_boosts_and_keeps_deboosts() {
        let tasks = valid_tasks();
        for baseline in [-5i8, 0, 5] {
            for &c in &tasks {
                for p in [
                    None,
                    Some(TaskDesc::fifo(10)),
                    Some(TaskDesc::idle()),
                    Some(TaskDesc::normal(19)),
                ] {
                    for cs_bits in [0, cs::HARDIRQ] {
                        let s = select(&CFG, baseline, &area(c, p, cs_bits), cs_bits != 0, true);
                        // Never above the baseline; critical sections never elevate.
                        assert!(!s.prio.above(baseline), "{c:?} {p:?} -> {s:?}");
                        assert_ne!(s.source, Source::Cs);
                        let mc = map(&CFG, c);
                        if mc.below(baseline) {
                            // A deboost survives unless a clamped pending is more urgent.
                            let mp = p.map(|p| map(&CFG, p)).map(|m| {
                                if m.above(baseline) {
                                    HostPrio::Normal(baseline)
                                } else {
                                    m
                                }
                            });
                            let want = match mp {
                                Some(m) if m.rank() < mc.rank() => m,
                                _ => mc,
                            };
                            assert_eq!(s.prio, want, "{c:?} {p:?} b={baseline}");
                            assert_eq!(s.source, Source::Task);
                        } else if p.is_none() {
                            assert_eq!(
                                s,
                                Selection {
                                    prio: HostPrio::Normal(baseline),
                                    source: Source::Baseline
                                }
                            );
                        }
                    }
                }
            }
        }
        // A stale, less urgent pending hint cannot deboost below current's clamped intent.
        let s = select(
            &CFG,
            0,
            &area(TaskDesc::fifo(10), Some(TaskDesc::idle()), 0),
            false,
            true,
        );
        assert_eq!(
            s,
            Selection {
                prio: HostPrio::Normal(0),
                source: Source::Baseline
            }
        );
    }

    #[test]
    fn reasons_follow_the_page() {
        let a = area(
            TaskDesc::normal(0),
            None,
            cs::HARDIRQ | cs::PREEMPT_DISABLED,
        );
        assert_eq!(
            reasons(&CFG, 0, &a),
            Reasons::NONE
                .with(Reason::Irq)
                .with(Reason::PreemptDisabled)
        );
        let a = area(TaskDesc::idle(), Some(TaskDesc::deadline()), 0);
        assert_eq!(reasons(&CFG, 0, &a), Reasons::NONE.with(Reason::RtTask));
        assert_eq!(
            reasons(&CFG, 0, &area(TaskDesc::normal(-1), None, 0)),
            Reasons::NONE.with(Reason::RtTask)
        );
        assert_eq!(
            reasons(&CFG, -5, &area(TaskDesc::normal(-1), None, 0)),
            Reasons::NONE
        );
        assert_eq!(
            reasons(&CFG, 0, &area(TaskDesc::batch(5), None, 0)),
            Reasons::NONE
        );
    }

    #[test]
    fn configs_are_checked() {
        assert!(CFG.validate().is_ok());
        for bad in [
            SelectorConfig {
                cs_rt_prio: 99,
                ..CFG
            },
            SelectorConfig {
                cs_rt_prio: 50,
                ..CFG
            },
            SelectorConfig {
                guest_rt_cap: 0,
                ..CFG
            },
            SelectorConfig {
                deadline_rt_prio: 60,
                ..CFG
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
