//! Built-in host load: CPU-hog threads at `SCHED_OTHER` that count the work they get done.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Iterations of the hog's inner loop per counted work unit.
const UNIT_ITERS: u64 = 20_000;

/// Running CPU hogs.
pub struct HostLoad {
    stop: Arc<AtomicBool>,
    units: Vec<Arc<AtomicU64>>,
    cpu_ns: Vec<Arc<AtomicU64>>,
    /// Each hog's thread id, set by the hog when it starts (0 until then).
    tids: Vec<Arc<AtomicI32>>,
    threads: Vec<JoinHandle<()>>,
    started: Instant,
}

/// What the hogs achieved.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    /// Hog threads.
    pub threads: usize,
    /// Work units completed per second, all hogs together.
    pub units_per_sec: f64,
    /// Work units per second of each hog.
    pub per_thread: Vec<f64>,
    /// CPU time the hogs got, all together, s.
    #[serde(default)]
    pub cpu_s: f64,
    /// How long they ran, s.
    #[serde(default)]
    pub wall_s: f64,
}

fn one_unit(mut x: u64) -> u64 {
    for i in 0..UNIT_ITERS {
        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(i | 1));
    }
    x
}

impl HostLoad {
    /// Starts `threads` hogs named `pvsched-hog<N>`; they inherit the caller's class, which
    /// for pvsched is `SCHED_OTHER`.
    pub fn start(threads: usize) -> std::io::Result<HostLoad> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut load = HostLoad {
            stop: stop.clone(),
            units: Vec::new(),
            cpu_ns: Vec::new(),
            tids: Vec::new(),
            threads: Vec::new(),
            started: Instant::now(),
        };
        for i in 0..threads {
            let counter = Arc::new(AtomicU64::new(0));
            let cpu = Arc::new(AtomicU64::new(0));
            let tid = Arc::new(AtomicI32::new(0));
            let (stop, c, cpu_out, tid_out) =
                (stop.clone(), counter.clone(), cpu.clone(), tid.clone());
            let t = std::thread::Builder::new()
                .name(format!("pvsched-hog{i}"))
                .spawn(move || {
                    tid_out.store(pvsched_vmm::vcpu::gettid(), Ordering::Release);
                    let mut x = i as u64;
                    while !stop.load(Ordering::Relaxed) {
                        x = one_unit(x);
                        c.fetch_add(1, Ordering::Relaxed);
                    }
                    std::hint::black_box(x);
                    cpu_out.store(pvsched_host::clock::thread_cpu_ns(), Ordering::Relaxed);
                })?;
            load.units.push(counter);
            load.cpu_ns.push(cpu);
            load.tids.push(tid);
            load.threads.push(t);
        }
        Ok(load)
    }

    /// The hogs' thread ids, once every hog has started (it records its id first thing; a
    /// hog not started within a second is left out).
    pub fn tids(&self) -> Vec<i32> {
        let t0 = Instant::now();
        while self.tids.iter().any(|t| t.load(Ordering::Acquire) == 0)
            && t0.elapsed() < Duration::from_secs(1)
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.tids
            .iter()
            .map(|t| t.load(Ordering::Acquire))
            .filter(|&t| t != 0)
            .collect()
    }

    /// Stops and joins the hogs and reports their throughput.
    pub fn stop(mut self) -> LoadReport {
        self.halt()
    }

    fn halt(&mut self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let secs = self
            .started
            .elapsed()
            .max(Duration::from_millis(1))
            .as_secs_f64();
        let per_thread: Vec<f64> = self
            .units
            .iter()
            .map(|u| u.load(Ordering::Relaxed) as f64 / secs)
            .collect();
        LoadReport {
            threads: per_thread.len(),
            units_per_sec: per_thread.iter().sum(),
            per_thread,
            cpu_s: self
                .cpu_ns
                .iter()
                .map(|c| c.load(Ordering::Relaxed) as f64 / 1e9)
                .sum(),
            wall_s: secs,
        }
    }
}

impl Drop for HostLoad {
    fn drop(&mut self) {
        self.halt();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hogs_do_work_and_stop() {
        let load = HostLoad::start(2).unwrap();
        let tids = load.tids();
        assert_eq!(tids.len(), 2);
        for tid in &tids {
            let comm = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).unwrap();
            assert!(comm.starts_with("pvsched-hog"), "{tid}: {comm}");
        }
        std::thread::sleep(Duration::from_millis(100));
        let r = load.stop();
        assert_eq!(r.threads, 2);
        assert!(r.per_thread.iter().all(|&u| u > 0.0), "{r:?}");
        assert!((r.units_per_sec - r.per_thread.iter().sum::<f64>()).abs() < 1e-6);
    }

    #[test]
    fn zero_hogs_is_an_empty_report() {
        let r = HostLoad::start(0).unwrap().stop();
        assert_eq!(r.threads, 0);
        assert_eq!(r.units_per_sec, 0.0);
    }
}
