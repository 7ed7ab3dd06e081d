//! The daemon's TOML configuration file.
//!
//! ```toml
//! [daemon]
//! socket = "/run/pvsched.sock"        # ctl socket
//! state_file = "/run/pvsched.state"   # crash recovery
//! metrics = "127.0.0.1:9477"          # Prometheus /metrics (omit to disable)
//! watch = true                        # follow VMs starting and stopping
//! host_events = ["timer"]             # timer, wakeup, irq, waking
//! boost_when = "contended"            # or "always" (also on a host with idle CPUs)
//! max_boosted = "auto"                # vCPUs boosted at once: host CPUs - 1; a count, or "off"
//! allow_uids = [0]                    # owners whose VMs may be boosted (default: root)
//! allow_gids = [107]                  # ... or groups, e.g. libvirt's "qemu" (getent group qemu)
//! ctl_group = 10                      # may read `ctl status` (socket 0660); changes: root only
//! ivshmem = "/run/pvsched-ivshmem.sock" # serve QEMU ivshmem-doorbell devices (guest module)
//! base_slice = "100us"                # vCPU threads on an EEVDF custom slice between boosts
//! vmm_slice = "100us"                 # each VM process's main thread on a custom slice
//! engine_class = "fifo"               # engine thread above the boosts: "fifo" or "deadline"
//!
//! [policy]
//! driver = "dynamic"
//! options = { cs_budget = "2ms", rt_budget = "500ms", recovery = "1", class = "fifo:10" }
//!
//! [[vm]]
//! pid = 1234                          # vCPU threads found by name
//! guest_memory = "/run/vm.mem"        # optional: guest RAM file (e.g. pvsched vm --memory-file)
//! slots = [0x200800, 0x210800]        # ... and the guests' pvsched slot addresses, by vCPU
//! features = ["deadline_hint"]        # the features the VMM negotiated with the guest
//! tsc_offset = 6912                   # optional: guest TSC - host TSC (deadline hints)
//!
//! [[vm]]
//! pid = 1235
//! guest_memory = "/run/vm2.mem"
//! protocol = "v3"                     # the addresses are pvsched v3 pages (policy v3-default)
//! slots = [0x209000, 0x219000]
//!
//! [[vm]]
//! qmp = "/run/qemu-vm1.qmp"           # vCPU threads from QEMU's query-cpus-fast
//!
//! [[vm]]
//! tids = [4711, 4712]                 # explicit vCPU thread ids, in vCPU order
//! ```

use crate::daemon::{DaemonConfig, VmSource, VmSpec};
use crate::slots::ProtocolSpec;
use pvsched_host::trace::TraceConfig;
use pvsched_policy::{DriverOptions, OptionError};
use pvsched_proto::abi::feature;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Errors of reading a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// The TOML is malformed or has unknown keys.
    #[error("invalid configuration {0}")]
    Parse(PathBuf, #[source] toml::de::Error),
    /// A value is invalid.
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// A policy option is invalid.
    #[error("invalid policy option")]
    Option(#[from] OptionError),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    daemon: DaemonSection,
    #[serde(default)]
    policy: PolicySection,
    #[serde(default)]
    vm: Vec<VmSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DaemonSection {
    #[serde(default = "default_socket")]
    socket: PathBuf,
    #[serde(default = "default_state")]
    state_file: PathBuf,
    metrics: Option<String>,
    #[serde(default)]
    metrics_public: bool,
    #[serde(default)]
    watch: bool,
    #[serde(default = "default_events")]
    host_events: Vec<String>,
    #[serde(default = "default_boost_when")]
    boost_when: String,
    #[serde(default)]
    max_boosted: Option<MaxBoostedField>,
    #[serde(default = "default_allow_uids")]
    allow_uids: Vec<u32>,
    #[serde(default)]
    allow_gids: Vec<u32>,
    ctl_group: Option<u32>,
    ivshmem: Option<PathBuf>,
    base_slice: Option<String>,
    vmm_slice: Option<String>,
    engine_class: Option<String>,
}

impl Default for DaemonSection {
    fn default() -> Self {
        DaemonSection {
            socket: default_socket(),
            state_file: default_state(),
            metrics: None,
            metrics_public: false,
            watch: false,
            host_events: default_events(),
            boost_when: default_boost_when(),
            max_boosted: None,
            allow_uids: default_allow_uids(),
            allow_gids: Vec::new(),
            ctl_group: None,
            ivshmem: None,
            base_slice: None,
            vmm_slice: None,
            engine_class: None,
        }
    }
}

fn default_socket() -> PathBuf {
    "/run/pvsched.sock".into()
}
fn default_state() -> PathBuf {
    "/run/pvsched.state".into()
}
fn default_allow_uids() -> Vec<u32> {
    vec![0]
}
/// `max_boosted = 3`, `"auto"` or `"off"`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum MaxBoostedField {
    Count(i64),
    Word(String),
}

fn default_boost_when() -> String {
    "contended".into()
}
fn default_events() -> Vec<String> {
    vec!["timer".into()]
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicySection {
    #[serde(default = "default_driver")]
    driver: String,
    #[serde(default)]
    options: BTreeMap<String, String>,
}

impl Default for PolicySection {
    fn default() -> Self {
        PolicySection {
            driver: default_driver(),
            options: BTreeMap::new(),
        }
    }
}

fn default_driver() -> String {
    "dynamic".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmSection {
    pid: Option<i32>,
    qmp: Option<PathBuf>,
    tids: Option<Vec<i32>>,
    guest_memory: Option<PathBuf>,
    slots: Option<Vec<u64>>,
    tsc_offset: Option<i64>,
    features: Option<Vec<String>>,
    protocol: Option<String>,
}

/// Parses a configuration text (`path` names it in errors).
pub fn parse(text: &str, path: &std::path::Path) -> Result<DaemonConfig, ConfigError> {
    let f: File = toml::from_str(text).map_err(|e| ConfigError::Parse(path.to_path_buf(), e))?;
    let trace = TraceConfig::from_names(f.daemon.host_events.iter().map(String::as_str))
        .map_err(|e| ConfigError::Invalid(format!("host_events: {e}")))?;
    let mut vms = Vec::new();
    for (i, v) in f.vm.iter().enumerate() {
        let mut features = 0;
        for name in v.features.iter().flatten() {
            features |= feature::NAMES
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, bit)| *bit)
                .ok_or_else(|| {
                    ConfigError::Invalid(format!(
                        "[[vm]] #{}: unknown feature {name:?} (deadline_hint, vcpu_hint, \
                         unboost_doorbell, clock_stamp)",
                        i + 1
                    ))
                })?;
        }
        if v.tsc_offset.is_some() && features & feature::DEADLINE_HINT == 0 {
            return Err(ConfigError::Invalid(format!(
                "[[vm]] #{}: tsc_offset is for deadline hints: add \"deadline_hint\" to features",
                i + 1
            )));
        }
        let v3 = match v.protocol.as_deref() {
            None | Some("v1") => false,
            Some("v3") => true,
            Some(other) => {
                return Err(ConfigError::Invalid(format!(
                    "[[vm]] #{}: unknown protocol {other:?} (v1, v3)",
                    i + 1
                )))
            }
        };
        if v3 && (features != 0 || v.tsc_offset.is_some()) {
            return Err(ConfigError::Invalid(format!(
                "[[vm]] #{}: features and tsc_offset are protocol v1's; a v3 page has none",
                i + 1
            )));
        }
        let protocol = match (&v.guest_memory, &v.slots) {
            (Some(memory), Some(slots)) => Some(ProtocolSpec {
                memory: memory.clone(),
                slots: slots.clone(),
                tsc_offset: v.tsc_offset,
                features,
                v3,
            }),
            (None, None) if v.protocol.is_some() => {
                return Err(ConfigError::Invalid(format!(
                    "[[vm]] #{}: protocol needs guest_memory and slots",
                    i + 1
                )))
            }
            (None, None) => None,
            _ => {
                return Err(ConfigError::Invalid(format!(
                    "[[vm]] #{}: guest_memory and slots go together",
                    i + 1
                )))
            }
        };
        let source = match (v.pid, &v.qmp, &v.tids) {
            (Some(pid), None, None) => VmSource::Pid(pid),
            (None, Some(q), None) => VmSource::Qmp(q.clone()),
            (None, None, Some(t)) if !t.is_empty() => VmSource::Tids(t.clone()),
            _ => {
                return Err(ConfigError::Invalid(format!(
                    "[[vm]] #{}: give exactly one of pid, qmp or tids",
                    i + 1
                )))
            }
        };
        vms.push(VmSpec { source, protocol });
    }
    let metrics = match f.daemon.metrics {
        Some(m) => Some(m.parse().map_err(|_| {
            ConfigError::Invalid(format!(
                "metrics: {m:?} is not an address like 127.0.0.1:9477"
            ))
        })?),
        None => None,
    };
    let opts: Vec<String> = f
        .policy
        .options
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    Ok(DaemonConfig {
        vms,
        watch: f.daemon.watch,
        driver: f.policy.driver,
        opts: DriverOptions::parse(opts.iter().map(String::as_str))?,
        trace,
        socket: f.daemon.socket,
        state_file: f.daemon.state_file,
        metrics,
        metrics_public: f.daemon.metrics_public,
        allowed: crate::discover::Allowed {
            uids: f.daemon.allow_uids,
            gids: f.daemon.allow_gids,
        },
        ctl_group: f.daemon.ctl_group,
        ivshmem: f.daemon.ivshmem,
        quiet_gate: match f.daemon.boost_when.as_str() {
            "contended" => Some(pvsched_host::pressure::QuietGate::default()),
            "always" => None,
            other => {
                return Err(ConfigError::Invalid(format!(
                    "boost_when: {other:?} is neither \"contended\" nor \"always\""
                )))
            }
        },
        max_boosted: match f.daemon.max_boosted {
            None => Some(pvsched_host::runtime::default_max_boosted()),
            Some(MaxBoostedField::Word(w)) if w == "auto" => {
                Some(pvsched_host::runtime::default_max_boosted())
            }
            Some(MaxBoostedField::Word(w)) if w == "off" => None,
            Some(MaxBoostedField::Count(n)) if (1..=4096).contains(&n) => Some(n as usize),
            Some(other) => {
                return Err(ConfigError::Invalid(format!(
                    "max_boosted: {other:?} is not a count (1-4096), \"auto\" or \"off\""
                )))
            }
        },
        base_slice: match f.daemon.base_slice {
            None => None,
            Some(v) => Some(parse_base_slice(&v).map_err(ConfigError::Invalid)?),
        },
        vmm_slice: match f.daemon.vmm_slice {
            None => None,
            Some(v) => Some(parse_slice("vmm_slice", &v).map_err(ConfigError::Invalid)?),
        },
        engine_class: match f.daemon.engine_class {
            None => Default::default(),
            Some(v) => v
                .parse()
                .map_err(|e| ConfigError::Invalid(format!("engine_class: {e}")))?,
        },
    })
}

/// Parses a base slice (`base_slice`, `--base-slice`): a duration from 100 µs to 100 ms.
pub fn parse_base_slice(s: &str) -> Result<u64, String> {
    parse_slice("base_slice", s)
}

/// Parses a VMM slice (`vmm_slice`, `--vmm-slice`): a duration from 100 µs to 100 ms.
pub fn parse_vmm_slice(s: &str) -> Result<u64, String> {
    parse_slice("vmm_slice", s)
}

fn parse_slice(key: &str, s: &str) -> Result<u64, String> {
    match pvsched_policy::options::parse_class(&format!("slice:{s}")) {
        Some(pvsched_policy::BoostClass::Slice(ns)) => Ok(ns),
        _ => Err(format!(
            "{key}: {s:?} is not a duration from 100us to 100ms (an EEVDF custom slice)"
        )),
    }
}

/// Reads the configuration file at `path`.
pub fn load(path: &std::path::Path) -> Result<DaemonConfig, ConfigError> {
    use std::io::Read;
    let read = |e| ConfigError::Read(path.to_path_buf(), e);
    let mut text = String::new();
    // Bounded: parsing holds ~135 bytes per byte of TOML.
    std::fs::File::open(path)
        .map_err(read)?
        .take(MAX_CONFIG + 1)
        .read_to_string(&mut text)
        .map_err(read)?;
    if text.len() as u64 > MAX_CONFIG {
        return Err(ConfigError::Invalid(format!(
            "{} is larger than {} KiB",
            path.display(),
            MAX_CONFIG / 1024
        )));
    }
    parse(&text, path)
}

/// Largest configuration file read.
const MAX_CONFIG: u64 = 1024 * 1024;

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn full_configuration() {
        let c = parse(
            r#"
            [daemon]
            socket = "/tmp/s.sock"
            state_file = "/tmp/s.state"
            metrics = "127.0.0.1:9477"
            watch = true
            host_events = ["timer", "wakeup"]
            [policy]
            driver = "deadline-aware"
            options = { lead = "50us", class = "rr:20" }
            [[vm]]
            pid = 42
            guest_memory = "/run/vm42.mem"
            slots = [0x200800, 0x210800]
            features = ["deadline_hint", "unboost_doorbell"]
            tsc_offset = -12
            [[vm]]
            qmp = "/run/q.qmp"
            [[vm]]
            tids = [11, 12]
            "#,
            Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(c.socket, Path::new("/tmp/s.sock"));
        assert!(c.watch && c.trace.timer_expiry && c.trace.wakeup && !c.trace.accept_irq);
        assert_eq!(c.driver, "deadline-aware");
        assert_eq!(c.opts.duration("lead", 0).unwrap(), 50_000);
        assert_eq!(
            c.vms.iter().map(|v| v.source.clone()).collect::<Vec<_>>(),
            [
                VmSource::Pid(42),
                VmSource::Qmp("/run/q.qmp".into()),
                VmSource::Tids(vec![11, 12])
            ]
        );
        assert_eq!(
            c.vms[0].protocol,
            Some(ProtocolSpec {
                memory: "/run/vm42.mem".into(),
                slots: vec![0x20_0800, 0x21_0800],
                tsc_offset: Some(-12),
                features: feature::DEADLINE_HINT | feature::UNBOOST_DOORBELL,
                v3: false,
            })
        );
        assert_eq!(c.metrics.unwrap().port(), 9477);
    }

    #[test]
    fn shipped_example_parses() {
        let text = include_str!("../../../contrib/pvsched.toml");
        let c = parse(text, Path::new("contrib/pvsched.toml")).unwrap();
        assert!(c.watch && c.metrics.is_some());
        assert_eq!(c.opts.duration("irq_hold", 0).unwrap(), 200_000);
    }

    #[test]
    fn defaults_and_errors() {
        let c = parse("", Path::new("empty.toml")).unwrap();
        assert_eq!(c.driver, "dynamic");
        assert!(c.trace.timer_expiry && c.metrics.is_none() && c.vms.is_empty());
        assert_eq!(c.base_slice, None);
        assert_eq!(c.engine_class, pvsched_host::mechanism::EngineClass::Fifo);
        let c = parse("[daemon]\nbase_slice = \"250us\"", Path::new("b.toml")).unwrap();
        assert_eq!(c.base_slice, Some(250_000));
        let c = parse("[daemon]\nengine_class = \"deadline\"", Path::new("e.toml")).unwrap();
        assert_eq!(
            c.engine_class,
            pvsched_host::mechanism::EngineClass::Deadline
        );
        let e = parse("[daemon]\nengine_class = \"rt\"", Path::new("e.toml")).unwrap_err();
        assert!(e.to_string().contains("engine_class"), "{e}");
        let c = parse("[daemon]\nvmm_slice = \"200us\"", Path::new("b.toml")).unwrap();
        assert_eq!((c.base_slice, c.vmm_slice), (None, Some(200_000)));
        let e = parse("[daemon]\nvmm_slice = \"5us\"", Path::new("b.toml")).unwrap_err();
        assert!(e.to_string().contains("vmm_slice"), "{e}");
        for bad in [
            "[daemon]\nbase_slice = \"50us\"",
            "[daemon]\nbase_slice = \"1s\"",
            "[daemon]\nbase_slice = \"fifo:10\"",
            "[daemon]\nsocket = 3",
            "[daemon]\nunknown = 1",
            "[[vm]]\npid = 1\nqmp = \"/x\"",
            "[[vm]]\n",
            "[[vm]]\npid = 1\nslots = [0x800]",
            "[daemon]\nhost_events = [\"kvm_exit\"]",
            "[daemon]\nmetrics = \"everywhere\"",
            "[policy]\noptions = { cs_budget = 3 }",
            "[daemon]\nmax_boosted = 0",
            "[daemon]\nmax_boosted = \"many\"",
            "[[vm]]\npid = 1\nguest_memory = \"/m\"\nslots = [0x800]\nfeatures = [\"telepathy\"]",
            "[[vm]]\npid = 1\nguest_memory = \"/m\"\nslots = [0x800]\ntsc_offset = 5",
            "[[vm]]\npid = 1\nguest_memory = \"/m\"\nslots = [0x1000]\nprotocol = \"v2\"",
            "[[vm]]\npid = 1\nprotocol = \"v3\"",
            "[[vm]]\npid = 1\nguest_memory = \"/m\"\nslots = [0x1000]\nprotocol = \"v3\"\n\
             features = [\"vcpu_hint\"]",
        ] {
            assert!(parse(bad, Path::new("bad.toml")).is_err(), "{bad}");
        }
        let c = parse(
            "[[vm]]\npid = 1\nguest_memory = \"/m\"\nslots = [0x209000]\nprotocol = \"v3\"",
            Path::new("v3.toml"),
        )
        .unwrap();
        assert_eq!(
            c.vms[0].protocol,
            Some(ProtocolSpec {
                memory: "/m".into(),
                slots: vec![0x20_9000],
                tsc_offset: None,
                features: 0,
                v3: true,
            })
        );
    }
}
