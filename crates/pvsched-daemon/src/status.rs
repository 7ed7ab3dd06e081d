//! The daemon's typed status: what `ctl status` answers (as JSON) and metrics render. Built on
//! the runtime's status, with where each VM came from.

use pvsched_host::runtime::{Cost, VmStatus};
use serde::{Deserialize, Serialize};

/// One attached VM.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DaemonVm {
    /// Where its threads come from (`pid N`, `QMP path`, `tids [..]`).
    pub source: String,
    /// Its process, when attached by pid.
    pub pid: Option<i32>,
    /// The daemon reads this VM's pvsched slots.
    pub protocol: bool,
    /// Doorbells its guest rang (a VM served over ivshmem).
    #[serde(default)]
    pub doorbells: Option<u64>,
    /// What the runtime knows of it (id, driver, vCPUs, host events, boost latency).
    #[serde(flatten)]
    pub vm: VmStatus,
}

/// `ctl status`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DaemonStatus {
    /// Boosting enabled globally.
    pub enabled: bool,
    /// Host events (tracepoint hits, slot changes) fed to the engine, all VMs.
    pub host_events: u64,
    /// Tracepoint records the kernel dropped or throttled.
    pub host_events_lost: u64,
    /// Failed scheduling changes (and other errors of the engine).
    pub apply_errors: u64,
    /// Failed `sched_setattr` calls by kind (permission, invalid, busy, unsupported, other).
    #[serde(default)]
    pub apply_errors_by_kind: std::collections::BTreeMap<String, u64>,
    /// Threads whose original class the kernel refused to restore (retried).
    #[serde(default)]
    pub unrestored: Vec<i32>,
    /// The last few errors.
    pub errors: Vec<String>,
    /// The engine's own cost.
    pub cost: Cost,
    /// Attached VMs.
    pub vms: Vec<DaemonVm>,
    /// The last status of recently detached VMs (at most 16, oldest first).
    #[serde(default)]
    pub detached: Vec<DaemonVm>,
}
