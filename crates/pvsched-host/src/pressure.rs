//! Does a vCPU wait for a CPU? A vCPU thread that, while unboosted, is runnable but not running
//! for a noticeable share of the time (its `run_delay` in `/proc/<tid>/schedstat`) competes
//! with other threads, and a boost can help it; one that never waits gains nothing from a
//! boost, which then only costs system calls. The runtime samples each vCPU thread once per
//! window and tells the policy when a vCPU is quiet (measured on the development machine:
//! busy vCPUs on an idle host wait 0–5 % of the time, next to one hog per CPU ~53 %).
//! Host-wide CPU pressure (`/proc/pressure/cpu`) was tried first and does not separate the
//! two: host threads waiting behind busy vCPUs keep it at ~20 % on an otherwise idle host.

use crate::clock::mono_ns;
use pvsched_policy::Nanos;
use std::fs::File;
use std::os::unix::fs::FileExt;

/// The quiet gate's settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuietGate {
    /// The host is quiet while tasks waited for a CPU less than this share of the time,
    /// in thousandths (`some` CPU pressure).
    pub threshold_permille: u32,
    /// Length of one sampling window, ns.
    pub window: Nanos,
    /// Windows in a row below the threshold before the host counts as quiet (contention is
    /// believed at once).
    pub quiet_after: u32,
}

impl Default for QuietGate {
    /// Quiet after 4 windows of 25 ms in which the vCPU, while unboosted, waited less than
    /// 20 % of the time; contended at the first window at or above.
    fn default() -> Self {
        QuietGate {
            threshold_permille: 200,
            window: 25_000_000,
            quiet_after: 4,
        }
    }
}

/// Reads the run delay (ns runnable but waiting) of `/proc/<tid>/schedstat`
/// (`<ran ns> <waited ns> <timeslices>`).
pub fn parse_run_delay(text: &str) -> Option<u64> {
    text.split_whitespace().nth(1)?.parse().ok()
}

/// The verdict over successive windows (pure).
#[derive(Clone, Copy, Debug)]
pub struct Verdict {
    gate: QuietGate,
    below: u32,
    quiet: bool,
}

impl Verdict {
    /// Not quiet until shown otherwise.
    pub fn new(gate: QuietGate) -> Self {
        Verdict {
            gate,
            below: 0,
            quiet: false,
        }
    }

    /// Folds one window's pressure (thousandths) in; returns the verdict.
    pub fn window(&mut self, permille: u64) -> bool {
        if permille >= u64::from(self.gate.threshold_permille) {
            self.below = 0;
            self.quiet = false;
        } else {
            self.below = self.below.saturating_add(1);
            if self.below >= self.gate.quiet_after {
                self.quiet = true;
            }
        }
        self.quiet
    }
}

/// Samples one vCPU thread's run delay once per window.
#[derive(Debug)]
pub struct VcpuSampler {
    verdict: Verdict,
    window: Nanos,
    file: File,
    /// Time, run delay and boosted time at the last sample.
    last: Option<(Nanos, u64, u64)>,
    /// When the next sample is due.
    pub next: Nanos,
}

impl VcpuSampler {
    /// Opens thread `tid`'s schedstat; `None` when the kernel has no schedstats.
    pub fn open(gate: QuietGate, tid: i32) -> Option<VcpuSampler> {
        let file = File::open(format!("/proc/{tid}/schedstat")).ok()?;
        let mut buf = [0u8; 128];
        let n = file.read_at(&mut buf, 0).ok()?;
        parse_run_delay(std::str::from_utf8(&buf[..n]).ok()?)?;
        Some(VcpuSampler {
            verdict: Verdict::new(gate),
            window: gate.window,
            file,
            last: None,
            next: mono_ns(),
        })
    }

    /// Takes a sample at `now` if one is due, given the vCPU's boosted time so far (a boosted
    /// vCPU does not wait: only its unboosted time counts); returns the new verdict when it
    /// changed. A window spent almost all boosted tells nothing and keeps the verdict.
    pub fn poll(&mut self, now: Nanos, boosted_ns: u64) -> Option<bool> {
        if now < self.next {
            return None;
        }
        self.next = now.saturating_add(self.window);
        let mut buf = [0u8; 128];
        let n = self.file.read_at(&mut buf, 0).ok()?;
        let delay = parse_run_delay(std::str::from_utf8(&buf[..n]).ok()?)?;
        let before = self.verdict.quiet;
        if let Some((t0, d0, b0)) = self.last {
            let unboosted = now
                .saturating_sub(t0)
                .saturating_sub(boosted_ns.saturating_sub(b0));
            if unboosted >= self.window / 4 {
                let waited = delay.saturating_sub(d0);
                self.verdict
                    .window(waited.saturating_mul(1000) / unboosted.max(1));
            }
        }
        self.last = Some((now, delay, boosted_ns));
        (self.verdict.quiet != before).then_some(self.verdict.quiet)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_schedstat() {
        assert_eq!(parse_run_delay("2157018 4481 9\n"), Some(4481));
        assert_eq!(parse_run_delay("1"), None);
        assert_eq!(parse_run_delay("1 x 2"), None);
    }

    #[test]
    fn samples_this_thread() {
        // SAFETY: gettid has no arguments and cannot fail.
        let tid = unsafe { libc::gettid() };
        let Some(mut s) = VcpuSampler::open(QuietGate::default(), tid) else {
            eprintln!("SKIPPED samples_this_thread: no /proc/<tid>/schedstat (schedstats off)");
            return;
        };
        let t0 = mono_ns();
        assert_eq!(s.poll(t0, 0), None, "the first sample only starts a window");
        assert!(s.poll(t0, 0).is_none(), "not due yet");
    }

    #[test]
    fn quiet_takes_several_windows_contention_one() {
        let mut v = Verdict::new(QuietGate::default());
        for i in 0..3 {
            assert!(!v.window(5), "window {i}");
        }
        assert!(v.window(5));
        assert!(!v.window(500), "contention is believed at once");
        assert!(!v.window(19));
        assert!(!v.window(20), "at the threshold: contended");
    }
}
