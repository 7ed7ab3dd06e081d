//! `pvsched daemon` and `pvsched ctl`.

use crate::cli::{CtlArgs, DaemonArgs, HostEvents};
use crate::vm_cmd::CliError;
use pvsched_daemon::DaemonConfig;
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
        return Ok(ExitCode::SUCCESS);
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).map_err(CliError::Signals)?;
    }
    let trace = match args.host_events {
        HostEvents::Auto => TraceConfig::default(),
        HostEvents::Set(c) => c,
    };
    if args.pids.is_empty() && !args.watch {
        return Err(CliError::Usage("give --pid <PID> (repeatable) or --watch"));
    }
    let cfg = DaemonConfig {
        pids: args.pids,
        watch: args.watch,
        driver: args.policy,
        opts: DriverOptions::parse(args.policy_opts.iter().map(String::as_str))?,
        trace,
        socket: args.socket,
        state_file: args.state_file,
    };
    pvsched_daemon::run(&cfg, &stop, |r| {
        if !r.restored.is_empty() {
            eprintln!(
                "pvsched daemon: restored {} thread(s) a previous daemon left boosted: {:?}",
                r.restored.len(),
                r.restored
            );
        }
        eprintln!(
            "pvsched daemon: running (policy {}, socket {})",
            cfg.driver,
            cfg.socket.display()
        );
    })?;
    eprintln!("pvsched daemon: stopped, every thread restored");
    Ok(ExitCode::SUCCESS)
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
