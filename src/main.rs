//! `pvsched`: cooperative host/guest vCPU scheduling for KVM.

mod bench_cmd;
mod cli;
mod daemon_cmd;
mod vm_cmd;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let result = match cli.command {
        cli::Command::Vm(args) => vm_cmd::run(args),
        cli::Command::Bench(args) => bench_cmd::run(args),
        cli::Command::Daemon(args) => daemon_cmd::run(args),
        cli::Command::Ctl(args) => daemon_cmd::ctl(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pvsched: error: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                eprintln!("  caused by: {s}");
                source = s.source();
            }
            ExitCode::from(e.exit_code())
        }
    }
}
