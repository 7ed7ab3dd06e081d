//! A vCPU thread id that the kernel gives to a new thread after the vCPU exited is never
//! touched by the daemon's applier: not boosted, not "restored".
//!
//! The reuse is made to happen: after the first process exits, the test writes its pid − 1 to
//! `/proc/sys/kernel/ns_last_pid` (what checkpoint/restore tools do) so that the next process
//! gets the same id.

use pvsched_host::runtime::{
    Applier, KernelApplier, Runtime, RuntimeConfig, VerifiedApplier, VmParts,
};
use pvsched_host::sched::{self, SchedClass};
use pvsched_policy::{DriverOptions, VcpuKey};
use std::process::{Child, Command};
use std::sync::Arc;

const TEST: &str = "a_reused_thread_id_is_never_touched";

fn sleeper() -> Child {
    Command::new("sleep")
        .arg("60")
        .spawn()
        .expect("spawn sleep")
}

fn end(mut c: Child) {
    let _ = c.kill();
    let _ = c.wait();
}

/// Starts a process with id `pid` (which must be free). `Ok(None)`: the capability to choose
/// the next pid is missing (the reason is printed).
fn process_with_pid(pid: u32) -> Result<Option<Child>, String> {
    for _ in 0..200 {
        match std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::NotFound
                ) =>
            {
                pvsched_testutil::skip!(
                    "{TEST}: cannot choose the next pid (/proc/sys/kernel/ns_last_pid: {e})"
                );
                return Ok(None);
            }
            Err(e) => return Err(format!("ns_last_pid: {e}")),
        }
        let c = sleeper();
        if c.id() == pid {
            return Ok(Some(c));
        }
        // Another process of the host took the id first: try again.
        end(c);
    }
    Err(format!("pid {pid} could not be reused in 200 tries"))
}

fn opts(words: &[&str]) -> DriverOptions {
    DriverOptions::parse(words.iter().copied()).unwrap()
}

#[test]
fn a_reused_thread_id_is_never_touched() {
    if let Err(e) = sched::SchedGuard::apply(0, SchedClass::Fifo(1)).and_then(|g| g.restore()) {
        pvsched_testutil::skip!("{TEST}: {e}");
        return;
    }
    // The "vCPU": a process (its one thread's id is its pid) attached to a daemon-style
    // runtime that boosts it statically.
    let vcpu = sleeper();
    let tid = vcpu.id() as i32;
    let applier = Arc::new(VerifiedApplier::default());
    let rt = Runtime::start(RuntimeConfig {
        applier: applier.clone(),
        ..RuntimeConfig::default()
    })
    .unwrap();
    let h = rt.handle();
    h.add_vm(
        0,
        "static",
        &opts(&["class=fifo:3"]),
        VmParts {
            publisher: None,
            sources: Vec::new(),
        },
    )
    .unwrap();
    let key = VcpuKey::new(0, 0);
    h.add_vcpu(key, tid, false).unwrap();
    assert_eq!(sched::get(tid).unwrap().policy, libc::SCHED_FIFO as u32);
    // The vCPU exits; a stranger gets its id, at nice 7.
    end(vcpu);
    let stranger = match process_with_pid(tid as u32) {
        Ok(Some(c)) => c,
        Ok(None) => {
            rt.stop();
            return;
        }
        Err(e) => panic!("{e}"),
    };
    sched::set(tid, &SchedClass::Nice(7).attr()).unwrap();
    let strangers = sched::get(tid).unwrap();
    // Neither a boost nor the vCPU's restore reaches the stranger.
    assert!(matches!(
        applier.set(tid, &SchedClass::Fifo(3).attr()),
        Err(sched::Error::NoThread { .. })
    ));
    assert!(matches!(
        applier.get(tid),
        Err(sched::Error::NoThread { .. })
    ));
    h.remove_vcpu(key).unwrap();
    let st = rt.stop();
    assert_eq!(
        sched::get(tid).unwrap(),
        strangers,
        "the stranger keeps its own class: {:?}",
        st.errors
    );
    // Negative control: the plain kernel applier, which trusts the id, does change it.
    KernelApplier
        .set(tid, &SchedClass::Fifo(3).attr())
        .expect("the id names the stranger now");
    assert_eq!(sched::get(tid).unwrap().policy, libc::SCHED_FIFO as u32);
    end(stranger);
}

#[test]
fn a_live_thread_is_recognised() {
    let me = pvsched_testutil::ParkedThread::spawn();
    let h = sched::ThreadHandle::open(me.tid()).unwrap();
    assert!(h.alive());
    assert_eq!(h.tid(), me.tid());
    assert!(matches!(
        sched::ThreadHandle::open(0),
        Err(sched::Error::NoThread { tid: 0 })
    ));
    let tid = me.tid();
    drop(me);
    // The parked thread has been joined: gone (the kernel releases it just after the join
    // returns), whatever its id becomes later.
    let t0 = std::time::Instant::now();
    while h.alive() {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(5),
            "still alive"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert!(matches!(
        h.set(&SchedClass::Other.attr()),
        Err(sched::Error::NoThread { .. })
    ));
    let _ = tid;
}
