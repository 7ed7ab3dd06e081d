//! x86_64 long-mode setup done by the VMM: GDT, TSS, IDT, identity-mapped page tables and the
//! special registers that put a vCPU straight into 64-bit mode at CPL0 (the way KVM
//! selftests do it, no firmware or real-mode trampoline).

use crate::layout::{
    CODE_ADDR, GDT_ADDR, IDT_ADDR, MAPPED_SIZE, PDPT_ADDR, PD_ADDR, PML4_ADDR, TSS_ADDR,
};
use kvm_bindings::{kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

/// Selector of the 64-bit code segment.
pub const SEL_CODE64: u16 = 0x08;
/// Selector of the flat data segment.
pub const SEL_DATA: u16 = 0x10;
/// Selector of the 64-bit TSS (occupies two GDT slots).
pub const SEL_TSS: u16 = 0x18;
/// Number of 8-byte GDT slots.
pub const GDT_SLOTS: usize = 5;

/// Size of the 64-bit TSS minus one (its limit).
const TSS_LIMIT: u32 = 0x67;

/// Descriptor access byte + flags nibble, packed as `flags << 12 | access` the way the
/// descriptor stores them (bits 40..47 and 52..55).
mod access {
    /// Present, DPL 0, code, execute/read, accessed; L = 1, G = 1.
    pub const CODE64: u16 = 0xa09b;
    /// Present, DPL 0, data, read/write, accessed; D/B = 1, G = 1.
    pub const DATA: u16 = 0xc093;
    /// Present, system, 64-bit busy TSS (type 11), byte granular.
    pub const TSS_BUSY: u16 = 0x008b;
}

/// Encodes an 8-byte segment descriptor (for a 64-bit TSS, the low half).
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    (limit & 0xffff)
        | (base & 0xff_ffff) << 16
        | (flags & 0xff) << 40
        | ((limit >> 16) & 0xf) << 48
        | ((flags >> 12) & 0xf) << 52
        | ((base >> 24) & 0xff) << 56
}

/// Decodes a descriptor into the `kvm_segment` KVM expects for a loaded selector.
pub fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let access = ((entry >> 40) & 0xff) as u8;
    let flags = ((entry >> 52) & 0xf) as u8;
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = flags >> 3 & 1;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector,
        type_: access & 0xf,
        present: access >> 7,
        dpl: (access >> 5) & 3,
        db: (flags >> 2) & 1,
        s: (access >> 4) & 1,
        l: (flags >> 1) & 1,
        g,
        avl: flags & 1,
        unusable: 0,
        padding: 0,
    }
}

/// The GDT: null, 64-bit code, data, and the two slots of the 64-bit TSS descriptor.
pub fn gdt() -> [u64; GDT_SLOTS] {
    let tss_low = gdt_entry(access::TSS_BUSY, TSS_ADDR as u32, TSS_LIMIT);
    [
        0,
        gdt_entry(access::CODE64, 0, 0xf_ffff),
        gdt_entry(access::DATA, 0, 0xf_ffff),
        tss_low,
        TSS_ADDR >> 32,
    ]
}

/// Encodes a 16-byte 64-bit interrupt gate (present, DPL 0, IST 0) to `handler` in the code
/// segment.
pub fn idt_gate(handler: u64) -> [u64; 2] {
    let low = (handler & 0xffff)
        | (SEL_CODE64 as u64) << 16
        | 0x8e00u64 << 32
        | ((handler >> 16) & 0xffff) << 48;
    [low, handler >> 32]
}

/// Page-table entry bits.
mod pte {
    pub const PRESENT: u64 = 1 << 0;
    pub const WRITABLE: u64 = 1 << 1;
    pub const HUGE: u64 = 1 << 7;
}

/// Writes a 4-level page table identity-mapping [`MAPPED_SIZE`] bytes with 2 MiB pages.
pub fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), GuestMemoryError> {
    mem.write_obj(
        PDPT_ADDR | pte::PRESENT | pte::WRITABLE,
        GuestAddress(PML4_ADDR),
    )?;
    mem.write_obj(
        PD_ADDR | pte::PRESENT | pte::WRITABLE,
        GuestAddress(PDPT_ADDR),
    )?;
    for i in 0..MAPPED_SIZE >> 21 {
        let entry = (i << 21) | pte::PRESENT | pte::WRITABLE | pte::HUGE;
        mem.write_obj(entry, GuestAddress(PD_ADDR + i * 8))?;
    }
    Ok(())
}

/// Writes the GDT, the TSS and an IDT whose vector `v` goes to `handlers(v)`.
pub fn write_descriptor_tables(
    mem: &GuestMemoryMmap,
    handlers: impl Fn(u8) -> u64,
) -> Result<(), GuestMemoryError> {
    for (i, entry) in gdt().iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_ADDR + i as u64 * 8))?;
    }
    // TSS: all zero except the I/O map base, placed past the limit (no I/O bitmap).
    mem.write_slice(&[0u8; 0x68], GuestAddress(TSS_ADDR))?;
    mem.write_obj(0x68u16, GuestAddress(TSS_ADDR + 0x66))?;
    for v in 0..=255u8 {
        let gate = idt_gate(handlers(v));
        mem.write_obj(gate, GuestAddress(IDT_ADDR + v as u64 * 16))?;
    }
    Ok(())
}

/// Sets `sregs` for 64-bit long mode at CPL0 with paging on, using the tables written above.
pub fn set_long_mode(sregs: &mut kvm_sregs) {
    let gdt = gdt();
    let code = segment_from_gdt(gdt[(SEL_CODE64 / 8) as usize], SEL_CODE64);
    let data = segment_from_gdt(gdt[(SEL_DATA / 8) as usize], SEL_DATA);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(gdt[(SEL_TSS / 8) as usize], SEL_TSS);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT_SLOTS * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 256 * 16 - 1;
    sregs.cr0 = cr0::PE | cr0::MP | cr0::ET | cr0::NE | cr0::WP | cr0::PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = cr4::PAE | cr4::OSFXSR | cr4::OSXMMEXCPT;
    sregs.efer = efer::LME | efer::LMA;
}

/// CR0 bits.
pub mod cr0 {
    /// Protection enable.
    pub const PE: u64 = 1 << 0;
    /// Monitor coprocessor.
    pub const MP: u64 = 1 << 1;
    /// Extension type.
    pub const ET: u64 = 1 << 4;
    /// Native FPU error reporting.
    pub const NE: u64 = 1 << 5;
    /// Write protect.
    pub const WP: u64 = 1 << 16;
    /// Paging.
    pub const PG: u64 = 1 << 31;
}

/// CR4 bits.
pub mod cr4 {
    /// Physical address extension.
    pub const PAE: u64 = 1 << 5;
    /// OS supports FXSAVE/FXRSTOR.
    pub const OSFXSR: u64 = 1 << 9;
    /// OS handles unmasked SIMD exceptions.
    pub const OSXMMEXCPT: u64 = 1 << 10;
}

/// EFER bits.
pub mod efer {
    /// Long mode enable.
    pub const LME: u64 = 1 << 8;
    /// Long mode active.
    pub const LMA: u64 = 1 << 10;
}

/// Name of an exception vector (`#UD`, `#GP`, ...), or `None` for other vectors.
pub fn exception_name(vector: u8) -> Option<&'static str> {
    const NAMES: [&str; 22] = [
        "#DE divide error",
        "#DB debug",
        "NMI",
        "#BP breakpoint",
        "#OF overflow",
        "#BR bound range",
        "#UD invalid opcode",
        "#NM device not available",
        "#DF double fault",
        "coprocessor segment overrun",
        "#TS invalid TSS",
        "#NP segment not present",
        "#SS stack fault",
        "#GP general protection",
        "#PF page fault",
        "reserved",
        "#MF x87 error",
        "#AC alignment check",
        "#MC machine check",
        "#XM SIMD exception",
        "#VE virtualization exception",
        "#CP control protection",
    ];
    NAMES.get(vector as usize).copied()
}

/// Where the guest image's code lands for a given image offset.
pub fn code_gpa(offset: u64) -> u64 {
    CODE_ADDR + offset
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::MEM_SIZE;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
    }

    /// Walks the guest page tables like the MMU does (4-level, 2 MiB leaves).
    fn translate(mem: &GuestMemoryMmap, cr3: u64, va: u64) -> Option<u64> {
        let idx = |shift: u32| (va >> shift) & 0x1ff;
        let pml4e: u64 = mem.read_obj(GuestAddress(cr3 + idx(39) * 8)).ok()?;
        if pml4e & 1 == 0 {
            return None;
        }
        let pdpte: u64 = mem
            .read_obj(GuestAddress((pml4e & !0xfff) + idx(30) * 8))
            .ok()?;
        if pdpte & 1 == 0 {
            return None;
        }
        let pde: u64 = mem
            .read_obj(GuestAddress((pdpte & !0xfff) + idx(21) * 8))
            .ok()?;
        if pde & 1 == 0 || pde & (1 << 7) == 0 {
            return None;
        }
        Some((pde & !0x1f_ffff) + (va & 0x1f_ffff))
    }

    #[test]
    fn page_tables_identity_map_the_first_gib_only() {
        let m = mem();
        write_page_tables(&m).unwrap();
        for va in [0, 0x1234, CODE_ADDR + 17, MEM_SIZE - 8, MAPPED_SIZE - 1] {
            assert_eq!(translate(&m, PML4_ADDR, va), Some(va), "va {va:#x}");
        }
        assert_eq!(translate(&m, PML4_ADDR, MAPPED_SIZE), None);
        assert_eq!(translate(&m, PML4_ADDR, 0x7ff_0000_0000), None);
    }

    #[test]
    fn gdt_entries_match_the_architectural_encodings() {
        let g = gdt();
        assert_eq!(g[0], 0);
        assert_eq!(g[1], 0x00af_9b00_0000_ffff, "flat 64-bit code");
        assert_eq!(g[2], 0x00cf_9300_0000_ffff, "flat data");
        assert_eq!(g[3] & 0xffff, 0x67, "TSS limit");
        assert_eq!((g[3] >> 40) & 0xff, 0x8b, "busy 64-bit TSS");
    }

    #[test]
    fn segments_decode_to_what_kvm_expects() {
        let g = gdt();
        let cs = segment_from_gdt(g[1], SEL_CODE64);
        assert_eq!((cs.l, cs.db, cs.dpl, cs.present, cs.s), (1, 0, 0, 1, 1));
        assert_eq!(cs.type_, 0xb);
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment_from_gdt(g[2], SEL_DATA);
        assert_eq!((ds.l, ds.db, ds.type_), (0, 1, 3));
        let tr = segment_from_gdt(g[3], SEL_TSS);
        assert_eq!(
            (tr.base, tr.limit, tr.type_, tr.s, tr.g),
            (TSS_ADDR, 0x67, 11, 0, 0)
        );
    }

    #[test]
    fn descriptor_round_trip_keeps_base_and_limit() {
        let e = gdt_entry(access::DATA & 0x0fff, 0xdead_beef, 0x1_2345);
        let s = segment_from_gdt(e, 0x10);
        assert_eq!(s.base, 0xdead_beef);
        assert_eq!(s.limit, 0x1_2345);
    }

    #[test]
    fn idt_gates_point_at_their_handlers() {
        let m = mem();
        write_descriptor_tables(&m, |v| 0x10_0000 + v as u64 * 16).unwrap();
        for v in [0u8, 6, 0x40, 255] {
            let lo: u64 = m.read_obj(GuestAddress(IDT_ADDR + v as u64 * 16)).unwrap();
            let hi: u64 = m
                .read_obj(GuestAddress(IDT_ADDR + v as u64 * 16 + 8))
                .unwrap();
            let target = (lo & 0xffff) | ((lo >> 48) << 16) | (hi << 32);
            assert_eq!(target, 0x10_0000 + v as u64 * 16);
            assert_eq!((lo >> 16) & 0xffff, SEL_CODE64 as u64);
            assert_eq!((lo >> 40) & 0xff, 0x8e, "present 64-bit interrupt gate");
        }
    }

    #[test]
    fn long_mode_sregs_are_consistent() {
        let mut s = kvm_sregs::default();
        set_long_mode(&mut s);
        assert_eq!(s.cr0, 0x8001_0033);
        assert_eq!(s.cr4, 0x620);
        assert_eq!(s.efer, 0x500);
        assert_eq!(s.cs.selector, SEL_CODE64);
        assert_eq!(s.tr.selector, SEL_TSS);
        assert_eq!(s.gdt.limit as usize + 1, GDT_SLOTS * 8);
    }

    #[test]
    fn exception_names_cover_the_common_faults() {
        assert_eq!(exception_name(6), Some("#UD invalid opcode"));
        assert_eq!(exception_name(13), Some("#GP general protection"));
        assert_eq!(exception_name(14), Some("#PF page fault"));
        assert_eq!(exception_name(0x40), None);
    }
}
