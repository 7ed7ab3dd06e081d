//! The `sched_waking` host event on a real kernel: a thread's own wake-ups reach its vCPU as
//! `Woken`, the wake-ups it causes in another vCPU's thread reach that one. Skips, saying why, without
//! tracefs or the privilege to open tracepoints.

use pvsched_host::trace::{TraceConfig, TraceError, TraceSource};
use pvsched_policy::{Event, VcpuEvent, VcpuKey};
use pvsched_testutil::skip;
use std::io::{Read, Write};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Why this host cannot open the tracepoint, or `None` when the error is a failure.
fn missing_capability(e: &TraceError) -> Option<String> {
    let denied = |io: &std::io::Error| {
        matches!(
            io.raw_os_error(),
            Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::ENOENT)
        )
    };
    match e {
        TraceError::Mount(_) | TraceError::NoTracepoint(..) => Some(e.to_string()),
        TraceError::Open(_, io) if denied(io) => Some(format!("{e}: {io}")),
        _ => None,
    }
}

/// A source of `sched_waking` events only, or `None` after saying why `test` skips (any other
/// error fails it).
fn waking_source(test: &str) -> Option<TraceSource> {
    let cfg = TraceConfig {
        waking: true,
        ..TraceConfig::none()
    };
    match TraceSource::new(cfg) {
        Ok(s) => Some(s),
        Err(e) => match missing_capability(&e) {
            Some(why) => {
                skip!("{test}: {why}");
                None
            }
            None => panic!("{e}"),
        },
    }
}

/// Attaches thread `tid` as `key`; `false` after saying why `test` skips (any other error
/// fails it).
fn attached(test: &str, src: &mut TraceSource, key: VcpuKey, tid: i32) -> bool {
    match src.attach_thread(key, tid) {
        Ok(()) => true,
        Err(e) => match missing_capability(&e) {
            Some(why) => {
                skip!("{test}: {why}");
                false
            }
            None => panic!("{e}"),
        },
    }
}

#[test]
fn a_vcpu_threads_own_wakeups_are_woken_events_and_those_it_causes_are_not() {
    let test = "a_vcpu_threads_own_wakeups_are_woken_events_and_those_it_causes_are_not";
    let Some(mut src) = waking_source(test) else {
        return;
    };
    const N: usize = 40;
    // "vCPU" thread: sleeps reading a pipe; each byte wakes it, and it wakes the other
    // thread. Pipes, not channels: a blocked read is woken exactly once per write, where a
    // channel's parking woke its receiver 1.3-1.4 times per message on this host.
    let (mut vcpu_rx, mut to_vcpu) = std::io::pipe().unwrap();
    let (mut other_rx, mut to_other) = std::io::pipe().unwrap();
    let (tid_tx, tid_rx) = mpsc::channel::<i32>();
    let tid_tx2 = tid_tx.clone();
    let vcpu = std::thread::spawn(move || {
        // SAFETY: gettid has no arguments and cannot fail.
        tid_tx.send(unsafe { libc::gettid() }).unwrap();
        let mut b = [0u8; 1];
        while vcpu_rx.read(&mut b).is_ok_and(|n| n == 1) {
            let _ = to_other.write_all(&b);
        }
    });
    let tid = tid_rx.recv().unwrap();
    let other = std::thread::spawn(move || {
        // SAFETY: as above.
        tid_tx2.send(unsafe { libc::gettid() }).unwrap();
        let mut b = [0u8; 1];
        while other_rx.read(&mut b).is_ok_and(|n| n == 1) {}
    });
    let other_tid = tid_rx.recv().unwrap();
    let (key, other_key) = (VcpuKey::new(0, 0), VcpuKey::new(0, 1));
    for (k, t) in [(key, tid), (other_key, other_tid)] {
        if !attached(test, &mut src, k, t) {
            return;
        }
    }
    assert_eq!(
        src.counts().filter_errors,
        0,
        "the sched_waking streams open"
    );
    let mut run = |src: &mut TraceSource| {
        let mut events: Vec<Event> = Vec::new();
        for _ in 0..N {
            // Long enough for both threads to be asleep again before the next message.
            std::thread::sleep(Duration::from_millis(3));
            to_vcpu.write_all(&[1]).unwrap();
            src.drain_events(&mut events);
        }
        std::thread::sleep(Duration::from_millis(20));
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_millis(200) {
            src.drain_events(&mut events);
            std::thread::sleep(Duration::from_millis(5));
        }
        events
    };
    let events = run(&mut src);
    let woken = |k: VcpuKey| {
        events
            .iter()
            .filter(|e| e.key == k && e.what == VcpuEvent::Woken)
            .count()
    };
    let (mine, others) = (woken(key), woken(other_key));
    assert_eq!(mine + others, events.len(), "only Woken events: {events:?}");
    assert_eq!(src.counts().waking, events.len() as u64);
    // Every message woke each thread once (a wake-up is missed only if the thread had not
    // gone to sleep yet; a few more come from the channel's own parking); the N wake-ups
    // the first thread caused went to the second, not to itself (that would be 2N).
    for (who, n) in [("the thread", mine), ("the thread it wakes", others)] {
        assert!(
            (N * 9 / 10..=N + N / 4).contains(&n),
            "{n} Woken events for {N} wake-ups of {who}"
        );
    }
    // The first thread detached: its wake-ups are no longer seen, the other's still are.
    src.detach_thread(key);
    let after = run(&mut src);
    assert!(
        after.iter().all(|e| e.key == other_key),
        "only the attached thread's: {after:?}"
    );
    assert!(
        (N * 9 / 10..=N + N / 4).contains(&after.len()),
        "{} Woken events for {N} wake-ups of the thread still attached",
        after.len()
    );
    drop(to_vcpu);
    vcpu.join().unwrap();
    other.join().unwrap();
}

/// Whether `fd` is readable now.
fn readable(fd: std::os::fd::RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call, timeout 0 (no blocking).
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    assert!(n >= 0, "poll: {}", std::io::Error::last_os_error());
    n == 1 && p.revents & libc::POLLIN != 0
}

#[test]
fn while_every_vcpu_is_quiet_wakings_are_not_sampled() {
    use pvsched_host::runtime::EventSource;
    let test = "while_every_vcpu_is_quiet_wakings_are_not_sampled";
    let Some(mut src) = waking_source(test) else {
        return;
    };
    // A "vCPU" thread asleep on a pipe: each byte wakes it once.
    let (mut rx, mut tx) = std::io::pipe().unwrap();
    let (tid_tx, tid_rx) = mpsc::channel::<i32>();
    let vcpu = std::thread::spawn(move || {
        // SAFETY: gettid has no arguments and cannot fail.
        tid_tx.send(unsafe { libc::gettid() }).unwrap();
        let mut b = [0u8; 1];
        while rx.read(&mut b).is_ok_and(|n| n == 1) {}
    });
    let key = VcpuKey::new(0, 0);
    if !attached(test, &mut src, key, tid_rx.recv().unwrap()) {
        return;
    }
    let fd = src.fd().expect("the source has an fd");
    let mut wake = |n: usize| {
        for _ in 0..n {
            std::thread::sleep(Duration::from_millis(3));
            tx.write_all(&[1]).unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    const N: usize = 20;
    // Sampled while active: N wake-ups are N Woken events (the control for the lazy half).
    wake(N);
    let mut events = Vec::new();
    src.drain_events(&mut events);
    let woken = events.iter().filter(|e| e.what == VcpuEvent::Woken).count();
    assert!(
        (N * 9 / 10..=N + N / 4).contains(&woken),
        "active: {woken} Woken events for {N} wake-ups"
    );
    // Lazy (every vCPU quiet: no wake-up could start a boost): the streams are closed, the
    // kernel samples nothing, nothing wakes the engine, the drain finds nothing.
    src.set_lazy(true);
    assert_eq!(src.poll_period(), Some(100_000_000), "read on a timer");
    let before = src.counts().waking;
    wake(N);
    assert!(
        !readable(fd),
        "lazy: {N} wake-ups did not make the source readable"
    );
    let mut events = Vec::new();
    src.drain_events(&mut events);
    assert!(
        !events.iter().any(|e| e.what == VcpuEvent::Woken),
        "lazy: no wake-up sampled: {events:?}"
    );
    assert_eq!(src.counts().waking, before);
    // Back to a wake-up per record: one wake-up makes the source readable.
    src.set_lazy(false);
    assert_eq!(src.poll_period(), None);
    let mut stale = Vec::new();
    src.drain_events(&mut stale);
    wake(1);
    assert!(readable(fd), "a wake-up per record again");
    assert_eq!(src.counts().filter_errors, 0);
    drop(tx);
    vcpu.join().unwrap();
}
