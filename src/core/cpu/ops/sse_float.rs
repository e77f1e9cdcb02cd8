//! SSE and SSE2 floating point: scalar and packed arithmetic, comparisons and
//! conversions, computed by [`super::softfloat`] under MXCSR's rounding mode, DAZ and
//! FTZ. The exception flags go to MXCSR, and an unmasked exception raises #XM (#UD
//! when CR4.OSXMMEXCPT is clear) and leaves the destination unchanged.

use iced_x86::{Instruction, Mnemonic as M};

use super::softfloat::{FloatEnv, Format, F32, F64, PRECOMPUTATION};
use super::Exec;
use crate::core::cpu::bus::CpuBus;
use crate::core::cpu::exceptions::{Exception, XM};
use crate::core::cpu::flags::{self, CF, PF, ZF};
use crate::core::cpu::state::{Cpu, CR4_OSXMMEXCPT};

#[derive(Clone, Copy)]
enum FloatOp {
    Add,
    Sub,
    Mul,
    Div,
    Min,
    Max,
    Sqrt,
    Reciprocal,
    ReciprocalSqrt,
}

/// Applies `f` to the lanes of `format` of `a` and `b`: every lane when `packed`, else
/// only the lowest, with the rest of `a` kept.
fn float_lanes(
    a: u128,
    b: u128,
    format: Format,
    packed: bool,
    mut f: impl FnMut(u64, u64) -> u64,
) -> u128 {
    let bits = format.bits;
    let mask = if bits == 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    let count = if packed { 128 / bits } else { 1 };
    let mut out = a;
    for i in 0..count {
        let x = (a >> (i * bits)) as u64 & mask;
        let y = (b >> (i * bits)) as u64 & mask;
        let lane_mask = u128::from(mask) << (i * bits);
        out = (out & !lane_mask) | u128::from(f(x, y) & mask) << (i * bits);
    }
    out
}

/// Computes one lane of an arithmetic instruction.
fn compute(env: &mut FloatEnv, op: FloatOp, format: Format, x: u64, y: u64) -> u64 {
    match op {
        FloatOp::Add => env.add(format, x, y, false),
        FloatOp::Sub => env.add(format, x, y, true),
        FloatOp::Mul => env.mul(format, x, y),
        FloatOp::Div => env.div(format, x, y),
        FloatOp::Min => env.min_max(format, x, y, false),
        FloatOp::Max => env.min_max(format, x, y, true),
        FloatOp::Sqrt => env.sqrt(format, y),
        // RCPSS and RSQRTSS raise no exceptions. Their results are approximations that
        // differ between processor models, so the exactly rounded value is as valid.
        FloatOp::Reciprocal => u64::from((1.0 / f32::from_bits(y as u32)).to_bits()),
        FloatOp::ReciprocalSqrt => u64::from((1.0 / f32::from_bits(y as u32).sqrt()).to_bits()),
    }
}

/// Returns whether CMPPS predicate `predicate` (0-7) holds for `ordering`.
fn predicate_holds(ordering: Option<std::cmp::Ordering>, predicate: u8) -> bool {
    use std::cmp::Ordering::{Equal, Less};
    let less = ordering == Some(Less);
    let less_equal = matches!(ordering, Some(Less | Equal));
    match predicate & 7 {
        0 => ordering == Some(Equal),
        1 => less,
        2 => less_equal,
        3 => ordering.is_none(),
        4 => ordering != Some(Equal),
        5 => !less,
        6 => !less_equal,
        _ => ordering.is_some(),
    }
}

impl Cpu {
    /// Stores the exception flags that `env` collected in MXCSR, then raises #XM (or #UD
    /// when CR4.OSXMMEXCPT is clear) if any is unmasked. An unmasked invalid, denormal
    /// or divide-by-zero exception stops the instruction before rounding, so only those
    /// flags are stored then. The caller writes its destination only on success.
    fn commit_float_flags(&mut self, env: &FloatEnv) -> Exec {
        let raised = if env.unmasked(env.before) != 0 {
            env.before & PRECOMPUTATION
        } else {
            env.before | env.after
        };
        self.mxcsr |= raised;
        if env.unmasked(raised) == 0 {
            return Ok(());
        }
        if self.cr4 & CR4_OSXMMEXCPT != 0 {
            Err(Exception::new(XM).into())
        } else {
            Err(Exception::ud().into())
        }
    }

    /// Executes an SSE or SSE2 floating-point arithmetic, comparison or conversion
    /// instruction.
    pub(super) fn exec_sse_float(&mut self, bus: &mut dyn CpuBus, insn: &Instruction) -> Exec {
        let mnemonic = insn.mnemonic();
        let mut env = FloatEnv::new(self.mxcsr);
        let rounding = (self.mxcsr >> 13) & 3;
        match mnemonic {
            M::Comiss | M::Ucomiss | M::Comisd | M::Ucomisd => {
                let a = self.read_vector(bus, insn, 0, false)?;
                let b = self.read_vector(bus, insn, 1, false)?;
                let format = if matches!(mnemonic, M::Comiss | M::Ucomiss) {
                    F32
                } else {
                    F64
                };
                let signal_quiet = matches!(mnemonic, M::Comiss | M::Comisd);
                let ordering = env.compare(format, a as u64, b as u64, signal_quiet);
                self.commit_float_flags(&env)?;
                let bits = match ordering {
                    None => ZF | PF | CF,
                    Some(std::cmp::Ordering::Less) => CF,
                    Some(std::cmp::Ordering::Equal) => ZF,
                    Some(std::cmp::Ordering::Greater) => 0,
                };
                let value = (self.rflags() & !flags::ARITH) | bits;
                self.set_rflags(value);
                Ok(())
            }
            M::Cmpss | M::Cmpsd | M::Cmpps | M::Cmppd => {
                let packed = matches!(mnemonic, M::Cmpps | M::Cmppd);
                let format = if matches!(mnemonic, M::Cmpss | M::Cmpps) {
                    F32
                } else {
                    F64
                };
                let a = self.read_vector(bus, insn, 0, packed)?;
                let b = self.read_vector(bus, insn, 1, packed)?;
                let predicate = insn.immediate8() & 7;
                // LT, LE, NLT and NLE are ordered predicates: a quiet NaN raises IE.
                let signal_quiet = matches!(predicate, 1 | 2 | 5 | 6);
                let value = float_lanes(a, b, format, packed, |x, y| {
                    let ordering = env.compare(format, x, y, signal_quiet);
                    if predicate_holds(ordering, predicate) {
                        u64::MAX
                    } else {
                        0
                    }
                });
                self.commit_float_flags(&env)?;
                self.write_vector(bus, insn, 0, value, packed)
            }
            M::Cvtsi2ss | M::Cvtsi2sd => {
                let size = Self::operand_size(insn, 1);
                let src = self.read_operand(bus, insn, 1, size)?;
                let integer = super::alu::sign_extend(src, size);
                let dst = self.read_vector(bus, insn, 0, false)?;
                let format = if mnemonic == M::Cvtsi2ss { F32 } else { F64 };
                let value = float_lanes(dst, 0, format, false, |_, _| {
                    env.integer_to_float(format, integer)
                });
                self.commit_float_flags(&env)?;
                self.write_vector(bus, insn, 0, value, false)
            }
            M::Cvtss2sd | M::Cvtsd2ss => {
                let src = self.read_vector(bus, insn, 1, false)?;
                let dst = self.read_vector(bus, insn, 0, false)?;
                let (from, to) = if mnemonic == M::Cvtss2sd {
                    (F32, F64)
                } else {
                    (F64, F32)
                };
                let converted = env.convert(from, to, src as u64);
                let value = float_lanes(dst, 0, to, false, |_, _| converted);
                self.commit_float_flags(&env)?;
                self.write_vector(bus, insn, 0, value, false)
            }
            M::Cvttss2si | M::Cvttsd2si | M::Cvtss2si | M::Cvtsd2si => {
                let src = self.read_vector(bus, insn, 1, false)?;
                let size = Self::operand_size(insn, 0);
                let format = if matches!(mnemonic, M::Cvttss2si | M::Cvtss2si) {
                    F32
                } else {
                    F64
                };
                let mode = if matches!(mnemonic, M::Cvttss2si | M::Cvttsd2si) {
                    3
                } else {
                    rounding
                };
                let bits = if format == F32 {
                    src as u32 as u64
                } else {
                    src as u64
                };
                let value = env.float_to_integer(format, bits, size, mode);
                self.commit_float_flags(&env)?;
                self.set_reg(insn.op_register(0), value);
                Ok(())
            }
            M::Cvtdq2ps
            | M::Cvtdq2pd
            | M::Cvttps2dq
            | M::Cvtps2dq
            | M::Cvtpd2ps
            | M::Cvtps2pd
            | M::Cvttpd2dq
            | M::Cvtpd2dq => {
                let aligned = !matches!(mnemonic, M::Cvtdq2pd | M::Cvtps2pd);
                let src = self.read_vector(bus, insn, 1, aligned)?;
                let value = self.convert_packed(&mut env, mnemonic, src, rounding);
                self.commit_float_flags(&env)?;
                self.write_vector(bus, insn, 0, value, true)
            }
            _ => self.exec_sse_arithmetic(bus, insn, env),
        }
    }

    /// Converts the lanes of `src` for one of the packed CVT instructions.
    fn convert_packed(
        &mut self,
        env: &mut FloatEnv,
        mnemonic: M,
        src: u128,
        rounding: u32,
    ) -> u128 {
        let dword = |i: u32| u64::from((src >> (32 * i)) as u32);
        let qword = |i: u32| (src >> (64 * i)) as u64;
        let truncating = matches!(mnemonic, M::Cvttps2dq | M::Cvttpd2dq);
        let mode = if truncating { 3 } else { rounding };
        match mnemonic {
            M::Cvtdq2ps => (0..4).fold(0, |acc, i| {
                acc | u128::from(env.integer_to_float(F32, dword(i) as u32 as i32 as i64))
                    << (32 * i)
            }),
            M::Cvtdq2pd => (0..2).fold(0, |acc, i| {
                acc | u128::from(env.integer_to_float(F64, dword(i) as u32 as i32 as i64))
                    << (64 * i)
            }),
            M::Cvttps2dq | M::Cvtps2dq => (0..4).fold(0, |acc, i| {
                acc | u128::from(env.float_to_integer(F32, dword(i), 4, mode)) << (32 * i)
            }),
            M::Cvtpd2ps => (0..2).fold(0, |acc, i| {
                acc | u128::from(env.convert(F64, F32, qword(i))) << (32 * i)
            }),
            M::Cvtps2pd => (0..2).fold(0, |acc, i| {
                acc | u128::from(env.convert(F32, F64, dword(i))) << (64 * i)
            }),
            _ => (0..2).fold(0, |acc, i| {
                acc | u128::from(env.float_to_integer(F64, qword(i), 4, mode)) << (32 * i)
            }),
        }
    }

    /// Scalar and packed arithmetic: ADD, SUB, MUL, DIV, MIN, MAX, SQRT, RCP, RSQRT.
    fn exec_sse_arithmetic(
        &mut self,
        bus: &mut dyn CpuBus,
        insn: &Instruction,
        mut env: FloatEnv,
    ) -> Exec {
        let mnemonic = insn.mnemonic();
        let op = match mnemonic {
            M::Addss | M::Addsd | M::Addps | M::Addpd => FloatOp::Add,
            M::Subss | M::Subsd | M::Subps | M::Subpd => FloatOp::Sub,
            M::Mulss | M::Mulsd | M::Mulps | M::Mulpd => FloatOp::Mul,
            M::Divss | M::Divsd | M::Divps | M::Divpd => FloatOp::Div,
            M::Minss | M::Minsd | M::Minps | M::Minpd => FloatOp::Min,
            M::Maxss | M::Maxsd | M::Maxps | M::Maxpd => FloatOp::Max,
            M::Sqrtss | M::Sqrtsd | M::Sqrtps | M::Sqrtpd => FloatOp::Sqrt,
            M::Rcpss | M::Rcpps => FloatOp::Reciprocal,
            M::Rsqrtss | M::Rsqrtps => FloatOp::ReciprocalSqrt,
            _ => return Err(Exception::ud().into()),
        };
        let packed = matches!(
            mnemonic,
            M::Addps
                | M::Addpd
                | M::Subps
                | M::Subpd
                | M::Mulps
                | M::Mulpd
                | M::Divps
                | M::Divpd
                | M::Minps
                | M::Minpd
                | M::Maxps
                | M::Maxpd
                | M::Sqrtps
                | M::Sqrtpd
                | M::Rcpps
                | M::Rsqrtps
        );
        let double = matches!(
            mnemonic,
            M::Addsd
                | M::Addpd
                | M::Subsd
                | M::Subpd
                | M::Mulsd
                | M::Mulpd
                | M::Divsd
                | M::Divpd
                | M::Minsd
                | M::Minpd
                | M::Maxsd
                | M::Maxpd
                | M::Sqrtsd
                | M::Sqrtpd
        );
        let format = if double { F64 } else { F32 };
        let a = self.read_vector(bus, insn, 0, packed)?;
        let b = self.read_vector(bus, insn, 1, packed)?;
        let value = float_lanes(a, b, format, packed, |x, y| {
            compute(&mut env, op, format, x, y)
        });
        self.commit_float_flags(&env)?;
        self.write_vector(bus, insn, 0, value, packed)
    }
}
