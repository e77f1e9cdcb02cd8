//! A minimal ACPI fixed-hardware power-management block: the PM1a event and control
//! registers, the PM timer and a reset register, at I/O ports 0x600-0x60F.
//!
//! The FADT and the DSDT built for the guest must describe exactly these ports and values,
//! so they are exported as constants:
//!
//! | port | FADT field | width | contents |
//! | --- | --- | --- | --- |
//! | 0x600 | PM1a_EVT_BLK, PM1_EVT_LEN = 4 | 16 | PM1_STS, write 1 to clear |
//! | 0x602 | (second half of PM1a_EVT_BLK) | 16 | PM1_EN |
//! | 0x604 | PM1a_CNT_BLK, PM1_CNT_LEN = 2 | 16 | PM1_CNT: SCI_EN (bit 0), SLP_TYP (bits 12:10), SLP_EN (bit 13) |
//! | 0x608 | PM_TMR_BLK, PM_TMR_LEN = 4 | 32 | 24-bit PM timer at 3.579545 MHz (TMR_VAL_EXT = 0) |
//! | 0x60C | RESET_REG (system I/O, 8 bits), RESET_VALUE = 0x01 | 8 | write [`RESET_VALUE`] to reset |
//!
//! Writing PM1_CNT with SLP_EN set and SLP_TYP equal to [`SLP_TYP_S5`] (5) powers the
//! machine off through [`PlatformRequest::PowerOff`], so the DSDT's `\_S5` package must be
//! `Package () { 5, 5, 0, 0 }`. Other sleep types are ignored and counted, because this
//! machine has no sleep states. SCI_EN reads as 1 from the start, which means to the guest
//! that the machine is already in ACPI mode, so the FADT sets SMI_CMD to 0.
//!
//! Registers may be accessed 1, 2 or 4 bytes wide at any offset inside the block, so an
//! access is split into bytes. A read samples the timer once for all its bytes.
//!
//! NOTE: the SCI (interrupt line [`SCI_IRQ`]) is never raised: there is no power button,
//! and the timer-overflow status bit TMR_STS is never set.

use std::sync::Arc;

use super::{
    fill_unclaimed, BusDevice, Clock, DeviceWindow, GuestErrorLog, PlatformControl, PlatformRequest,
};

/// First I/O port of the block.
pub const ACPI_PM_BASE: u16 = 0x600;
/// Number of I/O ports the block decodes.
pub const ACPI_PM_LEN: u64 = 0x10;
/// FADT PM1a_EVT_BLK: the PM1 status and enable registers.
pub const PM1A_EVT_BLK: u16 = ACPI_PM_BASE;
/// FADT PM1_EVT_LEN in bytes.
pub const PM1_EVT_LEN: u8 = 4;
/// FADT PM1a_CNT_BLK: the PM1 control register.
pub const PM1A_CNT_BLK: u16 = ACPI_PM_BASE + 4;
/// FADT PM1_CNT_LEN in bytes.
pub const PM1_CNT_LEN: u8 = 2;
/// FADT PM_TMR_BLK: the PM timer.
pub const PM_TMR_BLK: u16 = ACPI_PM_BASE + 8;
/// FADT PM_TMR_LEN in bytes.
pub const PM_TMR_LEN: u8 = 4;
/// Frequency of the PM timer, fixed by the ACPI specification.
pub const PM_TIMER_FREQUENCY_HZ: u64 = 3_579_545;
/// I/O port of the FADT RESET_REG.
pub const RESET_REG_PORT: u16 = ACPI_PM_BASE + 0xc;
/// FADT RESET_VALUE: the byte that resets the machine when written to [`RESET_REG_PORT`].
pub const RESET_VALUE: u8 = 0x01;
/// SLP_TYP value of the S5 (soft-off) state, for the DSDT's `\_S5` package.
pub const SLP_TYP_S5: u8 = 5;
/// FADT SCI_INT: the ISA interrupt line of the SCI.
pub const SCI_IRQ: u32 = 9;
/// The bus window of the block.
pub const ACPI_PM_WINDOWS: [DeviceWindow; 1] = [DeviceWindow::new(
    "acpi-pm",
    ACPI_PM_BASE as u64,
    ACPI_PM_LEN,
    0,
)];

const DEVICE: &str = "acpi-pm";

const STATUS_OFFSET: u64 = 0;
const ENABLE_OFFSET: u64 = 2;
const CONTROL_OFFSET: u64 = 4;
const TIMER_OFFSET: u64 = 8;
const RESET_OFFSET: u64 = 0xc;

/// PM1_STS bits that the specification defines (TMR, BM, GBL, PWRBTN, SLPBTN, RTC,
/// PCIEXP_WAKE, WAK).
const STATUS_VALID: u16 = 0x0001 | 0x0010 | 0x0020 | 0x0100 | 0x0200 | 0x0400 | 0x4000 | 0x8000;
/// PM1_EN bits that the specification defines (TMR, GBL, PWRBTN, SLPBTN, RTC,
/// PCIEXP_WAKE_DIS).
const ENABLE_VALID: u16 = 0x0001 | 0x0020 | 0x0100 | 0x0200 | 0x0400 | 0x4000;
const CONTROL_SCI_EN: u16 = 1 << 0;
const CONTROL_BM_RLS: u16 = 1 << 1;
const CONTROL_SLP_TYP_SHIFT: u32 = 10;
const CONTROL_SLP_TYP_MASK: u16 = 0b111 << CONTROL_SLP_TYP_SHIFT;
const CONTROL_SLP_EN: u16 = 1 << 13;
/// PM1_CNT bits that read back what was written; GBL_RLS and SLP_EN are write-only.
const CONTROL_STORED: u16 = CONTROL_SCI_EN | CONTROL_BM_RLS | CONTROL_SLP_TYP_MASK;
/// The PM timer counts in 24 bits when the FADT flag TMR_VAL_EXT is clear.
const TIMER_MASK: u64 = (1 << 24) - 1;

/// Counters of the block, for metrics and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AcpiPmStats {
    /// Power-off requests sent to the platform.
    pub power_offs: u64,
    /// Reset requests sent to the platform.
    pub resets: u64,
    /// Requests for a sleep state other than S5, which were ignored.
    pub unsupported_sleeps: u64,
    /// Guest accesses ignored for a wrong size or an unused offset.
    pub ignored_accesses: u64,
}

/// The ACPI PM1a register block with a PM timer and a reset register.
pub struct AcpiPm {
    platform: Arc<dyn PlatformControl>,
    clock: Arc<dyn Clock>,
    status: u16,
    enable: u16,
    control: u16,
    power_offs: u64,
    resets: u64,
    unsupported_sleeps: GuestErrorLog,
    ignored_accesses: GuestErrorLog,
}

impl AcpiPm {
    /// Creates the block. It sends power-off and reset requests to `platform` and derives
    /// the PM timer from `clock`'s monotonic time.
    pub fn new(platform: Arc<dyn PlatformControl>, clock: Arc<dyn Clock>) -> Self {
        AcpiPm {
            platform,
            clock,
            status: 0,
            enable: 0,
            control: CONTROL_SCI_EN,
            power_offs: 0,
            resets: 0,
            unsupported_sleeps: GuestErrorLog::default(),
            ignored_accesses: GuestErrorLog::default(),
        }
    }

    /// Returns the block's counters.
    pub fn stats(&self) -> AcpiPmStats {
        AcpiPmStats {
            power_offs: self.power_offs,
            resets: self.resets,
            unsupported_sleeps: self.unsupported_sleeps.count(),
            ignored_accesses: self.ignored_accesses.count(),
        }
    }

    fn timer_value(&self) -> u32 {
        let ticks = u128::from(self.clock.monotonic_ns()) * u128::from(PM_TIMER_FREQUENCY_HZ)
            / 1_000_000_000;
        // The mask keeps 24 bits, so the value fits in u32.
        (ticks as u64 & TIMER_MASK) as u32
    }

    /// Returns the byte at `offset`, or `None` for an offset that no register uses.
    fn read_byte(&self, offset: u64, timer: u32) -> Option<u8> {
        let (word, shift) = match offset {
            0..=1 => (u32::from(self.status), (offset - STATUS_OFFSET) * 8),
            2..=3 => (u32::from(self.enable), (offset - ENABLE_OFFSET) * 8),
            4..=5 => (
                u32::from(self.control & CONTROL_STORED),
                (offset - CONTROL_OFFSET) * 8,
            ),
            8..=11 => (timer, (offset - TIMER_OFFSET) * 8),
            // The reset register is write-only.
            RESET_OFFSET => (0, 0),
            _ => return None,
        };
        Some((word >> shift) as u8)
    }

    /// Applies one byte of a write. Returns false for an offset that takes no writes.
    fn write_byte(&mut self, offset: u64, value: u8) -> bool {
        let value = u16::from(value);
        match offset {
            0 => self.status &= !(value & STATUS_VALID),
            1 => self.status &= !((value << 8) & STATUS_VALID),
            2 => self.enable = (self.enable & 0xff00) | (value & ENABLE_VALID),
            3 => self.enable = (self.enable & 0x00ff) | ((value << 8) & ENABLE_VALID),
            4 => self.control = (self.control & 0xff00) | (value & CONTROL_STORED),
            5 => self.write_control_high(value << 8),
            RESET_OFFSET => {
                if value == u16::from(RESET_VALUE) {
                    self.resets += 1;
                    tracing::info!("guest requested a reset through the ACPI reset register");
                    self.platform.request(PlatformRequest::Reset);
                }
            }
            _ => return false,
        }
        true
    }

    /// Stores the high byte of PM1_CNT and enters the sleep state if SLP_EN is set.
    fn write_control_high(&mut self, high: u16) {
        self.control = (self.control & 0x00ff) | (high & CONTROL_STORED);
        if high & CONTROL_SLP_EN == 0 {
            return;
        }
        let sleep_type = (high & CONTROL_SLP_TYP_MASK) >> CONTROL_SLP_TYP_SHIFT;
        if sleep_type == u16::from(SLP_TYP_S5) {
            self.power_offs += 1;
            tracing::info!("guest requested power-off through ACPI S5");
            self.platform.request(PlatformRequest::PowerOff);
        } else {
            self.unsupported_sleeps.record(
                DEVICE,
                format_args!(
                    "ignored request for ACPI sleep type {sleep_type}: only S5 (SLP_TYP {SLP_TYP_S5}) is supported"
                ),
            );
        }
    }

    /// Returns true if an access of `len` bytes at `offset` stays inside the block and has
    /// a width that port I/O can produce.
    fn access_is_valid(offset: u64, len: usize) -> bool {
        matches!(len, 1 | 2 | 4)
            && offset
                .checked_add(len as u64)
                .is_some_and(|end| end <= ACPI_PM_LEN)
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if !Self::access_is_valid(offset, data.len()) {
            self.ignored_accesses.record(
                DEVICE,
                format_args!(
                    "ignored {}-byte read at offset {offset:#x}: accesses are 1, 2 or 4 bytes inside the {ACPI_PM_LEN:#x}-port block",
                    data.len()
                ),
            );
            fill_unclaimed(data);
            return;
        }

        let timer = self.timer_value();
        let mut unused = false;
        for (byte_offset, byte) in (offset..).zip(data.iter_mut()) {
            match self.read_byte(byte_offset, timer) {
                Some(value) => *byte = value,
                None => {
                    *byte = 0xff;
                    unused = true;
                }
            }
        }
        if unused {
            self.ignored_accesses.record(
                DEVICE,
                format_args!("read of unused ports at offset {offset:#x}"),
            );
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if !Self::access_is_valid(offset, data.len()) {
            self.ignored_accesses.record(
                DEVICE,
                format_args!(
                    "ignored {}-byte write at offset {offset:#x}: accesses are 1, 2 or 4 bytes inside the {ACPI_PM_LEN:#x}-port block",
                    data.len()
                ),
            );
            return;
        }

        let mut ignored = false;
        for (byte_offset, &value) in (offset..).zip(data) {
            ignored |= !self.write_byte(byte_offset, value);
        }
        if ignored {
            self.ignored_accesses.record(
                DEVICE,
                format_args!("write to read-only or unused ports at offset {offset:#x}"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::devices::test_utils::{ManualClock, RecordingPlatform};

    fn pm() -> (AcpiPm, Arc<RecordingPlatform>, Arc<ManualClock>) {
        let platform = Arc::new(RecordingPlatform::default());
        let clock = Arc::new(ManualClock::default());
        (
            AcpiPm::new(platform.clone(), clock.clone()),
            platform,
            clock,
        )
    }

    fn port_offset(port: u16) -> u64 {
        u64::from(port - ACPI_PM_BASE)
    }

    fn read16(pm: &mut AcpiPm, offset: u64) -> u16 {
        let mut data = [0u8; 2];
        pm.read(offset, &mut data);
        u16::from_le_bytes(data)
    }

    fn read32(pm: &mut AcpiPm, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        pm.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn sleep_command(sleep_type: u8) -> [u8; 2] {
        let value = (u16::from(sleep_type) << CONTROL_SLP_TYP_SHIFT) | CONTROL_SLP_EN;
        value.to_le_bytes()
    }

    #[test]
    fn s5_sleep_powers_off() {
        let (mut pm, platform, _) = pm();

        pm.write(port_offset(PM1A_CNT_BLK), &sleep_command(SLP_TYP_S5));

        assert_eq!(
            *platform.requests.lock().unwrap(),
            [PlatformRequest::PowerOff]
        );
        assert_eq!(pm.stats().power_offs, 1);
    }

    #[test]
    fn s5_written_in_two_steps_powers_off() {
        let (mut pm, platform, _) = pm();
        let sleep_type = u16::from(SLP_TYP_S5) << CONTROL_SLP_TYP_SHIFT;

        // ACPICA writes SLP_TYP first and then SLP_TYP with SLP_EN.
        pm.write(port_offset(PM1A_CNT_BLK), &sleep_type.to_le_bytes());
        assert!(platform.requests.lock().unwrap().is_empty());
        pm.write(
            port_offset(PM1A_CNT_BLK),
            &(sleep_type | CONTROL_SLP_EN).to_le_bytes(),
        );

        assert_eq!(
            *platform.requests.lock().unwrap(),
            [PlatformRequest::PowerOff]
        );
    }

    #[test]
    fn high_byte_write_powers_off() {
        let (mut pm, platform, _) = pm();

        pm.write(
            port_offset(PM1A_CNT_BLK) + 1,
            &[sleep_command(SLP_TYP_S5)[1]],
        );

        assert_eq!(
            *platform.requests.lock().unwrap(),
            [PlatformRequest::PowerOff]
        );
    }

    #[test]
    fn other_sleep_types_are_ignored() {
        let (mut pm, platform, _) = pm();

        for sleep_type in [0, 1, 3, 4, 7] {
            pm.write(port_offset(PM1A_CNT_BLK), &sleep_command(sleep_type));
        }

        assert!(platform.requests.lock().unwrap().is_empty());
        assert_eq!(pm.stats().unsupported_sleeps, 5);
    }

    #[test]
    fn control_reads_sci_en_without_slp_en() {
        let (mut pm, _, _) = pm();
        assert_eq!(read16(&mut pm, port_offset(PM1A_CNT_BLK)), CONTROL_SCI_EN);

        pm.write(port_offset(PM1A_CNT_BLK), &sleep_command(3));

        let control = read16(&mut pm, port_offset(PM1A_CNT_BLK));
        assert_eq!(control & CONTROL_SLP_EN, 0);
        assert_eq!(control & CONTROL_SLP_TYP_MASK, 3 << CONTROL_SLP_TYP_SHIFT);
    }

    #[test]
    fn enable_register_keeps_valid_bits() {
        let (mut pm, _, _) = pm();

        pm.write(ENABLE_OFFSET, &0xffffu16.to_le_bytes());

        assert_eq!(read16(&mut pm, ENABLE_OFFSET), ENABLE_VALID);
    }

    #[test]
    fn status_bits_clear_on_write_one() {
        let (mut pm, _, _) = pm();
        pm.status = 0x8101;

        pm.write(STATUS_OFFSET, &0x0100u16.to_le_bytes());

        assert_eq!(read16(&mut pm, STATUS_OFFSET), 0x8001);
    }

    #[test]
    fn timer_counts_at_acpi_frequency() {
        let (mut pm, _, clock) = pm();
        let timer = port_offset(PM_TMR_BLK);
        assert_eq!(read32(&mut pm, timer), 0);

        clock.advance(1_000_000_000);
        assert_eq!(read32(&mut pm, timer), PM_TIMER_FREQUENCY_HZ as u32);

        // Ten seconds is more than 2^24 ticks, so the value wraps.
        clock.advance(9_000_000_000);
        let expected = (10 * PM_TIMER_FREQUENCY_HZ) & TIMER_MASK;
        assert_eq!(read32(&mut pm, timer), expected as u32);
    }

    #[test]
    fn timer_ignores_writes() {
        let (mut pm, _, clock) = pm();
        clock.advance(1_000);
        let before = read32(&mut pm, TIMER_OFFSET);

        pm.write(TIMER_OFFSET, &[0, 0, 0, 0]);

        assert_eq!(read32(&mut pm, TIMER_OFFSET), before);
        assert_eq!(pm.stats().ignored_accesses, 1);
    }

    #[test]
    fn reset_register_resets() {
        let (mut pm, platform, _) = pm();

        pm.write(port_offset(RESET_REG_PORT), &[0x02]);
        assert!(platform.requests.lock().unwrap().is_empty());
        pm.write(port_offset(RESET_REG_PORT), &[RESET_VALUE]);

        assert_eq!(*platform.requests.lock().unwrap(), [PlatformRequest::Reset]);
    }

    #[test]
    fn malformed_accesses_are_ignored() {
        let (mut pm, platform, _) = pm();

        let mut eight = [0u8; 8];
        pm.read(0, &mut eight);
        assert_eq!(eight, [0xff; 8]);
        let mut three = [0u8; 3];
        pm.read(0, &mut three);
        assert_eq!(three, [0xff; 3]);
        let mut crossing = [0u8; 4];
        pm.read(ACPI_PM_LEN - 2, &mut crossing);
        assert_eq!(crossing, [0xff; 4]);
        pm.write(u64::MAX, &[1]);
        pm.write(ACPI_PM_LEN - 1, &sleep_command(SLP_TYP_S5));
        let mut reserved = [0u8; 2];
        pm.read(6, &mut reserved);
        assert_eq!(reserved, [0xff; 2]);
        pm.write(6, &[0xff, 0xff]);

        assert!(platform.requests.lock().unwrap().is_empty());
        assert_eq!(pm.stats().ignored_accesses, 7);
    }
}
