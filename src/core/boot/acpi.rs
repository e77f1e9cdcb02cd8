//! ACPI tables: RSDP, XSDT, FADT, FACS, MADT and a DSDT (ACPI 6.4).
//!
//! The tables describe the fixed platform that MonsterVM emulates: local APICs and one
//! IOAPIC, the ISA IRQ 0 to GSI 2 override, and the PM1a event and control blocks, PM
//! timer and reset register of the ACPI PM device (`core::devices::acpi_pm`), and QEMU's
//! pvpanic device (`core::devices::pvpanic`). The DSDT's `\_S5` package makes the guest's
//! `poweroff` write sleep type 5 with SLP_EN to PM1a_CNT. The DSDT also declares the PCI host bridge, because
//! Linux with ACPI enabled probes PCI bus 0 only through such a device: its legacy probe
//! (`pci_subsys_init` in arch/x86/pci/legacy.c, 6.1) runs only when ACPI PCI setup fails.
//!
//! All tables are built into one buffer written at a fixed guest-physical address:
//!
//! ```text
//! RSDP (36 bytes) | XSDT | FACS (64-byte aligned) | FADT (276) | MADT | DSDT
//! ```

use super::aml;
use super::mptable::ioapic_id;
use crate::core::devices::{acpi_pm, pvpanic};
use crate::core::memory::{IOAPIC_BASE, LAPIC_BASE};

/// Port of the PM1a event block (status and enable registers, 2 bytes each).
pub const PM1A_EVT_PORT: u16 = acpi_pm::PM1A_EVT_BLK;
/// Length of the PM1a event block in bytes.
pub const PM1A_EVT_LEN: u8 = acpi_pm::PM1_EVT_LEN;
/// Port of the PM1a control register.
pub const PM1A_CNT_PORT: u16 = acpi_pm::PM1A_CNT_BLK;
/// Length of the PM1a control block in bytes.
pub const PM1A_CNT_LEN: u8 = acpi_pm::PM1_CNT_LEN;
/// Port of the 24-bit PM timer (3.579545 MHz).
pub const PM_TIMER_PORT: u16 = acpi_pm::PM_TMR_BLK;
/// Length of the PM timer block in bytes.
pub const PM_TIMER_LEN: u8 = acpi_pm::PM_TMR_LEN;
/// Port of the FADT reset register, and the byte that resets the machine.
pub const RESET_PORT: u16 = acpi_pm::RESET_REG_PORT;
pub const RESET_VALUE: u8 = acpi_pm::RESET_VALUE;
/// Sleep type that the DSDT's `\_S5` package gives for soft-off; the guest writes it to
/// PM1a_CNT bits 10-12.
pub const S5_SLEEP_TYPE: u8 = acpi_pm::SLP_TYP_S5;
/// SLP_EN in PM1a_CNT: writing it starts the transition to the sleep type in bits 10-12.
pub const PM1_CNT_SLP_EN: u16 = 1 << 13;
/// Bit position of SLP_TYP in PM1a_CNT.
pub const PM1_CNT_SLP_TYP_SHIFT: u16 = 10;
/// ISA IRQ (and GSI) of the System Control Interrupt.
pub const SCI_IRQ: u8 = acpi_pm::SCI_IRQ as u8;
/// GSI that ISA IRQ 0 (the PIT) is routed to.
pub const TIMER_GSI: u32 = 2;

const OEM_ID: &[u8; 6] = b"MNSTVM";
const OEM_TABLE_ID: &[u8; 8] = b"MONSTRVM";
const CREATOR_ID: &[u8; 4] = b"MVMM";
const HEADER_SIZE: usize = 36;
const RSDP_SIZE: usize = 36;
const FADT_SIZE: usize = 276;
const FACS_SIZE: usize = 64;

/// FADT revision 6 (ACPI 6.x) with minor version 4.
const FADT_REVISION: u8 = 6;
const FADT_MINOR_VERSION: u8 = 4;
/// IA-PC boot architecture flags: legacy devices on the LPC bus, an 8042 keyboard
/// controller, no VGA, and no ASPM control by the OS.
const BOOT_ARCH_FLAGS: u16 = 0x1 | 0x2 | 0x4 | 0x10;
/// FADT feature flags: WBINVD works, the power and sleep buttons are not fixed-feature
/// buttons, and RESET_REG is supported. TMR_VAL_EXT stays clear: the PM timer has 24 bits.
const FADT_FLAGS: u32 = 0x1 | 0x10 | 0x20 | (1 << 10);
/// Generic Address Structure address space: system I/O.
const GAS_SYSTEM_IO: u8 = 1;
/// Generic Address Structure access sizes: byte, word (16-bit) and dword (32-bit).
const GAS_ACCESS_BYTE: u8 = 1;
const GAS_ACCESS_WORD: u8 = 2;
const GAS_ACCESS_DWORD: u8 = 3;
/// MADT flags: the platform also has dual 8259 PICs (PCAT_COMPAT).
const MADT_PCAT_COMPAT: u32 = 1;
/// MPS INTI flags of an override: active high, level triggered (used for the SCI).
const INTI_LEVEL_HIGH: u16 = 0x1 | (0x3 << 2);
/// MPS INTI flags: conforms to the bus (edge, active high on ISA).
const INTI_CONFORMING: u16 = 0;

/// Platform facts that the tables describe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcpiConfig {
    /// Number of processors; their local APIC IDs are 0 to `vcpus - 1`.
    pub vcpus: u8,
    /// Declare a PCI host bridge (PNP0A03, segment 0, bus 0) in the DSDT.
    pub pci_host_bridge: bool,
}

/// The built tables and where each one lands in guest memory.
#[derive(Debug, Clone)]
pub struct AcpiTables {
    /// All tables, to be written at `rsdp`.
    pub bytes: Vec<u8>,
    /// Guest-physical address of the RSDP: the start of `bytes`.
    pub rsdp: u64,
    /// Guest-physical addresses of the XSDT, FACS, FADT, MADT and DSDT.
    pub xsdt: u64,
    pub facs: u64,
    pub fadt: u64,
    pub madt: u64,
    pub dsdt: u64,
}

/// Returns the byte that makes the 8-bit sum of `bytes` plus itself zero.
pub fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b)))
}

/// Builds every table for `config`, laid out from guest-physical `base`.
pub fn build_acpi_tables(base: u64, config: &AcpiConfig) -> AcpiTables {
    let facs_table = facs();
    let madt_table = madt(config);
    let dsdt_table = dsdt(config);

    // Place the tables first, because the XSDT and FADT contain the addresses of others.
    let xsdt = align(base + RSDP_SIZE as u64, 16);
    let xsdt_size = (HEADER_SIZE + 2 * 8) as u64;
    let facs = align(xsdt + xsdt_size, 64);
    let fadt = align(facs + FACS_SIZE as u64, 16);
    let madt = align(fadt + FADT_SIZE as u64, 16);
    let dsdt = align(madt + madt_table.len() as u64, 16);

    let fadt_table = fadt_table(facs, dsdt);
    let xsdt_table = xsdt_table(&[fadt, madt]);
    let rsdp_table = rsdp(xsdt);

    let mut bytes = vec![0u8; (dsdt - base) as usize + dsdt_table.len()];
    for (address, table) in [
        (base, &rsdp_table),
        (xsdt, &xsdt_table),
        (facs, &facs_table),
        (fadt, &fadt_table),
        (madt, &madt_table),
        (dsdt, &dsdt_table),
    ] {
        let offset = (address - base) as usize;
        bytes[offset..offset + table.len()].copy_from_slice(table);
    }

    AcpiTables {
        bytes,
        rsdp: base,
        xsdt,
        facs,
        fadt,
        madt,
        dsdt,
    }
}

fn align(value: u64, alignment: u64) -> u64 {
    value.next_multiple_of(alignment)
}

/// Starts a table with the common 36-byte header; [`finish`] fills length and checksum.
fn header(signature: &[u8; 4], revision: u8) -> Vec<u8> {
    let mut table = Vec::with_capacity(256);
    table.extend_from_slice(signature);
    table.extend_from_slice(&0u32.to_le_bytes()); // length, set by finish()
    table.push(revision);
    table.push(0); // checksum, set by finish()
    table.extend_from_slice(OEM_ID);
    table.extend_from_slice(OEM_TABLE_ID);
    table.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    table.extend_from_slice(CREATOR_ID);
    table.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    table
}

fn finish(mut table: Vec<u8>) -> Vec<u8> {
    let length = table.len() as u32;
    table[4..8].copy_from_slice(&length.to_le_bytes());
    table[9] = 0;
    table[9] = checksum(&table);
    table
}

fn rsdp(xsdt: u64) -> Vec<u8> {
    let mut table = Vec::with_capacity(RSDP_SIZE);
    table.extend_from_slice(b"RSD PTR ");
    table.push(0); // checksum of the first 20 bytes
    table.extend_from_slice(OEM_ID);
    table.push(2); // revision 2: ACPI 2.0 and later, with an XSDT
    table.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    table.extend_from_slice(&(RSDP_SIZE as u32).to_le_bytes());
    table.extend_from_slice(&xsdt.to_le_bytes());
    table.push(0); // extended checksum of all 36 bytes
    table.extend_from_slice(&[0; 3]);
    table[8] = checksum(&table[..20]);
    table[32] = checksum(&table);
    table
}

fn xsdt_table(entries: &[u64]) -> Vec<u8> {
    let mut table = header(b"XSDT", 1);
    for entry in entries {
        table.extend_from_slice(&entry.to_le_bytes());
    }
    finish(table)
}

fn facs() -> Vec<u8> {
    let mut table = vec![0u8; FACS_SIZE];
    table[..4].copy_from_slice(b"FACS");
    table[4..8].copy_from_slice(&(FACS_SIZE as u32).to_le_bytes());
    table[32] = 2; // version
    table
}

fn put_u8(table: &mut [u8], offset: usize, value: u8) {
    table[offset] = value;
}

fn put_u16(table: &mut [u8], offset: usize, value: u16) {
    table[offset..offset + 2].copy_from_slice(&value.to_le_bytes());
}

fn put_u32(table: &mut [u8], offset: usize, value: u32) {
    table[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
}

fn put_u64(table: &mut [u8], offset: usize, value: u64) {
    table[offset..offset + 8].copy_from_slice(&value.to_le_bytes());
}

/// Writes a Generic Address Structure for an I/O port block of `bits` bits, read with
/// `access` ([`GAS_ACCESS_BYTE`], [`GAS_ACCESS_WORD`] or [`GAS_ACCESS_DWORD`]).
fn put_io_gas(table: &mut [u8], offset: usize, port: u16, bits: u8, access: u8) {
    table[offset] = GAS_SYSTEM_IO;
    table[offset + 1] = bits;
    table[offset + 2] = 0; // bit offset
    table[offset + 3] = access;
    put_u64(table, offset + 4, u64::from(port));
}

/// Byte offsets of the FADT fields that MonsterVM sets (ACPI 6.4, table 5.9).
mod fadt_offset {
    pub const FIRMWARE_CTRL: usize = 36;
    pub const DSDT: usize = 40;
    pub const SCI_INT: usize = 46;
    pub const PM1A_EVT_BLK: usize = 56;
    pub const PM1A_CNT_BLK: usize = 64;
    pub const PM_TMR_BLK: usize = 76;
    pub const PM1_EVT_LEN: usize = 88;
    pub const PM1_CNT_LEN: usize = 89;
    pub const PM_TMR_LEN: usize = 91;
    pub const P_LVL2_LAT: usize = 96;
    pub const P_LVL3_LAT: usize = 98;
    pub const IAPC_BOOT_ARCH: usize = 109;
    pub const FLAGS: usize = 112;
    pub const RESET_REG: usize = 116;
    pub const RESET_VALUE: usize = 128;
    pub const MINOR_VERSION: usize = 131;
    pub const X_FIRMWARE_CTRL: usize = 132;
    pub const X_DSDT: usize = 140;
    pub const X_PM1A_EVT_BLK: usize = 148;
    pub const X_PM1A_CNT_BLK: usize = 172;
    pub const X_PM_TMR_BLK: usize = 208;
}

fn fadt_table(facs: u64, dsdt: u64) -> Vec<u8> {
    use fadt_offset::*;

    let mut table = header(b"FACP", FADT_REVISION);
    table.resize(FADT_SIZE, 0);
    // The FACS address goes only into X_FIRMWARE_CTRL: with both fields set, Linux 6.1
    // lists and reserves the FACS twice. The DSDT address goes into both fields, which
    // agree, as ACPICA checks.
    put_u32(&mut table, FIRMWARE_CTRL, 0);
    put_u32(&mut table, DSDT, dsdt as u32);
    put_u16(&mut table, SCI_INT, u16::from(SCI_IRQ));
    // SMI_CMD stays 0: the platform is always in ACPI mode, so the OS never switches.
    put_u32(&mut table, PM1A_EVT_BLK, u32::from(PM1A_EVT_PORT));
    put_u32(&mut table, PM1A_CNT_BLK, u32::from(PM1A_CNT_PORT));
    put_u8(&mut table, PM1_EVT_LEN, PM1A_EVT_LEN);
    put_u8(&mut table, PM1_CNT_LEN, PM1A_CNT_LEN);
    put_u32(&mut table, PM_TMR_BLK, u32::from(PM_TIMER_PORT));
    put_u8(&mut table, PM_TMR_LEN, PM_TIMER_LEN);
    // Latencies above 100 and 1000 microseconds mean C2 and C3 are not supported.
    put_u16(&mut table, P_LVL2_LAT, 101);
    put_u16(&mut table, P_LVL3_LAT, 1001);
    put_u16(&mut table, IAPC_BOOT_ARCH, BOOT_ARCH_FLAGS);
    put_u32(&mut table, FLAGS, FADT_FLAGS);
    put_u8(&mut table, MINOR_VERSION, FADT_MINOR_VERSION);
    put_u64(&mut table, X_FIRMWARE_CTRL, facs);
    put_u64(&mut table, X_DSDT, dsdt);
    put_io_gas(
        &mut table,
        X_PM1A_EVT_BLK,
        PM1A_EVT_PORT,
        PM1A_EVT_LEN * 8,
        GAS_ACCESS_WORD,
    );
    put_io_gas(
        &mut table,
        X_PM1A_CNT_BLK,
        PM1A_CNT_PORT,
        PM1A_CNT_LEN * 8,
        GAS_ACCESS_WORD,
    );
    put_io_gas(
        &mut table,
        X_PM_TMR_BLK,
        PM_TIMER_PORT,
        PM_TIMER_LEN * 8,
        GAS_ACCESS_DWORD,
    );
    put_io_gas(
        &mut table,
        fadt_offset::RESET_REG,
        RESET_PORT,
        8,
        GAS_ACCESS_BYTE,
    );
    put_u8(&mut table, fadt_offset::RESET_VALUE, self::RESET_VALUE);
    finish(table)
}

fn madt(config: &AcpiConfig) -> Vec<u8> {
    let mut table = header(b"APIC", 4);
    table.extend_from_slice(&(LAPIC_BASE as u32).to_le_bytes());
    table.extend_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());

    for id in 0..config.vcpus {
        // Processor Local APIC: type 0, length 8, ACPI processor UID, APIC ID, enabled.
        table.extend_from_slice(&[0, 8, id, id]);
        table.extend_from_slice(&1u32.to_le_bytes());
    }

    // I/O APIC: type 1, length 12, ID, reserved, address, first GSI.
    table.extend_from_slice(&[1, 12, ioapic_id(config.vcpus), 0]);
    table.extend_from_slice(&(IOAPIC_BASE as u32).to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes());

    // Interrupt Source Overrides: type 2, length 10, bus 0 (ISA), source IRQ, GSI, flags.
    for (irq, gsi, flags) in [
        (0u8, TIMER_GSI, INTI_CONFORMING),
        (SCI_IRQ, u32::from(SCI_IRQ), INTI_LEVEL_HIGH),
    ] {
        table.extend_from_slice(&[2, 10, 0, irq]);
        table.extend_from_slice(&gsi.to_le_bytes());
        table.extend_from_slice(&flags.to_le_bytes());
    }

    // Local APIC NMI: type 4, length 6, all processors (UID 0xff), flags, LINT1.
    table.extend_from_slice(&[4, 6, 0xff, 0, 0, 1]);
    finish(table)
}

fn dsdt(config: &AcpiConfig) -> Vec<u8> {
    let mut table = header(b"DSDT", 2);
    // Package { SLP_TYPa, SLP_TYPb, reserved, reserved }.
    let sleep_type = u64::from(S5_SLEEP_TYPE);
    table.extend_from_slice(&aml::name(
        "_S5",
        &aml::package(&[
            aml::integer(sleep_type),
            aml::integer(sleep_type),
            aml::integer(0),
            aml::integer(0),
        ]),
    ));

    let mut system_bus = Vec::new();
    if config.pci_host_bridge {
        let mut body = aml::name("_HID", &aml::eisa_id("PNP0A03"));
        body.extend_from_slice(&aml::name("_UID", &aml::integer(0)));
        body.extend_from_slice(&aml::name("_SEG", &aml::integer(0)));
        body.extend_from_slice(&aml::name("_BBN", &aml::integer(0)));
        // NOTE: no _CRS or _PRT yet. Linux then uses the default I/O and memory windows,
        // and INTx falls back to the PCI Interrupt Line register (ISA IRQs only).
        system_bus.extend_from_slice(&aml::device("PCI0", &body));
    }
    // QEMU's ISA pvpanic device, which Linux's pvpanic driver finds by this _HID.
    let mut pvpanic = aml::name("_HID", &aml::string(pvpanic::PVPANIC_HID));
    pvpanic.extend_from_slice(&aml::name(
        "_CRS",
        &aml::io_port_resources(pvpanic::PVPANIC_PORT, 1),
    ));
    system_bus.extend_from_slice(&aml::device("PEVT", &pvpanic));
    table.extend_from_slice(&aml::root_scope("_SB", &system_bus));
    finish(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: u64 = 0xe_0000;

    fn tables(vcpus: u8) -> AcpiTables {
        build_acpi_tables(
            BASE,
            &AcpiConfig {
                vcpus,
                pci_host_bridge: true,
            },
        )
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
    }

    fn table_at(tables: &AcpiTables, address: u64) -> &[u8] {
        let offset = (address - BASE) as usize;
        let length = u32_at(&tables.bytes, offset + 4) as usize;
        &tables.bytes[offset..offset + length]
    }

    fn u16_at(bytes: &[u8], offset: usize) -> u16 {
        u16::from_le_bytes(bytes[offset..offset + 2].try_into().unwrap())
    }

    fn u32_at(bytes: &[u8], offset: usize) -> u32 {
        u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap())
    }

    fn u64_at(bytes: &[u8], offset: usize) -> u64 {
        u64::from_le_bytes(bytes[offset..offset + 8].try_into().unwrap())
    }

    #[test]
    fn rsdp_fields_and_checksums() {
        let t = tables(1);
        let rsdp = &t.bytes[..36];
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(rsdp[15], 2);
        assert_eq!(u32_at(rsdp, 20), 36);
        assert_eq!(u64_at(rsdp, 24), t.xsdt);
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(rsdp), 0);
        assert_eq!(t.rsdp, BASE);
        assert_eq!(t.rsdp % 16, 0);
    }

    #[test]
    fn xsdt_lists_fadt_and_madt() {
        let t = tables(1);
        let xsdt = table_at(&t, t.xsdt);
        assert_eq!(&xsdt[..4], b"XSDT");
        assert_eq!(xsdt.len(), 36 + 16);
        assert_eq!(u64_at(xsdt, 36), t.fadt);
        assert_eq!(u64_at(xsdt, 44), t.madt);
        assert_eq!(sum(xsdt), 0);
    }

    #[test]
    fn fadt_pm_blocks_and_pointers() {
        let t = tables(1);
        let fadt = table_at(&t, t.fadt);
        assert_eq!(&fadt[..4], b"FACP");
        assert_eq!(fadt.len(), 276);
        assert_eq!(fadt[8], 6);
        assert_eq!(sum(fadt), 0);

        assert_eq!(
            u32_at(fadt, 36),
            0,
            "FIRMWARE_CTRL must be 0: X_FIRMWARE_CTRL is set"
        );
        assert_eq!(u32_at(fadt, 40) as u64, t.dsdt);
        assert_eq!(u16_at(fadt, 46), 9);
        assert_eq!(
            u32_at(fadt, 48),
            0,
            "SMI_CMD must be 0: always in ACPI mode"
        );

        assert_eq!(u32_at(fadt, 56), 0x600);
        assert_eq!(u32_at(fadt, 64), 0x604);
        assert_eq!(fadt[88], 4);
        assert_eq!(fadt[89], 2);
        assert_eq!(u16_at(fadt, 109) & 0x2, 0x2, "8042 flag");
        assert_eq!(u64_at(fadt, 132), t.facs);
        assert_eq!(u64_at(fadt, 140), t.dsdt);

        // X_PM1a_EVT_BLK and X_PM1a_CNT_BLK: system I/O space, 32 and 16 bits wide.
        assert_eq!(&fadt[148..152], &[1, 32, 0, 2]);
        assert_eq!(u64_at(fadt, 152), 0x600);
        assert_eq!(&fadt[172..176], &[1, 16, 0, 2]);
        assert_eq!(u64_at(fadt, 176), 0x604);

        // PM timer at 0x608, 32-bit block read with dword accesses.
        assert_eq!(u32_at(fadt, 76), 0x608);
        assert_eq!(fadt[91], 4);
        assert_eq!(&fadt[208..212], &[1, 32, 0, 3]);
        assert_eq!(u64_at(fadt, 212), 0x608);
        assert_eq!(
            u32_at(fadt, 112) & (1 << 8),
            0,
            "TMR_VAL_EXT must be clear: 24-bit timer"
        );

        // Reset register: one byte at port 0x60c, value 1, RESET_REG_SUP set.
        assert_eq!(&fadt[116..120], &[1, 8, 0, 1]);
        assert_eq!(u64_at(fadt, 120), 0x60c);
        assert_eq!(fadt[128], 1);
        assert_eq!(u32_at(fadt, 112) & (1 << 10), 1 << 10);
    }

    #[test]
    fn facs_is_aligned() {
        let t = tables(1);
        assert_eq!(t.facs % 64, 0);
        let offset = (t.facs - BASE) as usize;
        assert_eq!(&t.bytes[offset..offset + 4], b"FACS");
        assert_eq!(u32_at(&t.bytes, offset + 4), 64);
    }

    #[test]
    fn madt_entries() {
        let t = tables(2);
        let madt = table_at(&t, t.madt);
        assert_eq!(&madt[..4], b"APIC");
        assert_eq!(sum(madt), 0);
        assert_eq!(u32_at(madt, 36), 0xfee0_0000);
        assert_eq!(u32_at(madt, 40), 1);

        let mut entries = Vec::new();
        let mut offset = 44;
        while offset < madt.len() {
            let length = usize::from(madt[offset + 1]);
            assert!(length >= 2, "entry at {offset} has length {length}");
            entries.push(&madt[offset..offset + length]);
            offset += length;
        }
        assert_eq!(offset, madt.len());
        assert_eq!(entries.len(), 2 + 1 + 2 + 1);
        assert_eq!(entries[0], &[0, 8, 0, 0, 1, 0, 0, 0]);
        assert_eq!(entries[1], &[0, 8, 1, 1, 1, 0, 0, 0]);
        assert_eq!(&entries[2][..4], &[1, 12, 2, 0]);
        assert_eq!(u32_at(entries[2], 4), 0xfec0_0000);
        assert_eq!(u32_at(entries[2], 8), 0);
        // IRQ 0 -> GSI 2, conforming flags.
        assert_eq!(&entries[3][..4], &[2, 10, 0, 0]);
        assert_eq!(u32_at(entries[3], 4), 2);
        assert_eq!(u16_at(entries[3], 8), 0);
        // SCI: IRQ 9 -> GSI 9, level triggered, active high.
        assert_eq!(&entries[4][..4], &[2, 10, 0, 9]);
        assert_eq!(u32_at(entries[4], 4), 9);
        assert_eq!(u16_at(entries[4], 8), 0xd);
        assert_eq!(entries[5], &[4, 6, 0xff, 0, 0, 1]);
    }

    #[test]
    fn dsdt_has_s5_and_pci_host() {
        let t = tables(1);
        let dsdt = table_at(&t, t.dsdt);
        assert_eq!(&dsdt[..4], b"DSDT");
        assert_eq!(sum(dsdt), 0);
        let aml = &dsdt[36..];
        let s5 = [
            0x08, b'_', b'S', b'5', b'_', 0x12, 0x08, 0x04, 0x0a, 5, 0x0a, 5, 0, 0,
        ];
        assert_eq!(&aml[..s5.len()], &s5);
        let hid = [b'_', b'H', b'I', b'D', 0x0c, 0x41, 0xd0, 0x0a, 0x03];
        assert!(aml.windows(hid.len()).any(|w| w == hid));
        assert!(aml.windows(4).any(|w| w == b"PCI0"));
    }

    #[test]
    fn dsdt_without_pci_host() {
        let t = build_acpi_tables(
            BASE,
            &AcpiConfig {
                vcpus: 1,
                pci_host_bridge: false,
            },
        );
        let dsdt = table_at(&t, t.dsdt);
        assert_eq!(sum(dsdt), 0);
        assert!(!dsdt.windows(4).any(|w| w == b"PCI0"));
    }

    #[test]
    fn dsdt_announces_pvpanic() {
        let t = tables(1);
        let dsdt = table_at(&t, t.dsdt);
        assert!(dsdt.windows(4).any(|w| w == b"PEVT"));
        let hid = [b"_HID\x0dQEMU0001".as_slice(), &[0]].concat();
        assert!(dsdt.windows(hid.len()).any(|w| w == hid));
        let io = [0x47, 0x01, 0x05, 0x05, 0x05, 0x05, 0x01, 0x01];
        assert!(dsdt.windows(io.len()).any(|w| w == io));
    }

    #[test]
    fn largest_tables_fit_reserved_space() {
        let t = tables(crate::utils::config::MAX_VCPUS);
        let limit = super::super::layout::ACPI_END - BASE;
        assert!(t.bytes.len() as u64 <= limit, "{} bytes", t.bytes.len());
        assert_eq!(sum(table_at(&t, t.madt)), 0);
    }

    #[test]
    fn checksum_zeroes_sum() {
        let bytes = [1u8, 2, 3, 250];
        let mut with = bytes.to_vec();
        with.push(checksum(&bytes));
        assert_eq!(sum(&with), 0);
    }
}

#[cfg(test)]
mod iasl_tests {
    use super::*;
    use std::process::Command;

    const BASE: u64 = 0xe_0000;

    /// Returns each table of `tables` with its signature, as iasl takes them one a file.
    fn split(tables: &AcpiTables) -> Vec<(String, Vec<u8>)> {
        [tables.xsdt, tables.fadt, tables.madt, tables.dsdt]
            .iter()
            .map(|&address| {
                let offset = (address - BASE) as usize;
                let bytes = &tables.bytes[offset..];
                let length = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as usize;
                (
                    String::from_utf8_lossy(&bytes[..4]).into_owned(),
                    bytes[..length].to_vec(),
                )
            })
            .collect()
    }

    /// Disassembles every table with ACPICA's iasl, the compiler that Linux's ACPI code
    /// comes from, and fails on any error or warning it reports.
    #[test]
    fn iasl_accepts_tables() {
        let tables = build_acpi_tables(
            BASE,
            &AcpiConfig {
                vcpus: 2,
                pci_host_bridge: true,
            },
        );
        let dir = tempfile::tempdir().unwrap();
        for (signature, bytes) in split(&tables) {
            let path = dir.path().join(format!("{}.dat", signature.to_lowercase()));
            std::fs::write(&path, &bytes).unwrap();
            let output = match Command::new("iasl").arg("-d").arg(&path).output() {
                Ok(output) => output,
                Err(e) => {
                    eprintln!("skipping: iasl is not available ({e}); install acpica-tools");
                    return;
                }
            };
            let log = format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            assert!(output.status.success(), "iasl failed on {signature}: {log}");
            let dsl = std::fs::read_to_string(path.with_extension("dsl")).unwrap();
            for bad in ["Error", "Warning", "Invalid", "Incorrect"] {
                assert!(!log.contains(bad), "iasl reports on {signature}: {log}");
                assert!(
                    !dsl.contains(bad),
                    "iasl decoded {signature} with a complaint:\n{dsl}"
                );
            }
        }
    }
}
