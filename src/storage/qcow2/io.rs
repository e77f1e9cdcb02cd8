//! Guest reads and writes: cluster lookup, allocation, copy-on-write and zeroing.

use super::compress;
use super::image::{CachedCluster, Image};
use super::table::{
    self, classify, classify_with_data_file, ClusterKind, CompressedLayout, COPIED, OFFSET_MASK,
    SUBCLUSTERS, ZERO,
};
use crate::storage::StorageError;

/// An L2 entry with its subcluster bitmap (0 for standard entries).
#[derive(Debug, Clone, Copy)]
struct L2Entry {
    entry: u64,
    bitmap: u64,
}

impl Image {
    fn entry_words(&self) -> usize {
        if self.header.extended_l2() {
            2
        } else {
            1
        }
    }

    fn l1_index(&self, guest: u64) -> usize {
        (guest / self.cluster_size() / self.header.l2_entries()) as usize
    }

    fn l2_index(&self, guest: u64) -> usize {
        (guest / self.cluster_size() % self.header.l2_entries()) as usize
    }

    fn kind_of(&self, entry: u64) -> Result<ClusterKind, StorageError> {
        if self.has_data_file() {
            return classify_with_data_file(entry, self.header.extended_l2(), self.cluster_size())
                .ok_or_else(|| {
                    self.corrupt(format!(
                        "L2 entry {entry:#x} is invalid for an image with an external data file"
                    ))
                });
        }
        classify(
            entry,
            self.header.version,
            self.header.extended_l2(),
            self.cluster_size(),
        )
        .ok_or_else(|| {
            self.corrupt(format!(
                "L2 entry {entry:#x} has reserved bits set or an unaligned offset"
            ))
        })
    }

    /// Returns the L2 entry for the guest cluster at `guest` without allocating anything.
    fn lookup(&mut self, guest: u64) -> Result<L2Entry, StorageError> {
        let l1_index = self.l1_index(guest);
        let Some(&l1_entry) = self.l1.get(l1_index) else {
            return Ok(L2Entry {
                entry: 0,
                bitmap: 0,
            });
        };
        let l2_offset = l1_entry & OFFSET_MASK;
        if l2_offset == 0 {
            return Ok(L2Entry {
                entry: 0,
                bitmap: 0,
            });
        }
        let index = self.l2_index(guest) * self.entry_words();
        let extended = self.header.extended_l2();
        let data = &self.l2_table(l2_offset)?.data;
        Ok(L2Entry {
            entry: table::get_u64(data, index),
            bitmap: if extended {
                table::get_u64(data, index + 1)
            } else {
                0
            },
        })
    }

    fn store(&mut self, l2_offset: u64, guest: u64, value: L2Entry) -> Result<(), StorageError> {
        let index = self.l2_index(guest) * self.entry_words();
        let extended = self.header.extended_l2();
        let l2 = self.l2_table(l2_offset)?;
        table::set_u64(&mut l2.data, index, value.entry);
        if extended {
            table::set_u64(&mut l2.data, index + 1, value.bitmap);
        }
        l2.dirty = true;
        Ok(())
    }

    /// Reads guest data at `offset` (the range was checked against the disk size).
    pub fn read(&mut self, buf: &mut [u8], offset: u64) -> Result<(), StorageError> {
        let cluster_size = self.cluster_size();
        let mut done = 0usize;
        while done < buf.len() {
            let guest = offset + done as u64;
            let in_cluster = guest % cluster_size;
            let chunk = ((cluster_size - in_cluster) as usize).min(buf.len() - done);
            self.read_in_cluster(&mut buf[done..done + chunk], guest)?;
            done += chunk;
        }
        Ok(())
    }

    fn read_in_cluster(&mut self, buf: &mut [u8], guest: u64) -> Result<(), StorageError> {
        let found = self.lookup(guest)?;
        let in_cluster = guest % self.cluster_size();
        match self.kind_of(found.entry)? {
            ClusterKind::Compressed => {
                let data = self.decompressed_cluster(found.entry)?;
                buf.copy_from_slice(&data[in_cluster as usize..in_cluster as usize + buf.len()]);
                Ok(())
            }
            ClusterKind::Zero { .. } => {
                buf.fill(0);
                Ok(())
            }
            ClusterKind::Normal { host } if !self.header.extended_l2() => {
                self.data_read(buf, host + in_cluster)
            }
            ClusterKind::Unallocated if !self.header.extended_l2() => self.read_backing(buf, guest),
            ClusterKind::Normal { host } => self.read_subclusters(buf, guest, host, found.bitmap),
            ClusterKind::Unallocated => self.read_subclusters(buf, guest, 0, found.bitmap),
        }
    }

    fn read_subclusters(
        &mut self,
        buf: &mut [u8],
        guest: u64,
        host: u64,
        bitmap: u64,
    ) -> Result<(), StorageError> {
        let sub_size = self.cluster_size() / SUBCLUSTERS;
        let mut done = 0usize;
        while done < buf.len() {
            let at = guest + done as u64;
            let in_cluster = at % self.cluster_size();
            let sub = in_cluster / sub_size;
            let chunk = ((sub_size - in_cluster % sub_size) as usize).min(buf.len() - done);
            let part = &mut buf[done..done + chunk];
            let allocated = bitmap >> sub & 1 != 0;
            let zero = bitmap >> (32 + sub) & 1 != 0;
            match (allocated, zero) {
                (true, true) => {
                    return Err(self.corrupt(format!(
                        "subcluster {sub} at guest offset {at:#x} is both allocated and zero (bitmap {bitmap:#x})"
                    )))
                }
                (true, false) if host == 0 && !self.has_data_file() => {
                    return Err(self.corrupt(format!(
                        "subcluster {sub} at guest offset {at:#x} is allocated but the cluster has no host offset"
                    )))
                }
                (true, false) => self.data_read(part, host + in_cluster)?,
                (false, true) => part.fill(0),
                (false, false) => self.read_backing(part, at)?,
            }
            done += chunk;
        }
        Ok(())
    }

    /// Returns the host clusters a compressed entry occupies, as (first offset, count).
    pub fn compressed_clusters(&self, entry: u64) -> (u64, u64) {
        let (offset, len) = CompressedLayout::new(self.header.cluster_bits).decode(entry);
        let cluster_size = self.cluster_size();
        let first = offset / cluster_size;
        let last = (offset + len - 1) / cluster_size;
        (first * cluster_size, last - first + 1)
    }

    fn decompressed_cluster(&mut self, entry: u64) -> Result<Vec<u8>, StorageError> {
        if let Some((cached, data)) = &self.decompressed {
            if *cached == entry {
                return Ok(data.clone());
            }
        }
        let (offset, len) = CompressedLayout::new(self.header.cluster_bits).decode(entry);
        let mut packed = vec![0u8; len as usize];
        self.pread(&mut packed, offset)?;
        let mut data = vec![0u8; self.cluster_size() as usize];
        compress::decompress(self.header.compression, &packed, &mut data).map_err(|reason| {
            StorageError::Compression {
                path: self.path.clone(),
                offset,
                reason,
            }
        })?;
        self.decompressed = Some((entry, data.clone()));
        Ok(data)
    }

    /// Returns the L2 table for guest offset `guest`, allocating it or copying a shared one.
    fn l2_for_write(&mut self, guest: u64) -> Result<u64, StorageError> {
        let l1_index = self.l1_index(guest);
        let Some(&l1_entry) = self.l1.get(l1_index) else {
            return Err(self.corrupt(format!("guest offset {guest:#x} is beyond the L1 table")));
        };
        let old = l1_entry & OFFSET_MASK;
        if old != 0 && l1_entry & COPIED != 0 {
            return Ok(old);
        }
        let new = self.alloc_clusters(1)?;
        let data = if old == 0 {
            vec![0u8; self.cluster_size() as usize]
        } else {
            self.l2_table(old)?.data.clone()
        };
        self.make_room()?;
        self.l2_cache
            .insert(new, CachedCluster { data, dirty: true });
        self.l1[l1_index] = new | COPIED;
        self.l1_dirty = true;
        if old != 0 {
            self.release(&[old])?;
        }
        Ok(new)
    }

    /// Drops one reference to each cluster after the references left the tables: writes
    /// the tables back first, so the file never shows a reference with too low a refcount.
    pub fn release(&mut self, clusters: &[u64]) -> Result<(), StorageError> {
        if clusters.is_empty() {
            return Ok(());
        }
        self.flush_metadata()?;
        for &offset in clusters {
            self.update_refcount(offset, -1)?;
        }
        Ok(())
    }

    fn references_of(&self, found: L2Entry) -> Result<Vec<u64>, StorageError> {
        if self.has_data_file() {
            // Clusters of an external data file have no refcounts.
            return Ok(Vec::new());
        }
        Ok(match self.kind_of(found.entry)? {
            ClusterKind::Compressed => {
                let (first, count) = self.compressed_clusters(found.entry);
                (0..count)
                    .map(|i| first + i * self.cluster_size())
                    .collect()
            }
            ClusterKind::Normal { host } | ClusterKind::Zero { host } if host != 0 => vec![host],
            _ => Vec::new(),
        })
    }

    /// Writes guest data at `offset` (the range was checked against the disk size).
    pub fn write(&mut self, buf: &[u8], offset: u64) -> Result<(), StorageError> {
        let cluster_size = self.cluster_size();
        let mut done = 0usize;
        while done < buf.len() {
            let guest = offset + done as u64;
            let in_cluster = guest % cluster_size;
            let chunk = ((cluster_size - in_cluster) as usize).min(buf.len() - done);
            self.write_in_cluster(&buf[done..done + chunk], guest)?;
            done += chunk;
        }
        self.decompressed = None;
        Ok(())
    }

    fn write_in_cluster(&mut self, data: &[u8], guest: u64) -> Result<(), StorageError> {
        let cluster_size = self.cluster_size();
        let in_cluster = guest % cluster_size;
        let cluster_start = guest - in_cluster;

        // Fast path: the data cluster is ours alone and the L2 table is ours alone.
        let found = self.lookup(guest)?;
        let l1_copied = self
            .l1
            .get(self.l1_index(guest))
            .is_some_and(|e| e & COPIED != 0);
        if l1_copied && found.entry & COPIED != 0 && !self.header.extended_l2() {
            if let ClusterKind::Normal { host } = self.kind_of(found.entry)? {
                return self.data_write(data, host + in_cluster);
            }
        }

        let l2_offset = self.l2_for_write(guest)?;
        let found = self.lookup(guest)?;
        let kind = self.kind_of(found.entry)?;
        if self.header.extended_l2() && kind != ClusterKind::Compressed {
            return self.write_subclusters(l2_offset, data, guest, found);
        }
        if let ClusterKind::Normal { host } = kind {
            if found.entry & COPIED != 0 {
                return self.data_write(data, host + in_cluster);
            }
        }

        let reuse = match kind {
            ClusterKind::Zero { host } if host != 0 && found.entry & COPIED != 0 => Some(host),
            _ => None,
        };
        let new_host = match reuse {
            Some(host) => host,
            None => self.alloc_data_cluster(cluster_start)?,
        };
        let reads_as_zeros = matches!(kind, ClusterKind::Zero { .. })
            || (kind == ClusterKind::Unallocated && self.backing.is_none());
        if data.len() as u64 == cluster_size {
            self.data_write(data, new_host)?;
        } else if reads_as_zeros
            && reuse.is_none()
            && !self.has_data_file()
            && new_host >= self.file_len
        {
            // The new cluster starts at or past the end of the file, so it already reads as
            // zeros and only the guest data needs writing.
            self.data_write(data, new_host + in_cluster)?;
        } else {
            let mut cluster = vec![0u8; cluster_size as usize];
            match kind {
                ClusterKind::Normal { host } => self.data_read(&mut cluster, host)?,
                ClusterKind::Compressed => cluster = self.decompressed_cluster(found.entry)?,
                ClusterKind::Zero { .. } => {}
                ClusterKind::Unallocated => self.read_backing(&mut cluster, cluster_start)?,
            }
            cluster[in_cluster as usize..in_cluster as usize + data.len()].copy_from_slice(data);
            self.data_write(&cluster, new_host)?;
        }
        let old_refs = if reuse.is_some() {
            Vec::new()
        } else {
            self.references_of(found)?
        };
        self.store(
            l2_offset,
            guest,
            L2Entry {
                entry: new_host | COPIED,
                bitmap: 0,
            },
        )?;
        self.release(&old_refs)
    }

    fn write_subclusters(
        &mut self,
        l2_offset: u64,
        data: &[u8],
        guest: u64,
        found: L2Entry,
    ) -> Result<(), StorageError> {
        let cluster_size = self.cluster_size();
        let sub_size = cluster_size / SUBCLUSTERS;
        let in_cluster = guest % cluster_size;
        let cluster_start = guest - in_cluster;
        let first = in_cluster / sub_size;
        let last = (in_cluster + data.len() as u64 - 1) / sub_size;
        let span_start = first * sub_size;
        let span_end = (last + 1) * sub_size;
        let span_mask: u64 = ((1u64 << (last - first + 1)) - 1) << first;

        let host = found.entry & OFFSET_MASK;
        let shared = host != 0 && found.entry & COPIED == 0;

        // Subclusters only partly covered by the write keep their old contents around it.
        let mut span = vec![0u8; (span_end - span_start) as usize];
        for sub in [first, last] {
            let start = sub * sub_size;
            let covered = in_cluster <= start && in_cluster + data.len() as u64 >= start + sub_size;
            if covered {
                continue;
            }
            let part =
                &mut span[(start - span_start) as usize..(start - span_start + sub_size) as usize];
            let allocated = found.bitmap >> sub & 1 != 0;
            let zero = found.bitmap >> (32 + sub) & 1 != 0;
            if allocated && host != 0 {
                self.data_read(part, host + start)?;
            } else if !zero {
                self.read_backing(part, cluster_start + start)?;
            }
        }
        let at = (in_cluster - span_start) as usize;
        span[at..at + data.len()].copy_from_slice(data);

        let new_host = if host != 0 && !shared {
            self.data_write(&span, host + span_start)?;
            host
        } else {
            let new_host = self.alloc_data_cluster(cluster_start)?;
            if shared {
                let mut whole = vec![0u8; cluster_size as usize];
                self.data_read(&mut whole, host)?;
                whole[span_start as usize..span_end as usize].copy_from_slice(&span);
                self.data_write(&whole, new_host)?;
            } else {
                self.data_write(&span, new_host + span_start)?;
            }
            new_host
        };
        let bitmap = (found.bitmap | span_mask) & !(span_mask << 32);
        self.store(
            l2_offset,
            guest,
            L2Entry {
                entry: new_host | COPIED,
                bitmap,
            },
        )?;
        if shared && !self.has_data_file() {
            self.release(&[host])?;
        }
        Ok(())
    }

    /// Writes one whole guest cluster compressed if it shrinks, as `qemu-img convert -c`
    /// does; the cluster must be unallocated.
    pub fn write_compressed(&mut self, data: &[u8], guest: u64) -> Result<(), StorageError> {
        let cluster_size = self.cluster_size();
        let max_len = (cluster_size - table::SECTOR) as usize;
        let found = self.lookup(guest)?;
        let packed = match compress::compress(self.header.compression, data, max_len.max(1)) {
            Some(packed) if found.entry == 0 && found.bitmap == 0 && !self.has_data_file() => {
                packed
            }
            _ => return self.write(data, guest),
        };
        let len = (packed.len() as u64).next_multiple_of(table::SECTOR);
        let cursor = self.compressed_cursor;
        let fits = cursor != 0
            && cursor % cluster_size != 0
            && cursor % cluster_size + len <= cluster_size;
        // Each compressed cluster adds a reference to the host cluster it shares, so narrow
        // refcounts (1 bit holds only 1) force a fresh cluster.
        let offset = if fits && self.refcount(cursor / cluster_size)? < self.max_refcount() {
            self.update_refcount(cursor, 1)?;
            cursor
        } else {
            self.alloc_clusters(1)?
        };
        let mut padded = packed;
        padded.resize(len as usize, 0);
        self.pwrite(&padded, offset)?;
        self.compressed_cursor = offset + len;
        if self.compressed_cursor % cluster_size == 0 {
            self.compressed_cursor = 0;
        }

        let l2_offset = self.l2_for_write(guest)?;
        let entry = CompressedLayout::new(self.header.cluster_bits).encode(offset, len);
        self.store(l2_offset, guest, L2Entry { entry, bitmap: 0 })
    }

    /// Makes `offset..offset+len` read as zeros. Whole clusters lose their host clusters;
    /// with `discard`, partial clusters are left alone, otherwise they get written zeros.
    pub fn zero_range(&mut self, offset: u64, len: u64, discard: bool) -> Result<(), StorageError> {
        let cluster_size = self.cluster_size();
        let end = offset + len;
        let mut guest = offset;
        let mut released = Vec::new();
        while guest < end {
            let in_cluster = guest % cluster_size;
            let chunk = (cluster_size - in_cluster).min(end - guest);
            if chunk == cluster_size || (guest + chunk == self.header.size && in_cluster == 0) {
                if !self.zero_cluster(guest, discard, &mut released)? && !discard {
                    self.write(&vec![0u8; chunk as usize], guest)?;
                }
            } else if !discard {
                self.write(&vec![0u8; chunk as usize], guest)?;
            }
            guest += chunk;
        }
        self.decompressed = None;
        self.release(&released)
    }

    /// Replaces one whole guest cluster by a zero or unallocated entry; returns false where
    /// the format cannot express zeros over a backing file (version 2).
    fn zero_cluster(
        &mut self,
        guest: u64,
        discard: bool,
        released: &mut Vec<u64>,
    ) -> Result<bool, StorageError> {
        let has_backing = self.backing.is_some();
        let target = if self.header.extended_l2() {
            L2Entry {
                entry: 0,
                bitmap: if has_backing { 0xffff_ffff << 32 } else { 0 },
            }
        } else if !has_backing {
            L2Entry {
                entry: 0,
                bitmap: 0,
            }
        } else if self.header.version >= 3 {
            L2Entry {
                entry: ZERO,
                bitmap: 0,
            }
        } else {
            return Ok(discard);
        };
        let found = self.lookup(guest)?;
        if found.entry == target.entry && found.bitmap == target.bitmap {
            return Ok(true);
        }
        let l2_offset = self.l2_for_write(guest)?;
        let found = self.lookup(guest)?;
        released.extend(self.references_of(found)?);
        self.store(l2_offset, guest, target)?;
        Ok(true)
    }
}
