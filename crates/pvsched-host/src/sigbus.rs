//! Surviving the truncation of a file shared with another process.
//!
//! The daemon maps a VMM's guest-RAM file to read the guests' slots. If that file is
//! truncated (by the VMM, or by anyone who may write it), touching the mapping past the new
//! end raises `SIGBUS`, which kills the process with every boosted thread left boosted. A
//! [`Guard`] registers a mapped range: a `SIGBUS` inside it replaces the faulting page with a
//! private zero page (so the access completes, reading zeros) and marks the guard
//! [`truncated`](Guard::truncated), for its owner to detach that VM. A `SIGBUS` anywhere else
//! goes on to the previous disposition, as if this module did not exist.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Ranges that can be registered at once.
const MAX_RANGES: usize = 256;

const FREE: u8 = 0;
const BUSY: u8 = 1;
const ACTIVE: u8 = 2;

struct Range {
    state: AtomicU8,
    start: AtomicUsize,
    end: AtomicUsize,
    hit: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const RANGE: Range = Range {
    state: AtomicU8::new(FREE),
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    hit: AtomicBool::new(false),
};

static RANGES: [Range; MAX_RANGES] = [RANGE; MAX_RANGES];
/// The disposition before ours, and the page size, set once.
static PREVIOUS: OnceLock<(libc::sigaction, usize)> = OnceLock::new();

/// Errors registering a range.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The handler could not be installed.
    #[error("cannot install the SIGBUS handler")]
    Install(#[source] std::io::Error),
    /// Every slot of the registry is in use.
    #[error("more than {MAX_RANGES} shared mappings")]
    Full,
}

/// A registered range; unregistered on drop (drop it before the mapping is unmapped).
#[derive(Debug)]
pub struct Guard {
    index: usize,
}

impl Guard {
    /// Registers `len` bytes at `start`, a shared file mapping this process owns.
    pub fn register(start: *const u8, len: usize) -> Result<Guard, Error> {
        install()?;
        for (index, r) in RANGES.iter().enumerate() {
            if r.state
                .compare_exchange(FREE, BUSY, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                r.start.store(start as usize, Ordering::Relaxed);
                r.end
                    .store((start as usize).saturating_add(len), Ordering::Relaxed);
                r.hit.store(false, Ordering::Relaxed);
                r.state.store(ACTIVE, Ordering::Release);
                return Ok(Guard { index });
            }
        }
        Err(Error::Full)
    }

    /// True once an access to the range found the file shorter than the mapping (pages past
    /// the end now read as zeros in this process only).
    pub fn truncated(&self) -> bool {
        RANGES[self.index].hit.load(Ordering::Acquire)
    }

    /// A copy of this guard's truncation flag, to be read without the guard (no lock around
    /// it). It names this guard's range only while the guard lives: whoever reads it must
    /// keep the guard's owner alive.
    pub fn flag(&self) -> TruncationFlag {
        TruncationFlag { index: self.index }
    }
}

/// A [`Guard`]'s truncation flag (see [`Guard::flag`]).
#[derive(Clone, Copy, Debug)]
pub struct TruncationFlag {
    index: usize,
}

impl TruncationFlag {
    /// True once an access faulted past the end of the file (see [`Guard::truncated`]).
    pub fn truncated(&self) -> bool {
        RANGES[self.index].hit.load(Ordering::Acquire)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let r = &RANGES[self.index];
        r.state.store(BUSY, Ordering::Release);
        r.state.store(FREE, Ordering::Release);
    }
}

fn install() -> Result<(), Error> {
    if PREVIOUS.get().is_some() {
        return Ok(());
    }
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _l = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    if PREVIOUS.get().is_some() {
        return Ok(());
    }
    // SAFETY: sysconf has no memory arguments.
    let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        p if p > 0 => p as usize,
        _ => 4096,
    };
    // SAFETY: an all-zero sigaction is a valid value of the C struct (no handler, empty mask).
    let mut new: libc::sigaction = unsafe { std::mem::zeroed() };
    new.sa_sigaction = on_sigbus as *const () as usize;
    new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
    // SAFETY: as above.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: `new` and `old` are valid sigaction structs; sigaction reads the first and
    // writes the second; the handler is an `extern "C"` function with the SA_SIGINFO
    // signature that lives as long as the process.
    if unsafe { libc::sigaction(libc::SIGBUS, &new, &mut old) } != 0 {
        return Err(Error::Install(std::io::Error::last_os_error()));
    }
    let _ = PREVIOUS.set((old, page));
    Ok(())
}

/// The handler. Async-signal-safe: atomics and `mmap`/`sigaction` (plain system calls on
/// Linux).
extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler; for SIGBUS its
    // fault address is set.
    let addr = unsafe { (*info).si_addr() } as usize;
    let Some(&(previous, page)) = PREVIOUS.get() else {
        return;
    };
    for r in &RANGES {
        if r.state.load(Ordering::Acquire) != ACTIVE {
            continue;
        }
        let (start, end) = (
            r.start.load(Ordering::Relaxed),
            r.end.load(Ordering::Relaxed),
        );
        if addr < start || addr >= end {
            continue;
        }
        r.hit.store(true, Ordering::Release);
        let base = addr & !(page - 1);
        // SAFETY: `base` is the page of a fault inside a mapping this process registered
        // (and unmaps only after unregistering it); replacing that page with a private
        // anonymous one (MAP_FIXED) changes no other memory, and the faulting access then
        // completes reading zeros.
        let p = unsafe {
            libc::mmap(
                base as *mut libc::c_void,
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            return;
        }
        break;
    }
    // Not ours (or the page could not be replaced): what would have happened without us.
    let handler = previous.sa_sigaction;
    if handler == libc::SIG_IGN {
        return;
    }
    if handler == libc::SIG_DFL {
        // SAFETY: restores the default action with a valid, zeroed sigaction; returning then
        // re-executes the faulting access, which the default action ends.
        unsafe {
            let mut dfl: libc::sigaction = std::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut());
        }
        return;
    }
    if previous.sa_flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the previous handler was installed with SA_SIGINFO, so it has this
        // signature; it gets the arguments the kernel gave us.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute(handler) };
        f(sig, info, ctx);
    } else {
        // SAFETY: a handler installed without SA_SIGINFO takes only the signal number.
        let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(handler) };
        f(sig);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn mapped(len: usize) -> (std::fs::File, *mut u8, std::path::PathBuf) {
        let path =
            std::env::temp_dir().join(format!("pvsched-sigbus-{}-{len}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.set_len(len as u64).unwrap();
        // SAFETY: a fresh shared mapping of a file this test owns; unmapped at the end.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        (f, p.cast(), path)
    }

    #[test]
    fn a_truncated_mapping_reads_zeros_and_is_reported() {
        let len = 4 * 4096;
        let (f, p, path) = mapped(len);
        // SAFETY: inside the mapping.
        unsafe { p.add(3 * 4096).write_volatile(7) };
        let g = Guard::register(p, len).unwrap();
        assert!(!g.truncated());
        // SAFETY: inside the mapping; the file still covers it.
        assert_eq!(unsafe { p.add(3 * 4096).read_volatile() }, 7);
        f.set_len(4096).unwrap();
        // Past the new end: without the guard, this read kills the test with SIGBUS.
        // SAFETY: inside the mapping (the guard makes the access complete).
        assert_eq!(unsafe { p.add(3 * 4096).read_volatile() }, 0);
        assert!(g.truncated());
        // SAFETY: as above; the replaced page is private and writable.
        unsafe { p.add(2 * 4096 + 8).write_volatile(1) };
        // The page still inside the file is the file's.
        // SAFETY: inside the mapping and the file.
        assert_eq!(unsafe { p.read_volatile() }, 0);
        drop(g);
        // SAFETY: unmapping the mapping made above.
        unsafe { libc::munmap(p.cast(), len) };
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn guards_are_reused() {
        let x = 0u8;
        for _ in 0..(MAX_RANGES * 2) {
            let g = Guard::register(&x, 1).unwrap();
            assert!(!g.truncated());
        }
    }
}
