//! A named background thread that runs until asked to stop: the shape shared by the engine
//! thread, the host probe and the in-process daemon of a run.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// A thread running `f(stop)` until `stop` is set; stopped and joined on drop.
pub struct Worker<T> {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<T>>,
}

impl<T: Send + 'static> Worker<T> {
    /// Spawns thread `name` running `f`, which must return soon after its flag is set.
    pub fn spawn<F>(name: &str, f: F) -> std::io::Result<Worker<T>>
    where
        F: FnOnce(&AtomicBool) -> T + Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || f(&flag))?;
        Ok(Worker {
            stop,
            thread: Some(thread),
        })
    }
}

impl<T> Worker<T> {
    /// Sets the flag and joins the thread: its result, or `None` if it panicked or was
    /// already stopped.
    pub fn stop(&mut self) -> Option<T> {
        self.stop.store(true, Ordering::Release);
        self.thread.take().and_then(|t| t.join().ok())
    }
}

impl<T> Drop for Worker<T> {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_returns_the_result_once() {
        let mut w = Worker::spawn("pvsched-wtest", |stop| {
            let mut n = 0u64;
            while !stop.load(Ordering::Acquire) {
                n += 1;
                std::thread::yield_now();
            }
            n
        })
        .unwrap();
        assert!(w.stop().is_some());
        assert_eq!(w.stop(), None);
    }

    #[test]
    fn drop_stops_the_thread() {
        let done = Arc::new(AtomicBool::new(false));
        let seen = done.clone();
        let w = Worker::spawn("pvsched-wtest", move |stop| {
            while !stop.load(Ordering::Acquire) {
                std::thread::yield_now();
            }
            seen.store(true, Ordering::Release);
        })
        .unwrap();
        drop(w);
        assert!(done.load(Ordering::Acquire));
    }

    #[test]
    fn a_panicking_thread_gives_none() {
        let mut w: Worker<u32> = Worker::spawn("pvsched-wtest", |_| panic!("boom")).unwrap();
        assert_eq!(w.stop(), None);
    }
}
