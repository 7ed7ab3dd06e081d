//! `pvsched bench`: the RFC's comparison, side by side, on this machine.
//!
//! A matrix of testbed runs (host idle/busy × policy × probe interval, busy guest, plus an
//! idle-host idle-guest "floor" cell per interval), run in rounds: every round runs every
//! cell once, policies next to each other, so that machine drift hits them equally. Each
//! metric is reported as the median over rounds with its spread (min–max).

use crate::engine_host::PolicyConfig;
use crate::experiment::{self, ExperimentConfig, Report};
use crate::hist::LatencyHistogram;
use pvsched_host::mechanism::EngineClass;
use pvsched_host::pressure::QuietGate;
use pvsched_policy::DriverOptions;
use pvsched_vmm::pvdevice::PvConfig;
use pvsched_vmm::{GuestConfig, TaskConfig, VmConfig};
use serde::{Deserialize, Serialize};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Policies in the order the report shows them (RFC columns: vanilla, dynamic, static).
/// `daemon` is pvsched's daemon driving the VM from the outside (tracepoints only).
/// `v3-default` runs a guest that speaks the pvsched v3 page (`pvsched vm --pv v3`).
pub const POLICIES: [&str; 10] = [
    "none",
    "dynamic",
    "deadline-aware",
    "deadline-aware/nice",
    "deadline-aware/slice",
    "deadline-aware/nocap",
    "deadline-aware/unpaid",
    "v3-default",
    "static",
    "daemon",
];

/// The column a bench policy name builds on: the name without the driver options it adds
/// after `+` (`deadline-aware/nocap+lead=50us` → `deadline-aware/nocap`).
pub fn policy_base(name: &str) -> &str {
    name.split_once('+').map_or(name, |(base, _)| base)
}

/// The driver and options behind a bench policy name: a driver name, `daemon`, or
/// `<driver>/slice` (that driver boosting to an EEVDF custom slice of 100 µs instead of FIFO),
/// or `<driver>/nice` (paying back at nice 10, `repay=nice:10`: where the daemon cannot pause
/// a foreign VMM's vCPU threads, `deadline-aware`'s repayment by pausing comes to that), or
/// `<driver>/nocap` (that driver without the host-wide cap, see [`policy_cap`]), or
/// `<driver>/unpaid` (boosts paid back only after a throttle, at nice 5: `repay_on=throttle
/// repay=nice:5`, `deadline-aware`'s default until it paid back every boost); any of them
/// followed by driver options, each after a `+` (`deadline-aware+repay=nice:19`: the
/// `daemon`'s go to the daemon's driver, see [`daemon_options`], its in-VMM driver is `none`).
/// [`check_policy`] validates a name.
pub fn policy_driver(name: &str) -> (String, DriverOptions) {
    let base = policy_base(name);
    let (driver, opts) = match base.split_once('/') {
        Some((driver, "slice")) => (
            driver.into(),
            DriverOptions::new().set("class", "slice:100us"),
        ),
        Some((driver, "unpaid")) => (
            driver.into(),
            DriverOptions::new()
                .set("repay_on", "throttle")
                .set("repay", "nice:5"),
        ),
        Some((driver, "nocap")) => (driver.into(), DriverOptions::new()),
        Some((driver, "nice")) => (
            driver.into(),
            DriverOptions::new().set(
                "repay",
                &pvsched_policy::BoostClass::Nice(pvsched_policy::PAUSE_FALLBACK_NICE).to_string(),
            ),
        ),
        _ if base == "daemon" => return ("none".into(), DriverOptions::new()),
        _ => (base.into(), DriverOptions::new()),
    };
    (driver, with_extra_options(name, opts))
}

/// The option of a bench policy name that is not a driver's: `+engine=fifo|deadline`, how
/// the engine thread (or the `daemon` column's engine) outranks the boosted vCPUs, so that
/// both can run side by side.
const ENGINE_KEY: &str = "engine";

/// `opts` with the driver options after each `+` of `name` (a later one wins).
fn with_extra_options(name: &str, opts: DriverOptions) -> DriverOptions {
    name.split('+')
        .skip(1)
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| *k != ENGINE_KEY)
        .fold(opts, |o, (k, v)| o.set(k, v))
}

/// How the engine thread of bench policy `name` outranks the vCPUs it boosts: its
/// `+engine=` option (a later one wins), else the default.
pub fn policy_engine_class(name: &str) -> Result<EngineClass, String> {
    extra_option(name, ENGINE_KEY).map_or(Ok(EngineClass::default()), |v| {
        v.parse().map_err(|e| format!("bench policy `{name}`: {e}"))
    })
}

/// The value of the last `+key=value` of bench policy `name` with this key.
fn extra_option<'a>(name: &'a str, key: &str) -> Option<&'a str> {
    name.split('+')
        .skip(1)
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| *k == key)
        .last()
        .map(|(_, v)| v)
}

/// The driver options of the `daemon` column's daemon (its driver is `dynamic`).
pub fn daemon_options(name: &str) -> Option<DriverOptions> {
    (policy_base(name) == "daemon").then(|| with_extra_options(name, DriverOptions::new()))
}

/// Checks a bench policy name: a known column ([`POLICIES`]), and options after `+` that its
/// driver accepts. The error says which part is wrong.
pub fn check_policy(name: &str) -> Result<(), String> {
    let base = policy_base(name);
    if !POLICIES.contains(&base) {
        return Err(format!(
            "unknown bench policy `{base}` (known: {}; driver options follow a `+`, e.g. \
             deadline-aware+repay=nice:19)",
            POLICIES.join(", ")
        ));
    }
    if let Some(bad) = name.split('+').skip(1).find(|kv| {
        kv.split_once('=')
            .is_none_or(|(k, v)| k.is_empty() || v.is_empty())
    }) {
        return Err(format!(
            "bench policy `{name}`: `{bad}` is not a driver option (key=value)"
        ));
    }
    policy_engine_class(name)?;
    let (driver, opts) = match daemon_options(name) {
        Some(opts) => ("dynamic".into(), opts),
        None => policy_driver(name),
    };
    pvsched_policy::Registry::builtin()
        .create(&driver, &opts)
        .map(drop)
        .map_err(|e| format!("bench policy `{name}`: {}", pvsched_host::error_chain(&e)))
}

/// The host-wide cap a bench policy runs with: the default (host CPUs − 1) for pvsched's
/// drivers; none for `static` (the RFC's static-RT reference: every vCPU real-time) and for
/// `<driver>/nocap`.
pub fn policy_cap(name: &str) -> Option<usize> {
    let base = policy_base(name);
    (base != "static" && !base.ends_with("/nocap")).then(pvsched_host::runtime::default_max_boosted)
}

/// Deadline-task periods (RFC audio buffers: 2, 4, 10 ms). vCPU `i` runs period
/// `TASK_PERIODS_MS[(i + round) % 3]` in round `round`, so with as many vCPUs as host CPUs
/// every period is measured in most rounds, under every policy alike.
pub const TASK_PERIODS_MS: [u64; 3] = [2, 4, 10];

/// How the host is loaded in busy cells.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostLoadKind {
    /// pvsched's built-in CPU hogs (one per CPU).
    Builtin,
    /// `stress-ng --cpu <CPUs>` (the RFC's load).
    StressNg,
}

/// Whether the host is loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostState {
    /// No load.
    Idle,
    /// One CPU hog per CPU.
    Busy,
}

/// One cell of the matrix.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CellKey {
    /// Host load.
    pub host: HostState,
    /// Guest busy between timer events.
    pub guest_busy: bool,
    /// The guest runs its deadline task (off: the RFC's cyclictest-only setting).
    #[serde(default = "yes")]
    pub task: bool,
    /// Policy driver.
    pub policy: String,
    /// Latency-probe interval, µs.
    pub interval_us: u64,
}

fn yes() -> bool {
    true
}

impl CellKey {
    /// A short label for progress output.
    pub fn label(&self) -> String {
        format!(
            "{} host, {} guest{}, {} µs, {}",
            match self.host {
                HostState::Idle => "idle",
                HostState::Busy => "busy",
            },
            if self.guest_busy { "busy" } else { "idle" },
            if self.task { "" } else { " without task" },
            self.interval_us,
            self.policy
        )
    }
}

/// What to run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BenchConfig {
    /// Duration of each cell.
    pub cell_duration: Duration,
    /// Rounds over the whole matrix.
    pub rounds: usize,
    /// vCPUs per VM (one deadline task each, periods from [`TASK_PERIODS_MS`]); as many as
    /// host CPUs, like the RFC's 4-vCPU guest on a 4-CPU host.
    pub vcpus: usize,
    /// Host load in busy cells.
    pub host_load: HostLoadKind,
    /// CPU hogs (or stress-ng workers) in busy cells.
    pub hogs: usize,
    /// Probe intervals.
    pub intervals_us: Vec<u64>,
    /// Policies.
    pub policies: Vec<String>,
    /// Where every cell's vCPU threads and hogs may run.
    #[serde(default)]
    pub layout: crate::experiment::Layout,
    /// The guest is busy between timer events (the default); false: it halts between them,
    /// so its vCPU threads sleep and wake like those of a mostly idle guest.
    #[serde(default = "yes")]
    pub guest_busy: bool,
}

impl BenchConfig {
    /// The default run: 3 rounds × 58 cells × 5 s (about 16 minutes).
    pub fn standard(cpus: usize) -> Self {
        BenchConfig {
            cell_duration: Duration::from_secs(5),
            rounds: 3,
            vcpus: cpus.max(1),
            host_load: HostLoadKind::Builtin,
            hogs: cpus.max(1),
            intervals_us: vec![500, 1000],
            policies: POLICIES.iter().map(|s| s.to_string()).collect(),
            layout: Default::default(),
            guest_busy: true,
        }
    }

    /// `--quick`: three rounds of 0.5 s cells (about a minute).
    pub fn quick(cpus: usize) -> Self {
        BenchConfig {
            cell_duration: Duration::from_millis(500),
            ..Self::standard(cpus)
        }
    }

    /// The cells of one round, in run order: per interval, per host state, with and without
    /// the deadline task, the policies side by side; then the floor (idle host, idle guest,
    /// no boosting) per interval, unless the guest idles in every cell (the idle-host `none`
    /// cell is the floor then).
    pub fn plan(&self) -> Vec<CellKey> {
        let mut cells = Vec::new();
        for &interval_us in &self.intervals_us {
            for host in [HostState::Busy, HostState::Idle] {
                for task in [true, false] {
                    for p in &self.policies {
                        cells.push(CellKey {
                            host,
                            guest_busy: self.guest_busy,
                            task,
                            policy: p.clone(),
                            interval_us,
                        });
                    }
                }
            }
            if self.guest_busy {
                cells.push(CellKey {
                    host: HostState::Idle,
                    guest_busy: false,
                    task: true,
                    policy: "none".into(),
                    interval_us,
                });
            }
        }
        cells
    }
}

/// CPUs of this host (the denominator of CPU shares).
fn host_cpus() -> f64 {
    std::thread::available_parallelism().map_or(1, |n| n.get()) as f64
}

/// Errors of a bench run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A cell failed.
    #[error("cell {cell}")]
    Cell {
        /// The cell.
        cell: String,
        /// What failed.
        #[source]
        source: experiment::Error,
    },
    /// stress-ng was asked for and could not be started.
    #[error("--host-load stress-ng: cannot run stress-ng (install it, e.g. apt-get install stress-ng, or use the built-in load)")]
    StressNg(#[source] std::io::Error),
    /// Writing the report failed.
    #[error("cannot write the report to {0}")]
    Write(String, #[source] std::io::Error),
    /// Drawing a plot failed.
    #[error("cannot draw {0}: {1}")]
    Plot(String, String),
    /// A run's results could not be read back.
    #[error("cannot read {0}")]
    Read(String, #[source] std::io::Error),
    /// A run's results are not a bench's `results.json`.
    #[error("{0} is not the results.json of a pvsched bench run")]
    Parse(String, #[source] serde_json::Error),
}

/// One cell's runs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CellResult {
    /// The cell.
    pub key: CellKey,
    /// One report per round.
    pub rounds: Vec<Report>,
    /// Stress-ng bogo-ops/s per round, when stress-ng was the load.
    pub stress_ng_ops: Vec<Option<f64>>,
}

/// Everything a bench run produced.
pub struct BenchOutcome {
    /// Configuration.
    pub config: BenchConfig,
    /// Cells in plan order.
    pub cells: Vec<CellResult>,
    /// Latency histograms per cell (all vCPUs, all rounds), same order.
    pub hists: Vec<LatencyHistogram>,
    /// True when interrupted.
    pub interrupted: bool,
    /// Wall time.
    pub elapsed: Duration,
}

fn experiment_config(cfg: &BenchConfig, key: &CellKey, round: usize) -> ExperimentConfig {
    let interval = Duration::from_micros(key.interval_us);
    let base = policy_base(&key.policy);
    let task_by_vcpu = (0..cfg.vcpus)
        .filter(|_| key.task)
        .map(|i| {
            let ms = TASK_PERIODS_MS[(i + round) % TASK_PERIODS_MS.len()];
            Some(TaskConfig {
                period: Duration::from_millis(ms),
                // 12.5 % of the period, as the default 250 µs of 2 ms.
                work: Duration::from_micros(ms * 125),
            })
        })
        .collect();
    ExperimentConfig {
        vm: VmConfig {
            vcpus: cfg.vcpus,
            guest: GuestConfig {
                interval,
                busy: key.guest_busy,
                task: if key.task {
                    GuestConfig::default().task
                } else {
                    None
                },
                // `v3-default`'s guest speaks the v3 page; every other column's protocol v1.
                pv_offer: if base == "v3-default" {
                    pvsched_vmm::V3_PV_OFFER
                } else {
                    GuestConfig::default().pv_offer
                },
                ..GuestConfig::default()
            },
            pv: Some(PvConfig::default()),
        },
        duration: cfg.cell_duration,
        host_load: if key.host == HostState::Busy && cfg.host_load == HostLoadKind::Builtin {
            cfg.hogs
        } else {
            0
        },
        vcpu_sched: None,
        probe_interval: interval,
        policy: {
            let (driver, opts) = policy_driver(&key.policy);
            PolicyConfig {
                driver,
                opts,
                quiet_gate: Some(QuietGate::default()),
                max_boosted: policy_cap(&key.policy),
                // Checked with the policy names.
                engine_class: policy_engine_class(&key.policy).unwrap_or_default(),
            }
        },
        // The guest speaks the protocol: its vCPU threads see its requests at their exits.
        // Tracepoints are the daemon's (host-only) column, and `v3-default`'s: it deboosts a
        // halted guest to SCHED_IDLE, which only the timer's expiry lifts in time on a busy
        // host (as `pvsched vm --host-events auto` does).
        host_events: (base == "v3-default").then(pvsched_host::trace::TraceConfig::default),
        task_by_vcpu,
        external_daemon: daemon_options(&key.policy),
        memory_file: None,
        layout: cfg.layout,
    }
}

/// A running stress-ng (killed on drop if not stopped).
pub(crate) struct StressNg(Option<Child>);

impl StressNg {
    pub(crate) fn start(workers: usize) -> Result<StressNg, BenchError> {
        let child = Command::new("stress-ng")
            .args([
                "--cpu",
                &workers.to_string(),
                "--metrics-brief",
                "--timeout",
                "3600s",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(BenchError::StressNg)?;
        // Let the workers start.
        std::thread::sleep(Duration::from_millis(300));
        Ok(StressNg(Some(child)))
    }

    /// Stops it (SIGINT, so it prints its metrics) and returns its bogo-ops/s.
    pub(crate) fn stop(mut self) -> Option<f64> {
        let child = self.0.take()?;
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let out = child.wait_with_output().ok()?;
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        parse_stress_ng_ops(&text)
    }
}

impl Drop for StressNg {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Bogo-ops/s (real time) of the `cpu` stressor in `stress-ng --metrics-brief` output.
pub fn parse_stress_ng_ops(text: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.contains(" cpu ") && !l.contains("stressor"))
        .and_then(|l| {
            let nums: Vec<f64> = l
                .split_whitespace()
                .filter_map(|w| w.parse::<f64>().ok())
                .collect();
            // bogo ops, real time, usr time, sys time, bogo ops/s (real), ...
            nums.get(4).copied()
        })
}

/// Runs the matrix. `progress(done, total, next cell)` is called before each cell.
pub fn run(
    cfg: &BenchConfig,
    interrupt: &AtomicBool,
    progress: &mut dyn FnMut(usize, usize, &CellKey),
) -> Result<BenchOutcome, BenchError> {
    let plan = cfg.plan();
    let total = plan.len() * cfg.rounds;
    let mut cells: Vec<CellResult> = plan
        .iter()
        .map(|k| CellResult {
            key: k.clone(),
            rounds: Vec::new(),
            stress_ng_ops: Vec::new(),
        })
        .collect();
    let mut hists: Vec<LatencyHistogram> = plan.iter().map(|_| LatencyHistogram::new()).collect();
    let started = Instant::now();
    let mut done = 0;
    let mut interrupted = false;
    'rounds: for round in 0..cfg.rounds {
        for (i, key) in plan.iter().enumerate() {
            if interrupt.load(Ordering::Relaxed) {
                interrupted = true;
                break 'rounds;
            }
            progress(done, total, key);
            let stress = match (key.host, cfg.host_load) {
                (HostState::Busy, HostLoadKind::StressNg) => Some(StressNg::start(cfg.hogs)?),
                _ => None,
            };
            let out = experiment::run(&experiment_config(cfg, key, round), interrupt).map_err(
                |source| BenchError::Cell {
                    cell: key.label(),
                    source,
                },
            )?;
            let ops = stress.and_then(StressNg::stop);
            if out.report.interrupted {
                interrupted = true;
                break 'rounds;
            }
            for h in &out.vcpu_hists {
                hists[i].merge(h);
            }
            cells[i].rounds.push(out.report);
            cells[i].stress_ng_ops.push(ops);
            done += 1;
        }
    }
    progress(done, total, &plan[0]);
    Ok(BenchOutcome {
        config: cfg.clone(),
        cells,
        hists,
        interrupted,
        elapsed: started.elapsed(),
    })
}

/// Median and spread of one metric over rounds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Stat {
    /// Median.
    pub median: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
    /// Number of rounds.
    pub n: usize,
}

impl Stat {
    /// Of a set of values (empty: all zero).
    pub fn of(values: &[f64]) -> Stat {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return Stat::default();
        }
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Stat {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        }
    }
}

/// The metrics of one cell, aggregated over rounds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CellSummary {
    /// Guest wake-up latency avg, µs.
    pub guest_avg: Stat,
    /// p50.
    pub guest_p50: Stat,
    /// p99.
    pub guest_p99: Stat,
    /// max.
    pub guest_max: Stat,
    /// Host probe avg, µs.
    pub probe_avg: Stat,
    /// Host probe max.
    pub probe_max: Stat,
    /// Glitch percentage per task period (ms, stat).
    pub glitch_pct: Vec<(u64, Stat)>,
    /// Host load throughput (hog units/s or stress-ng bogo-ops/s).
    pub load_throughput: Stat,
    /// vCPU time boosted, %.
    pub boosted_pct: Stat,
    /// Boosts per second (all vCPUs).
    pub boosts_per_s: Stat,
    /// Throttles per run.
    pub throttles: Stat,
    /// Boost decision → applied p99, µs.
    pub applied_p99: Stat,
    /// The engine thread's CPU, % of one core.
    pub engine_cpu_pct: Stat,
    /// Engine thread wake-ups per second.
    pub wakeups_per_s: Stat,
    /// `sched_setattr` calls per second (engine and vCPU threads).
    pub setattr_per_s: Stat,
    /// Probe periods skipped because the guest was already past them, % of periods.
    pub overrun_pct: Stat,
    /// CPU time of the VM's vCPU threads, % of the machine (all host CPUs).
    #[serde(default)]
    pub vm_cpu_pct: Stat,
    /// CPU time of the built-in host load, % of the machine (NaN with stress-ng).
    #[serde(default)]
    pub load_cpu_pct: Stat,
    /// Samples in which two vCPU threads were on the same host CPU, %.
    #[serde(default)]
    pub vcpus_sharing_cpu_pct: Stat,
    /// Samples in which a vCPU thread had a host CPU to itself beside the built-in hogs, %.
    #[serde(default)]
    pub vcpu_alone_pct: Stat,
    /// The fewest latency samples a vCPU took, % of the run's probe periods (a vCPU that fell
    /// behind or was starved).
    #[serde(default)]
    pub fewest_samples_pct: Stat,
}

fn metric(rounds: &[Report], f: impl Fn(&Report) -> f64) -> Stat {
    Stat::of(&rounds.iter().map(f).collect::<Vec<_>>())
}

/// Aggregates one cell.
pub fn summarize(c: &CellResult) -> CellSummary {
    let r = &c.rounds;
    let mut periods: Vec<u64> = r
        .iter()
        .flat_map(|rep| rep.per_vcpu.iter())
        .filter_map(|v| {
            v.task
                .as_ref()
                .map(|t| (t.period_us / 1000.0).round() as u64)
        })
        .collect();
    periods.sort_unstable();
    periods.dedup();
    let glitch_pct = periods
        .into_iter()
        .map(|ms| {
            let s = metric(r, |rep| {
                let (g, j) = rep
                    .per_vcpu
                    .iter()
                    .filter_map(|v| v.task.as_ref())
                    .filter(|t| (t.period_us / 1000.0).round() as u64 == ms)
                    .fold((0u64, 0u64), |(g, j), t| {
                        // A missed job is a glitch too.
                        (g + t.glitches + t.missed, j + t.jobs + t.missed)
                    });
                if j > 0 {
                    g as f64 / j as f64 * 100.0
                } else {
                    f64::NAN
                }
            });
            (ms, s)
        })
        .collect();
    let load = if c.stress_ng_ops.iter().any(Option::is_some) {
        Stat::of(
            &c.stress_ng_ops
                .iter()
                .flatten()
                .copied()
                .collect::<Vec<_>>(),
        )
    } else {
        metric(r, |rep| {
            rep.host_hogs.as_ref().map_or(f64::NAN, |h| h.units_per_sec)
        })
    };
    CellSummary {
        guest_avg: metric(r, |x| x.latency.avg_us),
        guest_p50: metric(r, |x| x.latency.p50_us),
        guest_p99: metric(r, |x| x.latency.p99_us),
        guest_max: metric(r, |x| x.latency.max_us),
        probe_avg: metric(r, |x| x.host_probe.avg_us),
        probe_max: metric(r, |x| x.host_probe.max_us),
        glitch_pct,
        load_throughput: load,
        boosted_pct: metric(r, |x| {
            let boosted: f64 = x.policy.per_vcpu.iter().map(|p| p.boosted_ms).sum();
            x.boosted_pct(boosted) / x.per_vcpu.len().max(1) as f64
        }),
        fewest_samples_pct: metric(r, |x| x.fewest_samples_pct().unwrap_or(f64::NAN)),
        boosts_per_s: metric(r, |x| {
            x.policy
                .per_vcpu
                .iter()
                .map(|p| p.boosts as f64)
                .sum::<f64>()
                / x.elapsed_s.max(1e-9)
        }),
        throttles: metric(r, |x| {
            x.policy.per_vcpu.iter().map(|p| p.throttles as f64).sum()
        }),
        applied_p99: metric(r, |x| x.policy.boost_latency.p99_us),
        engine_cpu_pct: metric(r, |x| x.policy.cost.engine_cpu_percent),
        wakeups_per_s: metric(r, |x| x.policy.cost.wakeups_per_s),
        setattr_per_s: metric(r, |x| x.policy.cost.setattr_per_s),
        vm_cpu_pct: metric(r, |x| {
            let cpu: f64 = x.per_vcpu.iter().map(|v| v.cpu_s).sum();
            cpu / (x.elapsed_s.max(1e-9) * host_cpus()) * 100.0
        }),
        load_cpu_pct: metric(r, |x| {
            x.host_hogs.as_ref().map_or(f64::NAN, |h| {
                h.cpu_s / (h.wall_s.max(1e-9) * host_cpus()) * 100.0
            })
        }),
        vcpus_sharing_cpu_pct: metric(r, |x| x.vcpus_sharing_cpu_pct.unwrap_or(f64::NAN)),
        vcpu_alone_pct: metric(r, |x| x.vcpu_alone_pct.unwrap_or(f64::NAN)),
        overrun_pct: metric(r, |x| {
            let (n, o) = x.per_vcpu.iter().fold((0u64, 0u64), |(n, o), v| {
                (n + v.latency.count, o + v.overruns)
            });
            if n + o > 0 {
                o as f64 / (n + o) as f64 * 100.0
            } else {
                f64::NAN
            }
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_median_and_spread() {
        let s = Stat::of(&[3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        assert_eq!(Stat::of(&[1.0, 2.0, f64::NAN, 4.0, 10.0]).median, 3.0);
        assert_eq!(Stat::of(&[]), Stat::default());
    }

    #[test]
    fn plan_interleaves_policies_and_adds_floor_cells() {
        let c = BenchConfig::standard(2);
        let p = c.plan();
        let n = POLICIES.len();
        assert_eq!(p.len(), 2 * (2 * 2 * n + 1));
        assert_eq!(
            p[..n].iter().map(|k| k.policy.as_str()).collect::<Vec<_>>(),
            POLICIES
        );
        assert!(p
            .iter()
            .all(|k| k.guest_busy || (k.policy == "none" && k.host == HostState::Idle)));
        assert_eq!(p.iter().filter(|k| !k.task).count(), 2 * 2 * n);
        let mut sorted = p.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), p.len(), "cells are distinct");
    }

    #[test]
    fn a_halting_guest_runs_in_every_cell_and_its_idle_host_none_cells_are_the_floor() {
        let cfg = BenchConfig {
            guest_busy: false,
            ..BenchConfig::standard(2)
        };
        let p = cfg.plan();
        let n = POLICIES.len();
        assert_eq!(p.len(), 2 * 2 * 2 * n, "no separate floor cells");
        assert!(p.iter().all(|k| !k.guest_busy));
        let mut sorted = p.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), p.len(), "cells are distinct");
        // An older results.json (no `guest_busy`) reads as a busy guest.
        let mut json = serde_json::to_value(BenchConfig::standard(2)).unwrap();
        json.as_object_mut().unwrap().remove("guest_busy");
        let back: BenchConfig = serde_json::from_value(json).unwrap();
        assert!(back.guest_busy);
    }

    #[test]
    fn experiment_config_gives_each_vcpu_its_task() {
        let c = BenchConfig::quick(2);
        let key = c.plan()[1].clone();
        let periods = |round| {
            let e = experiment_config(&c, &key, round);
            assert_eq!(e.vm.vcpus, 2);
            (0..2)
                .map(|i| e.task_of(i).unwrap().period.as_millis() as u64)
                .collect::<Vec<_>>()
        };
        assert_eq!(periods(0), [2, 4]);
        assert_eq!(periods(1), [4, 10]);
        assert_eq!(periods(2), [10, 2], "over 3 rounds every period runs twice");
        let e = experiment_config(&c, &key, 0);
        assert_eq!(e.task_of(1).unwrap().work, Duration::from_micros(500));
        assert_eq!(e.host_load, 2, "busy host cell");
        assert!(
            e.host_events.is_none(),
            "tracepoints only in the daemon column"
        );
    }

    #[test]
    fn policy_names_map_to_driver_options() {
        let (d, o) = policy_driver("deadline-aware/unpaid");
        assert_eq!(d, "deadline-aware");
        assert_eq!(
            (o.get("repay_on"), o.get("repay")),
            (Some("throttle"), Some("nice:5"))
        );
        assert_eq!(
            policy_cap("deadline-aware/unpaid"),
            policy_cap("deadline-aware")
        );
        let (d, o) = policy_driver("deadline-aware/nice");
        assert_eq!(
            (d.as_str(), o.get("repay")),
            ("deadline-aware", Some("nice:10"))
        );
        let (d, o) = policy_driver("deadline-aware/slice");
        assert_eq!(
            (d.as_str(), o.get("class")),
            ("deadline-aware", Some("slice:100us"))
        );
        let (d, o) = policy_driver("deadline-aware");
        assert_eq!((d.as_str(), o.get("repay")), ("deadline-aware", None));
        assert_eq!(policy_driver("daemon").0, "none");
        assert_eq!(policy_cap("deadline-aware/nocap"), None);
        // Options after `+` add to (or override) the column's.
        let (d, o) = policy_driver("deadline-aware/unpaid+repay=nice:19+lead=50us");
        assert_eq!(
            (d.as_str(), o.get("repay_on"), o.get("repay"), o.get("lead")),
            (
                "deadline-aware",
                Some("throttle"),
                Some("nice:19"),
                Some("50us")
            )
        );
        assert_eq!(policy_cap("deadline-aware/nocap+lead=50us"), None);
        assert_eq!(policy_cap("static+class=fifo:5"), None);
        assert!(policy_cap("deadline-aware+lead=50us").is_some());
        assert_eq!(daemon_options("deadline-aware"), None);
        assert_eq!(
            policy_driver("daemon+irq_hold=100us").1,
            DriverOptions::new()
        );
        assert_eq!(
            daemon_options("daemon+irq_hold=100us")
                .and_then(|o| o.get("irq_hold").map(String::from)),
            Some("100us".to_string())
        );
    }

    #[test]
    fn bench_policy_names_are_checked() {
        for ok in [
            "deadline-aware",
            "deadline-aware+repay=nice:19",
            "deadline-aware/nocap+lead=50us+repay=off",
            "dynamic+repay_on=boost",
            "daemon+irq_hold=100us",
            "static+class=fifo:5",
            "deadline-aware+engine=deadline",
            "daemon+engine=fifo+irq_hold=100us",
            "deadline-aware/nice",
            "deadline-aware+repay=pause:100us",
            "daemon+repay=pause:100us",
        ] {
            assert_eq!(check_policy(ok), Ok(()), "{ok}");
        }
        let err = |name: &str| check_policy(name).unwrap_err();
        assert!(
            err("fast").contains("unknown bench policy `fast`"),
            "{}",
            err("fast")
        );
        assert!(err("deadline-aware/fast").contains("unknown bench policy"));
        assert!(err("deadline-aware+lead").contains("`lead` is not a driver option"));
        assert!(err("deadline-aware+=5").contains("not a driver option"));
        assert!(err("deadline-aware+repay=pause:11ms").contains("pause:<10us-10ms>"));
        assert!(err("deadline-aware+repay=pause:soon").contains("pause:<10us-10ms>"));
        // The driver's own validation, with its reason.
        let e = err("deadline-aware+bogus=1");
        assert!(e.contains("bogus"), "{e}");
        let e = err("deadline-aware+repay=nice:99");
        assert!(
            e.contains("deadline-aware+repay=nice:99") && e.contains("nice"),
            "{e}"
        );
        assert!(err("none+class=fifo:5").contains("class"));
        let e = err("deadline-aware+engine=rt");
        assert!(e.contains("engine class `rt`"), "{e}");
    }

    #[test]
    fn the_engine_class_is_a_bench_option_not_a_drivers() {
        assert_eq!(policy_engine_class("deadline-aware"), Ok(EngineClass::Fifo));
        assert_eq!(
            policy_engine_class("deadline-aware+engine=deadline+lead=30us"),
            Ok(EngineClass::Deadline)
        );
        let (_, o) = policy_driver("deadline-aware+engine=deadline+lead=30us");
        assert_eq!((o.get("engine"), o.get("lead")), (None, Some("30us")));
        assert_eq!(
            daemon_options("daemon+engine=deadline"),
            Some(DriverOptions::new())
        );
    }

    #[test]
    fn stress_ng_metrics_parse() {
        let out = "stress-ng: info:  [123] stressor       bogo ops real time  usr time  sys time   bogo ops/s     bogo ops/s\nstress-ng: info:  [123]                           (secs)    (secs)    (secs)   (real time) (usr+sys time)\nstress-ng: info:  [123] cpu               12345      5.00      9.90      0.01      2469.00       1245.71\n";
        assert_eq!(parse_stress_ng_ops(out), Some(2469.0));
        assert_eq!(parse_stress_ng_ops("nothing"), None);
    }
}
