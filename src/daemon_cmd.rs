//! `pvsched daemon` and `pvsched ctl`.

use crate::cli::{CtlArgs, DaemonArgs, HostEvents};
use crate::vm_cmd::CliError;
use pvsched_daemon::{DaemonConfig, VmSource, VmSpec};
use pvsched_host::trace::TraceConfig;
use pvsched_policy::DriverOptions;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// Runs the daemon until SIGINT/SIGTERM.
pub fn run(args: DaemonArgs) -> Result<ExitCode, CliError> {
    if args.recover_only {
        let r = pvsched_daemon::daemon::recover_only(&args.state_file)?;
        println!(
            "pvsched daemon: restored {} thread(s) {:?}; {} untouched",
            r.restored.len(),
            r.restored,
            r.untouched
        );
        for (tid, why) in &r.failed {
            eprintln!(
                "pvsched daemon: could not restore thread {tid}: {why} (kept in the state file)"
            );
        }
        return Ok(if r.failed.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal: a log redirected to a file or journal stays plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let stop = Arc::new(AtomicBool::new(false));
    // Every signal that would end the daemon ends it cleanly, restoring every thread.
    for sig in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
        signal_hook::consts::SIGQUIT,
    ] {
        signal_hook::flag::register(sig, stop.clone()).map_err(CliError::Signals)?;
    }
    let cfg = match &args.config {
        Some(path) => pvsched_daemon::config::load(path)?,
        None => from_args(args)?,
    };
    if cfg.vms.is_empty() && !cfg.watch && cfg.ivshmem.is_none() {
        return Err(CliError::Usage(
            "give --pid <PID>, --qmp <SOCKET> or --tids <TID,..>, --watch, --ivshmem <SOCKET>, \
             or a --config with [[vm]]",
        ));
    }
    pvsched_daemon::run(&cfg, &stop, |r| {
        if !r.restored.is_empty() {
            tracing::warn!(threads = ?r.restored, "restored threads a previous daemon left boosted");
        }
        for (tid, why) in &r.failed {
            tracing::error!(tid, "could not restore a thread a previous daemon left boosted: {why} (kept in the state file)");
        }
        tracing::info!(policy = %cfg.driver, socket = %cfg.socket.display(), "running");
    })?;
    tracing::info!("stopped, every thread restored");
    Ok(ExitCode::SUCCESS)
}

fn from_args(args: DaemonArgs) -> Result<DaemonConfig, CliError> {
    let trace = match args.host_events {
        HostEvents::Auto => TraceConfig::default(),
        HostEvents::Set(c) => c,
    };
    let mut vms: Vec<VmSpec> = args
        .pids
        .into_iter()
        .map(VmSource::Pid)
        .chain(args.qmps.into_iter().map(VmSource::Qmp))
        .map(VmSpec::from)
        .collect();
    if !args.tids.is_empty() {
        vms.push(VmSource::Tids(args.tids).into());
    }
    Ok(DaemonConfig {
        vms,
        watch: args.watch,
        driver: args.policy,
        opts: DriverOptions::parse(args.policy_opts.iter().map(String::as_str))?,
        trace,
        socket: args.socket,
        state_file: args.state_file,
        metrics: args.metrics,
        metrics_public: args.metrics_public,
        allowed: pvsched_daemon::discover::Allowed {
            uids: if args.allow_uids.is_empty() {
                vec![0]
            } else {
                args.allow_uids
            },
            gids: args.allow_gids,
        },
        ctl_group: args.ctl_group,
        ivshmem: args.ivshmem,
        quiet_gate: match args.boost_when {
            crate::cli::BoostWhen::Contended => Some(pvsched_host::pressure::QuietGate::default()),
            crate::cli::BoostWhen::Always => None,
        },
        max_boosted: args.max_boosted.0,
        base_slice: args.base_slice,
        vmm_slice: args.vmm_slice,
        engine_class: args.engine_class,
    })
}

/// Sends one request to the daemon and prints the reply.
pub fn ctl(args: CtlArgs) -> Result<ExitCode, CliError> {
    let request = args.request.join(" ");
    let reply = pvsched_daemon::ctl(&args.socket, &request)
        .map_err(|e| CliError::Ctl(args.socket.display().to_string(), e))?;
    if reply["ok"] == true {
        println!(
            "{}",
            serde_json::to_string_pretty(&reply["result"]).unwrap_or_default()
        );
        Ok(ExitCode::SUCCESS)
    } else {
        Err(CliError::CtlRefused(
            reply["error"].as_str().unwrap_or("?").to_string(),
        ))
    }
}
