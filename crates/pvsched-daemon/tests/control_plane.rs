//! The control plane cannot stall the engine: while a ctl client trickles its request one
//! byte at a time and 50 metrics clients connect and say nothing, a guest's request is boosted
//! and its budget still ends the boost on time.
//! Needs the privilege to set real-time classes and /dev/kvm (the daemon boosts only threads of
//! a process holding a KVM vCPU; skips, saying why, without either).

use pvsched_daemon::{DaemonConfig, ProtocolSpec, VmSource, VmSpec};
use pvsched_host::sched::{self, SchedClass, SchedGuard};
use pvsched_host::slot::GuestSlot;
use pvsched_host::trace::TraceConfig;
use pvsched_policy::DriverOptions;
use pvsched_proto::abi::{off, Reason};
use pvsched_proto::SlotMemory;
use pvsched_testutil::{skip, ParkedThread};
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

const SLOT: u64 = 0x1000;

fn is_fifo(tid: i32) -> bool {
    sched::get(tid).is_ok_and(|a| a.policy == libc::SCHED_FIFO as u32)
}

/// Whether this process may set real-time classes; if not, says that `test` skips.
fn may_set_rt(test: &str) -> bool {
    match SchedGuard::apply(0, SchedClass::Fifo(1)).and_then(|g| g.restore()) {
        Ok(()) => true,
        Err(e) => {
            skip!("{test}: {e}");
            false
        }
    }
}

/// Real-time classes allowed and a KVM vCPU held by this process (the daemon boosts only
/// threads of a process that holds one), or `None` after saying why `test` skips.
fn rt_and_kvm_vcpu(test: &str) -> Option<pvsched_testutil::HeldVcpu> {
    if !may_set_rt(test) {
        return None;
    }
    match pvsched_testutil::hold_kvm_vcpu() {
        Ok(v) => Some(v),
        Err(e) => {
            skip!("{test}: {e}");
            None
        }
    }
}

/// [`rt_and_kvm_vcpu`] on a kernel that keeps custom EEVDF slices, or `None` after saying why
/// `test` skips.
fn rt_kvm_and_slices(test: &str) -> Option<pvsched_testutil::HeldVcpu> {
    let vcpu = rt_and_kvm_vcpu(test)?;
    if !sched::fair_slice().custom {
        skip!("{test}: this kernel ignores custom EEVDF slices (Linux < 6.12)");
        return None;
    }
    Some(vcpu)
}

/// Polls `f` until it holds; fails naming `what` after 10 s.
fn wait_until(what: &str, f: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(10), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// An empty directory of this test run named after `tag`.
fn fresh_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("pvsched-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A daemon configuration for `vms` in `dir`: no tracepoints, no quiet gate (the tests check
/// mechanics on however idle a machine).
fn base_config(dir: &std::path::Path, vms: Vec<VmSpec>) -> DaemonConfig {
    DaemonConfig {
        trace: TraceConfig::none(),
        quiet_gate: None,
        ..DaemonConfig::new(vms, dir.join("ctl.sock"), dir.join("state.json"))
    }
}

/// [`test_config`] for this process as a VM: its threads named like vCPUs are found by name.
fn this_process(dir: &std::path::Path) -> DaemonConfig {
    test_config(
        dir,
        VmSpec {
            source: VmSource::Pid(std::process::id() as i32),
            protocol: None,
        },
    )
}

/// [`base_config`] for one VM.
fn test_config(dir: &std::path::Path, vm: VmSpec) -> DaemonConfig {
    base_config(dir, vec![vm])
}

type DaemonThread =
    std::thread::JoinHandle<Result<pvsched_daemon::DaemonStatus, pvsched_daemon::DaemonError>>;

/// Runs the daemon on a thread until the returned flag is set; returns once it is ready.
fn start_daemon(cfg: DaemonConfig) -> (DaemonThread, Arc<AtomicBool>) {
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = mpsc::channel();
    let flag = stop.clone();
    let daemon = std::thread::spawn(move || {
        pvsched_daemon::run(&cfg, &flag, |_| {
            let _ = ready_tx.send(());
        })
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("daemon ready");
    (daemon, stop)
}

/// Keeps `n` connections to `addr` open and silent (reconnecting those the server drops)
/// until `stop`.
fn idle_clients(
    addr: std::net::SocketAddr,
    n: usize,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let connect = || std::net::TcpStream::connect(addr).ok();
        let mut conns: Vec<Option<std::net::TcpStream>> = (0..n).map(|_| connect()).collect();
        let mut opened = n;
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
            for c in conns.iter_mut() {
                let closed = c.as_ref().is_none_or(|s| {
                    let _ = s.set_nonblocking(true);
                    s.peek(&mut [0u8; 1]).is_ok()
                });
                if closed {
                    *c = connect();
                    opened += 1;
                }
            }
        }
        opened
    })
}

#[test]
fn stalled_control_clients_do_not_delay_a_budget_unboost() {
    let test = "stalled_control_clients_do_not_delay_a_budget_unboost";
    let Some(_vcpu) = rt_and_kvm_vcpu(test) else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("pvsched-cp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let memory = dir.join("guest-ram");
    std::fs::write(&memory, vec![0u8; 0x4000]).unwrap();
    let vcpu = ParkedThread::spawn();
    let tid = vcpu.tid();
    let cfg = DaemonConfig {
        // The RT-task budget ends the boost after 50 ms.
        // RT-task requests at FIFO (`dynamic`'s default is a custom slice): a real-time boost
        // is what the budget must end.
        opts: DriverOptions::parse(["rt_budget=50ms", "class_task=fifo:10"]).unwrap(),
        ..test_config(
            &dir,
            VmSpec {
                source: VmSource::Tids(vec![tid]),
                protocol: Some(ProtocolSpec {
                    memory: memory.clone(),
                    slots: vec![SLOT],
                    tsc_offset: None,
                    features: 0,
                    v3: false,
                }),
            },
        )
    };
    // Metrics on a free loopback port.
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let cfg = DaemonConfig {
        metrics: Some(metrics),
        ..cfg
    };
    let socket = cfg.socket.clone();
    let socket2 = cfg.socket.clone();
    let (daemon, stop) = start_daemon(cfg);
    // 50 metrics clients that connect and never send a request.
    let idle_stop = Arc::new(AtomicBool::new(false));
    let idle = idle_clients(metrics, 50, idle_stop.clone());

    // A client that sends its request one byte every 50 ms, never a whole line, and comes
    // back as soon as it is cut off: the control plane is kept busy with it all along.
    let trickle_stop = Arc::new(AtomicBool::new(false));
    let ts = trickle_stop.clone();
    let trickler = std::thread::spawn(move || {
        while !ts.load(Ordering::Relaxed) {
            let Ok(mut c) = UnixStream::connect(&socket) else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            for b in b"status".iter().cycle() {
                if ts.load(Ordering::Relaxed) || c.write_all(&[*b]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    });
    // Long enough for the control plane to be stuck with them (200 ms per silent client).
    std::thread::sleep(Duration::from_millis(500));

    // The "guest" asks for an RT-task boost through its slot in the shared memory file.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&memory)
        .unwrap();
    let mem = GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        0x4000,
        Some(FileOffset::new(f, 0)),
    )])
    .unwrap();
    let slot = GuestSlot::new(&mem, SLOT);
    slot.store_u32(off::REQUEST, Reason::RtTask.bit());
    slot.store_u32(off::SEQ, 1);
    let t0 = Instant::now();
    while !is_fifo(tid) {
        assert!(t0.elapsed() < Duration::from_secs(5), "never boosted");
        std::thread::sleep(Duration::from_micros(500));
    }
    let boosted_at = Instant::now();
    while is_fifo(tid) {
        assert!(
            boosted_at.elapsed() < Duration::from_secs(5),
            "the budget never ended the boost"
        );
        std::thread::sleep(Duration::from_micros(500));
    }
    let held = boosted_at.elapsed();
    // The guest lets go (else, its debt repaid 50 ms later, it would be boosted again).
    slot.store_u32(off::REQUEST, 0);
    slot.store_u32(off::SEQ, 2);
    let client_busy = !trickler.is_finished() && !idle.is_finished();
    // The control plane is busy with the trickling client all along.
    let t = Instant::now();
    let answer = pvsched_daemon::ctl(&socket2, "status");
    let status_wait = t.elapsed();
    trickle_stop.store(true, Ordering::Relaxed);
    idle_stop.store(true, Ordering::Relaxed);
    // Hung up, the idle clients let the control plane (and the daemon's stop) go on at once.
    let opened = idle.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    let fin = daemon.join().unwrap().unwrap();
    trickler.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(client_busy, "the clients were still there");
    // Metrics have their own thread: a ctl request waits for the trickling ctl client only
    // (at most CLIENT_TIMEOUT, 200 ms), not for 50 silent metrics clients (10 s, beyond the
    // ctl client's own 5 s timeout).
    assert!(
        answer.is_ok_and(|v| v["ok"] == true),
        "ctl status stuck behind the metrics clients ({status_wait:?})"
    );
    assert!(opened >= 50, "{opened} idle metrics connections");
    assert!(!is_fifo(tid));
    // The engine's own account of the boost: how long past its 50 ms budget it ended. A
    // control plane able to stall the engine would add its client timeouts (200 ms per
    // client) here. (Seen by the test's polling: {held:?}.)
    let v = &fin.vms[0].vm.vcpus[0];
    assert_eq!((v.boosts, v.throttles), (1, 1), "{v:?}");
    let late_ms = v.boosted_ms - 50.0;
    eprintln!(
        "budget unboost {late_ms:.3} ms after the budget; {opened} idle metrics connections; \
         status waited {status_wait:?}"
    );
    assert!(
        late_ms <= 5.0,
        "the budget unboost came {late_ms:.2} ms late (the test saw the boost held {held:?})"
    );
    drop(vcpu);
}

/// A QMP peer that answers `query-cpus-fast` with one of this process's threads, or, while
/// `fail` is set, hangs up at once.
fn fake_qmp(path: &std::path::Path, tid: i32, fail: Arc<AtomicBool>, stop: Arc<AtomicBool>) {
    use std::io::{BufRead, BufReader};
    let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let Ok((mut s, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            if fail.load(Ordering::Relaxed) {
                continue; // dropped: the daemon reads EOF
            }
            let _ = s.set_nonblocking(false);
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            let _ = writeln!(s, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#);
            let _ = r.read_line(&mut line);
            let _ = writeln!(s, r#"{{"return": {{}}}}"#);
            line.clear();
            let _ = r.read_line(&mut line);
            let _ = writeln!(
                s,
                r#"{{"return": [{{"cpu-index": 0, "thread-id": {tid}}}]}}"#
            );
        }
    });
}

/// One failing QMP query does not detach a VM; only `QMP_FAILURES` in a row do.
#[test]
fn a_transient_qmp_error_keeps_the_vm() {
    let _vcpu = match pvsched_testutil::hold_kvm_vcpu() {
        Ok(v) => v,
        Err(e) => {
            skip!("a_transient_qmp_error_keeps_the_vm: {e}");
            return;
        }
    };
    let dir = std::env::temp_dir().join(format!("pvsched-qmpflaky-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let qmp = dir.join("qmp.sock");
    let _ = std::fs::remove_file(&qmp);
    let thread = ParkedThread::spawn();
    let fail = Arc::new(AtomicBool::new(false));
    let server_stop = Arc::new(AtomicBool::new(false));
    fake_qmp(&qmp, thread.tid(), fail.clone(), server_stop.clone());
    let cfg = DaemonConfig {
        driver: "none".into(),
        ..test_config(
            &dir,
            VmSpec {
                source: VmSource::Qmp(qmp.clone()),
                protocol: None,
            },
        )
    };
    let socket = cfg.socket.clone();
    let (daemon, stop) = start_daemon(cfg);
    let vms = || -> usize {
        let v = pvsched_daemon::ctl(&socket, "status").unwrap();
        v["result"]["vms"].as_array().map_or(0, Vec::len)
    };
    assert_eq!(vms(), 1, "attached through QMP");
    // One rescan (every second) that fails.
    fail.store(true, Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(1500));
    fail.store(false, Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(vms(), 1, "still attached after a transient failure");
    // QEMU gone for good: detached after a few failures in a row.
    fail.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    while vms() == 1 {
        assert!(t0.elapsed() < Duration::from_secs(15), "never detached");
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    server_stop.store(true, Ordering::Relaxed);
    daemon.join().unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Local processes connecting to the ivshmem socket in a loop (each refused: not a VMM)
/// neither keep the control plane from answering `ctl` nor from stopping.
#[test]
fn a_flood_of_ivshmem_peers_does_not_hold_the_control_plane() {
    let test = "a_flood_of_ivshmem_peers_does_not_hold_the_control_plane";
    if !may_set_rt(test) {
        return;
    }
    let dir = fresh_dir("flood");
    let sock = dir.join("ivshmem.sock");
    let cfg = DaemonConfig {
        ivshmem: Some(sock.clone()),
        ..base_config(&dir, Vec::new())
    };
    let (daemon, stop) = start_daemon(cfg);
    let flooding = Arc::new(AtomicBool::new(true));
    let flooders: Vec<_> = (0..4)
        .map(|_| {
            let (sock, on) = (sock.clone(), flooding.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while on.load(Ordering::Relaxed) {
                    // Several connections queued at once, then dropped.
                    let conns: Vec<_> = (0..16)
                        .filter_map(|_| UnixStream::connect(&sock).ok())
                        .collect();
                    n += conns.len() as u64;
                }
                n
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // ctl answers meanwhile, and the daemon stops when told.
    let (tx, rx) = mpsc::channel();
    let ctl = dir.join("ctl.sock");
    std::thread::spawn(move || {
        let _ = tx.send(pvsched_daemon::ctl(&ctl, "status").map(|v| v["ok"].as_bool()));
    });
    let answered = rx.recv_timeout(Duration::from_secs(20));
    stop.store(true, Ordering::Release);
    let t0 = Instant::now();
    while !daemon.is_finished() && t0.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let stopped = daemon.is_finished();
    flooding.store(false, Ordering::Relaxed);
    let connects: u64 = flooders.into_iter().map(|f| f.join().unwrap()).sum();
    if stopped {
        daemon.join().unwrap().unwrap();
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(connects > 100, "the flood connected {connects} times");
    assert!(
        matches!(answered, Ok(Ok(_))),
        "ctl status during the flood: {answered:?}"
    );
    assert!(stopped, "the daemon did not stop during the flood");
}

/// A thread of this process named `name`, parked until dropped; its thread id.
fn named_thread(name: &str) -> (i32, mpsc::Sender<()>) {
    let (tid_tx, tid_rx) = mpsc::channel();
    let (release, wait) = mpsc::channel::<()>();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            // SAFETY: gettid has no arguments and cannot fail.
            tid_tx.send(unsafe { libc::gettid() }).unwrap();
            let _ = wait.recv();
        })
        .unwrap();
    (tid_rx.recv().unwrap(), release)
}

/// Two threads of this process named like QEMU's first two KVM vCPU threads (each runs until
/// its sender is dropped).
fn two_vcpu_threads() -> [(i32, mpsc::Sender<()>); 2] {
    [named_thread("CPU 0/KVM"), named_thread("CPU 1/KVM")]
}

/// A VMM that renames its vCPU threads (two swap names) has them attached again under their
/// new vCPU numbers: the daemon's list and the runtime's keys agree, both stay boosted, and
/// the daemon's stop restores them.
#[test]
fn vcpu_threads_that_swap_names_are_attached_under_their_new_numbers() {
    let test = "vcpu_threads_that_swap_names_are_attached_under_their_new_numbers";
    let Some(_vcpu) = rt_and_kvm_vcpu(test) else {
        return;
    };
    let [(t0, _r0), (t1, _r1)] = two_vcpu_threads();
    let dir = fresh_dir("rename");
    let cfg = DaemonConfig {
        driver: "static".into(),
        max_boosted: None,
        ..this_process(&dir)
    };
    let (daemon, stop) = start_daemon(cfg);
    let ctl = dir.join("ctl.sock");
    // (tid, vCPU number) of each attached thread, as `ctl status` shows them.
    let attached = || -> Vec<(i64, i64)> {
        let Ok(v) = pvsched_daemon::ctl(&ctl, "status") else {
            return Vec::new();
        };
        let mut pairs: Vec<(i64, i64)> = v["result"]["vms"][0]["vcpus"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| Some((c["tid"].as_i64()?, c["vcpu"].as_i64()?)))
            .collect();
        pairs.sort_unstable();
        pairs
    };
    let wait = |what: &str, f: &dyn Fn() -> bool| {
        let t0 = Instant::now();
        while !f() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "timed out: {what}: {:?}",
                pvsched_daemon::ctl(&ctl, "status")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let sorted = |mut v: Vec<(i64, i64)>| {
        v.sort_unstable();
        v
    };
    let before = sorted(vec![(t0.into(), 0), (t1.into(), 1)]);
    wait("both attached and boosted", &|| {
        attached() == before && is_fifo(t0) && is_fifo(t1)
    });
    for (tid, name) in [(t0, "CPU 1/KVM"), (t1, "CPU 0/KVM")] {
        std::fs::write(format!("/proc/self/task/{tid}/comm"), name).unwrap();
    }
    let after = sorted(vec![(t0.into(), 1), (t1.into(), 0)]);
    wait("attached under the new numbers", &|| attached() == after);
    wait("both boosted again", &|| is_fifo(t0) && is_fifo(t1));
    stop.store(true, Ordering::Release);
    daemon.join().unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        !is_fifo(t0) && !is_fifo(t1),
        "restored at the daemon's stop"
    );
}

/// Metrics clients connecting as fast as they can do not make the real-time engine thread
/// build a status for each: the engine's wake-ups grow by far fewer than the scrapes.
#[test]
fn a_flood_of_metrics_scrapes_does_not_drive_the_engine() {
    use std::io::Read;
    let test = "a_flood_of_metrics_scrapes_does_not_drive_the_engine";
    if !may_set_rt(test) {
        return;
    }
    let dir = fresh_dir("scrape");
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let cfg = DaemonConfig {
        metrics: Some(metrics),
        ..base_config(&dir, Vec::new())
    };
    let (daemon, stop) = start_daemon(cfg);
    let ctl = dir.join("ctl.sock");
    let wakeups = || {
        pvsched_daemon::ctl(&ctl, "status").unwrap()["result"]["cost"]["wakeups"]
            .as_u64()
            .unwrap()
    };
    const SCRAPES: u64 = 1000;
    let before = wakeups();
    let t0 = Instant::now();
    for _ in 0..SCRAPES {
        let mut s = std::net::TcpStream::connect(metrics).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    }
    let took = t0.elapsed();
    let grew = wakeups() - before;
    stop.store(true, Ordering::Release);
    daemon.join().unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    // The engine wakes on its own too (timers, ~50/s idle): bounded by half the scrapes
    // unless the flood took many seconds.
    assert!(
        grew < SCRAPES / 2,
        "{SCRAPES} scrapes in {took:?} woke the engine {grew} times"
    );
}

#[test]
fn a_base_slice_is_kept_between_boosts_and_taken_back_when_the_daemon_stops() {
    let test = "a_base_slice_is_kept_between_boosts_and_taken_back_when_the_daemon_stops";
    let Some(_vcpu) = rt_kvm_and_slices(test) else {
        return;
    };
    let dir = fresh_dir("base-slice");
    let vcpu = ParkedThread::spawn();
    let tid = vcpu.tid();
    // A thread at nice 2: the base slice keeps its nice.
    let nice2 = sched::SchedAttr {
        policy: libc::SCHED_OTHER as u32,
        nice: 2,
        ..Default::default()
    };
    sched::set(tid, &nice2).unwrap();
    let before = sched::get(tid).unwrap();
    let state = dir.join("state.json");
    // `static`: boosted (FIFO) while boosting is enabled, unboosted while it is disabled.
    let cfg = DaemonConfig {
        base_slice: Some(100_000),
        driver: "static".into(),
        ..test_config(
            &dir,
            VmSpec {
                source: VmSource::Tids(vec![tid]),
                protocol: None,
            },
        )
    };
    let socket = cfg.socket.clone();
    let (daemon, stop) = start_daemon(cfg);
    let wait_for = |what: &str, ok: &dyn Fn(&sched::SchedAttr) -> bool| {
        wait_until(what, || ok(&sched::get(tid).unwrap()));
    };
    wait_for("boosted", &|a| a.policy == libc::SCHED_FIFO as u32);
    pvsched_daemon::ctl(&socket, "disable").unwrap();
    wait_for("between boosts: the base slice, nice kept", &|a| {
        (a.policy, a.nice, a.runtime) == (libc::SCHED_OTHER as u32, 2, 100_000)
    });
    pvsched_daemon::ctl(&socket, "enable").unwrap();
    wait_for("boosted again", &|a| a.policy == libc::SCHED_FIFO as u32);
    // Recorded for a crash recovery with the class it had before.
    let recorded = pvsched_daemon::state::parse_entries(&std::fs::read(&state).unwrap()).unwrap();
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].original, before);
    stop.store(true, Ordering::Relaxed);
    let status = daemon.join().unwrap().unwrap();
    assert!(status.unrestored.is_empty(), "{:?}", status.unrestored);
    assert_eq!(sched::get(tid).unwrap(), before, "taken back at the stop");
    assert!(!state.exists(), "nothing left to recover");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `vmm_slice`: the VM process's main thread (here the test binary's) gets the custom slice,
/// its vCPU threads do not (no base slice asked for), and the stop takes it back.
#[test]
fn the_vmm_main_thread_gets_the_vmm_slice_and_has_it_taken_back() {
    let test = "the_vmm_main_thread_gets_the_vmm_slice_and_has_it_taken_back";
    let Some(_vcpu) = rt_kvm_and_slices(test) else {
        return;
    };
    let main = std::process::id() as i32;
    let [(t0, _r0), (t1, _r1)] = two_vcpu_threads();
    let (m, b0, b1) = (
        sched::get(main).unwrap(),
        sched::get(t0).unwrap(),
        sched::get(t1).unwrap(),
    );
    let dir = fresh_dir("vmm-slice");
    let state = dir.join("state.json");
    let cfg = DaemonConfig {
        driver: "none".into(),
        vmm_slice: Some(150_000),
        ..this_process(&dir)
    };
    let (daemon, stop) = start_daemon(cfg);
    wait_until("the main thread on the VMM slice", || {
        sched::get(main).unwrap().runtime == 150_000
    });
    let now = sched::get(main).unwrap();
    assert_eq!(
        (now.policy, now.nice),
        (m.policy, m.nice),
        "policy and nice kept"
    );
    assert_eq!(
        sched::get(t0).unwrap(),
        b0,
        "a vCPU thread gets no VMM slice"
    );
    assert_eq!(sched::get(t1).unwrap(), b1);
    // Recorded for a crash recovery with the class it had before.
    let recorded = pvsched_daemon::state::parse_entries(&std::fs::read(&state).unwrap()).unwrap();
    assert!(
        recorded.iter().any(|e| e.tid == main && e.original == m),
        "{recorded:?}"
    );
    // Its vCPU threads renamed (no vCPU left): the VM is detached, the slice taken back.
    for t in [t0, t1] {
        std::fs::write(format!("/proc/self/task/{t}/comm"), "worker").unwrap();
    }
    wait_until("taken back at the detach", || {
        sched::get(main).unwrap() == m
    });
    stop.store(true, Ordering::Release);
    let status = daemon.join().unwrap().unwrap();
    assert!(status.unrestored.is_empty(), "{:?}", status.unrestored);
    assert_eq!(sched::get(main).unwrap(), m);
    assert!(!state.exists(), "nothing left to recover");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A vCPU thread the daemon lets go while it still runs (its VMM renamed it: it is no vCPU
/// any more) is taken off the base slice at once; the other keeps it until the stop.
#[test]
fn a_thread_let_go_while_it_runs_is_taken_off_the_base_slice() {
    let test = "a_thread_let_go_while_it_runs_is_taken_off_the_base_slice";
    let Some(_vcpu) = rt_kvm_and_slices(test) else {
        return;
    };
    let [(t0, _r0), (t1, _r1)] = two_vcpu_threads();
    let (b0, b1) = (sched::get(t0).unwrap(), sched::get(t1).unwrap());
    let dir = fresh_dir("base-slice-let-go");
    let cfg = DaemonConfig {
        driver: "none".into(),
        base_slice: Some(200_000),
        ..this_process(&dir)
    };
    let (daemon, stop) = start_daemon(cfg);
    let slice = |t: i32| sched::get(t).unwrap().runtime;
    wait_until("both on the base slice", || {
        slice(t0) == 200_000 && slice(t1) == 200_000
    });
    std::fs::write(format!("/proc/self/task/{t1}/comm"), "worker").unwrap();
    wait_until("the renamed thread taken off it", || {
        sched::get(t1).unwrap() == b1
    });
    assert_eq!(slice(t0), 200_000, "the other keeps it");
    stop.store(true, Ordering::Release);
    daemon.join().unwrap().unwrap();
    assert_eq!(sched::get(t0).unwrap(), b0, "taken back at the stop");
    let _ = std::fs::remove_dir_all(&dir);
}
