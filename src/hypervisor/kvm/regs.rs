//! Conversion between the backend-neutral [`CpuState`] and KVM's register structures.

use kvm_bindings::{kvm_dtable, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs};

use crate::hypervisor::{CpuState, DescriptorTable, Segment};

/// IA32_TSC.
pub const MSR_IA32_TSC: u32 = 0x10;
/// IA32_APIC_BASE.
pub const MSR_IA32_APIC_BASE: u32 = 0x1b;
/// IA32_SYSENTER_CS, then _ESP and _EIP at the next two indices.
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
/// IA32_MISC_ENABLE.
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// IA32_PAT.
pub const MSR_IA32_CR_PAT: u32 = 0x277;
/// IA32_MTRR_DEF_TYPE.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// SYSCALL target selectors, 64-bit and compatibility-mode targets, and RFLAGS mask.
pub const MSR_STAR: u32 = 0xc000_0081;
pub const MSR_LSTAR: u32 = 0xc000_0082;
pub const MSR_CSTAR: u32 = 0xc000_0083;
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// The GS base that SWAPGS exchanges with GS.base.
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// MSRs that [`CpuState::msrs`] carries on KVM, in the order `state()` returns them.
/// EFER, FS.base and GS.base are carried in their own fields instead.
pub const STATE_MSRS: [u32; 13] = [
    MSR_IA32_TSC,
    MSR_IA32_APIC_BASE,
    MSR_IA32_SYSENTER_CS,
    MSR_IA32_SYSENTER_ESP,
    MSR_IA32_SYSENTER_EIP,
    MSR_IA32_MISC_ENABLE,
    MSR_IA32_CR_PAT,
    MSR_MTRR_DEF_TYPE,
    MSR_STAR,
    MSR_LSTAR,
    MSR_CSTAR,
    MSR_SYSCALL_MASK,
    MSR_KERNEL_GS_BASE,
];

/// IA32_MISC_ENABLE bit 0: fast string operations enabled, as firmware leaves it.
pub const MISC_ENABLE_FAST_STRING: u64 = 1;
/// IA32_MTRR_DEF_TYPE: MTRRs enabled (bit 11) with write-back (6) as the default type,
/// so RAM without a variable MTRR is cacheable.
pub const MTRR_DEF_TYPE_ENABLED_WB: u64 = (1 << 11) | 6;

/// Returns the MSR values a vCPU starts with, as firmware would leave them.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_LSTAR, 0),
        (MSR_CSTAR, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_DEF_TYPE_ENABLED_WB),
    ]
    .into_iter()
    .map(|(index, data)| msr_entry(index, data))
    .collect()
}

/// Returns a KVM MSR entry for `index` set to `data`.
pub fn msr_entry(index: u32, data: u64) -> kvm_msr_entry {
    kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }
}

/// Copies the general-purpose registers, RIP and RFLAGS of `state` into a `kvm_regs`.
pub fn to_kvm_regs(state: &CpuState) -> kvm_regs {
    let g = &state.gprs;
    kvm_regs {
        rax: g[0],
        rcx: g[1],
        rdx: g[2],
        rbx: g[3],
        rsp: g[4],
        rbp: g[5],
        rsi: g[6],
        rdi: g[7],
        r8: g[8],
        r9: g[9],
        r10: g[10],
        r11: g[11],
        r12: g[12],
        r13: g[13],
        r14: g[14],
        r15: g[15],
        rip: state.rip,
        rflags: state.rflags,
    }
}

/// Copies a `kvm_regs` into the general-purpose registers, RIP and RFLAGS of `state`.
pub fn from_kvm_regs(regs: &kvm_regs, state: &mut CpuState) {
    state.gprs = [
        regs.rax, regs.rcx, regs.rdx, regs.rbx, regs.rsp, regs.rbp, regs.rsi, regs.rdi, regs.r8,
        regs.r9, regs.r10, regs.r11, regs.r12, regs.r13, regs.r14, regs.r15,
    ];
    state.rip = regs.rip;
    state.rflags = regs.rflags;
}

/// Writes the segments, descriptor tables, control registers and EFER of `state` into
/// `sregs`. The APIC base and the pending-interrupt bitmap keep their values in `sregs`.
pub fn to_kvm_sregs(state: &CpuState, sregs: &mut kvm_sregs) {
    sregs.cs = to_kvm_segment(&state.cs);
    sregs.ds = to_kvm_segment(&state.ds);
    sregs.es = to_kvm_segment(&state.es);
    sregs.fs = to_kvm_segment(&state.fs);
    sregs.gs = to_kvm_segment(&state.gs);
    sregs.ss = to_kvm_segment(&state.ss);
    sregs.tr = to_kvm_segment(&state.tr);
    sregs.ldt = to_kvm_segment(&state.ldt);
    sregs.gdt = to_kvm_dtable(&state.gdt);
    sregs.idt = to_kvm_dtable(&state.idt);
    sregs.cr0 = state.cr0;
    sregs.cr2 = state.cr2;
    sregs.cr3 = state.cr3;
    sregs.cr4 = state.cr4;
    sregs.cr8 = state.cr8;
    sregs.efer = state.efer;
}

/// Copies the segments, descriptor tables, control registers and EFER of `sregs` into
/// `state`.
pub fn from_kvm_sregs(sregs: &kvm_sregs, state: &mut CpuState) {
    state.cs = from_kvm_segment(&sregs.cs);
    state.ds = from_kvm_segment(&sregs.ds);
    state.es = from_kvm_segment(&sregs.es);
    state.fs = from_kvm_segment(&sregs.fs);
    state.gs = from_kvm_segment(&sregs.gs);
    state.ss = from_kvm_segment(&sregs.ss);
    state.tr = from_kvm_segment(&sregs.tr);
    state.ldt = from_kvm_segment(&sregs.ldt);
    state.gdt = from_kvm_dtable(&sregs.gdt);
    state.idt = from_kvm_dtable(&sregs.idt);
    state.cr0 = sregs.cr0;
    state.cr2 = sregs.cr2;
    state.cr3 = sregs.cr3;
    state.cr4 = sregs.cr4;
    state.cr8 = sregs.cr8;
    state.efer = sregs.efer;
}

fn to_kvm_segment(segment: &Segment) -> kvm_segment {
    kvm_segment {
        base: segment.base,
        limit: segment.limit,
        selector: segment.selector,
        type_: segment.type_,
        present: u8::from(segment.present),
        dpl: segment.dpl,
        db: u8::from(segment.db),
        s: u8::from(segment.s),
        l: u8::from(segment.l),
        g: u8::from(segment.g),
        avl: 0,
        unusable: u8::from(segment.unusable),
        padding: 0,
    }
}

fn from_kvm_segment(segment: &kvm_segment) -> Segment {
    Segment {
        selector: segment.selector,
        base: segment.base,
        limit: segment.limit,
        type_: segment.type_,
        present: segment.present != 0,
        dpl: segment.dpl,
        db: segment.db != 0,
        l: segment.l != 0,
        g: segment.g != 0,
        s: segment.s != 0,
        unusable: segment.unusable != 0,
    }
}

fn to_kvm_dtable(table: &DescriptorTable) -> kvm_dtable {
    kvm_dtable {
        base: table.base,
        limit: table.limit,
        padding: [0; 3],
    }
}

fn from_kvm_dtable(table: &kvm_dtable) -> DescriptorTable {
    DescriptorTable {
        base: table.base,
        limit: table.limit,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_state() -> CpuState {
        let mut state = CpuState::default();
        for (i, gpr) in state.gprs.iter_mut().enumerate() {
            *gpr = 0x0101_0000_0000_0000 * (i as u64 + 1) + i as u64;
        }
        state.rip = 0xffff_ffff_8100_0000;
        state.rflags = 0x246;
        state.cs = Segment {
            selector: 0x10,
            limit: 0xffff_ffff,
            type_: 0xb,
            present: true,
            l: true,
            g: true,
            s: true,
            ..Segment::default()
        };
        state.ss = Segment {
            selector: 0x18,
            base: 0x1234,
            limit: 0xfffff,
            type_: 0x3,
            present: true,
            db: true,
            s: true,
            dpl: 3,
            ..Segment::default()
        };
        state.ldt.unusable = true;
        state.gdt = DescriptorTable {
            base: 0x500,
            limit: 0x1f,
        };
        state.idt = DescriptorTable {
            base: 0x600,
            limit: 0xfff,
        };
        state.cr0 = 0x8000_0011;
        state.cr2 = 0xdead_b000;
        state.cr3 = 0x9000;
        state.cr4 = 0x20;
        state.cr8 = 0xf;
        state.efer = 0x500;
        state
    }

    #[test]
    fn regs_round_trip() {
        let state = sample_state();

        let regs = to_kvm_regs(&state);
        let mut back = CpuState::default();
        from_kvm_regs(&regs, &mut back);

        assert_eq!(regs.rbx, state.gprs[3], "RBX is encoding slot 3");
        assert_eq!(regs.rsp, state.gprs[4], "RSP is encoding slot 4");
        assert_eq!(back.gprs, state.gprs);
        assert_eq!(back.rip, state.rip);
        assert_eq!(back.rflags, state.rflags);
    }

    #[test]
    fn sregs_round_trip() {
        let state = sample_state();
        let mut sregs = kvm_sregs {
            apic_base: 0xfee0_0900,
            ..Default::default()
        };

        to_kvm_sregs(&state, &mut sregs);
        let mut back = CpuState::default();
        from_kvm_sregs(&sregs, &mut back);

        assert_eq!(sregs.apic_base, 0xfee0_0900, "APIC base is left alone");
        assert_eq!(sregs.cs.l, 1);
        assert_eq!(sregs.ss.dpl, 3);
        assert_eq!(back.cs, state.cs);
        assert_eq!(back.ss, state.ss);
        assert_eq!(back.ldt, state.ldt);
        assert_eq!(back.gdt, state.gdt);
        assert_eq!(back.idt, state.idt);
        assert_eq!(
            [back.cr0, back.cr2, back.cr3, back.cr4, back.cr8, back.efer],
            [state.cr0, state.cr2, state.cr3, state.cr4, state.cr8, state.efer]
        );
    }
}
