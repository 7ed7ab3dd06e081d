//! Host time for the engine: `CLOCK_MONOTONIC` nanoseconds and an absolute-deadline timerfd.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the callers pass clock ids the kernel knows.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `CLOCK_MONOTONIC`, nanoseconds.
pub fn mono_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// CPU time of the calling thread, nanoseconds.
pub fn thread_cpu_ns() -> u64 {
    clock_ns(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// Converts guest TSC values to host `CLOCK_MONOTONIC` time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TscClock {
    /// Guest TSC − host TSC, cycles.
    pub offset: i64,
    /// TSC frequency, kHz.
    pub khz: u64,
}

impl TscClock {
    /// Host monotonic ns of guest TSC value `guest`, given a host (TSC, monotonic ns) pair
    /// read together now.
    pub fn to_mono(&self, guest: u64, host_tsc_now: u64, mono_now: u64) -> u64 {
        let host = guest.wrapping_sub(self.offset as u64);
        let delta = host.wrapping_sub(host_tsc_now) as i64;
        let ns = (delta as i128 * 1_000_000 / self.khz.max(1) as i128) as i64;
        mono_now.saturating_add_signed(ns)
    }
}

/// Estimates a guest's TSC offset (guest TSC − host TSC) from stamps: guest TSC values read
/// before a host TSC value the host reads later (protocol feature `CLOCK_STAMP`: the guest
/// stamps, then rings; the host reads the stamp after the ring). Each stamp bounds the offset
/// from below (`stamp − host ≤ offset`, the gap being how long the stamp took to reach the
/// host), so the estimate is the largest bound seen, over windows that rotate so that a changed
/// offset (a guest that wrote its TSC) is followed. It errs on the low side, by the quickest
/// stamp's delay: a deadline converted with it looks later than it is by that much.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OffsetEstimate {
    /// The best bound of the current window and of the one before, with its start (host TSC).
    current: Option<i64>,
    previous: Option<i64>,
    window_start: u64,
    /// Stamps seen.
    pub samples: u64,
}

impl OffsetEstimate {
    /// How long a window lasts, in host TSC cycles (~1 s at 2.5 GHz: what a changed offset
    /// takes at most to be followed, from two windows).
    pub const WINDOW_CYCLES: u64 = 2_500_000_000;

    /// Notes a stamp read at host TSC `host`.
    pub fn observe(&mut self, stamp: u64, host: u64) {
        let bound = stamp.wrapping_sub(host) as i64;
        if host.wrapping_sub(self.window_start) > Self::WINDOW_CYCLES || self.samples == 0 {
            self.previous = self.current.take();
            self.window_start = host;
        }
        self.current = Some(self.current.map_or(bound, |b| b.max(bound)));
        self.samples += 1;
    }

    /// The estimate: the best bound of the last two windows.
    pub fn offset(&self) -> Option<i64> {
        match (self.current, self.previous) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }
}

/// The host's TSC.
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no memory effects and is available on every x86-64 CPU.
    unsafe { core::arch::x86_64::_rdtsc() }
}

impl TscClock {
    /// A clock for a guest whose TSC is `offset` cycles ahead of the host's, at the host's
    /// TSC frequency measured against `CLOCK_MONOTONIC` over `window`.
    pub fn measured(offset: i64, window: std::time::Duration) -> TscClock {
        let (t0, m0) = (rdtsc(), mono_ns());
        std::thread::sleep(window);
        let (t1, m1) = (rdtsc(), mono_ns());
        let ns = m1.saturating_sub(m0).max(1);
        TscClock {
            offset,
            khz: (t1.wrapping_sub(t0) as u128 * 1_000_000 / ns as u128) as u64,
        }
    }
}

/// A non-blocking `CLOCK_MONOTONIC` timerfd armed at absolute times: the engine's timers in
/// an epoll set.
pub struct DeadlineTimer(OwnedFd);

impl DeadlineTimer {
    /// A disarmed timer.
    pub fn new() -> std::io::Result<DeadlineTimer> {
        // SAFETY: plain syscall; the fd is checked and owned below.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh fd we own.
        Ok(DeadlineTimer(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Fires at monotonic time `at` (`None`: disarm); clears an expiry not read yet.
    pub fn set(&self, at: Option<u64>) -> std::io::Result<()> {
        let at = at.map_or(0, |t| t.max(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: (at / 1_000_000_000) as libc::time_t,
                tv_nsec: (at % 1_000_000_000) as libc::c_long,
            },
        };
        // SAFETY: `self.0` is an open timerfd and `spec` a valid itimerspec that outlives the
        // call; no old value is asked for (null). The kernel only reads `spec`.
        let r = unsafe {
            libc::timerfd_settime(
                self.0.as_raw_fd(),
                libc::TFD_TIMER_ABSTIME,
                &spec,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl AsRawFd for DeadlineTimer {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timer_fires_at_its_deadline() {
        let t = DeadlineTimer::new().unwrap();
        t.set(Some(mono_ns() + 2_000_000)).unwrap();
        let mut pfd = libc::pollfd {
            fd: t.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd that outlives the call.
        let n = unsafe { libc::poll(&mut pfd, 1, 1000) };
        assert_eq!(n, 1, "readable after the deadline");
        // Setting it again clears the expiry count: no read needed (the engine relies on
        // this), whether it is re-armed for later...
        t.set(Some(mono_ns() + 1_000_000_000)).unwrap();
        // SAFETY: as above.
        let n = unsafe { libc::poll(&mut pfd, 1, 20) };
        assert_eq!(n, 0, "re-armed for later");
        t.set(Some(mono_ns())).unwrap();
        // SAFETY: as above.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 1000) }, 1, "fired again");
        // ...or disarmed.
        t.set(None).unwrap();
        // SAFETY: as above.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 20) }, 0, "disarmed");
    }

    #[test]
    fn the_offset_estimate_is_the_tightest_stamp_and_follows_a_change() {
        const OFF: i64 = -5_000_000;
        let mut e = OffsetEstimate::default();
        assert_eq!(e.offset(), None);
        let guest = |host: u64| host.wrapping_add_signed(OFF);
        // Stamps reaching the host 30, 7 and 400 cycles after they were taken.
        let t0 = 10_000_000_000u64;
        for (i, delay) in [30u64, 7, 400].into_iter().enumerate() {
            let at = t0 + i as u64 * 1000;
            e.observe(guest(at), at + delay);
        }
        assert_eq!(
            e.offset(),
            Some(OFF - 7),
            "the quickest stamp, never above the truth"
        );
        assert_eq!(e.samples, 3);
        // The guest's TSC moves back 1000 cycles: the old bound lasts two windows at most.
        let w = OffsetEstimate::WINDOW_CYCLES;
        let later = |k: u64| t0 + k * (w + 1);
        for k in 1..=3 {
            e.observe(guest(later(k)).wrapping_sub(1000), later(k) + 50);
        }
        assert_eq!(e.offset(), Some(OFF - 1000 - 50));
        // Forward: at once.
        e.observe(guest(later(3) + 10).wrapping_add(5000), later(3) + 12);
        assert_eq!(e.offset(), Some(OFF + 5000 - 2));
    }

    #[test]
    fn tsc_clock_maps_guest_time_to_host_time() {
        let c = TscClock {
            offset: 1000,
            khz: 1_000_000,
        };
        // Guest 6000 = host 5000; host now 4000 at mono 10 µs: 1000 cycles (1 µs) later.
        assert_eq!(c.to_mono(6000, 4000, 10_000), 11_000);
        assert_eq!(c.to_mono(3000, 4000, 10_000), 8_000, "in the past");
        let neg = TscClock {
            offset: -500,
            khz: 1_000_000,
        };
        assert_eq!(neg.to_mono(4000, 4000, 0), 500);
        let m = TscClock::measured(0, std::time::Duration::from_millis(5));
        assert!(m.khz > 100_000, "{m:?}");
    }

    #[test]
    fn monotonic_time_advances() {
        let a = mono_ns();
        std::thread::sleep(std::time::Duration::from_millis(1));
        assert!(mono_ns() > a);
    }
}
