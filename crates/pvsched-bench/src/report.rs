//! Human-readable output of a run, in cyclictest's shape.

use crate::experiment::{GuestLoad, Report};
use std::fmt::Write;

fn us(v: f64) -> String {
    format!("{:.0}", v)
}

/// Renders a run's report as text.
pub fn render(r: &Report) -> String {
    let mut s = String::new();
    let load = match r.guest_load {
        GuestLoad::Idle => "idle",
        GuestLoad::Busy => "busy",
    };
    let _ = writeln!(
        s,
        "pvsched vm: {} vCPUs, interval {} us, {:.2} s{}, guest load {load}, host load {} hogs, vCPU sched {}",
        r.vcpus,
        us(r.interval_us),
        r.elapsed_s,
        if r.interrupted { " (interrupted)" } else { "" },
        r.host_load,
        r.vcpu_sched,
    );
    match r.layout {
        crate::experiment::Layout::Free => {}
        l => {
            let _ = writeln!(
                s,
                "Layout: {l} (vCPU threads{} pinned, docs/policy.md \"Where the vCPU threads run\")",
                if r.host_load > 0 { " and hogs" } else { "" }
            );
        }
    }
    if let Some(c) = &r.controller_class {
        let _ = writeln!(s, "Controller thread (drains results, stops the run): {c}");
    }
    if let Some(m) = &r.memory_file {
        let v3 = r.pv.as_ref().is_some_and(|p| p.version == 3);
        let slots: Vec<String> = (0..r.vcpus)
            .map(|i| {
                let gpa = pvsched_vmm::layout::vcpu_region(i)
                    + if v3 {
                        pvsched_guest::mailbox::V3_PAGE_OFFSET
                    } else {
                        pvsched_guest::mailbox::SLOT_OFFSET
                    };
                format!("{gpa:#x}")
            })
            .collect();
        let features: Vec<String> = r.pv_features.iter().map(|f| format!("{f:?}")).collect();
        let tsc = if r.pv_features.iter().any(|f| f == "deadline_hint") {
            format!(", tsc_offset = {}", r.tsc_offset)
        } else {
            String::new()
        };
        if v3 {
            let _ = writeln!(
                s,
                "Guest RAM in {m}: for pvsched daemon, [[vm]] guest_memory = {m:?}, \
                 protocol = \"v3\", slots = [{}]",
                slots.join(", "),
            );
        } else {
            let _ = writeln!(
                s,
                "Guest RAM in {m}: for pvsched daemon, [[vm]] guest_memory = {m:?}, slots = [{}], \
                 features = [{}]{tsc}",
                slots.join(", "),
                features.join(", "),
            );
        }
    }
    let _ = writeln!(s, "Guest timer wake-up latency (us):");
    for v in &r.per_vcpu {
        let l = &v.latency;
        let _ = writeln!(
            s,
            "T:{:2} ({:>6}) I:{} C:{:>7} Min:{:>7} Avg:{:>7} Max:{:>7}",
            v.index,
            v.tid,
            us(r.interval_us),
            l.count,
            us(l.min_us),
            us(l.avg_us),
            us(l.max_us)
        );
    }
    for v in &r.per_vcpu {
        let l = &v.latency;
        let _ = writeln!(
            s,
            "H:{:2} p50:{:>7} p90:{:>7} p99:{:>7} p99.9:{:>7}{}{}",
            v.index,
            us(l.p50_us),
            us(l.p90_us),
            us(l.p99_us),
            us(l.p999_us),
            if v.overruns > 0 {
                format!("  overruns {} (periods skipped, already past)", v.overruns)
            } else {
                String::new()
            },
            if v.lost > 0 {
                format!("  ({} samples lost)", v.lost)
            } else {
                String::new()
            }
        );
    }
    let a = &r.latency;
    let _ = writeln!(
        s,
        "All vCPUs: C:{} Min:{} Avg:{} p50:{} p90:{} p99:{} p99.9:{} Max:{}",
        a.count,
        us(a.min_us),
        us(a.avg_us),
        us(a.p50_us),
        us(a.p90_us),
        us(a.p99_us),
        us(a.p999_us),
        us(a.max_us)
    );
    for v in &r.per_vcpu {
        if let Some(t) = &v.task {
            // A missed job (skipped while more than a period behind) is a glitch too.
            let due = t.jobs + t.missed;
            let pct = if due > 0 {
                (t.glitches + t.missed) as f64 / due as f64 * 100.0
            } else {
                0.0
            };
            let _ = writeln!(
                s,
                "D:{:2} period {} us work {} us ({} x {:.1} us): jobs {} glitches {} missed {} ({:.2}%) response avg {} max {} us",
                v.index,
                us(t.period_us),
                us(t.work_us),
                t.work_iters,
                t.work_iter_us,
                t.jobs,
                t.glitches,
                t.missed,
                pct,
                us(t.response_avg_us),
                us(t.response_max_us)
            );
        }
    }
    match &r.pv {
        None => {
            let _ = writeln!(s, "pvsched protocol: off");
        }
        Some(pv) if pv.version == 0 => {
            let status = pv.per_vcpu.first().map_or("", |v| v.status.as_str());
            let _ = writeln!(s, "pvsched protocol: not in use (guest: {status})");
        }
        Some(pv) => {
            let _ = writeln!(
                s,
                "pvsched protocol: v{}, features {}",
                pv.version,
                if pv.features.is_empty() {
                    "none".to_string()
                } else {
                    pv.features.join(",")
                }
            );
            for (i, v) in pv.per_vcpu.iter().enumerate() {
                let _ = writeln!(
                    s,
                    "P:{:2} {}: requests {} (no doorbell {}) doorbells boost {} unboost {} | host: doorbells {} slot updates {} bad {}",
                    i,
                    v.status,
                    v.requests,
                    v.quiet,
                    v.boost_rings,
                    v.unboost_rings,
                    v.host.doorbells,
                    v.host.updates_seen,
                    v.host.bad_slots
                );
            }
        }
    }
    let pol = &r.policy;
    let _ = writeln!(
        s,
        "Policy: {}{}",
        pol.driver,
        if pol.host_events > 0 || pol.host_events_lost > 0 {
            format!(
                " ({} host events from tracepoints, {} lost)",
                pol.host_events, pol.host_events_lost
            )
        } else {
            String::new()
        }
    );
    for (i, v) in pol.per_vcpu.iter().enumerate() {
        let share = r.boosted_pct(v.boosted_ms);
        let _ = writeln!(
            s,
            "B:{:2} boosts {} unboosts {} throttles {} ({} generic) refused {} capped {} (yielded {}) boosted \
             {:.1} ms ({:.1}%: request {:.0}, interrupt {:.0}, deadline {:.0} ms; longest {:.2} ms) repaid {:.1} ms",
            i,
            v.boosts,
            v.unboosts,
            v.throttles,
            v.generic_throttles,
            v.refused,
            v.capped,
            v.cap_yields,
            v.boosted_ms,
            share,
            v.by_cause_ms[1],
            v.by_cause_ms[2],
            v.by_cause_ms[3],
            v.longest_ms,
            v.repaid_ms
        );
        if v.paused_ms > 0.0 {
            s.pop();
            let _ = writeln!(s, " (paused {:.1} ms)", v.paused_ms);
        }
        if v.deboosted_ms > 0.0 || v.tickets[0] > 0 {
            // Only v3 guests are deboosted or get tickets.
            s.pop();
            let _ = writeln!(
                s,
                " deboosted {:.1} ms tickets {} echoed {}",
                v.deboosted_ms, v.tickets[0], v.tickets[1]
            );
        }
    }
    if pol.boost_latency.count > 0 {
        let l = &pol.boost_latency;
        let _ = writeln!(
            s,
            "Boost decision -> applied (us): C:{} p50:{} p99:{} Max:{}",
            l.count,
            us(l.p50_us),
            us(l.p99_us),
            us(l.max_us)
        );
    }
    let c = &pol.cost;
    if c.uptime_s > 0.0 {
        let _ = writeln!(
            s,
            "Engine: CPU {:.2} % of a core ({:.0} ms), {:.0} wake-ups/s ({:.0} % deciding no class \
             change), {:.0} sched_setattr/s \
             ({} by the engine thread, {} by vCPU threads on themselves); vCPU threads ran \
             the engine {} times ({} found it busy); timers fired by the engine thread {}, by \
             vCPU threads {}; {} raced with a vCPU changing itself ({} settled by it first, {} set \
             again by the engine thread's look); {} \
             found in another class and set again; boosting held off on a quiet host for {:.1} s (vCPU time; the vCPUs \
             competing only with each other {:.1} s)",
            c.engine_cpu_percent,
            c.engine_cpu_s * 1e3,
            c.wakeups_per_s,
            100.0 * c.idle_wakeups as f64 / c.wakeups.max(1) as f64,
            c.setattr_per_s,
            c.engine_setattr,
            c.vcpu_setattr,
            c.vcpu_handle_calls,
            c.vcpu_handle_busy,
            c.engine_timers,
            c.vcpu_timers,
            c.rechecks,
            c.recheck_settled,
            c.recheck_fixed,
            c.reconciled,
            c.quiet_s,
            c.self_contended_s
        );
        if c.vcpu_handoffs > 0 {
            let _ = writeln!(
                s,
                "vCPU threads in a deadline class handed {} exits to the engine thread (such a \
                 thread never runs the engine itself: the kernel may stop it while it holds it)",
                c.vcpu_handoffs
            );
        }
        if c.engine_deadline {
            let _ = writeln!(
                s,
                "Engine thread: SCHED_DEADLINE reservation ({} µs every {} µs, reclaiming), \
                 above every boost",
                pvsched_host::mechanism::HELPER_RUNTIME_NS / 1000,
                pvsched_host::mechanism::HELPER_PERIOD_NS / 1000
            );
        }
        if c.source_pauses > 0 {
            let _ = writeln!(
                s,
                "Engine: a VM's event source set aside {} times for being read faster than \
                 5 000 times a second (a guest ringing its doorbell in a loop)",
                c.source_pauses
            );
        }
    }
    for e in &pol.errors {
        let _ = writeln!(s, "Policy error: {e}");
    }
    let p = &r.host_probe;
    let _ = writeln!(
        s,
        "Host probe (SCHED_OTHER): C:{} Min:{} Avg:{} p99:{} Max:{}",
        p.count,
        us(p.min_us),
        us(p.avg_us),
        us(p.p99_us),
        us(p.max_us)
    );
    if let Some(h) = &r.host_hogs {
        let _ = writeln!(
            s,
            "Host hogs: {} threads, {:.0} work units/s",
            h.threads, h.units_per_sec
        );
    }
    for v in &r.per_vcpu {
        let _ = writeln!(
            s,
            "vCPU {} thread: CPU {:.2} s of {:.2} s ({:.0}%), {} exits to the VMM",
            v.index,
            v.cpu_s,
            v.wall_s,
            v.cpu_percent(),
            v.user_exits
        );
    }
    if let Some(pct) = r.vcpus_sharing_cpu_pct {
        let _ = writeln!(
            s,
            "vCPU threads sharing a host CPU: {pct:.0}% of samples (every 10 ms; they then \
             compete with each other for it)"
        );
    }
    if let Some(pct) = r.vcpu_alone_pct {
        let _ = writeln!(
            s,
            "A vCPU thread alone on a host CPU (no other vCPU, no hog): {pct:.0}% of samples (the \
             hogs then share the other CPUs)"
        );
    }
    s
}
