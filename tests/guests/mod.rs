//! Small NASM test guests and what each must leave behind, shared by the backend tests.
//!
//! Each [`GuestProgram`] names a source in this folder, the CPU mode that the harness
//! enters it in, how it ends and the final registers, memory and device accesses it
//! must produce. The table is backend-neutral: a backend test assembles the source,
//! writes it at [`LOAD_ADDRESS`], builds the entry state with [`entry_state`], runs it
//! through the `Vcpu` trait with a [`RecordingIo`] and checks the result.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use monstervm::core::boot::embedded::real_mode_state;
use monstervm::core::devices::BusDevice;
use monstervm::hypervisor::{CpuState, DescriptorTable, IoHandler, IrqChip, Segment, VcpuKicker};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest-physical address where every program is loaded and entered.
pub const LOAD_ADDRESS: u64 = 0x8000;
/// Guest-physical address of the GDT that [`entry_state`] writes for protected and long
/// mode: null, 0x08 flat 32-bit code, 0x10 flat data, 0x18 64-bit code.
pub const GDT_ADDRESS: u64 = 0x500;
/// Guest-physical address of the PML4 that [`entry_state`] writes for long mode. The
/// PDPT follows at +0x1000 and four page directories at +0x2000 to +0x5fff, mapping
/// the first 4 GiB one to one in 2 MiB pages.
pub const PML4_ADDRESS: u64 = 0x1000;
/// Port whose read or write ends a program: the harness kicks the vCPU, so `run`
/// returns `VcpuExit::Kicked`.
pub const EXIT_PORT: u16 = 0xf4;
/// Value of every byte that a read of [`EXIT_PORT`] returns.
pub const EXIT_PORT_READ_BYTE: u8 = 0x42;
/// Port whose write makes [`RecordingIo`] signal an MSI with vector [`MSI_VECTOR`] to
/// local APIC 0, in fixed delivery mode.
pub const MSI_REQUEST_PORT: u16 = 0xf0;
pub const MSI_VECTOR: u8 = 0x40;
/// Port whose write makes [`RecordingIo`] pulse interrupt line [`IRQ_REQUEST_GSI`].
pub const IRQ_REQUEST_PORT: u16 = 0xf1;
pub const IRQ_REQUEST_GSI: u32 = 4;
/// Value of every byte that an MMIO read returns from [`RecordingIo`].
pub const MMIO_READ_BYTE: u8 = 0x7e;

/// Indices into `CpuState::gprs`.
pub const RAX: usize = 0;
pub const RCX: usize = 1;
pub const RDX: usize = 2;
pub const RBX: usize = 3;
pub const RSP: usize = 4;
pub const R12: usize = 12;
pub const R13: usize = 13;
pub const R14: usize = 14;
pub const R15: usize = 15;

/// The CPU mode a program starts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// Real mode at CS:IP 0000:8000, all segments at base 0.
    Real,
    /// 32-bit protected mode with flat segments, paging off.
    Protected,
    /// 64-bit long mode with the identity map at [`PML4_ADDRESS`].
    Long,
}

/// How a program ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// HLT with interrupts disabled.
    Halt,
    /// A read or write of [`EXIT_PORT`].
    ExitPort,
    /// A triple fault.
    Shutdown,
}

/// A register check: `gprs[index] & mask == value`.
#[derive(Debug, Clone, Copy)]
pub struct RegisterCheck {
    pub name: &'static str,
    pub index: usize,
    pub mask: u64,
    pub value: u64,
}

const fn reg(name: &'static str, index: usize, mask: u64, value: u64) -> RegisterCheck {
    RegisterCheck {
        name,
        index,
        mask,
        value,
    }
}

/// A test program and the final state it must reach.
#[derive(Debug, Clone, Copy)]
pub struct GuestProgram {
    /// Source file stem in tests/guests.
    pub name: &'static str,
    pub mode: EntryMode,
    pub end: End,
    pub registers: &'static [RegisterCheck],
    /// Guest-physical address and the bytes expected there.
    pub memory: &'static [(u64, &'static [u8])],
    /// Port writes in order, with their data, leaving out those that [`RecordingIo`]
    /// does not record (serial, CMOS index and PIC ports).
    pub port_writes: &'static [(u16, &'static [u8])],
    /// MMIO writes in order, with their data.
    pub mmio_writes: &'static [(u64, &'static [u8])],
}

const U16: u64 = 0xffff;
const U32: u64 = 0xffff_ffff;
const ALL: u64 = u64::MAX;

/// Every test program with its expected final state.
pub const PROGRAMS: &[GuestProgram] = &[
    GuestProgram {
        name: "real_checksum",
        mode: EntryMode::Real,
        end: End::Halt,
        // "MonsterVM" 0x01 0xff 0x80 sums to 0x50b and XORs to 0x39.
        registers: &[reg("bx", RBX, U16, 0x50b), reg("dx", RDX, U16, 0x39)],
        memory: &[(0x9000, &[0xba, 0x13, 0x0b, 0x05, 0x39, 0x00])],
        port_writes: &[(0xe9, b"a"), (0xe9, b"b"), (0xe9, b"c"), (0x80, &[0x5a])],
        mmio_writes: &[],
    },
    GuestProgram {
        name: "protected_crc32",
        mode: EntryMode::Protected,
        end: End::ExitPort,
        registers: &[reg("eax", RAX, U32, 0xcbf4_3926)],
        memory: &[(0x9000, &[0x26, 0x39, 0xf4, 0xcb])],
        port_writes: &[(EXIT_PORT, &[0x26, 0x39, 0xf4, 0xcb])],
        mmio_writes: &[],
    },
    GuestProgram {
        name: "real_exit_read",
        mode: EntryMode::Real,
        end: End::ExitPort,
        registers: &[reg("ax", RAX, U16, 0x42)],
        memory: &[],
        port_writes: &[],
        mmio_writes: &[],
    },
    GuestProgram {
        name: "long_pagewalk",
        mode: EntryMode::Long,
        end: End::Halt,
        registers: &[
            reg("rax", RAX, ALL, 0x20_0123),
            reg("rbx", RBX, ALL, 0x1122_3344_5566_7788),
            reg("r12", R12, ALL, 0x7e7e_7e7e),
            // The filtered CPUID: leaf 0 capped at 7, the hypervisor bit in leaf 1
            // ECX, SSE2 (26) and FXSR (24) in leaf 1 EDX.
            // NOTE: only bits that every backend sets are checked in leaf 1, because
            // the kvm_pvm host module replaces leaf 1 ECX and EDX with the host's.
            reg("r15 (cpuid 0 eax)", R15, ALL, 7),
            reg("r13 (cpuid 1 ecx)", R13, 1 << 31, 1 << 31),
            reg(
                "r14 (cpuid 1 edx)",
                R14,
                (1 << 26) | (1 << 24),
                (1 << 26) | (1 << 24),
            ),
        ],
        memory: &[(0x20_0123, &[0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11])],
        port_writes: &[],
        mmio_writes: &[(0xd000_0000, &[0x0d, 0xf0, 0xfe, 0xca])],
    },
    GuestProgram {
        name: "long_lapic",
        mode: EntryMode::Long,
        end: End::Halt,
        // Delivery mode is bits 8-10: 7 is ExtINT, 4 is NMI. The APIC ID is bits 24-31.
        registers: &[
            reg("eax (LVT LINT0)", RAX, 0x700, 0x700),
            reg("ebx (LVT LINT1)", RBX, 0x700, 0x400),
            reg("ecx (APIC ID)", RCX, 0xff00_0000, 0),
        ],
        memory: &[],
        port_writes: &[],
        mmio_writes: &[],
    },
    GuestProgram {
        name: "long_msi",
        mode: EntryMode::Long,
        end: End::Halt,
        registers: &[],
        memory: &[],
        port_writes: &[(MSI_REQUEST_PORT, &[0]), (0xe9, &[MSI_VECTOR])],
        mmio_writes: &[],
    },
    GuestProgram {
        name: "long_ioapic",
        mode: EntryMode::Long,
        end: End::Halt,
        registers: &[],
        memory: &[],
        port_writes: &[(IRQ_REQUEST_PORT, &[0]), (0xe9, &[0x41])],
        mmio_writes: &[],
    },
    GuestProgram {
        name: "triple_fault",
        mode: EntryMode::Protected,
        end: End::Shutdown,
        registers: &[],
        memory: &[],
        port_writes: &[],
        mmio_writes: &[],
    },
];

/// Returns the program called `name` from [`PROGRAMS`].
pub fn program(name: &str) -> &'static GuestProgram {
    PROGRAMS
        .iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("no test program {name}"))
}

/// Assembles tests/guests/`name`.asm with `nasm -f bin` into a temporary file.
pub fn assemble(name: &str) -> Vec<u8> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/guests")
        .join(format!("{name}.asm"));
    let dir = tempfile::tempdir().expect("failed to create a temporary directory");
    let output = dir.path().join(format!("{name}.bin"));
    let result = std::process::Command::new("nasm")
        .args(["-f", "bin", "-o"])
        .arg(&output)
        .arg(&source)
        .output()
        .unwrap_or_else(|e| {
            panic!("failed to run nasm ({e}): install it with apt-get install nasm")
        });
    assert!(
        result.status.success(),
        "nasm failed on {}:\n{}",
        source.display(),
        String::from_utf8_lossy(&result.stderr)
    );
    std::fs::read(&output).expect("nasm wrote no output file")
}

/// Writes `code` at [`LOAD_ADDRESS`] and the tables that `mode` needs, and returns the
/// state that enters the code in `mode`.
pub fn load_program(memory: &GuestMemoryMmap, code: &[u8], mode: EntryMode) -> CpuState {
    memory
        .write_slice(code, GuestAddress(LOAD_ADDRESS))
        .expect("guest memory too small for the program");
    match mode {
        EntryMode::Real => real_mode_state(0, LOAD_ADDRESS as u16),
        EntryMode::Protected | EntryMode::Long => entry_state(memory, mode),
    }
}

/// Writes the GDT (and for long mode the page tables) and returns the entry state for
/// protected or long mode.
pub fn entry_state(memory: &GuestMemoryMmap, mode: EntryMode) -> CpuState {
    let gdt: [u64; 4] = [
        0,
        0x00cf_9a00_0000_ffff,
        0x00cf_9200_0000_ffff,
        0x00af_9a00_0000_ffff,
    ];
    for (i, entry) in gdt.iter().enumerate() {
        memory
            .write_obj(*entry, GuestAddress(GDT_ADDRESS + 8 * i as u64))
            .unwrap();
    }

    let flat = |selector: u16, type_: u8, long: bool| Segment {
        selector,
        base: 0,
        limit: 0xffff_ffff,
        type_,
        present: true,
        dpl: 0,
        db: !long,
        l: long,
        g: true,
        s: true,
        unusable: false,
    };
    let long = mode == EntryMode::Long;
    let data = flat(0x10, 0x3, false);
    let mut state = CpuState {
        rip: LOAD_ADDRESS,
        rflags: 0x2,
        cs: if long {
            flat(0x18, 0xb, true)
        } else {
            flat(0x08, 0xb, false)
        },
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr: Segment {
            limit: 0xffff,
            type_: 0xb,
            present: true,
            ..Segment::default()
        },
        ldt: Segment {
            unusable: true,
            ..Segment::default()
        },
        gdt: DescriptorTable {
            base: GDT_ADDRESS,
            limit: 31,
        },
        idt: DescriptorTable::default(),
        cr0: 0x11,
        ..CpuState::default()
    };
    state.gprs[RSP] = 0x7000;

    if long {
        write_identity_map(memory);
        state.gprs[RSP] = LOAD_ADDRESS;
        state.cr0 = 0x8000_0011;
        state.cr3 = PML4_ADDRESS;
        state.cr4 = 0x20;
        state.efer = 0x500;
    }
    state
}

/// Identity-maps the first 4 GiB with 2 MiB pages at [`PML4_ADDRESS`].
fn write_identity_map(memory: &GuestMemoryMmap) {
    let pdpt = PML4_ADDRESS + 0x1000;
    let first_pd = PML4_ADDRESS + 0x2000;
    memory
        .write_obj(pdpt | 0x3, GuestAddress(PML4_ADDRESS))
        .unwrap();
    for directory in 0..4u64 {
        let pd = first_pd + directory * 0x1000;
        memory
            .write_obj(pd | 0x3, GuestAddress(pdpt + directory * 8))
            .unwrap();
        for entry in 0..512u64 {
            let physical = (directory << 30) | (entry << 21);
            memory
                .write_obj(physical | 0x83, GuestAddress(pd + entry * 8))
                .unwrap();
        }
    }
}

/// A polled 16550 at 0x3f8 that transmits into a buffer and receives from a queue.
#[derive(Debug, Default)]
pub struct SerialStub {
    pub output: Vec<u8>,
    pub input: VecDeque<u8>,
    line_control: u8,
}

impl SerialStub {
    const DLAB: u8 = 0x80;

    fn read_register(&mut self, offset: u16) -> u8 {
        match offset {
            0 if self.line_control & Self::DLAB == 0 => self.input.pop_front().unwrap_or(0),
            3 => self.line_control,
            // Transmitter empty and idle, plus data ready when input is queued.
            5 => 0x60 | u8::from(!self.input.is_empty()),
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u16, value: u8) {
        match offset {
            0 if self.line_control & Self::DLAB == 0 => self.output.push(value),
            3 => self.line_control = value,
            _ => {}
        }
    }
}

/// The stub as a bus device at the base of an 8-port range, for tests of the VM loop.
impl BusDevice for SerialStub {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(self.read_register(offset as u16));
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.write_register(offset as u16, data[0]);
    }
}

/// Everything the guest did through port I/O and MMIO.
#[derive(Debug, Default)]
pub struct Recorded {
    /// Port writes other than to the serial port, in order.
    pub port_writes: Vec<(u16, Vec<u8>)>,
    pub mmio_writes: Vec<(u64, Vec<u8>)>,
    pub serial: SerialStub,
}

/// An `IoHandler` that records accesses, runs a [`SerialStub`] at 0x3f8, kicks the
/// vCPU when the guest accesses [`EXIT_PORT`] or writes `stop_port`, and raises an
/// interrupt through `irq_chip` when the guest writes [`MSI_REQUEST_PORT`] or
/// [`IRQ_REQUEST_PORT`].
pub struct RecordingIo {
    pub recorded: Mutex<Recorded>,
    pub kicker: OnceLock<Arc<dyn VcpuKicker>>,
    pub irq_chip: OnceLock<Arc<dyn IrqChip>>,
    pub stop_port: u16,
}

impl RecordingIo {
    pub fn new(stop_port: u16) -> Self {
        RecordingIo {
            recorded: Mutex::new(Recorded::default()),
            kicker: OnceLock::new(),
            irq_chip: OnceLock::new(),
            stop_port,
        }
    }

    fn stop(&self) {
        if let Some(kicker) = self.kicker.get() {
            kicker.kick();
        }
    }
}

impl IoHandler for RecordingIo {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        let mut recorded = self.recorded.lock().unwrap();
        match port {
            0x3f8..=0x3ff => data.fill(recorded.serial.read_register(port - 0x3f8)),
            EXIT_PORT => data.fill(EXIT_PORT_READ_BYTE),
            _ => data.fill(0xff),
        }
        drop(recorded);
        if port == EXIT_PORT {
            self.stop();
        }
    }

    fn pio_write(&self, port: u16, data: &[u8]) {
        let mut recorded = self.recorded.lock().unwrap();
        match port {
            0x3f8..=0x3ff => recorded.serial.write_register(port - 0x3f8, data[0]),
            // CMOS index writes are noise for the checks. PIC writes reach an
            // IoHandler on some backends only (KVM handles them in the kernel).
            0x70 | 0x20 | 0x21 | 0xa0 | 0xa1 => {}
            _ => recorded.port_writes.push((port, data.to_vec())),
        }
        drop(recorded);
        if port == EXIT_PORT || port == self.stop_port {
            self.stop();
        }
        if port == MSI_REQUEST_PORT {
            let irq_chip = self
                .irq_chip
                .get()
                .expect("the test set no IrqChip for MSIs");
            irq_chip
                .signal_msi(0xfee0_0000, u32::from(MSI_VECTOR))
                .expect("signal_msi failed");
        }
        if port == IRQ_REQUEST_PORT {
            let irq_chip = self.irq_chip.get().expect("the test set no IrqChip");
            irq_chip
                .pulse_irq(IRQ_REQUEST_GSI)
                .expect("pulse_irq failed");
        }
    }

    fn mmio_read(&self, _addr: u64, data: &mut [u8]) {
        data.fill(MMIO_READ_BYTE);
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) {
        let mut recorded = self.recorded.lock().unwrap();
        recorded.mmio_writes.push((addr, data.to_vec()));
    }
}

/// Checks `exit`, the final `state`, `memory` and the recorded accesses against
/// `program`, with one assert per expectation.
pub fn assert_final_state(
    program: &GuestProgram,
    exit: &monstervm::hypervisor::VcpuExit,
    state: &CpuState,
    memory: &GuestMemoryMmap,
    recorded: &Recorded,
) {
    use monstervm::hypervisor::VcpuExit;

    let name = program.name;
    let expected_exit = match program.end {
        End::Halt => VcpuExit::Halted,
        End::ExitPort => VcpuExit::Kicked,
        End::Shutdown => VcpuExit::Shutdown,
    };
    assert_eq!(*exit, expected_exit, "{name}: exit\n{state}");
    if program.end == End::ExitPort {
        // The IN or OUT at the exit port must be complete, so RIP is past it. Every
        // program that ends this way puts a HLT right after it.
        let next: u8 = memory.read_obj(GuestAddress(state.rip)).unwrap();
        assert_eq!(
            next, 0xf4,
            "{name}: RIP {:#x} is not at the HLT after the exit",
            state.rip
        );
    }

    for check in program.registers {
        assert_eq!(
            state.gprs[check.index] & check.mask,
            check.value,
            "{name}: {} is {:#x}, masked with {:#x}\n{state}",
            check.name,
            state.gprs[check.index],
            check.mask
        );
    }
    for (address, expected) in program.memory {
        let mut actual = vec![0u8; expected.len()];
        memory
            .read_slice(&mut actual, GuestAddress(*address))
            .unwrap();
        assert_eq!(&actual, expected, "{name}: memory at {address:#x}");
    }

    let expected_ports: Vec<(u16, Vec<u8>)> = program
        .port_writes
        .iter()
        .map(|(port, data)| (*port, data.to_vec()))
        .collect();
    assert_eq!(recorded.port_writes, expected_ports, "{name}: port writes");
    let expected_mmio: Vec<(u64, Vec<u8>)> = program
        .mmio_writes
        .iter()
        .map(|(address, data)| (*address, data.to_vec()))
        .collect();
    assert_eq!(recorded.mmio_writes, expected_mmio, "{name}: MMIO writes");
}
