//! The ivshmem transport of protocol version 1 (`docs/protocol.md`, section 13): for guests
//! of a VMM that offers no pvsched CPUID leaves or MSRs but QEMU's standard
//! `ivshmem-doorbell` device, whose server (the pvsched daemon) hands out the shared memory
//! and the doorbell eventfd.
//!
//! The shared memory starts with a 4096-byte header: the host's offer in its first cache
//! line, the guest's answer in the second; slots (section 6) follow at `slot_offset`, one per
//! guest CPU, CPU `i` (QEMU's vCPU `i`) in slot `i`. The guest negotiates as a virtio driver
//! does: it reads the offer, applies the rule of section 4 itself, writes its answer and the
//! number of slots it uses, then sets `status`. The host validates the answer (it is written
//! by a possibly hostile guest) before it reads any slot.

use crate::abi::{feature, VERSIONS_V1, VERSION_1};

/// `"pvschedI"`, little-endian, at offset 0.
pub const MAGIC: u64 = u64::from_le_bytes(*b"pvschedI");
/// Transport version.
pub const TRANSPORT_VERSION: u32 = 1;
/// Header size; slots start at or after it.
pub const HEADER_SIZE: usize = 4096;
/// Shared-memory size the daemon hands out (a power of two, as a PCI BAR must be).
pub const SHM_SIZE: usize = 64 * 1024;
/// Slots the daemon offers (vCPUs 0 .. 63).
pub const SLOTS: u32 = 64;

/// Header offsets.
pub mod off {
    /// `u64` [`super::MAGIC`] (host).
    pub const MAGIC: usize = 0x00;
    /// `u32` transport version (host).
    pub const TRANSPORT: usize = 0x08;
    /// `u32` protocol versions offered, bit v = version v (host).
    pub const VERSIONS: usize = 0x0c;
    /// `u32` features offered (host).
    pub const FEATURES: usize = 0x10;
    /// `u32` slots available (host).
    pub const SLOTS: usize = 0x14;
    /// `u32` offset of slot 0, 128-byte aligned, ≥ the header size (host).
    pub const SLOT_OFFSET: usize = 0x18;
    /// `u32` ivshmem peer id whose vector is the doorbell (host).
    pub const PEER: usize = 0x1c;
    /// `u32` that peer's doorbell vector (host).
    pub const VECTOR: usize = 0x20;
    /// `u64` the guest's answer: version in bits 0–15, accepted features in bits 32–63.
    pub const ANSWER: usize = 0x40;
    /// `u32` slots the guest uses: its CPUs 0 .. n−1 (guest).
    pub const CPUS: usize = 0x48;
    /// `u32` 1: the answer is written and the slots are in use; 0: none (guest).
    pub const STATUS: usize = 0x4c;
}

/// The host's offer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offer {
    /// Versions bitmap.
    pub versions: u32,
    /// Feature bits.
    pub features: u32,
    /// Slots available.
    pub slots: u32,
    /// Offset of slot 0.
    pub slot_offset: u32,
    /// ivshmem peer id of the doorbell's owner.
    pub peer: u16,
    /// Its vector.
    pub vector: u16,
}

impl Offer {
    /// What the daemon offers: version 1 with the synchronous unboost, with `hints` deadline
    /// hints and the clock stamp (the daemon estimates the guest's TSC offset from the stamps;
    /// it reads no vCPU hints), [`SLOTS`] slots right after the header, the doorbell on
    /// `peer`'s vector 0.
    pub const fn daemon(peer: u16, hints: bool) -> Offer {
        Offer {
            versions: VERSIONS_V1 as u32,
            features: if hints {
                feature::UNBOOST_DOORBELL | feature::DEADLINE_HINT | feature::CLOCK_STAMP
            } else {
                feature::UNBOOST_DOORBELL
            },
            slots: SLOTS,
            slot_offset: HEADER_SIZE as u32,
            peer,
            vector: 0,
        }
    }

    /// Writes the host part of the header into `hdr` (at least 0x80 bytes; the guest part is
    /// zeroed).
    pub fn write(&self, hdr: &mut [u8]) {
        hdr[..0x80].fill(0);
        hdr[off::MAGIC..off::MAGIC + 8].copy_from_slice(&MAGIC.to_le_bytes());
        let mut put = |o: usize, v: u32| hdr[o..o + 4].copy_from_slice(&v.to_le_bytes());
        put(off::TRANSPORT, TRANSPORT_VERSION);
        put(off::VERSIONS, self.versions);
        put(off::FEATURES, self.features);
        put(off::SLOTS, self.slots);
        put(off::SLOT_OFFSET, self.slot_offset);
        put(off::PEER, self.peer as u32);
        put(off::VECTOR, self.vector as u32);
    }

    /// Offset of slot `i`.
    pub const fn slot(&self, i: u32) -> u64 {
        self.slot_offset as u64 + i as u64 * crate::abi::SLOT_SIZE as u64
    }
}

/// A valid answer of the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answer {
    /// Features in force.
    pub features: u32,
    /// Slots in use (guest CPUs 0 .. cpus−1).
    pub cpus: u32,
}

/// Why a guest's answer is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnswerError {
    /// `status` is neither 0 nor 1.
    Status(u32),
    /// The chosen version is not 1 (the only one offered) or bits 16–31 are set.
    Version(u64),
    /// Features outside the offer.
    Features(u32),
    /// No slot, or more than offered.
    Cpus(u32),
}

impl core::fmt::Display for AnswerError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            AnswerError::Status(s) => write!(f, "status {s} is neither 0 nor 1"),
            AnswerError::Version(a) => write!(f, "answer {a:#x} does not choose version 1"),
            AnswerError::Features(x) => write!(f, "features {x:#x} were not offered"),
            AnswerError::Cpus(n) => write!(f, "{n} slots in use is outside 1 ..= the offer"),
        }
    }
}

/// Reads the guest part of `hdr` (at least 0x50 bytes) against `offer`: `Ok(None)` while the
/// guest has not set `status` (or cleared it: its driver went away).
pub fn answer(hdr: &[u8], offer: &Offer) -> Result<Option<Answer>, AnswerError> {
    let u32_at = |o: usize| u32::from_le_bytes([hdr[o], hdr[o + 1], hdr[o + 2], hdr[o + 3]]);
    match u32_at(off::STATUS) {
        0 => return Ok(None),
        1 => {}
        s => return Err(AnswerError::Status(s)),
    }
    let a = u64::from(u32_at(off::ANSWER)) | u64::from(u32_at(off::ANSWER + 4)) << 32;
    let version = a & 0xffff_ffff;
    if version != u64::from(VERSION_1) || offer.versions & (1 << VERSION_1) == 0 {
        return Err(AnswerError::Version(a));
    }
    let features = (a >> 32) as u32;
    if features & !(offer.features & feature::ALL_V1) != 0 {
        return Err(AnswerError::Features(features));
    }
    let cpus = u32_at(off::CPUS);
    if cpus == 0 || cpus > offer.slots {
        return Err(AnswerError::Cpus(cpus));
    }
    Ok(Some(Answer { features, cpus }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> ([u8; 0x80], Offer) {
        let o = Offer::daemon(0, true);
        let mut h = [0xffu8; 0x80];
        o.write(&mut h);
        (h, o)
    }

    fn guest(h: &mut [u8], ans: u64, cpus: u32, status: u32) {
        h[off::ANSWER..off::ANSWER + 8].copy_from_slice(&ans.to_le_bytes());
        h[off::CPUS..off::CPUS + 4].copy_from_slice(&cpus.to_le_bytes());
        h[off::STATUS..off::STATUS + 4].copy_from_slice(&status.to_le_bytes());
    }

    #[test]
    fn the_offer_reads_as_the_guest_module_expects() {
        let (h, o) = header();
        // The C module compares the first word with 0x4964656863737670.
        assert_eq!(&h[..8], &0x4964_6568_6373_7670u64.to_le_bytes());
        assert_eq!(h[off::TRANSPORT], 1);
        assert_eq!(h[off::VERSIONS], 2);
        assert_eq!(
            h[off::FEATURES],
            (feature::UNBOOST_DOORBELL | feature::DEADLINE_HINT | feature::CLOCK_STAMP) as u8
        );
        assert_eq!(o.slot(2), 4096 + 256);
        assert!(o.slot(SLOTS) as usize <= SHM_SIZE);
        assert!(h[0x40..].iter().all(|&b| b == 0), "guest part zeroed");
        assert_eq!(answer(&h, &o), Ok(None));
    }

    #[test]
    fn answers_are_checked() {
        let (mut h, o) = header();
        let unboost = u64::from(feature::UNBOOST_DOORBELL) << 32;
        guest(&mut h, 1 | unboost, 2, 1);
        assert_eq!(
            answer(&h, &o),
            Ok(Some(Answer {
                features: feature::UNBOOST_DOORBELL,
                cpus: 2
            }))
        );
        guest(&mut h, 1, 2, 0);
        assert_eq!(answer(&h, &o), Ok(None), "status 0: not in use");
        guest(&mut h, 1, 2, 7);
        assert_eq!(answer(&h, &o), Err(AnswerError::Status(7)));
        guest(&mut h, 3, 2, 1);
        assert_eq!(answer(&h, &o), Err(AnswerError::Version(3)));
        guest(&mut h, 1 | 1 << 16, 2, 1);
        assert!(matches!(answer(&h, &o), Err(AnswerError::Version(_))));
        let hint = u64::from(feature::DEADLINE_HINT | feature::CLOCK_STAMP) << 32;
        guest(&mut h, 1 | hint, 2, 1);
        assert!(
            answer(&h, &o).is_ok(),
            "deadline hints with the clock stamp are offered"
        );
        let mut plain = [0u8; 0x80];
        let p = Offer::daemon(0, false);
        p.write(&mut plain);
        guest(&mut plain, 1 | hint, 2, 1);
        assert!(
            answer(&plain, &p).is_err(),
            "not offered to a driver that uses no hints"
        );
        let vcpu = u64::from(feature::VCPU_HINT) << 32;
        guest(&mut h, 1 | vcpu, 2, 1);
        assert_eq!(
            answer(&h, &o),
            Err(AnswerError::Features(feature::VCPU_HINT))
        );
        guest(&mut h, 1, 0, 1);
        assert_eq!(answer(&h, &o), Err(AnswerError::Cpus(0)));
        guest(&mut h, 1, SLOTS + 1, 1);
        assert_eq!(answer(&h, &o), Err(AnswerError::Cpus(SLOTS + 1)));
        guest(&mut h, 1, SLOTS, 1);
        assert!(answer(&h, &o).is_ok());
    }
}
