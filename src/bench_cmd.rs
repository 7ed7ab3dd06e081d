//! `pvsched bench`: the side-by-side comparison, with a progress bar and the report files.

use crate::cli::{BenchArgs, BenchGuest, BenchLoadArg, GuestLoadArg};
use crate::vm_cmd::CliError;
use indicatif::{ProgressBar, ProgressStyle};
use pvsched_bench::bench::{self, BenchConfig, HostLoadKind};
use pvsched_bench::experiment::Layout;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::SystemTime;

/// `YYYYmmdd-HHMMSS` (UTC) of now.
fn stamp() -> String {
    let t = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    t.trim_end_matches('Z')
        .replace(['-', ':'], "")
        .replace('T', "-")
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `pvsched bench --guest linux-tcg`: the Linux guest under QEMU TCG.
fn run_linux_tcg(args: &BenchArgs, interrupt: &AtomicBool) -> Result<ExitCode, CliError> {
    use pvsched_bench::linux_tcg::{self, LinuxTcgConfig};
    let mut cfg = LinuxTcgConfig::standard(args.guest_dir.clone(), cpus());
    if args.quick {
        cfg.rounds = 1;
        cfg.duration_s = 3;
    }
    if let Some(r) = args.rounds {
        cfg.rounds = r.max(1);
    }
    if let Some(d) = args.cell_duration {
        cfg.duration_s = (d.as_secs_f64().round() as u32).max(1);
    }
    // Checked before anything runs.
    pvsched_policy::DriverOptions::parse(args.daemon_opts.iter().map(String::as_str))?;
    cfg.daemon_opts = args.daemon_opts.clone();
    if let Some(p) = &args.policies {
        let known = linux_tcg::TCG_POLICIES;
        if let Some(bad) = p.iter().find(|n| !known.contains(&n.as_str())) {
            return Err(CliError::UsageOwned(format!(
                "--guest linux-tcg runs the policies {}, not {bad} (the daemon's driver options \
                 go in --daemon-opt there)",
                known.join(", ")
            )));
        }
        // `none` first: the baseline of the ratios.
        cfg.policies = std::iter::once("none".to_string())
            .chain(p.iter().filter(|n| *n != "none").cloned())
            .collect();
    }
    let started = stamp();
    let out: PathBuf = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("pvsched-bench-linux-tcg-{started}")));
    let cells_n = cfg.policies.len() * cfg.busy.len();
    eprintln!(
        "pvsched bench --guest linux-tcg: {cells_n} cells × {} rounds × {} s of cyclictest \
         (about {} s with the guest's boot)",
        cfg.rounds,
        cfg.duration_s,
        cells_n * cfg.rounds * (cfg.duration_s as usize + 6)
    );
    let cells = linux_tcg::run(&cfg, interrupt, &mut |done, total, label| {
        eprintln!("[{}/{total}] {label}", done + 1);
    })?;
    let title = format!("pvsched bench --guest linux-tcg, {started} UTC");
    let report = linux_tcg::report(&cfg, &cells, &title);
    let write = |name: &str, text: &str| -> Result<PathBuf, CliError> {
        let path = out.join(name);
        std::fs::create_dir_all(&out)
            .and_then(|()| std::fs::write(&path, text))
            .map_err(|source| CliError::Json {
                path: path.display().to_string(),
                source,
            })?;
        Ok(path)
    };
    let json = serde_json::json!({ "config": cfg, "cells": cells });
    let files = [
        write("report.md", &report)?,
        write(
            "results.json",
            &serde_json::to_string_pretty(&json).unwrap_or_default(),
        )?,
    ];
    let plot = out.join("latency-avg.svg");
    linux_tcg::plot(&cfg, &cells, &plot)?;
    let files = [files[0].clone(), files[1].clone(), plot];
    print!("{report}");
    println!("\nReport written to {}:", out.display());
    for f in &files {
        println!("  {}", f.display());
    }
    Ok(if interrupt.load(std::sync::atomic::Ordering::Relaxed) {
        ExitCode::from(130)
    } else {
        ExitCode::SUCCESS
    })
}

/// Runs `pvsched bench`.
pub fn run(args: BenchArgs) -> Result<ExitCode, CliError> {
    let interrupt = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, interrupt.clone()).map_err(CliError::Signals)?;
    }
    if let Some(dir) = &args.report_from {
        if args.guest == BenchGuest::LinuxTcg {
            return Err(CliError::Usage(
                "--report-from writes a testbed run's report again (not --guest linux-tcg)",
            ));
        }
        let out = args.out.clone().unwrap_or_else(|| dir.clone());
        let files = pvsched_bench::bench_report::rewrite(dir, &out)?;
        println!("Report written again to {}:", out.display());
        for f in &files {
            println!("  {}", f.display());
        }
        return Ok(ExitCode::SUCCESS);
    }
    if args.guest == BenchGuest::LinuxTcg {
        if args.layout != Layout::Free {
            return Err(CliError::Usage(
                "--layout is for the testbed (QEMU's threads are placed by the kernel)",
            ));
        }
        if args.guest_load != GuestLoadArg::Busy {
            return Err(CliError::Usage(
                "--guest-load is for the testbed (the Linux guest runs cyclictest alone)",
            ));
        }
        return run_linux_tcg(&args, &interrupt);
    }
    let mut cfg = if args.quick {
        BenchConfig::quick(cpus())
    } else {
        BenchConfig::standard(cpus())
    };
    if let Some(r) = args.rounds {
        cfg.rounds = r.max(1);
    }
    if let Some(d) = args.cell_duration {
        cfg.cell_duration = d;
    }
    if !args.daemon_opts.is_empty() {
        return Err(CliError::Usage(
            "--daemon-opt is for --guest linux-tcg (the testbed's policies take theirs from \
             their names)",
        ));
    }
    if let Some(p) = args.policies {
        if let Some(n) = p.iter().find(|n| pvsched_bench::linux_tcg::tcg_only(n)) {
            return Err(CliError::UsageOwned(format!(
                "the policy `{n}` is a column of --guest linux-tcg (a Linux guest under QEMU; \
                 on the testbed, boost to a slice with e.g. deadline-aware/slice or \
                 static+class=slice:100us)"
            )));
        }
        // `none` first: the baseline of every ratio.
        let mut policies = vec!["none".to_string()];
        for name in p {
            if !policies.contains(&name) {
                policies.push(name);
            }
        }
        cfg.policies = policies;
    }
    if let Some(i) = args.intervals {
        let mut i = i;
        i.dedup();
        cfg.intervals_us = i;
    }
    cfg.host_load = match args.host_load {
        BenchLoadArg::Builtin => HostLoadKind::Builtin,
        BenchLoadArg::StressNg => HostLoadKind::StressNg,
    };
    cfg.layout = args.layout;
    cfg.guest_busy = args.guest_load == GuestLoadArg::Busy;
    let started = stamp();
    let out: PathBuf = args
        .out
        .unwrap_or_else(|| PathBuf::from(format!("pvsched-bench-{started}")));
    let total = cfg.plan().len() * cfg.rounds;
    eprintln!(
        "pvsched bench: {} cells × {} rounds × {:.1} s (about {:.0} s)",
        cfg.plan().len(),
        cfg.rounds,
        cfg.cell_duration.as_secs_f64(),
        total as f64 * (cfg.cell_duration.as_secs_f64() + 0.5)
    );
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} cells, eta {eta} | {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let outcome = bench::run(&cfg, &interrupt, &mut |done, _, key| {
        bar.set_position(done as u64);
        bar.set_message(key.label());
    })?;
    bar.finish_and_clear();
    let title = format!("pvsched bench, {started} UTC");
    let files = pvsched_bench::bench_report::write(&outcome, &out, &title)?;
    if let Some(md) = files.iter().find(|f| f.ends_with("report.md")) {
        if let Ok(text) = std::fs::read_to_string(md) {
            print!("{text}");
        }
    }
    println!("\nReport written to {}:", out.display());
    for f in &files {
        println!("  {}", f.display());
    }
    Ok(if outcome.interrupted {
        ExitCode::from(130)
    } else {
        ExitCode::SUCCESS
    })
}
