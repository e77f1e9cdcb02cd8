//! Attaching a VM's disks: each [`DiskConfig`] becomes a virtio-blk device on the
//! virtio-pci transport, with its BAR in the 32-bit MMIO hole and an INTx line.

use std::sync::{Arc, Mutex};

use vm_memory::GuestMemoryMmap;

use crate::core::cpu::CodeWatch;
use crate::core::devices::pci::{PciError, PciRoot};
use crate::core::devices::virtio::block::VirtioBlock;
use crate::core::devices::virtio::pci::{VirtioPciDevice, BAR_SIZE};
use crate::core::devices::virtio::DmaWriteHook;
use crate::core::memory::{IOAPIC_BASE, MMIO_HOLE_START};
use crate::hypervisor::IrqChip;
use crate::storage::{open_image, BackingPolicy, ImageFormat, Locking, OpenOptions, StorageError};
use crate::utils::config::{DiskBacking, DiskConfig, DiskFormat, DiskLocking};

/// ISA IRQs that no platform device uses, handed out in turn as INTx lines and written to
/// each function's Interrupt Line register.
///
/// NOTE: the DSDT has no _PRT, so Linux 6.1 logs "PCI INT A: no GSI" and virtio-pci runs
/// on MSI-X alone. INTx works only for a guest that trusts the Interrupt Line register,
/// and a fourth disk shares a line with the first, which either device's ISR read lowers.
const INTX_GSIS: [u32; 3] = [5, 10, 11];

/// Errors raised while attaching disks.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("failed to open disk image {path}")]
    Open {
        path: String,
        #[source]
        source: StorageError,
    },
    #[error(
        "no room for the BAR of disk {path} in the MMIO hole {MMIO_HOLE_START:#x}-{IOAPIC_BASE:#x}: attach fewer disks"
    )]
    NoBarSpace { path: String },
    #[error(transparent)]
    Pci(#[from] PciError),
}

/// Hands out naturally aligned, non-overlapping memory BARs from the MMIO hole below the
/// IOAPIC.
#[derive(Debug)]
pub struct BarAllocator {
    next: u64,
    end: u64,
}

impl BarAllocator {
    /// Creates an allocator for the whole 32-bit MMIO hole.
    pub fn new() -> Self {
        BarAllocator {
            next: MMIO_HOLE_START,
            end: IOAPIC_BASE,
        }
    }

    /// Returns the address of a free BAR of `size` bytes (a power of two), aligned to its
    /// size as the PCI specification requires, or `None` when the hole is full.
    pub fn allocate(&mut self, size: u64) -> Option<u64> {
        debug_assert!(size.is_power_of_two());
        let start = self.next.checked_next_multiple_of(size)?;
        let end = start.checked_add(size)?;
        if end > self.end {
            return None;
        }
        self.next = end;
        Some(start)
    }
}

impl Default for BarAllocator {
    fn default() -> Self {
        Self::new()
    }
}

/// Opens every disk of `disks` and adds it to `root` as a virtio-blk PCI function.
///
/// `code_watch` is the emulator's decoded-code tracker, which every device DMA write must
/// reach; it is `None` on backends that decode nothing themselves.
pub fn attach_disks(
    disks: &[DiskConfig],
    memory: &GuestMemoryMmap,
    irq_chip: &Arc<dyn IrqChip>,
    code_watch: Option<&Arc<CodeWatch>>,
    root: &mut PciRoot,
) -> Result<(), DiskError> {
    let mut bars = BarAllocator::new();
    for (index, disk) in disks.iter().enumerate() {
        let path = disk.path.display().to_string();
        let options = OpenOptions {
            read_only: disk.read_only,
            format: match disk.format {
                DiskFormat::Auto => None,
                DiskFormat::Raw => Some(ImageFormat::Raw),
                DiskFormat::Qcow2 => Some(ImageFormat::Qcow2),
            },
            backing: match disk.backing {
                DiskBacking::Allow => BackingPolicy::Allow,
                DiskBacking::Deny => BackingPolicy::Deny,
            },
            locking: match disk.locking {
                DiskLocking::On => Locking::On,
                DiskLocking::Off => Locking::Off,
            },
        };
        let image = open_image(&disk.path, &options).map_err(|source| DiskError::Open {
            path: path.clone(),
            source,
        })?;

        let name = format!("disk{index}");
        let serial = disk.serial.clone().unwrap_or_else(|| name.clone());
        let mut block = VirtioBlock::new(&name, Arc::from(image), disk.read_only, &serial);
        if let Some(watch) = code_watch {
            let watch = watch.clone();
            let hook: DmaWriteHook = Arc::new(move |gpa, len| watch.invalidate(gpa, len));
            block.set_dma_write_hook(hook);
        }

        let bar = bars
            .allocate(BAR_SIZE)
            .ok_or_else(|| DiskError::NoBarSpace { path: path.clone() })?;
        let gsi = INTX_GSIS[index % INTX_GSIS.len()];
        let device = VirtioPciDevice::new(
            &name,
            Box::new(block),
            memory.clone(),
            irq_chip.clone(),
            bar,
            gsi,
        );
        let slot = root.add(&name, Arc::new(Mutex::new(device)))?;
        tracing::info!(
            disk = %name,
            path = %path,
            read_only = disk.read_only,
            slot,
            bar = format_args!("{bar:#x}"),
            gsi,
            "virtio-blk disk attached"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::vm::builder::{build_vm, BuildError};
    use crate::hypervisor::{BackendChoice, IoHandler};
    use crate::utils::config::VmConfig;

    fn emulator_config(disks: Vec<DiskConfig>) -> VmConfig {
        VmConfig {
            memory_mib: 16,
            backend: BackendChoice::Emulator,
            disks,
            ..VmConfig::default()
        }
    }

    /// Reads PCI config register `register` of bus 0 `slot` through ports 0xCF8/0xCFC.
    fn pci_config_read(io: &dyn IoHandler, slot: u32, register: u32) -> u32 {
        io.pio_write(
            0xcf8,
            &(0x8000_0000 | slot << 11 | register << 2).to_le_bytes(),
        );
        let mut data = [0u8; 4];
        io.pio_read(0xcfc, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn built_vm_shows_disks_as_virtio_blk_functions() {
        let dir = tempfile::tempdir().unwrap();
        let mut disks = Vec::new();
        for name in ["a.img", "b.img"] {
            let path = dir.path().join(name);
            std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
            disks.push(DiskConfig::new(path));
        }
        let built = build_vm(&emulator_config(disks), Box::new(std::io::sink())).unwrap();
        let io = built.vm.io().clone();

        let mut bars = Vec::new();
        for slot in [1, 2] {
            // Vendor 0x1af4, modern virtio-blk device ID 0x1040 + 2.
            assert_eq!(pci_config_read(&*io, slot, 0), 0x1042_1af4, "slot {slot}");
            bars.push(pci_config_read(&*io, slot, 4) & !0xf);
        }
        assert_eq!(pci_config_read(&*io, 3, 0), u32::MAX);
        assert_ne!(bars[0], bars[1]);
        assert!(
            u64::from(bars[0].abs_diff(bars[1])) >= BAR_SIZE,
            "{bars:x?}"
        );
    }

    #[test]
    fn missing_disk_image_names_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.qcow2");
        let error = match build_vm(
            &emulator_config(vec![DiskConfig::new(&path)]),
            Box::new(std::io::sink()),
        ) {
            Ok(_) => panic!("a missing disk image must fail the build"),
            Err(error) => error,
        };
        assert!(
            matches!(error, BuildError::Disk(DiskError::Open { .. })),
            "{error:?}"
        );
        assert!(error.to_string().contains("absent.qcow2"), "{error}");
    }

    #[test]
    fn untrusted_overlay_with_backing_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.img");
        std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
        let overlay = dir.path().join("overlay.qcow2");
        let status = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&base)
            .arg(&overlay)
            .status();
        match status {
            Ok(status) => assert!(status.success(), "qemu-img create failed"),
            Err(e) => {
                eprintln!("skipping: qemu-img is not available ({e}); install qemu-utils");
                return;
            }
        }
        let mut disk = DiskConfig::new(&overlay);
        disk.backing = DiskBacking::Deny;
        let error = match build_vm(&emulator_config(vec![disk]), Box::new(std::io::sink())) {
            Ok(_) => panic!("backing=deny must reject an overlay"),
            Err(error) => error,
        };
        let chain = format!("{:#}", anyhow::Error::from(error));
        assert!(chain.contains("overlay.qcow2"), "{chain}");
        assert!(chain.contains("backing=deny"), "{chain}");
    }

    #[test]
    fn bars_are_aligned_and_disjoint() {
        let mut bars = BarAllocator::new();
        let first = bars.allocate(BAR_SIZE).unwrap();
        let small = bars.allocate(0x1000).unwrap();
        let second = bars.allocate(BAR_SIZE).unwrap();

        assert_eq!(first, MMIO_HOLE_START);
        assert_eq!(small, first + BAR_SIZE);
        assert_eq!(second % BAR_SIZE, 0, "{second:#x}");
        assert!(second >= small + 0x1000, "{second:#x} overlaps {small:#x}");
    }

    #[test]
    fn bar_allocator_stops_at_ioapic() {
        let mut bars = BarAllocator::new();
        let size = 1 << 28;
        let mut count = 0;
        while let Some(bar) = bars.allocate(size) {
            assert!(bar + size <= IOAPIC_BASE, "{bar:#x}");
            count += 1;
        }
        // Three 256 MiB BARs fit between 0xc0000000 and 0xfec00000.
        assert_eq!(count, 3);
    }
}
