//! The engine runtime driven by fake sources and a fake applier: no KVM, no privileges, real
//! threads and real time.

use pvsched_host::clock::mono_ns;
use pvsched_host::mechanism::EngineClass;
use pvsched_host::pressure::QuietGate;
use pvsched_host::runtime::{
    Applier, EventSource, Runtime, RuntimeConfig, RuntimeError, RuntimeHandle, VmParts,
};
use pvsched_host::sched::{self, SchedAttr, SchedClass};
use pvsched_host::Publisher;
use pvsched_policy::{BoostState, DriverOptions, Event, Nanos, Reasons, VcpuEvent, VcpuKey};
use pvsched_proto::abi::Reason;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::EventFd;

/// Thread attributes kept in memory; every `set` is logged with the calling thread.
#[derive(Default)]
struct FakeKernel {
    attrs: Mutex<HashMap<i32, SchedAttr>>,
    log: Mutex<Vec<(i32, SchedAttr, i32)>>,
    /// While set, a thread that changes its own attributes stays "preempted" inside the
    /// call after the change took effect (as a thread lowering itself often is).
    stall_own: AtomicBool,
    stalled: AtomicBool,
    /// While set, a change of another thread's attributes is held up *before* it takes
    /// effect (a caller preempted on its way into the kernel): it lands late.
    stall_remote: AtomicBool,
    remote_stalled: AtomicBool,
    /// Changes held up by `stall_remote` so far.
    remote_stalls: AtomicU64,
    /// While set, a thread's change of its own attributes is held up *before* it takes
    /// effect (its call overtaken by another thread's).
    hold_own: AtomicBool,
    own_held: AtomicBool,
    /// Changes of a thread the kernel refuses next: how many, with which errno.
    refuse: Mutex<HashMap<i32, (u32, i32)>>,
    /// While set, every `SCHED_DEADLINE` change is refused (`EBUSY`: admission control full).
    refuse_deadline: AtomicBool,
}

fn gettid() -> i32 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::gettid() }
}

/// How long a fake stall holds a thread at most: a test that fails (or hangs) while a stall
/// is set then fails with a message instead of hanging every thread that changes a class.
const STALL_LIMIT: Duration = Duration::from_secs(10);

/// Holds the calling thread while `flag` is set, at most [`STALL_LIMIT`] (then panics, which
/// the runtime's threads report and the test sees as a failure).
fn held_while(flag: &AtomicBool) {
    let t0 = Instant::now();
    while flag.load(Ordering::Acquire) {
        if t0.elapsed() > STALL_LIMIT {
            flag.store(false, Ordering::Release);
            panic!("a fake kernel stall was never released: the test failed while it was set");
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// Calls `v.handle(now, events)` at "exits" until the engine takes it (the core is free),
/// for at most 5 s.
fn handle_until_taken(
    v: &mut pvsched_host::VcpuHandle,
    mut now: impl FnMut() -> u64,
    events: &[VcpuEvent],
) {
    let t0 = Instant::now();
    while !v.handle(now(), events) {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the engine's core stayed busy for 5 s"
        );
        std::thread::yield_now();
    }
}

impl FakeKernel {
    fn attr(&self, tid: i32) -> SchedAttr {
        self.attrs
            .lock()
            .unwrap()
            .get(&tid)
            .copied()
            .unwrap_or_else(|| SchedClass::Other.attr())
    }
    fn is_fifo(&self, tid: i32) -> bool {
        self.attr(tid).policy == libc::SCHED_FIFO as u32
    }
    /// The classes `tid` was put in, in order: true for FIFO.
    fn history(&self, tid: i32) -> Vec<bool> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, ..)| *t == tid)
            .map(|(_, a, _)| a.policy == libc::SCHED_FIFO as u32)
            .collect()
    }
    fn sets_by(&self, target: i32, caller: i32) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _, c)| *t == target && *c == caller)
            .count()
    }
}

impl Applier for FakeKernel {
    fn get(&self, tid: i32) -> Result<SchedAttr, sched::Error> {
        if tid == 666 {
            return Err(sched::Error::NoThread { tid });
        }
        Ok(self.attr(tid))
    }
    fn set(&self, tid: i32, attr: &SchedAttr) -> Result<(), sched::Error> {
        if attr.is_deadline() && self.refuse_deadline.load(Ordering::Acquire) {
            return Err(sched::Error::Set {
                tid,
                class: attr.to_string(),
                source: std::io::Error::from_raw_os_error(libc::EBUSY),
            });
        }
        if let Some((n, errno)) = self.refuse.lock().unwrap().get_mut(&tid) {
            if *n > 0 {
                *n -= 1;
                return Err(match *errno {
                    libc::EPERM => sched::Error::Permission {
                        tid,
                        class: attr.to_string(),
                    },
                    e => sched::Error::Set {
                        tid,
                        class: attr.to_string(),
                        source: std::io::Error::from_raw_os_error(e),
                    },
                });
            }
        }
        if tid == gettid() && self.hold_own.load(Ordering::Acquire) {
            self.own_held.store(true, Ordering::Release);
            held_while(&self.hold_own);
            self.own_held.store(false, Ordering::Release);
        }
        if tid != gettid() && self.stall_remote.load(Ordering::Acquire) {
            self.remote_stalls.fetch_add(1, Ordering::AcqRel);
            self.remote_stalled.store(true, Ordering::Release);
            held_while(&self.stall_remote);
            self.remote_stalled.store(false, Ordering::Release);
        }
        self.attrs.lock().unwrap().insert(tid, *attr);
        self.log.lock().unwrap().push((tid, *attr, gettid()));
        if tid == gettid() && self.stall_own.load(Ordering::Acquire) {
            self.stalled.store(true, Ordering::Release);
            held_while(&self.stall_own);
            self.stalled.store(false, Ordering::Release);
        }
        Ok(())
    }
}

/// A source fed by the test through a channel, readable through an eventfd.
struct FakeSource {
    rx: mpsc::Receiver<Event>,
    efd: EventFd,
    panic_on_drain: Arc<AtomicBool>,
    attached: Arc<Mutex<Vec<VcpuKey>>>,
    /// Every `set_lazy` call, in order, and the drains made while lazy.
    lazy: Arc<Mutex<Vec<bool>>>,
    lazy_drains: Arc<AtomicU64>,
}

#[derive(Clone)]
struct Feed {
    tx: mpsc::Sender<Event>,
    efd: Arc<EventFd>,
}

impl Feed {
    fn send(&self, e: Event) {
        self.tx.send(e).unwrap();
        self.efd.write(1).unwrap();
    }
}

impl EventSource for FakeSource {
    fn name(&self) -> &str {
        "fake"
    }
    fn fd(&self) -> Option<RawFd> {
        Some(self.efd.as_raw_fd())
    }
    fn drain(&mut self, _now: Nanos, out: &mut Vec<Event>) -> Option<Nanos> {
        if self.panic_on_drain.load(Ordering::Acquire) {
            panic!("fake source fails");
        }
        let _ = self.efd.read();
        if self.lazy.lock().unwrap().last() == Some(&true) {
            self.lazy_drains.fetch_add(1, Ordering::Relaxed);
        }
        out.extend(self.rx.try_iter());
        None
    }
    fn poll_period(&self) -> Option<Nanos> {
        (self.lazy.lock().unwrap().last() == Some(&true)).then_some(20_000_000)
    }
    fn set_lazy(&mut self, lazy: bool) {
        self.lazy.lock().unwrap().push(lazy);
    }
    fn attach(&mut self, key: VcpuKey, tid: i32) -> Result<(), String> {
        if tid == 4242 {
            return Err("refused".into());
        }
        self.attached.lock().unwrap().push(key);
        Ok(())
    }
    fn detach(&mut self, key: VcpuKey) {
        self.attached.lock().unwrap().retain(|k| *k != key);
    }
}

struct Setup {
    rt: Runtime,
    h: RuntimeHandle,
    kernel: Arc<FakeKernel>,
    feed: Feed,
    panic: Arc<AtomicBool>,
    attached: Arc<Mutex<Vec<VcpuKey>>>,
    lazy: Arc<Mutex<Vec<bool>>>,
    lazy_drains: Arc<AtomicU64>,
}

fn setup() -> Setup {
    setup_with_grace(RuntimeConfig::default().grace)
}

/// A runtime whose hooked vCPUs get `grace` for their own timers, and count as running for
/// as long (a test thread may not run for milliseconds on a busy machine).
fn setup_with_grace(grace: Nanos) -> Setup {
    setup_with(RuntimeConfig {
        grace,
        active: grace.max(RuntimeConfig::default().active),
        ..RuntimeConfig::default()
    })
}

fn setup_with(cfg: RuntimeConfig) -> Setup {
    let kernel = Arc::new(FakeKernel::default());
    let (tx, rx) = mpsc::channel();
    let efd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let feed = Feed {
        tx,
        efd: Arc::new(efd.try_clone().unwrap()),
    };
    let panic = Arc::new(AtomicBool::new(false));
    let attached = Arc::new(Mutex::new(Vec::new()));
    let lazy = Arc::new(Mutex::new(Vec::new()));
    let lazy_drains = Arc::new(AtomicU64::new(0));
    let source = FakeSource {
        rx,
        efd,
        panic_on_drain: panic.clone(),
        attached: attached.clone(),
        lazy: lazy.clone(),
        lazy_drains: lazy_drains.clone(),
    };
    let rt = Runtime::start(RuntimeConfig {
        applier: kernel.clone(),
        sources: vec![Box::new(source)],
        ..cfg
    })
    .unwrap();
    let h = rt.handle();
    Setup {
        rt,
        h,
        kernel,
        feed,
        panic,
        attached,
        lazy,
        lazy_drains,
    }
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(5), "timed out: {what}");
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn opts(items: &[&str]) -> DriverOptions {
    DriverOptions::parse(items.iter().copied()).unwrap()
}

/// `dynamic`'s options `items` with its RT-task requests boosted to FIFO 10, as by default
/// until 2026-12-05 (now a custom slice): these tests are about applying real-time boosts.
fn fifo_tasks(items: &[&str]) -> DriverOptions {
    opts(items).set("class_task", "fifo:10")
}

fn no_parts() -> VmParts {
    VmParts {
        publisher: None,
        sources: Vec::new(),
    }
}

const K0: VcpuKey = VcpuKey::new(0, 0);

#[test]
fn static_boosts_at_once_and_stop_restores() {
    let s = setup();
    s.kernel.attrs.lock().unwrap().insert(
        1001,
        SchedAttr {
            nice: 5,
            ..SchedClass::Other.attr()
        },
    );
    s.h.add_vm(0, "static", &opts(&["class=fifo:7"]), no_parts())
        .unwrap();
    let _v = s.h.add_vcpu(K0, 1001, false).unwrap();
    assert!(s.kernel.is_fifo(1001));
    assert_eq!(s.kernel.attr(1001).priority, 7);
    let st = s.h.status().unwrap();
    assert!(st.vms[0].vcpus[0].boosted);
    assert_eq!(st.vms[0].vcpus[0].remote_applied, 1);
    assert!(st.cost.wakeups >= 1);
    let fin = s.rt.stop();
    assert_eq!(fin.vms[0].vcpus[0].boosts, 1);
    assert_eq!(s.kernel.attr(1001).nice, 5, "original attributes restored");
    assert!(!s.kernel.is_fifo(1001));
    assert!(matches!(s.h.status(), Err(RuntimeError::Stopped)));
}

#[test]
fn a_vm_process_is_taken_for_a_known_vm_only() {
    let s = setup();
    assert!(
        s.h.set_vm_process(0, 4242).is_err(),
        "no VM 0 yet: an unknown VM is an error"
    );
    s.h.add_vm(0, "dynamic", &fifo_tasks(&[]), no_parts())
        .unwrap();
    s.h.set_vm_process(0, 4242).unwrap();
    // This very process (which runs other work too): accepted, and only its vCPUs count.
    s.h.set_vm_process(0, std::process::id() as i32).unwrap();
    s.h.remove_vm(0).unwrap();
    assert!(s.h.set_vm_process(0, 4242).is_err(), "gone with its VM");
    s.rt.stop();
}

#[test]
fn source_events_boost_and_timers_unboost() {
    let s = setup();
    // A wide critical-section budget: a late timer on a busy test machine must not turn
    // the hold's end into a throttle. The kernel's log is checked, not its current state,
    // so that a short boost is seen however late this thread looks.
    s.h.add_vm(
        0,
        "dynamic",
        &fifo_tasks(&["irq_hold=2ms", "cs_budget=1s"]),
        no_parts(),
    )
    .unwrap();
    let _v = s.h.add_vcpu(K0, 1002, false).unwrap();
    assert_eq!(*s.attached.lock().unwrap(), [K0], "sources see the thread");
    // An interrupt boosts; without a guest request the hold runs out on a timer.
    s.feed.send(Event::new(K0, VcpuEvent::Interrupt));
    wait_for("interrupt boost and hold expiry", || {
        s.kernel.history(1002) == [true, false]
    });
    // A guest request boosts until released.
    let rt = Reasons::NONE.with(Reason::RtTask);
    s.feed.send(Event::new(K0, VcpuEvent::Request(rt)));
    wait_for("request boost", || s.kernel.history(1002).len() == 3);
    std::thread::sleep(Duration::from_millis(5));
    assert!(s.kernel.is_fifo(1002), "a request holds");
    s.feed
        .send(Event::new(K0, VcpuEvent::Request(Reasons::NONE)));
    wait_for("release", || s.kernel.history(1002).len() == 4);
    // A wake-up boosts too.
    s.feed.send(Event::new(K0, VcpuEvent::Woken));
    wait_for("wake-up boost", || s.kernel.history(1002).len() >= 5);
    // A slot that no longer decodes ends a boost the guest asked for.
    s.feed.send(Event::new(K0, VcpuEvent::Request(rt)));
    s.feed.send(Event::new(K0, VcpuEvent::SlotInvalid));
    let st = s.h.status().unwrap();
    assert_eq!(st.vms[0].vcpus[0].bad_slots, 1);
    assert_eq!(st.vms[0].host_events, 2, "interrupt and wake-up: {st:?}");
    drop(s.rt);
    assert!(!s.kernel.is_fifo(1002));
    let h = s.kernel.history(1002);
    assert_eq!(&h[..4], [true, false, true, false]);
}

#[test]
fn deadline_hint_boosts_ahead_of_the_deadline() {
    let s = setup();
    // A hold long enough that a timer the platform delivers late still finds the boost, and
    // a lead long enough that an engine thread running late on a busy machine still fires it
    // before the moment has gone (2 ms past the deadline).
    s.h.add_vm(
        0,
        "deadline-aware",
        &opts(&["lead=100ms", "irq_hold=1s", "cs_budget=2s"]),
        no_parts(),
    )
    .unwrap();
    let _v = s.h.add_vcpu(K0, 1003, false).unwrap();
    let d = mono_ns() + 200_000_000;
    s.feed
        .send(Event::new(K0, VcpuEvent::DeadlineHint(Some(d))));
    wait_for("lead boost", || s.kernel.is_fifo(1003));
    let at = mono_ns();
    assert!(
        at >= d - 100_000_000,
        "not before the lead: {} µs early",
        (d - at) / 1000
    );
    // The guest handled its deadline and published the next one: unboost.
    while mono_ns() < d {
        std::thread::sleep(Duration::from_micros(200));
    }
    s.feed.send(Event::new(
        K0,
        VcpuEvent::DeadlineHint(Some(mono_ns() + 1_000_000_000)),
    ));
    s.feed
        .send(Event::new(K0, VcpuEvent::Request(Reasons::NONE)));
    wait_for("unboost after the deadline", || !s.kernel.is_fifo(1003));
    let st = s.h.status().unwrap();
    let v = &st.vms[0].vcpus[0];
    assert_eq!((v.boosts, v.unboosts), (1, 1));
    assert_eq!(v.boost_latency.count, 1);
}

/// A vCPU thread that handles its own events applies its own boosts and unboosts.
#[test]
fn hooked_vcpu_applies_its_own_decisions() {
    let s = setup();
    // Without repayment: its end would be a timer of the engine thread's.
    s.h.add_vm(0, "dynamic", &fifo_tasks(&["repay=off"]), no_parts())
        .unwrap();
    let kernel = s.kernel.clone();
    let t = vcpu_thread(&s.h, move |mut v| {
        let rt = Reasons::NONE.with(Reason::RtTask);
        assert!(v.handle(mono_ns(), &[VcpuEvent::Request(rt)]));
        let me = gettid();
        assert!(kernel.is_fifo(me));
        assert!(v.handle(mono_ns(), &[VcpuEvent::Request(Reasons::NONE)]));
        assert!(!kernel.is_fifo(me));
        assert_eq!(kernel.sets_by(me, me), 2, "both applied by the vCPU itself");
    });
    t.join().unwrap();
    let st = s.h.status().unwrap();
    assert_eq!(st.cost.vcpu_setattr, 2);
    assert_eq!(st.cost.engine_setattr, 0);
    assert_eq!(st.cost.vcpu_handle_calls, 2);
}

/// A vCPU thread in a `SCHED_DEADLINE` class never runs the engine itself: the kernel may
/// stop such a thread anywhere once its runtime is spent, and one stopped while holding the
/// engine's lock left the engine thread waiting for good (a real `pvsched vm` run with a
/// `deadline:` boost class never finished). It hands its exits to the engine thread, which
/// decides and applies for it.
#[test]
fn a_vcpu_in_a_deadline_class_hands_its_exits_to_the_engine_thread() {
    let s = setup();
    s.h.add_vm(
        0,
        "dynamic",
        &opts(&["class_task=deadline:300us/1ms", "repay=off"]),
        no_parts(),
    )
    .unwrap();
    let kernel = s.kernel.clone();
    let t = vcpu_thread(&s.h, move |mut v| {
        let me = gettid();
        let rt = Reasons::NONE.with(Reason::RtTask);
        // Not in a deadline class yet: it runs the engine and boosts itself.
        assert!(v.handle(mono_ns(), &[VcpuEvent::Request(rt)]));
        assert!(kernel.attr(me).is_deadline(), "{}", kernel.attr(me));
        assert_eq!(kernel.sets_by(me, me), 1);
        // In one now: its release goes to the engine thread, which unboosts it.
        assert!(v.handle(mono_ns(), &[VcpuEvent::Request(Reasons::NONE)]));
        wait_for("the engine thread's unboost", || {
            !kernel.attr(me).is_deadline()
        });
        assert_eq!(
            kernel.sets_by(me, me),
            1,
            "the unboost was the engine thread's"
        );
        // Out of it: its own again.
        assert!(v.handle(mono_ns(), &[VcpuEvent::Request(rt)]));
        assert_eq!(kernel.sets_by(me, me), 2);
    });
    t.join().unwrap();
    let st = s.h.status().unwrap();
    assert_eq!(st.cost.vcpu_handoffs, 1);
    assert_eq!(st.cost.vcpu_handle_calls, 2);
    let v = &st.vms[0].vcpus[0];
    assert_eq!((v.boosts, v.unboosts), (2, 1));
}

/// What a vCPU thread in a deadline class handed off is taken by whoever runs the engine next,
/// ahead of that thread's own events: here by vCPU A's thread while the engine thread is held
/// up, so B's release is decided (and applied) by A's thread. Were the queue left to the
/// engine thread, A would run the engine without it, and a handed-off request of a vCPU that
/// has meanwhile left its deadline class could be processed after a newer one.
#[test]
fn a_vcpu_running_the_engine_takes_the_hand_offs_first() {
    let s = setup();
    s.h.add_vm(
        0,
        "dynamic",
        &opts(&[
            "class_task=deadline:300us/1ms",
            "irq_hold=10s",
            "cs_budget=10s",
            "rt_budget=10s",
            "repay=off",
        ]),
        no_parts(),
    )
    .unwrap();
    let a = Hooked::start(&s.h, K0);
    let b = Hooked::start(&s.h, VcpuKey::new(0, 1));
    let rt = Reasons::NONE.with(Reason::RtTask);
    // B boosts itself into the deadline class.
    b.run(move |v| assert!(v.handle(mono_ns(), &[VcpuEvent::Request(rt)])));
    assert!(s.kernel.attr(b.tid).is_deadline());
    // The engine thread is held up boosting A (an interrupt for it): it takes nothing now.
    s.kernel.stall_remote.store(true, Ordering::Release);
    s.feed.send(Event::new(K0, VcpuEvent::Interrupt));
    wait_for("the engine thread held up", || {
        s.kernel.remote_stalls.load(Ordering::Acquire) >= 1
    });
    // B lets go, handed off.
    b.run(|v| assert!(v.handle(mono_ns(), &[VcpuEvent::Request(Reasons::NONE)])));
    // A's next exit runs the engine: it takes B's release first and lowers B.
    a.post(|v| handle_until_taken(v, mono_ns, &[VcpuEvent::Request(Reasons::NONE)]));
    let taken = Instant::now();
    while s.kernel.remote_stalls.load(Ordering::Acquire) < 2 && taken.elapsed() < STALL_LIMIT / 4 {
        std::thread::sleep(Duration::from_micros(200));
    }
    let lowered_by_a = s.kernel.remote_stalls.load(Ordering::Acquire) >= 2;
    s.kernel.stall_remote.store(false, Ordering::Release);
    a.run(|_| ());
    wait_for("B lowered", || !s.kernel.attr(b.tid).is_deadline());
    assert!(lowered_by_a, "A's thread did not take B's hand-off");
    assert_eq!(s.kernel.sets_by(b.tid, a.tid), 1, "B lowered by A's thread");
    drop((a, b));
    s.rt.stop();
}

/// Runs `f` on a new thread registered as hooked vCPU `K0`, with its handle.
fn vcpu_thread<T: Send + 'static>(
    h: &RuntimeHandle,
    f: impl FnOnce(pvsched_host::VcpuHandle) -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    struct Msg(pvsched_host::VcpuHandle);
    let (tid_tx, tid_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<Msg>();
    let t = std::thread::spawn(move || {
        tid_tx.send(gettid()).unwrap();
        let Msg(v) = go_rx.recv().unwrap();
        f(v)
    });
    let tid = tid_rx.recv().unwrap();
    let v = h.add_vcpu(K0, tid, true).unwrap();
    go_tx.send(Msg(v)).unwrap();
    t
}

/// A hooked vCPU's own timer comes due while it runs: it handles it itself (the engine
/// thread's wake-up for it is deferred by the grace, so it usually does not wake at all).
#[test]
fn hooked_vcpu_takes_its_own_timers() {
    // A grace longer than the test: the engine thread cannot get there first even on a
    // machine too busy to run this thread for a while.
    let s = setup_with_grace(60_000_000_000);
    // Holds and budgets longer than the test: only the lead timer matters here.
    s.h.add_vm(
        0,
        "deadline-aware",
        // A lead long enough that a thread the machine does not run for milliseconds still
        // fires it before the moment has gone (2 ms past the deadline).
        &opts(&[
            "lead=100ms",
            "irq_hold=10s",
            "cs_budget=10s",
            "rt_budget=10s",
        ]),
        no_parts(),
    )
    .unwrap();
    let kernel = s.kernel.clone();
    let t = vcpu_thread(&s.h, move |mut v| {
        let me = gettid();
        let d = mono_ns() + 200_000_000;
        assert!(v.handle(mono_ns(), &[VcpuEvent::DeadlineHint(Some(d))]));
        // "Exits" every 5 µs until boosted.
        while !kernel.is_fifo(me) {
            let now = mono_ns();
            if v.exit(now) {
                v.handle(now, &[]);
            }
            std::thread::yield_now();
            assert!(mono_ns() < d + 50_000_000, "never boosted");
        }
        // Not before the lead time, less the early window of a vCPU's own lead timers.
        assert!(mono_ns() >= d - 100_000_000 - RuntimeConfig::default().self_early);
        kernel.sets_by(me, me)
    });
    let own = t.join().unwrap();
    assert_eq!(own, 1, "the vCPU boosted itself");
    let st = s.h.status().unwrap();
    assert_eq!(
        st.cost.engine_setattr,
        0,
        "the engine thread applied nothing: {:?}",
        s.kernel.log.lock().unwrap()
    );
}

/// A vCPU thread fires its own lead timer at an exit up to `self_early` before it is due
/// (a slightly early boost instead of an engine wake-up), not earlier.
#[test]
fn a_vcpu_fires_its_lead_timer_a_little_early_at_an_exit() {
    let early = RuntimeConfig::default().self_early;
    assert!(early > 0);
    let s = setup_with_grace(60_000_000_000);
    s.h.add_vm(
        0,
        "deadline-aware",
        &opts(&[
            "lead=100us",
            "irq_hold=10s",
            "cs_budget=10s",
            "rt_budget=10s",
        ]),
        no_parts(),
    )
    .unwrap();
    let kernel = s.kernel.clone();
    let t = vcpu_thread(&s.h, move |mut v| {
        let me = gettid();
        // A deadline far ahead of the real clock: only this thread's (given) times matter.
        let d = mono_ns() + 30_000_000_000;
        let lead_at = d - 100_000;
        assert!(v.handle(mono_ns(), &[VcpuEvent::DeadlineHint(Some(d))]));
        let before = lead_at - early - 1_000;
        assert!(
            !v.exit(before),
            "an exit before the early window fires nothing"
        );
        let inside = lead_at - early + 1_000;
        assert!(
            v.exit(inside),
            "an exit inside the early window fires the lead timer"
        );
        handle_until_taken(&mut v, || inside, &[]);
        (kernel.is_fifo(me), kernel.sets_by(me, me))
    });
    let (fifo, own) = t.join().unwrap();
    assert!(fifo, "boosted by its own lead timer");
    assert_eq!(own, 1, "the vCPU boosted itself");
    assert_eq!(s.h.status().unwrap().cost.engine_setattr, 0);
}

/// While the host-wide cap is full, a lead timer of another vCPU wakes nobody: the vCPU
/// thread that frees the slot fires it and applies that boost itself.
#[test]
fn a_lead_timer_waits_for_the_slot_without_waking_the_engine() {
    let s = setup_with(RuntimeConfig {
        max_boosted: Some(1),
        cap_quantum: 10_000_000_000,
        ..RuntimeConfig::default()
    });
    // Budgets longer than the test: this vCPU holds its boost for 400 ms (more on a busy
    // machine) without an exit, and a budget check would be the engine thread's timer.
    s.h.add_vm(
        0,
        "deadline-aware",
        &opts(&["lead=300ms", "cs_budget=10s", "rt_budget=10s"]),
        no_parts(),
    )
    .unwrap();
    let other = VcpuKey::new(0, 1);
    let _o = s.h.add_vcpu(other, 1005, false).unwrap();
    let (feed, kernel, h) = (s.feed.clone(), s.kernel.clone(), s.h.clone());
    let t = vcpu_thread(&s.h, move |mut v| {
        let me = gettid();
        let rt = Reasons::NONE.with(Reason::RtTask);
        assert!(v.handle(mono_ns(), &[VcpuEvent::Request(rt)]));
        assert!(kernel.is_fifo(me), "this vCPU holds the one slot");
        // The other vCPU's deadline in 600 ms: its lead timer comes due in 300 ms.
        feed.send(Event::new(
            other,
            VcpuEvent::DeadlineHint(Some(mono_ns() + 600_000_000)),
        ));
        // A command is served after the events sent before it: the hint is in (on a loaded
        // machine the engine may take a while, and a wake-up after the lead time, for
        // whatever reason, would fire the timer there).
        h.status().unwrap();
        let w0 = h.status().unwrap().cost.wakeups;
        std::thread::sleep(Duration::from_millis(400));
        assert!(!kernel.is_fifo(1005), "the cap holds the other vCPU back");
        handle_until_taken(&mut v, mono_ns, &[VcpuEvent::Request(Reasons::NONE)]);
        assert!(!kernel.is_fifo(me));
        (kernel.is_fifo(1005), kernel.sets_by(1005, me), w0)
    });
    let (boosted, by_me, w0) = t.join().unwrap();
    assert!(boosted, "the lead boost starts when the slot frees");
    assert_eq!(by_me, 1, "applied by the vCPU thread that freed the slot");
    let st = s.h.status().unwrap();
    assert_eq!(
        st.cost.engine_timers,
        0,
        "the engine thread fired no timer (woken {} times since the hint)",
        st.cost.wakeups - w0
    );
}

/// The engine thread counts the wake-ups that decided no class change: those that served the
/// control requests adding the VM and its vCPU are some, the one for an event that boosts is
/// not.
#[test]
fn wake_ups_that_decide_nothing_are_counted() {
    let s = setup();
    s.h.add_vm(
        0,
        "dynamic",
        &fifo_tasks(&["irq_hold=10s", "cs_budget=10s"]),
        no_parts(),
    )
    .unwrap();
    let _v = s.h.add_vcpu(K0, 1006, false).unwrap();
    let cost = |s: &Setup| s.h.status().unwrap().cost;
    let b = cost(&s);
    assert!(
        (1..=b.wakeups).contains(&b.idle_wakeups),
        "control requests decide nothing: {b:?}"
    );
    s.feed.send(Event::new(K0, VcpuEvent::Interrupt));
    wait_for("interrupt boost", || s.kernel.is_fifo(1006));
    let c = cost(&s);
    assert!(
        c.idle_wakeups - b.idle_wakeups < c.wakeups - b.wakeups,
        "the boost's wake-up decided a change: {b:?} then {c:?}"
    );
}

/// A lead timer of a vCPU that is boosted already changes no class: the engine thread does
/// not wake for it. It fires with whatever next runs the engine for that vCPU: a request let
/// go after the lead time ends the boost and the lead starts one in the same round, so the
/// class never changes.
#[test]
fn a_boosted_vcpus_lead_timer_wakes_no_one_and_still_holds_its_boost() {
    let s = setup();
    s.h.add_vm(
        0,
        "deadline-aware",
        &opts(&[
            "lead=300ms",
            "irq_hold=100ms",
            "cs_budget=10s",
            "rt_budget=10s",
        ]),
        no_parts(),
    )
    .unwrap();
    let h = s.h.clone();
    let kernel = s.kernel.clone();
    let t = vcpu_thread(&s.h, move |mut v| {
        let me = gettid();
        let rt = Reasons::NONE.with(Reason::RtTask);
        let d = mono_ns() + 600_000_000;
        handle_until_taken(
            &mut v,
            mono_ns,
            &[VcpuEvent::Request(rt), VcpuEvent::DeadlineHint(Some(d))],
        );
        assert!(kernel.is_fifo(me), "boosted for its request");
        let e0 = h.status().unwrap().cost.engine_timers;
        // Past the lead time (300 ms before the deadline), well before the deadline.
        while mono_ns() < d - 150_000_000 {
            std::thread::sleep(Duration::from_millis(10));
        }
        // (No status request before the let-go: serving it would fire the due timer.)
        let sets = kernel.sets_by(me, me);
        handle_until_taken(&mut v, mono_ns, &[VcpuEvent::Request(Reasons::NONE)]);
        (
            h.status().unwrap().cost.engine_timers - e0,
            kernel.is_fifo(me),
            kernel.sets_by(me, me) - sets,
            me,
        )
    });
    let (engine_fired, held, sets, tid) = t.join().unwrap();
    assert_eq!(
        engine_fired, 0,
        "the engine thread fired no timer for the boosted vCPU"
    );
    assert!(held, "the lead holds the boost past the let-go");
    assert_eq!(sets, 0, "no class change at the let-go");
    wait_for("unboost after the hold", || !s.kernel.is_fifo(tid));
}

/// A vCPU thread lowering itself is preempted inside its own `sched_setattr` (the kernel has
/// already lowered it); the engine thread boosts it meanwhile. The boost must reach the kernel
/// at once, not wait for the vCPU thread to run again (which, lowered, it may not for ms).
#[test]
fn a_boost_is_applied_while_the_vcpu_is_stuck_lowering_itself() {
    let s = setup();
    s.h.add_vm(
        0,
        "dynamic",
        &fifo_tasks(&["irq_hold=10s", "cs_budget=10s", "rt_budget=10s"]),
        no_parts(),
    )
    .unwrap();
    let kernel = s.kernel.clone();
    let (tid_tx, tid_rx) = mpsc::channel();
    let t = vcpu_thread(&s.h, move |mut v| {
        tid_tx.send(gettid()).unwrap();
        let rt = Reasons::NONE.with(Reason::RtTask);
        assert!(v.handle(mono_ns(), &[VcpuEvent::Request(rt)]));
        kernel.stall_own.store(true, Ordering::Release);
        handle_until_taken(&mut v, mono_ns, &[VcpuEvent::Request(Reasons::NONE)]);
    });
    let tid = tid_rx.recv().unwrap();
    wait_for("the vCPU lowered itself and is stuck", || {
        s.kernel.stalled.load(Ordering::Acquire)
    });
    assert!(!s.kernel.is_fifo(tid));
    s.feed.send(Event::new(K0, VcpuEvent::Interrupt));
    wait_for("boost applied by the engine thread", || {
        s.kernel.is_fifo(tid)
    });
    s.kernel.stall_own.store(false, Ordering::Release);
    t.join().unwrap();
    assert!(
        s.kernel.is_fifo(tid),
        "still boosted after the vCPU went on"
    );
    drop(s.rt);
    assert!(!s.kernel.is_fifo(tid), "restored");
}

/// Work for a [`Hooked`] vCPU thread.
type Job = Box<dyn FnOnce(&mut pvsched_host::VcpuHandle) + Send>;

/// A vCPU thread that runs what the test sends it, with its own handle.
struct Hooked {
    tid: i32,
    tx: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Hooked {
    fn start(h: &RuntimeHandle, key: VcpuKey) -> Hooked {
        let (tid_tx, tid_rx) = mpsc::channel();
        let (handle_tx, handle_rx) = mpsc::channel::<pvsched_host::VcpuHandle>();
        let (tx, rx) = mpsc::channel::<Job>();
        let thread = std::thread::spawn(move || {
            tid_tx.send(gettid()).unwrap();
            let mut v = handle_rx.recv().unwrap();
            for job in rx {
                job(&mut v);
            }
        });
        let tid = tid_rx.recv().unwrap();
        handle_tx.send(h.add_vcpu(key, tid, true).unwrap()).unwrap();
        Hooked {
            tid,
            tx: Some(tx),
            thread: Some(thread),
        }
    }

    /// Runs `f` on the vCPU's thread without waiting for it.
    fn post(&self, f: impl FnOnce(&mut pvsched_host::VcpuHandle) + Send + 'static) {
        self.tx.as_ref().unwrap().send(Box::new(f)).unwrap();
    }

    /// Runs `f` on the vCPU's thread and waits for its result.
    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut pvsched_host::VcpuHandle) -> T + Send + 'static,
    ) -> T {
        let (tx, rx) = mpsc::channel();
        self.post(move |v| tx.send(f(v)).unwrap());
        rx.recv().unwrap()
    }

    /// Sends the guest's request `r` at an exit, until the engine takes it.
    fn request(&self, r: Reasons) {
        self.run(move |v| {
            handle_until_taken(v, mono_ns, &[VcpuEvent::Request(r)]);
        });
    }
}

impl Drop for Hooked {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// With the cap at one, a vCPU that lets its boost go on its own thread hands it to the
/// waiting vCPU: that boost must be applied before the thread lowers itself (it may be
/// preempted inside that call, by the vCPU it just handed the boost to). And a class decided
/// for a vCPU by a thread held up before applying it is applied by the vCPU's own thread at
/// its next exit.
#[test]
fn a_boost_handed_over_is_applied_before_the_giver_lowers_itself() {
    let s = setup_with(RuntimeConfig {
        max_boosted: Some(1),
        cap_quantum: 10_000_000_000,
        quiet_gate: None,
        ..RuntimeConfig::default()
    });
    s.h.add_vm(
        0,
        "dynamic",
        &fifo_tasks(&["cs_budget=10s", "rt_budget=10s", "repay=off"]),
        no_parts(),
    )
    .unwrap();
    let a = Hooked::start(&s.h, VcpuKey::new(0, 0));
    let b = Hooked::start(&s.h, VcpuKey::new(0, 1));
    let rt = Reasons::NONE.with(Reason::RtTask);
    a.request(rt);
    b.request(rt);
    assert!(
        s.kernel.is_fifo(a.tid) && !s.kernel.is_fifo(b.tid),
        "B waits for the cap"
    );

    // A lets go and is preempted inside its own lowering: B's boost is already in.
    s.kernel.stall_own.store(true, Ordering::Release);
    a.post(|v| {
        handle_until_taken(v, mono_ns, &[VcpuEvent::Request(Reasons::NONE)]);
    });
    wait_for("A inside its own lowering", || {
        s.kernel.stalled.load(Ordering::Acquire)
    });
    let b_boosted = s.kernel.is_fifo(b.tid);
    s.kernel.stall_own.store(false, Ordering::Release);
    a.run(|_| ());
    assert!(
        b_boosted,
        "B's boost waited for A's thread, stuck lowering itself"
    );
    assert!(!s.kernel.is_fifo(a.tid) && s.kernel.is_fifo(b.tid));

    // A asks again (waits); B lets go, and its thread is held up on its way to boost A:
    // A's own thread applies its boost at its next exit.
    a.request(rt);
    s.kernel.stall_remote.store(true, Ordering::Release);
    b.post(|v| {
        handle_until_taken(v, mono_ns, &[VcpuEvent::Request(Reasons::NONE)]);
    });
    wait_for("B held up boosting A", || {
        s.kernel.remote_stalled.load(Ordering::Acquire)
    });
    let before = !s.kernel.is_fifo(a.tid);
    let due = a.run(|v| v.exit(mono_ns()));
    if due {
        a.run(|v| handle_until_taken(v, mono_ns, &[]));
    }
    let applied = s.kernel.is_fifo(a.tid) && s.kernel.sets_by(a.tid, a.tid) >= 3;
    s.kernel.stall_remote.store(false, Ordering::Release);
    b.run(|_| ());
    assert!(before, "A not boosted before its exit");
    assert!(due, "an exit of A says a class is to be applied");
    assert!(applied, "A applied its boost itself");
    wait_for("B lowered", || !s.kernel.is_fifo(b.tid));
    assert!(s.kernel.is_fifo(a.tid));
    drop((a, b));
    s.rt.stop();
}

/// Starts the race of [`a_boost_overtaken_by_the_vcpu_lowering_itself_is_set_again`]: vCPU
/// `K0` boosts itself, then lowers itself with its call held up before it lands (and, with
/// `stall`, kept "preempted" inside the call once it landed); meanwhile the engine thread
/// boosts it (an interrupt) and its change lands first. Returns the vCPU's thread and tid,
/// the vCPU's lowering still held.
fn a_lowering_overtaken_by_a_boost(s: &Setup, stall: bool) -> (std::thread::JoinHandle<()>, i32) {
    s.h.add_vm(
        0,
        "dynamic",
        &fifo_tasks(&[
            "irq_hold=10s",
            "cs_budget=10s",
            "rt_budget=10s",
            "repay=off",
        ]),
        no_parts(),
    )
    .unwrap();
    let kernel = s.kernel.clone();
    let (tid_tx, tid_rx) = mpsc::channel();
    let t = vcpu_thread(&s.h, move |mut v| {
        tid_tx.send(gettid()).unwrap();
        let rt = Reasons::NONE.with(Reason::RtTask);
        assert!(v.handle(mono_ns(), &[VcpuEvent::Request(rt)]));
        assert!(kernel.is_fifo(gettid()));
        // Lowers itself; its call is held up before it lands.
        kernel.hold_own.store(true, Ordering::Release);
        kernel.stall_own.store(stall, Ordering::Release);
        handle_until_taken(&mut v, mono_ns, &[VcpuEvent::Request(Reasons::NONE)]);
    });
    let tid = tid_rx.recv().unwrap();
    wait_for("the vCPU on its way to lower itself", || {
        s.kernel.own_held.load(Ordering::Acquire)
    });
    // The engine thread boosts it meanwhile (an interrupt for it).
    let engine_sets = || {
        s.kernel
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _, c)| *t == tid && *c != tid)
            .count()
    };
    let before = engine_sets();
    s.feed.send(Event::new(K0, VcpuEvent::Interrupt));
    wait_for("the engine thread's boost landed", || {
        engine_sets() > before
    });
    (t, tid)
}

/// The same race, with the vCPU's thread going on after its stale lowering landed: it sees
/// the engine thread's change and applies the boost again itself, and drops the look the
/// engine thread had queued (no wake-up of the engine thread for it).
#[test]
fn a_race_the_vcpu_settles_itself_needs_no_look_by_the_engine_thread() {
    // The engine thread looks again 50 µs after the race (and, backing off, while the vCPU's
    // call is in flight, for ~100 ms): on a loaded machine it may get there first (and find the
    // lowering landed, and set the boost again itself). A few tries.
    let mut seen = Vec::new();
    for _ in 0..5 {
        let s = setup();
        let (t, tid) = a_lowering_overtaken_by_a_boost(&s, false);
        s.kernel.hold_own.store(false, Ordering::Release);
        t.join().unwrap();
        assert!(s.kernel.is_fifo(tid), "the boost stays");
        let st = s.h.status().unwrap();
        assert!(st.cost.rechecks >= 1, "{:?}", st.cost);
        seen.push(st.cost.recheck_settled);
        drop(s.rt);
        assert!(!s.kernel.is_fifo(tid), "restored");
        if st.cost.recheck_settled >= 1 {
            return;
        }
    }
    panic!("no race settled by the vCPU itself in 5 tries: {seen:?}");
}

/// The engine thread boosts a vCPU whose thread is lowering itself, and the vCPU's lowering
/// lands *after* the boost, the thread then preempted inside its call (as a thread that
/// lowers itself next to a busier one is, for a scheduler tick or more): the engine thread
/// must find the boost missing and set it again, not wait for the vCPU's thread to run.
#[test]
fn a_boost_overtaken_by_the_vcpu_lowering_itself_is_set_again() {
    let s = setup();
    let (t, tid) = a_lowering_overtaken_by_a_boost(&s, true);
    // Then the vCPU's stale lowering lands, and its thread stalls inside the call.
    s.kernel.hold_own.store(false, Ordering::Release);
    wait_for("the lowering landed", || {
        s.kernel.stalled.load(Ordering::Acquire)
    });
    wait_for("the boost set again while the vCPU is stuck", || {
        s.kernel.is_fifo(tid)
    });
    assert!(
        s.kernel.stalled.load(Ordering::Acquire),
        "set again by the engine thread"
    );
    let st = s.h.status().unwrap();
    assert!(st.cost.recheck_fixed >= 1, "{:?}", st.cost);
    // Stuck inside its call, the vCPU's thread settled nothing: the look was needed.
    assert_eq!(st.cost.recheck_settled, 0, "{:?}", st.cost);
    s.kernel.stall_own.store(false, Ordering::Release);
    t.join().unwrap();
    assert!(
        s.kernel.is_fifo(tid),
        "still boosted after the vCPU went on"
    );
    drop(s.rt);
    assert!(!s.kernel.is_fifo(tid), "restored");
}

/// A change decided by the engine thread reaches the kernel *after* the vCPU's own, newer
/// decision (the engine thread was held up on its way into the kernel): the late class must
/// not stay. First with the vCPU's own decision already done when the late change lands, then
/// with the vCPU still inside its own call (preempted there).
#[test]
fn a_late_change_does_not_outlive_a_newer_decision() {
    for vcpu_inside_its_call in [false, true] {
        let s = setup();
        s.h.add_vm(
            0,
            "dynamic",
            &fifo_tasks(&[
                "repay=off",
                "class_cs=fifo:20",
                "class_task=fifo:10",
                "cs_budget=10s",
                "rt_budget=10s",
            ]),
            no_parts(),
        )
        .unwrap();
        let (kernel, feed) = (s.kernel.clone(), s.feed.clone());
        let t = vcpu_thread(&s.h, move |mut v| {
            let me = gettid();
            let prio = |k: &FakeKernel| k.attr(me).priority;
            // Boosted by its own critical section (fifo:20).
            let irq = Reasons::NONE.with(Reason::Irq);
            assert!(v.handle(mono_ns(), &[VcpuEvent::Request(irq)]));
            assert_eq!(prio(&kernel), 20);
            // The engine thread ends the boost (a quiet verdict) and is held up before its
            // restore reaches the kernel.
            kernel.stall_remote.store(true, Ordering::Release);
            feed.send(Event::new(K0, VcpuEvent::Quiet(true)));
            wait_for("the engine thread held up on its way in", || {
                kernel.remote_stalled.load(Ordering::Acquire)
            });
            // The newer decision, on the vCPU's own thread: an RT task, contended again.
            if vcpu_inside_its_call {
                kernel.stall_own.store(true, Ordering::Release);
            }
            let (k2, go) = (kernel.clone(), std::thread::current());
            let releaser = std::thread::spawn(move || {
                if vcpu_inside_its_call {
                    wait_for("the vCPU inside its own call", || {
                        k2.stalled.load(Ordering::Acquire)
                    });
                }
                // The late restore lands now, after the vCPU's own change.
                k2.stall_remote.store(false, Ordering::Release);
                wait_for("the late restore landed", || {
                    !k2.remote_stalled.load(Ordering::Acquire)
                });
                std::thread::sleep(Duration::from_millis(5));
                k2.stall_own.store(false, Ordering::Release);
                go.unpark();
            });
            let rt = Reasons::NONE.with(Reason::RtTask);
            handle_until_taken(
                &mut v,
                mono_ns,
                &[VcpuEvent::Request(rt), VcpuEvent::Quiet(false)],
            );
            releaser.join().unwrap();
            me
        });
        let me = t.join().unwrap();
        wait_for("the engine thread done", || {
            !s.kernel.remote_stalled.load(Ordering::Acquire)
        });
        std::thread::sleep(Duration::from_millis(20));
        let a = s.kernel.attr(me);
        assert!(
            s.kernel.is_fifo(me) && a.priority == 10,
            "the newer decision (fifo:10) lost to a late restore \
             (vCPU inside its call: {vcpu_inside_its_call}): {a:?}"
        );
    }
}

/// Paying back by pausing (`repay=pause:<d>`): a hooked vCPU paying back a boost keeps its
/// own attributes and leaves the CPU at its exits for up to `d` (never into the last 30 µs
/// before its next timer, nor beyond what it owes); not while it has nothing to pay back,
/// not while boosted, and never when it repays at a nice level instead. Its repayment ends
/// once its pauses, told to the engine at its next exits, add up to the boosted time, and
/// that end costs no system call (its attributes are already the original ones).
#[test]
fn a_repaying_vcpu_pauses_at_its_exits_and_no_other_does() {
    for repay in ["repay=pause:10ms", "repay=nice:5"] {
        let s = setup();
        s.h.add_vm(
            0,
            "dynamic",
            &fifo_tasks(&["cs_budget=1s", repay, "repay_on=boost"]),
            no_parts(),
        )
        .unwrap();
        let kernel = s.kernel.clone();
        let t = vcpu_thread(&s.h, move |mut v| {
            let me = gettid();
            assert_eq!(v.repay_pause(), 0, "nothing to pay back");
            let rt = Reasons::NONE.with(Reason::RtTask);
            assert!(v.handle(mono_ns(), &[VcpuEvent::Request(rt)]));
            assert!(kernel.is_fifo(me));
            assert_eq!(v.repay_pause(), 0, "boosted");
            // Boosted for 2 ms: as much to pay back.
            std::thread::sleep(Duration::from_millis(2));
            assert!(v.handle(mono_ns(), &[VcpuEvent::Request(Reasons::NONE)]));
            let attr = kernel.attr(me);
            let sets = kernel.history(me).len();
            let t0 = mono_ns();
            let mut paused = v.repay_pause();
            let took = mono_ns() - t0;
            // Exits until the pauses paid it back (the first pause, cut to what is owed, pays
            // it unless more than 10 ms is owed: a sleep lasts at least as long as asked).
            for _ in 0..100 {
                if !v.exit(mono_ns()) {
                    break;
                }
                assert!(v.handle(mono_ns(), &[]));
                paused += v.repay_pause();
            }
            (attr, paused, took, sets, kernel.history(me).len())
        });
        let (attr, paused, took, sets_before, sets_after) = t.join().unwrap();
        let st = s.h.status().unwrap();
        let v = &st.vms[0].vcpus[0];
        assert!(!attr.is_realtime(), "{attr:?}");
        if repay == "repay=nice:5" {
            assert_eq!(attr.nice, 5, "paying back at nice 5");
            assert_eq!((paused, v.paused_ms), (0, 0.0), "no pauses");
        } else {
            assert_eq!(attr.nice, 0, "paying back at its own attributes");
            // As long as it was boosted (at least 2 ms; a pause is cut to what is owed, and a
            // sleep may overrun on a busy machine), and in all what it owed.
            assert!(took >= 2_000_000, "{took}");
            assert!(paused as f64 >= v.boosted_ms * 1e6 * 0.99, "{paused} {v:?}");
            assert!((v.paused_ms - paused as f64 / 1e6).abs() < 1e-6, "{v:?}");
            assert!(v.repaid_ms > 0.0, "the repayment ended: {v:?}");
            assert_eq!(sets_after, sets_before, "its end took no system call");
        }
    }
}

/// A vCPU thread the runtime does not run code on (the daemon's, not hooked) cannot pause:
/// its repayment by pausing comes to nice 10 instead, and its original attributes come back
/// when the repayment ends.
#[test]
fn a_vcpu_that_cannot_pause_pays_back_at_nice_10() {
    let s = setup();
    s.h.add_vm(
        0,
        "dynamic",
        &fifo_tasks(&["cs_budget=1s", "repay=pause:2ms", "repay_on=boost"]),
        no_parts(),
    )
    .unwrap();
    let _v = s.h.add_vcpu(K0, 1007, false).unwrap();
    let rt = Reasons::NONE.with(Reason::RtTask);
    s.feed.send(Event::new(K0, VcpuEvent::Request(rt)));
    wait_for("request boost", || s.kernel.is_fifo(1007));
    std::thread::sleep(Duration::from_millis(20));
    s.feed
        .send(Event::new(K0, VcpuEvent::Request(Reasons::NONE)));
    wait_for("repaying at nice 10", || s.kernel.attr(1007).nice == 10);
    assert!(!s.kernel.is_fifo(1007));
    wait_for("repaid", || s.kernel.attr(1007).nice == 0);
    let fin = s.rt.stop();
    assert_eq!(fin.vms[0].vcpus[0].paused_ms, 0.0);
}

/// After a FIFO boost, the vCPU pays its boosted time back at nice 19, then returns to its
/// original attributes; neither phase counts as a boost.
#[test]
fn boosted_time_is_repaid_then_the_original_restored() {
    let s = setup();
    s.h.add_vm(
        0,
        "dynamic",
        &fifo_tasks(&["cs_budget=1s", "repay=nice:19", "repay_on=boost"]),
        no_parts(),
    )
    .unwrap();
    let _v = s.h.add_vcpu(K0, 1004, false).unwrap();
    let rt = Reasons::NONE.with(Reason::RtTask);
    s.feed.send(Event::new(K0, VcpuEvent::Request(rt)));
    wait_for("boost", || s.kernel.is_fifo(1004));
    std::thread::sleep(Duration::from_millis(5));
    s.feed
        .send(Event::new(K0, VcpuEvent::Request(Reasons::NONE)));
    wait_for("repayment at nice 19", || s.kernel.attr(1004).nice == 19);
    assert!(!s.kernel.is_fifo(1004));
    let st = s.h.status().unwrap();
    let v = &st.vms[0].vcpus[0];
    assert!(!v.boosted, "a repayment is no boost");
    assert!(v.debt_ms > 0.0, "{v:?}");
    wait_for("debt paid back", || s.kernel.attr(1004).nice == 0);
    let st = s.h.status().unwrap();
    let v = &st.vms[0].vcpus[0];
    assert!(v.repaid_ms >= 4.0, "{v:?}");
    assert_eq!((v.boosts, v.unboosts), (1, 1));
    assert_eq!(v.boost_latency.count, 1, "only the boost is a boost");
}

#[test]
fn control_requests_change_the_engine_and_restore() {
    let s = setup_with(RuntimeConfig {
        engine_class: EngineClass::Deadline,
        ..RuntimeConfig::default()
    });
    // No room for the engine thread's deadline reservation: it falls back to FIFO priorities
    // above each class it applies (checked at the end), as with `EngineClass::Fifo`.
    s.kernel.refuse_deadline.store(true, Ordering::Release);
    s.h.add_vm(0, "static", &DriverOptions::new(), no_parts())
        .unwrap();
    s.h.add_vm(1, "none", &DriverOptions::new(), no_parts())
        .unwrap();
    let _a = s.h.add_vcpu(K0, 2001, false).unwrap();
    let _b = s.h.add_vcpu(VcpuKey::new(1, 0), 2002, false).unwrap();
    assert!(s.kernel.is_fifo(2001) && !s.kernel.is_fifo(2002));
    // Errors are typed and change nothing.
    assert!(matches!(
        s.h.add_vm(0, "static", &DriverOptions::new(), no_parts()),
        Err(RuntimeError::Engine(_))
    ));
    assert!(matches!(
        s.h.add_vcpu(VcpuKey::new(1, 1), 2001, false),
        Err(RuntimeError::DuplicateTid { tid: 2001, .. })
    ));
    assert!(matches!(
        s.h.add_vcpu(K0, 2003, false),
        Err(RuntimeError::Duplicate(_))
    ));
    assert!(matches!(
        s.h.add_vcpu(VcpuKey::new(1, 2), 666, false),
        Err(RuntimeError::Thread { .. })
    ));
    assert!(matches!(
        s.h.add_vcpu(VcpuKey::new(1, 3), 4242, false),
        Err(RuntimeError::Source(..))
    ));
    assert!(s.h.set_driver(1, "nope", &DriverOptions::new()).is_err());
    assert!(s.kernel.is_fifo(2001));
    // Disable globally: unboosted; enable: boosted again.
    s.h.set_enabled(None, false).unwrap();
    assert!(!s.kernel.is_fifo(2001));
    assert!(!s.h.status().unwrap().enabled);
    s.h.set_enabled(None, true).unwrap();
    assert!(s.kernel.is_fifo(2001));
    // Driver swap on VM 1 boosts it; the engine thread outranks the new class.
    s.h.set_driver(1, "static", &opts(&["class=fifo:30"]))
        .unwrap();
    assert_eq!(s.kernel.attr(2002).priority, 30);
    // Removing a vCPU or a VM restores.
    s.h.remove_vcpu(K0).unwrap();
    assert!(!s.kernel.is_fifo(2001));
    assert!(!s.attached.lock().unwrap().contains(&K0));
    s.h.remove_vm(1).unwrap();
    assert!(!s.kernel.is_fifo(2002));
    assert!(s.h.remove_vm(1).is_err());
    let st = s.h.status().unwrap();
    assert_eq!(st.vms.len(), 1);
    assert!(st.vms[0].vcpus.is_empty());
    // The engine thread raised itself above fifo:30 when it first applied it.
    let engine_prio = s
        .kernel
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|(t, ..)| *t != 2001 && *t != 2002)
        .map(|(_, a, _)| a.priority)
        .max();
    assert_eq!(engine_prio, Some(31));
}

/// With `EngineClass::Deadline`, where the kernel admits it, the engine thread takes its
/// deadline reservation at its first real-time boost and keeps it: a higher FIFO class later
/// needs no change of its own. By default it takes FIFO priorities (the control test above,
/// and here as a control).
#[test]
fn the_engine_thread_takes_a_deadline_reservation_above_every_boost() {
    // What the fake kernel was asked to set on threads other than the one vCPU `vcpu`.
    let engine_sets = |kernel: &FakeKernel, vcpu: i32| -> Vec<SchedAttr> {
        let log = kernel.log.lock().unwrap();
        log.iter()
            .filter(|(t, ..)| *t != vcpu)
            .map(|(_, a, _)| *a)
            .collect()
    };
    let fifo = setup();
    fifo.h
        .add_vm(0, "static", &DriverOptions::new(), no_parts())
        .unwrap();
    let _f = fifo.h.add_vcpu(K0, 2102, false).unwrap();
    assert_eq!(
        engine_sets(&fifo.kernel, 2102),
        vec![SchedClass::Fifo(11).attr()]
    );
    assert!(!fifo.h.status().unwrap().cost.engine_deadline);

    let s = setup_with(RuntimeConfig {
        engine_class: EngineClass::Deadline,
        ..RuntimeConfig::default()
    });
    s.h.add_vm(0, "static", &DriverOptions::new(), no_parts())
        .unwrap();
    let _a = s.h.add_vcpu(K0, 2101, false).unwrap();
    assert!(s.kernel.is_fifo(2101));
    assert_eq!(
        engine_sets(&s.kernel, 2101),
        vec![pvsched_host::mechanism::helper_deadline()]
    );
    assert!(
        engine_sets(&s.kernel, 2101)[0].is_deadline()
            && engine_sets(&s.kernel, 2101)[0].flags & 1 == 1
    );
    assert!(s.h.status().unwrap().cost.engine_deadline);
    s.h.set_driver(0, "static", &opts(&["class=fifo:30"]))
        .unwrap();
    assert_eq!(s.kernel.attr(2101).priority, 30);
    assert_eq!(
        engine_sets(&s.kernel, 2101).len(),
        1,
        "already above every FIFO priority"
    );
}

#[test]
fn a_panicking_engine_thread_restores_every_thread() {
    let s = setup();
    s.h.add_vm(0, "static", &DriverOptions::new(), no_parts())
        .unwrap();
    let _v = s.h.add_vcpu(K0, 3001, false).unwrap();
    assert!(s.kernel.is_fifo(3001));
    s.panic.store(true, Ordering::Release);
    s.feed.send(Event::new(K0, VcpuEvent::Interrupt));
    wait_for("restore on panic", || !s.kernel.is_fifo(3001));
    let fin = s.rt.stop();
    assert!(fin.vms.is_empty(), "no final status from a dead thread");
}

/// The engine thread panics, and so does the engine's shutdown while it unwinds (here: the
/// guest's publisher, told `Disabled`): the threads are restored first, so the second panic
/// neither aborts the process nor leaves a thread boosted.
#[test]
fn a_second_panic_in_the_engines_shutdown_still_restores_every_thread() {
    struct PanicsWhenDisabled(Arc<AtomicBool>);
    impl Publisher for PanicsWhenDisabled {
        fn publish(&mut self, _: VcpuKey, state: BoostState) -> Option<u32> {
            if state == BoostState::Disabled && self.0.load(Ordering::Acquire) {
                panic!("fake publisher fails at shutdown");
            }
            None
        }
    }
    let s = setup();
    let armed = Arc::new(AtomicBool::new(false));
    let parts = VmParts {
        publisher: Some(Box::new(PanicsWhenDisabled(armed.clone()))),
        sources: Vec::new(),
    };
    s.h.add_vm(0, "static", &DriverOptions::new(), parts)
        .unwrap();
    let _v = s.h.add_vcpu(K0, 3101, false).unwrap();
    assert!(s.kernel.is_fifo(3101));
    armed.store(true, Ordering::Release);
    s.panic.store(true, Ordering::Release);
    s.feed.send(Event::new(K0, VcpuEvent::Interrupt));
    wait_for("restore on a double panic", || !s.kernel.is_fifo(3101));
    let fin = s.rt.stop();
    assert!(fin.vms.is_empty(), "no final status from a dead thread");
}

/// The publisher sees every state and its handshake re-read feeds the engine.
#[test]
fn publisher_gets_states_and_feeds_back_requests() {
    struct Slot(Arc<Mutex<Vec<BoostState>>>, u32);
    impl Publisher for Slot {
        fn publish(&mut self, _: VcpuKey, state: BoostState) -> Option<u32> {
            self.0.lock().unwrap().push(state);
            Some(self.1)
        }
    }
    let s = setup();
    let states = Arc::new(Mutex::new(Vec::new()));
    // The guest's slot says "RT task" the moment the host publishes Normal.
    let parts = VmParts {
        publisher: Some(Box::new(Slot(states.clone(), Reason::RtTask.bit()))),
        sources: Vec::new(),
    };
    s.h.add_vm(0, "dynamic", &fifo_tasks(&[]), parts).unwrap();
    let _v = s.h.add_vcpu(K0, 4001, false).unwrap();
    assert!(s.kernel.is_fifo(4001), "request seen in the handshake");
    assert_eq!(
        *states.lock().unwrap(),
        [BoostState::Normal, BoostState::Boosted]
    );
}

/// The kernel itself, on a real thread: boosted by the runtime, then restored to exactly its
/// original attributes when the runtime stops. Needs the privilege to set real-time classes.
#[test]
fn a_real_thread_is_boosted_and_restored_exactly() {
    use pvsched_host::sched::SchedGuard;
    if let Err(e) = SchedGuard::apply(0, SchedClass::Fifo(1)).and_then(|g| g.restore()) {
        pvsched_testutil::skip!("a_real_thread_is_boosted_and_restored_exactly: {e}");
        return;
    }
    let parked = pvsched_testutil::ParkedThread::spawn();
    let tid = parked.tid();
    let before = sched::get(tid).unwrap();
    let rt = Runtime::start(RuntimeConfig::default()).unwrap();
    let h = rt.handle();
    h.add_vm(0, "static", &opts(&["class=rr:4"]), no_parts())
        .unwrap();
    let _v = h.add_vcpu(K0, tid, false).unwrap();
    let a = sched::get(tid).unwrap();
    assert_eq!((a.policy, a.priority), (libc::SCHED_RR as u32, 4));
    let st = rt.stop();
    assert_eq!(st.apply_errors, 0, "{:?}", st.errors);
    assert_eq!(sched::get(tid).unwrap(), before, "restored exactly");
    drop(parked);
}

#[test]
fn a_refused_restore_is_counted_by_kind_and_tried_again() {
    let s = setup();
    s.h.add_vm(0, "static", &opts(&["class=fifo:7"]), no_parts())
        .unwrap();
    let k1 = VcpuKey::new(0, 1);
    let _a = s.h.add_vcpu(K0, 1001, false).unwrap();
    let _b = s.h.add_vcpu(k1, 1002, false).unwrap();
    assert!(s.kernel.is_fifo(1001) && s.kernel.is_fifo(1002));
    // The kernel refuses the next three changes of 1001 (busy) and every one of 1002.
    s.kernel
        .refuse
        .lock()
        .unwrap()
        .insert(1001, (3, libc::EBUSY));
    s.kernel
        .refuse
        .lock()
        .unwrap()
        .insert(1002, (u32::MAX, libc::EPERM));
    s.h.remove_vcpu(K0).unwrap();
    wait_for("1001 restored by a retry", || !s.kernel.is_fifo(1001));
    let st = s.h.status().unwrap();
    assert_eq!(st.apply_errors_by_kind.get("busy"), Some(&3), "{st:?}");
    assert!(st.unrestored.is_empty(), "{:?}", st.unrestored);
    assert!(
        st.errors
            .iter()
            .any(|e| e.contains("restore") && e.contains("1001")),
        "{:?}",
        st.errors
    );
    // 1002 cannot be restored: tried at the stop and a few times after, then reported.
    let fin = s.rt.stop();
    assert_eq!(fin.unrestored, vec![1002]);
    assert!(s.kernel.is_fifo(1002));
    let refused = fin.apply_errors_by_kind["permission"];
    assert!((3..=10).contains(&refused), "tried {refused} times");
}

#[test]
fn a_boost_let_go_by_a_removed_vcpu_goes_to_the_waiting_one() {
    let kernel = Arc::new(FakeKernel::default());
    let rt = Runtime::start(RuntimeConfig {
        applier: kernel.clone(),
        max_boosted: Some(1),
        cap_quantum: 10_000_000_000,
        ..RuntimeConfig::default()
    })
    .unwrap();
    let h = rt.handle();
    for vm in 0..3 {
        h.add_vm(vm, "static", &opts(&["class=fifo:7"]), no_parts())
            .unwrap();
    }
    let (a, b, c) = (VcpuKey::new(0, 0), VcpuKey::new(1, 0), VcpuKey::new(2, 0));
    let _a = h.add_vcpu(a, 1001, false).unwrap();
    let _b = h.add_vcpu(b, 1002, false).unwrap();
    let _c = h.add_vcpu(c, 1003, false).unwrap();
    assert!(kernel.is_fifo(1001) && !kernel.is_fifo(1002) && !kernel.is_fifo(1003));
    // The boosted vCPU's VM goes: the oldest waiter gets the boost, applied at once.
    h.remove_vm(0).unwrap();
    wait_for("1002 boosted", || kernel.is_fifo(1002));
    assert!(!kernel.is_fifo(1001) && !kernel.is_fifo(1003));
    // Likewise when the boosted vCPU alone is removed.
    h.remove_vcpu(b).unwrap();
    wait_for("1003 boosted", || kernel.is_fifo(1003));
    let st = h.status().unwrap();
    let capped: u64 = st.vms.iter().flat_map(|v| &v.vcpus).map(|v| v.capped).sum();
    assert_eq!(capped, 1, "{st:?}");
    rt.stop();
    assert!(!kernel.is_fifo(1003), "restored at stop");
}

/// A thread that sleeps until dropped: a "vCPU" that never waits for a CPU.
struct Sleeper {
    tid: i32,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sleeper {
    fn start() -> Sleeper {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            tx.send(gettid()).unwrap();
            while !s.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Sleeper {
            tid: rx.recv().unwrap(),
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn sources_go_lazy_while_every_vcpu_is_quiet() {
    let gate = |g: Option<QuietGate>| RuntimeConfig {
        quiet_gate: g,
        ..RuntimeConfig::default()
    };
    // Quiet unless the vCPU waited for a CPU the whole window: on a machine busy with other
    // tests a sleeping thread may wait for milliseconds after each wake-up, and turning
    // contended then is right, but not what this test is about.
    let fast = QuietGate {
        window: 10_000_000,
        quiet_after: 2,
        others: None,
        threshold_permille: 1000,
    };
    if QuietGate::default().others.is_none() {
        panic!("the default gate has the host-wide part");
    }
    let vcpu = Sleeper::start();
    if !std::path::Path::new(&format!("/proc/{}/schedstat", vcpu.tid)).exists() {
        eprintln!("SKIPPED sources_go_lazy_while_every_vcpu_is_quiet: no /proc/<tid>/schedstat");
        return;
    }
    let s = setup_with(gate(Some(fast)));
    s.h.add_vm(0, "dynamic", &fifo_tasks(&[]), no_parts())
        .unwrap();
    let v = s.h.add_vcpu(K0, vcpu.tid, false).unwrap();
    wait_for("the source told that every vCPU is quiet", || {
        s.lazy.lock().unwrap().last() == Some(&true)
    });
    // While lazy the source is read on its period, without being readable.
    let before = s.lazy_drains.load(Ordering::Relaxed);
    wait_for("a periodic drain", || {
        s.lazy_drains.load(Ordering::Relaxed) >= before + 2
    });
    // A host event is still delivered and counted (no boost: the vCPU is quiet).
    s.feed.send(Event::new(K0, VcpuEvent::Interrupt));
    wait_for("the event counted", || {
        s.h.status().unwrap().vms[0].host_events == 1
    });
    assert!(!s.kernel.is_fifo(vcpu.tid), "no boost while quiet");
    let st = s.h.status().unwrap();
    assert!(st.cost.quiet_s > 0.0, "{:?}", st.cost);
    assert_eq!(
        st.cost.self_contended_s, 0.0,
        "no host-wide gate configured"
    );
    drop(v);
    s.h.remove_vcpu(K0).unwrap();
    wait_for("no vCPU left: not lazy", || {
        s.lazy.lock().unwrap().last() == Some(&false)
    });
    s.rt.stop();

    // Negative control: without the gate a source is never told to go lazy.
    let s = setup_with(gate(None));
    s.h.add_vm(0, "dynamic", &fifo_tasks(&[]), no_parts())
        .unwrap();
    let _v = s.h.add_vcpu(K0, vcpu.tid, false).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(s.lazy.lock().unwrap().is_empty());
    s.rt.stop();
}

/// A class changed behind the runtime's back (as a lost update between two threads would leave
/// it) is found at the next quiet-gate window and set again.
#[test]
fn a_thread_found_in_another_class_is_set_again() {
    let vcpu = Sleeper::start();
    if !std::path::Path::new(&format!("/proc/{}/schedstat", vcpu.tid)).exists() {
        eprintln!("SKIPPED a_thread_found_in_another_class_is_set_again: no /proc/<tid>/schedstat");
        return;
    }
    let s = setup_with(RuntimeConfig {
        quiet_gate: Some(QuietGate {
            window: 10_000_000,
            others: None,
            ..QuietGate::default()
        }),
        ..RuntimeConfig::default()
    });
    s.h.add_vm(0, "static", &opts(&["class=fifo:7"]), no_parts())
        .unwrap();
    let _v = s.h.add_vcpu(K0, vcpu.tid, false).unwrap();
    assert!(s.kernel.is_fifo(vcpu.tid));
    s.kernel
        .attrs
        .lock()
        .unwrap()
        .insert(vcpu.tid, SchedClass::Other.attr());
    wait_for("the boost set again", || s.kernel.is_fifo(vcpu.tid));
    let st = s.h.status().unwrap();
    assert_eq!(st.cost.reconciled, 1, "{:?}", st.cost);
    // Nothing to set again while the record and the kernel agree.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(s.h.status().unwrap().cost.reconciled, 1);
    s.rt.stop();
}

/// A vCPU that speaks pvsched v3 through the runtime: its page read in, the selector's class
/// applied (FIFO, `SCHED_IDLE` deboost), the feedback word published with the re-read, and
/// the original attributes back at the end.
#[test]
fn a_v3_page_drives_boosts_deboosts_and_feedback() {
    use pvsched_proto::v3::{AppliedState, BoostKind, GuestArea, PageError, TaskDesc, TaskIntent};
    struct Page(Arc<Mutex<(GuestArea, Vec<AppliedState>)>>);
    impl Publisher for Page {
        fn publish(&mut self, _: VcpuKey, _: BoostState) -> Option<u32> {
            None
        }
        fn publish_v3(
            &mut self,
            _: VcpuKey,
            applied: AppliedState,
            _ticket: u64,
        ) -> Option<Result<GuestArea, PageError>> {
            let mut p = self.0.lock().unwrap();
            p.1.push(applied);
            Some(Ok(p.0))
        }
    }
    let s = setup();
    let page = Arc::new(Mutex::new((GuestArea::default(), Vec::new())));
    let parts = VmParts {
        publisher: Some(Box::new(Page(page.clone()))),
        sources: Vec::new(),
    };
    s.h.add_vm(0, "v3-default", &DriverOptions::new(), parts)
        .unwrap();
    let _v = s.h.add_vcpu(K0, 4101, false).unwrap();
    let area = |current: TaskDesc| GuestArea {
        intent: TaskIntent {
            current,
            pending: None,
            idle: current == TaskDesc::idle(),
        },
        ..GuestArea::default()
    };
    let say = |a: GuestArea| {
        page.lock().unwrap().0 = a;
        s.feed.send(Event::new(K0, VcpuEvent::Intent(a)));
    };
    say(area(TaskDesc::fifo(20)));
    wait_for("FIFO 20", || {
        s.kernel.attr(4101) == SchedClass::Fifo(20).attr()
    });
    assert_eq!(
        page.lock().unwrap().1.last().map(|a| a.boost),
        Some(BoostKind::Task)
    );
    say(area(TaskDesc::idle()));
    wait_for("SCHED_IDLE", || {
        s.kernel.attr(4101).policy == libc::SCHED_IDLE as u32
    });
    assert_eq!(
        page.lock().unwrap().1.last().map(|a| a.boost),
        Some(BoostKind::Baseline)
    );
    drop(s.rt);
    assert_eq!(
        s.kernel.attr(4101),
        SchedClass::Other.attr(),
        "restored at the end"
    );
}

/// A VM's source that is always readable (a guest ringing its doorbell in a loop): the engine
/// thread drains it at 5 000 drains a second on average (plus a burst of 50), not as fast as
/// it can, and counts the pauses.
#[test]
fn a_vm_source_always_ringing_is_read_at_a_bounded_rate() {
    struct Ringing {
        efd: EventFd,
        drains: Arc<AtomicU64>,
    }
    impl EventSource for Ringing {
        fn name(&self) -> &str {
            "ringing"
        }
        fn fd(&self) -> Option<RawFd> {
            Some(self.efd.as_raw_fd())
        }
        fn drain(&mut self, _now: Nanos, _out: &mut Vec<Event>) -> Option<Nanos> {
            // Never reads the eventfd: it stays readable, as under a guest that keeps ringing.
            self.drains.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
    let s = setup();
    let drains = Arc::new(AtomicU64::new(0));
    let efd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    efd.write(1).unwrap();
    let parts = VmParts {
        publisher: None,
        sources: vec![Box::new(Ringing {
            efd,
            drains: drains.clone(),
        })],
    };
    let t0 = Instant::now();
    s.h.add_vm(0, "dynamic", &fifo_tasks(&[]), parts).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    s.h.remove_vm(0).unwrap();
    let elapsed = t0.elapsed();
    let n = drains.load(Ordering::Relaxed);
    // GCRA: at most one drain per 200 µs of the elapsed time, plus the 10 ms burst, plus one.
    let bound = elapsed.as_nanos() as u64 / 200_000 + 51;
    assert!(n <= bound, "{n} drains in {elapsed:?} (at most {bound})");
    let pauses = s.h.status().unwrap().cost.source_pauses;
    assert!(pauses > 0, "{n} drains, no pause");
    s.rt.stop();
}
