//! Register, memory and MXCSR values for generated states, weighted toward edge cases.

use iced_x86::Register;

use super::Generator;
use crate::core::cpu::oracle::state::{
    UserState, DATA_ADDR, FIXED_RFLAGS, MXCSR_DEFAULT, RSP, USER_RFLAGS_MASK,
};

/// Registers that hold a memory operand's base or index. RAX, RCX, RDX, RSI and RDI are
/// left out because instructions use them implicitly (MUL, shifts by CL, string
/// instructions), and RSP because the stack must stay inside the data area.
pub(super) const ADDRESS_REGISTERS: [Register; 10] = [
    Register::RBX,
    Register::RBP,
    Register::R8,
    Register::R9,
    Register::R10,
    Register::R11,
    Register::R12,
    Register::R13,
    Register::R14,
    Register::R15,
];

pub(super) const GPR8: [Register; 20] = [
    Register::AL,
    Register::CL,
    Register::DL,
    Register::BL,
    Register::AH,
    Register::CH,
    Register::DH,
    Register::BH,
    Register::SPL,
    Register::BPL,
    Register::SIL,
    Register::DIL,
    Register::R8L,
    Register::R9L,
    Register::R10L,
    Register::R11L,
    Register::R12L,
    Register::R13L,
    Register::R14L,
    Register::R15L,
];

/// Values that sit on a boundary of some operand width, as 64-bit patterns.
pub(super) const EDGE_VALUES: [u64; 22] = [
    0,
    1,
    2,
    0x7F,
    0x80,
    0xFF,
    0x100,
    0x7FFF,
    0x8000,
    0xFFFF,
    0x1_0000,
    0x7FFF_FFFF,
    0x8000_0000,
    0xFFFF_FFFF,
    0x1_0000_0000,
    0x7FFF_FFFF_FFFF_FFFF,
    0x8000_0000_0000_0000,
    u64::MAX,
    u64::MAX - 1,
    0xFFFF_FFFF_8000_0000,
    0xFFFF_FFFF_FFFF_FF80,
    0x5555_5555_5555_5555,
];

/// Shift and rotate counts: 0, 1, the widths and their neighbours, and the largest.
pub(super) const COUNT_VALUES: [u8; 16] =
    [0, 1, 2, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 255];

/// Bit patterns of single-precision edge values: zeros, ones, infinities, NaNs (quiet and
/// signalling), denormals, the largest finite value and values that round differently in
/// each rounding mode.
pub(super) const F32_EDGES: [u32; 18] = [
    0x0000_0000,
    0x8000_0000,
    0x3F80_0000,
    0xBF80_0000,
    0x7F80_0000,
    0xFF80_0000,
    0x7FC0_0000,
    0xFFC0_0000,
    0x7FA0_0000,
    0x0000_0001,
    0x807F_FFFF,
    0x7F7F_FFFF,
    0x3F00_0000,
    0x3FC0_0000,
    0x4020_0000,
    0x4F00_0000,
    0xCF00_0000,
    0x5F00_0000,
];

/// Bit patterns of double-precision edge values, chosen like [`F32_EDGES`].
pub(super) const F64_EDGES: [u64; 18] = [
    0x0000_0000_0000_0000,
    0x8000_0000_0000_0000,
    0x3FF0_0000_0000_0000,
    0xBFF0_0000_0000_0000,
    0x7FF0_0000_0000_0000,
    0xFFF0_0000_0000_0000,
    0x7FF8_0000_0000_0000,
    0xFFF8_0000_0000_0000,
    0x7FF4_0000_0000_0000,
    0x0000_0000_0000_0001,
    0x800F_FFFF_FFFF_FFFF,
    0x7FEF_FFFF_FFFF_FFFF,
    0x3FE0_0000_0000_0000,
    0x3FF8_0000_0000_0000,
    0x4004_0000_0000_0000,
    0x41E0_0000_0000_0000,
    0xC1E0_0000_0000_0000,
    0x43E0_0000_0000_0000,
];

impl Generator {
    /// Returns a random state: edge-heavy GPRs, RSP inside the data area, random flags,
    /// XMM lanes full of float edge cases, mostly default MXCSR and random data.
    pub(super) fn random_state(&mut self) -> UserState {
        let mut state = UserState::new();
        for index in 0..16 {
            state.gprs[index] = self.random_gpr_value();
        }
        state.gprs[RSP] = DATA_ADDR + 0x1800 + 8 * self.rng.below(0x100);
        if self.rng.chance(1, 10) {
            state.gprs[RSP] += self.rng.pick(&[2, 4]);
        }
        state.rflags = (self.rng.next_u64() & USER_RFLAGS_MASK) | FIXED_RFLAGS;
        for index in 0..16 {
            state.xmm[index] = self.random_xmm_value();
        }
        state.mxcsr = self.random_mxcsr();
        for chunk in state.data.chunks_mut(8) {
            let value = if self.rng.chance(1, 4) {
                self.random_gpr_value()
            } else {
                self.rng.next_u64()
            };
            chunk.copy_from_slice(&value.to_le_bytes());
        }
        state
    }

    pub(super) fn random_gpr_value(&mut self) -> u64 {
        match self.rng.below(6) {
            0 | 1 => self.rng.pick(&EDGE_VALUES),
            // An edge value in the low bits under random upper bits, which tests that
            // partial-register writes keep (or, for 32-bit writes, clear) the rest.
            2 => {
                let width = self.rng.pick(&[8u32, 16, 32]);
                let low_mask = (1u64 << width) - 1;
                (self.rng.next_u64() & !low_mask) | (self.rng.pick(&EDGE_VALUES) & low_mask)
            }
            3 => self.rng.below(64),
            _ => self.rng.next_u64(),
        }
    }

    pub(super) fn random_xmm_value(&mut self) -> u128 {
        match self.rng.below(5) {
            0 => {
                let mut value = 0u128;
                for lane in 0..4 {
                    let bits = if self.rng.chance(2, 3) {
                        self.rng.pick(&F32_EDGES)
                    } else {
                        self.random_f32_bits()
                    };
                    value |= (bits as u128) << (32 * lane);
                }
                value
            }
            1 => {
                let mut value = 0u128;
                for lane in 0..2 {
                    let bits = if self.rng.chance(2, 3) {
                        self.rng.pick(&F64_EDGES)
                    } else {
                        self.random_f64_bits()
                    };
                    value |= (bits as u128) << (64 * lane);
                }
                value
            }
            2 => (self.random_gpr_value() as u128) | ((self.random_gpr_value() as u128) << 64),
            _ => (self.rng.next_u64() as u128) | ((self.rng.next_u64() as u128) << 64),
        }
    }

    /// Returns a float of moderate magnitude, so that arithmetic on two of them neither
    /// overflows nor loses every bit, as random bit patterns mostly would.
    pub(super) fn random_f32_bits(&mut self) -> u32 {
        let value =
            (self.rng.next_u64() as i64 as f64) / (1u64 << (40 + self.rng.below(20))) as f64;
        (value as f32).to_bits()
    }

    pub(super) fn random_f64_bits(&mut self) -> u64 {
        let value =
            (self.rng.next_u64() as i64 as f64) / (1u64 << (20 + self.rng.below(40))) as f64;
        value.to_bits()
    }

    /// Returns the default MXCSR half of the time. Otherwise it sets a random rounding
    /// mode, FTZ, DAZ and sticky flags, and sometimes unmasks exceptions so that #XM
    /// paths run too.
    pub(super) fn random_mxcsr(&mut self) -> u32 {
        if self.rng.chance(1, 2) {
            return MXCSR_DEFAULT;
        }
        let mut mxcsr = MXCSR_DEFAULT;
        mxcsr |= (self.rng.below(4) as u32) << 13;
        if self.rng.chance(1, 4) {
            mxcsr |= 1 << 15;
        }
        if self.rng.chance(1, 4) {
            mxcsr |= 1 << 6;
        }
        if self.rng.chance(1, 4) {
            mxcsr |= self.rng.below(64) as u32;
        }
        if self.rng.chance(1, 8) {
            mxcsr &= !((self.rng.below(64) as u32) << 7);
        }
        mxcsr
    }
}
