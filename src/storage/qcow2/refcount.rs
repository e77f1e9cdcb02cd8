//! Refcounts and cluster allocation.
//!
//! The refcount table lists refcount blocks. A block is one cluster of entries
//! `refcount_bits` wide: 1 to 64 bits, least significant bits first within a byte for
//! widths below 8, big-endian for wider ones. A new refcount block is placed inside the
//! range it describes, so it records its own refcount. When the table itself is full, a
//! larger table and the blocks covering it are written past the end of the file.

use super::image::{CachedCluster, Image};
use super::table;
use crate::storage::StorageError;

impl Image {
    /// Returns the number of refcount entries in one refcount block.
    pub fn refblock_entries(&self) -> u64 {
        self.cluster_size() * 8 / u64::from(self.header.refcount_bits())
    }

    /// Returns the largest refcount the entry width can hold.
    pub fn max_refcount(&self) -> u64 {
        match self.header.refcount_bits() {
            64 => u64::MAX,
            bits => (1 << bits) - 1,
        }
    }

    fn refblock(&mut self, offset: u64) -> Result<&mut CachedCluster, StorageError> {
        if !self.refblock_cache.contains_key(&offset) {
            self.make_room()?;
            let data = self.read_cluster_checked("refcount block", offset)?;
            self.refblock_cache
                .insert(offset, CachedCluster { data, dirty: false });
        }
        Ok(self
            .refblock_cache
            .get_mut(&offset)
            .expect("inserted above"))
    }

    /// Returns the refcount block offset for refcount table index `index` (0 if none).
    fn refblock_offset(&self, index: u64) -> Result<u64, StorageError> {
        let Some(&entry) = self.reftable.get(index as usize) else {
            return Ok(0);
        };
        let offset = entry & !0x1ff;
        if entry & 0x1ff != 0 || offset % self.cluster_size() != 0 {
            return Err(self.corrupt(format!(
                "refcount table entry {index} is {entry:#x}: unaligned"
            )));
        }
        Ok(offset)
    }

    /// Returns the refcount of the cluster with index `cluster`.
    pub fn refcount(&mut self, cluster: u64) -> Result<u64, StorageError> {
        let entries = self.refblock_entries();
        let block = self.refblock_offset(cluster / entries)?;
        if block == 0 {
            return Ok(0);
        }
        let bits = self.header.refcount_bits();
        let data = &self.refblock(block)?.data;
        Ok(get_entry(data, bits, cluster % entries))
    }

    fn set_refcount_in_block(
        &mut self,
        block: u64,
        cluster: u64,
        value: u64,
    ) -> Result<(), StorageError> {
        let entries = self.refblock_entries();
        let bits = self.header.refcount_bits();
        let cached = self.refblock(block)?;
        set_entry(&mut cached.data, bits, cluster % entries, value);
        cached.dirty = true;
        Ok(())
    }

    /// Adds `delta` to the refcount of the cluster at `offset` and returns the new value.
    ///
    /// Increments past the width's maximum and decrements below zero fail without changing
    /// anything. A cluster whose refcount drops to 0 becomes free for allocation.
    pub fn update_refcount(&mut self, offset: u64, delta: i64) -> Result<u64, StorageError> {
        let cluster = offset / self.cluster_size();
        let entries = self.refblock_entries();
        if delta > 0 {
            if cluster >= self.alloc_end {
                return Err(self.corrupt(format!(
                    "reference to cluster at {offset:#x}, past the end of the image ({:#x})",
                    self.alloc_end * self.cluster_size()
                )));
            }
            self.ensure_refblock(cluster)?;
        }
        let block = self.refblock_offset(cluster / entries)?;
        if block == 0 {
            return Err(self.corrupt(format!(
                "cluster at {offset:#x} is freed but has no refcount block"
            )));
        }
        let old = self.refcount(cluster)?;
        let new = if delta >= 0 {
            match old.checked_add(delta as u64) {
                Some(v) if v <= self.max_refcount() => v,
                _ => {
                    return Err(StorageError::RefcountOverflow {
                        path: self.path.clone(),
                        offset,
                        max: self.max_refcount(),
                        bits: self.header.refcount_bits(),
                    })
                }
            }
        } else {
            old.checked_sub(delta.unsigned_abs()).ok_or_else(|| {
                self.corrupt(format!(
                    "refcount of cluster at {offset:#x} would drop below 0"
                ))
            })?
        };
        self.set_refcount_in_block(block, cluster, new)?;
        if new == 0 {
            self.free_hint = self.free_hint.min(cluster);
            self.l2_cache.remove(&offset);
            if self.compressed_cursor / self.cluster_size() == cluster {
                self.compressed_cursor = 0;
            }
        }
        Ok(new)
    }

    /// Makes sure a refcount block covers cluster index `cluster`.
    fn ensure_refblock(&mut self, cluster: u64) -> Result<(), StorageError> {
        let entries = self.refblock_entries();
        let index = cluster / entries;
        if self.refblock_offset(index)? != 0 {
            return Ok(());
        }
        if index >= self.reftable.len() as u64 {
            self.grow_reftable(index + 1)?;
            if self.refblock_offset(index)? != 0 {
                return Ok(());
            }
        }
        // Put the block at the first free cluster of its own range, so that it describes
        // itself and needs no other block.
        let first = index * entries;
        let place = first.max(1);
        let offset = place * self.cluster_size();
        let mut data = vec![0u8; self.cluster_size() as usize];
        set_entry(&mut data, self.header.refcount_bits(), place % entries, 1);
        self.refblock_cache
            .insert(offset, CachedCluster { data, dirty: true });
        self.reftable[index as usize] = offset;
        self.reftable_dirty = true;
        self.alloc_end = self.alloc_end.max(place + 1);
        Ok(())
    }

    /// Replaces the refcount table with one of at least `min_entries` entries, written
    /// together with the refcount blocks that cover it past the end of the file.
    fn grow_reftable(&mut self, min_entries: u64) -> Result<(), StorageError> {
        let cluster_size = self.cluster_size();
        let entries_per_block = self.refblock_entries();
        let start = self.alloc_end.max(self.file_len.div_ceil(cluster_size));
        let old_len = self.reftable.len() as u64;
        if min_entries.saturating_mul(8) > super::header::MAX_REFTABLE_BYTES {
            return Err(self.reftable_too_large(min_entries));
        }
        let mut table_entries = min_entries.max(old_len + old_len / 2).max(1);
        let (mut blocks, mut table_clusters);
        loop {
            table_clusters = (table_entries * 8).div_ceil(cluster_size);
            blocks = 0;
            // Blocks needed for the new area [start, start + blocks + table_clusters).
            loop {
                let end = start + blocks + table_clusters;
                let first = start / entries_per_block;
                let last = (end - 1) / entries_per_block;
                let missing = (first..=last)
                    .filter(|&i| i >= old_len || self.reftable[i as usize] == 0)
                    .count() as u64;
                if missing == blocks {
                    break;
                }
                blocks = missing;
            }
            let end = start + blocks + table_clusters;
            let needed = (end - 1) / entries_per_block + 1;
            if needed <= table_entries {
                break;
            }
            table_entries = needed;
        }
        if table_entries * 8 > super::header::MAX_REFTABLE_BYTES {
            return Err(self.reftable_too_large(table_entries));
        }

        // Write back pending metadata first, so the new table starts from the file's state.
        self.flush_metadata()?;
        let end = start + blocks + table_clusters;
        let mut new_table = self.reftable.clone();
        new_table.resize((table_clusters * cluster_size / 8) as usize, 0);
        let bits = self.header.refcount_bits();
        let mut next_block = start;
        for index in start / entries_per_block..=(end - 1) / entries_per_block {
            if new_table[index as usize] == 0 {
                new_table[index as usize] = next_block * cluster_size;
                let data = vec![0u8; cluster_size as usize];
                self.refblock_cache.insert(
                    next_block * cluster_size,
                    CachedCluster { data, dirty: true },
                );
                next_block += 1;
            }
        }
        // Every cluster of the new area is referenced once: blocks and table alike.
        for cluster in start..end {
            let block = new_table[(cluster / entries_per_block) as usize];
            let cached = self.refblock(block)?;
            set_entry(&mut cached.data, bits, cluster % entries_per_block, 1);
            cached.dirty = true;
        }
        self.alloc_end = end;

        let old_offset = self.header.refcount_table_offset;
        let old_clusters = u64::from(self.header.refcount_table_clusters);
        self.reftable = new_table;
        self.header.refcount_table_offset = (start + blocks) * cluster_size;
        self.header.refcount_table_clusters = table_clusters as u32;
        self.reftable_dirty = true;
        self.flush_metadata()?;
        self.sync()?;
        self.write_header()?;

        for i in 0..old_clusters {
            self.update_refcount(old_offset + i * cluster_size, -1)?;
        }
        Ok(())
    }

    fn reftable_too_large(&self, entries: u64) -> StorageError {
        StorageError::InvalidField {
            path: self.path.clone(),
            field: "refcount_table_clusters",
            value: (entries * 8).div_ceil(self.cluster_size()),
            reason: "refcount table would exceed 8 MiB; the image is too large for its cluster size and refcount width"
                .into(),
        }
    }

    /// Allocates `count` contiguous clusters with refcount 1 and returns the first offset.
    pub fn alloc_clusters(&mut self, count: u64) -> Result<u64, StorageError> {
        let cluster_size = self.cluster_size();
        'search: loop {
            let mut start = self.free_hint.max(1);
            let mut run = 0;
            while run < count {
                let cluster = start + run;
                if cluster >= self.alloc_end || self.refcount(cluster)? == 0 {
                    run += 1;
                } else {
                    start = cluster + 1;
                    run = 0;
                }
            }
            if (start + count) * cluster_size > super::header::MAX_HOST_OFFSET {
                return Err(self.corrupt("no free cluster below 2^56 bytes"));
            }
            for cluster in start..start + count {
                let had_block = self.has_refblock(cluster)?;
                self.ensure_refblock(cluster)?;
                if !had_block {
                    // The new block may have taken a cluster of this run: search again.
                    continue 'search;
                }
            }
            self.alloc_end = self.alloc_end.max(start + count);
            for cluster in start..start + count {
                self.update_refcount(cluster * cluster_size, 1)?;
            }
            if count == 1 || start == self.free_hint {
                self.free_hint = start + count;
            }
            return Ok(start * cluster_size);
        }
    }

    fn has_refblock(&self, cluster: u64) -> Result<bool, StorageError> {
        Ok(self.refblock_offset(cluster / self.refblock_entries())? != 0)
    }

    /// Loads the refcount table named by the header.
    pub fn load_reftable(&mut self) -> Result<(), StorageError> {
        let count = u64::from(self.header.refcount_table_clusters) * self.cluster_size() / 8;
        self.reftable = self.read_table(
            "refcount_table_offset",
            self.header.refcount_table_offset,
            count,
        )?;
        for (i, &entry) in self.reftable.iter().enumerate() {
            let offset = entry & !0x1ff;
            if entry & 0x1ff != 0
                || offset % self.cluster_size() != 0
                || offset >= table::OFFSET_MASK
            {
                return Err(self.corrupt(format!(
                    "refcount table entry {i} is {entry:#x}: reserved bits set or unaligned"
                )));
            }
        }
        Ok(())
    }
}

/// Reads refcount entry `index` of a block with `bits`-wide entries.
pub(crate) fn get_entry(block: &[u8], bits: u32, index: u64) -> u64 {
    if bits >= 8 {
        let width = (bits / 8) as usize;
        let at = index as usize * width;
        block[at..at + width]
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    } else {
        let bit = index * u64::from(bits);
        let byte = block[(bit / 8) as usize];
        let mask = (1u8 << bits) - 1;
        u64::from((byte >> (bit % 8)) & mask)
    }
}

/// Stores `value` (already checked against the width) into entry `index`.
pub(crate) fn set_entry(block: &mut [u8], bits: u32, index: u64, value: u64) {
    if bits >= 8 {
        let width = (bits / 8) as usize;
        let at = index as usize * width;
        let bytes = value.to_be_bytes();
        block[at..at + width].copy_from_slice(&bytes[8 - width..]);
    } else {
        let bit = index * u64::from(bits);
        let byte = &mut block[(bit / 8) as usize];
        let mask = ((1u8 << bits) - 1) << (bit % 8);
        *byte = (*byte & !mask) | (((value as u8) << (bit % 8)) & mask);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_of_every_width() {
        for order in 0..=6 {
            let bits = 1u32 << order;
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            let mut block = vec![0u8; 512];
            let count = 512 * 8 / u64::from(bits);
            for i in 0..count {
                set_entry(&mut block, bits, i, (i * 7) & max);
            }
            set_entry(&mut block, bits, 1, max);
            for i in 0..count {
                let expected = if i == 1 { max } else { (i * 7) & max };
                assert_eq!(
                    get_entry(&block, bits, i),
                    expected,
                    "bits {bits} index {i}"
                );
            }
        }
    }
}
