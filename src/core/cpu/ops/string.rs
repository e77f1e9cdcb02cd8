//! String instructions (MOVS, STOS, LODS, CMPS, SCAS, INS, OUTS) with REP, REPE and
//! REPNE prefixes in every address size.

use iced_x86::{Instruction, Mnemonic, OpKind};

use super::{segment_index, Exec};
use crate::core::cpu::access::Privilege;
use crate::core::cpu::bus::CpuBus;
use crate::core::cpu::flags::{size_mask, FlagOp, DF, ZF};
use crate::core::cpu::mmu::Access;
use crate::core::cpu::state::{Cpu, ES};
use crate::core::cpu::Exit;
use vm_memory::{GuestAddress, GuestMemoryBackend};

/// Bytes that one step of REP MOVS or REP STOS copies or fills on host memory before the
/// instruction restarts, so that interrupts wait no longer than for `REP_CHUNK`
/// single iterations.
const BULK_BYTES: u64 = 64 * 1024;

/// Iterations of a REP instruction executed per step. The instruction then restarts
/// from its registers, so interrupts are taken between chunks, as on hardware.
const REP_CHUNK: u64 = 4096;

/// Returns the address size in bytes of a string instruction from its operand kinds.
fn address_size(insn: &Instruction) -> u8 {
    for n in 0..insn.op_count() {
        match insn.op_kind(n) {
            OpKind::MemorySegSI | OpKind::MemoryESDI | OpKind::MemorySegDI => return 2,
            OpKind::MemorySegESI | OpKind::MemoryESEDI | OpKind::MemorySegEDI => return 4,
            OpKind::MemorySegRSI | OpKind::MemoryESRDI | OpKind::MemorySegRDI => return 8,
            _ => {}
        }
    }
    8
}

/// How far [`Cpu::rep_bulk`] got.
enum Bulk {
    /// The count reached zero.
    Done,
    /// The step's byte limit was reached: restart the instruction.
    Again,
    /// The next element needs the element-wise loop: it crosses a page, lies outside
    /// RAM, or the copy overlaps forward.
    Elementwise,
}

impl Cpu {
    /// Runs REP MOVS (`copies`) or REP STOS with 64-bit addresses and DF clear on host
    /// memory, one page-bounded run at a time, with the same effect as the element loop.
    /// Both pages are translated before a run is written, and RSI, RDI and RCX advance
    /// after each run, so a fault restarts the instruction where it stopped.
    fn rep_bulk(
        &mut self,
        bus: &mut dyn CpuBus,
        copies: bool,
        size: u8,
        source_seg: usize,
    ) -> Result<Bulk, Exit> {
        let size = u64::from(size);
        let mut budget = BULK_BYTES;
        while self.gpr[1] != 0 {
            let destination = self.linear(ES, self.gpr[7])?;
            let mut room = 0x1000 - (destination & 0xfff);
            let source = if copies {
                let source = self.linear(source_seg, self.gpr[6])?;
                room = room.min(0x1000 - (source & 0xfff));
                Some(source)
            } else {
                None
            };
            let elements = (room / size).min(self.gpr[1]).min(budget / size);
            if elements == 0 {
                return Ok(if budget < size {
                    Bulk::Again
                } else {
                    Bulk::Elementwise
                });
            }
            let len = elements * size;

            // The element loop reads the source before it writes the destination.
            let source = match source {
                Some(linear) => {
                    Some(self.translate(bus, linear, Access::Read, Privilege::Current)?)
                }
                None => None,
            };
            let destination =
                self.translate(bus, destination, Access::Write, Privilege::Current)?;
            if let Some(source) = source {
                if destination > source && destination < source + len {
                    // Element by element, a forward overlap repeats the first elements;
                    // a block copy would not.
                    return Ok(Bulk::Elementwise);
                }
            }
            let memory = bus.memory();
            let Ok(target) = memory.get_slice(GuestAddress(destination), len as usize) else {
                return Ok(Bulk::Elementwise);
            };
            match source {
                Some(source) => {
                    let Ok(from) = memory.get_slice(GuestAddress(source), len as usize) else {
                        return Ok(Bulk::Elementwise);
                    };
                    from.copy_to_volatile_slice(target);
                }
                None => {
                    let value = self.gpr[0].to_le_bytes();
                    let mut pattern = [0u8; 4096];
                    let pattern = &mut pattern[..len as usize];
                    for element in pattern.chunks_exact_mut(size as usize) {
                        element.copy_from_slice(&value[..size as usize]);
                    }
                    target.copy_from(pattern);
                }
            }
            self.code_watch.invalidate(destination, len);

            if copies {
                self.gpr[6] = self.gpr[6].wrapping_add(len);
            }
            self.gpr[7] = self.gpr[7].wrapping_add(len);
            self.gpr[1] -= elements;
            budget -= len;
        }
        Ok(Bulk::Done)
    }

    pub(super) fn exec_string(&mut self, bus: &mut dyn CpuBus, insn: &Instruction) -> Exec {
        let mnemonic = insn.mnemonic();
        let size = insn.memory_size().size() as u8;
        let address_mask = size_mask(address_size(insn));
        let step = if self.flags & DF != 0 {
            (u64::from(size)).wrapping_neg()
        } else {
            u64::from(size)
        };
        let compares = matches!(
            mnemonic,
            Mnemonic::Cmpsb
                | Mnemonic::Cmpsw
                | Mnemonic::Cmpsd
                | Mnemonic::Cmpsq
                | Mnemonic::Scasb
                | Mnemonic::Scasw
                | Mnemonic::Scasd
                | Mnemonic::Scasq
        );
        let repeat = insn.has_rep_prefix() || insn.has_repne_prefix();
        let source_seg = segment_index(insn.memory_segment());
        let advance = |cpu: &mut Cpu, register: usize| {
            let value = cpu.gpr[register].wrapping_add(step) & address_mask;
            cpu.gpr[register] = if address_mask == 0xffff {
                (cpu.gpr[register] & !0xffff) | value
            } else {
                value
            };
        };
        if matches!(
            mnemonic,
            Mnemonic::Insb
                | Mnemonic::Insw
                | Mnemonic::Insd
                | Mnemonic::Outsb
                | Mnemonic::Outsw
                | Mnemonic::Outsd
        ) {
            let port = self.gpr[2] as u16;
            self.check_io_permission(bus, port, size)?;
        }

        let bulk = repeat
            && address_mask == u64::MAX
            && self.flags & DF == 0
            && matches!(
                mnemonic,
                Mnemonic::Movsb
                    | Mnemonic::Movsw
                    | Mnemonic::Movsd
                    | Mnemonic::Movsq
                    | Mnemonic::Stosb
                    | Mnemonic::Stosw
                    | Mnemonic::Stosd
                    | Mnemonic::Stosq
            );
        if bulk {
            let copies = matches!(
                mnemonic,
                Mnemonic::Movsb | Mnemonic::Movsw | Mnemonic::Movsd | Mnemonic::Movsq
            );
            match self.rep_bulk(bus, copies, size, source_seg)? {
                Bulk::Done => return Ok(()),
                Bulk::Again => {
                    self.next_rip = self.rip;
                    return Ok(());
                }
                Bulk::Elementwise => {}
            }
        }

        let mut iterations = 0;
        loop {
            if repeat && self.gpr[1] & address_mask == 0 {
                return Ok(());
            }
            let si = self.gpr[6] & address_mask;
            let di = self.gpr[7] & address_mask;
            match mnemonic {
                Mnemonic::Movsb | Mnemonic::Movsw | Mnemonic::Movsd | Mnemonic::Movsq => {
                    let value = self.read(bus, source_seg, si, size)?;
                    self.write(bus, ES, di, size, value)?;
                    advance(self, 6);
                    advance(self, 7);
                }
                Mnemonic::Stosb | Mnemonic::Stosw | Mnemonic::Stosd | Mnemonic::Stosq => {
                    self.write(bus, ES, di, size, self.gpr[0])?;
                    advance(self, 7);
                }
                Mnemonic::Lodsb | Mnemonic::Lodsw | Mnemonic::Lodsd | Mnemonic::Lodsq => {
                    let value = self.read(bus, source_seg, si, size)?;
                    self.set_reg(insn.op_register(0), value);
                    advance(self, 6);
                }
                Mnemonic::Cmpsb | Mnemonic::Cmpsw | Mnemonic::Cmpsd | Mnemonic::Cmpsq => {
                    let a = self.read(bus, source_seg, si, size)?;
                    let b = self.read(bus, ES, di, size)?;
                    self.set_lazy(FlagOp::Sub, size, a, b, a.wrapping_sub(b) & size_mask(size));
                    advance(self, 6);
                    advance(self, 7);
                }
                Mnemonic::Scasb | Mnemonic::Scasw | Mnemonic::Scasd | Mnemonic::Scasq => {
                    let a = self.gpr[0] & size_mask(size);
                    let b = self.read(bus, ES, di, size)?;
                    self.set_lazy(FlagOp::Sub, size, a, b, a.wrapping_sub(b) & size_mask(size));
                    advance(self, 7);
                }
                Mnemonic::Insb | Mnemonic::Insw | Mnemonic::Insd => {
                    // The destination is probed first so that a #PF does not lose input.
                    let linear = self.linear(ES, di)?;
                    self.translate(
                        bus,
                        linear,
                        crate::core::cpu::mmu::Access::Write,
                        crate::core::cpu::access::Privilege::Current,
                    )?;
                    let mut data = [0u8; 4];
                    bus.pio_read(self.gpr[2] as u16, &mut data[..size as usize]);
                    self.write(bus, ES, di, size, u64::from(u32::from_le_bytes(data)))?;
                    advance(self, 7);
                }
                _ => {
                    let value = self.read(bus, source_seg, si, size)?;
                    bus.pio_write(self.gpr[2] as u16, &value.to_le_bytes()[..size as usize]);
                    advance(self, 6);
                }
            }
            if !repeat {
                return Ok(());
            }
            let count = (self.gpr[1].wrapping_sub(1)) & address_mask;
            self.gpr[1] = if address_mask == 0xffff {
                (self.gpr[1] & !0xffff) | count
            } else {
                count
            };
            if compares {
                let zf = self.flag(ZF);
                if (insn.has_repe_prefix() && !zf) || (insn.has_repne_prefix() && zf) {
                    return Ok(());
                }
            }
            iterations += 1;
            if count != 0 && iterations == REP_CHUNK {
                // Restart the instruction later from its updated registers.
                self.next_rip = self.rip;
                return Ok(());
            }
        }
    }
}
