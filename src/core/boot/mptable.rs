//! The Intel MultiProcessor Specification 1.4 table: processors, the ISA bus, the IOAPIC
//! and the routing of the ISA interrupts.
//!
//! Kernels built without ACPI, or booted with `acpi=off`, find the interrupt controllers
//! here. (Debian's cloud kernel is built without `CONFIG_X86_MPPARSE` and reads only the
//! ACPI MADT.) The ISA routing matches the MADT: IRQ 0 goes to IOAPIC pin 2, pin 0 is the
//! 8259's ExtINT output, and the other ISA IRQs map to the pin of the same number.
//!
//! ```text
//! floating pointer (16 bytes) | header (44) | processors (20 each) | bus (8) |
//! IOAPIC (8) | I/O interrupts (8 each) | local interrupts (8 each)
//! ```

use super::acpi::checksum;
use crate::core::memory::{IOAPIC_BASE, LAPIC_BASE};

/// Size of the floating pointer structure.
const FLOATING_POINTER_SIZE: usize = 16;
/// Size of the configuration table header.
const HEADER_SIZE: usize = 44;
/// Specification revision 1.4.
const SPEC_REVISION: u8 = 4;
/// Local APIC version reported for every processor: an integrated APIC.
pub const LAPIC_VERSION: u8 = 0x14;
/// IOAPIC version reported in the IOAPIC entry (82093AA).
pub const IOAPIC_VERSION: u8 = 0x11;
/// Number of ISA interrupt lines.
pub const ISA_IRQS: u8 = 16;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const INTERRUPT_INT: u8 = 0;
const INTERRUPT_NMI: u8 = 1;
const INTERRUPT_EXTINT: u8 = 3;

const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
/// CPUID signature in the processor entries: family 6, model 15, stepping 11.
const CPU_SIGNATURE: u32 = 0x6fb;
/// CPUID.1:EDX feature flags in the processor entries: FPU and APIC.
const CPU_FEATURES: u32 = 0x201;
/// Destination "all local APICs" in a local interrupt entry.
const ALL_LAPICS: u8 = 0xff;

/// Returns the IOAPIC's ID: the first ID after the processors' local APIC IDs, because MP
/// tables share one APIC ID space between processors and IOAPICs.
pub fn ioapic_id(vcpus: u8) -> u8 {
    vcpus
}

/// Builds the floating pointer and configuration table for `vcpus` processors, to be
/// written at guest-physical `address`.
pub fn build_mptable(address: u64, vcpus: u8) -> Vec<u8> {
    let mut entries = Vec::new();
    let mut entry_count: u16 = 0;

    for id in 0..vcpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, id, LAPIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        entry_count += 1;
    }

    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    entry_count += 1;

    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id(vcpus), IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_BASE as u32).to_le_bytes());
    entry_count += 1;

    for (kind, irq, pin) in isa_routes() {
        // Flags 0: polarity and trigger mode conform to the ISA bus (high, edge).
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, kind, 0, 0, 0, irq]);
        entries.extend_from_slice(&[ioapic_id(vcpus), pin]);
        entry_count += 1;
    }

    for (kind, lint) in [(INTERRUPT_EXTINT, 0), (INTERRUPT_NMI, 1)] {
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, kind, 0, 0, 0, 0, ALL_LAPICS, lint]);
        entry_count += 1;
    }

    let table_length = (HEADER_SIZE + entries.len()) as u16;
    let mut table = Vec::with_capacity(usize::from(table_length));
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&table_length.to_le_bytes());
    table.extend_from_slice(&[SPEC_REVISION, 0]);
    table.extend_from_slice(b"MNSTRVM ");
    table.extend_from_slice(b"MONSTERVM   ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&entry_count.to_le_bytes());
    table.extend_from_slice(&(LAPIC_BASE as u32).to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.extend_from_slice(&[0, 0]); // extended table checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let table_address = address + FLOATING_POINTER_SIZE as u64;
    let mut floating = Vec::with_capacity(FLOATING_POINTER_SIZE + table.len());
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&(table_address as u32).to_le_bytes());
    // Length in 16-byte units, revision, checksum, then feature bytes: feature 1 = 0
    // means a configuration table is present, and feature 2 = 0 means virtual wire mode
    // (no IMCR).
    floating.extend_from_slice(&[1, SPEC_REVISION, 0, 0, 0, 0, 0, 0]);
    floating[10] = checksum(&floating);

    floating.extend_from_slice(&table);
    floating
}

/// Returns the ISA routing as (interrupt type, ISA IRQ, IOAPIC pin) triples.
fn isa_routes() -> Vec<(u8, u8, u8)> {
    let mut routes = vec![(INTERRUPT_EXTINT, 0, 0), (INTERRUPT_INT, 0, 2)];
    // IRQ 2 is the cascade from the secondary 8259 and has no IOAPIC pin of its own.
    routes.extend(
        (1..ISA_IRQS)
            .filter(|&irq| irq != 2)
            .map(|irq| (INTERRUPT_INT, irq, irq)),
    );
    routes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
    }

    fn u16_at(bytes: &[u8], offset: usize) -> u16 {
        u16::from_le_bytes(bytes[offset..offset + 2].try_into().unwrap())
    }

    fn u32_at(bytes: &[u8], offset: usize) -> u32 {
        u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap())
    }

    #[test]
    fn floating_pointer_fields() {
        let bytes = build_mptable(0xf_0000, 2);
        let floating = &bytes[..16];
        assert_eq!(&floating[..4], b"_MP_");
        assert_eq!(u32_at(floating, 4), 0xf_0010);
        assert_eq!(floating[8], 1);
        assert_eq!(floating[9], 4);
        assert_eq!(sum(floating), 0);
    }

    #[test]
    fn table_header_and_checksum() {
        let bytes = build_mptable(0xf_0000, 2);
        let table = &bytes[16..];
        assert_eq!(&table[..4], b"PCMP");
        assert_eq!(usize::from(u16_at(table, 4)), table.len());
        assert_eq!(sum(table), 0);
        assert_eq!(u32_at(table, 36), 0xfee0_0000);
        // 2 processors, 1 bus, 1 IOAPIC, 16 I/O interrupts, 2 local interrupts.
        assert_eq!(u16_at(table, 34), 22);
        assert_eq!(table.len(), 44 + 2 * 20 + 8 + 8 + 16 * 8 + 2 * 8);
    }

    #[test]
    fn processor_and_ioapic_entries() {
        let bytes = build_mptable(0xf_0000, 2);
        let entries = &bytes[16 + 44..];
        assert_eq!(&entries[..4], &[0, 0, LAPIC_VERSION, 3]);
        assert_eq!(&entries[20..24], &[0, 1, LAPIC_VERSION, 1]);
        assert_eq!(&entries[40..48], b"\x01\x00ISA   ");
        assert_eq!(&entries[48..52], &[2, 2, IOAPIC_VERSION, 1]);
        assert_eq!(u32_at(entries, 52), 0xfec0_0000);
    }

    #[test]
    fn irq0_routes_to_pin2() {
        let bytes = build_mptable(0xf_0000, 1);
        let interrupts = &bytes[16 + 44 + 20 + 8 + 8..];
        let routes: Vec<(u8, u8, u8)> = interrupts
            .chunks(8)
            .filter(|e| e[0] == ENTRY_IO_INTERRUPT)
            .map(|e| (e[1], e[5], e[7]))
            .collect();
        assert_eq!(routes.len(), 16);
        assert!(routes.contains(&(INTERRUPT_EXTINT, 0, 0)));
        assert!(routes.contains(&(INTERRUPT_INT, 0, 2)));
        assert!(routes.contains(&(INTERRUPT_INT, 4, 4)));
        assert!(!routes.iter().any(|&(_, irq, _)| irq == 2));
        for e in interrupts.chunks(8).filter(|e| e[0] == ENTRY_IO_INTERRUPT) {
            assert_eq!(e[6], ioapic_id(1));
        }
    }

    #[test]
    fn largest_table_fits_reserved_space() {
        let bytes = build_mptable(0xf_0000, crate::utils::config::MAX_VCPUS);
        assert!(bytes.len() as u64 <= super::super::layout::MPTABLE_END - 0xf_0000);
        assert_eq!(sum(&bytes[16..]), 0);
    }
}
