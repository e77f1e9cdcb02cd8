//! x87 control instructions, MMX state reset and the FXSAVE/FXRSTOR and MXCSR family.
//!
//! The x87 setup instructions live here (FNINIT, FLDCW, FNSTCW, FNSTSW, FNCLEX, FWAIT);
//! data movement and arithmetic live in `x87_arith`.

use iced_x86::{Code, Instruction, Mnemonic, OpKind};

use super::{segment_index, Exec};
use crate::core::cpu::access::Privilege;
use crate::core::cpu::bus::CpuBus;
use crate::core::cpu::exceptions::Exception;
use crate::core::cpu::state::{Cpu, Mode, CR0_EM, CR0_MP, CR0_TS, CR4_OSFXSR, X87};

/// MXCSR bits that software may set: flags, DAZ, masks, rounding and flush-to-zero.
pub(crate) const MXCSR_MASK: u32 = 0xffff;

impl Cpu {
    /// Raises #UD or #NM as CR0.EM and CR0.TS require before an x87 instruction.
    fn check_x87(&self) -> Result<(), Exception> {
        if self.cr0 & (CR0_EM | CR0_TS) != 0 {
            return Err(Exception::nm());
        }
        Ok(())
    }

    /// Raises #UD or #NM as CR0 and CR4 require before an SSE instruction.
    pub(crate) fn check_sse(&self) -> Result<(), Exception> {
        if self.cr0 & CR0_EM != 0 || self.cr4 & CR4_OSFXSR == 0 {
            return Err(Exception::ud());
        }
        if self.cr0 & CR0_TS != 0 {
            return Err(Exception::nm());
        }
        Ok(())
    }

    pub(super) fn exec_x87(&mut self, bus: &mut dyn CpuBus, insn: &Instruction) -> Exec {
        let mnemonic = insn.mnemonic();
        match mnemonic {
            Mnemonic::Wait => {
                if self.cr0 & (CR0_MP | CR0_TS) == (CR0_MP | CR0_TS) {
                    return Err(Exception::nm().into());
                }
                return Ok(());
            }
            Mnemonic::Ldmxcsr | Mnemonic::Stmxcsr => {
                self.check_sse()?;
                let seg = segment_index(insn.memory_segment());
                let address = self.effective_address(insn);
                if mnemonic == Mnemonic::Stmxcsr {
                    return self.write(bus, seg, address, 4, u64::from(self.mxcsr));
                }
                let value = self.read(bus, seg, address, 4)? as u32;
                if value & !MXCSR_MASK != 0 {
                    return Err(Exception::gp(0).into());
                }
                self.mxcsr = value;
                return Ok(());
            }
            Mnemonic::Fxsave | Mnemonic::Fxsave64 | Mnemonic::Fxrstor | Mnemonic::Fxrstor64 => {
                if self.cr0 & CR0_EM != 0 {
                    return Err(Exception::ud().into());
                }
                if self.cr0 & CR0_TS != 0 {
                    return Err(Exception::nm().into());
                }
                return self.exec_fxsave(bus, insn);
            }
            _ => {}
        }
        self.check_x87()?;
        match mnemonic {
            Mnemonic::Fninit => {
                self.x87 = X87 {
                    fcw: 0x37f,
                    ..X87 {
                        st: self.x87.st,
                        ..X87::default()
                    }
                };
            }
            Mnemonic::Fnclex => self.x87.fsw &= !0x80ff,
            Mnemonic::Emms => self.x87.ftw = 0,
            Mnemonic::Fldcw => {
                let value = self.read_operand(bus, insn, 0, 2)?;
                self.x87.fcw = value as u16;
            }
            Mnemonic::Fnstcw => self.write_operand(bus, insn, 0, 2, u64::from(self.x87.fcw))?,
            _ => {
                // FNSTSW to AX or to memory.
                let value = u64::from(self.x87.fsw);
                if insn.op_kind(0) == OpKind::Register {
                    self.set_reg(insn.op_register(0), value);
                } else {
                    self.write_operand(bus, insn, 0, 2, value)?;
                }
            }
        }
        Ok(())
    }

    /// FXSAVE and FXRSTOR of the 512-byte area: x87 environment and registers, MXCSR and
    /// the XMM registers (8 of them outside 64-bit mode).
    fn exec_fxsave(&mut self, bus: &mut dyn CpuBus, insn: &Instruction) -> Exec {
        let seg = segment_index(insn.memory_segment());
        let address = self.effective_address(insn);
        let linear = self.linear(seg, address)?;
        if linear & 15 != 0 {
            return Err(Exception::gp(0).into());
        }
        let wide = matches!(
            insn.code(),
            Code::Fxsave64_m512byte | Code::Fxrstor64_m512byte
        );
        let xmm_count = if self.mode() == Mode::Long64 { 16 } else { 8 };
        let mut area = [0u8; 512];
        let save = matches!(insn.mnemonic(), Mnemonic::Fxsave | Mnemonic::Fxsave64);
        if save {
            area[0..2].copy_from_slice(&self.x87.fcw.to_le_bytes());
            area[2..4].copy_from_slice(&self.x87.fsw.to_le_bytes());
            area[4] = self.x87.ftw;
            area[6..8].copy_from_slice(&self.x87.fop.to_le_bytes());
            if wide {
                area[8..16].copy_from_slice(&self.x87.fip.to_le_bytes());
                area[16..24].copy_from_slice(&self.x87.fdp.to_le_bytes());
            } else {
                area[8..12].copy_from_slice(&(self.x87.fip as u32).to_le_bytes());
                area[16..20].copy_from_slice(&(self.x87.fdp as u32).to_le_bytes());
            }
            area[24..28].copy_from_slice(&self.mxcsr.to_le_bytes());
            area[28..32].copy_from_slice(&MXCSR_MASK.to_le_bytes());
            for (i, st) in self.x87.st.iter().enumerate() {
                area[32 + i * 16..42 + i * 16].copy_from_slice(&st.to_le_bytes()[..10]);
            }
            for (i, xmm) in self.xmm[..xmm_count].iter().enumerate() {
                area[160 + i * 16..176 + i * 16].copy_from_slice(&xmm.to_le_bytes());
            }
            self.write_linear(bus, linear, &area, Privilege::Current)?;
            return Ok(());
        }

        self.read_linear(bus, linear, &mut area, Privilege::Current)?;
        let u16_at = |i: usize| u16::from_le_bytes([area[i], area[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes(area[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(area[i..i + 8].try_into().expect("8 bytes"));
        let mxcsr = u32_at(24);
        if mxcsr & !MXCSR_MASK != 0 {
            return Err(Exception::gp(0).into());
        }
        self.x87.fcw = u16_at(0);
        self.x87.fsw = u16_at(2);
        self.x87.ftw = area[4];
        self.x87.fop = u16_at(6);
        self.x87.fip = if wide {
            u64_at(8)
        } else {
            u64::from(u32_at(8))
        };
        self.x87.fdp = if wide {
            u64_at(16)
        } else {
            u64::from(u32_at(16))
        };
        self.mxcsr = mxcsr;
        for i in 0..8 {
            let mut bytes = [0u8; 16];
            bytes[..10].copy_from_slice(&area[32 + i * 16..42 + i * 16]);
            self.x87.st[i] = u128::from_le_bytes(bytes);
        }
        for i in 0..xmm_count {
            self.xmm[i] = u128::from_le_bytes(
                area[160 + i * 16..176 + i * 16]
                    .try_into()
                    .expect("16 bytes"),
            );
        }
        Ok(())
    }
}
