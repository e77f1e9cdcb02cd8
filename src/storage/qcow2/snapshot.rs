//! Internal snapshots: the snapshot table and create, apply and delete.
//!
//! ```text
//! snapshot table entry (padded to 8 bytes):
//! 0  l1_table_offset u64     8  l1_size u32         12 id_len u16    14 name_len u16
//! 16 date_sec u32            20 date_nsec u32       24 vm_clock_nsec u64
//! 32 vm_state_size u32       36 extra_data_size u32 40 extra data, then id, then name
//! extra data: 0 vm_state_size u64, 8 disk_size u64, 16 icount u64 (QEMU 5.0 and later)
//! ```
//! Creating a snapshot copies the active L1 table and adds one reference to every L2 table
//! and data cluster it reaches, so later guest writes copy instead of overwriting.

use std::time::{SystemTime, UNIX_EPOCH};

use super::image::Image;
use super::table::{self, ClusterKind, COPIED, L1_RESERVED, OFFSET_MASK};
use crate::storage::StorageError;

/// Maximum total size of the snapshot table (QEMU's limit).
pub const MAX_TABLE_BYTES: u64 = 64 << 20;
/// Maximum extra data per snapshot entry (QEMU's limit).
pub const MAX_EXTRA_BYTES: u32 = 1024;
const ENTRY_FIXED_BYTES: usize = 40;

/// One internal snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Unique id, a decimal number for snapshots made by QEMU or MonsterVM.
    pub id: String,
    /// Name (the tag in `qemu-img snapshot -l`).
    pub name: String,
    /// File offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in the snapshot's L1 table.
    pub l1_size: u32,
    /// Creation time, seconds since the Unix epoch.
    pub date_sec: u32,
    /// Sub-second part of the creation time in nanoseconds.
    pub date_nsec: u32,
    /// Guest run time at the snapshot in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Bytes of saved VM state (0 for disk-only snapshots).
    pub vm_state_size: u64,
    /// Virtual disk size at the snapshot, if recorded.
    pub disk_size: Option<u64>,
    /// Instruction count at the snapshot, if recorded.
    pub icount: Option<u64>,
    /// Extra data past the fields above, kept for later format additions.
    pub extra_tail: Vec<u8>,
}

fn be16(buf: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([buf[at], buf[at + 1]])
}

fn be32(buf: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(buf[at..at + 4].try_into().expect("slice of 4 bytes"))
}

fn be64(buf: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(buf[at..at + 8].try_into().expect("slice of 8 bytes"))
}

impl Snapshot {
    fn serialize(&self, out: &mut Vec<u8>) {
        let mut extra = Vec::with_capacity(24 + self.extra_tail.len());
        extra.extend_from_slice(&self.vm_state_size.to_be_bytes());
        extra.extend_from_slice(&self.disk_size.unwrap_or(0).to_be_bytes());
        extra.extend_from_slice(&self.icount.unwrap_or(u64::MAX).to_be_bytes());
        extra.extend_from_slice(&self.extra_tail);

        out.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        out.extend_from_slice(&self.l1_size.to_be_bytes());
        out.extend_from_slice(&(self.id.len() as u16).to_be_bytes());
        out.extend_from_slice(&(self.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.date_sec.to_be_bytes());
        out.extend_from_slice(&self.date_nsec.to_be_bytes());
        out.extend_from_slice(&self.vm_clock_nsec.to_be_bytes());
        out.extend_from_slice(&(self.vm_state_size.min(u64::from(u32::MAX)) as u32).to_be_bytes());
        out.extend_from_slice(&(extra.len() as u32).to_be_bytes());
        out.extend_from_slice(&extra);
        out.extend_from_slice(self.id.as_bytes());
        out.extend_from_slice(self.name.as_bytes());
        out.resize(out.len().next_multiple_of(8), 0);
    }
}

impl Image {
    /// Reads and validates the snapshot table; returns its size in bytes.
    pub fn load_snapshots(&mut self) -> Result<u64, StorageError> {
        let count = self.header.nb_snapshots;
        let mut at = self.header.snapshots_offset;
        let start = at;
        let mut snapshots = Vec::with_capacity(count.min(1024) as usize);
        for index in 0..count {
            let invalid =
                |field: &'static str, value: u64, reason: &str| StorageError::InvalidField {
                    path: self.path.clone(),
                    field,
                    value,
                    reason: format!("snapshot {index}: {reason}"),
                };
            if at + ENTRY_FIXED_BYTES as u64 > self.file_len {
                return Err(invalid(
                    "snapshots_offset",
                    at,
                    "entry runs past the end of the file",
                ));
            }
            let mut fixed = [0u8; ENTRY_FIXED_BYTES];
            self.pread(&mut fixed, at)?;
            let l1_table_offset = be64(&fixed, 0);
            let l1_size = be32(&fixed, 8);
            let id_len = usize::from(be16(&fixed, 12));
            let name_len = usize::from(be16(&fixed, 14));
            let extra_len = be32(&fixed, 36);
            if extra_len > MAX_EXTRA_BYTES {
                return Err(invalid(
                    "snapshot extra_data_size",
                    extra_len.into(),
                    "over 1 KiB",
                ));
            }
            let rest_len = extra_len as usize + id_len + name_len;
            let entry_len = (ENTRY_FIXED_BYTES + rest_len).next_multiple_of(8) as u64;
            if at + entry_len - start > MAX_TABLE_BYTES {
                return Err(invalid(
                    "nb_snapshots",
                    count.into(),
                    "snapshot table over 64 MiB",
                ));
            }
            if at + ENTRY_FIXED_BYTES as u64 + rest_len as u64 > self.file_len {
                return Err(invalid(
                    "snapshots_offset",
                    at,
                    "entry runs past the end of the file",
                ));
            }
            let mut rest = vec![0u8; rest_len];
            self.pread(&mut rest, at + ENTRY_FIXED_BYTES as u64)?;
            let extra = &rest[..extra_len as usize];
            let id =
                String::from_utf8_lossy(&rest[extra_len as usize..extra_len as usize + id_len])
                    .into_owned();
            let name = String::from_utf8_lossy(&rest[extra_len as usize + id_len..]).into_owned();

            if l1_table_offset % self.cluster_size() != 0
                || l1_table_offset
                    .checked_add(u64::from(l1_size) * 8)
                    .is_none_or(|e| e > super::header::MAX_HOST_OFFSET)
            {
                return Err(invalid(
                    "snapshot l1_table_offset",
                    l1_table_offset,
                    "unaligned or beyond 2^56",
                ));
            }
            if u64::from(l1_size) * 8 > super::header::MAX_L1_BYTES {
                return Err(invalid(
                    "snapshot l1_size",
                    l1_size.into(),
                    "L1 table over 32 MiB",
                ));
            }
            let vm_state_size = if extra.len() >= 8 {
                be64(extra, 0)
            } else {
                u64::from(be32(&fixed, 32))
            };
            let disk_size = (extra.len() >= 16).then(|| be64(extra, 8));
            let icount = (extra.len() >= 24)
                .then(|| be64(extra, 16))
                .filter(|&v| v != u64::MAX);
            if let Some(size) = disk_size {
                if self.header.l1_entries_for(size) > u64::from(l1_size) {
                    return Err(invalid(
                        "snapshot l1_size",
                        l1_size.into(),
                        "too small for the snapshot's disk size",
                    ));
                }
            }
            snapshots.push(Snapshot {
                id,
                name,
                l1_table_offset,
                l1_size,
                date_sec: be32(&fixed, 16),
                date_nsec: be32(&fixed, 20),
                vm_clock_nsec: be64(&fixed, 24),
                vm_state_size,
                disk_size,
                icount,
                extra_tail: extra.get(24..).unwrap_or_default().to_vec(),
            });
            at += entry_len;
        }
        self.snapshots = snapshots;
        Ok(at - start)
    }

    fn snapshot_table_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for snapshot in &self.snapshots {
            snapshot.serialize(&mut out);
        }
        out
    }

    /// Writes the snapshot list to new clusters, points the header at them and frees the
    /// old table.
    fn rewrite_snapshot_table(&mut self) -> Result<(), StorageError> {
        let old_len = self.snapshot_table_len;
        let cluster_size = self.cluster_size();
        let bytes = self.snapshot_table_bytes();
        let new_offset = if bytes.is_empty() {
            0
        } else {
            let offset = self.alloc_clusters((bytes.len() as u64).div_ceil(cluster_size))?;
            self.pwrite(&bytes, offset)?;
            offset
        };
        self.flush_metadata()?;
        self.sync()?;
        let old_offset = self.header.snapshots_offset;
        self.header.snapshots_offset = new_offset;
        self.header.nb_snapshots = self.snapshots.len() as u32;
        self.write_header()?;
        self.snapshot_table_len = bytes.len() as u64;
        if old_offset != 0 && old_len > 0 {
            let clusters: Vec<u64> = (0..old_len.div_ceil(cluster_size))
                .map(|i| old_offset + i * cluster_size)
                .collect();
            self.release(&clusters)?;
        }
        Ok(())
    }

    fn find_snapshot(&self, id_or_name: &str) -> Result<usize, StorageError> {
        self.snapshots
            .iter()
            .position(|s| s.id == id_or_name)
            .or_else(|| self.snapshots.iter().position(|s| s.name == id_or_name))
            .ok_or_else(|| StorageError::SnapshotNotFound {
                path: self.path.clone(),
                name: id_or_name.to_string(),
            })
    }

    /// Adds `delta` to the refcount of every L2 table and data cluster that `l1` reaches.
    /// On failure (an increment past the refcount width, say) the changes made so far are
    /// undone, so the refcounts stay as they were.
    pub fn adjust_tree_refcounts(&mut self, l1: &[u64], delta: i64) -> Result<(), StorageError> {
        let mut done = Vec::new();
        let result = self.adjust_tree_refcounts_logged(l1, delta, &mut done);
        if result.is_err() {
            for &offset in done.iter().rev() {
                // Undoing a change that just succeeded cannot overflow or underflow.
                let _ = self.update_refcount(offset, -delta);
            }
        }
        result
    }

    fn adjust_tree_refcounts_logged(
        &mut self,
        l1: &[u64],
        delta: i64,
        done: &mut Vec<u64>,
    ) -> Result<(), StorageError> {
        let words = if self.header.extended_l2() { 2 } else { 1 };
        for (i, &l1_entry) in l1.iter().enumerate() {
            if l1_entry & L1_RESERVED != 0 {
                return Err(
                    self.corrupt(format!("L1 entry {i} is {l1_entry:#x}: reserved bits set"))
                );
            }
            let l2_offset = l1_entry & OFFSET_MASK;
            if l2_offset == 0 {
                continue;
            }
            let data = self.l2_table(l2_offset)?.data.clone();
            for index in 0..self.header.l2_entries() as usize {
                let entry = table::get_u64(&data, index * words);
                for cluster in self.entry_references(entry)? {
                    self.update_refcount(cluster, delta)?;
                    done.push(cluster);
                }
            }
            self.update_refcount(l2_offset, delta)?;
            done.push(l2_offset);
        }
        Ok(())
    }

    /// Returns the host clusters an L2 entry references.
    pub fn entry_references(&self, entry: u64) -> Result<Vec<u64>, StorageError> {
        let kind = table::classify(
            entry,
            self.header.version,
            self.header.extended_l2(),
            self.cluster_size(),
        )
        .ok_or_else(|| {
            self.corrupt(format!(
                "L2 entry {entry:#x} has reserved bits set or an unaligned offset"
            ))
        })?;
        Ok(match kind {
            ClusterKind::Compressed => {
                let (first, count) = self.compressed_clusters(entry);
                (0..count)
                    .map(|i| first + i * self.cluster_size())
                    .collect()
            }
            ClusterKind::Normal { host } | ClusterKind::Zero { host } if host != 0 => vec![host],
            _ => Vec::new(),
        })
    }

    /// Sets COPIED in the active L1 and L2 tables exactly where the refcount is 1.
    pub fn fix_copied_flags(&mut self) -> Result<(), StorageError> {
        let words = if self.header.extended_l2() { 2 } else { 1 };
        for i in 0..self.l1.len() {
            let l1_entry = self.l1[i];
            let l2_offset = l1_entry & OFFSET_MASK;
            if l2_offset == 0 {
                continue;
            }
            let copied = self.refcount(l2_offset / self.cluster_size())? == 1;
            let expected = if copied {
                l1_entry | COPIED
            } else {
                l1_entry & !COPIED
            };
            if expected != l1_entry {
                self.l1[i] = expected;
                self.l1_dirty = true;
            }
            if self.has_data_file() {
                // Data file clusters have no refcounts; COPIED stays as written.
                continue;
            }
            for index in 0..self.header.l2_entries() as usize {
                let entry = table::get_u64(&self.l2_table(l2_offset)?.data, index * words);
                let host = match table::classify(
                    entry,
                    self.header.version,
                    self.header.extended_l2(),
                    self.cluster_size(),
                ) {
                    Some(ClusterKind::Normal { host }) | Some(ClusterKind::Zero { host })
                        if host != 0 =>
                    {
                        host
                    }
                    _ => continue,
                };
                let copied = self.refcount(host / self.cluster_size())? == 1;
                let expected = if copied {
                    entry | COPIED
                } else {
                    entry & !COPIED
                };
                if expected != entry {
                    let l2 = self.l2_table(l2_offset)?;
                    table::set_u64(&mut l2.data, index * words, expected);
                    l2.dirty = true;
                }
            }
        }
        Ok(())
    }

    /// Creates a snapshot of the current disk contents named `name`.
    pub fn create_snapshot(&mut self, name: &str) -> Result<Snapshot, StorageError> {
        if self.has_data_file() {
            return Err(StorageError::Unsupported {
                path: self.path.clone(),
                feature: "internal snapshots of an image with an external data file".into(),
            });
        }
        if self.snapshots.iter().any(|s| s.name == name) {
            return Err(StorageError::SnapshotExists {
                path: self.path.clone(),
                name: name.to_string(),
            });
        }
        if name.len() > usize::from(u16::MAX) {
            return Err(StorageError::InvalidField {
                path: self.path.clone(),
                field: "snapshot name length",
                value: name.len() as u64,
                reason: "longer than 65535 bytes".into(),
            });
        }
        self.flush_metadata()?;
        let id = self
            .snapshots
            .iter()
            .filter_map(|s| s.id.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;

        let l1 = self.l1.clone();
        let l1_bytes = l1.len() as u64 * 8;
        let l1_offset = if l1.is_empty() {
            0
        } else {
            self.alloc_clusters(l1_bytes.div_ceil(self.cluster_size()))?
        };
        let mut raw = vec![0u8; l1_bytes as usize];
        for (i, &entry) in l1.iter().enumerate() {
            table::set_u64(&mut raw, i, entry & !COPIED);
        }
        self.pwrite(&raw, l1_offset)?;
        if let Err(e) = self.adjust_tree_refcounts(&l1, 1) {
            let clusters = l1_bytes.div_ceil(self.cluster_size());
            for i in 0..clusters {
                self.update_refcount(l1_offset + i * self.cluster_size(), -1)?;
            }
            return Err(e);
        }
        self.fix_copied_flags()?;
        self.flush_metadata()?;

        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let snapshot = Snapshot {
            id: id.to_string(),
            name: name.to_string(),
            l1_table_offset: l1_offset,
            l1_size: l1.len() as u32,
            date_sec: now.as_secs() as u32,
            date_nsec: now.subsec_nanos(),
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(self.header.size),
            icount: Some(0),
            extra_tail: Vec::new(),
        };
        self.snapshots.push(snapshot.clone());
        self.rewrite_snapshot_table()?;
        Ok(snapshot)
    }

    /// Reverts the disk to the snapshot with id or name `id_or_name`.
    pub fn apply_snapshot(&mut self, id_or_name: &str) -> Result<(), StorageError> {
        let index = self.find_snapshot(id_or_name)?;
        let snapshot = self.snapshots[index].clone();
        self.flush_metadata()?;
        let new_l1: Vec<u64> = self
            .read_table(
                "snapshot l1_table_offset",
                snapshot.l1_table_offset,
                snapshot.l1_size.into(),
            )?
            .into_iter()
            .map(|e| e & !COPIED)
            .collect();
        let new_size = snapshot.disk_size.unwrap_or(self.header.size);
        if self.header.l1_entries_for(new_size) > new_l1.len() as u64 {
            return Err(self.corrupt(format!(
                "snapshot {} has an L1 table too small for its disk size",
                snapshot.id
            )));
        }
        self.adjust_tree_refcounts(&new_l1, 1)?;
        self.flush_metadata()?;
        self.sync()?;

        let old_l1 = std::mem::replace(&mut self.l1, new_l1);
        let mut released = Vec::new();
        if self.l1.len() != old_l1.len() {
            let cluster_size = self.cluster_size();
            let old_offset = self.header.l1_table_offset;
            let old_clusters = (old_l1.len() as u64 * 8).div_ceil(cluster_size);
            let offset = if self.l1.is_empty() {
                0
            } else {
                self.alloc_clusters((self.l1.len() as u64 * 8).div_ceil(cluster_size))?
            };
            self.header.l1_table_offset = offset;
            self.header.l1_size = self.l1.len() as u32;
            released.extend((0..old_clusters).map(|i| old_offset + i * cluster_size));
        }
        self.header.size = new_size;
        self.flush_metadata()?;
        self.write_l1()?;
        self.sync()?;
        self.write_header()?;

        self.adjust_tree_refcounts(&old_l1, -1)?;
        self.release(&released)?;
        self.fix_copied_flags()?;
        self.flush_metadata()?;
        self.decompressed = None;
        Ok(())
    }

    /// Deletes the snapshot with id or name `id_or_name` and frees what only it used.
    pub fn delete_snapshot(&mut self, id_or_name: &str) -> Result<(), StorageError> {
        let index = self.find_snapshot(id_or_name)?;
        self.flush_metadata()?;
        let snapshot = self.snapshots.remove(index);
        self.rewrite_snapshot_table()?;

        let l1 = self.read_table(
            "snapshot l1_table_offset",
            snapshot.l1_table_offset,
            snapshot.l1_size.into(),
        )?;
        self.adjust_tree_refcounts(&l1, -1)?;
        let cluster_size = self.cluster_size();
        let clusters = (l1.len() as u64 * 8).div_ceil(cluster_size);
        for i in 0..clusters {
            self.update_refcount(snapshot.l1_table_offset + i * cluster_size, -1)?;
        }
        self.fix_copied_flags()?;
        self.flush_metadata()
    }
}
