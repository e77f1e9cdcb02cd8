//! Extracts the ELF `vmlinux` from a bzImage's compressed payload, so that the kernel can
//! be entered without running its decompressor (hundreds of millions of instructions on
//! the emulator).
//!
//! Boot protocol 2.08 added `payload_offset` and `payload_length`, which locate the
//! compressed kernel relative to the start of the protected-mode code. The build appends
//! the decompressed size as the payload's last 4 bytes. Only LZ4, the compression of
//! Debian's kernels, is decoded here.

use std::io::Cursor;

use super::image::{probe, ImageError, KernelImage};
use super::lz4::{decode_legacy, Lz4Error, LEGACY_MAGIC};

/// Oldest boot protocol with the payload fields (2.08).
const MIN_PAYLOAD_PROTOCOL: u16 = 0x0208;
/// Largest vmlinux accepted, in bytes; Debian's 6.1 vmlinux is about 40 MiB.
pub const MAX_VMLINUX_SIZE: usize = 512 << 20;

/// Reason no vmlinux could be extracted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VmlinuxError {
    #[error("not a bzImage: {0}")]
    NotBzImage(String),
    #[error(
        "the bzImage's payload ({offset:#x}, {length} bytes) lies outside the {size}-byte file"
    )]
    PayloadOutOfRange {
        offset: u64,
        length: u64,
        size: usize,
    },
    #[error("the payload is compressed with {format}, which MonsterVM does not decode (only LZ4)")]
    UnsupportedCompression { format: &'static str },
    #[error("failed to decompress the LZ4 payload: {0}")]
    Lz4(#[from] Lz4Error),
    #[error("the payload decompressed to {actual} bytes, but its trailer says {expected}")]
    SizeMismatch { expected: u64, actual: usize },
    #[error("the decompressed payload is not an ELF file")]
    NotElf,
}

/// Returns the name of the compression that `payload` starts with, if known.
pub fn compression_name(payload: &[u8]) -> Option<&'static str> {
    const MAGICS: [(&[u8], &str); 7] = [
        (&LEGACY_MAGIC.to_le_bytes(), "lz4"),
        (b"\x1f\x8b", "gzip"),
        (b"\xfd7zXZ\x00", "xz"),
        (b"\x28\xb5\x2f\xfd", "zstd"),
        (b"BZh", "bzip2"),
        (b"\x5d\x00", "lzma"),
        (b"\x89LZO", "lzo"),
    ];
    MAGICS
        .iter()
        .find(|(magic, _)| payload.starts_with(magic))
        .map(|&(_, name)| name)
}

/// Returns the ELF vmlinux inside `bzimage`, the bytes of a whole bzImage file.
pub fn extract_vmlinux(bzimage: &[u8]) -> Result<Vec<u8>, VmlinuxError> {
    let info = match probe(&mut Cursor::new(bzimage)) {
        Ok(Ok(KernelImage::BzImage(info))) => info,
        Ok(Ok(KernelImage::Elf(_))) => {
            return Err(VmlinuxError::NotBzImage("it is already an ELF file".into()))
        }
        Ok(Err(error)) => return Err(VmlinuxError::NotBzImage(error.to_string())),
        Err(error) => return Err(VmlinuxError::NotBzImage(error.to_string())),
    };
    if info.header.version < MIN_PAYLOAD_PROTOCOL {
        return Err(VmlinuxError::NotBzImage(
            ImageError::ProtocolTooOld {
                major: (info.header.version >> 8) as u8,
                minor: info.header.version as u8,
            }
            .to_string(),
        ));
    }

    let offset = info.setup_size + u64::from(info.header.payload_offset);
    let length = u64::from(info.header.payload_length);
    let out_of_range = || VmlinuxError::PayloadOutOfRange {
        offset,
        length,
        size: bzimage.len(),
    };
    let end = offset.checked_add(length).ok_or_else(out_of_range)?;
    if length < 4 || end > bzimage.len() as u64 {
        return Err(out_of_range());
    }
    let payload = &bzimage[offset as usize..end as usize];

    match compression_name(payload) {
        Some("lz4") => {}
        Some(format) => return Err(VmlinuxError::UnsupportedCompression { format }),
        None => {
            return Err(VmlinuxError::UnsupportedCompression {
                format: "an unknown format",
            })
        }
    }
    let trailer = &payload[payload.len() - 4..];
    let expected = u64::from(u32::from_le_bytes([
        trailer[0], trailer[1], trailer[2], trailer[3],
    ]));
    let vmlinux = decode_legacy(payload, MAX_VMLINUX_SIZE)?;
    if vmlinux.len() as u64 != expected {
        return Err(VmlinuxError::SizeMismatch {
            expected,
            actual: vmlinux.len(),
        });
    }
    if !vmlinux.starts_with(b"\x7fELF") {
        return Err(VmlinuxError::NotElf);
    }
    Ok(vmlinux)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::boot::image::tests::fake_bzimage;

    /// Builds a bzImage whose payload is `compressed` followed by the size trailer.
    fn bzimage_with_payload(compressed: &[u8], decompressed_size: u32) -> Vec<u8> {
        let mut payload = compressed.to_vec();
        payload.extend_from_slice(&decompressed_size.to_le_bytes());
        let mut image = fake_bzimage(&payload);
        image[0x248..0x24c].copy_from_slice(&0u32.to_le_bytes()); // payload_offset
        image[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        image
    }

    fn lz4_literals(data: &[u8]) -> Vec<u8> {
        assert!(data.len() < 15);
        let mut stream = LEGACY_MAGIC.to_le_bytes().to_vec();
        stream.extend_from_slice(&(data.len() as u32 + 1).to_le_bytes());
        stream.push((data.len() as u8) << 4);
        stream.extend_from_slice(data);
        stream
    }

    #[test]
    fn lz4_payload_is_extracted() {
        let image = bzimage_with_payload(&lz4_literals(b"\x7fELF-body"), 9);
        assert_eq!(extract_vmlinux(&image).unwrap(), b"\x7fELF-body");
    }

    #[test]
    fn size_trailer_is_checked() {
        let image = bzimage_with_payload(&lz4_literals(b"\x7fELF-body"), 10);
        assert_eq!(
            extract_vmlinux(&image),
            Err(VmlinuxError::SizeMismatch {
                expected: 10,
                actual: 9
            })
        );
    }

    #[test]
    fn non_elf_payload_is_rejected() {
        let image = bzimage_with_payload(&lz4_literals(b"not elf"), 7);
        assert_eq!(extract_vmlinux(&image), Err(VmlinuxError::NotElf));
    }

    #[test]
    fn gzip_payload_is_named() {
        let image = bzimage_with_payload(b"\x1f\x8b\x08\x00rest", 100);
        assert_eq!(
            extract_vmlinux(&image),
            Err(VmlinuxError::UnsupportedCompression { format: "gzip" })
        );
    }

    #[test]
    fn payload_past_end_is_rejected() {
        let mut image = bzimage_with_payload(&lz4_literals(b"\x7fELF"), 4);
        image[0x24c..0x250].copy_from_slice(&0x10_0000u32.to_le_bytes());
        assert!(matches!(
            extract_vmlinux(&image),
            Err(VmlinuxError::PayloadOutOfRange { .. })
        ));
    }
}
