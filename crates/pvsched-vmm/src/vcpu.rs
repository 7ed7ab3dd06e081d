//! One vCPU: its run loop, and the kick that gets it out of `KVM_RUN`.
//!
//! The kick follows Firecracker: the vCPU thread publishes its `kvm_run` mapping in a
//! thread-local; the kick sets the vCPU's stop flag and sends [`kick_signal`] to the thread,
//! whose handler sets `kvm_run.immediate_exit`. Either `KVM_RUN` is interrupted (`EINTR`), or
//! the next `KVM_RUN` returns at once: no lost wake-up whichever comes first.

use crate::pvdevice::PvDevice;
use crate::stats::StatsFd;
use crate::x86::exception_name;
use kvm_bindings::{kvm_run, KVM_INTERNAL_ERROR_EMULATION};
use kvm_ioctls::{VcpuExit, VcpuFd};
use pvsched_guest::image::{PORT_DONE, PORT_FAULT, PORT_MARK, PORT_YIELD};
use std::cell::Cell;
use std::ptr::null_mut;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Errors that end a vCPU's run.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// The guest took an exception (its stubs report every vector to the VMM).
    #[error(
        "vCPU {index}: guest exception {name} (vector {vector}) at RIP {rip:#x}, \
         error code {error_code:#x}{cr2}",
        name = exception_name(*vector).unwrap_or("(not an exception)"),
        cr2 = if *vector == 14 { format!(", CR2 {cr2:#x}") } else { String::new() }
    )]
    GuestException {
        /// vCPU index.
        index: usize,
        /// Exception vector.
        vector: u8,
        /// Guest RIP of the faulting instruction.
        rip: u64,
        /// Error code (0 where the exception has none).
        error_code: u64,
        /// CR2 at the time of the fault (meaningful for #PF).
        cr2: u64,
    },
    /// KVM's instruction emulator could not run a guest instruction.
    #[error(
        "vCPU {index}: KVM could not emulate the guest instruction at RIP {rip:#x} \
         (bytes {bytes}); this KVM emulates guest kernel code and does not support it"
    )]
    EmulationFailure {
        /// vCPU index.
        index: usize,
        /// Guest RIP of the instruction.
        rip: u64,
        /// The instruction bytes, hex.
        bytes: String,
    },
    /// The guest triple-faulted.
    #[error("vCPU {index}: guest triple fault (KVM_EXIT_SHUTDOWN) at RIP {rip:#x}")]
    Shutdown {
        /// vCPU index.
        index: usize,
        /// Guest RIP when KVM gave up.
        rip: u64,
    },
    /// KVM returned an exit the testbed does not handle.
    #[error("vCPU {index}: unexpected VM exit {exit}")]
    UnexpectedExit {
        /// vCPU index.
        index: usize,
        /// Description of the exit.
        exit: String,
    },
    /// `KVM_RUN` failed.
    #[error("vCPU {index}: KVM_RUN failed")]
    Run {
        /// vCPU index.
        index: usize,
        /// The ioctl error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// How a vCPU's run ended when it did not fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuEnd {
    /// The guest saw the stop request and reported that it finished.
    GuestDone,
    /// The VMM kicked the vCPU out before the guest finished.
    Kicked,
}

/// What a vCPU thread measured about itself.
#[derive(Clone, Debug)]
pub struct VcpuRunStats {
    /// How the run ended.
    pub end: VcpuEnd,
    /// Wall time spent in the run loop.
    pub wall: Duration,
    /// CPU time of the vCPU thread during the run loop.
    pub cpu: Duration,
    /// Exits to userspace handled by the run loop.
    pub user_exits: u64,
    /// `(mark, KVM "exits" statistic)` for every write the guest made to its mark port, in
    /// order: lets tests count VM exits between two points of guest code.
    pub marks: Vec<(u8, u64)>,
}

thread_local! {
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN_PTR.with(|p| p.get());
    if !run.is_null() {
        // SAFETY: the pointer is set by this thread to its own vCPU's `kvm_run` mapping while
        // the `VcpuFd` is alive (see `RunPtrGuard`) and cleared before it is dropped; the
        // field is a plain byte the kernel reads at the next KVM_RUN.
        unsafe { std::ptr::write_volatile(&raw mut (*run).immediate_exit, 1) };
    }
}

/// The real-time signal used to kick vCPU threads (`SIGRTMIN`, as Firecracker).
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Installs the kick handler (once per process).
pub fn install_kick_handler() -> Result<(), kvm_ioctls::Error> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler);
    });
    result
}

/// Publishes the vCPU's `kvm_run` to the kick handler for as long as it lives.
struct RunPtrGuard;

impl RunPtrGuard {
    fn new(fd: &mut VcpuFd) -> Self {
        let run: *mut kvm_run = fd.get_kvm_run();
        KVM_RUN_PTR.with(|p| p.set(run));
        RunPtrGuard
    }
}

impl Drop for RunPtrGuard {
    fn drop(&mut self) {
        KVM_RUN_PTR.with(|p| p.set(null_mut()));
    }
}

/// Code the VMM runs on a vCPU's own thread after every exit to userspace, before it enters
/// the guest again: where the host engine observes the guest's slot and applies the vCPU's
/// own boosts and unboosts without waking anyone.
pub trait ExitHook: Send {
    /// Called after every exit to userspace.
    fn on_exit(&mut self);
}

/// A vCPU ready to run on the current thread.
pub struct Vcpu {
    index: usize,
    fd: VcpuFd,
    mem: GuestMemoryMmap,
    pv: Option<Arc<PvDevice>>,
    stats: Option<StatsFd>,
}

impl Vcpu {
    /// Wraps a configured vCPU fd; `pv` handles the protocol's MSRs.
    pub fn new(index: usize, fd: VcpuFd, mem: GuestMemoryMmap, pv: Option<Arc<PvDevice>>) -> Self {
        // Statistics are optional: a KVM without them only loses the mark counts.
        let stats = StatsFd::open(&fd).ok();
        Vcpu {
            index,
            fd,
            mem,
            pv,
            stats,
        }
    }

    /// Runs the vCPU until the guest reports it is done, `stop` is set and the thread is
    /// kicked, or an error. Must be called on the thread that the kick targets.
    pub fn run(
        &mut self,
        stop: &AtomicBool,
        mut hook: Option<Box<dyn ExitHook>>,
    ) -> Result<VcpuRunStats, VcpuError> {
        let _published = RunPtrGuard::new(&mut self.fd);
        let start = Instant::now();
        let cpu0 = thread_cpu_time();
        let mut user_exits = 0u64;
        let mut marks = Vec::new();
        let end = loop {
            if stop.load(Ordering::Acquire) {
                break VcpuEnd::Kicked;
            }
            let exit = self.fd.run();
            user_exits += 1;
            if let Some(h) = hook.as_mut() {
                h.on_exit();
            }
            match exit {
                Ok(VcpuExit::IoOut(PORT_YIELD, _)) => {}
                Ok(VcpuExit::IoOut(PORT_DONE, _)) => break VcpuEnd::GuestDone,
                Ok(VcpuExit::IoOut(PORT_MARK, data)) => {
                    let exits = self.stats.as_ref().and_then(|s| s.read("exits"));
                    marks.push((data.first().copied().unwrap_or(0), exits.unwrap_or(0)));
                }
                Ok(VcpuExit::X86Rdmsr(exit)) => {
                    match self
                        .pv
                        .as_ref()
                        .and_then(|d| d.rdmsr(self.index, exit.index))
                    {
                        Some(v) => {
                            *exit.data = v;
                            *exit.error = 0;
                        }
                        None => *exit.error = 1,
                    }
                }
                Ok(VcpuExit::X86Wrmsr(exit)) => {
                    let ok = self
                        .pv
                        .as_ref()
                        .is_some_and(|d| d.wrmsr(self.index, exit.index, exit.data));
                    *exit.error = if ok { 0 } else { 1 };
                }
                Ok(VcpuExit::IoOut(PORT_FAULT, data)) => {
                    let vector = data.first().copied().unwrap_or(0xff);
                    return Err(self.exception(vector));
                }
                // Ports no device answers: writes are dropped, reads float high.
                Ok(VcpuExit::IoOut(_, _)) => {}
                Ok(VcpuExit::IoIn(_, data)) => data.fill(0xff),
                Ok(VcpuExit::InternalError) => return Err(self.internal_error()),
                Ok(VcpuExit::Shutdown) => {
                    let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
                    return Err(VcpuError::Shutdown {
                        index: self.index,
                        rip,
                    });
                }
                Ok(other) => {
                    return Err(VcpuError::UnexpectedExit {
                        index: self.index,
                        exit: format!("{other:?}"),
                    })
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                }
                Err(source) => {
                    return Err(VcpuError::Run {
                        index: self.index,
                        source,
                    })
                }
            }
        };
        Ok(VcpuRunStats {
            end,
            wall: start.elapsed(),
            cpu: thread_cpu_time().saturating_sub(cpu0),
            user_exits,
            marks,
        })
    }

    /// Builds the error for an exception stub's report: the stub left
    /// `[vector, error code, rip, cs, rflags]` on the stack.
    fn exception(&self, vector: u8) -> VcpuError {
        let rsp = self.fd.get_regs().map(|r| r.rsp).unwrap_or(0);
        let word = |i: u64| -> u64 {
            self.mem
                .read_obj(GuestAddress(rsp.wrapping_add(i * 8)))
                .unwrap_or(0)
        };
        VcpuError::GuestException {
            index: self.index,
            vector,
            error_code: word(1),
            rip: word(2),
            cr2: self.fd.get_sregs().map(|s| s.cr2).unwrap_or(0),
        }
    }

    fn internal_error(&mut self) -> VcpuError {
        // SAFETY: KVM set exit_reason to KVM_EXIT_INTERNAL_ERROR, so `internal` is the
        // active member of the exit union.
        let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
        let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
        if suberror == KVM_INTERNAL_ERROR_EMULATION {
            let mut bytes = [0u8; 8];
            let n = self
                .mem
                .read_slice(&mut bytes, GuestAddress(rip))
                .map(|_| bytes.len())
                .unwrap_or(0);
            let hex: Vec<String> = bytes[..n].iter().map(|b| format!("{b:02x}")).collect();
            VcpuError::EmulationFailure {
                index: self.index,
                rip,
                bytes: hex.join(" "),
            }
        } else {
            VcpuError::UnexpectedExit {
                index: self.index,
                exit: format!("KVM_EXIT_INTERNAL_ERROR suberror {suberror} at RIP {rip:#x}"),
            }
        }
    }
}

/// CPU time consumed by the calling thread.
pub fn thread_cpu_time() -> Duration {
    Duration::from_nanos(pvsched_host::clock::thread_cpu_ns())
}

/// The calling thread's kernel thread id.
pub fn gettid() -> i32 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::gettid() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exception_error_names_the_vector_and_rip() {
        let e = VcpuError::GuestException {
            index: 1,
            vector: 14,
            rip: 0x10_0123,
            error_code: 2,
            cr2: 0x7ff_0000_0000,
        };
        let msg = e.to_string();
        assert!(msg.contains("#PF page fault"), "{msg}");
        assert!(msg.contains("vector 14"), "{msg}");
        assert!(msg.contains("RIP 0x100123"), "{msg}");
        assert!(msg.contains("CR2 0x7ff00000000"), "{msg}");
        let ud = VcpuError::GuestException {
            index: 0,
            vector: 6,
            rip: 1,
            error_code: 0,
            cr2: 0,
        };
        assert!(!ud.to_string().contains("CR2"));
    }

    #[test]
    fn kick_handler_without_a_vcpu_is_harmless() {
        install_kick_handler().unwrap();
        // No kvm_run published on this thread: the handler must do nothing.
        // SAFETY: raising a signal we installed a handler for.
        assert_eq!(unsafe { libc::raise(kick_signal()) }, 0);
    }

    #[test]
    fn thread_cpu_time_advances_with_work() {
        let t0 = thread_cpu_time();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
        assert!(thread_cpu_time() > t0, "{x}");
    }
}
