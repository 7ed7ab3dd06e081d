//! One testbed run: a VM, optional host load, the host probe, a fixed scheduling class for
//! the vCPU threads, and the report of what the guest and the host measured.

use crate::engine_host::{helper_class, HostLoop, HostLoopReport, PolicyConfig, PvReport};
use crate::hist::{LatencyHistogram, LatencySummary};
use crate::load::{HostLoad, LoadReport};
use crate::probe::HostProbe;
use pvsched_host::runtime::Cost;
use pvsched_host::stats::LatencyStats;
use pvsched_host::{SchedClass, SchedGuard};
use pvsched_vmm::vm::tsc_to_ns;
use pvsched_vmm::{RunningVm, TaskConfig, VcpuEnd, Vm, VmConfig};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How often the experiment drains the guests' latency rings.
const DRAIN_PERIOD: Duration = Duration::from_millis(10);

/// Errors of an experiment.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The VM failed.
    #[error(transparent)]
    Vm(#[from] pvsched_vmm::Error),
    /// Changing a vCPU thread's class failed.
    #[error("cannot apply --vcpu-sched")]
    Sched(#[from] pvsched_host::sched::Error),
    /// The external daemon failed.
    #[error("the external daemon failed")]
    Daemon(#[from] pvsched_daemon::DaemonError),
    /// The policy engine could not be started.
    #[error(transparent)]
    Policy(#[from] pvsched_vmm::engine::EngineError),
    /// A host helper thread could not be started.
    #[error("cannot start the {0} thread")]
    Thread(&'static str, #[source] std::io::Error),
    /// The threads could not be placed as `layout` asks.
    #[error("cannot place thread {tid} on CPU {cpu} (layout {layout})")]
    Layout {
        /// The layout asked for.
        layout: Layout,
        /// The thread.
        tid: i32,
        /// The CPU.
        cpu: usize,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Where a run's own threads (its vCPU threads and built-in hogs) may run. A busy host with as
/// many vCPUs and hogs as CPUs has two layouts CFS keeps once it is in them (each vCPU beside a
/// hog, or the vCPUs together and the hogs together), and which one a run falls into decides
/// what a boost can do (docs/policy.md, "Where the vCPU threads run"); pinning one makes runs
/// comparable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// Wherever the kernel puts them.
    #[default]
    Free,
    /// vCPU `i` and hog `i` pinned to the `i`-th CPU the run may use (round robin): each vCPU
    /// beside one hog, as CFS itself places them from a clean start.
    Apart,
    /// Every vCPU pinned to the first CPU the run may use, the hogs to the others: a boost can
    /// only reorder the vCPUs among themselves.
    Together,
}

impl Layout {
    /// Every layout, by name.
    pub const ALL: [(&'static str, Layout); 3] = [
        ("free", Layout::Free),
        ("apart", Layout::Apart),
        ("together", Layout::Together),
    ];
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = Layout::ALL
            .iter()
            .find(|(_, l)| l == self)
            .map_or("?", |(n, _)| n);
        f.write_str(name)
    }
}

impl std::str::FromStr for Layout {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Layout::ALL
            .iter()
            .find(|(n, _)| *n == s)
            .map(|(_, l)| *l)
            .ok_or_else(|| format!("unknown layout `{s}` (free, apart, together)"))
    }
}

/// The CPU of each of `vcpus` vCPU threads and `hogs` hogs under `layout`, over the CPUs
/// `allowed` (those the run may use, ascending); `None` for [`Layout::Free`] or without CPUs.
pub fn layout_cpus(
    layout: Layout,
    vcpus: usize,
    hogs: usize,
    allowed: &[usize],
) -> Option<(Vec<usize>, Vec<usize>)> {
    let n = allowed.len();
    if n == 0 {
        return None;
    }
    match layout {
        Layout::Free => None,
        Layout::Apart => Some((
            (0..vcpus).map(|i| allowed[i % n]).collect(),
            (0..hogs).map(|i| allowed[i % n]).collect(),
        )),
        Layout::Together => {
            let others = if n > 1 { &allowed[1..] } else { allowed };
            Some((
                vec![allowed[0]; vcpus],
                (0..hogs).map(|i| others[i % others.len()]).collect(),
            ))
        }
    }
}

/// Pins each thread of `tids` to its CPU in `cpus`.
fn place(layout: Layout, tids: &[i32], cpus: &[usize]) -> Result<(), Error> {
    for (&tid, &cpu) in tids.iter().zip(cpus) {
        pvsched_host::sched::set_affinity(tid, &[cpu]).map_err(|source| Error::Layout {
            layout,
            tid,
            cpu,
            source,
        })?;
    }
    Ok(())
}

/// Guest background load between timer events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuestLoad {
    /// The vCPU halts between events.
    Idle,
    /// The vCPU stays runnable, leaving to the VMM every few µs to stay interruptible.
    Busy,
}

/// Parameters of one run.
#[derive(Clone, Debug)]
pub struct ExperimentConfig {
    /// The VM and its guest program.
    pub vm: VmConfig,
    /// How long the guests run.
    pub duration: Duration,
    /// Number of built-in CPU hogs on the host.
    pub host_load: usize,
    /// Fixed class for every vCPU thread, restored at the end; `None` leaves them alone.
    pub vcpu_sched: Option<SchedClass>,
    /// Period of the host probe.
    pub probe_interval: Duration,
    /// The policy driver that decides boosts during the run.
    pub policy: PolicyConfig,
    /// Host-side event sources (tracepoints) feeding the policy, if any.
    pub host_events: Option<pvsched_host::trace::TraceConfig>,
    /// Per-vCPU deadline tasks overriding `vm.guest.task` where `Some`.
    pub task_by_vcpu: Vec<Option<TaskConfig>>,
    /// Let pvsched's daemon boost the vCPU threads from the outside, its driver (`dynamic`)
    /// with these options (the in-VMM policy should then be `none`).
    pub external_daemon: Option<pvsched_policy::DriverOptions>,
    /// Keep guest RAM in this file (shared), so an external daemon can read the pvsched slots.
    pub memory_file: Option<std::path::PathBuf>,
    /// Where the vCPU threads and the hogs may run.
    pub layout: Layout,
}

impl ExperimentConfig {
    /// The deadline task vCPU `i` runs.
    pub fn task_of(&self, i: usize) -> Option<TaskConfig> {
        match self.task_by_vcpu.get(i) {
            Some(Some(t)) => Some(*t),
            _ => self.vm.guest.task,
        }
    }
}

/// The deadline task's results on one vCPU.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskReport {
    /// Task period (and relative deadline), µs.
    pub period_us: f64,
    /// Requested work per job, µs.
    pub work_us: f64,
    /// Jobs completed.
    pub jobs: u64,
    /// Jobs that finished after their deadline.
    pub glitches: u64,
    /// Jobs missed altogether: the task was more than a period behind and skipped them.
    #[serde(default)]
    pub missed: u64,
    /// Mean job response time (finish − release), µs.
    pub response_avg_us: f64,
    /// Largest job response time, µs.
    pub response_max_us: f64,
    /// Work-loop iterations per job, from the guest's calibration.
    pub work_iters: u64,
    /// Calibrated cost of one work-loop iteration, µs.
    pub work_iter_us: f64,
}

/// One vCPU's results.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VcpuReport {
    /// vCPU index.
    pub index: usize,
    /// Kernel thread id of the vCPU thread.
    pub tid: i32,
    /// Timer wake-up latency (handler entry − programmed deadline).
    pub latency: LatencySummary,
    /// Samples overwritten in the ring before the VMM read them.
    pub lost: u64,
    /// Interrupts that arrived before their deadline (counted as 0 µs).
    pub early: u64,
    /// Probe periods skipped because the guest was already past them (cyclictest's rule).
    pub overruns: u64,
    /// The deadline task, when enabled.
    pub task: Option<TaskReport>,
    /// CPU time of the vCPU thread, s.
    pub cpu_s: f64,
    /// Wall time of the vCPU run loop, s.
    pub wall_s: f64,
    /// Exits to userspace handled by the VMM.
    pub user_exits: u64,
    /// True if the guest finished by itself after the stop request.
    pub guest_done: bool,
}

impl VcpuReport {
    /// CPU use of the vCPU thread, percent of one CPU.
    pub fn cpu_percent(&self) -> f64 {
        if self.wall_s > 0.0 {
            self.cpu_s / self.wall_s * 100.0
        } else {
            0.0
        }
    }
}

/// Everything one run measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Number of vCPUs.
    pub vcpus: usize,
    /// Latency-probe interval, µs.
    pub interval_us: f64,
    /// Requested duration, s.
    pub duration_s: f64,
    /// Measured duration (guests started → stop requested), s.
    pub elapsed_s: f64,
    /// Guest background load.
    pub guest_load: GuestLoad,
    /// Host CPU hogs.
    pub host_load: usize,
    /// Class applied to the vCPU threads (`none` when left alone).
    pub vcpu_sched: String,
    /// Guest TSC frequency, kHz.
    pub tsc_khz: u64,
    /// Guest TSC − host TSC, cycles (the daemon's `tsc_offset` for this VM's deadlines).
    #[serde(default)]
    pub tsc_offset: i64,
    /// The file holding guest RAM, when `memory_file` was given.
    #[serde(default)]
    pub memory_file: Option<String>,
    /// The protocol features the guest negotiated (names; empty without the protocol).
    #[serde(default)]
    pub pv_features: Vec<String>,
    /// True when the run was cut short by SIGINT/SIGTERM.
    pub interrupted: bool,
    /// Per-vCPU results.
    pub per_vcpu: Vec<VcpuReport>,
    /// Latency over all vCPUs.
    pub latency: LatencySummary,
    /// Host probe wake-up latency.
    pub host_probe: LatencySummary,
    /// Host hog throughput, when there were hogs.
    pub host_hogs: Option<LoadReport>,
    /// Deadline-task glitches over all vCPUs.
    pub glitches: u64,
    /// Deadline-task jobs over all vCPUs.
    pub jobs: u64,
    /// The pvsched protocol, when the VM offered it.
    pub pv: Option<PvReport>,
    /// What the policy engine did.
    pub policy: PolicyReport,
    /// Where the vCPU threads ran: sampled at every ring drain (10 ms), the share of samples in
    /// which two or more of them were on the same host CPU (running or queued there), %.
    /// `None` with one vCPU or no sample.
    #[serde(default)]
    pub vcpus_sharing_cpu_pct: Option<f64>,
    /// Sampled alike in a run with built-in hogs: the share of samples in which a vCPU thread
    /// had a host CPU to itself (no other vCPU thread, no hog there), %. With as many vCPUs
    /// and hogs as CPUs the hogs then share the other CPUs and the VM takes a whole CPU,
    /// whatever its class. `None` without hogs or with one vCPU.
    #[serde(default)]
    pub vcpu_alone_pct: Option<f64>,
    /// Where the vCPU threads and the hogs were allowed to run.
    #[serde(default)]
    pub layout: Layout,
    /// The class of the run's controller thread (it drains the results and stops the run)
    /// when it had to outrank the vCPU threads; `None`: it stayed in its own.
    #[serde(default)]
    pub controller_class: Option<String>,
}

impl Report {
    /// A boosted time (ms), as % of the run (the engine boosts on the run's clock: a vCPU
    /// thread starved for most of the run can be boosted for longer than it ran).
    pub fn boosted_pct(&self, boosted_ms: f64) -> f64 {
        if self.elapsed_s > 0.0 {
            boosted_ms / 1e3 / self.elapsed_s * 100.0
        } else {
            0.0
        }
    }

    /// The fewest latency samples any vCPU took, % of the probe periods in the run: low when
    /// a vCPU fell behind its timer (overruns) or never got to run (starved); `None` without
    /// vCPUs or periods.
    pub fn fewest_samples_pct(&self) -> Option<f64> {
        let periods = self.elapsed_s * 1e6 / self.interval_us;
        if periods.is_nan() || periods <= 0.0 {
            return None;
        }
        self.per_vcpu
            .iter()
            .map(|v| v.latency.count as f64 / periods * 100.0)
            .min_by(f64::total_cmp)
    }
}

/// The host CPU a thread is on (running, or queued there) from the text of its
/// `/proc/<pid>/task/<tid>/stat` ("processor", field 39).
pub fn stat_processor(stat: &str) -> Option<u32> {
    pvsched_host::sched::stat_field(stat, 39)?.parse().ok()
}

/// Samples of where a VM's vCPU threads (and the run's built-in hogs) are.
#[derive(Default)]
struct Placement {
    samples: u64,
    shared: u64,
    /// Samples with hogs in which a vCPU thread had a CPU to itself (no other vCPU, no hog).
    alone: u64,
    cpus: Vec<u32>,
    hog_cpus: Vec<u32>,
}

impl Placement {
    /// Reads the CPU of each vCPU thread `tids` and hog `hogs`; a thread that cannot be read
    /// (gone) makes no sample.
    fn sample(&mut self, tids: &[i32], hogs: &[i32]) {
        if tids.len() < 2 {
            return;
        }
        // The CPU of each of `tids` into `out`; false when one cannot be read.
        let read = |tids: &[i32], out: &mut Vec<u32>| {
            out.clear();
            tids.iter().all(|tid| {
                std::fs::read_to_string(format!("/proc/self/task/{tid}/stat"))
                    .ok()
                    .as_deref()
                    .and_then(stat_processor)
                    .map(|cpu| out.push(cpu))
                    .is_some()
            })
        };
        if !read(tids, &mut self.cpus) || !read(hogs, &mut self.hog_cpus) {
            return;
        }
        self.samples += 1;
        let (vcpus, hog_cpus) = (&self.cpus, &self.hog_cpus);
        let alone =
            |cpu: &u32| vcpus.iter().filter(|c| *c == cpu).count() == 1 && !hog_cpus.contains(cpu);
        if !hog_cpus.is_empty() && vcpus.iter().any(alone) {
            self.alone += 1;
        }
        self.cpus.sort_unstable();
        if self.cpus.windows(2).any(|w| w[0] == w[1]) {
            self.shared += 1;
        }
    }

    fn shared_pct(&self) -> Option<f64> {
        (self.samples > 0).then(|| self.shared as f64 / self.samples as f64 * 100.0)
    }

    /// Share of samples in which a vCPU had a CPU to itself while hogs ran; `None` without
    /// hogs or samples.
    fn alone_pct(&self, hogs: usize) -> Option<f64> {
        (self.samples > 0 && hogs > 0).then(|| self.alone as f64 / self.samples as f64 * 100.0)
    }
}

/// What the policy engine did during a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyReport {
    /// Driver name.
    pub driver: String,
    /// Per-vCPU boosts, throttles, boosted time.
    pub per_vcpu: Vec<crate::engine_host::VcpuPolicyReport>,
    /// Boost decision → class applied on the thread.
    pub boost_latency: LatencyStats,
    /// Errors applying decisions, if any (the last few).
    pub errors: Vec<String>,
    /// Host events (tracepoint hits, VMM injections) fed to the policy.
    pub host_events: u64,
    /// Tracepoint records the kernel dropped.
    pub host_events_lost: u64,
    /// What the engine cost: its thread's CPU, wake-ups, `sched_setattr` calls.
    pub cost: Cost,
}

/// A run's report plus the full histograms, for plots and merging.
pub struct Outcome {
    /// The report.
    pub report: Report,
    /// Per-vCPU latency histograms.
    pub vcpu_hists: Vec<LatencyHistogram>,
    /// Host probe histogram.
    pub probe_hist: LatencyHistogram,
}

/// The class of the experiment's controller thread when vCPU threads run in `vcpu`: one
/// real-time priority above them, or `None` when they are not real-time.
pub fn controller_class(vcpu: SchedClass) -> Option<SchedClass> {
    match vcpu {
        SchedClass::Other | SchedClass::Slice(_) | SchedClass::Nice(_) | SchedClass::Idle => None,
        SchedClass::Fifo(p) | SchedClass::Rr(p) => Some(SchedClass::Fifo((p + 1).min(99))),
        SchedClass::Deadline { .. } => Some(SchedClass::Fifo(99)),
    }
}

/// Runs one experiment. `interrupt` (set by a signal handler) ends it early but cleanly.
pub fn run(cfg: &ExperimentConfig, interrupt: &AtomicBool) -> Result<Outcome, Error> {
    let vm = Vm::with_memory_file(&cfg.vm, &cfg.task_by_vcpu, cfg.memory_file.as_deref())?;
    let tsc_khz = vm.tsc_khz();
    let hogs = HostLoad::start(cfg.host_load).map_err(|e| Error::Thread("host load", e))?;
    let probe = HostProbe::start(cfg.probe_interval).map_err(|e| Error::Thread("host probe", e))?;
    let mut running = vm.start()?;
    // Before the guests start; the threads exit with the run, so nothing is restored.
    if cfg.layout != Layout::Free {
        let allowed = pvsched_host::sched::affinity(0).map_err(|source| Error::Layout {
            layout: cfg.layout,
            tid: pvsched_vmm::vcpu::gettid(),
            cpu: 0,
            source,
        })?;
        if let Some((vcpu_cpus, hog_cpus)) =
            layout_cpus(cfg.layout, running.vcpus(), cfg.host_load, &allowed)
        {
            place(cfg.layout, &running.tids(), &vcpu_cpus)?;
            place(cfg.layout, &hogs.tids(), &hog_cpus)?;
        }
    }
    let pv_offered = running.pv_device().is_some();
    let host_loop = HostLoop::start(&mut running, &cfg.policy, cfg.host_events)?;
    // Guards restore the vCPU threads' class when dropped, on every path out of here.
    let guards = match cfg.vcpu_sched {
        Some(class) => running
            .tids()
            .into_iter()
            .map(|tid| SchedGuard::apply(tid, class))
            .collect::<Result<Vec<_>, _>>()?,
        None => Vec::new(),
    };

    // With RT vCPU threads the controller (this thread) must outrank them, or it cannot
    // drain the rings or stop the run on time. Started after the vCPU threads so they do
    // not inherit it; restored when the guard drops.
    let external = match &cfg.external_daemon {
        Some(opts) => Some(crate::external::ExternalDaemon::start(
            opts.clone(),
            cfg.policy.engine_class,
        )?),
        None => None,
    };
    let controller_needs = cfg
        .vcpu_sched
        .and_then(controller_class)
        .or_else(|| cfg.policy.boost_class().map(helper_class))
        .or_else(|| external.as_ref().map(|_| helper_class(Default::default())));
    // The measurement must not move what it measures: on a deadline reservation where the
    // kernel admits it (whatever the engine's class), not FIFO. A FIFO controller waking
    // every drain period on a boosted vCPU's CPU makes that CPU "overloaded" and the kernel
    // pushes the vCPU onto the other CPU: with it, the two vCPUs of a `deadline-aware` run
    // shared a CPU in 42-46 % of samples, without it 13-16 % (README, "The run's controller").
    let controller = match controller_needs {
        Some(class) => Some(pvsched_host::mechanism::outrank_vcpus(
            pvsched_vmm::vcpu::gettid(),
            pvsched_host::mechanism::EngineClass::Deadline,
            class,
        )?),
        None => None,
    };
    // Which class it got, and why not the reservation when the kernel refused it (the
    // figures of such a run are not comparable with those of a run whose controller had it).
    let controller_class = controller.as_ref().map(|(_, attr, refused)| match refused {
        Some(e) => format!(
            "{attr} (SCHED_DEADLINE refused: {})",
            pvsched_host::error_chain(e)
        ),
        None => attr.to_string(),
    });
    let controller = controller.map(|(guard, _, _)| guard);
    let mut hists: Vec<LatencyHistogram> = (0..running.vcpus())
        .map(|_| LatencyHistogram::new())
        .collect();
    let mut readers: Vec<_> = (0..running.vcpus())
        .map(|i| running.ring_reader(i))
        .collect();
    let drain = |running: &RunningVm,
                 readers: &mut [pvsched_vmm::RingReader],
                 hists: &mut [LatencyHistogram]|
     -> Result<(), Error> {
        for (r, h) in readers.iter_mut().zip(hists.iter_mut()) {
            running.drain(r, |cycles| h.record_ns(tsc_to_ns(cycles, tsc_khz)))?;
        }
        Ok(())
    };

    running.go();
    let started = Instant::now();
    let mut interrupted = false;
    let vcpu_tids = running.tids();
    let hog_tids = hogs.tids();
    let mut placement = Placement::default();
    loop {
        std::thread::sleep(DRAIN_PERIOD.min(cfg.duration));
        drain(&running, &mut readers, &mut hists)?;
        placement.sample(&vcpu_tids, &hog_tids);
        if interrupt.load(Ordering::Relaxed) {
            interrupted = true;
            break;
        }
        if running.any_finished() || started.elapsed() >= cfg.duration {
            break;
        }
    }
    let elapsed = started.elapsed();
    // Enough for one more timer period and a task job at emulated speed.
    let longest_period = (0..cfg.vm.vcpus)
        .filter_map(|i| cfg.task_of(i))
        .map(|t| t.period)
        .max()
        .unwrap_or_default();
    let grace = cfg.vm.guest.interval * 4 + longest_period * 4 + Duration::from_millis(100);
    // The daemon stops first (restoring the threads): after the vCPU threads exit it would
    // detach the VM, and its figures with it.
    let external = external.map(|d| d.stop());
    let outcomes = running.shutdown(grace);
    drain(&running, &mut readers, &mut hists)?;
    let mut restore_error = None;
    for g in guards {
        if let Err(e) = g.restore() {
            restore_error.get_or_insert(e);
        }
    }
    drop(controller);
    let mut engine = host_loop.stop();
    if let Some(mut d) = external {
        d.pv = std::mem::take(&mut engine.pv);
        engine = d;
    }
    let HostLoopReport {
        driver,
        pv: pv_counts,
        policy: policy_vcpus,
        boost_latency,
        errors: policy_errors,
        host_events,
        host_events_lost,
        cost,
    } = engine;
    let probe_hist = probe.stop();
    let hog_report = hogs.stop();

    let mut per_vcpu = Vec::with_capacity(outcomes.len());
    for (index, outcome) in outcomes.into_iter().enumerate() {
        let stats = outcome?;
        let mb = running.mailbox(index)?;
        let us = |cycles: u64| tsc_to_ns(cycles, tsc_khz) as f64 / 1000.0;
        let task = cfg.task_of(index).map(|t| TaskReport {
            period_us: t.period.as_secs_f64() * 1e6,
            work_us: t.work.as_secs_f64() * 1e6,
            jobs: mb.jobs_done,
            glitches: mb.glitches,
            missed: mb.task_missed,
            response_avg_us: if mb.jobs_done > 0 {
                us(mb.response_sum) / mb.jobs_done as f64
            } else {
                0.0
            },
            response_max_us: us(mb.response_max),
            work_iters: mb.work_iters,
            work_iter_us: us(mb.work_iter_tsc),
        });
        per_vcpu.push(VcpuReport {
            index,
            tid: running.tids()[index],
            latency: hists[index].summary(),
            lost: readers[index].lost(),
            early: mb.early,
            overruns: mb.overruns,
            task,
            cpu_s: stats.cpu.as_secs_f64(),
            wall_s: stats.wall.as_secs_f64(),
            user_exits: stats.user_exits,
            guest_done: stats.end == VcpuEnd::GuestDone,
        });
    }
    if let Some(e) = restore_error {
        return Err(e.into());
    }
    let pv = if pv_offered {
        let mailboxes = (0..running.vcpus())
            .map(|i| running.mailbox(i))
            .collect::<Result<Vec<_>, _>>()?;
        Some(crate::engine_host::report(&mailboxes, &pv_counts))
    } else {
        None
    };
    let mut all = LatencyHistogram::new();
    for h in &hists {
        all.merge(h);
    }
    let report = Report {
        controller_class,
        vcpus: cfg.vm.vcpus,
        interval_us: cfg.vm.guest.interval.as_secs_f64() * 1e6,
        duration_s: cfg.duration.as_secs_f64(),
        elapsed_s: elapsed.as_secs_f64(),
        guest_load: if cfg.vm.guest.busy {
            GuestLoad::Busy
        } else {
            GuestLoad::Idle
        },
        host_load: cfg.host_load,
        vcpu_sched: cfg
            .vcpu_sched
            .map_or_else(|| "none".to_string(), |c| c.to_string()),
        tsc_khz,
        tsc_offset: running.tsc_clock().offset,
        memory_file: cfg.memory_file.as_ref().map(|p| p.display().to_string()),
        pv_features: running
            .pv_device()
            .and_then(|d| d.negotiated())
            .map(|n| {
                pvsched_proto::abi::feature::NAMES
                    .iter()
                    .filter(|(_, bit)| n.features & bit != 0)
                    .map(|(name, _)| name.to_string())
                    .collect()
            })
            .unwrap_or_default(),
        interrupted,
        latency: all.summary(),
        host_probe: probe_hist.summary(),
        host_hogs: (cfg.host_load > 0).then_some(hog_report),
        glitches: per_vcpu
            .iter()
            .filter_map(|v| v.task.as_ref())
            .map(|t| t.glitches)
            .sum(),
        jobs: per_vcpu
            .iter()
            .filter_map(|v| v.task.as_ref())
            .map(|t| t.jobs)
            .sum(),
        per_vcpu,
        pv,
        vcpus_sharing_cpu_pct: placement.shared_pct(),
        vcpu_alone_pct: placement.alone_pct(hog_tids.len()),
        layout: cfg.layout,
        policy: PolicyReport {
            driver,
            per_vcpu: policy_vcpus,
            boost_latency,
            errors: policy_errors,
            host_events,
            host_events_lost,
            cost,
        },
    };
    Ok(Outcome {
        report,
        vcpu_hists: hists,
        probe_hist,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_is_read_from_a_stat_line_whatever_the_name() {
        // A real line of /proc/self/stat ("cat" on CPU 1), and the same with a hostile name.
        let line = "14171 (cat) R 14168 14168 23850 0 -1 4194304 126 0 0 0 0 0 0 0 20 0 1 0 \
                    7412130 3133440 410 18446744073709551615 94733693698048 94733693717929 \
                    140723206888080 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0 94733693";
        assert_eq!(stat_processor(line), Some(1));
        let odd = line.replace("(cat)", "(a) b (c) 9 9)");
        assert_eq!(stat_processor(&odd), Some(1));
        assert_eq!(stat_processor("14171 (cat) R 1 2"), None);
        assert_eq!(stat_processor("no parenthesis"), None);
        // This thread's own line parses, to a CPU this host has.
        let own = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        let cpu = stat_processor(&own).unwrap();
        assert!((cpu as usize) < 4096, "{cpu}");
    }

    #[test]
    fn placement_counts_samples_with_two_vcpus_on_one_cpu() {
        let mut p = Placement::default();
        assert_eq!(p.shared_pct(), None);
        // One thread: nothing to compare.
        p.sample(&[pvsched_vmm::vcpu::gettid()], &[]);
        assert_eq!(p.shared_pct(), None);
        // The same thread twice is on one CPU.
        let me = pvsched_vmm::vcpu::gettid();
        p.sample(&[me, me], &[]);
        assert_eq!(p.shared_pct(), Some(100.0));
        // A thread that does not exist makes no sample.
        p.sample(&[me, i32::MAX], &[]);
        assert_eq!((p.samples, p.shared), (1, 1));
        assert_eq!(p.alone_pct(0), None);
    }

    #[test]
    fn placement_counts_samples_with_a_vcpu_alone_beside_hogs() {
        // Two threads pinned to different CPUs stand for vCPUs and hogs.
        let cpus = pvsched_host::sched::affinity(0).unwrap();
        if cpus.len() < 2 {
            eprintln!("skipped: one CPU allowed, no two places to compare");
            return;
        }
        let spawn = |cpu: usize| {
            let (tx, rx) = std::sync::mpsc::channel();
            let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
            let h = std::thread::spawn(move || {
                let me = pvsched_vmm::vcpu::gettid();
                pvsched_host::sched::set_affinity(me, &[cpu]).unwrap();
                tx.send(me).unwrap();
                let _ = stop_rx.recv();
            });
            (rx.recv().unwrap(), stop_tx, h)
        };
        let (a, stop_a, ha) = spawn(cpus[0]);
        let (b, stop_b, hb) = spawn(cpus[1]);
        let mut p = Placement::default();
        // vCPUs a and b on two CPUs, a hog beside b: a is alone.
        p.sample(&[a, b], &[b]);
        // vCPUs a and b, a hog beside each: nobody alone.
        p.sample(&[a, b], &[a, b]);
        // Both vCPUs on a's CPU, the hog elsewhere: together, not alone.
        p.sample(&[a, a], &[b]);
        // A hog that is gone makes no sample.
        p.sample(&[a, b], &[i32::MAX]);
        assert_eq!((p.samples, p.alone, p.shared), (3, 1, 1));
        assert_eq!(p.alone_pct(1).map(|x| (x * 3.0).round()), Some(100.0));
        assert_eq!(p.alone_pct(0), None);
        drop((stop_a, stop_b));
        ha.join().unwrap();
        hb.join().unwrap();
    }

    #[test]
    fn controller_outranks_rt_vcpus_only() {
        assert_eq!(controller_class(SchedClass::Other), None);
        assert_eq!(
            controller_class(SchedClass::Fifo(10)),
            Some(SchedClass::Fifo(11))
        );
        assert_eq!(
            controller_class(SchedClass::Rr(99)),
            Some(SchedClass::Fifo(99))
        );
    }

    #[test]
    fn layouts_place_vcpus_beside_hogs_or_together() {
        let cpus = [0, 1];
        assert_eq!(layout_cpus(Layout::Free, 2, 2, &cpus), None);
        assert_eq!(
            layout_cpus(Layout::Apart, 2, 2, &cpus),
            Some((vec![0, 1], vec![0, 1]))
        );
        assert_eq!(
            layout_cpus(Layout::Together, 2, 2, &cpus),
            Some((vec![0, 0], vec![1, 1]))
        );
        // Round robin over the CPUs the run may use, whatever their numbers.
        assert_eq!(
            layout_cpus(Layout::Apart, 3, 1, &[2, 5]),
            Some((vec![2, 5, 2], vec![2]))
        );
        assert_eq!(
            layout_cpus(Layout::Together, 2, 3, &[1, 3, 4]),
            Some((vec![1, 1], vec![3, 4, 3]))
        );
        // One CPU: everything on it; none: no layout.
        assert_eq!(
            layout_cpus(Layout::Together, 2, 1, &[7]),
            Some((vec![7, 7], vec![7]))
        );
        assert_eq!(layout_cpus(Layout::Apart, 2, 2, &[]), None);
    }

    #[test]
    fn layouts_parse_and_print() {
        for (name, l) in Layout::ALL {
            assert_eq!(name.parse::<Layout>(), Ok(l));
            assert_eq!(l.to_string(), name);
        }
        let e = "spread".parse::<Layout>().unwrap_err();
        assert!(e.contains("spread") && e.contains("apart"), "{e}");
    }
}
