//! Guest RAM and the guest-physical address layout.
//!
//! RAM starts at guest-physical 0. When it is larger than [`MMIO_HOLE_START`], the rest is
//! placed above 4 GiB so that the range below 4 GiB stays free for the PCI hole, the IOAPIC
//! and the local APIC, as on a PC.

use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Start of the 32-bit MMIO hole: RAM below 4 GiB ends here.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole: RAM continues here.
pub const MMIO_HOLE_END: u64 = 1 << 32;
/// Base of the IOAPIC's MMIO registers.
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
/// Base of the local APIC's MMIO registers.
pub const LAPIC_BASE: u64 = 0xfee0_0000;
/// Smallest guest RAM accepted, in MiB: room for the boot structures and a tiny guest.
pub const MIN_MEMORY_MIB: u64 = 2;

/// Errors raised while creating guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error(
        "guest memory of {mib} MiB is too small: give at least {MIN_MEMORY_MIB} MiB with --memory"
    )]
    TooSmall { mib: u64 },
    #[error("guest memory of {mib} MiB exceeds this host's {host_mib} MiB of RAM: lower --memory")]
    BeyondHost { mib: u64, host_mib: u64 },
    #[error("failed to map {mib} MiB of guest memory: {source}")]
    Map {
        mib: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
}

/// Returns the guest-physical RAM regions for `size` bytes of RAM.
pub fn ram_regions(size: u64) -> Vec<(GuestAddress, usize)> {
    if size <= MMIO_HOLE_START {
        return vec![(GuestAddress(0), size as usize)];
    }
    vec![
        (GuestAddress(0), MMIO_HOLE_START as usize),
        (
            GuestAddress(MMIO_HOLE_END),
            (size - MMIO_HOLE_START) as usize,
        ),
    ]
}

/// Returns the host's physical memory in MiB, or `None` where it cannot be read.
pub fn host_memory_mib() -> Option<u64> {
    // SAFETY: sysconf has no memory-safety preconditions.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    // SAFETY: as above.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    (pages > 0 && page_size > 0).then(|| pages as u64 * page_size as u64 / (1 << 20))
}

/// Checks `mib` against the minimum and the host's RAM, then maps that much guest RAM.
///
/// The mapping is private and anonymous, so untouched guest pages cost no host memory.
pub fn create_guest_memory(mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    if mib < MIN_MEMORY_MIB {
        return Err(MemoryError::TooSmall { mib });
    }
    if let Some(host_mib) = host_memory_mib() {
        if mib > host_mib {
            return Err(MemoryError::BeyondHost { mib, host_mib });
        }
    }

    GuestMemoryMmap::from_ranges(&ram_regions(mib << 20))
        .map_err(|source| MemoryError::Map { mib, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn small_ram_is_one_region() {
        let regions = ram_regions(256 << 20);
        assert_eq!(regions, vec![(GuestAddress(0), 256 << 20)]);
    }

    #[test]
    fn large_ram_skips_mmio_hole() {
        let regions = ram_regions(4 << 30);
        assert_eq!(regions.len(), 2);
        assert_eq!(regions[0], (GuestAddress(0), MMIO_HOLE_START as usize));
        assert_eq!(regions[1].0, GuestAddress(MMIO_HOLE_END));
        assert_eq!(regions[1].1 as u64, (4 << 30) - MMIO_HOLE_START);
    }

    #[test]
    fn memory_size_is_validated() {
        assert!(matches!(
            create_guest_memory(0),
            Err(MemoryError::TooSmall { mib: 0 })
        ));
        assert!(matches!(
            create_guest_memory(u64::MAX >> 20),
            Err(MemoryError::BeyondHost { .. })
        ));
    }

    #[test]
    fn guest_memory_reads_back_writes() {
        let memory = create_guest_memory(16).unwrap();
        assert_eq!(memory.last_addr(), GuestAddress((16 << 20) - 1));
        memory
            .write_obj(0xdead_beefu32, GuestAddress(0x1000))
            .unwrap();
        assert_eq!(
            memory.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
    }
}
