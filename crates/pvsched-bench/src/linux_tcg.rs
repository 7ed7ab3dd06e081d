//! `pvsched bench --guest linux-tcg`: a real Linux guest under QEMU without KVM (TCG), built by
//! `guest/linux/build.sh`, running cyclictest; cells idle / `stress-ng` host × `none` /
//! `static` (the `CPU n/TCG` threads at FIFO 10 for the whole run) / `daemon` (pvsched's
//! daemon on the QEMU process, host-only: `sched_waking` of the vCPU threads) / `slice` (the
//! daemon on the QEMU process with driver `static`, class `slice:100us`: the vCPU threads on
//! an EEVDF custom slice for the whole run, no host events) / `module` (the
//! daemon as the server of an `ivshmem-doorbell` device, the guest loading the pvsched guest
//! module, no host events) / `module/slice` (the same, the vCPU threads on that slice between
//! boosts: the daemon's `--base-slice 100us`) / `module/deadline` (the daemon serving the
//! module with driver `deadline-aware`: the module publishes its RT tasks' next timer expiry
//! and the daemon boosts the vCPU thread just before it) / `slice/vmm` (`slice`, and QEMU's main
//! thread, which runs the guest's timers under TCG, on the same custom slice: the daemon's
//! `--vmm-slice`) / `module/vmm` (`module/deadline` with both slices: `--base-slice` and
//! `--vmm-slice`), interleaved round by round like the testbed bench. A guest whose
//! kernel hangs before it starts `/init` (seen under TCG here, before any pvsched code ran in
//! the guest) is killed after [`BOOT_LIMIT`] and its cell run again, once; the report counts
//! such runs. A hang after that (the module loads in `/init`) is not retried: it fails the
//! bench, showing the end of the console.

use crate::bench::{BenchError, Stat, StressNg};
use crate::external::{ExternalDaemon, Slices};
use pvsched_host::sched::{SchedClass, SchedGuard};
use pvsched_policy::DriverOptions;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The policies of the Linux-guest bench.
pub const TCG_POLICIES: &[&str] = &[
    "none",
    "static",
    "daemon",
    "slice",
    "module",
    "module/slice",
    "module/deadline",
    "slice/vmm",
    "module/vmm",
    "daemon/vmm",
];

/// The custom slice of the `slice` column's class and of the `module/slice` column's base, ns:
/// the shortest the kernel takes.
pub const SLICE_NS: u64 = 100_000;

/// True for the columns only this bench has (the testbed bench refuses them by name).
pub fn tcg_only(policy: &str) -> bool {
    matches!(
        policy,
        "slice"
            | "module"
            | "module/slice"
            | "module/deadline"
            | "slice/vmm"
            | "module/vmm"
            | "daemon/vmm"
    )
}

/// How long a guest's kernel may take to start `/init` (which prints [`INIT_MARK`] first).
/// Boots take well under a minute here, also under stress-ng; a kernel still booting after
/// this has hung.
pub const BOOT_LIMIT: Duration = Duration::from_secs(90);
/// What every line the guest's `/init` prints starts with (its first, before it loads the
/// module: `pvsched-guest: init`).
pub const INIT_MARK: &str = "pvsched-guest:";
/// How many times a cell whose guest hung before `/init` is run again.
pub const BOOT_RETRIES: u64 = 1;

/// What to run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinuxTcgConfig {
    /// The guest kernel (`target/linux-guest/vmlinuz`).
    pub kernel: PathBuf,
    /// Its initramfs (`target/linux-guest/initramfs.gz`).
    pub initrd: PathBuf,
    /// Rounds over the cells.
    pub rounds: usize,
    /// cyclictest's duration per cell, s.
    pub duration_s: u32,
    /// cyclictest's interval, µs.
    pub interval_us: u32,
    /// Guest CPUs (one cyclictest thread each).
    pub cpus: usize,
    /// Policies, `none` first.
    pub policies: Vec<String>,
    /// Host states: `false` idle, `true` `stress-ng --cpu <host CPUs>`.
    pub busy: Vec<bool>,
    /// Driver options of the daemon in the `daemon` and `module` columns (`key=value`;
    /// default: none, the driver's defaults).
    #[serde(default)]
    pub daemon_opts: Vec<String>,
}

impl LinuxTcgConfig {
    /// The default matrix for `cpus` host CPUs, with the guest files in `dir`.
    pub fn standard(dir: PathBuf, cpus: usize) -> LinuxTcgConfig {
        LinuxTcgConfig {
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initramfs.gz"),
            rounds: 2,
            duration_s: 10,
            interval_us: 1000,
            cpus: cpus.max(1),
            policies: TCG_POLICIES.iter().map(|s| s.to_string()).collect(),
            busy: vec![true, false],
            daemon_opts: Vec::new(),
        }
    }

    /// The kernel command line that makes the guest's /init run cyclictest (after loading
    /// the pvsched guest module with `module`).
    pub fn append(&self, module: bool) -> String {
        format!(
            "console=ttyS0 quiet tsc=reliable pvsched.module={} pvsched.ct=-m,-q,-p,80,--policy=fifo,-t,{},-a,-d,0,-i,{},-D,{}",
            u8::from(module), self.cpus, self.interval_us, self.duration_s
        )
    }
}

/// One cyclictest thread's line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CyclicThread {
    /// Thread index.
    pub thread: u32,
    /// Loops done (`C:`).
    pub count: u64,
    /// Minimum, µs.
    pub min_us: u64,
    /// Average, µs.
    pub avg_us: u64,
    /// Maximum, µs.
    pub max_us: u64,
}

/// The `T: <n> (...) P:.. I:.. C: .. Min: .. Act: .. Avg: .. Max: ..` lines of cyclictest's
/// quiet output (`-q`), wherever they are in `text` (the guest's serial console).
pub fn parse_cyclictest(text: &str) -> Vec<CyclicThread> {
    let field = |l: &str, key: &str| -> Option<u64> {
        let at = l.find(key)? + key.len();
        l[at..].split_whitespace().next()?.parse().ok()
    };
    text.lines()
        .filter_map(|l| {
            let l = &l[l.find("T:")?..];
            Some(CyclicThread {
                thread: field(l, "T:")? as u32,
                count: field(l, "C:")?,
                min_us: field(l, "Min:")?,
                avg_us: field(l, "Avg:")?,
                max_us: field(l, "Max:")?,
            })
        })
        .collect()
}

/// One run of one cell.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TcgRun {
    /// cyclictest's threads.
    pub threads: Vec<CyclicThread>,
    /// stress-ng bogo-ops/s (real time), busy host only.
    pub stress_ng_ops: Option<f64>,
    /// Boosts the daemon made (`daemon` only).
    pub boosts: u64,
    /// Host events the daemon saw (`daemon` only).
    pub host_events: u64,
    /// The daemon's CPU, % of one core (`daemon` only).
    pub engine_cpu_percent: f64,
    /// Doorbells the guest module rang, as the daemon counted them (`module` only).
    #[serde(default)]
    pub doorbells: u64,
    /// Doorbells the guest module says it rang (its counts on the console, `module` only).
    #[serde(default)]
    pub guest_rings: Option<u64>,
    /// Deadline hints the guest module says it published (`module` columns; 0 unless the
    /// daemon offered them).
    #[serde(default)]
    pub guest_hints: Option<u64>,
    /// vCPU time the daemon kept boosted by boosts it started ahead of a published deadline,
    /// ms (`module/deadline`).
    #[serde(default)]
    pub deadline_boosted_ms: f64,
    /// The end of the guest's console when the module was loaded but its counts are missing
    /// (it failed to load, or the guest did not get to unload it): the report's evidence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console_tail: Option<String>,
    /// Boosts that waited for the host-wide cap (the daemon's `capped`, summed over the vCPUs).
    #[serde(default)]
    pub capped: u64,
    /// Boosts ended to hand a slot of the cap on (`cap_yields`, summed over the vCPUs).
    #[serde(default)]
    pub cap_yields: u64,
    /// Boosts the daemon did not start because the vCPU did not wait for a CPU (the quiet gate).
    #[serde(default)]
    pub skipped_quiet: u64,
}

/// The guest module's `pvsched_guest: total rings N ...` line on the console.
pub fn parse_guest_rings(text: &str) -> Option<u64> {
    let l = text.lines().find_map(|l| {
        let at = l.find("pvsched_guest: total rings ")?;
        Some(&l[at + "pvsched_guest: total rings ".len()..])
    })?;
    l.split_whitespace().next()?.parse().ok()
}

/// The `hints H` of the guest module's `pvsched_guest: total rings ...` line (a module older
/// than deadline hints prints none).
pub fn parse_guest_hints(text: &str) -> Option<u64> {
    let l = text
        .lines()
        .find(|l| l.contains("pvsched_guest: total rings "))?;
    let mut w = l.split_whitespace();
    w.find(|&x| x == "hints")?;
    w.next()?.parse().ok()
}

/// One cell over rounds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TcgCell {
    /// `stress-ng` on the host.
    pub busy: bool,
    /// Policy.
    pub policy: String,
    /// Its runs.
    pub runs: Vec<TcgRun>,
    /// Runs whose guest's kernel hung before `/init` and that were run again.
    #[serde(default)]
    pub boot_retries: u64,
}

/// Errors of the Linux-guest bench.
#[derive(Debug, thiserror::Error)]
pub enum TcgError {
    /// The guest files are missing.
    #[error("{0} is missing: build the guest first with guest/linux/build.sh")]
    NoGuest(PathBuf),
    /// QEMU could not be started.
    #[error("cannot run qemu-system-x86_64 (install QEMU, e.g. apt-get install qemu-system-x86)")]
    Qemu(#[source] std::io::Error),
    /// The guest printed no cyclictest result.
    #[error("the guest printed no cyclictest result; its console ended with: {0}")]
    NoResult(String),
    /// The guest's kernel did not start `/init` within [`BOOT_LIMIT`] (90 s).
    #[error(
        "the guest's kernel did not start /init within 90 s (a boot hang under TCG, see the \
         README); its console ended with: {0}"
    )]
    BootHang(String),
    /// stress-ng or another part of the bench failed.
    #[error(transparent)]
    Bench(#[from] BenchError),
    /// The daemon failed.
    #[error("the daemon")]
    Daemon(#[from] pvsched_daemon::DaemonError),
    /// A daemon option is invalid.
    #[error("invalid daemon option")]
    Option(#[from] pvsched_policy::OptionError),
    /// Setting the static class failed.
    #[error("static class")]
    Sched(#[from] pvsched_host::sched::Error),
}

/// The TCG vCPU threads of process `pid`, found as the daemon finds them.
fn tcg_threads(pid: i32) -> Vec<i32> {
    pvsched_daemon::discover::vcpu_threads(pid)
        .unwrap_or_default()
        .into_iter()
        .filter(|t| t.vmm == pvsched_daemon::discover::Vmm::QemuTcg)
        .map(|t| t.tid)
        .collect()
}

/// Runs one cell once.
fn run_cell(cfg: &LinuxTcgConfig, busy: bool, policy: &str) -> Result<TcgRun, TcgError> {
    let opts = DriverOptions::parse(cfg.daemon_opts.iter().map(String::as_str))?;
    let trace = pvsched_host::trace::TraceConfig {
        waking: true,
        ..pvsched_host::trace::TraceConfig::none()
    };
    // The ivshmem server listens before QEMU connects to it. It boosts on the guest's word
    // alone: with the host-only wake-up source on as well, each module run under stress-ng
    // had a FIFO boost held 50-100 ms (docs: README, "Linux guest").
    let server = match policy {
        "module" | "module/slice" | "module/deadline" | "module/vmm" => {
            Some(ExternalDaemon::start_ivshmem(
                pvsched_host::trace::TraceConfig::none(),
                if matches!(policy, "module/deadline" | "module/vmm") {
                    "deadline-aware"
                } else {
                    "dynamic"
                },
                opts.clone(),
                Slices {
                    base: matches!(policy, "module/slice" | "module/vmm").then_some(SLICE_NS),
                    vmm: (policy == "module/vmm").then_some(SLICE_NS),
                },
            )?)
        }
        _ => None,
    };
    let stress = if busy {
        match StressNg::start(std::thread::available_parallelism().map_or(1, |n| n.get())) {
            Ok(s) => Some(s),
            Err(e) => {
                if let Some(d) = server {
                    d.stop_status();
                }
                return Err(e.into());
            }
        }
    } else {
        None
    };
    let mut qemu = Command::new("qemu-system-x86_64");
    if let Some(d) = &server {
        let mut chardev = std::ffi::OsString::from("socket,id=pvsched,path=");
        chardev.push(d.ivshmem_socket());
        qemu.arg("-chardev")
            .arg(chardev)
            .args(["-device", "ivshmem-doorbell,chardev=pvsched,vectors=1"]);
    }
    let qemu = qemu
        .args(["-accel", "tcg,thread=multi", "-smp", &cfg.cpus.to_string()])
        .args(["-m", "512", "-name", "pvsched-linux,debug-threads=on"])
        .arg("-kernel")
        .arg(&cfg.kernel)
        .arg("-initrd")
        .arg(&cfg.initrd)
        .args(["-append", &cfg.append(server.is_some())])
        .args(["-nographic", "-no-reboot", "-monitor", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn();
    let mut qemu = match qemu {
        Ok(q) => q,
        Err(e) => {
            if let Some(d) = server {
                d.stop_status();
            }
            let _ = stress.and_then(StressNg::stop);
            return Err(TcgError::Qemu(e));
        }
    };
    let pid = qemu.id() as i32;
    let stdout = qemu.stdout.take().expect("piped");
    let started = Arc::new(AtomicBool::new(false));
    let reader = {
        let started = started.clone();
        std::thread::spawn(move || read_console(stdout, &started))
    };
    let mut guards = Vec::new();
    let mut daemon = server;
    let setup = (|| -> Result<(), TcgError> {
        match policy {
            "static" => {
                let t0 = Instant::now();
                let mut tids = tcg_threads(pid);
                while tids.len() < cfg.cpus && t0.elapsed() < Duration::from_secs(10) {
                    std::thread::sleep(Duration::from_millis(20));
                    tids = tcg_threads(pid);
                }
                for t in tids {
                    guards.push(SchedGuard::apply(t, SchedClass::Fifo(10))?);
                }
            }
            "daemon" => {
                daemon = Some(ExternalDaemon::start_for(
                    pvsched_daemon::VmSource::Pid(pid),
                    trace,
                    opts.clone(),
                )?);
            }
            // Host-only, every piece at once: the wake-up boosts of `daemon` between which
            // the vCPU threads sit on the custom slice of `slice`, QEMU's main thread on one
            // too (`slice/vmm`).
            "daemon/vmm" => {
                daemon = Some(ExternalDaemon::start_driver_with_slices(
                    pvsched_daemon::VmSource::Pid(pid),
                    trace,
                    "dynamic",
                    opts.clone(),
                    Slices {
                        base: Some(SLICE_NS),
                        vmm: Some(SLICE_NS),
                    },
                )?);
            }
            "slice" | "slice/vmm" => {
                // The daemon's `--daemon-opt`s are for its `dynamic` driver, not this one.
                daemon = Some(ExternalDaemon::start_driver_with_slices(
                    pvsched_daemon::VmSource::Pid(pid),
                    pvsched_host::trace::TraceConfig::none(),
                    "static",
                    DriverOptions::parse([format!("class=slice:{}us", SLICE_NS / 1000).as_str()])?,
                    Slices {
                        base: None,
                        vmm: (policy == "slice/vmm").then_some(SLICE_NS),
                    },
                )?);
            }
            _ => {}
        }
        Ok(())
    })();
    // The guest powers off after cyclictest; a stuck one is killed (boot + run + margin).
    let limit = BOOT_LIMIT + Duration::from_secs(u64::from(cfg.duration_s) + 30);
    let t0 = Instant::now();
    if setup.is_err() {
        let _ = qemu.kill();
    }
    let mut hung = false;
    while qemu.try_wait().ok().flatten().is_none() {
        let late = t0.elapsed();
        if late > BOOT_LIMIT && !started.load(Ordering::Acquire) {
            hung = true;
            let _ = qemu.kill();
        } else if late > limit {
            let _ = qemu.kill();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = qemu.wait();
    let text = reader.join().unwrap_or_default();
    let status = daemon.map(ExternalDaemon::stop_status);
    for g in guards {
        let _ = g.restore();
    }
    let stress_ng_ops = stress.and_then(StressNg::stop);
    setup?;
    let threads = parse_cyclictest(&text);
    if threads.is_empty() {
        let tail = console_tail(&text, 300);
        return Err(if hung {
            TcgError::BootHang(tail)
        } else {
            TcgError::NoResult(tail)
        });
    }
    // The VM may have been detached already (QEMU gone, or the module unloaded): its last
    // figures are in `detached`.
    let deadline = pvsched_policy::Cause::Deadline.index();
    let mut cap = [0u64; 3];
    let (boosts, host_events, doorbells, cpu, deadline_ms) =
        status.map_or((0, 0, 0, 0.0, 0.0), |s| {
            let vms = || s.vms.iter().chain(&s.detached);
            for c in vms().flat_map(|v| v.vm.vcpus.iter()) {
                cap[0] += c.capped;
                cap[1] += c.cap_yields;
                cap[2] += c.skipped_quiet;
            }
            let boosts = vms()
                .flat_map(|v| v.vm.vcpus.iter())
                .map(|c| c.boosts)
                .sum();
            let deadline_ms = vms()
                .flat_map(|v| v.vm.vcpus.iter())
                .map(|c| c.boosted_by_cause_ms[deadline])
                .sum();
            let events = vms().map(|v| v.vm.host_events).sum();
            let rings = vms().filter_map(|v| v.doorbells).sum();
            (
                boosts,
                events,
                rings,
                s.cost.engine_cpu_percent,
                deadline_ms,
            )
        });
    let guest_rings = parse_guest_rings(&text);
    let module = policy.starts_with("module");
    let console_tail = (module && guest_rings.is_none()).then(|| console_tail(&text, 1500));
    Ok(TcgRun {
        threads,
        stress_ng_ops,
        boosts,
        host_events,
        engine_cpu_percent: cpu,
        doorbells,
        guest_rings,
        guest_hints: parse_guest_hints(&text),
        deadline_boosted_ms: deadline_ms,
        console_tail,
        capped: cap[0],
        cap_yields: cap[1],
        skipped_quiet: cap[2],
    })
}

/// The last `n` characters of a guest console, for an error message.
pub fn console_tail(text: &str, n: usize) -> String {
    if n == 0 {
        return String::new();
    }
    let start = text.char_indices().rev().nth(n - 1).map_or(0, |(i, _)| i);
    text[start..].to_string()
}

/// Reads QEMU's console to its end (lossily: a guest may print anything), setting `started`
/// once the guest's `/init` printed its first line. Never stops early, so QEMU never blocks on a
/// full pipe.
fn read_console(stdout: impl std::io::Read, started: &AtomicBool) -> String {
    let mut r = BufReader::new(stdout);
    let mut text = String::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        match r.read_until(b'\n', &mut line) {
            Ok(0) => break,
            Ok(_) => {
                let l = String::from_utf8_lossy(&line);
                if l.contains(INIT_MARK) {
                    started.store(true, Ordering::Release);
                }
                text.push_str(&l);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    text
}

/// Runs `run` until it does not fail with [`TcgError::BootHang`], at most [`BOOT_RETRIES`]
/// more times, calling `again` before each new try. Returns the run and the tries repeated.
fn with_boot_retries(
    mut run: impl FnMut() -> Result<TcgRun, TcgError>,
    mut again: impl FnMut(&TcgError),
) -> Result<(TcgRun, u64), TcgError> {
    let mut retries = 0;
    loop {
        match run() {
            Err(e @ TcgError::BootHang(_)) if retries < BOOT_RETRIES => {
                again(&e);
                retries += 1;
            }
            r => return r.map(|run| (run, retries)),
        }
    }
}

/// Runs the matrix: every cell once per round, in the same order each round. `progress(done,
/// total, label)` is called before each cell. Stops early (returning what ran) when
/// `interrupt` is set.
pub fn run(
    cfg: &LinuxTcgConfig,
    interrupt: &AtomicBool,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<Vec<TcgCell>, TcgError> {
    for f in [&cfg.kernel, &cfg.initrd] {
        if !f.exists() {
            return Err(TcgError::NoGuest(f.clone()));
        }
    }
    let mut cells: Vec<TcgCell> = cfg
        .busy
        .iter()
        .flat_map(|&busy| {
            cfg.policies.iter().map(move |p| TcgCell {
                busy,
                policy: p.clone(),
                runs: Vec::new(),
                boot_retries: 0,
            })
        })
        .collect();
    let total = cells.len() * cfg.rounds;
    let mut done = 0;
    for _ in 0..cfg.rounds {
        for cell in &mut cells {
            if interrupt.load(Ordering::Relaxed) {
                return Ok(cells);
            }
            let label = format!(
                "{} host, {}",
                if cell.busy { "stress-ng" } else { "idle" },
                cell.policy
            );
            progress(done, total, &label);
            let (run, retries) = with_boot_retries(
                || run_cell(cfg, cell.busy, &cell.policy),
                |_| {
                    progress(
                        done,
                        total,
                        &format!("{label} again: the guest hung at boot"),
                    )
                },
            )?;
            if run.console_tail.is_some() {
                progress(
                    done,
                    total,
                    &format!("{label}: the guest module printed no counts (console in the JSON)"),
                );
            }
            cell.runs.push(run);
            cell.boot_retries += retries;
            done += 1;
        }
    }
    Ok(cells)
}

/// The figures of one cell over its runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TcgSummary {
    /// Average latency (mean of the guest threads' averages), µs.
    pub avg_us: Stat,
    /// Worst latency (max over the guest threads), µs.
    pub max_us: Stat,
    /// Wake-ups done, percent of those expected.
    pub done_pct: Stat,
    /// stress-ng bogo-ops/s.
    pub stress_ng_ops: Stat,
    /// Daemon boosts per run.
    pub boosts: Stat,
    /// Daemon host events per run.
    pub host_events: Stat,
}

/// Summarizes `cell` (`expected`: wake-ups per guest thread).
pub fn summarize(cell: &TcgCell, expected: u64) -> TcgSummary {
    let per = |f: &dyn Fn(&TcgRun) -> Option<f64>| -> Stat {
        Stat::of(&cell.runs.iter().filter_map(f).collect::<Vec<_>>())
    };
    let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    TcgSummary {
        avg_us: per(&|r| {
            mean(
                &r.threads
                    .iter()
                    .map(|t| t.avg_us as f64)
                    .collect::<Vec<_>>(),
            )
        }),
        max_us: per(&|r| r.threads.iter().map(|t| t.max_us as f64).reduce(f64::max)),
        done_pct: per(&|r| {
            mean(&r.threads.iter().map(|t| t.count as f64).collect::<Vec<_>>())
                .map(|c| 100.0 * c / expected.max(1) as f64)
        }),
        stress_ng_ops: per(&|r| r.stress_ng_ops),
        boosts: per(&|r| Some(r.boosts as f64)),
        host_events: per(&|r| Some(r.host_events as f64)),
    }
}

/// The markdown report: one table per host state, medians with [min–max] over rounds.
pub fn report(cfg: &LinuxTcgConfig, cells: &[TcgCell], title: &str) -> String {
    let expected = u64::from(cfg.duration_s) * 1_000_000 / u64::from(cfg.interval_us.max(1));
    let f = |s: Stat| {
        if s.n == 0 {
            "–".to_string()
        } else {
            format!("{:.0} [{:.0}–{:.0}]", s.median, s.min, s.max)
        }
    };
    let mut out = format!(
        "# {title}\n\nLinux guest under QEMU TCG (`-smp {}`), cyclictest `-t {} -i {} -D {}` \
         (expected {expected} wake-ups per thread), rounds: {}; medians [min–max] over rounds. \
         `static`: the `CPU n/TCG` threads at FIFO 10; `daemon`: pvsched's daemon on the QEMU \
         process, driver `dynamic` with its defaults, host event `waking` only; `slice`: the \
         daemon on the QEMU process, driver `static` with `class=slice:100us` (the `CPU n/TCG` \
         threads on an EEVDF custom slice of 100 µs, no extra CPU share), no host events; \
         `module`: the \
         daemon serving the VM's `ivshmem-doorbell` device, no host events, the guest running \
         the pvsched guest module (requests at hard and soft interrupts and while an RT task \
         runs); `module/slice`: the same with the vCPU threads on that slice between boosts \
         (`--base-slice 100us`); `module/deadline`: the module with driver `deadline-aware` \
         (the guest publishes its RT tasks' next timer expiry, the daemon boosts ahead of \
         it); `slice/vmm`: `slice` with QEMU's main thread (which runs the guest's timers under \
         TCG) on a custom slice of 100 µs too (`--vmm-slice 100us`); `module/vmm`: \
         `module/deadline` with the vCPU threads' base slice and QEMU's main thread on 100 µs \
         slices; `daemon/vmm`: `daemon`'s wake-up boosts with the vCPU threads on that base \
         slice between them and QEMU's main thread on one too.{}\n",
        cfg.cpus,
        cfg.cpus,
        cfg.interval_us,
        cfg.duration_s,
        cfg.rounds,
        if cfg.daemon_opts.is_empty() {
            String::new()
        } else {
            format!(" Daemon driver options: `{}`.", cfg.daemon_opts.join(" "))
        }
    );
    for busy in &cfg.busy {
        let host = if *busy { "`stress-ng --cpu N`" } else { "idle" };
        out += &format!(
            "\n## Host {host}\n\n| policy | guest avg (µs) | guest max (µs) | wake-ups done (%) | stress-ng ops/s | ops vs none | daemon boosts / host events |\n|---|---|---|---|---|---|---|\n"
        );
        let none = cells
            .iter()
            .find(|c| c.busy == *busy && c.policy == "none")
            .map(|c| summarize(c, expected).stress_ng_ops.median);
        for c in cells.iter().filter(|c| c.busy == *busy) {
            let s = summarize(c, expected);
            let ratio = match none {
                Some(n) if *busy && n > 0.0 && s.stress_ng_ops.n > 0 => {
                    format!("{:.2}", s.stress_ng_ops.median / n)
                }
                _ => "–".into(),
            };
            // Every column but `none` and `static` runs the daemon.
            let daemon = if !matches!(c.policy.as_str(), "none" | "static") {
                format!("{} / {}", f(s.boosts), f(s.host_events))
            } else {
                "–".into()
            };
            out += &format!(
                "| {} | {} | {} | {} | {} | {ratio} | {daemon} |\n",
                c.policy,
                f(s.avg_us),
                f(s.max_us),
                f(s.done_pct),
                if *busy {
                    f(s.stress_ng_ops)
                } else {
                    "–".into()
                },
            );
        }
    }
    let hangs: Vec<String> = cells
        .iter()
        .filter(|c| c.boot_retries > 0)
        .map(|c| {
            let host = if c.busy { "stress-ng" } else { "idle" };
            format!("{host} host, {}: {}", c.policy, c.boot_retries)
        })
        .collect();
    if !hangs.is_empty() {
        out += &format!(
            "\nRuns whose guest's kernel hung before /init (killed after {} s) and were run \
             again: {}.\n",
            BOOT_LIMIT.as_secs(),
            hangs.join("; ")
        );
    }
    out
}

/// `latency-avg.svg`: the guest's average latency per policy, busy and idle host side by
/// side, bars at the median with the rounds' min–max as whiskers.
pub fn plot(
    cfg: &LinuxTcgConfig,
    cells: &[TcgCell],
    path: &std::path::Path,
) -> Result<(), BenchError> {
    use plotters::prelude::*;
    let err =
        |e: &dyn std::fmt::Display| BenchError::Plot(path.display().to_string(), e.to_string());
    let expected = u64::from(cfg.duration_s) * 1_000_000 / u64::from(cfg.interval_us.max(1));
    let sums: Vec<(bool, usize, TcgSummary)> = cells
        .iter()
        .filter_map(|c| {
            let pi = cfg.policies.iter().position(|p| *p == c.policy)?;
            Some((c.busy, pi, summarize(c, expected)))
        })
        .collect();
    let top = sums
        .iter()
        .filter(|(_, _, s)| s.avg_us.n > 0)
        .map(|(_, _, s)| s.avg_us.max)
        .fold(1.0f64, f64::max)
        * 1.15;
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let groups: Vec<bool> = cfg.busy.clone();
    let labels = crate::bench_report::group_labels(
        groups
            .iter()
            .map(|&busy| if busy { "stress-ng host" } else { "idle host" }.to_string())
            .collect(),
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "Linux guest under QEMU TCG: cyclictest average, {} µs interval",
                cfg.interval_us
            ),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..groups.len() as f64, 0f64..top)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(groups.len() * 2 + 1)
        .x_label_formatter(&labels)
        .y_desc("guest avg latency (µs), median and min–max over rounds")
        .draw()
        .map_err(|e| err(&e))?;
    let width = 0.8 / cfg.policies.len().max(1) as f64;
    for (pi, policy) in cfg.policies.iter().enumerate() {
        let color = Palette99::pick(pi).to_rgba();
        let mine: Vec<(f64, Stat)> = sums
            .iter()
            .filter(|(_, p, s)| *p == pi && s.avg_us.n > 0)
            .filter_map(|(busy, _, s)| {
                let g = groups.iter().position(|b| b == busy)?;
                Some((g as f64 + 0.1 + pi as f64 * width, s.avg_us))
            })
            .collect();
        chart
            .draw_series(mine.iter().map(|&(x0, st)| {
                Rectangle::new([(x0, 0.0), (x0 + width * 0.9, st.median)], color.filled())
            }))
            .map_err(|e| err(&e))?
            .label(policy.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
        chart
            .draw_series(mine.iter().map(|&(x0, st)| {
                let x = x0 + width * 0.45;
                PathElement::new(vec![(x, st.min), (x, st.max)], BLACK.stroke_width(2))
            }))
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hang() -> TcgError {
        TcgError::BootHang("cryptomgr_test soft lockup".into())
    }

    #[test]
    fn a_boot_hang_is_run_again_once_and_other_errors_never() {
        // Hangs once, then runs.
        let mut tries = 0;
        let mut agains = 0;
        let (run, retries) = with_boot_retries(
            || {
                tries += 1;
                if tries == 1 {
                    Err(hang())
                } else {
                    Ok(TcgRun::default())
                }
            },
            |e| {
                assert!(matches!(e, TcgError::BootHang(_)));
                agains += 1;
            },
        )
        .unwrap();
        assert_eq!((run, retries, tries, agains), (TcgRun::default(), 1, 2, 1));
        // Hangs twice: the second hang is the error.
        let mut tries = 0;
        let r = with_boot_retries(
            || {
                tries += 1;
                Err(hang())
            },
            |_| {},
        );
        assert!(matches!(r, Err(TcgError::BootHang(_))));
        assert_eq!(tries, 2);
        // Any other failure is not run again.
        let mut tries = 0;
        let r = with_boot_retries(
            || {
                tries += 1;
                Err(TcgError::NoResult("oops".into()))
            },
            |_| {},
        );
        assert!(matches!(r, Err(TcgError::NoResult(_))));
        assert_eq!(tries, 1);
        let msg = hang().to_string();
        // The message spells the limit out.
        assert_eq!(BOOT_LIMIT.as_secs(), 90);
        assert!(msg.contains("did not start /init within 90 s"), "{msg}");
    }

    #[test]
    fn a_console_tail_is_its_last_characters() {
        assert_eq!(console_tail("abcdé", 2), "dé");
        assert_eq!(console_tail("abc", 10), "abc");
        assert_eq!(console_tail("abc", 0), "");
    }

    #[test]
    fn the_console_reader_sees_init_start_and_keeps_bad_bytes() {
        let started = AtomicBool::new(false);
        let text = read_console(&b"Booting\xff\n[ 1.0] x\n"[..], &started);
        assert!(!started.load(Ordering::Acquire));
        assert!(text.contains("Booting\u{fffd}\n[ 1.0] x"), "{text:?}");
        let console =
            b"\x1b[2Jpvsched-guest: init\nT: 0 ( 1) P:80 I:1000 C: 5 Min: 1 Act: 2 Avg: 3 Max: 4\n";
        let text = read_console(&console[..], &started);
        assert!(started.load(Ordering::Acquire));
        assert_eq!(parse_cyclictest(&text).len(), 1);
    }

    #[test]
    fn cyclictest_lines_parse_from_a_console() {
        let text = "Booting from ROM..\x1b[2Jpvsched-guest: cyclictest -m -q\n\
                    # /dev/cpu_dma_latency set to 0us\n\
                    T: 0 (   99) P:80 I:1000 C:   9985 Min:     39 Act:  967 Avg:  197 Max:    3369\n\
                    T: 1 (  100) P:80 I:1000 C:   9987 Min:     42 Act:  260 Avg:  200 Max:    2678\n\
                    pvsched-guest: done\n";
        let t = parse_cyclictest(text);
        assert_eq!(t.len(), 2);
        assert_eq!(
            t[1],
            CyclicThread {
                thread: 1,
                count: 9987,
                min_us: 42,
                avg_us: 200,
                max_us: 2678
            }
        );
        assert!(parse_cyclictest("T: x garbage\nnothing").is_empty());
    }

    #[test]
    fn summaries_and_report() {
        let cfg = LinuxTcgConfig::standard(PathBuf::from("/nonexistent"), 2);
        assert!(cfg.append(false).contains("-i,1000,-D,10"));
        assert!(cfg.append(true).contains("pvsched.module=1"));
        assert_eq!(
            parse_guest_rings("[ 9.1] pvsched_guest: total rings 22916 updates 51490 unbalanced 6"),
            Some(22916)
        );
        assert_eq!(
            parse_guest_rings("pvsched_guest: cpu 0 seq 5 rings 3"),
            None
        );
        assert_eq!(
            parse_guest_hints(
                "pvsched_guest: total rings 53697 updates 117847 unbalanced 19 hints 19481"
            ),
            Some(19481)
        );
        assert_eq!(
            parse_guest_hints("pvsched_guest: total rings 22916 updates 51490 unbalanced 6"),
            None
        );
        let run = |avg: u64, ops: f64| TcgRun {
            threads: vec![
                CyclicThread {
                    thread: 0,
                    count: 9000,
                    avg_us: avg,
                    max_us: 100,
                    ..Default::default()
                },
                CyclicThread {
                    thread: 1,
                    count: 10000,
                    avg_us: avg + 100,
                    max_us: 300,
                    ..Default::default()
                },
            ],
            stress_ng_ops: Some(ops),
            ..Default::default()
        };
        let cells = vec![
            TcgCell {
                busy: true,
                policy: "none".into(),
                runs: vec![run(300, 2000.0), run(500, 2000.0)],
                boot_retries: 0,
            },
            TcgCell {
                busy: true,
                policy: "static".into(),
                runs: vec![run(100, 1000.0)],
                boot_retries: 1,
            },
        ];
        let s = summarize(&cells[0], 10_000);
        assert_eq!(
            (s.avg_us.median, s.avg_us.min, s.avg_us.max),
            (450.0, 350.0, 550.0)
        );
        assert_eq!(s.max_us.median, 300.0);
        assert_eq!(s.done_pct.median, 95.0);
        let r = report(&cfg, &cells, "t");
        assert!(r.contains("| static | 150 [150–150] | 300 [300–300] | 95 [95–95] | 1000 [1000–1000] | 0.50 | – |"), "{r}");
        assert!(
            r.contains(
                "before /init (killed after 90 s) and were run again: stress-ng host, static: 1."
            ),
            "{r}"
        );
        let svg = std::env::temp_dir().join(format!("pvsched-tcg-plot-{}.svg", std::process::id()));
        plot(&cfg, &cells, &svg).unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        let _ = std::fs::remove_file(&svg);
        assert!(
            text.starts_with("<svg") && text.contains("static") && text.contains("stress-ng host"),
            "{text}"
        );
        assert!(matches!(
            run_check(&cfg),
            Err(TcgError::NoGuest(p)) if p.ends_with("vmlinuz")
        ));
    }

    fn run_check(cfg: &LinuxTcgConfig) -> Result<Vec<TcgCell>, TcgError> {
        run(cfg, &AtomicBool::new(false), &mut |_, _, _| {})
    }
}
