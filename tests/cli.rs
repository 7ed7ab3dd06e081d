//! The `pvsched` binary as a user runs it: exit codes, messages, JSON output, Ctrl-C.
//! Tests that need KVM skip, saying why, where /dev/kvm cannot be opened.

use pvsched_testutil::{kvm_or_skip, serial};
use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn pvsched() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pvsched"))
}

/// Runs the command; one that has not exited after `limit` is killed and fails the test.
fn run_with_limit(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pvsched");
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > limit {
            let _ = child.kill();
            panic!("pvsched did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `pvsched args` must fail as a usage error (exit code 2) saying `needle`.
fn usage_error(args: &[&str], needle: &str) {
    let out = run_with_limit(pvsched().args(args), Duration::from_secs(10));
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert!(err.contains(needle), "{args:?}: {err}");
}

/// `pvsched vm` with 2 busy vCPUs, no deadline task, `hogs` host hogs and layout `layout` for
/// `duration`, plus `extra` arguments; its stdout, or `None` (skipped, printed) when the
/// privilege to set real-time classes is missing (exit code 5).
fn busy_vm(test: &str, duration: &str, hogs: &str, layout: &str, extra: &[&str]) -> Option<String> {
    let out = run_with_limit(
        pvsched()
            .args([
                "vm",
                "--vcpus",
                "2",
                "--duration",
                duration,
                "--guest-load",
                "busy",
                "--host-load",
                hogs,
                "--task-period",
                "off",
                "--layout",
                layout,
            ])
            .args(extra),
        Duration::from_secs(60),
    );
    let (stdout, err) = (text(&out.stdout), text(&out.stderr));
    if out.status.code() == Some(5) {
        pvsched_testutil::skip!("{test}: {err}");
        return None;
    }
    assert!(out.status.success(), "{stdout}\n{err}");
    Some(stdout)
}

#[test]
fn bad_arguments_are_usage_errors() {
    usage_error(&["vm", "--vcpus", "0"], "1 to 64");
    usage_error(&["vm", "--interval", "soon"], "--interval");
    usage_error(
        &["vm", "--task-work", "3ms", "--task-period", "2ms"],
        "below the period",
    );
    usage_error(
        &["vm", "--layout", "spread"],
        "unknown layout `spread` (free, apart, together)",
    );
    usage_error(
        &["vm", "--engine-class", "rt"],
        "engine class `rt`: expected deadline or fifo",
    );
    usage_error(
        &["daemon", "--engine-class", "rt"],
        "engine class `rt`: expected deadline or fifo",
    );
    usage_error(
        &["bench", "--policies", "deadline-aware+engine=rt"],
        "engine class `rt`",
    );
    usage_error(
        &["bench", "--guest", "linux-tcg", "--layout", "apart"],
        "--layout is for the testbed",
    );
    // Bench policy variants: the column and each option are checked before anything runs.
    usage_error(
        &["bench", "--policies", "deadline-aware/fast"],
        "unknown bench policy `deadline-aware/fast`",
    );
    usage_error(
        &["bench", "--policies", "deadline-aware+repay=nice:99"],
        "repay=nice:99",
    );
    usage_error(
        &["bench", "--policies", "deadline-aware+lead"],
        "`lead` is not a driver option",
    );
    usage_error(
        &[
            "bench",
            "--guest",
            "linux-tcg",
            "--policies",
            "daemon+irq_hold=1ms",
        ],
        "--daemon-opt",
    );
}

/// Two busy vCPUs at FIFO on one CPU: the first to run keeps it, the other never runs. The
/// report must show that (a vCPU with no samples) and still give boosted shares of the run, not
/// of the starved thread's few microseconds.
#[test]
fn a_starved_vcpu_shows_in_the_report() {
    let _s = serial();
    if !kvm_or_skip("a_starved_vcpu_shows_in_the_report") {
        return;
    }
    let Some(stdout) = busy_vm(
        "a_starved_vcpu_shows_in_the_report",
        "1s",
        "0",
        "together",
        &["--policy", "static", "--max-boosted", "off"],
    ) else {
        return;
    };
    let counts: Vec<u64> = stdout
        .lines()
        .filter(|l| l.starts_with("T: "))
        .map(|l| {
            let c = l
                .split("C:")
                .nth(1)
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap();
            c.parse().unwrap()
        })
        .collect();
    assert_eq!(counts.len(), 2, "{stdout}");
    let (lo, hi) = (*counts.iter().min().unwrap(), *counts.iter().max().unwrap());
    assert!(
        hi > 0 && lo * 10 < hi,
        "one vCPU starved: {counts:?}\n{stdout}"
    );
    for l in stdout.lines().filter(|l| l.starts_with("B:")) {
        let pct: f64 = l
            .split(" ms (")
            .nth(1)
            .unwrap()
            .split('%')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(pct <= 101.0, "boosted share of the run: {l}");
    }
}

/// The host-wide gate counts only the CPUs the vCPU threads may run on: two busy vCPUs pinned to
/// one CPU with the hogs on the other compete only with each other, and `deadline-aware` then
/// boosts neither; pinned beside the hogs, it boosts.
#[test]
fn vcpus_that_compete_only_with_each_other_are_not_boosted() {
    let _s = serial();
    if !kvm_or_skip("vcpus_that_compete_only_with_each_other_are_not_boosted") {
        return;
    }
    if pvsched_host::sched::affinity(0).unwrap().len() < 2 {
        pvsched_testutil::skip!(
            "vcpus_that_compete_only_with_each_other_are_not_boosted: needs 2 CPUs"
        );
        return;
    }
    for (layout, boosts) in [("together", false), ("apart", true)] {
        let Some(stdout) = busy_vm(
            "vcpus_that_compete_only_with_each_other_are_not_boosted",
            "2s",
            "2",
            layout,
            &["--policy", "deadline-aware"],
        ) else {
            return;
        };
        let total: u64 = stdout
            .lines()
            .filter(|l| l.starts_with("B:"))
            .map(|l| {
                l.split("boosts ")
                    .nth(1)
                    .unwrap()
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .parse::<u64>()
                    .unwrap()
            })
            .sum();
        // Together: at most a stray boost (a window in which one vCPU looked starved);
        // apart: thousands in 2 s.
        let ok = if boosts { total >= 100 } else { total <= 10 };
        assert!(ok, "{layout}: {total} boosts\n{stdout}");
    }
}

#[test]
fn layouts_pin_the_vcpu_threads_and_hogs() {
    let _s = serial();
    if !kvm_or_skip("layouts_pin_the_vcpu_threads_and_hogs") {
        return;
    }
    let cpus = pvsched_host::sched::affinity(0).unwrap();
    let dir = std::env::temp_dir().join(format!("pvsched-cli-layout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // `together` without hogs: only the vCPUs' own pinning keeps them on one CPU (the kernel
    // spreads two busy threads); `apart` with hogs pinned beside them.
    for (layout, hogs, shared) in [
        ("together", "0", 100.0),
        ("apart", "2", 0.0),
        ("free", "0", -1.0),
    ] {
        if layout == "apart" && cpus.len() < 2 {
            println!("layouts_pin_the_vcpu_threads_and_hogs: one CPU, `apart` not checked");
            continue;
        }
        let json = dir.join(format!("{layout}.json"));
        let json_arg = json.to_str().expect("UTF-8 temp path");
        let Some(stdout) = busy_vm(
            "layouts_pin_the_vcpu_threads_and_hogs",
            "1s",
            hogs,
            layout,
            &["--json", json_arg],
        ) else {
            return;
        };
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert_eq!(v["layout"], layout);
        let pct = v["vcpus_sharing_cpu_pct"]
            .as_f64()
            .expect("placement sampled");
        // A vCPU alone on a CPU is counted only beside hogs, and `apart` puts a hog beside
        // each vCPU.
        let alone = v["vcpu_alone_pct"].as_f64();
        if hogs == "0" {
            assert_eq!(alone, None, "{layout}: no hogs, no alone count");
        } else {
            assert_eq!(alone, Some(0.0), "{layout}: {stdout}");
        }
        if shared >= 0.0 {
            // Pinned before the guests start: every sample sees the layout.
            assert_eq!(pct, shared, "{layout}: {stdout}");
            assert!(stdout.contains(&format!("Layout: {layout}")), "{stdout}");
        } else {
            assert!(!stdout.contains("Layout:"), "{stdout}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn vm_run_prints_cyclictest_lines_and_writes_json() {
    let _s = serial();
    if !kvm_or_skip("vm_run_prints_cyclictest_lines_and_writes_json") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("pvsched-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("out.json");
    let out = run_with_limit(
        pvsched()
            .args(["vm", "--vcpus", "2", "--duration", "1s", "--json"])
            .arg(&json),
        Duration::from_secs(60),
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}\n{}", stdout, text(&out.stderr));
    for line in [
        "T: 0 (",
        "T: 1 (",
        "H: 0 p50:",
        "D: 1 period",
        "Host probe",
        "vCPU 1 thread",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in\n{stdout}");
    }
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).expect("valid JSON");
    assert_eq!(v["vcpus"], 2);
    assert_eq!(v["per_vcpu"].as_array().unwrap().len(), 2);
    assert!(v["per_vcpu"][0]["latency"]["count"].as_u64().unwrap() > 0);
    assert!(v["tsc_khz"].as_u64().unwrap() > 0);
    assert_eq!(v["pv"]["version"], 1);
    let p0 = &v["pv"]["per_vcpu"][0];
    assert!(p0["requests"].as_u64().unwrap() > 0);
    assert_eq!(
        p0["host"]["doorbells"].as_u64().unwrap(),
        p0["boost_rings"].as_u64().unwrap() + p0["unboost_rings"].as_u64().unwrap(),
        "every doorbell the guest rang reached the host"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_policies_are_usage_errors() {
    let _s = serial();
    if !kvm_or_skip("bad_policies_are_usage_errors") {
        return;
    }
    // `pvsched vm <args>` is refused as a usage error (exit 2) whose message says `why`.
    let refused = |args: &[&str], why: &str| {
        let out = run_with_limit(
            pvsched().args(["vm", "--duration", "1s"]).args(args),
            Duration::from_secs(30),
        );
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(why), "{args:?}: {err}");
    };
    refused(
        &["--policy", "fastest"],
        "available: deadline-aware, dynamic, none, static",
    );
    refused(
        &["--policy", "dynamic", "--policy-opt", "lead=1ms"],
        "has no option \"lead\"",
    );
    refused(
        &[
            "--policy",
            "deadline-aware",
            "--policy-opt",
            "repay=pause:1s",
        ],
        "pause:<10us-10ms>",
    );
}

#[test]
fn static_policy_boosts_and_reports() {
    let _s = serial();
    if !kvm_or_skip("static_policy_boosts_and_reports") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("pvsched-cli-static-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("out.json");
    let out = run_with_limit(
        pvsched()
            .args([
                "vm",
                "--duration",
                "500ms",
                "--policy",
                "static",
                "--max-boosted",
                "off",
                "--json",
            ])
            .arg(&json),
        Duration::from_secs(60),
    );
    let err = text(&out.stderr);
    if out.status.code() == Some(5) {
        pvsched_testutil::skip!("static_policy_boosts_and_reports: {err}");
        return;
    }
    assert!(out.status.success(), "{err}");
    assert!(text(&out.stdout).contains("Policy: static"));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["policy"]["driver"], "static");
    for b in v["policy"]["per_vcpu"].as_array().unwrap() {
        assert_eq!(b["boosts"], 1);
        assert_eq!(b["unboosts"], 1, "restored at the end");
    }
    // With a cap of one, one vCPU is boosted and the other waits (counted), reported so.
    let out = run_with_limit(
        pvsched()
            .args([
                "vm",
                "--vcpus",
                "2",
                "--duration",
                "500ms",
                "--policy",
                "static",
                "--max-boosted",
                "1",
                "--json",
            ])
            .arg(&json),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("capped 1"),
        "{}",
        text(&out.stdout)
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let per = v["policy"]["per_vcpu"].as_array().unwrap();
    let sum = |k: &str| per.iter().map(|b| b[k].as_u64().unwrap()).sum::<u64>();
    // One slot for two static vCPUs: the second waits once, then they take turns a quantum
    // each (every turn a yield), and every boost ended.
    assert_eq!(sum("capped"), 1, "{per:?}");
    assert!(sum("cap_yields") >= 1, "{per:?}");
    for b in per {
        assert!(b["boosts"].as_u64().unwrap() >= 1, "{per:?}");
        assert_eq!(b["boosts"], b["unboosts"], "{per:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Boosts to a `SCHED_DEADLINE` class: the kernel throttles a vCPU thread that spends its
/// runtime wherever it is, once inside the engine's lock, and such a run never finished
/// (2026-12-05). It must end on time, every thread restored, and say that its vCPU threads
/// handed their exits to the engine thread.
#[test]
fn a_deadline_boost_class_never_stalls_the_run() {
    let _s = serial();
    if !kvm_or_skip("a_deadline_boost_class_never_stalls_the_run") {
        return;
    }
    let out = run_with_limit(
        pvsched().args([
            "vm",
            "--vcpus",
            "2",
            "--guest-load",
            "busy",
            "--task-period",
            "off",
            "--host-load",
            "2",
            "--duration",
            "3s",
            "--policy",
            "deadline-aware",
            "--policy-opt",
            "class_deadline=deadline:300us/1ms",
            "--max-boosted",
            "off",
        ]),
        Duration::from_secs(60),
    );
    let err = text(&out.stderr);
    if out.status.code() == Some(5) {
        pvsched_testutil::skip!("a_deadline_boost_class_never_stalls_the_run: {err}");
        return;
    }
    assert!(out.status.success(), "{err}");
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("vCPU threads in a deadline class handed"),
        "{stdout}"
    );
}

#[test]
fn pv_off_runs_without_the_protocol() {
    let _s = serial();
    if !kvm_or_skip("pv_off_runs_without_the_protocol") {
        return;
    }
    let out = run_with_limit(
        pvsched().args(["vm", "--vcpus", "1", "--duration", "300ms", "--pv", "off"]),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("pvsched protocol: off"));
}

#[test]
fn guest_fault_exits_with_a_clear_message() {
    let _s = serial();
    if !kvm_or_skip("guest_fault_exits_with_a_clear_message") {
        return;
    }
    let out = run_with_limit(
        pvsched().args(["vm", "--duration", "30s", "--inject-fault", "gp"]),
        Duration::from_secs(20),
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(
        err.contains("#GP general protection (vector 13) at RIP 0x"),
        "{err}"
    );
}

#[test]
fn sigint_stops_the_run_and_still_reports() {
    let _s = serial();
    if !kvm_or_skip("sigint_stops_the_run_and_still_reports") {
        return;
    }
    let child = pvsched()
        .args(["vm", "--duration", "60s", "--guest-load", "busy"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: sending a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let t0 = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "Ctrl-C took {:?}",
        t0.elapsed()
    );
    assert_eq!(out.status.code(), Some(130), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("(interrupted)"), "{stdout}");
    assert!(stdout.contains("T: 0 ("), "{stdout}");
}

#[test]
fn unprivileged_user_gets_a_permission_message() {
    // SAFETY: getuid cannot fail.
    if unsafe { libc::getuid() } != 0 {
        pvsched_testutil::skip!(
            "unprivileged_user_gets_a_permission_message: needs root to drop to nobody"
        );
        return;
    }
    let meta = match std::fs::metadata("/dev/kvm") {
        Ok(m) => m,
        Err(e) => {
            pvsched_testutil::skip!("unprivileged_user_gets_a_permission_message: /dev/kvm: {e}");
            return;
        }
    };
    use std::os::unix::fs::PermissionsExt;
    if meta.permissions().mode() & 0o006 != 0 {
        pvsched_testutil::skip!(
            "unprivileged_user_gets_a_permission_message: /dev/kvm is world-accessible"
        );
        return;
    }
    let mut cmd = pvsched();
    cmd.args(["vm", "--duration", "1s"]);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(65534) != 0
                || libc::setuid(65534) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = match cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).output() {
        Ok(o) => o,
        Err(e) => {
            pvsched_testutil::skip!(
                "unprivileged_user_gets_a_permission_message: cannot run as nobody: {e}"
            );
            return;
        }
    };
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("no permission to open /dev/kvm"), "{err}");
}

#[test]
fn bench_quick_writes_a_complete_report() {
    let _s = serial();
    if !kvm_or_skip("bench_quick_writes_a_complete_report") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("pvsched-bench-smoke-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = run_with_limit(
        pvsched()
            .args(["bench", "--quick", "--cell-duration", "150ms", "--out"])
            .arg(&dir),
        Duration::from_secs(240),
    );
    let err = text(&out.stderr);
    if out.status.code() == Some(3) {
        pvsched_testutil::skip!("bench_quick_writes_a_complete_report: {err}");
        return;
    }
    assert!(out.status.success(), "{err}");
    let stdout = text(&out.stdout);
    assert!(stdout.contains("Report written to"), "{stdout}");
    // Every cell of the matrix, with a report per round (--quick runs 3 rounds).
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("results.json")).unwrap()).unwrap();
    let cells = v["cells"].as_array().unwrap();
    let n = pvsched_bench::bench::POLICIES.len();
    assert_eq!(n, 10);
    assert_eq!(
        cells.len(),
        2 * (2 * 2 * n + 1),
        "2 intervals × (2 host states × task on/off × 10 policies + floor)"
    );
    let mut keys = std::collections::BTreeSet::new();
    for c in cells {
        let k = &c["key"];
        keys.insert(format!(
            "{}/{}/{}/{}/{}",
            k["host"], k["guest_busy"], k["task"], k["policy"], k["interval_us"]
        ));
        assert_eq!(
            c["rounds"].as_array().unwrap().len(),
            3,
            "--quick runs 3 rounds"
        );
        assert!(
            c["rounds"][0]["latency"]["count"].as_u64().unwrap() > 0,
            "{k}"
        );
        // Every run reports the engine's own cost.
        assert!(
            c["rounds"][0]["policy"]["cost"]["uptime_s"]
                .as_f64()
                .unwrap()
                > 0.0,
            "{k}"
        );
        let vcpus = c["rounds"][0]["per_vcpu"].as_array().unwrap().len();
        assert_eq!(
            vcpus,
            std::thread::available_parallelism().map_or(1, |n| n.get())
        );
    }
    assert_eq!(keys.len(), cells.len(), "distinct cells");
    for policy in pvsched_bench::bench::POLICIES {
        for interval in [500, 1000] {
            for host in ["busy", "idle"] {
                for task in [true, false] {
                    assert!(
                        keys.contains(&format!("\"{host}\"/true/{task}/\"{policy}\"/{interval}")),
                        "{policy} {interval} {host} task {task}"
                    );
                }
            }
        }
    }
    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    for h in [
        "## Busy host, deadline task on: guest timer wake-up latency",
        "## Busy host, no deadline task (the RFC's cyclictest-only setting): guest timer",
        "## Idle host, deadline task on: guest timer wake-up latency",
        "## Idle host, no deadline task: guest timer wake-up latency",
        "## Busy host, deadline task on: what it costs the host, and the engine's own cost",
        "| 500 µs | engine CPU (% of a core) |",
        "| 500 µs | engine wake-ups / s |",
        "| 500 µs | sched_setattr / s |",
        "## Busy host: deadline-task glitches",
        "| 500 µs | 10 ms task |",
        "## Ratios",
        "## RFC v1 figures",
    ] {
        assert!(md.contains(h), "report.md lacks {h:?}");
    }
    for svg in [
        "latency-cdf-busy-500us.svg",
        "latency-cdf-busy-1000us.svg",
        "glitches-busy.svg",
    ] {
        let s = std::fs::read_to_string(dir.join(svg)).unwrap();
        assert!(s.starts_with("<svg") && s.contains("</svg>"), "{svg}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bench_report_from_writes_an_earlier_runs_report_again() {
    // A real run's results, kept in the repository: read back with this build's tables.
    let run = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("docs/results/bench-2026-12-05-0334-default");
    let out = std::env::temp_dir().join(format!("pvsched-report-from-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let o = pvsched()
        .args(["bench", "--report-from"])
        .arg(&run)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    let first = std::fs::read_to_string(run.join("report.md")).unwrap();
    assert_eq!(
        md.lines().next(),
        first.lines().next(),
        "the run's own title"
    );
    assert!(md.contains("## At a glance: the promise, checked"), "{md}");
    assert!(md.contains("| 500 µs | deadline-aware | "), "{md}");
    // The tables that were there stay as they were.
    let table = "## Busy host, deadline task on: guest timer wake-up latency (µs)";
    let section = |t: &str| {
        t[t.find(table).unwrap()..]
            .split("\n\n")
            .nth(1)
            .map(String::from)
    };
    assert_eq!(section(&md), section(&first));
    let _ = std::fs::remove_dir_all(&out);
    // Not a bench's results: a clear error, no report.
    let bad = std::env::temp_dir().join(format!("pvsched-report-bad-{}", std::process::id()));
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("results.json"), "{\"cells\": 3}").unwrap();
    let o = pvsched()
        .args(["bench", "--report-from"])
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("is not the results.json of a pvsched bench run"),
        "{err}"
    );
    assert!(!bad.join("report.md").exists());
    // A run option beside it is refused.
    let o = pvsched()
        .args(["bench", "--rounds", "2", "--report-from"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let _ = std::fs::remove_dir_all(&bad);
}

/// Paying back by pausing, on real KVM: `deadline-aware`'s vCPUs beside two hogs spend part
/// of their repayments off the CPU (its default, reported per vCPU), and the run ends.
#[test]
fn deadline_aware_pays_back_by_pausing_its_vcpus() {
    let _s = serial();
    if !kvm_or_skip("deadline_aware_pays_back_by_pausing_its_vcpus") {
        return;
    }
    let Some(stdout) = busy_vm(
        "deadline_aware_pays_back_by_pausing_its_vcpus",
        "2s",
        "2",
        "free",
        &["--policy", "deadline-aware"],
    ) else {
        return;
    };
    let paused: Vec<f64> = stdout
        .lines()
        .filter(|l| l.starts_with("B: "))
        .filter_map(|l| {
            let ms = l.split("(paused ").nth(1)?.split(" ms)").next()?;
            ms.parse().ok()
        })
        .collect();
    assert!(
        paused.iter().any(|&ms| ms > 0.0),
        "no vCPU paused while paying back: {stdout}"
    );
    // Paying back at a nice level instead, nothing pauses.
    let Some(stdout) = busy_vm(
        "deadline_aware_pays_back_by_pausing_its_vcpus",
        "1s",
        "2",
        "free",
        &[
            "--policy",
            "deadline-aware",
            "--policy-opt",
            "repay=nice:10",
        ],
    ) else {
        return;
    };
    assert!(!stdout.contains("(paused "), "{stdout}");
}
