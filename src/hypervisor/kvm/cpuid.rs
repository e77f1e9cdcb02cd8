//! The CPUID table that KVM vCPUs get: KVM's supported table filtered down to features
//! that the built-in emulator can implement too, so a guest sees the same CPU on both
//! backends and a snapshot moves between them.
//!
//! The filter keeps baseline x86-64 (the features every 64-bit CPU has) plus what Linux
//! checks at boot. It keeps these leaves and drops every other one:
//!
//! | leaf | kept |
//! | --- | --- |
//! | 0x0 | vendor; the maximum basic leaf is capped at 0x7 |
//! | 0x1 | family, model, stepping; EDX baseline bits in [`LEAF1_EDX`]; ECX only the hypervisor bit; EBX rebuilt (APIC ID, 64-byte CLFLUSH line) |
//! | 0x7 | subleaf 0 only, all feature bits zero |
//! | 0x8000_0000 | the maximum extended leaf, capped at 0x8000_0008 |
//! | 0x8000_0001 | SYSCALL, NX, LM in EDX and LAHF/SAHF in ECX |
//! | 0x8000_0002-4 | the brand string |
//! | 0x8000_0007 | the invariant-TSC bit |
//! | 0x8000_0008 | the physical and linear address widths in EAX |
//!
//! So the guest sees no XSAVE, AVX, CMPXCHG16B, x2APIC, FSGSBASE, SMEP/SMAP, PCID or
//! RDTSCP, and no KVM paravirtual leaves (0x4000_0000 and up), so no kvmclock.

use kvm_bindings::kvm_cpuid_entry2;

/// Leaf 1 EDX features kept: FPU, DE, PSE, TSC, MSR, PAE, CX8, APIC, SEP, MTRR, PGE,
/// CMOV, PAT, PSE36, CLFSH, MMX, FXSR, SSE, SSE2.
pub const LEAF1_EDX: u32 = (1 << 0)
    | (1 << 2)
    | (1 << 3)
    | (1 << 4)
    | (1 << 5)
    | (1 << 6)
    | (1 << 8)
    | (1 << 9)
    | (1 << 11)
    | (1 << 12)
    | (1 << 13)
    | (1 << 15)
    | (1 << 16)
    | (1 << 17)
    | (1 << 19)
    | (1 << 23)
    | (1 << 24)
    | (1 << 25)
    | (1 << 26);
/// Leaf 1 ECX bit 31: running under a hypervisor.
pub const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 0x8000_0001 EDX features kept: SYSCALL (11), NX (20), LM (29).
pub const EXT1_EDX: u32 = (1 << 11) | (1 << 20) | (1 << 29);
/// Leaf 0x8000_0001 ECX features kept: LAHF/SAHF in long mode (0).
pub const EXT1_ECX: u32 = 1 << 0;
/// Leaf 0x8000_0007 EDX bit 8: the TSC runs at a constant rate in every power state.
pub const EXT7_EDX_INVARIANT_TSC: u32 = 1 << 8;

/// Highest basic leaf reported in leaf 0 EAX.
const MAX_BASIC_LEAF: u32 = 0x7;
/// Highest extended leaf reported in leaf 0x8000_0000 EAX.
const MAX_EXTENDED_LEAF: u32 = 0x8000_0008;
/// Leaf 1 EBX bits 15:8: CLFLUSH line size in 8-byte units. Linux derives cache
/// alignment from it and fails early in boot when it reads zero.
const CLFLUSH_LINE_8_BYTE_UNITS: u32 = 8;

/// Filters `supported` (KVM_GET_SUPPORTED_CPUID) into the table for vCPU `apic_id`.
pub fn filter_cpuid(supported: &[kvm_cpuid_entry2], apic_id: u8) -> Vec<kvm_cpuid_entry2> {
    let mut filtered = Vec::new();
    for entry in supported {
        let mut entry = *entry;
        match entry.function {
            0x0 => entry.eax = entry.eax.min(MAX_BASIC_LEAF),
            0x1 => {
                entry.ebx = (u32::from(apic_id) << 24) | (CLFLUSH_LINE_8_BYTE_UNITS << 8);
                entry.ecx = LEAF1_ECX_HYPERVISOR;
                entry.edx &= LEAF1_EDX;
            }
            0x7 if entry.index == 0 => {
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            0x8000_0000 => entry.eax = entry.eax.min(MAX_EXTENDED_LEAF),
            0x8000_0001 => {
                entry.ebx = 0;
                entry.ecx &= EXT1_ECX;
                entry.edx &= EXT1_EDX;
            }
            0x8000_0002..=0x8000_0004 => {}
            0x8000_0007 => {
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx &= EXT7_EDX_INVARIANT_TSC;
            }
            0x8000_0008 => {
                entry.eax &= 0xffff;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            _ => continue,
        }
        filtered.push(entry);
    }
    filtered
}

/// Returns the (leaf, subleaf) pairs whose registers differ between the table that was
/// set and the one KVM reports back, including leaves present in only one of them.
pub fn cpuid_differences(
    requested: &[kvm_cpuid_entry2],
    effective: &[kvm_cpuid_entry2],
) -> Vec<(u32, u32)> {
    let registers = |e: &kvm_cpuid_entry2| [e.eax, e.ebx, e.ecx, e.edx];
    let find = |table: &[kvm_cpuid_entry2], e: &kvm_cpuid_entry2| {
        table
            .iter()
            .find(|other| other.function == e.function && other.index == e.index)
            .map(registers)
    };

    let mut differences = Vec::new();
    for entry in requested {
        if find(effective, entry) != Some(registers(entry)) {
            differences.push((entry.function, entry.index));
        }
    }
    for entry in effective {
        if find(requested, entry).is_none() {
            differences.push((entry.function, entry.index));
        }
    }
    differences
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, registers: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: registers[0],
            ebx: registers[1],
            ecx: registers[2],
            edx: registers[3],
            ..Default::default()
        }
    }

    fn find(table: &[kvm_cpuid_entry2], function: u32) -> kvm_cpuid_entry2 {
        *table
            .iter()
            .find(|e| e.function == function)
            .unwrap_or_else(|| panic!("leaf {function:#x} missing"))
    }

    #[test]
    fn filter_masks_leaf1_features() {
        let supported = [entry(
            0x1,
            0,
            [0x00a5_0f00, 0xffff_ffff, u32::MAX, u32::MAX],
        )];

        let leaf = find(&filter_cpuid(&supported, 3), 0x1);

        assert_eq!(leaf.eax, 0x00a5_0f00, "family and model pass through");
        assert_eq!(leaf.ebx >> 24, 3, "APIC ID");
        assert_eq!((leaf.ebx >> 8) & 0xff, 8, "CLFLUSH line size");
        assert_eq!(leaf.ecx, LEAF1_ECX_HYPERVISOR, "only the hypervisor bit");
        assert_eq!(leaf.edx, LEAF1_EDX);
        assert_eq!(leaf.ecx & (1 << 13), 0, "CMPXCHG16B hidden");
        assert_eq!(leaf.ecx & (1 << 26), 0, "XSAVE hidden");
    }

    #[test]
    fn filter_caps_max_leaves() {
        let supported = [
            entry(0x0, 0, [0x10, 1, 2, 3]),
            entry(0x8000_0000, 0, [0x8000_0021, 0, 0, 0]),
        ];

        let table = filter_cpuid(&supported, 0);

        assert_eq!(find(&table, 0x0).eax, MAX_BASIC_LEAF);
        assert_eq!(find(&table, 0x0).ebx, 1, "vendor passes through");
        assert_eq!(find(&table, 0x8000_0000).eax, MAX_EXTENDED_LEAF);
    }

    #[test]
    fn filter_drops_other_leaves() {
        let supported = [
            entry(0xd, 0, [u32::MAX; 4]),
            entry(0x4000_0000, 0, [u32::MAX; 4]),
            entry(0x7, 1, [u32::MAX; 4]),
            entry(0x7, 0, [1, u32::MAX, u32::MAX, u32::MAX]),
        ];

        let table = filter_cpuid(&supported, 0);

        assert_eq!(table.len(), 1, "{table:?}");
        assert_eq!(table[0].function, 0x7);
        assert_eq!(table[0].index, 0);
        assert_eq!(
            [table[0].eax, table[0].ebx, table[0].ecx, table[0].edx],
            [0; 4]
        );
    }

    #[test]
    fn filter_keeps_long_mode_bits() {
        let supported = [entry(0x8000_0001, 0, [0, u32::MAX, u32::MAX, u32::MAX])];

        let leaf = find(&filter_cpuid(&supported, 0), 0x8000_0001);

        assert_eq!(leaf.edx, EXT1_EDX);
        assert_eq!(leaf.ecx, EXT1_ECX);
        assert_eq!(leaf.ebx, 0);
    }

    #[test]
    fn differences_list_changed_and_added_leaves() {
        let requested = [entry(0x0, 0, [7, 1, 2, 3]), entry(0x1, 0, [1, 2, 3, 4])];
        let effective = [
            entry(0x0, 0, [7, 1, 2, 3]),
            entry(0x1, 0, [1, 2, 0xff, 4]),
            entry(0xd, 1, [1, 0, 0, 0]),
        ];

        let differences = cpuid_differences(&requested, &effective);

        assert_eq!(differences, vec![(0x1, 0), (0xd, 1)]);
        assert!(cpuid_differences(&requested, &requested).is_empty());
    }
}
