//! `pvsched daemon` and `pvsched ctl` against a testbed VM running as a separate
//! `pvsched vm` process, as with any other VMM: boosting from tracepoints, ctl disable/enable,
//! SIGTERM and `kill -9` + recovery leaving nothing boosted. Skips, saying why, without
//! /dev/kvm, real-time privileges or tracepoints.

mod common;

use common::{ctl, pvsched, spawn_daemon};
use pvsched_testutil::{kvm_or_skip, serial, skip};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A busy testbed VM in its own process, killed on drop.
struct VmProc(Child);

impl VmProc {
    /// Starts `pvsched vm` with a busy guest and `extra` options, and waits for its threads.
    fn start_with(extra: &[&std::ffi::OsStr]) -> VmProc {
        let child = pvsched()
            .args([
                "vm",
                "--vcpus",
                "2",
                "--duration",
                "60s",
                "--guest-load",
                "busy",
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let vm = VmProc(child);
        wait_for("VM threads", Duration::from_secs(10), || {
            vm.vcpu_tids().len() == 2
        });
        vm
    }

    /// A VM without the protocol: only host-side events can boost it.
    fn start() -> VmProc {
        Self::start_with(&["--pv".as_ref(), "off".as_ref()])
    }

    fn pid(&self) -> i32 {
        self.0.id() as i32
    }

    fn vcpu_tids(&self) -> Vec<i32> {
        let mut v = Vec::new();
        for e in std::fs::read_dir(format!("/proc/{}/task", self.pid()))
            .into_iter()
            .flatten()
            .flatten()
        {
            let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            if comm.starts_with("pvsched-vcpu") {
                v.push(e.file_name().to_string_lossy().parse().unwrap());
            }
        }
        v
    }

    fn policies(&self) -> Vec<i32> {
        // SAFETY: sched_getscheduler on a tid; -1 when it is gone.
        self.vcpu_tids()
            .into_iter()
            .map(|t| unsafe { libc::sched_getscheduler(t) })
            .collect()
    }

    fn any_fifo(&self) -> bool {
        self.policies().contains(&libc::SCHED_FIFO)
    }

    fn all_other(&self) -> bool {
        self.policies().iter().all(|&p| p == libc::SCHED_OTHER)
    }
}

impl Drop for VmProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn paths(tag: &str) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("pvsched-daemon-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    (dir.join("ctl.sock"), dir.join("state.json"))
}

/// Starts the daemon on `vm` (from a config file when `config` is given); `None` (after
/// saying why) when this host cannot run it.
fn start_daemon(
    test: &str,
    vm: &VmProc,
    socket: &Path,
    state: &Path,
    config: Option<&Path>,
) -> Option<Child> {
    let mut cmd = pvsched();
    match config {
        Some(c) => cmd.arg("daemon").arg("--config").arg(c),
        None => cmd
            // The tests check the mechanics, on however idle a machine: no quiet gate.
            .args([
                "daemon",
                "--boost-when",
                "always",
                "--pid",
                &vm.pid().to_string(),
            ])
            .arg("--socket")
            .arg(socket)
            .arg("--state-file")
            .arg(state),
    };
    spawn_daemon(test, cmd, socket)
}

/// Writes a daemon configuration next to `socket` (`[daemon]` with that socket and `state`,
/// then `rest`, which may go on with `[daemon]` keys) and starts the daemon with it; `None`
/// (after saying why) when this host cannot run it.
fn start_configured(test: &str, socket: &Path, state: &Path, rest: &str) -> Option<Child> {
    let config = socket.with_file_name("pvsched.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\nsocket = {:?}\nstate_file = {:?}\n{rest}",
            socket.display().to_string(),
            state.display().to_string(),
        ),
    )
    .unwrap();
    let mut cmd = pvsched();
    cmd.arg("daemon").arg("--config").arg(&config);
    spawn_daemon(test, cmd, socket)
}

fn http_get(port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn daemon_boosts_a_vm_process_obeys_ctl_and_restores_on_sigterm() {
    let _s = serial();
    let test = "daemon_boosts_a_vm_process_obeys_ctl_and_restores_on_sigterm";
    if !kvm_or_skip(test) {
        return;
    }
    let vm = VmProc::start();
    let (socket, state) = paths("ctl");
    // This one reads a configuration file, with Prometheus metrics on a free local port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = socket.with_file_name("pvsched.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\nsocket = {:?}\nstate_file = {:?}\nmetrics = \"127.0.0.1:{port}\"\n\
             boost_when = \"always\"\n\
             [policy]\ndriver = \"dynamic\"\noptions = {{ cs_budget = \"3ms\" }}\n\
             [[vm]]\npid = {}\n",
            socket.display().to_string(),
            state.display().to_string(),
            vm.pid()
        ),
    )
    .unwrap();
    let Some(mut d) = start_daemon(test, &vm, &socket, &state, Some(&config)) else {
        return;
    };
    // Timer interrupts of the busy guest make the daemon boost its vCPU threads.
    wait_for(
        "a vCPU thread seen at SCHED_FIFO",
        Duration::from_secs(5),
        || vm.any_fifo(),
    );
    assert!(
        state.exists(),
        "state file written while threads may be boosted"
    );
    let (ok, out) = ctl(&socket, &["status"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["vms"][0]["pid"], vm.pid());
    assert_eq!(v["vms"][0]["vcpus"].as_array().unwrap().len(), 2);
    let boosts: u64 = v["vms"][0]["vcpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["boosts"].as_u64().unwrap())
        .sum();
    assert!(boosts > 0, "{out}");
    assert!(v["host_events"].as_u64().unwrap() > 0);
    let metrics = http_get(port);
    assert!(metrics.starts_with("HTTP/1.1 200 OK"), "{metrics}");
    assert!(
        metrics.contains("pvsched_vcpu_boosts_total{vm=\"0\""),
        "{metrics}"
    );
    assert!(metrics.contains("pvsched_host_events_total"), "{metrics}");

    // Disabled: restored at once, and not boosted again.
    let (ok, out) = ctl(&socket, &["disable"]);
    assert!(ok, "{out}");
    wait_for(
        "all vCPU threads restored",
        Duration::from_millis(500),
        || vm.all_other(),
    );
    for _ in 0..100 {
        assert!(vm.all_other(), "boosted while disabled");
        std::thread::sleep(Duration::from_millis(2));
    }
    let (ok, out) = ctl(&socket, &["enable"]);
    assert!(ok, "{out}");
    wait_for(
        "boosting again after enable",
        Duration::from_secs(5),
        || vm.any_fifo(),
    );
    let (ok, out) = ctl(&socket, &["driver", "0", "nosuch"]);
    assert!(!ok && out.contains("unknown policy driver"), "{out}");

    // SIGTERM: every thread restored, state file removed, exit 0.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
    let status = d.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(vm.all_other(), "restored on SIGTERM: {:?}", vm.policies());
    assert!(!state.exists());
}

/// The arguments of contrib/pvsched.service's `key=` command line, with its state file
/// replaced by `state`.
fn unit_recovery_args(key: &str, state: &Path) -> Vec<std::ffi::OsString> {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/contrib/pvsched.service"
    ))
    .unwrap();
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("the unit has no {key}"));
    let mut words = line.split_whitespace().skip(1);
    let mut args = Vec::new();
    while let Some(w) = words.next() {
        args.push(w.into());
        if w == "--state-file" {
            words.next();
            args.push(state.as_os_str().to_owned());
        }
    }
    assert!(
        args.iter().any(|a| a == "--recover-only"),
        "{key} recovers: {line}"
    );
    args
}

#[test]
fn the_unit_recovers_before_start_and_after_stop() {
    let state = std::env::temp_dir().join("pvsched-unit.state");
    assert_eq!(
        unit_recovery_args("ExecStartPre", &state),
        unit_recovery_args("ExecStopPost", &state)
    );
}

#[test]
fn kill_9_then_recovery_leaves_nothing_boosted() {
    let _s = serial();
    let test = "kill_9_then_recovery_leaves_nothing_boosted";
    if !kvm_or_skip(test) {
        return;
    }
    let vm = VmProc::start();
    let (socket, state) = paths("kill9");
    // Kill the daemon while it has a thread boosted (retry: boosts are short).
    let mut leaked = false;
    for _ in 0..20 {
        let Some(mut d) = start_daemon(test, &vm, &socket, &state, None) else {
            return;
        };
        wait_for("a boost", Duration::from_secs(5), || vm.any_fifo());
        let _ = d.kill(); // SIGKILL
        let _ = d.wait();
        if vm.any_fifo() {
            leaked = true;
            break;
        }
        // Nothing was boosted at the moment of the kill: clean up and try again.
        let _ = std::fs::remove_file(&socket);
    }
    assert!(leaked, "could not catch the daemon with a thread boosted");
    // The recovery the systemd unit runs after the daemon stopped, however it stopped.
    let args = unit_recovery_args("ExecStopPost", &state);
    let t0 = Instant::now();
    let out = pvsched().args(&args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("restored"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        vm.all_other(),
        "recovery restored every thread: {:?}",
        vm.policies()
    );
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "recovery took {:?}",
        t0.elapsed()
    );
    assert!(!state.exists());
}

#[test]
fn daemon_usage_errors_are_clear() {
    let out = pvsched()
        .args(["daemon", "--socket", "/tmp/x.sock"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--pid"));
    // A process without vCPU threads: waited for while it is young and alive (a VMM may be
    // about to name them), then refused.
    let mut sleeper = Command::new("sleep").arg("1").spawn().unwrap();
    let (socket, state) = paths("usage");
    let out = pvsched()
        .args(["daemon", "--pid", &sleeper.id().to_string(), "--socket"])
        .arg(&socket)
        .arg("--state-file")
        .arg(&state)
        .output()
        .unwrap();
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("has no vCPU threads"), "{err}");
    assert!(err.contains("no vCPU threads named yet: waiting"), "{err}");
    let out = pvsched()
        .args(["ctl", "--socket", "/nonexistent/pvsched.sock", "status"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot talk to the daemon"));
    // Metrics only on loopback unless said otherwise.
    let (socket, state) = paths("metrics-public");
    let out = pvsched()
        .args(["daemon", "--watch", "--metrics", "0.0.0.0:0", "--socket"])
        .arg(&socket)
        .arg("--state-file")
        .arg(&state)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("not a loopback address"), "{err}");
}

#[test]
fn watch_follows_vms_starting_and_stopping() {
    let _s = serial();
    let test = "watch_follows_vms_starting_and_stopping";
    if !kvm_or_skip(test) {
        return;
    }
    let (socket, state) = paths("watch");
    let mut cmd = pvsched();
    cmd.args(["daemon", "--boost-when", "always", "--watch", "--socket"])
        .arg(&socket)
        .arg("--state-file")
        .arg(&state);
    let Some(mut d) = spawn_daemon(test, cmd, &socket) else {
        return;
    };
    let vms = |socket: &Path| -> Vec<serde_json::Value> {
        let (ok, out) = ctl(socket, &["status"]);
        assert!(ok, "{out}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["vms"].as_array().unwrap().clone()
    };
    {
        let vm = VmProc::start();
        let pid = vm.pid();
        wait_for("the new VM attached", Duration::from_secs(5), || {
            vms(&socket).iter().any(|v| v["pid"] == pid)
        });
        wait_for("its vCPU threads boosted", Duration::from_secs(5), || {
            vm.any_fifo()
        });
    } // the VM process is killed here
    wait_for(
        "the VM detached after it exited",
        Duration::from_secs(5),
        || vms(&socket).is_empty(),
    );
    // SAFETY: signalling our own child.
    unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
    assert!(d.wait().unwrap().success());
}

/// Issue 11's first reproduction: a thread merely *named* like a vCPU (here `vcpu0`, a
/// `sleep` run through a symlink of that name) is never boosted: not when a non-root user owns
/// it, not when root does but its process holds no KVM vCPU. The daemon says why, once, in a
/// log without colour escapes.
#[test]
fn a_thread_named_like_a_vcpu_is_not_boosted() {
    let _s = serial();
    let test = "a_thread_named_like_a_vcpu_is_not_boosted";
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        skip!("{test}: needs root to run a process as nobody");
        return;
    }
    let dir = std::env::temp_dir().join(format!("pvsched-fake-vcpu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let fake = dir.join("vcpu0");
    let _ = std::fs::remove_file(&fake);
    std::os::unix::fs::symlink("/bin/sleep", &fake).unwrap();
    use std::os::unix::process::CommandExt;
    /// A child killed and reaped on drop.
    struct Reaped(Child);
    impl Drop for Reaped {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let nobodys = Reaped(
        Command::new(&fake)
            .arg("30")
            .uid(65534)
            .gid(65534)
            .spawn()
            .unwrap(),
    );
    let roots = Reaped(Command::new(&fake).arg("30").spawn().unwrap());
    // A thread of root's named like a QEMU TCG vCPU thread (this test's process: no KVM
    // vCPU here, and no QEMU).
    let (tcg_stop, tcg_rx) = std::sync::mpsc::channel::<()>();
    let tcg = std::thread::Builder::new()
        .name("CPU 0/TCG".into())
        .spawn(move || {
            let _ = tcg_rx.recv();
        })
        .unwrap();
    let tcg_tid = loop {
        if let Some(t) = pvsched_testutil::threads_named("CPU 0/TCG").first() {
            break *t;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let (socket, state) = paths("fake-vcpu");
    let mut cmd = pvsched();
    cmd.args([
        "daemon",
        "--boost-when",
        "always",
        "--watch",
        "--policy",
        "static",
    ])
    .arg("--socket")
    .arg(&socket)
    .arg("--state-file")
    .arg(&state);
    let Some(mut d) = spawn_daemon(test, cmd, &socket) else {
        return;
    };
    // Several watch scans.
    std::thread::sleep(Duration::from_millis(1500));
    let policy = |pid: u32| pvsched_host::sched::get(pid as i32).map(|a| a.policy);
    assert_eq!(policy(nobodys.0.id()).unwrap(), libc::SCHED_OTHER as u32);
    assert_eq!(policy(roots.0.id()).unwrap(), libc::SCHED_OTHER as u32);
    assert_eq!(policy(tcg_tid as u32).unwrap(), libc::SCHED_OTHER as u32);
    let (ok, out) = ctl(&socket, &["status"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        v["vms"].as_array().unwrap().is_empty(),
        "nothing attached: {out}"
    );
    // SAFETY: signalling our own child.
    unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
    assert!(d.wait().unwrap().success());
    let mut err = String::new();
    use std::io::Read;
    d.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(err.contains("not allowed (allow_uids"), "{err}");
    assert!(err.contains("holds no KVM vCPU"), "{err}");
    assert!(
        err.contains(&format!(
            "thread {tcg_tid}: its process {} holds no KVM vCPU",
            std::process::id()
        )),
        "{err}"
    );
    assert!(
        !err.contains('\x1b'),
        "colour escapes in a redirected log: {err:?}"
    );
    drop((nobodys, roots));
    tcg_stop.send(()).unwrap();
    tcg.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 12: a QEMU running TCG (no KVM), given to the daemon by pid right after it started,
/// before it named its vCPU threads: the daemon waits for the names, boosts exactly the
/// `CPU n/TCG` threads (never QEMU's main loop or other threads, which would starve the
/// guest's devices) and restores them when it stops; a QEMU that exits is let go.
#[test]
fn a_tcg_qemu_given_by_pid_before_naming_gets_only_its_vcpu_threads_boosted() {
    let _s = serial();
    let test = "a_tcg_qemu_given_by_pid_before_naming_gets_only_its_vcpu_threads_boosted";
    let (socket, state) = paths("tcg");
    if let Err(e) = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
    {
        skip!("{test}: qemu-system-x86_64: {e}");
        return;
    }
    // The process the daemon is given execs QEMU half a second later: its vCPU threads are
    // named only then, well after the daemon looked first.
    let qemu = VmProc(
        Command::new("sh")
            .args([
                "-c",
                "sleep 0.5; exec qemu-system-x86_64 -accel tcg,thread=multi -smp 2 -m 64 \
                 -nographic -nodefaults -S -name pvsched-tcg-test,debug-threads=on",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = qemu.pid();
    // `pvsched daemon --policy static --pid <pid>` on this test's socket and state file.
    let static_daemon = |extra: &[&str]| {
        let mut cmd = pvsched();
        cmd.args(["daemon", "--policy", "static"])
            .args(extra)
            .args(["--pid", &pid.to_string()])
            .arg("--socket")
            .arg(&socket)
            .arg("--state-file")
            .arg(&state);
        cmd
    };
    // No cap: both vCPU threads (the default cap boosts one at a time on 2 CPUs).
    let cmd = static_daemon(&["--host-events", "waking", "--max-boosted", "off"]);
    let Some(mut d) = spawn_daemon(test, cmd, &socket) else {
        return;
    };
    let threads = || -> Vec<(String, u32)> {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let tid: i32 = e.file_name().to_string_lossy().parse().ok()?;
                let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
                let policy = pvsched_host::sched::get(tid).ok()?.policy;
                Some((comm.trim().to_string(), policy))
            })
            .collect()
    };
    let fifo = libc::SCHED_FIFO as u32;
    wait_for(
        "both CPU n/TCG threads at SCHED_FIFO",
        Duration::from_secs(15),
        || {
            threads()
                .iter()
                .filter(|(n, p)| n.ends_with("/TCG") && *p == fifo)
                .count()
                == 2
        },
    );
    for (name, policy) in threads() {
        assert_eq!(
            policy == fifo,
            name.ends_with("/TCG"),
            "{name}: policy {policy}"
        );
    }
    let (ok, out) = ctl(&socket, &["status"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["vms"][0]["vcpus"].as_array().unwrap().len(), 2, "{out}");
    // SIGTERM: restored.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
    assert!(d.wait().unwrap().success());
    assert!(
        threads()
            .iter()
            .all(|(_, p)| *p == libc::SCHED_OTHER as u32),
        "restored on SIGTERM: {:?}",
        threads()
    );
    let mut err = String::new();
    use std::io::Read;
    d.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(err.contains("no vCPU threads named yet: waiting"), "{err}");
    assert!(err.contains("vCPU threads named"), "{err}");

    // A daemon attached to a QEMU that exits lets it go and goes on.
    let cmd = static_daemon(&["--host-events", "none"]);
    let Some(mut d) = spawn_daemon(test, cmd, &socket) else {
        return;
    };
    wait_for("attached again", Duration::from_secs(15), || {
        threads().iter().any(|(_, p)| *p == fifo)
    });
    drop(qemu);
    wait_for("the QEMU let go", Duration::from_secs(10), || {
        let (ok, out) = ctl(&socket, &["status"]);
        ok && serde_json::from_str::<serde_json::Value>(&out).unwrap()["vms"]
            .as_array()
            .unwrap()
            .is_empty()
    });
    // SAFETY: signalling our own child.
    unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
    assert!(d.wait().unwrap().success());
}

/// SIGHUP and SIGQUIT end the daemon like SIGTERM: every thread restored; and a second daemon
/// on the same state file is refused (it would "recover" the first one's threads).
#[test]
fn hangup_restores_and_one_daemon_per_state_file() {
    let _s = serial();
    let test = "hangup_restores_and_one_daemon_per_state_file";
    if !kvm_or_skip(test) {
        return;
    }
    for sig in [libc::SIGHUP, libc::SIGQUIT] {
        let vm = VmProc::start();
        let (socket, state) = paths(&format!("hup{sig}"));
        let static_daemon = |socket: &Path| {
            let mut cmd = pvsched();
            cmd.args(["daemon", "--policy", "static", "--pid"])
                .arg(vm.pid().to_string())
                .arg("--socket")
                .arg(socket)
                .arg("--state-file")
                .arg(&state);
            cmd
        };
        let Some(mut d) = spawn_daemon(test, static_daemon(&socket), &socket) else {
            return;
        };
        wait_for("static boost", Duration::from_secs(5), || vm.any_fifo());
        if sig == libc::SIGHUP {
            let second = static_daemon(&socket.with_extension("2")).output().unwrap();
            assert!(!second.status.success());
            let err = String::from_utf8_lossy(&second.stderr);
            assert!(
                err.contains("another pvsched daemon uses the state file"),
                "{err}"
            );
            assert!(vm.any_fifo(), "the first daemon's boosts are left alone");
        }
        // SAFETY: signalling our own child.
        unsafe { libc::kill(d.id() as i32, sig) };
        assert!(d.wait().unwrap().success(), "signal {sig}: clean exit");
        assert!(vm.all_other(), "signal {sig}: every vCPU thread restored");
    }
}

/// Issue 11's second reproduction: under umask 000 the ctl socket is still 0600, and
/// `nobody`'s `pvsched ctl disable` is refused with a clear message; boosting stays on.
#[test]
fn only_root_steers_the_daemon() {
    let _s = serial();
    let test = "only_root_steers_the_daemon";
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        skip!("{test}: needs root to run a client as nobody");
        return;
    }
    let (socket, state) = paths("steer");
    let mut cmd = pvsched();
    cmd.args(["daemon", "--watch", "--socket"])
        .arg(&socket)
        .arg("--state-file")
        .arg(&state);
    use std::os::unix::process::CommandExt;
    // SAFETY: umask is async-signal-safe; it only sets the child's file-creation mask.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let Some(mut d) = spawn_daemon(test, cmd, &socket) else {
        return;
    };
    use std::os::unix::fs::MetadataExt;
    let mode = std::fs::metadata(&socket).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o} under umask 000");
    let out = pvsched()
        .args(["ctl", "--socket"])
        .arg(&socket)
        .arg("disable")
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "nobody's disable went through");
    assert!(err.contains("Permission denied"), "{err}");
    let (ok, status) = ctl(&socket, &["status"]);
    assert!(ok, "{status}");
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(v["enabled"], true, "boosting still on: {status}");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
    assert!(d.wait().unwrap().success());
}

#[test]
fn daemon_reads_the_protocol_from_a_vmm_memory_file() {
    let _s = serial();
    let test = "daemon_reads_the_protocol_from_a_vmm_memory_file";
    if !kvm_or_skip(test) {
        return;
    }
    let (socket, state) = paths("slots");
    let memory = socket.with_file_name("guest.mem");
    // The VMM keeps guest RAM in a file and offers the protocol; its own policy is `none`.
    let vm = VmProc::start_with(&["--memory-file".as_ref(), memory.as_os_str()]);
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&memory).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "guest RAM is its owner's only: {mode:o}");
    }
    // The testbed guest's slots: 0x800 into each vCPU's 64 KiB region at 0x200000.
    let rest = format!(
        "host_events = []\nboost_when = \"always\"\n[policy]\ndriver = \"dynamic\"\n\
         [[vm]]\npid = {}\nguest_memory = {:?}\nslots = [0x200800, 0x210800]\n",
        vm.pid(),
        memory.display().to_string()
    );
    let Some(mut d) = start_configured(test, &socket, &state, &rest) else {
        return;
    };
    // Only the guests' requests (read from the file) can make it boost: no tracepoints.
    wait_for(
        "a boost from a guest request",
        Duration::from_secs(5),
        || vm.any_fifo(),
    );
    let (ok, out) = ctl(&socket, &["status"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["vms"][0]["protocol"], true);
    assert_eq!(v["host_events"], 0, "no tracepoints in use");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
    assert!(d.wait().unwrap().success());
    assert!(vm.all_other(), "restored on SIGTERM");
    let _ = std::fs::remove_file(&memory);
}

/// Issue 13: the daemon speaks the v3 page of a VMM's memory file: pages negotiated at
/// attach, the guest's task intent applied (its deadline task's FIFO, its busy loop's
/// `batch:10` as a nice-10 deboost) with tracepoints off, and everything restored on SIGTERM.
#[test]
fn daemon_reads_v3_pages_from_a_vmm_memory_file_and_deboosts() {
    let _s = serial();
    let test = "daemon_reads_v3_pages_from_a_vmm_memory_file_and_deboosts";
    if !kvm_or_skip(test) {
        return;
    }
    let (socket, state) = paths("v3pages");
    let memory = socket.with_file_name("guest-v3.mem");
    let vm = VmProc::start_with(&[
        "--memory-file".as_ref(),
        memory.as_os_str(),
        "--pv".as_ref(),
        "v3".as_ref(),
        "--v3-busy".as_ref(),
        "batch:10".as_ref(),
    ]);
    // The testbed guest's v3 pages: 0x9000 into each vCPU's 64 KiB region at 0x200000.
    let rest = format!(
        "host_events = []\nboost_when = \"always\"\n[policy]\ndriver = \"v3-default\"\n\
         [[vm]]\npid = {}\nguest_memory = {:?}\nprotocol = \"v3\"\n\
         slots = [0x209000, 0x219000]\n",
        vm.pid(),
        memory.display().to_string()
    );
    let Some(mut d) = start_configured(test, &socket, &state, &rest) else {
        return;
    };
    // SAFETY: getpriority on a thread id; errno is not consulted (a gone thread reads -1).
    let nice = |tid: i32| unsafe { libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t) };
    wait_for(
        "a FIFO boost from the guest's task intent",
        Duration::from_secs(5),
        || vm.any_fifo(),
    );
    wait_for(
        "a nice-10 deboost for the guest's batch loop",
        Duration::from_secs(5),
        || vm.vcpu_tids().into_iter().any(|t| nice(t) == 10),
    );
    let (ok, out) = ctl(&socket, &["status"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["vms"][0]["protocol"], true);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
    assert!(d.wait().unwrap().success());
    assert!(vm.all_other(), "restored on SIGTERM");
    assert!(
        vm.vcpu_tids().into_iter().all(|t| nice(t) == 0),
        "nice restored on SIGTERM"
    );
    let _ = std::fs::remove_file(&memory);
}

#[test]
fn a_truncated_memory_file_detaches_its_vm_and_the_daemon_goes_on() {
    use pvsched_proto::abi::{off, Reason};
    use std::os::unix::fs::FileExt;
    let _s = serial();
    let test = "a_truncated_memory_file_detaches_its_vm_and_the_daemon_goes_on";
    if !kvm_or_skip(test) {
        return;
    }
    let (socket, state) = paths("truncated");
    // The VM's slots as the daemon sees them: a file the test writes as the "guest" would.
    let memory = socket.with_file_name("slots.mem");
    let file = std::fs::File::create(&memory).unwrap();
    file.set_len(0x3000).unwrap();
    let vm = VmProc::start();
    let rest = format!(
        "host_events = []\nboost_when = \"always\"\n\
         [policy]\ndriver = \"dynamic\"\noptions = {{ rt_budget = \"10s\", class_task = \"fifo:10\" }}\n\
         [[vm]]\npid = {}\nguest_memory = {:?}\nslots = [0x1000, 0x2000]\n",
        vm.pid(),
        memory.display().to_string()
    );
    let Some(mut d) = start_configured(test, &socket, &state, &rest) else {
        return;
    };
    // vCPU 0's guest asks for a boost for its RT task.
    let put = |at: usize, v: u32| {
        file.write_all_at(&v.to_le_bytes(), 0x1000 + at as u64)
            .unwrap()
    };
    put(off::REQUEST, Reason::RtTask.bit());
    put(off::SEQ, 1);
    wait_for("a boost from the file", Duration::from_secs(5), || {
        vm.any_fifo()
    });
    // Someone cuts the file short under the daemon's mapping.
    file.set_len(0).unwrap();
    wait_for("the VM detached", Duration::from_secs(5), || {
        let (ok, out) = ctl(&socket, &["status"]);
        assert!(ok, "{out}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["vms"].as_array().map(Vec::len) == Some(0)
    });
    assert!(vm.all_other(), "restored: {:?}", vm.policies());
    assert!(d.try_wait().unwrap().is_none(), "the daemon goes on");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
    let out = d.wait_with_output().unwrap();
    assert!(out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("truncated"), "{log}");
    let _ = std::fs::remove_file(&memory);
}

#[test]
fn a_thread_listed_twice_is_attached_once_and_restored() {
    let _s = serial();
    let test = "a_thread_listed_twice_is_attached_once_and_restored";
    if !kvm_or_skip(test) {
        return;
    }
    let vm = VmProc::start();
    let (socket, state) = paths("duplicate");
    let tid = vm.vcpu_tids()[0];
    // The same vCPU thread through two VMs: its process, and its tid.
    let rest = format!(
        "host_events = []\nmax_boosted = \"off\"\n[policy]\ndriver = \"static\"\n\
         [[vm]]\npid = {}\n[[vm]]\ntids = [{tid}]\n",
        vm.pid(),
    );
    let Some(d) = start_configured(test, &socket, &state, &rest) else {
        return;
    };
    wait_for("both vCPUs boosted", Duration::from_secs(5), || {
        vm.policies().iter().all(|&p| p == libc::SCHED_FIFO)
    });
    let (ok, out) = ctl(&socket, &["status"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let attached: usize = v["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|vm| vm["vcpus"].as_array().map_or(0, Vec::len))
        .sum();
    assert_eq!(attached, 2, "each thread once: {v}");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
    let out = d.wait_with_output().unwrap();
    assert!(out.status.success());
    // A second guard would have recorded FIFO as the thread's "original" and put it back.
    assert!(vm.all_other(), "restored: {:?}", vm.policies());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("attached already"), "{log}");
}

#[test]
fn the_cap_keeps_boosts_to_max_boosted() {
    let _s = serial();
    let test = "the_cap_keeps_boosts_to_max_boosted";
    if !kvm_or_skip(test) {
        return;
    }
    let vm = VmProc::start();
    let (socket, state) = paths("cap");
    let mut cmd = pvsched();
    cmd.args([
        "daemon",
        "--policy",
        "static",
        "--max-boosted",
        "1",
        "--host-events",
        "none",
        "--pid",
        &vm.pid().to_string(),
    ])
    .arg("--socket")
    .arg(&socket)
    .arg("--state-file")
    .arg(&state);
    let Some(d) = spawn_daemon(test, cmd, &socket) else {
        return;
    };
    let fifo = || {
        vm.policies()
            .iter()
            .filter(|&&p| p == libc::SCHED_FIFO)
            .count()
    };
    wait_for("a boost", Duration::from_secs(5), || fifo() == 1);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(fifo(), 1, "static, yet only one vCPU at a time");
    let (ok, out) = ctl(&socket, &["status"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let capped: u64 = v["vms"][0]["vcpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["capped"].as_u64().unwrap())
        .sum();
    assert_eq!(capped, 1, "{v}");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
    assert!(d.wait_with_output().unwrap().status.success());
    assert!(vm.all_other(), "restored: {:?}", vm.policies());
}
