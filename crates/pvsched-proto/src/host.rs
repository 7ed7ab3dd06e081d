//! The host side: decoding a guest-written slot and publishing the boost state.
//!
//! Every byte of the guest half is hostile: [`decode`] never panics, never trusts a length or
//! a vCPU id, and returns a typed snapshot or a typed error for any input.

use crate::abi::{feature, hint_kind, off, BoostState, Reason, Reasons, SLOT_SIZE};
use crate::SlotMemory;
use core::fmt;

/// Largest nesting depth reported; deeper values are clamped to it.
pub const MAX_REPORTED_DEPTH: u8 = 64;

/// A vCPU named by the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VcpuHint {
    /// vCPU index, checked against the VM's vCPU count.
    pub vcpu: u32,
    /// What the hint means.
    pub kind: HintKind,
}

/// Kinds of vCPU hints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HintKind {
    /// The named vCPU holds a lock the guest waits for.
    LockHolder,
    /// The named vCPU was sent an IPI.
    IpiTarget,
}

/// The guest half of a slot, validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SlotSnapshot {
    /// The guest's update counter.
    pub seq: u32,
    /// Requested reasons.
    pub reasons: Reasons,
    /// Nesting depth per reason of version 1 (clamped to [`MAX_REPORTED_DEPTH`]).
    pub depth: [u8; 5],
    /// Next latency-critical deadline, guest TSC (only with the deadline-hint feature).
    pub deadline_tsc: Option<u64>,
    /// vCPU hint (only with the vCPU-hint feature).
    pub hint: Option<VcpuHint>,
    /// Guest TSC read before its last doorbell (only with the clock-stamp feature).
    pub stamp_tsc: Option<u64>,
}

/// Why a slot's guest half was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DecodeError {
    /// Fewer bytes than a slot.
    Short {
        /// Bytes given.
        len: usize,
    },
    /// `request` has bits no version-1 reason uses.
    UnknownReasons {
        /// The offending bits.
        bits: u32,
    },
    /// The hint names a vCPU the VM does not have.
    HintOutOfRange {
        /// Index named (hint value − 1).
        vcpu: u32,
        /// vCPUs in the VM.
        vcpus: u32,
    },
    /// The hint kind is not defined.
    UnknownHintKind {
        /// The value found.
        kind: u32,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Short { len } => write!(f, "slot has {len} bytes, needs {SLOT_SIZE}"),
            DecodeError::UnknownReasons { bits } => {
                write!(f, "request has unknown reason bits {bits:#x}")
            }
            DecodeError::HintOutOfRange { vcpu, vcpus } => {
                write!(f, "hint names vCPU {vcpu}, the VM has {vcpus}")
            }
            DecodeError::UnknownHintKind { kind } => write!(f, "unknown hint kind {kind}"),
        }
    }
}

impl core::error::Error for DecodeError {}

/// The little-endian `u32` at `off` of `b` (the caller checked the length).
pub(crate) fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(w)
}

/// The little-endian `u64` at `off` of `b` (the caller checked the length).
pub(crate) fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(w)
}

/// Decodes the guest half of a slot (`bytes` is a copy of the whole slot) for a VM with
/// `vcpus` vCPUs that negotiated `features`. Fields of features not negotiated are ignored.
pub fn decode(bytes: &[u8], vcpus: u32, features: u32) -> Result<SlotSnapshot, DecodeError> {
    if bytes.len() < SLOT_SIZE {
        return Err(DecodeError::Short { len: bytes.len() });
    }
    let request = u32_at(bytes, off::REQUEST);
    let reasons = Reasons::from_bits(request).ok_or(DecodeError::UnknownReasons {
        bits: request & !Reasons::KNOWN_BITS,
    })?;
    let mut depth = [0u8; 5];
    for r in Reason::ALL {
        depth[r.index()] = bytes[off::DEPTH + r.index()].min(MAX_REPORTED_DEPTH);
    }
    let deadline_tsc = match u64_at(bytes, off::DEADLINE_TSC) {
        0 => None,
        t if features & feature::DEADLINE_HINT != 0 => Some(t),
        _ => None,
    };
    let hint = if features & feature::VCPU_HINT != 0 {
        decode_hint(
            u32_at(bytes, off::HINT_VCPU),
            u32_at(bytes, off::HINT_KIND),
            vcpus,
        )?
    } else {
        None
    };
    let stamp_tsc = match u64_at(bytes, off::STAMP_TSC) {
        t if t != 0 && features & feature::CLOCK_STAMP != 0 => Some(t),
        _ => None,
    };
    Ok(SlotSnapshot {
        seq: u32_at(bytes, off::SEQ),
        reasons,
        depth,
        deadline_tsc,
        hint,
        stamp_tsc,
    })
}

fn decode_hint(vcpu_plus_one: u32, kind: u32, vcpus: u32) -> Result<Option<VcpuHint>, DecodeError> {
    let kind = match kind {
        hint_kind::NONE => return Ok(None),
        hint_kind::LOCK_HOLDER => HintKind::LockHolder,
        hint_kind::IPI_TARGET => HintKind::IpiTarget,
        k => return Err(DecodeError::UnknownHintKind { kind: k }),
    };
    match vcpu_plus_one.checked_sub(1) {
        None => Ok(None),
        Some(v) if v < vcpus => Ok(Some(VcpuHint { vcpu: v, kind })),
        Some(v) => Err(DecodeError::HintOutOfRange { vcpu: v, vcpus }),
    }
}

/// The host half of a slot: what the host tells the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostHalf {
    /// Boost state.
    pub state: Option<BoostState>,
    /// Id of the policy driver in charge.
    pub policy: u32,
    /// Remaining budget, ns.
    pub budget_ns: u64,
    /// Boosts granted.
    pub boosts: u64,
    /// Throttles.
    pub throttles: u64,
    /// Guest `seq` last acted on.
    pub host_seq: u32,
}

impl HostHalf {
    /// Writes the informational fields (everything but `state`, which only
    /// [`publish_state`] writes).
    pub fn write_info(&self, mem: &impl SlotMemory) {
        mem.store_u32(off::POLICY, self.policy);
        mem.store_u64(off::BUDGET_NS, self.budget_ns);
        mem.store_u64(off::BOOSTS, self.boosts);
        mem.store_u64(off::THROTTLES, self.throttles);
        mem.store_u32(off::HOST_SEQ, self.host_seq);
    }
}

/// Publishes `state` and returns the guest's `request` read *after* a full fence: the host
/// half of the handshake. A request the guest made without ringing (because it saw the old
/// state) is visible in the returned value, so the caller re-decides instead of losing it.
pub fn publish_state(mem: &impl SlotMemory, state: BoostState) -> u32 {
    mem.store_u32(off::STATE, state as u32);
    mem.fence();
    mem.load_u32(off::REQUEST)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::Slot;

    fn bytes(s: &Slot) -> [u8; SLOT_SIZE] {
        let mut b = [0u8; SLOT_SIZE];
        b[off::SEQ..off::SEQ + 4].copy_from_slice(&s.seq.to_le_bytes());
        b[off::REQUEST..off::REQUEST + 4].copy_from_slice(&s.request.to_le_bytes());
        b[off::DEPTH..off::DEPTH + 8].copy_from_slice(&s.depth);
        b[off::DEADLINE_TSC..off::DEADLINE_TSC + 8].copy_from_slice(&s.deadline_tsc.to_le_bytes());
        b[off::HINT_VCPU..off::HINT_VCPU + 4].copy_from_slice(&s.hint_vcpu.to_le_bytes());
        b[off::HINT_KIND..off::HINT_KIND + 4].copy_from_slice(&s.hint_kind.to_le_bytes());
        b[off::STAMP_TSC..off::STAMP_TSC + 8].copy_from_slice(&s.stamp_tsc.to_le_bytes());
        b
    }

    #[test]
    fn the_clock_stamp_is_read_only_when_negotiated() {
        let s = Slot {
            stamp_tsc: 1234,
            ..Slot::default()
        };
        let all = decode(&bytes(&s), 1, feature::ALL_V1).unwrap();
        assert_eq!(all.stamp_tsc, Some(1234));
        let without = decode(&bytes(&s), 1, feature::ALL_V1 & !feature::CLOCK_STAMP).unwrap();
        assert_eq!(without.stamp_tsc, None);
        let zero = decode(&bytes(&Slot::default()), 1, feature::ALL_V1).unwrap();
        assert_eq!(zero.stamp_tsc, None);
    }

    #[test]
    fn valid_slot_decodes() {
        let s = Slot {
            seq: 7,
            request: Reason::Irq.bit() | Reason::RtTask.bit(),
            depth: [1, 0, 0, 2, 0, 0, 0, 0],
            deadline_tsc: 99,
            hint_vcpu: 2,
            hint_kind: hint_kind::IPI_TARGET,
            ..Slot::default()
        };
        let snap = decode(&bytes(&s), 4, feature::ALL_V1).unwrap();
        assert_eq!(snap.seq, 7);
        assert!(snap.reasons.contains(Reason::Irq) && snap.reasons.contains(Reason::RtTask));
        assert_eq!(snap.depth, [1, 0, 0, 2, 0]);
        assert_eq!(snap.deadline_tsc, Some(99));
        assert_eq!(
            snap.hint,
            Some(VcpuHint {
                vcpu: 1,
                kind: HintKind::IpiTarget
            })
        );
    }

    #[test]
    fn features_not_negotiated_are_ignored() {
        let s = Slot {
            deadline_tsc: 99,
            hint_vcpu: 200,
            hint_kind: 77,
            ..Slot::default()
        };
        let snap = decode(&bytes(&s), 4, 0).unwrap();
        assert_eq!((snap.deadline_tsc, snap.hint), (None, None));
    }

    #[test]
    fn hostile_fields_are_typed_errors() {
        let b = bytes(&Slot {
            request: 0x8000_0001,
            ..Slot::default()
        });
        assert_eq!(
            decode(&b, 2, 0),
            Err(DecodeError::UnknownReasons { bits: 0x8000_0000 })
        );
        let b = bytes(&Slot {
            hint_vcpu: 9,
            hint_kind: hint_kind::LOCK_HOLDER,
            ..Slot::default()
        });
        assert_eq!(
            decode(&b, 2, feature::VCPU_HINT),
            Err(DecodeError::HintOutOfRange { vcpu: 8, vcpus: 2 })
        );
        let b = bytes(&Slot {
            hint_vcpu: 1,
            hint_kind: 3,
            ..Slot::default()
        });
        assert_eq!(
            decode(&b, 2, feature::VCPU_HINT),
            Err(DecodeError::UnknownHintKind { kind: 3 })
        );
        assert_eq!(
            decode(&[0u8; 10], 2, 0),
            Err(DecodeError::Short { len: 10 })
        );
    }

    #[test]
    fn depth_is_clamped() {
        let b = bytes(&Slot {
            depth: [255; 8],
            ..Slot::default()
        });
        assert_eq!(decode(&b, 1, 0).unwrap().depth, [MAX_REPORTED_DEPTH; 5]);
    }
}
