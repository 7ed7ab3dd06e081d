//! The files `pvsched bench` writes: `report.md` (tables shaped like the RFC's), `results.json`
//! (every raw figure), and SVG plots (latency CDF per policy, glitches per period).

use crate::bench::{summarize, BenchError, BenchOutcome, CellSummary, HostState, Stat};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};
use std::fmt::Write;
use std::path::{Path, PathBuf};

/// RFC v1's figures (busy host, Intel N4500 4C/4T, 4-vCPU guest, µs), for the report.
pub const RFC_TABLE: &str = "| interval | metric | vanilla | dynamic | static RT |
|---|---|---|---|---|
| 500 µs | guest avg | 887 | 21 | 25 |
| 500 µs | guest max | 216 835 | 13 978 | 1 728 |
| 500 µs | host max | – | 2 114 | 2 447 |
| 1000 µs | guest avg | 6 335 | 45 | 38 |
| 1000 µs | guest max | 199 575 | 70 651 | 1 537 |
| 1000 µs | host max | – | 1 285 | 27 104 |

Audio glitches (busy host, vanilla → patched): 2 ms buffer 1365 → 67, 4 ms 524 → 23, 10 ms 25 → 24.";

fn us(v: f64) -> String {
    if !v.is_finite() {
        return "–".into();
    }
    let r = v.round() as i64;
    let s = r.abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push('\u{202f}');
        }
        out.push(c);
    }
    if r < 0 {
        format!("-{out}")
    } else {
        out
    }
}

fn cell_stat(s: Stat, fmt: &dyn Fn(f64) -> String) -> String {
    if s.n == 0 {
        "–".into()
    } else if s.n == 1 || s.min == s.max {
        fmt(s.median)
    } else {
        format!("{} [{}–{}]", fmt(s.median), fmt(s.min), fmt(s.max))
    }
}

fn pct(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.1} %")
    } else {
        "–".into()
    }
}

fn ratio(a: f64, b: f64) -> String {
    if a.is_finite() && b.is_finite() && b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "–".into()
    }
}

/// The aggregated results, as written to `results.json` next to the raw reports.
#[derive(Serialize)]
struct JsonOut<'a> {
    config: &'a crate::bench::BenchConfig,
    interrupted: bool,
    elapsed_s: f64,
    cells: Vec<JsonCell<'a>>,
}

#[derive(Serialize)]
struct JsonCell<'a> {
    key: &'a crate::bench::CellKey,
    summary: CellSummary,
    rounds: &'a [crate::experiment::Report],
    stress_ng_ops: &'a [Option<f64>],
}

struct View<'a> {
    o: &'a BenchOutcome,
    sums: Vec<CellSummary>,
}

impl View<'_> {
    /// The busy-guest cell with the deadline task.
    fn find(
        &self,
        host: HostState,
        busy: bool,
        policy: &str,
        interval: u64,
    ) -> Option<&CellSummary> {
        self.find_task(host, busy, true, policy, interval)
    }

    fn find_task(
        &self,
        host: HostState,
        busy: bool,
        task: bool,
        policy: &str,
        interval: u64,
    ) -> Option<&CellSummary> {
        // `busy`: a cell of the matrix (its guest as configured), or the floor (idle guest).
        let busy = busy && self.o.config.guest_busy;
        self.o
            .cells
            .iter()
            .position(|c| {
                c.key.host == host
                    && c.key.guest_busy == busy
                    && c.key.task == task
                    && c.key.policy == policy
                    && c.key.interval_us == interval
            })
            .map(|i| &self.sums[i])
    }
}

/// Writes report.md, results.json and the SVG plots into `dir`; returns the files written.
pub fn write(o: &BenchOutcome, dir: &Path, title: &str) -> Result<Vec<PathBuf>, BenchError> {
    std::fs::create_dir_all(dir).map_err(|e| BenchError::Write(dir.display().to_string(), e))?;
    let view = View {
        o,
        sums: o.cells.iter().map(summarize).collect(),
    };
    let mut files = Vec::new();
    let write_file = |name: &str, text: &str, files: &mut Vec<PathBuf>| {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(|e| BenchError::Write(p.display().to_string(), e))?;
        files.push(p);
        Ok::<(), BenchError>(())
    };
    write_file("report.md", &markdown(&view, title), &mut files)?;
    let json = JsonOut {
        config: &o.config,
        interrupted: o.interrupted,
        elapsed_s: o.elapsed.as_secs_f64(),
        cells: o
            .cells
            .iter()
            .zip(&view.sums)
            .map(|(c, s)| JsonCell {
                key: &c.key,
                summary: s.clone(),
                rounds: &c.rounds,
                stress_ng_ops: &c.stress_ng_ops,
            })
            .collect(),
    };
    let text = serde_json::to_string_pretty(&json).expect("results serialize");
    write_file("results.json", &(text + "\n"), &mut files)?;
    // Without the histograms (a report written again from results.json) the CDF plots stay
    // as the run drew them.
    for &interval in o.config.intervals_us.iter().filter(|_| !o.hists.is_empty()) {
        let p = dir.join(format!("latency-cdf-busy-{interval}us.svg"));
        cdf_plot(o, interval, &p)?;
        files.push(p);
    }
    let p = dir.join("glitches-busy.svg");
    glitch_plot(&view, &p)?;
    files.push(p);
    Ok(files)
}

/// What `results.json` holds, read back.
#[derive(Deserialize)]
struct JsonIn {
    config: crate::bench::BenchConfig,
    #[serde(default)]
    interrupted: bool,
    #[serde(default)]
    elapsed_s: f64,
    cells: Vec<crate::bench::CellResult>,
}

/// Writes the report of the bench run whose `results.json` is in `dir` again, into `out`
/// (`report.md`, `results.json`, the glitch plot), with this build's tables and the title of
/// the run's own `report.md` when there is one. The latency CDF plots need the run's
/// histograms, which `results.json` does not keep: they are not drawn again.
pub fn rewrite(dir: &Path, out: &Path) -> Result<Vec<PathBuf>, BenchError> {
    let path = dir.join("results.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| BenchError::Read(path.display().to_string(), e))?;
    let run: JsonIn = serde_json::from_str(&text)
        .map_err(|e| BenchError::Parse(path.display().to_string(), e))?;
    let title = std::fs::read_to_string(dir.join("report.md"))
        .ok()
        .and_then(|md| {
            let first = md.lines().next()?.strip_prefix("# ")?.trim().to_string();
            (!first.is_empty()).then_some(first)
        })
        .unwrap_or_else(|| "pvsched bench".to_string());
    let outcome = BenchOutcome {
        config: run.config,
        cells: run.cells,
        hists: Vec::new(),
        interrupted: run.interrupted,
        elapsed: std::time::Duration::from_secs_f64(run.elapsed_s.max(0.0)),
    };
    write(&outcome, out, &title)
}

/// Where the rounds' controller threads ran, when any of them could not have its deadline
/// reservation: such rounds are not comparable with those of a run where it had one (a FIFO
/// controller moves boosted vCPUs; README, "The run's controller").
fn controller_line<'a>(classes: impl Iterator<Item = Option<&'a str>>) -> Option<String> {
    let classes: Vec<&str> = classes.flatten().collect();
    let fifo: Vec<&str> = classes
        .iter()
        .copied()
        .filter(|c| !c.starts_with("deadline"))
        .collect();
    let first = fifo.first()?;
    Some(format!(
        "**Controller thread not on its deadline reservation in {} of {} cell runs** that \
         needed one (first: `{first}`); those cells' vCPU placement is not comparable with \
         the others'.",
        fifo.len(),
        classes.len()
    ))
}

fn markdown(v: &View<'_>, title: &str) -> String {
    let o = v.o;
    let c = &o.config;
    let mut s = String::new();
    let _ = writeln!(s, "# {title}\n");
    let _ = writeln!(
        s,
        "{} rounds × {} cells × {:.1} s{}; {} vCPUs, each with a deadline task (periods {} ms \
         rotating over the vCPUs from round to round, work 12.5 % of the period) in the cells \
         that say so, guest {} between timer events; busy host = {} {}; \
         pvsched protocol v1 offered in every cell (`daemon`: host-only, from LAPIC-timer \
         tracepoints).{} \
         Values: median over rounds [min–max]. Total {:.0} s.\n",
        c.rounds,
        c.plan().len(),
        c.cell_duration.as_secs_f64(),
        if o.interrupted { " (interrupted)" } else { "" },
        c.vcpus,
        crate::bench::TASK_PERIODS_MS
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        if c.guest_busy { "busy" } else { "halting" },
        c.hogs,
        match c.host_load {
            crate::bench::HostLoadKind::Builtin => "built-in CPU hogs",
            crate::bench::HostLoadKind::StressNg => "stress-ng --cpu workers",
        },
        match (c.layout, c.host_load) {
            (crate::experiment::Layout::Free, _) => String::new(),
            (l, crate::bench::HostLoadKind::Builtin) => format!(
                " Layout `{l}`: every cell's vCPU threads and hogs pinned (`apart`: vCPU i and \
                 hog i on CPU i; `together`: the vCPUs on one CPU, the hogs on the others)."
            ),
            (l, crate::bench::HostLoadKind::StressNg) => format!(
                " Layout `{l}`: every cell's vCPU threads pinned (`apart`: vCPU i on CPU i; \
                 `together`: on one CPU); stress-ng's workers placed by the kernel."
            ),
        },
        o.elapsed.as_secs_f64(),
    );
    let classes = o.cells.iter().flat_map(|c| &c.rounds);
    if let Some(line) = controller_line(classes.map(|r| r.controller_class.as_deref())) {
        let _ = writeln!(s, "{line}\n");
    }
    let policies = &c.policies;
    s.push_str(&promise(&c.intervals_us, policies, |host, task, p, i| {
        v.find_task(host, true, task, p, i)
    }));
    let header = |s: &mut String, first: &str| {
        let _ = writeln!(
            s,
            "| {first} | metric | {} |",
            policies
                .iter()
                .map(|p| if p == "none" {
                    "vanilla (none)".to_string()
                } else {
                    p.clone()
                })
                .collect::<Vec<_>>()
                .join(" | ")
        );
        let _ = writeln!(s, "|---|---|{}", "---|".repeat(policies.len()));
    };
    for (host, task, name) in [
        (HostState::Busy, true, "Busy host, deadline task on"),
        (
            HostState::Busy,
            false,
            "Busy host, no deadline task (the RFC's cyclictest-only setting)",
        ),
        (HostState::Idle, true, "Idle host, deadline task on"),
        (HostState::Idle, false, "Idle host, no deadline task"),
    ] {
        let _ = writeln!(s, "## {name}: guest timer wake-up latency (µs)\n");
        header(&mut s, "interval");
        for &i in &c.intervals_us {
            for (m, f) in [
                (
                    "avg",
                    (|x: &CellSummary| x.guest_avg) as fn(&CellSummary) -> Stat,
                ),
                ("p50", |x| x.guest_p50),
                ("p99", |x| x.guest_p99),
                ("max", |x| x.guest_max),
            ] {
                let row: Vec<String> = policies
                    .iter()
                    .map(|p| {
                        v.find_task(host, true, task, p, i)
                            .map_or("–".into(), |x| cell_stat(f(x), &us))
                    })
                    .collect();
                let _ = writeln!(s, "| {i} µs | {m} | {} |", row.join(" | "));
            }
        }
        let _ = writeln!(s);
    }
    for (host, task, name) in [
        (HostState::Busy, true, "Busy host, deadline task on"),
        (HostState::Busy, false, "Busy host, no deadline task"),
        (HostState::Idle, true, "Idle host, deadline task on"),
    ] {
        let _ = writeln!(
            s,
            "## {name}: what it costs the host, and the engine's own cost\n"
        );
        header(&mut s, "interval");
        for &i in &c.intervals_us {
            let base = v
                .find_task(host, true, task, "none", i)
                .map(|x| x.load_throughput.median);
            let num = |x: f64| format!("{x:.2}");
            for (m, f, fmt) in [
                (
                    "host probe avg (µs)",
                    (|x: &CellSummary| x.probe_avg) as fn(&CellSummary) -> Stat,
                    &us as &dyn Fn(f64) -> String,
                ),
                ("host probe max (µs)", |x| x.probe_max, &us),
                ("engine CPU (% of a core)", |x| x.engine_cpu_pct, &num),
                ("engine wake-ups / s", |x| x.wakeups_per_s, &us),
                ("sched_setattr / s", |x| x.setattr_per_s, &us),
                ("probe periods overrun", |x| x.overrun_pct, &pct),
                (
                    "fewest samples of a vCPU (% of periods)",
                    |x| x.fewest_samples_pct,
                    &pct,
                ),
                ("VM CPU share (% of the machine)", |x| x.vm_cpu_pct, &pct),
                (
                    "vCPU threads on one CPU (% of samples)",
                    |x| x.vcpus_sharing_cpu_pct,
                    &pct,
                ),
                (
                    "a vCPU thread alone on a CPU (% of samples)",
                    |x| x.vcpu_alone_pct,
                    &pct,
                ),
                (
                    "host load CPU share (% of the machine)",
                    |x| x.load_cpu_pct,
                    &pct,
                ),
            ] {
                let row: Vec<String> = policies
                    .iter()
                    .map(|p| {
                        v.find_task(host, true, task, p, i)
                            .map_or("–".into(), |x| cell_stat(f(x), fmt))
                    })
                    .collect();
                let _ = writeln!(s, "| {i} µs | {m} | {} |", row.join(" | "));
            }
            if host == HostState::Busy {
                let row: Vec<String> = policies
                    .iter()
                    .map(|p| {
                        v.find_task(host, true, task, p, i).map_or("–".into(), |x| {
                            ratio(x.load_throughput.median, base.unwrap_or(f64::NAN))
                        })
                    })
                    .collect();
                let _ = writeln!(
                    s,
                    "| {i} µs | host load throughput vs vanilla | {} |",
                    row.join(" | ")
                );
                // The fairness figure: how much of the machine moved from the host load to
                // the VM, against vanilla in the same rounds.
                let base = v.find_task(host, true, task, "none", i);
                let row: Vec<String> = policies
                    .iter()
                    .map(|p| match (v.find_task(host, true, task, p, i), base) {
                        (Some(x), Some(b)) => {
                            // The host load's CPU time is known for the built-in hogs only.
                            let load = if x.load_cpu_pct.n > 0 && b.load_cpu_pct.n > 0 {
                                format!("{:+.1}", x.load_cpu_pct.median - b.load_cpu_pct.median)
                            } else {
                                "?".into()
                            };
                            format!("{:+.1} / {load}", x.vm_cpu_pct.median - b.vm_cpu_pct.median)
                        }
                        _ => "–".into(),
                    })
                    .collect();
                let _ = writeln!(
                    s,
                    "| {i} µs | CPU share change vs vanilla, VM / host load (points) | {} |",
                    row.join(" | ")
                );
            }
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(s, "## Busy host: deadline-task glitches (% of jobs late)\n");
    header(&mut s, "interval");
    for &i in &c.intervals_us {
        let periods: Vec<u64> = v
            .find(HostState::Busy, true, "none", i)
            .map(|x| x.glitch_pct.iter().map(|(p, _)| *p).collect())
            .unwrap_or_default();
        for ms in periods {
            let row: Vec<String> = policies
                .iter()
                .map(|p| {
                    v.find(HostState::Busy, true, p, i)
                        .and_then(|x| x.glitch_pct.iter().find(|(q, _)| *q == ms))
                        .map_or("–".into(), |(_, st)| cell_stat(*st, &pct))
                })
                .collect();
            let _ = writeln!(s, "| {i} µs | {ms} ms task | {} |", row.join(" | "));
        }
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "## Busy host: boosting\n");
    header(&mut s, "interval");
    for &i in &c.intervals_us {
        for (m, f, fmt) in [
            (
                "vCPU time boosted",
                (|x: &CellSummary| x.boosted_pct) as fn(&CellSummary) -> Stat,
                &pct as &dyn Fn(f64) -> String,
            ),
            ("boosts / s", |x| x.boosts_per_s, &us),
            ("throttles", |x| x.throttles, &us),
            ("decision→applied p99 (µs)", |x| x.applied_p99, &us),
        ] {
            let row: Vec<String> = policies
                .iter()
                .map(|p| {
                    v.find(HostState::Busy, true, p, i)
                        .map_or("–".into(), |x| cell_stat(f(x), fmt))
                })
                .collect();
            let _ = writeln!(s, "| {i} µs | {m} | {} |", row.join(" | "));
        }
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "## Ratios (medians of guest wake-up latency, busy host)\n"
    );
    // Every boosting policy of the run, in its order (the baselines are the divisors).
    let ratioed: Vec<&String> = policies
        .iter()
        .filter(|p| *p != "none" && *p != "static")
        .collect();
    let _ = writeln!(
        s,
        "| interval | metric | {} |",
        ratioed
            .iter()
            .map(|p| p.as_str())
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(s, "|---|---|{}", "---|".repeat(ratioed.len()));
    for &i in &c.intervals_us {
        let get = |p: &str| v.find(HostState::Busy, true, p, i);
        let floor = v.find(HostState::Idle, false, "none", i);
        for (m, f) in [
            (
                "avg",
                (|x: &CellSummary| x.guest_avg.median) as fn(&CellSummary) -> f64,
            ),
            ("p99", |x| x.guest_p99.median),
        ] {
            for (what, base) in [
                ("÷ static RT", get("static")),
                ("÷ vanilla", get("none")),
                ("÷ idle-host idle-guest floor", floor),
            ] {
                let row: Vec<String> = ratioed
                    .iter()
                    .map(|p| match (get(p), base) {
                        (Some(a), Some(b)) => ratio(f(a), f(b)),
                        _ => "–".into(),
                    })
                    .collect();
                let _ = writeln!(s, "| {i} µs | {m} {what} | {} |", row.join(" | "));
            }
        }
    }
    let _ = writeln!(s, "\nFloor (idle host, idle guest, vanilla):");
    for &i in &c.intervals_us {
        if let Some(f) = v.find(HostState::Idle, false, "none", i) {
            let _ = writeln!(
                s,
                "- {i} µs: avg {} µs, p50 {} µs, p99 {} µs, max {} µs",
                cell_stat(f.guest_avg, &us),
                cell_stat(f.guest_p50, &us),
                cell_stat(f.guest_p99, &us),
                cell_stat(f.guest_max, &us)
            );
        }
    }
    let _ = writeln!(s, "\n## RFC v1 figures, for comparison\n\n{RFC_TABLE}\n");
    let _ = writeln!(
        s,
        "Plots: `latency-cdf-busy-<interval>us.svg` (wake-up latency CDF per policy, all rounds), \
         `glitches-busy.svg`. Raw figures: `results.json`."
    );
    s
}

/// What pvsched promises, as bench targets: a guest p99 at most static RT's, the host load at
/// least this share of its vanilla throughput, the VM's CPU share within this many points of
/// vanilla's, the engine under this share of a core, and on an idle host a p99 at most this
/// multiple of vanilla's.
const HOST_LOAD_MIN: f64 = 0.8;
const SHARE_POINTS_MAX: f64 = 5.0;
const ENGINE_PCT_MAX: f64 = 2.0;
const IDLE_P99_MAX: f64 = 1.2;

/// The "at a glance" section: each boosting policy against the promise ("static-RT latency
/// for what the guest needs, the host no worse off"), busy host with / without the deadline
/// task, a `✗` beside each miss. `get` finds a busy-guest cell (host, task, policy, interval).
fn promise<'a>(
    intervals: &[u64],
    policies: &[String],
    get: impl Fn(HostState, bool, &str, u64) -> Option<&'a CellSummary>,
) -> String {
    let mut s = String::new();
    let checked: Vec<&String> = policies
        .iter()
        .filter(|p| *p != "none" && *p != "static")
        .collect();
    if checked.is_empty() {
        return s;
    }
    let _ = writeln!(
        s,
        "## At a glance: the promise, checked\n\n\
         Busy host, deadline task on / off (medians). Targets: guest p99 at most static RT's \
         (the latency the guest needs) and its average no worse than vanilla's, host load at least {HOST_LOAD_MIN} of its vanilla \
         throughput and the VM's CPU share within ±{SHARE_POINTS_MAX} points of vanilla's (the \
         host no worse off), the engine thread at most {ENGINE_PCT_MAX} % of a core, and on the \
         idle host a p99 at most {IDLE_P99_MAX}× vanilla's (the worse of task on / off). `✗`: \
         missed; `≈`: no better than vanilla by the medians, but within the rounds' spread \
         (the policy's best round at least as good as vanilla's worst: not shown to be worse); \
         `–`: not measured in this run.\n"
    );
    let _ = writeln!(
        s,
        "| interval | policy | p99 ÷ static RT's | avg ÷ vanilla's | host load ÷ vanilla's | \
         VM CPU share change (points) | engine CPU (% of a core) | idle host p99 ÷ vanilla's |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    // One figure, marked when `ok` says it misses (`≈` when `spread` says the miss is within
    // the rounds' spread); `–` when not measured.
    let mark_within = |x: Option<f64>,
                       text: &dyn Fn(f64) -> String,
                       ok: &dyn Fn(f64) -> bool,
                       spread: bool| match x {
        Some(x) if x.is_finite() => {
            let m = match (ok(x), spread) {
                (true, _) => "",
                (false, true) => " ≈",
                (false, false) => " ✗",
            };
            format!("{}{m}", text(x))
        }
        _ => "–".to_string(),
    };
    let mark = |x: Option<f64>, text: &dyn Fn(f64) -> String, ok: &dyn Fn(f64) -> bool| {
        mark_within(x, text, ok, false)
    };
    let two = |x: f64| format!("{x:.2}");
    for &i in intervals {
        for p in &checked {
            let pair = |f: &dyn Fn(bool) -> Option<f64>,
                        text: &dyn Fn(f64) -> String,
                        ok: &dyn Fn(f64) -> bool| {
                format!("{} / {}", mark(f(true), text, ok), mark(f(false), text, ok))
            };
            let busy = |task: bool| get(HostState::Busy, task, p, i);
            // A figure of this policy's cell over the same figure of `base`'s.
            let vs = |task: bool, base: &str, f: fn(&CellSummary) -> f64| {
                let (x, b) = (f(busy(task)?), f(get(HostState::Busy, task, base, i)?));
                (b > 0.0).then_some(x / b)
            };
            let p99_static = pair(&|t| vs(t, "static", |x| x.guest_p99.median), &two, &|x| {
                x <= 1.0
            });
            // No worse than vanilla: a miss within the rounds' spread is not shown to be one.
            let within = |a: Option<&CellSummary>,
                          b: Option<&CellSummary>,
                          f: fn(&CellSummary) -> Stat| {
                matches!((a, b), (Some(a), Some(b)) if f(a).min <= f(b).max)
            };
            let avg = [true, false]
                .map(|t| {
                    mark_within(
                        vs(t, "none", |x| x.guest_avg.median),
                        &two,
                        &|x| x <= 1.0,
                        within(busy(t), get(HostState::Busy, t, "none", i), |x| x.guest_avg),
                    )
                })
                .join(" / ");
            let host = pair(
                &|t| vs(t, "none", |x| x.load_throughput.median),
                &two,
                &|x| x >= HOST_LOAD_MIN,
            );
            let share = pair(
                &|t| {
                    let vm = |x: &CellSummary| x.vm_cpu_pct.median;
                    Some(vm(busy(t)?) - vm(get(HostState::Busy, t, "none", i)?))
                },
                &|x| format!("{x:+.1}"),
                &|x| x.abs() <= SHARE_POINTS_MAX,
            );
            let engine = pair(
                &|t| Some(busy(t)?.engine_cpu_pct.median),
                &|x| format!("{x:.1}"),
                &|x| x <= ENGINE_PCT_MAX,
            );
            // The worse of task on / off, and whether that one is within the rounds' spread.
            let idle = [true, false]
                .into_iter()
                .filter_map(|t| {
                    let (a, b) = (
                        get(HostState::Idle, t, p, i)?,
                        get(HostState::Idle, t, "none", i)?,
                    );
                    let r = a.guest_p99.median / b.guest_p99.median;
                    r.is_finite()
                        .then_some((r, a.guest_p99.min <= b.guest_p99.max))
                })
                .reduce(|a, b| if b.0 > a.0 { b } else { a });
            let idle = mark_within(
                idle.map(|(r, _)| r),
                &two,
                &|x| x <= IDLE_P99_MAX,
                idle.is_some_and(|(_, w)| w),
            );
            let _ = writeln!(
                s,
                "| {i} µs | {p} | {p99_static} | {avg} | {host} | {share} | {engine} | {idle} |"
            );
        }
    }
    let _ = writeln!(s);
    s
}

/// The x-axis labels of a grouped bar chart with group `i` spanning `i .. i + 1`: each
/// group's name at its middle, nothing elsewhere.
pub(crate) fn group_labels(names: Vec<String>) -> impl Fn(&f64) -> String {
    move |x| {
        let i = (*x - 0.5).round();
        if (*x - 0.5 - i).abs() < 0.01 && i >= 0.0 && (i as usize) < names.len() {
            names[i as usize].clone()
        } else {
            String::new()
        }
    }
}

fn plot_err(name: &Path, e: impl std::fmt::Display) -> BenchError {
    BenchError::Plot(name.display().to_string(), e.to_string())
}

fn cdf_plot(o: &BenchOutcome, interval: u64, path: &Path) -> Result<(), BenchError> {
    let series: Vec<(String, Vec<(f64, f64)>)> = o
        .cells
        .iter()
        .zip(&o.hists)
        .filter(|(c, _)| {
            c.key.host == HostState::Busy
                && c.key.guest_busy == o.config.guest_busy
                && c.key.interval_us == interval
        })
        .map(|(c, h)| (c.key.policy.clone(), h.cdf()))
        .collect();
    let xmax = series
        .iter()
        .flat_map(|(_, p)| p.last().map(|(x, _)| *x))
        .fold(10.0f64, f64::max)
        * 1.2;
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Guest timer wake-up latency, busy host, {interval} µs interval"),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d((1f64..xmax).log_scale(), 0f64..1.0f64)
        .map_err(|e| plot_err(path, e))?;
    chart
        .configure_mesh()
        .x_desc("wake-up latency (µs, log)")
        .y_desc("fraction of wake-ups ≤ x")
        .draw()
        .map_err(|e| plot_err(path, e))?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|&(x, y)| (x.max(1.0), y)),
                color.stroke_width(2),
            ))
            .map_err(|e| plot_err(path, e))?
            .label(name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()
        .map_err(|e| plot_err(path, e))?;
    root.present().map_err(|e| plot_err(path, e))
}

fn glitch_plot(v: &View<'_>, path: &Path) -> Result<(), BenchError> {
    let c = &v.o.config;
    let interval = c.intervals_us.first().copied().unwrap_or(500);
    let periods: Vec<u64> = crate::bench::TASK_PERIODS_MS.to_vec();
    let n_pol = c.policies.len().max(1);
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Deadline-task glitches, busy host, {interval} µs probe interval"),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d(0f64..periods.len() as f64, 0f64..100f64)
        .map_err(|e| plot_err(path, e))?;
    let labels = group_labels(periods.iter().map(|p| format!("{p} ms task")).collect());
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(periods.len() * 2 + 1)
        .x_label_formatter(&labels)
        .y_desc("% of jobs late")
        .draw()
        .map_err(|e| plot_err(path, e))?;
    let width = 0.8 / n_pol as f64;
    for (pi, p) in c.policies.iter().enumerate() {
        let color = Palette99::pick(pi).to_rgba();
        let cell = v.find(HostState::Busy, true, p, interval);
        let bars: Vec<Rectangle<(f64, f64)>> = periods
            .iter()
            .enumerate()
            .filter_map(|(k, ms)| {
                let st = cell?.glitch_pct.iter().find(|(q, _)| q == ms)?.1;
                let x0 = k as f64 + 0.1 + pi as f64 * width;
                Some(Rectangle::new(
                    [(x0, 0.0), (x0 + width * 0.9, st.median.clamp(0.0, 100.0))],
                    color.filled(),
                ))
            })
            .collect();
        chart
            .draw_series(bars)
            .map_err(|e| plot_err(path, e))?
            .label(p.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()
        .map_err(|e| plot_err(path, e))?;
    root.present().map_err(|e| plot_err(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_says_when_a_controller_lacked_its_reservation() {
        let dl = "deadline(runtime 300000 ns, deadline 1000000 ns, period 1000000 ns)";
        assert_eq!(
            controller_line([None, Some(dl), Some(dl)].into_iter()),
            None
        );
        assert_eq!(controller_line([None, None].into_iter()), None);
        let refused = "fifo:11 (SCHED_DEADLINE refused: sched_setattr failed: busy)";
        let line = controller_line([Some(dl), None, Some(refused), Some("fifo:1")].into_iter())
            .expect("a line");
        assert!(line.contains("in 2 of 3 cell runs"), "{line}");
        assert!(line.contains(refused), "{line}");
    }

    #[test]
    fn the_promise_section_marks_each_miss() {
        let stat = |median: f64| Stat {
            median,
            min: median,
            max: median,
            n: 1,
        };
        let cell = |p99: f64, avg: f64, load: f64, vm: f64, engine: f64| CellSummary {
            guest_p99: stat(p99),
            guest_avg: stat(avg),
            load_throughput: stat(load),
            vm_cpu_pct: stat(vm),
            engine_cpu_pct: stat(engine),
            ..CellSummary::default()
        };
        let mut cells = Vec::new();
        for task in [true, false] {
            let busy = |p: &str| (HostState::Busy, task, p.to_string());
            cells.push((busy("none"), cell(4000.0, 250.0, 100.0, 50.0, 0.1)));
            cells.push((busy("static"), cell(50.0, 40.0, 10.0, 95.0, 0.1)));
            // Misses every latency and host target with the task, only the average without.
            let da = if task {
                cell(400.0, 100.0, 60.0, 62.0, 2.5)
            } else {
                cell(50.0, 300.0, 90.0, 54.0, 1.5)
            };
            cells.push((busy("deadline-aware"), da));
            let idle = |p: &str| (HostState::Idle, task, p.to_string());
            cells.push((idle("none"), cell(50.0, 25.0, 0.0, 0.0, 0.1)));
            let idle_p99 = if task { 55.0 } else { 70.0 };
            cells.push((idle("deadline-aware"), cell(idle_p99, 25.0, 0.0, 0.0, 0.1)));
        }
        let policies: Vec<String> = ["none", "static", "deadline-aware", "dynamic"]
            .iter()
            .map(|p| p.to_string())
            .collect();
        let s = promise(&[500], &policies, |h, t, p, _| {
            cells
                .iter()
                .find(|(k, _)| *k == (h, t, p.to_string()))
                .map(|(_, c)| c)
        });
        let row = s
            .lines()
            .find(|l| l.starts_with("| 500 µs | deadline-aware |"))
            .expect("a row");
        assert_eq!(
            row,
            "| 500 µs | deadline-aware | 8.00 ✗ / 1.00 | 0.40 / 1.20 ✗ | 0.60 ✗ / 0.90 | \
             +12.0 ✗ / +4.0 | 2.5 ✗ / 1.5 | 1.40 ✗ |"
        );
        // A miss within the rounds' spread is marked as such: "dynamic" is slower than vanilla
        // by the medians, but its best round beats vanilla's worst (avg with the task, idle
        // p99); without the task it is slower in every round.
        let spread = |median: f64, min: f64, max: f64| Stat {
            median,
            min,
            max,
            n: 3,
        };
        for task in [true, false] {
            let avg = if task {
                spread(300.0, 240.0, 320.0)
            } else {
                spread(300.0, 290.0, 320.0)
            };
            cells.retain(|(k, _)| *k != (HostState::Busy, task, "none".to_string()));
            cells.push((
                (HostState::Busy, task, "none".to_string()),
                CellSummary {
                    guest_avg: spread(250.0, 200.0, 280.0),
                    ..cell(4000.0, 250.0, 100.0, 50.0, 0.1)
                },
            ));
            cells.push((
                (HostState::Busy, task, "dynamic".to_string()),
                CellSummary {
                    guest_avg: avg,
                    ..cell(4000.0, 0.0, 100.0, 50.0, 0.1)
                },
            ));
            cells.retain(|(k, _)| *k != (HostState::Idle, task, "none".to_string()));
            cells.push((
                (HostState::Idle, task, "none".to_string()),
                CellSummary {
                    guest_p99: spread(50.0, 40.0, 60.0),
                    ..cell(50.0, 25.0, 0.0, 0.0, 0.1)
                },
            ));
            cells.push((
                (HostState::Idle, task, "dynamic".to_string()),
                CellSummary {
                    guest_p99: spread(70.0, 55.0, 80.0),
                    ..cell(70.0, 25.0, 0.0, 0.0, 0.1)
                },
            ));
        }
        let s2 = promise(&[500], &policies, |h, t, p, _| {
            cells
                .iter()
                .find(|(k, _)| *k == (h, t, p.to_string()))
                .map(|(_, c)| c)
        });
        let row = s2
            .lines()
            .find(|l| l.starts_with("| 500 µs | dynamic |"))
            .expect("a row");
        assert_eq!(
            row,
            "| 500 µs | dynamic | 80.00 ✗ / 80.00 ✗ | 1.20 ≈ / 1.20 ✗ | 1.00 / 1.00 | \
             +0.0 / +0.0 | 0.1 / 0.1 | 1.40 ≈ |"
        );
        // A policy without cells, and no row for the baselines.
        assert!(s.contains("| 500 µs | dynamic | – / – | – / – | – / – | – / – | – / – | – |"));
        assert!(!s.contains("| none |") && !s.contains("| static |"), "{s}");
        // Prose and header joined without the source's indentation.
        assert!(!s.contains("  "), "{s}");
        assert!(
            s.contains("\n| interval | policy | p99 ÷ static RT's |"),
            "{s}"
        );
        // Nothing to check without a boosting policy.
        let baselines = &policies[..2];
        assert_eq!(promise(&[500], baselines, |_, _, _, _| None), "");
    }

    #[test]
    fn numbers_format_for_tables() {
        assert_eq!(us(1234567.4), "1\u{202f}234\u{202f}567");
        assert_eq!(us(12.6), "13");
        assert_eq!(us(f64::NAN), "–");
        assert_eq!(ratio(1.0, 4.0), "0.25");
        assert_eq!(ratio(1.0, 0.0), "–");
        let st = Stat {
            median: 2.0,
            min: 1.0,
            max: 3.0,
            n: 3,
        };
        assert_eq!(cell_stat(st, &us), "2 [1–3]");
        assert_eq!(cell_stat(Stat::default(), &us), "–");
    }
}
