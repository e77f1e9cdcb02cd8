//! Hand-built snippets: flag chains, branches and loops, string instructions, stack
//! sequences. Their operands are implicit or span several instructions, so iced-x86's
//! operand kinds cannot describe them.

use iced_x86::{Code, Instruction, Register};

use super::{encode, set_memory, Class, Draft, Generator, Rng};
use crate::core::cpu::oracle::registers::gpr_of_width;
use crate::core::cpu::oracle::state::{
    UserState, DATA_ADDR, FIXED_RFLAGS, RBP, RCX, RDI, RSI, RSP, USER_RFLAGS_MASK,
};

impl Generator {
    /// Builds two to five register-only instructions that produce and consume flags,
    /// so that flags pass from one instruction to the next inside the emulator (which
    /// evaluates them lazily) rather than only at the end of the snippet.
    pub(super) fn flag_chain_snippet(&mut self, state: &mut UserState) -> Option<Vec<u8>> {
        let codes = self.codes.get(&Class::FlagChain)?.clone();
        let mut code = Vec::new();
        for _ in 0..2 + self.rng.below(4) {
            let chosen = self.rng.pick(&codes);
            let draft = self.draft(Class::FlagChain, chosen, state)?;
            code.extend(encode(&draft.instruction)?);
        }
        Some(code)
    }

    /// Builds a flag- or RCX-dependent branch: an optional CMP, then a conditional
    /// branch over a "not taken" marker, or a short counted loop.
    pub(super) fn branch_snippet(&mut self, state: &mut UserState) -> Vec<u8> {
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
    pub(super) fn small_counter(&mut self, state: &mut UserState) {
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
    pub(super) fn string_snippet(&mut self, state: &mut UserState) -> Vec<u8> {
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

    /// Builds one to three PUSH/POP/PUSHF/POPF/ENTER/LEAVE instructions. POPF only pops a value that
    /// sets nothing but the arithmetic flags and DF: the input's stack top, or a value
    /// that PUSHF of at least the same size just stored. Anything else could set AC or
    /// TF, which would trap in the native run.
    pub(super) fn stack_snippet(&mut self, state: &mut UserState) -> Option<Vec<u8>> {
        let mut code = Vec::new();
        // Bytes of RFLAGS image on top of the stack: 8 for the prepared input.
        let mut flags_on_top = 8;
        let flags = (self.rng.next_u64() & USER_RFLAGS_MASK) | FIXED_RFLAGS;
        let top = (state.gprs[RSP] - DATA_ADDR) as usize;
        state.data[top..top + 8].copy_from_slice(&flags.to_le_bytes());

        let steps = 1 + self.rng.below(3);
        // Planned up front so that no POP overwrites its address registers.
        let plan = self.plan_memory(Class::Stack, 8);
        let mut memory = None;

        // ENTER with a nesting level and LEAVE dereference RBP, so RBP starts as a frame
        // pointer above RSP unless the memory operand uses it. RBP stays valid until a
        // POP or LEAVE loads it from the stack.
        let frame_register_free = plan.base != Register::RBP && plan.index != Register::RBP;
        let mut frame_valid = frame_register_free;
        if frame_register_free {
            state.gprs[RBP] = state.gprs[RSP] + 8 * self.rng.below(32);
        }

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
            let mut pushed_flags = 0;
            let pops_frame_register = register == RBP as u8;
            match self.rng.below(11) {
                0 => {
                    code.extend(rex_b);
                    code.push(0x50 | (register & 7));
                }
                1 => {
                    code.extend(rex_b);
                    code.push(0x58 | (register & 7));
                    frame_valid &= !pops_frame_register;
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
                    frame_valid &= !pops_frame_register;
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
                    pushed_flags = 8;
                    if self.rng.chance(1, 2) {
                        code.push(0x66);
                        pushed_flags = 2;
                    }
                    code.push(0x9C);
                }
                6 if flags_on_top >= 2 => {
                    if flags_on_top == 2 || self.rng.chance(1, 4) {
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
                9 if frame_valid => {
                    // leave: RSP = RBP, then RBP = a qword of data.
                    code.push(0xC9);
                    frame_valid = false;
                }
                10 if frame_valid || frame_register_free => {
                    // enter size, level: nesting levels above 0 copy frame pointers
                    // from [RBP - 8], [RBP - 16], ..., so they need a valid RBP.
                    let size = self.rng.below(64) as u16;
                    let level = if frame_valid {
                        self.rng.below(4) as u8
                    } else {
                        0
                    };
                    code.push(0xC8);
                    code.extend_from_slice(&size.to_le_bytes());
                    code.push(level);
                    frame_valid = true;
                }
                _ => {
                    code.push(0x9C);
                    pushed_flags = 8;
                }
            }
            flags_on_top = pushed_flags;
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
