//! The interpreter: operand access shared by every instruction family, and the dispatch
//! from iced-x86's mnemonic to the family that executes it.

mod alu;
mod control;
mod data;
mod sse;
mod string;
mod system;
mod x87;

use iced_x86::{Instruction, Mnemonic, OpKind, Register};

use super::bus::CpuBus;
use super::exceptions::Exception;
use super::flags::size_mask;
use super::state::Cpu;
use super::Exit;

/// Result of executing one instruction.
pub(crate) type Exec = Result<(), Exit>;

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
    #[inline]
    pub(crate) fn reg(&self, register: Register) -> u64 {
        let r = register as usize;
        match r {
            1..=4 => self.gpr[r - 1] & 0xff,
            5..=8 => (self.gpr[r - 5] >> 8) & 0xff,
            9..=20 => self.gpr[r - 9 + 4] & 0xff,
            21..=36 => self.gpr[r - 21] & 0xffff,
            37..=52 => self.gpr[r - 37] & 0xffff_ffff,
            53..=68 => self.gpr[r - 53],
            71..=76 => u64::from(self.seg[r - 71].selector),
            _ => 0,
        }
    }

    /// Writes a general-purpose register: 8- and 16-bit writes merge, 32-bit writes
    /// zero the upper half, as in 64-bit mode.
    #[inline]
    pub(crate) fn set_reg(&mut self, register: Register, value: u64) {
        let r = register as usize;
        match r {
            1..=4 => self.gpr[r - 1] = (self.gpr[r - 1] & !0xff) | (value & 0xff),
            5..=8 => self.gpr[r - 5] = (self.gpr[r - 5] & !0xff00) | ((value & 0xff) << 8),
            9..=20 => self.gpr[r - 5] = (self.gpr[r - 5] & !0xff) | (value & 0xff),
            21..=36 => self.gpr[r - 21] = (self.gpr[r - 21] & !0xffff) | (value & 0xffff),
            37..=52 => self.gpr[r - 37] = value & 0xffff_ffff,
            53..=68 => self.gpr[r - 53] = value,
            _ => {}
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
    #[inline]
    pub(crate) fn read_operand(
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

    /// Writes operand `n` (register or memory) of `size` bytes.
    #[inline]
    pub(crate) fn write_operand(
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

    /// Executes one decoded instruction; RIP still points at it and `next_rip` past it.
    pub(crate) fn execute(&mut self, bus: &mut dyn CpuBus, insn: &Instruction) -> Exec {
        if insn.has_lock_prefix() && !lockable(insn) {
            return Err(Exception::ud().into());
        }
        use Mnemonic as M;
        match insn.mnemonic() {
            M::Add | M::Or | M::Adc | M::Sbb | M::And | M::Sub | M::Xor | M::Cmp | M::Test => {
                self.exec_binary(bus, insn)
            }
            M::Inc | M::Dec | M::Neg | M::Not => self.exec_unary(bus, insn),
            M::Shl | M::Sal | M::Shr | M::Sar | M::Rol | M::Ror | M::Rcl | M::Rcr => {
                self.exec_shift(bus, insn)
            }
            M::Shld | M::Shrd => self.exec_double_shift(bus, insn),
            M::Mul | M::Imul | M::Div | M::Idiv => self.exec_multiply(bus, insn),
            M::Bt | M::Bts | M::Btr | M::Btc => self.exec_bit_test(bus, insn),
            M::Bsf | M::Bsr | M::Tzcnt | M::Lzcnt | M::Popcnt => self.exec_bit_scan(bus, insn),
            M::Xadd | M::Cmpxchg | M::Cmpxchg8b | M::Cmpxchg16b => {
                self.exec_exchange_arith(bus, insn)
            }
            M::Cbw | M::Cwde | M::Cdqe | M::Cwd | M::Cdq | M::Cqo => self.exec_convert(insn),
            M::Clc | M::Stc | M::Cmc | M::Cld | M::Std | M::Lahf | M::Sahf => {
                self.exec_flag_op(insn)
            }
            M::Aaa | M::Aas | M::Daa | M::Das | M::Aam | M::Aad => self.exec_bcd(bus, insn),
            M::Bswap => self.exec_bswap(insn),

            M::Mov | M::Movzx | M::Movsx | M::Movsxd | M::Lea | M::Xchg | M::Movnti | M::Xlatb => {
                self.exec_move(bus, insn)
            }
            M::Push | M::Pop | M::Pushf | M::Popf | M::Pushfd | M::Popfd | M::Pushfq | M::Popfq => {
                self.exec_stack(bus, insn)
            }
            M::Pusha | M::Pushad | M::Popa | M::Popad | M::Enter | M::Leave => {
                self.exec_stack_frame(bus, insn)
            }
            M::Lds | M::Les | M::Lfs | M::Lgs | M::Lss => self.exec_load_far_pointer(bus, insn),
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
            | M::Endbr64 => Ok(()),
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
            | M::Cmovnp => self.exec_cmov(bus, insn),
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
            | M::Setnp => self.exec_setcc(bus, insn),

            M::Jmp | M::Call | M::Ret | M::Retf => self.exec_branch(bus, insn),
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
            | M::Jnp => self.exec_jcc(insn),
            M::Loop | M::Loope | M::Loopne | M::Jcxz | M::Jecxz | M::Jrcxz => self.exec_loop(insn),
            M::Int | M::Int3 | M::Into | M::Int1 | M::Iret | M::Iretd | M::Iretq | M::Hlt => {
                self.exec_interrupt_op(bus, insn)
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
                self.exec_string(bus, insn)
            }

            M::In | M::Out => self.exec_port_io(bus, insn),
            M::Cli | M::Sti => self.exec_interrupt_flag(insn),
            M::Cpuid | M::Rdtsc | M::Rdtscp | M::Rdmsr | M::Wrmsr | M::Rdpmc => {
                self.exec_identification(bus, insn)
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
            | M::Verw => self.exec_descriptor_table(bus, insn),
            M::Clts
            | M::Invlpg
            | M::Wbinvd
            | M::Invd
            | M::Clflush
            | M::Clflushopt
            | M::Ud0
            | M::Ud1
            | M::Ud2 => self.exec_cache_control(bus, insn),
            M::Syscall
            | M::Sysret
            | M::Sysretq
            | M::Sysenter
            | M::Sysexit
            | M::Sysexitq
            | M::Swapgs => self.exec_fast_system_call(bus, insn),

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
            | M::Emms => self.exec_x87(bus, insn),

            mnemonic => {
                if self.exec_sse(bus, insn)? {
                    return Ok(());
                }
                self.report_unimplemented(mnemonic);
                Err(Exception::ud().into())
            }
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
