//! Results that the architecture leaves undefined, which a comparison must ignore.
//!
//! Each rule quotes the "Flags Affected" (or "Operation") section of the instruction's
//! page in the Intel SDM, volume 2. Where Intel and AMD both define a result, the rule
//! does not mask it, so the oracle also checks that the emulator picked the defined
//! value.

use iced_x86::{Instruction, Mnemonic, OpKind};

use super::registers::{read_register, width_mask};
use super::state::{
    UserState, ARITHMETIC_FLAGS, DATA_ADDR, FLAG_AF, FLAG_CF, FLAG_OF, FLAG_PF, FLAG_SF, FLAG_ZF,
};

/// The parts of an output state that a comparison must ignore.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Undefined {
    /// RFLAGS bits with undefined values.
    pub flags: u64,
    /// Undefined GPR bits, as (index into [`UserState::gprs`], mask of bits).
    pub gprs: Vec<(usize, u64)>,
    /// Undefined bytes of the data area, as byte ranges relative to `DATA_ADDR`.
    pub data: Vec<std::ops::Range<usize>>,
    /// The rules that applied, for mismatch reports.
    pub rules: Vec<&'static str>,
}

impl Undefined {
    fn add_flags(&mut self, flags: u64, rule: &'static str) {
        self.flags |= flags;
        self.rules.push(rule);
    }

    /// Merges `other` into `self`.
    pub fn merge(&mut self, other: Undefined) {
        self.flags |= other.flags;
        self.gprs.extend(other.gprs);
        self.data.extend(other.data);
        self.rules.extend(other.rules);
    }
}

/// Returns what `instructions` leave undefined when they start from `input`.
///
/// The rules that depend on operand values (shift counts, BSF/BSR sources) read them
/// from `input`, which is exact for the first instruction only. The generator therefore
/// puts such instructions first; the later instructions of its multi-instruction
/// snippets (branches, stack sequences) leave nothing undefined.
pub fn undefined_for_snippet(instructions: &[Instruction], input: &UserState) -> Undefined {
    let mut undefined = Undefined::default();
    for instruction in instructions {
        undefined.merge(undefined_effects(instruction, input));
    }
    undefined
}

/// Returns what `instruction` leaves undefined when it executes in state `before`.
pub fn undefined_effects(instruction: &Instruction, before: &UserState) -> Undefined {
    let mut undefined = Undefined::default();
    match instruction.mnemonic() {
        Mnemonic::And | Mnemonic::Or | Mnemonic::Xor | Mnemonic::Test => {
            undefined.add_flags(FLAG_AF, "AND/OR/XOR/TEST: the AF flag is undefined");
        }
        Mnemonic::Shl | Mnemonic::Shr | Mnemonic::Sar | Mnemonic::Sal => {
            let width = destination_width(instruction);
            let count = masked_count(instruction, 1, width, before);
            if count != 0 {
                undefined.add_flags(
                    FLAG_AF,
                    "SAL/SAR/SHL/SHR: for a non-zero count, the AF flag is undefined",
                );
                if count != 1 {
                    undefined.add_flags(
                        FLAG_OF,
                        "SAL/SAR/SHL/SHR: the OF flag is affected only for 1-bit shifts",
                    );
                }
                let logical = matches!(
                    instruction.mnemonic(),
                    Mnemonic::Shl | Mnemonic::Shr | Mnemonic::Sal
                );
                if logical && count >= u64::from(width) {
                    undefined.add_flags(
                        FLAG_CF,
                        "SHL/SHR: CF is undefined where the count is greater than or equal to the operand size",
                    );
                }
            }
        }
        Mnemonic::Rol | Mnemonic::Ror | Mnemonic::Rcl | Mnemonic::Rcr => {
            let width = destination_width(instruction);
            let count = masked_count(instruction, 1, width, before);
            if count > 1 {
                undefined.add_flags(
                    FLAG_OF,
                    "RCL/RCR/ROL/ROR: the OF flag is defined only for 1-bit rotates",
                );
            }
        }
        Mnemonic::Shld | Mnemonic::Shrd => {
            let width = destination_width(instruction);
            let count = masked_count(instruction, 2, width, before);
            if count > u64::from(width) {
                undefined.add_flags(
                    ARITHMETIC_FLAGS,
                    "SHLD/SHRD: if the count is greater than the operand size, the result and flags are undefined",
                );
                mark_destination(&mut undefined, instruction, before, width);
            } else if count != 0 {
                undefined.add_flags(
                    FLAG_AF,
                    "SHLD/SHRD: for a non-zero count, the AF flag is undefined",
                );
                if count != 1 {
                    undefined.add_flags(
                        FLAG_OF,
                        "SHLD/SHRD: the OF flag is defined only for 1-bit shifts",
                    );
                }
            }
        }
        Mnemonic::Mul | Mnemonic::Imul => {
            undefined.add_flags(
                FLAG_SF | FLAG_ZF | FLAG_AF | FLAG_PF,
                "MUL/IMUL: the SF, ZF, AF and PF flags are undefined",
            );
        }
        Mnemonic::Div | Mnemonic::Idiv => {
            undefined.add_flags(
                ARITHMETIC_FLAGS,
                "DIV/IDIV: the CF, OF, SF, ZF, AF and PF flags are undefined",
            );
        }
        Mnemonic::Bt | Mnemonic::Bts | Mnemonic::Btr | Mnemonic::Btc => {
            undefined.add_flags(
                FLAG_OF | FLAG_SF | FLAG_AF | FLAG_PF,
                "BT/BTS/BTR/BTC: the OF, SF, AF and PF flags are undefined",
            );
        }
        Mnemonic::Bsf | Mnemonic::Bsr => {
            undefined.add_flags(
                FLAG_CF | FLAG_OF | FLAG_SF | FLAG_AF | FLAG_PF,
                "BSF/BSR: the CF, OF, SF, AF and PF flags are undefined",
            );
            if operand_value(instruction, 1, before) == Some(0) {
                // The whole register: Intel documents the destination as undefined, AMD
                // as unchanged, and whether a 32-bit form clears bits 63:32 differs.
                undefined
                    .rules
                    .push("BSF/BSR: if the source operand is 0, the destination is undefined");
                let destination = instruction.op0_register().full_register();
                undefined.gprs.push((destination.number(), u64::MAX));
            }
        }
        Mnemonic::Lzcnt | Mnemonic::Tzcnt => {
            undefined.add_flags(
                FLAG_OF | FLAG_SF | FLAG_AF | FLAG_PF,
                "LZCNT/TZCNT: the OF, SF, PF and AF flags are undefined",
            );
        }
        _ => {}
    }
    undefined
}

/// Returns the width in bits of operand 0.
fn destination_width(instruction: &Instruction) -> u32 {
    match instruction.op0_kind() {
        OpKind::Register => instruction.op0_register().size() as u32 * 8,
        _ => instruction.memory_size().size() as u32 * 8,
    }
}

/// Returns the count of a shift or rotate after the CPU masks it to 5 bits (6 bits for
/// 64-bit operands). `operand` is the count's position: CL or an immediate.
fn masked_count(instruction: &Instruction, operand: u32, width: u32, before: &UserState) -> u64 {
    let mask = if width == 64 { 0x3F } else { 0x1F };
    let count = match instruction.op_kind(operand) {
        OpKind::Register => read_register(before, instruction.op_register(operand)),
        OpKind::Immediate8 => u64::from(instruction.immediate8()),
        _ => 1,
    };
    count & mask
}

/// Reads operand `operand` (a GPR or memory in the data area) from `before`.
fn operand_value(instruction: &Instruction, operand: u32, before: &UserState) -> Option<u64> {
    match instruction.op_kind(operand) {
        OpKind::Register => Some(read_register(before, instruction.op_register(operand))),
        OpKind::Memory => {
            let (start, size) = memory_range(instruction, before)?;
            let bytes = before.data.get(start..start + size.min(8))?;
            let mut value = [0u8; 8];
            value[..bytes.len()].copy_from_slice(bytes);
            Some(u64::from_le_bytes(value) & width_mask(size as u32 * 8))
        }
        _ => None,
    }
}

/// Returns the data-area offset and size of the instruction's memory operand when it
/// executes in state `before`, or `None` without one or outside the data area.
pub fn memory_range(instruction: &Instruction, before: &UserState) -> Option<(usize, usize)> {
    let operand = (0..instruction.op_count())
        .find(|&operand| instruction.op_kind(operand) == OpKind::Memory)?;
    let address = instruction.virtual_address(operand, 0, |register, _, _| {
        if register.is_segment_register() {
            Some(0)
        } else {
            Some(read_register(before, register))
        }
    })?;
    let start = usize::try_from(address.checked_sub(DATA_ADDR)?).ok()?;
    Some((start, instruction.memory_size().size()))
}

/// Marks operand 0, a register or memory, as undefined.
fn mark_destination(
    undefined: &mut Undefined,
    instruction: &Instruction,
    before: &UserState,
    width: u32,
) {
    match instruction.op0_kind() {
        OpKind::Register => {
            let register = instruction.op0_register();
            let full = register.full_register();
            // A 32-bit destination write clears bits 63:32 as well.
            let mask = if register.size() == 4 {
                u64::MAX
            } else {
                width_mask(width)
            };
            undefined.gprs.push((full.number(), mask));
        }
        _ => {
            if let Some((start, size)) = memory_range(instruction, before) {
                undefined.data.push(start..start + size);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions};

    fn decode(bytes: &[u8]) -> Instruction {
        Decoder::new(64, bytes, DecoderOptions::NONE).decode()
    }

    #[test]
    fn shift_by_one_keeps_overflow_defined() {
        // shl eax, 1
        let undefined = undefined_effects(&decode(&[0xD1, 0xE0]), &UserState::new());
        assert_eq!(undefined.flags, FLAG_AF);
    }

    #[test]
    fn shift_by_zero_leaves_flags_defined() {
        // shl eax, cl with CL = 0x20, which masks to 0
        let mut state = UserState::new();
        state.gprs[1] = 0x20;
        let undefined = undefined_effects(&decode(&[0xD3, 0xE0]), &state);
        assert_eq!(undefined.flags, 0);
    }

    #[test]
    fn byte_shift_past_width_masks_carry() {
        // shr al, 9
        let undefined = undefined_effects(&decode(&[0xC0, 0xE8, 0x09]), &UserState::new());
        assert_eq!(undefined.flags, FLAG_AF | FLAG_OF | FLAG_CF);
    }

    #[test]
    fn bsf_zero_source_masks_destination() {
        // bsf rax, rcx with RCX = 0
        let undefined = undefined_effects(&decode(&[0x48, 0x0F, 0xBC, 0xC1]), &UserState::new());
        assert_eq!(undefined.gprs, vec![(0, u64::MAX)]);
        assert_eq!(undefined.flags & FLAG_ZF, 0);
    }

    #[test]
    fn add_leaves_nothing_undefined() {
        // add rax, rbx
        let undefined = undefined_effects(&decode(&[0x48, 0x01, 0xD8]), &UserState::new());
        assert_eq!(undefined, Undefined::default());
    }
}
