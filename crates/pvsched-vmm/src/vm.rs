//! The testbed micro-VM: creation, vCPU threads, and a clean stop on every path.

use crate::layout::{self, CODE_ADDR, CODE_MAX, MAX_VCPUS, MEM_SIZE};
use crate::pvdevice::{PvConfig, PvDevice, PvEvent};
use crate::vcpu::{self, ExitHook, Vcpu, VcpuError, VcpuRunStats};
use crate::x86;
use kvm_bindings::{
    kvm_enable_cap, kvm_irq_routing_entry, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_userspace_memory_region, CpuId, KvmIrqRouting, Msrs, KVM_CAP_X86_USER_SPACE_MSR,
    KVM_IRQ_ROUTING_MSI, KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE, KVM_MSR_EXIT_REASON_FILTER,
};
use kvm_ioctls::{
    IoEventAddress, Kvm, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, NoDatamatch,
    VcpuFd, VmFd,
};
use pvsched_guest::image::{EVENT_VECTOR, EXCEPTION_STUB_SIZE, TIMER_VECTOR};
use pvsched_guest::mailbox::{self, FaultInjection, Mailbox, MAILBOX_MAGIC, RING_LEN};
use std::mem::offset_of;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

/// First GSI used for MSI routes (GSIs below are the in-kernel IOAPIC's pins).
const FIRST_MSI_GSI: u32 = 24;

/// Shortest latency-probe interval: below this the emulated guest main loop cannot keep up.
pub const MIN_INTERVAL: Duration = Duration::from_micros(50);

/// Errors of VM creation and control.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/dev/kvm` does not exist.
    #[error("/dev/kvm does not exist: this host offers no KVM (enable virtualization, load kvm)")]
    NoKvm,
    /// `/dev/kvm` exists but may not be opened.
    #[error("no permission to open /dev/kvm: run as root or as a member of the kvm group")]
    KvmPermission,
    /// `/dev/kvm` does not answer like KVM.
    #[error("/dev/kvm is not a usable KVM device (API version {0}, expected 12)")]
    NotKvm(i32),
    /// Opening `/dev/kvm` failed otherwise.
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("KVM {what} failed")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// The ioctl error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM lacks something the testbed guest needs.
    #[error("KVM does not support {0}, which the testbed guest needs")]
    Unsupported(&'static str),
    /// The configuration cannot be run.
    #[error("invalid VM configuration: {0}")]
    InvalidConfig(String),
    /// Guest memory could not be allocated.
    #[error("cannot allocate guest memory")]
    Memory(#[source] vm_memory::mmap::FromRangesError),
    /// The guest memory file could not be created.
    #[error("cannot create the guest memory file {0}")]
    MemoryFile(std::path::PathBuf, #[source] std::io::Error),
    /// Writing to guest memory failed.
    #[error("cannot write guest memory")]
    GuestMemory(#[from] GuestMemoryError),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// The protocol device could not be created.
    #[error("cannot create the pvsched protocol device")]
    PvDevice(#[from] crate::pvdevice::PvError),
    /// A vCPU index is out of range.
    #[error("no vCPU {0} in this VM")]
    NoVcpu(usize),
    /// A vCPU thread could not be started.
    #[error("cannot start vCPU thread {index}")]
    Spawn {
        /// vCPU index.
        index: usize,
        /// The spawn error.
        #[source]
        source: std::io::Error,
    },
    /// A vCPU thread panicked.
    #[error("vCPU thread {0} panicked")]
    VcpuPanicked(usize),
    /// A vCPU ended with an error.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

/// The deadline task each vCPU runs: every `period`, `work` of computation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskConfig {
    /// Period, which is also each job's relative deadline.
    pub period: Duration,
    /// Work per job.
    pub work: Duration,
}

/// What the guest on every vCPU does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestConfig {
    /// Latency-probe timer period.
    pub interval: Duration,
    /// Deadline task, if any.
    pub task: Option<TaskConfig>,
    /// Keep the vCPU runnable between timer events.
    pub busy: bool,
    /// Fault to raise at start (tests).
    pub fault: FaultInjection,
    /// The pvsched offer the guest makes (`negotiate::offer`); 0: the guest does not look
    /// for pvsched.
    pub pv_offer: u64,
    /// Run the lazy-request exercise with this many nested requests (tests).
    pub pv_exercise: Option<u64>,
    /// How the guest makes its pvsched requests.
    pub pv_requests: GuestRequests,
    /// With the v3 page: what the guest says its busy loop is (NORMAL or BATCH at a nice).
    pub v3_busy: pvsched_proto::v3::TaskDesc,
    /// With the v3 page: what the guest says its deadline task is.
    pub v3_task: pvsched_proto::v3::TaskDesc,
}

/// The offer of a testbed guest that speaks the pvsched v3 page (version 3, no features).
pub const V3_PV_OFFER: u64 =
    pvsched_proto::negotiate::offer(1 << pvsched_proto::v3::PVSCHED_VERSION_V3, 0);

/// How the testbed guest makes its pvsched requests (`pvsched vm --guest-requests`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GuestRequests {
    /// Around its interrupts, softirqs, preempt-off sections and deadline-task jobs.
    #[default]
    Normal,
    /// Requests a boost (a preempt-off section) and never releases it; no latency probe.
    Rogue,
    /// Switches between an RT-task and an IRQ request every `phase`, never releasing both;
    /// no latency probe.
    Alternate {
        /// How long each request is held.
        phase: Duration,
    },
}

/// The offer the testbed guest makes by default: version 1 with every v1 feature.
pub const DEFAULT_PV_OFFER: u64 = pvsched_proto::negotiate::offer(
    pvsched_proto::abi::VERSIONS_V1,
    pvsched_proto::abi::feature::ALL_V1,
);

impl Default for GuestConfig {
    fn default() -> Self {
        GuestConfig {
            interval: Duration::from_micros(500),
            task: Some(TaskConfig {
                period: Duration::from_millis(2),
                work: Duration::from_micros(250),
            }),
            busy: false,
            fault: FaultInjection::None,
            pv_offer: DEFAULT_PV_OFFER,
            pv_exercise: None,
            pv_requests: GuestRequests::Normal,
            v3_busy: pvsched_proto::v3::TaskDesc::normal(0),
            v3_task: pvsched_proto::v3::TaskDesc::fifo(50),
        }
    }
}

/// A testbed VM's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// Number of vCPUs, 1 to [`MAX_VCPUS`].
    pub vcpus: usize,
    /// The guest program's parameters.
    pub guest: GuestConfig,
    /// The pvsched protocol device the VMM offers, if any.
    pub pv: Option<PvConfig>,
}

impl VmConfig {
    /// Checks the configuration without touching KVM.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::InvalidConfig(m));
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return bad(format!(
                "{} vCPUs requested; the testbed runs 1 to {MAX_VCPUS}",
                self.vcpus
            ));
        }
        if self.guest.interval < MIN_INTERVAL {
            return bad(format!(
                "interval {:?} is below the minimum of {MIN_INTERVAL:?}",
                self.guest.interval
            ));
        }
        if self.guest.interval > Duration::from_secs(1) {
            return bad(format!("interval {:?} is above 1 s", self.guest.interval));
        }
        if let Some(t) = self.guest.task {
            if t.period < MIN_INTERVAL || t.period > Duration::from_secs(1) {
                return bad(format!(
                    "task period {:?} is outside {MIN_INTERVAL:?}..1s",
                    t.period
                ));
            }
            if t.work.is_zero() || t.work >= t.period {
                return bad(format!(
                    "task work {:?} must be above zero and below the period {:?}",
                    t.work, t.period
                ));
            }
        }
        Ok(())
    }
}

fn duration_to_tsc(d: Duration, tsc_khz: u64) -> u64 {
    (d.as_nanos() * tsc_khz as u128 / 1_000_000) as u64
}

/// Converts TSC cycles to nanoseconds for a TSC running at `tsc_khz`.
pub fn tsc_to_ns(cycles: u64, tsc_khz: u64) -> u64 {
    let ns = cycles as u128 * 1_000_000 / tsc_khz.max(1) as u128;
    ns.min(u64::MAX as u128) as u64
}

/// The mailbox as plain bytes for guest-memory reads and writes.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct RawMailbox(Mailbox);

// SAFETY: `Mailbox` is `repr(C)` and made only of `u64` fields: no padding, and every bit
// pattern is a valid value.
unsafe impl vm_memory::ByteValued for RawMailbox {}

/// Opens `/dev/kvm`, mapping the usual failures to clear errors.
pub fn open_kvm() -> Result<Kvm, Error> {
    let kvm = Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT | libc::ENODEV => Error::NoKvm,
        libc::EACCES | libc::EPERM => Error::KvmPermission,
        _ => Error::OpenKvm(e),
    })?;
    match kvm.get_api_version() {
        KVM_API_VERSION => Ok(kvm),
        v => Err(Error::NotKvm(v)),
    }
}

/// The only stable KVM API version.
const KVM_API_VERSION: i32 = 12;

pub use pvsched_host::clock::{rdtsc, TscClock};

/// Measures guest TSC − host TSC on `fd` (before the vCPU runs): the narrowest of 16
/// brackets of KVM_GET_MSRS(IA32_TSC) by host `rdtsc`.
fn measure_tsc_offset(fd: &VcpuFd) -> Result<i64, Error> {
    const IA32_TSC: u32 = 0x10;
    let mut best: Option<(u64, i64)> = None;
    for _ in 0..16 {
        let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: IA32_TSC,
            ..Default::default()
        }])
        .map_err(|_| Error::Unsupported("reading IA32_TSC"))?;
        let h0 = rdtsc();
        fd.get_msrs(&mut msrs).map_err(kvm_err("get IA32_TSC"))?;
        let h1 = rdtsc();
        let guest = msrs.as_slice()[0].data;
        let width = h1.wrapping_sub(h0);
        let offset = guest.wrapping_sub(h0 + width / 2) as i64;
        if best.is_none_or(|(w, _)| width < w) {
            best = Some((width, offset));
        }
    }
    Ok(best.map_or(0, |(_, o)| o))
}

/// A created, not yet running testbed VM.
pub struct Vm {
    vm: VmFd,
    mem: GuestMemoryMmap,
    vcpus: Vec<VcpuFd>,
    tsc_khz: u64,
    tsc_offset: i64,
    pv: Option<(Arc<PvDevice>, mpsc::Receiver<PvEvent>)>,
}

impl Vm {
    /// Creates the VM: in-kernel irqchip, guest memory with tables and the guest image,
    /// `config.vcpus` vCPUs in long mode with x2APIC, each with its mailbox written.
    pub fn new(config: &VmConfig) -> Result<Vm, Error> {
        Self::with_tasks(config, &[])
    }

    /// Like [`Vm::new`], with the deadline task of vCPU `i` taken from `tasks[i]` where that
    /// is `Some` (e.g. a 2, 4 and 10 ms task on three vCPUs).
    pub fn with_tasks(config: &VmConfig, tasks: &[Option<TaskConfig>]) -> Result<Vm, Error> {
        Self::with_memory_file(config, tasks, None)
    }

    /// Like [`Vm::with_tasks`], with guest RAM in a shared mapping of the file `memory_file`
    /// (created or truncated to the RAM size) instead of anonymous memory: another process
    /// (pvsched's daemon) can then map it and read the guests' pvsched slots.
    pub fn with_memory_file(
        config: &VmConfig,
        tasks: &[Option<TaskConfig>],
        memory_file: Option<&std::path::Path>,
    ) -> Result<Vm, Error> {
        config.validate()?;
        for t in tasks.iter().flatten() {
            VmConfig {
                guest: GuestConfig {
                    task: Some(*t),
                    ..config.guest
                },
                ..*config
            }
            .validate()?;
        }
        let kvm = open_kvm()?;
        if kvm.get_max_vcpus() < config.vcpus {
            return Err(Error::InvalidConfig(format!(
                "KVM allows at most {} vCPUs per VM",
                kvm.get_max_vcpus()
            )));
        }
        let vm = kvm.create_vm().map_err(kvm_err("create VM"))?;
        vm.create_irq_chip().map_err(kvm_err("create irqchip"))?;
        let file = match memory_file {
            Some(path) => {
                use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
                let err = |e| Error::MemoryFile(path.to_path_buf(), e);
                // Guest RAM is the guest's: readable and writable by its owner only, and never
                // written through a symbolic link someone else placed.
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(path)
                    .map_err(err)?;
                f.set_permissions(std::fs::Permissions::from_mode(0o600))
                    .map_err(err)?;
                f.set_len(MEM_SIZE).map_err(err)?;
                Some(vm_memory::FileOffset::new(f, 0))
            }
            None => None,
        };
        let mem =
            GuestMemoryMmap::from_ranges_with_files([(GuestAddress(0), MEM_SIZE as usize, file)])
                .map_err(Error::Memory)?;
        for (slot, region) in mem.iter().enumerate() {
            let host = mem
                .get_host_address(region.start_addr())
                .map_err(Error::GuestMemory)?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: 0,
            };
            // SAFETY: the region is a live mmap owned by `mem`, which the returned `Vm`
            // (and, later, `RunningVm`) keeps alive as long as the VM fd.
            unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("set memory region"))?;
        }
        let image = pvsched_guest::image();
        if image.code.len() as u64 > CODE_MAX {
            return Err(Error::InvalidConfig("guest image too large".into()));
        }
        mem.write_slice(image.code, GuestAddress(CODE_ADDR))?;
        x86::write_page_tables(&mem)?;
        x86::write_descriptor_tables(&mem, |v| match v {
            TIMER_VECTOR => x86::code_gpa(image.timer_handler),
            EVENT_VECTOR => x86::code_gpa(image.event_handler),
            _ => x86::code_gpa(image.stubs + v as u64 * EXCEPTION_STUB_SIZE),
        })?;
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("get supported CPUID"))?;
        check_cpuid(&supported)?;
        let pv = match config.pv {
            Some(pv_cfg) => Some(create_pv_device(&vm, &mem, pv_cfg, config.vcpus)?),
            None => None,
        };

        let mut vcpus = Vec::with_capacity(config.vcpus);
        let mut tsc_khz = 0;
        let mut tsc_offset = 0;
        for index in 0..config.vcpus {
            let fd = vm
                .create_vcpu(index as u64)
                .map_err(kvm_err("create vCPU"))?;
            let mut cpuid = cpuid_for(&supported, index as u32);
            if let Some((dev, _)) = &pv {
                dev.add_cpuid(&mut cpuid, index);
            }
            fd.set_cpuid2(&cpuid).map_err(kvm_err("set CPUID"))?;
            let mut sregs = fd.get_sregs().map_err(kvm_err("get sregs"))?;
            x86::set_long_mode(&mut sregs);
            fd.set_sregs(&sregs).map_err(kvm_err("set sregs"))?;
            let mailbox_gpa = layout::vcpu_region(index);
            let regs = kvm_regs {
                rip: x86::code_gpa(image.entry),
                rsp: layout::vcpu_stack_top(index),
                rbx: mailbox_gpa,
                rflags: 0x2,
                ..Default::default()
            };
            fd.set_regs(&regs).map_err(kvm_err("set regs"))?;
            // With the in-kernel irqchip, APs wait for INIT/SIPI; the VMM starts them itself.
            fd.set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            })
            .map_err(kvm_err("set MP state"))?;
            if index == 0 {
                tsc_khz = fd.get_tsc_khz().map_err(kvm_err("get TSC frequency"))? as u64;
                if tsc_khz == 0 {
                    return Err(Error::Unsupported("a known TSC frequency"));
                }
                tsc_offset = measure_tsc_offset(&fd)?;
            }
            let guest = match tasks.get(index) {
                Some(Some(t)) => GuestConfig {
                    task: Some(*t),
                    ..config.guest
                },
                _ => config.guest,
            };
            mem.write_obj(
                RawMailbox(initial_mailbox(index, &guest, tsc_khz)),
                GuestAddress(mailbox_gpa),
            )?;
            vcpus.push(fd);
        }
        Ok(Vm {
            vm,
            mem,
            vcpus,
            tsc_khz,
            tsc_offset,
            pv,
        })
    }

    /// The guest TSC frequency in kHz (KVM_GET_TSC_KHZ).
    pub fn tsc_khz(&self) -> u64 {
        self.tsc_khz
    }

    /// Spawns one thread per vCPU, named `pvsched-vcpu<N>`. The threads wait for
    /// [`RunningVm::go`] before entering the guest, so callers can adjust them (scheduling
    /// class, tracing) first.
    pub fn start(self) -> Result<RunningVm, Error> {
        vcpu::install_kick_handler().map_err(kvm_err("install the vCPU kick signal handler"))?;
        let (pv, pv_events) = match self.pv {
            Some((dev, rx)) => (Some(dev), Some(rx)),
            None => (None, None),
        };
        let mut running = RunningVm {
            vm: self.vm,
            mem: self.mem.clone(),
            tsc: TscClock {
                offset: self.tsc_offset,
                khz: self.tsc_khz,
            },
            threads: Vec::new(),
            msi_routes: Vec::new(),
            pv: pv.clone(),
            pv_events,
            inject_hook: Arc::new(InjectHook::new()?),
        };
        for (index, fd) in self.vcpus.into_iter().enumerate() {
            let stop = Arc::new(AtomicBool::new(false));
            let (tid_tx, tid_rx) = mpsc::channel();
            let (go_tx, go_rx) = mpsc::channel::<Option<Box<dyn ExitHook>>>();
            let mut vcpu = Vcpu::new(index, fd, self.mem.clone(), pv.clone());
            let thread_stop = stop.clone();
            let handle = std::thread::Builder::new()
                .name(format!("pvsched-vcpu{index}"))
                .spawn(move || {
                    let _ = tid_tx.send(vcpu::gettid());
                    match go_rx.recv() {
                        Ok(hook) => vcpu.run(&thread_stop, hook).map(Some),
                        // The VM was dropped before it was started.
                        Err(_) => Ok(None),
                    }
                })
                .map_err(|source| Error::Spawn { index, source })?;
            let tid = tid_rx.recv().map_err(|_| Error::VcpuPanicked(index))?;
            running.threads.push(VcpuThread {
                index,
                tid,
                stop,
                go: Some(go_tx),
                hook: None,
                handle: Some(handle),
            });
        }
        Ok(running)
    }
}

/// Sets up the protocol device: MSR exits for its MSRs, doorbell ioeventfds.
fn create_pv_device(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    cfg: PvConfig,
    vcpus: usize,
) -> Result<(Arc<PvDevice>, mpsc::Receiver<PvEvent>), Error> {
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_X86_USER_SPACE_MSR,
        ..Default::default()
    };
    cap.args[0] = KVM_MSR_EXIT_REASON_FILTER as u64;
    vm.enable_cap(&cap)
        .map_err(|_| Error::Unsupported("user-space MSR exits (KVM_CAP_X86_USER_SPACE_MSR)"))?;
    // A zero bit denies the access in the kernel, which with the capability above becomes an
    // exit to this VMM; every other MSR stays with KVM.
    let deny = [0u8; 1];
    let range = MsrFilterRange {
        flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
        base: cfg.msr_base,
        msr_count: pvsched_proto::abi::MSR_COUNT,
        bitmap: &deny,
    };
    vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &[range])
        .map_err(kvm_err("set MSR filter"))?;
    let (dev, rx) = PvDevice::new(cfg, mem.clone(), MEM_SIZE, vcpus)?;
    for i in 0..vcpus {
        vm.register_ioevent(
            dev.doorbell(i),
            &IoEventAddress::Pio(dev.doorbell_port(i).into()),
            NoDatamatch,
        )
        .map_err(kvm_err("register doorbell ioeventfd"))?;
    }
    Ok((Arc::new(dev), rx))
}

fn check_cpuid(supported: &CpuId) -> Result<(), Error> {
    let leaf1 = supported
        .as_slice()
        .iter()
        .find(|e| e.function == 1)
        .ok_or(Error::Unsupported("CPUID leaf 1"))?;
    if leaf1.ecx & (1 << 21) == 0 {
        return Err(Error::Unsupported("x2APIC"));
    }
    if leaf1.ecx & (1 << 24) == 0 {
        return Err(Error::Unsupported("the TSC-deadline timer"));
    }
    Ok(())
}

/// KVM's supported CPUID with the vCPU's APIC ID filled in.
fn cpuid_for(supported: &CpuId, apic_id: u32) -> CpuId {
    let mut cpuid = supported.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | (apic_id << 24),
            0xb | 0x1f => e.edx = apic_id,
            _ => {}
        }
    }
    cpuid
}

fn initial_mailbox(index: usize, guest: &GuestConfig, tsc_khz: u64) -> Mailbox {
    let (period, work) = guest.task.map_or((0, 0), |t| {
        (
            duration_to_tsc(t.period, tsc_khz),
            duration_to_tsc(t.work, tsc_khz),
        )
    });
    let mut flags = (guest.fault as u64) << mailbox::FLAG_FAULT_SHIFT;
    if guest.busy {
        flags |= mailbox::FLAG_BUSY;
    }
    if guest.pv_exercise.is_some() {
        flags |= mailbox::FLAG_PV_EXERCISE;
    }
    let mut alternate = 0;
    match guest.pv_requests {
        GuestRequests::Normal => {}
        GuestRequests::Rogue => flags |= mailbox::FLAG_PV_ROGUE,
        GuestRequests::Alternate { phase } => {
            flags |= mailbox::FLAG_PV_ALTERNATE;
            alternate = duration_to_tsc(phase, tsc_khz).max(1);
        }
    }
    Mailbox {
        magic: MAILBOX_MAGIC,
        vcpu_index: index as u64,
        interval_tsc: duration_to_tsc(guest.interval, tsc_khz),
        task_period_tsc: period,
        task_work_tsc: work,
        flags,
        pv_offer: guest.pv_offer,
        pv_exercise_iters: guest.pv_exercise.unwrap_or(0),
        pv_alternate_tsc: alternate,
        pv_v3_task: intent(guest.v3_task, false),
        pv_v3_busy: intent(guest.v3_busy, false),
        pv_v3_idle: intent(pvsched_proto::v3::TaskDesc::idle(), true),
        ..Default::default()
    }
}

/// A v3 `task_intent` word with `current` and no pending task.
fn intent(current: pvsched_proto::v3::TaskDesc, idle: bool) -> u64 {
    pvsched_proto::v3::TaskIntent {
        current,
        pending: None,
        idle,
    }
    .encode()
}

struct VcpuThread {
    index: usize,
    tid: i32,
    stop: Arc<AtomicBool>,
    go: Option<mpsc::Sender<Option<Box<dyn ExitHook>>>>,
    hook: Option<Box<dyn ExitHook>>,
    handle: Option<JoinHandle<Result<Option<VcpuRunStats>, VcpuError>>>,
}

impl VcpuThread {
    fn kick(&self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = &self.handle {
            // ESRCH only means the thread already exited, which is what a kick wants.
            let _ = h.kill(vcpu::kick_signal());
        }
    }
}

/// Tells the host engine which vCPUs the VMM injected interrupts into (the VMM-side event
/// source of RFC v1's "boost on interrupt injection"): a queue plus an eventfd to wait on.
#[derive(Debug)]
pub struct InjectHook {
    efd: EventFd,
    pending: std::sync::Mutex<Vec<usize>>,
}

impl InjectHook {
    fn new() -> Result<Self, Error> {
        Ok(InjectHook {
            efd: EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?,
            pending: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// Records an injection into `vcpu` and wakes whoever waits on [`InjectHook::as_raw_fd`].
    pub fn note(&self, vcpu: usize) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(vcpu);
        let _ = self.efd.write(1);
    }

    /// Takes the vCPUs noted since the last call.
    pub fn take(&self) -> Vec<usize> {
        let _ = self.efd.read();
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Readable when injections are pending.
    pub fn as_raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.efd)
    }
}

/// Injects one interrupt vector into one vCPU through an irqfd, telling the [`InjectHook`]
/// first.
pub struct Injector {
    irq: EventFd,
    vcpu: usize,
    hook: Arc<InjectHook>,
}

impl Injector {
    /// Injects the interrupt.
    pub fn inject(&self) -> std::io::Result<()> {
        self.hook.note(self.vcpu);
        self.irq.write(1)
    }
}

/// Outcome of one vCPU after [`RunningVm::shutdown`].
pub type VcpuOutcome = Result<VcpuRunStats, Error>;

/// A testbed VM whose vCPU threads exist. Dropping it stops and joins them.
pub struct RunningVm {
    vm: VmFd,
    mem: GuestMemoryMmap,
    tsc: TscClock,
    threads: Vec<VcpuThread>,
    msi_routes: Vec<kvm_irq_routing_entry>,
    pv: Option<Arc<PvDevice>>,
    pv_events: Option<mpsc::Receiver<PvEvent>>,
    inject_hook: Arc<InjectHook>,
}

impl RunningVm {
    /// Number of vCPUs.
    pub fn vcpus(&self) -> usize {
        self.threads.len()
    }

    /// Kernel thread ids of the vCPU threads, by vCPU index.
    pub fn tids(&self) -> Vec<i32> {
        self.threads.iter().map(|t| t.tid).collect()
    }

    /// The guest TSC frequency in kHz.
    pub fn tsc_khz(&self) -> u64 {
        self.tsc.khz
    }

    /// Guest-TSC to host-time conversion.
    pub fn tsc_clock(&self) -> TscClock {
        self.tsc
    }

    /// The protocol device, when the VM offers pvsched.
    pub fn pv_device(&self) -> Option<&Arc<PvDevice>> {
        self.pv.as_ref()
    }

    /// The protocol device's MSR event stream (once), for a [`crate::pvdevice::PvPoller`].
    pub fn take_pv_events(&mut self) -> Option<mpsc::Receiver<PvEvent>> {
        self.pv_events.take()
    }

    /// An eventfd KVM signals whenever the guest writes to I/O `port`, with no exit to
    /// userspace (ioeventfd, any data).
    pub fn ioeventfd(&self, port: u16) -> Result<EventFd, Error> {
        let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
        self.vm
            .register_ioevent(&fd, &IoEventAddress::Pio(port.into()), NoDatamatch)
            .map_err(kvm_err("register ioeventfd"))?;
        Ok(fd)
    }

    /// An eventfd that, when written, injects interrupt `vector` into vCPU `index` (irqfd
    /// on an MSI route to that vCPU's APIC). The routing table holds only these MSI routes:
    /// the testbed has no legacy interrupt sources.
    pub fn irqfd(&mut self, index: usize, vector: u8) -> Result<EventFd, Error> {
        if index >= self.threads.len() {
            return Err(Error::NoVcpu(index));
        }
        let gsi = FIRST_MSI_GSI + self.msi_routes.len() as u32;
        let mut entry = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            ..Default::default()
        };
        // Fixed delivery, edge, physical destination = the vCPU's APIC ID (its index).
        entry.u.msi.address_lo = 0xfee0_0000 | ((index as u32) << 12);
        entry.u.msi.data = vector as u32;
        let mut routes = self.msi_routes.clone();
        routes.push(entry);
        let mut table = KvmIrqRouting::new(routes.len())
            .map_err(|_| Error::InvalidConfig("too many interrupt routes".into()))?;
        table.as_mut_slice().copy_from_slice(&routes);
        self.vm
            .set_gsi_routing(&table)
            .map_err(kvm_err("set GSI routing"))?;
        self.msi_routes = routes;
        let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
        self.vm
            .register_irqfd(&fd, gsi)
            .map_err(kvm_err("register irqfd"))?;
        Ok(fd)
    }

    /// The hook through which the engine learns of interrupts this VMM injects.
    pub fn inject_hook(&self) -> Arc<InjectHook> {
        self.inject_hook.clone()
    }

    /// An [`Injector`] of `vector` into vCPU `index` (an irqfd on an MSI route) that reports
    /// every injection to [`RunningVm::inject_hook`].
    pub fn injector(&mut self, index: usize, vector: u8) -> Result<Injector, Error> {
        Ok(Injector {
            irq: self.irqfd(index, vector)?,
            vcpu: index,
            hook: self.inject_hook.clone(),
        })
    }

    /// Lets every vCPU thread enter the guest.
    pub fn go(&mut self) {
        for t in &mut self.threads {
            if let Some(go) = t.go.take() {
                let _ = go.send(t.hook.take());
            }
        }
    }

    /// Gives vCPU `index`'s thread `hook` to run after each of its exits (before
    /// [`RunningVm::go`]; afterwards it is dropped).
    pub fn set_exit_hook(&mut self, index: usize, hook: Box<dyn ExitHook>) {
        if let Some(t) = self.threads.get_mut(index) {
            if t.go.is_some() {
                t.hook = Some(hook);
            }
        }
    }

    /// A snapshot of vCPU `index`'s mailbox.
    pub fn mailbox(&self, index: usize) -> Result<Mailbox, Error> {
        let raw: RawMailbox = self
            .mem
            .read_obj(GuestAddress(layout::vcpu_region(index)))?;
        Ok(raw.0)
    }

    /// Reads the `u64` at `gpa` in guest memory (tests, reports); `None` outside guest RAM.
    pub fn peek(&self, gpa: u64) -> Option<u64> {
        self.mem.read_obj(GuestAddress(gpa)).ok()
    }

    /// Writes `value` to guest memory at `gpa`, as a hostile guest could (tests).
    pub fn scribble(&self, gpa: u64, value: u64) {
        let _ = self.mem.write_obj(value, GuestAddress(gpa));
    }

    /// Asks every guest to stop at its next loop iteration.
    pub fn request_stop(&self) {
        for t in &self.threads {
            let addr = layout::vcpu_region(t.index) + offset_of!(Mailbox, stop) as u64;
            // The region exists (written at creation); a failure here is impossible.
            let _ = self.mem.store(1u64, GuestAddress(addr), Ordering::Release);
        }
    }

    /// True once some vCPU thread has ended (guest done, error, or kicked).
    pub fn any_finished(&self) -> bool {
        self.threads
            .iter()
            .any(|t| t.handle.as_ref().is_none_or(|h| h.is_finished()))
    }

    /// True once every vCPU thread has ended.
    pub fn all_finished(&self) -> bool {
        self.threads
            .iter()
            .all(|t| t.handle.as_ref().is_none_or(|h| h.is_finished()))
    }

    /// Kicks every vCPU out of the guest; their threads end.
    pub fn kick_all(&self) {
        for t in &self.threads {
            t.kick();
        }
    }

    /// Stops the VM: asks the guests to stop, waits up to `grace` for them, kicks the rest,
    /// and joins every thread. Returns one outcome per vCPU.
    pub fn shutdown(&mut self, grace: Duration) -> Vec<VcpuOutcome> {
        self.request_stop();
        let deadline = Instant::now() + grace;
        while !self.all_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.kick_all();
        self.join_all()
    }

    fn join_all(&mut self) -> Vec<VcpuOutcome> {
        let mut out = Vec::with_capacity(self.threads.len());
        for t in &mut self.threads {
            t.go.take();
            let Some(h) = t.handle.take() else { continue };
            // Keep kicking until it is gone: a signal can land just before KVM_RUN starts
            // when the stop flag was already checked (immediate_exit still covers that, so
            // one kick suffices; the loop is cheap insurance against a missed signal).
            while !h.is_finished() {
                t.kick();
                std::thread::sleep(Duration::from_millis(1));
            }
            out.push(match h.join() {
                Ok(Ok(Some(stats))) => Ok(stats),
                Ok(Ok(None)) => Ok(VcpuRunStats::not_started()),
                Ok(Err(e)) => Err(Error::Vcpu(e)),
                Err(_) => Err(Error::VcpuPanicked(t.index)),
            });
        }
        out
    }

    /// A reader for vCPU `index`'s latency ring, starting at the ring's current head.
    pub fn ring_reader(&self, index: usize) -> RingReader {
        RingReader {
            index,
            cursor: 0,
            lost: 0,
        }
    }

    /// Reads the new latency samples (TSC cycles) of `reader`'s vCPU into `sink`.
    pub fn drain(&self, reader: &mut RingReader, mut sink: impl FnMut(u64)) -> Result<(), Error> {
        let base = layout::vcpu_region(reader.index);
        let head: u64 = self.mem.load(
            GuestAddress(base + offset_of!(Mailbox, ring_head) as u64),
            Ordering::Acquire,
        )?;
        let len = RING_LEN as u64;
        if head.wrapping_sub(reader.cursor) > len {
            // The guest lapped us (or wrote a head that went backwards): skip to what is
            // still in the ring and count the rest as lost.
            let fresh = head.saturating_sub(len);
            reader.lost += fresh.saturating_sub(reader.cursor);
            reader.cursor = fresh;
        }
        while reader.cursor < head {
            let slot = reader.cursor % len;
            let v: u64 = self
                .mem
                .read_obj(GuestAddress(base + mailbox::RING_OFFSET + slot * 8))?;
            sink(v);
            reader.cursor += 1;
        }
        Ok(())
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        self.kick_all();
        let _ = self.join_all();
    }
}

/// Cursor into one vCPU's latency ring.
#[derive(Clone, Copy, Debug)]
pub struct RingReader {
    index: usize,
    cursor: u64,
    lost: u64,
}

impl RingReader {
    /// Samples overwritten before they were read.
    pub fn lost(&self) -> u64 {
        self.lost
    }

    /// Samples read so far.
    pub fn read(&self) -> u64 {
        self.cursor
    }
}

impl VcpuRunStats {
    fn not_started() -> Self {
        VcpuRunStats {
            end: crate::vcpu::VcpuEnd::Kicked,
            wall: Duration::ZERO,
            cpu: Duration::ZERO,
            user_exits: 0,
            marks: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> VmConfig {
        VmConfig {
            vcpus: 2,
            guest: GuestConfig::default(),
            pv: None,
        }
    }

    #[test]
    fn default_config_is_valid() {
        cfg().validate().unwrap();
    }

    #[test]
    fn bad_configs_are_rejected_with_a_reason() {
        let mut c = cfg();
        c.vcpus = 0;
        assert!(c.validate().unwrap_err().to_string().contains("1 to 64"));
        c.vcpus = 65;
        assert!(c.validate().is_err());
        let mut c = cfg();
        c.guest.interval = Duration::from_micros(10);
        assert!(c.validate().unwrap_err().to_string().contains("minimum"));
        let mut c = cfg();
        c.guest.task = Some(TaskConfig {
            period: Duration::from_millis(2),
            work: Duration::from_millis(2),
        });
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("below the period"));
    }

    #[test]
    fn tsc_conversions_round_trip() {
        let khz = 2_596_120;
        let tsc = duration_to_tsc(Duration::from_micros(500), khz);
        assert_eq!(tsc, 1_298_060);
        assert_eq!(tsc_to_ns(tsc, khz), 500_000);
        assert_eq!(tsc_to_ns(u64::MAX, 1), u64::MAX, "saturates");
    }

    #[test]
    fn mailbox_carries_the_guest_config() {
        let g = GuestConfig {
            busy: true,
            fault: FaultInjection::InvalidOpcode,
            ..GuestConfig::default()
        };
        let m = initial_mailbox(3, &g, 1_000_000);
        assert_eq!(m.magic, MAILBOX_MAGIC);
        assert_eq!(m.vcpu_index, 3);
        assert_eq!(m.interval_tsc, 500_000);
        assert_eq!(m.task_period_tsc, 2_000_000);
        assert_eq!(m.task_work_tsc, 250_000);
        assert_eq!(m.flags & mailbox::FLAG_BUSY, mailbox::FLAG_BUSY);
        assert_eq!(m.fault_injection(), FaultInjection::InvalidOpcode as u64);
        let no_task = GuestConfig {
            task: None,
            ..GuestConfig::default()
        };
        assert_eq!(initial_mailbox(0, &no_task, 1_000_000).task_period_tsc, 0);
    }
}
