//! Finding a VM's vCPU threads by the names VMMs give them.

use std::io;

/// The VMM a vCPU thread name belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Vmm {
    /// QEMU with KVM: `CPU <n>/KVM`.
    Qemu,
    /// QEMU with TCG (no KVM: the guest's code is translated): `CPU <n>/TCG` per vCPU, or one
    /// `ALL CPUs/TCG` thread running every vCPU in turn (`-accel tcg,thread=single`: index 0).
    QemuTcg,
    /// crosvm: `crosvm_vcpu<n>`.
    Crosvm,
    /// cloud-hypervisor: `vcpu<n>`.
    CloudHypervisor,
    /// Firecracker: `fc_vcpu <n>`.
    Firecracker,
    /// pvsched's own testbed: `pvsched-vcpu<n>` (also: threads given by id).
    Pvsched,
}

/// A vCPU thread of a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct VcpuThread {
    /// vCPU index, from the thread name.
    pub index: u32,
    /// Kernel thread id.
    pub tid: i32,
    /// The VMM that named it.
    pub vmm: Vmm,
}

/// Parses a thread name (`comm`, at most 15 characters) as a vCPU thread name.
pub fn parse_vcpu_name(comm: &str) -> Option<(Vmm, u32)> {
    let comm = comm.trim_end_matches('\n');
    if comm == "ALL CPUs/TCG" {
        return Some((Vmm::QemuTcg, 0));
    }
    let num = |s: &str| -> Option<u32> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    if let Some(rest) = comm.strip_prefix("CPU ") {
        if let Some(n) = rest.strip_suffix("/KVM") {
            return num(n).map(|n| (Vmm::Qemu, n));
        }
        let n = rest.strip_suffix("/TCG")?;
        return num(n).map(|n| (Vmm::QemuTcg, n));
    }
    for (prefix, vmm) in [
        ("crosvm_vcpu", Vmm::Crosvm),
        ("pvsched-vcpu", Vmm::Pvsched),
        ("fc_vcpu ", Vmm::Firecracker),
        ("vcpu", Vmm::CloudHypervisor),
    ] {
        if let Some(n) = comm.strip_prefix(prefix) {
            return num(n).map(|n| (vmm, n));
        }
    }
    None
}

/// The vCPU threads of process `pid`, by vCPU index.
pub fn vcpu_threads(pid: i32) -> io::Result<Vec<VcpuThread>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
        let Ok(tid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // A thread can exit between the listing and the read: skip it.
        let Ok(comm) = std::fs::read_to_string(e.path().join("comm")) else {
            continue;
        };
        if let Some((vmm, index)) = parse_vcpu_name(&comm) {
            out.push(VcpuThread { index, tid, vmm });
        }
    }
    out.sort_by_key(|t| t.index);
    Ok(out)
}

/// How long ago process `pid` started, if it is alive (not a zombie): from `/proc/<pid>/stat`
/// (state, field 3; start time in clock ticks since boot, field 22) and `/proc/uptime`.
pub fn live_age(pid: i32) -> Option<std::time::Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    if matches!(pvsched_host::sched::stat_field(&stat, 3)?, "Z" | "X" | "x") {
        return None;
    }
    let start = pvsched_host::sched::start_time(pid)?;
    // SAFETY: sysconf has no memory effects.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).ok()?;
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let started = start as f64 / hz.max(1) as f64;
    Some(std::time::Duration::from_secs_f64(
        (uptime - started).max(0.0),
    ))
}

/// Who may have vCPU threads boosted: the owner (effective uid) or group of the process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allowed {
    /// Owners whose VMs may be boosted (default: root only).
    pub uids: Vec<u32>,
    /// Groups whose VMs may be boosted (e.g. libvirt's `qemu` group).
    pub gids: Vec<u32>,
}

impl Default for Allowed {
    fn default() -> Self {
        Allowed {
            uids: vec![0],
            gids: Vec::new(),
        }
    }
}

/// Why a thread is not boosted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The thread exited (or never existed).
    #[error("thread {0} is gone")]
    Gone(i32),
    /// Its process holds no KVM vCPU (and is no QEMU for a TCG thread): a thread merely named
    /// like one.
    #[error("thread {tid}: its process {pid} holds no KVM vCPU (anon_inode:kvm-vcpu) and is no QEMU running TCG (executable qemu-system-*), so it is no vCPU thread")]
    NotKvm {
        /// The thread.
        tid: i32,
        /// Its process.
        pid: i32,
    },
    /// Its process's owner is not allowed by the configuration.
    #[error("thread {tid}: its process {pid} belongs to uid {uid} gid {gid}, not allowed (allow_uids / allow_gids)")]
    Owner {
        /// The thread.
        tid: i32,
        /// Its process.
        pid: i32,
        /// Effective uid of the process.
        uid: u32,
        /// Effective gid of the process.
        gid: u32,
    },
}

/// The process (thread group id) thread `tid` belongs to.
pub fn process_of(tid: i32) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))?
        .trim()
        .parse()
        .ok()
}

/// True when process `pid` holds a KVM vCPU file descriptor.
pub fn holds_kvm_vcpu(pid: i32) -> bool {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    dir.flatten().any(|e| {
        std::fs::read_link(e.path())
            .is_ok_and(|t| t.to_string_lossy().starts_with("anon_inode:kvm-vcpu"))
    })
}

/// True when process `pid` runs a QEMU system emulator: its executable is named
/// `qemu-system-*`, owned by root and writable by no one else (a user's own copy of any
/// program under that name does not count). The evidence for a TCG vCPU thread, which holds
/// no KVM file.
pub fn is_qemu(pid: i32) -> bool {
    use std::os::unix::fs::MetadataExt;
    let named = std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| {
        p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("qemu-system-"))
    });
    // The metadata of the file the process runs, through /proc (also if it was replaced).
    named
        && std::fs::metadata(format!("/proc/{pid}/exe"))
            .is_ok_and(|m| m.uid() == 0 && m.mode() & 0o022 == 0)
}

/// Effective uid and gid of process `pid` (the owner of `/proc/<pid>`).
pub fn owner(pid: i32) -> Option<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(format!("/proc/{pid}")).ok()?;
    Some((m.uid(), m.gid()))
}

/// Checks that `tid` is a thread of a process that holds a KVM vCPU (or, for a QEMU vCPU
/// thread, of a QEMU running TCG) and that `allowed` admits that process's owner: only then
/// may the daemon boost it. The name is weaker evidence under TCG (any program can be called
/// `qemu-system-*`): the owner check is what protects the host there.
pub fn check_vcpu_thread(tid: i32, vmm: Vmm, allowed: &Allowed) -> Result<(), Refusal> {
    let pid = process_of(tid).ok_or(Refusal::Gone(tid))?;
    let (uid, gid) = owner(pid).ok_or(Refusal::Gone(tid))?;
    if !allowed.uids.contains(&uid) && !allowed.gids.contains(&gid) {
        return Err(Refusal::Owner { tid, pid, uid, gid });
    }
    let tcg = matches!(vmm, Vmm::Qemu | Vmm::QemuTcg) && is_qemu(pid);
    if !holds_kvm_vcpu(pid) && !tcg {
        return Err(Refusal::NotKvm { tid, pid });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_without_kvm_is_refused_and_owners_are_checked() {
        // SAFETY: gettid has no arguments and cannot fail.
        let me = unsafe { libc::gettid() };
        assert_eq!(process_of(me), Some(std::process::id() as i32));
        let (uid, gid) = owner(std::process::id() as i32).unwrap();
        let allowed = Allowed {
            uids: vec![uid],
            gids: Vec::new(),
        };
        // This test process holds no vCPU (unless another test of this binary made one:
        // then the check passes, which is right).
        assert!(!is_qemu(std::process::id() as i32));
        match check_vcpu_thread(me, Vmm::QemuTcg, &allowed) {
            Ok(()) => assert!(holds_kvm_vcpu(std::process::id() as i32)),
            Err(e) => assert!(matches!(e, Refusal::NotKvm { .. }), "{e}"),
        }
        let nobody = Allowed {
            uids: vec![uid.wrapping_add(1)],
            gids: vec![gid.wrapping_add(1)],
        };
        assert!(matches!(
            check_vcpu_thread(me, Vmm::Crosvm, &nobody),
            Err(Refusal::Owner { .. })
        ));
        assert_eq!(
            check_vcpu_thread(-5, Vmm::Qemu, &allowed),
            Err(Refusal::Gone(-5))
        );
    }

    #[test]
    fn the_age_of_live_processes_only() {
        let me = live_age(std::process::id() as i32).expect("this process is alive");
        assert!(me < std::time::Duration::from_secs(3600), "{me:?}");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        // Exited but not reaped: a zombie, which names no threads any more.
        let t0 = std::time::Instant::now();
        while live_age(pid).is_some() {
            assert!(t0.elapsed().as_secs() < 10, "true never exited");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        child.wait().unwrap();
        assert_eq!(live_age(pid), None);
        assert_eq!(live_age(-5), None);
    }

    #[test]
    fn vmm_thread_names() {
        assert_eq!(parse_vcpu_name("CPU 3/KVM\n"), Some((Vmm::Qemu, 3)));
        assert_eq!(parse_vcpu_name("CPU 1/TCG"), Some((Vmm::QemuTcg, 1)));
        assert_eq!(parse_vcpu_name("ALL CPUs/TCG"), Some((Vmm::QemuTcg, 0)));
        assert_eq!(parse_vcpu_name("crosvm_vcpu12"), Some((Vmm::Crosvm, 12)));
        assert_eq!(parse_vcpu_name("vcpu0"), Some((Vmm::CloudHypervisor, 0)));
        assert_eq!(parse_vcpu_name("fc_vcpu 1"), Some((Vmm::Firecracker, 1)));
        assert_eq!(parse_vcpu_name("pvsched-vcpu7"), Some((Vmm::Pvsched, 7)));
        for bad in [
            "CPU 1/HVF",
            "CPU x/TCG",
            "ALL CPUs/KVM",
            "vcpu",
            "vcpux",
            "qemu-system-x86",
            "CPU /KVM",
            "fc_vcpu",
            "vcpu-1",
        ] {
            assert_eq!(parse_vcpu_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn threads_of_this_process_are_found_by_name() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::Builder::new()
            .name("crosvm_vcpu5".into())
            .spawn(move || {
                let _ = rx.recv();
            })
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let found = vcpu_threads(std::process::id() as i32).unwrap();
        assert!(
            found.iter().any(|v| v.index == 5 && v.vmm == Vmm::Crosvm),
            "{found:?}"
        );
        assert!(pvsched_host::sched::start_time(found[0].tid).is_some());
        tx.send(()).unwrap();
        t.join().unwrap();
        assert!(vcpu_threads(-5).is_err());
    }
}
