//! Driver options: `key=value` pairs (`--policy-opt cs_budget=3ms`), checked by each driver.

use crate::{BoostClass, Nanos};
use std::collections::BTreeMap;

/// A bad option.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    /// Not `key=value`.
    #[error("option {0:?} is not key=value")]
    Syntax(String),
    /// The driver has no such option.
    #[error("driver {driver} has no option {key:?} (it has: {known})")]
    Unknown {
        /// Driver name.
        driver: &'static str,
        /// The key given.
        key: String,
        /// Keys it has.
        known: String,
    },
    /// The value does not parse.
    #[error("option {key}={value}: {why}")]
    Value {
        /// Key.
        key: String,
        /// Value.
        value: String,
        /// What was expected.
        why: &'static str,
    },
}

/// Options for one driver instance.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DriverOptions(BTreeMap<String, String>);

impl DriverOptions {
    /// No options.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses `key=value` strings; a later key overrides an earlier one.
    pub fn parse<'a>(items: impl IntoIterator<Item = &'a str>) -> Result<Self, OptionError> {
        let mut m = BTreeMap::new();
        for it in items {
            let (k, v) = it
                .split_once('=')
                .filter(|(k, _)| !k.trim().is_empty())
                .ok_or_else(|| OptionError::Syntax(it.to_string()))?;
            m.insert(k.trim().to_string(), v.trim().to_string());
        }
        Ok(DriverOptions(m))
    }

    /// Adds or replaces one option.
    pub fn set(mut self, key: &str, value: &str) -> Self {
        self.0.insert(key.to_string(), value.to_string());
        self
    }

    /// Fails on keys not in `known`.
    pub fn check_known(&self, driver: &'static str, known: &[&str]) -> Result<(), OptionError> {
        match self.0.keys().find(|k| !known.contains(&k.as_str())) {
            Some(k) => Err(OptionError::Unknown {
                driver,
                key: k.clone(),
                known: if known.is_empty() {
                    "none".into()
                } else {
                    known.join(", ")
                },
            }),
            None => Ok(()),
        }
    }

    /// The raw value of `key`, if given.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// A duration option, or `default`.
    pub fn duration(&self, key: &str, default: Nanos) -> Result<Nanos, OptionError> {
        match self.0.get(key) {
            None => Ok(default),
            Some(v) => parse_duration(v).ok_or_else(|| OptionError::Value {
                key: key.into(),
                value: v.clone(),
                why: "expected a duration such as 500us, 3ms or 1s",
            }),
        }
    }

    /// A boost-class option, or `default`.
    pub fn class(&self, key: &str, default: BoostClass) -> Result<BoostClass, OptionError> {
        match self.0.get(key) {
            None => Ok(default),
            Some(v) => parse_class(v).ok_or_else(|| OptionError::Value {
                key: key.into(),
                value: v.clone(),
                why: CLASS_FORMS,
            }),
        }
    }
}

/// Parses `<n>ns|us|ms|s` (a whole number).
pub fn parse_duration(s: &str) -> Option<Nanos> {
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    let mult = match unit {
        "ns" => 1,
        "us" | "µs" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// The boost classes [`parse_class`] accepts, for error messages.
pub const CLASS_FORMS: &str = "expected one of fifo:<1-99>, rr:<1-99>, \
     deadline:<runtime>/<period> (runtime >= 1024ns, <= period), slice:<100us-100ms> or \
     nice:<-20..19>";

/// Shortest and longest EEVDF custom slice the kernel takes (`sched_runtime` of a
/// `SCHED_OTHER` task is clamped to this range).
pub const SLICE_RANGE: (Nanos, Nanos) = (100_000, 100_000_000);

/// Shortest and longest repayment pause ([`BoostClass::Pause`]): below 10 µs a sleep costs
/// more than it gives back; above 10 ms the guest's timers would wait too long.
pub const PAUSE_RANGE: (Nanos, Nanos) = (10_000, 10_000_000);

/// The repayment classes [`parse_repay`] accepts, for error messages.
pub const REPAY_FORMS: &str =
    "expected off, nice:<-20..19>, slice:<100us-100ms> or pause:<10us-10ms>";

/// Parses a repayment class (the `repay` option, without `off`): `nice:<-20..19>`,
/// `slice:<duration>` (100 µs to 100 ms) or `pause:<duration>` (10 µs to 10 ms,
/// [`PAUSE_RANGE`]).
pub fn parse_repay(s: &str) -> Option<BoostClass> {
    if let Some(d) = s.strip_prefix("pause:") {
        return parse_duration(d)
            .filter(|d| (PAUSE_RANGE.0..=PAUSE_RANGE.1).contains(d))
            .map(BoostClass::Pause);
    }
    parse_class(s).filter(|c| matches!(c, BoostClass::Nice(_) | BoostClass::Slice(_)))
}

/// Parses a boost class: `fifo:<1-99>`, `rr:<1-99>`, `deadline:<runtime>/<period>`,
/// `slice:<duration>` (100 µs to 100 ms), `nice:<-20..19>`.
pub fn parse_class(s: &str) -> Option<BoostClass> {
    if s == "idle" {
        return Some(BoostClass::Idle);
    }
    let (name, arg) = s.split_once(':')?;
    let prio = || arg.parse::<u32>().ok().filter(|p| (1..=99).contains(p));
    match name {
        "fifo" => prio().map(BoostClass::Fifo),
        "rr" => prio().map(BoostClass::Rr),
        "slice" => parse_duration(arg)
            .filter(|d| (SLICE_RANGE.0..=SLICE_RANGE.1).contains(d))
            .map(BoostClass::Slice),
        "nice" => arg
            .parse::<i32>()
            .ok()
            .filter(|n| (-20..=19).contains(n))
            .map(BoostClass::Nice),
        "deadline" => {
            let (r, p) = arg.split_once('/')?;
            let (runtime_ns, period_ns) = (parse_duration(r)?, parse_duration(p)?);
            // The kernel needs 1024 ns <= runtime <= deadline <= period, and a period within
            // its limits (sched_deadline_period_{min,max}_us: 100 µs to 4 s by default).
            (runtime_ns >= 1024
                && runtime_ns <= period_ns
                && (100_000..=4_000_000_000).contains(&period_ns))
            .then_some(BoostClass::Deadline {
                runtime_ns,
                deadline_ns: period_ns,
                period_ns,
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pairs_and_values() {
        let o = DriverOptions::parse(["cs_budget=2ms", "class=rr:7"]).unwrap();
        assert_eq!(o.duration("cs_budget", 1).unwrap(), 2_000_000);
        assert_eq!(o.duration("cooldown", 5).unwrap(), 5);
        assert_eq!(
            o.class("class", BoostClass::Fifo(1)).unwrap(),
            BoostClass::Rr(7)
        );
        assert!(o.check_known("dynamic", &["cs_budget", "class"]).is_ok());
        let e = o.check_known("none", &[]).unwrap_err();
        assert!(e.to_string().contains("has no option"), "{e}");
    }

    #[test]
    fn rejects_bad_input() {
        assert!(DriverOptions::parse(["novalue"]).is_err());
        assert!(DriverOptions::parse(["=3"]).is_err());
        let o = DriverOptions::parse(["cs_budget=fast", "class=fifo:0"]).unwrap();
        assert!(o.duration("cs_budget", 0).is_err());
        assert!(o.class("class", BoostClass::Fifo(1)).is_err());
        assert_eq!(parse_duration("18446744073709551615s"), None, "overflow");
        assert_eq!(parse_duration("10"), None, "unit required");
    }

    #[test]
    fn repayments_take_a_pause_that_no_boost_class_does() {
        assert_eq!(parse_repay("pause:200us"), Some(BoostClass::Pause(200_000)));
        assert_eq!(parse_repay("nice:10"), Some(BoostClass::Nice(10)));
        assert_eq!(parse_repay("slice:1ms"), Some(BoostClass::Slice(1_000_000)));
        for bad in [
            "pause:5us",
            "pause:11ms",
            "pause:",
            "pause",
            "fifo:10",
            "idle",
        ] {
            assert_eq!(parse_repay(bad), None, "{bad}");
        }
        assert_eq!(parse_class("pause:200us"), None, "not a boost class");
        for c in [BoostClass::Pause(200_000), BoostClass::Pause(10_500)] {
            assert_eq!(parse_repay(&c.to_string()), Some(c), "{c}");
        }
        assert!(!BoostClass::Pause(200_000).takes_extra_share());
        assert!(!BoostClass::Pause(200_000).is_realtime());
    }

    #[test]
    fn fair_classes() {
        assert_eq!(parse_class("slice:100us"), Some(BoostClass::Slice(100_000)));
        assert_eq!(parse_class("nice:-5"), Some(BoostClass::Nice(-5)));
        for bad in [
            "slice:50us",
            "slice:1s",
            "slice:x",
            "nice:-21",
            "nice:20",
            "bogus:1",
        ] {
            assert_eq!(parse_class(bad), None, "{bad}");
        }
        let e = DriverOptions::parse(["class=slice:5us"])
            .unwrap()
            .class("class", BoostClass::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("slice:5us") && e.contains("slice:<100us-100ms>"),
            "{e}"
        );
    }

    #[test]
    fn deadline_class() {
        assert_eq!(
            parse_class("deadline:500us/2ms"),
            Some(BoostClass::Deadline {
                runtime_ns: 500_000,
                deadline_ns: 2_000_000,
                period_ns: 2_000_000
            })
        );
        assert_eq!(parse_class("deadline:3ms/2ms"), None);
        assert_eq!(parse_class("deadline:100ns/2ms"), None);
    }
}
