//! The pvsched protocol for VMs of other VMMs: when a VMM keeps guest RAM in a file (or memfd)
//! and says where its guests' slots are, the daemon maps it, reads the guests' requests and
//! publishes boost states, with the same handshake as the reference VMM. Without the VMM's
//! doorbell it polls the slots (every millisecond while any VM has some): [`SlotSource`] is
//! the runtime's event source and [`SlotPublisher`] its publisher, over one mapping.

use pvsched_host::clock::{mono_ns, rdtsc, OffsetEstimate, TscClock};
use pvsched_host::runtime::EventSource;
use pvsched_host::sigbus::Guard;
use pvsched_host::slot::{GuestPage, GuestSlot};
use pvsched_host::Publisher;
use pvsched_policy::{Event, Nanos, VcpuEvent, VcpuKey};
use pvsched_proto::abi::feature;
use pvsched_proto::abi::SLOT_SIZE;
use pvsched_proto::host::publish_state;
use pvsched_proto::v3::{AppliedState, GuestArea, PageError};
use pvsched_proto::{decode, BoostState};
use std::io;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::Arc;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Where a VM's guest memory and slots are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProtocolSpec {
    /// File holding guest RAM from guest-physical address 0.
    pub memory: PathBuf,
    /// Guest-physical address of vCPU `i`'s slot.
    pub slots: Vec<u64>,
    /// Guest TSC − host TSC, cycles (what `pvsched vm --memory-file` prints). With it the
    /// guests' published deadlines become deadline hints (`deadline-aware`); without it they
    /// are not used.
    pub tsc_offset: Option<i64>,
    /// The features the VMM negotiated with the guest ([`feature`] bits): fields of any other
    /// feature are ignored, whatever the guest writes there.
    pub features: u32,
    /// The addresses are pvsched v3 pages (4096 bytes each, `docs/protocol-v3.md`), not
    /// protocol-v1 slots: each page is negotiated when the VM is attached.
    pub v3: bool,
}

/// A VM's mapped slots.
pub struct GuestSlots {
    /// Declared before `mem`: unregistered before the mapping goes.
    guard: Guard,
    mem: GuestMemoryMmap,
    features: u32,
    slots: Vec<u64>,
    seen: Vec<Option<Option<u32>>>,
    /// v3: the status each page got when attached (only enabled pages are read).
    pages: Option<Vec<pvsched_proto::v3::Status>>,
    /// v3: the guest's request (header bytes 0–47) each page was negotiated with: a refused
    /// page is negotiated again when its guest writes another one (a guest that had not
    /// written its request yet when the daemon attached).
    requests: Vec<[u8; 48]>,
    /// v3: each page's guest words as last read (`None`: not yet, or found invalid).
    words: Vec<Option<[u64; 3]>>,
    /// Converts the guests' deadlines to host time, when their TSC offset is known.
    tsc: Option<TscClock>,
    deadlines: Vec<Option<u64>>,
    /// Without a known offset, with the clock-stamp feature: the host's TSC frequency (kHz)
    /// and the offset estimated from the guests' stamps (one TSC for the whole VM).
    stamp_khz: Option<u64>,
    estimate: OffsetEstimate,
    stamps: Vec<Option<u64>>,
}

impl GuestSlots {
    /// Maps `spec.memory` and checks every slot address. The file must be a regular file
    /// (or memfd), not reached through a symbolic link, owned by root or by `owner` (the VM
    /// process's owner), and not writable by every user.
    pub fn open(spec: &ProtocolSpec, owner: Option<u32>) -> io::Result<GuestSlots> {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let bad = |m: String| io::Error::new(io::ErrorKind::InvalidInput, m);
        let name = spec.memory.display();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NOCTTY)
            .open(&spec.memory)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ELOOP) => bad(format!("{name} is a symbolic link")),
                _ => e,
            })?;
        let meta = f.metadata()?;
        if !meta.file_type().is_file() {
            return Err(bad(format!("{name} is not a regular file or memfd")));
        }
        if on_hugetlbfs(&f)? {
            // A huge page cannot be replaced by a small zero page: its truncation could not
            // be survived.
            return Err(bad(format!(
                "{name} is on hugetlbfs, which the daemon does not map (a truncation could not \
                 be survived)"
            )));
        }
        if meta.uid() != 0 && Some(meta.uid()) != owner {
            return Err(bad(format!(
                "{name} belongs to uid {}, neither root nor the VM's owner{}",
                meta.uid(),
                owner.map_or(String::new(), |o| format!(" (uid {o})"))
            )));
        }
        if meta.mode() & 0o002 != 0 {
            return Err(bad(format!(
                "{name} is writable by every user: anyone could forge the guests' requests"
            )));
        }
        GuestSlots::from_file(f, spec)
    }

    /// Maps `f`, which the caller vouches for (the daemon's own memory, e.g. an ivshmem
    /// region it created and sealed), and checks every slot address; `spec.memory` only
    /// names it in errors.
    pub fn from_file(f: std::fs::File, spec: &ProtocolSpec) -> io::Result<GuestSlots> {
        let bad = |m: String| io::Error::new(io::ErrorKind::InvalidInput, m);
        let name = spec.memory.display();
        let len = f.metadata()?.len();
        if len == 0 {
            return Err(bad(format!("{name} is empty")));
        }
        let size = if spec.v3 {
            pvsched_proto::v3::PAGE_SIZE as u64
        } else {
            SLOT_SIZE as u64
        };
        for &gpa in &spec.slots {
            if !gpa.is_multiple_of(size) || gpa.checked_add(size).is_none_or(|e| e > len) {
                return Err(bad(format!(
                    "{} {gpa:#x} is not a {size}-byte aligned {} inside {} ({len} bytes)",
                    if spec.v3 { "page" } else { "slot" },
                    if spec.v3 { "v3 page" } else { "slot" },
                    spec.memory.display()
                )));
            }
        }
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            len as usize,
            Some(FileOffset::new(f, 0)),
        )])
        .map_err(io::Error::other)?;
        let host = mem
            .get_host_address(GuestAddress(0))
            .map_err(io::Error::other)?;
        let guard = Guard::register(host, len as usize).map_err(io::Error::other)?;
        // v3: each page is negotiated now; the guest reads the status from its page.
        let mut requests = vec![[0u8; 48]; spec.slots.len()];
        let mut pages = None;
        if spec.v3 {
            let mut st = Vec::with_capacity(spec.slots.len());
            for (&gpa, req) in spec.slots.iter().zip(requests.iter_mut()) {
                mem.read_slice(req, GuestAddress(gpa))
                    .map_err(io::Error::other)?;
                let status = GuestPage::new(&mem, gpa)
                    .attach()
                    .ok_or_else(|| io::Error::other(format!("v3 page {gpa:#x} cannot be read")))?;
                st.push(status);
            }
            pages = Some(st);
        }
        Ok(GuestSlots {
            pages,
            requests,
            words: vec![None; spec.slots.len()],
            guard,
            mem,
            features: spec.features,
            seen: vec![None; spec.slots.len()],
            slots: spec.slots.clone(),
            tsc: spec
                .tsc_offset
                .map(|o| TscClock::measured(o, std::time::Duration::from_millis(20))),
            deadlines: vec![None; spec.slots.len()],
            stamp_khz: (spec.tsc_offset.is_none()
                && !spec.v3
                && spec.features & feature::CLOCK_STAMP != 0
                && spec.features & feature::DEADLINE_HINT != 0)
                .then(|| TscClock::measured(0, std::time::Duration::from_millis(20)).khz),
            estimate: OffsetEstimate::default(),
            stamps: vec![None; spec.slots.len()],
        })
    }

    /// The guest's TSC offset as estimated from its clock stamps so far, and how many stamps
    /// it rests on (`None` with a configured offset or without the clock-stamp feature).
    pub fn estimated_offset(&self) -> Option<(i64, u64)> {
        self.stamp_khz?;
        Some((self.estimate.offset()?, self.estimate.samples))
    }

    /// The clock that converts this VM's deadlines: the configured offset, else the one
    /// estimated from the guests' stamps.
    fn clock(&self) -> Option<TscClock> {
        self.tsc.or_else(|| {
            Some(TscClock {
                offset: self.estimate.offset()?,
                khz: self.stamp_khz?,
            })
        })
    }

    /// Reports the slots whose `seq` moved (as requests, and their deadline as a hint when
    /// it changed and the TSC offset is known) or that do not decode (once).
    pub fn poll(&mut self, vm: u32, vcpus: u32, out: &mut Vec<Event>) {
        // The file was cut short under the mapping: what is left reads as zeros; the daemon
        // detaches the VM.
        if self.truncated() {
            return;
        }
        if self.pages.is_some() {
            self.poll_v3(vm, out);
            return;
        }
        for i in 0..self.slots.len() {
            let (gpa, seen) = (self.slots[i], self.seen[i]);
            let mut bytes = [0u8; SLOT_SIZE];
            if self.mem.read_slice(&mut bytes, GuestAddress(gpa)).is_err() {
                continue;
            }
            // Cut short during this very read: these zeros are not the guest's.
            if self.guard.truncated() {
                return;
            }
            let host_tsc = rdtsc();
            let key = VcpuKey::new(vm, i as u32);
            match decode(&bytes, vcpus, self.features) {
                Ok(s) if seen != Some(Some(s.seq)) => {
                    self.seen[i] = Some(Some(s.seq));
                    out.push(Event::new(key, VcpuEvent::Request(s.reasons)));
                    if self.stamp_khz.is_some() && s.stamp_tsc != self.stamps[i] {
                        self.stamps[i] = s.stamp_tsc;
                        if let Some(stamp) = s.stamp_tsc {
                            self.estimate.observe(stamp, host_tsc);
                        }
                    }
                    if let Some(tsc) = self.clock() {
                        if s.deadline_tsc != self.deadlines[i] {
                            self.deadlines[i] = s.deadline_tsc;
                            let at = s.deadline_tsc.map(|t| tsc.to_mono(t, rdtsc(), mono_ns()));
                            out.push(Event::new(key, VcpuEvent::DeadlineHint(at)));
                        }
                    }
                }
                Ok(_) => {}
                Err(_) if seen != Some(None) => {
                    self.seen[i] = Some(None);
                    out.push(Event::new(key, VcpuEvent::SlotInvalid));
                }
                Err(_) => {}
            }
        }
    }

    /// v3: reports the enabled pages whose guest words changed (as their decoded guest
    /// area) or that do not decode (once).
    fn poll_v3(&mut self, vm: u32, out: &mut Vec<Event>) {
        let Some(pages) = &mut self.pages else { return };
        for (i, &gpa) in self.slots.iter().enumerate() {
            if pages[i] != pvsched_proto::v3::Status::Enabled {
                // Refused: negotiated again once its guest writes another request.
                let mut req = [0u8; 48];
                if self.mem.read_slice(&mut req, GuestAddress(gpa)).is_err()
                    || req == self.requests[i]
                    || self.guard.truncated()
                {
                    continue;
                }
                self.requests[i] = req;
                match GuestPage::new(&self.mem, gpa).negotiate() {
                    Some(st) => pages[i] = st,
                    None => continue,
                }
                if pages[i] != pvsched_proto::v3::Status::Enabled {
                    continue;
                }
                self.words[i] = None;
            }
            let page = GuestPage::new(&self.mem, gpa);
            let words = page.words();
            if self.words[i] == Some(words) {
                continue;
            }
            let area = page.area();
            if self.guard.truncated() {
                return;
            }
            let key = VcpuKey::new(vm, i as u32);
            let was_bad = self.seen[i] == Some(None);
            self.words[i] = Some(words);
            match area {
                Ok(a) => {
                    self.seen[i] = Some(Some(0));
                    out.push(Event::new(key, VcpuEvent::Intent(a)));
                }
                Err(_) if !was_bad => {
                    self.seen[i] = Some(None);
                    out.push(Event::new(key, VcpuEvent::SlotInvalid));
                }
                Err(_) => {}
            }
        }
    }

    /// The status each v3 page got when attached (`None` for protocol-v1 slots).
    pub fn page_status(&self) -> Option<&[pvsched_proto::v3::Status]> {
        self.pages.as_deref()
    }

    /// True once the memory file turned out shorter than when it was mapped.
    pub fn truncated(&self) -> bool {
        self.guard.truncated()
    }

    /// Publishes the host's feedback in vCPU `vcpu`'s enabled v3 page; returns its guest area
    /// read after the fence (`None` for slots and pages not enabled).
    pub fn publish_v3(
        &self,
        vcpu: usize,
        applied: AppliedState,
        ticket: u64,
    ) -> Option<Result<GuestArea, PageError>> {
        let pages = self.pages.as_ref()?;
        if *pages.get(vcpu)? != pvsched_proto::v3::Status::Enabled || self.truncated() {
            return None;
        }
        let gpa = *self.slots.get(vcpu)?;
        Some(GuestPage::new(&self.mem, gpa).publish(applied, ticket))
    }

    /// Publishes `state` in vCPU `vcpu`'s slot; returns the request read after the fence.
    pub fn publish(&self, vcpu: usize, state: BoostState) -> Option<u32> {
        if self.pages.is_some() {
            return None;
        }
        let gpa = *self.slots.get(vcpu)?;
        Some(publish_state(&GuestSlot::new(&self.mem, gpa), state))
    }

    /// Splits the mapping into the runtime's source (polled every `period`) and publisher
    /// for VM `vm`.
    /// With a `doorbell` the source waits on it and is not polled.
    pub fn into_parts(
        self,
        vm: u32,
        period: Nanos,
        doorbell: Option<crate::ivshmem::Doorbell>,
    ) -> (SlotSource, SlotPublisher, SlotWatch) {
        let flag = self.guard.flag();
        let shared = Arc::new(std::sync::Mutex::new(self));
        (
            SlotSource {
                slots: shared.clone(),
                vm,
                period,
                doorbell,
            },
            SlotPublisher(shared.clone()),
            SlotWatch {
                _slots: shared,
                flag,
            },
        )
    }
}

/// True when `f` lives on hugetlbfs (a hugetlbfs file or a `MFD_HUGETLB` memfd).
fn on_hugetlbfs(f: &std::fs::File) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;
    // SAFETY: an all-zero statfs is a valid value of the C struct; fstatfs only writes it.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a writable statfs and the descriptor is open for the call.
    if unsafe { libc::fstatfs(f.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64 == HUGETLBFS_MAGIC)
}

/// Lets the daemon's control plane see that a VM's memory file was truncated, without taking
/// the slots' lock: the real-time engine thread takes it to read and publish, and must not
/// wait for a normal-priority thread preempted inside it.
#[derive(Clone)]
pub struct SlotWatch {
    /// Keeps the mapping, and so its guard and flag, alive.
    _slots: Arc<std::sync::Mutex<GuestSlots>>,
    flag: pvsched_host::sigbus::TruncationFlag,
}

impl SlotWatch {
    /// True once the memory file turned out shorter than when it was mapped.
    pub fn truncated(&self) -> bool {
        self.flag.truncated()
    }
}

/// A VM's slots as an event source: read when its doorbell rings, or polled.
pub struct SlotSource {
    slots: Arc<std::sync::Mutex<GuestSlots>>,
    vm: u32,
    period: Nanos,
    doorbell: Option<crate::ivshmem::Doorbell>,
}

impl EventSource for SlotSource {
    fn name(&self) -> &str {
        "guest-slots"
    }
    fn fd(&self) -> Option<RawFd> {
        self.doorbell.as_ref().map(|d| d.fd())
    }
    fn poll_period(&self) -> Option<Nanos> {
        self.doorbell.is_none().then_some(self.period)
    }
    fn drain(&mut self, _now: Nanos, out: &mut Vec<Event>) -> Option<Nanos> {
        if let Some(d) = &self.doorbell {
            d.take();
        }
        let mut s = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let n = s.slots.len() as u32;
        s.poll(self.vm, n, out);
        None
    }
}

/// Publishes boost states into a VM's slots.
pub struct SlotPublisher(Arc<std::sync::Mutex<GuestSlots>>);

impl Publisher for SlotPublisher {
    fn publish(&mut self, key: VcpuKey, state: BoostState) -> Option<u32> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .publish(key.vcpu as usize, state)
    }
    fn publish_v3(
        &mut self,
        key: VcpuKey,
        applied: AppliedState,
        ticket: u64,
    ) -> Option<Result<GuestArea, PageError>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).publish_v3(
            key.vcpu as usize,
            applied,
            ticket,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pvsched_proto::abi::{off, Reason};

    #[test]
    fn slots_in_a_memory_file_are_polled_and_published() {
        let path = std::env::temp_dir().join(format!("pvsched-slots-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 0x4000]).unwrap();
        let spec = ProtocolSpec {
            memory: path.clone(),
            slots: vec![0x1000, 0x2000],
            tsc_offset: None,
            features: feature::ALL_V1,
            v3: false,
        };
        let mut s = GuestSlots::open(&spec, None).unwrap();
        let mut out = Vec::new();
        s.poll(7, 2, &mut out);
        assert_eq!(out.len(), 2, "first look reports both slots");
        out.clear();
        // The "guest" (another mapping of the file) requests a boost on vCPU 1.
        let guest = GuestSlots::open(&spec, None).unwrap();
        let g = GuestSlot::new(&guest.mem, 0x2000);
        use pvsched_proto::SlotMemory;
        g.store_u32(off::REQUEST, Reason::RtTask.bit());
        g.store_u32(off::SEQ, 1);
        s.poll(7, 2, &mut out);
        assert_eq!(
            out,
            [Event::new(
                VcpuKey::new(7, 1),
                VcpuEvent::Request(pvsched_proto::Reasons::NONE.with(Reason::RtTask))
            )]
        );
        assert_eq!(
            s.publish(1, BoostState::Boosted),
            Some(Reason::RtTask.bit())
        );
        assert_eq!(
            g.load_u32(off::STATE),
            BoostState::Boosted as u32,
            "seen by the guest"
        );
        // Garbage is reported once.
        g.store_u32(off::REQUEST, u32::MAX);
        out.clear();
        s.poll(7, 2, &mut out);
        s.poll(7, 2, &mut out);
        assert_eq!(
            out,
            [Event::new(VcpuKey::new(7, 1), VcpuEvent::SlotInvalid)]
        );
        let _ = std::fs::remove_file(&path);
        assert!(GuestSlots::open(
            &ProtocolSpec {
                memory: path,
                slots: vec![],
                tsc_offset: None,
                features: 0,
                v3: false,
            },
            None
        )
        .is_err());
    }

    /// The second of `events` (after the request) is a deadline hint 4–6 ms after `now`.
    fn assert_hint_ahead(events: &[Event], now: u64) {
        let Some(Event {
            what: VcpuEvent::DeadlineHint(Some(at)),
            ..
        }) = events.get(1)
        else {
            panic!("no hint: {events:?}");
        };
        let ahead = at.saturating_sub(now);
        assert!(
            (4_000_000..6_000_000).contains(&ahead),
            "hint {ahead} ns ahead"
        );
    }

    #[test]
    fn deadlines_become_hints_when_the_tsc_offset_is_known() {
        let path = std::env::temp_dir().join(format!("pvsched-slots-dl-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 0x2000]).unwrap();
        let spec = |tsc_offset| ProtocolSpec {
            memory: path.clone(),
            slots: vec![0x1000],
            tsc_offset,
            features: feature::ALL_V1,
            v3: false,
        };
        let mut with = GuestSlots::open(&spec(Some(0)), None).unwrap();
        let mut without = GuestSlots::open(&spec(None), None).unwrap();
        let khz = with.tsc.unwrap().khz;
        // The guest (offset 0: its TSC is the host's) publishes a deadline 5 ms ahead.
        let guest = GuestSlots::open(&spec(None), None).unwrap();
        let g = GuestSlot::new(&guest.mem, 0x1000);
        use pvsched_proto::SlotMemory;
        g.store_u64(off::DEADLINE_TSC, rdtsc() + khz * 5);
        g.store_u32(off::SEQ, 1);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let now = mono_ns();
        with.poll(0, 1, &mut a);
        without.poll(0, 1, &mut b);
        assert_eq!(b.len(), 1, "a request, no hint: {b:?}");
        assert_hint_ahead(&a, now);
        // The same deadline again gives no second hint.
        g.store_u32(off::SEQ, 2);
        a.clear();
        with.poll(0, 1, &mut a);
        assert_eq!(a.len(), 1, "{a:?}");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn without_a_known_offset_the_guests_clock_stamps_make_deadlines_hints() {
        let path = std::env::temp_dir().join(format!("pvsched-slots-st-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 0x2000]).unwrap();
        let spec = |features| ProtocolSpec {
            memory: path.clone(),
            slots: vec![0x1000],
            tsc_offset: None,
            features,
            v3: false,
        };
        let mut stamped = GuestSlots::open(&spec(feature::ALL_V1), None).unwrap();
        let mut unstamped =
            GuestSlots::open(&spec(feature::ALL_V1 & !feature::CLOCK_STAMP), None).unwrap();
        let khz = stamped.stamp_khz.unwrap();
        assert_eq!(unstamped.stamp_khz, None);
        // The guest's TSC runs 1 s behind the host's.
        let off = -(khz as i64 * 1000);
        let guest = GuestSlots::open(&spec(0), None).unwrap();
        let g = GuestSlot::new(&guest.mem, 0x1000);
        use pvsched_proto::SlotMemory;
        let gtsc = || rdtsc().wrapping_add_signed(off);
        // A deadline without a stamp yet: no hint, the offset being unknown.
        g.store_u64(off::DEADLINE_TSC, gtsc() + khz * 5);
        g.store_u32(off::SEQ, 1);
        let mut a = Vec::new();
        stamped.poll(0, 1, &mut a);
        assert_eq!(a.len(), 1, "a request, no hint: {a:?}");
        assert_eq!(stamped.estimated_offset(), None);
        // Stamped and rung: the next deadline (5 ms ahead) is a hint at the right time.
        g.store_u64(off::STAMP_TSC, gtsc());
        g.store_u64(off::DEADLINE_TSC, gtsc() + khz * 5);
        g.store_u32(off::SEQ, 2);
        a.clear();
        let now = mono_ns();
        stamped.poll(0, 1, &mut a);
        let mut b = Vec::new();
        unstamped.poll(0, 1, &mut b);
        assert!(
            b.iter()
                .all(|e| !matches!(e.what, VcpuEvent::DeadlineHint(_))),
            "{b:?}"
        );
        assert_hint_ahead(&a, now);
        let (est, n) = stamped.estimated_offset().unwrap();
        assert_eq!(n, 1);
        assert!(est <= off && est > off - khz as i64, "{est} vs {off}");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn bad_slot_addresses_are_refused() {
        let path = std::env::temp_dir().join(format!("pvsched-slots-bad-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 0x1000]).unwrap();
        for bad in [0x10u64, 0x1000, u64::MAX - 127] {
            let spec = ProtocolSpec {
                memory: path.clone(),
                slots: vec![bad],
                tsc_offset: None,
                features: 0,
                v3: false,
            };
            assert!(GuestSlots::open(&spec, None).is_err(), "{bad:#x}");
        }
        let _ = std::fs::remove_file(&path);
    }

    fn file(tag: &str, len: usize) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("pvsched-slots-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        std::fs::write(&path, vec![0u8; len]).unwrap();
        path
    }

    fn spec_of(path: &std::path::Path, features: u32) -> ProtocolSpec {
        ProtocolSpec {
            memory: path.to_path_buf(),
            slots: vec![0x1000],
            tsc_offset: None,
            features,
            v3: false,
        }
    }

    #[test]
    fn v3_pages_in_a_memory_file_are_negotiated_polled_and_published() {
        use pvsched_proto::v3::{self, BoostKind, Request, Status, TaskDesc, TaskIntent};
        let path = file("v3", 0x4000);
        // vCPU 0's page asks for the default policy; vCPU 1's for ABI 2.
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            let mut h = [0u8; 64];
            Request::default_policy().write(&mut h);
            f.write_all_at(&h, 0x1000).unwrap();
            let mut r = Request::default_policy();
            r.abi_version = 2;
            r.write(&mut h);
            f.write_all_at(&h, 0x2000).unwrap();
        }
        let spec = ProtocolSpec {
            memory: path.clone(),
            slots: vec![0x1000, 0x2000],
            tsc_offset: None,
            features: 0,
            v3: true,
        };
        let mut s = GuestSlots::open(&spec, None).unwrap();
        assert_eq!(
            s.page_status().unwrap(),
            [Status::Enabled, Status::AbiMismatch]
        );
        let guest = GuestSlots::open(
            &ProtocolSpec {
                slots: vec![],
                ..spec.clone()
            },
            None,
        )
        .unwrap();
        let status = |gpa: u64| -> u32 { guest.mem.read_obj(GuestAddress(gpa + 48)).unwrap() };
        assert_eq!(status(0x1000), Status::Enabled as u32, "seen by the guest");
        assert_eq!(status(0x2000), Status::AbiMismatch as u32);
        let mut out = Vec::new();
        s.poll(3, 2, &mut out);
        assert_eq!(
            out,
            [Event::new(
                VcpuKey::new(3, 0),
                VcpuEvent::Intent(Default::default())
            )],
            "the enabled page only"
        );
        out.clear();
        s.poll(3, 2, &mut out);
        assert!(out.is_empty(), "nothing changed");
        let intent = TaskIntent {
            current: TaskDesc::fifo(20),
            pending: None,
            idle: false,
        };
        guest
            .mem
            .write_obj(
                intent.encode(),
                GuestAddress(0x1000 + v3::off::TASK_INTENT as u64),
            )
            .unwrap();
        s.poll(3, 2, &mut out);
        let Event {
            what: VcpuEvent::Intent(a),
            ..
        } = out[0]
        else {
            panic!("{out:?}")
        };
        assert_eq!(a.intent, intent);
        let applied = AppliedState {
            boost: BoostKind::Task,
            hints: 1,
            flags: 0,
        };
        assert_eq!(s.publish_v3(0, applied, 4).unwrap().unwrap().intent, intent);
        let w: u64 = guest
            .mem
            .read_obj(GuestAddress(0x1000 + v3::off::APPLIED_STATE as u64))
            .unwrap();
        assert_eq!(w, applied.encode());
        assert!(
            s.publish_v3(1, applied, 4).is_none(),
            "a refused page is not written"
        );
        // vCPU 1's guest writes a good request: negotiated again, enabled, read.
        let mut h = [0u8; 64];
        Request::default_policy().write(&mut h);
        guest
            .mem
            .write_slice(&h[..48], GuestAddress(0x2000))
            .unwrap();
        out.clear();
        s.poll(3, 2, &mut out);
        assert_eq!(s.page_status().unwrap()[1], Status::Enabled);
        assert_eq!(status(0x2000), Status::Enabled as u32);
        assert_eq!(
            out,
            [Event::new(
                VcpuKey::new(3, 1),
                VcpuEvent::Intent(Default::default())
            )]
        );
        assert_eq!(s.publish(0, BoostState::Boosted), None, "no v1 slot there");
        // Garbage in the guest area: reported once.
        guest
            .mem
            .write_obj(u64::MAX, GuestAddress(0x1000 + v3::off::CS_STATE as u64))
            .unwrap();
        out.clear();
        s.poll(3, 2, &mut out);
        s.poll(3, 2, &mut out);
        assert_eq!(
            out,
            [Event::new(VcpuKey::new(3, 0), VcpuEvent::SlotInvalid)]
        );
        // A page address that is not 4096-aligned is refused.
        let e = GuestSlots::open(
            &ProtocolSpec {
                slots: vec![0x1800],
                ..spec
            },
            None,
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("4096-byte aligned"), "{e}");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn the_memory_file_is_checked() {
        use std::os::unix::fs::PermissionsExt;
        let path = file("checked", 0x2000);
        assert!(GuestSlots::open(&spec_of(&path, 0), None).is_ok());
        // Through a symbolic link.
        let link = path.with_extension("link");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let e = GuestSlots::open(&spec_of(&link, 0), None).err().unwrap();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        // Not a regular file.
        let e = GuestSlots::open(&spec_of(std::path::Path::new("/dev/null"), 0), None)
            .err()
            .unwrap();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        // Writable by everyone.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = GuestSlots::open(&spec_of(&path, 0), None).err().unwrap();
        assert!(e.to_string().contains("writable by every user"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        // Owned by another user: only that user's VM may use it.
        match std::os::unix::fs::chown(&path, Some(65534), None) {
            Ok(()) => {
                let e = GuestSlots::open(&spec_of(&path, 0), None).err().unwrap();
                assert!(e.to_string().contains("uid 65534"), "{e}");
                assert!(GuestSlots::open(&spec_of(&path, 0), Some(1000)).is_err());
                assert!(GuestSlots::open(&spec_of(&path, 0), Some(65534)).is_ok());
            }
            Err(e) => eprintln!("SKIP owner check (chown needs root): {e}"),
        }
        let _ = std::fs::remove_file(&link);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn fields_of_features_not_negotiated_are_ignored() {
        use pvsched_proto::SlotMemory;
        let path = file("features", 0x2000);
        let mut all = GuestSlots::open(&spec_of(&path, feature::ALL_V1), None).unwrap();
        let mut none = GuestSlots::open(&spec_of(&path, 0), None).unwrap();
        let g = GuestSlot::new(&all.mem, 0x1000);
        // A request, with a vCPU hint naming a vCPU the VM does not have.
        g.store_u32(off::REQUEST, Reason::RtTask.bit());
        g.store_u32(off::HINT_VCPU, 9);
        g.store_u32(off::HINT_KIND, 1);
        g.store_u32(off::SEQ, 1);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        all.poll(0, 1, &mut a);
        none.poll(0, 1, &mut b);
        assert_eq!(a, [Event::new(VcpuKey::new(0, 0), VcpuEvent::SlotInvalid)]);
        assert_eq!(
            b,
            [Event::new(
                VcpuKey::new(0, 0),
                VcpuEvent::Request(pvsched_proto::Reasons::NONE.with(Reason::RtTask))
            )],
            "the hint is not negotiated: ignored"
        );
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_truncated_memory_file_is_survived() {
        use pvsched_proto::SlotMemory;
        let path = file("truncated", 0x4000);
        let mut s = GuestSlots::open(&spec_of(&path, 0), None).unwrap();
        let mut out = Vec::new();
        s.poll(0, 1, &mut out);
        assert_eq!(out.len(), 1);
        assert!(!s.truncated());
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(0)
            .unwrap();
        // Without the guard, this read dies of SIGBUS.
        let g = GuestSlot::new(&s.mem, 0x1000);
        assert_eq!(g.load_u32(off::SEQ), 0);
        assert!(s.truncated());
        out.clear();
        s.poll(0, 1, &mut out);
        assert!(
            out.is_empty(),
            "nothing read from a truncated file: {out:?}"
        );
        let _ = s.publish(0, BoostState::Disabled);
        let _ = std::fs::remove_file(&path);
    }
}
