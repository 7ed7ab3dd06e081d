//! The pvsched protocol device of the reference VMM (`docs/protocol.md`).
//!
//! - **Discovery**: CPUID leaves 0x4000_0100/0x4000_0101 on every vCPU (the second one names
//!   that vCPU's doorbell port) and the identification MSR.
//! - **Negotiation** and **slot registration**: MSRs the guest accesses with `rdmsr`/`wrmsr`,
//!   turned into exits to this VMM by an MSR filter (`KVM_X86_SET_MSR_FILTER`,
//!   `KVM_CAP_X86_USER_SPACE_MSR`); an invalid access gets a #GP in the guest.
//! - **Doorbells**: one I/O port per vCPU bound to an ioeventfd; a guest `out` never leaves
//!   the kernel.
//! - **Events**: [`PvPoller`] turns doorbells, slot changes and MSR activity into
//!   [`PvEvent`]s for the host engine.
//!
//! Every value the guest writes (MSR data, slot bytes, doorbells on another vCPU's port) is
//! treated as hostile: validated, never trusted for lengths or vCPU ids, and at worst disables
//! boosting for that vCPU.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};
pub use pvsched_host::slot::{GuestPage, GuestSlot};
use pvsched_proto::abi::{
    self, BoostState, CPUID_LEAF_INFO, CPUID_LEAF_SIGNATURE, CPUID_SIGNATURE, MSR_COUNT,
    SLOT_ENABLE, SLOT_SIZE,
};
use pvsched_proto::host::{publish_state, HostHalf};
use pvsched_proto::negotiate::{self, Negotiated};
use pvsched_proto::v3::{self, AppliedState, GuestArea, PageError};
use pvsched_proto::{decode, DecodeError, SlotMemory, SlotSnapshot};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::Duration;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// First doorbell port of the reference VMM: vCPU `i` rings `DOORBELL_BASE + i`.
pub const DOORBELL_BASE: u16 = 0x510;

/// What the host offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PvConfig {
    /// Versions bitmap (bit `v` = version `v`).
    pub versions: u16,
    /// Feature bits.
    pub features: u32,
    /// First pvsched MSR.
    pub msr_base: u32,
    /// First doorbell port.
    pub doorbell_base: u16,
}

impl Default for PvConfig {
    fn default() -> Self {
        PvConfig {
            versions: abi::VERSIONS_V1 | 1 << v3::PVSCHED_VERSION_V3,
            features: abi::feature::ALL_V1,
            msr_base: abi::MSR_BASE_DEFAULT,
            doorbell_base: DOORBELL_BASE,
        }
    }
}

/// Something the protocol device saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PvEvent {
    /// A guest negotiated (`None`: no common version, boosting stays off).
    Negotiated {
        /// vCPU that wrote the offer.
        vcpu: usize,
        /// The guest's offer.
        offer: u64,
        /// The outcome.
        result: Option<Negotiated>,
    },
    /// A vCPU registered its slot.
    SlotRegistered {
        /// vCPU.
        vcpu: usize,
        /// Guest-physical address of the slot.
        gpa: u64,
    },
    /// A vCPU unregistered its slot.
    SlotUnregistered {
        /// vCPU.
        vcpu: usize,
    },
    /// A v3 page was negotiated at its registration (registered only when enabled; the
    /// guest reads the status from its page).
    PageNegotiated {
        /// vCPU.
        vcpu: usize,
        /// Guest-physical address of the page.
        gpa: u64,
        /// The status written into the page.
        status: v3::Status,
    },
    /// A registration was refused (the guest got a #GP).
    SlotRejected {
        /// vCPU.
        vcpu: usize,
        /// The value written.
        value: u64,
        /// Why.
        reason: &'static str,
    },
    /// The vCPU's doorbell rang `count` times since last looked at.
    Doorbell {
        /// vCPU.
        vcpu: usize,
        /// Rings.
        count: u64,
    },
    /// The vCPU's slot changed (its `seq` moved).
    RequestChanged {
        /// vCPU.
        vcpu: usize,
        /// The decoded guest half.
        snapshot: SlotSnapshot,
    },
    /// The vCPU's slot holds something invalid.
    BadSlot {
        /// vCPU.
        vcpu: usize,
        /// The decoding error.
        error: DecodeError,
    },
}

/// The protocol device of one VM.
#[derive(Debug)]
pub struct PvDevice {
    cfg: PvConfig,
    mem: GuestMemoryMmap,
    mem_size: u64,
    negotiated: Mutex<Option<Negotiated>>,
    slots: Vec<AtomicU64>,
    doorbells: Vec<EventFd>,
    events: Mutex<mpsc::Sender<PvEvent>>,
}

/// Errors of creating the device.
#[derive(Debug, thiserror::Error)]
pub enum PvError {
    /// An eventfd could not be created.
    #[error("cannot create a doorbell eventfd")]
    EventFd(#[source] std::io::Error),
    /// The doorbell ports do not fit the I/O space.
    #[error("doorbell ports {base:#x}+{vcpus} exceed the I/O port space")]
    Ports {
        /// First port.
        base: u16,
        /// vCPUs.
        vcpus: usize,
    },
}

impl PvDevice {
    /// A device for `vcpus` vCPUs over guest memory `mem` (one region at 0 of `mem_size`
    /// bytes). Returns it and the receiving end of its MSR event stream (used by
    /// [`PvPoller`]).
    pub fn new(
        cfg: PvConfig,
        mem: GuestMemoryMmap,
        mem_size: u64,
        vcpus: usize,
    ) -> Result<(PvDevice, mpsc::Receiver<PvEvent>), PvError> {
        if cfg.doorbell_base as usize + vcpus > 0x1_0000 {
            return Err(PvError::Ports {
                base: cfg.doorbell_base,
                vcpus,
            });
        }
        let doorbells = (0..vcpus)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).map_err(PvError::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        let (tx, rx) = mpsc::channel();
        Ok((
            PvDevice {
                cfg,
                mem,
                mem_size,
                negotiated: Mutex::new(None),
                slots: (0..vcpus).map(|_| AtomicU64::new(0)).collect(),
                doorbells,
                events: Mutex::new(tx),
            },
            rx,
        ))
    }

    /// The host's offer.
    pub fn config(&self) -> PvConfig {
        self.cfg
    }

    /// Number of vCPUs.
    pub fn vcpus(&self) -> usize {
        self.slots.len()
    }

    /// vCPU `vcpu`'s doorbell port.
    pub fn doorbell_port(&self, vcpu: usize) -> u16 {
        self.cfg.doorbell_base + vcpu as u16
    }

    /// vCPU `vcpu`'s doorbell eventfd (for registration as an ioeventfd).
    pub fn doorbell(&self, vcpu: usize) -> &EventFd {
        &self.doorbells[vcpu]
    }

    /// Adds the discovery leaves for vCPU `vcpu` to its CPUID.
    pub fn add_cpuid(&self, cpuid: &mut CpuId, vcpu: usize) {
        let sig = |i: usize| u32::from_le_bytes(CPUID_SIGNATURE[i..i + 4].try_into().unwrap());
        let entries = [
            kvm_cpuid_entry2 {
                function: CPUID_LEAF_SIGNATURE,
                eax: CPUID_LEAF_INFO,
                ebx: sig(0),
                ecx: sig(4),
                edx: sig(8),
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: CPUID_LEAF_INFO,
                eax: self.cfg.msr_base,
                ebx: self.cfg.versions as u32,
                ecx: self.cfg.features,
                edx: self.doorbell_port(vcpu) as u32,
                ..Default::default()
            },
        ];
        for e in entries {
            // KVM's table has room (KVM_MAX_CPUID_ENTRIES); a full table just means the
            // guest will not discover pvsched.
            let _ = cpuid.push(e);
        }
    }

    /// True when `index` is one of the device's MSRs.
    pub fn owns_msr(&self, index: u32) -> bool {
        index.wrapping_sub(self.cfg.msr_base) < MSR_COUNT
    }

    fn emit(&self, e: PvEvent) {
        // A receiver that went away only means nobody listens any more.
        let _ = self
            .events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(e);
    }

    /// The negotiated version and features, if any.
    pub fn negotiated(&self) -> Option<Negotiated> {
        *self.negotiated.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Handles `rdmsr` of `index` by vCPU `vcpu`: `None` means #GP.
    pub fn rdmsr(&self, vcpu: usize, index: u32) -> Option<u64> {
        match index.checked_sub(self.cfg.msr_base)? {
            abi::MSR_ID => Some(abi::ID_MAGIC),
            abi::MSR_NEGOTIATE => Some(negotiate::answer(self.negotiated())),
            abi::MSR_SLOT => Some(self.slots.get(vcpu)?.load(Ordering::Acquire)),
            _ => None,
        }
    }

    /// Handles `wrmsr` of `value` to `index` by vCPU `vcpu`: `false` means #GP.
    pub fn wrmsr(&self, vcpu: usize, index: u32, value: u64) -> bool {
        let Some(slot) = self.slots.get(vcpu) else {
            return false;
        };
        match index.wrapping_sub(self.cfg.msr_base) {
            abi::MSR_NEGOTIATE => {
                let result = negotiate::negotiate(self.cfg.versions, self.cfg.features, value);
                let before = std::mem::replace(
                    &mut *self.negotiated.lock().unwrap_or_else(|p| p.into_inner()),
                    result,
                );
                let version = |n: Option<Negotiated>| n.map(|n| n.version);
                if result.is_none() || version(before).is_some_and(|v| Some(v) != version(result)) {
                    // A failed (re)negotiation turns the protocol off for every vCPU; one that
                    // changes the version drops every registration (a v1 slot is not a v3
                    // page).
                    for s in &self.slots {
                        s.store(0, Ordering::Release);
                    }
                }
                self.emit(PvEvent::Negotiated {
                    vcpu,
                    offer: value,
                    result,
                });
                true
            }
            abi::MSR_SLOT => match self.check_slot(value) {
                Ok(0) => {
                    slot.store(0, Ordering::Release);
                    self.emit(PvEvent::SlotUnregistered { vcpu });
                    true
                }
                Ok(gpa) if self.is_v3() => match self.negotiate_page(gpa) {
                    Some(status) => {
                        if status == v3::Status::Enabled {
                            slot.store(gpa, Ordering::Release);
                            self.emit(PvEvent::SlotRegistered { vcpu, gpa });
                        } else {
                            slot.store(0, Ordering::Release);
                        }
                        self.emit(PvEvent::PageNegotiated { vcpu, gpa, status });
                        true
                    }
                    None => {
                        self.emit(PvEvent::SlotRejected {
                            vcpu,
                            value,
                            reason: "page not readable",
                        });
                        false
                    }
                },
                Ok(gpa) => {
                    // Host half starts out `Normal`, counters zero.
                    let s = GuestSlot::new(&self.mem, gpa);
                    HostHalf::default().write_info(&s);
                    publish_state(&s, BoostState::Normal);
                    slot.store(gpa, Ordering::Release);
                    self.emit(PvEvent::SlotRegistered { vcpu, gpa });
                    true
                }
                Err(reason) => {
                    self.emit(PvEvent::SlotRejected {
                        vcpu,
                        value,
                        reason,
                    });
                    false
                }
            },
            // The identification MSR is read-only.
            _ => false,
        }
    }

    /// Validates a slot registration value; `Ok(0)` unregisters.
    fn check_slot(&self, value: u64) -> Result<u64, &'static str> {
        if value == 0 {
            return Ok(0);
        }
        if self.negotiated().is_none() {
            return Err("no protocol version negotiated");
        }
        if value & SLOT_ENABLE == 0 {
            return Err("enable bit clear with a non-zero address");
        }
        let gpa = value & !SLOT_ENABLE;
        let size = if self.is_v3() {
            v3::PAGE_SIZE as u64
        } else {
            SLOT_SIZE as u64
        };
        if !gpa.is_multiple_of(size) {
            return Err(if self.is_v3() {
                "v3 page not aligned to 4096 bytes"
            } else {
                "slot not aligned to 128 bytes"
            });
        }
        match gpa.checked_add(size) {
            Some(end) if gpa != 0 && end <= self.mem_size => Ok(gpa),
            _ => Err("slot outside guest RAM"),
        }
    }

    /// True when the guest negotiated the v3 page (version 3) rather than protocol v1.
    pub fn is_v3(&self) -> bool {
        self.negotiated()
            .is_some_and(|n| n.version == v3::PVSCHED_VERSION_V3)
    }

    /// Negotiates the v3 page at `gpa` (validated) and writes the answer into it. `None`
    /// when guest memory fails.
    fn negotiate_page(&self, gpa: u64) -> Option<v3::Status> {
        GuestPage::new(&self.mem, gpa).negotiate()
    }

    /// vCPU `vcpu`'s enabled v3 page, if any.
    fn page(&self, vcpu: usize) -> Option<GuestPage<'_>> {
        if !self.is_v3() {
            return None;
        }
        Some(GuestPage::new(&self.mem, self.slot_gpa(vcpu)?))
    }

    /// The three guest words of vCPU `vcpu`'s v3 page (task intent, critical sections,
    /// acknowledgement), each loaded atomically; `None` without an enabled page.
    pub fn v3_words(&self, vcpu: usize) -> Option<[u64; 3]> {
        Some(self.page(vcpu)?.words())
    }

    /// Decodes vCPU `vcpu`'s v3 guest area (its reserved bytes checked too): `Ok(None)`
    /// without an enabled page.
    pub fn v3_area(&self, vcpu: usize) -> Result<Option<GuestArea>, PageError> {
        self.page(vcpu).map(|p| p.area()).transpose()
    }

    /// Publishes `applied` and `ticket` in vCPU `vcpu`'s v3 page and returns its guest area
    /// read after a full fence (`None` without an enabled page).
    pub fn publish_v3(
        &self,
        vcpu: usize,
        applied: AppliedState,
        ticket: u64,
    ) -> Option<Result<GuestArea, PageError>> {
        Some(self.page(vcpu)?.publish(applied, ticket))
    }

    /// Guest-physical address of vCPU `vcpu`'s slot, if registered.
    pub fn slot_gpa(&self, vcpu: usize) -> Option<u64> {
        match self.slots.get(vcpu)?.load(Ordering::Acquire) {
            0 => None,
            gpa => Some(gpa),
        }
    }

    /// vCPU `vcpu`'s slot `seq` (one atomic load: a cheap "did it change?"), if it has a slot.
    pub fn seq(&self, vcpu: usize) -> Option<u32> {
        if self.is_v3() {
            return None;
        }
        let gpa = self.slot_gpa(vcpu)?;
        Some(GuestSlot::new(&self.mem, gpa).load_u32(abi::off::SEQ))
    }

    /// Decodes vCPU `vcpu`'s slot: `Ok(None)` when it has none.
    pub fn snapshot(&self, vcpu: usize) -> Result<Option<SlotSnapshot>, DecodeError> {
        let Some(gpa) = self.slot_gpa(vcpu).filter(|_| !self.is_v3()) else {
            return Ok(None);
        };
        let features = self.negotiated().map_or(0, |n| n.features);
        let mut bytes = [0u8; SLOT_SIZE];
        if self.mem.read_slice(&mut bytes, GuestAddress(gpa)).is_err() {
            return Err(DecodeError::Short { len: 0 });
        }
        decode(&bytes, self.vcpus() as u32, features).map(Some)
    }

    /// Publishes `state` in vCPU `vcpu`'s slot and returns the guest's request read after a
    /// full fence (`None` when the vCPU has no slot). See [`publish_state`].
    pub fn publish(&self, vcpu: usize, state: BoostState) -> Option<u32> {
        if self.is_v3() {
            return None;
        }
        let gpa = self.slot_gpa(vcpu)?;
        Some(publish_state(&GuestSlot::new(&self.mem, gpa), state))
    }

    /// Writes the informational host fields of vCPU `vcpu`'s slot.
    pub fn write_host_info(&self, vcpu: usize, info: &HostHalf) {
        if let Some(gpa) = self.slot_gpa(vcpu).filter(|_| !self.is_v3()) {
            info.write_info(&GuestSlot::new(&self.mem, gpa));
        }
    }

    /// Reads and resets vCPU `vcpu`'s doorbell count.
    pub fn take_doorbells(&self, vcpu: usize) -> u64 {
        self.doorbells
            .get(vcpu)
            .and_then(|e| e.read().ok())
            .unwrap_or(0)
    }
}

/// Waits for doorbells and slot changes and reports them as [`PvEvent`]s.
pub struct PvPoller {
    epoll: Epoll,
    msr_events: mpsc::Receiver<PvEvent>,
    seen: Vec<Seen>,
    ready: Vec<EpollEvent>,
}

/// What the poller last saw in a vCPU's slot.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Seen {
    NoSlot,
    Seq(u32),
    Bad,
}

impl PvPoller {
    /// A poller over `device`'s doorbells and MSR events (the receiver from
    /// [`PvDevice::new`]).
    pub fn new(device: &PvDevice, msr_events: mpsc::Receiver<PvEvent>) -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        for (i, e) in device.doorbells.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                e.as_raw_fd(),
                EpollEvent::new(EventSet::IN, i as u64),
            )?;
        }
        Ok(PvPoller {
            epoll,
            msr_events,
            seen: vec![Seen::NoSlot; device.vcpus()],
            ready: vec![EpollEvent::default(); device.vcpus().max(1)],
        })
    }

    /// The poller's epoll fd: readable when a doorbell is pending, so a caller can wait for
    /// it together with its own sources and then call [`PvPoller::poll`] with a zero timeout.
    pub fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.epoll.as_raw_fd()
    }

    /// Waits up to `timeout` for a doorbell, then appends what happened to `out`: MSR events,
    /// doorbells, and every slot whose `seq` moved (lazy requests included) or that no longer
    /// decodes.
    pub fn poll(
        &mut self,
        device: &PvDevice,
        timeout: Duration,
        out: &mut Vec<PvEvent>,
    ) -> std::io::Result<()> {
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        let n = match self.epoll.wait(ms, &mut self.ready) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(e),
        };
        out.extend(self.msr_events.try_iter());
        for ev in &self.ready[..n] {
            let vcpu = ev.data() as usize;
            let count = device.take_doorbells(vcpu);
            if count > 0 {
                out.push(PvEvent::Doorbell { vcpu, count });
            }
        }
        for (vcpu, seen) in self.seen.iter_mut().enumerate() {
            match device.snapshot(vcpu) {
                Ok(Some(s)) if *seen != Seen::Seq(s.seq) => {
                    *seen = Seen::Seq(s.seq);
                    out.push(PvEvent::RequestChanged { vcpu, snapshot: s });
                }
                Ok(Some(_)) => {}
                Ok(None) => *seen = Seen::NoSlot,
                Err(error) if *seen != Seen::Bad => {
                    *seen = Seen::Bad;
                    out.push(PvEvent::BadSlot { vcpu, error });
                }
                Err(_) => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pvsched_proto::abi::{feature, off, Reason, MSR_BASE_DEFAULT as B, VERSIONS_V1};
    use pvsched_proto::negotiate::offer;

    const MEM: u64 = 0x10_0000;

    fn device(vcpus: usize) -> (PvDevice, mpsc::Receiver<PvEvent>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
        PvDevice::new(PvConfig::default(), mem, MEM, vcpus).unwrap()
    }

    #[test]
    fn negotiation_then_registration() {
        let (d, rx) = device(2);
        assert_eq!(d.rdmsr(0, B), Some(abi::ID_MAGIC));
        assert_eq!(d.rdmsr(0, B + 1), Some(0), "nothing negotiated yet");
        assert!(
            !d.wrmsr(0, B + 2, 0x1000 | 1),
            "registration before negotiation"
        );
        assert!(d.wrmsr(0, B + 1, offer(VERSIONS_V1, feature::ALL_V1)));
        let n = negotiate::decode_answer(d.rdmsr(1, B + 1).unwrap()).unwrap();
        assert_eq!((n.version, n.features), (1, feature::ALL_V1));
        assert!(d.wrmsr(1, B + 2, 0x1000 | 1));
        assert_eq!(d.slot_gpa(1), Some(0x1000));
        assert_eq!(d.rdmsr(1, B + 2), Some(0x1000));
        assert_eq!(d.slot_gpa(0), None);
        // The host half starts out Normal.
        let state: u32 = d
            .mem
            .read_obj(GuestAddress(0x1000 + off::STATE as u64))
            .unwrap();
        assert_eq!(state, BoostState::Normal as u32);
        let events: Vec<_> = rx.try_iter().collect();
        assert!(matches!(events[0], PvEvent::SlotRejected { vcpu: 0, .. }));
        assert!(matches!(
            events[1],
            PvEvent::Negotiated {
                result: Some(_),
                ..
            }
        ));
        assert_eq!(
            events[2],
            PvEvent::SlotRegistered {
                vcpu: 1,
                gpa: 0x1000
            }
        );
        assert!(d.wrmsr(1, B + 2, 0));
        assert_eq!(d.slot_gpa(1), None);
    }

    #[test]
    fn hostile_registrations_are_refused() {
        let (d, _rx) = device(1);
        assert!(d.wrmsr(0, B + 1, offer(VERSIONS_V1, 0)));
        for bad in [
            0x1000u64,      // enable bit clear
            0x1040 | 1,     // misaligned
            MEM | 1,        // past RAM
            (MEM - 64) | 1, // straddles the end
            u64::MAX,       // wraps
            1,              // address 0
        ] {
            assert!(!d.wrmsr(0, B + 2, bad), "{bad:#x} accepted");
        }
        assert!(!d.wrmsr(0, B, 5), "ID MSR is read-only");
        assert!(!d.wrmsr(7, B + 2, 0x1000 | 1), "no such vCPU");
        assert_eq!(d.rdmsr(0, B + 3), None);
        assert_eq!(d.rdmsr(0, B - 1), None);
        assert_eq!(d.rdmsr(9, B + 2), None);
    }

    #[test]
    fn failed_negotiation_turns_the_protocol_off() {
        let (d, rx) = device(1);
        assert!(d.wrmsr(0, B + 1, offer(VERSIONS_V1, 0)));
        assert!(d.wrmsr(0, B + 2, 0x2000 | 1));
        assert!(
            d.wrmsr(0, B + 1, offer(1 << 5, 0)),
            "offer accepted, answer: none"
        );
        assert_eq!(d.rdmsr(0, B + 1), Some(0));
        assert_eq!(d.slot_gpa(0), None);
        let last = rx.try_iter().last().unwrap();
        assert!(matches!(last, PvEvent::Negotiated { result: None, .. }));
    }

    #[test]
    fn publish_reads_the_request_back_and_snapshot_decodes() {
        let (d, _rx) = device(1);
        assert!(d.wrmsr(0, B + 1, offer(VERSIONS_V1, feature::ALL_V1)));
        assert!(d.wrmsr(0, B + 2, 0x3000 | 1));
        let s = GuestSlot::new(&d.mem, 0x3000);
        s.store_u32(off::REQUEST, Reason::Irq.bit());
        s.store_u32(off::SEQ, 5);
        assert_eq!(d.publish(0, BoostState::Boosted), Some(Reason::Irq.bit()));
        assert_eq!(s.load_u32(off::STATE), BoostState::Boosted as u32);
        let snap = d.snapshot(0).unwrap().unwrap();
        assert_eq!(snap.seq, 5);
        assert!(snap.reasons.contains(Reason::Irq));
        s.store_u32(off::REQUEST, 0xdead_0000);
        assert!(matches!(
            d.snapshot(0),
            Err(DecodeError::UnknownReasons { .. })
        ));
    }

    #[test]
    fn poller_reports_doorbells_and_changes() {
        let (d, rx) = device(2);
        let mut p = PvPoller::new(&d, rx).unwrap();
        assert!(d.wrmsr(0, B + 1, offer(VERSIONS_V1, 0)));
        assert!(d.wrmsr(1, B + 2, 0x4000 | 1));
        d.doorbell(1).write(3).unwrap();
        let mut out = Vec::new();
        p.poll(&d, Duration::from_millis(100), &mut out).unwrap();
        assert!(out.contains(&PvEvent::Doorbell { vcpu: 1, count: 3 }));
        assert!(out
            .iter()
            .any(|e| matches!(e, PvEvent::RequestChanged { vcpu: 1, .. })));
        // Nothing new: no events, returns after the timeout.
        out.clear();
        p.poll(&d, Duration::from_millis(1), &mut out).unwrap();
        assert!(out.is_empty(), "{out:?}");
        // Garbage in the slot is reported once, not every poll.
        GuestSlot::new(&d.mem, 0x4000).store_u32(off::REQUEST, u32::MAX);
        p.poll(&d, Duration::from_millis(1), &mut out).unwrap();
        p.poll(&d, Duration::from_millis(1), &mut out).unwrap();
        assert_eq!(out.len(), 1);
        assert!(matches!(out[0], PvEvent::BadSlot { vcpu: 1, .. }));
    }
}
