//! The PVH start info (`struct hvm_start_info`, version 1, from Xen's
//! `public/arch-x86/hvm/start_info.h`) with its module list and memory map.
//!
//! ```text
//! start info (56 bytes) at PVH_INFO_START, module list (32 bytes per module) at
//! PVH_MODLIST_START, memory map (24 bytes per entry) at PVH_MEMMAP_START
//! ```

use super::e820::E820Entry;
use super::layout::{PVH_END, PVH_INFO_START, PVH_MEMMAP_START, PVH_MODLIST_START};

/// `XEN_HVM_START_MAGIC_VALUE`.
pub const START_INFO_MAGIC: u32 = 0x336e_c578;
/// Version 1 adds the memory map fields.
const START_INFO_VERSION: u32 = 1;
const MEMMAP_ENTRY_SIZE: u64 = 24;

/// Largest number of memory map entries that fit in the space reserved for them.
pub const MAX_MEMMAP_ENTRIES: usize = ((PVH_END - PVH_MEMMAP_START) / MEMMAP_ENTRY_SIZE) as usize;

/// The three PVH structures and their guest-physical addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PvhStructures {
    pub start_info: (u64, Vec<u8>),
    pub modlist: (u64, Vec<u8>),
    pub memmap: (u64, Vec<u8>),
}

/// Builds the start info pointing at the command line, the RSDP, the initramfs (as the
/// only module) and `e820`, whose types are the same numbers in PVH's memory map.
///
/// # Panics
///
/// Panics if `e820` has more than [`MAX_MEMMAP_ENTRIES`] entries; `build_e820` returns
/// at most four.
pub fn build_start_info(
    cmdline: u64,
    rsdp: u64,
    initrd: Option<(u64, u64)>,
    e820: &[E820Entry],
) -> PvhStructures {
    assert!(
        e820.len() <= MAX_MEMMAP_ENTRIES,
        "e820 map too long for PVH"
    );

    let mut modlist = Vec::new();
    if let Some((address, size)) = initrd {
        modlist.extend_from_slice(&address.to_le_bytes());
        modlist.extend_from_slice(&size.to_le_bytes());
        modlist.extend_from_slice(&0u64.to_le_bytes()); // module command line
        modlist.extend_from_slice(&0u64.to_le_bytes()); // reserved
    }

    let mut memmap = Vec::new();
    for entry in e820 {
        memmap.extend_from_slice(&entry.addr.to_le_bytes());
        memmap.extend_from_slice(&entry.size.to_le_bytes());
        memmap.extend_from_slice(&entry.kind.to_le_bytes());
        memmap.extend_from_slice(&0u32.to_le_bytes());
    }

    let mut info = Vec::with_capacity(56);
    info.extend_from_slice(&START_INFO_MAGIC.to_le_bytes());
    info.extend_from_slice(&START_INFO_VERSION.to_le_bytes());
    info.extend_from_slice(&0u32.to_le_bytes()); // flags
    info.extend_from_slice(&u32::from(initrd.is_some()).to_le_bytes());
    info.extend_from_slice(&PVH_MODLIST_START.to_le_bytes());
    info.extend_from_slice(&cmdline.to_le_bytes());
    info.extend_from_slice(&rsdp.to_le_bytes());
    info.extend_from_slice(&PVH_MEMMAP_START.to_le_bytes());
    info.extend_from_slice(&(e820.len() as u32).to_le_bytes());
    info.extend_from_slice(&0u32.to_le_bytes()); // reserved

    PvhStructures {
        start_info: (PVH_INFO_START, info),
        modlist: (PVH_MODLIST_START, modlist),
        memmap: (PVH_MEMMAP_START, memmap),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::boot::e820::{E820_RAM, E820_RESERVED};

    fn u32_at(bytes: &[u8], offset: usize) -> u32 {
        u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap())
    }

    fn u64_at(bytes: &[u8], offset: usize) -> u64 {
        u64::from_le_bytes(bytes[offset..offset + 8].try_into().unwrap())
    }

    #[test]
    fn start_info_fields() {
        let e820 = [
            E820Entry {
                addr: 0,
                size: 0x9_fc00,
                kind: E820_RAM,
            },
            E820Entry {
                addr: 0x9_fc00,
                size: 0x6_0400,
                kind: E820_RESERVED,
            },
        ];
        let pvh = build_start_info(0x2_0000, 0xe_0000, Some((0x7000_0000, 0x1234)), &e820);
        let info = &pvh.start_info.1;
        assert_eq!(info.len(), 56);
        assert_eq!(u32_at(info, 0), START_INFO_MAGIC);
        assert_eq!(u32_at(info, 4), 1);
        assert_eq!(u32_at(info, 12), 1);
        assert_eq!(u64_at(info, 16), PVH_MODLIST_START);
        assert_eq!(u64_at(info, 24), 0x2_0000);
        assert_eq!(u64_at(info, 32), 0xe_0000);
        assert_eq!(u64_at(info, 40), PVH_MEMMAP_START);
        assert_eq!(u32_at(info, 48), 2);

        let modlist = &pvh.modlist.1;
        assert_eq!(u64_at(modlist, 0), 0x7000_0000);
        assert_eq!(u64_at(modlist, 8), 0x1234);

        let memmap = &pvh.memmap.1;
        assert_eq!(memmap.len(), 48);
        assert_eq!(u64_at(memmap, 24), 0x9_fc00);
        assert_eq!(u32_at(memmap, 40), E820_RESERVED);
    }

    #[test]
    fn no_initrd_means_no_modules() {
        let pvh = build_start_info(0x2_0000, 0xe_0000, None, &[]);
        assert_eq!(u32_at(&pvh.start_info.1, 12), 0);
        assert!(pvh.modlist.1.is_empty());
    }
}
