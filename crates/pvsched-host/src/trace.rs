//! Host-side event sources from kernel tracepoints (`perf_event_open`), mapped to vCPU threads,
//! so that boosting works without any guest cooperation.
//!
//! - **LAPIC timer expiry**: `timer:hrtimer_expire_entry` filtered on `function ==
//!   apic_timer_fn`, opened on every CPU. It fires in hard-interrupt context when a vCPU's
//!   LAPIC timer expires, i.e. when the guest's timer interrupt becomes pending, whether or not
//!   its vCPU thread runs. The hrtimer is mapped to its vCPU through `timer:hrtimer_start`
//!   events (same filter) opened on each vCPU thread: the thread arms its own LAPIC timer.
//! - **vCPU wake-up**: `kvm:kvm_vcpu_wakeup` on each vCPU thread.
//! - **Interrupt accepted**: `kvm:kvm_apic_accept_irq` on each vCPU thread. On hosts without
//!   posted interrupts it fires only once the vCPU thread runs again (too late to help, see
//!   `docs/policy.md`), so it is off by default.
//!
//! Limitation: the kernel throttles sampled events to `perf_event_max_sample_rate / HZ` per
//! tick. On a CPU that is idle with its tick stopped (NO_HZ), frequent timer expiries hit
//! that limit and further samples are dropped until the next tick; [`TraceCounts::throttled`]
//! counts it. A loaded host (the case boosting is for) keeps its ticks running.

use perf_event::events::Tracepoint;
use perf_event::{Builder, Clock, SampleFlag, Sampler};
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;

/// Where tracefs is (or gets) mounted.
pub const TRACEFS: &str = "/sys/kernel/tracing";

/// Pages of each perf ring (plus the header page).
const RING_PAGES: usize = 16;

/// Errors of opening tracepoint sources.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// tracefs is not mounted and could not be.
    #[error("tracefs is not mounted at {TRACEFS} and mounting it failed")]
    Mount(#[source] io::Error),
    /// A tracepoint is missing.
    #[error("tracepoint {0} does not exist on this kernel")]
    NoTracepoint(String, #[source] io::Error),
    /// The LAPIC timer callback's address is not visible.
    #[error("cannot find apic_timer_fn in /proc/kallsyms (needs root and the kvm module)")]
    NoSymbol,
    /// A tracepoint's format lacks a field.
    #[error("the format of {0} has no field {1}")]
    Format(String, &'static str),
    /// `perf_event_open` failed.
    #[error("perf_event_open for {0} failed")]
    Open(String, #[source] io::Error),
    /// Setting a tracepoint filter failed.
    #[error("setting the filter of {0} failed")]
    Filter(String, #[source] io::Error),
}

/// What a tracepoint said about a vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceEvent {
    /// Its LAPIC timer expired.
    TimerExpired,
    /// KVM woke the halted vCPU.
    Woken,
    /// KVM accepted an interrupt for it.
    IrqAccepted,
}

impl From<TraceEvent> for pvsched_policy::VcpuEvent {
    /// The policy event a tracepoint hit stands for: an expired LAPIC timer or an accepted
    /// interrupt is an interrupt for the vCPU; a wake-up is a wake-up.
    fn from(e: TraceEvent) -> Self {
        match e {
            TraceEvent::TimerExpired | TraceEvent::IrqAccepted => {
                pvsched_policy::VcpuEvent::Interrupt
            }
            TraceEvent::Woken => pvsched_policy::VcpuEvent::Woken,
        }
    }
}

/// One tracepoint hit, mapped to a vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceHit {
    /// vCPU index (position in the thread list given to [`TraceSource::open`]).
    pub vcpu: usize,
    /// What happened.
    pub event: TraceEvent,
    /// When, `CLOCK_MONOTONIC` ns.
    pub time_ns: u64,
}

/// Which tracepoints to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceConfig {
    /// LAPIC timer expiry (`hrtimer_expire_entry` on `apic_timer_fn`).
    pub timer_expiry: bool,
    /// `kvm_vcpu_wakeup`.
    pub wakeup: bool,
    /// `kvm_apic_accept_irq`.
    pub accept_irq: bool,
}

impl Default for TraceConfig {
    fn default() -> Self {
        TraceConfig {
            timer_expiry: true,
            wakeup: false,
            accept_irq: false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Expire,
    Start,
    Wakeup,
    AcceptIrq,
}

struct Stream {
    sampler: Sampler,
    kind: Kind,
}

/// Open tracepoint streams for a set of vCPU threads.
pub struct TraceSource {
    streams: Vec<Stream>,
    tids: HashMap<u32, usize>,
    timers: HashMap<u64, usize>,
    hrtimer_off_expire: usize,
    hrtimer_off_start: usize,
    lost: u64,
    counts: TraceCounts,
}

/// Records seen per tracepoint, and expiries that matched no known vCPU timer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceCounts {
    /// `hrtimer_expire_entry` records (after the kernel-side filter).
    pub expire: u64,
    /// `hrtimer_start` records on vCPU threads.
    pub start: u64,
    /// Expiries of timers not (yet) mapped to a vCPU.
    pub unmapped: u64,
    /// `kvm_vcpu_wakeup` records.
    pub wakeup: u64,
    /// `kvm_apic_accept_irq` records.
    pub accept_irq: u64,
    /// Times the kernel throttled a stream (samples dropped until the next tick).
    pub throttled: u64,
}

/// Mounts tracefs if it is not there yet.
pub fn ensure_tracefs() -> Result<(), TraceError> {
    if Path::new(TRACEFS).join("events").is_dir() {
        return Ok(());
    }
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let (src, dst, fs) = (c("nodev"), c(TRACEFS), c("tracefs"));
    // SAFETY: valid C strings; no mount data.
    let r = unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), fs.as_ptr(), 0, std::ptr::null()) };
    if r != 0 {
        return Err(TraceError::Mount(io::Error::last_os_error()));
    }
    Ok(())
}

fn tracepoint_id(name: &str) -> Result<u64, TraceError> {
    let path = Path::new(TRACEFS).join("events").join(name).join("id");
    let s = std::fs::read_to_string(&path).map_err(|e| TraceError::NoTracepoint(name.into(), e))?;
    s.trim()
        .parse()
        .map_err(|_| TraceError::Format(name.into(), "id"))
}

/// Byte offset of `field` in the raw record of tracepoint `name`, from its format file.
fn field_offset(name: &str, field: &'static str) -> Result<usize, TraceError> {
    let path = Path::new(TRACEFS).join("events").join(name).join("format");
    let fmt =
        std::fs::read_to_string(&path).map_err(|e| TraceError::NoTracepoint(name.into(), e))?;
    parse_field_offset(&fmt, field).ok_or(TraceError::Format(name.into(), field))
}

/// Finds `field:<type> <field>;\toffset:<n>;` in a tracepoint format description.
pub fn parse_field_offset(format: &str, field: &str) -> Option<usize> {
    format.lines().find_map(|l| {
        let decl = l.trim().strip_prefix("field:")?;
        let (decl, rest) = decl.split_once(';')?;
        let name = decl.rsplit([' ', '*']).next()?;
        if name != field {
            return None;
        }
        rest.split(';')
            .find_map(|p| p.trim().strip_prefix("offset:"))
            .and_then(|n| n.parse().ok())
    })
}

/// Address of kernel symbol `sym` from `/proc/kallsyms` text.
pub fn parse_kallsyms(text: &str, sym: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        let addr = it.next()?;
        let _ty = it.next()?;
        (it.next()? == sym)
            .then(|| u64::from_str_radix(addr, 16).ok())
            .flatten()
            .filter(|&a| a != 0)
    })
}

fn open(
    name: &str,
    id: u64,
    pid: Option<i32>,
    cpu: Option<usize>,
    filter: Option<&str>,
) -> Result<Sampler, TraceError> {
    let mut b = Builder::new(Tracepoint::with_id(id));
    b.sample_period(1)
        .sample(SampleFlag::TID | SampleFlag::TIME | SampleFlag::RAW)
        .clockid(Clock::MONOTONIC)
        .wakeup_events(1)
        .include_kernel()
        .enabled(false);
    match pid {
        Some(p) => b.observe_pid(p),
        None => b.any_pid(),
    };
    match cpu {
        Some(c) => b.one_cpu(c),
        None => b.any_cpu(),
    };
    let what = format!(
        "{name} ({})",
        pid.map_or_else(
            || format!("cpu {}", cpu.unwrap_or(0)),
            |p| format!("tid {p}")
        )
    );
    let mut counter = b.build().map_err(|e| TraceError::Open(what.clone(), e))?;
    if let Some(f) = filter {
        let c = std::ffi::CString::new(f).expect("no NUL");
        // SAFETY: PERF_EVENT_IOC_SET_FILTER takes a NUL-terminated string; the fd is a perf
        // event fd we own.
        let r = unsafe {
            perf_event_open_sys::ioctls::SET_FILTER(counter.as_raw_fd(), c.as_ptr().cast_mut())
        };
        if r != 0 {
            return Err(TraceError::Filter(what, io::Error::last_os_error()));
        }
    }
    counter
        .enable()
        .map_err(|e| TraceError::Open(what.clone(), e))?;
    counter
        .sampled(RING_PAGES * 4096)
        .map_err(|e| TraceError::Open(what, e))
}

fn online_cpus() -> usize {
    // SAFETY: sysconf has no memory effects.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
    n.max(1) as usize
}

impl TraceSource {
    /// Opens the configured tracepoints for the vCPU threads `tids` (vCPU `i` = `tids[i]`).
    pub fn open(tids: &[i32], cfg: TraceConfig) -> Result<TraceSource, TraceError> {
        ensure_tracefs()?;
        let mut streams = Vec::new();
        let mut offs = (0, 0);
        if cfg.timer_expiry {
            let kallsyms = std::fs::read_to_string("/proc/kallsyms").unwrap_or_default();
            let func = parse_kallsyms(&kallsyms, "apic_timer_fn").ok_or(TraceError::NoSymbol)?;
            let filter = format!("function == 0x{func:x}");
            let (exp, start) = ("timer/hrtimer_expire_entry", "timer/hrtimer_start");
            offs = (
                field_offset(exp, "hrtimer")?,
                field_offset(start, "hrtimer")?,
            );
            let (exp_id, start_id) = (tracepoint_id(exp)?, tracepoint_id(start)?);
            for cpu in 0..online_cpus() {
                let sampler = open(exp, exp_id, None, Some(cpu), Some(&filter))?;
                streams.push(Stream {
                    sampler,
                    kind: Kind::Expire,
                });
            }
            for &tid in tids {
                let sampler = open(start, start_id, Some(tid), None, Some(&filter))?;
                streams.push(Stream {
                    sampler,
                    kind: Kind::Start,
                });
            }
        }
        for (on, name, kind) in [
            (cfg.wakeup, "kvm/kvm_vcpu_wakeup", Kind::Wakeup),
            (cfg.accept_irq, "kvm/kvm_apic_accept_irq", Kind::AcceptIrq),
        ] {
            if on {
                let id = tracepoint_id(name)?;
                for &tid in tids {
                    let sampler = open(name, id, Some(tid), None, None)?;
                    streams.push(Stream { sampler, kind });
                }
            }
        }
        Ok(TraceSource {
            streams,
            tids: tids
                .iter()
                .enumerate()
                .map(|(i, &t)| (t as u32, i))
                .collect(),
            timers: HashMap::new(),
            hrtimer_off_expire: offs.0,
            hrtimer_off_start: offs.1,
            lost: 0,
            counts: TraceCounts::default(),
        })
    }

    /// The fds to wait on (readable when records are pending).
    pub fn fds(&self) -> Vec<RawFd> {
        self.streams.iter().map(|s| s.sampler.as_raw_fd()).collect()
    }

    /// Records lost by the kernel (ring full).
    pub fn lost(&self) -> u64 {
        self.lost
    }

    /// Records seen so far.
    pub fn counts(&self) -> TraceCounts {
        self.counts
    }

    /// Reads every pending record; hits that map to a vCPU go to `out`.
    pub fn drain(&mut self, out: &mut Vec<TraceHit>) {
        for s in &mut self.streams {
            while let Some(rec) = s.sampler.next_record() {
                let Ok(parsed) = rec.parse_record() else {
                    continue;
                };
                let sample = match parsed {
                    perf_event::data::Record::Sample(sample) => sample,
                    perf_event::data::Record::Lost(l) => {
                        self.lost += l.lost;
                        continue;
                    }
                    perf_event::data::Record::Throttle(_) => {
                        self.counts.throttled += 1;
                        continue;
                    }
                    _ => continue,
                };
                let (Some(time_ns), Some(raw)) = (sample.time(), sample.raw()) else {
                    continue;
                };
                let raw = raw.to_vec();
                let hrtimer = |off: usize| -> Option<u64> {
                    raw.get(off..off + 8)
                        .map(|b| u64::from_ne_bytes(b.try_into().expect("8 bytes")))
                };
                let by_tid = sample.tid().and_then(|t| self.tids.get(&t).copied());
                let c = &mut self.counts;
                match s.kind {
                    Kind::Start => {
                        c.start += 1;
                        if let (Some(v), Some(t)) = (by_tid, hrtimer(self.hrtimer_off_start)) {
                            self.timers.insert(t, v);
                        }
                    }
                    Kind::Expire => {
                        c.expire += 1;
                        match hrtimer(self.hrtimer_off_expire).and_then(|t| self.timers.get(&t)) {
                            Some(&vcpu) => out.push(TraceHit {
                                vcpu,
                                event: TraceEvent::TimerExpired,
                                time_ns,
                            }),
                            None => c.unmapped += 1,
                        }
                    }
                    Kind::Wakeup | Kind::AcceptIrq => {
                        if s.kind == Kind::Wakeup {
                            c.wakeup += 1;
                        } else {
                            c.accept_irq += 1;
                        }
                        if let Some(vcpu) = by_tid {
                            let event = if s.kind == Kind::Wakeup {
                                TraceEvent::Woken
                            } else {
                                TraceEvent::IrqAccepted
                            };
                            out.push(TraceHit {
                                vcpu,
                                event,
                                time_ns,
                            });
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORMAT: &str = "name: hrtimer_expire_entry
ID: 123
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:void * hrtimer;\toffset:8;\tsize:8;\tsigned:0;
\tfield:s64 now;\toffset:16;\tsize:8;\tsigned:1;
\tfield:void * function;\toffset:24;\tsize:8;\tsigned:0;
";

    #[test]
    fn format_offsets_parse() {
        assert_eq!(parse_field_offset(FORMAT, "hrtimer"), Some(8));
        assert_eq!(parse_field_offset(FORMAT, "function"), Some(24));
        assert_eq!(parse_field_offset(FORMAT, "now"), Some(16));
        assert_eq!(parse_field_offset(FORMAT, "expires"), None);
    }

    #[test]
    fn kallsyms_lookup() {
        let text = "ffffffff81000000 T _stext\nffffffffc0a1b2c0 t apic_timer_fn\t[kvm]\n0000000000000000 t hidden\n";
        assert_eq!(
            parse_kallsyms(text, "apic_timer_fn"),
            Some(0xffff_ffff_c0a1_b2c0)
        );
        assert_eq!(
            parse_kallsyms(text, "hidden"),
            None,
            "zeroed by kptr_restrict"
        );
        assert_eq!(parse_kallsyms(text, "nope"), None);
    }
}
