//! Conversion between the backend-neutral [`CpuState`] and KVM's register structures.

use kvm_bindings::{
    kvm_debugregs, kvm_dtable, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs,
};

use crate::hypervisor::{CpuState, DescriptorTable, FpuState, Segment};

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

/// Returns the x87 and SSE state of `state` as a `kvm_fpu`.
pub fn to_kvm_fpu(state: &CpuState) -> kvm_fpu {
    let fpu = &state.fpu;
    let mut kvm = kvm_fpu {
        fcw: fpu.fcw,
        fsw: fpu.fsw,
        ftwx: fpu.ftw,
        last_opcode: fpu.fop,
        last_ip: fpu.fip,
        last_dp: fpu.fdp,
        mxcsr: state.mxcsr,
        ..Default::default()
    };
    for (register, halves) in kvm.fpr.iter_mut().zip(&fpu.st) {
        *register = halves_to_bytes(halves);
    }
    for (register, halves) in kvm.xmm.iter_mut().zip(&state.xmm) {
        *register = halves_to_bytes(halves);
    }
    kvm
}

/// Copies the x87 and SSE state of `kvm` into `state`.
pub fn from_kvm_fpu(kvm: &kvm_fpu, state: &mut CpuState) {
    state.fpu = FpuState {
        fcw: kvm.fcw,
        fsw: kvm.fsw,
        ftw: kvm.ftwx,
        fop: kvm.last_opcode,
        fip: kvm.last_ip,
        fdp: kvm.last_dp,
        st: kvm.fpr.map(|register| bytes_to_halves(&register)),
    };
    state.xmm = kvm.xmm.map(|register| bytes_to_halves(&register));
    state.mxcsr = kvm.mxcsr;
}

/// Size of the FXSAVE area, which is also the legacy area at the start of an XSAVE area.
pub const FXSAVE_AREA_BYTES: usize = 512;

/// Writes the x87 and SSE state of `state` into `area` in the 64-bit FXSAVE layout.
///
/// The layout has FCW at byte 0, FSW at 2, the abridged FTW at 4, FOP at 6, FIP at 8,
/// FDP at 16 and MXCSR at 24, then ST0-ST7 from 32 and XMM0-XMM15 from 160, 16 bytes
/// each. Other bytes, such as MXCSR_MASK at 28, keep their values.
pub fn to_fxsave_area(state: &CpuState, area: &mut [u8; FXSAVE_AREA_BYTES]) {
    let fpu = &state.fpu;
    area[0..2].copy_from_slice(&fpu.fcw.to_le_bytes());
    area[2..4].copy_from_slice(&fpu.fsw.to_le_bytes());
    area[4] = fpu.ftw;
    area[6..8].copy_from_slice(&fpu.fop.to_le_bytes());
    area[8..16].copy_from_slice(&fpu.fip.to_le_bytes());
    area[16..24].copy_from_slice(&fpu.fdp.to_le_bytes());
    area[24..28].copy_from_slice(&state.mxcsr.to_le_bytes());
    for (i, register) in fpu.st.iter().enumerate() {
        area[32 + 16 * i..48 + 16 * i].copy_from_slice(&halves_to_bytes(register));
    }
    for (i, register) in state.xmm.iter().enumerate() {
        area[160 + 16 * i..176 + 16 * i].copy_from_slice(&halves_to_bytes(register));
    }
}

/// Copies the x87 and SSE state from `area`, in the layout of [`to_fxsave_area`], into
/// `state`.
pub fn from_fxsave_area(area: &[u8; FXSAVE_AREA_BYTES], state: &mut CpuState) {
    let u16_at = |offset: usize| u16::from_le_bytes([area[offset], area[offset + 1]]);
    let u64_at = |offset: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&area[offset..offset + 8]);
        u64::from_le_bytes(bytes)
    };
    let register_at = |offset: usize| {
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&area[offset..offset + 16]);
        bytes_to_halves(&bytes)
    };

    state.fpu = FpuState {
        fcw: u16_at(0),
        fsw: u16_at(2),
        ftw: area[4],
        fop: u16_at(6),
        fip: u64_at(8),
        fdp: u64_at(16),
        st: std::array::from_fn(|i| register_at(32 + 16 * i)),
    };
    state.mxcsr = u32::from_le_bytes([area[24], area[25], area[26], area[27]]);
    state.xmm = std::array::from_fn(|i| register_at(160 + 16 * i));
}

/// Returns DR0-DR3, DR6 and DR7 of `state` as `kvm_debugregs`. DR4 and DR5 alias DR6
/// and DR7, so they are not stored.
pub fn to_kvm_debugregs(state: &CpuState) -> kvm_debugregs {
    kvm_debugregs {
        db: [state.dr[0], state.dr[1], state.dr[2], state.dr[3]],
        dr6: state.dr[6],
        dr7: state.dr[7],
        ..Default::default()
    }
}

/// Copies `kvm`'s debug registers into `state.dr`, leaving DR4 and DR5 zero.
pub fn from_kvm_debugregs(kvm: &kvm_debugregs, state: &mut CpuState) {
    state.dr = [
        kvm.db[0], kvm.db[1], kvm.db[2], kvm.db[3], 0, 0, kvm.dr6, kvm.dr7,
    ];
}

/// Returns a 128-bit register stored as (low, high) halves in little-endian bytes.
fn halves_to_bytes(halves: &[u64; 2]) -> [u8; 16] {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&halves[0].to_le_bytes());
    bytes[8..].copy_from_slice(&halves[1].to_le_bytes());
    bytes
}

/// Returns 16 little-endian bytes as (low, high) 64-bit halves.
fn bytes_to_halves(bytes: &[u8; 16]) -> [u64; 2] {
    let mut low = [0u8; 8];
    let mut high = [0u8; 8];
    low.copy_from_slice(&bytes[..8]);
    high.copy_from_slice(&bytes[8..]);
    [u64::from_le_bytes(low), u64::from_le_bytes(high)]
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
    fn fpu_round_trip() {
        let mut xmm = [[0; 2]; 16];
        xmm[15] = [0x0102_0304_0506_0708, 0x1112_1314_1516_1718];
        let state = CpuState {
            fpu: FpuState {
                fcw: 0x37f,
                fsw: 0x3800,
                ftw: 0x81,
                fop: 0x1d9,
                fip: 0xffff_8000_0000_1234,
                fdp: 0x5678,
                st: [[0x8000_0000_0000_0000, 0x3fff]; 8],
            },
            xmm,
            mxcsr: 0x1f80,
            ..CpuState::default()
        };

        let kvm = to_kvm_fpu(&state);
        let mut back = CpuState::default();
        from_kvm_fpu(&kvm, &mut back);

        assert_eq!(kvm.xmm[15][0], 0x08, "XMM bytes are little-endian");
        assert_eq!(kvm.xmm[15][15], 0x11);
        assert_eq!(kvm.fpr[0][9], 0x3f, "the exponent is in bytes 8 and 9");
        assert_eq!(back.fpu, state.fpu);
        assert_eq!(back.xmm, state.xmm);
        assert_eq!(back.mxcsr, state.mxcsr);
    }

    #[test]
    fn fxsave_area_round_trip() {
        let mut xmm = [[0; 2]; 16];
        xmm[1] = [0x0102_0304_0506_0708, 0x1112_1314_1516_1718];
        let state = CpuState {
            fpu: FpuState {
                fcw: 0x27f,
                fsw: 0x0100,
                ftw: 0x01,
                fop: 0x7ff,
                fip: 0x1234_5678_9abc,
                fdp: 0xdef0,
                st: [[1, 2]; 8],
            },
            xmm,
            mxcsr: 0x9fc0,
            ..CpuState::default()
        };
        let mut area = [0u8; FXSAVE_AREA_BYTES];
        area[28..32].copy_from_slice(&0xffffu32.to_le_bytes());

        to_fxsave_area(&state, &mut area);
        let mut back = CpuState::default();
        from_fxsave_area(&area, &mut back);

        assert_eq!(area[0..2], [0x7f, 0x02], "FCW at 0");
        assert_eq!(area[24..28], [0xc0, 0x9f, 0, 0], "MXCSR at 24");
        assert_eq!(area[28..32], [0xff, 0xff, 0, 0], "MXCSR_MASK kept");
        assert_eq!(area[176], 0x08, "XMM1 starts at 176");
        assert_eq!(back.fpu, state.fpu);
        assert_eq!(back.xmm, state.xmm);
        assert_eq!(back.mxcsr, state.mxcsr);
    }

    #[test]
    fn debugregs_round_trip() {
        let state = CpuState {
            dr: [1, 2, 3, 4, 0, 0, 0xffff_0ff0, 0x401],
            ..CpuState::default()
        };

        let kvm = to_kvm_debugregs(&state);
        let mut back = CpuState::default();
        from_kvm_debugregs(&kvm, &mut back);

        assert_eq!(kvm.dr7, 0x401);
        assert_eq!(back.dr, state.dr);
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
