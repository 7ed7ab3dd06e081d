//! End-to-end testbed runs on real KVM: sampling, busy guests, and the static scheduling
//! class applied to vCPU threads and restored. Each test skips, saying why, where /dev/kvm
//! (or the privilege to set real-time classes) is missing.

use pvsched_bench::experiment::{self, ExperimentConfig, Outcome};
use pvsched_host::sched::{self, SchedClass};
use pvsched_testutil::{kvm_or_skip, serial, within};
use pvsched_vmm::{GuestConfig, TaskConfig, VmConfig};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn config(vcpus: usize, busy: bool, duration: Duration) -> ExperimentConfig {
    ExperimentConfig {
        vm: VmConfig {
            pv: None,
            vcpus,
            guest: GuestConfig {
                busy,
                ..GuestConfig::default()
            },
        },
        duration,
        host_load: 0,
        vcpu_sched: None,
        probe_interval: Duration::from_millis(1),
        policy: Default::default(),
        host_events: None,
        task_by_vcpu: Vec::new(),
        external_daemon: None,
        memory_file: None,
        layout: Default::default(),
    }
}

/// Runs an experiment on another thread; a run that does not end in `limit` is a hang.
fn run(cfg: ExperimentConfig, limit: Duration) -> Outcome {
    within(limit, move || {
        experiment::run(&cfg, &AtomicBool::new(false))
    })
    .unwrap_or_else(|e| panic!("experiment failed: {e}"))
}

#[test]
fn each_vcpu_samples_once_per_interval() {
    let _s = serial();
    if !kvm_or_skip("each_vcpu_samples_once_per_interval") {
        return;
    }
    let out = run(
        config(2, false, Duration::from_secs(1)),
        Duration::from_secs(30),
    );
    let r = &out.report;
    assert_eq!(r.per_vcpu.len(), 2);
    let expected = r.elapsed_s / (r.interval_us / 1e6);
    for v in &r.per_vcpu {
        // Every period is either measured or, when the guest was already past it, skipped
        // and counted (cyclictest's rule).
        let n = (v.latency.count + v.overruns) as f64;
        assert!(
            (n - expected).abs() <= expected * 0.10,
            "vCPU {}: {} samples + {} overruns, expected {expected:.0} ± 10%",
            v.index,
            v.latency.count,
            v.overruns
        );
        assert_eq!(v.lost, 0);
        assert!(v.guest_done, "guest {} stopped by itself", v.index);
        assert!(v.latency.min_us <= v.latency.p50_us && v.latency.p50_us <= v.latency.max_us);
        let task = v.task.as_ref().expect("deadline task enabled by default");
        // Every release is either a job done or, when the task was already a period behind,
        // skipped and counted as missed (an xrun).
        let jobs_expected = r.elapsed_s / 0.002;
        let releases = (task.jobs + task.missed) as f64;
        assert!(
            (releases - jobs_expected).abs() <= jobs_expected * 0.10,
            "vCPU {}: {} jobs + {} missed, expected {jobs_expected:.0}",
            v.index,
            task.jobs,
            task.missed
        );
        assert!(task.work_iters >= 1);
    }
    assert_eq!(
        r.latency.count,
        r.per_vcpu.iter().map(|v| v.latency.count).sum::<u64>()
    );
    assert!(r.host_probe.count > 0);
}

#[test]
fn busy_guest_keeps_its_vcpu_threads_running() {
    let _s = serial();
    if !kvm_or_skip("busy_guest_keeps_its_vcpu_threads_running") {
        return;
    }
    let out = run(
        config(2, true, Duration::from_secs(1)),
        Duration::from_secs(30),
    );
    for v in &out.report.per_vcpu {
        assert!(
            v.cpu_percent() > 50.0,
            "busy vCPU {} used only {:.0}% of a CPU",
            v.index,
            v.cpu_percent()
        );
        assert!(v.latency.count > 0);
    }
}

#[test]
fn task_disabled_means_no_task_report() {
    let _s = serial();
    if !kvm_or_skip("task_disabled_means_no_task_report") {
        return;
    }
    let mut cfg = config(1, false, Duration::from_millis(300));
    cfg.vm.guest.task = None;
    let out = run(cfg, Duration::from_secs(30));
    assert!(out.report.per_vcpu[0].task.is_none());
    assert_eq!(out.report.jobs, 0);
    // A 4 ms task on the same guest does run.
    let mut cfg = config(1, false, Duration::from_millis(300));
    cfg.vm.guest.task = Some(TaskConfig {
        period: Duration::from_millis(4),
        work: Duration::from_micros(500),
    });
    let out = run(cfg, Duration::from_secs(30));
    assert!(out.report.jobs > 0);
}

#[test]
fn static_rt_class_is_applied_to_vcpu_threads_and_restored() {
    let _s = serial();
    if !kvm_or_skip("static_rt_class_is_applied_to_vcpu_threads_and_restored") {
        return;
    }
    // Can this process set real-time classes at all?
    match sched::SchedGuard::apply(0, SchedClass::Fifo(1)) {
        Ok(g) => g.restore().unwrap(),
        Err(e) => {
            pvsched_testutil::skip!("static_rt_class_is_applied_to_vcpu_threads_and_restored: {e}");
            return;
        }
    }
    // Watch the vCPU threads from outside, the way a daemon would: by name.
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::<(i32, sched::SchedAttr)>::new()));
    let watcher = {
        let (stop, seen) = (stop.clone(), seen.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for tid in pvsched_testutil::threads_named("pvsched-vcpu") {
                    if let Ok(a) = sched::get(tid) {
                        seen.lock().unwrap().push((tid, a));
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let mut cfg = config(2, false, Duration::from_millis(500));
    cfg.vcpu_sched = Some(SchedClass::Fifo(10));
    let (out, before, after) = within(Duration::from_secs(30), move || {
        let before = sched::get(0).unwrap();
        let out = experiment::run(&cfg, &AtomicBool::new(false));
        (out, before, sched::get(0).unwrap())
    });
    stop.store(true, Ordering::Relaxed);
    watcher.join().unwrap();
    let out = out.unwrap();
    assert_eq!(out.report.vcpu_sched, "fifo:10");
    assert_eq!(before, after, "the controller thread's class is restored");
    let seen = seen.lock().unwrap();
    let fifo10: std::collections::BTreeSet<i32> = seen
        .iter()
        .filter(|(_, a)| a.policy == libc::SCHED_FIFO as u32 && a.priority == 10)
        .map(|(t, _)| *t)
        .collect();
    let reported: std::collections::BTreeSet<i32> =
        out.report.per_vcpu.iter().map(|v| v.tid).collect();
    assert_eq!(
        fifo10, reported,
        "both vCPU threads were seen at SCHED_FIFO 10"
    );
}

/// The run's controller outranks real-time vCPU threads on a deadline reservation (FIFO one
/// priority above them where the kernel refuses it), so that its wake-ups do not get a
/// boosted vCPU pushed onto another CPU; with nothing real-time it stays in its own class.
#[test]
fn the_controller_outranks_rt_vcpus_on_a_deadline_reservation() {
    let _s = serial();
    if !kvm_or_skip("the_controller_outranks_rt_vcpus_on_a_deadline_reservation") {
        return;
    }
    let out = run(
        config(1, false, Duration::from_millis(300)),
        Duration::from_secs(30),
    );
    assert_eq!(out.report.controller_class, None);
    // Can this process set real-time classes at all?
    match sched::SchedGuard::apply(0, SchedClass::Fifo(1)) {
        Ok(g) => g.restore().unwrap(),
        Err(e @ sched::Error::Permission { .. }) => {
            pvsched_testutil::skip!(
                "the_controller_outranks_rt_vcpus_on_a_deadline_reservation: {e}"
            );
            return;
        }
        Err(e) => panic!("{e}"),
    }
    let mut cfg = config(1, false, Duration::from_millis(300));
    cfg.vcpu_sched = Some(SchedClass::Fifo(10));
    let out = run(cfg, Duration::from_secs(30));
    let c = out
        .report
        .controller_class
        .expect("the controller had to outrank FIFO vCPU threads");
    // The reservation, or FIFO 11 with the kernel's refusal (admission control full, say:
    // a run with deadline boosts keeps its bandwidth booked for a while on this kernel).
    assert!(
        c.starts_with("deadline(") || c.starts_with("fifo:11 (SCHED_DEADLINE refused: "),
        "{c}"
    );
}
