//! RFLAGS with lazily evaluated arithmetic flags.
//!
//! Most instructions set CF, PF, AF, ZF, SF and OF and the next instruction overwrites
//! them unread. The ALU therefore records its operands and result in [`LazyFlags`], and
//! the six flags are computed only when an instruction reads them.

/// Carry flag.
pub const CF: u64 = 1 << 0;
/// Bit 1 of RFLAGS, always set.
pub const FIXED: u64 = 1 << 1;
/// Parity flag: the low byte of the result has an even number of set bits.
pub const PF: u64 = 1 << 2;
/// Auxiliary carry flag: carry out of bit 3.
pub const AF: u64 = 1 << 4;
/// Zero flag.
pub const ZF: u64 = 1 << 6;
/// Sign flag.
pub const SF: u64 = 1 << 7;
/// Trap flag: single-step.
pub const TF: u64 = 1 << 8;
/// Interrupt enable flag.
pub const IF: u64 = 1 << 9;
/// Direction flag for string instructions.
pub const DF: u64 = 1 << 10;
/// Overflow flag.
pub const OF: u64 = 1 << 11;
/// I/O privilege level (two bits).
pub const IOPL: u64 = 3 << 12;
/// Nested task.
pub const NT: u64 = 1 << 14;
/// Resume flag.
pub const RF: u64 = 1 << 16;
/// Virtual-8086 mode.
pub const VM: u64 = 1 << 17;
/// Alignment check.
pub const AC: u64 = 1 << 18;
/// Virtual interrupt flag.
pub const VIF: u64 = 1 << 19;
/// Virtual interrupt pending.
pub const VIP: u64 = 1 << 20;
/// CPUID available: software can toggle this bit.
pub const ID: u64 = 1 << 21;
/// The six flags that arithmetic instructions compute.
pub const ARITH: u64 = CF | PF | AF | ZF | SF | OF;
/// The bits that software can change with POPF at CPL 0 outside virtual-8086 mode.
pub const WRITABLE: u64 = ARITH | TF | IF | DF | IOPL | NT | RF | AC | ID;

/// The operation whose result defines the arithmetic flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagOp {
    /// The flags are stored in `Cpu::rflags` already.
    Eager,
    /// `res = dst + src + carry_in`.
    Add,
    /// `res = dst - src - carry_in`.
    Sub,
    /// AND, OR, XOR, TEST: CF, OF and AF clear.
    Logic,
    /// `res = dst + 1`, CF kept in `carry_in`.
    Inc,
    /// `res = dst - 1`, CF kept in `carry_in`.
    Dec,
    /// ZF, SF and PF from `res`; CF, OF and AF taken from the bits stored in `src`.
    Result,
}

/// The operands and result of the last flag-setting instruction.
#[derive(Debug, Clone, Copy)]
pub struct LazyFlags {
    pub op: FlagOp,
    /// Operand size in bytes: 1, 2, 4 or 8.
    pub size: u8,
    pub dst: u64,
    pub src: u64,
    pub res: u64,
    pub carry_in: bool,
}

impl Default for LazyFlags {
    fn default() -> Self {
        LazyFlags {
            op: FlagOp::Eager,
            size: 8,
            dst: 0,
            src: 0,
            res: 0,
            carry_in: false,
        }
    }
}

/// Returns the all-ones mask of an operand of `size` bytes.
#[inline]
pub fn size_mask(size: u8) -> u64 {
    // Branch-free: sizes 1, 2 and 4 shift by 56, 48 and 32. Any other size (8, and the
    // 0 or 16 of operands that are not integers) shifts by 0, as the mask is all ones.
    u64::MAX >> ((64 - u32::from(size.min(8)) * 8) & 63)
}

/// Returns the sign bit of an operand of `size` bytes.
#[inline]
pub fn sign_bit(size: u8) -> u64 {
    1u64 << (size as u32 * 8 - 1)
}

#[inline]
fn parity(res: u64) -> u64 {
    if (res as u8).count_ones() % 2 == 0 {
        PF
    } else {
        0
    }
}

impl LazyFlags {
    /// Computes CF alone, for instructions that read only the carry.
    #[inline]
    pub fn carry(&self) -> bool {
        let mask = size_mask(self.size);
        let (dst, src, res) = (self.dst & mask, self.src & mask, self.res & mask);
        match self.op {
            FlagOp::Eager => unreachable!("eager flags are read from rflags"),
            FlagOp::Add => res < dst || (self.carry_in && res == dst),
            FlagOp::Sub => dst < src || (self.carry_in && dst == src),
            FlagOp::Logic => false,
            FlagOp::Inc | FlagOp::Dec => self.carry_in,
            FlagOp::Result => self.src & CF != 0,
        }
    }

    /// Computes the six arithmetic flags that this record defines.
    pub fn compute(&self) -> u64 {
        let mask = size_mask(self.size);
        let sign = sign_bit(self.size);
        let res = self.res & mask;
        let (dst, src) = (self.dst & mask, self.src & mask);
        let mut flags = parity(res);
        if res == 0 {
            flags |= ZF;
        }
        if res & sign != 0 {
            flags |= SF;
        }
        match self.op {
            FlagOp::Eager => unreachable!("eager flags are read from rflags"),
            FlagOp::Add => {
                if res < dst || (self.carry_in && res == dst) {
                    flags |= CF;
                }
                if (dst ^ res) & (src ^ res) & sign != 0 {
                    flags |= OF;
                }
                flags |= (dst ^ src ^ res) & AF;
            }
            FlagOp::Sub => {
                if dst < src || (self.carry_in && dst == src) {
                    flags |= CF;
                }
                if (dst ^ src) & (dst ^ res) & sign != 0 {
                    flags |= OF;
                }
                flags |= (dst ^ src ^ res) & AF;
            }
            FlagOp::Logic => {}
            FlagOp::Inc => {
                if self.carry_in {
                    flags |= CF;
                }
                if res == sign {
                    flags |= OF;
                }
                flags |= (dst ^ res) & AF;
            }
            FlagOp::Dec => {
                if self.carry_in {
                    flags |= CF;
                }
                if res == sign - 1 {
                    flags |= OF;
                }
                flags |= (dst ^ res) & AF;
            }
            FlagOp::Result => flags |= self.src & (CF | OF | AF),
        }
        flags
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(op: FlagOp, size: u8, dst: u64, src: u64, res: u64) -> u64 {
        LazyFlags {
            op,
            size,
            dst,
            src,
            res,
            carry_in: false,
        }
        .compute()
    }

    #[test]
    fn add_overflow_and_carry() {
        assert_eq!(flags(FlagOp::Add, 1, 0x7f, 1, 0x80), OF | SF | AF);
        assert_eq!(flags(FlagOp::Add, 1, 0xff, 1, 0x00), CF | ZF | PF | AF);
    }

    #[test]
    fn size_masks() {
        assert_eq!(size_mask(1), 0xff);
        assert_eq!(size_mask(2), 0xffff);
        assert_eq!(size_mask(4), 0xffff_ffff);
        assert_eq!(size_mask(8), u64::MAX);
        assert_eq!(size_mask(0), u64::MAX);
        assert_eq!(size_mask(16), u64::MAX);
    }

    #[test]
    fn sub_borrow() {
        assert_eq!(flags(FlagOp::Sub, 4, 0, 1, 0xffff_ffff), CF | SF | PF | AF);
        assert_eq!(flags(FlagOp::Sub, 2, 0x8000, 1, 0x7fff), OF | PF | AF);
    }
}
