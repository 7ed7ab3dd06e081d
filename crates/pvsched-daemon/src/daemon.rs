//! The daemon: attaches to VMs of any VMM by their vCPU threads and runs pvsched's engine
//! runtime for them, fed by KVM/timer tracepoints shared by all VMs (no guest cooperation
//! needed) and by guest slots in memory files. This thread is the control plane: it answers
//! `ctl` and metrics requests and follows VMs coming and going, at normal priority, and only
//! sends commands to the runtime's real-time engine thread, which no client can stall.
//! Every thread it boosted is restored when it stops.

use crate::discover::{
    check_vcpu_thread, owner, process_of, vcpu_threads, Refusal, VcpuThread, Vmm,
};
use crate::ivshmem::{Connection, IvshmemServer};
use crate::slots::{GuestSlots, ProtocolSpec, SlotWatch};
use crate::state::{recover, Recovery, StateFile};
use crate::status::{DaemonStatus, DaemonVm};
use pvsched_host::runtime::{
    EventSource, Runtime, RuntimeConfig, RuntimeError, RuntimeHandle, VerifiedApplier, VmParts,
};
use pvsched_host::trace::{TraceConfig, TraceError, TraceSource};
use pvsched_policy::{DriverOptions, Engine, EngineError, VcpuKey};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How often `--watch` looks for VMs and vCPU threads appearing and vanishing.
const WATCH_PERIOD: Duration = Duration::from_secs(1);
/// How often guest slots in memory files are polled (they have no doorbell here).
const SLOT_POLL_NS: u64 = 1_000_000;
/// Largest ctl request read.
const MAX_REQUEST: u64 = 4096;
/// How long a ctl or metrics client may take to send its request.
const CLIENT_TIMEOUT: Duration = Duration::from_millis(200);

/// Where a VM's vCPU threads come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmSource {
    /// The vCPU-named threads of a process.
    Pid(i32),
    /// QEMU's `query-cpus-fast` on this QMP socket.
    Qmp(PathBuf),
    /// Explicit thread ids, vCPU `i` = `tids[i]`.
    Tids(Vec<i32>),
}

impl std::fmt::Display for VmSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmSource::Pid(p) => write!(f, "pid {p}"),
            VmSource::Qmp(q) => write!(f, "QMP {}", q.display()),
            VmSource::Tids(t) => write!(f, "tids {t:?}"),
        }
    }
}

/// A VM to attach: its vCPU threads, and optionally its guests' pvsched slots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmSpec {
    /// Where the vCPU threads come from.
    pub source: VmSource,
    /// Guest memory file and slot addresses, when the VMM provides them.
    pub protocol: Option<ProtocolSpec>,
}

impl From<VmSource> for VmSpec {
    fn from(source: VmSource) -> Self {
        VmSpec {
            source,
            protocol: None,
        }
    }
}

/// What the daemon does.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// VMs to attach.
    pub vms: Vec<VmSpec>,
    /// Follow VMs (any process with vCPU-named threads) starting and stopping.
    pub watch: bool,
    /// Policy driver for every VM.
    pub driver: String,
    /// Its options.
    pub opts: DriverOptions,
    /// Tracepoints feeding the engine.
    pub trace: TraceConfig,
    /// `ctl` socket.
    pub socket: PathBuf,
    /// State file for crash recovery.
    pub state_file: PathBuf,
    /// Serve Prometheus metrics on this (local) address.
    pub metrics: Option<std::net::SocketAddr>,
    /// Allow a metrics address other than loopback (anyone who can reach it reads the VMs'
    /// boost statistics).
    pub metrics_public: bool,
    /// Whose VMs may be boosted (process owner or group; default root only).
    pub allowed: crate::discover::Allowed,
    /// Group that may read `status` through the ctl socket (mode 0660 then, else 0600);
    /// changes are root's only.
    pub ctl_group: Option<u32>,
    /// Boost only while the host's CPUs are contended (`None`: always).
    pub quiet_gate: Option<pvsched_host::pressure::QuietGate>,
    /// At most this many vCPU threads boosted at once, over all VMs (`None`: no cap).
    pub max_boosted: Option<usize>,
    /// Serve QEMU's `ivshmem-doorbell` devices on this socket: guests with the pvsched guest
    /// module get their slots there ([`crate::ivshmem`]).
    pub ivshmem: Option<PathBuf>,
    /// Give every attached vCPU thread in a fair policy an EEVDF custom slice of this many ns
    /// (100 µs–100 ms) as its class between boosts (`None`: leave its class as it is): a
    /// waking vCPU then gets an earlier turn, at no extra CPU share. Taken back when the
    /// thread is detached and when the daemon stops; recorded for crash recovery like a
    /// boost.
    pub base_slice: Option<u64>,
    /// Give the main thread of each attached VM's process (the thread whose id is the process
    /// id, when it is not a vCPU thread) an EEVDF custom slice of this many ns (100 µs–100 ms,
    /// `None`: leave it). Under QEMU TCG that thread runs the guest's timers and wakes the
    /// vCPUs. A custom slice is not a boost: the thread keeps its policy, nice and CPU share,
    /// and gets an earlier turn when it wakes (no real-time class ever goes to a non-vCPU
    /// thread). Taken back at detach and stop; recorded for crash recovery.
    pub vmm_slice: Option<u64>,
    /// How the engine thread outranks the vCPUs it boosts (`--engine-class`).
    pub engine_class: pvsched_host::mechanism::EngineClass,
}

impl DaemonConfig {
    /// A configuration for `vms` with the documented defaults (driver `dynamic`, LAPIC-timer
    /// tracepoints, root's VMs only, ctl socket for root only, no metrics, the quiet gate on);
    /// change fields with struct update syntax.
    pub fn new(vms: Vec<VmSpec>, socket: PathBuf, state_file: PathBuf) -> Self {
        DaemonConfig {
            vms,
            watch: false,
            driver: "dynamic".into(),
            opts: DriverOptions::new(),
            trace: TraceConfig::default(),
            socket,
            state_file,
            metrics: None,
            metrics_public: false,
            allowed: crate::discover::Allowed::default(),
            ctl_group: None,
            quiet_gate: Some(pvsched_host::pressure::QuietGate::default()),
            max_boosted: Some(pvsched_host::runtime::default_max_boosted()),
            ivshmem: None,
            engine_class: Default::default(),
            base_slice: None,
            vmm_slice: None,
        }
    }
}

/// Errors of the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Recovering from a previous daemon failed.
    #[error("cannot recover from the state file {0}")]
    Recover(PathBuf, #[source] std::io::Error),
    /// Another daemon uses the same state file.
    #[error("another pvsched daemon uses the state file {0} (its lock {0}.lock is held)")]
    AlreadyRunning(PathBuf),
    /// The state file's lock could not be taken.
    #[error("cannot lock {0}")]
    Lock(PathBuf, #[source] std::io::Error),
    /// The ctl socket could not be created.
    #[error("cannot listen on {0}")]
    Bind(PathBuf, #[source] std::io::Error),
    /// The ivshmem server socket could not be created.
    #[error("cannot serve ivshmem on {0}")]
    Ivshmem(PathBuf, #[source] std::io::Error),
    /// A VM to attach has no vCPU threads or is gone.
    #[error("{0} has no vCPU threads (QEMU 'CPU n/KVM' or 'CPU n/TCG', crosvm_vcpuN, vcpuN, 'fc_vcpu N', pvsched-vcpuN)")]
    NoVcpus(VmSource),
    /// Threads named like vCPUs that the daemon may not boost.
    #[error("{0}: no thread may be boosted")]
    Refused(VmSource, #[source] crate::discover::Refusal),
    /// A VM could not be inspected.
    #[error("cannot find the vCPU threads of {0}")]
    Discover(VmSource, #[source] std::io::Error),
    /// A VM's guest memory file or slot addresses are unusable.
    #[error("cannot use the guest memory of {0}")]
    Slots(VmSource, #[source] std::io::Error),
    /// The metrics address could not be bound.
    #[error("cannot serve metrics on {0}")]
    Metrics(std::net::SocketAddr, #[source] std::io::Error),
    /// The policy is invalid.
    #[error("invalid policy")]
    Policy(#[from] EngineError),
    /// The tracepoints could not be opened.
    #[error("cannot open the tracepoint sources")]
    Trace(#[from] TraceError),
    /// The state file could not be written.
    #[error("cannot write the state file")]
    State(#[source] std::io::Error),
    /// The engine runtime failed or refused a VM.
    #[error("engine runtime")]
    Runtime(#[from] RuntimeError),
    /// The base slice cannot be used on this kernel.
    #[error("--base-slice / base_slice or --vmm-slice / vmm_slice")]
    BaseSlice(#[source] pvsched_host::sched::Error),
    /// Waiting for events failed.
    #[error("event loop")]
    Io(#[from] std::io::Error),
}

struct VmInfo {
    source: VmSource,
    threads: Vec<VcpuThread>,
    /// Its memory file, watched for truncation.
    watch: Option<SlotWatch>,
    /// QMP queries that failed in a row (a VM is detached only after [`QMP_FAILURES`]).
    failures: u32,
    /// Its process's main thread, when given [`DaemonConfig::vmm_slice`].
    main: Option<i32>,
}

/// Where an attached VM's slots come from.
enum Slots<'a> {
    /// None: host events only.
    None,
    /// A VMM's guest-memory file.
    File(&'a ProtocolSpec),
    /// The daemon's own ivshmem memory, with its doorbell.
    Ivshmem(Box<GuestSlots>, crate::ivshmem::Doorbell),
}

/// Failed QMP queries in a row after which a VM counts as gone (one transient error, e.g. a
/// QEMU busy for longer than the timeout, does not detach it).
const QMP_FAILURES: u32 = 5;

fn threads_of(source: &VmSource) -> std::io::Result<Vec<VcpuThread>> {
    match source {
        VmSource::Pid(pid) => vcpu_threads(*pid),
        VmSource::Qmp(path) => crate::qmp::query_cpus(path),
        // Threads that exited are dropped; the rest keep their vCPU index.
        VmSource::Tids(tids) => Ok(tids
            .iter()
            .enumerate()
            .filter(|(_, &t)| Path::new(&format!("/proc/{t}")).exists())
            .map(|(i, &tid)| VcpuThread {
                index: i as u32,
                tid,
                vmm: crate::discover::Vmm::Pvsched,
            })
            .collect()),
    }
}

/// A process younger than this may still be about to name its vCPU threads: a VMM names
/// them a moment after it starts (QEMU: 40 ms after exec here, longer on a loaded host).
const NAMING_WAIT: Duration = Duration::from_secs(10);

/// Waits (logged) for process `pid` to name its vCPU threads, as long as it is alive and
/// younger than [`NAMING_WAIT`] and `stop` is not set; empty when it does not (an older
/// process is not waited for).
fn wait_named(pid: i32, stop: &AtomicBool) -> Vec<VcpuThread> {
    let young = |pid| {
        !stop.load(Ordering::Acquire)
            && crate::discover::live_age(pid).is_some_and(|a| a < NAMING_WAIT)
    };
    if !young(pid) {
        return Vec::new();
    }
    tracing::info!(
        pid,
        "no vCPU threads named yet: waiting while the process is younger than {NAMING_WAIT:?}"
    );
    let t0 = Instant::now();
    while young(pid) {
        std::thread::sleep(Duration::from_millis(20));
        match vcpu_threads(pid) {
            Ok(t) if !t.is_empty() => {
                tracing::info!(pid, after = ?t0.elapsed(), "vCPU threads named");
                return t;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    tracing::warn!(pid, waited = ?t0.elapsed(), "no vCPU threads named");
    Vec::new()
}

/// The daemon's control plane.
/// What metrics need to know of each attached VM besides the runtime's status: where it came
/// from and whether the daemon reads its slots. Shared with the metrics thread.
type Labels = std::sync::Mutex<BTreeMap<u32, VmLabel>>;

/// See [`Labels`].
struct VmLabel {
    source: VmSource,
    /// The daemon reads its slots.
    protocol: bool,
    /// Its ivshmem doorbell's rings, as the runtime consumed them.
    doorbells: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
}

/// VMs served over ivshmem at most (each costs 4 descriptors and a 64 KiB mapping or two).
const IVSHMEM_PEERS: usize = 64;
/// After a guest let go of its slots, its VM is attached again no sooner than this.
const IVSHMEM_REATTACH: Duration = Duration::from_secs(1);
/// After accepting failed, the ivshmem socket is not looked at for this long.
const IVSHMEM_BACKOFF: Duration = Duration::from_secs(1);

/// Detached VMs whose last status `ctl status` still shows.
const DETACHED_KEPT: usize = 16;
/// Connections taken from a listening socket (ctl, ivshmem) per round of the control plane.
const ACCEPTS_PER_ROUND: usize = 8;
/// Processes whose refusal is remembered as logged, at most.
const REFUSALS_KEPT: usize = 1024;

/// Whether a refusal of process `pid` is the first one (to be logged): a process retrying
/// in a loop is logged once. `logged` forgets everything when it reaches [`REFUSALS_KEPT`]
/// processes (pids are reused; a flood of processes must not grow it).
fn first_refusal(logged: &mut std::collections::BTreeSet<i32>, pid: i32) -> bool {
    if logged.len() >= REFUSALS_KEPT {
        logged.clear();
    }
    logged.insert(pid)
}

struct Daemon<'a> {
    cfg: &'a DaemonConfig,
    rt: RuntimeHandle,
    state: StateFile,
    vms: BTreeMap<u32, VmInfo>,
    labels: &'a Labels,
    next_id: u32,
    /// Processes whose refusal was logged already (`--watch` looks again every scan).
    refused_logged: std::collections::BTreeSet<i32>,
    /// The last status of the last [`DETACHED_KEPT`] detached VMs.
    detached: std::collections::VecDeque<DaemonVm>,
    /// Threads given the base slice ([`DaemonConfig::base_slice`]).
    based: std::collections::BTreeSet<i32>,
}

/// Restores what a previous daemon left boosted, as recorded in `state_file`.
pub fn recover_only(state_file: &Path) -> Result<Recovery, DaemonError> {
    recover(state_file).map_err(|e| DaemonError::Recover(state_file.to_path_buf(), e))
}

/// Runs the daemon until `stop` is set. `on_ready` is called once it listens and has attached
/// the VMs it was given, with what the recovery restored. Returns the final status (every
/// thread restored by then).
pub fn run(
    cfg: &DaemonConfig,
    stop: &AtomicBool,
    on_ready: impl FnOnce(&Recovery),
) -> Result<DaemonStatus, DaemonError> {
    // One daemon per state file: a second one would "recover" the first one's threads.
    let _lock = lock_state(&cfg.state_file)?;
    let recovery = recover_only(&cfg.state_file)?;
    // Check the policy before touching anything.
    Engine::default().add_vm(0, &cfg.driver, &cfg.opts)?;
    for ns in [cfg.base_slice, cfg.vmm_slice].into_iter().flatten() {
        pvsched_host::sched::check_supported(&pvsched_host::SchedClass::Slice(ns))
            .map_err(DaemonError::BaseSlice)?;
    }
    let listener = bind_ctl(&cfg.socket, cfg.ctl_group)
        .map_err(|e| DaemonError::Bind(cfg.socket.clone(), e))?;
    listener.set_nonblocking(true)?;
    let ivshmem = match &cfg.ivshmem {
        Some(p) => Some(IvshmemServer::bind(p).map_err(|e| DaemonError::Ivshmem(p.clone(), e))?),
        None => None,
    };
    let metrics = match cfg.metrics {
        Some(addr) if !addr.ip().is_loopback() && !cfg.metrics_public => {
            return Err(DaemonError::Metrics(
                addr,
                std::io::Error::other(
                    "not a loopback address: say metrics_public = true (--metrics-public) to \
                     serve the VMs' statistics to every host that can reach it",
                ),
            ));
        }
        Some(addr) => {
            let l = std::net::TcpListener::bind(addr).map_err(|e| DaemonError::Metrics(addr, e))?;
            l.set_nonblocking(true)?;
            Some(l)
        }
        None => None,
    };
    let t = cfg.trace;
    // One set of tracepoint streams for the host, shared by every VM.
    let sources: Vec<Box<dyn EventSource>> = if t.any() {
        vec![Box::new(TraceSource::new(cfg.trace)?)]
    } else {
        Vec::new()
    };
    let labels: Labels = std::sync::Mutex::new(BTreeMap::new());
    let runtime = Runtime::start(RuntimeConfig {
        sources,
        quiet_gate: cfg.quiet_gate,
        max_boosted: cfg.max_boosted,
        engine_class: cfg.engine_class,
        // Foreign threads: a vCPU id reused after its thread exited is never touched.
        applier: std::sync::Arc::new(VerifiedApplier::default()),
        ..RuntimeConfig::default()
    })?;
    let mut d = Daemon {
        cfg,
        rt: runtime.handle(),
        state: StateFile::keeping(&cfg.state_file, &recovery.kept),
        vms: BTreeMap::new(),
        labels: &labels,
        next_id: 0,
        refused_logged: std::collections::BTreeSet::new(),
        detached: std::collections::VecDeque::new(),
        based: std::collections::BTreeSet::new(),
    };
    // Metrics on their own thread: a client that connects and says nothing holds up other
    // metrics clients for at most CLIENT_TIMEOUT each, never ctl, discovery or the engine.
    let served = AtomicBool::new(false);
    let result = std::thread::scope(|scope| {
        if let Some(m) = &metrics {
            let (rt, labels, served) = (runtime.handle(), &labels, &served);
            let _ = std::thread::Builder::new()
                .name("pvsched-metrics".into())
                .spawn_scoped(scope, move || serve_metrics(m, &rt, labels, served));
        }
        // Set however `serve` ends, a panic included: the scope joins the metrics thread
        // before anything unwinds further, and the runtime's drop restores every thread.
        struct Served<'a>(&'a AtomicBool);
        impl Drop for Served<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Release);
            }
        }
        let _served = Served(&served);
        d.serve(&listener, ivshmem.as_ref(), stop, recovery, on_ready)
    });
    // Every path out restores: the runtime puts every thread back when it stops.
    let status = runtime.stop();
    if status.apply_errors > 0 {
        tracing::warn!(errors = status.apply_errors, by_kind = ?status.apply_errors_by_kind, last = ?status.errors, "scheduling changes failed");
    }
    if !status.unrestored.is_empty() {
        tracing::error!(tids = ?status.unrestored, state_file = %cfg.state_file.display(),
            "the kernel refused to restore these threads; they stay in the state file for \
             `pvsched daemon --recover-only`");
    }
    // The runtime put the threads back to what it found: the base slice, for those given one.
    let mut unrestored = status.unrestored.clone();
    for tid in d.based.clone() {
        if !unrestored.contains(&tid) && !d.take_base(tid) {
            unrestored.push(tid);
        }
    }
    let _ = d.state.finish(&unrestored);
    let _ = std::fs::remove_file(&cfg.socket);
    result.map(|()| d.daemon_status(status))
}

fn readable(fds: &[i32], timeout: Duration) -> Vec<bool> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `pfds` is a valid array of `pfds.len()` pollfd structs; poll only writes their
    // `revents`.
    let n = unsafe {
        libc::poll(
            pfds.as_mut_ptr(),
            pfds.len() as libc::nfds_t,
            timeout.as_millis() as i32,
        )
    };
    pfds.iter().map(|p| n > 0 && p.revents != 0).collect()
}

impl Daemon<'_> {
    fn serve(
        &mut self,
        listener: &UnixListener,
        ivshmem: Option<&IvshmemServer>,
        stop: &AtomicBool,
        recovery: Recovery,
        on_ready: impl FnOnce(&Recovery),
    ) -> Result<(), DaemonError> {
        for spec in &self.cfg.vms {
            let slots = spec.protocol.as_ref().map_or(Slots::None, Slots::File);
            self.attach(spec.source.clone(), slots, Some(stop))?;
        }
        if self.cfg.watch {
            self.rescan();
        }
        on_ready(&recovery);
        let mut last_scan = Instant::now();
        let mut conns: Vec<Connection> = Vec::new();
        let mut backoff: Option<Instant> = None;
        while !stop.load(Ordering::Acquire) {
            let mut fds = vec![listener.as_raw_fd()];
            if backoff.is_none_or(|t| t.elapsed() >= IVSHMEM_BACKOFF) {
                fds.extend(ivshmem.map(IvshmemServer::fd));
            }
            let ready = readable(&fds, Duration::from_millis(100));
            if ready[0] {
                self.serve_ctl(listener);
            }
            if let Some(server) = ivshmem {
                if ready.get(1) == Some(&true) {
                    backoff = (!self.accept_ivshmem(server, &mut conns)).then(Instant::now);
                }
                self.service_ivshmem(&mut conns);
            }
            // A VM whose memory file was cut short: its slots are gone; restore and let go.
            let truncated: Vec<u32> = self
                .vms
                .iter()
                .filter(|(_, v)| v.watch.as_ref().is_some_and(SlotWatch::truncated))
                .map(|(&id, _)| id)
                .collect();
            for id in truncated {
                tracing::error!(
                    vm = id,
                    source = %self.vms[&id].source,
                    "guest memory file truncated under the daemon: VM detached, its threads restored"
                );
                self.detach(id);
            }
            if last_scan.elapsed() >= WATCH_PERIOD {
                last_scan = Instant::now();
                self.rescan();
            }
        }
        Ok(())
    }

    /// Attaches the vCPU threads of `source` as a new VM, with its slots when given. With
    /// `wait` (at start-up: until it is set), a process given by pid that has not named its
    /// vCPU threads yet is waited for ([`wait_named`]).
    fn attach(
        &mut self,
        source: VmSource,
        protocol: Slots<'_>,
        wait: Option<&AtomicBool>,
    ) -> Result<u32, DaemonError> {
        let mut found =
            threads_of(&source).map_err(|e| DaemonError::Discover(source.clone(), e))?;
        if let (true, VmSource::Pid(pid), Some(stop)) = (found.is_empty(), &source, wait) {
            found = wait_named(*pid, stop);
        }
        if found.is_empty() {
            return Err(DaemonError::NoVcpus(source));
        }
        let (threads, refused) = self.admit(found);
        if threads.is_empty() {
            let why = refused.into_iter().next().unwrap_or(Refusal::Gone(0));
            return Err(DaemonError::Refused(source, why));
        }
        // The memory file must be root's or the VM owner's.
        let process = process_of(threads[0].tid);
        let owner = process.and_then(owner).map(|(uid, _)| uid);
        let rings = match &protocol {
            Slots::Ivshmem(_, d) => Some(d.counter()),
            _ => None,
        };
        let (slots, doorbell) = match protocol {
            Slots::None => (None, None),
            Slots::File(p) => (
                Some(
                    GuestSlots::open(p, owner)
                        .map_err(|e| DaemonError::Slots(source.clone(), e))?,
                ),
                None,
            ),
            Slots::Ivshmem(s, d) => (Some(*s), Some(d)),
        };
        let id = self.next_id;
        self.next_id += 1;
        let (parts, watch) = match slots {
            Some(s) => {
                let (src, publisher, watch) = s.into_parts(id, SLOT_POLL_NS, doorbell);
                let parts = VmParts {
                    publisher: Some(Box::new(publisher)),
                    sources: vec![Box::new(src)],
                };
                (parts, Some(watch))
            }
            None => (
                VmParts {
                    publisher: None,
                    sources: Vec::new(),
                },
                None,
            ),
        };
        let protocol = parts.publisher.is_some();
        self.rt
            .add_vm(id, &self.cfg.driver, &self.cfg.opts, parts)?;
        // The VMM's other threads (a main loop that wakes the vCPUs) are the VM's own work,
        // not competition, for the host-wide quiet gate.
        if let Some(pid) = process {
            self.rt.set_vm_process(id, pid)?;
        }
        self.vms.insert(
            id,
            VmInfo {
                failures: 0,
                source,
                threads: Vec::new(),
                watch,
                main: None,
            },
        );
        self.labels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                id,
                VmLabel {
                    source: self.vms[&id].source.clone(),
                    protocol,
                    doorbells: rings,
                },
            );
        let tids: Vec<i32> = threads.iter().map(|t| t.tid).collect();
        tracing::info!(vm = id, source = %self.vms[&id].source, ?tids, driver = %self.cfg.driver, "attached VM");
        self.set_threads(id, threads)?;
        if let (Some(ns), Some(pid)) = (self.cfg.vmm_slice, process) {
            self.give_vmm_slice(id, pid, ns);
        }
        Ok(id)
    }

    /// Gives VM `id`'s process main thread `pid` the VMM slice, unless it is a vCPU thread
    /// (the runtime's) or has a slice of the daemon's already (another VM's main thread).
    fn give_vmm_slice(&mut self, id: u32, pid: i32, ns: u64) {
        let vcpu = self
            .vms
            .values()
            .any(|v| v.threads.iter().any(|t| t.tid == pid));
        if vcpu || self.based.contains(&pid) {
            return;
        }
        if let Err(e) = self.state.attach(pid) {
            tracing::warn!(vm = id, tid = pid, error = %e, "VMM slice not given");
            return;
        }
        self.give_base(pid, ns);
        if self.based.contains(&pid) {
            tracing::info!(
                vm = id,
                tid = pid,
                slice_ns = ns,
                "VMM main thread on a custom slice"
            );
            if let Some(vm) = self.vms.get_mut(&id) {
                vm.main = Some(pid);
            }
        } else {
            let _ = self.state.detach(pid);
        }
    }

    /// Makes VM `id`'s thread set `threads`: vanished ones removed (restored), new ones added
    /// after their original class is on record in the state file.
    fn set_threads(&mut self, id: u32, threads: Vec<VcpuThread>) -> Result<(), DaemonError> {
        let Some(vm) = self.vms.get_mut(&id) else {
            return Ok(());
        };
        let old = std::mem::take(&mut vm.threads);
        // A thread is the same vCPU if its id and its index are: one that now names another
        // vCPU (a VMM renaming its threads) is detached and attached again under the new
        // index, so that its key in the runtime stays the one this list has.
        let same = |a: &VcpuThread, b: &VcpuThread| a.tid == b.tid && a.index == b.index;
        let mut gone = Vec::new();
        for t in &old {
            if !threads.iter().any(|n| same(n, t)) {
                let _ = self.rt.remove_vcpu(VcpuKey::new(id, t.index));
                // The runtime put it back to its base slice, if it had one: now the rest.
                if self.take_base(t.tid) {
                    gone.push(t.tid);
                }
            }
        }
        self.forget(&gone);
        // A thread another VM already has is not attached again (nor its state record touched).
        let taken: Vec<i32> = self
            .vms
            .iter()
            .filter(|(&other, _)| other != id)
            .flat_map(|(_, v)| v.threads.iter().map(|t| t.tid))
            .collect();
        let mut kept = Vec::new();
        for t in threads {
            if old.iter().any(|o| same(o, &t)) {
                kept.push(t);
                continue;
            }
            if taken.contains(&t.tid) {
                tracing::warn!(
                    vm = id,
                    tid = t.tid,
                    "thread attached already to another VM"
                );
                continue;
            }
            self.state.attach(t.tid).map_err(DaemonError::State)?;
            if let Some(ns) = self.cfg.base_slice {
                self.give_base(t.tid, ns);
            }
            match self.rt.add_vcpu(VcpuKey::new(id, t.index), t.tid, false) {
                Ok(_) => kept.push(t),
                Err(e) => {
                    tracing::warn!(vm = id, tid = t.tid, error = %e, "vCPU thread not attached");
                    if self.take_base(t.tid) {
                        let _ = self.state.detach(t.tid);
                    }
                }
            }
        }
        if let Some(vm) = self.vms.get_mut(&id) {
            vm.threads = kept;
        }
        Ok(())
    }

    /// Gives thread `tid` (recorded in the state file already) an EEVDF custom slice of `ns`
    /// as its class between boosts, keeping its policy and nice; a thread that is not in a
    /// fair policy is left as it is. The runtime, attaching it next, takes that as the class
    /// it returns the thread to.
    fn give_base(&mut self, tid: i32, ns: u64) {
        if !self.state.same_thread(tid) {
            // Gone since it was recorded (its id may be another thread's now).
            return;
        }
        let attr = match pvsched_host::sched::get(tid) {
            Ok(a)
                if a.policy as i32 == libc::SCHED_OTHER || a.policy as i32 == libc::SCHED_BATCH =>
            {
                a
            }
            Ok(_) => {
                tracing::info!(
                    tid,
                    "base slice not given: the thread is not in a fair policy"
                );
                return;
            }
            Err(e) => {
                tracing::warn!(tid, error = %e, "base slice not given");
                return;
            }
        };
        match pvsched_host::sched::set(
            tid,
            &pvsched_host::sched::SchedAttr {
                runtime: ns,
                ..attr
            },
        ) {
            Ok(()) => {
                self.based.insert(tid);
            }
            Err(e) => tracing::warn!(tid, error = %e, "base slice not given"),
        }
    }

    /// Puts a thread given the base slice back to its recorded attributes (the runtime has let
    /// go of it). False when the kernel refused: it stays in the state file, for
    /// `--recover-only`.
    fn take_base(&mut self, tid: i32) -> bool {
        if !self.based.remove(&tid) {
            return true;
        }
        match self.state.restore(tid) {
            Ok(_) => true,
            Err(e) => {
                tracing::error!(tid, error = %e, "base slice not taken back; kept in the state file");
                false
            }
        }
    }

    /// Keeps the threads that may be boosted (a KVM vCPU of an allowed owner); logs each
    /// refused process once and returns the refusals.
    fn admit(&mut self, threads: Vec<VcpuThread>) -> (Vec<VcpuThread>, Vec<Refusal>) {
        let mut refused = Vec::new();
        let ok = threads
            .into_iter()
            .filter(
                |t| match check_vcpu_thread(t.tid, t.vmm, &self.cfg.allowed) {
                    Ok(()) => true,
                    Err(e) => {
                        let pid = process_of(t.tid).unwrap_or(t.tid);
                        if first_refusal(&mut self.refused_logged, pid) {
                            tracing::warn!("not boosted: {e}");
                        }
                        refused.push(e);
                        false
                    }
                },
            )
            .collect();
        (ok, refused)
    }

    /// Follows thread changes of attached VMs, VMs that exit, and (with `--watch`) new VMs.
    fn rescan(&mut self) {
        let ids: Vec<u32> = self.vms.keys().copied().collect();
        for id in ids {
            let found = match threads_of(&self.vms[&id].source) {
                Ok(t) => {
                    if let Some(vm) = self.vms.get_mut(&id) {
                        vm.failures = 0;
                    }
                    t
                }
                Err(e) => {
                    let vm = self.vms.get_mut(&id).expect("listed above");
                    vm.failures += 1;
                    if matches!(vm.source, VmSource::Qmp(_)) && vm.failures < QMP_FAILURES {
                        tracing::warn!(vm = id, failures = vm.failures, "QMP query failed: {e}");
                        continue;
                    }
                    Vec::new()
                }
            };
            let now = self.admit(found).0;
            let same = now.len() == self.vms[&id].threads.len()
                && now
                    .iter()
                    .zip(&self.vms[&id].threads)
                    .all(|(a, b)| a.tid == b.tid && a.index == b.index);
            if now.is_empty() {
                self.detach(id);
            } else if !same {
                tracing::info!(vm = id, threads = now.len(), "vCPU threads changed");
                let _ = self.set_threads(id, now);
            }
        }
        if self.cfg.watch {
            let me = std::process::id() as i32;
            // Threads already attached (by pid or QMP) are not attached twice.
            let known: Vec<i32> = self
                .vms
                .values()
                .flat_map(|v| v.threads.iter().map(|t| t.tid))
                .collect();
            for pid in all_pids() {
                if pid == me {
                    continue;
                }
                let threads = vcpu_threads(pid).unwrap_or_default();
                if threads.is_empty() || threads.iter().any(|t| known.contains(&t.tid)) {
                    continue;
                }
                let threads = self.admit(threads).0;
                if !threads.is_empty() {
                    let _ = self.attach(VmSource::Pid(pid), Slots::None, None);
                }
            }
        }
    }

    /// Takes the waiting ivshmem peers: a VMM process the daemon may boost, not connected
    /// already, gets its memory and doorbell; any other is told nothing and closed. `false`
    /// when accepting failed (out of descriptors): the caller backs off.
    fn accept_ivshmem(&mut self, server: &IvshmemServer, conns: &mut Vec<Connection>) -> bool {
        // At most a few per round: peers connecting in a loop must not keep the control
        // plane here (the rest wait for the next round: the socket stays readable).
        for _ in 0..ACCEPTS_PER_ROUND {
            let (stream, pid) = match server.accept() {
                Ok(Some(p)) => p,
                Ok(None) => return true,
                Err(e) => {
                    tracing::warn!("ivshmem: cannot accept a peer: {e}");
                    return false;
                }
            };
            if let Err(e) = check_vcpu_thread(pid, Vmm::Qemu, &self.cfg.allowed) {
                if first_refusal(&mut self.refused_logged, pid) {
                    tracing::warn!(pid, "ivshmem: peer refused: {e}");
                }
                continue;
            }
            // The check was on a pid: the peer must not have exited meanwhile (its pid
            // reused by the VMM just checked).
            if peer_still_there(&stream) == Some(false) {
                if first_refusal(&mut self.refused_logged, pid) {
                    tracing::warn!(pid, "ivshmem: peer refused: it exited during the check");
                }
                continue;
            }
            if conns.iter().any(|c| c.pid == pid) {
                if first_refusal(&mut self.refused_logged, pid) {
                    tracing::warn!(
                        pid,
                        "ivshmem: peer refused: the process is connected already"
                    );
                }
                continue;
            }
            if conns.len() >= IVSHMEM_PEERS {
                if first_refusal(&mut self.refused_logged, pid) {
                    tracing::warn!(
                        pid,
                        "ivshmem: peer refused: {IVSHMEM_PEERS} VMs served already"
                    );
                }
                continue;
            }
            // Deadline hints (and the clock stamps that place them) only for the driver that
            // uses them: a guest publishing them may ring once more per sleep of its RT tasks.
            match Connection::setup(stream, pid, self.cfg.driver == "deadline-aware") {
                Ok(c) => {
                    tracing::info!(
                        pid,
                        "ivshmem: VMM connected; waiting for its guest's module"
                    );
                    conns.push(c);
                }
                Err(e) => tracing::warn!(pid, "ivshmem: set-up of the peer failed: {e}"),
            }
        }
        true
    }

    /// Attaches the VM of each ivshmem peer whose guest answered, detaches it when the guest
    /// module lets go (or answers anew) or QEMU disconnects.
    fn service_ivshmem(&mut self, conns: &mut Vec<Connection>) {
        conns.retain_mut(|c| {
            let gone = c.hung_up();
            let answer = if gone { Ok(None) } else { c.answer() };
            match (c.vm, answer) {
                (Some((id, was)), Ok(Some(a))) if a == was && self.vms.contains_key(&id) => {}
                (Some((id, _)), now) => {
                    if self.vms.contains_key(&id) {
                        self.detach(id);
                    }
                    c.disable();
                    c.vm = None;
                    c.not_before = Some(Instant::now() + IVSHMEM_REATTACH);
                    let why = match (gone, now) {
                        (true, _) => "QEMU disconnected",
                        (false, Ok(Some(_))) => "the guest answered anew",
                        (false, Ok(None)) => "the guest module let go",
                        (false, Err(_)) => "the guest's answer turned invalid",
                    };
                    tracing::info!(
                        vm = id,
                        pid = c.pid,
                        doorbells = c.doorbells(),
                        "ivshmem: VM detached ({why})"
                    );
                    // What the process had before, host events only.
                    if let Some(src) = c.replaced.take() {
                        if !gone {
                            let _ = self.attach(src, Slots::None, None);
                        }
                    }
                }
                (None, Ok(Some(a))) => {
                    if c.not_before.is_some_and(|t| Instant::now() < t) {
                        return !gone;
                    }
                    self.attach_ivshmem(c, a);
                }
                (None, Err(e)) => c.note(format!("guest answer refused: {e}")),
                (None, Ok(None)) => {}
            }
            !gone
        });
    }

    /// Attaches connection `c`'s VM with the guest's answer `a`, replacing the same process
    /// attached without slots.
    fn attach_ivshmem(&mut self, c: &mut Connection, a: pvsched_proto::ivshmem::Answer) {
        let mine: Vec<i32> = vcpu_threads(c.pid)
            .unwrap_or_default()
            .iter()
            .map(|t| t.tid)
            .collect();
        let dup: Vec<u32> = self
            .vms
            .iter()
            .filter(|(_, v)| v.threads.iter().any(|t| mine.contains(&t.tid)))
            .map(|(&id, _)| id)
            .collect();
        for id in dup {
            if let Some(v) = self.vms.get(&id) {
                c.replaced = Some(v.source.clone());
            }
            tracing::info!(
                vm = id,
                pid = c.pid,
                "ivshmem: replacing the VM attached without slots"
            );
            self.detach(id);
        }
        let attached = c
            .slots(a)
            .map_err(|e| DaemonError::Slots(VmSource::Pid(c.pid), e))
            .and_then(|(s, d)| {
                self.attach(VmSource::Pid(c.pid), Slots::Ivshmem(Box::new(s), d), None)
            });
        match attached {
            Ok(id) => {
                tracing::info!(
                    vm = id,
                    pid = c.pid,
                    cpus = a.cpus,
                    features = a.features,
                    "ivshmem: guest module negotiated protocol 1"
                );
                c.vm = Some((id, a));
                c.problem = None;
            }
            // Retried every round; logged when the reason changes.
            Err(e) => {
                c.note(format!("cannot attach: {}", pvsched_host::error_chain(&e)));
                if let Some(src) = c.replaced.take() {
                    let _ = self.attach(src, Slots::None, None);
                }
            }
        }
    }

    fn detach(&mut self, id: u32) {
        tracing::info!(vm = id, "VM gone, detached");
        // Its last figures stay visible in `ctl status` (`detached`).
        if let Ok(st) = self.rt.status() {
            let last = self
                .daemon_status(st)
                .vms
                .into_iter()
                .find(|v| v.vm.id == id);
            if let Some(v) = last {
                if self.detached.len() == DETACHED_KEPT {
                    self.detached.pop_front();
                }
                self.detached.push_back(v);
            }
        }
        let _ = self.rt.remove_vm(id);
        self.labels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        if let Some(vm) = self.vms.remove(&id) {
            // The runtime put them back to their base slice, if they had one: now the rest,
            // and the VMM's main thread.
            let tids: Vec<i32> = vm
                .threads
                .iter()
                .map(|t| t.tid)
                .chain(vm.main)
                .filter(|&t| self.take_base(t))
                .collect();
            self.forget(&tids);
        }
    }

    /// Drops the state-file entries of threads the runtime has let go of, except those whose
    /// restore the kernel refused (the runtime retries them; a later recovery must too).
    fn forget(&mut self, tids: &[i32]) {
        if tids.is_empty() {
            return;
        }
        let pending = self.rt.status().map(|s| s.unrestored).unwrap_or_default();
        for &tid in tids {
            if pending.contains(&tid) {
                tracing::warn!(
                    tid,
                    "restore refused by the kernel: retried, kept in the state file"
                );
            } else {
                let _ = self.state.detach(tid);
            }
        }
    }

    fn status(&self) -> Result<DaemonStatus, RuntimeError> {
        Ok(self.daemon_status(self.rt.status()?))
    }

    fn daemon_status(&self, st: pvsched_host::runtime::Status) -> DaemonStatus {
        DaemonStatus {
            detached: self.detached.iter().cloned().collect(),
            ..daemon_status(self.labels, st)
        }
    }

    fn serve_ctl(&mut self, listener: &UnixListener) {
        // At most a few per round, as for ivshmem peers.
        for _ in 0..ACCEPTS_PER_ROUND {
            let Ok((stream, _)) = listener.accept() else {
                return;
            };
            let reply = match peer_of(&stream) {
                Ok(peer) => self.handle_ctl(&stream, peer),
                Err(e) => serde_json::json!({"ok": false, "error": format!("peer unknown: {e}")}),
            };
            let _ = stream.set_write_timeout(Some(CLIENT_TIMEOUT));
            let mut w = &stream;
            let _ = w.write_all(format!("{reply}\n").as_bytes());
        }
    }

    fn handle_ctl(&mut self, stream: &UnixStream, peer: Peer) -> serde_json::Value {
        let Some(line) = read_request(stream) else {
            return serde_json::json!({"ok": false, "error": "no request"});
        };
        let words: Vec<&str> = line.split_whitespace().collect();
        tracing::info!(request = %line.trim().chars().take(200).collect::<String>(), uid = peer.uid, "ctl");
        if let Err(e) = authorize(words.first().copied(), peer, self.cfg.ctl_group) {
            tracing::warn!(uid = peer.uid, pid = peer.pid, "ctl refused: {e}");
            return serde_json::json!({"ok": false, "error": e});
        }
        let result: Result<serde_json::Value, String> =
            parse_ctl(&line).and_then(|req| match req {
                CtlRequest::Status => self
                    .status()
                    .map_err(|e| e.to_string())
                    .and_then(|s| serde_json::to_value(s).map_err(|e| e.to_string())),
                CtlRequest::Enable(vm) | CtlRequest::Disable(vm) => {
                    let on = matches!(req, CtlRequest::Enable(_));
                    self.rt
                        .set_enabled(vm, on)
                        .map(|_| serde_json::json!({"enabled": on, "vm": vm}))
                        .map_err(|e| e.to_string())
                }
                CtlRequest::Driver { vm, name, opts } => self
                    .rt
                    .set_driver(vm, &name, &opts)
                    .map(|_| serde_json::json!({"vm": vm, "driver": name}))
                    .map_err(|e| e.to_string()),
            });
        match result {
            Ok(v) => serde_json::json!({"ok": true, "result": v}),
            Err(e) => serde_json::json!({"ok": false, "error": e}),
        }
    }
}

/// The daemon's status: the runtime's, with each VM's source.
fn daemon_status(labels: &Labels, st: pvsched_host::runtime::Status) -> DaemonStatus {
    let labels = labels.lock().unwrap_or_else(|p| p.into_inner());
    DaemonStatus {
        enabled: st.enabled,
        host_events: st.vms.iter().map(|v| v.host_events).sum(),
        host_events_lost: st.host_events_lost,
        apply_errors: st.apply_errors,
        apply_errors_by_kind: st.apply_errors_by_kind.clone(),
        unrestored: st.unrestored.clone(),
        errors: st.errors.clone(),
        cost: st.cost.clone(),
        vms: st
            .vms
            .into_iter()
            .filter_map(|v| {
                let l = labels.get(&v.id)?;
                Some(DaemonVm {
                    source: l.source.to_string(),
                    pid: match l.source {
                        VmSource::Pid(p) => Some(p),
                        _ => None,
                    },
                    protocol: l.protocol,
                    doorbells: l
                        .doorbells
                        .as_ref()
                        .map(|d| d.load(std::sync::atomic::Ordering::Relaxed)),
                    vm: v,
                })
            })
            .collect(),
        detached: Vec::new(),
    }
}

/// How long the metrics rendered for one client are given to the next ones: the engine
/// thread (real-time) builds a status for at most a few scrapes a second, however many
/// clients connect.
const METRICS_FRESH: Duration = Duration::from_millis(250);

/// The metrics thread: answers each connection with the metrics (rendered at most every
/// [`METRICS_FRESH`]), one at a time, each client given at most [`CLIENT_TIMEOUT`] to send its
/// request; until `done`.
fn serve_metrics(
    listener: &std::net::TcpListener,
    rt: &RuntimeHandle,
    labels: &Labels,
    done: &AtomicBool,
) {
    let fds = [listener.as_raw_fd()];
    let mut rendered: Option<(Instant, String)> = None;
    while !done.load(Ordering::Acquire) {
        if !readable(&fds, Duration::from_millis(100))[0] {
            continue;
        }
        while let Ok((mut stream, _)) = listener.accept() {
            let _ = stream.set_nonblocking(false);
            let _ = stream.set_read_timeout(Some(CLIENT_TIMEOUT));
            let _ = stream.set_write_timeout(Some(CLIENT_TIMEOUT));
            // The request itself does not matter: every path answers the metrics.
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf);
            let body = match &rendered {
                Some((at, body)) if at.elapsed() < METRICS_FRESH => body.clone(),
                _ => {
                    let body = match rt.status() {
                        Ok(s) => crate::metrics::render(&daemon_status(labels, s)),
                        Err(e) => format!("# engine unavailable: {e}\n"),
                    };
                    rendered = Some((Instant::now(), body.clone()));
                    body
                }
            };
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all((head + &body).as_bytes());
            if done.load(Ordering::Acquire) {
                return;
            }
        }
    }
}

/// A `ctl` request, parsed (who may send it is [`authorize`]'s business).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CtlRequest {
    /// `status`.
    Status,
    /// `enable [vm]`: one VM, or boosting as a whole.
    Enable(Option<u32>),
    /// `disable [vm]`.
    Disable(Option<u32>),
    /// `driver <vm> <name> [key=value ...]`.
    Driver {
        /// VM id.
        vm: u32,
        /// Driver name.
        name: String,
        /// Its options.
        opts: DriverOptions,
    },
}

/// Parses one `ctl` request line (words separated by whitespace; words after the ones a
/// command takes are ignored). Any line gives a request or an error message, never a panic.
pub fn parse_ctl(line: &str) -> Result<CtlRequest, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let vm_arg = |w: Option<&&str>| -> Result<Option<u32>, String> {
        w.map(|s| s.parse::<u32>().map_err(|_| format!("bad VM id {s:?}")))
            .transpose()
    };
    match words.first().copied() {
        Some("status") => Ok(CtlRequest::Status),
        Some("enable") => vm_arg(words.get(1)).map(CtlRequest::Enable),
        Some("disable") => vm_arg(words.get(1)).map(CtlRequest::Disable),
        Some("driver") => match (vm_arg(words.get(1)), words.get(2)) {
            (Ok(Some(vm)), Some(name)) => DriverOptions::parse(words[3..].iter().copied())
                .map(|opts| CtlRequest::Driver {
                    vm,
                    name: name.to_string(),
                    opts,
                })
                .map_err(|e| e.to_string()),
            _ => Err("usage: driver <vm> <name> [key=value ...]".into()),
        },
        _ => Err(
            "commands: status | enable [vm] | disable [vm] | driver <vm> <name> [key=value ...]"
                .into(),
        ),
    }
}

/// Takes the exclusive lock `<state_file>.lock` (released when the returned file closes, also
/// when the daemon dies).
fn lock_state(state_file: &Path) -> Result<std::fs::File, DaemonError> {
    use std::os::fd::AsRawFd;
    let mut name = state_file.as_os_str().to_owned();
    name.push(".lock");
    let path = PathBuf::from(name);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| DaemonError::Lock(path.clone(), e))?;
    // SAFETY: flock on a descriptor this function owns; no memory is passed.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => DaemonError::AlreadyRunning(state_file.to_path_buf()),
            _ => DaemonError::Lock(path, e),
        });
    }
    Ok(f)
}

/// Who is on the other end of a ctl connection (`SO_PEERCRED`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Its process.
    pub pid: i32,
    /// Its effective uid.
    pub uid: u32,
    /// Its effective gid.
    pub gid: u32,
}

pub(crate) fn peer_of(stream: &UnixStream) -> std::io::Result<Peer> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` is a writable ucred and `len` its size; SO_PEERCRED on a connected Unix
    // socket fills at most `len` bytes.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Peer {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// `SO_PEERPIDFD` (Linux ≥ 6.5; not exported by every libc crate version).
const SO_PEERPIDFD: libc::c_int = 77;

/// Whether the process that connected `stream` still exists. Asked after a check made on its
/// pid from `SO_PEERCRED`: `Some(true)` says that pid still named that very process during the
/// check (a pid is reused only once its process is gone), `Some(false)` that it may have named
/// another one; `None`: this kernel cannot tell (no `SO_PEERPIDFD`).
pub(crate) fn peer_still_there(stream: &UnixStream) -> Option<bool> {
    use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` is a writable int and `len` its size; SO_PEERPIDFD on a connected Unix
    // socket writes at most `len` bytes, a new descriptor the caller owns.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&mut fd as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::ENOPROTOOPT) => None,
            // ESRCH: the peer has been reaped.
            _ => Some(false),
        };
    }
    // SAFETY: the kernel returned a new pidfd; it is owned here and closed on drop.
    let pidfd = unsafe { OwnedFd::from_raw_fd(fd) };
    Some(pvsched_host::sched::pidfd_alive(pidfd.as_fd()))
}

/// Who may do what through the ctl socket: `status` for root and the ctl group, every change
/// for root only.
pub fn authorize(verb: Option<&str>, peer: Peer, ctl_group: Option<u32>) -> Result<(), String> {
    if peer.uid == 0 {
        return Ok(());
    }
    let reader = ctl_group.is_some_and(|g| g == peer.gid);
    match verb {
        Some("status") if reader => Ok(()),
        Some("status") => Err(format!(
            "uid {} may not read the daemon's status (root or the ctl group only)",
            peer.uid
        )),
        _ => Err(format!(
            "uid {} may not change the daemon (root only)",
            peer.uid
        )),
    }
}

/// Creates the ctl socket: mode 0600 (0660 with `group`, owned by it) whatever the umask, in a
/// directory no other user can replace it in.
fn bind_ctl(path: &Path, group: Option<u32>) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::env::current_dir()?,
    };
    let m = std::fs::metadata(&dir)?;
    // SAFETY: geteuid has no arguments and cannot fail.
    let me = unsafe { libc::geteuid() };
    let sticky = m.mode() & 0o1000 != 0;
    if (m.uid() != me && m.uid() != 0) || (m.mode() & 0o022 != 0 && !sticky) {
        return Err(std::io::Error::other(format!(
            "{} is owned by uid {} with mode {:o}: another user could replace the socket \
             (use a directory owned by root, not writable by others, e.g. /run)",
            dir.display(),
            m.uid(),
            m.mode() & 0o7777
        )));
    }
    let _ = std::fs::remove_file(path);
    // SAFETY: umask only changes this process's file-creation mask; the daemon has no other
    // thread creating files at this point, and the mask is put back right after.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = bound?;
    let mode = match group {
        Some(gid) => {
            std::os::unix::fs::chown(path, None, Some(gid))?;
            0o660
        }
        None => 0o600,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

/// Reads one request line: at most [`MAX_REQUEST`] bytes within [`CLIENT_TIMEOUT`] in all,
/// so a client that trickles bytes holds up the control plane no longer than that.
fn read_request(stream: &UnixStream) -> Option<String> {
    let _ = stream.set_nonblocking(false);
    let mut buf = Vec::new();
    BufReader::new(Timed::new(stream, Instant::now() + CLIENT_TIMEOUT))
        .take(MAX_REQUEST)
        .read_until(b'\n', &mut buf)
        .ok()?;
    let line = buf.split(|&b| b == b'\n').next().unwrap_or_default();
    Some(String::from_utf8_lossy(line).into_owned())
}

/// A stream with one deadline for a whole exchange: each read and write may take only the
/// time left, so a peer trickling bytes cannot hold the caller past it (ctl requests, QMP).
pub(crate) struct Timed<'a> {
    s: &'a UnixStream,
    deadline: Instant,
}

impl<'a> Timed<'a> {
    /// `s` until `deadline`.
    pub(crate) fn new(s: &'a UnixStream, deadline: Instant) -> Self {
        Timed { s, deadline }
    }

    fn left(&self) -> std::io::Result<Duration> {
        self.deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(too_slow)
    }
}

fn too_slow() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "peer too slow")
}

/// A socket timeout surfaces as `WouldBlock` (EAGAIN) on Unix: for a deadline-bound stream it
/// is the deadline passing, reported as such.
fn at_deadline<T>(r: std::io::Result<T>) -> std::io::Result<T> {
    r.map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => too_slow(),
        _ => e,
    })
}

impl Read for Timed<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.s.set_read_timeout(Some(self.left()?))?;
        at_deadline(self.s.read(buf))
    }
}

impl Write for Timed<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.s.set_write_timeout(Some(self.left()?))?;
        at_deadline(self.s.write(buf))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn all_pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Sends one `ctl` request to the daemon at `socket` and returns its JSON reply.
pub fn ctl(socket: &Path, request: &str) -> std::io::Result<serde_json::Value> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("{request}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connected peer is there; one that connected, exited and was reaped is not (its pid
    /// could name another process by now). Skips where the kernel has no `SO_PEERPIDFD`.
    #[test]
    fn a_peer_that_exited_after_connecting_is_told_apart() {
        use std::os::unix::ffi::OsStrExt;
        let (a, _b) = UnixStream::pair().unwrap();
        let Some(alive) = peer_still_there(&a) else {
            pvsched_testutil::skip!(
                "a_peer_that_exited_after_connecting_is_told_apart: no SO_PEERPIDFD"
            );
            return;
        };
        assert!(alive, "this process, at the other end");
        let dir = std::env::temp_dir().join(format!("pvsched-peer-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        // The address is built before the fork: the child only makes system calls.
        // SAFETY: an all-zero sockaddr_un is a valid value of the C struct.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in addr.sun_path.iter_mut().zip(path.as_os_str().as_bytes()) {
            *d = *s as libc::c_char;
        }
        // SAFETY: the child runs only async-signal-safe calls (socket, connect, _exit) on
        // memory prepared before the fork, then exits; the parent goes on as before.
        let child = unsafe { libc::fork() };
        assert!(child >= 0, "fork: {}", std::io::Error::last_os_error());
        if child == 0 {
            // SAFETY: as above; `addr` is a valid sockaddr_un of the given size.
            unsafe {
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                libc::connect(
                    fd,
                    (&addr as *const libc::sockaddr_un).cast(),
                    std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
                );
                libc::_exit(0);
            }
        }
        let (stream, _) = listener.accept().unwrap();
        let mut status = 0;
        // SAFETY: waits for (and reaps) the child forked above.
        assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
        assert_eq!(peer_of(&stream).unwrap().pid, child);
        assert_eq!(peer_still_there(&stream), Some(false), "the peer is gone");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn only_root_changes_and_the_ctl_group_reads() {
        let root = Peer {
            pid: 1,
            uid: 0,
            gid: 0,
        };
        let user = Peer {
            pid: 2,
            uid: 1000,
            gid: 100,
        };
        for verb in ["status", "disable", "enable", "driver"] {
            assert!(authorize(Some(verb), root, None).is_ok(), "{verb}");
        }
        assert!(authorize(Some("status"), user, None).is_err());
        assert!(authorize(Some("status"), user, Some(100)).is_ok());
        assert!(authorize(Some("status"), user, Some(101)).is_err());
        for verb in [
            Some("disable"),
            Some("enable"),
            Some("driver"),
            Some("x"),
            None,
        ] {
            let e = authorize(verb, user, Some(100)).unwrap_err();
            assert!(e.contains("root only"), "{verb:?}: {e}");
        }
    }

    #[test]
    fn ctl_requests_parse() {
        assert_eq!(parse_ctl("status"), Ok(CtlRequest::Status));
        assert_eq!(parse_ctl(" enable \n"), Ok(CtlRequest::Enable(None)));
        assert_eq!(
            parse_ctl("disable 3 extra"),
            Ok(CtlRequest::Disable(Some(3)))
        );
        assert_eq!(
            parse_ctl("driver 2 dynamic cs_budget=3ms"),
            Ok(CtlRequest::Driver {
                vm: 2,
                name: "dynamic".into(),
                opts: DriverOptions::new().set("cs_budget", "3ms"),
            })
        );
        assert_eq!(parse_ctl("enable x"), Err("bad VM id \"x\"".into()));
        assert_eq!(
            parse_ctl("disable 4294967296").unwrap_err(),
            "bad VM id \"4294967296\""
        );
        for usage in [
            "driver",
            "driver 1",
            "driver x dynamic",
            "driver -1 dynamic",
        ] {
            assert!(
                parse_ctl(usage).unwrap_err().starts_with("usage: driver"),
                "{usage}"
            );
        }
        assert!(parse_ctl("driver 1 dynamic novalue")
            .unwrap_err()
            .contains("key=value"));
        for unknown in ["", "   ", "Status", "reboot"] {
            assert!(
                parse_ctl(unknown).unwrap_err().starts_with("commands:"),
                "{unknown:?}"
            );
        }
    }

    #[test]
    fn the_ctl_socket_is_private_whatever_the_umask() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = std::env::temp_dir().join(format!("pvsched-sock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        // SAFETY: umask only changes this process's file-creation mask; restored below.
        let old = unsafe { libc::umask(0) };
        let l = bind_ctl(&dir.join("ctl.sock"), None);
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let _l = l.unwrap();
        let mode = std::fs::metadata(dir.join("ctl.sock")).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A directory others can write to is refused.
        let open = dir.join("open");
        std::fs::create_dir_all(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = bind_ctl(&open.join("ctl.sock"), None).unwrap_err();
        assert!(e.to_string().contains("could replace the socket"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
