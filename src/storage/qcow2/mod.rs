//! qcow2 images, versions 2 and 3, interchangeable with QEMU's.
//!
//! Files by concern: `header` (cluster 0 and its extensions), `table` (L1 and L2 entry
//! layouts), `image` (open state, caches and the order of metadata writes), `refcount`
//! (refcounts and allocation), `io` (guest reads and writes), `compress`, `snapshot` and
//! `check`. [`Qcow2`] wraps the state in a mutex so one image can serve several threads.

mod check;
mod compress;
pub mod header;
mod image;
mod io;
mod refcount;
mod snapshot;
mod table;

use std::collections::HashMap;
use std::fs::{File, OpenOptions as FsOpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

pub use check::{CheckReport, RepairMode};
pub use header::CompressionType;
pub use snapshot::Snapshot;

use header::{
    Header, COMPAT_LAZY_REFCOUNTS, INCOMPAT_COMPRESSION, INCOMPAT_CORRUPT, INCOMPAT_DIRTY,
    INCOMPAT_EXTL2,
};
use image::Image;

use super::lock::{lock_image, Access, Locking};
use super::{check_range, BackingPolicy, BlockBackend, ImageFormat, OpenOptions, StorageError};

/// Settings for a new qcow2 image, named after qemu-img's `-o` options.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual size in bytes; 0 with a backing file takes the backing file's size.
    pub size: u64,
    /// Cluster size in bytes, a power of two from 512 B to 2 MiB.
    pub cluster_size: u64,
    /// Format version: 2 (`compat=0.10`) or 3 (`compat=1.1`).
    pub version: u32,
    /// Refcount width in bits: 1, 2, 4, 8, 16, 32 or 64.
    pub refcount_bits: u32,
    /// 128-bit L2 entries with 32 subclusters per cluster.
    pub extended_l2: bool,
    /// Compression method for compressed clusters.
    pub compression: CompressionType,
    /// Sets the lazy refcounts compatible feature bit.
    pub lazy_refcounts: bool,
    /// Backing file name as stored in the header (relative names are relative to the image).
    pub backing_file: Option<String>,
    /// Backing file format, stored in the backing format extension.
    pub backing_format: Option<ImageFormat>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: 65536,
            version: 3,
            refcount_bits: 16,
            extended_l2: false,
            compression: CompressionType::Zlib,
            lazy_refcounts: false,
            backing_file: None,
            backing_format: None,
        }
    }
}

/// Facts about an open image for `monstervm disk info`.
#[derive(Debug, Clone)]
pub struct Qcow2Info {
    /// Format version, 2 or 3.
    pub version: u32,
    /// Virtual size in bytes.
    pub size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// Whether L2 entries are extended.
    pub extended_l2: bool,
    /// Compression method.
    pub compression: CompressionType,
    /// Whether the lazy refcounts bit is set.
    pub lazy_refcounts: bool,
    /// Whether the corrupt bit is set.
    pub corrupt: bool,
    /// Whether the dirty bit was set when the image was opened.
    pub dirty: bool,
    /// Backing file name as stored.
    pub backing_file: Option<String>,
    /// Backing file format as stored.
    pub backing_format: Option<String>,
    /// Internal snapshots.
    pub snapshots: Vec<Snapshot>,
}

/// An open qcow2 image.
// NOTE: one mutex serializes all I/O of an image, data reads included, so several queue
// workers on one image do not read in parallel.
pub struct Qcow2 {
    image: Mutex<Image>,
    path: PathBuf,
    read_only: bool,
    opened_dirty: bool,
    /// Set by [`Qcow2::close`], so that dropping the image does not close it twice.
    closed: AtomicBool,
}

impl std::fmt::Debug for Qcow2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2")
            .field("path", &self.path)
            .field("read_only", &self.read_only)
            .finish()
    }
}

fn invalid_option(path: &Path, field: &'static str, value: u64, reason: &str) -> StorageError {
    StorageError::InvalidField {
        path: path.to_path_buf(),
        field,
        value,
        reason: reason.to_string(),
    }
}

impl Qcow2 {
    /// Opens a qcow2 image and its backing chain.
    pub fn open(path: &Path, options: &OpenOptions) -> Result<Self, StorageError> {
        let canonical = path
            .canonicalize()
            .map_err(|e| StorageError::io(path, "resolve path", e))?;
        Self::open_in_chain(path, options, &mut vec![canonical], true)
    }

    /// Opens one image of a backing chain; `chain` lists the canonical paths opened so far,
    /// this image included. Without `follow_backing` the backing file stays closed, which
    /// only image creation uses: it writes no guest data.
    pub(crate) fn open_in_chain(
        path: &Path,
        options: &OpenOptions,
        chain: &mut Vec<PathBuf>,
        follow_backing: bool,
    ) -> Result<Self, StorageError> {
        let file = FsOpenOptions::new()
            .read(true)
            .write(!options.read_only)
            .open(path)
            .map_err(|e| StorageError::io(path, "open", e))?;
        lock_file(&file, path, options)?;
        let file_len = file
            .metadata()
            .map_err(|e| StorageError::io(path, "stat", e))?
            .len();
        let header = read_header(&file, path, file_len)?;

        if header.incompatible_features & INCOMPAT_CORRUPT != 0 && !options.read_only {
            return Err(StorageError::Corrupt {
                path: path.to_path_buf(),
                reason: "the corrupt bit is set, so the image may only be opened read-only".into(),
            });
        }
        if let Some(name) = &header.data_file {
            if options.backing == BackingPolicy::Deny {
                return Err(StorageError::BackingDenied {
                    path: path.to_path_buf(),
                    kind: "external data file",
                    target: name.clone(),
                });
            }
        }
        let data_file = if header.incompatible_features & header::INCOMPAT_DATA_FILE != 0 {
            let Some(name) = &header.data_file else {
                return Err(StorageError::Unsupported {
                    path: path.to_path_buf(),
                    feature: "an external data file without a data file name extension".into(),
                });
            };
            let data_path = super::resolve_backing_path(path, name);
            let file = FsOpenOptions::new()
                .read(true)
                .write(!options.read_only)
                .open(&data_path)
                .map_err(|e| StorageError::io(&data_path, "open external data file", e))?;
            lock_file(&file, &data_path, options)?;
            Some((file, data_path))
        } else {
            None
        };
        let backing = match &header.backing_file {
            None => None,
            Some(_) if !follow_backing => None,
            Some(name) if options.backing == BackingPolicy::Deny => {
                return Err(StorageError::BackingDenied {
                    path: path.to_path_buf(),
                    kind: "backing file",
                    target: name.clone(),
                })
            }
            Some(name) => {
                let format = header
                    .backing_format
                    .as_deref()
                    .map(str::parse::<ImageFormat>)
                    .transpose()?;
                Some(super::open_backing(path, name, format, options, chain)?)
            }
        };

        let opened_dirty = header.incompatible_features & INCOMPAT_DIRTY != 0;
        let mut image = Image {
            path: path.to_path_buf(),
            file,
            header,
            read_only: options.read_only,
            l1: Vec::new(),
            l1_dirty: false,
            l2_cache: HashMap::new(),
            reftable: Vec::new(),
            reftable_dirty: false,
            refblock_cache: HashMap::new(),
            free_hint: 1,
            alloc_end: 0,
            file_len,
            compressed_cursor: 0,
            backing,
            data_file,
            snapshots: Vec::new(),
            snapshot_table_len: 0,
            decompressed: None,
        };
        image.alloc_end = file_len.div_ceil(image.cluster_size());
        image.load_l1()?;
        image.load_reftable()?;
        image.snapshot_table_len = image.load_snapshots()?;

        if !options.read_only {
            let bitmap_clusters = image.drop_bitmaps()?;
            // This writer keeps no bitmaps, so every autoclear feature becomes invalid.
            image.header.autoclear_features = 0;
            if opened_dirty {
                tracing::warn!(path = %path.display(), "image was not closed cleanly; repairing refcounts");
                image.rebuild_refcounts()?;
            }
            if image.header.version >= 3 {
                image.header.incompatible_features |= INCOMPAT_DIRTY;
            }
            image.write_header()?;
            image.release(&bitmap_clusters)?;
        }
        Ok(Qcow2 {
            image: Mutex::new(image),
            path: path.to_path_buf(),
            read_only: options.read_only,
            opened_dirty,
            closed: AtomicBool::new(false),
        })
    }

    /// Creates a qcow2 image at `path` (replacing any file there) and opens it for writing.
    pub fn create(path: &Path, options: &CreateOptions) -> Result<Self, StorageError> {
        let cluster_size = options.cluster_size;
        if !cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&cluster_size) {
            return Err(invalid_option(
                path,
                "cluster_size",
                cluster_size,
                "must be a power of two from 512 to 2097152",
            ));
        }
        let bits = options.refcount_bits;
        if !bits.is_power_of_two() || bits > 64 {
            return Err(invalid_option(
                path,
                "refcount_bits",
                bits.into(),
                "must be 1, 2, 4, 8, 16, 32 or 64",
            ));
        }
        if options.version != 2 && options.version != 3 {
            return Err(invalid_option(
                path,
                "compat",
                options.version.into(),
                "must be 0.10 (version 2) or 1.1 (version 3)",
            ));
        }
        if options.version == 2
            && (bits != 16
                || options.extended_l2
                || options.lazy_refcounts
                || options.compression != CompressionType::Zlib)
        {
            return Err(invalid_option(
                path,
                "compat",
                2,
                "compat=0.10 allows only 16-bit refcounts, zlib and no extended L2 or lazy refcounts",
            ));
        }
        if options.extended_l2 && cluster_size < 16384 {
            return Err(invalid_option(
                path,
                "cluster_size",
                cluster_size,
                "extended L2 needs clusters of at least 16 KiB",
            ));
        }

        let mut size = options.size;
        if let Some(name) = &options.backing_file {
            if size == 0 {
                let format = options.backing_format;
                let mut chain = Vec::new();
                let backing =
                    super::open_backing(path, name, format, &OpenOptions::read_only(), &mut chain)?;
                size = backing.size();
            }
        }

        let cluster_bits = cluster_size.trailing_zeros();
        let mut incompatible = 0;
        if options.extended_l2 {
            incompatible |= INCOMPAT_EXTL2;
        }
        if options.compression != CompressionType::Zlib {
            incompatible |= INCOMPAT_COMPRESSION;
        }
        let header = Header {
            version: options.version,
            cluster_bits,
            size: 0,
            l1_size: 0,
            l1_table_offset: 0,
            refcount_table_offset: cluster_size,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: incompatible,
            compatible_features: if options.lazy_refcounts {
                COMPAT_LAZY_REFCOUNTS
            } else {
                0
            },
            autoclear_features: 0,
            refcount_order: bits.trailing_zeros(),
            header_length: if options.version >= 3 {
                header::V3_HEADER_LEN
            } else {
                72
            },
            compression: options.compression,
            extra_fields: Vec::new(),
            backing_file: options.backing_file.clone(),
            backing_format: options.backing_format.map(|f| f.name().to_string()),
            data_file: None,
            other_extensions: Vec::new(),
        };

        // Cluster 0 header, cluster 1 refcount table, cluster 2 the first refcount block,
        // which records clusters 0-2. The L1 table comes from the resize below.
        let mut cluster0 = header.serialize(path)?;
        cluster0.resize(cluster_size as usize, 0);
        let mut reftable = vec![0u8; cluster_size as usize];
        table::set_u64(&mut reftable, 0, 2 * cluster_size);
        let mut refblock = vec![0u8; cluster_size as usize];
        let entries = cluster_size * 8 / u64::from(bits);
        for cluster in 0..3.min(entries) {
            refcount::set_entry(&mut refblock, bits, cluster, 1);
        }
        let mut file_bytes = cluster0;
        file_bytes.extend_from_slice(&reftable);
        file_bytes.extend_from_slice(&refblock);
        if entries < 3 {
            // Clusters of at least 512 bytes with refcounts of at most 64 bits give a block of at
            // least 64 entries, so this branch only guards the arithmetic above.
            return Err(invalid_option(
                path,
                "refcount_bits",
                bits.into(),
                "refcount block covers fewer than 3 clusters",
            ));
        }
        {
            // The lock is taken before the file is emptied and released before the image
            // is opened again below, which takes its own.
            use std::os::unix::fs::FileExt;
            let file = super::raw::open_for_replacement(path)?;
            file.write_all_at(&file_bytes, 0)
                .map_err(|e| StorageError::io(path, "create", e))?;
        }

        let canonical = path
            .canonicalize()
            .map_err(|e| StorageError::io(path, "resolve path", e))?;
        let image =
            Qcow2::open_in_chain(path, &OpenOptions::default(), &mut vec![canonical], false)?;
        image.resize(size)?;
        image.close()?;
        Qcow2::open(path, &OpenOptions::default())
    }

    fn lock(&self) -> MutexGuard<'_, Image> {
        // A panic while holding the lock cannot leave the caches half-written in a way a
        // later flush would misorder, because every cache entry is a whole table.
        self.image
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn check_writable(&self) -> Result<(), StorageError> {
        if self.read_only {
            return Err(StorageError::ReadOnly {
                path: self.path.clone(),
            });
        }
        Ok(())
    }

    /// Returns the image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Changes the virtual size; growing only.
    pub fn resize(&self, new_size: u64) -> Result<(), StorageError> {
        self.check_writable()?;
        let mut image = self.lock();
        image.resize(new_size)
    }

    /// Returns the header facts and snapshot list.
    pub fn info(&self) -> Qcow2Info {
        let image = self.lock();
        let header = &image.header;
        Qcow2Info {
            version: header.version,
            size: header.size,
            cluster_size: header.cluster_size(),
            refcount_bits: header.refcount_bits(),
            extended_l2: header.extended_l2(),
            compression: header.compression,
            lazy_refcounts: header.compatible_features & COMPAT_LAZY_REFCOUNTS != 0,
            corrupt: header.incompatible_features & INCOMPAT_CORRUPT != 0,
            dirty: self.opened_dirty,
            backing_file: header.backing_file.clone(),
            backing_format: header.backing_format.clone(),
            snapshots: image.snapshots.clone(),
        }
    }

    /// Returns the internal snapshots.
    pub fn snapshots(&self) -> Vec<Snapshot> {
        self.lock().snapshots.clone()
    }

    /// Creates an internal snapshot of the current contents.
    pub fn create_snapshot(&self, name: &str) -> Result<Snapshot, StorageError> {
        self.check_writable()?;
        self.lock().create_snapshot(name)
    }

    /// Reverts the disk to a snapshot, found by id first and then by name.
    pub fn apply_snapshot(&self, id_or_name: &str) -> Result<(), StorageError> {
        self.check_writable()?;
        self.lock().apply_snapshot(id_or_name)
    }

    /// Deletes a snapshot, found by id first and then by name.
    pub fn delete_snapshot(&self, id_or_name: &str) -> Result<(), StorageError> {
        self.check_writable()?;
        self.lock().delete_snapshot(id_or_name)
    }

    /// Checks refcounts and COPIED flags, repairing per `mode` when open for writing.
    pub fn check(&self, mode: RepairMode) -> Result<CheckReport, StorageError> {
        self.lock().check(mode)
    }

    /// Writes a whole guest cluster at `offset` (cluster-aligned) compressed, or plainly
    /// if it does not shrink or the cluster is already allocated.
    pub fn write_compressed(&self, data: &[u8], offset: u64) -> Result<(), StorageError> {
        self.check_writable()?;
        let mut image = self.lock();
        check_range(&self.path, offset, data.len() as u64, image.header.size)?;
        let cluster_size = image.cluster_size();
        if offset % cluster_size != 0
            || data.len() as u64 != cluster_size.min(image.header.size - offset)
        {
            return Err(invalid_option(
                &self.path,
                "compressed write offset",
                offset,
                "must cover exactly one cluster",
            ));
        }
        if (data.len() as u64) < cluster_size {
            // The last, partial cluster of the disk is written plainly.
            return image.write(data, offset);
        }
        image.write_compressed(data, offset)
    }

    /// Returns the cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.lock().cluster_size()
    }

    /// Writes back all metadata and clears the dirty bit; dropping the image does the same
    /// but can only log a failure.
    pub fn close(self) -> Result<(), StorageError> {
        let result = self.lock().close();
        self.closed.store(true, Ordering::Release);
        result
    }
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        if let Err(e) = self.lock().close() {
            tracing::error!(path = %self.path.display(), error = %e, "closing qcow2 image failed; the image stays marked dirty");
        }
    }
}

/// Locks an image file for the access that `options` requests, unless locking is off.
fn lock_file(file: &File, path: &Path, options: &OpenOptions) -> Result<(), StorageError> {
    if options.locking == Locking::Off {
        return Ok(());
    }
    let access = if options.read_only {
        Access::Read
    } else {
        Access::Write
    };
    lock_image(file, path, access)
}

fn read_header(file: &File, path: &Path, file_len: u64) -> Result<Header, StorageError> {
    // Cluster 0 is at most 2 MiB; read the fixed part first to learn its size.
    let mut fixed = vec![0u8; 112.min(file_len as usize)];
    image::read_full(file, path, &mut fixed, 0)?;
    if fixed.len() < 24 {
        return Header::parse(path, &fixed, file_len);
    }
    let bits = u32::from_be_bytes(fixed[20..24].try_into().expect("slice of 4 bytes"));
    if !(header::MIN_CLUSTER_BITS..=header::MAX_CLUSTER_BITS).contains(&bits) {
        return Header::parse(path, &fixed, file_len);
    }
    let len = (1u64 << bits).min(file_len) as usize;
    let mut cluster0 = vec![0u8; len];
    image::read_full(file, path, &mut cluster0, 0)?;
    Header::parse(path, &cluster0, file_len)
}

impl Image {
    /// Removes the persistent bitmaps extension, which this writer cannot keep up to date,
    /// and returns the clusters to release once the header without it is on disk. Keeping
    /// the extension with autoclear bit 0 cleared would leave its clusters as leaks for
    /// `qemu-img check`. Damaged bitmap structures are dropped without releasing anything.
    fn drop_bitmaps(&mut self) -> Result<Vec<u64>, StorageError> {
        let Some(index) = self
            .header
            .other_extensions
            .iter()
            .position(|e| e.kind == header::EXT_BITMAPS)
        else {
            return Ok(Vec::new());
        };
        let cluster_size = self.cluster_size();
        let clusters = match self.bitmap_ranges()? {
            Ok(ranges) => ranges
                .iter()
                .flat_map(|&(offset, len, _)| {
                    (offset / cluster_size..(offset + len).div_ceil(cluster_size))
                        .map(move |c| c * cluster_size)
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        tracing::warn!(path = %self.path.display(), "removing persistent dirty bitmaps, which writes would leave stale");
        self.header.other_extensions.remove(index);
        Ok(clusters)
    }

    /// Grows the virtual disk to `new_size` bytes, moving the L1 table if it must grow.
    pub fn resize(&mut self, new_size: u64) -> Result<(), StorageError> {
        if new_size < self.header.size {
            // NOTE: shrinking is not implemented; qemu-img needs --shrink for it too.
            return Err(StorageError::Unsupported {
                path: self.path.clone(),
                feature: "shrinking a qcow2 image".into(),
            });
        }
        if new_size > header::MAX_HOST_OFFSET {
            return Err(invalid_option(
                &self.path,
                "size",
                new_size,
                "virtual size over 2^56 bytes",
            ));
        }
        let needed = self.header.l1_entries_for(new_size);
        if needed * 8 > header::MAX_L1_BYTES {
            return Err(invalid_option(
                &self.path,
                "size",
                new_size,
                "needs an L1 table over 32 MiB; use larger clusters",
            ));
        }
        if needed > self.l1.len() as u64 {
            self.flush_metadata()?;
            let cluster_size = self.cluster_size();
            let mut new_l1 = self.l1.clone();
            new_l1.resize(needed as usize, 0);
            let offset = self.alloc_clusters((needed * 8).div_ceil(cluster_size))?;
            let mut raw = vec![0u8; (needed * 8) as usize];
            for (i, &entry) in new_l1.iter().enumerate() {
                table::set_u64(&mut raw, i, entry);
            }
            self.pwrite(&raw, offset)?;
            self.flush_metadata()?;
            self.sync()?;
            let old_offset = self.header.l1_table_offset;
            let old_clusters = (self.l1.len() as u64 * 8).div_ceil(cluster_size);
            self.header.l1_table_offset = offset;
            self.header.l1_size = needed as u32;
            self.header.size = new_size;
            self.l1 = new_l1;
            self.write_header()?;
            let old: Vec<u64> = (0..old_clusters)
                .map(|i| old_offset + i * cluster_size)
                .collect();
            self.release(&old)?;
        } else {
            self.header.size = new_size;
            self.write_header()?;
        }
        Ok(())
    }
}

impl BlockBackend for Qcow2 {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StorageError> {
        let mut image = self.lock();
        check_range(&self.path, offset, buf.len() as u64, image.header.size)?;
        image.read(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), StorageError> {
        self.check_writable()?;
        let mut image = self.lock();
        check_range(&self.path, offset, buf.len() as u64, image.header.size)?;
        image.write(buf, offset)
    }

    fn flush(&self) -> Result<(), StorageError> {
        if self.read_only {
            return Ok(());
        }
        let mut image = self.lock();
        image.flush_metadata()?;
        image.sync()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        self.check_writable()?;
        let mut image = self.lock();
        check_range(&self.path, offset, len, image.header.size)?;
        image.zero_range(offset, len, true)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        self.check_writable()?;
        let mut image = self.lock();
        check_range(&self.path, offset, len, image.header.size)?;
        image.zero_range(offset, len, false)
    }

    fn size(&self) -> u64 {
        self.lock().header.size
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }
}
