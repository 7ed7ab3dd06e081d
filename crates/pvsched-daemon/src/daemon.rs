//! The daemon: attaches to VMs of any VMM by their vCPU threads, feeds the policy engine from
//! KVM/timer tracepoints (no guest cooperation needed), applies its decisions, answers `ctl`
//! requests on a Unix socket, and restores every thread it boosted when it stops.

use crate::discover::{vcpu_threads, VcpuThread};
use crate::slots::{GuestSlots, ProtocolSpec};
use crate::state::{recover, Recovery, StateFile};
use pvsched_host::clock::{mono_ns, DeadlineTimer};
use pvsched_host::mechanism::{helper_class, Mechanism, Publisher};
use pvsched_host::trace::{TraceConfig, TraceError, TraceHit, TraceSource};
use pvsched_host::SchedGuard;
use pvsched_policy::{
    BoostClass, Decision, DriverOptions, Engine, EngineError, Event, VcpuEvent, VcpuKey,
};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

const TOKEN_TIMER: u64 = 1;
const TOKEN_CTL: u64 = 2;
const TOKEN_METRICS: u64 = 3;
const TOKEN_TRACE: u64 = 1 << 32;
/// How often `--watch` looks for VMs and vCPU threads appearing and vanishing.
const WATCH_PERIOD: Duration = Duration::from_secs(1);

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
}

/// Errors of the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Recovering from a previous daemon failed.
    #[error("cannot recover from the state file {0}")]
    Recover(PathBuf, #[source] std::io::Error),
    /// The ctl socket could not be created.
    #[error("cannot listen on {0}")]
    Bind(PathBuf, #[source] std::io::Error),
    /// A VM to attach has no vCPU threads or is gone.
    #[error("{0} has no vCPU threads (QEMU 'CPU n/KVM', crosvm_vcpuN, vcpuN, 'fc_vcpu N', pvsched-vcpuN)")]
    NoVcpus(VmSource),
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
    /// Waiting for events failed.
    #[error("event loop")]
    Io(#[from] std::io::Error),
}

struct VmEntry {
    source: VmSource,
    threads: Vec<VcpuThread>,
    trace: Option<TraceSource>,
    slots: Option<GuestSlots>,
}

/// Publishes boost states into the slots of VMs whose guest memory the daemon maps.
struct SlotPublisher<'a>(&'a BTreeMap<u32, VmEntry>);

impl Publisher for SlotPublisher<'_> {
    fn publish(&mut self, key: VcpuKey, state: pvsched_proto::BoostState) -> Option<u32> {
        self.0
            .get(&key.vm)?
            .slots
            .as_ref()?
            .publish(key.vcpu as usize, state)
    }
}

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

/// The state of one vCPU as `ctl status` reports it.
#[derive(Clone, Debug, Serialize)]
pub struct VcpuStatus {
    /// vCPU index.
    pub vcpu: u32,
    /// Thread id.
    pub tid: i32,
    /// Boosted right now.
    pub boosted: bool,
    /// Boosts so far.
    pub boosts: u64,
    /// Throttles so far.
    pub throttles: u64,
    /// Time boosted, ms.
    pub boosted_ms: f64,
}

/// One VM in `ctl status`.
#[derive(Clone, Debug, Serialize)]
pub struct VmStatus {
    /// VM id (for `ctl enable/disable/driver`).
    pub id: u32,
    /// Where its threads come from (`pid N` or `QMP path`).
    pub source: String,
    /// Its process, when attached by pid.
    pub pid: Option<i32>,
    /// Driver.
    pub driver: String,
    /// The daemon reads this VM's pvsched slots.
    pub protocol: bool,
    /// Boosting enabled for this VM (and globally).
    pub enabled: bool,
    /// vCPUs.
    pub vcpus: Vec<VcpuStatus>,
}

/// `ctl status`.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    /// Boosting enabled globally.
    pub enabled: bool,
    /// Attached VMs.
    pub vms: Vec<VmStatus>,
    /// Tracepoint hits fed to the engine.
    pub host_events: u64,
}

/// The running daemon.
struct Daemon<'a> {
    cfg: &'a DaemonConfig,
    engine: Engine,
    mech: Mechanism,
    state: StateFile,
    vms: BTreeMap<u32, VmEntry>,
    next_id: u32,
    epoll: Epoll,
    enabled: bool,
    host_events: u64,
    pending: Vec<Event>,
}

/// Restores what a previous daemon left boosted, as recorded in `state_file`.
pub fn recover_only(state_file: &Path) -> Result<Recovery, DaemonError> {
    recover(state_file).map_err(|e| DaemonError::Recover(state_file.to_path_buf(), e))
}

/// Runs the daemon until `stop` is set. `on_ready` is called once it listens and has attached
/// the VMs it was given, with what the recovery restored.
pub fn run(
    cfg: &DaemonConfig,
    stop: &AtomicBool,
    on_ready: impl FnOnce(&Recovery),
) -> Result<(), DaemonError> {
    let recovery = recover_only(&cfg.state_file)?;
    // Check the policy before touching anything.
    Engine::default().add_vm(0, &cfg.driver, &cfg.opts)?;
    let _ = std::fs::remove_file(&cfg.socket);
    let listener =
        UnixListener::bind(&cfg.socket).map_err(|e| DaemonError::Bind(cfg.socket.clone(), e))?;
    listener.set_nonblocking(true)?;
    let metrics = match cfg.metrics {
        Some(addr) => {
            let l = std::net::TcpListener::bind(addr).map_err(|e| DaemonError::Metrics(addr, e))?;
            l.set_nonblocking(true)?;
            Some(l)
        }
        None => None,
    };
    let epoll = Epoll::new()?;
    if let Some(m) = &metrics {
        epoll.ctl(
            ControlOperation::Add,
            m.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_METRICS),
        )?;
    }
    let timer = DeadlineTimer::new()?;
    epoll.ctl(
        ControlOperation::Add,
        timer.as_raw_fd(),
        EpollEvent::new(EventSet::IN, TOKEN_TIMER),
    )?;
    epoll.ctl(
        ControlOperation::Add,
        listener.as_raw_fd(),
        EpollEvent::new(EventSet::IN, TOKEN_CTL),
    )?;
    let mut d = Daemon {
        cfg,
        engine: Engine::default(),
        mech: Mechanism::new(),
        state: StateFile::new(&cfg.state_file),
        vms: BTreeMap::new(),
        next_id: 0,
        epoll,
        enabled: true,
        host_events: 0,
        pending: Vec::new(),
    };
    let result = d.serve(
        &listener,
        metrics.as_ref(),
        &timer,
        stop,
        recovery,
        on_ready,
    );
    // Every path out restores: the engine unboosts, the mechanism restores what is left.
    let mut out = Vec::new();
    d.engine.shutdown(mono_ns(), &mut out);
    d.apply(&out);
    d.mech.restore_all();
    let _ = d.state.remove();
    let _ = std::fs::remove_file(&cfg.socket);
    result
}

impl Daemon<'_> {
    fn serve(
        &mut self,
        listener: &UnixListener,
        metrics: Option<&std::net::TcpListener>,
        timer: &DeadlineTimer,
        stop: &AtomicBool,
        recovery: Recovery,
        on_ready: impl FnOnce(&Recovery),
    ) -> Result<(), DaemonError> {
        for spec in &self.cfg.vms {
            self.attach(spec.source.clone(), spec.protocol.as_ref())?;
        }
        if self.cfg.watch {
            self.rescan();
        }
        // Run at a real-time priority above the vCPU threads it boosts.
        let class = self
            .cfg
            .opts
            .class("class", BoostClass::default())
            .unwrap_or_default();
        let _own = (self.cfg.driver != "none")
            .then(|| SchedGuard::apply(0, helper_class(class)).ok())
            .flatten();
        on_ready(&recovery);
        let mut ready = [EpollEvent::default(); 32];
        let mut last_scan = Instant::now();
        let mut hits = Vec::new();
        while !stop.load(Ordering::Acquire) {
            self.process();
            timer.set(self.mech.next_timer());
            // Slots have no doorbell here: poll them every millisecond.
            let any_slots = self.vms.values().any(|v| v.slots.is_some());
            let n = match self.epoll.wait(if any_slots { 1 } else { 100 }, &mut ready) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
                Err(e) => return Err(e.into()),
            };
            let now = mono_ns();
            for ev in &ready[..n] {
                match ev.data() {
                    TOKEN_TIMER => timer.drain(),
                    TOKEN_CTL => self.serve_ctl(listener),
                    TOKEN_METRICS => {
                        if let Some(m) = metrics {
                            self.serve_metrics(m);
                        }
                    }
                    t if t >= TOKEN_TRACE => {
                        let id = (t - TOKEN_TRACE) as u32;
                        self.drain_trace(id, &mut hits);
                    }
                    _ => {}
                }
            }
            self.mech.due_timers(now, &mut self.pending);
            self.poll_slots();
            if last_scan.elapsed() >= WATCH_PERIOD {
                last_scan = Instant::now();
                self.rescan();
            }
        }
        Ok(())
    }

    fn process(&mut self) {
        for _ in 0..8 {
            if self.pending.is_empty() {
                return;
            }
            let mut out = Vec::new();
            let events = std::mem::take(&mut self.pending);
            self.engine.handle_all(events, mono_ns(), &mut out);
            self.apply(&out);
        }
    }

    fn apply(&mut self, decisions: &[Decision]) {
        let mut follow = Vec::new();
        let mut publisher = SlotPublisher(&self.vms);
        self.mech
            .apply(decisions, &mut publisher, mono_ns(), &mono_ns, &mut follow);
        self.pending.extend(follow);
    }

    /// Reads the slots of every VM whose guest memory the daemon maps.
    fn poll_slots(&mut self) {
        for (&id, vm) in self.vms.iter_mut() {
            if let Some(s) = vm.slots.as_mut() {
                s.poll(id, vm.threads.len() as u32, &mut self.pending);
            }
        }
    }

    fn drain_trace(&mut self, id: u32, hits: &mut Vec<TraceHit>) {
        let Some(vm) = self.vms.get_mut(&id) else {
            return;
        };
        let Some(t) = vm.trace.as_mut() else { return };
        t.drain(hits);
        for h in hits.drain(..) {
            let Some(th) = vm.threads.get(h.vcpu) else {
                continue;
            };
            self.host_events += 1;
            self.pending
                .push(Event::new(VcpuKey::new(id, th.index), h.event.into()));
        }
    }

    /// Attaches the vCPU threads of `source` as a new VM, with its slots when given.
    fn attach(
        &mut self,
        source: VmSource,
        protocol: Option<&ProtocolSpec>,
    ) -> Result<(), DaemonError> {
        let slots = match protocol {
            Some(p) => {
                Some(GuestSlots::open(p).map_err(|e| DaemonError::Slots(source.clone(), e))?)
            }
            None => None,
        };
        let threads = threads_of(&source).map_err(|e| DaemonError::Discover(source.clone(), e))?;
        if threads.is_empty() {
            return Err(DaemonError::NoVcpus(source));
        }
        let id = self.next_id;
        self.next_id += 1;
        self.engine.add_vm(id, &self.cfg.driver, &self.cfg.opts)?;
        self.vms.insert(
            id,
            VmEntry {
                source,
                threads: Vec::new(),
                trace: None,
                slots,
            },
        );
        let tids: Vec<i32> = threads.iter().map(|t| t.tid).collect();
        tracing::info!(vm = id, source = %self.vms[&id].source, ?tids, driver = %self.cfg.driver, "attached VM");
        self.set_threads(id, threads)?;
        Ok(())
    }

    /// Makes VM `id`'s thread set `threads`: new ones registered (after their original class
    /// is on record), vanished ones unregistered, tracepoints reopened for the new set.
    fn set_threads(&mut self, id: u32, threads: Vec<VcpuThread>) -> Result<(), DaemonError> {
        let Some(vm) = self.vms.get_mut(&id) else {
            return Ok(());
        };
        let old = std::mem::take(&mut vm.threads);
        for t in &old {
            if !threads.iter().any(|n| n.tid == t.tid) {
                let key = VcpuKey::new(id, t.index);
                self.pending.push(Event::new(key, VcpuEvent::Unregistered));
            }
        }
        // Unregistered events are applied before the thread is forgotten.
        self.process();
        for t in &old {
            if !threads.iter().any(|n| n.tid == t.tid) {
                self.mech.unregister(VcpuKey::new(id, t.index));
                let _ = self.state.detach(t.tid);
            }
        }
        for t in &threads {
            if !old.iter().any(|o| o.tid == t.tid) {
                self.state.attach(t.tid).map_err(DaemonError::State)?;
                let key = VcpuKey::new(id, t.index);
                self.mech.register(key, t.tid);
                self.pending.push(Event::new(key, VcpuEvent::Registered));
            }
        }
        let vm = self.vms.get_mut(&id).expect("present");
        if let Some(old_trace) = vm.trace.take() {
            for fd in old_trace.fds() {
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
        }
        vm.threads = threads;
        let t = self.cfg.trace;
        let tracing = t.timer_expiry || t.wakeup || t.accept_irq;
        if tracing && !vm.threads.is_empty() {
            let tids: Vec<i32> = vm.threads.iter().map(|t| t.tid).collect();
            let trace = TraceSource::open(&tids, self.cfg.trace)?;
            for fd in trace.fds() {
                self.epoll.ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, TOKEN_TRACE + id as u64),
                )?;
            }
            vm.trace = Some(trace);
        }
        self.process();
        Ok(())
    }

    /// Follows thread changes of attached VMs, VMs that exit, and (with `--watch`) new VMs.
    fn rescan(&mut self) {
        let ids: Vec<u32> = self.vms.keys().copied().collect();
        for id in ids {
            let now = threads_of(&self.vms[&id].source).unwrap_or_default();
            let same = now.len() == self.vms[&id].threads.len()
                && now
                    .iter()
                    .zip(&self.vms[&id].threads)
                    .all(|(a, b)| a.tid == b.tid);
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
                if !threads.is_empty() && !threads.iter().any(|t| known.contains(&t.tid)) {
                    let _ = self.attach(VmSource::Pid(pid), None);
                }
            }
        }
    }

    fn detach(&mut self, id: u32) {
        tracing::info!(vm = id, "VM gone, detached");
        let _ = self.set_threads(id, Vec::new());
        let mut out = Vec::new();
        self.engine.remove_vm(id, mono_ns(), &mut out);
        self.apply(&out);
        self.vms.remove(&id);
    }

    fn status(&self) -> Status {
        let now = mono_ns();
        Status {
            enabled: self.enabled,
            host_events: self.host_events,
            vms: self
                .vms
                .iter()
                .map(|(&id, vm)| VmStatus {
                    id,
                    source: vm.source.to_string(),
                    pid: match vm.source {
                        VmSource::Pid(p) => Some(p),
                        _ => None,
                    },
                    driver: self.engine.driver_name(id).unwrap_or("?").to_string(),
                    protocol: vm.slots.is_some(),
                    enabled: self.engine.is_enabled(id),
                    vcpus: vm
                        .threads
                        .iter()
                        .map(|t| {
                            let key = VcpuKey::new(id, t.index);
                            let st = self.engine.vcpu(key);
                            VcpuStatus {
                                vcpu: t.index,
                                tid: t.tid,
                                boosted: self.mech.is_boosted(key),
                                boosts: st.map_or(0, |s| s.counters.boosts),
                                throttles: st.map_or(0, |s| s.counters.throttles),
                                boosted_ms: st.map_or(0.0, |s| s.boosted_ns(now) as f64 / 1e6),
                            }
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    fn serve_metrics(&mut self, listener: &std::net::TcpListener) {
        while let Ok((mut stream, _)) = listener.accept() {
            let _ = stream.set_nonblocking(false);
            let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
            // The request itself does not matter: every path answers the metrics.
            let mut buf = [0u8; 1024];
            let _ = std::io::Read::read(&mut stream, &mut buf);
            let body = crate::metrics::render(&self.status());
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all((head + &body).as_bytes());
        }
    }

    fn serve_ctl(&mut self, listener: &UnixListener) {
        while let Ok((stream, _)) = listener.accept() {
            let reply = self.handle_ctl(&stream);
            let mut w = &stream;
            let _ = w.write_all(format!("{reply}\n").as_bytes());
        }
    }

    fn handle_ctl(&mut self, stream: &UnixStream) -> serde_json::Value {
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
        let mut line = String::new();
        if BufReader::new(stream).read_line(&mut line).is_err() {
            return serde_json::json!({"ok": false, "error": "no request"});
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        tracing::info!(request = %line.trim(), "ctl");
        let now = mono_ns();
        let mut out = Vec::new();
        let vm_arg = |w: Option<&&str>| -> Result<Option<u32>, String> {
            w.map(|s| s.parse::<u32>().map_err(|_| format!("bad VM id {s:?}")))
                .transpose()
        };
        let result: Result<serde_json::Value, String> = match words.first().copied() {
            Some("status") => serde_json::to_value(self.status()).map_err(|e| e.to_string()),
            Some(cmd @ ("enable" | "disable")) => {
                let on = cmd == "enable";
                vm_arg(words.get(1)).and_then(|vm| {
                    if vm.is_none() {
                        self.enabled = on;
                    }
                    self.engine
                        .set_enabled(vm, on, now, &mut out)
                        .map(|_| serde_json::json!({"enabled": on, "vm": vm}))
                        .map_err(|e| e.to_string())
                })
            }
            Some("driver") => match (vm_arg(words.get(1)), words.get(2)) {
                (Ok(Some(vm)), Some(name)) => DriverOptions::parse(words[3..].iter().copied())
                    .map_err(|e| e.to_string())
                    .and_then(|opts| {
                        self.engine
                            .set_driver(vm, name, &opts, now, &mut out)
                            .map(|_| serde_json::json!({"vm": vm, "driver": name}))
                            .map_err(|e| e.to_string())
                    }),
                _ => Err("usage: driver <vm> <name> [key=value ...]".into()),
            },
            _ => Err("commands: status | enable [vm] | disable [vm] | driver <vm> <name> [key=value ...]".into()),
        };
        self.apply(&out);
        self.process();
        match result {
            Ok(v) => serde_json::json!({"ok": true, "result": v}),
            Err(e) => serde_json::json!({"ok": false, "error": e}),
        }
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
