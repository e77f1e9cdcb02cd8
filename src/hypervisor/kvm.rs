//! The KVM backend: guest memory as KVM memory slots, the in-kernel PIC, IOAPIC, PIT and
//! local APICs, and vCPUs whose port-I/O and MMIO exits go to an [`IoHandler`].
//!
//! Interrupt lines are set with KVM_IRQ_LINE on KVM's default routing: GSIs 0 to 15 reach
//! both the PIC and the IOAPIC, 16 to 23 the IOAPIC only. How a vCPU is kicked out of
//! KVM_RUN and how a halted one is noticed is described in the `kick` module.

mod cpuid;
mod kick;
mod probe;
mod regs;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_MP_STATE_HALTED, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VcpuExit as KvmExit, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

pub use cpuid::{cpuid_differences, filter_cpuid};
pub use kick::{kick_signal, HALT_CHECK_INTERVAL, KICK_SIGNAL_OFFSET};
pub use probe::{probe_hardware_speed, KvmProbe, PROBE_INSTRUCTIONS, SOFTWARE_SPEED_LIMIT};
pub use regs::STATE_MSRS;

use super::{
    BackendKind, CpuState, HypervisorError, HypervisorVm, IoHandler, IrqChip, PlatformDevices,
    SharedVcpuStats, Vcpu, VcpuExit, VcpuKicker,
};
use kick::{KickState, RunScope};

/// The KVM device node.
pub const KVM_PATH: &str = "/dev/kvm";
/// Guest-physical address of the three pages that Intel VMX needs for real-mode TSS
/// emulation (KVM_SET_TSS_ADDR). It lies in the MMIO hole below 4 GiB, clear of the
/// IOAPIC and the local APIC.
pub const TSS_ADDRESS: u64 = 0xfffb_d000;
/// Guest-physical address of the identity-map page that Intel VMX needs for real mode
/// without unrestricted guest support (KVM_SET_IDENTITY_MAP_ADDR), just below the TSS.
pub const IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// End of the pages reserved for KVM: the three TSS pages end here.
const RESERVED_END: u64 = TSS_ADDRESS + 3 * 0x1000;
/// The x86 MSI address window: bits 31:20 of a valid MSI address are 0xFEE.
const MSI_ADDRESS_BASE: u64 = 0xfee0_0000;
const MSI_ADDRESS_MASK: u64 = 0xfff0_0000;
/// Highest GSI accepted by [`IrqChip::set_irq`]: the last pin of KVM's 24-pin IOAPIC.
pub const MAX_GSI: u32 = 23;

/// Local APIC register offsets of LVT LINT0 and LINT1.
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
/// LVT delivery modes (bits 8-10).
const APIC_DELIVERY_MODE_NMI: u32 = 0x4;
const APIC_DELIVERY_MODE_EXTINT: u32 = 0x7;

/// Capabilities the backend relies on. KVM_CREATE_VM succeeds without them, so they are
/// checked up front to fail with a clear message.
const REQUIRED_CAPS: [(Cap, &str); 7] = [
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::SetIdentityMapAddr, "KVM_CAP_SET_IDENTITY_MAP_ADDR"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    (Cap::SignalMsi, "KVM_CAP_SIGNAL_MSI"),
];

fn kvm_error(call: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> HypervisorError {
    move |error| HypervisorError::Kvm {
        call,
        source: std::io::Error::from_raw_os_error(error.errno()),
    }
}

/// Opens [`KVM_PATH`] and checks the API version and the capabilities this backend needs.
pub fn open_kvm() -> Result<Kvm, HypervisorError> {
    open_kvm_at(Path::new(KVM_PATH))
}

/// Opens the KVM device at `path` and checks it as [`open_kvm`] does.
pub fn open_kvm_at(path: &Path) -> Result<Kvm, HypervisorError> {
    let unavailable = |reason: String| HypervisorError::KvmUnavailable {
        path: path.display().to_string(),
        reason,
    };

    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| unavailable("the path contains a NUL byte".to_string()))?;
    let kvm = Kvm::new_with_path(&c_path)
        .map_err(|e| unavailable(std::io::Error::from(e).to_string()))?;
    let version = kvm.get_api_version();
    if version < 0 {
        return Err(unavailable(
            "KVM_GET_API_VERSION failed, so the file is not a KVM device".to_string(),
        ));
    }
    if version != kvm_bindings::KVM_API_VERSION as i32 {
        return Err(unavailable(format!(
            "KVM API version {version} is not the supported version {}",
            kvm_bindings::KVM_API_VERSION
        )));
    }
    for (cap, name) in REQUIRED_CAPS {
        if !kvm.check_extension(cap) {
            return Err(unavailable(format!("the kernel lacks {name}")));
        }
    }
    Ok(kvm)
}

/// A VM on KVM.
pub struct KvmVm {
    kvm: Kvm,
    vm: Arc<VmFd>,
    /// KVM_GET_SUPPORTED_CPUID, before filtering for each vCPU.
    supported_cpuid: CpuId,
    /// Size of each vCPU's `kvm_run` mapping, to bounds-check port-I/O data offsets.
    run_size: usize,
    /// Keeps the host mappings behind the memory slots alive as long as the VM.
    memory: GuestMemoryMmap,
}

/// Whether vCPU creation compares the CPUID table that KVM kept with the one it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CpuidCheck {
    /// Warn when they differ, for vCPUs that run a guest.
    Warn,
    /// Skip the comparison, for the speed probe's throwaway vCPU.
    Skip,
}

impl KvmVm {
    /// Creates a VM over `memory`, with the in-kernel PIC, IOAPIC, PIT and local APICs.
    ///
    /// Each region of `memory` becomes one memory slot. The regions must not overlap
    /// the pages at [`IDENTITY_MAP_ADDRESS`] and [`TSS_ADDRESS`], which `core::memory`'s
    /// layout keeps free.
    pub fn new(memory: &GuestMemoryMmap) -> Result<Self, HypervisorError> {
        check_reserved_pages(memory)?;
        let kvm = open_kvm()?;
        let vm = kvm.create_vm().map_err(kvm_error("KVM_CREATE_VM"))?;

        for (slot, region) in memory.iter().enumerate() {
            let host_address = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|e| HypervisorError::Unsupported {
                    what: format!(
                        "guest memory region at {:#x} without a host mapping ({e})",
                        region.start_addr().0
                    ),
                })?;
            let slot_region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host_address as u64,
            };
            // SAFETY: the slot describes a live mapping of `region.len()` bytes owned by
            // `memory`, and the VM keeps a clone of `memory`, so the mapping outlives it.
            unsafe { vm.set_user_memory_region(slot_region) }
                .map_err(kvm_error("KVM_SET_USER_MEMORY_REGION"))?;
        }

        vm.set_identity_map_address(IDENTITY_MAP_ADDRESS)
            .map_err(kvm_error("KVM_SET_IDENTITY_MAP_ADDR"))?;
        vm.set_tss_address(TSS_ADDRESS as usize)
            .map_err(kvm_error("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip()
            .map_err(kvm_error("KVM_CREATE_IRQCHIP"))?;
        // The dummy speaker makes KVM handle port 0x61 too. Its bit 5 reads PIT
        // channel 2's output, which guests use to time TSC calibration loops.
        let pit_config = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit_config)
            .map_err(kvm_error("KVM_CREATE_PIT2"))?;

        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_error("KVM_GET_SUPPORTED_CPUID"))?;
        let run_size = kvm
            .get_vcpu_mmap_size()
            .map_err(kvm_error("KVM_GET_VCPU_MMAP_SIZE"))?;

        Ok(KvmVm {
            kvm,
            vm: Arc::new(vm),
            supported_cpuid,
            run_size,
            memory: memory.clone(),
        })
    }

    /// Reads back the CPUID table of vCPU `id` and warns when KVM changed it.
    ///
    /// Some KVM host modules rewrite feature leaves in KVM_SET_CPUID2. kvm_pvm, which
    /// runs guests without hardware virtualization, does so on Linux 6.18: it replaces
    /// leaf 1 ECX and EDX and adds leaves 7 and 0xD from the host CPU. The guest then
    /// sees features that the emulator lacks, so a snapshot may not restore on the other
    /// backend. The warning comes once per process and later differences log at debug
    /// level, because every vCPU on such a host has them.
    fn warn_on_cpuid_override(
        &self,
        fd: &VcpuFd,
        id: u32,
        requested: &[kvm_bindings::kvm_cpuid_entry2],
    ) -> Result<(), HypervisorError> {
        let effective = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_error("KVM_GET_CPUID2"))?;
        let differences = cpuid_differences(requested, effective.as_slice());
        if !differences.is_empty() {
            let leaves: Vec<String> = differences
                .iter()
                .map(|(leaf, subleaf)| format!("{leaf:#x}/{subleaf}"))
                .collect();
            static WARNED: AtomicBool = AtomicBool::new(false);
            let leaves = leaves.join(" ");
            let message = "KVM changed the CPUID leaves set for this vCPU, so the guest sees \
                           host features that the emulator backend may lack";
            if WARNED.swap(true, Ordering::Relaxed) {
                tracing::debug!(vcpu = id, leaves, "{message}");
            } else {
                tracing::warn!(vcpu = id, leaves, "{message}");
            }
        }
        Ok(())
    }

    /// Returns the CPUID table for the vCPU with local APIC ID `apic_id`.
    pub fn cpuid(&self, apic_id: u8) -> Vec<kvm_bindings::kvm_cpuid_entry2> {
        filter_cpuid(self.supported_cpuid.as_slice(), apic_id)
    }

    /// Creates vCPU `id` with the filtered CPUID table, boot MSRs and LINT setup.
    /// With `CpuidCheck::Warn` it warns when KVM rewrites the CPUID table.
    fn new_vcpu(&self, id: u32, check: CpuidCheck) -> Result<KvmVcpu, HypervisorError> {
        let max_id = self.kvm.get_max_vcpu_id().min(usize::from(u8::MAX) + 1);
        if id as usize >= max_id {
            return Err(HypervisorError::Unsupported {
                what: format!(
                    "vCPU id {id}: KVM and 8-bit APIC IDs allow 0 to {}",
                    max_id - 1
                ),
            });
        }
        let fd = self
            .vm
            .create_vcpu(u64::from(id))
            .map_err(kvm_error("KVM_CREATE_VCPU"))?;

        // The range check above keeps `id` within 8 bits.
        let cpuid = CpuId::from_entries(&self.cpuid(id as u8)).map_err(|e| {
            HypervisorError::Unsupported {
                what: format!("a CPUID table of this size ({e:?})"),
            }
        })?;
        fd.set_cpuid2(&cpuid).map_err(kvm_error("KVM_SET_CPUID2"))?;
        if check == CpuidCheck::Warn {
            self.warn_on_cpuid_override(&fd, id, cpuid.as_slice())?;
        }
        set_msrs(&fd, &regs::boot_msrs())?;
        set_lapic_lints(&fd)?;

        Ok(KvmVcpu {
            id,
            fd,
            run_size: self.run_size,
            kick: Arc::new(KickState::default()),
            stats: Arc::default(),
            io_pending: false,
            has_xsave: self.kvm.check_extension(Cap::Xsave),
            _memory: self.memory.clone(),
        })
    }
}

impl HypervisorVm for KvmVm {
    fn kind(&self) -> BackendKind {
        BackendKind::Kvm
    }

    fn irq_chip(&self) -> Arc<dyn IrqChip> {
        Arc::new(KvmIrqChip {
            vm: Arc::clone(&self.vm),
        })
    }

    fn platform_devices(&self) -> PlatformDevices {
        PlatformDevices::default()
    }

    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>, HypervisorError> {
        Ok(Box::new(self.new_vcpu(id, CpuidCheck::Warn)?))
    }
}

/// Rejects guest RAM over the identity-map and TSS pages, which KVM would shadow.
fn check_reserved_pages(memory: &GuestMemoryMmap) -> Result<(), HypervisorError> {
    let reserved = IDENTITY_MAP_ADDRESS..RESERVED_END;
    for region in memory.iter() {
        let start = region.start_addr().0;
        let end = start.saturating_add(region.len());
        if start < reserved.end && reserved.start < end {
            return Err(HypervisorError::Unsupported {
                what: format!(
                    "guest RAM at {start:#x}..{end:#x}, which overlaps the pages that KVM \
                     reserves at {:#x}..{:#x}: keep RAM below 3 GiB or above 4 GiB",
                    reserved.start, reserved.end
                ),
            });
        }
    }
    Ok(())
}

/// Writes `entries` with KVM_SET_MSRS and fails naming the first MSR that KVM rejected.
fn set_msrs(fd: &VcpuFd, entries: &[kvm_bindings::kvm_msr_entry]) -> Result<(), HypervisorError> {
    let msrs = Msrs::from_entries(entries).map_err(|e| HypervisorError::Unsupported {
        what: format!("{} MSRs in one call ({e:?})", entries.len()),
    })?;
    let written = fd.set_msrs(&msrs).map_err(kvm_error("KVM_SET_MSRS"))?;
    if written < entries.len() {
        return Err(HypervisorError::Unsupported {
            what: format!("MSR {:#x}, which KVM rejected", entries[written].index),
        });
    }
    Ok(())
}

/// Routes the PIC through LINT0 (ExtINT) and NMIs through LINT1, as firmware does on a
/// PC, leaving each LVT entry's mask bit as KVM set it.
fn set_lapic_lints(fd: &VcpuFd) -> Result<(), HypervisorError> {
    let mut lapic = fd.get_lapic().map_err(kvm_error("KVM_GET_LAPIC"))?;
    for (offset, mode) in [
        (APIC_LVT_LINT0, APIC_DELIVERY_MODE_EXTINT),
        (APIC_LVT_LINT1, APIC_DELIVERY_MODE_NMI),
    ] {
        let bytes = &mut lapic.regs[offset..offset + 4];
        let value = u32::from_le_bytes([
            bytes[0] as u8,
            bytes[1] as u8,
            bytes[2] as u8,
            bytes[3] as u8,
        ]);
        let value = (value & !0x700) | (mode << 8);
        for (byte, new) in bytes.iter_mut().zip(value.to_le_bytes()) {
            *byte = new as _;
        }
    }
    fd.set_lapic(&lapic).map_err(kvm_error("KVM_SET_LAPIC"))
}

/// The in-kernel PIC and IOAPIC, driven through KVM_IRQ_LINE.
struct KvmIrqChip {
    vm: Arc<VmFd>,
}

impl IrqChip for KvmIrqChip {
    fn set_irq(&self, gsi: u32, level: bool) -> Result<(), HypervisorError> {
        if gsi > MAX_GSI {
            return Err(HypervisorError::InvalidIrq { gsi, max: MAX_GSI });
        }
        self.vm
            .set_irq_line(gsi, level)
            .map_err(kvm_error("KVM_IRQ_LINE"))
    }

    /// Delivers the MSI through KVM_SIGNAL_MSI. An MSI that the guest has blocked (no
    /// enabled destination APIC) is dropped, as on hardware.
    fn signal_msi(&self, address: u64, data: u32) -> Result<(), HypervisorError> {
        if address & MSI_ADDRESS_MASK != MSI_ADDRESS_BASE {
            return Err(HypervisorError::Unsupported {
                what: format!(
                    "MSI address {address:#x}: x86 MSI addresses lie in 0xfee00000..0xfeefffff"
                ),
            });
        }
        let msi = kvm_bindings::kvm_msi {
            address_lo: address as u32,
            address_hi: (address >> 32) as u32,
            data,
            ..Default::default()
        };
        self.vm
            .signal_msi(msi)
            .map(|_delivered| ())
            .map_err(kvm_error("KVM_SIGNAL_MSI"))
    }
}

/// A vCPU on KVM.
pub struct KvmVcpu {
    id: u32,
    fd: VcpuFd,
    run_size: usize,
    kick: Arc<KickState>,
    stats: Arc<SharedVcpuStats>,
    /// Whether the last exit was port I/O or MMIO, which KVM finishes only on the
    /// next KVM_RUN (for example by loading the IN result into RAX).
    io_pending: bool,
    /// Whether KVM offers KVM_GET_XSAVE, the only way to read and write MXCSR.
    has_xsave: bool,
    /// Keeps guest memory mapped while this vCPU can run, even after its `KvmVm` is
    /// dropped.
    _memory: GuestMemoryMmap,
}

/// The run loop's next action after one KVM_RUN, decided while `kvm_run` is borrowed.
enum Step {
    Continue,
    PortIo,
    Return(VcpuExit),
    Fail(String),
    Interrupted,
}

impl KvmVcpu {
    /// Runs KVM_RUN once and classifies the exit.
    fn run_once(&mut self, io: &dyn IoHandler) -> Result<Step, HypervisorError> {
        // KVM_RUN finishes a pending port-I/O or MMIO instruction first, even when it
        // then returns EINTR at once.
        self.io_pending = false;
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                return Ok(Step::Interrupted)
            }
            Err(e) => return Err(kvm_error("KVM_RUN")(e)),
        };
        self.io_pending = matches!(
            exit,
            KvmExit::IoIn(..) | KvmExit::IoOut(..) | KvmExit::MmioRead(..) | KvmExit::MmioWrite(..)
        );
        let step = match exit {
            KvmExit::IoIn(..) | KvmExit::IoOut(..) => Step::PortIo,
            KvmExit::MmioRead(address, data) => {
                self.stats.count_mmio_exit();
                io.mmio_read(address, data);
                Step::Continue
            }
            KvmExit::MmioWrite(address, data) => {
                self.stats.count_mmio_exit();
                io.mmio_write(address, data);
                Step::Continue
            }
            KvmExit::Hlt => {
                self.stats.count_halt_exit();
                Step::Return(VcpuExit::Halted)
            }
            KvmExit::Shutdown => Step::Return(VcpuExit::Shutdown),
            KvmExit::SystemEvent(kind, _) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN | kvm_bindings::KVM_SYSTEM_EVENT_RESET => {
                    Step::Return(VcpuExit::Shutdown)
                }
                other => Step::Fail(format!("KVM system event {other}")),
            },
            KvmExit::Intr | KvmExit::IrqWindowOpen | KvmExit::IoapicEoi(_) => Step::Continue,
            KvmExit::FailEntry(reason, cpu) => Step::Fail(format!(
                "KVM_EXIT_FAIL_ENTRY: hardware entry failure reason {reason:#x} on host CPU {cpu}"
            )),
            KvmExit::InternalError => Step::Fail(self.describe_internal_error()),
            KvmExit::MemoryFault { gpa, size, flags } => Step::Fail(format!(
                "KVM_EXIT_MEMORY_FAULT at guest-physical {gpa:#x}, {size} bytes, flags {flags:#x}"
            )),
            other => Step::Fail(format!("unexpected KVM exit {other:?}")),
        };
        Ok(step)
    }

    /// Describes the KVM_EXIT_INTERNAL_ERROR that the last KVM_RUN returned.
    fn describe_internal_error(&mut self) -> String {
        // SAFETY: the last exit was KVM_EXIT_INTERNAL_ERROR, for which KVM fills the
        // `internal` member of the union.
        let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
        let count = (internal.ndata as usize).min(internal.data.len());
        let kind = match internal.suberror {
            kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => "instruction emulation failed",
            kvm_bindings::KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering another",
            kvm_bindings::KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery failed",
            kvm_bindings::KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON => "unexpected exit reason",
            _ => "unknown suberror",
        };
        format!(
            "KVM_EXIT_INTERNAL_ERROR, suberror {} ({kind}), data {:x?}",
            internal.suberror,
            &internal.data[..count]
        )
    }

    /// Passes the port-I/O exit in `kvm_run` to `io`, one access per repetition of a
    /// string instruction.
    fn handle_port_io(&mut self, io: &dyn IoHandler) -> Result<(), HypervisorError> {
        let run_size = self.run_size;
        let run = self.fd.get_kvm_run();
        // SAFETY: the last exit was KVM_EXIT_IO, for which KVM fills the `io` member.
        let exit = unsafe { run.__bindgen_anon_1.io };
        let size = usize::from(exit.size);
        let total = size * exit.count as usize;
        let offset = exit.data_offset as usize;
        if !matches!(size, 1 | 2 | 4) || offset.checked_add(total).is_none_or(|end| end > run_size)
        {
            let reason = format!(
                "KVM reported an invalid port-I/O exit at port {:#x}: size {size}, count {}, \
                 data offset {offset:#x} in a {run_size:#x}-byte kvm_run mapping",
                exit.port, exit.count
            );
            return Err(self.failure(reason));
        }

        let base = (run as *mut kvm_bindings::kvm_run).cast::<u8>();
        // SAFETY: `offset + total` lies inside the kvm_run mapping of `run_size` bytes,
        // checked above, and nothing else accesses that area until the next KVM_RUN.
        let data = unsafe { std::slice::from_raw_parts_mut(base.add(offset), total) };
        for chunk in data.chunks_exact_mut(size) {
            // Counted per access, so a REP INS or OUTS counts each element, as the
            // emulator does, however many of them KVM batched into this exit.
            self.stats.count_pio_exit();
            if u32::from(exit.direction) == kvm_bindings::KVM_EXIT_IO_IN {
                io.pio_read(exit.port, chunk);
            } else {
                io.pio_write(exit.port, chunk);
            }
        }
        Ok(())
    }

    /// Lets KVM finish the instruction of the last port-I/O or MMIO exit without running
    /// the guest further, so that the state read after `run` returns includes it.
    fn complete_pending_io(&mut self) -> Result<(), HypervisorError> {
        if !self.io_pending {
            return Ok(());
        }
        self.fd.set_kvm_immediate_exit(1);
        let result = self.fd.run().map(|_| ());
        self.fd.set_kvm_immediate_exit(0);
        self.io_pending = false;
        match result {
            Ok(()) => Ok(()),
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Err(e) => Err(kvm_error("KVM_RUN to complete port I/O or MMIO")(e)),
        }
    }

    /// Returns whether the vCPU sits in HLT with interrupts disabled, which only an NMI,
    /// SMI or INIT can end.
    fn halted_for_good(&self) -> Result<bool, HypervisorError> {
        let mp_state = self
            .fd
            .get_mp_state()
            .map_err(kvm_error("KVM_GET_MP_STATE"))?;
        if mp_state.mp_state != KVM_MP_STATE_HALTED {
            return Ok(false);
        }
        let regs = self.fd.get_regs().map_err(kvm_error("KVM_GET_REGS"))?;
        Ok(regs.rflags & RFLAGS_IF == 0)
    }

    /// Reads the x87 and SSE state: from the XSAVE area where KVM offers it, because
    /// KVM_GET_FPU leaves MXCSR out.
    fn fpu_state(&self, state: &mut CpuState) -> Result<(), HypervisorError> {
        if self.has_xsave {
            let xsave = self.fd.get_xsave().map_err(kvm_error("KVM_GET_XSAVE"))?;
            regs::from_fxsave_area(&legacy_area(&xsave), state);
        } else {
            let fpu = self.fd.get_fpu().map_err(kvm_error("KVM_GET_FPU"))?;
            regs::from_kvm_fpu(&fpu, state);
        }
        Ok(())
    }

    /// Writes the x87 and SSE state, through the XSAVE area where KVM offers it.
    ///
    /// KVM_SET_FPU ignores MXCSR, and where the guest FPU is kept in XSAVE format the
    /// guest sees its x87 and XMM values only if XSTATE_BV marks them present, which
    /// KVM_SET_FPU does not do.
    fn set_fpu_state(&self, state: &CpuState) -> Result<(), HypervisorError> {
        let mxcsr = state.mxcsr;
        if mxcsr & !MXCSR_DEFINED_BITS != 0 {
            return Err(HypervisorError::Unsupported {
                what: format!("MXCSR value {mxcsr:#x}, which sets reserved bits 16-31"),
            });
        }
        if !self.has_xsave {
            // NOTE: without KVM_CAP_XSAVE the guest keeps its current MXCSR.
            return self
                .fd
                .set_fpu(&regs::to_kvm_fpu(state))
                .map_err(kvm_error("KVM_SET_FPU"));
        }

        let mut xsave = self.fd.get_xsave().map_err(kvm_error("KVM_GET_XSAVE"))?;
        let mut area = legacy_area(&xsave);
        regs::to_fxsave_area(state, &mut area);
        for (word, bytes) in xsave.region.iter_mut().zip(area.chunks_exact(4)) {
            *word = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        }
        xsave.region[XSAVE_XSTATE_BV_INDEX] |= XSTATE_X87 | XSTATE_SSE;
        // SAFETY: this process enables no dynamically sized XSTATE features (there is
        // no arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM) call), so KVM reads no more than the
        // 4096-byte kvm_xsave that `xsave` is.
        unsafe { self.fd.set_xsave(&xsave) }.map_err(kvm_error("KVM_SET_XSAVE"))
    }

    /// Sets or clears the STI interrupt shadow, keeping the other pending events.
    fn set_interrupt_shadow(&self, shadow: bool) -> Result<(), HypervisorError> {
        let mut events = self
            .fd
            .get_vcpu_events()
            .map_err(kvm_error("KVM_GET_VCPU_EVENTS"))?;
        events.interrupt.shadow = if shadow {
            kvm_bindings::KVM_X86_SHADOW_INT_STI as u8
        } else {
            0
        };
        events.flags |= kvm_bindings::KVM_VCPUEVENT_VALID_SHADOW;
        self.fd
            .set_vcpu_events(&events)
            .map_err(kvm_error("KVM_SET_VCPU_EVENTS"))
    }

    /// Puts the vCPU into HLT or takes it out, leaving other run states alone.
    // NOTE: CpuState cannot express an AP waiting for INIT or SIPI, so such a vCPU keeps
    // its current run state here.
    fn set_halted(&self, halted: bool) -> Result<(), HypervisorError> {
        let mut mp_state = self
            .fd
            .get_mp_state()
            .map_err(kvm_error("KVM_GET_MP_STATE"))?;
        let target = match (halted, mp_state.mp_state) {
            (true, _) => KVM_MP_STATE_HALTED,
            (false, KVM_MP_STATE_HALTED) => kvm_bindings::KVM_MP_STATE_RUNNABLE,
            (false, _) => return Ok(()),
        };
        if mp_state.mp_state != target {
            mp_state.mp_state = target;
            self.fd
                .set_mp_state(mp_state)
                .map_err(kvm_error("KVM_SET_MP_STATE"))?;
        }
        Ok(())
    }

    fn failure(&self, reason: String) -> HypervisorError {
        let state = self.state().unwrap_or_default();
        HypervisorError::VcpuFailed {
            id: self.id,
            reason,
            state: Box::new(state),
        }
    }
}

/// Index of the low half of XSTATE_BV in `kvm_xsave::region`: byte 512, the start of
/// the XSAVE header.
const XSAVE_XSTATE_BV_INDEX: usize = 128;
/// XSTATE_BV bit 0: the x87 state is in the buffer.
const XSTATE_X87: u32 = 1 << 0;
/// XSTATE_BV bit 1: the SSE state (XMM registers and MXCSR) is in the buffer.
const XSTATE_SSE: u32 = 1 << 1;

/// Returns the first 512 bytes of `xsave`, the FXSAVE-format legacy area.
fn legacy_area(xsave: &kvm_bindings::kvm_xsave) -> [u8; regs::FXSAVE_AREA_BYTES] {
    let mut area = [0u8; regs::FXSAVE_AREA_BYTES];
    for (bytes, word) in area.chunks_exact_mut(4).zip(xsave.region.iter()) {
        bytes.copy_from_slice(&word.to_le_bytes());
    }
    area
}
/// MXCSR bits that CPUs define; writing any other bit raises #GP.
const MXCSR_DEFINED_BITS: u32 = 0xffff;

/// RFLAGS.IF: maskable interrupts enabled.
const RFLAGS_IF: u64 = 1 << 9;

impl Vcpu for KvmVcpu {
    /// Runs the vCPU until it halts with interrupts disabled, shuts down, is kicked or
    /// fails.
    ///
    /// `VcpuExit::Halted` comes from the halt tick: up to [`HALT_CHECK_INTERVAL`] after
    /// the guest executes HLT with IF clear. Calling `run` again keeps the vCPU halted
    /// until an NMI, SMI or INIT wakes it.
    fn run(&mut self, io: &dyn IoHandler) -> Result<VcpuExit, HypervisorError> {
        let kick = Arc::clone(&self.kick);
        let immediate_exit = std::ptr::addr_of_mut!(self.fd.get_kvm_run().immediate_exit);
        let _scope = RunScope::enter(&kick, immediate_exit)?;

        loop {
            if kick.take_pending() {
                self.complete_pending_io()?;
                return Ok(VcpuExit::Kicked);
            }
            match self.run_once(io)? {
                Step::Continue => {}
                Step::PortIo => self.handle_port_io(io)?,
                Step::Return(exit) => return Ok(exit),
                Step::Fail(reason) => return Err(self.failure(reason)),
                Step::Interrupted => {
                    // The kick signal or the halt tick interrupted KVM_RUN.
                    self.fd.set_kvm_immediate_exit(0);
                    if kick.take_pending() {
                        self.complete_pending_io()?;
                        return Ok(VcpuExit::Kicked);
                    }
                    if self.halted_for_good()? {
                        self.stats.count_halt_exit();
                        return Ok(VcpuExit::Halted);
                    }
                }
            }
        }
    }

    // NOTE: CpuState carries no local APIC registers, AVX state or pending exceptions,
    // interrupts and NMIs, so a snapshot of a running guest loses them.
    fn state(&self) -> Result<CpuState, HypervisorError> {
        let mut state = CpuState::default();
        let regs = self.fd.get_regs().map_err(kvm_error("KVM_GET_REGS"))?;
        regs::from_kvm_regs(&regs, &mut state);
        let sregs = self.fd.get_sregs().map_err(kvm_error("KVM_GET_SREGS"))?;
        regs::from_kvm_sregs(&sregs, &mut state);
        self.fpu_state(&mut state)?;
        let debug = self
            .fd
            .get_debug_regs()
            .map_err(kvm_error("KVM_GET_DEBUGREGS"))?;
        regs::from_kvm_debugregs(&debug, &mut state);
        let events = self
            .fd
            .get_vcpu_events()
            .map_err(kvm_error("KVM_GET_VCPU_EVENTS"))?;
        state.interrupt_shadow = events.interrupt.shadow != 0;
        let mp_state = self
            .fd
            .get_mp_state()
            .map_err(kvm_error("KVM_GET_MP_STATE"))?;
        state.halted = mp_state.mp_state == KVM_MP_STATE_HALTED;

        let entries: Vec<_> = STATE_MSRS.iter().map(|&i| regs::msr_entry(i, 0)).collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| HypervisorError::Unsupported {
            what: format!("{} MSRs in one call ({e:?})", entries.len()),
        })?;
        let read = self
            .fd
            .get_msrs(&mut msrs)
            .map_err(kvm_error("KVM_GET_MSRS"))?;
        if read < STATE_MSRS.len() {
            return Err(HypervisorError::Unsupported {
                what: format!("reading MSR {:#x}, which KVM rejected", STATE_MSRS[read]),
            });
        }
        state.msrs = msrs.as_slice()[..read]
            .iter()
            .map(|entry| (entry.index, entry.data))
            .collect();
        Ok(state)
    }

    fn set_state(&mut self, state: &CpuState) -> Result<(), HypervisorError> {
        let mut sregs = self.fd.get_sregs().map_err(kvm_error("KVM_GET_SREGS"))?;
        regs::to_kvm_sregs(state, &mut sregs);
        self.fd
            .set_sregs(&sregs)
            .map_err(kvm_error("KVM_SET_SREGS"))?;
        self.fd
            .set_regs(&regs::to_kvm_regs(state))
            .map_err(kvm_error("KVM_SET_REGS"))?;
        self.set_fpu_state(state)?;
        self.fd
            .set_debug_regs(&regs::to_kvm_debugregs(state))
            .map_err(kvm_error("KVM_SET_DEBUGREGS"))?;
        self.set_interrupt_shadow(state.interrupt_shadow)?;
        self.set_halted(state.halted)?;
        let entries: Vec<_> = state
            .msrs
            .iter()
            .map(|&(index, data)| regs::msr_entry(index, data))
            .collect();
        if !entries.is_empty() {
            set_msrs(&self.fd, &entries)?;
        }
        Ok(())
    }

    fn kicker(&self) -> Arc<dyn VcpuKicker> {
        Arc::clone(&self.kick) as Arc<dyn VcpuKicker>
    }

    fn shared_stats(&self) -> Arc<SharedVcpuStats> {
        self.stats.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_missing_device_names_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kvm");

        let error = open_kvm_at(&path).unwrap_err();

        let message = error.to_string();
        assert!(
            matches!(error, HypervisorError::KvmUnavailable { .. }),
            "{message}"
        );
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains("--backend emulator"), "{message}");
    }

    #[test]
    fn memory_over_reserved_pages_rejected() {
        let memory =
            GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0xfff0_0000), 0x10_0000)])
                .unwrap();

        let error = KvmVm::new(&memory)
            .err()
            .expect("overlapping RAM must be rejected");

        assert!(error.to_string().contains("0xfffbc000"), "{error}");
    }

    #[test]
    fn open_regular_file_is_unavailable() {
        let file = tempfile::NamedTempFile::new().unwrap();

        let error = open_kvm_at(file.path()).unwrap_err();

        assert!(
            matches!(error, HypervisorError::KvmUnavailable { .. }),
            "{error}"
        );
        assert!(error.to_string().contains("not a KVM device"), "{error}");
    }
}
