//! A QEMU VM (TCG: this host's KVM cannot boot one) is discovered through QMP with the right
//! vCPU thread ids. Skips, saying why, where qemu-system-x86_64 is missing.

use pvsched_daemon::qmp::query_cpus;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn qemu_vcpu_threads_come_from_query_cpus_fast() {
    let dir = std::env::temp_dir().join(format!("pvsched-qmp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("qmp.sock");
    let spawned = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-smp",
            "2",
            "-m",
            "64",
            "-nographic",
            "-nodefaults",
            "-S",
        ])
        .args(["-name", "pvsched-test,debug-threads=on"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let mut qemu = match spawned {
        Ok(c) => c,
        Err(e) => {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED qemu_vcpu_threads_come_from_query_cpus_fast: qemu-system-x86_64: {e}"
            );
            return;
        }
    };
    let t0 = Instant::now();
    let cpus = loop {
        match query_cpus(&sock) {
            Ok(c) => break c,
            Err(e) => {
                assert!(
                    t0.elapsed() < Duration::from_secs(20),
                    "QMP never answered: {e}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    let pid = qemu.id();
    let names: Vec<String> = cpus
        .iter()
        .map(|c| {
            std::fs::read_to_string(format!("/proc/{pid}/task/{}/comm", c.tid))
                .unwrap_or_default()
                .trim()
                .to_string()
        })
        .collect();
    let _ = qemu.kill();
    let _ = qemu.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(cpus.len(), 2);
    for (c, name) in cpus.iter().zip(&names) {
        // Each thread id is a thread of this QEMU, the one named for that vCPU.
        assert_eq!(
            name,
            &format!("CPU {}/TCG", c.index),
            "thread {} of cpu {}",
            c.tid,
            c.index
        );
    }
}

/// Runs `f` on a thread and gives its result, or fails the test if it has not returned after
/// a generous bound (the daemon's control plane would be stuck for that long).
fn returns<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("{what}: the QMP query did not return"))
}

fn temp_sock(name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("pvsched-qmp-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("qmp.sock");
    (dir, sock)
}

#[test]
fn a_qmp_listener_that_never_accepts_is_an_error_not_a_hang() {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketType};
    let (dir, sock) = temp_sock("backlog");
    // A listener with no backlog that never accepts: the first connection waits in its
    // queue (its greeting never comes), every later one finds the queue full.
    let fd = rustix::net::socket(AddressFamily::UNIX, SocketType::STREAM, None).unwrap();
    rustix::net::bind(&fd, &SocketAddrUnix::new(&sock).unwrap()).unwrap();
    rustix::net::listen(&fd, 0).unwrap();
    for i in 0..3 {
        let path = sock.clone();
        let r = returns("a listener that never accepts", move || {
            pvsched_daemon::qmp::query_cpus_within(&path, Duration::from_millis(200))
        });
        assert!(r.is_err(), "query {i}: {r:?}");
    }
    drop(fd);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_qmp_peer_trickling_bytes_is_cut_off_at_the_deadline() {
    use std::io::Write;
    let (dir, sock) = temp_sock("trickle");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let peer = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        // A greeting that never ends: one byte every 20 ms, each within any per-read
        // timeout, until the daemon hangs up.
        let _ = s.write_all(b"{\"QMP\": {");
        while s.write_all(b" ").is_ok() {
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let path = sock.clone();
    let r = returns("a trickling peer", move || {
        pvsched_daemon::qmp::query_cpus_within(&path, Duration::from_millis(300))
    });
    let e = r.expect_err("no answer came");
    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
    peer.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
