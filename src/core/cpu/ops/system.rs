//! System instructions: port I/O, control and debug registers, descriptor tables,
//! CPUID, MSRs, the TSC, cache and TLB control, and the fast system calls.

use iced_x86::{Code, Instruction, Mnemonic, OpKind, Register};

use super::{register_size, segment_index, Exec};
use crate::core::cpu::bus::CpuBus;
use crate::core::cpu::cpuid::cpuid;
use crate::core::cpu::exceptions::Exception;
use crate::core::cpu::flags::{self, IF, IOPL, RF, VM, ZF};
use crate::core::cpu::msr::is_canonical;
use crate::core::cpu::state::*;
use crate::core::cpu::Exit;
use crate::hypervisor::Segment;

/// A flat 4 GiB code or data segment for SYSCALL, SYSRET, SYSENTER and SYSEXIT.
fn flat_segment(selector: u16, code: bool, long: bool, dpl: u8) -> Segment {
    Segment {
        selector,
        base: 0,
        limit: 0xffff_ffff,
        type_: if code { 0xb } else { 0x3 },
        present: true,
        dpl,
        db: !long || !code,
        l: long && code,
        g: true,
        s: true,
        unusable: false,
    }
}

impl Cpu {
    /// Returns #GP(0) unless the CPU runs at privilege level 0.
    fn require_cpl0(&self) -> Result<(), Exit> {
        if self.cpl() != 0 {
            return Err(Exception::gp(0).into());
        }
        Ok(())
    }

    /// Checks the TSS I/O permission bitmap when CPL > IOPL in protected mode.
    pub(crate) fn check_io_permission(
        &mut self,
        bus: &mut dyn CpuBus,
        port: u16,
        size: u8,
    ) -> Result<(), Exit> {
        if self.cr0 & CR0_PE == 0 {
            return Ok(());
        }
        let iopl = ((self.flags & IOPL) >> 12) as u8;
        if self.flags & VM == 0 && self.cpl() <= iopl {
            return Ok(());
        }
        let tss32 = self.tr.type_ & 8 != 0;
        if !tss32 || self.tr.limit < 0x67 {
            return Err(Exception::gp(0).into());
        }
        let bitmap = self.read_system(bus, self.tr.base + 0x66, 2)?;
        let byte = bitmap + u64::from(port / 8);
        if byte + 1 > u64::from(self.tr.limit) {
            return Err(Exception::gp(0).into());
        }
        let bits = self.read_system(bus, self.tr.base + byte, 2)?;
        let mask = ((1u64 << size) - 1) << (port % 8);
        if bits & mask != 0 {
            return Err(Exception::gp(0).into());
        }
        Ok(())
    }

    pub(super) fn exec_port_io(&mut self, bus: &mut dyn CpuBus, insn: &Instruction) -> Exec {
        let (port_operand, data_operand) = if insn.mnemonic() == Mnemonic::In {
            (1, 0)
        } else {
            (0, 1)
        };
        let port = if insn.op_kind(port_operand) == OpKind::Register {
            self.gpr[2] as u16
        } else {
            u16::from(insn.immediate8())
        };
        let register = insn.op_register(data_operand);
        let size = register_size(register);
        self.check_io_permission(bus, port, size)?;
        if insn.mnemonic() == Mnemonic::In {
            let mut data = [0u8; 4];
            bus.pio_read(port, &mut data[..size as usize]);
            self.set_reg(register, u64::from(u32::from_le_bytes(data)));
        } else {
            let value = self.reg(register) as u32;
            bus.pio_write(port, &value.to_le_bytes()[..size as usize]);
        }
        Ok(())
    }

    pub(super) fn exec_interrupt_flag(&mut self, insn: &Instruction) -> Exec {
        if self.cr0 & CR0_PE != 0 && u64::from(self.cpl()) > (self.flags & IOPL) >> 12 {
            return Err(Exception::gp(0).into());
        }
        if insn.mnemonic() == Mnemonic::Cli {
            self.flags &= !IF;
        } else {
            if self.flags & IF == 0 {
                self.interrupt_shadow = true;
            }
            self.flags |= IF;
        }
        Ok(())
    }

    pub(super) fn exec_identification(&mut self, bus: &mut dyn CpuBus, insn: &Instruction) -> Exec {
        match insn.mnemonic() {
            Mnemonic::Cpuid => {
                let [a, b, c, d] = cpuid(&self.config, self.gpr[0] as u32, self.gpr[1] as u32);
                self.gpr[0] = u64::from(a);
                self.gpr[3] = u64::from(b);
                self.gpr[1] = u64::from(c);
                self.gpr[2] = u64::from(d);
            }
            Mnemonic::Rdtsc | Mnemonic::Rdtscp => {
                if self.cr4 & CR4_TSD != 0 && self.cpl() != 0 {
                    return Err(Exception::gp(0).into());
                }
                let tsc = self.read_tsc(bus);
                self.gpr[0] = tsc & 0xffff_ffff;
                self.gpr[2] = tsc >> 32;
                if insn.mnemonic() == Mnemonic::Rdtscp {
                    self.gpr[1] = self.msr.tsc_aux & 0xffff_ffff;
                }
            }
            Mnemonic::Rdmsr => {
                self.require_cpl0()?;
                let value = self.read_msr(bus, self.gpr[1] as u32)?;
                self.gpr[0] = value & 0xffff_ffff;
                self.gpr[2] = value >> 32;
            }
            Mnemonic::Wrmsr => {
                self.require_cpl0()?;
                let value = (self.gpr[0] & 0xffff_ffff) | (self.gpr[2] << 32);
                self.write_msr(bus, self.gpr[1] as u32, value)?;
            }
            // RDPMC: no performance counters are advertised.
            _ => return Err(Exception::gp(0).into()),
        }
        Ok(())
    }

    pub(super) fn exec_move_to_control(
        &mut self,
        _bus: &mut dyn CpuBus,
        insn: &Instruction,
    ) -> Exec {
        self.require_cpl0()?;
        let register = insn.op_register(0);
        let value = self.reg(insn.op_register(1));
        if register.is_dr() {
            let index = register as usize - Register::DR0 as usize;
            let index = match index {
                4 | 5 if self.cr4 & CR4_DE != 0 => return Err(Exception::ud().into()),
                4 | 5 => index + 2,
                0..=7 => index,
                _ => return Err(Exception::ud().into()),
            };
            if index >= 6 && value >> 32 != 0 {
                return Err(Exception::gp(0).into());
            }
            self.dr[index] = value;
            return Ok(());
        }
        match register {
            Register::CR0 => self.write_cr0(value),
            Register::CR2 => {
                self.cr2 = value;
                Ok(())
            }
            Register::CR3 => {
                if self.long_mode() && value >> crate::core::cpu::mmu::MAX_PHYS_BITS != 0 {
                    return Err(Exception::gp(0).into());
                }
                self.cr3 = value;
                self.tlb.flush_non_global();
                Ok(())
            }
            Register::CR4 => self.write_cr4(value),
            Register::CR8 => {
                if value >> 4 != 0 {
                    return Err(Exception::gp(0).into());
                }
                self.cr8 = value;
                Ok(())
            }
            _ => Err(Exception::ud().into()),
        }
    }

    fn write_cr0(&mut self, value: u64) -> Exec {
        if value >> 32 != 0 {
            return Err(Exception::gp(0).into());
        }
        let value = value | CR0_ET;
        if (value & CR0_PG != 0 && value & CR0_PE == 0)
            || (value & CR0_NW != 0 && value & CR0_CD == 0)
        {
            return Err(Exception::gp(0).into());
        }
        let enabling_paging = value & CR0_PG != 0 && self.cr0 & CR0_PG == 0;
        let disabling_paging = value & CR0_PG == 0 && self.cr0 & CR0_PG != 0;
        if enabling_paging && self.efer & EFER_LME != 0 {
            if self.cr4 & CR4_PAE == 0 {
                return Err(Exception::gp(0).into());
            }
            self.efer |= EFER_LMA;
        }
        if disabling_paging && self.long_mode() {
            if self.mode() == Mode::Long64 {
                return Err(Exception::gp(0).into());
            }
            self.efer &= !EFER_LMA;
        }
        if (value ^ self.cr0) & (CR0_PG | CR0_WP | CR0_PE) != 0 {
            self.tlb.flush_all();
        }
        self.cr0 = value;
        Ok(())
    }

    fn write_cr4(&mut self, value: u64) -> Exec {
        if value & !CR4_SUPPORTED != 0 || (self.long_mode() && value & CR4_PAE == 0) {
            return Err(Exception::gp(0).into());
        }
        if (value ^ self.cr4) & (CR4_PGE | CR4_PAE | CR4_PSE) != 0 {
            self.tlb.flush_all();
        }
        self.cr4 = value;
        Ok(())
    }

    pub(super) fn exec_move_from_control(&mut self, insn: &Instruction) -> Exec {
        self.require_cpl0()?;
        let register = insn.op_register(1);
        let value = if register.is_dr() {
            match register as usize - Register::DR0 as usize {
                4 | 5 if self.cr4 & CR4_DE != 0 => return Err(Exception::ud().into()),
                index @ (4 | 5) => self.dr[index + 2],
                index @ 0..=7 => self.dr[index],
                _ => return Err(Exception::ud().into()),
            }
        } else {
            match register {
                Register::CR0 => self.cr0,
                Register::CR2 => self.cr2,
                Register::CR3 => self.cr3,
                Register::CR4 => self.cr4,
                Register::CR8 => self.cr8,
                _ => return Err(Exception::ud().into()),
            }
        };
        self.set_reg(insn.op_register(0), value);
        Ok(())
    }

    pub(super) fn exec_descriptor_table(
        &mut self,
        bus: &mut dyn CpuBus,
        insn: &Instruction,
    ) -> Exec {
        let mnemonic = insn.mnemonic();
        let protected_only = matches!(
            mnemonic,
            Mnemonic::Lldt
                | Mnemonic::Sldt
                | Mnemonic::Ltr
                | Mnemonic::Str
                | Mnemonic::Lar
                | Mnemonic::Lsl
                | Mnemonic::Verr
                | Mnemonic::Verw
        );
        if protected_only && (self.cr0 & CR0_PE == 0 || self.flags & VM != 0) {
            return Err(Exception::ud().into());
        }
        match mnemonic {
            Mnemonic::Lgdt | Mnemonic::Lidt => {
                self.require_cpl0()?;
                let seg = segment_index(insn.memory_segment());
                let address = self.effective_address(insn);
                let limit = self.read(bus, seg, address, 2)? as u16;
                let base_size = if self.mode() == Mode::Long64 { 8 } else { 4 };
                let mut base = self.read(bus, seg, address.wrapping_add(2), base_size)?;
                if matches!(insn.code(), Code::Lgdt_m1632_16 | Code::Lidt_m1632_16) {
                    // A 16-bit operand size loads only 24 bits of base.
                    base &= 0xff_ffff;
                }
                if base_size == 8 && !is_canonical(base) {
                    return Err(Exception::gp(0).into());
                }
                let table = crate::hypervisor::DescriptorTable { base, limit };
                if mnemonic == Mnemonic::Lgdt {
                    self.gdtr = table;
                } else {
                    self.idtr = table;
                }
            }
            Mnemonic::Sgdt | Mnemonic::Sidt => {
                let table = if mnemonic == Mnemonic::Sgdt {
                    self.gdtr
                } else {
                    self.idtr
                };
                let seg = segment_index(insn.memory_segment());
                let address = self.effective_address(insn);
                let base_size = if self.mode() == Mode::Long64 { 8 } else { 4 };
                self.write(bus, seg, address, 2, u64::from(table.limit))?;
                self.write(bus, seg, address.wrapping_add(2), base_size, table.base)?;
            }
            Mnemonic::Lldt | Mnemonic::Ltr => {
                self.require_cpl0()?;
                let selector = self.read_operand(bus, insn, 0, 2)? as u16;
                if mnemonic == Mnemonic::Lldt {
                    self.load_ldt(bus, selector)?;
                } else {
                    self.load_task_register(bus, selector)?;
                }
            }
            Mnemonic::Sldt | Mnemonic::Str | Mnemonic::Smsw => {
                let value = match mnemonic {
                    Mnemonic::Sldt => u64::from(self.ldtr.selector),
                    Mnemonic::Str => u64::from(self.tr.selector),
                    _ => self.cr0,
                };
                let size = if insn.op_kind(0) == OpKind::Memory {
                    2
                } else {
                    Self::operand_size(insn, 0)
                };
                let value = if insn.op_kind(0) == OpKind::Memory {
                    value & 0xffff
                } else {
                    value
                };
                self.write_operand(bus, insn, 0, size, value)?;
            }
            Mnemonic::Lmsw => {
                self.require_cpl0()?;
                let value = self.read_operand(bus, insn, 0, 2)?;
                // LMSW can set PE but never clear it, and changes only PE, MP, EM and TS.
                let new = (self.cr0 & !0xe) | (value & 0xf) | (self.cr0 & CR0_PE);
                self.write_cr0(new)?;
            }
            _ => self.exec_segment_query(bus, insn)?,
        }
        Ok(())
    }

    /// LAR, LSL, VERR and VERW: report a descriptor's rights or limit in ZF.
    fn exec_segment_query(&mut self, bus: &mut dyn CpuBus, insn: &Instruction) -> Exec {
        let mnemonic = insn.mnemonic();
        let source = if matches!(mnemonic, Mnemonic::Verr | Mnemonic::Verw) {
            0
        } else {
            1
        };
        let selector = self.read_operand(bus, insn, source, 2)? as u16;
        let descriptor = if selector & !3 == 0 {
            None
        } else {
            self.read_descriptor(bus, selector).ok()
        };
        let cpl = self.cpl();
        let result = descriptor.and_then(|d| {
            let s = d.segment;
            let conforming_code = s.s && s.type_ & 0xc == 0xc;
            let visible = conforming_code || (s.dpl >= cpl && s.dpl >= (selector & 3) as u8);
            if !visible {
                return None;
            }
            match mnemonic {
                Mnemonic::Lar => {
                    let valid_system = matches!(s.type_, 1 | 2 | 3 | 9 | 11 | 12);
                    (s.s || valid_system).then_some(d.raw >> 32 & 0x00ff_ff00)
                }
                Mnemonic::Lsl => {
                    let valid_system = matches!(s.type_, 1 | 2 | 3 | 9 | 11);
                    (s.s || valid_system).then_some(u64::from(s.limit))
                }
                Mnemonic::Verr => (s.s && (s.type_ & 8 == 0 || s.type_ & 2 != 0)).then_some(0),
                _ => (s.s && s.type_ & 0xa == 0x2).then_some(0),
            }
        });
        match result {
            Some(value) => {
                if matches!(mnemonic, Mnemonic::Lar | Mnemonic::Lsl) {
                    self.set_reg(insn.op_register(0), value);
                }
                self.set_flag(ZF, true);
            }
            None => self.set_flag(ZF, false),
        }
        Ok(())
    }

    pub(super) fn exec_cache_control(&mut self, bus: &mut dyn CpuBus, insn: &Instruction) -> Exec {
        match insn.mnemonic() {
            Mnemonic::Clts => {
                self.require_cpl0()?;
                self.cr0 &= !CR0_TS;
            }
            Mnemonic::Invlpg => {
                self.require_cpl0()?;
                let address = self.effective_address(insn);
                let seg = segment_index(insn.memory_segment());
                if let Ok(linear) = self.linear(seg, address) {
                    self.tlb.flush_page(linear);
                }
            }
            Mnemonic::Wbinvd | Mnemonic::Invd => self.require_cpl0()?,
            Mnemonic::Clflush | Mnemonic::Clflushopt => {
                // Caches are not modelled, but the address must translate as for a read.
                let seg = segment_index(insn.memory_segment());
                let address = self.effective_address(insn);
                self.read(bus, seg, address, 1)?;
            }
            _ => return Err(Exception::ud().into()),
        }
        Ok(())
    }

    pub(super) fn exec_fast_system_call(
        &mut self,
        bus: &mut dyn CpuBus,
        insn: &Instruction,
    ) -> Exec {
        let _ = bus;
        match insn.mnemonic() {
            Mnemonic::Swapgs => {
                if self.mode() != Mode::Long64 {
                    return Err(Exception::ud().into());
                }
                self.require_cpl0()?;
                std::mem::swap(&mut self.seg[GS].base, &mut self.msr.kernel_gs_base);
            }
            Mnemonic::Syscall => {
                if self.efer & EFER_SCE == 0 || self.mode() != Mode::Long64 {
                    return Err(Exception::ud().into());
                }
                let selector = ((self.msr.star >> 32) & 0xfffc) as u16;
                self.gpr[1] = self.next_rip;
                self.gpr[11] = self.rflags() & !RF;
                self.seg[CS] = flat_segment(selector, true, true, 0);
                self.seg[SS] = flat_segment(selector + 8, false, false, 0);
                let value = self.rflags() & !self.msr.fmask & !RF;
                self.set_rflags(value);
                self.next_rip = self.msr.lstar;
            }
            Mnemonic::Sysret | Mnemonic::Sysretq => {
                if self.efer & EFER_SCE == 0 || self.mode() != Mode::Long64 {
                    return Err(Exception::ud().into());
                }
                self.require_cpl0()?;
                let base = ((self.msr.star >> 48) & 0xffff) as u16;
                let to_64 = insn.mnemonic() == Mnemonic::Sysretq;
                let target = if to_64 {
                    self.gpr[1]
                } else {
                    self.gpr[1] & 0xffff_ffff
                };
                if !is_canonical(target) {
                    return Err(Exception::gp(0).into());
                }
                let cs = if to_64 { base.wrapping_add(16) } else { base } | 3;
                self.seg[CS] = flat_segment(cs, true, to_64, 3);
                self.seg[SS] = flat_segment(base.wrapping_add(8) | 3, false, false, 3);
                let value = (self.gpr[11] & flags::WRITABLE & !RF) | flags::FIXED;
                self.set_rflags(value);
                self.next_rip = target;
            }
            Mnemonic::Sysenter => {
                let cs = (self.msr.sysenter_cs & 0xfffc) as u16;
                if self.cr0 & CR0_PE == 0 || cs == 0 {
                    return Err(Exception::gp(0).into());
                }
                let long = self.long_mode();
                self.seg[CS] = flat_segment(cs, true, long, 0);
                self.seg[SS] = flat_segment(cs + 8, false, false, 0);
                let value = self.rflags() & !(VM | IF | RF);
                self.set_rflags(value);
                self.gpr[4] = self.msr.sysenter_esp;
                self.next_rip = if long {
                    self.msr.sysenter_eip
                } else {
                    self.msr.sysenter_eip & 0xffff_ffff
                };
                if !long {
                    self.gpr[4] &= 0xffff_ffff;
                }
            }
            _ => {
                let cs = (self.msr.sysenter_cs & 0xfffc) as u16;
                if self.cr0 & CR0_PE == 0 || cs == 0 || self.cpl() != 0 {
                    return Err(Exception::gp(0).into());
                }
                let to_64 = insn.mnemonic() == Mnemonic::Sysexitq;
                let (code, stack) = if to_64 {
                    (cs + 32, cs + 40)
                } else {
                    (cs + 16, cs + 24)
                };
                self.seg[CS] = flat_segment(code | 3, true, to_64, 3);
                self.seg[SS] = flat_segment(stack | 3, false, false, 3);
                let (rip, rsp) = if to_64 {
                    (self.gpr[2], self.gpr[1])
                } else {
                    (self.gpr[2] & 0xffff_ffff, self.gpr[1] & 0xffff_ffff)
                };
                if to_64 && !is_canonical(rip) {
                    return Err(Exception::gp(0).into());
                }
                self.gpr[4] = rsp;
                self.next_rip = rip;
            }
        }
        Ok(())
    }
}
