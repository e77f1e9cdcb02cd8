//! Disk images: the [`BlockBackend`] trait that virtio-blk and `monstervm disk` serve,
//! raw files and qcow2 images.
//!
//! [`open_image`] picks the format: a file that starts with the qcow2 magic opens as qcow2
//! unless the caller names a format. A backing file takes its format from the overlay's
//! backing-format header extension. Without that extension only the qcow2 magic is
//! accepted, because a raw backing file probed as qcow2 would let guest data written into
//! it pass for an image header.

pub mod lock;
pub mod qcow2;
pub mod raw;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

pub use lock::Locking;
pub use qcow2::Qcow2;
pub use raw::RawFile;

/// Maximum depth of a backing chain, counting the top image as depth 0.
pub const MAX_BACKING_DEPTH: usize = 16;

/// A virtual disk: a byte-addressable block device backed by an image file.
///
/// Methods take `&self` so one backend can serve several queue workers at once; each
/// implementation locks internally where its metadata needs it.
pub trait BlockBackend: Send + Sync + fmt::Debug {
    /// Reads `buf.len()` bytes at `offset` of the virtual disk. The range must lie inside
    /// [`size`](Self::size).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StorageError>;

    /// Writes `buf` at `offset` of the virtual disk. The range must lie inside
    /// [`size`](Self::size).
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), StorageError>;

    /// Makes every completed write durable (metadata included) before it returns.
    fn flush(&self) -> Result<(), StorageError>;

    /// Releases the storage behind a range. Reads of the range return zeros afterwards
    /// where the format can express that. Partial clusters of a qcow2 image, and whole
    /// ones of a version 2 image over a backing file, keep their data because a discard
    /// is only a hint.
    fn discard(&self, offset: u64, len: u64) -> Result<(), StorageError>;

    /// Makes a range read as zeros, deallocating whole clusters where the format allows.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), StorageError>;

    /// Returns the virtual disk size in bytes.
    fn size(&self) -> u64;

    /// Returns whether the backend rejects writes.
    fn is_read_only(&self) -> bool;
}

/// Image format of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// The file is the virtual disk byte for byte.
    Raw,
    /// QEMU copy-on-write version 2 or 3.
    Qcow2,
}

impl ImageFormat {
    /// Returns the name qemu-img uses for the format.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ImageFormat {
    type Err = StorageError;

    fn from_str(s: &str) -> Result<Self, StorageError> {
        match s {
            "raw" => Ok(ImageFormat::Raw),
            "qcow2" => Ok(ImageFormat::Qcow2),
            other => Err(StorageError::UnknownFormat {
                name: other.to_string(),
            }),
        }
    }
}

/// Whether an image may refer to other files (backing files, external data files).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackingPolicy {
    /// Follow backing references (relative names resolve against the image's folder).
    #[default]
    Allow,
    /// Reject any image that names another file: the setting for untrusted images.
    Deny,
}

/// Settings for [`open_image`].
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Open without write access; writes return [`StorageError::ReadOnly`].
    pub read_only: bool,
    /// Format chosen by the caller; `None` detects qcow2 by its magic and falls back to raw.
    pub format: Option<ImageFormat>,
    /// Whether references to other files are followed.
    pub backing: BackingPolicy,
    /// Whether the image and its backing files are locked against conflicting users.
    pub locking: Locking,
}

impl OpenOptions {
    /// Returns options for a read-only open.
    pub fn read_only() -> Self {
        OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        }
    }
}

/// Errors of the storage layer. Offsets are in bytes and printed in hex.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A backing chain revisits a file.
    #[error("backing chain of {path} loops back to {repeated}; fix the backing file names")]
    BackingLoop { path: PathBuf, repeated: PathBuf },
    /// The image names a backing file but backing files are denied.
    #[error("{path} refers to {kind} {target:?}, which the backing=deny option rejects")]
    BackingDenied {
        path: PathBuf,
        kind: &'static str,
        target: String,
    },
    /// The backing chain is deeper than [`MAX_BACKING_DEPTH`].
    #[error("backing chain of {path} is deeper than {max} images")]
    BackingTooDeep { path: PathBuf, max: usize },
    /// The backing file's format is unknown and the file is not qcow2.
    #[error("backing file {backing} of {path} has no backing format and is not qcow2; recreate the overlay with -F FMT")]
    BackingFormatMissing { path: PathBuf, backing: PathBuf },
    /// A compressed cluster did not decompress to a full cluster.
    #[error("{path}: compressed cluster at host offset {offset:#x} is invalid: {reason}")]
    Compression {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    /// The image carries the corrupt bit or a structure that contradicts the format.
    #[error("{path}: image is corrupt: {reason}; run `monstervm disk check -r all` or restore it")]
    Corrupt { path: PathBuf, reason: String },
    /// A range is outside the virtual disk.
    #[error("{path}: range {offset:#x}+{len:#x} is outside the virtual disk of {size:#x} bytes")]
    OutOfRange {
        path: PathBuf,
        offset: u64,
        len: u64,
        size: u64,
    },
    /// A header or table field contains an invalid value.
    #[error("{path}: invalid {field} {value:#x}: {reason}")]
    InvalidField {
        path: PathBuf,
        field: &'static str,
        value: u64,
        reason: String,
    },
    /// An operating-system call failed.
    #[error("{path}: {op} failed: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// Another open of the image, in this process or another, holds a conflicting lock.
    #[error("failed to lock {path}: {holder} {detail}. Stop that user of the image, or add locking=off to --disk if you are sure that no one else writes it")]
    Locked {
        path: PathBuf,
        holder: String,
        detail: String,
    },
    /// A write would have turned an image detected as raw into a qcow2 image.
    #[error("{path}: refused a write that puts a qcow2 header into an image detected as raw; give the disk format=raw to allow it")]
    ProbedFormatChange { path: PathBuf },
    /// A write reached a read-only backend.
    #[error("{path} is open read-only")]
    ReadOnly { path: PathBuf },
    /// A refcount would exceed the maximum of its width.
    #[error("{path}: refcount of cluster at {offset:#x} would exceed {max}, the maximum for {bits}-bit refcounts")]
    RefcountOverflow {
        path: PathBuf,
        offset: u64,
        max: u64,
        bits: u32,
    },
    /// No snapshot has the requested id or name.
    #[error("{path}: snapshot {name:?} not found")]
    SnapshotNotFound { path: PathBuf, name: String },
    /// A snapshot with this name already exists.
    #[error("{path}: snapshot {name:?} already exists")]
    SnapshotExists { path: PathBuf, name: String },
    /// The format name is not `raw` or `qcow2`.
    #[error("unknown image format {name:?}; use raw or qcow2")]
    UnknownFormat { name: String },
    /// The image uses a feature this implementation lacks.
    #[error("{path}: {feature} is not supported")]
    Unsupported { path: PathBuf, feature: String },
}

impl StorageError {
    /// Wraps an I/O error with the file and the operation that failed.
    pub fn io(path: &Path, op: &'static str, source: std::io::Error) -> Self {
        StorageError::Io {
            path: path.to_path_buf(),
            op,
            source,
        }
    }
}

/// Checks that `offset..offset+len` lies inside a disk of `size` bytes.
pub(crate) fn check_range(
    path: &Path,
    offset: u64,
    len: u64,
    size: u64,
) -> Result<(), StorageError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(StorageError::OutOfRange {
            path: path.to_path_buf(),
            offset,
            len,
            size,
        }),
    }
}

/// Reads the first bytes of a file to tell qcow2 from anything else.
pub fn probe_format(path: &Path) -> Result<ImageFormat, StorageError> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| StorageError::io(path, "open", e))?;
    let mut magic = [0u8; 4];
    let mut filled = 0;
    while filled < magic.len() {
        match file.read(&mut magic[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(StorageError::io(path, "read", e)),
        }
    }
    if filled == 4 && magic == qcow2::header::MAGIC {
        Ok(ImageFormat::Qcow2)
    } else {
        Ok(ImageFormat::Raw)
    }
}

/// Opens a disk image, taking the format from `options.format` or from the file's magic.
pub fn open_image(
    path: &Path,
    options: &OpenOptions,
) -> Result<Box<dyn BlockBackend>, StorageError> {
    let format = match options.format {
        Some(format) => format,
        None => {
            let format = probe_format(path)?;
            if format == ImageFormat::Raw {
                let mut raw = RawFile::open(path, options)?;
                raw.guard_probed_format();
                return Ok(Box::new(raw));
            }
            format
        }
    };
    open_chain(path, format, options, &mut Vec::new())
}

/// Opens one image of a backing chain; `chain` lists the canonical paths above it.
pub(crate) fn open_chain(
    path: &Path,
    format: ImageFormat,
    options: &OpenOptions,
    chain: &mut Vec<PathBuf>,
) -> Result<Box<dyn BlockBackend>, StorageError> {
    let canonical = path
        .canonicalize()
        .map_err(|e| StorageError::io(path, "resolve path", e))?;
    if chain.contains(&canonical) {
        return Err(StorageError::BackingLoop {
            path: chain[0].clone(),
            repeated: canonical,
        });
    }
    if chain.len() > MAX_BACKING_DEPTH {
        return Err(StorageError::BackingTooDeep {
            path: chain[0].clone(),
            max: MAX_BACKING_DEPTH,
        });
    }
    chain.push(canonical);
    let backend: Box<dyn BlockBackend> = match format {
        ImageFormat::Raw => Box::new(RawFile::open(path, options)?),
        ImageFormat::Qcow2 => Box::new(Qcow2::open_in_chain(path, options, chain, true)?),
    };
    chain.pop();
    Ok(backend)
}

/// Opens the backing file `name` of the image at `image`, resolving a relative name
/// against the image's folder.
pub(crate) fn open_backing(
    image: &Path,
    name: &str,
    format: Option<ImageFormat>,
    options: &OpenOptions,
    chain: &mut Vec<PathBuf>,
) -> Result<Box<dyn BlockBackend>, StorageError> {
    let backing = resolve_backing_path(image, name);
    let format = match format {
        Some(format) => format,
        None => match probe_format(&backing)? {
            ImageFormat::Qcow2 => ImageFormat::Qcow2,
            ImageFormat::Raw => {
                return Err(StorageError::BackingFormatMissing {
                    path: image.to_path_buf(),
                    backing,
                })
            }
        },
    };
    let backing_options = OpenOptions {
        read_only: true,
        format: Some(format),
        backing: options.backing,
        locking: options.locking,
    };
    open_chain(&backing, format, &backing_options, chain)
}

/// Resolves a backing file name as QEMU does: absolute names stay, relative names are
/// relative to the folder of the image that names them.
pub fn resolve_backing_path(image: &Path, name: &str) -> PathBuf {
    let name = Path::new(name);
    if name.is_absolute() {
        return name.to_path_buf();
    }
    match image.parent() {
        Some(dir) => dir.join(name),
        None => name.to_path_buf(),
    }
}
