//! The host side of the pvsched protocol during a run: a thread that waits for doorbells and
//! slot changes and counts what each vCPU's guest asked for. (The boost engine that acts on
//! them plugs in here.)

use pvsched_guest::mailbox::{pv_status, Mailbox};
use pvsched_proto::abi::feature;
use pvsched_proto::negotiate::{decode_answer, Negotiated};
use pvsched_vmm::pvdevice::{PvDevice, PvEvent, PvPoller};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long the protocol thread waits for a doorbell before it rescans the slots.
const POLL_TIMEOUT: Duration = Duration::from_millis(10);

/// What the host saw of one vCPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCounts {
    /// Doorbell rings received.
    pub doorbells: u64,
    /// Slot updates observed (polls that found a new `seq`).
    pub updates_seen: u64,
    /// Times the slot failed to decode.
    pub bad_slots: u64,
}

/// The protocol thread of a run.
pub struct PvHost {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<HostCounts>>>,
}

impl PvHost {
    /// Starts `pvsched-pvhost` polling `device` with its MSR event stream `events`.
    pub fn start(device: Arc<PvDevice>, events: mpsc::Receiver<PvEvent>) -> std::io::Result<Self> {
        let mut poller = PvPoller::new(&device, events)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("pvsched-pvhost".into())
            .spawn(move || {
                let mut counts = vec![HostCounts::default(); device.vcpus()];
                let mut out = Vec::new();
                loop {
                    let last = flag.load(Ordering::Acquire);
                    if poller.poll(&device, POLL_TIMEOUT, &mut out).is_err() {
                        break;
                    }
                    for e in out.drain(..) {
                        match e {
                            PvEvent::Doorbell { vcpu, count } => counts[vcpu].doorbells += count,
                            PvEvent::RequestChanged { vcpu, .. } => counts[vcpu].updates_seen += 1,
                            PvEvent::BadSlot { vcpu, .. } => counts[vcpu].bad_slots += 1,
                            _ => {}
                        }
                    }
                    // One more poll after the stop request collects the final doorbells.
                    if last {
                        break;
                    }
                }
                counts
            })?;
        Ok(PvHost {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread and returns the per-vCPU counts.
    pub fn stop(mut self) -> Vec<HostCounts> {
        self.halt()
    }

    fn halt(&mut self) -> Vec<HostCounts> {
        self.stop.store(true, Ordering::Release);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for PvHost {
    fn drop(&mut self) {
        self.halt();
    }
}

/// The protocol's results on one vCPU: the guest's own counters and the host's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PvVcpuReport {
    /// Guest outcome of discovery/negotiation: `enabled`, `no-common-version`, `not-found`,
    /// `not-tried`.
    pub status: String,
    /// Requests the guest made.
    pub requests: u64,
    /// Requests that needed no doorbell.
    pub quiet: u64,
    /// "Boost me" doorbells the guest rang.
    pub boost_rings: u64,
    /// "Unboost me" doorbells the guest rang.
    pub unboost_rings: u64,
    /// What the host saw.
    pub host: HostCounts,
}

/// The protocol's results for a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PvReport {
    /// Negotiated version (0: none).
    pub version: u16,
    /// Negotiated feature names.
    pub features: Vec<String>,
    /// Per-vCPU results.
    pub per_vcpu: Vec<PvVcpuReport>,
}

/// Names of feature bits.
pub fn feature_names(bits: u32) -> Vec<String> {
    [
        (feature::DEADLINE_HINT, "deadline-hint"),
        (feature::VCPU_HINT, "vcpu-hint"),
        (feature::UNBOOST_DOORBELL, "unboost-doorbell"),
    ]
    .iter()
    .filter(|(b, _)| bits & b != 0)
    .map(|(_, n)| n.to_string())
    .collect()
}

fn status_name(s: u64) -> &'static str {
    match s {
        pv_status::ENABLED => "enabled",
        pv_status::NO_VERSION => "no-common-version",
        pv_status::NOT_FOUND => "not-found",
        pv_status::NOT_TRIED => "not-tried",
        _ => "unknown",
    }
}

/// Builds the report from the guests' mailboxes and the host's counts.
pub fn report(mailboxes: &[Mailbox], host: &[HostCounts]) -> PvReport {
    let negotiated: Option<Negotiated> = mailboxes
        .iter()
        .find(|m| m.pv_status == pv_status::ENABLED)
        .and_then(|m| decode_answer(m.pv_answer));
    PvReport {
        version: negotiated.map_or(0, |n| n.version),
        features: feature_names(negotiated.map_or(0, |n| n.features)),
        per_vcpu: mailboxes
            .iter()
            .enumerate()
            .map(|(i, m)| PvVcpuReport {
                status: status_name(m.pv_status).to_string(),
                requests: m.pv_requests,
                quiet: m.pv_quiet,
                boost_rings: m.pv_boost_rings,
                unboost_rings: m.pv_unboost_rings,
                host: host.get(i).copied().unwrap_or_default(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_are_named() {
        assert_eq!(feature_names(feature::ALL_V1).len(), 3);
        assert_eq!(feature_names(feature::VCPU_HINT), ["vcpu-hint"]);
        assert!(feature_names(0).is_empty());
    }

    #[test]
    fn report_takes_the_negotiated_answer_and_counts() {
        let m = Mailbox {
            pv_status: pv_status::ENABLED,
            pv_answer: 1 | ((feature::DEADLINE_HINT as u64) << 32),
            pv_requests: 10,
            pv_boost_rings: 4,
            ..Default::default()
        };
        let off = Mailbox::default();
        let host = [HostCounts {
            doorbells: 4,
            ..Default::default()
        }];
        let r = report(&[m, off], &host);
        assert_eq!(r.version, 1);
        assert_eq!(r.features, ["deadline-hint"]);
        assert_eq!(r.per_vcpu[0].host.doorbells, 4);
        assert_eq!(r.per_vcpu[1].status, "not-tried");
        assert_eq!(r.per_vcpu[1].host, HostCounts::default());
    }
}
