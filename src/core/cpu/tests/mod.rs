//! Tests that run NASM-assembled guest code on a `Cpu` over a small guest RAM.
//!
//! `Machine::long_mode` prepends [`PRELUDE`] to the test's source. The prelude jumps to
//! `start` and contains a table of exception handlers at `ORG + 8`, which the harness
//! installs in the IDT. Their common handler records the vector, error code, CR2 and
//! faulting RIP at [`RESULTS`] and halts.

mod alu;
mod decode;
mod interrupts;
mod modes;
mod paging;
mod string;
mod system;
mod x87;

use std::collections::VecDeque;
use std::process::Command;
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::state::*;
use super::{CodeWatch, Cpu, CpuBus, CpuConfig, CpuEvent};
use crate::hypervisor::{DescriptorTable, Segment};

/// Guest RAM size of the test machines.
pub const RAM: usize = 8 << 20;
/// Load address of the code of long-mode tests.
pub const ORG: u64 = 0x10000;
/// Address at which the prelude's exception handler records what it caught.
pub const RESULTS: u64 = 0x90000;
/// Initial stack pointer of long-mode tests.
pub const STACK: u64 = 0x80000;
pub const PML4: u64 = 0x1000;
/// Page table for the first 2 MiB, mapped with 4 KiB pages so tests can change them.
pub const PT0: u64 = 0x4000;
pub const GDT: u64 = 0x5000;
pub const IDT: u64 = 0x6000;
pub const TSS: u64 = 0x7000;
/// Kernel stack used on a privilege change (TSS.RSP0).
pub const KERNEL_STACK: u64 = 0x70000;
/// Stack used for IST 1.
pub const IST_STACK: u64 = 0x60000;

pub const PRELUDE: &str = r#"
bits 64
org 0x10000
RESULTS equ 0x90000
; SET_GATE vector, handler: a 64-bit interrupt gate with DPL 3.
%macro SET_GATE 2
    lea rax, [rel %2]
    mov word [abs 0x6000 + %1 * 16], ax
    mov word [abs 0x6000 + %1 * 16 + 2], 0x10
    mov word [abs 0x6000 + %1 * 16 + 4], 0xee00
    shr rax, 16
    mov word [abs 0x6000 + %1 * 16 + 6], ax
    shr rax, 16
    mov dword [abs 0x6000 + %1 * 16 + 8], eax
%endmacro
    jmp start
align 8
handler_table:
%assign i 0
%rep 32
    dq exception_ %+ i
%assign i i+1
%endrep
%assign i 0
%rep 32
exception_ %+ i:
%if i = 8 || (i >= 10 && i <= 14) || i = 17
%else
    push 0
%endif
    push i
    jmp exception_common
%assign i i+1
%endrep
exception_common:
    pop qword [abs RESULTS]
    pop qword [abs RESULTS + 8]
    push rax
    mov rax, cr2
    mov [abs RESULTS + 16], rax
    mov rax, [rsp + 8]
    mov [abs RESULTS + 24], rax
    pop rax
    inc qword [abs RESULTS + 32]
    mov [abs RESULTS + 40], rsp
    hlt
    jmp $
"#;

/// Assembles `source` with `nasm -f bin`.
pub fn assemble(source: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("temporary directory");
    let input = dir.path().join("test.asm");
    let output = dir.path().join("test.bin");
    std::fs::write(&input, source).expect("write NASM source");
    let result = Command::new("nasm")
        .args(["-f", "bin", "-o"])
        .arg(&output)
        .arg(&input)
        .output()
        .expect("nasm must be installed (apt-get install nasm)");
    assert!(
        result.status.success(),
        "nasm failed:\n{}",
        String::from_utf8_lossy(&result.stderr)
    );
    std::fs::read(&output).expect("read NASM output")
}

/// A platform for tests: RAM, logged port and MMIO writes, a queue of interrupts.
pub struct TestBus {
    pub memory: GuestMemoryMmap,
    /// (port, value) of every OUT.
    pub port_writes: Vec<(u16, u32)>,
    /// Value returned by every IN.
    pub port_input: u32,
    /// (address, value) of every MMIO write.
    pub mmio_writes: Vec<(u64, u64)>,
    /// Vectors waiting to be delivered.
    pub interrupts: VecDeque<u8>,
    pub tsc: u64,
}

impl TestBus {
    pub fn new() -> Self {
        TestBus {
            memory: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM)]).unwrap(),
            port_writes: Vec::new(),
            port_input: 0,
            mmio_writes: Vec::new(),
            interrupts: VecDeque::new(),
            tsc: 0,
        }
    }
}

impl CpuBus for TestBus {
    fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }
    fn pio_read(&mut self, _port: u16, data: &mut [u8]) {
        let bytes = self.port_input.to_le_bytes();
        data.copy_from_slice(&bytes[..data.len()]);
    }
    fn pio_write(&mut self, port: u16, data: &[u8]) {
        let mut bytes = [0u8; 4];
        bytes[..data.len()].copy_from_slice(data);
        self.port_writes.push((port, u32::from_le_bytes(bytes)));
    }
    fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        let value = addr ^ 0x5a5a_5a5a;
        data.copy_from_slice(&value.to_le_bytes()[..data.len()]);
    }
    fn mmio_write(&mut self, addr: u64, data: &[u8]) {
        let mut bytes = [0u8; 8];
        bytes[..data.len()].copy_from_slice(data);
        self.mmio_writes.push((addr, u64::from_le_bytes(bytes)));
    }
    fn tsc(&mut self) -> u64 {
        self.tsc += 1000;
        self.tsc
    }
    fn interrupt_pending(&self) -> bool {
        !self.interrupts.is_empty()
    }
    fn acknowledge_interrupt(&mut self) -> Option<u8> {
        self.interrupts.pop_front()
    }
}

/// A CPU and its bus.
pub struct Machine {
    pub cpu: Cpu,
    pub bus: TestBus,
}

/// Returns a flat code or data segment descriptor.
pub fn descriptor(code: bool, long: bool, dpl: u64) -> u64 {
    let access = 0x92 | if code { 0x08 | 0x02 } else { 0 } | (dpl << 5);
    let flags = if long { 0xa } else { 0xc };
    0xffff | (access << 40) | (0xf << 48) | (flags << 52)
}

/// Converts a descriptor to the segment register contents it loads.
pub fn segment(raw: u64, selector: u16) -> Segment {
    super::segments::parse_descriptor(raw, selector)
}

impl Machine {
    pub fn new() -> Self {
        let bus = TestBus::new();
        let watch = Arc::new(CodeWatch::new(&bus.memory));
        Machine {
            cpu: Cpu::new(CpuConfig::default(), watch),
            bus,
        }
    }

    pub fn write_u64(&self, addr: u64, value: u64) {
        self.bus
            .memory
            .write_obj(value, GuestAddress(addr))
            .unwrap();
    }

    pub fn read_u64(&self, addr: u64) -> u64 {
        self.bus.memory.read_obj(GuestAddress(addr)).unwrap()
    }

    pub fn load(&self, addr: u64, bytes: &[u8]) {
        self.bus
            .memory
            .write_slice(bytes, GuestAddress(addr))
            .unwrap();
    }

    /// Runs at most `limit` instructions.
    pub fn run(&mut self, limit: u64) -> CpuEvent {
        self.cpu
            .run(&mut self.bus, limit)
            .expect("no unsupported feature")
    }

    /// Vector recorded by the prelude's exception handler.
    pub fn vector(&self) -> u64 {
        self.read_u64(RESULTS)
    }
    pub fn error_code(&self) -> u64 {
        self.read_u64(RESULTS + 8)
    }
    pub fn cr2(&self) -> u64 {
        self.read_u64(RESULTS + 16)
    }
    pub fn fault_rip(&self) -> u64 {
        self.read_u64(RESULTS + 24)
    }
    pub fn exception_count(&self) -> u64 {
        self.read_u64(RESULTS + 32)
    }

    /// Writes 4-level page tables that identity-map 1 GiB: the first 2 MiB with 4 KiB
    /// pages (PT0), the rest with 2 MiB pages, and 3-4 GiB with one 1 GiB page. Every
    /// entry is present, writable and user-accessible.
    pub fn identity_map(&self) {
        self.write_u64(PML4, 0x2000 | 7);
        self.write_u64(0x2000, 0x3000 | 7);
        // 3-4 GiB as one 1 GiB page, for the MMIO hole below 4 GiB.
        self.write_u64(0x2000 + 3 * 8, 0xc000_0000 | 0x87);
        self.write_u64(0x3000, PT0 | 7);
        for i in 1..512u64 {
            self.write_u64(0x3000 + i * 8, (i << 21) | 0x87);
        }
        for i in 0..512u64 {
            self.write_u64(PT0 + i * 8, (i << 12) | 7);
        }
    }

    /// Sets the 4 KiB page-table entry of `linear` (below 2 MiB).
    pub fn set_pte(&self, linear: u64, value: u64) {
        self.write_u64(PT0 + (linear >> 12) * 8, value);
    }

    /// Assembles PRELUDE + `source` and starts it in 64-bit mode at CPL 0 with paging,
    /// GDT (Linux's selectors), IDT for vectors 0-31, and TSS.
    pub fn long_mode(source: &str) -> Self {
        let code = assemble(&format!("{PRELUDE}\n{source}"));
        let mut m = Machine::new();
        m.load(ORG, &code);
        m.identity_map();

        let gdt = [
            0,
            descriptor(true, false, 0),  // 0x08: 32-bit kernel code
            descriptor(true, true, 0),   // 0x10: 64-bit kernel code
            descriptor(false, false, 0), // 0x18: kernel data
            descriptor(true, false, 3),  // 0x20: 32-bit user code
            descriptor(false, false, 3), // 0x28: user data
            descriptor(true, true, 3),   // 0x30: 64-bit user code
            0,
            // 0x40: 64-bit TSS, 16 bytes.
            0x67 | ((TSS & 0xff_ffff) << 16) | (0x89 << 40) | ((TSS >> 24) << 56),
            TSS >> 32,
        ];
        for (i, entry) in gdt.iter().enumerate() {
            m.write_u64(GDT + i as u64 * 8, *entry);
        }
        m.write_u64(TSS + 4, KERNEL_STACK);
        m.write_u64(TSS + 0x24, IST_STACK);
        for vector in 0..32u64 {
            let handler = m.read_u64(ORG + 8 + vector * 8);
            m.set_gate(vector as u8, handler, 0, 0);
        }

        let cpu = &mut m.cpu;
        cpu.cr0 = CR0_PE | CR0_PG | CR0_WP | CR0_ET | CR0_NE;
        cpu.cr3 = PML4;
        cpu.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
        cpu.efer = EFER_LME | EFER_LMA | EFER_NXE | EFER_SCE;
        cpu.gdtr = DescriptorTable {
            base: GDT,
            limit: 10 * 8 - 1,
        };
        cpu.idtr = DescriptorTable {
            base: IDT,
            limit: 256 * 16 - 1,
        };
        cpu.seg[CS] = segment(descriptor(true, true, 0), 0x10);
        for seg in [DS, ES, SS, FS, GS] {
            cpu.seg[seg] = segment(descriptor(false, false, 0), 0x18);
        }
        cpu.tr = segment(0x67 | ((TSS & 0xff_ffff) << 16) | (0x8b << 40), 0x40);
        cpu.rip = ORG;
        cpu.gpr[4] = STACK;
        cpu.set_rflags(0x2);
        m
    }

    /// Installs a 64-bit interrupt gate for `vector`.
    pub fn set_gate(&self, vector: u8, handler: u64, ist: u64, dpl: u64) {
        let low = (handler & 0xffff)
            | (0x10 << 16)
            | (ist << 32)
            | ((0x8e | (dpl << 5)) << 40)
            | ((handler >> 16) & 0xffff) << 48;
        self.write_u64(IDT + u64::from(vector) * 16, low);
        self.write_u64(IDT + u64::from(vector) * 16 + 8, handler >> 32);
    }

    /// Loads `source` (16-bit code, `org 0x7c00`) and starts it in real mode.
    pub fn real_mode(source: &str) -> Self {
        let code = assemble(source);
        let mut m = Machine::new();
        m.load(0x7c00, &code);
        m.cpu.load_real_mode_segment(CS, 0);
        m.cpu.rip = 0x7c00;
        m.cpu.gpr[4] = 0x7000;
        m
    }
}

/// The emulator backend moves each `Cpu` to its vCPU thread, and devices share the
/// `CodeWatch` across threads.
#[test]
fn cpu_is_send_and_code_watch_is_sync() {
    fn assert_send<T: Send>() {}
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send::<Cpu>();
    assert_send_sync::<CodeWatch>();
}
