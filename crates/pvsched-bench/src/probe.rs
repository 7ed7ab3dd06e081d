//! The host probe: a `SCHED_OTHER` thread that sleeps to absolute deadlines with
//! `clock_nanosleep` and records how late it wakes, like cyclictest on the host. It shows
//! what boosting vCPU threads costs ordinary host work.

use crate::hist::LatencyHistogram;
use crate::worker::Worker;
use pvsched_host::clock::mono_ns;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// A running host probe.
pub struct HostProbe {
    worker: Worker<LatencyHistogram>,
    tid: i32,
}

fn sleep_until_ns(t: u64) {
    let ts = libc::timespec {
        tv_sec: (t / 1_000_000_000) as libc::time_t,
        tv_nsec: (t % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: `ts` is a valid timespec; no remaining-time output with TIMER_ABSTIME. EINTR
    // only makes this wake early, which the caller measures as a negative (clamped) latency.
    unsafe {
        libc::clock_nanosleep(
            libc::CLOCK_MONOTONIC,
            libc::TIMER_ABSTIME,
            &ts,
            std::ptr::null_mut(),
        )
    };
}

impl HostProbe {
    /// Starts the probe thread `pvsched-hprobe`, waking every `interval`.
    pub fn start(interval: Duration) -> std::io::Result<HostProbe> {
        let (tx, rx) = std::sync::mpsc::channel();
        let step = interval.as_nanos().max(1) as u64;
        let worker = Worker::spawn("pvsched-hprobe", move |stop| {
            // SAFETY: plain syscall.
            let _ = tx.send(unsafe { libc::gettid() });
            let mut hist = LatencyHistogram::new();
            let mut next = mono_ns() + step;
            while !stop.load(Ordering::Relaxed) {
                sleep_until_ns(next);
                let late = mono_ns().saturating_sub(next);
                hist.record_ns(late);
                next += step;
            }
            hist
        })?;
        let tid = rx.recv().unwrap_or(0);
        Ok(HostProbe { worker, tid })
    }

    /// Kernel thread id of the probe thread.
    pub fn tid(&self) -> i32 {
        self.tid
    }

    /// Stops the probe and returns its wake-up latencies.
    pub fn stop(mut self) -> LatencyHistogram {
        self.worker.stop().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_records_about_one_sample_per_interval() {
        let t0 = std::time::Instant::now();
        let p = HostProbe::start(Duration::from_millis(1)).unwrap();
        assert!(p.tid() > 0);
        std::thread::sleep(Duration::from_millis(200));
        let h = p.stop();
        let elapsed_ms = t0.elapsed().as_millis() as u64;
        // Behaviour, not timing: it woke repeatedly, and never more than once per interval of
        // the time it actually ran (it sleeps to absolute deadlines one interval apart).
        assert!(h.len() >= 20, "{} samples", h.len());
        assert!(
            h.len() <= elapsed_ms + 1,
            "{} samples in {elapsed_ms} ms",
            h.len()
        );
    }
}
