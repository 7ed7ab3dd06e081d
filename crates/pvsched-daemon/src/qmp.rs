//! QEMU's QMP: vCPU thread ids from `query-cpus-fast`, for VMs whose threads the daemon should
//! not have to guess by name.

use crate::daemon::Timed;
use crate::discover::{process_of, VcpuThread, Vmm};
use serde_json::{json, Value};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Longest QMP line accepted (a `query-cpus-fast` answer for hundreds of vCPUs fits).
const MAX_LINE: u64 = 256 * 1024;
/// Most lines (events) read while waiting for an answer.
const MAX_LINES: usize = 64;

/// Reads one line of at most [`MAX_LINE`] bytes.
fn read_line(r: &mut impl BufRead) -> io::Result<String> {
    let mut line = String::new();
    let n = r.by_ref().take(MAX_LINE).read_line(&mut line)?;
    if n == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "QMP closed"));
    }
    if !line.ends_with('\n') && n as u64 == MAX_LINE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("QMP line longer than {MAX_LINE} bytes"),
        ));
    }
    Ok(line)
}

/// Reads lines until an answer (`"return"` or `"error"`), skipping at most `MAX_LINES` (64)
/// events, each line at most `MAX_LINE` bytes. Public for the fuzz tests only.
#[doc(hidden)]
pub fn read_reply(r: &mut impl BufRead) -> io::Result<Value> {
    for _ in 0..MAX_LINES {
        let line = read_line(r)?;
        let v: Value = serde_json::from_str(&line)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        // Asynchronous events may come in between; answers carry "return" or "error".
        if v.get("return").is_some() || v.get("error").is_some() {
            return Ok(v);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        format!("no QMP answer within {MAX_LINES} lines"),
    ))
}

fn execute(s: &mut impl Write, r: &mut impl BufRead, cmd: &str) -> io::Result<Value> {
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
        let index = c["cpu-index"].as_u64().and_then(|i| u32::try_from(i).ok());
        // A thread id is a positive pid_t: 0 would mean the caller, a truncated one another.
        let tid = c["thread-id"]
            .as_i64()
            .and_then(|t| i32::try_from(t).ok())
            .filter(|t| *t > 0);
        let (Some(index), Some(tid)) = (index, tid) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("query-cpus-fast: entry without a valid cpu-index/thread-id: {c}"),
            ));
        };
        out.push(VcpuThread {
            index,
            tid,
            vmm: Vmm::Qemu,
        });
    }
    out.sort_by_key(|t| t.index);
    // QEMU under single-threaded TCG runs every vCPU on one thread: attached once, as the
    // lowest vCPU index that names it.
    let mut seen = std::collections::BTreeSet::new();
    out.retain(|t| seen.insert(t.tid));
    Ok(out)
}

/// Asks the QEMU behind the QMP socket `path` for its vCPU threads, within [`QMP_TIMEOUT`]
/// for the whole conversation.
pub fn query_cpus(path: &Path) -> io::Result<Vec<VcpuThread>> {
    query_cpus_within(path, QMP_TIMEOUT)
}

/// The longest a QMP conversation may take, connecting included.
pub const QMP_TIMEOUT: Duration = Duration::from_secs(5);

/// [`query_cpus`] with its deadline `within` from now.
#[doc(hidden)]
pub fn query_cpus_within(path: &Path, within: Duration) -> io::Result<Vec<VcpuThread>> {
    let deadline = Instant::now() + within;
    let s = connect_now(path)?;
    // The thread ids must be the QMP peer's own threads: a peer cannot point the daemon at
    // another process's threads (or at the daemon itself).
    let peer = crate::daemon::peer_of(&s)?;
    let mut w = Timed::new(&s, deadline);
    let mut r = BufReader::new(Timed::new(&s, deadline));
    let threads = check_owned(converse(&mut w, &mut r)?, peer.pid)?;
    // The check was on a pid: the peer must not have exited meanwhile (its pid reused).
    if crate::daemon::peer_still_there(&s) == Some(false) {
        return Err(io::Error::other("the QMP peer exited during the query"));
    }
    Ok(threads)
}

/// Connects to the Unix socket `path` without waiting: a listener that does not accept
/// (its backlog full) is an error at once, where a blocking connect would wait for ever.
fn connect_now(path: &Path) -> io::Result<UnixStream> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let addr = SocketAddrUnix::new(path)?;
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?;
    match rustix::net::connect(&fd, &addr) {
        Ok(()) => {}
        Err(rustix::io::Errno::AGAIN) => {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "the QMP socket does not accept connections (its backlog is full)",
            ))
        }
        Err(e) => return Err(e.into()),
    }
    let s = UnixStream::from(fd);
    s.set_nonblocking(false)?;
    Ok(s)
}

/// The conversation of [`query_cpus`]: greeting, capabilities negotiation, `query-cpus-fast`,
/// commands written to `w`, the peer's lines read from `r`. Public for the fuzz tests only.
#[doc(hidden)]
pub fn converse(w: &mut impl Write, r: &mut impl BufRead) -> io::Result<Vec<VcpuThread>> {
    let greeting = read_line(r)?;
    if !greeting.contains("QMP") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a QMP socket",
        ));
    }
    execute(w, r, "qmp_capabilities")?;
    parse_cpus(&execute(w, r, "query-cpus-fast")?)
}

/// Keeps `threads` only if every one belongs to process `pid` (the QMP peer).
pub fn check_owned(threads: Vec<VcpuThread>, pid: i32) -> io::Result<Vec<VcpuThread>> {
    if let Some(t) = threads.iter().find(|t| process_of(t.tid) != Some(pid)) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "QMP peer (pid {pid}) named thread {} of another process as a vCPU",
                t.tid
            ),
        ));
    }
    Ok(threads)
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
        let single = json!([
            {"cpu-index": 1, "thread-id": 4711},
            {"cpu-index": 0, "thread-id": 4711}
        ]);
        let t = parse_cpus(&single).unwrap();
        assert_eq!(
            (t.len(), t[0].index, t[0].tid),
            (1, 0, 4711),
            "one thread, once"
        );
        assert!(parse_cpus(&json!({"x": 1})).is_err());
        assert!(parse_cpus(&json!([{"cpu-index": 0}])).is_err());
        for bad in [0i64, -5, 1 << 32, (1 << 31) + 7] {
            assert!(
                parse_cpus(&json!([{"cpu-index": 0, "thread-id": bad}])).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn thread_ids_of_another_process_are_refused() {
        // SAFETY: gettid has no arguments and cannot fail.
        let me = unsafe { libc::gettid() };
        let mine = vec![VcpuThread {
            index: 0,
            tid: me,
            vmm: Vmm::Qemu,
        }];
        let pid = std::process::id() as i32;
        assert!(check_owned(mine.clone(), pid).is_ok());
        let e = check_owned(mine, 1).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
    }

    #[test]
    fn replies_are_bounded() {
        let long = vec![b'x'; MAX_LINE as usize + 10];
        let mut r = BufReader::new(&long[..]);
        assert!(read_reply(&mut r).is_err());
        let events = "{\"event\": \"X\"}\n".repeat(MAX_LINES + 1);
        let mut r = BufReader::new(events.as_bytes());
        let e = read_reply(&mut r).unwrap_err();
        assert!(e.to_string().contains("no QMP answer"), "{e}");
    }
}
