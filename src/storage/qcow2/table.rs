//! L1 and L2 entry layouts.
//!
//! ```text
//! L1 entry:           bit 63 COPIED | bits 9-55 L2 table offset
//! standard L2 entry:  bit 63 COPIED | bit 62 compressed | bits 9-55 host offset | bit 0 zero
//! compressed entry:   bit 62 | bits x-61 extra 512-byte sectors | bits 0..x host byte offset,
//!                     x = 62 - (cluster_bits - 8)
//! extended L2 entry:  standard entry, then bits 0-31 allocated and bits 32-63 zero
//!                     subcluster bitmaps (32 subclusters per cluster)
//! ```

/// Bit 63 of L1 and L2 entries: the refcount of the referenced cluster is exactly 1.
pub const COPIED: u64 = 1 << 63;
/// Bit 62 of an L2 entry: the cluster is compressed.
pub const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of a standard L2 entry (version 3 without extended L2): the cluster reads as zeros.
pub const ZERO: u64 = 1;
/// Host cluster offset bits 9-55 of L1 and standard L2 entries.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L1 bits that must be zero: 1-8 and 56-62.
pub const L1_RESERVED: u64 = 0x7f00_0000_0000_01fe;
/// Standard L2 bits that must be zero: 1-8 and 56-61.
pub const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// Number of subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u64 = 32;
/// Size of one compressed sector.
pub const SECTOR: u64 = 512;

/// Layout of compressed cluster descriptors for one cluster size.
#[derive(Debug, Clone, Copy)]
pub struct CompressedLayout {
    shift: u32,
    offset_mask: u64,
    sectors_mask: u64,
}

impl CompressedLayout {
    /// Returns the layout for clusters of `1 << cluster_bits` bytes.
    pub fn new(cluster_bits: u32) -> Self {
        let shift = 62 - (cluster_bits - 8);
        CompressedLayout {
            shift,
            offset_mask: (1 << shift) - 1,
            sectors_mask: (1 << (cluster_bits - 8)) - 1,
        }
    }

    /// Decodes a compressed entry into the host byte offset and the byte count to read.
    pub fn decode(&self, entry: u64) -> (u64, u64) {
        let offset = entry & self.offset_mask;
        let sectors = ((entry >> self.shift) & self.sectors_mask) + 1;
        let len = sectors * SECTOR - (offset & (SECTOR - 1));
        (offset, len)
    }

    /// Encodes a compressed entry for `len` bytes of compressed data at `offset`.
    pub fn encode(&self, offset: u64, len: u64) -> u64 {
        let end = offset + len;
        let sectors = end.div_ceil(SECTOR) - offset / SECTOR;
        COMPRESSED | ((sectors - 1) << self.shift) | offset
    }
}

/// Reads the big-endian u64 at entry `index` of a table.
pub fn get_u64(table: &[u8], index: usize) -> u64 {
    let at = index * 8;
    u64::from_be_bytes(table[at..at + 8].try_into().expect("slice of 8 bytes"))
}

/// Stores `value` big-endian at entry `index` of a table.
pub fn set_u64(table: &mut [u8], index: usize, value: u64) {
    let at = index * 8;
    table[at..at + 8].copy_from_slice(&value.to_be_bytes());
}

/// State of one guest cluster, from its L2 entry or the lack of an L2 table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterKind {
    /// No data: read the backing file or zeros.
    Unallocated,
    /// Reads as zeros; `host` is a preallocated cluster or 0.
    Zero { host: u64 },
    /// Data at a host cluster.
    Normal { host: u64 },
    /// Compressed data.
    Compressed,
}

/// Classifies a standard (64-bit) L2 entry; returns `None` for reserved bits or an
/// unaligned host offset.
pub fn classify(
    entry: u64,
    version: u32,
    extended: bool,
    cluster_size: u64,
) -> Option<ClusterKind> {
    if entry & COMPRESSED != 0 {
        return Some(ClusterKind::Compressed);
    }
    if entry & L2_RESERVED != 0 {
        return None;
    }
    let host = entry & OFFSET_MASK;
    if host % cluster_size != 0 {
        return None;
    }
    if entry & ZERO != 0 {
        if version < 3 || extended {
            return None;
        }
        return Some(ClusterKind::Zero { host });
    }
    if host == 0 {
        return Some(ClusterKind::Unallocated);
    }
    Some(ClusterKind::Normal { host })
}

/// Classifies an L2 entry of an image with an external data file, where data clusters
/// sit at their guest offset, so host offset 0 with COPIED set is allocated too and
/// compressed clusters cannot occur.
pub fn classify_with_data_file(
    entry: u64,
    extended: bool,
    cluster_size: u64,
) -> Option<ClusterKind> {
    if entry & COMPRESSED != 0 || entry & L2_RESERVED != 0 {
        return None;
    }
    let host = entry & OFFSET_MASK;
    if host % cluster_size != 0 {
        return None;
    }
    if entry & ZERO != 0 {
        return (!extended).then_some(ClusterKind::Zero { host });
    }
    if host == 0 && entry & COPIED == 0 {
        return Some(ClusterKind::Unallocated);
    }
    Some(ClusterKind::Normal { host })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_descriptor_round_trip() {
        for bits in 9..=21 {
            let layout = CompressedLayout::new(bits);
            let entry = layout.encode(0x1_0000 + 512, 1000);
            let (offset, len) = layout.decode(entry);
            assert_eq!(offset, 0x1_0000 + 512, "cluster_bits {bits}");
            assert_eq!(len, 1024, "cluster_bits {bits}");
        }
    }

    #[test]
    fn classify_rejects_reserved_bits() {
        assert_eq!(classify(1 << 3, 3, false, 65536), None);
        assert_eq!(classify(0x10200, 3, false, 65536), None);
        assert_eq!(classify(ZERO, 2, false, 65536), None);
        assert_eq!(
            classify(ZERO, 3, false, 65536),
            Some(ClusterKind::Zero { host: 0 })
        );
        assert_eq!(
            classify(0x10000 | COPIED, 3, false, 65536),
            Some(ClusterKind::Normal { host: 0x10000 })
        );
    }
}
