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
