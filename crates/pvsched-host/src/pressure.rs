//! Does a vCPU wait for a CPU? A vCPU thread that, while unboosted, is runnable but not running
//! for a noticeable share of the time (its `run_delay` in `/proc/<tid>/schedstat`) competes
//! with other threads, and a boost can help it; one that never waits gains nothing from a
//! boost, which then only costs system calls. The runtime samples each vCPU thread once per
//! window and tells the policy when a vCPU is quiet (measured on the development machine:
//! busy vCPUs on an idle host wait 0–5 % of the time, next to one hog per CPU ~53 %).
//! Host-wide CPU pressure (`/proc/pressure/cpu`) was tried first and does not separate the
//! two: host threads waiting behind busy vCPUs keep it at ~20 % on an otherwise idle host.
//!
//! A vCPU can also wait only behind *other attached vCPUs*: two busy vCPUs sharing a CPU on
//! an otherwise idle host, or many VMs overcommitting the host. Boosting then only reorders
//! vCPUs that all ask for the same thing, at the price of the engine's wake-ups and system
//! calls; measured with 16 testbed VMs × 4 vCPUs (idle guests, 10 ms timer) attached to the
//! daemon, the guests' wake-up latency was worse with boosting (avg 1.2–2.6 ms vs 0.9–1.4 ms
//! without). [`OthersGate`] holds every vCPU quiet while the CPU time that neither attached
//! vCPUs nor the engine used stays below a fraction of one CPU: the busy time (from
//! `/proc/stat`) of the CPUs the vCPU threads may run on (their affinity), minus theirs
//! ([`CpuBusy`]). Counting only those CPUs matters when the vCPUs are confined to CPUs that
//! other work does not use: two busy vCPUs pinned to one CPU with CPU hogs on the other compete
//! only with each other, and boosting one of them only delays the other (measured 2026-12-04
//! with the threads pinned so, 500 µs: guest p99 2.9 ms with boosting vs 0.87 ms without,
//! docs/policy.md).

use crate::clock::mono_ns;
use pvsched_policy::Nanos;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::FileExt;

/// The quiet gate's settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuietGate {
    /// The host is quiet while tasks waited for a CPU less than this share of the time,
    /// in thousandths (`some` CPU pressure).
    pub threshold_permille: u32,
    /// Length of one sampling window, ns.
    pub window: Nanos,
    /// Windows in a row below the threshold before the host counts as quiet (contention is
    /// believed at once).
    pub quiet_after: u32,
    /// The host-wide gate: every vCPU counts as quiet while the attached vCPUs compete only
    /// with each other (`None`: per vCPU only).
    pub others: Option<OthersGate>,
}

impl Default for QuietGate {
    /// Quiet after 4 windows of 25 ms in which the vCPU, while unboosted, waited less than
    /// 20 % of the time; contended at the first window at or above; every vCPU quiet while
    /// the vCPUs compete only with each other ([`OthersGate::default`]).
    fn default() -> Self {
        QuietGate {
            threshold_permille: 200,
            window: 25_000_000,
            quiet_after: 4,
            others: Some(OthersGate::default()),
        }
    }
}

/// Reads the run time and the run delay (ns on a CPU, ns runnable but waiting) of
/// `/proc/<tid>/schedstat` (`<ran ns> <waited ns> <timeslices>`).
pub fn parse_schedstat(text: &str) -> Option<(u64, u64)> {
    let mut f = text.split_whitespace();
    let ran = f.next()?.parse().ok()?;
    let waited = f.next()?.parse().ok()?;
    Some((ran, waited))
}

/// Reads the run delay (ns runnable but waiting) of `/proc/<tid>/schedstat`.
pub fn parse_run_delay(text: &str) -> Option<u64> {
    parse_schedstat(text).map(|(_, d)| d)
}

/// The host-wide gate's settings (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OthersGate {
    /// Length of one window, ns (`/proc/stat` counts in 10 ms ticks: shorter windows would
    /// be mostly rounding).
    pub window: Nanos,
    /// The vCPUs count as competing only with each other after `close_after` windows in a
    /// row in which the others used less than this, in thousandths of one CPU.
    pub close_below_millicpu: u64,
    /// Windows in a row below `close_below_millicpu`.
    pub close_after: u32,
    /// One window in which the others used this much (thousandths of one CPU) reopens the
    /// gate.
    pub open_from_millicpu: u64,
    /// The gate starts closed (nothing shown to compete with the vCPUs yet) and decides
    /// after this first, shorter window: open from `open_from_millicpu`, else closed.
    pub first_window: Nanos,
}

impl Default for OthersGate {
    /// Closed at the start until a first window of 100 ms shows the others using 0.45 CPU
    /// or more; after that closed after 2 windows of 250 ms in which the others used less
    /// than 0.3 CPU, open again at the first window with 0.45 CPU or more. (Starting open
    /// boosted on an idle host for the first half second: the testbed's 5 s runs showed a
    /// guest p99 2–4× vanilla's from that start alone, 1.05× over 20 s.) `/proc/stat`
    /// counts in ticks of 10 ms per CPU: over the first window that is ±0.2 CPU on 2 CPUs. Measured on the development machine
    /// (2 CPUs, `pvsched vm` with 2 busy vCPUs): others 0.02–0.08 CPU on an idle host, 0.11
    /// (at most 0.24) with 16 VMs × 4 vCPUs, 1.0 next to 2 CPU hogs, 0.47–0.9 (median 0.71)
    /// next to them with every vCPU boosted on request.
    fn default() -> Self {
        OthersGate {
            window: 250_000_000,
            close_below_millicpu: 300,
            close_after: 2,
            open_from_millicpu: 450,
            first_window: 100_000_000,
        }
    }
}

/// The host-wide verdict over successive windows (pure): `true` while the attached vCPUs
/// compete only with each other.
#[derive(Clone, Copy, Debug)]
pub struct OthersVerdict {
    gate: OthersGate,
    last: Option<(Nanos, u64, u64)>,
    below: u32,
    closed: bool,
    decided: bool,
}

impl OthersVerdict {
    /// Closed (no boosts) until the first window shows the vCPUs competing with others.
    pub fn new(gate: OthersGate) -> Self {
        OthersVerdict {
            gate,
            last: None,
            below: 0,
            closed: true,
            decided: false,
        }
    }

    /// Forgets the last sample: the next one starts a new window (the verdict stays).
    pub fn restart(&mut self) {
        self.last = None;
    }

    /// The current sampling window, ns: the first, shorter one until the first verdict.
    pub fn window(&self) -> Nanos {
        if self.decided {
            self.gate.window
        } else {
            self.gate.first_window
        }
    }

    /// True while the vCPUs compete only with each other.
    pub fn closed(&self) -> bool {
        self.closed
    }

    /// Folds a sample in: at `now`, the machine's busy time `busy_ns` and the run time of
    /// the attached vCPUs plus the engine `ours_ns` (both cumulative). Returns the verdict
    /// when it changed. A sample less than half a window after the previous one is ignored.
    pub fn sample(&mut self, now: Nanos, busy_ns: u64, ours_ns: u64) -> Option<bool> {
        let Some((t0, b0, o0)) = self.last else {
            self.last = Some((now, busy_ns, ours_ns));
            return None;
        };
        let dt = now.saturating_sub(t0);
        if dt < self.window() / 2 {
            return None;
        }
        self.last = Some((now, busy_ns, ours_ns));
        let others = busy_ns
            .saturating_sub(b0)
            .saturating_sub(ours_ns.saturating_sub(o0));
        let millicpu = others.saturating_mul(1000) / dt.max(1);
        let before = self.closed;
        if !self.decided {
            self.decided = true;
            self.closed = millicpu < self.gate.open_from_millicpu;
            if self.closed {
                self.below = self.gate.close_after;
            }
        } else if millicpu >= self.gate.open_from_millicpu {
            self.below = 0;
            self.closed = false;
        } else if millicpu < self.gate.close_below_millicpu {
            self.below = self.below.saturating_add(1);
            if self.below >= self.gate.close_after {
                self.closed = true;
            }
        } else {
            self.below = 0;
        }
        (self.closed != before).then_some(self.closed)
    }
}

/// The run time (ns on a CPU, from each thread's `/proc/<pid>/task/<tid>/schedstat`, exact,
/// not sampled at ticks like `/proc/<pid>/stat`) of process `pid`'s live threads, by thread;
/// `None` once it is gone.
pub fn process_threads_ns(pid: i32) -> Option<Vec<(i32, u64)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let Some(tid) = e.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(e.path().join("schedstat")) else {
            continue;
        };
        if let Some((ran, _)) = parse_schedstat(&text) {
            out.push((tid, ran));
        }
    }
    Some(out)
}

/// A process's CPU time as one count that only grows: each reading adds what every thread
/// seen before ran since, and the whole run time of a thread not seen before (it started
/// since, or was just found); a thread that exited adds nothing more.
#[derive(Debug, Default)]
pub struct ProcessCpu {
    last: BTreeMap<i32, u64>,
    acc: u64,
}

impl ProcessCpu {
    /// Folds in a reading of the threads' run times (`threads`); returns the count so far.
    pub fn fold(&mut self, threads: &[(i32, u64)]) -> u64 {
        let mut next = BTreeMap::new();
        for &(tid, ran) in threads {
            let prev = self.last.get(&tid).copied().unwrap_or(0);
            self.acc = self.acc.saturating_add(ran.saturating_sub(prev));
            next.insert(tid, ran);
        }
        self.last = next;
        self.acc
    }
}

fn clock_ticks() -> Option<u64> {
    // SAFETY: sysconf has no memory effects.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).ok()
}

/// Each CPU's time not busy in ns, from the `cpuN` lines of `/proc/stat` (`cpuN user nice
/// system idle iowait irq softirq steal ...`, in `ticks_per_s` units), in the order listed:
/// idle, iowait and steal (time the hypervisor below gave away). Busy time is the rest of the
/// wall time ([`CpuBusy`]), not the sum of the other fields: those are sampled at ticks, and on
/// the development machine (nested, tickless) they summed to anything from 0.1 to 1.7 CPU over
/// the same 4 s of a nearly idle host, while the idle time (measured when the CPU leaves idle)
/// stayed consistent.
pub fn parse_proc_stat_cpus(text: &str, ticks_per_s: u64) -> Option<Vec<(usize, u64)>> {
    if ticks_per_s == 0 {
        return None;
    }
    let mut out = Vec::new();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let Some(cpu) = f.next().and_then(|n| n.strip_prefix("cpu")) else {
            continue;
        };
        let Ok(cpu) = cpu.parse::<usize>() else {
            continue;
        };
        let v: Vec<u64> = f.take(8).map(|x| x.parse().ok()).collect::<Option<_>>()?;
        if v.len() < 8 {
            return None;
        }
        let idle = v[3] + v[4] + v[7];
        out.push((cpu, idle.saturating_mul(1_000_000_000 / ticks_per_s)));
    }
    (!out.is_empty()).then_some(out)
}

/// Reads each CPU's time not busy (ns) from `/proc/stat` ([`parse_proc_stat_cpus`]).
pub fn cpu_idle_ns() -> Option<Vec<(usize, u64)>> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    parse_proc_stat_cpus(&text, clock_ticks()?)
}

/// The busy time of the CPUs the vCPU threads may run on, as one cumulative count for
/// [`OthersVerdict::sample`]: each sample adds, for every CPU of the current set, the wall
/// time since the previous sample less the time it was not busy (a CPU not seen before adds
/// nothing yet).
#[derive(Debug, Default)]
pub struct CpuBusy {
    last: BTreeMap<usize, u64>,
    last_at: Option<Nanos>,
    acc: u64,
}

impl CpuBusy {
    /// Folds in a reading at `now` of every CPU's time not busy (`per_cpu`), counting the
    /// CPUs in `allowed` (all CPUs when empty); returns the count so far.
    pub fn fold(&mut self, now: Nanos, per_cpu: &[(usize, u64)], allowed: &BTreeSet<usize>) -> u64 {
        let dt = self.last_at.map_or(0, |t| now.saturating_sub(t));
        self.last_at = Some(now);
        for &(cpu, idle) in per_cpu {
            if let Some(prev) = self.last.insert(cpu, idle) {
                if allowed.is_empty() || allowed.contains(&cpu) {
                    self.acc = self
                        .acc
                        .saturating_add(dt.saturating_sub(idle.saturating_sub(prev)));
                }
            }
        }
        self.acc
    }
}

/// The verdict over successive windows (pure).
#[derive(Clone, Copy, Debug)]
pub struct Verdict {
    gate: QuietGate,
    below: u32,
    quiet: bool,
}

impl Verdict {
    /// Not quiet until shown otherwise.
    pub fn new(gate: QuietGate) -> Self {
        Verdict {
            gate,
            below: 0,
            quiet: false,
        }
    }

    /// Folds one window's pressure (thousandths) in; returns the verdict.
    pub fn window(&mut self, permille: u64) -> bool {
        self.window_at(permille, u64::from(self.gate.threshold_permille))
    }

    /// The same against `threshold` (thousandths) instead of the gate's.
    pub fn window_at(&mut self, permille: u64, threshold: u64) -> bool {
        if permille >= threshold {
            self.below = 0;
            self.quiet = false;
        } else {
            self.below = self.below.saturating_add(1);
            if self.below >= self.gate.quiet_after {
                self.quiet = true;
            }
        }
        self.quiet
    }
}

/// A window in which the vCPU waited at least this share of its unboosted time (thousandths)
/// finds it starved ([`VcpuSampler::starved`]): next to one CPU hog at nice 0, a vCPU at nice 5
/// still runs ~25 % of the time; queued behind a real-time thread it runs not at all.
const STARVED_PERMILLE: u64 = 900;

/// A window in which the vCPU thread was runnable (running or waiting for a CPU) less than this
/// share of the time (thousandths) finds it sleeping ([`VcpuSampler::sleeps`]).
const RUNNABLE_PERMILLE: u64 = 900;

/// The gate's threshold for a vCPU thread that sleeps part of the window, against its
/// runnable time ([`wait_permille`]), thousandths: above the share that waking up costs on an
/// idle host. Measured 2026-12-04 (a Linux guest under QEMU TCG, cyclictest on both CPUs,
/// 5 s from `/proc/<tid>/schedstat`): the vCPU threads waited 21–23 % of their runnable time
/// on the idle host (11–13 µs per switch-in, ~1 700–2 000 a second) and 42–43 % next to
/// `stress-ng --cpu 2` (23–26 µs).
const SLEEPER_THRESHOLD_PERMILLE: u64 = 330;

/// True when a thread that ran `ran` ns and waited `waited` ns in `elapsed` ns slept for part
/// of it: runnable less than 90 % of the time.
pub fn sleeps_in(elapsed: Nanos, ran: u64, waited: u64) -> bool {
    ran.saturating_add(waited).saturating_mul(1000) < elapsed.saturating_mul(RUNNABLE_PERMILLE)
}

/// The share (thousandths, at most 1000) of the time a vCPU thread wanted a CPU while
/// unboosted that it spent waiting for one, in a window of `elapsed` ns in which it ran `ran`
/// ns, waited `waited` ns and was boosted `boosted` ns; `None` when too little of the window
/// was unboosted (a quarter) to tell. A thread that sleeps part of the window is measured
/// against the time it was runnable (when that is at least a fortieth of the window; a thread
/// that hardly ever wants a CPU against the whole window), not the whole window: a vCPU
/// that wakes a thousand times a second and waits behind a CPU hog at each wake-up waits a
/// large share of the little time it wants, and a small share of the window (measured
/// 2026-12-04 on a Linux guest under QEMU TCG next to `stress-ng --cpu 2`: its vCPU threads
/// were found quiet most of the time by the whole-window share, while the guest's wake-ups
/// took 1.3–1.6× those of the idle host). A busy thread, runnable all the time, gets the same
/// share either way.
pub fn wait_permille(elapsed: Nanos, ran: u64, waited: u64, boosted: u64) -> Option<u64> {
    let unboosted = elapsed.saturating_sub(boosted);
    let wanted = ran.saturating_add(waited).saturating_sub(boosted);
    if unboosted < elapsed / 4 {
        return None;
    }
    let base = if wanted >= elapsed / 40 {
        unboosted.min(wanted)
    } else {
        unboosted
    };
    Some((waited.saturating_mul(1000) / base.max(1)).min(1000))
}

/// Samples one vCPU thread's run delay once per window.
#[derive(Debug)]
pub struct VcpuSampler {
    verdict: Verdict,
    window: Nanos,
    tid: i32,
    file: File,
    /// Time, run delay, boosted time, run time and paused time at the last sample.
    last: Option<(Nanos, u64, u64, u64, u64)>,
    /// When the next sample is due.
    pub next: Nanos,
    starved: bool,
    sleeps: bool,
}

impl VcpuSampler {
    /// Opens thread `tid`'s schedstat; `None` when the kernel has no schedstats.
    pub fn open(gate: QuietGate, tid: i32) -> Option<VcpuSampler> {
        let file = File::open(format!("/proc/{tid}/schedstat")).ok()?;
        let mut buf = [0u8; 128];
        let n = file.read_at(&mut buf, 0).ok()?;
        parse_run_delay(std::str::from_utf8(&buf[..n]).ok()?)?;
        Some(VcpuSampler {
            verdict: Verdict::new(gate),
            window: gate.window,
            tid,
            file,
            last: None,
            next: mono_ns(),
            starved: false,
            sleeps: false,
        })
    }

    /// The thread sampled.
    pub fn tid(&self) -> i32 {
        self.tid
    }

    /// The last window found the vCPU waiting for a CPU at least 90 % of its unboosted time.
    pub fn starved(&self) -> bool {
        self.starved
    }

    /// The last window found the vCPU thread sleeping part of the time: runnable (running or
    /// waiting) less than 90 % of it.
    pub fn sleeps(&self) -> bool {
        self.sleeps
    }

    /// The verdict in force: `true` while the vCPU does not wait for a CPU.
    pub fn quiet(&self) -> bool {
        self.verdict.quiet
    }

    /// The thread's run time so far, ns (a fresh read).
    pub fn ran_ns(&self) -> Option<u64> {
        let mut buf = [0u8; 128];
        let n = self.file.read_at(&mut buf, 0).ok()?;
        parse_schedstat(std::str::from_utf8(&buf[..n]).ok()?).map(|(r, _)| r)
    }

    /// Takes a sample at `now` if one is due, given the vCPU's boosted time so far (a boosted
    /// vCPU does not wait: only its unboosted time counts) and the time its VMM held it off
    /// the CPU so far (a repayment pause: left out of the window, so that neither the sleeper
    /// verdict nor the contention verdict counts it); returns the new verdict when it
    /// changed. A window spent almost all boosted tells nothing and keeps the verdict.
    pub fn poll(&mut self, now: Nanos, boosted_ns: u64, paused_ns: u64) -> Option<bool> {
        if now < self.next {
            return None;
        }
        self.next = now.saturating_add(self.window);
        let mut buf = [0u8; 128];
        let n = self.file.read_at(&mut buf, 0).ok()?;
        let (ran, delay) = parse_schedstat(std::str::from_utf8(&buf[..n]).ok()?)?;
        let before = self.verdict.quiet;
        if let Some((t0, d0, b0, r0, p0)) = self.last {
            let elapsed = now
                .saturating_sub(t0)
                .saturating_sub(paused_ns.saturating_sub(p0));
            if elapsed >= self.window / 4 {
                self.sleeps = sleeps_in(elapsed, ran.saturating_sub(r0), delay.saturating_sub(d0));
            }
            let boosted = boosted_ns.saturating_sub(b0);
            let unboosted = elapsed.saturating_sub(boosted);
            let waited = delay.saturating_sub(d0);
            self.starved = unboosted >= self.window / 4
                && waited.saturating_mul(1000) / unboosted.max(1) >= STARVED_PERMILLE;
            if elapsed >= self.window / 4 {
                if let Some(permille) =
                    wait_permille(elapsed, ran.saturating_sub(r0), waited, boosted)
                {
                    let gate = u64::from(self.verdict.gate.threshold_permille);
                    let threshold = if self.sleeps {
                        gate.max(SLEEPER_THRESHOLD_PERMILLE)
                    } else {
                        gate
                    };
                    self.verdict.window_at(permille, threshold);
                }
            }
        }
        self.last = Some((now, delay, boosted_ns, ran, paused_ns));
        (self.verdict.quiet != before).then_some(self.verdict.quiet)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn per_cpu_busy_time_is_read_and_summed_over_the_vcpus_cpus() {
        // `i0` / `i1`: the CPUs' idle ticks (CPU 0 also has 5 of iowait and 3 of steal).
        let stat = |i0: u64, i1: u64| {
            format!(
                "cpu  30 0 0 {} 5 0 0 3 0 0\ncpu0 10 0 0 {i0} 5 0 0 3 0 0\ncpu1 0 20 0 {i1} 0 0 0 0 0 0\nintr 1 2\n",
                i0 + i1
            )
        };
        let text = stat(400, 500);
        assert_eq!(
            parse_proc_stat_cpus(&text, 100),
            Some(vec![(0, 4_080_000_000), (1, 5_000_000_000)]),
            "not busy = idle, iowait and steal; 10 ms ticks"
        );
        assert_eq!(parse_proc_stat_cpus("cpu  1 2 3 4 5 6 7 8\n", 100), None);
        assert_eq!(parse_proc_stat_cpus(&text, 0), None);
        assert_eq!(parse_proc_stat_cpus("cpu0 1 2\n", 100), None);

        const MS: u64 = 1_000_000;
        let mut b = CpuBusy::default();
        let cpus = |t: &str| parse_proc_stat_cpus(t, 100).unwrap();
        let only0: BTreeSet<usize> = [0].into();
        // The first reading adds nothing.
        assert_eq!(b.fold(1000 * MS, &cpus(&stat(400, 500)), &only0), 0);
        // 100 ms later CPU 0 was idle 50 of them (busy 50), CPU 1 all 100: only CPU 0
        // counts.
        assert_eq!(b.fold(1100 * MS, &cpus(&stat(405, 510)), &only0), 50 * MS);
        // The vCPUs moved to CPU 1: busy 100 - 20 ms of the next 100.
        assert_eq!(
            b.fold(1200 * MS, &cpus(&stat(405, 512)), &[1].into()),
            130 * MS
        );
        // No CPU known: all of them (CPU 0 busy 100, CPU 1 idle all 100).
        assert_eq!(
            b.fold(1300 * MS, &cpus(&stat(405, 522)), &BTreeSet::new()),
            230 * MS
        );
    }

    #[test]
    fn a_thread_runnable_less_than_nine_tenths_of_a_window_sleeps() {
        let ms = 1_000_000;
        // A busy vCPU next to a hog: half the time on a CPU, half waiting.
        assert!(!sleeps_in(25 * ms, 12 * ms, 13 * ms));
        // A halting one: 40 % on a CPU, 10 % waiting, the rest asleep.
        assert!(sleeps_in(25 * ms, 10 * ms, 5 * ms / 2));
        assert!(
            !sleeps_in(25 * ms, 20 * ms, 5 * ms / 2),
            "exactly 90 % runnable"
        );
        assert!(sleeps_in(25 * ms, 0, 0));
        assert!(!sleeps_in(0, 0, 0), "an empty window tells nothing");
    }

    #[test]
    fn parses_schedstat() {
        assert_eq!(parse_run_delay("2157018 4481 9\n"), Some(4481));
        assert_eq!(parse_run_delay("1"), None);
        assert_eq!(parse_run_delay("1 x 2"), None);
    }

    #[test]
    fn a_process_cpu_time_sums_its_threads_and_only_grows() {
        let mut p = ProcessCpu::default();
        assert_eq!(p.fold(&[(1, 100), (2, 50)]), 150);
        // Thread 2 ran 30 more, thread 3 started and ran 20.
        assert_eq!(p.fold(&[(1, 100), (2, 80), (3, 20)]), 200);
        // Thread 2 exited: nothing is taken back.
        assert_eq!(p.fold(&[(1, 110), (3, 20)]), 210);

        // SAFETY: getpid has no arguments and cannot fail.
        let me = unsafe { libc::getpid() };
        let mut p = ProcessCpu::default();
        let before = p.fold(&process_threads_ns(me).expect("this process's own"));
        let (spun_tx, spun_rx) = std::sync::mpsc::channel();
        let (end_tx, end_rx) = std::sync::mpsc::channel::<()>();
        // Another thread spins 30 ms of CPU, then stays alive until read.
        let t = std::thread::spawn(move || {
            let t0 = crate::clock::thread_cpu_ns();
            while crate::clock::thread_cpu_ns() - t0 < 30_000_000 {}
            spun_tx.send(()).unwrap();
            let _ = end_rx.recv();
        });
        spun_rx.recv().unwrap();
        let after = p.fold(&process_threads_ns(me).unwrap());
        end_tx.send(()).unwrap();
        t.join().unwrap();
        assert!(after - before >= 30_000_000, "{before} -> {after}");
        assert_eq!(process_threads_ns(-1), None);
    }

    #[test]
    fn parses_proc_stat() {
        let text = "cpu  100 5 50 1000 20 3 2 7 0 0\n\
                    cpu0 50 2 25 500 10 1 1 3 0 0\n\
                    cpu1 50 3 25 500 10 2 1 4 0 0\n\
                    intr 123\n";
        // not busy = idle + iowait + steal = 513 and 514 ticks of 10 ms.
        assert_eq!(
            parse_proc_stat_cpus(text, 100),
            Some(vec![(0, 5_130_000_000), (1, 5_140_000_000)])
        );
        assert_eq!(parse_proc_stat_cpus("cpu 1 2 3", 100), None);
        assert_eq!(parse_proc_stat_cpus("intr 1", 100), None);
        assert_eq!(parse_proc_stat_cpus(text, 0), None);
        assert!(cpu_idle_ns().is_some(), "this machine's /proc/stat parses");
    }

    #[test]
    fn others_gate_closes_when_only_vcpus_compete_and_opens_at_once() {
        const MS: u64 = 1_000_000;
        let gate = OthersGate::default();
        let mut v = OthersVerdict::new(gate);
        assert!(v.closed(), "closed before anything is known");
        assert_eq!(v.window(), gate.first_window);
        let (mut t, mut busy, mut ours) = (0u64, 0u64, 0u64);
        let mut step = |v: &mut OthersVerdict, others_millicpu: u64, ours_millicpu: u64| {
            let w = v.window();
            t += w;
            ours += ours_millicpu * w / 1000;
            busy += (others_millicpu + ours_millicpu) * w / 1000;
            v.sample(t, busy, ours)
        };
        assert_eq!(
            step(&mut v, 50, 1900),
            None,
            "the first sample starts a window"
        );
        assert_eq!(
            step(&mut v, 50, 1900),
            None,
            "a quiet first window keeps it closed"
        );
        assert_eq!(v.window(), gate.window, "then the long windows");
        assert_eq!(step(&mut v, 1000, 1000), Some(false), "a hog opens it");
        assert_eq!(
            step(&mut v, 50, 1900),
            None,
            "one quiet window is not enough"
        );
        assert_eq!(step(&mut v, 50, 1900), Some(true), "closed after two");
        assert!(v.closed());
        assert_eq!(
            step(&mut v, 350, 1600),
            None,
            "between the thresholds: stays"
        );
        assert_eq!(
            step(&mut v, 1000, 1000),
            Some(false),
            "a hog reopens it at once"
        );
        assert_eq!(step(&mut v, 50, 1900), None);
        assert_eq!(step(&mut v, 350, 1600), None, "in between resets the count");
        assert_eq!(step(&mut v, 50, 1900), None);
        assert_eq!(step(&mut v, 50, 1900), Some(true));
        // A sample too soon after the last one is ignored.
        assert_eq!(v.sample(t + MS, busy + 400 * MS, ours), None);
        assert!(v.closed());
        // After a restart (a vCPU attached: the sums jump) the next sample only starts a
        // window, whatever it shows.
        v.restart();
        assert_eq!(v.sample(t + 300 * MS, busy + 10_000 * MS, ours), None);
        assert!(v.closed());
    }

    #[test]
    fn others_gate_opens_after_a_busy_first_window() {
        const MS: u64 = 1_000_000;
        let gate = OthersGate::default();
        for (others, open) in [(1000, true), (450, true), (449, false), (300, false)] {
            let mut v = OthersVerdict::new(gate);
            assert_eq!(v.sample(0, 0, 0), None);
            let t = 100 * MS;
            let got = v.sample(t, (others + 1000) * t / 1000, t);
            assert_eq!(got, open.then_some(false), "others {others} millicpu");
            assert_eq!(v.closed(), !open);
        }
    }

    #[test]
    fn samples_this_thread() {
        // SAFETY: gettid has no arguments and cannot fail.
        let tid = unsafe { libc::gettid() };
        let Some(mut s) = VcpuSampler::open(QuietGate::default(), tid) else {
            eprintln!("SKIPPED samples_this_thread: no /proc/<tid>/schedstat (schedstats off)");
            return;
        };
        let t0 = mono_ns();
        assert_eq!(
            s.poll(t0, 0, 0),
            None,
            "the first sample only starts a window"
        );
        assert!(s.poll(t0, 0, 0).is_none(), "not due yet");
    }

    #[test]
    fn a_repayment_pause_is_left_out_of_the_window() {
        // SAFETY: gettid has no arguments and cannot fail.
        let tid = unsafe { libc::gettid() };
        let gate = QuietGate::default();
        let (Some(mut with), Some(mut without)) =
            (VcpuSampler::open(gate, tid), VcpuSampler::open(gate, tid))
        else {
            eprintln!("SKIPPED a_repayment_pause_is_left_out_of_the_window: no schedstats");
            return;
        };
        let t0 = mono_ns();
        with.poll(t0, 0, 0);
        without.poll(t0, 0, 0);
        // Runnable for 20 ms, then held off the CPU for 20 ms as a pause would.
        while mono_ns() < t0 + 20_000_000 {
            std::hint::spin_loop();
        }
        let p0 = mono_ns();
        std::thread::sleep(Duration::from_millis(20));
        let t1 = mono_ns();
        with.poll(t1, 0, t1 - p0);
        without.poll(t1, 0, 0);
        assert!(
            without.sleeps(),
            "half the window off the CPU is a sleeper's"
        );
        assert!(!with.sleeps(), "unless the VMM held it off");
    }

    #[test]
    fn a_vcpu_is_contended_by_the_share_of_its_runnable_time_it_waits() {
        let ms = 1_000_000u64;
        // Busy: runnable all of a 25 ms window, waiting 5 ms of it.
        assert_eq!(wait_permille(25 * ms, 20 * ms, 5 * ms, 0), Some(200));
        // ...boosted 10 ms of it (running then): the wait counts against the 15 ms unboosted.
        assert_eq!(wait_permille(25 * ms, 20 * ms, 5 * ms, 10 * ms), Some(333));
        // Sleeping: runnable 4 ms of the window, waiting 1 ms of that: contended (250), where
        // the whole window's share (40) would call it quiet.
        assert_eq!(wait_permille(25 * ms, 3 * ms, ms, 0), Some(250));
        // Hardly ever runnable: against the whole window. Too little unboosted time tells
        // nothing.
        assert_eq!(wait_permille(25 * ms, ms / 4, ms / 4, 0), Some(10));
        assert_eq!(wait_permille(25 * ms, 25 * ms, 0, 20 * ms), None);
        // Never above the whole.
        assert_eq!(wait_permille(25 * ms, ms, 2 * ms, 2 * ms), Some(1000));
    }

    #[test]
    fn quiet_takes_several_windows_contention_one() {
        let mut v = Verdict::new(QuietGate::default());
        for i in 0..3 {
            assert!(!v.window(5), "window {i}");
        }
        assert!(v.window(5));
        assert!(!v.window(500), "contention is believed at once");
        assert!(!v.window(19));
        assert!(!v.window(20), "at the threshold: contended");
        // A sleeping vCPU's threshold (its runnable time's share): the idle host's 21-23 %
        // does not count as contended, the busy host's 42 % does.
        let mut v = Verdict::new(QuietGate {
            threshold_permille: 200,
            quiet_after: 1,
            ..QuietGate::default()
        });
        assert!(v.window_at(230, SLEEPER_THRESHOLD_PERMILLE));
        assert!(!v.window_at(420, SLEEPER_THRESHOLD_PERMILLE));
    }
}
