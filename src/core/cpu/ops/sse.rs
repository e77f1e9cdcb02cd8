//! SSE and SSE2: moves, integer and logic operations, shuffles and packs. Floating-point
//! arithmetic, comparisons and conversions live in `sse_float`. MMX registers are
//! accepted by the element-wise integer operations, MOVD, MOVQ and EMMS.

use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};

use super::{segment_index, Exec};
use crate::core::cpu::bus::CpuBus;
use crate::core::cpu::exceptions::Exception;
use crate::core::cpu::state::Cpu;
use crate::core::cpu::Exit;

/// A vector register operand: XMM0-15 or MM0-7.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Vector {
    Xmm(usize),
    Mm(usize),
}

fn vector_register(register: Register) -> Option<Vector> {
    let r = register as usize;
    if (Register::XMM0 as usize..=Register::XMM15 as usize).contains(&r) {
        Some(Vector::Xmm(r - Register::XMM0 as usize))
    } else if (Register::MM0 as usize..=Register::MM7 as usize).contains(&r) {
        Some(Vector::Mm(r - Register::MM0 as usize))
    } else {
        None
    }
}

/// Applies `f` to each `bits`-wide lane pair of `a` and `b`.
#[inline]
fn lanes(a: u128, b: u128, bits: u32, f: impl Fn(u64, u64) -> u64) -> u128 {
    let mask = if bits == 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    let mut out = 0u128;
    for i in 0..128 / bits {
        let x = (a >> (i * bits)) as u64 & mask;
        let y = (b >> (i * bits)) as u64 & mask;
        out |= u128::from(f(x, y) & mask) << (i * bits);
    }
    out
}

#[inline]
fn signed(value: u64, bits: u32) -> i64 {
    let shift = 64 - bits;
    ((value << shift) as i64) >> shift
}

fn saturate_signed(value: i64, bits: u32) -> u64 {
    let max = (1i64 << (bits - 1)) - 1;
    value.clamp(-max - 1, max) as u64
}

fn saturate_unsigned(value: i64, bits: u32) -> u64 {
    value.clamp(0, (1i64 << bits) - 1) as u64
}

/// Interleaves the low (or high) halves of the `bits`-wide lanes of `a` and `b`.
fn unpack(a: u128, b: u128, bits: u32, high: bool) -> u128 {
    let mask = (1u128 << bits) - 1;
    let count = 64 / bits;
    let first = if high { count } else { 0 };
    let mut out = 0u128;
    for i in 0..count {
        let x = (a >> ((first + i) * bits)) & mask;
        let y = (b >> ((first + i) * bits)) & mask;
        out |= x << (2 * i * bits) | y << ((2 * i + 1) * bits);
    }
    out
}

/// Packs the signed `bits`-wide lanes of `a` then `b` into half-width lanes.
fn pack(a: u128, b: u128, bits: u32, unsigned: bool) -> u128 {
    let half = bits / 2;
    let count = 128 / bits;
    let mut out = 0u128;
    for (j, source) in [a, b].into_iter().enumerate() {
        for i in 0..count {
            let lane = signed((source >> (i * bits)) as u64, bits);
            let value = if unsigned {
                saturate_unsigned(lane, half)
            } else {
                saturate_signed(lane, half)
            };
            let mask = (1u64 << half) - 1;
            out |= u128::from(value & mask) << ((j as u32 * count + i) * half);
        }
    }
    out
}

/// A lane operation of an element-wise instruction.
type LaneOp = fn(u64, u64) -> u64;

/// Element-wise integer and logic operations: (lane bits, function).
fn integer_op(mnemonic: M) -> Option<(u32, LaneOp)> {
    let op: (u32, LaneOp) = match mnemonic {
        M::Paddb => (8, |a, b| a.wrapping_add(b)),
        M::Paddw => (16, |a, b| a.wrapping_add(b)),
        M::Paddd => (32, |a, b| a.wrapping_add(b)),
        M::Paddq => (64, |a, b| a.wrapping_add(b)),
        M::Psubb => (8, |a, b| a.wrapping_sub(b)),
        M::Psubw => (16, |a, b| a.wrapping_sub(b)),
        M::Psubd => (32, |a, b| a.wrapping_sub(b)),
        M::Psubq => (64, |a, b| a.wrapping_sub(b)),
        M::Paddusb => (8, |a, b| (a + b).min(0xff)),
        M::Paddusw => (16, |a, b| (a + b).min(0xffff)),
        M::Psubusb | M::Psubusw => (if mnemonic == M::Psubusb { 8 } else { 16 }, |a, b| {
            a.saturating_sub(b)
        }),
        M::Paddsb => (8, |a, b| saturate_signed(signed(a, 8) + signed(b, 8), 8)),
        M::Paddsw => (16, |a, b| {
            saturate_signed(signed(a, 16) + signed(b, 16), 16)
        }),
        M::Psubsb => (8, |a, b| saturate_signed(signed(a, 8) - signed(b, 8), 8)),
        M::Psubsw => (16, |a, b| {
            saturate_signed(signed(a, 16) - signed(b, 16), 16)
        }),
        M::Pcmpeqb => (8, |a, b| if a == b { u64::MAX } else { 0 }),
        M::Pcmpeqw => (16, |a, b| if a == b { u64::MAX } else { 0 }),
        M::Pcmpeqd => (32, |a, b| if a == b { u64::MAX } else { 0 }),
        M::Pcmpgtb => (8, |a, b| {
            if signed(a, 8) > signed(b, 8) {
                u64::MAX
            } else {
                0
            }
        }),
        M::Pcmpgtw => (16, |a, b| {
            if signed(a, 16) > signed(b, 16) {
                u64::MAX
            } else {
                0
            }
        }),
        M::Pcmpgtd => (32, |a, b| {
            if signed(a, 32) > signed(b, 32) {
                u64::MAX
            } else {
                0
            }
        }),
        M::Pminub => (8, |a, b| a.min(b)),
        M::Pmaxub => (8, |a, b| a.max(b)),
        M::Pminsw => (16, |a, b| signed(a, 16).min(signed(b, 16)) as u64),
        M::Pmaxsw => (16, |a, b| signed(a, 16).max(signed(b, 16)) as u64),
        M::Pavgb => (8, |a, b| (a + b + 1) >> 1),
        M::Pavgw => (16, |a, b| (a + b + 1) >> 1),
        M::Pmullw => (16, |a, b| a.wrapping_mul(b)),
        M::Pmulhw => (16, |a, b| ((signed(a, 16) * signed(b, 16)) >> 16) as u64),
        M::Pmulhuw => (16, |a, b| (a * b) >> 16),
        M::Pmuludq => (64, |a, b| (a & 0xffff_ffff) * (b & 0xffff_ffff)),
        M::Pmaddwd => (32, |a, b| {
            let low = signed(a, 16) * signed(b, 16);
            let high = signed(a >> 16, 16) * signed(b >> 16, 16);
            (low + high) as u64
        }),
        M::Psadbw => (64, |a, b| {
            (0..8)
                .map(|i| ((a >> (i * 8)) & 0xff).abs_diff((b >> (i * 8)) & 0xff))
                .sum()
        }),
        M::Pand | M::Andps | M::Andpd => (64, |a, b| a & b),
        M::Por | M::Orps | M::Orpd => (64, |a, b| a | b),
        M::Pxor | M::Xorps | M::Xorpd => (64, |a, b| a ^ b),
        M::Pandn | M::Andnps | M::Andnpd => (64, |a, b| !a & b),
        _ => return None,
    };
    Some(op)
}

impl Cpu {
    fn read_vector_register(&self, vector: Vector) -> u128 {
        match vector {
            Vector::Xmm(i) => self.xmm[i],
            Vector::Mm(i) => self.x87.st[i] & u128::from(u64::MAX),
        }
    }

    fn write_vector_register(&mut self, vector: Vector, value: u128) {
        match vector {
            Vector::Xmm(i) => self.xmm[i] = value,
            Vector::Mm(i) => {
                // An MMX write sets the x87 exponent to all ones and tags every register
                // valid, as the SDM describes for MMX instructions.
                self.x87.st[i] = (value & u128::from(u64::MAX)) | (0xffff << 64);
                self.x87.ftw = 0xff;
                self.x87.fsw &= !0x3800;
            }
        }
    }

    /// Reads operand `n` as a vector: a vector register, a GPR, or memory of the
    /// instruction's memory size (16-byte operands must be aligned when `aligned`).
    pub(super) fn read_vector(
        &mut self,
        bus: &mut dyn CpuBus,
        insn: &Instruction,
        n: u32,
        aligned: bool,
    ) -> Result<u128, Exit> {
        match insn.op_kind(n) {
            OpKind::Register => {
                let register = insn.op_register(n);
                Ok(match vector_register(register) {
                    Some(vector) => self.read_vector_register(vector),
                    None => u128::from(self.reg(register)),
                })
            }
            OpKind::Memory => {
                let seg = segment_index(insn.memory_segment());
                let address = self.effective_address(insn);
                let size = insn.memory_size().size();
                if size == 16 {
                    self.read_u128(bus, seg, address, aligned)
                } else {
                    Ok(u128::from(self.read(
                        bus,
                        seg,
                        address,
                        size.min(8) as u8,
                    )?))
                }
            }
            _ => Ok(u128::from(insn.immediate(n))),
        }
    }

    /// Writes operand `n`: a whole vector register, a GPR, or memory of the memory size.
    pub(super) fn write_vector(
        &mut self,
        bus: &mut dyn CpuBus,
        insn: &Instruction,
        n: u32,
        value: u128,
        aligned: bool,
    ) -> Exec {
        match insn.op_kind(n) {
            OpKind::Register => {
                let register = insn.op_register(n);
                match vector_register(register) {
                    Some(vector) => self.write_vector_register(vector, value),
                    None => self.set_reg(register, value as u64),
                }
                Ok(())
            }
            _ => {
                let seg = segment_index(insn.memory_segment());
                let address = self.effective_address(insn);
                let size = insn.memory_size().size();
                if size == 16 {
                    self.write_u128(bus, seg, address, value, aligned)
                } else {
                    self.write(bus, seg, address, size.min(8) as u8, value as u64)
                }
            }
        }
    }

    /// Executes an SSE, SSE2 or MMX instruction; returns false for other mnemonics.
    pub(super) fn exec_sse(
        &mut self,
        bus: &mut dyn CpuBus,
        insn: &Instruction,
    ) -> Result<bool, Exit> {
        let mnemonic = insn.mnemonic();
        let uses_mmx = (0..insn.op_count()).any(|n| {
            insn.op_kind(n) == OpKind::Register
                && matches!(vector_register(insn.op_register(n)), Some(Vector::Mm(_)))
        });
        let known = integer_op(mnemonic).is_some() || self.is_sse_mnemonic(mnemonic);
        if !known {
            return Ok(false);
        }
        if uses_mmx {
            let supported = integer_op(mnemonic).is_some() || matches!(mnemonic, M::Movd | M::Movq);
            if !supported {
                // NOTE: MMX forms of shuffles, packs, shifts and PINSRW/PEXTRW are missing.
                return Ok(false);
            }
            if self.cr0 & crate::core::cpu::state::CR0_EM != 0 {
                return Err(Exception::ud().into());
            }
            if self.cr0 & crate::core::cpu::state::CR0_TS != 0 {
                return Err(Exception::nm().into());
            }
        } else {
            self.check_sse()?;
        }

        if let Some((bits, f)) = integer_op(mnemonic) {
            let a = self.read_vector(bus, insn, 0, true)?;
            let b = self.read_vector(bus, insn, 1, true)?;
            self.write_vector(bus, insn, 0, lanes(a, b, bits, f), true)?;
            return Ok(true);
        }
        self.exec_sse_other(bus, insn)?;
        Ok(true)
    }

    fn is_sse_mnemonic(&self, mnemonic: M) -> bool {
        matches!(
            mnemonic,
            M::Movdqa
                | M::Movdqu
                | M::Movaps
                | M::Movups
                | M::Movapd
                | M::Movupd
                | M::Movntdq
                | M::Movntps
                | M::Movntpd
                | M::Movd
                | M::Movq
                | M::Movss
                | M::Movsd
                | M::Movlps
                | M::Movhps
                | M::Movlpd
                | M::Movhpd
                | M::Movhlps
                | M::Movlhps
                | M::Movmskps
                | M::Movmskpd
                | M::Pmovmskb
                | M::Psllw
                | M::Pslld
                | M::Psllq
                | M::Psrlw
                | M::Psrld
                | M::Psrlq
                | M::Psraw
                | M::Psrad
                | M::Pslldq
                | M::Psrldq
                | M::Pshufd
                | M::Pshuflw
                | M::Pshufhw
                | M::Shufps
                | M::Shufpd
                | M::Punpcklbw
                | M::Punpcklwd
                | M::Punpckldq
                | M::Punpcklqdq
                | M::Punpckhbw
                | M::Punpckhwd
                | M::Punpckhdq
                | M::Punpckhqdq
                | M::Unpcklps
                | M::Unpckhps
                | M::Unpcklpd
                | M::Unpckhpd
                | M::Packsswb
                | M::Packssdw
                | M::Packuswb
                | M::Pextrw
                | M::Pinsrw
                | M::Addss
                | M::Addsd
                | M::Addps
                | M::Addpd
                | M::Subss
                | M::Subsd
                | M::Subps
                | M::Subpd
                | M::Mulss
                | M::Mulsd
                | M::Mulps
                | M::Mulpd
                | M::Divss
                | M::Divsd
                | M::Divps
                | M::Divpd
                | M::Minss
                | M::Minsd
                | M::Minps
                | M::Minpd
                | M::Maxss
                | M::Maxsd
                | M::Maxps
                | M::Maxpd
                | M::Sqrtss
                | M::Sqrtsd
                | M::Sqrtps
                | M::Sqrtpd
                | M::Rcpss
                | M::Rcpps
                | M::Rsqrtss
                | M::Rsqrtps
                | M::Cmpss
                | M::Cmpsd
                | M::Cmpps
                | M::Cmppd
                | M::Comiss
                | M::Comisd
                | M::Ucomiss
                | M::Ucomisd
                | M::Cvtsi2ss
                | M::Cvtsi2sd
                | M::Cvtss2sd
                | M::Cvtsd2ss
                | M::Cvttss2si
                | M::Cvttsd2si
                | M::Cvtss2si
                | M::Cvtsd2si
                | M::Cvtdq2ps
                | M::Cvtdq2pd
                | M::Cvttps2dq
                | M::Cvtps2dq
                | M::Cvtpd2ps
                | M::Cvtps2pd
                | M::Cvttpd2dq
                | M::Cvtpd2dq
        )
    }

    fn exec_sse_other(&mut self, bus: &mut dyn CpuBus, insn: &Instruction) -> Exec {
        let mnemonic = insn.mnemonic();
        let dst_is_register = insn.op_kind(0) == OpKind::Register;
        let src_is_memory = insn.op_kind(1) == OpKind::Memory;
        match mnemonic {
            M::Movdqa | M::Movaps | M::Movapd | M::Movntdq | M::Movntps | M::Movntpd => {
                let value = self.read_vector(bus, insn, 1, true)?;
                self.write_vector(bus, insn, 0, value, true)
            }
            M::Movdqu | M::Movups | M::Movupd => {
                let value = self.read_vector(bus, insn, 1, false)?;
                self.write_vector(bus, insn, 0, value, false)
            }
            M::Movd | M::Movq => {
                // Loads into a vector register zero its upper part; stores take the low part.
                let size = if mnemonic == M::Movd { 4 } else { 8 };
                let value = self.read_vector(bus, insn, 1, false)?;
                let mask = if size == 4 {
                    u128::from(u32::MAX)
                } else {
                    u128::from(u64::MAX)
                };
                self.write_vector(bus, insn, 0, value & mask, false)
            }
            M::Movss | M::Movsd => {
                let mask = if mnemonic == M::Movss {
                    u128::from(u32::MAX)
                } else {
                    u128::from(u64::MAX)
                };
                let value = self.read_vector(bus, insn, 1, false)? & mask;
                if dst_is_register && !src_is_memory {
                    let dst = self.read_vector(bus, insn, 0, false)?;
                    self.write_vector(bus, insn, 0, (dst & !mask) | value, false)
                } else {
                    self.write_vector(bus, insn, 0, value, false)
                }
            }
            M::Movlps | M::Movlpd | M::Movhps | M::Movhpd | M::Movhlps | M::Movlhps => {
                let low = u128::from(u64::MAX);
                let src = self.read_vector(bus, insn, 1, false)?;
                if !dst_is_register {
                    let part = if matches!(mnemonic, M::Movhps | M::Movhpd) {
                        src >> 64
                    } else {
                        src
                    };
                    return self.write_vector(bus, insn, 0, part & low, false);
                }
                let dst = self.read_vector(bus, insn, 0, false)?;
                let value = match mnemonic {
                    M::Movlps | M::Movlpd => (dst & !low) | (src & low),
                    M::Movhps | M::Movhpd | M::Movlhps => (dst & low) | (src << 64),
                    _ => (dst & !low) | (src >> 64),
                };
                self.write_vector(bus, insn, 0, value, false)
            }
            M::Movmskps | M::Movmskpd | M::Pmovmskb => {
                let src = self.read_vector(bus, insn, 1, false)?;
                let bits = match mnemonic {
                    M::Movmskps => 32,
                    M::Movmskpd => 64,
                    _ => 8,
                };
                let mut mask = 0u64;
                for i in 0..128 / bits {
                    if (src >> ((i + 1) * bits - 1)) & 1 != 0 {
                        mask |= 1 << i;
                    }
                }
                self.set_reg(insn.op_register(0), mask);
                Ok(())
            }
            M::Psllw
            | M::Pslld
            | M::Psllq
            | M::Psrlw
            | M::Psrld
            | M::Psrlq
            | M::Psraw
            | M::Psrad => {
                let a = self.read_vector(bus, insn, 0, true)?;
                let count = self.read_vector(bus, insn, 1, true)? as u64;
                let bits = match mnemonic {
                    M::Psllw | M::Psrlw | M::Psraw => 16,
                    M::Pslld | M::Psrld | M::Psrad => 32,
                    _ => 64,
                };
                let value = match mnemonic {
                    M::Psllw | M::Pslld | M::Psllq => lanes(a, 0, bits, |x, _| {
                        if count >= u64::from(bits) {
                            0
                        } else {
                            x << count
                        }
                    }),
                    M::Psrlw | M::Psrld | M::Psrlq => lanes(a, 0, bits, |x, _| {
                        if count >= u64::from(bits) {
                            0
                        } else {
                            x >> count
                        }
                    }),
                    _ => lanes(a, 0, bits, |x, _| {
                        (signed(x, bits) >> count.min(u64::from(bits) - 1)) as u64
                    }),
                };
                self.write_vector(bus, insn, 0, value, true)
            }
            M::Pslldq | M::Psrldq => {
                let a = self.read_vector(bus, insn, 0, true)?;
                let shift = u32::from(insn.immediate8()).min(16) * 8;
                let value = match (mnemonic, shift) {
                    (_, 128) => 0,
                    (M::Pslldq, _) => a << shift,
                    _ => a >> shift,
                };
                self.write_vector(bus, insn, 0, value, true)
            }
            M::Pshufd | M::Pshuflw | M::Pshufhw => {
                let src = self.read_vector(bus, insn, 1, true)?;
                let order = u32::from(insn.immediate8());
                let pick = |lane_bits: u32, base: u32, i: u32| {
                    (src >> ((base + ((order >> (2 * i)) & 3)) * lane_bits))
                        & ((1u128 << lane_bits) - 1)
                };
                let value = match mnemonic {
                    M::Pshufd => (0..4).fold(0, |acc, i| acc | pick(32, 0, i) << (32 * i)),
                    M::Pshuflw => {
                        (src & !u128::from(u64::MAX))
                            | (0..4).fold(0, |acc, i| acc | pick(16, 0, i) << (16 * i))
                    }
                    _ => {
                        (src & u128::from(u64::MAX))
                            | (0..4).fold(0, |acc, i| acc | pick(16, 4, i) << (16 * (i + 4)))
                    }
                };
                self.write_vector(bus, insn, 0, value, true)
            }
            M::Shufps | M::Shufpd => {
                let a = self.read_vector(bus, insn, 0, true)?;
                let b = self.read_vector(bus, insn, 1, true)?;
                let order = u32::from(insn.immediate8());
                let value = if mnemonic == M::Shufps {
                    let dword = |v: u128, i: u32| {
                        (v >> (32 * ((order >> (2 * i)) & 3))) & u128::from(u32::MAX)
                    };
                    dword(a, 0) | dword(a, 1) << 32 | dword(b, 2) << 64 | dword(b, 3) << 96
                } else {
                    let qword = |v: u128, bit: u32| {
                        (v >> (64 * ((order >> bit) & 1))) & u128::from(u64::MAX)
                    };
                    qword(a, 0) | qword(b, 1) << 64
                };
                self.write_vector(bus, insn, 0, value, true)
            }
            M::Punpcklbw
            | M::Punpcklwd
            | M::Punpckldq
            | M::Punpcklqdq
            | M::Punpckhbw
            | M::Punpckhwd
            | M::Punpckhdq
            | M::Punpckhqdq
            | M::Unpcklps
            | M::Unpckhps
            | M::Unpcklpd
            | M::Unpckhpd => {
                let a = self.read_vector(bus, insn, 0, true)?;
                let b = self.read_vector(bus, insn, 1, true)?;
                let (bits, high) = match mnemonic {
                    M::Punpcklbw => (8, false),
                    M::Punpcklwd => (16, false),
                    M::Punpckldq | M::Unpcklps => (32, false),
                    M::Punpcklqdq | M::Unpcklpd => (64, false),
                    M::Punpckhbw => (8, true),
                    M::Punpckhwd => (16, true),
                    M::Punpckhdq | M::Unpckhps => (32, true),
                    _ => (64, true),
                };
                self.write_vector(bus, insn, 0, unpack(a, b, bits, high), true)
            }
            M::Packsswb | M::Packssdw | M::Packuswb => {
                let a = self.read_vector(bus, insn, 0, true)?;
                let b = self.read_vector(bus, insn, 1, true)?;
                let value = match mnemonic {
                    M::Packsswb => pack(a, b, 16, false),
                    M::Packssdw => pack(a, b, 32, false),
                    _ => pack(a, b, 16, true),
                };
                self.write_vector(bus, insn, 0, value, true)
            }
            M::Pextrw => {
                let src = self.read_vector(bus, insn, 1, false)?;
                let word = (src >> (16 * u32::from(insn.immediate8() & 7))) as u64 & 0xffff;
                self.set_reg(insn.op_register(0), word);
                Ok(())
            }
            M::Pinsrw => {
                let dst = self.read_vector(bus, insn, 0, false)?;
                let word = self.read_vector(bus, insn, 1, false)? & 0xffff;
                let shift = 16 * u32::from(insn.immediate8() & 7);
                let value = (dst & !(0xffff << shift)) | (word << shift);
                self.write_vector(bus, insn, 0, value, false)
            }
            _ => self.exec_sse_float(bus, insn),
        }
    }
}
