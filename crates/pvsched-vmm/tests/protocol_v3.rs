//! The pvsched v3 page end to end on real KVM: the testbed guest (`--pv v3`) registers its
//! page through the reference VMM, reads each negotiation status from it, and, enabled,
//! publishes task intent and critical sections that the `v3-default` driver turns into the
//! vCPU thread's class, seen from outside with `sched_getattr`.

use pvsched_guest::mailbox::{pv_status, V3_PAGE_OFFSET};
use pvsched_host::sched::{self, SchedClass};
use pvsched_policy::DriverOptions;
use pvsched_proto::v3::{self, Request, Status};
use pvsched_testutil::{kvm_or_skip, say, serial, skip, within};
use pvsched_vmm::engine::VmEngine;
use pvsched_vmm::layout::vcpu_region;
use pvsched_vmm::pvdevice::PvConfig;
use pvsched_vmm::{GuestConfig, RunningVm, TaskConfig, VcpuEnd, Vm, VmConfig, V3_PV_OFFER};
use std::time::{Duration, Instant};

fn page() -> u64 {
    vcpu_region(0) + V3_PAGE_OFFSET
}

fn v3_vm(task: Option<TaskConfig>) -> VmConfig {
    VmConfig {
        vcpus: 1,
        guest: GuestConfig {
            interval: Duration::from_millis(1),
            task,
            pv_offer: V3_PV_OFFER,
            ..GuestConfig::default()
        },
        pv: Some(PvConfig::default()),
    }
}

/// Writes the bytes `b` into guest memory at `gpa` (8-byte aligned, whole words).
fn write_bytes(vm: &RunningVm, gpa: u64, b: &[u8]) {
    for (i, w) in b.chunks(8).enumerate() {
        let mut word = [0u8; 8];
        word[..w.len()].copy_from_slice(w);
        vm.scribble(gpa + 8 * i as u64, u64::from_le_bytes(word));
    }
}

/// Starts a 1-vCPU v3 guest whose page holds `prepare`'s bytes before it runs, lets it run
/// 300 ms, and returns (page status, guest's pv_status, how the vCPU ended).
fn negotiate_with(prepare: impl FnOnce(&mut [u8; v3::PAGE_SIZE])) -> (u32, u64, VcpuEnd) {
    let mut p = [0u8; v3::PAGE_SIZE];
    prepare(&mut p);
    within(Duration::from_secs(30), move || {
        let mut vm = Vm::new(&v3_vm(None))
            .expect("create VM")
            .start()
            .expect("start VM");
        write_bytes(&vm, page(), &p);
        vm.go();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_millis(300) && !vm.any_finished() {
            std::thread::sleep(Duration::from_millis(10));
        }
        let status = vm.peek(page() + v3::off::STATUS as u64).unwrap() as u32;
        let m = vm.mailbox(0).unwrap();
        let out = vm.shutdown(Duration::from_millis(500));
        let end = out
            .into_iter()
            .next()
            .unwrap()
            .expect("vCPU ran cleanly")
            .end;
        (status, m.pv_status, end)
    })
}

/// How a case prepares the page before the guest runs.
type Prepare = Box<dyn FnOnce(&mut [u8; v3::PAGE_SIZE])>;

#[test]
fn every_negotiation_status_reaches_the_guest_page() {
    let _s = serial();
    if !kvm_or_skip("every_negotiation_status_reaches_the_guest_page") {
        return;
    }
    let with = |f: fn(&mut Request)| {
        move |p: &mut [u8; v3::PAGE_SIZE]| {
            let mut r = Request::default_policy();
            f(&mut r);
            r.write(p);
        }
    };
    // An untouched page: the guest writes the default request itself.
    let (status, pv, end) = negotiate_with(|_| {});
    assert_eq!(status, Status::Enabled as u32);
    assert_eq!(pv, pv_status::ENABLED_V3);
    assert_eq!(end, VcpuEnd::GuestDone);
    let cases: [(&str, Prepare, Status); 11] = [
        (
            "ABI 2",
            Box::new(with(|r| r.abi_version = 2)),
            Status::AbiMismatch,
        ),
        (
            "policy 'other'",
            Box::new(with(|r| {
                r.policy_name = [0; v3::NAME_MAX];
                r.policy_name[..5].copy_from_slice(b"other");
            })),
            Status::UnknownPolicy,
        ),
        (
            "policy version 2",
            Box::new(with(|r| r.policy_version = 2)),
            Status::PolicyVersionMismatch,
        ),
        (
            "custom protocol",
            Box::new(with(|r| r.protocol_id = v3::protocol::CUSTOM)),
            Status::ProtocolMismatch,
        ),
        (
            "policy mode",
            Box::new(with(|r| r.requested_mode = v3::mode::POLICY)),
            Status::ModeMismatch,
        ),
        (
            "unterminated name",
            Box::new(with(|r| r.policy_name = [b'x'; v3::NAME_MAX])),
            Status::Disabled,
        ),
        (
            "garbage after the name's terminator",
            Box::new(with(|r| r.policy_name[9] = b'x')),
            Status::Disabled,
        ),
        (
            "reserved cs_state bit",
            Box::new(|p: &mut [u8; v3::PAGE_SIZE]| {
                Request::default_policy().write(p);
                p[v3::off::CS_STATE + 2] = 1;
            }),
            Status::Disabled,
        ),
        (
            "reserved guest byte",
            Box::new(|p: &mut [u8; v3::PAGE_SIZE]| {
                Request::default_policy().write(p);
                p[v3::off::GUEST_RESERVED + 17] = 0x5a;
            }),
            Status::Disabled,
        ),
        (
            "extension byte",
            Box::new(|p: &mut [u8; v3::PAGE_SIZE]| {
                Request::default_policy().write(p);
                p[v3::PAGE_SIZE - 8] = 1;
            }),
            Status::Disabled,
        ),
        (
            "stale acknowledgement",
            Box::new(|p: &mut [u8; v3::PAGE_SIZE]| {
                Request::default_policy().write(p);
                p[v3::off::INTERRUPT_ACK] = 9;
            }),
            Status::Disabled,
        ),
    ];
    for (name, prepare, want) in cases {
        let (status, pv, end) = negotiate_with(prepare);
        assert_eq!(status, want as u32, "{name}");
        assert_eq!(
            pv,
            pv_status::V3_REFUSED,
            "{name}: the guest saw the refusal"
        );
        assert_eq!(
            end,
            VcpuEnd::GuestDone,
            "{name}: the guest ran on, unboosted"
        );
    }
}

#[test]
fn an_idle_v3_guest_runs_at_sched_idle_and_rt_work_lifts_it() {
    let name = "an_idle_v3_guest_runs_at_sched_idle_and_rt_work_lifts_it";
    let _s = serial();
    if !kvm_or_skip(name) {
        return;
    }
    let probe = std::thread::spawn(|| std::thread::sleep(Duration::from_millis(50)));
    let me = sched::get(0).expect("own attributes");
    if let Err(sched::Error::Permission { .. }) = sched::set(0, &SchedClass::Fifo(1).attr()) {
        skip!("{name}: no permission for SCHED_FIFO");
        return;
    }
    sched::set(0, &me).expect("restore own attributes");
    drop(probe);
    within(Duration::from_secs(60), move || {
        // A deadline task of 2 ms every 10 ms: RT work ~20 % of the time, idle otherwise.
        let mut vm = Vm::new(&v3_vm(Some(TaskConfig {
            period: Duration::from_millis(10),
            work: Duration::from_millis(2),
        })))
        .expect("create VM")
        .start()
        .expect("start VM");
        let tid = vm.tids()[0];
        let original = sched::get(tid).unwrap();
        // External interrupts the VMM injects: host boosts with a ticket the guest echoes.
        let irq = vm
            .injector(0, pvsched_guest::image::EVENT_VECTOR)
            .expect("injector");
        let engine = VmEngine::start(
            &mut vm,
            "v3-default",
            &DriverOptions::new(),
            None,
            Default::default(),
        )
        .expect("engine");
        vm.go();
        let (mut idle, mut fifo, mut other) = (0u32, 0u32, 0u32);
        let t0 = Instant::now();
        let mut n = 0u32;
        while t0.elapsed() < Duration::from_millis(1500) && !vm.any_finished() {
            n += 1;
            if n.is_multiple_of(16) {
                irq.inject().expect("inject");
            }
            let a = sched::get(tid).unwrap();
            match a.policy as i32 {
                libc::SCHED_IDLE => idle += 1,
                // sched_getattr reads the policy and the priority without the runqueue lock: a
                // change from SCHED_IDLE to FIFO can be seen half done (FIFO, priority 0, which
                // no thread can be given). Seen once in CI; such a sample is not counted.
                libc::SCHED_FIFO if a.priority == 0 => {}
                libc::SCHED_FIFO => {
                    // The guest's FIFO 50 task (capped at 50), or a critical section or host
                    // interrupt at 60.
                    assert!(matches!(a.priority, 50 | 60), "FIFO {}", a.priority);
                    fifo += 1
                }
                _ => other += 1,
            }
            std::thread::sleep(Duration::from_micros(300));
        }
        let m = vm.mailbox(0).unwrap();
        say!(
            "note: vCPU thread sampled SCHED_IDLE {idle}, SCHED_FIFO {fifo}, other {other} \
             times; guest: {} jobs, {} tickets echoed",
            m.jobs_done,
            m.pv_acks
        );
        assert_eq!(m.pv_status, pv_status::ENABLED_V3);
        assert!(idle > 0, "deboosted while idle");
        assert!(fifo > 0, "boosted while the RT task runs");
        let (status, _) = engine.stop();
        assert!(status.unrestored.is_empty());
        let v = &status.vms[0].vcpus[0];
        say!(
            "note: tickets issued {}, echoed {} (guest counted {}); deboosted {:.0} ms",
            v.tickets[0],
            v.tickets[1],
            m.pv_acks,
            v.deboosted_ms
        );
        assert!(m.pv_acks > 0, "the guest echoed tickets");
        assert!(v.tickets[1] > 0 && v.tickets[1] <= v.tickets[0]);
        assert!(v.deboosted_ms > 0.0);
        assert_eq!(
            sched::get(tid).unwrap(),
            original,
            "the original class once pvsched stops"
        );
        vm.shutdown(Duration::from_millis(500));
    });
}
