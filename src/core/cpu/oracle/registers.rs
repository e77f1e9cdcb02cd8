//! Access to general-purpose registers of any width inside a [`UserState`], and iced-x86
//! register tables.

use iced_x86::Register;

use super::state::UserState;

/// Returns the GPR with encoding `number` (0-15) in `width` bits.
pub fn gpr_of_width(number: u64, width: u32) -> Register {
    const GPR16: [Register; 16] = [
        Register::AX,
        Register::CX,
        Register::DX,
        Register::BX,
        Register::SP,
        Register::BP,
        Register::SI,
        Register::DI,
        Register::R8W,
        Register::R9W,
        Register::R10W,
        Register::R11W,
        Register::R12W,
        Register::R13W,
        Register::R14W,
        Register::R15W,
    ];
    const GPR32: [Register; 16] = [
        Register::EAX,
        Register::ECX,
        Register::EDX,
        Register::EBX,
        Register::ESP,
        Register::EBP,
        Register::ESI,
        Register::EDI,
        Register::R8D,
        Register::R9D,
        Register::R10D,
        Register::R11D,
        Register::R12D,
        Register::R13D,
        Register::R14D,
        Register::R15D,
    ];
    const GPR64: [Register; 16] = [
        Register::RAX,
        Register::RCX,
        Register::RDX,
        Register::RBX,
        Register::RSP,
        Register::RBP,
        Register::RSI,
        Register::RDI,
        Register::R8,
        Register::R9,
        Register::R10,
        Register::R11,
        Register::R12,
        Register::R13,
        Register::R14,
        Register::R15,
    ];
    let number = number as usize % 16;
    match width {
        16 => GPR16[number],
        32 => GPR32[number],
        _ => GPR64[number],
    }
}

/// Returns XMM register `number` (0-15).
pub fn xmm(number: u64) -> Register {
    const XMM: [Register; 16] = [
        Register::XMM0,
        Register::XMM1,
        Register::XMM2,
        Register::XMM3,
        Register::XMM4,
        Register::XMM5,
        Register::XMM6,
        Register::XMM7,
        Register::XMM8,
        Register::XMM9,
        Register::XMM10,
        Register::XMM11,
        Register::XMM12,
        Register::XMM13,
        Register::XMM14,
        Register::XMM15,
    ];
    XMM[number as usize % 16]
}

/// Locates a GPR inside [`UserState::gprs`]: the index, the bit position and the width.
/// AH, CH, DH and BH are bits 8-15 of RAX, RCX, RDX and RBX.
pub fn gpr_location(register: Register) -> Option<(usize, u32, u32)> {
    if !register.is_gpr() {
        return None;
    }
    let high_byte = match register {
        Register::AH => Some(0),
        Register::CH => Some(1),
        Register::DH => Some(2),
        Register::BH => Some(3),
        _ => None,
    };
    if let Some(index) = high_byte {
        return Some((index, 8, 8));
    }
    Some((
        register.full_register().number(),
        0,
        register.size() as u32 * 8,
    ))
}

/// Reads a GPR of any width from `state`, zero-extended.
pub fn read_register(state: &UserState, register: Register) -> u64 {
    match gpr_location(register) {
        Some((index, shift, width)) => (state.gprs[index] >> shift) & width_mask(width),
        None => 0,
    }
}

/// Writes the low bits of `value` into a GPR of any width and keeps the other bits of
/// the 64-bit register. It sets up inputs, so unlike the CPU it never zero-extends.
pub fn write_register(state: &mut UserState, register: Register, value: u64) {
    if let Some((index, shift, width)) = gpr_location(register) {
        let mask = width_mask(width) << shift;
        state.gprs[index] = (state.gprs[index] & !mask) | ((value << shift) & mask);
    }
}

/// Returns a mask of the low `width` bits.
pub fn width_mask(width: u32) -> u64 {
    if width >= 64 {
        u64::MAX
    } else {
        (1u64 << width) - 1
    }
}
