//! Prometheus metrics of the daemon (text exposition format, served on `/metrics`).

use crate::status::DaemonStatus as Status;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VcpuLabels {
    vm: String,
    source: String,
    vcpu: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ByLabels {
    by: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmLabels {
    vm: String,
    source: String,
    driver: String,
}

/// Renders `status` as Prometheus text.
pub fn render(status: &Status) -> String {
    let mut reg = Registry::with_prefix("pvsched");
    let boosts = Family::<VcpuLabels, Counter>::default();
    let throttles = Family::<VcpuLabels, Counter>::default();
    let boosted_s = Family::<VcpuLabels, Counter<f64, AtomicU64>>::default();
    let boosted_now = Family::<VcpuLabels, Gauge>::default();
    let debt_s = Family::<VcpuLabels, Gauge<f64, AtomicU64>>::default();
    let repaid_s = Family::<VcpuLabels, Counter<f64, AtomicU64>>::default();
    let enabled = Family::<VmLabels, Gauge>::default();
    let host_events = Counter::<u64>::default();
    let vm_events = Family::<VmLabels, Counter>::default();
    let doorbells = Family::<VmLabels, Counter>::default();
    let lost = Counter::<u64>::default();
    let errors = Counter::<u64>::default();
    let apply_errors = Family::<KindLabels, Counter>::default();
    let unrestored = Gauge::<i64>::default();
    let engine_cpu = Counter::<f64, AtomicU64>::default();
    let wakeups = Counter::<u64>::default();
    let idle_wakeups = Counter::<u64>::default();
    let reconciled = Counter::<u64>::default();
    let self_contended = Counter::<f64, AtomicU64>::default();
    let setattr = Family::<ByLabels, Counter>::default();
    let global = Gauge::<i64>::default();
    let capped = Family::<VcpuLabels, Counter>::default();
    let cap_yields = Family::<VcpuLabels, Counter>::default();
    reg.register("vcpu_boosts", "Boosts of a vCPU thread", boosts.clone());
    reg.register(
        "vcpu_capped",
        "Boosts that waited for the host-wide cap (max_boosted)",
        capped.clone(),
    );
    reg.register(
        "vcpu_cap_yields",
        "Boosts ended to hand their slot of the host-wide cap to one that waited a quantum",
        cap_yields.clone(),
    );
    reg.register(
        "vcpu_throttles",
        "Boosts ended by a budget",
        throttles.clone(),
    );
    reg.register(
        "vcpu_boosted_seconds",
        "Time a vCPU thread ran boosted",
        boosted_s.clone(),
    );
    reg.register(
        "vcpu_boosted",
        "1 while the vCPU thread is boosted",
        boosted_now.clone(),
    );
    reg.register(
        "vcpu_debt_seconds",
        "Boosted time a vCPU has not paid back yet (generic debt)",
        debt_s.clone(),
    );
    reg.register(
        "vcpu_repaid_seconds",
        "Time a vCPU thread ran below normal weight to pay back boosted time",
        repaid_s.clone(),
    );
    reg.register(
        "vm_enabled",
        "1 while boosting is enabled for the VM",
        enabled.clone(),
    );
    reg.register(
        "host_events",
        "Tracepoint hits fed to the policy",
        host_events.clone(),
    );
    reg.register(
        "vm_host_events",
        "Host events fed to the policy for a VM's vCPUs",
        vm_events.clone(),
    );
    reg.register(
        "vm_doorbells",
        "Doorbells a VM's guest rang (ivshmem-doorbell transport)",
        doorbells.clone(),
    );
    reg.register(
        "host_events_lost",
        "Tracepoint records the kernel dropped or throttled",
        lost.clone(),
    );
    reg.register(
        "errors",
        "Errors of the engine (failed scheduling changes and others)",
        errors.clone(),
    );
    reg.register(
        "apply_errors",
        "sched_setattr calls that failed, by kind",
        apply_errors.clone(),
    );
    reg.register(
        "unrestored_threads",
        "Threads whose original class the kernel refused to restore (retried)",
        unrestored.clone(),
    );
    reg.register(
        "engine_cpu_seconds",
        "CPU time of the engine thread",
        engine_cpu.clone(),
    );
    reg.register(
        "engine_wakeups",
        "Wake-ups of the engine thread",
        wakeups.clone(),
    );
    reg.register(
        "engine_idle_wakeups",
        "Wake-ups of the engine thread that decided no class change",
        idle_wakeups.clone(),
    );
    reg.register(
        "reconciled",
        "vCPU threads found in another class than recorded and set again",
        reconciled.clone(),
    );
    reg.register(
        "self_contended_seconds",
        "Time boosting was held off because the attached vCPUs competed only with each other",
        self_contended.clone(),
    );
    reg.register(
        "setattr_calls",
        "sched_setattr calls on vCPU threads, by the engine or the vCPU itself",
        setattr.clone(),
    );
    reg.register(
        "enabled",
        "1 while boosting is enabled globally",
        global.clone(),
    );
    lost.inc_by(status.host_events_lost);
    errors.inc_by(status.apply_errors);
    for kind in pvsched_host::runtime::APPLY_ERROR_KINDS {
        let n = status.apply_errors_by_kind.get(kind).copied().unwrap_or(0);
        apply_errors
            .get_or_create(&KindLabels { kind: kind.into() })
            .inc_by(n);
    }
    unrestored.set(status.unrestored.len() as i64);
    engine_cpu.inc_by(status.cost.engine_cpu_s);
    wakeups.inc_by(status.cost.wakeups);
    idle_wakeups.inc_by(status.cost.idle_wakeups);
    reconciled.inc_by(status.cost.reconciled);
    self_contended.inc_by(status.cost.self_contended_s);
    setattr
        .get_or_create(&ByLabels {
            by: "engine".into(),
        })
        .inc_by(status.cost.engine_setattr);
    setattr
        .get_or_create(&ByLabels { by: "vcpu".into() })
        .inc_by(status.cost.vcpu_setattr);
    global.set(status.enabled as i64);
    host_events.inc_by(status.host_events);
    for d in &status.vms {
        let vm = &d.vm;
        let labels = VmLabels {
            vm: vm.id.to_string(),
            source: d.source.clone(),
            driver: vm.driver.clone(),
        };
        enabled.get_or_create(&labels).set(vm.enabled as i64);
        vm_events.get_or_create(&labels).inc_by(vm.host_events);
        if let Some(n) = d.doorbells {
            doorbells.get_or_create(&labels).inc_by(n);
        }
        for c in &vm.vcpus {
            let l = VcpuLabels {
                vm: vm.id.to_string(),
                source: d.source.clone(),
                vcpu: c.vcpu.to_string(),
            };
            boosts.get_or_create(&l).inc_by(c.boosts);
            throttles.get_or_create(&l).inc_by(c.throttles);
            capped.get_or_create(&l).inc_by(c.capped);
            cap_yields.get_or_create(&l).inc_by(c.cap_yields);
            boosted_s.get_or_create(&l).inc_by(c.boosted_ms / 1e3);
            boosted_now.get_or_create(&l).set(c.boosted as i64);
            debt_s.get_or_create(&l).set(c.debt_ms / 1e3);
            repaid_s.get_or_create(&l).inc_by(c.repaid_ms / 1e3);
        }
    }
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &reg);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::DaemonVm;
    use pvsched_host::runtime::{Cost, VcpuStatus, VmStatus};

    #[test]
    fn status_renders_as_prometheus_text() {
        let s = Status {
            enabled: true,
            host_events: 42,
            cost: Cost {
                engine_cpu_s: 0.25,
                wakeups: 10,
                idle_wakeups: 4,
                reconciled: 2,
                self_contended_s: 1.5,
                engine_setattr: 3,
                vcpu_setattr: 4,
                ..Cost::default()
            },
            vms: vec![DaemonVm {
                source: "pid 7".into(),
                pid: Some(7),
                protocol: false,
                doorbells: Some(5),
                vm: VmStatus {
                    id: 0,
                    driver: "dynamic".into(),
                    enabled: true,
                    host_events: 42,
                    vcpus: vec![VcpuStatus {
                        vcpu: 1,
                        tid: 9,
                        boosted: true,
                        boosts: 5,
                        throttles: 1,
                        boosted_ms: 1500.0,
                        ..VcpuStatus::default()
                    }],
                    ..VmStatus::default()
                },
            }],
            apply_errors_by_kind: [("busy".to_string(), 3)].into(),
            unrestored: vec![9],
            ..Status::default()
        };
        let t = render(&s);
        assert!(
            t.contains("pvsched_apply_errors_total{kind=\"busy\"} 3"),
            "{t}"
        );
        assert!(
            t.contains("pvsched_apply_errors_total{kind=\"permission\"} 0"),
            "{t}"
        );
        assert!(t.contains("pvsched_unrestored_threads 1"), "{t}");
        assert!(
            t.contains("pvsched_vcpu_boosts_total{vm=\"0\",source=\"pid 7\",vcpu=\"1\"} 5"),
            "{t}"
        );
        assert!(
            t.contains(
                "pvsched_vcpu_boosted_seconds_total{vm=\"0\",source=\"pid 7\",vcpu=\"1\"} 1.5"
            ),
            "{t}"
        );
        assert!(t.contains("pvsched_host_events_total 42"), "{t}");
        assert!(t.contains("pvsched_engine_idle_wakeups_total 4"), "{t}");
        assert!(
            t.contains("pvsched_vm_enabled{vm=\"0\",source=\"pid 7\",driver=\"dynamic\"} 1"),
            "{t}"
        );
        assert!(t.contains("pvsched_engine_cpu_seconds_total 0.25"), "{t}");
        assert!(t.contains("pvsched_reconciled_total 2"), "{t}");
        assert!(
            t.contains("pvsched_self_contended_seconds_total 1.5"),
            "{t}"
        );
        assert!(
            t.contains("pvsched_setattr_calls_total{by=\"vcpu\"} 4"),
            "{t}"
        );
        assert!(
            t.contains(
                "pvsched_vm_host_events_total{vm=\"0\",source=\"pid 7\",driver=\"dynamic\"} 42"
            ),
            "{t}"
        );
        assert!(
            t.contains(
                "pvsched_vm_doorbells_total{vm=\"0\",source=\"pid 7\",driver=\"dynamic\"} 5"
            ),
            "{t}"
        );
        assert!(t.ends_with("# EOF\n"));
    }
}
