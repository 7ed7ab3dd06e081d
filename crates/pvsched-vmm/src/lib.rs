//! pvsched's reference VMM: a micro-VM on KVM built from the rust-vmm crates, running the
//! bare-metal testbed guest of `pvsched-guest` on one host thread per vCPU.
//!
//! - [`engine`]: the vCPU threads' side of pvsched's engine runtime (exit hooks);
//! - [`layout`]: the guest-physical memory map;
//! - [`x86`]: GDT/TSS/IDT, page tables and long-mode registers set up by the VMM;
//! - [`vcpu`]: the vCPU run loop and its kick (`immediate_exit` + signal);
//! - [`vm`]: VM creation, vCPU threads named `pvsched-vcpu<N>`, stop and join;
//! - [`pvdevice`]: the pvsched protocol device (discovery, negotiation, slots, doorbells);
//! - [`stats`]: KVM binary statistics.
#![deny(missing_docs)]

pub mod engine;
pub mod layout;
pub mod pvdevice;
pub mod stats;
pub mod vcpu;
pub mod vm;
pub mod x86;

pub use vcpu::{VcpuEnd, VcpuError, VcpuRunStats};
pub use vm::{
    open_kvm, Error, GuestConfig, GuestRequests, InjectHook, Injector, RingReader, RunningVm,
    TaskConfig, TscClock, Vm, VmConfig, V3_PV_OFFER,
};
