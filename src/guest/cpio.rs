//! The "newc" cpio format (SVR4 without CRC) that the Linux initramfs unpacker reads.
//!
//! Each entry is a 110-byte ASCII header, the NUL-terminated path padded to 4 bytes, and
//! the data padded to 4 bytes; an entry named `TRAILER!!!` ends the archive:
//!
//! ```text
//! "070701" ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor
//! namesize check        (13 fields of 8 hex digits each)
//! ```

use std::io::{self, Write};

/// Magic of a newc header.
pub const NEWC_MAGIC: &[u8; 6] = b"070701";
/// Name of the entry that ends an archive.
pub const TRAILER: &str = "TRAILER!!!";
const HEADER_SIZE: usize = 110;

/// File type bits of `mode` (as in `st_mode`).
pub const S_IFMT: u32 = 0o170000;
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFLNK: u32 = 0o120000;
pub const S_IFCHR: u32 = 0o020000;

/// Writes a newc archive entry by entry. Timestamps are 0 and owners root, so the same
/// input gives the same bytes.
pub struct CpioWriter<W: Write> {
    out: W,
    next_inode: u32,
    offset: u64,
}

impl<W: Write> CpioWriter<W> {
    /// Starts an archive on `out`.
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            next_inode: 1,
            offset: 0,
        }
    }

    /// Adds a directory; `path` is relative to the archive root, as in `bin` or `dev/pts`.
    pub fn add_directory(&mut self, path: &str, permissions: u32) -> io::Result<()> {
        self.add_entry(path, S_IFDIR | (permissions & 0o7777), 0, &[], 2)
    }

    /// Adds a regular file with `data` as its contents.
    pub fn add_file(&mut self, path: &str, permissions: u32, data: &[u8]) -> io::Result<()> {
        self.add_entry(path, S_IFREG | (permissions & 0o7777), 0, data, 1)
    }

    /// Adds a symbolic link to `target`.
    pub fn add_symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        self.add_entry(path, S_IFLNK | 0o777, 0, target.as_bytes(), 1)
    }

    /// Adds a character device node with the given major and minor numbers.
    pub fn add_char_device(
        &mut self,
        path: &str,
        permissions: u32,
        major: u32,
        minor: u32,
    ) -> io::Result<()> {
        let rdev = (u64::from(major) << 32) | u64::from(minor);
        self.add_entry(path, S_IFCHR | (permissions & 0o7777), rdev, &[], 1)
    }

    /// Writes the trailer and returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        self.write_entry(TRAILER, 0, 0, 0, &[], 1)?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn add_entry(
        &mut self,
        path: &str,
        mode: u32,
        rdev: u64,
        data: &[u8],
        links: u32,
    ) -> io::Result<()> {
        let path = path.trim_start_matches('/');
        if path.is_empty() || path == TRAILER || path.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid cpio entry path {path:?}"),
            ));
        }
        let inode = self.next_inode;
        self.next_inode += 1;
        self.write_entry(path, inode, mode, rdev, data, links)
    }

    fn write_entry(
        &mut self,
        path: &str,
        inode: u32,
        mode: u32,
        rdev: u64,
        data: &[u8],
        links: u32,
    ) -> io::Result<()> {
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{path} is {} bytes, over the 4 GiB newc limit", data.len()),
            )
        })?;
        let header = format!(
            "070701{inode:08x}{mode:08x}{:08x}{:08x}{links:08x}{:08x}{size:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            0, // uid
            0, // gid
            0, // mtime
            0, // devmajor
            0, // devminor
            (rdev >> 32) as u32,
            rdev as u32,
            path.len() + 1,
            0, // check
        );
        // The name follows the header directly, and the two together are padded.
        self.out.write_all(header.as_bytes())?;
        self.offset += header.len() as u64;
        self.write_padded(path.as_bytes(), &[0])?;
        self.write_padded(data, &[])
    }

    /// Writes `bytes` and `suffix`, then zeros up to the next 4-byte boundary.
    fn write_padded(&mut self, bytes: &[u8], suffix: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.out.write_all(suffix)?;
        self.offset += (bytes.len() + suffix.len()) as u64;
        let padding = (4 - (self.offset % 4) as usize) % 4;
        self.out.write_all(&[0; 3][..padding])?;
        self.offset += padding as u64;
        Ok(())
    }
}

/// One entry read back from an archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpioEntry {
    pub path: String,
    pub mode: u32,
    pub inode: u32,
    pub links: u32,
    pub rdev_major: u32,
    pub rdev_minor: u32,
    /// File contents, or the target of a symbolic link.
    pub data: Vec<u8>,
}

/// Why an archive could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpioError {
    #[error("cpio header at offset {offset:#x} is truncated: the archive is {size} bytes")]
    Truncated { offset: usize, size: usize },
    #[error("cpio header at offset {offset:#x} has magic {magic:?}, not \"070701\" (newc)")]
    BadMagic { offset: usize, magic: String },
    #[error("cpio header at offset {offset:#x} has an invalid hex field {field:?}")]
    BadField { offset: usize, field: String },
    #[error("cpio entry at offset {offset:#x} has an invalid name")]
    BadName { offset: usize },
    #[error("cpio archive of {size} bytes ends without a TRAILER!!! entry")]
    NoTrailer { size: usize },
}

/// Parses a whole uncompressed newc archive, stopping at the trailer.
pub fn read_archive(bytes: &[u8]) -> Result<Vec<CpioEntry>, CpioError> {
    let mut entries = Vec::new();
    let mut offset = 0;
    let truncated = |offset| CpioError::Truncated {
        offset,
        size: bytes.len(),
    };

    while offset < bytes.len() {
        let header = bytes
            .get(offset..offset + HEADER_SIZE)
            .ok_or_else(|| truncated(offset))?;
        if &header[..6] != NEWC_MAGIC {
            return Err(CpioError::BadMagic {
                offset,
                magic: String::from_utf8_lossy(&header[..6]).into_owned(),
            });
        }
        let field = |index: usize| -> Result<u32, CpioError> {
            let raw = &header[6 + index * 8..6 + (index + 1) * 8];
            std::str::from_utf8(raw)
                .ok()
                .and_then(|text| u32::from_str_radix(text, 16).ok())
                .ok_or_else(|| CpioError::BadField {
                    offset,
                    field: String::from_utf8_lossy(raw).into_owned(),
                })
        };
        let inode = field(0)?;
        let mode = field(1)?;
        let links = field(4)?;
        let size = field(6)? as usize;
        let rdev_major = field(9)?;
        let rdev_minor = field(10)?;
        let name_size = field(11)? as usize;

        let name_start = offset + HEADER_SIZE;
        let name_bytes = name_start
            .checked_add(name_size)
            .and_then(|end| bytes.get(name_start..end))
            .ok_or_else(|| truncated(offset))?;
        let Some((&0, name)) = name_bytes.split_last() else {
            return Err(CpioError::BadName { offset });
        };
        let path = std::str::from_utf8(name)
            .map_err(|_| CpioError::BadName { offset })?
            .to_string();

        let data_start = (name_start + name_size).next_multiple_of(4);
        let data = data_start
            .checked_add(size)
            .and_then(|end| bytes.get(data_start..end))
            .ok_or_else(|| truncated(offset))?;
        offset = (data_start + size).next_multiple_of(4);

        if path == TRAILER {
            return Ok(entries);
        }
        entries.push(CpioEntry {
            path,
            mode,
            inode,
            links,
            rdev_major,
            rdev_minor,
            data: data.to_vec(),
        });
    }
    Err(CpioError::NoTrailer { size: bytes.len() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    fn sample() -> Vec<u8> {
        let mut writer = CpioWriter::new(Vec::new());
        writer.add_directory("bin", 0o755).unwrap();
        writer
            .add_file("bin/busybox", 0o755, b"\x7fELF...")
            .unwrap();
        writer.add_symlink("bin/sh", "busybox").unwrap();
        writer.add_directory("dev", 0o755).unwrap();
        writer.add_char_device("dev/console", 0o600, 5, 1).unwrap();
        writer
            .add_file("init", 0o755, b"#!/bin/sh\necho hi\n")
            .unwrap();
        writer.add_file("empty", 0o644, b"").unwrap();
        writer.finish().unwrap()
    }

    #[test]
    fn round_trip() {
        let bytes = sample();
        assert_eq!(bytes.len() % 4, 0);
        let entries = read_archive(&bytes).unwrap();
        let paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "bin",
                "bin/busybox",
                "bin/sh",
                "dev",
                "dev/console",
                "init",
                "empty"
            ]
        );
        assert_eq!(entries[0].mode, S_IFDIR | 0o755);
        assert_eq!(entries[1].data, b"\x7fELF...");
        assert_eq!(entries[2].mode & S_IFMT, S_IFLNK);
        assert_eq!(entries[2].data, b"busybox");
        assert_eq!(entries[4].mode, S_IFCHR | 0o600);
        assert_eq!((entries[4].rdev_major, entries[4].rdev_minor), (5, 1));
        assert_eq!(entries[5].data, b"#!/bin/sh\necho hi\n");
        assert!(entries[6].data.is_empty());
    }

    #[test]
    fn inodes_are_unique() {
        let entries = read_archive(&sample()).unwrap();
        let mut inodes: Vec<u32> = entries.iter().map(|e| e.inode).collect();
        inodes.sort();
        inodes.dedup();
        assert_eq!(inodes.len(), entries.len());
    }

    #[test]
    fn header_layout() {
        let bytes = sample();
        assert_eq!(&bytes[..6], b"070701");
        // namesize of "bin" plus NUL, in the 12th field.
        assert_eq!(&bytes[94..102], b"00000004");
        // Name starts at 110, and "bin\0" plus padding ends at 116.
        assert_eq!(&bytes[110..114], b"bin\0");
        assert_eq!(&bytes[116..122], b"070701");
    }

    #[test]
    fn invalid_paths_are_rejected() {
        let mut writer = CpioWriter::new(Vec::new());
        assert!(writer.add_file("", 0o644, b"").is_err());
        assert!(writer.add_file("TRAILER!!!", 0o644, b"").is_err());
        assert!(writer.add_file("a\0b", 0o644, b"").is_err());
    }

    #[test]
    fn truncated_archive_is_rejected() {
        let bytes = sample();
        for cut in [50, 115, 200, bytes.len() - 4] {
            let err = read_archive(&bytes[..cut]).unwrap_err();
            assert!(
                matches!(
                    err,
                    CpioError::Truncated { .. } | CpioError::NoTrailer { .. }
                ),
                "cut at {cut}: {err}"
            );
        }
    }

    #[test]
    fn corrupt_header_is_rejected() {
        let mut bytes = sample();
        bytes[0] = b'1';
        assert!(matches!(
            read_archive(&bytes),
            Err(CpioError::BadMagic { offset: 0, .. })
        ));
        let mut bytes = sample();
        bytes[20] = b'z';
        assert!(matches!(
            read_archive(&bytes),
            Err(CpioError::BadField { offset: 0, .. })
        ));
        let mut bytes = sample();
        // A name size far past the end of the archive.
        bytes[94..102].copy_from_slice(b"7fffffff");
        assert!(matches!(
            read_archive(&bytes),
            Err(CpioError::Truncated { offset: 0, .. })
        ));
    }

    #[test]
    fn cpio_tool_lists_entries() {
        let bytes = sample();
        let child = Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match child {
            Ok(child) => child,
            Err(e) => {
                eprintln!(
                    "skipping: cpio is not available ({e}); install it with apt-get install cpio"
                );
                return;
            }
        };
        child.stdin.take().unwrap().write_all(&bytes).unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "cpio -t failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let listing = String::from_utf8(output.stdout).unwrap();
        let names: Vec<&str> = listing.lines().collect();
        assert_eq!(
            names,
            [
                "bin",
                "bin/busybox",
                "bin/sh",
                "dev",
                "dev/console",
                "init",
                "empty"
            ]
        );
    }
}
