//! An 8254 programmable interval timer (ports 0x40-0x43) and port 0x61, which gates
//! channel 2 and shows its output.
//!
//! The counters are not stepped. Each channel stores when it started counting, and reads
//! compute the count and the output level from the elapsed time at 1.193182 MHz. Port
//! accesses read the time from a [`Clock`]. The event loop passes the same clock's
//! monotonic time to [`Pit::next_deadline`], to sleep until the next rising edge of
//! channel 0's output, and to [`Pit::advance`], which reports the edges that raise IRQ 0.
//!
//! Device offsets: 0-2 are the channel data ports (0x40-0x42), 3 is the control word
//! (0x43, write-only), and 4 is port 0x61:
//!
//! | port 0x61 bit | meaning |
//! | --- | --- |
//! | 0 | channel 2 gate (read/write) |
//! | 1 | speaker data enable (read/write, no sound is made) |
//! | 2, 3 | parity and channel check disable (stored) |
//! | 4 | refresh toggle, flips every 15.085 µs (read-only) |
//! | 5 | channel 2 output (read-only) |
//!
//! Modes 0 to 5, binary and BCD counting, counter latch, read-back of count and status, and
//! the low-byte, high-byte and low-then-high access modes follow the 8254 data sheet.
//!
//! NOTE: a new count written in modes 2 and 3 restarts the period at once, while the chip
//! waits for the current period to end.

use std::sync::Arc;

use super::{fill_unclaimed, BusDevice, Clock, DeviceWindow, GuestErrorLog};

/// First I/O port of the PIT (channel 0 data).
pub const PIT_BASE_PORT: u16 = 0x40;
/// I/O port of the system control port B, which gates channel 2.
pub const PORT_B: u16 = 0x61;
/// ISA interrupt line of channel 0.
pub const PIT_IRQ: u32 = 0;
/// Input clock of every channel.
pub const PIT_FREQUENCY_HZ: u64 = 1_193_182;
/// Device offset of port 0x61.
pub const PORT_B_OFFSET: u64 = 4;
/// The two bus windows of the PIT. The i8042 owns ports 0x60 and 0x64 around port 0x61.
pub const PIT_WINDOWS: [DeviceWindow; 2] = [
    DeviceWindow::new("pit", PIT_BASE_PORT as u64, 4, 0),
    DeviceWindow::new("pit-port-b", PORT_B as u64, 1, PORT_B_OFFSET),
];

const DEVICE: &str = "pit";
const CONTROL_OFFSET: u64 = 3;
const NANOS_PER_SECOND: u128 = 1_000_000_000;
/// Half period of the DRAM refresh request shown in port 0x61 bit 4, in nanoseconds.
const REFRESH_TOGGLE_NS: u64 = 15_085;

const CONTROL_SELECT_SHIFT: u8 = 6;
const CONTROL_READ_BACK: u8 = 0b11;
const CONTROL_ACCESS_SHIFT: u8 = 4;
const CONTROL_ACCESS_LATCH: u8 = 0b00;
const CONTROL_MODE_SHIFT: u8 = 1;
const CONTROL_BCD: u8 = 1 << 0;
/// Read-back bit 5, active low: latch the count of the selected channels.
const READ_BACK_NO_COUNT: u8 = 1 << 5;
/// Read-back bit 4, active low: latch the status of the selected channels.
const READ_BACK_NO_STATUS: u8 = 1 << 4;
const STATUS_OUTPUT: u8 = 1 << 7;
const STATUS_NULL_COUNT: u8 = 1 << 6;

const PORT_B_GATE2: u8 = 1 << 0;
/// Port 0x61 bits that a write stores: gate, speaker enable and the two check disables.
const PORT_B_WRITABLE: u8 = 0x0f;
const PORT_B_REFRESH: u8 = 1 << 4;
const PORT_B_OUT2: u8 = 1 << 5;

/// Access mode of a channel data port: which bytes of the 16-bit count it transfers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Low,
    High,
    LowThenHigh,
}

impl Access {
    fn from_bits(bits: u8) -> Self {
        match bits {
            0b01 => Access::Low,
            0b10 => Access::High,
            _ => Access::LowThenHigh,
        }
    }

    fn bits(self) -> u8 {
        match self {
            Access::Low => 0b01,
            Access::High => 0b10,
            Access::LowThenHigh => 0b11,
        }
    }
}

/// Whether and since when a channel counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Counting {
    /// No count written since the control word, or modes 1 and 5 waiting for a trigger.
    Idle,
    /// Counting since `start_ns` on the clock.
    Running { start_ns: u64 },
    /// Stopped by a low gate after counting for `elapsed_ns`.
    Suspended { elapsed_ns: u64 },
}

/// A value held for reading by a latch command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LatchedCount {
    value: u16,
    /// For low-then-high access: the low byte was read already.
    low_read: bool,
}

/// One counter of the 8254.
#[derive(Debug, Clone)]
struct Channel {
    mode: u8,
    access: Access,
    bcd: bool,
    /// Count as written, 0 standing for the full range (65536, or 10000 in BCD).
    reload: u16,
    counting: Counting,
    gate: bool,
    null_count: bool,
    /// Low byte of a low-then-high count write, waiting for its high byte.
    pending_low: Option<u8>,
    /// For low-then-high reads of the live count: the low byte was read already.
    live_low_read: bool,
    latched_count: Option<LatchedCount>,
    latched_status: Option<u8>,
    /// Ticks since the count started up to which output edges were reported.
    reported_ticks: u64,
}

/// Converts nanoseconds to whole input clock ticks.
fn ns_to_ticks(ns: u64) -> u64 {
    (u128::from(ns) * u128::from(PIT_FREQUENCY_HZ) / NANOS_PER_SECOND) as u64
}

/// Converts ticks to the nanoseconds after which that many ticks have passed.
fn ticks_to_ns(ticks: u64) -> u64 {
    let ns = (u128::from(ticks) * NANOS_PER_SECOND).div_ceil(u128::from(PIT_FREQUENCY_HZ));
    u64::try_from(ns).unwrap_or(u64::MAX)
}

fn bcd_to_binary(value: u16) -> u32 {
    let digits = [
        value >> 12,
        (value >> 8) & 0xf,
        (value >> 4) & 0xf,
        value & 0xf,
    ];
    // A digit above 9 is invalid in BCD. It counts at its binary weight rather than
    // failing, so a confused guest still gets a running timer.
    digits
        .iter()
        .fold(0, |acc, &digit| acc * 10 + u32::from(digit))
}

fn binary_to_bcd(value: u32) -> u16 {
    let mut bcd = 0u16;
    for shift in [12, 8, 4, 0] {
        let weight = 10u32.pow(shift / 4);
        bcd |= (((value / weight) % 10) as u16) << shift;
    }
    bcd
}

impl Channel {
    fn new(gate: bool) -> Self {
        Channel {
            mode: 0,
            access: Access::LowThenHigh,
            bcd: false,
            reload: 0,
            counting: Counting::Idle,
            gate,
            null_count: true,
            pending_low: None,
            live_low_read: false,
            latched_count: None,
            latched_status: None,
            reported_ticks: 0,
        }
    }

    /// Counter modulus: 10000 in BCD, 65536 in binary.
    fn modulus(&self) -> u32 {
        if self.bcd {
            10_000
        } else {
            1 << 16
        }
    }

    /// Returns the count in input ticks, with a written 0 meaning the full modulus.
    fn period(&self) -> u64 {
        let count = if self.bcd {
            bcd_to_binary(self.reload) % self.modulus()
        } else {
            u32::from(self.reload)
        };
        u64::from(if count == 0 { self.modulus() } else { count })
    }

    fn elapsed_ticks(&self, now_ns: u64) -> Option<u64> {
        match self.counting {
            Counting::Idle => None,
            Counting::Running { start_ns } => Some(ns_to_ticks(now_ns.saturating_sub(start_ns))),
            Counting::Suspended { elapsed_ns } => Some(ns_to_ticks(elapsed_ns)),
        }
    }

    /// Returns the output level at `now_ns`.
    fn output(&self, now_ns: u64) -> bool {
        let suspended = matches!(self.counting, Counting::Suspended { .. });
        let Some(ticks) = self.elapsed_ticks(now_ns) else {
            // Mode 0 drives the output low from the control word on; the others high.
            return self.mode != 0;
        };
        let period = self.period();
        match self.mode {
            0 | 1 => ticks >= period,
            2 => suspended || ticks % period != period - 1,
            3 => suspended || ticks % period < period.div_ceil(2),
            _ => ticks != period,
        }
    }

    /// Returns the counting element's value at `now_ns`, in the channel's encoding.
    fn count(&self, now_ns: u64) -> u16 {
        let modulus = u64::from(self.modulus());
        let Some(ticks) = self.elapsed_ticks(now_ns) else {
            return self.reload;
        };
        let period = self.period();
        let value = match self.mode {
            2 => period - ticks % period,
            3 => {
                let phase = ticks % period;
                let high_half = period.div_ceil(2);
                let into_half = if phase < high_half {
                    phase
                } else {
                    phase - high_half
                };
                period.saturating_sub(2 * into_half)
            }
            // Modes 0, 1, 4 and 5 count down through zero and wrap around.
            _ => (period + modulus - ticks % modulus) % modulus,
        } % modulus;
        if self.bcd {
            binary_to_bcd(value as u32)
        } else {
            value as u16
        }
    }

    fn status(&self, now_ns: u64) -> u8 {
        let mut status = (self.access.bits() << CONTROL_ACCESS_SHIFT)
            | (self.mode << CONTROL_MODE_SHIFT)
            | u8::from(self.bcd);
        if self.output(now_ns) {
            status |= STATUS_OUTPUT;
        }
        if self.null_count {
            status |= STATUS_NULL_COUNT;
        }
        status
    }

    fn restart(&mut self, now_ns: u64) {
        self.counting = Counting::Running { start_ns: now_ns };
        self.reported_ticks = 0;
    }

    fn set_control(&mut self, control: u8) {
        let mode = (control >> CONTROL_MODE_SHIFT) & 0b111;
        // Modes 6 and 7 are aliases of modes 2 and 3.
        self.mode = if mode >= 6 { mode - 4 } else { mode };
        self.access = Access::from_bits((control >> CONTROL_ACCESS_SHIFT) & 0b11);
        self.bcd = control & CONTROL_BCD != 0;
        self.counting = Counting::Idle;
        self.null_count = true;
        self.pending_low = None;
        self.live_low_read = false;
        self.latched_count = None;
        self.latched_status = None;
        self.reported_ticks = 0;
    }

    fn load(&mut self, reload: u16, now_ns: u64) {
        self.reload = reload;
        self.null_count = false;
        match self.mode {
            // Hardware-triggered modes wait for a rising gate edge.
            1 | 5 => {}
            _ if self.gate => self.restart(now_ns),
            _ => {
                self.counting = Counting::Suspended { elapsed_ns: 0 };
                self.reported_ticks = 0;
            }
        }
    }

    fn write_data(&mut self, value: u8, now_ns: u64) {
        match self.access {
            Access::Low => self.load(u16::from(value), now_ns),
            Access::High => self.load(u16::from(value) << 8, now_ns),
            Access::LowThenHigh => match self.pending_low.take() {
                Some(low) => self.load(u16::from_le_bytes([low, value]), now_ns),
                None => {
                    self.pending_low = Some(value);
                    self.null_count = true;
                    // In mode 0 the first byte stops the count until the second arrives.
                    if self.mode == 0 {
                        self.counting = Counting::Idle;
                    }
                }
            },
        }
    }

    fn read_data(&mut self, now_ns: u64) -> u8 {
        if let Some(status) = self.latched_status.take() {
            return status;
        }
        if let Some(mut latch) = self.latched_count.take() {
            let [low, high] = latch.value.to_le_bytes();
            return match self.access {
                Access::Low => low,
                Access::High => high,
                Access::LowThenHigh if !latch.low_read => {
                    latch.low_read = true;
                    self.latched_count = Some(latch);
                    low
                }
                Access::LowThenHigh => high,
            };
        }
        let [low, high] = self.count(now_ns).to_le_bytes();
        match self.access {
            Access::Low => low,
            Access::High => high,
            Access::LowThenHigh => {
                self.live_low_read = !self.live_low_read;
                if self.live_low_read {
                    low
                } else {
                    high
                }
            }
        }
    }

    fn latch_count(&mut self, now_ns: u64) {
        // A second latch before the first is read is ignored, as on the chip.
        if self.latched_count.is_none() {
            self.latched_count = Some(LatchedCount {
                value: self.count(now_ns),
                low_read: false,
            });
        }
    }

    fn latch_status(&mut self, now_ns: u64) {
        if self.latched_status.is_none() {
            self.latched_status = Some(self.status(now_ns));
        }
    }

    fn set_gate(&mut self, gate: bool, now_ns: u64) {
        if gate == self.gate {
            return;
        }
        self.gate = gate;
        let counted = self.pending_low.is_none() && !self.null_count;
        match (self.mode, gate, self.counting) {
            // A rising edge triggers modes 1 and 5 and restarts modes 2 and 3.
            (1 | 5 | 2 | 3, true, _) if counted => self.restart(now_ns),
            // A low gate suspends modes 0, 2, 3 and 4. Modes 1 and 5 ignore it.
            (0 | 2 | 3 | 4, false, Counting::Running { start_ns }) => {
                self.counting = Counting::Suspended {
                    elapsed_ns: now_ns.saturating_sub(start_ns),
                };
            }
            // A high gate resumes modes 0 and 4 where they stopped.
            (0 | 4, true, Counting::Suspended { elapsed_ns }) => {
                self.counting = Counting::Running {
                    start_ns: now_ns.saturating_sub(elapsed_ns),
                };
            }
            _ => {}
        }
    }

    /// Returns the first tick after `after` at which the output rises, or `None` if it
    /// never rises again without reprogramming.
    fn next_rising_edge(&self, after: u64) -> Option<u64> {
        let period = self.period();
        match self.mode {
            0 | 1 => (after < period).then_some(period),
            2 | 3 => Some((after / period + 1) * period),
            _ => (after < period + 1).then_some(period + 1),
        }
    }

    /// Counts the rising output edges up to `now_ns` that were not yet reported.
    fn take_rising_edges(&mut self, now_ns: u64) -> u64 {
        let Counting::Running { .. } = self.counting else {
            return 0;
        };
        let Some(ticks) = self.elapsed_ticks(now_ns) else {
            return 0;
        };
        if ticks <= self.reported_ticks {
            return 0;
        }
        let period = self.period();
        let edges = match self.mode {
            2 | 3 => ticks / period - self.reported_ticks / period,
            _ => {
                let edge = self.next_rising_edge(self.reported_ticks);
                u64::from(edge.is_some_and(|edge| edge <= ticks))
            }
        };
        self.reported_ticks = ticks;
        edges
    }
}

/// Counters of the PIT, for metrics and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PitStats {
    /// Guest accesses ignored for a wrong size, an unused offset or a read of port 0x43.
    pub ignored_accesses: u64,
}

/// The 8254 PIT with port 0x61.
pub struct Pit {
    clock: Arc<dyn Clock>,
    channels: [Channel; 3],
    /// Stored port 0x61 bits (gate 2, speaker enable, check disables).
    port_b: u8,
    ignored_accesses: GuestErrorLog,
}

impl Pit {
    /// Creates a PIT that reads time from `clock`. Channels 0 and 1 have their gates tied
    /// high; channel 2's gate starts low, as port 0x61 bit 0 does.
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Pit {
            clock,
            channels: [Channel::new(true), Channel::new(true), Channel::new(false)],
            port_b: 0,
            ignored_accesses: GuestErrorLog::default(),
        }
    }

    /// Returns the monotonic time at which channel 0's output next rises and IRQ 0 is due,
    /// or `None` if it will not rise without reprogramming. The result is `now_ns` when an
    /// edge is already due and not yet taken by [`Pit::advance`].
    pub fn next_deadline(&self, now_ns: u64) -> Option<u64> {
        let channel = &self.channels[0];
        let Counting::Running { start_ns } = channel.counting else {
            return None;
        };
        let edge = channel.next_rising_edge(channel.reported_ticks)?;
        let deadline = start_ns.saturating_add(ticks_to_ns(edge));
        Some(deadline.max(now_ns))
    }

    /// Takes the rising edges of channel 0's output up to `now_ns` and returns how many
    /// there were. The caller raises IRQ 0 if the result is not zero. Several edges
    /// mean that the event loop woke late, and one interrupt for all of them is what
    /// an 8259 would latch.
    pub fn advance(&mut self, now_ns: u64) -> u64 {
        self.channels[0].take_rising_edges(now_ns)
    }

    /// Returns the PIT's counters.
    pub fn stats(&self) -> PitStats {
        PitStats {
            ignored_accesses: self.ignored_accesses.count(),
        }
    }

    fn write_control(&mut self, control: u8, now_ns: u64) {
        let select = control >> CONTROL_SELECT_SHIFT;
        if select == CONTROL_READ_BACK {
            for (index, channel) in self.channels.iter_mut().enumerate() {
                if control & (1 << (index + 1)) == 0 {
                    continue;
                }
                if control & READ_BACK_NO_STATUS == 0 {
                    channel.latch_status(now_ns);
                }
                if control & READ_BACK_NO_COUNT == 0 {
                    channel.latch_count(now_ns);
                }
            }
            return;
        }

        let channel = &mut self.channels[usize::from(select)];
        if (control >> CONTROL_ACCESS_SHIFT) & 0b11 == CONTROL_ACCESS_LATCH {
            channel.latch_count(now_ns);
        } else {
            channel.set_control(control);
        }
    }

    fn read_port_b(&self, now_ns: u64) -> u8 {
        let mut value = self.port_b;
        if (now_ns / REFRESH_TOGGLE_NS) % 2 == 1 {
            value |= PORT_B_REFRESH;
        }
        if self.channels[2].output(now_ns) {
            value |= PORT_B_OUT2;
        }
        value
    }

    fn write_port_b(&mut self, value: u8, now_ns: u64) {
        self.port_b = value & PORT_B_WRITABLE;
        self.channels[2].set_gate(value & PORT_B_GATE2 != 0, now_ns);
    }

    fn record_ignored(&mut self, kind: &str, offset: u64, len: usize) {
        self.ignored_accesses.record(
            DEVICE,
            format_args!(
                "ignored {len}-byte {kind} at offset {offset:#x}: only 1-byte accesses to ports 0x40-0x43 and 0x61 are valid, and port 0x43 is write-only"
            ),
        );
    }
}

impl BusDevice for Pit {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let now_ns = self.clock.monotonic_ns();
        match (offset, data.len()) {
            (0..=2, 1) => data[0] = self.channels[offset as usize].read_data(now_ns),
            (PORT_B_OFFSET, 1) => data[0] = self.read_port_b(now_ns),
            _ => {
                self.record_ignored("read", offset, data.len());
                fill_unclaimed(data);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let now_ns = self.clock.monotonic_ns();
        match (offset, data) {
            (0..=2, &[value]) => self.channels[offset as usize].write_data(value, now_ns),
            (CONTROL_OFFSET, &[control]) => self.write_control(control, now_ns),
            (PORT_B_OFFSET, &[value]) => self.write_port_b(value, now_ns),
            _ => self.record_ignored("write", offset, data.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::core::devices::test_utils::ManualClock;

    fn pit() -> (Pit, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::default());
        // Start away from zero so that saturating arithmetic cannot hide errors.
        clock.monotonic.store(1_000_000_000, Ordering::SeqCst);
        (Pit::new(clock.clone()), clock)
    }

    fn now(clock: &ManualClock) -> u64 {
        clock.monotonic_ns()
    }

    /// Programs `channel` in `mode` with low-then-high access and loads `count`.
    fn program(pit: &mut Pit, channel: u8, mode: u8, count: u16) {
        pit.write(CONTROL_OFFSET, &[(channel << 6) | 0x30 | (mode << 1)]);
        let [low, high] = count.to_le_bytes();
        pit.write(u64::from(channel), &[low]);
        pit.write(u64::from(channel), &[high]);
    }

    fn read_byte(pit: &mut Pit, offset: u64) -> u8 {
        let mut data = [0];
        pit.read(offset, &mut data);
        data[0]
    }

    fn read_count(pit: &mut Pit, channel: u8) -> u16 {
        let low = read_byte(pit, u64::from(channel));
        let high = read_byte(pit, u64::from(channel));
        u16::from_le_bytes([low, high])
    }

    fn out2(pit: &mut Pit) -> bool {
        read_byte(pit, PORT_B_OFFSET) & PORT_B_OUT2 != 0
    }

    #[test]
    fn tick_conversion_round_trips() {
        assert_eq!(ns_to_ticks(ticks_to_ns(0)), 0);
        for ticks in [1, 1193, 65_536, 1_193_182, 10_000_000] {
            assert_eq!(ns_to_ticks(ticks_to_ns(ticks)), ticks, "{ticks}");
            assert_eq!(ns_to_ticks(ticks_to_ns(ticks) - 1), ticks - 1, "{ticks}");
        }
    }

    #[test]
    fn mode2_counts_down_and_reloads() {
        let (mut pit, clock) = pit();
        program(&mut pit, 0, 2, 1000);
        assert_eq!(read_count(&mut pit, 0), 1000);

        clock.advance(ticks_to_ns(100));
        assert_eq!(read_count(&mut pit, 0), 900);

        clock.advance(ticks_to_ns(1000) - ticks_to_ns(100));
        assert_eq!(read_count(&mut pit, 0), 1000, "reloaded after one period");
    }

    #[test]
    fn mode2_raises_periodic_irq() {
        let (mut pit, clock) = pit();
        let start = now(&clock);
        program(&mut pit, 0, 2, 1193);

        let deadline = pit.next_deadline(start).unwrap();
        assert_eq!(deadline, start + ticks_to_ns(1193));
        assert_eq!(pit.advance(deadline - 1), 0);
        assert_eq!(pit.advance(deadline), 1);
        assert_eq!(
            pit.next_deadline(deadline),
            Some(start + ticks_to_ns(2 * 1193))
        );

        // Waking late finds every missed edge.
        let late = start + ticks_to_ns(5 * 1193) + 10;
        assert_eq!(pit.advance(late), 4);
        assert_eq!(pit.advance(late), 0);
        clock.advance(late - start);
        assert_eq!(read_count(&mut pit, 0), 1193);
    }

    #[test]
    fn mode3_square_wave() {
        let (mut pit, clock) = pit();
        let start = now(&clock);
        program(&mut pit, 2, 3, 100);
        pit.write(PORT_B_OFFSET, &[PORT_B_GATE2]);
        let gate_start = now(&clock);
        assert_eq!(gate_start, start);

        assert!(out2(&mut pit));
        assert_eq!(read_count(&mut pit, 2), 100);
        clock.advance(ticks_to_ns(10));
        assert_eq!(read_count(&mut pit, 2), 80, "counts down by two");
        clock.advance(ticks_to_ns(50) - ticks_to_ns(10));
        assert!(!out2(&mut pit), "second half is low");
        clock.advance(ticks_to_ns(100) - ticks_to_ns(50));
        assert!(out2(&mut pit), "next period is high");
    }

    #[test]
    fn mode3_channel0_irq_per_period() {
        let (mut pit, clock) = pit();
        let start = now(&clock);
        program(&mut pit, 0, 3, 0);

        assert_eq!(pit.next_deadline(start), Some(start + ticks_to_ns(65_536)));
        assert_eq!(pit.advance(start + ticks_to_ns(3 * 65_536)), 3);
    }

    #[test]
    fn mode0_one_shot_on_channel2() {
        let (mut pit, clock) = pit();
        pit.write(PORT_B_OFFSET, &[PORT_B_GATE2]);
        program(&mut pit, 2, 0, 500);

        assert!(!out2(&mut pit));
        clock.advance(ticks_to_ns(499));
        assert!(!out2(&mut pit));
        assert_eq!(read_count(&mut pit, 2), 1);
        clock.advance(ticks_to_ns(500) - ticks_to_ns(499));
        assert!(out2(&mut pit), "terminal count");
        clock.advance(ticks_to_ns(10));
        assert!(out2(&mut pit), "stays high");
        assert_eq!(
            read_count(&mut pit, 2),
            0xfff6,
            "keeps counting through zero"
        );
    }

    #[test]
    fn mode0_irq_fires_once() {
        let (mut pit, clock) = pit();
        let start = now(&clock);
        program(&mut pit, 0, 0, 300);

        assert_eq!(pit.next_deadline(start), Some(start + ticks_to_ns(300)));
        assert_eq!(pit.advance(start + ticks_to_ns(10_000)), 1);
        assert_eq!(pit.next_deadline(start + ticks_to_ns(10_000)), None);
        assert_eq!(pit.advance(start + ticks_to_ns(100_000)), 0);
    }

    #[test]
    fn mode4_strobe_fires_after_count() {
        let (mut pit, clock) = pit();
        let start = now(&clock);
        program(&mut pit, 0, 4, 50);

        assert_eq!(
            pit.advance(start + ticks_to_ns(50)),
            0,
            "output low at count"
        );
        assert_eq!(
            pit.advance(start + ticks_to_ns(51)),
            1,
            "rises one tick later"
        );
        assert_eq!(pit.next_deadline(start + ticks_to_ns(51)), None);
    }

    #[test]
    fn mode0_rewrite_restarts() {
        let (mut pit, clock) = pit();
        let start = now(&clock);
        program(&mut pit, 0, 0, 100);
        pit.advance(start + ticks_to_ns(200));

        clock.advance(ticks_to_ns(200));
        pit.write(0, &[50]);
        pit.write(0, &[0]);

        let restart = now(&clock);
        assert_eq!(pit.next_deadline(restart), Some(restart + ticks_to_ns(50)));
        assert_eq!(pit.advance(restart + ticks_to_ns(50)), 1);
    }

    #[test]
    fn low_gate_suspends_mode0() {
        let (mut pit, clock) = pit();
        pit.write(PORT_B_OFFSET, &[PORT_B_GATE2]);
        program(&mut pit, 2, 0, 1000);

        clock.advance(ticks_to_ns(300));
        pit.write(PORT_B_OFFSET, &[0]);
        clock.advance(ticks_to_ns(5000));
        assert_eq!(read_count(&mut pit, 2), 700, "frozen while the gate is low");
        pit.write(PORT_B_OFFSET, &[PORT_B_GATE2]);
        clock.advance(ticks_to_ns(100));

        assert_eq!(read_count(&mut pit, 2), 600);
    }

    #[test]
    fn count_written_with_gate_low_waits() {
        let (mut pit, clock) = pit();
        program(&mut pit, 2, 0, 10);

        clock.advance(ticks_to_ns(100));
        assert!(!out2(&mut pit));
        pit.write(PORT_B_OFFSET, &[PORT_B_GATE2]);
        clock.advance(ticks_to_ns(10));

        assert!(out2(&mut pit));
    }

    #[test]
    fn gate_triggers_mode1() {
        let (mut pit, clock) = pit();
        program(&mut pit, 2, 1, 20);
        assert!(out2(&mut pit), "high until triggered");
        clock.advance(ticks_to_ns(100));
        assert!(out2(&mut pit));

        pit.write(PORT_B_OFFSET, &[PORT_B_GATE2]);
        clock.advance(ticks_to_ns(5));
        assert!(!out2(&mut pit), "low while counting");
        assert_eq!(read_count(&mut pit, 2), 15);
        clock.advance(ticks_to_ns(20));

        assert!(out2(&mut pit));
    }

    #[test]
    fn latch_holds_count_until_read() {
        let (mut pit, clock) = pit();
        program(&mut pit, 0, 2, 1000);
        clock.advance(ticks_to_ns(100));

        pit.write(CONTROL_OFFSET, &[0x00]);
        clock.advance(ticks_to_ns(200));
        pit.write(CONTROL_OFFSET, &[0x00]);

        assert_eq!(read_count(&mut pit, 0), 900, "first latch wins");
        assert_eq!(read_count(&mut pit, 0), 700, "live again");
    }

    #[test]
    fn read_back_latches_status_and_count() {
        let (mut pit, clock) = pit();
        program(&mut pit, 0, 2, 1000);
        program(&mut pit, 1, 3, 2000);
        clock.advance(ticks_to_ns(10));

        // Read-back of count and status for channels 0 and 1.
        pit.write(CONTROL_OFFSET, &[0xc0 | 0b0110]);
        clock.advance(ticks_to_ns(100));

        assert_eq!(read_byte(&mut pit, 0), 0x34 | STATUS_OUTPUT);
        assert_eq!(read_count(&mut pit, 0), 990);
        assert_eq!(read_byte(&mut pit, 1), 0x36 | STATUS_OUTPUT);
        assert_eq!(read_count(&mut pit, 1), 1980);
        assert_eq!(read_count(&mut pit, 0), 890, "latches are used up");
    }

    #[test]
    fn status_shows_null_count_and_mode0_output() {
        let (mut pit, _) = pit();
        pit.write(CONTROL_OFFSET, &[0x30]);

        pit.write(CONTROL_OFFSET, &[0xe2]);
        assert_eq!(read_byte(&mut pit, 0), 0x30 | STATUS_NULL_COUNT);

        pit.write(0, &[0x10]);
        pit.write(0, &[0x00]);
        pit.write(CONTROL_OFFSET, &[0xe2]);
        assert_eq!(read_byte(&mut pit, 0), 0x30);
    }

    #[test]
    fn single_byte_access_modes() {
        let (mut pit, clock) = pit();

        pit.write(CONTROL_OFFSET, &[0x14]);
        pit.write(0, &[200]);
        clock.advance(ticks_to_ns(50));
        assert_eq!(read_byte(&mut pit, 0), 150);
        assert_eq!(read_byte(&mut pit, 0), 150, "low byte only, no flip-flop");

        pit.write(CONTROL_OFFSET, &[0x24]);
        pit.write(0, &[0x02]);
        clock.advance(ticks_to_ns(0x100));
        assert_eq!(read_byte(&mut pit, 0), 0x01, "high byte of 0x100");
    }

    #[test]
    fn bcd_counting() {
        let (mut pit, clock) = pit();
        pit.write(CONTROL_OFFSET, &[0x35]);
        pit.write(0, &[0x00]);
        pit.write(0, &[0x10]);

        clock.advance(ticks_to_ns(1));
        assert_eq!(read_count(&mut pit, 0), 0x0999);
    }

    #[test]
    fn port_b_keeps_writable_bits() {
        let (mut pit, _) = pit();

        pit.write(PORT_B_OFFSET, &[0xff]);

        let value = read_byte(&mut pit, PORT_B_OFFSET);
        assert_eq!(value & PORT_B_WRITABLE, PORT_B_WRITABLE);
        assert_eq!(value & 0xc0, 0);
    }

    #[test]
    fn refresh_bit_toggles() {
        let (mut pit, clock) = pit();
        let first = read_byte(&mut pit, PORT_B_OFFSET) & PORT_B_REFRESH;

        clock.advance(REFRESH_TOGGLE_NS);

        assert_ne!(read_byte(&mut pit, PORT_B_OFFSET) & PORT_B_REFRESH, first);
    }

    #[test]
    fn unprogrammed_channel0_has_no_deadline() {
        let (mut pit, clock) = pit();

        assert_eq!(pit.next_deadline(now(&clock)), None);
        assert_eq!(pit.advance(u64::MAX), 0);
    }

    #[test]
    fn malformed_accesses_are_ignored() {
        let (mut pit, clock) = pit();
        program(&mut pit, 0, 2, 1000);

        let mut wide = [0u8; 2];
        pit.read(0, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
        assert_eq!(read_byte(&mut pit, CONTROL_OFFSET), 0xff);
        pit.write(0, &[1, 2]);
        pit.write(5, &[1]);
        pit.write(u64::MAX, &[]);
        let mut byte = [0];
        pit.read(u64::MAX, &mut byte);

        assert_eq!(byte, [0xff]);
        assert_eq!(pit.stats().ignored_accesses, 6);
        assert_eq!(read_count(&mut pit, 0), 1000);
        assert_eq!(
            pit.next_deadline(now(&clock)),
            Some(now(&clock) + ticks_to_ns(1000))
        );
    }
}
