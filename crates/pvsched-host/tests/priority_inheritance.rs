//! A vCPU thread preempted while it holds the runtime's core must not hold up the engine
//! thread: real threads, real scheduling classes (skipped without the right to use them).
//!
//! The setting that made it happen on the development machine: an unboosted vCPU thread ran
//! the engine for itself at an exit and was preempted inside, by its sibling's real-time
//! boost on the same CPU, for a scheduler tick (10 ms); the engine thread then waited for the
//! core, and the boost it was to end by its budget ran on. Here a real-time "hog" preempts a
//! normal vCPU thread while that thread publishes a boost state under the core; the engine
//! thread must still apply a boost to another thread at once (it inherits the holder's place
//! in the queue, so the holder finishes first), not when the hog stops.

use pvsched_host::clock::{mono_ns, thread_cpu_ns};
use pvsched_host::runtime::{EventSource, KernelApplier, Runtime, RuntimeConfig, VmParts};
use pvsched_host::sched::{self, SchedClass};
use pvsched_host::Publisher;
use pvsched_policy::{BoostState, DriverOptions, Event, Nanos, Reasons, VcpuEvent, VcpuKey};
use pvsched_proto::abi::Reason;
use pvsched_testutil::{skip, ParkedThread};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::EventFd;

const V: VcpuKey = VcpuKey { vm: 0, vcpu: 0 };
const W: VcpuKey = VcpuKey { vm: 0, vcpu: 1 };
/// How long the hog keeps the CPU of the thread holding the core.
const HOG: Duration = Duration::from_millis(600);

fn gettid() -> i32 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::gettid() }
}

/// Events sent by the test, readable through an eventfd.
struct Feed {
    rx: mpsc::Receiver<Event>,
    efd: EventFd,
}

impl EventSource for Feed {
    fn name(&self) -> &str {
        "test"
    }
    fn fd(&self) -> Option<RawFd> {
        Some(self.efd.as_raw_fd())
    }
    fn drain(&mut self, _now: Nanos, out: &mut Vec<Event>) -> Option<Nanos> {
        let _ = self.efd.read();
        out.extend(self.rx.try_iter());
        None
    }
}

/// The test's end of a [`Feed`].
#[derive(Clone)]
struct Sender {
    tx: mpsc::Sender<Event>,
    efd: Arc<EventFd>,
}

impl Sender {
    fn send(&self, e: Event) {
        self.tx.send(e).unwrap();
        self.efd.write(1).unwrap();
    }
}

/// Spins (on the CPU, not sleeping) inside `publish` while `armed`, for 3 ms of the calling
/// thread's CPU time, with `holding` set meanwhile: the core is held that long.
struct SlowPublisher {
    armed: Arc<AtomicBool>,
    holding: Arc<AtomicBool>,
}

impl Publisher for SlowPublisher {
    fn publish(&mut self, _: VcpuKey, _: BoostState) -> Option<u32> {
        if self.armed.swap(false, Ordering::AcqRel) {
            self.holding.store(true, Ordering::Release);
            let t0 = thread_cpu_ns();
            while thread_cpu_ns().saturating_sub(t0) < 3_000_000 {
                std::hint::spin_loop();
            }
            self.holding.store(false, Ordering::Release);
        }
        None
    }
}

#[test]
fn a_vcpu_thread_preempted_inside_the_engine_does_not_hold_up_the_engine_thread() {
    let name = "a_vcpu_thread_preempted_inside_the_engine_does_not_hold_up_the_engine_thread";
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        skip!("{name}: needs 2 CPUs");
        return;
    }
    let probe = ParkedThread::spawn();
    match sched::set(probe.tid(), &SchedClass::Fifo(1).attr()) {
        Err(sched::Error::Permission { .. }) => {
            skip!("{name}: no permission for SCHED_FIFO");
            return;
        }
        r => r.unwrap(),
    }
    drop(probe);

    let armed = Arc::new(AtomicBool::new(false));
    let holding = Arc::new(AtomicBool::new(false));
    // The test (and the engine thread it starts) on CPU 1, the holder and the hog on CPU 0.
    pvsched_host::sched::set_affinity(gettid(), &[1]).unwrap();
    let (tx, rx) = mpsc::channel();
    let efd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let feed = Sender {
        tx,
        efd: Arc::new(efd.try_clone().unwrap()),
    };
    let rt = Runtime::start(RuntimeConfig {
        applier: Arc::new(KernelApplier),
        sources: vec![Box::new(Feed { rx, efd })],
        quiet_gate: None,
        max_boosted: None,
        ..RuntimeConfig::default()
    })
    .unwrap();
    let h = rt.handle();
    let opts = DriverOptions::parse([
        "class_cs=fifo:10",
        "irq_hold=50ms",
        "cs_budget=10s",
        "rt_budget=10s",
        "repay=off",
    ])
    .unwrap();
    h.add_vm(
        0,
        "dynamic",
        &opts,
        VmParts {
            publisher: Some(Box::new(SlowPublisher {
                armed: armed.clone(),
                holding: holding.clone(),
            })),
            sources: Vec::new(),
        },
    )
    .unwrap();

    // W: a thread the engine thread boosts; its first boost also raises the engine thread
    // above fifo:10.
    let w = ParkedThread::spawn();
    let _w = h.add_vcpu(W, w.tid(), false).unwrap();
    let is_fifo = |tid: i32| sched::get(tid).unwrap().policy == libc::SCHED_FIFO as u32;
    feed.send(Event::new(W, VcpuEvent::Interrupt));
    let t0 = Instant::now();
    while !is_fifo(w.tid()) && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_micros(200));
    }
    assert!(is_fifo(w.tid()), "first boost of W");
    while is_fifo(w.tid()) && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_micros(200));
    }
    assert!(!is_fifo(w.tid()), "W unboosted after its hold");

    // V: a normal vCPU thread on CPU 0 that runs the engine for itself and publishes under
    // the core (slowly); the hog, real-time on CPU 0, preempts it there.
    let (tid_tx, tid_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<pvsched_host::VcpuHandle>();
    let v_armed = armed.clone();
    let v = std::thread::spawn(move || {
        pvsched_host::sched::set_affinity(gettid(), &[0]).unwrap();
        tid_tx.send(gettid()).unwrap();
        let mut handle = go_rx.recv().unwrap();
        v_armed.store(true, Ordering::Release);
        let irq = Reasons::NONE.with(Reason::Irq);
        while !handle.handle(mono_ns(), &[VcpuEvent::Request(irq)]) {
            std::thread::yield_now();
        }
        handle
    });
    let v_tid = tid_rx.recv().unwrap();
    let hog_holding = holding.clone();
    let (sent_tx, sent_rx) = mpsc::channel();
    let hog_feed = feed.clone();
    let hog = std::thread::spawn(move || {
        pvsched_host::sched::set_affinity(gettid(), &[0]).unwrap();
        sched::set(gettid(), &SchedClass::Fifo(5).attr()).unwrap();
        while !hog_holding.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_micros(50));
        }
        // V holds the core and is preempted now: ask the engine thread for W's boost.
        hog_feed.send(Event::new(W, VcpuEvent::Interrupt));
        sent_tx.send(Instant::now()).unwrap();
        let t = Instant::now();
        while t.elapsed() < HOG {
            std::hint::spin_loop();
        }
    });
    go_tx.send(h.add_vcpu(V, v_tid, true).unwrap()).unwrap();
    let sent = sent_rx.recv().unwrap();
    while !is_fifo(w.tid()) && sent.elapsed() < 2 * HOG {
        std::thread::sleep(Duration::from_micros(200));
    }
    let took = sent.elapsed();
    let boosted = is_fifo(w.tid());
    hog.join().unwrap();
    let _v = v.join().unwrap();
    assert!(boosted, "W boosted at all");
    assert!(
        took < HOG / 3,
        "the engine thread waited {took:?} for the core held by a preempted vCPU thread \
         (the hog ran {HOG:?})"
    );
    drop(rt);
    assert!(!is_fifo(w.tid()), "W restored");
    // SAFETY: cpu_set_t is plain data: filled with every CPU, then read by the kernel.
    unsafe {
        let mut all: libc::cpu_set_t = std::mem::zeroed();
        for cpu in 0..libc::CPU_SETSIZE as usize {
            libc::CPU_SET(cpu, &mut all);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &all);
    }
}
