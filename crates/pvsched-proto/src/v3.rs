//! The pvsched v3 shared page, ABI version 1: the guest contract of the public pvsched/linux
//! work (`Documentation/virt/kvm/pvsched-v3.rst`, `include/uapi/linux/pvsched.h`), spoken
//! beside protocol v1.
//!
//! One 4096-byte page per vCPU, little-endian, every shared 64-bit word read and written as a
//! whole, atomically:
//!
//! | bytes | owner | content |
//! |---|---|---|
//! | 0–47 | guest | negotiation request: ABI version, policy version, policy name, protocol, mode |
//! | 48–59 | host | status, host ABI version, accepted mode |
//! | 60–63 | – | reserved, zero |
//! | 64–71 | guest | `task_intent`: current task, pending task, flags |
//! | 72–79 | guest | `cs_state`: NMI, hardirq, softirq, preemption-disabled bits |
//! | 80–87 | guest | `interrupt_ack`: the echoed interrupt ticket |
//! | 88–127 | – | reserved, zero |
//! | 128–135 | host | `applied_state`: boost kind, hints, throttle flags |
//! | 136–143 | host | `interrupt_ticket` |
//! | 144–4095 | – | reserved and extension storage, zero for the default protocol |
//!
//! This module is the executable form of that layout (offsets checked at compile time against
//! a `repr(C)` mirror), of its negotiation (the documented rejection order), of decoding a
//! page written by a possibly hostile guest (every reserved bit and byte checked) and of the
//! host's feedback word. `docs/protocol-v3.md` says what pvsched does with each field.

use crate::host::{u32_at, u64_at};
use core::fmt;
use core::mem::{offset_of, size_of};

/// The ABI version this module speaks.
pub const ABI_VERSION: u32 = 1;
/// Bytes per vCPU page (also its alignment).
pub const PAGE_SIZE: usize = 4096;
/// Size of the policy-name field.
pub const NAME_MAX: usize = 32;
/// The built-in policy's name.
pub const DEFAULT_POLICY_NAME: &str = "default";
/// The built-in policy's version.
pub const DEFAULT_POLICY_VERSION: u32 = 1;
/// Our protocol-version bit for this ABI in protocol v1's negotiation bitmap
/// ([`crate::negotiate`]): a guest that offers version 3 registers a v3 page, not a v1 slot.
pub const PVSCHED_VERSION_V3: u16 = 3;

/// Negotiation status the host writes into the header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Status {
    /// Not enabled (also: refused for a reason without its own code).
    Disabled = 0,
    /// Enabled: the host acts on the page.
    Enabled = 1,
    /// The guest asked for a policy the host did not select.
    UnknownPolicy = 2,
    /// The guest's ABI version is not [`ABI_VERSION`].
    AbiMismatch = 3,
    /// The policy's version differs.
    PolicyVersionMismatch = 4,
    /// The guest-area protocol differs from the policy's.
    ProtocolMismatch = 5,
    /// The enforcement mode differs from the one the host allows.
    ModeMismatch = 6,
}

impl Status {
    /// Every status, in value order.
    pub const ALL: [Status; 7] = [
        Status::Disabled,
        Status::Enabled,
        Status::UnknownPolicy,
        Status::AbiMismatch,
        Status::PolicyVersionMismatch,
        Status::ProtocolMismatch,
        Status::ModeMismatch,
    ];

    /// The status with value `v`.
    pub const fn from_u32(v: u32) -> Option<Status> {
        if (v as usize) < Self::ALL.len() {
            Some(Self::ALL[v as usize])
        } else {
            None
        }
    }

    /// Its name in reports.
    pub const fn name(self) -> &'static str {
        match self {
            Status::Disabled => "disabled",
            Status::Enabled => "enabled",
            Status::UnknownPolicy => "unknown policy",
            Status::AbiMismatch => "ABI mismatch",
            Status::PolicyVersionMismatch => "policy version mismatch",
            Status::ProtocolMismatch => "protocol mismatch",
            Status::ModeMismatch => "mode mismatch",
        }
    }
}

/// Guest-area protocols.
pub mod protocol {
    /// The default guest area (task intent, critical-section state, interrupt ack).
    pub const DEFAULT: u32 = 0;
    /// A policy-defined guest area.
    pub const CUSTOM: u32 = 1;
}

/// Enforcement modes.
pub mod mode {
    /// The host framework applies and accounts the policy's requests (the only mode pvsched
    /// accepts).
    pub const FRAMEWORK: u32 = 0;
    /// The policy owns scheduling and throttling.
    pub const POLICY: u32 = 1;
}

/// Linux `SCHED_*` values a task description carries.
pub mod sched {
    /// `SCHED_NORMAL` (`SCHED_OTHER`).
    pub const NORMAL: u8 = 0;
    /// `SCHED_FIFO`.
    pub const FIFO: u8 = 1;
    /// `SCHED_RR`.
    pub const RR: u8 = 2;
    /// `SCHED_BATCH`.
    pub const BATCH: u8 = 3;
    /// `SCHED_IDLE`.
    pub const IDLE: u8 = 5;
    /// `SCHED_DEADLINE`.
    pub const DEADLINE: u8 = 6;
}

/// `task_intent` flags (byte 6).
pub mod intent_flag {
    /// The pending-task description is valid.
    pub const PENDING_VALID: u8 = 1 << 0;
    /// The current task is the guest CPU's idle task.
    pub const IDLE: u8 = 1 << 1;
    /// Every defined flag.
    pub const VALID: u8 = PENDING_VALID | IDLE;
}

/// `cs_state` bits: aggregate guest critical sections (not nesting counts).
pub mod cs {
    /// In an NMI.
    pub const NMI: u64 = 1 << 0;
    /// In a hard interrupt.
    pub const HARDIRQ: u64 = 1 << 1;
    /// Running softirqs.
    pub const SOFTIRQ: u64 = 1 << 2;
    /// Preemption disabled.
    pub const PREEMPT_DISABLED: u64 = 1 << 3;
    /// Every defined bit.
    pub const VALID: u64 = 0xf;
}

/// `applied_state` hints (byte 3).
pub mod hint {
    /// The host asks to be told (doorbell) when the guest's intent drops, to deboost early.
    pub const KICK_DEBOOST: u8 = 1 << 0;
    /// Every defined hint.
    pub const VALID: u8 = KICK_DEBOOST;
}

/// `applied_state` flags (byte 4).
pub mod applied_flag {
    /// The critical-section budget is throttled.
    pub const CS_THROTTLED: u8 = 1 << 0;
    /// The generic (total) budget is throttled.
    pub const TOTAL_THROTTLED: u8 = 1 << 1;
    /// Every defined flag.
    pub const VALID: u8 = CS_THROTTLED | TOTAL_THROTTLED;
}

/// A mirror of the page for the compile-time offset checks; the wire format is the offsets in
/// [`off`], not this type.
#[repr(C, align(4096))]
#[allow(dead_code)]
struct Page {
    abi_version: u32,
    policy_version: u32,
    policy_name: [u8; NAME_MAX],
    protocol_id: u32,
    requested_mode: u32,
    status: u32,
    host_abi_version: u32,
    accepted_mode: u32,
    header_reserved: u32,
    task_intent: u64,
    cs_state: u64,
    interrupt_ack: u64,
    guest_reserved: [u8; 40],
    applied_state: u64,
    interrupt_ticket: u64,
    host_reserved: [u8; 48],
    extension: [u8; PAGE_SIZE - 192],
}

/// Byte offsets of the page's fields.
pub mod off {
    use super::*;
    /// Guest: requested ABI version (`u32`).
    pub const ABI_VERSION: usize = offset_of!(Page, abi_version);
    /// Guest: requested policy version (`u32`).
    pub const POLICY_VERSION: usize = offset_of!(Page, policy_version);
    /// Guest: policy name, 32 bytes.
    pub const POLICY_NAME: usize = offset_of!(Page, policy_name);
    /// Guest: guest-area protocol (`u32`).
    pub const PROTOCOL_ID: usize = offset_of!(Page, protocol_id);
    /// Guest: requested enforcement mode (`u32`).
    pub const REQUESTED_MODE: usize = offset_of!(Page, requested_mode);
    /// Host: negotiation status (`u32`).
    pub const STATUS: usize = offset_of!(Page, status);
    /// Host: its ABI version (`u32`).
    pub const HOST_ABI_VERSION: usize = offset_of!(Page, host_abi_version);
    /// Host: the accepted mode (`u32`).
    pub const ACCEPTED_MODE: usize = offset_of!(Page, accepted_mode);
    /// Reserved `u32` of the header.
    pub const HEADER_RESERVED: usize = offset_of!(Page, header_reserved);
    /// Guest: task intent (`u64`).
    pub const TASK_INTENT: usize = offset_of!(Page, task_intent);
    /// Guest: critical-section state (`u64`).
    pub const CS_STATE: usize = offset_of!(Page, cs_state);
    /// Guest: interrupt acknowledgement (`u64`).
    pub const INTERRUPT_ACK: usize = offset_of!(Page, interrupt_ack);
    /// Reserved bytes of the guest area (40).
    pub const GUEST_RESERVED: usize = offset_of!(Page, guest_reserved);
    /// Host: applied state (`u64`).
    pub const APPLIED_STATE: usize = offset_of!(Page, applied_state);
    /// Host: interrupt ticket (`u64`).
    pub const INTERRUPT_TICKET: usize = offset_of!(Page, interrupt_ticket);
    /// Reserved bytes of the host area (48).
    pub const HOST_RESERVED: usize = offset_of!(Page, host_reserved);
    /// Extension storage, to the end of the page.
    pub const EXTENSION: usize = offset_of!(Page, extension);
}

const _: () = {
    assert!(size_of::<Page>() == PAGE_SIZE);
    assert!(off::ABI_VERSION == 0 && off::POLICY_VERSION == 4 && off::POLICY_NAME == 8);
    assert!(off::PROTOCOL_ID == 40 && off::REQUESTED_MODE == 44);
    assert!(off::STATUS == 48 && off::HOST_ABI_VERSION == 52 && off::ACCEPTED_MODE == 56);
    assert!(off::HEADER_RESERVED == 60);
    assert!(off::TASK_INTENT == 64 && off::CS_STATE == 72 && off::INTERRUPT_ACK == 80);
    assert!(off::GUEST_RESERVED == 88);
    assert!(off::APPLIED_STATE == 128 && off::INTERRUPT_TICKET == 136);
    assert!(off::HOST_RESERVED == 144 && off::EXTENSION == 192);
};

/// What a guest scheduler says a task is: Linux scheduling class, nice, real-time priority.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TaskDesc {
    /// `SCHED_*` value ([`sched`]).
    pub class: u8,
    /// Nice, −20..=19 for NORMAL and BATCH, else 0.
    pub nice: i8,
    /// Real-time priority, 1..=99 for FIFO and RR, else 0.
    pub rt_prio: u8,
}

impl TaskDesc {
    /// A NORMAL task at `nice`.
    pub const fn normal(nice: i8) -> Self {
        TaskDesc {
            class: sched::NORMAL,
            nice,
            rt_prio: 0,
        }
    }

    /// A BATCH task at `nice`.
    pub const fn batch(nice: i8) -> Self {
        TaskDesc {
            class: sched::BATCH,
            nice,
            rt_prio: 0,
        }
    }

    /// A FIFO task at `prio`.
    pub const fn fifo(prio: u8) -> Self {
        TaskDesc {
            class: sched::FIFO,
            nice: 0,
            rt_prio: prio,
        }
    }

    /// An IDLE-class task.
    pub const fn idle() -> Self {
        TaskDesc {
            class: sched::IDLE,
            nice: 0,
            rt_prio: 0,
        }
    }

    /// A DEADLINE task.
    pub const fn deadline() -> Self {
        TaskDesc {
            class: sched::DEADLINE,
            nice: 0,
            rt_prio: 0,
        }
    }

    /// True for the tuples the default guest area allows: NORMAL and BATCH with nice −20..=19
    /// and priority 0; FIFO and RR with nice 0 and priority 1..=99; IDLE and DEADLINE with
    /// nice 0 and priority 0. Anything else (EXT, unknown classes) is invalid.
    pub const fn is_valid(&self) -> bool {
        match self.class {
            sched::NORMAL | sched::BATCH => {
                self.nice >= -20 && self.nice <= 19 && self.rt_prio == 0
            }
            sched::FIFO | sched::RR => self.nice == 0 && self.rt_prio >= 1 && self.rt_prio <= 99,
            sched::IDLE | sched::DEADLINE => self.nice == 0 && self.rt_prio == 0,
            _ => false,
        }
    }

    const fn bytes(&self) -> [u8; 3] {
        [self.class, self.nice as u8, self.rt_prio]
    }

    const fn from_bytes(b: [u8; 3]) -> Self {
        TaskDesc {
            class: b[0],
            nice: b[1] as i8,
            rt_prio: b[2],
        }
    }
}

/// The guest's `task_intent` word, decoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TaskIntent {
    /// The task running now.
    pub current: TaskDesc,
    /// The most urgent task waiting, when the guest says (pending-valid).
    pub pending: Option<TaskDesc>,
    /// The current task is the guest CPU's idle task.
    pub idle: bool,
}

impl TaskIntent {
    /// The wire word. Producers validate first ([`TaskDesc::is_valid`]): encoding does not
    /// make a tuple valid.
    pub const fn encode(&self) -> u64 {
        let c = self.current.bytes();
        let (p, mut flags) = match self.pending {
            Some(p) => (p.bytes(), intent_flag::PENDING_VALID),
            None => ([0; 3], 0),
        };
        if self.idle {
            flags |= intent_flag::IDLE;
        }
        u64::from_le_bytes([c[0], c[1], c[2], p[0], p[1], p[2], flags, 0])
    }

    /// Decodes a word a guest wrote: reserved byte and flag bits zero, a zero pending
    /// description when it is not valid, and every description a valid tuple.
    pub const fn decode(raw: u64) -> Result<TaskIntent, PageError> {
        let b = raw.to_le_bytes();
        if b[7] != 0 || b[6] & !intent_flag::VALID != 0 {
            return Err(PageError::IntentReserved { raw });
        }
        let current = TaskDesc::from_bytes([b[0], b[1], b[2]]);
        if !current.is_valid() {
            return Err(PageError::InvalidTask { raw });
        }
        let pending = if b[6] & intent_flag::PENDING_VALID != 0 {
            let p = TaskDesc::from_bytes([b[3], b[4], b[5]]);
            if !p.is_valid() {
                return Err(PageError::InvalidTask { raw });
            }
            Some(p)
        } else if b[3] != 0 || b[4] != 0 || b[5] != 0 {
            return Err(PageError::IntentReserved { raw });
        } else {
            None
        };
        Ok(TaskIntent {
            current,
            pending,
            idle: b[6] & intent_flag::IDLE != 0,
        })
    }
}

/// The default guest area (bytes 64–127), decoded and validated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GuestArea {
    /// What the guest runs.
    pub intent: TaskIntent,
    /// Critical-section bits ([`cs`]).
    pub cs: u64,
    /// The last interrupt ticket the guest echoed (0: none).
    pub ack: u64,
}

/// Why a page (or one of its words) was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageError {
    /// Fewer bytes than needed.
    Short {
        /// Bytes given.
        len: usize,
    },
    /// `task_intent` has a reserved byte or flag set, or a pending description without
    /// pending-valid.
    IntentReserved {
        /// The word.
        raw: u64,
    },
    /// A task description is not a tuple the default guest area allows.
    InvalidTask {
        /// The word.
        raw: u64,
    },
    /// `cs_state` has reserved bits.
    CsReserved {
        /// The word.
        raw: u64,
    },
    /// A reserved byte of the guest area is not zero.
    GuestReserved {
        /// Its offset in the page.
        at: usize,
    },
    /// A byte of the extension storage is not zero (checked at attach).
    Extension {
        /// Its offset in the page.
        at: usize,
    },
    /// `interrupt_ack` is not zero at attach.
    StaleAck,
}

impl fmt::Display for PageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PageError::Short { len } => write!(f, "page has {len} bytes, needs {PAGE_SIZE}"),
            PageError::IntentReserved { raw } => {
                write!(f, "task_intent {raw:#018x} has reserved bits set")
            }
            PageError::InvalidTask { raw } => {
                write!(f, "task_intent {raw:#018x} describes an invalid task")
            }
            PageError::CsReserved { raw } => write!(f, "cs_state {raw:#x} has reserved bits"),
            PageError::GuestReserved { at } => write!(f, "reserved guest byte {at} is not zero"),
            PageError::Extension { at } => write!(f, "extension byte {at} is not zero"),
            PageError::StaleAck => write!(f, "interrupt_ack is not zero at attach"),
        }
    }
}

impl core::error::Error for PageError {}

/// Decodes the guest area from its three words and its reserved bytes (`reserved`: bytes
/// 88–127 of the page). The host reads each word atomically and calls this.
pub fn decode_guest_words(
    task_intent: u64,
    cs_state: u64,
    interrupt_ack: u64,
    reserved: &[u8],
) -> Result<GuestArea, PageError> {
    if let Some(i) = reserved.iter().position(|&b| b != 0) {
        return Err(PageError::GuestReserved {
            at: off::GUEST_RESERVED + i,
        });
    }
    if cs_state & !cs::VALID != 0 {
        return Err(PageError::CsReserved { raw: cs_state });
    }
    Ok(GuestArea {
        intent: TaskIntent::decode(task_intent)?,
        cs: cs_state,
        ack: interrupt_ack,
    })
}

/// Decodes the guest area of a page copy (at least 128 bytes).
pub fn decode_guest_area(page: &[u8]) -> Result<GuestArea, PageError> {
    if page.len() < off::APPLIED_STATE {
        return Err(PageError::Short { len: page.len() });
    }
    decode_guest_words(
        u64_at(page, off::TASK_INTENT),
        u64_at(page, off::CS_STATE),
        u64_at(page, off::INTERRUPT_ACK),
        &page[off::GUEST_RESERVED..off::APPLIED_STATE],
    )
}

/// The guest's negotiation request (header bytes 0–47), as written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Request {
    /// Requested ABI version.
    pub abi_version: u32,
    /// Requested policy version.
    pub policy_version: u32,
    /// Requested policy name, raw.
    pub policy_name: [u8; NAME_MAX],
    /// Requested guest-area protocol.
    pub protocol_id: u32,
    /// Requested enforcement mode.
    pub requested_mode: u32,
}

impl Request {
    /// What a guest for the built-in policy writes.
    pub fn default_policy() -> Self {
        let mut name = [0u8; NAME_MAX];
        name[..DEFAULT_POLICY_NAME.len()].copy_from_slice(DEFAULT_POLICY_NAME.as_bytes());
        Request {
            abi_version: ABI_VERSION,
            policy_version: DEFAULT_POLICY_VERSION,
            policy_name: name,
            protocol_id: protocol::DEFAULT,
            requested_mode: mode::FRAMEWORK,
        }
    }

    /// Reads the request from a page copy (at least 48 bytes).
    pub fn read(page: &[u8]) -> Result<Request, PageError> {
        if page.len() < off::STATUS {
            return Err(PageError::Short { len: page.len() });
        }
        let mut policy_name = [0u8; NAME_MAX];
        policy_name.copy_from_slice(&page[off::POLICY_NAME..off::POLICY_NAME + NAME_MAX]);
        Ok(Request {
            abi_version: u32_at(page, off::ABI_VERSION),
            policy_version: u32_at(page, off::POLICY_VERSION),
            policy_name,
            protocol_id: u32_at(page, off::PROTOCOL_ID),
            requested_mode: u32_at(page, off::REQUESTED_MODE),
        })
    }

    /// Writes the request into a page copy (at least 48 bytes).
    pub fn write(&self, page: &mut [u8]) {
        page[off::ABI_VERSION..off::ABI_VERSION + 4]
            .copy_from_slice(&self.abi_version.to_le_bytes());
        page[off::POLICY_VERSION..off::POLICY_VERSION + 4]
            .copy_from_slice(&self.policy_version.to_le_bytes());
        page[off::POLICY_NAME..off::POLICY_NAME + NAME_MAX].copy_from_slice(&self.policy_name);
        page[off::PROTOCOL_ID..off::PROTOCOL_ID + 4]
            .copy_from_slice(&self.protocol_id.to_le_bytes());
        page[off::REQUESTED_MODE..off::REQUESTED_MODE + 4]
            .copy_from_slice(&self.requested_mode.to_le_bytes());
    }

    /// The policy name, when it is well formed: nonempty, NUL-terminated within the field and
    /// zero after the terminator.
    pub fn name(&self) -> Option<&str> {
        let len = self.policy_name.iter().position(|&b| b == 0)?;
        if len == 0 || self.policy_name[len..].iter().any(|&b| b != 0) {
            return None;
        }
        core::str::from_utf8(&self.policy_name[..len]).ok()
    }
}

/// The host's answer (header bytes 48–59).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Answer {
    /// The outcome.
    pub status: Status,
    /// The mode the host accepted (meaningful only when enabled).
    pub accepted_mode: u32,
}

impl Answer {
    /// Writes the answer into a page copy (at least 64 bytes): status, host ABI version,
    /// accepted mode (0 unless enabled), reserved word zero.
    pub fn write(&self, page: &mut [u8]) {
        let mode = if self.status == Status::Enabled {
            self.accepted_mode
        } else {
            0
        };
        for (at, v) in [
            (off::STATUS, self.status as u32),
            (off::HOST_ABI_VERSION, ABI_VERSION),
            (off::ACCEPTED_MODE, mode),
            (off::HEADER_RESERVED, 0),
        ] {
            page[at..at + 4].copy_from_slice(&v.to_le_bytes());
        }
    }
}

/// Negotiates a page for the built-in `default` policy (the only one pvsched offers), in the
/// ABI's rejection order: ABI version, a malformed name (disabled), the name, the policy
/// version, the protocol, the mode, then the guest area's attach rules (reserved bits and
/// bytes zero, no stale acknowledgement, zero extension storage), which disable it.
/// `page` is a copy of the whole page.
pub fn negotiate(page: &[u8]) -> Result<Answer, PageError> {
    if page.len() < PAGE_SIZE {
        return Err(PageError::Short { len: page.len() });
    }
    let req = Request::read(page)?;
    let status = if req.abi_version != ABI_VERSION {
        Status::AbiMismatch
    } else {
        match req.name() {
            None => Status::Disabled,
            Some(n) if n != DEFAULT_POLICY_NAME => Status::UnknownPolicy,
            Some(_) if req.policy_version != DEFAULT_POLICY_VERSION => {
                Status::PolicyVersionMismatch
            }
            Some(_) if req.protocol_id != protocol::DEFAULT => Status::ProtocolMismatch,
            Some(_) if req.requested_mode != mode::FRAMEWORK => Status::ModeMismatch,
            Some(_) if attach_check(page).is_err() => Status::Disabled,
            Some(_) => Status::Enabled,
        }
    };
    Ok(Answer {
        status,
        accepted_mode: mode::FRAMEWORK,
    })
}

/// The attach rules of the default guest area on a page copy: reserved bits and bytes zero,
/// no acknowledgement yet, extension storage zero. Task tuples are judged at every read, not
/// here (a guest may attach before it has published a valid intent).
pub fn attach_check(page: &[u8]) -> Result<(), PageError> {
    if page.len() < PAGE_SIZE {
        return Err(PageError::Short { len: page.len() });
    }
    if u64_at(page, off::INTERRUPT_ACK) != 0 {
        return Err(PageError::StaleAck);
    }
    let cs_state = u64_at(page, off::CS_STATE);
    if cs_state & !cs::VALID != 0 {
        return Err(PageError::CsReserved { raw: cs_state });
    }
    let intent = u64_at(page, off::TASK_INTENT).to_le_bytes();
    if intent[7] != 0 || intent[6] & !intent_flag::VALID != 0 {
        return Err(PageError::IntentReserved {
            raw: u64::from_le_bytes(intent),
        });
    }
    if let Some(i) = page[off::GUEST_RESERVED..off::APPLIED_STATE]
        .iter()
        .position(|&b| b != 0)
    {
        return Err(PageError::GuestReserved {
            at: off::GUEST_RESERVED + i,
        });
    }
    if let Some(i) = page[off::EXTENSION..PAGE_SIZE].iter().position(|&b| b != 0) {
        return Err(PageError::Extension {
            at: off::EXTENSION + i,
        });
    }
    Ok(())
}

/// What the host applied, as the guest sees it (`applied_state.boost`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum BoostKind {
    /// Not elevated, or deboosted.
    #[default]
    Baseline = 0,
    /// Elevated for the guest's task intent.
    Task = 1,
    /// Elevated for a critical section or a host reason.
    Cs = 2,
}

/// The host's `applied_state` word.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AppliedState {
    /// What the boost in force is for.
    pub boost: BoostKind,
    /// [`hint`] bits.
    pub hints: u8,
    /// [`applied_flag`] bits.
    pub flags: u8,
}

impl AppliedState {
    /// The wire word: byte 3 hints, byte 4 flags, byte 5 the boost kind, the rest zero.
    pub const fn encode(&self) -> u64 {
        u64::from_le_bytes([0, 0, 0, self.hints, self.flags, self.boost as u8, 0, 0])
    }

    /// Decodes a word (the guest's view; the host writes only valid words).
    pub const fn decode(raw: u64) -> Option<AppliedState> {
        let b = raw.to_le_bytes();
        if b[0] | b[1] | b[2] | b[6] | b[7] != 0
            || b[3] & !hint::VALID != 0
            || b[4] & !applied_flag::VALID != 0
        {
            return None;
        }
        let boost = match b[5] {
            0 => BoostKind::Baseline,
            1 => BoostKind::Task,
            2 => BoostKind::Cs,
            _ => return None,
        };
        Some(AppliedState {
            boost,
            hints: b[3],
            flags: b[4],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page() -> [u8; PAGE_SIZE] {
        let mut p = [0u8; PAGE_SIZE];
        Request::default_policy().write(&mut p);
        p
    }

    #[test]
    fn the_default_request_is_enabled() {
        let mut p = page();
        let a = negotiate(&p).unwrap();
        assert_eq!(a.status, Status::Enabled);
        a.write(&mut p);
        assert_eq!(u32_at(&p, off::STATUS), 1);
        assert_eq!(u32_at(&p, off::HOST_ABI_VERSION), 1);
        assert_eq!(u32_at(&p, off::ACCEPTED_MODE), mode::FRAMEWORK);
        assert_eq!(&p[0..7], &[1, 0, 0, 0, 1, 0, 0]);
        assert_eq!(&p[8..16], b"default\0");
    }

    #[test]
    fn every_status_in_the_documented_order() {
        let with = |f: &dyn Fn(&mut Request)| {
            let mut r = Request::default_policy();
            f(&mut r);
            let mut p = [0u8; PAGE_SIZE];
            r.write(&mut p);
            negotiate(&p).unwrap().status
        };
        assert_eq!(with(&|r| r.abi_version = 2), Status::AbiMismatch);
        // ABI first: a wrong version and a wrong name is an ABI mismatch.
        assert_eq!(
            with(&|r| {
                r.abi_version = 0;
                r.policy_name = [0; NAME_MAX];
            }),
            Status::AbiMismatch
        );
        assert_eq!(with(&|r| r.policy_name = [0; NAME_MAX]), Status::Disabled);
        assert_eq!(
            with(&|r| r.policy_name = [b'x'; NAME_MAX]),
            Status::Disabled
        );
        assert_eq!(with(&|r| r.policy_name[9] = b'x'), Status::Disabled);
        assert_eq!(with(&|r| r.policy_name[0] = b'D'), Status::UnknownPolicy);
        assert_eq!(
            with(&|r| {
                r.policy_name[0] = b'D';
                r.policy_version = 9;
            }),
            Status::UnknownPolicy
        );
        assert_eq!(
            with(&|r| r.policy_version = 2),
            Status::PolicyVersionMismatch
        );
        assert_eq!(
            with(&|r| r.protocol_id = protocol::CUSTOM),
            Status::ProtocolMismatch
        );
        assert_eq!(
            with(&|r| r.requested_mode = mode::POLICY),
            Status::ModeMismatch
        );
        assert_eq!(with(&|r| r.requested_mode = 7), Status::ModeMismatch);
        assert_eq!(with(&|_| {}), Status::Enabled);
    }

    #[test]
    fn reserved_bits_and_bytes_at_attach_disable() {
        let cases: [(usize, u8); 7] = [
            (off::TASK_INTENT + 7, 1),
            (off::TASK_INTENT + 6, 4),
            (off::CS_STATE, 0x10),
            (off::CS_STATE + 7, 0x80),
            (off::INTERRUPT_ACK, 1),
            (off::GUEST_RESERVED + 39, 1),
            (PAGE_SIZE - 1, 1),
        ];
        for (at, v) in cases {
            let mut p = page();
            p[at] = v;
            assert_eq!(negotiate(&p).unwrap().status, Status::Disabled, "byte {at}");
            assert!(attach_check(&p).is_err());
        }
        // Host-owned bytes are the host's: stale host feedback does not refuse a guest.
        let mut p = page();
        p[off::APPLIED_STATE + 5] = 2;
        p[off::STATUS] = 9;
        assert_eq!(negotiate(&p).unwrap().status, Status::Enabled);
        assert_eq!(negotiate(&p[..100]), Err(PageError::Short { len: 100 }));
    }

    #[test]
    fn answers_other_than_enabled_carry_no_mode() {
        let mut p = page();
        Answer {
            status: Status::ModeMismatch,
            accepted_mode: 5,
        }
        .write(&mut p);
        assert_eq!(u32_at(&p, off::STATUS), 6);
        assert_eq!(u32_at(&p, off::ACCEPTED_MODE), 0);
        for s in Status::ALL {
            assert_eq!(Status::from_u32(s as u32), Some(s));
        }
        assert_eq!(Status::from_u32(7), None);
    }

    #[test]
    fn task_tuples_the_doc_allows_and_rejects() {
        // Exhaustive over every byte value of the three fields for each class value.
        for class in 0..=255u8 {
            for nice in i8::MIN..=i8::MAX {
                for rt_prio in 0..=255u8 {
                    let d = TaskDesc {
                        class,
                        nice,
                        rt_prio,
                    };
                    let want = match class {
                        0 | 3 => (-20..=19).contains(&nice) && rt_prio == 0,
                        1 | 2 => nice == 0 && (1..=99).contains(&rt_prio),
                        5 | 6 => nice == 0 && rt_prio == 0,
                        _ => false,
                    };
                    assert_eq!(d.is_valid(), want, "{d:?}");
                    let w = TaskIntent {
                        current: d,
                        pending: None,
                        idle: false,
                    }
                    .encode();
                    assert_eq!(TaskIntent::decode(w).is_ok(), want, "{d:?}");
                }
            }
        }
    }

    #[test]
    fn intent_words_round_trip_and_reject_reserved() {
        let i = TaskIntent {
            current: TaskDesc::normal(-20),
            pending: Some(TaskDesc::fifo(99)),
            idle: true,
        };
        let w = i.encode();
        assert_eq!(w.to_le_bytes(), [0, 0xec, 0, 1, 0, 99, 3, 0]);
        assert_eq!(TaskIntent::decode(w), Ok(i));
        // Pending bytes without pending-valid.
        let bad = TaskIntent { pending: None, ..i }.encode() | 1 << 24;
        assert_eq!(
            TaskIntent::decode(bad),
            Err(PageError::IntentReserved { raw: bad })
        );
        // An invalid pending tuple.
        let bad = TaskIntent {
            pending: Some(TaskDesc::fifo(0)),
            ..i
        }
        .encode();
        assert_eq!(
            TaskIntent::decode(bad),
            Err(PageError::InvalidTask { raw: bad })
        );
        for b in [1u64 << 56, 1 << 50, 0x80 << 48] {
            assert!(TaskIntent::decode(w | b).is_err(), "{b:#x}");
        }
    }

    #[test]
    fn guest_area_decodes_and_checks_reserved_bytes() {
        let mut p = page();
        let intent = TaskIntent {
            current: TaskDesc::fifo(10),
            ..Default::default()
        };
        p[off::TASK_INTENT..off::TASK_INTENT + 8].copy_from_slice(&intent.encode().to_le_bytes());
        p[off::CS_STATE] = (cs::HARDIRQ | cs::SOFTIRQ) as u8;
        p[off::INTERRUPT_ACK] = 7;
        let g = decode_guest_area(&p).unwrap();
        assert_eq!(g.intent, intent);
        assert_eq!(g.cs, cs::HARDIRQ | cs::SOFTIRQ);
        assert_eq!(g.ack, 7);
        p[off::GUEST_RESERVED + 3] = 1;
        assert_eq!(
            decode_guest_area(&p),
            Err(PageError::GuestReserved {
                at: off::GUEST_RESERVED + 3
            })
        );
        p[off::GUEST_RESERVED + 3] = 0;
        p[off::CS_STATE + 1] = 1;
        assert!(matches!(
            decode_guest_area(&p),
            Err(PageError::CsReserved { .. })
        ));
        assert_eq!(
            decode_guest_area(&p[..64]),
            Err(PageError::Short { len: 64 })
        );
    }

    #[test]
    fn applied_state_words() {
        let a = AppliedState {
            boost: BoostKind::Cs,
            hints: hint::KICK_DEBOOST,
            flags: applied_flag::TOTAL_THROTTLED,
        };
        assert_eq!(a.encode().to_le_bytes(), [0, 0, 0, 1, 2, 2, 0, 0]);
        assert_eq!(AppliedState::decode(a.encode()), Some(a));
        assert_eq!(AppliedState::default().encode(), 0);
        for bad in [1u64, 1 << 16, 4 << 24, 4 << 32, 3 << 40, 1 << 48, 1 << 63] {
            assert_eq!(AppliedState::decode(a.encode() | bad), None, "{bad:#x}");
        }
    }
}
