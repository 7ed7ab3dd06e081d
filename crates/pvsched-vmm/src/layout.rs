//! Guest-physical memory map of the testbed micro-VM.
//!
//! Everything is identity mapped (guest virtual = guest physical) with 2 MiB pages.
//!
//! | range | what |
//! |---|---|
//! | `0x0500` | GDT |
//! | `0x1000` | PML4, then PDPT at `0x2000`, PD at `0x3000` (first GiB) |
//! | `0x7000` | IDT (256 × 16 bytes) |
//! | `0x8000` | TSS |
//! | `0x10_0000` | guest image (exception stubs, timer handler, entry) |
//! | `0x20_0000 + i × 64 KiB` | vCPU `i`: mailbox, latency ring, stack (top of the region) |

use pvsched_guest::mailbox::VCPU_REGION_SIZE;

/// Guest-physical address of the GDT.
pub const GDT_ADDR: u64 = 0x500;
/// Guest-physical address of the top-level page table.
pub const PML4_ADDR: u64 = 0x1000;
/// Guest-physical address of the page-directory-pointer table.
pub const PDPT_ADDR: u64 = 0x2000;
/// Guest-physical address of the page directory mapping the first GiB.
pub const PD_ADDR: u64 = 0x3000;
/// Guest-physical address of the IDT.
pub const IDT_ADDR: u64 = 0x7000;
/// Guest-physical address of the 64-bit TSS.
pub const TSS_ADDR: u64 = 0x8000;
/// Guest-physical address the guest image is loaded at.
pub const CODE_ADDR: u64 = 0x10_0000;
/// Largest guest image that fits below the vCPU regions.
pub const CODE_MAX: u64 = VCPU_BASE - CODE_ADDR;
/// Guest-physical address of vCPU 0's region.
pub const VCPU_BASE: u64 = 0x20_0000;
/// Most vCPUs a testbed VM has.
pub const MAX_VCPUS: usize = 64;
/// Guest RAM size: code plus [`MAX_VCPUS`] regions, rounded up to 2 MiB.
pub const MEM_SIZE: u64 = 0x80_0000;
/// Bytes mapped by the page tables (one page directory of 2 MiB pages).
pub const MAPPED_SIZE: u64 = 1 << 30;

/// Guest-physical address of vCPU `index`'s mailbox (start of its region).
pub fn vcpu_region(index: usize) -> u64 {
    VCPU_BASE + index as u64 * VCPU_REGION_SIZE
}

/// Initial stack pointer of vCPU `index` (top of its region).
pub fn vcpu_stack_top(index: usize) -> u64 {
    vcpu_region(index) + VCPU_REGION_SIZE
}

const _: () = assert!(VCPU_BASE + MAX_VCPUS as u64 * VCPU_REGION_SIZE <= MEM_SIZE);
const _: () = assert!(MEM_SIZE <= MAPPED_SIZE);
const _: () = assert!(TSS_ADDR + 0x68 <= CODE_ADDR);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_regions_do_not_overlap_and_fit_in_ram() {
        for i in 0..MAX_VCPUS {
            assert_eq!(vcpu_region(i + 1) - vcpu_region(i), VCPU_REGION_SIZE);
            assert!(vcpu_stack_top(i) <= MEM_SIZE);
        }
        assert!(vcpu_region(0) >= CODE_ADDR + CODE_MAX);
    }
}
