//! Data movement: MOV and its extending forms, LEA, XCHG, the stack, segment loads.

use iced_x86::{Instruction, Mnemonic, OpKind, Register};

use super::alu::sign_extend;
use super::{register_size, segment_index, Exec};
use crate::core::cpu::bus::CpuBus;
use crate::core::cpu::exceptions::Exception;
use crate::core::cpu::flags::{self, size_mask, IF, IOPL, RF, VM};
use crate::core::cpu::state::{Cpu, SS};

/// Returns whether `register` is a segment register (ES to GS).
#[inline]
fn is_segment(register: Register) -> bool {
    (Register::ES as u32..=Register::GS as u32).contains(&(register as u32))
}

impl Cpu {
    /// MOV between general-purpose registers, memory and immediates.
    pub(super) fn exec_plain_move(&mut self, bus: &mut dyn CpuBus, insn: &Instruction) -> Exec {
        let size = Self::operand_size(insn, 0);
        let value = self.read_operand(bus, insn, 1, size)?;
        self.write_operand(bus, insn, 0, size, value)
    }

    pub(super) fn exec_move(&mut self, bus: &mut dyn CpuBus, insn: &Instruction) -> Exec {
        match insn.mnemonic() {
            Mnemonic::Mov | Mnemonic::Movnti => {
                if insn.op_kind(0) == OpKind::Register {
                    let r = insn.op_register(0);
                    if r.is_cr() || r.is_dr() {
                        return self.exec_move_to_control(bus, insn);
                    }
                    if is_segment(r) {
                        let selector = self.read_operand(bus, insn, 1, 2)? as u16;
                        if r == Register::CS {
                            return Err(Exception::ud().into());
                        }
                        self.load_segment(bus, segment_index(r), selector)?;
                        if r == Register::SS {
                            self.interrupt_shadow = true;
                        }
                        return Ok(());
                    }
                }
                if insn.op_kind(1) == OpKind::Register {
                    let r = insn.op_register(1);
                    if r.is_cr() || r.is_dr() {
                        return self.exec_move_from_control(insn);
                    }
                    if is_segment(r) {
                        let size = Self::operand_size(insn, 0).min(8);
                        let selector = self.reg(r);
                        return self.write_operand(bus, insn, 0, size, selector);
                    }
                }
                let size = Self::operand_size(insn, 0);
                let value = self.read_operand(bus, insn, 1, size)?;
                self.write_operand(bus, insn, 0, size, value)
            }
            Mnemonic::Movzx | Mnemonic::Movsx | Mnemonic::Movsxd => {
                let size = Self::operand_size(insn, 0);
                let src_size = Self::operand_size(insn, 1);
                let value = self.read_operand(bus, insn, 1, src_size)?;
                let value = if insn.mnemonic() == Mnemonic::Movzx {
                    value
                } else {
                    sign_extend(value, src_size) as u64 & size_mask(size)
                };
                self.write_operand(bus, insn, 0, size, value)
            }
            Mnemonic::Lea => {
                let size = Self::operand_size(insn, 0);
                let address = self.effective_address(insn);
                self.write_operand(bus, insn, 0, size, address & size_mask(size))
            }
            Mnemonic::Xlatb => {
                let address = self.effective_address(insn);
                let value = self.read(bus, segment_index(insn.memory_segment()), address, 1)?;
                self.set_reg(Register::AL, value);
                Ok(())
            }
            _ => {
                // XCHG: the memory operand (if any) is operand 0 or 1; write it first.
                let size = Self::operand_size(insn, 0);
                let a = self.read_modify_operand(bus, insn, 0, size)?;
                let b = self.read_modify_operand(bus, insn, 1, size)?;
                if insn.op_kind(1) == OpKind::Memory {
                    self.write_operand(bus, insn, 1, size, a)?;
                    self.write_operand(bus, insn, 0, size, b)
                } else {
                    self.write_operand(bus, insn, 0, size, b)?;
                    self.write_operand(bus, insn, 1, size, a)
                }
            }
        }
    }

    /// Returns the RFLAGS bits that POPF and IRET may change at the current privilege.
    pub(crate) fn popf_writable(&self) -> u64 {
        let mut writable = flags::WRITABLE & !(VM | RF);
        let cpl = u64::from(self.cpl());
        if cpl > 0 {
            writable &= !IOPL;
        }
        if cpl > (self.flags & IOPL) >> 12 {
            writable &= !IF;
        }
        writable
    }

    pub(super) fn exec_stack(&mut self, bus: &mut dyn CpuBus, insn: &Instruction) -> Exec {
        let size = self.stack_operand_size(insn);
        match insn.mnemonic() {
            Mnemonic::Push => {
                let value =
                    if insn.op_kind(0) == OpKind::Register && is_segment(insn.op_register(0)) {
                        self.reg(insn.op_register(0))
                    } else {
                        self.read_operand(bus, insn, 0, size)?
                    };
                self.push(bus, size, value)
            }
            Mnemonic::Pop => {
                let sp = self.gpr[4];
                let value = self.pop(bus, size)?;
                let result =
                    if insn.op_kind(0) == OpKind::Register && is_segment(insn.op_register(0)) {
                        let r = insn.op_register(0);
                        let loaded = self.load_segment(bus, segment_index(r), value as u16);
                        if r == Register::SS {
                            self.interrupt_shadow = true;
                        }
                        loaded
                    } else {
                        self.write_operand(bus, insn, 0, size, value)
                    };
                if result.is_err() {
                    self.gpr[4] = sp;
                }
                result
            }
            Mnemonic::Pushf | Mnemonic::Pushfd | Mnemonic::Pushfq => {
                if self.flags & VM != 0 && (self.flags & IOPL) != IOPL {
                    return Err(Exception::gp(0).into());
                }
                let value = self.rflags() & !(VM | RF);
                self.push(bus, size, value)
            }
            _ => {
                if self.flags & VM != 0 && (self.flags & IOPL) != IOPL {
                    return Err(Exception::gp(0).into());
                }
                let popped = self.pop(bus, size)?;
                let mut writable = self.popf_writable();
                if size == 2 {
                    writable &= 0xffff;
                }
                let value = (self.rflags() & !writable) | (popped & writable);
                self.set_rflags(value);
                Ok(())
            }
        }
    }

    pub(super) fn exec_stack_frame(&mut self, bus: &mut dyn CpuBus, insn: &Instruction) -> Exec {
        let size = self.stack_operand_size(insn);
        let saved_sp = self.gpr[4];
        let result = self.stack_frame(bus, insn, size);
        if result.is_err() {
            self.gpr[4] = saved_sp;
        }
        result
    }

    fn stack_frame(&mut self, bus: &mut dyn CpuBus, insn: &Instruction, size: u8) -> Exec {
        let width = if matches!(insn.mnemonic(), Mnemonic::Pusha | Mnemonic::Popa) {
            2
        } else {
            4
        };
        let mask = size_mask(size);
        match insn.mnemonic() {
            Mnemonic::Pusha | Mnemonic::Pushad => {
                let sp = self.gpr[4];
                for i in 0..8 {
                    let value = if i == 4 { sp } else { self.gpr[i] };
                    self.push(bus, width, value)?;
                }
                Ok(())
            }
            Mnemonic::Popa | Mnemonic::Popad => {
                let mut values = [0u64; 8];
                for i in (0..8).rev() {
                    values[i] = self.pop(bus, width)?;
                }
                for (i, &value) in values.iter().enumerate() {
                    if i != 4 {
                        if width == 2 {
                            self.gpr[i] = (self.gpr[i] & !0xffff) | (value & 0xffff);
                        } else {
                            self.gpr[i] = value & 0xffff_ffff;
                        }
                    }
                }
                Ok(())
            }
            Mnemonic::Leave => {
                let width = self.stack_width();
                let bp = self.gpr[5] & size_mask(width);
                self.set_stack_pointer(bp);
                let value = self.pop(bus, size)?;
                self.gpr[5] = (self.gpr[5] & !mask) | (value & mask);
                Ok(())
            }
            _ => {
                // ENTER imm16, imm8: allocate a frame, copying `level - 1` outer frame
                // pointers.
                let allocation = u64::from(insn.immediate16());
                let level = u64::from(insn.immediate8_2nd() & 31);
                let stack_mask = size_mask(self.stack_width());
                self.push(bus, size, self.gpr[5])?;
                let frame = self.gpr[4] & stack_mask;
                if level > 0 {
                    let mut bp = self.gpr[5];
                    for _ in 1..level {
                        bp = bp.wrapping_sub(u64::from(size));
                        let value = self.read(bus, SS, bp & stack_mask, size)?;
                        self.push(bus, size, value)?;
                    }
                    self.push(bus, size, frame)?;
                }
                let sp = (self.gpr[4] & stack_mask).wrapping_sub(allocation);
                // The write probe makes a fault on the new frame happen now, as on hardware.
                let probe = sp & stack_mask;
                let probe_value = self.read(bus, SS, probe, 1)?;
                self.write(bus, SS, probe, 1, probe_value)?;
                self.gpr[5] = (self.gpr[5] & !mask) | (frame & mask);
                self.set_stack_pointer(sp);
                Ok(())
            }
        }
    }

    pub(super) fn exec_load_far_pointer(
        &mut self,
        bus: &mut dyn CpuBus,
        insn: &Instruction,
    ) -> Exec {
        let size = register_size(insn.op_register(0));
        let seg = segment_index(insn.memory_segment());
        let address = self.effective_address(insn);
        let offset = self.read(bus, seg, address, size)?;
        let selector = self.read(bus, seg, address.wrapping_add(u64::from(size)), 2)? as u16;
        let target = match insn.mnemonic() {
            Mnemonic::Lds => Register::DS,
            Mnemonic::Les => Register::ES,
            Mnemonic::Lfs => Register::FS,
            Mnemonic::Lgs => Register::GS,
            _ => Register::SS,
        };
        self.load_segment(bus, segment_index(target), selector)?;
        if target == Register::SS {
            self.interrupt_shadow = true;
        }
        self.set_reg(insn.op_register(0), offset);
        Ok(())
    }
}
