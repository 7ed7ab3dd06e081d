//! `pvsched daemon`: pvsched's engine for VMs of existing VMMs (QEMU, crosvm,
//! cloud-hypervisor, Firecracker, and pvsched's own testbed), with no kernel patch and no VMM
//! change: it finds their vCPU threads by name, listens to KVM/timer tracepoints, boosts and
//! unboosts within budgets, and restores every thread it touched, also after `kill -9` (state
//! file).
#![deny(missing_docs)]

pub mod config;
pub mod daemon;
pub mod discover;
pub mod ivshmem;
pub mod metrics;
pub mod qmp;
pub mod slots;
pub mod state;
pub mod status;

pub use daemon::{ctl, run, DaemonConfig, DaemonError, VmSource, VmSpec};
pub use slots::ProtocolSpec;
pub use status::{DaemonStatus, DaemonVm};
