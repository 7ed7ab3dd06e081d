//! The `daemon` column of a run: pvsched's daemon driving the testbed VM from the outside,
//! as it would any VMM's: it finds the vCPU threads by name and boosts them from KVM/timer
//! tracepoints only (no protocol, no VMM hooks).

use crate::worker::Worker;
use pvsched_daemon::{DaemonConfig, DaemonError};
use pvsched_host::trace::TraceConfig;
use pvsched_policy::DriverOptions;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

/// What the daemon reported for one vCPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DaemonVcpu {
    /// Boosts.
    pub boosts: u64,
    /// Throttles.
    pub throttles: u64,
    /// Time boosted, ms.
    pub boosted_ms: f64,
}

/// The daemon running in this process for the VM's lifetime.
pub struct ExternalDaemon {
    worker: Worker<Result<(), DaemonError>>,
    socket: PathBuf,
    dir: PathBuf,
}

impl ExternalDaemon {
    /// Starts the daemon (driver `dynamic`, LAPIC-timer tracepoints) on this process's vCPU
    /// threads and waits until it has attached them.
    pub fn start() -> Result<ExternalDaemon, DaemonError> {
        let dir = std::env::temp_dir().join(format!(
            "pvsched-external-{}-{}",
            std::process::id(),
            pvsched_host::clock::mono_ns()
        ));
        std::fs::create_dir_all(&dir).map_err(DaemonError::Io)?;
        let cfg = DaemonConfig {
            vms: vec![pvsched_daemon::VmSource::Pid(std::process::id() as i32).into()],
            watch: false,
            driver: "dynamic".into(),
            opts: DriverOptions::new(),
            trace: TraceConfig::default(),
            socket: dir.join("ctl.sock"),
            state_file: dir.join("state.json"),
            metrics: None,
        };
        let socket = cfg.socket.clone();
        let (tx, rx) = mpsc::channel();
        let mut worker = Worker::spawn("pvsched-daemon", move |stop| {
            pvsched_daemon::run(&cfg, stop, |_| {
                let _ = tx.send(());
            })
        })
        .map_err(DaemonError::Io)?;
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(()) => Ok(ExternalDaemon {
                worker,
                socket,
                dir,
            }),
            Err(_) => {
                let e = worker.stop().and_then(Result::err);
                Err(e.unwrap_or(DaemonError::Io(std::io::Error::other(
                    "the daemon did not start",
                ))))
            }
        }
    }

    /// Stops the daemon (it restores every thread) and returns its per-vCPU counters and
    /// the number of tracepoint hits it used.
    pub fn stop(mut self) -> (Vec<DaemonVcpu>, u64) {
        let status = pvsched_daemon::ctl(&self.socket, "status").ok();
        self.halt();
        let Some(s) = status else {
            return (Vec::new(), 0);
        };
        let r = &s["result"];
        let vcpus = r["vms"][0]["vcpus"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|v| DaemonVcpu {
                        boosts: v["boosts"].as_u64().unwrap_or(0),
                        throttles: v["throttles"].as_u64().unwrap_or(0),
                        boosted_ms: v["boosted_ms"].as_f64().unwrap_or(0.0),
                    })
                    .collect()
            })
            .unwrap_or_default();
        (vcpus, r["host_events"].as_u64().unwrap_or(0))
    }

    fn halt(&mut self) {
        self.worker.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for ExternalDaemon {
    fn drop(&mut self) {
        self.halt();
    }
}
