//! Architectural state of the emulated CPU and its conversion to [`CpuState`].

use std::sync::Arc;

use crate::hypervisor::{CpuState, DescriptorTable, FpuState, Segment};

use super::access::RamWindow;
use super::decode_cache::{BlockCache, CodeWatch, DecodeCache};
use super::flags::{self, FlagOp, LazyFlags};
use super::mmu::Tlb;
use super::msr::Msrs;

/// Index of ES in [`Cpu::seg`]; the order is the encoding order of segment registers.
pub const ES: usize = 0;
/// Index of CS in [`Cpu::seg`].
pub const CS: usize = 1;
/// Index of SS in [`Cpu::seg`].
pub const SS: usize = 2;
/// Index of DS in [`Cpu::seg`].
pub const DS: usize = 3;
/// Index of FS in [`Cpu::seg`].
pub const FS: usize = 4;
/// Index of GS in [`Cpu::seg`].
pub const GS: usize = 5;

/// Protection enable.
pub const CR0_PE: u64 = 1 << 0;
/// Monitor coprocessor: WAIT raises #NM when TS is set.
pub const CR0_MP: u64 = 1 << 1;
/// x87 emulation: x87 and SSE instructions raise #NM or #UD.
pub const CR0_EM: u64 = 1 << 2;
/// Task switched: the next x87 or SSE instruction raises #NM.
pub const CR0_TS: u64 = 1 << 3;
/// Extension type, fixed to 1.
pub const CR0_ET: u64 = 1 << 4;
/// Native x87 error reporting (#MF instead of IRQ 13).
pub const CR0_NE: u64 = 1 << 5;
/// Supervisor writes honour read-only pages.
pub const CR0_WP: u64 = 1 << 16;
/// Alignment mask: with EFLAGS.AC enables #AC at CPL 3.
pub const CR0_AM: u64 = 1 << 18;
/// Not write-through (cache control, ignored).
pub const CR0_NW: u64 = 1 << 29;
/// Cache disable (ignored).
pub const CR0_CD: u64 = 1 << 30;
/// Paging enable.
pub const CR0_PG: u64 = 1 << 31;

/// Time stamp disable: RDTSC at CPL > 0 raises #GP.
pub const CR4_TSD: u64 = 1 << 2;
/// Debugging extensions.
pub const CR4_DE: u64 = 1 << 3;
/// 4 MiB pages in 32-bit paging.
pub const CR4_PSE: u64 = 1 << 4;
/// Physical address extension.
pub const CR4_PAE: u64 = 1 << 5;
/// Page global enable.
pub const CR4_PGE: u64 = 1 << 7;
/// FXSAVE/FXRSTOR and SSE enabled by the OS.
pub const CR4_OSFXSR: u64 = 1 << 9;
/// The OS handles #XM.
pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
/// The CR4 bits that this CPU accepts; setting any other raises #GP.
pub const CR4_SUPPORTED: u64 = CR4_TSD
    | CR4_DE
    | CR4_PSE
    | CR4_PAE
    | (1 << 6) // MCE: accepted and ignored, as no machine checks are raised
    | CR4_PGE
    | (1 << 8) // PCE: accepted, performance counters are not advertised
    | CR4_OSFXSR
    | CR4_OSXMMEXCPT;

/// System call extensions (SYSCALL/SYSRET).
pub const EFER_SCE: u64 = 1 << 0;
/// Long mode enable.
pub const EFER_LME: u64 = 1 << 8;
/// Long mode active.
pub const EFER_LMA: u64 = 1 << 10;
/// No-execute enable.
pub const EFER_NXE: u64 = 1 << 11;

/// x87 FPU state as FXSAVE stores it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct X87 {
    /// Control word.
    pub fcw: u16,
    /// Status word.
    pub fsw: u16,
    /// Abridged tag word: bit i set when ST register i is valid.
    pub ftw: u8,
    /// Last opcode.
    pub fop: u16,
    /// Last instruction pointer.
    pub fip: u64,
    /// Last data pointer.
    pub fdp: u64,
    /// Registers ST0-ST7 (physical order), 80-bit values in the low 10 bytes.
    pub st: [u128; 8],
}

/// Execution mode, derived from CR0.PE, EFER.LMA, EFLAGS.VM and the CS descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Real-address mode.
    Real,
    /// Protected mode (or compatibility mode under long mode) with 16-bit code.
    Protected16,
    /// Protected mode (or compatibility mode under long mode) with 32-bit code.
    Protected32,
    /// 64-bit mode.
    Long64,
}

/// Settings that the platform chooses for a CPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuConfig {
    /// Local APIC id, also reported in CPUID leaf 1.
    pub apic_id: u8,
    /// Whether the platform has a local APIC at `IA32_APIC_BASE`: sets the CPUID APIC bit.
    pub apic: bool,
    /// Time stamp counter frequency in Hz (at most 2^32 - 1), reported in CPUID leaves
    /// 0x15, 0x16 and 0x40000010. Linux also takes the leaf 0x15 crystal frequency as the
    /// local APIC timer frequency (`native_calibrate_tsc` in arch/x86/kernel/tsc.c), so
    /// the LAPIC timer must count at this rate.
    pub tsc_hz: u64,
}

impl Default for CpuConfig {
    fn default() -> Self {
        CpuConfig {
            apic_id: 0,
            apic: true,
            tsc_hz: 1_000_000_000,
        }
    }
}

/// One emulated x86-64 CPU: registers, caches and counters.
pub struct Cpu {
    /// RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8-R15, in encoding order.
    pub gpr: [u64; 16],
    /// Address of the next instruction to execute.
    pub rip: u64,
    /// RFLAGS; the arithmetic bits are valid only while `lazy.op` is `FlagOp::Eager`.
    pub(crate) flags: u64,
    pub(crate) lazy: LazyFlags,
    /// ES, CS, SS, DS, FS, GS with their hidden descriptor caches.
    pub seg: [Segment; 6],
    pub ldtr: Segment,
    pub tr: Segment,
    pub gdtr: DescriptorTable,
    pub idtr: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    /// Task priority (CR8), stored for the platform's local APIC to read.
    pub cr8: u64,
    pub efer: u64,
    /// DR0-DR7; breakpoints are stored but never trigger.
    pub dr: [u64; 8],
    pub(crate) msr: Msrs,
    /// XMM0-XMM15.
    pub xmm: [u128; 16],
    pub mxcsr: u32,
    pub x87: X87,
    pub(crate) config: CpuConfig,

    /// Set after STI, MOV SS and POP SS: interrupts wait one instruction.
    pub(crate) interrupt_shadow: bool,
    /// Set by HLT until an interrupt arrives.
    pub(crate) halted: bool,
    /// Target of the instruction being executed: its end unless it branches.
    pub(crate) next_rip: u64,
    pub(crate) instructions: u64,
    pub(crate) tlb: Tlb,
    pub(crate) decode_cache: DecodeCache,
    pub(crate) blocks: BlockCache,
    pub(crate) code_watch: Arc<CodeWatch>,
    /// Host mapping of the RAM region last accessed, valid only inside `Cpu::run`.
    pub(crate) ram: RamWindow,
    pub(crate) unimplemented_reports: u32,
}

fn real_mode_segment(selector: u16, code: bool) -> Segment {
    Segment {
        selector,
        base: u64::from(selector) << 4,
        limit: 0xffff,
        type_: if code { 0xb } else { 0x3 },
        present: true,
        dpl: 0,
        db: false,
        l: false,
        g: false,
        s: true,
        unusable: false,
    }
}

impl Cpu {
    /// Creates a CPU in the state after RESET: real mode at F000:FFF0 with CS base
    /// 0xFFFF0000.
    ///
    /// `code_watch` covers the guest RAM that this CPU executes from. Share one between
    /// all CPUs and DMA-capable devices of a VM, so that every write to code reaches every
    /// decoded-instruction cache.
    pub fn new(config: CpuConfig, code_watch: Arc<CodeWatch>) -> Self {
        let mut cs = real_mode_segment(0xf000, true);
        cs.base = 0xffff_0000;
        let data = real_mode_segment(0, false);
        let mut cpu = Cpu {
            gpr: [0; 16],
            rip: 0xfff0,
            flags: flags::FIXED,
            lazy: LazyFlags::default(),
            seg: [data, cs, data, data, data, data],
            ldtr: Segment {
                type_: 2,
                present: true,
                limit: 0xffff,
                ..Segment::default()
            },
            tr: Segment {
                type_: 11,
                present: true,
                limit: 0xffff,
                ..Segment::default()
            },
            gdtr: DescriptorTable {
                base: 0,
                limit: 0xffff,
            },
            idtr: DescriptorTable {
                base: 0,
                limit: 0xffff,
            },
            cr0: CR0_ET | CR0_CD | CR0_NW,
            cr2: 0,
            cr3: 0,
            cr4: 0,
            cr8: 0,
            efer: 0,
            dr: [0, 0, 0, 0, 0, 0, 0xffff_0ff0, 0x400],
            msr: Msrs::new(config.apic_id),
            xmm: [0; 16],
            mxcsr: 0x1f80,
            x87: X87 {
                fcw: 0x40,
                ..X87::default()
            },
            config,
            interrupt_shadow: false,
            halted: false,
            next_rip: 0,
            instructions: 0,
            tlb: Tlb::new(),
            decode_cache: DecodeCache::new(),
            blocks: BlockCache::new(),
            code_watch,
            ram: RamWindow::default(),
            unimplemented_reports: 0,
        };
        // Family 6 signature in EDX after reset, as on Intel processors.
        cpu.gpr[2] = 0x600;
        cpu
    }

    /// Puts the CPU in its state after RESET: real mode at F000:FFF0, caches dropped.
    /// Counters and the configuration are kept.
    ///
    /// NOTE: INIT on hardware keeps the x87 and SSE registers and some MSRs, but this
    /// resets them too when used for INIT.
    pub fn reset(&mut self) {
        let fresh = Cpu::new(self.config.clone(), Arc::clone(&self.code_watch));
        let instructions = self.instructions;
        let unimplemented_reports = self.unimplemented_reports;
        *self = fresh;
        self.instructions = instructions;
        self.unimplemented_reports = unimplemented_reports;
    }

    /// Starts an application processor after INIT and a startup IPI with `vector`: real
    /// mode at `vector:0000`, that is at physical address `vector * 4096`.
    pub fn start_up(&mut self, vector: u8) {
        self.reset();
        let selector = u16::from(vector) << 8;
        self.seg[CS] = real_mode_segment(selector, true);
        self.rip = 0;
    }

    /// Returns the number of instructions retired since the CPU was created.
    pub fn instructions(&self) -> u64 {
        self.instructions
    }

    /// Returns how many instruction fetches missed the decode cache and ran the decoder.
    pub fn decode_cache_misses(&self) -> u64 {
        self.decode_cache.misses + self.blocks.misses
    }

    /// Returns the handle through which DMA and other CPUs invalidate decoded code.
    pub fn code_watch(&self) -> &Arc<CodeWatch> {
        &self.code_watch
    }

    /// Returns whether the CPU is stopped in HLT, waiting for an interrupt.
    pub fn is_halted(&self) -> bool {
        self.halted
    }

    /// Returns the current execution mode.
    #[inline]
    pub fn mode(&self) -> Mode {
        if self.cr0 & CR0_PE == 0 {
            Mode::Real
        } else if self.efer & EFER_LMA != 0 && self.seg[CS].l {
            Mode::Long64
        } else if self.seg[CS].db {
            Mode::Protected32
        } else {
            Mode::Protected16
        }
    }

    /// Returns the default code size in bits (16, 32 or 64), as iced-x86 takes it.
    #[inline]
    pub fn code_bits(&self) -> u32 {
        match self.mode() {
            Mode::Real | Mode::Protected16 => 16,
            Mode::Protected32 => 32,
            Mode::Long64 => 64,
        }
    }

    /// Returns the current privilege level.
    #[inline]
    pub fn cpl(&self) -> u8 {
        if self.cr0 & CR0_PE == 0 {
            0
        } else if self.flags & flags::VM != 0 {
            3
        } else {
            self.seg[CS].dpl
        }
    }

    /// Returns whether long mode is active (64-bit or compatibility mode).
    #[inline]
    pub fn long_mode(&self) -> bool {
        self.efer & EFER_LMA != 0
    }

    /// Returns RFLAGS with the arithmetic flags evaluated.
    #[inline]
    pub fn rflags(&self) -> u64 {
        if self.lazy.op == FlagOp::Eager {
            self.flags
        } else {
            (self.flags & !flags::ARITH) | self.lazy.compute()
        }
    }

    /// Replaces RFLAGS; bit 1 is forced on.
    #[inline]
    pub fn set_rflags(&mut self, value: u64) {
        self.flags = value | flags::FIXED;
        self.lazy.op = FlagOp::Eager;
    }

    /// Returns whether the arithmetic flag `flag` is set.
    #[inline]
    pub(crate) fn flag(&self, flag: u64) -> bool {
        self.rflags() & flag != 0
    }

    /// Returns CF without evaluating the other lazy flags.
    #[inline]
    pub(crate) fn carry(&self) -> bool {
        if self.lazy.op == FlagOp::Eager {
            self.flags & flags::CF != 0
        } else {
            self.lazy.carry()
        }
    }

    /// Sets or clears arithmetic flag `flag`, evaluating the lazy flags first.
    #[inline]
    pub(crate) fn set_flag(&mut self, flag: u64, on: bool) {
        let value = self.rflags();
        self.set_rflags(if on { value | flag } else { value & !flag });
    }

    /// Records a flag-setting operation for lazy evaluation.
    #[inline]
    pub(crate) fn set_lazy(&mut self, op: FlagOp, size: u8, dst: u64, src: u64, res: u64) {
        self.lazy = LazyFlags {
            op,
            size,
            dst,
            src,
            res,
            carry_in: false,
        };
    }

    /// Captures the architectural state for snapshots and register dumps.
    pub fn state(&self) -> CpuState {
        let mut xmm = [[0u64; 2]; 16];
        for (out, value) in xmm.iter_mut().zip(self.xmm) {
            *out = [value as u64, (value >> 64) as u64];
        }
        let mut st = [[0u64; 2]; 8];
        for (out, value) in st.iter_mut().zip(self.x87.st) {
            *out = [value as u64, (value >> 64) as u64];
        }
        CpuState {
            gprs: self.gpr,
            rip: self.rip,
            rflags: self.rflags(),
            es: self.seg[ES],
            cs: self.seg[CS],
            ss: self.seg[SS],
            ds: self.seg[DS],
            fs: self.seg[FS],
            gs: self.seg[GS],
            tr: self.tr,
            ldt: self.ldtr,
            gdt: self.gdtr,
            idt: self.idtr,
            cr0: self.cr0,
            cr2: self.cr2,
            cr3: self.cr3,
            cr4: self.cr4,
            cr8: self.cr8,
            efer: self.efer,
            msrs: self.msr.to_list(),
            xmm,
            mxcsr: self.mxcsr,
            fpu: FpuState {
                fcw: self.x87.fcw,
                fsw: self.x87.fsw,
                ftw: self.x87.ftw,
                fop: self.x87.fop,
                fip: self.x87.fip,
                fdp: self.x87.fdp,
                st,
            },
            dr: self.dr,
            interrupt_shadow: self.interrupt_shadow,
            halted: self.halted,
        }
    }

    /// Replaces the architectural state and drops every cached translation and decode.
    ///
    /// MSRs that this CPU does not implement are ignored.
    pub fn set_state(&mut self, state: &CpuState) {
        self.gpr = state.gprs;
        self.rip = state.rip;
        self.set_rflags(state.rflags);
        self.seg = [state.es, state.cs, state.ss, state.ds, state.fs, state.gs];
        self.tr = state.tr;
        self.ldtr = state.ldt;
        self.gdtr = state.gdt;
        self.idtr = state.idt;
        self.cr0 = state.cr0;
        self.cr2 = state.cr2;
        self.cr3 = state.cr3;
        self.cr4 = state.cr4;
        self.cr8 = state.cr8;
        self.efer = state.efer;
        for &(index, value) in &state.msrs {
            self.msr.restore(index, value);
        }
        for (out, value) in self.xmm.iter_mut().zip(state.xmm) {
            *out = u128::from(value[0]) | (u128::from(value[1]) << 64);
        }
        self.mxcsr = state.mxcsr;
        let fpu = &state.fpu;
        self.x87 = X87 {
            fcw: fpu.fcw,
            fsw: fpu.fsw,
            ftw: fpu.ftw,
            fop: fpu.fop,
            fip: fpu.fip,
            fdp: fpu.fdp,
            st: [0; 8],
        };
        for (out, value) in self.x87.st.iter_mut().zip(fpu.st) {
            *out = u128::from(value[0]) | (u128::from(value[1]) << 64);
        }
        self.dr = state.dr;
        self.interrupt_shadow = state.interrupt_shadow;
        self.halted = state.halted;
        self.tlb.flush_all();
        self.decode_cache.clear();
        self.blocks.clear();
    }
}
