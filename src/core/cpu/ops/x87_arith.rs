//! x87 data movement and arithmetic: FLD/FST/FSTP, FILD/FIST/FISTP, FADD, FSUB(R),
//! FMUL, FDIV(R) with their popping and integer-operand forms, FCOM/FUCOM/FICOM/FTST,
//! FCOMI/FUCOMI, FCHS, FABS, FXCH, FLD1, FLDZ, FSQRT and FRNDINT, with the register
//! stack, tags and status flags.
//!
//! Every operation is exact on 80-bit values and rounds once, under the FCW precision
//! and rounding control. NOTE: unmasked exceptions set ES and B but raise no #MF, and
//! FIP, FDP and FOP are not recorded.

use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};

use super::extended::{self, INDEFINITE};
use super::softfloat::{round_shift, FloatEnv, Value, DE, F32, F64, IE, PE};
use super::{segment_index, Exec};
use crate::core::cpu::bus::CpuBus;
use crate::core::cpu::exceptions::Exception;
use crate::core::cpu::flags::{self, CF, PF, ZF};
use crate::core::cpu::state::{Cpu, CR0_EM, CR0_TS};

/// The sign bit of an 80-bit value.
const SIGN: u128 = 1 << 79;
/// The explicit integer bit of the 64-bit significand.
const INTEGER_BIT: u64 = 1 << 63;
const EXPONENT_BIAS: i32 = 16383;
const EXPONENT_MAX: u128 = 0x7fff;
const ONE: u128 = 0x3fff_8000_0000_0000_0000;

/// Status word bits beyond the exception flags.
const FSW_SF: u16 = 1 << 6;
const FSW_ES: u16 = 1 << 7;
const FSW_C0: u16 = 1 << 8;
const FSW_C1: u16 = 1 << 9;
const FSW_C2: u16 = 1 << 10;
const FSW_C3: u16 = 1 << 14;
const FSW_B: u16 = 1 << 15;
const FSW_TOP_SHIFT: u16 = 11;

/// An 80-bit value split into its fields.
struct Extended {
    sign: bool,
    exponent: u128,
    significand: u64,
}

fn split(value: u128) -> Extended {
    Extended {
        sign: value & SIGN != 0,
        exponent: (value >> 64) & EXPONENT_MAX,
        significand: value as u64,
    }
}

fn is_nan(value: u128) -> bool {
    let parts = split(value);
    parts.exponent == EXPONENT_MAX && parts.significand << 1 != 0
}

fn is_signaling_nan(value: u128) -> bool {
    is_nan(value) && value & (1 << 62) == 0
}

/// Builds the 80-bit value `significand * 2^exponent` from an exactly representable
/// nonzero significand.
fn pack(sign: bool, exponent: i32, significand: u64) -> u128 {
    let shift = significand.leading_zeros();
    let normalized = significand << shift;
    let top = exponent + 63 - shift as i32;
    let biased = top + EXPONENT_BIAS;
    let sign_bit = if sign { SIGN } else { 0 };
    if biased <= 0 {
        // Unreachable for binary32 and binary64 values and for integers, because the
        // 80-bit exponent range is far wider than theirs.
        return sign_bit;
    }
    sign_bit | (biased as u128) << 64 | u128::from(normalized)
}

/// Widens a binary32 or binary64 value exactly. A signaling NaN raises IE and is
/// quieted, and a denormal raises DE.
fn widen(env: &mut FloatEnv, bits: u64, double: bool) -> u128 {
    let format = if double { F64 } else { F32 };
    let (value, denormal) = env.unpack(bits, format);
    if denormal {
        env.before |= DE;
    }
    let sign_of = |sign: bool| if sign { SIGN } else { 0 };
    match value {
        Value::Zero { sign } => sign_of(sign),
        Value::Infinity { sign } => sign_of(sign) | EXPONENT_MAX << 64 | u128::from(INTEGER_BIT),
        Value::Nan { signaling } => {
            if signaling {
                env.before |= IE;
            }
            let sign = bits >> (format.bits - 1) & 1 != 0;
            let fraction_bits = if double { 52 } else { 23 };
            let fraction = bits & ((1 << fraction_bits) - 1);
            let fraction = fraction << (63 - fraction_bits) | 1 << 62;
            sign_of(sign) | EXPONENT_MAX << 64 | u128::from(INTEGER_BIT | fraction)
        }
        Value::Finite {
            sign,
            exponent,
            significand,
        } => pack(sign, exponent, significand),
    }
}

/// Rounds an 80-bit value to binary32 or binary64 under the rounding mode of `env`.
fn narrow(env: &mut FloatEnv, value: u128, double: bool) -> u64 {
    let format = if double { F64 } else { F32 };
    let parts = split(value);
    let sign = parts.sign;
    let sign_bits = if sign { 1u64 << (format.bits - 1) } else { 0 };
    if parts.exponent == EXPONENT_MAX {
        let fraction = parts.significand & !INTEGER_BIT;
        let infinity: u64 = if double {
            0x7ff0_0000_0000_0000
        } else {
            0x7f80_0000
        };
        if fraction == 0 {
            return sign_bits | infinity;
        }
        if fraction & (1 << 62) == 0 {
            env.before |= IE;
        }
        let fraction_bits = if double { 52 } else { 23 };
        let quiet = 1 << (fraction_bits - 1);
        return sign_bits | infinity | (fraction >> (63 - fraction_bits)) | quiet;
    }
    if parts.significand == 0 {
        return sign_bits;
    }
    let exponent = parts.exponent.max(1) as i32 - EXPONENT_BIAS - 63;
    env.round_pack(format, sign, exponent, u128::from(parts.significand), false)
}

/// Converts a signed integer to an 80-bit value, exactly.
fn from_integer(integer: i64) -> u128 {
    if integer == 0 {
        return 0;
    }
    pack(integer < 0, 0, integer.unsigned_abs())
}

/// Returns the exact ordering of two non-NaN 80-bit values.
fn order(a: u128, b: u128) -> std::cmp::Ordering {
    let key = |value: u128| {
        let magnitude = (value & !SIGN) as i128;
        if value & SIGN != 0 {
            -magnitude
        } else {
            magnitude
        }
    };
    key(a).cmp(&key(b))
}

impl Cpu {
    fn top(&self) -> usize {
        usize::from((self.x87.fsw >> FSW_TOP_SHIFT) & 7)
    }

    fn set_top(&mut self, top: usize) {
        self.x87.fsw = (self.x87.fsw & !(7 << FSW_TOP_SHIFT)) | ((top as u16 & 7) << FSW_TOP_SHIFT);
    }

    fn physical(&self, index: usize) -> usize {
        (self.top() + index) & 7
    }

    /// Returns ST(`index`), or the indefinite NaN with a stack underflow (IE and SF) when
    /// the register is empty.
    fn st(&mut self, index: usize) -> u128 {
        let physical = self.physical(index);
        if self.x87.ftw & (1 << physical) == 0 {
            self.x87.fsw = (self.x87.fsw | IE as u16 | FSW_SF) & !FSW_C1;
            return INDEFINITE;
        }
        self.x87.st[physical] & ((1 << 80) - 1)
    }

    fn set_st(&mut self, index: usize, value: u128) {
        let physical = self.physical(index);
        self.x87.st[physical] = value;
        self.x87.ftw |= 1 << physical;
    }

    /// Pushes `value`. On a full stack it raises a stack overflow (IE, SF and C1) and
    /// pushes the indefinite NaN instead.
    fn push_st(&mut self, value: u128) {
        let top = (self.top() + 7) & 7;
        self.set_top(top);
        if self.x87.ftw & (1 << top) != 0 {
            self.x87.fsw |= IE as u16 | FSW_SF | FSW_C1;
            self.set_st(0, INDEFINITE);
            return;
        }
        self.set_st(0, value);
    }

    fn pop_st(&mut self) {
        let top = self.top();
        self.x87.ftw &= !(1 << top);
        self.set_top(top + 1);
    }

    /// Returns the significand precision in bits that FCW.PC selects for arithmetic.
    fn x87_precision(&self) -> i32 {
        match (self.x87.fcw >> 8) & 3 {
            0 => 24,
            2 => 53,
            _ => 64,
        }
    }

    /// Returns a floating-point environment with the FCW rounding mode and masks.
    fn x87_env(&self) -> FloatEnv {
        let fcw = u32::from(self.x87.fcw);
        FloatEnv::new(((fcw & 0x3f) << 7) | ((fcw >> 10) & 3) << 13)
    }

    /// Stores the exception flags of `env` in the status word, with ES and B when one
    /// of them is unmasked.
    fn commit_x87_flags(&mut self, env: &FloatEnv) {
        let raised = (env.before | env.after) as u16;
        self.x87.fsw |= raised;
        if env.unmasked(u32::from(self.x87.fsw & 0x3f)) != 0 {
            self.x87.fsw |= FSW_ES | FSW_B;
        }
    }

    fn read_memory_operand(
        &mut self,
        bus: &mut dyn CpuBus,
        insn: &Instruction,
        size: usize,
    ) -> Result<u128, crate::core::cpu::Exit> {
        let seg = segment_index(insn.memory_segment());
        let address = self.effective_address(insn);
        if size <= 8 {
            return Ok(u128::from(self.read(bus, seg, address, size as u8)?));
        }
        let low = self.read(bus, seg, address, 8)?;
        let high = self.read(bus, seg, address.wrapping_add(8), 2)?;
        Ok(u128::from(low) | u128::from(high) << 64)
    }

    fn write_memory_operand(
        &mut self,
        bus: &mut dyn CpuBus,
        insn: &Instruction,
        size: usize,
        value: u128,
    ) -> Exec {
        let seg = segment_index(insn.memory_segment());
        let address = self.effective_address(insn);
        if size <= 8 {
            return self.write(bus, seg, address, size as u8, value as u64);
        }
        // NOTE: an 80-bit store is two writes, so a #PF on the second page can leave
        // the first eight bytes written.
        self.write(bus, seg, address, 8, value as u64)?;
        self.write(bus, seg, address.wrapping_add(8), 2, (value >> 64) as u64)
    }

    /// Returns the ST register index of operand `n`.
    fn st_operand(insn: &Instruction, n: u32) -> usize {
        (insn.op_register(n) as usize).wrapping_sub(Register::ST0 as usize) & 7
    }

    /// Executes an x87 data movement, arithmetic or comparison instruction.
    pub(super) fn exec_x87_arith(&mut self, bus: &mut dyn CpuBus, insn: &Instruction) -> Exec {
        if self.cr0 & (CR0_EM | CR0_TS) != 0 {
            return Err(Exception::nm().into());
        }
        let mnemonic = insn.mnemonic();
        let mut env = self.x87_env();
        let memory_size = insn.memory_size().size();
        let has_memory = (0..insn.op_count()).any(|n| insn.op_kind(n) == OpKind::Memory);
        match mnemonic {
            M::Fld => {
                let value = if has_memory {
                    let raw = self.read_memory_operand(bus, insn, memory_size)?;
                    match memory_size {
                        4 => widen(&mut env, raw as u64, false),
                        8 => widen(&mut env, raw as u64, true),
                        _ => raw,
                    }
                } else {
                    self.st(Self::st_operand(insn, 0))
                };
                self.x87.fsw &= !FSW_C1;
                self.push_st(value);
            }
            M::Fld1 | M::Fldz => {
                self.x87.fsw &= !FSW_C1;
                self.push_st(if mnemonic == M::Fld1 { ONE } else { 0 });
            }
            M::Fst | M::Fstp => {
                let value = self.st(0);
                self.x87.fsw &= !FSW_C1;
                if has_memory {
                    let stored = match memory_size {
                        4 => u128::from(narrow(&mut env, value, false)),
                        8 => u128::from(narrow(&mut env, value, true)),
                        _ => value,
                    };
                    self.commit_x87_flags(&env);
                    self.write_memory_operand(bus, insn, memory_size, stored)?;
                } else {
                    self.set_st(Self::st_operand(insn, 0), value);
                }
                if mnemonic == M::Fstp {
                    self.pop_st();
                }
                return Ok(());
            }
            M::Fild => {
                let raw = self.read_memory_operand(bus, insn, memory_size)? as u64;
                let value = from_integer(super::alu::sign_extend(raw, memory_size as u8));
                self.x87.fsw &= !FSW_C1;
                self.push_st(value);
            }
            M::Fist | M::Fistp => {
                let value = self.st(0);
                let integer = self.float_to_integer_x87(&mut env, value, memory_size as u8);
                self.commit_x87_flags(&env);
                self.write_memory_operand(bus, insn, memory_size, u128::from(integer))?;
                if mnemonic == M::Fistp {
                    self.pop_st();
                }
                return Ok(());
            }
            M::Fchs | M::Fabs => {
                let value = self.st(0);
                let value = if mnemonic == M::Fchs {
                    value ^ SIGN
                } else {
                    value & !SIGN
                };
                self.x87.fsw &= !FSW_C1;
                self.set_st(0, value);
            }
            M::Fxch => {
                let index = if insn.op_count() > 1 {
                    Self::st_operand(insn, 1)
                } else {
                    1
                };
                let a = self.st(0);
                let b = self.st(index);
                self.x87.fsw &= !FSW_C1;
                self.set_st(0, b);
                self.set_st(index, a);
            }
            M::Fsqrt => {
                let value = self.st(0);
                let result = extended::sqrt(&mut env, self.x87_precision(), value);
                self.x87.fsw &= !FSW_C1;
                self.set_st(0, result);
            }
            M::Frndint => {
                let value = self.st(0);
                let result = self.round_to_integral(&mut env, value);
                self.set_st(0, result);
            }
            M::Fcom
            | M::Fcomp
            | M::Fcompp
            | M::Fucom
            | M::Fucomp
            | M::Fucompp
            | M::Ficom
            | M::Ficomp
            | M::Ftst => {
                let a = self.st(0);
                let b = if mnemonic == M::Ftst {
                    0
                } else if matches!(mnemonic, M::Ficom | M::Ficomp) {
                    let raw = self.read_memory_operand(bus, insn, memory_size)? as u64;
                    from_integer(super::alu::sign_extend(raw, memory_size as u8))
                } else if has_memory {
                    let raw = self.read_memory_operand(bus, insn, memory_size)? as u64;
                    widen(&mut env, raw, memory_size == 8)
                } else if insn.op_count() > 1 {
                    self.st(Self::st_operand(insn, 1))
                } else {
                    self.st(1)
                };
                let unordered_signals = !matches!(mnemonic, M::Fucom | M::Fucomp | M::Fucompp);
                let codes = match self.compare_x87(&mut env, a, b, unordered_signals) {
                    None => FSW_C3 | FSW_C2 | FSW_C0,
                    Some(std::cmp::Ordering::Less) => FSW_C0,
                    Some(std::cmp::Ordering::Equal) => FSW_C3,
                    Some(std::cmp::Ordering::Greater) => 0,
                };
                self.x87.fsw = (self.x87.fsw & !(FSW_C3 | FSW_C2 | FSW_C1 | FSW_C0)) | codes;
                self.commit_x87_flags(&env);
                match mnemonic {
                    M::Fcomp | M::Fucomp | M::Ficomp => self.pop_st(),
                    M::Fcompp | M::Fucompp => {
                        self.pop_st();
                        self.pop_st();
                    }
                    _ => {}
                }
                return Ok(());
            }
            M::Fcomi | M::Fcomip | M::Fucomi | M::Fucomip => {
                let a = self.st(0);
                let b = self.st(Self::st_operand(insn, 1));
                let unordered_signals = matches!(mnemonic, M::Fcomi | M::Fcomip);
                let bits = match self.compare_x87(&mut env, a, b, unordered_signals) {
                    None => ZF | PF | CF,
                    Some(std::cmp::Ordering::Less) => CF,
                    Some(std::cmp::Ordering::Equal) => ZF,
                    Some(std::cmp::Ordering::Greater) => 0,
                };
                let value = (self.rflags() & !flags::ARITH) | bits;
                self.set_rflags(value);
                self.x87.fsw &= !FSW_C1;
                self.commit_x87_flags(&env);
                if matches!(mnemonic, M::Fcomip | M::Fucomip) {
                    self.pop_st();
                }
                return Ok(());
            }
            _ => return self.exec_x87_binary(bus, insn, env),
        }
        self.commit_x87_flags(&env);
        Ok(())
    }

    /// Executes FADD, FSUB, FSUBR, FMUL, FDIV, FDIVR and their popping forms.
    fn exec_x87_binary(
        &mut self,
        bus: &mut dyn CpuBus,
        insn: &Instruction,
        mut env: FloatEnv,
    ) -> Exec {
        let mnemonic = insn.mnemonic();
        let memory_size = insn.memory_size().size();
        // The destination register and the operands in the order that the forward
        // (not reversed) operation takes them.
        let integer_operand = matches!(
            mnemonic,
            M::Fiadd | M::Fisub | M::Fisubr | M::Fimul | M::Fidiv | M::Fidivr
        );
        let (destination, a, b) = if insn.op_kind(0) == OpKind::Memory {
            let raw = self.read_memory_operand(bus, insn, memory_size)? as u64;
            let operand = if integer_operand {
                from_integer(super::alu::sign_extend(raw, memory_size as u8))
            } else {
                widen(&mut env, raw, memory_size == 8)
            };
            (0, self.st(0), operand)
        } else if insn.op_count() == 2 {
            let destination = Self::st_operand(insn, 0);
            let source = Self::st_operand(insn, 1);
            (destination, self.st(destination), self.st(source))
        } else {
            (1, self.st(1), self.st(0))
        };
        let (a, b) = if matches!(
            mnemonic,
            M::Fsubr | M::Fsubrp | M::Fdivr | M::Fdivrp | M::Fisubr | M::Fidivr
        ) {
            (b, a)
        } else {
            (a, b)
        };
        let precision = self.x87_precision();
        let result = match mnemonic {
            M::Fadd | M::Faddp | M::Fiadd => extended::add(&mut env, precision, a, b, false),
            M::Fsub | M::Fsubp | M::Fsubr | M::Fsubrp | M::Fisub | M::Fisubr => {
                extended::add(&mut env, precision, a, b, true)
            }
            M::Fmul | M::Fmulp | M::Fimul => extended::mul(&mut env, precision, a, b),
            M::Fdiv | M::Fdivp | M::Fdivr | M::Fdivrp | M::Fidiv | M::Fidivr => {
                extended::div(&mut env, precision, a, b)
            }
            _ => {
                self.report_unimplemented(mnemonic);
                return Err(Exception::ud().into());
            }
        };

        self.x87.fsw &= !FSW_C1;
        self.set_st(destination, result);
        self.commit_x87_flags(&env);
        if matches!(
            mnemonic,
            M::Faddp | M::Fsubp | M::Fsubrp | M::Fmulp | M::Fdivp | M::Fdivrp
        ) {
            self.pop_st();
        }
        Ok(())
    }

    /// Compares two 80-bit values exactly. A signaling NaN raises IE, and so does a quiet
    /// one when `unordered_signals` (FCOM, FCOMI).
    fn compare_x87(
        &mut self,
        env: &mut FloatEnv,
        a: u128,
        b: u128,
        unordered_signals: bool,
    ) -> Option<std::cmp::Ordering> {
        if is_nan(a) || is_nan(b) {
            if unordered_signals || is_signaling_nan(a) || is_signaling_nan(b) {
                env.before |= IE;
            }
            return None;
        }
        Some(order(a, b))
    }

    /// Rounds an 80-bit value to an integral value under the FCW rounding mode.
    fn round_to_integral(&mut self, env: &mut FloatEnv, value: u128) -> u128 {
        let parts = split(value);
        if parts.exponent == EXPONENT_MAX {
            if is_signaling_nan(value) {
                env.before |= IE;
                return value | 1 << 62;
            }
            return value;
        }
        let exponent = parts.exponent.max(1) as i32 - EXPONENT_BIAS - 63;
        if exponent >= 0 || parts.significand == 0 {
            return value;
        }
        let mode = env.rounding();
        let (rounded, inexact) = round_shift(
            u128::from(parts.significand),
            false,
            -exponent,
            parts.sign,
            mode,
        );
        if inexact {
            env.after |= PE;
        }
        if rounded == 0 {
            return if parts.sign { SIGN } else { 0 };
        }
        pack(parts.sign, 0, rounded as u64)
    }

    /// Converts an 80-bit value to a signed integer of `size` bytes (2, 4 or 8) under
    /// the FCW rounding mode. NaNs, infinities and out-of-range values raise IE and
    /// return the integer indefinite.
    fn float_to_integer_x87(&mut self, env: &mut FloatEnv, value: u128, size: u8) -> u64 {
        let indefinite = 1u64 << (u32::from(size) * 8 - 1);
        let parts = split(value);
        if parts.exponent == EXPONENT_MAX {
            env.before |= IE;
            return indefinite;
        }
        if parts.significand == 0 {
            return 0;
        }
        let exponent = parts.exponent.max(1) as i32 - EXPONENT_BIAS - 63;
        let (magnitude, inexact) = if exponent >= 0 {
            (
                u128::from(parts.significand)
                    .checked_shl(exponent as u32)
                    .filter(|_| exponent < 64),
                false,
            )
        } else {
            let (rounded, inexact) = round_shift(
                u128::from(parts.significand),
                false,
                -exponent,
                parts.sign,
                env.rounding(),
            );
            (Some(rounded), inexact)
        };
        let limit = u128::from(indefinite) - u128::from(!parts.sign);
        match magnitude {
            Some(magnitude) if magnitude <= limit => {
                if inexact {
                    env.after |= PE;
                }
                let integer = if parts.sign {
                    (magnitude as u64).wrapping_neg()
                } else {
                    magnitude as u64
                };
                integer & (indefinite | (indefinite - 1))
            }
            _ => {
                env.before |= IE;
                indefinite
            }
        }
    }
}
