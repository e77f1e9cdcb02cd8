//! Recognizes a kernel file as a bzImage or an ELF vmlinux and reads what the loader must
//! check before anything is written to guest memory.
//!
//! bzImage facts come from the x86 boot protocol (Linux Documentation/arch/x86/boot.rst):
//! the setup header starts at file offset 0x1f1, contains the "HdrS" magic at 0x202 and ends
//! at 0x202 plus the byte at 0x201; the protected-mode code follows the
//! `(setup_sects + 1) * 512` bytes of real-mode setup code.

use std::io::{Read, Seek, SeekFrom};

use linux_loader::loader::bootparam::setup_header;
use vm_memory::ByteValued;

/// Offset of the setup header in a bzImage.
pub const SETUP_HEADER_OFFSET: usize = 0x1f1;
/// "HdrS", the setup header magic at offset 0x202.
pub const SETUP_HEADER_MAGIC: u32 = 0x5372_6448;
/// Oldest boot protocol with `xloadflags` and so with the 64-bit entry (2.12).
pub const MIN_BOOT_PROTOCOL: u16 = 0x020c;
/// `loadflags` bit: the protected-mode code loads at 1 MiB.
pub const LOADED_HIGH: u8 = 1 << 0;
/// `xloadflags` bit: the kernel has the 64-bit entry at load address + 0x200.
pub const XLF_KERNEL_64: u16 = 1 << 0;
/// Offset of the 64-bit entry from the protected-mode load address.
pub const ENTRY_64_OFFSET: u64 = 0x200;
/// ELF machine number of x86-64.
const EM_X86_64: u16 = 62;
/// ELF program header type of a loadable segment.
const PT_LOAD: u32 = 1;
/// Largest number of ELF program headers accepted; vmlinux has about five.
const MAX_PROGRAM_HEADERS: u16 = 64;
/// Size of the first read: the whole real-mode setup area of any bzImage fits (setup_sects
/// is one byte, so at most 256 sectors).
const PROBE_SIZE: usize = 257 * 512;

/// Kernel file format, with the facts the loader needs from it.
#[derive(Debug, Clone, PartialEq)]
pub enum KernelImage {
    /// A bzImage: its setup header and where its protected-mode code starts in the file.
    BzImage(BzImageInfo),
    /// A 64-bit x86 ELF file, as `vmlinux` is.
    Elf(ElfInfo),
}

/// The parts of a bzImage that the loader checks and copies.
#[derive(Debug, Clone, PartialEq)]
pub struct BzImageInfo {
    /// The setup header, copied up to its real end and zero beyond it.
    pub header: setup_header,
    /// File offset of the protected-mode code.
    pub setup_size: u64,
    /// Length of the protected-mode code.
    pub payload_size: u64,
    /// The version string that `kernel_version` points to, if any.
    pub version: Option<String>,
}

/// The extent of an ELF kernel in guest-physical memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfInfo {
    /// Entry point (`e_entry`), a physical address in vmlinux.
    pub entry: u64,
    /// Lowest `p_paddr` of a loadable segment.
    pub start: u64,
    /// Highest `p_paddr + p_memsz` of a loadable segment.
    pub end: u64,
}

/// Reason a file is not a kernel that MonsterVM can boot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    #[error("neither a bzImage (no \"HdrS\" at offset 0x202) nor an ELF file")]
    NotAKernel,
    #[error("boot protocol {major}.{minor:02} is older than 2.12, which added the 64-bit entry")]
    ProtocolTooOld { major: u8, minor: u8 },
    #[error("the bzImage has no 64-bit entry (xloadflags {xloadflags:#x} lacks XLF_KERNEL_64)")]
    No64BitEntry { xloadflags: u16 },
    #[error("the bzImage does not load at 1 MiB (loadflags {loadflags:#x} lacks LOADED_HIGH)")]
    NotLoadedHigh { loadflags: u8 },
    #[error("the bzImage is truncated: {size} bytes, but its setup code alone takes {setup_size}")]
    Truncated { size: u64, setup_size: u64 },
    #[error(
        "the bzImage is truncated: the file is {size} bytes, but its header declares {expected} \
         bytes ({setup_size} bytes of setup code and syssize {syssize} x 16 bytes of \
         protected-mode code)"
    )]
    PayloadTruncated {
        size: u64,
        expected: u64,
        setup_size: u64,
        syssize: u32,
    },
    #[error("unsupported ELF file: {reason}")]
    UnsupportedElf { reason: String },
}

/// Reads enough of `file` to classify it and check it.
pub fn probe<F: Read + Seek>(file: &mut F) -> std::io::Result<Result<KernelImage, ImageError>> {
    let size = file.seek(SeekFrom::End(0))?;
    file.rewind()?;
    let mut probe = Vec::with_capacity(PROBE_SIZE);
    file.by_ref()
        .take(PROBE_SIZE as u64)
        .read_to_end(&mut probe)?;

    if probe.starts_with(b"\x7fELF") {
        return parse_elf(file, &probe, size);
    }
    Ok(parse_bzimage(&probe, size))
}

fn parse_bzimage(probe: &[u8], size: u64) -> Result<KernelImage, ImageError> {
    if probe.len() < 0x206 || u32_at(probe, 0x202) != SETUP_HEADER_MAGIC {
        return Err(ImageError::NotAKernel);
    }
    // The header ends at 0x202 plus the jump displacement at 0x201. Copy no further than
    // that, and no further than the fields of `setup_header`.
    let header_end = 0x202 + usize::from(probe[0x201]);
    let mut header = setup_header::default();
    let known = std::mem::size_of::<setup_header>();
    let length = header_end
        .saturating_sub(SETUP_HEADER_OFFSET)
        .min(known)
        .min(probe.len() - SETUP_HEADER_OFFSET);
    header.as_mut_slice()[..length]
        .copy_from_slice(&probe[SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + length]);

    let version = header.version;
    if version < MIN_BOOT_PROTOCOL {
        return Err(ImageError::ProtocolTooOld {
            major: (version >> 8) as u8,
            minor: version as u8,
        });
    }
    if header.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(ImageError::No64BitEntry {
            xloadflags: header.xloadflags,
        });
    }
    if header.loadflags & LOADED_HIGH == 0 {
        return Err(ImageError::NotLoadedHigh {
            loadflags: header.loadflags,
        });
    }

    // A setup_sects of 0 means 4, for compatibility with ancient kernels.
    let setup_sects = match header.setup_sects {
        0 => 4,
        n => u64::from(n),
    };
    let setup_size = (setup_sects + 1) * 512;
    if size <= setup_size {
        return Err(ImageError::Truncated { size, setup_size });
    }
    // syssize counts the protected-mode code in 16-byte paragraphs. A file may run longer
    // (Debian's signed cloud kernel has 1472 more bytes), but a shorter one lost code.
    let syssize = header.syssize;
    let expected = setup_size + u64::from(syssize) * 16;
    if size < expected {
        return Err(ImageError::PayloadTruncated {
            size,
            expected,
            setup_size,
            syssize,
        });
    }

    Ok(KernelImage::BzImage(BzImageInfo {
        version: version_string(probe, header.kernel_version),
        header,
        setup_size,
        payload_size: size - setup_size,
    }))
}

/// Reads the NUL-terminated version string at `offset + 0x200`, if it lies in the probe.
fn version_string(probe: &[u8], offset: u16) -> Option<String> {
    if offset == 0 {
        return None;
    }
    let start = usize::from(offset) + 0x200;
    let tail = probe.get(start..)?;
    let end = tail.iter().take(256).position(|&b| b == 0)?;
    let text = std::str::from_utf8(&tail[..end]).ok()?;
    Some(text.to_string())
}

fn parse_elf<F: Read + Seek>(
    file: &mut F,
    probe: &[u8],
    size: u64,
) -> std::io::Result<Result<KernelImage, ImageError>> {
    let unsupported = |reason: String| Ok(Err(ImageError::UnsupportedElf { reason }));
    if probe.len() < 64 {
        return unsupported(format!(
            "the file is {size} bytes, shorter than an ELF header"
        ));
    }
    if probe[4] != 2 {
        return unsupported(format!("class {} is not ELFCLASS64", probe[4]));
    }
    if probe[5] != 1 {
        return unsupported("the file is big-endian".to_string());
    }
    let machine = u16_at(probe, 18);
    if machine != EM_X86_64 {
        return unsupported(format!("machine {machine} is not x86-64 ({EM_X86_64})"));
    }
    let entry = u64_at(probe, 24);
    let phoff = u64_at(probe, 32);
    let phentsize = u16_at(probe, 54);
    let phnum = u16_at(probe, 56);
    if phentsize != 56 || phnum == 0 || phnum > MAX_PROGRAM_HEADERS {
        return unsupported(format!(
            "{phnum} program headers of {phentsize} bytes (expected 1 to {MAX_PROGRAM_HEADERS} of 56)"
        ));
    }
    let table_size = u64::from(phnum) * 56;
    if phoff.checked_add(table_size).is_none_or(|end| end > size) {
        return unsupported(format!(
            "program headers at {phoff:#x} run past the end of the file"
        ));
    }

    let mut table = vec![0u8; table_size as usize];
    file.seek(SeekFrom::Start(phoff))?;
    file.read_exact(&mut table)?;

    let mut start = u64::MAX;
    let mut end = 0u64;
    for header in table.chunks_exact(56) {
        if u32_at(header, 0) != PT_LOAD {
            continue;
        }
        let offset = u64_at(header, 8);
        let paddr = u64_at(header, 24);
        let filesz = u64_at(header, 32);
        let memsz = u64_at(header, 40);
        let Some(segment_end) = paddr.checked_add(memsz) else {
            return unsupported(format!(
                "segment at {paddr:#x} of {memsz:#x} bytes overflows"
            ));
        };
        if filesz > memsz || offset.checked_add(filesz).is_none_or(|e| e > size) {
            return unsupported(format!(
                "segment at file offset {offset:#x} of {filesz:#x} bytes runs past the end of the file"
            ));
        }
        start = start.min(paddr);
        end = end.max(segment_end);
    }
    if end == 0 {
        return unsupported("no loadable segment".to_string());
    }
    Ok(Ok(KernelImage::Elf(ElfInfo { entry, start, end })))
}

fn u16_at(bytes: &[u8], offset: usize) -> u16 {
    u16::from_le_bytes([bytes[offset], bytes[offset + 1]])
}

fn u32_at(bytes: &[u8], offset: usize) -> u32 {
    let mut value = [0u8; 4];
    value.copy_from_slice(&bytes[offset..offset + 4]);
    u32::from_le_bytes(value)
}

fn u64_at(bytes: &[u8], offset: usize) -> u64 {
    let mut value = [0u8; 8];
    value.copy_from_slice(&bytes[offset..offset + 8]);
    u64::from_le_bytes(value)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Cursor;

    /// Builds a minimal bzImage: 4 setup sectors after the boot sector, a protocol 2.15
    /// header and `payload` as protected-mode code.
    pub(crate) fn fake_bzimage(payload: &[u8]) -> Vec<u8> {
        let setup_sects = 4u8;
        let mut image = vec![0u8; (usize::from(setup_sects) + 1) * 512];
        image[0x1f1] = setup_sects;
        let syssize = (payload.len() / 16) as u32;
        image[0x1f4..0x1f8].copy_from_slice(&syssize.to_le_bytes());
        image[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        image[0x200] = 0xeb;
        image[0x201] = 0x6a; // header ends at 0x26c
        image[0x202..0x206].copy_from_slice(&SETUP_HEADER_MAGIC.to_le_bytes());
        image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        image[0x20e..0x210].copy_from_slice(&0x300u16.to_le_bytes()); // kernel_version
        image[0x211] = LOADED_HIGH;
        image[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        image[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
        image[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes()); // kernel_alignment
        image[0x234] = 1; // relocatable
        image[0x236..0x238].copy_from_slice(&0x7fu16.to_le_bytes()); // xloadflags
        image[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes()); // cmdline_size
        image[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes()); // pref_address
        image[0x260..0x264].copy_from_slice(&0x40_0000u32.to_le_bytes()); // init_size
        image[0x500..0x50b].copy_from_slice(b"6.1.0-test\0");
        image.extend_from_slice(payload);
        image
    }

    fn probe_bytes(bytes: Vec<u8>) -> Result<KernelImage, ImageError> {
        probe(&mut Cursor::new(bytes)).unwrap()
    }

    #[test]
    fn bzimage_header_is_read() {
        let KernelImage::BzImage(info) = probe_bytes(fake_bzimage(&[0x90; 1000])).unwrap() else {
            panic!("expected a bzImage");
        };
        assert_eq!({ info.header.version }, 0x020f);
        assert_eq!({ info.header.cmdline_size }, 2047);
        assert_eq!({ info.header.code32_start }, 0x10_0000);
        assert_eq!(info.setup_size, 5 * 512);
        assert_eq!(info.payload_size, 1000);
        assert_eq!(info.version.as_deref(), Some("6.1.0-test"));
    }

    #[test]
    fn header_copy_stops_at_its_end() {
        let mut image = fake_bzimage(&[0x90; 16]);
        image[0x201] = 0x5e; // header ends at 0x260: init_size and later are not part of it
        let KernelImage::BzImage(info) = probe_bytes(image).unwrap() else {
            panic!("expected a bzImage");
        };
        assert_eq!({ info.header.pref_address }, 0x100_0000);
        assert_eq!({ info.header.init_size }, 0);
    }

    #[test]
    fn short_payload_is_rejected() {
        let mut image = fake_bzimage(&[0x90; 1024]);
        image.truncate(image.len() - 17);
        let error = probe_bytes(image).unwrap_err();
        assert_eq!(
            error,
            ImageError::PayloadTruncated {
                size: 5 * 512 + 1024 - 17,
                expected: 5 * 512 + 1024,
                setup_size: 5 * 512,
                syssize: 64,
            }
        );
        let message = error.to_string();
        assert!(
            message.contains(&(5 * 512 + 1024 - 17).to_string()),
            "{message}"
        );
        assert!(message.contains(&(5 * 512 + 1024).to_string()), "{message}");
    }

    #[test]
    fn payload_beyond_syssize_is_accepted() {
        // Debian's signed kernels carry bytes after the declared code.
        let mut image = fake_bzimage(&[0x90; 1024]);
        image.extend_from_slice(&[0u8; 700]);
        let KernelImage::BzImage(info) = probe_bytes(image).unwrap() else {
            panic!("expected a bzImage");
        };
        assert_eq!(info.payload_size, 1724);
    }

    #[test]
    fn random_bytes_are_not_a_kernel() {
        assert_eq!(probe_bytes(vec![0x41; 4096]), Err(ImageError::NotAKernel));
        assert_eq!(probe_bytes(Vec::new()), Err(ImageError::NotAKernel));
    }

    #[test]
    fn old_protocol_is_rejected() {
        let mut image = fake_bzimage(&[0x90; 16]);
        image[0x206..0x208].copy_from_slice(&0x0206u16.to_le_bytes());
        assert_eq!(
            probe_bytes(image),
            Err(ImageError::ProtocolTooOld { major: 2, minor: 6 })
        );
    }

    #[test]
    fn missing_64bit_entry_is_rejected() {
        let mut image = fake_bzimage(&[0x90; 16]);
        image[0x236] = 0x7e;
        assert!(matches!(
            probe_bytes(image),
            Err(ImageError::No64BitEntry { xloadflags: 0x7e })
        ));
    }

    #[test]
    fn truncated_bzimage_is_rejected() {
        let image = fake_bzimage(&[]);
        assert!(matches!(
            probe_bytes(image),
            Err(ImageError::Truncated { .. })
        ));
    }

    #[test]
    fn elf32_is_rejected() {
        let mut image = vec![0u8; 128];
        image[..4].copy_from_slice(b"\x7fELF");
        image[4] = 1;
        assert!(matches!(
            probe_bytes(image),
            Err(ImageError::UnsupportedElf { .. })
        ));
    }

    #[test]
    fn elf_with_bad_program_headers_is_rejected() {
        let mut image = vec![0u8; 128];
        image[..4].copy_from_slice(b"\x7fELF");
        image[4] = 2;
        image[5] = 1;
        image[18] = 62;
        image[32..40].copy_from_slice(&0x1000u64.to_le_bytes());
        image[54] = 56;
        image[56] = 1;
        let err = probe_bytes(image).unwrap_err();
        assert!(err.to_string().contains("past the end"), "{err}");
    }
}
