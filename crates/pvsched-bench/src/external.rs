//! The `daemon` column of a run: pvsched's daemon driving the testbed VM from the outside,
//! as it would any VMM's: it finds the vCPU threads by name and boosts them from KVM/timer
//! tracepoints only (no protocol, no VMM hooks).

use crate::engine_host::HostLoopReport;
use crate::worker::Worker;
use pvsched_daemon::{DaemonConfig, DaemonError, DaemonStatus};
use pvsched_host::mechanism::EngineClass;
use pvsched_policy::DriverOptions;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

/// The daemon's custom slices (EEVDF, ns): `--base-slice` and `--vmm-slice`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Slices {
    /// The vCPU threads' class between boosts.
    pub base: Option<u64>,
    /// The VMM process's main thread.
    pub vmm: Option<u64>,
}

/// The daemon running in this process for the VM's lifetime.
pub struct ExternalDaemon {
    worker: Worker<Result<DaemonStatus, DaemonError>>,
    dir: PathBuf,
}

impl ExternalDaemon {
    /// Starts the daemon (driver `dynamic` with options `opts`, LAPIC-timer tracepoints) on
    /// this process's vCPU threads and waits until it has attached them.
    /// Its engine thread outranks the vCPUs it boosts as `engine_class` says.
    pub fn start(
        opts: DriverOptions,
        engine_class: EngineClass,
    ) -> Result<ExternalDaemon, DaemonError> {
        Self::start_with(
            vec![pvsched_daemon::VmSource::Pid(std::process::id() as i32).into()],
            pvsched_host::trace::TraceConfig::default(),
            false,
            "dynamic",
            opts,
            Slices::default(),
            engine_class,
        )
    }

    /// Starts the daemon (driver `dynamic` with options `opts`) on the VM `source` with the
    /// host events `trace`, and waits until it has attached it.
    pub fn start_for(
        source: pvsched_daemon::VmSource,
        trace: pvsched_host::trace::TraceConfig,
        opts: DriverOptions,
    ) -> Result<ExternalDaemon, DaemonError> {
        Self::start_driver_for(source, trace, "dynamic", opts)
    }

    /// Starts the daemon with driver `driver` and options `opts` on the VM `source`, with the
    /// host events `trace`, and waits until it has attached it.
    pub fn start_driver_for(
        source: pvsched_daemon::VmSource,
        trace: pvsched_host::trace::TraceConfig,
        driver: &str,
        opts: DriverOptions,
    ) -> Result<ExternalDaemon, DaemonError> {
        Self::start_driver_with_slices(source, trace, driver, opts, Slices::default())
    }

    /// [`ExternalDaemon::start_driver_for`] with the custom slices `slices`.
    pub fn start_driver_with_slices(
        source: pvsched_daemon::VmSource,
        trace: pvsched_host::trace::TraceConfig,
        driver: &str,
        opts: DriverOptions,
        slices: Slices,
    ) -> Result<ExternalDaemon, DaemonError> {
        Self::start_with(
            vec![source.into()],
            trace,
            false,
            driver,
            opts,
            slices,
            EngineClass::default(),
        )
    }

    /// Starts the daemon as an ivshmem server (no VM given: each QEMU that connects to
    /// [`ExternalDaemon::ivshmem_socket`] is attached when its guest module answers), with the
    /// host events `trace`, policy driver `driver` with `opts`, and the custom slices `slices`.
    pub fn start_ivshmem(
        trace: pvsched_host::trace::TraceConfig,
        driver: &str,
        opts: DriverOptions,
        slices: Slices,
    ) -> Result<ExternalDaemon, DaemonError> {
        Self::start_with(
            Vec::new(),
            trace,
            true,
            driver,
            opts,
            slices,
            EngineClass::default(),
        )
    }

    /// The ivshmem socket of a daemon started by [`ExternalDaemon::start_ivshmem`].
    pub fn ivshmem_socket(&self) -> PathBuf {
        self.dir.join("ivshmem.sock")
    }

    fn start_with(
        vms: Vec<pvsched_daemon::VmSpec>,
        trace: pvsched_host::trace::TraceConfig,
        ivshmem: bool,
        driver: &str,
        opts: DriverOptions,
        slices: Slices,
        engine_class: EngineClass,
    ) -> Result<ExternalDaemon, DaemonError> {
        let dir = std::env::temp_dir().join(format!(
            "pvsched-external-{}-{}",
            std::process::id(),
            pvsched_host::clock::mono_ns()
        ));
        std::fs::create_dir_all(&dir).map_err(DaemonError::Io)?;
        let cfg = DaemonConfig {
            trace,
            driver: driver.to_string(),
            opts,
            base_slice: slices.base,
            vmm_slice: slices.vmm,
            engine_class,
            ivshmem: ivshmem.then(|| dir.join("ivshmem.sock")),
            ..DaemonConfig::new(vms, dir.join("ctl.sock"), dir.join("state.json"))
        };
        let (tx, rx) = mpsc::channel();
        let mut worker = Worker::spawn("pvsched-daemon", move |stop| {
            pvsched_daemon::run(&cfg, stop, |_| {
                let _ = tx.send(());
            })
        })
        .map_err(DaemonError::Io)?;
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(()) => Ok(ExternalDaemon { worker, dir }),
            Err(_) => {
                let e = worker.stop().and_then(Result::err);
                Err(e.unwrap_or(DaemonError::Io(std::io::Error::other(
                    "the daemon did not start",
                ))))
            }
        }
    }

    /// Stops the daemon (it restores every thread) and returns its final status.
    pub fn stop_status(mut self) -> DaemonStatus {
        let status = self.worker.stop().and_then(Result::ok).unwrap_or_default();
        let _ = std::fs::remove_dir_all(&self.dir);
        status
    }

    /// Stops the daemon (it restores every thread) and returns its final status as the run's
    /// engine report.
    pub fn stop(self) -> HostLoopReport {
        let status = self.stop_status();
        let runtime = pvsched_host::runtime::Status {
            enabled: status.enabled,
            cost: status.cost,
            vms: status.vms.into_iter().map(|v| v.vm).collect(),
            host_events_lost: status.host_events_lost,
            apply_errors: status.apply_errors,
            apply_errors_by_kind: status.apply_errors_by_kind,
            unrestored: status.unrestored,
            errors: status.errors,
        };
        HostLoopReport::from_status(
            "daemon (dynamic, tracepoints only)".into(),
            &runtime,
            Vec::new(),
        )
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
