//! The CPU state at the kernel's entry: the boot GDT, the identity-mapped page tables of
//! the 64-bit entry, and the registers of the 64-bit and PVH entries.
//!
//! Both entries use the selectors that Linux's own boot code uses: code at 0x10, data at
//! 0x18. The 64-bit entry runs in long mode with paging on and the low 4 GiB identity
//! mapped with 2 MiB pages; the PVH entry runs in 32-bit protected mode with paging off.
//! Interrupts are off and the IDT is empty, so an exception before the kernel installs
//! its own IDT ends in a triple fault rather than in a random handler.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{BOOT_STACK_POINTER, GDT_START, PDPT_START, PD_START, PML4_START};
use crate::hypervisor::{CpuState, DescriptorTable, Segment};

/// Selector of the boot code segment.
pub const BOOT_CS: u16 = 0x10;
/// Selector of the boot data segment, loaded into DS, ES, FS, GS and SS.
pub const BOOT_DS: u16 = 0x18;
/// Selector of the TSS that TR points to, as VMX requires a usable TR.
pub const BOOT_TSS: u16 = 0x20;

/// Number of 8-byte GDT slots: null, unused, code, data, and the 16-byte TSS descriptor.
const GDT_SLOTS: usize = 6;

pub const CR0_PE: u64 = 1 << 0;
pub const CR0_ET: u64 = 1 << 4;
pub const CR0_NE: u64 = 1 << 5;
pub const CR0_PG: u64 = 1 << 31;
pub const CR4_PAE: u64 = 1 << 5;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;
/// RFLAGS with only the always-one bit 1 set: interrupts off.
pub const RFLAGS_RESERVED: u64 = 1 << 1;

/// Page-table entry bits: present, writable, and for directory entries a 2 MiB page.
const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_LARGE_PAGE: u64 = 1 << 7;
/// Page directories written: each maps 1 GiB, so four map the low 4 GiB.
const PD_COUNT: u64 = 4;

/// Index of RBX, RSP, RBP and RSI in [`CpuState::gprs`].
const RBX: usize = 3;
const RSP: usize = 4;
const RBP: usize = 5;
const RSI: usize = 6;

/// Code segment flavor of the boot GDT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeMode {
    /// 64-bit code segment (L set) for the 64-bit entry.
    Long,
    /// 32-bit code segment (D set) for the PVH entry.
    Protected32,
}

/// Encodes a segment descriptor from the access byte and flags nibble packed as in the
/// descriptor's bits 40-55 (`flags`), a base and a 20-bit limit.
fn descriptor(flags: u16, base: u32, limit: u32) -> u64 {
    let base = u64::from(base);
    let limit = u64::from(limit);
    let flags = u64::from(flags);
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0xf_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// Returns the GDT's 8-byte slots for `mode`.
pub fn gdt(mode: CodeMode) -> [u64; GDT_SLOTS] {
    let code_flags = match mode {
        // Granularity, long mode; present, code, execute/read, accessed.
        CodeMode::Long => 0xa09b,
        // Granularity, 32-bit default size; present, code, execute/read, accessed.
        CodeMode::Protected32 => 0xc09b,
    };
    [
        0,
        0,
        descriptor(code_flags, 0, 0xf_ffff),
        // Granularity, 32-bit; present, data, read/write, accessed.
        descriptor(0xc093, 0, 0xf_ffff),
        // Present, busy 32/64-bit TSS of 104 bytes; the second half of the 16-byte
        // descriptor (base bits 32-63) is zero.
        descriptor(0x008b, 0, 0x67),
        0,
    ]
}

/// Decodes the hidden part of a segment register from a descriptor, as a far jump or a
/// segment load would.
pub fn segment_from_descriptor(selector: u16, descriptor: u64) -> Segment {
    let access = (descriptor >> 40) as u8;
    let flags = (descriptor >> 52) as u8;
    let raw_limit = ((descriptor & 0xffff) | ((descriptor >> 32) & 0xf_0000)) as u32;
    let g = flags & 0x8 != 0;
    let present = access & 0x80 != 0;
    Segment {
        selector,
        base: ((descriptor >> 16) & 0x00ff_ffff) | ((descriptor >> 32) & 0xff00_0000),
        limit: if g {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        type_: access & 0xf,
        present,
        dpl: (access >> 5) & 0x3,
        db: flags & 0x4 != 0,
        l: flags & 0x2 != 0,
        g,
        s: access & 0x10 != 0,
        unusable: !present,
    }
}

/// Writes the boot GDT for `mode` at [`GDT_START`].
pub fn write_gdt(
    memory: &GuestMemoryMmap,
    mode: CodeMode,
) -> Result<(), vm_memory::GuestMemoryError> {
    let bytes: Vec<u8> = gdt(mode).iter().flat_map(|d| d.to_le_bytes()).collect();
    memory.write_slice(&bytes, GuestAddress(GDT_START))
}

/// Writes page tables that identity-map the low 4 GiB with 2 MiB pages: one PML4 entry,
/// four PDPT entries and four full page directories.
pub fn write_identity_page_tables(
    memory: &GuestMemoryMmap,
) -> Result<(), vm_memory::GuestMemoryError> {
    memory.write_obj(
        PDPT_START | PTE_PRESENT | PTE_WRITABLE,
        GuestAddress(PML4_START),
    )?;
    for pd in 0..PD_COUNT {
        let pd_address = PD_START + pd * 0x1000;
        memory.write_obj(
            pd_address | PTE_PRESENT | PTE_WRITABLE,
            GuestAddress(PDPT_START + pd * 8),
        )?;
        let entries: Vec<u8> = (0..512u64)
            .flat_map(|i| {
                let page = ((pd << 9) + i) << 21;
                (page | PTE_PRESENT | PTE_WRITABLE | PTE_LARGE_PAGE).to_le_bytes()
            })
            .collect();
        memory.write_slice(&entries, GuestAddress(pd_address))?;
    }
    Ok(())
}

/// Returns the segment registers, GDTR and an empty IDTR for the boot GDT in `mode`.
fn base_state(mode: CodeMode) -> CpuState {
    let table = gdt(mode);
    let data = segment_from_descriptor(BOOT_DS, table[usize::from(BOOT_DS / 8)]);
    let ldt = Segment {
        limit: 0xffff,
        type_: 2,
        present: true,
        ..Segment::default()
    };
    CpuState {
        rflags: RFLAGS_RESERVED,
        cs: segment_from_descriptor(BOOT_CS, table[usize::from(BOOT_CS / 8)]),
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr: segment_from_descriptor(BOOT_TSS, table[usize::from(BOOT_TSS / 8)]),
        ldt,
        gdt: DescriptorTable {
            base: GDT_START,
            limit: (GDT_SLOTS * 8 - 1) as u16,
        },
        idt: DescriptorTable { base: 0, limit: 0 },
        ..CpuState::default()
    }
}

/// Returns the CPU state for the 64-bit boot protocol: long mode with the identity map at
/// [`PML4_START`], RIP at `entry` and RSI at the zero page.
pub fn long_mode_state(entry: u64, zero_page: u64) -> CpuState {
    let mut state = base_state(CodeMode::Long);
    state.rip = entry;
    state.gprs[RSI] = zero_page;
    state.gprs[RSP] = BOOT_STACK_POINTER;
    state.gprs[RBP] = BOOT_STACK_POINTER;
    state.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG;
    state.cr3 = PML4_START;
    state.cr4 = CR4_PAE;
    state.efer = EFER_LME | EFER_LMA;
    state
}

/// Returns the CPU state for the PVH entry: 32-bit protected mode without paging, EIP at
/// `entry` and EBX at the `hvm_start_info` structure.
pub fn pvh_state(entry: u64, start_info: u64) -> CpuState {
    let mut state = base_state(CodeMode::Protected32);
    state.rip = entry;
    state.gprs[RBX] = start_info;
    state.cr0 = CR0_PE | CR0_ET;
    state
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::memory::create_guest_memory;

    #[test]
    fn descriptors_match_known_encodings() {
        let long = gdt(CodeMode::Long);
        assert_eq!(long[2], 0x00af_9b00_0000_ffff);
        assert_eq!(long[3], 0x00cf_9300_0000_ffff);
        assert_eq!(long[4], 0x0000_8b00_0000_0067);
        assert_eq!(gdt(CodeMode::Protected32)[2], 0x00cf_9b00_0000_ffff);
    }

    #[test]
    fn long_mode_segments() {
        let state = long_mode_state(0x10_0200, 0x7000);
        assert_eq!(state.cs.selector, 0x10);
        assert!(state.cs.l);
        assert!(!state.cs.db);
        assert_eq!(state.cs.type_, 0xb);
        assert!(state.cs.present && state.cs.s && state.cs.g);
        assert_eq!(state.cs.limit, 0xffff_ffff);
        for seg in [state.ds, state.es, state.fs, state.gs, state.ss] {
            assert_eq!(seg.selector, 0x18);
            assert_eq!(seg.type_, 0x3);
            assert!(seg.db && seg.present && seg.s);
            assert_eq!(seg.base, 0);
        }
        assert_eq!(state.tr.selector, 0x20);
        assert_eq!(state.tr.type_, 0xb);
        assert!(!state.tr.s);
        assert_eq!(state.tr.limit, 0x67);
        assert_eq!(state.gdt.base, GDT_START);
        assert_eq!(state.gdt.limit, 47);
    }

    #[test]
    fn long_mode_registers() {
        let state = long_mode_state(0x10_0200, 0x7000);
        assert_eq!(state.rip, 0x10_0200);
        assert_eq!(state.gprs[RSI], 0x7000);
        assert_eq!(state.rflags & (1 << 9), 0, "IF must be clear");
        assert_eq!(state.rflags, 2);
        assert_eq!(state.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
        assert_eq!(state.cr4 & CR4_PAE, CR4_PAE);
        assert_eq!(state.efer, EFER_LME | EFER_LMA);
        assert_eq!(state.cr3, PML4_START);
    }

    #[test]
    fn pvh_registers() {
        let state = pvh_state(0x100_0000, 0x6000);
        assert_eq!(state.rip, 0x100_0000);
        assert_eq!(state.gprs[RBX], 0x6000);
        assert_eq!(state.cr0 & CR0_PG, 0);
        assert_eq!(state.cr0 & CR0_PE, CR0_PE);
        assert_eq!(state.efer, 0);
        assert!(state.cs.db && !state.cs.l);
        assert_eq!(state.cs.selector, 0x10);
    }

    #[test]
    fn identity_map_translates() {
        let memory = create_guest_memory(16).unwrap();
        write_identity_page_tables(&memory).unwrap();
        // Walk the tables by hand for a few addresses, as the CPU would.
        for address in [0u64, 0x10_0200, 0x7fff_f000, 0xfee0_0000, 0xffff_ffff] {
            let pml4e: u64 = memory
                .read_obj(GuestAddress(PML4_START + ((address >> 39) & 0x1ff) * 8))
                .unwrap();
            assert_eq!(pml4e & 3, 3);
            let pdpte: u64 = memory
                .read_obj(GuestAddress(
                    (pml4e & !0xfff) + ((address >> 30) & 0x1ff) * 8,
                ))
                .unwrap();
            assert_eq!(pdpte & 3, 3);
            let pde: u64 = memory
                .read_obj(GuestAddress(
                    (pdpte & !0xfff) + ((address >> 21) & 0x1ff) * 8,
                ))
                .unwrap();
            assert_eq!(pde & 0x83, 0x83);
            let physical = (pde & !0x1f_ffff) | (address & 0x1f_ffff);
            assert_eq!(physical, address, "{address:#x}");
        }
    }

    #[test]
    fn gdt_written_to_memory() {
        let memory = create_guest_memory(16).unwrap();
        write_gdt(&memory, CodeMode::Long).unwrap();
        let code: u64 = memory.read_obj(GuestAddress(GDT_START + 0x10)).unwrap();
        assert_eq!(code, 0x00af_9b00_0000_ffff);
    }
}
