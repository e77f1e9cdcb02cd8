//! The qcow2 header in cluster 0 and its extensions.
//!
//! ```text
//! 0   magic "QFI\xfb"          4  version (2 or 3)      8  backing_file_offset
//! 16  backing_file_size        20 cluster_bits          24 size (virtual, bytes)
//! 32  crypt_method             36 l1_size (entries)     40 l1_table_offset
//! 48  refcount_table_offset    56 refcount_table_clusters
//! 60  nb_snapshots             64 snapshots_offset      72 end of a version 2 header
//! 72  incompatible_features    80 compatible_features   88 autoclear_features
//! 96  refcount_order           100 header_length        104 compression_type (optional)
//! ```
//! Extensions (type u32, length u32, data padded to 8 bytes) follow `header_length` and end
//! with a type 0 entry; the backing file name may follow them, inside cluster 0.

use std::path::Path;

use crate::storage::StorageError;

/// Magic bytes at offset 0 of every qcow2 image.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";

/// Incompatible feature bit 0: refcounts may be stale (image in use or not closed cleanly).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature bit 1: structures are known to be corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit 2: guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bit 3: the compression_type field is not zlib.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature bit 4: L2 entries are 128 bits with subcluster bitmaps.
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Every incompatible bit this implementation understands.
pub const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
/// Compatible feature bit 0: refcount updates may be postponed while the dirty bit is set.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

/// Extension type: end of the extension area.
pub const EXT_END: u32 = 0;
/// Extension type: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Extension type: feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Extension type: persistent dirty bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Extension type: full disk encryption header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// Extension type: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Smallest and largest cluster_bits QEMU opens (512 B to 2 MiB clusters).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// See [`MIN_CLUSTER_BITS`].
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Maximum L1 table size in bytes (QEMU's limit).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Maximum refcount table size in bytes (QEMU's limit).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Maximum number of internal snapshots (QEMU's limit).
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Maximum length of a backing file name.
pub const MAX_BACKING_NAME: u32 = 1023;
/// Host offsets in L1 and L2 entries have 56 bits.
pub const MAX_HOST_OFFSET: u64 = 1 << 56;

const V2_HEADER_LEN: u32 = 72;
const V3_MIN_HEADER_LEN: u32 = 104;
/// Header length this implementation writes for version 3 (compression type plus padding).
pub const V3_HEADER_LEN: u32 = 112;

/// Compression method of compressed clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate with a 4 KiB window (compression_type 0).
    Zlib,
    /// Zstandard frames (compression_type 1).
    Zstd,
}

impl CompressionType {
    /// Returns the name qemu-img uses for the method.
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// A header extension this implementation does not rewrite, kept byte for byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawExtension {
    /// Extension type.
    pub kind: u32,
    /// Extension data without padding.
    pub data: Vec<u8>,
}

/// The parsed header of a qcow2 image.
#[derive(Debug, Clone)]
pub struct Header {
    /// Format version, 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Number of entries in the active L1 table.
    pub l1_size: u32,
    /// File offset of the active L1 table.
    pub l1_table_offset: u64,
    /// File offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Length of the refcount table in clusters.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// File offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Header length in bytes (72 for version 2).
    pub header_length: u32,
    /// Compression method.
    pub compression: CompressionType,
    /// Header bytes from 105 up to `header_length`, kept for fields added after version 3.
    pub extra_fields: Vec<u8>,
    /// Backing file name.
    pub backing_file: Option<String>,
    /// Backing file format from its header extension.
    pub backing_format: Option<String>,
    /// External data file name from its header extension.
    pub data_file: Option<String>,
    /// Extensions kept verbatim (feature names, bitmaps and unknown types).
    pub other_extensions: Vec<RawExtension>,
}

fn be32(buf: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(buf[at..at + 4].try_into().expect("slice of 4 bytes"))
}

fn be64(buf: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(buf[at..at + 8].try_into().expect("slice of 8 bytes"))
}

fn invalid(
    path: &Path,
    field: &'static str,
    value: u64,
    reason: impl Into<String>,
) -> StorageError {
    StorageError::InvalidField {
        path: path.to_path_buf(),
        field,
        value,
        reason: reason.into(),
    }
}

fn align8(n: usize) -> usize {
    (n + 7) & !7
}

impl Header {
    /// Returns the cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Returns whether L2 entries are 128-bit extended entries.
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTL2 != 0
    }

    /// Returns the number of entries in one L2 table.
    pub fn l2_entries(&self) -> u64 {
        let entry_bytes = if self.extended_l2() { 16 } else { 8 };
        self.cluster_size() / entry_bytes
    }

    /// Returns the refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Returns the number of L1 entries a disk of `size` bytes needs.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        let bytes_per_l2 = self.cluster_size() * self.l2_entries();
        size.div_ceil(bytes_per_l2)
    }

    /// Parses and validates the header from the start of the file.
    ///
    /// `cluster0` holds the first cluster of the file (shorter if the file is shorter);
    /// `file_len` is the file's length in bytes.
    pub fn parse(path: &Path, cluster0: &[u8], file_len: u64) -> Result<Header, StorageError> {
        if cluster0.len() < V2_HEADER_LEN as usize {
            return Err(invalid(
                path,
                "file length",
                file_len,
                "too short for a qcow2 header",
            ));
        }
        if cluster0[0..4] != MAGIC {
            return Err(invalid(
                path,
                "magic",
                u64::from(be32(cluster0, 0)),
                "not a qcow2 image",
            ));
        }
        let version = be32(cluster0, 4);
        if version != 2 && version != 3 {
            return Err(invalid(
                path,
                "version",
                version.into(),
                "only versions 2 and 3 exist",
            ));
        }
        let cluster_bits = be32(cluster0, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(invalid(
                path,
                "cluster_bits",
                cluster_bits.into(),
                "must be 9 to 21",
            ));
        }
        let cluster_size = 1u64 << cluster_bits;
        let crypt_method = be32(cluster0, 32);
        if crypt_method != 0 {
            return Err(StorageError::Unsupported {
                path: path.to_path_buf(),
                feature: format!("encryption method {crypt_method}"),
            });
        }

        let mut header = Header {
            version,
            cluster_bits,
            size: be64(cluster0, 24),
            l1_size: be32(cluster0, 36),
            l1_table_offset: be64(cluster0, 40),
            refcount_table_offset: be64(cluster0, 48),
            refcount_table_clusters: be32(cluster0, 56),
            nb_snapshots: be32(cluster0, 60),
            snapshots_offset: be64(cluster0, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression: CompressionType::Zlib,
            extra_fields: Vec::new(),
            backing_file: None,
            backing_format: None,
            data_file: None,
            other_extensions: Vec::new(),
        };

        if version == 3 {
            if cluster0.len() < V3_MIN_HEADER_LEN as usize {
                return Err(invalid(
                    path,
                    "file length",
                    file_len,
                    "too short for a version 3 header",
                ));
            }
            header.incompatible_features = be64(cluster0, 72);
            header.compatible_features = be64(cluster0, 80);
            header.autoclear_features = be64(cluster0, 88);
            header.refcount_order = be32(cluster0, 96);
            header.header_length = be32(cluster0, 100);
            let len = header.header_length;
            if len < V3_MIN_HEADER_LEN || len % 8 != 0 || u64::from(len) > cluster_size {
                return Err(invalid(
                    path,
                    "header_length",
                    len.into(),
                    format!("must be a multiple of 8 from 104 to the cluster size {cluster_size}"),
                ));
            }
            if len as usize > cluster0.len() {
                return Err(invalid(
                    path,
                    "header_length",
                    len.into(),
                    "runs past the end of the file",
                ));
            }
            if header.refcount_order > 6 {
                return Err(invalid(
                    path,
                    "refcount_order",
                    header.refcount_order.into(),
                    "must be 0 to 6",
                ));
            }
            let unknown = header.incompatible_features & !INCOMPAT_KNOWN;
            if unknown != 0 {
                return Err(StorageError::Unsupported {
                    path: path.to_path_buf(),
                    feature: format!("incompatible feature bits {unknown:#x}"),
                });
            }
            let compression_byte = if len > 104 { cluster0[104] } else { 0 };
            header.compression = match compression_byte {
                0 => CompressionType::Zlib,
                1 => CompressionType::Zstd,
                other => {
                    return Err(invalid(
                        path,
                        "compression_type",
                        other.into(),
                        "must be 0 (zlib) or 1 (zstd)",
                    ));
                }
            };
            let bit_set = header.incompatible_features & INCOMPAT_COMPRESSION != 0;
            if bit_set != (header.compression != CompressionType::Zlib) {
                return Err(invalid(
                    path,
                    "compression_type",
                    compression_byte.into(),
                    "disagrees with incompatible feature bit 3",
                ));
            }
            if len > 105 {
                header.extra_fields = cluster0[105..len as usize].to_vec();
            }
            if header.extended_l2() && cluster_bits < 14 {
                return Err(invalid(
                    path,
                    "cluster_bits",
                    cluster_bits.into(),
                    "extended L2 entries need clusters of at least 16 KiB",
                ));
            }
        }

        header.validate_tables(path)?;
        header.parse_extensions(path, cluster0)?;
        header.parse_backing_name(path, cluster0)?;
        Ok(header)
    }

    fn validate_tables(&self, path: &Path) -> Result<(), StorageError> {
        let cluster_size = self.cluster_size();
        let check_offset =
            |field: &'static str, offset: u64, bytes: u64| -> Result<(), StorageError> {
                if offset % cluster_size != 0 {
                    return Err(invalid(path, field, offset, "not aligned to a cluster"));
                }
                match offset.checked_add(bytes) {
                    Some(end) if end <= MAX_HOST_OFFSET => Ok(()),
                    _ => Err(invalid(path, field, offset, "table ends beyond 2^56")),
                }
            };

        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(invalid(
                path,
                "l1_size",
                self.l1_size.into(),
                "L1 table over 32 MiB",
            ));
        }
        if self.size > MAX_HOST_OFFSET {
            return Err(invalid(
                path,
                "size",
                self.size,
                "virtual size over 2^56 bytes",
            ));
        }
        let needed = self.l1_entries_for(self.size);
        if needed > u64::from(self.l1_size) {
            return Err(invalid(
                path,
                "l1_size",
                self.l1_size.into(),
                format!(
                    "too small for the virtual size {} (needs {needed} entries)",
                    self.size
                ),
            ));
        }
        if self.l1_size > 0 {
            if self.l1_table_offset == 0 {
                return Err(invalid(
                    path,
                    "l1_table_offset",
                    0,
                    "zero with a non-empty L1 table",
                ));
            }
            check_offset("l1_table_offset", self.l1_table_offset, l1_bytes)?;
        }

        let reftable_bytes = u64::from(self.refcount_table_clusters) * cluster_size;
        if self.refcount_table_clusters == 0 || reftable_bytes > MAX_REFTABLE_BYTES {
            return Err(invalid(
                path,
                "refcount_table_clusters",
                self.refcount_table_clusters.into(),
                "refcount table must be 1 cluster to 8 MiB",
            ));
        }
        if self.refcount_table_offset == 0 {
            return Err(invalid(path, "refcount_table_offset", 0, "zero"));
        }
        check_offset(
            "refcount_table_offset",
            self.refcount_table_offset,
            reftable_bytes,
        )?;

        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(invalid(
                path,
                "nb_snapshots",
                self.nb_snapshots.into(),
                "more than 65536 snapshots",
            ));
        }
        if self.nb_snapshots > 0 {
            check_offset("snapshots_offset", self.snapshots_offset, 0)?;
        }

        let ranges = [
            ("header", 0, cluster_size),
            ("l1_table_offset", self.l1_table_offset, l1_bytes),
            (
                "refcount_table_offset",
                self.refcount_table_offset,
                reftable_bytes,
            ),
        ];
        for (i, &(name_a, start_a, len_a)) in ranges.iter().enumerate() {
            for &(_, start_b, len_b) in &ranges[i + 1..] {
                if len_a > 0 && len_b > 0 && start_a < start_b + len_b && start_b < start_a + len_a
                {
                    return Err(invalid(
                        path,
                        name_a,
                        start_a,
                        "overlaps another metadata table",
                    ));
                }
            }
        }
        Ok(())
    }

    fn parse_extensions(&mut self, path: &Path, cluster0: &[u8]) -> Result<(), StorageError> {
        let mut at = self.header_length as usize;
        // The extension area ends where the backing file name starts, or at cluster 0's end.
        let backing_offset = be64(cluster0, 8);
        let end = if backing_offset > at as u64 && backing_offset < cluster0.len() as u64 {
            backing_offset as usize
        } else {
            cluster0.len()
        };
        let mut seen = Vec::new();
        loop {
            if at >= end {
                return Ok(());
            }
            if at + 8 > end {
                return Err(invalid(
                    path,
                    "header extension offset",
                    at as u64,
                    "extension header runs past its area",
                ));
            }
            let kind = be32(cluster0, at);
            let len = be32(cluster0, at + 4) as usize;
            if kind == EXT_END {
                return Ok(());
            }
            let data_start = at + 8;
            if len > end - data_start {
                return Err(invalid(
                    path,
                    "header extension length",
                    len as u64,
                    "runs past cluster 0",
                ));
            }
            let data = &cluster0[data_start..data_start + len];
            if seen.contains(&kind) && kind != EXT_FEATURE_TABLE {
                return Err(invalid(
                    path,
                    "header extension type",
                    kind.into(),
                    "appears twice",
                ));
            }
            seen.push(kind);
            match kind {
                EXT_BACKING_FORMAT => {
                    self.backing_format = Some(ext_string(path, "backing format", data)?)
                }
                EXT_DATA_FILE => {
                    self.data_file = Some(ext_string(path, "external data file name", data)?)
                }
                _ => self.other_extensions.push(RawExtension {
                    kind,
                    data: data.to_vec(),
                }),
            }
            at = data_start + align8(len);
        }
    }

    fn parse_backing_name(&mut self, path: &Path, cluster0: &[u8]) -> Result<(), StorageError> {
        let offset = be64(cluster0, 8);
        if offset == 0 {
            return Ok(());
        }
        let len = be32(cluster0, 16);
        if len > MAX_BACKING_NAME {
            return Err(invalid(
                path,
                "backing_file_size",
                len.into(),
                "longer than 1023 bytes",
            ));
        }
        let end = offset.checked_add(len.into());
        match end {
            Some(end) if end <= cluster0.len() as u64 => {}
            _ => {
                return Err(invalid(
                    path,
                    "backing_file_offset",
                    offset,
                    "name lies outside cluster 0",
                ))
            }
        }
        let name = &cluster0[offset as usize..offset as usize + len as usize];
        self.backing_file = Some(ext_string(path, "backing file name", name)?);
        Ok(())
    }

    /// Serializes the header, its extensions and the backing file name into cluster 0.
    pub fn serialize(&self, path: &Path) -> Result<Vec<u8>, StorageError> {
        let mut buf = Vec::with_capacity(512);
        buf.extend_from_slice(&MAGIC);
        buf.extend_from_slice(&self.version.to_be_bytes());
        buf.extend_from_slice(&0u64.to_be_bytes()); // backing_file_offset, patched below
        buf.extend_from_slice(&0u32.to_be_bytes()); // backing_file_size, patched below
        buf.extend_from_slice(&self.cluster_bits.to_be_bytes());
        buf.extend_from_slice(&self.size.to_be_bytes());
        buf.extend_from_slice(&0u32.to_be_bytes()); // crypt_method
        buf.extend_from_slice(&self.l1_size.to_be_bytes());
        buf.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        buf.extend_from_slice(&self.refcount_table_offset.to_be_bytes());
        buf.extend_from_slice(&self.refcount_table_clusters.to_be_bytes());
        buf.extend_from_slice(&self.nb_snapshots.to_be_bytes());
        buf.extend_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version >= 3 {
            buf.extend_from_slice(&self.incompatible_features.to_be_bytes());
            buf.extend_from_slice(&self.compatible_features.to_be_bytes());
            buf.extend_from_slice(&self.autoclear_features.to_be_bytes());
            buf.extend_from_slice(&self.refcount_order.to_be_bytes());
            buf.extend_from_slice(&self.header_length.to_be_bytes());
            if self.header_length > 104 {
                buf.push(match self.compression {
                    CompressionType::Zlib => 0,
                    CompressionType::Zstd => 1,
                });
                buf.extend_from_slice(&self.extra_fields);
                buf.resize(self.header_length as usize, 0);
            }
        }

        let push_ext = |buf: &mut Vec<u8>, kind: u32, data: &[u8]| {
            buf.extend_from_slice(&kind.to_be_bytes());
            buf.extend_from_slice(&(data.len() as u32).to_be_bytes());
            buf.extend_from_slice(data);
            buf.resize(align8(buf.len()), 0);
        };
        if let Some(format) = &self.backing_format {
            push_ext(&mut buf, EXT_BACKING_FORMAT, format.as_bytes());
        }
        if let Some(name) = &self.data_file {
            push_ext(&mut buf, EXT_DATA_FILE, name.as_bytes());
        }
        for ext in &self.other_extensions {
            push_ext(&mut buf, ext.kind, &ext.data);
        }
        buf.extend_from_slice(&[0u8; 8]);

        if let Some(name) = &self.backing_file {
            if name.len() > MAX_BACKING_NAME as usize {
                return Err(invalid(
                    path,
                    "backing_file_size",
                    name.len() as u64,
                    "longer than 1023 bytes",
                ));
            }
            let offset = buf.len() as u64;
            buf[8..16].copy_from_slice(&offset.to_be_bytes());
            buf[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            buf.extend_from_slice(name.as_bytes());
        }
        if buf.len() as u64 > self.cluster_size() {
            return Err(invalid(
                path,
                "header length",
                buf.len() as u64,
                "header, extensions and backing name do not fit in cluster 0",
            ));
        }
        Ok(buf)
    }
}

fn ext_string(path: &Path, field: &'static str, data: &[u8]) -> Result<String, StorageError> {
    if data.len() > MAX_BACKING_NAME as usize {
        return Err(invalid(
            path,
            field,
            data.len() as u64,
            "longer than 1023 bytes",
        ));
    }
    String::from_utf8(data.to_vec())
        .map_err(|_| invalid(path, field, data.len() as u64, "not valid UTF-8"))
}
