//! Integer arithmetic and logic: ALU operations, shifts and rotates, multiplication and
//! division, bit tests and scans, atomic exchanges, conversions and flag instructions.

use iced_x86::{ConditionCode, Instruction, Mnemonic, OpKind, Register};

use super::{segment_index, Exec};
use crate::core::cpu::bus::CpuBus;
use crate::core::cpu::exceptions::Exception;
use crate::core::cpu::flags::{sign_bit, size_mask, FlagOp, AF, CF, OF, PF, SF, ZF};
use crate::core::cpu::state::{Cpu, Mode};

/// Sign-extends the low `size` bytes of `value`.
#[inline]
pub(crate) fn sign_extend(value: u64, size: u8) -> i64 {
    let shift = 64 - u32::from(size) * 8;
    ((value << shift) as i64) >> shift
}

/// Returns the accumulator (`high` false: AL, AX, EAX, RAX) or the data register
/// (`high` true: DL, DX, EDX, RDX) of `size` bytes.
pub(crate) fn accumulator(size: u8, high: bool) -> Register {
    match (size, high) {
        (1, false) => Register::AL,
        (2, false) => Register::AX,
        (4, false) => Register::EAX,
        (_, false) => Register::RAX,
        (1, true) => Register::DL,
        (2, true) => Register::DX,
        (4, true) => Register::EDX,
        (_, true) => Register::RDX,
    }
}

/// Operations of [`Cpu::exec_binary`].
pub(super) const BINARY_ADD: u8 = 0;
pub(super) const BINARY_OR: u8 = 1;
pub(super) const BINARY_ADC: u8 = 2;
pub(super) const BINARY_SBB: u8 = 3;
pub(super) const BINARY_AND: u8 = 4;
pub(super) const BINARY_SUB: u8 = 5;
pub(super) const BINARY_XOR: u8 = 6;
pub(super) const BINARY_CMP: u8 = 7;
pub(super) const BINARY_TEST: u8 = 8;

impl Cpu {
    /// Evaluates condition code `cc` against the current flags.
    #[inline]
    pub(crate) fn condition(&self, cc: ConditionCode) -> bool {
        // Fast paths for the common cases that need no full flag evaluation: ZF of any
        // lazy result, and unsigned or signed comparisons after CMP or SUB.
        let lazy = &self.lazy;
        if lazy.op != FlagOp::Eager {
            let mask = size_mask(lazy.size);
            match cc {
                ConditionCode::e => return lazy.res & mask == 0,
                ConditionCode::ne => return lazy.res & mask != 0,
                _ => {}
            }
            if lazy.op == FlagOp::Sub && !lazy.carry_in {
                let (dst, src) = (lazy.dst & mask, lazy.src & mask);
                let (sdst, ssrc) = (sign_extend(dst, lazy.size), sign_extend(src, lazy.size));
                match cc {
                    ConditionCode::b => return dst < src,
                    ConditionCode::ae => return dst >= src,
                    ConditionCode::be => return dst <= src,
                    ConditionCode::a => return dst > src,
                    ConditionCode::l => return sdst < ssrc,
                    ConditionCode::ge => return sdst >= ssrc,
                    ConditionCode::le => return sdst <= ssrc,
                    ConditionCode::g => return sdst > ssrc,
                    _ => {}
                }
            }
        }
        let f = self.rflags();
        let set = |flag: u64| f & flag != 0;
        match cc {
            ConditionCode::o => set(OF),
            ConditionCode::no => !set(OF),
            ConditionCode::b => set(CF),
            ConditionCode::ae => !set(CF),
            ConditionCode::e => set(ZF),
            ConditionCode::ne => !set(ZF),
            ConditionCode::be => set(CF) || set(ZF),
            ConditionCode::a => !set(CF) && !set(ZF),
            ConditionCode::s => set(SF),
            ConditionCode::ns => !set(SF),
            ConditionCode::p => set(PF),
            ConditionCode::np => !set(PF),
            ConditionCode::l => set(SF) != set(OF),
            ConditionCode::ge => set(SF) == set(OF),
            ConditionCode::le => set(ZF) || set(SF) != set(OF),
            ConditionCode::g => !set(ZF) && set(SF) == set(OF),
            ConditionCode::None => true,
        }
    }

    /// Sets CF and OF (and AF) explicitly, ZF, SF and PF from `res`.
    pub(super) fn set_result_flags(&mut self, size: u8, res: u64, cf: bool, of: bool) {
        let stored = if cf { CF } else { 0 } | if of { OF } else { 0 };
        self.set_lazy(FlagOp::Result, size, 0, stored, res);
    }

    /// Sets only CF and OF, keeping the other flags (rotates).
    pub(super) fn set_carry_overflow(&mut self, cf: bool, of: bool) {
        let mut value = self.rflags() & !(CF | OF);
        if cf {
            value |= CF;
        }
        if of {
            value |= OF;
        }
        self.set_rflags(value);
    }

    /// Executes the two-operand ALU instruction `OP` (one of the `BINARY_*` constants),
    /// specialized per operation when the instruction is decoded.
    pub(super) fn exec_binary<const OP: u8>(
        &mut self,
        bus: &mut dyn CpuBus,
        insn: &Instruction,
    ) -> Exec {
        let size = Self::operand_size(insn, 0);
        let mask = size_mask(size);
        let dst = if matches!(OP, BINARY_CMP | BINARY_TEST) {
            self.read_operand(bus, insn, 0, size)?
        } else {
            self.read_modify_operand(bus, insn, 0, size)?
        };
        let src = self.read_operand(bus, insn, 1, size)?;
        let carry = matches!(OP, BINARY_ADC | BINARY_SBB) && self.carry();
        let (op, res) = super::fast::alu::<OP>(dst, src, carry);
        let res = res & mask;
        if !matches!(OP, BINARY_CMP | BINARY_TEST) {
            self.write_operand(bus, insn, 0, size, res)?;
        }
        self.set_lazy(op, size, dst, src, res);
        self.lazy.carry_in = carry;
        Ok(())
    }

    pub(super) fn exec_unary(&mut self, bus: &mut dyn CpuBus, insn: &Instruction) -> Exec {
        let size = Self::operand_size(insn, 0);
        let mask = size_mask(size);
        let dst = self.read_modify_operand(bus, insn, 0, size)?;
        match insn.mnemonic() {
            Mnemonic::Not => return self.write_operand(bus, insn, 0, size, !dst & mask),
            Mnemonic::Neg => {
                let res = dst.wrapping_neg() & mask;
                self.write_operand(bus, insn, 0, size, res)?;
                self.set_lazy(FlagOp::Sub, size, 0, dst, res);
            }
            mnemonic => {
                let carry = self.carry();
                let (op, res) = if mnemonic == Mnemonic::Inc {
                    (FlagOp::Inc, dst.wrapping_add(1) & mask)
                } else {
                    (FlagOp::Dec, dst.wrapping_sub(1) & mask)
                };
                self.write_operand(bus, insn, 0, size, res)?;
                self.set_lazy(op, size, dst, 1, res);
                self.lazy.carry_in = carry;
            }
        }
        Ok(())
    }

    pub(super) fn exec_shift(&mut self, bus: &mut dyn CpuBus, insn: &Instruction) -> Exec {
        let size = Self::operand_size(insn, 0);
        let bits = u32::from(size) * 8;
        let mask = size_mask(size);
        let sign = sign_bit(size);
        let dst = self.read_modify_operand(bus, insn, 0, size)?;
        let raw_count = if insn.op_count() > 1 {
            self.read_operand(bus, insn, 1, 1)?
        } else {
            1
        };
        let count = (raw_count & if size == 8 { 0x3f } else { 0x1f }) as u32;
        if count == 0 {
            // No flags change; the write still zero-extends a 32-bit register.
            return self.write_operand(bus, insn, 0, size, dst);
        }
        let msb = |v: u64| v & sign != 0;
        match insn.mnemonic() {
            Mnemonic::Shl | Mnemonic::Sal => {
                let wide = u128::from(dst) << count;
                let res = (wide as u64) & mask;
                let cf = (wide >> bits) & 1 != 0;
                self.write_operand(bus, insn, 0, size, res)?;
                self.set_result_flags(size, res, cf, msb(res) != cf);
            }
            Mnemonic::Shr => {
                let res = if count >= 64 { 0 } else { dst >> count };
                let cf = count <= bits && (dst >> (count - 1)) & 1 != 0;
                self.write_operand(bus, insn, 0, size, res)?;
                self.set_result_flags(size, res, cf, msb(dst));
            }
            Mnemonic::Sar => {
                let value = sign_extend(dst, size);
                let res = (value >> count.min(63)) as u64 & mask;
                let cf = (value >> (count - 1).min(63)) & 1 != 0;
                self.write_operand(bus, insn, 0, size, res)?;
                self.set_result_flags(size, res, cf, false);
            }
            Mnemonic::Rol | Mnemonic::Ror => {
                let turn = count % bits;
                let res = if insn.mnemonic() == Mnemonic::Rol {
                    ((dst << turn) | (dst >> ((bits - turn) % bits))) & mask
                } else {
                    ((dst >> turn) | (dst << ((bits - turn) % bits))) & mask
                };
                self.write_operand(bus, insn, 0, size, res)?;
                if insn.mnemonic() == Mnemonic::Rol {
                    let cf = res & 1 != 0;
                    self.set_carry_overflow(cf, msb(res) != cf);
                } else {
                    self.set_carry_overflow(msb(res), msb(res) != msb(res << 1));
                }
            }
            _ => {
                // RCL and RCR rotate through CF: a (bits + 1)-bit rotation.
                let turn = count % (bits + 1);
                let mut value = dst;
                let mut cf = self.flag(CF);
                let left = insn.mnemonic() == Mnemonic::Rcl;
                let of_before = msb(dst) != cf;
                for _ in 0..turn {
                    if left {
                        let out = msb(value);
                        value = ((value << 1) | cf as u64) & mask;
                        cf = out;
                    } else {
                        let out = value & 1 != 0;
                        value = (value >> 1) | if cf { sign } else { 0 };
                        cf = out;
                    }
                }
                self.write_operand(bus, insn, 0, size, value)?;
                let of = if left { msb(value) != cf } else { of_before };
                self.set_carry_overflow(cf, of);
            }
        }
        Ok(())
    }

    pub(super) fn exec_double_shift(&mut self, bus: &mut dyn CpuBus, insn: &Instruction) -> Exec {
        let size = Self::operand_size(insn, 0);
        let bits = u32::from(size) * 8;
        let mask = size_mask(size);
        let dst = self.read_modify_operand(bus, insn, 0, size)?;
        let src = self.read_operand(bus, insn, 1, size)?;
        let count =
            (self.read_operand(bus, insn, 2, 1)? & if size == 8 { 0x3f } else { 0x1f }) as u32;
        if count == 0 {
            return self.write_operand(bus, insn, 0, size, dst);
        }
        let (res, cf) = if insn.mnemonic() == Mnemonic::Shld {
            // CF is the last bit shifted out of the 2 * bits wide DST:SRC. The count is
            // below 2 * bits, so no shift here reaches 128 for 64-bit operands.
            let wide = u128::from(dst) << bits | u128::from(src);
            (
                ((wide << count) >> bits) as u64 & mask,
                (wide >> (2 * bits - count)) & 1 != 0,
            )
        } else {
            let wide = u128::from(src) << bits | u128::from(dst);
            (
                (wide >> count) as u64 & mask,
                (wide >> (count - 1)) & 1 != 0,
            )
        };
        self.write_operand(bus, insn, 0, size, res)?;
        let sign = sign_bit(size);
        self.set_result_flags(size, res, cf, (res ^ dst) & sign != 0);
        Ok(())
    }

    pub(super) fn exec_multiply(&mut self, bus: &mut dyn CpuBus, insn: &Instruction) -> Exec {
        let mnemonic = insn.mnemonic();
        if mnemonic == Mnemonic::Imul && insn.op_count() > 1 {
            let size = Self::operand_size(insn, 0);
            let (a, b) = if insn.op_count() == 3 {
                (
                    self.read_operand(bus, insn, 1, size)?,
                    self.read_operand(bus, insn, 2, size)?,
                )
            } else {
                (
                    self.read_operand(bus, insn, 0, size)?,
                    self.read_operand(bus, insn, 1, size)?,
                )
            };
            let product = i128::from(sign_extend(a, size)) * i128::from(sign_extend(b, size));
            let res = product as u64 & size_mask(size);
            let overflow = i128::from(sign_extend(res, size)) != product;
            self.write_operand(bus, insn, 0, size, res)?;
            self.set_result_flags(size, res, overflow, overflow);
            return Ok(());
        }

        let size = Self::operand_size(insn, 0);
        let mask = size_mask(size);
        let bits = u32::from(size) * 8;
        let src = self.read_operand(bus, insn, 0, size)?;
        let (low, high) = if size == 1 {
            (self.gpr[0] & 0xff, (self.gpr[0] >> 8) & 0xff)
        } else {
            (self.gpr[0] & mask, self.gpr[2] & mask)
        };
        let store = |cpu: &mut Cpu, low: u64, high: u64| {
            if size == 1 {
                cpu.gpr[0] = (cpu.gpr[0] & !0xffff) | (low & 0xff) | ((high & 0xff) << 8);
            } else {
                cpu.set_reg(accumulator(size, false), low);
                cpu.set_reg(accumulator(size, true), high);
            }
        };
        match mnemonic {
            Mnemonic::Mul => {
                let product = u128::from(low) * u128::from(src);
                let (res_low, res_high) = (product as u64 & mask, (product >> bits) as u64 & mask);
                store(self, res_low, res_high);
                self.set_result_flags(size, res_low, res_high != 0, res_high != 0);
            }
            Mnemonic::Imul => {
                let product =
                    i128::from(sign_extend(low, size)) * i128::from(sign_extend(src, size));
                let res_low = product as u64 & mask;
                let res_high = (product >> bits) as u64 & mask;
                let overflow = i128::from(sign_extend(res_low, size)) != product;
                store(self, res_low, res_high);
                self.set_result_flags(size, res_low, overflow, overflow);
            }
            Mnemonic::Div => {
                if src == 0 {
                    return Err(Exception::de().into());
                }
                let dividend = (u128::from(high) << bits) | u128::from(low);
                let quotient = dividend / u128::from(src);
                if quotient > u128::from(mask) {
                    return Err(Exception::de().into());
                }
                let remainder = (dividend % u128::from(src)) as u64;
                store(self, quotient as u64, remainder);
            }
            _ => {
                if src == 0 {
                    return Err(Exception::de().into());
                }
                let dividend = ((u128::from(high) << bits) | u128::from(low)) as i128;
                let dividend = (dividend << (128 - 2 * bits)) >> (128 - 2 * bits);
                let divisor = i128::from(sign_extend(src, size));
                let quotient = dividend.wrapping_div(divisor);
                let limit = 1i128 << (bits - 1);
                if quotient >= limit || quotient < -limit {
                    return Err(Exception::de().into());
                }
                let remainder = dividend.wrapping_rem(divisor);
                store(self, quotient as u64 & mask, remainder as u64 & mask);
            }
        }
        Ok(())
    }

    pub(super) fn exec_bit_test(&mut self, bus: &mut dyn CpuBus, insn: &Instruction) -> Exec {
        let size = Self::operand_size(insn, 0);
        let bits = u64::from(size) * 8;
        let offset = self.read_operand(bus, insn, 1, size)?;
        let (value, bit, address) = if insn.op_kind(0) == OpKind::Memory {
            let mut address = self.effective_address(insn);
            if insn.op_kind(1) == OpKind::Register {
                // A register bit offset is signed and may reach outside the operand.
                let signed = sign_extend(offset, size);
                address = address
                    .wrapping_add(((signed >> bits.trailing_zeros()) * i64::from(size)) as u64);
            }
            let seg = segment_index(insn.memory_segment());
            let value = if insn.mnemonic() == Mnemonic::Bt {
                self.read(bus, seg, address, size)?
            } else {
                self.read_for_write(bus, seg, address, size)? as u64
            };
            (value, offset & (bits - 1), Some((seg, address)))
        } else {
            (
                self.read_operand(bus, insn, 0, size)?,
                offset & (bits - 1),
                None,
            )
        };
        let carry = (value >> bit) & 1 != 0;
        let res = match insn.mnemonic() {
            Mnemonic::Bts => Some(value | (1 << bit)),
            Mnemonic::Btr => Some(value & !(1 << bit)),
            Mnemonic::Btc => Some(value ^ (1 << bit)),
            _ => None,
        };
        if let Some(res) = res {
            match address {
                Some((seg, address)) => self.write(bus, seg, address, size, res)?,
                None => self.write_operand(bus, insn, 0, size, res)?,
            }
        }
        self.set_flag(CF, carry);
        Ok(())
    }

    pub(super) fn exec_bit_scan(&mut self, bus: &mut dyn CpuBus, insn: &Instruction) -> Exec {
        let size = Self::operand_size(insn, 0);
        let bits = u32::from(size) * 8;
        let src = self.read_operand(bus, insn, 1, size)?;
        let flags = self.rflags() & !(ZF | CF);
        match insn.mnemonic() {
            // TZCNT needs BMI1, which CPUID does not advertise, so F3 0F BC runs as BSF.
            Mnemonic::Bsf | Mnemonic::Tzcnt | Mnemonic::Bsr => {
                if src == 0 {
                    // The destination keeps its value, as Intel and AMD processors do.
                    self.set_rflags(flags | ZF);
                    return Ok(());
                }
                let index = if insn.mnemonic() == Mnemonic::Bsr {
                    63 - src.leading_zeros()
                } else {
                    src.trailing_zeros()
                };
                self.write_operand(bus, insn, 0, size, u64::from(index))?;
                self.set_rflags(flags);
            }
            Mnemonic::Lzcnt => {
                let count = src.leading_zeros() - (64 - bits);
                self.write_operand(bus, insn, 0, size, u64::from(count))?;
                let mut value = flags;
                if src == 0 {
                    value |= CF;
                }
                if count == 0 {
                    value |= ZF;
                }
                self.set_rflags(value);
            }
            _ => {
                let count = src.count_ones();
                self.write_operand(bus, insn, 0, size, u64::from(count))?;
                let value = flags & !(OF | SF | AF | PF) | if src == 0 { ZF } else { 0 };
                self.set_rflags(value);
            }
        }
        Ok(())
    }

    pub(super) fn exec_exchange_arith(&mut self, bus: &mut dyn CpuBus, insn: &Instruction) -> Exec {
        match insn.mnemonic() {
            Mnemonic::Xadd => {
                let size = Self::operand_size(insn, 0);
                let dst = self.read_modify_operand(bus, insn, 0, size)?;
                let src = self.read_operand(bus, insn, 1, size)?;
                let res = dst.wrapping_add(src) & size_mask(size);
                self.write_operand(bus, insn, 0, size, res)?;
                self.set_reg(insn.op_register(1), dst);
                if insn.op_kind(0) == OpKind::Register {
                    self.set_reg(insn.op_register(0), res);
                }
                self.set_lazy(FlagOp::Add, size, dst, src, res);
            }
            Mnemonic::Cmpxchg => {
                let size = Self::operand_size(insn, 0);
                let dst = self.read_modify_operand(bus, insn, 0, size)?;
                let src = self.read_operand(bus, insn, 1, size)?;
                let acc = self.reg(accumulator(size, false));
                let res = acc.wrapping_sub(dst) & size_mask(size);
                if acc == dst {
                    self.write_operand(bus, insn, 0, size, src)?;
                } else {
                    // The processor writes the destination back even when unequal.
                    if insn.op_kind(0) == OpKind::Memory {
                        self.write_operand(bus, insn, 0, size, dst)?;
                    }
                    self.set_reg(accumulator(size, false), dst);
                }
                self.set_lazy(FlagOp::Sub, size, acc, dst, res);
            }
            mnemonic => {
                let wide = mnemonic == Mnemonic::Cmpxchg16b;
                let seg = segment_index(insn.memory_segment());
                let address = self.effective_address(insn);
                let (expected, replacement, value) = if wide {
                    if self.linear(seg, address)? & 15 != 0 {
                        return Err(Exception::gp(0).into());
                    }
                    let value = self.read_for_write(bus, seg, address, 16)?;
                    let expected = u128::from(self.gpr[0]) | u128::from(self.gpr[2]) << 64;
                    let replacement = u128::from(self.gpr[3]) | u128::from(self.gpr[1]) << 64;
                    (expected, replacement, value)
                } else {
                    let value = self.read_for_write(bus, seg, address, 8)?;
                    let expected = u128::from(self.gpr[0] & 0xffff_ffff)
                        | u128::from(self.gpr[2] & 0xffff_ffff) << 32;
                    let replacement = u128::from(self.gpr[3] & 0xffff_ffff)
                        | u128::from(self.gpr[1] & 0xffff_ffff) << 32;
                    (expected, replacement, value)
                };
                let equal = value == expected;
                let stored = if equal { replacement } else { value };
                if wide {
                    self.write_u128(bus, seg, address, stored, true)?;
                } else {
                    self.write(bus, seg, address, 8, stored as u64)?;
                }
                if !equal {
                    if wide {
                        self.gpr[0] = value as u64;
                        self.gpr[2] = (value >> 64) as u64;
                    } else {
                        self.gpr[0] = value as u64 & 0xffff_ffff;
                        self.gpr[2] = (value >> 32) as u64 & 0xffff_ffff;
                    }
                }
                self.set_flag(ZF, equal);
            }
        }
        Ok(())
    }

    pub(super) fn exec_convert(&mut self, insn: &Instruction) -> Exec {
        let rax = self.gpr[0];
        match insn.mnemonic() {
            Mnemonic::Cbw => self.set_reg(Register::AX, sign_extend(rax, 1) as u64),
            Mnemonic::Cwde => self.set_reg(Register::EAX, sign_extend(rax, 2) as u64),
            Mnemonic::Cdqe => self.gpr[0] = sign_extend(rax, 4) as u64,
            Mnemonic::Cwd => self.set_reg(Register::DX, (sign_extend(rax, 2) >> 16) as u64),
            Mnemonic::Cdq => self.set_reg(Register::EDX, (sign_extend(rax, 4) >> 32) as u64),
            _ => self.gpr[2] = ((rax as i64) >> 63) as u64,
        }
        Ok(())
    }

    pub(super) fn exec_flag_op(&mut self, insn: &Instruction) -> Exec {
        let flags = self.rflags();
        let value = match insn.mnemonic() {
            Mnemonic::Clc => flags & !CF,
            Mnemonic::Stc => flags | CF,
            Mnemonic::Cmc => flags ^ CF,
            Mnemonic::Cld => flags & !crate::core::cpu::flags::DF,
            Mnemonic::Std => flags | crate::core::cpu::flags::DF,
            Mnemonic::Lahf => {
                let ah = (flags & (SF | ZF | AF | PF | CF)) | 2;
                self.set_reg(Register::AH, ah);
                return Ok(());
            }
            _ => {
                let ah = (self.gpr[0] >> 8) & (SF | ZF | AF | PF | CF);
                (flags & !(SF | ZF | AF | PF | CF)) | ah
            }
        };
        self.set_rflags(value);
        Ok(())
    }

    pub(super) fn exec_bcd(&mut self, bus: &mut dyn CpuBus, insn: &Instruction) -> Exec {
        let _ = bus;
        if self.mode() == Mode::Long64 {
            return Err(Exception::ud().into());
        }
        let al = self.gpr[0] & 0xff;
        let ah = (self.gpr[0] >> 8) & 0xff;
        let flags = self.rflags();
        let af = flags & AF != 0;
        let cf = flags & CF != 0;
        match insn.mnemonic() {
            Mnemonic::Aam => {
                let base = u64::from(insn.immediate8());
                if base == 0 {
                    return Err(Exception::de().into());
                }
                let res = al % base;
                self.set_reg(Register::AX, ((al / base) << 8) | res);
                self.set_lazy(FlagOp::Logic, 1, 0, 0, res);
            }
            Mnemonic::Aad => {
                let res = (al + ah * u64::from(insn.immediate8())) & 0xff;
                self.set_reg(Register::AX, res);
                self.set_lazy(FlagOp::Logic, 1, 0, 0, res);
            }
            Mnemonic::Aaa | Mnemonic::Aas => {
                let adjust = al & 0xf > 9 || af;
                let ax = self.gpr[0] & 0xffff;
                let ax = match (adjust, insn.mnemonic() == Mnemonic::Aaa) {
                    (false, _) => ax,
                    (true, true) => ax.wrapping_add(0x106),
                    (true, false) => ax.wrapping_sub(6).wrapping_sub(0x100),
                };
                self.set_reg(Register::AX, ax & 0xff0f);
                let value = (flags & !(AF | CF)) | if adjust { AF | CF } else { 0 };
                self.set_rflags(value);
            }
            mnemonic => {
                // DAA and DAS, as the SDM's pseudocode defines them.
                let add = mnemonic == Mnemonic::Daa;
                let mut res = al;
                let mut new_cf = false;
                let mut new_af = false;
                if al & 0xf > 9 || af {
                    res = if add { res + 6 } else { res.wrapping_sub(6) } & 0xff;
                    new_cf = cf || if add { al + 6 > 0xff } else { al < 6 };
                    new_af = true;
                }
                if al > 0x99 || cf {
                    res = if add {
                        res + 0x60
                    } else {
                        res.wrapping_sub(0x60)
                    } & 0xff;
                    new_cf = true;
                }
                self.set_reg(Register::AL, res);
                let stored = if new_cf { CF } else { 0 } | if new_af { AF } else { 0 };
                self.set_lazy(FlagOp::Result, 1, 0, stored, res);
            }
        }
        Ok(())
    }

    pub(super) fn exec_bswap(&mut self, insn: &Instruction) -> Exec {
        let register = insn.op_register(0);
        let value = self.reg(register);
        let res = match super::register_size(register) {
            8 => value.swap_bytes(),
            4 => u64::from((value as u32).swap_bytes()),
            // BSWAP of a 16-bit register is undefined; processors return zero.
            _ => 0,
        };
        self.set_reg(register, res);
        Ok(())
    }

    pub(super) fn exec_setcc(&mut self, bus: &mut dyn CpuBus, insn: &Instruction) -> Exec {
        let value = self.condition(insn.condition_code()) as u64;
        self.write_operand(bus, insn, 0, 1, value)
    }

    pub(super) fn exec_cmov(&mut self, bus: &mut dyn CpuBus, insn: &Instruction) -> Exec {
        let size = Self::operand_size(insn, 0);
        let src = self.read_operand(bus, insn, 1, size)?;
        let value = if self.condition(insn.condition_code()) {
            src
        } else {
            self.reg(insn.op_register(0))
        };
        // Written either way: a 32-bit CMOV zero-extends its destination even when false.
        self.set_reg(insn.op_register(0), value);
        Ok(())
    }
}
