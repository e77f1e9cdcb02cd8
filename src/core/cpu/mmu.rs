//! Linear-to-physical translation: the page-table walk and the CPU's software TLB.
//!
//! [`walk`] is a pure function over guest RAM and the paging registers, so forensics can
//! translate guest addresses without a CPU. It supports 32-bit paging (with 4 MiB pages
//! when CR4.PSE is set), PAE paging and 4-level paging, with 2 MiB and 1 GiB pages.
//! Physical addresses are at most [`MAX_PHYS_BITS`] wide, as CPUID leaf 0x80000008 reports.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::state::{CR0_PG, CR0_WP, CR4_PAE, CR4_PGE, CR4_PSE, EFER_LMA, EFER_NXE};

/// Physical address width reported to the guest; page-table bits above it are reserved.
pub const MAX_PHYS_BITS: u32 = 40;
const PHYS_MASK: u64 = (1 << MAX_PHYS_BITS) - 1;

const PTE_P: u64 = 1 << 0;
const PTE_RW: u64 = 1 << 1;
const PTE_US: u64 = 1 << 2;
const PTE_A: u64 = 1 << 5;
const PTE_D: u64 = 1 << 6;
const PTE_PS: u64 = 1 << 7;
const PTE_G: u64 = 1 << 8;
const PTE_XD: u64 = 1 << 63;

/// Paging mode selected by CR0.PG, CR4.PAE and EFER.LMA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PagingMode {
    /// Paging off: linear addresses are physical.
    Disabled,
    /// 32-bit paging with 4-byte entries.
    Legacy,
    /// PAE paging: 3 levels of 8-byte entries for 32-bit linear addresses.
    Pae,
    /// 4-level paging for 48-bit linear addresses.
    FourLevel,
}

/// The registers that define a translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagingRegisters {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
}

impl PagingRegisters {
    /// Returns the paging mode that these registers select.
    pub fn mode(&self) -> PagingMode {
        if self.cr0 & CR0_PG == 0 {
            PagingMode::Disabled
        } else if self.cr4 & CR4_PAE == 0 {
            PagingMode::Legacy
        } else if self.efer & EFER_LMA != 0 {
            PagingMode::FourLevel
        } else {
            PagingMode::Pae
        }
    }
}

/// A successful walk: the physical address and the permissions of the whole path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// Physical address of the linear address walked.
    pub phys: u64,
    /// Size of the page that maps it: 4 KiB, 2 MiB, 4 MiB or 1 GiB.
    pub page_size: u64,
    /// Every level allows writes.
    pub writable: bool,
    /// Every level allows user-mode access.
    pub user: bool,
    /// Some level has the XD bit set while EFER.NXE is on.
    pub no_execute: bool,
    /// The leaf entry is global and CR4.PGE is on.
    pub global: bool,
    /// The leaf entry's dirty bit is set.
    pub dirty: bool,
    /// Physical addresses of the entries walked, root first; `levels` of them are valid.
    pub entries: [u64; 4],
    pub levels: usize,
    /// Whether the entries are 8 bytes wide (PAE and 4-level) rather than 4.
    pub wide_entries: bool,
}

/// Why a walk found no translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WalkError {
    #[error("linear address {linear:#x} is not mapped: entry at {entry:#x} is not present")]
    NotPresent { linear: u64, entry: u64 },
    #[error("linear address {linear:#x}: entry at {entry:#x} sets reserved bits")]
    Reserved { linear: u64, entry: u64 },
    #[error("linear address {linear:#x}: paging-structure entry {entry:#x} is outside RAM")]
    OutsideRam { linear: u64, entry: u64 },
    #[error("linear address {linear:#x} is not canonical")]
    NonCanonical { linear: u64 },
}

fn read_entry(mem: &GuestMemoryMmap, addr: u64, wide: bool, linear: u64) -> Result<u64, WalkError> {
    let entry = addr;
    let value = if wide {
        mem.read_obj::<u64>(GuestAddress(addr))
    } else {
        mem.read_obj::<u32>(GuestAddress(addr)).map(u64::from)
    };
    value.map_err(|_| WalkError::OutsideRam { linear, entry })
}

/// Walks the page tables that `regs` select to translate `linear`, without setting
/// accessed or dirty bits and without checking permissions.
///
/// With paging disabled the translation is the identity (truncated to 32 bits outside
/// long mode) with every permission granted.
pub fn walk(
    mem: &GuestMemoryMmap,
    regs: &PagingRegisters,
    linear: u64,
) -> Result<Translation, WalkError> {
    let nxe = regs.efer & EFER_NXE != 0;
    let mut t = Translation {
        phys: linear,
        page_size: 4096,
        writable: true,
        user: true,
        no_execute: false,
        global: false,
        dirty: true,
        entries: [0; 4],
        levels: 0,
        wide_entries: true,
    };
    let mode = regs.mode();
    let (mut table, levels, wide) = match mode {
        PagingMode::Disabled => return Ok(t),
        PagingMode::Legacy => (regs.cr3 & 0xffff_f000, 2usize, false),
        PagingMode::Pae => (regs.cr3 & 0xffff_ffe0, 3, true),
        PagingMode::FourLevel => {
            if !super::msr::is_canonical(linear) {
                return Err(WalkError::NonCanonical { linear });
            }
            (regs.cr3 & PHYS_MASK & !0xfff, 4, true)
        }
    };
    t.wide_entries = wide;

    // The reserved bits of an 8-byte entry above MAXPHYADDR, plus XD when NXE is off.
    let high_reserved = (!PHYS_MASK & !PTE_XD & ((1u64 << 52) - 1)) | if nxe { 0 } else { PTE_XD };
    for level in (0..levels).rev() {
        // `level` counts down to 0, the page-table level; `shift` is the bits it maps.
        let (shift, index_bits) = if wide {
            (12 + 9 * level, 9)
        } else {
            (12 + 10 * level, 10)
        };
        let index_mask = if mode == PagingMode::Pae && level == 2 {
            3
        } else {
            (1u64 << index_bits) - 1
        };
        let index = (linear >> shift) & index_mask;
        let entry_addr = table + index * if wide { 8 } else { 4 };
        let entry = read_entry(mem, entry_addr, wide, linear)?;
        t.entries[t.levels] = entry_addr;
        t.levels += 1;
        if entry & PTE_P == 0 {
            return Err(WalkError::NotPresent {
                linear,
                entry: entry_addr,
            });
        }
        let reserved_error = Err(WalkError::Reserved {
            linear,
            entry: entry_addr,
        });
        if wide && entry & high_reserved != 0 {
            return reserved_error;
        }
        if mode == PagingMode::Pae && level == 2 {
            // PAE PDPTEs have no permission bits, and bits 1-2 and 5-8 are reserved.
            if entry & (0x1e6 | PTE_XD) != 0 {
                return reserved_error;
            }
            table = entry & PHYS_MASK & !0xfff;
            continue;
        }
        t.writable &= entry & PTE_RW != 0;
        t.user &= entry & PTE_US != 0;
        t.no_execute |= nxe && entry & PTE_XD != 0;

        let large = level > 0 && entry & PTE_PS != 0;
        if large {
            let large_allowed = match mode {
                PagingMode::Legacy => regs.cr4 & CR4_PSE != 0,
                PagingMode::FourLevel => level <= 2,
                _ => level == 1,
            };
            if !large_allowed {
                if mode == PagingMode::Legacy {
                    // Without CR4.PSE the PS bit of a 32-bit PDE is ignored.
                    table = entry & 0xffff_f000;
                    continue;
                }
                return reserved_error;
            }
            let page_size = 1u64 << shift;
            let base = if wide {
                // Bits 12 (PAT) to shift-1 must be zero apart from PAT itself.
                if entry & (page_size - 1) & !0x1fff != 0 {
                    return reserved_error;
                }
                entry & PHYS_MASK & !(page_size - 1)
            } else {
                // PSE-36 is not advertised: bits 13-21 of a 4 MiB PDE must be zero.
                if entry & 0x003f_e000 != 0 {
                    return reserved_error;
                }
                entry & 0xffc0_0000
            };
            t.page_size = page_size;
            t.phys = base | (linear & (page_size - 1));
            t.global = entry & PTE_G != 0 && regs.cr4 & CR4_PGE != 0;
            t.dirty = entry & PTE_D != 0;
            return Ok(t);
        }
        if level == 0 {
            let base = if wide {
                entry & PHYS_MASK & !0xfff
            } else {
                entry & 0xffff_f000
            };
            t.phys = base | (linear & 0xfff);
            t.global = entry & PTE_G != 0 && regs.cr4 & CR4_PGE != 0;
            t.dirty = entry & PTE_D != 0;
            return Ok(t);
        }
        table = if wide {
            entry & PHYS_MASK & !0xfff
        } else {
            entry & 0xffff_f000
        };
    }
    unreachable!("the loop returns at level 0")
}

/// Sets the accessed bit in every entry of `t`, and the dirty bit in its leaf for a
/// write, as the processor does after a successful access.
pub fn mark_accessed(mem: &GuestMemoryMmap, t: &Translation, write: bool) {
    for (i, &addr) in t.entries[..t.levels].iter().enumerate() {
        let leaf = i + 1 == t.levels;
        let set = PTE_A | if leaf && write { PTE_D } else { 0 };
        // Entries are read back because another CPU may have changed them meanwhile.
        // NOTE: the update is not atomic against other vCPUs' walks.
        if t.wide_entries {
            if let Ok(old) = mem.read_obj::<u64>(GuestAddress(addr)) {
                if old & set != set && old & PTE_P != 0 {
                    let _ = mem.write_obj(old | set, GuestAddress(addr));
                }
            }
        } else if let Ok(old) = mem.read_obj::<u32>(GuestAddress(addr)) {
            let set = set as u32;
            if old & set != set && old & 1 != 0 {
                let _ = mem.write_obj(old | set, GuestAddress(addr));
            }
        }
    }
}

/// The kind of a memory access, for permission checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read = 0,
    Write = 1,
    Execute = 2,
}

/// Number of TLB entries; a power of two.
const TLB_SIZE: usize = 1024;

#[derive(Debug, Clone, Copy, Default)]
struct TlbEntry {
    /// Linear page number plus one; zero marks an empty entry.
    tag: u64,
    /// Physical address of the 4 KiB page.
    phys_page: u64,
    /// Bit `access + 3 * user` is set when that access is allowed without a walk.
    allowed: u8,
    global: bool,
    /// log2 of the page size minus 12: 0, 9, 10 or 18.
    size_shift: u8,
}

/// A direct-mapped cache of 4 KiB translations, with large pages cached in 4 KiB slices.
pub struct Tlb {
    entries: Box<[TlbEntry]>,
}

impl Default for Tlb {
    fn default() -> Self {
        Self::new()
    }
}

impl Tlb {
    /// Creates an empty TLB.
    pub fn new() -> Self {
        Tlb {
            entries: vec![TlbEntry::default(); TLB_SIZE].into_boxed_slice(),
        }
    }

    /// Returns the physical address of `linear` when a cached translation allows the
    /// access.
    #[inline]
    pub fn lookup(&self, linear: u64, access: Access, user: bool) -> Option<u64> {
        let page = linear >> 12;
        let entry = &self.entries[page as usize & (TLB_SIZE - 1)];
        let bit = 1u8 << (access as u8 + if user { 3 } else { 0 });
        if entry.tag == page + 1 && entry.allowed & bit != 0 {
            Some(entry.phys_page | (linear & 0xfff))
        } else {
            None
        }
    }

    /// Caches the 4 KiB slice of `t` that contains `linear`.
    pub fn insert(&mut self, linear: u64, t: &Translation, regs: &PagingRegisters) {
        let wp = regs.cr0 & CR0_WP != 0;
        let mut allowed = 1u8; // supervisor read
        if (t.writable || !wp) && t.dirty {
            allowed |= 1 << 1;
        }
        if !t.no_execute {
            allowed |= 1 << 2;
        }
        if t.user {
            allowed |= 1 << 3;
            if t.writable && t.dirty {
                allowed |= 1 << 4;
            }
            if !t.no_execute {
                allowed |= 1 << 5;
            }
        }
        let page = linear >> 12;
        self.entries[page as usize & (TLB_SIZE - 1)] = TlbEntry {
            tag: page + 1,
            phys_page: t.phys & !0xfff,
            allowed,
            global: t.global,
            size_shift: (t.page_size.trailing_zeros() - 12) as u8,
        };
    }

    /// Drops every entry, global ones included.
    pub fn flush_all(&mut self) {
        self.entries.fill(TlbEntry::default());
    }

    /// Drops every entry that is not global, as a CR3 load does.
    pub fn flush_non_global(&mut self) {
        for entry in self.entries.iter_mut().filter(|e| !e.global) {
            *entry = TlbEntry::default();
        }
    }

    /// Drops the entries of the page that contains `linear`, all slices of a large page
    /// included, as INVLPG does.
    pub fn flush_page(&mut self, linear: u64) {
        let page = linear >> 12;
        for entry in self.entries.iter_mut() {
            if entry.tag != 0 && ((entry.tag - 1) ^ page) >> entry.size_shift == 0 {
                *entry = TlbEntry::default();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    const PML4: u64 = 0x1000;

    /// Maps linear 0x40_0000_1000 to physical 0x5000 (4 KiB) and linear 0x20_0000 to
    /// physical 0x40_0000 (2 MiB) with 4-level paging.
    fn four_level() -> (GuestMemoryMmap, PagingRegisters) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        let w = |addr: u64, value: u64| mem.write_obj(value, GuestAddress(addr)).unwrap();
        w(PML4, 0x2000 | 7);
        w(0x2000, 0x3000 | 7); // PDPT[0]
        w(0x2000 + 8, 0x6000 | 3); // PDPT[1]: supervisor only
        w(0x3000 + 8, 0x40_0000 | 0x83); // PD[1]: 2 MiB page, supervisor
        w(0x6000, 0x4000 | 7); // PD[0] under PDPT[1]
        w(0x4000 + 8, 0x5000 | 7 | PTE_XD); // PT[1]
        let regs = PagingRegisters {
            cr0: CR0_PG | 1,
            cr3: PML4,
            cr4: CR4_PAE,
            efer: EFER_LMA | EFER_NXE,
        };
        (mem, regs)
    }

    #[test]
    fn walk_4k_page_permissions() {
        let (mem, regs) = four_level();
        let t = walk(&mem, &regs, 0x4000_1234).unwrap();
        assert_eq!(t.phys, 0x5234);
        assert_eq!(t.page_size, 4096);
        assert!(!t.user, "PDPT[1] is supervisor-only");
        assert!(t.no_execute);
        assert_eq!(t.levels, 4);
    }

    #[test]
    fn walk_2m_page() {
        let (mem, regs) = four_level();
        let t = walk(&mem, &regs, 0x2f_ffff).unwrap();
        assert_eq!(t.phys, 0x4f_ffff);
        assert_eq!(t.page_size, 2 << 20);
    }

    #[test]
    fn walk_reports_not_present_entry() {
        let (mem, regs) = four_level();
        let err = walk(&mem, &regs, 0x8000_0000).unwrap_err();
        assert_eq!(
            err,
            WalkError::NotPresent {
                linear: 0x8000_0000,
                entry: 0x2000 + 16
            }
        );
    }

    #[test]
    fn walk_xd_reserved_without_nxe() {
        let (mem, mut regs) = four_level();
        regs.efer &= !EFER_NXE;
        let err = walk(&mem, &regs, 0x4000_1000).unwrap_err();
        assert!(matches!(err, WalkError::Reserved { entry: 0x4008, .. }));
    }

    #[test]
    fn mark_accessed_sets_a_and_d() {
        let (mem, regs) = four_level();
        let t = walk(&mem, &regs, 0x4000_1000).unwrap();
        mark_accessed(&mem, &t, true);
        let pte: u64 = mem.read_obj(GuestAddress(0x4008)).unwrap();
        assert_eq!(pte & (PTE_A | PTE_D), PTE_A | PTE_D);
        let pml4e: u64 = mem.read_obj(GuestAddress(PML4)).unwrap();
        assert_eq!(pml4e & (PTE_A | PTE_D), PTE_A);
    }

    #[test]
    fn tlb_invlpg_drops_large_page_slices() {
        let (mem, regs) = four_level();
        let mut tlb = Tlb::new();
        for linear in [0x20_0000u64, 0x3f_f000] {
            let t = walk(&mem, &regs, linear).unwrap();
            tlb.insert(linear, &t, &regs);
        }
        assert_eq!(tlb.lookup(0x3f_f010, Access::Read, false), Some(0x5f_f010));
        tlb.flush_page(0x20_0000);
        assert_eq!(tlb.lookup(0x3f_f010, Access::Read, false), None);
    }
}
