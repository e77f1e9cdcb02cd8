//! Specialized handlers for the commonest instruction forms of 64-bit code: moves, ALU
//! instructions, shifts, extensions, conditional moves and sets, branches and the stack,
//! on registers, immediates and simple memory operands.
//!
//! The generic handlers ask iced-x86's `Instruction` for operand kinds, registers and
//! sizes every time they run. A block instead resolves those once, when it is decoded,
//! into [`Operands`], and runs a handler monomorphized for the form and size. Results
//! and flags are the generic handlers' to the bit; every form not listed here keeps its
//! generic handler.

use iced_x86::{ConditionCode, Instruction, Mnemonic, OpKind, Register};

use super::alu::sign_extend;
use super::alu::{
    BINARY_ADC, BINARY_ADD, BINARY_AND, BINARY_CMP, BINARY_OR, BINARY_SBB, BINARY_SUB, BINARY_TEST,
    BINARY_XOR,
};
use super::{segment_index, Exec, REGISTERS};
use crate::core::cpu::bus::CpuBus;
use crate::core::cpu::exceptions::Exception;
use crate::core::cpu::flags::{size_mask, FlagOp};
use crate::core::cpu::mmu::Access;
use crate::core::cpu::msr::is_canonical;
use crate::core::cpu::state::Cpu;
use crate::core::cpu::state::{CS, FS, SS};

/// A handler that takes the operands resolved at decode time.
pub(crate) type FastHandler = fn(&mut Cpu, &mut dyn CpuBus, &Operands) -> Exec;

/// Marks an absent base or index register in [`Operands`].
const NO_REGISTER: u8 = 0xff;
/// Marks RIP as the base register in [`Operands`].
const RIP_BASE: u8 = 0xfe;

/// Operands of one instruction, resolved when its block was decoded.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Operands {
    /// GPR index of the register operand written (or compared), or of the only one.
    dst: u8,
    /// GPR index of the source register.
    src: u8,
    /// Memory base: a GPR index, [`RIP_BASE`] or [`NO_REGISTER`].
    base: u8,
    /// Memory index: a GPR index or [`NO_REGISTER`].
    index: u8,
    /// log2 of the index scale.
    scale: u8,
    /// Segment of the memory operand (ES=0 .. GS=5).
    segment: u8,
    /// Displacement (RIP-relative: from the instruction's start), as a two's complement.
    displacement: u64,
    /// Immediate operand, sign-extended and masked to the operand size; for a near
    /// branch, the target's offset from the instruction's start.
    immediate: u64,
    /// Condition of Jcc, SETcc and CMOVcc.
    condition: ConditionCode,
    /// Bit offset of an 8-bit destination register (or of the source of MOVZX and
    /// MOVSX): 8 for AH-BH, else 0.
    shift: u8,
    /// Bit offset of an 8-bit source register of an ALU instruction.
    src_shift: u8,
}

impl Operands {
    /// Operands of an instruction that has no specialized handler.
    pub(crate) const EMPTY: Operands = Operands {
        dst: 0,
        src: 0,
        base: NO_REGISTER,
        index: NO_REGISTER,
        scale: 0,
        segment: 0,
        displacement: 0,
        immediate: 0,
        condition: ConditionCode::None,
        shift: 0,
        src_shift: 0,
    };
}

/// Returns the GPR index of a 32- or 64-bit general-purpose register with its size.
fn gpr(register: Register) -> Option<(u8, u8)> {
    if register.is_gpr64() {
        Some((register.number() as u8, 8))
    } else if register.is_gpr32() {
        Some((register.number() as u8, 4))
    } else {
        None
    }
}

/// Returns the GPR index and bit offset of an 8-bit register.
fn gpr8(register: Register) -> Option<(u8, u8)> {
    if !register.is_gpr8() {
        return None;
    }
    let info = REGISTERS[register as usize];
    Some((info.index, info.shift))
}

/// Resolves a memory operand with 64-bit addressing, or `None` for other forms.
fn memory(insn: &Instruction, ops: &mut Operands) -> Option<()> {
    let base = insn.memory_base();
    ops.base = match base {
        Register::None => NO_REGISTER,
        Register::RIP => RIP_BASE,
        r if r.is_gpr64() => r.number() as u8,
        _ => return None,
    };
    ops.index = match insn.memory_index() {
        Register::None => NO_REGISTER,
        r if r.is_gpr64() => r.number() as u8,
        _ => return None,
    };
    if base == Register::None && ops.index == NO_REGISTER && insn.memory_displ_size() != 8 {
        // An absolute 32-bit address without base or index: rare, left to the generic path.
        return None;
    }
    ops.scale = insn.memory_index_scale().trailing_zeros() as u8;
    ops.segment = segment_index(insn.memory_segment()) as u8;
    ops.displacement = insn.memory_displacement64();
    Some(())
}

/// Returns the specialized handler and resolved operands for `insn` in 64-bit code, or
/// `None` when it has no specialized form.
pub(crate) fn select(insn: &Instruction) -> Option<(FastHandler, Operands)> {
    if insn.has_lock_prefix() {
        return None;
    }
    let mut ops = Operands::EMPTY;
    if let Some(handler) = select_other(insn, &mut ops) {
        return Some((handler, ops));
    }
    let mut ops = Operands::EMPTY;
    if let Some(handler) = select_bytes_compares_rotates(insn, &mut ops) {
        return Some((handler, ops));
    }
    if insn.op_count() == 0 {
        return None;
    }
    let mut ops = Operands::EMPTY;
    let kind0 = insn.op_kind(0);
    let (dst, size) = if kind0 == OpKind::Register {
        gpr(insn.op0_register())?
    } else if kind0 == OpKind::Memory {
        memory(insn, &mut ops)?;
        match insn.memory_size().size() {
            4 => (0, 4),
            8 => (0, 8),
            _ => return None,
        }
    } else {
        return None;
    };
    ops.dst = dst;
    let wide = size == 8;

    let mnemonic = insn.mnemonic();
    if matches!(mnemonic, Mnemonic::Inc | Mnemonic::Dec) {
        if kind0 != OpKind::Register {
            return None;
        }
        let handler: FastHandler = match (mnemonic == Mnemonic::Inc, wide) {
            (true, true) => step_reg::<true, 8>,
            (true, false) => step_reg::<true, 4>,
            (false, true) => step_reg::<false, 8>,
            (false, false) => step_reg::<false, 4>,
        };
        return Some((handler, ops));
    }
    if insn.op_count() != 2 {
        return None;
    }
    if kind0 == OpKind::Register && insn.op_kind(1) == OpKind::Immediate8 {
        // Shifts by an immediate count.
        ops.immediate = u64::from(insn.immediate8());
        let handler: FastHandler = match (mnemonic, wide) {
            (Mnemonic::Shl | Mnemonic::Sal, true) => shift::<SHIFT_LEFT, 8>,
            (Mnemonic::Shl | Mnemonic::Sal, false) => shift::<SHIFT_LEFT, 4>,
            (Mnemonic::Shr, true) => shift::<SHIFT_RIGHT, 8>,
            (Mnemonic::Shr, false) => shift::<SHIFT_RIGHT, 4>,
            (Mnemonic::Sar, true) => shift::<SHIFT_ARITHMETIC, 8>,
            (Mnemonic::Sar, false) => shift::<SHIFT_ARITHMETIC, 4>,
            _ => return None,
        };
        return Some((handler, ops));
    }

    // The source: a register of the same size, an immediate or a memory operand.
    let kind1 = insn.op_kind(1);
    let form = match kind1 {
        OpKind::Register => {
            let (src, src_size) = gpr(insn.op1_register())?;
            if src_size != size {
                return None;
            }
            ops.src = src;
            Form::Register
        }
        OpKind::Immediate8to32
        | OpKind::Immediate32
        | OpKind::Immediate8to64
        | OpKind::Immediate32to64
        | OpKind::Immediate64 => {
            ops.immediate = insn.immediate(1) & size_mask(size);
            Form::Immediate
        }
        OpKind::Memory if kind0 == OpKind::Register => {
            memory(insn, &mut ops)?;
            if insn.memory_size().size() != usize::from(size) && mnemonic != Mnemonic::Lea {
                return None;
            }
            Form::Memory
        }
        _ => return None,
    };

    let memory_destination = kind0 == OpKind::Memory;
    macro_rules! by_form {
        ($handler:ident, $op:expr) => {
            match (memory_destination, form, wide) {
                (false, Form::Register, true) => $handler::<{ $op }, 8, SRC_REGISTER>,
                (false, Form::Register, false) => $handler::<{ $op }, 4, SRC_REGISTER>,
                (false, Form::Immediate, true) => $handler::<{ $op }, 8, SRC_IMMEDIATE>,
                (false, Form::Immediate, false) => $handler::<{ $op }, 4, SRC_IMMEDIATE>,
                (false, Form::Memory, true) => $handler::<{ $op }, 8, SRC_MEMORY>,
                (false, Form::Memory, false) => $handler::<{ $op }, 4, SRC_MEMORY>,
                _ => return None,
            }
        };
    }
    let handler: FastHandler = match mnemonic {
        Mnemonic::Add => by_form!(binary, BINARY_ADD),
        Mnemonic::Or => by_form!(binary, BINARY_OR),
        Mnemonic::Adc => by_form!(binary, BINARY_ADC),
        Mnemonic::Sbb => by_form!(binary, BINARY_SBB),
        Mnemonic::And => by_form!(binary, BINARY_AND),
        Mnemonic::Sub => by_form!(binary, BINARY_SUB),
        Mnemonic::Xor => by_form!(binary, BINARY_XOR),
        Mnemonic::Cmp => by_form!(binary, BINARY_CMP),
        Mnemonic::Test if form != Form::Memory => by_form!(binary, BINARY_TEST),
        Mnemonic::Mov if memory_destination => match (form, wide) {
            (Form::Register, true) => store::<8, SRC_REGISTER>,
            (Form::Register, false) => store::<4, SRC_REGISTER>,
            (Form::Immediate, true) => store::<8, SRC_IMMEDIATE>,
            (Form::Immediate, false) => store::<4, SRC_IMMEDIATE>,
            _ => return None,
        },
        Mnemonic::Mov => match (form, wide) {
            (Form::Register, true) => load::<8, SRC_REGISTER>,
            (Form::Register, false) => load::<4, SRC_REGISTER>,
            (Form::Immediate, true) => load::<8, SRC_IMMEDIATE>,
            (Form::Immediate, false) => load::<4, SRC_IMMEDIATE>,
            (Form::Memory, true) => load::<8, SRC_MEMORY>,
            (Form::Memory, false) => load::<4, SRC_MEMORY>,
        },
        Mnemonic::Imul => match (form, wide) {
            (Form::Register, true) => multiply::<8, SRC_REGISTER>,
            (Form::Register, false) => multiply::<4, SRC_REGISTER>,
            (Form::Memory, true) => multiply::<8, SRC_MEMORY>,
            (Form::Memory, false) => multiply::<4, SRC_MEMORY>,
            _ => return None,
        },
        Mnemonic::Lea => match (form, wide) {
            (Form::Memory, true) => lea::<8>,
            (Form::Memory, false) => lea::<4>,
            _ => return None,
        },
        _ => return None,
    };
    Some((handler, ops))
}

/// Selects branches, stack operations, zero and sign extension, SETcc, CMOVcc and NOP.
fn select_other(insn: &Instruction, ops: &mut Operands) -> Option<FastHandler> {
    let kind = |n| insn.op_kind(n);
    let register = |n| insn.op_register(n);
    ops.condition = insn.condition_code();
    Some(match insn.mnemonic() {
        Mnemonic::Nop => nop,
        Mnemonic::Jmp | Mnemonic::Call if kind(0) == OpKind::NearBranch64 => {
            ops.immediate = insn.near_branch64();
            if insn.mnemonic() == Mnemonic::Jmp {
                branch::<false>
            } else {
                call
            }
        }
        _ if insn.is_jcc_short_or_near() && kind(0) == OpKind::NearBranch64 => {
            ops.immediate = insn.near_branch64();
            branch::<true>
        }
        Mnemonic::Ret if insn.op_count() == 0 && insn.stack_pointer_increment() == 8 => ret,
        Mnemonic::Push | Mnemonic::Pop
            if kind(0) == OpKind::Register
                && register(0).is_gpr64()
                && register(0) != Register::RSP =>
        {
            ops.dst = register(0).number() as u8;
            if insn.mnemonic() == Mnemonic::Push {
                push
            } else {
                pop
            }
        }
        Mnemonic::Movsxd | Mnemonic::Movzx | Mnemonic::Movsx => {
            let (dst, size) = gpr(register(0))?;
            ops.dst = dst;
            let source_size = match kind(1) {
                OpKind::Register => {
                    let source = register(1);
                    if let Some((src, shift)) = gpr8(source) {
                        ops.src = src;
                        ops.shift = shift;
                        1
                    } else if source.is_gpr16() {
                        ops.src = source.number() as u8;
                        2
                    } else if source.is_gpr32() {
                        ops.src = source.number() as u8;
                        4
                    } else {
                        return None;
                    }
                }
                OpKind::Memory => {
                    memory(insn, ops)?;
                    return extend_memory(
                        insn.mnemonic() != Mnemonic::Movzx,
                        size,
                        insn.memory_size().size(),
                    );
                }
                _ => return None,
            };
            extend_register(insn.mnemonic() != Mnemonic::Movzx, size, source_size)?
        }
        _ if insn.condition_code() != ConditionCode::None
            && matches!(
                insn.mnemonic(),
                Mnemonic::Sete
                    | Mnemonic::Setne
                    | Mnemonic::Setb
                    | Mnemonic::Setae
                    | Mnemonic::Setbe
                    | Mnemonic::Seta
                    | Mnemonic::Setl
                    | Mnemonic::Setge
                    | Mnemonic::Setle
                    | Mnemonic::Setg
                    | Mnemonic::Sets
                    | Mnemonic::Setns
                    | Mnemonic::Seto
                    | Mnemonic::Setno
                    | Mnemonic::Setp
                    | Mnemonic::Setnp
            )
            && kind(0) == OpKind::Register =>
        {
            let (dst, shift) = gpr8(register(0))?;
            ops.dst = dst;
            ops.shift = shift;
            set_condition
        }
        _ if insn.condition_code() != ConditionCode::None
            && insn.op_count() == 2
            && kind(0) == OpKind::Register
            && matches!(
                insn.mnemonic(),
                Mnemonic::Cmove
                    | Mnemonic::Cmovne
                    | Mnemonic::Cmovb
                    | Mnemonic::Cmovae
                    | Mnemonic::Cmovbe
                    | Mnemonic::Cmova
                    | Mnemonic::Cmovl
                    | Mnemonic::Cmovge
                    | Mnemonic::Cmovle
                    | Mnemonic::Cmovg
                    | Mnemonic::Cmovs
                    | Mnemonic::Cmovns
                    | Mnemonic::Cmovo
                    | Mnemonic::Cmovno
                    | Mnemonic::Cmovp
                    | Mnemonic::Cmovnp
            ) =>
        {
            let (dst, size) = gpr(register(0))?;
            ops.dst = dst;
            match kind(1) {
                OpKind::Register => {
                    let (src, src_size) = gpr(register(1))?;
                    if src_size != size {
                        return None;
                    }
                    ops.src = src;
                    if size == 8 {
                        conditional_move::<8, SRC_REGISTER>
                    } else {
                        conditional_move::<4, SRC_REGISTER>
                    }
                }
                OpKind::Memory => {
                    memory(insn, ops)?;
                    if size == 8 {
                        conditional_move::<8, SRC_MEMORY>
                    } else {
                        conditional_move::<4, SRC_MEMORY>
                    }
                }
                _ => return None,
            }
        }
        _ => return None,
    })
}

/// Selects 8-bit ALU instructions on registers, CMP and TEST of memory against a
/// register or immediate, and ROL and ROR by an immediate.
fn select_bytes_compares_rotates(insn: &Instruction, ops: &mut Operands) -> Option<FastHandler> {
    if insn.op_count() != 2 {
        return None;
    }
    let mnemonic = insn.mnemonic();
    let (kind0, kind1) = (insn.op_kind(0), insn.op_kind(1));

    if kind0 == OpKind::Register && insn.op0_register().is_gpr8() {
        (ops.dst, ops.shift) = gpr8(insn.op0_register())?;
        let src = match kind1 {
            OpKind::Register => {
                (ops.src, ops.src_shift) = gpr8(insn.op1_register())?;
                SRC_REGISTER
            }
            OpKind::Immediate8 => {
                ops.immediate = u64::from(insn.immediate8());
                SRC_IMMEDIATE
            }
            OpKind::Memory => {
                memory(insn, ops)?;
                SRC_MEMORY
            }
            _ => return None,
        };
        macro_rules! by_source {
            ($op:expr) => {
                match src {
                    SRC_REGISTER => binary8::<{ $op }, SRC_REGISTER>,
                    SRC_IMMEDIATE => binary8::<{ $op }, SRC_IMMEDIATE>,
                    _ => binary8::<{ $op }, SRC_MEMORY>,
                }
            };
        }
        return Some(match mnemonic {
            Mnemonic::Add => by_source!(BINARY_ADD),
            Mnemonic::Or => by_source!(BINARY_OR),
            Mnemonic::And => by_source!(BINARY_AND),
            Mnemonic::Sub => by_source!(BINARY_SUB),
            Mnemonic::Xor => by_source!(BINARY_XOR),
            Mnemonic::Cmp => by_source!(BINARY_CMP),
            Mnemonic::Test if src != SRC_MEMORY => by_source!(BINARY_TEST),
            _ => return None,
        });
    }

    if kind0 == OpKind::Memory && matches!(mnemonic, Mnemonic::Cmp | Mnemonic::Test) {
        memory(insn, ops)?;
        let size = insn.memory_size().size() as u8;
        let src = match kind1 {
            OpKind::Register => {
                let register = insn.op1_register();
                let (src, src_size) = match gpr8(register) {
                    Some((src, shift)) => {
                        ops.src_shift = shift;
                        (src, 1)
                    }
                    None => gpr(register)?,
                };
                if src_size != size {
                    return None;
                }
                ops.src = src;
                SRC_REGISTER
            }
            OpKind::Immediate8
            | OpKind::Immediate8to32
            | OpKind::Immediate32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64 => {
                ops.immediate = insn.immediate(1) & size_mask(size);
                SRC_IMMEDIATE
            }
            _ => return None,
        };
        let compare = mnemonic == Mnemonic::Cmp;
        return Some(match (compare, size, src) {
            (true, 1, SRC_REGISTER) => compare_memory::<BINARY_CMP, 1, SRC_REGISTER>,
            (true, 1, _) => compare_memory::<BINARY_CMP, 1, SRC_IMMEDIATE>,
            (true, 4, SRC_REGISTER) => compare_memory::<BINARY_CMP, 4, SRC_REGISTER>,
            (true, 4, _) => compare_memory::<BINARY_CMP, 4, SRC_IMMEDIATE>,
            (true, 8, SRC_REGISTER) => compare_memory::<BINARY_CMP, 8, SRC_REGISTER>,
            (true, 8, _) => compare_memory::<BINARY_CMP, 8, SRC_IMMEDIATE>,
            (false, 1, SRC_REGISTER) => compare_memory::<BINARY_TEST, 1, SRC_REGISTER>,
            (false, 1, _) => compare_memory::<BINARY_TEST, 1, SRC_IMMEDIATE>,
            (false, 4, SRC_REGISTER) => compare_memory::<BINARY_TEST, 4, SRC_REGISTER>,
            (false, 4, _) => compare_memory::<BINARY_TEST, 4, SRC_IMMEDIATE>,
            (false, 8, SRC_REGISTER) => compare_memory::<BINARY_TEST, 8, SRC_REGISTER>,
            (false, 8, _) => compare_memory::<BINARY_TEST, 8, SRC_IMMEDIATE>,
            _ => return None,
        });
    }

    if kind0 == OpKind::Register
        && kind1 == OpKind::Immediate8
        && matches!(mnemonic, Mnemonic::Rol | Mnemonic::Ror)
    {
        let (dst, size) = gpr(insn.op0_register())?;
        ops.dst = dst;
        ops.immediate = u64::from(insn.immediate8());
        return Some(match (mnemonic == Mnemonic::Rol, size) {
            (true, 8) => rotate::<true, 8>,
            (true, _) => rotate::<true, 4>,
            (false, 8) => rotate::<false, 8>,
            (false, _) => rotate::<false, 4>,
        });
    }
    None
}

/// Picks MOVZX, MOVSX or MOVSXD from a register of `from` bytes into one of `to` bytes.
fn extend_register(signed: bool, to: u8, from: u8) -> Option<FastHandler> {
    Some(match (signed, to, from) {
        (false, 4, 1) => extend::<false, 4, 1, SRC_REGISTER>,
        (false, 8, 1) => extend::<false, 8, 1, SRC_REGISTER>,
        (false, 4, 2) => extend::<false, 4, 2, SRC_REGISTER>,
        (false, 8, 2) => extend::<false, 8, 2, SRC_REGISTER>,
        (true, 4, 1) => extend::<true, 4, 1, SRC_REGISTER>,
        (true, 8, 1) => extend::<true, 8, 1, SRC_REGISTER>,
        (true, 4, 2) => extend::<true, 4, 2, SRC_REGISTER>,
        (true, 8, 2) => extend::<true, 8, 2, SRC_REGISTER>,
        (true, 8, 4) => extend::<true, 8, 4, SRC_REGISTER>,
        _ => return None,
    })
}

/// Picks MOVZX, MOVSX or MOVSXD from memory of `from` bytes into a register of `to`.
fn extend_memory(signed: bool, to: u8, from: usize) -> Option<FastHandler> {
    Some(match (signed, to, from) {
        (false, 4, 1) => extend::<false, 4, 1, SRC_MEMORY>,
        (false, 8, 1) => extend::<false, 8, 1, SRC_MEMORY>,
        (false, 4, 2) => extend::<false, 4, 2, SRC_MEMORY>,
        (false, 8, 2) => extend::<false, 8, 2, SRC_MEMORY>,
        (true, 4, 1) => extend::<true, 4, 1, SRC_MEMORY>,
        (true, 8, 1) => extend::<true, 8, 1, SRC_MEMORY>,
        (true, 4, 2) => extend::<true, 4, 2, SRC_MEMORY>,
        (true, 8, 2) => extend::<true, 8, 2, SRC_MEMORY>,
        (true, 8, 4) => extend::<true, 8, 4, SRC_MEMORY>,
        _ => return None,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    Register,
    Immediate,
    Memory,
}

const SHIFT_LEFT: u8 = 0;
const SHIFT_RIGHT: u8 = 1;
const SHIFT_ARITHMETIC: u8 = 2;

const SRC_REGISTER: u8 = 0;
const SRC_IMMEDIATE: u8 = 1;
const SRC_MEMORY: u8 = 2;

impl Cpu {
    /// Returns the offset of the memory operand within its segment.
    #[inline(always)]
    fn fast_address(&self, ops: &Operands) -> u64 {
        let mut address = ops.displacement;
        if ops.base < 16 {
            address = address.wrapping_add(self.gpr[usize::from(ops.base)]);
        } else if ops.base == RIP_BASE {
            address = address.wrapping_add(self.rip);
        }
        if ops.index < 16 {
            address = address.wrapping_add(self.gpr[usize::from(ops.index)] << ops.scale);
        }
        address
    }

    /// Returns the physical address of `size` bytes at `segment:offset` for `access`
    /// when the TLB already allows it, or `None` for the general path, which also
    /// raises the right fault.
    ///
    /// Fast handlers run only in 64-bit mode, so paging is on, only FS and GS have a
    /// base, and the CPL is CS.DPL.
    #[inline(always)]
    fn fast_physical(&self, segment: u8, offset: u64, size: u8, access: Access) -> Option<u64> {
        let linear = if usize::from(segment) >= FS {
            self.seg[usize::from(segment)].base.wrapping_add(offset)
        } else {
            offset
        };
        if !is_canonical(linear) || (linear & 0xfff) + u64::from(size) > 0x1000 {
            return None;
        }
        self.tlb.lookup(linear, access, self.seg[CS].dpl == 3)
    }

    /// Reads `SIZE` bytes of memory at `segment:offset`.
    #[inline(always)]
    fn fast_read<const SIZE: u8>(
        &mut self,
        bus: &mut dyn CpuBus,
        segment: u8,
        offset: u64,
    ) -> Result<u64, crate::core::cpu::Exit> {
        match self.fast_physical(segment, offset, SIZE, Access::Read) {
            Some(phys) => Ok(self.phys_load(bus, phys, SIZE)),
            None => self.read(bus, usize::from(segment), offset, SIZE),
        }
    }

    /// Writes `SIZE` bytes of memory at `segment:offset`.
    #[inline(always)]
    fn fast_write<const SIZE: u8>(
        &mut self,
        bus: &mut dyn CpuBus,
        segment: u8,
        offset: u64,
        value: u64,
    ) -> Exec {
        match self.fast_physical(segment, offset, SIZE, Access::Write) {
            Some(phys) => {
                self.phys_store(bus, phys, SIZE, value);
                Ok(())
            }
            None => self.write(bus, usize::from(segment), offset, SIZE, value),
        }
    }

    /// Pushes 8 bytes onto the 64-bit stack; RSP changes only if the write succeeds.
    #[inline(always)]
    fn fast_push(&mut self, bus: &mut dyn CpuBus, value: u64) -> Exec {
        let sp = self.gpr[4].wrapping_sub(8);
        self.fast_write::<8>(bus, SS as u8, sp, value)?;
        self.gpr[4] = sp;
        Ok(())
    }

    /// Reads the source operand of `SIZE` bytes.
    #[inline(always)]
    fn fast_source<const SIZE: u8, const SRC: u8>(
        &mut self,
        bus: &mut dyn CpuBus,
        ops: &Operands,
    ) -> Result<u64, crate::core::cpu::Exit> {
        Ok(match SRC {
            SRC_REGISTER => self.fast_get::<SIZE>(ops.src),
            SRC_IMMEDIATE => ops.immediate,
            _ => {
                let offset = self.fast_address(ops);
                self.fast_read::<SIZE>(bus, ops.segment, offset)?
            }
        })
    }

    /// Reads the low `SIZE` bytes of a general-purpose register.
    #[inline(always)]
    fn fast_get<const SIZE: u8>(&self, register: u8) -> u64 {
        self.gpr[usize::from(register) & 15] & size_mask(SIZE)
    }

    /// Writes a 32-bit (zero-extended) or 64-bit register.
    #[inline(always)]
    fn fast_set<const SIZE: u8>(&mut self, register: u8, value: u64) {
        self.gpr[usize::from(register) & 15] = value & size_mask(SIZE);
    }
}

/// ALU instruction `OP` with a register destination.
fn binary<const OP: u8, const SIZE: u8, const SRC: u8>(
    cpu: &mut Cpu,
    bus: &mut dyn CpuBus,
    ops: &Operands,
) -> Exec {
    let src = cpu.fast_source::<SIZE, SRC>(bus, ops)?;
    let dst = cpu.fast_get::<SIZE>(ops.dst);
    let carry = matches!(OP, BINARY_ADC | BINARY_SBB) && cpu.carry();
    let (op, res) = alu::<OP>(dst, src, carry);
    let res = res & size_mask(SIZE);
    if !matches!(OP, BINARY_CMP | BINARY_TEST) {
        cpu.fast_set::<SIZE>(ops.dst, res);
    }
    cpu.set_lazy(op, SIZE, dst, src, res);
    cpu.lazy.carry_in = carry;
    Ok(())
}

/// MOV into a register.
fn load<const SIZE: u8, const SRC: u8>(
    cpu: &mut Cpu,
    bus: &mut dyn CpuBus,
    ops: &Operands,
) -> Exec {
    let value = cpu.fast_source::<SIZE, SRC>(bus, ops)?;
    cpu.fast_set::<SIZE>(ops.dst, value);
    Ok(())
}

/// MOV into memory.
fn store<const SIZE: u8, const SRC: u8>(
    cpu: &mut Cpu,
    bus: &mut dyn CpuBus,
    ops: &Operands,
) -> Exec {
    let value = cpu.fast_source::<SIZE, SRC>(bus, ops)?;
    let offset = cpu.fast_address(ops);
    cpu.fast_write::<SIZE>(bus, ops.segment, offset, value)
}

/// LEA with 64-bit addressing.
fn lea<const SIZE: u8>(cpu: &mut Cpu, _bus: &mut dyn CpuBus, ops: &Operands) -> Exec {
    let address = cpu.fast_address(ops);
    cpu.fast_set::<SIZE>(ops.dst, address);
    Ok(())
}

/// INC (`UP`) or DEC of a register; CF is kept.
fn step_reg<const UP: bool, const SIZE: u8>(
    cpu: &mut Cpu,
    _bus: &mut dyn CpuBus,
    ops: &Operands,
) -> Exec {
    let carry = cpu.carry();
    let dst = cpu.fast_get::<SIZE>(ops.dst);
    let (op, res) = if UP {
        (FlagOp::Inc, dst.wrapping_add(1) & size_mask(SIZE))
    } else {
        (FlagOp::Dec, dst.wrapping_sub(1) & size_mask(SIZE))
    };
    cpu.fast_set::<SIZE>(ops.dst, res);
    cpu.set_lazy(op, SIZE, dst, 1, res);
    cpu.lazy.carry_in = carry;
    Ok(())
}

/// Returns the destination and the masked count of a shift or rotate by an immediate, or
/// `None` for a zero count after the write-back: no flags change, but a 32-bit
/// destination is still zero-extended.
fn immediate_count<const SIZE: u8>(cpu: &mut Cpu, ops: &Operands) -> Option<(u64, u32)> {
    let count = (ops.immediate & if SIZE == 8 { 0x3f } else { 0x1f }) as u32;
    let dst = cpu.fast_get::<SIZE>(ops.dst);
    if count == 0 {
        cpu.fast_set::<SIZE>(ops.dst, dst);
        return None;
    }
    Some((dst, count))
}

/// SHL, SHR or SAR of a register by an immediate count.
fn shift<const KIND: u8, const SIZE: u8>(
    cpu: &mut Cpu,
    _bus: &mut dyn CpuBus,
    ops: &Operands,
) -> Exec {
    let bits = u32::from(SIZE) * 8;
    let Some((dst, count)) = immediate_count::<SIZE>(cpu, ops) else {
        return Ok(());
    };
    let sign = 1u64 << (bits - 1);
    let (res, cf, of) = match KIND {
        SHIFT_LEFT => {
            let res = (dst << count) & size_mask(SIZE);
            let cf = (dst >> (bits - count)) & 1 != 0;
            (res, cf, (res & sign != 0) != cf)
        }
        SHIFT_RIGHT => (dst >> count, (dst >> (count - 1)) & 1 != 0, dst & sign != 0),
        _ => {
            let value = sign_extend(dst, SIZE);
            let res = (value >> count) as u64 & size_mask(SIZE);
            (res, (value >> (count - 1)) & 1 != 0, false)
        }
    };
    cpu.fast_set::<SIZE>(ops.dst, res);
    cpu.set_result_flags(SIZE, res, cf, of);
    Ok(())
}

/// Two-operand IMUL into a register.
fn multiply<const SIZE: u8, const SRC: u8>(
    cpu: &mut Cpu,
    bus: &mut dyn CpuBus,
    ops: &Operands,
) -> Exec {
    let b = cpu.fast_source::<SIZE, SRC>(bus, ops)?;
    let a = cpu.fast_get::<SIZE>(ops.dst);
    let product = i128::from(sign_extend(a, SIZE)) * i128::from(sign_extend(b, SIZE));
    let res = product as u64 & size_mask(SIZE);
    let overflow = i128::from(sign_extend(res, SIZE)) != product;
    cpu.fast_set::<SIZE>(ops.dst, res);
    cpu.set_result_flags(SIZE, res, overflow, overflow);
    Ok(())
}

/// NOP in any of its forms.
fn nop(_cpu: &mut Cpu, _bus: &mut dyn CpuBus, _ops: &Operands) -> Exec {
    Ok(())
}

/// Checks a 64-bit branch target: a non-canonical one raises #GP(0) at the branch.
#[inline(always)]
fn canonical_target(target: u64) -> Result<u64, crate::core::cpu::Exit> {
    if is_canonical(target) {
        Ok(target)
    } else {
        Err(Exception::gp(0).into())
    }
}

/// Near JMP (`CONDITIONAL` false) or Jcc with a relative target.
fn branch<const CONDITIONAL: bool>(cpu: &mut Cpu, _bus: &mut dyn CpuBus, ops: &Operands) -> Exec {
    if !CONDITIONAL || cpu.condition(ops.condition) {
        cpu.next_rip = canonical_target(cpu.rip.wrapping_add(ops.immediate))?;
    }
    Ok(())
}

/// Near CALL with a relative target.
fn call(cpu: &mut Cpu, bus: &mut dyn CpuBus, ops: &Operands) -> Exec {
    let target = canonical_target(cpu.rip.wrapping_add(ops.immediate))?;
    cpu.fast_push(bus, cpu.next_rip)?;
    cpu.next_rip = target;
    Ok(())
}

/// Near RET without an immediate, with a 64-bit stack.
fn ret(cpu: &mut Cpu, bus: &mut dyn CpuBus, _ops: &Operands) -> Exec {
    let target = canonical_target(cpu.fast_read::<8>(bus, SS as u8, cpu.gpr[4])?)?;
    cpu.gpr[4] = cpu.gpr[4].wrapping_add(8);
    cpu.next_rip = target;
    Ok(())
}

/// PUSH of a 64-bit register.
fn push(cpu: &mut Cpu, bus: &mut dyn CpuBus, ops: &Operands) -> Exec {
    cpu.fast_push(bus, cpu.gpr[usize::from(ops.dst) & 15])
}

/// POP into a 64-bit register other than RSP.
fn pop(cpu: &mut Cpu, bus: &mut dyn CpuBus, ops: &Operands) -> Exec {
    let value = cpu.fast_read::<8>(bus, SS as u8, cpu.gpr[4])?;
    cpu.gpr[4] = cpu.gpr[4].wrapping_add(8);
    cpu.gpr[usize::from(ops.dst) & 15] = value;
    Ok(())
}

/// MOVZX (`SIGNED` false), MOVSX or MOVSXD from `FROM` bytes into `TO` bytes.
fn extend<const SIGNED: bool, const TO: u8, const FROM: u8, const SRC: u8>(
    cpu: &mut Cpu,
    bus: &mut dyn CpuBus,
    ops: &Operands,
) -> Exec {
    let value = if SRC == SRC_REGISTER {
        (cpu.gpr[usize::from(ops.src) & 15] >> ops.shift) & size_mask(FROM)
    } else {
        let offset = cpu.fast_address(ops);
        cpu.fast_read::<FROM>(bus, ops.segment, offset)?
    };
    let value = if SIGNED {
        sign_extend(value, FROM) as u64
    } else {
        value
    };
    cpu.fast_set::<TO>(ops.dst, value);
    Ok(())
}

/// SETcc of an 8-bit register.
fn set_condition(cpu: &mut Cpu, _bus: &mut dyn CpuBus, ops: &Operands) -> Exec {
    let value = u64::from(cpu.condition(ops.condition));
    let slot = &mut cpu.gpr[usize::from(ops.dst) & 15];
    *slot = (*slot & !(0xff << ops.shift)) | (value << ops.shift);
    Ok(())
}

/// CMOVcc into a 32- or 64-bit register; the source is read, and a 32-bit destination
/// zero-extended, whether or not the condition holds.
fn conditional_move<const SIZE: u8, const SRC: u8>(
    cpu: &mut Cpu,
    bus: &mut dyn CpuBus,
    ops: &Operands,
) -> Exec {
    let src = cpu.fast_source::<SIZE, SRC>(bus, ops)?;
    let value = if cpu.condition(ops.condition) {
        src
    } else {
        cpu.gpr[usize::from(ops.dst) & 15]
    };
    cpu.fast_set::<SIZE>(ops.dst, value);
    Ok(())
}

/// Returns the flag operation and the unmasked result of ALU instruction `OP` (one of
/// the `BINARY_*` constants) on `dst` and `src`, with `carry` added or subtracted.
#[inline(always)]
pub(super) fn alu<const OP: u8>(dst: u64, src: u64, carry: bool) -> (FlagOp, u64) {
    match OP {
        BINARY_ADD | BINARY_ADC => (
            FlagOp::Add,
            dst.wrapping_add(src).wrapping_add(carry as u64),
        ),
        BINARY_SUB | BINARY_SBB | BINARY_CMP => (
            FlagOp::Sub,
            dst.wrapping_sub(src).wrapping_sub(carry as u64),
        ),
        BINARY_AND | BINARY_TEST => (FlagOp::Logic, dst & src),
        BINARY_OR => (FlagOp::Logic, dst | src),
        _ => (FlagOp::Logic, dst ^ src),
    }
}

/// ALU instruction `OP` (not ADC or SBB) on an 8-bit register destination.
fn binary8<const OP: u8, const SRC: u8>(
    cpu: &mut Cpu,
    bus: &mut dyn CpuBus,
    ops: &Operands,
) -> Exec {
    let src = match SRC {
        SRC_REGISTER => (cpu.gpr[usize::from(ops.src) & 15] >> ops.src_shift) & 0xff,
        SRC_IMMEDIATE => ops.immediate,
        _ => {
            let offset = cpu.fast_address(ops);
            cpu.fast_read::<1>(bus, ops.segment, offset)?
        }
    };
    let slot = usize::from(ops.dst) & 15;
    let dst = (cpu.gpr[slot] >> ops.shift) & 0xff;
    let (op, res) = alu::<OP>(dst, src, false);
    let res = res & 0xff;
    if !matches!(OP, BINARY_CMP | BINARY_TEST) {
        cpu.gpr[slot] = (cpu.gpr[slot] & !(0xff << ops.shift)) | (res << ops.shift);
    }
    cpu.set_lazy(op, 1, dst, src, res);
    Ok(())
}

/// CMP or TEST (`OP`) of `SIZE` bytes of memory against a register or an immediate.
fn compare_memory<const OP: u8, const SIZE: u8, const SRC: u8>(
    cpu: &mut Cpu,
    bus: &mut dyn CpuBus,
    ops: &Operands,
) -> Exec {
    let offset = cpu.fast_address(ops);
    let dst = cpu.fast_read::<SIZE>(bus, ops.segment, offset)?;
    let src = if SRC == SRC_REGISTER {
        (cpu.gpr[usize::from(ops.src) & 15] >> ops.src_shift) & size_mask(SIZE)
    } else {
        ops.immediate
    };
    let (op, res) = alu::<OP>(dst, src, false);
    cpu.set_lazy(op, SIZE, dst, src, res & size_mask(SIZE));
    Ok(())
}

/// ROL (`LEFT`) or ROR of a 32- or 64-bit register by an immediate count.
fn rotate<const LEFT: bool, const SIZE: u8>(
    cpu: &mut Cpu,
    _bus: &mut dyn CpuBus,
    ops: &Operands,
) -> Exec {
    let bits = u32::from(SIZE) * 8;
    let Some((dst, count)) = immediate_count::<SIZE>(cpu, ops) else {
        return Ok(());
    };
    let sign = 1u64 << (bits - 1);
    let res = if LEFT {
        ((dst << count) | (dst >> (bits - count))) & size_mask(SIZE)
    } else {
        ((dst >> count) | (dst << (bits - count))) & size_mask(SIZE)
    };
    cpu.fast_set::<SIZE>(ops.dst, res);
    let msb = res & sign != 0;
    if LEFT {
        let cf = res & 1 != 0;
        cpu.set_carry_overflow(cf, msb != cf);
    } else {
        cpu.set_carry_overflow(msb, msb != ((res << 1) & sign != 0));
    }
    Ok(())
}
