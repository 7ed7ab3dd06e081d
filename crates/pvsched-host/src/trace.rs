//! Host-side event sources from kernel tracepoints (`perf_event_open`), mapped to vCPU threads,
//! so that boosting works without any guest cooperation.
//!
//! - **LAPIC timer expiry**: `timer:hrtimer_expire_entry` filtered on `function ==
//!   apic_timer_fn`, opened on every CPU. It fires in hard-interrupt context when a vCPU's
//!   LAPIC timer expires, i.e. when the guest's timer interrupt becomes pending, whether or not
//!   its vCPU thread runs. The hrtimer is mapped to its vCPU through `timer:hrtimer_start`
//!   events (same filter) opened on each vCPU thread: the thread arms its own LAPIC timer.
//!   That stream is closed once the timer is known (it lives as long as the vCPU).
//!   Expiries that interrupt the vCPU's own thread (`skip_running`) or an idle CPU
//!   (`skip_idle`) are dropped in the kernel: the vCPU needs no help then.
//! - **vCPU wake-up**: `kvm:kvm_vcpu_wakeup` on each vCPU thread.
//! - **Thread wake-up, any VMM**: `sched:sched_waking`, opened on every CPU with a filter on
//!   the attached vCPU threads' ids (the woken thread is in the record; a stream opened on
//!   the thread itself sees only the wake-ups it *causes*): the moment a sleeping vCPU thread
//!   is woken, KVM or not (an idle QEMU TCG vCPU thread sleeps on a condition variable and
//!   is woken by the main loop for a timer or an interrupt; a saturated one never sleeps).
//!   Reopened when the set of threads changes.
//! - **Interrupt accepted**: `kvm:kvm_apic_accept_irq` on each vCPU thread. On hosts without
//!   posted interrupts it fires only once the vCPU thread runs again (too late to help, see
//!   `docs/policy.md`), so it is off by default.
//!
//! Limitation: the kernel throttles sampled events to `perf_event_max_sample_rate / HZ` per
//! tick. On a CPU that is idle with its tick stopped (NO_HZ), frequent timer expiries hit
//! that limit and further samples are dropped until the next tick; [`TraceCounts::throttled`]
//! counts it. A loaded host (the case boosting is for) keeps its ticks running.

use crate::runtime::EventSource;
use perf_event::events::Tracepoint;
use perf_event::{Builder, Clock, SampleFlag, Sampler};
use pvsched_policy::{Event, Nanos, VcpuEvent, VcpuKey};
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

const EXPIRE: &str = "timer/hrtimer_expire_entry";
const START: &str = "timer/hrtimer_start";
const WAKEUP: &str = "kvm/kvm_vcpu_wakeup";
const ACCEPT_IRQ: &str = "kvm/kvm_apic_accept_irq";
const WAKING: &str = "sched/sched_waking";

/// Where tracefs is (or gets) mounted.
pub const TRACEFS: &str = "/sys/kernel/tracing";

/// Pages of each perf ring (plus the header page).
const RING_PAGES: usize = 16;

/// Errors of opening tracepoint sources.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// tracefs is not mounted and could not be.
    #[error("tracefs is not mounted at {TRACEFS} and mounting it failed")]
    Mount(#[source] io::Error),
    /// A tracepoint is missing.
    #[error("tracepoint {0} does not exist on this kernel")]
    NoTracepoint(String, #[source] io::Error),
    /// The LAPIC timer callback's address is not visible.
    #[error("cannot find apic_timer_fn in /proc/kallsyms (needs root and the kvm module)")]
    NoSymbol,
    /// A tracepoint's format lacks a field.
    #[error("the format of {0} has no field {1}")]
    Format(String, &'static str),
    /// `perf_event_open` failed.
    #[error("perf_event_open for {0} failed")]
    Open(String, #[source] io::Error),
    /// Setting a tracepoint filter failed.
    #[error("setting the filter of {0} failed")]
    Filter(String, #[source] io::Error),
}

/// Which tracepoints to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceConfig {
    /// LAPIC timer expiry (`hrtimer_expire_entry` on `apic_timer_fn`).
    pub timer_expiry: bool,
    /// `kvm_vcpu_wakeup`.
    pub wakeup: bool,
    /// `kvm_apic_accept_irq`.
    pub accept_irq: bool,
    /// `sched_waking` of the vCPU thread (any VMM, KVM or not).
    pub waking: bool,
    /// Drop, in the kernel, the LAPIC timer expiries of a vCPU whose thread is running at
    /// that moment (KVM delivers those at its next entry anyway): fewer wake-ups.
    pub skip_running: bool,
    /// Drop, in the kernel, the LAPIC timer expiries that interrupt an idle CPU (`common_pid
    /// == 0`): the vCPU thread they wake finds a free CPU without help, so waking the engine
    /// for them only costs.
    pub skip_idle: bool,
}

impl Default for TraceConfig {
    fn default() -> Self {
        TraceConfig {
            timer_expiry: true,
            wakeup: false,
            accept_irq: false,
            waking: false,
            skip_running: true,
            skip_idle: true,
        }
    }
}

/// The names of the host events, as `--host-events` and `host_events` spell them.
pub const HOST_EVENT_NAMES: &str = "timer, wakeup, irq, waking";

impl TraceConfig {
    /// No tracepoint at all (the `skip_*` refinements at their defaults).
    pub fn none() -> TraceConfig {
        TraceConfig {
            timer_expiry: false,
            ..TraceConfig::default()
        }
    }

    /// True when any tracepoint is on.
    pub fn any(&self) -> bool {
        self.timer_expiry || self.wakeup || self.accept_irq || self.waking
    }

    /// The tracepoints named in `names` ([`HOST_EVENT_NAMES`]); an unknown name is the error.
    pub fn from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<TraceConfig, String> {
        let mut c = TraceConfig::none();
        for name in names {
            match name.trim() {
                "timer" => c.timer_expiry = true,
                "wakeup" => c.wakeup = true,
                "irq" => c.accept_irq = true,
                "waking" => c.waking = true,
                other => {
                    return Err(format!(
                        "unknown host event {other:?} (expected {HOST_EVENT_NAMES})"
                    ))
                }
            }
        }
        Ok(c)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Expire,
    Start,
    Wakeup,
    AcceptIrq,
    Waking,
}

struct Stream {
    sampler: Sampler,
    kind: Kind,
}

/// Host-wide tracepoint streams feeding the runtime: the CPU-wide LAPIC-timer expiry streams
/// are opened once per host and shared by every VM; the per-thread streams (`hrtimer_start`,
/// wake-ups, accepted interrupts) are opened when a vCPU thread is attached and closed when
/// it is detached. One fd (an inner epoll set) is readable when any stream has records.
pub struct TraceSource {
    cfg: TraceConfig,
    epoll: Epoll,
    /// Stream slots; `None` where a detached thread's streams were.
    streams: Vec<Option<Stream>>,
    /// Stream slots of each attached thread.
    by_key: HashMap<VcpuKey, Vec<usize>>,
    tids: HashMap<u32, VcpuKey>,
    timers: HashMap<u64, VcpuKey>,
    ids: Ids,
    lost: u64,
    counts: TraceCounts,
    ready: Vec<EpollEvent>,
    /// The vCPU timers known when the expiry filter was last set (then rebuild it).
    filtered_timers: usize,
    /// Expiry and `sched_waking` streams opened without a wake-up per record (every vCPU
    /// quiet).
    lazy: bool,
    /// Events read while switching modes, handed out at the next drain.
    stash: Vec<Event>,
}

/// While every vCPU is quiet, the expiry and `sched_waking` streams are read this often (and
/// when a ring is three quarters full).
const LAZY_POLL_NS: u64 = 100_000_000;

/// Tracepoint ids, offsets and the filter, read once.
#[derive(Default)]
struct Ids {
    expire: u64,
    start: u64,
    wakeup: u64,
    accept_irq: u64,
    waking: u64,
    /// Offset of `sched_waking`'s `pid` (the thread woken).
    waking_pid_off: usize,
    filter: String,
    /// The expiry streams' base filter: `filter`, without idle CPUs when `skip_idle`.
    expire_filter: String,
    hrtimer_off_expire: usize,
    hrtimer_off_start: usize,
}

/// Records seen per tracepoint, and expiries that matched no known vCPU timer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceCounts {
    /// `hrtimer_expire_entry` records (after the kernel-side filter).
    pub expire: u64,
    /// `hrtimer_start` records on vCPU threads.
    pub start: u64,
    /// Expiries of timers not (yet) mapped to a vCPU.
    pub unmapped: u64,
    /// `kvm_vcpu_wakeup` records.
    pub wakeup: u64,
    /// `kvm_apic_accept_irq` records.
    pub accept_irq: u64,
    /// `sched_waking` records of vCPU threads.
    pub waking: u64,
    /// Times the kernel throttled a stream (samples dropped until the next tick).
    pub throttled: u64,
    /// Times the refined expiry filter could not be set.
    pub filter_errors: u64,
}

/// Mounts tracefs if it is not there yet.
pub fn ensure_tracefs() -> Result<(), TraceError> {
    if Path::new(TRACEFS).join("events").is_dir() {
        return Ok(());
    }
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let (src, dst, fs) = (c("nodev"), c(TRACEFS), c("tracefs"));
    // SAFETY: valid C strings; no mount data.
    let r = unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), fs.as_ptr(), 0, std::ptr::null()) };
    if r != 0 {
        return Err(TraceError::Mount(io::Error::last_os_error()));
    }
    Ok(())
}

fn tracepoint_id(name: &str) -> Result<u64, TraceError> {
    let path = Path::new(TRACEFS).join("events").join(name).join("id");
    let s = std::fs::read_to_string(&path).map_err(|e| TraceError::NoTracepoint(name.into(), e))?;
    s.trim()
        .parse()
        .map_err(|_| TraceError::Format(name.into(), "id"))
}

/// Byte offset of `field` in the raw record of tracepoint `name`, from its format file.
fn field_offset(name: &str, field: &'static str) -> Result<usize, TraceError> {
    let path = Path::new(TRACEFS).join("events").join(name).join("format");
    let fmt =
        std::fs::read_to_string(&path).map_err(|e| TraceError::NoTracepoint(name.into(), e))?;
    parse_field_offset(&fmt, field).ok_or(TraceError::Format(name.into(), field))
}

/// Finds `field:<type> <field>;\toffset:<n>;` in a tracepoint format description.
pub fn parse_field_offset(format: &str, field: &str) -> Option<usize> {
    format.lines().find_map(|l| {
        let decl = l.trim().strip_prefix("field:")?;
        let (decl, rest) = decl.split_once(';')?;
        let name = decl.rsplit([' ', '*']).next()?;
        if name != field {
            return None;
        }
        rest.split(';')
            .find_map(|p| p.trim().strip_prefix("offset:"))
            .and_then(|n| n.parse().ok())
    })
}

/// Address of kernel symbol `sym` from `/proc/kallsyms` text.
pub fn parse_kallsyms(text: &str, sym: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        let addr = it.next()?;
        let _ty = it.next()?;
        (it.next()? == sym)
            .then(|| u64::from_str_radix(addr, 16).ok())
            .flatten()
            .filter(|&a| a != 0)
    })
}

fn open(
    name: &str,
    id: u64,
    pid: Option<i32>,
    cpu: Option<usize>,
    filter: Option<&str>,
    wake: bool,
) -> Result<Sampler, TraceError> {
    let mut b = Builder::new(Tracepoint::with_id(id));
    b.sample_period(1)
        .sample(SampleFlag::TID | SampleFlag::TIME | SampleFlag::RAW)
        .clockid(Clock::MONOTONIC)
        .include_kernel()
        .enabled(false);
    if wake {
        b.wakeup_events(1);
    } else {
        // Read whenever the engine wakes anyway; wake it only before the ring fills.
        b.wakeup_watermark(RING_PAGES * 4096 * 3 / 4);
    }
    match pid {
        Some(p) => b.observe_pid(p),
        None => b.any_pid(),
    };
    match cpu {
        Some(c) => b.one_cpu(c),
        None => b.any_cpu(),
    };
    let what = format!(
        "{name} ({})",
        pid.map_or_else(
            || format!("cpu {}", cpu.unwrap_or(0)),
            |p| format!("tid {p}")
        )
    );
    let mut counter = b.build().map_err(|e| TraceError::Open(what.clone(), e))?;
    if let Some(f) = filter {
        set_filter(counter.as_raw_fd(), f).map_err(|e| TraceError::Filter(what.clone(), e))?;
    }
    counter
        .enable()
        .map_err(|e| TraceError::Open(what.clone(), e))?;
    counter
        .sampled(RING_PAGES * 4096)
        .map_err(|e| TraceError::Open(what, e))
}

/// Sets the tracepoint filter of perf event `fd` (once: the kernel refuses to replace one).
fn set_filter(fd: RawFd, filter: &str) -> io::Result<()> {
    let c = std::ffi::CString::new(filter).map_err(io::Error::other)?;
    // SAFETY: PERF_EVENT_IOC_SET_FILTER takes a NUL-terminated string, which `c` is and which
    // outlives the call; `fd` is a perf event fd the caller owns.
    let r = unsafe { perf_event_open_sys::ioctls::SET_FILTER(fd, c.as_ptr().cast_mut()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The `sched_waking` filter on threads `tids`, and how many of them it names (as many as
/// fit in the page the kernel takes).
pub fn waking_filter(tids: &[u32]) -> (String, usize) {
    const MAX: usize = 4000;
    let mut f = String::new();
    let mut n = 0;
    for tid in tids {
        let clause = if f.is_empty() {
            format!("pid == {tid}")
        } else {
            format!(" || pid == {tid}")
        };
        if f.len() + clause.len() > MAX {
            break;
        }
        f += &clause;
        n += 1;
    }
    (f, n)
}

/// The expiry filter: `base` (the LAPIC timer callback), minus the expiries of each known
/// vCPU timer that fire while that vCPU's own thread is the one running (`common_pid`): KVM
/// delivers those at the vCPU's next entry anyway, and dropping them in the kernel spares
/// the engine a wake-up each. Clauses that would make the filter longer than the kernel
/// takes (one page) are left out (those expiries are just not filtered).
pub fn expiry_filter(base: &str, running: &[(u64, i32)]) -> String {
    const MAX: usize = 4000;
    let mut f = base.to_string();
    for (timer, tid) in running {
        let clause = format!(" && (hrtimer != 0x{timer:x} || common_pid != {tid})");
        if f.len() + clause.len() > MAX {
            break;
        }
        f += &clause;
    }
    f
}

/// The CPUs in a kernel CPU list (`/sys/devices/system/cpu/online`: `0-3,6,8-9`); `None` when
/// it does not parse.
pub fn parse_cpu_list(text: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let (a, b): (usize, usize) = match part.split_once('-') {
            Some((a, b)) => (a.parse().ok()?, b.parse().ok()?),
            None => {
                let a = part.parse().ok()?;
                (a, a)
            }
        };
        if b < a || b - a > 65_536 {
            return None;
        }
        cpus.extend(a..=b);
    }
    (!cpus.is_empty()).then_some(cpus)
}

/// The online CPUs: a CPU-wide stream cannot be opened on an offline one (a host with
/// hot-pluggable CPUs configures more than it runs). All configured ones if the list is
/// unreadable.
fn online_cpus() -> Vec<usize> {
    std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|t| parse_cpu_list(&t))
        .unwrap_or_else(|| {
            // SAFETY: sysconf has no memory effects.
            let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
            (0..n.max(1) as usize).collect()
        })
}

impl TraceSource {
    /// Opens the host-wide streams of `cfg` (no thread attached yet).
    pub fn new(cfg: TraceConfig) -> Result<TraceSource, TraceError> {
        ensure_tracefs()?;
        let epoll = Epoll::new().map_err(|e| TraceError::Open("epoll".into(), e))?;
        let mut src = TraceSource {
            cfg,
            epoll,
            streams: Vec::new(),
            by_key: HashMap::new(),
            tids: HashMap::new(),
            timers: HashMap::new(),
            ids: Ids::default(),
            lost: 0,
            counts: TraceCounts::default(),
            ready: vec![EpollEvent::default(); 16],
            filtered_timers: 0,
            lazy: false,
            stash: Vec::new(),
        };
        if cfg.timer_expiry {
            let kallsyms = std::fs::read_to_string("/proc/kallsyms").unwrap_or_default();
            let func = parse_kallsyms(&kallsyms, "apic_timer_fn").ok_or(TraceError::NoSymbol)?;
            src.ids.filter = format!("function == 0x{func:x}");
            src.ids.expire_filter = if cfg.skip_idle {
                format!("{} && common_pid != 0", src.ids.filter)
            } else {
                src.ids.filter.clone()
            };
            src.ids.hrtimer_off_expire = field_offset(EXPIRE, "hrtimer")?;
            src.ids.hrtimer_off_start = field_offset(START, "hrtimer")?;
            src.ids.start = tracepoint_id(START)?;
            src.ids.expire = tracepoint_id(EXPIRE)?;
            for cpu in online_cpus() {
                let sampler = open(
                    EXPIRE,
                    src.ids.expire,
                    None,
                    Some(cpu),
                    Some(&src.ids.expire_filter),
                    true,
                )?;
                src.add_stream(sampler, Kind::Expire)?;
            }
        }
        if cfg.wakeup {
            src.ids.wakeup = tracepoint_id(WAKEUP)?;
        }
        if cfg.accept_irq {
            src.ids.accept_irq = tracepoint_id(ACCEPT_IRQ)?;
        }
        if cfg.waking {
            src.ids.waking = tracepoint_id(WAKING)?;
            src.ids.waking_pid_off = field_offset(WAKING, "pid")?;
        }
        Ok(src)
    }

    /// Opens the streams of `cfg` for the vCPU threads `tids` (vCPU `i` = `tids[i]`, VM 0).
    pub fn open(tids: &[i32], cfg: TraceConfig) -> Result<TraceSource, TraceError> {
        let mut src = Self::new(cfg)?;
        for (i, &tid) in tids.iter().enumerate() {
            src.attach_thread(VcpuKey::new(0, i as u32), tid)?;
        }
        Ok(src)
    }

    fn add_stream(&mut self, sampler: Sampler, kind: Kind) -> Result<usize, TraceError> {
        let slot = self
            .streams
            .iter()
            .position(Option::is_none)
            .unwrap_or(self.streams.len());
        self.epoll
            .ctl(
                ControlOperation::Add,
                sampler.as_raw_fd(),
                EpollEvent::new(EventSet::IN, slot as u64),
            )
            .map_err(|e| TraceError::Open("epoll".into(), e))?;
        let stream = Some(Stream { sampler, kind });
        if slot == self.streams.len() {
            self.streams.push(stream);
        } else {
            self.streams[slot] = stream;
        }
        Ok(slot)
    }

    /// Opens the per-thread streams of vCPU `key` on thread `tid`.
    pub fn attach_thread(&mut self, key: VcpuKey, tid: i32) -> Result<(), TraceError> {
        let mut opened = Vec::new();
        let result = (|| {
            let ids = &self.ids;
            let mut todo = Vec::new();
            if self.cfg.timer_expiry {
                todo.push((START, ids.start, Some(ids.filter.clone()), Kind::Start));
            }
            if self.cfg.wakeup {
                todo.push((WAKEUP, ids.wakeup, None, Kind::Wakeup));
            }
            if self.cfg.accept_irq {
                todo.push((ACCEPT_IRQ, ids.accept_irq, None, Kind::AcceptIrq));
            }
            for (name, id, filter, kind) in todo {
                // A timer being armed says nothing urgent: it only teaches which timer is whose.
                let wake = kind != Kind::Start;
                let sampler = open(name, id, Some(tid), None, filter.as_deref(), wake)?;
                opened.push(self.add_stream(sampler, kind)?);
            }
            Ok(())
        })();
        if let Err(e) = result {
            for slot in opened {
                self.close_stream(slot);
            }
            return Err(e);
        }
        self.tids.insert(tid as u32, key);
        self.by_key.insert(key, opened);
        if let Err(e) = self.reopen_waking() {
            self.detach_thread(key);
            return Err(e);
        }
        Ok(())
    }

    /// Reopens the `sched_waking` streams (one per CPU) with a filter on the attached threads'
    /// ids; none while no thread is attached. Threads beyond what one filter holds (a page:
    /// about 250) get no wake-up events, counted in `filter_errors`.
    fn reopen_waking(&mut self) -> Result<(), TraceError> {
        if !self.cfg.waking {
            return Ok(());
        }
        // What is pending is read before its ring closes, and handed out at the next drain.
        let mut pending = std::mem::take(&mut self.stash);
        let _ = self.drain_events(&mut pending);
        self.stash = pending;
        let mut tids: Vec<u32> = self.tids.keys().copied().collect();
        tids.sort_unstable();
        let (filter, named) = waking_filter(&tids);
        if named < tids.len() {
            self.counts.filter_errors += 1;
        }
        // On failure the streams in force stay (they miss the newest threads). While every
        // vCPU is quiet (lazy) there are none: a wake-up could start no boost then, and the
        // streams cost every wake-up on the host a filtered sample (measured 2026-12-04, a
        // Linux guest under QEMU TCG on the idle host: cyclictest's average 1.15x with the
        // daemon attached host-only, which boosted nothing, in 4 of 4 rounds).
        let (id, open) = (self.ids.waking, named > 0 && !self.lazy);
        self.replace_cpu_streams(Kind::Waking, open.then_some((WAKING, id, &filter, true)))
    }

    /// Replaces the per-CPU streams of `kind` with new ones opened on every CPU as `new` says
    /// (tracepoint, id, filter, wake per record), or with none. A perf event's filter cannot
    /// be replaced, hence new streams. If one fails to open, the streams in force stay, the
    /// failure is counted in `filter_errors` and returned.
    fn replace_cpu_streams(
        &mut self,
        kind: Kind,
        new: Option<(&str, u64, &str, bool)>,
    ) -> Result<(), TraceError> {
        let old: Vec<usize> = (0..self.streams.len())
            .filter(|&i| matches!(&self.streams[i], Some(s) if s.kind == kind))
            .collect();
        if let Some((name, id, filter, wake)) = new {
            let mut opened = Vec::new();
            for cpu in online_cpus() {
                match open(name, id, None, Some(cpu), Some(filter), wake)
                    .and_then(|s| self.add_stream(s, kind))
                {
                    Ok(slot) => opened.push(slot),
                    Err(e) => {
                        self.counts.filter_errors += 1;
                        for slot in opened {
                            self.close_stream(slot);
                        }
                        return Err(e);
                    }
                }
            }
        }
        for slot in old {
            self.close_stream(slot);
        }
        Ok(())
    }

    fn close_stream(&mut self, slot: usize) {
        if let Some(s) = self.streams.get_mut(slot).and_then(Option::take) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                s.sampler.as_raw_fd(),
                EpollEvent::default(),
            );
        }
    }

    /// Closes the per-thread streams of vCPU `key`.
    pub fn detach_thread(&mut self, key: VcpuKey) {
        for slot in self.by_key.remove(&key).unwrap_or_default() {
            self.close_stream(slot);
        }
        self.tids.retain(|_, k| *k != key);
        self.timers.retain(|_, k| *k != key);
        self.refilter();
        // On failure the old streams stay: they only name a thread no longer mapped.
        let _ = self.reopen_waking();
    }

    /// Reopens the expiry streams with a filter for the vCPU timers known now, when
    /// `cfg.skip_running` asks for it.
    fn refilter(&mut self) {
        if !self.cfg.timer_expiry
            || !self.cfg.skip_running
            || self.timers.len() == self.filtered_timers
        {
            return;
        }
        self.reopen_expiry();
    }

    /// Reopens the expiry streams with the filter for the vCPU timers known now and the
    /// wake-up mode in force; on failure the streams in force stay.
    fn reopen_expiry(&mut self) -> bool {
        // Not retried for the same timers when it fails (that would be at every drain).
        self.filtered_timers = self.timers.len();
        let tid_of: HashMap<VcpuKey, i32> =
            self.tids.iter().map(|(&t, &k)| (k, t as i32)).collect();
        let mut running: Vec<(u64, i32)> = self
            .timers
            .iter()
            .filter_map(|(&h, k)| Some((h, *tid_of.get(k)?)))
            .collect();
        running.sort_unstable();
        let f = if self.cfg.skip_running {
            expiry_filter(&self.ids.expire_filter, &running)
        } else {
            self.ids.expire_filter.clone()
        };
        // New expiry streams with the new filter, then the old ones closed (an expiry in
        // between may be seen twice: harmless). On failure the streams in force stay (they
        // only wake the engine more often). The old rings were drained just before (refilter
        // runs after a drain); a record that came in between is lost with them, which only
        // the lazy switch risks.
        let (id, wake) = (self.ids.expire, !self.lazy);
        self.replace_cpu_streams(Kind::Expire, Some((EXPIRE, id, &f, wake)))
            .is_ok()
    }

    /// Records lost by the kernel (ring full).
    pub fn lost(&self) -> u64 {
        self.lost
    }

    /// Records seen so far.
    pub fn counts(&self) -> TraceCounts {
        self.counts
    }

    /// Reads every pending record; hits that map to an attached vCPU go to `out` as events.
    /// Returns the earliest hit's time.
    pub fn drain_events(&mut self, out: &mut Vec<Event>) -> Option<u64> {
        // Every ring is looked at, not only those the inner epoll reports: a perf fd's
        // readiness is consumed by the poll that sees it, and the outer wait (through the
        // inner epoll) has already seen it. An empty ring costs one memory read.
        let _ = self.epoll.wait(0, &mut self.ready);
        let mut first: Option<u64> = None;
        let mut mapped = Vec::new();
        out.append(&mut self.stash);
        // Timer starts first, so that an expiry read in the same pass finds its vCPU.
        for pass in [true, false] {
            for s in self
                .streams
                .iter_mut()
                .flatten()
                .filter(|s| (s.kind == Kind::Start) == pass)
            {
                let (kind, tids, timers, counts, lost, ids) = (
                    s.kind,
                    &self.tids,
                    &mut self.timers,
                    &mut self.counts,
                    &mut self.lost,
                    &self.ids,
                );
                while let Some(rec) = s.sampler.next_record() {
                    let Ok(parsed) = rec.parse_record() else {
                        continue;
                    };
                    let sample = match parsed {
                        perf_event::data::Record::Sample(sample) => sample,
                        perf_event::data::Record::Lost(l) => {
                            *lost += l.lost;
                            continue;
                        }
                        perf_event::data::Record::Throttle(_) => {
                            counts.throttled += 1;
                            continue;
                        }
                        _ => continue,
                    };
                    let (Some(time_ns), Some(raw)) = (sample.time(), sample.raw()) else {
                        continue;
                    };
                    let hrtimer = |off: usize| -> Option<u64> {
                        let b = raw.get(off..off + 8)?;
                        Some(u64::from_ne_bytes(b.try_into().ok()?))
                    };
                    let by_tid = sample.tid().and_then(|t| tids.get(&t).copied());
                    let hit = match kind {
                        Kind::Start => {
                            counts.start += 1;
                            if let (Some(k), Some(t)) = (by_tid, hrtimer(ids.hrtimer_off_start)) {
                                if timers.insert(t, k).is_none() {
                                    mapped.push(k);
                                }
                            }
                            None
                        }
                        Kind::Expire => {
                            counts.expire += 1;
                            let key = hrtimer(ids.hrtimer_off_expire).and_then(|t| timers.get(&t));
                            if key.is_none() {
                                counts.unmapped += 1;
                            }
                            key.map(|&k| Event::new(k, VcpuEvent::Interrupt))
                        }
                        Kind::Wakeup => {
                            counts.wakeup += 1;
                            by_tid.map(|k| Event::new(k, VcpuEvent::Woken))
                        }
                        Kind::AcceptIrq => {
                            counts.accept_irq += 1;
                            by_tid.map(|k| Event::new(k, VcpuEvent::Interrupt))
                        }
                        Kind::Waking => {
                            // The woken thread is in the record, not the sample's tid (the
                            // waker's).
                            let woken = raw
                                .get(ids.waking_pid_off..ids.waking_pid_off + 4)
                                .and_then(|b| b.try_into().ok())
                                .map(u32::from_ne_bytes);
                            let key = woken.and_then(|t| tids.get(&t).copied());
                            if key.is_some() {
                                counts.waking += 1;
                            }
                            key.map(|k| Event::new(k, VcpuEvent::Woken))
                        }
                    };
                    if let Some(e) = hit {
                        out.push(e);
                        first = Some(first.map_or(time_ns, |f| f.min(time_ns)));
                    }
                }
            }
        }
        // A vCPU's LAPIC timer lives as long as the vCPU: once it is known, the thread's
        // `hrtimer_start` stream has taught all it can, and closing it spares that thread a
        // record per timer it arms and the engine the reading.
        for key in mapped {
            let Some(slots) = self.by_key.get_mut(&key) else {
                continue;
            };
            let starts: Vec<usize> = slots
                .iter()
                .copied()
                .filter(|&i| matches!(&self.streams[i], Some(s) if s.kind == Kind::Start))
                .collect();
            slots.retain(|i| !starts.contains(i));
            for slot in starts {
                self.close_stream(slot);
            }
        }
        self.refilter();
        first
    }
}

impl EventSource for TraceSource {
    fn name(&self) -> &str {
        "tracepoints"
    }
    fn fd(&self) -> Option<RawFd> {
        Some(self.epoll.as_raw_fd())
    }
    fn drain(&mut self, _now: Nanos, out: &mut Vec<Event>) -> Option<Nanos> {
        self.drain_events(out)
    }
    fn attach(&mut self, key: VcpuKey, tid: i32) -> Result<(), String> {
        self.attach_thread(key, tid)
            .map_err(|e| crate::error_chain(&e))
    }
    fn detach(&mut self, key: VcpuKey) {
        self.detach_thread(key);
    }
    fn poll_period(&self) -> Option<Nanos> {
        self.lazy.then_some(LAZY_POLL_NS)
    }
    fn set_lazy(&mut self, lazy: bool) {
        if lazy == self.lazy || !(self.cfg.timer_expiry || self.cfg.waking) {
            return;
        }
        // What is pending is read before its ring closes, and handed out at the next drain.
        let mut pending = std::mem::take(&mut self.stash);
        let _ = self.drain_events(&mut pending);
        self.stash = pending;
        self.lazy = lazy;
        let expiry = !self.cfg.timer_expiry || self.reopen_expiry();
        let waking = self.reopen_waking().is_ok();
        if !(expiry && waking) {
            // A kind that failed keeps its streams in the old mode: back to it for both
            // (on failure again, those streams stay too), so that the engine keeps reading
            // at the old pace and a stream left lazy is still read.
            self.lazy = !lazy;
            if expiry && self.cfg.timer_expiry {
                self.reopen_expiry();
            }
            if waking {
                let _ = self.reopen_waking();
            }
        }
    }
    fn lost(&self) -> u64 {
        self.lost + self.counts.throttled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORMAT: &str = "name: hrtimer_expire_entry
ID: 123
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:void * hrtimer;\toffset:8;\tsize:8;\tsigned:0;
\tfield:s64 now;\toffset:16;\tsize:8;\tsigned:1;
\tfield:void * function;\toffset:24;\tsize:8;\tsigned:0;
";

    #[test]
    fn format_offsets_parse() {
        assert_eq!(parse_field_offset(FORMAT, "hrtimer"), Some(8));
        assert_eq!(parse_field_offset(FORMAT, "function"), Some(24));
        assert_eq!(parse_field_offset(FORMAT, "now"), Some(16));
        assert_eq!(parse_field_offset(FORMAT, "expires"), None);
    }

    #[test]
    fn expiry_filter_drops_running_vcpus_within_a_page() {
        let base = "function == 0xffffffffc0a1b2c0";
        assert_eq!(expiry_filter(base, &[]), base);
        let f = expiry_filter(base, &[(0xffff_8880_0001_0000, 42), (0x10, 7)]);
        assert_eq!(
            f,
            "function == 0xffffffffc0a1b2c0 \
             && (hrtimer != 0xffff888000010000 || common_pid != 42) \
             && (hrtimer != 0x10 || common_pid != 7)"
        );
        let many: Vec<(u64, i32)> = (0..1000)
            .map(|i| (0xffff_8880_0000_0000 + i, 1000))
            .collect();
        let f = expiry_filter(base, &many);
        assert!(f.len() <= 4000 && f.len() > 3000, "{}", f.len());
    }

    #[test]
    fn cpu_lists_parse() {
        assert_eq!(parse_cpu_list("0-1\n"), Some(vec![0, 1]));
        assert_eq!(parse_cpu_list("0-2,5,7-8"), Some(vec![0, 1, 2, 5, 7, 8]));
        assert_eq!(parse_cpu_list("3"), Some(vec![3]));
        for bad in ["", "x", "2-1", "0-", "1,,a", "0-99999999"] {
            assert_eq!(parse_cpu_list(bad), None, "{bad:?}");
        }
        assert!(!online_cpus().is_empty());
    }

    #[test]
    fn waking_filter_names_what_fits() {
        assert_eq!(waking_filter(&[]), (String::new(), 0));
        assert_eq!(
            waking_filter(&[12, 345]),
            ("pid == 12 || pid == 345".to_string(), 2)
        );
        let many: Vec<u32> = (1_000_000..1_001_000).collect();
        let (f, n) = waking_filter(&many);
        assert!(f.len() <= 4000 && n > 200 && n < many.len(), "{n}");
        assert!(f.ends_with(&format!("pid == {}", many[n - 1])));
    }

    #[test]
    fn kallsyms_lookup() {
        let text = "ffffffff81000000 T _stext\nffffffffc0a1b2c0 t apic_timer_fn\t[kvm]\n0000000000000000 t hidden\n";
        assert_eq!(
            parse_kallsyms(text, "apic_timer_fn"),
            Some(0xffff_ffff_c0a1_b2c0)
        );
        assert_eq!(
            parse_kallsyms(text, "hidden"),
            None,
            "zeroed by kptr_restrict"
        );
        assert_eq!(parse_kallsyms(text, "nope"), None);
    }
}
