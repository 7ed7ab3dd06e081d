//! KVM binary statistics (`KVM_GET_STATS_FD`) of a vCPU or VM: named 64-bit counters read
//! with `pread`, no ioctl per read.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

/// `KVM_GET_STATS_FD` = `_IO(KVMIO, 0xce)`.
const KVM_GET_STATS_FD: libc::c_ulong = 0xaece;

/// Size of `struct kvm_stats_header` and of `struct kvm_stats_desc` without its name.
const HEADER_SIZE: usize = 24;
const DESC_SIZE: usize = 16;

/// An open statistics fd and the layout of its counters.
#[derive(Debug)]
pub struct StatsFd {
    file: File,
    data_offset: u64,
    names: Vec<(String, u64)>,
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

impl StatsFd {
    /// Opens the statistics of the KVM object behind `fd` (a vCPU or VM fd).
    pub fn open(fd: &impl AsRawFd) -> std::io::Result<StatsFd> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd or -1.
        let raw = unsafe { libc::ioctl(fd.as_raw_fd(), KVM_GET_STATS_FD as _, 0) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh fd we own.
        let file = unsafe { File::from_raw_fd(raw) };
        let mut header = [0u8; HEADER_SIZE];
        file.read_exact_at(&mut header, 0)?;
        let name_size = u32_at(&header, 4) as usize;
        let num_desc = u32_at(&header, 8) as usize;
        let desc_offset = u32_at(&header, 16) as u64;
        let data_offset = u32_at(&header, 20) as u64;
        let desc_len = DESC_SIZE + name_size;
        let mut descs = vec![0u8; desc_len * num_desc];
        file.read_exact_at(&mut descs, desc_offset)?;
        let names = descs
            .chunks_exact(desc_len)
            .map(|d| {
                let offset = u32_at(d, 8) as u64;
                let name = &d[DESC_SIZE..];
                let end = name.iter().position(|&c| c == 0).unwrap_or(name.len());
                (String::from_utf8_lossy(&name[..end]).into_owned(), offset)
            })
            .collect();
        Ok(StatsFd {
            file,
            data_offset,
            names,
        })
    }

    /// Names of the counters.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(|(n, _)| n.as_str())
    }

    /// Current value of counter `name` (its first 64-bit word), if it exists.
    pub fn read(&self, name: &str) -> Option<u64> {
        let (_, off) = self.names.iter().find(|(n, _)| n == name)?;
        let mut v = [0u8; 8];
        self.file
            .read_exact_at(&mut v, self.data_offset + off)
            .ok()?;
        Some(u64::from_le_bytes(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_kvm_fd_is_an_error() {
        let f = File::open("/dev/null").unwrap();
        assert!(StatsFd::open(&f).is_err());
    }
}
