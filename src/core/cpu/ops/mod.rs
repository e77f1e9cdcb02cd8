//! The interpreter: operand access shared by every instruction family, and the dispatch
//! from iced-x86's mnemonic to the family that executes it.

mod alu;
mod control;
mod data;
mod extended;
pub(crate) mod fast;
mod softfloat;
mod sse;
mod sse_float;
mod string;
mod system;
mod x87;
mod x87_arith;

use iced_x86::{Instruction, Mnemonic, OpKind, Register};

use super::bus::CpuBus;
use super::exceptions::Exception;
use super::flags::size_mask;
use super::state::Cpu;
use super::Exit;

/// Result of executing one instruction.
pub(crate) type Exec = Result<(), Exit>;

/// Location of a general-purpose register: GPR index, bit offset (8 for AH-BH) and
/// size in bytes. The size is 0 for registers that are not GPRs.
#[derive(Clone, Copy)]
struct RegisterInfo {
    index: u8,
    shift: u8,
    size: u8,
}

/// Register layout indexed by `iced_x86::Register as usize`, built at compile time.
static REGISTERS: [RegisterInfo; 256] = register_table();

const fn register_table() -> [RegisterInfo; 256] {
    let mut table = [RegisterInfo {
        index: 0,
        shift: 0,
        size: 0,
    }; 256];
    let mut r = 1;
    while r <= 68 {
        table[r] = match r {
            1..=4 => RegisterInfo {
                index: (r - 1) as u8,
                shift: 0,
                size: 1,
            },
            5..=8 => RegisterInfo {
                index: (r - 5) as u8,
                shift: 8,
                size: 1,
            },
            9..=20 => RegisterInfo {
                index: (r - 5) as u8,
                shift: 0,
                size: 1,
            },
            21..=36 => RegisterInfo {
                index: (r - 21) as u8,
                shift: 0,
                size: 2,
            },
            37..=52 => RegisterInfo {
                index: (r - 37) as u8,
                shift: 0,
                size: 4,
            },
            _ => RegisterInfo {
                index: (r - 53) as u8,
                shift: 0,
                size: 8,
            },
        };
        r += 1;
    }
    table
}

/// Returns the size in bytes of a general-purpose or segment register.
#[inline]
pub(crate) fn register_size(register: Register) -> u8 {
    match register as u32 {
        1..=20 => 1,
        21..=36 => 2,
        37..=52 => 4,
        53..=70 => 8,
        71..=76 => 2,
        _ => 16,
    }
}

/// Returns the segment index (ES=0 .. GS=5) of a segment register.
#[inline]
pub(crate) fn segment_index(register: Register) -> usize {
    (register as usize)
        .wrapping_sub(Register::ES as usize)
        .min(5)
}

impl Cpu {
    /// Reads a general-purpose or segment register.
    #[inline(always)]
    pub(crate) fn reg(&self, register: Register) -> u64 {
        let info = REGISTERS[register as usize];
        if info.size == 0 {
            return match register as usize {
                r @ 71..=76 => u64::from(self.seg[r - 71].selector),
                _ => 0,
            };
        }
        (self.gpr[info.index as usize] >> info.shift) & size_mask(info.size)
    }

    /// Writes a general-purpose register: 8- and 16-bit writes merge, 32-bit writes
    /// zero the upper half, as in 64-bit mode.
    #[inline(always)]
    pub(crate) fn set_reg(&mut self, register: Register, value: u64) {
        let info = REGISTERS[register as usize];
        let slot = &mut self.gpr[info.index as usize & 15];
        match info.size {
            0 => {}
            4 => *slot = value & 0xffff_ffff,
            8 => *slot = value,
            size => {
                let mask = size_mask(size) << info.shift;
                *slot = (*slot & !mask) | ((value << info.shift) & mask);
            }
        }
    }

    /// Returns the effective address (the offset within the segment) of the memory
    /// operand, wrapped to the address size.
    #[inline]
    pub(crate) fn effective_address(&self, insn: &Instruction) -> u64 {
        let base = insn.memory_base();
        let index = insn.memory_index();
        let mut address = insn.memory_displacement64();
        let address_size = if base != Register::None {
            if base == Register::RIP {
                return self.rip.wrapping_add(address);
            }
            if base == Register::EIP {
                return self.rip.wrapping_add(address) & 0xffff_ffff;
            }
            address = address.wrapping_add(self.reg(base));
            register_size(base)
        } else if index != Register::None {
            register_size(index)
        } else {
            match insn.memory_displ_size() {
                2 => 2,
                4 => 4,
                _ => 8,
            }
        };
        if index != Register::None {
            address =
                address.wrapping_add(self.reg(index) << insn.memory_index_scale().trailing_zeros());
        }
        address & size_mask(address_size)
    }

    /// Returns the size in bytes of operand `n`.
    #[inline]
    pub(crate) fn operand_size(insn: &Instruction, n: u32) -> u8 {
        match insn.op_kind(n) {
            OpKind::Register => register_size(insn.op_register(n)),
            OpKind::Memory => insn.memory_size().size() as u8,
            OpKind::Immediate8 | OpKind::Immediate8_2nd => 1,
            OpKind::Immediate16 | OpKind::Immediate8to16 => 2,
            OpKind::Immediate32 | OpKind::Immediate8to32 => 4,
            _ => 8,
        }
    }

    /// Reads operand `n` (register, memory or immediate) of `size` bytes.
    #[inline(always)]
    pub(crate) fn read_operand(
        &mut self,
        bus: &mut dyn CpuBus,
        insn: &Instruction,
        n: u32,
        size: u8,
    ) -> Result<u64, Exit> {
        if insn.op_kind(n) == OpKind::Register {
            return Ok(self.reg(insn.op_register(n)));
        }
        self.read_operand_slow(bus, insn, n, size)
    }

    #[inline(never)]
    fn read_operand_slow(
        &mut self,
        bus: &mut dyn CpuBus,
        insn: &Instruction,
        n: u32,
        size: u8,
    ) -> Result<u64, Exit> {
        match insn.op_kind(n) {
            OpKind::Register => Ok(self.reg(insn.op_register(n))),
            OpKind::Memory => {
                let offset = self.effective_address(insn);
                self.read(bus, segment_index(insn.memory_segment()), offset, size)
            }
            _ => Ok(insn.immediate(n) & size_mask(size)),
        }
    }

    /// Reads operand `n` of `size` bytes as the destination of a read-modify-write
    /// instruction: a memory operand is checked for write access before it is read, so
    /// that a #PF sets the W bit of its error code as the processor does.
    #[inline(always)]
    pub(crate) fn read_modify_operand(
        &mut self,
        bus: &mut dyn CpuBus,
        insn: &Instruction,
        n: u32,
        size: u8,
    ) -> Result<u64, Exit> {
        if insn.op_kind(n) != OpKind::Memory {
            return self.read_operand(bus, insn, n, size);
        }
        let offset = self.effective_address(insn);
        let value = self.read_for_write(bus, segment_index(insn.memory_segment()), offset, size)?;
        Ok(value as u64)
    }

    /// Writes operand `n` (register or memory) of `size` bytes.
    #[inline(always)]
    pub(crate) fn write_operand(
        &mut self,
        bus: &mut dyn CpuBus,
        insn: &Instruction,
        n: u32,
        size: u8,
        value: u64,
    ) -> Exec {
        if insn.op_kind(n) == OpKind::Register {
            self.set_reg(insn.op_register(n), value);
            return Ok(());
        }
        self.write_operand_slow(bus, insn, n, size, value)
    }

    #[inline(never)]
    fn write_operand_slow(
        &mut self,
        bus: &mut dyn CpuBus,
        insn: &Instruction,
        n: u32,
        size: u8,
        value: u64,
    ) -> Exec {
        match insn.op_kind(n) {
            OpKind::Register => {
                self.set_reg(insn.op_register(n), value);
                Ok(())
            }
            OpKind::Memory => {
                let offset = self.effective_address(insn);
                self.write(
                    bus,
                    segment_index(insn.memory_segment()),
                    offset,
                    size,
                    value,
                )
            }
            _ => Err(Exception::ud().into()),
        }
    }

    /// Returns the operand size of a stack operation in bytes (PUSH, POP, CALL, RET).
    #[inline]
    pub(crate) fn stack_operand_size(&self, insn: &Instruction) -> u8 {
        match insn.stack_pointer_increment() {
            -2 | 2 => 2,
            -4 | 4 => 4,
            -8 | 8 => 8,
            _ => self.stack_width(),
        }
    }

    fn report_unimplemented(&mut self, mnemonic: Mnemonic) {
        if self.unimplemented_reports < 32 {
            self.unimplemented_reports += 1;
            tracing::warn!(
                rip = self.rip,
                ?mnemonic,
                "unimplemented instruction raises #UD"
            );
        }
    }
}

/// The function that executes one instruction, chosen once when it is decoded.
pub(crate) type Handler = fn(&mut Cpu, &mut dyn CpuBus, &Instruction) -> Exec;

/// Returns the handler of the family that executes `insn`.
pub(crate) fn handler(insn: &Instruction) -> Handler {
    if insn.has_lock_prefix() && !lockable(insn) {
        return |_, _, _| Err(Exception::ud().into());
    }
    use Mnemonic as M;
    match insn.mnemonic() {
        M::Add => |cpu, bus, insn| cpu.exec_binary::<{ alu::BINARY_ADD }>(bus, insn),
        M::Or => |cpu, bus, insn| cpu.exec_binary::<{ alu::BINARY_OR }>(bus, insn),
        M::Adc => |cpu, bus, insn| cpu.exec_binary::<{ alu::BINARY_ADC }>(bus, insn),
        M::Sbb => |cpu, bus, insn| cpu.exec_binary::<{ alu::BINARY_SBB }>(bus, insn),
        M::And => |cpu, bus, insn| cpu.exec_binary::<{ alu::BINARY_AND }>(bus, insn),
        M::Sub => |cpu, bus, insn| cpu.exec_binary::<{ alu::BINARY_SUB }>(bus, insn),
        M::Xor => |cpu, bus, insn| cpu.exec_binary::<{ alu::BINARY_XOR }>(bus, insn),
        M::Cmp => |cpu, bus, insn| cpu.exec_binary::<{ alu::BINARY_CMP }>(bus, insn),
        M::Test => |cpu, bus, insn| cpu.exec_binary::<{ alu::BINARY_TEST }>(bus, insn),
        M::Inc | M::Dec | M::Neg | M::Not => |cpu, bus, insn| cpu.exec_unary(bus, insn),
        M::Shl | M::Sal | M::Shr | M::Sar | M::Rol | M::Ror | M::Rcl | M::Rcr => {
            |cpu, bus, insn| cpu.exec_shift(bus, insn)
        }
        M::Shld | M::Shrd => |cpu, bus, insn| cpu.exec_double_shift(bus, insn),
        M::Mul | M::Imul | M::Div | M::Idiv => |cpu, bus, insn| cpu.exec_multiply(bus, insn),
        M::Bt | M::Bts | M::Btr | M::Btc => |cpu, bus, insn| cpu.exec_bit_test(bus, insn),
        M::Bsf | M::Bsr | M::Tzcnt | M::Lzcnt | M::Popcnt => {
            |cpu, bus, insn| cpu.exec_bit_scan(bus, insn)
        }
        M::Xadd | M::Cmpxchg | M::Cmpxchg8b | M::Cmpxchg16b => {
            |cpu, bus, insn| cpu.exec_exchange_arith(bus, insn)
        }
        M::Cbw | M::Cwde | M::Cdqe | M::Cwd | M::Cdq | M::Cqo => {
            |cpu, _bus, insn| cpu.exec_convert(insn)
        }
        M::Clc | M::Stc | M::Cmc | M::Cld | M::Std | M::Lahf | M::Sahf => {
            |cpu, _bus, insn| cpu.exec_flag_op(insn)
        }
        M::Aaa | M::Aas | M::Daa | M::Das | M::Aam | M::Aad => {
            |cpu, bus, insn| cpu.exec_bcd(bus, insn)
        }
        M::Bswap => |cpu, _bus, insn| cpu.exec_bswap(insn),

        M::Mov if !moves_special_register(insn) => |cpu, bus, insn| cpu.exec_plain_move(bus, insn),
        M::Mov | M::Movzx | M::Movsx | M::Movsxd | M::Lea | M::Xchg | M::Movnti | M::Xlatb => {
            |cpu, bus, insn| cpu.exec_move(bus, insn)
        }
        M::Push | M::Pop | M::Pushf | M::Popf | M::Pushfd | M::Popfd | M::Pushfq | M::Popfq => {
            |cpu, bus, insn| cpu.exec_stack(bus, insn)
        }
        M::Pusha | M::Pushad | M::Popa | M::Popad | M::Enter | M::Leave => {
            |cpu, bus, insn| cpu.exec_stack_frame(bus, insn)
        }
        M::Lds | M::Les | M::Lfs | M::Lgs | M::Lss => {
            |cpu, bus, insn| cpu.exec_load_far_pointer(bus, insn)
        }
        M::Nop
        | M::Pause
        | M::Lfence
        | M::Mfence
        | M::Sfence
        | M::Prefetchnta
        | M::Prefetcht0
        | M::Prefetcht1
        | M::Prefetcht2
        | M::Prefetchw
        | M::Endbr32
        | M::Endbr64 => |_, _, _| Ok(()),
        M::Cmove
        | M::Cmovne
        | M::Cmovb
        | M::Cmovae
        | M::Cmovbe
        | M::Cmova
        | M::Cmovl
        | M::Cmovge
        | M::Cmovle
        | M::Cmovg
        | M::Cmovs
        | M::Cmovns
        | M::Cmovo
        | M::Cmovno
        | M::Cmovp
        | M::Cmovnp => |cpu, bus, insn| cpu.exec_cmov(bus, insn),
        M::Sete
        | M::Setne
        | M::Setb
        | M::Setae
        | M::Setbe
        | M::Seta
        | M::Setl
        | M::Setge
        | M::Setle
        | M::Setg
        | M::Sets
        | M::Setns
        | M::Seto
        | M::Setno
        | M::Setp
        | M::Setnp => |cpu, bus, insn| cpu.exec_setcc(bus, insn),

        M::Jmp | M::Call | M::Ret | M::Retf => |cpu, bus, insn| cpu.exec_branch(bus, insn),
        M::Je
        | M::Jne
        | M::Jb
        | M::Jae
        | M::Jbe
        | M::Ja
        | M::Jl
        | M::Jge
        | M::Jle
        | M::Jg
        | M::Js
        | M::Jns
        | M::Jo
        | M::Jno
        | M::Jp
        | M::Jnp => |cpu, _bus, insn| cpu.exec_jcc(insn),
        M::Loop | M::Loope | M::Loopne | M::Jcxz | M::Jecxz | M::Jrcxz => {
            |cpu, _bus, insn| cpu.exec_loop(insn)
        }
        M::Int | M::Int3 | M::Into | M::Int1 | M::Iret | M::Iretd | M::Iretq | M::Hlt => {
            |cpu, bus, insn| cpu.exec_interrupt_op(bus, insn)
        }

        M::Movsb
        | M::Movsw
        | M::Movsd
        | M::Movsq
        | M::Stosb
        | M::Stosw
        | M::Stosd
        | M::Stosq
        | M::Lodsb
        | M::Lodsw
        | M::Lodsd
        | M::Lodsq
        | M::Cmpsb
        | M::Cmpsw
        | M::Cmpsd
        | M::Cmpsq
        | M::Scasb
        | M::Scasw
        | M::Scasd
        | M::Scasq
        | M::Insb
        | M::Insw
        | M::Insd
        | M::Outsb
        | M::Outsw
        | M::Outsd
            if is_string_form(insn) =>
        {
            |cpu, bus, insn| cpu.exec_string(bus, insn)
        }

        M::In | M::Out => |cpu, bus, insn| cpu.exec_port_io(bus, insn),
        M::Cli | M::Sti => |cpu, _bus, insn| cpu.exec_interrupt_flag(insn),
        M::Cpuid | M::Rdtsc | M::Rdtscp | M::Rdmsr | M::Wrmsr | M::Rdpmc => {
            |cpu, bus, insn| cpu.exec_identification(bus, insn)
        }
        M::Lgdt
        | M::Lidt
        | M::Sgdt
        | M::Sidt
        | M::Lldt
        | M::Sldt
        | M::Ltr
        | M::Str
        | M::Lmsw
        | M::Smsw
        | M::Lar
        | M::Lsl
        | M::Verr
        | M::Verw => |cpu, bus, insn| cpu.exec_descriptor_table(bus, insn),
        M::Clts
        | M::Invlpg
        | M::Wbinvd
        | M::Invd
        | M::Clflush
        | M::Clflushopt
        | M::Ud0
        | M::Ud1
        | M::Ud2 => |cpu, bus, insn| cpu.exec_cache_control(bus, insn),
        M::Syscall
        | M::Sysret
        | M::Sysretq
        | M::Sysenter
        | M::Sysexit
        | M::Sysexitq
        | M::Swapgs => |cpu, bus, insn| cpu.exec_fast_system_call(bus, insn),

        M::Fninit
        | M::Fnstcw
        | M::Fldcw
        | M::Fnstsw
        | M::Fnclex
        | M::Wait
        | M::Fxsave
        | M::Fxsave64
        | M::Fxrstor
        | M::Fxrstor64
        | M::Ldmxcsr
        | M::Stmxcsr
        | M::Emms => |cpu, bus, insn| cpu.exec_x87(bus, insn),
        M::Fld
        | M::Fld1
        | M::Fldz
        | M::Fst
        | M::Fstp
        | M::Fild
        | M::Fist
        | M::Fistp
        | M::Fchs
        | M::Fabs
        | M::Fxch
        | M::Fsqrt
        | M::Frndint
        | M::Fcom
        | M::Fcomp
        | M::Fcompp
        | M::Fucom
        | M::Fucomp
        | M::Fucompp
        | M::Fcomi
        | M::Fcomip
        | M::Fucomi
        | M::Fucomip
        | M::Fadd
        | M::Faddp
        | M::Fsub
        | M::Fsubp
        | M::Fsubr
        | M::Fsubrp
        | M::Fmul
        | M::Fmulp
        | M::Fdiv
        | M::Fdivp
        | M::Fdivr
        | M::Fdivrp
        | M::Fiadd
        | M::Fisub
        | M::Fisubr
        | M::Fimul
        | M::Fidiv
        | M::Fidivr
        | M::Ficom
        | M::Ficomp
        | M::Ftst => |cpu, bus, insn| cpu.exec_x87_arith(bus, insn),

        _ => |cpu, bus, insn| {
            if cpu.exec_sse(bus, insn)? {
                return Ok(());
            }
            cpu.report_unimplemented(insn.mnemonic());
            Err(Exception::ud().into())
        },
    }
}

/// Returns whether a block must end after `insn`. That is the case when it may branch,
/// or may change what decoding, translation or interrupt checks depend on (CS, segments,
/// paging, control registers, MSRs, EFLAGS.IF/TF). It is also the case when it accesses
/// a device, because a pending interrupt should then be taken at once.
pub(crate) fn ends_block(insn: &Instruction) -> bool {
    if insn.flow_control() != iced_x86::FlowControl::Next {
        return true;
    }
    // A repeated string instruction runs again (RIP unchanged) until its count ends.
    if insn.has_rep_prefix() || insn.has_repne_prefix() {
        return true;
    }
    use Mnemonic as M;
    match insn.mnemonic() {
        M::Mov => moves_special_register(insn),
        M::Pop => insn.op_kind(0) == OpKind::Register && insn.op0_register().is_segment_register(),
        M::Popf | M::Popfd | M::Popfq => true,
        M::Lds | M::Les | M::Lfs | M::Lgs | M::Lss => true,
        M::In | M::Out | M::Insb | M::Insw | M::Insd | M::Outsb | M::Outsw | M::Outsd => true,
        M::Cli | M::Sti | M::Hlt => true,
        M::Cpuid | M::Rdmsr | M::Wrmsr | M::Rdpmc => true,
        M::Lgdt
        | M::Lidt
        | M::Lldt
        | M::Ltr
        | M::Lmsw
        | M::Clts
        | M::Invlpg
        | M::Wbinvd
        | M::Invd
        | M::Swapgs
        | M::Fxrstor
        | M::Fxrstor64 => true,
        _ => false,
    }
}

/// Returns whether a MOV reads or writes a segment, control or debug register.
fn moves_special_register(insn: &Instruction) -> bool {
    (0..2).any(|n| {
        let register = insn.op_register(n);
        insn.op_kind(n) == OpKind::Register
            && (register.is_segment_register() || register.is_cr() || register.is_dr())
    })
}

/// Returns whether a string mnemonic is the string instruction, not an SSE homonym
/// (MOVSD and CMPSD are also SSE2 instructions).
fn is_string_form(insn: &Instruction) -> bool {
    matches!(
        insn.op_kind(0),
        OpKind::MemoryESDI
            | OpKind::MemoryESEDI
            | OpKind::MemoryESRDI
            | OpKind::MemorySegSI
            | OpKind::MemorySegESI
            | OpKind::MemorySegRSI
            | OpKind::Register
    ) && !matches!(insn.op_register(0), r if r.is_xmm())
}

/// Returns whether LOCK is allowed: a read-modify-write instruction with a memory
/// destination.
fn lockable(insn: &Instruction) -> bool {
    use Mnemonic as M;
    insn.op_kind(0) == OpKind::Memory
        && matches!(
            insn.mnemonic(),
            M::Add
                | M::Adc
                | M::And
                | M::Btc
                | M::Btr
                | M::Bts
                | M::Cmpxchg
                | M::Cmpxchg8b
                | M::Cmpxchg16b
                | M::Dec
                | M::Inc
                | M::Neg
                | M::Not
                | M::Or
                | M::Sbb
                | M::Sub
                | M::Xadd
                | M::Xchg
                | M::Xor
        )
}
