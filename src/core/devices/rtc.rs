//! An MC146818 CMOS real-time clock with its 128 bytes of CMOS RAM (index port 0x70, data
//! port 0x71).
//!
//! The clock shows the host's UTC wall time plus an offset that changes when the guest
//! sets the time. Time registers are encoded in BCD or binary and in 12- or 24-hour form as
//! register B selects. Register A's update-in-progress bit is set for the last 244 µs of
//! every second, the window in which the data sheet guarantees no update starts, so a
//! guest that waits for it to clear reads a consistent time.
//!
//! CMOS layout (offsets into the RAM selected through port 0x70):
//!
//! | offset | contents |
//! | --- | --- |
//! | 0x00, 0x02, 0x04 | seconds, minutes, hours |
//! | 0x01, 0x03, 0x05 | alarm seconds, minutes, hours (stored, no alarm fires) |
//! | 0x06 - 0x09 | day of week (1 = Sunday), day of month, month, year (00-99) |
//! | 0x0A | register A: bit 7 update in progress, bits 6:4 divider, bits 3:0 rate |
//! | 0x0B | register B: bit 7 SET, bit 2 binary (else BCD), bit 1 24-hour (else 12-hour) |
//! | 0x0C | register C: bit 4 update-ended flag, cleared by reading |
//! | 0x0D | register D: bit 7 valid RAM and time, always 1 |
//! | 0x15 - 0x16 | base memory in KiB (640) |
//! | 0x17 - 0x18, 0x30 - 0x31 | memory above 1 MiB in KiB, at most 0xFFFF |
//! | 0x2E - 0x2F | checksum of 0x10 - 0x2D, big-endian |
//! | 0x32 | century |
//! | 0x34 - 0x35 | memory between 16 MiB and the 32-bit MMIO hole in 64 KiB units, at most 0xFFFF |
//! | 0x5B - 0x5D | memory above 4 GiB in 64 KiB units |
//!
//! Multi-byte values are little-endian unless noted. Bit 7 of a write to port 0x70 is the
//! NMI mask, which is stored and read back but masks nothing.
//!
//! NOTE: the periodic, alarm and update-ended interrupts (IRQ 8) are not raised.

use std::sync::Arc;

use super::{fill_unclaimed, BusDevice, Clock, DeviceWindow, GuestErrorLog};
use crate::core::memory::{MMIO_HOLE_END, MMIO_HOLE_START};

/// I/O port that selects a CMOS register.
pub const RTC_INDEX_PORT: u16 = 0x70;
/// I/O port that reads and writes the selected CMOS register.
pub const RTC_DATA_PORT: u16 = 0x71;
/// ISA interrupt line of the RTC.
pub const RTC_IRQ: u32 = 8;
/// The bus window of the RTC: the index port at offset 0, the data port at offset 1.
pub const RTC_WINDOWS: [DeviceWindow; 1] =
    [DeviceWindow::new("cmos-rtc", RTC_INDEX_PORT as u64, 2, 0)];

const DEVICE: &str = "cmos-rtc";

const CMOS_SIZE: usize = 128;
const INDEX_MASK: u8 = 0x7f;
const NMI_DISABLE: u8 = 0x80;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_BASE_MEMORY: u8 = 0x15;
const REG_EXTENDED_MEMORY: u8 = 0x17;
const REG_CHECKSUM: u8 = 0x2e;
const REG_EXTENDED_MEMORY_COPY: u8 = 0x30;
const REG_CENTURY: u8 = 0x32;
const REG_MEMORY_ABOVE_16M: u8 = 0x34;
const REG_MEMORY_ABOVE_4G: u8 = 0x5b;
/// Registers covered by the checksum at [`REG_CHECKSUM`].
const CHECKSUM_RANGE: std::ops::RangeInclusive<usize> = 0x10..=0x2d;
/// Registers that hold the time and date, rather than plain RAM.
const TIME_REGISTERS: [u8; 8] = [
    REG_SECONDS,
    REG_MINUTES,
    REG_HOURS,
    REG_WEEKDAY,
    REG_DAY,
    REG_MONTH,
    REG_YEAR,
    REG_CENTURY,
];

const A_UPDATE_IN_PROGRESS: u8 = 1 << 7;
const A_DIVIDER_MASK: u8 = 0b111 << 4;
/// Divider setting for a 32.768 kHz time base: the only one on which the clock runs.
const A_DIVIDER_RUNNING: u8 = 0b010 << 4;
/// Power-on register A: 32.768 kHz time base, 1024 Hz periodic rate.
const A_DEFAULT: u8 = A_DIVIDER_RUNNING | 0x6;
const B_SET: u8 = 1 << 7;
const B_BINARY: u8 = 1 << 2;
const B_24_HOUR: u8 = 1 << 1;
/// Power-on register B: 24-hour BCD, no interrupts.
const B_DEFAULT: u8 = B_24_HOUR;
const C_UPDATE_ENDED: u8 = 1 << 4;
const D_VALID_RAM_AND_TIME: u8 = 1 << 7;
/// Hour bit 7 in 12-hour mode: the time is after noon.
const HOUR_PM: u8 = 1 << 7;

const NANOS_PER_SECOND: u64 = 1_000_000_000;
/// Length of the update-in-progress window before each second boundary, in nanoseconds.
const UPDATE_IN_PROGRESS_NS: u64 = 244_000;
const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const BLOCK_64K: u64 = 64 * KIB;

/// A calendar date and time of day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DateTime {
    year: i64,
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
    /// Day of the week, 1 = Sunday through 7 = Saturday, as the RTC counts.
    weekday: u8,
}

/// Returns the number of days from 1970-01-01 to the given date of the proleptic Gregorian
/// calendar, counting eras of 400 years (146097 days) from 0000-03-01.
fn days_from_civil(year: i64, month: u8, day: u8) -> i64 {
    let month = i64::from(month);
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let shifted_month = (month + 9) % 12;
    let day_of_year = (153 * shifted_month + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// Converts seconds since the Unix epoch to a UTC date and time.
fn civil_from_unix(seconds: i64) -> DateTime {
    let days = seconds.div_euclid(86_400);
    let second_of_day = seconds.rem_euclid(86_400);

    let shifted = days + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    // 1970-01-01 was a Thursday, weekday 5 when Sunday is 1.
    let weekday = (days + 4).rem_euclid(7) + 1;

    // Every value below is bounded by the arithmetic above (month 1-12, day 1-31, ...).
    DateTime {
        year,
        month: month as u8,
        day: day as u8,
        hour: (second_of_day / 3600) as u8,
        minute: (second_of_day / 60 % 60) as u8,
        second: (second_of_day % 60) as u8,
        weekday: weekday as u8,
    }
}

/// Counters of the RTC, for metrics and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RtcStats {
    /// Times the guest set the clock.
    pub time_sets: u64,
    /// Guest time settings rejected because the registers held no valid date.
    pub invalid_time_sets: u64,
    /// Guest accesses ignored for a wrong size or an offset outside the two ports.
    pub ignored_accesses: u64,
}

/// The CMOS RTC and its RAM.
pub struct Rtc {
    clock: Arc<dyn Clock>,
    /// Selected register, 0-127.
    index: u8,
    nmi_disabled: bool,
    /// CMOS RAM. Time registers in it are only meaningful while register B's SET bit is
    /// set, because otherwise reads compute them from the clock.
    ram: [u8; CMOS_SIZE],
    /// Guest time minus host wall time, in seconds.
    offset_seconds: i64,
    /// Second (guest time) at the last read of register C, for the update-ended flag.
    last_register_c_second: i64,
    time_sets: u64,
    invalid_time_sets: GuestErrorLog,
    ignored_accesses: GuestErrorLog,
}

impl Rtc {
    /// Creates an RTC that reads wall time from `clock` and reports `memory_bytes` of
    /// guest RAM, laid out as `core::memory` places it, in the firmware memory-size bytes.
    pub fn new(clock: Arc<dyn Clock>, memory_bytes: u64) -> Self {
        let mut rtc = Rtc {
            clock,
            index: 0,
            nmi_disabled: false,
            ram: [0; CMOS_SIZE],
            offset_seconds: 0,
            last_register_c_second: 0,
            time_sets: 0,
            invalid_time_sets: GuestErrorLog::default(),
            ignored_accesses: GuestErrorLog::default(),
        };
        rtc.ram[usize::from(REG_A)] = A_DEFAULT;
        rtc.ram[usize::from(REG_B)] = B_DEFAULT;
        rtc.store_memory_size(memory_bytes);
        rtc.last_register_c_second = rtc.guest_seconds();
        rtc
    }

    /// Returns the RTC's counters.
    pub fn stats(&self) -> RtcStats {
        RtcStats {
            time_sets: self.time_sets,
            invalid_time_sets: self.invalid_time_sets.count(),
            ignored_accesses: self.ignored_accesses.count(),
        }
    }

    fn store_memory_size(&mut self, memory_bytes: u64) {
        let below_hole = memory_bytes.min(MMIO_HOLE_START);
        let above_4g = memory_bytes - below_hole;

        self.store_u16(REG_BASE_MEMORY, 640);
        let extended_kib = (below_hole.saturating_sub(MIB) / KIB).min(0xffff) as u16;
        self.store_u16(REG_EXTENDED_MEMORY, extended_kib);
        self.store_u16(REG_EXTENDED_MEMORY_COPY, extended_kib);
        let above_16m = (below_hole.saturating_sub(16 * MIB) / BLOCK_64K).min(0xffff) as u16;
        self.store_u16(REG_MEMORY_ABOVE_16M, above_16m);
        let above_4g_blocks = (above_4g / BLOCK_64K).min(0xff_ffff);
        let base = usize::from(REG_MEMORY_ABOVE_4G);
        self.ram[base..base + 3].copy_from_slice(&above_4g_blocks.to_le_bytes()[..3]);
        debug_assert_eq!(MMIO_HOLE_END, 1 << 32, "RAM above the hole starts at 4 GiB");

        self.update_checksum();
    }

    fn store_u16(&mut self, register: u8, value: u16) {
        let at = usize::from(register);
        self.ram[at..at + 2].copy_from_slice(&value.to_le_bytes());
    }

    fn update_checksum(&mut self) {
        let sum: u16 = self.ram[CHECKSUM_RANGE]
            .iter()
            .map(|&b| u16::from(b))
            .fold(0, u16::wrapping_add);
        let at = usize::from(REG_CHECKSUM);
        self.ram[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    }

    fn register_b(&self) -> u8 {
        self.ram[usize::from(REG_B)]
    }

    fn host_seconds_and_nanos(&self) -> (i64, u64) {
        let wall = self.clock.wall_ns();
        // u64 nanoseconds cover about 584 years, so the seconds fit in i64.
        ((wall / NANOS_PER_SECOND) as i64, wall % NANOS_PER_SECOND)
    }

    fn guest_seconds(&self) -> i64 {
        self.host_seconds_and_nanos()
            .0
            .saturating_add(self.offset_seconds)
    }

    fn encode(&self, value: u8) -> u8 {
        if self.register_b() & B_BINARY != 0 {
            value
        } else {
            ((value / 10) << 4) | (value % 10)
        }
    }

    /// Decodes a BCD or binary register value, or returns `None` for an invalid BCD digit.
    fn decode(&self, value: u8) -> Option<u8> {
        if self.register_b() & B_BINARY != 0 {
            return Some(value);
        }
        let (tens, units) = (value >> 4, value & 0xf);
        (tens <= 9 && units <= 9).then_some(tens * 10 + units)
    }

    fn encode_hour(&self, hour: u8) -> u8 {
        if self.register_b() & B_24_HOUR != 0 {
            return self.encode(hour);
        }
        let pm = if hour >= 12 { HOUR_PM } else { 0 };
        let twelve_hour = match hour % 12 {
            0 => 12,
            h => h,
        };
        self.encode(twelve_hour) | pm
    }

    fn decode_hour(&self, value: u8) -> Option<u8> {
        if self.register_b() & B_24_HOUR != 0 {
            return self.decode(value);
        }
        let twelve_hour = self.decode(value & !HOUR_PM)?;
        if !(1..=12).contains(&twelve_hour) {
            return None;
        }
        let pm = if value & HOUR_PM != 0 { 12 } else { 0 };
        Some(twelve_hour % 12 + pm)
    }

    /// Writes the current guest time into the time registers of the RAM.
    fn latch_time(&mut self) {
        let now = civil_from_unix(self.guest_seconds());
        let year_of_century = now.year.rem_euclid(100) as u8;
        let century = now.year.div_euclid(100).clamp(0, 99) as u8;
        let values = [
            (REG_SECONDS, self.encode(now.second)),
            (REG_MINUTES, self.encode(now.minute)),
            (REG_HOURS, self.encode_hour(now.hour)),
            (REG_WEEKDAY, self.encode(now.weekday)),
            (REG_DAY, self.encode(now.day)),
            (REG_MONTH, self.encode(now.month)),
            (REG_YEAR, self.encode(year_of_century)),
            (REG_CENTURY, self.encode(century)),
        ];
        for (register, value) in values {
            self.ram[usize::from(register)] = value;
        }
    }

    /// Parses the time registers of the RAM as a date, or returns `None` if they hold no
    /// valid one. The weekday register is not checked, as on the chip.
    fn registers_to_unix(&self) -> Option<i64> {
        let reg = |r: u8| self.ram[usize::from(r)];
        let second = self.decode(reg(REG_SECONDS))?;
        let minute = self.decode(reg(REG_MINUTES))?;
        let hour = self.decode_hour(reg(REG_HOURS))?;
        let day = self.decode(reg(REG_DAY))?;
        let month = self.decode(reg(REG_MONTH))?;
        let year = self.decode(reg(REG_YEAR))?;
        let century = self.decode(reg(REG_CENTURY))?;
        if second > 59 || minute > 59 || hour > 23 || year > 99 || century > 99 {
            return None;
        }
        if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
            return None;
        }
        let year = i64::from(century) * 100 + i64::from(year);
        let days = days_from_civil(year, month, day);
        // Reject dates such as February 30 that roll over into the next month.
        if civil_from_unix(days * 86_400).day != day {
            return None;
        }
        Some(days * 86_400 + i64::from(hour) * 3600 + i64::from(minute) * 60 + i64::from(second))
    }

    /// Makes the time registers of the RAM the clock's new time.
    fn commit_time(&mut self) {
        match self.registers_to_unix() {
            Some(guest) => {
                self.offset_seconds = guest - self.host_seconds_and_nanos().0;
                self.last_register_c_second = guest;
                self.time_sets += 1;
            }
            None => self.invalid_time_sets.record(
                DEVICE,
                format_args!("ignored an invalid date written by the guest, so the clock keeps its previous time"),
            ),
        }
    }

    fn update_in_progress(&self) -> bool {
        let running = self.ram[usize::from(REG_A)] & A_DIVIDER_MASK == A_DIVIDER_RUNNING;
        let nanos = self.host_seconds_and_nanos().1;
        running
            && self.register_b() & B_SET == 0
            && nanos >= NANOS_PER_SECOND - UPDATE_IN_PROGRESS_NS
    }

    fn read_register(&mut self, register: u8) -> u8 {
        match register {
            REG_A => {
                let uip = if self.update_in_progress() {
                    A_UPDATE_IN_PROGRESS
                } else {
                    0
                };
                (self.ram[usize::from(REG_A)] & !A_UPDATE_IN_PROGRESS) | uip
            }
            REG_C => {
                let now = self.guest_seconds();
                let flags = if now != self.last_register_c_second {
                    C_UPDATE_ENDED
                } else {
                    0
                };
                self.last_register_c_second = now;
                flags
            }
            REG_D => D_VALID_RAM_AND_TIME,
            r if TIME_REGISTERS.contains(&r) => {
                if self.register_b() & B_SET == 0 {
                    self.latch_time();
                }
                self.ram[usize::from(r)]
            }
            r => self.ram[usize::from(r)],
        }
    }

    fn write_register(&mut self, register: u8, value: u8) {
        match register {
            REG_A => self.ram[usize::from(REG_A)] = value & !A_UPDATE_IN_PROGRESS,
            REG_B => self.write_register_b(value),
            REG_C | REG_D => self.ignored_accesses.record(
                DEVICE,
                format_args!("ignored write of {value:#04x} to read-only register {register:#04x}"),
            ),
            r if TIME_REGISTERS.contains(&r) => {
                let setting = self.register_b() & B_SET != 0;
                if !setting {
                    self.latch_time();
                }
                self.ram[usize::from(r)] = value;
                if !setting {
                    self.commit_time();
                }
            }
            r => {
                self.ram[usize::from(r)] = value;
                if CHECKSUM_RANGE.contains(&usize::from(r)) {
                    self.update_checksum();
                }
            }
        }
    }

    fn write_register_b(&mut self, value: u8) {
        let old = self.register_b();
        let entering_set = value & B_SET != 0 && old & B_SET == 0;
        let leaving_set = value & B_SET == 0 && old & B_SET != 0;
        if entering_set {
            // Freeze the registers in the old format before the format bits change.
            self.latch_time();
        }
        self.ram[usize::from(REG_B)] = value;
        if leaving_set {
            self.commit_time();
        }
    }
}

impl BusDevice for Rtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (offset, data.len()) {
            (0, 1) => data[0] = self.index | if self.nmi_disabled { NMI_DISABLE } else { 0 },
            (1, 1) => data[0] = self.read_register(self.index),
            _ => {
                self.ignored_accesses.record(
                    DEVICE,
                    format_args!(
                        "ignored {}-byte read at offset {offset:#x}: only 1-byte accesses to ports 0x70 and 0x71 are valid",
                        data.len()
                    ),
                );
                fill_unclaimed(data);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (0, &[value]) => {
                self.index = value & INDEX_MASK;
                self.nmi_disabled = value & NMI_DISABLE != 0;
            }
            (1, &[value]) => self.write_register(self.index, value),
            _ => self.ignored_accesses.record(
                DEVICE,
                format_args!(
                    "ignored {}-byte write at offset {offset:#x}: only 1-byte accesses to ports 0x70 and 0x71 are valid",
                    data.len()
                ),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::core::devices::test_utils::ManualClock;

    /// 2024-02-29 23:59:58 UTC, a Thursday.
    const LEAP_DAY_NIGHT: u64 = 1_709_251_198;

    fn rtc_at(unix_seconds: u64, memory_bytes: u64) -> (Rtc, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::default());
        clock
            .wall
            .store(unix_seconds * NANOS_PER_SECOND, Ordering::SeqCst);
        (Rtc::new(clock.clone(), memory_bytes), clock)
    }

    fn read_cmos(rtc: &mut Rtc, register: u8) -> u8 {
        rtc.write(0, &[register]);
        let mut data = [0];
        rtc.read(1, &mut data);
        data[0]
    }

    fn write_cmos(rtc: &mut Rtc, register: u8, value: u8) {
        rtc.write(0, &[register]);
        rtc.write(1, &[value]);
    }

    fn read_time(rtc: &mut Rtc) -> [u8; 8] {
        TIME_REGISTERS.map(|r| read_cmos(rtc, r))
    }

    #[test]
    fn civil_conversion_round_trips() {
        let cases = [
            (0, (1970, 1, 1, 5)),
            (LEAP_DAY_NIGHT as i64, (2024, 2, 29, 5)),
            (946_684_799, (1999, 12, 31, 6)),
            (4_107_542_400, (2100, 3, 1, 2)),
            (-86_400, (1969, 12, 31, 4)),
        ];
        for (seconds, (year, month, day, weekday)) in cases {
            let civil = civil_from_unix(seconds);
            assert_eq!(
                (civil.year, civil.month, civil.day, civil.weekday),
                (year, month, day, weekday),
                "{seconds}"
            );
            let midnight = days_from_civil(year, month, day) * 86_400;
            assert_eq!(midnight, seconds - seconds.rem_euclid(86_400), "{seconds}");
        }
    }

    #[test]
    fn time_reads_in_bcd_by_default() {
        let (mut rtc, _) = rtc_at(LEAP_DAY_NIGHT, 0);

        assert_eq!(
            read_time(&mut rtc),
            [0x58, 0x59, 0x23, 0x05, 0x29, 0x02, 0x24, 0x20]
        );
    }

    #[test]
    fn time_reads_in_binary_mode() {
        let (mut rtc, _) = rtc_at(LEAP_DAY_NIGHT, 0);

        write_cmos(&mut rtc, REG_B, B_24_HOUR | B_BINARY);

        assert_eq!(read_time(&mut rtc), [58, 59, 23, 5, 29, 2, 24, 20]);
    }

    #[test]
    fn hours_read_in_12_hour_mode() {
        let (mut rtc, clock) = rtc_at(LEAP_DAY_NIGHT, 0);
        write_cmos(&mut rtc, REG_B, 0);
        assert_eq!(read_cmos(&mut rtc, REG_HOURS), HOUR_PM | 0x11);

        clock.advance(2 * NANOS_PER_SECOND);
        assert_eq!(read_cmos(&mut rtc, REG_HOURS), 0x12, "midnight is 12 AM");

        clock.advance(12 * 3600 * NANOS_PER_SECOND);
        assert_eq!(
            read_cmos(&mut rtc, REG_HOURS),
            HOUR_PM | 0x12,
            "noon is 12 PM"
        );
    }

    #[test]
    fn clock_follows_host_time() {
        let (mut rtc, clock) = rtc_at(LEAP_DAY_NIGHT, 0);

        clock.advance(2 * NANOS_PER_SECOND);

        assert_eq!(
            read_time(&mut rtc),
            [0x00, 0x00, 0x00, 0x06, 0x01, 0x03, 0x24, 0x20]
        );
    }

    #[test]
    fn update_in_progress_before_second_boundary() {
        let (mut rtc, clock) = rtc_at(LEAP_DAY_NIGHT, 0);
        assert_eq!(read_cmos(&mut rtc, REG_A), A_DEFAULT);

        clock.advance(NANOS_PER_SECOND - UPDATE_IN_PROGRESS_NS);
        assert_eq!(read_cmos(&mut rtc, REG_A), A_DEFAULT | A_UPDATE_IN_PROGRESS);

        clock.advance(UPDATE_IN_PROGRESS_NS);
        assert_eq!(read_cmos(&mut rtc, REG_A), A_DEFAULT);
    }

    #[test]
    fn update_in_progress_needs_running_divider() {
        let (mut rtc, clock) = rtc_at(LEAP_DAY_NIGHT, 0);
        clock.advance(NANOS_PER_SECOND - 1);

        write_cmos(&mut rtc, REG_A, 0x70);

        assert_eq!(read_cmos(&mut rtc, REG_A), 0x70);
    }

    #[test]
    fn guest_sets_time_with_set_bit() {
        let (mut rtc, clock) = rtc_at(LEAP_DAY_NIGHT, 0);

        write_cmos(&mut rtc, REG_B, B_SET | B_24_HOUR | B_BINARY);
        for (register, value) in [
            (REG_SECONDS, 30),
            (REG_MINUTES, 15),
            (REG_HOURS, 8),
            (REG_DAY, 1),
            (REG_MONTH, 1),
            (REG_YEAR, 0),
            (REG_CENTURY, 20),
        ] {
            write_cmos(&mut rtc, register, value);
        }
        clock.advance(5 * NANOS_PER_SECOND);
        assert_eq!(read_cmos(&mut rtc, REG_SECONDS), 30, "frozen while SET");
        write_cmos(&mut rtc, REG_B, B_24_HOUR | B_BINARY);
        clock.advance(3 * NANOS_PER_SECOND);

        assert_eq!(read_time(&mut rtc), [33, 15, 8, 7, 1, 1, 0, 20]);
        assert_eq!(rtc.stats().time_sets, 1);
    }

    #[test]
    fn guest_sets_single_register() {
        let (mut rtc, _) = rtc_at(LEAP_DAY_NIGHT, 0);

        write_cmos(&mut rtc, REG_MINUTES, 0x10);

        assert_eq!(
            read_time(&mut rtc),
            [0x58, 0x10, 0x23, 0x05, 0x29, 0x02, 0x24, 0x20]
        );
    }

    #[test]
    fn invalid_time_set_is_rejected() {
        let (mut rtc, _) = rtc_at(LEAP_DAY_NIGHT, 0);

        write_cmos(&mut rtc, REG_B, B_SET | B_24_HOUR);
        write_cmos(&mut rtc, REG_DAY, 0x30);
        write_cmos(&mut rtc, REG_B, B_24_HOUR);
        write_cmos(&mut rtc, REG_MONTH, 0x1a);

        assert_eq!(rtc.stats().invalid_time_sets, 2);
        assert_eq!(read_cmos(&mut rtc, REG_DAY), 0x29, "February 30 rejected");
        assert_eq!(read_cmos(&mut rtc, REG_MONTH), 0x02, "bad BCD rejected");
    }

    #[test]
    fn register_c_reports_update_ended() {
        let (mut rtc, clock) = rtc_at(LEAP_DAY_NIGHT, 0);
        assert_eq!(read_cmos(&mut rtc, REG_C), 0);

        clock.advance(NANOS_PER_SECOND);

        assert_eq!(read_cmos(&mut rtc, REG_C), C_UPDATE_ENDED);
        assert_eq!(read_cmos(&mut rtc, REG_C), 0, "reading clears the flag");
    }

    #[test]
    fn status_registers_are_read_only() {
        let (mut rtc, _) = rtc_at(LEAP_DAY_NIGHT, 0);

        write_cmos(&mut rtc, REG_D, 0);
        write_cmos(&mut rtc, REG_C, 0xff);

        assert_eq!(read_cmos(&mut rtc, REG_D), D_VALID_RAM_AND_TIME);
        assert_eq!(read_cmos(&mut rtc, REG_C), 0);
        assert_eq!(rtc.stats().ignored_accesses, 2);
    }

    #[test]
    fn memory_size_bytes_for_small_guest() {
        let (mut rtc, _) = rtc_at(0, 256 * MIB);

        assert_eq!(read_cmos(&mut rtc, 0x15), 0x80);
        assert_eq!(read_cmos(&mut rtc, 0x16), 0x02);
        assert_eq!(read_cmos(&mut rtc, 0x17), 0xff);
        assert_eq!(read_cmos(&mut rtc, 0x18), 0xff);
        assert_eq!(read_cmos(&mut rtc, 0x30), 0xff);
        assert_eq!(read_cmos(&mut rtc, 0x31), 0xff);
        // (256 - 16) MiB in 64 KiB blocks is 3840 = 0x0F00.
        assert_eq!(read_cmos(&mut rtc, 0x34), 0x00);
        assert_eq!(read_cmos(&mut rtc, 0x35), 0x0f);
        for register in 0x5b..=0x5d {
            assert_eq!(read_cmos(&mut rtc, register), 0, "{register:#x}");
        }
    }

    #[test]
    fn memory_size_bytes_above_4g() {
        let (mut rtc, _) = rtc_at(0, 8 << 30);

        // 3 GiB below the hole: (3072 - 16) MiB in 64 KiB blocks is 48896 = 0xBF00.
        assert_eq!(read_cmos(&mut rtc, 0x34), 0x00);
        assert_eq!(read_cmos(&mut rtc, 0x35), 0xbf);
        // 5 GiB above 4 GiB in 64 KiB blocks is 81920 = 0x014000.
        assert_eq!(read_cmos(&mut rtc, 0x5b), 0x00);
        assert_eq!(read_cmos(&mut rtc, 0x5c), 0x40);
        assert_eq!(read_cmos(&mut rtc, 0x5d), 0x01);
    }

    #[test]
    fn checksum_covers_configuration_bytes() {
        let (mut rtc, _) = rtc_at(0, 64 * MIB);
        let checksum = |rtc: &mut Rtc| {
            u16::from_be_bytes([
                read_cmos(rtc, REG_CHECKSUM),
                read_cmos(rtc, REG_CHECKSUM + 1),
            ])
        };
        let expected: u16 = (0x10..=0x2d)
            .map(|r| u16::from(read_cmos(&mut rtc, r)))
            .sum();
        assert_eq!(checksum(&mut rtc), expected);

        write_cmos(&mut rtc, 0x10, 0x40);

        assert_eq!(checksum(&mut rtc), expected + 0x40);
    }

    #[test]
    fn index_port_keeps_nmi_bit() {
        let (mut rtc, _) = rtc_at(0, 0);
        write_cmos(&mut rtc, 0x40, 0xab);

        rtc.write(0, &[NMI_DISABLE | 0x40]);
        let mut data = [0];
        rtc.read(0, &mut data);
        assert_eq!(data[0], NMI_DISABLE | 0x40);
        rtc.read(1, &mut data);
        assert_eq!(data[0], 0xab);
    }

    #[test]
    fn malformed_accesses_are_ignored() {
        let (mut rtc, _) = rtc_at(LEAP_DAY_NIGHT, 0);
        write_cmos(&mut rtc, 0x40, 0x12);

        let mut wide = [0u8; 2];
        rtc.read(0, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
        rtc.write(0, &[0x10, 0x11]);
        rtc.write(2, &[0x10]);
        rtc.write(u64::MAX, &[]);
        let mut byte = [0];
        rtc.read(5, &mut byte);

        assert_eq!(byte, [0xff]);
        assert_eq!(read_cmos(&mut rtc, 0x40), 0x12);
        assert_eq!(rtc.stats().ignored_accesses, 5);
    }
}
