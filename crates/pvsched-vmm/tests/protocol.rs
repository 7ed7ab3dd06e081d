//! The pvsched protocol end to end on real KVM: the testbed guest discovers, negotiates and
//! registers its slots; its requests reach the host with matching counts; mismatches leave
//! it running unboosted; a hostile slot cannot wedge the VMM; lazy requests cost no exit.

use pvsched_guest::mailbox::pv_status;
use pvsched_proto::abi::feature;
use pvsched_proto::negotiate::offer;
use pvsched_proto::BoostState;
use pvsched_testutil::{kvm_or_skip, say, serial, within};
use pvsched_vmm::pvdevice::{PvConfig, PvEvent, PvPoller};
use pvsched_vmm::{GuestConfig, RunningVm, VcpuEnd, VcpuRunStats, Vm, VmConfig};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the host side saw of one run.
#[derive(Debug, Default)]
struct HostView {
    events: Vec<PvEvent>,
    doorbells: Vec<u64>,
    last_seq: Vec<Option<u32>>,
}

/// Runs a VM for `run_for` while a poller collects protocol events; `on_poll` may act as the
/// host engine. Returns the per-vCPU outcomes, the host's view and the stopped VM.
fn run_pv(
    cfg: VmConfig,
    run_for: Duration,
    on_poll: impl FnMut(&RunningVm) + Send + 'static,
) -> (Vec<VcpuRunStats>, HostView, RunningVm) {
    run_pv_until(cfg, run_for, on_poll, |_| false)
}

/// [`run_pv`] that also stops as soon as `done` says so, `run_for` being only the bound (a
/// loaded CI machine runs the emulated guest code several times slower).
fn run_pv_until(
    cfg: VmConfig,
    run_for: Duration,
    mut on_poll: impl FnMut(&RunningVm) + Send + 'static,
    done: impl Fn(&RunningVm) -> bool + Send + 'static,
) -> (Vec<VcpuRunStats>, HostView, RunningVm) {
    within(Duration::from_secs(60), move || {
        let mut vm = Vm::new(&cfg).expect("create VM").start().expect("start VM");
        let mut view = HostView {
            doorbells: vec![0; cfg.vcpus],
            last_seq: vec![None; cfg.vcpus],
            ..HostView::default()
        };
        let mut poller = vm
            .take_pv_events()
            .map(|rx| PvPoller::new(vm.pv_device().unwrap(), rx).unwrap());
        vm.go();
        let t0 = Instant::now();
        let mut collect = |vm: &RunningVm, view: &mut HostView, timeout| {
            let (Some(p), Some(dev)) = (poller.as_mut(), vm.pv_device()) else {
                std::thread::sleep(timeout);
                return;
            };
            let mut out = Vec::new();
            p.poll(dev, timeout, &mut out).unwrap();
            for e in out {
                match &e {
                    PvEvent::Doorbell { vcpu, count } => view.doorbells[*vcpu] += count,
                    PvEvent::RequestChanged { vcpu, snapshot } => {
                        view.last_seq[*vcpu] = Some(snapshot.seq)
                    }
                    _ => {}
                }
                view.events.push(e);
            }
        };
        while t0.elapsed() < run_for && !vm.any_finished() && !done(&vm) {
            collect(&vm, &mut view, Duration::from_millis(5));
            on_poll(&vm);
        }
        let out = vm.shutdown(Duration::from_millis(500));
        collect(&vm, &mut view, Duration::from_millis(1));
        let stats = out
            .into_iter()
            .map(|o| o.expect("vCPU ran cleanly"))
            .collect();
        (stats, view, vm)
    })
}

fn pv_vm(vcpus: usize, guest: GuestConfig, pv: Option<PvConfig>) -> VmConfig {
    VmConfig { vcpus, guest, pv }
}

#[test]
fn guest_requests_reach_the_host_with_matching_counts() {
    let _s = serial();
    if !kvm_or_skip("guest_requests_reach_the_host_with_matching_counts") {
        return;
    }
    let cfg = pv_vm(2, GuestConfig::default(), Some(PvConfig::default()));
    let (stats, view, vm) = run_pv(cfg, Duration::from_millis(800), |_| {});
    let negotiated: Vec<_> = view
        .events
        .iter()
        .filter_map(|e| match e {
            PvEvent::Negotiated { result, .. } => Some(*result),
            _ => None,
        })
        .collect();
    assert!(!negotiated.is_empty());
    for n in negotiated {
        let n = n.expect("version negotiated");
        assert_eq!((n.version, n.features), (1, feature::ALL_V1));
    }
    let dev = vm.pv_device().unwrap();
    for (i, s) in stats.iter().enumerate() {
        assert_eq!(s.end, VcpuEnd::GuestDone);
        let m = vm.mailbox(i).unwrap();
        assert_eq!(m.pv_status, pv_status::ENABLED);
        assert!(m.pv_requests > 100, "vCPU {i}: {} requests", m.pv_requests);
        assert!(dev.slot_gpa(i).is_some());
        // Every doorbell the guest rang reached the host, and nothing else did.
        assert_eq!(
            view.doorbells[i],
            m.pv_boost_rings + m.pv_unboost_rings,
            "vCPU {i}"
        );
        // The host's last snapshot is the guest's final slot state.
        let snap = dev.snapshot(i).unwrap().unwrap();
        assert_eq!(view.last_seq[i], Some(snap.seq), "vCPU {i}");
        // Every request and release bumped seq once: enter + exit hooks.
        assert_eq!(snap.seq as u64, 2 * m.pv_requests, "vCPU {i}");
        assert!(snap.reasons.is_empty(), "no request left over");
        assert!(snap.deadline_tsc.is_some(), "deadline hint published");
    }
}

#[test]
fn version_mismatch_leaves_the_guest_running_unboosted() {
    let _s = serial();
    if !kvm_or_skip("version_mismatch_leaves_the_guest_running_unboosted") {
        return;
    }
    // Host offers only a future version 2; then the guest offers only version 2.
    let host_v2 = PvConfig {
        versions: 1 << 2,
        ..PvConfig::default()
    };
    let guest_v2 = GuestConfig {
        pv_offer: offer(1 << 2, feature::ALL_V1),
        ..GuestConfig::default()
    };
    for (guest, pv) in [
        (GuestConfig::default(), host_v2),
        (guest_v2, PvConfig::default()),
    ] {
        let (stats, view, vm) = run_pv(
            pv_vm(1, guest, Some(pv)),
            Duration::from_millis(300),
            |_| {},
        );
        let m = vm.mailbox(0).unwrap();
        assert_eq!(m.pv_status, pv_status::NO_VERSION);
        assert_eq!(m.pv_answer, 0);
        assert_eq!(stats[0].end, VcpuEnd::GuestDone);
        assert!(
            m.ring_head > 100,
            "the guest kept measuring: {} samples",
            m.ring_head
        );
        assert_eq!(view.doorbells[0], 0);
        assert_eq!(m.pv_requests, 0);
        assert!(vm.pv_device().unwrap().slot_gpa(0).is_none());
        assert!(view
            .events
            .iter()
            .any(|e| matches!(e, PvEvent::Negotiated { result: None, .. })));
    }
    // No device at all: the guest finds no signature and runs as well.
    let (stats, _, vm) = run_pv(
        pv_vm(1, GuestConfig::default(), None),
        Duration::from_millis(300),
        |_| {},
    );
    assert_eq!(vm.mailbox(0).unwrap().pv_status, pv_status::NOT_FOUND);
    assert_eq!(stats[0].end, VcpuEnd::GuestDone);
}

#[test]
fn garbage_in_a_slot_cannot_crash_or_wedge_the_vmm() {
    let _s = serial();
    if !kvm_or_skip("garbage_in_a_slot_cannot_crash_or_wedge_the_vmm") {
        return;
    }
    // A hostile guest's slot: random bytes land in it (both halves) while the guest runs,
    // the host polls, decodes and publishes.
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let cfg = pv_vm(2, GuestConfig::default(), Some(PvConfig::default()));
    let (stats, view, vm) = run_pv(cfg, Duration::from_millis(800), move |vm| {
        if flag.load(Ordering::Relaxed) {
            return;
        }
        let Some(dev) = vm.pv_device() else { return };
        if let Some(gpa) = dev.slot_gpa(1) {
            for _ in 0..16 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                vm.scribble(gpa + ((x % 128) & !7), x);
            }
            // The host keeps acting on the slot too.
            let _ = dev.publish(1, BoostState::Normal);
        }
    });
    stop.store(true, Ordering::Relaxed);
    assert_eq!(stats.len(), 2);
    for s in &stats {
        assert_eq!(
            s.end,
            VcpuEnd::GuestDone,
            "guest finished and the VMM stopped it cleanly"
        );
    }
    assert!(
        view.events
            .iter()
            .any(|e| matches!(e, PvEvent::BadSlot { vcpu: 1, .. })),
        "the decoder rejected the garbage"
    );
    // vCPU 0 was left alone and still reports cleanly.
    assert!(!view
        .events
        .iter()
        .any(|e| matches!(e, PvEvent::BadSlot { vcpu: 0, .. })));
    assert_eq!(vm.mailbox(0).unwrap().pv_status, pv_status::ENABLED);
}

/// Runs the lazy-request exercise; with `boost`, the host boosts the vCPU when its RT request
/// arrives. Returns (exits between the marks, quiet requests, total doorbells).
fn exercise(boost: bool, iters: u64) -> (u64, u64, u64) {
    let guest = GuestConfig {
        pv_exercise: Some(iters),
        task: None,
        interval: Duration::from_millis(100),
        ..GuestConfig::default()
    };
    let mut boosted = false;
    let (stats, view, vm) = run_pv_until(
        pv_vm(1, guest, Some(PvConfig::default())),
        Duration::from_secs(20),
        move |vm| {
            let dev = vm.pv_device().unwrap();
            let in_exercise = vm.mailbox(0).unwrap().state < pvsched_guest::mailbox::state::RUNNING;
            if let (true, Ok(Some(s))) = (boost, dev.snapshot(0)) {
                let want = in_exercise && !s.reasons.is_empty();
                if want != boosted {
                    boosted = want;
                    let st = if want {
                        BoostState::Boosted
                    } else {
                        BoostState::Normal
                    };
                    dev.publish(0, st);
                }
            }
        },
        // The exercise is over once the guest has moved on to measuring.
        |vm| vm.mailbox(0).unwrap().state >= pvsched_guest::mailbox::state::RUNNING,
    );
    let m = vm.mailbox(0).unwrap();
    let marks = &stats[0].marks;
    assert_eq!(marks.len(), 2, "both marks reached: {marks:?}");
    (marks[1].1 - marks[0].1, m.pv_quiet, view.doorbells[0])
}

#[test]
fn requests_while_boosted_cause_no_exits() {
    let _s = serial();
    if !kvm_or_skip("requests_while_boosted_cause_no_exits") {
        return;
    }
    const N: u64 = 2000;
    let (lazy_exits, quiet, lazy_rings) = exercise(true, N);
    let (control_exits, _, control_rings) = exercise(false, N);
    // Boosted: all N requests were lazy (no doorbell; the guest's interrupt-time requests
    // are lazy by design and count as quiet too); unboosted: each one rang.
    assert!(
        quiet >= N,
        "every request while boosted was lazy: {quiet} quiet"
    );
    assert!(lazy_rings < N / 10, "{lazy_rings} doorbells while boosted");
    assert!(
        control_rings >= N,
        "{control_rings} doorbells in the control run"
    );
    say!(
        "note: KVM 'exits' between the marks: {lazy_exits} with {N} lazy requests, \
         {control_exits} with {N} doorbells"
    );
    if control_exits >= N {
        // This KVM counts doorbell writes as exits: the lazy window must have none of them.
        assert!(
            lazy_exits < N / 10,
            "{lazy_exits} exits for {N} lazy requests"
        );
    } else {
        say!(
            "note: this KVM does not count ioeventfd writes in its 'exits' statistic (PVM \
             runs guest kernel code in its emulator); the doorbell count shows the lazy \
             requests rang nothing"
        );
        assert!(lazy_exits <= control_exits + N / 100);
    }
}
