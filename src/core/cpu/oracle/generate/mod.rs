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
//! an unmapped guard page, or uses a non-canonical address, so that the #PF and #GP paths
//! run too.

mod encodings;
mod snippets;
mod values;

use std::collections::HashMap;
use std::fmt::Write as _;

use iced_x86::{
    Code, Decoder, DecoderOptions, Formatter, Instruction, IntelFormatter, Mnemonic,
    OpCodeOperandKind, OpKind, Register,
};

use encodings::candidate_codes;
pub use encodings::host_supports;
use values::{ADDRESS_REGISTERS, COUNT_VALUES, GPR8};

use super::registers::{gpr_of_width, read_register, write_register, xmm};
use super::state::{UserState, CODE_ADDR, DATA_ADDR, DATA_SIZE, RCX};

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
    /// Register-only sequences of flag producers (ALU, INC/DEC, NEG/NOT) and consumers
    /// (ADC, SBB, SETcc, CMOVcc).
    FlagChain,
    /// Jcc (short and near), JRCXZ, LOOP, LOOPE, LOOPNE along flag-dependent paths.
    Jcc,
    /// CMPXCHG, CMPXCHG8B, CMPXCHG16B, XADD, XCHG, with and without LOCK.
    Atomic,
    /// BSWAP of 32- and 64-bit registers.
    Bswap,
    /// MOVSX, MOVZX, MOVSXD.
    Extend,
    /// LEA with every operand size.
    Lea,
    /// MOVS, STOS, LODS, CMPS, SCAS with and without REP/REPE/REPNE, DF both ways.
    String,
    /// PUSH, POP, PUSHF, POPF, ENTER, LEAVE sequences.
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
    pub const ALL: [Class; 24] = [
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
        Class::FlagChain,
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
            Class::FlagChain => "flag-chain",
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

    /// Returns whether the class is built by hand rather than from iced-x86's tables.
    pub fn is_hand_built(self) -> bool {
        matches!(self, Class::Jcc | Class::String | Class::Stack)
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
            // Every producer here defines all flags that a consumer reads: AND, OR, XOR
            // and TEST leave only AF undefined, which no consumer reads. Shifts, BT and
            // MUL, whose CF or OF may be undefined, stay out.
            Class::FlagChain => &[
                Add, Or, Adc, Sbb, And, Sub, Xor, Cmp, Test, Inc, Dec, Neg, Not, Seto, Setno, Setb,
                Setae, Sete, Setne, Setbe, Seta, Sets, Setns, Setp, Setnp, Setl, Setge, Setle,
                Setg, Cmovo, Cmovno, Cmovb, Cmovae, Cmove, Cmovne, Cmovbe, Cmova, Cmovs, Cmovns,
                Cmovp, Cmovnp, Cmovl, Cmovge, Cmovle, Cmovg,
            ],
            Class::Atomic => &[Cmpxchg, Cmpxchg8b, Cmpxchg16b, Xadd, Xchg],
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
    /// Encodings per class left out because the host CPU lacks a feature they need.
    host_dropped: HashMap<Class, usize>,
}

impl Generator {
    /// Creates a generator whose cases depend only on `seed` and on the features of the
    /// host CPU: encodings that need a feature the host lacks are left out.
    pub fn new(seed: u64) -> Self {
        let mut codes = HashMap::new();
        let mut host_dropped = HashMap::new();
        for class in Class::ALL {
            let candidates = candidate_codes(class);
            let count = candidates.len();
            let supported: Vec<Code> = candidates
                .into_iter()
                .filter(|code| {
                    code.cpuid_features()
                        .iter()
                        .all(|feature| host_supports(*feature))
                })
                .collect();
            host_dropped.insert(class, count - supported.len());
            codes.insert(class, supported);
        }
        Self {
            rng: Rng::new(seed),
            codes,
            host_dropped,
        }
    }

    /// Returns how many encodings of `class` were left out because the host CPU lacks a
    /// feature that they need.
    pub fn host_dropped(&self, class: Class) -> usize {
        self.host_dropped.get(&class).copied().unwrap_or(0)
    }

    /// Keeps only the encodings for which `keep` returns true, for example those whose
    /// CPUID features the emulator advertises, and returns how many were dropped per
    /// class.
    pub fn retain_codes(&mut self, keep: impl Fn(Code) -> bool) -> HashMap<Class, usize> {
        let mut dropped = HashMap::new();
        for (class, codes) in &mut self.codes {
            let before = codes.len();
            codes.retain(|code| keep(*code));
            dropped.insert(*class, before - codes.len());
        }
        dropped
    }

    /// Returns whether the generator can build cases of `class`: hand-built classes
    /// always, table-driven ones while any of their encodings remain.
    pub fn can_generate(&self, class: Class) -> bool {
        class.is_hand_built() || !self.codes(class).is_empty()
    }

    /// Returns the iced-x86 encodings from which `class` draws its instructions; empty
    /// for hand-built classes.
    pub fn codes(&self, class: Class) -> &[Code] {
        self.codes.get(&class).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Generates one case of `class`.
    ///
    /// # Panics
    ///
    /// Panics if [`Generator::can_generate`] returns false for `class`.
    pub fn generate(&mut self, class: Class) -> Case {
        assert!(
            self.can_generate(class),
            "class {} has no encodings left",
            class.name()
        );
        loop {
            let mut input = self.random_state();
            let code = match class {
                Class::Jcc => Some(self.branch_snippet(&mut input)),
                Class::String => Some(self.string_snippet(&mut input)),
                Class::Stack => self.stack_snippet(&mut input),
                Class::FlagChain => self.flag_chain_snippet(&mut input),
                _ => self.single_instruction(class, &mut input),
            };
            if let Some(code) = code {
                return Case { class, code, input };
            }
        }
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
                    if class != Class::FlagChain && self.rng.chance(1, 2) {
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
                OpCodeOperandKind::mem if class != Class::FlagChain => {
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
        let mut address = DATA_ADDR + offset as u64;
        // Rarely flip bit 63, which makes the address non-canonical, so that #GP(0) is
        // exercised too.
        if class != Class::Lea && self.rng.chance(1, 80) {
            address |= 1 << 63;
        }

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
            Class::Atomic
                if matches!(
                    instruction.mnemonic(),
                    Mnemonic::Cmpxchg8b | Mnemonic::Cmpxchg16b
                ) && self.rng.chance(1, 2) =>
            {
                // Let EDX:EAX (RDX:RAX) match the memory operand, so that the exchange
                // happens, unless the operand lies outside the data area.
                let plan = draft.memory?;
                let start = plan.address.checked_sub(DATA_ADDR)? as usize;
                let half = plan.size / 2;
                if let Some(bytes) = state.data.get(start..start + plan.size) {
                    let mut low = [0u8; 8];
                    let mut high = [0u8; 8];
                    low[..half].copy_from_slice(&bytes[..half]);
                    high[..half].copy_from_slice(&bytes[half..]);
                    let (low_register, high_register) = if half == 8 {
                        (Register::RAX, Register::RDX)
                    } else {
                        (Register::EAX, Register::EDX)
                    };
                    write_register(state, low_register, u64::from_le_bytes(low));
                    write_register(state, high_register, u64::from_le_bytes(high));
                }
            }
            _ => {}
        }
        Some(())
    }
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

    /// Returns the mnemonics that `count` cases of `class` contain, with how often.
    fn mnemonic_counts(class: Class, count: usize) -> HashMap<Mnemonic, usize> {
        let mut generator = Generator::new(3);
        let mut counts = HashMap::new();
        for _ in 0..count {
            for instruction in generator.generate(class).instructions() {
                *counts.entry(instruction.mnemonic()).or_default() += 1;
            }
        }
        counts
    }

    #[test]
    fn stack_class_reaches_enter_and_leave() {
        let counts = mnemonic_counts(Class::Stack, 500);
        for mnemonic in [
            Mnemonic::Enter,
            Mnemonic::Leave,
            Mnemonic::Popfq,
            Mnemonic::Pushfq,
            Mnemonic::Push,
            Mnemonic::Pop,
        ] {
            assert!(
                counts.contains_key(&mnemonic),
                "{mnemonic:?} never generated: {counts:?}"
            );
        }
    }

    #[test]
    fn jcc_class_reaches_loops_and_jrcxz() {
        let counts = mnemonic_counts(Class::Jcc, 500);
        for mnemonic in [
            Mnemonic::Loop,
            Mnemonic::Loope,
            Mnemonic::Loopne,
            Mnemonic::Jrcxz,
            Mnemonic::Jecxz,
            Mnemonic::Cmp,
        ] {
            assert!(
                counts.contains_key(&mnemonic),
                "{mnemonic:?} never generated: {counts:?}"
            );
        }
    }

    #[test]
    fn string_class_reaches_every_operation() {
        let counts = mnemonic_counts(Class::String, 500);
        for mnemonic in [
            Mnemonic::Movsq,
            Mnemonic::Stosb,
            Mnemonic::Lodsw,
            Mnemonic::Cmpsd,
            Mnemonic::Scasb,
        ] {
            assert!(
                counts.contains_key(&mnemonic),
                "{mnemonic:?} never generated: {counts:?}"
            );
        }
    }
}
