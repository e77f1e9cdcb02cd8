//! The open image: file handle, header, active L1 table and the metadata caches.
//!
//! L2 tables and refcount blocks are cached write-back. [`Image::flush_metadata`] writes
//! them in the order that keeps a crash from leaving a cluster referenced with too low a
//! refcount: refcount blocks and table, fdatasync, L2 tables, fdatasync, L1 table. Guest
//! data is written with pwrite before the L2 entry that maps it changes, so the first
//! fdatasync also covers it. A refcount decrement goes the other way (the reference must
//! disappear on disk first), so callers run [`Image::flush_metadata`] before decrementing.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::header::{Header, INCOMPAT_DIRTY};
use super::snapshot::Snapshot;
use super::table::{self, L1_RESERVED, OFFSET_MASK};
use crate::storage::{BlockBackend, StorageError};

/// Cache budget for L2 tables and for refcount blocks, each, in bytes.
const CACHE_BYTES: usize = 32 << 20;

/// A cached table cluster and whether it differs from the file.
#[derive(Debug)]
pub(crate) struct CachedCluster {
    pub data: Vec<u8>,
    pub dirty: bool,
}

/// The mutable state of an open qcow2 image; [`super::Qcow2`] guards it with a mutex.
pub(crate) struct Image {
    pub path: PathBuf,
    pub file: File,
    pub header: Header,
    pub read_only: bool,
    pub l1: Vec<u64>,
    pub l1_dirty: bool,
    pub l2_cache: HashMap<u64, CachedCluster>,
    pub reftable: Vec<u64>,
    pub reftable_dirty: bool,
    pub refblock_cache: HashMap<u64, CachedCluster>,
    /// Lowest cluster index that may be free.
    pub free_hint: u64,
    /// Clusters at or past this index are beyond everything written so far.
    pub alloc_end: u64,
    /// Bytes in the file, as far as this process wrote or found it.
    pub file_len: u64,
    /// Next free byte in the cluster that contains the last compressed cluster (0 if none).
    pub compressed_cursor: u64,
    pub backing: Option<Box<dyn BlockBackend>>,
    /// External data file: guest cluster N lives at offset N there, without refcounts.
    pub data_file: Option<(File, PathBuf)>,
    pub snapshots: Vec<Snapshot>,
    /// Size in bytes of the snapshot table in the file.
    pub snapshot_table_len: u64,
    /// Last decompressed cluster: the L2 entry and its data.
    pub decompressed: Option<(u64, Vec<u8>)>,
}

impl Image {
    /// Returns the cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.header.cluster_size()
    }

    /// Returns the error for a structure that contradicts the format.
    pub fn corrupt(&self, reason: impl Into<String>) -> StorageError {
        StorageError::Corrupt {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    /// Reads exactly `buf.len()` bytes at `offset`; bytes past the end of the file read
    /// as zeros.
    pub fn pread(&self, buf: &mut [u8], offset: u64) -> Result<(), StorageError> {
        read_full(&self.file, &self.path, buf, offset)
    }

    /// Writes `buf` at `offset`, which must lie in clusters the image already has or has
    /// allocated: a host offset read from a damaged table fails here instead of growing
    /// the file to that offset.
    pub fn pwrite(&mut self, buf: &[u8], offset: u64) -> Result<(), StorageError> {
        if self.read_only {
            return Err(StorageError::ReadOnly {
                path: self.path.clone(),
            });
        }
        let limit = self.alloc_end.saturating_mul(self.cluster_size());
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > limit)
        {
            return Err(self.corrupt(format!(
                "write of {} bytes at host offset {offset:#x} is past the end of the image ({limit:#x})",
                buf.len()
            )));
        }
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| StorageError::io(&self.path, "write", e))?;
        self.file_len = self.file_len.max(offset + buf.len() as u64);
        Ok(())
    }

    /// Returns whether guest data lives in an external data file.
    pub fn has_data_file(&self) -> bool {
        self.data_file.is_some()
    }

    /// Reads guest data at host offset `offset` of the data file or, without one, the image.
    pub fn data_read(&self, buf: &mut [u8], offset: u64) -> Result<(), StorageError> {
        match &self.data_file {
            Some((file, path)) => read_full(file, path, buf, offset),
            None => self.pread(buf, offset),
        }
    }

    /// Writes guest data at host offset `offset` of the data file or, without one, the image.
    pub fn data_write(&mut self, buf: &[u8], offset: u64) -> Result<(), StorageError> {
        let Some((file, path)) = &self.data_file else {
            return self.pwrite(buf, offset);
        };
        if self.read_only {
            return Err(StorageError::ReadOnly { path: path.clone() });
        }
        file.write_all_at(buf, offset)
            .map_err(|e| StorageError::io(path, "write", e))
    }

    /// Returns the host cluster for new data of the guest cluster at `guest_cluster`:
    /// the same offset in an external data file, or a newly allocated image cluster.
    pub fn alloc_data_cluster(&mut self, guest_cluster: u64) -> Result<u64, StorageError> {
        if self.has_data_file() {
            return Ok(guest_cluster);
        }
        self.alloc_clusters(1)
    }

    /// Calls fdatasync on the data file, if any, and then on the image file.
    pub fn sync(&self) -> Result<(), StorageError> {
        if let (Some((file, path)), false) = (&self.data_file, self.read_only) {
            file.sync_data()
                .map_err(|e| StorageError::io(path, "fdatasync", e))?;
        }
        self.file
            .sync_data()
            .map_err(|e| StorageError::io(&self.path, "fdatasync", e))
    }

    /// Reads a table of `count` u64 entries at `offset`, checking that it lies in the file.
    pub fn read_table(
        &self,
        what: &'static str,
        offset: u64,
        count: u64,
    ) -> Result<Vec<u64>, StorageError> {
        let bytes = count * 8;
        if offset
            .checked_add(bytes)
            .is_none_or(|end| end > self.file_len)
        {
            return Err(StorageError::InvalidField {
                path: self.path.clone(),
                field: what,
                value: offset,
                reason: format!(
                    "table of {count} entries runs past the end of the file ({:#x})",
                    self.file_len
                ),
            });
        }
        let mut raw = vec![0u8; bytes as usize];
        self.pread(&mut raw, offset)?;
        Ok((0..count as usize)
            .map(|i| table::get_u64(&raw, i))
            .collect())
    }

    /// Loads the active L1 table and validates its entries.
    pub fn load_l1(&mut self) -> Result<(), StorageError> {
        let l1 = self.read_table(
            "l1_table_offset",
            self.header.l1_table_offset,
            self.header.l1_size.into(),
        )?;
        for (i, &entry) in l1.iter().enumerate() {
            if entry & L1_RESERVED != 0 || (entry & OFFSET_MASK) % self.cluster_size() != 0 {
                return Err(self.corrupt(format!(
                    "L1 entry {i} is {entry:#x}: reserved bits set or L2 offset unaligned"
                )));
            }
        }
        self.l1 = l1;
        Ok(())
    }

    /// Returns the L2 table at `offset`, reading it into the cache on a miss.
    pub fn l2_table(&mut self, offset: u64) -> Result<&mut CachedCluster, StorageError> {
        if !self.l2_cache.contains_key(&offset) {
            self.make_room()?;
            let data = self.read_cluster_checked("L2 table", offset)?;
            self.l2_cache
                .insert(offset, CachedCluster { data, dirty: false });
        }
        Ok(self.l2_cache.get_mut(&offset).expect("inserted above"))
    }

    /// Reads a whole metadata cluster, rejecting offsets past the end of the file.
    pub fn read_cluster_checked(
        &self,
        structure: &str,
        offset: u64,
    ) -> Result<Vec<u8>, StorageError> {
        let cluster_size = self.cluster_size();
        if offset == 0
            || offset % cluster_size != 0
            || offset + cluster_size > self.file_len.next_multiple_of(cluster_size)
        {
            return Err(self.corrupt(format!(
                "{structure} offset {offset:#x} is zero, unaligned or past the end of the file"
            )));
        }
        let mut data = vec![0u8; cluster_size as usize];
        self.pread(&mut data, offset)?;
        Ok(data)
    }

    /// Writes dirty metadata back when a cache exceeds its budget, then drops clean tables.
    pub fn make_room(&mut self) -> Result<(), StorageError> {
        let cluster_size = self.cluster_size() as usize;
        let over = |cache: &HashMap<u64, CachedCluster>| cache.len() * cluster_size > CACHE_BYTES;
        if over(&self.l2_cache) || over(&self.refblock_cache) {
            self.flush_metadata()?;
            self.l2_cache.clear();
            self.refblock_cache.clear();
        }
        Ok(())
    }

    /// Writes dirty metadata in crash-safe order (see the module documentation).
    pub fn flush_metadata(&mut self) -> Result<(), StorageError> {
        if self.read_only {
            return Ok(());
        }
        let l2_dirty = self.l2_cache.values().any(|t| t.dirty);
        let refcounts_dirty = self.reftable_dirty || self.refblock_cache.values().any(|t| t.dirty);

        // Allocated clusters may not all be written yet (extended L2 writes only some
        // subclusters); the file must still cover every cluster that has a refcount.
        let needed_len = self.alloc_end * self.cluster_size();
        if self.file_len < needed_len {
            self.file
                .set_len(needed_len)
                .map_err(|e| StorageError::io(&self.path, "set length", e))?;
            self.file_len = needed_len;
        }

        if refcounts_dirty {
            let mut blocks: Vec<(u64, Vec<u8>)> = Vec::new();
            for (&offset, block) in self.refblock_cache.iter_mut().filter(|(_, b)| b.dirty) {
                blocks.push((offset, block.data.clone()));
                block.dirty = false;
            }
            for (offset, data) in blocks {
                self.pwrite(&data, offset)?;
            }
            if self.reftable_dirty {
                self.write_reftable()?;
            }
        }
        if l2_dirty || self.l1_dirty {
            // Data and refcounts reach the disk before any table that points at them.
            self.sync()?;
        }
        if l2_dirty {
            let mut tables: Vec<(u64, Vec<u8>)> = Vec::new();
            for (&offset, l2) in self.l2_cache.iter_mut().filter(|(_, t)| t.dirty) {
                tables.push((offset, l2.data.clone()));
                l2.dirty = false;
            }
            for (offset, data) in tables {
                self.pwrite(&data, offset)?;
            }
            if self.l1_dirty {
                self.sync()?;
            }
        }
        if self.l1_dirty {
            self.write_l1()?;
        }
        Ok(())
    }

    /// Writes the whole active L1 table.
    pub fn write_l1(&mut self) -> Result<(), StorageError> {
        let mut raw = vec![0u8; self.l1.len() * 8];
        for (i, &entry) in self.l1.iter().enumerate() {
            table::set_u64(&mut raw, i, entry);
        }
        let offset = self.header.l1_table_offset;
        self.pwrite(&raw, offset)?;
        self.l1_dirty = false;
        Ok(())
    }

    /// Writes the whole refcount table, zero-padded to its clusters.
    pub fn write_reftable(&mut self) -> Result<(), StorageError> {
        let bytes = u64::from(self.header.refcount_table_clusters) * self.cluster_size();
        let mut raw = vec![0u8; bytes as usize];
        for (i, &entry) in self.reftable.iter().enumerate() {
            table::set_u64(&mut raw, i, entry);
        }
        let offset = self.header.refcount_table_offset;
        self.pwrite(&raw, offset)?;
        self.reftable_dirty = false;
        Ok(())
    }

    /// Writes the header into cluster 0 and syncs it.
    pub fn write_header(&mut self) -> Result<(), StorageError> {
        let raw = self.header.serialize(&self.path)?;
        self.pwrite(&raw, 0)?;
        self.sync()
    }

    /// Writes back all metadata and clears the dirty bit: the clean-close path.
    pub fn close(&mut self) -> Result<(), StorageError> {
        if self.read_only {
            return Ok(());
        }
        self.flush_metadata()?;
        self.sync()?;
        if self.header.incompatible_features & INCOMPAT_DIRTY != 0 {
            self.header.incompatible_features &= !INCOMPAT_DIRTY;
            self.write_header()?;
        }
        Ok(())
    }

    /// Reads guest data of the backing file into `buf`; bytes past its end read as zeros.
    pub fn read_backing(&self, buf: &mut [u8], offset: u64) -> Result<(), StorageError> {
        let Some(backing) = &self.backing else {
            buf.fill(0);
            return Ok(());
        };
        let size = backing.size();
        if offset >= size {
            buf.fill(0);
            return Ok(());
        }
        let avail = ((size - offset) as usize).min(buf.len());
        backing.read_at(&mut buf[..avail], offset)?;
        buf[avail..].fill(0);
        Ok(())
    }
}

/// Reads exactly `buf.len()` bytes at `offset`; bytes past the end of the file read as zeros.
pub(crate) fn read_full(
    file: &File,
    path: &Path,
    buf: &mut [u8],
    offset: u64,
) -> Result<(), StorageError> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                break;
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(StorageError::io(path, "read", e)),
        }
    }
    Ok(())
}
