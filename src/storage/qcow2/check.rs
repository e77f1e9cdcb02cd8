//! Consistency check and repair, with the rules `qemu-img check` applies: every cluster's
//! refcount equals the number of references to it, and COPIED is set in the active tables
//! exactly where the refcount is 1.

use super::header::EXT_BITMAPS;
use super::image::Image;
use super::table::{self, ClusterKind, COPIED, L1_RESERVED, OFFSET_MASK};
use crate::storage::StorageError;

/// Most clusters a check tracks: one u32 counter each, so at most 1 GiB of memory.
const MAX_CHECK_CLUSTERS: u64 = 1 << 28;
/// Maximum size of the bitmap directory and of each bitmap table that a check reads.
const MAX_BITMAP_BYTES: u64 = 64 << 20;
/// Byte ranges (offset, length, structure name) of the bitmaps, or why they are invalid.
pub type BitmapRanges = Result<Vec<(u64, u64, &'static str)>, String>;
/// Autoclear feature bit 0: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1;
/// Most problems a report lists one by one; the counts stay exact.
const MAX_MESSAGES: usize = 1000;

/// Findings of a check, in qemu-img's terms.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Refcounts too low, bad COPIED flags and invalid or out-of-file references.
    pub corruptions: u64,
    /// Clusters whose refcount is higher than their references.
    pub leaks: u64,
    /// Corruptions a repair fixed.
    pub corruptions_fixed: u64,
    /// Leaks a repair fixed.
    pub leaks_fixed: u64,
    /// One line per problem, in qemu-img's wording, at most 1000.
    pub messages: Vec<String>,
    /// End of the last cluster in use, in bytes.
    pub image_end_offset: u64,
    /// Guest clusters in the virtual disk.
    pub total_clusters: u64,
    /// Guest clusters with data in the active state.
    pub allocated_clusters: u64,
    /// Allocated guest clusters whose host cluster does not follow the previous one.
    pub fragmented_clusters: u64,
    /// Compressed guest clusters in the active state.
    pub compressed_clusters: u64,
}

/// Scope of a repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairMode {
    /// Only report.
    None,
    /// Lower refcounts that are too high.
    Leaks,
    /// Rebuild all refcounts and COPIED flags from the tables.
    All,
}

struct Counter {
    refs: Vec<u32>,
    report: CheckReport,
    copied_checks: Vec<(u64, bool, &'static str)>,
}

impl Counter {
    fn problem(&mut self, corruption: bool, message: String) {
        if corruption {
            self.report.corruptions += 1;
        } else {
            self.report.leaks += 1;
        }
        if self.report.messages.len() < MAX_MESSAGES {
            self.report.messages.push(message);
        }
    }

    fn add(&mut self, offset: u64, len: u64, cluster_size: u64, what: &str) {
        if len == 0 {
            return;
        }
        let first = offset / cluster_size;
        let last = (offset + len - 1) / cluster_size;
        for cluster in first..=last {
            match self.refs.get_mut(cluster as usize) {
                Some(count) => *count = count.saturating_add(1),
                None => self.problem(
                    true,
                    format!(
                        "ERROR {what} at offset {:#x} is outside the image file",
                        cluster * cluster_size
                    ),
                ),
            }
        }
    }
}

impl Image {
    fn count_references(
        &mut self,
        include_refcount_structures: bool,
    ) -> Result<Counter, StorageError> {
        let cluster_size = self.cluster_size();
        let clusters = self.file_len.div_ceil(cluster_size);
        if clusters > MAX_CHECK_CLUSTERS {
            return Err(StorageError::Unsupported {
                path: self.path.clone(),
                feature: format!(
                    "checking an image of {clusters} clusters (the check tracks at most 2^31)"
                ),
            });
        }
        let mut counter = Counter {
            refs: vec![0; clusters as usize],
            report: CheckReport {
                total_clusters: self.header.size.div_ceil(cluster_size),
                ..CheckReport::default()
            },
            copied_checks: Vec::new(),
        };
        counter.add(0, cluster_size, cluster_size, "header");

        let active = self.l1.clone();
        counter.add(
            self.header.l1_table_offset,
            active.len() as u64 * 8,
            cluster_size,
            "active L1 table",
        );
        self.count_tree(&mut counter, &active, true)?;

        if self.header.nb_snapshots > 0 {
            let table_len = self.snapshot_table_len;
            counter.add(
                self.header.snapshots_offset,
                table_len,
                cluster_size,
                "snapshot table",
            );
        }
        for snapshot in self.snapshots.clone() {
            counter.add(
                snapshot.l1_table_offset,
                u64::from(snapshot.l1_size) * 8,
                cluster_size,
                "snapshot L1 table",
            );
            match self.read_table(
                "snapshot l1_table_offset",
                snapshot.l1_table_offset,
                snapshot.l1_size.into(),
            ) {
                Ok(l1) => self.count_tree(&mut counter, &l1, false)?,
                Err(e) => counter.problem(true, format!("ERROR snapshot {}: {e}", snapshot.id)),
            }
        }

        if include_refcount_structures {
            let table_bytes = u64::from(self.header.refcount_table_clusters) * cluster_size;
            counter.add(
                self.header.refcount_table_offset,
                table_bytes,
                cluster_size,
                "refcount table",
            );
            for (i, &entry) in self.reftable.clone().iter().enumerate() {
                let block = entry & !0x1ff;
                if block != 0 {
                    if block >= self.file_len {
                        counter.problem(true, format!("ERROR refcount block {i} is outside image"));
                        continue;
                    }
                    counter.add(block, cluster_size, cluster_size, "refcount block");
                }
            }
        }
        self.count_bitmaps(&mut counter)?;
        Ok(counter)
    }

    fn count_tree(
        &mut self,
        counter: &mut Counter,
        l1: &[u64],
        active: bool,
    ) -> Result<(), StorageError> {
        let cluster_size = self.cluster_size();
        let words = if self.header.extended_l2() { 2 } else { 1 };
        let mut previous_host = None;
        for (i, &l1_entry) in l1.iter().enumerate() {
            let l2_offset = l1_entry & OFFSET_MASK;
            if l1_entry & L1_RESERVED != 0 || l2_offset % cluster_size != 0 {
                counter.problem(
                    true,
                    format!("ERROR L1 entry {i} is invalid: {l1_entry:#x}"),
                );
                continue;
            }
            if l2_offset == 0 {
                continue;
            }
            counter.add(l2_offset, cluster_size, cluster_size, "L2 table");
            if active {
                counter
                    .copied_checks
                    .push((l2_offset, l1_entry & COPIED != 0, "L2 table"));
            }
            let Ok(data) = self.read_cluster_checked("L2 table", l2_offset) else {
                continue;
            };
            for index in 0..self.header.l2_entries() as usize {
                let entry = table::get_u64(&data, index * words);
                let bitmap = if words == 2 {
                    table::get_u64(&data, index * words + 1)
                } else {
                    0
                };
                let kind = if self.has_data_file() {
                    table::classify_with_data_file(entry, self.header.extended_l2(), cluster_size)
                } else {
                    table::classify(
                        entry,
                        self.header.version,
                        self.header.extended_l2(),
                        cluster_size,
                    )
                };
                match kind {
                    // Data file clusters have no refcounts and always carry COPIED.
                    Some(ClusterKind::Normal { .. }) if self.has_data_file() => {
                        if active {
                            counter.report.allocated_clusters += 1;
                        }
                    }
                    Some(ClusterKind::Zero { .. }) if self.has_data_file() => {}
                    None => counter.problem(
                        true,
                        format!("ERROR L2 entry {entry:#x} in table at {l2_offset:#x} is invalid"),
                    ),
                    Some(ClusterKind::Compressed) => {
                        if entry & COPIED != 0 {
                            counter.problem(
                                true,
                                format!("ERROR compressed cluster {entry:#x} has COPIED set"),
                            );
                        }
                        let (first, count) = self.compressed_clusters(entry);
                        counter.add(
                            first,
                            count * cluster_size,
                            cluster_size,
                            "compressed cluster",
                        );
                        if active {
                            // Compressed clusters count as fragmented, as in qemu-img.
                            counter.report.allocated_clusters += 1;
                            counter.report.compressed_clusters += 1;
                            counter.report.fragmented_clusters += 1;
                            previous_host = None;
                        }
                    }
                    Some(ClusterKind::Normal { host }) | Some(ClusterKind::Zero { host })
                        if host != 0 =>
                    {
                        if bitmap & (bitmap >> 32) & 0xffff_ffff != 0 {
                            counter.problem(
                                true,
                                format!(
                                    "ERROR subclusters both allocated and zero in entry {entry:#x}"
                                ),
                            );
                        }
                        counter.add(host, cluster_size, cluster_size, "data cluster");
                        if active {
                            counter
                                .copied_checks
                                .push((host, entry & COPIED != 0, "data cluster"));
                            counter.report.allocated_clusters += 1;
                            if previous_host.is_some_and(|p| p + cluster_size != host) {
                                counter.report.fragmented_clusters += 1;
                            }
                            previous_host = Some(host);
                        }
                    }
                    Some(_) => {
                        if words == 2 && bitmap & 0xffff_ffff != 0 {
                            counter.problem(true, format!("ERROR subclusters allocated without a host cluster in entry {entry:#x}"));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn count_bitmaps(&mut self, counter: &mut Counter) -> Result<(), StorageError> {
        // Without autoclear bit 0 QEMU ignores the bitmaps, so their clusters count as leaks.
        if self.header.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
            return Ok(());
        }
        let cluster_size = self.cluster_size();
        match self.bitmap_ranges()? {
            Ok(ranges) => {
                for (offset, len, what) in ranges {
                    counter.add(offset, len, cluster_size, what);
                }
            }
            Err(message) => counter.problem(true, format!("ERROR {message}")),
        }
        Ok(())
    }

    /// Returns the byte ranges the persistent bitmaps occupy (directory, tables and data),
    /// or a message describing why the bitmaps extension is invalid.
    pub fn bitmap_ranges(&self) -> Result<BitmapRanges, StorageError> {
        let cluster_size = self.cluster_size();
        let Some(ext) = self
            .header
            .other_extensions
            .iter()
            .find(|e| e.kind == EXT_BITMAPS)
        else {
            return Ok(Ok(Vec::new()));
        };
        if ext.data.len() < 24 {
            return Ok(Err("bitmaps extension is shorter than 24 bytes".into()));
        }
        let be = |at: usize, n: usize| {
            ext.data[at..at + n]
                .iter()
                .fold(0u64, |a, &b| (a << 8) | u64::from(b))
        };
        let count = be(0, 4);
        let dir_size = be(8, 8);
        let dir_offset = be(16, 8);
        if dir_size > MAX_BITMAP_BYTES
            || dir_offset
                .checked_add(dir_size)
                .is_none_or(|e| e > self.file_len)
        {
            return Ok(Err(format!(
                "bitmap directory at {dir_offset:#x} of {dir_size} bytes is invalid"
            )));
        }

        let mut ranges = vec![(dir_offset, dir_size, "bitmap directory")];
        let mut dir = vec![0u8; dir_size as usize];
        self.pread(&mut dir, dir_offset)?;
        let mut at = 0usize;
        for _ in 0..count {
            if at + 24 > dir.len() {
                return Ok(Err("bitmap directory entry runs past the directory".into()));
            }
            let word = |o: usize, n: usize| {
                dir[at + o..at + o + n]
                    .iter()
                    .fold(0u64, |a, &b| (a << 8) | u64::from(b))
            };
            let table_offset = word(0, 8);
            let table_size = word(8, 4);
            let name_len = word(18, 2) as usize;
            let extra_len = word(20, 4) as usize;
            if table_size * 8 > MAX_BITMAP_BYTES || table_offset % cluster_size != 0 {
                return Ok(Err(format!(
                    "bitmap table at {table_offset:#x} of {table_size} entries is invalid"
                )));
            }

            ranges.push((table_offset, table_size * 8, "bitmap table"));
            let Ok(entries) = self.read_table("bitmap table offset", table_offset, table_size)
            else {
                return Ok(Err(format!(
                    "bitmap table at {table_offset:#x} runs past the end of the file"
                )));
            };
            for entry in entries {
                let data = entry & OFFSET_MASK;
                if data != 0 {
                    ranges.push((data, cluster_size, "bitmap data"));
                }
            }
            at += (24 + extra_len + name_len).next_multiple_of(8);
        }
        Ok(Ok(ranges))
    }

    /// Checks the image and, for a writable image, repairs what `mode` requests.
    pub fn check(&mut self, mode: RepairMode) -> Result<CheckReport, StorageError> {
        self.flush_metadata()?;
        let mut counter = self.count_references(true)?;
        let cluster_size = self.cluster_size();
        let mut leaked = Vec::new();
        for cluster in 0..counter.refs.len() as u64 {
            let references = u64::from(counter.refs[cluster as usize]);
            let refcount = match self.refcount(cluster) {
                Ok(refcount) => refcount,
                Err(e) => {
                    counter.problem(
                        true,
                        format!("ERROR cannot read refcount of cluster {cluster}: {e}"),
                    );
                    continue;
                }
            };
            if refcount > references {
                counter.problem(
                    false,
                    format!("Leaked cluster {cluster} refcount={refcount} reference={references}"),
                );
                leaked.push((cluster, refcount - references));
            } else if refcount < references {
                counter.problem(
                    true,
                    format!("ERROR cluster {cluster} refcount={refcount} reference={references}"),
                );
            }
            if references > 0 || refcount > 0 {
                counter.report.image_end_offset = (cluster + 1) * cluster_size;
            }
        }
        for &(offset, copied, what) in &counter.copied_checks.clone() {
            let refcount = self.refcount(offset / cluster_size).unwrap_or(0);
            if (refcount == 1) != copied {
                counter.problem(
                    true,
                    format!("ERROR OFLAG_COPIED {what}: offset={offset:#x} refcount={refcount}"),
                );
            }
        }

        let mut report = counter.report;
        if self.read_only || mode == RepairMode::None {
            return Ok(report);
        }
        if mode == RepairMode::All && report.corruptions > 0 {
            self.rebuild_refcounts()?;
            report.corruptions_fixed = report.corruptions;
            report.leaks_fixed = report.leaks;
        } else if report.leaks > 0 {
            for (cluster, excess) in leaked {
                self.update_refcount(cluster * cluster_size, -(excess as i64))?;
            }
            self.flush_metadata()?;
            self.sync()?;
            report.leaks_fixed = report.leaks;
        }
        Ok(report)
    }

    /// Writes a new refcount table and blocks past the end of the file, computed from the
    /// L1 and L2 tables, then fixes COPIED flags. The old refcount clusters become free.
    pub fn rebuild_refcounts(&mut self) -> Result<(), StorageError> {
        tracing::info!(path = %self.path.display(), "rebuilding refcounts");
        self.flush_metadata()?;
        let counter = self.count_references(false)?;
        let cluster_size = self.cluster_size();
        let entries_per_block = self.refblock_entries();
        let bits = self.header.refcount_bits();
        let max = self.max_refcount();
        let start = counter.refs.len() as u64;
        let (mut blocks, mut table_clusters) = (0u64, 0u64);
        loop {
            let total = start + blocks + table_clusters;
            let new_blocks = total.div_ceil(entries_per_block);
            let new_table = (new_blocks * 8).div_ceil(cluster_size);
            if (new_blocks, new_table) == (blocks, table_clusters) {
                break;
            }
            (blocks, table_clusters) = (new_blocks, new_table);
        }
        if table_clusters * cluster_size > super::header::MAX_REFTABLE_BYTES {
            return Err(self.corrupt("rebuilt refcount table would exceed 8 MiB"));
        }
        let mut refs: Vec<u64> = counter.refs.iter().map(|&r| u64::from(r)).collect();
        refs.resize((start + blocks + table_clusters) as usize, 1);
        if let Some((cluster, _)) = refs.iter().enumerate().find(|(_, &c)| c > max) {
            return Err(StorageError::RefcountOverflow {
                path: self.path.clone(),
                offset: cluster as u64 * cluster_size,
                max,
                bits,
            });
        }

        self.alloc_end = self.alloc_end.max(start + blocks + table_clusters);
        let mut reftable = vec![0u64; (table_clusters * cluster_size / 8) as usize];
        for block in 0..blocks {
            let offset = (start + block) * cluster_size;
            let mut data = vec![0u8; cluster_size as usize];
            for i in 0..entries_per_block {
                if let Some(&count) = refs.get((block * entries_per_block + i) as usize) {
                    super::refcount::set_entry(&mut data, bits, i, count);
                }
            }
            self.pwrite(&data, offset)?;
            reftable[block as usize] = offset;
        }
        let table_offset = (start + blocks) * cluster_size;
        let mut raw = vec![0u8; reftable.len() * 8];
        for (i, &entry) in reftable.iter().enumerate() {
            table::set_u64(&mut raw, i, entry);
        }
        self.pwrite(&raw, table_offset)?;
        self.sync()?;

        self.header.refcount_table_offset = table_offset;
        self.header.refcount_table_clusters = table_clusters as u32;
        self.write_header()?;
        self.reftable = reftable;
        self.reftable_dirty = false;
        self.refblock_cache.clear();
        self.alloc_end = self.alloc_end.max(start + blocks + table_clusters);
        self.free_hint = 1;
        self.fix_copied_flags()?;
        self.flush_metadata()?;
        self.sync()
    }
}
