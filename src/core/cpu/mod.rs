//! The x86-64 emulator's CPU core: architectural state, decoding with iced-x86, a
//! decoded-instruction cache, the MMU with a software TLB, exception and interrupt
//! delivery, and the interpreter.
//!
//! The CPU reaches the machine only through [`CpuBus`]. A backend calls [`Cpu::run`]
//! with an instruction budget and gets back why it stopped:
//!
//! ```text
//! Cpu::run ── step_block ─┬─ interrupt pending and IF=1 ─> deliver through IDT
//!                         ├─ RIP: TLB/walk ─> BlockCache (phys, code size) ─> iced-x86
//!                         └─ each instruction of the block: handler (ops/*)
//!                              ├─ Ok: RIP = next_rip; next unless it branched or
//!                              │      wrote to the block's code page
//!                              ├─ Exception: RIP kept, deliver (#DF, triple)
//!                              └─ HLT / triple fault ─> CpuEvent
//!          ── step (TF set, interrupt shadow, code crossing a page or in MMIO):
//!             the same for one instruction, through DecodeCache
//! ```
//!
//! A block is a straight run of instructions within one page. It ends at the first branch
//! or at an instruction that changes what decoding, translation or interrupt delivery
//! depend on (see `ops::ends_block`). So the interpreter fetches, translates and checks
//! for interrupts once per block rather than once per instruction.

mod access;
pub mod bus;
pub mod cpuid;
pub mod decode_cache;
pub mod exceptions;
pub mod flags;
pub mod mmu;
pub mod msr;
mod ops;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub mod oracle;
pub mod segments;
pub mod state;

#[cfg(test)]
mod tests;

use iced_x86::{Decoder, DecoderError, DecoderOptions, Instruction, OpKind};

pub use bus::CpuBus;
pub use decode_cache::CodeWatch;
use decode_cache::{Block, BLOCK_MAX_INSTRUCTIONS};
pub use exceptions::Exception;
pub use state::{Cpu, CpuConfig, Mode};

use access::Privilege;
use exceptions::Source;
use mmu::Access;

/// Why [`Cpu::run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuEvent {
    /// The instruction budget ran out; call `run` again to continue.
    BudgetExhausted,
    /// The CPU executed HLT (RIP is past it) or is still halted: it resumes when
    /// `CpuBus::interrupt_pending` is true and EFLAGS.IF is set.
    Halted,
    /// The guest triple-faulted: the machine must reset.
    Shutdown,
}

/// Failures that stop emulation because the guest needs something this CPU lacks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpuError {
    #[error("guest at rip {rip:#x} uses {feature}, which the emulator does not implement")]
    Unsupported { feature: &'static str, rip: u64 },
}

/// Abnormal end of an instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Exit {
    /// The instruction faulted: deliver the exception with RIP at the instruction.
    Exception(Exception),
    /// HLT: stop with RIP past the instruction.
    Halt,
    /// Triple fault.
    Shutdown,
    /// Emulation cannot continue. Boxed so that `Result<(), Exit>`, which every
    /// instruction returns, stays two words wide.
    Error(Box<CpuError>),
}

impl Exit {
    pub(crate) fn unsupported(error: CpuError) -> Self {
        Exit::Error(Box::new(error))
    }
}

impl From<Exception> for Exit {
    fn from(exception: Exception) -> Self {
        Exit::Exception(exception)
    }
}

/// Rebases the branch target and IP-relative address of `instruction`, decoded at IP
/// `start`, to offsets from the instruction's own start, as a decode at IP 0 gives them.
/// The handlers add RIP to these offsets, so one decode serves every linear alias.
fn rebase(instruction: &mut Instruction, start: u64) {
    if start == 0 {
        return;
    }
    if matches!(
        instruction.op0_kind(),
        OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
    ) {
        instruction.set_near_branch64(instruction.near_branch64().wrapping_sub(start));
    }
    if instruction.is_ip_rel_memory_operand() {
        instruction
            .set_memory_displacement64(instruction.memory_displacement64().wrapping_sub(start));
    }
}

impl Cpu {
    /// Runs at most `max_instructions` instructions, taking interrupts from `bus` at
    /// instruction boundaries.
    ///
    /// Guest exceptions are delivered to the guest. `Err` is returned only for features
    /// that the emulator lacks, with RIP left at the instruction that needs them.
    pub fn run(
        &mut self,
        bus: &mut dyn CpuBus,
        max_instructions: u64,
    ) -> Result<CpuEvent, CpuError> {
        self.ram.open();
        let result = self.run_slice(bus, max_instructions);
        // `bus` may present other memory at the next call, so forget its host addresses.
        self.ram.close();
        result
    }

    fn run_slice(
        &mut self,
        bus: &mut dyn CpuBus,
        max_instructions: u64,
    ) -> Result<CpuEvent, CpuError> {
        let mut budget = max_instructions;
        loop {
            if self.halted {
                if self.flags & flags::IF != 0 && bus.interrupt_pending() {
                    self.halted = false;
                } else {
                    return Ok(CpuEvent::Halted);
                }
            }
            if budget == 0 {
                return Ok(CpuEvent::BudgetExhausted);
            }
            // Single-stepping and the instruction after STI or MOV SS, after which a
            // pending interrupt is due, run one instruction at a time.
            let result = if self.flags & flags::TF != 0 || self.interrupt_shadow {
                budget -= 1;
                self.step(bus)
            } else {
                self.step_block(bus, &mut budget)
            };
            match result {
                Ok(()) => {}
                Err(Exit::Halt) => {
                    self.halted = true;
                    return Ok(CpuEvent::Halted);
                }
                Err(Exit::Shutdown) => return Ok(CpuEvent::Shutdown),
                Err(Exit::Error(error)) => return Err(*error),
                Err(Exit::Exception(exception)) => {
                    unreachable!("step delivers exceptions, got {exception:?}")
                }
            }
        }
    }

    /// Takes a pending interrupt, or executes one instruction and delivers its exception.
    fn step(&mut self, bus: &mut dyn CpuBus) -> Result<(), Exit> {
        if !self.interrupt_shadow && self.flags & flags::IF != 0 && bus.interrupt_pending() {
            if let Some(vector) = bus.acknowledge_interrupt() {
                return self.interrupt(bus, vector, Source::External, self.rip);
            }
        }
        self.interrupt_shadow = false;
        let single_step = self.flags & flags::TF != 0;
        let start = self.rip;
        let result = match self.fetch(bus) {
            Ok(slot) => {
                let (instruction, handler) = self.decode_cache.instruction(slot);
                self.next_rip = start.wrapping_add(instruction.len() as u64);
                handler(self, bus, &instruction)
            }
            Err(exit) => Err(exit),
        };
        match result {
            Ok(()) => {
                self.rip = self.next_rip;
                self.instructions += 1;
                if single_step {
                    self.dr[6] |= 1 << 14;
                    return self.interrupt(bus, exceptions::DB, Source::Trap, self.rip);
                }
                Ok(())
            }
            Err(exit) => self.finish(bus, start, exit),
        }
    }

    /// Takes a pending interrupt, or executes the block of instructions at RIP, at most
    /// `budget` of them, and counts them off `budget`.
    ///
    /// Interrupts are checked only before the block: the block ends at every instruction
    /// that could unmask one, so none waits longer than [`BLOCK_MAX_INSTRUCTIONS`]. The
    /// block stops early when an instruction branches, faults or writes to the block's
    /// own code page, and the caller runs the instruction after STI or MOV SS alone.
    fn step_block(&mut self, bus: &mut dyn CpuBus, budget: &mut u64) -> Result<(), Exit> {
        if self.flags & flags::IF != 0 && bus.interrupt_pending() {
            if let Some(vector) = bus.acknowledge_interrupt() {
                *budget -= 1;
                return self.interrupt(bus, vector, Source::External, self.rip);
            }
        }
        let bits = self.code_bits();
        let start = self.rip;
        let linear = match self.code_linear(start, bits) {
            Ok(linear) => linear,
            Err(exception) => return self.raise(bus, exception),
        };
        let phys = match self.translate(bus, linear, Access::Execute, Privilege::Current) {
            Ok(phys) => phys,
            Err(exception) => return self.raise(bus, exception),
        };
        let block = match self.blocks.take(&self.code_watch, phys, bits) {
            Some(block) => block,
            None => match self.decode_block(bus, linear, phys, bits) {
                Some(block) => block,
                None => {
                    // The first instruction crosses the page, lies in MMIO or does not
                    // decode: the single-instruction path deals with each case.
                    *budget -= 1;
                    return self.step(bus);
                }
            },
        };

        // Only the last instruction of a block can branch (see `ops::ends_block`), so
        // the loop need not compare RIP with the fall-through address.
        let count = block
            .entries
            .len()
            .min(usize::try_from(*budget).unwrap_or(usize::MAX));
        let mut executed = 0;
        let mut result = Ok(());
        for entry in &block.entries[..count] {
            let start = self.rip;
            self.next_rip = start.wrapping_add(u64::from(entry.len));
            let outcome = match entry.fast {
                Some(fast) => fast(self, bus, &entry.operands),
                None => (entry.handler)(self, bus, &entry.instruction),
            };
            match outcome {
                Ok(()) => {
                    self.rip = self.next_rip;
                    executed += 1;
                    if entry.writes_memory && self.code_watch.stamp(block.page) != block.stamp {
                        break;
                    }
                }
                Err(exit) => {
                    *budget -= 1;
                    result = self.finish(bus, start, exit);
                    break;
                }
            }
        }
        self.instructions += executed;
        *budget -= executed;
        self.blocks.put(block);
        result
    }

    /// Ends an instruction that returned `exit`: delivers its exception with RIP at the
    /// instruction (`start`), or passes HLT, triple faults and errors on.
    fn finish(&mut self, bus: &mut dyn CpuBus, start: u64, exit: Exit) -> Result<(), Exit> {
        match exit {
            Exit::Exception(exception) => {
                self.rip = start;
                self.raise(bus, exception)
            }
            Exit::Halt => {
                self.rip = self.next_rip;
                self.instructions += 1;
                Err(Exit::Halt)
            }
            other => {
                self.rip = start;
                Err(other)
            }
        }
    }

    /// Returns the linear address of the instruction at `rip`, or #GP for a
    /// non-canonical RIP in 64-bit mode.
    #[inline]
    fn code_linear(&self, rip: u64, bits: u32) -> Result<u64, Exception> {
        if bits == 64 {
            if !msr::is_canonical(rip) {
                return Err(Exception::gp(0));
            }
            Ok(rip)
        } else {
            Ok(self.seg[state::CS].base.wrapping_add(rip) & 0xffff_ffff)
        }
    }

    /// Decodes the block that starts at `linear` (physical `phys`): instructions up to
    /// the first that ends a block, the end of the page or [`BLOCK_MAX_INSTRUCTIONS`].
    ///
    /// Returns `None` when the first instruction cannot start a block: it crosses the
    /// page, lies outside RAM or is invalid.
    #[cold]
    #[inline(never)]
    fn decode_block(
        &mut self,
        bus: &mut dyn CpuBus,
        linear: u64,
        phys: u64,
        bits: u32,
    ) -> Option<Box<Block>> {
        let stamp = self.code_watch.mark_code(phys >> 12)?;
        let mut bytes = [0u8; 512];
        let available = (0x1000 - (linear & 0xfff) as usize).min(bytes.len());
        self.phys_read(bus, phys, &mut bytes[..available]);

        let mut block = Block::new(phys, bits, stamp);
        let mut instruction = Instruction::default();
        let mut decoder = Decoder::with_ip(bits, &bytes[..available], 0, DecoderOptions::NONE);
        while block.entries.len() < BLOCK_MAX_INSTRUCTIONS && decoder.can_decode() {
            let offset = decoder.position() as u64;
            decoder.decode_out(&mut instruction);
            if instruction.is_invalid() {
                // Invalid, or cut off by the end of the bytes read: a block of its own
                // (through `step`) deals with it.
                break;
            }
            rebase(&mut instruction, offset);
            block.push(&instruction);
            if ops::ends_block(&instruction) {
                break;
            }
        }
        if block.entries.is_empty() {
            None
        } else {
            block.entries.shrink_to_fit();
            Some(Box::new(block))
        }
    }

    /// Returns the decode-cache slot of the instruction at RIP, decoding it on a miss.
    fn fetch(&mut self, bus: &mut dyn CpuBus) -> Result<usize, Exit> {
        let bits = self.code_bits();
        let linear = self.code_linear(self.rip, bits)?;
        let phys = self.translate(bus, linear, Access::Execute, Privilege::Current)?;
        if let Some(slot) = self.decode_cache.get(&self.code_watch, phys, bits) {
            return Ok(slot);
        }

        self.decode(bus, linear, phys, bits)
    }

    /// Decodes the instruction at `linear` (physical `phys`) into the decode cache and
    /// returns its slot.
    #[cold]
    #[inline(never)]
    fn decode(
        &mut self,
        bus: &mut dyn CpuBus,
        linear: u64,
        phys: u64,
        bits: u32,
    ) -> Result<usize, Exit> {
        let stamp = self.decode_cache.begin_decode(&self.code_watch, phys);
        let mut bytes = [0u8; 15];
        let in_page = (0x1000 - (linear & 0xfff) as usize).min(15);
        self.phys_read(bus, phys, &mut bytes[..in_page]);
        let mut instruction = Instruction::default();
        // Decoding at IP 0 makes branch targets and RIP-relative addresses offsets from
        // the instruction's start, so one cached decode serves every linear alias.
        let mut decoder = Decoder::with_ip(bits, &bytes[..in_page], 0, DecoderOptions::NONE);
        decoder.decode_out(&mut instruction);
        let mut cacheable = stamp.is_some();
        if decoder.last_error() == DecoderError::NoMoreBytes && in_page < 15 {
            let next = linear.wrapping_add(in_page as u64);
            let next = if bits == 64 { next } else { next & 0xffff_ffff };
            let next_phys = self.translate(bus, next, Access::Execute, Privilege::Current)?;
            self.phys_read(bus, next_phys, &mut bytes[in_page..]);
            let mut decoder = Decoder::with_ip(bits, &bytes, 0, DecoderOptions::NONE);
            decoder.decode_out(&mut instruction);
            cacheable = false;
        }
        if instruction.is_invalid() {
            return Err(Exception::ud().into());
        }
        match (cacheable, stamp) {
            (true, Some(stamp)) => Ok(self.decode_cache.insert(phys, bits, stamp, &instruction)),
            _ => Ok(self.decode_cache.scratch(&instruction)),
        }
    }
}
