//! Issue 12's end-to-end cell: the Linux test guest is built from Debian packages
//! (guest/linux/build.sh) and `pvsched bench --guest linux-tcg` runs it under QEMU TCG for
//! one short round with the daemon, idle and under stress-ng. Skips, saying why, only where
//! the packages cannot be fetched or QEMU / stress-ng are missing.

use pvsched_testutil::{serial, skip};
use std::path::Path;
use std::process::{Command, Stdio};

#[test]
fn the_linux_guest_builds_boots_and_runs_cyclictest_under_the_daemon() {
    let _s = serial();
    let test = "the_linux_guest_builds_boots_and_runs_cyclictest_under_the_daemon";
    for tool in ["qemu-system-x86_64", "stress-ng"] {
        if let Err(e) = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
        {
            skip!("{test}: {tool}: {e}");
            return;
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("target/linux-guest");
    let build = Command::new(root.join("guest/linux/build.sh"))
        .arg(&dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&build.stderr);
    if build.status.code() == Some(3) {
        skip!("{test}: the guest's packages cannot be fetched: {err}");
        return;
    }
    assert!(build.status.success(), "build.sh: {err}");
    let out_dir = std::env::temp_dir().join(format!("pvsched-linux-tcg-{}", std::process::id()));
    let run = Command::new(env!("CARGO_BIN_EXE_pvsched"))
        .args(["bench", "--guest", "linux-tcg", "--rounds", "1"])
        .args(["--cell-duration", "2s", "--policies", "daemon"])
        .arg("--guest-dir")
        .arg(&dir)
        .arg("--out")
        .arg(&out_dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    if run.status.code() == Some(3) && stderr.contains("tracepoint") {
        skip!("{test}: no tracepoints here: {stderr}");
        return;
    }
    assert!(run.status.success(), "{stdout}\n{stderr}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("results.json")).unwrap())
            .unwrap();
    let cells = json["cells"].as_array().unwrap();
    // none and daemon, on the busy and the idle host: each ran its guest to the end.
    assert_eq!(cells.len(), 4, "{json}");
    for c in cells {
        let threads = c["runs"][0]["threads"].as_array().unwrap();
        assert_eq!(threads.len(), 2, "both cyclictest threads reported: {c}");
        for t in threads {
            assert!(t["count"].as_u64().unwrap() > 0, "{c}");
        }
        if c["busy"] == true {
            assert!(c["runs"][0]["stress_ng_ops"].as_f64().unwrap() > 0.0, "{c}");
        }
    }
    // The daemon attached the QEMU's two TCG vCPU threads and saw their wake-ups on the
    // idle host (where the guest's vCPU threads sleep between timer interrupts).
    let idle_daemon = cells
        .iter()
        .find(|c| c["busy"] == false && c["policy"] == "daemon")
        .unwrap();
    assert!(
        idle_daemon["runs"][0]["host_events"].as_u64().unwrap() > 0,
        "{idle_daemon}"
    );
    assert!(stdout.contains("## Host idle"), "{stdout}");
    let _ = std::fs::remove_dir_all(&out_dir);
}
