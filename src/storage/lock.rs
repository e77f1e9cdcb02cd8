//! Image locking that QEMU understands.
//!
//! QEMU's `file` driver (block/file-posix.c) marks what it does with an image by
//! open-file-description (OFD) read locks on single bytes of the image file. For each
//! permission bit `i` of its block layer it locks byte 100 + `i` while it uses the
//! permission, and byte 200 + `i` while it refuses to share it. Before it relies on a
//! permission it tests byte 200 + `i` for a lock of anyone else, and before it refuses to
//! share one it tests byte 100 + `i`. MonsterVM takes the same bytes, so QEMU, qemu-img,
//! qemu-nbd and other MonsterVM processes see each other's opens.
//!
//! OFD locks belong to the open file description, so two opens of one image in the same
//! process conflict too, and closing the file releases them.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::StorageError;

/// First lock byte of the permissions an open uses.
const PERM_BASE: u64 = 100;
/// First lock byte of the permissions an open refuses to share.
const SHARED_BASE: u64 = 200;

/// Permission bits of QEMU's block layer (include/block/block-common.h, QEMU 6.2 and
/// later, which dropped the old bit 0x10).
const CONSISTENT_READ: u32 = 0x01;
const WRITE: u32 = 0x02;
const WRITE_UNCHANGED: u32 = 0x04;
const RESIZE: u32 = 0x08;
const ALL_PERMISSIONS: u32 = 0x0f;

/// Whether an image file is locked at open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Locking {
    /// Take QEMU-compatible locks and fail on a conflicting user.
    #[default]
    On,
    /// Take no locks, as QEMU's `file.locking=off` does: for images on file systems
    /// without OFD locks, or when the caller coordinates writers itself.
    Off,
}

/// The access mode of an image open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reads only, sharing the image with other readers.
    Read,
    /// Reads, writes and grows the file. Other readers are refused, as a writable qcow2
    /// image in QEMU refuses them, because they would see half-written metadata.
    Write,
}

impl Access {
    /// Returns the permissions this access uses and those it shares, as QEMU's format
    /// drivers request them from the file node: a reader shares reads and unchanged
    /// writes, and so does a writer.
    fn permissions(self) -> (u32, u32) {
        let shared = CONSISTENT_READ | WRITE_UNCHANGED;
        match self {
            Access::Read => (CONSISTENT_READ, shared),
            Access::Write => (CONSISTENT_READ | WRITE | RESIZE, shared),
        }
    }
}

/// Returns QEMU's name of a single permission bit, as its error messages spell it.
fn permission_name(bit: u32) -> &'static str {
    match bit {
        CONSISTENT_READ => "consistent read",
        WRITE => "write",
        WRITE_UNCHANGED => "write unchanged",
        RESIZE => "resize",
        _ => "unknown",
    }
}

/// How long a conflicting lock may take to go away before an open fails. A child that a
/// process forks shares the parent's open file descriptions, and so their OFD locks, until
/// it execs: an image that the parent closed just before the fork stays locked that long.
const CONFLICT_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// Locks `file` (the image at `path`) for `access`, or fails if another open of the image,
/// in this process or another, holds a conflicting lock for longer than `CONFLICT_GRACE`.
///
/// The locks stay until `file` is closed.
pub fn lock_image(file: &File, path: &Path, access: Access) -> Result<(), StorageError> {
    let deadline = std::time::Instant::now() + CONFLICT_GRACE;
    loop {
        match try_lock_image(file, path, access) {
            Err(StorageError::Locked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            result => return result,
        }
    }
}

/// Takes the locks of `lock_image` once, failing at the first conflict.
fn try_lock_image(file: &File, path: &Path, access: Access) -> Result<(), StorageError> {
    let (used, shared) = access.permissions();
    let refused = ALL_PERMISSIONS & !shared;

    // Lock first and test afterwards, as QEMU does, so that of two racing opens at least
    // one finds the other's bytes locked.
    for bit in bits(used) {
        set_read_lock(file, path, PERM_BASE + u64::from(bit.trailing_zeros()))?;
    }
    for bit in bits(refused) {
        set_read_lock(file, path, SHARED_BASE + u64::from(bit.trailing_zeros()))?;
    }

    for bit in bits(used) {
        let byte = SHARED_BASE + u64::from(bit.trailing_zeros());
        if is_locked_by_other(file, path, byte)? {
            return Err(conflict(file, path, bit, byte, "does not share"));
        }
    }
    for bit in bits(refused) {
        let byte = PERM_BASE + u64::from(bit.trailing_zeros());
        if is_locked_by_other(file, path, byte)? {
            return Err(conflict(file, path, bit, byte, "uses"));
        }
    }
    Ok(())
}

/// Iterates over the set bits of `mask`, lowest first.
fn bits(mask: u32) -> impl Iterator<Item = u32> {
    (0..32)
        .map(|i| 1u32 << i)
        .filter(move |bit| mask & bit != 0)
}

fn byte_lock(kind: libc::c_short, byte: u64) -> libc::flock {
    // SAFETY: flock is plain old data, so all zeros is a valid value; l_pid must be 0 for
    // OFD locks.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = byte as libc::off_t;
    lock.l_len = 1;
    lock
}

fn set_read_lock(file: &File, path: &Path, byte: u64) -> Result<(), StorageError> {
    let lock = byte_lock(libc::F_RDLCK as libc::c_short, byte);
    // SAFETY: the descriptor is open for the life of `file`, and `lock` is a valid flock.
    let result = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) };
    if result != 0 {
        let error = std::io::Error::last_os_error();
        if matches!(
            error.raw_os_error(),
            Some(libc::EAGAIN) | Some(libc::EACCES)
        ) {
            // Someone holds a write lock on the byte, which QEMU never takes: report it as
            // a conflict on that byte.
            return Err(StorageError::Locked {
                path: path.to_path_buf(),
                holder: holder_of(file, byte),
                detail: format!("holds a write lock on byte {byte}"),
            });
        }
        return Err(StorageError::io(path, "lock (fcntl F_OFD_SETLK)", error));
    }
    Ok(())
}

/// Returns whether an open other than `file` holds any lock on `byte`.
fn is_locked_by_other(file: &File, path: &Path, byte: u64) -> Result<bool, StorageError> {
    let mut lock = byte_lock(libc::F_WRLCK as libc::c_short, byte);
    // SAFETY: the descriptor is open for the life of `file`, and `lock` is a valid flock
    // that F_OFD_GETLK overwrites.
    let result = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut lock) };
    if result != 0 {
        let error = std::io::Error::last_os_error();
        return Err(StorageError::io(
            path,
            "test lock (fcntl F_OFD_GETLK)",
            error,
        ));
    }
    Ok(lock.l_type != libc::F_UNLCK as libc::c_short)
}

fn conflict(file: &File, path: &Path, bit: u32, byte: u64, verb: &str) -> StorageError {
    StorageError::Locked {
        path: path.to_path_buf(),
        holder: holder_of(file, byte),
        detail: format!(
            "{verb} the \"{}\" permission (lock byte {byte})",
            permission_name(bit)
        ),
    }
}

/// Names the process that locks `byte` of the file behind `file`, or "another process".
///
/// OFD locks show pid -1 in /proc/locks, but each process's /proc/PID/fdinfo lists the
/// locks of its descriptors, so the holder is found by scanning those. The scan runs only
/// on a conflict.
fn holder_of(file: &File, byte: u64) -> String {
    use std::os::unix::fs::MetadataExt;

    let Ok(metadata) = file.metadata() else {
        return "another process".into();
    };
    let own_fd = file.as_raw_fd();
    let own_pid = std::process::id();
    let key = format!(
        "{:02x}:{:02x}:{}",
        libc::major(metadata.dev()),
        libc::minor(metadata.dev()),
        metadata.ino()
    );
    for (pid, fd) in descriptors_locking(&key, byte) {
        if pid == own_pid && fd == own_fd {
            continue;
        }
        if pid == own_pid {
            return "another open of the same image in this process".into();
        }
        let command = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|name| name.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        return format!("process {pid} ({command})");
    }
    "another process".into()
}

/// Returns (pid, descriptor) of every descriptor whose fdinfo lists a lock on `byte` of
/// the file `key` (`MAJOR:MINOR:INODE` as /proc/locks prints it).
fn descriptors_locking(key: &str, byte: u64) -> Vec<(u32, i32)> {
    let mut found = Vec::new();
    let Ok(processes) = std::fs::read_dir("/proc") else {
        return found;
    };
    for process in processes.flatten() {
        let Some(pid) = process
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let fdinfo: PathBuf = process.path().join("fdinfo");
        let Ok(entries) = std::fs::read_dir(&fdinfo) else {
            continue;
        };
        for entry in entries.flatten() {
            let Some(fd) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
            else {
                continue;
            };
            let Ok(text) = std::fs::read_to_string(entry.path()) else {
                continue;
            };
            if text
                .lines()
                .filter_map(|line| line.strip_prefix("lock:"))
                .any(|lock| lock_covers(lock, key, byte))
            {
                found.push((pid, fd));
            }
        }
    }
    found
}

/// Returns whether a /proc/locks-style line (`1: OFDLCK ADVISORY READ -1 fe:00:123 100
/// 101`) locks `byte` of the file `key`.
fn lock_covers(line: &str, key: &str, byte: u64) -> bool {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let Some(position) = fields.iter().position(|field| *field == key) else {
        return false;
    };
    let start = fields.get(position + 1).and_then(|s| s.parse::<u64>().ok());
    let end = match fields.get(position + 2) {
        Some(&"EOF") => Some(u64::MAX),
        Some(text) => text.parse::<u64>().ok(),
        None => None,
    };
    matches!((start, end), (Some(start), Some(end)) if start <= byte && byte <= end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(path: &Path, write: bool) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .unwrap()
    }

    fn image() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        (dir, path)
    }

    #[test]
    fn two_writers_conflict() {
        let (_dir, path) = image();
        let first = open(&path, true);
        lock_image(&first, &path, Access::Write).unwrap();

        let second = open(&path, true);
        let error = lock_image(&second, &path, Access::Write).unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, StorageError::Locked { .. }), "{error:?}");
        assert!(message.contains("disk.img"), "{message}");
        assert!(message.contains("this process"), "{message}");
    }

    #[test]
    fn readers_share() {
        let (_dir, path) = image();
        let first = open(&path, false);
        lock_image(&first, &path, Access::Read).unwrap();
        let second = open(&path, false);
        lock_image(&second, &path, Access::Read).unwrap();
    }

    #[test]
    fn reader_blocks_writer_both_ways() {
        let (_dir, path) = image();
        let reader = open(&path, false);
        lock_image(&reader, &path, Access::Read).unwrap();
        let writer = open(&path, true);
        let error = lock_image(&writer, &path, Access::Write).unwrap_err();
        assert!(error.to_string().contains("write"), "{error}");
        drop(writer);
        drop(reader);

        let writer = open(&path, true);
        lock_image(&writer, &path, Access::Write).unwrap();
        let reader = open(&path, false);
        assert!(lock_image(&reader, &path, Access::Read).is_err());
    }

    #[test]
    fn closing_releases_locks() {
        let (_dir, path) = image();
        let first = open(&path, true);
        lock_image(&first, &path, Access::Write).unwrap();
        drop(first);
        let second = open(&path, true);
        lock_image(&second, &path, Access::Write).unwrap();
    }

    #[test]
    fn lock_line_parsing() {
        let line = " 4: OFDLCK ADVISORY  READ -1 fe:00:10043424 100 101";
        assert!(lock_covers(line, "fe:00:10043424", 100));
        assert!(lock_covers(line, "fe:00:10043424", 101));
        assert!(!lock_covers(line, "fe:00:10043424", 102));
        assert!(!lock_covers(line, "fe:00:1", 100));
        assert!(lock_covers(
            "1: POSIX ADVISORY WRITE 7 08:01:5 0 EOF",
            "08:01:5",
            201
        ));
    }
}
