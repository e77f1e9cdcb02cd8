//! A seeded generator of random user-mode snippets and input states, one instruction
//! class at a time.
//!
//! Most classes are built from iced-x86's table of encodings: every legacy-encoded
//! `Code` of the class's mnemonics that is valid in 64-bit mode becomes a candidate, and
//! its operands are filled from the operand kinds that `OpCodeInfo` lists. That covers
//! every operand size and every encoding form (short accumulator forms, sign-extended
//! immediates, register-in-opcode). Branches, string instructions and stack sequences
//! are built by hand because their operands are implicit.
//!
//! Register values favour edge cases (0, -1, sign boundaries of every width). A memory
//! operand's base and index registers are set so that the access lands in the data area.
//! Most accesses are aligned and some are misaligned. Now and then one straddles or hits
//! an unmapped guard page, so that the #PF paths run too.

use std::collections::HashMap;
use std::fmt::Write as _;

use iced_x86::{
    Code, CpuidFeature, Decoder, DecoderOptions, EncodingKind, Formatter, Instruction,
    IntelFormatter, Mnemonic, OpCodeOperandKind, OpKind, Register,
};

use super::state::{
    UserState, CODE_ADDR, DATA_ADDR, DATA_SIZE, FIXED_RFLAGS, MXCSR_DEFAULT, RCX, RDI, RSI, RSP,
    USER_RFLAGS_MASK,
};

/// A small, fast, seedable pseudo-random generator (SplitMix64), so that a seed
/// reproduces a run on every machine without an extra crate.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// Creates a generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// Returns the next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Returns a value in `0..bound`; `bound` must be nonzero.
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }

    /// Returns true with probability `numerator / denominator`.
    pub fn chance(&mut self, numerator: u64, denominator: u64) -> bool {
        self.below(denominator) < numerator
    }

    /// Returns a random element of `items`, which must not be empty.
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// A family of user-mode instructions that the generator covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    /// ADD, OR, ADC, SBB, AND, SUB, XOR, CMP, TEST in every size and form.
    Alu,
    /// INC, DEC.
    IncDec,
    /// NEG, NOT.
    NegNot,
    /// SHL, SHR, SAR by 1, CL and immediates, counts beyond the operand width included.
    Shift,
    /// ROL, ROR, RCL, RCR.
    Rotate,
    /// SHLD, SHRD.
    DoubleShift,
    /// MUL, IMUL (one, two and three operands), DIV, IDIV, divide errors included.
    MulDiv,
    /// BT, BTS, BTR, BTC with register and immediate bit offsets.
    BitTest,
    /// BSF, BSR, zero sources included.
    BitScan,
    /// POPCNT, LZCNT, TZCNT.
    BitCount,
    /// SETcc.
    SetCc,
    /// CMOVcc.
    CmovCc,
    /// Jcc (short and near), JRCXZ, LOOP, LOOPE, LOOPNE along flag-dependent paths.
    Jcc,
    /// CMPXCHG, XADD, XCHG, with and without LOCK.
    Atomic,
    /// BSWAP of 32- and 64-bit registers.
    Bswap,
    /// MOVSX, MOVZX, MOVSXD.
    Extend,
    /// LEA with every operand size.
    Lea,
    /// MOVS, STOS, LODS, CMPS, SCAS with and without REP/REPE/REPNE, DF both ways.
    String,
    /// PUSH, POP, PUSHF, POPF sequences.
    Stack,
    /// LAHF, SAHF.
    FlagsAh,
    /// CBW, CWDE, CDQE, CWD, CDQ, CQO.
    Convert,
    /// SSE instructions on XMM registers and memory.
    Sse,
    /// SSE2 integer and floating-point instructions on XMM registers and memory.
    Sse2,
}

impl Class {
    /// Every class, in the order the harness runs them.
    pub const ALL: [Class; 23] = [
        Class::Alu,
        Class::IncDec,
        Class::NegNot,
        Class::Shift,
        Class::Rotate,
        Class::DoubleShift,
        Class::MulDiv,
        Class::BitTest,
        Class::BitScan,
        Class::BitCount,
        Class::SetCc,
        Class::CmovCc,
        Class::Jcc,
        Class::Atomic,
        Class::Bswap,
        Class::Extend,
        Class::Lea,
        Class::String,
        Class::Stack,
        Class::FlagsAh,
        Class::Convert,
        Class::Sse,
        Class::Sse2,
    ];

    /// Returns the class's name as the harness prints it.
    pub fn name(self) -> &'static str {
        match self {
            Class::Alu => "alu",
            Class::IncDec => "inc-dec",
            Class::NegNot => "neg-not",
            Class::Shift => "shift",
            Class::Rotate => "rotate",
            Class::DoubleShift => "shld-shrd",
            Class::MulDiv => "mul-div",
            Class::BitTest => "bit-test",
            Class::BitScan => "bit-scan",
            Class::BitCount => "bit-count",
            Class::SetCc => "setcc",
            Class::CmovCc => "cmovcc",
            Class::Jcc => "jcc-loop",
            Class::Atomic => "cmpxchg-xadd-xchg",
            Class::Bswap => "bswap",
            Class::Extend => "movsx-movzx",
            Class::Lea => "lea",
            Class::String => "string",
            Class::Stack => "push-pop",
            Class::FlagsAh => "lahf-sahf",
            Class::Convert => "cbw-cqo",
            Class::Sse => "sse",
            Class::Sse2 => "sse2",
        }
    }

    /// Returns the host CPU features that the class needs and this host lacks, by their
    /// `is_x86_feature_detected!` names; empty when the class can run.
    pub fn missing_host_features(self) -> Vec<&'static str> {
        let needed: &[&'static str] = match self {
            Class::BitCount => &["popcnt", "lzcnt", "bmi1"],
            Class::Sse => &["sse"],
            Class::Sse2 => &["sse2"],
            _ => &[],
        };
        needed
            .iter()
            .copied()
            .filter(|feature| !host_has_feature(feature))
            .collect()
    }

    /// Returns the mnemonics from which the class's encodings are taken, or an empty list
    /// for the hand-built classes.
    fn mnemonics(self) -> &'static [Mnemonic] {
        use Mnemonic::*;
        match self {
            Class::Alu => &[Add, Or, Adc, Sbb, And, Sub, Xor, Cmp, Test],
            Class::IncDec => &[Inc, Dec],
            Class::NegNot => &[Neg, Not],
            // SAL (/6) is left out: Intel does not document that encoding.
            Class::Shift => &[Shl, Shr, Sar],
            Class::Rotate => &[Rol, Ror, Rcl, Rcr],
            Class::DoubleShift => &[Shld, Shrd],
            Class::MulDiv => &[Mul, Imul, Div, Idiv],
            Class::BitTest => &[Bt, Bts, Btr, Btc],
            Class::BitScan => &[Bsf, Bsr],
            Class::BitCount => &[Popcnt, Lzcnt, Tzcnt],
            Class::SetCc => &[
                Seto, Setno, Setb, Setae, Sete, Setne, Setbe, Seta, Sets, Setns, Setp, Setnp, Setl,
                Setge, Setle, Setg,
            ],
            Class::CmovCc => &[
                Cmovo, Cmovno, Cmovb, Cmovae, Cmove, Cmovne, Cmovbe, Cmova, Cmovs, Cmovns, Cmovp,
                Cmovnp, Cmovl, Cmovge, Cmovle, Cmovg,
            ],
            Class::Atomic => &[Cmpxchg, Xadd, Xchg],
            Class::Bswap => &[Bswap],
            Class::Extend => &[Movsx, Movzx, Movsxd],
            Class::Lea => &[Lea],
            Class::FlagsAh => &[Lahf, Sahf],
            Class::Convert => &[Cbw, Cwde, Cdqe, Cwd, Cdq, Cqo],
            Class::Jcc | Class::String | Class::Stack | Class::Sse | Class::Sse2 => &[],
        }
    }
}

/// One generated test case: a snippet and the state it starts from.
#[derive(Debug, Clone)]
pub struct Case {
    pub class: Class,
    /// The snippet's machine code, to be placed at [`CODE_ADDR`].
    pub code: Vec<u8>,
    pub input: UserState,
}

impl Case {
    /// Decodes the snippet, one instruction per element, with addresses from
    /// [`CODE_ADDR`].
    pub fn instructions(&self) -> Vec<Instruction> {
        let mut decoder = Decoder::with_ip(64, &self.code, CODE_ADDR, DecoderOptions::NONE);
        let mut instructions = Vec::new();
        while decoder.can_decode() {
            instructions.push(decoder.decode());
        }
        instructions
    }

    /// Formats the snippet as Intel-syntax assembly, one instruction per line with its
    /// address and bytes.
    pub fn disassembly(&self) -> String {
        let mut formatter = IntelFormatter::new();
        let mut text = String::new();
        for instruction in self.instructions() {
            let start = (instruction.ip() - CODE_ADDR) as usize;
            let bytes = &self.code[start..start + instruction.len()];
            let mut assembly = String::new();
            formatter.format(&instruction, &mut assembly);
            let hex: Vec<String> = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
            let _ = writeln!(
                text,
                "{:#x}: {:<30} {}",
                instruction.ip(),
                hex.join(" "),
                assembly
            );
        }
        text
    }
}

/// Registers that hold a memory operand's base or index. RAX, RCX, RDX, RSI and RDI are
/// left out because instructions use them implicitly (MUL, shifts by CL, string
/// instructions), and RSP because the stack must stay inside the data area.
const ADDRESS_REGISTERS: [Register; 10] = [
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

const GPR8: [Register; 20] = [
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
const EDGE_VALUES: [u64; 22] = [
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
const COUNT_VALUES: [u8; 16] = [0, 1, 2, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 255];

/// Bit patterns of single-precision edge values: zeros, ones, infinities, NaNs (quiet and
/// signalling), denormals, the largest finite value and values that round differently in
/// each rounding mode.
const F32_EDGES: [u32; 18] = [
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
const F64_EDGES: [u64; 18] = [
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

/// A memory operand chosen for a draft instruction: the registers that form its address
/// and the effective address that they must produce.
#[derive(Debug, Clone, Copy)]
struct MemoryPlan {
    base: Register,
    index: Register,
    scale: u32,
    displacement: i64,
    address: u64,
    size: usize,
}

/// An instruction whose operands are chosen but whose address registers are not set yet.
struct Draft {
    instruction: Instruction,
    memory: Option<MemoryPlan>,
}

/// Builds [`Case`]s from a seed.
pub struct Generator {
    rng: Rng,
    codes: HashMap<Class, Vec<Code>>,
}

impl Generator {
    /// Creates a generator whose cases depend only on `seed`.
    pub fn new(seed: u64) -> Self {
        let mut codes = HashMap::new();
        for class in Class::ALL {
            codes.insert(class, candidate_codes(class));
        }
        Self {
            rng: Rng::new(seed),
            codes,
        }
    }

    /// Returns the iced-x86 encodings from which `class` draws its instructions; empty
    /// for hand-built classes.
    pub fn codes(&self, class: Class) -> &[Code] {
        self.codes.get(&class).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Generates one case of `class`.
    pub fn generate(&mut self, class: Class) -> Case {
        loop {
            let mut input = self.random_state();
            let code = match class {
                Class::Jcc => Some(self.branch_snippet(&mut input)),
                Class::String => Some(self.string_snippet(&mut input)),
                Class::Stack => self.stack_snippet(&mut input),
                _ => self.single_instruction(class, &mut input),
            };
            if let Some(code) = code {
                return Case { class, code, input };
            }
        }
    }

    /// Returns a random state: edge-heavy GPRs, RSP inside the data area, random flags,
    /// XMM lanes full of float edge cases, mostly default MXCSR and random data.
    fn random_state(&mut self) -> UserState {
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

    fn random_gpr_value(&mut self) -> u64 {
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

    fn random_xmm_value(&mut self) -> u128 {
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
    fn random_f32_bits(&mut self) -> u32 {
        let value =
            (self.rng.next_u64() as i64 as f64) / (1u64 << (40 + self.rng.below(20))) as f64;
        (value as f32).to_bits()
    }

    fn random_f64_bits(&mut self) -> u64 {
        let value =
            (self.rng.next_u64() as i64 as f64) / (1u64 << (20 + self.rng.below(40))) as f64;
        value.to_bits()
    }

    /// Returns the default MXCSR half of the time. Otherwise it sets a random rounding
    /// mode, FTZ, DAZ and sticky flags, and sometimes unmasks exceptions so that #XM
    /// paths run too.
    fn random_mxcsr(&mut self) -> u32 {
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

    /// Builds one instruction of a table-driven class and adjusts the state for it.
    fn single_instruction(&mut self, class: Class, state: &mut UserState) -> Option<Vec<u8>> {
        let codes = self.codes.get(&class)?;
        if codes.is_empty() {
            return None;
        }
        let code = self.rng.pick(codes);
        let mut draft = self.draft(class, code, state)?;
        self.adjust_for_class(class, &mut draft, state)?;
        self.realize_memory(&draft, state);
        encode(&draft.instruction)
    }

    /// Chooses operands for `code` from its operand kinds; returns `None` for a kind
    /// that the generator does not handle.
    fn draft(&mut self, class: Class, code: Code, state: &mut UserState) -> Option<Draft> {
        let op_code = code.op_code();
        let mut instruction = Instruction::default();
        instruction.set_code(code);
        let mut memory = None;
        for operand in 0..op_code.op_count() {
            let kind = op_code.op_kind(operand);
            match kind {
                OpCodeOperandKind::r8_reg | OpCodeOperandKind::r8_opcode => {
                    set_register(&mut instruction, operand, self.rng.pick(&GPR8));
                }
                OpCodeOperandKind::r16_reg
                | OpCodeOperandKind::r16_opcode
                | OpCodeOperandKind::r16_rm => {
                    set_register(
                        &mut instruction,
                        operand,
                        gpr_of_width(self.rng.below(16), 16),
                    );
                }
                OpCodeOperandKind::r32_reg
                | OpCodeOperandKind::r32_opcode
                | OpCodeOperandKind::r32_rm => {
                    set_register(
                        &mut instruction,
                        operand,
                        gpr_of_width(self.rng.below(16), 32),
                    );
                }
                OpCodeOperandKind::r64_reg
                | OpCodeOperandKind::r64_opcode
                | OpCodeOperandKind::r64_rm => {
                    set_register(
                        &mut instruction,
                        operand,
                        gpr_of_width(self.rng.below(16), 64),
                    );
                }
                OpCodeOperandKind::r8_or_mem
                | OpCodeOperandKind::r16_or_mem
                | OpCodeOperandKind::r32_or_mem
                | OpCodeOperandKind::r64_or_mem
                | OpCodeOperandKind::xmm_or_mem => {
                    if self.rng.chance(1, 2) {
                        let plan = self.plan_memory(class, op_code.memory_size().size());
                        set_memory(&mut instruction, operand, &plan);
                        memory = Some(plan);
                    } else {
                        let register = match kind {
                            OpCodeOperandKind::r8_or_mem => self.rng.pick(&GPR8),
                            OpCodeOperandKind::r16_or_mem => gpr_of_width(self.rng.below(16), 16),
                            OpCodeOperandKind::r32_or_mem => gpr_of_width(self.rng.below(16), 32),
                            OpCodeOperandKind::r64_or_mem => gpr_of_width(self.rng.below(16), 64),
                            _ => xmm(self.rng.below(16)),
                        };
                        set_register(&mut instruction, operand, register);
                    }
                }
                OpCodeOperandKind::mem => {
                    let plan = self.plan_memory(class, op_code.memory_size().size().max(1));
                    set_memory(&mut instruction, operand, &plan);
                    memory = Some(plan);
                }
                OpCodeOperandKind::xmm_reg | OpCodeOperandKind::xmm_rm => {
                    set_register(&mut instruction, operand, xmm(self.rng.below(16)));
                }
                OpCodeOperandKind::al => set_register(&mut instruction, operand, Register::AL),
                OpCodeOperandKind::cl => {
                    set_register(&mut instruction, operand, Register::CL);
                    if matches!(class, Class::Shift | Class::Rotate | Class::DoubleShift) {
                        let count = self.rng.pick(&COUNT_VALUES) as u64;
                        state.gprs[RCX] = (state.gprs[RCX] & !0xFF) | count;
                    }
                }
                OpCodeOperandKind::ax => set_register(&mut instruction, operand, Register::AX),
                OpCodeOperandKind::eax => set_register(&mut instruction, operand, Register::EAX),
                OpCodeOperandKind::rax => set_register(&mut instruction, operand, Register::RAX),
                OpCodeOperandKind::imm8_const_1 => {
                    instruction.set_op_kind(operand, OpKind::Immediate8);
                    instruction.set_immediate8(1);
                }
                OpCodeOperandKind::imm8 => {
                    instruction.set_op_kind(operand, OpKind::Immediate8);
                    let value = self.immediate8(class, code);
                    instruction.set_immediate8(value);
                }
                OpCodeOperandKind::imm8sex16 => {
                    instruction.set_op_kind(operand, OpKind::Immediate8to16);
                    instruction.set_immediate8to16(self.random_gpr_value() as i8 as i16);
                }
                OpCodeOperandKind::imm8sex32 => {
                    instruction.set_op_kind(operand, OpKind::Immediate8to32);
                    instruction.set_immediate8to32(self.random_gpr_value() as i8 as i32);
                }
                OpCodeOperandKind::imm8sex64 => {
                    instruction.set_op_kind(operand, OpKind::Immediate8to64);
                    instruction.set_immediate8to64(self.random_gpr_value() as i8 as i64);
                }
                OpCodeOperandKind::imm16 => {
                    instruction.set_op_kind(operand, OpKind::Immediate16);
                    instruction.set_immediate16(self.random_gpr_value() as u16);
                }
                OpCodeOperandKind::imm32 => {
                    instruction.set_op_kind(operand, OpKind::Immediate32);
                    instruction.set_immediate32(self.random_gpr_value() as u32);
                }
                OpCodeOperandKind::imm32sex64 => {
                    instruction.set_op_kind(operand, OpKind::Immediate32to64);
                    instruction.set_immediate32to64(self.random_gpr_value() as i32 as i64);
                }
                OpCodeOperandKind::imm64 => {
                    instruction.set_op_kind(operand, OpKind::Immediate64);
                    instruction.set_immediate64(self.random_gpr_value());
                }
                _ => return None,
            }
        }
        if memory.is_some() && op_code.can_use_lock_prefix() && self.rng.chance(1, 3) {
            instruction.set_has_lock_prefix(true);
        }
        Some(Draft {
            instruction,
            memory,
        })
    }

    /// Returns an 8-bit immediate suited to the instruction: a shift count for shifts
    /// and rotates, a legal predicate for the SSE compares, anything otherwise.
    fn immediate8(&mut self, class: Class, code: Code) -> u8 {
        match code.mnemonic() {
            // Legacy-encoded CMPPS/CMPPD/CMPSS/CMPSD define predicates 0-7 only.
            Mnemonic::Cmpps | Mnemonic::Cmppd | Mnemonic::Cmpss | Mnemonic::Cmpsd => {
                self.rng.below(8) as u8
            }
            _ if matches!(
                class,
                Class::Shift | Class::Rotate | Class::DoubleShift | Class::BitTest
            ) =>
            {
                if self.rng.chance(3, 4) {
                    self.rng.pick(&COUNT_VALUES)
                } else {
                    self.rng.next_u64() as u8
                }
            }
            _ => self.random_gpr_value() as u8,
        }
    }

    /// Picks address registers and an effective address for an access of `size` bytes.
    fn plan_memory(&mut self, class: Class, size: usize) -> MemoryPlan {
        let size = size.max(1);
        // BT with a register bit offset reaches up to 1 KiB on either side of the
        // operand (see `adjust_for_class`), so keep that much room.
        let margin = if class == Class::BitTest { 0x400 } else { 0x40 };
        let span = DATA_SIZE - 2 * margin - size;
        let mut offset = margin + self.rng.below(span as u64) as usize;
        let alignment = size.clamp(1, 16);
        if self.rng.chance(7, 8) {
            offset -= offset % alignment;
        }
        // Now and then straddle or touch a guard page, so that #PF is exercised.
        if class != Class::Lea && self.rng.chance(1, 40) {
            offset = if self.rng.chance(1, 2) {
                DATA_SIZE - size / 2
            } else {
                DATA_SIZE + self.rng.below(16) as usize
            };
        }
        let address = DATA_ADDR + offset as u64;

        let base = self.rng.pick(&ADDRESS_REGISTERS);
        let index = if self.rng.chance(1, 3) {
            let mut index = self.rng.pick(&ADDRESS_REGISTERS);
            while index == base {
                index = self.rng.pick(&ADDRESS_REGISTERS);
            }
            index
        } else {
            Register::None
        };
        let scale = if index == Register::None {
            1
        } else {
            self.rng.pick(&[1, 2, 4, 8])
        };
        let displacement = match self.rng.below(3) {
            0 => 0,
            1 => self.rng.below(256) as i64 - 128,
            _ => self.rng.below(0x10000) as i64 - 0x8000,
        };
        MemoryPlan {
            base,
            index,
            scale,
            displacement,
            address,
            size,
        }
    }

    /// Sets the base and index registers so that the draft's memory operand addresses
    /// the planned location.
    fn realize_memory(&mut self, draft: &Draft, state: &mut UserState) {
        if let Some(plan) = draft.memory {
            let mut index_part = 0u64;
            if plan.index != Register::None {
                let index_value = self.rng.below(64).wrapping_sub(16);
                state.gprs[plan.index.number()] = index_value;
                index_part = index_value.wrapping_mul(plan.scale as u64);
            }
            state.gprs[plan.base.number()] = plan
                .address
                .wrapping_sub(index_part)
                .wrapping_sub(plan.displacement as u64);
        }
    }

    /// Adjusts the state so that the class's interesting cases come up often: dividends
    /// that fit, CMPXCHG operands that match, zero sources for BSF/BSR, bit offsets that
    /// stay in the data area. Returns `None` to discard a draft that cannot be adjusted.
    fn adjust_for_class(
        &mut self,
        class: Class,
        draft: &mut Draft,
        state: &mut UserState,
    ) -> Option<()> {
        let instruction = draft.instruction;
        match class {
            Class::MulDiv
                if matches!(instruction.mnemonic(), Mnemonic::Div | Mnemonic::Idiv)
                    && self.rng.chance(2, 3) =>
            {
                let width = operand_width(&instruction, 0, draft.memory)?;
                let divisor = operand_value(&instruction, 0, draft.memory, state)?;
                let (high, low) = match width {
                    8 => (Register::AH, Register::AL),
                    16 => (Register::DX, Register::AX),
                    32 => (Register::EDX, Register::EAX),
                    _ => (Register::RDX, Register::RAX),
                };
                if instruction.op0_kind() == OpKind::Register
                    && instruction.op0_register().full_register() == high.full_register()
                {
                    return Some(());
                }
                let value = if instruction.mnemonic() == Mnemonic::Div {
                    if divisor == 0 {
                        return Some(());
                    }
                    self.rng.next_u64() % divisor
                } else {
                    let low_value = read_register(state, low);
                    let sign = 1u64 << (width - 1);
                    if low_value & sign != 0 {
                        u64::MAX
                    } else {
                        0
                    }
                };
                write_register(state, high, value);
            }
            Class::BitTest
                if instruction.op0_kind() == OpKind::Memory
                    && instruction.op1_kind() == OpKind::Register =>
            {
                let offset_register = instruction.op1_register();
                let plan = draft.memory?;
                let full = offset_register.full_register();
                if full == plan.base || full == plan.index {
                    return None;
                }
                let offset = self.rng.below(2048) as i64 - 1024;
                write_register(state, offset_register, offset as u64);
            }
            Class::BitScan if self.rng.chance(1, 5) => {
                write_operand(&instruction, 1, draft.memory, state, 0)?;
            }
            Class::Atomic
                if instruction.mnemonic() == Mnemonic::Cmpxchg && self.rng.chance(1, 2) =>
            {
                let width = operand_width(&instruction, 0, draft.memory)?;
                let value = operand_value(&instruction, 0, draft.memory, state)?;
                let accumulator = match width {
                    8 => Register::AL,
                    16 => Register::AX,
                    32 => Register::EAX,
                    _ => Register::RAX,
                };
                write_register(state, accumulator, value);
            }
            _ => {}
        }
        Some(())
    }

    /// Builds a flag- or RCX-dependent branch: an optional CMP, then a conditional
    /// branch over a "not taken" marker, or a short counted loop.
    fn branch_snippet(&mut self, state: &mut UserState) -> Vec<u8> {
        let mut code = Vec::new();
        // The marker register records which path ran; RCX is the loop counter.
        let marker = loop {
            let candidate = self.rng.below(16) as u8;
            if candidate as usize != RCX && candidate as usize != RSP {
                break candidate;
            }
        };

        if self.rng.chance(1, 5) {
            // A backward counted loop: mov ecx, n; L: add marker, imm8; loop L.
            let count = 1 + self.rng.below(5) as u32;
            code.push(0xB9);
            code.extend_from_slice(&count.to_le_bytes());
            code.extend_from_slice(&[0x48 | (marker >> 3), 0x83, 0xC0 | (marker & 7), 0x03]);
            code.extend_from_slice(&[0xE2, (-6i8) as u8]);
            return code;
        }

        if self.rng.chance(1, 3) {
            // cmp r64, r64: a defined way to set every flag before the branch.
            let first = self.rng.below(16) as u8;
            let second = self.rng.below(16) as u8;
            code.extend_from_slice(&[
                0x48 | ((second >> 3) << 2) | (first >> 3),
                0x39,
                0xC0 | ((second & 7) << 3) | (first & 7),
            ]);
        }

        // Not-taken path: mov marker32, imm32; jmp over the taken path. Taken path: mov
        // marker32, imm32.
        let rex = if marker >= 8 { Some(0x41u8) } else { None };
        let move_length = 5 + rex.is_some() as u8;
        let not_taken_length = move_length + 2;
        match self.rng.below(6) {
            0..=2 => {
                let condition = self.rng.below(16) as u8;
                code.extend_from_slice(&[0x70 | condition, not_taken_length]);
            }
            3 => {
                let condition = self.rng.below(16) as u8;
                code.extend_from_slice(&[0x0F, 0x80 | condition]);
                code.extend_from_slice(&(not_taken_length as u32).to_le_bytes());
            }
            4 => {
                // jrcxz, or jecxz with the address-size prefix.
                if self.rng.chance(1, 2) {
                    code.push(0x67);
                }
                code.extend_from_slice(&[0xE3, not_taken_length]);
                self.small_counter(state);
            }
            _ => {
                // loop, loope, loopne, optionally on ECX.
                if self.rng.chance(1, 3) {
                    code.push(0x67);
                }
                code.extend_from_slice(&[self.rng.pick(&[0xE0u8, 0xE1, 0xE2]), not_taken_length]);
                self.small_counter(state);
            }
        }

        code.extend(rex);
        code.push(0xB8 | (marker & 7));
        code.extend_from_slice(&0x1111_1111u32.to_le_bytes());
        code.extend_from_slice(&[0xEB, move_length]);
        code.extend(rex);
        code.push(0xB8 | (marker & 7));
        code.extend_from_slice(&0x2222_2222u32.to_le_bytes());
        code
    }

    /// Sets RCX to a count near zero (0, 1, 2) in ECX and in RCX, with random upper bits
    /// half of the time, so that JRCXZ, JECXZ and LOOP take both paths.
    fn small_counter(&mut self, state: &mut UserState) {
        let low = self.rng.below(3);
        state.gprs[RCX] = if self.rng.chance(1, 2) {
            low
        } else {
            (self.rng.next_u64() << 32) | low
        };
    }

    /// Builds one string instruction with an optional repeat prefix, operand size and
    /// address size, and places RSI, RDI and RCX so that it stays inside the data area
    /// in either direction.
    fn string_snippet(&mut self, state: &mut UserState) -> Vec<u8> {
        // (opcode for bytes, may take REPE/REPNE)
        let operations: [(u8, bool); 5] = [
            (0xA4, false),
            (0xAA, false),
            (0xAC, false),
            (0xA6, true),
            (0xAE, true),
        ];
        let (byte_opcode, compares) = self.rng.pick(&operations);
        let width = self.rng.pick(&[1u64, 2, 4, 8]);
        let mut code = Vec::new();
        let repeat = self.rng.below(3);
        match (repeat, compares) {
            (1, _) => code.push(0xF3),
            (2, true) => code.push(0xF2),
            _ => {}
        }
        let address32 = self.rng.chance(1, 4);
        if address32 {
            code.push(0x67);
        }
        match width {
            1 => code.push(byte_opcode),
            2 => code.extend_from_slice(&[0x66, byte_opcode + 1]),
            4 => code.push(byte_opcode + 1),
            _ => code.extend_from_slice(&[0x48, byte_opcode + 1]),
        }

        let count = self.rng.below(12);
        let source = DATA_ADDR + 0x1000 + self.rng.below(0x200) * width;
        let destination = if self.rng.chance(1, 2) {
            // Overlapping source and destination, a classic memmove hazard.
            source.wrapping_add(self.rng.below(32)).wrapping_sub(16)
        } else {
            DATA_ADDR + 0x2800 + self.rng.below(0x200) * width
        };
        let upper = |rng: &mut Rng| if address32 { rng.next_u64() << 32 } else { 0 };
        state.gprs[RCX] = upper(&mut self.rng) | count;
        state.gprs[RSI] = upper(&mut self.rng) | source;
        state.gprs[RDI] = upper(&mut self.rng) | destination;
        if compares && self.rng.chance(1, 2) {
            // Make a prefix of the two regions equal so that REPE runs for a while.
            let equal = (self.rng.below(count + 1) * width) as usize;
            let from = (source - DATA_ADDR) as usize;
            let to = (destination - DATA_ADDR) as usize;
            let prefix: Vec<u8> = state.data[from..from + equal].to_vec();
            state.data[to..to + equal].copy_from_slice(&prefix);
        }
        if compares && self.rng.chance(1, 3) {
            // Let SCAS find the accumulator's value somewhere in the first elements.
            let hit =
                (destination - DATA_ADDR) as usize + (self.rng.below(count + 1) * width) as usize;
            let value = state.gprs[0].to_le_bytes();
            state.data[hit..hit + width as usize].copy_from_slice(&value[..width as usize]);
        }
        code
    }

    /// Builds one to three PUSH/POP/PUSHF/POPF instructions. POPF only pops a value that
    /// sets nothing but the arithmetic flags and DF: the input's stack top, or a value
    /// that PUSHF just stored.
    fn stack_snippet(&mut self, state: &mut UserState) -> Option<Vec<u8>> {
        let mut code = Vec::new();
        let mut top_is_flags = true;
        let flags = (self.rng.next_u64() & USER_RFLAGS_MASK) | FIXED_RFLAGS;
        let top = (state.gprs[RSP] - DATA_ADDR) as usize;
        state.data[top..top + 8].copy_from_slice(&flags.to_le_bytes());

        let steps = 1 + self.rng.below(3);
        // Planned up front so that no POP overwrites its address registers.
        let plan = self.plan_memory(Class::Stack, 8);
        let mut memory = None;
        for step in 0..steps {
            // POP RSP only as the first step, where it loads the flags value stored
            // above: a later one would load pushed data, and pushes through such a wild
            // RSP could hit memory that the native child inherited from the test
            // process, where the emulator has nothing mapped.
            let register = loop {
                let candidate = self.rng.below(16) as u8;
                let full = gpr_of_width(u64::from(candidate), 64);
                let wild_stack = full == Register::RSP && step > 0;
                if full != plan.base && full != plan.index && !wild_stack {
                    break candidate;
                }
            };
            let rex_b = if register >= 8 { Some(0x41u8) } else { None };
            let mut pushed_flags = false;
            match self.rng.below(9) {
                0 => {
                    code.extend(rex_b);
                    code.push(0x50 | (register & 7));
                }
                1 => {
                    code.extend(rex_b);
                    code.push(0x58 | (register & 7));
                }
                2 => {
                    code.push(0x66);
                    code.extend(rex_b);
                    code.push(0x50 | (register & 7));
                }
                3 => {
                    code.push(0x66);
                    code.extend(rex_b);
                    code.push(0x58 | (register & 7));
                }
                4 => match self.rng.below(3) {
                    0 => code.extend_from_slice(&[0x6A, self.random_gpr_value() as u8]),
                    1 => {
                        code.push(0x68);
                        code.extend_from_slice(&(self.random_gpr_value() as u32).to_le_bytes());
                    }
                    _ => {
                        code.extend_from_slice(&[0x66, 0x68]);
                        code.extend_from_slice(&(self.random_gpr_value() as u16).to_le_bytes());
                    }
                },
                5 => {
                    if self.rng.chance(1, 2) {
                        code.push(0x66);
                    }
                    code.push(0x9C);
                    pushed_flags = true;
                }
                6 if top_is_flags => {
                    if self.rng.chance(1, 4) {
                        code.push(0x66);
                    }
                    code.push(0x9D);
                }
                7 | 8 if memory.is_none() => {
                    // push qword [mem] or pop qword [mem].
                    let mut instruction = Instruction::default();
                    let pushes = self.rng.chance(1, 2);
                    instruction.set_code(if pushes {
                        Code::Push_rm64
                    } else {
                        Code::Pop_rm64
                    });
                    set_memory(&mut instruction, 0, &plan);
                    code.extend(encode(&instruction)?);
                    memory = Some(plan);
                }
                _ => {
                    code.push(0x9C);
                    pushed_flags = true;
                }
            }
            top_is_flags = pushed_flags;
        }
        if let Some(plan) = memory {
            let draft = Draft {
                instruction: Instruction::default(),
                memory: Some(plan),
            };
            self.realize_memory(&draft, state);
        }
        Some(code)
    }
}

/// Returns whether the host CPU has `feature`, one of the names that
/// [`Class::missing_host_features`] uses.
fn host_has_feature(feature: &str) -> bool {
    match feature {
        "popcnt" => std::arch::is_x86_feature_detected!("popcnt"),
        "lzcnt" => std::arch::is_x86_feature_detected!("lzcnt"),
        "bmi1" => std::arch::is_x86_feature_detected!("bmi1"),
        "sse" => std::arch::is_x86_feature_detected!("sse"),
        "sse2" => std::arch::is_x86_feature_detected!("sse2"),
        _ => false,
    }
}

/// Lists the legacy-encoded, 64-bit-mode encodings of `class`'s mnemonics whose operand
/// kinds the generator can fill.
fn candidate_codes(class: Class) -> Vec<Code> {
    Code::values()
        .filter(|code| {
            let op_code = code.op_code();
            if !op_code.is_instruction()
                || !op_code.mode64()
                || op_code.encoding() != EncodingKind::Legacy
            {
                return false;
            }
            let wanted = match class {
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
            wanted
                && excluded_reason(*code).is_none()
                && op_code
                    .op_kinds()
                    .iter()
                    .all(|kind| operand_kind_supported(*kind))
        })
        .collect()
}

/// Returns why a single encoding is left out of every class, if it is.
fn excluded_reason(code: Code) -> Option<&'static str> {
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
fn sse_mnemonic_usable(mnemonic: Mnemonic) -> bool {
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

fn operand_kind_supported(kind: OpCodeOperandKind) -> bool {
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

/// Encodes `instruction` at [`CODE_ADDR`]; `None` when the operands cannot be encoded
/// together (for example AH with a register that needs REX).
fn encode(instruction: &Instruction) -> Option<Vec<u8>> {
    let mut encoder = iced_x86::Encoder::new(64);
    encoder.encode(instruction, CODE_ADDR).ok()?;
    Some(encoder.take_buffer())
}

fn set_register(instruction: &mut Instruction, operand: u32, register: Register) {
    instruction.set_op_kind(operand, OpKind::Register);
    instruction.set_op_register(operand, register);
}

fn set_memory(instruction: &mut Instruction, operand: u32, plan: &MemoryPlan) {
    instruction.set_op_kind(operand, OpKind::Memory);
    instruction.set_memory_base(plan.base);
    instruction.set_memory_index(plan.index);
    instruction.set_memory_index_scale(plan.scale);
    instruction.set_memory_displacement64(plan.displacement as u64);
    instruction.set_memory_displ_size(if plan.displacement == 0 { 0 } else { 1 });
}

/// Returns the GPR with encoding `number` (0-15) in `width` bits.
fn gpr_of_width(number: u64, width: u32) -> Register {
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

fn xmm(number: u64) -> Register {
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

fn operand_width(
    instruction: &Instruction,
    operand: u32,
    memory: Option<MemoryPlan>,
) -> Option<u32> {
    match instruction.op_kind(operand) {
        OpKind::Register => Some(instruction.op_register(operand).size() as u32 * 8),
        OpKind::Memory => Some(memory?.size as u32 * 8),
        _ => None,
    }
}

fn operand_value(
    instruction: &Instruction,
    operand: u32,
    memory: Option<MemoryPlan>,
    state: &UserState,
) -> Option<u64> {
    match instruction.op_kind(operand) {
        OpKind::Register => Some(read_register(state, instruction.op_register(operand))),
        OpKind::Memory => {
            let plan = memory?;
            let start = plan.address.checked_sub(DATA_ADDR)? as usize;
            let bytes = state.data.get(start..start + plan.size.min(8))?;
            let mut value = [0u8; 8];
            value[..bytes.len()].copy_from_slice(bytes);
            Some(u64::from_le_bytes(value))
        }
        _ => None,
    }
}

fn write_operand(
    instruction: &Instruction,
    operand: u32,
    memory: Option<MemoryPlan>,
    state: &mut UserState,
    value: u64,
) -> Option<()> {
    match instruction.op_kind(operand) {
        OpKind::Register => {
            write_register(state, instruction.op_register(operand), value);
            Some(())
        }
        OpKind::Memory => {
            let plan = memory?;
            let start = plan.address.checked_sub(DATA_ADDR)? as usize;
            let length = plan.size.min(8);
            let bytes = state.data.get_mut(start..start + length)?;
            bytes.copy_from_slice(&value.to_le_bytes()[..length]);
            Some(())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_table_class_has_encodings() {
        let generator = Generator::new(1);
        for class in Class::ALL {
            if matches!(class, Class::Jcc | Class::String | Class::Stack) {
                continue;
            }
            assert!(
                !generator.codes(class).is_empty(),
                "class {} has no encodings",
                class.name()
            );
        }
    }

    #[test]
    fn alu_covers_every_operand_size() {
        let generator = Generator::new(1);
        let codes = generator.codes(Class::Alu);
        for code in [
            Code::Add_rm8_r8,
            Code::Add_rm16_imm8,
            Code::Add_EAX_imm32,
            Code::Add_rm64_imm32,
            Code::Test_rm64_r64,
        ] {
            assert!(codes.contains(&code), "{code:?} missing");
        }
    }

    #[test]
    fn same_seed_same_cases() {
        let mut first = Generator::new(42);
        let mut second = Generator::new(42);
        for class in Class::ALL {
            let a = first.generate(class);
            let b = second.generate(class);
            assert_eq!(a.code, b.code);
            assert_eq!(a.input, b.input);
        }
    }

    #[test]
    fn generated_code_decodes_completely() {
        let mut generator = Generator::new(7);
        for class in Class::ALL {
            for _ in 0..50 {
                let case = generator.generate(class);
                let decoded: usize = case
                    .instructions()
                    .iter()
                    .map(|instruction| instruction.len())
                    .sum();
                assert_eq!(
                    decoded,
                    case.code.len(),
                    "class {}:\n{}",
                    class.name(),
                    case.disassembly()
                );
                assert!(
                    case.instructions()
                        .iter()
                        .all(|instruction| instruction.code() != Code::INVALID),
                    "class {}:\n{}",
                    class.name(),
                    case.disassembly()
                );
            }
        }
    }
}
