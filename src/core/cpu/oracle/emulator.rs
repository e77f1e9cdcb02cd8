//! The emulated runner: executes a snippet on MonsterVM's emulator in 64-bit user mode,
//! from the same [`UserState`] that the native runner takes.
//!
//! The harness builds a minimal long-mode machine in 2 MiB of guest RAM. The user pages
//! sit at the same virtual addresses as in the native child, and everything else is
//! supervisor-only:
//!
//! ```text
//! physical   virtual              contents
//! 0x01000    -                    PML4, then PDPT, PD, and two page tables
//! 0x10000    0x10000 (kernel)     GDT: null, kernel code 0x08, kernel data 0x10,
//!                                 user data 0x1b, user code 0x23, TSS 0x28
//! 0x11000    0x11000 (kernel)     IDT: 256 interrupt gates, vector v -> 0x13000 + 16 v
//! 0x12000    0x12000 (kernel)     TSS, RSP0 = 0x16000
//! 0x13000    0x13000 (kernel)     exception handlers: HLT, 16 bytes apart
//! 0x14000    0x14000 (kernel)     kernel stack, 8 KiB
//! 0x20000    CODE_ADDR (user)     the snippet, then HLT filling the page (read, execute)
//! 0x21000    DATA_ADDR (user)     the data area (read, write, no execute)
//! ```
//!
//! The CPU starts at CPL 3 with flat segments. The harness steps one instruction at a
//! time until RIP reaches the end of the snippet. An exception enters its handler at
//! CPL 0; the harness then reads the vector from the handler address and the faulting
//! RIP, RFLAGS, RSP and error code from the exception frame on the kernel stack.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use iced_x86::CpuidFeature;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::state::{Fault, UserState, CODE_ADDR, CODE_CAPACITY, DATA_ADDR, DATA_SIZE, RSP};
use super::OracleError;
use crate::core::cpu::cpuid::cpuid;
use crate::core::cpu::{CodeWatch, Cpu, CpuBus, CpuConfig, CpuEvent};
use crate::hypervisor::{DescriptorTable, Segment};

/// Instructions the emulator may retire before the harness declares the snippet
/// runaway. Generated snippets retire at most a few dozen.
pub const MAX_INSTRUCTIONS: u64 = 10_000;

const PML4_ADDR: u64 = 0x1000;
const PDPT_ADDR: u64 = 0x2000;
const PD_ADDR: u64 = 0x3000;
const KERNEL_PT_ADDR: u64 = 0x4000;
const USER_PT_ADDR: u64 = 0x5000;
const GDT_ADDR: u64 = 0x10000;
const IDT_ADDR: u64 = 0x11000;
const TSS_ADDR: u64 = 0x12000;
const HANDLERS_ADDR: u64 = 0x13000;
const HANDLER_STRIDE: u64 = 16;
const KERNEL_STACK_TOP: u64 = 0x16000;
const CODE_PHYS: u64 = 0x20000;
const DATA_PHYS: u64 = 0x21000;
const GUEST_MEMORY_MIB: u64 = 2;

const KERNEL_CODE_SELECTOR: u16 = 0x08;
const USER_DATA_SELECTOR: u16 = 0x18 | 3;
const USER_CODE_SELECTOR: u16 = 0x20 | 3;
const TSS_SELECTOR: u16 = 0x28;

const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_NO_EXECUTE: u64 = 1 << 63;

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_AM: u64 = 1 << 18;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_SCE: u64 = 1 << 0;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;

/// The platform of the harness: RAM only, no devices, no interrupts.
struct HarnessBus {
    memory: GuestMemoryMmap,
}

impl CpuBus for HarnessBus {
    fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    fn pio_read(&mut self, _port: u16, data: &mut [u8]) {
        data.fill(0xFF);
    }

    fn pio_write(&mut self, _port: u16, _data: &[u8]) {}

    fn mmio_read(&mut self, _addr: u64, data: &mut [u8]) {
        data.fill(0xFF);
    }

    fn mmio_write(&mut self, _addr: u64, _data: &[u8]) {}

    fn tsc(&mut self) -> u64 {
        0
    }

    fn interrupt_pending(&self) -> bool {
        false
    }

    fn acknowledge_interrupt(&mut self) -> Option<u8> {
        None
    }
}

/// Returns whether the emulator's CPUID (with the default [`CpuConfig`]) advertises
/// `feature`. A CPU may execute an instruction of a feature it does not advertise
/// differently (TZCNT runs as BSF without BMI1), so the harness tests only advertised
/// ones. Features that no generated class uses count as missing.
pub fn emulator_supports(feature: CpuidFeature) -> bool {
    let config = CpuConfig::default();
    let bit =
        |leaf: u32, register: usize, bit: u32| cpuid(&config, leaf, 0)[register] & (1 << bit) != 0;
    const EBX: usize = 1;
    const ECX: usize = 2;
    const EDX: usize = 3;
    match feature {
        CpuidFeature::INTEL8086
        | CpuidFeature::INTEL186
        | CpuidFeature::INTEL386
        | CpuidFeature::INTEL486 => true,
        CpuidFeature::X64 => bit(0x8000_0001, EDX, 29),
        CpuidFeature::CMOV => bit(1, EDX, 15),
        CpuidFeature::CX8 => bit(1, EDX, 8),
        CpuidFeature::CMPXCHG16B => bit(1, ECX, 13),
        CpuidFeature::SSE => bit(1, EDX, 25),
        CpuidFeature::SSE2 => bit(1, EDX, 26),
        CpuidFeature::POPCNT => bit(1, ECX, 23),
        CpuidFeature::LZCNT => bit(0x8000_0001, ECX, 5),
        CpuidFeature::BMI1 => bit(7, EBX, 3),
        _ => false,
    }
}

/// Runs `code` on the emulator from the state `input` and returns the state at its end,
/// or at the exception that stopped it.
pub fn run_emulated(code: &[u8], input: &UserState) -> Result<UserState, OracleError> {
    if code.len() > CODE_CAPACITY {
        return Err(OracleError::CodeTooLong {
            len: code.len(),
            max: CODE_CAPACITY,
        });
    }
    if input.data.len() != DATA_SIZE {
        return Err(OracleError::DataSize {
            len: input.data.len(),
            expected: DATA_SIZE,
        });
    }
    let memory = build_machine(code, input)?;
    let mut cpu = Cpu::new(CpuConfig::default(), Arc::new(CodeWatch::new(&memory)));
    let mut bus = HarnessBus { memory };
    enter_user_mode(&mut cpu, input);

    // A panic in the emulator is a bug that the harness must report like a mismatch,
    // without losing the rest of the run. The CPU is discarded afterwards, so a broken
    // invariant inside it cannot leak.
    let end = CODE_ADDR + code.len() as u64;
    std::panic::catch_unwind(AssertUnwindSafe(|| step_to_end(&mut cpu, &mut bus, end)))
        .unwrap_or_else(|payload| {
            let message = payload
                .downcast_ref::<&str>()
                .map(|text| text.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".to_string());
            Err(OracleError::EmulatorPanicked { message })
        })
}

/// Steps `cpu` until RIP reaches `end` in user mode or an exception enters its handler.
fn step_to_end(cpu: &mut Cpu, bus: &mut HarnessBus, end: u64) -> Result<UserState, OracleError> {
    for _ in 0..MAX_INSTRUCTIONS {
        if cpu.rip == end && cpu.cpl() == 3 {
            return user_state(cpu, &bus.memory);
        }
        let event = cpu.run(bus, 1).map_err(OracleError::Emulator)?;
        match event {
            CpuEvent::BudgetExhausted => {}
            CpuEvent::Halted => {
                return Err(OracleError::EmulatorStopped {
                    reason: "halted",
                    rip: cpu.rip,
                })
            }
            CpuEvent::Shutdown => {
                return Err(OracleError::EmulatorStopped {
                    reason: "triple fault",
                    rip: cpu.rip,
                })
            }
        }
        if cpu.cpl() == 0 {
            return exception_state(cpu, &bus.memory);
        }
    }
    Err(OracleError::EmulatorRunaway {
        max: MAX_INSTRUCTIONS,
        rip: cpu.rip,
    })
}

/// Creates guest RAM with the page tables, descriptor tables, handlers, snippet and
/// data area described in the module documentation.
fn build_machine(code: &[u8], input: &UserState) -> Result<GuestMemoryMmap, OracleError> {
    let memory = crate::core::memory::create_guest_memory(GUEST_MEMORY_MIB)
        .map_err(|error| OracleError::GuestMemory(error.to_string()))?;
    let write = |address: u64, bytes: &[u8]| {
        memory
            .write_slice(bytes, GuestAddress(address))
            .map_err(|error| OracleError::GuestMemory(format!("write at {address:#x}: {error}")))
    };
    let write_u64 = |address: u64, value: u64| write(address, &value.to_le_bytes());

    // Paging: one PML4, PDPT and PD entry cover the low 1 GiB; the PD points at one page
    // table for the kernel pages at 0x10000 and one for the user pages at CODE_ADDR.
    let table = PTE_PRESENT | PTE_WRITABLE | PTE_USER;
    write_u64(PML4_ADDR, PDPT_ADDR | table)?;
    write_u64(PDPT_ADDR, PD_ADDR | table)?;
    write_u64(PD_ADDR, KERNEL_PT_ADDR | table)?;
    let user_pd_index = (CODE_ADDR >> 21) & 0x1FF;
    write_u64(PD_ADDR + 8 * user_pd_index, USER_PT_ADDR | table)?;
    for page in (GDT_ADDR..KERNEL_STACK_TOP).step_by(0x1000) {
        let index = (page >> 12) & 0x1FF;
        write_u64(
            KERNEL_PT_ADDR + 8 * index,
            page | PTE_PRESENT | PTE_WRITABLE,
        )?;
    }
    let code_index = (CODE_ADDR >> 12) & 0x1FF;
    write_u64(
        USER_PT_ADDR + 8 * code_index,
        CODE_PHYS | PTE_PRESENT | PTE_USER,
    )?;
    for page in 0..(DATA_SIZE as u64 / 0x1000) {
        let index = ((DATA_ADDR >> 12) & 0x1FF) + page;
        let entry =
            (DATA_PHYS + page * 0x1000) | PTE_PRESENT | PTE_WRITABLE | PTE_USER | PTE_NO_EXECUTE;
        write_u64(USER_PT_ADDR + 8 * index, entry)?;
    }

    // GDT. TSS descriptor: 64-bit available TSS (type 9), limit 0x67.
    let descriptors: [u64; 5] = [
        0,
        0x00AF_9A00_0000_FFFF,
        0x00CF_9200_0000_FFFF,
        0x00CF_F200_0000_FFFF,
        0x00AF_FA00_0000_FFFF,
    ];
    for (index, descriptor) in descriptors.iter().enumerate() {
        write_u64(GDT_ADDR + 8 * index as u64, *descriptor)?;
    }
    let tss_low =
        0x67 | ((TSS_ADDR & 0xFF_FFFF) << 16) | (0x89 << 40) | ((TSS_ADDR >> 24) & 0xFF) << 56;
    write_u64(GDT_ADDR + u64::from(TSS_SELECTOR), tss_low)?;
    write_u64(GDT_ADDR + u64::from(TSS_SELECTOR) + 8, TSS_ADDR >> 32)?;

    // IDT: present DPL-0 64-bit interrupt gates into the handler slots.
    for vector in 0..256u64 {
        let handler = HANDLERS_ADDR + HANDLER_STRIDE * vector;
        let low = (handler & 0xFFFF)
            | (u64::from(KERNEL_CODE_SELECTOR) << 16)
            | (0x8E << 40)
            | ((handler >> 16) & 0xFFFF) << 48;
        write_u64(IDT_ADDR + 16 * vector, low)?;
        write_u64(IDT_ADDR + 16 * vector + 8, handler >> 32)?;
    }
    write_u64(TSS_ADDR + 4, KERNEL_STACK_TOP)?;
    write(TSS_ADDR + 0x66, &0x68u16.to_le_bytes())?;
    write(HANDLERS_ADDR, &[0xF4; 256 * HANDLER_STRIDE as usize])?;

    // The snippet, then HLT to the end of the page: running past the end raises #GP.
    let mut page = vec![0xF4u8; CODE_CAPACITY];
    page[..code.len()].copy_from_slice(code);
    write(CODE_PHYS, &page)?;
    write(DATA_PHYS, &input.data)?;
    Ok(memory)
}

/// Puts the CPU in 64-bit mode at CPL 3 at the snippet's start, with the input's
/// registers.
fn enter_user_mode(cpu: &mut Cpu, input: &UserState) {
    let flat = |selector: u16, type_: u8, dpl: u8, code: bool| Segment {
        selector,
        base: 0,
        limit: 0xFFFF_FFFF,
        type_,
        present: true,
        dpl,
        db: !code,
        l: code,
        g: true,
        s: true,
        unusable: false,
    };
    let data = flat(USER_DATA_SELECTOR, 0x3, 3, false);
    let null = Segment {
        unusable: true,
        ..Segment::default()
    };

    cpu.seg = [
        data,
        flat(USER_CODE_SELECTOR, 0xB, 3, true),
        data,
        data,
        null,
        null,
    ];
    cpu.tr = Segment {
        selector: TSS_SELECTOR,
        base: TSS_ADDR,
        limit: 0x67,
        type_: 0xB,
        present: true,
        ..Segment::default()
    };
    cpu.gdtr = DescriptorTable {
        base: GDT_ADDR,
        limit: 0x37,
    };
    cpu.idtr = DescriptorTable {
        base: IDT_ADDR,
        limit: 0xFFF,
    };

    // CR0.AM is set, as Linux sets it, although no snippet sets RFLAGS.AC.
    cpu.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG;
    cpu.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    cpu.efer = EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE;
    cpu.cr3 = PML4_ADDR;

    cpu.gpr = input.gprs;
    cpu.rip = CODE_ADDR;
    cpu.set_rflags(input.effective_rflags());
    cpu.xmm = input.xmm;
    cpu.mxcsr = input.mxcsr;
}

/// Reads the registers, RFLAGS and the data area, with no fault.
fn user_state(cpu: &Cpu, memory: &GuestMemoryMmap) -> Result<UserState, OracleError> {
    let mut data = vec![0u8; DATA_SIZE];
    memory
        .read_slice(&mut data, GuestAddress(DATA_PHYS))
        .map_err(|error| OracleError::GuestMemory(format!("read of the data area: {error}")))?;
    Ok(UserState {
        gprs: cpu.gpr,
        rflags: cpu.rflags(),
        xmm: cpu.xmm,
        mxcsr: cpu.mxcsr,
        data,
        fault: None,
    })
}

/// Builds the output state of a snippet whose exception the CPU just delivered: the
/// vector from the handler address, the rest from the exception frame.
fn exception_state(cpu: &Cpu, memory: &GuestMemoryMmap) -> Result<UserState, OracleError> {
    let handlers = HANDLERS_ADDR..HANDLERS_ADDR + 256 * HANDLER_STRIDE;
    if !handlers.contains(&cpu.rip) || (cpu.rip - HANDLERS_ADDR) % HANDLER_STRIDE != 0 {
        return Err(OracleError::EmulatorStopped {
            reason: "entered CPL 0 outside the exception handlers",
            rip: cpu.rip,
        });
    }

    let vector = ((cpu.rip - HANDLERS_ADDR) / HANDLER_STRIDE) as u8;
    let frame = cpu.gpr[RSP];
    let read_u64 = |address: u64| {
        memory
            .read_obj::<u64>(GuestAddress(address))
            .map_err(|error| {
                OracleError::GuestMemory(format!(
                    "read of the exception frame at {address:#x}: {error}"
                ))
            })
    };
    // #DF, #TS, #NP, #SS, #GP, #PF, #AC and #CP push an error code below RIP.
    let has_error_code = matches!(vector, 8 | 10..=14 | 17 | 21);
    let (error_code, rip_slot) = if has_error_code {
        (read_u64(frame)?, frame + 8)
    } else {
        (0, frame)
    };

    let mut output = user_state(cpu, memory)?;
    output.rflags = read_u64(rip_slot + 16)?;
    output.gprs[RSP] = read_u64(rip_slot + 24)?;
    output.fault = Some(Fault {
        signal: 0,
        vector,
        error_code,
        rip: read_u64(rip_slot)?,
        address: if vector == 14 { cpu.cr2 } else { 0 },
    });
    Ok(output)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::cpu::oracle::state::{FLAG_CF, FLAG_ZF, RCX};

    #[test]
    fn add_runs_to_snippet_end() {
        // add rax, rbx
        let mut input = UserState::new();
        input.gprs[0] = u64::MAX;
        input.gprs[3] = 1;
        let output = run_emulated(&[0x48, 0x01, 0xD8], &input).unwrap();
        assert_eq!(output.fault, None);
        assert_eq!(output.gprs[0], 0);
        assert_ne!(output.rflags & FLAG_CF, 0);
        assert_ne!(output.rflags & FLAG_ZF, 0);
    }

    #[test]
    fn store_reaches_data_area() {
        // mov [rcx + 8], rax
        let mut input = UserState::new();
        input.gprs[0] = 0x1122_3344_5566_7788;
        input.gprs[RCX] = DATA_ADDR;
        let output = run_emulated(&[0x48, 0x89, 0x41, 0x08], &input).unwrap();
        assert_eq!(&output.data[8..16], &0x1122_3344_5566_7788u64.to_le_bytes());
    }

    #[test]
    fn guard_page_load_reports_page_fault() {
        // nop; mov rax, [rcx]
        let mut input = UserState::new();
        let address = DATA_ADDR + DATA_SIZE as u64;
        input.gprs[RCX] = address;
        let output = run_emulated(&[0x90, 0x48, 0x8B, 0x01], &input).unwrap();
        let fault = output.fault.expect("load from the guard page must fault");
        assert_eq!(fault.vector, 14);
        assert_eq!(fault.rip, CODE_ADDR + 1);
        assert_eq!(fault.address, address);
        assert_eq!(fault.error_code, 0b100);
        assert_eq!(output.gprs[RSP], input.gprs[RSP]);
    }

    #[test]
    fn write_to_code_page_reports_protection_fault() {
        // mov [rcx], al, with RCX pointing at the snippet itself
        let mut input = UserState::new();
        input.gprs[RCX] = CODE_ADDR;
        let output = run_emulated(&[0x88, 0x01], &input).unwrap();
        let fault = output
            .fault
            .expect("write to the read-only code page must fault");
        assert_eq!(fault.vector, 14);
        assert_eq!(fault.error_code, 0b111);
    }

    #[test]
    fn ud2_reports_invalid_opcode() {
        let output = run_emulated(&[0x0F, 0x0B], &UserState::new()).unwrap();
        let fault = output.fault.expect("ud2 must fault");
        assert_eq!(fault.vector, 6);
        assert_eq!(fault.rip, CODE_ADDR);
    }

    #[test]
    fn endless_loop_is_runaway() {
        // jmp $
        let result = run_emulated(&[0xEB, 0xFE], &UserState::new());
        assert!(
            matches!(result, Err(OracleError::EmulatorRunaway { .. })),
            "{result:?}"
        );
    }

    #[test]
    fn emulator_features_include_sse2() {
        assert!(emulator_supports(CpuidFeature::SSE2));
        assert!(emulator_supports(CpuidFeature::X64));
        assert!(!emulator_supports(CpuidFeature::AVX512F));
    }
}
