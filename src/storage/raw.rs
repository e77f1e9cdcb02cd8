//! Raw images: the file is the virtual disk, byte for byte.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::lock::{lock_image, Access, Locking};
use super::{check_range, BlockBackend, StorageError};

/// Opens or creates the file at `path` for writing, takes the image write lock, and
/// only then empties it.
pub(crate) fn open_for_replacement(path: &Path) -> Result<File, StorageError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| StorageError::io(path, "create", e))?;
    lock_image(&file, path, Access::Write)?;
    file.set_len(0)
        .map_err(|e| StorageError::io(path, "truncate", e))?;
    Ok(file)
}

/// A raw image file served with pread and pwrite.
#[derive(Debug)]
pub struct RawFile {
    file: File,
    path: PathBuf,
    size: AtomicU64,
    read_only: bool,
    /// Whether the format was detected rather than given: then no write may give the
    /// file another format's magic, which the next detection would follow.
    probed: bool,
}

impl RawFile {
    /// Opens an existing raw image; its size is the file's length. `options.format` and
    /// `options.backing` do not apply to raw files.
    pub fn open(path: &Path, options: &super::OpenOptions) -> Result<Self, StorageError> {
        let read_only = options.read_only;
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| StorageError::io(path, "open", e))?;
        if options.locking == Locking::On {
            let access = if read_only {
                Access::Read
            } else {
                Access::Write
            };
            lock_image(&file, path, access)?;
        }
        let size = file
            .metadata()
            .map_err(|e| StorageError::io(path, "stat", e))?
            .len();
        Ok(RawFile {
            file,
            path: path.to_path_buf(),
            size: AtomicU64::new(size),
            read_only,
            probed: false,
        })
    }

    /// Creates (or empties) a sparse raw image of `size` bytes and keeps it locked for
    /// writing. An existing file is emptied only after the lock is taken, so an image that
    /// another user holds is left as it was.
    pub fn create(path: &Path, size: u64) -> Result<Self, StorageError> {
        let file = open_for_replacement(path)?;
        file.set_len(size)
            .map_err(|e| StorageError::io(path, "set length", e))?;
        Ok(RawFile {
            file,
            path: path.to_path_buf(),
            size: AtomicU64::new(size),
            read_only: false,
            probed: false,
        })
    }

    /// Marks the image as detected to be raw rather than declared raw. Writes that would
    /// put a qcow2 magic at offset 0 then fail, as QEMU restricts writes to the first
    /// sector of a probed raw image. Otherwise a guest could turn its disk into a qcow2
    /// image whose backing file is any host file that the VMM can read.
    pub fn guard_probed_format(&mut self) {
        self.probed = true;
    }

    /// Fails if writing `buf` at `offset` would give a probed raw image a qcow2 magic.
    fn check_probed_header(&self, buf: &[u8], offset: u64) -> Result<(), StorageError> {
        let magic = super::qcow2::header::MAGIC;
        if !self.probed || offset >= magic.len() as u64 {
            return Ok(());
        }
        let mut head = [0u8; 4];
        // A file shorter than the magic reads as zeros past its end.
        let _ = self.file.read_at(&mut head, 0);
        for (i, byte) in head.iter_mut().enumerate() {
            let position = i as u64;
            if position >= offset && position - offset < buf.len() as u64 {
                *byte = buf[(position - offset) as usize];
            }
        }
        if head == magic {
            return Err(StorageError::ProbedFormatChange {
                path: self.path.clone(),
            });
        }
        Ok(())
    }

    /// Grows or shrinks the image to `size` bytes.
    pub fn resize(&self, size: u64) -> Result<(), StorageError> {
        self.check_writable()?;
        self.file
            .set_len(size)
            .map_err(|e| StorageError::io(&self.path, "set length", e))?;
        self.size.store(size, Ordering::Release);
        Ok(())
    }

    fn check_writable(&self) -> Result<(), StorageError> {
        if self.read_only {
            return Err(StorageError::ReadOnly {
                path: self.path.clone(),
            });
        }
        Ok(())
    }

    /// Calls fallocate(2) with `mode`; returns false where the file system lacks the mode.
    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> Result<bool, StorageError> {
        let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len))
        else {
            return Ok(false);
        };
        // SAFETY: fallocate only reads its scalar arguments; the descriptor belongs to
        // `self.file`, which stays open for the duration of the call.
        let ret = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset, len) };
        if ret == 0 {
            return Ok(true);
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => Ok(false),
            _ => Err(StorageError::io(&self.path, "fallocate", err)),
        }
    }

    fn write_zero_bytes(&self, mut offset: u64, len: u64) -> Result<(), StorageError> {
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let end = offset + len;
        while offset < end {
            let n = CHUNK.min(end - offset) as usize;
            self.file
                .write_all_at(&zeros[..n], offset)
                .map_err(|e| StorageError::io(&self.path, "write", e))?;
            offset += n as u64;
        }
        Ok(())
    }
}

impl BlockBackend for RawFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StorageError> {
        check_range(&self.path, offset, buf.len() as u64, self.size())?;
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                // The file shrank under us: what is missing reads as zeros.
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(StorageError::io(&self.path, "read", e)),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), StorageError> {
        self.check_writable()?;
        self.check_probed_header(buf, offset)?;
        check_range(&self.path, offset, buf.len() as u64, self.size())?;
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| StorageError::io(&self.path, "write", e))
    }

    fn flush(&self) -> Result<(), StorageError> {
        if self.read_only {
            return Ok(());
        }
        self.file
            .sync_data()
            .map_err(|e| StorageError::io(&self.path, "fdatasync", e))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        self.check_writable()?;
        check_range(&self.path, offset, len, self.size())?;
        if len == 0 {
            return Ok(());
        }
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        if !self.fallocate(mode, offset, len)? {
            self.write_zero_bytes(offset, len)?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        self.check_writable()?;
        check_range(&self.path, offset, len, self.size())?;
        if len == 0 {
            return Ok(());
        }
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        if self.fallocate(libc::FALLOC_FL_ZERO_RANGE, offset, len)?
            || self.fallocate(punch, offset, len)?
        {
            return Ok(());
        }
        self.write_zero_bytes(offset, len)
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{open_image, ImageFormat};

    #[test]
    fn probed_raw_refuses_qcow2_magic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, vec![0u8; 65536]).unwrap();

        let probed = open_image(&path, &crate::storage::OpenOptions::default()).unwrap();
        let error = probed.write_at(b"QFI\xfb\0\0\0\x03", 0).unwrap_err();
        assert!(
            matches!(error, StorageError::ProbedFormatChange { .. }),
            "{error}"
        );
        // The magic assembled from two writes is refused too.
        probed.write_at(b"Q", 0).unwrap();
        let error = probed.write_at(b"FI\xfb", 1).unwrap_err();
        assert!(
            matches!(error, StorageError::ProbedFormatChange { .. }),
            "{error}"
        );
        probed.write_at(&[0xab; 512], 512).unwrap();
        drop(probed);
        assert_eq!(&std::fs::read(&path).unwrap()[..4], b"Q\0\0\0");

        let declared = crate::storage::OpenOptions {
            format: Some(ImageFormat::Raw),
            ..Default::default()
        };
        let raw = open_image(&path, &declared).unwrap();
        raw.write_at(b"QFI\xfb", 0).unwrap();
    }

    #[test]
    fn create_keeps_locked_image() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("busy.img");
        std::fs::write(&path, vec![0x5a; 4096]).unwrap();
        let holder = RawFile::open(&path, &crate::storage::OpenOptions::default()).unwrap();

        let error = RawFile::create(&path, 1 << 20).unwrap_err();
        assert!(matches!(error, StorageError::Locked { .. }), "{error}");
        let options = crate::storage::qcow2::CreateOptions {
            size: 1 << 20,
            ..Default::default()
        };
        let error = crate::storage::qcow2::Qcow2::create(&path, &options).unwrap_err();
        assert!(matches!(error, StorageError::Locked { .. }), "{error}");
        drop(holder);
        assert_eq!(std::fs::read(&path).unwrap(), vec![0x5a; 4096]);
    }

    #[test]
    fn raw_write_read_discard() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let raw = RawFile::create(&path, 1 << 20).unwrap();
        raw.write_at(&[0xab; 8192], 4096).unwrap();
        let mut buf = vec![0u8; 8192];
        raw.read_at(&mut buf, 4096).unwrap();
        assert!(buf.iter().all(|&b| b == 0xab));

        raw.discard(4096, 4096).unwrap();
        raw.write_zeroes(8192, 4096).unwrap();
        raw.read_at(&mut buf, 4096).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
    }

    #[test]
    fn raw_rejects_out_of_range() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let raw = RawFile::create(&path, 4096).unwrap();
        let err = raw.write_at(&[1; 512], 4095).unwrap_err();
        assert!(matches!(err, StorageError::OutOfRange { .. }), "{err}");
    }

    #[test]
    fn raw_read_only_rejects_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        RawFile::create(&path, 4096).unwrap();
        let raw = RawFile::open(&path, &super::super::OpenOptions::read_only()).unwrap();
        let err = raw.write_at(&[1; 512], 0).unwrap_err();
        assert!(matches!(err, StorageError::ReadOnly { .. }), "{err}");
    }
}
