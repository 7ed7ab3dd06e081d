//! The pvsched testbed guest: a tiny bare-metal x86_64 program that measures its own timer
//! wake-up latency (like cyclictest) and runs a periodic deadline task (like an audio
//! callback), plus the mailbox ABI through which the VMM configures it and reads results.
//!
//! The guest is written in assembly (see [`image`]) so that it runs on hosts whose KVM
//! emulates guest kernel code instruction by instruction; the crate is `no_std` and is
//! built by the ordinary `cargo build` for the host target.
#![no_std]
#![deny(missing_docs)]

pub mod image;
pub mod mailbox;

pub use image::{image, GuestImage};
pub use mailbox::{FaultInjection, Mailbox};
