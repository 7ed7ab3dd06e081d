//! `pvsched vm`: one testbed run.

use crate::cli::{
    BoostWhen, FaultArg, GuestLoadArg, GuestRequestsArg, HostEvents, PvArg, TaskPeriod, VmArgs,
};
use pvsched_bench::engine_host::PolicyConfig;
use pvsched_bench::experiment::{self, ExperimentConfig};
use pvsched_guest::FaultInjection;
use pvsched_host::pressure::QuietGate;
use pvsched_host::trace::TraceConfig;
use pvsched_policy::{DriverOptions, OptionError};
use pvsched_vmm::pvdevice::PvConfig;
use pvsched_vmm::{GuestConfig, GuestRequests, TaskConfig, VcpuError, VmConfig};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

/// Exit code after SIGINT/SIGTERM (results are still printed).
const EXIT_INTERRUPTED: u8 = 130;

/// Errors of the `pvsched` commands, with their exit codes.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The experiment failed.
    #[error(transparent)]
    Experiment(#[from] experiment::Error),
    /// The JSON report could not be written.
    #[error("cannot write {path}")]
    Json {
        /// Output path.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A `--policy-opt` is malformed.
    #[error("bad --policy-opt")]
    PolicyOpt(#[from] OptionError),
    /// Signal handlers could not be installed.
    #[error("cannot install the SIGINT/SIGTERM handlers")]
    Signals(#[source] std::io::Error),
    /// `pvsched bench` failed.
    #[error(transparent)]
    Bench(#[from] pvsched_bench::bench::BenchError),
    /// `pvsched bench --guest linux-tcg` failed.
    #[error(transparent)]
    LinuxTcg(#[from] pvsched_bench::linux_tcg::TcgError),
    /// The daemon failed.
    #[error(transparent)]
    Daemon(#[from] pvsched_daemon::DaemonError),
    /// `pvsched ctl` could not reach the daemon.
    #[error("cannot talk to the daemon at {0}")]
    Ctl(String, #[source] std::io::Error),
    /// The daemon refused a `ctl` request.
    #[error("the daemon refused: {0}")]
    CtlRefused(String),
    /// The daemon's configuration file is invalid.
    #[error(transparent)]
    Config(#[from] pvsched_daemon::config::ConfigError),
    /// The command line is incomplete.
    #[error("{0}")]
    Usage(&'static str),
    /// The command line asks for something that does not go together.
    #[error("{0}")]
    UsageOwned(String),
}

impl CliError {
    /// 3: KVM unavailable; 4: the guest failed; 5: not permitted; 1: anything else.
    pub fn exit_code(&self) -> u8 {
        use pvsched_bench::bench::BenchError;
        let exp = match self {
            CliError::Experiment(e) | CliError::Bench(BenchError::Cell { source: e, .. }) => {
                Some(e)
            }
            _ => None,
        };
        if let Some(e) = exp {
            return experiment_exit_code(e);
        }
        match self {
            CliError::PolicyOpt(_)
            | CliError::CtlRefused(_)
            | CliError::Usage(_)
            | CliError::UsageOwned(_) => 2,
            CliError::Daemon(pvsched_daemon::DaemonError::Policy(_)) => 2,
            CliError::Daemon(pvsched_daemon::DaemonError::Trace(_)) => 3,
            CliError::Daemon(pvsched_daemon::DaemonError::NoVcpus(_)) => 2,
            CliError::Config(_) => 2,
            CliError::Bench(BenchError::StressNg(_)) => 3,
            // What this host lacks: the guest files, QEMU, stress-ng.
            CliError::LinuxTcg(
                pvsched_bench::linux_tcg::TcgError::NoGuest(_)
                | pvsched_bench::linux_tcg::TcgError::Qemu(_)
                | pvsched_bench::linux_tcg::TcgError::Bench(BenchError::StressNg(_))
                | pvsched_bench::linux_tcg::TcgError::Daemon(pvsched_daemon::DaemonError::Trace(_)),
            ) => 3,
            _ => 1,
        }
    }
}

/// Exit code of an experiment error (see [`CliError::exit_code`]).
fn experiment_exit_code(e: &experiment::Error) -> u8 {
    use pvsched_host::runtime::RuntimeError;
    use pvsched_vmm::engine::EngineError;
    use pvsched_vmm::Error as VmErr;
    match e {
        experiment::Error::Vm(
            VmErr::NoKvm
            | VmErr::KvmPermission
            | VmErr::NotKvm(_)
            | VmErr::OpenKvm(_)
            | VmErr::Unsupported(_),
        ) => 3,
        experiment::Error::Vm(VmErr::Vcpu(
            VcpuError::GuestException { .. }
            | VcpuError::EmulationFailure { .. }
            | VcpuError::Shutdown { .. },
        )) => 4,
        experiment::Error::Vm(VmErr::InvalidConfig(_)) => 2,
        experiment::Error::Policy(EngineError::Runtime(RuntimeError::Engine(_))) => 2,
        experiment::Error::Policy(EngineError::Trace(_)) => 3,
        experiment::Error::Sched(pvsched_host::sched::Error::Permission { .. }) => 5,
        _ => 1,
    }
}

fn config(args: &VmArgs) -> Result<ExperimentConfig, CliError> {
    let task = match args.task_period {
        TaskPeriod::Off => None,
        TaskPeriod::Every(period) => Some(TaskConfig {
            period,
            work: args.task_work,
        }),
    };
    let fault = match args.inject_fault {
        None => FaultInjection::None,
        Some(FaultArg::Ud) => FaultInjection::InvalidOpcode,
        Some(FaultArg::Unsupported) => FaultInjection::UnsupportedInstruction,
        Some(FaultArg::Gp) => FaultInjection::GeneralProtection,
        Some(FaultArg::Pf) => FaultInjection::PageFault,
    };
    Ok(ExperimentConfig {
        vm: VmConfig {
            pv: match args.pv {
                PvArg::Off => None,
                PvArg::V1 | PvArg::V3 => Some(PvConfig::default()),
            },
            vcpus: args.vcpus,
            guest: GuestConfig {
                interval: args.interval,
                task,
                busy: args.guest_load == GuestLoadArg::Busy,
                fault,
                pv_requests: match args.guest_requests {
                    GuestRequestsArg::Normal => GuestRequests::Normal,
                    GuestRequestsArg::Rogue => GuestRequests::Rogue,
                    GuestRequestsArg::Alternate => GuestRequests::Alternate {
                        phase: Duration::from_millis(2),
                    },
                },
                pv_offer: match args.pv {
                    PvArg::V3 => pvsched_vmm::V3_PV_OFFER,
                    _ => GuestConfig::default().pv_offer,
                },
                v3_busy: args.v3_busy,
                ..GuestConfig::default()
            },
        },
        duration: args.duration,
        host_load: args.host_load,
        vcpu_sched: args.vcpu_sched,
        probe_interval: args.probe_interval.unwrap_or(args.interval),
        policy: PolicyConfig {
            driver: args.policy.clone(),
            opts: DriverOptions::parse(args.policy_opts.iter().map(String::as_str))?,
            quiet_gate: match args.boost_when {
                BoostWhen::Contended => Some(QuietGate::default()),
                BoostWhen::Always => None,
            },
            max_boosted: args.max_boosted.0,
            engine_class: args.engine_class,
        },
        host_events: match args.host_events {
            // `v3-default` deboosts a halted guest to SCHED_IDLE: only a host-side wake-up
            // event (the LAPIC timer's expiry) lifts it again in time on a busy host.
            HostEvents::Auto => ((args.policy == "dynamic" && args.pv == PvArg::Off)
                || args.policy == "v3-default")
                .then(TraceConfig::default),
            HostEvents::Set(c) if c.any() => Some(c),
            HostEvents::Set(_) => None,
        },
        task_by_vcpu: Vec::new(),
        external_daemon: None,
        memory_file: args.memory_file.clone(),
        layout: args.layout,
    })
}

/// Runs `pvsched vm`.
pub fn run(args: VmArgs) -> Result<ExitCode, CliError> {
    let interrupt = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, interrupt.clone()).map_err(CliError::Signals)?;
    }
    let outcome = experiment::run(&config(&args)?, &interrupt)?;
    print!("{}", pvsched_bench::report::render(&outcome.report));
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&outcome.report).expect("report serializes");
        std::fs::write(path, json + "\n").map_err(|source| CliError::Json {
            path: path.display().to_string(),
            source,
        })?;
    }
    Ok(if outcome.report.interrupted {
        ExitCode::from(EXIT_INTERRUPTED)
    } else {
        ExitCode::SUCCESS
    })
}
