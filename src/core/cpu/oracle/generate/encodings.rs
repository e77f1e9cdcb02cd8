//! The iced-x86 encodings that each class draws from, filtered by host support.

use iced_x86::{Code, CpuidFeature, EncodingKind, Mnemonic, OpCodeOperandKind};

use super::Class;

/// Returns whether the host CPU has `feature`. Features that no generated class uses
/// count as missing.
pub fn host_supports(feature: CpuidFeature) -> bool {
    match feature {
        // The x86-64 baseline includes every 8086-486 instruction and CMOV.
        CpuidFeature::INTEL8086
        | CpuidFeature::INTEL186
        | CpuidFeature::INTEL386
        | CpuidFeature::INTEL486
        | CpuidFeature::X64
        | CpuidFeature::CMOV
        | CpuidFeature::CX8 => true,
        CpuidFeature::CMPXCHG16B => std::arch::is_x86_feature_detected!("cmpxchg16b"),
        CpuidFeature::SSE => std::arch::is_x86_feature_detected!("sse"),
        CpuidFeature::SSE2 => std::arch::is_x86_feature_detected!("sse2"),
        CpuidFeature::POPCNT => std::arch::is_x86_feature_detected!("popcnt"),
        CpuidFeature::LZCNT => std::arch::is_x86_feature_detected!("lzcnt"),
        CpuidFeature::BMI1 => std::arch::is_x86_feature_detected!("bmi1"),
        _ => false,
    }
}

/// Lists the legacy-encoded, 64-bit-mode encodings of `class`'s mnemonics whose operand
/// kinds the generator can fill.
pub(super) fn candidate_codes(class: Class) -> Vec<Code> {
    Code::values()
        .filter(|code| {
            let op_code = code.op_code();
            if !op_code.is_instruction()
                || !op_code.mode64()
                || op_code.encoding() != EncodingKind::Legacy
            {
                return false;
            }
            let in_class = match class {
                Class::Sse => {
                    code.cpuid_features() == [CpuidFeature::SSE]
                        && sse_mnemonic_usable(code.mnemonic())
                }
                Class::Sse2 => {
                    code.cpuid_features() == [CpuidFeature::SSE2]
                        && sse_mnemonic_usable(code.mnemonic())
                }
                _ => class.mnemonics().contains(&code.mnemonic()),
            };
            in_class
                && excluded_reason(*code).is_none()
                && op_code
                    .op_kinds()
                    .iter()
                    .all(|kind| operand_kind_supported(*kind))
        })
        .collect()
}

/// Returns why a single encoding is left out of every class, if it is.
pub(super) fn excluded_reason(code: Code) -> Option<&'static str> {
    match code {
        // Intel SDM BSWAP: "When the BSWAP instruction references a 16-bit register, the
        // result is undefined."
        Code::Bswap_r16 => Some("BSWAP of a 16-bit register is undefined"),
        // TEST with the /1 ModRM extension is an undocumented alias of /0 that no
        // compiler emits.
        Code::Test_rm8_imm8_F6r1
        | Code::Test_rm16_imm16_F7r1
        | Code::Test_rm32_imm32_F7r1
        | Code::Test_rm64_imm32_F7r1 => Some("undocumented TEST alias"),
        _ => None,
    }
}

/// Returns false for SSE/SSE2 mnemonics that the harness cannot compare: cache and
/// ordering hints with no architectural effect, MXCSR loads that raise #GP for most
/// random values, and MASKMOVDQU, whose implicit RDI destination the generator does not
/// place. RCPPS, RCPSS, RSQRTPS and RSQRTSS are left out because their results are
/// approximations that differ between CPU models: the SDM bounds only the relative error
/// (1.5 * 2^-12).
pub(super) fn sse_mnemonic_usable(mnemonic: Mnemonic) -> bool {
    !matches!(
        mnemonic,
        Mnemonic::Prefetchnta
            | Mnemonic::Prefetcht0
            | Mnemonic::Prefetcht1
            | Mnemonic::Prefetcht2
            | Mnemonic::Sfence
            | Mnemonic::Lfence
            | Mnemonic::Mfence
            | Mnemonic::Clflush
            | Mnemonic::Ldmxcsr
            | Mnemonic::Maskmovdqu
            | Mnemonic::Maskmovq
            | Mnemonic::Rcpps
            | Mnemonic::Rcpss
            | Mnemonic::Rsqrtps
            | Mnemonic::Rsqrtss
    )
}

pub(super) fn operand_kind_supported(kind: OpCodeOperandKind) -> bool {
    use OpCodeOperandKind::*;
    matches!(
        kind,
        r8_reg
            | r8_opcode
            | r16_reg
            | r16_opcode
            | r16_rm
            | r32_reg
            | r32_opcode
            | r32_rm
            | r64_reg
            | r64_opcode
            | r64_rm
            | r8_or_mem
            | r16_or_mem
            | r32_or_mem
            | r64_or_mem
            | xmm_or_mem
            | mem
            | xmm_reg
            | xmm_rm
            | al
            | cl
            | ax
            | eax
            | rax
            | imm8_const_1
            | imm8
            | imm8sex16
            | imm8sex32
            | imm8sex64
            | imm16
            | imm32
            | imm32sex64
            | imm64
    )
}
