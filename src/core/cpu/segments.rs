//! Segment registers: descriptor loads with their protection checks, far transfers,
//! LTR and LLDT.

use crate::hypervisor::Segment;

use super::bus::CpuBus;
use super::exceptions::Exception;
use super::msr::is_canonical;
use super::state::{Cpu, Mode, CS, DS, ES, FS, GS, SS};
use super::{CpuError, Exit};

/// A descriptor read from the GDT or LDT.
#[derive(Debug, Clone, Copy)]
pub struct Descriptor {
    /// The low 8 bytes as stored.
    pub raw: u64,
    /// Linear address of the descriptor, for setting its accessed and busy bits.
    pub address: u64,
    /// The descriptor decoded as a segment register's hidden part.
    pub segment: Segment,
}

/// Returns a null, unusable segment with `selector` (whose RPL may be non-zero).
pub fn null_segment(selector: u16) -> Segment {
    Segment {
        selector,
        unusable: true,
        ..Segment::default()
    }
}

/// Decodes the low 8 bytes of a segment descriptor.
pub fn parse_descriptor(raw: u64, selector: u16) -> Segment {
    let mut limit = ((raw & 0xffff) | ((raw >> 32) & 0xf_0000)) as u32;
    let g = raw & (1 << 55) != 0;
    if g {
        limit = (limit << 12) | 0xfff;
    }
    Segment {
        selector,
        base: ((raw >> 16) & 0xff_ffff) | ((raw >> 32) & 0xff00_0000),
        limit,
        type_: ((raw >> 40) & 0xf) as u8,
        s: raw & (1 << 44) != 0,
        dpl: ((raw >> 45) & 3) as u8,
        present: raw & (1 << 47) != 0,
        l: raw & (1 << 53) != 0,
        db: raw & (1 << 54) != 0,
        g,
        unusable: false,
    }
}

impl Cpu {
    /// Loads segment `seg` in real mode: only the selector and base change.
    pub(crate) fn load_real_mode_segment(&mut self, seg: usize, selector: u16) {
        self.seg[seg].selector = selector;
        self.seg[seg].base = u64::from(selector) << 4;
        self.seg[seg].unusable = false;
        self.seg[seg].present = true;
        if seg == CS {
            self.seg[CS].dpl = 0;
        }
    }

    /// Reads the descriptor that `selector` names in the GDT or LDT, raising
    /// #GP(selector) when it lies beyond the table's limit.
    pub(crate) fn read_descriptor(
        &mut self,
        bus: &mut dyn CpuBus,
        selector: u16,
    ) -> Result<Descriptor, Exception> {
        let error = Exception::gp(u32::from(selector & !3));
        let (base, limit) = if selector & 4 != 0 {
            if self.ldtr.unusable || !self.ldtr.present {
                return Err(error);
            }
            (self.ldtr.base, u64::from(self.ldtr.limit))
        } else {
            (self.gdtr.base, u64::from(self.gdtr.limit))
        };
        let offset = u64::from(selector & !7);
        if offset + 7 > limit {
            return Err(error);
        }
        let address = base.wrapping_add(offset);
        let raw = self.read_system(bus, address, 8)?;
        Ok(Descriptor {
            raw,
            address,
            segment: parse_descriptor(raw, selector),
        })
    }

    /// Reads the upper 8 bytes of a 16-byte system descriptor (long-mode TSS and LDT).
    fn read_descriptor_high(
        &mut self,
        bus: &mut dyn CpuBus,
        descriptor: &Descriptor,
        selector: u16,
    ) -> Result<u64, Exception> {
        let offset = u64::from(selector & !7) + 15;
        if offset > u64::from(self.gdtr.limit) {
            return Err(Exception::gp(u32::from(selector & !3)));
        }
        self.read_system(bus, descriptor.address + 8, 8)
    }

    /// Sets the accessed bit of a code or data descriptor, as a segment load does.
    fn mark_descriptor_accessed(
        &mut self,
        bus: &mut dyn CpuBus,
        descriptor: &Descriptor,
    ) -> Result<(), Exception> {
        if descriptor.raw & (1 << 40) == 0 {
            self.write_system(bus, descriptor.address + 5, 1, (descriptor.raw >> 40) | 1)?;
        }
        Ok(())
    }

    /// Loads data segment register `seg` (DS, ES, FS, GS or SS) from `selector`, as MOV,
    /// POP and LDS-style instructions do.
    pub(crate) fn load_segment(
        &mut self,
        bus: &mut dyn CpuBus,
        seg: usize,
        selector: u16,
    ) -> Result<(), Exit> {
        if self.mode() == Mode::Real || self.flags & super::flags::VM != 0 {
            self.load_real_mode_segment(seg, selector);
            return Ok(());
        }
        if seg == SS {
            return self.load_stack_segment_for(bus, selector, self.cpl());
        }
        if selector & !3 == 0 {
            self.seg[seg] = null_segment(selector);
            return Ok(());
        }
        let descriptor = self.read_descriptor(bus, selector)?;
        let s = descriptor.segment;
        let error = u32::from(selector & !3);
        let code = s.type_ & 8 != 0;
        let readable = !code || s.type_ & 2 != 0;
        let conforming = code && s.type_ & 4 != 0;
        if !s.s || !readable {
            return Err(Exception::gp(error).into());
        }
        if !conforming && ((selector & 3) as u8 > s.dpl || self.cpl() > s.dpl) {
            return Err(Exception::gp(error).into());
        }
        if !s.present {
            return Err(Exception::np(error).into());
        }
        self.mark_descriptor_accessed(bus, &descriptor)?;
        self.seg[seg] = s;
        Ok(())
    }

    /// Loads SS from `selector` for code running at privilege `cpl`.
    pub(crate) fn load_stack_segment_for(
        &mut self,
        bus: &mut dyn CpuBus,
        selector: u16,
        cpl: u8,
    ) -> Result<(), Exit> {
        let error = u32::from(selector & !3);
        if selector & !3 == 0 {
            if self.mode() == Mode::Long64 && cpl < 3 && (selector & 3) as u8 == cpl {
                self.seg[SS] = null_segment(selector);
                return Ok(());
            }
            return Err(Exception::gp(0).into());
        }
        let descriptor = self.read_descriptor(bus, selector)?;
        let s = descriptor.segment;
        let writable_data = s.s && s.type_ & 0xa == 0x2;
        if (selector & 3) as u8 != cpl || s.dpl != cpl || !writable_data {
            return Err(Exception::gp(error).into());
        }
        if !s.present {
            return Err(Exception::ss(error).into());
        }
        self.mark_descriptor_accessed(bus, &descriptor)?;
        self.seg[SS] = s;
        Ok(())
    }

    /// Loads SS for a return to privilege `rpl` (IRET, far RET); a null selector is
    /// allowed when returning to 64-bit code below CPL 3.
    pub(crate) fn load_return_stack(
        &mut self,
        bus: &mut dyn CpuBus,
        selector: u16,
        rpl: u8,
        to_64bit: bool,
    ) -> Result<(), Exit> {
        if selector & !3 == 0 && to_64bit && self.long_mode() && rpl < 3 {
            self.seg[SS] = null_segment(selector);
            return Ok(());
        }
        self.load_stack_segment_for(bus, selector, rpl)
    }

    /// Checks the code segment that IRET or far RET returns to at privilege `rpl`.
    pub(crate) fn check_far_code_segment(
        &mut self,
        bus: &mut dyn CpuBus,
        selector: u16,
        rpl: u8,
    ) -> Result<Descriptor, Exit> {
        let error = u32::from(selector & !3);
        if selector & !3 == 0 {
            return Err(Exception::gp(0).into());
        }
        let descriptor = self.read_descriptor(bus, selector)?;
        let s = descriptor.segment;
        let conforming = s.type_ & 4 != 0;
        let dpl_ok = if conforming {
            s.dpl <= rpl
        } else {
            s.dpl == rpl
        };
        if !s.s || s.type_ & 8 == 0 || !dpl_ok {
            return Err(Exception::gp(error).into());
        }
        if s.l && s.db {
            return Err(Exception::gp(error).into());
        }
        if !s.present {
            return Err(Exception::np(error).into());
        }
        Ok(descriptor)
    }

    /// Makes `descriptor` the current code segment at privilege `cpl`.
    ///
    /// The stored DPL is the CPL, because [`Cpu::cpl`] reads it from CS (a conforming
    /// segment runs at the caller's privilege, not at its DPL).
    pub(crate) fn load_code_segment(&mut self, descriptor: Descriptor, selector: u16, cpl: u8) {
        let mut segment = descriptor.segment;
        segment.selector = (selector & !3) | u16::from(cpl);
        segment.dpl = cpl;
        self.seg[CS] = segment;
    }

    /// Nulls DS, ES, FS and GS when the new, less privileged code could not load them.
    pub(crate) fn null_inaccessible_data_segments(&mut self) {
        let cpl = self.cpl();
        for seg in [ES, DS, FS, GS] {
            let s = self.seg[seg];
            let conforming_code = s.type_ & 0xc == 0xc;
            if !s.unusable && !conforming_code && s.dpl < cpl {
                let base = s.base;
                self.seg[seg] = null_segment(0);
                if self.long_mode() && (seg == FS || seg == GS) {
                    self.seg[seg].base = base;
                }
            }
        }
    }

    /// Checks the target of a far JMP or CALL and returns its descriptor and new CPL.
    fn far_target(
        &mut self,
        bus: &mut dyn CpuBus,
        selector: u16,
    ) -> Result<(Descriptor, u8), Exit> {
        let error = u32::from(selector & !3);
        if selector & !3 == 0 {
            return Err(Exception::gp(0).into());
        }
        let descriptor = self.read_descriptor(bus, selector)?;
        let s = descriptor.segment;
        let cpl = self.cpl();
        if !s.s {
            return Err(Exit::Error(CpuError::Unsupported {
                feature: "far transfers through call gates or task state segments",
                rip: self.rip,
            }));
        }
        if s.type_ & 8 == 0 {
            return Err(Exception::gp(error).into());
        }
        let conforming = s.type_ & 4 != 0;
        let allowed = if conforming {
            s.dpl <= cpl
        } else {
            (selector & 3) as u8 <= cpl && s.dpl == cpl
        };
        if !allowed || (s.l && s.db && self.long_mode()) {
            return Err(Exception::gp(error).into());
        }
        if !s.present {
            return Err(Exception::np(error).into());
        }
        Ok((descriptor, cpl))
    }

    fn check_branch_target(&self, segment: &Segment, offset: u64) -> Result<u64, Exit> {
        if self.long_mode() && segment.l {
            if !is_canonical(offset) {
                return Err(Exception::gp(0).into());
            }
            Ok(offset)
        } else {
            Ok(offset & 0xffff_ffff)
        }
    }

    /// Executes a far JMP to `selector:offset`.
    pub(crate) fn far_jump(
        &mut self,
        bus: &mut dyn CpuBus,
        selector: u16,
        offset: u64,
    ) -> Result<(), Exit> {
        if self.mode() == Mode::Real || self.flags & super::flags::VM != 0 {
            self.load_real_mode_segment(CS, selector);
            self.next_rip = offset;
            return Ok(());
        }
        let (descriptor, cpl) = self.far_target(bus, selector)?;
        let target = self.check_branch_target(&descriptor.segment, offset)?;
        self.load_code_segment(descriptor, selector, cpl);
        self.next_rip = target;
        Ok(())
    }

    /// Executes a far CALL to `selector:offset` with operand size `size`.
    pub(crate) fn far_call(
        &mut self,
        bus: &mut dyn CpuBus,
        selector: u16,
        offset: u64,
        size: u8,
    ) -> Result<(), Exit> {
        let old_cs = u64::from(self.seg[CS].selector);
        let return_rip = self.next_rip;
        let sp = self.gpr[4];
        if self.mode() == Mode::Real || self.flags & super::flags::VM != 0 {
            self.push(bus, size, old_cs)?;
            if let Err(err) = self.push(bus, size, return_rip) {
                self.gpr[4] = sp;
                return Err(err);
            }
            self.load_real_mode_segment(CS, selector);
            self.next_rip = offset;
            return Ok(());
        }
        let (descriptor, cpl) = self.far_target(bus, selector)?;
        let target = self.check_branch_target(&descriptor.segment, offset)?;
        self.push(bus, size, old_cs)?;
        if let Err(err) = self.push(bus, size, return_rip) {
            self.gpr[4] = sp;
            return Err(err);
        }
        self.load_code_segment(descriptor, selector, cpl);
        self.next_rip = target;
        Ok(())
    }

    /// Executes a far RET with operand size `size`, releasing `release` more bytes.
    pub(crate) fn far_return(
        &mut self,
        bus: &mut dyn CpuBus,
        size: u8,
        release: u64,
    ) -> Result<(), Exit> {
        let step = u64::from(size);
        let offset = self.peek(bus, size, 0)?;
        let selector = self.peek(bus, size, step)? as u16;
        if self.mode() == Mode::Real || self.flags & super::flags::VM != 0 {
            self.pop_n(2 * step + release);
            self.load_real_mode_segment(CS, selector);
            self.next_rip = offset & 0xffff;
            return Ok(());
        }
        let cpl = self.cpl();
        let rpl = (selector & 3) as u8;
        if rpl < cpl {
            return Err(Exception::gp(u32::from(selector & !3)).into());
        }
        let descriptor = self.check_far_code_segment(bus, selector, rpl)?;
        let target = self.check_branch_target(&descriptor.segment, offset)?;
        if rpl > cpl {
            let sp = self.peek(bus, size, 2 * step + release)?;
            let ss = self.peek(bus, size, 3 * step + release)? as u16;
            self.load_return_stack(bus, ss, rpl, descriptor.segment.l)?;
            self.load_code_segment(descriptor, selector, rpl);
            self.gpr[4] = sp;
            self.pop_n(release);
            self.null_inaccessible_data_segments();
        } else {
            self.pop_n(2 * step + release);
            self.load_code_segment(descriptor, selector, rpl);
        }
        self.next_rip = target;
        Ok(())
    }

    /// Executes LTR: loads the task register from an available TSS descriptor and marks
    /// it busy.
    pub(crate) fn load_task_register(
        &mut self,
        bus: &mut dyn CpuBus,
        selector: u16,
    ) -> Result<(), Exit> {
        let error = u32::from(selector & !3);
        if selector & !3 == 0 || selector & 4 != 0 {
            return Err(Exception::gp(error).into());
        }
        let descriptor = self.read_descriptor(bus, selector)?;
        let mut s = descriptor.segment;
        let available = if self.long_mode() {
            s.type_ == 9
        } else {
            matches!(s.type_, 1 | 9)
        };
        if s.s || !available {
            return Err(Exception::gp(error).into());
        }
        if !s.present {
            return Err(Exception::np(error).into());
        }
        if self.long_mode() {
            let high = self.read_descriptor_high(bus, &descriptor, selector)?;
            s.base |= (high & 0xffff_ffff) << 32;
        }
        self.write_system(bus, descriptor.address + 5, 1, (descriptor.raw >> 40) | 2)?;
        s.type_ |= 2;
        self.tr = s;
        Ok(())
    }

    /// Executes LLDT: loads the LDT register; a null selector makes the LDT unusable.
    pub(crate) fn load_ldt(&mut self, bus: &mut dyn CpuBus, selector: u16) -> Result<(), Exit> {
        let error = u32::from(selector & !3);
        if selector & !3 == 0 {
            self.ldtr = null_segment(selector);
            return Ok(());
        }
        if selector & 4 != 0 {
            return Err(Exception::gp(error).into());
        }
        let descriptor = self.read_descriptor(bus, selector)?;
        let mut s = descriptor.segment;
        if s.s || s.type_ != 2 {
            return Err(Exception::gp(error).into());
        }
        if !s.present {
            return Err(Exception::np(error).into());
        }
        if self.long_mode() {
            let high = self.read_descriptor_high(bus, &descriptor, selector)?;
            s.base |= (high & 0xffff_ffff) << 32;
        }
        self.ldtr = s;
        Ok(())
    }
}
