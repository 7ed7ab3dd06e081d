//! pvsched's host mechanism: puts vCPU threads into scheduling classes and restores them.
//!
//! This crate holds no policy: it applies what it is told to thread ids and remembers how to
//! undo it.
#![deny(missing_docs)]

pub mod clock;
pub mod mechanism;
pub mod pressure;
pub mod runtime;
pub mod sched;
pub mod sigbus;
pub mod slot;
pub mod stats;
pub mod trace;

pub use mechanism::Publisher;
pub use runtime::{Runtime, RuntimeConfig, RuntimeHandle, VcpuHandle};
pub use sched::{SchedAttr, SchedClass, SchedGuard};

/// `e` and its sources on one line, `outer: inner: ...` (for errors reported as text: a status
/// note, a source's attach failure, a usage message).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
