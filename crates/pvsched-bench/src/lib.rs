//! pvsched experiments on the testbed: host load, host probe, runs of the micro-VM under a
//! chosen setting, and their reports (text and JSON).
#![deny(missing_docs)]

pub mod bench;
pub mod bench_report;
pub mod engine_host;
pub mod experiment;
pub mod external;
pub mod hist;
pub mod linux_tcg;
pub mod load;
pub mod probe;
pub mod report;
pub mod worker;

pub use experiment::{run, ExperimentConfig, GuestLoad, Outcome, Report};
