//! The engine runtime: the one loop that runs the policy engine for every host of it (the
//! reference VMM and its bench, the daemon for foreign VMMs).
//!
//! Events come from [`EventSource`]s (tracepoints, guest slots in a memory file, VMM injection
//! hooks), from the vCPU threads themselves ([`VcpuHandle`]) and from the engine's timers;
//! decisions take effect through an [`Applier`] (`sched_setattr`) and a per-VM
//! [`Publisher`] (the guest's slot). Control requests ([`RuntimeHandle`]) arrive as commands
//! over a channel, so no I/O of a control plane ever runs on the real-time thread.
//!
//! # Who applies a decision
//!
//! Each vCPU thread has a [`ThreadCell`]: the class the engine wants for it (`want`) and the
//! class last applied (`applied`). A decision only changes `want`; it is then *realized* by
//! whichever thread made it:
//!
//! - a vCPU thread that runs the engine for itself at an exit it takes anyway
//!   ([`VcpuHandle::handle`]) applies its own boost or unboost with `sched_setattr` on itself:
//!   no wake-up of another thread and no cross-CPU reschedule;
//! - the engine thread applies what the vCPU cannot (a timer that comes due while the vCPU is
//!   preempted or halted, a tracepoint, a budget running out) on the vCPU's thread id.
//!
//! The two can race only when a vCPU lowers itself while another thread raises it. The vCPU
//! marks itself in flight before it reads `want` and checks `want` again after its
//! `sched_setattr`; the other thread checks the in-flight mark after its own (Dekker's
//! pattern, as in the slot handshake), so the vCPU's thread re-applies the latest class when
//! it runs again. But a thread that lowers itself is often preempted inside that very call
//! (for a scheduler tick, 10 ms here), with the boost decided meanwhile missing from the
//! kernel: so after such a race the engine thread looks at the thread's class 50 µs later
//! and sets the boost again if it is missing (and looks again while the change stays in
//! flight, each time twice as late, for about 100 ms in all).
//!
//! The engine's state (the core) is behind a priority-inheriting lock. A vCPU thread takes it
//! only if it is free (else it tries again at its next exit; a flag tells it the core is held
//! without a system call); the engine thread waits for it,
//! and a vCPU thread preempted while holding it (by a boosted sibling on its CPU, say) then
//! runs at the engine thread's real-time priority until it lets go. The engine thread's timer
//! is set under the same lock, so settings cannot overtake each other.
//!
//! A vCPU thread in a `SCHED_DEADLINE` class (a `deadline:` boost, or its own class) never
//! takes the core: the kernel stops such a thread when its runtime is spent, wherever it is,
//! and lending it a real-time priority does not make it run again. Seen with `pvsched vm
//! --policy deadline-aware --policy-opt class_deadline=deadline:300us/1ms`: a vCPU throttled
//! inside its hook held the core, the engine thread waited for it, nobody ended the boost,
//! and the run never finished. Such a thread hands what it saw at its exits to the engine
//! thread instead (a bounded queue taken only with `try_lock` on both sides, and a wake-up),
//! which decides and applies for it as for a vCPU it cannot reach; its timers get no grace.
//!
//! Timers of a vCPU whose thread is running the guest and calling its handle (a "hooked",
//! active vCPU) are given a short grace before the engine thread wakes for them: the vCPU
//! usually handles them itself at its next exit, and the engine thread sleeps on. A lead timer
//! of a vCPU boosted already changes no class and wakes nobody: it fires with whatever next
//! runs the engine for that vCPU (an event that ends the boost and the lead's boost then fall
//! in one round, which changes no class).
//!
//! # Restoring
//!
//! Every thread is restored to the attributes it had when it was added: when it is removed,
//! when its VM is removed, when the runtime stops, and when the engine thread panics (a guard
//! restores while unwinding). After the runtime stopped, vCPU handles do nothing.

use crate::clock::{mono_ns, thread_cpu_ns, DeadlineTimer};
use crate::mechanism::{helper_class, helper_deadline, sched_class, EngineClass, Publisher};
use crate::pressure::{cpu_idle_ns, CpuBusy, OthersVerdict, QuietGate, VcpuSampler};
use crate::sched::{self, SchedAttr, SchedClass};
use crate::stats::{AtomicHist, LatencyStats};
use priority_inheriting_lock::{PriorityInheritingLock, PriorityInheritingLockGuard};
use pvsched_policy::{
    BoostClass, BoostState, Decision, DriverOptions, Engine, EngineError, Event, Nanos, Registry,
    TimerKind, VcpuEvent, VcpuKey,
};
use pvsched_proto::Reasons;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, OnceLock};

/// The core, held; re-arms the engine thread's timer if a thread that could not take the core
/// asked for it ([`Shared::rearm`]), and clears [`Shared::core_held`], before it lets go.
struct CoreGuard<'a> {
    guard: PriorityInheritingLockGuard<'a, Core>,
    shared: &'a Shared,
}

impl std::ops::Deref for CoreGuard<'_> {
    type Target = Core;
    fn deref(&self) -> &Core {
        &self.guard
    }
}

impl std::ops::DerefMut for CoreGuard<'_> {
    fn deref_mut(&mut self) -> &mut Core {
        &mut self.guard
    }
}

impl Drop for CoreGuard<'_> {
    fn drop(&mut self) {
        // Not while unwinding: a second panic here would abort before the restore guard runs;
        // a timer left as it was costs at most a wake-up for nothing.
        if !std::thread::panicking() && self.shared.rearm.swap(false, Ordering::AcqRel) {
            self.guard.arm(self.shared, mono_ns());
        }
        // Before the unlock (the guard's field drops after this): a thread that sees it
        // clear and finds the lock still held for a moment takes the slow path once.
        self.shared.core_held.store(false, Ordering::Release);
    }
}
use std::thread::JoinHandle;
use std::time::Duration;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// `Shared::engine_prio` of an engine thread on its deadline reservation: above every FIFO
/// priority, so it is never raised again.
const ENGINE_DEADLINE: u32 = 100;

/// Rounds of handshake follow-ups per batch (a guest that flips its request as fast as it
/// can must not keep a thread busy for ever).
const MAX_ROUNDS: usize = 8;
/// Distinct boost classes a runtime can apply over its life.
const MAX_CLASSES: usize = 64;
/// `want`/`applied` code of the thread's original attributes.
const ORIGINAL: u64 = 0;
/// `applied` code meaning "unknown: apply again".
const UNKNOWN: u64 = u64::MAX;
/// How late the engine thread may wake for a budget check or a cap rotation, so that they
/// share wake-ups.
const BUDGET_SLACK_NS: Nanos = 100_000;
/// The end of a repayment waits up to this long for another wake-up to share.
const REPAY_SLACK_NS: Nanos = 1_000_000;
/// Lead timers due this soon are fired together with an earlier wake-up of the engine thread.
const COALESCE_NS: Nanos = 50_000;
/// Items the hand-off queue of vCPU threads in a deadline class holds (see [`Shared`]); an
/// exit that finds it full is handed off again at the next one.
const HANDOFF_CAP: usize = 256;

/// What a vCPU thread in a deadline class hands to the engine thread.
#[derive(Clone, Copy, Debug)]
enum Handoff {
    /// An event it observed.
    Event(Event),
    /// Its slot was just registered: publish the engine's state for it again.
    Republish(VcpuKey),
}

/// A hooked vCPU that called its handle within this window counts as running (the default
/// of [`RuntimeConfig::active`]).
const ACTIVE_NS: Nanos = 1_000_000;
/// After a change raced with a vCPU changing itself, the engine thread looks at that thread's
/// class this much later, and again while the change stays in flight, each time twice as
/// late (see [`recheck_delay`]), up to [`RECHECK_TRIES`] looks.
const RECHECK_NS: Nanos = 50_000;
/// Looks at a raced thread before leaving it to its own thread and the reconciliation: with
/// the back-off, about 100 ms of a change in flight (a thread preempted inside its call on a
/// busy host).
const RECHECK_TRIES: u32 = 16;

/// When the engine thread looks at a raced thread for the `tries`-th time after the first:
/// [`RECHECK_NS`] doubled each time, at most 256 times (12.8 ms). Soon after the race (the
/// common case: a call still in flight for a few µs) looks are cheap and close; a call held
/// up for a scheduler tick or more is looked at rarely rather than every 50 µs.
fn recheck_delay(tries: u32) -> Nanos {
    RECHECK_NS << tries.min(8)
}
/// How long a control request waits for the engine thread.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// Errors remembered for status (the count is kept in full).
const ERRORS_KEPT: usize = 8;
/// How often a restore the kernel refused is tried again.
const RETRY_NS: Nanos = 20_000_000;
/// Kinds of `sched_setattr` failures, as counted in [`Status::apply_errors_by_kind`] (a thread
/// that is gone is no failure).
pub const APPLY_ERROR_KINDS: [&str; 5] = ["permission", "invalid", "busy", "unsupported", "other"];

/// The kind of a failed change (an index into [`APPLY_ERROR_KINDS`]); `None` for a thread
/// that is gone.
fn error_kind(e: &sched::Error) -> Option<usize> {
    match e {
        sched::Error::NoThread { .. } => None,
        sched::Error::Permission { .. } => Some(0),
        sched::Error::Set { source, .. } | sched::Error::Get { source, .. } => {
            Some(match source.raw_os_error() {
                Some(libc::EINVAL) => 1,
                Some(libc::EBUSY) => 2,
                Some(libc::EPERM) => 0,
                _ => 4,
            })
        }
        sched::Error::Unsupported { .. } => Some(3),
    }
}

const TOKEN_TIMER: u64 = 0;
const TOKEN_COMMAND: u64 = 1;
const TOKEN_SOURCE: u64 = 2;

/// Where the scheduling attributes of threads are read and changed.
pub trait Applier: Send + Sync + 'static {
    /// Reads thread `tid`'s attributes.
    fn get(&self, tid: i32) -> Result<SchedAttr, sched::Error>;
    /// Sets thread `tid`'s attributes. Called by the thread itself or by another one.
    fn set(&self, tid: i32, attr: &SchedAttr) -> Result<(), sched::Error>;
    /// Thread `tid` becomes a vCPU of the runtime (before its attributes are first read).
    fn attach(&self, _tid: i32) -> Result<(), sched::Error> {
        Ok(())
    }
    /// Thread `tid` is no vCPU of the runtime any more (after it was restored).
    fn detach(&self, _tid: i32) {}
}

/// The kernel: `sched_getattr` / `sched_setattr`.
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelApplier;

impl Applier for KernelApplier {
    fn get(&self, tid: i32) -> Result<SchedAttr, sched::Error> {
        sched::get(tid)
    }
    fn set(&self, tid: i32, attr: &SchedAttr) -> Result<(), sched::Error> {
        sched::set(tid, attr)
    }
}

/// The kernel, for threads of other processes (the daemon's): each attached thread is held
/// by identity ([`sched::ThreadHandle`]) and every read and change first checks that it is
/// still the thread attached, so an id the kernel has given to a new thread after the vCPU
/// exited is never touched.
#[derive(Debug, Default)]
pub struct VerifiedApplier {
    threads: Mutex<BTreeMap<i32, sched::ThreadHandle>>,
}

impl VerifiedApplier {
    fn threads(&self) -> MutexGuard<'_, BTreeMap<i32, sched::ThreadHandle>> {
        self.threads.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Applier for VerifiedApplier {
    fn get(&self, tid: i32) -> Result<SchedAttr, sched::Error> {
        if self.threads().get(&tid).is_some_and(|h| !h.alive()) {
            return Err(sched::Error::NoThread { tid });
        }
        sched::get(tid)
    }
    fn set(&self, tid: i32, attr: &SchedAttr) -> Result<(), sched::Error> {
        match self.threads().get(&tid) {
            Some(h) => h.set(attr),
            // Not a vCPU: only a thread of this process (the runtime's own engine thread).
            None if std::path::Path::new(&format!("/proc/self/task/{tid}")).exists() => {
                sched::set(tid, attr)
            }
            None => Err(sched::Error::NoThread { tid }),
        }
    }
    fn attach(&self, tid: i32) -> Result<(), sched::Error> {
        let h = sched::ThreadHandle::open(tid)?;
        self.threads().insert(tid, h);
        Ok(())
    }
    fn detach(&self, tid: i32) {
        self.threads().remove(&tid);
    }
}

/// Where events come from, besides the vCPU threads and the timers.
pub trait EventSource: Send {
    /// A short name for status and errors.
    fn name(&self) -> &str;
    /// An fd that is readable when events are pending, if the source has one.
    fn fd(&self) -> Option<RawFd>;
    /// For sources that must be looked at periodically (no fd to wait on): how often.
    fn poll_period(&self) -> Option<Nanos> {
        None
    }
    /// Appends the pending events; returns when the earliest of them was observed (for the
    /// decision → applied latency), if known.
    fn drain(&mut self, now: Nanos, out: &mut Vec<Event>) -> Option<Nanos>;
    /// A vCPU thread was added (e.g. open its per-thread tracepoints).
    fn attach(&mut self, _key: VcpuKey, _tid: i32) -> Result<(), String> {
        Ok(())
    }
    /// A vCPU thread was removed.
    fn detach(&mut self, _key: VcpuKey) {}
    /// Records the source lost (kernel ring overruns, throttling).
    fn lost(&self) -> u64 {
        0
    }
    /// Every attached vCPU is quiet (`true`) or one no longer is: while quiet, no event can
    /// start a boost, and a source may deliver its events late, in batches (through
    /// [`EventSource::poll_period`]), instead of waking the engine for each.
    fn set_lazy(&mut self, _lazy: bool) {}
}

/// Errors of the runtime's control requests.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The engine refused (unknown driver, bad option, unknown VM).
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// A thread's attributes could not be read when it was added.
    #[error("cannot add vCPU {key}")]
    Thread {
        /// The vCPU.
        key: VcpuKey,
        /// Why.
        #[source]
        source: sched::Error,
    },
    /// A class the options name is not available on this kernel.
    #[error("option {key}")]
    Class {
        /// The option.
        key: String,
        /// Why.
        #[source]
        source: sched::Error,
    },
    /// The vCPU is known already.
    #[error("vCPU {0} is attached already")]
    Duplicate(VcpuKey),
    /// The thread is attached already (as another vCPU).
    #[error("thread {tid} is attached already as {key}")]
    DuplicateTid {
        /// The thread.
        tid: i32,
        /// Where it is attached.
        key: VcpuKey,
    },
    /// No such vCPU.
    #[error("no vCPU {0}")]
    UnknownVcpu(VcpuKey),
    /// A source refused a thread.
    #[error("event source {0}: {1}")]
    Source(String, String),
    /// The engine thread is gone.
    #[error("the engine runtime has stopped")]
    Stopped,
    /// The engine thread did not answer in time.
    #[error("the engine runtime did not answer within {0:?}")]
    Timeout(Duration),
    /// The engine thread or its wait set could not be created.
    #[error("cannot start the engine runtime")]
    Io(#[from] std::io::Error),
}

/// One vCPU thread as the runtime sees it.
pub struct ThreadCell {
    key: VcpuKey,
    tid: i32,
    original: SchedAttr,
    want: AtomicU64,
    applied: AtomicU64,
    inflight: AtomicU32,
    /// Bumped by every other thread after its `sched_setattr` on this thread: a change of the
    /// vCPU's own that saw it move may have been overtaken (see [`Shared::realize`]).
    remote_done: AtomicU64,
    /// Threads inside a `sched_setattr` on this thread and the record of its outcome.
    setting: AtomicU32,
    hooked: AtomicBool,
    last_exit: AtomicU64,
    /// Earliest live timer of this vCPU (`u64::MAX`: none).
    next_timer: AtomicU64,
    /// When the boost being applied was decided on (its trigger).
    boost_trigger: AtomicU64,
    /// Class code of the boost in force (`ORIGINAL`: none; a repayment's class is no boost).
    boost_code: AtomicU64,
    host_events: AtomicU64,
    self_sets: AtomicU64,
    remote_sets: AtomicU64,
    apply_errors: AtomicU64,
    hook_calls: AtomicU64,
    boost_latency: AtomicHist,
    /// Time its own thread held it off the CPU while it was paying back a boost, ns
    /// ([`VcpuHandle::repay_pause`]).
    paused: AtomicU64,
    /// Paused time not yet reported to the engine ([`VcpuEvent::Paused`]), ns.
    paused_unreported: AtomicU64,
    /// What the vCPU still owes in paused time as of its last repayment decision, less what it
    /// paused since ([`pvsched_policy::VcpuState::pause_owed`]), ns: a pause is no longer.
    pause_left: AtomicU64,
    /// The last attempt to restore the original attributes failed (it is retried).
    failed: AtomicBool,
    /// No longer a vCPU of the runtime.
    removed: AtomicBool,
}

impl ThreadCell {
    fn new(key: VcpuKey, tid: i32, original: SchedAttr, hooked: bool) -> Self {
        ThreadCell {
            key,
            tid,
            original,
            want: AtomicU64::new(ORIGINAL),
            applied: AtomicU64::new(ORIGINAL),
            inflight: AtomicU32::new(0),
            remote_done: AtomicU64::new(0),
            setting: AtomicU32::new(0),
            hooked: AtomicBool::new(hooked),
            last_exit: AtomicU64::new(0),
            next_timer: AtomicU64::new(u64::MAX),
            boost_trigger: AtomicU64::new(0),
            boost_code: AtomicU64::new(ORIGINAL),
            paused: AtomicU64::new(0),
            paused_unreported: AtomicU64::new(0),
            pause_left: AtomicU64::new(0),
            host_events: AtomicU64::new(0),
            self_sets: AtomicU64::new(0),
            remote_sets: AtomicU64::new(0),
            apply_errors: AtomicU64::new(0),
            hook_calls: AtomicU64::new(0),
            boost_latency: AtomicHist::new(),
            failed: AtomicBool::new(false),
            removed: AtomicBool::new(false),
        }
    }

    /// True when the class wanted is not the one last applied (and that one is known): a
    /// decision some thread has yet to apply, or is applying.
    fn unapplied(&self) -> bool {
        let applied = self.applied.load(Ordering::Acquire);
        applied != UNKNOWN && applied != self.want.load(Ordering::Acquire)
    }

    /// True when the thread is, or is about to be, in a `SCHED_DEADLINE` class (applied or
    /// wanted; its original class when that is what it is in): the kernel may stop it
    /// anywhere once its runtime is spent, so it must not hold the core (module doc).
    fn may_throttle(&self, classes: &ClassTable) -> bool {
        [&self.applied, &self.want].iter().any(|code| {
            self.attr_of(classes, code.load(Ordering::Acquire))
                .is_some_and(|a| a.is_deadline())
        })
    }

    /// The attributes class `code` puts this thread in (`None`: unknown). A repayment by
    /// pausing keeps a hooked thread's own attributes (it pauses at its exits instead) and
    /// puts any other at its fallback nice.
    fn attr_of(&self, classes: &ClassTable, code: u64) -> Option<SchedAttr> {
        match code {
            ORIGINAL => Some(self.original),
            c => classes.get(c).map(|e| {
                if e.pause > 0 && self.hooked.load(Ordering::Relaxed) {
                    self.original
                } else {
                    e.attr
                }
            }),
        }
    }

    /// True while the kernel has the boost class (not a repayment's) applied.
    fn is_boosted(&self) -> bool {
        let applied = self.applied.load(Ordering::Acquire);
        applied != ORIGINAL && applied == self.boost_code.load(Ordering::Acquire)
    }
}

/// One interned class: the attributes it applies and, for a repayment by pausing
/// ([`BoostClass::Pause`]), the longest pause (0: none).
#[derive(Clone, Copy, Debug)]
struct ClassEntry {
    attr: SchedAttr,
    pause: Nanos,
}

impl ClassEntry {
    fn new(class: BoostClass) -> Self {
        ClassEntry {
            attr: sched_class(class).attr(),
            pause: match class {
                BoostClass::Pause(ns) => ns,
                _ => 0,
            },
        }
    }
}

/// Classes interned by code (`code - 1` indexes the table); append-only, so a thread can read
/// an entry without a lock.
struct ClassTable {
    entries: Vec<OnceLock<ClassEntry>>,
}

impl ClassTable {
    fn new() -> Self {
        ClassTable {
            entries: (0..MAX_CLASSES).map(|_| OnceLock::new()).collect(),
        }
    }

    fn get(&self, code: u64) -> Option<ClassEntry> {
        let i = code.checked_sub(1)? as usize;
        self.entries.get(i)?.get().copied()
    }
}

/// What all the runtime's threads share.
struct Shared {
    /// Priority-inheriting: the engine thread waiting for a vCPU thread that holds the core
    /// lends it its real-time priority (a plain mutex left it preempted behind a boosted
    /// vCPU for a scheduler tick, 10 ms here, with every timer of the runtime stuck).
    core: PriorityInheritingLock<Core>,
    /// Set while a thread holds the core. A vCPU thread that finds it set does not try the
    /// lock: a failed try of a priority-inheriting futex is a system call
    /// (`FUTEX_TRYLOCK_PI`) that also marks the futex contended, so the holder's unlock
    /// becomes one too (`FUTEX_UNLOCK_PI`).
    core_held: AtomicBool,
    /// The engine thread's timer is armed for a time that no longer holds (a look after a race
    /// was dropped, see [`Shared::settled`]): whoever holds the core re-arms it as it lets go,
    /// so that the engine thread does not wake for nothing.
    rearm: AtomicBool,
    applier: Arc<dyn Applier>,
    classes: ClassTable,
    timer: DeadlineTimer,
    wake: EventFd,
    stopped: AtomicBool,
    engine_tid: AtomicU32,
    /// The engine thread's real-time priority (0: not raised yet; [`ENGINE_DEADLINE`]: a
    /// deadline reservation, above them all).
    engine_prio: AtomicU32,
    engine_class: EngineClass,
    grace: Nanos,
    /// See [`RuntimeConfig::active`].
    active: Nanos,
    errors: Mutex<VecDeque<String>>,
    error_count: AtomicU64,
    /// Failed changes by kind ([`APPLY_ERROR_KINDS`]).
    error_kinds: [AtomicU64; APPLY_ERROR_KINDS.len()],
    /// Threads whose restore failed, tried again every [`RETRY_NS`].
    pending: Mutex<Vec<Arc<ThreadCell>>>,
    hook_busy: AtomicU64,
    /// What vCPU threads in a deadline class saw at their exits, for the engine thread
    /// ([`VcpuHandle::hand_off`]); at most [`HANDOFF_CAP`] items, preallocated. Taken only
    /// with `try_lock`: a holder the kernel stopped delays the hand-off, never a thread.
    handoff: Mutex<Vec<Handoff>>,
    /// Set when `handoff` may hold items the engine thread has not taken.
    handoff_pending: AtomicBool,
    /// Exits handed off so.
    handoffs: AtomicU64,
    /// Timers fired by the engine thread / by vCPU threads for themselves.
    timers_engine: AtomicU64,
    timers_vcpu: AtomicU64,
    /// Changes applied again after racing with a vCPU lowering itself.
    rechecks: AtomicU64,
    /// Threads found in another class than the runtime had recorded, and set again.
    reconciled: AtomicU64,
    /// Threads whose change raced with their own thread changing itself, to be looked at by
    /// the engine thread: each with the looks so far and when the next one is due;
    /// `recheck_at` is the earliest of those (`NO_TIMER`: none). Priority-inheriting, like
    /// the core: vCPU threads add to it.
    recheck: PriorityInheritingLock<Vec<Recheck>>,
    recheck_at: AtomicU64,
    /// Races after which the engine thread found the wanted class missing and set it.
    recheck_fixed: AtomicU64,
    /// Races the vCPU's own thread settled (applied its latest class after the other
    /// thread's change) before the engine thread looked.
    recheck_settled: AtomicU64,
}

/// A raced thread the engine thread looks at (see [`Shared::defer_recheck`]).
struct Recheck {
    cell: Arc<ThreadCell>,
    /// Looks so far.
    tries: u32,
    /// When the next look is due.
    due: Nanos,
}

/// `Core::armed` as stored when the engine thread's timer is off, and `recheck_at` when no
/// recheck is pending.
const NO_TIMER: u64 = u64::MAX;

impl Shared {
    /// The core, unless another thread holds it (counted).
    fn try_core(&self) -> Option<CoreGuard<'_>> {
        let g = self.try_core_uncounted();
        if g.is_none() {
            self.hook_busy.fetch_add(1, Ordering::Relaxed);
        }
        g
    }

    /// The core, unless another thread holds it; not counted as a hook that found the engine
    /// busy (for re-arming the timer after a recheck changed, which the holder does anyway).
    fn try_core_uncounted(&self) -> Option<CoreGuard<'_>> {
        if self.core_held.load(Ordering::Acquire) {
            return None;
        }
        self.core.try_lock().map(|g| self.held(g))
    }

    /// The core, waiting for it: the holder (a vCPU thread preempted inside its hook, say)
    /// inherits the waiting thread's class until it lets go.
    fn lock(&self) -> CoreGuard<'_> {
        let g = self.core.lock();
        self.held(g)
    }

    fn held<'a>(&'a self, guard: PriorityInheritingLockGuard<'a, Core>) -> CoreGuard<'a> {
        self.core_held.store(true, Ordering::Release);
        CoreGuard {
            guard,
            shared: self,
        }
    }

    /// The hand-off queue, unless another thread holds it (never waits: its holder may be a
    /// thread the kernel stopped). A queue poisoned by a panic is still a plain list.
    fn try_handoff(&self) -> Option<MutexGuard<'_, Vec<Handoff>>> {
        match self.handoff.try_lock() {
            Ok(q) => Some(q),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    fn note_error(&self, what: String) {
        let n = self.error_count.fetch_add(1, Ordering::Relaxed) + 1;
        // Logged: the first ten, then every power of two (a thread the kernel keeps refusing
        // must not flood the log); all are counted.
        if n <= 10 || n.is_power_of_two() {
            tracing::warn!(errors = n, "{what}");
        }
        if let Ok(mut e) = self.errors.try_lock() {
            if e.len() == ERRORS_KEPT {
                e.pop_front();
            }
            e.push_back(what);
        }
    }

    fn attr_of(&self, cell: &ThreadCell, code: u64) -> Option<SchedAttr> {
        cell.attr_of(&self.classes, code)
    }

    /// Applies `cell`'s wanted class. `own` is true on the cell's own thread. Returns false
    /// when another thread raced with the vCPU changing itself and left the last word to the
    /// vCPU's thread (or, rarely, when the races did not settle in a few rounds).
    ///
    /// Two threads may apply a class to the same vCPU thread at once (its own thread at an
    /// exit, another vCPU's thread or the engine thread), and either call may reach the kernel
    /// last, with a class older than `want`. Each thread therefore checks after its call:
    /// - another thread bumps `remote_done` after its call, then looks at `inflight`: while it
    ///   is set, the vCPU's thread will see the bump (it clears `inflight`, then reads
    ///   `remote_done`; all SeqCst, Dekker's pattern) and applies `want` once more, bypassing
    ///   the `applied` record (which the other thread may have just overwritten);
    /// - otherwise the other thread reads `want` again and, if it changed since it read it,
    ///   applies the newer class itself, again bypassing `applied`;
    /// - the vCPU's thread does the same when `want` changed during its call.
    ///
    /// While `inflight` is set another thread applies even a class it believes applied: a vCPU
    /// lowering itself is typically preempted inside that very call (the kernel has lowered it,
    /// the record has not caught up), for milliseconds next to a host thread.
    fn realize(&self, cell: &Arc<ThreadCell>, own: bool) -> bool {
        let mut force = false;
        for _ in 0..MAX_ROUNDS {
            let seen = if own {
                cell.inflight.store(1, Ordering::SeqCst);
                cell.remote_done.load(Ordering::SeqCst)
            } else {
                0
            };
            let w = cell.want.load(Ordering::SeqCst);
            let changing = !own && cell.inflight.load(Ordering::SeqCst) != 0;
            let skip = !force && !changing && w == cell.applied.load(Ordering::SeqCst);
            let attr = self.attr_of(cell, w);
            // A change between two classes with the same attributes (a thread that pays
            // back by pausing keeps its own; the repayment's end puts them back) needs no
            // system call, unless a race left the record in doubt.
            let same = !skip && !force && !changing && attr.is_some() && {
                let applied = cell.applied.load(Ordering::SeqCst);
                applied != UNKNOWN && self.attr_of(cell, applied) == attr
            };
            if same {
                cell.applied.store(w, Ordering::SeqCst);
            } else if !skip {
                // Marked for the reconciliation: a class read meanwhile may be this one,
                // not yet recorded.
                cell.setting.fetch_add(1, Ordering::SeqCst);
                let result = match attr {
                    Some(attr) => self.applier.set(cell.tid, &attr),
                    None => Ok(()),
                };
                self.record(cell, w, own, &result);
                cell.setting.fetch_sub(1, Ordering::SeqCst);
            }
            if own {
                cell.inflight.store(0, Ordering::SeqCst);
                let overtaken = cell.remote_done.load(Ordering::SeqCst) != seen;
                if !overtaken && cell.want.load(Ordering::SeqCst) == w {
                    return true;
                }
            } else {
                if skip {
                    return true;
                }
                cell.remote_done.fetch_add(1, Ordering::SeqCst);
                if cell.inflight.load(Ordering::SeqCst) != 0 {
                    // The vCPU's thread is changing itself: it will see the bump.
                    return false;
                }
                if cell.want.load(Ordering::SeqCst) == w {
                    return true;
                }
            }
            force = true;
        }
        false
    }

    /// Books the outcome of one `sched_setattr` of class code `w` on `cell`.
    fn record(&self, cell: &Arc<ThreadCell>, w: u64, own: bool, result: &Result<(), sched::Error>) {
        let counter = if own {
            &cell.self_sets
        } else {
            &cell.remote_sets
        };
        counter.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(()) => {
                if w != ORIGINAL && w == cell.boost_code.load(Ordering::Relaxed) {
                    let t = cell.boost_trigger.load(Ordering::Relaxed);
                    cell.boost_latency.record(mono_ns().saturating_sub(t));
                }
            }
            // A thread that is gone needs nothing more.
            Err(sched::Error::NoThread { .. }) => {}
            Err(e) => {
                cell.apply_errors.fetch_add(1, Ordering::Relaxed);
                if let Some(k) = error_kind(e) {
                    self.error_kinds[k].fetch_add(1, Ordering::Relaxed);
                }
                let what = if w == ORIGINAL { "restore" } else { "change" };
                self.note_error(format!("{} (tid {}): {what}: {e}", cell.key, cell.tid));
            }
        }
        // A restore that failed leaves the class unknown and is tried again (at the next
        // change, and by the engine thread every RETRY_NS).
        let restore_failed =
            w == ORIGINAL && result.as_ref().is_err_and(|e| error_kind(e).is_some());
        if restore_failed {
            if !cell.failed.swap(true, Ordering::AcqRel) {
                self.pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(cell.clone());
            }
        } else if result.is_ok() || w == ORIGINAL {
            cell.failed.store(false, Ordering::Release);
        }
        cell.applied
            .store(if restore_failed { UNKNOWN } else { w }, Ordering::SeqCst);
    }

    /// Tries again the restores that failed; returns how many still fail.
    fn retry_restores(&self) -> usize {
        let list = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        let mut left = Vec::new();
        for c in list {
            // A newer decision (a boost) supersedes a restore of a vCPU still attached.
            if c.want.load(Ordering::SeqCst) == ORIGINAL {
                c.applied.store(UNKNOWN, Ordering::SeqCst);
                self.realize(&c, false);
            }
            if c.failed.load(Ordering::Acquire) && c.want.load(Ordering::SeqCst) == ORIGINAL {
                left.push(c);
            } else {
                c.failed.store(false, Ordering::Release);
                if c.removed.load(Ordering::Acquire) {
                    self.applier.detach(c.tid);
                }
            }
        }
        let n = left.len();
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(left);
        n
    }

    fn failed_restores(&self) -> bool {
        !self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// Threads whose original attributes could not be put back (yet).
    fn unrestored(&self) -> Vec<i32> {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|c| c.tid)
            .collect()
    }

    /// A change of `cell` raced with its own thread changing itself (`realize` returned
    /// false): that thread applies the latest class when it runs again, but a vCPU that has
    /// just lowered itself may be preempted inside that very call, for a scheduler tick or
    /// more, with a boost decided since missing from the kernel. The engine thread (above
    /// every class it applies) looks at the thread's class [`RECHECK_NS`] later and sets
    /// the wanted one if it is missing. The caller then re-arms the engine thread's timer
    /// (see [`Shared::arm_for_recheck`]).
    /// Only a boost is looked at: a thread that lowers itself while the other change lowers
    /// it too ends lowered either way, and one raising itself is not preempted by the host
    /// threads pvsched protects it from, so it soon applies the latest itself.
    fn defer_recheck(&self, cell: &Arc<ThreadCell>, tries: u32, now: Nanos) -> bool {
        if tries == 0 {
            self.rechecks.fetch_add(1, Ordering::Relaxed);
        }
        let want = cell.want.load(Ordering::SeqCst);
        if want == ORIGINAL || want != cell.boost_code.load(Ordering::Acquire) {
            return false;
        }
        let mut list = self.recheck.lock();
        if tries == 0 && list.iter().any(|r| Arc::ptr_eq(&r.cell, cell)) {
            return false;
        }
        let due = now.saturating_add(recheck_delay(tries));
        list.push(Recheck {
            cell: cell.clone(),
            tries,
            due,
        });
        self.recheck_at.fetch_min(due, Ordering::AcqRel);
        true
    }

    /// On a vCPU's own thread, once it has applied its latest wanted class with no other
    /// thread's change landing during its call: a look queued for it after a race (see
    /// [`Shared::defer_recheck`]) has nothing left to find. Drops it and, when no other look
    /// is queued, the engine thread's wake-up for it, which would preempt whatever runs on
    /// that CPU (often the other vCPU). A vCPU stuck inside its own call never gets here, so
    /// the look that rescues it stays.
    fn settled(&self, cell: &Arc<ThreadCell>) {
        // Nothing queued (the common case, at every exit that applied a class): no lock. A
        // look being queued right now may be missed here; the engine thread then looks, as
        // before.
        if self.recheck_at.load(Ordering::Acquire) == NO_TIMER {
            return;
        }
        {
            let mut list = self.recheck.lock();
            let before = list.len();
            list.retain(|r| !Arc::ptr_eq(&r.cell, cell));
            if list.len() == before {
                return;
            }
            self.recheck_settled.fetch_add(1, Ordering::Relaxed);
            // Under the list's lock: a look queued after this sets its own time.
            let next = list.iter().map(|r| r.due).min().unwrap_or(NO_TIMER);
            self.recheck_at.store(next, Ordering::Release);
        }
        // Re-armed by this thread if the core is free, else by its holder as it lets go (the
        // holder may have armed before the look was dropped). Asked before trying, so that
        // a holder letting go meanwhile sees it. At worst the engine thread wakes for nothing.
        self.rearm.store(true, Ordering::Release);
        drop(self.try_core_uncounted());
    }

    /// Re-arms the engine thread's timer after [`Shared::defer_recheck`] on a thread that
    /// does not hold the core: under the core if it is free, else by waking the engine
    /// thread (which re-arms at the end of its round).
    fn arm_for_recheck(&self, now: Nanos) {
        match self.try_core_uncounted() {
            Some(mut core) => core.arm(self, now),
            None => {
                let _ = self.wake.write(1);
            }
        }
    }

    /// On the engine thread: looks at the raced threads due (see [`Shared::defer_recheck`]).
    /// A thread not in its wanted class is set again; one still in flight is looked at again.
    /// Returns how many were set again.
    fn run_rechecks(&self, now: Nanos) -> usize {
        if now < self.recheck_at.load(Ordering::Acquire) {
            return 0;
        }
        // The looks due now; the others stay queued, for their own time. (No allocation
        // unless one is due.)
        let mut due = Vec::new();
        {
            let mut list = self.recheck.lock();
            let mut next = NO_TIMER;
            let mut i = 0;
            while i < list.len() {
                if list[i].due <= now {
                    due.push(list.swap_remove(i));
                } else {
                    next = next.min(list[i].due);
                    i += 1;
                }
            }
            // Under the list's lock: a look queued after this lowers it again.
            self.recheck_at.store(next, Ordering::Release);
        }
        let mut fixed = 0;
        for Recheck { cell, tries, .. } in due {
            if cell.removed.load(Ordering::Acquire) {
                continue;
            }
            let want = cell.want.load(Ordering::SeqCst);
            let (Some(expected), Ok(actual)) =
                (self.attr_of(&cell, want), self.applier.get(cell.tid))
            else {
                continue;
            };
            if !same_class(&actual, &expected) {
                fixed += 1;
                self.recheck_fixed.fetch_add(1, Ordering::Relaxed);
                cell.applied.store(UNKNOWN, Ordering::SeqCst);
                self.realize(&cell, false);
            } else if cell.inflight.load(Ordering::SeqCst) == 0 {
                // In its class and no change in flight: settled.
                continue;
            }
            if tries + 1 < RECHECK_TRIES {
                // The timer is re-armed after this round.
                let _ = self.defer_recheck(&cell, tries + 1, now);
            }
        }
        fixed
    }

    /// Raises the engine thread above `class` if it is not already: to a deadline reservation
    /// ([`helper_deadline`], above every real-time priority) where the kernel admits it, else
    /// one FIFO priority above `class`.
    fn outrank(&self, class: BoostClass) {
        let SchedClass::Fifo(p) = helper_class(class) else {
            return;
        };
        if self.engine_prio.fetch_max(p, Ordering::AcqRel) >= p {
            return;
        }
        let tid = self.engine_tid.load(Ordering::Acquire) as i32;
        if tid == 0 {
            return;
        }
        if self.engine_class == EngineClass::Deadline
            && self.applier.set(tid, &helper_deadline()).is_ok()
        {
            self.engine_prio
                .fetch_max(ENGINE_DEADLINE, Ordering::AcqRel);
        } else if let Err(e) = self.applier.set(tid, &SchedClass::Fifo(p).attr()) {
            self.note_error(format!("engine thread: {e}"));
        }
    }
}

/// The engine and everything its decisions touch; behind the runtime's lock.
struct Core {
    engine: Engine,
    cells: BTreeMap<VcpuKey, Arc<ThreadCell>>,
    publishers: BTreeMap<u32, Box<dyn Publisher + Send>>,
    /// Live timers: one per (vCPU, kind), with its time and generation.
    timers: BTreeMap<(VcpuKey, TimerKind), (Nanos, u64)>,
    /// The same timers ordered by time.
    order: BTreeSet<(Nanos, VcpuKey, TimerKind)>,
    classes: Vec<BoostClass>,
    events: Vec<Event>,
    decisions: Vec<Decision>,
    follow: Vec<Event>,
    enabled: bool,
    /// When the engine thread's timer is armed.
    armed: Option<Nanos>,
    /// The timer fired and was not set since.
    fired: bool,
    /// Scratch list of due timers.
    due: Vec<(Nanos, VcpuKey, TimerKind)>,
    /// Live timers fired by the last `due_timers` calls (taken by the caller).
    fired_timers: u64,
    /// How early a vCPU thread fires its own lead timers at an exit (see
    /// [`RuntimeConfig::self_early`]).
    self_early: Nanos,
}

impl Core {
    /// Re-arms the engine thread's timer for the earliest of the timers (a syscall only when
    /// that time changed).
    fn arm(&mut self, shared: &Shared, now: Nanos) {
        let recheck = shared.recheck_at.load(Ordering::Acquire);
        let at = self
            .next_wake(now, shared.grace, shared.active, &shared.classes)
            .into_iter()
            .chain((recheck != NO_TIMER).then_some(recheck))
            .min();
        // A timer that fired stays readable until it is set again.
        if at != self.armed || self.fired {
            self.armed = at;
            self.fired = false;
            // Under the core lock: settings cannot overtake each other.
            if let Err(e) = shared.timer.set(at) {
                // Not expected for an open timerfd and a valid time; noted, and tried again at
                // the next arm (`armed` no longer matches).
                self.armed = None;
                shared.note_error(format!("timerfd_settime at {at:?}: {e}"));
            }
        }
    }

    /// Feeds what vCPU threads in a deadline class handed off ([`VcpuHandle::hand_off`]) to
    /// the engine, ahead of anything newer: taken only by a holder of the core, so a vCPU
    /// thread that runs the engine again finds its earlier exits processed or still queued,
    /// never in flight. Never waits for the queue (its holder may be a thread the kernel
    /// stopped): false when it was held and nothing was taken.
    fn take_handoffs(
        &mut self,
        shared: &Shared,
        now: Nanos,
        touched: &mut Vec<Arc<ThreadCell>>,
    ) -> bool {
        if !shared.handoff_pending.load(Ordering::Acquire) {
            return true;
        }
        let Some(mut q) = shared.try_handoff() else {
            return false;
        };
        shared.handoff_pending.store(false, Ordering::Release);
        for item in q.drain(..) {
            match item {
                Handoff::Event(e) => self.events.push(e),
                Handoff::Republish(key) => self.republish(shared, key, now, touched),
            }
        }
        true
    }

    /// Publishes the engine's current state for `key` again (its slot was just registered).
    fn republish(
        &mut self,
        shared: &Shared,
        key: VcpuKey,
        now: Nanos,
        touched: &mut Vec<Arc<ThreadCell>>,
    ) {
        let state = self
            .engine
            .vcpu(key)
            .and_then(|s| s.published)
            .unwrap_or(BoostState::Normal);
        self.apply_now(shared, &[Decision::Publish(key, state)], now, touched);
    }

    /// Applies decisions made outside [`Core::process`] and queues their follow-ups.
    fn apply_now(
        &mut self,
        shared: &Shared,
        decisions: &[Decision],
        trigger: Nanos,
        touched: &mut Vec<Arc<ThreadCell>>,
    ) {
        self.apply(shared, decisions, trigger, touched);
        let follow = std::mem::take(&mut self.follow);
        self.events.extend_from_slice(&follow);
        self.follow = follow;
        self.follow.clear();
    }

    fn intern(&mut self, shared: &Shared, class: BoostClass) -> Option<u64> {
        if let Some(i) = self.classes.iter().position(|c| *c == class) {
            return Some(i as u64 + 1);
        }
        let i = self.classes.len();
        let slot = shared.classes.entries.get(i)?;
        let _ = slot.set(ClassEntry::new(class));
        self.classes.push(class);
        shared.outrank(class);
        Some(i as u64 + 1)
    }

    fn set_timer(&mut self, key: VcpuKey, kind: TimerKind, at: Nanos, gen: u64) {
        if let Some((old, _)) = self.timers.insert((key, kind), (at, gen)) {
            self.order.remove(&(old, key, kind));
        }
        self.order.insert((at, key, kind));
        self.update_next(key);
    }

    fn update_next(&self, key: VcpuKey) {
        if let Some(cell) = self.cells.get(&key) {
            // The time from which this vCPU's own thread fires a timer at an exit.
            let next = TimerKind::ALL
                .iter()
                .filter_map(|k| {
                    self.timers.get(&(key, *k)).map(|t| match k {
                        TimerKind::Lead => t.0.saturating_sub(self.self_early),
                        _ => t.0,
                    })
                })
                .min()
                .unwrap_or(u64::MAX);
            cell.next_timer.store(next, Ordering::Release);
        }
    }

    fn is_live(&self, key: VcpuKey, kind: TimerKind, gen: u64) -> bool {
        self.engine
            .vcpu(key)
            .is_some_and(|s| s.is_timer_current(kind, gen))
    }

    /// Moves the due timers (of `only`, or of every vCPU) into `events`; drops dead ones.
    /// Lead timers fire a little early: on the engine thread (`only` = `None`) those due
    /// within [`COALESCE_NS`] fire with the ones due now, and a vCPU's own thread fires its
    /// lead timer at an exit up to `self_early` ahead. A boost a little early is harmless and
    /// saves a wake-up of the engine thread (and a cross-CPU `sched_setattr`).
    fn due_timers(&mut self, now: Nanos, only: Option<VcpuKey>) -> Option<Nanos> {
        let mut first = None;
        let mut fired = 0u64;
        let mut due = std::mem::take(&mut self.due);
        due.clear();
        let early = if only.is_none() {
            COALESCE_NS
        } else {
            self.self_early
        };
        due.extend(
            self.order
                .iter()
                .take_while(|(at, ..)| *at <= now.saturating_add(early))
                .filter(|(at, k, kind)| {
                    only.is_none_or(|o| o == *k) && (*at <= now || *kind == TimerKind::Lead)
                })
                .copied(),
        );
        for &(at, key, kind) in &due {
            self.order.remove(&(at, key, kind));
            if let Some((_, gen)) = self.timers.remove(&(key, kind)) {
                if self.is_live(key, kind, gen) {
                    fired += 1;
                    self.events
                        .push(Event::new(key, VcpuEvent::Timer(kind, gen)));
                    first = Some(first.map_or(at, |f: Nanos| f.min(at)));
                }
            }
            self.update_next(key);
        }
        self.due = due;
        self.fired_timers += fired;
        first
    }

    /// When the engine thread must wake next: the earliest live timer, later by the grace for
    /// vCPUs that handle their own timers while they run.
    fn next_wake(
        &mut self,
        now: Nanos,
        grace: Nanos,
        active: Nanos,
        classes: &ClassTable,
    ) -> Option<Nanos> {
        // Drop dead timers at the front so they cause no wake-up.
        while let Some(&(at, key, kind)) = self.order.first() {
            let gen = self.timers.get(&(key, kind)).map(|t| t.1);
            if gen.is_some_and(|g| self.is_live(key, kind, g)) {
                break;
            }
            self.order.remove(&(at, key, kind));
            self.timers.remove(&(key, kind));
            self.update_next(key);
        }
        let mut best: Option<Nanos> = None;
        // While the host-wide cap is full, a lead timer of an unboosted vCPU could only start
        // a wait (unless its class takes no extra share, which never waits): no wake-up for
        // it. The thread that frees a slot fires the overdue ones (`process`), and every
        // re-arm after that counts them again. A lead timer of a
        // boosted vCPU changes no class either (it only extends the boost's hold): no wake-up
        // for it; it fires with whatever next runs the engine for that vCPU (its own exit, a
        // doorbell, its budget check). If that ends the boost, the lead boosts it again in
        // the same round, which changes no class; a deadline published meanwhile drops it.
        for &(at, key, kind) in &self.order {
            if best.is_some_and(|b| at >= b) {
                break;
            }
            if kind == TimerKind::Lead {
                let boosted = self.engine.vcpu(key).is_some_and(|s| s.is_boosted());
                if boosted || self.engine.lead_would_wait(key) {
                    continue;
                }
            }
            // (A vCPU in a deadline class hands its exits off: no grace.)
            let own = self.cells.get(&key).is_some_and(|c| {
                c.hooked.load(Ordering::Relaxed)
                    && now.saturating_sub(c.last_exit.load(Ordering::Relaxed)) < active
                    && !c.may_throttle(classes)
            });
            // A budget check may come a little late (it ends a boost at most that much
            // later): its wake-up is deferred so that checks of several vCPUs share one.
            // The end of a repayment is about fairness, not latency: it can wait longer.
            let slack = match kind {
                TimerKind::Budget | TimerKind::Cap => BUDGET_SLACK_NS,
                TimerKind::Repay => REPAY_SLACK_NS,
                TimerKind::Cooldown | TimerKind::Lead => 0,
            };
            let t = at.saturating_add(if own { grace.max(slack) } else { slack });
            best = Some(best.map_or(t, |b| b.min(t)));
        }
        best
    }

    /// Runs the pending events through the engine and records the decisions: classes wanted
    /// go to the cells (pushed to `touched` for realizing), states to the publishers, timers
    /// to the timer set.
    fn process(
        &mut self,
        shared: &Shared,
        now: Nanos,
        trigger: Nanos,
        touched: &mut Vec<Arc<ThreadCell>>,
    ) {
        let full = self.engine.cap_full();
        if full {
            // Lead timers deferred while the cap is full fire first, so that they wait in the
            // engine's queue by deadline with the others if a slot frees below.
            self.due_timers(now, None);
        }
        self.rounds(shared, now, trigger, touched);
        if full && !self.engine.cap_full() {
            // A slot freed: what came due meanwhile fires now, here, rather than at a wake-up
            // of the engine thread.
            self.due_timers(now, None);
            self.rounds(shared, now, trigger, touched);
        }
    }

    fn rounds(
        &mut self,
        shared: &Shared,
        now: Nanos,
        trigger: Nanos,
        touched: &mut Vec<Arc<ThreadCell>>,
    ) {
        for _ in 0..MAX_ROUNDS {
            if self.events.is_empty() {
                return;
            }
            self.decisions.clear();
            let mut events = std::mem::take(&mut self.events);
            self.engine
                .handle_all(events.drain(..), now, &mut self.decisions);
            self.events = events;
            let decisions = std::mem::take(&mut self.decisions);
            self.apply(shared, &decisions, trigger, touched);
            self.decisions = decisions;
            std::mem::swap(&mut self.events, &mut self.follow);
        }
    }

    fn apply(
        &mut self,
        shared: &Shared,
        decisions: &[Decision],
        trigger: Nanos,
        touched: &mut Vec<Arc<ThreadCell>>,
    ) {
        for d in decisions {
            match *d {
                Decision::Boost(key, class) => {
                    let Some(code) = self.intern(shared, class) else {
                        shared.note_error(format!("{key}: too many boost classes"));
                        continue;
                    };
                    if let Some(c) = self.cells.get(&key) {
                        c.boost_trigger.store(trigger, Ordering::Relaxed);
                        c.boost_code.store(code, Ordering::Release);
                        c.want.store(code, Ordering::SeqCst);
                        touched.push(c.clone());
                    }
                }
                Decision::Unboost(key) | Decision::Repay(key, None) => {
                    if let Some(c) = self.cells.get(&key) {
                        c.boost_code.store(ORIGINAL, Ordering::Release);
                        c.want.store(ORIGINAL, Ordering::SeqCst);
                        touched.push(c.clone());
                    }
                }
                Decision::Repay(key, Some(class)) => {
                    let Some(code) = self.intern(shared, class) else {
                        shared.note_error(format!("{key}: too many boost classes"));
                        continue;
                    };
                    if let Some(c) = self.cells.get(&key) {
                        // What it owes in paused time, less pauses not told yet.
                        let owed = self.engine.vcpu(key).map_or(0, |s| s.pause_owed);
                        let untold = c.paused_unreported.load(Ordering::Acquire);
                        c.pause_left
                            .store(owed.saturating_sub(untold), Ordering::Release);
                        c.boost_code.store(ORIGINAL, Ordering::Release);
                        c.want.store(code, Ordering::SeqCst);
                        touched.push(c.clone());
                    }
                }
                Decision::Publish(key, state) => {
                    let Some(p) = self.publishers.get_mut(&key.vm) else {
                        continue;
                    };
                    let Some(request) = p.publish(key, state) else {
                        continue;
                    };
                    if matches!(state, BoostState::Normal | BoostState::Boosted) {
                        let what = match Reasons::from_bits(request) {
                            Some(r) => VcpuEvent::Request(r),
                            None => VcpuEvent::SlotInvalid,
                        };
                        self.follow.push(Event::new(key, what));
                    }
                }
                Decision::PublishV3 {
                    key,
                    applied,
                    ticket,
                    reread,
                } => {
                    let Some(p) = self.publishers.get_mut(&key.vm) else {
                        continue;
                    };
                    let Some(area) = p.publish_v3(key, applied, ticket) else {
                        continue;
                    };
                    if reread {
                        let what = match area {
                            Ok(a) => VcpuEvent::Intent(a),
                            Err(_) => VcpuEvent::SlotInvalid,
                        };
                        self.follow.push(Event::new(key, what));
                    }
                }
                Decision::ArmTimer { key, at, kind, gen } => self.set_timer(key, kind, at, gen),
            }
        }
    }
}

/// A vCPU thread's own door into the runtime: called at exits the vCPU takes anyway, it runs
/// the engine for that vCPU and applies the result on the calling thread. Never blocks.
pub struct VcpuHandle {
    cell: Arc<ThreadCell>,
    shared: Arc<Shared>,
    touched: Vec<Arc<ThreadCell>>,
}

/// A repayment pause ends at least this long before the vCPU's next timer (its lead boost,
/// its repayment's end), so that the thread is back in its guest when the timer fires.
pub const PAUSE_MARGIN: Nanos = 30_000;

/// A pause shorter than this is not taken (a sleep costs about as much here): the shortest
/// a `repay=pause:` option accepts.
const PAUSE_MIN: Nanos = pvsched_policy::options::PAUSE_RANGE.0;

/// How long a vCPU thread paying back a boost pauses at `now`: what it still `owes` (at least
/// [`PAUSE_MIN`]) up to `max`, ending [`PAUSE_MARGIN`] before `next_timer`; 0 when it owes
/// nothing or that leaves less than [`PAUSE_MIN`].
fn pause_len(now: Nanos, max: Nanos, next_timer: Nanos, owes: Nanos) -> Nanos {
    if owes == 0 {
        return 0;
    }
    let until = now
        .saturating_add(max.min(owes.max(PAUSE_MIN)))
        .min(next_timer.saturating_sub(PAUSE_MARGIN));
    let len = until.saturating_sub(now);
    if len < PAUSE_MIN {
        0
    } else {
        len
    }
}

impl VcpuHandle {
    /// The vCPU.
    pub fn key(&self) -> VcpuKey {
        self.cell.key
    }

    /// At an exit (on the vCPU's own thread): while the vCPU pays back a boost by pausing
    /// (its driver's `repay=pause:<max>`, [`BoostClass::Pause`]), holds its thread off the
    /// CPU (sleeps) for up to `max`, never into the last [`PAUSE_MARGIN`] before its next
    /// timer nor while a class decided for it waits to be applied; returns how long it
    /// slept, ns. The pause counts as runnable time for the quiet gate's samplers (it is the
    /// VMM's doing, not the guest's). An interrupt for the guest that arrives meanwhile waits
    /// for its end. Otherwise it costs a few loads.
    pub fn repay_pause(&self) -> Nanos {
        let cell = &self.cell;
        let applied = cell.applied.load(Ordering::Acquire);
        if applied == ORIGINAL || applied == UNKNOWN || !cell.hooked.load(Ordering::Relaxed) {
            return 0;
        }
        let max = self.shared.classes.get(applied).map_or(0, |e| e.pause);
        if max == 0
            || self.shared.stopped.load(Ordering::Relaxed)
            || cell.boost_code.load(Ordering::Acquire) != ORIGINAL
            || cell.unapplied()
        {
            return 0;
        }
        let now = mono_ns();
        let len = pause_len(
            now,
            max,
            cell.next_timer.load(Ordering::Acquire),
            cell.pause_left.load(Ordering::Acquire),
        );
        if len == 0 {
            return 0;
        }
        std::thread::sleep(Duration::from_nanos(len));
        let slept = mono_ns().saturating_sub(now);
        cell.paused.fetch_add(slept, Ordering::Relaxed);
        let _ = cell
            .pause_left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |l| {
                Some(l.saturating_sub(slept))
            });
        // Told to the engine at the next exit (`exit` says so): the repayment ends once the
        // pauses add up to what the vCPU owes.
        cell.paused_unreported.fetch_add(slept, Ordering::Release);
        slept
    }

    /// Cheap check for every exit: records that the vCPU runs, and says whether one of its
    /// timers is due or a class another thread decided for it is still to be applied (then
    /// call [`VcpuHandle::handle`]).
    pub fn exit(&self, now: Nanos) -> bool {
        self.cell.last_exit.store(now, Ordering::Relaxed);
        now >= self.cell.next_timer.load(Ordering::Acquire)
            || self.cell.unapplied()
            || self.cell.paused_unreported.load(Ordering::Acquire) != 0
    }

    /// Feeds `events` (what this vCPU's thread observed at `now`) and this vCPU's due timers
    /// to the engine, and applies the decisions, its own on this thread. Returns false when
    /// `events` were not taken (the engine busy): call again at the next exit. A thread in a
    /// deadline class hands `events` to the engine thread instead (module doc). Must be
    /// called on the vCPU's own thread.
    pub fn handle(&mut self, now: Nanos, events: &[VcpuEvent]) -> bool {
        if self.cell.may_throttle(&self.shared.classes) {
            let key = self.cell.key;
            return self.hand_off(
                events
                    .iter()
                    .map(|&what| Handoff::Event(Event::new(key, what))),
            );
        }
        let cell = self.cell.clone();
        let mut taken = true;
        let ran = self.with_core(now, |core, shared, touched| {
            cell.hook_calls.fetch_add(1, Ordering::Relaxed);
            cell.last_exit.store(now, Ordering::Relaxed);
            // Exits this vCPU handed off while in a deadline class come before this one's
            // events; if the queue is held, this exit's events wait for the next exit.
            taken = core.take_handoffs(shared, now, touched);
            if taken {
                let paused = cell.paused_unreported.swap(0, Ordering::AcqRel);
                if paused > 0 {
                    core.events
                        .push(Event::new(cell.key, VcpuEvent::Paused(paused)));
                }
                core.events
                    .extend(events.iter().map(|&what| Event::new(cell.key, what)));
            }
            let due = core.due_timers(now, Some(cell.key));
            let trigger = due.map_or(now, |t| t.min(now));
            core.process(shared, now, trigger, touched);
            let fired = std::mem::take(&mut core.fired_timers);
            shared.timers_vcpu.fetch_add(fired, Ordering::Relaxed);
        });
        ran && taken
    }

    /// Publishes the engine's current state for this vCPU again (a slot was just
    /// registered). Returns false when the engine is busy.
    pub fn republish(&mut self, now: Nanos) -> bool {
        let key = self.cell.key;
        if self.cell.may_throttle(&self.shared.classes) {
            return self.hand_off(std::iter::once(Handoff::Republish(key)));
        }
        self.with_core(now, |core, shared, touched| {
            core.republish(shared, key, now, touched);
            core.process(shared, now, now, touched);
        })
    }

    /// For a thread in a deadline class (which must not hold the core, module doc): queues
    /// `items` for the engine thread and wakes it, which decides and applies for this vCPU.
    /// Takes no lock another thread waits for, and applies nothing here (the engine thread
    /// applies what it decides, and looks again after a race). Returns false (nothing
    /// queued) when the queue is busy or full: hand off again at the next exit.
    fn hand_off(&mut self, items: impl ExactSizeIterator<Item = Handoff>) -> bool {
        if self.shared.stopped.load(Ordering::Acquire) {
            return true;
        }
        if items.len() == 0 {
            return true;
        }
        {
            let Some(mut q) = self.shared.try_handoff() else {
                self.shared.hook_busy.fetch_add(1, Ordering::Relaxed);
                return false;
            };
            if q.len() + items.len() > HANDOFF_CAP {
                self.shared.hook_busy.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            q.extend(items);
        }
        self.shared.handoffs.fetch_add(1, Ordering::Relaxed);
        if !self.shared.handoff_pending.swap(true, Ordering::AcqRel) {
            let _ = self.shared.wake.write(1);
        }
        true
    }

    /// Runs `f` on the core unless another thread holds it (then returns false), re-arms the
    /// engine thread's timer for what `f` changed (an earlier timer moves its wake-up), and
    /// applies the decisions, this vCPU's on this thread.
    fn with_core(
        &mut self,
        now: Nanos,
        f: impl FnOnce(&mut Core, &Shared, &mut Vec<Arc<ThreadCell>>),
    ) -> bool {
        if self.shared.stopped.load(Ordering::Acquire) {
            return true;
        }
        let shared = self.shared.clone();
        {
            let Some(mut core) = shared.try_core() else {
                // A class decided for this vCPU by a thread that has not applied it yet
                // needs no core.
                if self.cell.unapplied() {
                    self.realize_touched(now);
                }
                return false;
            };
            if shared.stopped.load(Ordering::Acquire) {
                return true;
            }
            f(&mut core, &shared, &mut self.touched);
            core.arm(&shared, now);
        }
        self.realize_touched(now);
        true
    }

    /// Applies the classes decided: other vCPUs' first, this vCPU's last, because a thread
    /// that lowers itself is often preempted inside that call (by the very vCPU it just
    /// handed the boost to, on its CPU), and nothing it had still to apply may wait for it.
    /// A class another thread decided for this vCPU and has not applied yet is applied here
    /// too.
    fn realize_touched(&mut self, now: Nanos) {
        let key = self.cell.key;
        if self.cell.unapplied() && !self.touched.iter().any(|c| c.key == key) {
            self.touched.push(self.cell.clone());
        }
        let own_at = self.touched.iter().position(|c| c.key == key);
        if let Some(i) = own_at {
            let last = self.touched.len() - 1;
            self.touched.swap(i, last);
        }
        let mut raced = false;
        for c in self.touched.drain(..) {
            let own = c.key == key;
            if !self.shared.realize(&c, own) {
                // Raced with that vCPU changing itself: its thread applies the latest class
                // when it runs, and the engine thread makes sure of it.
                raced |= self.shared.defer_recheck(&c, 0, now);
            } else if own {
                self.shared.settled(&c);
            }
        }
        if raced {
            self.shared.arm_for_recheck(now);
        }
    }
}

type Reply<T> = mpsc::Sender<T>;

/// A VM's publisher and sources, given to [`RuntimeHandle::add_vm`].
pub struct VmParts {
    /// Where boost states are published to the guest, if it speaks the protocol.
    pub publisher: Option<Box<dyn Publisher + Send>>,
    /// Event sources that belong to this VM (dropped with it).
    pub sources: Vec<Box<dyn EventSource>>,
}

enum Command {
    AddVm {
        vm: u32,
        driver: String,
        opts: DriverOptions,
        parts: VmParts,
        reply: Reply<Result<(), RuntimeError>>,
    },
    RemoveVm {
        vm: u32,
        reply: Reply<Result<(), RuntimeError>>,
    },
    AddVcpu {
        key: VcpuKey,
        tid: i32,
        hooked: bool,
        reply: Reply<Result<VcpuHandle, RuntimeError>>,
    },
    RemoveVcpu {
        key: VcpuKey,
        reply: Reply<Result<(), RuntimeError>>,
    },
    SetVmProcess {
        vm: u32,
        pid: i32,
        reply: Reply<Result<(), RuntimeError>>,
    },
    SetEnabled {
        vm: Option<u32>,
        on: bool,
        reply: Reply<Result<(), RuntimeError>>,
    },
    SetDriver {
        vm: u32,
        driver: String,
        opts: DriverOptions,
        reply: Reply<Result<(), RuntimeError>>,
    },
    Status(Reply<Status>),
}

/// How a runtime starts.
pub struct RuntimeConfig {
    /// Name of the engine thread.
    pub name: String,
    /// Drivers available.
    pub registry: Registry,
    /// Where scheduling attributes are applied.
    pub applier: Arc<dyn Applier>,
    /// Host-wide event sources (e.g. tracepoints shared by all VMs).
    pub sources: Vec<Box<dyn EventSource>>,
    /// Grace given to running, hooked vCPUs to handle their own timers, ns.
    pub grace: Nanos,
    /// A hooked vCPU that took an exit within this long counts as running, and gets the
    /// grace; one not seen for longer (halted, or preempted) has its timers fired by the
    /// engine thread on time, ns.
    pub active: Nanos,
    /// A hooked vCPU thread fires its own lead timer (boosts itself ahead of its guest's
    /// deadline) at an exit up to this long before the timer is due, ns: an exit shortly
    /// before the lead time then saves the engine thread a wake-up and a cross-CPU
    /// `sched_setattr`, at the price of a boost that starts up to this much earlier.
    pub self_early: Nanos,
    /// Boost a vCPU only while it waits for a CPU when unboosted (its run delay, see
    /// [`crate::pressure`]); `None`: whenever the driver decides.
    pub quiet_gate: Option<QuietGate>,
    /// At most this many vCPU threads boosted at once, over all VMs; a boost over the cap
    /// waits (earliest published deadline first, then oldest). `None`: no cap. Tools default
    /// to [`default_max_boosted`].
    pub max_boosted: Option<usize>,
    /// How long a boost keeps its slot of the cap while another waits, ns (see
    /// [`pvsched_policy::engine::CAP_QUANTUM_NS`], the default).
    pub cap_quantum: Nanos,
    /// How the engine thread outranks the vCPUs it boosts.
    pub engine_class: EngineClass,
}

/// The cap on vCPUs boosted at once that leaves the host a CPU: host CPUs − 1, at least 1.
pub fn default_max_boosted() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .saturating_sub(1)
        .max(1)
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            name: "pvsched-engine".into(),
            registry: Registry::builtin(),
            applier: Arc::new(KernelApplier),
            sources: Vec::new(),
            grace: 25_000,
            active: ACTIVE_NS,
            self_early: 50_000,
            quiet_gate: None,
            max_boosted: None,
            cap_quantum: pvsched_policy::engine::CAP_QUANTUM_NS,
            engine_class: EngineClass::default(),
        }
    }
}

/// The running engine runtime: its thread, stopped (everything restored) on
/// [`Runtime::stop`] or drop.
pub struct Runtime {
    handle: RuntimeHandle,
    thread: Option<JoinHandle<Status>>,
}

/// Sends control requests to a runtime; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct RuntimeHandle {
    tx: mpsc::Sender<Command>,
    shared: Arc<Shared>,
}

impl Runtime {
    /// Starts the engine thread.
    pub fn start(cfg: RuntimeConfig) -> Result<Runtime, RuntimeError> {
        let shared = Arc::new(Shared {
            core: PriorityInheritingLock::new(Core {
                engine: {
                    let mut e = Engine::new(cfg.registry);
                    e.set_max_boosted(cfg.max_boosted);
                    e.set_cap_quantum(cfg.cap_quantum);
                    e
                },
                cells: BTreeMap::new(),
                publishers: BTreeMap::new(),
                timers: BTreeMap::new(),
                order: BTreeSet::new(),
                classes: Vec::new(),
                events: Vec::with_capacity(64),
                decisions: Vec::with_capacity(64),
                follow: Vec::with_capacity(64),
                enabled: true,
                armed: None,
                fired: false,
                due: Vec::with_capacity(16),
                fired_timers: 0,
                self_early: cfg.self_early,
            }),
            core_held: AtomicBool::new(false),
            rearm: AtomicBool::new(false),
            applier: cfg.applier,
            classes: ClassTable::new(),
            timer: DeadlineTimer::new()?,
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
            stopped: AtomicBool::new(false),
            engine_tid: AtomicU32::new(0),
            engine_prio: AtomicU32::new(0),
            engine_class: cfg.engine_class,
            grace: cfg.grace,
            active: cfg.active,
            errors: Mutex::new(VecDeque::new()),
            error_count: AtomicU64::new(0),
            error_kinds: Default::default(),
            pending: Mutex::new(Vec::new()),
            hook_busy: AtomicU64::new(0),
            handoff: Mutex::new(Vec::with_capacity(HANDOFF_CAP)),
            handoff_pending: AtomicBool::new(false),
            handoffs: AtomicU64::new(0),
            timers_engine: AtomicU64::new(0),
            timers_vcpu: AtomicU64::new(0),
            rechecks: AtomicU64::new(0),
            reconciled: AtomicU64::new(0),
            recheck: PriorityInheritingLock::new(Vec::new()),
            recheck_at: AtomicU64::new(NO_TIMER),
            recheck_fixed: AtomicU64::new(0),
            recheck_settled: AtomicU64::new(0),
        });
        let (tx, rx) = mpsc::channel();
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            shared.timer.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_TIMER),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            shared.wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_COMMAND),
        )?;
        let mut lp = Loop {
            shared: shared.clone(),
            epoll,
            rx,
            host_sources: Vec::new(),
            vm_sources: BTreeMap::new(),
            touched: Vec::with_capacity(16),
            events: Vec::with_capacity(64),
            handoff_retry: false,
            stats: LoopStats::default(),
            started: mono_ns(),
            quiet_gate: cfg.quiet_gate,
            samplers: BTreeMap::new(),
            others: cfg
                .quiet_gate
                .and_then(|g| g.others)
                .map(|g| (OthersVerdict::new(g), 0)),
            // The host-wide gate starts closed (`OthersVerdict::new`): its closed time counts
            // from its first sample (no vCPU is attached before).
            others_since: None,
            others_ns: 0,
            others_n: (0, 0),
            processes: BTreeMap::new(),
            cpu_busy: CpuBusy::default(),
            told: BTreeMap::new(),
            sleeping: BTreeSet::new(),
            lazy: false,
            reconcile_seen: BTreeMap::new(),
            quiet_since: BTreeMap::new(),
            quiet_ns: 0,
            next_retry: 0,
            timer_fired: false,
        };
        for s in cfg.sources {
            lp.add_source(None, s)?;
        }
        let (tid_tx, tid_rx) = mpsc::channel();
        let thread = std::thread::Builder::new().name(cfg.name).spawn(move || {
            // SAFETY: gettid has no arguments and cannot fail.
            let tid = unsafe { libc::gettid() };
            lp.shared.engine_tid.store(tid as u32, Ordering::Release);
            let _ = tid_tx.send(());
            let guard = RestoreOnUnwind(lp.shared.clone());
            lp.run();
            let status = lp.status();
            std::mem::forget(guard);
            status
        })?;
        let _ = tid_rx.recv();
        Ok(Runtime {
            handle: RuntimeHandle { tx, shared },
            thread: Some(thread),
        })
    }

    /// A handle for control requests.
    pub fn handle(&self) -> RuntimeHandle {
        self.handle.clone()
    }

    /// Stops the engine thread, restores every thread, and returns the final status.
    pub fn stop(mut self) -> Status {
        self.halt().unwrap_or_default()
    }

    fn halt(&mut self) -> Option<Status> {
        let t = self.thread.take()?;
        self.handle.shared.stopped.store(true, Ordering::Release);
        let _ = self.handle.shared.wake.write(1);
        // A thread that panicked restored everything while it unwound (its guard).
        t.join().ok()
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.halt();
    }
}

impl RuntimeHandle {
    fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, RuntimeError> {
        if self.shared.stopped.load(Ordering::Acquire) {
            return Err(RuntimeError::Stopped);
        }
        let (tx, rx) = mpsc::channel();
        self.tx.send(make(tx)).map_err(|_| RuntimeError::Stopped)?;
        let _ = self.shared.wake.write(1);
        match rx.recv_timeout(REPLY_TIMEOUT) {
            Ok(v) => Ok(v),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(RuntimeError::Timeout(REPLY_TIMEOUT)),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(RuntimeError::Stopped),
        }
    }

    /// Adds VM `vm` run by `driver` with `opts`, with its publisher and sources.
    pub fn add_vm(
        &self,
        vm: u32,
        driver: &str,
        opts: &DriverOptions,
        parts: VmParts,
    ) -> Result<(), RuntimeError> {
        self.call(|reply| Command::AddVm {
            vm,
            driver: driver.into(),
            opts: opts.clone(),
            parts,
            reply,
        })?
    }

    /// Removes VM `vm`: its vCPUs restored and forgotten, its sources closed.
    pub fn remove_vm(&self, vm: u32) -> Result<(), RuntimeError> {
        self.call(|reply| Command::RemoveVm { vm, reply })?
    }

    /// Adds vCPU `key` running on thread `tid` (its current attributes become the ones to
    /// restore). `hooked`: the vCPU's thread will call the returned handle at its exits
    /// ([`VcpuHandle::exit`], [`VcpuHandle::handle`] and [`VcpuHandle::repay_pause`]).
    pub fn add_vcpu(
        &self,
        key: VcpuKey,
        tid: i32,
        hooked: bool,
    ) -> Result<VcpuHandle, RuntimeError> {
        self.call(|reply| Command::AddVcpu {
            key,
            tid,
            hooked,
            reply,
        })?
    }

    /// Removes vCPU `key`, restoring its thread.
    pub fn remove_vcpu(&self, key: VcpuKey) -> Result<(), RuntimeError> {
        self.call(|reply| Command::RemoveVcpu { key, reply })?
    }

    /// Says that VM `vm` runs in process `pid` (another process than this one): for the
    /// host-wide quiet gate, the CPU its threads use (vCPUs, but also a VMM's main loop and
    /// I/O threads) is the VM's own, not other work competing with the vCPUs. A VMM whose
    /// main loop wakes the vCPUs (QEMU's TCG: ~0.2 CPU here for a mostly idle Linux guest)
    /// otherwise kept the gate open on an idle host.
    pub fn set_vm_process(&self, vm: u32, pid: i32) -> Result<(), RuntimeError> {
        self.call(|reply| Command::SetVmProcess { vm, pid, reply })?
    }

    /// Enables or disables boosting globally (`None`) or for one VM.
    pub fn set_enabled(&self, vm: Option<u32>, on: bool) -> Result<(), RuntimeError> {
        self.call(|reply| Command::SetEnabled { vm, on, reply })?
    }

    /// Replaces VM `vm`'s driver.
    pub fn set_driver(
        &self,
        vm: u32,
        driver: &str,
        opts: &DriverOptions,
    ) -> Result<(), RuntimeError> {
        self.call(|reply| Command::SetDriver {
            vm,
            driver: driver.into(),
            opts: opts.clone(),
            reply,
        })?
    }

    /// The runtime's status.
    pub fn status(&self) -> Result<Status, RuntimeError> {
        self.call(Command::Status)
    }
}

/// `opts` for `driver` on this kernel: `dynamic`'s default RT-task class is a custom EEVDF
/// slice ([`pvsched_policy::drivers::DYNAMIC_TASK_SLICE_NS`]); a kernel that keeps none
/// (before 6.12) would take it as a plain `SCHED_OTHER`, no boost at all, so there it gets the
/// FIFO default instead, unless the options name a class.
fn kernel_options(driver: &str, opts: DriverOptions) -> DriverOptions {
    let chosen = opts.get("class").is_some() || opts.get("class_task").is_some();
    if driver != "dynamic" || chosen || sched::fair_slice().custom {
        return opts;
    }
    opts.set("class_task", &BoostClass::default().to_string())
}

/// Fails when an option names a boost class this kernel does not offer (a custom EEVDF slice
/// before Linux 6.12): a clear error when the VM is added, not an apply error per boost.
fn check_classes(opts: &DriverOptions) -> Result<(), RuntimeError> {
    for key in ["class", "class_cs", "class_task", "class_deadline"] {
        let Some(class) = opts.get(key).and_then(pvsched_policy::options::parse_class) else {
            continue;
        };
        sched::check_supported(&sched_class(class)).map_err(|source| RuntimeError::Class {
            key: format!("{key}={}", opts.get(key).unwrap_or_default()),
            source,
        })?;
    }
    Ok(())
}

/// Restores every thread if the engine thread unwinds.
struct RestoreOnUnwind(Arc<Shared>);

impl Drop for RestoreOnUnwind {
    fn drop(&mut self) {
        restore_all(&self.0);
    }
}

/// Marks the runtime stopped and puts every thread back to its original attributes.
///
/// On a thread that unwinds (a panic in the engine thread) the threads are restored before
/// the engine is asked to shut down: its state may be what panicked, and a second panic
/// there would abort the process before any restore. That shutdown (boosts counted as
/// ended, guests told `Disabled`) then runs under `catch_unwind`, and the threads are
/// restored once more after it.
fn restore_all(shared: &Shared) {
    let unwinding = std::thread::panicking();
    let cells: Vec<Arc<ThreadCell>> = {
        let mut core = shared.lock();
        shared.stopped.store(true, Ordering::Release);
        if !unwinding {
            // The engine's own view first: boosts end (counted) and guests are told
            // `Disabled`.
            shutdown_engine(&mut core, shared);
        }
        core.follow.clear();
        for c in core.cells.values() {
            c.want.store(ORIGINAL, Ordering::SeqCst);
        }
        core.cells.values().cloned().collect()
    };
    for c in &cells {
        restore_cell(shared, c);
    }
    if unwinding {
        let told = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            shutdown_engine(&mut shared.lock(), shared);
        }));
        if told.is_err() {
            shared.note_error(
                "the engine's shutdown panicked while it unwound: guests not told".into(),
            );
        }
        for c in &cells {
            restore_cell(shared, c);
        }
    }
    // Restores the kernel refused: a few more tries before the runtime gives up on them
    // (they stay listed in the final status).
    for _ in 0..5 {
        if shared.retry_restores() == 0 {
            break;
        }
        std::thread::sleep(Duration::from_nanos(RETRY_NS));
    }
}

/// The engine's shutdown: its boosts end (counted) and guests are told `Disabled`; the
/// decisions are applied under the core.
fn shutdown_engine(core: &mut Core, shared: &Shared) {
    let mut out = Vec::new();
    core.engine.shutdown(mono_ns(), &mut out);
    let mut touched = Vec::new();
    core.apply(shared, &out, mono_ns(), &mut touched);
}

/// Restores one cell, waiting (bounded) for its own thread to finish a change in flight.
fn restore_cell(shared: &Shared, c: &Arc<ThreadCell>) {
    c.want.store(ORIGINAL, Ordering::SeqCst);
    if !shared.realize(c, false) {
        for _ in 0..1000 {
            if c.inflight.load(Ordering::SeqCst) == 0 {
                break;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        c.applied.store(UNKNOWN, Ordering::SeqCst);
        shared.realize(c, false);
    }
}

/// True when `actual` (read from the kernel) is the class `expected` describes: policy,
/// priority, and the nice level for the classes that have one.
fn same_class(actual: &SchedAttr, expected: &SchedAttr) -> bool {
    actual.policy == expected.policy
        && actual.priority == expected.priority
        && (actual.nice == expected.nice || !matches!(actual.policy, 0 | 3 | 5))
}

#[derive(Default)]
struct LoopStats {
    wakeups: u64,
    /// Wake-ups that decided no class change.
    idle_wakeups: u64,
    /// Times a VM's source was set aside for reading faster than [`VM_SOURCE_INTERVAL_NS`].
    source_pauses: u64,
}

/// A VM's event sources (its doorbells) are drained at most once per this on average...
const VM_SOURCE_INTERVAL_NS: Nanos = 200_000;
/// ... with bursts of up to this much ahead of that pace: a guest that rings faster (a
/// hostile one ringing in a loop) is read once a millisecond or so until it slows down,
/// instead of keeping the real-time engine thread busy.
const VM_SOURCE_BURST_NS: Nanos = 10_000_000;

struct SourceEntry {
    source: Box<dyn EventSource>,
    next_poll: Option<Nanos>,
    /// Rate limit of a VM's source (GCRA): the time its drains are booked up to; `None` for
    /// the host's own sources.
    booked: Option<Nanos>,
    /// Set aside (not waited on) until then, for draining too fast.
    paused_until: Option<Nanos>,
    /// Its epoll token.
    token: u64,
}

impl SourceEntry {
    /// Books a drain at `now`: false if the source has drained faster than its rate allows
    /// and must wait (a host source always may).
    fn book(&mut self, now: Nanos) -> bool {
        let Some(booked) = self.booked.as_mut() else {
            return true;
        };
        if *booked > now.saturating_add(VM_SOURCE_BURST_NS) {
            return false;
        }
        *booked = (*booked).max(now).saturating_add(VM_SOURCE_INTERVAL_NS);
        true
    }
}

/// The engine thread.
struct Loop {
    shared: Arc<Shared>,
    epoll: Epoll,
    rx: mpsc::Receiver<Command>,
    host_sources: Vec<SourceEntry>,
    vm_sources: BTreeMap<u32, Vec<SourceEntry>>,
    touched: Vec<Arc<ThreadCell>>,
    /// Scratch lists reused across wake-ups (no allocation per round).
    events: Vec<Event>,
    /// The hand-off queue was held when last tried (its holder stopped by the kernel, say):
    /// try again soon.
    handoff_retry: bool,
    stats: LoopStats,
    started: Nanos,
    /// The quiet gate, if on, with a run-delay sampler per vCPU thread and since when each
    /// quiet vCPU is quiet; `quiet_ns`: quiet time of vCPUs, ended spells.
    quiet_gate: Option<QuietGate>,
    samplers: BTreeMap<VcpuKey, VcpuSampler>,
    /// The host-wide gate ([`crate::pressure::OthersGate`]) and when it samples next.
    others: Option<(OthersVerdict, Nanos)>,
    /// Since when it has been closed, and its closed time over ended spells.
    others_since: Option<Nanos>,
    others_ns: u64,
    /// vCPU samplers and VM processes summed at the host-wide gate's last sample.
    others_n: (usize, usize),
    /// The process each VM runs in, when it is not this one ([`RuntimeHandle::set_vm_process`]),
    /// with its CPU time so far.
    processes: BTreeMap<u32, (i32, crate::pressure::ProcessCpu)>,
    /// Busy time of the CPUs the vCPU threads were on, summed sample after sample.
    cpu_busy: CpuBusy,
    /// The quiet verdict each vCPU was last given (its own, or the host-wide one).
    told: BTreeMap<VcpuKey, bool>,
    /// vCPUs last told that they sleep part of the time ([`VcpuEvent::Sleeps`]).
    sleeping: BTreeSet<VcpuKey>,
    /// The sources were told that every vCPU is quiet ([`EventSource::set_lazy`]).
    lazy: bool,
    /// `sched_setattr` calls on each vCPU thread at its last reconciliation.
    reconcile_seen: BTreeMap<VcpuKey, u64>,
    quiet_since: BTreeMap<VcpuKey, Nanos>,
    quiet_ns: u64,
    /// When failed restores are tried again next.
    next_retry: Nanos,
    /// The engine's timer fired at this wake-up: told to the core in [`Loop::process`], under
    /// the lock it takes anyway.
    timer_fired: bool,
}

fn token(vm: Option<u32>, index: usize) -> u64 {
    TOKEN_SOURCE | (vm.map_or(0, |v| v as u64 + 1) << 32) | ((index as u64) << 2)
}

impl Loop {
    fn add_source(
        &mut self,
        vm: Option<u32>,
        source: Box<dyn EventSource>,
    ) -> Result<(), std::io::Error> {
        let list = match vm {
            None => &mut self.host_sources,
            Some(v) => self.vm_sources.entry(v).or_default(),
        };
        let index = list.len();
        if let Some(fd) = source.fd() {
            self.epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token(vm, index)),
            )?;
        }
        let mut source = source;
        if self.lazy {
            source.set_lazy(true);
        }
        let now = mono_ns();
        let next_poll = source.poll_period().map(|p| now + p);
        list.push(SourceEntry {
            source,
            next_poll,
            booked: vm.map(|_| now),
            paused_until: None,
            token: token(vm, index),
        });
        Ok(())
    }

    /// Drains `e` if its rate allows, else sets it aside (out of the wait set) until it may
    /// drain again. Returns the earliest event time drained.
    fn drain_limited(
        epoll: &Epoll,
        stats: &mut LoopStats,
        e: &mut SourceEntry,
        now: Nanos,
        events: &mut Vec<Event>,
    ) -> Option<Nanos> {
        if e.paused_until.is_some() {
            return None;
        }
        if !e.book(now) {
            if let (Some(fd), Some(booked)) = (e.source.fd(), e.booked) {
                // Level-triggered: a readable fd left in the set would wake the engine
                // again at once.
                if epoll
                    .ctl(
                        ControlOperation::Modify,
                        fd,
                        EpollEvent::new(EventSet::empty(), e.token),
                    )
                    .is_ok()
                {
                    stats.source_pauses += 1;
                    e.paused_until = Some(booked - VM_SOURCE_BURST_NS);
                    return None;
                }
            }
        }
        e.source.drain(now, events)
    }

    /// Puts back the sources set aside whose time has come, and drains them.
    fn resume_sources(&mut self, now: Nanos, events: &mut Vec<Event>) -> Option<Nanos> {
        let mut first: Option<Nanos> = None;
        for e in self.vm_sources.values_mut().flatten() {
            if e.paused_until.is_none_or(|t| t > now) {
                continue;
            }
            e.paused_until = None;
            if let Some(fd) = e.source.fd() {
                let _ = self.epoll.ctl(
                    ControlOperation::Modify,
                    fd,
                    EpollEvent::new(EventSet::IN, e.token),
                );
            }
            if let Some(t) = Self::drain_limited(&self.epoll, &mut self.stats, e, now, events) {
                first = Some(first.map_or(t, |f| f.min(t)));
            }
        }
        first
    }

    fn sources_mut(&mut self) -> impl Iterator<Item = &mut SourceEntry> {
        self.host_sources
            .iter_mut()
            .chain(self.vm_sources.values_mut().flatten())
    }

    fn run(&mut self) {
        let mut ready = vec![EpollEvent::default(); 32];
        loop {
            if self.shared.stopped.load(Ordering::Acquire) {
                break;
            }
            let timeout = self.poll_timeout();
            let n = match self.epoll.wait(timeout, &mut ready) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
                Err(e) => {
                    // A failing wait set cannot be waited on again: stop, restoring all.
                    self.shared.note_error(format!("epoll_wait: {e}"));
                    break;
                }
            };
            self.stats.wakeups += 1;
            let now = mono_ns();
            let mut trigger = now;
            let mut events = std::mem::take(&mut self.events);
            for ev in &ready[..n] {
                match ev.data() {
                    // Not read: `process` below re-arms it (told it fired) under the core
                    // lock, and setting a timerfd clears its pending expiries, so the
                    // level-triggered wait does not report it again. One system call fewer
                    // per wake-up.
                    TOKEN_TIMER => self.timer_fired = true,
                    TOKEN_COMMAND => {
                        let _ = self.shared.wake.read();
                    }
                    t => {
                        let vm = (t >> 32) as u32;
                        let index = ((t & 0xffff_ffff) >> 2) as usize;
                        let entry = if vm == 0 {
                            self.host_sources.get_mut(index)
                        } else {
                            self.vm_sources
                                .get_mut(&(vm - 1))
                                .and_then(|l| l.get_mut(index))
                        };
                        if let Some(e) = entry {
                            let drained = Self::drain_limited(
                                &self.epoll,
                                &mut self.stats,
                                e,
                                now,
                                &mut events,
                            );
                            if let Some(t) = drained {
                                trigger = trigger.min(t);
                            }
                        }
                    }
                }
            }
            if let Some(t) = self.resume_sources(now, &mut events) {
                trigger = trigger.min(t);
            }
            for e in self.sources_mut() {
                if let (Some(at), Some(p)) = (e.next_poll, e.source.poll_period()) {
                    if now >= at {
                        e.next_poll = Some(now + p);
                        if let Some(t) = e.source.drain(now, &mut events) {
                            trigger = trigger.min(t);
                        }
                    }
                }
            }
            let fixed = self.shared.run_rechecks(now);
            self.sample_quiet(now, &mut events);
            if !self.process(now, trigger, &events) && fixed == 0 {
                self.stats.idle_wakeups += 1;
            }
            events.clear();
            self.events = events;
            // Commands after the events they may have been sent after.
            while let Ok(cmd) = self.rx.try_recv() {
                self.command(cmd);
            }
            if now >= self.next_retry {
                self.next_retry = now + RETRY_NS;
                self.shared.retry_restores();
            }
        }
        restore_all(&self.shared);
    }

    /// Samples the run delay of every vCPU due, and the host-wide gate when due; a vCPU whose
    /// verdict (its own, or every vCPU's while the vCPUs compete only with each other)
    /// changed gets a [`VcpuEvent::Quiet`].
    fn sample_quiet(&mut self, now: Nanos, events: &mut Vec<Event>) {
        let mut host_changed = false;
        if let Some((verdict, next)) = self.others.as_mut() {
            if now >= *next && !self.samplers.is_empty() {
                // The sum below counts each thread's whole run time: a vCPU attached since
                // the last sample would count its past as this window's. Start a new window.
                let n = (self.samplers.len(), self.processes.len());
                if n != self.others_n {
                    self.others_n = n;
                    verdict.restart();
                }
                if verdict.closed() && self.others_since.is_none() {
                    self.others_since = Some(now);
                }
                // A VM in a process of its own counts that process's CPU (its vCPUs
                // included); the others their vCPU threads'.
                let mut ours = thread_cpu_ns();
                let mut whole = BTreeSet::new();
                for (&vm, (pid, cpu)) in self.processes.iter_mut() {
                    if let Some(threads) = crate::pressure::process_threads_ns(*pid) {
                        ours = ours.saturating_add(cpu.fold(&threads));
                        whole.insert(vm);
                    }
                }
                ours = ours.saturating_add(
                    self.samplers
                        .iter()
                        .filter(|(k, _)| !whole.contains(&k.vm))
                        .filter_map(|(_, s)| s.ran_ns())
                        .sum::<u64>(),
                );
                // Only the CPUs the vCPU threads may run on: others' work on CPUs they are
                // not allowed on does not compete with them. (Not the CPUs they are on now:
                // a boost is what lets the kernel move a vCPU that shares a CPU with its
                // sibling next to a lower-priority thread elsewhere.)
                let allowed: BTreeSet<usize> = self
                    .samplers
                    .values()
                    .filter_map(|s| crate::sched::affinity(s.tid()).ok())
                    .flatten()
                    .collect();
                let cpu_busy = &mut self.cpu_busy;
                let sampled = cpu_idle_ns()
                    .map(|cpus| verdict.sample(now, cpu_busy.fold(now, &cpus, &allowed), ours));
                // After the sample: the first verdict switches to the long windows.
                *next = now.saturating_add(verdict.window());
                if let Some(Some(closed)) = sampled {
                    host_changed = true;
                    if closed {
                        self.others_since = Some(now);
                    } else if let Some(t) = self.others_since.take() {
                        self.others_ns += now.saturating_sub(t);
                    }
                }
            }
        }
        if !host_changed && !self.samplers.values().any(|s| now >= s.next) {
            return;
        }
        let boosted: Vec<(VcpuKey, u64, u64)> = {
            let core = self.shared.lock();
            self.samplers
                .iter()
                .filter(|(_, s)| host_changed || now >= s.next)
                .map(|(k, _)| {
                    let paused = core
                        .cells
                        .get(k)
                        .map_or(0, |c| c.paused.load(Ordering::Relaxed));
                    let b = core.engine.vcpu(*k).map_or(0, |v| v.boosted_ns(now));
                    (*k, b, paused)
                })
                .collect()
        };
        let host_closed = self.others.as_ref().is_some_and(|(v, _)| v.closed());
        for (key, _, _) in &boosted {
            self.reconcile(*key);
        }
        for (key, b, paused) in boosted {
            let Some(s) = self.samplers.get_mut(&key) else {
                continue;
            };
            s.poll(now, b, paused);
            if s.starved() {
                events.push(Event::new(key, VcpuEvent::Starved));
            }
            let sleeps = s.sleeps();
            if sleeps != self.sleeping.contains(&key) {
                if sleeps {
                    self.sleeping.insert(key);
                } else {
                    self.sleeping.remove(&key);
                }
                events.push(Event::new(key, VcpuEvent::Sleeps(sleeps)));
            }
            let quiet = s.quiet() || host_closed;
            if self.told.get(&key).copied().unwrap_or(false) == quiet {
                continue;
            }
            self.told.insert(key, quiet);
            if quiet {
                self.quiet_since.insert(key, now);
            } else if let Some(t) = self.quiet_since.remove(&key) {
                self.quiet_ns += now.saturating_sub(t);
            }
            events.push(Event::new(key, VcpuEvent::Quiet(quiet)));
        }
        self.update_lazy(now);
    }

    /// Checks that the kernel has vCPU `key`'s thread in the class last recorded as applied,
    /// and sets the wanted class again when it does not. Skipped while a change is in flight.
    fn reconcile(&mut self, key: VcpuKey) {
        let Some(cell) = self.shared.lock().cells.get(&key).cloned() else {
            return;
        };
        // Only a thread that was changed since the last look, or is recorded in another
        // class than its own: a quiet vCPU costs no system call.
        let sets =
            cell.self_sets.load(Ordering::Relaxed) + cell.remote_sets.load(Ordering::Relaxed);
        let seen = self.reconcile_seen.insert(key, sets);
        let applied = cell.applied.load(Ordering::SeqCst);
        let busy = |c: &ThreadCell| {
            c.inflight.load(Ordering::SeqCst) != 0 || c.setting.load(Ordering::SeqCst) != 0
        };
        if (seen == Some(sets) && applied == ORIGINAL) || applied == UNKNOWN || busy(&cell) {
            return;
        }
        let Some(expected) = self.shared.attr_of(&cell, applied) else {
            return;
        };
        let Ok(actual) = self.shared.applier.get(cell.tid) else {
            return;
        };
        let sets_after =
            cell.self_sets.load(Ordering::Relaxed) + cell.remote_sets.load(Ordering::Relaxed);
        // A change made meanwhile (or still being made) moved the kernel or the record: not
        // a divergence.
        if same_class(&actual, &expected)
            || busy(&cell)
            || sets_after != sets
            || cell.applied.load(Ordering::SeqCst) != applied
        {
            return;
        }
        self.shared.reconciled.fetch_add(1, Ordering::Relaxed);
        self.shared.note_error(format!(
            "{key} (tid {}): found policy {} prio {} nice {}, recorded policy {} prio {} nice {}: set again",
            cell.tid, actual.policy, actual.priority, actual.nice, expected.policy, expected.priority, expected.nice
        ));
        cell.applied.store(UNKNOWN, Ordering::SeqCst);
        self.shared.realize(&cell, false);
    }

    /// Tells the sources whether every vCPU is quiet (only when that changed).
    fn update_lazy(&mut self, now: Nanos) {
        let cells = self.shared.lock().cells.len();
        let lazy = cells > 0
            && self.samplers.len() == cells
            && self
                .samplers
                .keys()
                .all(|k| self.told.get(k) == Some(&true));
        if lazy == self.lazy {
            return;
        }
        self.lazy = lazy;
        for e in self.sources_mut() {
            e.source.set_lazy(lazy);
            e.next_poll = e.source.poll_period().map(|p| now.saturating_add(p));
        }
    }

    fn poll_timeout(&mut self) -> i32 {
        let now = mono_ns();
        let retry = self
            .shared
            .failed_restores()
            .then_some(self.next_retry.max(now));
        let others = self
            .others
            .as_ref()
            .filter(|_| !self.samplers.is_empty())
            .map(|(_, next)| *next);
        let sample = self
            .samplers
            .values()
            .map(|p| p.next)
            .min()
            .into_iter()
            .chain(retry)
            .chain(others)
            .min();
        let next = self
            .sources_mut()
            .flat_map(|e| [e.next_poll, e.paused_until])
            .flatten()
            .chain(sample)
            .min()
            .map(|t| t.saturating_sub(now).div_ceil(1_000_000).min(1000) as i32);
        match next {
            // The hand-off queue was held: look again within a millisecond.
            _ if self.handoff_retry => next.map_or(1, |t| t.min(1)),
            Some(t) => t,
            None => -1,
        }
    }

    /// Feeds `events` and the due timers to the engine, applies, re-arms the timer. Returns
    /// whether a class change was decided.
    fn process(&mut self, now: Nanos, trigger: Nanos, events: &[Event]) -> bool {
        let shared = self.shared.clone();
        {
            let mut core = shared.lock();
            if std::mem::take(&mut self.timer_fired) {
                core.fired = true;
            }
            for e in events {
                // Host-side signals (tracepoints, VMM injections), not the guest's slot.
                if matches!(e.what, VcpuEvent::Interrupt | VcpuEvent::Woken) {
                    if let Some(c) = core.cells.get(&e.key) {
                        c.host_events.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            // Handed-off exits first: they happened before anything a vCPU thread could add.
            self.handoff_retry = !core.take_handoffs(&shared, now, &mut self.touched);
            core.events.extend_from_slice(events);
            let due = core.due_timers(now, None);
            let trigger = due.map_or(trigger, |t| t.min(trigger));
            core.process(&shared, now, trigger, &mut self.touched);
            let fired = std::mem::take(&mut core.fired_timers);
            shared.timers_engine.fetch_add(fired, Ordering::Relaxed);
            core.arm(&shared, now);
        }
        let decided = !self.touched.is_empty();
        let mut raced = false;
        for c in self.touched.drain(..) {
            if !shared.realize(&c, false) {
                // Raced with that vCPU changing itself: looked at again shortly.
                raced |= shared.defer_recheck(&c, 0, now);
            }
        }
        if raced {
            shared.arm_for_recheck(now);
        }
        decided
    }

    fn command(&mut self, cmd: Command) {
        let now = mono_ns();
        let shared = self.shared.clone();
        match cmd {
            Command::AddVm {
                vm,
                driver,
                opts,
                parts,
                reply,
            } => {
                let opts = kernel_options(&driver, opts);
                let added = check_classes(&opts)
                    .and_then(|()| Ok(shared.lock().engine.add_vm(vm, &driver, &opts)?));
                let r = match added {
                    Err(e) => Err(e),
                    Ok(()) => {
                        if let Some(p) = parts.publisher {
                            shared.lock().publishers.insert(vm, p);
                        }
                        let r = parts
                            .sources
                            .into_iter()
                            .try_for_each(|s| self.add_source(Some(vm), s));
                        if r.is_err() {
                            self.drop_vm(vm, now);
                        }
                        r.map_err(RuntimeError::from)
                    }
                };
                let _ = reply.send(r);
            }
            Command::SetVmProcess { vm, pid, reply } => {
                let known = shared.lock().engine.driver_name(vm).is_some();
                // SAFETY: getpid has no arguments and cannot fail.
                let me = unsafe { libc::getpid() };
                let _ = reply.send(if !known {
                    Err(EngineError::UnknownVm(vm).into())
                } else if pid == me || pid <= 0 {
                    // This process also runs the host's other work here (the testbed's hogs):
                    // its vCPU threads alone are the VM's.
                    Ok(())
                } else {
                    self.processes.insert(vm, (pid, Default::default()));
                    // Its past counts from the next window on.
                    if let Some((v, _)) = self.others.as_mut() {
                        v.restart();
                    }
                    Ok(())
                });
            }
            Command::RemoveVm { vm, reply } => {
                let known = shared.lock().engine.driver_name(vm).is_some();
                self.drop_vm(vm, now);
                let _ = reply.send(if known {
                    Ok(())
                } else {
                    Err(EngineError::UnknownVm(vm).into())
                });
            }
            Command::AddVcpu {
                key,
                tid,
                hooked,
                reply,
            } => {
                let _ = reply.send(self.add_vcpu(key, tid, hooked, now));
            }
            Command::RemoveVcpu { key, reply } => {
                let r = if self.remove_vcpu(key, now) {
                    // A boost it let go of may have gone to a waiting vCPU (the cap).
                    self.process(now, now, &[]);
                    Ok(())
                } else {
                    Err(RuntimeError::UnknownVcpu(key))
                };
                let _ = reply.send(r);
            }
            Command::SetEnabled { vm, on, reply } => {
                let r = {
                    let mut core = shared.lock();
                    let mut out = Vec::new();
                    let r = core.engine.set_enabled(vm, on, now, &mut out);
                    if r.is_ok() && vm.is_none() {
                        core.enabled = on;
                    }
                    core.apply_now(&shared, &out, now, &mut self.touched);
                    r
                };
                self.process(now, now, &[]);
                let _ = reply.send(r.map_err(Into::into));
            }
            Command::SetDriver {
                vm,
                driver,
                opts,
                reply,
            } => {
                let opts = kernel_options(&driver, opts);
                let r = check_classes(&opts).and_then(|()| {
                    let mut core = shared.lock();
                    let mut out = Vec::new();
                    let r = core.engine.set_driver(vm, &driver, &opts, now, &mut out);
                    core.apply_now(&shared, &out, now, &mut self.touched);
                    Ok(r?)
                });
                self.process(now, now, &[]);
                let _ = reply.send(r);
            }
            Command::Status(reply) => {
                let _ = reply.send(self.status());
            }
        }
    }

    fn add_vcpu(
        &mut self,
        key: VcpuKey,
        tid: i32,
        hooked: bool,
        now: Nanos,
    ) -> Result<VcpuHandle, RuntimeError> {
        let shared = self.shared.clone();
        {
            let core = shared.lock();
            if core.engine.driver_name(key.vm).is_none() {
                return Err(EngineError::UnknownVm(key.vm).into());
            }
            if core.cells.contains_key(&key) {
                return Err(RuntimeError::Duplicate(key));
            }
            if let Some(c) = core.cells.values().find(|c| c.tid == tid) {
                return Err(RuntimeError::DuplicateTid { tid, key: c.key });
            }
        }
        // A thread whose restore is still being retried is not attached again (its identity
        // and original attributes belong to that restore).
        if let Some(c) = shared
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|c| c.tid == tid)
        {
            return Err(RuntimeError::DuplicateTid { tid, key: c.key });
        }
        shared
            .applier
            .attach(tid)
            .map_err(|source| RuntimeError::Thread { key, source })?;
        let original = match shared.applier.get(tid) {
            Ok(a) => a,
            Err(source) => {
                shared.applier.detach(tid);
                return Err(RuntimeError::Thread { key, source });
            }
        };
        let failed = self.sources_mut().find_map(|e| {
            e.source
                .attach(key, tid)
                .err()
                .map(|why| (e.source.name().to_string(), why))
        });
        if let Some((name, why)) = failed {
            for e in self.sources_mut() {
                e.source.detach(key);
            }
            shared.applier.detach(tid);
            return Err(RuntimeError::Source(name, why));
        }
        let cell = Arc::new(ThreadCell::new(key, tid, original, hooked));
        {
            let mut core = shared.lock();
            core.cells.insert(key, cell.clone());
            core.events.push(Event::new(key, VcpuEvent::Registered));
            if hooked {
                // Its thread pauses at its exits when it pays back by pausing.
                core.events.push(Event::new(key, VcpuEvent::Pausable));
            }
        }
        self.process(now, now, &[]);
        if let Some(gate) = self.quiet_gate {
            match VcpuSampler::open(gate, tid) {
                Some(s) => {
                    self.samplers.insert(key, s);
                }
                None => self.shared.note_error(format!(
                    "{key}: no /proc/{tid}/schedstat: boosting it whenever the driver decides"
                )),
            }
        }
        // A new vCPU is not quiet (yet): sources wake the engine again.
        self.update_lazy(now);
        Ok(VcpuHandle {
            cell,
            shared,
            touched: Vec::with_capacity(4),
        })
    }

    fn remove_vcpu(&mut self, key: VcpuKey, now: Nanos) -> bool {
        let shared = self.shared.clone();
        let cell = {
            let mut core = shared.lock();
            if !core.cells.contains_key(&key) {
                return false;
            }
            core.events.push(Event::new(key, VcpuEvent::Unregistered));
            core.process(&shared, now, now, &mut self.touched);
            for kind in TimerKind::ALL {
                if let Some((at, _)) = core.timers.remove(&(key, kind)) {
                    core.order.remove(&(at, key, kind));
                }
            }
            core.cells.remove(&key)
        };
        self.touched.retain(|c| c.key != key);
        if let Some(c) = cell {
            c.removed.store(true, Ordering::Release);
            restore_cell(&shared, &c);
            // A failed restore keeps the thread's identity for its retries.
            if !c.failed.load(Ordering::Acquire) {
                shared.applier.detach(c.tid);
            }
        }
        for e in self.sources_mut() {
            e.source.detach(key);
        }
        self.samplers.remove(&key);
        self.told.remove(&key);
        self.sleeping.remove(&key);
        self.reconcile_seen.remove(&key);
        self.update_lazy(now);
        if let Some(t) = self.quiet_since.remove(&key) {
            self.quiet_ns += now.saturating_sub(t);
        }
        true
    }

    fn drop_vm(&mut self, vm: u32, now: Nanos) {
        self.processes.remove(&vm);
        let keys: Vec<VcpuKey> = self
            .shared
            .lock()
            .cells
            .keys()
            .filter(|k| k.vm == vm)
            .copied()
            .collect();
        for k in keys {
            self.remove_vcpu(k, now);
        }
        let shared = self.shared.clone();
        {
            let mut core = shared.lock();
            let mut out = Vec::new();
            core.engine.remove_vm(vm, now, &mut out);
            core.apply(&shared, &out, now, &mut self.touched);
            core.publishers.remove(&vm);
            core.follow.retain(|e| e.key.vm != vm);
        }
        // Its vCPUs were removed (and restored) above; another VM's vCPU may have been
        // handed the boost they let go of (the host-wide cap): apply that now.
        self.touched.retain(|c| c.key.vm != vm);
        self.process(now, now, &[]);
        if let Some(list) = self.vm_sources.remove(&vm) {
            for e in list {
                if let Some(fd) = e.source.fd() {
                    let _ = self
                        .epoll
                        .ctl(ControlOperation::Delete, fd, EpollEvent::default());
                }
            }
        }
    }

    fn status(&self) -> Status {
        let now = mono_ns();
        let core = self.shared.lock();
        let uptime = now.saturating_sub(self.started);
        let cpu = thread_cpu_ns();
        let mut vms: BTreeMap<u32, VmStatus> = BTreeMap::new();
        let mut self_sets = 0;
        let mut remote_sets = 0;
        let mut hook_calls = 0;
        for (key, cell) in &core.cells {
            let st = core.engine.vcpu(*key);
            let vm = vms.entry(key.vm).or_insert_with(|| VmStatus {
                id: key.vm,
                driver: core.engine.driver_name(key.vm).unwrap_or("?").into(),
                enabled: core.engine.is_enabled(key.vm),
                host_events: 0,
                boost_latency: AtomicHist::merged(
                    core.cells
                        .iter()
                        .filter(|(k, _)| k.vm == key.vm)
                        .map(|(_, c)| &c.boost_latency),
                ),
                vcpus: Vec::new(),
            });
            let c = st.map(|s| s.counters).unwrap_or_default();
            let host_events = cell.host_events.load(Ordering::Relaxed);
            vm.host_events += host_events;
            let ss = cell.self_sets.load(Ordering::Relaxed);
            let rs = cell.remote_sets.load(Ordering::Relaxed);
            self_sets += ss;
            remote_sets += rs;
            hook_calls += cell.hook_calls.load(Ordering::Relaxed);
            vm.vcpus.push(VcpuStatus {
                vcpu: key.vcpu,
                tid: cell.tid,
                boosted: cell.is_boosted(),
                boosts: c.boosts,
                unboosts: c.unboosts,
                throttles: c.throttles,
                refused: c.refused,
                bad_slots: c.bad_slots,
                boosted_ms: st.map_or(0.0, |s| s.boosted_ns(now) as f64 / 1e6),
                boosted_by_cause_ms: st.map_or([0.0; 4], |s| {
                    s.boosted_by_cause_ns(now).map(|n| n as f64 / 1e6)
                }),
                generic_throttles: c.generic_throttles,
                longest_boost_ms: st.map_or(0.0, |s| {
                    let open = s.boost.map_or(0, |b| now.saturating_sub(b.since));
                    s.counters.longest_ns.max(open) as f64 / 1e6
                }),
                debt_ms: st.map_or(0.0, |s| s.debts.generic as f64 / 1e6),
                repaid_ms: st.map_or(0.0, |s| {
                    let open = s.repay_since.map_or(0, |t| now.saturating_sub(t));
                    (s.counters.repaid_ns + open) as f64 / 1e6
                }),
                paused_ms: cell.paused.load(Ordering::Relaxed) as f64 / 1e6,
                deboosted_ms: st.map_or(0.0, |s| {
                    let open = s.deboost.map_or(0, |(t, _)| now.saturating_sub(t));
                    (s.counters.deboosted_ns + open) as f64 / 1e6
                }),
                tickets: c.tickets,
                host_events,
                self_applied: ss,
                remote_applied: rs,
                apply_errors: cell.apply_errors.load(Ordering::Relaxed),
                skipped_quiet: c.skipped_quiet,
                capped: c.capped,
                cap_yields: c.cap_yields,
                boost_latency: cell.boost_latency.summary(),
            });
        }
        for vm in core.engine.vm_ids() {
            vms.entry(vm).or_insert_with(|| VmStatus {
                id: vm,
                driver: core.engine.driver_name(vm).unwrap_or("?").into(),
                enabled: core.engine.is_enabled(vm),
                ..VmStatus::default()
            });
        }
        let secs = uptime as f64 / 1e9;
        let per_s = |n: u64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
        let lost = self
            .host_sources
            .iter()
            .chain(self.vm_sources.values().flatten())
            .map(|e| e.source.lost())
            .sum();
        Status {
            enabled: core.enabled,
            cost: Cost {
                uptime_s: secs,
                engine_cpu_s: cpu as f64 / 1e9,
                engine_cpu_percent: if uptime > 0 {
                    cpu as f64 / uptime as f64 * 100.0
                } else {
                    0.0
                },
                engine_deadline: self.shared.engine_prio.load(Ordering::Acquire) == ENGINE_DEADLINE,
                wakeups: self.stats.wakeups,
                wakeups_per_s: per_s(self.stats.wakeups),
                idle_wakeups: self.stats.idle_wakeups,
                source_pauses: self.stats.source_pauses,
                engine_setattr: remote_sets,
                vcpu_setattr: self_sets,
                setattr_per_s: per_s(remote_sets + self_sets),
                vcpu_handle_calls: hook_calls,
                vcpu_handle_busy: self.shared.hook_busy.load(Ordering::Relaxed),
                vcpu_handoffs: self.shared.handoffs.load(Ordering::Relaxed),
                engine_timers: self.shared.timers_engine.load(Ordering::Relaxed),
                vcpu_timers: self.shared.timers_vcpu.load(Ordering::Relaxed),
                rechecks: self.shared.rechecks.load(Ordering::Relaxed),
                recheck_fixed: self.shared.recheck_fixed.load(Ordering::Relaxed),
                recheck_settled: self.shared.recheck_settled.load(Ordering::Relaxed),
                reconciled: self.shared.reconciled.load(Ordering::Relaxed),
                quiet_s: {
                    let now = mono_ns();
                    let open: u64 = self
                        .quiet_since
                        .values()
                        .map(|t| now.saturating_sub(*t))
                        .sum();
                    (self.quiet_ns + open) as f64 / 1e9
                },
                self_contended_s: {
                    let open = self.others_since.map_or(0, |t| mono_ns().saturating_sub(t));
                    (self.others_ns + open) as f64 / 1e9
                },
            },
            host_events_lost: lost,
            apply_errors: self.shared.error_count.load(Ordering::Relaxed),
            apply_errors_by_kind: APPLY_ERROR_KINDS
                .iter()
                .zip(&self.shared.error_kinds)
                .map(|(k, n)| (k.to_string(), n.load(Ordering::Relaxed)))
                .filter(|(_, n)| *n > 0)
                .collect(),
            unrestored: self.shared.unrestored(),
            errors: self
                .shared
                .errors
                .lock()
                .map(|e| e.iter().cloned().collect())
                .unwrap_or_default(),
            vms: vms.into_values().collect(),
        }
    }
}

/// What the runtime costs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Cost {
    /// Time since the runtime started, s.
    pub uptime_s: f64,
    /// CPU time of the engine thread, s.
    pub engine_cpu_s: f64,
    /// The engine thread's CPU, percent of one core.
    pub engine_cpu_percent: f64,
    /// The engine thread runs on its deadline reservation
    /// ([`crate::mechanism::helper_deadline`]); false: at a FIFO priority above the classes
    /// it applied, or not raised (nothing real-time applied yet).
    #[serde(default)]
    pub engine_deadline: bool,
    /// Wake-ups of the engine thread.
    pub wakeups: u64,
    /// Wake-ups per second.
    pub wakeups_per_s: f64,
    /// Of the wake-ups, those that decided no class change (a timer or event with nothing to
    /// apply, one a vCPU thread had handled meanwhile, a control request, a sample).
    #[serde(default)]
    pub idle_wakeups: u64,
    /// `sched_setattr` calls made by the engine thread on vCPU threads.
    pub engine_setattr: u64,
    /// `sched_setattr` calls made by vCPU threads on themselves.
    pub vcpu_setattr: u64,
    /// All `sched_setattr` calls per second.
    pub setattr_per_s: f64,
    /// Times vCPU threads ran the engine for themselves.
    pub vcpu_handle_calls: u64,
    /// Times a vCPU thread found the engine busy and tried again later.
    pub vcpu_handle_busy: u64,
    /// Exits a vCPU thread in a deadline class handed to the engine thread instead of running
    /// the engine itself (it must not hold the engine's lock: the kernel may stop it there).
    #[serde(default)]
    pub vcpu_handoffs: u64,
    /// Engine timers (budget, cooldown, lead) fired by the engine thread.
    #[serde(default)]
    pub engine_timers: u64,
    /// Engine timers fired by vCPU threads for themselves, at their exits.
    #[serde(default)]
    pub vcpu_timers: u64,
    /// Changes that raced with a vCPU changing itself (its thread applies the latest when it
    /// runs; the engine thread looks at it 50 µs later, and again while the change is in flight).
    #[serde(default)]
    pub rechecks: u64,
    /// Of those, the ones the engine thread found without the wanted class (the vCPU had
    /// lowered itself and was preempted inside that call) and set again.
    #[serde(default)]
    pub recheck_fixed: u64,
    /// Of those, the ones the vCPU's own thread settled before the engine thread looked (no
    /// look, no wake-up of the engine thread).
    #[serde(default)]
    pub recheck_settled: u64,
    /// Times a vCPU thread was found in another class than recorded and set again (a lost
    /// update between threads; checked once per quiet-gate window).
    #[serde(default)]
    pub reconciled: u64,
    /// vCPU time the quiet gate held boosting off (the vCPU did not wait for a CPU), s, summed
    /// over vCPUs; 0 without the gate.
    #[serde(default)]
    pub quiet_s: f64,
    /// Time the host-wide gate held every vCPU quiet because the attached vCPUs competed only
    /// with each other (`pressure::OthersGate`), s; 0 without the gate.
    #[serde(default)]
    pub self_contended_s: f64,
    /// Times a VM's event source (its doorbells) was set aside for a moment for being read
    /// faster than 5 000 times a second on average (a guest ringing in a loop).
    #[serde(default)]
    pub source_pauses: u64,
}

/// One vCPU in [`Status`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VcpuStatus {
    /// vCPU index.
    pub vcpu: u32,
    /// Thread id.
    pub tid: i32,
    /// Boosted right now (as applied).
    pub boosted: bool,
    /// Boosts decided.
    pub boosts: u64,
    /// Unboosts decided.
    pub unboosts: u64,
    /// Boosts ended by a budget.
    pub throttles: u64,
    /// Requests refused while throttled.
    pub refused: u64,
    /// Slots found invalid.
    pub bad_slots: u64,
    /// Time boosted, ms.
    pub boosted_ms: f64,
    /// Time boosted by the cause that started each boost (static, guest request, host
    /// interrupt or wake-up, ahead of a published deadline), ms.
    #[serde(default)]
    pub boosted_by_cause_ms: [f64; 4],
    /// Throttles at which the generic debt had reached its limit (the rest: the
    /// critical-section debt alone).
    #[serde(default)]
    pub generic_throttles: u64,
    /// Longest boost (the one in progress included), ms.
    #[serde(default)]
    pub longest_boost_ms: f64,
    /// Generic debt (boosted time not yet paid back), ms.
    pub debt_ms: f64,
    /// Time spent paying back boosted time below normal weight, ms.
    pub repaid_ms: f64,
    /// Of that, time its thread paused off the CPU while paying back by pausing
    /// ([`VcpuHandle::repay_pause`]), ms.
    #[serde(default)]
    pub paused_ms: f64,
    /// Time spent deboosted (a v3 guest running idle or low-priority work), ms.
    #[serde(default)]
    pub deboosted_ms: f64,
    /// Interrupt tickets issued to a v3 guest, and echoed by it.
    #[serde(default)]
    pub tickets: [u64; 2],
    /// Host-side events (tracepoint hits, VMM injections) for this vCPU.
    pub host_events: u64,
    /// `sched_setattr` calls the vCPU thread made on itself.
    pub self_applied: u64,
    /// `sched_setattr` calls the engine thread made on the vCPU thread.
    pub remote_applied: u64,
    /// Failed `sched_setattr` calls.
    pub apply_errors: u64,
    /// Boosts not started because the host was quiet.
    #[serde(default)]
    pub skipped_quiet: u64,
    /// Boosts that waited for the host-wide cap.
    #[serde(default)]
    pub capped: u64,
    /// Boosts ended to hand their slot of the host-wide cap to one that waited a quantum.
    #[serde(default)]
    pub cap_yields: u64,
    /// Boost decision → class applied.
    pub boost_latency: LatencyStats,
}

/// One VM in [`Status`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VmStatus {
    /// VM id.
    pub id: u32,
    /// Driver.
    pub driver: String,
    /// Boosting enabled for it (and globally).
    pub enabled: bool,
    /// Host-side events (tracepoint hits, VMM injections) for its vCPUs.
    pub host_events: u64,
    /// Boost decision → class applied, over its vCPUs.
    pub boost_latency: LatencyStats,
    /// Its vCPUs.
    pub vcpus: Vec<VcpuStatus>,
}

/// The runtime's typed status: what vm reports, the bench, `ctl status` and metrics show.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// Boosting enabled globally.
    pub enabled: bool,
    /// The runtime's own cost.
    pub cost: Cost,
    /// VMs.
    pub vms: Vec<VmStatus>,
    /// Records the host sources lost.
    pub host_events_lost: u64,
    /// `sched_setattr` failures and other errors, counted.
    pub apply_errors: u64,
    /// Failed `sched_setattr` calls by kind (see [`APPLY_ERROR_KINDS`]; kinds never seen are
    /// left out).
    #[serde(default)]
    pub apply_errors_by_kind: BTreeMap<String, u64>,
    /// Threads whose original attributes could not be restored (still tried again; in the
    /// final status: given up).
    #[serde(default)]
    pub unrestored: Vec<i32>,
    /// The last few errors.
    pub errors: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pause_ends_before_the_next_timer() {
        let ms = 1_000_000;
        let owes = ms;
        // Up to the pause asked for, with the next timer far away.
        assert_eq!(pause_len(10 * ms, 200_000, 20 * ms, owes), 200_000);
        // Never into the margin before the next timer.
        assert_eq!(
            pause_len(10 * ms, 200_000, 10 * ms + 100_000, owes),
            100_000 - PAUSE_MARGIN
        );
        // Too short to be worth a sleep, or the timer already due or past: none.
        assert_eq!(
            pause_len(10 * ms, 200_000, 10 * ms + PAUSE_MARGIN + 9_000, owes),
            0
        );
        assert_eq!(pause_len(10 * ms, 200_000, 10 * ms, owes), 0);
        assert_eq!(pause_len(10 * ms, 200_000, 0, owes), 0);
        // No timer at all.
        assert_eq!(pause_len(10 * ms, 200_000, u64::MAX, owes), 200_000);
        assert_eq!(pause_len(u64::MAX - 5, 200_000, u64::MAX, owes), 0);
    }

    #[test]
    fn a_pause_is_no_longer_than_what_is_owed() {
        let ms = 1_000_000;
        assert_eq!(pause_len(10 * ms, 200_000, u64::MAX, 50_000), 50_000);
        // The last bit owed takes the shortest pause worth a sleep.
        assert_eq!(pause_len(10 * ms, 200_000, u64::MAX, 3_000), PAUSE_MIN);
        // Nothing owed (paid back, or a repayment without a ledger): no pause.
        assert_eq!(pause_len(10 * ms, 200_000, u64::MAX, 0), 0);
    }

    /// `dynamic`'s default task slice is kept where the kernel keeps custom slices, replaced by
    /// the FIFO default where it does not, and a class the options name is never touched.
    #[test]
    fn dynamic_gets_fifo_task_boosts_on_a_kernel_without_custom_slices() {
        let none = kernel_options("dynamic", DriverOptions::new());
        if sched::fair_slice().custom {
            assert_eq!(none.get("class_task"), None);
        } else {
            assert_eq!(none.get("class_task"), Some("fifo:10"));
        }
        for named in [["class", "rr:3"], ["class_task", "slice:200us"]] {
            let o = kernel_options("dynamic", DriverOptions::new().set(named[0], named[1]));
            assert_eq!(o.get(named[0]), Some(named[1]));
            assert_eq!(o.get("class_task").is_some(), named[0] == "class_task");
        }
        let da = kernel_options("deadline-aware", DriverOptions::new());
        assert_eq!(da.get("class_task"), None);
    }

    /// A look after a race dropped while another thread holds the core ([`Shared::settled`]):
    /// the holder re-arms the engine thread's timer as it lets go, so the engine thread does
    /// not wake for the dropped look.
    #[test]
    fn a_dropped_look_rearms_the_timer_when_the_core_is_let_go() {
        let rt = Runtime::start(RuntimeConfig::default()).expect("runtime");
        let shared = rt.handle.shared.clone();
        let far = mono_ns() + 10_000_000_000;
        let mut held = shared.lock();
        shared.recheck_at.store(far, Ordering::Release);
        held.arm(&shared, mono_ns());
        assert_eq!(held.armed, Some(far), "armed for the look");
        // Another thread's `settled`: the look goes, the core is busy.
        shared.recheck_at.store(NO_TIMER, Ordering::Release);
        shared.rearm.store(true, Ordering::Release);
        assert!(shared.try_core_uncounted().is_none(), "the core is held");
        drop(held);
        assert_eq!(shared.lock().armed, None, "re-armed as the holder let go");
        assert!(!shared.rearm.load(Ordering::Acquire));
        drop(rt);
    }

    #[test]
    fn rechecks_back_off_to_a_bounded_window() {
        let delays: Vec<Nanos> = (0..RECHECK_TRIES).map(recheck_delay).collect();
        assert_eq!(delays[0], RECHECK_NS, "the first look soon after the race");
        assert!(delays.windows(2).all(|w| w[1] == w[0] * 2 || w[1] == w[0]));
        assert_eq!(
            *delays.last().unwrap(),
            RECHECK_NS << 8,
            "at most 12.8 ms apart"
        );
        let total: Nanos = delays.iter().sum();
        assert!(
            (80_000_000..150_000_000).contains(&total),
            "about 100 ms of looks in all: {total} ns"
        );
    }
}
