//! Control transfer: JMP, CALL, RET (near and far), Jcc, LOOP and JrCXZ, INT, IRET, HLT.

use iced_x86::{Code, Instruction, MemorySize, Mnemonic, OpKind};

use super::{segment_index, Exec};
use crate::core::cpu::bus::CpuBus;
use crate::core::cpu::exceptions::{self, Exception, Source};
use crate::core::cpu::flags::{size_mask, OF};
use crate::core::cpu::msr::is_canonical;
use crate::core::cpu::state::{Cpu, Mode};
use crate::core::cpu::Exit;

/// Returns the size in bytes of LOOP's or JrCXZ's count register (CX, ECX or RCX).
fn counter_size(code: Code) -> u8 {
    use Code as C;
    match code {
        C::Loopne_rel8_16_CX
        | C::Loopne_rel8_32_CX
        | C::Loope_rel8_16_CX
        | C::Loope_rel8_32_CX
        | C::Loop_rel8_16_CX
        | C::Loop_rel8_32_CX
        | C::Jcxz_rel8_16
        | C::Jcxz_rel8_32 => 2,
        C::Loopne_rel8_16_RCX
        | C::Loopne_rel8_64_RCX
        | C::Loope_rel8_16_RCX
        | C::Loope_rel8_64_RCX
        | C::Loop_rel8_16_RCX
        | C::Loop_rel8_64_RCX
        | C::Jrcxz_rel8_16
        | C::Jrcxz_rel8_64 => 8,
        _ => 4,
    }
}

impl Cpu {
    /// Returns the target of a relative branch, wrapped to its operand size.
    #[inline]
    fn relative_target(&self, insn: &Instruction) -> Result<u64, Exit> {
        let target = self.rip.wrapping_add(insn.near_branch64());
        match insn.op_kind(0) {
            OpKind::NearBranch16 => Ok(target & 0xffff),
            OpKind::NearBranch32 => Ok(target & 0xffff_ffff),
            _ => self.checked_near_target(target, 8),
        }
    }

    /// Wraps an absolute near target to `size` bytes; in 64-bit mode a non-canonical
    /// target raises #GP(0).
    #[inline]
    fn checked_near_target(&self, target: u64, size: u8) -> Result<u64, Exit> {
        let target = target & size_mask(size);
        if self.mode() == Mode::Long64 && !is_canonical(target) {
            return Err(Exception::gp(0).into());
        }
        Ok(target)
    }

    /// Reads a far pointer operand (offset, then a 16-bit selector).
    fn far_pointer(
        &mut self,
        bus: &mut dyn CpuBus,
        insn: &Instruction,
    ) -> Result<(u16, u64), Exit> {
        let size = match insn.memory_size() {
            MemorySize::SegPtr16 => 2,
            MemorySize::SegPtr32 => 4,
            _ => 8,
        };
        let seg = segment_index(insn.memory_segment());
        let address = self.effective_address(insn);
        let offset = self.read(bus, seg, address, size)?;
        let selector = self.read(bus, seg, address.wrapping_add(u64::from(size)), 2)? as u16;
        Ok((selector, offset))
    }

    pub(super) fn exec_branch(&mut self, bus: &mut dyn CpuBus, insn: &Instruction) -> Exec {
        let far_memory = insn.op_kind(0) == OpKind::Memory
            && matches!(
                insn.memory_size(),
                MemorySize::SegPtr16 | MemorySize::SegPtr32 | MemorySize::SegPtr64
            );
        match insn.mnemonic() {
            Mnemonic::Jmp => match insn.op_kind(0) {
                OpKind::FarBranch16 | OpKind::FarBranch32 => {
                    let offset = if insn.op_kind(0) == OpKind::FarBranch16 {
                        u64::from(insn.far_branch16())
                    } else {
                        u64::from(insn.far_branch32())
                    };
                    self.far_jump(bus, insn.far_branch_selector(), offset)
                }
                _ if far_memory => {
                    let (selector, offset) = self.far_pointer(bus, insn)?;
                    self.far_jump(bus, selector, offset)
                }
                OpKind::Register | OpKind::Memory => {
                    let size = Self::operand_size(insn, 0);
                    let target = self.read_operand(bus, insn, 0, size)?;
                    self.next_rip = self.checked_near_target(target, size)?;
                    Ok(())
                }
                _ => {
                    self.next_rip = self.relative_target(insn)?;
                    Ok(())
                }
            },
            Mnemonic::Call => {
                let size = self.stack_operand_size(insn);
                match insn.op_kind(0) {
                    OpKind::FarBranch16 | OpKind::FarBranch32 => {
                        let offset = if insn.op_kind(0) == OpKind::FarBranch16 {
                            u64::from(insn.far_branch16())
                        } else {
                            u64::from(insn.far_branch32())
                        };
                        self.far_call(bus, insn.far_branch_selector(), offset, size)
                    }
                    _ if far_memory => {
                        let (selector, offset) = self.far_pointer(bus, insn)?;
                        let size = match insn.memory_size() {
                            MemorySize::SegPtr16 => 2,
                            MemorySize::SegPtr32 => 4,
                            _ => 8,
                        };
                        self.far_call(bus, selector, offset, size)
                    }
                    OpKind::Register | OpKind::Memory => {
                        let target = self.read_operand(bus, insn, 0, size)?;
                        let target = self.checked_near_target(target, size)?;
                        self.push(bus, size, self.next_rip)?;
                        self.next_rip = target;
                        Ok(())
                    }
                    _ => {
                        let target = self.relative_target(insn)?;
                        self.push(bus, size, self.next_rip)?;
                        self.next_rip = target;
                        Ok(())
                    }
                }
            }
            Mnemonic::Ret => {
                let size = self.stack_operand_size(insn);
                let target = self.peek(bus, size, 0)?;
                let target = self.checked_near_target(target, size)?;
                let release = if insn.op_count() > 0 {
                    u64::from(insn.immediate16())
                } else {
                    0
                };
                self.pop_n(u64::from(size) + release);
                self.next_rip = target;
                Ok(())
            }
            _ => {
                let size = match insn.code() {
                    Code::Retfw | Code::Retfw_imm16 => 2,
                    Code::Retfq | Code::Retfq_imm16 => 8,
                    _ => 4,
                };
                let release = if insn.op_count() > 0 {
                    u64::from(insn.immediate16())
                } else {
                    0
                };
                self.far_return(bus, size, release)
            }
        }
    }

    pub(super) fn exec_jcc(&mut self, insn: &Instruction) -> Exec {
        if self.condition(insn.condition_code()) {
            self.next_rip = self.relative_target(insn)?;
        }
        Ok(())
    }

    pub(super) fn exec_loop(&mut self, insn: &Instruction) -> Exec {
        let size = counter_size(insn.code());
        let mask = size_mask(size);
        let count = self.gpr[1] & mask;
        let taken = match insn.mnemonic() {
            Mnemonic::Jcxz | Mnemonic::Jecxz | Mnemonic::Jrcxz => count == 0,
            mnemonic => {
                let count = count.wrapping_sub(1) & mask;
                // A 16-bit counter (CX) merges into RCX; a 32-bit one (ECX, with the 0x67
                // prefix in 64-bit mode) zero-extends like any 32-bit register write.
                self.gpr[1] = if size == 4 {
                    count
                } else {
                    (self.gpr[1] & !mask) | count
                };
                let zf = self.flag(crate::core::cpu::flags::ZF);
                count != 0
                    && match mnemonic {
                        Mnemonic::Loope => zf,
                        Mnemonic::Loopne => !zf,
                        _ => true,
                    }
            }
        };
        if taken {
            self.next_rip = self.relative_target(insn)?;
        }
        Ok(())
    }

    pub(super) fn exec_interrupt_op(&mut self, bus: &mut dyn CpuBus, insn: &Instruction) -> Exec {
        let (vector, source) = match insn.mnemonic() {
            Mnemonic::Int => (insn.immediate8(), Source::Software),
            Mnemonic::Int3 => (exceptions::BP, Source::Software),
            Mnemonic::Int1 => (exceptions::DB, Source::Trap),
            Mnemonic::Into => {
                if self.mode() == Mode::Long64 {
                    return Err(Exception::ud().into());
                }
                if !self.flag(OF) {
                    return Ok(());
                }
                (exceptions::OF, Source::Software)
            }
            Mnemonic::Hlt => {
                if self.cpl() != 0 {
                    return Err(Exception::gp(0).into());
                }
                return Err(Exit::Halt);
            }
            _ => {
                let size = match insn.code() {
                    Code::Iretw => 2,
                    Code::Iretq => 8,
                    _ => 4,
                };
                return self.iret(bus, size);
            }
        };
        self.interrupt(bus, vector, source, self.next_rip)?;
        self.next_rip = self.rip;
        Ok(())
    }
}
