//! Loads a Linux kernel, its initramfs and command line into guest memory, writes the
//! zero page, e820 map, MP and ACPI tables, GDT and page tables, and returns the CPU
//! state at the kernel's entry.
//!
//! Two kernel formats and two entry protocols are supported:
//!
//! | format | entry | CPU state at entry |
//! | --- | --- | --- |
//! | bzImage (boot protocol 2.12+) | 64-bit, load address + 0x200 | long mode, RSI = zero page |
//! | ELF vmlinux | 64-bit, `e_entry` | long mode, RSI = zero page |
//! | ELF vmlinux with a PVH note | PVH (`XEN_ELFNOTE_PHYS32_ENTRY`) | 32-bit protected mode, EBX = start info |
//!
//! The ELF entry skips the in-kernel decompressor, which costs hundreds of millions of
//! instructions on the emulator. The guest-physical layout is in [`super::layout`].

use std::fs::File;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use serde::Serialize;
use vm_memory::{
    Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError,
    GuestMemoryMmap, GuestMemoryRegion,
};

use super::acpi::{build_acpi_tables, AcpiConfig};
use super::e820::{build_e820, E820Entry};
use super::entry::{long_mode_state, pvh_state, write_gdt, write_identity_page_tables, CodeMode};
use super::image::{probe, ImageError, KernelImage, ENTRY_64_OFFSET, SETUP_HEADER_MAGIC};
use super::layout::{
    ACPI_END, ACPI_START, CMDLINE_MAX_SIZE, CMDLINE_START, HIGH_MEMORY_START, INITRD_ALIGNMENT,
    MPTABLE_END, MPTABLE_START, PVH_INFO_START, ZERO_PAGE_START,
};
use super::mptable::build_mptable;
use super::pvh::build_start_info;
use crate::hypervisor::CpuState;
use crate::utils::config::{VmConfig, MAX_VCPUS};

/// `type_of_loader` for a boot loader without an assigned ID.
pub const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// `boot_flag` of a valid boot sector.
const BOOT_FLAG: u16 = 0xaa55;
/// Highest initramfs end address for kernels whose header does not give one (ELF):
/// the default `initrd_addr_max` of 64-bit kernels.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x7fff_ffff;
/// Maximum command line length for kernels whose header does not give one (ELF): x86's
/// COMMAND_LINE_SIZE (2048) minus the terminating NUL.
const DEFAULT_CMDLINE_MAX: usize = 2047;
/// Physical alignment written into the synthesized header of an ELF kernel (2 MiB, the
/// x86-64 default of CONFIG_PHYSICAL_ALIGN).
const DEFAULT_KERNEL_ALIGNMENT: u32 = 0x20_0000;

/// Requested entry point of the kernel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryPreference {
    /// The 64-bit boot protocol for both formats.
    #[default]
    Auto,
    /// The 64-bit boot protocol.
    Linux64,
    /// The PVH entry of an ELF kernel; an error for a bzImage or an ELF without the note.
    Pvh,
}

/// The entry protocol that was set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryProtocol {
    Linux64,
    Pvh,
}

/// The kernel file's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelFormat {
    BzImage,
    Elf,
}

/// Kernel, initramfs, command line and platform facts of one boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinuxBootSpec {
    /// bzImage or ELF vmlinux.
    pub kernel: PathBuf,
    /// Initramfs (cpio, optionally compressed), loaded as is.
    pub initrd: Option<PathBuf>,
    /// Kernel command line, without the terminating NUL.
    pub cmdline: String,
    /// Number of processors listed in the MP table and the MADT.
    pub vcpus: u8,
    /// Entry point choice.
    pub entry: EntryPreference,
    /// Declare a PCI host bridge in the DSDT (the VM has one at ports 0xcf8/0xcfc).
    pub pci_host_bridge: bool,
}

impl LinuxBootSpec {
    /// Returns a spec for `kernel` with no initramfs, an empty command line and one vCPU.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        LinuxBootSpec {
            kernel: kernel.into(),
            initrd: None,
            cmdline: String::new(),
            vcpus: 1,
            entry: EntryPreference::Auto,
            pci_host_bridge: true,
        }
    }

    /// Returns the spec for a VM definition, or `None` when it has no kernel (the
    /// embedded guest boots instead).
    pub fn from_config(config: &VmConfig) -> Option<Self> {
        let kernel = config.kernel.clone()?;
        Some(LinuxBootSpec {
            initrd: config.initrd.clone(),
            cmdline: config.effective_cmdline().to_string(),
            vcpus: config.vcpus,
            ..LinuxBootSpec::new(kernel)
        })
    }
}

/// A guest-physical range that the loader filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct GuestRange {
    pub address: u64,
    pub size: u64,
}

/// The result of [`load_linux`]: the entry state of the boot vCPU and where everything
/// went.
#[derive(Debug, Clone, PartialEq)]
pub struct LinuxBoot {
    /// Registers of the boot processor at the kernel entry. Other processors start from
    /// reset and wait for INIT-SIPI.
    pub cpu_state: CpuState,
    pub format: KernelFormat,
    pub protocol: EntryProtocol,
    /// The kernel as loaded (for a bzImage, its protected-mode code).
    pub kernel: GuestRange,
    /// End of the memory that the kernel needs before it reads the memory map (for a
    /// bzImage, its runtime start plus `init_size`).
    pub kernel_required_end: u64,
    pub initrd: Option<GuestRange>,
    pub cmdline: GuestRange,
    pub zero_page: u64,
    /// The PVH start info, for the PVH entry.
    pub pvh_start_info: Option<u64>,
    pub rsdp: u64,
    pub mptable: u64,
    pub e820: Vec<E820Entry>,
    /// The version string of a bzImage (for example "6.1.0-28-cloud-amd64 (...)").
    pub kernel_version: Option<String>,
}

/// Errors raised while loading a Linux guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("kernel command line of {length} bytes exceeds this kernel's limit of {max} bytes: shorten --cmdline")]
    CmdlineTooLong { length: usize, max: usize },
    #[error("kernel command line contains a NUL byte at offset {offset}: remove it")]
    CmdlineNul { offset: usize },
    #[error("{role} file {path} not found: check the path, or run `monstervm guest fetch` to get a test kernel and initramfs")]
    FileNotFound { role: &'static str, path: PathBuf },
    #[error("failed to read {role} file {path}: {source}")]
    FileRead {
        role: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to write the {what} at guest address {address:#x}: {source}")]
    GuestMemory {
        what: &'static str,
        address: u64,
        #[source]
        source: GuestMemoryError,
    },
    #[error("initramfs {path} is {size} bytes, larger than the {memory_mib} MiB of guest memory: raise --memory or use a smaller initramfs")]
    InitrdTooLarge {
        path: PathBuf,
        size: u64,
        memory_mib: u64,
    },
    #[error("{path} is not a bootable Linux kernel: {source}; pass a bzImage (vmlinuz) or an ELF vmlinux")]
    InvalidKernel {
        path: PathBuf,
        #[source]
        source: ImageError,
    },
    #[error("failed to load kernel {path}: {source}")]
    KernelLoad {
        path: PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("guest memory of {memory_mib} MiB is too small for {what}, which needs about {required_mib} MiB: raise --memory")]
    MemoryTooSmall {
        what: &'static str,
        memory_mib: u64,
        required_mib: u64,
    },
    #[error("kernel {path} has no PVH entry ({reason}): use the 64-bit entry instead")]
    PvhUnavailable { path: PathBuf, reason: &'static str },
    #[error("{vcpus} vCPUs is out of range: give 1 to {MAX_VCPUS}")]
    VcpuCount { vcpus: u8 },
}

/// The kernel-specific limits that the rest of the loading follows.
struct KernelPlan {
    format: KernelFormat,
    header: setup_header,
    load: u64,
    size: u64,
    entry_64: u64,
    required_end: u64,
    initrd_addr_max: u64,
    cmdline_max: usize,
    version: Option<String>,
}

/// Loads the kernel, initramfs and boot structures described by `spec` into `memory` and
/// returns the entry state.
///
/// The checks run before anything is written: a missing or invalid file, a command line
/// over the kernel's limit, an initramfs larger than memory, or memory too small for the
/// kernel and initramfs together each return their own [`BootError`].
pub fn load_linux(memory: &GuestMemoryMmap, spec: &LinuxBootSpec) -> Result<LinuxBoot, BootError> {
    if spec.vcpus == 0 || spec.vcpus > MAX_VCPUS {
        return Err(BootError::VcpuCount { vcpus: spec.vcpus });
    }
    let ram: Vec<(u64, u64)> = memory
        .iter()
        .map(|region| (region.start_addr().raw_value(), region.len()))
        .collect();
    let memory_bytes: u64 = ram.iter().map(|&(_, size)| size).sum();
    let memory_mib = memory_bytes >> 20;
    let low_ram_end = ram
        .iter()
        .find(|&&(start, _)| start == 0)
        .map_or(0, |&(_, size)| size);

    let mut kernel_file = open("kernel", &spec.kernel)?;
    let plan = plan_kernel(&mut kernel_file, &spec.kernel)?;
    if plan.required_end > low_ram_end {
        return Err(BootError::MemoryTooSmall {
            what: "the kernel",
            memory_mib,
            required_mib: plan.required_end.div_ceil(1 << 20),
        });
    }

    let cmdline = spec.cmdline.as_bytes();
    if let Some(offset) = cmdline.iter().position(|&b| b == 0) {
        return Err(BootError::CmdlineNul { offset });
    }
    let cmdline_max = plan.cmdline_max.min(CMDLINE_MAX_SIZE as usize - 1);
    if cmdline.len() > cmdline_max {
        return Err(BootError::CmdlineTooLong {
            length: cmdline.len(),
            max: cmdline_max,
        });
    }

    let initrd = match &spec.initrd {
        Some(path) => Some(load_initrd(memory, path, &plan, low_ram_end, memory_mib)?),
        None => None,
    };

    let (kernel_range, pvh_entry) = load_kernel(memory, &mut kernel_file, spec, &plan)?;
    let protocol = choose_protocol(spec, plan.format, pvh_entry)?;

    let mut cmdline_bytes = cmdline.to_vec();
    cmdline_bytes.push(0);
    write(memory, "kernel command line", CMDLINE_START, &cmdline_bytes)?;

    let e820 = build_e820(&ram);
    let zero_page = zero_page(&plan, initrd, &e820);
    write(memory, "zero page", ZERO_PAGE_START, zero_page.as_slice())?;

    let acpi = build_acpi_tables(
        ACPI_START,
        &AcpiConfig {
            vcpus: spec.vcpus,
            pci_host_bridge: spec.pci_host_bridge,
        },
    );
    debug_assert!(acpi.bytes.len() as u64 <= ACPI_END - ACPI_START);
    write(memory, "ACPI tables", ACPI_START, &acpi.bytes)?;

    let mptable = build_mptable(MPTABLE_START, spec.vcpus);
    debug_assert!(mptable.len() as u64 <= MPTABLE_END - MPTABLE_START);
    write(memory, "MP table", MPTABLE_START, &mptable)?;

    let (cpu_state, pvh_start_info) = match protocol {
        EntryProtocol::Linux64 => {
            write_boot_gdt(memory, CodeMode::Long)?;
            write_identity_page_tables(memory).map_err(|source| BootError::GuestMemory {
                what: "page tables",
                address: super::layout::PML4_START,
                source,
            })?;
            (long_mode_state(plan.entry_64, ZERO_PAGE_START), None)
        }
        EntryProtocol::Pvh => {
            write_boot_gdt(memory, CodeMode::Protected32)?;
            let pvh = build_start_info(
                CMDLINE_START,
                acpi.rsdp,
                initrd.map(|r| (r.address, r.size)),
                &e820,
            );
            for (what, (address, bytes)) in [
                ("PVH start info", &pvh.start_info),
                ("PVH module list", &pvh.modlist),
                ("PVH memory map", &pvh.memmap),
            ] {
                write(memory, what, *address, bytes)?;
            }
            let entry = pvh_entry.expect("choose_protocol returns Pvh only with an entry");
            (pvh_state(entry, PVH_INFO_START), Some(PVH_INFO_START))
        }
    };

    tracing::info!(
        kernel = %spec.kernel.display(),
        format = ?plan.format,
        protocol = ?protocol,
        version = plan.version.as_deref().unwrap_or("unknown"),
        entry = format_args!("{:#x}", cpu_state.rip),
        initrd = ?initrd,
        "loaded Linux kernel"
    );

    Ok(LinuxBoot {
        cpu_state,
        format: plan.format,
        protocol,
        kernel: kernel_range,
        kernel_required_end: plan.required_end,
        initrd,
        cmdline: GuestRange {
            address: CMDLINE_START,
            size: cmdline_bytes.len() as u64,
        },
        zero_page: ZERO_PAGE_START,
        pvh_start_info,
        rsdp: acpi.rsdp,
        mptable: MPTABLE_START,
        e820,
        kernel_version: plan.version,
    })
}

fn open(role: &'static str, path: &Path) -> Result<File, BootError> {
    File::open(path).map_err(|source| match source.kind() {
        ErrorKind::NotFound => BootError::FileNotFound {
            role,
            path: path.to_path_buf(),
        },
        _ => BootError::FileRead {
            role,
            path: path.to_path_buf(),
            source,
        },
    })
}

fn write_boot_gdt(memory: &GuestMemoryMmap, mode: CodeMode) -> Result<(), BootError> {
    write_gdt(memory, mode).map_err(|source| BootError::GuestMemory {
        what: "GDT",
        address: super::layout::GDT_START,
        source,
    })
}

fn write(
    memory: &GuestMemoryMmap,
    what: &'static str,
    address: u64,
    bytes: &[u8],
) -> Result<(), BootError> {
    memory
        .write_slice(bytes, GuestAddress(address))
        .map_err(|source| BootError::GuestMemory {
            what,
            address,
            source,
        })
}

/// Classifies the kernel and works out where it goes and what limits it sets.
fn plan_kernel(file: &mut File, path: &Path) -> Result<KernelPlan, BootError> {
    let image = probe(file)
        .map_err(|source| BootError::FileRead {
            role: "kernel",
            path: path.to_path_buf(),
            source,
        })?
        .map_err(|source| BootError::InvalidKernel {
            path: path.to_path_buf(),
            source,
        })?;

    match image {
        KernelImage::BzImage(info) => {
            let header = info.header;
            // The protected-mode code always loads at 1 MiB; a relocatable kernel then
            // decompresses itself to its preferred address, and needs init_size bytes there.
            let load = HIGH_MEMORY_START;
            let runtime_start = load.max(header.pref_address);
            let required_end =
                (load + info.payload_size).max(runtime_start + u64::from(header.init_size));
            Ok(KernelPlan {
                format: KernelFormat::BzImage,
                header,
                load,
                size: info.payload_size,
                entry_64: load + ENTRY_64_OFFSET,
                required_end,
                initrd_addr_max: u64::from(header.initrd_addr_max),
                cmdline_max: header.cmdline_size as usize,
                version: info.version,
            })
        }
        KernelImage::Elf(info) => {
            if info.start < HIGH_MEMORY_START {
                return Err(BootError::InvalidKernel {
                    path: path.to_path_buf(),
                    source: ImageError::UnsupportedElf {
                        reason: format!(
                            "a segment loads at {:#x}, below 1 MiB where the boot structures are",
                            info.start
                        ),
                    },
                });
            }
            let header = setup_header {
                boot_flag: BOOT_FLAG,
                header: SETUP_HEADER_MAGIC,
                kernel_alignment: DEFAULT_KERNEL_ALIGNMENT,
                cmdline_size: DEFAULT_CMDLINE_MAX as u32,
                ..setup_header::default()
            };
            Ok(KernelPlan {
                format: KernelFormat::Elf,
                header,
                load: info.start,
                size: info.end - info.start,
                entry_64: info.entry,
                required_end: info.end,
                initrd_addr_max: DEFAULT_INITRD_ADDR_MAX,
                cmdline_max: DEFAULT_CMDLINE_MAX,
                version: None,
            })
        }
    }
}

/// Places the initramfs as high as the kernel allows, page-aligned, and copies it in.
fn load_initrd(
    memory: &GuestMemoryMmap,
    path: &Path,
    plan: &KernelPlan,
    low_ram_end: u64,
    memory_mib: u64,
) -> Result<GuestRange, BootError> {
    let mut file = open("initramfs", path)?;
    let read_error = |source| BootError::FileRead {
        role: "initramfs",
        path: path.to_path_buf(),
        source,
    };
    let size = file.metadata().map_err(read_error)?.len();
    if size > memory_mib << 20 {
        return Err(BootError::InitrdTooLarge {
            path: path.to_path_buf(),
            size,
            memory_mib,
        });
    }

    let top = low_ram_end.min(plan.initrd_addr_max.saturating_add(1));
    let address = top.checked_sub(size).map(|a| a & !(INITRD_ALIGNMENT - 1));
    let Some(address) = address.filter(|&a| a >= plan.required_end) else {
        return Err(BootError::MemoryTooSmall {
            what: "the kernel and initramfs together",
            memory_mib,
            required_mib: (plan.required_end + size + INITRD_ALIGNMENT).div_ceil(1 << 20),
        });
    };

    memory
        .read_exact_volatile_from(GuestAddress(address), &mut file, size as usize)
        .map_err(|source| match source {
            GuestMemoryError::IOError(io) => read_error(io),
            source => BootError::GuestMemory {
                what: "initramfs",
                address,
                source,
            },
        })?;
    Ok(GuestRange { address, size })
}

/// Copies the kernel with linux-loader and returns its range and PVH entry, if any.
fn load_kernel(
    memory: &GuestMemoryMmap,
    file: &mut File,
    spec: &LinuxBootSpec,
    plan: &KernelPlan,
) -> Result<(GuestRange, Option<u64>), BootError> {
    let load_error = |source| BootError::KernelLoad {
        path: spec.kernel.clone(),
        source,
    };
    let high = Some(GuestAddress(HIGH_MEMORY_START));
    let pvh = match plan.format {
        KernelFormat::BzImage => {
            BzImage::load(memory, Some(GuestAddress(plan.load)), file, high).map_err(load_error)?;
            None
        }
        KernelFormat::Elf => {
            let result = Elf::load(memory, None, file, high).map_err(load_error)?;
            match result.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(address) => Some(address.raw_value()),
                _ => None,
            }
        }
    };
    let range = GuestRange {
        address: plan.load,
        size: plan.size,
    };
    Ok((range, pvh))
}

fn choose_protocol(
    spec: &LinuxBootSpec,
    format: KernelFormat,
    pvh_entry: Option<u64>,
) -> Result<EntryProtocol, BootError> {
    match spec.entry {
        EntryPreference::Auto | EntryPreference::Linux64 => Ok(EntryProtocol::Linux64),
        EntryPreference::Pvh if format == KernelFormat::BzImage => Err(BootError::PvhUnavailable {
            path: spec.kernel.clone(),
            reason: "a bzImage has no PVH entry; pass the ELF vmlinux",
        }),
        EntryPreference::Pvh if pvh_entry.is_none() => Err(BootError::PvhUnavailable {
            path: spec.kernel.clone(),
            reason: "no XEN_ELFNOTE_PHYS32_ENTRY note; the kernel was built without CONFIG_PVH",
        }),
        EntryPreference::Pvh => Ok(EntryProtocol::Pvh),
    }
}

/// Builds `struct boot_params`: the kernel's setup header with the loader's fields set,
/// the command line pointer, the initramfs, the RSDP address and the e820 map.
fn zero_page(plan: &KernelPlan, initrd: Option<GuestRange>, e820: &[E820Entry]) -> boot_params {
    let mut params = boot_params {
        hdr: plan.header,
        ..boot_params::default()
    };
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.code32_start = plan.load as u32;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.ext_cmd_line_ptr = (CMDLINE_START >> 32) as u32;
    if let Some(range) = initrd {
        params.hdr.ramdisk_image = range.address as u32;
        params.hdr.ramdisk_size = range.size as u32;
        params.ext_ramdisk_image = (range.address >> 32) as u32;
        params.ext_ramdisk_size = (range.size >> 32) as u32;
    }
    params.acpi_rsdp_addr = ACPI_START;

    for (slot, entry) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind,
        };
    }
    params.e820_entries = e820.len().min(params.e820_table.len()) as u8;
    params
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::boot::e820::{E820_RAM, E820_RESERVED};
    use crate::core::boot::image::tests::fake_bzimage;
    use crate::core::boot::layout::RESERVED_LOW_START;
    use crate::core::memory::create_guest_memory;
    use std::process::Command;

    const MIB: u64 = 1 << 20;

    struct Files {
        dir: tempfile::TempDir,
    }

    impl Files {
        fn new() -> Self {
            Files {
                dir: tempfile::tempdir().unwrap(),
            }
        }

        fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
            let path = self.dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            path
        }
    }

    fn bz_spec(files: &Files) -> LinuxBootSpec {
        let payload: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
        let kernel = files.write("vmlinuz", &fake_bzimage(&payload));
        let initrd = files.write("initrd", &[0xab; 5000]);
        LinuxBootSpec {
            initrd: Some(initrd),
            cmdline: "console=ttyS0 panic=-1".to_string(),
            vcpus: 2,
            ..LinuxBootSpec::new(kernel)
        }
    }

    /// Loads `spec` into `memory_mib` MiB of guest memory and returns the error it must raise.
    fn load_error(spec: &LinuxBootSpec, memory_mib: u64) -> BootError {
        let memory = create_guest_memory(memory_mib).unwrap();
        match load_linux(&memory, spec) {
            Ok(_) => panic!("loading {} succeeded", spec.kernel.display()),
            Err(error) => error,
        }
    }

    fn read_params(memory: &GuestMemoryMmap) -> boot_params {
        memory.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap()
    }

    #[test]
    fn bzimage_boot_state() {
        let files = Files::new();
        let memory = create_guest_memory(64).unwrap();
        let boot = load_linux(&memory, &bz_spec(&files)).unwrap();

        assert_eq!(boot.format, KernelFormat::BzImage);
        assert_eq!(boot.protocol, EntryProtocol::Linux64);
        assert_eq!(boot.cpu_state.rip, 0x10_0200);
        assert_eq!(boot.cpu_state.gprs[6], ZERO_PAGE_START);
        assert_eq!(boot.cpu_state.cs.selector, 0x10);
        assert_eq!(boot.cpu_state.ds.selector, 0x18);
        assert_eq!(boot.kernel_version.as_deref(), Some("6.1.0-test"));
        assert_eq!(boot.kernel.address, 0x10_0000);
        // pref_address 16 MiB + init_size 4 MiB.
        assert_eq!(boot.kernel_required_end, 20 * MIB);

        let loaded: u32 = memory.read_obj(GuestAddress(0x10_0000 + 0x104)).unwrap();
        assert_eq!(loaded, u32::from_le_bytes([4, 5, 6, 7]));
    }

    #[test]
    fn bzimage_zero_page_fields() {
        let files = Files::new();
        let memory = create_guest_memory(64).unwrap();
        let boot = load_linux(&memory, &bz_spec(&files)).unwrap();
        let params = read_params(&memory);

        assert_eq!({ params.hdr.header }, SETUP_HEADER_MAGIC);
        assert_eq!({ params.hdr.version }, 0x020f);
        assert_eq!({ params.hdr.type_of_loader }, 0xff);
        assert_eq!({ params.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ params.hdr.cmdline_size }, 2047);
        assert_eq!({ params.hdr.code32_start }, 0x10_0000);
        assert_eq!({ params.hdr.ramdisk_size }, 5000);
        assert_eq!(
            { params.hdr.ramdisk_image } as u64,
            boot.initrd.unwrap().address
        );
        assert_eq!({ params.ext_ramdisk_image }, 0);
        assert_eq!({ params.acpi_rsdp_addr }, ACPI_START);
        assert_eq!(params.e820_entries, 3);
        let e820 = params.e820_table;
        assert_eq!(
            ({ e820[0].addr }, { e820[0].size }),
            (0, RESERVED_LOW_START)
        );
        assert_eq!({ e820[0].r#type }, E820_RAM);
        assert_eq!({ e820[1].r#type }, E820_RESERVED);
        assert_eq!({ e820[2].addr }, HIGH_MEMORY_START);
        assert_eq!({ e820[2].addr } + { e820[2].size }, 64 * MIB);
    }

    #[test]
    fn initrd_placed_high_and_aligned() {
        let files = Files::new();
        let memory = create_guest_memory(64).unwrap();
        let boot = load_linux(&memory, &bz_spec(&files)).unwrap();

        let initrd = boot.initrd.unwrap();
        assert_eq!(initrd.size, 5000);
        assert_eq!(initrd.address % INITRD_ALIGNMENT, 0);
        assert!(initrd.address + initrd.size <= 64 * MIB);
        assert!(initrd.address + initrd.size + INITRD_ALIGNMENT > 64 * MIB);
        let byte: u8 = memory
            .read_obj(GuestAddress(initrd.address + 4999))
            .unwrap();
        assert_eq!(byte, 0xab);
    }

    #[test]
    fn initrd_respects_initrd_addr_max() {
        let files = Files::new();
        let mut image = fake_bzimage(&[0x90; 64]);
        image[0x22c..0x230].copy_from_slice(&(32 * MIB as u32 - 1).to_le_bytes());
        let spec = LinuxBootSpec {
            initrd: Some(files.write("initrd", &[1; 100])),
            ..LinuxBootSpec::new(files.write("vmlinuz", &image))
        };
        let memory = create_guest_memory(64).unwrap();
        let initrd = load_linux(&memory, &spec).unwrap().initrd.unwrap();
        assert!(initrd.address + initrd.size <= 32 * MIB);
        assert!(initrd.address >= 32 * MIB - INITRD_ALIGNMENT - 100);
    }

    #[test]
    fn cmdline_written_with_nul() {
        let files = Files::new();
        let memory = create_guest_memory(64).unwrap();
        let spec = bz_spec(&files);
        load_linux(&memory, &spec).unwrap();

        let mut bytes = vec![0u8; spec.cmdline.len() + 1];
        memory
            .read_slice(&mut bytes, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&bytes[..spec.cmdline.len()], spec.cmdline.as_bytes());
        assert_eq!(bytes[spec.cmdline.len()], 0);
    }

    #[test]
    fn tables_written_with_valid_checksums() {
        let files = Files::new();
        let memory = create_guest_memory(64).unwrap();
        let boot = load_linux(&memory, &bz_spec(&files)).unwrap();

        let mut rsdp = [0u8; 36];
        memory
            .read_slice(&mut rsdp, GuestAddress(boot.rsdp))
            .unwrap();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(rsdp.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);

        let mut floating = [0u8; 16];
        memory
            .read_slice(&mut floating, GuestAddress(boot.mptable))
            .unwrap();
        assert_eq!(&floating[..4], b"_MP_");
        assert_eq!(floating.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        // Two processors are listed: the second processor entry has APIC ID 1.
        let mut second_cpu = [0u8; 2];
        memory
            .read_slice(&mut second_cpu, GuestAddress(boot.mptable + 16 + 44 + 20))
            .unwrap();
        assert_eq!(second_cpu, [0, 1]);
    }

    #[test]
    fn missing_kernel_is_reported() {
        let memory = create_guest_memory(16).unwrap();
        let spec = LinuxBootSpec::new("/nonexistent/vmlinuz");
        let err = load_linux(&memory, &spec).unwrap_err();
        assert!(
            matches!(err, BootError::FileNotFound { role: "kernel", .. }),
            "{err}"
        );
        assert!(err.to_string().contains("/nonexistent/vmlinuz"));
    }

    #[test]
    fn missing_initrd_is_reported() {
        let files = Files::new();
        let spec = LinuxBootSpec {
            initrd: Some("/nonexistent/initrd".into()),
            ..bz_spec(&files)
        };
        let err = load_error(&spec, 64);
        assert!(
            matches!(
                err,
                BootError::FileNotFound {
                    role: "initramfs",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn non_kernel_is_rejected() {
        let files = Files::new();
        let spec = LinuxBootSpec::new(files.write("notes.txt", b"just some text\n"));
        let err = load_error(&spec, 16);
        assert!(
            matches!(
                err,
                BootError::InvalidKernel {
                    source: ImageError::NotAKernel,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("notes.txt"));
    }

    #[test]
    fn oversized_initrd_is_rejected() {
        let files = Files::new();
        let initrd = files.dir.path().join("big");
        let file = File::create(&initrd).unwrap();
        file.set_len(65 * MIB).unwrap();
        let spec = LinuxBootSpec {
            initrd: Some(initrd),
            ..bz_spec(&files)
        };
        let err = load_error(&spec, 64);
        assert!(
            matches!(err, BootError::InitrdTooLarge { size, memory_mib: 64, .. } if size == 65 * MIB),
            "{err}"
        );
    }

    #[test]
    fn initrd_that_overlaps_kernel_is_rejected() {
        let files = Files::new();
        let initrd = files.dir.path().join("big");
        File::create(&initrd).unwrap().set_len(50 * MIB).unwrap();
        let spec = LinuxBootSpec {
            initrd: Some(initrd),
            ..bz_spec(&files)
        };
        let err = load_error(&spec, 64);
        assert!(
            matches!(
                err,
                BootError::MemoryTooSmall {
                    what: "the kernel and initramfs together",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn long_cmdline_is_rejected() {
        let files = Files::new();
        let spec = LinuxBootSpec {
            cmdline: "x".repeat(2048),
            ..bz_spec(&files)
        };
        let err = load_error(&spec, 64);
        assert!(
            matches!(
                err,
                BootError::CmdlineTooLong {
                    length: 2048,
                    max: 2047
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn cmdline_with_nul_is_rejected() {
        let files = Files::new();
        let spec = LinuxBootSpec {
            cmdline: "a\0b".to_string(),
            ..bz_spec(&files)
        };
        let err = load_error(&spec, 64);
        assert!(matches!(err, BootError::CmdlineNul { offset: 1 }), "{err}");
    }

    #[test]
    fn small_memory_is_rejected() {
        let files = Files::new();
        let spec = bz_spec(&files);
        // The kernel needs 20 MiB: 16 MiB preferred address plus 4 MiB init_size.
        let err = load_error(&spec, 16);
        assert!(
            matches!(
                err,
                BootError::MemoryTooSmall {
                    what: "the kernel",
                    memory_mib: 16,
                    required_mib: 20
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn pvh_needs_elf() {
        let files = Files::new();
        let spec = LinuxBootSpec {
            entry: EntryPreference::Pvh,
            ..bz_spec(&files)
        };
        let err = load_error(&spec, 64);
        assert!(matches!(err, BootError::PvhUnavailable { .. }), "{err}");
    }

    #[test]
    fn vcpu_count_is_checked() {
        let files = Files::new();
        let spec = LinuxBootSpec {
            vcpus: 0,
            ..bz_spec(&files)
        };
        let memory = create_guest_memory(64).unwrap();
        assert!(matches!(
            load_linux(&memory, &spec),
            Err(BootError::VcpuCount { vcpus: 0 })
        ));
    }

    /// NASM source of a minimal ELF64 kernel at 16 MiB: one PT_LOAD segment with 8 KiB
    /// of BSS, and a PT_NOTE with the Xen PVH entry note when `pvh_note` is set.
    fn elf_kernel_source(pvh_note: bool) -> String {
        let (phnum, note) = if pvh_note {
            (
                2,
                "  dd 4, 4\n  dq note - ehdr, note, note, note_end - note, note_end - note, 4\n",
            )
        } else {
            (1, "")
        };
        format!(
            "BITS 64\n\
             org 0x1000000\n\
             ehdr:\n\
             \x20 db 0x7f, 'ELF', 2, 1, 1, 0\n\
             \x20 times 8 db 0\n\
             \x20 dw 2, 62\n\
             \x20 dd 1\n\
             \x20 dq entry64, phdrs - ehdr, 0\n\
             \x20 dd 0\n\
             \x20 dw 64, 56, {phnum}, 64, 0, 0\n\
             phdrs:\n\
             \x20 dd 1, 5\n\
             \x20 dq 0, 0x1000000, 0x1000000, file_end - ehdr, file_end - ehdr + 0x2000, 0x1000\n\
             {note}\
             note:\n\
             \x20 dd 4, 4, 18\n\
             \x20 db 'Xen', 0\n\
             \x20 dd pvh_entry\n\
             note_end:\n\
             entry64:\n\
             \x20 hlt\n\
             pvh_entry:\n\
             \x20 hlt\n\
             file_end:\n"
        )
    }

    /// Assembles an ELF kernel with NASM, or returns `None` (after saying why) where NASM
    /// is not installed.
    fn assemble_elf_kernel(files: &Files, pvh_note: bool) -> Option<PathBuf> {
        let source = files.write("kernel.asm", elf_kernel_source(pvh_note).as_bytes());
        let output = files.dir.path().join("vmlinux");
        let status = match Command::new("nasm")
            .arg("-f")
            .arg("bin")
            .arg("-o")
            .arg(&output)
            .arg(&source)
            .status()
        {
            Ok(status) => status,
            Err(e) => {
                eprintln!(
                    "skipping: nasm is not available ({e}); install it with apt-get install nasm"
                );
                return None;
            }
        };
        assert!(status.success(), "nasm failed on the test kernel");
        Some(output)
    }

    #[test]
    fn elf_kernel_64bit_entry() {
        let files = Files::new();
        let Some(kernel) = assemble_elf_kernel(&files, true) else {
            return;
        };
        let memory = create_guest_memory(64).unwrap();
        let boot = load_linux(&memory, &LinuxBootSpec::new(&kernel)).unwrap();

        assert_eq!(boot.format, KernelFormat::Elf);
        assert_eq!(boot.protocol, EntryProtocol::Linux64);
        // entry64 follows the 64-byte header, 2 program headers and the 20-byte note.
        let entry64 = 0x100_0000 + 64 + 2 * 56 + 20;
        assert_eq!(boot.cpu_state.rip, entry64);
        assert!(boot.cpu_state.cs.l);
        assert_eq!(boot.kernel_required_end, entry64 + 2 + 0x2000);
        let hlt: u8 = memory.read_obj(GuestAddress(entry64)).unwrap();
        assert_eq!(hlt, 0xf4);

        let params = read_params(&memory);
        assert_eq!({ params.hdr.header }, SETUP_HEADER_MAGIC);
        assert_eq!({ params.hdr.boot_flag }, 0xaa55);
        assert_eq!({ params.hdr.type_of_loader }, 0xff);
    }

    #[test]
    fn elf_kernel_pvh_entry() {
        let files = Files::new();
        let Some(kernel) = assemble_elf_kernel(&files, true) else {
            return;
        };
        let initrd = files.write("initrd", &[7; 300]);
        let spec = LinuxBootSpec {
            initrd: Some(initrd),
            cmdline: "console=ttyS0".to_string(),
            entry: EntryPreference::Pvh,
            ..LinuxBootSpec::new(&kernel)
        };
        let memory = create_guest_memory(64).unwrap();
        let boot = load_linux(&memory, &spec).unwrap();

        assert_eq!(boot.protocol, EntryProtocol::Pvh);
        let pvh_entry = 0x100_0000 + 64 + 2 * 56 + 20 + 1;
        assert_eq!(boot.cpu_state.rip, pvh_entry);
        assert_eq!(boot.cpu_state.gprs[3], PVH_INFO_START);
        assert!(!boot.cpu_state.cs.l);
        assert!(boot.cpu_state.cs.db);

        let magic: u32 = memory.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(magic, super::super::pvh::START_INFO_MAGIC);
        let modules: u32 = memory.read_obj(GuestAddress(PVH_INFO_START + 12)).unwrap();
        assert_eq!(modules, 1);
        let cmdline: u64 = memory.read_obj(GuestAddress(PVH_INFO_START + 24)).unwrap();
        assert_eq!(cmdline, CMDLINE_START);
        let module_size: u64 = memory
            .read_obj(GuestAddress(super::super::layout::PVH_MODLIST_START + 8))
            .unwrap();
        assert_eq!(module_size, 300);
    }

    #[test]
    fn elf_without_note_has_no_pvh() {
        let files = Files::new();
        let Some(kernel) = assemble_elf_kernel(&files, false) else {
            return;
        };
        let spec = LinuxBootSpec {
            entry: EntryPreference::Pvh,
            ..LinuxBootSpec::new(&kernel)
        };
        let err = load_error(&spec, 64);
        assert!(matches!(err, BootError::PvhUnavailable { .. }), "{err}");
    }

    #[test]
    fn spec_from_config() {
        let config = VmConfig {
            kernel: Some("k".into()),
            initrd: Some("i".into()),
            vcpus: 3,
            ..VmConfig::default()
        };
        let spec = LinuxBootSpec::from_config(&config).unwrap();
        assert_eq!(spec.kernel, PathBuf::from("k"));
        assert_eq!(spec.initrd, Some(PathBuf::from("i")));
        assert_eq!(spec.cmdline, crate::utils::config::default_cmdline());
        assert_eq!(spec.vcpus, 3);
        assert!(LinuxBootSpec::from_config(&VmConfig::default()).is_none());
    }
}
