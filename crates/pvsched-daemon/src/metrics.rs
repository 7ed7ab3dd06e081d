//! Prometheus metrics of the daemon (text exposition format, served on `/metrics`).

use crate::daemon::Status;
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
    let enabled = Family::<VmLabels, Gauge>::default();
    let host_events = Counter::<u64>::default();
    let global = Gauge::<i64>::default();
    reg.register("vcpu_boosts", "Boosts of a vCPU thread", boosts.clone());
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
        "enabled",
        "1 while boosting is enabled globally",
        global.clone(),
    );
    global.set(status.enabled as i64);
    host_events.inc_by(status.host_events);
    for vm in &status.vms {
        enabled
            .get_or_create(&VmLabels {
                vm: vm.id.to_string(),
                source: vm.source.clone(),
                driver: vm.driver.clone(),
            })
            .set(vm.enabled as i64);
        for c in &vm.vcpus {
            let l = VcpuLabels {
                vm: vm.id.to_string(),
                source: vm.source.clone(),
                vcpu: c.vcpu.to_string(),
            };
            boosts.get_or_create(&l).inc_by(c.boosts);
            throttles.get_or_create(&l).inc_by(c.throttles);
            boosted_s.get_or_create(&l).inc_by(c.boosted_ms / 1e3);
            boosted_now.get_or_create(&l).set(c.boosted as i64);
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
    use crate::daemon::{VcpuStatus, VmStatus};

    #[test]
    fn status_renders_as_prometheus_text() {
        let s = Status {
            enabled: true,
            host_events: 42,
            vms: vec![VmStatus {
                id: 0,
                source: "pid 7".into(),
                pid: Some(7),
                driver: "dynamic".into(),
                protocol: false,
                enabled: true,
                vcpus: vec![VcpuStatus {
                    vcpu: 1,
                    tid: 9,
                    boosted: true,
                    boosts: 5,
                    throttles: 1,
                    boosted_ms: 1500.0,
                }],
            }],
        };
        let t = render(&s);
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
        assert!(
            t.contains("pvsched_vm_enabled{vm=\"0\",source=\"pid 7\",driver=\"dynamic\"} 1"),
            "{t}"
        );
        assert!(t.ends_with("# EOF\n"));
    }
}
