//! QEMU's QMP: vCPU thread ids from `query-cpus-fast`, for VMs whose threads the daemon should
//! not have to guess by name.

use crate::discover::{VcpuThread, Vmm};
use serde_json::{json, Value};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

fn read_reply(r: &mut impl BufRead) -> io::Result<Value> {
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "QMP closed"));
        }
        let v: Value = serde_json::from_str(&line)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        // Asynchronous events may come in between; answers carry "return" or "error".
        if v.get("return").is_some() || v.get("error").is_some() {
            return Ok(v);
        }
    }
}

fn execute(s: &mut UnixStream, r: &mut impl BufRead, cmd: &str) -> io::Result<Value> {
    s.write_all(format!("{}\n", json!({ "execute": cmd })).as_bytes())?;
    let v = read_reply(r)?;
    match v.get("error") {
        Some(e) => Err(io::Error::other(format!("QMP {cmd}: {e}"))),
        None => Ok(v["return"].clone()),
    }
}

/// Parses the answer of `query-cpus-fast` into vCPU threads.
pub fn parse_cpus(ret: &Value) -> io::Result<Vec<VcpuThread>> {
    let arr = ret
        .as_array()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "query-cpus-fast: not a list"))?;
    let mut out = Vec::with_capacity(arr.len());
    for c in arr {
        let (Some(index), Some(tid)) = (c["cpu-index"].as_u64(), c["thread-id"].as_i64()) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("query-cpus-fast: entry without cpu-index/thread-id: {c}"),
            ));
        };
        out.push(VcpuThread {
            index: index as u32,
            tid: tid as i32,
            vmm: Vmm::Qemu,
        });
    }
    out.sort_by_key(|t| t.index);
    Ok(out)
}

/// Asks the QEMU behind the QMP socket `path` for its vCPU threads.
pub fn query_cpus(path: &Path) -> io::Result<Vec<VcpuThread>> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut r = BufReader::new(s.try_clone()?);
    // Greeting, then capabilities negotiation.
    let mut greeting = String::new();
    r.read_line(&mut greeting)?;
    if !greeting.contains("QMP") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a QMP socket",
        ));
    }
    execute(&mut s, &mut r, "qmp_capabilities")?;
    parse_cpus(&execute(&mut s, &mut r, "query-cpus-fast")?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_cpus_fast_answer_parses() {
        let ret = json!([
            {"cpu-index": 1, "thread-id": 4712, "qom-path": "/machine/unattached/device[1]", "target": "x86_64"},
            {"cpu-index": 0, "thread-id": 4711, "qom-path": "/machine/unattached/device[0]", "target": "x86_64"}
        ]);
        let t = parse_cpus(&ret).unwrap();
        assert_eq!(
            (t[0].index, t[0].tid, t[1].index, t[1].tid),
            (0, 4711, 1, 4712)
        );
        assert!(parse_cpus(&json!({"x": 1})).is_err());
        assert!(parse_cpus(&json!([{"cpu-index": 0}])).is_err());
    }
}
