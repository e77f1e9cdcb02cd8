//! Building a runnable VM from its definition: backend, memory, devices, guest image.
//!
//! `monstervm run` and the VMM process of `monstervm start` both build their VM here, so
//! a guest boots the same way from the terminal and from the API.

use std::sync::{Arc, Mutex};

use super::disks::{attach_disks, DiskError};
use super::{Vm, VmControl, VmIo};
use crate::core::boot::embedded::{self, EmbeddedError};
use crate::core::boot::linux::{load_linux, BootError, LinuxBootSpec};
use crate::core::devices::acpi_pm::{AcpiPm, ACPI_PM_WINDOWS};
use crate::core::devices::i8042::{I8042, I8042_WINDOWS};
use crate::core::devices::pci::{
    PciConfigPorts, PciError, PciMmioWindow, PciRoot, CONFIG_PORT_BASE, CONFIG_PORT_LEN,
};
use crate::core::devices::pvpanic::{PvPanic, PVPANIC_WINDOWS};
use crate::core::devices::rtc::{Rtc, RTC_WINDOWS};
use crate::core::devices::serial::{Serial, SerialOutput, COM1_IRQ, COM1_WINDOWS};
use crate::core::devices::{Bus, BusError, BusRange, HostClock, PlatformControl};
use crate::core::memory::{create_guest_memory, MemoryError, IOAPIC_BASE, MMIO_HOLE_START};
use crate::hypervisor::emulator::EmulatorVm;
use crate::hypervisor::kvm::KvmVm;
use crate::hypervisor::{
    select_backend, BackendKind, BackendSelection, HypervisorError, HypervisorVm,
};
use crate::utils::config::{ConfigError, VmConfig};

/// Errors raised while building a VM; each names what failed and what to change.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error("failed to place a device on the VM's buses: {0}")]
    Bus(#[from] BusError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error(transparent)]
    Embedded(#[from] EmbeddedError),
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Pci(#[from] PciError),
}

/// The guest a VM boots: the embedded guest or a Linux kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestKind {
    Embedded,
    Linux { version: Option<String> },
}

/// A VM ready to run and the handles its front end needs.
pub struct BuiltVm {
    pub vm: Vm,
    /// The 16550 at COM1, for console input.
    pub serial: Arc<Mutex<Serial>>,
    /// The i8042 keyboard controller, through which the VMM types Ctrl-Alt-Del.
    pub keyboard: Arc<Mutex<I8042>>,
    pub backend: BackendSelection,
    pub guest: GuestKind,
}

/// Builds the VM that `config` describes, with `serial_out` receiving the console output.
pub fn build_vm(config: &VmConfig, serial_out: SerialOutput) -> Result<BuiltVm, BuildError> {
    config.validate()?;
    let backend_selection = select_backend(config.backend)?;
    tracing::info!(vm = %config.name, backend = %backend_selection.kind, reason = %backend_selection.reason, "backend selected");

    let memory = create_guest_memory(config.memory_mib)?;
    // The emulator caches decoded instructions, so device DMA must tell it which guest
    // RAM changed; KVM needs no such notice.
    let (backend, code_watch): (Arc<dyn HypervisorVm>, _) = match backend_selection.kind {
        BackendKind::Kvm => (Arc::new(KvmVm::new(&memory)?), None),
        BackendKind::Emulator => {
            let emulator = EmulatorVm::new(&memory)?;
            let code_watch = emulator.code_watch();
            (Arc::new(emulator), Some(code_watch))
        }
    };
    let irq_chip = backend.irq_chip();
    let control = VmControl::new();
    let platform: Arc<dyn PlatformControl> = control.clone();
    let clock = Arc::new(HostClock::new());

    let mut pio = Bus::new();
    let mut mmio = Bus::new();

    let serial = Arc::new(Mutex::new(Serial::new(
        irq_chip.clone(),
        COM1_IRQ,
        serial_out,
    )));
    pio.insert_windows(&COM1_WINDOWS, serial.clone())?;
    let keyboard = Arc::new(Mutex::new(I8042::new(irq_chip.clone(), platform.clone())));
    pio.insert_windows(&I8042_WINDOWS, keyboard.clone())?;
    pio.insert_windows(
        &RTC_WINDOWS,
        Arc::new(Mutex::new(Rtc::new(clock.clone(), config.memory_mib << 20))),
    )?;
    pio.insert_windows(
        &ACPI_PM_WINDOWS,
        Arc::new(Mutex::new(AcpiPm::new(platform.clone(), clock))),
    )?;
    pio.insert_windows(
        &PVPANIC_WINDOWS,
        Arc::new(Mutex::new(PvPanic::new(platform))),
    )?;

    let mut pci_root = PciRoot::new();
    attach_disks(
        &config.disks,
        &memory,
        &irq_chip,
        code_watch.as_ref(),
        &mut pci_root,
    )?;
    let pci_root = Arc::new(pci_root);
    pio.insert(
        "pci-config",
        BusRange::new(CONFIG_PORT_BASE, CONFIG_PORT_LEN),
        Arc::new(Mutex::new(PciConfigPorts::new(pci_root.clone()))),
    )?;
    mmio.insert(
        "pci-mmio",
        BusRange::new(MMIO_HOLE_START, IOAPIC_BASE - MMIO_HOLE_START),
        Arc::new(Mutex::new(PciMmioWindow::new(pci_root, MMIO_HOLE_START))),
    )?;

    let platform_devices = backend.platform_devices();
    for device in platform_devices.pio {
        pio.insert_windows(device.windows, device.device)?;
    }
    for device in platform_devices.mmio {
        mmio.insert_windows(device.windows, device.device)?;
    }

    let (boot_state, guest) = match LinuxBootSpec::from_config(config) {
        Some(spec) => {
            let boot = load_linux(&memory, &spec)?;
            tracing::info!(
                vm = %config.name,
                kernel = %spec.kernel.display(),
                version = boot.kernel_version.as_deref().unwrap_or("unknown"),
                protocol = ?boot.protocol,
                "Linux kernel loaded"
            );
            let version = boot.kernel_version.clone();
            (boot.cpu_state, GuestKind::Linux { version })
        }
        None => (embedded::load(&memory)?, GuestKind::Embedded),
    };

    let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
    for id in 0..u32::from(config.vcpus) {
        let mut vcpu = backend.create_vcpu(id)?;
        if id == 0 {
            vcpu.set_state(&boot_state)?;
        }
        vcpus.push(vcpu);
    }

    let io = Arc::new(VmIo::new(pio, mmio));
    let vm = Vm::from_parts(config.name.clone(), memory, backend, io, control, vcpus);
    Ok(BuiltVm {
        vm,
        serial,
        keyboard,
        backend: backend_selection,
        guest,
    })
}
