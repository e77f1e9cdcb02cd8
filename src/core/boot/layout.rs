//! Fixed guest-physical addresses of the structures that the boot loader writes.
//!
//! ```text
//! 0x0000_0500  GDT (5 descriptors)
//! 0x0000_6000  PVH start info, module list and memory map (PVH entry only)
//! 0x0000_7000  zero page (struct boot_params)
//! 0x0000_8ff0  initial stack pointer, growing down
//! 0x0000_9000  PML4, then the PDPT at 0xa000 and four page directories at 0xb000-0xefff
//! 0x0002_0000  kernel command line (up to 64 KiB)
//! 0x0009_fc00  start of the reserved area: EBDA, VGA window, BIOS ROM
//! 0x000e_0000  ACPI tables, RSDP first (reserved area)
//! 0x000f_0000  MP floating pointer and configuration table (reserved area)
//! 0x0010_0000  bzImage protected-mode code (its code32_start); ELF kernels load at p_paddr
//! ...          initramfs at the top of RAM below 4 GiB and below initrd_addr_max
//! ```
//!
//! Everything below 1 MiB except the reserved area is ordinary RAM in the e820 map: the
//! kernel reserves what it needs from the zero page and the tables it parses.

/// GDT with the null, boot code (0x10), boot data (0x18) and TSS (0x20) descriptors.
pub const GDT_START: u64 = 0x500;
/// PVH `hvm_start_info` structure.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list: one entry, the initramfs.
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map, the e820 map in `hvm_memmap_table_entry` form.
pub const PVH_MEMMAP_START: u64 = 0x6080;
/// End of the page that holds the PVH structures.
pub const PVH_END: u64 = 0x7000;
/// Zero page (`struct boot_params`, 4 KiB).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial RSP for the 64-bit entry; the kernel switches to its own stack at once.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Level-4 page table of the identity map.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table of the identity map.
pub const PDPT_START: u64 = 0xa000;
/// First of the four page directories that map the low 4 GiB with 2 MiB pages.
pub const PD_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Space reserved for the command line, including its NUL terminator.
pub const CMDLINE_MAX_SIZE: u64 = 0x1_0000;
/// Start of the range that the e820 map reports as reserved (EBDA and BIOS area).
pub const RESERVED_LOW_START: u64 = 0x9_fc00;
/// End of the reserved low range: the first byte of high memory.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
/// ACPI RSDP; Linux scans 0xe0000-0xfffff for it when the zero page does not give it.
pub const ACPI_START: u64 = 0xe_0000;
/// End of the space for the ACPI tables.
pub const ACPI_END: u64 = 0xf_0000;
/// MP floating pointer, followed by the MP configuration table; Linux scans
/// 0xf0000-0xfffff for it.
pub const MPTABLE_START: u64 = 0xf_0000;
/// End of the space for the MP table.
pub const MPTABLE_END: u64 = 0x10_0000;
/// Alignment of the initramfs start, one page as the boot protocol asks.
pub const INITRD_ALIGNMENT: u64 = 0x1000;
