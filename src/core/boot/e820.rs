//! The e820 memory map handed to the kernel in the zero page and in the PVH start info.

use serde::Serialize;

use super::layout::{HIGH_MEMORY_START, RESERVED_LOW_START};

/// Usable RAM.
pub const E820_RAM: u32 = 1;
/// Reserved: firmware areas and the tables in them.
pub const E820_RESERVED: u32 = 2;

/// One range of the e820 map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct E820Entry {
    /// Guest-physical start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

impl E820Entry {
    /// Returns the first address past the entry.
    pub fn end(&self) -> u64 {
        self.addr + self.size
    }
}

/// Builds the e820 map for guest RAM given as `(start, length)` regions in ascending order.
///
/// The low 640 KiB minus the EBDA are RAM, `RESERVED_LOW_START..1 MiB` is reserved for
/// the ACPI and MP tables, and RAM from 1 MiB on is RAM again. Ranges that are not RAM,
/// such as the MMIO hole below 4 GiB, do not appear at all.
pub fn build_e820(ram: &[(u64, u64)]) -> Vec<E820Entry> {
    let mut map = Vec::new();
    let mut reserved_added = false;

    for &(start, size) in ram {
        let end = start.saturating_add(size);
        if start < RESERVED_LOW_START {
            let low_end = end.min(RESERVED_LOW_START);
            push_range(&mut map, start, low_end, E820_RAM);
        }
        if start < HIGH_MEMORY_START && end > RESERVED_LOW_START && !reserved_added {
            push_range(
                &mut map,
                RESERVED_LOW_START,
                HIGH_MEMORY_START,
                E820_RESERVED,
            );
            reserved_added = true;
        }
        push_range(&mut map, start.max(HIGH_MEMORY_START), end, E820_RAM);
    }
    map
}

fn push_range(map: &mut Vec<E820Entry>, start: u64, end: u64, kind: u32) {
    if end > start {
        map.push(E820Entry {
            addr: start,
            size: end - start,
            kind,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::memory::{ram_regions, MMIO_HOLE_END, MMIO_HOLE_START};

    fn regions(size: u64) -> Vec<(u64, u64)> {
        ram_regions(size)
            .into_iter()
            .map(|(start, len)| (start.0, len as u64))
            .collect()
    }

    #[test]
    fn small_ram_map() {
        let map = build_e820(&regions(256 << 20));
        assert_eq!(
            map,
            vec![
                E820Entry {
                    addr: 0,
                    size: RESERVED_LOW_START,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: RESERVED_LOW_START,
                    size: HIGH_MEMORY_START - RESERVED_LOW_START,
                    kind: E820_RESERVED
                },
                E820Entry {
                    addr: HIGH_MEMORY_START,
                    size: (256 << 20) - HIGH_MEMORY_START,
                    kind: E820_RAM
                },
            ]
        );
    }

    #[test]
    fn large_ram_map_skips_hole() {
        let map = build_e820(&regions(6 << 30));
        assert_eq!(map.len(), 4);
        assert_eq!(map[2].addr, HIGH_MEMORY_START);
        assert_eq!(map[2].end(), MMIO_HOLE_START);
        assert_eq!(map[3].addr, MMIO_HOLE_END);
        assert_eq!(map[3].size, (6 << 30) - MMIO_HOLE_START);
        assert_eq!(map[3].kind, E820_RAM);
    }

    #[test]
    fn tiny_ram_has_no_high_memory() {
        let map = build_e820(&[(0, 0x8_0000)]);
        assert_eq!(
            map,
            vec![E820Entry {
                addr: 0,
                size: 0x8_0000,
                kind: E820_RAM
            }]
        );
    }

    #[test]
    fn ram_total_is_preserved() {
        let size = 3u64 << 30;
        let map = build_e820(&regions(size));
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, size - (HIGH_MEMORY_START - RESERVED_LOW_START));
    }
}
