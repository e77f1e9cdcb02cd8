//! CPUID: the features this CPU implements, and nothing more.
//!
//! | leaf | contents |
//! | --- | --- |
//! | 0 | max basic leaf 0x16, vendor "GenuineIntel" (Linux reads leaf 0x15 only on Intel) |
//! | 1 | family 6 model 2; FPU PSE TSC MSR PAE CX8 APIC(if present) SEP CMOV PAT PGE CLFSH MMX FXSR SSE SSE2; CX16 POPCNT, hypervisor; CLFLUSH line 64 bytes |
//! | 2-0x14 | zero (no cache, topology, XSAVE or extended features described) |
//! | 0x15 | TSC/crystal ratio 1/1, crystal frequency = TSC frequency |
//! | 0x16 | base and maximum frequency in MHz |
//! | 0x40000000 | hypervisor signature "MonsterVMMVM\0", max leaf 0x40000010 |
//! | 0x40000010 | TSC frequency in kHz, local APIC timer frequency in kHz |
//! | 0x80000000-4 | max extended leaf 0x80000008, brand string |
//! | 0x80000001 | LAHF/SAHF, LZCNT; SYSCALL, NX, 1 GiB pages, RDTSCP, long mode |
//! | 0x80000007 | invariant TSC |
//! | 0x80000008 | 40 physical and 48 linear address bits |

use super::state::CpuConfig;

/// Leaf 1 EDX feature bits.
const EDX1: u32 = 1 // FPU
    | 1 << 3 // PSE
    | 1 << 4 // TSC
    | 1 << 5 // MSR
    | 1 << 6 // PAE
    | 1 << 8 // CX8
    | 1 << 11 // SEP: SYSENTER/SYSEXIT
    | 1 << 13 // PGE
    | 1 << 15 // CMOV
    | 1 << 16 // PAT
    | 1 << 19 // CLFSH
    | 1 << 23 // MMX
    | 1 << 24 // FXSR
    | 1 << 25 // SSE
    | 1 << 26; // SSE2
/// Leaf 1 EDX bit 9: on-chip local APIC.
const EDX1_APIC: u32 = 1 << 9;
/// Leaf 1 ECX feature bits.
const ECX1: u32 = 1 << 13 // CMPXCHG16B
    | 1 << 23 // POPCNT
    | 1 << 31; // running under a hypervisor
/// Leaf 0x80000001 ECX: LAHF/SAHF in 64-bit mode, LZCNT.
const ECX_EXT1: u32 = 1 | 1 << 5;
/// Leaf 0x80000001 EDX: SYSCALL, NX, 1 GiB pages, RDTSCP, long mode.
const EDX_EXT1: u32 = 1 << 11 | 1 << 20 | 1 << 26 | 1 << 27 | 1 << 29;

fn text(bytes: &[u8; 12]) -> (u32, u32, u32) {
    let word = |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    (word(0), word(4), word(8))
}

/// Returns EAX, EBX, ECX and EDX of CPUID leaf `leaf`, sub-leaf `subleaf`.
pub fn cpuid(config: &CpuConfig, leaf: u32, subleaf: u32) -> [u32; 4] {
    let _ = subleaf;
    let tsc_khz = (config.tsc_hz / 1000) as u32;
    match leaf {
        0 => {
            let (b, d, c) = text(b"GenuineIntel");
            [0x16, b, c, d]
        }
        1 => {
            // Family 6, model 2, stepping 0.
            let eax = 6 << 8 | 2 << 4;
            let ebx = u32::from(config.apic_id) << 24 | 1 << 16 | 8 << 8;
            let edx = EDX1 | if config.apic { EDX1_APIC } else { 0 };
            [eax, ebx, ECX1, edx]
        }
        0x15 => [1, 1, config.tsc_hz as u32, 0],
        0x16 => {
            let mhz = (config.tsc_hz / 1_000_000) as u32;
            [mhz, mhz, 100, 0]
        }
        0x4000_0000 => {
            let (b, c, d) = text(b"MonsterVMMVM");
            [0x4000_0010, b, c, d]
        }
        0x4000_0010 => [tsc_khz, tsc_khz, 0, 0],
        0x8000_0000 => [0x8000_0008, 0, 0, 0],
        0x8000_0001 => [0, 0, ECX_EXT1, EDX_EXT1],
        0x8000_0002..=0x8000_0004 => {
            let brand = b"MonsterVM emulated x86-64 CPU\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";
            let start = (leaf - 0x8000_0002) as usize * 16;
            let word = |i: usize| {
                let at = start + i * 4;
                u32::from_le_bytes([brand[at], brand[at + 1], brand[at + 2], brand[at + 3]])
            };
            [word(0), word(1), word(2), word(3)]
        }
        0x8000_0007 => [0, 0, 0, 1 << 8],
        0x8000_0008 => [super::mmu::MAX_PHYS_BITS | 48 << 8, 0, 0, 0],
        _ => [0; 4],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf1_reports_clflush_line_and_hypervisor() {
        let [_, ebx, ecx, edx] = cpuid(&CpuConfig::default(), 1, 0);
        assert_eq!((ebx >> 8) & 0xff, 8, "CLFLUSH line size in 8-byte units");
        assert_ne!(ecx & (1 << 31), 0, "hypervisor bit");
        assert_ne!(edx & (1 << 26), 0, "SSE2");
    }

    #[test]
    fn leaf15_gives_tsc_frequency() {
        let config = CpuConfig {
            tsc_hz: 2_000_000_000,
            ..CpuConfig::default()
        };
        let [eax, ebx, ecx, _] = cpuid(&config, 0x15, 0);
        assert_eq!(
            u64::from(ecx) * u64::from(ebx) / u64::from(eax),
            2_000_000_000
        );
    }

    #[test]
    fn vendor_string() {
        let [_, ebx, ecx, edx] = cpuid(&CpuConfig::default(), 0, 0);
        let mut vendor = Vec::new();
        for word in [ebx, edx, ecx] {
            vendor.extend_from_slice(&word.to_le_bytes());
        }
        assert_eq!(vendor, b"GenuineIntel");
    }
}
