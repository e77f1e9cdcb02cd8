//! Backend-neutral traits for a VM and its vCPUs.
//!
//! `core::vm` drives every backend (KVM, Hypervisor.framework, the built-in emulator)
//! through these traits only. Port and MMIO accesses are handled inside `Vcpu::run` by
//! calling back into an [`IoHandler`], so a backend returns to the VM loop only for events
//! that change the VM's lifecycle: a halt, a shutdown, a kick or a failure.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::HypervisorError;

/// Port-I/O and MMIO dispatch, implemented by the VM's buses.
///
/// Accesses that hit no device read as all ones and drop writes, as on a PC.
pub trait IoHandler: Sync {
    /// Reads `data.len()` bytes (1, 2 or 4) from I/O port `port`.
    fn pio_read(&self, port: u16, data: &mut [u8]);
    /// Writes `data` (1, 2 or 4 bytes) to I/O port `port`.
    fn pio_write(&self, port: u16, data: &[u8]);
    /// Reads `data.len()` bytes from the guest-physical MMIO address `addr`.
    fn mmio_read(&self, addr: u64, data: &mut [u8]);
    /// Writes `data` to the guest-physical MMIO address `addr`.
    fn mmio_write(&self, addr: u64, data: &[u8]);
}

/// Why `Vcpu::run` returned to the VM loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuExit {
    /// The vCPU executed HLT with interrupts disabled, so nothing can wake it.
    Halted,
    /// The guest triple-faulted or otherwise reset the CPU (KVM_EXIT_SHUTDOWN).
    Shutdown,
    /// `VcpuKicker::kick` asked the vCPU to return; the vCPU can be run again. Devices
    /// that power off or reset the machine kick every vCPU through [`PlatformControl`].
    ///
    /// [`PlatformControl`]: crate::core::devices::PlatformControl
    Kicked,
}

/// Interrupt lines of the platform interrupt controllers, as global system interrupts
/// (GSIs): 0 to 15 are the ISA lines, 16 to 23 the remaining IOAPIC pins.
pub trait IrqChip: Send + Sync {
    /// Sets the level of line `gsi` (for level-triggered sources such as PCI INTx).
    fn set_irq(&self, gsi: u32, level: bool) -> Result<(), HypervisorError>;

    /// Pulses line `gsi` once (for edge-triggered ISA sources such as the serial port).
    fn pulse_irq(&self, gsi: u32) -> Result<(), HypervisorError> {
        self.set_irq(gsi, true)?;
        self.set_irq(gsi, false)
    }

    /// Delivers a message-signalled interrupt: the 32-bit `data` written to `address`
    /// (0xFEExxxxx on x86, where address bits 19:12 select the destination APIC and data
    /// bits 7:0 the vector).
    fn signal_msi(&self, address: u64, data: u32) -> Result<(), HypervisorError> {
        let _ = (address, data);
        Err(HypervisorError::Unsupported {
            what: "message-signalled interrupts".to_string(),
        })
    }
}

/// Makes a running vCPU return from `Vcpu::run` with `VcpuExit::Kicked` soon.
pub trait VcpuKicker: Send + Sync {
    /// Requests the exit. Safe to call from any thread, any number of times.
    fn kick(&self);
}

/// One virtual CPU of a backend.
pub trait Vcpu: Send {
    /// Runs the vCPU until an exit that the VM loop must see.
    fn run(&mut self, io: &dyn IoHandler) -> Result<VcpuExit, HypervisorError>;

    /// Reads the architectural state (registers, segments, control registers, MSRs).
    fn state(&self) -> Result<CpuState, HypervisorError>;

    /// Replaces the architectural state.
    fn set_state(&mut self, state: &CpuState) -> Result<(), HypervisorError>;

    /// Returns a handle that other threads use to interrupt `run`.
    fn kicker(&self) -> Arc<dyn VcpuKicker>;

    /// Returns the block where this vCPU publishes its counters, so that another thread
    /// (the API's metrics) can read them while `run` executes.
    fn shared_stats(&self) -> Arc<SharedVcpuStats>;

    /// Returns the counters of this vCPU's exits and, on the emulator, retired instructions.
    fn stats(&self) -> VcpuStats {
        self.shared_stats().snapshot()
    }
}

/// Counters kept by every backend, read by `monstervm` metrics and benchmarks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuStats {
    /// Port-I/O exits (reads and writes).
    pub pio_exits: u64,
    /// MMIO exits (reads and writes).
    pub mmio_exits: u64,
    /// HLT exits.
    pub halt_exits: u64,
    /// Instructions retired; zero on hardware backends, which do not count them.
    pub instructions: u64,
}

/// Counters of one vCPU, written by the thread that runs it and read by any thread.
///
/// Each counter is updated on its own with relaxed ordering, so a snapshot taken while the
/// vCPU runs may pair values from slightly different moments, but every counter only grows.
/// The emulator publishes its instruction count when each slice of at most
/// `SLICE_INSTRUCTIONS` ends, so that count may lag the exit counters.
#[derive(Debug, Default)]
pub struct SharedVcpuStats {
    pio_exits: AtomicU64,
    mmio_exits: AtomicU64,
    halt_exits: AtomicU64,
    instructions: AtomicU64,
}

impl SharedVcpuStats {
    /// Counts one port-I/O access.
    pub fn count_pio_exit(&self) {
        self.pio_exits.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one MMIO access.
    pub fn count_mmio_exit(&self) {
        self.mmio_exits.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one HLT exit.
    pub fn count_halt_exit(&self) {
        self.halt_exits.fetch_add(1, Ordering::Relaxed);
    }

    /// Publishes the total of instructions retired so far.
    pub fn set_instructions(&self, total: u64) {
        self.instructions.store(total, Ordering::Relaxed);
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> VcpuStats {
        VcpuStats {
            pio_exits: self.pio_exits.load(Ordering::Relaxed),
            mmio_exits: self.mmio_exits.load(Ordering::Relaxed),
            halt_exits: self.halt_exits.load(Ordering::Relaxed),
            instructions: self.instructions.load(Ordering::Relaxed),
        }
    }
}

/// A segment register in the form that KVM and the emulator share.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub selector: u16,
    pub base: u64,
    /// Limit in bytes minus one, already scaled by the granularity bit.
    pub limit: u32,
    /// Descriptor type (bits 0-3 of the access byte).
    pub type_: u8,
    /// Present.
    pub present: bool,
    /// Descriptor privilege level.
    pub dpl: u8,
    /// Default operation size: 32-bit when set (the D/B bit).
    pub db: bool,
    /// Code segment is 64-bit (the L bit).
    pub l: bool,
    /// Granularity: limit counted in 4 KiB units.
    pub g: bool,
    /// Code or data segment (S bit) as opposed to a system segment.
    pub s: bool,
    /// Unusable (a null selector loaded in protected mode).
    pub unusable: bool,
}

/// A descriptor-table register (GDTR or IDTR).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// The architectural state of one x86-64 vCPU, neutral between backends so that a VM
/// snapshot taken on one backend restores on another.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuState {
    /// RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8-R15, in encoding order.
    pub gprs: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    /// Model-specific registers beyond EFER, as (index, value) pairs.
    pub msrs: Vec<(u32, u64)>,
    /// XMM0-XMM15, each as (low, high) 64-bit halves.
    #[serde(default)]
    pub xmm: [[u64; 2]; 16],
    #[serde(default)]
    pub mxcsr: u32,
    /// x87 state as FXSAVE stores it.
    #[serde(default)]
    pub fpu: FpuState,
    /// Debug registers DR0-DR7 (DR4 and DR5 unused).
    #[serde(default)]
    pub dr: [u64; 8],
    /// Interrupts are blocked for one instruction (after STI, MOV SS or POP SS).
    #[serde(default)]
    pub interrupt_shadow: bool,
    /// The vCPU is stopped in HLT until an interrupt arrives.
    #[serde(default)]
    pub halted: bool,
}

/// x87 FPU registers in the layout of the FXSAVE area.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    /// Control word.
    pub fcw: u16,
    /// Status word.
    pub fsw: u16,
    /// Abridged tag word: bit i set when physical register i holds a value.
    pub ftw: u8,
    /// Opcode of the last non-control x87 instruction.
    pub fop: u16,
    /// Address of the last non-control x87 instruction.
    pub fip: u64,
    /// Address of the last x87 memory operand.
    pub fdp: u64,
    /// ST0-ST7 as 80-bit values in the low 10 bytes of (low, high) 64-bit halves.
    pub st: [[u64; 2]; 8],
}

/// Names of the general-purpose registers in encoding order, for register dumps.
pub const GPR_NAMES: [&str; 16] = [
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13",
    "r14", "r15",
];

impl fmt::Display for CpuState {
    /// Formats the state as a register dump for error messages and logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, name) in GPR_NAMES.iter().enumerate() {
            let sep = if i % 4 == 3 { "\n" } else { "  " };
            write!(f, "{name:>3}={:016x}{sep}", self.gprs[i])?;
        }
        writeln!(f, "rip={:016x}  rflags={:08x}", self.rip, self.rflags)?;
        for (name, seg) in [
            ("cs", &self.cs),
            ("ss", &self.ss),
            ("ds", &self.ds),
            ("es", &self.es),
            ("fs", &self.fs),
            ("gs", &self.gs),
        ] {
            writeln!(
                f,
                " {name}={:04x} base={:016x} limit={:08x} type={:x} dpl={} l={} db={}",
                seg.selector, seg.base, seg.limit, seg.type_, seg.dpl, seg.l as u8, seg.db as u8
            )?;
        }
        writeln!(
            f,
            "cr0={:08x} cr2={:016x} cr3={:016x} cr4={:08x} efer={:x}",
            self.cr0, self.cr2, self.cr3, self.cr4, self.efer
        )?;
        write!(
            f,
            "gdt={:016x}/{:04x} idt={:016x}/{:04x}",
            self.gdt.base, self.gdt.limit, self.idt.base, self.idt.limit
        )
    }
}
