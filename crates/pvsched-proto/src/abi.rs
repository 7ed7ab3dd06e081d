//! Wire-level constants of protocol v1: discovery, MSRs, the slot layout, reasons, states and
//! features. All multi-byte fields are little-endian at fixed offsets.

use core::mem::{offset_of, size_of};

/// CPUID leaf whose EBX, ECX, EDX hold [`CPUID_SIGNATURE`] and EAX the highest pvsched leaf.
pub const CPUID_LEAF_SIGNATURE: u32 = 0x4000_0100;
/// CPUID leaf with the host's offer: EAX = MSR base, EBX = versions bitmap, ECX = feature
/// bits, EDX = this vCPU's doorbell I/O port (0: no doorbell).
pub const CPUID_LEAF_INFO: u32 = 0x4000_0101;
/// Signature in EBX, ECX, EDX of [`CPUID_LEAF_SIGNATURE`].
pub const CPUID_SIGNATURE: [u8; 12] = *b"pvschedPVSCH";

/// MSR base the reference VMM uses (also the default for other VMMs).
pub const MSR_BASE_DEFAULT: u32 = 0x4b56_5300;
/// Offset of the read-only identification MSR (reads [`ID_MAGIC`]).
pub const MSR_ID: u32 = 0;
/// Offset of the negotiation MSR (write an offer, read the answer).
pub const MSR_NEGOTIATE: u32 = 1;
/// Offset of the per-vCPU slot registration MSR (write `gpa | SLOT_ENABLE`, or 0).
pub const MSR_SLOT: u32 = 2;
/// Number of pvsched MSRs.
pub const MSR_COUNT: u32 = 3;
/// Value read from [`MSR_ID`]: `"pvsched"` followed by the byte 0x01, little-endian.
pub const ID_MAGIC: u64 = u64::from_le_bytes(*b"pvsched\x01");

/// Protocol version 1.
pub const VERSION_1: u16 = 1;
/// Versions bitmap bit for [`VERSION_1`].
pub const VERSIONS_V1: u16 = 1 << VERSION_1;

/// Feature bits of version 1.
pub mod feature {
    /// The guest publishes its next latency-critical deadline; the host may use it.
    pub const DEADLINE_HINT: u32 = 1 << 0;
    /// The guest may name another vCPU (lock holder, IPI target).
    pub const VCPU_HINT: u32 = 1 << 1;
    /// The host honours "unboost me" doorbells (synchronous unboost, RFC v1).
    pub const UNBOOST_DOORBELL: u32 = 1 << 2;
    /// The guest writes its TSC into `stamp_tsc` right before each doorbell it rings, so that
    /// a host that does not know the guest's TSC offset (a transport such as ivshmem, where
    /// the VMM is not pvsched's) can estimate it and use the deadline hints.
    pub const CLOCK_STAMP: u32 = 1 << 3;
    /// Every feature version 1 defines.
    pub const ALL_V1: u32 = DEADLINE_HINT | VCPU_HINT | UNBOOST_DOORBELL | CLOCK_STAMP;
    /// Their names (configuration files, reports).
    pub const NAMES: [(&str, u32); 4] = [
        ("deadline_hint", DEADLINE_HINT),
        ("vcpu_hint", VCPU_HINT),
        ("unboost_doorbell", UNBOOST_DOORBELL),
        ("clock_stamp", CLOCK_STAMP),
    ];
}

/// Bit 0 of a slot registration: enabled. The rest is the slot's guest-physical address.
pub const SLOT_ENABLE: u64 = 1;
/// A slot's size and alignment: two 64-byte cache lines, guest half then host half.
pub const SLOT_SIZE: usize = 128;

/// Why a vCPU wants to run boosted. The discriminant is the reason's bit position.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Reason {
    /// Handling a hard interrupt.
    Irq = 0,
    /// Handling an NMI.
    Nmi = 1,
    /// Running softirqs / deferred interrupt work.
    Softirq = 2,
    /// A real-time task is running on the vCPU.
    RtTask = 3,
    /// Inside a preemption-disabled (or interrupts-disabled) critical section.
    PreemptDisabled = 4,
}

impl Reason {
    /// Every reason of version 1, in bit order.
    pub const ALL: [Reason; 5] = [
        Reason::Irq,
        Reason::Nmi,
        Reason::Softirq,
        Reason::RtTask,
        Reason::PreemptDisabled,
    ];

    /// The reason's bit in [`Slot::request`].
    pub const fn bit(self) -> u32 {
        1 << self as u32
    }

    /// The reason's index into [`Slot::depth`].
    pub const fn index(self) -> usize {
        self as usize
    }

    /// True for the short kernel critical sections (interrupts, softirq, preempt-off), which
    /// RFC v1 budgets separately from RT tasks.
    pub const fn is_critical_section(self) -> bool {
        !matches!(self, Reason::RtTask)
    }
}

/// A set of [`Reason`]s.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Reasons(u32);

impl Reasons {
    /// No reason.
    pub const NONE: Reasons = Reasons(0);
    /// Bits of the reasons version 1 defines.
    pub const KNOWN_BITS: u32 = 0x1f;

    /// The set with the given bits, or `None` when a bit is not a known reason.
    pub const fn from_bits(bits: u32) -> Option<Reasons> {
        if bits & !Self::KNOWN_BITS == 0 {
            Some(Reasons(bits))
        } else {
            None
        }
    }

    /// The raw bits.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// True when no reason is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// True when `r` is in the set.
    pub const fn contains(self, r: Reason) -> bool {
        self.0 & r.bit() != 0
    }

    /// True when only RT-task reasons (no critical section) are set.
    pub const fn only_rt_task(self) -> bool {
        self.0 == Reason::RtTask.bit()
    }

    /// The set with `r` added.
    pub const fn with(self, r: Reason) -> Reasons {
        Reasons(self.0 | r.bit())
    }
}

/// The host's boost state of a vCPU, as the host publishes it in the slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum BoostState {
    /// Boosting is off for this vCPU (or the VM): do not ring the doorbell.
    Disabled = 0,
    /// Not boosted; ring the doorbell to request a boost.
    Normal = 1,
    /// Boosted; requests cost nothing, ring the doorbell when the last request is released.
    Boosted = 2,
    /// Budget exhausted: boosts are refused for a cooldown; do not ring the doorbell.
    Throttled = 3,
}

impl BoostState {
    /// Decodes a state word; unknown values are `None`.
    pub const fn from_u32(v: u32) -> Option<BoostState> {
        match v {
            0 => Some(BoostState::Disabled),
            1 => Some(BoostState::Normal),
            2 => Some(BoostState::Boosted),
            3 => Some(BoostState::Throttled),
            _ => None,
        }
    }
}

/// Kinds of vCPU hints.
pub mod hint_kind {
    /// No hint.
    pub const NONE: u32 = 0;
    /// The named vCPU holds a lock this vCPU waits for.
    pub const LOCK_HOLDER: u32 = 1;
    /// This vCPU sent the named vCPU an IPI it should handle promptly.
    pub const IPI_TARGET: u32 = 2;
}

/// The slot: per vCPU, in guest memory, registered through [`MSR_SLOT`].
///
/// Bytes 0..64 are written only by the guest, bytes 64..128 only by the host. Reserved bytes
/// are zero when written and ignored when read.
#[repr(C, align(128))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Slot {
    /// Incremented by the guest after every update of its half.
    pub seq: u32,
    /// Boost request: the union of [`Reason::bit`]s whose depth is non-zero.
    pub request: u32,
    /// Nesting depth per reason, indexed by [`Reason::index`]; 5..8 reserved.
    pub depth: [u8; 8],
    /// Guest TSC of the next latency-critical deadline (e.g. the next timer), 0 = none.
    pub deadline_tsc: u64,
    /// vCPU named by the hint, as index + 1; 0 = no hint.
    pub hint_vcpu: u32,
    /// What the hint means, see [`hint_kind`].
    pub hint_kind: u32,
    /// Guest TSC read right before the guest's last doorbell ([`feature::CLOCK_STAMP`]),
    /// 0 = none.
    pub stamp_tsc: u64,
    /// Reserved guest bytes.
    pub guest_reserved: [u8; 24],
    /// [`BoostState`] as published by the host.
    pub state: u32,
    /// Id of the host policy driver in charge of this vCPU (informational).
    pub policy: u32,
    /// Remaining boost budget, ns (informational).
    pub budget_ns: u64,
    /// Boosts granted so far.
    pub boosts: u64,
    /// Throttles so far.
    pub throttles: u64,
    /// The guest `seq` the host last acted on.
    pub host_seq: u32,
    /// Reserved host bytes.
    pub host_reserved: [u8; 28],
}

/// Byte offsets of the slot's fields (the normative table of `docs/protocol.md`).
pub mod off {
    use super::*;
    /// `seq`.
    pub const SEQ: usize = offset_of!(Slot, seq);
    /// `request`.
    pub const REQUEST: usize = offset_of!(Slot, request);
    /// `depth[0]`.
    pub const DEPTH: usize = offset_of!(Slot, depth);
    /// `deadline_tsc`.
    pub const DEADLINE_TSC: usize = offset_of!(Slot, deadline_tsc);
    /// `hint_vcpu`.
    pub const HINT_VCPU: usize = offset_of!(Slot, hint_vcpu);
    /// `hint_kind`.
    pub const HINT_KIND: usize = offset_of!(Slot, hint_kind);
    /// `stamp_tsc`.
    pub const STAMP_TSC: usize = offset_of!(Slot, stamp_tsc);
    /// `state`.
    pub const STATE: usize = offset_of!(Slot, state);
    /// `policy`.
    pub const POLICY: usize = offset_of!(Slot, policy);
    /// `budget_ns`.
    pub const BUDGET_NS: usize = offset_of!(Slot, budget_ns);
    /// `boosts`.
    pub const BOOSTS: usize = offset_of!(Slot, boosts);
    /// `throttles`.
    pub const THROTTLES: usize = offset_of!(Slot, throttles);
    /// `host_seq`.
    pub const HOST_SEQ: usize = offset_of!(Slot, host_seq);
    /// Start of the host half.
    pub const HOST_HALF: usize = STATE;
}

const _: () = {
    assert!(size_of::<Slot>() == SLOT_SIZE);
    assert!(core::mem::align_of::<Slot>() == SLOT_SIZE);
    assert!(off::SEQ == 0x00);
    assert!(off::REQUEST == 0x04);
    assert!(off::DEPTH == 0x08);
    assert!(off::DEADLINE_TSC == 0x10);
    assert!(off::HINT_VCPU == 0x18);
    assert!(off::HINT_KIND == 0x1c);
    assert!(off::STAMP_TSC == 0x20);
    assert!(off::STATE == 0x40);
    assert!(off::POLICY == 0x44);
    assert!(off::BUDGET_NS == 0x48);
    assert!(off::BOOSTS == 0x50);
    assert!(off::THROTTLES == 0x58);
    assert!(off::HOST_SEQ == 0x60);
    assert!(Reasons::KNOWN_BITS == (1 << Reason::ALL.len()) - 1);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_values_match() {
        // docs/protocol.md §2 spells these out for guest developers.
        let w = |i: usize| u32::from_le_bytes(CPUID_SIGNATURE[i..i + 4].try_into().unwrap());
        assert_eq!((w(0), w(4), w(8)), (0x6373_7670, 0x5064_6568, 0x4843_5356));
        assert_eq!(ID_MAGIC, 0x0164_6568_6373_7670);
        assert_eq!(MSR_BASE_DEFAULT, 0x4b56_5300);
    }

    #[test]
    fn signature_and_magic_spell_the_name() {
        assert_eq!(&CPUID_SIGNATURE[..7], crate::PROTOCOL_NAME.as_bytes());
        assert_eq!(&ID_MAGIC.to_le_bytes()[..7], b"pvsched");
    }

    #[test]
    fn reasons_bits_and_sets() {
        assert_eq!(Reason::Irq.bit(), 1);
        assert_eq!(Reason::PreemptDisabled.bit(), 16);
        let r = Reasons::NONE.with(Reason::RtTask);
        assert!(r.only_rt_task() && r.contains(Reason::RtTask) && !r.contains(Reason::Irq));
        assert!(!r.with(Reason::Irq).only_rt_task());
        assert_eq!(Reasons::from_bits(0x20), None);
        assert_eq!(Reasons::from_bits(0x1f).map(|r| r.bits()), Some(0x1f));
        assert!(Reason::Softirq.is_critical_section() && !Reason::RtTask.is_critical_section());
    }

    #[test]
    fn states_round_trip() {
        for s in [
            BoostState::Disabled,
            BoostState::Normal,
            BoostState::Boosted,
            BoostState::Throttled,
        ] {
            assert_eq!(BoostState::from_u32(s as u32), Some(s));
        }
        assert_eq!(BoostState::from_u32(4), None);
    }
}
