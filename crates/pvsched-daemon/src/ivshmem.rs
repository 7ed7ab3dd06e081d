//! The daemon as the server of QEMU's `ivshmem-doorbell` device: the transport of protocol
//! version 1 for Linux guests with the pvsched guest module (`guest/linux/module`,
//! `docs/protocol.md` section 13).
//!
//! QEMU (`-chardev socket,path=P,id=c -device ivshmem-doorbell,chardev=c`) connects to the
//! socket; the daemon answers with the ivshmem server protocol (QEMU's
//! `docs/specs/ivshmem-spec.rst`): the protocol version 0, the guest's peer id, the shared
//! memory (a sealed memfd the daemon created and keeps mapped) and the eventfd of the
//! daemon's own peer, id 1, vector 0: the guest's doorbell, written by QEMU when the guest
//! writes `1 << 16 | 0` to the device's doorbell register. The memory holds the transport
//! header ([`pvsched_proto::ivshmem`]) and one slot per guest CPU; the VM is attached (its
//! vCPU threads found by the connecting process's id) once the guest module has written a
//! valid answer, and detached when the module lets go, QEMU disconnects or the daemon stops.

use crate::slots::{GuestSlots, ProtocolSpec};
use pvsched_proto::ivshmem::{answer, Answer, AnswerError, Offer, SHM_SIZE};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// The ivshmem server protocol version QEMU expects first.
const IVSHMEM_PROTOCOL: i64 = 0;
/// The daemon's peer id (its vector 0 is the doorbell).
pub const DAEMON_PEER: u16 = 1;
/// The peer id every guest gets (each VM has its own connection and memory): 0, which QEMU
/// makes the device's migration master (`master=auto`), so the VM stays migratable.
pub const GUEST_PEER: i64 = 0;
/// How long a peer may take to take the set-up messages.
const SEND_TIMEOUT: Duration = Duration::from_millis(500);

/// The listening socket.
pub struct IvshmemServer {
    listener: UnixListener,
    path: PathBuf,
}

impl IvshmemServer {
    /// Listens on `path` (a stale socket there is replaced; a live one, or any other file, is
    /// an error). The socket is open to every local user (mode 0666): who connects is
    /// checked by its process (`SO_PEERCRED`) before it gets anything.
    pub fn bind(path: &Path) -> io::Result<IvshmemServer> {
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => {
                if UnixStream::connect(path).is_ok() {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!("{} is served by another process", path.display()),
                    ));
                }
                std::fs::remove_file(path)?
            }
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
        Ok(IvshmemServer {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// The socket's fd, readable when a peer is waiting.
    pub fn fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// The next waiting peer, if any: its stream and process id.
    pub fn accept(&self) -> io::Result<Option<(UnixStream, i32)>> {
        match self.listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                let pid = crate::daemon::peer_of(&s)?.pid;
                Ok(Some((s, pid)))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl Drop for IvshmemServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One VMM's connection: its shared memory, doorbell and doorbell count.
pub struct Connection {
    stream: UnixStream,
    /// The connecting process.
    pub pid: i32,
    shm: File,
    mem: GuestMemoryMmap,
    offer: Offer,
    bell: Arc<EventFd>,
    doorbells: Arc<AtomicU64>,
    /// The VM attached for it, when the guest's answer was valid, and that answer.
    pub vm: Option<(u32, Answer)>,
    /// The VM of the same process attached without slots before (`--pid`, `--qmp`,
    /// `--watch`, a `[[vm]]`): attached again when this one is detached.
    pub replaced: Option<crate::daemon::VmSource>,
    /// No attach before this (after the guest let go: a guest flipping its status does not
    /// make the daemon attach and detach at its pace).
    pub not_before: Option<std::time::Instant>,
    /// Why the VM is not attached, as last logged.
    pub problem: Option<String>,
}

/// A sealed memfd of `len` bytes: nobody, QEMU included, can shrink it under a mapping.
fn sealed_memfd(name: &str, len: usize) -> io::Result<File> {
    let cname = std::ffi::CString::new(name).map_err(io::Error::other)?;
    // SAFETY: `cname` is a NUL-terminated string that outlives the call; memfd_create
    // returns a new descriptor or -1.
    let fd =
        unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let f = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    f.set_len(len as u64)?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on an open memfd created with MFD_ALLOW_SEALING takes an int.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(f)
}

impl Connection {
    /// Sets up the peer `stream` of process `pid`: creates and maps the memory, writes the
    /// offer (deadline hints with the clock stamp only with `hints`), and sends the ivshmem
    /// set-up messages.
    pub fn setup(stream: UnixStream, pid: i32, hints: bool) -> io::Result<Connection> {
        let shm = sealed_memfd("pvsched-ivshmem", SHM_SIZE)?;
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            SHM_SIZE,
            Some(FileOffset::new(shm.try_clone()?, 0)),
        )])
        .map_err(io::Error::other)?;
        let offer = Offer::daemon(DAEMON_PEER, hints);
        let mut hdr = [0u8; 0x80];
        offer.write(&mut hdr);
        mem.write_slice(&hdr, GuestAddress(0))
            .map_err(io::Error::other)?;
        let bell = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        stream.set_write_timeout(Some(SEND_TIMEOUT))?;
        let mut s = &stream;
        s.write_all(&IVSHMEM_PROTOCOL.to_le_bytes())?;
        s.write_all(&GUEST_PEER.to_le_bytes())?;
        send_fd(&stream, -1, shm.as_raw_fd())?;
        send_fd(&stream, i64::from(DAEMON_PEER), bell.as_raw_fd())?;
        stream.set_nonblocking(true)?;
        Ok(Connection {
            stream,
            pid,
            shm,
            mem,
            offer,
            bell: Arc::new(bell),
            doorbells: Arc::new(AtomicU64::new(0)),
            vm: None,
            replaced: None,
            not_before: None,
            problem: None,
        })
    }

    /// Logs `problem` (a warning) unless it was the last one logged.
    pub fn note(&mut self, problem: String) {
        if self.problem.as_ref() != Some(&problem) {
            tracing::warn!(pid = self.pid, "ivshmem: {problem}");
            self.problem = Some(problem);
        }
    }

    /// The guest's answer as it stands.
    pub fn answer(&self) -> Result<Option<Answer>, AnswerError> {
        let mut hdr = [0u8; 0x80];
        // The mapping is ours and sealed: reading its first bytes cannot fail.
        let _ = self.mem.read_slice(&mut hdr, GuestAddress(0));
        answer(&hdr, &self.offer)
    }

    /// True once QEMU closed its end (it exited or unplugged the device), or sent anything:
    /// the protocol has nothing for a peer to say to the server, so a peer that talks is
    /// dropped (it cannot keep the daemon reading).
    pub fn hung_up(&self) -> bool {
        let mut buf = [0u8; 1];
        loop {
            match (&self.stream).read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {
                    tracing::warn!(pid = self.pid, "ivshmem: the peer sent data: dropped");
                    return true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return true,
            }
        }
    }

    /// The slots of the guest's `cpus` CPUs, for the runtime, with the doorbell.
    pub fn slots(&self, a: Answer) -> io::Result<(GuestSlots, Doorbell)> {
        let spec = ProtocolSpec {
            memory: PathBuf::from(format!("ivshmem memory of pid {}", self.pid)),
            slots: (0..a.cpus).map(|i| self.offer.slot(i)).collect(),
            tsc_offset: None,
            features: a.features,
            v3: false,
        };
        let slots = GuestSlots::from_file(self.shm.try_clone()?, &spec)?;
        Ok((
            slots,
            Doorbell {
                bell: self.bell.clone(),
                count: self.doorbells.clone(),
            },
        ))
    }

    /// Doorbells rung so far, including those not yet seen by the runtime.
    pub fn doorbells(&self) -> u64 {
        if let Ok(n) = self.bell.read() {
            self.doorbells.fetch_add(n, Ordering::Relaxed);
        }
        self.doorbells.load(Ordering::Relaxed)
    }

    /// Publishes `Disabled` into every slot (after the VM was detached: the guest stops
    /// ringing until it is attached again).
    pub fn disable(&self) {
        for i in 0..self.offer.slots {
            let gpa = GuestAddress(self.offer.slot(i) + pvsched_proto::abi::off::STATE as u64);
            let _ = self
                .mem
                .write_obj(pvsched_proto::BoostState::Disabled as u32, gpa);
        }
    }
}

/// One ivshmem message: `value` (little-endian i64) with `fd`.
fn send_fd(stream: &UnixStream, value: i64, fd: RawFd) -> io::Result<()> {
    let bytes = value.to_le_bytes();
    let n = stream
        .send_with_fd(&bytes[..], fd)
        .map_err(io::Error::other)?;
    if n != bytes.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "short write of an ivshmem message",
        ));
    }
    Ok(())
}

/// A VM's doorbell as the runtime's slot source sees it: an eventfd to wait on, and the
/// count of rings it consumed.
pub struct Doorbell {
    bell: Arc<EventFd>,
    count: Arc<AtomicU64>,
}

impl Doorbell {
    /// The eventfd.
    pub fn fd(&self) -> RawFd {
        self.bell.as_raw_fd()
    }

    /// The count of consumed rings.
    pub fn counter(&self) -> Arc<AtomicU64> {
        self.count.clone()
    }

    /// Consumes the pending rings (counted).
    pub fn take(&self) {
        if let Ok(n) = self.bell.read() {
            self.count.fetch_add(n, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pvsched_proto::ivshmem::off;

    /// Reads one ivshmem message as QEMU does: the value and the fd that came with it.
    fn recv(s: &UnixStream) -> (i64, Option<File>) {
        let mut buf = [0u8; 8];
        let (n, f) = s.recv_with_fd(&mut buf).unwrap();
        assert_eq!(n, 8);
        (i64::from_le_bytes(buf), f)
    }

    #[test]
    fn a_peer_gets_the_ivshmem_setup_and_its_doorbell_reaches_the_daemon() {
        let dir = std::env::temp_dir().join(format!("pvsched-ivshmem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sock");
        let server = IvshmemServer::bind(&path).unwrap();
        assert!(server.accept().unwrap().is_none(), "nobody waiting");
        let client = UnixStream::connect(&path).unwrap();
        let (stream, pid) = server.accept().unwrap().expect("a peer");
        assert_eq!(pid, std::process::id() as i32);
        let conn = Connection::setup(stream, pid, false).unwrap();
        // QEMU's view: version 0, own id, the memory, then peer 0's eventfd.
        assert_eq!(recv(&client).0, 0);
        assert_eq!(recv(&client).0, GUEST_PEER);
        let (v, shm) = recv(&client);
        assert_eq!(v, -1);
        let shm = shm.expect("memory fd");
        assert_eq!(shm.metadata().unwrap().len(), SHM_SIZE as u64);
        assert!(
            shm.set_len(4096).is_err(),
            "sealed: the peer cannot shrink it"
        );
        let (v, bell) = recv(&client);
        assert_eq!(v, i64::from(DAEMON_PEER));
        let mut bell = bell.expect("doorbell fd");
        // The peer's view of the memory: the offer.
        let peer: GuestMemoryMmap = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            SHM_SIZE,
            Some(FileOffset::new(shm, 0)),
        )])
        .unwrap();
        let magic: u64 = peer.read_obj(GuestAddress(0)).unwrap();
        assert_eq!(magic, pvsched_proto::ivshmem::MAGIC);
        assert_eq!(conn.answer(), Ok(None));
        // The guest answers: version 1, the synchronous unboost, 2 CPUs.
        let feat = pvsched_proto::abi::feature::UNBOOST_DOORBELL;
        peer.write_obj(
            1u64 | u64::from(feat) << 32,
            GuestAddress(off::ANSWER as u64),
        )
        .unwrap();
        peer.write_obj(2u32, GuestAddress(off::CPUS as u64))
            .unwrap();
        peer.write_obj(1u32, GuestAddress(off::STATUS as u64))
            .unwrap();
        let a = conn.answer().unwrap().expect("answered");
        assert_eq!((a.cpus, a.features), (2, feat));
        // Two rings (what QEMU does for a doorbell write to peer 0, vector 0).
        bell.write_all(&1u64.to_le_bytes()).unwrap();
        let (_slots, door) = conn.slots(a).unwrap();
        door.take();
        bell.write_all(&1u64.to_le_bytes()).unwrap();
        assert_eq!(conn.doorbells(), 2, "one taken by the source, one pending");
        assert_eq!(conn.doorbells(), 2, "counted once");
        // The host half of slot 1, as the daemon publishes it, is what the peer reads.
        conn.disable();
        let st: u32 = peer
            .read_obj(GuestAddress(conn.offer.slot(1) + 0x40))
            .unwrap();
        assert_eq!(st, 0);
        assert!(!conn.hung_up());
        drop(client);
        assert!(conn.hung_up());
        // A peer that talks is dropped.
        let client = UnixStream::connect(&path).unwrap();
        let (stream, pid) = server.accept().unwrap().expect("a peer");
        let conn = Connection::setup(stream, pid, false).unwrap();
        assert!(!conn.hung_up());
        (&client).write_all(b"x").unwrap();
        assert!(conn.hung_up());
        // A second server on a live socket is refused.
        let e = IvshmemServer::bind(&path).err().expect("refused");
        assert!(e.to_string().contains("another process"), "{e}");
        drop(server);
        assert!(!path.exists(), "the socket is removed with the server");
        let _ = std::fs::remove_dir(&dir);
    }

    #[test]
    fn binding_over_a_regular_file_is_refused() {
        let path = std::env::temp_dir().join(format!("pvsched-ivshmem-f-{}", std::process::id()));
        std::fs::write(&path, b"x").unwrap();
        let e = IvshmemServer::bind(&path).err().expect("refused");
        assert!(e.to_string().contains("not a socket"), "{e}");
        let _ = std::fs::remove_file(&path);
    }
}
