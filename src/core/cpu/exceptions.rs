//! Exceptions and interrupts: delivery through the IVT or IDT in every mode, double- and
//! triple-fault escalation, and IRET.

use super::access::Privilege;
use super::bus::CpuBus;
use super::flags::{self, AC, IF, NT, RF, TF, VM};
use super::msr::is_canonical;
use super::segments::Descriptor;
use super::state::{Cpu, Mode, CS, SS};
use super::{CpuError, Exit};

pub const DE: u8 = 0;
pub const DB: u8 = 1;
pub const BP: u8 = 3;
pub const OF: u8 = 4;
pub const UD: u8 = 6;
pub const NM: u8 = 7;
pub const DF: u8 = 8;
pub const TS: u8 = 10;
pub const NP: u8 = 11;
pub const SS_FAULT: u8 = 12;
pub const GP: u8 = 13;
pub const PF: u8 = 14;
pub const MF: u8 = 16;
pub const AC_FAULT: u8 = 17;
pub const XM: u8 = 19;

/// #PF error code: the page was present (a protection or reserved-bit fault).
pub const PF_P: u32 = 1 << 0;
/// #PF error code: the access was a write.
pub const PF_WR: u32 = 1 << 1;
/// #PF error code: the access was made at CPL 3.
pub const PF_US: u32 = 1 << 2;
/// #PF error code: a paging-structure entry set a reserved bit.
pub const PF_RSVD: u32 = 1 << 3;
/// #PF error code: the access was an instruction fetch.
pub const PF_ID: u32 = 1 << 4;

/// Error-code bit for a fault raised while delivering an external event.
const ERR_EXT: u32 = 1;
/// Error-code bit saying that the selector index refers to the IDT.
const ERR_IDT: u32 = 2;

/// A processor exception raised by an instruction: its vector and error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exception {
    pub vector: u8,
    pub error_code: Option<u32>,
}

impl Exception {
    /// An exception without error code.
    pub const fn new(vector: u8) -> Self {
        Exception {
            vector,
            error_code: None,
        }
    }
    pub const fn ud() -> Self {
        Self::new(UD)
    }
    pub const fn de() -> Self {
        Self::new(DE)
    }
    pub const fn nm() -> Self {
        Self::new(NM)
    }
    pub const fn gp(code: u32) -> Self {
        Exception {
            vector: GP,
            error_code: Some(code),
        }
    }
    pub const fn ss(code: u32) -> Self {
        Exception {
            vector: SS_FAULT,
            error_code: Some(code),
        }
    }
    pub const fn np(code: u32) -> Self {
        Exception {
            vector: NP,
            error_code: Some(code),
        }
    }
    pub const fn ts(code: u32) -> Self {
        Exception {
            vector: TS,
            error_code: Some(code),
        }
    }
    pub const fn pf(code: u32) -> Self {
        Exception {
            vector: PF,
            error_code: Some(code),
        }
    }
}

/// How an event reached the CPU, which decides the return address and the checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// A fault raised by the instruction at RIP: the handler returns to it.
    Fault,
    /// INT n, INT3 or INTO: gate DPL is checked and the handler returns after it.
    Software,
    /// A hardware interrupt from the interrupt controller.
    External,
    /// A trap raised after an instruction completed (single-step #DB).
    Trap,
}

/// Returns whether a fault in `vector` while delivering another is contributory.
fn contributory(vector: u8) -> bool {
    matches!(vector, DE | TS | NP | SS_FAULT | GP)
}

impl Cpu {
    /// Delivers exception `exception` raised by the instruction at RIP, escalating to #DF
    /// and to a triple fault (returned as `Exit::Shutdown`) as the SDM's table 6-5 says.
    pub(crate) fn raise(&mut self, bus: &mut dyn CpuBus, exception: Exception) -> Result<(), Exit> {
        let mut current = exception;
        loop {
            let return_rip = self.rip;
            match self.deliver(
                bus,
                current.vector,
                current.error_code,
                Source::Fault,
                return_rip,
            ) {
                Ok(()) => return Ok(()),
                Err(Exit::Exception(second)) => {
                    if current.vector == DF {
                        tracing::debug!(rip = self.rip, "triple fault");
                        return Err(Exit::Shutdown);
                    }
                    let first_contributory = contributory(current.vector);
                    let escalate = (first_contributory && contributory(second.vector))
                        || (current.vector == PF
                            && (second.vector == PF || contributory(second.vector)));
                    current = if escalate {
                        Exception {
                            vector: DF,
                            error_code: Some(0),
                        }
                    } else {
                        second
                    };
                }
                Err(other) => return Err(other),
            }
        }
    }

    /// Delivers an interrupt or software interrupt; a fault during delivery is raised in
    /// its place.
    pub(crate) fn interrupt(
        &mut self,
        bus: &mut dyn CpuBus,
        vector: u8,
        source: Source,
        return_rip: u64,
    ) -> Result<(), Exit> {
        match self.deliver(bus, vector, None, source, return_rip) {
            Err(Exit::Exception(fault)) => self.raise(bus, fault),
            other => other,
        }
    }

    fn deliver(
        &mut self,
        bus: &mut dyn CpuBus,
        vector: u8,
        error_code: Option<u32>,
        source: Source,
        return_rip: u64,
    ) -> Result<(), Exit> {
        self.halted = false;
        match self.mode() {
            Mode::Real => self.deliver_real(bus, vector, return_rip),
            _ if self.flags & VM != 0 => Err(Exit::Error(CpuError::Unsupported {
                feature: "virtual-8086 mode",
                rip: self.rip,
            })),
            _ if self.long_mode() => self.deliver_long(bus, vector, error_code, source, return_rip),
            _ => self.deliver_protected(bus, vector, error_code, source, return_rip),
        }
    }

    fn deliver_real(
        &mut self,
        bus: &mut dyn CpuBus,
        vector: u8,
        return_rip: u64,
    ) -> Result<(), Exit> {
        let entry = u64::from(vector) * 4;
        if entry + 3 > u64::from(self.idtr.limit) {
            return Err(Exception::gp(0).into());
        }
        let target = self.read_system(bus, self.idtr.base + entry, 4)?;
        let sp = self.gpr[4];
        let rflags = self.rflags();
        let old_cs = self.seg[CS].selector;
        let pushed = (|| {
            self.push(bus, 2, rflags)?;
            self.push(bus, 2, u64::from(old_cs))?;
            self.push(bus, 2, return_rip)
        })();
        if let Err(err) = pushed {
            self.gpr[4] = sp;
            return Err(err);
        }
        self.flags &= !(IF | TF | AC | RF);
        self.load_real_mode_segment(CS, (target >> 16) as u16);
        self.rip = target & 0xffff;
        Ok(())
    }

    /// Reads the 8-byte (legacy) or 16-byte (long mode) gate of `vector` and checks it.
    fn read_gate(
        &mut self,
        bus: &mut dyn CpuBus,
        vector: u8,
        source: Source,
    ) -> Result<(u64, u64), Exit> {
        let ext = if source == Source::External {
            ERR_EXT
        } else {
            0
        };
        let idt_error = u32::from(vector) * 8 + ERR_IDT + ext;
        let size = if self.long_mode() { 16 } else { 8 };
        let entry = u64::from(vector) * size;
        if entry + size - 1 > u64::from(self.idtr.limit) {
            return Err(Exception::gp(idt_error).into());
        }
        let low = self.read_system(bus, self.idtr.base + entry, 8)?;
        let high = if size == 16 {
            self.read_system(bus, self.idtr.base + entry + 8, 8)?
        } else {
            0
        };
        let gate_type = (low >> 40) & 0xf;
        let valid = if self.long_mode() {
            matches!(gate_type, 0xe | 0xf)
        } else {
            matches!(gate_type, 0x5 | 0x6 | 0x7 | 0xe | 0xf)
        };
        if !valid {
            return Err(Exception::gp(idt_error).into());
        }
        let dpl = ((low >> 45) & 3) as u8;
        if source == Source::Software && dpl < self.cpl() {
            return Err(Exception::gp(idt_error).into());
        }
        if low & (1 << 47) == 0 {
            return Err(Exception::np(idt_error).into());
        }
        if gate_type == 0x5 {
            return Err(Exit::Error(CpuError::Unsupported {
                feature: "task gates",
                rip: self.rip,
            }));
        }
        Ok((low, high))
    }

    /// Loads the handler's code segment named by a gate and returns it with the new CPL.
    fn gate_code_segment(
        &mut self,
        bus: &mut dyn CpuBus,
        selector: u16,
        source: Source,
    ) -> Result<(Descriptor, u8), Exit> {
        let ext = if source == Source::External {
            ERR_EXT
        } else {
            0
        };
        let error = u32::from(selector & !3) + ext;
        if selector & !3 == 0 {
            return Err(Exception::gp(ext).into());
        }
        let descriptor = self
            .read_descriptor(bus, selector)
            .map_err(|_| Exception::gp(error))?;
        let segment = descriptor.segment;
        if !segment.s || segment.type_ & 8 == 0 || segment.dpl > self.cpl() {
            return Err(Exception::gp(error).into());
        }
        if self.long_mode() && (!segment.l || segment.db) {
            return Err(Exception::gp(error).into());
        }
        if !segment.present {
            return Err(Exception::np(error).into());
        }
        let conforming = segment.type_ & 4 != 0;
        let new_cpl = if conforming { self.cpl() } else { segment.dpl };
        Ok((descriptor, new_cpl))
    }

    fn deliver_long(
        &mut self,
        bus: &mut dyn CpuBus,
        vector: u8,
        error_code: Option<u32>,
        source: Source,
        return_rip: u64,
    ) -> Result<(), Exit> {
        let (low, high) = self.read_gate(bus, vector, source)?;
        let offset = (low & 0xffff) | ((low >> 32) & 0xffff_0000) | (high << 32);
        let selector = (low >> 16) as u16;
        let ist = ((low >> 32) & 7) as u64;
        let (descriptor, new_cpl) = self.gate_code_segment(bus, selector, source)?;
        let old_cpl = self.cpl();

        let rsp = if ist != 0 {
            self.read_system(bus, self.tr.base + 0x24 + (ist - 1) * 8, 8)?
        } else if new_cpl < old_cpl {
            self.read_system(bus, self.tr.base + 4 + u64::from(new_cpl) * 8, 8)?
        } else {
            self.gpr[4]
        };
        if !is_canonical(rsp) || !is_canonical(offset) {
            return Err(Exception::gp(0).into());
        }
        let rsp = rsp & !0xf;

        let mut frame = [0u64; 6];
        frame[0] = return_rip;
        frame[1] = u64::from(self.seg[CS].selector);
        frame[2] = self.rflags();
        frame[3] = self.gpr[4];
        frame[4] = u64::from(self.seg[SS].selector);
        // Push order: SS, RSP, RFLAGS, CS, RIP, error code, so the error code is lowest.
        let count = if error_code.is_some() { 6 } else { 5 };
        let privilege = if new_cpl == 3 {
            Privilege::User
        } else {
            Privilege::Supervisor
        };
        let base = rsp.wrapping_sub(count * 8);
        let mut slot = base;
        if let Some(code) = error_code {
            self.write_linear(bus, slot, &u64::from(code).to_le_bytes(), privilege)?;
            slot += 8;
        }
        for value in &frame[..5] {
            self.write_linear(bus, slot, &value.to_le_bytes(), privilege)?;
            slot += 8;
        }

        if new_cpl < old_cpl {
            self.seg[SS] = super::segments::null_segment(u16::from(new_cpl));
        }
        self.load_code_segment(descriptor, selector, new_cpl);
        self.gpr[4] = base;
        self.rip = offset;
        self.clear_flags_for_gate(low);
        Ok(())
    }

    fn clear_flags_for_gate(&mut self, gate_low: u64) {
        let interrupt_gate = (gate_low >> 40) & 1 == 0;
        let mut value = self.rflags() & !(TF | NT | RF | VM);
        if interrupt_gate {
            value &= !IF;
        }
        self.set_rflags(value);
    }

    fn deliver_protected(
        &mut self,
        bus: &mut dyn CpuBus,
        vector: u8,
        error_code: Option<u32>,
        source: Source,
        return_rip: u64,
    ) -> Result<(), Exit> {
        let (low, _) = self.read_gate(bus, vector, source)?;
        let gate32 = (low >> 43) & 1 != 0;
        let width: u8 = if gate32 { 4 } else { 2 };
        let offset = (low & 0xffff) | if gate32 { (low >> 32) & 0xffff_0000 } else { 0 };
        let selector = (low >> 16) as u16;
        let (descriptor, new_cpl) = self.gate_code_segment(bus, selector, source)?;
        let old_cpl = self.cpl();
        let old_ss = self.seg[SS];
        let old_sp = self.gpr[4];

        let mut frame: [u64; 6] = [0; 6];
        let mut count = 0;
        if new_cpl < old_cpl {
            // Inner-privilege stack from the TSS: SSn:ESPn.
            let tss32 = self.tr.type_ & 8 != 0;
            let (sp, ss) = if tss32 {
                let base = self.tr.base + 4 + u64::from(new_cpl) * 8;
                (
                    self.read_system(bus, base, 4)?,
                    self.read_system(bus, base + 4, 2)? as u16,
                )
            } else {
                let base = self.tr.base + 2 + u64::from(new_cpl) * 4;
                (
                    self.read_system(bus, base, 2)?,
                    self.read_system(bus, base + 2, 2)? as u16,
                )
            };
            self.load_stack_segment_for(bus, ss, new_cpl)
                .map_err(|_| Exception::ts(u32::from(ss & !3)))?;
            self.gpr[4] = sp;
            frame[0] = u64::from(old_ss.selector);
            frame[1] = old_sp;
            count = 2;
        }
        frame[count] = self.rflags();
        frame[count + 1] = u64::from(self.seg[CS].selector);
        frame[count + 2] = return_rip;
        count += 3;
        if let Some(code) = error_code {
            frame[count] = u64::from(code);
            count += 1;
        }
        let saved_cpl_segment = self.seg[CS];
        // Pushes use the new privilege level: switch CS's DPL for the page checks.
        self.seg[CS].dpl = new_cpl;
        let pushed = frame[..count]
            .iter()
            .try_for_each(|&value| self.push(bus, width, value));
        self.seg[CS] = saved_cpl_segment;
        if let Err(err) = pushed {
            self.seg[SS] = old_ss;
            self.gpr[4] = old_sp;
            return Err(err);
        }
        self.load_code_segment(descriptor, selector, new_cpl);
        self.rip = offset;
        self.clear_flags_for_gate(low);
        Ok(())
    }

    /// Executes IRET with operand size `size` (2, 4 or 8 bytes).
    pub(crate) fn iret(&mut self, bus: &mut dyn CpuBus, size: u8) -> Result<(), Exit> {
        let mode = self.mode();
        if mode == Mode::Real {
            let rip = self.peek(bus, size, 0)?;
            let cs = self.peek(bus, size, u64::from(size))? as u16;
            let popped = self.peek(bus, size, 2 * u64::from(size))?;
            self.pop_n(3 * u64::from(size));
            self.load_real_mode_segment(CS, cs);
            self.next_rip = rip & if size == 2 { 0xffff } else { 0xffff_ffff };
            let keep = if size == 2 {
                !0xffff
            } else {
                flags::VM | flags::VIF | flags::VIP
            };
            let value = (self.rflags() & keep) | (popped & !keep & flags::WRITABLE);
            self.set_rflags(value);
            return Ok(());
        }
        if self.flags & VM != 0 || (!self.long_mode() && self.flags & NT != 0) {
            return Err(Exit::Error(CpuError::Unsupported {
                feature: "IRET to another task or from virtual-8086 mode",
                rip: self.rip,
            }));
        }
        let step = u64::from(size);
        let rip = self.peek(bus, size, 0)?;
        let cs = self.peek(bus, size, step)? as u16;
        let popped = self.peek(bus, size, 2 * step)?;
        let popped = if size == 2 {
            (self.rflags() & !0xffff) | popped
        } else {
            popped
        };
        if !self.long_mode() && popped & VM != 0 && self.cpl() == 0 {
            return Err(Exit::Error(CpuError::Unsupported {
                feature: "IRET to virtual-8086 mode",
                rip: self.rip,
            }));
        }
        let cpl = self.cpl();
        let rpl = (cs & 3) as u8;
        if rpl < cpl {
            return Err(Exception::gp(u32::from(cs & !3)).into());
        }
        let descriptor = self.check_far_code_segment(bus, cs, rpl)?;
        let outer = rpl > cpl;
        let pops_stack = outer || mode == Mode::Long64;
        let (new_sp, new_ss) = if pops_stack {
            (
                self.peek(bus, size, 3 * step)?,
                self.peek(bus, size, 4 * step)? as u16,
            )
        } else {
            (0, 0)
        };
        if !is_canonical(rip) && descriptor.segment.l {
            return Err(Exception::gp(0).into());
        }

        if pops_stack {
            self.load_return_stack(bus, new_ss, rpl, descriptor.segment.l)?;
            self.gpr[4] = new_sp;
        } else {
            self.pop_n(3 * step);
        }
        self.load_code_segment(descriptor, cs, rpl);
        self.next_rip = if self.mode() == Mode::Long64 {
            rip
        } else {
            rip & 0xffff_ffff
        };

        let mut writable = flags::ARITH | TF | flags::DF | NT | RF | flags::ID | AC;
        if size == 2 {
            writable &= 0xffff;
        }
        if cpl == 0 {
            writable |= flags::IOPL | flags::VIF | flags::VIP;
        }
        if u64::from(cpl) <= (self.flags & flags::IOPL) >> 12 {
            writable |= IF;
        }
        if size == 2 {
            writable &= 0xffff;
        }
        let value = (self.rflags() & !writable) | (popped & writable);
        self.set_rflags(value);
        if outer {
            self.null_inaccessible_data_segments();
        }
        Ok(())
    }

    /// Moves RSP up by `bytes`, within the stack width.
    pub(crate) fn pop_n(&mut self, bytes: u64) {
        let sp = self.gpr[4].wrapping_add(bytes);
        self.set_stack_pointer(sp);
    }
}
