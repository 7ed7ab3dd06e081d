//! Helpers shared by pvsched's integration tests.
//!
//! - [`say!`] and [`skip!`] write straight to stderr, past the test harness's output capture,
//!   so CI logs show every skipped test and its reason;
//! - [`kvm_or_skip`] decides whether a real-KVM test can run here;
//! - [`within`] turns a hang into a failure;
//! - [`serial`] keeps tests that share the machine's CPUs from running at the same time.
#![deny(missing_docs)]

use std::sync::{mpsc, Mutex, MutexGuard};
use std::time::Duration;

/// Prints a line straight to stderr, bypassing the test harness's capture.
#[macro_export]
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

/// Reports a skipped test and why (see [`say!`]).
#[macro_export]
macro_rules! skip {
    ($($t:tt)*) => {
        $crate::say!("SKIPPED {}", format_args!($($t)*))
    };
}

/// Why KVM cannot be used here, or `None` when `/dev/kvm` opens and answers like KVM.
pub fn kvm_unavailable() -> Option<String> {
    match kvm_ioctls::Kvm::new() {
        Err(e) => Some(format!("cannot open /dev/kvm: {e}")),
        Ok(kvm) if kvm.get_api_version() != 12 => {
            Some("/dev/kvm is not a usable KVM device".to_string())
        }
        Ok(_) => None,
    }
}

/// True when KVM is usable; otherwise reports `test` as skipped and returns false.
pub fn kvm_or_skip(test: &str) -> bool {
    match kvm_unavailable() {
        None => true,
        Some(why) => {
            skip!("{test}: {why}");
            false
        }
    }
}

/// A KVM vCPU held by this process, so that its threads pass the daemon's identity check (a
/// thread is boosted only if its process holds a vCPU). Drop to release.
pub struct HeldVcpu {
    _vm: kvm_ioctls::VmFd,
    _vcpu: kvm_ioctls::VcpuFd,
}

/// Creates a VM with one vCPU in this process, or says why it cannot.
pub fn hold_kvm_vcpu() -> Result<HeldVcpu, String> {
    let kvm = kvm_ioctls::Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
    let vcpu = vm
        .create_vcpu(0)
        .map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
    Ok(HeldVcpu {
        _vm: vm,
        _vcpu: vcpu,
    })
}

/// Runs `f` on another thread; fails the test if it takes longer than `limit` (a hang) or
/// panics.
pub fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("did not finish within {limit:?}: hang"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("the test body panicked"),
    }
}

/// Thread ids of this process's threads whose name starts with `prefix` (how a daemon finds
/// vCPU threads), in ascending order.
pub fn threads_named(prefix: &str) -> Vec<i32> {
    let mut tids: Vec<i32> = std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    std::fs::read_to_string(e.path().join("comm"))
                        .is_ok_and(|c| c.starts_with(prefix))
                })
                .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
                .collect()
        })
        .unwrap_or_default();
    tids.sort_unstable();
    tids
}

/// A thread that only waits, so tests can change and inspect its scheduling class; released
/// and joined on drop.
pub struct ParkedThread {
    tid: i32,
    release: Option<mpsc::Sender<()>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl ParkedThread {
    /// Spawns it and waits until its thread id is known.
    pub fn spawn() -> ParkedThread {
        let (tx, rx) = mpsc::channel();
        let (release, wait) = mpsc::channel::<()>();
        let handle = std::thread::spawn(move || {
            // SAFETY: gettid has no arguments and cannot fail.
            let _ = tx.send(unsafe { libc::gettid() });
            let _ = wait.recv();
        });
        let tid = rx.recv().expect("parked thread started");
        ParkedThread {
            tid,
            release: Some(release),
            handle: Some(handle),
        }
    }

    /// Its kernel thread id.
    pub fn tid(&self) -> i32 {
        self.tid
    }
}

impl Drop for ParkedThread {
    fn drop(&mut self) {
        self.release.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

static SERIAL: Mutex<()> = Mutex::new(());

/// Holds the process-wide test lock: tests measuring on the machine's CPUs take it so they do
/// not run at the same time (a failed test does not poison it for the others).
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn within_returns_the_value() {
        assert_eq!(within(Duration::from_secs(5), || 7), 7);
    }

    #[test]
    #[should_panic(expected = "hang")]
    fn within_fails_a_hang() {
        within(Duration::from_millis(10), || {
            std::thread::sleep(Duration::from_secs(1));
        });
    }

    #[test]
    #[should_panic(expected = "panicked")]
    fn within_reports_a_panic() {
        within(Duration::from_secs(5), || panic!("boom"));
    }
}
