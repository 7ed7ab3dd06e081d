//! The pvsched protocol, version 1: the contract between a guest that says what its vCPUs
//! are doing and a host that boosts their threads.
//!
//! The normative text is `docs/protocol.md`; this crate is its executable form, used by both
//! sides:
//!
//! - [`abi`]: discovery (CPUID leaves, MSRs), the slot layout with its fixed offsets, reason
//!   bits, boost states and feature bits;
//! - [`negotiate`]: version and feature negotiation, a pure function both sides agree on;
//! - [`guest`]: the guest API (boost requests with nesting per reason, deadline and vCPU
//!   hints), generic over how the slot is accessed so it runs in a kernel and in a model
//!   checker alike;
//! - [`host`]: decoding a slot written by a possibly hostile guest into a typed snapshot or a
//!   typed error, and the host side of the boost-state handshake;
//! - [`ivshmem`]: the transport for guests of a VMM with QEMU's `ivshmem-doorbell` device (the
//!   daemon as its server): the header's offer and the guest's checked answer;
//! - [`v3`]: the pvsched v3 shared page (ABI version 1), spoken beside version 1: its layout,
//!   negotiation, hostile-page decoding and the host's feedback word (`docs/protocol-v3.md`).
//!
//! `no_std`, no allocation, no I/O.
#![no_std]
#![deny(missing_docs)]

pub mod abi;
pub mod guest;
pub mod host;
pub mod ivshmem;
pub mod negotiate;
pub mod v3;

pub use abi::{BoostState, Reason, Reasons};
pub use host::{decode, DecodeError, SlotSnapshot};
pub use negotiate::{negotiate, Negotiated};

/// The protocol's name, as in RFC v2's "protocol identified by name and version".
pub const PROTOCOL_NAME: &str = "pvsched";

/// How a slot's 32-bit words, bytes and 64-bit words are read and written, plus the full
/// fence the handshake needs. A guest kernel implements it with volatile accesses on the
/// slot's memory (see [`guest::RawSlot`]); the VMM with guest-memory atomics; tests with
/// model-checker atomics.
pub trait SlotMemory {
    /// Loads the `u32` at byte offset `off`.
    fn load_u32(&self, off: usize) -> u32;
    /// Stores a `u32` at byte offset `off`.
    fn store_u32(&self, off: usize, v: u32);
    /// Loads the byte at offset `off`.
    fn load_u8(&self, off: usize) -> u8;
    /// Stores a byte at offset `off`.
    fn store_u8(&self, off: usize, v: u8);
    /// Stores a `u64` at byte offset `off`.
    fn store_u64(&self, off: usize, v: u64);
    /// A full (store-load) fence: `mfence` on x86, `fence(SeqCst)` in Rust.
    fn fence(&self);
}
