//! Model-specific registers: the set that Linux and its boot code use.
//!
//! RDMSR and WRMSR of any other index raise #GP(0), which Linux's `rdmsr_safe` and
//! `wrmsr_safe` catch. FS_BASE and GS_BASE live in the segment registers.

use super::bus::CpuBus;
use super::exceptions::Exception;
use super::state::{Cpu, CR0_PG, EFER_LMA, EFER_LME, EFER_NXE, EFER_SCE, FS, GS};

pub const IA32_PLATFORM_ID: u32 = 0x17;
pub const IA32_TSC: u32 = 0x10;
pub const IA32_APIC_BASE: u32 = 0x1b;
pub const IA32_FEATURE_CONTROL: u32 = 0x3a;
pub const IA32_BIOS_SIGN_ID: u32 = 0x8b;
pub const IA32_SYSENTER_CS: u32 = 0x174;
pub const IA32_SYSENTER_ESP: u32 = 0x175;
pub const IA32_SYSENTER_EIP: u32 = 0x176;
pub const IA32_MISC_ENABLE: u32 = 0x1a0;
pub const IA32_DEBUGCTL: u32 = 0x1d9;
pub const IA32_PAT: u32 = 0x277;
pub const IA32_EFER: u32 = 0xc000_0080;
pub const IA32_STAR: u32 = 0xc000_0081;
pub const IA32_LSTAR: u32 = 0xc000_0082;
pub const IA32_CSTAR: u32 = 0xc000_0083;
pub const IA32_FMASK: u32 = 0xc000_0084;
pub const IA32_FS_BASE: u32 = 0xc000_0100;
pub const IA32_GS_BASE: u32 = 0xc000_0101;
pub const IA32_KERNEL_GS_BASE: u32 = 0xc000_0102;
pub const IA32_TSC_AUX: u32 = 0xc000_0103;

/// APIC_BASE bit 8: this is the bootstrap processor.
const APIC_BASE_BSP: u64 = 1 << 8;
/// APIC_BASE bit 11: the local APIC is enabled.
const APIC_BASE_ENABLE: u64 = 1 << 11;
/// MISC_ENABLE after reset: fast strings, no branch trace store, no PEBS.
const MISC_ENABLE_DEFAULT: u64 = 1 | (1 << 11) | (1 << 12);
/// PAT after reset: WB, WT, UC-, UC, repeated.
const PAT_DEFAULT: u64 = 0x0007_0406_0007_0406;

/// Storage for the MSRs that are not part of another register.
#[derive(Debug, Clone, Default)]
pub struct Msrs {
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub fmask: u64,
    pub kernel_gs_base: u64,
    /// Added to the bus's counter to form the guest TSC; WRMSR to IA32_TSC changes it.
    pub tsc_offset: u64,
    pub tsc_aux: u64,
    pub apic_base: u64,
    pub pat: u64,
    pub misc_enable: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
    pub debugctl: u64,
}

/// Returns whether `value` is a canonical 48-bit linear address.
#[inline]
pub fn is_canonical(value: u64) -> bool {
    ((value as i64) << 16 >> 16) as u64 == value
}

impl Msrs {
    /// Returns the MSRs after RESET of the CPU with local APIC id `apic_id`.
    pub fn new(apic_id: u8) -> Self {
        let bsp = if apic_id == 0 { APIC_BASE_BSP } else { 0 };
        Msrs {
            apic_base: crate::core::memory::LAPIC_BASE | APIC_BASE_ENABLE | bsp,
            pat: PAT_DEFAULT,
            misc_enable: MISC_ENABLE_DEFAULT,
            ..Msrs::default()
        }
    }

    /// Lists the stored MSRs as (index, value) pairs for a snapshot.
    pub fn to_list(&self) -> Vec<(u32, u64)> {
        vec![
            (IA32_STAR, self.star),
            (IA32_LSTAR, self.lstar),
            (IA32_CSTAR, self.cstar),
            (IA32_FMASK, self.fmask),
            (IA32_KERNEL_GS_BASE, self.kernel_gs_base),
            (IA32_TSC_AUX, self.tsc_aux),
            (IA32_APIC_BASE, self.apic_base),
            (IA32_PAT, self.pat),
            (IA32_MISC_ENABLE, self.misc_enable),
            (IA32_SYSENTER_CS, self.sysenter_cs),
            (IA32_SYSENTER_ESP, self.sysenter_esp),
            (IA32_SYSENTER_EIP, self.sysenter_eip),
            (IA32_DEBUGCTL, self.debugctl),
        ]
    }

    /// Restores one MSR from a snapshot; returns false for an index not stored here.
    pub fn restore(&mut self, index: u32, value: u64) -> bool {
        let slot = match index {
            IA32_STAR => &mut self.star,
            IA32_LSTAR => &mut self.lstar,
            IA32_CSTAR => &mut self.cstar,
            IA32_FMASK => &mut self.fmask,
            IA32_KERNEL_GS_BASE => &mut self.kernel_gs_base,
            IA32_TSC_AUX => &mut self.tsc_aux,
            IA32_APIC_BASE => &mut self.apic_base,
            IA32_PAT => &mut self.pat,
            IA32_MISC_ENABLE => &mut self.misc_enable,
            IA32_SYSENTER_CS => &mut self.sysenter_cs,
            IA32_SYSENTER_ESP => &mut self.sysenter_esp,
            IA32_SYSENTER_EIP => &mut self.sysenter_eip,
            IA32_DEBUGCTL => &mut self.debugctl,
            _ => return false,
        };
        *slot = value;
        true
    }
}

impl Cpu {
    /// Returns `IA32_APIC_BASE`: where the platform maps this CPU's local APIC.
    pub fn apic_base(&self) -> u64 {
        self.msr.apic_base
    }

    /// Returns the guest TSC: the bus counter plus the offset that WRMSR set.
    pub(crate) fn read_tsc(&mut self, bus: &mut dyn CpuBus) -> u64 {
        bus.tsc().wrapping_add(self.msr.tsc_offset)
    }

    /// Executes RDMSR of `index`; unknown indices raise #GP(0).
    pub(crate) fn read_msr(&mut self, bus: &mut dyn CpuBus, index: u32) -> Result<u64, Exception> {
        let value = match index {
            IA32_TSC => self.read_tsc(bus),
            IA32_PLATFORM_ID => 0,
            IA32_APIC_BASE => self.msr.apic_base,
            // Locked with VMX off, so Linux does not try to enable it.
            IA32_FEATURE_CONTROL => 1,
            IA32_BIOS_SIGN_ID => 0,
            IA32_SYSENTER_CS => self.msr.sysenter_cs,
            IA32_SYSENTER_ESP => self.msr.sysenter_esp,
            IA32_SYSENTER_EIP => self.msr.sysenter_eip,
            IA32_MISC_ENABLE => self.msr.misc_enable,
            IA32_DEBUGCTL => self.msr.debugctl,
            IA32_PAT => self.msr.pat,
            IA32_EFER => self.efer,
            IA32_STAR => self.msr.star,
            IA32_LSTAR => self.msr.lstar,
            IA32_CSTAR => self.msr.cstar,
            IA32_FMASK => self.msr.fmask,
            IA32_FS_BASE => self.seg[FS].base,
            IA32_GS_BASE => self.seg[GS].base,
            IA32_KERNEL_GS_BASE => self.msr.kernel_gs_base,
            IA32_TSC_AUX => self.msr.tsc_aux,
            _ => return Err(Exception::gp(0)),
        };
        Ok(value)
    }

    /// Executes WRMSR of `value` to `index`; unknown indices and reserved bits raise
    /// #GP(0).
    pub(crate) fn write_msr(
        &mut self,
        bus: &mut dyn CpuBus,
        index: u32,
        value: u64,
    ) -> Result<(), Exception> {
        let canonical = || {
            if is_canonical(value) {
                Ok(value)
            } else {
                Err(Exception::gp(0))
            }
        };
        match index {
            IA32_TSC => self.msr.tsc_offset = value.wrapping_sub(bus.tsc()),
            IA32_APIC_BASE => {
                // Bit 10 (x2APIC) is not advertised, so it is reserved like bits 0-7.
                let reserved = 0xff | (1 << 10) | !((1u64 << 40) - 1);
                if value & reserved != 0 {
                    return Err(Exception::gp(0));
                }
                self.msr.apic_base = value;
            }
            IA32_BIOS_SIGN_ID => {}
            IA32_SYSENTER_CS => self.msr.sysenter_cs = value & 0xffff,
            IA32_SYSENTER_ESP => self.msr.sysenter_esp = canonical()?,
            IA32_SYSENTER_EIP => self.msr.sysenter_eip = canonical()?,
            IA32_MISC_ENABLE => self.msr.misc_enable = value,
            IA32_DEBUGCTL => {
                // Only the bits with no effect here (LBR and BTF) are accepted.
                if value & !0x3 != 0 {
                    return Err(Exception::gp(0));
                }
                self.msr.debugctl = value;
            }
            IA32_PAT => {
                let valid = (0..8).all(|i| matches!((value >> (i * 8)) & 0xff, 0 | 1 | 4..=7));
                if !valid {
                    return Err(Exception::gp(0));
                }
                self.msr.pat = value;
            }
            IA32_EFER => self.write_efer(value)?,
            IA32_STAR => self.msr.star = value,
            IA32_LSTAR => self.msr.lstar = canonical()?,
            IA32_CSTAR => self.msr.cstar = canonical()?,
            IA32_FMASK => self.msr.fmask = value & 0xffff_ffff,
            IA32_FS_BASE => self.seg[FS].base = canonical()?,
            IA32_GS_BASE => self.seg[GS].base = canonical()?,
            IA32_KERNEL_GS_BASE => self.msr.kernel_gs_base = canonical()?,
            IA32_TSC_AUX => self.msr.tsc_aux = value & 0xffff_ffff,
            _ => return Err(Exception::gp(0)),
        }
        Ok(())
    }

    fn write_efer(&mut self, value: u64) -> Result<(), Exception> {
        if value & !(EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE) != 0 {
            return Err(Exception::gp(0));
        }
        // LME cannot change while paging is on; LMA is read-only and follows CR0.PG.
        let paging = self.cr0 & CR0_PG != 0;
        if paging && (value ^ self.efer) & EFER_LME != 0 {
            return Err(Exception::gp(0));
        }
        let value = (value & !EFER_LMA) | (self.efer & EFER_LMA);
        if (value ^ self.efer) & EFER_NXE != 0 {
            self.tlb.flush_all();
        }
        self.efer = value;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_addresses() {
        assert!(is_canonical(0x0000_7fff_ffff_ffff));
        assert!(is_canonical(0xffff_8000_0000_0000));
        assert!(!is_canonical(0x0000_8000_0000_0000));
    }
}
