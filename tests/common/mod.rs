//! Helpers shared by the integration tests that run `pvsched daemon` as a process.
#![allow(dead_code)]

use pvsched_testutil::skip;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `pvsched` binary under test.
pub fn pvsched() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pvsched"))
}

/// A child process killed (and reaped) on every path out of a test.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns a daemon command and waits until it listens on `socket`; `None` (after saying why)
/// when this host cannot run it (no tracepoints, no RT privilege).
pub fn spawn_daemon(test: &str, mut cmd: Command, socket: &Path) -> Option<Child> {
    let mut d = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !socket.exists() {
        if let Some(status) = d.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            let _ = d.stderr.take().unwrap().read_to_string(&mut err);
            if status.code() == Some(3) || status.code() == Some(5) {
                skip!("{test}: {err}");
                return None;
            }
            panic!("daemon exited with {status}: {err}");
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "daemon did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Some(d)
}

/// Runs `pvsched ctl --socket <socket> <args>`: success and stdout + stderr.
pub fn ctl(socket: &Path, args: &[&str]) -> (bool, String) {
    let out = pvsched()
        .arg("ctl")
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// `ctl status` as JSON, `None` while the daemon does not answer.
pub fn ctl_status(socket: &Path) -> Option<serde_json::Value> {
    let out = pvsched()
        .arg("ctl")
        .arg("--socket")
        .arg(socket)
        .arg("status")
        .output()
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}
